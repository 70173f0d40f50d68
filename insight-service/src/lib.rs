//! insight-service: chunked map-reduce summaries of user feedback and compact music analysis,
//! through a pluggable LLM backend.
//!
//! The gRPC adapters in [`grpc`] are thin: they convert messages and call the domain modules
//! ([`pipeline`], [`llm`]), which know nothing of tonic.

pub mod domain;
pub mod llm;
pub mod text;
