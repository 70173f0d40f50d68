//! Alert history: every alert event is stored (SQLite by default, PostgreSQL for replicas that
//! share one history), listed newest first with keyset pagination, and pruned after the
//! retention period.
//!
//! The store sits behind the [`AlertStore`] trait. The server talks to it through two handles:
//! [`History`] answers `ListAlerts`, and [`HistoryWriter`] queues events for one background
//! task that connects (retrying while the database is unreachable), runs the migrations,
//! inserts and prunes. Alerting never waits on the database: a failed insert is logged and the
//! alert has been streamed all the same.

mod args;
mod postgres;
mod record;
mod sqlite;

use std::{
    fmt,
    sync::{Arc, OnceLock},
    time::{Duration, SystemTime},
};

use futures::future::BoxFuture;
use tokio::{sync::mpsc, task::JoinHandle};

pub use args::{Backend, DEFAULT_DATABASE_URL, DatabaseUrl, HistoryArgs};
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

use crate::alerts::{AlertEvent, Severity};

/// Page size when a request asks for 0.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// Largest page a request may ask for: bounds the memory and time of one answer.
pub const MAX_PAGE_SIZE: u32 = 1000;
/// How often old alerts are pruned (and once at start).
pub const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// Events queued for storing before new ones are dropped (and logged). Room for a long
/// outage's worth of alerts, which are rare; beyond that the database is not coming back soon.
pub const WRITE_QUEUE: usize = 1024;
/// How long a pool waits for a connection before the store counts as unavailable: long enough
/// for a busy database, short enough that ListAlerts answers UNAVAILABLE well within a
/// typical client deadline.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait between two connection attempts to an unreachable store.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(60);
/// How long the writer may take at shutdown to store what it has queued.
const FINISH_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the history could not answer or store.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// `page_size` above [`MAX_PAGE_SIZE`].
    #[error("page_size must be at most 1000 (0 = the default 100), got {0}")]
    PageSize(u32),
    /// A `page_token` this server did not issue.
    #[error(
        "page_token is malformed: pass back a next_page_token exactly as a previous \
         ListAlerts response returned it, or an empty one for the first page"
    )]
    PageToken,
    /// The store has not been reached since the server started, or none is configured.
    #[error("{reason}")]
    NotReady {
        /// Which, and which store (password hidden).
        reason: String,
    },
    /// The database failed or could not be reached.
    #[error("the alert history store is unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// The schema could not be brought up to date.
    #[error("cannot migrate the alert history schema: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    /// A stored row cannot be read back (edited by hand, or written by a newer version).
    #[error("stored alert event {event_id} cannot be read: {reason}")]
    Corrupt {
        /// The row's `event_id`.
        event_id: i64,
        /// What is wrong with it.
        reason: String,
    },
    /// An event could not be encoded for storing.
    #[error("cannot encode the alert for storing: {0}")]
    Encode(#[source] serde_json::Error),
}

/// Where a page ends: the (time, row id) of its last alert, which the next page starts after.
/// Keyset pagination stays correct and cheap however deep the client pages and however many
/// alerts arrive meanwhile, where an offset would skip or repeat rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageToken {
    at_us: i64,
    event_id: i64,
}

impl PageToken {
    const VERSION: &'static str = "v1";

    /// The opaque text handed to clients: a version tag and the two keys in hex.
    pub fn encode(&self) -> String {
        format!(
            "{}{:016x}{:016x}",
            Self::VERSION,
            self.at_us as u64,
            self.event_id as u64
        )
    }

    /// The token `text` encodes; [`HistoryError::PageToken`] for anything else.
    pub fn decode(text: &str) -> Result<Self, HistoryError> {
        let hex = text
            .strip_prefix(Self::VERSION)
            .filter(|hex| hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or(HistoryError::PageToken)?;
        let (at, id) = hex.split_at(16);
        let parse = |part: &str| {
            u64::from_str_radix(part, 16)
                .map(|value| value as i64)
                .map_err(|_| HistoryError::PageToken)
        };
        Ok(Self {
            at_us: parse(at)?,
            event_id: parse(id)?,
        })
    }
}

/// A validated `ListAlerts` request.
#[derive(Clone, Debug, PartialEq)]
pub struct ListQuery {
    /// Alerts per page, 1..=[`MAX_PAGE_SIZE`].
    pub page_size: u32,
    /// Continue after this position; `None` = the newest alert first.
    pub after: Option<PageToken>,
    /// Only alerts at or after this instant.
    pub since: Option<SystemTime>,
    /// Only alerts at or above this severity; `None` = all.
    pub min_severity: Option<Severity>,
}

impl ListQuery {
    /// Checks a request: `page_size` 0 takes [`DEFAULT_PAGE_SIZE`], above [`MAX_PAGE_SIZE`] is
    /// refused; an empty `page_token` starts at the newest alert.
    pub fn new(
        page_size: u32,
        page_token: &str,
        since: Option<SystemTime>,
        min_severity: Option<Severity>,
    ) -> Result<Self, HistoryError> {
        let page_size = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            size if size > MAX_PAGE_SIZE => return Err(HistoryError::PageSize(size)),
            size => size,
        };
        let after = match page_token {
            "" => None,
            token => Some(PageToken::decode(token)?),
        };
        Ok(Self {
            page_size,
            after,
            since,
            min_severity,
        })
    }

