//! Compact music analysis (AnalyzeMusic): key data points computed in Rust, a compact prompt
//! built from those points only, a strictly validated JSON answer, and a deterministic analysis
//! that answers when no model is configured or the model fails. Knows no tonic; the adapter is
//! `grpc::music`.
//!
//! Why this shape: the seed app pasted the whole listening history into one prompt and asked
//! for an "ultra-detailed" answer, and its worker ran out of memory. Here the history is folded
//! into [`ListeningStats`] in one pass ([`StatsBuilder`]; memory bounded by distinct artists,
//! genres and tracks), the model sees a ~1 KB summary of those numbers ([`build_prompt`]), and
//! the answer is a small JSON object whose `summary` never exceeds `max_words` (≤ 300).
//!
//! Flow of [`analyze`] with a generator: ask once; if the answer does not parse or does not
//! match [`response_schema`], ask once more with the rejected answer and the reason (the repair
//! call); if that fails too, or the generator errors, answer with the deterministic analysis
//! marked `degraded`, unless the caller set `disable_fallback`.

use tokio::time::Instant;

use crate::{
    domain::{Usage, UsageMeter},
    llm::{FinishReason, GenerateRequest, Generation, Generator, LlmError},
    store::{FeedbackStore, PlayCursor},
};

pub mod play;
pub mod profile;
pub mod prompt;
pub mod stats;

pub use play::{AudioFeatures, Play, check_play_count, validate_plays};
pub use prompt::{Draft, MusicPrompt, build_prompt, parse_answer, response_schema};
pub use stats::{ListeningStats, RankedItem, StatsBuilder};

/// Word limit of `summary` when the caller does not say, and its hard cap (the seed's fix:
/// answers of at most 300 words).
pub const MAX_WORDS: u32 = 300;
/// A sensible server cap on plays per request, for the adapter's `max_plays` (100,000 plays is
/// a heavy listener's several years, and well under the transport's message limit).
pub const DEFAULT_MAX_PLAYS: usize = 100_000;
/// A play of a track of known length shorter than this counts as a skip (see
/// [`Play::is_skip`]): 30 s is where streaming services count a "stream".
pub const SKIP_THRESHOLD_MS: u64 = 30_000;
/// Backend reported when the deterministic analysis answers because no model is configured.
pub const LOCAL_BACKEND: &str = "local";
/// Backend reported when the deterministic analysis answers because the model failed.
pub const FALLBACK_BACKEND: &str = "local (fallback)";
/// Model reported for the deterministic analysis; bump the suffix when its output for the same
/// input changes, so cached answers keyed by model are not mixed up.
pub const LOCAL_MODEL: &str = "music-rules-v1";

/// Why an analysis could not be produced. The gRPC adapter maps each variant to one status of
/// the error contract.
#[derive(Debug, thiserror::Error)]
pub enum MusicError {
    /// The request is malformed (→ INVALID_ARGUMENT); `field` is the path in the request, e.g.
    /// `history.plays[3].artist`.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// Path of the offending field in the request.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The caller named a `user_id` with no stored plays (→ NOT_FOUND): import them with
    /// ImportListening first, or send them inline in `history`.
    #[error(
        "user_id: no stored plays for user {user_id:?}; import them with ImportListening or \
         send them inline in `history`"
    )]
    NoStoredPlays {
        /// The user asked for.
        user_id: String,
    },
    /// The stored plays could not be read (→ the store's status, UNAVAILABLE when it is down).
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The memory budget cannot hold the reading of the stored plays now, or ever
    /// (→ RESOURCE_EXHAUSTED, as every admission refusal).
    #[error(transparent)]
    Refused(#[from] crate::admission::AdmissionError),
    /// The LLM failed (after the repair attempt, if any) and the caller disabled the fallback
    /// (→ UNAVAILABLE, naming [`LlmError::backend`]).
    #[error("the LLM backend failed and fallback is disabled: {source}")]
    BackendUnavailable {
        /// The last failure; an answer that stayed invalid after the repair call is reported
        /// as [`LlmError::Malformed`].
        #[source]
        source: LlmError,
    },
    /// The caller's deadline passed before the model answered and the caller disabled the
    /// fallback (→ DEADLINE_EXCEEDED, as for every RPC whose deadline passed: the backend did
    /// not fail, it ran out of the caller's time). A model cut off by `--llm-timeout` with the
    /// caller's time left is [`MusicError::BackendUnavailable`].
    #[error("the deadline passed before the LLM backend answered: {source}")]
    DeadlineExceeded {
        /// The backend's timeout.
        #[source]
        source: LlmError,
    },
}

impl MusicError {
    /// An [`MusicError::InvalidArgument`] for `field`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The same error with its field path under `prefix` (`"artist"` within
    /// `"history.plays[3]"` is `"history.plays[3].artist"`), so rules can be written once per
    /// message and reported with the caller's full path.
    pub fn within(self, prefix: &str) -> Self {
        match self {
            Self::InvalidArgument { field, reason } => Self::InvalidArgument {
                field: format!("{prefix}.{field}"),
                reason,
            },
            other => other,
        }
    }
}

/// Validated options of one analysis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MusicOptions {
    /// Word limit of `summary`, 1..=300.
    pub max_words: usize,
    /// Answer with [`MusicError::BackendUnavailable`] instead of the deterministic analysis
    /// when the LLM fails.
    pub disable_fallback: bool,
}

impl Default for MusicOptions {
    fn default() -> Self {
        Self {
            max_words: MAX_WORDS as usize,
            disable_fallback: false,
        }
    }
}

