//! How an [`AlertEvent`] is laid out in a row, shared by both backends.
//!
//! The sample is stored as JSON in a format owned here, not the probe's `Serialize` output
//! (which `check --json` prints and may evolve for people): stored rows must stay readable
//! across versions, and an operator can still query them with `json_extract` or `->>`.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

use super::HistoryError;
use crate::{
    alerts::{AlertEvent, AlertState, Metric, Severity},
    probe::{CgroupMem, CgroupVersion, Level, ProcessMem, Sample, SystemMem},
};

/// An event as the columns of one row (the row's own `event_id` aside).
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Row {
    pub(super) alert_id: String,
    pub(super) state: i32,
    pub(super) at_us: i64,
    pub(super) severity: i32,
    pub(super) metric: String,
    pub(super) value: f64,
    pub(super) threshold: f64,
    pub(super) message: String,
    /// JSON array of strings.
    pub(super) recommendations: String,
    /// JSON object, see [`SampleRecord`].
    pub(super) sample: String,
}

/// The stored code of a severity: the protobuf enum's number, so the table reads the same as
/// the API.
pub(super) fn severity_code(severity: Severity) -> i32 {
    match severity {
        Severity::Warning => 1,
        Severity::Critical => 2,
    }
}

fn state_code(state: AlertState) -> i32 {
    match state {
        AlertState::Firing => 1,
        AlertState::Resolved => 2,
    }
}

/// Microseconds since the Unix epoch, saturating (far outside any real clock).
pub(super) fn micros(at: SystemTime) -> i64 {
    match at.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_micros()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_micros()).map_or(i64::MIN, |us| -us),
    }
}

fn from_micros(us: i64) -> SystemTime {
    let magnitude = Duration::from_micros(us.unsigned_abs());
    let at = if us >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(magnitude)
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(magnitude)
    };
    at.unwrap_or(SystemTime::UNIX_EPOCH)
}

impl Row {
    /// The row of `event`.
    pub(super) fn encode(event: &AlertEvent) -> Result<Self, HistoryError> {
        Ok(Self {
            alert_id: event.id.clone(),
            state: state_code(event.state),
            at_us: micros(event.at),
            severity: severity_code(event.severity),
            metric: event.metric.as_str().to_owned(),
            value: event.value,
            threshold: event.threshold,
            message: event.message.clone(),
            recommendations: serde_json::to_string(&event.recommendations)
                .map_err(HistoryError::Encode)?,
            sample: serde_json::to_string(&SampleRecord::from(&*event.sample))
                .map_err(HistoryError::Encode)?,
        })
    }

    /// The event stored in row `event_id`; an error names the row and what is wrong with it.
    pub(super) fn decode(self, event_id: i64) -> Result<AlertEvent, HistoryError> {
        let corrupt = |reason: String| HistoryError::Corrupt { event_id, reason };
        let state = match self.state {
            1 => AlertState::Firing,
            2 => AlertState::Resolved,
            other => return Err(corrupt(format!("unknown state {other}"))),
        };
        let severity = match self.severity {
            1 => Severity::Warning,
            2 => Severity::Critical,
            other => return Err(corrupt(format!("unknown severity {other}"))),
        };
        let metric = Metric::from_name(&self.metric)
            .ok_or_else(|| corrupt(format!("unknown metric {:?}", self.metric)))?;
        let recommendations: Vec<String> = serde_json::from_str(&self.recommendations)
            .map_err(|error| corrupt(format!("recommendations: {error}")))?;
        let sample: SampleRecord = serde_json::from_str(&self.sample)
            .map_err(|error| corrupt(format!("sample: {error}")))?;
        let sample = sample.into_sample().map_err(corrupt)?;
        Ok(AlertEvent {
            id: self.alert_id,
            at: from_micros(self.at_us),
            severity,
            state,
            metric,
            value: self.value,
            threshold: self.threshold,
            message: self.message,
            recommendations,
            sample: Arc::new(sample),
        })
    }
}

