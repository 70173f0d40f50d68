//! Turns a [`Fault`] into a response, provider-neutral: the provider modules render the JSON
//! and SSE shapes, this module decides what is sent when, through a bounded channel so bytes
//! reach the socket as they are produced and a client that hangs up is noticed at once.

use std::time::Duration;

use axum::{
    body::{Body, Bytes},
    http::{HeaderValue, StatusCode, header},
    response::Response,
};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{Exchange, Fault, FinishKind, Flavor, Shared, gemini, openai};

/// The filler of huge bodies: one static 64 KiB block sent over and over, so a 100 MB body
/// costs no memory.
pub static HUGE_CHUNK: [u8; 64 * 1024] = [b'a'; 64 * 1024];

/// One step of a scripted body.
enum Step {
    Send(Bytes),
    Sleep(Duration),
    /// `n` bytes of [`HUGE_CHUNK`].
    Filler(u64),
}

/// The provider-specific pieces of an answer.
struct Rendered {
    /// The whole non-streamed JSON body.
    json: Bytes,
    /// The SSE frames of the streamed answer (each with its blank-line terminator).
    frames: Vec<Bytes>,
}

fn render(exchange: &Exchange, text: &str, finish: FinishKind) -> Rendered {
    match exchange.shared.flavor {
        Flavor::Gemini => Rendered {
            json: to_bytes(&gemini::answer_json(exchange, text, finish)),
            frames: gemini::answer_frames(exchange, text, finish),
        },
        Flavor::OpenAi => Rendered {
            json: to_bytes(&openai::answer_json(exchange, text, finish)),
            frames: openai::answer_frames(exchange, text, finish),
        },
    }
}

pub(crate) fn to_bytes(value: &Value) -> Bytes {
    Bytes::from(serde_json::to_vec(value).unwrap())
}

fn error_response(exchange: Exchange, status: u16) -> Response {
    let body = match exchange.shared.flavor {
        Flavor::Gemini => gemini::error_json(status),
        Flavor::OpenAi => openai::error_json(status),
    };
    whole(
        exchange,
        status,
        "application/json; charset=UTF-8",
        to_bytes(&body),
    )
}

/// Answers one request according to `fault` (`Fault::Delay` was already waited for).
pub(crate) fn respond(exchange: Exchange, stream: bool, fault: Fault) -> Response {
    let sse = "text/event-stream";
    let json = "application/json; charset=UTF-8";
    match fault {
        Fault::Ok | Fault::Delay(_) => {
            let text = exchange.answer.clone();
            success(exchange, stream, &text, FinishKind::Stop)
        }
        Fault::Finish { kind, text } => success(exchange, stream, &text, kind),
        Fault::Status(status) => error_response(exchange, status),
        Fault::RateLimited {
            retry_after,
            retry_delay,
        } => {
            let body = match exchange.shared.flavor {
                Flavor::Gemini => gemini::rate_limited_json(retry_delay.as_deref()),
                Flavor::OpenAi => openai::error_json(429),
            };
            let mut response = whole(exchange, 429, json, to_bytes(&body));
            if let Some(value) = retry_after {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_str(&value).unwrap());
            }
            response
        }
        Fault::Stall(stall) => {
            let text = exchange.answer.clone();
            let rendered = render(&exchange, &text, FinishKind::Stop);
            let mut steps = Vec::new();
            if stream {
                let mut frames = rendered.frames.into_iter();
                steps.extend(frames.next().map(Step::Send));
                steps.push(Step::Sleep(stall));
                steps.extend(frames.map(Step::Send));
                scripted(exchange, 200, sse, None, steps)
            } else {
                let half = rendered.json.len() / 2;
                steps.push(Step::Send(rendered.json.slice(..half)));
                steps.push(Step::Sleep(stall));
                steps.push(Step::Send(rendered.json.slice(half..)));
                scripted(exchange, 200, json, None, steps)
            }
        }
        Fault::Truncated => {
            let text = exchange.answer.clone();
            let rendered = render(&exchange, &text, FinishKind::Stop);
            if stream {
                let mut steps: Vec<Step> = Vec::new();
                let frames = rendered.frames;
                let (cut, before) = match frames.len() {
                    0 => (Bytes::new(), &frames[..]),
                    1 => (frames[0].slice(..frames[0].len() / 2), &frames[..0]),
                    n => (frames[1].slice(..frames[1].len() / 2), &frames[..n.min(1)]),
                };
                steps.extend(before.iter().cloned().map(Step::Send));
                steps.push(Step::Send(cut));
                scripted(exchange, 200, sse, None, steps)
            } else {
                let half = rendered.json.slice(..rendered.json.len() / 2);
                scripted(exchange, 200, json, None, vec![Step::Send(half)])
            }
        }
        Fault::InvalidJson => {
            let page = "<html><body><h1>502 Bad Gateway</h1>upstream went away</body></html>";
            if stream {
                let frame = Bytes::from(format!("data: {page}\n\n"));
                scripted(exchange, 200, sse, None, vec![Step::Send(frame)])
            } else {
                whole(exchange, 200, json, Bytes::from(page))
            }
        }
        Fault::Huge {
            bytes,
            declare_length,
        } => {
            let prefix: &'static str = match (exchange.shared.flavor, stream) {
                (Flavor::Gemini, false) => r#"{"candidates":[{"content":{"parts":[{"text":""#,
                (Flavor::Gemini, true) => r#"data: {"candidates":[{"content":{"parts":[{"text":""#,
                (Flavor::OpenAi, false) => r#"{"choices":[{"index":0,"message":{"content":""#,
                (Flavor::OpenAi, true) => r#"data: {"choices":[{"index":0,"delta":{"content":""#,
            };
            let prefix = Bytes::from_static(prefix.as_bytes());
            let filler = bytes.saturating_sub(prefix.len() as u64);
            let length = declare_length.then_some(bytes.max(prefix.len() as u64));
            let content_type = if stream { sse } else { json };
            let steps = vec![Step::Send(prefix), Step::Filler(filler)];
            scripted(exchange, 200, content_type, length, steps)
        }
        Fault::MidStreamError(status) => {
            if !stream {
                return error_response(exchange, status);
            }
            let text = exchange.answer.clone();
            let rendered = render(&exchange, &text, FinishKind::Stop);
            let error = match exchange.shared.flavor {
                Flavor::Gemini => gemini::mid_stream_error(status),
                Flavor::OpenAi => openai::mid_stream_error(status),
            };
            let mut steps: Vec<Step> = rendered
                .frames
                .into_iter()
                .take(1)
                .map(Step::Send)
                .collect();
            steps.push(Step::Send(error));
            scripted(exchange, 200, sse, None, steps)
        }
        Fault::Raw {
            status,
            content_type,
            body,
        } => whole(exchange, status, &content_type, body),
    }
}

