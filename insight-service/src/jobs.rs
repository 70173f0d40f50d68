//! Durable background summary jobs: a worker pool over the store's job queue.
//!
//! `SubmitSummaryJob` stores the request and returns at once; `--job-workers` workers per
//! process claim jobs oldest first (on PostgreSQL several processes share one queue: claims
//! skip each other's rows with `FOR UPDATE SKIP LOCKED`) and run them through the same
//! [`Summaries`] as the RPCs, with the same memory budget (a job waits for budget instead of
//! failing).
//!
//! Durability: a claimed job is leased for `--job-lease` and the lease is renewed while it
//! runs; every finished chunk is checkpointed under the lease. If the process dies (`kill
//! -9`), the lease expires and the next claimer, in this process after a restart or in
//! another replica, resumes the job: its checkpointed chunks are recalled, not recomputed.
//! Every store write carries the lease, so a worker that lost its job (cancelled, or taken
//! over after a stall) cannot overwrite it, and a job ends exactly once.
//!
//! Cancellation: `CancelJob` marks the job CANCELLED in the store and stops its run at once
//! when it runs in this process (dropping the pipeline future stops its LLM calls); a run in
//! another process stops at its next lease renewal.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use futures::{Stream, future::BoxFuture};
use monitor_service::lifecycle::Drain;
use sha2::{Digest, Sha256};
use tokio::{
    sync::{Notify, watch},
    time::Instant,
};

use crate::{
    admission::{MemoryBudget, budget::Reservation, estimator::EstimatorConfig},
    domain::{ChunkInsight, FeedbackSummary},
    pipeline::{ChunkMemo, PipelineError, source::hex},
    store::{JobOutcome, JobRecord, JobState, Lease, Store, StoreError},
    summaries::{Summaries, SummaryInput, SummaryRequest},
};

/// Claims after which a job is failed instead of run again: a job that took its worker down
/// again and again (OOM kill, crash) would otherwise take every replica down in turn. A
/// graceful shutdown that gives the job back also counts as an attempt (the store keeps
/// attempts growing so a stale lease can never match again), hence the margin.
pub const MAX_ATTEMPTS: u32 = 10;

/// How the job workers run (from the server's flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobsConfig {
    /// Workers in this process (`--job-workers`); 0 = this process only accepts jobs.
    pub workers: usize,
    /// How long a claim holds a job without renewal (`--job-lease`): a dead worker's job is
    /// taken over this long after its last renewal.
    pub lease: Duration,
    /// How often an idle worker looks for jobs submitted to another replica, and how often a
    /// watcher re-reads a job (`--job-poll`).
    pub poll: Duration,
    /// Longest a job may run (`--job-timeout`).
    pub timeout: Duration,
    /// Finished jobs are deleted this long after they ended (`--job-retention`).
    pub retention: Duration,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            workers: 2,
            lease: Duration::from_secs(30),
            poll: Duration::from_millis(500),
            timeout: Duration::from_secs(60 * 60),
            retention: Duration::from_secs(7 * 24 * 60 * 60),
        }
    }
}

/// Why a job request failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// A malformed request (→ INVALID_ARGUMENT naming `field`).
    #[error(transparent)]
    Invalid(PipelineError),
    /// No job with this id (→ NOT_FOUND).
    #[error("no job with id {0:?}")]
    NotFound(String),
    /// The store failed (→ UNAVAILABLE).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A job as the RPCs show it.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    /// Its id.
    pub id: String,
    /// Where it is.
    pub state: JobState,
    /// Chunks finished so far.
    pub chunks_done: u32,
    /// Chunks in all; 0 until known.
    pub chunks_total: u32,
    /// The summary of a SUCCEEDED job.
    pub result: Option<FeedbackSummary>,
    /// Why it FAILED or was CANCELLED.
    pub error: Option<String>,
    /// When it was submitted.
    pub created_at: SystemTime,
    /// When its state or progress last changed.
    pub updated_at: SystemTime,
}

impl Job {
    fn from_record(record: JobRecord) -> Self {
        let result = record
            .result
            .as_deref()
            .and_then(|text| serde_json::from_str(text).ok());
        Self {
            id: record.id,
            state: record.state,
            chunks_done: record.chunks_done,
            chunks_total: record.chunks_total,
            result,
            error: record.error,
            created_at: record.created_at,
            updated_at: record.updated_at,
        }
    }
}

