//! The `spotifai.monitor.v1.MemoryMonitor` adapter: validates requests through the domain,
//! calls the [`Sampler`], the [`AlertHub`] and the [`History`], and converts domain values to
//! protobuf with `From`. It holds no logic of its own; [`to_status`] is the one place where
//! domain errors become gRPC statuses.

use std::{pin::Pin, time::SystemTime};

use spotifai_proto::monitor::{
    self as pb, ListAlertsRequest, ListAlertsResponse, MemoryAlert, MemorySample, SnapshotRequest,
    StreamAlertsRequest, StreamSamplesRequest, memory_monitor_server::MemoryMonitor,
};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::{
    alerts::{AlertEvent, AlertHub, AlertState, HubError, Severity},
    history::{History, HistoryError, ListQuery},
    probe::{CgroupMem, CgroupVersion, Level, ProcessMem, Sample, SystemMem},
    sampler::{Delivery, SampleError, Sampler, StreamPlan},
};

/// The MemoryMonitor service.
#[derive(Clone, Debug)]
pub struct MonitorGrpc {
    sampler: Sampler,
    alerts: AlertHub,
    history: History,
}

impl MonitorGrpc {
    /// A service answering samples from `sampler`, with no alerts until
    /// [`MonitorGrpc::with_alerts`] connects them (StreamAlerts then streams nothing and
    /// ListAlerts answers UNAVAILABLE).
    pub fn new(sampler: Sampler) -> Self {
        Self {
            sampler,
            alerts: AlertHub::new(),
            history: History::none(),
        }
    }

    /// The service with live alerts from `alerts` and past ones from `history`.
    pub fn with_alerts(self, alerts: AlertHub, history: History) -> Self {
        Self {
            alerts,
            history,
            ..self
        }
    }
}

/// A stream of samples as the generated server wants it.
pub type SampleStream = Pin<Box<dyn Stream<Item = Result<MemorySample, Status>> + Send>>;

#[tonic::async_trait]
impl MemoryMonitor for MonitorGrpc {
    #[tracing::instrument(skip(self, _request))]
    async fn get_snapshot(
        &self,
        _request: Request<SnapshotRequest>,
    ) -> Result<Response<MemorySample>, Status> {
        Ok(Response::new(self.sampler.snapshot().into()))
    }

    type StreamSamplesStream = SampleStream;

    #[tracing::instrument(
        skip(self, request),
        fields(
            interval_ms = request.get_ref().interval_ms,
            duration_ms = request.get_ref().duration_ms,
        )
    )]
    async fn stream_samples(
        &self,
        request: Request<StreamSamplesRequest>,
    ) -> Result<Response<Self::StreamSamplesStream>, Status> {
        // The peer address tells the fan-out which streams share a connection.
        let peer = request.remote_addr();
        let request = request.into_inner();
        let plan = StreamPlan::new(
            request.interval_ms,
            request.duration_ms,
            self.sampler.default_interval(),
        )
        .map_err(|error| to_status(&error))?;
        let subscription = self
            .sampler
            .subscribe_from(plan, peer)
            .map_err(|error| to_status(&error))?;
        let samples = subscription.map(|item| {
            item.map(MemorySample::from)
                .map_err(|error| to_status(&error))
        });
        Ok(Response::new(Box::pin(samples)))
    }

    type StreamAlertsStream = AlertStream;

    #[tracing::instrument(
        skip(self, request),
        fields(min_severity = request.get_ref().min_severity)
    )]
    async fn stream_alerts(
        &self,
        request: Request<StreamAlertsRequest>,
    ) -> Result<Response<Self::StreamAlertsStream>, Status> {
        let min_severity =
            severity_filter(request.get_ref().min_severity).map_err(|error| to_status(&error))?;
        let subscription = self
            .alerts
            .subscribe(min_severity)
            .map_err(|error| to_status(&error))?;
        let alerts = subscription.map(|item| {
            item.map(|event| MemoryAlert::from(&*event))
                .map_err(|error| to_status(&error))
        });
        Ok(Response::new(Box::pin(alerts)))
    }

    #[tracing::instrument(
        skip(self, request),
        fields(
            page_size = request.get_ref().page_size,
            min_severity = request.get_ref().min_severity,
        )
    )]
    async fn list_alerts(
        &self,
        request: Request<ListAlertsRequest>,
    ) -> Result<Response<ListAlertsResponse>, Status> {
        let request = request.into_inner();
        let min_severity =
            severity_filter(request.min_severity).map_err(|error| to_status(&error))?;
        let since = request
            .since
            .map(timestamp_field("since"))
            .transpose()
            .map_err(|error| to_status(&error))?;
        let query = ListQuery::new(request.page_size, &request.page_token, since, min_severity)
            .map_err(|error| to_status(&error))?;
        let page = self
            .history
            .list(&query)
            .await
            .map_err(|error| to_status(&error))?;
        Ok(Response::new(ListAlertsResponse {
            alerts: page.alerts.iter().map(MemoryAlert::from).collect(),
            next_page_token: page.next.map(|next| next.encode()).unwrap_or_default(),
        }))
    }
}

