//! The memory estimator against reality: a counting global allocator measures the peak heap
//! of one SummarizeFeedback call, done end to end as the server does it after admission
//! (buffer the encoded message as tonic does, decode it, convert at the edge, run the
//! pipeline with the `local` backend, convert and encode the answer), and compares it with
//! `admission::estimator::estimate` under the server's default settings.
//!
//! Proves: the estimate is a safe upper bound of the measured peak for a large request
//! (1,500 entries of ~2 KB), a request of many tiny entries (10,000) and the seed's 15, and
//! it is not absurdly pessimistic for the two large requests (the ones admission is about).
//! The numbers are printed (`cargo test -p insight-service --test estimator -- --nocapture`)
//! for BENCHMARKS.md.

// `GlobalAlloc` is an unsafe trait: counting allocations needs one small unsafe impl that
// forwards to the system allocator. Allowed in this test file only.
#![allow(unsafe_code)]
#![allow(clippy::unwrap_used, missing_docs)]

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use bytes::{BufMut, BytesMut};
use insight_service::{
    Config,
    admission::estimator::{EstimatorConfig, estimate},
    domain::FeedbackSummary,
    grpc::convert::entries_from_proto,
    llm::local::LocalBackend,
    pipeline::{Pipeline, RequestedOptions, resolve_options},
};
use prost::Message;
use spotifai_proto::insight::{self as pb, summarize_feedback_request::Input};

