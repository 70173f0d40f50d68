//! A scratch database per test: a SQLite file in a temporary directory, or a fresh database
//! on the machine's PostgreSQL (127.0.0.1:5432, user postgres), created from the `test`
//! database and dropped when the test ends (also when it fails). Without PostgreSQL the
//! PostgreSQL variant prints `SKIP: <reason>` and yields `None`, except under CI (`CI` set),
//! where it fails the test: CI must run the PostgreSQL tests.

use std::{
    sync::atomic::{AtomicU32, Ordering},
    time::SystemTime,
};

use sqlx::{Connection, Executor, PgConnection};

/// The database the PostgreSQL tests create their own databases from.
pub const ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A database for one test; see the module documentation.
pub enum Db {
    /// A scratch SQLite file, deleted with its directory.
    Sqlite {
        /// Keeps the directory alive as long as the database.
        _dir: tempfile::TempDir,
        /// `sqlite://<dir>/insight.db`.
        url: String,
    },
    /// A fresh PostgreSQL database, dropped on drop.
    Postgres {
        /// `insight_test_<pid>_<nanos>_<n>`.
        name: String,
        /// `postgres://postgres@127.0.0.1:5432/<name>`.
        url: String,
    },
}

impl Db {
    /// A scratch SQLite file (not created yet: the store creates it on open).
    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("insight.db").display());
        Db::Sqlite { _dir: dir, url }
    }

    /// A fresh PostgreSQL database, or `None` (after printing SKIP) when PostgreSQL does not
    /// answer outside CI.
    pub async fn postgres() -> Option<Self> {
        Self::create_postgres("").await
    }

    /// Like [`Db::postgres`], but the database's default collation is the ICU locale
    /// `icu_locale` (e.g. `en-US`, where `'a' < 'B'`), so a test can show that an order the
    /// store promises to be bytewise (`COLLATE "C"`) does not depend on the server's locale.
    /// Needs PostgreSQL 15 or later built with ICU.
    pub async fn postgres_with_locale(icu_locale: &str) -> Option<Self> {
        assert!(
            icu_locale
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "not a locale name: {icu_locale:?}"
        );
        Self::create_postgres(&format!(
            " TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE '{icu_locale}'"
        ))
        .await
    }

    /// Creates the database with `options` appended to `CREATE DATABASE <name>`.
    async fn create_postgres(options: &str) -> Option<Self> {
        let mut admin = match PgConnection::connect(ADMIN_URL).await {
            Ok(connection) => connection,
            Err(error) => {
                let reason = format!("PostgreSQL at {ADMIN_URL} does not answer: {error}");
                assert!(std::env::var_os("CI").is_none(), "under CI: {reason}");
                println!("SKIP: {reason}");
                return None;
            }
        };
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let name = format!(
            "insight_test_{}_{}_{}",
            std::process::id(),
            nanos,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        // The name is made of digits and underscores only, and the options come from test
        // code (a locale name checked above), so both are safe to splice into DDL (which
        // cannot take bind parameters).
        admin
            .execute(sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "CREATE DATABASE {name}{options}"
            ))))
            .await
            .unwrap();
        let _ = admin.close().await;
        let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
        Some(Db::Postgres { name, url })
    }

    /// The URL to give the store (`--database-url`).
    pub fn url(&self) -> &str {
        match self {
            Db::Sqlite { url, .. } | Db::Postgres { url, .. } => url,
        }
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        let Db::Postgres { name, .. } = self else {
            return;
        };
        // Drop cannot await, and may run inside the test's runtime: clean up on a thread of
        // its own with its own runtime.
        let name = name.clone();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let mut admin = PgConnection::connect(ADMIN_URL).await?;
                admin
                    .execute(sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    ))))
                    .await?;
                admin.close().await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test database: {dropped:?}");
        }
    }
}
