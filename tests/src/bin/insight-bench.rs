//! insight-bench: the insight-service benchmark of issue 4, in one run so that ratios compare
//! numbers taken minutes apart on the same (noisy, shared) machine.
//!
//! 1. **Saturation** (closed loop, same callers and connections, same window): a bare tonic
//!    echo server answering SummarizeFeedback with a canned summary against the real
//!    `insight-service` binary with the `local` backend, for the same 15-entry request. Target:
//!    the real service reaches at least 80% of the echo server's requests/s.
//! 2. **Unloaded latency** (one caller): the per-call cost without queueing. Target: p99 at most
//!    0.3 ms above the echo server's (checked here and under saturation).
//! 3. **Open loop** at a fixed rate both sustain: latency from each call's intended send time.
//! 4. **Fake Gemini at a fixed delay**: `insight-service --llm-backend gemini` against an
//!    in-process fake Gemini answering after 200 ms; 15 entries in chunks of 5 are 3 map calls
//!    with parallelism P and one reduce, so a call should take about (⌈3 / P⌉ + 1) × 200 ms.
//!
//! Both servers are child processes (the echo server is this binary re-run with the hidden
//! `echo-server` command), each with its own runtime, so neither shares threads with the load
//! generator; their CPU time per call says what dominates. Every phase is bounded in time and
//! every child is killed when its phase ends.
//!
//! It is a binary, not a `cargo bench` or test target, so `cargo test` never runs it:
//! `cargo run --release -p spotifai-e2e --bin insight-bench` (it builds the `insight-service`
//! binary of the same profile first when run through cargo).

use std::{
    error::Error,
    io::Read,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    sync::Arc,
    time::Duration,
};

use clap::{Parser, Subcommand};
use prost::Message;
use spotifai_e2e::{
    Review,
    fakes::{FakeLlm, Fault, RecordedRequest},
    loadgen::{
        self, ChildServer, EchoInsight, LoadConfig, Mode, Percentiles, Report, RequestSpec,
        SummarizeFeedback, ms,
    },
};
use spotifai_proto::insight::{
    FeedbackSummary, SummarizeFeedbackRequest, insight_service_client::InsightServiceClient,
};
use tokio::net::TcpListener;

type BenchResult<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// The issue's throughput target: the real service reaches this share of the echo server's.
const THROUGHPUT_TARGET: f64 = 0.8;
/// The issue's latency target: p99 at most this much above the echo server's, in microseconds.
const P99_OVERHEAD_TARGET_US: f64 = 300.0;
/// The API key the fake Gemini requires and the service is given.
const FAKE_KEY: &str = "insight-bench-fake-key";
/// How long a child server may take to log its address.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline of the single probe call made before each phase.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// Benchmarks insight-service against a bare tonic echo server and a fake Gemini.
#[derive(Debug, Parser)]
#[command(name = "insight-bench")]
struct Cli {
    #[command(subcommand)]
    command: Option<Role>,
    #[command(flatten)]
    args: Args,
}

#[derive(Debug, Subcommand)]
enum Role {
    /// Internal: serve the echo baseline on 127.0.0.1:0 (canned summary read from stdin as a
    /// 4-byte big-endian length and the encoded FeedbackSummary; exits when stdin closes).
    #[command(hide = true)]
    EchoServer,
}

#[derive(Debug, clap::Args)]
struct Args {
    /// Measurement window of each saturation run.
    #[arg(long, env = "INSIGHT_BENCH_DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,

    /// Load applied before each measured run (connections, allocator and caches warm up).
    #[arg(long, env = "INSIGHT_BENCH_WARMUP", default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,

    /// Closed-loop callers of the saturation runs.
    #[arg(long, env = "INSIGHT_BENCH_CONCURRENCY", default_value_t = 16)]
    concurrency: usize,

    /// HTTP/2 connections of the saturation and open-loop runs.
    #[arg(long, env = "INSIGHT_BENCH_CONNECTIONS", default_value_t = 4)]
    connections: usize,

