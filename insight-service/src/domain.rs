//! Domain types of the insight service. They know nothing of tonic or protobuf: the gRPC
//! adapter converts at the edge (`grpc::convert`).

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// One piece of user feedback.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Caller-chosen unique id.
    pub id: String,
    /// Author, may be empty.
    pub user_id: String,
    /// The feedback text (validated: non-empty, at most [`crate::pipeline::MAX_TEXT_BYTES`]).
    pub text: String,
    /// Star rating 1..=5, `None` when the entry carries no rating.
    pub rating: Option<u8>,
    /// When it was written, if known.
    pub created_at: Option<SystemTime>,
    /// Where it came from, may be empty.
    pub source: String,
}

/// Overall tone of a set of entries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SentimentLabel {
    /// Mostly positive.
    Positive,
    /// Neither clearly positive nor negative.
    #[default]
    Neutral,
    /// Mostly negative.
    Negative,
    /// Strongly positive and negative entries side by side.
    Mixed,
}

/// Sentiment of a chunk or of a whole summary.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sentiment {
    /// The overall label.
    pub label: SentimentLabel,
    /// Score in [-1, 1].
    pub score: f64,
    /// Entries judged positive.
    pub positive: u32,
    /// Entries judged neutral.
    pub neutral: u32,
    /// Entries judged negative.
    pub negative: u32,
    /// Mean star rating of the rated entries; 0 when none was rated.
    pub average_rating: f64,
    /// Entries that carried a rating.
    pub rated: u32,
}

impl Sentiment {
    /// Number of entries this sentiment was computed from.
    pub fn entries(&self) -> u32 {
        self.positive + self.neutral + self.negative
    }
}

/// Outcome of one chunk's map step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkStatus {
    /// Summarized.
    Ok,
    /// Failed; see [`ChunkInsight::error`].
    Failed,
}

/// The insight for one chunk of entries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChunkInsight {
    /// Position of the chunk in the input, from 0.
    pub index: u32,
    /// Ids of the chunk's entries, in input order.
    pub entry_ids: Vec<String>,
    /// Short summary of the chunk.
    pub insight: String,
    /// Theme keywords, most salient first.
    pub themes: Vec<String>,
    /// Sentiment of the chunk.
    pub sentiment: Sentiment,
    /// Whether the chunk succeeded.
    pub status: ChunkStatus,
    /// Why it failed; `None` when it succeeded.
    pub error: Option<String>,
}

/// What the backend calls of one answer cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Backend calls made, retries included.
    pub llm_calls: u32,
    /// Bytes of prompts sent.
    pub prompt_bytes: u64,
    /// Bytes of responses received.
    pub response_bytes: u64,
    /// Input tokens (reported, or estimated for `local`).
    pub input_tokens: u64,
    /// Output tokens (reported, or estimated for `local`).
    pub output_tokens: u64,
}

/// Saturating: token counts come from the provider's reply, which may say anything (a
/// `promptTokenCount` of u64::MAX added twice must not panic or wrap).
impl std::ops::AddAssign for Usage {
    fn add_assign(&mut self, rhs: Self) {
        self.llm_calls = self.llm_calls.saturating_add(rhs.llm_calls);
        self.prompt_bytes = self.prompt_bytes.saturating_add(rhs.prompt_bytes);
        self.response_bytes = self.response_bytes.saturating_add(rhs.response_bytes);
        self.input_tokens = self.input_tokens.saturating_add(rhs.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(rhs.output_tokens);
    }
}

/// What one answer's backend calls cost, added to as the calls happen: each attempt when it
/// is sent, each response byte as it is read, tokens when a response reports them. A value
/// returned with an answer could not count a call that failed, was retried, or was cut off by
/// the deadline; this counts them all (`Usage::llm_calls` says "retries included").
#[derive(Debug, Default)]
pub struct UsageMeter(std::sync::Mutex<Usage>);

impl UsageMeter {
    /// Adds `usage` (a poisoned lock is still a correct sum: each update is one `+=`).
    pub fn add(&self, usage: Usage) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) += usage;
    }

    /// The total so far.
    pub fn total(&self) -> Usage {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The final, reduced summary.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FeedbackSummary {
    /// Summary text, at most `max_words` words.
    pub summary: String,
    /// Themes across all chunks, most salient first.
    pub themes: Vec<String>,
    /// Sentiment across all used entries.
    pub sentiment: Sentiment,
    /// One insight per chunk, ordered by index.
    pub chunks: Vec<ChunkInsight>,
    /// Entries that contributed (failed chunks excluded).
    pub entries_used: u32,
    /// Entries beyond `max_entries`, not summarized.
    pub entries_skipped: u32,
    /// Some chunk failed or the fallback answered.
    pub degraded: bool,
    /// Served from the insight cache.
    pub cached: bool,
    /// Backend that produced the answer.
    pub backend: String,
    /// Model of that backend.
    pub model: String,
    /// Cost of the backend calls.
    pub usage: Usage,
}

/// Validated summary options, defaults applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SummaryOptions {
    /// Entries per chunk, 1..=50.
    pub chunk_size: usize,
    /// Entries summarized at most (already resolved against the server cap).
    pub max_entries: usize,
    /// Word limit of the final summary, 1..=300.
    pub max_words: usize,
    /// Skip reading the insight cache.
    pub bypass_cache: bool,
    /// Answer UNAVAILABLE rather than falling back to `local`.
    pub disable_fallback: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_from_a_provider_saying_anything_saturates() {
        let meter = UsageMeter::default();
        let absurd = Usage {
            llm_calls: 1,
            input_tokens: u64::MAX,
            output_tokens: u64::MAX - 1,
            ..Usage::default()
        };
        meter.add(absurd);
        meter.add(absurd);
        let total = meter.total();
        assert_eq!(
            (total.llm_calls, total.input_tokens, total.output_tokens),
            (2, u64::MAX, u64::MAX)
        );
    }
}