/// A stream of alert events as the generated server wants it.
pub type AlertStream = Pin<Box<dyn Stream<Item = Result<MemoryAlert, Status>> + Send>>;

/// A request field the adapter cannot convert to a domain value.
#[derive(Debug, thiserror::Error)]
#[error("{field} {reason}")]
pub struct InvalidField {
    /// The field's name in the request.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

/// The `min_severity` filter of a request: `None` (all) for SEVERITY_UNSPECIFIED.
fn severity_filter(value: i32) -> Result<Option<Severity>, InvalidField> {
    match pb::Severity::try_from(value) {
        Ok(pb::Severity::Unspecified) => Ok(None),
        Ok(pb::Severity::Warning) => Ok(Some(Severity::Warning)),
        Ok(pb::Severity::Critical) => Ok(Some(Severity::Critical)),
        Err(_) => Err(InvalidField {
            field: "min_severity",
            reason: format!(
                "must be SEVERITY_UNSPECIFIED, SEVERITY_WARNING or SEVERITY_CRITICAL, got {value}"
            ),
        }),
    }
}

/// Converts a request's `field` timestamp, refusing what `google.protobuf.Timestamp` rules out:
/// nanos outside 0..1e9 and instants outside years 1..=9999.
fn timestamp_field(
    field: &'static str,
) -> impl Fn(prost_types::Timestamp) -> Result<SystemTime, InvalidField> {
    // 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z, the bounds of timestamp.proto.
    const MIN_SECONDS: i64 = -62_135_596_800;
    const MAX_SECONDS: i64 = 253_402_300_799;
    move |timestamp| {
        let in_range = (MIN_SECONDS..=MAX_SECONDS).contains(&timestamp.seconds)
            && (0..1_000_000_000).contains(&timestamp.nanos);
        let invalid = |reason: String| InvalidField { field, reason };
        if !in_range {
            return Err(invalid(format!(
                "must be a valid timestamp in years 1..=9999, got {}s {}ns",
                timestamp.seconds, timestamp.nanos
            )));
        }
        SystemTime::try_from(timestamp)
            .map_err(|error| invalid(format!("is not representable here: {error}")))
    }
}

/// The one mapping from domain errors to gRPC statuses. It walks the error's source chain, so
/// a cause wrapped in another error still maps by what it is; a cause it does not know is a
/// defect and becomes INTERNAL.
pub fn to_status(error: &(dyn std::error::Error + 'static)) -> Status {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if let Some(error) = error.downcast_ref::<SampleError>() {
            return match error {
                SampleError::IntervalTooShort(_) => Status::invalid_argument(error.to_string()),
                SampleError::ShuttingDown | SampleError::Stopped => {
                    Status::unavailable(error.to_string())
                }
                SampleError::TooManySubscribers { .. } | SampleError::TooSlow { .. } => {
                    Status::resource_exhausted(error.to_string())
                }
            };
        }
        if let Some(error) = error.downcast_ref::<HubError>() {
            return match error {
                // Like a too-slow sample subscriber: its buffer is the exhausted resource.
                HubError::Lagged { .. } => Status::resource_exhausted(error.to_string()),
                HubError::ShuttingDown => Status::unavailable(error.to_string()),
            };
        }
        if let Some(error) = error.downcast_ref::<HistoryError>() {
            return match error {
                HistoryError::PageSize(_) | HistoryError::PageToken => {
                    Status::invalid_argument(error.to_string())
                }
                // Retry-safe: ListAlerts only reads, and the store comes back by itself.
                HistoryError::NotReady { .. }
                | HistoryError::Unavailable(_)
                | HistoryError::Migrate(_) => Status::unavailable(error.to_string()),
                HistoryError::Corrupt { .. } => Status::data_loss(error.to_string()),
                HistoryError::Encode(_) => Status::internal(error.to_string()),
            };
        }
        if let Some(error) = error.downcast_ref::<InvalidField>() {
            return Status::invalid_argument(error.to_string());
        }
        cause = error.source();
    }
    Status::internal(error.to_string())
}

