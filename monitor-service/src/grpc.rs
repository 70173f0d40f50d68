//! The `spotifai.monitor.v1.MemoryMonitor` adapter: validates requests through the domain,
//! calls the [`Sampler`], and converts domain values to protobuf with `From`. It holds no logic
//! of its own; [`to_status`] is the one place where domain errors become gRPC statuses.

use std::pin::Pin;

use spotifai_proto::monitor::{
    self as pb, ListAlertsRequest, ListAlertsResponse, MemoryAlert, MemorySample, SnapshotRequest,
    StreamAlertsRequest, StreamSamplesRequest, memory_monitor_server::MemoryMonitor,
};
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};

use crate::{
    probe::{CgroupMem, CgroupVersion, Level, ProcessMem, Sample, SystemMem},
    sampler::{SampleError, Sampler, StreamPlan},
};

/// What `StreamAlerts` and `ListAlerts` answer until the alert engine exists.
const ALERTS_UNAVAILABLE: &str =
    "alerts are not available yet: they arrive with the monitor alerts/history issue";

/// The MemoryMonitor service.
#[derive(Clone, Debug)]
pub struct MonitorGrpc {
    sampler: Sampler,
}

impl MonitorGrpc {
    /// A service answering from `sampler`.
    pub fn new(sampler: Sampler) -> Self {
        Self { sampler }
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
        let request = request.into_inner();
        let plan = StreamPlan::new(
            request.interval_ms,
            request.duration_ms,
            self.sampler.default_interval(),
        )
        .map_err(|error| to_status(&error))?;
        let samples = ReceiverStream::new(self.sampler.stream(plan)).map(|item| {
            item.map(MemorySample::from)
                .map_err(|error| to_status(&error))
        });
        Ok(Response::new(Box::pin(samples)))
    }

    type StreamAlertsStream = tokio_stream::Empty<Result<MemoryAlert, Status>>;

    #[tracing::instrument(skip(self, _request))]
    async fn stream_alerts(
        &self,
        _request: Request<StreamAlertsRequest>,
    ) -> Result<Response<Self::StreamAlertsStream>, Status> {
        Err(Status::unimplemented(ALERTS_UNAVAILABLE))
    }

    #[tracing::instrument(skip(self, _request))]
    async fn list_alerts(
        &self,
        _request: Request<ListAlertsRequest>,
    ) -> Result<Response<ListAlertsResponse>, Status> {
        Err(Status::unimplemented(ALERTS_UNAVAILABLE))
    }
}

/// The one mapping from domain errors to gRPC statuses.
pub fn to_status(error: &SampleError) -> Status {
    match error {
        SampleError::IntervalTooShort(_) => Status::invalid_argument(error.to_string()),
        SampleError::ShuttingDown => Status::unavailable(error.to_string()),
    }
}

impl From<Sample> for MemorySample {
    fn from(sample: Sample) -> Self {
        Self {
            seq: sample.seq,
            at: Some(sample.at.into()),
            process: Some(sample.process.into()),
            cgroup: sample.cgroup.map(Into::into),
            system: Some(sample.system.into()),
            usage_ratio: sample.usage_ratio,
            level: pb::Level::from(sample.level).into(),
            // Per-stream tasks wait for a slow reader instead of dropping samples for it.
            dropped: 0,
            targets: sample.targets.into_iter().map(Into::into).collect(),
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
            path: group.path,
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
                path: "/g".to_owned(),
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
                    path: "/g".to_owned(),
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
    }
}
