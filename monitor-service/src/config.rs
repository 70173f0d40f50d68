//! Command line and environment: `monitor-service serve`, `check`, `watch` and `alerts`.
//!
//! Every flag has an environment twin (`MONITOR_*`) so a Kubernetes manifest configures the
//! server without a command line. Values are checked while parsing, and the one cross-flag rule
//! (warning below critical) right after, so a bad value is a clap error naming the flag and its
//! variable, never a panic.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, CommandFactory, Parser, Subcommand};

use crate::{
    alerts::{AlertArgs, AlertArgsError},
    history::HistoryArgs,
    lifecycle::LogFormat,
    probe::ProbeConfig,
    sampler::{MAX_SUBSCRIBER_BUFFER, MIN_INTERVAL, SamplerConfig},
};

/// Longest shutdown grace accepted: Kubernetes' default is 30s and an hour-long drain is a
/// misconfiguration; the bound also keeps deadline arithmetic far from overflowing.
pub const MAX_SHUTDOWN_GRACE: Duration = Duration::from_secs(3600);

/// Memory monitor: samples process, cgroup and system memory and streams the samples over gRPC.
#[derive(Clone, Debug, Parser)]
#[command(name = "monitor-service", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Clone, Debug, Subcommand)]
pub enum Command {
    /// Serve the spotifai.monitor.v1.MemoryMonitor gRPC API, with health and reflection.
    Serve(ServeArgs),
    /// Print one memory reading and exit (the old `memory_monitor.py --single`).
    Check(CheckArgs),
    /// Print a reading every --interval for --duration, sampled here or streamed from a server
    /// (the old `memory_monitor.py --duration 60 --interval 30`).
    Watch(WatchArgs),
    /// Print a running server's alert events (FIRING, RESOLVED) as they happen.
    Alerts(AlertsArgs),
}

/// Flags of `serve`.
#[derive(Clone, Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on for gRPC. All interfaces by default, because in a pod the kubelet
    /// and other services connect through the pod IP; 50052 sits next to insight-service's 50051.
    #[arg(long, env = "MONITOR_LISTEN", default_value = "0.0.0.0:50052")]
    pub listen: SocketAddr,

    /// Sampling interval of StreamSamples when the client sends interval_ms = 0 (e.g. "1s",
    /// "500ms"), and the always-on cadence at which the server samples for its alerts even with
    /// no subscriber; at least 100ms, rounded up to a multiple of 100ms (the grid samples are
    /// shared on). One second matches the old monitor script and is fine-grained enough to see
    /// a spike build up before an OOM kill.
    #[arg(
        long,
        env = "MONITOR_DEFAULT_INTERVAL",
        default_value = "1s",
        value_parser = parse_interval
    )]
    pub default_interval: Duration,

    /// Samples each StreamSamples subscriber may have queued (1..=4096); past it the sampler
    /// drops samples for that subscriber and tells it how many in the next one (`dropped`).
    /// 16 is 1.6s at the fastest cadence: enough to ride out a reader's GC pause or a TCP
    /// hiccup without loss, at 16 bytes per slot.
    #[arg(
        long,
        env = "MONITOR_SUBSCRIBER_BUFFER",
        default_value_t = 16,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new()
            .range(1..=MAX_SUBSCRIBER_BUFFER as u64)
    )]
    pub subscriber_buffer: usize,

    /// How long a subscriber may take no sample (its buffer full) before it is disconnected
    /// with RESOURCE_EXHAUSTED (100ms..=1h). 30s outlasts any pause a live client has, while a
    /// dead-but-connected one gives its place back within half a minute.
    #[arg(
        long,
        env = "MONITOR_SLOW_SUBSCRIBER_TIMEOUT",
        default_value = "30s",
        value_parser = parse_slow_subscriber_timeout
    )]
    pub slow_subscriber_timeout: Duration,

    /// Concurrent StreamSamples subscribers (1..=1000000); past it StreamSamples answers
    /// RESOURCE_EXHAUSTED. 10000 at 10 Hz is what BENCHMARKS.md measured a small pod to
    /// sustain; more would raise every subscriber's lag instead of refusing the newcomer.
    #[arg(
        long,
        env = "MONITOR_MAX_SUBSCRIBERS",
        default_value_t = 10_000,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000)
    )]
    pub max_subscribers: usize,

    /// What to read and the level thresholds.
    #[command(flatten)]
    pub probe: ProbeArgs,

    /// How long in-flight calls may finish after SIGTERM before the server exits (at most 1h).
    /// 25s stays below Kubernetes' default 30s termination grace period, so we exit before
    /// SIGKILL.
    #[arg(
        long,
        env = "MONITOR_SHUTDOWN_GRACE",
        default_value = "25s",
        value_parser = parse_grace
    )]
    pub shutdown_grace: Duration,

    /// Log format on stderr: "text" for people, "json" for log shippers. Text by default, since
    /// a shipper is the one that knows to ask for JSON.
    #[arg(long, env = "MONITOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Alert thresholds on memory pressure, hysteresis and dwell (the usage-ratio thresholds
    /// are the probe's).
    #[command(flatten)]
    pub alerts: AlertArgs,

    /// Where alert events are stored and for how long.
    #[command(flatten)]
    pub history: HistoryArgs,
}

