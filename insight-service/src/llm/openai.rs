//! OpenAI-compatible chat completions backend: `POST {base}/v1/chat/completions`, which OpenAI,
//! Ollama, vLLM, llama.cpp's server and LiteLLM all speak.
//!
//! Request: `model`, a `system` and a `user` message, `max_tokens` (or
//! `max_completion_tokens`, see [`TokenLimitField`]; with room for reasoning, see
//! [`reasoning_allowance`]), `response_format` when the pipeline gives
//! a schema (see [`JsonMode`]), and for streaming `stream: true` with
//! `stream_options.include_usage` so the last event carries the token counts.
//!
//! Response (checked against recorded responses, see `tests/fixtures/openai/`):
//! `choices[0].message.content`, or the concatenated `choices[0].delta.content` of the stream up
//! to `data: [DONE]`; `finish_reason` `stop`/`length`/`content_filter` becomes a
//! [`FinishReason`]; `usage.prompt_tokens`/`completion_tokens` the tokens. The reasoning block
//! some servers put at the start of the content (`<think>...</think>`) is not the answer. A
//! server that ignores `stream: true` and answers with one `chat.completion` body is read as
//! that answer.

use std::{
    fmt,
    sync::atomic::{AtomicBool, Ordering},
};

use bytes::Bytes;
use futures::future::BoxFuture;
use reqwest::{
    Url,
    header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue},
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{
    FinishReason, GenerateRequest, Generation, Generator, LlmError,
    gemini::ThinkingBudget,
    http::{
        Flow, HttpLimits, HttpTransport, ProviderError, SetupError, SseHandler,
        error_for_provider_error, join_url, malformed, redacted_url, stream_end,
    },
};
use crate::domain::{Usage, UsageMeter};

/// Backend name reported in answers and errors.
const NAME: &str = "openai";
/// OpenAI's endpoint; Ollama is `http://localhost:11434`, vLLM `http://HOST:8000`, llama.cpp
/// `http://HOST:8080`.
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com";
/// A small, cheap model that supports structured outputs.
pub const DEFAULT_MODEL: &str = "gpt-4o-mini";

/// How the answer is constrained to JSON when the pipeline gives a schema.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum JsonMode {
    /// `{"type": "json_schema", ...}` (structured outputs). If the server rejects it with a 400
    /// naming `response_format` or `json_schema` (older vLLM/llama.cpp), the same call is sent
    /// once more with `json_object`, and every later call of this generator uses `json_object`.
    #[default]
    Schema,
    /// `{"type": "json_object"}`: valid JSON, shape given only by the prompt. OpenAI requires
    /// the word "JSON" in the messages for this mode.
    Object,
    /// No `response_format` at all (servers that reject both); the prompt alone asks for JSON.
    Off,
}

/// Name of the output-token cap in the request: OpenAI's reasoning models accept only
/// `max_completion_tokens`, while most local servers know only `max_tokens`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TokenLimitField {
    /// `max_tokens`: OpenAI's non-reasoning models, Ollama, vLLM, llama.cpp, LiteLLM.
    #[default]
    MaxTokens,
    /// `max_completion_tokens`: OpenAI o-series and later.
    MaxCompletionTokens,
}

/// Tokens added to the answer's cap by `--llm-thinking-budget auto` for a reasoning model
/// ([`is_reasoning_model`]). Reasoning models count their reasoning in the cap: with
/// only the few hundred tokens a short JSON answer needs, they can spend all of it reasoning
/// and answer nothing (`content: ""`, `finish_reason: "length"`). Summaries need little
/// reasoning; this leaves room for it at default effort, and costs nothing unless used.
pub const AUTO_REASONING_TOKENS: u32 = 8_192;

/// Tokens the request's cap reserves for the model's reasoning on top of the answer's: an
/// explicit `--llm-thinking-budget` always; `auto` only for a `reasoning_model` (its name
/// says so, [`is_reasoning_model`]), since a non-reasoning model with a small output limit
/// (gpt-3.5-turbo, gpt-4-turbo: 4096) refuses a larger cap. Either field: OpenAI's reasoning
/// models count reasoning in `max_completion_tokens`, local ones (Qwen3, R1) in `max_tokens`.
pub fn reasoning_allowance(thinking: ThinkingBudget, reasoning_model: bool) -> u32 {
    match thinking {
        ThinkingBudget::Tokens(tokens) => tokens,
        ThinkingBudget::Auto if reasoning_model => AUTO_REASONING_TOKENS,
        ThinkingBudget::Auto => 0,
    }
}