/// The job service: submit, read, watch, cancel, and the workers. Cheap to clone.
#[derive(Clone)]
pub struct Jobs {
    summaries: Summaries,
    budget: Option<(Arc<MemoryBudget>, EstimatorConfig)>,
    config: JobsConfig,
    /// `host:pid:start`, so an operator can tell whose lease a job is under.
    owner: Arc<str>,
    /// Wakes idle workers when a job is submitted here.
    submitted: Arc<Notify>,
    /// Bumped on every change this process makes to a job, so watchers re-read at once.
    changes: Arc<watch::Sender<u64>>,
    /// Stop switches of the jobs running in this process.
    running: Arc<Mutex<HashMap<String, watch::Sender<Stop>>>>,
}

impl std::fmt::Debug for Jobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jobs")
            .field("config", &self.config)
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

/// Why a running job must stop before it ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// Keep going.
    No,
    /// CancelJob, or the lease was lost: write nothing more.
    Abandon,
    /// The server is shutting down: give the job back to the queue.
    Release,
}

impl Jobs {
    /// Jobs run through `summaries`, charging `budget` (if any) with the estimate of each job
    /// before it runs.
    pub fn new(
        summaries: Summaries,
        budget: Option<(Arc<MemoryBudget>, EstimatorConfig)>,
        config: JobsConfig,
    ) -> Self {
        static STARTS: AtomicU64 = AtomicU64::new(0);
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "localhost".to_owned());
        let owner = format!(
            "{host}:{}:{}",
            std::process::id(),
            STARTS.fetch_add(1, Ordering::Relaxed)
        );
        Self {
            summaries,
            budget,
            config,
            owner: owner.into(),
            submitted: Arc::new(Notify::new()),
            changes: Arc::new(watch::channel(0).0),
            running: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn store(&self) -> &Store {
        self.summaries.store()
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Checks and stores `request` as a QUEUED job; returns it at once.
    pub async fn submit(&self, request: SummaryRequest) -> Result<Job, JobError> {
        self.summaries
            .validate(&request)
            .map_err(JobError::Invalid)?;
        let text = serde_json::to_string(&request)
            .map_err(|error| StoreError::Corrupt(format!("cannot encode a job: {error}")))?;
        let store = self.store().get().await?;
        let record = store
            .submit_job(&new_job_id(&self.owner), &text, SystemTime::now())
            .await?;
        self.submitted.notify_one();
        self.changed();
        Ok(Job::from_record(record))
    }

    /// The job `id`.
    pub async fn get(&self, id: &str) -> Result<Job, JobError> {
        let store = self.store().get().await?;
        store
            .get_job(id)
            .await?
            .map(Job::from_record)
            .ok_or_else(|| JobError::NotFound(id.to_owned()))
    }

    /// Cancels job `id` (a finished job is returned unchanged) and, if it runs here, stops it
    /// now.
    pub async fn cancel(&self, id: &str) -> Result<Job, JobError> {
        let store = self.store().get().await?;
        let record = store
            .cancel_job(id, SystemTime::now())
            .await?
            .ok_or_else(|| JobError::NotFound(id.to_owned()))?;
        if let Some(stop) = self.lock_running().get(id) {
            stop.send_replace(Stop::Abandon);
        }
        self.changed();
        Ok(Job::from_record(record))
    }

    /// The job `id` now, then each time its state or progress changes, ending after a
    /// terminal state. Changes made in this process arrive at once; those made by another
    /// replica within `--job-poll`.
    pub async fn watch(
        &self,
        id: &str,
    ) -> Result<impl Stream<Item = Result<Job, JobError>> + Send + 'static, JobError> {
        let first = self.get(id).await?;
        let jobs = self.clone();
        let id = id.to_owned();
        let mut changes = self.changes.subscribe();
        Ok(async_stream(move |tx| async move {
            let mut last = (first.state, first.chunks_done, first.chunks_total);
            let mut done = first.state.is_terminal();
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            while !done {
                // Whichever comes first: a change here, or the poll for other replicas; and
                // stop at once when the client goes away (no task left polling for nobody).
                tokio::select! {
                    () = tx.closed() => return,
                    _ = tokio::time::timeout(jobs.config.poll, changes.changed()) => {}
                }
                let job = match jobs.get(&id).await {
                    Ok(job) => job,
                    Err(error) => {
                        let _ = tx.send(Err(error)).await;
                        return;
                    }
                };
                let now = (job.state, job.chunks_done, job.chunks_total);
                if now == last {
                    continue;
                }
                last = now;
                done = job.state.is_terminal();
                if tx.send(Ok(job)).await.is_err() {
                    return;
                }
            }
        }))
    }

    /// Starts the workers (and the pruner of finished jobs); they stop claiming once `drain`
    /// starts, and give running jobs back to the queue.
    pub fn spawn_workers(&self, drain: Drain) {
        for worker in 0..self.config.workers {
            let jobs = self.clone();
            let drain = drain.clone();
            tokio::spawn(async move { jobs.work(worker, drain).await });
        }
        let jobs = self.clone();
        tokio::spawn(async move { jobs.prune().await });
    }

    async fn work(self, worker: usize, drain: Drain) {
        let owner = format!("{}:{worker}", self.owner);
        while !drain.is_draining() {
            let claimed = match self.store().get().await {
                Ok(store) => {
                    store
                        .claim_job(&owner, self.config.lease, SystemTime::now())
                        .await
                }
                Err(error) => Err(error),
            };
            match claimed {
                Ok(Some((record, lease))) => {
                    self.changed();
                    self.run(record, lease, &drain).await;
                }
                Ok(None) => {
                    let _ = tokio::time::timeout(self.config.poll, self.submitted.notified()).await;
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot claim jobs; retrying");
                    tokio::time::sleep(self.config.poll).await;
                }
            }
        }
    }

    /// Runs one claimed job to its end (or until it must stop), renewing the lease meanwhile.
    async fn run(&self, record: JobRecord, lease: Lease, drain: &Drain) {
        let id = record.id.clone();
        tracing::info!(job = %id, attempt = lease.attempt, "job claimed");
        let Ok(store) = self.store().get().await else {
            return;
        };
        if record.attempt > MAX_ATTEMPTS {
            let outcome = JobOutcome::Failed {
                error: format!(
                    "gave up after {MAX_ATTEMPTS} attempts: its workers kept dying before it ended"
                ),
            };
            let _ = store.finish_job(&lease, outcome, SystemTime::now()).await;
            self.changed();
            return;
        }
        let request: SummaryRequest = match serde_json::from_str(&record.request) {
            Ok(request) => request,
            Err(error) => {
                let outcome = JobOutcome::Failed {
                    error: format!("the stored request cannot be read: {error}"),
                };
                let _ = store.finish_job(&lease, outcome, SystemTime::now()).await;
                self.changed();
                return;
            }
        };
        let (stop_tx, mut stop) = watch::channel(Stop::No);
        self.lock_running().insert(id.clone(), stop_tx.clone());
        // The lease is renewed from the start, also while the job waits for memory below:
        // a wait longer than the lease must not let another worker take the job meanwhile.
        let heartbeat = self.heartbeat(lease.clone(), stop_tx.clone(), drain.clone());

        let work = async {
            // The budget first: a job waits for memory instead of failing.
            let _reservation = self.reserve(&request).await;
            // Unreadable checkpoints would make the job redo (and re-count) its chunks: give it
            // back to the queue instead, to be resumed once the store answers.
            let checkpoints = store.checkpoints(&id).await.map_err(|e| e.to_string())?;
            let resumed = checkpoints.len() as u32;
            let total = self.expected_chunks(&request).await.max(resumed);
            let memo = Arc::new(Checkpoints {
                lease: lease.clone(),
                store: self.store().clone(),
                known: checkpoints
                    .into_iter()
                    .filter_map(|(key, value)| Some((key, serde_json::from_str(&value).ok()?)))
                    .collect(),
                done: AtomicU32::new(0),
                written: tokio::sync::Mutex::new(resumed),
                total,
                stop: stop_tx.clone(),
                changes: self.changes.clone(),
            });
            if resumed > 0 {
                tracing::info!(job = %id, resumed, "resuming a job from its checkpoints");
            }
            // The checkpointed chunks count as done from the start: progress never goes back.
            let _ = store
                .set_progress(&lease, resumed, total, SystemTime::now())
                .await;
            self.changed();
            // Chunks by index, so a chunk reported twice would count once.
            let finished = Arc::new(Mutex::new(std::collections::HashSet::new()));
            let counted = (memo.clone(), finished.clone());
            let deadline = Instant::now() + self.config.timeout;
            let outcome = self
                .summaries
                .summarize(
                    request.clone(),
                    deadline,
                    Some(memo.clone()),
                    move |chunk| {
                        let (memo, finished) = &counted;
                        let mut finished = finished.lock().unwrap_or_else(PoisonError::into_inner);
                        if finished.insert(chunk.index) {
                            memo.done.store(finished.len() as u32, Ordering::Relaxed);
                        }
                    },
                )
                .await;
            let done = memo.done.load(Ordering::Relaxed).max(resumed);
            Ok::<_, String>((outcome, done, total.max(done)))
        };
        let outcome = tokio::select! {
            outcome = work => Some(outcome),
            _ = stop.wait_for(|s| *s != Stop::No) => None,
            () = heartbeat => None,
        };
        {
            // Only our own switch: after a takeover the entry may be another attempt's.
            let mut running = self.lock_running();
            if running
                .get(&id)
                .is_some_and(|switch| switch.same_channel(&stop_tx))
            {
                running.remove(&id);
            }
        }
        let now = SystemTime::now();
        let written = match outcome {
            Some(Ok((Ok(summary), done, total))) => match serde_json::to_string(&summary) {
                Ok(result) => {
                    // The final count: every chunk, also those recalled or answered from the
                    // cache (which save no checkpoint, so no progress was written for them).
                    let _ = store.set_progress(&lease, done, total, now).await;
                    store
                        .finish_job(&lease, JobOutcome::Succeeded { result }, now)
                        .await
                }
                Err(error) => {
                    let error = format!("the summary cannot be stored: {error}");
                    store
                        .finish_job(&lease, JobOutcome::Failed { error }, now)
                        .await
                }
            },
            // The store went away mid-read: not the job's fault. Back to the queue, to be
            // resumed from its checkpoints when the store answers again.
            Some(Ok((Err(PipelineError::Source(error)), ..))) => {
                tracing::warn!(job = %id, %error, "job interrupted by the store; requeued");
                store.release_job(&lease, now).await
            }
            Some(Ok((Err(error), ..))) => {
                store
                    .finish_job(
                        &lease,
                        JobOutcome::Failed {
                            error: error.to_string(),
                        },
                        now,
                    )
                    .await
            }
            Some(Err(error)) => {
                tracing::warn!(job = %id, %error, "cannot read the job's checkpoints; requeued");
                store.release_job(&lease, now).await
            }
            None if *stop.borrow() == Stop::Release => store.release_job(&lease, now).await,
            None => Ok(false),
        };
        match written {
            Ok(true) => tracing::info!(job = %id, "job ended"),
            Ok(false) => tracing::info!(job = %id, "job stopped (cancelled or taken over)"),
            // The lease will expire and the job be resumed from its checkpoints.
            Err(error) => tracing::warn!(job = %id, %error, "cannot record the job's end"),
        }
        self.changed();
    }

    /// Renews `lease` every third of the lease until the job ends; resolves when the job must
    /// stop: the lease is lost (→ Abandon) or the server drains (→ Release).
    fn heartbeat(
        &self,
        lease: Lease,
        stop: watch::Sender<Stop>,
        drain: Drain,
    ) -> BoxFuture<'static, ()> {
        let store = self.store().clone();
        let config = self.config;
        Box::pin(async move {
            let every = (config.lease / 3).max(Duration::from_millis(50));
            let tick = every.min(Duration::from_millis(250));
            let mut last_renewal = Instant::now();
            loop {
                tokio::time::sleep(tick).await;
                if drain.is_draining() {
                    stop.send_replace(Stop::Release);
                    return;
                }
                if last_renewal.elapsed() < every {
                    continue;
                }
                let renewed = match store.get().await {
                    Ok(store) => {
                        store
                            .renew_lease(&lease, config.lease, SystemTime::now())
                            .await
                    }
                    Err(error) => Err(error),
                };
                match renewed {
                    Ok(true) => last_renewal = Instant::now(),
                    Ok(false) => {
                        stop.send_replace(Stop::Abandon);
                        return;
                    }
                    // Keep running while the lease may still be ours; past it, another worker
                    // may have taken over, so stop writing.
                    Err(error) if last_renewal.elapsed() < config.lease => {
                        tracing::warn!(%error, "cannot renew a job lease; retrying");
                    }
                    Err(_) => {
                        stop.send_replace(Stop::Abandon);
                        return;
                    }
                }
            }
        })
    }