/// Flags of `check`.
#[derive(Clone, Debug, Args)]
pub struct CheckArgs {
    /// Print the reading as one JSON object on one line instead of a table, for scripts.
    /// (MONITOR_CHECK_JSON accepts true/false, 1/0, yes/no, on/off.)
    #[arg(
        long,
        env = "MONITOR_CHECK_JSON",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub json: bool,

    /// What to read and the level thresholds.
    #[command(flatten)]
    pub probe: ProbeArgs,
}

/// Flags of `watch`.
#[derive(Clone, Debug, Args)]
pub struct WatchArgs {
    /// How long to watch, e.g. "60s", "5m" (a bare number is seconds, as in the old script's
    /// `--duration 60`); 0 = until Ctrl-C. The first reading is at once and one more is printed
    /// at every --interval up to and including the end: 2s every 500ms is 5 readings.
    #[arg(
        long,
        env = "MONITOR_WATCH_DURATION",
        default_value = "60s",
        value_parser = parse_watch_duration
    )]
    pub duration: Duration,

    /// Time between readings, e.g. "30s", "500ms" (a bare number is seconds); at least 100ms,
    /// at most 24h. 30s is the old script's default.
    #[arg(
        long,
        env = "MONITOR_WATCH_INTERVAL",
        default_value = "30s",
        value_parser = parse_watch_interval
    )]
    pub interval: Duration,

    /// Subscribe to a running server's StreamSamples instead of sampling here, e.g.
    /// http://monitor:50052 (host:port alone means http://). The server then reads with its own
    /// probe flags and thresholds; the probe flags below are ignored.
    #[arg(long, value_name = "URL", env = "MONITOR_SERVER", value_parser = parse_server)]
    pub server: Option<String>,

    /// Print each reading as one JSON object on one line (the shape of `check --json`) instead
    /// of a table. (MONITOR_WATCH_JSON accepts true/false, 1/0, yes/no, on/off.)
    #[arg(
        long,
        env = "MONITOR_WATCH_JSON",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub json: bool,

    /// What to read and the level thresholds (local sampling only).
    #[command(flatten)]
    pub probe: ProbeArgs,
}

/// Flags of `alerts`.
#[derive(Clone, Debug, Args)]
pub struct AlertsArgs {
    /// The server whose StreamAlerts to tail, e.g. http://monitor:50052 (host:port alone
    /// means http://).
    #[arg(long, value_name = "URL", env = "MONITOR_SERVER", value_parser = parse_server)]
    pub server: String,

