//! Alerts end to end: an in-process server on 127.0.0.1:0 samples a fixture cgroup v2 tree
//! whose files the test rewrites, and a tonic client sees the alerts on StreamAlerts and then
//! in ListAlerts.
#![allow(clippy::unwrap_used, missing_docs)]

use std::{
    fs,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use monitor_service::{
    alerts::AlertArgs,
    config::{ProbeArgs, ServeArgs},
    history::{DatabaseUrl, HistoryArgs},
};
use spotifai_proto::monitor::{
    self as pb, ListAlertsRequest, MemoryAlert, StreamAlertsRequest,
    memory_monitor_client::MemoryMonitorClient,
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{Code, Streaming, transport::Channel};

const LIMIT: u64 = 256 * 1024 * 1024;
const WAIT: Duration = Duration::from_secs(10);

/// A cgroup v2 tree with one group, /app, limited to 256 MiB.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let fixture = Self { dir };
        fixture.write("proc/self/cgroup", "0::/app\n");
        fixture.write("cgroup/cgroup.controllers", "memory\n");
        fixture.write("cgroup/app/memory.max", &format!("{LIMIT}\n"));
        fixture.write(
            "cgroup/app/memory.stat",
            "anon 230000000\nfile 10000000\ninactive_file 0\n",
        );
        fixture.write("cgroup/app/memory.current", &fixed(LIMIT / 10));
        fixture.write("cgroup/app/memory.events", &oom_line(0));
        fixture
    }

    fn write(&self, relative: &str, text: &str) {
        let path = self.dir.path().join(relative);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    /// Rewrites a file in place with content of the same length: the probe keeps its files
    /// open and re-reads them, so the file must stay the same inode and never be seen empty.
    fn rewrite(&self, relative: &str, text: &str) {
        let file = fs::OpenOptions::new()
            .write(true)
            .open(self.dir.path().join(relative))
            .unwrap();
        file.write_all_at(text.as_bytes(), 0).unwrap();
    }

    fn set_usage(&self, ratio: f64) {
        let bytes = (LIMIT as f64 * ratio) as u64;
        self.rewrite("cgroup/app/memory.current", &fixed(bytes));
    }

    fn set_oom_kills(&self, kills: u64) {
        self.rewrite("cgroup/app/memory.events", &oom_line(kills));
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }
}

fn fixed(bytes: u64) -> String {
    format!("{bytes:<20}\n")
}

fn oom_line(kills: u64) -> String {
    format!("oom 0\noom_kill {kills:<10}\n")
}

struct Server {
    channel: Channel,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), monitor_service::Error>>,
}

