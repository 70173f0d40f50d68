//! The PostgreSQL alert store: one history shared by several replicas.

use std::{str::FromStr, time::SystemTime};

use futures::future::BoxFuture;
use sqlx::{
    Row as _,
    postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow},
};

use super::{
    ACQUIRE_TIMEOUT, AlertPage, AlertStore, HistoryError, ListQuery, record::Row,
    sqlite::MIGRATIONS_TABLE,
};
use crate::alerts::AlertEvent;

/// Connections per replica: inserts are rare and ListAlerts is an operator's tool, so a few
/// suffice and leave the server's connection slots to the services that need them.
const MAX_CONNECTIONS: u32 = 4;

const INSERT: &str = "\
    INSERT INTO monitor_alerts \
        (alert_id, state, at_us, severity, metric, value, threshold, message, \
         recommendations, sample) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10::jsonb) \
    ON CONFLICT (alert_id, state) DO NOTHING";

const LIST: &str = "\
    SELECT event_id, alert_id, state, at_us, severity, metric, value, threshold, message, \
           recommendations::text AS recommendations, sample::text AS sample \
    FROM monitor_alerts \
    WHERE at_us >= $1 AND severity >= $2 AND (at_us, event_id) < ($3, $4) \
    ORDER BY at_us DESC, event_id DESC \
    LIMIT $5";

const PRUNE: &str = "DELETE FROM monitor_alerts WHERE at_us < $1";

/// Alert history in a PostgreSQL database.
#[derive(Clone, Debug)]
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Connects to `url` (`postgres://USER@HOST[:PORT]/DB`) and runs the migrations; the
    /// database must exist.
    pub async fn open(url: &str) -> Result<Self, HistoryError> {
        let options = PgConnectOptions::from_str(url).map_err(HistoryError::Unavailable)?;
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(HistoryError::Unavailable)?;
        let mut migrator = sqlx::migrate!("./migrations/postgres");
        // See `MIGRATIONS_TABLE`; the name has been this one since the first migration.
        migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
        migrator.run(&pool).await.map_err(HistoryError::Migrate)?;
        Ok(Self { pool })
    }
}

impl AlertStore for PostgresStore {
    fn insert<'a>(&'a self, event: &'a AlertEvent) -> BoxFuture<'a, Result<(), HistoryError>> {
        Box::pin(async move {
            let row = Row::encode(event)?;
            sqlx::query(INSERT)
                .bind(row.alert_id)
                .bind(row.state)
                .bind(row.at_us)
                .bind(row.severity)
                .bind(row.metric)
                .bind(row.value)
                .bind(row.threshold)
                .bind(row.message)
                .bind(row.recommendations)
                .bind(row.sample)
                .execute(&self.pool)
                .await
                .map_err(HistoryError::Unavailable)?;
            Ok(())
        })
    }

    fn list<'a>(&'a self, query: &'a ListQuery) -> BoxFuture<'a, Result<AlertPage, HistoryError>> {
        Box::pin(async move {
            let bounds = query.bounds();
            let rows = sqlx::query(LIST)
                .bind(bounds.since_us)
                .bind(bounds.min_severity)
                .bind(bounds.before_at_us)
                .bind(bounds.before_event_id)
                .bind(bounds.limit)
                .fetch_all(&self.pool)
                .await
                .map_err(HistoryError::Unavailable)?;
            let events = rows.iter().map(decode).collect::<Result<Vec<_>, _>>()?;
            Ok(AlertPage::from_rows(events, query.page_size))
        })
    }

    fn prune(&self, before: SystemTime) -> BoxFuture<'_, Result<u64, HistoryError>> {
        Box::pin(async move {
            let done = sqlx::query(PRUNE)
                .bind(super::record::micros(before))
                .execute(&self.pool)
                .await
                .map_err(HistoryError::Unavailable)?;
            Ok(done.rows_affected())
        })
    }
}

fn decode(row: &PgRow) -> Result<(i64, AlertEvent), HistoryError> {
    let event_id: i64 = row.try_get("event_id").map_err(HistoryError::Unavailable)?;
    let read = || -> Result<Row, sqlx::Error> {
        Ok(Row {
            alert_id: row.try_get("alert_id")?,
            state: row.try_get("state")?,
            at_us: row.try_get("at_us")?,
            severity: row.try_get("severity")?,
            metric: row.try_get("metric")?,
            value: row.try_get("value")?,
            threshold: row.try_get("threshold")?,
            message: row.try_get("message")?,
            recommendations: row.try_get("recommendations")?,
            sample: row.try_get("sample")?,
        })
    };
    let fields = read().map_err(|error| HistoryError::Corrupt {
        event_id,
        reason: error.to_string(),
    })?;
    Ok((event_id, fields.decode(event_id)?))
}
