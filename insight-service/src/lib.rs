//! insight-service: chunked map-reduce summaries of user feedback and compact music analysis,
//! through a pluggable LLM backend.
//!
//! The gRPC adapters in [`grpc`] are thin: they convert messages and call the domain modules
//! ([`pipeline`], [`llm`]), which know nothing of tonic. [`run`] assembles the server.

use std::{future::Future, sync::Arc};

use monitor_service::lifecycle::{Drain, DrainLayer, reflection_services, serve_until_drained};
use spotifai_proto::{INSIGHT_DESCRIPTOR_SET, INSIGHT_SERVICE_NAME};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::ServingStatus;

pub mod config;
pub mod domain;
pub mod grpc;
pub mod llm;
pub mod pipeline;
pub mod text;

pub use config::Config;

/// Why the server could not start or stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The reflection descriptors could not be loaded (a build defect).
    #[error("cannot build server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The listener is unusable.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    /// The transport failed (e.g. the listener broke).
    #[error("gRPC transport failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves the insight service on `listener` until `shutdown` resolves, then drains (see
/// [`serve_until_drained`]): health turns NOT_SERVING, new calls get UNAVAILABLE, in-flight
/// calls finish within `config.shutdown_grace`.
///
/// The caller binds the listener, so tests can bind `127.0.0.1:0` and know the port first.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let backend = Arc::new(llm::local::LocalBackend::new());
    let pipeline = pipeline::Pipeline::new(backend, config.pipeline_config());
    let service = grpc::InsightGrpc::new(pipeline, config.max_entries_cap, config.request_timeout);

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(INSIGHT_SERVICE_NAME, ServingStatus::Serving)
        .await;
    let (reflection_v1, reflection_v1alpha) = reflection_services(INSIGHT_DESCRIPTOR_SET)?;

    let drain = Drain::new();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // Logged as a plain field so scripts and tests can find the port when started on :0.
    let addr = listener.local_addr()?;
    tracing::info!(%addr, backend = "local", "insight-service listening");

    let server = tonic::transport::Server::builder()
        // Outermost, so that once draining every call is refused before any other work.
        .layer(DrainLayer::new(drain.clone()))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            spotifai_proto::insight::insight_service_server::InsightServiceServer::new(service),
        )
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
            let _ = stop_rx.await;
        });
    serve_until_drained(
        server,
        stop_tx,
        shutdown,
        drain,
        health,
        &[INSIGHT_SERVICE_NAME],
        config.shutdown_grace,
    )
    .await?;
    Ok(())
}
