//! loadgen: applies gRPC load to a running insight-service (or anything serving its API) and
//! reports requests/s, latency percentiles and every grpc-status separately.
//!
//! ```text
//! loadgen --target http://127.0.0.1:50051 --concurrency 16 --connections 4 --duration 10s
//! loadgen --target http://127.0.0.1:50051 --rate 500 --max-outstanding 1000 --timeout 2s --json
//! ```
//!
//! A thin CLI over `spotifai_e2e::loadgen`, which benchmarks call from code.

use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use clap::{Parser, ValueEnum};
use spotifai_e2e::loadgen::{
    self, HealthCheck, LoadConfig, Mode, Report, RequestSpec, StreamFeedbackSummary,
    SummarizeFeedback,
};

/// Applies closed-loop or open-loop gRPC load and counts every grpc-status.
#[derive(Debug, Parser)]
#[command(name = "loadgen", version)]
struct Args {
    /// Server to load (plaintext HTTP/2).
    #[arg(long, env = "LOADGEN_TARGET", default_value = "http://127.0.0.1:50051")]
    target: String,

    /// The RPC to call.
    #[arg(long, env = "LOADGEN_RPC", value_enum, default_value_t = RpcKind::Summarize)]
    rpc: RpcKind,

    /// Closed loop: concurrent callers, each sending its next call when the previous ends.
    #[arg(
        long,
        env = "LOADGEN_CONCURRENCY",
        default_value_t = 16,
        conflicts_with = "rate"
    )]
    concurrency: usize,

    /// Open loop: calls per second sent on schedule whatever the server does; latency counts
    /// from each call's intended send time.
    #[arg(long, env = "LOADGEN_RATE")]
    rate: Option<f64>,

    /// Open loop: most calls outstanding at once (when full, calls wait and their wait counts).
    #[arg(long, env = "LOADGEN_MAX_OUTSTANDING", default_value_t = 1000)]
    max_outstanding: usize,

    /// HTTP/2 connections; calls are spread over them round-robin.
    #[arg(long, env = "LOADGEN_CONNECTIONS", default_value_t = 4)]
    connections: usize,

    /// Measurement window.
    #[arg(long, env = "LOADGEN_DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,

    /// Load applied before measuring.
    #[arg(long, env = "LOADGEN_WARMUP", default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,

    /// Per-call deadline (sent as grpc-timeout, enforced locally as DEADLINE_EXCEEDED).
    #[arg(long, env = "LOADGEN_TIMEOUT", value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,

    /// Stop after this many measured calls.
    #[arg(long, env = "LOADGEN_MAX_REQUESTS")]
    max_requests: Option<u64>,

    /// How long calls running at the window's end may finish before they are abandoned.
    #[arg(long, env = "LOADGEN_DRAIN", default_value = "5s", value_parser = humantime::parse_duration)]
    drain: Duration,

    /// Feedback entries per request.
    #[arg(long, env = "LOADGEN_ENTRIES", default_value_t = 15)]
    entries: usize,

    /// `options.chunk_size`.
    #[arg(long, env = "LOADGEN_CHUNK_SIZE", default_value_t = 5)]
    chunk_size: u32,

    /// `options.max_entries` (default: --entries, so none is skipped).
    #[arg(long, env = "LOADGEN_MAX_ENTRIES")]
    max_entries: Option<u32>,

    /// `options.max_words` (default: the server's, 300).
    #[arg(long, env = "LOADGEN_MAX_WORDS")]
    max_words: Option<u32>,

    /// Let the server answer from its insight cache (by default every call bypasses it, so the
    /// work is measured).
    #[arg(long, env = "LOADGEN_USE_CACHE")]
    use_cache: bool,

    /// `options.disable_fallback`: a failing LLM shows as UNAVAILABLE instead of a local answer.
    #[arg(long, env = "LOADGEN_DISABLE_FALLBACK")]
    disable_fallback: bool,

    /// Shared data directory holding reviews/spotify_googleplay_reviews_sample1000.csv; when
    /// the file is absent, deterministic synthetic reviews of similar length are sent.
    #[arg(long, env = "LOADGEN_DATA_DIR", default_value = default_data_dir())]
    data_dir: PathBuf,

    /// Print one JSON line instead of the table.
    #[arg(long, env = "LOADGEN_JSON")]
    json: bool,
}

/// The RPC under load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum RpcKind {
    /// InsightService/SummarizeFeedback.
    Summarize,
    /// InsightService/StreamFeedbackSummary (latency to the final event).
    StreamSummary,
    /// grpc.health.v1.Health/Check (""), the cheapest call a server serves.
    Health,
}

/// The repository's shared data, located at build time (`tests/../../shared/data`).
fn default_data_dir() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data")
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args).await {
        Ok(report) => {
            if args.json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.table());
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("loadgen: {}", loadgen::error_chain(&*error));
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> Result<Report, Box<dyn std::error::Error>> {
    let mode = match args.rate {
        Some(rate) => Mode::Open {
            rate,
            max_outstanding: args.max_outstanding,
        },
        None => Mode::Closed {
            concurrency: args.concurrency,
        },
    };
    let config = LoadConfig {
        mode,
        warmup: args.warmup,
        duration: args.duration,
        timeout: args.timeout,
        max_requests: args.max_requests,
        drain: args.drain,
    };
    let channels = loadgen::connect(&args.target, args.connections).await?;
    let report = match args.rpc {
        RpcKind::Health => loadgen::run(channels, Arc::new(HealthCheck), &config).await?,
        RpcKind::Summarize | RpcKind::StreamSummary => {
            let reviews = match loadgen::load_review_sample(&args.data_dir) {
                Ok(reviews) => Some(reviews),
                Err(error) => {
                    eprintln!("loadgen: {error}; sending synthetic reviews");
                    None
                }
            };
            let spec = RequestSpec {
                entries: args.entries,
                chunk_size: Some(args.chunk_size),
                max_entries: args.max_entries,
                max_words: args.max_words,
                bypass_cache: !args.use_cache,
                disable_fallback: args.disable_fallback,
            };
            let request = loadgen::summarize_request(&spec, reviews.as_deref());
            if args.rpc == RpcKind::Summarize {
                loadgen::run(channels, Arc::new(SummarizeFeedback::new(request)), &config).await?
            } else {
                let rpc = Arc::new(StreamFeedbackSummary::new(request));
                loadgen::run(channels, rpc, &config).await?
            }
        }
    };
    Ok(report)
}
