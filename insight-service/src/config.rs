//! Command-line and environment configuration. Every flag has an env twin so the same binary is
//! configured by flags on a laptop and by env in a Kubernetes manifest.

use std::time::Duration;

use clap::Parser;
use monitor_service::lifecycle::LogFormat;

/// insight-service: chunked map-reduce summaries of user feedback over gRPC.
#[derive(Clone, Debug, PartialEq, Parser)]
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
    #[arg(long, env = "INSIGHT_SHUTDOWN_GRACE", default_value = "25s", value_parser = within(Duration::ZERO, MAX_TIMEOUT))]
    pub shutdown_grace: Duration,

    /// Largest `max_entries` a request may ask for (and what `max_entries = 0` means).
    #[arg(
        long,
        env = "INSIGHT_MAX_ENTRIES_CAP",
        default_value_t = 10_000,
        value_parser = clap::value_parser!(u32).range(1..=1_000_000)
    )]
    pub max_entries_cap: u32,

    /// Longest a request may run when the caller sets no deadline (and the cap on the
    /// caller's `grpc-timeout`). 120 s is the seed's gunicorn timeout.
    #[arg(long, env = "INSIGHT_REQUEST_TIMEOUT", default_value = "120s", value_parser = within(Duration::from_millis(1), MAX_TIMEOUT))]
    pub request_timeout: Duration,

    /// Longest a response may wait for the client to take it (HTTP/2 flow-control window at
    /// zero: the client stopped reading) before its connection is closed, like nginx's
    /// `send_timeout`; otherwise such a client keeps the call's slot and memory for as long as
    /// it stays connected.
    #[arg(long, env = "INSIGHT_SEND_TIMEOUT", default_value = "30s", value_parser = within(Duration::from_millis(1), MAX_TIMEOUT))]
    pub send_timeout: Duration,

    /// Longest the server waits for the next bytes of a request body it is reading before the
    /// call ends DEADLINE_EXCEEDED, like nginx's `client_body_timeout`: a client that sends
    /// its headers (or part of its message) and then nothing would otherwise hold a heavy
    /// slot and its memory reservation until the deadline (--request-timeout, 120 s). A heavy
    /// call's message must also arrive at `--min-body-rate` on average after this grace.
    #[arg(long, env = "INSIGHT_RECV_TIMEOUT", default_value = "10s", value_parser = within(Duration::from_millis(1), MAX_TIMEOUT))]
    pub recv_timeout: Duration,

    /// Slowest average rate, in bytes per second, at which a heavy call's request message
    /// must arrive after the `--recv-timeout` grace, or the call ends DEADLINE_EXCEEDED: a
    /// body trickling a byte just inside each receive timeout would otherwise hold a heavy
    /// slot until the deadline. At 256 KiB a 4 MiB message has 10 s + 16 s. A client can send
    /// at most one `--h2-stream-window` (64 KiB) per round trip, so clients more than
    /// 0.25 s away need a larger window or a lower rate.
    #[arg(long, env = "INSIGHT_MIN_BODY_RATE", default_value = "256KiB", value_parser = bytes_within(1 << 10, 1 << 30))]
    pub min_body_rate: u64,

    /// Which LLM answers: `local` (offline, deterministic, no key), `gemini` (Google AI
    /// REST, key in GEMINI_API_KEY or --llm-api-key-file) or `openai` (any OpenAI-compatible
    /// chat completions server: OpenAI, Ollama, vLLM, llama.cpp, LiteLLM; key in OPENAI_API_KEY).
    #[arg(long, env = "INSIGHT_LLM_BACKEND", value_enum, default_value_t = BackendKind::Local)]
    pub llm_backend: BackendKind,

    /// Model name for gemini/openai (default: gemini-2.5-flash or gpt-4o-mini).
    #[arg(long, env = "INSIGHT_LLM_MODEL")]
    pub llm_model: Option<String>,

    /// Base URL of the LLM API (default: the provider's public endpoint). Point it at a local
    /// server (Ollama: http://127.0.0.1:11434) or a test fake.
    #[arg(long, env = "INSIGHT_LLM_BASE_URL")]
    pub llm_base_url: Option<String>,

    /// File holding the API key (e.g. a mounted Kubernetes secret); overrides GEMINI_API_KEY /
    /// OPENAI_API_KEY. Keys are never taken as flags, so they never show in `ps`.
    #[arg(long, env = "INSIGHT_LLM_API_KEY_FILE")]
    pub llm_api_key_file: Option<std::path::PathBuf>,

    /// Longest one LLM call may take, retries included (never past the caller's deadline).
    #[arg(long, env = "INSIGHT_LLM_TIMEOUT", default_value = "60s", value_parser = within(Duration::from_millis(1), MAX_TIMEOUT))]
    pub llm_timeout: Duration,

    /// Longest silence between two chunks of a streamed LLM answer before it counts as stalled.
    #[arg(long, env = "INSIGHT_LLM_STALL_TIMEOUT", default_value = "15s", value_parser = within(Duration::from_millis(1), MAX_TIMEOUT))]
    pub llm_stall_timeout: Duration,

    /// Most bytes read of one LLM response body; past it the call fails instead of buffering.
    /// 1 KiB to 64 MiB: no summary is larger, and the memory estimate reserves three times
    /// this for every call in flight.
    #[arg(long, env = "INSIGHT_LLM_MAX_RESPONSE_BYTES", default_value = "1MiB", value_parser = response_bytes)]
    pub llm_max_response_bytes: usize,

    /// Retries of one LLM call on 429/5xx/connect errors (jittered backoff, Retry-After honoured).
    #[arg(long, env = "INSIGHT_LLM_MAX_RETRIES", default_value_t = 3)]
    pub llm_max_retries: u32,

    /// Use the provider's streaming endpoint (SSE), so a stalled answer is detected early.
    #[arg(long, env = "INSIGHT_LLM_STREAM", default_value_t = false, action = clap::ArgAction::Set)]
    pub llm_stream: bool,

    /// Model thinking. Gemini: `auto` turns it off where the model allows (2.5 Flash and
    /// Flash-Lite, whose thoughts would otherwise use up a short answer's maxOutputTokens),
    /// keeps 2.5 Pro at its minimum (128) and leaves other models their default (adding 8192
    /// to maxOutputTokens for the thoughts of 2.5 and later, e.g. Gemini 3); a number N
    /// sends `thinkingBudget` N and adds N to maxOutputTokens (2.5 Pro needs at least 128).
    /// OpenAI-compatible: tokens added to the answer's cap for reasoning, which reasoning
    /// models count in it; `auto` adds 8192 for a reasoning model by name (o-series, gpt-5,
    /// R1, QwQ, Qwen3...) and nothing otherwise; N adds N for any model.
    #[arg(long, env = "INSIGHT_LLM_THINKING_BUDGET", default_value = "auto", value_parser = clap::value_parser!(crate::llm::gemini::ThinkingBudget))]
    pub llm_thinking_budget: crate::llm::gemini::ThinkingBudget,

    /// OpenAI-compatible: how JSON answers are requested. `schema` (structured outputs,
    /// falling back to `object` once if the server rejects it), `object` (`json_object`), or
    /// `off` (no `response_format`, for servers that reject both; the prompt asks for JSON).
    #[arg(long, env = "INSIGHT_LLM_JSON_MODE", default_value = "schema", value_parser = clap::value_parser!(crate::llm::openai::JsonMode))]
    pub llm_json_mode: crate::llm::openai::JsonMode,

    /// OpenAI-compatible: the name of the answer's token cap in the request. `max_tokens`
    /// (Ollama, vLLM, llama.cpp, LiteLLM, older OpenAI models) or `max_completion_tokens`
    /// (OpenAI's reasoning models, which refuse `max_tokens`).
    #[arg(long, env = "INSIGHT_LLM_TOKEN_LIMIT_FIELD", default_value = "max_tokens", value_parser = clap::value_parser!(crate::llm::openai::TokenLimitField))]
    pub llm_token_limit_field: crate::llm::openai::TokenLimitField,

    /// Chunks summarized at once per request. 4 matches the seed's 4 worker threads.
    #[arg(long, env = "INSIGHT_MAP_PARALLELISM", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub map_parallelism: u32,

    /// Most bytes of feedback (or chunk insights) in one prompt: chunks are cut by entry count
    /// AND by this, and the reduce collapses in levels when the insights exceed it. At least
    /// 4096: a reduce prompt must hold two partial summaries.
    #[arg(long, env = "INSIGHT_PROMPT_BUDGET_BYTES", default_value_t = 16 * 1024, value_parser = clap::value_parser!(u32).range(crate::pipeline::MIN_PROMPT_BUDGET_BYTES as i64..=1_048_576))]
    pub prompt_budget_bytes: u32,

    /// Most intermediate reduce levels; past it each partial summary is cut to fit.
    #[arg(long, env = "INSIGHT_MAX_REDUCE_DEPTH", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub max_reduce_depth: u32,

    /// `off` disables concurrency limiting, memory admission and pressure shedding (for the
    /// control run of the OOM test only: expect the kernel to kill the process under load),
    /// and with them what the memory layer checks on the way: message sizes are then checked
    /// by tonic alone (OUT_OF_RANGE, not RESOURCE_EXHAUSTED), light calls get no 64 KiB
    /// limit, `--recv-timeout` and the least body rate no longer apply, and an empty or cut
    /// body is tonic's INTERNAL.
    #[arg(long, env = "INSIGHT_OVERLOAD_PROTECTION", value_enum, default_value_t = Switch::On)]
    pub overload_protection: Switch,

    /// Heavy calls (summaries, analyses, imports) running at once. 4 is the seed's 4 threads.
    #[arg(long, env = "INSIGHT_MAX_CONCURRENCY", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_concurrency: u32,

    /// Heavy calls that may wait for a slot; beyond it calls are refused at once
    /// (RESOURCE_EXHAUSTED with RetryInfo). Short, so overload is visible rather than queued.
    #[arg(long, env = "INSIGHT_QUEUE_DEPTH", default_value_t = 8)]
    pub queue_depth: u32,

    /// Longest wait in that queue before RESOURCE_EXHAUSTED.
    #[arg(long, env = "INSIGHT_QUEUE_TIMEOUT", default_value = "2s", value_parser = within(Duration::ZERO, MAX_TIMEOUT))]
    pub queue_timeout: Duration,

    /// Bytes of estimated peak memory all heavy calls may reserve together (e.g. "128MiB");
    /// 0 = half the cgroup memory limit, else a quarter of the machine's memory.
    #[arg(long, env = "INSIGHT_MEMORY_BUDGET", default_value = "0", value_parser = crate::admission::parse_bytes)]
    pub memory_budget: u64,

    /// Largest request or response message (e.g. "4MiB"), enforced by the transport for
    /// decoding and encoding, and (with overload protection on) refused RESOURCE_EXHAUSTED
    /// from its length prefix, before any byte of an oversized request is buffered. 1 KiB to
    /// 4 GiB - 1 (gRPC's length prefix is 32 bits).
    #[arg(long, env = "INSIGHT_MAX_MESSAGE_SIZE", default_value = "4MiB", value_parser = bytes_within(1 << 10, u64::from(u32::MAX)))]
    pub max_message_size: u64,

    /// How often memory pressure is sampled in-process.
    #[arg(long, env = "INSIGHT_PRESSURE_INTERVAL", default_value = "100ms", value_parser = within(PRESSURE_INTERVAL.0, PRESSURE_INTERVAL.1))]
    pub pressure_interval: Duration,

    /// Memory usage ratio (working set / cgroup limit, else used / total) at which work is
    /// made cheaper (one map call at a time, half the prompt budget).
    #[arg(long, env = "INSIGHT_WARN_RATIO", default_value_t = 0.80, value_parser = ratio)]
    pub warn_ratio: f64,

    /// Memory usage ratio at which new heavy calls are shed and readiness turns NOT_SERVING.
    #[arg(long, env = "INSIGHT_CRITICAL_RATIO", default_value_t = 0.90, value_parser = ratio)]
    pub critical_ratio: f64,

    /// PSI memory "some" avg10 (percent of time stalled) counted as warning.
    #[arg(long, env = "INSIGHT_WARN_PSI", default_value_t = 10.0, value_parser = psi)]
    pub warn_psi: f64,

    /// PSI memory "some" avg10 counted as critical.
    #[arg(long, env = "INSIGHT_CRITICAL_PSI", default_value_t = 25.0, value_parser = psi)]
    pub critical_psi: f64,

    /// A pressure level is left only below threshold × (1 − this), so readiness does not flap.
    #[arg(long, env = "INSIGHT_PRESSURE_HYSTERESIS", default_value_t = 0.05, value_parser = hysteresis)]
    pub pressure_hysteresis: f64,

    /// A monitor-service to follow (e.g. `http://monitor:50052`): its firing WARNING and
    /// CRITICAL alerts count as memory pressure too, next to the in-process probe. Optional;
    /// while it is unreachable only that extra signal is missing.
    #[arg(long, env = "INSIGHT_MONITOR_URL", value_parser = parse_monitor_url)]
    pub monitor_url: Option<String>,

    /// Where procfs is mounted, for the pressure probe (tests point it at fixture trees).
    #[arg(long, env = "INSIGHT_PROBE_PROC_ROOT", default_value = "/proc")]
    pub probe_proc_root: std::path::PathBuf,

    /// Where the cgroup hierarchy is mounted, for the pressure probe.
    #[arg(
        long,
        env = "INSIGHT_PROBE_CGROUP_ROOT",
        default_value = "/sys/fs/cgroup"
    )]
    pub probe_cgroup_root: std::path::PathBuf,

    /// HTTP/2 streams one connection may have open; bounds per-connection buffering. At
    /// least 1 (0 would refuse every call).
    #[arg(long, env = "INSIGHT_MAX_CONCURRENT_STREAMS", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_streams: u32,

    /// HTTP/2 initial stream window: how much of a request body the server accepts before the
    /// handler reads it; a queued call buffers at most this much.
    #[arg(long, env = "INSIGHT_H2_STREAM_WINDOW", default_value = "64KiB", value_parser = window_bytes)]
    pub h2_stream_window: u64,

    /// HTTP/2 initial connection window (all streams of one connection together).
    #[arg(long, env = "INSIGHT_H2_CONNECTION_WINDOW", default_value = "1MiB", value_parser = window_bytes)]
    pub h2_connection_window: u64,

    /// Where imported feedback and listening plays are stored: sqlite://PATH (created on
    /// first start, WAL mode; relative to the working directory) or
    /// postgres://USER@HOST:PORT/DB for several replicas on one database. While it is
    /// unreachable the server still serves summaries and the store RPCs answer UNAVAILABLE.
    #[arg(
        long,
        env = "INSIGHT_DATABASE_URL",
        // The variable may hold a password; --help must not print it.
        hide_env_values = true,
        default_value = crate::store::DEFAULT_DATABASE_URL,
        value_parser = crate::store::DatabaseUrl::parse
    )]
    pub database_url: crate::store::DatabaseUrl,

    /// Bring the store's schema up to date at start (the `.sql` migrations built into the
    /// binary). Turn off where a deploy step migrates, or the database user may not alter it.
    #[arg(long, env = "INSIGHT_MIGRATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate: bool,

    /// How long a computed summary (and each remote chunk insight) is served from the insight
    /// cache; 0 turns the cache off. Expired rows are deleted hourly (or every TTL if shorter).
    #[arg(long, env = "INSIGHT_CACHE_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub cache_ttl: Duration,

    /// Longest a summary waits on the insight cache (getting a connection, a lookup, a write)
    /// before it goes on without it, and never more than half the call's time left. A step
    /// that fails or outlasts this wait (or three in a row, none answered, that outlast
    /// their callers' half-time) leaves the cache unused for 30 s: the cache only saves work,
    /// so a slow or unreachable database must not hold every request. Raise it for a distant
    /// database; 50 ms to 5 s, the store's own limit on waiting for a connection or a write
    /// lock, past which a longer wait changes nothing.
    #[arg(long, env = "INSIGHT_CACHE_WAIT", default_value = "1s", value_parser = within(CACHE_WAIT_RANGE.0, CACHE_WAIT_RANGE.1))]
    pub cache_wait: Duration,

    /// Background job workers in this process; 0 = accept jobs but leave running them to
    /// other replicas on the same database.
    #[arg(long, env = "INSIGHT_JOB_WORKERS", default_value_t = 2, value_parser = clap::value_parser!(u32).range(0..=64))]
    pub job_workers: u32,

    /// How long a worker's claim on a job lasts without renewal (renewed every third of it):
    /// a job whose worker died is taken over by another worker this long after.
    #[arg(long, env = "INSIGHT_JOB_LEASE", default_value = "30s", value_parser = at_least(Duration::from_secs(1)))]
    pub job_lease: Duration,

    /// How often idle workers look for jobs submitted to other replicas, and WatchJob
    /// re-reads a job changed elsewhere.
    #[arg(long, env = "INSIGHT_JOB_POLL", default_value = "500ms", value_parser = at_least(Duration::from_millis(10)))]
    pub job_poll: Duration,

    /// Longest a background job may run before it FAILS with a deadline error.
    #[arg(long, env = "INSIGHT_JOB_TIMEOUT", default_value = "1h", value_parser = humantime::parse_duration)]
    pub job_timeout: Duration,

    /// Finished jobs (and their results) are deleted this long after they ended.
    #[arg(long, env = "INSIGHT_JOB_RETENTION", default_value = "7days", value_parser = humantime::parse_duration)]
    pub job_retention: Duration,
}