    /// Only events at or above this severity: "warning" (every alert) or "critical".
    #[arg(
        long,
        env = "MONITOR_MIN_SEVERITY",
        value_enum,
        default_value_t = MinSeverity::Warning
    )]
    pub min_severity: MinSeverity,

    /// Print each event as one JSON object on one line instead of text. (MONITOR_ALERTS_JSON
    /// accepts true/false, 1/0, yes/no, on/off.)
    #[arg(
        long,
        env = "MONITOR_ALERTS_JSON",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub json: bool,
}

/// The lowest alert severity `alerts` prints (`--min-severity`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum MinSeverity {
    /// Every alert: warning is the lowest severity.
    #[default]
    Warning,
    /// Critical alerts only (critical thresholds and OOM kills).
    Critical,
}

/// Probe flags shared by `serve`, `check` and `watch`, so all read the same way.
#[derive(Clone, Debug, Args)]
pub struct ProbeArgs {
    /// Where procfs is mounted: each process's statm, self/cgroup, meminfo and pressure/memory
    /// are read under it. /proc is the host's and the container's own view; change it only to read a
    /// mounted copy or a test fixture.
    #[arg(long, env = "MONITOR_PROC_ROOT", default_value = "/proc")]
    pub proc_root: PathBuf,

    /// Where the cgroup hierarchy is mounted (v2 unified, or v1 with a memory/ directory).
    /// /sys/fs/cgroup is where systemd and container runtimes mount it.
    #[arg(long, env = "MONITOR_CGROUP_ROOT", default_value = "/sys/fs/cgroup")]
    pub cgroup_root: PathBuf,

    /// Process to report (repeat the flag, or comma-separate in MONITOR_PIDS); the first is the
    /// sample's process, the others its targets. None by default: the monitor reports itself,
    /// which in a sidecar shares the pod's cgroup view.
    #[arg(
        long = "pid",
        value_name = "PID",
        env = "MONITOR_PIDS",
        value_delimiter = ',',
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub pids: Vec<u32>,

    /// Usage ratio (0..1] at or above which the level is WARNING (and, in `serve`, the usage
    /// WARNING alert fires after --dwell). 0.80 leaves a fifth of the limit to react in (shed
    /// load, recycle workers) before the kernel's OOM killer acts.
    #[arg(long, env = "MONITOR_WARN_RATIO", default_value = "0.80", value_parser = parse_ratio)]
    pub warn_ratio: f64,

    /// Usage ratio (0..1] at or above which the level is CRITICAL (and, in `serve`, the usage
    /// CRITICAL alert fires after --dwell); must be above --warn-ratio. 0.90: past it, one
    /// more large request can trigger the OOM killer.
    #[arg(
        long,
        env = "MONITOR_CRITICAL_RATIO",
        default_value = "0.90",
        value_parser = parse_ratio
    )]
    pub critical_ratio: f64,
}

/// A configuration value the flag parsers could not rule out on their own.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    /// A ratio outside (0, 1].
    #[error("{flag} must be a fraction in (0, 1], got {value}")]
    Ratio {
        /// The flag and its variable.
        flag: &'static str,
        /// The rejected value.
        value: f64,
    },
    /// Warning not below critical: the WARNING level could never be seen.
    #[error(
        "--warn-ratio/MONITOR_WARN_RATIO ({warn}) must be below \
         --critical-ratio/MONITOR_CRITICAL_RATIO ({critical})"
    )]
    RatioOrder {
        /// The warning ratio.
        warn: f64,
        /// The critical ratio.
        critical: f64,
    },
    /// A default interval below [`MIN_INTERVAL`].
    #[error("--default-interval/MONITOR_DEFAULT_INTERVAL must be at least 100ms, got {0:?}")]
    IntervalTooShort(Duration),
    /// A shutdown grace above [`MAX_SHUTDOWN_GRACE`].
    #[error("--shutdown-grace/MONITOR_SHUTDOWN_GRACE must be at most 1h, got {0:?}")]
    GraceTooLong(Duration),
    /// An alert flag out of range, or the PSI thresholds misordered.
    #[error(transparent)]
    Alerts(#[from] AlertArgsError),
    /// A fan-out setting (`--subscriber-buffer`, `--slow-subscriber-timeout`,
    /// `--max-subscribers`) outside its range.
    #[error("{flag} must be {rule}, got {value}")]
    OutOfRange {
        /// The flag and its variable.
        flag: &'static str,
        /// The accepted range.
        rule: &'static str,
        /// The rejected value.
        value: String,
    },
}

