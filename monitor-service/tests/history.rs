//! `ListAlerts` through the gRPC adapter on both alert stores: SQLite in a temporary file and
//! the machine's PostgreSQL (127.0.0.1:5432, user postgres), each test in a database of its own.
//!
//! Without PostgreSQL the PostgreSQL tests print `SKIP: <reason>` and pass, except under CI
//! (env `CI` set), where they fail: CI must exercise both backends.
#![allow(clippy::unwrap_used, missing_docs)]

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, SystemTime},
};

use monitor_service::{
    alerts::{AlertEvent, AlertHub, AlertState, Metric, Severity},
    grpc::MonitorGrpc,
    history::{self, AlertStore, DatabaseUrl, History, HistoryArgs},
    probe::{CgroupMem, CgroupVersion, Level, Probe, ProbeConfig, ProcessMem, Sample, SystemMem},
    sampler::Sampler,
};
use spotifai_proto::monitor::{
    self as pb, ListAlertsRequest, ListAlertsResponse, MemoryAlert,
    memory_monitor_server::MemoryMonitor,
};
use sqlx::{Connection, PgConnection};
use tonic::{Code, Request, Status};

const ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const DAY: Duration = Duration::from_secs(24 * 3600);

/// A store in a database of its own, removed when dropped.
struct TestDb {
    store: Arc<dyn AlertStore>,
    url: DatabaseUrl,
    _guard: Guard,
}

/// Removes a test database when dropped, also when the test panics.
enum Guard {
    Sqlite { _dir: tempfile::TempDir },
    Postgres { name: String },
}

impl Drop for Guard {
    fn drop(&mut self) {
        let Self::Postgres { name } = self else {
            return;
        };
        // Drop cannot await, so a thread with its own runtime removes the database (FORCE
        // closes the store's pooled connections).
        let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                if let Ok(mut admin) = PgConnection::connect(ADMIN_URL).await {
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(drop))
                        .execute(&mut admin)
                        .await;
                }
            });
        })
        .join();
    }
}

async fn sqlite_db() -> TestDb {
    let dir = tempfile::tempdir().unwrap();
    let url = DatabaseUrl::parse(&format!(
        "sqlite://{}",
        dir.path().join("alerts.db").display()
    ))
    .unwrap();
    let store = history::open(&url).await.unwrap();
    TestDb {
        store,
        url,
        _guard: Guard::Sqlite { _dir: dir },
    }
}

/// A fresh PostgreSQL database, or `None` (after printing why) when PostgreSQL does not
/// answer outside CI.
async fn postgres_db() -> Option<TestDb> {
    let connect = tokio::time::timeout(Duration::from_secs(10), PgConnection::connect(ADMIN_URL));
    let mut admin = match connect.await {
        Ok(Ok(admin)) => admin,
        Ok(Err(error)) => return skip_or_fail(&error.to_string()),
        Err(_) => return skip_or_fail("no answer within 10s"),
    };
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let name = format!(
        "monitor_test_{}_{nanos}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .unwrap();
    let guard = Guard::Postgres { name: name.clone() };
    let url = DatabaseUrl::parse(&format!("postgres://postgres@127.0.0.1:5432/{name}")).unwrap();
    let store = history::open(&url).await.unwrap();
    Some(TestDb {
        store,
        url,
        _guard: guard,
    })
}

fn skip_or_fail(reason: &str) -> Option<TestDb> {
    assert!(
        std::env::var_os("CI").is_none(),
        "PostgreSQL at {ADMIN_URL} must answer under CI: {reason}"
    );
    eprintln!("SKIP: PostgreSQL at {ADMIN_URL} is not available: {reason}");
    None
}

/// Runs `body` on SQLite and on PostgreSQL, one test each.
macro_rules! on_both_stores {
    ($body:ident) => {
        mod $body {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let db = super::sqlite_db().await;
                super::$body(&db).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let Some(db) = super::postgres_db().await else {
                    return;
                };
                super::$body(&db).await;
            }
        }
    };
}