    /// The query's bounds as the SQL of both backends binds them.
    fn bounds(&self) -> Bounds {
        let after = self.after.unwrap_or(PageToken {
            at_us: i64::MAX,
            event_id: i64::MAX,
        });
        Bounds {
            since_us: self.since.map_or(i64::MIN, record::micros),
            min_severity: self.min_severity.map_or(0, record::severity_code),
            before_at_us: after.at_us,
            before_event_id: after.event_id,
            // One more than asked, to learn whether another page follows.
            limit: i64::from(self.page_size) + 1,
        }
    }
}

/// [`ListQuery`] flattened into the values the SQL binds.
#[derive(Clone, Copy, Debug)]
struct Bounds {
    since_us: i64,
    min_severity: i32,
    before_at_us: i64,
    before_event_id: i64,
    limit: i64,
}

/// A page of history, newest first.
#[derive(Clone, Debug, PartialEq)]
pub struct AlertPage {
    /// The alerts.
    pub alerts: Vec<AlertEvent>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<PageToken>,
}

impl AlertPage {
    /// A page from rows fetched with [`Bounds::limit`] (one more than the page size): the
    /// extra row only says that a next page exists.
    fn from_rows(mut rows: Vec<(i64, AlertEvent)>, page_size: u32) -> Self {
        let page_size = page_size as usize;
        let more = rows.len() > page_size;
        rows.truncate(page_size);
        let next = match rows.last() {
            Some((event_id, event)) if more => Some(PageToken {
                at_us: record::micros(event.at),
                event_id: *event_id,
            }),
            _ => None,
        };
        Self {
            alerts: rows.into_iter().map(|(_, event)| event).collect(),
            next,
        }
    }
}

/// Where alert events are kept. Implementations must be safe to call concurrently.
pub trait AlertStore: Send + Sync + fmt::Debug {
    /// Stores `event`. Storing the same (id, state) again keeps the first copy, so a retried
    /// insert cannot duplicate an event.
    fn insert<'a>(&'a self, event: &'a AlertEvent) -> BoxFuture<'a, Result<(), HistoryError>>;

    /// One page of events matching `query`, newest first (ties broken by insertion order,
    /// newest first).
    fn list<'a>(&'a self, query: &'a ListQuery) -> BoxFuture<'a, Result<AlertPage, HistoryError>>;

    /// Deletes the events older than `before`; returns how many.
    fn prune(&self, before: SystemTime) -> BoxFuture<'_, Result<u64, HistoryError>>;
}

/// Connects to the database `url` names, creating a SQLite file if missing, and brings its
/// schema up to date.
pub async fn open(url: &DatabaseUrl) -> Result<Arc<dyn AlertStore>, HistoryError> {
    Ok(match url.backend() {
        Backend::Sqlite => Arc::new(SqliteStore::open(url.expose()).await?),
        Backend::Postgres => Arc::new(PostgresStore::open(url.expose()).await?),
    })
}

/// Reads the history (for `ListAlerts`). Cheap to clone.
#[derive(Clone, Debug)]
pub struct History {
    store: Arc<OnceLock<Arc<dyn AlertStore>>>,
    /// The answer while there is no store: which database is not reachable yet (password
    /// hidden), or that none is configured.
    missing: Arc<str>,
}

impl History {
    /// A history answering from `store` at once (for tests and embedding).
    pub fn with_store(store: Arc<dyn AlertStore>) -> Self {
        let slot = OnceLock::new();
        let _ = slot.set(store);
        Self {
            store: Arc::new(slot),
            // Never shown: the slot is filled.
            missing: Arc::from("the in-process alert store is missing"),
        }
    }

