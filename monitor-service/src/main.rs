//! The `monitor-service` binary: `serve` runs the gRPC server; `check`, `watch` and `alerts`
//! are the command-line client (see `monitor_service::cli`).

use std::process::ExitCode;

use monitor_service::{
    cli,
    config::{Cli, Command, ServeArgs},
    lifecycle,
};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> ExitCode {
    match Cli::parse_valid().command {
        Command::Serve(args) => serve(args).await,
        Command::Check(args) => {
            // Probe warnings (an unreadable file) go to stderr; the reading goes to stdout.
            lifecycle::init_tracing(lifecycle::LogFormat::Text);
            exit_code("check", cli::check(&args))
        }
        Command::Watch(args) => {
            // Probe warnings go to stderr, like check's; readings go to stdout.
            lifecycle::init_tracing(lifecycle::LogFormat::Text);
            exit_code("watch", cli::watch(&args, cli::interrupted()).await)
        }
        Command::Alerts(args) => {
            lifecycle::init_tracing(lifecycle::LogFormat::Text);
            exit_code("alerts", cli::alerts(&args, cli::interrupted()).await)
        }
    }
}

/// A client command's outcome as the exit status; a failure is one line on stderr.
fn exit_code(command: &str, result: Result<(), cli::CliError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("monitor-service {command}: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> ExitCode {
    lifecycle::init_tracing(args.log_format);
    let listener = match TcpListener::bind(args.listen).await {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(listen = %args.listen, %error, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    match monitor_service::run(listener, args, lifecycle::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "monitor-service failed");
            ExitCode::FAILURE
        }
    }
}
