//! Threshold alerts: the [`AlertEngine`] turns samples into FIRING and RESOLVED events, the
//! [`AlertHub`] fans them out to `StreamAlerts` subscribers, and [`pipeline`] connects the
//! sampler, the engine, the hub and the alert history.
//!
//! Nothing here knows gRPC: the adapter converts [`AlertEvent`] to the protobuf `MemoryAlert`.
//! The engine is a pure state machine driven by explicit instants, so its hysteresis and dwell
//! are tested without waiting on a clock.

mod advice;
mod args;
mod engine;
mod hub;
pub mod pipeline;

use std::{fmt, sync::Arc, time::SystemTime};

pub use args::{AlertArgs, AlertArgsError};
pub use engine::{AlertConfig, AlertEngine};
pub use hub::{AlertHub, AlertSubscription, HubError, SUBSCRIBER_BUFFER};

use crate::probe::Sample;

/// How serious an alert is. Ordered, so `severity >= min_severity` filters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// A warning threshold was crossed: time to act before it gets worse.
    Warning,
    /// A critical threshold was crossed, or the OOM killer struck.
    Critical,
}

impl Severity {
    /// Lower-case name, as in alert ids, messages and log fields.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether an event starts or ends an alert.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AlertState {
    /// The condition has held for the dwell time (or an OOM kill happened).
    Firing,
    /// The condition has been clear for the dwell time.
    Resolved,
}

impl AlertState {
    /// Lower-case name, as in log fields.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Firing => "firing",
            Self::Resolved => "resolved",
        }
    }
}

/// What an alert watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Metric {
    /// [`Sample::usage_ratio`]: working set over the cgroup limit (or the machine's use).
    UsageRatio,
    /// The cgroup's PSI "some avg10": percent of the last 10 s in which some task stalled on
    /// memory. It rises before usage reaches the limit, when reclaim starts to hurt.
    PressureSomeAvg10,
    /// The cgroup's OOM-kill count. Its alerts carry the count as the value and the count
    /// before the new kills as the threshold.
    OomKills,
}

impl Metric {
    /// Every metric, in the order the engine evaluates them.
    pub const ALL: [Self; 3] = [Self::UsageRatio, Self::PressureSomeAvg10, Self::OomKills];

    /// The metric's name, as in the protobuf contract and the alert history.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UsageRatio => "usage_ratio",
            Self::PressureSomeAvg10 => "pressure_some_avg10",
            Self::OomKills => "oom_kills",
        }
    }

    /// The metric named `name` (see [`Metric::as_str`]).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|metric| metric.as_str() == name)
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One FIRING or RESOLVED event, with everything an operator needs to act on it.
#[derive(Clone, Debug, PartialEq)]
pub struct AlertEvent {
    /// Identifies the alert: its FIRING and RESOLVED events share it, and it is unique across
    /// restarts and replicas (it carries a random per-engine part).
    pub id: String,
    /// When the event happened: the time of the sample that caused it.
    pub at: SystemTime,
    /// How serious.
    pub severity: Severity,
    /// FIRING or RESOLVED.
    pub state: AlertState,
    /// What crossed its threshold.
    pub metric: Metric,
    /// The metric's value in [`AlertEvent::sample`].
    pub value: f64,
    /// The threshold that was crossed (the firing threshold also on RESOLVED events, so both
    /// events of one alert show the same rule).
    pub threshold: f64,
    /// One sentence for people, e.g. "memory working set at 93% of the 256 MiB cgroup limit
    /// (critical ≥ 90%)".
    pub message: String,
    /// Which knobs to turn, chosen from the sample (empty on RESOLVED: nothing to do).
    pub recommendations: Vec<String>,
    /// The sample that caused the event, shared rather than copied per subscriber.
    pub sample: Arc<Sample>,
}

impl AlertEvent {
    /// Whether a subscriber asking for `min_severity` (`None` = all) wants this event.
    pub fn matches(&self, min_severity: Option<Severity>) -> bool {
        min_severity.is_none_or(|min| self.severity >= min)
    }

    /// Logs the event with structured fields, so log pipelines can alert on them without
    /// parsing the message. FIRING logs at WARN (ERROR when critical), RESOLVED at INFO.
    pub fn log(&self) {
        macro_rules! log_at {
            ($level:ident) => {
                tracing::$level!(
                    alert_id = %self.id,
                    severity = self.severity.as_str(),
                    state = self.state.as_str(),
                    metric = self.metric.as_str(),
                    value = self.value,
                    threshold = self.threshold,
                    recommendations = self.recommendations.len(),
                    "{}",
                    self.message
                )
            };
        }
        match (self.state, self.severity) {
            (AlertState::Firing, Severity::Critical) => log_at!(error),
            (AlertState::Firing, Severity::Warning) => log_at!(warn),
            (AlertState::Resolved, _) => log_at!(info),
        }
    }
}
