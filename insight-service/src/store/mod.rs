//! The insight store: imported feedback and listening plays, in SQLite (the default, an
//! embedded file) or PostgreSQL (several replicas on one database).
//!
//! The store sits behind the [`FeedbackStore`] trait and knows no tonic; the gRPC adapter
//! (`grpc::store`) converts messages and maps [`StoreError`] to statuses. [`Store`] is the
//! handle the server holds: it connects (and migrates) on first use and again after a failed
//! attempt, so the server starts and answers everything else while the database is down, and
//! the store RPCs answer UNAVAILABLE until it is back.
//!
//! Times are stored as microseconds since the Unix epoch on both backends (one page-token
//! encoding for both); a Timestamp's sub-microsecond nanos are dropped.

/// `impl FeedbackStore` for a backend: the reads are the same code on both, only what the
/// invoking module supplies differs: its SQL constants (`LIST_*`, `COUNT_*`, `LIST_PLAYS`, in
/// its placeholder syntax), its `decode` for its row type, and its pool.
macro_rules! impl_feedback_reads {
    ($store:ty) => {
        impl FeedbackStore for $store {
            fn list_feedback<'a>(
                &'a self,
                query: &'a FeedbackQuery,
            ) -> BoxFuture<'a, Result<FeedbackPage, StoreError>> {
                Box::pin(async move {
                    let bounds = query.bounds();
                    let sql = match (bounds.user_id.is_some(), bounds.newest_first) {
                        (true, false) => LIST_BY_USER,
                        (false, false) => LIST_ALL,
                        (true, true) => LIST_BY_USER_DESC,
                        (false, true) => LIST_ALL_DESC,
                    };
                    let mut statement = sqlx::query(sql)
                        .bind(bounds.since_us)
                        .bind(bounds.until_us)
                        .bind(bounds.min_rating)
                        .bind(bounds.max_rating)
                        .bind(&bounds.source)
                        .bind(bounds.after_us)
                        .bind(&bounds.after_id)
                        .bind(bounds.limit);
                    if let Some(user_id) = &bounds.user_id {
                        statement = statement.bind(user_id);
                    }
                    let rows = statement
                        .fetch_all(self.pool())
                        .await
                        .map_err(StoreError::Unavailable)?;
                    let entries = rows.iter().map(decode).collect::<Result<Vec<_>, _>>()?;
                    Ok(FeedbackPage::from_rows(entries, query.page_size))
                })
            }

            fn count_feedback<'a>(
                &'a self,
                query: &'a FeedbackQuery,
            ) -> BoxFuture<'a, Result<u64, StoreError>> {
                Box::pin(async move {
                    let bounds = query.bounds();
                    let sql = if bounds.user_id.is_some() {
                        COUNT_BY_USER
                    } else {
                        COUNT_ALL
                    };
                    let mut statement = sqlx::query_scalar::<_, i64>(sql)
                        .bind(bounds.since_us)
                        .bind(bounds.until_us)
                        .bind(bounds.min_rating)
                        .bind(bounds.max_rating)
                        .bind(&bounds.source);
                    if let Some(user_id) = &bounds.user_id {
                        statement = statement.bind(user_id);
                    }
                    let count = statement
                        .fetch_one(self.pool())
                        .await
                        .map_err(StoreError::Unavailable)?;
                    Ok(u64::try_from(count).unwrap_or(0))
                })
            }

            fn list_plays<'a>(
                &'a self,
                user_id: &'a str,
                after: Option<&'a PlayCursor>,
                limit: u32,
            ) -> BoxFuture<'a, Result<Vec<ListeningRecord>, StoreError>> {
                Box::pin(async move {
                    let (after_us, after_track) = after.map_or((i64::MIN, ""), |cursor| {
                        (cursor.played_at_us, cursor.track_id.as_str())
                    });
                    let rows = sqlx::query(LIST_PLAYS)
                        .bind(user_id)
                        .bind(after_us)
                        .bind(after_track)
                        .bind(i64::from(limit))
                        .fetch_all(self.pool())
                        .await
                        .map_err(StoreError::Unavailable)?;
                    rows.iter()
                        .map(|row| {
                            <StoredPlay as sqlx::FromRow<'_, _>>::from_row(row)
                                .map_err(|error| StoreError::Corrupt(error.to_string()))?
                                .decode()
                        })
                        .collect()
                })
            }
        }
    };
}

mod cache;
mod import;
mod jobs;
mod postgres;
mod query;
mod sqlite;
mod url;

use std::{
    fmt,
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures::future::BoxFuture;
use tokio::sync::OnceCell;

pub use cache::{CacheStore, CacheTable};
pub use import::{
    BATCH_ROWS, Import, ListeningRecord, MAX_REJECTIONS_LISTED, Record, Rejection, Rejections,
};
pub use jobs::{
    CANCELLED_ERROR, JobOutcome, JobRecord, JobState, JobStore, Lease, UnknownJobState,
};
pub use postgres::PostgresStore;
pub use query::{
    DEFAULT_PAGE_SIZE, FeedbackFilter, FeedbackPage, FeedbackQuery, MAX_PAGE_SIZE, PageToken,
    PlayCursor,
};
pub use sqlite::SqliteStore;
pub use url::{Backend, DEFAULT_DATABASE_URL, DatabaseUrl};

use crate::domain::Entry;

/// How long a pool waits for a connection (or SQLite for its write lock) before the store
/// counts as unavailable: long enough for a busy database, short enough that a store RPC
/// answers UNAVAILABLE well within a typical client deadline.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the store could not answer or write.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A request value is out of range or malformed (→ INVALID_ARGUMENT naming `field`).
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The request field, e.g. `page_token`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The database failed, is locked past [`ACQUIRE_TIMEOUT`], or cannot be reached
    /// (→ UNAVAILABLE: retrying later is safe, imports are idempotent).
    #[error("the insight store is unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// The schema could not be brought up to date (→ UNAVAILABLE; usually the database is
    /// unreachable or read-only, which an operator fixes without a new request).
    #[error("cannot migrate the insight store schema: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    /// A stored row cannot be read back (edited by hand, or written by a newer version).
    #[error("a stored row cannot be read: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// An [`StoreError::InvalidArgument`] for `field`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Rows written by one batch (or one whole import).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteCounts {
    /// Rows stored for the first time.
    pub inserted: u32,
    /// Rows that replaced a stored row with the same identity.
    pub updated: u32,
}

