//! The protobuf contract of the insight and monitor services: generated messages, clients and
//! servers, plus the encoded file descriptor sets that feed server reflection.

pub mod codec;

/// Generated code, one module per protobuf package.
pub mod pb {
    /// `spotifai.*` packages.
    pub mod spotifai {
        /// `spotifai.insight.*` packages.
        pub mod insight {
            /// `spotifai.insight.v1`: the InsightService contract.
            #[allow(missing_docs, clippy::all)]
            pub mod v1 {
                tonic::include_proto!("spotifai.insight.v1");
            }
        }
        /// `spotifai.monitor.*` packages.
        pub mod monitor {
            /// `spotifai.monitor.v1`: the MemoryMonitor contract.
            #[allow(missing_docs, clippy::all)]
            pub mod v1 {
                tonic::include_proto!("spotifai.monitor.v1");
            }
        }
    }
}

pub use pb::spotifai::insight::v1 as insight;
pub use pb::spotifai::monitor::v1 as monitor;

/// Encoded `FileDescriptorSet` of `spotifai.insight.v1` (with its imports), for reflection.
pub const INSIGHT_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/insight_descriptor.bin"));

/// Encoded `FileDescriptorSet` of `spotifai.monitor.v1` (with its imports), for reflection.
pub const MONITOR_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/monitor_descriptor.bin"));

/// Full name of the insight service, as health checks and Kubernetes probes name it.
pub const INSIGHT_SERVICE_NAME: &str = "spotifai.insight.v1.InsightService";

/// Full name of the monitor service, as health checks name it.
pub const MONITOR_SERVICE_NAME: &str = "spotifai.monitor.v1.MemoryMonitor";
