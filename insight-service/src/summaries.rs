//! The one entry point for feedback summaries, shared by the RPCs and the background jobs:
//! resolves the input (inline entries, or stored ones read page by page), consults and fills
//! the insight cache, computes identical concurrent requests once, and runs the pipeline.
//! Knows no tonic.
//!
//! What is cached, and why:
//! - Whole summaries, under a key of everything that decides the answer (entry ids, ratings
//!   and text hashes, the options, backend, model, prompt version and prompt budget), for
//!   `--cache-ttl`. A hit answers with `cached = true`, zero usage, and no backend call.
//!   Degraded answers are never cached: the next request should get the real backend once it
//!   is back.
//! - Chunk insights of a remote backend, by the chunk's own content key, so a retry or an
//!   overlapping request does not redo finished chunks.
//! - Inline requests to the `local` backend are not cached at all: the offline summarizer
//!   answers them faster than a database round trip would.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, SystemTime},
};

use futures::{
    StreamExt, TryStreamExt,
    future::BoxFuture,
    stream::{self, BoxStream},
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::{sync::watch, time::Instant};

use crate::{
    admission::estimator::{self, EstimatorConfig},
    cpu::Pacer,
    domain::{ChunkInsight, ChunkStatus, Entry, FeedbackSummary, SummaryOptions, Usage},
    pipeline::{
        ChunkMemo, EntrySource, InlineEntries, Pipeline, PipelineError, SourceError,
        source::{hash_entry, hex},
        validate_entries,
    },
    store::{
        CacheTable, FeedbackFilter, FeedbackQuery, FeedbackStore, MAX_PAGE_SIZE, Store, StoreError,
    },
};

/// Default for how long a summary waits for the cache (a connection, a lookup, a write) before
/// going on without it (`--cache-wait`): the cache only saves work, so it must not hold a
/// request for the pool's 5 s acquire timeout while the database is slow or down. Generous
/// for a healthy database.
pub const CACHE_WAIT: Duration = Duration::from_secs(1);

/// How long the cache is left alone after it failed or was too slow, so that an outage costs
/// one wait (`--cache-wait`) per this period instead of one per request.
pub const CACHE_BACKOFF: Duration = Duration::from_secs(30);

/// Whether the cache is worth trying now: closed for [`CACHE_BACKOFF`] after a failure, a
/// step cut off by `wait`, or [`CUT_SHORT_TRIP`] steps in a row cut off by their callers'
/// time (see [`Breaker::step`]).
#[derive(Debug)]
struct Breaker {
    wait: Duration,
    closed_until: Mutex<Option<Instant>>,
    /// Steps cut off by their caller's time since the last step that answered.
    cut_short: AtomicU32,
}

/// Half the time left before `deadline`: the most a call gives the cache (a cache step, the
/// re-read of stored entries before caching), which only saves work.
fn half_the_time_left(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now()) / 2
}

/// Steps in a row cut off by their callers' time (none answering in between) that close the
/// cache: a healthy database answers a cache step in milliseconds, so a step outlasting half a
/// caller's time now and then is that caller's short deadline, but several in a row, with
/// none answered, are a database that hangs.
const CUT_SHORT_TRIP: u32 = 3;

impl Default for Breaker {
    fn default() -> Self {
        Self::new(CACHE_WAIT)
    }
}

impl Breaker {
    fn new(wait: Duration) -> Self {
        Self {
            wait,
            closed_until: Mutex::new(None),
            cut_short: AtomicU32::new(0),
        }
    }

    fn usable(&self) -> bool {
        let closed = self
            .closed_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        closed.is_none_or(|until| Instant::now() >= until)
    }

    /// How long a cache step started now may take: the wait, and never more than half of the
    /// caller's time left ([`half_the_time_left`]), so that the cache, which only saves work,
    /// cannot take most of a short call's time; and whether the wait is what bounds it.
    fn limit(&self, deadline: Instant) -> (Duration, bool) {
        let half = half_the_time_left(deadline);
        if self.wait <= half {
            (self.wait, true)
        } else {
            (half, false)
        }
    }

