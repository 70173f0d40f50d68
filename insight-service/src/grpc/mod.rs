//! gRPC adapters: protobuf <-> domain conversions, the InsightService implementation, and the
//! one mapping from domain errors to `tonic::Status`.

pub mod convert;
pub mod deadline;
pub mod error;
pub mod jobs;
pub mod monitor_alerts;
pub mod music;
pub mod service;
pub mod store;

pub use service::InsightGrpc;
