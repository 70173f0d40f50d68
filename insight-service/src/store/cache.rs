//! The insight cache tables: finished summaries and per-chunk insights by content key, with
//! an expiry. Values are opaque text (JSON of the domain types, written by `crate::cache`);
//! the store only keeps them and forgets them when they expire.

use std::time::SystemTime;

use futures::future::BoxFuture;

use super::{PostgresStore, SqliteStore, StoreError, micros};

/// Which cache table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheTable {
    /// Whole summaries.
    Summary,
    /// Single chunk insights (the map step).
    Chunk,
}

/// Where cached insights are kept. Implementations must be safe to call concurrently.
pub trait CacheStore: Send + Sync {
    /// The value stored under `key` unless it expired by `now`.
    fn cache_get<'a>(
        &'a self,
        table: CacheTable,
        key: &'a str,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<Option<String>, StoreError>>;

    /// Stores `value` under `key` until `expires`, replacing what was there.
    fn cache_put<'a>(
        &'a self,
        table: CacheTable,
        key: &'a str,
        value: &'a str,
        now: SystemTime,
        expires: SystemTime,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Deletes every row of both tables that expired by `now`; returns how many.
    fn prune_cache(&self, now: SystemTime) -> BoxFuture<'_, Result<u64, StoreError>>;
}

/// The statements of one table, for one backend's placeholder syntax.
struct Statements {
    get: &'static str,
    put: &'static str,
    prune: &'static str,
}

/// The same SQL for both tables and both backends, spelled out so every statement is a
/// static string (no SQL assembled at run time). SQLite and PostgreSQL both accept `$N`
/// placeholders and `ON CONFLICT ... DO UPDATE`.
macro_rules! statements {
    ($table:literal) => {
        Statements {
            get: concat!(
                "SELECT value FROM ",
                $table,
                " WHERE key = $1 AND expires_at > $2"
            ),
            put: concat!(
                "INSERT INTO ",
                $table,
                " (key, value, created_at, expires_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value, \
                 created_at = excluded.created_at, expires_at = excluded.expires_at"
            ),
            prune: concat!("DELETE FROM ", $table, " WHERE expires_at <= $1"),
        }
    };
}

const SUMMARY: Statements = statements!("summary_cache");
const CHUNK: Statements = statements!("chunk_cache");

impl CacheTable {
    fn statements(self) -> &'static Statements {
        match self {
            Self::Summary => &SUMMARY,
            Self::Chunk => &CHUNK,
        }
    }
}

/// Implements [`CacheStore`] for a store type with a `pool()`: the SQL is shared, only the
/// pool type differs.
macro_rules! impl_cache_store {
    ($store:ty) => {
        impl CacheStore for $store {
            fn cache_get<'a>(
                &'a self,
                table: CacheTable,
                key: &'a str,
                now: SystemTime,
            ) -> BoxFuture<'a, Result<Option<String>, StoreError>> {
                Box::pin(async move {
                    sqlx::query_scalar::<_, String>(table.statements().get)
                        .bind(key)
                        .bind(micros(now))
                        .fetch_optional(self.pool())
                        .await
                        .map_err(StoreError::Unavailable)
                })
            }

            fn cache_put<'a>(
                &'a self,
                table: CacheTable,
                key: &'a str,
                value: &'a str,
                now: SystemTime,
                expires: SystemTime,
            ) -> BoxFuture<'a, Result<(), StoreError>> {
                Box::pin(async move {
                    sqlx::query(table.statements().put)
                        .bind(key)
                        .bind(value)
                        .bind(micros(now))
                        .bind(micros(expires))
                        .execute(self.pool())
                        .await
                        .map_err(StoreError::Unavailable)?;
                    Ok(())
                })
            }

            fn prune_cache(&self, now: SystemTime) -> BoxFuture<'_, Result<u64, StoreError>> {
                Box::pin(async move {
                    let mut pruned = 0;
                    for table in [CacheTable::Summary, CacheTable::Chunk] {
                        pruned += sqlx::query(table.statements().prune)
                            .bind(micros(now))
                            .execute(self.pool())
                            .await
                            .map_err(StoreError::Unavailable)?
                            .rows_affected();
                    }
                    Ok(pruned)
                })
            }
        }
    };
}

impl_cache_store!(SqliteStore);
impl_cache_store!(PostgresStore);