fn success(exchange: Exchange, stream: bool, text: &str, finish: FinishKind) -> Response {
    let rendered = render(&exchange, text, finish);
    if stream {
        let steps = rendered.frames.into_iter().map(Step::Send).collect();
        scripted(exchange, 200, "text/event-stream", None, steps)
    } else {
        whole(
            exchange,
            200,
            "application/json; charset=UTF-8",
            rendered.json,
        )
    }
}

/// A response whose body is known now.
fn whole(exchange: Exchange, status: u16, content_type: &str, body: Bytes) -> Response {
    exchange.shared.add_sent(body.len());
    exchange.tracker.finish();
    builder(status, content_type)
        .body(Body::from(body))
        .unwrap()
}

/// A JSON response (routing and key errors).
pub(crate) fn json_response(status: u16, body: &Value) -> Response {
    builder(status, "application/json; charset=UTF-8")
        .body(Body::from(to_bytes(body)))
        .unwrap()
}

fn builder(status: u16, content_type: &str) -> axum::http::response::Builder {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap())
        .header(header::CONTENT_TYPE, content_type)
}

/// A response whose body is produced step by step by a task; the request counts as answered
/// only once the last byte was handed over, and as cancelled if the client left before.
fn scripted(
    exchange: Exchange,
    status: u16,
    content_type: &str,
    content_length: Option<u64>,
    steps: Vec<Step>,
) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    let Exchange {
        tracker, shared, ..
    } = exchange;
    tokio::spawn(async move {
        for step in steps {
            match step {
                Step::Send(bytes) => {
                    if !send(&tx, &shared, bytes).await {
                        return;
                    }
                }
                Step::Sleep(duration) => {
                    tokio::select! {
                        () = tokio::time::sleep(duration) => {}
                        () = tx.closed() => return,
                    }
                }
                Step::Filler(mut left) => {
                    while left > 0 {
                        let n = left.min(HUGE_CHUNK.len() as u64) as usize;
                        if !send(&tx, &shared, Bytes::from_static(&HUGE_CHUNK[..n])).await {
                            return;
                        }
                        left -= n as u64;
                    }
                }
            }
        }
        tracker.finish();
    });
    let mut builder = builder(status, content_type);
    if let Some(length) = content_length {
        builder = builder.header(header::CONTENT_LENGTH, length);
    }
    builder
        .body(Body::from_stream(ReceiverStream::new(rx)))
        .unwrap()
}

/// Hands `bytes` to the connection; `false` once the client is gone. Counted before the hand-over
/// so that a client which has read them never sees a smaller count.
async fn send(
    tx: &mpsc::Sender<Result<Bytes, std::io::Error>>,
    shared: &Shared,
    bytes: Bytes,
) -> bool {
    let len = bytes.len();
    shared.add_sent(len);
    if tx.send(Ok(bytes)).await.is_err() {
        shared.sub_sent(len);
        return false;
    }
    true
}

/// Splits `text` into up to three pieces on character boundaries, so streamed answers arrive
/// in several events as real ones do.
pub(crate) fn pieces(text: &str) -> Vec<&str> {
    if text.is_empty() {
        return vec![];
    }
    let third = text.len().div_ceil(3);
    let mut out = Vec::new();
    let mut start = 0;
    while start < text.len() {
        let mut end = (start + third).min(text.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        out.push(&text[start..end]);
        start = end;
    }
    out
}

/// Token estimate of a text: about four bytes per token.
pub(crate) fn tokens(text: &str) -> u64 {
    (text.len() as u64).div_ceil(4)
}
