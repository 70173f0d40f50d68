//! The real thing (issue 5, item 5): the real `insight-service` binary in a cgroup v1 memory
//! group with a 256 MiB hard limit, driven from outside the group at 10× its sustainable rate
//! with ~3 MB requests (1,500 entries of 2 KB, 30 map calls each) for 30 s, while a fake
//! Gemini outside the group answers every call after 200 ms with ~2 KB.
//!
//! What it proves, and why each check is the right one:
//! - **not OOM-killed**: the group's `memory.oom_control` reports `oom_kill 0` and the process
//!   is alive at the end. The kernel, not the service, is the judge: a 256 MiB hard limit with
//!   no swap (memsw is capped too) means any excursion past it kills the process.
//! - **refuses cleanly**: every call ended OK, RESOURCE_EXHAUSTED (with RetryInfo) or
//!   UNAVAILABLE; none ended INTERNAL/UNKNOWN, failed below gRPC, or hung. Hangs are caught by a
//!   client deadline far above the server's queue timeout plus a call's duration, so a hang
//!   would show as DEADLINE_EXCEEDED, which fails the test.
//! - **keeps working**: goodput (complete, non-degraded OK answers per second of the window,
//!   each call weighted by the share of its duration inside the window: see
//!   `Measured::goodput`) under overload is at least 90% of what the same server process
//!   completed moments before at its sustainable rate (closed loop with exactly
//!   `--max-concurrency` callers, so nothing queued and nothing was refused). Measured on the
//!   same process, a minute apart, so the noise of this shared two-core machine mostly cancels
//!   out. (Recorded runs: 94–107% in the debug build `cargo test` uses.)
//! - it really was overloaded: some calls were refused.
//!
//! The control run (`--overload-protection off`, same load, fresh group) is recorded, not
//! asserted: it is expected to be OOM-killed, which is the failure the project exists to
//! prevent. (It was, in every debug-build run; a release build can carry 10× of this rate
//! unprotected, peaking just under the limit: see BENCHMARKS.md.)
//!
//! Needs Linux, root and the v1 memory controller; elsewhere it prints why it skipped (loudly
//! under CI, where the machine is expected to have them). It is its own test binary with a
//! single test, so cargo runs it alone: no other test competes for the two cores while it
//! measures. Bounded: about 2 minutes; every group is removed by a drop guard, also on panic.

use std::{io::Write as _, path::Path, time::Duration};

use spotifai_e2e::overload::{
    self, CGROUP_LIMIT, LLM_ANSWER_BYTES, LLM_DELAY, LoadGemini, MAX_CONCURRENCY, Measured,
    MemoryCgroup, OverloadError, OverloadServer, ServerSpec, Workload,
};

/// The closed-loop window that measures the sustainable rate.
const SUSTAIN_WINDOW: Duration = Duration::from_secs(15);
/// The overload window.
const OVERLOAD_WINDOW: Duration = Duration::from_secs(30);
/// Offered load, in multiples of the sustainable rate.
const OVERLOAD_FACTOR: f64 = 10.0;
/// The goodput criterion.
const GOODPUT_TARGET: f64 = 0.90;

/// Writes straight to stderr: the test harness captures `print!`/`eprint!`, but the summary
/// and a skip must show on every run, passing or not.
fn say(text: &str) {
    let _ = std::io::stderr().write_all(text.as_bytes());
}

fn skip(reason: &str) {
    if std::env::var_os("CI").is_some() {
        let bar = "!".repeat(78);
        say(&format!(
            "\n{bar}\n!! SKIP under CI: the cgroup OOM test (issue 5, 'the real thing') did NOT \
             run.\n!! Reason: {reason}\n!! It needs Linux, root and a cgroup v1 memory \
             controller at {}.\n{bar}\n\n",
            overload::V1_MEMORY_ROOT
        ));
    } else {
        say(&format!("SKIP: cgroup OOM test: {reason}\n"));
    }
}

fn spec<'a>(
    bin: &'a Path,
    llm: &LoadGemini,
    workload: &Workload,
    protection: bool,
) -> ServerSpec<'a> {
    ServerSpec {
        bin,
        llm_url: llm.base_url(),
        protection,
        prompt_budget_bytes: workload.prompt_budget_bytes(),
        extra: Vec::new(),
        normal_class: false,
    }
}

