//! The overload layers. Each is small and fails fast with a typed [`AdmissionError`] that
//! `grpc::error::admission_status` (the service's one error mapping) turns into a status.
//! Their order is documented where the chain is built (`crate::run`).

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes};
use http::{Request, Response};
use http_body::{Body as _, Frame};
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore, watch},
    time::Instant,
};
use tonic::body::Body;
use tower::{Layer, Service};

use super::{
    AdmissionError, AdmissionMetrics, Charged, LIGHT_MAX_MESSAGE_BYTES,
    budget::MemoryBudget,
    estimator::{
        EstimatorConfig, charged_elements_bytes, counted_elements_bytes, estimate, import_estimate,
    },
    is_client_streaming, is_heavy,
    pressure::Pressure,
};
use crate::grpc::{
    deadline::{CallDeadline, deadline_from},
    error::admission_status,
};

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The gRPC error response for `error`, as a trailers-only HTTP response.
fn refuse(error: AdmissionError) -> Response<Body> {
    admission_status(&error).into_http()
}

/// Keeps `guard` alive until the response body is finished or dropped: a streamed answer holds
/// its permit or reservation for as long as it streams.
fn hold<G: Send + Sync + 'static>(response: Response<Body>, guard: G) -> Response<Body> {
    response.map(|inner| {
        Body::new(Holding {
            inner,
            _guard: guard,
        })
    })
}

pin_project_lite::pin_project! {
    struct Holding<G> {
        #[pin]
        inner: Body,
        _guard: G,
    }
}

impl<G> http_body::Body for Holding<G> {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Takes the inner service out for a call, leaving a clone (the service was made ready).
fn take<S: Clone>(slot: &mut S) -> S {
    let clone = slot.clone();
    std::mem::replace(slot, clone)
}

/// One overload step: it sees each request before the inner service and either passes it on
/// (possibly holding a guard until the response body ends) or answers for it. The tower
/// plumbing is written once, in [`GateService`].
pub trait Gate: Send + Sync + 'static {
    /// Whether light calls (`is_heavy` false) skip this step.
    const HEAVY_ONLY: bool;

    /// Handles one request.
    fn admit<S>(
        self: Arc<Self>,
        inner: S,
        req: Request<Body>,
    ) -> BoxFuture<Result<Response<Body>, S::Error>>
    where
        S: Service<Request<Body>, Response = Response<Body>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Send + 'static;
}

/// The tower layer of a [`Gate`].
#[derive(Debug)]
pub struct GateLayer<G>(Arc<G>);

impl<G> GateLayer<G> {
    /// The layer of a gate shared with its owner (who reads its state).
    pub fn from_gate(gate: Arc<G>) -> Self {
        Self(gate)
    }
}

impl<G> Clone for GateLayer<G> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<G, S> Layer<S> for GateLayer<G> {
    type Service = GateService<G, S>;
    fn layer(&self, inner: S) -> Self::Service {
        GateService {
            inner,
            gate: self.0.clone(),
        }
    }
}

/// The service of a [`GateLayer`].
#[derive(Debug)]
pub struct GateService<G, S> {
    inner: S,
    gate: Arc<G>,
}

impl<G, S: Clone> Clone for GateService<G, S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            gate: self.gate.clone(),
        }
    }
}

impl<G, S> Service<Request<Body>> for GateService<G, S>
where
    G: Gate,
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let mut inner = take(&mut self.inner);
        if G::HEAVY_ONLY && !is_heavy(req.uri().path()) {
            return Box::pin(inner.call(req));
        }
        self.gate.clone().admit(inner, req)
    }
}

// ---------------------------------------------------------------------------------------------

/// Deadline: honours the caller's `grpc-timeout`, capped by `--request-timeout`, and answers
/// DEADLINE_EXCEEDED (never UNKNOWN, as tower's own timeout error would become).
pub type DeadlineLayer = GateLayer<DeadlineGate>;

/// The [`Gate`] of [`DeadlineLayer`].
#[derive(Debug)]
pub struct DeadlineGate {
    /// `--request-timeout`.
    pub max: Duration,
    /// Shared counters.
    pub metrics: Arc<AdmissionMetrics>,
}

impl DeadlineLayer {
    /// A deadline layer with server maximum `max`.
    pub fn new(max: Duration, metrics: Arc<AdmissionMetrics>) -> Self {
        Self(Arc::new(DeadlineGate { max, metrics }))
    }
}

impl Gate for DeadlineGate {
    const HEAVY_ONLY: bool = false;

    fn admit<S>(
        self: Arc<Self>,
        mut inner: S,
        req: Request<Body>,
    ) -> BoxFuture<Result<Response<Body>, S::Error>>
    where
        S: Service<Request<Body>, Response = Response<Body>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Send + 'static,
    {
        let deadline = deadline_from(req.headers(), self.max);
        let timeout = deadline.saturating_duration_since(Instant::now());
        // The handler reads the same deadline, so time spent queued counts against its calls.
        let mut req = req;
        req.extensions_mut().insert(CallDeadline(deadline));
        let fut = inner.call(req);
        Box::pin(async move {
            match tokio::time::timeout_at(deadline, fut).await {
                Ok(response) => response,
                Err(_) => {
                    self.metrics
                        .deadline_exceeded
                        .fetch_add(1, Ordering::Relaxed);
                    Ok(refuse(AdmissionError::DeadlineExceeded { after: timeout }))
                }
            }
        })
    }
}

// ---------------------------------------------------------------------------------------------

/// Pressure shedding: while the memory level is Critical, new heavy calls are refused at once.
/// First among the heavy limits because it is the cheapest check and the most urgent.
pub type ShedLayer = GateLayer<ShedGate>;

/// The [`Gate`] of [`ShedLayer`].
#[derive(Debug)]
pub struct ShedGate {
    /// The current pressure level.
    pub pressure: watch::Receiver<Pressure>,
    /// Shared counters.
    pub metrics: Arc<AdmissionMetrics>,
}

impl ShedLayer {
    /// Sheds while `pressure` reads Critical.
    pub fn new(pressure: watch::Receiver<Pressure>, metrics: Arc<AdmissionMetrics>) -> Self {
        Self(Arc::new(ShedGate { pressure, metrics }))
    }
}

/// Delay suggested while shedding for pressure: a few probe intervals.
const PRESSURE_RETRY: Duration = Duration::from_secs(1);

/// The refusal of a heavy call while `pressure` reads Critical: the shed layer's, and the
/// queue's for a caller whose slot freed after the level rose.
fn shed_for(pressure: &watch::Receiver<Pressure>) -> Option<AdmissionError> {
    (*pressure.borrow() == Pressure::Critical).then_some(AdmissionError::MemoryPressure {
        retry_after: PRESSURE_RETRY,
    })
}

impl Gate for ShedGate {
    const HEAVY_ONLY: bool = true;

    fn admit<S>(
        self: Arc<Self>,
        mut inner: S,
        req: Request<Body>,
    ) -> BoxFuture<Result<Response<Body>, S::Error>>
    where
        S: Service<Request<Body>, Response = Response<Body>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Send + 'static,
    {
        if let Some(refusal) = shed_for(&self.pressure) {
            self.metrics.shed_pressure.fetch_add(1, Ordering::Relaxed);
            let response = refuse(refusal);
            return Box::pin(async move { Ok(response) });
        }
        Box::pin(inner.call(req))
    }
}

// ---------------------------------------------------------------------------------------------

/// Concurrency limit of heavy calls with a short bounded wait queue. Before memory admission,
/// so that queued calls hold no budget: their bodies wait in the h2 flow-control window, whose
/// size is set explicitly on the server.
pub type ConcurrencyLayer = GateLayer<Limiter>;

/// The [`Gate`] of [`ConcurrencyLayer`]: a semaphore and a bounded queue.
#[derive(Debug)]
pub struct Limiter {
    permits: Arc<Semaphore>,
    max: usize,
    queued: AtomicUsize,
    queue_depth: usize,
    queue_timeout: Duration,
    /// EWMA of how long a heavy call holds its permit, in microseconds (for RetryInfo).
    hold_us: AtomicU64,
    metrics: Arc<AdmissionMetrics>,
    /// The pressure level the shed layer reads, checked again when a queued caller gets its
    /// slot (see [`Limiter::acquire`]).
    pressure: Option<watch::Receiver<Pressure>>,
}

/// A permit; dropping it frees the slot and records how long it was held.
#[derive(Debug)]
pub struct Permit {
    _permit: OwnedSemaphorePermit,
    limiter: Arc<Limiter>,
    since: Instant,
    /// Whether the hold time feeds the average the queue's predictions use: not for the
    /// client-streaming imports, whose slot is held for as long as their client keeps sending.
    record: bool,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.record {
            return;
        }
        let held = self.since.elapsed().as_micros() as u64;
        let old = self.limiter.hold_us.load(Ordering::Relaxed);
        let new = if old == 0 { held } else { (old * 7 + held) / 8 };
        self.limiter.hold_us.store(new, Ordering::Relaxed);
    }
}

impl Limiter {
    /// `max` calls at once, up to `queue_depth` more waiting at most `queue_timeout`.
    pub fn new(
        max: usize,
        queue_depth: usize,
        queue_timeout: Duration,
        metrics: Arc<AdmissionMetrics>,
    ) -> Arc<Self> {
        Self::build(max, queue_depth, queue_timeout, metrics, None)
    }

    /// Like [`new`](Self::new), and a caller that waited in the queue is refused
    /// MEMORY_PRESSURE when it gets its slot while `pressure` reads Critical.
    pub fn with_pressure(
        max: usize,
        queue_depth: usize,
        queue_timeout: Duration,
        metrics: Arc<AdmissionMetrics>,
        pressure: watch::Receiver<Pressure>,
    ) -> Arc<Self> {
        Self::build(max, queue_depth, queue_timeout, metrics, Some(pressure))
    }

