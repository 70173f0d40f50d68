//! The `local` backend: a deterministic, offline summarizer, so the service does its main job
//! with no API key and is the fallback when a remote model fails.
//!
//! It writes nothing of its own invention. A chunk insight is sentences extracted from the
//! entries (TF-IDF centroid + MMR, see [`crate::text::extractive_summary`]); a summary is one
//! data-lead sentence built from computed counts and theme keywords, followed by sentences
//! extracted from the chunk insights. Themes are document-frequency keywords; sentiment is the
//! star rating blended with a word lexicon with negation ([`crate::text::sentiment`]).
//!
//! It runs on the request path, so it is plain synchronous code inside the future that scans each
//! text once ([`crate::text::digest_chunk`], [`crate::text::summarize_texts`]): in a release build
//! the benchmark's 15-entry request (three chunks and the reduce) takes about 45 µs on one core,
//! about 580,000 instructions (BENCHMARKS.md, "throughput and latency", measures it with
//! `local-bench`).

use futures::future::BoxFuture;

use super::{ChunkDraft, ChunkRequest, LlmBackend, LlmError, ReduceRequest, SummaryDraft};
use crate::domain::{ChunkInsight, Entry, Sentiment, SentimentLabel, Usage};
use crate::{
    cpu,
    text::{self, SummaryLimits},
};

/// Name reported in answers.
const NAME: &str = "local";
/// Model reported in answers; bump the suffix when the output for the same input changes, since
/// cached insights are keyed by backend and model.
const MODEL: &str = "extractive-tfidf-v1";

/// Themes per chunk insight.
const CHUNK_THEMES: usize = 5;
/// Themes of the final summary.
const SUMMARY_THEMES: usize = 8;
/// Themes named in the summary's lead sentence: enough to orient, short enough for small budgets.
const LEAD_THEMES: usize = 3;
/// Most sentences in a chunk insight: an insight is a digest, not a copy of the chunk, so roughly
/// one sentence per two entries.
const CHUNK_MAX_SENTENCES: usize = 4;
/// Fewest and most extracted sentences after the summary's lead (one more than there are
/// chunks, so each chunk can be heard and the most central point can be illustrated twice).
const SUMMARY_MIN_SENTENCES: usize = 3;
/// See [`SUMMARY_MIN_SENTENCES`].
const SUMMARY_MAX_SENTENCES: usize = 6;
/// Token estimate: about four bytes of English per token for common tokenizers. An estimate
/// only; `local` has no tokenizer.
const BYTES_PER_TOKEN: u64 = 4;

/// The offline extractive backend (`local`, model `extractive-tfidf-v1`).
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalBackend;

impl LocalBackend {
    /// A local backend; it holds no state.
    pub const fn new() -> Self {
        Self
    }
}

impl LlmBackend for LocalBackend {
    fn name(&self) -> &str {
        NAME
    }

    fn model(&self) -> &str {
        MODEL
    }

    // Large chunks (and large reduces) are summarized on the offload threads (`crate::cpu`).
    fn summarize_chunk<'a>(
        &'a self,
        request: ChunkRequest<'a>,
    ) -> BoxFuture<'a, Result<ChunkDraft, LlmError>> {
        let ChunkRequest {
            entries,
            max_words,
            usage,
            ..
        } = request;
        let bytes = entries.iter().map(|entry| entry.text.len()).sum();
        Box::pin(async move {
            let (draft, spent) = cpu::run_on(entries, bytes, move |entries| {
                chunk_draft(entries, max_words)
            })
            .await;
            usage.add(spent);
            Ok(draft)
        })
    }

    fn reduce<'a>(
        &'a self,
        request: ReduceRequest<'a>,
    ) -> BoxFuture<'a, Result<SummaryDraft, LlmError>> {
        let ReduceRequest {
            chunks,
            max_words,
            usage,
            ..
        } = request;
        let bytes = chunks.iter().map(|chunk| chunk.insight.len()).sum();
        Box::pin(async move {
            let (draft, spent) = cpu::run_on(chunks, bytes, move |chunks| {
                summary_draft(chunks, max_words)
            })
            .await;
            usage.add(spent);
            Ok(draft)
        })
    }
}

