//! The RPC under load, as a trait, so the same driver (closed or open loop, histograms, status
//! counts) serves every benchmark: a benchmark of another RPC implements [`Rpc`] (or passes a
//! closure) instead of writing its own load loop.

use std::{future::Future, sync::Arc, time::Duration};

use spotifai_proto::insight::{
    SummarizeFeedbackRequest, insight_service_client::InsightServiceClient,
};
use tonic::{Request, Status, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// One call of the RPC being measured.
///
/// The driver picks the channel (round-robin over its connections) and owns the deadline; the
/// implementation only builds its request and reports how the call ended. A call ends `Ok(())`
/// when the server answered with grpc-status OK (a stream: once it ended with OK), and with the
/// [`Status`] tonic produced otherwise; the driver tells a status the server sent from a
/// transport failure by whether the status carries a source error.
///
/// Closures `Fn(Channel, Option<Duration>) -> impl Future<Output = Result<(), Status>>` implement
/// it too, for one-off benchmarks.
pub trait Rpc: Send + Sync + 'static {
    /// Makes one call on `channel`. `timeout` is the per-call deadline: send it as
    /// `grpc-timeout` (see [`request_with_timeout`]); the driver also enforces it locally.
    fn call(
        &self,
        channel: Channel,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<(), Status>> + Send + 'static;
}

impl<F, Fut> Rpc for F
where
    F: Fn(Channel, Option<Duration>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), Status>> + Send + 'static,
{
    fn call(
        &self,
        channel: Channel,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<(), Status>> + Send + 'static {
        self(channel, timeout)
    }
}

/// Wraps `message` in a request that carries `timeout` as `grpc-timeout`, so the server sees
/// the same deadline the driver enforces and can give up (DEADLINE_EXCEEDED) on its side too.
pub fn request_with_timeout<T>(message: T, timeout: Option<Duration>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(timeout) = timeout {
        request.set_timeout(timeout);
    }
    request
}

/// `InsightService/SummarizeFeedback` with one fixed request: the main benchmark.
#[derive(Clone, Debug)]
pub struct SummarizeFeedback {
    request: Arc<SummarizeFeedbackRequest>,
}

impl SummarizeFeedback {
    /// Sends `request` on every call (cloned per call, as tonic takes requests by value; the
    /// clone costs the client the same for every server it is compared against).
    pub fn new(request: SummarizeFeedbackRequest) -> Self {
        Self {
            request: Arc::new(request),
        }
    }
}

impl Rpc for SummarizeFeedback {
    fn call(
        &self,
        channel: Channel,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<(), Status>> + Send + 'static {
        let request = request_with_timeout((*self.request).clone(), timeout);
        async move {
            InsightServiceClient::new(channel)
                .summarize_feedback(request)
                .await
                .map(drop)
        }
    }
}

/// `InsightService/StreamFeedbackSummary`: the call lasts until the stream's last event, so the
/// latency is the time to the final summary, and a status sent mid-stream is what counts.
#[derive(Clone, Debug)]
pub struct StreamFeedbackSummary {
    request: Arc<SummarizeFeedbackRequest>,
}

impl StreamFeedbackSummary {
    /// Streams a summary of `request` on every call.
    pub fn new(request: SummarizeFeedbackRequest) -> Self {
        Self {
            request: Arc::new(request),
        }
    }
}

impl Rpc for StreamFeedbackSummary {
    fn call(
        &self,
        channel: Channel,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<(), Status>> + Send + 'static {
        let request = request_with_timeout((*self.request).clone(), timeout);
        async move {
            let mut stream = InsightServiceClient::new(channel)
                .stream_feedback_summary(request)
                .await?
                .into_inner();
            while stream.message().await?.is_some() {}
            Ok(())
        }
    }
}

/// `grpc.health.v1.Health/Check` for the overall status (""): the cheapest RPC both services
/// serve, to measure the transport and the middleware alone.
#[derive(Clone, Copy, Debug, Default)]
pub struct HealthCheck;

impl Rpc for HealthCheck {
    fn call(
        &self,
        channel: Channel,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<(), Status>> + Send + 'static {
        let request = request_with_timeout(HealthCheckRequest::default(), timeout);
        async move { HealthClient::new(channel).check(request).await.map(drop) }
    }
}