impl Cli {
    /// Parses the process's arguments and environment; prints a clap error naming the bad flag
    /// and exits with status 2 when they are invalid (clap's convention for usage errors).
    pub fn parse_valid() -> Self {
        let cli = Self::parse();
        if let Err(error) = cli.validate() {
            cli.usage_error(&error).exit();
        }
        cli
    }

    /// Like [`Cli::parse_valid`] on an explicit argument list, returning the error instead of
    /// exiting (for tests and embedding).
    pub fn try_parse_valid<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let cli = Self::try_parse_from(args)?;
        cli.validate().map_err(|error| cli.usage_error(&error))?;
        Ok(cli)
    }

    /// `error` formatted like clap's own, with the subcommand's usage line.
    fn usage_error(&self, error: &ConfigError) -> clap::Error {
        let name = match self.command {
            Command::Serve(_) => "serve",
            Command::Check(_) => "check",
            Command::Watch(_) => "watch",
            Command::Alerts(_) => "alerts",
        };
        let mut command = Self::command();
        // Building fills in the subcommands' bin names ("monitor-service serve") for the usage.
        command.build();
        match command.find_subcommand_mut(name) {
            Some(subcommand) => subcommand.error(clap::error::ErrorKind::ValueValidation, error),
            None => command.error(clap::error::ErrorKind::ValueValidation, error),
        }
    }

    /// Checks the rules that span several flags.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match &self.command {
            Command::Serve(args) => args.validate(),
            Command::Check(args) => args.probe.validate(),
            Command::Watch(args) => args.probe.validate(),
            // Its flags are all checked while parsing.
            Command::Alerts(_) => Ok(()),
        }
    }
}

impl ServeArgs {
    /// Checks every value, so a `ServeArgs` built in code (tests, embedding) gets the same
    /// guarantees as one parsed from the command line.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.default_interval < MIN_INTERVAL {
            return Err(ConfigError::IntervalTooShort(self.default_interval));
        }
        if self.shutdown_grace > MAX_SHUTDOWN_GRACE {
            return Err(ConfigError::GraceTooLong(self.shutdown_grace));
        }
        self.validate_fan_out()?;
        self.alerts.validate()?;
        self.probe.validate()
    }
}

impl ServeArgs {
    /// The ranges the fan-out flags' parsers enforce, for values built in code.
    fn validate_fan_out(&self) -> Result<(), ConfigError> {
        if !(1..=MAX_SUBSCRIBER_BUFFER).contains(&self.subscriber_buffer) {
            return Err(ConfigError::OutOfRange {
                flag: "--subscriber-buffer/MONITOR_SUBSCRIBER_BUFFER",
                rule: "in 1..=4096",
                value: self.subscriber_buffer.to_string(),
            });
        }
        if !(MIN_INTERVAL..=MAX_SLOW_SUBSCRIBER_TIMEOUT).contains(&self.slow_subscriber_timeout) {
            return Err(ConfigError::OutOfRange {
                flag: "--slow-subscriber-timeout/MONITOR_SLOW_SUBSCRIBER_TIMEOUT",
                rule: "between 100ms and 1h",
                value: humantime::format_duration(self.slow_subscriber_timeout).to_string(),
            });
        }
        if !(1..=1_000_000).contains(&self.max_subscribers) {
            return Err(ConfigError::OutOfRange {
                flag: "--max-subscribers/MONITOR_MAX_SUBSCRIBERS",
                rule: "in 1..=1000000",
                value: self.max_subscribers.to_string(),
            });
        }
        Ok(())
    }

