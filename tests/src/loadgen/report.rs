//! What a load run measured: every call's outcome counted by grpc-status code (plus transport
//! failures, which have no code the server sent), and HDR histograms of latency, rendered as a
//! human table and as one JSON line.

use std::{fmt::Write as _, time::Duration};

use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tonic::{Code, Status};

/// Highest latency a histogram holds exactly (one hour, in microseconds); longer calls are
/// recorded as this value. Runs are bounded far below it.
const MAX_LATENCY_US: u64 = 3_600_000_000;
/// Significant figures of the histograms: 0.1% relative error, HdrHistogram's usual choice.
const SIGFIG: u8 = 3;
/// Number of grpc-status codes (0 OK ..= 16 UNAUTHENTICATED).
pub const CODE_COUNT: usize = 17;

/// How one call ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The call ended with this grpc-status: sent by the server (OK included), or
    /// DEADLINE_EXCEEDED when the driver's local deadline fired first, as any gRPC client reports.
    Status(Code),
    /// The call failed below gRPC (connection refused or reset, an HTTP/2 error): tonic made up
    /// a status from a local error, which is not the server's answer. Holds the error text.
    Transport(String),
}

impl Outcome {
    /// Classifies a call's result. tonic attaches the underlying error as the source of every
    /// status it synthesizes from a local failure; a status read from the server's headers or
    /// trailers has none.
    ///
    /// One local failure is not a transport error: tonic's channel enforces the `grpc-timeout`
    /// it sends and reports its expiry as CANCELLED "Timeout expired" (source
    /// [`tonic::TimeoutExpired`]). That is the caller's deadline passing, which gRPC clients
    /// report as DEADLINE_EXCEEDED, so it is counted there, like the driver's own deadline.
    pub fn from_result(result: Result<(), Status>) -> Self {
        let status = match result {
            Ok(()) => return Self::Status(Code::Ok),
            Err(status) => status,
        };
        let mut source = std::error::Error::source(&status);
        if source.is_none() {
            return Self::Status(status.code());
        }
        while let Some(error) = source {
            if error.is::<tonic::TimeoutExpired>() {
                return Self::Status(Code::DeadlineExceeded);
            }
            source = error.source();
        }
        Self::Transport(format!("{:?}: {}", status.code(), status.message()))
    }
}

/// The canonical name of a grpc-status code (as in the gRPC spec and grpcurl's output), so the
/// report reads like the error contract in DESIGN.md.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// An empty latency histogram: 1 µs to 1 h at 3 significant figures, the bounds of every
/// latency this crate records.
pub fn new_histogram() -> Result<Histogram<u64>, hdrhistogram::CreationError> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, SIGFIG)
}

/// `duration` in whole microseconds, the unit the histograms record (saturating).
pub fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// Outcomes and latencies of the calls one worker measured; merged into a [`Report`] at the end,
/// so workers never share a lock on the hot path.
#[derive(Clone, Debug)]
pub struct Recorder {
    /// Latency of calls that ended OK.
    pub(crate) ok_latency: Histogram<u64>,
    /// Latency of every call that ended with a status or a transport error.
    pub(crate) all_latency: Histogram<u64>,
    /// How late the open loop sent each call after its intended time (zero for closed loop).
    pub(crate) send_lag: Histogram<u64>,
    /// Calls per grpc-status code, indexed by the code's number.
    pub(crate) codes: [u64; CODE_COUNT],
    /// Calls that failed below gRPC.
    pub(crate) transport_errors: u64,
    /// The first transport error seen, to say what broke.
    pub(crate) first_transport_error: Option<String>,
    /// Measured calls still running when the run's hard stop came; abandoned, not counted
    /// above.
    pub(crate) unfinished: u64,
    /// Warm-up calls still running at the hard stop: a hang all the same, but outside the
    /// window, so not among the calls the percentiles should cover.
    pub(crate) warmup_unfinished: u64,
    /// Calls that finished during the warm-up (not measured, but they cost the server CPU).
    pub(crate) warmup_calls: u64,
    /// The warm-up calls per grpc-status code: not timed, but what they ended with counts
    /// (an overload test's onset is in the warm-up).
    pub(crate) warmup_codes: [u64; CODE_COUNT],
    /// Warm-up calls that failed below gRPC.
    pub(crate) warmup_transport_errors: u64,
    /// Seconds from the window's start to the last measured completion.
    pub(crate) last_completion: Option<Duration>,
}