    /// A history without a store, for servers embedded without alert history: every list
    /// answers [`HistoryError::NotReady`].
    pub fn none() -> Self {
        Self {
            store: Arc::new(OnceLock::new()),
            missing: Arc::from("this server keeps no alert history"),
        }
    }

    /// Starts the background task that connects to `args.database_url` (retrying while it is
    /// unreachable), prunes alerts older than `args.alert_retention` at start and every
    /// [`PRUNE_EVERY`], and stores what the returned writer queues.
    pub fn spawn(args: &HistoryArgs) -> (Self, HistoryWriter) {
        let url = args.database_url.clone();
        let connect = move || -> BoxFuture<'static, Result<Arc<dyn AlertStore>, HistoryError>> {
            let url = url.clone();
            Box::pin(async move { open(&url).await })
        };
        Self::spawn_with(args.database_url.to_string(), connect, args.alert_retention)
    }

    /// [`History::spawn`] with the connection made by `connect`, called until it succeeds
    /// (for stores other than the URL's, e.g. a test's failing store).
    pub fn spawn_with<F>(target: String, connect: F, retention: Duration) -> (Self, HistoryWriter)
    where
        F: FnMut() -> BoxFuture<'static, Result<Arc<dyn AlertStore>, HistoryError>>
            + Send
            + 'static,
    {
        let history = Self {
            store: Arc::new(OnceLock::new()),
            missing: Arc::from(format!(
                "the alert history store ({target}) is not reachable yet; retry later"
            )),
        };
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let task = tokio::spawn(maintain(connect, retention, Arc::clone(&history.store), rx));
        (history, HistoryWriter { tx, task })
    }

    /// One page of history; [`HistoryError::NotReady`] while the store has not been reached.
    pub async fn list(&self, query: &ListQuery) -> Result<AlertPage, HistoryError> {
        let store = self.store.get().ok_or_else(|| HistoryError::NotReady {
            reason: self.missing.to_string(),
        })?;
        store.list(query).await
    }

    /// Whether the store has been reached (and migrated).
    pub fn is_ready(&self) -> bool {
        self.store.get().is_some()
    }
}

/// Queues alert events for the background task that stores them.
#[derive(Debug)]
pub struct HistoryWriter {
    tx: mpsc::Sender<Arc<AlertEvent>>,
    task: JoinHandle<()>,
}

impl HistoryWriter {
    /// Queues `event` for storing without waiting; when [`WRITE_QUEUE`] events are already
    /// waiting (the store has been unreachable for long), the event is logged and dropped.
    pub fn record(&self, event: Arc<AlertEvent>) {
        if let Err(error) = self.tx.try_send(event) {
            let (mpsc::error::TrySendError::Full(event) | mpsc::error::TrySendError::Closed(event)) =
                error;
            tracing::error!(
                alert_id = %event.id,
                state = event.state.as_str(),
                queued = WRITE_QUEUE,
                "alert history queue is full or closed; this event was streamed but is not stored"
            );
        }
    }

    /// Stops accepting events and waits up to a few seconds for the queued ones to be stored.
    pub async fn finish(self) {
        let Self { tx, mut task } = self;
        drop(tx);
        if tokio::time::timeout(FINISH_TIMEOUT, &mut task)
            .await
            .is_err()
        {
            task.abort();
            tracing::warn!(
                "alert history did not store its queued events within 5s; they are lost"
            );
        }
    }
}

/// The background task behind [`History::spawn`].
async fn maintain<F>(
    mut connect: F,
    retention: Duration,
    slot: Arc<OnceLock<Arc<dyn AlertStore>>>,
    mut events: mpsc::Receiver<Arc<AlertEvent>>,
) where
    F: FnMut() -> BoxFuture<'static, Result<Arc<dyn AlertStore>, HistoryError>>,
{
    let mut delay = Duration::from_secs(1);
    let store = loop {
        // Events queue up meanwhile (bounded). The writer finishing (shutdown) ends the
        // attempts, also one in progress: a connection attempt can take the whole acquire
        // timeout, which would otherwise hold the server's exit.
        let attempt = tokio::select! {
            attempt = connect() => Some(attempt),
            () = events_closed(&events) => None,
        };
        let error = match attempt {
            Some(Ok(store)) => break store,
            Some(Err(error)) => error,
            None => return stopping_unconnected(),
        };
        tracing::warn!(
            %error,
            retry_in = %humantime::format_duration(delay),
            "alert history store unreachable; alerts still stream and are stored once it \
             is back"
        );
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = events_closed(&events) => return stopping_unconnected(),
        }
        delay = (delay * 2).min(MAX_RETRY_DELAY);
    };
    let _ = slot.set(Arc::clone(&store));
    tracing::info!("alert history store ready");

    // The first tick is immediate: prune at start, then every PRUNE_EVERY.
    let mut prune = tokio::time::interval(PRUNE_EVERY);
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(event) => insert(store.as_ref(), &event).await,
                None => return,
            },
            _ = prune.tick() => prune_once(store.as_ref(), retention).await,
        }
    }
}

