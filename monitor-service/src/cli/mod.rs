//! Command-line client commands, the successors of the old `memory_monitor.py`:
//!
//! - `check`: one reading taken here (its `--single`), as a table or one JSON line;
//! - `watch`: a reading every interval for a duration (its `--duration 60 --interval 30`),
//!   sampled here or streamed from a server's StreamSamples;
//! - `alerts`: a server's alert events (FIRING, RESOLVED) with their recommendations.
//!
//! The formatting lives in small pure functions ([`table`], [`json`], [`alert_text`]) and the
//! loops take their writer and their stop signal as arguments, so everything the binary does
//! is tested without a terminal; `main` only wires stdout and Ctrl-C in.

use std::{
    future::Future,
    io::{self, Write},
};

use crate::{
    config::{AlertsArgs, CheckArgs, WatchArgs},
    probe::Probe,
};

pub mod alert_text;
pub mod json;
pub mod local;
pub mod output;
pub mod remote;
pub mod table;

pub use output::Printer;
pub use table::render_table;

/// Why a command could not do its job; the binary prints it on one line and exits 1.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A reading could not be encoded as JSON.
    #[error("cannot encode the reading as JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// Standard output is not writable (e.g. a closed pipe).
    #[error("cannot write to stdout: {0}")]
    Stdout(#[from] io::Error),
    /// The server address is not a usable URL (only possible for arguments built in code:
    /// the command line's parser checks it).
    #[error("invalid server address {server:?}: {reason}")]
    BadServer {
        /// The address as given.
        server: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The server could not be reached, or ended the call with an error status.
    #[error("server {server}: {}", remote::describe_status(status))]
    Rpc {
        /// The server's URL.
        server: String,
        /// The gRPC status (UNAVAILABLE when it could not be reached). Boxed: a `Status` is
        /// large and this error travels through every `Result` of the loops.
        status: Box<tonic::Status>,
    },
    /// The server answered StreamAlerts with UNIMPLEMENTED: it runs without the alert engine.
    #[error(
        "server {server} does not serve alerts ({}); it may run a version without the \
         alert engine",
        remote::describe_status(status)
    )]
    AlertsNotServed {
        /// The server's URL.
        server: String,
        /// The UNIMPLEMENTED status it answered.
        status: Box<tonic::Status>,
    },
}

impl CliError {
    /// True when stdout was closed by its reader (`watch | head -3`): the reader has seen all
    /// it wanted, so the streaming commands end quietly with success, as `yes | head` does.
    pub fn is_closed_stdout(&self) -> bool {
        matches!(self, Self::Stdout(error) if error.kind() == io::ErrorKind::BrokenPipe)
    }
}

/// Treats a closed stdout as the normal end of a streaming command.
fn closed_stdout_is_success(result: Result<(), CliError>) -> Result<(), CliError> {
    match result {
        Err(error) if error.is_closed_stdout() => Ok(()),
        other => other,
    }
}

/// Takes one reading and prints it on stdout.
pub fn check(args: &CheckArgs) -> Result<(), CliError> {
    let mut sample = Probe::new(args.probe.probe_config()).sample();
    // This command takes exactly one sample: the first.
    sample.seq = 1;
    let text = if args.json {
        serde_json::to_string(&sample)?
    } else {
        render_table(&sample)
    };
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{text}")?;
    stdout.flush()?;
    Ok(())
}

/// Runs `watch` on stdout until its duration is over, the server ends the stream, or `stop`
/// resolves (Ctrl-C in the binary); all three are success.
pub async fn watch(args: &WatchArgs, stop: impl Future<Output = ()>) -> Result<(), CliError> {
    let mut printer = Printer::new(io::stdout(), args.json, output::stdout_wants_colour());
    let result = match &args.server {
        None => {
            let probe = Probe::new(args.probe.probe_config());
            local::watch_local(probe, args.interval, args.duration, &mut printer, stop).await
        }
        Some(server) => {
            remote::watch_server(server, args.interval, args.duration, &mut printer, stop).await
        }
    };
    closed_stdout_is_success(result)
}

