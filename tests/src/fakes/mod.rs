//! Fake LLM providers for tests: real HTTP servers on `127.0.0.1:0` that speak Gemini's
//! (`/v1beta/models/{model}:generateContent`, `:streamGenerateContent?alt=sse`) and OpenAI's
//! (`/v1/chat/completions`, streamed or not) request and response shapes, so the backends are
//! tested through their real HTTP client, byte for byte.
//!
//! Each fake records every request (path, query, headers, parsed JSON body) and what became of
//! it ([`Outcome`]: answered, or cancelled because the client went away first), and answers
//! according to a queue of [`Fault`]s, one per request, falling back to a default fault
//! ([`Fault::Ok`] unless changed) when the queue is empty. The answer text of a successful call
//! is fixed ([`FakeLlm::set_answer`]) or built from the request ([`FakeLlm::set_answer_fn`]).
//!
//! ```ignore
//! let fake = FakeLlm::gemini().await;
//! fake.push_faults([Fault::Status(503), Fault::Ok]);
//! fake.set_answer(r#"{"insight": "ok", "themes": []}"#);
//! // ... point a GeminiGenerator at fake.base_url() ...
//! assert_eq!(fake.request_count(), 2);
//! ```

mod body;
mod gemini;
mod openai;

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::{HeaderMap, Method, Uri},
    response::Response,
};
use serde_json::Value;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

pub use body::HUGE_CHUNK;

/// Which provider a fake imitates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// Google AI Gemini REST.
    Gemini,
    /// OpenAI chat completions (also what Ollama, vLLM, llama.cpp speak).
    OpenAi,
}

/// How the fake answers one request.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer with the configured text, finish reason STOP / `stop`.
    Ok,
    /// Answer normally, but only after this delay before the status line: a slow first byte
    /// (longer than the client's deadline), or a fixed model latency for benchmarks.
    Delay(Duration),
    /// HTTP 429 in the provider's shape, with an optional `Retry-After` header value (seconds
    /// or an HTTP date) and, for Gemini, an optional `google.rpc.RetryInfo.retryDelay` in the
    /// body (e.g. `"1.5s"`).
    RateLimited {
        /// `Retry-After` header value.
        retry_after: Option<String>,
        /// RetryInfo `retryDelay` (Gemini only).
        retry_delay: Option<String>,
    },
    /// This HTTP status with the provider's error body (500, 503, 401, 404, ...).
    Status(u16),
    /// Start the answer (first stream event, or the first half of the JSON body), then go
    /// silent for this long before finishing it.
    Stall(Duration),
    /// 200 with the answer cut in the middle: half a JSON body, or a stream that ends inside
    /// an event.
    Truncated,
    /// 200 with a body that is not JSON at all (an HTML error page).
    InvalidJson,
    /// 200 with a body of `bytes` bytes, generated on the fly (never allocated); with
    /// `declare_length` the `Content-Length` header announces it.
    Huge {
        /// Body size.
        bytes: u64,
        /// Send `Content-Length`.
        declare_length: bool,
    },
    /// Answer with this finish reason and text (empty text: no content at all, as a blocked
    /// answer looks).
    Finish {
        /// Why the answer stopped.
        kind: FinishKind,
        /// The answer text (may be empty).
        text: String,
    },
    /// A stream that delivers its first event, then the provider's error object for this
    /// status (Gemini: a bare JSON object after the events; OpenAI: a `data:` error event).
    /// A non-streamed request gets the plain status.
    MidStreamError(u16),
    /// Replay a recorded response verbatim (a fixture file).
    Raw {
        /// HTTP status.
        status: u16,
        /// `Content-Type`.
        content_type: String,
        /// The body.
        body: Bytes,
    },
}

/// A finish reason the fake can report, rendered in each provider's vocabulary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishKind {
    /// Gemini `STOP`, OpenAI `stop`.
    Stop,
    /// Gemini `MAX_TOKENS`, OpenAI `length`.
    MaxTokens,
    /// Gemini `SAFETY`, OpenAI `content_filter`.
    Safety,
}

