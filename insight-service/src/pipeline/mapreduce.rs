//! Map then (hierarchical) reduce, with bounded parallelism, per-call deadlines, one retry per
//! chunk, and the offline fallback.

use std::{borrow::Cow, sync::Arc, time::Duration};

use futures::{
    Stream, StreamExt,
    stream::{self, BoxStream},
};
use tokio::{sync::watch, time::Instant};

use super::{
    CHUNK_INSIGHT_WORDS, PipelineError,
    chunk::chunk_ranges,
    prompts,
    source::{ChunkMemo, Chunker, EntrySource, InlineEntries, SourceError, chunk_key},
    validate_entries,
};
use crate::{
    admission::Pressure,
    cpu::Pacer,
    domain::{
        ChunkInsight, ChunkStatus, Entry, FeedbackSummary, Sentiment, SummaryOptions, UsageMeter,
    },
    llm::{
        ChunkRequest, LlmBackend, LlmError, MIN_RETRY_WINDOW, ReduceRequest, SummaryDraft,
        local::LocalBackend,
    },
    text,
};

/// What a chunk's answer may cost: its insight's words, and the prompt bytes its entries were
/// cut against.
#[derive(Clone, Copy, Debug)]
struct ChunkLimits {
    max_words: usize,
    budget: usize,
}

/// Word budget of an intermediate (non-final) reduce: partial summaries stay short so the next
/// level can read many of them in one prompt.
const PARTIAL_SUMMARY_WORDS: usize = 120;

/// Smallest prompt budget (`--prompt-budget-bytes`, and its halving under memory pressure): a
/// reduce prompt must hold at least two partial summaries (≤ 120 words each, with their themes
/// and markers) so that every level shrinks the next; below that, a large request's levels
/// stop shrinking and the depth cap ([`fit_at_cap`]) would leave each partial a few words.
pub const MIN_PROMPT_BUDGET_BYTES: usize = 4096;

/// Tuning of the pipeline, from the server's flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PipelineConfig {
    /// Map (and intermediate reduce) calls in flight at once per request (`--map-parallelism`).
    pub map_parallelism: usize,
    /// Most bytes of entries or chunk insights one prompt may carry (`--prompt-budget-bytes`).
    pub prompt_budget_bytes: usize,
    /// Most intermediate reduce levels before the final reduce (`--max-reduce-depth`).
    pub max_reduce_depth: usize,
    /// Longest any single backend call may take (`--llm-timeout`).
    pub llm_timeout: Duration,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            map_parallelism: 4,
            prompt_budget_bytes: 16 * 1024,
            max_reduce_depth: 4,
            llm_timeout: Duration::from_secs(60),
        }
    }
}

/// Runs summaries through one backend, falling back to `local`.
#[derive(Clone)]
pub struct Pipeline {
    backend: Arc<dyn LlmBackend>,
    fallback: Arc<dyn LlmBackend>,
    config: PipelineConfig,
    pressure: Option<watch::Receiver<Pressure>>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("backend", &self.backend.name())
            .field("config", &self.config)
            .finish()
    }
}

impl Pipeline {
    /// A pipeline over `backend`, with the offline `local` backend as fallback.
    pub fn new(backend: Arc<dyn LlmBackend>, config: PipelineConfig) -> Self {
        Self {
            backend,
            fallback: Arc::new(LocalBackend::new()),
            config,
            pressure: None,
        }
    }

    /// Makes work cheaper while memory pressure is elevated (see [`Pipeline::cfg`]).
    pub fn with_pressure(mut self, pressure: watch::Receiver<Pressure>) -> Self {
        self.pressure = Some(pressure);
        self
    }

    /// The tuning in force now: under elevated (or critical) memory pressure, one map call at a
    /// time and half the prompt budget (chunks smaller in bytes: what a call holds), instead of
    /// refusing work. Runs already going follow the parallelism at once ([`CallSlots`]); their
    /// chunks keep the budget they were cut with. Not fewer entries per chunk: for short
    /// entries that saves no memory, and it would double the calls and the chunk insights
    /// held, push a large reply over the message limit, and make a job resumed at another
    /// level miss its checkpoints.
    pub fn cfg(&self) -> PipelineConfig {
        let pressed = self
            .pressure
            .as_ref()
            .is_some_and(|p| *p.borrow() >= Pressure::Elevated);
        if pressed {
            PipelineConfig {
                map_parallelism: 1,
                prompt_budget_bytes: (self.config.prompt_budget_bytes / 2)
                    .max(MIN_PROMPT_BUDGET_BYTES),
                ..self.config
            }
        } else {
            self.config
        }
    }

    /// The primary backend's name.
    pub fn backend_name(&self) -> &str {
        self.backend.name()
    }

    /// The primary backend's model.
    pub fn backend_model(&self) -> &str {
        self.backend.model()
    }

    /// Whether the primary backend is the offline `local` one (no remote calls to save).
    pub fn is_local(&self) -> bool {
        self.backend.name() == self.fallback.name()
    }

    /// The pipeline's tuning.
    pub fn config(&self) -> PipelineConfig {
        self.config
    }

    /// Summarizes `entries` (see [`Pipeline::summarize_with`]) without watching chunks.
    pub async fn summarize(
        &self,
        entries: Vec<Entry>,
        options: SummaryOptions,
        deadline: Instant,
    ) -> Result<FeedbackSummary, PipelineError> {
        self.summarize_with(entries, options, deadline, |_| {})
            .await
    }

    /// Validates `entries`, keeps the first `options.max_entries`, and summarizes them (see
    /// [`Pipeline::summarize_source`]) with nothing remembered between runs.
    pub async fn summarize_with(
        &self,
        entries: Vec<Entry>,
        options: SummaryOptions,
        deadline: Instant,
        on_chunk: impl FnMut(&ChunkInsight),
    ) -> Result<FeedbackSummary, PipelineError> {
        validate_entries(&entries)?;
        let source = InlineEntries(Arc::new(entries));
        self.summarize_source(&source, None, options, deadline, on_chunk)
            .await
    }

    /// Reads the first `options.max_entries` entries of `source` as a stream, cuts them into
    /// chunks as they arrive (by count and prompt bytes), maps each chunk through the backend
    /// with at most `map_parallelism` calls in flight, and reduces the chunk insights, in
    /// levels when they exceed the prompt budget. Only the chunks in flight hold entries read
    /// from a store, so memory follows the chunk insights, not the input; inline entries,
    /// already in memory, are cut into ranges of the request instead of being copied. `memo`
    /// (if any) answers chunks it remembers from an earlier run of the primary backend and
    /// remembers the new ones.
    /// `on_chunk` sees each chunk insight as soon as it is done (completion order). Dropping
    /// the returned future stops every call in flight.
    pub async fn summarize_source(
        &self,
        source: &dyn EntrySource,
        memo: Option<&dyn ChunkMemo>,
        options: SummaryOptions,
        deadline: Instant,
        mut on_chunk: impl FnMut(&ChunkInsight),
    ) -> Result<FeedbackSummary, PipelineError> {
        let available = source.available().await.map_err(PipelineError::Source)?;
        // Chunk boundaries are fixed for the whole run (the fallback re-reads the same ones).
        let budget = self.cfg().prompt_budget_bytes;

        // Every call's cost, counted as it is spent (failed, retried and abandoned calls too).
        let usage = UsageMeter::default();
        // The offline fallback's own estimates (calls, tokens by bytes) are kept out of
        // `usage`: once another backend failed, `usage` says what that backend's calls cost,
        // not what an LLM would have charged for the local answer.
        let unbilled = UsageMeter::default();
        // Remote calls stop a little before the request deadline, so that the fallback and
        // the reply itself still fit inside it.
        // Without a fallback to use the headroom, the backend gets the whole deadline.
        let fallback_allowed = !options.disable_fallback;
        let backend_deadline = with_headroom(
            deadline,
            fallback_allowed && self.backend.name() != self.fallback.name(),
        );
        // One event per chunk (the stream's promise): until one of the primary's chunks has
        // succeeded, any of them may yet be redone by the fallback (which runs only when all
        // failed) and reported again under the same index. So a FAILED chunk is held back
        // until the first success, then reported ahead of it; if none succeeds, the fallback's
        // insights (or the call's error) take the held ones' place.
        let replaceable = fallback_allowed && self.backend.name() != self.fallback.name();
        let mut held: Vec<ChunkInsight> = Vec::new();
        let mut succeeded = false;
        let mut report = |chunk: &ChunkInsight| {
            if replaceable && !succeeded && chunk.status == ChunkStatus::Failed {
                held.push(chunk.clone());
                return;
            }
            succeeded = true;
            for failed in held.drain(..) {
                on_chunk(&failed);
            }
            on_chunk(chunk);
        };
        let Mapped {
            mut chunks,
            timed_out,
            failure,
            retry_after,
        } = self
            .map(
                &*self.backend,
                source,
                memo,
                budget,
                options,
                backend_deadline,
                &usage,
                &mut report,
            )
            .await?;
        if chunks.is_empty() {
            return Err(PipelineError::invalid(
                "entries",
                "at least one feedback entry is required",
            ));
        }
        let consumed: usize = chunks.iter().map(|c| c.entry_ids.len()).sum();
        let entries_skipped = available.saturating_sub(consumed) as u32;
        let mut backend = self.backend.clone();
        let mut backend_label = self.backend.name().to_owned();
        let mut degraded = false;

        let failed = chunks
            .iter()
            .filter(|c| c.status == ChunkStatus::Failed)
            .count();
        let no_fallback = options.disable_fallback || self.backend.name() == self.fallback.name();
        // Every chunk refused or broken by the backend (none merely out of time): the backend
        // is the cause, even if its retries used up the deadline meanwhile.
        if failed == chunks.len() && timed_out == 0 && no_fallback {
            return Err(every_chunk_failed(
                &*self.backend,
                failure.as_ref(),
                retry_after,
            ));
        }
        if Instant::now() >= deadline {
            let completed = chunks.len() - failed;
            return Err(PipelineError::DeadlineExceeded {
                completed,
                total: chunks.len(),
            });
        }
        if failed == chunks.len() {
            let error = every_chunk_failed(&*self.backend, failure.as_ref(), retry_after);
            if no_fallback {
                return Err(error);
            }
            tracing::warn!(%error, "every chunk failed; falling back to local");
            let fallen = self
                .map(
                    &*self.fallback,
                    source,
                    None,
                    budget,
                    options,
                    deadline,
                    &unbilled,
                    &mut on_chunk,
                )
                .await?;
            chunks = fallen.chunks;
            // The fallback's chunks can fail too (out of time: a store re-read that was slow);
            // a reduce over none of them would be an OK answer about zero entries.
            if chunks.iter().all(|c| c.status == ChunkStatus::Failed) {
                return Err(if Instant::now() >= deadline {
                    PipelineError::DeadlineExceeded {
                        completed: 0,
                        total: chunks.len(),
                    }
                } else {
                    every_chunk_failed(&*self.fallback, fallen.failure.as_ref(), fallen.retry_after)
                });
            }
            backend = self.fallback.clone();
            backend_label = format!(
                "{} (fallback from {})",
                self.fallback.name(),
                self.backend.name()
            );
            degraded = true;
        } else if failed > 0 {
            degraded = true;
        }

        // The successful chunks, borrowed when that is all of them (the usual case).
        let ok: Cow<'_, [ChunkInsight]> = if chunks.iter().all(|c| c.status == ChunkStatus::Ok) {
            Cow::Borrowed(&chunks)
        } else {
            Cow::Owned(
                chunks
                    .iter()
                    .filter(|c| c.status == ChunkStatus::Ok)
                    .cloned()
                    .collect(),
            )
        };
        let entries_used: usize = ok.iter().map(|c| c.entry_ids.len()).sum();
        let sentiment = text::merge_sentiments(ok.iter().map(|c| &c.sentiment));
        // A reduce that failed: cut off by the caller's deadline, the clock is the cause (as
        // for the map step above); anything else is the backend's.
        let (completed, total) = (ok.len(), chunks.len());
        let reduce_failed = |backend: &dyn LlmBackend, error: LlmError| {
            if matches!(error, LlmError::Timeout { .. }) && Instant::now() >= deadline {
                PipelineError::DeadlineExceeded { completed, total }
            } else {
                PipelineError::backend_failed(backend.name(), &error, None)
            }
        };

