//! local-bench: the `local` backend's work for one insight-bench request, repeated, with no
//! server, runtime or network around it.
//!
//! insight-bench measures the whole service under load on a shared, noisy machine; this binary
//! isolates the summarizer so that its cost can be compared before and after a change with
//! instruction counts, which are repeatable where wall time is not:
//!
//! ```text
//! cargo build --release -p spotifai-e2e --bin local-bench
//! valgrind --tool=callgrind target/release/local-bench --iterations 1
//! valgrind --tool=callgrind target/release/local-bench --iterations 101
//! ```
//!
//! The difference of the two totals divided by 100 is the cost of one request (the CSV load and
//! process start-up cancel out). One request is what the pipeline asks of the backend for the
//! benchmark's request: the first 15 Google Play reviews in chunks of 5, three chunk summaries
//! of at most `CHUNK_INSIGHT_WORDS` words and one reduce over the three chunk insights of at
//! most `MAX_WORDS` words. `--print` shows the answer, so a change's effect on the output can be
//! reviewed too; `--time` reports wall time per request (noisy here, but a quick sanity check).

use std::time::{Duration, Instant};

use clap::Parser;
use futures::executor::block_on;
use insight_service::{
    domain::{ChunkInsight, ChunkStatus, Entry, UsageMeter},
    llm::{ChunkRequest, LlmBackend, ReduceRequest, local::LocalBackend},
    pipeline::{CHUNK_INSIGHT_WORDS, MAX_WORDS},
};

/// Runs the local backend on the insight-bench request.
#[derive(Parser, Debug)]
struct Args {
    /// How many times to summarize the request.
    #[arg(long, default_value_t = 1)]
    iterations: u32,
    /// Entries in the request (the first N reviews of the sample).
    #[arg(long, default_value_t = 15)]
    entries: usize,
    /// Entries per chunk.
    #[arg(long, default_value_t = 5)]
    chunk_size: usize,
    /// Print the chunk insights and the summary of the last iteration.
    #[arg(long)]
    print: bool,
    /// Print the mean wall time per request.
    #[arg(long)]
    time: bool,
    /// Instead of timing, print the backend's and the `text` functions' output for every review
    /// of the sample under several chunk sizes and budgets: diffing two builds' dumps shows
    /// whether a change to the summarizer changed any answer.
    #[arg(long)]
    dump: bool,
}

fn main() {
    let args = Args::parse();
    let Some(data) = spotifai_e2e::shared_data() else {
        std::process::exit(2);
    };
    let entries: Vec<Entry> = spotifai_e2e::load_reviews(&data)
        .into_iter()
        .take(args.entries)
        .map(|(id, text, rating)| entry(id, text, rating))
        .collect();

    let backend = LocalBackend::new();
    if args.dump {
        let all: Vec<Entry> = spotifai_e2e::load_reviews(&data)
            .into_iter()
            .map(|(id, text, rating)| entry(id, text, rating))
            .collect();
        dump(&backend, &all);
        return;
    }
    let started = Instant::now();
    let mut last = None;
    for _ in 0..args.iterations {
        last = Some(summarize(&backend, &entries, args.chunk_size.max(1)));
    }
    let elapsed = started.elapsed();
    if args.time && args.iterations > 0 {
        println!(
            "{:.1} µs per request ({} iterations)",
            elapsed.as_secs_f64() * 1e6 / f64::from(args.iterations),
            args.iterations
        );
    }
    if args.print
        && let Some((chunks, summary)) = last
    {
        for chunk in &chunks {
            println!(
                "chunk {}: {:?} {:?}\n  {}",
                chunk.index, chunk.themes, chunk.sentiment, chunk.insight
            );
        }
        println!("summary: {:?}\n  {}", summary.themes, summary.summary);
    }
}

fn entry(id: String, text: String, rating: u32) -> Entry {
    Entry {
        id,
        user_id: String::new(),
        text,
        rating: u8::try_from(rating).ok().filter(|r| (1..=5).contains(r)),
        created_at: None,
        source: "playstore".to_owned(),
    }
}

