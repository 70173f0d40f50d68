//! The durable job queue: background summary jobs, their leases, and per-chunk checkpoints.
//!
//! A job is QUEUED when submitted; a worker *claims* it, which moves it to RUNNING under a
//! [`Lease`] (an owner name, the attempt number, an expiry). Every write a worker makes
//! afterwards (progress, checkpoints, the outcome) is conditional on still holding that lease,
//! so a worker that stalled past its lease and was taken over, or whose job was cancelled,
//! cannot write anything: each job ends exactly once. A worker that dies simply stops renewing;
//! once the lease expires the next claim takes the job over (attempt + 1) and resumes it from
//! its checkpoints.
//!
//! The store keeps `request` and `result` as opaque text (JSON written by the job runner), as
//! the cache tables do; times are microseconds since the Unix epoch like everywhere in the
//! store, and every call takes `now` so tests (and a replica with a skewed clock) decide time
//! explicitly.
//!
//! The SQL is shared by both backends (both accept `$N` placeholders and `ON CONFLICT`) except
//! where they differ in kind: claiming (PostgreSQL locks with `FOR UPDATE SKIP LOCKED` so
//! replicas never wait on each other's candidate rows; SQLite has a single writer, so one
//! `UPDATE ... RETURNING` is atomic) and the bytewise `COLLATE "C"` order on PostgreSQL.
//!
//! On SQLite every transaction here starts with a write, so it holds the write lock from its
//! first statement: a deferred transaction that read first and wrote later could fail at once
//! with SQLITE_BUSY when another connection wrote in between, which `busy_timeout` cannot wait
//! out.

use std::{
    fmt,
    str::FromStr,
    time::{Duration, SystemTime},
};

use futures::future::BoxFuture;
use sqlx::{FromRow, Row};

use super::{PostgresStore, SqliteStore, StoreError, from_micros, micros};

/// The error text of a job ended by [`JobStore::cancel_job`], so a client can tell a
/// cancellation from a failure without another field.
pub const CANCELLED_ERROR: &str = "cancelled by CancelJob";

/// Where a job is in its life. Stored as the upper-case name (the proto enum's spelling), so
/// the rows read well in `psql`/`sqlite3`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobState {
    /// Submitted, waiting for a worker (or given back by one).
    Queued,
    /// Claimed by a worker that holds a lease on it.
    Running,
    /// Finished with a result.
    Succeeded,
    /// Finished with an error.
    Failed,
    /// Stopped by [`JobStore::cancel_job`].
    Cancelled,
}

impl JobState {
    /// Every state, in life order (for exhaustive tests and conversions).
    pub const ALL: [Self; 5] = [
        Self::Queued,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::Cancelled,
    ];

    /// Whether the job has ended: it never changes again (WatchJob ends here) and the pruner
    /// may delete it.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }

    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "QUEUED",
            Self::Running => "RUNNING",
            Self::Succeeded => "SUCCEEDED",
            Self::Failed => "FAILED",
            Self::Cancelled => "CANCELLED",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The stored spelling was none of [`JobState::as_str`]'s (a hand-edited or newer row).
#[derive(Debug, thiserror::Error)]
#[error("unknown job state {0:?}")]
pub struct UnknownJobState(String);

impl FromStr for JobState {
    type Err = UnknownJobState;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|state| state.as_str() == text)
            .ok_or_else(|| UnknownJobState(text.to_owned()))
    }
}

/// A job as stored: what GetJob and WatchJob show, and what a worker runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobRecord {
    /// The caller-chosen id (unique).
    pub id: String,
    /// Where the job is.
    pub state: JobState,
    /// The request to run, opaque to the store (JSON written by the job runner).
    pub request: String,
    /// Chunks finished so far, as last reported by the worker.
    pub chunks_done: u32,
    /// Chunks in the whole job; 0 until the worker knows.
    pub chunks_total: u32,
    /// The outcome of a SUCCEEDED job, opaque to the store (JSON written by the job runner).
    pub result: Option<String>,
    /// Why a FAILED or CANCELLED job ended.
    pub error: Option<String>,
    /// When it was submitted; the queue is served oldest first.
    pub created_at: SystemTime,
    /// The last change a watcher can see (state or progress); lease renewals do not move it.
    pub updated_at: SystemTime,
    /// How many times it was claimed: 0 while never run, 2 or more after a takeover, so a
    /// runner can give up on a job that keeps killing its workers.
    pub attempt: u32,
}

