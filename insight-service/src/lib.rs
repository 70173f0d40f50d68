//! insight-service: chunked map-reduce summaries of user feedback and compact music analysis,
//! through a pluggable LLM backend, behind overload protection that keeps the process clear of
//! the OOM killer.
//!
//! The gRPC adapters in [`grpc`] are thin: they convert messages and call the domain modules
//! ([`pipeline`], [`llm`], [`music`], [`admission`], [`store`]), which know nothing of tonic.
//! [`run`] assembles the server and its one tower chain.

use std::{future::Future, sync::Arc, time::Duration};

use monitor_service::{
    lifecycle::{Drain, DrainLayer, reflection_services, serve_until_drained},
    probe::{Probe, ProbeConfig},
};
use spotifai_proto::{
    INSIGHT_DESCRIPTOR_SET, INSIGHT_SERVICE_NAME,
    insight::insight_service_server::InsightServiceServer,
};
use tokio::{net::TcpListener, sync::watch};
use tower::ServiceBuilder;

pub mod admission;
pub mod backend;
pub mod config;
pub mod cpu;
pub mod domain;
pub mod grpc;
pub mod jobs;
pub mod llm;
pub mod music;
pub mod pipeline;
pub mod store;
pub mod summaries;
pub mod text;

use admission::{
    AdmissionMetrics, ConcurrencyLayer, DeadlineLayer, Limiter, MemoryBudget, MemoryGate,
    MemoryLayer, Pressure, PressureConfig, PressureTracker, SendStallLayer, SendWatch, ShedLayer,
    StallIo,
};
pub use config::Config;
use config::Switch;

/// Why the server could not start or stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configured LLM backend cannot be built (missing key, bad URL).
    #[error(transparent)]
    Backend(#[from] backend::BackendError),
    /// The reflection descriptors could not be loaded (a build defect).
    #[error("cannot build server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The listener is unusable.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    /// The transport failed (e.g. the listener broke).
    #[error("gRPC transport failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The configuration is inconsistent ([`Config::check`]).
    #[error("configuration: {0}")]
    Config(String),
}

