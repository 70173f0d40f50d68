//! What every HTTP LLM backend needs, in one place: a client with no global timeout, one
//! deadline per call (retries included), a byte cap on every response read incrementally, a
//! stall timeout between streamed chunks, Server-Sent Events decoding, retries with jittered
//! exponential backoff that honour `Retry-After` and Google's `RetryInfo` but never sleep past the
//! deadline, and the one function that turns an HTTP status and error body into an [`LlmError`].
//!
//! The provider modules ([`super::gemini`], [`super::openai`]) only build request bodies and
//! parse answers; they never touch sockets, clocks or status codes themselves.

use std::{
    hash::{BuildHasher, Hasher},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use reqwest::{
    StatusCode, Url,
    header::{HeaderMap, RETRY_AFTER},
};
use serde_json::Value;
use tokio::time::Instant;

use super::{LlmError, MIN_RETRY_WINDOW};
use crate::domain::{Usage, UsageMeter};

/// Default cap on one response body (`--llm-max-response-bytes`): a 300-word JSON answer is a
/// few KiB, streamed events add framing; 1 MiB leaves room while keeping a hostile or broken
/// server from growing our memory.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// Default longest silence between two chunks of a response already under way
/// (`--llm-stall-timeout`).
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Default retries after the first attempt (so at most four HTTP requests per call).
pub const DEFAULT_MAX_RETRIES: u32 = 3;
/// Default bound on establishing a connection (TCP + TLS); the call's deadline bounds it too.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default first backoff; each retry doubles it up to [`DEFAULT_MAX_BACKOFF`].
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(250);
/// Default longest backoff between two attempts (when the provider names no delay).
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(8);

/// Bytes of an error body worth reading: provider errors are a few hundred bytes; past this we
/// only need the status, so a huge error page is cut rather than rejected.
const ERROR_BODY_LIMIT: usize = 64 * 1024;
/// Longest provider message kept in an error: errors end up in logs and gRPC details.
const MESSAGE_LIMIT: usize = 512;

/// Limits and retry policy of the HTTP backends. Every field has a laptop-safe default
/// ([`HttpLimits::default`]); the service's config fills them from its `--llm-*` flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpLimits {
    /// Largest response body read, in bytes; a longer one fails with [`LlmError::TooLarge`]
    /// after reading about this much (or before reading anything when `Content-Length` says so).
    pub max_response_bytes: usize,
    /// Longest wait for the next chunk once a response body has started; a stream that stalls
    /// longer fails with [`LlmError::Timeout`] even if the deadline is far.
    pub stall_timeout: Duration,
    /// Bound on connecting (TCP + TLS handshake); the call's deadline applies as well.
    pub connect_timeout: Duration,
    /// Retries after the first attempt on retryable errors (429, 5xx, connect errors).
    pub max_retries: u32,
    /// Backoff before the first retry when the provider names no delay; doubles each retry.
    pub initial_backoff: Duration,
    /// Longest backoff when the provider names no delay.
    pub max_backoff: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            stall_timeout: DEFAULT_STALL_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_retries: DEFAULT_MAX_RETRIES,
            initial_backoff: DEFAULT_INITIAL_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
        }
    }
}

/// Why an HTTP backend could not be built from its configuration: reported at startup, so a bad
/// flag stops the service with a message instead of failing every call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetupError {
    /// The base URL does not parse or is not http(s).
    #[error("invalid LLM base URL {url:?}: {reason}")]
    BaseUrl {
        /// The URL as given, credentials and query redacted ([`redacted_url`]).
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The model name cannot be placed in a URL path.
    #[error("invalid LLM model name {model:?}: {reason}")]
    Model {
        /// The model as given.
        model: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The API key cannot be sent as an HTTP header (never contains the key itself).
    #[error("invalid LLM API key: {0}")]
    ApiKey(String),
    /// The HTTP client could not be built (TLS setup).
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

/// Parses and checks a base URL and appends `path` (which starts with `/`) to it, keeping any
/// path prefix the base has (proxies such as LiteLLM mount the API under one).
pub(crate) fn join_url(base: &str, path: &str) -> Result<Url, SetupError> {
    let bad = |reason: String| SetupError::BaseUrl {
        url: redacted_url(base),
        reason,
    };
    let parsed = Url::parse(base).map_err(|e| bad(e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(bad(format!(
            "scheme {:?} is not http or https",
            parsed.scheme()
        )));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(bad("a base URL has no query or fragment".to_owned()));
    }
    let joined = format!("{}{path}", parsed.as_str().trim_end_matches('/'));
    Url::parse(&joined).map_err(|e| bad(e.to_string()))
}

/// `url` as it may be shown in an error or a log: a user name, a password, a query or a
/// fragment is replaced by `redacted`. Keys end up there (`?key=…` from curl examples of the
/// Gemini API, `user:key@` for a proxy), and a startup error is printed for everyone to read.
/// A string that does not parse loses the same parts, found by their separators.
pub(crate) fn redacted_url(url: &str) -> String {
    const REDACTED: &str = "redacted";
    let Ok(mut parsed) = Url::parse(url) else {
        let end = url.find(['?', '#']).unwrap_or(url.len());
        let mut shown = match url[..end].rfind('@') {
            Some(at) => format!("<{REDACTED}>@{}", &url[at + 1..end]),
            None => url[..end].to_owned(),
        };
        if end < url.len() {
            shown.push_str(&format!("<{REDACTED}>"));
        }
        return shown;
    };
    if !parsed.username().is_empty() {
        let _ = parsed.set_username(REDACTED);
    }
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some(REDACTED));
    }
    if parsed.query().is_some() {
        parsed.set_query(Some(REDACTED));
    }
    if parsed.fragment().is_some() {
        parsed.set_fragment(Some(REDACTED));
    }
    parsed.into()
}

/// What an SSE consumer tells the reader after an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flow {
    /// Keep reading.
    Continue,
    /// The answer is complete (OpenAI's `data: [DONE]`): stop without waiting for EOF.
    Done,
}

/// A provider's stream parser. It keeps its own state; [`reset`](SseHandler::reset) runs
/// before every attempt so a retry after a broken stream starts from nothing.
pub(crate) trait SseHandler: Send {
    /// Forgets everything seen so far.
    fn reset(&mut self);
    /// One event's `data` (multi-line data joined with `\n`).
    fn on_event(&mut self, data: &str) -> Result<Flow, LlmError>;
    /// The stream ended. `trailing` holds lines that were not SSE fields (Gemini appends a bare
    /// JSON error object to a stream that fails midway).
    fn on_end(&mut self, trailing: &[u8]) -> Result<(), LlmError>;
    /// The tokens the provider reported so far, handed over once: an attempt that failed
    /// midway (a stall, a lost connection, an error event) is billed for them all the same.
    fn take_usage(&mut self) -> Usage {
        Usage::default()
    }
}

/// The HTTP machinery of one backend: a shared connection pool plus the limits every call obeys.
#[derive(Clone, Debug)]
pub(crate) struct HttpTransport {
    client: reqwest::Client,
    limits: HttpLimits,
    backend: &'static str,
}