/// What became of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Still being answered.
    Pending,
    /// The whole response was handed to the connection.
    Answered,
    /// The client went away (or its deadline dropped the call) before the response was complete.
    Cancelled,
}

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// Position in arrival order, from 0.
    pub index: usize,
    /// HTTP method.
    pub method: Method,
    /// Path, e.g. `/v1beta/models/gemini-2.5-flash:generateContent`.
    pub path: String,
    /// Query string without `?`, if any.
    pub query: Option<String>,
    /// Request headers (the key included: tests assert on it).
    pub headers: HeaderMap,
    /// The body parsed as JSON (`Value::Null` when it was not JSON).
    pub json: Value,
    /// Body size in bytes.
    pub body_len: usize,
    /// What became of it (as of when [`FakeLlm::requests`] was called).
    pub outcome: Outcome,
    /// Whether the response was (to be) streamed.
    pub stream: bool,
}

impl RecordedRequest {
    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The user prompt the client sent (Gemini: `contents[0].parts[0].text`; OpenAI: the last
    /// `user` message), so answer closures can echo or inspect it.
    pub fn prompt(&self) -> Option<&str> {
        match self.json.get("contents") {
            Some(contents) => contents.get(0)?.get("parts")?.get(0)?.get("text")?.as_str(),
            None => self
                .json
                .get("messages")?
                .as_array()?
                .iter()
                .rev()
                .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))?
                .get("content")?
                .as_str(),
        }
    }

    /// The system instructions the client sent, if any.
    pub fn system(&self) -> Option<&str> {
        match self.json.get("systemInstruction") {
            Some(system) => system.get("parts")?.get(0)?.get("text")?.as_str(),
            None => self
                .json
                .get("messages")?
                .as_array()?
                .iter()
                .find(|m| m.get("role").and_then(Value::as_str) == Some("system"))?
                .get("content")?
                .as_str(),
        }
    }
}

/// Builds the answer text of a successful call from the request.
pub type AnswerFn = Arc<dyn Fn(&RecordedRequest) -> String + Send + Sync>;

/// State shared by the server's handlers and the test.
pub(crate) struct Shared {
    flavor: Flavor,
    faults: Mutex<VecDeque<Fault>>,
    default_fault: Mutex<Fault>,
    answer: Mutex<AnswerFn>,
    api_key: Mutex<Option<String>>,
    requests: Mutex<Vec<RecordedRequest>>,
    body_bytes_sent: std::sync::atomic::AtomicU64,
    /// Bumped on every new request and every outcome, so tests can wait without polling.
    changes: watch::Sender<u64>,
}

impl Shared {
    fn set_outcome(&self, index: usize, outcome: Outcome) {
        if let Some(request) = self.requests.lock().unwrap().get_mut(index) {
            request.outcome = outcome;
        }
        self.changes.send_modify(|n| *n += 1);
    }

    fn add_sent(&self, bytes: usize) {
        self.body_bytes_sent
            .fetch_add(bytes as u64, std::sync::atomic::Ordering::Relaxed);
    }