    /// The sampler's settings these flags describe.
    pub fn sampler_config(&self) -> SamplerConfig {
        SamplerConfig {
            server_interval: self.default_interval,
            subscriber_buffer: self.subscriber_buffer,
            slow_subscriber_timeout: self.slow_subscriber_timeout,
            max_subscribers: self.max_subscribers,
        }
    }
}

/// Longest `--slow-subscriber-timeout`: a client that read nothing for an hour is gone.
pub const MAX_SLOW_SUBSCRIBER_TIMEOUT: Duration = Duration::from_secs(3600);

/// `--slow-subscriber-timeout`: a humantime duration in 100ms..=1h.
fn parse_slow_subscriber_timeout(text: &str) -> Result<Duration, String> {
    let timeout = humantime::parse_duration(text).map_err(|error| error.to_string())?;
    if (MIN_INTERVAL..=MAX_SLOW_SUBSCRIBER_TIMEOUT).contains(&timeout) {
        Ok(timeout)
    } else {
        Err(format!(
            "must be between 100ms and 1h, got {}",
            humantime::format_duration(timeout)
        ))
    }
}

impl Default for ServeArgs {
    /// The same values as the command line's defaults.
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 50052)),
            default_interval: Duration::from_secs(1),
            probe: ProbeArgs::default(),
            shutdown_grace: Duration::from_secs(25),
            log_format: LogFormat::Text,
            subscriber_buffer: 16,
            slow_subscriber_timeout: Duration::from_secs(30),
            max_subscribers: 10_000,
            alerts: AlertArgs::default(),
            history: HistoryArgs::default(),
        }
    }
}

impl ProbeArgs {
    /// Checks the ratios: each in (0, 1], warning below critical.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (flag, value) in [
            ("--warn-ratio/MONITOR_WARN_RATIO", self.warn_ratio),
            (
                "--critical-ratio/MONITOR_CRITICAL_RATIO",
                self.critical_ratio,
            ),
        ] {
            if !is_ratio(value) {
                return Err(ConfigError::Ratio { flag, value });
            }
        }
        if self.warn_ratio >= self.critical_ratio {
            return Err(ConfigError::RatioOrder {
                warn: self.warn_ratio,
                critical: self.critical_ratio,
            });
        }
        Ok(())
    }

    /// The probe configuration these flags describe.
    pub fn probe_config(&self) -> ProbeConfig {
        ProbeConfig {
            proc_root: self.proc_root.clone(),
            cgroup_root: self.cgroup_root.clone(),
            pids: self.pids.clone(),
            warn_ratio: self.warn_ratio,
            critical_ratio: self.critical_ratio,
        }
    }
}

impl Default for ProbeArgs {
    /// The same values as the command line's defaults (and [`ProbeConfig::default`]).
    fn default() -> Self {
        let ProbeConfig {
            proc_root,
            cgroup_root,
            pids,
            warn_ratio,
            critical_ratio,
        } = ProbeConfig::default();
        Self {
            proc_root,
            cgroup_root,
            pids,
            warn_ratio,
            critical_ratio,
        }
    }
}

fn is_ratio(value: f64) -> bool {
    value > 0.0 && value <= 1.0
}

/// A fraction in (0, 1]; NaN and infinities are rejected by the range check.
fn parse_ratio(text: &str) -> Result<f64, String> {
    let value: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("expected a fraction such as 0.85, got {text:?}"))?;
    if is_ratio(value) {
        Ok(value)
    } else {
        Err(format!("must be a fraction in (0, 1], got {value}"))
    }
}

