//! JSON lines for scripts: a server's [`MemorySample`] in the exact shape `check --json` prints
//! for a local [`Sample`](crate::probe::Sample), and one object per alert event.
//!
//! The views mirror `Sample`'s serde layout field for field and in the same order, so a script
//! reads `watch --server --json` and `check --json` alike; a test pins the two byte for byte.
//! Where the proto cannot say "unknown" (an unset enum or timestamp) the view says `null`
//! rather than inventing a value.

use std::time::SystemTime;

use serde::Serialize;
use spotifai_proto::monitor::{self as pb, MemoryAlert, MemorySample};

use super::table::level_from_proto;
use crate::probe::{CgroupVersion, Level, ProcessMem, SystemMem, format_rfc3339};

/// A [`MemorySample`] as `check --json` lays out a sample, plus `dropped` when the server
/// reports missed samples.
#[derive(Debug, Serialize)]
pub struct SampleJson {
    seq: u64,
    at: Option<String>,
    process: Option<ProcessMem>,
    targets: Vec<ProcessMem>,
    cgroup: Option<CgroupJson>,
    system: Option<SystemMem>,
    usage_ratio: f64,
    level: Option<Level>,
    // Only present when samples were missed, so a line from a reader that kept up is exactly
    // `check --json`'s shape.
    #[serde(skip_serializing_if = "is_zero")]
    dropped: u64,
}

/// The cgroup part of [`SampleJson`], in `CgroupMem`'s field order.
#[derive(Debug, Serialize)]
struct CgroupJson {
    version: Option<CgroupVersion>,
    path: String,
    current_bytes: u64,
    max_bytes: u64,
    working_set_bytes: u64,
    anon_bytes: u64,
    file_bytes: u64,
    inactive_file_bytes: u64,
    oom_kills: u64,
    // Numbers, never null: a proto double has no "absent", so a server without PSI sends 0
    // where a local `check --json` would say null.
    pressure_some_avg10: f64,
    pressure_full_avg10: f64,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

fn time(at: Option<prost_types::Timestamp>) -> Option<String> {
    at.and_then(|at| SystemTime::try_from(at).ok())
        .and_then(format_rfc3339)
}

fn process(process: pb::ProcessMemory) -> ProcessMem {
    ProcessMem {
        pid: process.pid,
        rss_bytes: process.rss_bytes,
        virtual_bytes: process.virtual_bytes,
    }
}

impl From<&MemorySample> for SampleJson {
    fn from(message: &MemorySample) -> Self {
        Self {
            seq: message.seq,
            at: time(message.at),
            process: message.process.map(process),
            targets: message.targets.iter().copied().map(process).collect(),
            cgroup: message.cgroup.as_ref().map(|group| CgroupJson {
                version: match group.version() {
                    pb::CgroupVersion::V1 => Some(CgroupVersion::V1),
                    pb::CgroupVersion::V2 => Some(CgroupVersion::V2),
                    pb::CgroupVersion::Unspecified => None,
                },
                path: group.path.clone(),
                current_bytes: group.current_bytes,
                max_bytes: group.max_bytes,
                working_set_bytes: group.working_set_bytes,
                anon_bytes: group.anon_bytes,
                file_bytes: group.file_bytes,
                inactive_file_bytes: group.inactive_file_bytes,
                oom_kills: group.oom_kills,
                pressure_some_avg10: group.pressure_some_avg10,
                pressure_full_avg10: group.pressure_full_avg10,
            }),
            system: message.system.map(|system| SystemMem {
                total_bytes: system.total_bytes,
                available_bytes: system.available_bytes,
                swap_total_bytes: system.swap_total_bytes,
                swap_used_bytes: system.swap_used_bytes,
            }),
            usage_ratio: message.usage_ratio,
            level: level_from_proto(message.level()),
            dropped: message.dropped,
        }
    }
}

/// One alert event as a JSON object: severity and state in lower case like `level`, the
/// triggering sample in the `check --json` shape.
#[derive(Debug, Serialize)]
pub struct AlertJson {
    id: String,
    at: Option<String>,
    severity: Option<&'static str>,
    state: Option<&'static str>,
    metric: String,
    value: f64,
    threshold: f64,
    message: String,
    recommendations: Vec<String>,
    sample: Option<SampleJson>,
}

/// "warning" / "critical"; `None` when unspecified.
pub fn severity_name(severity: pb::Severity) -> Option<&'static str> {
    match severity {
        pb::Severity::Warning => Some("warning"),
        pb::Severity::Critical => Some("critical"),
        pb::Severity::Unspecified => None,
    }
}

/// "firing" / "resolved"; `None` when unspecified.
pub fn state_name(state: pb::AlertState) -> Option<&'static str> {
    match state {
        pb::AlertState::Firing => Some("firing"),
        pb::AlertState::Resolved => Some("resolved"),
        pb::AlertState::Unspecified => None,
    }
}