    /// Chunks the job will have: its entries (up to `max_entries`) over the chunk size. The
    /// byte budget can only split more, so progress may end above this; 0 when unknown.
    async fn expected_chunks(&self, request: &SummaryRequest) -> u32 {
        let entries = match &request.input {
            SummaryInput::Inline(entries) => entries.len(),
            SummaryInput::Stored(filter) => {
                let counted = async {
                    let store = self.store().get().await.ok()?;
                    let query = crate::store::FeedbackQuery::new(1, "", filter.clone()).ok()?;
                    store.count_feedback(&query).await.ok()
                };
                counted.await.map_or(0, |n| n as usize)
            }
        };
        let entries = entries.min(request.options.max_entries);
        u32::try_from(entries.div_ceil(request.options.chunk_size.max(1))).unwrap_or(u32::MAX)
    }

    /// Waits until the job's estimated memory fits the budget (none = no budget).
    async fn reserve(&self, request: &SummaryRequest) -> Option<Reservation> {
        let (budget, estimator) = self.budget.as_ref()?;
        let bytes = crate::summaries::estimate(request, estimator);
        loop {
            match budget.try_reserve(bytes) {
                Ok(reservation) => return Some(reservation),
                Err(refused) if refused.wanted > budget.limit() => {
                    // Can never fit: run unreserved rather than wait forever; the pipeline's
                    // own bounds still hold.
                    tracing::warn!(bytes, "a job's estimate exceeds the whole memory budget");
                    return None;
                }
                Err(refused) => tokio::time::sleep(refused.retry_after).await,
            }
        }
    }

