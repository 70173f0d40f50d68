//! A bare tonic InsightService that answers without doing any work: the baseline a benchmark
//! compares the real service with, so what is measured is the service's own cost and not tonic's,
//! the loopback's or the load generator's.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use spotifai_proto::insight::{
    self as pb,
    insight_service_server::{InsightService, InsightServiceServer},
};
use tokio::net::TcpListener;
use tokio_stream::Stream;
use tonic::{
    Code, Request, Response, Status, Streaming,
    transport::{
        Server,
        server::{Router, TcpIncoming},
    },
};

/// A boxed server stream, as tonic's associated stream types want.
type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Answers `SummarizeFeedback` (and `StreamFeedbackSummary`) with a canned summary as soon as
/// the request is decoded; every other RPC is UNIMPLEMENTED.
///
/// For a fair baseline the canned summary should be what the real service answers to the same
/// request, so both send the same bytes each way.
#[derive(Clone, Debug)]
pub struct EchoInsight {
    summary: Arc<pb::FeedbackSummary>,
    /// Every n-th call (1-based) fails with this code instead: lets tests check that the load
    /// generator counts a status the server sends under its own code.
    fail_every: Option<(u64, Code)>,
    /// A fixed service time, to test deadlines and open-loop latency.
    delay: Option<Duration>,
    calls: Arc<AtomicU64>,
}

impl EchoInsight {
    /// An echo server answering `summary`.
    pub fn new(summary: pb::FeedbackSummary) -> Self {
        Self {
            summary: Arc::new(summary),
            fail_every: None,
            delay: None,
            calls: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Makes every `n`-th summary call (n >= 1) fail with `code`.
    pub fn fail_every(mut self, n: u64, code: Code) -> Self {
        self.fail_every = Some((n.max(1), code));
        self
    }

    /// Waits `delay` before answering each summary call.
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }

    /// Summary calls received so far (failed ones included).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    async fn answer(&self) -> Result<(), Status> {
        let n = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(delay) = self.delay {
            tokio::time::sleep(delay).await;
        }
        match self.fail_every {
            Some((every, code)) if n.is_multiple_of(every) => {
                Err(Status::new(code, "echo server: injected failure"))
            }
            _ => Ok(()),
        }
    }
}

fn unimplemented() -> Status {
    Status::unimplemented("echo server: only SummarizeFeedback and StreamFeedbackSummary")
}

#[tonic::async_trait]
impl InsightService for EchoInsight {
    async fn summarize_feedback(
        &self,
        _request: Request<pb::SummarizeFeedbackRequest>,
    ) -> Result<Response<pb::FeedbackSummary>, Status> {
        self.answer().await?;
        Ok(Response::new((*self.summary).clone()))
    }

    type StreamFeedbackSummaryStream = BoxStream<pb::SummaryEvent>;

    async fn stream_feedback_summary(
        &self,
        _request: Request<pb::SummarizeFeedbackRequest>,
    ) -> Result<Response<Self::StreamFeedbackSummaryStream>, Status> {
        self.answer().await?;
        let summary = (*self.summary).clone();
        let events: Vec<Result<pb::SummaryEvent, Status>> = summary
            .chunks
            .clone()
            .into_iter()
            .map(pb::summary_event::Event::Chunk)
            .chain(std::iter::once(pb::summary_event::Event::Summary(summary)))
            .map(|event| Ok(pb::SummaryEvent { event: Some(event) }))
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(events))))
    }

    async fn analyze_music(
        &self,
        _request: Request<pb::AnalyzeMusicRequest>,
    ) -> Result<Response<pb::MusicAnalysis>, Status> {
        Err(unimplemented())
    }

    async fn import_feedback(
        &self,
        _request: Request<Streaming<pb::FeedbackEntry>>,
    ) -> Result<Response<pb::ImportFeedbackResponse>, Status> {
        Err(unimplemented())
    }

    async fn import_listening(
        &self,
        _request: Request<Streaming<pb::ListeningPlay>>,
    ) -> Result<Response<pb::ImportListeningResponse>, Status> {
        Err(unimplemented())
    }

    async fn list_feedback(
        &self,
        _request: Request<pb::ListFeedbackRequest>,
    ) -> Result<Response<pb::ListFeedbackResponse>, Status> {
        Err(unimplemented())
    }

    async fn submit_summary_job(
        &self,
        _request: Request<pb::SummarizeFeedbackRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        Err(unimplemented())
    }

    async fn get_job(
        &self,
        _request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        Err(unimplemented())
    }

    type WatchJobStream = BoxStream<pb::Job>;

    async fn watch_job(
        &self,
        _request: Request<pb::GetJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        Err(unimplemented())
    }

    async fn cancel_job(
        &self,
        _request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        Err(unimplemented())
    }
}

/// Serves `service` on `listener` (bound by the caller, e.g. to `127.0.0.1:0`, so the port is
/// known before the first call) until `shutdown` resolves. No middleware, health or reflection:
/// this is the floor a real server is measured against.
pub async fn serve_echo(
    listener: TcpListener,
    service: EchoInsight,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    serve_bare(
        Server::builder().add_service(InsightServiceServer::new(service)),
        listener,
        shutdown,
    )
    .await
}

/// Serves `router` on `listener` until `shutdown` resolves, the one way every baseline server
/// here is served.
///
/// Accepted connections get TCP_NODELAY, as tonic's own `Server::serve` sets by default.
/// `serve_with_incoming` ignores the builder's `tcp_nodelay`, and without it a response written
/// in more than one piece waits for the client's delayed ACK (about 40 ms on Linux).
async fn serve_bare(
    router: Router,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    router
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
}

/// A bare tonic server serving only tonic-health's standard `grpc.health.v1.Health` (the
/// overall "" status, SERVING from the start): the cheapest answer any tonic server gives. The
/// overload benchmark times its health checks beside the service's, so the latency a refusal
/// is held to has the floor of any tonic server on the same machine next to it.
///
/// It runs on its own multi-thread runtime (as many workers as cores, like
/// `#[tokio::main]`, which the services use) in its own threads of this process, so that the
/// runtime of whoever starts it takes no part in answering. Stops, and joins its threads, on
/// drop.
pub struct BareHealthServer {
    url: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BareHealthServer {
    /// Binds 127.0.0.1:0 and starts serving; returns once the port is known.
    pub fn start() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("bare-tonic")
            .build()?;
        // Bound here with std (this may run inside another runtime, where `block_on` is not
        // allowed), handed to the server's runtime on its own thread.
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let url = format!("http://{}", listener.local_addr()?);
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("bare-tonic-main".to_owned())
            .spawn(move || {
                let served = runtime.block_on(async move {
                    let (_reporter, health) = tonic_health::server::health_reporter();
                    let listener = TcpListener::from_std(listener)?;
                    serve_bare(Server::builder().add_service(health), listener, async {
                        let _ = stop.await;
                    })
                    .await
                    .map_err(std::io::Error::other)
                });
                if let Err(error) = served {
                    eprintln!("bare tonic health server: {error}");
                }
            })?;
        Ok(Self {
            url,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for BareHealthServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
