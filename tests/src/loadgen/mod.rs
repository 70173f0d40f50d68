//! A gRPC load generator that every benchmark of this workspace reuses (the `loadgen` binary is
//! a thin CLI over it; `insight-bench` drives it from code).
//!
//! Why not h2load: it counts any HTTP 200 as success, and gRPC answers errors with HTTP 200 plus a
//! `grpc-status` trailer, so a server that sheds every call with RESOURCE_EXHAUSTED looks perfect.
//! Here every call's grpc-status is counted separately, and failures below gRPC (connection
//! refused, HTTP/2 resets) are counted apart from the statuses the server sent.
//!
//! Two ways to apply load ([`Mode`]):
//! - **closed loop**: C callers, each sending its next call when the previous one ends; measures
//!   the most a server sustains at that concurrency.
//! - **open loop**: calls leave on a fixed schedule whatever the server does, with a cap on
//!   outstanding calls; latency is measured from each call's *intended* send time, so a server
//!   that stalls is charged for the calls that queued behind the stall (no coordinated omission).
//!
//! Calls are spread round-robin over N HTTP/2 connections. A run has a warm-up (not measured),
//! a measurement window, and a hard stop (`window + drain`) after which calls still running are
//! abandoned and counted as unfinished, so every run ends on its own. The RPC itself is pluggable
//! ([`Rpc`]): a benchmark of another RPC supplies its call and reuses everything else.

mod echo;
mod process;
mod report;
mod request;
mod rpc;

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::Semaphore,
    task::JoinSet,
    time::{Instant, sleep_until, timeout_at},
};
use tonic::{
    Code,
    transport::{Channel, Endpoint},
};

pub use echo::{BareHealthServer, EchoInsight, serve_echo};
pub use process::{ChildServer, IdlePoll, ProcessError, cpu_time, idle_class_for_this_process};
pub use report::{
    CODE_COUNT, Outcome, Percentiles, Recorder, Report, code_name, micros, ms, new_histogram,
};
pub use request::{
    RequestSpec, ReviewError, feedback_entries, load_review_sample, summarize_request,
    synthetic_text,
};
pub use rpc::{HealthCheck, Rpc, StreamFeedbackSummary, SummarizeFeedback, request_with_timeout};

/// How load is applied.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// `concurrency` callers, each sending its next call as soon as the previous one ends.
    Closed {
        /// Concurrent callers (at least 1).
        concurrency: usize,
    },
    /// Calls sent at `rate` per second on a fixed schedule, whether or not earlier calls ended.
    Open {
        /// Calls per second (finite, above 0).
        rate: f64,
        /// Most calls outstanding at once; when full, the next call waits for a free slot and
        /// its latency still counts from its intended send time.
        max_outstanding: usize,
    },
}

/// One load run.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadConfig {
    /// Closed or open loop.
    pub mode: Mode,
    /// Load applied before measuring, so connections, allocators and caches are warm.
    pub warmup: Duration,
    /// The measurement window: calls sent (open loop: scheduled) inside it are measured.
    pub duration: Duration,
    /// Per-call deadline, sent as `grpc-timeout` and enforced locally (DEADLINE_EXCEEDED).
    pub timeout: Option<Duration>,
    /// Stop after this many measured calls (e.g. a fixed sample of slow calls), even if the
    /// window is still open.
    pub max_requests: Option<u64>,
    /// How long calls still running when the window closes may take to finish before they are
    /// abandoned (counted as unfinished): the bound on how long a run can outlast its window.
    pub drain: Duration,
}

impl Default for LoadConfig {
    /// 16 closed-loop callers for 10 s after a 1 s warm-up, no deadline, 5 s to drain.
    fn default() -> Self {
        Self {
            mode: Mode::Closed { concurrency: 16 },
            warmup: Duration::from_secs(1),
            duration: Duration::from_secs(10),
            timeout: None,
            max_requests: None,
            drain: Duration::from_secs(5),
        }
    }
}

