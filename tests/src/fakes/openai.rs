//! OpenAI chat completions' wire shapes, modelled on the recorded responses in
//! `tests/fixtures/openai/`: route, bearer check, `chat.completion` and
//! `chat.completion.chunk` streams ending in `data: [DONE]`, error bodies.

use axum::{body::Bytes, http::Method};
use serde_json::{Value, json};

use super::{
    Exchange, FinishKind, RecordedRequest, Rejection, Route,
    body::{pieces, to_bytes, tokens},
};

/// Accepts `POST /v1/chat/completions`; `stream: true` in the body selects SSE.
pub(crate) fn route(method: &Method, path: &str, body: &Value) -> Result<Route, Rejection> {
    if *method != Method::POST || path != "/v1/chat/completions" {
        return Err((
            404,
            error_value(
                &format!("Unknown request URL: {method} {path}."),
                "invalid_request_error",
                Some("unknown_url"),
            ),
        ));
    }
    let Some(model) = body.get("model").and_then(Value::as_str) else {
        return Err((
            400,
            error_value(
                "you must provide a model parameter",
                "invalid_request_error",
                None,
            ),
        ));
    };
    Ok(Route {
        stream: body.get("stream").and_then(Value::as_bool) == Some(true),
        model: model.to_owned(),
    })
}

/// OpenAI answers a missing or wrong key with 401 `invalid_api_key`.
pub(crate) fn check_key(request: &RecordedRequest, expected: &str) -> Option<Rejection> {
    let sent = request
        .header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "));
    if sent == Some(expected) {
        return None;
    }
    Some((
        401,
        error_value(
            "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys.",
            "invalid_request_error",
            Some("invalid_api_key"),
        ),
    ))
}

fn finish_name(finish: FinishKind) -> &'static str {
    match finish {
        FinishKind::Stop => "stop",
        FinishKind::MaxTokens => "length",
        FinishKind::Safety => "content_filter",
    }
}

fn usage(exchange: &Exchange, text: &str) -> Value {
    let prompt = exchange.prompt_tokens();
    let output = tokens(text);
    json!({"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output})
}

/// A whole `chat.completion`.
pub(crate) fn answer_json(exchange: &Exchange, text: &str, finish: FinishKind) -> Value {
    let content = if text.is_empty() {
        Value::Null
    } else {
        json!(text)
    };
    json!({
        "id": format!("chatcmpl-fake-{}", exchange.request.index),
        "object": "chat.completion",
        "created": 1_770_000_000,
        "model": exchange.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": null, "annotations": []},
            "logprobs": null,
            "finish_reason": finish_name(finish)
        }],
        "usage": usage(exchange, text)
    })
}

fn chunk(exchange: &Exchange, choices: Value, usage: Value) -> Bytes {
    let event = json!({
        "id": format!("chatcmpl-fake-{}", exchange.request.index),
        "object": "chat.completion.chunk",
        "created": 1_770_000_000,
        "model": exchange.model,
        "choices": choices,
        "usage": usage
    });
    let mut bytes = b"data: ".to_vec();
    bytes.extend_from_slice(&to_bytes(&event));
    bytes.extend_from_slice(b"\n\n");
    Bytes::from(bytes)
}

/// The streamed answer: a role delta, content deltas, the finish chunk, the usage chunk (when
/// `stream_options.include_usage` was asked for) and `data: [DONE]`.
pub(crate) fn answer_frames(exchange: &Exchange, text: &str, finish: FinishKind) -> Vec<Bytes> {
    let mut frames = vec![chunk(
        exchange,
        json!([{"index": 0, "delta": {"role": "assistant", "content": "", "refusal": null}, "logprobs": null, "finish_reason": null}]),
        Value::Null,
    )];
    for piece in pieces(text) {
        frames.push(chunk(
            exchange,
            json!([{"index": 0, "delta": {"content": piece}, "logprobs": null, "finish_reason": null}]),
            Value::Null,
        ));
    }
    frames.push(chunk(
        exchange,
        json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish_name(finish)}]),
        Value::Null,
    ));
    let include_usage = exchange
        .request
        .json
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);
    if include_usage {
        frames.push(chunk(exchange, json!([]), usage(exchange, text)));
    }
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    frames
}

fn error_value(message: &str, kind: &str, code: Option<&str>) -> Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
}

/// OpenAI's error body for `status`.
pub(crate) fn error_json(status: u16) -> Value {
    match status {
        429 => error_value(
            "Rate limit reached for gpt-4o-mini on requests per min (RPM): Limit 3, Used 3, Requested 1. Please try again in 20s.",
            "requests",
            Some("rate_limit_exceeded"),
        ),
        401 => error_value(
            "Incorrect API key provided.",
            "invalid_request_error",
            Some("invalid_api_key"),
        ),
        404 => error_value(
            "The model `x` does not exist or you do not have access to it.",
            "invalid_request_error",
            Some("model_not_found"),
        ),
        400..=499 => error_value(
            "Invalid request (fake OpenAI).",
            "invalid_request_error",
            None,
        ),
        _ => error_value(
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
            None,
        ),
    }
}

/// An error event inside a stream, as OpenAI sends when generation fails midway.
pub(crate) fn mid_stream_error(status: u16) -> Bytes {
    let mut bytes = b"data: ".to_vec();
    bytes.extend_from_slice(&to_bytes(&error_json(status)));
    bytes.extend_from_slice(b"\n\n");
    Bytes::from(bytes)
}