/// Runs `alerts` on stdout until the server ends the stream or `stop` resolves (success), or
/// the server fails or refuses the call.
pub async fn alerts(args: &AlertsArgs, stop: impl Future<Output = ()>) -> Result<(), CliError> {
    let mut printer = Printer::new(io::stdout(), args.json, output::stdout_wants_colour());
    let result = remote::tail_alerts(&args.server, args.min_severity, &mut printer, stop).await;
    closed_stdout_is_success(result)
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM, the ways a user or a supervisor stops a streaming
/// command; quiet, unlike the server's shutdown signal, because for a CLI an interruption is
/// the normal end, not an event to log. If a signal cannot be watched, that signal keeps its
/// default action (terminating the process), which is what the user asked for anyway.
pub async fn interrupted() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{Cli, Command, MinSeverity};

    fn parse(args: &[&str]) -> Result<Command, clap::Error> {
        Cli::try_parse_valid(["monitor-service"].iter().chain(args).copied()).map(|cli| cli.command)
    }

    fn watch(args: &[&str]) -> Result<WatchArgs, clap::Error> {
        match parse(&[&["watch"], args].concat())? {
            Command::Watch(args) => Ok(args),
            other => panic!("parsed as {other:?}"),
        }
    }

    fn server(text: &str) -> Result<String, clap::Error> {
        watch(&["--server", text]).map(|args| args.server.unwrap())
    }

    #[test]
    fn watch_defaults_are_the_old_scripts() {
        // Only when the environment does not set them, as in CI.
        if std::env::vars().any(|(name, _)| name.starts_with("MONITOR_")) {
            return;
        }
        let args = watch(&[]).unwrap();
        assert_eq!(args.duration, Duration::from_secs(60));
        assert_eq!(args.interval, Duration::from_secs(30));
        assert_eq!(args.server, None);
        assert!(!args.json);
    }

    #[test]
    fn watch_durations_take_humantime_or_bare_seconds() {
        let args = watch(&["--duration", "60", "--interval", "30"]).unwrap();
        assert_eq!(
            (args.duration, args.interval),
            (Duration::from_secs(60), Duration::from_secs(30))
        );
        let args = watch(&["--duration", "0", "--interval", "100ms", "--json"]).unwrap();
        assert_eq!(
            (args.duration, args.interval),
            (Duration::ZERO, Duration::from_millis(100))
        );
        assert!(args.json);
        let args = watch(&["--duration", "1h 30m", "--interval", "24h"]).unwrap();
        assert_eq!(args.duration, Duration::from_secs(5400));
    }

    #[test]
    fn server_addresses_are_normalized_to_http_urls() {
        assert_eq!(server("127.0.0.1:50052").unwrap(), "http://127.0.0.1:50052");
        assert_eq!(
            server(" http://monitor:50052/ ").unwrap(),
            "http://monitor:50052"
        );
        assert_eq!(server("http://[::1]:50052").unwrap(), "http://[::1]:50052");
        assert_eq!(server("monitor").unwrap(), "http://monitor");
    }

    #[test]
    fn bad_client_values_are_errors_naming_the_flag() {
        for (args, flag) in [
            (&["watch", "--interval", "99ms"][..], "--interval"),
            (&["watch", "--interval", "25h"][..], "--interval"),
            (&["watch", "--interval=-1"][..], "--interval"),
            (&["watch", "--duration", "forever"][..], "--duration"),
            (
                &["watch", "--server", "https://monitor:50052"][..],
                "--server",
            ),
            (
                &["watch", "--server", "grpc://monitor:50052"][..],
                "--server",
            ),
            (
                &["watch", "--server", "http://monitor:50052/path"][..],
                "--server",
            ),
            (
                &["watch", "--server", "http://monitor:50052/?q=1"][..],
                "--server",
            ),
            (&["watch", "--server", ""][..], "--server"),
            (&["watch", "--server", "http://"][..], "--server"),
            (&["watch", "--critical-ratio", "0.5"][..], "--warn-ratio"),
            (
                &["alerts", "--server", "h:1", "--min-severity", "ok"][..],
                "--min-severity",
            ),
        ] {
            let error = parse(args).unwrap_err();
            let text = error.to_string();
            assert!(text.contains(flag), "{args:?}: {text}");
            assert_eq!(error.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn alerts_flags() {
        let Command::Alerts(args) = parse(&[
            "alerts",
            "--server",
            "h:1",
            "--min-severity",
            "critical",
            "--json",
        ])
        .unwrap() else {
            panic!("not alerts");
        };
        assert_eq!(args.server, "http://h:1");
        assert_eq!(args.min_severity, MinSeverity::Critical);
        assert!(args.json);
    }

    #[test]
    fn only_a_closed_pipe_counts_as_a_quiet_end() {
        let closed = CliError::Stdout(io::ErrorKind::BrokenPipe.into());
        assert!(closed_stdout_is_success(Err(closed)).is_ok());
        let full = CliError::Stdout(io::Error::other("disk full"));
        assert!(closed_stdout_is_success(Err(full)).is_err());
    }
}