    fn sub_sent(&self, bytes: usize) {
        self.body_bytes_sent
            .fetch_sub(bytes as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Marks its request [`Outcome::Cancelled`] when dropped before [`finish`](Self::finish): the
/// handler future (or the body producer) is dropped when the client disconnects.
pub(crate) struct Tracker {
    shared: Arc<Shared>,
    index: usize,
    done: bool,
}

impl Tracker {
    /// The response was handed over completely.
    pub(crate) fn finish(mut self) {
        self.done = true;
        self.shared.set_outcome(self.index, Outcome::Answered);
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        if !self.done {
            self.shared.set_outcome(self.index, Outcome::Cancelled);
        }
    }
}

/// A fake LLM provider listening on loopback; stops when dropped.
pub struct FakeLlm {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// The default answer: a small JSON object, since the pipeline asks for JSON.
const DEFAULT_ANSWER: &str = r#"{"answer": "fake"}"#;

impl FakeLlm {
    /// A fake Gemini (Google AI REST).
    pub async fn gemini() -> Self {
        Self::start(Flavor::Gemini).await
    }

    /// A fake OpenAI-compatible chat completions server.
    pub async fn openai() -> Self {
        Self::start(Flavor::OpenAi).await
    }

    /// Starts a fake of `flavor` on an ephemeral loopback port (bound before returning, so the
    /// first request cannot race the server start).
    pub async fn start(flavor: Flavor) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answer: AnswerFn = Arc::new(|_| DEFAULT_ANSWER.to_owned());
        let shared = Arc::new(Shared {
            flavor,
            faults: Mutex::new(VecDeque::new()),
            default_fault: Mutex::new(Fault::Ok),
            answer: Mutex::new(answer),
            api_key: Mutex::new(None),
            requests: Mutex::new(Vec::new()),
            body_bytes_sent: std::sync::atomic::AtomicU64::new(0),
            changes: watch::channel(0).0,
        });
        let app = Router::new()
            .fallback(handle)
            .layer(DefaultBodyLimit::max(64 * 1024 * 1024))
            .with_state(shared.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            addr,
            shared,
            server,
        }
    }

    /// Which provider this fake imitates.
    pub fn flavor(&self) -> Flavor {
        self.shared.flavor
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`: the base URL to configure a backend with.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sets the text of successful answers.
    pub fn set_answer(&self, text: impl Into<String>) {
        let text = text.into();
        *self.shared.answer.lock().unwrap() = Arc::new(move |_| text.clone());
    }

    /// Builds the text of successful answers from each request.
    pub fn set_answer_fn(
        &self,
        answer: impl Fn(&RecordedRequest) -> String + Send + Sync + 'static,
    ) {
        *self.shared.answer.lock().unwrap() = Arc::new(answer);
    }

    /// Requires this API key (Gemini `x-goog-api-key`, OpenAI `Authorization: Bearer`);
    /// requests without it get the provider's authentication error.
    pub fn require_api_key(&self, key: impl Into<String>) {
        *self.shared.api_key.lock().unwrap() = Some(key.into());
    }

    /// Queues a fault for the next request that has none yet.
    pub fn push_fault(&self, fault: Fault) {
        self.shared.faults.lock().unwrap().push_back(fault);
    }

    /// Queues faults for the next requests, in order.
    pub fn push_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        self.shared.faults.lock().unwrap().extend(faults);
    }

    /// What requests get once the queue is empty (initially [`Fault::Ok`]); e.g.
    /// `Fault::Delay(200 ms)` for a benchmark, `Fault::Status(503)` for a provider that is down.
    pub fn set_default_fault(&self, fault: Fault) {
        *self.shared.default_fault.lock().unwrap() = fault;
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// The last request received.
    pub fn last_request(&self) -> Option<RecordedRequest> {
        self.shared.requests.lock().unwrap().last().cloned()
    }

    /// How many requests arrived.
    pub fn request_count(&self) -> usize {
        self.shared.requests.lock().unwrap().len()
    }

    /// How many requests the client abandoned before their response was complete.
    pub fn cancelled_count(&self) -> usize {
        self.count(Outcome::Cancelled)
    }

    /// Body bytes the fake produced and handed to the connection (for the huge-body fault:
    /// how much it managed to send before the client hung up).
    pub fn body_bytes_sent(&self) -> u64 {
        self.shared
            .body_bytes_sent
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until at least `n` requests were cancelled by the client; `false` on timeout.
    pub async fn wait_for_cancelled(&self, n: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, |fake| fake.cancelled_count() >= n)
            .await
    }

    /// Waits until at least `n` requests arrived; `false` on timeout.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, |fake| fake.request_count() >= n)
            .await
    }

    /// Waits until no request is [`Outcome::Pending`]; `false` on timeout.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        self.wait_until(timeout, |fake| fake.count(Outcome::Pending) == 0)
            .await
    }

    fn count(&self, outcome: Outcome) -> usize {
        self.shared
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.outcome == outcome)
            .count()
    }

    async fn wait_until(&self, timeout: Duration, done: impl Fn(&Self) -> bool) -> bool {
        let mut changes = self.shared.changes.subscribe();
        let wait = async {
            loop {
                if done(self) {
                    return;
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok() && done(self)
    }
}

/// A URL where nothing listens: a port that was just bound and released, so connecting is
/// refused (the "provider unreachable" fault).
pub async fn closed_port_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

/// Everything a renderer needs to answer one request.
pub(crate) struct Exchange {
    pub(crate) request: RecordedRequest,
    pub(crate) tracker: Tracker,
    pub(crate) shared: Arc<Shared>,
    pub(crate) answer: String,
    pub(crate) model: String,
}

impl Exchange {
    /// Token estimates for usage fields: about four bytes per token.
    pub(crate) fn prompt_tokens(&self) -> u64 {
        (self.request.body_len as u64 / 4).max(1)
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let path = uri.path().to_owned();
    let query = uri.query().map(str::to_owned);
    let route = match shared.flavor {
        Flavor::Gemini => gemini::route(&method, &path, query.as_deref()),
        Flavor::OpenAi => openai::route(&method, &path, &json),
    };
    let index = {
        let mut requests = shared.requests.lock().unwrap();
        let index = requests.len();
        requests.push(RecordedRequest {
            index,
            method,
            path,
            query,
            headers,
            json,
            body_len: body.len(),
            outcome: Outcome::Pending,
            stream: route.as_ref().is_ok_and(|r| r.stream),
        });
        index
    };
    shared.changes.send_modify(|n| *n += 1);
    let tracker = Tracker {
        shared: shared.clone(),
        index,
        done: false,
    };
    let request = shared.requests.lock().unwrap()[index].clone();
    let route = match route {
        Ok(route) => route,
        Err((status, body)) => {
            tracker.finish();
            return body::json_response(status, &body);
        }
    };
    let expected = shared.api_key.lock().unwrap().clone();
    if let Some(expected) = expected {
        let denied = match shared.flavor {
            Flavor::Gemini => gemini::check_key(&request, &expected),
            Flavor::OpenAi => openai::check_key(&request, &expected),
        };
        if let Some((status, body)) = denied {
            tracker.finish();
            return body::json_response(status, &body);
        }
    }
    let fault = shared
        .faults
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or_else(|| shared.default_fault.lock().unwrap().clone());
    let answer_fn = shared.answer.lock().unwrap().clone();
    let answer = answer_fn(&request);
    let exchange = Exchange {
        request,
        tracker,
        shared: shared.clone(),
        answer,
        model: route.model,
    };
    if let Fault::Delay(delay) = fault {
        // The tracker lives in this future: if the client hangs up meanwhile, hyper drops the
        // future and the request is recorded as cancelled.
        tokio::time::sleep(delay).await;
        return body::respond(exchange, route.stream, Fault::Ok);
    }
    body::respond(exchange, route.stream, fault)
}

/// A request refused before any fault applies (unknown route, bad key): status and the
/// provider's error body.
pub(crate) type Rejection = (u16, Value);

/// Where a request goes, once its path is accepted.
pub(crate) struct Route {
    pub(crate) stream: bool,
    pub(crate) model: String,
}

/// A fake Gemini for summary tests: map prompts get a short chunk insight, reduce prompts a
/// fixed summary; it requires `key`, which is also written to a file for
/// `--llm-api-key-file`.
pub struct SummaryGemini {
    /// The fake server (count its requests, inject faults).
    pub fake: FakeLlm,
    key_file: tempfile::NamedTempFile,
}

impl SummaryGemini {
    /// The fake, started on loopback.
    pub async fn start(key: &str) -> Self {
        let fake = FakeLlm::gemini().await;
        fake.require_api_key(key);
        fake.set_answer_fn(|request: &RecordedRequest| {
            if request
                .system()
                .unwrap_or_default()
                .contains("combine summaries")
            {
                r#"{"summary": "Listeners want fewer ads.", "themes": ["ads"]}"#.to_owned()
            } else {
                r#"{"insight": "Ads interrupt songs.", "themes": ["ads"]}"#.to_owned()
            }
        });
        let key_file = tempfile::NamedTempFile::new().expect("a temporary key file");
        std::fs::write(key_file.path(), key).expect("the key written");
        Self { fake, key_file }
    }

    /// insight-service defaults with this fake as the Gemini backend (no retries, so call
    /// counts are exact) and `db` as the store.
    pub fn config(&self, db: &crate::db::Db) -> insight_service::Config {
        insight_service::Config {
            llm_backend: insight_service::config::BackendKind::Gemini,
            llm_base_url: Some(self.fake.base_url()),
            llm_api_key_file: Some(self.key_file.path().to_path_buf()),
            llm_max_retries: 0,
            database_url: insight_service::store::DatabaseUrl::parse(db.url())
                .expect("a valid database url"),
            // Tests that expect a cache hit run beside compiles and other tests: a cache
            // write that took over the default 1 s there closed the cache and the next call
            // missed. The most the flag allows (the store's own 5 s limit); a database that
            // is down now holds an uncached inline summary up to that long (the pool retries
            // a refused connection until then).
            cache_wait: insight_service::store::ACQUIRE_TIMEOUT,
            ..insight_service::Config::default()
        }
    }
}