        let reduce_deadline = with_headroom(
            deadline,
            fallback_allowed && backend.name() != self.fallback.name(),
        );
        // After the map fell back, the reduce is the fallback's too: unbilled.
        let fell_back = backend.name() != self.backend.name();
        let draft = match self
            .reduce_levels(
                &*backend,
                Cow::Borrowed(&*ok),
                options.max_words,
                reduce_deadline,
                if fell_back { &unbilled } else { &usage },
            )
            .await
        {
            Ok(draft) => draft,
            Err(error) if options.disable_fallback || backend.name() == self.fallback.name() => {
                return Err(reduce_failed(&*backend, error));
            }
            Err(error) => {
                tracing::warn!(backend = backend.name(), %error, "reduce failed; falling back to local");
                backend_label = format!(
                    "{} (fallback from {})",
                    self.fallback.name(),
                    backend.name()
                );
                degraded = true;
                let fallback = self.fallback.clone();
                backend = fallback.clone();
                self.reduce_levels(&*fallback, ok, options.max_words, deadline, &unbilled)
                    .await
                    .map_err(|error| reduce_failed(&*fallback, error))?
            }
        };

        Ok(FeedbackSummary {
            // The backend was asked for max_words; enforce it here too, whatever it returned.
            summary: text::truncate_words(&draft.summary, options.max_words),
            themes: draft.themes,
            sentiment,
            degraded,
            chunks,
            entries_used: entries_used as u32,
            entries_skipped,
            cached: false,
            backend: backend_label,
            model: backend.model().to_owned(),
            usage: usage.total(),
        })
    }

    /// The map step over every chunk of `source`, at most `map_parallelism` at a time; results
    /// are returned ordered by index, and reported to `on_chunk` in completion order. The
    /// source is read only as fast as chunks are started.
    #[allow(clippy::too_many_arguments)]
    async fn map(
        &self,
        backend: &dyn LlmBackend,
        source: &dyn EntrySource,
        memo: Option<&dyn ChunkMemo>,
        budget: usize,
        options: SummaryOptions,
        deadline: Instant,
        usage: &UsageMeter,
        on_chunk: &mut impl FnMut(&ChunkInsight),
    ) -> Result<Mapped, PipelineError> {
        let max_words = CHUNK_INSIGHT_WORDS.min(options.max_words);
        let chunks: BoxStream<'_, Result<ChunkEntries, SourceError>> = match source.shared() {
            // Entries already in memory are cut in place (the same cuts as the `Chunker`).
            Some(all) => {
                let limit = all.len().min(options.max_entries);
                let ranges = chunk_ranges(&all[..limit], options.chunk_size, budget);
                Box::pin(stream::iter(
                    ranges
                        .into_iter()
                        .map(move |range| Ok(ChunkEntries::Shared(all.clone(), range))),
                ))
            }
            None => Box::pin(
                chunked(
                    source.entries(options.max_entries),
                    Chunker::new(options.chunk_size, budget),
                )
                .map(|chunk| chunk.map(ChunkEntries::Owned)),
            ),
        };
        let mut done: Vec<Option<ChunkInsight>> = Vec::new();
        let mut timed_out = 0;
        // The failure the status will report if every chunk fails, with its chunk's index.
        let mut reported: Option<(u32, LlmError)> = None;
        let mut retry_after = None;
        let slots = CallSlots::new(self);
        let slots = &slots;
        let results = chunks
            .enumerate()
            .map(|(index, chunk)| async move {
                let chunk = chunk.map_err(PipelineError::Source)?;
                let _slot = slots.acquire().await;
                Ok::<_, PipelineError>(
                    self.map_chunk(
                        backend,
                        memo,
                        index as u32,
                        &chunk,
                        ChunkLimits { max_words, budget },
                        deadline,
                        usage,
                    )
                    .await,
                )
            })
            // As many as the configured parallelism may be started; `slots` holds them to
            // the parallelism in force as pressure changes.
            .buffer_unordered(self.config.map_parallelism.max(1));
        let mut results = std::pin::pin!(results);
        // Local chunks complete without ever waiting: thousands of them would otherwise be
        // summarized in one poll of the worker (see `crate::cpu`).
        let mut pacer = Pacer::new();
        while let Some(mapped) = results.next().await {
            pacer.step().await;
            let (insight, failure) = mapped?;
            if let Some(failure) = failure {
                timed_out += usize::from(matches!(failure, LlmError::Timeout { .. }));
                retry_after = retry_after.max(failure.retry_after());
                let index = insight.index;
                if reported
                    .as_ref()
                    .is_none_or(|(at, other)| explains_better(&failure, index, other, *at))
                {
                    reported = Some((index, failure));
                }
            }
            on_chunk(&insight);
            let index = insight.index as usize;
            if done.len() <= index {
                done.resize(index + 1, None);
            }
            done[index] = Some(insight);
        }
        Ok(Mapped {
            chunks: done.into_iter().flatten().collect(),
            timed_out,
            failure: reported.map(|(_, failure)| failure),
            retry_after,
        })
    }

    /// One chunk: the memo's answer if it has one, else a call, retried once on failure while
    /// the deadline allows; and, when it failed, its last error.
    #[allow(clippy::too_many_arguments)]
    async fn map_chunk(
        &self,
        backend: &dyn LlmBackend,
        memo: Option<&dyn ChunkMemo>,
        index: u32,
        chunk: &[Entry],
        limits: ChunkLimits,
        deadline: Instant,
        usage: &UsageMeter,
    ) -> (ChunkInsight, Option<LlmError>) {
        let key = memo.map(|_| {
            let cut = prompts::cut_share(chunk, limits.budget);
            chunk_key(
                backend.name(),
                backend.model(),
                limits.max_words,
                cut,
                chunk,
            )
        });
        if let (Some(memo), Some(key)) = (memo, &key)
            && let Some(mut insight) = memo.recall(key).await
        {
            insight.index = index;
            return (insight, None);
        }
        let (insight, failure) = self
            .call_chunk(backend, index, chunk, limits, deadline, usage)
            .await;
        if let (Some(memo), Some(key)) = (memo, &key)
            && insight.status == ChunkStatus::Ok
        {
            memo.remember(key, &insight).await;
        }
        (insight, failure)
    }

    /// One chunk's backend call, retried once on failure while the deadline allows; and, when
    /// it failed, its last error (a timeout when it failed for want of time rather than
    /// because the backend refused or broke).
    ///
    /// Both tries share one `--llm-timeout` from the first one's start ("retries included",
    /// like the transport's own retries), and a retry after a server error or a refused
    /// connection waits a jittered [`CHUNK_RETRY_WAIT`] first: the transport has just retried
    /// those with backoff itself, and must not be followed by a back-to-back resend.
    async fn call_chunk(
        &self,
        backend: &dyn LlmBackend,
        index: u32,
        chunk: &[Entry],
        limits: ChunkLimits,
        deadline: Instant,
        usage: &UsageMeter,
    ) -> (ChunkInsight, Option<LlmError>) {
        let entry_ids: Vec<String> = chunk.iter().map(|e| e.id.clone()).collect();
        let mut last_error: Option<LlmError> = None;
        let call_deadline = deadline.min(Instant::now() + self.cfg().llm_timeout);
        for attempt in 0..2 {
            // The retry only with time to finish (see `MIN_RETRY_WINDOW`), after its wait.
            let (wait, least) = match &last_error {
                None => (Duration::ZERO, Duration::ZERO),
                Some(error) => (retry_wait(error), MIN_RETRY_WINDOW),
            };
            if Instant::now() + wait + least >= call_deadline {
                last_error.get_or_insert(deadline_error(backend, call_deadline == deadline));
                break;
            }
            // Not a zero sleep on the first try: tokio rounds a timer up to its next
            // millisecond tick, which cost every call ~1 ms of idle wait (a 15-entry local
            // summary took 1.4 ms instead of 0.2).
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            let request = ChunkRequest {
                index,
                entries: chunk,
                max_words: limits.max_words,
                // The budget the chunk was cut against (fixed for the whole run), not the one
                // in force now: pressure that rose meanwhile must not cut a chunk that fits.
                prompt_budget_bytes: limits.budget,
                deadline: call_deadline,
                usage,
            };
            // Enforced here too, so no backend can hold a request past its deadline.
            let answer = tokio::time::timeout_at(call_deadline, backend.summarize_chunk(request))
                .await
                .unwrap_or_else(|_| Err(deadline_error(backend, call_deadline == deadline)));
            match answer {
                Ok(draft) => {
                    let insight = ChunkInsight {
                        index,
                        entry_ids,
                        insight: draft.insight,
                        themes: draft.themes,
                        sentiment: draft.sentiment,
                        status: ChunkStatus::Ok,
                        error: None,
                    };
                    return (insight, None);
                }
                Err(error) => {
                    tracing::warn!(chunk = index, attempt, %error, "chunk failed");
                    let again = worth_another_try(&error);
                    last_error = Some(error);
                    if !again {
                        break;
                    }
                }
            }
        }
        let insight = ChunkInsight {
            index,
            entry_ids,
            insight: String::new(),
            themes: Vec::new(),
            sentiment: Sentiment::default(),
            status: ChunkStatus::Failed,
            error: last_error.as_ref().map(ToString::to_string),
        };
        (insight, last_error)
    }

    /// Reduces `chunks` to one summary. While their text exceeds the prompt budget, groups
    /// that fit are reduced to partial summaries first (in parallel), level by level, at most
    /// `max_reduce_depth` levels; past the cap the last level is made to fit ([`fit_at_cap`]).
    async fn reduce_levels(
        &self,
        backend: &dyn LlmBackend,
        mut level: Cow<'_, [ChunkInsight]>,
        max_words: usize,
        deadline: Instant,
        usage: &UsageMeter,
    ) -> Result<SummaryDraft, LlmError> {
        let budget = self.cfg().prompt_budget_bytes;
        let mut depth = 0;
        while level.len() > 1 && level_bytes(&level) > budget {
            if depth >= self.cfg().max_reduce_depth {
                level = Cow::Owned(fit_at_cap(level.into_owned(), budget));
                break;
            }
            let groups = group_by_budget(level.into_owned(), budget);
            let slots = CallSlots::new(self);
            let slots = &slots;
            let drafts: Vec<Result<(SummaryDraft, Sentiment, usize), LlmError>> =
                stream::iter(groups)
                    .map(|mut group| async move {
                        if group.len() == 1 {
                            // A lone insight needs no call: it goes up a level as it is.
                            let lone = group.remove(0);
                            let draft = SummaryDraft {
                                summary: lone.insight,
                                themes: lone.themes,
                            };
                            return Ok((draft, lone.sentiment, lone.entry_ids.len()));
                        }
                        let _slot = slots.acquire().await;
                        let draft = self
                            .reduce_once(backend, &group, PARTIAL_SUMMARY_WORDS, deadline, usage)
                            .await?;
                        let sentiment = text::merge_sentiments(group.iter().map(|c| &c.sentiment));
                        let entries = group.iter().map(|c| c.entry_ids.len()).sum();
                        Ok((draft, sentiment, entries))
                    })
                    .buffered(self.config.map_parallelism.max(1))
                    .collect()
                    .await;
            let mut next = Vec::with_capacity(drafts.len());
            for (index, result) in drafts.into_iter().enumerate() {
                let (draft, sentiment, _entries) = result?;
                next.push(ChunkInsight {
                    index: index as u32,
                    entry_ids: Vec::new(),
                    insight: draft.summary,
                    themes: draft.themes,
                    sentiment,
                    status: ChunkStatus::Ok,
                    error: None,
                });
            }
            level = Cow::Owned(next);
            depth += 1;
        }
        self.reduce_once(backend, &level, max_words, deadline, usage)
            .await
    }

    /// One reduce call, bounded by the request deadline and `llm_timeout`.
    async fn reduce_once(
        &self,
        backend: &dyn LlmBackend,
        chunks: &[ChunkInsight],
        max_words: usize,
        deadline: Instant,
        usage: &UsageMeter,
    ) -> Result<SummaryDraft, LlmError> {
        let call_deadline = deadline.min(Instant::now() + self.cfg().llm_timeout);
        let request = ReduceRequest {
            chunks,
            max_words,
            deadline: call_deadline,
            usage,
        };
        tokio::time::timeout_at(call_deadline, backend.reduce(request))
            .await
            .unwrap_or_else(|_| Err(deadline_error(backend, call_deadline == deadline)))
    }
}

