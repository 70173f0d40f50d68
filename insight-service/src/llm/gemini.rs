//! Google AI (Gemini) REST backend: `POST {base}/v1beta/models/{model}:generateContent`, or
//! `:streamGenerateContent?alt=sse` when streaming, with the key in `x-goog-api-key`.
//!
//! Request: `contents` (one user turn), `systemInstruction`, `generationConfig` with
//! `maxOutputTokens`, `thinkingConfig` (see [`ThinkingBudget`]) and, when the pipeline gives a
//! schema, `responseMimeType: application/json` plus `responseSchema` (converted by
//! [`to_gemini_schema`]).
//!
//! Response (checked against recorded responses, see `tests/fixtures/gemini/`): the text is the
//! concatenation of `candidates[0].content.parts[].text`, skipping `thought: true` parts;
//! `finishReason` becomes a [`FinishReason`]; `usageMetadata` gives the tokens. A stream is a
//! sequence of partial responses whose texts are concatenated; the last `finishReason` and
//! `usageMetadata` win. An answer cut by MAX_TOKENS or SAFETY is returned with that reason when
//! it has text (the pipeline decides); with no text at all (a thinking model that spent the whole
//! budget thinking, a blocked answer) it is [`LlmError::Malformed`] naming the reason. A prompt
//! refused outright (`promptFeedback.blockReason`) is [`LlmError::Blocked`]: not worth retrying.

use std::fmt;

use bytes::Bytes;
use futures::future::BoxFuture;
use reqwest::{
    Url,
    header::{CONTENT_TYPE, HeaderMap, HeaderValue},
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{
    FinishReason, GenerateRequest, Generation, Generator, LlmError,
    http::{
        Flow, HttpLimits, HttpTransport, ProviderError, SetupError, SseHandler, bounded_message,
        error_for_provider_error, join_url, malformed, redacted_url, stream_end,
    },
};
use crate::domain::{Usage, UsageMeter};

/// Backend name reported in answers and errors.
const NAME: &str = "gemini";
/// Largest `thinkingBudget` any Gemini model accepts (2.5 Pro: 32,768).
pub const MAX_THINKING_BUDGET: u32 = 32_768;

/// Gemini's `thinkingConfig` (`--llm-thinking-budget`).
///
/// Gemini 2.5 Flash thinks by default, and its thoughts count against `maxOutputTokens`: with
/// the few hundred tokens a short JSON answer is given, a model that thinks first can stop at
/// MAX_TOKENS with no text at all (the recorded `generateContent_200_MAX_TOKENS_empty_thinking`
/// response). Summaries and the music analysis need no reasoning, so by default thinking is
/// turned off where the model allows it, and kept to its minimum (128 tokens, added to the
/// cap) on 2.5 Pro, which cannot turn it off. Other models (before 2.5, which do not think;
/// image and speech variants, which refuse a thinking config; later generations, which take a
/// `thinkingLevel`) get no thinking config and keep their own default; those that may think by
/// default (2.5 and later, `-latest` aliases, "thinking" models) get [`AUTO_THINKING_TOKENS`]
/// of room in `maxOutputTokens` for it ([`ThinkingBudget::resolve`]).
///
/// An explicit budget is sent as given: the model checks its range (2.5 Pro 128–32,768,
/// 2.5 Flash 0–24,576, Flash-Lite 0 or 512–24,576), and one it refuses fails every call with
/// a 400 that names the budget.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ThinkingBudget {
    /// `thinkingBudget: 0` (off) for Gemini 2.5 Flash and Flash-Lite (and their `-latest`
    /// aliases), 128 for 2.5 Pro, no config for other models (with room in the cap for the
    /// thoughts of those that think by default).
    #[default]
    Auto,
    /// `thinkingBudget` of this many tokens, added to `maxOutputTokens` so thinking does not
    /// eat the answer's tokens.
    Tokens(u32),
}

/// 2.5 Pro's smallest thinking budget: it cannot think less.
const PRO_MIN_THINKING: u32 = 128;

