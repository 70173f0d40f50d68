//! monitor-bench: measures the two costs issue 3 sets targets for, and prints Markdown for
//! BENCHMARKS.md.
//!
//! 1. One sample as the server takes it (this process's statm, its cgroup, system memory) against
//!    sysinfo's refresh of this one process, timed in the same run so the ratio holds on a
//!    noisy machine.
//! 2. Fan-out over loopback: the real `monitor-service serve` binary, N subscribers at 100 ms
//!    spread over HTTP/2 connections, for a fixed window: delivered messages per second, the
//!    server's RSS growth per subscriber, and the lag from a sample's `at` to its receipt. The
//!    clients run on the server's cores, so they are kept as cheap as a gRPC client gets: one
//!    thread, one task per connection, and a decoder that reads only the two fields measured.
//!
//! It is a binary rather than a `cargo bench` target so `cargo test` never runs it, and it is
//! bounded: every phase has a deadline and the server it starts is killed when it is done.
//! Build the server first (`cargo build --release -p monitor-service`): `cargo run --bin` builds
//! only the binary it runs.

use std::{
    error::Error,
    hint::black_box,
    io::{BufRead, BufReader},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    process::{Child, ExitCode, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use bytes::{Buf, BufMut};
use clap::Parser;
use futures::StreamExt;
use hdrhistogram::Histogram;
use http::uri::PathAndQuery;
use monitor_service::{
    probe::{
        CONTEXT_REFRESH, CgroupVersion, PAGE_SIZE, PRESSURE_REFRESH, Probe, ProbeConfig,
        SLOW_REFRESH, Sample,
    },
    sampler::{Sampler, SamplerConfig, StreamPlan},
};
use spotifai_proto::monitor::{
    SnapshotRequest, StreamSamplesRequest, memory_monitor_client::MemoryMonitorClient,
};
use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};
use tonic::{
    Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::{Channel, Endpoint},
};

type BenchResult<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// Benchmarks the memory probe and the StreamSamples fan-out.
#[derive(Debug, Parser)]
#[command(name = "monitor-bench")]
struct Args {
    /// Samples timed per contender in the probe comparison; 20000 keeps the phase under a few
    /// seconds while averaging out scheduler noise.
    #[arg(long, env = "MONITOR_BENCH_PROBE_ITERATIONS", default_value_t = 20_000)]
    probe_iterations: u32,

    /// Subscriber counts of the fan-out phase, comma-separated: the 100, 1k and 10k.
    #[arg(
        long,
        env = "MONITOR_BENCH_SUBSCRIBERS",
        value_delimiter = ',',
        default_values_t = [100, 1_000, 10_000]
    )]
    subscribers: Vec<usize>,

    /// How long each fan-out run is measured once every subscriber streams; 10s is 100 samples
    /// per subscriber, enough for a stable p99.
    #[arg(
        long,
        env = "MONITOR_BENCH_WINDOW",
        default_value = "10s",
        value_parser = humantime::parse_duration
    )]
    window: Duration,

    /// Streams per HTTP/2 connection: 100 is the common server limit (grpc-go, nginx), so the
    /// load looks like many real clients rather than one giant connection.
    #[arg(
        long,
        env = "MONITOR_BENCH_STREAMS_PER_CONNECTION",
        default_value_t = 100
    )]
    streams_per_connection: usize,

    /// The `monitor-service` binary to start; by default the one next to this executable (the
    /// same target/<profile>/ directory).
    #[arg(long, env = "MONITOR_BENCH_SERVER_BIN")]
    server_bin: Option<PathBuf>,

    /// Skip the probe comparison.
    #[arg(long)]
    skip_probe: bool,

    /// Skip the fan-out runs.
    #[arg(long)]
    skip_fanout: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !args.skip_probe {
        match bench_probe(args.probe_iterations.max(1)) {
            Ok(report) => print!("{report}"),
            Err(error) => {
                eprintln!("monitor-bench: probe phase failed: {error}");
                return ExitCode::FAILURE;
            }
        }
    }
    if !args.skip_fanout {
        let Some(runtime) = build_runtime(&mut tokio::runtime::Builder::new_multi_thread()) else {
            return ExitCode::FAILURE;
        };
        if let Err(error) = runtime.block_on(bench_in_process(&args)) {
            eprintln!("monitor-bench: in-process fan-out phase failed: {error}");
            return ExitCode::FAILURE;
        }
        drop(runtime);
        // The loopback clients on one thread: they share the server's cores, and one thread
        // spends less per message than two that hand connections back and forth.
        let Some(client_runtime) =
            build_runtime(&mut tokio::runtime::Builder::new_current_thread())
        else {
            return ExitCode::FAILURE;
        };
        if let Err(error) = client_runtime.block_on(bench_fanout(&args)) {
            eprintln!("monitor-bench: fan-out phase failed: {error}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

/// Rounds of each contender, interleaved, so a noisy neighbour hits both alike; the median round
/// is reported.
const ROUNDS: u32 = 7;

/// The server's fastest cadence, which the "as the server runs it" row replays.
const TEN_HZ: Duration = Duration::from_millis(100);

fn bench_probe(iterations: u32) -> BenchResult<String> {
    // The server's probe (fresh figures every time, the slow ones once per SLOW_REFRESH, PSI
    // once per PRESSURE_REFRESH), back to back: the slow figures are almost never due, so this
    // is the per-sample fast path.
    let mut probe = Probe::new(ProbeConfig::default());
    // Every file on every sample: what a sample costs when the slow figures are due.
    let mut full = Probe::new(ProbeConfig::default()).with_slow_refresh(Duration::ZERO);
    // The server's probe on a replayed 10 Hz clock: each call is told 100 ms have passed, so
    // it does exactly the mix of fresh and cached reads the server does at 10 Hz.
    let mut replayed = Probe::new(ProbeConfig::default());
    let mut clock = Instant::now();
    let mut replay = || {
        clock += TEN_HZ;
        black_box(replayed.sample_at(clock));
    };
    let first = probe.sample();
    let mut system = System::new()?;
    let pid = Pid::from_u32(std::process::id());
    let pids = [pid];
    let kind = ProcessRefreshKind::nothing().with_memory();
    let mut sysinfo_refresh = || {
        system.refresh_processes_specifics(ProcessesToUpdate::Some(&pids), false, kind);
        black_box(system.process(pid).map(|process| process.memory()));
    };
    // Warm up: open the kept descriptors, fault in the code and buffers.
    for _ in 0..200 {
        black_box(probe.sample());
        black_box(full.sample());
        replay();
        sysinfo_refresh();
    }
    let per_round = (iterations / ROUNDS).max(1);
    let mut fast_rounds = Vec::new();
    let mut full_rounds = Vec::new();
    let mut replay_rounds = Vec::new();
    let mut sysinfo_rounds = Vec::new();
    let time = |run: &mut dyn FnMut()| {
        let start = Instant::now();
        for _ in 0..per_round {
            run();
        }
        start.elapsed().as_nanos() / u128::from(per_round)
    };
    for _ in 0..ROUNDS {
        fast_rounds.push(time(&mut || {
            black_box(probe.sample());
        }));
        full_rounds.push(time(&mut || {
            black_box(full.sample());
        }));
        replay_rounds.push(time(&mut replay));
        sysinfo_rounds.push(time(&mut sysinfo_refresh));
    }
    for rounds in [
        &mut fast_rounds,
        &mut full_rounds,
        &mut replay_rounds,
        &mut sysinfo_rounds,
    ] {
        rounds.sort_unstable();
    }
    let median = |rounds: &[u128]| rounds.get(rounds.len() / 2).copied().unwrap_or(0);
    let range = |rounds: &[u128]| {
        format!(
            "{}..{}",
            rounds.first().copied().unwrap_or(0),
            rounds.last().copied().unwrap_or(0)
        )
    };
    let (fast_ns, full_ns, replay_ns, sysinfo_ns) = (
        median(&fast_rounds),
        median(&full_rounds),
        median(&replay_rounds),
        median(&sysinfo_rounds),
    );
    let ratio = |ns: u128| sysinfo_ns as f64 / ns.max(1) as f64;
    let cgroup = first.cgroup.as_ref().map_or_else(
        || "none".to_owned(),
        |group| format!("{} {}", group.version.as_str(), group.path),
    );
    Ok(format!(
        "### Probe: one sample vs sysinfo's process refresh\n\n\
         {per_round} iterations per contender per round, {ROUNDS} interleaved rounds; the median \
         round (min..max of the rounds). Cgroup read: {cgroup}.\n\n\
         | what | ns/sample | sysinfo ÷ this | target |\n|---|---:|---:|---|\n\
         | `Probe::sample`, fast path (statm + cgroup usage; slow figures not due) | {fast_ns} ({}) | {:.1}× | |\n\
         | `Probe::sample`, every file (+ limit, memory.stat, oom, PSI, /proc/meminfo) | {full_ns} ({}) | {:.1}× | |\n\
         | `Probe::sample_at` on a replayed 10 Hz clock, as the server runs it (slow files every {}, the one of memory.stat and meminfo that is only context every {}, PSI every {}) | {replay_ns} ({}) | {:.1}× | ≤ 5000, ≥ 10× |\n\
         | sysinfo `refresh_processes_specifics` (this pid, memory only) | {sysinfo_ns} ({}) | 1.0× | |\n\n\
         {}",
        range(&fast_rounds),
        ratio(fast_ns),
        range(&full_rounds),
        ratio(full_ns),
        humantime::format_duration(SLOW_REFRESH),
        humantime::format_duration(CONTEXT_REFRESH),
        humantime::format_duration(PRESSURE_REFRESH),
        range(&replay_rounds),
        ratio(replay_ns),
        range(&sysinfo_rounds),
        file_costs(&first, per_round, full_ns),
    ))
}

/// What each file the probe reads costs by itself: one `pread` on a kept descriptor, which is
/// almost all kernel time formatting the file. Explains where a full sample's time goes.
fn file_costs(sample: &Sample, iterations: u32, full_ns: u128) -> String {
    let mut files = vec![
        (
            PathBuf::from(format!("/proc/{}/statm", std::process::id())),
            "every sample",
        ),
        (PathBuf::from("/proc/meminfo"), "slow"),
    ];
    if let Some(group) = &sample.cgroup {
        let relative = group.path.trim_start_matches('/');
        let (dir, names, pressure) = match group.version {
            CgroupVersion::V1 => (
                Path::new("/sys/fs/cgroup/memory").join(relative),
                [
                    "memory.usage_in_bytes",
                    "memory.limit_in_bytes",
                    "memory.stat",
                    "memory.oom_control",
                ],
                // v1 groups have no PSI file; the probe reads the system-wide one.
                PathBuf::from("/proc/pressure/memory"),
            ),
            CgroupVersion::V2 => {
                let dir = Path::new("/sys/fs/cgroup").join(relative);
                let pressure = dir.join("memory.pressure");
                (
                    dir,
                    [
                        "memory.current",
                        "memory.max",
                        "memory.stat",
                        "memory.events",
                    ],
                    pressure,
                )
            }
        };
        for (index, name) in names.into_iter().enumerate() {
            // The usage file comes first and is the only one read on every sample.
            files.push((
                dir.join(name),
                if index == 0 { "every sample" } else { "slow" },
            ));
        }
        files.push((pressure, "slow"));
    }
    let mut table = String::from(
        "Where a full sample's time goes: one `pread` of each file on a kept descriptor (median \
         of the rounds; almost all of it is the kernel formatting the file).\n\n\
         | file | read | ns/pread |\n|---|---|---:|\n",
    );
    let mut buf = vec![0_u8; 8192];
    let mut kernel_ns = 0;
    for (path, when) in files {
        let Ok(file) = std::fs::File::open(&path) else {
            continue;
        };
        let mut rounds: Vec<u128> = (0..ROUNDS)
            .map(|_| {
                let start = Instant::now();
                for _ in 0..iterations {
                    black_box(file.read_at(&mut buf, 0).ok());
                }
                start.elapsed().as_nanos() / u128::from(iterations.max(1))
            })
            .collect();
        rounds.sort_unstable();
        let median = rounds.get(rounds.len() / 2).copied().unwrap_or(0);
        kernel_ns += median;
        table.push_str(&format!("| `{}` | {when} | {median} |\n", path.display()));
    }
    table.push_str(&format!(
        "\nSum of the preads: {kernel_ns} ns, against {full_ns} ns for a full sample.\n\n"
    ));
    table
}

/// The sampler alone, in this process: N `Sampler::subscribe` readers at 100 ms, no gRPC. Its
/// lag is what the fan-out itself adds (probe read, N `try_reserve`s, waking N tasks); the
/// loopback runs add HTTP/2 on both ends.
async fn bench_in_process(args: &Args) -> BenchResult<()> {
    let window = args.window.min(Duration::from_secs(5));
    println!(
        "### Fan-out inside the process (sampler only, no gRPC)\n\n\
         N `Sampler::subscribe` readers at 100 ms, one task each, measured for {}.\n\n\
         | subscribers | msgs/s (expected) | lag p50 | lag p99 | lag max | dropped |\n\
         |---:|---:|---:|---:|---:|---:|",
        humantime::format_duration(window)
    );
    for &subscribers in &args.subscribers {
        let sampler = Sampler::with_config(
            Probe::new(ProbeConfig::default()),
            SamplerConfig {
                max_subscribers: subscribers.max(1),
                ..SamplerConfig::default()
            },
        );
        let plan = StreamPlan::new(100, 0, sampler.default_interval())?;
        let shared = Arc::new(Shared::default());
        let mut tasks = Vec::with_capacity(subscribers);
        for _ in 0..subscribers {
            let mut subscription = sampler.subscribe(plan)?;
            let shared = Arc::clone(&shared);
            tasks.push(tokio::spawn(async move {
                let mut lags = Vec::new();
                // The first delivery is the latest sample, stale by design.
                let _ = subscription.next().await;
                while let Some(Ok(delivery)) = subscription.next().await {
                    if shared.stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if shared.measuring.load(Ordering::Relaxed) {
                        shared.delivered.fetch_add(1, Ordering::Relaxed);
                        shared
                            .dropped
                            .fetch_add(delivery.dropped, Ordering::Relaxed);
                        let lag = SystemTime::now()
                            .duration_since(delivery.sample.at)
                            .unwrap_or_default();
                        lags.push(u64::try_from(lag.as_micros()).unwrap_or(u64::MAX));
                    }
                }
                lags
            }));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let start = Instant::now();
        shared.measuring.store(true, Ordering::Relaxed);
        tokio::time::sleep(window).await;
        shared.measuring.store(false, Ordering::Relaxed);
        let elapsed = start.elapsed();
        shared.stop.store(true, Ordering::Relaxed);
        let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        for task in tasks {
            if let Ok(Ok(lags)) = tokio::time::timeout(Duration::from_secs(5), task).await {
                for lag in lags {
                    histogram.saturating_record(lag);
                }
            }
        }
        println!(
            "| {subscribers} | {:.0} ({}) | {:.2} ms | {:.2} ms | {:.2} ms | {} |",
            shared.delivered.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64(),
            subscribers * 10,
            histogram.value_at_quantile(0.50) as f64 / 1000.0,
            histogram.value_at_quantile(0.99) as f64 / 1000.0,
            histogram.max() as f64 / 1000.0,
            shared.dropped.load(Ordering::Relaxed),
        );
    }
    println!();
    Ok(())
}

/// Counters the subscriber tasks share.
#[derive(Debug, Default)]
struct Shared {
    /// Set for the measured window only.
    measuring: AtomicBool,
    stop: AtomicBool,
    delivered: AtomicU64,
    dropped: AtomicU64,
    streaming: AtomicUsize,
    failed: AtomicUsize,
}

/// One fan-out run's figures.
#[derive(Debug)]
struct FanoutRun {
    subscribers: usize,
    connections: usize,
    ramp_up: Duration,
    msgs_per_sec: f64,
    rss_before: u64,
    rss_after: u64,
    lag_p50_us: u64,
    lag_p99_us: u64,
    lag_max_us: u64,
    dropped: u64,
    failed: usize,
    server_cpu: f64,
    bench_cpu: f64,
}

async fn bench_fanout(args: &Args) -> BenchResult<()> {
    let server_bin = match &args.server_bin {
        Some(path) => path.clone(),
        None => std::env::current_exe()?
            .parent()
            .ok_or("the bench executable has no directory")?
            .join("monitor-service"),
    };
    if !server_bin.is_file() {
        return Err(format!(
            "{} not found: build it first (cargo build --release -p monitor-service) or pass \
             --server-bin",
            server_bin.display()
        )
        .into());
    }
    let mut runs = Vec::new();
    for &subscribers in &args.subscribers {
        eprintln!("monitor-bench: {subscribers} subscribers...");
        runs.push(fanout_run(&server_bin, subscribers, args).await?);
    }
    println!(
        "### Fan-out: subscribers at 100 ms over loopback\n\n\
         One fresh `monitor-service serve` per row, {} streams per HTTP/2 connection (the \
         bench's clients: one thread, one task per connection, decoding only `at` and \
         `dropped`), measured for {} once all streams deliver. Lag: sample `at` (taken at the start of the probe read) \
         to receipt by the client, the stale first sample excluded. CPU: share of one core over \
         the window.\n",
        args.streams_per_connection,
        humantime::format_duration(args.window)
    );
    println!(
        "| subscribers | connections | ramp-up | msgs/s (expected) | RSS growth per subscriber | \
         lag p50 | lag p99 | lag max | dropped | failed | server CPU | bench CPU |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for run in &runs {
        let growth = run.rss_after.saturating_sub(run.rss_before);
        println!(
            "| {} | {} | {:.1} s | {:.0} ({}) | {:.1} KB ({:.1} → {:.1} MiB) | {:.1} ms | {:.1} ms \
             | {:.1} ms | {} | {} | {:.0}% | {:.0}% |",
            run.subscribers,
            run.connections,
            run.ramp_up.as_secs_f64(),
            run.msgs_per_sec,
            run.subscribers * 10,
            growth as f64 / 1000.0 / run.subscribers.max(1) as f64,
            run.rss_before as f64 / 1_048_576.0,
            run.rss_after as f64 / 1_048_576.0,
            run.lag_p50_us as f64 / 1000.0,
            run.lag_p99_us as f64 / 1000.0,
            run.lag_max_us as f64 / 1000.0,
            run.dropped,
            run.failed,
            run.server_cpu * 100.0,
            run.bench_cpu * 100.0,
        );
    }
    println!();
    Ok(())
}

/// A server child process, killed when dropped so no run outlives the bench.
struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(bin: &Path, max_subscribers: usize) -> BenchResult<Self> {
        let mut child = std::process::Command::new(bin)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
                "--max-subscribers",
                &max_subscribers.to_string(),
            ])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().ok_or("no stderr pipe")?;
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            // Keeps draining after the address is known, so the server never blocks on a full
            // pipe; warnings (a disconnected slow subscriber) are shown.
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("\"WARN\"") || line.contains("\"ERROR\"") {
                    eprintln!("[server] {line}");
                }
                if let Some(sender) = &tx
                    && line.contains("monitor-service listening")
                {
                    let _ = sender.send(line);
                    tx = None;
                }
            }
        });
        let mut server = Self {
            child,
            url: String::new(),
        };
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| "the server did not log its address within 30s")?;
        let log: serde_json::Value = serde_json::from_str(&line)?;
        let addr = log
            .get("addr")
            .and_then(serde_json::Value::as_str)
            .ok_or("no addr in the listening line")?;
        server.url = format!("http://{addr}");
        Ok(server)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Resident set size of `pid` in bytes, from `/proc/<pid>/statm`.