impl Recorder {
    /// An empty recorder. Fails only if HdrHistogram rejected the constant bounds, which it
    /// does not; the error is passed on rather than assumed away.
    pub(crate) fn new() -> Result<Self, hdrhistogram::CreationError> {
        Ok(Self {
            ok_latency: new_histogram()?,
            all_latency: new_histogram()?,
            send_lag: new_histogram()?,
            codes: [0; CODE_COUNT],
            transport_errors: 0,
            first_transport_error: None,
            unfinished: 0,
            warmup_unfinished: 0,
            warmup_calls: 0,
            warmup_codes: [0; CODE_COUNT],
            warmup_transport_errors: 0,
            last_completion: None,
        })
    }

    /// Counts one measured call that ended `since_window` after the window opened.
    pub(crate) fn record(&mut self, outcome: Outcome, latency: Duration, since_window: Duration) {
        let us = micros(latency);
        self.all_latency.saturating_record(us);
        match outcome {
            Outcome::Status(code) => {
                if code == Code::Ok {
                    self.ok_latency.saturating_record(us);
                }
                if let Some(count) = self.codes.get_mut(code as usize) {
                    *count += 1;
                }
            }
            Outcome::Transport(error) => {
                self.transport_errors += 1;
                self.first_transport_error.get_or_insert(error);
            }
        }
        self.last_completion = Some(
            self.last_completion
                .map_or(since_window, |last| last.max(since_window)),
        );
    }

    /// Counts one call that finished during the warm-up: its outcome, not its latency.
    pub(crate) fn record_warmup(&mut self, outcome: Outcome) {
        self.warmup_calls += 1;
        match outcome {
            Outcome::Status(code) => {
                if let Some(count) = self.warmup_codes.get_mut(code as usize) {
                    *count += 1;
                }
            }
            Outcome::Transport(error) => {
                self.warmup_transport_errors += 1;
                self.first_transport_error.get_or_insert(error);
            }
        }
    }

    /// Counts how late an open-loop call left after its intended send time.
    pub(crate) fn record_lag(&mut self, lag: Duration) {
        self.send_lag.saturating_record(micros(lag));
    }

    /// Adds `other`'s counts and samples to this one.
    pub(crate) fn merge(&mut self, other: &Recorder) {
        // Same bounds on both sides, so adding cannot fail; a failure would only lose samples.
        let _ = self.ok_latency.add(&other.ok_latency);
        let _ = self.all_latency.add(&other.all_latency);
        let _ = self.send_lag.add(&other.send_lag);
        for (mine, theirs) in self.codes.iter_mut().zip(other.codes) {
            *mine += theirs;
        }
        for (mine, theirs) in self.warmup_codes.iter_mut().zip(other.warmup_codes) {
            *mine += theirs;
        }
        self.warmup_transport_errors += other.warmup_transport_errors;
        self.transport_errors += other.transport_errors;
        if self.first_transport_error.is_none() {
            self.first_transport_error = other.first_transport_error.clone();
        }
        self.unfinished += other.unfinished;
        self.warmup_unfinished += other.warmup_unfinished;
        self.warmup_calls += other.warmup_calls;
        self.last_completion = match (self.last_completion, other.last_completion) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
}

/// The non-zero counts of `codes` by code name, in code order.
fn named_counts(codes: &[u64; CODE_COUNT]) -> Vec<(&'static str, u64)> {
    codes
        .iter()
        .enumerate()
        .filter(|(_, count)| **count > 0)
        .map(|(code, count)| (code_name(Code::from(code as i32)), *count))
        .collect()
}

/// Percentiles of one latency histogram, in microseconds (all zero: no samples).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Smallest sample.
    pub min: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile: the latency target is stated on it.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest sample.
    pub max: u64,
    /// Arithmetic mean.
    pub mean: f64,
}