impl From<&AlertEvent> for MemoryAlert {
    fn from(event: &AlertEvent) -> Self {
        Self {
            id: event.id.clone(),
            at: Some(event.at.into()),
            severity: pb::Severity::from(event.severity).into(),
            state: pb::AlertState::from(event.state).into(),
            metric: event.metric.as_str().to_owned(),
            value: event.value,
            threshold: event.threshold,
            message: event.message.clone(),
            recommendations: event.recommendations.clone(),
            sample: Some(MemorySample::from(&*event.sample)),
        }
    }
}

impl From<Severity> for pb::Severity {
    fn from(severity: Severity) -> Self {
        match severity {
            Severity::Warning => Self::Warning,
            Severity::Critical => Self::Critical,
        }
    }
}

impl From<AlertState> for pb::AlertState {
    fn from(state: AlertState) -> Self {
        match state {
            AlertState::Firing => Self::Firing,
            AlertState::Resolved => Self::Resolved,
        }
    }
}

impl From<Sample> for MemorySample {
    fn from(sample: Sample) -> Self {
        Self::from(&sample)
    }
}

/// The fan-out shares one sample among its subscribers, so each stream converts a borrowed one.
impl From<&Sample> for MemorySample {
    fn from(sample: &Sample) -> Self {
        Self {
            seq: sample.seq,
            at: Some(sample.at.into()),
            process: Some(sample.process.into()),
            cgroup: sample.cgroup.clone().map(Into::into),
            system: Some(sample.system.into()),
            usage_ratio: sample.usage_ratio,
            level: pb::Level::from(sample.level).into(),
            // A sample on its own missed nothing; a `Delivery` says what its stream missed.
            dropped: 0,
            targets: sample.targets.iter().copied().map(Into::into).collect(),
        }
    }
}

impl From<Delivery> for MemorySample {
    fn from(delivery: Delivery) -> Self {
        Self {
            dropped: delivery.dropped,
            ..Self::from(&*delivery.sample)
        }
    }
}

impl From<ProcessMem> for pb::ProcessMemory {
    fn from(process: ProcessMem) -> Self {
        Self {
            pid: process.pid,
            rss_bytes: process.rss_bytes,
            virtual_bytes: process.virtual_bytes,
        }
    }
}

impl From<CgroupMem> for pb::CgroupMemory {
    fn from(group: CgroupMem) -> Self {
        Self {
            current_bytes: group.current_bytes,
            max_bytes: group.max_bytes,
            working_set_bytes: group.working_set_bytes,
            anon_bytes: group.anon_bytes,
            file_bytes: group.file_bytes,
            oom_kills: group.oom_kills,
            // The proto has no "absent" for doubles; no pressure information reads as no stall.
            pressure_some_avg10: group.pressure_some_avg10.unwrap_or(0.0),
            pressure_full_avg10: group.pressure_full_avg10.unwrap_or(0.0),
            version: pb::CgroupVersion::from(group.version).into(),
            path: group.path.to_string(),
            inactive_file_bytes: group.inactive_file_bytes,
        }
    }
}

impl From<SystemMem> for pb::SystemMemory {
    fn from(system: SystemMem) -> Self {
        Self {
            total_bytes: system.total_bytes,
            available_bytes: system.available_bytes,
            swap_total_bytes: system.swap_total_bytes,
            swap_used_bytes: system.swap_used_bytes,
        }
    }
}