    /// Runs one cache step (`what`: connection, read, write) until [`Breaker::limit`]: its
    /// value, or `None` when the cache is closed, or the step failed or was cut off. A
    /// failure closes the cache, and so does a step cut off by the wait. A step cut off by
    /// its caller's time leaves it open unless [`CUT_SHORT_TRIP`] such steps came in a row
    /// with none answered in between, so that a hung database closes the cache even when
    /// only callers with little time meet it, while a database that is merely slower than a
    /// short caller's half-time never does.
    async fn step<T, E: std::fmt::Display>(
        &self,
        what: &str,
        deadline: Instant,
        step: impl std::future::Future<Output = Result<T, E>>,
    ) -> Option<T> {
        if !self.usable() {
            return None;
        }
        let (limit, by_wait) = self.limit(deadline);
        match tokio::time::timeout(limit, step).await {
            Ok(Ok(value)) => {
                self.cut_short.store(0, Ordering::Relaxed);
                Some(value)
            }
            Ok(Err(error)) => {
                self.trip(what, &error);
                None
            }
            Err(elapsed) => {
                if by_wait || self.cut_short.fetch_add(1, Ordering::Relaxed) + 1 >= CUT_SHORT_TRIP {
                    self.trip(what, &elapsed);
                }
                None
            }
        }
    }

    fn trip(&self, what: &str, error: &dyn std::fmt::Display) {
        self.cut_short.store(0, Ordering::Relaxed);
        tracing::warn!(%error, "insight cache {what} failed; not using it for {CACHE_BACKOFF:?}");
        *self
            .closed_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(Instant::now() + CACHE_BACKOFF);
    }
}

/// Rows read per page when a summary reads stored feedback: big enough that paging costs
/// little, small enough that one page of 8 KiB texts stays around 4 MiB.
pub const STORED_PAGE_ROWS: u32 = 500;

/// What to summarize.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SummaryInput {
    /// Entries given inline, in the caller's order.
    Inline(Vec<Entry>),
    /// Stored entries matching a filter, newest first.
    Stored(FeedbackFilter),
}

/// A summary request, validated options applied. Serializable: a job stores it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SummaryRequest {
    /// What to summarize.
    pub input: SummaryInput,
    /// How.
    pub options: SummaryOptions,
}

/// Bytes one chunk insight holds while the reduce waits for the rest (its text, themes, ids
/// and struct), generously rounded up.
pub const CHUNK_INSIGHT_BYTES: u64 = 2 * 1024;

/// Memory a summary of stored entries needs beyond what a call of its (tiny) encoded size is
/// charged at the door: one page of rows at the largest text, and the chunk insights of up to
/// `max_entries` entries. The gRPC adapter reserves it before reading; a job reserves it with
/// the rest of [`estimate`].
pub fn stored_extra_bytes(options: &SummaryOptions) -> u64 {
    let page = u64::from(STORED_PAGE_ROWS)
        * (crate::pipeline::MAX_TEXT_BYTES as u64 + estimator::ENTRY_OVERHEAD_BYTES);
    let chunks = options.max_entries.div_ceil(options.chunk_size.max(1)) as u64;
    page + chunks * CHUNK_INSIGHT_BYTES
}

/// Upper bound of the peak memory of summarizing `request` (the admission estimator's
/// formula, from the request's own size, plus [`stored_extra_bytes`] for stored input).
pub fn estimate(request: &SummaryRequest, config: &EstimatorConfig) -> u64 {
    match &request.input {
        SummaryInput::Inline(entries) => {
            let bytes: usize = entries
                .iter()
                .map(|e| e.id.len() + e.user_id.len() + e.text.len() + e.source.len() + 16)
                .sum();
            estimator::estimate(bytes as u64, config)
        }
        SummaryInput::Stored(_) => {
            estimator::estimate(0, config).saturating_add(stored_extra_bytes(&request.options))
        }
    }
}