/// A humantime duration of at least [`MIN_INTERVAL`].
fn parse_interval(text: &str) -> Result<Duration, String> {
    let interval = humantime::parse_duration(text).map_err(|error| error.to_string())?;
    if interval < MIN_INTERVAL {
        Err(format!(
            "must be at least 100ms, got {}",
            humantime::format_duration(interval)
        ))
    } else {
        Ok(interval)
    }
}

/// A humantime duration of at most [`MAX_SHUTDOWN_GRACE`].
fn parse_grace(text: &str) -> Result<Duration, String> {
    let grace = humantime::parse_duration(text).map_err(|error| error.to_string())?;
    if grace > MAX_SHUTDOWN_GRACE {
        Err(format!(
            "must be at most 1h, got {}",
            humantime::format_duration(grace)
        ))
    } else {
        Ok(grace)
    }
}

/// Longest `watch --interval`: StreamSamples carries it as a u32 of milliseconds (49 days), and
/// a reading less than once a day is a typo rather than monitoring.
pub const MAX_WATCH_INTERVAL: Duration = Duration::from_secs(24 * 3600);

/// A humantime duration, or a bare number of seconds as the old script took them.
fn parse_seconds_or_humantime(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    match text.parse::<u64>() {
        Ok(seconds) => Ok(Duration::from_secs(seconds)),
        Err(_) => humantime::parse_duration(text).map_err(|error| error.to_string()),
    }
}

/// `watch --duration`: any length, 0 meaning until interrupted.
fn parse_watch_duration(text: &str) -> Result<Duration, String> {
    parse_seconds_or_humantime(text)
}

/// `watch --interval`: between [`MIN_INTERVAL`] and [`MAX_WATCH_INTERVAL`].
fn parse_watch_interval(text: &str) -> Result<Duration, String> {
    let interval = parse_seconds_or_humantime(text)?;
    if interval < MIN_INTERVAL {
        Err(format!(
            "must be at least 100ms, got {}",
            humantime::format_duration(interval)
        ))
    } else if interval > MAX_WATCH_INTERVAL {
        Err(format!(
            "must be at most 24h, got {}",
            humantime::format_duration(interval)
        ))
    } else {
        Ok(interval)
    }
}

