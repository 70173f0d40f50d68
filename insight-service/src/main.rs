//! The `insight-service` binary: parse config, bind, run until SIGTERM.

use std::process::ExitCode;

use clap::Parser;
use insight_service::{Config, run};
use monitor_service::lifecycle::{init_tracing, shutdown_signal};

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    if let Err(message) = config.check() {
        <Config as clap::CommandFactory>::command()
            .error(clap::error::ErrorKind::ArgumentConflict, message)
            .exit();
    }
    init_tracing(config.log_format);
    let listener = match tokio::net::TcpListener::bind(&config.listen).await {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(listen = %config.listen, %error, "cannot bind the listen address");
            return ExitCode::FAILURE;
        }
    };
    match run(listener, config, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "insight-service stopped");
            ExitCode::FAILURE
        }
    }
}
