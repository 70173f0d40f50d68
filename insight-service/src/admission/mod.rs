//! Overload protection: the reason this service exists is that the seed's worker was
//! SIGKILLed for lack of memory. Heavy calls pass, in this order (see `crate::run`):
//! deadline → pressure shedding → concurrency limit with a bounded queue → memory admission
//! from the gRPC length prefix → handler. Health, reflection and cheap reads bypass the heavy
//! limits. Refusals are fast and typed ([`AdmissionError`]) and carry RetryInfo where waiting
//! can help (not for a message over the size limit or a call over the whole budget). A response
//! its client stops reading closes that client's connection after `--send-timeout`
//! ([`stall`]), so what the call holds is not held for as long as the client stays connected;
//! a request body that stops arriving ends its call after `--recv-timeout`, for the same
//! reason, and a heavy call's message that trickles in (each byte just inside that timeout)
//! once it is slower than `--min-body-rate` after that grace.
//!
//! Knows no tonic statuses: `grpc::error::admission_status` maps the errors.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

pub mod budget;
pub mod estimator;
pub mod layers;
pub mod pressure;
pub mod stall;
pub mod wire;

pub use budget::MemoryBudget;
pub use layers::{ConcurrencyLayer, DeadlineLayer, Limiter, MemoryGate, MemoryLayer, ShedLayer};
pub use pressure::{Pressure, PressureConfig, PressureTracker};
pub use stall::{SendStallLayer, SendWatch, StallIo};

/// Methods whose memory and time grow with their input: they go through every limit. The
/// rest (health, reflection, ListFeedback, GetJob, WatchJob, CancelJob) only through the
/// deadline, so probes and cheap reads keep answering under overload.
pub fn is_heavy(path: &str) -> bool {
    let Some(method) = path.strip_prefix("/spotifai.insight.v1.InsightService/") else {
        return false;
    };
    matches!(
        method,
        "SummarizeFeedback"
            | "StreamFeedbackSummary"
            | "AnalyzeMusic"
            | "SubmitSummaryJob"
            | "ImportFeedback"
            | "ImportListening"
    )
}

/// Methods whose request is a stream of any number of messages (none included); every other
/// method takes exactly one, and a body that ends without it is refused INVALID_ARGUMENT
/// before tonic would answer INTERNAL "Missing request message".
pub fn is_client_streaming(path: &str) -> bool {
    matches!(
        path,
        "/spotifai.insight.v1.InsightService/ImportFeedback"
            | "/spotifai.insight.v1.InsightService/ImportListening"
            | "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
            | "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    )
}

/// Largest request message of a light method (health, reflection, job lookups, ListFeedback),
/// whose requests are an id, a filter or a page token: a few hundred bytes. Light calls take
/// no slot and no budget, so what a client can make tonic buffer for them must be small by
/// itself: with `--max-message-size` it would be 4 MiB per stream, 128 streams per
/// connection, until the deadline.
pub const LIGHT_MAX_MESSAGE_BYTES: u64 = 64 * 1024;

/// Default slowest average rate, in bytes per second, at which a heavy call's request message
/// must arrive after a grace of `--recv-timeout` (`--min-body-rate`): a 4 MiB message has 16 s
/// more. Peers of an internal service send far faster; a client this slow holds a heavy slot
/// for nothing.
pub const MIN_BODY_RATE: u64 = 256 * 1024;

/// What memory admission reserved for a call (its message's estimate and counted elements),
/// held until the call ends; carried to the handler in the request's extensions, so that a
/// reservation the handler adds (reading stored input) can tell whether the two together could
/// ever fit ([`budget::Refused::beside`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Charged(pub u64);

/// Why a call was refused or cut short by overload protection.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionError {
    /// Every concurrency slot is taken and the wait queue is full.
    #[error(
        "all {limit} slots for heavy calls are busy and the wait queue is full (or would take \
         longer than --queue-timeout to reach a slot)"
    )]
    QueueFull {
        /// `--max-concurrency`.
        limit: usize,
        /// When a slot is likely free.
        retry_after: Duration,
    },
    /// The call waited in the queue for `--queue-timeout` without getting a slot.
    #[error("no slot for a heavy call freed up within {waited:?}")]
    QueueTimeout {
        /// How long it waited.
        waited: Duration,
        /// When a slot is likely free.
        retry_after: Duration,
    },
    /// The call's estimated peak memory does not fit the budget now.
    #[error("estimated memory {wanted} bytes exceeds the {available} bytes of budget free")]
    MemoryBudget {
        /// The estimate.
        wanted: u64,
        /// Budget free at the time.
        available: u64,
        /// When enough budget is likely free.
        retry_after: Duration,
    },
    /// The call's estimated peak memory exceeds the whole budget: it can never be admitted.
    #[error(
        "estimated memory {wanted} bytes exceeds the whole {limit}-byte memory budget \
         (--memory-budget), so this call can never be admitted by this server: send a \
         smaller request (for a summary: fewer or shorter entries, or for stored input a \
         smaller options.max_entries), or raise the server's budget"
    )]
    OverBudget {
        /// The estimate.
        wanted: u64,
        /// The whole budget.
        limit: u64,
    },
    /// Memory pressure is critical: new heavy calls are shed.
    #[error("memory pressure is critical; shedding new heavy calls")]
    MemoryPressure {
        /// When pressure is likely to have eased.
        retry_after: Duration,
    },
    /// The request message exceeds `--max-message-size`.
    #[error("request message of {len} bytes exceeds the {limit}-byte limit (--max-message-size)")]
    MessageTooLarge {
        /// Declared length.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// A light method's request message exceeds [`LIGHT_MAX_MESSAGE_BYTES`].
    #[error(
        "request message of {len} bytes exceeds the {limit}-byte limit of this method (its \
         requests are small; --max-message-size applies to summaries, analyses and imports)"
    )]
    LightMessageTooLarge {
        /// Declared length.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// The request is not a protobuf message of one message (caught while counting its
    /// elements, before it is decoded).
    #[error("request: {reason}")]
    Malformed {
        /// What is wrong.
        reason: &'static str,
    },
    /// The request body sent nothing for `--recv-timeout` while the server waited for it.
    #[error(
        "the request body sent no data for {after:?} while the server waited for it \
         (--recv-timeout)"
    )]
    RecvStalled {
        /// `--recv-timeout`.
        after: Duration,
    },
    /// A heavy call's request message arrived slower than `--min-body-rate` after the grace
    /// of `--recv-timeout`: a body trickling a byte at a time would otherwise hold its slot
    /// until `--request-timeout`, each byte just inside the receive timeout.
    #[error(
        "the {len}-byte request message did not arrive within {within:?} (--recv-timeout, \
         then at least {} per second: --min-body-rate)",
        ByteSize(*rate)
    )]
    RecvTooSlow {
        /// The message's declared length.
        len: u64,
        /// The time it had.
        within: Duration,
        /// The least rate, bytes per second.
        rate: u64,
    },
    /// The caller's deadline or `--request-timeout` passed.
    #[error("deadline of {after:?} exceeded")]
    DeadlineExceeded {
        /// The deadline that applied.
        after: Duration,
    },
}