/// A server address as `http://host:port`: "host:port" gains the scheme; https, paths and
/// queries are refused, because this build's client speaks plaintext HTTP/2 only and a path
/// would be silently dropped by gRPC routing.
fn parse_server(text: &str) -> Result<String, String> {
    let text = text.trim();
    let with_scheme = if text.contains("://") {
        text.to_owned()
    } else {
        format!("http://{text}")
    };
    let uri: http::Uri = with_scheme
        .parse()
        .map_err(|error| format!("expected a URL such as http://127.0.0.1:50052: {error}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err("https is not supported (plaintext gRPC only); use http://".to_owned());
        }
        _ => return Err(format!("expected an http:// URL, got {text:?}")),
    }
    let Some(authority) = uri.authority().filter(|a| !a.host().is_empty()) else {
        return Err(format!(
            "expected a host, as in http://127.0.0.1:50052, got {text:?}"
        ));
    };
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err(format!("expected no path or query, got {text:?}"));
    }
    Ok(format!("http://{authority}"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn serve(args: &[&str]) -> Result<ServeArgs, clap::Error> {
        let cli = Cli::try_parse_valid(["monitor-service", "serve"].iter().chain(args).copied())?;
        match cli.command {
            Command::Serve(args) => Ok(args),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        // Only when the environment does not set them, as in CI.
        if std::env::vars().any(|(name, _)| name.starts_with("MONITOR_")) {
            return;
        }
        let args = serve(&[]).unwrap();
        let defaults = ServeArgs::default();
        assert_eq!(args.listen, defaults.listen);
        assert_eq!(args.default_interval, Duration::from_secs(1));
        assert_eq!(args.shutdown_grace, Duration::from_secs(25));
        assert_eq!(args.log_format, LogFormat::Text);
        assert_eq!(args.probe.probe_config(), ProbeConfig::default());
    }

    #[test]
    fn parses_every_flag() {
        let args = serve(&[
            "--listen",
            "127.0.0.1:6000",
            "--default-interval",
            "500ms",
            "--proc-root",
            "/host/proc",
            "--cgroup-root",
            "/host/cgroup",
            "--pid",
            "10",
            "--pid",
            "11,12",
            "--warn-ratio",
            "0.5",
            "--critical-ratio",
            "0.6",
            "--shutdown-grace",
            "3s",
            "--log-format",
            "json",
        ])
        .unwrap();
        assert_eq!(args.listen, "127.0.0.1:6000".parse().unwrap());
        assert_eq!(args.default_interval, Duration::from_millis(500));
        assert_eq!(args.probe.proc_root, PathBuf::from("/host/proc"));
        assert_eq!(args.probe.cgroup_root, PathBuf::from("/host/cgroup"));
        assert_eq!(args.probe.pids, vec![10, 11, 12]);
        assert_eq!(
            (args.probe.warn_ratio, args.probe.critical_ratio),
            (0.5, 0.6)
        );
        assert_eq!(args.shutdown_grace, Duration::from_secs(3));
        assert_eq!(args.log_format, LogFormat::Json);
    }

    #[test]
    fn check_shares_the_probe_flags() {
        let cli = Cli::try_parse_valid([
            "monitor-service",
            "check",
            "--json",
            "--proc-root",
            "/p",
            "--pid",
            "7",
        ])
        .unwrap();
        let Command::Check(args) = cli.command else {
            panic!("parsed as serve");
        };
        assert!(args.json);
        assert_eq!(args.probe.proc_root, PathBuf::from("/p"));
        assert_eq!(args.probe.pids, vec![7]);
    }

    #[test]
    fn bad_values_are_errors_naming_the_flag() {
        for (args, flag) in [
            (&["--default-interval", "50ms"][..], "--default-interval"),
            (&["--default-interval", "soon"][..], "--default-interval"),
            (&["--warn-ratio", "0"][..], "--warn-ratio"),
            (&["--warn-ratio", "NaN"][..], "--warn-ratio"),
            (&["--critical-ratio", "1.5"][..], "--critical-ratio"),
            (&["--pid", "0"][..], "--pid"),
            (&["--shutdown-grace", "2h"][..], "--shutdown-grace"),
            (&["--listen", "localhost"][..], "--listen"),
            (&["--log-format", "xml"][..], "--log-format"),
            (
                &["--warn-ratio", "0.9", "--critical-ratio", "0.9"][..],
                "--warn-ratio",
            ),
        ] {
            let error = serve(args).unwrap_err();
            let text = error.to_string();
            assert!(text.contains(flag), "{args:?}: {text}");
            assert_eq!(error.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn validate_catches_values_built_in_code() {
        let mut args = ServeArgs {
            default_interval: Duration::from_millis(99),
            ..ServeArgs::default()
        };
        assert_eq!(
            args.validate(),
            Err(ConfigError::IntervalTooShort(Duration::from_millis(99)))
        );
        args.default_interval = MIN_INTERVAL;
        args.probe.critical_ratio = f64::NAN;
        assert!(matches!(
            args.validate(),
            Err(ConfigError::Ratio { flag, .. }) if flag.starts_with("--critical-ratio")
        ));
        args.probe.critical_ratio = 0.7;
        assert_eq!(
            args.validate(),
            Err(ConfigError::RatioOrder {
                warn: 0.8,
                critical: 0.7
            })
        );
        args.probe.critical_ratio = 1.0;
        assert_eq!(args.validate(), Ok(()));
        args.shutdown_grace = MAX_SHUTDOWN_GRACE + Duration::from_secs(1);
        assert!(matches!(args.validate(), Err(ConfigError::GraceTooLong(_))));
    }
}
