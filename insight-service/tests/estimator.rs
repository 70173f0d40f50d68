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
    cell::Cell,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::{BufMut, BytesMut};
use insight_service::{
    Config,
    admission::estimator::{EstimatorConfig, estimate},
    config::BackendKind,
    domain::FeedbackSummary,
    grpc::convert::entries_from_proto,
    llm::{
        LlmBackend,
        gemini::{GeminiConfig, GeminiGenerator},
        http::HttpLimits,
        local::LocalBackend,
        prompted::PromptedBackend,
    },
    music::{StatsBuilder, play::Play, stats::MAX_TRACKED_NAMES},
    pipeline::{Pipeline, RequestedOptions, resolve_options},
};
use prost::Message;
use spotifai_proto::insight::{self as pb, summarize_feedback_request::Input};

/// The system allocator, counting the bytes live now and the most live at once.
struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Set on the fake provider's threads: what the test's stand-in for Gemini allocates is
    /// not the call's memory. (A const-initialized `Cell` needs no allocation and no destructor,
    /// so the allocator may read it at any time.)
    static UNCOUNTED: Cell<bool> = const { Cell::new(false) };
}

fn counted() -> bool {
    !UNCOUNTED.try_with(Cell::get).unwrap_or(false)
}

fn grew(bytes: usize) {
    if counted() {
        let now = CURRENT.fetch_add(bytes, Ordering::Relaxed) + bytes;
        PEAK.fetch_max(now, Ordering::Relaxed);
    }
}

fn shrank(bytes: usize) {
    if counted() {
        CURRENT.fetch_sub(bytes, Ordering::Relaxed);
    }
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
) -> Served {
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
    Served {
        answer_len: answer.encode_to_vec().len(),
        backend: answer.backend,
        degraded: answer.degraded,
    }
}

/// What [`serve_one`] answered.
struct Served {
    answer_len: usize,
    backend: String,
    degraded: bool,
}

// ---------------------------------------------------------------------------------------------
// A stand-in for Gemini, for the remote path.

/// Serves Gemini's generateContent on loopback from threads whose allocations are not counted
/// (they are the provider's, not the call's). Every call is answered after 100 ms, so the
/// `map_parallelism` calls of a request are in flight together, with a body just under
/// `max_response_bytes`: the most the client reads, which is the estimate's response term.
fn fake_gemini(max_response_bytes: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        UNCOUNTED.set(true);
        let map = Arc::new(gemini_body(max_response_bytes, "insight"));
        let reduce = Arc::new(gemini_body(max_response_bytes, "summary"));
        for connection in listener.incoming() {
            let Ok(connection) = connection else { continue };
            let (map, reduce) = (map.clone(), reduce.clone());
            std::thread::spawn(move || {
                UNCOUNTED.set(true);
                // A client that went away is not the test's concern.
                let _ = answer(connection, &map, &reduce);
            });
        }
    });
    url
}

/// A generateContent response whose answer is `{"<key>": ~1 MiB of words, "themes": [...]}`,
/// of at most `max_response_bytes` bytes.
fn gemini_body(max_response_bytes: usize, key: &str) -> Vec<u8> {
    let words = "word ".repeat((max_response_bytes - 8 * 1024) / 5);
    let mut answer = serde_json::Map::new();
    answer.insert(key.to_owned(), words.trim_end().into());
    answer.insert("themes".to_owned(), serde_json::json!(["ads", "shuffle"]));
    let body = serde_json::json!({
        "candidates": [{
            "content": {"role": "model", "parts": [{"text": serde_json::Value::Object(answer).to_string()}]},
            "finishReason": "STOP"
        }],
        "usageMetadata": {"promptTokenCount": 1000, "candidatesTokenCount": 250000}
    })
    .to_string()
    .into_bytes();
    assert!(body.len() <= max_response_bytes && body.len() > max_response_bytes - 16 * 1024);
    body
}

/// Reads one HTTP/1.1 request and answers it with `map` or, for a reduce prompt, `reduce`.
fn answer(mut connection: TcpStream, map: &[u8], reduce: &[u8]) -> std::io::Result<()> {
    let mut request = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let find = |haystack: &[u8], needle: &[u8]| {
        haystack
            .windows(needle.len())
            .position(|window| window == needle)
    };
    let body_start = loop {
        let n = connection.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        request.extend_from_slice(&buf[..n]);
        if let Some(at) = find(&request, b"\r\n\r\n") {
            break at + 4;
        }
    };
    let headers = String::from_utf8_lossy(&request[..body_start]).to_ascii_lowercase();
    let length: usize = headers
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0);
    while request.len() < body_start + length {
        let n = connection.read(&mut buf)?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let body = if find(&request[body_start..], b"combine summaries").is_some() {
        reduce
    } else {
        map
    };
    std::thread::sleep(Duration::from_millis(100));
    write!(
        connection,
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n",
        body.len()
    )?;
    connection.write_all(body)?;
    connection.flush()
}

struct Row {
    shape: &'static str,
    encoded: usize,
    measured: usize,
    estimate: u64,
}