    /// Rounds of each phase (saturation, unloaded, open loop); each round runs both servers,
    /// in alternating order, so a drift in machine load does not always favour the same one.
    /// Medians of the ratio and of the p99 overheads are reported.
    #[arg(long, env = "INSIGHT_BENCH_ROUNDS", default_value_t = 5)]
    rounds: usize,

    /// Window of the unloaded (one caller) and open-loop runs.
    #[arg(long, env = "INSIGHT_BENCH_SHORT_DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    short_duration: Duration,

    /// Open-loop rate in calls/s (default: half of the real service's saturated throughput).
    #[arg(long, env = "INSIGHT_BENCH_OPEN_RATE")]
    open_rate: Option<f64>,

    /// Feedback entries per request.
    #[arg(long, env = "INSIGHT_BENCH_ENTRIES", default_value_t = 15)]
    entries: usize,

    /// `options.chunk_size` of the requests.
    #[arg(long, env = "INSIGHT_BENCH_CHUNK_SIZE", default_value_t = 5)]
    chunk_size: u32,

    /// Shared data directory with reviews/spotify_googleplay_reviews_sample1000.csv (absent:
    /// synthetic reviews of similar length).
    #[arg(long, env = "INSIGHT_BENCH_DATA_DIR", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data"))]
    data_dir: PathBuf,

    /// The insight-service binary (default: built by cargo for this profile, next to this one).
    #[arg(long, env = "INSIGHT_BENCH_SERVER_BIN")]
    server_bin: Option<PathBuf>,

    /// Fixed latency of the fake Gemini.
    #[arg(long, env = "INSIGHT_BENCH_GEMINI_DELAY", default_value = "200ms", value_parser = humantime::parse_duration)]
    gemini_delay: Duration,

    /// Map parallelism values of the fake-Gemini phase, comma-separated.
    #[arg(long, env = "INSIGHT_BENCH_PARALLELISM", value_delimiter = ',', default_values_t = [1u32, 2, 4])]
    parallelism: Vec<u32>,

    /// Calls per parallelism value in the fake-Gemini phase (one at a time).
    #[arg(long, env = "INSIGHT_BENCH_GEMINI_CALLS", default_value_t = 10)]
    gemini_calls: u64,

    /// Skip the local-backend phases (saturation, unloaded, open loop).
    #[arg(long, env = "INSIGHT_BENCH_SKIP_LOCAL")]
    skip_local: bool,

    /// Skip the fake-Gemini phase.
    #[arg(long, env = "INSIGHT_BENCH_SKIP_GEMINI")]
    skip_gemini: bool,

    /// Also print one JSON line per run (prefixed `json: `).
    #[arg(long, env = "INSIGHT_BENCH_JSON")]
    json: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Role::EchoServer) => echo_server().await,
        None => bench(&cli.args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("insight-bench: {}", loadgen::error_chain(&*error));
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The echo server child.

/// Reads the canned summary from stdin, serves it on 127.0.0.1:0, logs the address like the
/// services do, and stops when stdin closes (the parent dropped it, or died).
async fn echo_server() -> BenchResult<()> {
    let mut stdin = std::io::stdin().lock();
    let mut len = [0u8; 4];
    stdin
        .read_exact(&mut len)
        .map_err(|e| format!("echo-server: reading the summary length from stdin: {e}"))?;
    let mut bytes = vec![0u8; u32::from_be_bytes(len) as usize];
    stdin
        .read_exact(&mut bytes)
        .map_err(|e| format!("echo-server: reading the summary from stdin: {e}"))?;
    drop(stdin);
    let summary = FeedbackSummary::decode(bytes.as_slice())
        .map_err(|e| format!("echo-server: decoding the summary: {e}"))?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    eprintln!(
        "{}",
        serde_json::json!({"level": "INFO", "addr": addr.to_string(), "message": "echo server listening"})
    );
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        // Blocks until EOF: the parent holds the pipe open for exactly as long as it wants us.
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        let _ = closed_tx.send(());
    });
    loadgen::serve_echo(listener, EchoInsight::new(summary), async {
        let _ = closed_rx.await;
    })
    .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The benchmark.

