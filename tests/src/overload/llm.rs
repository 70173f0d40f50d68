//! A fake Gemini built for load, not for assertions: it answers `generateContent` after a fixed
//! delay with a ~2 KB JSON answer of the shape the pipeline asked for, and only counts.
//!
//! Why not [`crate::fakes::FakeLlm`]: that fake keeps every request (headers and parsed JSON
//! body) so tests can assert on them. Under the overload runs the service sends ~60 map prompts
//! of ~100 KB per second for minutes, which would pile up hundreds of MB in the driving process
//! and spend its CPU on JSON parsing, on the same two cores the server under test runs on. This
//! one keeps counters only and never parses the prompt.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{DefaultBodyLimit, State},
    http::{HeaderMap, StatusCode, Uri, header},
    response::Response,
};
use serde_json::json;
use tokio::{net::TcpListener, task::JoinHandle};

/// The key the fake requires in `x-goog-api-key`, and the service is given.
pub const FAKE_GEMINI_KEY: &str = "overload-fake-gemini-key";

/// Largest request body accepted: far above any prompt the service may build (the prompt
/// budget is at most 1 MiB), so a refusal here would be a bug in the service, not a limit.
const MAX_BODY: usize = 16 << 20;

/// What the fake has seen so far.
#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    answered: AtomicU64,
    cancelled: AtomicU64,
    prompt_bytes: AtomicU64,
}

/// Counts a request as cancelled when its handler is dropped before answering: hyper drops the
/// handler future when the service closes the connection or resets the call (its deadline).
struct InFlight {
    counters: Arc<Counters>,
    done: bool,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let counter = if self.done {
            &self.counters.answered
        } else {
            &self.counters.cancelled
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

struct Shared {
    delay: Duration,
    /// The whole `generateContent` responses, rendered once: map and reduce answers.
    map_answer: Bytes,
    reduce_answer: Bytes,
    counters: Arc<Counters>,
}

/// A snapshot of the fake's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LlmCounts {
    /// Requests received.
    pub requests: u64,
    /// Requests answered in full.
    pub answered: u64,
    /// Requests the service abandoned before the answer (deadline, cancellation, crash).
    pub cancelled: u64,
    /// Request body bytes received (prompts plus JSON framing).
    pub prompt_bytes: u64,
}

/// The fake Gemini server; stops when dropped.
#[derive(Debug)]
pub struct LoadGemini {
    addr: SocketAddr,
    counters: Arc<Counters>,
    server: JoinHandle<()>,
}

impl Drop for LoadGemini {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl LoadGemini {
    /// Starts the fake on an ephemeral loopback port; every answer leaves after `delay` and
    /// carries an answer text of about `answer_bytes` bytes.
    pub async fn start(delay: Duration, answer_bytes: usize) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let shared = Arc::new(Shared {
            delay,
            map_answer: render("insight", answer_bytes),
            reduce_answer: render("summary", answer_bytes),
            counters: counters.clone(),
        });
        let app = Router::new()
            .fallback(generate)
            .layer(DefaultBodyLimit::max(MAX_BODY))
            .with_state(shared);
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            addr,
            counters,
            server,
        })
    }

    /// `http://127.0.0.1:PORT`, for `--llm-base-url`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The counters now.
    pub fn counts(&self) -> LlmCounts {
        LlmCounts {
            requests: self.counters.requests.load(Ordering::Relaxed),
            answered: self.counters.answered.load(Ordering::Relaxed),
            cancelled: self.counters.cancelled.load(Ordering::Relaxed),
            prompt_bytes: self.counters.prompt_bytes.load(Ordering::Relaxed),
        }
    }
}