/// The outcome a flight leader shares with the requests that waited for it, and how much time
/// the leader had in all, which may have shaped it: a follower left with more time than that
/// does not settle for a degraded answer the leader's shorter budget may have cut short.
#[derive(Clone)]
struct Outcome {
    budget: Duration,
    result: Result<Arc<FeedbackSummary>, PipelineError>,
    /// Whether the leader finished a chunk that a caller computing again after the leader ran
    /// out of time can start from (remembered in the chunk cache, and read by such callers).
    progressed: bool,
}

/// Summaries with a cache in front and one computation per key at a time. Cheap to clone.
#[derive(Clone)]
pub struct Summaries {
    pipeline: Pipeline,
    store: Store,
    cache_ttl: Duration,
    breaker: Arc<Breaker>,
    flights: Arc<Mutex<HashMap<String, watch::Receiver<Option<Outcome>>>>>,
}

impl std::fmt::Debug for Summaries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Summaries")
            .field("pipeline", &self.pipeline)
            .field("store", &self.store)
            .field("cache_ttl", &self.cache_ttl)
            .finish_non_exhaustive()
    }
}

impl Summaries {
    /// Summaries through `pipeline`, reading stored entries and caching in `store`, cached
    /// answers kept for `cache_ttl` (zero turns the cache off).
    pub fn new(pipeline: Pipeline, store: Store, cache_ttl: Duration) -> Self {
        Self {
            pipeline,
            store,
            cache_ttl,
            breaker: Arc::new(Breaker::default()),
            flights: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The same summaries waiting at most `wait` for each cache step (default [`CACHE_WAIT`]).
    pub fn with_cache_wait(mut self, wait: Duration) -> Self {
        self.breaker = Arc::new(Breaker::new(wait));
        self
    }

    /// The store behind stored input and the cache.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The pipeline summaries run through.
    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    /// Checks a request before any work: inline entries by the foundation rules, a stored
    /// selection's ranges. Field paths are those of the RPC (`entries[3].text`,
    /// `selector.min_rating`).
    pub fn validate(&self, request: &SummaryRequest) -> Result<(), PipelineError> {
        match &request.input {
            SummaryInput::Inline(entries) => validate_entries(entries),
            SummaryInput::Stored(filter) => stored_query(filter, 1).map(|_| ()),
        }
    }

    /// Summarizes `request` (see the module documentation for the cache). `on_chunk` sees
    /// each chunk insight as it is done, or, for an answer from the cache or from an
    /// identical request computed meanwhile, every chunk insight at once. `memo`, when given,
    /// replaces the chunk cache (a job's checkpoints).
    pub async fn summarize(
        &self,
        request: SummaryRequest,
        deadline: Instant,
        memo: Option<Arc<dyn ChunkMemo>>,
        mut on_chunk: impl FnMut(&ChunkInsight) + Send,
    ) -> Result<FeedbackSummary, PipelineError> {
        self.validate(&request)?;
        let options = request.options;
        // Worth a key (cache and one computation per key): anything but an inline request
        // to the offline backend, which answers faster than the key is computed.
        let keyed = !self.cache_ttl.is_zero();
        let (source, store, keyed): (Box<dyn EntrySource>, Option<Arc<dyn FeedbackStore>>, bool) =
            match request.input {
                SummaryInput::Inline(entries) => {
                    let keyed = keyed && !self.pipeline.is_local();
                    // The cache is an optimisation: with the database slow or down an inline
                    // summary still runs (and identical ones still run once), uncached.
                    let store = if keyed {
                        self.breaker
                            .step("connection", deadline, self.store.get())
                            .await
                    } else {
                        None
                    };
                    (Box::new(InlineEntries(Arc::new(entries))), store, keyed)
                }
                SummaryInput::Stored(filter) => {
                    let store = self.store.get().await.map_err(source_error)?;
                    let source = StoredEntries {
                        store: store.clone(),
                        filter,
                    };
                    (Box::new(source), keyed.then_some(store), keyed)
                }
            };
        let available = source.available().await.map_err(PipelineError::Source)?;
        if available == 0 {
            return Err(PipelineError::invalid(
                "selector",
                "no stored feedback entry matches the selector",
            ));
        }
        if !keyed {
            return self
                .pipeline
                .summarize_source(&*source, memo.as_deref(), options, deadline, on_chunk)
                .await;
        }

        let key = self.summary_key(&*source, options).await?;
        if let Some(store) = &store
            && !options.bypass_cache
            && let Some(mut summary) = self.cached(&**store, &key, deadline).await
        {
            // The key covers the summarized entries only; how many more match may have
            // changed since (new imports beyond `max_entries`).
            summary.entries_skipped =
                available.saturating_sub(summary.entries_used as usize) as u32;
            replay(&summary, &mut on_chunk);
            return Ok(summary);
        }
        // A job's own memo (its checkpoints): a job's failure is final, so it never gives up
        // on a computation before trying it itself.
        let job = memo.is_some();
        let memo = memo.or_else(|| {
            let store = store.clone()?;
            (!self.pipeline.is_local()).then(|| {
                Arc::new(CacheMemo {
                    store,
                    breaker: self.breaker.clone(),
                    ttl: self.cache_ttl,
                    read: !options.bypass_cache,
                    deadline,
                }) as Arc<dyn ChunkMemo>
            })
        });
        // Callers share one computation only when each would accept the other's outcome. The
        // cache key leaves out `disable_fallback` (only non-degraded answers are cached), but a
        // degraded fallback answer is not what a caller that disabled fallback asked for, nor
        // is UNAVAILABLE what a caller that allowed fallback would have got.
        // Nor is an answer built from cached chunk insights what a caller that bypassed the
        // cache asked for.
        let flight_key = format!(
            "{key}/fallback:{}/bypass:{}",
            !options.disable_fallback, options.bypass_cache
        );
        loop {
            match self.join(&flight_key, deadline) {
                Flight::Follow(mut outcome) => {
                    let waited =
                        tokio::time::timeout_at(deadline, outcome.wait_for(Option::is_some))
                            .await
                            .map_err(|_| PipelineError::DeadlineExceededWaiting)?;
                    let shared = match waited {
                        Ok(shared) => shared.clone(),
                        // The leader's caller went away before it finished: lead instead.
                        Err(_closed) => continue,
                    };
                    let Some(Outcome {
                        budget,
                        result,
                        progressed,
                    }) = shared
                    else {
                        continue;
                    };
                    // A degraded answer may be what the leader's budget cut short (chunks out of
                    // time, the fallback's headroom): a caller left with more time than the
                    // leader had in all computes its own. Not one merely arriving later with
                    // the same timeout (it has less left), so a failing backend still sees one
                    // computation per flight.
                    let more_time = deadline.saturating_duration_since(Instant::now()) > budget;
                    match result {
                        Ok(summary) if !(summary.degraded && more_time) => {
                            let mut summary = FeedbackSummary::clone(&summary);
                            // This caller's answer cost no backend call.
                            summary.usage = Usage::default();
                            replay(&summary, &mut on_chunk);
                            return Ok(summary);
                        }
                        Ok(_) => continue,
                        // The leader ran out of its own time. Tried again: by a caller with
                        // more time left than the leader had in all, by one that can start
                        // from the chunks the leader finished (and cached), and by a job. One
                        // with less time and nothing to start from would run out too, after
                        // calls a failing backend can do without: it is told at once.
                        Err(
                            PipelineError::DeadlineExceeded { .. }
                            | PipelineError::DeadlineExceededWaiting,
                        ) if more_time || progressed || job => continue,
                        // Without the leader's chunk counts, which are not this caller's.
                        Err(
                            PipelineError::DeadlineExceeded { .. }
                            | PipelineError::DeadlineExceededWaiting,
                        ) => return Err(PipelineError::DeadlineExceededWaiting),
                        Err(error) => return Err(error),
                    }
                }
                Flight::Lead(flight) => {
                    // A chunk finished here is one another caller can start from only if it
                    // was remembered (a memo, so a remote backend or a job) and that caller
                    // reads what is remembered (not with `bypass_cache`).
                    // A job's memo is its own checkpoints, which nobody else reads.
                    let reusable = !job && memo.is_some() && !options.bypass_cache;
                    let progressed = &flight.progressed;
                    let reported = |chunk: &ChunkInsight| {
                        if reusable && chunk.status == ChunkStatus::Ok {
                            progressed.store(true, Ordering::Relaxed);
                        }
                        on_chunk(chunk);
                    };
                    let outcome = self
                        .pipeline
                        .summarize_source(&*source, memo.as_deref(), options, deadline, reported)
                        .await;
                    // The answer is ready and must not miss its deadline for the sake of the
                    // cache: rereading the stored entries (thousands of rows may take
                    // seconds) gets half the time left, the write a cache step's.
                    if let (Ok(summary), Some(store)) = (&outcome, &store)
                        && !summary.degraded
                        && self
                            .still_keyed_within(&*source, options, &key, deadline)
                            .await
                    {
                        self.store_summary(&**store, &key, summary, deadline).await;
                    }
                    flight.land(match &outcome {
                        Ok(summary) => Ok(Arc::new(summary.clone())),
                        Err(error) => Err(error.clone()),
                    });
                    return outcome;
                }
            }
        }
    }

    /// The cache key of a request over `source`: its entries (ids, ratings, text hashes) up
    /// to `max_entries`, the options that shape the answer, the backend, model, prompt
    /// version and the prompt budget (which sets chunk boundaries). Not `disable_fallback`
    /// (only non-degraded answers are cached, and those are the same either way), nor how
    /// many entries match beyond `max_entries` (recomputed on a hit).
    async fn summary_key(
        &self,
        source: &dyn EntrySource,
        options: SummaryOptions,
    ) -> Result<String, PipelineError> {
        let mut hasher = Sha256::new();
        hasher.update(b"summary\0");
        hasher.update(crate::pipeline::prompts::PROMPT_VERSION.to_le_bytes());
        for part in [self.pipeline.backend_name(), self.pipeline.backend_model()] {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part.as_bytes());
        }
        // The configured prompt budget, not the one in force under memory pressure: a
        // pressured answer (smaller chunks) is an equally good answer to the same request.
        for number in [
            options.chunk_size,
            options.max_entries,
            options.max_words,
            self.pipeline.config().prompt_budget_bytes,
        ] {
            hasher.update((number as u64).to_le_bytes());
        }
        let mut entries = source.entries(options.max_entries);
        // Inline entries are all ready at once: hashing 10,000 of them (megabytes) in one poll
        // would hold the worker for milliseconds, and health checks and refusals with it.
        let mut pacer = Pacer::new();
        while let Some(entry) = entries.next().await {
            hash_entry(&mut hasher, &entry.map_err(PipelineError::Source)?);
            pacer.step().await;
        }
        Ok(hex(&hasher.finalize()))
    }

    /// [`Summaries::still_keyed`] within half the time left before `deadline`; `false` (not
    /// cached, logged) when the re-read takes longer.
    async fn still_keyed_within(
        &self,
        source: &dyn EntrySource,
        options: SummaryOptions,
        key: &str,
        deadline: Instant,
    ) -> bool {
        let within = half_the_time_left(deadline);
        let checked = self.still_keyed(source, options, key);
        match tokio::time::timeout(within, checked).await {
            Ok(same) => same,
            Err(_) => {
                tracing::info!(
                    ?within,
                    "re-reading the stored entries took too long; the summary is not cached"
                );
                false
            }
        }
    }

    /// Whether `source` still has the entries `key` was computed from. Stored entries may
    /// change while they are summarized (an import, a re-import with new text): an answer is
    /// cached only under the key of what it summarized. Inline entries cannot change.
    async fn still_keyed(
        &self,
        source: &dyn EntrySource,
        options: SummaryOptions,
        key: &str,
    ) -> bool {
        if source.is_fixed() {
            return true;
        }
        match self.summary_key(source, options).await {
            Ok(now) if now == key => true,
            Ok(_) => {
                tracing::info!("stored entries changed during the summary; not caching it");
                false
            }
            Err(_) => false,
        }
    }

    /// The cached summary under `key`, marked as such; `None` on a miss or a cache failure.
    async fn cached(
        &self,
        store: &dyn FeedbackStore,
        key: &str,
        deadline: Instant,
    ) -> Option<FeedbackSummary> {
        let text = cache_read(&self.breaker, store, CacheTable::Summary, key, deadline).await?;
        let mut summary: FeedbackSummary = serde_json::from_str(&text)
            .inspect_err(|error| tracing::warn!(%error, "unreadable cached summary ignored"))
            .ok()?;
        summary.cached = true;
        summary.usage = Usage::default();
        Some(summary)
    }

    /// Writes `summary` to the cache (see [`cache_write`]).
    async fn store_summary(
        &self,
        store: &dyn FeedbackStore,
        key: &str,
        summary: &FeedbackSummary,
        deadline: Instant,
    ) {
        match serde_json::to_string(summary) {
            Ok(text) => {
                let entry = CacheEntry {
                    table: CacheTable::Summary,
                    key,
                    value: &text,
                    ttl: self.cache_ttl,
                };
                cache_write(&self.breaker, store, entry, deadline).await;
            }
            Err(error) => tracing::warn!(%error, "cannot encode a summary for the cache"),
        }
    }

    /// Joins the computation of `key` in progress, or becomes its leader, with the caller's
    /// `deadline`.
    fn join(&self, key: &str, deadline: Instant) -> Flight {
        let mut flights = self
            .flights
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // A flight that has landed (its guard about to go) is not joined again: a caller that
        // declined its outcome would only be handed the same one.
        if let Some(outcome) = flights.get(key)
            && outcome.has_changed().is_ok()
            && outcome.borrow().is_none()
        {
            return Flight::Follow(outcome.clone());
        }
        let (sender, receiver) = watch::channel(None);
        flights.insert(key.to_owned(), receiver);
        Flight::Lead(FlightGuard {
            key: key.to_owned(),
            deadline,
            budget: deadline.saturating_duration_since(Instant::now()),
            progressed: AtomicBool::new(false),
            sender,
            flights: self.flights.clone(),
        })
    }
}

/// A request's place in the computation of its key.
enum Flight {
    /// Another request computes it: wait for its outcome.
    Follow(watch::Receiver<Option<Outcome>>),
    /// This request computes it.
    Lead(FlightGuard),
}

/// The leader's end of a flight; dropping it before it lands lets a follower lead, unless the
/// leader's deadline had passed (dropped by the deadline layer rather than by its caller): then
/// followers are told it ran out of time, as if it had landed that error, so that those with
/// less time left and nothing to start from do not start again.
struct FlightGuard {
    key: String,
    /// The leader's deadline.
    deadline: Instant,
    /// The time the leader had in all.
    budget: Duration,
    /// Whether a chunk another caller can start from was finished.
    progressed: AtomicBool,
    sender: watch::Sender<Option<Outcome>>,
    flights: Arc<Mutex<HashMap<String, watch::Receiver<Option<Outcome>>>>>,
}

impl FlightGuard {
    /// Shares the outcome with every follower.
    fn land(self, result: Result<Arc<FeedbackSummary>, PipelineError>) {
        self.share(result);
    }

