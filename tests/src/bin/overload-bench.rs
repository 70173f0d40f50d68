//! overload-bench: insight-service under overload (issue 5, item 6), the numbers behind the
//! `## insight-service: overload` section of BENCHMARKS.md.
//!
//! The real `insight-service` binary runs in a 256 MiB cgroup v1 memory group (when this runs
//! as root on a host with the v1 memory controller; otherwise unconfined, and peak memory is
//! read from `VmHWM` only), against a fake Gemini in this process answering every call after
//! 200 ms with ~2 KB. Every call is the OOM test's request: 1,500 entries of 2 KB (~3 MB),
//! 30 map calls.
//!
//! 0. **Idle floor** (before everything else): the probe's health checks alone, 20/s for
//!    `--floor-window`, against a bare tonic server (tonic-health only, its own runtime in this
//!    process) and then against the service before any load: what the cheapest answer costs on
//!    this machine and gRPC stack, in the same run as the refusal latency held to 1 ms.
//! 1. **Sustainable rate**: closed loop with `--max-concurrency` (4) callers for 15 s.
//! 2. **Offered load sweep**: open loop at 1×, 2×, 5×, 10× and 30× that rate (at most 200
//!    calls in flight), 5 s warm-up + 20 s each, on the same server process: goodput
//!    (complete OK answers per second of window, each call weighted by its share inside the
//!    window), p50/p99 latency of admitted calls from their intended send time, refusals by
//!    reason, the latency of immediate refusals (target: p99 ≤ 1 ms) apart from the
//!    queue-timeout ones (which wait `--queue-timeout` by design), peak memory per level.
//!    Refusal latency is read twice: by the load generator for its own calls (a client that is
//!    itself busy sending the whole load on the same two cores), and by a latency probe
//!    (`spotifai_e2e::overload::probe`: its own thread in the real-time class, its own
//!    connection) that sends the load's request `--probe-rate` times a second from 5× up,
//!    and health checks at 20/s throughout, timed from each call's start.
//! 3. **Control**: 10× and 30× again with `--overload-protection off`, each on a fresh server
//!    in a fresh group, 30 s (expected: the kernel's OOM killer, at least at 30×: the workload
//!    is LLM-latency bound, so an unlimited server carries far more than 4 calls at once until
//!    its memory runs out).
//!
//! `--poll-idle` keeps idle CPUs polling while it runs (see `loadgen::IdlePoll`); `--idle-load`
//! runs this process (load generator, fake Gemini) in the `SCHED_IDLE` class and the server in
//! the normal one, as if the load came from another machine.
//!
//! It prints a Markdown section to paste into BENCHMARKS.md. Loopback only; every phase is
//! bounded in time; children are killed and groups removed when their phase ends (also on
//! error). Not a test target, so `cargo test` never runs it:
//! `cargo run --release -p spotifai-e2e --bin overload-bench`.