/// Metrics-ready counters (exported by the telemetry issue; readable via [`AdmissionMetrics::snapshot`]).
#[derive(Debug, Default)]
pub struct AdmissionMetrics {
    /// Heavy calls that passed memory admission.
    pub admitted: AtomicU64,
    /// Refused: memory pressure critical.
    pub shed_pressure: AtomicU64,
    /// Refused: concurrency queue full or timed out.
    pub shed_concurrency: AtomicU64,
    /// Refused: memory budget.
    pub shed_memory: AtomicU64,
    /// Refused: message over the size limit.
    pub shed_too_large: AtomicU64,
    /// Cut off: deadline exceeded.
    pub deadline_exceeded: AtomicU64,
    /// Connections closed because a response waited for flow-control window longer than
    /// `--send-timeout` (the client stopped reading).
    pub send_stalls: AtomicU64,
    /// Calls cut off because their request body sent nothing for `--recv-timeout`.
    pub recv_stalls: AtomicU64,
    /// Calls that waited in the queue, and their total and longest wait (µs).
    pub queue_waits: AtomicU64,
    /// See [`AdmissionMetrics::queue_waits`].
    pub queue_wait_us_total: AtomicU64,
    /// See [`AdmissionMetrics::queue_waits`].
    pub queue_wait_us_max: AtomicU64,
}

/// A point-in-time copy of the counters, plus the budget in use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// See [`AdmissionMetrics::admitted`].
    pub admitted: u64,
    /// See [`AdmissionMetrics::shed_pressure`].
    pub shed_pressure: u64,
    /// See [`AdmissionMetrics::shed_concurrency`].
    pub shed_concurrency: u64,
    /// See [`AdmissionMetrics::shed_memory`].
    pub shed_memory: u64,
    /// See [`AdmissionMetrics::shed_too_large`].
    pub shed_too_large: u64,
    /// See [`AdmissionMetrics::deadline_exceeded`].
    pub deadline_exceeded: u64,
    /// See [`AdmissionMetrics::send_stalls`].
    pub send_stalls: u64,
    /// See [`AdmissionMetrics::recv_stalls`].
    pub recv_stalls: u64,
    /// Bytes of memory budget reserved now.
    pub budget_in_use: u64,
    /// See [`AdmissionMetrics::queue_waits`].
    pub queue_waits: u64,
    /// Mean queue wait, µs.
    pub queue_wait_us_mean: u64,
    /// Longest queue wait, µs.
    pub queue_wait_us_max: u64,
}

