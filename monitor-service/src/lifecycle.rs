//! Server lifecycle shared by both services: logging set-up, the shutdown signal, and the drain
//! that turns SIGTERM into "health NOT_SERVING, refuse new calls, finish in-flight ones, exit".
//!
//! It lives in monitor-service's library because insight-service already depends on this library
//! (for the memory probe) and the repository's top-level layout has no room for a third crate.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use tokio::sync::Notify;
use tonic_health::{ServingStatus, server::HealthReporter};
use tower::{Layer, Service};

/// Log output format (`--log-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Installs the global tracing subscriber: stderr, filtered by `RUST_LOG` (default `info`).
///
/// Calling it twice (as tests that start several servers do) is harmless: the first wins.
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Resolves on SIGTERM (Kubernetes' stop) or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::warn!(%error, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!(signal = "SIGINT", "shutdown requested"),
        () = term => tracing::info!(signal = "SIGTERM", "shutdown requested"),
    }
}

/// Paths that stay open while draining and are not counted as in-flight work: probes must keep
/// answering (they report NOT_SERVING), and a long-lived health Watch must not hold the exit.
fn is_control_plane(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.")
}

#[derive(Debug, Default)]
struct DrainState {
    draining: AtomicBool,
    in_flight: AtomicUsize,
    idle: Notify,
}

/// Counts in-flight calls and, once draining, refuses new ones with UNAVAILABLE.
///
/// A call counts until its response body ends, so a server stream is in flight until its last
/// message, not just until its handler returns.
#[derive(Clone, Debug, Default)]
pub struct Drain(Arc<DrainState>);

impl Drain {
    /// A drain that is open (not draining) with nothing in flight.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts refusing new calls.
    pub fn start(&self) {
        self.0.draining.store(true, Ordering::SeqCst);
    }

    /// True once [`Drain::start`] was called.
    pub fn is_draining(&self) -> bool {
        self.0.draining.load(Ordering::SeqCst)
    }

    /// Calls currently in flight (control-plane calls excluded).
    pub fn in_flight(&self) -> usize {
        self.0.in_flight.load(Ordering::SeqCst)
    }

    /// Resolves when no call is in flight.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.0.idle.notified();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }

    fn enter(&self) -> Option<InFlight> {
        if self.is_draining() {
            return None;
        }
        self.0.in_flight.fetch_add(1, Ordering::SeqCst);
        // A call that raced with `start` is refused too, so nothing begins after the drain did.
        if self.is_draining() {
            drop(InFlight(self.clone()));
            return None;
        }
        Some(InFlight(self.clone()))
    }
}

/// Held by one in-flight call; its drop may wake the drain.
#[derive(Debug)]
struct InFlight(Drain);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.0.idle.notify_waiters();
        }
    }
}

/// Tower layer of [`Drain`]; it sits outermost so that even calls that other layers would
/// refuse get the drain's clear UNAVAILABLE once shutdown began.
#[derive(Clone, Debug)]
pub struct DrainLayer(Drain);

impl DrainLayer {
    /// Layer counting calls on `drain`.
    pub fn new(drain: Drain) -> Self {
        Self(drain)
    }
}

impl<S> Layer<S> for DrainLayer {
    type Service = DrainService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        DrainService {
            inner,
            drain: self.0.clone(),
        }
    }
}

/// Service produced by [`DrainLayer`].
#[derive(Clone, Debug)]
pub struct DrainService<S> {
    inner: S,
    drain: Drain,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B, ResBody> Service<Request<B>> for DrainService<S>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Send,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = Response<GuardedBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let guard = if is_control_plane(req.uri().path()) {
            None
        } else {
            match self.drain.enter() {
                Some(guard) => Some(guard),
                None => {
                    let status = tonic::Status::unavailable(
                        "server is shutting down; retry on another replica",
                    );
                    let response = status.into_http::<ResBody>();
                    return Box::pin(async move {
                        Ok(response.map(|body| GuardedBody {
                            inner: body,
                            _guard: None,
                        }))
                    });
                }
            }
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let response = fut.await?;
            Ok(response.map(|body| GuardedBody {
                inner: body,
                _guard: guard,
            }))
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its call counted as in flight until the body is dropped.
    pub struct GuardedBody<B> {
        #[pin]
        inner: B,
        _guard: Option<InFlight>,
    }
}

impl<B> http_body::Body for GuardedBody<B>
where
    B: http_body::Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Runs a server future until `shutdown` resolves, then drains it:
///
/// 1. new calls are refused with UNAVAILABLE (by the [`DrainLayer`] in the server's stack);
/// 2. every health status in `health_names` (and "") turns NOT_SERVING, so load balancers and
///    Kubernetes stop sending traffic;
/// 3. in-flight calls finish, for at most `grace`;
/// 4. `stop` tells the server to close its listener and connections; long-lived health watches
///    are then cut, at most one second later.
///
/// Returns the server's own error if it failed before shutdown was requested.
pub async fn serve_until_drained<F>(
    server: F,
    stop: tokio::sync::oneshot::Sender<()>,
    shutdown: impl Future<Output = ()>,
    drain: Drain,
    health: HealthReporter,
    health_names: &[&str],
    grace: Duration,
) -> Result<(), tonic::transport::Error>
where
    F: Future<Output = Result<(), tonic::transport::Error>>,
{
    let mut server = std::pin::pin!(server);
    tokio::select! {
        result = &mut server => return result,
        () = shutdown => {}
    }
    let deadline = tokio::time::Instant::now() + grace;
    // Refuse first, then announce: whoever sees NOT_SERVING can rely on new calls being refused.
    drain.start();
    for name in health_names.iter().copied().chain([""]) {
        health
            .set_service_status(name, ServingStatus::NotServing)
            .await;
    }
    tracing::info!(
        in_flight = drain.in_flight(),
        grace_ms = grace.as_millis() as u64,
        "draining"
    );
    if tokio::time::timeout_at(deadline, drain.wait_idle())
        .await
        .is_err()
    {
        tracing::warn!(
            in_flight = drain.in_flight(),
            "shutdown grace expired; abandoning calls"
        );
    }
    let _ = stop.send(());
    let close_by = deadline.min(tokio::time::Instant::now() + Duration::from_secs(1));
    match tokio::time::timeout_at(close_by, server).await {
        Ok(result) => result?,
        Err(_) => tracing::debug!("closing remaining connections"),
    }
    tracing::info!("shutdown complete");
    Ok(())
}

/// Server reflection v1 and v1alpha over `descriptor_set` (the service's own encoded
/// `FileDescriptorSet`), plus the health and reflection descriptors, so that `grpcurl list`
/// shows every service, whether grpcurl speaks v1 or only v1alpha (1.8.x).
pub fn reflection_services(
    descriptor_set: &'static [u8],
) -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(descriptor_set)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}