/// A duration parser refusing values below `min` (a zero lease would make every job look
/// abandoned at once; a zero poll interval would spin on the database).
fn at_least(min: Duration) -> impl Fn(&str) -> Result<Duration, String> + Clone {
    within(min, MAX_TIMEOUT)
}

/// The longest timeout or interval a flag accepts: a day, far beyond any useful setting, and
/// short enough that adding it to the clock can never overflow.
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// The range of `--cache-wait`.
const CACHE_WAIT_RANGE: (Duration, Duration) =
    (Duration::from_millis(50), crate::store::ACQUIRE_TIMEOUT);

/// The range of `--pressure-interval`.
const PRESSURE_INTERVAL: (Duration, Duration) =
    (Duration::from_millis(10), Duration::from_secs(60));

/// A duration flag between `min` and `max`: `--pressure-interval 0s` would panic the sampling
/// task (and leave shedding silently off), an absurd `--request-timeout` would overflow the
/// clock when a deadline is computed.
fn within(min: Duration, max: Duration) -> impl Fn(&str) -> Result<Duration, String> + Clone {
    move |text| {
        let value = humantime::parse_duration(text).map_err(|e| e.to_string())?;
        check_within(value, min, max)?;
        Ok(value)
    }
}

/// The range check of [`within`], for a duration already parsed (or set in code).
fn check_within(value: Duration, min: Duration, max: Duration) -> Result<(), String> {
    if value < min {
        return Err(format!(
            "must be at least {}",
            humantime::format_duration(min)
        ));
    }
    if value > max {
        return Err(format!(
            "must be at most {}",
            humantime::format_duration(max)
        ));
    }
    Ok(())
}