    fn build(
        max: usize,
        queue_depth: usize,
        queue_timeout: Duration,
        metrics: Arc<AdmissionMetrics>,
        pressure: Option<watch::Receiver<Pressure>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            permits: Arc::new(Semaphore::new(max.max(1))),
            max: max.max(1),
            queued: AtomicUsize::new(0),
            queue_depth,
            queue_timeout,
            hold_us: AtomicU64::new(0),
            metrics,
            pressure,
        })
    }

    /// When a slot is likely free: the average hold time, scaled by the callers ahead.
    fn retry_after(&self) -> Duration {
        let hold = Duration::from_micros(self.hold_us.load(Ordering::Relaxed).max(10_000));
        let ahead = (self.queued.load(Ordering::Relaxed) + 1) as u32;
        (hold * ahead / self.max as u32).clamp(Duration::from_millis(10), Duration::from_secs(30))
    }

    /// How long the `position`-th caller in the queue (from 1) can expect to wait: slots free
    /// up about every `hold / max`. `None` until a call has finished (no hold time known yet).
    fn expected_wait(&self, position: usize) -> Option<Duration> {
        let hold = self.hold_us.load(Ordering::Relaxed);
        (hold > 0)
            .then(|| Duration::from_micros(hold.saturating_mul(position as u64) / self.max as u64))
    }

    /// A permit now, or after waiting in the queue, or the reason why not. A caller that
    /// would only wait out `--queue-timeout` (the queue ahead of it takes longer than that to
    /// drain, at the recent hold time) is refused at once instead: the same answer, two
    /// seconds sooner, and it never holds its request body in a window meanwhile. A caller
    /// that waited passed the shed layer before pressure may have turned Critical: it is
    /// refused now as the shed layer would refuse it, and its slot goes to the next.
    pub async fn acquire(self: &Arc<Self>) -> Result<Permit, AdmissionError> {
        let start = Instant::now();
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let position = self.queued.fetch_add(1, Ordering::AcqRel) + 1;
                // Leaves the queue however the wait ends, including when this future is
                // dropped while waiting (the caller's deadline passed, its client went away):
                // a count only decremented after the await would keep such callers' places
                // taken for good, and once `queue_depth` of them had gone, nobody could queue.
                let mut in_queue = InQueue {
                    limiter: self,
                    waiting_since: None,
                };
                let hopeless = self
                    .expected_wait(position)
                    .is_some_and(|wait| wait > self.queue_timeout);
                if position > self.queue_depth || hopeless {
                    drop(in_queue);
                    return Err(AdmissionError::QueueFull {
                        limit: self.max,
                        retry_after: self.retry_after(),
                    });
                }
                in_queue.waiting_since = Some(start);
                let waited =
                    tokio::time::timeout(self.queue_timeout, self.permits.clone().acquire_owned())
                        .await;
                drop(in_queue);
                let waited_for = start.elapsed();
                match waited {
                    Ok(Ok(permit)) => {
                        if let Some(refusal) = self.pressure.as_ref().and_then(shed_for) {
                            return Err(refusal);
                        }
                        permit
                    }
                    // A closed semaphore cannot happen (it is never closed); treat it as a
                    // timeout rather than panic.
                    Ok(Err(_)) | Err(_) => {
                        return Err(AdmissionError::QueueTimeout {
                            waited: waited_for,
                            retry_after: self.retry_after(),
                        });
                    }
                }
            }
        };
        Ok(Permit {
            _permit: permit,
            limiter: self.clone(),
            since: Instant::now(),
            record: true,
        })
    }

    /// Calls holding a permit now.
    pub fn in_use(&self) -> usize {
        self.max - self.permits.available_permits()
    }
}

/// One caller's place in the [`Limiter`]'s queue count, given back on drop; once the caller
/// waits, the drop also records the wait, so the queue-wait metrics count callers that gave
/// up while queued too.
struct InQueue<'a> {
    limiter: &'a Limiter,
    waiting_since: Option<Instant>,
}

impl Drop for InQueue<'_> {
    fn drop(&mut self) {
        self.limiter.queued.fetch_sub(1, Ordering::AcqRel);
        if let Some(since) = self.waiting_since {
            self.limiter.metrics.record_queue_wait(since.elapsed());
        }
    }
}

impl ConcurrencyLayer {
    /// A layer over `limiter`.
    pub fn new(limiter: Arc<Limiter>) -> Self {
        Self(limiter)
    }
}

impl Gate for Limiter {
    const HEAVY_ONLY: bool = true;

    fn admit<S>(
        self: Arc<Self>,
        mut inner: S,
        req: Request<Body>,
    ) -> BoxFuture<Result<Response<Body>, S::Error>>
    where
        S: Service<Request<Body>, Response = Response<Body>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Send + 'static,
    {
        // An import's slot is held for as long as its client streams (a minute, for a large
        // one): an average that counted it would predict minute-long waits for every queued
        // summary, refused at once as hopeless while slots free up in milliseconds.
        let record = !is_client_streaming(req.uri().path());
        Box::pin(async move {
            match self.acquire().await {
                Ok(mut permit) => {
                    permit.record = record;
                    Ok(hold(inner.call(req).await?, permit))
                }
                Err(error) => {
                    let counter = match error {
                        AdmissionError::MemoryPressure { .. } => &self.metrics.shed_pressure,
                        _ => &self.metrics.shed_concurrency,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    Ok(refuse(error))
                }
            }
        })
    }
}

// ---------------------------------------------------------------------------------------------

/// Memory admission, decided from the 5-byte gRPC length prefix of the first message before
/// the body is read any further (tonic buffers whole messages before a handler runs: 200
/// concurrent 4 MiB requests would otherwise sit in memory first); then, for a unary call,
/// from its message's counted elements before prost decodes it. Oversized messages are refused
/// here too, before a byte of them is buffered, on every method and every message of a stream
/// (light calls pass through this layer only for that check).
pub type MemoryLayer = GateLayer<MemoryGate>;

/// The [`Gate`] of [`MemoryLayer`].
#[derive(Debug)]
pub struct MemoryGate {
    /// The shared budget.
    pub budget: Arc<MemoryBudget>,
    /// Inputs of the estimate.
    pub estimator: EstimatorConfig,
    /// `--max-message-size`.
    pub max_message_size: u64,
    /// `--recv-timeout`: the longest wait for the next bytes of a request body.
    pub recv_timeout: Duration,
    /// `--min-body-rate`: the slowest average rate, in bytes per second, at which a heavy
    /// call's message must arrive after the `recv_timeout` grace.
    pub min_body_rate: u64,
    /// Shared counters.
    pub metrics: Arc<AdmissionMetrics>,
}

impl MemoryLayer {
    /// A layer charging `gate.budget`.
    pub fn new(gate: MemoryGate) -> Self {
        Self(Arc::new(gate))
    }
}

/// The body's next frame.
async fn next_frame(body: &mut Body) -> Option<Result<Frame<Bytes>, tonic::Status>> {
    std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
}

/// The body's next frame, or the DEADLINE_EXCEEDED of a body that sent nothing for
/// `--recv-timeout` (counted as a receive stall).
async fn next_frame_within(
    body: &mut Body,
    gate: &MemoryGate,
    by: ReadBy,
) -> Option<Result<Frame<Bytes>, tonic::Status>> {
    let idle = Instant::now() + gate.recv_timeout;
    match tokio::time::timeout_at(idle.min(by.at), next_frame(body)).await {
        Ok(next) => next,
        // The message's rate bound, not the receive timer, ran out. (For the prefix the two
        // differ by microseconds: a body that sends nothing is a stall.)
        Err(_) if by.len > 0 && by.at < idle => {
            gate.metrics.recv_stalls.fetch_add(1, Ordering::Relaxed);
            Some(Err(admission_status(&AdmissionError::RecvTooSlow {
                len: by.len,
                within: by.within,
                rate: gate.min_body_rate,
            })))
        }
        Err(_) => Some(Err(gate.recv_stalled())),
    }
}

/// When what the gate reads of a heavy call must have arrived: its prefix within
/// `--recv-timeout` of the call's start, its whole message `--min-body-rate` later than that.
#[derive(Clone, Copy, Debug)]
struct ReadBy {
    at: Instant,
    /// The message's declared length (0 while the prefix is read).
    len: u64,
    /// From the call's start to `at`.
    within: Duration,
}

impl ReadBy {
    /// The bound of the prefix, for a call starting now.
    fn prefix(recv_timeout: Duration) -> Self {
        Self {
            at: Instant::now() + recv_timeout,
            len: 0,
            within: recv_timeout,
        }
    }

    /// The bound of a whole message of `len` bytes of the same call, at `rate` bytes per
    /// second (at least 1: the flag's parser refuses less).
    fn message(self, len: u64, rate: u64) -> Self {
        let more = Duration::from_secs_f64(len as f64 / rate.max(1) as f64);
        Self {
            at: self.at + more,
            len,
            within: self.within + more,
        }
    }
}

/// Reads body frames until the 5-byte prefix is known; returns the frames read (to replay)
/// and the declared message length (`None` when the body ended first).
async fn read_prefix(
    body: &mut Body,
    gate: &MemoryGate,
    by: ReadBy,
) -> Result<(Vec<Bytes>, Option<u64>), tonic::Status> {
    let mut frames = Vec::new();
    let mut prefix = Vec::with_capacity(5);
    while prefix.len() < 5 {
        match next_frame_within(body, gate, by).await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let need = 5 - prefix.len();
                    prefix.extend_from_slice(&data.chunk()[..need.min(data.len())]);
                    frames.push(data.clone());
                }
                // Trailers before any data: nothing to peek; replaying them is not needed
                // for a gRPC request, which never carries request trailers.
            }
            Some(Err(status)) => return Err(status),
            None => return Ok((frames, None)),
        }
    }
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]);
    Ok((frames, Some(u64::from(len))))
}

