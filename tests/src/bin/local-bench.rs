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
//! `--worst-case` times one map call, and sentence selection alone, over one very large chunk
//! against one a tenth its size (the ratio shows whether the cost grows linearly with the
//! input).

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
    /// Instead of the insight-bench request, time one map call over a single large chunk (one
    /// short sentence, then reviews each made one long sentence, repeated to
    /// `--worst-case-kib`, and to a tenth of that) with a 4-word budget and with the
    /// pipeline's: the time per call should grow about tenfold with tenfold input (linear),
    /// not a hundredfold. Sentence selection was quadratic here before ab249f6.
    #[arg(long)]
    worst_case: bool,
    /// Size of the large chunk for `--worst-case`, in KiB of review text.
    #[arg(long, default_value_t = 400)]
    worst_case_kib: usize,
}

fn main() {
    let args = Args::parse();
    let Some(data) = spotifai_e2e::shared_data() else {
        std::process::exit(2);
    };
    let all: Vec<Entry> = spotifai_e2e::load_reviews(&data)
        .into_iter()
        .map(|(id, text, rating)| entry(id, text, rating))
        .collect();
    let entries = &all[..args.entries.min(all.len())];

    let backend = LocalBackend::new();
    if args.dump {
        dump(&backend, &all);
        return;
    }
    if args.worst_case {
        worst_case(&backend, &all, args.worst_case_kib.max(10) * 1024);
        return;
    }
    let started = Instant::now();
    let mut last = None;
    for _ in 0..args.iterations {
        last = Some(summarize(&backend, entries, args.chunk_size.max(1)));
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

/// Times one map call over one chunk of `bytes` of review text, and over one of a tenth of
/// that, at two word budgets, and prints the ratio of the times.
fn worst_case(backend: &LocalBackend, reviews: &[Entry], bytes: usize) {
    let chunk_of = |bytes: usize| -> Vec<Entry> {
        // One short sentence that is the most representative (every other one shares its
        // words), so it is picked first and fits; then only sentences longer than the words
        // left, which selection used to find best and skip one full scan at a time.
        let mut chunk = vec![Entry {
            id: "short".to_owned(),
            text: "Too many ads.".to_owned(),
            ..reviews[0].clone()
        }];
        let mut total = 0;
        for (i, review) in reviews.iter().cycle().enumerate() {
            // (The count bound ends the loop even over a sample of empty reviews.)
            if total >= bytes || i >= bytes {
                break;
            }
            // Each review one sentence of at least 9 words (the sample's reviews end their
            // sentences only with the marks replaced here): none fits a 4-word budget.
            let mut text: String = review
                .text
                .chars()
                .map(|c| {
                    if matches!(c, '.' | '!' | '?' | '\n') {
                        ','
                    } else {
                        c
                    }
                })
                .collect();
            text.push_str(" and too many ads");
            if text.split_whitespace().count() < 9 {
                continue;
            }
            total += text.len();
            chunk.push(Entry {
                id: format!("{}-{i}", review.id),
                text,
                ..review.clone()
            });
        }
        chunk
    };
    let large = chunk_of(bytes);
    let small = chunk_of(bytes / 10);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3600);
    let map_call = |chunk: &[Entry], max_words: usize| {
        best_of_three(|| {
            let insight = map_chunk(backend, 0, chunk, max_words, deadline);
            assert!(!insight.insight.is_empty(), "the chunk has a summary");
        })
    };
    // Sentence selection alone: `text::extractive_summary` over every sentence of the chunk.
    let sentences = |chunk: &[Entry]| -> Vec<String> {
        chunk
            .iter()
            .flat_map(|e| insight_service::text::split_sentences(&e.text))
            .collect()
    };
    let (small_sentences, large_sentences) = (sentences(&small), sentences(&large));
    let select = |sentences: &[String], max_words: usize| {
        let limits = insight_service::text::SummaryLimits {
            max_words,
            max_sentences: 3,
        };
        best_of_three(|| {
            let summary = insight_service::text::extractive_summary(sentences, limits);
            assert!(!summary.is_empty(), "a summary");
        })
    };
    let kib = |chunk: &[Entry]| chunk.iter().map(|e| e.text.len()).sum::<usize>() / 1024;
    let report = |what: &str, t_small: Duration, t_large: Duration| {
        println!(
            "{what}: {} KiB {:.1} ms, {} KiB {:.1} ms, ratio {:.1} for {:.1}x the input",
            kib(&small),
            t_small.as_secs_f64() * 1e3,
            kib(&large),
            t_large.as_secs_f64() * 1e3,
            t_large.as_secs_f64() / t_small.as_secs_f64().max(1e-9),
            kib(&large) as f64 / kib(&small).max(1) as f64,
        );
    };
    println!(
        "{} and {} entries, {} and {} sentences",
        small.len(),
        large.len(),
        small_sentences.len(),
        large_sentences.len()
    );
    for max_words in [4, CHUNK_INSIGHT_WORDS] {
        report(
            &format!("map call, max_words {max_words:>2}"),
            map_call(&small, max_words),
            map_call(&large, max_words),
        );
        report(
            &format!("selection, max_words {max_words:>2}"),
            select(&small_sentences, max_words),
            select(&large_sentences, max_words),
        );
    }
}

/// The shortest of three runs of `work`: the machine is shared, and the slowest runs are
/// other tenants'.
fn best_of_three(mut work: impl FnMut()) -> Duration {
    (0..3)
        .map(|_| {
            let started = Instant::now();
            work();
            started.elapsed()
        })
        .min()
        .unwrap_or_default()
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
        prompt_budget_bytes: usize::MAX,
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