/// The values a number flag accepts: from `lo` (itself included or not) to `hi` inclusive.
#[derive(Clone, Copy, Debug)]
struct Bounds {
    lo: f64,
    lo_included: bool,
    hi: f64,
}

/// A memory usage ratio threshold, in (0, 1].
const RATIO: Bounds = Bounds {
    lo: 0.0,
    lo_included: false,
    hi: 1.0,
};
/// A PSI threshold (percent of time stalled), in (0, 100]: 0 would count a missing PSI
/// reading as pressure.
const PSI: Bounds = Bounds {
    lo: 0.0,
    lo_included: false,
    hi: 100.0,
};
/// The hysteresis fraction, in [0, 0.5]: at 1 or more a level could never be left.
const HYSTERESIS: Bounds = Bounds {
    lo: 0.0,
    lo_included: true,
    hi: 0.5,
};

impl Bounds {
    /// `value` if it is within (NaN and infinities never are: they would shed forever or
    /// never), else what the flag must be.
    fn check(self, value: f64) -> Result<f64, String> {
        let above_lo = if self.lo_included {
            value >= self.lo
        } else {
            value > self.lo
        };
        if above_lo && value <= self.hi {
            return Ok(value);
        }
        let open = if self.lo_included { '[' } else { '(' };
        Err(format!("must be in {open}{}, {}]", self.lo, self.hi))
    }