/// Everything the summarizer computes for `entries`, in a stable text form.
fn dump(backend: &LocalBackend, entries: &[Entry]) {
    use insight_service::text::{self, SummaryLimits};
    let mut hostile: Vec<Entry> = [
        "",
        "   \n\t ",
        "🎵🎵🎵 😡😡 👍",
        "日本語のレビューです。広告が多すぎる！シャッフルが壊れている？",
        "The ads ads ads are loud; premium is expensive. Ad after ad!",
        "Don’t like it. I'd like a refund… not bad. Goooood! suckssss",
        "version 8.6.0 crashes a lot... \"Fix it now!\" they said\r\nOK",
        "Café's ÉLAN naïve ΣΑΣ İstanbul straße ﬁne Ǆungla ad-free, users' 'quoted'",
        " ’’’ -- --",
        "a1 22 b c d e f g h i j k l m n o p q r s t u v w x y z",
        "supercalifragilisticexpialidocious supercalifragilisticexpialidocious-ness",
        "Offline mode is broken again. offline mode never syncs. Fix offline mode, and the lyrics",
    ]
    .iter()
    .enumerate()
    .map(|(i, t)| entry(format!("h{i}"), (*t).to_owned(), 1 + i as u32 % 5))
    .collect();
    hostile.extend_from_slice(entries);
    let entries = hostile;
    for e in &entries {
        let t = e.text.as_str();
        let sentences = text::split_sentences(t);
        println!("{}", e.id);
        println!(" tok {:?}", text::tokenize(t));
        println!(" ct {:?}", text::content_terms(t));
        println!(" ss {sentences:?}");
        println!(
            " lc {:?} {:?}",
            text::lexicon_counts(t),
            text::entry_score(t, e.rating)
        );
        println!(" tk {:?}", text::theme_keywords(&[t], 5));
        println!(" tkeys {:?}", text::theme_keys(&text::content_terms(t)));
        for (w, s) in [(30, 2), (5, 3), (100, 1)] {
            let limits = SummaryLimits {
                max_words: w,
                max_sentences: s,
            };
            println!(
                " es {w} {s} {:?}",
                text::extractive_summary(&sentences, limits)
            );
        }
        println!(
            " wc {} tw {:?}",
            text::word_count(t),
            text::truncate_words(t, 7)
        );
    }
    for chunk_size in [1, 2, 3, 5, 7, 10, 50] {
        for (map_words, reduce_words) in [(60, 300), (20, 40), (5, 7)] {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            for group in entries.chunks(chunk_size * 4) {
                let chunks: Vec<ChunkInsight> = group
                    .chunks(chunk_size)
                    .enumerate()
                    .map(|(index, chunk)| {
                        let insight = map_chunk(backend, index, chunk, map_words, deadline);
                        println!("C {chunk_size} {map_words} {insight:?}");
                        insight
                    })
                    .collect();
                let request = ReduceRequest {
                    chunks: &chunks,
                    max_words: reduce_words,
                    deadline,
                    usage: &UsageMeter::default(),
                };
                match block_on(backend.reduce(request)) {
                    Ok(draft) => println!("R {reduce_words} {draft:?}"),
                    Err(error) => panic!("the local backend never fails: {error}"),
                }
            }
        }
    }
}

/// The backend calls of one request, as the pipeline makes them (map every chunk, then reduce).
fn summarize(
    backend: &LocalBackend,
    entries: &[Entry],
    chunk_size: usize,
) -> (Vec<ChunkInsight>, insight_service::llm::SummaryDraft) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let chunks: Vec<ChunkInsight> = entries
        .chunks(chunk_size)
        .enumerate()
        .map(|(index, chunk)| map_chunk(backend, index, chunk, CHUNK_INSIGHT_WORDS, deadline))
        .collect();
    let request = ReduceRequest {
        chunks: &chunks,
        max_words: MAX_WORDS as usize,
        deadline,
        usage: &UsageMeter::default(),
    };
    let summary = match block_on(backend.reduce(request)) {
        Ok(draft) => draft,
        Err(error) => panic!("the local backend never fails: {error}"),
    };
    (chunks, summary)
}

/// One map call of the local backend, as the pipeline makes it, turned into its insight.
fn map_chunk(
    backend: &LocalBackend,
    index: usize,
    chunk: &[Entry],
    max_words: usize,
    deadline: tokio::time::Instant,
) -> ChunkInsight {
    let index = u32::try_from(index).unwrap_or(u32::MAX);
    let request = ChunkRequest {
        index,
        entries: chunk,
        max_words,
        deadline,
        usage: &UsageMeter::default(),
    };
    let draft = match block_on(backend.summarize_chunk(request)) {
        Ok(draft) => draft,
        Err(error) => panic!("the local backend never fails: {error}"),
    };
    ChunkInsight {
        index,
        entry_ids: chunk.iter().map(|entry| entry.id.clone()).collect(),
        insight: draft.insight,
        themes: draft.themes,
        sentiment: draft.sentiment,
        status: ChunkStatus::Ok,
        error: None,
    }
}