async fn bench(args: &Args) -> BenchResult<()> {
    let bin = server_bin(args)?;
    let reviews = match loadgen::load_review_sample(&args.data_dir) {
        Ok(reviews) => Some(reviews),
        Err(error) => {
            println!("note: {error}; sending deterministic synthetic reviews instead");
            None
        }
    };
    print_machine(args, &bin, reviews.as_deref());

    let mut markdown = Vec::new();
    if !args.skip_local {
        local_phases(args, &bin, reviews.as_deref(), &mut markdown).await?;
    }
    if !args.skip_gemini {
        // A failure here must not discard the local results printed above.
        if let Err(error) = gemini_phase(args, &bin, reviews.as_deref(), &mut markdown).await {
            println!("\nfake-Gemini phase failed: {error}");
            markdown.push(format!("\nFake-Gemini phase failed: {error}\n"));
        }
    }
    println!("\n===== Markdown summary =====\n{}", markdown.join("\n"));
    Ok(())
}

fn print_machine(args: &Args, bin: &Path, reviews: Option<&[Review]>) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "machine: {cores} cores ({cpu}), load average {}",
        load.trim()
    );
    println!("server: {}", bin.display());
    let data = match reviews {
        Some(r) => format!(
            "the first {} of {} Google Play reviews",
            args.entries.min(r.len()),
            r.len()
        ),
        None => "synthetic reviews".to_owned(),
    };
    println!(
        "request: {} entries ({data}), chunk_size {}",
        args.entries, args.chunk_size
    );
}

/// The `insight-service` binary: `--server-bin`, else the one next to this executable, built
/// first through cargo when run by cargo (so the numbers are never those of a stale binary).
fn server_bin(args: &Args) -> BenchResult<PathBuf> {
    if let Some(bin) = &args.server_bin {
        return if bin.is_file() {
            Ok(bin.clone())
        } else {
            Err(format!("--server-bin {} is not a file", bin.display()).into())
        };
    }
    Ok(spotifai_e2e::service_bin("insight-service")?)
}

/// Starts the real service with `extra` flags; INSIGHT_* variables of this shell are removed
/// so only the flags given here configure it.
fn start_insight(bin: &Path, extra: &[String], env: &[(&str, &str)]) -> BenchResult<ChildServer> {
    let mut command = Command::new(bin);
    command
        .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .args(extra)
        .env("RUST_LOG", "info")
        .env_remove("GEMINI_API_KEY")
        .env_remove("OPENAI_API_KEY");
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("INSIGHT_") {
            command.env_remove(key);
        }
    }
    for (key, value) in env {
        command.env(key, value);
    }
    Ok(ChildServer::start(
        "insight-service",
        command,
        None,
        STARTUP_TIMEOUT,
    )?)
}

/// Starts the echo baseline (this binary's hidden `echo-server` role) answering `summary`.
fn start_echo(summary: &FeedbackSummary) -> BenchResult<ChildServer> {
    let bytes = summary.encode_to_vec();
    let mut input = u32::try_from(bytes.len())?.to_be_bytes().to_vec();
    input.extend_from_slice(&bytes);
    let mut command = Command::new(std::env::current_exe()?);
    command.arg("echo-server");
    Ok(ChildServer::start(
        "echo",
        command,
        Some(&input),
        STARTUP_TIMEOUT,
    )?)
}