    /// The flag's parser: a number within.
    fn parse(self, text: &str) -> Result<f64, String> {
        let value: f64 = text
            .trim()
            .parse()
            .map_err(|_| format!("{text:?} is not a number"))?;
        self.check(value)
    }
}

fn ratio(text: &str) -> Result<f64, String> {
    RATIO.parse(text)
}

fn psi(text: &str) -> Result<f64, String> {
    PSI.parse(text)
}

fn hysteresis(text: &str) -> Result<f64, String> {
    HYSTERESIS.parse(text)
}

/// A byte-size flag between `min` and `max` inclusive: `--max-message-size 0` would refuse
/// every call, a size beyond what a gRPC length prefix can state means nothing.
fn bytes_within(min: u64, max: u64) -> impl Fn(&str) -> Result<u64, String> + Clone {
    move |text| {
        let bytes = crate::admission::parse_bytes(text)?;
        if bytes < min {
            return Err(format!("must be at least {min} bytes"));
        }
        if bytes > max {
            return Err(format!("must be at most {max} bytes"));
        }
        Ok(bytes)
    }
}

/// `--llm-max-response-bytes`: 1 KiB to 64 MiB.
fn response_bytes(text: &str) -> Result<usize, String> {
    let bytes = bytes_within(1 << 10, 64 << 20)(text)?;
    usize::try_from(bytes).map_err(|_| "too large for this machine".to_owned())
}