use std::{
    error::Error,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use clap::Parser;
use spotifai_e2e::{
    loadgen::{BareHealthServer, IdlePoll, idle_class_for_this_process, ms},
    overload::{
        self, CGROUP_LIMIT, LoadGemini, MAX_CONCURRENCY, MAX_OUTSTANDING, Measured, MemoryCgroup,
        OverloadServer, QUEUE_TIMEOUT_REASON, ServerSpec, Workload, probe::ProbeReport,
    },
};

type BenchResult<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// The shed-latency target: a refusal answered within 1 ms at p99.
const SHED_P99_TARGET_US: u64 = 1000;

/// Measures goodput, latency, refusal latency and peak memory of insight-service against
/// offered load, in a 256 MiB memory cgroup.
#[derive(Debug, Parser)]
#[command(name = "overload-bench", about)]
struct Args {
    /// The insight-service binary (default: the one next to this executable, built first by
    /// cargo for the same profile when run through cargo).
    #[arg(long, env = "OVERLOAD_BENCH_SERVER_BIN")]
    server_bin: Option<PathBuf>,

    /// Offered load levels, in multiples of the sustainable rate.
    #[arg(
        long,
        env = "OVERLOAD_BENCH_LEVELS",
        value_delimiter = ',',
        default_value = "1,2,5,10,30"
    )]
    levels: Vec<f64>,

    /// Load levels of the control runs (protection off, each on a fresh server in a fresh
    /// group); the flag without a value skips them.
    #[arg(
        long,
        env = "OVERLOAD_BENCH_CONTROL_LEVELS",
        value_delimiter = ',',
        num_args = 0..,
        default_value = "10,30"
    )]
    control_levels: Vec<f64>,

    /// Measurement window of each load level.
    #[arg(long, env = "OVERLOAD_BENCH_WINDOW", default_value = "20s", value_parser = humantime::parse_duration)]
    window: Duration,

    /// Measurement window of the sustainable-rate run.
    #[arg(long, env = "OVERLOAD_BENCH_SUSTAIN_WINDOW", default_value = "15s", value_parser = humantime::parse_duration)]
    sustain_window: Duration,

    /// Measurement window of each control run (protection off).
    #[arg(long, env = "OVERLOAD_BENCH_CONTROL_WINDOW", default_value = "30s", value_parser = humantime::parse_duration)]
    control_window: Duration,

    /// Run the server without a memory cgroup even when one could be created.
    #[arg(long, env = "OVERLOAD_BENCH_NO_CGROUP")]
    no_cgroup: bool,

    /// The server's `--max-concurrency`, also the number of callers of the sustainable-rate
    /// run (default: the server's default).
    #[arg(long, env = "OVERLOAD_BENCH_MAX_CONCURRENCY", default_value_t = MAX_CONCURRENCY)]
    max_concurrency: usize,

    /// Entries per request.
    #[arg(long, env = "OVERLOAD_BENCH_ENTRIES", default_value_t = 1500)]
    entries: usize,

    /// Bytes of text per entry.
    #[arg(long, env = "OVERLOAD_BENCH_ENTRY_BYTES", default_value_t = 2000)]
    entry_bytes: usize,

    /// Requests per second the latency probe sends alongside the load (the load's own request,
    /// from its own thread and connection, timed from its start: see
    /// `spotifai_e2e::overload::probe`), at levels of `--probe-from` and above.
    #[arg(long, env = "OVERLOAD_BENCH_PROBE_RATE", default_value_t = 5.0)]
    probe_rate: f64,

    /// Keep idle CPUs polling instead of halting while the bench runs (a PM QoS request on
    /// `/dev/cpu_dma_latency`, see `spotifai_e2e::loadgen::IdlePoll`): on this VM a halted
    /// vCPU's wake-up adds a few hundred microseconds to every round trip between idle threads.
    #[arg(long, env = "OVERLOAD_BENCH_POLL_IDLE")]
    poll_idle: bool,

    /// Run the load generator and the fake Gemini (this process) in the `SCHED_IDLE` class and
    /// the server in the normal one, as if the load came from another machine: the server's
    /// threads then never wait behind the load generator's time slice for a core (see
    /// `spotifai_e2e::loadgen::idle_class_for_this_process`). The latency probe still runs
    /// `SCHED_FIFO`. Needs root.
    #[arg(long, env = "OVERLOAD_BENCH_IDLE_LOAD")]
    idle_load: bool,

    /// How long the probe times health checks against an idle bare tonic server and the idle
    /// service before the load starts (the floor under every latency it reports); 0 skips it.
    #[arg(long, env = "OVERLOAD_BENCH_FLOOR_WINDOW", default_value = "15s", value_parser = humantime::parse_duration)]
    floor_window: Duration,

    /// Lowest load level at which the probe sends requests: where the server refuses most
    /// calls, so most of the probe's are refused too (one that is not ends DEADLINE_EXCEEDED
    /// at the probe's deadline, `overload::PROBE_REQUEST_DEADLINE`).
    #[arg(long, env = "OVERLOAD_BENCH_PROBE_FROM", default_value_t = 5.0)]
    probe_from: f64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args = Args::parse();
    match bench(&args).await {
        Ok(markdown) => {
            println!("\n{markdown}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("overload-bench: {error}");
            ExitCode::FAILURE
        }
    }
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

/// One line about the machine: cores, memory, kernel, load average when the run started.
fn machine_note() -> String {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / f64::from(1 << 20));
    let load: Vec<String> = read("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .map(str::to_owned)
        .collect();
    format!(
        "{cores} cores, {mem_gib:.0} GiB, Linux {}, load average {} at the start (a shared, \
         noisy machine: other builds and tests run on the same cores)",
        read("/proc/sys/kernel/osrelease").trim(),
        load.join(" ")
    )
}

fn group(root: Option<&Path>) -> BenchResult<Option<MemoryCgroup>> {
    Ok(match root {
        Some(root) => Some(MemoryCgroup::create(root, CGROUP_LIMIT)?),
        None => None,
    })
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or_else(
        || "-".to_owned(),
        |b| format!("{:.0}", b as f64 / 1048576.0),
    )
}

fn refusals(m: &Measured) -> String {
    let parts: Vec<String> = m
        .tally
        .refusals
        .iter()
        .map(|(reason, p)| format!("{reason} {}", p.count))
        .collect();
    if parts.is_empty() {
        "0".to_owned()
    } else {
        parts.join(", ")
    }
}

/// Statuses that are neither OK nor RESOURCE_EXHAUSTED, failures below gRPC, unfinished.
fn other_outcomes(m: &Measured) -> String {
    let mut parts: Vec<String> = m
        .report
        .status_counts()
        .into_iter()
        .filter(|(name, _)| !matches!(*name, "OK" | "RESOURCE_EXHAUSTED"))
        .map(|(name, count)| format!("{name} {count}"))
        .collect();
    if m.report.transport_errors() > 0 {
        parts.push(format!("transport {}", m.report.transport_errors()));
    }
    if m.report.unfinished() > 0 {
        parts.push(format!("unfinished {}", m.report.unfinished()));
    }
    if m.report.warmup_unfinished() > 0 {
        parts.push(format!(
            "warm-up unfinished {}",
            m.report.warmup_unfinished()
        ));
    }
    if parts.is_empty() {
        "0".to_owned()
    } else {
        parts.join(", ")
    }
}

/// "p50 / p99 / max ms (n checks)" of a probe's health checks, with failures when there were.
fn floor(report: &ProbeReport) -> String {
    let h = report.health;
    let failed = match report.health_failed {
        0 => String::new(),
        n => format!(", {n} failed"),
    };
    format!(
        "p50 {} / p99 {} / max {} ms ({} checks{failed})",
        ms(h.p50),
        ms(h.p99),
        ms(h.max),
        h.count
    )
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "missed" }
}