/// HTTP/2 PING interval and the wait for its answer: a connection whose peer stopped
/// answering is closed after at most interval + timeout.
const HTTP2_KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
/// See [`HTTP2_KEEPALIVE_INTERVAL`].
const HTTP2_KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// TCP keepalive on accepted sockets (tonic ignores its own TCP settings with an incoming
/// stream of ours): idle time before probing, probe interval, probes before giving up.
const TCP_KEEPALIVE_IDLE: std::time::Duration = std::time::Duration::from_secs(60);
/// See [`TCP_KEEPALIVE_IDLE`].
const TCP_KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// See [`TCP_KEEPALIVE_IDLE`].
const TCP_KEEPALIVE_RETRIES: u32 = 3;

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
    config.check().map_err(Error::Config)?;
    let backends = backend::build_backends(&config)?;
    let backend_name = backends.summarizer.name().to_owned();
    let protect = config.overload_protection == Switch::On;
    let drain = Drain::new();
    let (health, health_service) = tonic_health::server::health_reporter();

    // Memory pressure, sampled in-process from the same probe monitor-service uses.
    let mut probe = Probe::new(ProbeConfig {
        proc_root: config.probe_proc_root.clone(),
        cgroup_root: config.probe_cgroup_root.clone(),
        pids: Vec::new(),
        warn_ratio: config.warn_ratio,
        critical_ratio: config.critical_ratio,
    });
    let first = probe.sample();
    let budget_bytes = if config.memory_budget > 0 {
        config.memory_budget
    } else {
        admission::default_budget(
            first.cgroup.as_ref().map_or(0, |c| c.max_bytes),
            first.system.total_bytes,
        )
    };
    // The first sample sets the level the server starts at, so readiness never says SERVING
    // before memory was read (a pod restarted into a full cgroup starts NOT_SERVING).
    let mut tracker = PressureTracker::new(PressureConfig {
        warn_ratio: config.warn_ratio,
        critical_ratio: config.critical_ratio,
        warn_psi: config.warn_psi,
        critical_psi: config.critical_psi,
        hysteresis: config.pressure_hysteresis,
    });
    let initial = if protect {
        tracker.observe_sample(&first)
    } else {
        Pressure::Normal
    };
    if initial != Pressure::Normal {
        tracing::warn!(level = ?initial, usage_ratio = first.usage_ratio, "starting under memory pressure");
    }
    health
        .set_service_status(
            INSIGHT_SERVICE_NAME,
            admission::pressure::readiness(initial),
        )
        .await;
    let (pressure_tx, pressure_rx) = watch::channel(initial);
    if protect {
        let remote = config.monitor_url.clone().map(|url| {
            let (tx, rx) = watch::channel(Pressure::Normal);
            tracing::info!(%url, "following the monitor's alerts as a pressure signal");
            tokio::spawn(grpc::monitor_alerts::follow(url, tx));
            rx
        });
        let sampler = tokio::spawn(admission::pressure::run_monitor(
            probe,
            tracker,
            config.pressure_interval,
            pressure_tx,
            remote,
            health.clone(),
            drain.clone(),
        ));
        tokio::spawn(admission::pressure::supervise(sampler, health.clone()));
    } else if config.monitor_url.is_some() {
        tracing::warn!("--monitor-url is ignored: --overload-protection is off, nothing sheds");
    }

    let mut pipeline =
        pipeline::Pipeline::new(backends.summarizer.clone(), config.pipeline_config());
    if protect {
        pipeline = pipeline.with_pressure(pressure_rx.clone());
    }
    let budget = MemoryBudget::new(budget_bytes);
    let estimator = config.estimator_config();
    // Connects on first use (see `Store`): building the service never touches the database,
    // and a database that is down only affects what needs it.
    let store = store::Store::new(config.database_url.clone(), config.migrate);
    let summaries = summaries::Summaries::new(pipeline, store, config.cache_ttl)
        .with_cache_wait(config.cache_wait);
    // Jobs charge the same budget as calls (a job waits for it instead of failing).
    let jobs = jobs::Jobs::new(
        summaries.clone(),
        protect.then(|| (budget.clone(), estimator)),
        config.jobs_config(),
    );
    jobs.spawn_workers(drain.clone());
    let metrics = Arc::new(AdmissionMetrics::default());
    let service = grpc::InsightGrpc::new(
        summaries,
        jobs,
        backends.generator.clone(),
        protect.then(|| budget.clone()),
        metrics.clone(),
        &config,
    );
    // Connect and migrate at start, so a fresh machine gets its SQLite file on first start
    // and a broken database shows in the log at once; in the background, because the server
    // serves summaries without the store and retries the connection on the next store call.
    let store = service.store().clone();
    if !config.cache_ttl.is_zero() {
        let every = config.cache_ttl.min(Duration::from_secs(60 * 60));
        tokio::spawn(summaries::prune_cache(store.clone(), every));
    }
    tokio::spawn(async move {
        match store.get().await {
            Ok(_) => tracing::info!(database = %store.url(), "insight store ready"),
            Err(error) => tracing::warn!(
                database = %store.url(),
                %error,
                "insight store unreachable; store RPCs answer UNAVAILABLE until it is back"
            ),
        }
    });
    let max_message = usize::try_from(config.max_message_size).unwrap_or(usize::MAX);
    let insight = InsightServiceServer::new(service)
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let (reflection_v1, reflection_v1alpha) = reflection_services(INSIGHT_DESCRIPTOR_SET)?;

    let limiter = Limiter::with_pressure(
        config.max_concurrency as usize,
        config.queue_depth as usize,
        config.queue_timeout,
        metrics.clone(),
        pressure_rx.clone(),
    );
    let memory = MemoryGate {
        budget: budget.clone(),
        estimator,
        max_message_size: config.max_message_size,
        recv_timeout: config.recv_timeout,
        min_body_rate: config.min_body_rate,
        metrics: metrics.clone(),
    };

    // The one tower chain. Outermost first; heavy limits apply only to heavy methods
    // (`admission::is_heavy`): health, reflection and cheap reads pass straight through.
    let send_watch = SendWatch::start(config.send_timeout, metrics.clone());
    let chain = ServiceBuilder::new()
        // Drain: once SIGTERM arrived every new call gets UNAVAILABLE before any other work,
        // and in-flight calls are counted until their response bodies end.
        .layer(DrainLayer::new(drain.clone()))
        // Send stall: a response whose client stopped reading (no flow-control window) for
        // --send-timeout closes its connection, so the call's slot and memory are not held
        // for as long as that client stays connected. Every call is watched, light ones too.
        .layer(SendStallLayer::new(send_watch))
        // Deadline: the caller's grpc-timeout capped by --request-timeout, answered
        // DEADLINE_EXCEEDED; outside the limits so time spent queued counts against it.
        .layer(DeadlineLayer::new(config.request_timeout, metrics.clone()))
        // Pressure shedding: the cheapest refusal and the most urgent, so it comes first.
        .option_layer(protect.then(|| ShedLayer::new(pressure_rx.clone(), metrics.clone())))
        // Concurrency limit + short queue, BEFORE memory admission: queued calls hold no
        // budget, their bodies wait in the (explicitly sized) h2 stream window. A caller
        // that waited is shed if pressure turned Critical meanwhile.
        .option_layer(protect.then(|| ConcurrencyLayer::new(limiter.clone())))
        // Memory admission from the 5-byte length prefix, before tonic buffers the message,
        // then from the counted elements of a unary message before it is decoded; the
        // reservation is held until the response body ends. Every call's messages (light ones
        // too, against 64 KiB: they take no slot and no budget) are checked against
        // --max-message-size from their prefixes here, a body cut short or without its
        // message is INVALID_ARGUMENT, and one that sends nothing for --recv-timeout while
        // it is read, or a heavy message slower than --min-body-rate after that grace, ends
        // DEADLINE_EXCEEDED (a slow-loris client would hold its slot).
        .option_layer(protect.then(|| MemoryLayer::new(memory)))
        .into_inner();

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // Logged as a plain field so scripts and tests can find the port when started on :0.
    let addr = listener.local_addr()?;
    tracing::info!(
        %addr,
        backend = %backend_name,
        overload_protection = protect,
        memory_budget_bytes = budget_bytes,
        max_concurrency = config.max_concurrency,
        "insight-service listening"
    );
    let h2_window = |bytes: u64| u32::try_from(bytes).unwrap_or(u32::MAX);
    let server = tonic::transport::Server::builder()
        // Per-connection bounds on what a client can make us buffer (set explicitly, not left
        // to library defaults): streams per connection and the flow-control windows.
        .max_concurrent_streams(config.max_concurrent_streams)
        .initial_stream_window_size(h2_window(config.h2_stream_window))
        .initial_connection_window_size(h2_window(config.h2_connection_window))
        // A peer that vanished (a killed pod, a dropped NAT entry) is found by HTTP/2 PINGs
        // and TCP keepalive probes; its streams are then dropped, and with them the heavy
        // slots and memory reservations their responses held.
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
        .layer(chain)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(insight)
        // TCP_NODELAY on every accepted socket: `Server::tcp_nodelay` is ignored with
        // `serve_with_incoming`, and with Nagle on, a small write (a refusal, a WINDOW_UPDATE)
        // waits for the peer's delayed ACK: ~40 ms stalls (overload-bench measured them).
        // Each socket is a `StallIo`, which the send-stall watch can close from outside hyper.
        .serve_with_incoming_shutdown(
            tokio_stream::StreamExt::map(
                tonic::transport::server::TcpIncoming::from(listener)
                    .with_nodelay(Some(true))
                    .with_keepalive(Some(TCP_KEEPALIVE_IDLE))
                    .with_keepalive_interval(Some(TCP_KEEPALIVE_INTERVAL))
                    .with_keepalive_retries(Some(TCP_KEEPALIVE_RETRIES)),
                |accepted| accepted.map(StallIo::new),
            ),
            async {
                let _ = stop_rx.await;
            },
        );
    let result = serve_until_drained(
        server,
        stop_tx,
        shutdown,
        drain,
        health,
        &[INSIGHT_SERVICE_NAME],
        config.shutdown_grace,
    )
    .await;
    tracing::info!(metrics = ?metrics.snapshot(&budget), "admission counters at exit");
    result?;
    Ok(())
}