/// A whole `GenerateContentResponse` whose answer text is the JSON object the pipeline asked
/// for: `{"<field>": "...", "themes": [...]}`, padded to about `answer_bytes` bytes.
fn render(field: &str, answer_bytes: usize) -> Bytes {
    const SENTENCE: &str = "Listeners love the playlists and discovery, but ads between songs, \
                            crashes after updates and the premium price keep coming up. ";
    let text_len = answer_bytes.saturating_sub(80).max(SENTENCE.len());
    let text: String = SENTENCE.chars().cycle().take(text_len).collect();
    let answer =
        json!({field: text.trim_end(), "themes": ["ads", "playlists", "crashes", "premium"]})
            .to_string();
    let tokens = (answer.len() / 4).max(1);
    let response = json!({
        "candidates": [{
            "content": {"parts": [{"text": answer}], "role": "model"},
            "finishReason": "STOP",
            "index": 0
        }],
        "usageMetadata": {
            "promptTokenCount": 1,
            "candidatesTokenCount": tokens,
            "totalTokenCount": tokens + 1
        },
        "modelVersion": "gemini-2.5-flash"
    });
    Bytes::from(response.to_string())
}

/// Whether a request asks for the map answer (`responseSchema` with an `insight` property) or
/// the reduce answer. The key `"responseSchema"` with bare quotes cannot occur inside the
/// prompt, where JSON escapes every quote, so a substring search is exact enough and costs no
/// JSON parsing of a 100 KB prompt.
fn wants_map_answer(body: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(body) else {
        return true;
    };
    match text.rfind("\"responseSchema\"") {
        Some(at) => {
            let schema = &text[at..text.len().min(at + 512)];
            let insight = schema.find("\"insight\"");
            let summary = schema.find("\"summary\"");
            match (insight, summary) {
                (Some(i), Some(s)) => i < s,
                (Some(_), None) => true,
                _ => false,
            }
        }
        None => !text.contains("\\\"summary\\\""),
    }
}

fn plain(status: StatusCode, message: &'static str) -> Response {
    let mut response = Response::new(Body::from(message));
    *response.status_mut() = status;
    response
}

async fn generate(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let counters = &shared.counters;
    counters.requests.fetch_add(1, Ordering::Relaxed);
    counters
        .prompt_bytes
        .fetch_add(body.len() as u64, Ordering::Relaxed);
    let mut in_flight = InFlight {
        counters: counters.clone(),
        done: false,
    };
    if !uri.path().ends_with(":generateContent") {
        in_flight.done = true;
        return plain(StatusCode::NOT_FOUND, "only generateContent is faked");
    }
    if headers.get("x-goog-api-key").and_then(|v| v.to_str().ok()) != Some(FAKE_GEMINI_KEY) {
        in_flight.done = true;
        return plain(StatusCode::FORBIDDEN, "missing or wrong x-goog-api-key");
    }
    let answer = if wants_map_answer(&body) {
        shared.map_answer.clone()
    } else {
        shared.reduce_answer.clone()
    };
    drop(body);
    // If the service gives up meanwhile, hyper drops this future and `in_flight` counts it.
    tokio::time::sleep(shared.delay).await;
    in_flight.done = true;
    let mut response = Response::new(Body::from(answer));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json; charset=UTF-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_about_the_requested_size_and_parse_as_gemini_answers() {
        for field in ["insight", "summary"] {
            let bytes = render(field, 2048);
            let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            let text = value
                .pointer("/candidates/0/content/parts/0/text")
                .and_then(|t| t.as_str())
                .unwrap();
            assert!((1800..=2200).contains(&text.len()), "{}", text.len());
            let answer: serde_json::Value = serde_json::from_str(text).unwrap();
            assert!(answer.get(field).and_then(|f| f.as_str()).is_some());
        }
    }

    #[test]
    fn map_and_reduce_requests_are_told_apart_by_their_schema() {
        let map = br#"{"contents":[{"parts":[{"text":"say \"summary\" here"}]}],"generationConfig":{"responseSchema":{"type":"OBJECT","properties":{"insight":{"type":"STRING"},"themes":{}}}}}"#;
        let reduce = br#"{"contents":[{"parts":[{"text":"the \"insight\" list"}]}],"generationConfig":{"responseSchema":{"type":"OBJECT","properties":{"summary":{"type":"STRING"},"themes":{}}}}}"#;
        assert!(wants_map_answer(map));
        assert!(!wants_map_answer(reduce));
    }
}