/// Tokens added to `maxOutputTokens` by `auto` for a model left to think at its default (later
/// generations such as Gemini 3, and aliases like `gemini-pro-latest`): its thoughts count
/// against the cap too, and with only the answer's few hundred tokens it can stop at
/// MAX_TOKENS before writing any. Unused tokens cost nothing.
pub const AUTO_THINKING_TOKENS: u32 = 8_192;

/// What a request carries for thinking, resolved for one model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Thinking {
    /// `thinkingConfig.thinkingBudget`, when one is sent.
    pub budget: Option<u32>,
    /// Tokens added to `maxOutputTokens` so that thoughts do not eat the answer's.
    pub allowance: u32,
}

impl ThinkingBudget {
    /// The thinking config and cap allowance for `model`: a budget sent is also the
    /// allowance; with `auto`, a model that gets no budget but may think by default (not one
    /// from before 2.5, whose output caps are also lower, nor a Gemma, image or speech model)
    /// gets [`AUTO_THINKING_TOKENS`] of allowance.
    pub fn resolve(self, model: &str) -> Thinking {
        if let Some(budget) = self.for_model(model) {
            return Thinking {
                budget: Some(budget),
                allowance: budget,
            };
        }
        // Known to think: 2.5 and later generations, `-latest` aliases (which move to them)
        // and experimental "thinking" models. Not earlier ones or Gemma, whose output caps
        // (8,192 for 2.0) a larger maxOutputTokens could exceed, nor image or speech models.
        // A versioned name decides by its version (`gemini-1.5-flash-latest` is a 1.5).
        let generation = model
            .strip_prefix("gemini-")
            .and_then(|rest| rest.chars().next())
            .filter(char::is_ascii_digit);
        let thinks_by_default = !(model.contains("-image") || model.contains("-tts"))
            && (model.contains("thinking")
                || match generation {
                    Some(major) => model.starts_with("gemini-2.5") || major >= '3',
                    None => model.ends_with("-latest"),
                });
        Thinking {
            budget: None,
            allowance: if thinks_by_default {
                AUTO_THINKING_TOKENS
            } else {
                0
            },
        }
    }

    /// The `thinkingBudget` to send to `model`, if any.
    pub fn for_model(self, model: &str) -> Option<u32> {
        match self {
            Self::Tokens(tokens) => Some(tokens),
            Self::Auto if model.contains("-image") || model.contains("-tts") => None,
            Self::Auto
                if model.starts_with("gemini-2.5-flash")
                    || model.starts_with("gemini-flash-latest")
                    || model.starts_with("gemini-flash-lite-latest") =>
            {
                Some(0)
            }
            Self::Auto if model.starts_with("gemini-2.5-pro") => Some(PRO_MIN_THINKING),
            Self::Auto => None,
        }
    }
}

impl std::str::FromStr for ThinkingBudget {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("auto") {
            return Ok(Self::Auto);
        }
        match text.parse::<u32>() {
            Ok(tokens) if tokens <= MAX_THINKING_BUDGET => Ok(Self::Tokens(tokens)),
            _ => Err(format!(
                "expected `auto` or a number of tokens from 0 to {MAX_THINKING_BUDGET}"
            )),
        }
    }
}

/// Google AI's public endpoint; tests and proxies override it.
pub const DEFAULT_BASE_URL: &str = "https://generativelanguage.googleapis.com";
/// A fast, cheap model that follows `responseSchema` well.
pub const DEFAULT_MODEL: &str = "gemini-2.5-flash";