fn rss_bytes(pid: &str) -> BenchResult<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm"))?;
    let pages: u64 = statm
        .split_ascii_whitespace()
        .nth(1)
        .ok_or("statm has no resident field")?
        .parse()?;
    Ok(pages.saturating_mul(PAGE_SIZE))
}

/// User + system CPU time of `pid` in seconds, from `/proc/<pid>/stat` (USER_HZ = 100 on Linux).
fn cpu_seconds(pid: &str) -> BenchResult<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces; the fields after its closing parenthesis do not.
    let after_name = stat.rsplit_once(')').ok_or("malformed stat")?.1;
    let fields: Vec<&str> = after_name.split_ascii_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks = |index: usize| -> BenchResult<u64> {
        Ok(fields.get(index).ok_or("short stat")?.parse::<u64>()?)
    };
    Ok((ticks(11)? + ticks(12)?) as f64 / 100.0)
}

async fn fanout_run(bin: &Path, subscribers: usize, args: &Args) -> BenchResult<FanoutRun> {
    let server = Server::start(bin, subscribers.saturating_mul(2).max(100))?;
    let server_pid = server.pid().to_string();
    let endpoint = Endpoint::from_shared(server.url.clone())?;

    // Warm-up on a throwaway connection: the server's first RPCs allocate its per-thread
    // caches, which are not a per-subscriber cost.
    {
        let mut client = MemoryMonitorClient::new(endpoint.connect().await?);
        for _ in 0..10 {
            client.get_snapshot(SnapshotRequest {}).await?;
        }
        let mut stream = client
            .stream_samples(StreamSamplesRequest {
                interval_ms: 100,
                duration_ms: 300,
            })
            .await?
            .into_inner();
        while stream.message().await?.is_some() {}
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = rss_bytes(&server_pid)?;

    let per_connection = args.streams_per_connection.max(1);
    let connections = subscribers.div_ceil(per_connection);
    let mut channels: Vec<Channel> = Vec::with_capacity(connections);
    for _ in 0..connections {
        channels.push(endpoint.connect().await?);
    }
    let shared = Arc::new(Shared::default());
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(connections);
    for (index, channel) in channels.iter().enumerate() {
        let streams = subscribers
            .saturating_sub(index * per_connection)
            .min(per_connection);
        tasks.push(tokio::spawn(connection_subscribers(
            channel.clone(),
            streams,
            Arc::clone(&shared),
        )));
    }
    // Every stream has had its first sample (or failed) before the window opens.
    let ramp_deadline = started + Duration::from_secs(120);
    while shared.streaming.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed)
        < subscribers
    {
        if Instant::now() > ramp_deadline {
            return Err("subscribers did not all start within 120s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ramp_up = started.elapsed();
    // One more second so the first-sample burst has drained.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let server_cpu_before = cpu_seconds(&server_pid)?;
    let bench_cpu_before = cpu_seconds("self")?;
    let window_start = Instant::now();
    shared.measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(args.window).await;
    shared.measuring.store(false, Ordering::Relaxed);
    let window = window_start.elapsed();
    let server_cpu = (cpu_seconds(&server_pid)? - server_cpu_before) / window.as_secs_f64();
    let bench_cpu = (cpu_seconds("self")? - bench_cpu_before) / window.as_secs_f64();
    let rss_after = rss_bytes(&server_pid)?;
    let delivered = shared.delivered.load(Ordering::Relaxed);

    shared.stop.store(true, Ordering::Relaxed);
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let join_deadline = Instant::now() + Duration::from_secs(30);
    for task in tasks {
        let remaining = join_deadline.saturating_duration_since(Instant::now());
        // A task that does not stop in time is abandoned; the server is killed below anyway.
        if let Ok(Ok(lags)) = tokio::time::timeout(remaining, task).await {
            for lag in lags {
                histogram.saturating_record(lag);
            }
        }
    }
    drop(channels);
    drop(server);
    Ok(FanoutRun {
        subscribers,
        connections,
        ramp_up,
        msgs_per_sec: delivered as f64 / window.as_secs_f64(),
        rss_before,
        rss_after,
        lag_p50_us: histogram.value_at_quantile(0.50),
        lag_p99_us: histogram.value_at_quantile(0.99),
        lag_max_us: histogram.max(),
        dropped: shared.dropped.load(Ordering::Relaxed),
        failed: shared.failed.load(Ordering::Relaxed),
        server_cpu,
        bench_cpu,
    })
}

/// The subscribers of one connection: `streams` StreamSamples calls at 100 ms, all read by this
/// one task until told to stop; returns their lags (µs) in the window.
///
/// One task per connection rather than per stream, and a decoder that reads only the two
/// fields the bench needs: the client shares the server's two cores, so every microsecond it
/// spends per message is taken from the server and shows up as the server's lag. A real
/// subscriber runs on another machine and decodes the whole sample.
async fn connection_subscribers(channel: Channel, streams: usize, shared: Arc<Shared>) -> Vec<u64> {
    let mut lags = Vec::new();
    let grpc = tonic::client::Grpc::new(channel);
    let opened = futures::future::join_all((0..streams).map(|_| {
        let mut grpc = grpc.clone();
        async move {
            grpc.ready()
                .await
                .map_err(|error| Status::unavailable(error.to_string()))?;
            let request = StreamSamplesRequest {
                interval_ms: 100,
                duration_ms: 0,
            };
            grpc.server_streaming(
                tonic::Request::new(request),
                PathAndQuery::from_static(STREAM_SAMPLES_PATH),
                StampCodec,
            )
            .await
        }
    }))
    .await;
    let mut merged = futures::stream::SelectAll::new();
    for response in opened {
        match response {
            // `enumerate` marks each stream's first message, the latest sample handed over
            // at once: stale by design, not fan-out lag.
            Ok(response) => merged.push(response.into_inner().enumerate()),
            Err(status) => {
                eprintln!("monitor-bench: subscribe failed: {status}");
                shared.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    while let Some((index, item)) = merged.next().await {
        let stamp = match item {
            Ok(stamp) => stamp,
            Err(status) => {
                eprintln!("monitor-bench: stream failed: {status}");
                shared.failed.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        let received = SystemTime::now();
        if index == 0 {
            shared.streaming.fetch_add(1, Ordering::Relaxed);
        } else if shared.measuring.load(Ordering::Relaxed) {
            shared.delivered.fetch_add(1, Ordering::Relaxed);
            shared.dropped.fetch_add(stamp.dropped, Ordering::Relaxed);
            let lag = stamp
                .at
                .and_then(|at| received.duration_since(at).ok())
                .unwrap_or_default();
            lags.push(u64::try_from(lag.as_micros()).unwrap_or(u64::MAX));
        }
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
    }
    lags
}

/// The StreamSamples method, called through the generic client with [`StampCodec`].
const STREAM_SAMPLES_PATH: &str = "/spotifai.monitor.v1.MemoryMonitor/StreamSamples";

/// What the bench needs of a `MemorySample`: when it was taken and how many were dropped.
#[derive(Debug, Default)]
struct Stamp {
    at: Option<SystemTime>,
    dropped: u64,
}

/// A client codec that encodes `StreamSamplesRequest` and decodes only `MemorySample.at` (field
/// 2) and `dropped` (field 8), skipping the rest unparsed: the protobuf wire format lets a reader
/// skip any field by its wire type.
#[derive(Clone, Copy, Debug, Default)]
struct StampCodec;

impl Codec for StampCodec {
    type Encode = StreamSamplesRequest;
    type Decode = Stamp;
    type Encoder = StampCodec;
    type Decoder = StampCodec;

    fn encoder(&mut self) -> Self::Encoder {
        *self
    }

    fn decoder(&mut self) -> Self::Decoder {
        *self
    }
}

impl Encoder for StampCodec {
    type Item = StreamSamplesRequest;
    type Error = Status;

    fn encode(&mut self, item: Self::Item, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        // interval_ms = 1 (uint32), duration_ms = 2 (uint64); proto3 omits zeros.
        for (field, value) in [(1, u64::from(item.interval_ms)), (2, item.duration_ms)] {
            if value != 0 {
                put_varint(dst, field << 3);
                put_varint(dst, value);
            }
        }
        Ok(())
    }
}

impl Decoder for StampCodec {
    type Item = Stamp;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Stamp>, Status> {
        let len = src.remaining();
        // tonic hands over one whole message; it sits in one contiguous buffer.
        let stamp =
            parse_stamp(src.chunk()).ok_or_else(|| Status::internal("malformed MemorySample"))?;
        src.advance(len);
        Ok(Some(stamp))
    }

    /// Small messages: a 1 KiB buffer per stream rather than tonic's default 8 KiB.
    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(1024, 32 * 1024)
    }
}

fn put_varint(dst: &mut EncodeBuf<'_>, mut value: u64) {
    while value >= 0x80 {
        dst.put_u8((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    dst.put_u8(value as u8);
}

/// Reads a varint at the front of `bytes`, advancing it.
fn take_varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0_u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = bytes.split_first()?;
        *bytes = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(value);
        }
    }
    None
}

/// `at` and `dropped` of an encoded `MemorySample`; `None` if it is not valid protobuf.
fn parse_stamp(mut bytes: &[u8]) -> Option<Stamp> {
    let mut stamp = Stamp::default();
    while !bytes.is_empty() {
        let key = take_varint(&mut bytes)?;
        let (field, wire_type) = (key >> 3, key & 7);
        match wire_type {
            0 => {
                let value = take_varint(&mut bytes)?;
                if field == 8 {
                    stamp.dropped = value;
                }
            }
            1 => bytes = bytes.get(8..)?,
            2 => {
                let len = usize::try_from(take_varint(&mut bytes)?).ok()?;
                let (value, rest) = bytes.split_at_checked(len)?;
                bytes = rest;
                if field == 2 {
                    stamp.at = parse_timestamp(value);
                }
            }
            5 => bytes = bytes.get(4..)?,
            _ => return None,
        }
    }
    Some(stamp)
}

/// A `google.protobuf.Timestamp` (seconds = 1, nanos = 2) as a `SystemTime`.
fn parse_timestamp(mut bytes: &[u8]) -> Option<SystemTime> {
    let (mut seconds, mut nanos) = (0_u64, 0_u32);
    while !bytes.is_empty() {
        let key = take_varint(&mut bytes)?;
        let value = take_varint(&mut bytes)?;
        match key {
            0x08 => seconds = value,
            0x10 => nanos = u32::try_from(value).ok()?,
            _ => return None,
        }
    }
    SystemTime::UNIX_EPOCH.checked_add(Duration::new(seconds, nanos))
}

/// A Tokio runtime from `builder`, or `None` after saying why on stderr.
fn build_runtime(builder: &mut tokio::runtime::Builder) -> Option<tokio::runtime::Runtime> {
    builder
        .enable_all()
        .build()
        .inspect_err(|error| eprintln!("monitor-bench: cannot start the Tokio runtime: {error}"))
        .ok()
}