impl AdmissionMetrics {
    /// Records one wait in the concurrency queue.
    pub fn record_queue_wait(&self, waited: Duration) {
        let us = waited.as_micros() as u64;
        self.queue_waits.fetch_add(1, Ordering::Relaxed);
        self.queue_wait_us_total.fetch_add(us, Ordering::Relaxed);
        self.queue_wait_us_max.fetch_max(us, Ordering::Relaxed);
    }

    /// Copies the counters; `budget` gives the bytes in use.
    pub fn snapshot(&self, budget: &MemoryBudget) -> MetricsSnapshot {
        let waits = self.queue_waits.load(Ordering::Relaxed);
        MetricsSnapshot {
            admitted: self.admitted.load(Ordering::Relaxed),
            shed_pressure: self.shed_pressure.load(Ordering::Relaxed),
            shed_concurrency: self.shed_concurrency.load(Ordering::Relaxed),
            shed_memory: self.shed_memory.load(Ordering::Relaxed),
            shed_too_large: self.shed_too_large.load(Ordering::Relaxed),
            deadline_exceeded: self.deadline_exceeded.load(Ordering::Relaxed),
            send_stalls: self.send_stalls.load(Ordering::Relaxed),
            recv_stalls: self.recv_stalls.load(Ordering::Relaxed),
            budget_in_use: budget.in_use(),
            queue_waits: waits,
            queue_wait_us_mean: self
                .queue_wait_us_total
                .load(Ordering::Relaxed)
                .checked_div(waits)
                .unwrap_or(0),
            queue_wait_us_max: self.queue_wait_us_max.load(Ordering::Relaxed),
        }
    }
}

/// Memory budget when `--memory-budget` is 0 (auto): half of the cgroup limit, else a quarter
/// of the machine's memory. Half leaves room for the runtime, buffers and the allocator's
/// fragmentation, which no per-call estimate sees. A cgroup limit above the machine's memory
/// (a pod limit larger than its node) is not the one that binds: the machine's is.
pub fn default_budget(cgroup_limit: u64, system_total: u64) -> u64 {
    if cgroup_limit > 0 && (system_total == 0 || cgroup_limit <= system_total) {
        cgroup_limit / 2
    } else {
        (system_total / 4).max(64 << 20)
    }
}

/// A byte count shown in the largest unit [`parse_bytes`] reads back exactly (`256 KiB`,
/// `1000 B`), for messages that name a flag's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl std::fmt::Display for ByteSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0;
        let (value, unit) = [(1u64 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")]
            .into_iter()
            .find(|&(factor, _)| n >= factor && n.is_multiple_of(factor))
            .map_or((n, "B"), |(factor, unit)| (n / factor, unit));
        write!(f, "{value} {unit}")
    }
}

/// Parses a byte size: a number with an optional KiB/MiB/GiB (or K/M/G, KB/MB/GB as powers of
/// two) suffix, e.g. "128MiB". `0` means automatic.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a byte size like 128MiB"))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => {
            return Err(format!(
                "unknown byte unit {other:?} in {text:?} (use KiB, MiB, GiB)"
            ));
        }
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_show_in_the_largest_exact_unit_and_parse_back() {
        for (n, shown) in [
            (0, "0 B"),
            (1000, "1000 B"),
            (1024, "1 KiB"),
            (256 << 10, "256 KiB"),
            (1536, "1536 B"),
            (3 << 20, "3 MiB"),
            (2 << 30, "2 GiB"),
        ] {
            assert_eq!(ByteSize(n).to_string(), shown);
            assert_eq!(parse_bytes(&shown.replace(' ', "")), Ok(n));
        }
    }

    #[test]
    fn heavy_methods_are_classified() {
        assert!(is_heavy(
            "/spotifai.insight.v1.InsightService/SummarizeFeedback"
        ));
        assert!(is_heavy(
            "/spotifai.insight.v1.InsightService/ImportFeedback"
        ));
        assert!(!is_heavy("/spotifai.insight.v1.InsightService/GetJob"));
        assert!(!is_heavy(
            "/spotifai.insight.v1.InsightService/ListFeedback"
        ));
        assert!(!is_heavy("/grpc.health.v1.Health/Check"));
        assert!(!is_heavy(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        ));
    }

    #[test]
    fn byte_sizes_parse() {
        assert_eq!(parse_bytes("128MiB"), Ok(128 << 20));
        assert_eq!(parse_bytes("4 MiB"), Ok(4 << 20));
        assert_eq!(parse_bytes("2g"), Ok(2 << 30));
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("5TB").is_err());
    }

    #[test]
    fn default_budget_prefers_the_cgroup_limit() {
        assert_eq!(default_budget(256 << 20, 24 << 30), 128 << 20);
        assert_eq!(default_budget(0, 24 << 30), 6 << 30);
        assert_eq!(default_budget(64 << 30, 24 << 30), 6 << 30);
        assert_eq!(default_budget(256 << 20, 0), 128 << 20);
    }
}
