//! The summarization pipeline: validate, cap, chunk, map each chunk through the backend, reduce
//! the chunk insights into one summary. Knows no tonic; the gRPC adapter calls [`Pipeline`].
//!
//! Map-reduce is the whole point: the seed worker sent 22+ entries in one prompt and was
//! OOM-killed. Here no backend call ever sees more than one chunk (map) or the chunk insights
//! (reduce), so the size of any one call is bounded by `chunk_size`, not by the input.

use std::{collections::HashMap, sync::Arc};

use crate::{
    domain::{ChunkInsight, ChunkStatus, Entry, FeedbackSummary, Sentiment, SummaryOptions, Usage},
    llm::{ChunkRequest, LlmBackend, ReduceRequest},
    text,
};

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

/// Why a summary could not be produced.
#[derive(Debug, thiserror::Error)]
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
    },
}

impl PipelineError {
    /// An [`PipelineError::InvalidArgument`] for `field`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Summary options as the caller sent them: `None` = not set, take the default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
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
        if entry.id.trim().is_empty() {
            return Err(PipelineError::invalid(
                format!("entries[{i}].id"),
                "must not be empty",
            ));
        }
        if let Some(first) = seen.insert(entry.id.as_str(), i) {
            return Err(PipelineError::invalid(
                format!("entries[{i}].id"),
                format!("duplicate id {:?} (first at entries[{first}])", entry.id),
            ));
        }
        if entry.text.trim().is_empty() {
            return Err(PipelineError::invalid(
                format!("entries[{i}].text"),
                "must not be empty",
            ));
        }
        if entry.text.len() > MAX_TEXT_BYTES {
            return Err(PipelineError::invalid(
                format!("entries[{i}].text"),
                format!(
                    "must be at most {MAX_TEXT_BYTES} bytes, got {}",
                    entry.text.len()
                ),
            ));
        }
    }
    Ok(())
}

/// Runs summaries through one backend.
#[derive(Clone)]
pub struct Pipeline {
    backend: Arc<dyn LlmBackend>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("backend", &self.backend.name())
            .finish()
    }
}

impl Pipeline {
    /// A pipeline over `backend`.
    pub fn new(backend: Arc<dyn LlmBackend>) -> Self {
        Self { backend }
    }

    /// Validates `entries`, keeps the first `options.max_entries`, and summarizes them in
    /// chunks of `options.chunk_size` (map), then combines the chunk insights (reduce).
    pub async fn summarize(
        &self,
        mut entries: Vec<Entry>,
        options: SummaryOptions,
    ) -> Result<FeedbackSummary, PipelineError> {
        validate_entries(&entries)?;
        let total = entries.len();
        entries.truncate(options.max_entries);
        let entries_skipped = (total - entries.len()) as u32;

        let mut usage = Usage::default();
        let mut chunks = Vec::with_capacity(entries.len().div_ceil(options.chunk_size));
        let mut last_error = None;
        for (index, chunk) in entries.chunks(options.chunk_size).enumerate() {
            let index = index as u32;
            let entry_ids: Vec<String> = chunk.iter().map(|e| e.id.clone()).collect();
            let request = ChunkRequest {
                index,
                entries: chunk,
                max_words: CHUNK_INSIGHT_WORDS.min(options.max_words),
            };
            match self.backend.summarize_chunk(request).await {
                Ok(draft) => {
                    usage += draft.usage;
                    chunks.push(ChunkInsight {
                        index,
                        entry_ids,
                        insight: draft.insight,
                        themes: draft.themes,
                        sentiment: draft.sentiment,
                        status: ChunkStatus::Ok,
                        error: None,
                    });
                }
                Err(error) => {
                    tracing::warn!(chunk = index, %error, "chunk failed");
                    let message = error.to_string();
                    chunks.push(ChunkInsight {
                        index,
                        entry_ids,
                        insight: String::new(),
                        themes: Vec::new(),
                        sentiment: Sentiment::default(),
                        status: ChunkStatus::Failed,
                        error: Some(message.clone()),
                    });
                    last_error = Some(message);
                }
            }
        }

        let ok: Vec<ChunkInsight> = chunks
            .iter()
            .filter(|c| c.status == ChunkStatus::Ok)
            .cloned()
            .collect();
        if ok.is_empty() {
            return Err(PipelineError::BackendUnavailable {
                backend: self.backend.name().to_owned(),
                message: last_error.unwrap_or_else(|| "no chunk succeeded".to_owned()),
            });
        }
        let entries_used: usize = ok.iter().map(|c| c.entry_ids.len()).sum();
        let draft = self
            .backend
            .reduce(ReduceRequest {
                chunks: &ok,
                max_words: options.max_words,
            })
            .await
            .map_err(|error| PipelineError::BackendUnavailable {
                backend: self.backend.name().to_owned(),
                message: error.to_string(),
            })?;
        usage += draft.usage;

        Ok(FeedbackSummary {
            // The backend was asked for max_words; enforce it here too, whatever it returned.
            summary: text::truncate_words(&draft.summary, options.max_words),
            themes: draft.themes,
            // Counts add up exactly; no backend is asked for arithmetic.
            sentiment: text::merge_sentiments(ok.iter().map(|c| &c.sentiment)),
            degraded: ok.len() < chunks.len(),
            chunks,
            entries_used: entries_used as u32,
            entries_skipped,
            cached: false,
            backend: self.backend.name().to_owned(),
            model: self.backend.model().to_owned(),
            usage,
        })
    }
}