/// Why a load run could not start or finish.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The run has nothing to send on.
    #[error("no connections to send calls on")]
    NoChannels,
    /// A configuration value is out of range.
    #[error("invalid load configuration: {0}")]
    Invalid(&'static str),
    /// The target is not a URL tonic can connect to.
    #[error("invalid target {target:?}: {}", error_chain(.source))]
    Target {
        /// The target as given.
        target: String,
        /// What tonic said.
        source: tonic::transport::Error,
    },
    /// A connection could not be established.
    #[error("cannot connect to {target} (connection {index}): {}", error_chain(.source))]
    Connect {
        /// The target URL.
        target: String,
        /// Which of the connections failed, from 0.
        index: usize,
        /// What tonic said.
        source: tonic::transport::Error,
    },
    /// A latency histogram could not be created.
    #[error("cannot create a latency histogram: {0}")]
    Histogram(#[from] hdrhistogram::CreationError),
    /// A caller task panicked (a bug in the [`Rpc`] implementation).
    #[error("a load task failed: {0}")]
    Task(String),
}

/// An error and its causes on one line. tonic's transport errors say only "transport error" and
/// keep the cause ("tcp connect error: Connection refused") in their source chain; a cause whose
/// text is already shown is not repeated, since many errors include their source's text.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// How long establishing one connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// tokio's timer resolution: deadlines are rounded up to the next millisecond tick.
const TIMER_TICK: Duration = Duration::from_millis(1);
/// Recorder shards of the open loop: calls record under a lock, and spreading them over a few
/// locks keeps concurrent completions from contending.
const OPEN_LOOP_SHARDS: usize = 16;

/// Opens `connections` separate HTTP/2 connections to `target` (e.g. `http://127.0.0.1:50051`),
/// eagerly, so a wrong address fails here instead of as a run full of transport errors.
pub async fn connect(target: &str, connections: usize) -> Result<Vec<Channel>, LoadError> {
    if connections == 0 {
        return Err(LoadError::Invalid("connections must be at least 1"));
    }
    let endpoint = Endpoint::from_shared(target.to_owned())
        .map_err(|source| LoadError::Target {
            target: target.to_owned(),
            source,
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        // Small unary messages: Nagle's algorithm would hold them back for a delayed ACK.
        .tcp_nodelay(true);
    let mut channels = Vec::with_capacity(connections);
    for index in 0..connections {
        // Each `connect` opens its own connection; clones of one Channel would share it.
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| LoadError::Connect {
                target: target.to_owned(),
                index,
                source,
            })?;
        channels.push(channel);
    }
    Ok(channels)
}

/// Applies load with `rpc` over `channels` as `config` says, and reports what happened.
///
/// Bounded in time: it returns at most `warmup + duration + drain` (plus a scheduling margin)
/// after it starts, whatever the server does.
pub async fn run<R: Rpc>(
    channels: Vec<Channel>,
    rpc: Arc<R>,
    config: &LoadConfig,
) -> Result<Report, LoadError> {
    if channels.is_empty() {
        return Err(LoadError::NoChannels);
    }
    if config.duration.is_zero() {
        return Err(LoadError::Invalid(
            "the measurement window must be longer than 0",
        ));
    }
    let channels: Arc<[Channel]> = channels.into();
    let clock = Clock::starting_now(config);
    let (recorder, not_sent, concurrency, target_rate) = match config.mode {
        Mode::Closed { concurrency } => {
            if concurrency == 0 {
                return Err(LoadError::Invalid("concurrency must be at least 1"));
            }
            let recorder = closed_loop(&channels, &rpc, config, &clock, concurrency).await?;
            (recorder, 0, concurrency, None)
        }
        Mode::Open {
            rate,
            max_outstanding,
        } => {
            if !(rate.is_finite() && rate > 0.0) {
                return Err(LoadError::Invalid("the rate must be a number above 0"));
            }
            if max_outstanding == 0 {
                return Err(LoadError::Invalid("max outstanding must be at least 1"));
            }
            let (recorder, not_sent) =
                open_loop(&channels, &rpc, config, &clock, rate, max_outstanding).await?;
            (recorder, not_sent, max_outstanding, Some(rate))
        }
    };
    let elapsed = recorder
        .last_completion
        .unwrap_or(config.duration)
        .max(Duration::from_millis(1));
    Ok(Report {
        mode: if target_rate.is_some() {
            "open"
        } else {
            "closed"
        },
        concurrency,
        target_rate,
        connections: channels.len(),
        window: config.duration,
        elapsed,
        not_sent,
        recorder,
    })
}

/// The instants that bound a run.
#[derive(Clone, Copy, Debug)]
struct Clock {
    start: Instant,
    window_start: Instant,
    window_end: Instant,
    /// Calls still running now are abandoned.
    hard_stop: Instant,
}

impl Clock {
    fn starting_now(config: &LoadConfig) -> Self {
        let start = Instant::now();
        let window_start = start + config.warmup;
        let window_end = window_start + config.duration;
        Self {
            start,
            window_start,
            window_end,
            hard_stop: window_end + config.drain,
        }
    }
}

/// Makes one call, bounded by its deadline and by the run's hard stop. `None`: the hard stop
/// came first and the call was abandoned.
async fn call_once<R: Rpc>(
    rpc: &R,
    channel: Channel,
    timeout: Option<Duration>,
    hard_stop: Instant,
) -> Option<Outcome> {
    let call = rpc.call(channel, timeout);
    match timeout.map(|timeout| Instant::now() + timeout) {
        Some(deadline) if deadline <= hard_stop => Some(match timeout_at(deadline, call).await {
            Ok(result) => Outcome::from_result(result),
            // The local deadline fired before any answer: what a gRPC client reports then.
            Err(_) => Outcome::Status(Code::DeadlineExceeded),
        }),
        _ => timeout_at(hard_stop, call)
            .await
            .ok()
            .map(Outcome::from_result),
    }
}

async fn closed_loop<R: Rpc>(
    channels: &Arc<[Channel]>,
    rpc: &Arc<R>,
    config: &LoadConfig,
    clock: &Clock,
    concurrency: usize,
) -> Result<Recorder, LoadError> {
    let next_channel = Arc::new(AtomicUsize::new(0));
    let claimed = Arc::new(AtomicU64::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..concurrency {
        let mut recorder = Recorder::new()?;
        let (channels, rpc, next_channel, claimed) = (
            channels.clone(),
            rpc.clone(),
            next_channel.clone(),
            claimed.clone(),
        );
        let (clock, timeout, max_requests) = (*clock, config.timeout, config.max_requests);
        workers.spawn(async move {
            loop {
                let sent = Instant::now();
                if sent >= clock.window_end {
                    break;
                }
                let measured = sent >= clock.window_start;
                if measured
                    && let Some(max) = max_requests
                    && claimed.fetch_add(1, Ordering::Relaxed) >= max
                {
                    break;
                }
                let index = next_channel.fetch_add(1, Ordering::Relaxed) % channels.len();
                let channel = channels[index].clone();
                let Some(outcome) = call_once(&*rpc, channel, timeout, clock.hard_stop).await
                else {
                    if measured {
                        recorder.unfinished += 1;
                    } else {
                        recorder.warmup_unfinished += 1;
                    }
                    break;
                };
                let done = Instant::now();
                if measured {
                    recorder.record(outcome, done - sent, done - clock.window_start);
                } else {
                    recorder.record_warmup(outcome);
                }
            }
            recorder
        });
    }
    let mut total = Recorder::new()?;
    while let Some(joined) = workers.join_next().await {
        let recorder = joined.map_err(|error| LoadError::Task(error.to_string()))?;
        total.merge(&recorder);
    }
    Ok(total)
}

async fn open_loop<R: Rpc>(
    channels: &Arc<[Channel]>,
    rpc: &Arc<R>,
    config: &LoadConfig,
    clock: &Clock,
    rate: f64,
    max_outstanding: usize,
) -> Result<(Recorder, u64), LoadError> {
    let shards: Arc<[Mutex<Recorder>]> = (0..OPEN_LOOP_SHARDS)
        .map(|_| Recorder::new().map(Mutex::new))
        .collect::<Result<Vec<_>, _>>()?
        .into();
    let permits = Arc::new(Semaphore::new(max_outstanding));
    // Call k is intended to leave at start + k / rate; it is measured when that instant falls
    // inside the window.
    let first_measured = (config.warmup.as_secs_f64() * rate).ceil() as u64;
    let window_end_k = ((config.warmup + config.duration).as_secs_f64() * rate).ceil() as u64;
    let last_k = match config.max_requests {
        Some(max) => window_end_k.min(first_measured.saturating_add(max)),
        None => window_end_k,
    };
    let mut calls = JoinSet::new();
    let mut not_sent = 0;
    let mut k = 0;
    while k < last_k {
        let intended = clock.start + Duration::from_secs_f64(k as f64 / rate);
        // The timer rounds deadlines up to its next tick, so waiting for `intended` itself would
        // send every call up to a tick late and charge that to the server. Waking a tick early
        // sends within one tick of schedule, and latency then counts from the actual send.
        sleep_until(intended.checked_sub(TIMER_TICK).unwrap_or(intended)).await;
        let permit = match timeout_at(clock.window_end, permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => permit,
            // The cap stayed full until the window closed: the remaining scheduled calls of
            // the window were never sent, which the report says instead of hiding.
            _ => {
                not_sent = last_k.saturating_sub(k.max(first_measured));
                break;
            }
        };
        // Reap finished calls so the set does not grow with the run's length; a call task
        // that panicked fails the run here rather than leaving the counts short unsaid.
        while let Some(result) = calls.try_join_next() {
            result.map_err(|error| LoadError::Task(error.to_string()))?;
        }
        let index = (k % channels.len() as u64) as usize;
        let shard = (k % OPEN_LOOP_SHARDS as u64) as usize;
        let (channel, rpc, shards) = (channels[index].clone(), rpc.clone(), shards.clone());
        let (clock, timeout, measured) = (*clock, config.timeout, k >= first_measured);
        calls.spawn(async move {
            let sent = Instant::now();
            let outcome = call_once(&*rpc, channel, timeout, clock.hard_stop).await;
            let done = Instant::now();
            drop(permit);
            let mut recorder = shards[shard].lock().unwrap_or_else(PoisonError::into_inner);
            match outcome {
                None if measured => recorder.unfinished += 1,
                None => recorder.warmup_unfinished += 1,
                Some(outcome) if !measured => recorder.record_warmup(outcome),
                Some(outcome) => {
                    // From the intended time when the call left late (the wait is the server's
                    // doing: the cap was full), from the actual send when it left early.
                    let from = sent.min(intended);
                    recorder.record(outcome, done - from, done - clock.window_start);
                    recorder.record_lag(sent.saturating_duration_since(intended));
                }
            }
        });
        k += 1;
    }
    // Every call ends by the hard stop on its own; the margin only covers scheduling.
    let joined = timeout_at(clock.hard_stop + Duration::from_secs(1), async {
        while let Some(result) = calls.join_next().await {
            result.map_err(|error| LoadError::Task(error.to_string()))?;
        }
        Ok::<(), LoadError>(())
    })
    .await;
    let mut total = Recorder::new()?;
    match joined {
        Ok(result) => result?,
        Err(_) => {
            total.unfinished += calls.len() as u64;
            calls.abort_all();
        }
    }
    for shard in shards.iter() {
        total.merge(&shard.lock().unwrap_or_else(PoisonError::into_inner));
    }
    Ok((total, not_sent))
}

#[cfg(test)]
mod tests;