    /// Hands `result` to the followers, with what they weigh it by.
    fn share(&self, result: Result<Arc<FeedbackSummary>, PipelineError>) {
        self.sender.send_replace(Some(Outcome {
            budget: self.budget,
            result,
            progressed: self.progressed.load(Ordering::Relaxed),
        }));
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        if self.sender.borrow().is_none() && Instant::now() >= self.deadline {
            self.share(Err(PipelineError::DeadlineExceededWaiting));
        }
        let mut flights = self
            .flights
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if flights
            .get(&self.key)
            .is_some_and(|receiver| receiver.same_channel(&self.sender.subscribe()))
        {
            flights.remove(&self.key);
        }
    }
}

/// Hands every chunk of a finished summary to `on_chunk`, in index order.
fn replay(summary: &FeedbackSummary, on_chunk: &mut impl FnMut(&ChunkInsight)) {
    for chunk in &summary.chunks {
        on_chunk(chunk);
    }
}

/// A store failure while reading entries.
fn source_error(error: StoreError) -> PipelineError {
    PipelineError::Source(SourceError(error.to_string()))
}

/// A validated page query over `filter`; a bad range names the `selector` field.
fn stored_query(filter: &FeedbackFilter, page_size: u32) -> Result<FeedbackQuery, PipelineError> {
    FeedbackQuery::new(page_size, "", filter.clone()).map_err(|error| match error {
        StoreError::InvalidArgument { field, reason } => {
            PipelineError::invalid(field.replacen("filter.", "selector.", 1), reason)
        }
        other => source_error(other),
    })
}

/// Stored feedback matching a filter, read page by page newest first (descending
/// (created_at, id)), so `max_entries` takes the most recent entries.
#[derive(Debug)]
pub struct StoredEntries {
    /// The store to read.
    pub store: Arc<dyn FeedbackStore>,
    /// Which entries.
    pub filter: FeedbackFilter,
}

impl EntrySource for StoredEntries {
    fn entries(&self, limit: usize) -> BoxStream<'_, Result<Entry, SourceError>> {
        let page_size = u32::try_from(limit)
            .unwrap_or(u32::MAX)
            .clamp(1, STORED_PAGE_ROWS.min(MAX_PAGE_SIZE));
        let first = match stored_query(&self.filter, page_size) {
            Ok(query) => FeedbackQuery {
                newest_first: true,
                ..query
            },
            Err(error) => {
                return Box::pin(stream::once(
                    async move { Err(SourceError(error.to_string())) },
                ));
            }
        };
        let pages = stream::try_unfold(Some(first), move |query| async move {
            let Some(query) = query else {
                return Ok(None);
            };
            let page = self
                .store
                .list_feedback(&query)
                .await
                .map_err(|error| SourceError(error.to_string()))?;
            let next = page.next.map(|after| FeedbackQuery {
                after: Some(after),
                ..query
            });
            Ok(Some((page.entries, next)))
        });
        Box::pin(
            pages
                .map_ok(|entries| stream::iter(entries.into_iter().map(Ok)))
                .try_flatten()
                .take(limit),
        )
    }