/// How to reach Gemini. Build with [`GeminiConfig::new`] and override fields as needed; the
/// `Debug` output never shows the key (it is a [`SecretString`]).
#[derive(Clone, Debug)]
pub struct GeminiConfig {
    /// Scheme, host and optional path prefix, without `/v1beta` (default [`DEFAULT_BASE_URL`]).
    pub base_url: String,
    /// Model id, with or without the `models/` prefix (default [`DEFAULT_MODEL`]).
    pub model: String,
    /// API key, sent as `x-goog-api-key` (never in the URL, where it would end up in logs).
    pub api_key: SecretString,
    /// Use `streamGenerateContent` (SSE): the stall timeout then catches a model that stops
    /// mid-answer long before the deadline would. Default `false`.
    pub stream: bool,
    /// Byte cap, stall timeout, retries.
    pub limits: HttpLimits,
    /// Thinking (default [`ThinkingBudget::Auto`]).
    pub thinking: ThinkingBudget,
}

impl GeminiConfig {
    /// Defaults for everything but the key.
    pub fn new(api_key: SecretString) -> Self {
        Self {
            base_url: DEFAULT_BASE_URL.to_owned(),
            model: DEFAULT_MODEL.to_owned(),
            api_key,
            stream: false,
            limits: HttpLimits::default(),
            thinking: ThinkingBudget::Auto,
        }
    }
}

/// The Gemini [`Generator`]. Cheap to share: one connection pool per generator.
pub struct GeminiGenerator {
    transport: HttpTransport,
    model: String,
    generate_url: Url,
    stream_url: Url,
    headers: HeaderMap,
    stream: bool,
    /// The thinking config sent and the cap's allowance, resolved for the model.
    thinking: Thinking,
}

impl fmt::Debug for GeminiGenerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The headers hold the key: left out on purpose.
        f.debug_struct("GeminiGenerator")
            .field("model", &self.model)
            .field("url", &redacted_url(self.generate_url.as_str()))
            .field("stream", &self.stream)
            .field("thinking", &self.thinking)
            .field("limits", self.transport.limits())
            .finish_non_exhaustive()
    }
}

impl GeminiGenerator {
    /// Checks the configuration (URL, model name, key characters) and builds the client.
    pub fn new(config: GeminiConfig) -> Result<Self, SetupError> {
        let model = config
            .model
            .strip_prefix("models/")
            .unwrap_or(&config.model)
            .to_owned();
        check_model(&model)?;
        let generate_url = join_url(
            &config.base_url,
            &format!("/v1beta/models/{model}:generateContent"),
        )?;
        let stream_url = join_url(
            &config.base_url,
            &format!("/v1beta/models/{model}:streamGenerateContent?alt=sse"),
        )?;
        let mut key = HeaderValue::from_str(config.api_key.expose_secret()).map_err(|_| {
            SetupError::ApiKey("the Gemini API key holds characters not allowed in a header".into())
        })?;
        // Keeps the value out of reqwest/hyper debug output and HTTP/2 header compression.
        key.set_sensitive(true);
        let mut headers = HeaderMap::new();
        headers.insert("x-goog-api-key", key);
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        Ok(Self {
            transport: HttpTransport::new(NAME, config.limits)?,
            thinking: config.thinking.resolve(&model),
            model,
            generate_url,
            stream_url,
            headers,
            stream: config.stream,
        })
    }

    async fn run(&self, request: GenerateRequest<'_>) -> Result<Generation, LlmError> {
        let body = request_body(&request, self.thinking)?;
        if self.stream {
            let mut handler = StreamHandler::default();
            self.transport
                .post_sse(
                    &self.stream_url,
                    &self.headers,
                    body,
                    request.deadline,
                    request.usage,
                    &mut handler,
                )
                .await?;
            handler.answer.into_generation(request.usage, true)
        } else {
            let body = self
                .transport
                .post_json(
                    &self.generate_url,
                    &self.headers,
                    body,
                    request.deadline,
                    request.usage,
                )
                .await?;
            let response: GenerateContentResponse = serde_json::from_slice(&body)
                .map_err(|e| malformed(NAME, format!("not a generateContent response: {e}")))?;
            // At most two copies of an answer are alive at once (the admission estimate
            // counts on it): the body goes before the text is taken out of the response.
            drop(body);
            let mut answer = Answer::default();
            answer.absorb(response)?;
            answer.into_generation(request.usage, false)
        }
    }
}