/// An HTTP/2 window size: 1 KiB to 2^31 - 1 bytes, the protocol's limit. HTTP/2 allows 0,
/// but then no request body can arrive: every call with one would wait for its deadline.
fn window_bytes(text: &str) -> Result<u64, String> {
    bytes_within(1 << 10, (1 << 31) - 1)(text)
}

impl Config {
    /// Checks what one flag's parser cannot: the pressure thresholds, in order. `run` calls it,
    /// and the binary before binding, so a bad combination is a start-up error naming both
    /// flags rather than a service that never sheds (or never stops).
    pub fn check(&self) -> Result<(), String> {
        // The parsers' own ranges, for configs built in code (tests, embedders).
        for (flag, value, bounds) in [
            ("--warn-ratio", self.warn_ratio, RATIO),
            ("--critical-ratio", self.critical_ratio, RATIO),
            ("--warn-psi", self.warn_psi, PSI),
            ("--critical-psi", self.critical_psi, PSI),
            (
                "--pressure-hysteresis",
                self.pressure_hysteresis,
                HYSTERESIS,
            ),
        ] {
            bounds
                .check(value)
                .map_err(|must| format!("{flag} ({value}) {must}"))?;
        }
        // A zero interval would panic the sampling task (and leave shedding off).
        for (flag, value, (min, max)) in [
            (
                "--pressure-interval",
                self.pressure_interval,
                PRESSURE_INTERVAL,
            ),
            ("--cache-wait", self.cache_wait, CACHE_WAIT_RANGE),
        ] {
            check_within(value, min, max).map_err(|must| format!("{flag} ({value:?}) {must}"))?;
        }
        if let Some(url) = &self.monitor_url {
            parse_monitor_url(url).map_err(|error| format!("--monitor-url ({url}): {error}"))?;
        }
        let pairs = [
            (
                "--warn-ratio",
                self.warn_ratio,
                "--critical-ratio",
                self.critical_ratio,
            ),
            (
                "--warn-psi",
                self.warn_psi,
                "--critical-psi",
                self.critical_psi,
            ),
        ];
        for (warn_flag, warn, critical_flag, critical) in pairs {
            if warn >= critical {
                return Err(format!(
                    "{warn_flag} ({warn}) must be below {critical_flag} ({critical})"
                ));
            }
        }
        Ok(())
    }
}

