//! The caller's deadline, from the `grpc-timeout` request header, capped by the server's own
//! `--request-timeout`. Every backend call inherits what is left of it.

use std::time::Duration;

use tokio::time::Instant;
use tonic::metadata::MetadataMap;

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

/// The instant by which this call must be answered: the caller's `grpc-timeout` if it sent
/// one (a malformed one is ignored, as tonic does), never later than `max` from now.
pub fn request_deadline(metadata: &MetadataMap, max: Duration) -> Instant {
    let caller = metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout);
    let timeout = caller.map_or(max, |t| t.min(max));
    Instant::now() + timeout
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
        let mut metadata = MetadataMap::new();
        metadata.insert("grpc-timeout", "99999S".parse().unwrap());
        let deadline = request_deadline(&metadata, Duration::from_secs(2));
        assert!(deadline <= Instant::now() + Duration::from_secs(2));
        let none = request_deadline(&MetadataMap::new(), Duration::from_secs(3));
        assert!(none > Instant::now() + Duration::from_secs(2));
    }
}
