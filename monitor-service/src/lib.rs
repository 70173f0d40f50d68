//! monitor-service: samples process, cgroup (v1 and v2) and system memory, and streams the
//! samples over gRPC (`spotifai.monitor.v1.MemoryMonitor`) to any number of subscribers; the
//! same binary is also a command-line client (`check`).
//!
//! [`probe`] reads the kernel's figures and knows nothing of gRPC, so insight-service uses it for
//! its own load shedding. [`sampler`] hands samples to the [`grpc`] adapter and to [`alerts`],
//! whose events stream to subscribers and are kept by [`history`]. [`run`] assembles the
//! server: the service, the alert pipeline, health, reflection and the shutdown drain of
//! [`lifecycle`].

use std::future::Future;

use spotifai_proto::{MONITOR_DESCRIPTOR_SET, MONITOR_SERVICE_NAME};
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tonic_health::ServingStatus;

pub mod alerts;
pub mod cli;
pub mod coalesce;
pub mod config;
pub mod grpc;
pub mod history;
pub mod lifecycle;
pub mod probe;
pub mod sampler;

use crate::{
    config::{ConfigError, ServeArgs},
    lifecycle::{Drain, DrainLayer, reflection_services, serve_until_drained},
    probe::Probe,
    sampler::Sampler,
};

/// Why the server could not start or stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    /// The listener's address could not be read (the socket is unusable).
    #[error("cannot read the listening address: {0}")]
    ListenerAddr(#[source] std::io::Error),
    /// The reflection descriptors could not be loaded (a build defect).
    #[error("cannot build server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed (e.g. the listener broke).
    #[error("gRPC transport failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves the monitor on `listener` until `shutdown` resolves, then drains (see
/// [`serve_until_drained`]): health turns NOT_SERVING, new calls get UNAVAILABLE, in-flight
/// calls finish within `config.shutdown_grace`, and sample streams that would not end within it
/// end at once with UNAVAILABLE, as do alert streams (they never end on their own).
///
/// The caller binds the listener, so tests can bind `127.0.0.1:0` and know the port first.
pub async fn run(
    listener: TcpListener,
    config: ServeArgs,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    config.validate()?;
    let addr = listener.local_addr().map_err(Error::ListenerAddr)?;

    let mut probe = Probe::new(config.probe.probe_config());
    log_first_reading(&mut probe);
    let sampler = Sampler::with_config(probe, config.sampler_config());
    // Alerts: the engine judges every sample of the sampler's in-process feed; events go to
    // the hub (StreamAlerts) and the history (ListAlerts). Stopped when shutdown begins.
    let alert_hub = alerts::AlertHub::new();
    let (alert_history, history_writer) = history::History::spawn(&config.history);
    let (stop_alerts, alerts_stopped) = tokio::sync::oneshot::channel::<()>();
    let alert_pipeline = tokio::spawn(alerts::pipeline::run(
        alerts::pipeline::samples(sampler.subscribe_internal()),
        alerts::AlertEngine::new(config.alerts.config(&config.probe)),
        alert_hub.clone(),
        history_writer,
        async {
            alerts_stopped.await.ok();
        },
    ));
    let service =
        grpc::MonitorGrpc::new(sampler.clone()).with_alerts(alert_hub.clone(), alert_history);

    // The overall status "" starts SERVING in tonic-health; the service's own name is added.
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(MONITOR_SERVICE_NAME, ServingStatus::Serving)
        .await;
    let (reflection_v1, reflection_v1alpha) = reflection_services(MONITOR_DESCRIPTOR_SET)?;

    let drain = Drain::new();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tracing::info!(
        %addr,
        default_interval = %humantime::format_duration(config.default_interval),
        "monitor-service listening"
    );

    let server = tonic::transport::Server::builder()
        // Outermost, so that once draining every call is refused before any other work.
        .layer(DrainLayer::new(drain.clone()))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            spotifai_proto::monitor::memory_monitor_server::MemoryMonitorServer::new(service),
        )
        // TCP_NODELAY: a sample is one small frame and the next is 100 ms away, so Nagle would
        // hold it until the client's delayed ACK (up to 40 ms) instead of coalescing anything;
        // tonic sets it only on listeners it binds itself. Coalescing is done in user space
        // instead, for one scheduler pass rather than a round trip (see `coalesce`).
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .map(|accepted| accepted.map(coalesce::CoalescingIo::new)),
            async {
                stop_rx.await.ok();
            },
        );
    // Sample streams that cannot end within the grace (endless ones above all) would count as
    // in flight until it expires and then be cut; ending them first with UNAVAILABLE sends
    // their clients to another replica at once. The others finish like any in-flight call.
    let grace = config.shutdown_grace;
    let shutdown = async move {
        shutdown.await;
        let now = tokio::time::Instant::now();
        // `validate` bounds the grace to an hour, so the addition cannot overflow; were it to,
        // ending every stream now is the safe side.
        sampler.close(now.checked_add(grace).unwrap_or(now));
        // Alert streams never end on their own: end them now with UNAVAILABLE, like the
        // endless sample streams, and stop judging samples.
        alert_hub.close();
        let _ = stop_alerts.send(());
    };
    serve_until_drained(
        server,
        stop_tx,
        shutdown,
        drain,
        health,
        &[MONITOR_SERVICE_NAME],
        config.shutdown_grace,
    )
    .await?;
    // The pipeline stores its queued alerts within a bounded time (see `HistoryWriter::finish`).
    if let Err(error) = alert_pipeline.await {
        tracing::warn!(%error, "the alert pipeline ended abnormally");
    }
    Ok(())
}

/// Logs what the probe found, so an operator sees at start-up which cgroup and limit the
/// levels are computed against.
fn log_first_reading(probe: &mut Probe) {
    let sample = probe.sample();
    match &sample.cgroup {
        Some(group) => tracing::info!(
            pid = sample.process.pid,
            cgroup_version = group.version.as_str(),
            cgroup_path = %group.path,
            cgroup_limit_bytes = group.max_bytes,
            usage_ratio = sample.usage_ratio,
            // Not `level`: JSON logs flatten fields next to the record's own `level`.
            memory_level = sample.level.as_str(),
            "memory probe ready"
        ),
        None => tracing::info!(
            pid = sample.process.pid,
            system_total_bytes = sample.system.total_bytes,
            usage_ratio = sample.usage_ratio,
            memory_level = sample.level.as_str(),
            "memory probe ready; no cgroup memory controller found, levels follow system memory"
        ),
    }
}