/// An on/off flag value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    /// Enabled.
    #[default]
    On,
    /// Disabled.
    Off,
}

/// The LLM backend (`--llm-backend`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    /// Offline extractive summarizer.
    #[default]
    Local,
    /// Google AI Gemini REST API.
    Gemini,
    /// OpenAI-compatible chat completions.
    Openai,
}

impl Config {
    /// The pipeline's tuning from these flags.
    pub fn pipeline_config(&self) -> crate::pipeline::PipelineConfig {
        crate::pipeline::PipelineConfig {
            map_parallelism: self.map_parallelism as usize,
            prompt_budget_bytes: self.prompt_budget_bytes as usize,
            max_reduce_depth: self.max_reduce_depth as usize,
            llm_timeout: self.llm_timeout,
        }
    }

    /// The memory estimator's inputs from these flags (`crate::admission::estimator`). The
    /// `local` backend reads no model responses, so its calls are not charged for them.
    pub fn estimator_config(&self) -> crate::admission::estimator::EstimatorConfig {
        crate::admission::estimator::EstimatorConfig {
            max_entries_cap: u64::from(self.max_entries_cap),
            map_parallelism: u64::from(self.map_parallelism),
            prompt_budget_bytes: u64::from(self.prompt_budget_bytes),
            max_response_bytes: match self.llm_backend {
                BackendKind::Local => 0,
                BackendKind::Gemini | BackendKind::Openai => self.llm_max_response_bytes as u64,
            },
        }
    }

