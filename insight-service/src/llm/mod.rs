//! The LLM backend seam. The pipeline asks a backend for two things: an insight for one chunk of
//! entries (map) and a summary of chunk insights (reduce). `local` answers offline; Gemini and
//! OpenAI-compatible backends plug in behind the same trait.

use std::time::Duration;

use futures::future::BoxFuture;
use tokio::time::Instant;

use crate::domain::{ChunkInsight, Entry, Sentiment, UsageMeter};

pub mod gemini;
pub mod http;
pub mod local;
pub mod openai;
pub mod prompted;

/// Least time a retry must have before its deadline to be started. A model answers in more
/// than this, so a try that starts later could only be cut off, and its timeout would then
/// replace the failure that caused the retry (a 503, a refused connection) as the reason the
/// call failed.
pub const MIN_RETRY_WINDOW: Duration = Duration::from_millis(100);

/// The map step's question: summarize this chunk.
#[derive(Clone, Copy, Debug)]
pub struct ChunkRequest<'a> {
    /// Position of the chunk in the input.
    pub index: u32,
    /// The chunk's entries, in input order (never empty).
    pub entries: &'a [Entry],
    /// Word budget of the chunk insight.
    pub max_words: usize,
    /// Most bytes of the prompt's data (its user turn): the chunk was cut to fit it, except an
    /// entry larger than it on its own, which a prompting backend cuts (see
    /// [`crate::pipeline::prompts::map_prompt`]).
    pub prompt_budget_bytes: usize,
    /// The call must be answered by then (what is left of the caller's gRPC deadline, capped
    /// by `--llm-timeout`); a backend that cannot must fail with [`LlmError::Timeout`].
    pub deadline: Instant,
    /// Where the call's cost goes as it is spent (see [`UsageMeter`]).
    pub usage: &'a UsageMeter,
}

/// A backend's answer for one chunk.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChunkDraft {
    /// Short summary of the chunk.
    pub insight: String,
    /// Theme keywords, most salient first.
    pub themes: Vec<String>,
    /// Sentiment of the chunk's entries.
    pub sentiment: Sentiment,
}

/// The reduce step's question: combine these chunk insights.
#[derive(Clone, Copy, Debug)]
pub struct ReduceRequest<'a> {
    /// Successful chunk insights, ordered by index (never empty).
    pub chunks: &'a [ChunkInsight],
    /// Word budget of the summary.
    pub max_words: usize,
    /// The call must be answered by then (see [`ChunkRequest::deadline`]).
    pub deadline: Instant,
    /// Where the call's cost goes (see [`ChunkRequest::usage`]).
    pub usage: &'a UsageMeter,
}

/// A backend's combined summary. Sentiment is not asked for: the pipeline adds up the chunks'
/// counts exactly, which no model does better.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SummaryDraft {
    /// The summary text.
    pub summary: String,
    /// Themes across the chunks, most salient first.
    pub themes: Vec<String>,
}