impl MusicOptions {
    /// Applies the default (`None` → 300) and checks `max_words` is in 1..=300; the error
    /// names the field `max_words`.
    pub fn resolve(max_words: Option<u32>, disable_fallback: bool) -> Result<Self, MusicError> {
        let max_words = max_words.unwrap_or(MAX_WORDS);
        if !(1..=MAX_WORDS).contains(&max_words) {
            return Err(MusicError::invalid(
                "max_words",
                format!("must be between 1 and {MAX_WORDS}, got {max_words}"),
            ));
        }
        Ok(Self {
            max_words: max_words as usize,
            disable_fallback,
        })
    }
}

/// The compact music analysis.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MusicAnalysis {
    /// Prose, at most `max_words` words.
    pub summary: String,
    /// Short mood label.
    pub mood: String,
    /// Characteristic genres.
    pub top_genres: Vec<String>,
    /// Most played artists.
    pub top_artists: Vec<String>,
    /// Short personality label.
    pub listening_personality: String,
    /// Listening suggestions (at least one).
    pub recommendations: Vec<String>,
    /// The data points the analysis was built from.
    pub stats: ListeningStats,
    /// The model failed and the deterministic analysis answered instead.
    pub degraded: bool,
    /// Who answered: the generator's name, [`LOCAL_BACKEND`] or [`FALLBACK_BACKEND`].
    pub backend: String,
    /// The model of that backend.
    pub model: String,
    /// What the LLM calls cost; failed calls count as calls (their bytes are unknown), and the
    /// deterministic analysis costs nothing.
    pub usage: Usage,
}

impl MusicAnalysis {
    /// An analysis from a draft, with provenance.
    fn new(draft: Draft, stats: ListeningStats, provenance: Provenance) -> Self {
        Self {
            summary: draft.summary,
            mood: draft.mood,
            top_genres: draft.top_genres,
            top_artists: draft.top_artists,
            listening_personality: draft.listening_personality,
            recommendations: draft.recommendations,
            stats,
            degraded: provenance.degraded,
            backend: provenance.backend,
            model: provenance.model,
            usage: provenance.usage,
        }
    }
}

/// Who produced an analysis and at what cost.
struct Provenance {
    degraded: bool,
    backend: String,
    model: String,
    usage: Usage,
}

impl Provenance {
    fn local(degraded: bool, usage: Usage) -> Self {
        Self {
            degraded,
            backend: if degraded {
                FALLBACK_BACKEND
            } else {
                LOCAL_BACKEND
            }
            .to_owned(),
            model: LOCAL_MODEL.to_owned(),
            usage,
        }
    }
}

/// Validates `plays` (at most `max_plays`), computes their statistics and analyzes them: the
/// convenience for callers that hold the plays in a slice. See [`analyze`].
pub async fn analyze_plays(
    plays: &[Play],
    max_plays: usize,
    options: MusicOptions,
    generator: Option<&dyn Generator>,
    deadline: impl Into<Deadlines>,
) -> Result<MusicAnalysis, MusicError> {
    validate_plays(plays, max_plays)?;
    analyze(
        ListeningStats::from_plays(plays),
        options,
        generator,
        deadline,
    )
    .await
}

/// Plays read per page when analyzing stored plays: about 0.5 MB of rows at a time, folded
/// into the statistics before the next page is read, so memory does not grow with the
/// listener's history.
pub const STORED_PAGE_PLAYS: u32 = 1000;

/// Memory an analysis of up to `max_plays` stored plays of a `user_id_len`-byte user id needs
/// beyond what its (tiny) request is charged at the door: one page of plays at their largest,
/// as database rows and as decoded plays at once (each row repeats the user id), and the
/// statistics' counts at their cap ([`StatsBuilder::max_heap_bytes`]). The gRPC adapter
/// reserves it before reading.
pub fn stored_stats_bytes(max_plays: usize, user_id_len: usize) -> u64 {
    /// A stored play at its largest, but for its user id: track id, artist and track name, 32
    /// genres (as stored JSON, then as strings), and the structs around them.
    const PLAY_BYTES: u64 = (play::MAX_TRACK_ID_BYTES
        + 2 * play::MAX_NAME_BYTES
        + play::MAX_GENRES_PER_PLAY * (2 * play::MAX_GENRE_BYTES + 32)
        + 512) as u64;
    let row = PLAY_BYTES + user_id_len as u64;
    u64::from(STORED_PAGE_PLAYS) * 2 * row + StatsBuilder::max_heap_bytes(max_plays)
}

/// The statistics of `user_id`'s stored plays (the first `max_plays` in time order), read
/// page by page and folded one play at a time. No stored play is [`MusicError::NoStoredPlays`].
pub async fn stored_stats(
    store: &dyn FeedbackStore,
    user_id: &str,
    max_plays: usize,
) -> Result<ListeningStats, MusicError> {
    let mut builder = StatsBuilder::new();
    let mut cursor: Option<PlayCursor> = None;
    let mut read = 0;
    loop {
        let want = max_plays
            .saturating_sub(read)
            .min(STORED_PAGE_PLAYS as usize);
        if want == 0 {
            break;
        }
        let page = store
            .list_plays(user_id, cursor.as_ref(), want as u32)
            .await?;
        for record in &page {
            builder.add(&record.play);
        }
        read += page.len();
        if page.len() < want {
            break;
        }
        cursor = page.last().map(PlayCursor::after);
        // A page is about a millisecond of folding: let other tasks run between pages.
        tokio::task::yield_now().await;
    }
    if read == 0 {
        return Err(MusicError::NoStoredPlays {
            user_id: user_id.to_owned(),
        });
    }
    let stats = builder.finish();
    if stats.untracked_plays > 0 {
        tracing::warn!(
            plays = read,
            untracked = stats.untracked_plays,
            "stored plays name more than {} artists or genres; later names are not ranked",
            stats::MAX_TRACKED_NAMES
        );
    }
    Ok(stats)
}