    /// The job workers' settings from these flags.
    pub fn jobs_config(&self) -> crate::jobs::JobsConfig {
        crate::jobs::JobsConfig {
            workers: self.job_workers as usize,
            lease: self.job_lease,
            poll: self.job_poll,
            timeout: self.job_timeout,
            retention: self.job_retention,
        }
    }
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
            request_timeout: Duration::from_secs(120),
            send_timeout: Duration::from_secs(30),
            recv_timeout: Duration::from_secs(10),
            min_body_rate: crate::admission::MIN_BODY_RATE,
            llm_backend: BackendKind::Local,
            llm_model: None,
            llm_base_url: None,
            llm_api_key_file: None,
            llm_timeout: Duration::from_secs(60),
            llm_stall_timeout: Duration::from_secs(15),
            llm_max_response_bytes: 1 << 20,
            llm_max_retries: 3,
            llm_stream: false,
            llm_thinking_budget: crate::llm::gemini::ThinkingBudget::Auto,
            llm_json_mode: crate::llm::openai::JsonMode::Schema,
            llm_token_limit_field: crate::llm::openai::TokenLimitField::MaxTokens,
            map_parallelism: 4,
            prompt_budget_bytes: 16 * 1024,
            max_reduce_depth: 4,
            overload_protection: Switch::On,
            max_concurrency: 4,
            queue_depth: 8,
            queue_timeout: Duration::from_secs(2),
            memory_budget: 0,
            max_message_size: 4 << 20,
            pressure_interval: Duration::from_millis(100),
            warn_ratio: 0.80,
            critical_ratio: 0.90,
            warn_psi: 10.0,
            critical_psi: 25.0,
            pressure_hysteresis: 0.05,
            monitor_url: None,
            probe_proc_root: "/proc".into(),
            probe_cgroup_root: "/sys/fs/cgroup".into(),
            max_concurrent_streams: 128,
            h2_stream_window: 64 << 10,
            h2_connection_window: 1 << 20,
            database_url: crate::store::DatabaseUrl::default(),
            migrate: true,
            cache_ttl: Duration::from_secs(24 * 60 * 60),
            cache_wait: crate::summaries::CACHE_WAIT,
            job_workers: 2,
            job_lease: Duration::from_secs(30),
            job_poll: Duration::from_millis(500),
            job_timeout: Duration::from_secs(60 * 60),
            job_retention: Duration::from_secs(7 * 24 * 60 * 60),
        }
    }
}