/// One open-loop run on a fresh server in a fresh 256 MiB group.
async fn overload_run(
    root: &Path,
    spec: &ServerSpec<'_>,
    llm: &LoadGemini,
    body: &bytes::Bytes,
    expected: u32,
    rate: f64,
    deadline: Duration,
) -> Result<Measured, OverloadError> {
    let group = MemoryCgroup::create(root, CGROUP_LIMIT)?;
    let server = OverloadServer::start(spec, Some(group))?;
    let config = overload::open_config(rate, OVERLOAD_WINDOW, deadline);
    overload::measure(&server, llm, body, expected, &config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insight_service_is_not_oom_killed_at_10x_overload_in_a_256_mib_cgroup() {
    let root = match overload::v1_memory_support() {
        Ok(root) => root,
        Err(reason) => return skip(&reason),
    };
    let bin = spotifai_e2e::bin_path("insight-service");
    let workload = Workload::default();
    let body = workload.encoded();
    let expected = workload.entries as u32;
    let llm = LoadGemini::start(LLM_DELAY, LLM_ANSWER_BYTES)
        .await
        .unwrap();
    say(&format!(
        "oom_cgroup: {} ({}), requests of {} entries x {} B = {} bytes, {} map calls each, \
         fake Gemini {} ms / {} B, group limit {} MiB\n",
        bin.display(),
        if cfg!(debug_assertions) {
            "debug build"
        } else {
            "release build"
        },
        workload.entries,
        workload.entry_bytes,
        body.len(),
        workload.chunks(),
        LLM_DELAY.as_millis(),
        LLM_ANSWER_BYTES,
        CGROUP_LIMIT >> 20,
    ));

    // 1. Sustainable rate, then 10x overload, on one protected server in one group.
    let protected_spec = spec(&bin, &llm, &workload, true);
    let group = MemoryCgroup::create(&root, CGROUP_LIMIT).unwrap();
    let server = OverloadServer::start(&protected_spec, Some(group)).unwrap();
    let sustained = overload::measure(
        &server,
        &llm,
        &body,
        expected,
        &overload::sustainable_config(MAX_CONCURRENCY, SUSTAIN_WINDOW),
    )
    .await
    .unwrap();
    let sustainable = sustained.goodput();
    assert!(
        sustainable > 0.0 && sustained.disallowed().is_empty() && sustained.report.ok() > 0,
        "the server does not work even without overload: {:?}\n{}\nlast logs:\n{}",
        sustained.disallowed(),
        sustained.report.table(),
        server.log_tail().join("\n")
    );
    let rate = OVERLOAD_FACTOR * sustainable;
    let deadline = overload::overload_deadline(&sustained);
    let overloaded = overload::measure(
        &server,
        &llm,
        &body,
        expected,
        &overload::open_config(rate, OVERLOAD_WINDOW, deadline),
    )
    .await
    .unwrap();
    let protected_logs = server.log_tail();
    let group_path = server.cgroup().map(|group| group.path().to_path_buf());
    drop(server);
    // The issue: the cgroup is removed afterwards.
    if let Some(path) = group_path {
        assert!(!path.exists(), "{} was not removed", path.display());
    }

    // 2. Control: the same load with protection off, in a fresh group. Recorded, not asserted.
    let control_spec = spec(&bin, &llm, &workload, false);
    let control = overload_run(&root, &control_spec, &llm, &body, expected, rate, deadline).await;

    let mut columns = vec![
        (
            format!("sustainable (closed x{MAX_CONCURRENCY})"),
            &sustained,
        ),
        (format!("{OVERLOAD_FACTOR:.0}x, protection on"), &overloaded),
    ];
    if let Ok(control) = &control {
        columns.push((format!("{OVERLOAD_FACTOR:.0}x, protection OFF"), control));
    }
    let titled: Vec<(&str, &Measured)> = columns.iter().map(|(t, m)| (t.as_str(), *m)).collect();
    say(&format!(
        "\n== insight-service in a {} MiB cgroup v1 group, {:.2} calls/s offered ({OVERLOAD_FACTOR}x \
         {sustainable:.2}/s), client deadline {:.1} s ==\n{}",
        CGROUP_LIMIT >> 20,
        rate,
        deadline.as_secs_f64(),
        overload::summary_table(&titled, sustainable)
    ));
    match &control {
        Ok(control) => say(&format!(
            "control (protection off): oom_kill {}, process {}\n\n",
            control
                .memory
                .cgroup
                .and_then(|c| c.oom_kill)
                .map_or_else(|| "not reported".to_owned(), |n| n.to_string()),
            if control.alive { "survived" } else { "died" }
        )),
        Err(error) => say(&format!(
            "control (protection off) could not be measured: {error}\n\n"
        )),
    }

    // The pass criteria of the issue, on the protected overload run.
    let memory = overloaded.memory.cgroup.unwrap();
    let context = || {
        format!(
            "{}\nlast server logs:\n{}",
            overloaded.report.table(),
            protected_logs.join("\n")
        )
    };
    assert!(
        overloaded.alive,
        "the server died under overload\n{}",
        context()
    );
    match memory.oom_kill {
        Some(kills) => assert_eq!(kills, 0, "the OOM killer fired in the group\n{}", context()),
        // Kernels before 4.13 do not count kills; being alive and not under OOM is the proof.
        None => assert!(!memory.under_oom, "the group is under OOM\n{}", context()),
    }
    assert!(
        overloaded.disallowed().is_empty(),
        "calls ended in ways the issue does not allow: {:?}\n{}",
        overloaded.disallowed(),
        context()
    );
    // 10x was really offered: the generator never held a call back for want of a caller.
    assert_eq!(
        overloaded.report.not_sent,
        0,
        "calls of the 10x schedule were not sent\n{}",
        context()
    );
    assert!(
        overloaded.report.count(tonic::Code::ResourceExhausted) > 0,
        "nothing was refused: the run did not overload the server\n{}",
        context()
    );
    assert_eq!(
        overloaded.tally.no_retry_info, 0,
        "refusals must carry google.rpc.RetryInfo"
    );
    let ratio = overloaded.goodput() / sustainable;
    assert!(
        ratio >= GOODPUT_TARGET,
        "goodput under overload is {:.2}/s, {:.0}% of the sustainable {sustainable:.2}/s (target \
         >= {:.0}%)\n{}",
        overloaded.goodput(),
        ratio * 100.0,
        GOODPUT_TARGET * 100.0,
        context()
    );
}
