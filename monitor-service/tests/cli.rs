//! The `monitor-service` binary as a user runs it.
#![allow(clippy::unwrap_used, missing_docs)]

use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_monitor-service"));
    command.args(args);
    // The tests assert on defaults; a developer's MONITOR_* settings must not leak in.
    for (name, _) in std::env::vars() {
        if name.starts_with("MONITOR_") {
            command.env_remove(name);
        }
    }
    command.output().unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
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
    for word in ["serve", "check", "--help", "--version"] {
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
    let output = run(&["serve", "--listen", &addr]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("cannot listen"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
