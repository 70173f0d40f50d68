//! The pieces of the overload proof (issue 5, "the real thing" and its benchmark): the real
//! `insight-service` binary in a 256 MiB cgroup v1 memory group, a fake Gemini with a fixed
//! latency in the driving process (outside the group), and large SummarizeFeedback calls
//! (1,500 entries of 2 KB, ~3 MB each) sent by [`crate::loadgen`] from outside the group.
//!
//! Used by `tests/tests/oom_cgroup.rs` (asserts the issue's pass criteria) and by the
//! `overload-bench` binary (goodput and latency against offered load, for BENCHMARKS.md).
//!
//! Two things here differ from what the other benchmarks use, on purpose:
//! - the request is encoded once and sent as raw bytes ([`SummarizeRaw`]): at 10× overload the
//!   driver sends ~20 calls of 3 MB per second (~65 at 30×), and encoding 1,500 entries per call
//!   from a message struct would spend CPU on the same two cores the server runs on;
//! - the fake Gemini is [`LoadGemini`], which counts instead of recording (see its docs).

pub mod cgroup;
pub mod llm;
pub mod probe;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::Path,
    process::Command,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::{BufMut, Bytes};
use hdrhistogram::Histogram;
use prost::Message;
use spotifai_proto::insight::{
    FeedbackBatch, FeedbackEntry, FeedbackSummary, SummarizeFeedbackRequest, SummaryOptions,
    summarize_feedback_request::Input,
};
use tonic::{
    Code, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::http::uri::PathAndQuery,
    transport::Channel,
};
use tonic_types::{ErrorDetails, StatusExt};

pub use cgroup::{CgroupError, CgroupMemory, MemoryCgroup, V1_MEMORY_ROOT, v1_memory_support};
pub use llm::{FAKE_GEMINI_KEY, LlmCounts, LoadGemini};

use crate::loadgen::{
    self, ChildServer, LoadConfig, LoadError, Percentiles, ProcessError, Report, Rpc,
    new_histogram, request_with_timeout,
};

/// The cgroup limit of the issue: 256 MiB.
pub const CGROUP_LIMIT: u64 = 256 << 20;
/// The fake Gemini's latency: 200 ms per call.
pub const LLM_DELAY: Duration = Duration::from_millis(200);
/// The fake Gemini's answer size: ~2 KB.
pub const LLM_ANSWER_BYTES: usize = 2048;
/// HTTP/2 connections the driver spreads calls over (several, as many callers would use).
pub const CONNECTIONS: usize = 8;
/// Callers in flight at most in the open loop: the issue's "200 concurrent callers".
pub const MAX_OUTSTANDING: usize = 200;
/// `--max-concurrency` of the server under test (its default), and the closed-loop
/// concurrency at which its sustainable rate is measured.
pub const MAX_CONCURRENCY: usize = 4;
/// The server's `--queue-timeout` (its default): how long a queued call may wait for a slot.
pub const QUEUE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the server may take to log its address.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Why an overload run could not be set up or measured.
#[derive(Debug, thiserror::Error)]
pub enum OverloadError {
    /// The memory group could not be created, configured or read.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// The server could not be started.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// The load run failed (e.g. the server refused connections from the start).
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The server started, but not inside the memory group it was meant to run in.
    #[error("the server (pid {pid}) is not in {group}; its processes are {pids:?}")]
    NotInGroup {
        /// The server's pid.
        pid: u32,
        /// The group.
        group: String,
        /// What the group holds.
        pids: Vec<u32>,
    },
}

// ---------------------------------------------------------------------------------------------
// The request.

/// The large request of the OOM test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Entries per request.
    pub entries: usize,
    /// Bytes of text per entry.
    pub entry_bytes: usize,
    /// `options.chunk_size`: entries per map call (the service's maximum is 50).
    pub chunk_size: u32,
}

impl Default for Workload {
    /// The issue's request: 1,500 entries of 2 KB (~3 MB), in chunks of 50 (30 map calls).
    fn default() -> Self {
        Self {
            entries: 1500,
            entry_bytes: 2000,
            chunk_size: 50,
        }
    }
}

impl Workload {
    /// The request: synthetic review sentences (the vocabulary of app-store feedback) padded
    /// to `entry_bytes`, every option set so nothing depends on server defaults. The fallback
    /// is disabled so that an LLM failure shows as UNAVAILABLE, never as a cheap local answer
    /// counted as goodput.
    pub fn request(&self) -> SummarizeFeedbackRequest {
        let entries = (0..self.entries)
            .map(|i| FeedbackEntry {
                id: entry_id(i),
                text: padded_text(i as u64, self.entry_bytes),
                rating: (i % 5) as u32 + 1,
                source: "overload".to_owned(),
                ..FeedbackEntry::default()
            })
            .collect();
        SummarizeFeedbackRequest {
            input: Some(Input::Entries(FeedbackBatch { entries })),
            options: Some(SummaryOptions {
                chunk_size: Some(self.chunk_size),
                max_entries: Some(u32::try_from(self.entries).unwrap_or(u32::MAX)),
                max_words: None,
                bypass_cache: true,
                disable_fallback: true,
            }),
        }
    }

