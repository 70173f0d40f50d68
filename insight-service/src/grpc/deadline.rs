//! The caller's deadline, from the `grpc-timeout` request header, capped by the server's own
//! `--request-timeout`. Every backend call inherits what is left of it.

use std::time::Duration;

use tokio::time::Instant;

/// Parses a `grpc-timeout` value: up to 8 ASCII digits and a unit (H, M, S, m, u, n), per the
/// gRPC over HTTP/2 spec. `None` for anything else.
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The absolute deadline of a call, fixed when it arrived (by the deadline layer, before any
/// time spent queued), and carried to the handler in the request's extensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallDeadline(pub Instant);

/// Longest margin kept between our answer and the caller's own deadline.
const REPLY_MARGIN: Duration = Duration::from_millis(100);

/// The deadline `grpc-timeout` asks for, never later than `max` from now (a malformed value is
/// ignored, as tonic does).
///
/// A caller's deadline is shortened by a reply margin (a tenth of it, at most
/// `REPLY_MARGIN`): gRPC clients arm their own timer for the same deadline, and an answer
/// that leaves at the deadline arrives after it, so the caller would see its own CANCELLED
/// instead of our DEADLINE_EXCEEDED (or the degraded answer we had ready).
pub fn deadline_from(metadata: &http::HeaderMap, max: Duration) -> Instant {
    let caller = metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout);
    // The margin is taken before the cap: a caller's 120.02 s against a 120 s maximum would
    // otherwise keep 20 ms, not 100.
    let timeout = caller.map_or(max, |t| (t - (t / 10).min(REPLY_MARGIN)).min(max));
    Instant::now() + timeout
}

/// The instant by which this call must be answered: the one the deadline layer fixed when the
/// call arrived, so time spent waiting for a slot counts; without that layer (unit tests),
/// computed now from `grpc-timeout` and `max`.
pub fn request_deadline<T>(request: &tonic::Request<T>, max: Duration) -> Instant {
    match request.extensions().get::<CallDeadline>() {
        Some(CallDeadline(at)) => *at,
        None => deadline_from(&request.metadata().clone().into_headers(), max),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("9n"), Some(Duration::from_nanos(9)));
    }

    #[test]
    fn rejects_malformed_values() {
        for bad in ["", "S", "10", "123456789S", "1.5S", "-1S", "10x", "éS"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_server_maximum_caps_the_caller() {
        let mut request = tonic::Request::new(());
        request
            .metadata_mut()
            .insert("grpc-timeout", "99999S".parse().unwrap());
        let deadline = request_deadline(&request, Duration::from_secs(2));
        assert!(deadline <= Instant::now() + Duration::from_secs(2));
        let none = request_deadline(&tonic::Request::new(()), Duration::from_secs(3));
        assert!(none > Instant::now() + Duration::from_secs(2));
    }

    #[test]
    fn a_caller_deadline_keeps_a_reply_margin() {
        let mut headers = http::HeaderMap::new();
        headers.insert("grpc-timeout", "2S".parse().unwrap());
        let before = Instant::now();
        let at = deadline_from(&headers, Duration::from_secs(120));
        assert!(at >= before + Duration::from_millis(1_900));
        assert!(at <= Instant::now() + Duration::from_millis(1_900));
        headers.insert("grpc-timeout", "200m".parse().unwrap());
        let at = deadline_from(&headers, Duration::from_secs(120));
        assert!(at <= Instant::now() + Duration::from_millis(180));
        // Just above the server maximum: the margin still holds.
        headers.insert("grpc-timeout", "120020m".parse().unwrap());
        let at = deadline_from(&headers, Duration::from_secs(120));
        assert!(at <= Instant::now() + Duration::from_millis(119_920));
    }

    #[test]
    fn the_deadline_fixed_on_arrival_wins() {
        let at = Instant::now() + Duration::from_millis(50);
        let mut request = tonic::Request::new(());
        request
            .metadata_mut()
            .insert("grpc-timeout", "10S".parse().unwrap());
        request.extensions_mut().insert(CallDeadline(at));
        assert_eq!(request_deadline(&request, Duration::from_secs(120)), at);
    }
}