impl From<&MemoryAlert> for AlertJson {
    fn from(alert: &MemoryAlert) -> Self {
        Self {
            id: alert.id.clone(),
            at: time(alert.at),
            severity: severity_name(alert.severity()),
            state: state_name(alert.state()),
            metric: alert.metric.clone(),
            value: alert.value,
            threshold: alert.threshold,
            message: alert.message.clone(),
            recommendations: alert.recommendations.clone(),
            sample: alert.sample.as_ref().map(SampleJson::from),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::probe::{CgroupMem, Sample};

    fn sample() -> Sample {
        Sample {
            seq: 12,
            at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            process: ProcessMem {
                pid: 1,
                rss_bytes: 2,
                virtual_bytes: 3,
            },
            targets: vec![ProcessMem {
                pid: 4,
                rss_bytes: 5,
                virtual_bytes: 6,
            }],
            cgroup: Some(CgroupMem {
                version: CgroupVersion::V1,
                path: "/g".into(),
                current_bytes: 10,
                max_bytes: 11,
                working_set_bytes: 12,
                anon_bytes: 13,
                file_bytes: 14,
                inactive_file_bytes: 15,
                oom_kills: 16,
                pressure_some_avg10: Some(1.5),
                pressure_full_avg10: Some(0.25),
            }),
            system: SystemMem {
                total_bytes: 20,
                available_bytes: 21,
                swap_total_bytes: 22,
                swap_used_bytes: 23,
            },
            usage_ratio: 0.5,
            level: Level::Critical,
        }
    }

    #[test]
    fn a_server_sample_prints_exactly_like_check_json() {
        let local = sample();
        let message = MemorySample::from(local.clone());
        assert_eq!(
            serde_json::to_string(&SampleJson::from(&message)).unwrap(),
            serde_json::to_string(&local).unwrap()
        );
        let mut no_cgroup = local;
        no_cgroup.cgroup = None;
        no_cgroup.level = Level::Ok;
        let message = MemorySample::from(no_cgroup.clone());
        assert_eq!(
            serde_json::to_string(&SampleJson::from(&message)).unwrap(),
            serde_json::to_string(&no_cgroup).unwrap()
        );
    }

    #[test]
    fn dropped_is_added_only_when_samples_were_missed() {
        let mut message = MemorySample::from(sample());
        message.dropped = 3;
        let json = serde_json::to_value(SampleJson::from(&message)).unwrap();
        assert_eq!(json["dropped"], 3);
        assert_eq!(json["seq"], 12);
    }

    #[test]
    fn unknowns_are_null_not_invented() {
        let json = serde_json::to_value(SampleJson::from(&MemorySample {
            seq: 1,
            cgroup: Some(pb::CgroupMemory::default()),
            ..MemorySample::default()
        }))
        .unwrap();
        assert_eq!(json["at"], serde_json::Value::Null);
        assert_eq!(json["level"], serde_json::Value::Null);
        assert_eq!(json["process"], serde_json::Value::Null);
        assert_eq!(json["cgroup"]["version"], serde_json::Value::Null);
        assert_eq!(json["cgroup"]["max_bytes"], 0);
    }

    #[test]
    fn alert_events_carry_every_field() {
        let alert = MemoryAlert {
            id: "a1".to_owned(),
            at: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            severity: pb::Severity::Critical.into(),
            state: pb::AlertState::Resolved.into(),
            metric: "usage_ratio".to_owned(),
            value: 0.85,
            threshold: 0.9,
            message: "memory use fell below 90% of the limit".to_owned(),
            recommendations: vec!["raise the limit".to_owned()],
            sample: Some(MemorySample::from(sample())),
        };
        let json = serde_json::to_value(AlertJson::from(&alert)).unwrap();
        assert_eq!(json["id"], "a1");
        assert_eq!(json["at"], "2023-11-14T22:13:20.000Z");
        assert_eq!(json["severity"], "critical");
        assert_eq!(json["state"], "resolved");
        assert_eq!(json["metric"], "usage_ratio");
        assert_eq!(json["value"], 0.85);
        assert_eq!(json["threshold"], 0.9);
        assert_eq!(json["recommendations"][0], "raise the limit");
        assert_eq!(json["sample"]["seq"], 12);
        assert_eq!(json["sample"]["level"], "critical");

        let bare = serde_json::to_value(AlertJson::from(&MemoryAlert::default())).unwrap();
        assert_eq!(bare["severity"], serde_json::Value::Null);
        assert_eq!(bare["state"], serde_json::Value::Null);
        assert_eq!(bare["sample"], serde_json::Value::Null);
    }
}