    /// The request, encoded once.
    pub fn encoded(&self) -> Bytes {
        Bytes::from(self.request().encode_to_vec())
    }

    /// Map calls per request.
    pub fn chunks(&self) -> usize {
        self.entries.div_ceil(self.chunk_size.max(1) as usize)
    }

    /// A `--prompt-budget-bytes` that fits one full chunk, so chunks are cut by entry count
    /// (30 map calls of ~100 KB) and not by bytes (the 16 KiB default would make ~200).
    pub fn prompt_budget_bytes(&self) -> u32 {
        let entry = self.entry_bytes
            + entry_id(self.entries).len()
            + insight_service::pipeline::chunk::ENTRY_OVERHEAD_BYTES;
        let bytes = (entry * self.chunk_size as usize + 4096).next_multiple_of(1024);
        u32::try_from(bytes.clamp(1024, 1 << 20)).unwrap_or(1 << 20)
    }
}

fn entry_id(i: usize) -> String {
    format!("oom-{i:06}")
}

/// Review-like text of exactly `bytes` bytes (ASCII), different for each seed.
fn padded_text(seed: u64, bytes: usize) -> String {
    let mut text = String::with_capacity(bytes + 128);
    let mut k = 0;
    while text.len() < bytes {
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(&loadgen::synthetic_text(seed * 1000 + k));
        k += 1;
    }
    text.truncate(bytes);
    text
}

// ---------------------------------------------------------------------------------------------
// The RPC.

const SUMMARIZE_PATH: &str = "/spotifai.insight.v1.InsightService/SummarizeFeedback";

/// Sends pre-encoded request bytes; decodes the answer as a `FeedbackSummary`.
#[derive(Clone, Copy, Debug, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = FeedbackSummary;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = FeedbackSummary;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<FeedbackSummary>, Status> {
        // A decode failure is ours, not the server's: a status with a source counts as a
        // transport-level failure in the load generator, not as a status the server sent.
        FeedbackSummary::decode(src)
            .map(Some)
            .map_err(|e| Status::from_error(Box::new(e)))
    }
}

/// The ErrorInfo reason of a refusal that waited the whole `--queue-timeout` first: slow by
/// design, so it is timed apart from the refusals that must be answered at once.
pub const QUEUE_TIMEOUT_REASON: &str = "QUEUE_TIMEOUT";

/// The ErrorInfo reason of a refusal (its `status.get_error_details()`), or "(no ErrorInfo)".
fn refusal_reason(details: &ErrorDetails) -> String {
    details
        .error_info()
        .map_or_else(|| "(no ErrorInfo)".to_owned(), |info| info.reason.clone())
}

/// What [`SummarizeRaw`] saw beyond the status codes the load generator counts.
#[derive(Debug)]
struct Tally {
    /// Latency of RESOURCE_EXHAUSTED answers by their `google.rpc.ErrorInfo` reason, µs, from
    /// the moment the call was started (not from its intended send time, which the open loop
    /// uses): how fast the server answers a refusal.
    refusals: Mutex<BTreeMap<String, Histogram<u64>>>,
    /// Refusals without `google.rpc.RetryInfo`.
    no_retry_info: AtomicU64,
    /// OK answers marked degraded (some chunk failed).
    degraded: AtomicU64,
    /// OK answers that did not summarize every entry sent.
    incomplete: AtomicU64,
    /// Complete, non-degraded OK answers, each weighted by the share of its duration (from
    /// send to answer) that lies inside the measurement window, in millionths of a call.
    completed_in_window: AtomicU64,
}

/// Millionths of a call: the unit of [`Tally::completed_in_window`].
const CALL_UNITS: f64 = 1e6;

/// The share of `[start, done]` inside `[window_start, window_end]`, in [`CALL_UNITS`].
fn share_in_window(start: Instant, done: Instant, window: (Instant, Instant)) -> u64 {
    let (window_start, window_end) = window;
    let inside = done
        .min(window_end)
        .saturating_duration_since(start.max(window_start));
    let whole = done.saturating_duration_since(start);
    if whole.is_zero() {
        return u64::from(done >= window_start && done <= window_end) * CALL_UNITS as u64;
    }
    (inside.as_secs_f64() / whole.as_secs_f64() * CALL_UNITS).round() as u64
}