on_both_stores!(pagination_walks_every_alert_once_newest_first);
on_both_stores!(filters_by_since_and_min_severity);
on_both_stores!(listed_alerts_keep_everything_the_event_had);
on_both_stores!(bad_requests_are_invalid_argument_naming_the_field);
on_both_stores!(retention_prunes_old_rows_at_start);
on_both_stores!(inserting_an_event_twice_stores_it_once);

fn sample(seq: u64, at: SystemTime) -> Sample {
    Sample {
        seq,
        at,
        process: ProcessMem {
            pid: 42,
            rss_bytes: 200 << 20,
            virtual_bytes: 900 << 20,
        },
        targets: vec![ProcessMem {
            pid: 43,
            rss_bytes: 1 << 20,
            virtual_bytes: 2 << 20,
        }],
        cgroup: Some(CgroupMem {
            version: CgroupVersion::V2,
            path: "/kubepods/pod1/app".into(),
            current_bytes: 250 << 20,
            max_bytes: 256 << 20,
            working_set_bytes: 240 << 20,
            anon_bytes: 230 << 20,
            file_bytes: 20 << 20,
            inactive_file_bytes: 10 << 20,
            oom_kills: 1,
            pressure_some_avg10: Some(12.25),
            pressure_full_avg10: None,
        }),
        system: SystemMem {
            total_bytes: 16 << 30,
            available_bytes: 8 << 30,
            swap_total_bytes: 0,
            swap_used_bytes: 0,
        },
        usage_ratio: 0.9375,
        level: Level::Critical,
    }
}

fn event(n: u64, at: SystemTime, severity: Severity, state: AlertState) -> AlertEvent {
    AlertEvent {
        id: format!("usage_ratio-{severity}-test-{n}"),
        at,
        severity,
        state,
        metric: Metric::UsageRatio,
        value: 0.9375,
        threshold: 0.9,
        message: format!("event {n}: memory working set at 94% (critical ≥ 90%) — “quoted”"),
        recommendations: vec![
            "reduce concurrency: lower insight-service --max-concurrency".to_owned(),
            format!("line with 'quotes' and \"doubles\" {n}"),
        ],
        sample: Arc::new(sample(n, at)),
    }
}

fn adapter(store: &Arc<dyn AlertStore>) -> MonitorGrpc {
    let sampler = Sampler::new(Probe::new(ProbeConfig::default()), Duration::from_secs(1));
    MonitorGrpc::new(sampler).with_alerts(AlertHub::new(), History::with_store(Arc::clone(store)))
}

async fn list(
    grpc: &MonitorGrpc,
    request: ListAlertsRequest,
) -> Result<ListAlertsResponse, Status> {
    grpc.list_alerts(Request::new(request))
        .await
        .map(tonic::Response::into_inner)
}

/// Every page of `request`'s listing.
async fn walk(grpc: &MonitorGrpc, request: ListAlertsRequest) -> Vec<Vec<MemoryAlert>> {
    let mut pages = Vec::new();
    let mut token = request.page_token.clone();
    loop {
        let page = list(
            grpc,
            ListAlertsRequest {
                page_token: token.clone(),
                ..request.clone()
            },
        )
        .await
        .unwrap();
        pages.push(page.alerts);
        if page.next_page_token.is_empty() {
            return pages;
        }
        assert_ne!(page.next_page_token, token, "the token must move on");
        token = page.next_page_token;
    }
}

fn micros(timestamp: &Option<prost_types::Timestamp>) -> i128 {
    let timestamp = timestamp.as_ref().unwrap();
    i128::from(timestamp.seconds) * 1_000_000 + i128::from(timestamp.nanos / 1000)
}