/// The probe's refusal latency, how many of its calls were refused and how many were not
/// (queued or admitted: they end at the probe's deadline, or OK).
fn probe_refusals(m: &Measured) -> String {
    let p = m.probe.refusals;
    let not_refused = m.probe.admitted + m.probe.other.values().sum::<u64>();
    if p.count == 0 && not_refused == 0 {
        return "-".to_owned();
    }
    if p.count == 0 {
        return format!("- (0, {not_refused})");
    }
    format!(
        "{} / {} / {} ({}, {not_refused})",
        ms(p.p50),
        ms(p.p99),
        ms(p.max),
        p.count,
    )
}

/// How the load generator and the server share the cores, for the report.
fn load_class(args: &Args) -> &'static str {
    if args.idle_load {
        "the load generator and the fake Gemini in the SCHED_IDLE class, the server in the \
         normal one, as if the load came from another machine (`--idle-load`)"
    } else {
        "the load generator, the fake Gemini and the server all in the normal scheduling class"
    }
}

fn print_phase(title: &str, m: &Measured, sustainable: f64) {
    println!(
        "\n== {title} ==\n{}",
        overload::summary_table(&[(title, m)], sustainable)
    );
}

async fn bench(args: &Args) -> BenchResult<String> {
    let bin = server_bin(args)?;
    let _idle_poll = if args.poll_idle {
        let hold = IdlePoll::hold()
            .map_err(|e| format!("--poll-idle: cannot write {}: {e}", IdlePoll::PATH))?;
        println!("idle CPUs poll instead of halting while this runs (--poll-idle)");
        Some(hold)
    } else {
        None
    };
    // Before `--idle-load` moves this process's threads, so the bare server runs in the normal
    // class like the service.
    let bare_floor = if args.floor_window.is_zero() {
        None
    } else {
        let bare = BareHealthServer::start()
            .map_err(|e| format!("cannot start the bare tonic server: {e}"))?;
        let report = overload::idle_health(bare.url().to_owned(), args.floor_window).await?;
        drop(bare);
        println!("idle floor, bare tonic server: {}", floor(&report));
        Some(report)
    };
    if args.idle_load {
        let moved = idle_class_for_this_process().map_err(|e| format!("--idle-load: {e}"))?;
        println!(
            "the load generator and the fake Gemini run SCHED_IDLE ({moved} threads), the server \
             SCHED_OTHER (--idle-load)"
        );
    }
    let workload = Workload {
        entries: args.entries,
        entry_bytes: args.entry_bytes,
        ..Workload::default()
    };
    let body = workload.encoded();
    let expected = u32::try_from(workload.entries)?;
    let machine = machine_note();
    let root = if args.no_cgroup {
        println!("running without a memory cgroup (--no-cgroup)");
        None
    } else {
        match overload::v1_memory_support() {
            Ok(root) => Some(root),
            Err(reason) => {
                println!("running without a memory cgroup: {reason}");
                None
            }
        }
    };
    let llm = LoadGemini::start(overload::LLM_DELAY, overload::LLM_ANSWER_BYTES)
        .await
        .map_err(|e| format!("cannot start the fake Gemini: {e}"))?;
    let spec = |protection| ServerSpec {
        bin: &bin,
        llm_url: llm.base_url(),
        protection,
        prompt_budget_bytes: workload.prompt_budget_bytes(),
        extra: vec![
            "--max-concurrency".to_owned(),
            args.max_concurrency.to_string(),
        ],
        normal_class: args.idle_load,
    };
    println!(
        "{machine}\nserver {}; requests of {} entries x {} B = {} bytes, {} map calls each",
        bin.display(),
        workload.entries,
        workload.entry_bytes,
        body.len(),
        workload.chunks()
    );

    // Sustainable rate and the sweep, on one protected server.
    let server = OverloadServer::start(&spec(true), group(root.as_deref())?)?;
    let service_floor = match bare_floor {
        Some(bare) => {
            let service = overload::idle_health(server.url(), args.floor_window).await?;
            println!("idle floor, insight-service: {}", floor(&service));
            Some((bare, service))
        }
        None => None,
    };
    let sustained = overload::measure(
        &server,
        &llm,
        &body,
        expected,
        &overload::sustainable_config(args.max_concurrency, args.sustain_window),
    )
    .await?;
    let sustainable = sustained.goodput();
    print_phase(
        &format!("sustainable (closed loop x{})", args.max_concurrency),
        &sustained,
        sustainable,
    );
    if sustainable <= 0.0 {
        return Err(format!(
            "the server completed nothing at its sustainable rate:\n{}\nlast logs:\n{}",
            sustained.report.table(),
            server.log_tail().join("\n")
        )
        .into());
    }
    let deadline = overload::overload_deadline(&sustained);
    let mut levels = Vec::new();
    for &level in &args.levels {
        let rate = level * sustainable;
        let config = overload::open_config(rate, args.window, deadline);
        let probe_rate = if level >= args.probe_from {
            args.probe_rate
        } else {
            0.0
        };
        let measured =
            overload::measure_probed(&server, &llm, &body, expected, &config, probe_rate).await?;
        print_phase(&format!("{level}x = {rate:.2}/s"), &measured, sustainable);
        levels.push((level, measured));
    }
    drop(server);

    let mut controls = Vec::new();
    for &level in &args.control_levels {
        let server = OverloadServer::start(&spec(false), group(root.as_deref())?)?;
        let rate = level * sustainable;
        let config = overload::open_config(rate, args.control_window, deadline);
        let measured = overload::measure(&server, &llm, &body, expected, &config).await?;
        print_phase(
            &format!("control: protection off, {level}x = {rate:.2}/s"),
            &measured,
            sustainable,
        );
        controls.push((level, measured));
    }

    Ok(markdown(
        args,
        &machine,
        &workload,
        body.len(),
        root.is_some(),
        &sustained,
        deadline,
        service_floor.as_ref(),
        &levels,
        &controls,
    ))
}