impl Tally {
    /// Counts an OK answer to a call that started at `start` and ended at `done`: its share
    /// of the window as goodput when it is complete (every entry, not degraded), and, for a
    /// call started inside the window, whether it was degraded or partial.
    fn answered(
        &self,
        expected: u32,
        window: (Instant, Instant),
        start: Instant,
        done: Instant,
        summary: &FeedbackSummary,
    ) {
        let complete = !summary.degraded && summary.entries_used == expected;
        if complete {
            let share = share_in_window(start, done, window);
            self.completed_in_window.fetch_add(share, Ordering::Relaxed);
        }
        let measured = start >= window.0;
        if measured && summary.degraded {
            self.degraded.fetch_add(1, Ordering::Relaxed);
        } else if measured && !complete {
            self.incomplete.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn refused(
        &self,
        reason: String,
        latency: Duration,
    ) -> Result<(), hdrhistogram::CreationError> {
        let us = loadgen::micros(latency);
        let mut refusals = self.refusals.lock().unwrap_or_else(PoisonError::into_inner);
        let histogram = match refusals.entry(reason) {
            std::collections::btree_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::btree_map::Entry::Vacant(entry) => entry.insert(new_histogram()?),
        };
        histogram.saturating_record(us);
        Ok(())
    }
}

/// `SummarizeFeedback` with one pre-encoded request, timing refusals and checking answers.
#[derive(Clone, Debug)]
pub struct SummarizeRaw {
    body: Bytes,
    expected_entries: u32,
    /// The measurement window. Calls started before it are the load generator's warm-up:
    /// their statuses are not tallied, as it does not count them either; but their answers
    /// that arrive inside the window are work done in it, and count as goodput.
    window: (Instant, Instant),
    tally: Arc<Tally>,
}

impl SummarizeRaw {
    /// Sends `body` (an encoded `SummarizeFeedbackRequest`) on every call; an OK answer counts
    /// as complete when it used `expected_entries` entries and is not degraded. `window` is
    /// the measurement window (from the end of the warm-up): see [`TallySnapshot`].
    pub fn new(body: Bytes, expected_entries: u32, window: (Instant, Instant)) -> Self {
        Self {
            body,
            expected_entries,
            window,
            tally: Arc::new(Tally {
                refusals: Mutex::new(BTreeMap::new()),
                no_retry_info: AtomicU64::new(0),
                degraded: AtomicU64::new(0),
                incomplete: AtomicU64::new(0),
                completed_in_window: AtomicU64::new(0),
            }),
        }
    }

    /// Counts the answer of a call of this request made by someone else (the latency probe):
    /// it is the same work, so a complete answer is goodput like any other.
    pub(crate) fn record_answer(&self, start: Instant, done: Instant, summary: &FeedbackSummary) {
        self.tally
            .answered(self.expected_entries, self.window, start, done, summary);
    }

    /// What it saw so far.
    pub fn snapshot(&self) -> Result<TallySnapshot, hdrhistogram::CreationError> {
        let tally = &self.tally;
        let refusals = tally
            .refusals
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut immediate = new_histogram()?;
        for (reason, histogram) in refusals.iter() {
            if reason != QUEUE_TIMEOUT_REASON {
                // Same bounds on both sides: adding cannot fail.
                let _ = immediate.add(histogram);
            }
        }
        Ok(TallySnapshot {
            refusals: refusals
                .iter()
                .map(|(reason, histogram)| (reason.clone(), Percentiles::of(histogram)))
                .collect(),
            immediate: Percentiles::of(&immediate),
            no_retry_info: tally.no_retry_info.load(Ordering::Relaxed),
            degraded: tally.degraded.load(Ordering::Relaxed),
            incomplete: tally.incomplete.load(Ordering::Relaxed),
            completed_in_window: tally.completed_in_window.load(Ordering::Relaxed) as f64
                / CALL_UNITS,
        })
    }
}

impl Rpc for SummarizeRaw {
    fn call(
        &self,
        channel: Channel,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<(), Status>> + Send + 'static {
        let request = request_with_timeout(self.body.clone(), timeout);
        let (tally, expected) = (self.tally.clone(), self.expected_entries);
        let window = self.window;
        let window_start = window.0;
        async move {
            let start = Instant::now();
            let measured = start >= window_start;
            let mut grpc = tonic::client::Grpc::new(channel);
            grpc.ready()
                .await
                .map_err(|e| Status::from_error(Box::new(e)))?;
            let path = PathAndQuery::from_static(SUMMARIZE_PATH);
            match grpc.unary(request, path, RawCodec).await {
                Ok(response) => {
                    let summary = response.into_inner();
                    tally.answered(expected, window, start, Instant::now(), &summary);
                    Ok(())
                }
                Err(status) => {
                    // Only refusals the server sent (no local source error) are looked at:
                    // every one, warm-up included, must carry RetryInfo (each call of the
                    // workload fits the whole budget, so none may be refused for good:
                    // MEMORY_BUDGET without RetryInfo would be a wrong estimate); measured
                    // ones are timed.
                    if status.code() == Code::ResourceExhausted
                        && std::error::Error::source(&status).is_none()
                    {
                        let latency = start.elapsed();
                        let details = status.get_error_details();
                        let reason = refusal_reason(&details);
                        if details.retry_info().is_none() && reason != "MESSAGE_TOO_LARGE" {
                            tally.no_retry_info.fetch_add(1, Ordering::Relaxed);
                        }
                        if measured {
                            // Fails only if HdrHistogram rejects constant bounds, which it
                            // does not; the sample is lost then, the status is still counted.
                            let _ = tally.refused(reason, latency);
                        }
                    }
                    Err(status)
                }
            }
        }
    }
}

/// A copy of what [`SummarizeRaw`] saw.
#[derive(Clone, Debug, PartialEq)]
pub struct TallySnapshot {
    /// Refusals (RESOURCE_EXHAUSTED) by ErrorInfo reason (CONCURRENCY_LIMIT, QUEUE_TIMEOUT,
    /// MEMORY_BUDGET, MEMORY_PRESSURE), with their latency in µs from the call's actual start.
    pub refusals: Vec<(String, Percentiles)>,
    /// Latency of the refusals that are meant to be immediate (every reason but
    /// [`QUEUE_TIMEOUT_REASON`]): the issue's shed latency.
    pub immediate: Percentiles,
    /// Refusals that carried no RetryInfo.
    pub no_retry_info: u64,
    /// OK answers marked degraded.
    pub degraded: u64,
    /// OK answers that did not summarize every entry.
    pub incomplete: u64,
    /// Complete OK answers inside the window: each call counts with the share of its duration
    /// (send to answer) that lies inside the window, whenever it was sent.
    pub completed_in_window: f64,
}

impl TallySnapshot {
    /// Refusals with `reason`.
    pub fn refused(&self, reason: &str) -> u64 {
        self.refusals
            .iter()
            .find(|(r, _)| r == reason)
            .map_or(0, |(_, p)| p.count)
    }
}

// ---------------------------------------------------------------------------------------------
// The server.

/// How to start the server under test.
#[derive(Clone, Debug)]
pub struct ServerSpec<'a> {
    /// The `insight-service` binary.
    pub bin: &'a Path,
    /// The fake Gemini's base URL.
    pub llm_url: String,
    /// `--overload-protection on` (else `off`: the control run).
    pub protection: bool,
    /// `--prompt-budget-bytes`.
    pub prompt_budget_bytes: u32,
    /// Further flags.
    pub extra: Vec<String>,
    /// Start the server in the normal scheduling class (`chrt --other 0`): needed when this
    /// process's threads run `SCHED_IDLE` (`loadgen::idle_class_for_this_process`), whose
    /// class a child would otherwise inherit. Needs root.
    pub normal_class: bool,
}

impl ServerSpec<'_> {
    /// Every flag: the address, JSON logs (the address is read from them), the Gemini backend
    /// pointed at the fake, and the overload switch. Every other setting is the default a
    /// fresh machine runs with (max concurrency 4, queue 8 for 2 s, memory budget half the
    /// cgroup limit), because those are what the proof is about.
    pub fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--llm-backend",
            "gemini",
            "--llm-base-url",
            &self.llm_url,
            "--prompt-budget-bytes",
            &self.prompt_budget_bytes.to_string(),
            "--overload-protection",
            if self.protection { "on" } else { "off" },
            // The store is not used here: in memory, never an insight.db in the working dir.
            "--database-url",
            "sqlite::memory:",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect();
        args.extend(self.extra.iter().cloned());
        args
    }
}

