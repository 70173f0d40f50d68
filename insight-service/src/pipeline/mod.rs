//! The summarization pipeline: validate, cap, chunk, map each chunk through the backend, reduce
//! the chunk insights into one summary. Knows no tonic; the gRPC adapter calls [`Pipeline`].
//!
//! Map-reduce is the whole point: the seed worker sent 22+ entries in one prompt and was
//! OOM-killed. Here no backend call ever sees more than one chunk (map) or the chunk insights
//! (reduce), so the size of any one call is bounded by `chunk_size`, not by the input.

use std::collections::HashMap;

use crate::domain::{Entry, SummaryOptions};

pub mod chunk;
mod mapreduce;
pub mod prompts;
pub mod source;

pub use mapreduce::{MIN_PROMPT_BUDGET_BYTES, Pipeline, PipelineConfig};
pub use source::{ChunkMemo, EntrySource, InlineEntries, SourceError};

/// Largest accepted feedback text, in bytes of UTF-8.
pub const MAX_TEXT_BYTES: usize = 8 * 1024;
/// Entries per chunk when the caller does not say.
pub const DEFAULT_CHUNK_SIZE: u32 = 5;
/// Largest chunk: bounds the prompt of one map call.
pub const MAX_CHUNK_SIZE: u32 = 50;
/// Entries summarized when the caller does not say (the seed's cap of 15).
pub const DEFAULT_MAX_ENTRIES: u32 = 15;
/// Word limit of a summary when the caller does not say, and its hard cap.
pub const MAX_WORDS: u32 = 300;
/// Word budget of one chunk insight: short, because the reduce step reads all of them.
pub const CHUNK_INSIGHT_WORDS: usize = 60;

/// Why a summary could not be produced. Clone, so identical concurrent requests computed
/// once can all be told the same outcome.
#[derive(Clone, Debug, thiserror::Error)]
pub enum PipelineError {
    /// The request is malformed; `field` names the offending field (e.g. `entries[3].text`).
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// Path of the offending field in the request.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The backend failed for every chunk (or the reduce) and no fallback was allowed.
    #[error("the {backend} backend failed: {message}")]
    BackendUnavailable {
        /// Backend name.
        backend: String,
        /// The last error it gave.
        message: String,
        /// That error's kind ([`LlmError::cause`](crate::llm::LlmError::cause)), when a
        /// call failed (rather than, say, no chunk being tried).
        cause: Option<&'static str>,
        /// The longest delay the provider asked for before another try (a 429's or 5xx's
        /// `Retry-After` or RetryInfo): a caller must not resend sooner.
        retry_after: Option<std::time::Duration>,
    },
    /// The caller's deadline (or the server's request timeout) passed before an answer.
    #[error("deadline exceeded after {completed} of {total} chunks")]
    DeadlineExceeded {
        /// Chunks finished in time.
        completed: usize,
        /// Chunks in all.
        total: usize,
    },
    /// The caller's deadline passed while it waited for an identical summary another request
    /// was computing, or that computation ran out of its own time with less left to this
    /// caller: no chunk was this caller's own, so none are counted.
    #[error("deadline exceeded waiting for an identical summary in progress")]
    DeadlineExceededWaiting,
    /// The entries could not be read (the store went away mid-read): retrying later is safe.
    #[error("cannot read the entries to summarize: {0}")]
    Source(#[source] SourceError),
}

impl PipelineError {
    /// [`PipelineError::BackendUnavailable`] for `backend`, whose failure was `error`, asking
    /// callers to wait at least `retry_after` (or what `error` asked for) when waiting can
    /// help: after a bad key or a refused request no delay is given, whatever another chunk's
    /// provider asked for, since a caller that waits and resends fails the same way.
    pub fn backend_failed(
        backend: impl Into<String>,
        error: &crate::llm::LlmError,
        retry_after: Option<std::time::Duration>,
    ) -> Self {
        Self::BackendUnavailable {
            backend: backend.into(),
            message: error.to_string(),
            cause: Some(error.cause()),
            retry_after: if error.is_retryable() {
                retry_after.max(error.retry_after())
            } else {
                None
            },
        }
    }

    /// An [`PipelineError::InvalidArgument`] for `field`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Prefixes the field path of an [`PipelineError::InvalidArgument`] with `prefix` (e.g.
    /// `entries[3]`), so per-entry rules can name relative fields and each caller says where
    /// the entry sits in its request. Other variants are returned unchanged.
    pub fn within(self, prefix: &str) -> Self {
        match self {
            Self::InvalidArgument { field, reason } => Self::InvalidArgument {
                field: format!("{prefix}.{field}"),
                reason,
            },
            other => other,
        }
    }
}

/// Summary options as the caller sent them: `None` = not set, take the default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RequestedOptions {
    /// Entries per chunk.
    pub chunk_size: Option<u32>,
    /// Entries summarized at most; `Some(0)` = the server cap.
    pub max_entries: Option<u32>,
    /// Word limit of the summary.
    pub max_words: Option<u32>,
    /// Skip reading the insight cache.
    pub bypass_cache: bool,
    /// Answer UNAVAILABLE rather than falling back to `local`.
    pub disable_fallback: bool,
}