/// Whether `model` (an id as OpenAI, a proxy like LiteLLM or OpenRouter (`openai/o3`), or a
/// local server names it) is a reasoning model: OpenAI's o-series, gpt-5 and gpt-oss, and the
/// open reasoning families (DeepSeek-R1 and `deepseek-reasoner`, QwQ, Qwen3, names with
/// "thinking" or "reason").
pub fn is_reasoning_model(model: &str) -> bool {
    let model = model.to_ascii_lowercase();
    let name = model.rsplit('/').next().unwrap_or(&model);
    let o_series = name
        .strip_prefix('o')
        .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()));
    o_series
        || name.starts_with("gpt-5")
        || name.starts_with("gpt-oss")
        || name.starts_with("qwq")
        // Qwen3's hybrid models think by default; its instruct and coder variants do not.
        || (name.starts_with("qwen3") && !name.contains("instruct") && !name.contains("coder"))
        || name.contains("-r1")
        || name.starts_with("r1")
        || name.contains("thinking")
        || name.contains("reason")
}

/// `--llm-json-mode`: `schema`, `object` or `off`.
impl std::str::FromStr for JsonMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "schema" => Ok(Self::Schema),
            "object" => Ok(Self::Object),
            "off" => Ok(Self::Off),
            other => Err(format!("{other:?} is not one of schema, object, off")),
        }
    }
}

/// `--llm-token-limit-field`: `max_tokens` or `max_completion_tokens`, the request field's name.
impl std::str::FromStr for TokenLimitField {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "max_tokens" => Ok(Self::MaxTokens),
            "max_completion_tokens" => Ok(Self::MaxCompletionTokens),
            other => Err(format!(
                "{other:?} is not one of max_tokens, max_completion_tokens"
            )),
        }
    }
}

/// How to reach an OpenAI-compatible server. Build with [`OpenAiConfig::new`] and override
/// fields; `Debug` never shows the key.
#[derive(Clone, Debug)]
pub struct OpenAiConfig {
    /// Scheme, host and optional path prefix (default [`DEFAULT_BASE_URL`]). A base ending in
    /// `/v1` (the OpenAI SDKs' convention) is accepted too: `/v1` is then not added twice.
    pub base_url: String,
    /// Model id as the server names it (default [`DEFAULT_MODEL`]).
    pub model: String,
    /// Bearer token; `None` for local servers that need none.
    pub api_key: Option<SecretString>,
    /// Stream the answer (SSE), so the stall timeout catches a server that stops midway.
    /// Default `false`.
    pub stream: bool,
    /// How JSON answers are requested (default [`JsonMode::Schema`]).
    pub json_mode: JsonMode,
    /// Name of the output-token cap (default [`TokenLimitField::MaxTokens`]).
    pub token_limit_field: TokenLimitField,
    /// Tokens for reasoning on top of the answer's cap (see [`reasoning_allowance`]).
    pub thinking: ThinkingBudget,
    /// Byte cap, stall timeout, retries.
    pub limits: HttpLimits,
}

impl OpenAiConfig {
    /// Defaults, with `api_key` (`None` for a local server).
    pub fn new(api_key: Option<SecretString>) -> Self {
        Self {
            base_url: DEFAULT_BASE_URL.to_owned(),
            model: DEFAULT_MODEL.to_owned(),
            api_key,
            stream: false,
            json_mode: JsonMode::default(),
            token_limit_field: TokenLimitField::default(),
            thinking: ThinkingBudget::default(),
            limits: HttpLimits::default(),
        }
    }
}

