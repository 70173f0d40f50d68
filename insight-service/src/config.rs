//! Command-line and environment configuration. Every flag has an env twin so the same binary is
//! configured by flags on a laptop and by env in a Kubernetes manifest.

use std::time::Duration;

use clap::Parser;
use monitor_service::lifecycle::LogFormat;

/// insight-service: chunked map-reduce summaries of user feedback over gRPC.
#[derive(Clone, Debug, Parser)]
#[command(name = "insight-service", version, about, long_about = None)]
pub struct Config {
    /// Address to serve gRPC on (plaintext HTTP/2).
    #[arg(long, env = "INSIGHT_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: String,

    /// Log format on stderr; the filter comes from RUST_LOG (default "info").
    #[arg(long, env = "INSIGHT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// How long in-flight calls may run after SIGTERM before the process exits anyway. Kept
    /// below Kubernetes' default 30 s terminationGracePeriodSeconds so we exit before SIGKILL.
    #[arg(long, env = "INSIGHT_SHUTDOWN_GRACE", default_value = "25s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// Largest `max_entries` a request may ask for (and what `max_entries = 0` means).
    #[arg(
        long,
        env = "INSIGHT_MAX_ENTRIES_CAP",
        default_value_t = 10_000,
        value_parser = clap::value_parser!(u32).range(1..=1_000_000)
    )]
    pub max_entries_cap: u32,
}

impl Default for Config {
    /// The configuration a fresh machine runs with: every flag at its default, environment
    /// ignored (tests rely on this being independent of the caller's env).
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:50051".to_owned(),
            log_format: LogFormat::Text,
            shutdown_grace: Duration::from_secs(25),
            max_entries_cap: 10_000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn defaults_match_the_parser() {
        let parsed = Config::try_parse_from(["insight-service"]);
        // The env may set INSIGHT_* in a developer shell; only compare when it does not.
        if std::env::vars().any(|(k, _)| k.starts_with("INSIGHT_")) {
            return;
        }
        let parsed = parsed.map_err(|e| e.to_string());
        let parsed = parsed.as_ref().map(|c| {
            (
                c.listen.clone(),
                c.log_format,
                c.shutdown_grace,
                c.max_entries_cap,
            )
        });
        let default = Config::default();
        assert_eq!(
            parsed,
            Ok((
                default.listen,
                default.log_format,
                default.shutdown_grace,
                default.max_entries_cap
            ))
        );
    }

    #[test]
    fn every_flag_has_an_env_twin() {
        let command = Config::command();
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            assert!(arg.get_env().is_some(), "--{id} has no env twin");
        }
    }

    #[test]
    fn a_bad_value_names_the_flag() {
        let err = Config::try_parse_from(["insight-service", "--max-entries-cap", "0"])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("--max-entries-cap"), "{err}");
    }
}