/// Why a backend call failed: one variant per cause, so the service can map each to the
/// status of the error contract and decide what to retry.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LlmError {
    /// The key is missing, invalid or lacks permission (HTTP 401/403). Not retried.
    #[error("{backend}: authentication failed: {message}")]
    Auth {
        /// Backend name.
        backend: String,
        /// What the provider said.
        message: String,
    },
    /// The account's quota or credit is used up (OpenAI's 429 `insufficient_quota`): unlike a
    /// rate limit, waiting does not help until someone adds credit or raises the quota. Not
    /// retried.
    #[error("{backend}: quota exhausted: {message}")]
    QuotaExhausted {
        /// Backend name.
        backend: String,
        /// What the provider said.
        message: String,
    },
    /// The provider throttled us (HTTP 429); `retry_after` from `Retry-After` or RetryInfo.
    #[error("{backend}: rate limited: {message}")]
    RateLimited {
        /// Backend name.
        backend: String,
        /// How long the provider asked us to wait, if it said.
        retry_after: Option<Duration>,
        /// What the provider said.
        message: String,
    },
    /// The provider rejected the request as malformed (HTTP 400/404/422). Not retried.
    #[error("{backend}: bad request: {message}")]
    BadRequest {
        /// Backend name.
        backend: String,
        /// What the provider said.
        message: String,
    },
    /// The provider failed (HTTP 5xx).
    #[error("{backend}: server error {status}: {message}")]
    Server {
        /// Backend name.
        backend: String,
        /// HTTP status.
        status: u16,
        /// How long the provider asked us to wait (`Retry-After`, else RetryInfo in the body),
        /// if it said: a caller that retries on its own must not resend sooner.
        retry_after: Option<Duration>,
        /// What the provider said.
        message: String,
    },
    /// No connection could be made (refused, DNS, TLS).
    #[error("{backend}: cannot connect: {message}")]
    Connect {
        /// Backend name.
        backend: String,
        /// The transport error.
        message: String,
    },
    /// The deadline passed, or the stream stalled, before an answer was complete.
    #[error("{backend}: timed out: {message}")]
    Timeout {
        /// Backend name.
        backend: String,
        /// Which limit was hit.
        message: String,
    },
    /// The response body exceeded the byte cap; it was not buffered past the cap.
    #[error("{backend}: response larger than {limit} bytes")]
    TooLarge {
        /// Backend name.
        backend: String,
        /// The cap, in bytes.
        limit: usize,
    },
    /// The provider refused the prompt itself (Gemini's `promptFeedback.blockReason`): the same
    /// prompt is refused again, so it is not retried.
    #[error("{backend}: prompt refused: {message}")]
    Blocked {
        /// Backend name.
        backend: String,
        /// The provider's reason.
        message: String,
    },
    /// The response could not be parsed, or was cut off (e.g. finishReason MAX_TOKENS) or
    /// its answer blocked (SAFETY) so that it holds no usable answer.
    #[error("{backend}: unusable response: {message}")]
    Malformed {
        /// Backend name.
        backend: String,
        /// What was wrong.
        message: String,
    },
}

impl LlmError {
    /// The backend that failed.
    pub fn backend(&self) -> &str {
        match self {
            Self::Auth { backend, .. }
            | Self::QuotaExhausted { backend, .. }
            | Self::RateLimited { backend, .. }
            | Self::BadRequest { backend, .. }
            | Self::Server { backend, .. }
            | Self::Connect { backend, .. }
            | Self::Timeout { backend, .. }
            | Self::TooLarge { backend, .. }
            | Self::Blocked { backend, .. }
            | Self::Malformed { backend, .. } => backend,
        }
    }

    /// The delay the provider asked for before another try (`Retry-After` or RetryInfo).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after, .. } | Self::Server { retry_after, .. } => {
                *retry_after
            }
            _ => None,
        }
    }

    /// The kind of failure as a stable word for machines (the `cause` of the status's
    /// ErrorInfo): callers can tell a throttled provider from a bad key without parsing the
    /// message.
    pub fn cause(&self) -> &'static str {
        match self {
            Self::Auth { .. } => "auth",
            Self::QuotaExhausted { .. } => "quota",
            Self::RateLimited { .. } => "rate_limited",
            Self::BadRequest { .. } => "bad_request",
            Self::Server { .. } => "server_error",
            Self::Connect { .. } => "connect",
            Self::Timeout { .. } => "timeout",
            Self::TooLarge { .. } => "too_large",
            Self::Blocked { .. } => "blocked",
            Self::Malformed { .. } => "malformed",
        }
    }

    /// Whether trying the same call again may succeed (429, 5xx, connect errors).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::RateLimited { .. } | Self::Server { .. } | Self::Connect { .. }
        )
    }
}

/// Why a generation stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// The model finished its answer.
    Stop,
    /// The output token cap cut the answer off.
    MaxTokens,
    /// A safety filter blocked the answer.
    Safety,
    /// Anything else the provider reported.
    Other(String),
}

/// One request to a text-generating LLM (Gemini, OpenAI-compatible): prompts are built by the
/// pipeline, the generator only speaks the provider's protocol.
#[derive(Clone, Copy, Debug)]
pub struct GenerateRequest<'a> {
    /// Instructions (Gemini `systemInstruction`, OpenAI `system` message).
    pub system: &'a str,
    /// The user prompt (data fenced as data by the pipeline).
    pub prompt: &'a str,
    /// Output token cap (`maxOutputTokens` / `max_tokens`).
    pub max_output_tokens: u32,
    /// JSON schema the answer must follow (Gemini `responseSchema` with
    /// `responseMimeType: application/json`; OpenAI `response_format`).
    pub response_schema: Option<&'a serde_json::Value>,
    /// Absolute deadline of this call, retries included.
    pub deadline: Instant,
    /// Where the call's cost goes: every attempt, byte and reported token, as they happen.
    pub usage: &'a UsageMeter,
}