impl std::ops::AddAssign for WriteCounts {
    fn add_assign(&mut self, rhs: Self) {
        self.inserted = self.inserted.saturating_add(rhs.inserted);
        self.updated = self.updated.saturating_add(rhs.updated);
    }
}

/// The writes an import makes, apart from the rest of the store so an importer (and its
/// tests) need nothing else.
pub trait ImportWriter: Send + Sync + fmt::Debug {
    /// Upserts `entries` by id in ONE transaction (all or nothing), stamping rows with `now`.
    /// An entry without `created_at` gets `now` on first import and keeps its stored time on
    /// a re-import. Entries must already be valid (`pipeline::validate_entry`).
    fn upsert_feedback<'a>(
        &'a self,
        entries: &'a [Entry],
        now: SystemTime,
    ) -> BoxFuture<'a, Result<WriteCounts, StoreError>>;

    /// Upserts `plays` by (user_id, track_id, played_at) in ONE transaction (all or nothing).
    fn upsert_plays<'a>(
        &'a self,
        plays: &'a [ListeningRecord],
        now: SystemTime,
    ) -> BoxFuture<'a, Result<WriteCounts, StoreError>>;
}

/// Where feedback, plays, cached insights and jobs are kept. Implementations must be safe to
/// call concurrently.
pub trait FeedbackStore: ImportWriter + CacheStore + JobStore + Send + Sync + fmt::Debug {
    /// One page of feedback matching `query`, ordered by (created_at, id).
    fn list_feedback<'a>(
        &'a self,
        query: &'a FeedbackQuery,
    ) -> BoxFuture<'a, Result<FeedbackPage, StoreError>>;

    /// How many stored entries match `query`'s filter (its page position is ignored).
    fn count_feedback<'a>(
        &'a self,
        query: &'a FeedbackQuery,
    ) -> BoxFuture<'a, Result<u64, StoreError>>;

    /// Up to `limit` plays of `user_id` after `after` (from the first when `None`), ordered by
    /// (played_at, track_id).
    fn list_plays<'a>(
        &'a self,
        user_id: &'a str,
        after: Option<&'a PlayCursor>,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<ListeningRecord>, StoreError>>;
}

/// Connects to the database `url` names (creating a SQLite file if missing) and, when
/// `migrate`, brings its schema up to date.
pub async fn open(url: &DatabaseUrl, migrate: bool) -> Result<Arc<dyn FeedbackStore>, StoreError> {
    Ok(match url.backend() {
        Backend::Sqlite => Arc::new(SqliteStore::open(url.expose(), migrate).await?),
        Backend::Postgres => Arc::new(PostgresStore::open(url.expose(), migrate).await?),
    })
}

/// The server's handle on the store: connects on first use and retries on the next use after
/// a failure, so an unreachable database makes the store RPCs UNAVAILABLE instead of keeping
/// the server down. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    url: DatabaseUrl,
    migrate: bool,
    slot: Arc<OnceCell<Arc<dyn FeedbackStore>>>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("url", &self.url)
            .field("connected", &self.slot.initialized())
            .finish()
    }
}

impl Store {
    /// A handle on the database at `url`; nothing is connected until [`Store::get`].
    pub fn new(url: DatabaseUrl, migrate: bool) -> Self {
        Self {
            url,
            migrate,
            slot: Arc::new(OnceCell::new()),
        }
    }

    /// A handle answering from `store` at once (for tests and embedding).
    pub fn with_store(url: DatabaseUrl, store: Arc<dyn FeedbackStore>) -> Self {
        Self {
            url,
            migrate: false,
            slot: Arc::new(OnceCell::new_with(Some(store))),
        }
    }

    /// The connected store, connecting (and migrating) first if no attempt succeeded yet.
    /// Concurrent callers share one attempt; a failed attempt is retried by the next call.
    pub async fn get(&self) -> Result<Arc<dyn FeedbackStore>, StoreError> {
        self.slot
            .get_or_try_init(|| open(&self.url, self.migrate))
            .await
            .cloned()
    }

    /// The database this handle points at, password hidden (for logs).
    pub fn url(&self) -> &DatabaseUrl {
        &self.url
    }
}

/// `time` as microseconds since the Unix epoch (negative before 1970), saturating far outside
/// the protobuf Timestamp range, which is all a request can carry.
pub fn micros(time: SystemTime) -> i64 {
    match time.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_micros()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_micros())
            .map(|us| -us)
            .unwrap_or(i64::MIN),
    }
}

/// The inverse of [`micros`]; `None` when the instant cannot be represented (a corrupt row).
pub fn from_micros(us: i64) -> Option<SystemTime> {
    let magnitude = Duration::from_micros(us.unsigned_abs());
    if us >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(magnitude)
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(magnitude)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micros_round_trip_on_both_sides_of_the_epoch() {
        for us in [0, 1, -1, 1_700_000_000_123_456, -62_135_596_800_000_000] {
            assert_eq!(from_micros(us).map(micros), Some(us));
        }
    }
}