/// Map step: themes, sentiment and an extractive insight of one chunk, from one scan of the
/// entries ([`text::digest_chunk`]), with what it would have cost a model.
fn chunk_draft(entries: &[Entry], max_words: usize) -> (ChunkDraft, Usage) {
    let limits = SummaryLimits {
        max_words,
        max_sentences: entries.len().div_ceil(2).clamp(1, CHUNK_MAX_SENTENCES),
    };
    let text::ChunkDigest {
        themes,
        sentiment,
        summary: mut insight,
    } = text::digest_chunk(entries, CHUNK_THEMES, limits);
    let texts = || entries.iter().map(|entry| entry.text.as_str());
    if insight.is_empty() {
        // Nothing extractable (only stop words, one-word reviews, no sentence of three words):
        // the entries themselves, cut to budget, still tell the reader more than an empty string.
        insight = text::truncate_words(&texts().collect::<Vec<_>>().join(" "), max_words);
    }
    let prompt_bytes = texts().map(str::len).sum();
    let usage = usage(prompt_bytes, response_bytes(&insight, &themes));
    let draft = ChunkDraft {
        insight,
        themes,
        sentiment,
    };
    (draft, usage)
}

/// Reduce step: a data lead computed from the chunks, then the most representative sentences of
/// their insights, within `max_words` in total, with what it would have cost a model.
fn summary_draft(chunks: &[ChunkInsight], max_words: usize) -> (SummaryDraft, Usage) {
    let themes = merge_themes(chunks, SUMMARY_THEMES);
    let sentiment = text::merge_sentiments(chunks.iter().map(|chunk| &chunk.sentiment));
    let entries: usize = chunks.iter().map(chunk_entries).sum();
    let lead = data_lead(entries, &sentiment, &themes);

    let lead_words = text::word_count(&lead);
    let summary = if lead_words >= max_words {
        text::truncate_words(&lead, max_words)
    } else {
        let insights: Vec<&str> = chunks.iter().map(|chunk| chunk.insight.as_str()).collect();
        let limits = SummaryLimits {
            max_words: max_words - lead_words,
            max_sentences: (chunks.len() + 1).clamp(SUMMARY_MIN_SENTENCES, SUMMARY_MAX_SENTENCES),
        };
        // A hierarchical reduce feeds our own summaries back as insights; their lead is
        // restated, freshly computed, above, so extracting the old one would repeat it.
        let extracted = text::summarize_texts(&insights, limits, is_written_data_lead);
        if extracted.is_empty() {
            lead
        } else {
            format!("{lead} {extracted}")
        }
    };
    // Already within budget by construction; the cut is the guarantee, not the mechanism.
    let summary = text::truncate_words(&summary, max_words);

    let prompt_bytes = chunks
        .iter()
        .map(|chunk| chunk.insight.len() + chunk.themes.iter().map(String::len).sum::<usize>())
        .sum();
    let usage = usage(prompt_bytes, response_bytes(&summary, &themes));
    (SummaryDraft { summary, themes }, usage)
}

/// Entries a chunk stands for: its ids, or its sentiment counts when another backend left the
/// ids empty; at least one, since the pipeline only reduces non-empty chunks.
fn chunk_entries(chunk: &ChunkInsight) -> usize {
    let counted = usize::try_from(chunk.sentiment.entries()).unwrap_or(usize::MAX);
    chunk.entry_ids.len().max(counted).max(1)
}