/// A completed generation.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// The answer text (for JSON requests, the JSON document).
    pub text: String,
    /// Why it stopped.
    pub finish: FinishReason,
}

/// A text-generation provider.
pub trait Generator: Send + Sync + 'static {
    /// Short name: "gemini", "openai".
    fn name(&self) -> &str;
    /// Model used.
    fn model(&self) -> &str;
    /// Generates one answer, within `request.deadline`.
    fn generate<'a>(
        &'a self,
        request: GenerateRequest<'a>,
    ) -> BoxFuture<'a, Result<Generation, LlmError>>;
}

/// A shared generator is a generator: the summarizer and the music analysis use one client.
impl<G: Generator + ?Sized> Generator for std::sync::Arc<G> {
    fn name(&self) -> &str {
        (**self).name()
    }

    fn model(&self) -> &str {
        (**self).model()
    }

    fn generate<'a>(
        &'a self,
        request: GenerateRequest<'a>,
    ) -> BoxFuture<'a, Result<Generation, LlmError>> {
        (**self).generate(request)
    }
}

/// A summarization backend.
pub trait LlmBackend: Send + Sync + 'static {
    /// Short name reported in answers: "local", "gemini", "openai".
    fn name(&self) -> &str;
    /// Model reported in answers.
    fn model(&self) -> &str;
    /// Map step: an insight for one chunk.
    fn summarize_chunk<'a>(
        &'a self,
        request: ChunkRequest<'a>,
    ) -> BoxFuture<'a, Result<ChunkDraft, LlmError>>;
    /// Reduce step: one summary from chunk insights.
    fn reduce<'a>(
        &'a self,
        request: ReduceRequest<'a>,
    ) -> BoxFuture<'a, Result<SummaryDraft, LlmError>>;
}

/// Why a place in a model's answer was not the answer (see [`parse_answer_json`]).
#[derive(Debug)]
pub enum NotTheAnswer {
    /// Not JSON at all.
    NotJson(String),
    /// JSON, but not what was asked for (its message says what is wrong, for a repair).
    Invalid(String),
}

impl NotTheAnswer {
    /// What is wrong, whichever kind.
    pub fn into_message(self) -> String {
        match self {
            Self::NotJson(message) | Self::Invalid(message) => message,
        }
    }

    /// A serde error, classified: valid JSON of the wrong shape is [`NotTheAnswer::Invalid`].
    pub fn from_serde(error: &serde_json::Error) -> Self {
        match error.classify() {
            serde_json::error::Category::Data => Self::Invalid(error.to_string()),
            _ => Self::NotJson(error.to_string()),
        }
    }
}

/// Where a model may have put the JSON it was asked for, most likely first: the whole
/// (trimmed) text; the body of each Markdown code fence, from its first `{` or `[` (any info
/// string, ```` ```JSON ```` too, or a one-line fence); and the span from the first `{` to
/// the last `}` (prose around the object). Models wrap JSON despite being asked not to.
fn json_candidates(text: &str) -> impl Iterator<Item = &str> {
    let trimmed = text.trim();
    let fences = trimmed
        .split("```")
        .skip(1)
        .step_by(2)
        .filter_map(|body| body.find(['{', '[']).map(|start| body[start..].trim()));
    let span = match (trimmed.find('{'), trimmed.rfind('}')) {
        (Some(start), Some(end)) if start < end => Some(&trimmed[start..=end]),
        _ => None,
    };
    std::iter::once(trimmed).chain(fences).chain(span)
}