/// What memory a server used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryReading {
    /// Its group's figures, when it runs in one.
    pub cgroup: Option<CgroupMemory>,
    /// Its peak resident set (`VmHWM` of `/proc/<pid>/status`), while it is alive.
    pub vm_hwm: Option<u64>,
}

/// The real `insight-service` as a child process, inside `cgroup` when given.
#[derive(Debug)]
pub struct OverloadServer {
    // Declared first so it is dropped (killed and reaped) before the group is removed.
    server: ChildServer,
    cgroup: Option<MemoryCgroup>,
}

impl OverloadServer {
    /// Starts the server as `spec` says; with `cgroup`, the process is moved into the group
    /// before it execs the server (`sh -c 'echo $$ > cgroup.procs && exec insight-service'`),
    /// so every byte it ever allocates is charged to the group.
    pub fn start(
        spec: &ServerSpec<'_>,
        cgroup: Option<MemoryCgroup>,
    ) -> Result<Self, OverloadError> {
        // `chrt --other 0 insight-service ...` sets the class, then execs the server.
        let normal_class: &[&str] = if spec.normal_class {
            &["chrt", "--other", "0"]
        } else {
            &[]
        };
        let mut command = match (&cgroup, normal_class) {
            (Some(group), _) => {
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(r#"echo $$ > "$0" && exec "$@""#)
                    .arg(group.procs_file())
                    .args(normal_class)
                    .arg(spec.bin);
                sh
            }
            (None, [chrt, class_args @ ..]) => {
                let mut chrt = Command::new(chrt);
                chrt.args(class_args).arg(spec.bin);
                chrt
            }
            (None, []) => Command::new(spec.bin),
        };
        command
            .args(spec.args())
            .env("RUST_LOG", "info")
            .env("GEMINI_API_KEY", FAKE_GEMINI_KEY)
            .env_remove("OPENAI_API_KEY");
        // Only the flags above configure it, whatever this shell exports.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("INSIGHT_") {
                command.env_remove(key);
            }
        }
        let server = ChildServer::start("insight-service", command, None, STARTUP_TIMEOUT)?;
        if let Some(group) = &cgroup {
            let pids = group.pids();
            if !pids.contains(&server.pid()) {
                return Err(OverloadError::NotInGroup {
                    pid: server.pid(),
                    group: group.path().display().to_string(),
                    pids,
                });
            }
        }
        Ok(Self { server, cgroup })
    }

    /// `http://addr`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.server.pid()
    }

    /// Its memory group, if any.
    pub fn cgroup(&self) -> Option<&MemoryCgroup> {
        self.cgroup.as_ref()
    }

    /// Whether the process still runs (not exited, not a zombie waiting to be reaped).
    pub fn alive(&self) -> bool {
        process_alive(self.pid())
    }

    /// Its last log lines.
    pub fn log_tail(&self) -> Vec<String> {
        self.server.log_tail()
    }

    /// Its memory figures now.
    pub fn memory(&self) -> Result<MemoryReading, OverloadError> {
        Ok(MemoryReading {
            cgroup: self.cgroup.as_ref().map(MemoryCgroup::memory).transpose()?,
            vm_hwm: vm_hwm(self.pid()),
        })
    }

    /// Resets the group's peak and failure count and the process's peak RSS, so the next
    /// [`OverloadServer::memory`] covers only what follows.
    pub fn reset_peaks(&self) -> Result<(), OverloadError> {
        if let Some(group) = &self.cgroup {
            group.reset_peak()?;
        }
        // "5" resets VmHWM to the current RSS (proc(5), clear_refs); best effort.
        let _ = std::fs::write(format!("/proc/{}/clear_refs", self.pid()), "5");
        Ok(())
    }
}

