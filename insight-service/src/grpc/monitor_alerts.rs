//! The optional `--monitor-url` signal: a monitor-service's alerts as a second opinion on
//! memory pressure, next to the in-process probe (`admission::pressure`).
//!
//! A monitor watching the pod (or the node) can see what our own probe cannot: a neighbour
//! container filling the pod's memory, PSI of a group we are not in, an OOM kill next door.
//! Its FIRING alerts raise our pressure level (WARNING → Elevated, CRITICAL → Critical) until
//! they are RESOLVED. The signal is only ever additive and never required: while the monitor
//! is unreachable it counts as "no alerts", shedding falls back to the local probe alone, and
//! the follower reconnects with jittered backoff. Nothing else depends on it.

use std::{collections::HashMap, time::Duration};

use spotifai_proto::monitor::{
    AlertState, MemoryAlert, Severity, StreamAlertsRequest,
    memory_monitor_client::MemoryMonitorClient,
};
use tokio::sync::watch;
use tonic::transport::Endpoint;

use crate::{admission::Pressure, llm::http::jitter};

/// First reconnection delay after the stream ends; doubled per failed attempt.
const MIN_BACKOFF: Duration = Duration::from_millis(500);
/// Longest reconnection delay: a monitor that comes back is followed again within this.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Connecting gives up after this, so a black-holed address is retried rather than waited on.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// HTTP/2 pings on the idle alert stream (alerts are rare), so a monitor that vanished without
/// closing the connection is noticed within interval + timeout.
const KEEPALIVE: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// A stream that stayed open this long counts as a success: the next loss is a new outage
/// (logged, backoff from the start). Shorter-lived streams (a monitor that accepts and closes
/// at once) keep the backoff growing.
const STABLE_AFTER: Duration = Duration::from_secs(10);

/// The alerts currently firing, by id, and the pressure level they amount to.
#[derive(Debug, Default)]
pub struct FiringAlerts {
    firing: HashMap<String, Severity>,
}

impl FiringAlerts {
    /// Applies one alert event and returns the level now.
    pub fn apply(&mut self, alert: &MemoryAlert) -> Pressure {
        match alert.state() {
            AlertState::Firing => {
                self.firing.insert(alert.id.clone(), alert.severity());
            }
            AlertState::Resolved => {
                self.firing.remove(&alert.id);
            }
            AlertState::Unspecified => {}
        }
        self.level()
    }

    /// The highest severity firing, as a pressure level.
    pub fn level(&self) -> Pressure {
        self.firing
            .values()
            .map(|severity| match severity {
                Severity::Critical => Pressure::Critical,
                Severity::Warning => Pressure::Elevated,
                Severity::Unspecified => Pressure::Normal,
            })
            .max()
            .unwrap_or_default()
    }
}

/// Follows the alerts of the monitor at `url` and publishes the level they amount to on `tx`,
/// until every receiver is gone. `url` was checked at startup (`config::parse_monitor_url`).
pub async fn follow(url: String, tx: watch::Sender<Pressure>) {
    let endpoint = match Endpoint::from_shared(url.clone()) {
        Ok(endpoint) => endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT),
        Err(error) => {
            tracing::error!(%url, %error, "not following the monitor: invalid --monitor-url");
            return;
        }
    };
    let mut failures = 0u32;
    loop {
        let opened = tokio::time::Instant::now();
        let outcome = tokio::select! {
            outcome = stream_once(&endpoint, &tx, failures) => outcome,
            () = tx.closed() => return,
        };
        // Whatever the monitor said is void once we stop hearing from it.
        tx.send_replace(Pressure::Normal);
        if opened.elapsed() >= STABLE_AFTER {
            failures = 0;
        }
        // Said again every tenth failed attempt in a row (about every 5 minutes at the
        // longest backoff), so that an operator reading the log of a monitor that never
        // answered does not take the extra signal for working.
        if failures.is_multiple_of(10) {
            tracing::warn!(
                %url,
                reason = %outcome,
                attempts = failures + 1,
                "no alert stream from the monitor (its pressure signal is off meanwhile); retrying"
            );
        } else {
            tracing::debug!(%url, reason = %outcome, "monitor still unreachable");
        }
        failures = failures.saturating_add(1);
        let base = MIN_BACKOFF
            .saturating_mul(1 << failures.min(8))
            .min(MAX_BACKOFF);
        let delay = (base / 2).saturating_add(base.mul_f64(jitter() / 2.0));
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = tx.closed() => return,
        }
    }
}

/// One connection's worth of alerts; returns why it ended. `failures` is how many attempts
/// in a row failed before this one (for the log).
async fn stream_once(endpoint: &Endpoint, tx: &watch::Sender<Pressure>, failures: u32) -> String {
    let channel = match endpoint.connect().await {
        Ok(channel) => channel,
        Err(error) => return format!("connect: {error}"),
    };
    let request = StreamAlertsRequest {
        min_severity: Severity::Warning as i32,
    };
    // Bounded: a monitor that accepts the connection but never answers the call (HTTP/2 pings
    // still answered) would otherwise hold the follower here for good.
    let mut client = MemoryMonitorClient::new(channel);
    let call = client.stream_alerts(request);
    let mut alerts = match tokio::time::timeout(CONNECT_TIMEOUT, call).await {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(status)) => return format!("StreamAlerts: {status}"),
        Err(_) => return "StreamAlerts: no answer in time".to_owned(),
    };
    if failures > 0 {
        tracing::info!(uri = %endpoint.uri(), "following the monitor's alerts again");
    }
    // The monitor sends the alerts firing now first, so this state is complete from here on.
    let mut firing = FiringAlerts::default();
    loop {
        match alerts.message().await {
            Ok(Some(alert)) => {
                let level = firing.apply(&alert);
                tx.send_if_modified(|current| {
                    let changed = *current != level;
                    *current = level;
                    changed
                });
            }
            Ok(None) => return "the monitor ended the stream".to_owned(),
            Err(status) => return format!("stream: {status}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(id: &str, severity: Severity, state: AlertState) -> MemoryAlert {
        MemoryAlert {
            id: id.to_owned(),
            severity: severity as i32,
            state: state as i32,
            ..MemoryAlert::default()
        }
    }

    #[test]
    fn the_level_is_the_highest_severity_still_firing() {
        let mut firing = FiringAlerts::default();
        assert_eq!(firing.level(), Pressure::Normal);
        let warn = alert("w1", Severity::Warning, AlertState::Firing);
        assert_eq!(firing.apply(&warn), Pressure::Elevated);
        let crit = alert("c1", Severity::Critical, AlertState::Firing);
        assert_eq!(firing.apply(&crit), Pressure::Critical);
        // Resolving the critical one leaves the warning.
        let resolved = alert("c1", Severity::Critical, AlertState::Resolved);
        assert_eq!(firing.apply(&resolved), Pressure::Elevated);
        // A RESOLVED for an alert never seen firing changes nothing.
        let stray = alert("x", Severity::Critical, AlertState::Resolved);
        assert_eq!(firing.apply(&stray), Pressure::Elevated);
        let resolved = alert("w1", Severity::Warning, AlertState::Resolved);
        assert_eq!(firing.apply(&resolved), Pressure::Normal);
    }
}