/// Themes across chunks, most salient first. A chunk's theme at rank `r` of `n` weighs
/// `entries · (1 − r / (n + 1))`: bigger chunks count more, and the linear decay lets a theme
/// that recurs in several chunks outrank one that tops a single chunk. Variants are merged
/// ("ad" in one chunk, "ads" in another); the form with the most weight is shown. Ties: more
/// chunks, then alphabetical.
fn merge_themes(chunks: &[ChunkInsight], k: usize) -> Vec<String> {
    struct Merged<'a> {
        weight: f64,
        chunks: u32,
        surfaces: Vec<(&'a str, f64)>,
    }
    let all: Vec<&str> = chunks
        .iter()
        .flat_map(|chunk| chunk.themes.iter().map(String::as_str))
        .collect();
    let keys = text::theme_keys(&all);
    let mut merged: std::collections::BTreeMap<&str, Merged<'_>> = Default::default();
    let mut keys = keys.iter();
    for chunk in chunks {
        let size = chunk_entries(chunk) as f64;
        let slots = chunk.themes.len() as f64 + 1.0;
        for (rank, theme) in chunk.themes.iter().enumerate() {
            let Some(key) = keys.next() else { break };
            let weight = size * (1.0 - rank as f64 / slots);
            let slot = merged.entry(key.as_str()).or_insert(Merged {
                weight: 0.0,
                chunks: 0,
                surfaces: Vec::new(),
            });
            slot.weight += weight;
            slot.chunks += 1;
            match slot.surfaces.iter_mut().find(|(s, _)| *s == theme.as_str()) {
                Some((_, w)) => *w += weight,
                None => slot.surfaces.push((theme.as_str(), weight)),
            }
        }
    }
    let mut ranked: Vec<(f64, u32, &str)> = merged
        .values()
        .filter_map(|m| {
            let display = m
                .surfaces
                .iter()
                .max_by(|a, b| a.1.total_cmp(&b.1).then_with(|| b.0.cmp(a.0)))?
                .0;
            Some((m.weight, m.chunks, display))
        })
        .collect();
    ranked.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then_with(|| b.1.cmp(&a.1))
            .then_with(|| a.2.cmp(b.2))
    });
    ranked
        .into_iter()
        .take(k)
        .map(|(_, _, theme)| theme.to_owned())
        .collect()
}

/// How every data lead opens; [`is_data_lead`] recognises our own leads by it.
const LEAD_OPENING: &str = "Across ";
/// What every data lead says after the entry count; see [`LEAD_OPENING`].
const LEAD_MARKER: &str = " the tone is ";

/// One sentence of computed facts, e.g. "Across 15 entries the tone is mostly negative
/// (1 positive, 2 neutral, 12 negative; average rating 1.4/5); main themes: ads, shuffle,
/// premium."
fn data_lead(entries: usize, sentiment: &Sentiment, themes: &[String]) -> String {
    let noun = if entries == 1 { "entry" } else { "entries" };
    let tone = match sentiment.label {
        SentimentLabel::Positive => "mostly positive",
        SentimentLabel::Negative => "mostly negative",
        SentimentLabel::Neutral => "mostly neutral",
        SentimentLabel::Mixed => "mixed",
    };
    let mut lead = format!(
        "{LEAD_OPENING}{entries} {noun}{LEAD_MARKER}{tone} ({} positive, {} neutral, {} negative",
        sentiment.positive, sentiment.neutral, sentiment.negative
    );
    if sentiment.rated > 0 {
        lead.push_str(&format!(
            "; average rating {:.1}/5",
            sentiment.average_rating
        ));
        if usize::try_from(sentiment.rated).is_ok_and(|rated| rated < entries) {
            lead.push_str(&format!(" from {} ratings", sentiment.rated));
        }
    }
    lead.push(')');
    if !themes.is_empty() {
        let named: Vec<&str> = themes
            .iter()
            .take(LEAD_THEMES)
            .map(String::as_str)
            .collect();
        lead.push_str("; main themes: ");
        lead.push_str(&named.join(", "));
    }
    lead.push('.');
    lead
}

fn is_data_lead(sentence: &str) -> bool {
    sentence.starts_with(LEAD_OPENING) && sentence.contains(LEAD_MARKER)
}