/// Applies defaults and checks ranges; `max_entries_cap` is the server's `--max-entries-cap`.
pub fn resolve_options(
    requested: RequestedOptions,
    max_entries_cap: u32,
) -> Result<SummaryOptions, PipelineError> {
    let chunk_size = requested.chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE);
    if !(1..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        return Err(PipelineError::invalid(
            "options.chunk_size",
            format!("must be between 1 and {MAX_CHUNK_SIZE}, got {chunk_size}"),
        ));
    }
    let max_entries = match requested.max_entries {
        None => DEFAULT_MAX_ENTRIES.min(max_entries_cap),
        Some(0) => max_entries_cap,
        Some(n) if n > max_entries_cap => {
            return Err(PipelineError::invalid(
                "options.max_entries",
                format!(
                    "must be at most the server cap of {max_entries_cap} (0 = the cap), got {n}"
                ),
            ));
        }
        Some(n) => n,
    };
    let max_words = requested.max_words.unwrap_or(MAX_WORDS);
    if !(1..=MAX_WORDS).contains(&max_words) {
        return Err(PipelineError::invalid(
            "options.max_words",
            format!("must be between 1 and {MAX_WORDS}, got {max_words}"),
        ));
    }
    Ok(SummaryOptions {
        chunk_size: chunk_size as usize,
        max_entries: max_entries as usize,
        max_words: max_words as usize,
        bypass_cache: requested.bypass_cache,
        disable_fallback: requested.disable_fallback,
    })
}

/// Checks the foundation rules on inline entries: at least one; each with a unique non-empty
/// id and a non-empty text of at most [`MAX_TEXT_BYTES`]. Field paths are `entries[i].x`.
pub fn validate_entries(entries: &[Entry]) -> Result<(), PipelineError> {
    if entries.is_empty() {
        return Err(PipelineError::invalid(
            "entries",
            "at least one feedback entry is required",
        ));
    }
    let mut seen: HashMap<&str, usize> = HashMap::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        validate_entry(entry).map_err(|e| e.within(&format!("entries[{i}]")))?;
        if let Some(first) = seen.insert(entry.id.as_str(), i) {
            return Err(PipelineError::invalid(
                format!("entries[{i}].id"),
                format!("duplicate id {:?} (first at entries[{first}])", entry.id),
            ));
        }
    }
    Ok(())
}

/// Longest accepted `id`, `user_id` or `source`, in bytes: they are keys and labels, not text,
/// and an index row must hold them (PostgreSQL refuses index rows of a few KiB).
pub const MAX_LABEL_BYTES: usize = 256;

/// The per-entry foundation rules: a non-empty id and a non-empty text of at most
/// [`MAX_TEXT_BYTES`]; `id`, `user_id` and `source` of at most [`MAX_LABEL_BYTES`]; no NUL
/// character anywhere (PostgreSQL cannot store one in text, so it would fail a whole import
/// batch there). The one home of these rules, called by inline summaries
/// ([`validate_entries`]) and by `ImportFeedback`, so a stored entry is always one an inline
/// summary would accept. Field paths are relative to the entry (`id`, `text`).
pub fn validate_entry(entry: &Entry) -> Result<(), PipelineError> {
    if entry.id.trim().is_empty() {
        return Err(PipelineError::invalid("id", "must not be empty"));
    }
    if entry.text.trim().is_empty() {
        return Err(PipelineError::invalid("text", "must not be empty"));
    }
    if entry.text.len() > MAX_TEXT_BYTES {
        return Err(PipelineError::invalid(
            "text",
            format!(
                "must be at most {MAX_TEXT_BYTES} bytes, got {}",
                entry.text.len()
            ),
        ));
    }
    for (field, value) in [
        ("id", &entry.id),
        ("user_id", &entry.user_id),
        ("source", &entry.source),
    ] {
        if value.len() > MAX_LABEL_BYTES {
            return Err(PipelineError::invalid(
                field,
                format!(
                    "must be at most {MAX_LABEL_BYTES} bytes, got {}",
                    value.len()
                ),
            ));
        }
    }
    for (field, value) in [
        ("id", &entry.id),
        ("user_id", &entry.user_id),
        ("text", &entry.text),
        ("source", &entry.source),
    ] {
        no_nul(field, value)?;
    }
    Ok(())
}

/// Refuses a NUL character in `value` (INVALID_ARGUMENT naming `field`).
pub fn no_nul(field: &str, value: &str) -> Result<(), PipelineError> {
    if value.contains('\0') {
        return Err(PipelineError::invalid(field, NO_NUL));
    }
    Ok(())
}

/// Why a value with a NUL character is refused: PostgreSQL cannot store one in text.
pub const NO_NUL: &str = "must not contain a NUL character (U+0000)";