    /// Deletes finished jobs older than the retention, hourly.
    async fn prune(self) {
        let mut ticks = tokio::time::interval(Duration::from_secs(60 * 60));
        loop {
            ticks.tick().await;
            let Ok(store) = self.store().get().await else {
                continue;
            };
            let before = SystemTime::now() - self.config.retention;
            match store.prune_jobs(before).await {
                Ok(0) => {}
                Ok(pruned) => tracing::info!(pruned, "finished jobs past retention deleted"),
                Err(error) => tracing::warn!(%error, "cannot prune finished jobs"),
            }
        }
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<Stop>>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A job's checkpoints as the pipeline's memo: chunks checkpointed by an earlier attempt are
/// recalled; each newly finished chunk is saved under the lease with the progress.
struct Checkpoints {
    lease: Lease,
    store: Store,
    known: HashMap<String, ChunkInsight>,
    done: AtomicU32,
    /// The progress last saved; held while saving, so concurrent chunks (map_parallelism > 1)
    /// save one after the other and the progress only grows.
    written: tokio::sync::Mutex<u32>,
    total: u32,
    stop: watch::Sender<Stop>,
    changes: Arc<watch::Sender<u64>>,
}

impl ChunkMemo for Checkpoints {
    fn recall<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Option<ChunkInsight>> {
        Box::pin(std::future::ready(self.known.get(key).cloned()))
    }

    fn remember<'a>(&'a self, key: &'a str, insight: &'a ChunkInsight) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let Ok(value) = serde_json::to_string(insight) else {
                return;
            };
            // This chunk is done; `on_chunk` counts it right after. Chunks finished meanwhile
            // may not be counted there yet, but were saved: both are lower bounds of the chunks
            // done, and the larger one keeps the progress growing.
            let mut written = self.written.lock().await;
            let done = (self.done.load(Ordering::Relaxed) + 1).max(*written + 1);
            let saved = match self.store.get().await {
                Ok(store) => {
                    store
                        .save_checkpoint(
                            &self.lease,
                            key,
                            &value,
                            done,
                            self.total.max(done),
                            SystemTime::now(),
                        )
                        .await
                }
                Err(error) => Err(error),
            };
            match saved {
                Ok(true) => {
                    *written = done;
                    self.changes.send_modify(|n| *n = n.wrapping_add(1));
                }
                Ok(false) => {
                    self.stop.send_replace(Stop::Abandon);
                }
                // Not fatal: the chunk is only recomputed if the job is resumed.
                Err(error) => tracing::warn!(%error, "cannot save a job checkpoint"),
            }
        })
    }
}

/// A new job id: unique across processes and restarts (hash of the owner, the time and a
/// counter), 20 hex digits.
fn new_job_id(owner: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut hasher = Sha256::new();
    hasher.update(owner.as_bytes());
    hasher.update(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
            .to_le_bytes(),
    );
    hasher.update(NEXT.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    let digest = hex(&hasher.finalize());
    format!("job-{}", &digest[..20])
}

/// A stream fed by a producer task through a small bounded channel; the task ends when the
/// stream is dropped (its next send fails).
fn async_stream<T, F, Fut>(produce: F) -> impl Stream<Item = T> + Send + 'static
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(produce(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