/// One SummarizeFeedback call, to check what a server answers before measuring it.
async fn probe(url: &str, request: &SummarizeFeedbackRequest) -> BenchResult<FeedbackSummary> {
    let channel = loadgen::connect(url, 1).await?.remove(0);
    let mut client = InsightServiceClient::new(channel);
    let call = client.summarize_feedback(loadgen::request_with_timeout(
        request.clone(),
        Some(PROBE_TIMEOUT),
    ));
    let answer = tokio::time::timeout(PROBE_TIMEOUT + Duration::from_secs(1), call)
        .await
        .map_err(|_| format!("probe call to {url} timed out"))?
        .map_err(|status| format!("probe call to {url} failed: {status}"))?;
    Ok(answer.into_inner())
}

/// One measured run against one server, with the CPU both sides spent on it.
struct Run {
    report: Report,
    /// Server CPU per call (warm-up calls included, as their CPU is), microseconds.
    server_cpu_us: f64,
    /// The load generator's CPU per call (this process: the fake Gemini too when present),
    /// microseconds.
    client_cpu_us: f64,
}

async fn measure(
    label: &str,
    server: &ChildServer,
    request: &SummarizeFeedbackRequest,
    config: &LoadConfig,
    connections: usize,
    json: bool,
) -> BenchResult<Run> {
    let channels = loadgen::connect(&server.url(), connections).await?;
    let me = std::process::id();
    let client_cpu = || loadgen::cpu_time(me);
    let (server_before, client_before) = (server.cpu_time()?, client_cpu()?);
    let rpc = Arc::new(SummarizeFeedback::new(request.clone()));
    let report = loadgen::run(channels, rpc, config).await?;
    let (server_after, client_after) = (server.cpu_time()?, client_cpu()?);
    let calls = (report.requests()
        + report.warmup_calls()
        + report.unfinished()
        + report.warmup_unfinished())
    .max(1) as f64;
    let per_call = |after: Duration, before: Duration| {
        after.saturating_sub(before).as_secs_f64() * 1e6 / calls
    };
    let run = Run {
        server_cpu_us: per_call(server_after, server_before),
        client_cpu_us: per_call(client_after, client_before),
        report,
    };
    println!("\n--- {label}");
    print!("{}", run.report.table());
    println!(
        "  CPU per call: server {:.0} us, load generator {:.0} us (10 ms clock ticks: per-call \
         CPU is meaningful only over many calls)",
        run.server_cpu_us, run.client_cpu_us
    );
    if json {
        let mut line = run.report.to_json();
        line["label"] = serde_json::json!(label);
        line["server_cpu_us_per_call"] = serde_json::json!(run.server_cpu_us.round());
        line["client_cpu_us_per_call"] = serde_json::json!(run.client_cpu_us.round());
        println!("json: {line}");
    }
    Ok(run)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "**missed**" }
}

/// The contenders of the local phases, by name; the first is the baseline.
const ECHO: &str = "echo";
const BINARY: &str = "insight-service";

/// Measurements of the local phases: per contender, one run per saturation round, then the
/// unloaded and the open-loop run.
struct LocalResults {
    names: Vec<&'static str>,
    saturated: Vec<Vec<Run>>,
    unloaded: Vec<Vec<Run>>,
    open: Vec<Vec<Run>>,
    open_rate: f64,
}

/// The servers and request every phase of the local comparison measures.
struct Phase<'a> {
    args: &'a Args,
    servers: &'a [(&'static str, ChildServer)],
    request: &'a SummarizeFeedbackRequest,
}

impl Phase<'_> {
    /// `--rounds` runs of every server under `config`, each round starting with the next
    /// server so a drift in machine load does not always favour the same one; runs by server.
    async fn rotated(
        &self,
        what: &str,
        config: &LoadConfig,
        connections: usize,
    ) -> BenchResult<Vec<Vec<Run>>> {
        let mut runs: Vec<Vec<Run>> = self.servers.iter().map(|_| Vec::new()).collect();
        for round in 0..self.args.rounds.max(1) {
            for offset in 0..self.servers.len() {
                let index = (round + offset) % self.servers.len();
                let (name, server) = &self.servers[index];
                let label = format!("round {}: {name}, {what}", round + 1);
                let run = measure(
                    &label,
                    server,
                    self.request,
                    config,
                    connections,
                    self.args.json,
                )
                .await?;
                runs[index].push(run);
            }
        }
        Ok(runs)
    }
}