pin_project_lite::pin_project! {
    /// The request body with the frames already read put back in front. With `one_message`
    /// (a unary call whose message is all in `frames`), more data after them is refused
    /// (INVALID_ARGUMENT) rather than passed on: tonic would decode and drop further messages,
    /// none of them charged to the budget. Every message's length prefix is checked against
    /// the size limit as it passes (`sizes`), so a later message of an import that is too
    /// large gets the same RESOURCE_EXHAUSTED as a first one, before tonic buffers it.
    ///
    /// Two more refusals that tonic would otherwise answer INTERNAL ("Missing request
    /// message", "Unexpected EOF decoding stream"): a body that ends inside a message, and,
    /// with `needs_message` (every method but the client-streaming ones), one that ends
    /// without any message; both INVALID_ARGUMENT. And a body that sends nothing for
    /// `recv_timeout` while it is being read ends the call DEADLINE_EXCEEDED: the timer runs
    /// only while the reader waits on the body (`idle`), not while the handler works.
    struct Replay {
        frames: std::collections::VecDeque<Bytes>,
        one_message: bool,
        needs_message: bool,
        sizes: MessageSizes,
        recv_timeout: Option<Duration>,
        metrics: Arc<AdmissionMetrics>,
        idle: Option<Pin<Box<tokio::time::Sleep>>>,
        done: bool,
        #[pin]
        rest: Body,
    }
}

/// Why a unary call with more than its one message is refused, wherever the extra bytes are
/// found (in the message's own frame or a later one).
const ONE_MESSAGE: &str = "a unary call carries one message; more data followed it";

/// Why a body that ended inside a message is refused (its prefix announced more bytes).
const TRUNCATED: &str =
    "the body ended inside a message (fewer bytes than its length prefix announced)";

/// Why a unary call whose body ended without a message is refused.
const NO_MESSAGE: &str = "the call carries no request message";

/// The refusal of a body that sent nothing for `after` (`--recv-timeout`), counted: the same
/// whether the gate or the handler was reading it.
fn recv_stalled(metrics: &AdmissionMetrics, after: Duration) -> tonic::Status {
    metrics.recv_stalls.fetch_add(1, Ordering::Relaxed);
    admission_status(&AdmissionError::RecvStalled { after })
}

/// Follows the 5-byte length prefixes of a gRPC request body across its frames.
#[derive(Debug)]
struct MessageSizes {
    limit: u64,
    light: bool,
    prefix: [u8; 5],
    have: usize,
    remaining: u64,
    /// Messages whose prefix has passed.
    messages: u64,
}

impl MessageSizes {
    /// `light`: `limit` is a light method's ([`LIGHT_MAX_MESSAGE_BYTES`]), and its refusal
    /// says so.
    fn new(limit: u64, light: bool) -> Self {
        Self {
            limit,
            light,
            prefix: [0; 5],
            have: 0,
            remaining: 0,
            messages: 0,
        }
    }

    /// At the end of the body: why it is not a whole number of messages (at least one when
    /// `needs_message`), if it is not.
    fn cut_short(&self, needs_message: bool) -> Option<&'static str> {
        if self.have > 0 || self.remaining > 0 {
            Some(TRUNCATED)
        } else if needs_message && self.messages == 0 {
            Some(NO_MESSAGE)
        } else {
            None
        }
    }

    /// Passes `data` on, or the refusal (counted) of the first message in it that is over the
    /// limit.
    fn check(
        &mut self,
        data: Bytes,
        metrics: &AdmissionMetrics,
    ) -> Result<Frame<Bytes>, tonic::Status> {
        let mut rest = &data[..];
        while !rest.is_empty() {
            if self.remaining > 0 {
                let take = rest
                    .len()
                    .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                self.remaining -= take as u64;
                rest = &rest[take..];
                continue;
            }
            let take = rest.len().min(5 - self.have);
            self.prefix[self.have..self.have + take].copy_from_slice(&rest[..take]);
            self.have += take;
            rest = &rest[take..];
            if self.have == 5 {
                self.have = 0;
                self.messages += 1;
                let [_, a, b, c, d] = self.prefix;
                let len = u64::from(u32::from_be_bytes([a, b, c, d]));
                if len > self.limit {
                    metrics.shed_too_large.fetch_add(1, Ordering::Relaxed);
                    let limit = self.limit;
                    return Err(admission_status(&if self.light {
                        AdmissionError::LightMessageTooLarge { len, limit }
                    } else {
                        AdmissionError::MessageTooLarge { len, limit }
                    }));
                }
                self.remaining = len;
            }
        }
        Ok(Frame::data(data))
    }
}

impl http_body::Body for Replay {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        if let Some(data) = this.frames.pop_front() {
            return Poll::Ready(Some(this.sizes.check(data, this.metrics)));
        }
        let polled = this.rest.poll_frame(cx);
        if polled.is_pending() {
            let Some(after) = *this.recv_timeout else {
                return Poll::Pending;
            };
            let idle = this
                .idle
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(after)));
            if idle.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            *this.done = true;
            return Poll::Ready(Some(Err(recv_stalled(this.metrics, after))));
        }
        *this.idle = None;
        match polled {
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(match frame.into_data() {
                Ok(data) if *this.one_message && !data.is_empty() => {
                    Err(admission_status(&AdmissionError::Malformed {
                        reason: ONE_MESSAGE,
                    }))
                }
                Ok(data) => this.sizes.check(data, this.metrics),
                // Trailers.
                Err(frame) => Ok(frame),
            })),
            Poll::Ready(None) => {
                *this.done = true;
                Poll::Ready(
                    this.sizes
                        .cut_short(*this.needs_message)
                        .map(|reason| Err(admission_status(&AdmissionError::Malformed { reason }))),
                )
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
            || self.frames.is_empty()
                && self.rest.is_end_stream()
                && self.sizes.cut_short(self.needs_message).is_none()
    }
}

/// Where a heavy unary request keeps its repeated elements: the path of field numbers to the
/// repeated message field, and a repeated string field inside each element, if any. `None`
/// for the client-streaming imports, whose messages hold one entry or play each.
fn element_shape(path: &str) -> Option<(&'static [u64], Option<u64>)> {
    let method = path.strip_prefix("/spotifai.insight.v1.InsightService/")?;
    match method {
        // SummarizeFeedbackRequest.entries (1) → FeedbackBatch.entries (1).
        "SummarizeFeedback" | "StreamFeedbackSummary" | "SubmitSummaryJob" => Some((&[1, 1], None)),
        // AnalyzeMusicRequest.history (1) → ListeningHistory.plays (1), each with genres (4).
        "AnalyzeMusic" => Some((&[1, 1], Some(4))),
        _ => None,
    }
}

/// Reads the rest of the first message (`5 + by.len` bytes with its prefix, from the frames
/// already read and then the body) into one buffer. The bytes after it, if any arrived in the
/// same frame, are returned too.
async fn read_message(
    frames: Vec<Bytes>,
    body: &mut Body,
    gate: &MemoryGate,
    by: ReadBy,
) -> Result<(Bytes, Bytes), tonic::Status> {
    let total = usize::try_from(by.len).map_or(usize::MAX, |len| len.saturating_add(5));
    let mut message = bytes::BytesMut::with_capacity(total);
    let extend = |data: &Bytes, message: &mut bytes::BytesMut| {
        let take = data.len().min(total - message.len());
        message.extend_from_slice(&data[..take]);
        data.slice(take..)
    };
    let mut after = Bytes::new();
    for frame in &frames {
        after = extend(frame, &mut message);
    }
    drop(frames);
    while message.len() < total {
        match next_frame_within(body, gate, by).await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    after = extend(data, &mut message);
                }
            }
            Some(Err(status)) => return Err(status),
            // Cut short: the caller refuses the truncated message.
            None => break,
        }
    }
    Ok((message.freeze(), after))
}

impl MemoryGate {
    /// `rest` of a call to `path` with `frames` put back in front, its message sizes checked
    /// (see [`Replay`]). What the method is decides the rest: all but the client-streaming
    /// ones take exactly one message; a light one's messages are held to
    /// [`LIGHT_MAX_MESSAGE_BYTES`], and a light streaming one (server reflection, which tools
    /// keep open between requests) has no receive timer: it holds no slot and no budget
    /// while idle.
    fn replay(&self, path: &str, frames: Vec<Bytes>, one_message: bool, rest: Body) -> Body {
        let needs_message = !is_client_streaming(path);
        let light = !is_heavy(path);
        let limit = if light {
            self.max_message_size.min(LIGHT_MAX_MESSAGE_BYTES)
        } else {
            self.max_message_size
        };
        Body::new(Replay {
            frames: frames.into(),
            one_message,
            needs_message,
            sizes: MessageSizes::new(limit, light),
            recv_timeout: (needs_message || !light).then_some(self.recv_timeout),
            metrics: self.metrics.clone(),
            idle: None,
            done: false,
            rest,
        })
    }

    /// `bytes` from the budget for a call that already holds `held`, or the (counted) refusal:
    /// one that says the call can never be admitted when both together exceed the whole
    /// budget, since a retry needs them at once.
    fn reserve(&self, held: u64, bytes: u64) -> Result<super::budget::Reservation, AdmissionError> {
        self.budget.try_reserve(bytes).map_err(|refused| {
            self.metrics.shed_memory.fetch_add(1, Ordering::Relaxed);
            refused.beside(held)
        })
    }