/// A worker's hold on a RUNNING job, returned by [`JobStore::claim_job`]. Writes that carry it
/// succeed only while the job is still RUNNING under this very attempt: a lease goes stale when
/// the job is cancelled, finished, released, or taken over after expiry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The job held.
    pub job_id: String,
    /// The attempt this lease belongs to; a takeover makes a new attempt.
    pub attempt: u32,
    /// Who holds it (e.g. `host:pid:worker`), for operators and as a second check.
    pub owner: String,
}

/// How a job ended, as its worker reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobOutcome {
    /// It produced `result` (opaque JSON) → SUCCEEDED.
    Succeeded {
        /// What GetJob returns as the job's result.
        result: String,
    },
    /// It failed for good → FAILED.
    Failed {
        /// Why, for the client.
        error: String,
    },
}

/// The durable job queue. Implementations must be safe to call concurrently, also from several
/// processes on one database (PostgreSQL) or one file (SQLite).
pub trait JobStore: Send + Sync {
    /// Stores a new QUEUED job `id` running `request`. Idempotent by id, so a retried submit
    /// is harmless: if `id` exists with the same request, the stored job is returned as it is
    /// now; with a different request, INVALID_ARGUMENT naming `id`.
    fn submit_job<'a>(
        &'a self,
        id: &'a str,
        request: &'a str,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<JobRecord, StoreError>>;

    /// The job `id`, or `None` when there is none (never submitted, or pruned).
    fn get_job<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<JobRecord>, StoreError>>;

    /// Takes the oldest job that needs a worker: a QUEUED one, or a RUNNING one whose lease
    /// expired by `now` (its worker died or stalled). Atomically moves it to RUNNING with
    /// `attempt + 1`, held by `owner` until `now + lease_for`. `None` when nothing is waiting.
    /// Concurrent claimers (also in other processes) never get the same job for one attempt;
    /// on PostgreSQL they skip each other's candidate rows instead of waiting for them, so
    /// `None` there can also mean that every waiting job is being claimed by another worker
    /// at this instant: poll again later either way.
    fn claim_job<'a>(
        &'a self,
        owner: &'a str,
        lease_for: Duration,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<Option<(JobRecord, Lease)>, StoreError>>;

    /// Extends `lease` to `now + lease_for`. `Ok(false)` when the lease is lost (the job was
    /// cancelled, finished, released or taken over): the worker must stop. An expired lease
    /// that nobody took over yet is still held and is renewed.
    fn renew_lease<'a>(
        &'a self,
        lease: &'a Lease,
        lease_for: Duration,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Records a finished chunk, in one transaction and only while `lease` is held: stores
    /// `chunk_key -> value` (a key stored before keeps its first value: a retried save is a
    /// no-op) and sets the progress. `Ok(false)` (and nothing written) when the lease is lost.
    fn save_checkpoint<'a>(
        &'a self,
        lease: &'a Lease,
        chunk_key: &'a str,
        value: &'a str,
        chunks_done: u32,
        chunks_total: u32,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Sets the progress without a checkpoint (e.g. once `chunks_total` is known), only while
    /// `lease` is held. `Ok(false)` when the lease is lost.
    fn set_progress<'a>(
        &'a self,
        lease: &'a Lease,
        chunks_done: u32,
        chunks_total: u32,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Every checkpoint of job `job_id` as (chunk_key, value), ordered by key (bytewise), so a
    /// worker that took the job over skips what is done.
    fn checkpoints<'a>(
        &'a self,
        job_id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<(String, String)>, StoreError>>;