/// The system allocator, counting the bytes live now and the most live at once.
struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(bytes: usize) {
    let now = CURRENT.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

fn shrank(bytes: usize) {
    CURRENT.fetch_sub(bytes, Ordering::Relaxed);
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// caller's contract is passed through; the counting touches only atomics, never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract (see the impl).
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            grew(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            grew(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded contract.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            // Counted as "new block, then old block freed": a growing Vec that moves holds
            // both for a moment, and that moment is part of the real peak. (In-place growth
            // is over-counted by the old size for an instant: conservative, never optimistic.)
            grew(new_size);
            shrank(layout.size());
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `work` and returns its result and the peak heap above what was live when it began.
/// Only meaningful while nothing else allocates: this file holds one test, run alone.
fn peak_of<R>(work: impl FnOnce() -> R) -> (R, usize) {
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let result = work();
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    (result, peak)
}

/// Words for generated feedback: enough variety that themes and sentence extraction do
/// real work, as they would on real reviews.
const WORDS: &[&str] = &[
    "ads",
    "shuffle",
    "playlist",
    "offline",
    "download",
    "crash",
    "podcast",
    "premium",
    "lyrics",
    "battery",
    "sound",
    "quality",
    "update",
    "login",
    "family",
    "plan",
    "radio",
    "discover",
    "weekly",
    "artist",
    "album",
    "queue",
    "search",
    "widget",
    "car",
    "bluetooth",
    "speaker",
    "price",
    "student",
    "annoying",
    "great",
    "love",
    "hate",
    "slow",
    "fast",
    "buggy",
    "smooth",
    "recommendations",
    "library",
    "sync",
];

/// A feedback text of about `bytes` bytes made of short sentences, distinct per `seed`.
fn text(seed: usize, bytes: usize) -> String {
    let mut out = String::with_capacity(bytes + 64);
    let mut n = seed.wrapping_mul(2_654_435_761);
    while out.len() < bytes {
        out.push_str("The ");
        for _ in 0..7 {
            n = n.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            out.push_str(WORDS[(n >> 33) % WORDS.len()]);
            out.push(' ');
        }
        out.push_str("is what I noticed. ");
    }
    out
}

/// A request of `count` entries of about `bytes` text bytes each, asking for every entry
/// (`max_entries` 0 = the server cap) in chunks of 5, as the overload scenario does.
fn request(count: usize, bytes: usize) -> pb::SummarizeFeedbackRequest {
    let entries = (0..count)
        .map(|i| pb::FeedbackEntry {
            id: format!("fb-{i:05}"),
            user_id: format!("user-{}", i % 97),
            text: if bytes < 16 {
                format!("ok {i}")
            } else {
                text(i, bytes)
            },
            rating: (i % 5 + 1) as u32,
            created_at: None,
            source: "play".to_owned(),
        })
        .collect();
    pb::SummarizeFeedbackRequest {
        input: Some(Input::Entries(pb::FeedbackBatch { entries })),
        options: Some(pb::SummaryOptions {
            chunk_size: Some(5),
            max_entries: Some(0),
            ..Default::default()
        }),
    }
}

/// One call as the server runs it once admitted, from the encoded bytes to the encoded answer.
fn serve_one(
    encoded: &[u8],
    pipeline: &Pipeline,
    cap: u32,
    runtime: &tokio::runtime::Runtime,
) -> usize {
    // tonic's decoder: an 8 KiB buffer, reserved up to the declared length once the 5-byte
    // prefix is read, filled from the h2 DATA frames, decoded (prost copies every string).
    // tonic drops the buffer with the request stream before the handler runs.
    let request = {
        let mut buf = BytesMut::with_capacity(8 * 1024);
        buf.reserve(encoded.len());
        buf.put_slice(encoded);
        pb::SummarizeFeedbackRequest::decode(buf.split().freeze()).unwrap()
    };
    // The adapter (grpc::service): resolve options, convert the entries, run the pipeline.
    let options = resolve_options(
        request
            .options
            .map(RequestedOptions::from)
            .unwrap_or_default(),
        cap,
    )
    .unwrap();
    let Some(Input::Entries(batch)) = request.input else {
        panic!("inline entries expected");
    };
    let entries = entries_from_proto(batch.entries).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    let summary: FeedbackSummary = runtime
        .block_on(pipeline.summarize(entries, options, deadline))
        .unwrap();
    // The answer, converted and encoded as tonic sends it.
    let answer = pb::FeedbackSummary::from(summary);
    answer.encode_to_vec().len()
}

struct Row {
    shape: &'static str,
    encoded: usize,
    measured: usize,
    estimate: u64,
}

#[test]
fn the_estimate_bounds_the_measured_peak_without_being_absurd() {
    // The server's defaults, wired exactly as `insight_service::run` wires them.
    let config = Config::default();
    let estimator = EstimatorConfig {
        max_entries_cap: u64::from(config.max_entries_cap),
        map_parallelism: u64::from(config.map_parallelism),
        prompt_budget_bytes: u64::from(config.prompt_budget_bytes),
        max_response_bytes: config.llm_max_response_bytes as u64,
    };
    let pipeline = Pipeline::new(
        std::sync::Arc::new(LocalBackend::new()),
        config.pipeline_config(),
    );
    // One thread, so the only allocations counted are the call's own.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();

    let shapes: [(&str, usize, usize); 3] = [
        ("1,500 entries x ~2 KB", 1_500, 2_000),
        ("10,000 tiny entries", 10_000, 0),
        ("15 entries x ~300 B", 15, 300),
    ];
    // Warm-up call: one-time allocations (lazily built tables, the runtime's first timer)
    // belong to the process, not to a call.
    let warm_up = request(15, 300).encode_to_vec();
    serve_one(&warm_up, &pipeline, config.max_entries_cap, &runtime);
    let mut rows = Vec::new();
    for (shape, count, bytes) in shapes {
        let encoded = request(count, bytes).encode_to_vec();
        let (answer_len, measured) =
            peak_of(|| serve_one(&encoded, &pipeline, config.max_entries_cap, &runtime));
        assert!(answer_len > 0);
        rows.push(Row {
            shape,
            encoded: encoded.len(),
            measured,
            estimate: estimate(encoded.len() as u64, &estimator),
        });
    }

    println!("| request | encoded | measured peak heap | estimate | estimate / measured |");
    println!("|---|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} B | {} B ({:.2} MiB) | {} B ({:.2} MiB) | {:.2} |",
            r.shape,
            r.encoded,
            r.measured,
            r.measured as f64 / 1_048_576.0,
            r.estimate,
            r.estimate as f64 / 1_048_576.0,
            r.estimate as f64 / r.measured as f64
        );
    }

    for r in &rows {
        assert!(
            r.measured as u64 <= r.estimate,
            "{}: measured {} B exceeds the estimate {} B: the estimate is not a safe bound",
            r.shape,
            r.measured,
            r.estimate
        );
    }
    // Not absurdly pessimistic where it matters: for the two large shapes the estimate is
    // about 2.1-2.3x the measured peak with the `local` backend (see BENCHMARKS.md). Most of
    // the gap is the in-flight term, 4 x (2 x 16 KiB prompt + 1 MiB response) = 4.1 MiB, which
    // the local backend never uses and a remote one does. 4x leaves room for allocator-pattern
    // changes while still catching an estimate that drifts far above reality, which would refuse
    // work the budget could hold. The 15-entry call is ~60x: its estimate is almost all the fixed
    // and in-flight terms, deliberately, so it is only checked as a bound.
    for r in &rows[..2] {
        assert!(
            r.estimate <= 4 * r.measured as u64,
            "{}: the estimate {} B is more than 4x the measured {} B",
            r.shape,
            r.estimate,
            r.measured
        );
    }
}