/// `entries` cut into chunks by `chunker`, as a stream; it ends after the first error.
fn chunked<'a>(
    entries: BoxStream<'a, Result<Entry, SourceError>>,
    chunker: Chunker,
) -> impl Stream<Item = Result<Vec<Entry>, SourceError>> + 'a {
    stream::unfold(
        (entries, Some(chunker)),
        |(mut entries, mut chunker)| async move {
            loop {
                let current = chunker.as_mut()?;
                match entries.next().await {
                    Some(Ok(entry)) => {
                        if let Some(chunk) = current.push(entry) {
                            return Some((Ok(chunk), (entries, chunker)));
                        }
                    }
                    Some(Err(error)) => return Some((Err(error), (entries, None))),
                    None => {
                        let last = chunker.take().and_then(Chunker::finish)?;
                        return Some((Ok(last), (entries, None)));
                    }
                }
            }
        },
    )
}

/// One chunk's entries: read from a stream into a chunk of their own, or a range of entries
/// the source already holds in memory (inline ones), shared rather than copied.
enum ChunkEntries {
    Owned(Vec<Entry>),
    Shared(Arc<Vec<Entry>>, std::ops::Range<usize>),
}

impl std::ops::Deref for ChunkEntries {
    type Target = [Entry];

    fn deref(&self) -> &[Entry] {
        match self {
            Self::Owned(entries) => entries,
            Self::Shared(all, range) => &all[range.clone()],
        }
    }
}

/// Most time kept back from remote calls for the fallback and the reply.
const HEADROOM: Duration = Duration::from_millis(500);

/// The deadline for remote backend calls: the request's, less a fifth of what is left (at most
/// [`HEADROOM`]). A local backend gets the full deadline: it is the last resort.
fn with_headroom(deadline: Instant, remote: bool) -> Instant {
    if !remote {
        return deadline;
    }
    let left = deadline.saturating_duration_since(Instant::now());
    deadline - (left / 5).min(HEADROOM)
}

/// Whether a chunk's second try can succeed where the first failed: the model may answer
/// differently (malformed, cut off), a server or a connection may recover, a call cut off by
/// `--llm-timeout` may be quicker. Not a key, a request, a prompt or an answer size the
/// provider refused (the same again), nor a rate limit or a server error that asked for a
/// delay (`Retry-After` or RetryInfo, above zero): the transport already waited as long as the
/// provider asked or gave up because that wait crossed the deadline, and an immediate try would
/// ignore the delay.
fn worth_another_try(error: &LlmError) -> bool {
    match error {
        LlmError::Malformed { .. } | LlmError::Connect { .. } | LlmError::Timeout { .. } => true,
        LlmError::Server { retry_after, .. } => retry_after.is_none_or(|wait| wait.is_zero()),
        LlmError::Auth { .. }
        | LlmError::QuotaExhausted { .. }
        | LlmError::RateLimited { .. }
        | LlmError::BadRequest { .. }
        | LlmError::TooLarge { .. }
        | LlmError::Blocked { .. } => false,
    }
}

/// The ordinary wait before a chunk's retry after a server error or a refused connection,
/// spread by up to as much again.
pub const CHUNK_RETRY_WAIT: Duration = Duration::from_millis(250);

/// How long a chunk's retry waits after `error` (see [`Pipeline::call_chunk`]'s docs): a
/// jittered [`CHUNK_RETRY_WAIT`] after what the transport retries with backoff, nothing after
/// an answer that was malformed or late (another try may simply succeed).
fn retry_wait(error: &LlmError) -> Duration {
    match error {
        LlmError::Server { .. } | LlmError::Connect { .. } => {
            CHUNK_RETRY_WAIT.mul_f64(1.0 + crate::llm::http::jitter())
        }
        _ => Duration::ZERO,
    }
}

/// The error of a call cut off by its deadline: the request's, or `--llm-timeout`.
fn deadline_error(backend: &dyn LlmBackend, request_deadline: bool) -> LlmError {
    let message = if request_deadline {
        "the request deadline passed"
    } else {
        "the LLM call took longer than --llm-timeout"
    };
    LlmError::Timeout {
        backend: backend.name().to_owned(),
        message: message.to_owned(),
    }
}

/// Most bytes of the reduce prompt over a whole level (its user turn, as rendered by
/// [`prompts::reduce_prompt`]).
fn level_bytes(level: &[ChunkInsight]) -> usize {
    prompts::REDUCE_HEADER_BYTES + level.iter().map(prompts::reduce_chunk_bytes).sum::<usize>()
}