    /// Ends the job with `outcome`, only while `lease` is held, so it ends exactly once even
    /// when a stalled worker and its successor both finish. Deletes the job's checkpoints in
    /// the same transaction (they are only for resuming). `Ok(false)` (and nothing written)
    /// when the lease is lost.
    fn finish_job<'a>(
        &'a self,
        lease: &'a Lease,
        outcome: JobOutcome,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Gives a RUNNING job back to the queue at once (graceful shutdown), keeping its progress
    /// and checkpoints, so another worker resumes it without waiting for the lease to expire.
    /// Only while `lease` is held; `Ok(false)` when it is lost.
    fn release_job<'a>(
        &'a self,
        lease: &'a Lease,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Cancels job `id`: a QUEUED or RUNNING job becomes CANCELLED with error
    /// [`CANCELLED_ERROR`] and loses its checkpoints (its worker's next lease check fails, which
    /// tells it to stop); a job that already ended is returned unchanged. `None` when there is
    /// no such job.
    fn cancel_job<'a>(
        &'a self,
        id: &'a str,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<Option<JobRecord>, StoreError>>;

    /// Deletes the jobs that ended before `before` (by `updated_at`) with their checkpoints;
    /// returns how many jobs. Unfinished jobs are never pruned.
    fn prune_jobs(&self, before: SystemTime) -> BoxFuture<'_, Result<u64, StoreError>>;
}

/// A row of `jobs` as read, before its values are checked.
#[derive(FromRow)]
struct JobRow {
    id: String,
    state: String,
    request: String,
    chunks_done: i64,
    chunks_total: i64,
    result: Option<String>,
    error: Option<String>,
    created_at: i64,
    updated_at: i64,
    attempt: i64,
}

impl JobRow {
    fn into_record(self) -> Result<JobRecord, StoreError> {
        let corrupt =
            |what: &str| StoreError::Corrupt(format!("job {:?}: {what} is out of range", self.id));
        let state = self
            .state
            .parse()
            .map_err(|error: UnknownJobState| StoreError::Corrupt(error.to_string()))?;
        let count = |value: i64, what: &str| u32::try_from(value).map_err(|_| corrupt(what));
        let time = |us: i64, what: &str| from_micros(us).ok_or_else(|| corrupt(what));
        Ok(JobRecord {
            state,
            chunks_done: count(self.chunks_done, "chunks_done")?,
            chunks_total: count(self.chunks_total, "chunks_total")?,
            created_at: time(self.created_at, "created_at")?,
            updated_at: time(self.updated_at, "updated_at")?,
            attempt: count(self.attempt, "attempt")?,
            id: self.id,
            request: self.request,
            result: self.result,
            error: self.error,
        })
    }
}

/// Reads a `jobs` row of either backend (any statement returning `job_columns!()`).
fn decode<'r, R: Row>(row: &'r R) -> Result<JobRecord, StoreError>
where
    JobRow: FromRow<'r, R>,
{
    JobRow::from_row(row)
        .map_err(|error| StoreError::Corrupt(error.to_string()))?
        .into_record()
}

/// `now + lease_for` in stored microseconds, saturating (a lease "forever" stays valid).
fn expiry(now: SystemTime, lease_for: Duration) -> i64 {
    micros(now).saturating_add(i64::try_from(lease_for.as_micros()).unwrap_or(i64::MAX))
}

/// The columns [`JobRow`] reads, for `SELECT` and `RETURNING`.
macro_rules! job_columns {
    () => {
        "id, state, request, chunks_done, chunks_total, result, error, created_at, updated_at, \
         attempt"
    };
}

/// The condition of every write that needs the lease: the job is still RUNNING under the
/// lease's attempt and owner (`$1` = id, `$2` = attempt, `$3` = owner).
macro_rules! lease_held {
    () => {
        " WHERE id = $1 AND state = 'RUNNING' AND attempt = $2 AND lease_owner = $3"
    };
}