/// Whether `pid` runs: its `/proc/<pid>/stat` exists and its state is not zombie or dead.
pub fn process_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, None | Some("Z" | "X" | "x"))
}

/// `VmHWM` of `/proc/<pid>/status`, in bytes.
pub fn vm_hwm(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

// ---------------------------------------------------------------------------------------------
// One measured phase.

/// Everything one load phase measured.
#[derive(Clone, Debug)]
pub struct Measured {
    /// What the load generator counted.
    pub report: Report,
    /// What the RPC saw beyond status codes.
    pub tally: TallySnapshot,
    /// What the latency [`probe`] measured alongside the load, from its own thread and
    /// connection: its health checks (what any answer from this server costs at this load on
    /// this machine, the baseline a refusal's latency is compared with) and, when asked, the
    /// refusals of its own calls.
    pub probe: probe::ProbeReport,
    /// The server's memory at the end (peaks since the phase began).
    pub memory: MemoryReading,
    /// Whether the server process was alive at the end.
    pub alive: bool,
    /// When the server died, from the start of the phase (warm-up included), if it did.
    pub died_after: Option<Duration>,
    /// Calls the fake Gemini received during the phase.
    pub llm: LlmCounts,
}

impl Measured {
    /// Calls sent inside the window that were answered OK, summarized every entry and are not
    /// degraded.
    pub fn good(&self) -> u64 {
        self.report
            .ok()
            .saturating_sub(self.tally.degraded + self.tally.incomplete)
    }

    /// Goodput: complete OK answers per second of the measurement window, each call counted
    /// with the share of its duration that lies inside the window.
    ///
    /// Why not "calls sent in the window / time until the last of them finished" (the load
    /// generator's rate): with ~2 s calls and 4 slots, completions come in bursts of 4, and
    /// where the window's edges fall between bursts shifts that rate by up to T/W (~12% for a
    /// 15 s window), differently for a closed and an open loop. Weighting each call by its
    /// overlap with the window is an unbiased estimate of the completion rate in steady state
    /// whatever the phase of the bursts, so the 90% criterion compares like with like.
    pub fn goodput(&self) -> f64 {
        self.tally.completed_in_window / self.report.window.as_secs_f64()
    }

    /// Calls that ended in a way the issue does not allow under overload: any status but OK,
    /// RESOURCE_EXHAUSTED and UNAVAILABLE (DEADLINE_EXCEEDED included: with deadlines far
    /// above the server's queue timeout plus a call's duration, it means a hang), failures
    /// below gRPC, and calls still running at the hard stop. The load's calls only: what the
    /// latency probe saw is in [`Measured::probe`] (its own requests end DEADLINE_EXCEEDED by
    /// design when they are not refused; failed health checks are shown with its latency).
    pub fn disallowed(&self) -> Vec<(String, u64)> {
        let allowed = |name: &str| matches!(name, "OK" | "RESOURCE_EXHAUSTED" | "UNAVAILABLE");
        let mut out: Vec<(String, u64)> = self
            .report
            .status_counts()
            .into_iter()
            .filter(|(name, _)| !allowed(name))
            .map(|(name, count)| (name.to_owned(), count))
            .collect();
        // The warm-up is the onset of the load: not timed, but held to the same rule.
        out.extend(
            self.report
                .warmup_status_counts()
                .into_iter()
                .filter(|(name, _)| !allowed(name))
                .map(|(name, count)| (format!("{name} (warm-up)"), count)),
        );
        if self.report.warmup_transport_errors() > 0 {
            out.push((
                "transport errors (warm-up)".to_owned(),
                self.report.warmup_transport_errors(),
            ));
        }
        if self.report.transport_errors() > 0 {
            out.push((
                format!(
                    "transport errors (first: {})",
                    self.report.first_transport_error().unwrap_or("?")
                ),
                self.report.transport_errors(),
            ));
        }
        if self.report.unfinished() > 0 {
            out.push((
                "unfinished at the hard stop".to_owned(),
                self.report.unfinished(),
            ));
        }
        if self.report.warmup_unfinished() > 0 {
            out.push((
                "warm-up calls unfinished at the hard stop".to_owned(),
                self.report.warmup_unfinished(),
            ));
        }
        out
    }
}

/// Warm-up of the open-loop runs: longer than an admitted call takes (~2 s), so the slots are
/// full and answers flow when the window opens.
const OPEN_WARMUP: Duration = Duration::from_secs(5);
/// Health checks per second the latency probe sends during every load phase.
pub const HEALTH_PROBE_RATE: f64 = 20.0;
/// The deadline of the probe's health checks (a check is a map lookup: one that takes this
/// long means the server is not answering).
const HEALTH_CHECK_DEADLINE: Duration = Duration::from_secs(5);
/// The deadline of the probe's own SummarizeFeedback calls: half of one LLM call
/// ([`LLM_DELAY`]), so one the server does not refuse ends DEADLINE_EXCEEDED before it could
/// finish a map call, holding a slot for at most this long.
pub const PROBE_REQUEST_DEADLINE: Duration = Duration::from_millis(100);

/// How often the watcher samples the server's liveness and its group's usage during a run.
const WATCH_INTERVAL: Duration = Duration::from_millis(100);

/// The latency probe's health checks alone ([`HEALTH_PROBE_RATE`] a second for `duration`,
/// after a second for its connection to settle) against a server doing nothing else: the
/// floor under every latency the probe reports under load. Measured on a bare tonic server
/// ([`loadgen::BareHealthServer`]) and on the idle service in the same run, it separates what
/// the machine and the gRPC stack cost from what the service adds.
pub async fn idle_health(
    url: String,
    duration: Duration,
) -> Result<probe::ProbeReport, OverloadError> {
    let start = Instant::now() + Duration::from_secs(1);
    let window = (start, start + duration);
    // The request is never sent: the probe sends it only at a positive refusal rate.
    let probe = start_probe(url, SummarizeRaw::new(Bytes::new(), 0, window), 0.0, window)?;
    Ok(probe_report(probe).await?)
}

/// Starts the latency [`probe`] on its own thread: health checks at [`HEALTH_PROBE_RATE`], and
/// `load`'s request `refusal_rate` times a second, inside `window`.
fn start_probe(
    url: String,
    load: SummarizeRaw,
    refusal_rate: f64,
    window: (Instant, Instant),
) -> Result<std::thread::JoinHandle<Result<probe::ProbeReport, LoadError>>, LoadError> {
    probe::spawn(
        url,
        load,
        probe::ProbeConfig {
            health_rate: HEALTH_PROBE_RATE,
            refusal_rate,
            window,
            deadline: HEALTH_CHECK_DEADLINE,
            request_deadline: PROBE_REQUEST_DEADLINE,
        },
    )
    .map_err(|e| LoadError::Task(format!("cannot start the latency probe: {e}")))
}

/// The report of a probe from [`start_probe`], once its window is over, waited for off the
/// caller's runtime.
async fn probe_report(
    probe: std::thread::JoinHandle<Result<probe::ProbeReport, LoadError>>,
) -> Result<probe::ProbeReport, LoadError> {
    tokio::task::spawn_blocking(move || probe.join())
        .await
        .map_err(|e| LoadError::Task(format!("the latency probe: {e}")))?
        .map_err(|_| LoadError::Task("the latency probe panicked".to_owned()))?
}

/// Applies `config`'s load with a fresh [`SummarizeRaw`] of `body` to `server`, and reads its
/// memory and liveness at the end. Peaks are reset first, so they cover this phase only. While
/// the load runs, a watcher notes when the process died, if it did, and the latency
/// [`probe`] sends health checks from its own thread.
pub async fn measure(
    server: &OverloadServer,
    llm: &LoadGemini,
    body: &Bytes,
    expected_entries: u32,
    config: &LoadConfig,
) -> Result<Measured, OverloadError> {
    measure_probed(server, llm, body, expected_entries, config, 0.0).await
}

/// [`measure`], with the latency probe also sending the load's own request
/// `refusal_probe_rate` times a second (see [`probe`]: at a load the server refuses most of,
/// this times refusals from a caller that is not itself busy).
pub async fn measure_probed(
    server: &OverloadServer,
    llm: &LoadGemini,
    body: &Bytes,
    expected_entries: u32,
    config: &LoadConfig,
    refusal_probe_rate: f64,
) -> Result<Measured, OverloadError> {
    server.reset_peaks()?;
    let before = llm.counts();
    let channels = loadgen::connect(&server.url(), CONNECTIONS).await?;
    let pid = server.pid();
    let started = Instant::now();
    let watcher = tokio::spawn(async move {
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        loop {
            tick.tick().await;
            if !process_alive(pid) {
                return started.elapsed();
            }
        }
    });
    // The load generator measures calls from the end of its warm-up, counted from when `run`
    // starts (right below); so do the tally and the probe.
    let window_start = Instant::now() + config.warmup;
    let window = (window_start, window_start + config.duration);
    let rpc = SummarizeRaw::new(body.clone(), expected_entries, window);
    let probe = start_probe(server.url(), rpc.clone(), refusal_probe_rate, window)?;
    let report = loadgen::run(channels, Arc::new(rpc.clone()), config).await;
    // The probe stops at the window's end; the load's drain may already be past it.
    let probe = probe_report(probe).await?;
    let died_after = if watcher.is_finished() {
        watcher.await.ok()
    } else {
        watcher.abort();
        None
    };
    let report = report?;
    let after = llm.counts();
    Ok(Measured {
        report,
        tally: rpc.snapshot().map_err(LoadError::from)?,
        probe,
        memory: server.memory()?,
        alive: server.alive(),
        died_after,
        llm: LlmCounts {
            requests: after.requests - before.requests,
            answered: after.answered - before.answered,
            cancelled: after.cancelled - before.cancelled,
            prompt_bytes: after.prompt_bytes - before.prompt_bytes,
        },
    })
}

/// The closed-loop run that measures the sustainable rate: `concurrency` callers, as many as
/// the server runs at once (`--max-concurrency`), so nothing queues and nothing is refused.
pub fn sustainable_config(concurrency: usize, duration: Duration) -> LoadConfig {
    LoadConfig {
        mode: loadgen::Mode::Closed { concurrency },
        // One call per caller, so connections, pools and allocators are warm.
        warmup: Duration::from_secs(3),
        duration,
        timeout: Some(Duration::from_secs(60)),
        max_requests: None,
        drain: Duration::from_secs(30),
    }
}

/// The client deadline of the overload runs: three times the p99 of an admitted call at the
/// sustainable rate plus the queue timeout, within 10..=30 s. Far above what an admitted call
/// takes (its queue wait plus its own duration), so only a hang reaches it.
pub fn overload_deadline(sustained: &Measured) -> Duration {
    let p99 = Duration::from_micros(sustained.report.ok_latency().p99);
    (p99 * 3 + QUEUE_TIMEOUT).clamp(Duration::from_secs(10), Duration::from_secs(30))
}

/// The open-loop run at `rate` calls/s with at most [`MAX_OUTSTANDING`] callers in flight.
/// `deadline` is every call's deadline; the hard stop comes after it, so a call the server
/// never answers shows as DEADLINE_EXCEEDED rather than vanishing as "unfinished". The
/// warm-up (under the same load) lasts until the first admitted calls have finished, so the
/// window sees the steady state.
pub fn open_config(rate: f64, duration: Duration, deadline: Duration) -> LoadConfig {
    LoadConfig {
        mode: loadgen::Mode::Open {
            rate,
            max_outstanding: MAX_OUTSTANDING,
        },
        warmup: OPEN_WARMUP,
        duration,
        timeout: Some(deadline),
        max_requests: None,
        drain: deadline + Duration::from_secs(2),
    }
}

// ---------------------------------------------------------------------------------------------
// Rendering.

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / f64::from(1 << 20))
}