async fn pagination_walks_every_alert_once_newest_first(db: &TestDb) {
    let base = SystemTime::now() - Duration::from_secs(3600);
    // 230 events; each three in a row share one instant, so ties must be broken too.
    let mut inserted = HashSet::new();
    for n in 0..230u64 {
        let at = base + Duration::from_millis(n - n % 3);
        let state = if n % 2 == 0 {
            AlertState::Firing
        } else {
            AlertState::Resolved
        };
        let event = event(n, at, Severity::Critical, state);
        inserted.insert((event.id.clone(), pb::AlertState::from(state) as i32));
        db.store.insert(&event).await.unwrap();
    }
    let grpc = adapter(&db.store);
    let pages = walk(
        &grpc,
        ListAlertsRequest {
            page_size: 7,
            ..ListAlertsRequest::default()
        },
    )
    .await;
    assert_eq!(pages.len(), 33, "230 alerts in pages of 7");
    assert!(pages.iter().all(|page| page.len() <= 7));
    let alerts: Vec<MemoryAlert> = pages.into_iter().flatten().collect();
    let seen: HashSet<(String, i32)> = alerts.iter().map(|a| (a.id.clone(), a.state)).collect();
    assert_eq!(alerts.len(), 230, "each alert exactly once");
    assert_eq!(seen, inserted);
    let times: Vec<i128> = alerts.iter().map(|a| micros(&a.at)).collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "newest first");
    // Within one instant, the later insert first: 228 and 229 share the newest one.
    assert_eq!(alerts[0].sample.as_ref().unwrap().seq, 229);
    assert_eq!(alerts[1].sample.as_ref().unwrap().seq, 228);

    // page_size 0 means 100.
    let first = list(&grpc, ListAlertsRequest::default()).await.unwrap();
    assert_eq!(first.alerts.len(), 100);
    assert!(!first.next_page_token.is_empty());
    // An exact fit leaves no token pointing at an empty page.
    let whole = list(
        &grpc,
        ListAlertsRequest {
            page_size: 230,
            ..ListAlertsRequest::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(whole.alerts.len(), 230);
    assert_eq!(whole.next_page_token, "");

    // Alerts arriving while a client pages do not shift the pages it has yet to read.
    let page = list(
        &grpc,
        ListAlertsRequest {
            page_size: 50,
            ..ListAlertsRequest::default()
        },
    )
    .await
    .unwrap();
    db.store
        .insert(&event(
            999,
            SystemTime::now(),
            Severity::Critical,
            AlertState::Firing,
        ))
        .await
        .unwrap();
    let rest = walk(
        &grpc,
        ListAlertsRequest {
            page_size: 1000,
            page_token: page.next_page_token,
            ..ListAlertsRequest::default()
        },
    )
    .await;
    let rest: Vec<MemoryAlert> = rest.into_iter().flatten().collect();
    assert_eq!(rest.len(), 180);
    assert_eq!(rest[0].id, alerts[50].id);
}

async fn filters_by_since_and_min_severity(db: &TestDb) {
    let now = SystemTime::now();
    for n in 0..40u64 {
        let severity = if n % 4 == 0 {
            Severity::Critical
        } else {
            Severity::Warning
        };
        let at = now - Duration::from_secs(40 - n) * 60;
        db.store
            .insert(&event(n, at, severity, AlertState::Firing))
            .await
            .unwrap();
    }
    let grpc = adapter(&db.store);
    let all = |request| async {
        walk(&grpc, request)
            .await
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
    };

    let critical = all(ListAlertsRequest {
        page_size: 3,
        min_severity: pb::Severity::Critical.into(),
        ..ListAlertsRequest::default()
    })
    .await;
    assert_eq!(critical.len(), 10);
    assert!(
        critical
            .iter()
            .all(|a| a.severity() == pb::Severity::Critical)
    );

    let warning_and_up = all(ListAlertsRequest {
        min_severity: pb::Severity::Warning.into(),
        ..ListAlertsRequest::default()
    })
    .await;
    assert_eq!(warning_and_up.len(), 40);

    // The last 10 minutes hold n = 30..=39 (since is inclusive: n = 30 is exactly at it).
    let since = now - Duration::from_secs(600);
    let recent = all(ListAlertsRequest {
        page_size: 4,
        since: Some(since.into()),
        ..ListAlertsRequest::default()
    })
    .await;
    let seqs: Vec<u64> = recent
        .iter()
        .map(|a| a.sample.as_ref().unwrap().seq)
        .collect();
    assert_eq!(seqs, (30..40).rev().collect::<Vec<_>>());

    let recent_critical = all(ListAlertsRequest {
        page_size: 1,
        since: Some(since.into()),
        min_severity: pb::Severity::Critical.into(),
        ..ListAlertsRequest::default()
    })
    .await;
    let seqs: Vec<u64> = recent_critical
        .iter()
        .map(|a| a.sample.as_ref().unwrap().seq)
        .collect();
    assert_eq!(seqs, vec![36, 32]);
}

async fn listed_alerts_keep_everything_the_event_had(db: &TestDb) {
    // Microseconds: what both stores keep of an instant.
    let at = SystemTime::UNIX_EPOCH + Duration::from_micros(1_750_000_000_123_456);
    let event = event(7, at, Severity::Warning, AlertState::Resolved);
    db.store.insert(&event).await.unwrap();
    let grpc = adapter(&db.store);
    let page = list(&grpc, ListAlertsRequest::default()).await.unwrap();
    assert_eq!(page.alerts, vec![MemoryAlert::from(&event)]);
    let alert = &page.alerts[0];
    assert_eq!(alert.state(), pb::AlertState::Resolved);
    assert_eq!(alert.metric, "usage_ratio");
    let cgroup = alert.sample.as_ref().unwrap().cgroup.as_ref().unwrap();
    assert_eq!(cgroup.pressure_some_avg10, 12.25);
    assert_eq!(cgroup.path, "/kubepods/pod1/app");
}

async fn bad_requests_are_invalid_argument_naming_the_field(db: &TestDb) {
    let grpc = adapter(&db.store);
    for (request, field) in [
        (
            ListAlertsRequest {
                page_token: "garbage".to_owned(),
                ..ListAlertsRequest::default()
            },
            "page_token",
        ),
        (
            ListAlertsRequest {
                page_token: format!("v1{}", "z".repeat(32)),
                ..ListAlertsRequest::default()
            },
            "page_token",
        ),
        (
            ListAlertsRequest {
                page_size: 1001,
                ..ListAlertsRequest::default()
            },
            "page_size",
        ),
        (
            ListAlertsRequest {
                min_severity: 7,
                ..ListAlertsRequest::default()
            },
            "min_severity",
        ),
        (
            ListAlertsRequest {
                since: Some(prost_types::Timestamp {
                    seconds: i64::MAX,
                    nanos: 0,
                }),
                ..ListAlertsRequest::default()
            },
            "since",
        ),
        (
            ListAlertsRequest {
                since: Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: -1,
                }),
                ..ListAlertsRequest::default()
            },
            "since",
        ),
    ] {
        let status = list(&grpc, request.clone()).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{request:?}: {status:?}"
        );
        assert!(status.message().contains(field), "{request:?}: {status:?}");
    }
    // The largest page is fine.
    list(
        &grpc,
        ListAlertsRequest {
            page_size: 1000,
            ..ListAlertsRequest::default()
        },
    )
    .await
    .unwrap();
}