impl HttpTransport {
    /// Builds the client. No global request timeout is set: each call has its own deadline.
    pub(crate) fn new(backend: &'static str, limits: HttpLimits) -> Result<Self, SetupError> {
        // reqwest is built without a bundled crypto provider (aws-lc-rs needs cmake); ring is
        // installed process-wide unless the binary already chose one, which we then respect.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .connect_timeout(limits.connect_timeout)
            // An API endpoint has no business redirecting; following one would resend the key
            // header to wherever it points.
            .redirect(reqwest::redirect::Policy::none())
            .tcp_nodelay(true)
            .user_agent(concat!("spotifai-insight/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| SetupError::Client(e.to_string()))?;
        Ok(Self {
            client,
            limits,
            backend,
        })
    }

    /// The limits in force.
    pub(crate) fn limits(&self) -> &HttpLimits {
        &self.limits
    }

    /// POSTs `body` and returns the whole 2xx response body (at most the byte cap), retrying
    /// retryable failures until `deadline`. `meter` counts every attempt as it is sent and
    /// every byte as it arrives, failed and abandoned attempts too.
    pub(crate) async fn post_json(
        &self,
        url: &Url,
        headers: &HeaderMap,
        body: Bytes,
        deadline: Instant,
        meter: &UsageMeter,
    ) -> Result<Vec<u8>, LlmError> {
        self.run(url, headers, body, deadline, meter, None).await
    }

    /// POSTs `body` and feeds the 2xx response's Server-Sent Events to `handler`, retrying like
    /// [`post_json`](Self::post_json) (a stream that fails with a retryable error midway is
    /// retried from the start).
    pub(crate) async fn post_sse(
        &self,
        url: &Url,
        headers: &HeaderMap,
        body: Bytes,
        deadline: Instant,
        meter: &UsageMeter,
        handler: &mut dyn SseHandler,
    ) -> Result<(), LlmError> {
        self.run(url, headers, body, deadline, meter, Some(handler))
            .await
            .map(drop)
    }

    async fn run(
        &self,
        url: &Url,
        headers: &HeaderMap,
        body: Bytes,
        deadline: Instant,
        meter: &UsageMeter,
        mut sse: Option<&mut dyn SseHandler>,
    ) -> Result<Vec<u8>, LlmError> {
        let mut attempts: u32 = 0;
        let mut last: Option<LlmError> = None;
        let mut retry: u32 = 0;
        loop {
            if Instant::now() >= deadline {
                return Err(self.deadline_error(attempts, last));
            }
            attempts += 1;
            meter.add(Usage {
                llm_calls: 1,
                prompt_bytes: body.len() as u64,
                ..Usage::default()
            });
            let handler = match sse.as_mut() {
                Some(handler) => {
                    handler.reset();
                    Some(reborrow(*handler))
                }
                None => None,
            };
            let attempt = self.attempt(url, headers, body.clone(), meter, handler);
            let outcome = tokio::time::timeout_at(deadline, attempt).await;
            if !matches!(outcome, Ok(Ok(_)))
                && let Some(handler) = sse.as_mut()
            {
                meter.add(handler.take_usage());
            }
            let failure = match outcome {
                Ok(Ok(body)) => return Ok(body),
                Ok(Err(failure)) => failure,
                Err(_elapsed) => return Err(self.deadline_error(attempts, last)),
            };
            if !failure.is_retryable() || retry >= self.limits.max_retries {
                return Err(failure);
            }
            // A retry that could only start after the deadline, or too close to it to finish,
            // is pointless; the caller is better served by the real cause now than by a
            // timeout later.
            let room = deadline.saturating_duration_since(Instant::now());
            let Some(wait) = fitted_wait(&self.limits, retry, failure.retry_after(), room) else {
                tracing::debug!(
                    backend = self.backend,
                    attempt = attempts,
                    room_ms = room.as_millis() as u64,
                    error = %failure,
                    "not retrying: the wait would cross the deadline"
                );
                return Err(failure);
            };
            tracing::debug!(
                backend = self.backend,
                attempt = attempts,
                wait_ms = wait.as_millis() as u64,
                error = %failure,
                "retrying LLM call"
            );
            tokio::time::sleep(wait).await;
            last = Some(failure);
            retry += 1;
        }
    }

    fn deadline_error(&self, attempts: u32, last: Option<LlmError>) -> LlmError {
        let message = match last {
            Some(last) if attempts > 0 => {
                format!("deadline passed during attempt {attempts} (previous attempt: {last})")
            }
            _ if attempts > 0 => format!("deadline passed during attempt {attempts}"),
            _ => "deadline passed before the first attempt".to_owned(),
        };
        LlmError::Timeout {
            backend: self.backend.to_owned(),
            message,
        }
    }

    async fn attempt(
        &self,
        url: &Url,
        headers: &HeaderMap,
        body: Bytes,
        meter: &UsageMeter,
        sse: Option<&mut dyn SseHandler>,
    ) -> Result<Vec<u8>, LlmError> {
        let response = self
            .client
            .post(url.clone())
            .headers(headers.clone())
            .body(body)
            .send()
            .await
            .map_err(|e| self.send_error(&e))?;
        let status = response.status();
        if !status.is_success() {
            let retry_after = asked_delay(response.headers(), SystemTime::now());
            let body = self.read_error_body(response, meter).await;
            return Err(error_for_status(
                self.backend,
                status.as_u16(),
                &body,
                retry_after,
            ));
        }
        match sse {
            None => self.read_body(response, meter).await,
            Some(handler) => self
                .read_sse(response, meter, handler)
                .await
                .map(|()| Vec::new()),
        }
    }

    /// Reads a 2xx body whole, refusing to hold more than the cap.
    async fn read_body(
        &self,
        mut response: reqwest::Response,
        meter: &UsageMeter,
    ) -> Result<Vec<u8>, LlmError> {
        let cap = self.limits.max_response_bytes;
        let declared = response.content_length();
        if declared.is_some_and(|len| len > cap as u64) {
            return Err(self.too_large());
        }
        let initial = declared.map_or(8 * 1024, |len| len as usize).min(cap);
        let mut body = Vec::with_capacity(initial);
        let mut started = false;
        while let Some(chunk) = self.next_chunk(&mut response, started).await? {
            started = true;
            received(meter, &chunk);
            if body.len() + chunk.len() > cap {
                return Err(self.too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// Reads an error body up to [`ERROR_BODY_LIMIT`], dropping the rest: only the provider's
    /// message is wanted, and a failure here must not hide the status.
    async fn read_error_body(
        &self,
        mut response: reqwest::Response,
        meter: &UsageMeter,
    ) -> Vec<u8> {
        let limit = ERROR_BODY_LIMIT.min(self.limits.max_response_bytes);
        let mut body = Vec::new();
        // The stall timeout applies from the first byte: no model thinks before an error body,
        // and the status (with its Retry-After) is already known, whatever the body says.
        // A read error or a stall ends the body like EOF: what arrived may still name the cause.
        while let Ok(Some(chunk)) = self.next_chunk(&mut response, true).await {
            received(meter, &chunk);
            let room = limit - body.len();
            body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if body.len() >= limit {
                break;
            }
        }
        body
    }

    /// Decodes a 2xx event stream, handing each event to `handler` as soon as it is complete.
    async fn read_sse(
        &self,
        mut response: reqwest::Response,
        meter: &UsageMeter,
        handler: &mut dyn SseHandler,
    ) -> Result<(), LlmError> {
        let cap = self.limits.max_response_bytes;
        if response
            .content_length()
            .is_some_and(|len| len > cap as u64)
        {
            return Err(self.too_large());
        }
        let mut decoder = SseDecoder::new(self.backend);
        let mut total = 0usize;
        let mut started = false;
        while let Some(chunk) = self.next_chunk(&mut response, started).await? {
            started = true;
            received(meter, &chunk);
            total += chunk.len();
            if total > cap {
                return Err(self.too_large());
            }
            if decoder.feed(&chunk, handler)? == Flow::Done {
                return Ok(());
            }
        }
        if decoder.finish(handler)? == Flow::Done {
            return Ok(());
        }
        handler.on_end(decoder.trailing())
    }

    /// The next body chunk. The wait for the first chunk is bounded only by the deadline (a
    /// model may think long before its first token); later gaps by the stall timeout.
    async fn next_chunk(
        &self,
        response: &mut reqwest::Response,
        started: bool,
    ) -> Result<Option<Bytes>, LlmError> {
        let next = if started {
            tokio::time::timeout(self.limits.stall_timeout, response.chunk())
                .await
                .map_err(|_| LlmError::Timeout {
                    backend: self.backend.to_owned(),
                    message: format!(
                        "response stalled: no data for {:?} (stall timeout)",
                        self.limits.stall_timeout
                    ),
                })?
        } else {
            response.chunk().await
        };
        next.map_err(|e| {
            // The connection broke after the provider accepted the call: as transient as a
            // refused connection, so it is retried the same way.
            LlmError::Connect {
                backend: self.backend.to_owned(),
                message: format!("connection lost while reading the response: {}", chain(&e)),
            }
        })
    }

    fn send_error(&self, error: &reqwest::Error) -> LlmError {
        let backend = self.backend.to_owned();
        let message = chain(error);
        // A connect timeout is both `is_connect` and `is_timeout`: it is a connection failure
        // (retryable), not the call's deadline.
        if error.is_connect() {
            LlmError::Connect { backend, message }
        } else if error.is_timeout() {
            LlmError::Timeout { backend, message }
        } else if error.is_builder() {
            LlmError::BadRequest { backend, message }
        } else {
            // Refused, reset, DNS, TLS: nothing reached the model, so trying again is safe.
            LlmError::Connect { backend, message }
        }
    }

    fn too_large(&self) -> LlmError {
        LlmError::TooLarge {
            backend: self.backend.to_owned(),
            limit: self.limits.max_response_bytes,
        }
    }
}

/// Counts a piece of a response body as it arrives (so a body cut off by the cap, a stall or
/// the deadline is counted as far as it came).
fn received(meter: &UsageMeter, chunk: &[u8]) {
    meter.add(Usage {
        response_bytes: chunk.len() as u64,
        ..Usage::default()
    });
}

/// Shortens the handler's object lifetime to this borrow, so each attempt can borrow it anew
/// (an `Option<&mut dyn _>` does not coerce by itself).
fn reborrow<'s>(handler: &'s mut (dyn SseHandler + '_)) -> &'s mut dyn SseHandler {
    handler
}

/// An error with its sources, since reqwest's top-level message alone ("error sending request")
/// hides whether the connection was refused or TLS failed.
fn chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    bounded_message(message)
}

/// Full-jitter exponential backoff: uniformly in `[base/2, base]` with `base = initial * 2^retry`
/// capped, so concurrent callers that failed together do not retry together.
fn backoff(limits: &HttpLimits, retry: u32) -> Duration {
    let base = limits
        .initial_backoff
        .saturating_mul(1u32 << retry.min(16))
        .min(limits.max_backoff);
    (base / 2).saturating_add(base.mul_f64(jitter() / 2.0))
}

/// How long to wait before retry number `retry` (from 0). A delay the provider asked for
/// (`Retry-After`, RetryInfo) is a floor, never shortened; it is raised to the ordinary backoff
/// (`Retry-After: 0` must not mean back-to-back retries) and spread by up to a tenth of itself,
/// since a request's parallel map calls are all told the same delay at once and would
/// otherwise come back in the same instant.
///
/// Returned as the wait itself and its spread on top, so that [`fitted_wait`] can cut the
/// spread (never the wait) to what is left before the deadline.
fn retry_wait(limits: &HttpLimits, retry: u32, asked: Option<Duration>) -> (Duration, Duration) {
    let backoff = backoff(limits, retry);
    match asked {
        None => (backoff, Duration::ZERO),
        Some(asked) => {
            let spread = Duration::try_from_secs_f64(asked.as_secs_f64() * jitter() / 10.0);
            (asked.max(backoff), spread.unwrap_or_default())
        }
    }
}

/// The wait before retry number `retry` ([`retry_wait`]) when the retry still starts
/// [`MIN_RETRY_WINDOW`] before the deadline, `room` from now; `None` when it cannot. The spread
/// is cut to fit: a provider that asked for 38 s with 40 s left gets its retry at 38–39.9 s,
/// rather than none half the time. Compared, never added: a hostile
/// `Retry-After: 18446744073709551615` must not overflow.
fn fitted_wait(
    limits: &HttpLimits,
    retry: u32,
    asked: Option<Duration>,
    room: Duration,
) -> Option<Duration> {
    let (wait, spread) = retry_wait(limits, retry, asked);
    let room = room.checked_sub(MIN_RETRY_WINDOW)?.checked_sub(wait)?;
    Some(wait + spread.min(room))
}

/// A uniform value in `[0, 1)`. Each `RandomState` gets fresh random SipHash keys from std, so
/// hashing nothing yields an unpredictable value without a PRNG dependency; jitter needs no more.
pub(crate) fn jitter() -> f64 {
    let bits = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// The delay an error response asks for: OpenAI's (and Azure OpenAI's) `retry-after-ms`, more
/// precise, else `Retry-After`.
fn asked_delay(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    header("retry-after-ms")
        .and_then(|ms| ms.trim().parse::<f64>().ok())
        .and_then(|ms| Duration::try_from_secs_f64(ms / 1000.0).ok())
        .or_else(|| parse_retry_after(header(RETRY_AFTER.as_str())?, now))
}

/// `Retry-After` as delay-seconds or an HTTP-date (RFC 9110 §10.2.3); `None` when unreadable. A
/// date in the past means "now".
pub(crate) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    // Some servers send fractional seconds although the RFC says integer; accept them.
    if let Ok(seconds) = value.parse::<f64>() {
        return Duration::try_from_secs_f64(seconds).ok();
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// A protobuf JSON `Duration` such as RetryInfo's `"34.4s"`; `None` when malformed, negative or
/// absurdly large, so a hostile body cannot make us panic or sleep forever.
pub(crate) fn parse_proto_duration(value: &str) -> Option<Duration> {
    let seconds = value.trim().strip_suffix('s')?;
    if seconds.is_empty() || !seconds.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return None;
    }
    Duration::try_from_secs_f64(seconds.parse::<f64>().ok()?).ok()
}

/// The error object of a provider's JSON error body, in whichever of the shapes they use:
/// Google's `{"error": {code, message, status, details}}` (also wrapped in an array by
/// Gemini's streaming endpoint), OpenAI's `{"error": {message, type, code}}`, and Ollama's
/// `{"error": "text"}`.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct ProviderError {
    /// Numeric code (Google's HTTP code); OpenAI's string `code` goes to `code_name` (and to
    /// `kind` when there is no `status` or `type`).
    pub code: Option<u16>,
    /// Google's canonical status (`RESOURCE_EXHAUSTED`) or OpenAI's `type`/`code`.
    pub kind: Option<String>,
    /// OpenAI's string `code` (`invalid_api_key`), more specific than its `type`
    /// (`invalid_request_error`): it is classified first.
    pub code_name: Option<String>,
    /// Human-readable message.
    pub message: Option<String>,
    /// `google.rpc.RetryInfo.retryDelay`.
    pub retry_delay: Option<Duration>,
    /// `google.rpc.ErrorInfo.reason` (e.g. `API_KEY_INVALID`).
    pub reason: Option<String>,
}

impl ProviderError {
    /// Reads an error body; `None` when it holds no error object.
    pub(crate) fn from_body(body: &[u8]) -> Option<Self> {
        let value: Value = serde_json::from_slice(body).ok()?;
        Self::from_value(&value)
    }

    /// Reads a parsed body (an object with `error`, or an array whose first element has one).
    pub(crate) fn from_value(value: &Value) -> Option<Self> {
        let value = match value {
            Value::Array(items) => items.first()?,
            other => other,
        };
        match value.get("error")? {
            Value::String(message) => Some(Self {
                message: Some(message.clone()),
                ..Self::default()
            }),
            Value::Object(error) => {
                let mut parsed = Self {
                    // A number, or (LiteLLM's proxy) the same number as a string.
                    code: error
                        .get("code")
                        .and_then(|code| {
                            code.as_u64()
                                .or_else(|| code.as_str().and_then(|c| c.parse().ok()))
                        })
                        .and_then(|c| u16::try_from(c).ok()),
                    message: error
                        .get("message")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                    ..Self::default()
                };
                parsed.kind = ["status", "type", "code"]
                    .iter()
                    .find_map(|key| error.get(*key).and_then(Value::as_str))
                    .map(str::to_owned);
                parsed.code_name = error.get("code").and_then(Value::as_str).map(str::to_owned);
                for detail in error
                    .get("details")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let kind = detail.get("@type").and_then(Value::as_str).unwrap_or("");
                    if kind.ends_with("google.rpc.RetryInfo") {
                        parsed.retry_delay = detail
                            .get("retryDelay")
                            .and_then(Value::as_str)
                            .and_then(parse_proto_duration);
                    } else if kind.ends_with("google.rpc.ErrorInfo") && parsed.reason.is_none() {
                        parsed.reason = detail
                            .get("reason")
                            .and_then(Value::as_str)
                            .map(str::to_owned);
                    }
                }
                Some(parsed)
            }
            _ => None,
        }
    }

    /// The HTTP status this error stands for: its code, else its string code or canonical
    /// status name (the first that names a known kind), else 500 (an error we cannot classify
    /// is treated as the provider's fault, hence retryable).
    pub(crate) fn status(&self) -> u16 {
        if let Some(code) = self.code.filter(|c| (100..=599).contains(c)) {
            return code;
        }
        [&self.code_name, &self.kind]
            .into_iter()
            .find_map(|name| name.as_deref().and_then(Self::status_of_name))
            .unwrap_or(500)
    }

    /// The HTTP status a Google canonical status or an OpenAI-style `type`/`code` names.
    fn status_of_name(name: &str) -> Option<u16> {
        Some(match name {
            "INVALID_ARGUMENT"
            | "FAILED_PRECONDITION"
            | "OUT_OF_RANGE"
            | "invalid_request_error" => 400,
            "UNAUTHENTICATED" | "authentication_error" | "invalid_api_key" => 401,
            "PERMISSION_DENIED" | "permission_error" => 403,
            "NOT_FOUND" | "not_found_error" | "model_not_found" => 404,
            "RESOURCE_EXHAUSTED"
            | "rate_limit_error"
            | "rate_limit_exceeded"
            | "requests"
            | "tokens" => 429,
            "CANCELLED" => 499,
            "UNIMPLEMENTED" => 501,
            "UNAVAILABLE" | "overloaded_error" => 503,
            "DEADLINE_EXCEEDED" => 504,
            _ => return None,
        })
    }

    /// OpenAI's "You exceeded your current quota" (`insufficient_quota`, with HTTP 429):
    /// billing, not throttling.
    fn is_quota(&self) -> bool {
        [&self.code_name, &self.kind]
            .into_iter()
            .any(|name| name.as_deref() == Some("insufficient_quota"))
    }

    fn describe(&self) -> String {
        let text = match (&self.kind, &self.message) {
            (Some(kind), Some(message)) => format!("{kind}: {message}"),
            (None, Some(message)) => message.clone(),
            (Some(kind), None) => kind.clone(),
            (None, None) => "no message".to_owned(),
        };
        bounded_message(text)
    }
}

/// The explicit HTTP status → error-kind map of every HTTP backend, with the provider's message
/// taken from the body:
///
/// | status | error |
/// |---|---|
/// | 401, 403 (and Google's 400 `API_KEY_INVALID`) | [`LlmError::Auth`] |
/// | 429 with OpenAI's `insufficient_quota` | [`LlmError::QuotaExhausted`] |
/// | 429 | [`LlmError::RateLimited`], delay: the longer of `Retry-After` and RetryInfo |
/// | 400, 404, 413, 422 and other 4xx | [`LlmError::BadRequest`] |
/// | 408, 499, 5xx | [`LlmError::Server`] (retryable), delay (if any) as for 429 |
/// | anything else (1xx, 2xx, 3xx reaching here) | [`LlmError::Malformed`] |
pub fn error_for_status(
    backend: &str,
    status: u16,
    body: &[u8],
    retry_after: Option<Duration>,
) -> LlmError {
    let provider = ProviderError::from_body(body);
    let message = match &provider {
        Some(error) => error.describe(),
        None => body_snippet(status, body),
    };
    let backend = backend.to_owned();
    let key_invalid = provider
        .as_ref()
        .is_some_and(|e| e.reason.as_deref() == Some("API_KEY_INVALID"));
    let quota = provider.as_ref().is_some_and(ProviderError::is_quota);
    // The delay asked for, on a 429 or a 5xx: the longer of the header's and the body's
    // RetryInfo (a proxy's `Retry-After: 0` must not cut the provider's own delay short).
    let asked = retry_after.max(provider.and_then(|e| e.retry_delay));
    match status {
        401 | 403 => LlmError::Auth { backend, message },
        400 if key_invalid => LlmError::Auth { backend, message },
        429 if quota => LlmError::QuotaExhausted { backend, message },
        429 => LlmError::RateLimited {
            backend,
            retry_after: asked,
            message,
        },
        // A request timeout or a server-side cancellation says nothing against the request
        // itself: worth another attempt.
        408 | 499 | 500..=599 => LlmError::Server {
            backend,
            status,
            retry_after: asked,
            message,
        },
        400..=499 => LlmError::BadRequest { backend, message },
        _ => LlmError::Malformed {
            backend,
            message: format!("unexpected HTTP status {status}: {message}"),
        },
    }
}

/// What a stream's end says once its events are read ([`SseHandler::on_end`]): nothing but
/// whitespace after the last event is a clean end; a bare JSON error object is that error
/// (Gemini appends one to a stream that fails midway, and some OpenAI-compatible servers answer
/// a failing streamed request with a plain error body); anything else is a malformed stream.
pub(crate) fn stream_end(backend: &str, trailing: &[u8]) -> Result<(), LlmError> {
    if trailing.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    match ProviderError::from_body(trailing) {
        Some(error) => Err(error_for_provider_error(backend, &error)),
        None => Err(malformed(
            backend,
            format!(
                "unexpected non-SSE content in the stream: {}",
                String::from_utf8_lossy(&trailing[..trailing.len().min(120)])
            ),
        )),
    }
}

/// `backend`'s answer did not have the shape its API promises; `message` (truncated) says how.
pub(crate) fn malformed(backend: &str, message: String) -> LlmError {
    LlmError::Malformed {
        backend: backend.to_owned(),
        message: bounded_message(message),
    }
}

/// The error a provider reported inside a 2xx body or stream, mapped like an HTTP status.
pub(crate) fn error_for_provider_error(backend: &str, error: &ProviderError) -> LlmError {
    let described = error.describe();
    if error.is_quota() {
        return LlmError::QuotaExhausted {
            backend: backend.to_owned(),
            message: described,
        };
    }
    let status = error.status();
    let mut mapped = error_for_status(backend, status, b"", None);
    match &mut mapped {
        LlmError::Auth { message, .. }
        | LlmError::QuotaExhausted { message, .. }
        | LlmError::BadRequest { message, .. }
        | LlmError::Blocked { message, .. }
        | LlmError::Malformed { message, .. } => *message = described,
        LlmError::RateLimited {
            message,
            retry_after,
            ..
        }
        | LlmError::Server {
            message,
            retry_after,
            ..
        } => {
            *message = described;
            *retry_after = error.retry_delay;
        }
        LlmError::Connect { .. } | LlmError::Timeout { .. } | LlmError::TooLarge { .. } => {}
    }
    mapped
}

/// A body that is not a provider error object: say what it was without echoing a whole HTML
/// page (or binary) into logs.
fn body_snippet(status: u16, body: &[u8]) -> String {
    let reason = StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("unknown status");
    let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
    let text: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let text = text.trim();
    if text.is_empty() {
        format!("HTTP {status} {reason}")
    } else {
        bounded_message(format!("HTTP {status} {reason}: {text}"))
    }
}

/// Replaces what looks like an API key in a provider's message (OpenAI's 401 echoes the key
/// masked but with its last characters, `sk-proj-****…bC9A`; Google keys start `AIza`) with
/// `[key redacted]`: the message goes into statuses and logs, and no part of a key belongs
/// there. One pass over the text.
fn redact_keys(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut previous: Option<char> = None;
    let mut at = 0;
    while let Some(c) = message[at..].chars().next() {
        let rest = &message[at..];
        // Only a whole word: `task-sk-1` is not a key.
        let word_start = previous.is_none_or(|p| !p.is_alphanumeric() && p != '-' && p != '_');
        if word_start && (rest.starts_with("sk-") || rest.starts_with("AIza")) {
            let len = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || "-_*.…".contains(c)))
                .unwrap_or(rest.len());
            // A key's tail ends before a sentence's full stop.
            let key = rest[..len].trim_end_matches('.');
            out.push_str("[key redacted]");
            previous = key.chars().next_back();
            at += key.len();
        } else {
            out.push(c);
            previous = Some(c);
            at += c.len_utf8();
        }
    }
    out
}

/// A provider's (or a transport's) text as statuses and logs may carry it: cut to
/// [`MESSAGE_LIMIT`] bytes on a character boundary, then with key-like words redacted
/// ([`redact_keys`]; a key cut at the limit still starts with its prefix).
pub(crate) fn bounded_message(mut text: String) -> String {
    if text.len() > MESSAGE_LIMIT {
        text.truncate(text.floor_char_boundary(MESSAGE_LIMIT));
        text.push('…');
    }
    redact_keys(&text)
}

/// An incremental Server-Sent Events decoder (WHATWG HTML §9.2.6) for `data:` events: lines end
/// in CRLF, LF or CR (also split across chunks), a blank line dispatches the event, `:` lines
/// are comments, `event`/`id`/`retry` are ignored (no provider here needs them). Lines that are
/// no SSE field at all are kept apart as "trailing" content for the provider to inspect.
/// Memory is bounded by the caller's byte cap: nothing is kept that was not read. As the spec
/// says, a byte-order mark opening the stream is dropped; and an event whose data is empty or
/// blank (`data:` alone, a keep-alive some proxies send) is skipped rather than handed to a
/// provider's JSON parser, which would fail the call.
pub(crate) struct SseDecoder {
    backend: &'static str,
    /// Whether the stream's first bytes (where a BOM may be) have been seen.
    started: bool,
    line: Vec<u8>,
    data: Vec<u8>,
    has_data: bool,
    after_cr: bool,
    trailing: Vec<u8>,
}

impl SseDecoder {
    pub(crate) fn new(backend: &'static str) -> Self {
        Self {
            backend,
            started: false,
            line: Vec::new(),
            data: Vec::new(),
            has_data: false,
            after_cr: false,
            trailing: Vec::new(),
        }
    }

    /// Consumes `chunk`, dispatching every event it completes.
    pub(crate) fn feed(
        &mut self,
        chunk: &[u8],
        handler: &mut dyn SseHandler,
    ) -> Result<Flow, LlmError> {
        let mut rest = chunk;
        if !self.started {
            // The BOM's three bytes may come split across the first chunks: wait for them.
            const BOM: &[u8] = "\u{feff}".as_bytes();
            self.line.extend_from_slice(rest);
            if self.line.len() < BOM.len() && BOM.starts_with(&self.line) {
                return Ok(Flow::Continue);
            }
            self.started = true;
            let held = std::mem::take(&mut self.line);
            let held = held.strip_prefix(BOM).unwrap_or(&held);
            return self.feed(held, handler);
        }
        while let Some(pos) = rest.iter().position(|&b| b == b'\n' || b == b'\r') {
            let byte = rest[pos];
            let skip_lf = byte == b'\n' && pos == 0 && self.after_cr;
            self.after_cr = byte == b'\r';
            if !skip_lf {
                self.line.extend_from_slice(&rest[..pos]);
                let line = std::mem::take(&mut self.line);
                if self.on_line(&line, handler)? == Flow::Done {
                    return Ok(Flow::Done);
                }
            }
            rest = &rest[pos + 1..];
        }
        if !rest.is_empty() {
            self.after_cr = false;
            self.line.extend_from_slice(rest);
        }
        Ok(Flow::Continue)
    }

    /// End of stream: a last line without terminator and an event without its blank line are
    /// still delivered (recorded Gemini streams end that way).
    pub(crate) fn finish(&mut self, handler: &mut dyn SseHandler) -> Result<Flow, LlmError> {
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            if self.on_line(&line, handler)? == Flow::Done {
                return Ok(Flow::Done);
            }
        }
        self.dispatch(handler)
    }

    /// Non-SSE lines seen, joined with `\n`.
    pub(crate) fn trailing(&self) -> &[u8] {
        &self.trailing
    }

    fn on_line(&mut self, line: &[u8], handler: &mut dyn SseHandler) -> Result<Flow, LlmError> {
        if line.is_empty() {
            return self.dispatch(handler);
        }
        if line[0] == b':' {
            return Ok(Flow::Continue);
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" => {
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
            b"event" | b"id" | b"retry" => {}
            // llama.cpp's server streams a failure as an `error:` line (then `data: [DONE]`):
            // the provider's error object, which says what went wrong and whether to retry.
            b"error" => {
                let error = serde_json::from_slice::<Value>(value)
                    .ok()
                    .and_then(|error| {
                        ProviderError::from_value(&serde_json::json!({ "error": error }))
                    });
                return Err(match error {
                    Some(error) => error_for_provider_error(self.backend, &error),
                    None => malformed(
                        self.backend,
                        format!("stream error: {}", String::from_utf8_lossy(value)),
                    ),
                });
            }
            _ => {
                if !self.trailing.is_empty() {
                    self.trailing.push(b'\n');
                }
                self.trailing.extend_from_slice(line);
            }
        }
        Ok(Flow::Continue)
    }

    fn dispatch(&mut self, handler: &mut dyn SseHandler) -> Result<Flow, LlmError> {
        if !self.has_data {
            return Ok(Flow::Continue);
        }
        self.has_data = false;
        let data = std::mem::take(&mut self.data);
        if data.iter().all(u8::is_ascii_whitespace) {
            return Ok(Flow::Continue);
        }
        let data = String::from_utf8(data).map_err(|_| LlmError::Malformed {
            backend: self.backend.to_owned(),
            message: "stream event is not UTF-8".to_owned(),
        })?;
        handler.on_event(&data)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[derive(Default)]
    struct Collect {
        events: Vec<String>,
        ended: Option<Vec<u8>>,
    }

    impl SseHandler for Collect {
        fn reset(&mut self) {
            *self = Self::default();
        }
        fn on_event(&mut self, data: &str) -> Result<Flow, LlmError> {
            self.events.push(data.to_owned());
            Ok(if data == "[DONE]" {
                Flow::Done
            } else {
                Flow::Continue
            })
        }
        fn on_end(&mut self, trailing: &[u8]) -> Result<(), LlmError> {
            self.ended = Some(trailing.to_vec());
            Ok(())
        }
    }

    fn decode_in_pieces(input: &[u8], piece: usize) -> (Collect, Vec<u8>) {
        let mut decoder = SseDecoder::new("test");
        let mut handler = Collect::default();
        for chunk in input.chunks(piece) {
            if decoder.feed(chunk, &mut handler).unwrap() == Flow::Done {
                return (handler, decoder.trailing().to_vec());
            }
        }
        decoder.finish(&mut handler).unwrap();
        (handler, decoder.trailing().to_vec())
    }

    #[test]
    fn sse_handles_crlf_lf_cr_split_anywhere() {
        let input = b"data: a\r\n\r\ndata: b\n\ndata:c\r\rdata: d1\r\ndata: d2\r\n\r\n: comment\nevent: x\nid: 1\n\n";
        for piece in 1..input.len() {
            let (handler, trailing) = decode_in_pieces(input, piece);
            assert_eq!(handler.events, ["a", "b", "c", "d1\nd2"], "piece {piece}");
            assert!(trailing.is_empty());
        }
    }

    #[test]
    fn sse_delivers_an_unterminated_last_event_and_keeps_non_sse_lines() {
        let input = b"data: one\n\n{\n  \"error\": {\"code\": 499}\n}\n";
        let (handler, trailing) = decode_in_pieces(input, 3);
        assert_eq!(handler.events, ["one"]);
        assert_eq!(trailing, b"{\n  \"error\": {\"code\": 499}\n}");
        let (handler, _) = decode_in_pieces(b"data: last\r\n", 4);
        assert_eq!(handler.events, ["last"]);
        let (handler, _) = decode_in_pieces(b"data: last", 4);
        assert_eq!(handler.events, ["last"]);
    }

    #[test]
    fn an_sse_error_line_is_the_providers_error() {
        // What llama.cpp's server sends when the prompt exceeds its context.
        let input = b"error: {\"code\":400,\"message\":\"the request exceeds the available context size\",\"type\":\"exceed_context_size_error\"}\n\ndata: [DONE]\n\n";
        let mut decoder = SseDecoder::new("openai");
        let mut handler = Collect::default();
        let error = decoder.feed(input, &mut handler).unwrap_err();
        assert!(
            matches!(&error, LlmError::BadRequest { message, .. } if message.contains("context size")),
            "{error:?}"
        );
        let mut decoder = SseDecoder::new("openai");
        let error = decoder
            .feed(b"error: not json\n\n", &mut Collect::default())
            .unwrap_err();
        assert!(matches!(error, LlmError::Malformed { .. }), "{error:?}");
    }

    #[test]
    fn sse_drops_a_leading_bom_and_skips_blank_keep_alive_events() {
        let input = "\u{feff}data: a\n\ndata:\n\ndata: \n\ndata:  \r\n\r\ndata: b\n\n\u{feff}x\n";
        for piece in 1..input.len() {
            let (handler, trailing) = decode_in_pieces(input.as_bytes(), piece);
            assert_eq!(handler.events, ["a", "b"], "piece {piece}");
            // Only the stream's first BOM is dropped; a later one is content.
            assert_eq!(trailing, "\u{feff}x".as_bytes(), "piece {piece}");
        }
        // A stream shorter than a BOM is still read.
        let (handler, trailing) = decode_in_pieces(b"\xef\xbb", 1);
        assert!(handler.events.is_empty());
        assert_eq!(trailing, b"\xef\xbb");
    }

    #[test]
    fn sse_stops_at_done() {
        let (handler, _) = decode_in_pieces(b"data: x\n\ndata: [DONE]\n\ndata: after\n\n", 5);
        assert_eq!(handler.events, ["x", "[DONE]"]);
    }

    #[test]
    fn sse_rejects_non_utf8_event() {
        let mut decoder = SseDecoder::new("test");
        let mut handler = Collect::default();
        let error = decoder
            .feed(b"data: \xff\xfe\n\n", &mut handler)
            .unwrap_err();
        assert!(matches!(error, LlmError::Malformed { .. }));
    }

    #[test]
    fn retry_after_seconds_and_http_date() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("1.5", now),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:50:07 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-3", now), None);
        assert_eq!(parse_retry_after("1e400", now), None);
    }

    #[test]
    fn proto_durations() {
        assert_eq!(
            parse_proto_duration("34.4s"),
            Some(Duration::from_millis(34_400))
        );
        assert_eq!(parse_proto_duration("53s"), Some(Duration::from_secs(53)));
        assert_eq!(parse_proto_duration("s"), None);
        assert_eq!(parse_proto_duration("-1s"), None);
        assert_eq!(parse_proto_duration("1e999s"), None);
        assert_eq!(parse_proto_duration("99999999999999999999999s"), None);
        assert_eq!(parse_proto_duration("12"), None);
    }

    #[test]
    fn status_map() {
        let kind = |status: u16| error_for_status("x", status, b"", None);
        assert!(matches!(kind(401), LlmError::Auth { .. }));
        assert!(matches!(kind(403), LlmError::Auth { .. }));
        assert!(matches!(kind(429), LlmError::RateLimited { .. }));
        for status in [400, 404, 413, 422] {
            assert!(
                matches!(kind(status), LlmError::BadRequest { .. }),
                "{status}"
            );
        }
        for status in [408, 499, 500, 502, 503, 504] {
            assert!(
                matches!(kind(status), LlmError::Server { status: s, .. } if s == status),
                "{status}"
            );
        }
        assert!(matches!(kind(302), LlmError::Malformed { .. }));
    }

    #[test]
    fn provider_messages_and_retry_delay_from_bodies() {
        let body = br#"{"error":{"code":429,"message":"quota","status":"RESOURCE_EXHAUSTED",
            "details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"2.5s"}]}}"#;
        let error = error_for_status("gemini", 429, body, None);
        assert_eq!(
            error,
            LlmError::RateLimited {
                backend: "gemini".into(),
                retry_after: Some(Duration::from_millis(2500)),
                message: "RESOURCE_EXHAUSTED: quota".into()
            }
        );
        // With both a header and RetryInfo, the longer delay (a proxy's `Retry-After: 0` does
        // not cut the provider's own short).
        for (header, asked) in [(0, 2500), (1000, 2500), (5000, 5000)] {
            let error = error_for_status("gemini", 429, body, Some(Duration::from_millis(header)));
            assert_eq!(
                error.retry_after(),
                Some(Duration::from_millis(asked)),
                "Retry-After {header} ms"
            );
        }
        let array = br#"[{"error":{"code":503,"message":"overloaded","status":"UNAVAILABLE"}}]"#;
        assert_eq!(
            error_for_status("gemini", 503, array, None).to_string(),
            "gemini: server error 503: UNAVAILABLE: overloaded"
        );
        let openai = br#"{"error":{"message":"Incorrect API key","type":"invalid_request_error","code":"invalid_api_key"}}"#;
        assert_eq!(
            error_for_status("openai", 401, openai, None).to_string(),
            "openai: authentication failed: invalid_request_error: Incorrect API key"
        );
        // In a 2xx body or a stream there is no HTTP status: OpenAI's specific `code` decides
        // over its broad `type`, and an unknown code leaves it to the type.
        for (body, kind) in [
            (&openai[..], "auth"),
            (
                br#"{"error":{"message":"m","type":"invalid_request_error","code":"model_not_found"}}"#,
                "bad request",
            ),
            (
                br#"{"error":{"message":"m","type":"tokens","code":"rate_limit_exceeded"}}"#,
                "rate limited",
            ),
            (
                br#"{"error":{"message":"m","type":"invalid_request_error","code":"context_length_exceeded"}}"#,
                "bad request",
            ),
            (
                br#"{"error":{"message":"m","type":"server_error","code":"who_knows"}}"#,
                "server",
            ),
            (
                br#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#,
                "quota",
            ),
        ] {
            if kind == "quota" {
                // The same body with its HTTP 429: billing, not throttling, so not retried.
                let error = error_for_status("openai", 429, body, Some(Duration::from_secs(2)));
                assert!(
                    matches!(error, LlmError::QuotaExhausted { .. }) && !error.is_retryable(),
                    "{error:?}"
                );
            }
            let error = error_for_provider_error("openai", &ProviderError::from_body(body).unwrap());
            let got = match error {
                LlmError::Auth { .. } => "auth",
                LlmError::QuotaExhausted { .. } => "quota",
                LlmError::BadRequest { .. } => "bad request",
                LlmError::RateLimited { .. } => "rate limited",
                LlmError::Server { .. } => "server",
                _ => "other",
            };
            assert_eq!(got, kind, "{}", String::from_utf8_lossy(body));
        }
        // A 5xx keeps the delay it asked for: the header's, else RetryInfo's.
        let wait = Duration::from_secs(7);
        assert_eq!(
            error_for_status("gemini", 503, b"", Some(wait)).retry_after(),
            Some(wait)
        );
        let info = br#"{"error":{"code":503,"message":"overloaded","status":"UNAVAILABLE",
            "details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"2.5s"}]}}"#;
        assert_eq!(
            error_for_status("gemini", 503, info, None).retry_after(),
            Some(Duration::from_millis(2500))
        );
        assert_eq!(
            error_for_provider_error("gemini", &ProviderError::from_body(info).unwrap())
                .retry_after(),
            Some(Duration::from_millis(2500))
        );
        assert_eq!(
            error_for_status("gemini", 500, b"", None).retry_after(),
            None
        );
        // OpenAI echoes the key it refused, masked but with its tail: none of it is kept.
        let echoed = br#"{"error":{"message":"Incorrect API key provided: sk-proj-****************************************bC9A. You can find your API key at https://platform.openai.com/account/api-keys.","type":"invalid_request_error","code":"invalid_api_key"}}"#;
        assert_eq!(
            error_for_status("openai", 401, echoed, None).to_string(),
            "openai: authentication failed: invalid_request_error: Incorrect API key provided: \
             [key redacted]. You can find your API key at \
             https://platform.openai.com/account/api-keys."
        );
        assert_eq!(
            redact_keys("key AIzaSyA-1_b, task-sk-1, «sk-x» sk-"),
            "key [key redacted], task-sk-1, «[key redacted]» [key redacted]"
        );
        // Non-JSON bodies and long messages too (a key cut at the limit still goes).
        let html = b"<p>Bad gateway for sk-proj-abcdef</p>";
        assert_eq!(
            error_for_status("openai", 502, html, None).to_string(),
            "openai: server error 502: HTTP 502 Bad Gateway: <p>Bad gateway for [key redacted]</p>"
        );
        let long = format!("{} sk-proj-abcdef", "y ".repeat(MESSAGE_LIMIT / 2 - 4));
        let cut = bounded_message(long);
        assert!(
            cut.ends_with("[key redacted]") && !cut.contains("sk-"),
            "{cut}"
        );
        // LiteLLM's proxy sends the code as a string.
        let litellm = br#"{"error":{"message":"Invalid proxy server token passed","type":"auth_error","code":"401"}}"#;
        assert!(matches!(
            error_for_provider_error("openai", &ProviderError::from_body(litellm).unwrap()),
            LlmError::Auth { .. }
        ));
        let ollama = br#"{"error":"model \"x\" not found, try pulling it first"}"#;
        assert_eq!(
            error_for_status("openai", 404, ollama, None).to_string(),
            "openai: bad request: model \"x\" not found, try pulling it first"
        );
        let html = b"<html>\n<body>Bad gateway</body></html>";
        assert_eq!(
            error_for_status("openai", 502, html, None).to_string(),
            "openai: server error 502: HTTP 502 Bad Gateway: <html> <body>Bad gateway</body></html>"
        );
        let key = br#"{"error":{"code":400,"message":"API key not valid.","status":"INVALID_ARGUMENT",
            "details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID"}]}}"#;
        assert!(matches!(
            error_for_status("gemini", 400, key, None),
            LlmError::Auth { .. }
        ));
    }

    #[test]
    fn a_stream_ends_cleanly_on_whitespace_with_its_error_on_json_and_malformed_otherwise() {
        assert!(stream_end("gemini", b"").is_ok());
        assert!(stream_end("gemini", b"\r\n \n").is_ok());
        let json = br#"{"error":{"code":503,"message":"overloaded","status":"UNAVAILABLE"}}"#;
        assert!(matches!(
            stream_end("gemini", json),
            Err(LlmError::Server { status: 503, .. })
        ));
        match stream_end("openai", b"<html>bad gateway</html>") {
            Err(LlmError::Malformed { backend, message }) => {
                assert_eq!(backend, "openai");
                assert!(message.contains("<html>bad gateway"), "{message}");
            }
            other => panic!("expected a malformed stream, got {other:?}"),
        }
    }

    #[test]
    fn provider_error_inside_a_stream_maps_by_status_name() {
        let value: Value = serde_json::from_str(
            r#"{"error":{"message":"The operation was cancelled.","status":"CANCELLED"}}"#,
        )
        .unwrap();
        let error = ProviderError::from_value(&value).unwrap();
        assert!(matches!(
            error_for_provider_error("gemini", &error),
            LlmError::Server { status: 499, .. }
        ));
        let value: Value =
            serde_json::from_str(r#"{"error":{"message":"m","type":"server_error","code":null}}"#)
                .unwrap();
        let error = ProviderError::from_value(&value).unwrap();
        assert!(matches!(
            error_for_provider_error("openai", &error),
            LlmError::Server { status: 500, .. }
        ));
    }

    #[test]
    fn hostile_error_bodies_are_cut_and_never_panic() {
        let long = format!(
            r#"{{"error":{{"code":500,"message":"{}"}}}}"#,
            "é".repeat(5000)
        );
        let message = error_for_status("x", 500, long.as_bytes(), None).to_string();
        assert!(message.len() < MESSAGE_LIMIT + 64, "{}", message.len());
        for body in [
            &b"\xff\xfe\x00"[..],
            b"[]",
            b"[1]",
            b"{\"error\":5}",
            b"{\"error\":{\"code\":-1,\"details\":[5,{\"@type\":null}]}}",
            b"{\"error\":{\"code\":70000}}",
        ] {
            let _ = error_for_status("x", 500, body, None);
        }
    }

    #[test]
    fn a_delay_the_provider_asked_for_is_a_jittered_floor() {
        let limits = HttpLimits::default();
        let asked = Duration::from_secs(38);
        let far = Duration::from_secs(3600);
        let waits: std::collections::HashSet<Duration> = (0..50)
            .map(|_| fitted_wait(&limits, 0, Some(asked), far).unwrap())
            .inspect(|wait| assert!(*wait >= asked && *wait < asked + asked / 10, "{wait:?}"))
            .collect();
        assert!(waits.len() > 40, "not spread: {waits:?}");
        // Zero asked: the ordinary backoff still applies.
        let wait = fitted_wait(&limits, 2, Some(Duration::ZERO), far).unwrap();
        assert!(wait >= limits.initial_backoff * 2, "{wait:?}");
        // The largest header value cannot fit, and neither overflows nor panics.
        let most = Duration::from_secs(u64::MAX);
        assert_eq!(fitted_wait(&limits, 0, Some(most), far), None);
        assert!(retry_wait(&limits, 0, Some(most)).0 == most);
    }

    #[test]
    fn retry_after_ms_is_read_before_retry_after() {
        let now = SystemTime::now();
        let mut headers = HeaderMap::new();
        assert_eq!(asked_delay(&headers, now), None);
        headers.insert(RETRY_AFTER, "20".parse().unwrap());
        assert_eq!(asked_delay(&headers, now), Some(Duration::from_secs(20)));
        headers.insert("retry-after-ms", "19436".parse().unwrap());
        assert_eq!(
            asked_delay(&headers, now),
            Some(Duration::from_millis(19_436))
        );
        // Unreadable: the other header still counts.
        headers.insert("retry-after-ms", "soon".parse().unwrap());
        assert_eq!(asked_delay(&headers, now), Some(Duration::from_secs(20)));
        headers.insert("retry-after-ms", "-5".parse().unwrap());
        assert_eq!(asked_delay(&headers, now), Some(Duration::from_secs(20)));
    }

    #[test]
    fn the_spread_of_an_asked_delay_is_cut_to_the_time_left_but_the_delay_is_not() {
        let limits = HttpLimits::default();
        let asked = Duration::from_secs(38);
        // 40 s left: always retried, starting by 39.9 s (the spread alone would reach 41.8).
        let room = Duration::from_secs(40);
        for _ in 0..200 {
            let wait = fitted_wait(&limits, 0, Some(asked), room).expect("the delay fits");
            assert!(wait >= asked && wait <= room - MIN_RETRY_WINDOW, "{wait:?}");
        }
        // Less than the delay (plus the window to finish in) left: no retry.
        assert_eq!(
            fitted_wait(&limits, 0, Some(asked), asked + MIN_RETRY_WINDOW / 2),
            None
        );
        assert_eq!(
            fitted_wait(&limits, 0, None, Duration::from_millis(50)),
            None
        );
    }

    #[test]
    fn backoff_is_jittered_within_bounds_and_capped() {
        let limits = HttpLimits::default();
        for retry in 0..40 {
            let wait = backoff(&limits, retry);
            let base = limits
                .initial_backoff
                .saturating_mul(1 << retry.min(16))
                .min(limits.max_backoff);
            assert!(wait >= base / 2 && wait <= base, "{retry}: {wait:?}");
        }
        // Jittered: callers failing together do not retry together. 50 draws, at nanosecond
        // resolution from the upper half of the window, all differ but for a rare collision.
        let waits: std::collections::HashSet<Duration> =
            (0..50).map(|_| backoff(&limits, 2)).collect();
        assert!(waits.len() > 40, "not jittered: {waits:?}");
    }

    #[test]
    fn base_urls() {
        assert_eq!(
            join_url("http://127.0.0.1:8080/", "/v1/chat/completions")
                .unwrap()
                .as_str(),
            "http://127.0.0.1:8080/v1/chat/completions"
        );
        assert_eq!(
            join_url(
                "https://proxy.example/llm",
                "/v1beta/models/m:generateContent"
            )
            .unwrap()
            .as_str(),
            "https://proxy.example/llm/v1beta/models/m:generateContent"
        );
        assert!(join_url("ftp://x", "/a").is_err());
        assert!(join_url("not a url", "/a").is_err());
        assert!(join_url("http://x/?q=1", "/a").is_err());
    }

    #[test]
    fn a_key_in_a_base_url_never_reaches_the_error_message() {
        for (base, shown) in [
            (
                "https://generativelanguage.googleapis.com?key=AIzaSECRET",
                "https://generativelanguage.googleapis.com/?redacted",
            ),
            (
                "https://generativelanguage.googleapis.com/#key=AIzaSECRET",
                "https://generativelanguage.googleapis.com/#redacted",
            ),
            ("ftp://bob:AIzaSECRET@x/", "ftp://redacted:redacted@x/"),
            ("htp//bob:AIzaSECRET@x/", "\"<redacted>@x/\""),
            ("x y?key=AIzaSECRET", "\"x y<redacted>\""),
        ] {
            let error = join_url(base, "/a").unwrap_err().to_string();
            assert!(!error.contains("SECRET"), "{error}");
            assert!(error.contains(shown), "{error}");
        }
        assert_eq!(
            redacted_url("http://127.0.0.1:8080/v1"),
            "http://127.0.0.1:8080/v1"
        );
    }
}