/// The stored form of a [`Sample`]. Floats are optional because JSON has no NaN or infinity
/// (serde_json writes them as null), and a row must stay readable whatever the kernel said.
#[derive(Debug, Serialize, Deserialize)]
struct SampleRecord {
    seq: u64,
    at_us: i64,
    process: ProcessRecord,
    #[serde(default)]
    targets: Vec<ProcessRecord>,
    cgroup: Option<CgroupRecord>,
    system: SystemRecord,
    usage_ratio: Option<f64>,
    level: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct ProcessRecord {
    pid: u32,
    rss_bytes: u64,
    virtual_bytes: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct CgroupRecord {
    version: String,
    path: String,
    current_bytes: u64,
    max_bytes: u64,
    working_set_bytes: u64,
    anon_bytes: u64,
    file_bytes: u64,
    inactive_file_bytes: u64,
    oom_kills: u64,
    pressure_some_avg10: Option<f64>,
    pressure_full_avg10: Option<f64>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SystemRecord {
    total_bytes: u64,
    available_bytes: u64,
    swap_total_bytes: u64,
    swap_used_bytes: u64,
}

impl From<&Sample> for SampleRecord {
    fn from(sample: &Sample) -> Self {
        Self {
            seq: sample.seq,
            at_us: micros(sample.at),
            process: ProcessRecord::from(&sample.process),
            targets: sample.targets.iter().map(ProcessRecord::from).collect(),
            cgroup: sample.cgroup.as_ref().map(|group| CgroupRecord {
                version: group.version.as_str().to_owned(),
                path: group.path.to_string(),
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
            system: SystemRecord {
                total_bytes: sample.system.total_bytes,
                available_bytes: sample.system.available_bytes,
                swap_total_bytes: sample.system.swap_total_bytes,
                swap_used_bytes: sample.system.swap_used_bytes,
            },
            usage_ratio: Some(sample.usage_ratio),
            level: sample.level.as_str().to_owned(),
        }
    }
}

impl From<&ProcessMem> for ProcessRecord {
    fn from(process: &ProcessMem) -> Self {
        Self {
            pid: process.pid,
            rss_bytes: process.rss_bytes,
            virtual_bytes: process.virtual_bytes,
        }
    }
}

impl From<ProcessRecord> for ProcessMem {
    fn from(process: ProcessRecord) -> Self {
        Self {
            pid: process.pid,
            rss_bytes: process.rss_bytes,
            virtual_bytes: process.virtual_bytes,
        }
    }
}

impl SampleRecord {
    fn into_sample(self) -> Result<Sample, String> {
        let level = match self.level.as_str() {
            "OK" => Level::Ok,
            "WARNING" => Level::Warning,
            "CRITICAL" => Level::Critical,
            other => return Err(format!("sample: unknown level {other:?}")),
        };
        let cgroup = match self.cgroup {
            None => None,
            Some(group) => Some(CgroupMem {
                version: match group.version.as_str() {
                    "v1" => CgroupVersion::V1,
                    "v2" => CgroupVersion::V2,
                    other => return Err(format!("sample: unknown cgroup version {other:?}")),
                },
                path: group.path.into(),
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
        };
        Ok(Sample {
            seq: self.seq,
            at: from_micros(self.at_us),
            process: self.process.into(),
            targets: self.targets.into_iter().map(Into::into).collect(),
            cgroup,
            system: SystemMem {
                total_bytes: self.system.total_bytes,
                available_bytes: self.system.available_bytes,
                swap_total_bytes: self.system.swap_total_bytes,
                swap_used_bytes: self.system.swap_used_bytes,
            },
            // Only a non-finite ratio is stored as null; 0 is what the protobuf shows for
            // "unknown" too.
            usage_ratio: self.usage_ratio.unwrap_or(0.0),
            level,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn event() -> AlertEvent {
        let at = SystemTime::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        AlertEvent {
            id: "usage_ratio-critical-00ff-1".to_owned(),
            at,
            severity: Severity::Critical,
            state: AlertState::Resolved,
            metric: Metric::PressureSomeAvg10,
            value: 0.93,
            threshold: 0.9,
            message: "memory working set at 93% of the 256 MiB cgroup limit (critical ≥ 90%)"
                .to_owned(),
            recommendations: vec!["one".to_owned(), "two \"quoted\"".to_owned()],
            sample: Arc::new(Sample {
                seq: u64::MAX,
                at,
                process: ProcessMem {
                    pid: 7,
                    rss_bytes: 1,
                    virtual_bytes: 2,
                },
                targets: vec![ProcessMem {
                    pid: 8,
                    rss_bytes: 3,
                    virtual_bytes: 4,
                }],
                cgroup: Some(CgroupMem {
                    version: CgroupVersion::V1,
                    path: "/kubepods/pod/ctr".into(),
                    current_bytes: 10,
                    max_bytes: 11,
                    working_set_bytes: 12,
                    anon_bytes: 13,
                    file_bytes: 14,
                    inactive_file_bytes: 15,
                    oom_kills: 16,
                    pressure_some_avg10: Some(12.5),
                    pressure_full_avg10: None,
                }),
                system: SystemMem {
                    total_bytes: 20,
                    available_bytes: 21,
                    swap_total_bytes: 22,
                    swap_used_bytes: 23,
                },
                usage_ratio: 0.93,
                level: Level::Critical,
            }),
        }
    }

    #[test]
    fn round_trips_every_field() {
        let event = event();
        let row = Row::encode(&event).unwrap();
        assert_eq!(row.at_us, 1_700_000_000_123_456);
        assert_eq!((row.state, row.severity), (2, 2));
        assert_eq!(row.decode(5).unwrap(), event);
    }

    #[test]
    fn non_finite_floats_and_odd_times_survive() {
        let mut event = event();
        let sample = Arc::make_mut(&mut event.sample);
        sample.usage_ratio = f64::NAN;
        if let Some(group) = &mut sample.cgroup {
            group.pressure_some_avg10 = Some(f64::INFINITY);
        }
        sample.at = SystemTime::UNIX_EPOCH - Duration::from_secs(5);
        let decoded = Row::encode(&event).unwrap().decode(1).unwrap();
        assert_eq!(decoded.sample.usage_ratio, 0.0);
        assert_eq!(
            decoded.sample.cgroup.as_ref().unwrap().pressure_some_avg10,
            None
        );
        assert_eq!(
            decoded.sample.at,
            SystemTime::UNIX_EPOCH - Duration::from_secs(5)
        );
        assert_eq!(micros(SystemTime::UNIX_EPOCH), 0);
        assert_eq!(from_micros(i64::MIN), from_micros(i64::MIN));
    }

    #[test]
    fn corrupt_rows_are_errors_naming_the_row() {
        let good = Row::encode(&event()).unwrap();
        for (row, words) in [
            (
                Row {
                    state: 9,
                    ..good.clone()
                },
                "unknown state 9",
            ),
            (
                Row {
                    severity: 0,
                    ..good.clone()
                },
                "unknown severity 0",
            ),
            (
                Row {
                    metric: "swap".to_owned(),
                    ..good.clone()
                },
                "unknown metric \"swap\"",
            ),
            (
                Row {
                    sample: "{}".to_owned(),
                    ..good.clone()
                },
                "sample:",
            ),
            (
                Row {
                    recommendations: "[1]".to_owned(),
                    ..good.clone()
                },
                "recommendations:",
            ),
        ] {
            let error = row.decode(42).unwrap_err();
            assert!(matches!(error, HistoryError::Corrupt { event_id: 42, .. }));
            let text = error.to_string();
            assert!(text.contains(words) && text.contains("42"), "{text}");
        }
    }
}