async fn local_phases(
    args: &Args,
    bin: &Path,
    reviews: Option<&[Review]>,
    markdown: &mut Vec<String>,
) -> BenchResult<()> {
    let spec = RequestSpec {
        entries: args.entries,
        chunk_size: Some(args.chunk_size),
        ..RequestSpec::default()
    };
    let request = loadgen::summarize_request(&spec, reviews);
    let request_bytes = request.encoded_len();

    // A queue that holds every caller: with the default depth (8) some of the 16 saturation
    // callers were refused at once, and a p99 of the OK calls left out the calls that would
    // have waited longest, while echo queues all of them. Like for like, nobody is refused.
    let real = start_insight(
        bin,
        &[
            "--llm-backend".to_owned(),
            "local".to_owned(),
            "--queue-depth".to_owned(),
            args.concurrency.max(8).to_string(),
        ],
        &[],
    )?;
    // The echo server answers exactly what the real service answers, so both move the same
    // bytes each way and only the work differs.
    let summary = probe(&real.url(), &request).await?;
    if summary.backend != "local" || summary.chunks.is_empty() {
        return Err(format!(
            "the real service answered backend {:?} with {} chunks; expected local",
            summary.backend,
            summary.chunks.len()
        )
        .into());
    }
    let echo = start_echo(&summary)?;
    let servers = [(ECHO, echo), (BINARY, real)];
    println!(
        "\nrequest {request_bytes} bytes, answer {} bytes ({} chunks, {} entries used)",
        summary.encoded_len(),
        summary.chunks.len(),
        summary.entries_used
    );

    // 1. Saturation; each round starts with the next server, so none always goes first.
    let saturated_config = LoadConfig {
        mode: Mode::Closed {
            concurrency: args.concurrency,
        },
        warmup: args.warmup,
        duration: args.duration,
        ..LoadConfig::default()
    };
    let phase = Phase {
        args,
        servers: &servers,
        request: &request,
    };
    let closed = format!("closed loop, {} callers", args.concurrency);
    let saturated = phase
        .rotated(&closed, &saturated_config, args.connections)
        .await?;

    // 2. Unloaded: one caller on one connection.
    let unloaded_config = LoadConfig {
        mode: Mode::Closed { concurrency: 1 },
        warmup: args.warmup,
        duration: args.short_duration,
        ..LoadConfig::default()
    };
    let unloaded = phase.rotated("one caller", &unloaded_config, 1).await?;

    // 3. Open loop at a rate every server sustains: half the slowest median throughput.
    let slowest = saturated
        .iter()
        .map(|runs| median(&mut runs.iter().map(|r| r.report.ok_rps()).collect::<Vec<_>>()))
        .fold(f64::INFINITY, f64::min);
    let open_rate = args
        .open_rate
        .unwrap_or_else(|| (slowest / 2.0).floor().max(1.0));
    let open_config = LoadConfig {
        mode: Mode::Open {
            rate: open_rate,
            max_outstanding: 1000,
        },
        warmup: args.warmup,
        duration: args.short_duration,
        ..LoadConfig::default()
    };
    let open = phase
        .rotated(
            &format!("open loop {open_rate:.0}/s"),
            &open_config,
            args.connections,
        )
        .await?;
    let names = servers.iter().map(|(name, _)| *name).collect();
    drop(servers);

    let results = LocalResults {
        names,
        saturated,
        unloaded,
        open,
        open_rate,
    };
    markdown.push(local_markdown(args, request_bytes, &summary, &results));
    Ok(())
}

