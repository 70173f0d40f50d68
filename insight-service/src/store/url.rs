//! The `--database-url` value: checked when the configuration is parsed, with its password
//! hidden from `Debug` and `Display`. Parsing and redaction are monitor-service's (the one
//! home of that code); this type only keeps the full URL for connecting.

use std::{fmt, str::FromStr};

pub use monitor_service::history::Backend;

/// The default `--database-url`: a SQLite file in the working directory, created on first
/// start, so a laptop run stores feedback with no setup.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://insight.db";

/// A checked database URL (`sqlite://PATH` or `postgres://...`). `Debug` and `Display` hide
/// its password, so it can be logged and printed with the configuration.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl {
    url: String,
    /// Parsed and redacted by monitor-service; `None` only for [`DatabaseUrl::default`] if
    /// its constant failed to parse (it does not: tested), which holds no password to hide.
    shown: Option<monitor_service::history::DatabaseUrl>,
}

impl DatabaseUrl {
    /// Parses `sqlite:...` or `postgres://...`/`postgresql://...`; the error names what is
    /// accepted (and never echoes a password).
    pub fn parse(text: &str) -> Result<Self, String> {
        Ok(Self {
            url: text.to_owned(),
            shown: Some(monitor_service::history::DatabaseUrl::parse(text)?),
        })
    }

    /// Which database it names.
    pub fn backend(&self) -> Backend {
        self.shown
            .as_ref()
            .map_or(Backend::Sqlite, |shown| shown.backend())
    }

    /// The URL with its password, for connecting only.
    pub(crate) fn expose(&self) -> &str {
        &self.url
    }
}

impl Default for DatabaseUrl {
    /// [`DEFAULT_DATABASE_URL`].
    fn default() -> Self {
        Self {
            url: DEFAULT_DATABASE_URL.to_owned(),
            shown: monitor_service::history::DatabaseUrl::parse(DEFAULT_DATABASE_URL).ok(),
        }
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
        match &self.shown {
            Some(shown) => fmt::Display::fmt(shown, f),
            None => f.write_str(&self.url),
        }
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.shown {
            Some(shown) => fmt::Debug::fmt(shown, f),
            None => write!(f, "DatabaseUrl({:?})", self.url),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_parses_as_sqlite() {
        assert!(DatabaseUrl::default().shown.is_some());
        assert_eq!(DatabaseUrl::default().backend(), Backend::Sqlite);
        assert_eq!(DatabaseUrl::default().expose(), DEFAULT_DATABASE_URL);
    }

    #[test]
    fn passwords_never_show() {
        let url = DatabaseUrl::parse("postgres://app:s3cret@db:5432/insight");
        let url = url.unwrap_or_default();
        assert_eq!(url.backend(), Backend::Postgres);
        for shown in [url.to_string(), format!("{url:?}")] {
            assert!(!shown.contains("s3cret"), "{shown}");
        }
        assert!(url.expose().contains("s3cret"));
    }
}