/// Holds a run's parallel backend calls (map calls, a level's partial reduces) to the
/// parallelism in force ([`Pipeline::cfg`]), re-read whenever a call ends or the pressure
/// level changes: a long run (thousands of chunks, a background job) started at Normal drops
/// to one call at a time when pressure rises, and goes back up when it falls, instead of
/// keeping the parallelism it started with to the end.
struct CallSlots<'a> {
    pipeline: &'a Pipeline,
    running: std::sync::atomic::AtomicUsize,
    freed: tokio::sync::Notify,
}

/// One call's place in [`CallSlots`], given back on drop.
struct CallSlot<'s, 'a>(&'s CallSlots<'a>);

impl Drop for CallSlot<'_, '_> {
    fn drop(&mut self) {
        self.0
            .running
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        self.0.freed.notify_waiters();
    }
}

impl<'a> CallSlots<'a> {
    fn new(pipeline: &'a Pipeline) -> Self {
        Self {
            pipeline,
            running: std::sync::atomic::AtomicUsize::new(0),
            freed: tokio::sync::Notify::new(),
        }
    }

    /// A place for one call, once fewer calls run than the parallelism in force.
    async fn acquire(&self) -> CallSlot<'_, 'a> {
        use std::sync::atomic::Ordering::SeqCst;
        let mut pressure = self.pipeline.pressure.clone();
        loop {
            // Registered before the check, so a slot freed in between is not missed.
            let freed = self.freed.notified();
            let mut freed = std::pin::pin!(freed);
            freed.as_mut().enable();
            let limit = self.pipeline.cfg().map_parallelism.max(1);
            let running = self.running.load(SeqCst);
            if running < limit {
                if self
                    .running
                    .compare_exchange(running, running + 1, SeqCst, SeqCst)
                    .is_ok()
                {
                    return CallSlot(self);
                }
                continue;
            }
            let level_changed = async {
                if let Some(pressure) = pressure.as_mut()
                    && pressure.changed().await.is_ok()
                {
                    return;
                }
                // No pressure signal (or its sender gone): only a freed slot matters.
                std::future::pending::<()>().await;
            };
            tokio::select! {
                () = freed => {}
                () = level_changed => {}
            }
        }
    }
}

/// What the map step produced: the chunk insights by index, and how many failed for want of
/// time rather than because the backend refused or broke.
struct Mapped {
    chunks: Vec<ChunkInsight>,
    timed_out: usize,
    /// The failure that explains best why chunks failed ([`explains_better`]), for the status
    /// if every chunk failed.
    failure: Option<LlmError>,
    /// The longest delay any failed chunk's provider asked for.
    retry_after: Option<Duration>,
}

/// Consecutive groups whose reduce prompt fits `budget` bytes, each of at least two insights
/// (two that do not fit together still go together: the level must shrink), except a last one
/// left alone, which is carried to the next level as it is rather than added to a group it
/// would push over the budget.
fn group_by_budget(level: Vec<ChunkInsight>, budget: usize) -> Vec<Vec<ChunkInsight>> {
    let mut groups: Vec<Vec<ChunkInsight>> = Vec::new();
    let mut current: Vec<ChunkInsight> = Vec::new();
    let mut bytes = prompts::REDUCE_HEADER_BYTES;
    for insight in level {
        let cost = prompts::reduce_chunk_bytes(&insight);
        if current.len() >= 2 && bytes + cost > budget {
            groups.push(std::mem::take(&mut current));
            bytes = prompts::REDUCE_HEADER_BYTES;
        }
        bytes += cost;
        current.push(insight);
    }
    if !current.is_empty() {
        groups.push(current);
    }
    groups
}

/// Whether failure `a` (of chunk `a_index`) should be reported rather than `b` (of chunk
/// `b_index`) when every chunk fails: one status names one cause, so it names the one that
/// decides what the caller should do. A refused key or an exhausted quota comes first: it
/// fails every call, and waiting is pointless while it lasts. Then what waiting may fix
/// (throttling, then a provider or connection failure), so that a caller is told to retry
/// whenever a retry may succeed: a refused request or prompt, an answer over the size cap or a broken answer is
/// usually one chunk's content, and a retry may answer (degraded) around it. A timeout comes
/// last. Between equals the later chunk wins, so the choice does not depend on which call
/// happened to end last.
fn explains_better(a: &LlmError, a_index: u32, b: &LlmError, b_index: u32) -> bool {
    fn rank(error: &LlmError) -> u8 {
        match error {
            LlmError::Auth { .. } | LlmError::QuotaExhausted { .. } => 0,
            LlmError::RateLimited { .. } => 1,
            LlmError::Server { .. } | LlmError::Connect { .. } => 2,
            LlmError::BadRequest { .. }
            | LlmError::TooLarge { .. }
            | LlmError::Blocked { .. }
            | LlmError::Malformed { .. } => 3,
            LlmError::Timeout { .. } => 4,
        }
    }
    (rank(a), std::cmp::Reverse(a_index)) < (rank(b), std::cmp::Reverse(b_index))
}

/// UNAVAILABLE naming `backend`, for which every chunk failed, with the failure that explains
/// it best and the longest delay any of them asked for.
fn every_chunk_failed(
    backend: &dyn LlmBackend,
    reported: Option<&LlmError>,
    retry_after: Option<Duration>,
) -> PipelineError {
    match reported {
        Some(error) => PipelineError::backend_failed(backend.name(), error, retry_after),
        None => PipelineError::BackendUnavailable {
            backend: backend.name().to_owned(),
            message: "no chunk succeeded".to_owned(),
            cause: None,
            retry_after,
        },
    }
}

/// Cuts `s` to at most `max` bytes, on a char boundary.
fn truncate_at_char(s: &mut String, max: usize) {
    s.truncate(s.floor_char_boundary(max));
}

/// Least insight text a block keeps past the depth cap: fewer blocks, each with something to
/// say, beat many blocks of markers around nothing.
const MIN_BLOCK_TEXT: usize = 160;

/// Least text one partial keeps inside a merged block past the depth cap.
const MIN_PART_TEXT: usize = 24;

