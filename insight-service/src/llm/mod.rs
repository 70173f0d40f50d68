//! The LLM backend seam. The pipeline asks a backend for two things: an insight for one chunk of
//! entries (map) and a summary of chunk insights (reduce). `local` answers offline; Gemini and
//! OpenAI-compatible backends plug in behind the same trait.

use futures::future::BoxFuture;

use crate::domain::{ChunkInsight, Entry, Sentiment, Usage};

pub mod local;

/// The map step's question: summarize this chunk.
#[derive(Clone, Copy, Debug)]
pub struct ChunkRequest<'a> {
    /// Position of the chunk in the input.
    pub index: u32,
    /// The chunk's entries, in input order (never empty).
    pub entries: &'a [Entry],
    /// Word budget of the chunk insight.
    pub max_words: usize,
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
    /// What producing it cost.
    pub usage: Usage,
}

/// The reduce step's question: combine these chunk insights.
#[derive(Clone, Copy, Debug)]
pub struct ReduceRequest<'a> {
    /// Successful chunk insights, ordered by index (never empty).
    pub chunks: &'a [ChunkInsight],
    /// Word budget of the summary.
    pub max_words: usize,
}

/// A backend's combined summary. Sentiment is not asked for: the pipeline adds up the chunks'
/// counts exactly, which no model does better.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SummaryDraft {
    /// The summary text.
    pub summary: String,
    /// Themes across the chunks, most salient first.
    pub themes: Vec<String>,
    /// What producing it cost.
    pub usage: Usage,
}

/// Why a backend call failed.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    /// The backend could not produce an answer.
    #[error("{backend} backend failed: {message}")]
    Failed {
        /// Backend name.
        backend: String,
        /// What went wrong.
        message: String,
    },
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