    fn available(&self) -> BoxFuture<'_, Result<usize, SourceError>> {
        Box::pin(async move {
            let query = stored_query(&self.filter, 1).map_err(|e| SourceError(e.to_string()))?;
            let count = self
                .store
                .count_feedback(&query)
                .await
                .map_err(|error| SourceError(error.to_string()))?;
            Ok(usize::try_from(count).unwrap_or(usize::MAX))
        })
    }
}

/// The chunk cache as the pipeline's memo.
struct CacheMemo {
    store: Arc<dyn FeedbackStore>,
    breaker: Arc<Breaker>,
    ttl: Duration,
    /// `false` under `bypass_cache`: fresh insights are still written.
    read: bool,
    /// The call's deadline, which no cache step outlasts.
    deadline: Instant,
}

impl ChunkMemo for CacheMemo {
    fn recall<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Option<ChunkInsight>> {
        Box::pin(async move {
            if !self.read {
                return None;
            }
            let text = cache_read(
                &self.breaker,
                &*self.store,
                CacheTable::Chunk,
                key,
                self.deadline,
            )
            .await?;
            serde_json::from_str(&text).ok()
        })
    }

    fn remember<'a>(&'a self, key: &'a str, insight: &'a ChunkInsight) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if let Ok(text) = serde_json::to_string(insight) {
                let entry = CacheEntry {
                    table: CacheTable::Chunk,
                    key,
                    value: &text,
                    ttl: self.ttl,
                };
                cache_write(&self.breaker, &*self.store, entry, self.deadline).await;
            }
        })
    }
}