/// Makes `level` fit one reduce prompt of `budget` bytes without another model call, once the
/// depth cap is reached. Adjacent partials are first merged into as many blocks as the budget
/// holds at [`MIN_BLOCK_TEXT`] bytes of text each (insights joined, each cut to its share;
/// themes pooled; sentiments summed, so the counts still cover every entry); then every block
/// gets an equal share of the prompt: themes at most half of what its markers leave, the
/// insight the rest. The rendered prompt fits the budget whatever the partials' sizes.
fn fit_at_cap(level: Vec<ChunkInsight>, budget: usize) -> Vec<ChunkInsight> {
    let room = budget.saturating_sub(prompts::REDUCE_HEADER_BYTES);
    let most_blocks = (room / (prompts::REDUCE_BLOCK_OVERHEAD + MIN_BLOCK_TEXT)).max(1);
    let blocks = level.len().min(most_blocks).max(1);
    let share = room / blocks;
    // Bytes of themes and insight text each block may render.
    let content = share.saturating_sub(prompts::REDUCE_BLOCK_OVERHEAD);
    // Exactly `blocks` groups (of an empty level, none), their sizes differing by one at most.
    let (base, extra) = (level.len() / blocks, level.len() % blocks);
    let mut fitted = Vec::with_capacity(blocks);
    let mut level = level.into_iter().peekable();
    while level.peek().is_some() {
        let size = base + usize::from(fitted.len() < extra);
        let group: Vec<ChunkInsight> = level.by_ref().take(size).collect();
        let mut themes: Vec<String> = Vec::new();
        let mut theme_bytes = 0;
        for theme in group.iter().flat_map(|partial| &partial.themes) {
            let cost = prompts::defanged_len(theme) + 2;
            if theme_bytes + cost > content / 2 {
                break;
            }
            if !themes.contains(theme) {
                theme_bytes += cost;
                themes.push(theme.clone());
            }
        }
        // Members' insights get equal parts of the text, less the " / " joining them; when
        // there are too many for [`MIN_PART_TEXT`] bytes each, the first ones are shown (every
        // member's sentiment still counts).
        let text_room = content - theme_bytes;
        let shown = group.len().min((text_room / MIN_PART_TEXT).max(1));
        let part = text_room / shown;
        let mut insight = String::new();
        for partial in group.iter().take(shown) {
            let joint = if insight.is_empty() { 0 } else { 3 };
            let allowed = part.saturating_sub(joint);
            let mut text = partial.insight.clone();
            // Defanging at most triples text; where it grows, cut to a third.
            let keep = if prompts::defanged_len(&text) > text.len() {
                allowed / 3
            } else {
                allowed
            };
            truncate_at_char(&mut text, keep);
            if text.is_empty() {
                continue;
            }
            if joint > 0 {
                insight.push_str(" / ");
            }
            insight.push_str(&text);
        }
        fitted.push(ChunkInsight {
            index: fitted.len() as u32,
            entry_ids: Vec::new(),
            insight,
            themes,
            sentiment: text::merge_sentiments(group.iter().map(|c| &c.sentiment)),
            status: ChunkStatus::Ok,
            error: None,
        });
    }
    fitted
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    };

    use super::*;
    use crate::{domain::Usage, llm::ChunkDraft};

    fn insight(index: u32, bytes: usize) -> ChunkInsight {
        ChunkInsight {
            index,
            entry_ids: vec![format!("e{index}")],
            insight: "y".repeat(bytes),
            themes: vec![],
            sentiment: Sentiment::default(),
            status: ChunkStatus::Ok,
            error: None,
        }
    }

    /// Asserts that `err` is DEADLINE_EXCEEDED after `completed` of `total` chunks.
    #[track_caller]
    fn assert_deadline_exceeded(err: &PipelineError, completed: usize, total: usize) {
        assert!(
            matches!(
                err,
                PipelineError::DeadlineExceeded { completed: c, total: t }
                    if *c == completed && *t == total
            ),
            "{err:?}"
        );
    }

    fn entries(n: usize) -> Vec<Entry> {
        (0..n)
            .map(|i| Entry {
                id: format!("e{i}"),
                user_id: String::new(),
                text: format!("Entry number {i} says the shuffle button repeats songs."),
                rating: Some((i % 5 + 1) as u8),
                created_at: None,
                source: String::new(),
            })
            .collect()
    }

    fn options(chunk_size: usize, max_entries: usize) -> SummaryOptions {
        SummaryOptions {
            chunk_size,
            max_entries,
            max_words: 300,
            bypass_cache: false,
            disable_fallback: false,
        }
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    /// A backend whose chunk calls sleep `delay(index)`, fail while `fails(index, attempt)`,
    /// and record concurrency and every call.
    struct Scripted {
        delay: fn(u32) -> u64,
        fails: fn(u32, usize) -> bool,
        in_flight: AtomicUsize,
        max_in_flight: AtomicUsize,
        calls: Mutex<Vec<u32>>,
        reduce_calls: AtomicUsize,
        reduce_fails: bool,
        /// Milliseconds each reduce call takes.
        reduce_delay: u64,
    }

    impl Scripted {
        fn new(delay: fn(u32) -> u64, fails: fn(u32, usize) -> bool) -> Self {
            Self {
                delay,
                fails,
                in_flight: AtomicUsize::new(0),
                max_in_flight: AtomicUsize::new(0),
                calls: Mutex::new(Vec::new()),
                reduce_calls: AtomicUsize::new(0),
                reduce_fails: false,
                reduce_delay: 0,
            }
        }
    }

    impl LlmBackend for Scripted {
        fn name(&self) -> &str {
            "scripted"
        }
        fn model(&self) -> &str {
            "m1"
        }
        fn summarize_chunk<'a>(
            &'a self,
            request: ChunkRequest<'a>,
        ) -> futures::future::BoxFuture<'a, Result<ChunkDraft, LlmError>> {
            Box::pin(async move {
                // Like a real backend: the call is counted when it is made, failing or not.
                request.usage.add(Usage {
                    llm_calls: 1,
                    ..Usage::default()
                });
                let attempt = {
                    let mut calls = self.calls.lock().unwrap();
                    calls.push(request.index);
                    calls.iter().filter(|&&i| i == request.index).count() - 1
                };
                let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                self.max_in_flight.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis((self.delay)(request.index))).await;
                self.in_flight.fetch_sub(1, Ordering::SeqCst);
                if (self.fails)(request.index, attempt) {
                    return Err(LlmError::Server {
                        backend: "scripted".into(),
                        status: 503,
                        retry_after: None,
                        message: format!("chunk {} attempt {attempt}", request.index),
                    });
                }
                Ok(ChunkDraft {
                    insight: format!("insight {}", request.index),
                    themes: vec!["shuffle".into()],
                    sentiment: text::sentiment(request.entries),
                })
            })
        }
        fn reduce<'a>(
            &'a self,
            request: ReduceRequest<'a>,
        ) -> futures::future::BoxFuture<'a, Result<SummaryDraft, LlmError>> {
            Box::pin(async move {
                request.usage.add(Usage {
                    llm_calls: 1,
                    ..Usage::default()
                });
                self.reduce_calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(self.reduce_delay)).await;
                if self.reduce_fails {
                    return Err(LlmError::Timeout {
                        backend: "scripted".into(),
                        message: "slow".into(),
                    });
                }
                Ok(SummaryDraft {
                    summary: format!("{} chunks", request.chunks.len()),
                    themes: vec!["shuffle".into()],
                })
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn map_runs_at_most_map_parallelism_calls_at_once_and_reports_completion_order() {
        // Later chunks finish first: completion order must differ from index order.
        let backend = Arc::new(Scripted::new(|i| 100 - u64::from(i) * 10, |_, _| false));
        let pipeline = Pipeline::new(
            backend.clone(),
            PipelineConfig {
                map_parallelism: 3,
                ..PipelineConfig::default()
            },
        );
        let mut seen = Vec::new();
        let summary = pipeline
            .summarize_with(entries(40), options(5, 40), far(), |c| seen.push(c.index))
            .await
            .unwrap();
        assert_eq!(backend.max_in_flight.load(Ordering::SeqCst), 3);
        assert_eq!(summary.chunks.len(), 8);
        assert_eq!(
            summary.chunks.iter().map(|c| c.index).collect::<Vec<_>>(),
            (0..8).collect::<Vec<_>>()
        );
        assert_ne!(seen, (0..8).collect::<Vec<_>>(), "completion order");
        let mut sorted = seen.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..8).collect::<Vec<_>>());
        assert_eq!(summary.usage.llm_calls, 9);
    }

    #[tokio::test]
    async fn chunks_are_prompted_against_the_budget_they_were_cut_against() {
        /// Records each map call's prompt budget; the first call raises the pressure.
        struct Budgets(Mutex<Vec<usize>>, watch::Sender<Pressure>);
        impl LlmBackend for Budgets {
            fn name(&self) -> &str {
                "budgets"
            }
            fn model(&self) -> &str {
                "m"
            }
            fn summarize_chunk<'a>(
                &'a self,
                r: ChunkRequest<'a>,
            ) -> futures::future::BoxFuture<'a, Result<ChunkDraft, LlmError>> {
                self.0.lock().unwrap().push(r.prompt_budget_bytes);
                self.1.send_replace(Pressure::Elevated);
                Box::pin(std::future::ready(Ok(ChunkDraft {
                    insight: "fine".into(),
                    themes: vec![],
                    sentiment: text::sentiment(r.entries),
                })))
            }
            fn reduce<'a>(
                &'a self,
                _: ReduceRequest<'a>,
            ) -> futures::future::BoxFuture<'a, Result<SummaryDraft, LlmError>> {
                Box::pin(std::future::ready(Ok(SummaryDraft {
                    summary: "fine".into(),
                    themes: vec![],
                })))
            }
        }
        let (tx, rx) = watch::channel(Pressure::Normal);
        let backend = Arc::new(Budgets(Mutex::new(Vec::new()), tx));
        let config = PipelineConfig {
            map_parallelism: 1,
            ..PipelineConfig::default()
        };
        let pipeline = Pipeline::new(backend.clone(), config).with_pressure(rx);
        pipeline
            .summarize(entries(20), options(5, 20), far())
            .await
            .unwrap();
        // Pressure rose during the first call: the later chunks, cut against the full budget,
        // must not be prompted (and cut) against the halved one.
        assert_eq!(*backend.0.lock().unwrap(), vec![16 * 1024; 4]);
        assert_eq!(pipeline.cfg().prompt_budget_bytes, 8 * 1024);
    }

    #[tokio::test(start_paused = true)]
    async fn a_chunk_retry_waits_after_a_server_error_and_shares_the_llm_timeout() {
        // The first try answers 503 at once; the retry comes after a jittered wait, not
        // back to back with the transport's own last retry.
        let backend = Arc::new(Scripted::new(|_| 0, |_, attempt| attempt == 0));
        let pipeline = Pipeline::new(backend.clone(), PipelineConfig::default());
        let started = Instant::now();
        let summary = pipeline
            .summarize(entries(5), options(5, 5), far())
            .await
            .unwrap();
        let took = started.elapsed();
        assert_eq!(summary.chunks[0].status, ChunkStatus::Ok);
        assert_eq!(backend.calls.lock().unwrap().len(), 2);
        assert!(
            took >= CHUNK_RETRY_WAIT && took <= 2 * CHUNK_RETRY_WAIT,
            "retried after {took:?}"
        );

        // A first try that used up --llm-timeout leaves the retry no time: the chunk's calls
        // take --llm-timeout in all, not twice that.
        let slow = Arc::new(Scripted::new(|_| 5_000, |_, _| false));
        let config = PipelineConfig {
            llm_timeout: Duration::from_secs(1),
            ..PipelineConfig::default()
        };
        let pipeline = Pipeline::new(slow.clone(), config);
        let strict = SummaryOptions {
            disable_fallback: true,
            ..options(5, 5)
        };
        let started = Instant::now();
        let error = pipeline
            .summarize(entries(5), strict, far())
            .await
            .unwrap_err();
        assert_eq!(slow.calls.lock().unwrap().len(), 1, "{error:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        assert!(error.to_string().contains("--llm-timeout"), "{error}");
    }

    #[tokio::test]
    async fn a_remembered_chunk_cut_for_one_budget_is_not_the_answer_under_another() {
        /// Remembers insights in memory.
        #[derive(Default)]
        struct Memo(Mutex<std::collections::HashMap<String, ChunkInsight>>);
        impl ChunkMemo for Memo {
            fn recall<'a>(
                &'a self,
                key: &'a str,
            ) -> futures::future::BoxFuture<'a, Option<ChunkInsight>> {
                Box::pin(std::future::ready(self.0.lock().unwrap().get(key).cloned()))
            }
            fn remember<'a>(
                &'a self,
                key: &'a str,
                insight: &'a ChunkInsight,
            ) -> futures::future::BoxFuture<'a, ()> {
                self.0
                    .lock()
                    .unwrap()
                    .insert(key.to_owned(), insight.clone());
                Box::pin(std::future::ready(()))
            }
        }
        let backend = Arc::new(Scripted::new(|_| 0, |_, _| false));
        let (tx, rx) = watch::channel(Pressure::Elevated);
        let pipeline = Pipeline::new(backend.clone(), PipelineConfig::default()).with_pressure(rx);
        let memo = Memo::default();
        // One 12 kB entry: cut to fit the halved 8 KiB budget, whole under the full 16 KiB.
        let large = InlineEntries(Arc::new(vec![Entry {
            text: "the ads interrupt every song. ".repeat(400),
            ..entries(1).remove(0)
        }]));
        let run = || pipeline.summarize_source(&large, Some(&memo), options(5, 1), far(), |_| {});
        run().await.unwrap();
        run().await.unwrap();
        assert_eq!(
            backend.calls.lock().unwrap().len(),
            1,
            "same budget: remembered"
        );
        tx.send_replace(Pressure::Normal);
        run().await.unwrap();
        assert_eq!(
            backend.calls.lock().unwrap().len(),
            2,
            "the whole entry is asked about, not the cut one remembered"
        );
    }

    /// The paused clock moves only when a task waits on a timer (auto-advance jumps to the
    /// next one), so an unmoved clock shows a summary waited on none: a zero `sleep` before
    /// each first try rounded up to tokio's next millisecond tick and cost every call ~1 ms
    /// of idle wait. The clock is first put between two ticks, where that rounding shows.
    #[tokio::test(start_paused = true)]
    async fn a_summary_that_never_fails_waits_on_no_timer() {
        let pipeline = Pipeline::new(Arc::new(LocalBackend::new()), PipelineConfig::default());
        tokio::time::advance(Duration::from_micros(500)).await;
        let start = Instant::now();
        let summary = pipeline
            .summarize(entries(15), options(5, 15), far())
            .await
            .unwrap();
        assert_eq!(summary.chunks.len(), 3);
        assert_eq!(Instant::now(), start, "no timer fired");
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_in_progress_follows_the_pressure_level_in_its_parallelism() {
        // 12 chunks of 100 ms each, 4 at a time at Normal.
        let backend = Arc::new(Scripted::new(|_| 100, |_, _| false));
        let (tx, rx) = watch::channel(Pressure::Normal);
        let pipeline = Pipeline::new(backend.clone(), PipelineConfig::default()).with_pressure(rx);
        let run = tokio::spawn({
            let pipeline = pipeline.clone();
            async move { pipeline.summarize(entries(60), options(5, 60), far()).await }
        });
        let in_flight = || backend.in_flight.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(in_flight(), 4);
        // Pressure rises mid-run: the four calls running finish, and the next ones go one at a
        // time.
        tx.send_replace(Pressure::Elevated);
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!(in_flight(), 1, "one call at a time under pressure");
        }
        // It falls again: back to four at a time.
        tx.send_replace(Pressure::Normal);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(in_flight(), 4, "the run goes back to its parallelism");
        let summary = run.await.unwrap().unwrap();
        assert_eq!(summary.entries_used, 60);
        assert!(!summary.degraded);
    }

    #[tokio::test(start_paused = true)]
    async fn elevated_pressure_makes_work_cheaper_instead_of_refusing_it() {
        let backend = Arc::new(Scripted::new(|_| 10, |_, _| false));
        let (tx, rx) = watch::channel(Pressure::Normal);
        let pipeline = Pipeline::new(backend.clone(), PipelineConfig::default()).with_pressure(rx);
        assert_eq!(pipeline.cfg().map_parallelism, 4);
        tx.send_replace(Pressure::Elevated);
        assert_eq!(pipeline.cfg().map_parallelism, 1);
        assert_eq!(pipeline.cfg().prompt_budget_bytes, 8 * 1024);
        let summary = pipeline
            .summarize(entries(20), options(5, 20), far())
            .await
            .unwrap();
        assert_eq!(summary.entries_used, 20, "the work is done, just serially");
        assert_eq!(backend.max_in_flight.load(Ordering::SeqCst), 1);
        // As many entries per chunk as asked: short entries fit the halved byte budget too.
        assert_eq!(summary.chunks.len(), 4);

        // And in smaller chunks where the byte budget decides: five 3 kB entries fit the
        // 16 KiB prompt, two fit the halved one.
        let large: Vec<Entry> = entries(20)
            .into_iter()
            .map(|entry| Entry {
                text: "the ads interrupt every song. ".repeat(100),
                ..entry
            })
            .collect();
        let chunks = |summary: &FeedbackSummary| summary.chunks.len();
        tx.send_replace(Pressure::Normal);
        let normal = pipeline
            .summarize(large.clone(), options(5, 20), far())
            .await
            .unwrap();
        tx.send_replace(Pressure::Elevated);
        let pressed = pipeline
            .summarize(large, options(5, 20), far())
            .await
            .unwrap();
        assert_eq!((chunks(&normal), chunks(&pressed)), (4, 10));
        assert_eq!(pressed.entries_used, 20);
    }

    #[tokio::test(start_paused = true)]
    async fn a_backend_that_fails_until_the_deadline_is_unavailable_and_one_too_slow_is_deadline_exceeded()
     {
        let strict = SummaryOptions {
            disable_fallback: true,
            ..options(5, 5)
        };
        // Each try fails with a 503 after 50 ms; the retry's failure lands on the deadline.
        let failing = Pipeline::new(
            Arc::new(Scripted::new(|_| 50, |_, _| true)),
            PipelineConfig::default(),
        );
        let deadline = Instant::now() + Duration::from_millis(100);
        let error = failing
            .summarize(entries(5), strict, deadline)
            .await
            .unwrap_err();
        assert!(
            matches!(&error, PipelineError::BackendUnavailable { message, .. } if message.contains("503")),
            "the backend's failure, not the clock, is the cause: {error:?}"
        );
        // A backend that never answers in time: the caller's deadline is the cause.
        let slow = Pipeline::new(
            Arc::new(Scripted::new(|_| 1_000, |_, _| false)),
            PipelineConfig::default(),
        );
        let deadline = Instant::now() + Duration::from_millis(100);
        let error = slow
            .summarize(entries(5), strict, deadline)
            .await
            .unwrap_err();
        assert_deadline_exceeded(&error, 0, 1);
    }

    /// Fails chunk `i` with the `i`-th error of its table (every chunk with the last one past
    /// its end), later chunks sooner, so the chunk that ends last is the first; counts calls.
    struct Failing(Vec<LlmError>, AtomicUsize);

    impl Failing {
        fn new(errors: Vec<LlmError>) -> Self {
            Self(errors, AtomicUsize::new(0))
        }
    }

    impl LlmBackend for Failing {
        fn name(&self) -> &str {
            "failing"
        }
        fn model(&self) -> &str {
            "m"
        }
        fn summarize_chunk<'a>(
            &'a self,
            request: ChunkRequest<'a>,
        ) -> futures::future::BoxFuture<'a, Result<ChunkDraft, LlmError>> {
            self.1.fetch_add(1, Ordering::SeqCst);
            let index = (request.index as usize).min(self.0.len() - 1);
            let sooner = (self.0.len() - index) as u64;
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(10 * sooner)).await;
                Err(self.0[index].clone())
            })
        }
        fn reduce<'a>(
            &'a self,
            _: ReduceRequest<'a>,
        ) -> futures::future::BoxFuture<'a, Result<SummaryDraft, LlmError>> {
            unreachable!("no chunk succeeds")
        }
    }

    #[tokio::test]
    async fn refusals_and_asked_delays_are_not_retried_per_chunk() {
        let backend = || "failing".to_owned();
        for (error, tries) in [
            (
                LlmError::Auth {
                    backend: backend(),
                    message: "bad key".into(),
                },
                1,
            ),
            (
                LlmError::RateLimited {
                    backend: backend(),
                    retry_after: Some(Duration::from_secs(38)),
                    message: "quota".into(),
                },
                1,
            ),
            (
                LlmError::TooLarge {
                    backend: backend(),
                    limit: 1,
                },
                1,
            ),
            (
                LlmError::Blocked {
                    backend: backend(),
                    message: "SAFETY".into(),
                },
                1,
            ),
            (
                LlmError::Server {
                    backend: backend(),
                    status: 503,
                    retry_after: Some(Duration::from_secs(30)),
                    message: "overloaded".into(),
                },
                1,
            ),
            (
                LlmError::Server {
                    backend: backend(),
                    status: 503,
                    retry_after: None,
                    message: "overloaded".into(),
                },
                2,
            ),
            (
                LlmError::Server {
                    backend: backend(),
                    status: 503,
                    retry_after: Some(Duration::ZERO),
                    message: "overloaded".into(),
                },
                2,
            ),
            (
                LlmError::Malformed {
                    backend: backend(),
                    message: "prose".into(),
                },
                2,
            ),
        ] {
            let refusing = Arc::new(Failing::new(vec![error.clone()]));
            let pipeline = Pipeline::new(refusing.clone(), PipelineConfig::default());
            let summary = pipeline
                .summarize(entries(5), options(5, 5), far())
                .await
                .unwrap();
            assert!(summary.degraded && summary.backend.starts_with("local (fallback"));
            assert_eq!(refusing.1.load(Ordering::SeqCst), tries, "{error:?}");

            // Without the fallback the caller hears the cause, and the provider's delay.
            let mut strict = options(5, 5);
            strict.disable_fallback = true;
            match pipeline.summarize(entries(5), strict, far()).await {
                Err(PipelineError::BackendUnavailable {
                    backend,
                    cause,
                    retry_after,
                    ..
                }) => {
                    assert_eq!(backend, "failing");
                    assert_eq!(cause, Some(error.cause()), "{error:?}");
                    assert_eq!(retry_after, error.retry_after(), "{error:?}");
                }
                other => panic!("{error:?}: expected BackendUnavailable, got {other:?}"),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_chunk_is_retried_once_then_reported_failed() {
        // Chunk 1 always fails; chunk 2 fails once and succeeds on its retry.
        let backend = Arc::new(Scripted::new(
            |_| 10,
            |i, attempt| i == 1 || (i == 2 && attempt == 0),
        ));
        let pipeline = Pipeline::new(backend.clone(), PipelineConfig::default());
        let summary = pipeline
            .summarize(entries(20), options(5, 20), far())
            .await
            .unwrap();
        let calls = backend.calls.lock().unwrap().clone();
        assert_eq!(calls.iter().filter(|&&i| i == 1).count(), 2, "retried once");
        assert_eq!(calls.iter().filter(|&&i| i == 2).count(), 2);
        assert_eq!(calls.iter().filter(|&&i| i == 0).count(), 1);
        assert!(summary.degraded);
        assert_eq!(summary.entries_used, 15);
        assert_eq!(summary.chunks[1].status, ChunkStatus::Failed);
        assert!(summary.chunks[1].error.as_deref().unwrap().contains("503"));
        assert_eq!(summary.chunks[2].status, ChunkStatus::Ok);
        assert_eq!(summary.backend, "scripted");
        assert_eq!(
            summary.sentiment.entries(),
            15,
            "failed chunks do not count"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn when_every_chunk_fails_local_answers_unless_fallback_is_disabled() {
        let backend = Arc::new(Scripted::new(|_| 10, |_, _| true));
        let pipeline = Pipeline::new(backend.clone(), PipelineConfig::default());
        let summary = pipeline
            .summarize(entries(10), options(5, 10), far())
            .await
            .unwrap();
        assert!(summary.degraded);
        assert_eq!(summary.backend, "local (fallback from scripted)");
        assert_eq!(summary.model, "extractive-tfidf-v1");
        assert_eq!(summary.entries_used, 10);
        assert!(summary.chunks.iter().all(|c| c.status == ChunkStatus::Ok));
        assert!(
            summary.summary.starts_with("Across 10 entries"),
            "{}",
            summary.summary
        );
        // 2 chunks x 2 failed attempts; the local chunks and reduce cost nothing.
        assert_eq!(summary.usage.llm_calls, 4);

        let mut strict = options(5, 10);
        strict.disable_fallback = true;
        let err = pipeline
            .summarize(entries(10), strict, far())
            .await
            .unwrap_err();
        match err {
            PipelineError::BackendUnavailable {
                backend,
                message,
                cause,
                retry_after,
            } => {
                assert_eq!(backend, "scripted");
                assert!(message.contains("503"), "{message}");
                assert_eq!(cause, Some("server_error"));
                assert_eq!(retry_after, None, "the 503s asked for no delay");
            }
            other => panic!("expected BackendUnavailable, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn when_every_chunk_fails_the_status_names_the_cause_that_decides_what_to_do() {
        let throttled = |secs| LlmError::RateLimited {
            backend: "failing".into(),
            retry_after: Some(Duration::from_secs(secs)),
            message: format!("quota, retry in {secs}s"),
        };
        let auth = LlmError::Auth {
            backend: "failing".into(),
            message: "bad key".into(),
        };
        let server = |retry_after| LlmError::Server {
            backend: "failing".into(),
            status: 503,
            retry_after,
            message: "overloaded".into(),
        };
        let timeout = LlmError::Timeout {
            backend: "failing".into(),
            message: "stalled".into(),
        };
        let blocked = LlmError::Blocked {
            backend: "failing".into(),
            message: "SAFETY".into(),
        };
        for (errors, cause, delay, says) in [
            // The longest delay any chunk was asked for, not the first's or the last's.
            (
                vec![throttled(7), throttled(38), throttled(12)],
                "rate_limited",
                Some(38),
                "retry in 12s",
            ),
            // A bad key decides: waiting does not help, whatever another chunk was told.
            (
                vec![throttled(38), auth.clone(), server(None)],
                "auth",
                None,
                "bad key",
            ),
            // One chunk's refused content does not: the others say to wait, and a retry may
            // answer (degraded) around it.
            (
                vec![blocked.clone(), throttled(10), server(None)],
                "rate_limited",
                Some(10),
                "retry in 10s",
            ),
            (
                vec![blocked.clone(), blocked.clone(), blocked],
                "blocked",
                None,
                "SAFETY",
            ),
            (
                vec![
                    timeout.clone(),
                    server(Some(Duration::from_secs(5))),
                    timeout,
                ],
                "server_error",
                Some(5),
                "overloaded",
            ),
        ] {
            let pipeline = Pipeline::new(Arc::new(Failing::new(errors)), PipelineConfig::default());
            let mut strict = options(5, 15);
            strict.disable_fallback = true;
            match pipeline.summarize(entries(15), strict, far()).await {
                Err(PipelineError::BackendUnavailable {
                    cause: got,
                    retry_after,
                    message,
                    ..
                }) => {
                    assert_eq!(got, Some(cause), "{message}");
                    assert_eq!(retry_after, delay.map(Duration::from_secs), "{message}");
                    // Equal causes: the later chunk's message, whichever call ended last.
                    assert!(message.contains(says), "{message}");
                }
                other => panic!("expected BackendUnavailable, got {other:?}"),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_reduce_falls_back_to_local_over_the_remote_chunk_insights() {
        let mut scripted = Scripted::new(|_| 10, |_, _| false);
        scripted.reduce_fails = true;
        let pipeline = Pipeline::new(Arc::new(scripted), PipelineConfig::default());
        let summary = pipeline
            .summarize(entries(10), options(5, 10), far())
            .await
            .unwrap();
        assert!(summary.degraded);
        assert_eq!(summary.backend, "local (fallback from scripted)");
        assert_eq!(
            summary.chunks[0].insight, "insight 0",
            "the remote chunks are kept"
        );
        // Two map calls and the failed reduce; the local reduce costs nothing.
        assert_eq!(summary.usage.llm_calls, 3);

        // Without the fallback the reduce's failure is the status's cause.
        let mut strict = options(5, 10);
        strict.disable_fallback = true;
        match pipeline.summarize(entries(10), strict, far()).await {
            Err(PipelineError::BackendUnavailable { cause, message, .. }) => {
                assert_eq!(cause, Some("timeout"), "{message}");
            }
            other => panic!("expected BackendUnavailable, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn remote_calls_stop_before_the_deadline_so_a_partial_answer_still_arrives_in_time() {
        // Chunks take 1 s each, one at a time; the deadline is 2.7 s, so remote calls stop at
        // 2.2 s (headroom 0.5 s): chunks 0 and 1 finish, 2 is cut, 3 and 4 never start.
        let backend = Arc::new(Scripted::new(|_| 1_000, |_, _| false));
        let pipeline = Pipeline::new(
            backend.clone(),
            PipelineConfig {
                map_parallelism: 1,
                ..PipelineConfig::default()
            },
        );
        let start = Instant::now();
        let deadline = start + Duration::from_millis(2_700);
        let summary = pipeline
            .summarize(entries(25), options(5, 25), deadline)
            .await
            .unwrap();
        assert!(Instant::now() <= deadline, "answered within the deadline");
        assert!(summary.degraded);
        assert_eq!(summary.entries_used, 10);
        let failed: Vec<u32> = summary
            .chunks
            .iter()
            .filter(|c| c.status == ChunkStatus::Failed)
            .map(|c| c.index)
            .collect();
        assert_eq!(failed, vec![2, 3, 4]);
        assert!(
            summary.chunks[2]
                .error
                .as_deref()
                .unwrap()
                .contains("deadline")
        );
        assert_eq!(
            backend.calls.lock().unwrap().len(),
            3,
            "3 and 4 never called"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_fallback_the_backend_gets_the_whole_deadline_then_deadline_exceeded() {
        let backend = Arc::new(Scripted::new(|_| 10_000, |_, _| false));
        let pipeline = Pipeline::new(backend.clone(), PipelineConfig::default());
        let mut strict = options(5, 10);
        strict.disable_fallback = true;
        let start = Instant::now();
        let err = pipeline
            .summarize(entries(10), strict, start + Duration::from_secs(2))
            .await
            .unwrap_err();
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(2),
            "no headroom kept back"
        );
        assert!(
            matches!(err, PipelineError::DeadlineExceeded { .. }),
            "{err:?}"
        );
    }

    /// The map done in time, the reduce cut off by the caller's deadline: without fallback
    /// the clock is the cause (DEADLINE_EXCEEDED), not the backend (UNAVAILABLE); with it, the
    /// headroom kept back lets the local reduce answer.
    #[tokio::test(start_paused = true)]
    async fn a_reduce_cut_off_by_the_deadline_is_deadline_exceeded() {
        let slow_reduce = || {
            Arc::new(Scripted {
                reduce_delay: 10_000,
                ..Scripted::new(|_| 10, |_, _| false)
            })
        };
        let backend = slow_reduce();
        let pipeline = Pipeline::new(backend.clone(), PipelineConfig::default());
        let mut strict = options(5, 10);
        strict.disable_fallback = true;
        let start = Instant::now();
        let err = pipeline
            .summarize(entries(10), strict, start + Duration::from_secs(2))
            .await
            .unwrap_err();
        assert_deadline_exceeded(&err, 2, 2);
        assert_eq!(backend.reduce_calls.load(Ordering::SeqCst), 1);
        assert_eq!(start.elapsed(), Duration::from_secs(2));

        let backend = slow_reduce();
        let pipeline = Pipeline::new(backend.clone(), PipelineConfig::default());
        let summary = pipeline
            .summarize(entries(10), options(5, 10), start + Duration::from_secs(4))
            .await
            .unwrap();
        assert!(summary.degraded);
        assert!(
            summary.backend.starts_with("local (fallback"),
            "{}",
            summary.backend
        );
        assert_eq!(summary.entries_used, 10);
    }

    /// A source whose every read after the first is slow (a store under load): the fallback's
    /// re-read outlasts the deadline.
    struct SlowRereads {
        entries: Vec<Entry>,
        reads: AtomicUsize,
    }

    impl EntrySource for SlowRereads {
        fn entries(&self, limit: usize) -> BoxStream<'_, Result<Entry, SourceError>> {
            let slow = self.reads.fetch_add(1, Ordering::SeqCst) > 0;
            Box::pin(stream::iter(self.entries.iter().take(limit).cloned()).then(
                move |entry| async move {
                    if slow {
                        tokio::time::sleep(Duration::from_secs(10)).await;
                    }
                    Ok(entry)
                },
            ))
        }

        fn available(&self) -> futures::future::BoxFuture<'_, Result<usize, SourceError>> {
            Box::pin(std::future::ready(Ok(self.entries.len())))
        }
    }

    /// Every chunk of the backend failed, and every chunk of the fallback ran out of time:
    /// DEADLINE_EXCEEDED, not an OK answer reduced from no chunk at all.
    #[tokio::test(start_paused = true)]
    async fn a_fallback_out_of_time_for_every_chunk_is_deadline_exceeded() {
        let backend = Arc::new(Scripted::new(|_| 10, |_, _| true));
        let pipeline = Pipeline::new(backend.clone(), PipelineConfig::default());
        let source = SlowRereads {
            entries: entries(10),
            reads: AtomicUsize::new(0),
        };
        let deadline = Instant::now() + Duration::from_secs(2);
        let err = pipeline
            .summarize_source(&source, None, options(5, 10), deadline, |_| {})
            .await
            .unwrap_err();
        assert_deadline_exceeded(&err, 0, 2);
        assert_eq!(
            source.reads.load(Ordering::SeqCst),
            2,
            "the fallback re-read"
        );
        assert_eq!(backend.reduce_calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_already_passed_is_deadline_exceeded() {
        let backend = Arc::new(Scripted::new(|_| 10, |_, _| false));
        let pipeline = Pipeline::new(backend.clone(), PipelineConfig::default());
        let err = pipeline
            .summarize(entries(10), options(5, 10), Instant::now())
            .await
            .unwrap_err();
        assert_deadline_exceeded(&err, 0, 2);
        assert!(backend.calls.lock().unwrap().is_empty(), "no call made");
    }

    /// A large local summary (2,000 chunks that complete without ever waiting) leaves the
    /// worker to its other tasks between slices: on a single-threaded runtime, a task that only
    /// counts its turns gets many of them while the summary runs (none without the pacing).
    #[tokio::test]
    async fn a_large_local_summary_lets_other_tasks_run() {
        let pipeline = Pipeline::new(Arc::new(LocalBackend::new()), PipelineConfig::default());
        let turns = Arc::new(AtomicUsize::new(0));
        let counter = {
            let turns = Arc::clone(&turns);
            tokio::spawn(async move {
                loop {
                    turns.fetch_add(1, Ordering::Relaxed);
                    tokio::task::yield_now().await;
                }
            })
        };
        tokio::task::yield_now().await;
        let before = turns.load(Ordering::Relaxed);
        let started = std::time::Instant::now();
        let summary = pipeline
            .summarize(entries(10_000), options(5, 10_000), far())
            .await
            .unwrap();
        let took = started.elapsed();
        let during = turns.load(Ordering::Relaxed) - before;
        counter.abort();
        assert_eq!(summary.entries_used, 10_000);
        // One turn per 0.5 ms slice at least; a quarter of that leaves room for a slow machine
        // (a slice ends only at the next step, and a step may itself take a while).
        let slices = (took.as_micros() / crate::cpu::SLICE.as_micros()) as usize;
        assert!(
            during >= (slices / 4).max(2),
            "{during} turns of the other task in {took:?} ({slices} slices)"
        );
    }

    #[tokio::test]
    async fn ten_thousand_entries_reduce_in_levels_within_the_prompt_budget() {
        let config = PipelineConfig {
            prompt_budget_bytes: 8 * 1024,
            ..PipelineConfig::default()
        };
        let pipeline = Pipeline::new(Arc::new(LocalBackend::new()), config);
        let summary = pipeline
            .summarize(entries(10_000), options(5, 10_000), far())
            .await
            .unwrap();
        assert_eq!(summary.chunks.len(), 2_000);
        assert_eq!(summary.entries_used, 10_000);
        assert!(!summary.degraded);
        assert!(
            summary.summary.starts_with("Across 10000 entries"),
            "{}",
            summary.summary
        );
        // 2,000 map calls, then levels of partial reduces, then the final one.
        assert!(
            summary.usage.llm_calls > 2_001,
            "{}",
            summary.usage.llm_calls
        );
        assert!(
            summary.usage.llm_calls < 2_200,
            "{}",
            summary.usage.llm_calls
        );
    }

    #[tokio::test(start_paused = true)]
    async fn every_reduce_prompt_fits_the_budget_below_and_at_the_depth_cap() {
        /// Sizes of a real model's answers: ~350-byte chunk insights with five themes,
        /// 120-word partial summaries with eight.
        struct Recorder(Mutex<Vec<(usize, bool, u32)>>);
        fn themes(n: usize) -> Vec<String> {
            (0..n).map(|i| format!("theme number {i}")).collect()
        }
        impl LlmBackend for Recorder {
            fn name(&self) -> &str {
                "rec"
            }
            fn model(&self) -> &str {
                "m"
            }
            fn summarize_chunk<'a>(
                &'a self,
                r: ChunkRequest<'a>,
            ) -> futures::future::BoxFuture<'a, Result<ChunkDraft, LlmError>> {
                Box::pin(async move {
                    Ok(ChunkDraft {
                        insight: "z".repeat(350),
                        themes: themes(prompts::CHUNK_THEMES),
                        sentiment: text::sentiment(r.entries),
                    })
                })
            }
            fn reduce<'a>(
                &'a self,
                r: ReduceRequest<'a>,
            ) -> futures::future::BoxFuture<'a, Result<SummaryDraft, LlmError>> {
                Box::pin(async move {
                    let rendered = prompts::reduce_prompt(r.chunks, r.max_words).user.len();
                    let texts = r.chunks.iter().all(|c| !c.insight.is_empty());
                    let entries = r.chunks.iter().map(|c| c.sentiment.entries()).sum();
                    self.0.lock().unwrap().push((rendered, texts, entries));
                    Ok(SummaryDraft {
                        summary: "word ".repeat(120),
                        themes: themes(prompts::SUMMARY_THEMES),
                    })
                })
            }
        }
        // 1,000 entries: 200 chunks; 995: 199, whose last group at the first level would be
        // a lone insight; 10,000: the largest request, several levels deep, also one
        // entry a chunk (more partials at the cap than one prompt holds markers for); 70 and
        // 400 with no levels allowed: 14 insights and 400 merged into as many blocks as one
        // prompt holds, each cut to its share.
        for (count, chunk_size, depth) in [
            (1_000, 5, 4),
            (995, 5, 4),
            (10_000, 5, 4),
            (10_000, 1, 4),
            (70, 5, 0),
            (400, 1, 0),
        ] {
            let recorder = Arc::new(Recorder(Mutex::new(Vec::new())));
            let config = PipelineConfig {
                prompt_budget_bytes: MIN_PROMPT_BUDGET_BYTES,
                max_reduce_depth: depth,
                ..PipelineConfig::default()
            };
            let pipeline = Pipeline::new(recorder.clone(), config);
            pipeline
                .summarize(entries(count), options(chunk_size, count), far())
                .await
                .unwrap();
            let case = format!("{count} entries, chunks of {chunk_size}, depth {depth}");
            // The prompts as rendered for the model, not the pipeline's own estimate.
            let sizes = recorder.0.lock().unwrap().clone();
            assert!(
                sizes.len() > usize::from(depth > 0),
                "{case}: reduced in levels"
            );
            let over: Vec<_> = sizes
                .iter()
                .filter(|&&(b, _, _)| b > MIN_PROMPT_BUDGET_BYTES)
                .collect();
            assert!(over.is_empty(), "{case}: over the budget: {over:?}");
            // Even past the depth cap, each block keeps some text, and the last prompt's
            // counts cover every entry.
            let empty: Vec<_> = sizes.iter().filter(|&&(_, texts, _)| !texts).collect();
            assert!(
                empty.is_empty(),
                "{case}: insights cut to nothing: {empty:?}"
            );
            assert_eq!(sizes.last().map(|s| s.2), Some(count as u32), "{case}");
            if depth == 0 {
                // Cut to fit, not to a fraction of the budget: every block it has room for.
                let last = sizes.last().map_or(0, |s| s.0);
                assert!(last > MIN_PROMPT_BUDGET_BYTES / 2, "{case}: {last} bytes");
            }
        }
    }

    #[test]
    fn groups_fit_the_budget_and_shrink_the_level() {
        let level: Vec<ChunkInsight> = (0..100).map(|i| insight(i, 400)).collect();
        let groups = group_by_budget(level, 4096);
        assert!(groups.len() < 100 && groups.len() > 1);
        for group in &groups {
            assert!(group.len() >= 2);
            assert!(level_bytes(group) <= 4096);
        }
        assert_eq!(groups.iter().map(Vec::len).sum::<usize>(), 100);
    }

    #[test]
    fn a_lonely_last_insight_goes_up_a_level_alone() {
        let level: Vec<ChunkInsight> = (0..3).map(|i| insight(i, 1500)).collect();
        let groups = group_by_budget(level, 4096);
        assert_eq!(groups.iter().map(Vec::len).collect::<Vec<_>>(), [2, 1]);
        assert!(level_bytes(&groups[0]) <= 4096);
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        let mut s = "héllo wörld".to_owned();
        truncate_at_char(&mut s, 2);
        assert_eq!(s, "h");
    }
}