/// `--monitor-url`: an absolute `http://` URI with a host. Not `https://`: this build's gRPC
/// client has no TLS, so it would speak plaintext to a TLS port and fail on every attempt
/// while the operator believed the extra signal was on; refused at start instead.
pub fn parse_monitor_url(value: &str) -> Result<String, String> {
    let uri: http::Uri = value
        .parse()
        .map_err(|error| format!("not a URL ({error}); expected e.g. http://monitor:50052"))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http"), Some(_)) => Ok(value.to_owned()),
        (Some("https"), Some(_)) => Err(
            "https is not supported (the monitor client speaks plaintext HTTP/2, as \
             monitor-service serves it); expected e.g. http://monitor:50052"
                .into(),
        ),
        _ => Err("expected an http:// URL with a host, e.g. http://monitor:50052".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn defaults_match_the_parser() {
        // The env may set INSIGHT_* in a developer shell; only compare when it does not.
        if std::env::vars().any(|(k, _)| k.starts_with("INSIGHT_")) {
            return;
        }
        let parsed = Config::try_parse_from(["insight-service"]).unwrap();
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn openai_request_shape_flags() {
        use crate::llm::openai::{JsonMode, TokenLimitField};
        let config = Config::try_parse_from([
            "insight-service",
            "--llm-json-mode",
            "off",
            "--llm-token-limit-field",
            "max_completion_tokens",
        ])
        .unwrap();
        assert_eq!(config.llm_json_mode, JsonMode::Off);
        assert_eq!(
            config.llm_token_limit_field,
            TokenLimitField::MaxCompletionTokens
        );
        let err = Config::try_parse_from(["insight-service", "--llm-json-mode", "strict"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--llm-json-mode") && err.contains("schema, object, off"),
            "{err}"
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
    fn durations_and_windows_out_of_range_are_refused_naming_the_flag() {
        for (flag, value, says) in [
            ("--pressure-interval", "0s", "at least"),
            ("--request-timeout", "1000000years", "at most"),
            ("--llm-timeout", "0s", "at least"),
            ("--h2-stream-window", "4GiB", "at most"),
            ("--h2-connection-window", "2GiB", "at most"),
            ("--h2-stream-window", "0", "at least 1024 bytes"),
            ("--max-concurrent-streams", "0", "1.."),
            ("--recv-timeout", "0s", "at least"),
            ("--prompt-budget-bytes", "2048", "4096.."),
            ("--max-message-size", "0", "at least 1024 bytes"),
            ("--max-message-size", "4GiB", "at most 4294967295 bytes"),
            ("--llm-max-response-bytes", "0", "at least 1024 bytes"),
            ("--llm-max-response-bytes", "1GiB", "at most 67108864 bytes"),
            ("--cache-wait", "0s", "at least"),
            ("--cache-wait", "10ms", "at least 50ms"),
            ("--min-body-rate", "100", "at least 1024 bytes"),
            ("--min-body-rate", "2GiB", "at most"),
            ("--cache-wait", "6s", "at most"),
        ] {
            let err = Config::try_parse_from(["insight-service", flag, value])
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                err.contains(flag) && err.contains(says),
                "{flag} {value}: {err}"
            );
        }
        let fine = Config::try_parse_from([
            "insight-service",
            "--pressure-interval",
            "50ms",
            "--request-timeout",
            "10m",
            "--h2-connection-window",
            "16MiB",
            "--max-message-size",
            "16MiB",
            "--llm-max-response-bytes",
            "2MiB",
            "--cache-wait",
            "3s",
            "--min-body-rate",
            "64KiB",
        ]);
        assert!(fine.is_ok(), "{fine:?}");
    }

    #[test]
    fn pressure_thresholds_out_of_range_are_refused_naming_the_flag() {
        for (flag, value) in [
            ("--warn-ratio", "0"),
            ("--critical-ratio", "1.5"),
            ("--critical-ratio", "NaN"),
            ("--warn-psi", "-1"),
            ("--critical-psi", "0"),
            ("--critical-psi", "inf"),
            ("--pressure-hysteresis", "1"),
            ("--pressure-hysteresis", "-0.1"),
        ] {
            // `--flag=value`: clap would read a separate "-1" as a flag.
            let err = Config::try_parse_from(["insight-service", &format!("{flag}={value}")])
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                err.contains(flag) && err.contains("must be in"),
                "{flag} {value}: {err}"
            );
        }
        let fine = Config::try_parse_from([
            "insight-service",
            "--critical-ratio",
            "1",
            "--critical-psi",
            "100",
            "--pressure-hysteresis",
            "0",
        ])
        .unwrap();
        assert_eq!(fine.check(), Ok(()));
        assert_eq!(Config::default().check(), Ok(()));
    }

    #[test]
    fn thresholds_out_of_order_are_a_start_up_error_naming_both_flags() {
        let config = Config::try_parse_from(["insight-service", "--warn-ratio", "0.95"]).unwrap();
        let err = config.check().unwrap_err();
        assert!(
            err.contains("--warn-ratio") && err.contains("--critical-ratio"),
            "{err}"
        );
        let config = Config {
            warn_psi: 30.0,
            ..Config::default()
        };
        let err = config.check().unwrap_err();
        assert!(
            err.contains("--warn-psi") && err.contains("--critical-psi"),
            "{err}"
        );
        // Configs built in code (tests, embedders) are checked too.
        let config = Config {
            pressure_hysteresis: 1.0,
            ..Config::default()
        };
        assert!(
            config
                .check()
                .unwrap_err()
                .contains("--pressure-hysteresis")
        );
        for (config, flag) in [
            (
                Config {
                    pressure_interval: Duration::ZERO,
                    ..Config::default()
                },
                "--pressure-interval",
            ),
            (
                Config {
                    cache_wait: Duration::ZERO,
                    ..Config::default()
                },
                "--cache-wait",
            ),
            (
                Config {
                    monitor_url: Some("https://monitor:443".into()),
                    ..Config::default()
                },
                "--monitor-url",
            ),
        ] {
            let err = config.check().unwrap_err();
            assert!(err.contains(flag), "{err}");
        }
        assert_eq!(Config::default().check(), Ok(()));
    }

    #[test]
    fn a_zero_job_lease_or_poll_is_refused() {
        for (flag, value) in [("--job-lease", "0s"), ("--job-poll", "1ms")] {
            let err = Config::try_parse_from(["insight-service", flag, value])
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains(flag) && err.contains("at least"), "{err}");
        }
        assert!(Config::try_parse_from(["insight-service", "--job-lease", "2s"]).is_ok());
    }

    #[test]
    fn a_bad_value_names_the_flag() {
        let err = Config::try_parse_from(["insight-service", "--max-entries-cap", "0"])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("--max-entries-cap"), "{err}");
    }

    #[test]
    fn monitor_url_must_be_an_http_url_with_a_host() {
        assert_eq!(
            parse_monitor_url("http://monitor:50052").as_deref(),
            Ok("http://monitor:50052")
        );
        let tls = parse_monitor_url("https://10.0.0.7:443").unwrap_err();
        assert!(tls.contains("https is not supported"), "{tls}");
        for bad in [
            "monitor:50052",
            "ftp://monitor",
            "http://",
            "not a url",
            "",
            "https://monitor:443",
        ] {
            let error = parse_monitor_url(bad).unwrap_err();
            assert!(error.contains("http://monitor:50052"), "{bad}: {error}");
        }
    }
}