    /// The refusal of a body that sent nothing for `--recv-timeout`, counted.
    fn recv_stalled(&self) -> tonic::Status {
        recv_stalled(&self.metrics, self.recv_timeout)
    }

    /// The second phase of admission for a unary heavy call, once the first reservation is
    /// held: reads its message (which that reservation covers), counts its repeated elements
    /// without decoding it, and reserves what they cost beyond what was charged from the
    /// prefix. Returns the body to hand on and the extra reservation, or the refusal.
    async fn count_and_charge(
        &self,
        path: &str,
        shape: (&'static [u64], Option<u64>),
        frames: Vec<Bytes>,
        mut body: Body,
        held: u64,
        by: ReadBy,
    ) -> Result<(Body, Option<super::budget::Reservation>), Response<Body>> {
        let len = by.len;
        let (message, after) = read_message(frames, &mut body, self, by)
            .await
            .map_err(tonic::Status::into_http)?;
        if !after.is_empty() {
            return Err(refuse(AdmissionError::Malformed {
                reason: ONE_MESSAGE,
            }));
        }
        if message.len() as u64 != len + 5 {
            return Err(refuse(AdmissionError::Malformed { reason: TRUNCATED }));
        }
        // A compressed message (flag byte 1) is not protobuf until inflated, and this server
        // accepts no compression: tonic answers it as the gRPC compression spec says
        // (UNIMPLEMENTED naming the encodings accepted when `grpc-encoding` names another;
        // INTERNAL, as the spec requires, for the flag without any), which is what the caller
        // needs to hear, not "not a valid protobuf message".
        if message[0] != 0 {
            return Ok((self.replay(path, vec![message], true, body), None));
        }
        let (fields, inner) = shape;
        let counted = super::wire::count(&message[5..], fields, inner)
            .ok_or(AdmissionError::Malformed {
                reason: "not a valid protobuf message",
            })
            .map_err(refuse)?;
        let extra = counted_elements_bytes(counted.elements as u64, counted.total_inner as u64)
            .saturating_sub(charged_elements_bytes(len, &self.estimator));
        let more = if extra > 0 {
            Some(self.reserve(held, extra).map_err(refuse)?)
        } else {
            None
        };
        Ok((self.replay(path, vec![message], true, body), more))
    }
}

impl Gate for MemoryGate {
    // Light calls pass too, at once (nothing reserved), only to have their messages' sizes
    // checked as they arrive: against LIGHT_MAX_MESSAGE_BYTES, since they take no slot and
    // no budget, with the same RESOURCE_EXHAUSTED (MESSAGE_TOO_LARGE) as a heavy call's.
    const HEAVY_ONLY: bool = false;

