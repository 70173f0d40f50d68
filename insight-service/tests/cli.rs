//! The `insight-service` binary's command line: `--help` documents every flag with its env
//! twin, and a bad value is refused naming the flag. (Its presence also makes
//! `cargo test --workspace` build the binary that the workspace e2e tests spawn.)

#![allow(clippy::unwrap_used, missing_docs)]

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_insight-service");

#[test]
fn help_documents_every_flag_and_env_twin() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for (flag, env) in [
        ("--listen", "INSIGHT_LISTEN"),
        ("--log-format", "INSIGHT_LOG_FORMAT"),
        ("--shutdown-grace", "INSIGHT_SHUTDOWN_GRACE"),
        ("--max-entries-cap", "INSIGHT_MAX_ENTRIES_CAP"),
    ] {
        assert!(help.contains(flag), "{flag} missing from --help:\n{help}");
        assert!(help.contains(env), "{env} missing from --help:\n{help}");
    }
}

#[test]
fn bad_values_are_refused_naming_the_flag() {
    for (args, flag) in [
        (["--shutdown-grace", "soon"], "--shutdown-grace"),
        (["--max-entries-cap", "0"], "--max-entries-cap"),
        (["--log-format", "xml"], "--log-format"),
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains(flag), "{flag} not named in: {err}");
    }
}

#[test]
fn env_twin_configures_the_flag() {
    let out = Command::new(BIN)
        .env("INSIGHT_MAX_ENTRIES_CAP", "zero")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("--max-entries-cap"), "{err}");
}

#[test]
fn an_unusable_listen_address_exits_1_with_a_message() {
    let out = Command::new(BIN)
        .args(["--listen", "256.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("cannot bind"), "{err}");
}