#[allow(clippy::too_many_arguments)]
fn markdown(
    args: &Args,
    machine: &str,
    workload: &Workload,
    body_len: usize,
    in_cgroup: bool,
    sustained: &Measured,
    deadline: Duration,
    floors: Option<&(ProbeReport, ProbeReport)>,
    levels: &[(f64, Measured)],
    controls: &[(f64, Measured)],
) -> String {
    let sustainable = sustained.goodput();
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Machine: {machine}.\n\nServer: release `insight-service --llm-backend gemini` with every \
         overload setting at its default (`--queue-depth 8 --queue-timeout 2s`, memory budget = \
         half the cgroup limit) but `--max-concurrency {}` (default 4), \
         `--prompt-budget-bytes {}`; {}. Fake \
         Gemini in the driving process: {} ms per call, ~{} B answers. Every call: \
         SummarizeFeedback of {} entries × {} B ({body_len} bytes encoded), chunk size {} = {} \
         map calls + 1 reduce, map parallelism 4. Client: {} HTTP/2 connections, open loop \
         with at most {MAX_OUTSTANDING} calls in flight, deadline {:.1} s, 5 s warm-up + {} s \
         per level (control: {} s). Latency probe: its own thread and connection, health \
         checks at {}/s, the same request at {}/s from {}× up with a {} ms deadline (at most {} \
         of its calls running; one not refused ends DEADLINE_EXCEEDED); idle CPUs {}; {}. Goodput \
         counts complete OK answers per second of window, each call weighted by the share of \
         its duration inside the window.\n",
        args.max_concurrency,
        workload.prompt_budget_bytes(),
        if in_cgroup {
            format!(
                "in a cgroup v1 memory group with a {} MiB hard limit (memsw too, no swap)",
                CGROUP_LIMIT >> 20
            )
        } else {
            "unconfined (no memory cgroup could be created)".to_owned()
        },
        overload::LLM_DELAY.as_millis(),
        overload::LLM_ANSWER_BYTES,
        workload.entries,
        workload.entry_bytes,
        workload.chunk_size,
        workload.chunks(),
        overload::CONNECTIONS,
        deadline.as_secs_f64(),
        args.window.as_secs(),
        args.control_window.as_secs(),
        overload::HEALTH_PROBE_RATE,
        args.probe_rate,
        args.probe_from,
        overload::PROBE_REQUEST_DEADLINE.as_millis(),
        overload::probe::MAX_PROBES_IN_FLIGHT,
        if args.poll_idle {
            "polling (`--poll-idle`)"
        } else {
            "halting (this VM's default)"
        },
        load_class(args),
    );
    if let Some((bare, service)) = floors {
        let _ = writeln!(
            md,
            "Idle floor (the probe's health checks alone, {}/s for {} s, nothing else running): \
             bare tonic server (tonic-health only, its own runtime) {}; insight-service before \
             any load {}.\n",
            overload::HEALTH_PROBE_RATE,
            args.floor_window.as_secs(),
            floor(bare),
            floor(service),
        );
    }
    let p = sustained.report.ok_latency();
    let _ = writeln!(
        md,
        "Sustainable rate (closed loop, {} callers, {} s): **{sustainable:.2} calls/s** ({} \
         complete answers, p50 {} ms, p99 {} ms per call; {} LLM calls; health check p50 {} \
         ms, p99 {} ms).\n",
        args.max_concurrency,
        args.sustain_window.as_secs(),
        sustained.good(),
        ms(p.p50),
        ms(p.p99),
        sustained.llm.requests,
        ms(sustained.probe.health.p50),
        ms(sustained.probe.health.p99)
    );
    let _ = writeln!(
        md,
        "| offered | calls/s | calls | not sent | send lag p99 ms | goodput /s | vs sustainable | admitted p50 ms | admitted \
         p99 ms | refused (ErrorInfo reason) | other outcomes | immediate refusal p50 / p99 / \
         max ms | probe: refusal p50 / p99 / max ms (refused, not refused) | probe: health check p50 / \
         p99 ms | queue-timeout refusal p50 ms | cgroup peak MiB | VmHWM MiB | oom_kill | \
         alive |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    let mut rows: Vec<(String, &Measured)> = levels
        .iter()
        .map(|(level, m)| (format!("{level}×"), m))
        .collect();
    for (level, control) in controls {
        rows.push((format!("{level}×, protection **off**"), control));
    }
    for (label, m) in &rows {
        let admitted = m.report.ok_latency();
        let fast = m.tally.immediate;
        let queue_timeout = m
            .tally
            .refusals
            .iter()
            .find(|(r, _)| r == QUEUE_TIMEOUT_REASON)
            .map_or_else(|| "-".to_owned(), |(_, p)| ms(p.p50));
        let cgroup = m.memory.cgroup;
        let _ = writeln!(
            md,
            "| {label} | {:.2} | {} | {} | {} | {:.2} | {:.0}% | {} | {} | {} | {} | {} | {} | {} | \
             {queue_timeout} | {} | {} | {} | {} |",
            m.report.target_rate.unwrap_or(0.0),
            m.report.requests(),
            // Calls the open loop was due to send but could not (at its outstanding cap), and
            // how late it sent the others: a load generator falling behind offers less than
            // the row's rate.
            m.report.not_sent,
            ms(m.report.send_lag().p99),
            m.goodput(),
            100.0 * m.goodput() / sustainable,
            if admitted.count == 0 {
                "-".to_owned()
            } else {
                ms(admitted.p50)
            },
            if admitted.count == 0 {
                "-".to_owned()
            } else {
                ms(admitted.p99)
            },
            refusals(m),
            other_outcomes(m),
            if fast.count == 0 {
                "-".to_owned()
            } else {
                format!("{} / {} / {}", ms(fast.p50), ms(fast.p99), ms(fast.max))
            },
            probe_refusals(m),
            m.probe.health_latency(),
            mib(cgroup.map(|c| c.max_usage)),
            mib(m.memory.vm_hwm),
            cgroup
                .and_then(|c| c.oom_kill)
                .map_or_else(|| "-".to_owned(), |n| n.to_string()),
            match (m.alive, m.died_after) {
                (true, _) => "yes".to_owned(),
                (false, Some(after)) => format!("**no** (killed at {:.1} s)", after.as_secs_f64()),
                (false, None) => "**no**".to_owned(),
            },
        );
    }
    // The verdicts, stated with their numbers.
    let fast_p99 = levels
        .iter()
        .filter(|(_, m)| m.tally.immediate.count > 0)
        .map(|(level, m)| (*level, m.tally.immediate.p99))
        .max_by_key(|(_, p99)| *p99);
    let _ = writeln!(md);
    match fast_p99 {
        Some((level, p99)) => {
            let _ = writeln!(
                md,
                "Shed latency seen by the load generator (immediate refusals, from the call's \
                 start in a client that is itself sending the whole load): worst p99 {} ms at \
                 {level}× — target ≤ 1 ms: **{}**.",
                ms(p99),
                verdict(p99 <= SHED_P99_TARGET_US)
            );
        }
        None => {
            let _ = writeln!(md, "No immediate refusals at any level.");
        }
    }
    let probe_p99 = levels
        .iter()
        .filter(|(_, m)| m.probe.refusals.count > 0)
        .map(|(level, m)| (*level, m.probe.refusals.p99, m.probe.refusals.count))
        .max_by_key(|(_, p99, _)| *p99);
    if let Some((level, p99, count)) = probe_p99 {
        let realtime = levels.iter().all(|(_, m)| m.probe.realtime);
        let _ = writeln!(
            md,
            "Shed latency seen by the probe (the load's own request from a caller that is not \
             itself busy: own thread{}, own connection; {}; {}): worst p99 {} ms at {level}× ({count} \
             refusals) — target ≤ 1 ms: **{}**.",
            if realtime {
                " in the real-time class"
            } else {
                ""
            },
            if args.poll_idle {
                "idle CPUs polling (`--poll-idle`)"
            } else {
                "idle CPUs halting, this VM's default"
            },
            load_class(args),
            ms(p99),
            verdict(p99 <= SHED_P99_TARGET_US)
        );
        if let Some((bare, _)) = floors {
            let _ = writeln!(
                md,
                "For scale, from the same probe in this run: an idle bare tonic server's health \
                 check p99 {} ms.",
                ms(bare.health.p99)
            );
        }
    }
    let min_goodput = levels
        .iter()
        .filter(|(level, _)| *level > 1.0)
        .map(|(level, m)| (*level, m.goodput() / sustainable))
        .min_by(|a, b| a.1.total_cmp(&b.1));
    if let Some((level, ratio)) = min_goodput {
        let _ = writeln!(
            md,
            "Goodput under overload: lowest {:.0}% of the sustainable rate (at {level}×) — \
             target ≥ 90%: **{}**.",
            ratio * 100.0,
            verdict(ratio >= 0.9)
        );
    }
    for (level, control) in controls {
        let kills = control
            .memory
            .cgroup
            .and_then(|c| c.oom_kill)
            .map_or_else(|| "not reported".to_owned(), |n| n.to_string());
        let fate = match (control.alive, control.died_after) {
            (true, _) => "survived".to_owned(),
            (false, Some(after)) => format!("was killed {:.1} s into the run", after.as_secs_f64()),
            (false, None) => "died".to_owned(),
        };
        let _ = writeln!(
            md,
            "Control at {level}× (protection off): oom_kill {kills}; the process {fate}; peak \
             {} MiB of {} MiB.",
            mib(control.memory.cgroup.map(|c| c.max_usage)),
            CGROUP_LIMIT >> 20
        );
    }
    md
}