    fn admit<S>(
        self: Arc<Self>,
        mut inner: S,
        req: Request<Body>,
    ) -> BoxFuture<Result<Response<Body>, S::Error>>
    where
        S: Service<Request<Body>, Response = Response<Body>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Send + 'static,
    {
        if !is_heavy(req.uri().path()) {
            let path = req.uri().path().to_owned();
            let req = req.map(|rest| self.replay(&path, Vec::new(), false, rest));
            return Box::pin(inner.call(req));
        }
        Box::pin(async move {
            let (mut parts, mut body) = req.into_parts();
            let by = ReadBy::prefix(self.recv_timeout);
            let (frames, len) = match read_prefix(&mut body, &self, by).await {
                Ok(read) => read,
                Err(status) => return Ok(status.into_http()),
            };
            let path = parts.uri.path();
            let Some(len) = len else {
                if !is_client_streaming(path) {
                    return Ok(refuse(AdmissionError::Malformed { reason: NO_MESSAGE }));
                }
                // An import of nothing: nothing to buffer or charge.
                let body = self.replay(path, frames, false, body);
                return inner.call(Request::from_parts(parts, body)).await;
            };
            if len > self.max_message_size {
                self.metrics.shed_too_large.fetch_add(1, Ordering::Relaxed);
                return Ok(refuse(AdmissionError::MessageTooLarge {
                    len,
                    limit: self.max_message_size,
                }));
            }
            let shape = element_shape(path);
            // A unary call is charged from its length; an import (client streaming, no
            // shape) for what any stream of messages up to the size limit holds at once.
            let wanted = match shape {
                Some(_) => estimate(len, &self.estimator),
                None => import_estimate(self.max_message_size),
            };
            let reservation = match self.reserve(0, wanted) {
                Ok(reservation) => reservation,
                Err(refused) => return Ok(refuse(refused)),
            };
            let (body, more) = match shape {
                None => (self.replay(path, frames, false, body), None),
                Some(shape) => match self
                    .count_and_charge(
                        path,
                        shape,
                        frames,
                        body,
                        wanted,
                        by.message(len, self.min_body_rate),
                    )
                    .await
                {
                    Ok(counted) => counted,
                    Err(refusal) => return Ok(refusal),
                },
            };
            self.metrics.admitted.fetch_add(1, Ordering::Relaxed);
            let more_bytes = more.as_ref().map_or(0, super::budget::Reservation::bytes);
            parts.extensions.insert(Charged(wanted + more_bytes));
            let response = inner.call(Request::from_parts(parts, body)).await?;
            Ok(hold(response, (reservation, more)))
        })
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::collections::VecDeque;

    use tokio_test_support::*;
    use tower::ServiceExt;
    use tower_test::mock;

    use super::*;

    /// Test-only helpers: request bodies made of given frames, and status reading.
    pub(in crate::admission) mod tokio_test_support {
        use super::*;

        /// A body of the given frames; with `then_pending`, one that never ends after them
        /// (a gate that read a request to its end before deciding would wait forever on it).
        pub struct Frames(pub VecDeque<Bytes>, pub bool);

        impl http_body::Body for Frames {
            type Data = Bytes;
            type Error = tonic::Status;
            fn poll_frame(
                mut self: Pin<&mut Self>,
                _cx: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
                match (self.0.pop_front(), self.1) {
                    (Some(data), _) => Poll::Ready(Some(Ok(Frame::data(data)))),
                    (None, false) => Poll::Ready(None),
                    (None, true) => Poll::Pending,
                }
            }
        }

        /// A gRPC request to `method` whose body is one message of `len` bytes, sent as the
        /// given split of frames (first frame 2 bytes, to exercise prefix reassembly).
        pub fn request(method: &str, len: u32) -> Request<Body> {
            let mut message = vec![0u8];
            message.extend_from_slice(&len.to_be_bytes());
            message.extend(wire_filler(len as usize));
            let bytes = Bytes::from(message);
            let frames = VecDeque::from([bytes.slice(..2), bytes.slice(2..)]);
            Request::builder()
                .uri(format!("/spotifai.insight.v1.InsightService/{method}"))
                .body(Body::new(Frames(frames, false)))
                .unwrap()
        }

        /// `len` bytes of valid protobuf (one unknown length-delimited field, number 15),
        /// which the memory gate can count; below 3 bytes, filler it never has to read.
        pub fn wire_filler(len: usize) -> Vec<u8> {
            for payload in (0..len).rev() {
                let mut out = vec![0x7a];
                prost::encoding::encode_varint(payload as u64, &mut out);
                if out.len() + payload == len {
                    out.resize(len, b'x');
                    return out;
                }
            }
            vec![7; len]
        }

        /// The grpc-status of a trailers-only response (0 when absent: a normal response).
        pub fn grpc_status(response: &Response<Body>) -> i32 {
            response
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        }

        pub fn status(response: Response<Body>) -> tonic::Status {
            tonic::Status::from_header_map(response.headers()).unwrap()
        }

        /// The ErrorInfo reason of a refusal, after checking what every refusal carries:
        /// RESOURCE_EXHAUSTED and a RetryInfo with a delay.
        pub fn refusal_reason(response: Response<Body>) -> String {
            use tonic_types::StatusExt;
            let status = status(response);
            assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
            let details = status.get_error_details();
            assert!(
                details.retry_info().and_then(|r| r.retry_delay).is_some(),
                "no RetryInfo delay: {status:?}"
            );
            details
                .error_info()
                .map(|info| info.reason.clone())
                .unwrap_or_default()
        }

        /// The ErrorInfo reason of a refusal that waiting cannot help: RESOURCE_EXHAUSTED and
        /// no RetryInfo.
        pub fn final_refusal_reason(response: Response<Body>) -> String {
            use tonic_types::StatusExt;
            let status = status(response);
            assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
            let details = status.get_error_details();
            assert!(details.retry_info().is_none(), "RetryInfo: {status:?}");
            details
                .error_info()
                .map(|info| info.reason.clone())
                .unwrap_or_default()
        }

        pub fn ok() -> Response<Body> {
            Response::new(Body::default())
        }

        /// A SummarizeFeedback request that declares a `len`-byte message and sends only
        /// its 5-byte prefix (split 2 + 3) and the message's first bytes.
        pub fn prefix_only(len: u32) -> Request<Body> {
            let mut prefix = vec![0u8];
            prefix.extend_from_slice(&len.to_be_bytes());
            let frames = VecDeque::from([
                Bytes::copy_from_slice(&prefix[..2]),
                Bytes::copy_from_slice(&prefix[2..]),
                Bytes::from_static(b"\x0a\x03abc"),
            ]);
            Request::builder()
                .uri("/spotifai.insight.v1.InsightService/SummarizeFeedback")
                .body(Body::new(Frames(frames, true)))
                .unwrap()
        }

        /// The ErrorInfo reason of an error response, whatever its code.
        pub fn reason(status: &tonic::Status) -> String {
            use tonic_types::StatusExt;
            status
                .get_error_details()
                .error_info()
                .map(|info| info.reason.clone())
                .unwrap_or_default()
        }
    }

    fn metrics() -> Arc<AdmissionMetrics> {
        Arc::new(AdmissionMetrics::default())
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_answers_deadline_exceeded_from_the_callers_grpc_timeout() {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let metrics = metrics();
        let mut service =
            DeadlineLayer::new(Duration::from_secs(120), metrics.clone()).layer(service);
        handle.allow(1);
        let mut req = request("SummarizeFeedback", 10);
        req.headers_mut()
            .insert("grpc-timeout", "250m".parse().unwrap());
        let call = tokio::spawn(service.ready().await.unwrap().call(req));
        // The inner service never answers.
        let _pending = handle.next_request().await.unwrap();
        let start = Instant::now();
        let response = call.await.unwrap().unwrap();
        // 250 ms less the reply margin (a tenth): answered before the caller's own timer.
        assert_eq!(start.elapsed(), Duration::from_millis(225));
        assert_eq!(grpc_status(&response), tonic::Code::DeadlineExceeded as i32);
        assert_eq!(metrics.deadline_exceeded.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_caps_the_caller_by_the_server_maximum() {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let mut service = DeadlineLayer::new(Duration::from_secs(2), metrics()).layer(service);
        handle.allow(1);
        let mut req = request("SummarizeFeedback", 10);
        req.headers_mut()
            .insert("grpc-timeout", "1H".parse().unwrap());
        let call = tokio::spawn(service.ready().await.unwrap().call(req));
        let _pending = handle.next_request().await.unwrap();
        let start = Instant::now();
        let response = call.await.unwrap().unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        assert_eq!(grpc_status(&response), tonic::Code::DeadlineExceeded as i32);
    }

    #[tokio::test]
    async fn shedding_refuses_heavy_calls_only_while_critical() {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let (tx, rx) = watch::channel(Pressure::Elevated);
        let metrics = metrics();
        let mut service = ShedLayer::new(rx, metrics.clone()).layer(service);
        handle.allow(10);
        // Elevated: admitted (work is made cheaper elsewhere, not refused).
        let call = tokio::spawn(
            service
                .ready()
                .await
                .unwrap()
                .call(request("SummarizeFeedback", 1)),
        );
        handle.next_request().await.unwrap().1.send_response(ok());
        assert_eq!(grpc_status(&call.await.unwrap().unwrap()), 0);

        tx.send_replace(Pressure::Critical);
        let refused = service
            .ready()
            .await
            .unwrap()
            .call(request("SummarizeFeedback", 1))
            .await
            .unwrap();
        assert_eq!(refusal_reason(refused), "MEMORY_PRESSURE");
        assert_eq!(metrics.shed_pressure.load(Ordering::Relaxed), 1);

        // Cheap reads still pass while critical.
        let call = tokio::spawn(service.ready().await.unwrap().call(request("GetJob", 1)));
        handle.next_request().await.unwrap().1.send_response(ok());
        assert_eq!(grpc_status(&call.await.unwrap().unwrap()), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_admits_max_queues_depth_and_refuses_the_excess() {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let metrics = metrics();
        let limiter = Limiter::new(2, 1, Duration::from_secs(5), metrics.clone());
        let service = ConcurrencyLayer::new(limiter.clone()).layer(service);
        handle.allow(100);
        let mut calls = Vec::new();
        for _ in 0..3 {
            let mut svc = service.clone();
            calls.push(tokio::spawn(async move {
                svc.ready()
                    .await
                    .unwrap()
                    .call(request("SummarizeFeedback", 1))
                    .await
            }));
        }
        tokio::task::yield_now().await;
        let first = handle.next_request().await.unwrap();
        let second = handle.next_request().await.unwrap();
        assert_eq!(limiter.in_use(), 2);
        // The fourth: two running, one queued, queue depth 1 → refused at once.
        let mut svc = service.clone();
        let refused = svc
            .ready()
            .await
            .unwrap()
            .call(request("SummarizeFeedback", 1))
            .await
            .unwrap();
        assert_eq!(refusal_reason(refused), "CONCURRENCY_LIMIT");

        // Finishing one call (and dropping its response body) lets the queued one in.
        first.1.send_response(ok());
        drop(calls.remove(0).await.unwrap().unwrap());
        let third = handle.next_request().await.unwrap();
        second.1.send_response(ok());
        third.1.send_response(ok());
        for call in calls {
            assert_eq!(grpc_status(&call.await.unwrap().unwrap()), 0);
        }
        assert_eq!(metrics.shed_concurrency.load(Ordering::Relaxed), 1);
        assert_eq!(metrics.queue_waits.load(Ordering::Relaxed), 1);

        // Light calls are never limited.
        let light = tokio::spawn(service.clone().oneshot(request("GetJob", 1)));
        handle.next_request().await.unwrap().1.send_response(ok());
        assert_eq!(grpc_status(&light.await.unwrap().unwrap()), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_call_is_shed_when_pressure_turned_critical_while_it_waited() {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let (tx, rx) = watch::channel(Pressure::Normal);
        let metrics = metrics();
        let limiter = Limiter::with_pressure(1, 4, Duration::from_secs(5), metrics.clone(), rx);
        let service = ConcurrencyLayer::new(limiter.clone()).layer(service);
        handle.allow(10);
        let running = tokio::spawn(service.clone().oneshot(request("SummarizeFeedback", 1)));
        let held = handle.next_request().await.unwrap();
        let queued: Vec<_> = (0..2)
            .map(|_| tokio::spawn(service.clone().oneshot(request("SummarizeFeedback", 1))))
            .collect();
        tokio::task::yield_now().await;
        tx.send_replace(Pressure::Critical);
        held.1.send_response(ok());
        drop(running.await.unwrap().unwrap());
        // Both refused as the shed layer would refuse them now; neither reached the service
        // (which would leave them waiting for its answer: a timeout, not a hang, says so).
        for call in queued {
            let answer = tokio::time::timeout(Duration::from_secs(1), call)
                .await
                .expect("a queued call was admitted under Critical pressure");
            assert_eq!(refusal_reason(answer.unwrap().unwrap()), "MEMORY_PRESSURE");
        }
        assert_eq!(metrics.shed_pressure.load(Ordering::Relaxed), 2);
        assert_eq!(metrics.shed_concurrency.load(Ordering::Relaxed), 0);
        assert_eq!(limiter.in_use(), 0);

        // A caller that gets its slot at once passed the shed layer just now: admitted.
        tx.send_replace(Pressure::Normal);
        let call = tokio::spawn(service.clone().oneshot(request("SummarizeFeedback", 1)));
        handle.next_request().await.unwrap().1.send_response(ok());
        assert_eq!(grpc_status(&call.await.unwrap().unwrap()), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_call_times_out_with_resource_exhausted() {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let limiter = Limiter::new(1, 4, Duration::from_millis(300), metrics());
        let service = ConcurrencyLayer::new(limiter).layer(service);
        handle.allow(10);
        let running = tokio::spawn(service.clone().oneshot(request("SummarizeFeedback", 1)));
        let _held = handle.next_request().await.unwrap();
        let start = Instant::now();
        let queued = service
            .clone()
            .oneshot(request("SummarizeFeedback", 1))
            .await
            .unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(300));
        assert_eq!(refusal_reason(queued), "QUEUE_TIMEOUT");
        running.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_would_only_time_out_in_the_queue_is_refused_at_once() {
        let limiter = Limiter::new(1, 8, Duration::from_secs(2), metrics());
        // Before any call finished, the hold time is unknown: callers queue up to the depth.
        let first = limiter.acquire().await.unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        drop(first);
        // Calls hold their slot ~1 s: the 1st and 2nd in the queue get one within 2 s.
        let _running = limiter.acquire().await.unwrap();
        let waiting: Vec<_> = (0..2)
            .map(|_| {
                let limiter = limiter.clone();
                tokio::spawn(async move { limiter.acquire().await.map(drop) })
            })
            .collect();
        tokio::task::yield_now().await;
        let start = Instant::now();
        let third = limiter.acquire().await;
        assert!(
            matches!(third, Err(AdmissionError::QueueFull { .. })),
            "{third:?}"
        );
        assert_eq!(start.elapsed(), Duration::ZERO, "refused without waiting");
        for call in waiting {
            call.abort();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_gives_up_while_queued_leaves_the_queue() {
        let limiter = Limiter::new(1, 1, Duration::from_secs(30), metrics());
        let running = limiter.acquire().await.unwrap();
        // Queued callers whose deadline passes while they wait (the deadline layer drops
        // their future), more of them than the queue is deep.
        for _ in 0..3 {
            let gave_up = tokio::time::timeout(Duration::from_millis(100), limiter.acquire()).await;
            assert!(gave_up.is_err(), "still queued when its deadline passed");
        }
        assert_eq!(limiter.queued.load(Ordering::Acquire), 0);
        // Their waits are in the queue-wait metrics.
        assert_eq!(limiter.metrics.queue_waits.load(Ordering::Relaxed), 3);
        assert_eq!(
            limiter.metrics.queue_wait_us_max.load(Ordering::Relaxed),
            100_000
        );
        // The queue's one place is free again: the next caller waits for the slot and gets it.
        let next = tokio::spawn({
            let limiter = limiter.clone();
            async move { limiter.acquire().await.map(drop) }
        });
        tokio::task::yield_now().await;
        assert_eq!(limiter.queued.load(Ordering::Acquire), 1);
        drop(running);
        assert!(matches!(next.await, Ok(Ok(()))));
        assert_eq!(limiter.queued.load(Ordering::Acquire), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_imports_long_hold_does_not_make_queued_calls_hopeless() {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let limiter = Limiter::new(1, 8, Duration::from_secs(2), metrics());
        let service = ConcurrencyLayer::new(limiter.clone()).layer(service);
        handle.allow(10);
        // An import streams for a minute, then ends.
        let import = tokio::spawn(service.clone().oneshot(request("ImportFeedback", 1)));
        let (_req, respond) = handle.next_request().await.unwrap();
        tokio::time::advance(Duration::from_secs(60)).await;
        respond.send_response(ok());
        drop(import.await.unwrap().unwrap());
        // A summary holds the slot; the next one queues (its wait is unknown, not a minute)
        // and gets the slot when the summary ends.
        let running = tokio::spawn(service.clone().oneshot(request("SummarizeFeedback", 1)));
        let (_req, respond) = handle.next_request().await.unwrap();
        let queued = tokio::spawn(service.clone().oneshot(request("SummarizeFeedback", 1)));
        tokio::task::yield_now().await;
        assert_eq!(
            limiter.queued.load(Ordering::Acquire),
            1,
            "queued, not refused"
        );
        tokio::time::advance(Duration::from_millis(100)).await;
        respond.send_response(ok());
        drop(running.await.unwrap().unwrap());
        // The summary's hold is what the queue predicts from, not the import's minute.
        assert_eq!(limiter.hold_us.load(Ordering::Relaxed), 100_000);
        let (_req, respond) = handle.next_request().await.unwrap();
        respond.send_response(ok());
        assert_eq!(grpc_status(&queued.await.unwrap().unwrap()), 0);
    }

    /// The estimate's inputs in the memory-layer tests.
    const ESTIMATOR: EstimatorConfig = EstimatorConfig {
        max_entries_cap: 10_000,
        map_parallelism: 1,
        prompt_budget_bytes: 1024,
        max_response_bytes: 1024,
    };

    fn memory_layer(
        budget: u64,
        metrics: Arc<AdmissionMetrics>,
    ) -> (MemoryLayer, Arc<MemoryBudget>) {
        memory_layer_at(budget, metrics, crate::admission::MIN_BODY_RATE)
    }

    /// [`memory_layer`] with `--min-body-rate` at `rate`.
    fn memory_layer_at(
        budget: u64,
        metrics: Arc<AdmissionMetrics>,
        rate: u64,
    ) -> (MemoryLayer, Arc<MemoryBudget>) {
        let budget = MemoryBudget::new(budget);
        let layer = MemoryLayer::new(MemoryGate {
            budget: budget.clone(),
            estimator: ESTIMATOR,
            max_message_size: 4 << 20,
            recv_timeout: Duration::from_secs(10),
            min_body_rate: rate,
            metrics,
        });
        (layer, budget)
    }

    #[tokio::test]
    async fn memory_admission_reserves_from_the_prefix_and_replays_the_body() {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let metrics = metrics();
        let (layer, budget) = memory_layer(64 << 20, metrics.clone());
        let service = layer.layer(service);
        handle.allow(10);
        let call = tokio::spawn(service.clone().oneshot(request("SummarizeFeedback", 1000)));
        let (req, respond) = handle.next_request().await.unwrap();
        let expected = estimate(1000, &ESTIMATOR);
        assert_eq!(
            budget.in_use(),
            expected,
            "reserved before the handler runs"
        );
        // The handler sees the whole message, prefix included, byte for byte.
        let mut body = req.into_body();
        let mut seen = Vec::new();
        while let Some(frame) = next_frame(&mut body).await {
            seen.extend_from_slice(frame.unwrap().data_ref().unwrap());
        }
        assert_eq!(seen.len(), 1005);
        assert_eq!(&seen[..5], &[0, 0, 0, 3, 232]);
        // A response that still has a message to stream (tonic drops bodies that are
        // already at their end, and with them the guard: that call is over anyway).
        let streaming = Response::new(Body::new(Frames(
            VecDeque::from([Bytes::from_static(b"x")]),
            false,
        )));
        respond.send_response(streaming);
        let response = call.await.unwrap().unwrap();
        assert_eq!(
            budget.in_use(),
            expected,
            "held while the response body lives"
        );
        drop(response);
        assert_eq!(budget.in_use(), 0, "released when the call ends");
        assert_eq!(metrics.admitted.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn memory_admission_refuses_with_retry_info_before_reading_the_body() {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let metrics = metrics();
        let (layer, budget) = memory_layer(32 << 20, metrics.clone());
        let service = layer.layer(service);
        handle.allow(10);
        // The 600 kB message's estimate fits the whole budget, not what other calls left.
        let wanted = estimate(600_000, &ESTIMATOR);
        assert!(wanted < 32 << 20);
        let held = budget.try_reserve((32 << 20) - wanted + 1).unwrap();
        // Only the prefix and a few bytes of the message ever arrive: the refusal cannot have
        // waited for the rest.
        let refused = tokio::time::timeout(
            Duration::from_secs(5),
            service.clone().oneshot(prefix_only(600_000)),
        )
        .await
        .expect("refused from the prefix, without reading the body")
        .unwrap();
        assert_eq!(refusal_reason(refused), "MEMORY_BUDGET");
        assert_eq!(budget.in_use(), held.bytes());
        assert_eq!(metrics.shed_memory.load(Ordering::Relaxed), 1);
        // More than the whole budget: refused too, without a delay to wait for.
        let (small, budget) = memory_layer(1 << 20, metrics.clone());
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let service = small.layer(service);
        handle.allow(10);
        let refused = service.oneshot(prefix_only(600_000)).await.unwrap();
        assert_eq!(final_refusal_reason(refused), "MEMORY_BUDGET");
        assert_eq!(budget.in_use(), 0);
        assert_eq!(metrics.shed_memory.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn oversized_messages_are_refused_from_their_prefix() {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let metrics = metrics();
        let (layer, budget) = memory_layer(1 << 40, metrics.clone());
        let service = layer.layer(service);
        handle.allow(10);
        // Declares 5 MiB, sends the prefix and a few bytes, then nothing: refused without
        // waiting for the rest.
        let response = tokio::time::timeout(
            Duration::from_secs(5),
            service.oneshot(prefix_only(5 << 20)),
        )
        .await
        .expect("refused from the prefix, without reading the body")
        .unwrap();
        let status = status(response);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(reason(&status), "MESSAGE_TOO_LARGE");
        assert!(
            status.message().contains("--max-message-size"),
            "{}",
            status.message()
        );
        assert_eq!(metrics.shed_too_large.load(Ordering::Relaxed), 1);
        assert_eq!(metrics.admitted.load(Ordering::Relaxed), 0);
        assert_eq!(budget.in_use(), 0);
    }

    /// A SummarizeFeedback request whose body is `message` with its prefix, then `more` in
    /// the same frame and `later` in a frame of its own.
    fn unary_with(message: &[u8], more: &[u8], later: &[u8]) -> Request<Body> {
        let mut framed = vec![0u8];
        framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
        framed.extend_from_slice(message);
        framed.extend_from_slice(more);
        let frames = VecDeque::from([Bytes::from(framed), Bytes::copy_from_slice(later)]);
        Request::builder()
            .uri("/spotifai.insight.v1.InsightService/SummarizeFeedback")
            .body(Body::new(Frames(frames, false)))
            .unwrap()
    }

    fn unary(message: &[u8], more: &[u8]) -> Request<Body> {
        unary_with(message, more, b"")
    }

    /// `input.entries` holding `n` empty entries: 2 bytes each on the wire, 128 decoded.
    fn empty_entries(n: usize) -> Vec<u8> {
        let batch = [0x0a, 0x00].repeat(n);
        let mut message = vec![0x0a];
        prost::encoding::encode_varint(batch.len() as u64, &mut message);
        message.extend_from_slice(&batch);
        message
    }

    #[tokio::test]
    async fn elements_are_counted_before_decoding_and_charged_uncapped() {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let metrics = metrics();
        // The prefix estimate of a 200 kB message (5.8 MB) fits 32 MiB; 100,000 entries
        // (51 MB at 512 B each) do not.
        let (layer, budget) = memory_layer(32 << 20, metrics.clone());
        let service = layer.layer(service);
        handle.allow(10);
        let refused = service
            .clone()
            .oneshot(unary(&empty_entries(100_000), b""))
            .await
            .unwrap();
        assert_eq!(final_refusal_reason(refused), "MEMORY_BUDGET");
        assert_eq!(budget.in_use(), 0, "both reservations given back");
        assert_eq!(metrics.shed_memory.load(Ordering::Relaxed), 1);
        // 70,000: what their count adds fits the budget alone, but not beside the first
        // charge, which the call holds meanwhile: it can never be admitted either.
        let message = empty_entries(70_000);
        let len = message.len() as u64;
        let counted = counted_elements_bytes(70_000, 0) - charged_elements_bytes(len, &ESTIMATOR);
        assert!(counted < 32 << 20 && counted + estimate(len, &ESTIMATOR) > 32 << 20);
        let refused = service.clone().oneshot(unary(&message, b"")).await.unwrap();
        assert_eq!(final_refusal_reason(refused), "MEMORY_BUDGET");
        assert_eq!(budget.in_use(), 0);

        // 20,000 fit: charged the phase-one estimate plus what their count adds.
        let message = empty_entries(20_000);
        let call = tokio::spawn(service.clone().oneshot(unary(&message, b"")));
        let (_req, respond) = handle.next_request().await.unwrap();
        let len = message.len() as u64;
        let counted = counted_elements_bytes(20_000, 0) - charged_elements_bytes(len, &ESTIMATOR);
        assert_eq!(budget.in_use(), estimate(len, &ESTIMATOR) + counted);
        respond.send_response(ok());
        drop(call.await.unwrap().unwrap());
        assert_eq!(budget.in_use(), 0);
    }

    #[tokio::test]
    async fn an_import_is_charged_for_a_whole_stream_not_its_first_message() {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let (layer, budget) = memory_layer(64 << 20, metrics());
        let service = layer.layer(service);
        handle.allow(1);
        let mut req = unary(&empty_entries(1), b"");
        *req.uri_mut() = "/spotifai.insight.v1.InsightService/ImportFeedback"
            .parse()
            .unwrap();
        let call = tokio::spawn(service.oneshot(req));
        let (_req, respond) = handle.next_request().await.unwrap();
        assert_eq!(budget.in_use(), import_estimate(4 << 20));
        respond.send_response(ok());
        drop(call.await.unwrap().unwrap());
        assert_eq!(budget.in_use(), 0);
    }

    #[tokio::test]
    async fn a_later_message_over_the_size_limit_is_refused_like_a_first_one() {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let metrics = metrics();
        let (layer, _budget) = memory_layer(64 << 20, metrics.clone());
        let service = layer.layer(service);
        handle.allow(1);
        // An import: one small entry, then a message announcing 5 MiB, split mid-prefix.
        let huge = (5u32 << 20).to_be_bytes();
        let mut req = unary_with(
            &empty_entries(1),
            &[0, huge[0], huge[1]],
            &[huge[2], huge[3]],
        );
        *req.uri_mut() = "/spotifai.insight.v1.InsightService/ImportFeedback"
            .parse()
            .unwrap();
        let call = tokio::spawn(service.oneshot(req));
        let (req, respond) = handle.next_request().await.unwrap();
        let mut body = req.into_body();
        let first = next_frame(&mut body).await;
        assert!(first.unwrap().is_ok(), "the first message passes");
        let second = next_frame(&mut body).await;
        let status = second.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        assert_eq!(reason(&status), "MESSAGE_TOO_LARGE");
        assert_eq!(metrics.shed_too_large.load(Ordering::Relaxed), 1, "counted");
        respond.send_response(ok());
        drop(call.await.unwrap().unwrap());
    }

    #[tokio::test]
    async fn a_light_call_over_the_size_limit_is_refused_like_a_heavy_one() {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let (layer, budget) = memory_layer(64 << 20, metrics());
        let service = layer.layer(service);
        handle.allow(1);
        let mut req = prefix_only(5 << 20);
        *req.uri_mut() = "/spotifai.insight.v1.InsightService/GetJob"
            .parse()
            .unwrap();
        let call = tokio::spawn(service.oneshot(req));
        // Passed on at once (nothing reserved for a light call), its body checked as read
        // (against the light limit, which is far lower than --max-message-size).
        let (req, respond) = handle.next_request().await.unwrap();
        assert_eq!(budget.in_use(), 0);
        let mut body = req.into_body();
        let mut frames = Vec::new();
        loop {
            match next_frame(&mut body).await {
                Some(Ok(_)) => frames.push(()),
                Some(Err(status)) => {
                    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                    assert_eq!(reason(&status), "MESSAGE_TOO_LARGE");
                    break;
                }
                None => panic!("the oversized message was passed on"),
            }
        }
        assert_eq!(
            frames.len(),
            1,
            "the prefix's first two bytes, then the refusal"
        );
        respond.send_response(ok());
        drop(call.await.unwrap().unwrap());
    }

    #[tokio::test]
    async fn a_unary_call_with_more_than_one_message_or_no_protobuf_is_invalid() {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let (layer, budget) = memory_layer(64 << 20, metrics());
        let service = layer.layer(service);
        handle.allow(10);
        let second = [0u8, 0, 0, 0, 2, 0x78, 0x00];
        for (request, what) in [
            (unary(&empty_entries(3), &second), "a second message"),
            (
                unary(&[0x0a, 0x09, 0x0a], b""),
                "a field longer than the message",
            ),
        ] {
            let status = status(service.clone().oneshot(request).await.unwrap());
            assert_eq!(
                status.code(),
                tonic::Code::InvalidArgument,
                "{what}: {status:?}"
            );
            assert!(
                status.message().starts_with("request:"),
                "{what}: {status:?}"
            );
            assert_eq!(budget.in_use(), 0, "{what}");
        }
        // A second message in a later frame reaches the handler's body as an error, which
        // tonic answers with, instead of a message it would decode and drop.
        let call = tokio::spawn(service.clone().oneshot(unary_with(
            &empty_entries(3),
            b"",
            &second,
        )));
        let (req, respond) = handle.next_request().await.unwrap();
        let mut body = req.into_body();
        let first = next_frame(&mut body).await;
        assert_eq!(
            first.unwrap().unwrap().into_data().unwrap().len(),
            5 + empty_entries(3).len()
        );
        let next = next_frame(&mut body).await;
        let error = next.unwrap().unwrap_err();
        assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error:?}");
        respond.send_response(ok());
        drop(call.await.unwrap().unwrap());
        assert_eq!(budget.in_use(), 0);
    }

    /// A request to `path` whose body is `frames`, then the end (or, with `then_pending`,
    /// nothing more ever).
    fn body_of(path: &str, frames: &[&[u8]], then_pending: bool) -> Request<Body> {
        let frames = frames.iter().map(|f| Bytes::copy_from_slice(f)).collect();
        Request::builder()
            .uri(path)
            .body(Body::new(Frames(frames, then_pending)))
            .unwrap()
    }

    const SUMMARIZE: &str = "/spotifai.insight.v1.InsightService/SummarizeFeedback";
    const GET_JOB: &str = "/spotifai.insight.v1.InsightService/GetJob";
    const IMPORT: &str = "/spotifai.insight.v1.InsightService/ImportFeedback";

    /// What the handler's body yields after its complete messages: `None` at a clean end,
    /// or the error it ends with.
    async fn body_end(mut body: Body) -> Option<tonic::Status> {
        loop {
            match next_frame(&mut body).await {
                Some(Ok(_)) => continue,
                Some(Err(status)) => return Some(status),
                None => return None,
            }
        }
    }

    #[tokio::test]
    async fn empty_and_truncated_bodies_are_invalid_argument_not_internal() {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let (layer, budget) = memory_layer(64 << 20, metrics());
        let service = layer.layer(service);
        handle.allow(10);
        let announced_1000 = [0u8, 0, 0, 0x03, 0xe8];
        // Heavy unary calls: refused by the gate, the handler never runs.
        for (request, reason) in [
            (body_of(SUMMARIZE, &[], false), NO_MESSAGE),
            (
                body_of(SUMMARIZE, &[&announced_1000, b"0123456789"], false),
                TRUNCATED,
            ),
        ] {
            let status = status(service.clone().oneshot(request).await.unwrap());
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
            assert_eq!(status.message(), format!("request: {reason}"));
            assert_eq!(budget.in_use(), 0);
        }
        // Light unary calls and imports: passed on, and the body tells tonic (which would
        // answer INTERNAL for both) what is wrong, after any whole messages.
        for (request, end) in [
            (body_of(GET_JOB, &[], false), Some(NO_MESSAGE)),
            (
                body_of(GET_JOB, &[&announced_1000[..3]], false),
                Some(TRUNCATED),
            ),
            (body_of(GET_JOB, &[&[0, 0, 0, 0, 0]], false), None),
            (body_of(IMPORT, &[], false), None),
            (
                body_of(IMPORT, &[&[0, 0, 0, 0, 0], &announced_1000], false),
                Some(TRUNCATED),
            ),
        ] {
            let path = request.uri().path().to_owned();
            let call = tokio::spawn(service.clone().oneshot(request));
            let (req, respond) = handle.next_request().await.unwrap();
            let status = body_end(req.into_body()).await;
            assert_eq!(
                status.as_ref().map(|s| (s.code(), s.message().to_owned())),
                end.map(|r| (tonic::Code::InvalidArgument, format!("request: {r}"))),
                "{path}"
            );
            respond.send_response(ok());
            drop(call.await.unwrap().unwrap());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stops_sending_is_cut_off_after_the_recv_timeout() {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let metrics = metrics();
        let (layer, budget) = memory_layer(64 << 20, metrics.clone());
        let service = layer.layer(service);
        handle.allow(10);
        let deadline_exceeded = |response: Response<Body>| {
            let status = status(response);
            assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
            assert!(status.message().contains("--recv-timeout"), "{status:?}");
        };
        // Headers only, then nothing: the gate waits for the prefix for 10 s.
        let start = Instant::now();
        deadline_exceeded(
            service
                .clone()
                .oneshot(body_of(SUMMARIZE, &[], true))
                .await
                .unwrap(),
        );
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        // Half a message, then nothing: reserved from the prefix, given back at the cut.
        let start = Instant::now();
        deadline_exceeded(service.clone().oneshot(prefix_only(600)).await.unwrap());
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        assert_eq!(budget.in_use(), 0);
        // A light call whose prefix arrived: its body, read by the handler, is cut the same.
        let partial: &[u8] = &[0, 0, 0, 0, 10, 0x0a, 0x08];
        let call = tokio::spawn(service.clone().oneshot(body_of(GET_JOB, &[partial], true)));
        let (req, respond) = handle.next_request().await.unwrap();
        let start = Instant::now();
        let status = body_end(req.into_body()).await.expect("cut off");
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
        respond.send_response(ok());
        drop(call.await.unwrap().unwrap());
        // An import that sends one message and then nothing; the time the handler spends
        // between reads does not count, only the wait for bytes.
        let message = [0u8, 0, 0, 0, 0];
        let call = tokio::spawn(service.clone().oneshot(body_of(
            IMPORT,
            &[&message, &message],
            true,
        )));
        let (req, respond) = handle.next_request().await.unwrap();
        let mut body = req.into_body();
        assert!(next_frame(&mut body).await.unwrap().is_ok());
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(
            next_frame(&mut body).await.unwrap().is_ok(),
            "60 s of handler work"
        );
        let start = Instant::now();
        let status = body_end(body).await.expect("cut off");
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
        respond.send_response(ok());
        drop(call.await.unwrap().unwrap());
        assert_eq!(metrics.recv_stalls.load(Ordering::Relaxed), 4);
        assert_eq!(budget.in_use(), 0);
    }

    /// A body that sends the first of `frames` at once and each of the others `gap` after the
    /// one before, then ends.
    struct Trickle {
        frames: VecDeque<Bytes>,
        gap: Duration,
        sleep: Option<Pin<Box<tokio::time::Sleep>>>,
        started: bool,
    }

    impl http_body::Body for Trickle {
        type Data = Bytes;
        type Error = tonic::Status;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if !self.started {
                self.started = true;
                return Poll::Ready(self.frames.pop_front().map(|data| Ok(Frame::data(data))));
            }
            let gap = self.gap;
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(gap)));
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.sleep = None;
            Poll::Ready(self.frames.pop_front().map(|data| Ok(Frame::data(data))))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_trickling_in_is_cut_off_once_it_is_slower_than_the_least_rate() {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let metrics = metrics();
        let (layer, budget) = memory_layer(64 << 20, metrics.clone());
        let service = layer.layer(service);
        handle.allow(10);
        // The prefix at once, then the message in pieces of `piece` bytes `gap` apart.
        let trickle = |message: &[u8], piece: usize, gap: Duration| {
            let mut frames: VecDeque<Bytes> = message[5..]
                .chunks(piece)
                .map(Bytes::copy_from_slice)
                .collect();
            frames.push_front(Bytes::copy_from_slice(&message[..5]));
            Request::builder()
                .uri(SUMMARIZE)
                .body(Body::new(Trickle {
                    frames,
                    gap,
                    sleep: None,
                    started: false,
                }))
                .unwrap()
        };
        let mut message = vec![0u8, 0, 0, 0, 100];
        message.extend(wire_filler(100));
        // After the prefix, a byte every 9 s, each inside the 10 s receive timeout: cut when
        // 10 s and the 100 bytes' share of the least rate have passed, not at
        // --request-timeout; the reservation made from the prefix is given back. At the
        // default rate, and at a lower --min-body-rate (1 KiB/s), which gives it longer.
        for (rate, shown) in [
            (crate::admission::MIN_BODY_RATE, "256 KiB per second"),
            (1024, "1 KiB per second"),
        ] {
            let (inner, _handle) = mock::pair::<Request<Body>, Response<Body>>();
            let (layer, budget) = memory_layer_at(64 << 20, metrics.clone(), rate);
            let slow = layer.layer(inner);
            let start = Instant::now();
            let response = tokio::time::timeout(
                Duration::from_secs(60),
                slow.oneshot(trickle(&message, 1, Duration::from_secs(9))),
            )
            .await
            .expect("cut off within a minute, not left to read for 15 minutes")
            .unwrap();
            let cut = status(response);
            assert_eq!(cut.code(), tonic::Code::DeadlineExceeded, "{cut:?}");
            assert!(cut.message().contains("100-byte"), "{cut:?}");
            assert!(cut.message().contains(shown), "{cut:?}");
            let bound = Duration::from_secs(10) + Duration::from_secs_f64(100.0 / rate as f64);
            assert!(
                start.elapsed() >= bound && start.elapsed() < Duration::from_secs(11),
                "{rate}: {:?}",
                start.elapsed()
            );
            assert_eq!(budget.in_use(), 0);
        }
        assert_eq!(metrics.recv_stalls.load(Ordering::Relaxed), 2);
        // The same message in two pieces a second apart passes.
        let call = tokio::spawn(service.clone().oneshot(trickle(
            &message,
            60,
            Duration::from_secs(1),
        )));
        let (_req, respond) = handle.next_request().await.unwrap();
        respond.send_response(ok());
        assert_eq!(call.await.unwrap().unwrap().status(), http::StatusCode::OK);
        assert_eq!(budget.in_use(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn light_calls_are_held_to_a_small_message_and_reflection_streams_may_idle() {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let metrics = metrics();
        let (layer, budget) = memory_layer(64 << 20, metrics.clone());
        let service = layer.layer(service);
        handle.allow(10);
        // Over the light limit, far under --max-message-size: passed on at once (no slot,
        // nothing reserved), refused by the body before tonic buffers more than the prefix.
        let mut req = prefix_only(LIGHT_MAX_MESSAGE_BYTES as u32 + 1);
        *req.uri_mut() = GET_JOB.parse().unwrap();
        let call = tokio::spawn(service.clone().oneshot(req));
        let (req, respond) = handle.next_request().await.unwrap();
        assert_eq!(budget.in_use(), 0);
        let status = body_end(req.into_body()).await.expect("refused");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        assert_eq!(reason(&status), "MESSAGE_TOO_LARGE");
        assert!(status.message().contains("of this method"), "{status:?}");
        respond.send_response(ok());
        drop(call.await.unwrap().unwrap());
        // At the limit: passed whole.
        let call = tokio::spawn(
            service
                .clone()
                .oneshot(request("GetJob", LIGHT_MAX_MESSAGE_BYTES as u32)),
        );
        let (req, respond) = handle.next_request().await.unwrap();
        assert!(body_end(req.into_body()).await.is_none());
        respond.send_response(ok());
        drop(call.await.unwrap().unwrap());
        // A reflection stream whose client sent one request and waits: not cut after
        // --recv-timeout (tools keep it open between requests).
        let reflection = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
        let call = tokio::spawn(service.clone().oneshot(body_of(
            reflection,
            &[&[0, 0, 0, 0, 0]],
            true,
        )));
        let (req, respond) = handle.next_request().await.unwrap();
        let mut body = req.into_body();
        assert!(next_frame(&mut body).await.unwrap().is_ok());
        let idle = tokio::time::timeout(Duration::from_secs(60), next_frame(&mut body)).await;
        assert!(idle.is_err(), "still open after 60 s: {idle:?}");
        respond.send_response(ok());
        drop(call.await.unwrap().unwrap());
        assert_eq!(metrics.recv_stalls.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_cut_off_by_its_deadline_gives_its_memory_back() {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let metrics = metrics();
        let (memory, budget) = memory_layer(64 << 20, metrics.clone());
        let service = DeadlineLayer::new(Duration::from_secs(2), metrics.clone())
            .layer(memory.layer(service));
        handle.allow(1);
        let call = tokio::spawn(service.oneshot(request("SummarizeFeedback", 1000)));
        // Admitted: the handler has the request and the budget is charged.
        let (_req, _never_answered) = handle.next_request().await.unwrap();
        assert!(budget.in_use() > 0);
        let response = call.await.unwrap().unwrap();
        assert_eq!(grpc_status(&response), tonic::Code::DeadlineExceeded as i32);
        assert_eq!(
            budget.in_use(),
            0,
            "released when the deadline dropped the call"
        );
        assert_eq!(metrics.deadline_exceeded.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_counters_snapshot_admissions_refusals_queue_waits_and_budget() {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let metrics = metrics();
        let limiter = Limiter::new(1, 1, Duration::from_secs(30), metrics.clone());
        let (memory, budget) = memory_layer(64 << 20, metrics.clone());
        let service = ConcurrencyLayer::new(limiter).layer(memory.layer(service));
        handle.allow(10);
        let one_call = estimate(1000, &ESTIMATOR);

        // One call running, one queued, one refused (the queue is one deep).
        let running = tokio::spawn(service.clone().oneshot(request("SummarizeFeedback", 1000)));
        let (_, respond_running) = handle.next_request().await.unwrap();
        let queued = tokio::spawn(service.clone().oneshot(request("SummarizeFeedback", 1000)));
        tokio::task::yield_now().await;
        let refused = service
            .clone()
            .oneshot(request("SummarizeFeedback", 1000))
            .await
            .unwrap();
        assert_eq!(refusal_reason(refused), "CONCURRENCY_LIMIT");
        let snapshot = metrics.snapshot(&budget);
        assert_eq!(
            (
                snapshot.admitted,
                snapshot.shed_concurrency,
                snapshot.queue_waits
            ),
            (1, 1, 0)
        );
        assert_eq!(snapshot.budget_in_use, one_call);

        // The running call ends after 250 ms; the queued one waited that long and runs.
        tokio::time::advance(Duration::from_millis(250)).await;
        respond_running.send_response(ok());
        drop(running.await.unwrap().unwrap());
        let (_, respond_queued) = handle.next_request().await.unwrap();
        let snapshot = metrics.snapshot(&budget);
        assert_eq!((snapshot.admitted, snapshot.queue_waits), (2, 1));
        assert_eq!(snapshot.queue_wait_us_mean, 250_000);
        assert_eq!(snapshot.queue_wait_us_max, 250_000);
        assert_eq!(
            snapshot.budget_in_use, one_call,
            "only the running call holds budget"
        );

        respond_queued.send_response(ok());
        drop(queued.await.unwrap().unwrap());
        let snapshot = metrics.snapshot(&budget);
        assert_eq!(snapshot.budget_in_use, 0);
        assert_eq!(snapshot.shed_memory + snapshot.shed_pressure, 0);
    }
}
