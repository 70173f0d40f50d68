//! The SQLite store: the default, an embedded file that needs no server.

use std::{str::FromStr, time::SystemTime};

use futures::future::BoxFuture;
use sqlx::{
    Row as _,
    sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
        SqliteSynchronous,
    },
};

use super::{
    ACQUIRE_TIMEOUT, FeedbackPage, FeedbackQuery, FeedbackStore, ImportWriter, ListeningRecord,
    PlayCursor, StoreError, WriteCounts,
    import::{PlayRow, StoredPlay, decode_entry},
    micros,
};
use crate::domain::Entry;

/// Where the migrator records what it applied. Not sqlx's default `_sqlx_migrations`: another
/// component's migrations in the same database (monitor-service's alert history) would
/// otherwise be taken for ours and refused as unknown.
pub(super) const MIGRATIONS_TABLE: &str = "_insight_migrations";

/// Concurrent connections: SQLite has one writer at a time anyway, and WAL lets the readers
/// (ListFeedback) proceed beside it.
const MAX_CONNECTIONS: u32 = 4;

// Insert-then-update rather than one upsert: `changes()` of the INSERT tells a new row from
// an existing one, and both statements are writes, so the transaction holds the write lock
// from its first statement and no other writer can slip in between.
const INSERT_FEEDBACK: &str = "\
    INSERT INTO feedback (id, user_id, text, rating, created_at, source, updated_at) \
    VALUES (?1, ?2, ?3, ?4, COALESCE(?5, ?7), ?6, ?7) \
    ON CONFLICT (id) DO NOTHING";

// An entry without created_at keeps the time of its first import, so re-importing it does
// not move it in the ListFeedback order.
const UPDATE_FEEDBACK: &str = "\
    UPDATE feedback SET user_id = ?2, text = ?3, rating = ?4, \
        created_at = COALESCE(?5, created_at), source = ?6, updated_at = ?7 \
    WHERE id = ?1";

const INSERT_PLAY: &str = "\
    INSERT INTO listening_plays \
        (user_id, track_id, played_at, track_name, artist, genres, ms_played, skipped, \
         duration_ms, features, updated_at) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) \
    ON CONFLICT (user_id, track_id, played_at) DO NOTHING";

const UPDATE_PLAY: &str = "\
    UPDATE listening_plays SET track_name = ?4, artist = ?5, genres = ?6, ms_played = ?7, \
        skipped = ?8, duration_ms = ?9, features = ?10, updated_at = ?11 \
    WHERE user_id = ?1 AND track_id = ?2 AND played_at = ?3";

// Two static queries rather than `(?9 IS NULL OR user_id = ?9)`: SQLite's planner picks the
// (user_id, created_at, id) index only when the user condition is a plain equality.
const LIST_ALL: &str = "\
    SELECT id, user_id, text, rating, created_at, source FROM feedback \
    WHERE created_at >= ?1 AND created_at < ?2 AND rating BETWEEN ?3 AND ?4 \
      AND (?5 = '' OR source = ?5) AND (created_at, id) > (?6, ?7) \
    ORDER BY created_at, id \
    LIMIT ?8";

const LIST_BY_USER: &str = "\
    SELECT id, user_id, text, rating, created_at, source FROM feedback \
    WHERE user_id = ?9 AND created_at >= ?1 AND created_at < ?2 AND rating BETWEEN ?3 AND ?4 \
      AND (?5 = '' OR source = ?5) AND (created_at, id) > (?6, ?7) \
    ORDER BY created_at, id \
    LIMIT ?8";

// The same two, newest first (a summary of stored entries reads its most recent ones).
const LIST_ALL_DESC: &str = "\
    SELECT id, user_id, text, rating, created_at, source FROM feedback \
    WHERE created_at >= ?1 AND created_at < ?2 AND rating BETWEEN ?3 AND ?4 \
      AND (?5 = '' OR source = ?5) AND (created_at, id) < (?6, ?7) \
    ORDER BY created_at DESC, id DESC \
    LIMIT ?8";

const LIST_BY_USER_DESC: &str = "\
    SELECT id, user_id, text, rating, created_at, source FROM feedback \
    WHERE user_id = ?9 AND created_at >= ?1 AND created_at < ?2 \
      AND rating BETWEEN ?3 AND ?4 \
      AND (?5 = '' OR source = ?5) AND (created_at, id) < (?6, ?7) \
    ORDER BY created_at DESC, id DESC \
    LIMIT ?8";

// ListFeedback's filters without the page position, for the `entries_skipped` of a selector
// summary; the same two shapes so each uses its index.
const COUNT_ALL: &str = "\
    SELECT COUNT(*) FROM feedback \
    WHERE created_at >= ?1 AND created_at < ?2 AND rating BETWEEN ?3 AND ?4 \
      AND (?5 = '' OR source = ?5)";

const COUNT_BY_USER: &str = "\
    SELECT COUNT(*) FROM feedback \
    WHERE user_id = ?6 AND created_at >= ?1 AND created_at < ?2 \
      AND rating BETWEEN ?3 AND ?4 AND (?5 = '' OR source = ?5)";