/// When an analysis must be done: `llm` bounds the model calls (the caller's deadline capped
/// by `--llm-timeout`), `caller` is the caller's own deadline. A model that runs out of the
/// first with the caller's time left is a slow backend (UNAVAILABLE), out of the caller's time
/// it is DEADLINE_EXCEEDED. One instant serves as both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadlines {
    /// The caller's deadline.
    pub caller: Instant,
    /// The deadline of the model calls, never later than `caller`.
    pub llm: Instant,
}

impl From<Instant> for Deadlines {
    fn from(at: Instant) -> Self {
        Self {
            caller: at,
            llm: at,
        }
    }
}

/// Analyzes listening statistics.
///
/// - `generator: None` (the `local` backend): the deterministic analysis, `degraded = false`,
///   backend [`LOCAL_BACKEND`], no LLM call.
/// - With a generator: one call with the compact prompt and [`response_schema`]; an answer that
///   fails [`parse_answer`] gets one repair call; a generator error, or an answer still invalid
///   after the repair, gives the deterministic analysis with `degraded = true` and backend
///   [`FALLBACK_BACKEND`]; or, when `options.disable_fallback` is set,
///   [`MusicError::DeadlineExceeded`] if the model ran out of the caller's time and
///   [`MusicError::BackendUnavailable`] otherwise.
///
/// `deadline.llm` bounds every LLM call, the repair included; a call still running then is
/// abandoned as a timeout even if the generator ignores its deadline. No repair is attempted
/// once it has passed. The fallback itself takes microseconds, so it is always in time.
pub async fn analyze(
    stats: ListeningStats,
    options: MusicOptions,
    generator: Option<&dyn Generator>,
    deadline: impl Into<Deadlines>,
) -> Result<MusicAnalysis, MusicError> {
    let Deadlines {
        caller,
        llm: deadline,
    } = deadline.into();
    let Some(generator) = generator else {
        let draft = profile::local_draft(&stats, options.max_words);
        return Ok(MusicAnalysis::new(
            draft,
            stats,
            Provenance::local(false, Usage::default()),
        ));
    };
    // Every call's cost, counted as it is spent (a failed or abandoned call too).
    let usage = UsageMeter::default();
    let failure = match ask_model(generator, &stats, options.max_words, deadline, &usage).await {
        Ok(draft) => {
            let provenance = Provenance {
                degraded: false,
                backend: generator.name().to_owned(),
                model: generator.model().to_owned(),
                usage: usage.total(),
            };
            return Ok(MusicAnalysis::new(draft, stats, provenance));
        }
        Err(failure) => failure,
    };
    if options.disable_fallback {
        let out_of_time = matches!(failure, LlmError::Timeout { .. }) && Instant::now() >= caller;
        return Err(if out_of_time {
            MusicError::DeadlineExceeded { source: failure }
        } else {
            MusicError::BackendUnavailable { source: failure }
        });
    }
    tracing::warn!(
        backend = generator.name(),
        error = %failure,
        "music analysis falls back to the deterministic profile"
    );
    let draft = profile::local_draft(&stats, options.max_words);
    Ok(MusicAnalysis::new(
        draft,
        stats,
        Provenance::local(true, usage.total()),
    ))
}

/// The model's validated answer, after at most one repair call; `usage` counts every call.
async fn ask_model(
    generator: &dyn Generator,
    stats: &ListeningStats,
    max_words: usize,
    deadline: Instant,
    usage: &UsageMeter,
) -> Result<Draft, LlmError> {
    let prompt = build_prompt(stats, max_words);
    let schema = response_schema();
    let first = call(generator, &prompt, &schema, deadline, usage).await?;
    let reason = match parse_answer(&first.text, max_words) {
        Ok(draft) => return Ok(grounded(draft, stats)),
        Err(reason) => with_finish(&first.finish, reason),
    };
    let malformed = |message: String| LlmError::Malformed {
        backend: generator.name().to_owned(),
        message,
    };
    if Instant::now() >= deadline {
        return Err(malformed(format!(
            "{reason}; no time was left for a repair call"
        )));
    }
    tracing::debug!(backend = generator.name(), %reason, "invalid music answer, asking for a repair");
    let mut repair = prompt::repair_prompt(&prompt, &first.text, &reason);
    if first.finish == FinishReason::MaxTokens {
        // Cut off at the cap: the same cap would likely cut the corrected answer too (the
        // summary's word limit is enforced on what comes back, whatever the cap).
        repair.max_output_tokens = repair
            .max_output_tokens
            .saturating_add(repair.max_output_tokens / 2);
    }
    let second = call(generator, &repair, &schema, deadline, usage).await?;
    parse_answer(&second.text, max_words)
        .map(|draft| grounded(draft, stats))
        .map_err(|reason| {
            let reason = with_finish(&second.finish, reason);
            malformed(format!("still invalid after one repair call: {reason}"))
        })
}