async fn retention_prunes_old_rows_at_start(db: &TestDb) {
    let now = SystemTime::now();
    for (n, age) in [
        (1, 10 * DAY),
        (2, 8 * DAY),
        (3, 6 * DAY),
        (4, Duration::ZERO),
    ] {
        db.store
            .insert(&event(n, now - age, Severity::Warning, AlertState::Firing))
            .await
            .unwrap();
    }
    assert_eq!(db.store.prune(now - 9 * DAY).await.unwrap(), 1);

    // The server's history prunes with the default 7 days as soon as it is connected.
    let (history, writer) = History::spawn(&HistoryArgs {
        database_url: db.url.clone(),
        ..HistoryArgs::default()
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let grpc = MonitorGrpc::new(Sampler::new(
        Probe::new(ProbeConfig::default()),
        Duration::from_secs(1),
    ))
    .with_alerts(AlertHub::new(), history);
    let seqs = loop {
        if let Ok(page) = list(&grpc, ListAlertsRequest::default()).await {
            let seqs: Vec<u64> = page
                .alerts
                .iter()
                .map(|a| a.sample.as_ref().unwrap().seq)
                .collect();
            if seqs.len() == 2 {
                break seqs;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not pruned within 10s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(seqs, vec![4, 3]);
    writer.finish().await;
}

async fn inserting_an_event_twice_stores_it_once(db: &TestDb) {
    let event = event(1, SystemTime::now(), Severity::Critical, AlertState::Firing);
    db.store.insert(&event).await.unwrap();
    db.store.insert(&event).await.unwrap();
    let resolved = AlertEvent {
        state: AlertState::Resolved,
        ..event.clone()
    };
    db.store.insert(&resolved).await.unwrap();
    let page = list(&adapter(&db.store), ListAlertsRequest::default())
        .await
        .unwrap();
    let states: Vec<_> = page
        .alerts
        .iter()
        .map(|a| (a.id.clone(), a.state()))
        .collect();
    assert_eq!(
        states,
        vec![
            (event.id.clone(), pb::AlertState::Resolved),
            (event.id.clone(), pb::AlertState::Firing)
        ]
    );
}

#[tokio::test]
async fn an_unreachable_store_is_unavailable_not_internal() {
    // Nothing listens on port 1; the history keeps retrying in the background.
    let (history, writer) = History::spawn(&HistoryArgs {
        database_url: DatabaseUrl::parse("postgres://postgres:secret@127.0.0.1:1/nowhere").unwrap(),
        ..HistoryArgs::default()
    });
    let grpc = MonitorGrpc::new(Sampler::new(
        Probe::new(ProbeConfig::default()),
        Duration::from_secs(1),
    ))
    .with_alerts(AlertHub::new(), history);
    let status = list(&grpc, ListAlertsRequest::default()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("not reachable"), "{status:?}");
    assert!(!status.message().contains("secret"), "{status:?}");
    writer.finish().await;
}

#[tokio::test]
async fn a_store_that_fails_after_opening_is_unavailable() {
    let db = sqlite_db().await;
    let path = db
        .url
        .to_string()
        .trim_start_matches("sqlite://")
        .to_owned();
    let mut raw = sqlx::SqliteConnection::connect(&format!("sqlite://{path}"))
        .await
        .unwrap();
    sqlx::raw_sql("DROP TABLE monitor_alerts")
        .execute(&mut raw)
        .await
        .unwrap();
    let status = list(&adapter(&db.store), ListAlertsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

#[tokio::test]
async fn a_corrupt_row_is_data_loss_naming_it() {
    let db = sqlite_db().await;
    db.store
        .insert(&event(
            1,
            SystemTime::now(),
            Severity::Warning,
            AlertState::Firing,
        ))
        .await
        .unwrap();
    let path = db
        .url
        .to_string()
        .trim_start_matches("sqlite://")
        .to_owned();
    let mut raw = sqlx::SqliteConnection::connect(&format!("sqlite://{path}"))
        .await
        .unwrap();
    sqlx::raw_sql("UPDATE monitor_alerts SET sample = 'not json'")
        .execute(&mut raw)
        .await
        .unwrap();
    let status = list(&adapter(&db.store), ListAlertsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    assert!(status.message().contains("event 1"), "{status:?}");
}

#[tokio::test]
async fn the_sqlite_file_is_created_in_wal_mode() {
    let db = sqlite_db().await;
    let path = db
        .url
        .to_string()
        .trim_start_matches("sqlite://")
        .to_owned();
    assert!(std::path::Path::new(&path).is_file());
    let mut raw = sqlx::SqliteConnection::connect(&format!("sqlite://{path}"))
        .await
        .unwrap();
    let (mode,): (String,) = sqlx::query_as("PRAGMA journal_mode")
        .fetch_one(&mut raw)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    // Opening again (a restart) finds the schema migrated and keeps the rows.
    db.store
        .insert(&event(
            1,
            SystemTime::now(),
            Severity::Warning,
            AlertState::Firing,
        ))
        .await
        .unwrap();
    let again = history::open(&db.url).await.unwrap();
    let page = list(&adapter(&again), ListAlertsRequest::default())
        .await
        .unwrap();
    assert_eq!(page.alerts.len(), 1);
}