/// The cached value under `key`, or `None` on a miss, when the cache is closed, or when it
/// failed or took too long ([`Breaker::step`]).
async fn cache_read(
    breaker: &Breaker,
    store: &dyn FeedbackStore,
    table: CacheTable,
    key: &str,
    deadline: Instant,
) -> Option<String> {
    let read = store.cache_get(table, key, SystemTime::now());
    breaker.step("read", deadline, read).await.flatten()
}

/// One value for the cache: `value` under `key` in `table`, kept for `ttl`.
struct CacheEntry<'a> {
    table: CacheTable,
    key: &'a str,
    value: &'a str,
    ttl: Duration,
}

/// Stores `entry` within the breaker's wait and `deadline` ([`Breaker::step`]): a write stuck
/// behind another writer's lock is abandoned (rolled back) rather than delay the reply.
/// Awaited, not spawned, so the next identical request finds what this one computed.
async fn cache_write(
    breaker: &Breaker,
    store: &dyn FeedbackStore,
    entry: CacheEntry<'_>,
    deadline: Instant,
) {
    let now = SystemTime::now();
    let write = store.cache_put(entry.table, entry.key, entry.value, now, now + entry.ttl);
    breaker.step("write", deadline, write).await;
}

/// Deletes expired cache rows every `every` until the process ends; a failed pass (database
/// down) is retried at the next tick.
pub async fn prune_cache(store: Store, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Ok(store) = store.get().await else {
            continue;
        };
        match store.prune_cache(SystemTime::now()).await {
            Ok(0) => {}
            Ok(pruned) => tracing::info!(pruned, "expired insight cache rows deleted"),
            Err(error) => tracing::warn!(%error, "cannot prune the insight cache"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_failed_cache_is_left_alone_for_the_backoff_then_tried_again() {
        let breaker = Breaker::default();
        assert!(breaker.usable());
        breaker.trip("read", &"connection refused");
        assert!(!breaker.usable());
        tokio::time::advance(CACHE_BACKOFF - Duration::from_millis(1)).await;
        assert!(!breaker.usable());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(breaker.usable());
    }

    #[tokio::test(start_paused = true)]
    async fn a_cache_step_ends_at_the_wait_or_half_the_time_left_and_a_hung_database_closes_it() {
        let slow = |by: u64| async move {
            tokio::time::sleep(Duration::from_millis(by)).await;
            Ok::<_, std::io::Error>(by)
        };
        let far = Instant::now() + Duration::from_secs(60);
        let breaker = Breaker::new(Duration::from_secs(3));
        // Within the configured wait (longer than the default second): answered.
        assert_eq!(breaker.step("read", far, slow(2_500)).await, Some(2_500));
        assert!(breaker.usable());

        // A caller with 400 ms left: the step is cut at half of it, and the cache stays open
        // (200 ms says nothing about the database).
        let start = Instant::now();
        let soon = start + Duration::from_millis(400);
        assert_eq!(breaker.step("read", soon, slow(2_500)).await, None);
        assert_eq!(start.elapsed(), Duration::from_millis(200));
        assert!(breaker.usable());
        // A step that answers in between starts the count again.
        assert_eq!(breaker.step("read", far, slow(10)).await, Some(10));

        // Callers with 4 s left meet a hung database: each is cut at 2 s, half its time,
        // before the 3 s wait; the third in a row with none answered closes the cache.
        for closes in [false, false, true] {
            let start = Instant::now();
            let later = start + Duration::from_secs(4);
            assert_eq!(breaker.step("connection", later, slow(60_000)).await, None);
            assert_eq!(start.elapsed(), Duration::from_secs(2));
            assert_eq!(breaker.usable(), !closes);
        }
        // Closed: not even tried.
        assert_eq!(breaker.step("read", far, slow(1)).await, None);

        // Slower than the wait: cut at the wait, and closed.
        let patient = Breaker::new(Duration::from_secs(3));
        let start = Instant::now();
        assert_eq!(patient.step("write", far, slow(4_000)).await, None);
        assert_eq!(start.elapsed(), Duration::from_secs(3));
        assert!(!patient.usable());

        // A failure closes it too.
        let failing = Breaker::new(Duration::from_secs(3));
        let refused = async { Err::<(), _>(std::io::Error::other("connection refused")) };
        assert_eq!(failing.step("connection", far, refused).await, None);
        assert!(!failing.usable());
    }
}