impl Generator for GeminiGenerator {
    fn name(&self) -> &str {
        NAME
    }

    fn model(&self) -> &str {
        &self.model
    }

    fn generate<'a>(
        &'a self,
        request: GenerateRequest<'a>,
    ) -> BoxFuture<'a, Result<Generation, LlmError>> {
        Box::pin(self.run(request))
    }
}

/// A model id goes into the URL path unescaped, so only the characters Google's ids use pass.
fn check_model(model: &str) -> Result<(), SetupError> {
    let valid = !model.is_empty()
        && model
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if valid {
        Ok(())
    } else {
        Err(SetupError::Model {
            model: model.to_owned(),
            reason: "use letters, digits, '-', '.', '_' (e.g. gemini-2.5-flash)".to_owned(),
        })
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GenerateContentRequest<'a> {
    contents: [Content<'a>; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    system_instruction: Option<Content<'a>>,
    generation_config: GenerationConfig,
}

#[derive(Serialize)]
struct Content<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    parts: [TextPart<'a>; 1],
}

#[derive(Serialize)]
struct TextPart<'a> {
    text: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GenerationConfig {
    max_output_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_mime_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_schema: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thinking_config: Option<ThinkingConfig>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ThinkingConfig {
    thinking_budget: u32,
}

/// The request; `thinking` as resolved by [`ThinkingBudget::resolve`].
fn request_body(request: &GenerateRequest<'_>, thinking: Thinking) -> Result<Bytes, LlmError> {
    let body = GenerateContentRequest {
        contents: [Content {
            role: Some("user"),
            parts: [TextPart {
                text: request.prompt,
            }],
        }],
        system_instruction: (!request.system.is_empty()).then_some(Content {
            role: None,
            parts: [TextPart {
                text: request.system,
            }],
        }),
        generation_config: GenerationConfig {
            // Thoughts count against maxOutputTokens: the answer keeps its own share.
            max_output_tokens: request.max_output_tokens.saturating_add(thinking.allowance),
            response_mime_type: request.response_schema.map(|_| "application/json"),
            response_schema: request.response_schema.map(to_gemini_schema),
            thinking_config: thinking
                .budget
                .map(|thinking_budget| ThinkingConfig { thinking_budget }),
        },
    };
    serde_json::to_vec(&body)
        .map(Bytes::from)
        .map_err(|e| malformed(NAME, format!("cannot encode the request: {e}")))
}

/// Converts a JSON Schema into the OpenAPI-3.0 subset Gemini's `responseSchema` accepts.
///
/// Kept: `type` (upper-cased: `OBJECT`, `STRING`, …; `["string", "null"]` becomes `STRING` +
/// `nullable: true`), `properties`, `items`, `required`, `enum` (`const` becomes a one-value
/// `enum`), `anyOf`, `description`, `title`, `format`, `nullable`, `minItems`, `maxItems`,
/// `minimum`, `maximum`, `minLength`, `maxLength`, `pattern`, `propertyOrdering`, `example`,
/// `default`. Dropped, because Gemini rejects the request over them: `additionalProperties`,
/// `$schema`, `$id`, `$ref`, `$defs`, `definitions`, `strict` and anything else. `$ref` is not
/// resolved, so a schema for Gemini should be written inline.
pub fn to_gemini_schema(schema: &Value) -> Value {
    let Value::Object(source) = schema else {
        return schema.clone();
    };
    let mut out = Map::new();
    for (key, value) in source {
        match key.as_str() {
            "type" => convert_type(value, &mut out),
            "properties" => {
                if let Value::Object(properties) = value {
                    let converted = properties
                        .iter()
                        .map(|(name, schema)| (name.clone(), to_gemini_schema(schema)))
                        .collect();
                    out.insert(key.clone(), Value::Object(converted));
                }
            }
            "items" => {
                out.insert(key.clone(), to_gemini_schema(value));
            }
            "anyOf" => {
                if let Value::Array(options) = value {
                    out.insert(
                        key.clone(),
                        Value::Array(options.iter().map(to_gemini_schema).collect()),
                    );
                }
            }
            "const" => {
                out.insert("enum".to_owned(), Value::Array(vec![value.clone()]));
            }
            "required" | "enum" | "description" | "title" | "format" | "nullable" | "minItems"
            | "maxItems" | "minimum" | "maximum" | "minLength" | "maxLength" | "pattern"
            | "propertyOrdering" | "example" | "default" => {
                out.insert(key.clone(), value.clone());
            }
            _ => {}
        }
    }
    Value::Object(out)
}

fn convert_type(value: &Value, out: &mut Map<String, Value>) {
    match value {
        Value::String(name) => {
            out.insert("type".to_owned(), Value::String(name.to_ascii_uppercase()));
        }
        Value::Array(names) => {
            let mut kinds = names.iter().filter_map(Value::as_str);
            let non_null: Vec<&str> = kinds.by_ref().filter(|n| *n != "null").collect();
            if non_null.len() < names.len() {
                out.insert("nullable".to_owned(), Value::Bool(true));
            }
            if let [only] = non_null.as_slice() {
                out.insert("type".to_owned(), Value::String(only.to_ascii_uppercase()));
            }
        }
        _ => {}
    }
}

/// One `GenerateContentResponse` (whole, or one stream event). Every field is optional: a
/// missing field is an answer we judge, never a parse failure.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct GenerateContentResponse {
    candidates: Option<Vec<Candidate>>,
    prompt_feedback: Option<PromptFeedback>,
    usage_metadata: Option<UsageMetadata>,
    error: Option<Value>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Candidate {
    content: Option<CandidateContent>,
    finish_reason: Option<String>,
}

#[derive(Deserialize, Default)]
struct CandidateContent {
    parts: Option<Vec<Part>>,
}

#[derive(Deserialize, Default)]
struct Part {
    text: Option<String>,
    thought: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PromptFeedback {
    block_reason: Option<String>,
    block_reason_message: Option<String>,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "camelCase")]
struct UsageMetadata {
    prompt_token_count: Option<u64>,
    candidates_token_count: Option<u64>,
    thoughts_token_count: Option<u64>,
}

/// What the responses (or stream events) said so far.
#[derive(Default)]
struct Answer {
    text: String,
    finish: Option<String>,
    blocked: Option<String>,
    usage: Option<UsageMetadata>,
}

impl Answer {
    fn absorb(&mut self, response: GenerateContentResponse) -> Result<(), LlmError> {
        if let Some(error) = response.error.as_ref() {
            let error = ProviderError::from_value(&serde_json::json!({ "error": error }))
                .unwrap_or_default();
            return Err(error_for_provider_error(NAME, &error));
        }
        if let Some(feedback) = response.prompt_feedback
            && let Some(reason) = feedback.block_reason
        {
            self.blocked = Some(match feedback.block_reason_message {
                Some(message) => format!("{reason}: {message}"),
                None => reason,
            });
        }
        if let Some(usage) = response.usage_metadata {
            self.usage = Some(usage);
        }
        // One candidate is asked for (the default candidateCount); others are ignored.
        let Some(candidate) = response.candidates.and_then(|c| c.into_iter().next()) else {
            return Ok(());
        };
        for part in candidate
            .content
            .and_then(|c| c.parts)
            .into_iter()
            .flatten()
        {
            // Thought summaries are the model's scratchpad, not the answer.
            if part.thought != Some(true)
                && let Some(text) = part.text
            {
                if self.text.is_empty() {
                    // The usual one-part answer is moved, not copied.
                    self.text = text;
                } else {
                    self.text.push_str(&text);
                }
            }
        }
        if candidate.finish_reason.is_some() {
            self.finish = candidate.finish_reason;
        }
        Ok(())
    }

    /// The reported tokens, taken out.
    fn take_usage(&mut self) -> Usage {
        self.usage
            .take()
            .map_or_else(Usage::default, |metadata| Usage {
                input_tokens: metadata.prompt_token_count.unwrap_or(0),
                // Thinking tokens are billed as output: counting them keeps usage honest.
                output_tokens: metadata
                    .candidates_token_count
                    .unwrap_or(0)
                    .saturating_add(metadata.thoughts_token_count.unwrap_or(0)),
                ..Usage::default()
            })
    }

    /// The generation, after adding the reported tokens to `meter` (first: a blocked or cut
    /// answer's tokens are billed too).
    fn into_generation(
        mut self,
        meter: &UsageMeter,
        streamed: bool,
    ) -> Result<Generation, LlmError> {
        meter.add(self.take_usage());
        if let Some(reason) = self.blocked
            && self.text.is_empty()
        {
            // The prompt itself was refused: unlike a blocked answer, it is refused again.
            return Err(LlmError::Blocked {
                backend: NAME.to_owned(),
                message: bounded_message(reason),
            });
        }
        let finish = match self.finish.as_deref() {
            Some(reason) => finish_reason(reason),
            // A finished stream always ends with a finishReason; without one it was cut.
            None if streamed => {
                return Err(malformed(
                    NAME,
                    "stream ended before a finishReason (answer cut off)".to_owned(),
                ));
            }
            None => FinishReason::Other("FINISH_REASON_UNSPECIFIED".to_owned()),
        };
        if self.text.is_empty() {
            let reason = self.finish.as_deref().unwrap_or("no candidates");
            return Err(malformed(
                NAME,
                format!("no answer text (finishReason {reason})"),
            ));
        }
        Ok(Generation {
            text: self.text,
            finish,
        })
    }
}

/// Gemini's `FinishReason` names mapped to ours; the safety family (including blocklists and
/// PII) is [`FinishReason::Safety`] because the pipeline treats them alike.
fn finish_reason(reason: &str) -> FinishReason {
    match reason {
        "STOP" => FinishReason::Stop,
        "MAX_TOKENS" => FinishReason::MaxTokens,
        "SAFETY" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY" => {
            FinishReason::Safety
        }
        other => FinishReason::Other(other.to_owned()),
    }
}

/// Parses `streamGenerateContent?alt=sse` events into an [`Answer`].
#[derive(Default)]
struct StreamHandler {
    answer: Answer,
}

impl SseHandler for StreamHandler {
    fn reset(&mut self) {
        self.answer = Answer::default();
    }

    fn on_event(&mut self, data: &str) -> Result<Flow, LlmError> {
        let event: GenerateContentResponse = serde_json::from_str(data)
            .map_err(|e| malformed(NAME, format!("stream event is not a response: {e}")))?;
        self.answer.absorb(event)?;
        Ok(Flow::Continue)
    }

    fn on_end(&mut self, trailing: &[u8]) -> Result<(), LlmError> {
        stream_end(NAME, trailing)
    }

    fn take_usage(&mut self) -> Usage {
        self.answer.take_usage()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    #[test]
    fn schema_conversion_keeps_the_subset_and_uppercases_types() {
        let schema = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "insight": {"type": "string", "description": "d", "maxLength": 2000},
                "themes": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
                "mood": {"type": ["string", "null"], "enum": ["calm", "upbeat"]},
                "kind": {"const": "chunk"},
                "score": {"anyOf": [{"type": "number"}, {"type": "integer", "minimum": 0}]}
            },
            "required": ["insight", "themes"]
        });
        assert_eq!(
            to_gemini_schema(&schema),
            json!({
                "type": "OBJECT",
                "properties": {
                    "insight": {"type": "STRING", "description": "d", "maxLength": 2000},
                    "themes": {"type": "ARRAY", "items": {"type": "STRING"}, "maxItems": 8},
                    "mood": {"type": "STRING", "nullable": true, "enum": ["calm", "upbeat"]},
                    "kind": {"enum": ["chunk"]},
                    "score": {"anyOf": [{"type": "NUMBER"}, {"type": "INTEGER", "minimum": 0}]}
                },
                "required": ["insight", "themes"]
            })
        );
        assert_eq!(to_gemini_schema(&json!(true)), json!(true));
    }

    #[test]
    fn request_body_shape() {
        let schema = json!({"type": "object"});
        let request = GenerateRequest {
            system: "sys",
            prompt: "user text",
            max_output_tokens: 77,
            response_schema: Some(&schema),
            deadline: tokio::time::Instant::now(),
            usage: &UsageMeter::default(),
        };
        let body: Value =
            serde_json::from_slice(&request_body(&request, Thinking::default()).unwrap()).unwrap();
        assert_eq!(
            body,
            json!({
                "contents": [{"role": "user", "parts": [{"text": "user text"}]}],
                "systemInstruction": {"parts": [{"text": "sys"}]},
                "generationConfig": {
                    "maxOutputTokens": 77,
                    "responseMimeType": "application/json",
                    "responseSchema": {"type": "OBJECT"}
                }
            })
        );
        let plain = GenerateRequest {
            system: "",
            response_schema: None,
            ..request
        };
        let body: Value =
            serde_json::from_slice(&request_body(&plain, Thinking::default()).unwrap()).unwrap();
        assert_eq!(body["generationConfig"], json!({"maxOutputTokens": 77}));
        assert!(body.get("systemInstruction").is_none());
        // Thinking off: budget 0, the answer's cap unchanged.
        let off = ThinkingBudget::Tokens(0).resolve(DEFAULT_MODEL);
        let body: Value = serde_json::from_slice(&request_body(&plain, off).unwrap()).unwrap();
        assert_eq!(
            body["generationConfig"],
            json!({"maxOutputTokens": 77, "thinkingConfig": {"thinkingBudget": 0}})
        );
        // A budget is added to the cap, so thoughts do not eat the answer's tokens.
        let budget = ThinkingBudget::Tokens(512).resolve(DEFAULT_MODEL);
        let body: Value = serde_json::from_slice(&request_body(&plain, budget).unwrap()).unwrap();
        assert_eq!(
            body["generationConfig"],
            json!({"maxOutputTokens": 589, "thinkingConfig": {"thinkingBudget": 512}})
        );
        // A model left to think at its default: no config, but room for its thoughts.
        let later = ThinkingBudget::Auto.resolve("gemini-3-pro-preview");
        let body: Value = serde_json::from_slice(&request_body(&plain, later).unwrap()).unwrap();
        assert_eq!(
            body["generationConfig"],
            json!({"maxOutputTokens": 77 + AUTO_THINKING_TOKENS})
        );
    }

    #[test]
    fn thinking_is_off_by_default_only_where_the_model_allows_it() {
        use ThinkingBudget::{Auto, Tokens};
        assert_eq!(Auto.for_model(DEFAULT_MODEL), Some(0));
        assert_eq!(Auto.for_model("gemini-2.5-flash-lite"), Some(0));
        assert_eq!(Auto.for_model("gemini-flash-latest"), Some(0));
        // 2.5 Pro refuses a budget of 0: its minimum. Earlier models do not think; image and
        // speech variants refuse a thinking config.
        assert_eq!(Auto.for_model("gemini-2.5-pro"), Some(128));
        assert_eq!(Auto.for_model("gemini-2.0-flash"), None);
        assert_eq!(Auto.for_model("gemini-2.5-flash-image"), None);
        assert_eq!(Auto.for_model("gemini-2.5-flash-preview-tts"), None);
        assert_eq!(Tokens(1024).for_model("gemini-2.5-pro"), Some(1024));
        assert_eq!(Tokens(0).for_model("gemini-2.5-flash"), Some(0));
        let generator = |thinking, model: &str| {
            GeminiGenerator::new(GeminiConfig {
                thinking,
                model: model.to_owned(),
                ..GeminiConfig::new(SecretString::from("k".to_owned()))
            })
            .unwrap()
            .thinking
        };
        // Resolved for the model without its `models/` prefix.
        assert_eq!(generator(Auto, "models/gemini-2.5-flash").budget, Some(0));
        assert_eq!(generator(Auto, "gemini-2.0-flash"), Thinking::default());
        // Models `auto` leaves at their default thinking get room for it in the cap, but not
        // those that do not think (whose output caps are lower too).
        for model in [
            "gemini-pro-latest",
            "gemini-3-pro-preview",
            "gemini-3-flash",
        ] {
            let thinking = generator(Auto, model);
            assert_eq!(thinking.budget, None, "{model}");
            assert_eq!(thinking.allowance, AUTO_THINKING_TOKENS, "{model}");
        }
        assert_eq!(
            generator(Auto, "gemini-2.0-flash-thinking-exp").allowance,
            AUTO_THINKING_TOKENS
        );
        for model in [
            "gemini-1.5-pro",
            "gemini-1.5-flash-latest",
            "gemma-3-27b-it",
            "gemini-2.5-flash-image",
            "gemini-pro",
            "gemini-exp-1206",
            "learnlm-2.0-flash-experimental",
        ] {
            assert_eq!(generator(Auto, model), Thinking::default(), "{model}");
        }
        assert_eq!(
            generator(Tokens(300), "gemini-2.5-pro"),
            Thinking {
                budget: Some(300),
                allowance: 300
            }
        );
        assert_eq!("auto".parse(), Ok(Auto));
        assert_eq!("2048".parse(), Ok(Tokens(2048)));
        assert!("40000".parse::<ThinkingBudget>().is_err());
        assert!("-1".parse::<ThinkingBudget>().is_err());
    }

    #[test]
    fn model_names() {
        let config = |model: &str| GeminiConfig {
            model: model.to_owned(),
            ..GeminiConfig::new(SecretString::from("k".to_owned()))
        };
        let generator = GeminiGenerator::new(config("models/gemini-2.0-flash")).unwrap();
        assert_eq!(generator.model(), "gemini-2.0-flash");
        assert_eq!(
            generator.generate_url.as_str(),
            "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash:generateContent"
        );
        assert_eq!(
            generator.stream_url.as_str(),
            "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse"
        );
        for bad in ["", "a/b", "a?b", "x y", "../x"] {
            assert!(GeminiGenerator::new(config(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn debug_never_shows_the_key() {
        let config = GeminiConfig::new(SecretString::from("super-secret-key".to_owned()));
        assert!(!format!("{config:?}").contains("super-secret-key"));
        let generator = GeminiGenerator::new(config).unwrap();
        assert!(!format!("{generator:?}").contains("super-secret-key"));
        let bad = GeminiConfig::new(SecretString::from("bad\nkey".to_owned()));
        let error = GeminiGenerator::new(bad).unwrap_err().to_string();
        assert!(!error.contains("bad\nkey"), "{error}");
    }

    #[test]
    fn hostile_responses_are_malformed_not_panics() {
        for body in [
            "null",
            "{}",
            r#"{"candidates": null}"#,
            r#"{"candidates": []}"#,
            r#"{"candidates": [{}]}"#,
            r#"{"candidates": [{"content": {"parts": [{"text": ""}]}, "finishReason": "STOP"}]}"#,
            r#"{"candidates": [{"content": {"parts": null}}]}"#,
            r#"{"usageMetadata": {"promptTokenCount": -5}}"#,
            r#"{"error": 5}"#,
        ] {
            let result = serde_json::from_str::<GenerateContentResponse>(body)
                .map_err(|e| malformed(NAME, e.to_string()))
                .and_then(|response| {
                    let mut answer = Answer::default();
                    answer.absorb(response)?;
                    answer.into_generation(&UsageMeter::default(), false)
                });
            assert!(result.is_err(), "{body}");
        }
    }
}