fn opt_mib(bytes: Option<u64>) -> String {
    bytes.map_or_else(|| "-".to_owned(), mib)
}

/// A plain-text table comparing phases side by side (one column each), for test output.
pub fn summary_table(columns: &[(&str, &Measured)], sustainable: f64) -> String {
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    let mut row = |name: &str, f: &dyn Fn(&Measured) -> String| {
        rows.push((name.to_owned(), columns.iter().map(|(_, m)| f(m)).collect()));
    };
    row("load", &|m| match m.report.target_rate {
        Some(rate) => format!("open {rate:.1}/s"),
        None => format!("closed x{}", m.report.concurrency),
    });
    row("measured s", &|m| {
        format!("{:.1}", m.report.elapsed.as_secs_f64())
    });
    row("calls", &|m| m.report.requests().to_string());
    row("OK (complete)", &|m| m.good().to_string());
    row("complete answers in window", &|m| {
        format!("{:.1}", m.tally.completed_in_window)
    });
    row("OK degraded/partial", &|m| {
        format!("{}/{}", m.tally.degraded, m.tally.incomplete)
    });
    row("RESOURCE_EXHAUSTED", &|m| {
        m.report.count(Code::ResourceExhausted).to_string()
    });
    row("  by reason", &|m| {
        let parts: Vec<String> = m
            .tally
            .refusals
            .iter()
            .map(|(r, p)| format!("{r} {}", p.count))
            .collect();
        if parts.is_empty() {
            "-".to_owned()
        } else {
            parts.join(", ")
        }
    });
    row("UNAVAILABLE", &|m| {
        m.report.count(Code::Unavailable).to_string()
    });
    row("DEADLINE_EXCEEDED", &|m| {
        m.report.count(Code::DeadlineExceeded).to_string()
    });
    row("other statuses", &|m| {
        let other: u64 = m
            .report
            .status_counts()
            .iter()
            .filter(|(n, _)| {
                !matches!(
                    *n,
                    "OK" | "RESOURCE_EXHAUSTED" | "UNAVAILABLE" | "DEADLINE_EXCEEDED"
                )
            })
            .map(|(_, c)| c)
            .sum();
        other.to_string()
    });
    row("transport errors", &|m| {
        m.report.transport_errors().to_string()
    });
    row("unfinished (warm-up)", &|m| {
        format!(
            "{} ({})",
            m.report.unfinished(),
            m.report.warmup_unfinished()
        )
    });
    row("goodput /s", &|m| format!("{:.2}", m.goodput()));
    row("goodput / sustainable", &|m| {
        format!(
            "{:.0}%",
            100.0 * m.goodput() / sustainable.max(f64::MIN_POSITIVE)
        )
    });
    row("OK p50 / p99 ms", &|m| {
        let p = m.report.ok_latency();
        format!("{:.0} / {:.0}", p.p50 as f64 / 1e3, p.p99 as f64 / 1e3)
    });
    row("immediate refusal p50 / p99 ms", &|m| {
        let p = m.tally.immediate;
        if p.count == 0 {
            "-".to_owned()
        } else {
            format!("{} / {}", loadgen::ms(p.p50), loadgen::ms(p.p99))
        }
    });
    row("probe: refusal p50 / p99 / max ms", &|m| {
        let p = m.probe.refusals;
        if p.count == 0 {
            "-".to_owned()
        } else {
            format!(
                "{} / {} / {} ({})",
                loadgen::ms(p.p50),
                loadgen::ms(p.p99),
                loadgen::ms(p.max),
                p.count
            )
        }
    });
    row("probe: OK / skipped / other", &|m| {
        let other: Vec<String> = m
            .probe
            .other
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        format!(
            "{} / {} / {}",
            m.probe.admitted,
            m.probe.skipped,
            if other.is_empty() {
                "0".to_owned()
            } else {
                other.join(", ")
            }
        )
    });
    row("health check p50 / p99 ms", &|m| m.probe.health_latency());
    row("queue-timeout refusal p50 ms", &|m| {
        m.tally
            .refusals
            .iter()
            .find(|(r, _)| r == QUEUE_TIMEOUT_REASON)
            .map_or_else(|| "-".to_owned(), |(_, p)| loadgen::ms(p.p50))
    });
    row("cgroup peak MiB", &|m| {
        opt_mib(m.memory.cgroup.map(|c| c.max_usage))
    });
    row("cgroup failcnt", &|m| {
        m.memory
            .cgroup
            .map_or_else(|| "-".to_owned(), |c| c.failcnt.to_string())
    });
    row("oom_kill", &|m| {
        m.memory
            .cgroup
            .and_then(|c| c.oom_kill)
            .map_or_else(|| "-".to_owned(), |n| n.to_string())
    });
    row("VmHWM MiB", &|m| opt_mib(m.memory.vm_hwm));
    row("alive at end", &|m| match (m.alive, m.died_after) {
        (true, _) => "yes".to_owned(),
        (false, Some(after)) => format!("NO (died at {:.1} s)", after.as_secs_f64()),
        (false, None) => "NO".to_owned(),
    });
    row("LLM calls (cancelled)", &|m| {
        format!("{} ({})", m.llm.requests, m.llm.cancelled)
    });

    let width0 = rows.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns.len())
        .map(|i| {
            rows.iter()
                .map(|(_, cells)| cells[i].len())
                .chain(std::iter::once(columns[i].0.len()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let _ = write!(out, "{:width0$}", "");
    for ((title, _), w) in columns.iter().zip(&widths) {
        let _ = write!(out, " | {title:>w$}");
    }
    out.push('\n');
    for (name, cells) in &rows {
        let _ = write!(out, "{name:width0$}");
        for (cell, w) in cells.iter().zip(&widths) {
            let _ = write!(out, " | {cell:>w$}");
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_counts_with_its_share_inside_the_window() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let window = (at(1000), at(3000));
        assert_eq!(share_in_window(at(1000), at(2000), window), 1_000_000);
        assert_eq!(share_in_window(at(500), at(1500), window), 500_000);
        assert_eq!(share_in_window(at(2500), at(4500), window), 250_000);
        assert_eq!(share_in_window(at(0), at(900), window), 0);
        assert_eq!(share_in_window(at(0), at(4000), window), 500_000);
    }

    #[test]
    fn the_workload_is_the_issues_request() {
        let workload = Workload::default();
        let request = workload.request();
        let Some(Input::Entries(batch)) = &request.input else {
            panic!("inline entries expected");
        };
        assert_eq!(batch.entries.len(), 1500);
        assert!(batch.entries.iter().all(|e| e.text.len() == 2000));
        let ids: std::collections::HashSet<_> = batch.entries.iter().map(|e| &e.id).collect();
        assert_eq!(ids.len(), 1500, "ids are unique");
        let len = workload.encoded().len();
        assert!(
            (3_000_000..4 << 20).contains(&len),
            "~3 MB, under 4 MiB: {len}"
        );
        assert_eq!(workload.chunks(), 30);
    }

    #[test]
    fn the_prompt_budget_fits_one_full_chunk_so_chunks_are_cut_by_count() {
        use insight_service::{domain::Entry, pipeline::chunk::chunk_ranges};
        let workload = Workload::default();
        let Some(Input::Entries(batch)) = workload.request().input else {
            panic!("inline entries expected");
        };
        let entries: Vec<Entry> = batch
            .entries
            .into_iter()
            .map(|e| Entry {
                id: e.id,
                user_id: e.user_id,
                text: e.text,
                rating: u8::try_from(e.rating).ok(),
                created_at: None,
                source: e.source,
            })
            .collect();
        let ranges = chunk_ranges(
            &entries,
            workload.chunk_size as usize,
            workload.prompt_budget_bytes() as usize,
        );
        assert_eq!(ranges.len(), 30);
    }
}
