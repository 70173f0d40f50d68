//! The SummarizeFeedbackRequest a benchmark sends: real Google Play reviews from the shared data
//! when present (so the summarizer does the work it does in production), else deterministic
//! synthetic text of similar length (so a fresh checkout still runs the same benchmark).

use std::path::Path;

use spotifai_proto::insight::{
    FeedbackBatch, FeedbackEntry, SummarizeFeedbackRequest, SummaryOptions,
    summarize_feedback_request::Input,
};

use crate::{Review, parse_csv};

/// The review sample inside the shared data directory.
const REVIEWS_CSV: &str = "reviews/spotify_googleplay_reviews_sample1000.csv";

/// Why the review sample could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The header lacks a needed column.
    #[error("{path} has no {column:?} column")]
    Column {
        /// The file.
        path: String,
        /// The missing column.
        column: &'static str,
    },
}

/// Reads the Google Play review sample of `data_dir` (the shared data directory): `(id, text,
/// rating)` of every row with text. Like the e2e tests' `load_reviews`, but returning errors,
/// since benchmark binaries report them instead of panicking.
pub fn load_review_sample(data_dir: &Path) -> Result<Vec<Review>, ReviewError> {
    let path = data_dir.join(REVIEWS_CSV);
    let raw = std::fs::read_to_string(&path).map_err(|source| ReviewError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let rows = parse_csv(&raw);
    let header = rows.first().cloned().unwrap_or_default();
    let column = |column: &'static str| {
        header
            .iter()
            .position(|h| h == column)
            .ok_or_else(|| ReviewError::Column {
                path: path.display().to_string(),
                column,
            })
    };
    let (id, text, rating) = (
        column("review_id")?,
        column("review_text")?,
        column("review_rating")?,
    );
    Ok(rows
        .iter()
        .skip(1)
        .filter(|row| row.len() == header.len() && !row[text].trim().is_empty())
        .map(|row| {
            (
                row[id].clone(),
                row[text].clone(),
                row[rating].parse().unwrap_or(0),
            )
        })
        .collect())
}

/// What to summarize and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestSpec {
    /// Entries in the request.
    pub entries: usize,
    /// `options.chunk_size` (unset: the server's default, 5).
    pub chunk_size: Option<u32>,
    /// `options.max_entries` (unset: `entries`, so none is skipped).
    pub max_entries: Option<u32>,
    /// `options.max_words` (unset: the server's default, 300).
    pub max_words: Option<u32>,
    /// `options.bypass_cache`: on by default, so a benchmark measures the work and not a cache.
    pub bypass_cache: bool,
    /// `options.disable_fallback`: set it when a failing LLM must show as UNAVAILABLE rather
    /// than as a fast answer from the local fallback.
    pub disable_fallback: bool,
}

impl Default for RequestSpec {
    /// The benchmark request: 15 entries in chunks of 5.
    fn default() -> Self {
        Self {
            entries: 15,
            chunk_size: Some(5),
            max_entries: None,
            max_words: None,
            bypass_cache: true,
            disable_fallback: false,
        }
    }
}

/// `count` feedback entries: the reviews in file order (cycled with fresh ids when more are
/// asked for than there are), or synthetic ones when `reviews` is `None` or empty.
pub fn feedback_entries(count: usize, reviews: Option<&[Review]>) -> Vec<FeedbackEntry> {
    match reviews.filter(|r| !r.is_empty()) {
        Some(reviews) => (0..count)
            .map(|i| {
                let (id, text, rating) = &reviews[i % reviews.len()];
                let round = i / reviews.len();
                FeedbackEntry {
                    id: if round == 0 {
                        id.clone()
                    } else {
                        format!("{id}#{round}")
                    },
                    text: text.clone(),
                    rating: *rating,
                    source: "playstore".to_owned(),
                    ..FeedbackEntry::default()
                }
            })
            .collect(),
        None => (0..count)
            .map(|i| FeedbackEntry {
                id: format!("synthetic-{i}"),
                text: synthetic_text(i as u64),
                rating: (splitmix64(i as u64 ^ 0x5eed) % 5 + 1) as u32,
                source: "synthetic".to_owned(),
                ..FeedbackEntry::default()
            })
            .collect(),
    }
}

/// The request `spec` describes, over `reviews` (see [`feedback_entries`]).
pub fn summarize_request(
    spec: &RequestSpec,
    reviews: Option<&[Review]>,
) -> SummarizeFeedbackRequest {
    let entries = feedback_entries(spec.entries, reviews);
    let max_entries = spec
        .max_entries
        .unwrap_or(u32::try_from(spec.entries).unwrap_or(u32::MAX));
    SummarizeFeedbackRequest {
        input: Some(Input::Entries(FeedbackBatch { entries })),
        options: Some(SummaryOptions {
            chunk_size: spec.chunk_size,
            max_entries: Some(max_entries),
            max_words: spec.max_words,
            bypass_cache: spec.bypass_cache,
            disable_fallback: spec.disable_fallback,
        }),
    }
}

/// Words of the synthetic reviews: the vocabulary of app-store feedback, so themes, sentiment
/// and sentence extraction find the same kind of material as in the real sample.
const WORDS: &[&str] = &[
    "app",
    "music",
    "songs",
    "playlist",
    "ads",
    "premium",
    "shuffle",
    "offline",
    "download",
    "crash",
    "crashes",
    "update",
    "love",
    "hate",
    "great",
    "bad",
    "slow",
    "fast",
    "lyrics",
    "podcast",
    "battery",
    "login",
    "account",
    "price",
    "family",
    "student",
    "skip",
    "skips",
    "quality",
    "sound",
    "search",
    "recommendations",
    "discover",
    "weekly",
    "radio",
    "artist",
    "album",
    "library",
    "bug",
    "fix",
    "please",
    "annoying",
    "best",
    "worst",
    "free",
    "version",
    "phone",
    "car",
    "bluetooth",
    "widget",
    "queue",
    "repeat",
    "really",
    "never",
    "always",
    "again",
    "not",
    "very",
    "good",
    "awesome",
    "terrible",
    "works",
    "stopped",
    "working",
];

/// Deterministic pseudo-random review text for entry `seed`: sentences of 4..=15 words, about
/// 65 bytes on average (the mean of the Google Play sample, whose median is 30).
pub fn synthetic_text(seed: u64) -> String {
    let mut state = splitmix64(seed.wrapping_add(1));
    let mut next = || {
        state = splitmix64(state);
        state
    };
    let target = 10 + (next() % 110) as usize;
    let mut text = String::with_capacity(target + 16);
    while text.len() < target {
        let words = 4 + (next() % 12) as usize;
        for w in 0..words {
            let word = WORDS[(next() % WORDS.len() as u64) as usize];
            if w == 0 {
                if !text.is_empty() {
                    text.push(' ');
                }
                let mut chars = word.chars();
                if let Some(first) = chars.next() {
                    text.extend(first.to_uppercase());
                    text.push_str(chars.as_str());
                }
            } else {
                text.push(' ');
                text.push_str(word);
            }
        }
        text.push(if next() % 4 == 0 { '!' } else { '.' });
    }
    text
}

/// SplitMix64: a tiny, well-mixed generator, so synthetic data needs no RNG dependency and is
/// the same on every machine.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