const SUBMIT: &str = "\
    INSERT INTO jobs \
        (id, state, request, chunks_done, chunks_total, created_at, updated_at, attempt) \
    VALUES ($1, 'QUEUED', $2, 0, 0, $3, $3, 0) \
    ON CONFLICT (id) DO NOTHING";

const GET: &str = concat!("SELECT ", job_columns!(), " FROM jobs WHERE id = $1");

// Renewing is invisible to watchers: updated_at stays.
const RENEW: &str = concat!("UPDATE jobs SET lease_expires = $4", lease_held!());

const PROGRESS: &str = concat!(
    "UPDATE jobs SET chunks_done = $4, chunks_total = $5, updated_at = $6",
    lease_held!()
);

// DO NOTHING: the first value of a key wins, so a worker retrying a save after a lost reply
// (or a successor redoing a chunk its predecessor already saved) changes nothing.
const PUT_CHECKPOINT: &str = "\
    INSERT INTO job_checkpoints (job_id, chunk_key, value, created_at) \
    VALUES ($1, $2, $3, $4) \
    ON CONFLICT (job_id, chunk_key) DO NOTHING";

const DELETE_CHECKPOINTS: &str = "DELETE FROM job_checkpoints WHERE job_id = $1";

const FINISH: &str = concat!(
    "UPDATE jobs SET state = $4, result = $5, error = $6, updated_at = $7, \
     lease_owner = NULL, lease_expires = NULL",
    lease_held!()
);

// The attempt stays: the next claim counts on from it.
const RELEASE: &str = concat!(
    "UPDATE jobs SET state = 'QUEUED', updated_at = $4, lease_owner = NULL, \
     lease_expires = NULL",
    lease_held!()
);

const CANCEL: &str = concat!(
    "UPDATE jobs SET state = 'CANCELLED', error = $2, updated_at = $3, lease_owner = NULL, \
     lease_expires = NULL \
     WHERE id = $1 AND state IN ('QUEUED', 'RUNNING') \
     RETURNING ",
    job_columns!()
);

// Checkpoints first: the foreign key's ON DELETE CASCADE would do it, but SQLite enforces
// foreign keys only when the connection enables them, and this must not depend on that.
const PRUNE_CHECKPOINTS: &str = "\
    DELETE FROM job_checkpoints WHERE job_id IN (\
        SELECT id FROM jobs \
        WHERE state IN ('SUCCEEDED', 'FAILED', 'CANCELLED') AND updated_at < $1)";

const PRUNE: &str = "\
    DELETE FROM jobs \
    WHERE state IN ('SUCCEEDED', 'FAILED', 'CANCELLED') AND updated_at < $1";

/// The statements whose SQL differs between the backends.
struct Dialect {
    /// `$1` = owner, `$2` = lease expiry, `$3` = now; returns the claimed job's columns.
    claim: &'static str,
    /// `$1` = job id; returns (chunk_key, value) ordered bytewise by key.
    checkpoints: &'static str,
}

// The candidate condition repeats the partial index's `state IN ('QUEUED', 'RUNNING')` so
// SQLite's planner (which matches index predicates by terms) uses `jobs_claimable`. One
// statement, so the choice and the update are one atomic step under SQLite's single writer.
const SQLITE: Dialect = Dialect {
    claim: concat!(
        "UPDATE jobs SET state = 'RUNNING', attempt = attempt + 1, lease_owner = $1, \
             lease_expires = $2, updated_at = $3 \
         WHERE id = (\
             SELECT id FROM jobs \
             WHERE state IN ('QUEUED', 'RUNNING') AND (state = 'QUEUED' OR lease_expires <= $3) \
             ORDER BY created_at, id \
             LIMIT 1) \
         RETURNING ",
        job_columns!()
    ),
    checkpoints: "SELECT chunk_key, value FROM job_checkpoints WHERE job_id = $1 \
                  ORDER BY chunk_key",
};