impl Server {
    /// Serves `fixture` at 100 ms with a 300 ms dwell, storing alerts at `database_url`.
    async fn start(fixture: &Fixture, database_url: &str) -> Self {
        let args = ServeArgs {
            default_interval: Duration::from_millis(100),
            shutdown_grace: Duration::from_secs(5),
            probe: ProbeArgs {
                proc_root: fixture.path("proc"),
                cgroup_root: fixture.path("cgroup"),
                ..ProbeArgs::default()
            },
            alerts: AlertArgs {
                dwell: Duration::from_millis(300),
                ..AlertArgs::default()
            },
            history: HistoryArgs {
                database_url: DatabaseUrl::parse(database_url).unwrap(),
                ..HistoryArgs::default()
            },
            ..ServeArgs::default()
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(monitor_service::run(listener, args, async {
            stopped.await.ok();
        }));
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Self {
            channel,
            stop: Some(stop),
            task,
        }
    }

    fn client(&self) -> MemoryMonitorClient<Channel> {
        MemoryMonitorClient::new(self.channel.clone())
    }

    async fn subscribe(&self, min_severity: pb::Severity) -> Streaming<MemoryAlert> {
        self.client()
            .stream_alerts(StreamAlertsRequest {
                min_severity: min_severity.into(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    async fn shut_down(mut self) {
        if let Some(stop) = self.stop.take() {
            stop.send(()).unwrap();
        }
        tokio::time::timeout(WAIT, self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

async fn next(stream: &mut Streaming<MemoryAlert>) -> MemoryAlert {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("no alert within 10s")
        .unwrap()
        .expect("the alert stream ended")
}

/// ListAlerts until it holds `count` alerts (the history stores in the background).
async fn history(server: &Server, count: usize) -> Vec<MemoryAlert> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let listed = server
            .client()
            .list_alerts(ListAlertsRequest::default())
            .await;
        if let Ok(page) = listed {
            let alerts = page.into_inner().alerts;
            if alerts.len() >= count {
                return alerts;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "history did not reach {count} alerts within 10s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("alerts.db").display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_fires_from_the_cgroup_streams_and_lands_in_the_history() {
    let fixture = Fixture::new();
    let db = tempfile::tempdir().unwrap();
    let server = Server::start(&fixture, &sqlite_url(db.path())).await;
    let mut critical = server.subscribe(pb::Severity::Critical).await;

    fixture.set_usage(0.95);
    let fired = next(&mut critical).await;
    assert_eq!(fired.state(), pb::AlertState::Firing);
    assert_eq!(fired.severity(), pb::Severity::Critical);
    assert_eq!(fired.metric, "usage_ratio");
    assert_eq!(fired.threshold, 0.9);
    assert!((fired.value - 0.95).abs() < 1e-6, "{fired:?}");
    assert_eq!(
        fired.message,
        "memory working set at 95% of the 256 MiB cgroup limit (critical ≥ 90%)"
    );
    assert!(
        fired
            .recommendations
            .iter()
            .any(|r| r.contains("process heap is the problem")),
        "{:?}",
        fired.recommendations
    );
    let sample = fired.sample.as_ref().unwrap();
    assert_eq!(sample.cgroup.as_ref().unwrap().path, "/app");
    assert_eq!(sample.level(), pb::Level::Critical);

    // Stored: the warning (which fired with it) and the critical, newest first.
    let stored = history(&server, 2).await;
    let stored_critical = stored
        .iter()
        .find(|alert| alert.id == fired.id)
        .expect("the critical alert is in the history");
    assert_eq!(stored_critical.state(), pb::AlertState::Firing);
    assert_eq!(stored_critical.message, fired.message);
    assert_eq!(stored_critical.recommendations, fired.recommendations);
    assert_eq!(
        stored_critical.sample.as_ref().unwrap().seq,
        fired.sample.as_ref().unwrap().seq
    );
    assert!(
        stored
            .iter()
            .any(|alert| alert.severity() == pb::Severity::Warning)
    );

    // A subscriber arriving now gets both firing alerts first, warning before critical.
    let mut late = server.subscribe(pb::Severity::Unspecified).await;
    let first = next(&mut late).await;
    let second = next(&mut late).await;
    assert_eq!(
        [first.severity(), second.severity()],
        [pb::Severity::Warning, pb::Severity::Critical]
    );
    assert_eq!(second.id, fired.id);

    // Back to 10%: the critical alert resolves under the same id.
    fixture.set_usage(0.10);
    let resolved = next(&mut critical).await;
    assert_eq!(resolved.state(), pb::AlertState::Resolved);
    assert_eq!(resolved.id, fired.id);
    assert!(
        resolved.message.contains("cleared below 85.5%"),
        "{resolved:?}"
    );

    // An OOM kill fires at once, critical.
    fixture.set_oom_kills(1);
    let oom = next(&mut critical).await;
    assert_eq!(oom.metric, "oom_kills");
    assert_eq!(oom.state(), pb::AlertState::Firing);
    assert_eq!((oom.value, oom.threshold), (1.0, 0.0));

    let stored = history(&server, 5).await;
    assert_eq!(stored[0].id, oom.id, "newest first");

    // Shutdown ends the endless alert streams with UNAVAILABLE, promptly.
    server.shut_down().await;
    let status = loop {
        match tokio::time::timeout(WAIT, critical.message())
            .await
            .unwrap()
        {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("alert stream ended with OK at shutdown"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_still_stream_when_the_history_store_is_unreachable() {
    let fixture = Fixture::new();
    // Nothing listens on port 1.
    let server = Server::start(&fixture, "postgres://postgres@127.0.0.1:1/nowhere").await;
    let mut alerts = server.subscribe(pb::Severity::Unspecified).await;
    fixture.set_usage(0.85);
    let fired = next(&mut alerts).await;
    assert_eq!(fired.severity(), pb::Severity::Warning);
    assert_eq!(fired.state(), pb::AlertState::Firing);

    let status = server
        .client()
        .list_alerts(ListAlertsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    server.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_min_severity_is_invalid_argument_naming_the_field() {
    let fixture = Fixture::new();
    let db = tempfile::tempdir().unwrap();
    let server = Server::start(&fixture, &sqlite_url(db.path())).await;
    let status = server
        .client()
        .stream_alerts(StreamAlertsRequest { min_severity: 9 })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("min_severity"), "{status:?}");
    server.shut_down().await;
}

#[test]
fn serve_help_documents_every_alert_flag_and_variable() {
    let output = Command::new(env!("CARGO_BIN_EXE_monitor-service"))
        .args(["serve", "--help"])
        .env("MONITOR_DATABASE_URL", "postgres://app:s3cret@db/alerts")
        .output()
        .unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    for word in [
        "--warn-psi",
        "MONITOR_WARN_PSI",
        "--critical-psi",
        "MONITOR_CRITICAL_PSI",
        "--hysteresis",
        "MONITOR_HYSTERESIS",
        "--dwell",
        "MONITOR_DWELL",
        "--database-url",
        "MONITOR_DATABASE_URL",
        "sqlite://monitor-alerts.db",
        "--alert-retention",
        "MONITOR_ALERT_RETENTION",
        "Alerts:",
        "Alert history:",
    ] {
        assert!(text.contains(word), "serve --help lacks {word}: {text}");
    }
    assert!(
        !text.contains("s3cret"),
        "--help shows the database password: {text}"
    );
}

#[test]
fn bad_alert_flags_are_usage_errors_naming_the_flag() {
    for (args, flag) in [
        (&["--warn-psi", "30"][..], "--warn-psi"),
        (&["--database-url", "mysql://db/x"][..], "--database-url"),
        (&["--alert-retention", "0s"][..], "--alert-retention"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_monitor-service"))
            .arg("serve")
            .args(args)
            .env_remove("MONITOR_CRITICAL_PSI")
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
