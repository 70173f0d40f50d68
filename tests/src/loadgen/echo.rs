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
use tonic::{Code, Request, Response, Status, Streaming, transport::server::TcpIncoming};

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
///
/// Accepted connections get TCP_NODELAY, as tonic's own `Server::serve` sets by default.
/// `serve_with_incoming` ignores the builder's `tcp_nodelay`, and without it a response written
/// in more than one piece waits for the client's delayed ACK (about 40 ms on Linux).
pub async fn serve_echo(
    listener: TcpListener,
    service: EchoInsight,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(InsightServiceServer::new(service))
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
}