fn errors_note(report: &Report) -> String {
    let failed = report.requests() - report.ok();
    let unfinished = report.unfinished() + report.warmup_unfinished();
    if failed == 0 && unfinished == 0 {
        String::new()
    } else {
        let codes: Vec<String> = report
            .status_counts()
            .into_iter()
            .filter(|(name, _)| *name != "OK")
            .map(|(name, count)| format!("{count} {name}"))
            .chain(
                (report.transport_errors() > 0)
                    .then(|| format!("{} transport errors", report.transport_errors())),
            )
            .chain((unfinished > 0).then(|| format!("{unfinished} unfinished")))
            .collect();
        format!(" (+ {})", codes.join(", "))
    }
}

fn latency_cells(p: Percentiles) -> String {
    format!("{} | {} | {}", ms(p.p50), ms(p.p99), ms(p.p999))
}

/// One line per real server: its p99 overhead over echo in `phase`, median over the rounds
/// (each round's pair ran back to back), with the rounds' values and the verdict.
fn overhead_line(names: &[&str], runs: &[Vec<Run>], phase: &str) -> String {
    let echo_runs = &runs[0];
    let mut out = String::new();
    for (name, runs) in names.iter().zip(runs).skip(1) {
        let mut overheads = paired(runs, echo_runs, p99_overhead_us);
        let per_round = overheads
            .iter()
            .map(|o| format!("{:+.3}", o / 1000.0))
            .collect::<Vec<_>>()
            .join(", ");
        let overhead = median(&mut overheads);
        out.push_str(&format!(
            "- {name}: p99 overhead {phase} **{:+.3} ms** (median; rounds: {per_round} ms), \
             target ≤ 0.3 ms: {}.\n",
            overhead / 1000.0,
            verdict(overhead <= P99_OVERHEAD_TARGET_US)
        ));
    }
    out
}

/// The table rows of a phase, round by round in the order each server ran: round, server, OK
/// rate (with any other outcome), latencies, then the phase's own `cells`.
fn round_rows(names: &[&str], runs: &[Vec<Run>], cells: impl Fn(&Run) -> String) -> String {
    let rounds = runs.iter().map(Vec::len).max().unwrap_or(0);
    let mut rows = String::new();
    for round in 0..rounds {
        for (name, runs) in names.iter().zip(runs) {
            if let Some(run) = runs.get(round) {
                rows.push_str(&format!(
                    "| {} | {name} | {:.0}{} | {} | {} |\n",
                    round + 1,
                    run.report.ok_rps(),
                    errors_note(&run.report),
                    latency_cells(run.report.ok_latency()),
                    cells(run)
                ));
            }
        }
    }
    rows
}

/// `compare(real, echo)` of each round's pair of runs.
fn paired(runs: &[Run], echo_runs: &[Run], compare: impl Fn(&Run, &Run) -> f64) -> Vec<f64> {
    runs.iter()
        .zip(echo_runs)
        .map(|(real, echo)| compare(real, echo))
        .collect()
}

fn p99_overhead_us(real: &Run, echo: &Run) -> f64 {
    real.report.ok_latency().p99 as f64 - echo.report.ok_latency().p99 as f64
}