// One user's plays in keyset order, for AnalyzeMusic of stored plays.
const LIST_PLAYS: &str = "\
    SELECT user_id, track_id, played_at, track_name, artist, genres, ms_played, skipped, \
        duration_ms, features FROM listening_plays \
    WHERE user_id = ?1 AND (played_at, track_id) > (?2, ?3) \
    ORDER BY played_at, track_id \
    LIMIT ?4";

/// Feedback and plays in a SQLite file.
#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens `url` (`sqlite://PATH`, `sqlite::memory:`), creating the file if missing, in WAL
    /// mode so ListFeedback reads do not block imports, and runs the migrations if `migrate`.
    pub async fn open(url: &str, migrate: bool) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(StoreError::Unavailable)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL is durable against a crash of this process in WAL mode; a power loss can
            // take the last committed batches, which a re-import (idempotent) restores.
            .synchronous(SqliteSynchronous::Normal)
            // A writer waits this long for another's lock before the call is UNAVAILABLE.
            .busy_timeout(ACQUIRE_TIMEOUT);
        let mut pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT);
        if url.contains(":memory:") || url.contains("mode=memory") {
            // An in-memory database lives as long as one connection to it: keep one open.
            pool = pool
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None);
        }
        let pool = pool
            .connect_with(options)
            .await
            .map_err(StoreError::Unavailable)?;
        if migrate {
            let mut migrator = sqlx::migrate!("./migrations/sqlite");
            // Safe despite the name: it is only dangerous when renaming the table of an
            // existing deployment, and this one has used this name from its first migration.
            migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
            migrator.run(&pool).await.map_err(StoreError::Migrate)?;
        }
        Ok(Self { pool })
    }

    /// The connection pool, for the other tables' modules (cache, jobs).
    pub(super) fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

impl ImportWriter for SqliteStore {
    fn upsert_feedback<'a>(
        &'a self,
        entries: &'a [Entry],
        now: SystemTime,
    ) -> BoxFuture<'a, Result<WriteCounts, StoreError>> {
        Box::pin(async move {
            let now = micros(now);
            let mut counts = WriteCounts::default();
            let mut tx = self.pool.begin().await.map_err(StoreError::Unavailable)?;
            for entry in entries {
                let rating = i64::from(entry.rating.unwrap_or(0));
                let created_at = entry.created_at.map(micros);
                let inserted = sqlx::query(INSERT_FEEDBACK)
                    .bind(&entry.id)
                    .bind(&entry.user_id)
                    .bind(&entry.text)
                    .bind(rating)
                    .bind(created_at)
                    .bind(&entry.source)
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::Unavailable)?
                    .rows_affected();
                if inserted == 1 {
                    counts.inserted += 1;
                    continue;
                }
                sqlx::query(UPDATE_FEEDBACK)
                    .bind(&entry.id)
                    .bind(&entry.user_id)
                    .bind(&entry.text)
                    .bind(rating)
                    .bind(created_at)
                    .bind(&entry.source)
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::Unavailable)?;
                counts.updated += 1;
            }
            // Dropping `tx` on an error above rolls the whole batch back.
            tx.commit().await.map_err(StoreError::Unavailable)?;
            Ok(counts)
        })
    }

    fn upsert_plays<'a>(
        &'a self,
        plays: &'a [ListeningRecord],
        now: SystemTime,
    ) -> BoxFuture<'a, Result<WriteCounts, StoreError>> {
        Box::pin(async move {
            let now = micros(now);
            let mut counts = WriteCounts::default();
            let mut tx = self.pool.begin().await.map_err(StoreError::Unavailable)?;
            for record in plays {
                let row = PlayRow::encode(record)?;
                let inserted = bind_play(sqlx::query(INSERT_PLAY), &row, now)
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::Unavailable)?
                    .rows_affected();
                if inserted == 1 {
                    counts.inserted += 1;
                    continue;
                }
                bind_play(sqlx::query(UPDATE_PLAY), &row, now)
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::Unavailable)?;
                counts.updated += 1;
            }
            tx.commit().await.map_err(StoreError::Unavailable)?;
            Ok(counts)
        })
    }
}

impl_feedback_reads!(SqliteStore);

/// Binds a play in the parameter order INSERT_PLAY and UPDATE_PLAY share.
fn bind_play<'q>(
    query: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>,
    row: &'q PlayRow<'q>,
    now: i64,
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments> {
    query
        .bind(row.user_id)
        .bind(row.track_id)
        .bind(row.played_at_us)
        .bind(row.track_name)
        .bind(row.artist)
        .bind(&row.genres)
        .bind(row.ms_played)
        .bind(row.skipped)
        .bind(row.duration_ms)
        .bind(&row.features)
        .bind(now)
}

fn decode(row: &SqliteRow) -> Result<(i64, Entry), StoreError> {
    let read = || -> Result<_, sqlx::Error> {
        Ok((
            row.try_get::<String, _>("id")?,
            row.try_get::<String, _>("user_id")?,
            row.try_get::<String, _>("text")?,
            row.try_get::<i64, _>("rating")?,
            row.try_get::<i64, _>("created_at")?,
            row.try_get::<String, _>("source")?,
        ))
    };
    let (id, user_id, text, rating, created_at, source) =
        read().map_err(|error| StoreError::Corrupt(error.to_string()))?;
    decode_entry(id, user_id, text, rating, created_at, source)
}
