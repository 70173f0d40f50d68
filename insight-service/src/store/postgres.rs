//! The PostgreSQL store: one database shared by several replicas.

use std::{str::FromStr, time::SystemTime};

use futures::future::BoxFuture;
use sqlx::{
    Row as _,
    postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow},
};

use super::{
    ACQUIRE_TIMEOUT, FeedbackPage, FeedbackQuery, FeedbackStore, ImportWriter, ListeningRecord,
    PlayCursor, StoreError, WriteCounts,
    import::{PlayRow, StoredPlay, decode_entry},
    micros,
    sqlite::MIGRATIONS_TABLE,
};
use crate::domain::Entry;

/// Connections per replica: imports and lists of a few concurrent calls, without exhausting
/// the server's connection limit when several replicas share it.
const MAX_CONNECTIONS: u32 = 8;

// One atomic upsert; `xmax = 0` holds exactly for a row this statement inserted (an updated
// row carries the updating transaction's id), which tells inserts from updates even when
// replicas import the same ids at once. An entry without created_at keeps the time of its
// first import, so re-importing it does not move it in the ListFeedback order.
const UPSERT_FEEDBACK: &str = "\
    INSERT INTO feedback (id, user_id, text, rating, created_at, source, updated_at) \
    VALUES ($1, $2, $3, $4, COALESCE($5, $7), $6, $7) \
    ON CONFLICT (id) DO UPDATE SET user_id = EXCLUDED.user_id, text = EXCLUDED.text, \
        rating = EXCLUDED.rating, created_at = COALESCE($5, feedback.created_at), \
        source = EXCLUDED.source, updated_at = EXCLUDED.updated_at \
    RETURNING (xmax = 0) AS inserted";

const UPSERT_PLAY: &str = "\
    INSERT INTO listening_plays \
        (user_id, track_id, played_at, track_name, artist, genres, ms_played, skipped, \
         duration_ms, features, updated_at) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
    ON CONFLICT (user_id, track_id, played_at) DO UPDATE SET \
        track_name = EXCLUDED.track_name, artist = EXCLUDED.artist, genres = EXCLUDED.genres, \
        ms_played = EXCLUDED.ms_played, skipped = EXCLUDED.skipped, \
        duration_ms = EXCLUDED.duration_ms, features = EXCLUDED.features, \
        updated_at = EXCLUDED.updated_at \
    RETURNING (xmax = 0) AS inserted";

// COLLATE "C" orders ids bytewise, as SQLite does and as the indexes are built, whatever the
// database's default collation. Two static queries so the per-user one uses its index.
const LIST_ALL: &str = "\
    SELECT id, user_id, text, rating, created_at, source FROM feedback \
    WHERE created_at >= $1 AND created_at < $2 AND rating BETWEEN $3 AND $4 \
      AND ($5 = '' OR source = $5) AND (created_at, id COLLATE \"C\") > ($6, $7) \
    ORDER BY created_at, id COLLATE \"C\" \
    LIMIT $8";

const LIST_BY_USER: &str = "\
    SELECT id, user_id, text, rating, created_at, source FROM feedback \
    WHERE user_id = $9 AND created_at >= $1 AND created_at < $2 AND rating BETWEEN $3 AND $4 \
      AND ($5 = '' OR source = $5) AND (created_at, id COLLATE \"C\") > ($6, $7) \
    ORDER BY created_at, id COLLATE \"C\" \
    LIMIT $8";

// The same two, newest first (a summary of stored entries reads its most recent ones).
const LIST_ALL_DESC: &str = "\
    SELECT id, user_id, text, rating, created_at, source FROM feedback \
    WHERE created_at >= $1 AND created_at < $2 AND rating BETWEEN $3 AND $4 \
      AND ($5 = '' OR source = $5) AND (created_at, id COLLATE \"C\") < ($6, $7) \
    ORDER BY created_at DESC, id COLLATE \"C\" DESC \
    LIMIT $8";

const LIST_BY_USER_DESC: &str = "\
    SELECT id, user_id, text, rating, created_at, source FROM feedback \
    WHERE user_id = $9 AND created_at >= $1 AND created_at < $2 \
      AND rating BETWEEN $3 AND $4 \
      AND ($5 = '' OR source = $5) AND (created_at, id COLLATE \"C\") < ($6, $7) \
    ORDER BY created_at DESC, id COLLATE \"C\" DESC \
    LIMIT $8";

