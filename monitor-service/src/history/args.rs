//! The alert-history flags of `serve`, and the database URL that keeps its password out of
//! logs and `Debug` output.

use std::{fmt, str::FromStr, time::Duration};

use clap::Args;
use sqlx::{postgres::PgConnectOptions, sqlite::SqliteConnectOptions};

/// Alert-history flags of `serve`.
#[derive(Clone, Debug, PartialEq, Args)]
#[command(next_help_heading = "Alert history")]
pub struct HistoryArgs {
    /// Where alert events are stored: sqlite://PATH (created if missing, in WAL mode; a
    /// relative PATH is relative to the working directory) or postgres://USER@HOST:PORT/DB
    /// for replicas that share one history. A SQLite file by default, so a laptop run keeps
    /// history with no setup; in Kubernetes point it at a volume or at PostgreSQL. If the
    /// database is unreachable, alerts still stream and ListAlerts answers UNAVAILABLE until
    /// it is back.
    #[arg(
        long,
        env = "MONITOR_DATABASE_URL",
        // The variable may hold a password; --help must not print it.
        hide_env_values = true,
        default_value = DEFAULT_DATABASE_URL,
        value_parser = DatabaseUrl::parse
    )]
    pub database_url: DatabaseUrl,

    /// How long alert events are kept (e.g. "7d", "12h"); older ones are deleted at start and
    /// every hour. 7 days covers a week of incidents to review without letting the history
    /// grow without bound.
    #[arg(
        long,
        env = "MONITOR_ALERT_RETENTION",
        default_value = "7d",
        value_parser = parse_retention
    )]
    pub alert_retention: Duration,
}

/// The default `--database-url`.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://monitor-alerts.db";

impl Default for HistoryArgs {
    /// The same values as the command line's defaults.
    fn default() -> Self {
        Self {
            database_url: DatabaseUrl {
                url: DEFAULT_DATABASE_URL.to_owned(),
                backend: Backend::Sqlite,
            },
            alert_retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// Which database a [`DatabaseUrl`] names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// An embedded SQLite file.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

/// A checked database URL. `Debug` and `Display` hide its password, so it can be logged and
/// printed with the configuration.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl {
    url: String,
    backend: Backend,
}

impl DatabaseUrl {
    /// Parses `sqlite:...` or `postgres://...`/`postgresql://...`; the error names what is
    /// accepted (and never echoes a password).
    pub fn parse(text: &str) -> Result<Self, String> {
        let backend = if text.starts_with("sqlite:") {
            SqliteConnectOptions::from_str(text)
                .map_err(|error| format!("not a SQLite URL ({error})"))?;
            Backend::Sqlite
        } else if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            PgConnectOptions::from_str(text)
                .map_err(|error| format!("not a PostgreSQL URL ({error})"))?;
            Backend::Postgres
        } else {
            return Err(format!(
                "must be sqlite://PATH or postgres://USER@HOST[:PORT]/DB, got {:?}",
                redact(text)
            ));
        };
        Ok(Self {
            url: text.to_owned(),
            backend,
        })
    }

    /// Which database it names.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The URL with its password, for connecting only.
    pub(crate) fn expose(&self) -> &str {
        &self.url
    }
}

impl FromStr for DatabaseUrl {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.url))
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({:?})", redact(&self.url))
    }
}

/// `url` with the password of its user-info and of a `password=` parameter replaced by `***`.
fn redact(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        if let Some(at) = authority.rfind('@')
            && let Some(colon) = authority[..at].find(':')
        {
            let start = scheme_end + 3 + colon + 1;
            let end = scheme_end + 3 + at;
            out.replace_range(start..end, "***");
        }
    }
    if let Some(query_start) = out.find('?') {
        let (head, query) = out.split_at(query_start + 1);
        let query = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
                _ => pair.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("&");
        out = format!("{head}{query}");
    }
    out
}

/// A humantime duration of at least one second: a zero retention would delete every alert as
/// soon as it is stored.
fn parse_retention(text: &str) -> Result<Duration, String> {
    let retention = humantime::parse_duration(text).map_err(|error| error.to_string())?;
    if retention < Duration::from_secs(1) {
        Err(format!(
            "must be at least 1s, got {}",
            humantime::format_duration(retention)
        ))
    } else {
        Ok(retention)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Harness {
        #[command(flatten)]
        history: HistoryArgs,
    }

    fn parse(args: &[&str]) -> Result<HistoryArgs, clap::Error> {
        Harness::try_parse_from(["harness"].iter().chain(args).copied()).map(|h| h.history)
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        if std::env::vars().any(|(name, _)| name.starts_with("MONITOR_")) {
            return;
        }
        assert_eq!(parse(&[]).unwrap(), HistoryArgs::default());
        assert_eq!(
            HistoryArgs::default().database_url.backend(),
            Backend::Sqlite
        );
    }

    #[test]
    fn parses_both_backends() {
        let args = parse(&[
            "--database-url",
            "postgres://postgres@127.0.0.1:5432/test",
            "--alert-retention",
            "12h",
        ])
        .unwrap();
        assert_eq!(args.database_url.backend(), Backend::Postgres);
        assert_eq!(args.alert_retention, Duration::from_secs(12 * 3600));
        let args = parse(&["--database-url", "sqlite:///tmp/alerts.db"]).unwrap();
        assert_eq!(args.database_url.backend(), Backend::Sqlite);
        assert_eq!(args.database_url.expose(), "sqlite:///tmp/alerts.db");
    }

    #[test]
    fn bad_values_name_the_flag() {
        for (args, flag) in [
            (&["--database-url", "mysql://x/y"][..], "--database-url"),
            (&["--database-url", "alerts.db"][..], "--database-url"),
            (&["--alert-retention", "0s"][..], "--alert-retention"),
            (&["--alert-retention", "forever"][..], "--alert-retention"),
        ] {
            let text = parse(args).unwrap_err().to_string();
            assert!(text.contains(flag), "{args:?}: {text}");
        }
    }

    #[test]
    fn passwords_never_show() {
        let url =
            DatabaseUrl::parse("postgres://app:s3cret@db:5432/alerts?password=other&x=1").unwrap();
        for shown in [url.to_string(), format!("{url:?}")] {
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(!shown.contains("other"), "{shown}");
            assert!(shown.contains("app:***@db:5432/alerts"), "{shown}");
            assert!(shown.contains("x=1"), "{shown}");
        }
        let error = DatabaseUrl::parse("mysql://root:hunter2@db/x").unwrap_err();
        assert!(!error.contains("hunter2"), "{error}");
        assert_eq!(redact("sqlite://a.db"), "sqlite://a.db");
        assert_eq!(redact("postgres://u@h/d"), "postgres://u@h/d");
    }
}