fn stopping_unconnected() {
    tracing::warn!(
        "server stopping before the alert history store was reachable; queued alerts are \
         not stored"
    );
}

/// Resolves once every sender of `events` is gone. `Receiver` has no such future, and
/// receiving would take events out of the queue, so this polls; it only runs while waiting
/// to reconnect.
async fn events_closed(events: &mpsc::Receiver<Arc<AlertEvent>>) {
    while !events.is_closed() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn insert(store: &dyn AlertStore, event: &AlertEvent) {
    if let Err(error) = store.insert(event).await {
        tracing::error!(
            alert_id = %event.id,
            state = event.state.as_str(),
            %error,
            "cannot store alert event; it was streamed but is missing from the history"
        );
    }
}

async fn prune_once(store: &dyn AlertStore, retention: Duration) {
    // A retention reaching before the epoch leaves nothing to prune.
    let Some(before) = SystemTime::now().checked_sub(retention) else {
        return;
    };
    match store.prune(before).await {
        Ok(0) => {}
        Ok(deleted) => tracing::info!(
            deleted,
            retention = %humantime::format_duration(retention),
            "pruned old alert events"
        ),
        Err(error) => tracing::warn!(%error, "cannot prune old alert events; will retry"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[test]
    fn tokens_round_trip_and_reject_anything_else() {
        for token in [
            PageToken {
                at_us: 1_700_000_000_000_000,
                event_id: 42,
            },
            PageToken {
                at_us: -5,
                event_id: i64::MAX,
            },
        ] {
            assert_eq!(PageToken::decode(&token.encode()).unwrap(), token);
        }
        let good = PageToken {
            at_us: 1,
            event_id: 2,
        }
        .encode();
        for bad in [
            "x".to_owned(),
            "v1".to_owned(),
            good[..good.len() - 1].to_owned(),
            format!("{good}0"),
            good.replacen("v1", "v2", 1),
            good.replace('0', "g"),
            "v1+0000000000000000000000000000000".to_owned(),
            "v1ééééééééééééééé0".to_owned(),
        ] {
            assert!(
                matches!(PageToken::decode(&bad), Err(HistoryError::PageToken)),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn query_validation() {
        let query = ListQuery::new(0, "", None, None).unwrap();
        assert_eq!(query.page_size, DEFAULT_PAGE_SIZE);
        assert_eq!(query.after, None);
        assert_eq!(
            ListQuery::new(1000, "", None, None).unwrap().page_size,
            1000
        );
        let error = ListQuery::new(1001, "", None, None).unwrap_err();
        assert!(matches!(error, HistoryError::PageSize(1001)));
        assert!(error.to_string().contains("page_size"));
        let error = ListQuery::new(10, "nope", None, None).unwrap_err();
        assert!(error.to_string().contains("page_token"));
    }

    /// A store that is never reachable.
    #[derive(Debug)]
    struct Down;

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_store_answers_not_ready_and_the_writer_still_finishes() {
        let attempts = Arc::new(Mutex::new(0));
        let counted = Arc::clone(&attempts);
        let (history, writer) = History::spawn_with(
            "postgres://nowhere".to_owned(),
            move || -> BoxFuture<'static, Result<Arc<dyn AlertStore>, HistoryError>> {
                *counted.lock().unwrap() += 1;
                Box::pin(async {
                    Err::<Arc<dyn AlertStore>, _>(HistoryError::NotReady {
                        reason: format!("{Down:?}"),
                    })
                })
            },
            Duration::from_secs(60),
        );
        tokio::time::sleep(Duration::from_secs(10)).await;
        // 1 s, 2 s, 4 s between attempts: four in the first ten seconds.
        assert_eq!(*attempts.lock().unwrap(), 4);
        let query = ListQuery::new(0, "", None, None).unwrap();
        let error = history.list(&query).await.unwrap_err();
        assert!(error.to_string().contains("postgres://nowhere"), "{error}");
        assert!(!history.is_ready());
        let started = tokio::time::Instant::now();
        writer.finish().await;
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