impl Percentiles {
    /// Reads the percentiles of `histogram` (all zero when it is empty).
    pub fn of(histogram: &Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return Self::default();
        }
        Self {
            count: histogram.len(),
            min: histogram.min(),
            p50: histogram.value_at_quantile(0.50),
            p90: histogram.value_at_quantile(0.90),
            p99: histogram.value_at_quantile(0.99),
            p999: histogram.value_at_quantile(0.999),
            max: histogram.max(),
            mean: histogram.mean(),
        }
    }

    fn to_json(self) -> Value {
        json!({
            "count": self.count,
            "min": self.min,
            "p50": self.p50,
            "p90": self.p90,
            "p99": self.p99,
            "p999": self.p999,
            "max": self.max,
            "mean": (self.mean * 10.0).round() / 10.0,
        })
    }
}

/// Milliseconds with three decimals, from microseconds: the table's unit.
pub fn ms(us: u64) -> String {
    format!("{:.3}", us as f64 / 1000.0)
}

/// The result of one load run.
#[derive(Clone, Debug)]
pub struct Report {
    /// `closed` or `open`.
    pub mode: &'static str,
    /// Closed loop: the number of callers; open loop: the cap on outstanding calls.
    pub concurrency: usize,
    /// Open loop: the target rate in calls per second.
    pub target_rate: Option<f64>,
    /// HTTP/2 connections the calls were spread over.
    pub connections: usize,
    /// The measurement window as configured.
    pub window: Duration,
    /// From the window's start to the last measured completion (at least 1 ms): the divisor
    /// of the rates, so calls finishing after the window are not counted for free.
    pub elapsed: Duration,
    /// Open loop: calls scheduled inside the window that were never sent because the
    /// outstanding cap stayed full until the window closed (the target rate was not reached).
    pub not_sent: u64,
    /// The merged counts and histograms.
    pub recorder: Recorder,
}

impl Report {
    /// Calls measured: every grpc-status plus transport errors (unfinished calls excluded).
    pub fn requests(&self) -> u64 {
        self.recorder.codes.iter().sum::<u64>() + self.recorder.transport_errors
    }

    /// Calls that ended with this code.
    pub fn count(&self, code: Code) -> u64 {
        self.recorder.codes.get(code as usize).copied().unwrap_or(0)
    }

    /// Calls that ended OK.
    pub fn ok(&self) -> u64 {
        self.count(Code::Ok)
    }

    /// Calls that failed below gRPC.
    pub fn transport_errors(&self) -> u64 {
        self.recorder.transport_errors
    }

    /// Measured calls abandoned at the hard stop.
    pub fn unfinished(&self) -> u64 {
        self.recorder.unfinished
    }

    /// Warm-up calls abandoned at the hard stop: not among the measured calls, but a call
    /// that never ended all the same (an overload test fails on either).
    pub fn warmup_unfinished(&self) -> u64 {
        self.recorder.warmup_unfinished
    }

    /// Calls completed during the warm-up (for per-call CPU accounting of the whole run).
    pub fn warmup_calls(&self) -> u64 {
        self.recorder.warmup_calls
    }

    /// Measured calls per second, whatever their status.
    pub fn rps(&self) -> f64 {
        self.requests() as f64 / self.elapsed.as_secs_f64()
    }

    /// OK calls per second: the throughput that counts (a server that fails fast is not fast).
    pub fn ok_rps(&self) -> f64 {
        self.ok() as f64 / self.elapsed.as_secs_f64()
    }

    /// Latency percentiles of OK calls.
    pub fn ok_latency(&self) -> Percentiles {
        Percentiles::of(&self.recorder.ok_latency)
    }

    /// Latency percentiles of all finished calls.
    pub fn all_latency(&self) -> Percentiles {
        Percentiles::of(&self.recorder.all_latency)
    }

    /// Open loop: how late calls left after their intended time (the generator's own lag).
    pub fn send_lag(&self) -> Percentiles {
        Percentiles::of(&self.recorder.send_lag)
    }

    /// Every code with a non-zero count, by name, in code order.
    pub fn status_counts(&self) -> Vec<(&'static str, u64)> {
        named_counts(&self.recorder.codes)
    }

    /// [`status_counts`](Self::status_counts) of the warm-up calls.
    pub fn warmup_status_counts(&self) -> Vec<(&'static str, u64)> {
        named_counts(&self.recorder.warmup_codes)
    }

    /// Warm-up calls that failed below gRPC.
    pub fn warmup_transport_errors(&self) -> u64 {
        self.recorder.warmup_transport_errors
    }