fn local_markdown(
    args: &Args,
    request_bytes: usize,
    summary: &FeedbackSummary,
    results: &LocalResults,
) -> String {
    let mut md = String::new();
    md.push_str(&format!(
        "Request: {} entries, chunk_size {}, {request_bytes} bytes; answer {} bytes (the echo \
         server sends the real service's answer to this request).\n\n",
        args.entries,
        args.chunk_size,
        summary.encoded_len()
    ));
    md.push_str(&format!(
        "Saturation: closed loop, {} callers over {} connections, {} s warm-up + {} s measured \
         per server per round, {} rounds, starting order rotated.\n\n",
        args.concurrency,
        args.connections,
        args.warmup.as_secs_f64(),
        args.duration.as_secs_f64(),
        args.rounds.max(1)
    ));
    md.push_str(
        "| round | server | OK req/s | p50 ms | p99 ms | p99.9 ms | server CPU/call | load \
         generator CPU/call |\n|---|---|---|---|---|---|---|---|\n",
    );
    md.push_str(&round_rows(&results.names, &results.saturated, |run| {
        format!("{:.0} µs | {:.0} µs", run.server_cpu_us, run.client_cpu_us)
    }));
    md.push('\n');
    let echo_runs = &results.saturated[0];
    for (name, runs) in results.names.iter().zip(&results.saturated).skip(1) {
        let mut ratios = paired(runs, echo_runs, |real, echo| {
            real.report.ok_rps() / echo.report.ok_rps()
        });
        let per_round = ratios
            .iter()
            .map(|r| format!("{:.1}%", r * 100.0))
            .collect::<Vec<_>>()
            .join(", ");
        let ratio = median(&mut ratios);
        let overhead = median(&mut paired(runs, echo_runs, p99_overhead_us));
        let cpu_ratio = median(&mut paired(runs, echo_runs, |real, echo| {
            echo.server_cpu_us / real.server_cpu_us
        }));
        md.push_str(&format!(
            "- {name}: throughput **{:.1}%** of echo (median; rounds: {per_round}), target ≥ 80%: \
             {}; p99 overhead under saturation **{:+.3} ms** (median), target ≤ 0.3 ms: {}. \
             The load generator shares the two cores, so that ratio counts its CPU too; the \
             servers' CPU per call alone gives {:.1}% (median of echo's ÷ this server's).\n",
            ratio * 100.0,
            verdict(ratio >= THROUGHPUT_TARGET),
            overhead / 1000.0,
            verdict(overhead <= P99_OVERHEAD_TARGET_US),
            cpu_ratio * 100.0
        ));
    }

    md.push_str(&format!(
        "\nUnloaded: one caller, one connection, {} s per server per round, {} rounds, starting \
         order rotated.\n\n| round | server | OK req/s | p50 ms | p99 ms | p99.9 ms | server \
         CPU/call |\n|---|---|---|---|---|---|---|\n",
        args.short_duration.as_secs_f64(),
        args.rounds.max(1)
    ));
    md.push_str(&round_rows(&results.names, &results.unloaded, |run| {
        format!("{:.0} µs", run.server_cpu_us)
    }));
    md.push('\n');
    md.push_str(&overhead_line(
        &results.names,
        &results.unloaded,
        "unloaded",
    ));

    md.push_str(&format!(
        "\nOpen loop at {:.0} calls/s (half the slowest server's saturated rate), {} connections, \
         {} s per server per round, {} rounds, starting order rotated; latency from each call's \
         intended send time.\n\n| round | server | OK req/s | p50 ms | p99 ms | p99.9 ms | not \
         sent | send lag p99 ms |\n|---|---|---|---|---|---|---|---|\n",
        results.open_rate,
        args.connections,
        args.short_duration.as_secs_f64(),
        args.rounds.max(1)
    ));
    md.push_str(&round_rows(&results.names, &results.open, |run| {
        format!(
            "{} | {}",
            run.report.not_sent,
            ms(run.report.send_lag().p99)
        )
    }));
    md.push('\n');
    md.push_str(&overhead_line(&results.names, &results.open, "open loop"));
    md
}

// ---------------------------------------------------------------------------------------------
// Fake Gemini.

/// The fake's answers: the map step asks for `{"insight", "themes"}` and the reduce step for
/// `{"summary", "themes"}` (told apart by the response schema the service sends, else by the
/// prompt).
fn gemini_answer(request: &RecordedRequest) -> String {
    let schema = request
        .json
        .pointer("/generationConfig/responseSchema/properties");
    let is_map = match schema {
        Some(properties) => properties.get("insight").is_some(),
        None => !request.prompt().unwrap_or("").contains("\"summary\""),
    };
    if is_map {
        r#"{"insight": "Listeners like the playlists but ads and crashes interrupt them.", "themes": ["ads", "playlists", "crashes"]}"#.to_owned()
    } else {
        r#"{"summary": "Users value the catalogue and playlists; ads, crashes and premium pricing are the main complaints.", "themes": ["ads", "playlists", "crashes", "premium"]}"#.to_owned()
    }
}