/// The first place in a model's answer ([`json_candidates`]) that `parse` accepts. Else the
/// error `parse` gave the first place that was JSON at all (what is wrong with the answer, for
/// a repair prompt), else the whole text's.
pub fn parse_answer_json<T>(
    text: &str,
    parse: impl Fn(&str) -> Result<T, NotTheAnswer>,
) -> Result<T, NotTheAnswer> {
    let mut first: Option<NotTheAnswer> = None;
    for candidate in json_candidates(text) {
        match parse(candidate) {
            Ok(answer) => return Ok(answer),
            Err(invalid @ NotTheAnswer::Invalid(_)) => {
                if !matches!(first, Some(NotTheAnswer::Invalid(_))) {
                    first = Some(invalid);
                }
            }
            Err(not_json) => {
                first.get_or_insert(not_json);
            }
        }
    }
    Err(first.unwrap_or_else(|| NotTheAnswer::NotJson("an empty answer".to_owned())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_found_in_fences_and_prose() {
        #[derive(serde::Deserialize, Debug, PartialEq)]
        struct Answer {
            insight: String,
        }
        let parse = |text: &str| {
            parse_answer_json(text, |candidate| {
                serde_json::from_str::<Answer>(candidate).map_err(|e| NotTheAnswer::from_serde(&e))
            })
        };
        let object = r#"{"insight": "Ads annoy."}"#;
        for answer in [
            object.to_owned(),
            format!("  {object}\n"),
            format!("```json\n{object}\n```"),
            format!("```JSON\n{object}\n```\n"),
            format!("```\n{object}\n```"),
            format!("```json {object}```"),
            "```{\n\"insight\": \"Ads annoy.\"}\n```".to_owned(),
            format!("Here is the JSON you asked for:\n```json\n{object}\n```\nHope it helps."),
            format!("Sure! {object}"),
            format!("{object}\n\nThese are the themes."),
            // An example of the wrong shape before the answer.
            format!("Format: ```{{\"x\": 1}}```\nAnswer: ```json\n{object}\n```"),
        ] {
            assert_eq!(
                parse(&answer).map_err(|e| format!("{e:?}")),
                Ok(Answer {
                    insight: "Ads annoy.".to_owned()
                }),
                "{answer:?}"
            );
        }
        // Valid JSON as a whole wins, even with a fence inside a string.
        let inside = r#"{"insight": "use ```code``` fences"}"#;
        assert_eq!(parse(inside).unwrap().insight, "use ```code``` fences");
        // The error says what is wrong with the JSON there is, else that there is none.
        assert!(matches!(
            parse("Sure: ```json\n{\"themes\": []}\n```"),
            Err(NotTheAnswer::Invalid(message)) if message.contains("insight")
        ));
        assert!(matches!(
            parse(" no json here "),
            Err(NotTheAnswer::NotJson(_))
        ));
    }

    /// The causes are part of the status contract (ErrorInfo metadata `cause`, listed in the
    /// README): clients match on these words, so they must not drift.
    #[test]
    fn every_failure_kind_has_its_documented_cause() {
        let backend = || "gemini".to_owned();
        let message = || "m".to_owned();
        for (error, cause) in [
            (
                LlmError::Auth {
                    backend: backend(),
                    message: message(),
                },
                "auth",
            ),
            (
                LlmError::QuotaExhausted {
                    backend: backend(),
                    message: message(),
                },
                "quota",
            ),
            (
                LlmError::RateLimited {
                    backend: backend(),
                    retry_after: None,
                    message: message(),
                },
                "rate_limited",
            ),
            (
                LlmError::BadRequest {
                    backend: backend(),
                    message: message(),
                },
                "bad_request",
            ),
            (
                LlmError::Server {
                    backend: backend(),
                    status: 500,
                    retry_after: None,
                    message: message(),
                },
                "server_error",
            ),
            (
                LlmError::Connect {
                    backend: backend(),
                    message: message(),
                },
                "connect",
            ),
            (
                LlmError::Timeout {
                    backend: backend(),
                    message: message(),
                },
                "timeout",
            ),
            (
                LlmError::TooLarge {
                    backend: backend(),
                    limit: 1,
                },
                "too_large",
            ),
            (
                LlmError::Blocked {
                    backend: backend(),
                    message: message(),
                },
                "blocked",
            ),
            (
                LlmError::Malformed {
                    backend: backend(),
                    message: message(),
                },
                "malformed",
            ),
        ] {
            assert_eq!(error.cause(), cause, "{error:?}");
        }
    }
}