    /// The first transport error, if any.
    pub fn first_transport_error(&self) -> Option<&str> {
        self.recorder.first_transport_error.as_deref()
    }

    /// One line of JSON with everything measured (latencies in microseconds), for scripts.
    pub fn to_json(&self) -> Value {
        let codes: serde_json::Map<String, Value> = self
            .status_counts()
            .into_iter()
            .map(|(name, count)| (name.to_owned(), json!(count)))
            .collect();
        let mut value = json!({
            "mode": self.mode,
            "concurrency": self.concurrency,
            "connections": self.connections,
            "window_s": self.window.as_secs_f64(),
            "elapsed_s": self.elapsed.as_secs_f64(),
            "requests": self.requests(),
            "rps": (self.rps() * 10.0).round() / 10.0,
            "ok_rps": (self.ok_rps() * 10.0).round() / 10.0,
            "codes": codes,
            "transport_errors": self.transport_errors(),
            "unfinished": self.unfinished(),
            "warmup_unfinished": self.warmup_unfinished(),
            "warmup_calls": self.warmup_calls(),
            "latency_ok_us": self.ok_latency().to_json(),
            "latency_all_us": self.all_latency().to_json(),
        });
        if let Some(rate) = self.target_rate {
            value["target_rate"] = json!(rate);
            value["not_sent"] = json!(self.not_sent);
            value["send_lag_us"] = self.send_lag().to_json();
        }
        if let Some(error) = self.first_transport_error() {
            value["first_transport_error"] = json!(error);
        }
        value
    }

    /// A human-readable table (latencies in milliseconds).
    pub fn table(&self) -> String {
        let mut out = String::new();
        let load = match self.target_rate {
            Some(rate) => format!(
                "open loop at {rate:.0}/s (at most {} outstanding)",
                self.concurrency
            ),
            None => format!("closed loop, {} callers", self.concurrency),
        };
        let _ = writeln!(
            out,
            "{load} over {} connection(s), {:.2} s measured",
            self.connections,
            self.elapsed.as_secs_f64()
        );
        let _ = writeln!(
            out,
            "  requests {:>10}   {:>10.1}/s   OK {:>10.1}/s",
            self.requests(),
            self.rps(),
            self.ok_rps()
        );
        for (name, count) in self.status_counts() {
            let _ = writeln!(out, "  {name:<20} {count:>10}");
        }
        if self.transport_errors() > 0 {
            let _ = writeln!(
                out,
                "  {:<20} {:>10}   first: {}",
                "transport errors",
                self.transport_errors(),
                self.first_transport_error().unwrap_or("")
            );
        }
        if self.unfinished() > 0 {
            let _ = writeln!(out, "  {:<20} {:>10}", "unfinished", self.unfinished());
        }
        if self.warmup_unfinished() > 0 {
            let _ = writeln!(
                out,
                "  {:<20} {:>10}   (sent during the warm-up, never ended)",
                "warm-up unfinished",
                self.warmup_unfinished()
            );
        }
        if self.target_rate.is_some() && self.not_sent > 0 {
            let _ = writeln!(
                out,
                "  {:<20} {:>10}   (outstanding cap full: target rate not reached)",
                "not sent", self.not_sent
            );
        }
        let missing = self.unfinished()
            + if self.target_rate.is_some() {
                self.not_sent
            } else {
                0
            };
        if missing > 0 {
            // Calls never sent or cut off at the hard stop have no latency; they would all
            // rank above `max`, so the percentiles below understate the tail.
            let _ = writeln!(
                out,
                "  percentiles cover {} of {} calls (the other {missing} were slower than any)",
                self.requests(),
                self.requests() + missing
            );
        }
        let _ = writeln!(
            out,
            "  latency ms      {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "p50", "p90", "p99", "p99.9", "max", "mean"
        );
        let mut row = |label: &str, p: Percentiles| {
            let _ = writeln!(
                out,
                "  {label:<15} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9.3}",
                ms(p.p50),
                ms(p.p90),
                ms(p.p99),
                ms(p.p999),
                ms(p.max),
                p.mean / 1000.0
            );
        };
        row("OK", self.ok_latency());
        if self.ok() != self.requests() {
            row("all", self.all_latency());
        }
        if self.target_rate.is_some() {
            row("send lag", self.send_lag());
        }
        out
    }
}