// `FOR UPDATE SKIP LOCKED` in the same statement as the UPDATE: the candidate row is locked
// from the moment it is chosen until the UPDATE commits, a row another replica is claiming is
// skipped rather than waited for, and a row whose lease was renewed or that was cancelled
// meanwhile is re-checked against the condition on its latest version and passed over. The
// lock rows step sits below the LIMIT, so a skipped row does not use up the one row asked for.
const POSTGRES: Dialect = Dialect {
    claim: concat!(
        "WITH next AS (\
             SELECT id AS next_id FROM jobs \
             WHERE state IN ('QUEUED', 'RUNNING') AND (state = 'QUEUED' OR lease_expires <= $3) \
             ORDER BY created_at, id COLLATE \"C\" \
             LIMIT 1 \
             FOR UPDATE SKIP LOCKED) \
         UPDATE jobs SET state = 'RUNNING', attempt = attempt + 1, lease_owner = $1, \
             lease_expires = $2, updated_at = $3 \
         FROM next WHERE id = next_id \
         RETURNING ",
        job_columns!()
    ),
    checkpoints: "SELECT chunk_key, value FROM job_checkpoints WHERE job_id = $1 \
                  ORDER BY chunk_key COLLATE \"C\"",
};

/// Implements [`JobStore`] for a store type with a `pool()`: the SQL of `$dialect` and the
/// shared statements above; only the pool type differs.
macro_rules! impl_job_store {
    ($store:ty, $dialect:expr) => {
        impl JobStore for $store {
            fn submit_job<'a>(
                &'a self,
                id: &'a str,
                request: &'a str,
                now: SystemTime,
            ) -> BoxFuture<'a, Result<JobRecord, StoreError>> {
                Box::pin(async move {
                    if id.is_empty() {
                        return Err(StoreError::invalid("id", "must not be empty"));
                    }
                    let mut tx = self.pool().begin().await.map_err(StoreError::Unavailable)?;
                    sqlx::query(SUBMIT)
                        .bind(id)
                        .bind(request)
                        .bind(micros(now))
                        .execute(&mut *tx)
                        .await
                        .map_err(StoreError::Unavailable)?;
                    let row = sqlx::query(GET)
                        .bind(id)
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(StoreError::Unavailable)?;
                    tx.commit().await.map_err(StoreError::Unavailable)?;
                    let job = decode(&row)?;
                    if job.request != request {
                        return Err(StoreError::invalid(
                            "id",
                            "a job with this id and a different request exists",
                        ));
                    }
                    Ok(job)
                })
            }

            fn get_job<'a>(
                &'a self,
                id: &'a str,
            ) -> BoxFuture<'a, Result<Option<JobRecord>, StoreError>> {
                Box::pin(async move {
                    sqlx::query(GET)
                        .bind(id)
                        .fetch_optional(self.pool())
                        .await
                        .map_err(StoreError::Unavailable)?
                        .map(|row| decode(&row))
                        .transpose()
                })
            }

            fn claim_job<'a>(
                &'a self,
                owner: &'a str,
                lease_for: Duration,
                now: SystemTime,
            ) -> BoxFuture<'a, Result<Option<(JobRecord, Lease)>, StoreError>> {
                Box::pin(async move {
                    let row = sqlx::query($dialect.claim)
                        .bind(owner)
                        .bind(expiry(now, lease_for))
                        .bind(micros(now))
                        .fetch_optional(self.pool())
                        .await
                        .map_err(StoreError::Unavailable)?;
                    let Some(row) = row else {
                        return Ok(None);
                    };
                    let job = decode(&row)?;
                    let lease = Lease {
                        job_id: job.id.clone(),
                        attempt: job.attempt,
                        owner: owner.to_owned(),
                    };
                    Ok(Some((job, lease)))
                })
            }

            fn renew_lease<'a>(
                &'a self,
                lease: &'a Lease,
                lease_for: Duration,
                now: SystemTime,
            ) -> BoxFuture<'a, Result<bool, StoreError>> {
                Box::pin(async move {
                    let renewed = sqlx::query(RENEW)
                        .bind(&lease.job_id)
                        .bind(i64::from(lease.attempt))
                        .bind(&lease.owner)
                        .bind(expiry(now, lease_for))
                        .execute(self.pool())
                        .await
                        .map_err(StoreError::Unavailable)?
                        .rows_affected();
                    Ok(renewed == 1)
                })
            }

            fn save_checkpoint<'a>(
                &'a self,
                lease: &'a Lease,
                chunk_key: &'a str,
                value: &'a str,
                chunks_done: u32,
                chunks_total: u32,
                now: SystemTime,
            ) -> BoxFuture<'a, Result<bool, StoreError>> {
                Box::pin(async move {
                    let now = micros(now);
                    let mut tx = self.pool().begin().await.map_err(StoreError::Unavailable)?;
                    // The lease check first: it is a write (SQLite's lock from the start), and
                    // on PostgreSQL it locks the job row, so a cancel or takeover waits for
                    // this transaction or makes this check fail, never half of each.
                    let held = sqlx::query(PROGRESS)
                        .bind(&lease.job_id)
                        .bind(i64::from(lease.attempt))
                        .bind(&lease.owner)
                        .bind(i64::from(chunks_done))
                        .bind(i64::from(chunks_total))
                        .bind(now)
                        .execute(&mut *tx)
                        .await
                        .map_err(StoreError::Unavailable)?
                        .rows_affected()
                        == 1;
                    if !held {
                        // Dropping `tx` rolls back (it wrote nothing).
                        return Ok(false);
                    }
                    sqlx::query(PUT_CHECKPOINT)
                        .bind(&lease.job_id)
                        .bind(chunk_key)
                        .bind(value)
                        .bind(now)
                        .execute(&mut *tx)
                        .await
                        .map_err(StoreError::Unavailable)?;
                    tx.commit().await.map_err(StoreError::Unavailable)?;
                    Ok(true)
                })
            }

            fn set_progress<'a>(
                &'a self,
                lease: &'a Lease,
                chunks_done: u32,
                chunks_total: u32,
                now: SystemTime,
            ) -> BoxFuture<'a, Result<bool, StoreError>> {
                Box::pin(async move {
                    let updated = sqlx::query(PROGRESS)
                        .bind(&lease.job_id)
                        .bind(i64::from(lease.attempt))
                        .bind(&lease.owner)
                        .bind(i64::from(chunks_done))
                        .bind(i64::from(chunks_total))
                        .bind(micros(now))
                        .execute(self.pool())
                        .await
                        .map_err(StoreError::Unavailable)?
                        .rows_affected();
                    Ok(updated == 1)
                })
            }

            fn checkpoints<'a>(
                &'a self,
                job_id: &'a str,
            ) -> BoxFuture<'a, Result<Vec<(String, String)>, StoreError>> {
                Box::pin(async move {
                    sqlx::query_as::<_, (String, String)>($dialect.checkpoints)
                        .bind(job_id)
                        .fetch_all(self.pool())
                        .await
                        .map_err(StoreError::Unavailable)
                })
            }

            fn finish_job<'a>(
                &'a self,
                lease: &'a Lease,
                outcome: JobOutcome,
                now: SystemTime,
            ) -> BoxFuture<'a, Result<bool, StoreError>> {
                Box::pin(async move {
                    let (state, result, error) = match outcome {
                        JobOutcome::Succeeded { result } => {
                            (JobState::Succeeded, Some(result), None)
                        }
                        JobOutcome::Failed { error } => (JobState::Failed, None, Some(error)),
                    };
                    let mut tx = self.pool().begin().await.map_err(StoreError::Unavailable)?;
                    let held = sqlx::query(FINISH)
                        .bind(&lease.job_id)
                        .bind(i64::from(lease.attempt))
                        .bind(&lease.owner)
                        .bind(state.as_str())
                        .bind(result)
                        .bind(error)
                        .bind(micros(now))
                        .execute(&mut *tx)
                        .await
                        .map_err(StoreError::Unavailable)?
                        .rows_affected()
                        == 1;
                    if !held {
                        return Ok(false);
                    }
                    sqlx::query(DELETE_CHECKPOINTS)
                        .bind(&lease.job_id)
                        .execute(&mut *tx)
                        .await
                        .map_err(StoreError::Unavailable)?;
                    tx.commit().await.map_err(StoreError::Unavailable)?;
                    Ok(true)
                })
            }

            fn release_job<'a>(
                &'a self,
                lease: &'a Lease,
                now: SystemTime,
            ) -> BoxFuture<'a, Result<bool, StoreError>> {
                Box::pin(async move {
                    let released = sqlx::query(RELEASE)
                        .bind(&lease.job_id)
                        .bind(i64::from(lease.attempt))
                        .bind(&lease.owner)
                        .bind(micros(now))
                        .execute(self.pool())
                        .await
                        .map_err(StoreError::Unavailable)?
                        .rows_affected();
                    Ok(released == 1)
                })
            }

            fn cancel_job<'a>(
                &'a self,
                id: &'a str,
                now: SystemTime,
            ) -> BoxFuture<'a, Result<Option<JobRecord>, StoreError>> {
                Box::pin(async move {
                    let mut tx = self.pool().begin().await.map_err(StoreError::Unavailable)?;
                    let cancelled = sqlx::query(CANCEL)
                        .bind(id)
                        .bind(CANCELLED_ERROR)
                        .bind(micros(now))
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(StoreError::Unavailable)?;
                    let row = match cancelled {
                        Some(row) => {
                            sqlx::query(DELETE_CHECKPOINTS)
                                .bind(id)
                                .execute(&mut *tx)
                                .await
                                .map_err(StoreError::Unavailable)?;
                            Some(row)
                        }
                        // Already ended, or unknown: report it as it is.
                        None => sqlx::query(GET)
                            .bind(id)
                            .fetch_optional(&mut *tx)
                            .await
                            .map_err(StoreError::Unavailable)?,
                    };
                    tx.commit().await.map_err(StoreError::Unavailable)?;
                    row.map(|row| decode(&row)).transpose()
                })
            }

            fn prune_jobs(&self, before: SystemTime) -> BoxFuture<'_, Result<u64, StoreError>> {
                Box::pin(async move {
                    let before = micros(before);
                    let mut tx = self.pool().begin().await.map_err(StoreError::Unavailable)?;
                    sqlx::query(PRUNE_CHECKPOINTS)
                        .bind(before)
                        .execute(&mut *tx)
                        .await
                        .map_err(StoreError::Unavailable)?;
                    let pruned = sqlx::query(PRUNE)
                        .bind(before)
                        .execute(&mut *tx)
                        .await
                        .map_err(StoreError::Unavailable)?
                        .rows_affected();
                    tx.commit().await.map_err(StoreError::Unavailable)?;
                    Ok(pruned)
                })
            }
        }
    };
}

impl_job_store!(SqliteStore, SQLITE);
impl_job_store!(PostgresStore, POSTGRES);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_their_stored_spelling() {
        for state in JobState::ALL {
            assert_eq!(state.as_str().parse::<JobState>().ok(), Some(state));
        }
        assert!("queued".parse::<JobState>().is_err());
        let terminal: Vec<_> = JobState::ALL
            .into_iter()
            .filter(|state| state.is_terminal())
            .collect();
        assert_eq!(
            terminal,
            [JobState::Succeeded, JobState::Failed, JobState::Cancelled]
        );
    }

    #[test]
    fn a_lease_forever_saturates() {
        assert_eq!(expiry(SystemTime::UNIX_EPOCH, Duration::MAX), i64::MAX);
        assert_eq!(
            expiry(SystemTime::UNIX_EPOCH, Duration::from_secs(30)),
            30_000_000
        );
    }
}