#[test]
fn the_estimate_bounds_the_measured_peak_without_being_absurd() {
    // The server's defaults, wired as `insight_service::run` wires them.
    let config = Config::default();
    let estimator = config.estimator_config();
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
        let (served, measured) =
            peak_of(|| serve_one(&encoded, &pipeline, config.max_entries_cap, &runtime));
        assert!(served.answer_len > 0);
        rows.push(Row {
            shape,
            encoded: encoded.len(),
            measured,
            estimate: estimate(encoded.len() as u64, &estimator),
        });
    }

    // The remote path: the same call through the Gemini backend, against a provider that
    // answers every call with as many bytes as the client will read, `map_parallelism` calls
    // at a time. This is the estimate's in-flight term, which the local backend never uses.
    let url = fake_gemini(config.llm_max_response_bytes);
    let io_runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let gemini = GeminiGenerator::new(GeminiConfig {
        base_url: url,
        limits: HttpLimits {
            max_response_bytes: config.llm_max_response_bytes,
            ..HttpLimits::default()
        },
        ..GeminiConfig::new(secrecy::SecretString::from("test-key".to_owned()))
    })
    .unwrap();
    let remote_backend: Arc<dyn LlmBackend> = Arc::new(PromptedBackend::new(gemini));
    // What a server with `--llm-backend gemini` charges.
    let remote_estimator = Config {
        llm_backend: BackendKind::Gemini,
        ..Config::default()
    }
    .estimator_config();
    let remote = Pipeline::new(remote_backend, config.pipeline_config());
    // Its own warm-up: the HTTP client's first connection and TLS provider set-up.
    serve_one(&warm_up, &remote, config.max_entries_cap, &io_runtime);
    let encoded = request(60, 2_000).encode_to_vec();
    let (served, measured) =
        peak_of(|| serve_one(&encoded, &remote, config.max_entries_cap, &io_runtime));
    assert_eq!(
        (served.backend.as_str(), served.degraded),
        ("gemini", false),
        "the remote call must succeed for its memory to be measured"
    );
    rows.push(Row {
        shape: "60 entries x ~2 KB, Gemini answering 1 MiB each",
        encoded: encoded.len(),
        measured,
        estimate: estimate(encoded.len() as u64, &remote_estimator),
    });
    // The estimate above also charges the 10,000 tiny entries a 124 kB message could hold,
    // which covers a lot. Told the real entry count, it must still bound the call: so the
    // in-flight term holds on its own.
    let knowing_the_entries = estimate(
        encoded.len() as u64,
        &EstimatorConfig {
            max_entries_cap: 60,
            ..remote_estimator
        },
    );
    println!(
        "remote call: measured {measured} B, estimate with the true entry count \
         {knowing_the_entries} B"
    );
    assert!(
        measured as u64 <= knowing_the_entries,
        "remote: measured {measured} B exceeds even the estimate's in-flight term \
         ({knowing_the_entries} B with the entry term at its true size)"
    );

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
    // about 1.4-1.8x the measured peak with the `local` backend (see BENCHMARKS.md), which is
    // charged no response term; with Gemini answering 1 MiB a call it is ~2x (the 3 x R per
    // call in flight is the worst moment of a parse, reached only briefly). 4x leaves room for
    // allocator-pattern changes while still catching an estimate that drifts far above
    // reality, which would refuse work the budget could hold. The 15-entry call is ~11x: its
    // estimate is almost all the fixed and in-flight terms, deliberately, so it is only checked
    // as a bound.
    for r in [&rows[0], &rows[1], &rows[3]] {
        assert!(
            r.estimate <= 4 * r.measured as u64,
            "{}: the estimate {} B is more than 4x the measured {} B",
            r.shape,
            r.estimate,
            r.measured
        );
    }

    // AnalyzeMusic by user id: the statistics of stored plays whose every play brings a new
    // 512-byte artist and 32 new 128-byte genres (valid input) stay within the bound the
    // adapter reserves, because the counts stop at MAX_TRACKED_NAMES names each.
    let plays = 20_000;
    let play = |i: usize| Play {
        track_id: format!("track-{i}"),
        artist: format!("{i:0>512}"),
        genres: (0..32).map(|g| format!("{:0>128}", i * 32 + g)).collect(),
        ms_played: 200_000,
        ..Play::default()
    };
    let (stats, measured) = peak_of(|| {
        let mut builder = StatsBuilder::new();
        for i in 0..plays {
            builder.add(&play(i));
        }
        builder.finish()
    });
    let bound = StatsBuilder::max_heap_bytes(plays);
    println!(
        "music statistics of {plays} plays of new names: measured {measured} B, bound {bound} B"
    );
    assert_eq!(stats.plays, plays as u32);
    assert_eq!(stats.unique_artists as usize, MAX_TRACKED_NAMES);
    assert_eq!(stats.unique_genres as usize, MAX_TRACKED_NAMES);
    assert!(
        measured as u64 <= bound,
        "music statistics: measured {measured} B exceeds the bound {bound} B"
    );
    assert!(
        bound <= 4 * measured as u64,
        "music statistics: the bound {bound} B is more than 4x the measured {measured} B"
    );
}
