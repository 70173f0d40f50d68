//! selector-bench: peak memory of summarizing stored feedback with a selector (issue 6, item
//! 4): the summary reads the store page by page and feeds chunks to the pipeline as they
//! arrive, so the server's peak RSS must not grow with the number of matching rows (target:
//! 100,000 stored entries within 64 MB, with the `local` backend), shown next to 10,000.
//!
//! For each size: a scratch SQLite database is filled through ImportFeedback by one server
//! process, which then stops; a FRESH process (so its high-water mark is the summary's, not
//! the import's) answers one SummarizeFeedback over every stored entry, and its `VmHWM`
//! (peak resident set, from /proc) is read after the answer.
//!
//! `cargo run --release -p spotifai-e2e --bin selector-bench` (builds the release
//! `insight-service` binary first). Bounded: two imports and two summaries, then it exits.

use std::{
    path::Path,
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::Parser;
use spotifai_e2e::{Spawned, service_bin, shared_data};
use spotifai_proto::insight::{
    self as pb, insight_service_client::InsightServiceClient, summarize_feedback_request::Input,
};

/// The bound on the peak RSS of a 100,000-entry selector summary.
const TARGET_PEAK_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Parser, Debug)]
#[command(about = "Peak RSS of selector summaries over 10k and 100k stored entries")]
struct Args {
    /// Stored entries to summarize, one run each.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    sizes: Vec<usize>,
    /// Entries per chunk (50 keeps the reply of 100,000 entries at 2,000 chunk insights).
    #[arg(long, default_value_t = 50)]
    chunk_size: u32,
    /// Extra flags for the summarizing server (e.g. `--cache-ttl=0`).
    #[arg(long, allow_hyphen_values = true)]
    server_arg: Vec<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let bin = match service_bin("insight-service") {
        Ok(bin) => bin,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    };
    let texts = review_texts();
    println!(
        "| stored entries | import s | summary s | entries used | chunks | idle RSS MiB | peak RSS (VmHWM) MiB | within 64 MB |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---|");
    let mut ok = true;
    for &size in &args.sizes {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("bench.db").display());
        let import_secs = import(&bin, &url, size, &texts).await;
        let run = summarize(&bin, &url, size, args.chunk_size, &args.server_arg).await;
        let within = run.peak_bytes <= TARGET_PEAK_BYTES;
        if size >= 100_000 && !within {
            ok = false;
        }
        println!(
            "| {size} | {import_secs:.1} | {:.1} | {} | {} | {:.1} | {:.1} | {} |",
            run.seconds,
            run.entries_used,
            run.chunks,
            mib(run.idle_bytes),
            mib(run.peak_bytes),
            if within { "yes" } else { "**no**" }
        );
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Review texts from the shared Spotify data when present, else synthetic ones of similar
/// length (so the bench also runs on a clone without `../shared`).
fn review_texts() -> Vec<String> {
    if let Some(data) = shared_data() {
        let texts: Vec<String> = spotifai_e2e::load_reviews(&data)
            .into_iter()
            .map(|(_id, text, _rating)| text)
            .filter(|t| !t.trim().is_empty())
            .collect();
        if !texts.is_empty() {
            return texts;
        }
    }
    eprintln!("note: ../shared/data is absent; using synthetic review texts");
    (0..1000)
        .map(|i| {
            format!(
                "Review {i}: the ads interrupt my playlists and shuffle repeats the same songs; \
                 offline downloads vanish after an update, but discovery got better."
            )
        })
        .collect()
}

fn server(bin: &Path, url: &str, extra: &[&str]) -> Spawned {
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
        "--database-url",
        url,
    ];
    args.extend_from_slice(extra);
    Spawned::start(bin, &args)
}

async fn client(spawned: &Spawned) -> InsightServiceClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(spawned.url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    InsightServiceClient::new(channel).max_decoding_message_size(64 << 20)
}

/// Imports `size` entries (review texts cycled, one minute apart) and stops the server.
async fn import(bin: &Path, url: &str, size: usize, texts: &[String]) -> f64 {
    let mut spawned = server(bin, url, &[]);
    let mut client = client(&spawned).await;
    let entries: Vec<pb::FeedbackEntry> = (0..size)
        .map(|i| pb::FeedbackEntry {
            id: format!("r{i:06}"),
            user_id: format!("u{}", i % 997),
            text: texts[i % texts.len()].clone(),
            rating: (i % 5 + 1) as u32,
            created_at: Some(prost_types::Timestamp {
                seconds: 1_600_000_000 + i as i64 * 60,
                nanos: 0,
            }),
            source: "google_play".into(),
        })
        .collect();
    let started = Instant::now();
    let response = client
        .import_feedback(tokio_stream::iter(entries))
        .await
        .expect("import")
        .into_inner();
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(response.inserted as usize, size, "{response:?}");
    spawned.signal(libc::SIGTERM);
    spawned.wait_exit(Duration::from_secs(30));
    seconds
}

struct Run {
    seconds: f64,
    entries_used: u32,
    chunks: usize,
    idle_bytes: u64,
    peak_bytes: u64,
}

/// One selector summary over every stored entry in a fresh process; its peak RSS after.
async fn summarize(bin: &Path, url: &str, size: usize, chunk_size: u32, extra: &[String]) -> Run {
    let cap = size.max(10_000).to_string();
    let mut flags = vec!["--max-entries-cap", &cap, "--request-timeout", "900s"];
    flags.extend(extra.iter().map(String::as_str));
    let mut spawned = server(bin, url, &flags);
    let pid = spawned.child.id();
    let mut client = client(&spawned).await;
    let idle_bytes = status_kib(pid, "VmRSS:") * 1024;
    let request = pb::SummarizeFeedbackRequest {
        input: Some(Input::Selector(pb::FeedbackSelector::default())),
        options: Some(pb::SummaryOptions {
            chunk_size: Some(chunk_size),
            max_entries: Some(0),
            ..Default::default()
        }),
    };
    let started = Instant::now();
    let summary = client
        .summarize_feedback(request)
        .await
        .expect("selector summary")
        .into_inner();
    let seconds = started.elapsed().as_secs_f64();
    let peak_bytes = status_kib(pid, "VmHWM:") * 1024;
    assert_eq!(summary.entries_used as usize, size);
    spawned.signal(libc::SIGTERM);
    spawned.wait_exit(Duration::from_secs(30));
    Run {
        seconds,
        entries_used: summary.entries_used,
        chunks: summary.chunks.len(),
        idle_bytes,
        peak_bytes,
    }
}

/// A `kB` line of /proc/<pid>/status.
fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