/// [`is_data_lead`] of a sentence as written in an insight, before its whitespace is collapsed:
/// only a sentence that opens with "Across" is worth collapsing to check.
fn is_written_data_lead(sentence: &str) -> bool {
    sentence.trim_start().starts_with(LEAD_OPENING.trim_end())
        && is_data_lead(&sentence.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// Bytes of what an LLM would have had to write: the text and the theme keywords.
fn response_bytes(text: &str, themes: &[String]) -> usize {
    text.len() + themes.iter().map(String::len).sum::<usize>()
}

/// One call's usage; tokens are estimated from bytes ([`BYTES_PER_TOKEN`]), rounded up.
fn usage(prompt_bytes: usize, response_bytes: usize) -> Usage {
    let prompt_bytes = u64::try_from(prompt_bytes).unwrap_or(u64::MAX);
    let response_bytes = u64::try_from(response_bytes).unwrap_or(u64::MAX);
    Usage {
        llm_calls: 1,
        prompt_bytes,
        response_bytes,
        input_tokens: prompt_bytes.div_ceil(BYTES_PER_TOKEN),
        output_tokens: response_bytes.div_ceil(BYTES_PER_TOKEN),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use futures::executor::block_on;

    use super::*;
    use crate::domain::{ChunkStatus, UsageMeter};

    /// The real reviews of the shared data set (`../shared` next to the repository).
    const REVIEWS: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/data/reviews/spotify_googleplay_reviews_sample1000.csv"
    );

    fn entry(id: usize, text: &str, rating: Option<u8>) -> Entry {
        Entry {
            id: format!("e{id}"),
            user_id: String::new(),
            text: text.to_owned(),
            rating,
            created_at: None,
            source: String::new(),
        }
    }

    fn summarize(entries: &[Entry], max_words: usize) -> ChunkDraft {
        summarize_metered(entries, max_words).0
    }

    /// The chunk's draft and what the backend added to the call's meter.
    fn summarize_metered(entries: &[Entry], max_words: usize) -> (ChunkDraft, Usage) {
        let meter = UsageMeter::default();
        let request = ChunkRequest {
            index: 0,
            entries,
            max_words,
            prompt_budget_bytes: usize::MAX,
            deadline: tokio::time::Instant::now() + std::time::Duration::from_secs(60),
            usage: &meter,
        };
        match block_on(LocalBackend::new().summarize_chunk(request)) {
            Ok(draft) => (draft, meter.total()),
            Err(error) => panic!("local never fails: {error}"),
        }
    }

    fn reduce(chunks: &[ChunkInsight], max_words: usize) -> SummaryDraft {
        reduce_metered(chunks, max_words).0
    }

    /// The summary draft and what the backend added to the call's meter.
    fn reduce_metered(chunks: &[ChunkInsight], max_words: usize) -> (SummaryDraft, Usage) {
        let meter = UsageMeter::default();
        let request = ReduceRequest {
            chunks,
            max_words,
            deadline: tokio::time::Instant::now() + std::time::Duration::from_secs(60),
            usage: &meter,
        };
        match block_on(LocalBackend::new().reduce(request)) {
            Ok(draft) => (draft, meter.total()),
            Err(error) => panic!("local never fails: {error}"),
        }
    }

    /// Map every chunk of `entries` with the local backend, as the pipeline would.
    fn map_chunks(entries: &[Entry], chunk_size: usize, max_words: usize) -> Vec<ChunkInsight> {
        entries
            .chunks(chunk_size)
            .enumerate()
            .map(|(index, chunk)| {
                let draft = summarize(chunk, max_words);
                ChunkInsight {
                    index: u32::try_from(index).unwrap_or(u32::MAX),
                    entry_ids: chunk.iter().map(|e| e.id.clone()).collect(),
                    insight: draft.insight,
                    themes: draft.themes,
                    sentiment: draft.sentiment,
                    status: ChunkStatus::Ok,
                    error: None,
                }
            })
            .collect()
    }

    fn complaints() -> Vec<Entry> {
        [
            (
                "Too many ads. The ads play after every second song, even at night.",
                1,
            ),
            (
                "Shuffle is broken: it repeats the same ten songs from my playlist.",
                2,
            ),
            ("Ads are louder than the music and I cannot skip them.", 1),
            (
                "Offline downloads vanished after the update. Premium is too expensive for this.",
                1,
            ),
            ("Love the podcasts, but the ads in between are annoying.", 3),
        ]
        .iter()
        .enumerate()
        .map(|(i, (text, rating))| entry(i, text, Some(*rating)))
        .collect()
    }

    #[test]
    fn reports_its_name_and_model() {
        let backend = LocalBackend::new();
        assert_eq!(backend.name(), "local");
        assert_eq!(backend.model(), "extractive-tfidf-v1");
    }

    #[test]
    fn chunk_insight_is_extracted_themed_and_scored() {
        let entries = complaints();
        let (draft, usage) = summarize_metered(&entries, 40);
        // Four of five reviews mention ads; "offline downloads" is the next recurring phrase.
        assert_eq!(draft.themes[..3], ["ads", "downloads", "offline"]);
        assert_eq!(draft.sentiment.label, SentimentLabel::Negative);
        assert_eq!(
            (
                draft.sentiment.positive,
                draft.sentiment.neutral,
                draft.sentiment.negative
            ),
            (0, 1, 4) // the 3-star review: 0.4 · lexicon (1 − 2) / 3 = −0.13, neutral
        );
        assert_eq!(draft.sentiment.average_rating, 1.6);
        // Every sentence of the insight is a sentence of some entry.
        let all_sentences: Vec<String> = entries
            .iter()
            .flat_map(|e| text::split_sentences(&e.text))
            .collect();
        for sentence in text::split_sentences(&draft.insight) {
            assert!(all_sentences.contains(&sentence), "{sentence}");
        }
        assert!(text::word_count(&draft.insight) <= 40, "{}", draft.insight);
        assert!(draft.insight.contains("ads"), "{}", draft.insight);

        let prompt: usize = entries.iter().map(|e| e.text.len()).sum();
        let response = draft.insight.len() + draft.themes.iter().map(String::len).sum::<usize>();
        assert_eq!(usage.llm_calls, 1);
        assert_eq!(usage.prompt_bytes, prompt as u64);
        assert_eq!(usage.response_bytes, response as u64);
        assert_eq!(usage.input_tokens, (prompt as u64).div_ceil(4));
        assert_eq!(usage.output_tokens, (response as u64).div_ceil(4));
    }

    #[test]
    fn only_stop_words_fall_back_to_the_original_text() {
        let entries = [
            entry(0, "It is what it is.", None),
            entry(1, "Ok!", Some(3)),
        ];
        let draft = summarize(&entries, 300);
        assert_eq!(draft.insight, "It is what it is. Ok!");
        assert!(draft.themes.is_empty());
        assert_eq!(draft.sentiment.label, SentimentLabel::Neutral);
        assert_eq!(summarize(&entries, 3).insight, "It is what…");
    }

    #[test]
    fn hostile_inputs_never_panic_and_stay_within_budget() {
        let huge_word = "a".repeat(8 * 1024);
        let many_words = "ads shuffle crash ".repeat(2000);
        let inputs = [
            "",
            "   \n\t ",
            "🎵🎵🎵 😡😡 👍",
            "日本語のレビューです。広告が多すぎる！シャッフルが壊れている？",
            huge_word.as_str(),
            many_words.as_str(),
            "the the the and of",
            "....!!!???",
            "'''''' ’’’ -- --",
        ];
        for budget in [0, 1, 2, 5, 17, 300] {
            for input in inputs {
                let entries = [entry(0, input, Some(1)), entry(1, input, None)];
                let draft = summarize(&entries, budget);
                assert!(
                    text::word_count(&draft.insight) <= budget,
                    "{budget} {input:.20}"
                );
                let has_words = text::word_count(input) > 0;
                assert_eq!(
                    draft.insight.is_empty(),
                    budget == 0 || !has_words,
                    "{input:.20}"
                );
                let chunks = map_chunks(&entries, 1, budget);
                let summary = reduce(&chunks, budget);
                assert!(
                    text::word_count(&summary.summary) <= budget,
                    "{budget} {input:.20}"
                );
            }
        }
        // Missing entries (the pipeline never sends them, but nothing may panic).
        assert_eq!(summarize(&[], 10).sentiment, Sentiment::default());
        assert!(reduce(&[], 10).summary.starts_with("Across 0 entries"));
    }

    #[test]
    fn reduce_leads_with_computed_facts_then_extracted_sentences() {
        let mut entries = complaints();
        entries.extend(
            [
                ("Great playlists and the shuffle finally works well.", 5),
                ("Ads ruin the free version, premium costs too much.", 2),
                ("Podcasts keep crashing on my phone every evening.", 1),
                ("Too many ads, I will uninstall the app.", 1),
                ("Offline mode never works on the train.", 2),
            ]
            .iter()
            .enumerate()
            .map(|(i, (text, rating))| entry(10 + i, text, Some(*rating))),
        );
        let chunks = map_chunks(&entries, 5, 40);
        let (draft, usage) = reduce_metered(&chunks, 80);
        let lead = "Across 10 entries the tone is mostly negative (1 positive, 1 neutral, \
                    8 negative; average rating 1.9/5); main themes: ads, offline, downloads.";
        assert!(draft.summary.starts_with(lead), "{}", draft.summary);
        assert!(draft.summary.len() > lead.len(), "{}", draft.summary);
        assert!(text::word_count(&draft.summary) <= 80);
        // ads: 5 + 5; offline: 2 · 5 · (1 − 2/6); downloads: 5 · (1 − 1/6), tied with "mode"
        // and first alphabetically.
        assert_eq!(draft.themes[..3], ["ads", "offline", "downloads"]);
        // The extracted part covers more than the dominant complaint.
        for topic in ["Offline downloads", "shuffle", "premium"] {
            assert!(draft.summary.contains(topic), "{topic}: {}", draft.summary);
        }
        assert!(draft.themes.len() <= SUMMARY_THEMES);
        // After the lead, only sentences taken from the chunk insights.
        let insight_sentences: Vec<String> = chunks
            .iter()
            .flat_map(|c| text::split_sentences(&c.insight))
            .collect();
        for sentence in text::split_sentences(&draft.summary[lead.len()..]) {
            assert!(insight_sentences.contains(&sentence), "{sentence}");
        }
        assert_eq!(usage.llm_calls, 1);
        let prompt: usize = chunks
            .iter()
            .map(|c| c.insight.len() + c.themes.iter().map(String::len).sum::<usize>())
            .sum();
        assert_eq!(usage.prompt_bytes, prompt as u64);

        // Fed back (hierarchical reduce), the old lead is restated, not repeated.
        let again = ChunkInsight {
            insight: draft.summary.clone(),
            ..chunks[0].clone()
        };
        let twice = reduce(&[again], 300);
        assert_eq!(
            twice.summary.matches("the tone is").count(),
            1,
            "{}",
            twice.summary
        );
    }

    #[test]
    fn reduce_never_exceeds_any_budget_and_is_deterministic() {
        let entries = complaints();
        let chunks = map_chunks(&entries, 2, 30);
        for budget in 0..80 {
            let summary = reduce(&chunks, budget).summary;
            assert!(text::word_count(&summary) <= budget, "{budget}: {summary}");
            assert_eq!(summary.is_empty(), budget == 0);
        }
        let first = reduce(&chunks, 60);
        for _ in 0..10 {
            assert_eq!(reduce(&chunks, 60), first);
            assert_eq!(map_chunks(&entries, 2, 30), chunks);
        }
    }

    #[test]
    fn theme_merge_weighs_chunk_size_rank_and_recurrence() {
        let chunk = |size: usize, themes: &[&str]| ChunkInsight {
            index: 0,
            entry_ids: (0..size).map(|i| i.to_string()).collect(),
            insight: String::new(),
            themes: themes.iter().map(|t| (*t).to_owned()).collect(),
            sentiment: Sentiment::default(),
            status: ChunkStatus::Ok,
            error: None,
        };
        let chunks = [
            chunk(5, &["ads", "premium", "lyrics"]),
            chunk(5, &["shuffle", "ad", "lyrics"]),
            chunk(1, &["podcasts"]),
        ];
        // ads: 5·1 + 5·0.75 = 8.75 (shown as "ads", the heavier form); lyrics: 2·5·0.5 = 5;
        // shuffle 5; premium 3.75; podcasts 1. lyrics beats shuffle on recurrence.
        assert_eq!(
            merge_themes(&chunks, 8),
            ["ads", "lyrics", "shuffle", "premium", "podcasts"]
        );
        assert_eq!(merge_themes(&chunks, 2), ["ads", "lyrics"]);
    }

    /// Minimal RFC 4180 reader: quoted fields with commas, doubled quotes and line breaks.
    fn parse_csv(data: &str) -> Vec<Vec<String>> {
        let mut rows = Vec::new();
        let mut row = Vec::new();
        let mut field = String::new();
        let mut quoted = false;
        let mut chars = data.chars().peekable();
        while let Some(c) = chars.next() {
            match (quoted, c) {
                (true, '"') if chars.peek() == Some(&'"') => {
                    field.push('"');
                    chars.next();
                }
                (true, '"') => quoted = false,
                (true, _) => field.push(c),
                (false, '"') => quoted = true,
                (false, ',') => row.push(std::mem::take(&mut field)),
                (false, '\r') => {}
                (false, '\n') => {
                    row.push(std::mem::take(&mut field));
                    rows.push(std::mem::take(&mut row));
                }
                (false, _) => field.push(c),
            }
        }
        if !field.is_empty() || !row.is_empty() {
            row.push(field);
            rows.push(row);
        }
        rows
    }

    /// (review_text, review_rating) of the sample file, or `None` when it is absent.
    fn load_reviews() -> Option<Vec<(String, u8)>> {
        if !Path::new(REVIEWS).exists() {
            eprintln!("skipping: {REVIEWS} is not present");
            return None;
        }
        let data = match std::fs::read_to_string(REVIEWS) {
            Ok(data) => data,
            Err(error) => panic!("{REVIEWS} exists but cannot be read: {error}"),
        };
        let rows = parse_csv(&data);
        let header = rows.first()?;
        let column = |name: &str| header.iter().position(|h| h == name);
        let (text, rating) = (column("review_text")?, column("review_rating")?);
        Some(
            rows.iter()
                .skip(1)
                .filter_map(|row| Some((row.get(text)?.clone(), row.get(rating)?.parse().ok()?)))
                .collect(),
        )
    }

    fn first_with_rating(reviews: &[(String, u8)], stars: u8, n: usize) -> Vec<Entry> {
        reviews
            .iter()
            .filter(|(_, rating)| *rating == stars)
            .take(n)
            .enumerate()
            .map(|(i, (text, rating))| entry(i, text, Some(*rating)))
            .collect()
    }

    #[test]
    fn real_reviews_give_plausible_themes_and_sentiment() {
        let Some(reviews) = load_reviews() else {
            return;
        };
        assert_eq!(reviews.len(), 1000, "the CSV reader lost or invented rows");

        // Topics users of a music app complain about; the extraction must surface some of them.
        #[rustfmt::skip]
        let complaint_topics = [
            "account", "ad", "ads", "bug", "crash", "download", "downloads", "expensive",
            "freezing", "login", "monthly", "offline", "pay", "paying", "playlist", "playlists",
            "premium", "price", "shuffle", "skip", "stopping", "subscription", "update",
        ];
        let one_star = first_with_rating(&reviews, 1, 15);
        let draft = summarize(&one_star, 60);
        eprintln!(
            "1-star: {:?}\n{}\n{:?}",
            draft.themes, draft.insight, draft.sentiment
        );
        assert_eq!(draft.sentiment.label, SentimentLabel::Negative);
        assert_eq!(draft.sentiment.average_rating, 1.0);
        assert_eq!(draft.themes.len(), CHUNK_THEMES);
        let matched = draft
            .themes
            .iter()
            .filter(|t| complaint_topics.contains(&t.as_str()))
            .count();
        assert!(matched >= 2, "{:?}", draft.themes);
        assert!(text::word_count(&draft.insight) <= 60 && !draft.insight.is_empty());

        let five_star = first_with_rating(&reviews, 5, 15);
        let draft = summarize(&five_star, 60);
        // Praise words are reported by the sentiment; the themes name what is praised.
        for theme in &draft.themes {
            assert!(
                !text::is_generic_word(theme) && !text::is_stop_word(theme),
                "{theme}"
            );
        }
        eprintln!(
            "5-star: {:?}\n{}\n{:?}",
            draft.themes, draft.insight, draft.sentiment
        );
        assert_eq!(draft.sentiment.label, SentimentLabel::Positive);
        assert_eq!(draft.sentiment.negative, 0);
        assert!(text::word_count(&draft.insight) <= 60 && !draft.insight.is_empty());

        // The whole file through map (chunks of 5) and reduce.
        let all: Vec<Entry> = reviews
            .iter()
            .enumerate()
            .map(|(i, (text, rating))| entry(i, text, Some(*rating)))
            .collect();
        let started = std::time::Instant::now();
        let chunks = map_chunks(&all, 5, 60);
        let summary = reduce(&chunks, 120);
        eprintln!(
            "1000 reviews in {:?}: {:?}\n{}",
            started.elapsed(),
            summary.themes,
            summary.summary
        );
        assert!(
            summary
                .summary
                .starts_with("Across 1000 entries the tone is mostly positive")
        );
        // The file's best-known complaints lead the merged themes.
        for topic in ["ads", "premium"] {
            assert!(
                summary.themes[..3].iter().any(|t| t == topic),
                "{:?}",
                summary.themes
            );
        }
        assert!(text::word_count(&summary.summary) <= 120);
    }
}