async fn gemini_phase(
    args: &Args,
    bin: &Path,
    reviews: Option<&[Review]>,
    markdown: &mut Vec<String>,
) -> BenchResult<()> {
    let spec = RequestSpec {
        entries: args.entries,
        chunk_size: Some(args.chunk_size),
        // A failing fake must show as UNAVAILABLE, not as a fast local answer.
        disable_fallback: true,
        ..RequestSpec::default()
    };
    let request = loadgen::summarize_request(&spec, reviews);
    let chunks = args.entries.div_ceil(args.chunk_size.max(1) as usize) as u64;
    let delay = args.gemini_delay;
    let mut md = format!(
        "Fake Gemini answering every call after {} ms; {} entries in chunks of {} = {chunks} map \
         calls + 1 reduce; {} calls one at a time per parallelism P, each its own \
         `insight-service --llm-backend gemini --map-parallelism P` process.\n\n| P | expected \
         (⌈{chunks}/P⌉+1)×{} ms | p50 ms | mean ms | min ms | max ms | p50 − expected | LLM \
         calls/request |\n|---|---|---|---|---|---|---|---|\n",
        delay.as_millis(),
        args.entries,
        args.chunk_size,
        args.gemini_calls,
        delay.as_millis()
    );
    for &parallelism in &args.parallelism {
        let fake = FakeLlm::gemini().await;
        fake.require_api_key(FAKE_KEY);
        fake.set_default_fault(Fault::Delay(delay));
        fake.set_answer_fn(gemini_answer);
        let server = start_insight(
            bin,
            &[
                "--llm-backend".to_owned(),
                "gemini".to_owned(),
                "--llm-base-url".to_owned(),
                fake.base_url(),
                "--map-parallelism".to_owned(),
                parallelism.to_string(),
            ],
            &[("GEMINI_API_KEY", FAKE_KEY)],
        )?;
        let answer = probe(&server.url(), &request).await?;
        if answer.backend != "gemini" || answer.degraded {
            let note = format!(
                "`insight-service --llm-backend gemini` answered with backend {:?} (degraded: \
                 {}) and made {} requests to the fake: the gemini backend is not wired into \
                 `run()` in this build, so the fake-Gemini latency was not measured.",
                answer.backend,
                answer.degraded,
                fake.request_count()
            );
            println!("\n{note}");
            markdown.push(note);
            return Ok(());
        }
        let before = fake.request_count();
        let expected = delay * (chunks.div_ceil(u64::from(parallelism.max(1))) as u32 + 1);
        let config = LoadConfig {
            mode: Mode::Closed { concurrency: 1 },
            warmup: Duration::ZERO,
            // Generous: the call count ends the run long before this.
            duration: expected * (args.gemini_calls as u32).saturating_mul(4)
                + Duration::from_secs(10),
            timeout: Some(Duration::from_secs(30)),
            max_requests: Some(args.gemini_calls),
            drain: Duration::from_secs(30),
        };
        let run = measure(
            &format!(
                "insight-service + fake Gemini ({} ms), P = {parallelism}",
                delay.as_millis()
            ),
            &server,
            &request,
            &config,
            1,
            args.json,
        )
        .await?;
        let calls = (fake.request_count() - before) as f64 / run.report.requests().max(1) as f64;
        let p = run.report.ok_latency();
        println!(
            "  expected ≈ {} ms; LLM calls per request {calls:.1}",
            expected.as_millis()
        );
        md.push_str(&format!(
            "| {parallelism} | {} | {} | {:.1} | {} | {} | {:+.1} ms{} | {calls:.1} |\n",
            expected.as_millis(),
            ms(p.p50),
            p.mean / 1000.0,
            ms(p.min),
            ms(p.max),
            (p.p50 as f64 - expected.as_micros() as f64) / 1000.0,
            errors_note(&run.report),
        ));
    }
    markdown.push(md);
    Ok(())
}
