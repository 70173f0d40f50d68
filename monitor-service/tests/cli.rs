//! The `monitor-service` binary as a user runs it: `check`, `watch` (local and against a real
//! server process), `alerts`, their `--help`, and their usage errors.
#![allow(clippy::unwrap_used, missing_docs)]

use std::{
    io::{BufRead, BufReader, Read},
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

const BIN: &str = env!("CARGO_BIN_EXE_monitor-service");

/// The binary with `args` and a clean environment: the tests assert on defaults, so a
/// developer's MONITOR_* settings (or NO_COLOR) must not leak in.
fn command(args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command.args(args);
    for (name, _) in std::env::vars() {
        if name.starts_with("MONITOR_") || name == "NO_COLOR" {
            command.env_remove(name);
        }
    }
    command
}

fn run(args: &[&str]) -> Output {
    output_within(command(args), Duration::from_secs(60))
}

/// Runs `command` to completion, failing the test instead of hanging if it takes longer
/// than `limit`.
fn output_within(mut command: Command, limit: Duration) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read both pipes on threads, so a chatty child never blocks on a full pipe.
    let stdout = drain(child.stdout.take().unwrap());
    let stderr = drain(child.stderr.take().unwrap());
    let status = wait_within(&mut child, limit);
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        pipe.read_to_end(&mut bytes).unwrap();
        bytes
    })
}