/// The model's draft with the computed `top_artists`: the field says who was played most, a
/// fact the data decides, so a name the model made up, misspelt, reordered, left out or could
/// only echo cut (the prompt cuts long names) does not reach the answer. The model's list was
/// still checked against the schema like the rest of its answer.
fn grounded(mut draft: Draft, stats: &ListeningStats) -> Draft {
    draft.top_artists = profile::shown_items(&stats.top_artists)
        .into_iter()
        .map(|artist| artist.name)
        .collect();
    draft
}

/// The rejection reason, saying when the answer was cut off or blocked: the repair prompt then
/// tells the model why, and the log tells the operator that the token cap or a filter was hit.
fn with_finish(finish: &FinishReason, reason: String) -> String {
    match finish {
        FinishReason::MaxTokens => format!("{reason} (the answer was cut off at the token cap)"),
        FinishReason::Safety => format!("{reason} (the answer was blocked by a safety filter)"),
        FinishReason::Stop | FinishReason::Other(_) => reason,
    }
}

/// One generator call bounded by `deadline`; the generator adds its cost to `usage` as it
/// spends it.
async fn call(
    generator: &dyn Generator,
    prompt: &MusicPrompt,
    schema: &serde_json::Value,
    deadline: Instant,
    usage: &UsageMeter,
) -> Result<Generation, LlmError> {
    let request = GenerateRequest {
        system: &prompt.system,
        prompt: &prompt.user,
        max_output_tokens: prompt.max_output_tokens,
        response_schema: Some(schema),
        deadline,
        usage,
    };
    // Generators promise to honour the deadline; the timer makes that a guarantee here.
    match tokio::time::timeout_at(deadline, generator.generate(request)).await {
        Ok(result) => result,
        Err(_) => Err(LlmError::Timeout {
            backend: generator.name().to_owned(),
            message: "the deadline passed before the answer was complete".to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::VecDeque,
        sync::Mutex,
        time::{Duration, UNIX_EPOCH},
    };

    use futures::future::BoxFuture;
    use serde_json::json;

    use super::*;
    use crate::text::{truncate_words, word_count};

    /// One scripted reply of [`Scripted`].
    enum Reply {
        Text(String),
        /// Text cut off at the output token cap.
        Cut(String),
        Fail(LlmError),
        Hang,
    }

    /// A generator that answers from a script and records the prompts it was given.
    struct Scripted {
        replies: Mutex<VecDeque<Reply>>,
        prompts: Mutex<Vec<String>>,
        token_caps: Mutex<Vec<u32>>,
    }

    impl Scripted {
        fn new(replies: Vec<Reply>) -> Self {
            Self {
                replies: Mutex::new(replies.into()),
                prompts: Mutex::new(Vec::new()),
                token_caps: Mutex::new(Vec::new()),
            }
        }

        fn prompts(&self) -> Vec<String> {
            self.prompts.lock().map(|p| p.clone()).unwrap_or_default()
        }

        /// `max_output_tokens` of each call, in order.
        fn token_caps(&self) -> Vec<u32> {
            self.token_caps
                .lock()
                .map(|c| c.clone())
                .unwrap_or_default()
        }
    }

    impl Generator for Scripted {
        fn name(&self) -> &str {
            "fake"
        }

        fn model(&self) -> &str {
            "fake-1"
        }

        fn generate<'a>(
            &'a self,
            request: GenerateRequest<'a>,
        ) -> BoxFuture<'a, Result<Generation, LlmError>> {
            let reply = self.replies.lock().ok().and_then(|mut r| r.pop_front());
            if let Ok(mut prompts) = self.prompts.lock() {
                prompts.push(request.prompt.to_owned());
            }
            if let Ok(mut caps) = self.token_caps.lock() {
                caps.push(request.max_output_tokens);
            }
            // Like a real generator: the call and its prompt count when it is sent.
            request.usage.add(Usage {
                llm_calls: 1,
                prompt_bytes: (request.system.len() + request.prompt.len()) as u64,
                ..Usage::default()
            });
            Box::pin(async move {
                assert!(request.response_schema.is_some(), "a schema is always sent");
                let (text, finish) = match reply {
                    Some(Reply::Text(text)) => (text, FinishReason::Stop),
                    Some(Reply::Cut(text)) => (text, FinishReason::MaxTokens),
                    Some(Reply::Fail(error)) => return Err(error),
                    Some(Reply::Hang) => std::future::pending().await,
                    None => panic!("the script ran out: an unexpected extra call"),
                };
                request.usage.add(Usage {
                    response_bytes: text.len() as u64,
                    input_tokens: 10,
                    output_tokens: 5,
                    ..Usage::default()
                });
                Ok(Generation { text, finish })
            })
        }
    }

    fn server_error() -> LlmError {
        LlmError::Server {
            backend: "fake".into(),
            status: 503,
            retry_after: None,
            message: "overloaded".into(),
        }
    }

    fn good_answer() -> String {
        json!({
            "summary": "A pop-leaning night owl.",
            "mood": "upbeat",
            "top_genres": ["pop", "hip hop"],
            "top_artists": ["Artist 0"],
            "listening_personality": "night owl explorer",
            "recommendations": ["Try indie pop."]
        })
        .to_string()
    }

    fn deadline() -> Instant {
        Instant::now() + Duration::from_secs(30)
    }

    /// Artists, genres and feature ranges for the synthetic history.
    const GENRES: [&str; 6] = ["pop", "hip hop", "rock", "r&b", "dance/electronic", "latin"];

    /// A deterministic synthetic history of `n` plays (a small LCG, no randomness): 120
    /// distinct tracks by 40 artists, realistic names, ids, times and features.
    fn synthetic(n: usize) -> Vec<Play> {
        let mut state: u64 = 0x5eed;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            state >> 33
        };
        (0..n)
            .map(|i| {
                let track = next() % 120;
                let artist = track % 40;
                let unit = |x: u64| (x % 1000) as f64 / 1000.0;
                let duration = 150_000 + (track * 997) % 120_000;
                let skipped = next() % 10 == 0;
                Play {
                    track_id: format!("{:022}", track * 7_919 + 1_000_003),
                    track_name: format!("Track number {track} (Remastered)"),
                    artist: format!("Synthetic Artist {artist}"),
                    genres: vec![
                        GENRES[(artist % 6) as usize].to_owned(),
                        GENRES[((artist + 1) % 6) as usize].to_owned(),
                    ],
                    played_at: Some(
                        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + i as u64 * 2_347),
                    ),
                    ms_played: if skipped { 12_000 } else { duration },
                    features: Some(AudioFeatures {
                        danceability: unit(track * 37),
                        energy: unit(track * 53),
                        valence: unit(track * 71),
                        acousticness: unit(track * 89),
                        instrumentalness: unit(track * 3) / 10.0,
                        speechiness: unit(track * 11) / 4.0,
                        liveness: unit(track * 13) / 2.0,
                        tempo: 70.0 + (track % 110) as f64,
                        loudness: -12.0 + unit(track * 17) * 10.0,
                    }),
                    skipped,
                    duration_ms: Some(duration),
                }
            })
            .collect()
    }

    #[tokio::test]
    async fn without_a_generator_the_local_profile_answers() {
        let plays = synthetic(50);
        let analysis = analyze_plays(&plays, 100, MusicOptions::default(), None, deadline()).await;
        let analysis = analysis.unwrap_or_default();
        assert_eq!(analysis.backend, "local");
        assert_eq!(analysis.model, LOCAL_MODEL);
        assert!(!analysis.degraded);
        assert_eq!(analysis.usage, Usage::default());
        assert_eq!(analysis.stats.plays, 50);
        assert!(!analysis.summary.is_empty() && !analysis.recommendations.is_empty());
        assert_eq!(analysis.top_artists.len(), 5);
    }

    #[tokio::test]
    async fn a_valid_answer_is_used_as_is() {
        let fake = Scripted::new(vec![Reply::Text(good_answer())]);
        let options = MusicOptions::resolve(Some(3), false).unwrap_or_default();
        let analysis = analyze_plays(&synthetic(20), 100, options, Some(&fake), deadline())
            .await
            .unwrap_or_default();
        assert_eq!(analysis.backend, "fake");
        assert_eq!(analysis.model, "fake-1");
        assert!(!analysis.degraded);
        assert_eq!(
            analysis.summary, "A pop-leaning night…",
            "max_words = 3 is enforced"
        );
        assert_eq!(analysis.mood, "upbeat");
        assert_eq!(analysis.usage.llm_calls, 1);
        assert_eq!(analysis.usage.response_bytes, good_answer().len() as u64);
        let prompts = fake.prompts();
        assert_eq!(prompts.len(), 1);
        assert!(
            !prompts[0].contains("Track number"),
            "no track names in the prompt"
        );
    }

    #[test]
    fn the_answers_top_artists_are_the_computed_ones_as_shown() {
        let artist = |name: &str, plays| RankedItem {
            name: name.into(),
            plays,
            ms_played: 0,
        };
        let long = "Wolfgang Amadeus Mozart; Berliner Philharmoniker, Herbert von Karajan";
        let stats = ListeningStats {
            top_artists: vec![
                artist(long, 15),
                artist("AC/DC", 9),
                artist("Sigur\u{0}Rós\n", 7),
                artist("\u{1}", 6),
                artist("\u{200B}", 5),
                artist("AC/DC\u{0}", 4),
                artist("!!!", 3),
            ],
            ..ListeningStats::default()
        };
        let draft = |artists: &[&str]| Draft {
            top_artists: artists.iter().map(|a| (*a).to_owned()).collect(),
            ..Draft::default()
        };
        // Control characters shown as spaces; names with nothing visible left out; a name
        // that shows like a higher-ranked one not listed twice; most played first.
        let expected = [long, "AC/DC", "Sigur Rós", "!!!"];
        // Whatever the model listed: made up, reordered, a subset, cut as the prompt cut it,
        // or a symbol that would match a symbol-only name.
        for named in [
            &["Taylor Swift", "AC/DC"][..],
            &["Sigur Rós", "AC/DC"],
            &["Wolfgang Amadeus Mozart; Berliner Philharmoniker, Herbert von Ka…"],
            &["-"],
            &[],
        ] {
            assert_eq!(
                grounded(draft(named), &stats).top_artists,
                expected,
                "{named:?}"
            );
        }
        // The deterministic analysis shows names the same way, in its lists and its prose.
        let local = profile::local_draft(&stats, 300);
        assert_eq!(local.top_artists, expected);
        assert!(
            !local.summary.contains(['\u{0}', '\u{1}', '\u{200B}']),
            "{}",
            local.summary
        );
        assert!(
            local
                .summary
                .contains(&format!("most played artist is {long}")),
            "{}",
            local.summary
        );
    }

    #[tokio::test]
    async fn one_repair_call_fixes_an_invalid_answer() {
        let fake = Scripted::new(vec![
            Reply::Cut("{\"summary\": \"half an answer\"".into()),
            Reply::Text(format!("```json\n{}\n```", good_answer())),
        ]);
        let analysis = analyze_plays(
            &synthetic(20),
            100,
            MusicOptions::default(),
            Some(&fake),
            deadline(),
        )
        .await
        .unwrap_or_default();
        assert!(!analysis.degraded);
        assert_eq!(analysis.backend, "fake");
        assert_eq!(analysis.usage.llm_calls, 2, "the repair call is counted");
        let prompts = fake.prompts();
        assert_eq!(prompts.len(), 2);
        assert!(
            prompts[1].starts_with(&prompts[0]),
            "the repair repeats the data"
        );
        assert!(prompts[1].contains("not valid JSON"), "{}", prompts[1]);
        assert!(
            prompts[1].contains("cut off at the token cap"),
            "{}",
            prompts[1]
        );
        assert!(prompts[1].contains("{\\\"summary\\\": \\\"half an answer\\\""));
        // The first answer hit the token cap: the repair gets half as many again.
        let caps = fake.token_caps();
        assert_eq!(caps[1], caps[0] + caps[0] / 2, "{caps:?}");
    }

    #[tokio::test]
    async fn an_answer_still_invalid_after_the_repair_falls_back() {
        let missing_mood = json!({
            "summary": "x", "top_genres": [], "top_artists": [],
            "listening_personality": "y", "recommendations": ["z"]
        })
        .to_string();
        let fake = Scripted::new(vec![
            Reply::Text(missing_mood.clone()),
            Reply::Text("[]".into()),
        ]);
        let stats = ListeningStats::from_plays(&synthetic(30));
        let analysis = analyze(
            stats.clone(),
            MusicOptions::default(),
            Some(&fake),
            deadline(),
        )
        .await
        .unwrap_or_default();
        assert!(analysis.degraded);
        assert_eq!(analysis.backend, "local (fallback)");
        assert_eq!(analysis.model, LOCAL_MODEL);
        assert_eq!(analysis.usage.llm_calls, 2);
        // The fallback is exactly the local analysis of the same data points.
        let local = analyze(stats, MusicOptions::default(), None, deadline())
            .await
            .unwrap_or_default();
        assert_eq!(
            (&analysis.summary, &analysis.mood, &analysis.recommendations),
            (&local.summary, &local.mood, &local.recommendations)
        );
        assert!(fake.prompts()[1].contains("misses the required key `mood`"));

        // With the fallback disabled, the same script is an error naming the backend.
        let fake = Scripted::new(vec![Reply::Text(missing_mood), Reply::Text("[]".into())]);
        let options = MusicOptions::resolve(None, true).unwrap_or_default();
        let error = analyze(
            ListeningStats::from_plays(&synthetic(30)),
            options,
            Some(&fake),
            deadline(),
        )
        .await;
        match error {
            Err(MusicError::BackendUnavailable { source }) => {
                assert_eq!(source.backend(), "fake");
                assert!(
                    source
                        .to_string()
                        .contains("still invalid after one repair call")
                );
            }
            other => panic!("expected BackendUnavailable, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_generator_error_falls_back_without_a_repair_unless_disabled() {
        let fake = Scripted::new(vec![Reply::Fail(server_error())]);
        let analysis = analyze_plays(
            &synthetic(10),
            100,
            MusicOptions::default(),
            Some(&fake),
            deadline(),
        )
        .await
        .unwrap_or_default();
        assert!(analysis.degraded);
        assert_eq!(analysis.backend, "local (fallback)");
        assert_eq!(analysis.usage.llm_calls, 1);
        assert_eq!(fake.prompts().len(), 1, "errors are not 'repaired'");

        let fake = Scripted::new(vec![Reply::Fail(server_error())]);
        let options = MusicOptions {
            disable_fallback: true,
            ..MusicOptions::default()
        };
        let result = analyze_plays(&synthetic(10), 100, options, Some(&fake), deadline()).await;
        match result {
            Err(error @ MusicError::BackendUnavailable { .. }) => {
                assert!(
                    error.to_string().contains("fake: server error 503"),
                    "{error}"
                );
            }
            other => panic!("expected BackendUnavailable, got {other:?}"),
        }

        // A repair call that errors is the same as a first call that errors.
        let fake = Scripted::new(vec![
            Reply::Text("nope".into()),
            Reply::Fail(server_error()),
        ]);
        let analysis = analyze_plays(
            &synthetic(10),
            100,
            MusicOptions::default(),
            Some(&fake),
            deadline(),
        )
        .await
        .unwrap_or_default();
        assert!(analysis.degraded);
        assert_eq!(analysis.usage.llm_calls, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_generator_that_ignores_the_deadline_is_cut_off() {
        let fake = Scripted::new(vec![Reply::Hang]);
        let started = Instant::now();
        let analysis = analyze_plays(
            &synthetic(10),
            100,
            MusicOptions::default(),
            Some(&fake),
            started + Duration::from_secs(5),
        )
        .await
        .unwrap_or_default();
        assert!(analysis.degraded);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert_eq!(fake.prompts().len(), 1, "no repair after the deadline");

        let fake = Scripted::new(vec![Reply::Hang]);
        let options = MusicOptions {
            disable_fallback: true,
            ..MusicOptions::default()
        };
        let result = analyze_plays(
            &synthetic(10),
            100,
            options,
            Some(&fake),
            Instant::now() + Duration::from_secs(1),
        )
        .await;
        // The caller's deadline passed: DEADLINE_EXCEEDED, not a failing backend.
        assert!(
            matches!(
                &result,
                Err(MusicError::DeadlineExceeded {
                    source: LlmError::Timeout { .. }
                })
            ),
            "{result:?}"
        );
        // Cut off by `--llm-timeout` with the caller's time left: a slow backend.
        let fake = Scripted::new(vec![Reply::Hang]);
        let now = Instant::now();
        let deadlines = Deadlines {
            caller: now + Duration::from_secs(10),
            llm: now + Duration::from_secs(1),
        };
        let result = analyze_plays(&synthetic(10), 100, options, Some(&fake), deadlines).await;
        assert!(
            matches!(
                &result,
                Err(MusicError::BackendUnavailable {
                    source: LlmError::Timeout { .. }
                })
            ),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn invalid_input_and_options_name_their_field() {
        let field = |r: Result<MusicAnalysis, MusicError>| match r {
            Err(MusicError::InvalidArgument { field, .. }) => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        };
        let mut plays = synthetic(5);
        plays[3].artist = " ".into();
        let r = analyze_plays(&plays, 100, MusicOptions::default(), None, deadline()).await;
        assert_eq!(field(r), "history.plays[3].artist");
        let r = analyze_plays(&[], 100, MusicOptions::default(), None, deadline()).await;
        assert_eq!(field(r), "history.plays");
        let r = analyze_plays(&synthetic(5), 4, MusicOptions::default(), None, deadline()).await;
        assert_eq!(field(r), "history.plays");
        for bad in [0, 301, u32::MAX] {
            match MusicOptions::resolve(Some(bad), false) {
                Err(MusicError::InvalidArgument { field, reason }) => {
                    assert_eq!(field, "max_words");
                    assert!(reason.contains(&bad.to_string()));
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
        assert_eq!(
            MusicOptions::resolve(None, false).map(|o| o.max_words).ok(),
            Some(300)
        );
        assert_eq!(
            MusicOptions::resolve(Some(1), false)
                .map(|o| o.max_words)
                .ok(),
            Some(1)
        );
    }

    #[tokio::test]
    async fn the_local_analysis_is_deterministic_and_within_max_words() {
        /// The local analysis, which must not fail (a default value would compare equal too).
        async fn local(plays: &[Play], options: MusicOptions) -> MusicAnalysis {
            match analyze_plays(plays, 1_000, options, None, deadline()).await {
                Ok(analysis) => analysis,
                Err(error) => panic!("the local analysis failed: {error}"),
            }
        }
        let plays = synthetic(500);
        let mut reversed = plays.clone();
        reversed.reverse();
        let first = local(&plays, MusicOptions::default()).await;
        assert!(word_count(&first.summary) > 20, "{}", first.summary);
        assert!(!first.degraded);
        let again = local(&reversed, MusicOptions::default()).await;
        assert_eq!(format!("{first:?}"), format!("{again:?}"));
        for max_words in [1, 7, 40, 300] {
            let options = MusicOptions::resolve(Some(max_words), false).unwrap_or_default();
            assert_eq!(options.max_words, max_words as usize);
            let a = local(&plays, options).await;
            assert!(
                word_count(&a.summary) <= max_words as usize,
                "{max_words}: {}",
                a.summary
            );
            assert_eq!(
                a.summary,
                truncate_words(&first.summary, max_words as usize)
            );
        }
    }

    // -----------------------------------------------------------------------------------------
    // The measurement of issue 4: compact prompt vs a prompt that embeds the full history.
    // -----------------------------------------------------------------------------------------

    /// The real tracks file of the shared data set (`../shared` next to the repository).
    const TRACKS_CSV: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/data/tracks/top_hits_2000_2019_songs_normalize.csv"
    );
    /// Plays in the measured history.
    const MEASURED_PLAYS: usize = 500;

    /// The seed app's approach: the same instructions, with every play pasted as a JSON line.
    fn full_history_prompt(plays: &[Play], max_words: usize) -> String {
        let mut user = String::from("BEGIN DATA\n");
        for play in plays {
            let line = json!({
                "track_id": play.track_id,
                "track_name": play.track_name,
                "artist": play.artist,
                "genres": play.genres,
                "played_at": play.played_at.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                "ms_played": play.ms_played,
                "skipped": play.skipped,
                "duration_ms": play.duration_ms,
                "features": play.features.map(|f| json!({
                    "danceability": f.danceability, "energy": f.energy, "valence": f.valence,
                    "acousticness": f.acousticness, "instrumentalness": f.instrumentalness,
                    "speechiness": f.speechiness, "liveness": f.liveness, "tempo": f.tempo,
                    "loudness": f.loudness,
                })),
            });
            user.push_str(&line.to_string());
            user.push('\n');
        }
        user.push_str("END DATA\n");
        format!("{}{user}", prompt::system_instructions(max_words))
    }

    /// Splits one CSV record (RFC 4180 quoting, no embedded newlines in this file).
    fn csv_fields(line: &str) -> Vec<String> {
        let mut fields = Vec::new();
        let mut field = String::new();
        let mut quoted = false;
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            match (c, quoted) {
                ('"', true) if chars.peek() == Some(&'"') => {
                    field.push('"');
                    chars.next();
                }
                ('"', _) => quoted = !quoted,
                (',', false) => fields.push(std::mem::take(&mut field)),
                (c, _) => field.push(c),
            }
        }
        fields.push(field);
        fields
    }

    /// 500 plays of tracks from the real top-hits file, picked and timed deterministically.
    fn plays_from_csv(text: &str) -> Vec<Play> {
        let mut lines = text.lines();
        let header = csv_fields(lines.next().unwrap_or_default());
        let col = |name: &str| header.iter().position(|h| h == name).unwrap_or(usize::MAX);
        let rows: Vec<Vec<String>> = lines
            .map(csv_fields)
            .filter(|r| r.len() == header.len())
            .collect();
        assert!(
            rows.len() >= 1_000,
            "the tracks file has {} rows",
            rows.len()
        );
        let num = |row: &[String], name: &str| -> f64 {
            row.get(col(name))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0)
        };
        (0..MEASURED_PLAYS)
            .map(|i| {
                // A listener with favourites: a quarter of the plays repeat 40 tracks.
                let pick = if i % 4 == 0 {
                    (i * 13) % 40
                } else {
                    (i * 7_919) % rows.len()
                };
                let row = &rows[pick];
                let text = |name: &str| row.get(col(name)).cloned().unwrap_or_default();
                let duration = num(row, "duration_ms") as u64;
                let skipped = i % 9 == 0;
                let genre = text("genre");
                Play {
                    // The file has no ids; a 22-character id like Spotify's, from the row.
                    track_id: format!("{:022}", pick * 104_729 + 7),
                    track_name: text("song"),
                    artist: text("artist"),
                    genres: genre
                        .split(',')
                        .map(str::trim)
                        .filter(|g| !g.is_empty() && *g != "set()")
                        .map(str::to_owned)
                        .collect(),
                    played_at: Some(
                        UNIX_EPOCH + Duration::from_secs(1_704_067_200 + i as u64 * 3_163),
                    ),
                    ms_played: if skipped { duration / 10 } else { duration },
                    features: Some(AudioFeatures {
                        danceability: num(row, "danceability"),
                        energy: num(row, "energy"),
                        valence: num(row, "valence"),
                        acousticness: num(row, "acousticness"),
                        instrumentalness: num(row, "instrumentalness"),
                        speechiness: num(row, "speechiness"),
                        liveness: num(row, "liveness"),
                        tempo: num(row, "tempo"),
                        loudness: num(row, "loudness"),
                    }),
                    skipped,
                    duration_ms: Some(duration),
                }
            })
            .collect()
    }

    /// Measures one history: prints both sizes and the ratio, asserts compact <= 20% of full.
    fn measure(label: &str, plays: &[Play]) {
        assert_eq!(plays.len(), MEASURED_PLAYS);
        assert!(
            validate_plays(plays, MEASURED_PLAYS).is_ok(),
            "{label}: the history is valid"
        );
        let max_words = MAX_WORDS as usize;
        let compact = build_prompt(&ListeningStats::from_plays(plays), max_words);
        let full = full_history_prompt(plays, max_words);
        let ratio = compact.len() as f64 / full.len() as f64;
        println!(
            "{label}: {} plays, compact prompt {} bytes, full-history prompt {} bytes, ratio {:.2}%",
            plays.len(),
            compact.len(),
            full.len(),
            ratio * 100.0
        );
        assert!(
            compact.len() * 5 <= full.len(),
            "{label}: compact {} bytes is more than 20% of full {} bytes",
            compact.len(),
            full.len()
        );
        // What makes it compact: no per-play lines, hence no track ids (names are checked on
        // the synthetic history, whose titles cannot collide with artist or genre names).
        for play in plays {
            assert!(
                !compact.user.contains(&play.track_id),
                "{label}: track id leaked"
            );
        }
        assert!(
            compact.user.lines().count() < 12,
            "{label}: a few lines only"
        );
    }

    #[test]
    fn compact_prompt_ratio() {
        let plays = synthetic(MEASURED_PLAYS);
        measure("synthetic history", &plays);
        let prompt = build_prompt(&ListeningStats::from_plays(&plays), 300);
        assert!(!prompt.user.contains("Track number"), "no track names");
        match std::fs::read_to_string(TRACKS_CSV) {
            Ok(text) => {
                let plays = plays_from_csv(&text);
                measure("top_hits_2000_2019 history", &plays);
                let user = build_prompt(&ListeningStats::from_plays(&plays), 300).user;
                println!("the data part of the compact prompt:\n{user}");
                // The names in the prompt are the real ones, quoted.
                assert!(user.contains("\"Britney Spears\""), "{user}");
            }
            Err(error) => println!(
                "skipping the real-data measurement: cannot read {TRACKS_CSV} ({error}); \
                 /work/shared is absent on this machine"
            ),
        }
    }

    #[test]
    fn csv_fields_follow_rfc_4180_quoting() {
        assert_eq!(
            csv_fields("a,\"b, c\",\"say \"\"hi\"\"\",,d"),
            ["a", "b, c", "say \"hi\"", "", "d"]
        );
    }

    #[test]
    fn errors_keep_their_path_and_source() {
        let e = MusicError::invalid("artist", "must not be empty").within("history.plays[2]");
        assert_eq!(e.to_string(), "history.plays[2].artist: must not be empty");
        assert!(matches!(
            MusicError::NoStoredPlays {
                user_id: "u".into()
            }
            .within("x"),
            MusicError::NoStoredPlays { user_id } if user_id == "u"
        ));
        let e = MusicError::BackendUnavailable {
            source: server_error(),
        };
        assert!(std::error::Error::source(&e).is_some());
    }
}
