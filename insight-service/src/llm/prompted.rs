//! Turns a text [`Generator`] (Gemini, OpenAI-compatible) into an [`LlmBackend`]: builds the
//! fenced prompts of [`crate::pipeline::prompts`], asks for JSON, parses the answer. Sentiment
//! is computed locally from ratings and the lexicon ([`crate::text::sentiment`]): exact counts
//! are arithmetic, which is cheaper and more reliable here than asking a model.

use futures::future::BoxFuture;

use super::{
    ChunkDraft, ChunkRequest, FinishReason, GenerateRequest, Generator, LlmBackend, LlmError,
    ReduceRequest, SummaryDraft,
};
use crate::{
    cpu,
    domain::{Entry, Sentiment},
    pipeline::prompts,
    text,
};

/// An [`LlmBackend`] over a [`Generator`].
#[derive(Debug)]
pub struct PromptedBackend<G> {
    generator: G,
}

impl<G: Generator> PromptedBackend<G> {
    /// Wraps `generator`.
    pub fn new(generator: G) -> Self {
        Self { generator }
    }

    /// Why an answer that failed to parse is unusable, naming a truncation or a block.
    fn malformed(&self, finish: &FinishReason, reason: String) -> LlmError {
        let message = match finish {
            FinishReason::MaxTokens => format!("answer cut off at the output token cap ({reason})"),
            FinishReason::Safety => format!("answer blocked by a safety filter ({reason})"),
            _ => reason,
        };
        LlmError::Malformed {
            backend: self.generator.name().to_owned(),
            message,
        }
    }
}

impl<G: Generator> LlmBackend for PromptedBackend<G> {
    fn name(&self) -> &str {
        self.generator.name()
    }

    fn model(&self) -> &str {
        self.generator.model()
    }

    fn summarize_chunk<'a>(
        &'a self,
        request: ChunkRequest<'a>,
    ) -> BoxFuture<'a, Result<ChunkDraft, LlmError>> {
        Box::pin(async move {
            let prompt = prompts::map_prompt(
                request.entries,
                request.max_words,
                request.prompt_budget_bytes,
            );
            let schema = prompts::map_schema();
            let generation = self.generator.generate(GenerateRequest {
                system: &prompt.system,
                prompt: &prompt.user,
                max_output_tokens: prompt.max_output_tokens,
                response_schema: Some(&schema),
                deadline: request.deadline,
                usage: request.usage,
            });
            // The sentiment is ours to compute (a scan of the chunk's text): done while the
            // model works, and for a large chunk on an offload thread (see `crate::cpu`).
            let (generation, sentiment) = tokio::join!(generation, sentiment(request.entries));
            let generation = generation?;
            let (insight, themes) = prompts::parse_map_answer(&generation.text)
                .map_err(|reason| self.malformed(&generation.finish, reason))?;
            Ok(ChunkDraft {
                insight: text::truncate_words(&insight, request.max_words),
                themes,
                sentiment,
            })
        })
    }

    fn reduce<'a>(
        &'a self,
        request: ReduceRequest<'a>,
    ) -> BoxFuture<'a, Result<SummaryDraft, LlmError>> {
        Box::pin(async move {
            let prompt = prompts::reduce_prompt(request.chunks, request.max_words);
            let schema = prompts::reduce_schema();
            let generation = self
                .generator
                .generate(GenerateRequest {
                    system: &prompt.system,
                    prompt: &prompt.user,
                    max_output_tokens: prompt.max_output_tokens,
                    response_schema: Some(&schema),
                    deadline: request.deadline,
                    usage: request.usage,
                })
                .await?;
            let (summary, themes) = prompts::parse_reduce_answer(&generation.text)
                .map_err(|reason| self.malformed(&generation.finish, reason))?;
            Ok(SummaryDraft {
                summary: text::truncate_words(&summary, request.max_words),
                themes,
            })
        })
    }
}

/// [`text::sentiment`] of `entries`, on an offload thread when they are large.
async fn sentiment(entries: &[Entry]) -> Sentiment {
    let bytes = entries.iter().map(|entry| entry.text.len()).sum();
    cpu::run_on(entries, bytes, text::sentiment).await
}