fn wait_within(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("monitor-service did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

/// `monitor-service serve` as a real process on an ephemeral loopback port; killed on drop.
struct Server {
    child: Child,
    url: String,
    /// The server's working directory, so files it creates by default (the SQLite alert
    /// history) land in a temporary directory and not in the source tree.
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts the server with `extra` flags and waits for its JSON "listening" log line,
    /// whose `addr` field says where it listens (it bound 127.0.0.1:0 first, so there is no
    /// race to connect).
    fn start(extra: &[&str]) -> Server {
        let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--log-format", "json"];
        args.extend_from_slice(extra);
        let dir = tempfile::tempdir().unwrap();
        let mut child = command(&args)
            .current_dir(dir.path())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (lines, received) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[server] {line}");
                // Keep draining after the test stopped listening, so the server never
                // blocks on a full pipe.
                let _ = lines.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = received.recv_timeout(left) else {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the server did not log its address");
            };
            if let Ok(json) = serde_json::from_str::<serde_json::Value>(&line)
                && let Some(addr) = json.get("addr").and_then(|addr| addr.as_str())
            {
                let url = format!("http://{addr}");
                return Server {
                    child,
                    url,
                    _dir: dir,
                };
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The lines of a `watch` table after its header, checking the header is there once.
fn table_rows(text: &str) -> Vec<&str> {
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    for column in [
        "TIME",
        "SEQ",
        "RSS MiB",
        "CGROUP WS/LIMIT MiB",
        "USAGE",
        "PSI",
        "LEVEL",
    ] {
        assert!(header.contains(column), "header lacks {column}: {text}");
    }
    let rows: Vec<&str> = lines.collect();
    assert!(rows.iter().all(|row| !row.starts_with("TIME")), "{text}");
    rows
}

/// The `seq` of each JSON line, checking every line parses and has the `check --json` shape.
fn json_seqs(text: &str) -> Vec<u64> {
    text.lines()
        .map(|line| {
            let sample: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|error| panic!("not JSON ({error}): {line}"));
            for key in [
                "seq",
                "at",
                "process",
                "targets",
                "cgroup",
                "system",
                "usage_ratio",
            ] {
                assert!(sample.get(key).is_some(), "{key} missing: {line}");
            }
            assert!(["ok", "warning", "critical"].contains(&sample["level"].as_str().unwrap()));
            sample["seq"].as_u64().unwrap()
        })
        .collect()
}

fn assert_increasing(seqs: &[u64]) {
    assert!(seqs.windows(2).all(|pair| pair[0] < pair[1]), "{seqs:?}");
}

#[test]
fn check_json_is_one_json_object_with_real_figures() {
    let output = run(&["check", "--json"]);
    assert!(output.status.success(), "{output:?}");
    let text = stdout(&output);
    assert_eq!(text.lines().count(), 1, "{text}");
    let sample: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(
        sample["process"]["rss_bytes"].as_u64().unwrap() > 0,
        "{sample}"
    );
    assert!(
        sample["system"]["total_bytes"].as_u64().unwrap() > 0,
        "{sample}"
    );
    assert_eq!(sample["seq"], 1);
    assert!(["ok", "warning", "critical"].contains(&sample["level"].as_str().unwrap()));
}

#[test]
fn check_prints_a_table_in_mib() {
    let output = run(&["check"]);
    assert!(output.status.success(), "{output:?}");
    let text = stdout(&output);
    assert!(text.contains("MiB"), "{text}");
    assert!(text.contains("process rss"), "{text}");
    assert!(text.contains("usage ratio"), "{text}");
}

#[test]
fn check_on_an_empty_tree_still_reports() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap();
    let output = run(&[
        "check",
        "--json",
        "--proc-root",
        root,
        "--cgroup-root",
        root,
    ]);
    assert!(output.status.success(), "{output:?}");
    let sample: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(sample["process"]["rss_bytes"], 0);
    assert_eq!(sample["cgroup"], serde_json::Value::Null);
}

#[test]
fn help_lists_the_commands() {
    let output = run(&["--help"]);
    assert!(output.status.success());
    let text = stdout(&output);
    for word in ["serve", "check", "watch", "alerts", "--help", "--version"] {
        assert!(text.contains(word), "--help lacks {word}: {text}");
    }
}

#[test]
fn serve_help_mentions_every_flag_and_variable() {
    let output = run(&["serve", "--help"]);
    assert!(output.status.success());
    let text = stdout(&output);
    for word in [
        "--listen",
        "MONITOR_LISTEN",
        "--default-interval",
        "MONITOR_DEFAULT_INTERVAL",
        "--proc-root",
        "MONITOR_PROC_ROOT",
        "--cgroup-root",
        "MONITOR_CGROUP_ROOT",
        "--pid",
        "MONITOR_PIDS",
        "--warn-ratio",
        "MONITOR_WARN_RATIO",
        "--critical-ratio",
        "MONITOR_CRITICAL_RATIO",
        "--shutdown-grace",
        "MONITOR_SHUTDOWN_GRACE",
        "--log-format",
        "MONITOR_LOG_FORMAT",
    ] {
        assert!(text.contains(word), "serve --help lacks {word}: {text}");
    }
}

#[test]
fn check_help_mentions_every_flag() {
    let output = run(&["check", "--help"]);
    assert!(output.status.success());
    let text = stdout(&output);
    for word in [
        "--json",
        "--proc-root",
        "--cgroup-root",
        "--pid",
        "MONITOR_PIDS",
    ] {
        assert!(text.contains(word), "check --help lacks {word}: {text}");
    }
}

#[test]
fn bad_configuration_is_a_usage_error_naming_the_flag() {
    let output = run(&["serve", "--default-interval", "10ms"]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("--default-interval"), "{stderr}");

    let output = run(&["serve", "--warn-ratio", "0.95"]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("--warn-ratio"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn serve_fails_cleanly_when_the_address_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    // A scratch alert store: never a monitor-alerts.db in the crate directory.
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("alerts.db").display());
    let output = run(&["serve", "--listen", &addr, "--database-url", &db]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("cannot listen"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn watch_prints_a_row_at_start_and_every_interval_then_exits_0() {
    let started = Instant::now();
    let output = run(&["watch", "--duration", "2s", "--interval", "500ms"]);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let text = stdout(&output);
    let rows = table_rows(&text);
    assert!((4..=5).contains(&rows.len()), "{text}");
    for (index, row) in rows.iter().enumerate() {
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells[1], (index + 1).to_string(), "seq: {row}");
        assert!(row.contains('%'), "{row}");
        assert!(
            ["OK", "WARNING", "CRITICAL"].contains(cells.last().unwrap()),
            "{row}"
        );
    }
    // It waited for the duration instead of printing everything at once.
    assert!(started.elapsed() >= Duration::from_millis(1900));
}

#[test]
fn watch_json_prints_one_parsable_sample_per_line() {
    let output = run(&["watch", "--json", "--duration", "1s", "--interval", "200ms"]);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let seqs = json_seqs(&stdout(&output));
    assert!((5..=6).contains(&seqs.len()), "{seqs:?}");
    assert_increasing(&seqs);
    assert_eq!(seqs[0], 1);
}

#[test]
fn watch_takes_its_flags_from_the_environment() {
    let mut watch = command(&["watch"]);
    watch
        .env("MONITOR_WATCH_DURATION", "300ms")
        .env("MONITOR_WATCH_INTERVAL", "100ms")
        .env("MONITOR_WATCH_JSON", "true");
    let output = output_within(watch, Duration::from_secs(30));
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let seqs = json_seqs(&stdout(&output));
    assert_eq!(seqs, [1, 2, 3, 4]);
}

#[test]
fn watch_has_no_colour_codes_when_stdout_is_not_a_terminal() {
    let output = run(&["watch", "--duration", "100ms", "--interval", "100ms"]);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let text = stdout(&output);
    assert!(!text.contains('\x1b'), "{text:?}");
    assert_eq!(table_rows(&text).len(), 2, "{text}");
}

#[test]
fn watch_colours_the_level_on_a_terminal() {
    // `script` (util-linux) runs the command on a pseudo-terminal.
    let has_script = Command::new("script")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success());
    if !has_script {
        eprintln!("SKIP: script(1) not found; cannot give the binary a terminal");
        return;
    }
    let line = format!("'{BIN}' watch --duration 100ms --interval 100ms");
    let mut on_a_tty = Command::new("script");
    on_a_tty.args(["-qec", &line, "/dev/null"]);
    for (name, _) in std::env::vars() {
        if name.starts_with("MONITOR_") || name == "NO_COLOR" {
            on_a_tty.env_remove(name);
        }
    }
    let output = output_within(on_a_tty, Duration::from_secs(30));
    assert!(output.status.success(), "{output:?}");
    let text = stdout(&output);
    assert!(
        [
            "\x1b[32mOK\x1b[0m",
            "\x1b[33mWARNING\x1b[0m",
            "\x1b[31mCRITICAL\x1b[0m"
        ]
        .iter()
        .any(|coloured| text.contains(coloured)),
        "{text:?}"
    );
    // The header is never coloured.
    assert!(text.starts_with("TIME"), "{text:?}");
}

#[test]
fn watch_without_duration_runs_until_ctrl_c_and_exits_0() {
    let mut child = command(&["watch", "--duration", "0", "--interval", "100ms", "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // Three readings prove it is running on its own schedule, and the handler is installed.
    for _ in 0..3 {
        let line = lines.next().unwrap().unwrap();
        serde_json::from_str::<serde_json::Value>(&line).unwrap();
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let status = wait_within(&mut child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{status:?}");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn watch_server_prints_the_servers_samples_and_exits_0_when_the_duration_ends() {
    let server = Server::start(&[]);

    let output = run(&[
        "watch",
        "--server",
        &server.url,
        "--duration",
        "1s",
        "--interval",
        "250ms",
    ]);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let text = stdout(&output);
    let rows = table_rows(&text);
    assert!((4..=5).contains(&rows.len()), "{text}");

    // JSON: the shape of `check --json`, numbered by the server.
    let output = run(&[
        "watch",
        "--server",
        &server.url,
        "--json",
        "--duration",
        "600ms",
        "--interval",
        "200ms",
    ]);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let seqs = json_seqs(&stdout(&output));
    assert!((3..=4).contains(&seqs.len()), "{seqs:?}");
    assert_increasing(&seqs);
}

#[test]
fn watch_server_accepts_host_port_and_reads_monitor_server() {
    let server = Server::start(&[]);
    let host_port = server.url.trim_start_matches("http://");
    let mut watch = command(&[
        "watch",
        "--json",
        "--duration",
        "100ms",
        "--interval",
        "100ms",
    ]);
    watch.env("MONITOR_SERVER", host_port);
    let output = output_within(watch, Duration::from_secs(30));
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert!(!json_seqs(&stdout(&output)).is_empty());
}

#[test]
fn watch_server_that_is_not_there_is_exit_1_naming_server_and_status() {
    let output = run(&[
        "watch",
        "--server",
        "http://127.0.0.1:1",
        "--duration",
        "1s",
    ]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let text = stderr(&output);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(
        text.starts_with("monitor-service watch: server http://127.0.0.1:1: UNAVAILABLE: "),
        "{text}"
    );
    assert!(!text.contains("panicked"), "{text}");
    assert!(stdout(&output).is_empty());
}

#[test]
fn watch_help_mentions_every_flag_and_variable() {
    let output = run(&["watch", "--help"]);
    assert!(output.status.success());
    let text = stdout(&output);
    for word in [
        "--duration",
        "MONITOR_WATCH_DURATION",
        "--interval",
        "MONITOR_WATCH_INTERVAL",
        "--server",
        "MONITOR_SERVER",
        "--json",
        "MONITOR_WATCH_JSON",
        "--proc-root",
        "MONITOR_PROC_ROOT",
        "--cgroup-root",
        "MONITOR_CGROUP_ROOT",
        "--pid",
        "MONITOR_PIDS",
        "--warn-ratio",
        "MONITOR_WARN_RATIO",
        "--critical-ratio",
        "MONITOR_CRITICAL_RATIO",
    ] {
        assert!(text.contains(word), "watch --help lacks {word}: {text}");
    }
}

#[test]
fn alerts_help_mentions_every_flag_and_variable() {
    let output = run(&["alerts", "--help"]);
    assert!(output.status.success());
    let text = stdout(&output);
    for word in [
        "--server",
        "MONITOR_SERVER",
        "--min-severity",
        "MONITOR_MIN_SEVERITY",
        "warning",
        "critical",
        "--json",
        "MONITOR_ALERTS_JSON",
    ] {
        assert!(text.contains(word), "alerts --help lacks {word}: {text}");
    }
}

#[test]
fn bad_client_values_are_usage_errors_naming_the_flag() {
    for (args, flag) in [
        (&["watch", "--interval", "50ms"][..], "--interval"),
        (&["watch", "--interval", "25h"][..], "--interval"),
        (&["watch", "--duration", "soon"][..], "--duration"),
        (
            &["watch", "--server", "https://monitor:50052"][..],
            "--server",
        ),
        (
            &["watch", "--server", "http://monitor:50052/v1"][..],
            "--server",
        ),
        (&["watch", "--warn-ratio", "0.95"][..], "--warn-ratio"),
        (
            &[
                "alerts",
                "--server",
                "127.0.0.1:1",
                "--min-severity",
                "info",
            ][..],
            "--min-severity",
        ),
        (&["alerts"][..], "--server"),
    ] {
        let output = run(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {output:?}");
        let text = stderr(&output);
        assert!(text.contains(flag), "{args:?}: {text}");
        assert!(!text.contains("panicked"), "{args:?}: {text}");
    }

    let mut watch = command(&["watch"]);
    watch.env("MONITOR_WATCH_INTERVAL", "10ms");
    let output = output_within(watch, Duration::from_secs(30));
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(stderr(&output).contains("--interval"), "{output:?}");
}

#[test]
fn alerts_from_a_server_that_is_not_there_is_exit_1() {
    let output = run(&["alerts", "--server", "127.0.0.1:1"]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let text = stderr(&output);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(
        text.starts_with("monitor-service alerts: server http://127.0.0.1:1: UNAVAILABLE: "),
        "{text}"
    );
}

/// A procfs and cgroup v2 tree in which this process's group uses 95% of its limit:
/// CRITICAL by the default thresholds.
fn critical_fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let write = |relative: &str, text: &str| {
        let path = dir.path().join(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write("proc/self/cgroup", "0::/app\n");
    write("cgroup/cgroup.controllers", "memory\n");
    write("cgroup/app/memory.current", "996147200\n");
    write("cgroup/app/memory.max", "1048576000\n");
    write(
        "cgroup/app/memory.stat",
        "anon 996147200\nfile 0\ninactive_file 0\n",
    );
    dir
}

#[test]
fn alerts_prints_the_servers_alert_events_until_ctrl_c() {
    let fixture = critical_fixture();
    let proc_root = fixture.path().join("proc");
    let cgroup_root = fixture.path().join("cgroup");
    let server = Server::start(&[
        "--proc-root",
        proc_root.to_str().unwrap(),
        "--cgroup-root",
        cgroup_root.to_str().unwrap(),
        "--default-interval",
        "100ms",
        // Fire on the first sample: the test is about printing, not about dwell.
        "--dwell",
        "0s",
    ]);

    for json in [true, false] {
        let mut args = vec![
            "alerts",
            "--server",
            &server.url,
            "--min-severity",
            "critical",
        ];
        if json {
            args.push("--json");
        }
        let mut child = command(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (lines, received) = mpsc::channel::<String>();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = lines.send(line);
            }
        });
        let next = || {
            received
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("no alert printed (json: {json})"))
        };
        // A firing alert is sent first to a new subscriber, so it arrives even though it
        // fired before this client connected.
        let first = next();
        if json {
            let alert: serde_json::Value = serde_json::from_str(&first).unwrap();
            assert_eq!(alert["severity"], "critical", "{alert}");
            assert_eq!(alert["state"], "firing", "{alert}");
            assert_eq!(alert["metric"], "usage_ratio", "{alert}");
            assert!(alert["value"].as_f64().unwrap() >= 0.95, "{alert}");
            assert_eq!(alert["threshold"], 0.9, "{alert}");
            assert!(!alert["message"].as_str().unwrap().is_empty(), "{alert}");
            assert!(
                !alert["recommendations"].as_array().unwrap().is_empty(),
                "{alert}"
            );
            assert_eq!(alert["sample"]["level"], "critical", "{alert}");
        } else {
            assert!(
                first.contains("  CRITICAL  FIRING    usage_ratio 95.0% vs threshold 90.0%  "),
                "{first}"
            );
            assert!(!first.contains('\x1b'), "{first:?}");
            let recommendation = next();
            assert!(recommendation.starts_with("    - "), "{recommendation}");
        }
        let status = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let status = wait_within(&mut child, Duration::from_secs(10));
        assert_eq!(status.code(), Some(0), "json: {json}: {status:?}");
    }
}
