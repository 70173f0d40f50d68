//! The `monitor-service` binary: `serve` runs the gRPC server, `check` prints one reading.

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
            match cli::check(&args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("monitor-service check: {error}");
                    ExitCode::FAILURE
                }
            }
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