/// The OpenAI-compatible [`Generator`].
pub struct OpenAiGenerator {
    transport: HttpTransport,
    model: String,
    url: Url,
    headers: HeaderMap,
    stream: bool,
    json_mode: JsonMode,
    token_limit_field: TokenLimitField,
    /// Added to every request's token cap ([`reasoning_allowance`]).
    reasoning_tokens: u32,
    /// Whether the model's name says it reasons ([`is_reasoning_model`]).
    reasoning_model: bool,
    /// Set once the server rejected `json_schema`: later calls go straight to `json_object`.
    schema_rejected: AtomicBool,
    /// The schemas (as JSON text) the server refused one by one ("Invalid schema for
    /// response_format ..."): calls with those go straight to `json_object`, the others stay
    /// strict. The schemas are the code's own (a handful), so the set stays tiny.
    schemas_refused: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl fmt::Debug for OpenAiGenerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The headers hold the key: left out on purpose.
        f.debug_struct("OpenAiGenerator")
            .field("model", &self.model)
            .field("url", &redacted_url(self.url.as_str()))
            .field("stream", &self.stream)
            .field("json_mode", &self.json_mode)
            .field("limits", self.transport.limits())
            .finish_non_exhaustive()
    }
}

impl OpenAiGenerator {
    /// Checks the configuration (URL, key characters) and builds the client.
    pub fn new(config: OpenAiConfig) -> Result<Self, SetupError> {
        let trimmed = config.base_url.trim_end_matches('/');
        let path = if trimmed.ends_with("/v1") {
            "/chat/completions"
        } else {
            "/v1/chat/completions"
        };
        let url = join_url(trimmed, path)?;
        if config.model.trim().is_empty() {
            return Err(SetupError::Model {
                model: config.model,
                reason: "empty".to_owned(),
            });
        }
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(key) = config
            .api_key
            .as_ref()
            .filter(|k| !k.expose_secret().is_empty())
        {
            let mut value = HeaderValue::from_str(&format!("Bearer {}", key.expose_secret()))
                .map_err(|_| {
                    SetupError::ApiKey(
                        "the OpenAI API key holds characters not allowed in a header".into(),
                    )
                })?;
            // Keeps the value out of debug output and HTTP/2 header compression.
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        let reasoning_model = is_reasoning_model(&config.model);
        let reasoning_tokens = reasoning_allowance(config.thinking, reasoning_model);
        Ok(Self {
            transport: HttpTransport::new(NAME, config.limits)?,
            model: config.model,
            url,
            headers,
            stream: config.stream,
            json_mode: config.json_mode,
            token_limit_field: config.token_limit_field,
            reasoning_tokens,
            reasoning_model,
            schema_rejected: AtomicBool::new(false),
            schemas_refused: Default::default(),
        })
    }

    /// The schemas refused one by one (see the field).
    fn schemas_refused(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.schemas_refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn run(&self, request: GenerateRequest<'_>) -> Result<Generation, LlmError> {
        let schema = request.response_schema.map(Value::to_string);
        let mut mode = match (&schema, self.json_mode) {
            (None, _) | (_, JsonMode::Off) => JsonMode::Off,
            (Some(schema), JsonMode::Schema)
                if self.schema_rejected.load(Ordering::Relaxed)
                    || self.schemas_refused().contains(schema) =>
            {
                JsonMode::Object
            }
            (Some(_), mode) => mode,
        };
        loop {
            let body = self.request_body(&request, mode)?;
            match self.send(body, request.deadline, request.usage).await {
                Err(LlmError::BadRequest { message, .. })
                    if mode == JsonMode::Schema && rejects_json_schema(&message) =>
                {
                    tracing::warn!(
                        backend = NAME,
                        model = %self.model,
                        error = %message,
                        "server rejected response_format json_schema; using json_object"
                    );
                    // A server without json_schema is asked in json_object mode from now on;
                    // one that refused this one schema, only for this schema.
                    match &schema {
                        Some(schema) if refuses_this_schema(&message) => {
                            self.schemas_refused().insert(schema.clone());
                        }
                        _ => self.schema_rejected.store(true, Ordering::Relaxed),
                    }
                    mode = JsonMode::Object;
                }
                Err(error) => return Err(error),
                Ok(answer) => {
                    return answer.into_generation(request.usage, self.reasoning_model);
                }
            }
        }
    }

    async fn send(
        &self,
        body: Bytes,
        deadline: tokio::time::Instant,
        meter: &UsageMeter,
    ) -> Result<Answer, LlmError> {
        if self.stream {
            let mut handler = StreamHandler::default();
            self.transport
                .post_sse(
                    &self.url,
                    &self.headers,
                    body,
                    deadline,
                    meter,
                    &mut handler,
                )
                .await?;
            Ok(handler.answer)
        } else {
            let body = self
                .transport
                .post_json(&self.url, &self.headers, body, deadline, meter)
                .await?;
            parse_completion(&body)
        }
    }

    fn request_body(
        &self,
        request: &GenerateRequest<'_>,
        mode: JsonMode,
    ) -> Result<Bytes, LlmError> {
        let mut messages = Vec::with_capacity(2);
        if !request.system.is_empty() {
            messages.push(Message {
                role: "system",
                content: request.system,
            });
        }
        messages.push(Message {
            role: "user",
            content: request.prompt,
        });
        let cap = request
            .max_output_tokens
            .saturating_add(self.reasoning_tokens);
        let (max_tokens, max_completion_tokens) = match self.token_limit_field {
            TokenLimitField::MaxTokens => (Some(cap), None),
            TokenLimitField::MaxCompletionTokens => (None, Some(cap)),
        };
        let response_format = match (mode, request.response_schema) {
            (JsonMode::Schema, Some(schema)) => Some(json_schema_format(schema)),
            (JsonMode::Object, Some(_)) => Some(json!({"type": "json_object"})),
            _ => None,
        };
        let body = ChatRequest {
            model: &self.model,
            messages,
            max_tokens,
            max_completion_tokens,
            response_format,
            stream: self.stream.then_some(true),
            stream_options: self.stream.then_some(StreamOptions {
                include_usage: true,
            }),
        };
        serde_json::to_vec(&body)
            .map(Bytes::from)
            .map_err(|e| malformed(NAME, format!("cannot encode the request: {e}")))
    }
}

impl Generator for OpenAiGenerator {
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

/// Whether a 400 says the server does not support `json_schema` structured outputs (as opposed
/// to any other bad request, which a different format would not fix).
fn rejects_json_schema(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    message.contains("response_format") || message.contains("json_schema")
}

/// Whether a 400 refusing `json_schema` is about this request's schema (OpenAI: "Invalid schema
/// for response_format 'summary': ...") rather than the server lacking the feature.
fn refuses_this_schema(message: &str) -> bool {
    message.to_ascii_lowercase().contains("invalid schema")
}

/// `response_format` for structured outputs. Strict mode is used when the schema allows it:
/// OpenAI's strict mode demands `additionalProperties: false` on every object (added here when
/// missing) and every property listed in `required` (when some is optional, strict is off and
/// the schema is a strong hint rather than a guarantee).
pub fn json_schema_format(schema: &Value) -> Value {
    let mut schema = schema.clone();
    let strict = close_objects(&mut schema);
    let name = schema
        .get("title")
        .and_then(Value::as_str)
        .filter(|t| {
            !t.is_empty()
                && t.len() <= 64
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        })
        .unwrap_or("answer")
        .to_owned();
    json!({
        "type": "json_schema",
        "json_schema": {"name": name, "schema": schema, "strict": strict}
    })
}

/// Adds `additionalProperties: false` to object schemas that say nothing about it; returns
/// whether every object lists all its properties as required (strict mode's other condition).
fn close_objects(schema: &mut Value) -> bool {
    let Value::Object(node) = schema else {
        return true;
    };
    let mut strict = true;
    let is_object = node.get("type").and_then(Value::as_str) == Some("object")
        || node.contains_key("properties");
    if is_object {
        node.entry("additionalProperties")
            .or_insert(Value::Bool(false));
        let required: Vec<&str> = node
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if let Some(Value::Object(properties)) = node.get("properties") {
            strict &= properties.keys().all(|k| required.contains(&k.as_str()));
        }
    }
    for key in ["properties", "$defs", "definitions"] {
        if let Some(Value::Object(children)) = node.get_mut(key) {
            for child in children.values_mut() {
                strict &= close_objects(child);
            }
        }
    }
    if let Some(items) = node.get_mut("items") {
        strict &= close_objects(items);
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        if let Some(Value::Array(options)) = node.get_mut(key) {
            for option in options {
                strict &= close_objects(option);
            }
        }
    }
    strict
}

#[derive(Serialize)]
struct ChatRequest<'a> {
    model: &'a str,
    messages: Vec<Message<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_completion_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

/// A non-streamed `chat.completion` (or an error object some servers send with 200).
#[derive(Deserialize)]
struct ChatCompletion {
    choices: Option<Vec<Choice>>,
    usage: Option<TokenUsage>,
    error: Option<Value>,
}

#[derive(Deserialize)]
struct Choice {
    message: Option<ChoiceMessage>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ChoiceMessage {
    content: Option<String>,
    refusal: Option<String>,
}

/// One `chat.completion.chunk` event.
#[derive(Deserialize)]
struct ChatChunk {
    choices: Option<Vec<ChunkChoice>>,
    usage: Option<TokenUsage>,
    error: Option<Value>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    delta: Option<ChoiceMessage>,
    finish_reason: Option<String>,
}

#[derive(Deserialize, Clone, Copy)]
struct TokenUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Deserialize, Clone, Copy)]
struct CompletionDetails {
    reasoning_tokens: Option<u64>,
}

/// The answer after the reasoning some servers put in `content` (Ollama, vLLM and llama.cpp
/// with Qwen3, DeepSeek-R1 and the like), and whether a reasoning block was left unclosed (the
/// cap ran out while the model was still thinking). A block is the content's start up to the
/// first `</think>`: one that opens with `<think>`, or, for a reasoning model
/// ([`is_reasoning_model`]), one whose opening tag the chat template put in the prompt. A
/// `</think>` anywhere else is the answer's own (a quoted review), so it is kept.
fn without_reasoning(text: &str, reasoning_model: bool) -> (&str, bool) {
    let opened = text.trim_start().starts_with("<think>");
    if !opened && !reasoning_model {
        return (text, false);
    }
    match text.split_once("</think>") {
        Some((_, answer)) => (answer.trim_start(), false),
        None if opened => ("", true),
        None => (text, false),
    }
}

/// What the completion (or the stream so far) said.
#[derive(Default)]
struct Answer {
    text: String,
    refusal: String,
    finish: Option<String>,
    tokens: Option<TokenUsage>,
}

impl Answer {
    /// The reported tokens, taken out.
    fn take_usage(&mut self) -> Usage {
        self.tokens
            .take()
            .map_or_else(Usage::default, |tokens| Usage {
                input_tokens: tokens.prompt_tokens.unwrap_or(0),
                output_tokens: tokens.completion_tokens.unwrap_or(0),
                ..Usage::default()
            })
    }

    /// The generation, after adding the reported tokens to `meter` (first: a refused or cut
    /// answer's tokens are billed too).
    fn into_generation(
        mut self,
        meter: &UsageMeter,
        reasoning_model: bool,
    ) -> Result<Generation, LlmError> {
        let reasoning = self
            .tokens
            .and_then(|tokens| tokens.completion_tokens_details?.reasoning_tokens)
            .filter(|&tokens| tokens > 0);
        meter.add(self.take_usage());
        let Some(reason) = self.finish else {
            return Err(malformed(
                NAME,
                "answer ended without a finish_reason (cut off)".to_owned(),
            ));
        };
        let (text, thinking_cut) = without_reasoning(&self.text, reasoning_model);
        if text.is_empty() {
            if !self.refusal.is_empty() {
                return Err(malformed(NAME, format!("model refused: {}", self.refusal)));
            }
            if reason == "length" && (thinking_cut || reasoning.is_some()) {
                let spent = reasoning.map_or_else(String::new, |n| format!(" ({n} tokens)"));
                return Err(malformed(
                    NAME,
                    format!(
                        "the model spent its token cap on reasoning{spent} and gave no answer \
                         text: raise --llm-thinking-budget"
                    ),
                ));
            }
            return Err(malformed(
                NAME,
                format!("no answer text (finish_reason {reason})"),
            ));
        }
        let text = if text.len() == self.text.len() {
            self.text
        } else {
            text.to_owned()
        };
        Ok(Generation {
            text,
            finish: finish_reason(&reason),
        })
    }
}

fn finish_reason(reason: &str) -> FinishReason {
    match reason {
        "stop" => FinishReason::Stop,
        "length" => FinishReason::MaxTokens,
        "content_filter" => FinishReason::Safety,
        other => FinishReason::Other(other.to_owned()),
    }
}

fn provider_error(error: &Value) -> LlmError {
    let error = ProviderError::from_value(&json!({ "error": error })).unwrap_or_default();
    error_for_provider_error(NAME, &error)
}

fn parse_completion(body: &[u8]) -> Result<Answer, LlmError> {
    let completion: ChatCompletion = serde_json::from_slice(body)
        .map_err(|e| malformed(NAME, format!("not a chat.completion: {e}")))?;
    completion_answer(completion)
}

fn completion_answer(completion: ChatCompletion) -> Result<Answer, LlmError> {
    if let Some(error) = &completion.error {
        return Err(provider_error(error));
    }
    let mut answer = Answer {
        tokens: completion.usage,
        ..Answer::default()
    };
    if let Some(choice) = completion.choices.and_then(|c| c.into_iter().next()) {
        if let Some(message) = choice.message {
            answer.text = message.content.unwrap_or_default();
            answer.refusal = message.refusal.unwrap_or_default();
        }
        answer.finish = choice.finish_reason;
    } else {
        return Err(malformed(NAME, "no choices in the completion".to_owned()));
    }
    Ok(answer)
}

/// Parses `chat.completion.chunk` events into an [`Answer`].
#[derive(Default)]
struct StreamHandler {
    answer: Answer,
}

impl SseHandler for StreamHandler {
    fn reset(&mut self) {
        self.answer = Answer::default();
    }

    fn on_event(&mut self, data: &str) -> Result<Flow, LlmError> {
        if data.trim() == "[DONE]" {
            return Ok(Flow::Done);
        }
        let chunk: ChatChunk = serde_json::from_str(data)
            .map_err(|e| malformed(NAME, format!("stream event is not a chunk: {e}")))?;
        if let Some(error) = &chunk.error {
            return Err(provider_error(error));
        }
        if chunk.usage.is_some() {
            self.answer.tokens = chunk.usage;
        }
        if let Some(choice) = chunk.choices.and_then(|c| c.into_iter().next()) {
            if let Some(delta) = choice.delta {
                if let Some(content) = delta.content {
                    self.answer.text.push_str(&content);
                }
                if let Some(refusal) = delta.refusal {
                    self.answer.refusal.push_str(&refusal);
                }
            }
            if choice.finish_reason.is_some() {
                self.answer.finish = choice.finish_reason;
            }
        }
        Ok(Flow::Continue)
    }

    fn on_end(&mut self, trailing: &[u8]) -> Result<(), LlmError> {
        // Some OpenAI-compatible servers ignore `stream: true` and answer with one
        // `chat.completion` body instead of events: that body is the answer, as if it had been
        // asked for without streaming. (Its lines reach here as non-SSE lines.)
        if self.answer.finish.is_none()
            && self.answer.text.is_empty()
            && let Ok(completion) = serde_json::from_slice::<ChatCompletion>(trailing)
            && completion.choices.is_some()
        {
            self.answer = completion_answer(completion)?;
            return Ok(());
        }
        stream_end(NAME, trailing)
    }

    fn take_usage(&mut self) -> Usage {
        self.answer.take_usage()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn generator(config: OpenAiConfig) -> OpenAiGenerator {
        OpenAiGenerator::new(config).unwrap()
    }

    #[test]
    fn urls_with_and_without_v1() {
        for (base, url) in [
            (
                "https://api.openai.com",
                "https://api.openai.com/v1/chat/completions",
            ),
            (
                "https://api.openai.com/v1/",
                "https://api.openai.com/v1/chat/completions",
            ),
            (
                "http://127.0.0.1:11434",
                "http://127.0.0.1:11434/v1/chat/completions",
            ),
            (
                "http://litellm:4000/openai",
                "http://litellm:4000/openai/v1/chat/completions",
            ),
        ] {
            let config = OpenAiConfig {
                base_url: base.to_owned(),
                ..OpenAiConfig::new(None)
            };
            assert_eq!(generator(config).url.as_str(), url);
        }
    }

    #[test]
    fn request_body_shapes() {
        let schema = json!({
            "type": "object",
            "properties": {"summary": {"type": "string"}, "themes": {"type": "array", "items": {"type": "string"}}},
            "required": ["summary", "themes"]
        });
        let request = GenerateRequest {
            system: "sys",
            prompt: "user",
            max_output_tokens: 42,
            response_schema: Some(&schema),
            deadline: tokio::time::Instant::now(),
            usage: &UsageMeter::default(),
        };
        let g = generator(OpenAiConfig {
            model: "m".into(),
            ..OpenAiConfig::new(None)
        });
        let body: Value =
            serde_json::from_slice(&g.request_body(&request, JsonMode::Schema).unwrap()).unwrap();
        assert_eq!(
            body,
            json!({
                "model": "m",
                "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "user"}],
                "max_tokens": 42,
                "response_format": {"type": "json_schema", "json_schema": {
                    "name": "answer",
                    "strict": true,
                    "schema": {
                        "type": "object",
                        "additionalProperties": false,
                        "properties": {"summary": {"type": "string"}, "themes": {"type": "array", "items": {"type": "string"}}},
                        "required": ["summary", "themes"]
                    }
                }}
            })
        );
        let body: Value =
            serde_json::from_slice(&g.request_body(&request, JsonMode::Object).unwrap()).unwrap();
        assert_eq!(body["response_format"], json!({"type": "json_object"}));
        let streaming = generator(OpenAiConfig {
            stream: true,
            token_limit_field: TokenLimitField::MaxCompletionTokens,
            ..OpenAiConfig::new(None)
        });
        let body: Value = serde_json::from_slice(
            &streaming
                .request_body(
                    &GenerateRequest {
                        system: "",
                        response_schema: None,
                        ..request
                    },
                    JsonMode::Off,
                )
                .unwrap(),
        )
        .unwrap();
        assert_eq!(body["stream"], json!(true));
        assert_eq!(body["stream_options"], json!({"include_usage": true}));
        // Not a reasoning model's name: the answer's own cap.
        assert_eq!(body["max_completion_tokens"], json!(42));
        assert!(body.get("max_tokens").is_none());
        assert!(body.get("response_format").is_none());
        assert_eq!(body["messages"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn an_explicit_thinking_budget_is_added_to_either_cap() {
        let request = GenerateRequest {
            system: "",
            prompt: "user",
            max_output_tokens: 42,
            response_schema: None,
            deadline: tokio::time::Instant::now(),
            usage: &UsageMeter::default(),
        };
        for (field, name) in [
            (TokenLimitField::MaxTokens, "max_tokens"),
            (
                TokenLimitField::MaxCompletionTokens,
                "max_completion_tokens",
            ),
        ] {
            let g = generator(OpenAiConfig {
                token_limit_field: field,
                thinking: ThinkingBudget::Tokens(1000),
                ..OpenAiConfig::new(None)
            });
            let body: Value =
                serde_json::from_slice(&g.request_body(&request, JsonMode::Off).unwrap()).unwrap();
            assert_eq!(body[name], json!(1042), "{name}");
        }
        // `auto`: room for reasoning only for a reasoning model, whichever the field.
        for (model, field, name, cap) in [
            ("gpt-4o-mini", TokenLimitField::MaxTokens, "max_tokens", 42),
            (
                "gpt-4-turbo",
                TokenLimitField::MaxCompletionTokens,
                "max_completion_tokens",
                42,
            ),
            (
                "o4-mini",
                TokenLimitField::MaxCompletionTokens,
                "max_completion_tokens",
                42 + AUTO_REASONING_TOKENS,
            ),
            (
                "openai/gpt-5-mini",
                TokenLimitField::MaxCompletionTokens,
                "max_completion_tokens",
                42 + AUTO_REASONING_TOKENS,
            ),
            (
                "deepseek-r1:14b",
                TokenLimitField::MaxTokens,
                "max_tokens",
                42 + AUTO_REASONING_TOKENS,
            ),
        ] {
            let g = generator(OpenAiConfig {
                model: model.to_owned(),
                token_limit_field: field,
                ..OpenAiConfig::new(None)
            });
            let body: Value =
                serde_json::from_slice(&g.request_body(&request, JsonMode::Off).unwrap()).unwrap();
            assert_eq!(body[name], json!(cap), "{model}");
        }
        for model in [
            "gpt-4o",
            "gpt-4.1-mini",
            "llama3.1",
            "omni-moderation",
            "mistral-large",
            "qwen3-coder:30b",
            "Qwen/Qwen3-235B-A22B-Instruct-2507",
        ] {
            assert!(!is_reasoning_model(model), "{model}");
        }
        for model in [
            "o1",
            "o3-mini",
            "O3",
            "gpt-5",
            "gpt-oss-20b",
            "qwq:32b",
            "qwen3:8b",
            "deepseek-reasoner",
        ] {
            assert!(is_reasoning_model(model), "{model}");
        }
    }

    #[test]
    fn reasoning_in_the_content_is_not_the_answer_and_a_cap_spent_on_it_is_named() {
        let of_model = |body: &str, reasoning_model: bool| {
            parse_completion(body.as_bytes())
                .and_then(|answer| answer.into_generation(&UsageMeter::default(), reasoning_model))
        };
        let generation = |body: &str| of_model(body, true);
        // A `</think>` quoted in the answer of a model that does not reason is the answer's.
        let quoted = r#"{"insight": "one review just says </think> and more"}"#;
        let body = json!({"choices": [{"message": {"content": quoted}, "finish_reason": "stop"}]});
        assert_eq!(of_model(&body.to_string(), false).unwrap().text, quoted);
        let answered = generation(
            r#"{"choices": [{"message": {"content": "<think>\nThe user wants JSON.\n</think>\n\n{\"insight\": \"x\"}"}, "finish_reason": "stop"}]}"#,
        )
        .unwrap();
        assert_eq!(answered.text, r#"{"insight": "x"}"#);
        // The block opened by the chat template: only its end is in the content.
        let opened = generation(
            r#"{"choices": [{"message": {"content": "A draft: {\"insight\": \"no\"}\n</think>\n{\"insight\": \"x\"}"}, "finish_reason": "stop"}]}"#,
        )
        .unwrap();
        assert_eq!(opened.text, r#"{"insight": "x"}"#);
        // Still thinking when the cap ran out (a local model).
        let cut = generation(
            r#"{"choices": [{"message": {"content": "<think>\nLet me see"}, "finish_reason": "length"}]}"#,
        )
        .unwrap_err();
        assert!(cut.to_string().contains("--llm-thinking-budget"), "{cut}");
        // OpenAI's reasoning model: no content, the cap counted as reasoning tokens.
        let spent = generation(
            r#"{"choices": [{"message": {"content": ""}, "finish_reason": "length"}],
                "usage": {"prompt_tokens": 300, "completion_tokens": 210,
                          "completion_tokens_details": {"reasoning_tokens": 210}}}"#,
        )
        .unwrap_err();
        assert!(
            spent.to_string().contains("reasoning (210 tokens)"),
            "{spent}"
        );
        assert!(
            spent.to_string().contains("--llm-thinking-budget"),
            "{spent}"
        );
        // An empty answer for another reason says only that.
        let empty =
            generation(r#"{"choices": [{"message": {"content": ""}, "finish_reason": "length"}]}"#)
                .unwrap_err();
        assert!(!empty.to_string().contains("reasoning"), "{empty}");
    }

    #[test]
    fn optional_properties_turn_strict_off() {
        let schema = json!({
            "title": "map_answer",
            "type": "object",
            "properties": {"a": {"type": "string"}, "b": {"type": "object", "properties": {"c": {"type": "string"}}}},
            "required": ["a", "b"]
        });
        let format = json_schema_format(&schema);
        assert_eq!(format["json_schema"]["name"], json!("map_answer"));
        assert_eq!(format["json_schema"]["strict"], json!(false));
        assert_eq!(
            format["json_schema"]["schema"]["properties"]["b"]["additionalProperties"],
            json!(false)
        );
    }

    #[test]
    fn key_is_optional_and_redacted() {
        let g = generator(OpenAiConfig::new(None));
        assert!(g.headers.get(AUTHORIZATION).is_none());
        let g = generator(OpenAiConfig::new(Some(SecretString::from(
            "sk-secret".to_owned(),
        ))));
        assert!(g.headers.get(AUTHORIZATION).unwrap().is_sensitive());
        assert!(!format!("{g:?}").contains("sk-secret"));
    }

    #[test]
    fn hostile_completions_are_errors_not_panics() {
        for body in [
            "null",
            "{}",
            r#"{"choices": null}"#,
            r#"{"choices": []}"#,
            r#"{"choices": [{}]}"#,
            r#"{"choices": [{"message": {"content": null}, "finish_reason": "stop"}]}"#,
            r#"{"choices": [{"message": {"content": "x"}}]}"#,
            r#"{"error": {"message": "boom"}}"#,
            r#"{"choices": [{"message": {"content": 5}}]}"#,
        ] {
            let result = parse_completion(body.as_bytes())
                .and_then(|answer| answer.into_generation(&UsageMeter::default(), false));
            assert!(result.is_err(), "{body}");
        }
    }
}