// ListFeedback's filters without the page position, for the `entries_skipped` of a selector
// summary; the same two shapes so each uses its index.
const COUNT_ALL: &str = "\
    SELECT COUNT(*) FROM feedback \
    WHERE created_at >= $1 AND created_at < $2 AND rating BETWEEN $3 AND $4 \
      AND ($5 = '' OR source = $5)";

const COUNT_BY_USER: &str = "\
    SELECT COUNT(*) FROM feedback \
    WHERE user_id = $6 AND created_at >= $1 AND created_at < $2 \
      AND rating BETWEEN $3 AND $4 AND ($5 = '' OR source = $5)";

// One user's plays in keyset order, for AnalyzeMusic of stored plays.
const LIST_PLAYS: &str = "\
    SELECT user_id, track_id, played_at, track_name, artist, genres, ms_played, skipped, \
        duration_ms, features FROM listening_plays \
    WHERE user_id = $1 AND (played_at, track_id COLLATE \"C\") > ($2, $3) \
    ORDER BY played_at, track_id COLLATE \"C\" \
    LIMIT $4";

/// Feedback and plays in a PostgreSQL database.
#[derive(Clone, Debug)]
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Connects to `url` (`postgres://USER@HOST[:PORT]/DB`) and runs the migrations if
    /// `migrate`; the database must exist.
    pub async fn open(url: &str, migrate: bool) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url).map_err(StoreError::Unavailable)?;
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(StoreError::Unavailable)?;
        if migrate {
            let mut migrator = sqlx::migrate!("./migrations/postgres");
            // See `MIGRATIONS_TABLE`; the name has been this one since the first migration.
            migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
            migrator.run(&pool).await.map_err(StoreError::Migrate)?;
        }
        Ok(Self { pool })
    }

    /// The connection pool, for the other tables' modules (cache, jobs).
    pub(super) fn pool(&self) -> &PgPool {
        &self.pool
    }
}

impl ImportWriter for PostgresStore {
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
                let row = sqlx::query(UPSERT_FEEDBACK)
                    .bind(&entry.id)
                    .bind(&entry.user_id)
                    .bind(&entry.text)
                    .bind(i16::from(entry.rating.unwrap_or(0)))
                    .bind(entry.created_at.map(micros))
                    .bind(&entry.source)
                    .bind(now)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(StoreError::Unavailable)?;
                count(&mut counts, &row)?;
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
                let play = PlayRow::encode(record)?;
                let row = sqlx::query(UPSERT_PLAY)
                    .bind(play.user_id)
                    .bind(play.track_id)
                    .bind(play.played_at_us)
                    .bind(play.track_name)
                    .bind(play.artist)
                    .bind(&play.genres)
                    .bind(play.ms_played)
                    .bind(play.skipped)
                    .bind(play.duration_ms)
                    .bind(&play.features)
                    .bind(now)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(StoreError::Unavailable)?;
                count(&mut counts, &row)?;
            }
            tx.commit().await.map_err(StoreError::Unavailable)?;
            Ok(counts)
        })
    }
}

impl_feedback_reads!(PostgresStore);

/// Adds an upsert's `RETURNING (xmax = 0) AS inserted` to `counts`.
fn count(counts: &mut WriteCounts, row: &PgRow) -> Result<(), StoreError> {
    let inserted: bool = row
        .try_get("inserted")
        .map_err(|error| StoreError::Corrupt(error.to_string()))?;
    if inserted {
        counts.inserted += 1;
    } else {
        counts.updated += 1;
    }
    Ok(())
}

fn decode(row: &PgRow) -> Result<(i64, Entry), StoreError> {
    let read = || -> Result<_, sqlx::Error> {
        Ok((
            row.try_get::<String, _>("id")?,
            row.try_get::<String, _>("user_id")?,
            row.try_get::<String, _>("text")?,
            row.try_get::<i16, _>("rating")?,
            row.try_get::<i64, _>("created_at")?,
            row.try_get::<String, _>("source")?,
        ))
    };
    let (id, user_id, text, rating, created_at, source) =
        read().map_err(|error| StoreError::Corrupt(error.to_string()))?;
    decode_entry(id, user_id, text, i64::from(rating), created_at, source)
}