impl From<CgroupVersion> for pb::CgroupVersion {
    fn from(version: CgroupVersion) -> Self {
        match version {
            CgroupVersion::V1 => Self::V1,
            CgroupVersion::V2 => Self::V2,
        }
    }
}

impl From<Level> for pb::Level {
    fn from(level: Level) -> Self {
        match level {
            Level::Ok => Self::Ok,
            Level::Warning => Self::Warning,
            Level::Critical => Self::Critical,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    #[test]
    fn converts_every_field() {
        let sample = Sample {
            seq: 9,
            at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_500),
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
                pressure_full_avg10: None,
            }),
            system: SystemMem {
                total_bytes: 20,
                available_bytes: 21,
                swap_total_bytes: 22,
                swap_used_bytes: 23,
            },
            usage_ratio: 0.5,
            level: Level::Critical,
        };
        let message = MemorySample::from(sample);
        assert_eq!(
            message,
            MemorySample {
                seq: 9,
                at: Some(prost_types::Timestamp {
                    seconds: 1,
                    nanos: 500_000_000
                }),
                process: Some(pb::ProcessMemory {
                    pid: 1,
                    rss_bytes: 2,
                    virtual_bytes: 3
                }),
                cgroup: Some(pb::CgroupMemory {
                    current_bytes: 10,
                    max_bytes: 11,
                    working_set_bytes: 12,
                    anon_bytes: 13,
                    file_bytes: 14,
                    oom_kills: 16,
                    pressure_some_avg10: 1.5,
                    pressure_full_avg10: 0.0,
                    version: pb::CgroupVersion::V1.into(),
                    path: "/g".into(),
                    inactive_file_bytes: 15,
                }),
                system: Some(pb::SystemMemory {
                    total_bytes: 20,
                    available_bytes: 21,
                    swap_total_bytes: 22,
                    swap_used_bytes: 23
                }),
                usage_ratio: 0.5,
                level: pb::Level::Critical.into(),
                dropped: 0,
                targets: vec![pb::ProcessMemory {
                    pid: 4,
                    rss_bytes: 5,
                    virtual_bytes: 6
                }],
            }
        );
    }

    #[test]
    fn errors_map_to_the_contracts_codes() {
        let status = to_status(&SampleError::IntervalTooShort(50));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("interval_ms"));
        assert_eq!(
            to_status(&SampleError::ShuttingDown).code(),
            tonic::Code::Unavailable
        );
        assert_eq!(
            to_status(&SampleError::Stopped).code(),
            tonic::Code::Unavailable
        );
        let status = to_status(&SampleError::TooManySubscribers { limit: 7 });
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status.message().contains("at most 7"),
            "{}",
            status.message()
        );
        let status = to_status(&SampleError::TooSlow {
            missed: 42,
            stuck_for: Duration::from_secs(30),
        });
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status.message().contains("too slow"),
            "{}",
            status.message()
        );
        assert!(
            status.message().contains("missed 42"),
            "{}",
            status.message()
        );
    }

    #[test]
    fn a_delivery_carries_its_dropped_count() {
        let sample = std::sync::Arc::new(Sample {
            seq: 5,
            at: SystemTime::UNIX_EPOCH,
            process: ProcessMem::default(),
            targets: vec![],
            cgroup: None,
            system: SystemMem::default(),
            usage_ratio: 0.1,
            level: Level::Ok,
        });
        let message = MemorySample::from(Delivery {
            sample: std::sync::Arc::clone(&sample),
            dropped: 3,
        });
        assert_eq!((message.seq, message.dropped), (5, 3));
        assert_eq!(
            MemorySample {
                dropped: 0,
                ..message
            },
            MemorySample::from(&*sample)
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod alert_tests {
    use std::{sync::Arc, time::Duration};

    use super::*;
    use crate::alerts::Metric;

    #[test]
    fn alert_errors_map_to_the_contracts_codes() {
        for (error, code, words) in [
            (
                Box::new(HubError::Lagged { buffer: 64 }) as Box<dyn std::error::Error>,
                tonic::Code::ResourceExhausted,
                "64 events behind",
            ),
            (
                Box::new(HubError::ShuttingDown),
                tonic::Code::Unavailable,
                "shutting down",
            ),
            (
                Box::new(HistoryError::PageSize(5000)),
                tonic::Code::InvalidArgument,
                "page_size",
            ),
            (
                Box::new(HistoryError::PageToken),
                tonic::Code::InvalidArgument,
                "page_token",
            ),
            (
                Box::new(HistoryError::NotReady {
                    reason: "not yet".to_owned(),
                }),
                tonic::Code::Unavailable,
                "not yet",
            ),
            (
                Box::new(HistoryError::Unavailable(sqlx::Error::PoolTimedOut)),
                tonic::Code::Unavailable,
                "unavailable",
            ),
            (
                Box::new(HistoryError::Corrupt {
                    event_id: 3,
                    reason: "bad".to_owned(),
                }),
                tonic::Code::DataLoss,
                "event 3",
            ),
            (
                Box::new(InvalidField {
                    field: "since",
                    reason: "is odd".to_owned(),
                }),
                tonic::Code::InvalidArgument,
                "since is odd",
            ),
        ] {
            let status = to_status(error.as_ref());
            assert_eq!(status.code(), code, "{error}");
            assert!(status.message().contains(words), "{}", status.message());
        }
    }

    /// A wrapper that only knows its cause, as a layer above the domain might add.
    #[derive(Debug, thiserror::Error)]
    #[error("while listing")]
    struct Wrapped(#[source] HistoryError);

    #[test]
    fn causes_are_found_down_the_source_chain_and_unknown_ones_are_internal() {
        let status = to_status(&Wrapped(HistoryError::PageToken));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        let status = to_status(&std::io::Error::other("surprise"));
        assert_eq!(status.code(), tonic::Code::Internal);
    }

    #[test]
    fn converts_an_alert_event() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_500);
        let sample = Sample {
            seq: 4,
            at,
            process: ProcessMem::default(),
            targets: vec![],
            cgroup: None,
            system: SystemMem::default(),
            usage_ratio: 0.95,
            level: Level::Critical,
        };
        let event = AlertEvent {
            id: "usage_ratio-critical-1".to_owned(),
            at,
            severity: Severity::Critical,
            state: AlertState::Resolved,
            metric: Metric::PressureSomeAvg10,
            value: 30.0,
            threshold: 25.0,
            message: "m".to_owned(),
            recommendations: vec!["r".to_owned()],
            sample: Arc::new(sample.clone()),
        };
        assert_eq!(
            MemoryAlert::from(&event),
            MemoryAlert {
                id: "usage_ratio-critical-1".to_owned(),
                at: Some(prost_types::Timestamp {
                    seconds: 1,
                    nanos: 500_000_000
                }),
                severity: pb::Severity::Critical.into(),
                state: pb::AlertState::Resolved.into(),
                metric: "pressure_some_avg10".to_owned(),
                value: 30.0,
                threshold: 25.0,
                message: "m".to_owned(),
                recommendations: vec!["r".to_owned()],
                sample: Some(MemorySample::from(&sample)),
            }
        );
        assert_eq!(pb::Severity::from(Severity::Warning), pb::Severity::Warning);
        assert_eq!(
            pb::AlertState::from(AlertState::Firing),
            pb::AlertState::Firing
        );
    }

    #[test]
    fn request_fields_are_checked() {
        assert_eq!(severity_filter(0).unwrap(), None);
        assert_eq!(severity_filter(1).unwrap(), Some(Severity::Warning));
        assert_eq!(severity_filter(2).unwrap(), Some(Severity::Critical));
        assert_eq!(severity_filter(-1).unwrap_err().field, "min_severity");

        let since = timestamp_field("since");
        let ok = |seconds, nanos| since(prost_types::Timestamp { seconds, nanos });
        assert_eq!(ok(0, 0).unwrap(), SystemTime::UNIX_EPOCH);
        assert!(ok(-62_135_596_800, 0).is_ok());
        assert!(ok(253_402_300_799, 999_999_999).is_ok());
        for (seconds, nanos) in [
            (-62_135_596_801, 0),
            (253_402_300_800, 0),
            (0, -1),
            (0, 1_000_000_000),
            (i64::MIN, i32::MIN),
        ] {
            let error = ok(seconds, nanos).unwrap_err();
            assert_eq!(error.field, "since");
            assert!(error.to_string().starts_with("since must be"), "{error}");
        }
    }
}
