//! Gemini's wire shapes, modelled on the recorded responses in `tests/fixtures/gemini/`:
//! routes, key check, answers (whole and SSE, CRLF-separated like Google's), error bodies with
//! `google.rpc` details.

use axum::{body::Bytes, http::Method};
use serde_json::{Value, json};

use super::{
    Exchange, FinishKind, RecordedRequest, Rejection, Route,
    body::{pieces, to_bytes, tokens},
};

/// Accepts `POST /v1beta/models/{model}:generateContent` and
/// `:streamGenerateContent?alt=sse`; anything else gets Google's 404.
pub(crate) fn route(method: &Method, path: &str, query: Option<&str>) -> Result<Route, Rejection> {
    let rest = path.strip_prefix("/v1beta/models/");
    let (model, call) = match rest.and_then(|r| r.rsplit_once(':')) {
        Some(parts) if *method == Method::POST => parts,
        _ => {
            return Err(error(
                404,
                &format!("The requested URL {path} was not found."),
            ));
        }
    };
    let stream = match call {
        "generateContent" => false,
        "streamGenerateContent" => {
            if !query.unwrap_or("").split('&').any(|p| p == "alt=sse") {
                return Err(error(
                    400,
                    "this fake streams only with alt=sse (the JSON-array form is not faked)",
                ));
            }
            true
        }
        other => {
            return Err(error(
                404,
                &format!(
                    "models/{model} is not found for API version v1beta, or is not supported for {other}."
                ),
            ));
        }
    };
    Ok(Route {
        stream,
        model: model.to_owned(),
    })
}

/// Google answers a missing key with 403 and a wrong one with 400 `API_KEY_INVALID`.
pub(crate) fn check_key(request: &RecordedRequest, expected: &str) -> Option<Rejection> {
    match request.header("x-goog-api-key") {
        Some(key) if key == expected => None,
        Some(_) => Some((
            400,
            json!({"error": {
                "code": 400,
                "message": "API key not valid. Please pass a valid API key.",
                "status": "INVALID_ARGUMENT",
                "details": [{
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                    "metadata": {"service": "generativelanguage.googleapis.com"}
                }]
            }}),
        )),
        None => Some(error(
            403,
            "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.",
        )),
    }
}

fn finish_name(finish: FinishKind) -> &'static str {
    match finish {
        FinishKind::Stop => "STOP",
        FinishKind::MaxTokens => "MAX_TOKENS",
        FinishKind::Safety => "SAFETY",
    }
}

fn usage(exchange: &Exchange, text: &str) -> Value {
    let prompt = exchange.prompt_tokens();
    let output = tokens(text);
    json!({
        "promptTokenCount": prompt,
        "candidatesTokenCount": output,
        "totalTokenCount": prompt + output,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}]
    })
}

fn candidate(text: &str, finish: Option<FinishKind>) -> Value {
    let mut candidate = if text.is_empty() {
        // A blocked answer has an empty content object (recorded SAFETY responses).
        json!({"content": {}, "index": 0})
    } else {
        json!({"content": {"parts": [{"text": text}], "role": "model"}, "index": 0})
    };
    if let Some(finish) = finish {
        candidate["finishReason"] = json!(finish_name(finish));
    }
    if finish == Some(FinishKind::Safety) {
        candidate["safetyRatings"] = json!([
            {"category": "HARM_CATEGORY_HATE_SPEECH", "probability": "HIGH", "blocked": true},
            {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "NEGLIGIBLE"}
        ]);
    }
    candidate
}

/// A whole `GenerateContentResponse`.
pub(crate) fn answer_json(exchange: &Exchange, text: &str, finish: FinishKind) -> Value {
    json!({
        "candidates": [candidate(text, Some(finish))],
        "usageMetadata": usage(exchange, text),
        "modelVersion": exchange.model,
        "responseId": format!("fake-{}", exchange.request.index)
    })
}

/// The answer as SSE events: partial responses whose texts concatenate; only the last carries
/// `finishReason` and the output token count, as in the recorded streams.
pub(crate) fn answer_frames(exchange: &Exchange, text: &str, finish: FinishKind) -> Vec<Bytes> {
    let parts = pieces(text);
    let prompt = exchange.prompt_tokens();
    let count = parts.len().max(1);
    (0..count)
        .map(|i| {
            let piece = parts.get(i).copied().unwrap_or("");
            let last = i + 1 == count;
            let event = json!({
                "candidates": [candidate(piece, last.then_some(finish))],
                "usageMetadata": if last {
                    usage(exchange, text)
                } else {
                    json!({"promptTokenCount": prompt, "totalTokenCount": prompt})
                },
                "modelVersion": exchange.model,
                "responseId": format!("fake-{}", exchange.request.index)
            });
            frame(&event)
        })
        .collect()
}

fn frame(event: &Value) -> Bytes {
    let mut bytes = b"data: ".to_vec();
    bytes.extend_from_slice(&to_bytes(event));
    bytes.extend_from_slice(b"\r\n\r\n");
    Bytes::from(bytes)
}

fn status_name(status: u16) -> &'static str {
    match status {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        429 => "RESOURCE_EXHAUSTED",
        499 => "CANCELLED",
        501 => "UNIMPLEMENTED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        _ => "INTERNAL",
    }
}

fn default_message(status: u16) -> &'static str {
    match status {
        500 => {
            "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting"
        }
        503 => "The model is overloaded. Please try again later.",
        499 => "The operation was cancelled.",
        _ => "Request failed (fake Gemini).",
    }
}

/// Google's error body for `status`.
pub(crate) fn error_json(status: u16) -> Value {
    error_value(status, default_message(status))
}

fn error_value(status: u16, message: &str) -> Value {
    json!({"error": {"code": status, "message": message, "status": status_name(status)}})
}

fn error(status: u16, message: &str) -> Rejection {
    (status, error_value(status, message))
}

/// A free-tier 429 with QuotaFailure and, when given, RetryInfo (the live shape).
pub(crate) fn rate_limited_json(retry_delay: Option<&str>) -> Value {
    let mut details = vec![json!({
        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
        "violations": [{"quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"}]
    })];
    if let Some(delay) = retry_delay {
        details.push(json!({
            "@type": "type.googleapis.com/google.rpc.RetryInfo",
            "retryDelay": delay
        }));
    }
    json!({"error": {
        "code": 429,
        "message": "You exceeded your current quota, please check your plan and billing details.",
        "status": "RESOURCE_EXHAUSTED",
        "details": details
    }})
}

/// What Google appends to a stream that fails midway: a bare, pretty-printed JSON error
/// object without `data:` (recorded in `streamGenerateContent_sse_error_mid_stream_499`).
pub(crate) fn mid_stream_error(status: u16) -> Bytes {
    let text = serde_json::to_string_pretty(&error_json(status)).unwrap();
    Bytes::from(format!("{text}\n"))
}
