//! AnalyzeMusic at the edge: protobuf <-> domain conversions for [`crate::music`], and
//! [`analyze_request`], the one call the RPC method makes.
//!
//! Conversions only reject what the domain types cannot represent (an invalid timestamp); the
//! input rules live in [`crate::music::play`], so they hold for every source of plays.

use spotifai_proto::insight::{self as pb, analyze_music_request::Input};

use super::convert::system_time;
use std::sync::Arc;

use crate::{
    admission::MemoryBudget,
    llm::Generator,
    music::{
        self, AudioFeatures, ListeningStats, MusicAnalysis, MusicError, MusicOptions, Play,
        RankedItem, StatsBuilder,
    },
    pipeline::{NO_NUL, PipelineError},
    store::Store,
};

/// Runs one AnalyzeMusic request: options, input, validation, statistics and analysis (see
/// [`music::analyze`]), and converts the answer.
///
/// - `generator`: `None` for the `local` backend (deterministic analysis, no LLM call).
/// - `deadline`: the caller's gRPC deadline and, within it, the one of the LLM calls (capped
///   by `--llm-timeout`), which bounds the LLM call and the repair call together.
/// - `max_plays`: the server cap on plays per request (e.g. [`music::DEFAULT_MAX_PLAYS`]).
/// - `budget`: the memory budget (none with overload protection off) and what the admission
///   layer holds of it for this call's message. Stored plays are read
///   after admission charged a message of a few bytes, so their reading
///   ([`music::stored_stats_bytes`]) is reserved from it once the options are valid, and given
///   back as soon as the statistics are built, before the (possibly long) LLM call.
///
/// Plays are converted, validated and folded into the statistics one at a time as the request
/// is consumed, so no second copy of the history is ever built.
///
/// Errors, for the one status mapping: [`MusicError::InvalidArgument`] → INVALID_ARGUMENT (with
/// the field path, e.g. `history.plays[3].artist`, `max_words`, `input`);
/// [`MusicError::NoStoredPlays`] → NOT_FOUND (a `user_id` without plays);
/// [`MusicError::Refused`] → RESOURCE_EXHAUSTED (the budget cannot hold the reading);
/// [`MusicError::BackendUnavailable`] → UNAVAILABLE naming `source.backend()` and its cause;
/// [`MusicError::DeadlineExceeded`] → DEADLINE_EXCEEDED.
pub async fn analyze_request(
    request: pb::AnalyzeMusicRequest,
    generator: Option<&dyn Generator>,
    deadline: impl Into<music::Deadlines>,
    max_plays: usize,
    store: &Store,
    budget: Option<(&Arc<MemoryBudget>, u64)>,
) -> Result<pb::MusicAnalysis, MusicError> {
    let options = MusicOptions::try_from(&request)?;
    let reading = match (budget, &request.input) {
        (Some((budget, held)), Some(Input::UserId(user_id))) => {
            // Checked first: bad input hears why, whatever the budget.
            check_user_id(user_id)?;
            let bytes = music::stored_stats_bytes(max_plays, user_id.len());
            Some(budget.try_reserve(bytes).map_err(|r| r.beside(held))?)
        }
        _ => None,
    };
    let stats = stats_from_input(request.input, max_plays, store).await?;
    drop(reading);
    let analysis = music::analyze(stats, options, generator, deadline).await?;
    Ok(analysis.into())
}

/// The rules of a `user_id` input: not blank, and no NUL (PostgreSQL cannot hold one in text:
/// refused here naming the field, rather than by the database without one). No length rule:
/// ImportListening sets none, so a long id may have stored plays; the NOT_FOUND message that
/// echoes it is cut to size.
fn check_user_id(user_id: &str) -> Result<(), MusicError> {
    if user_id.trim().is_empty() {
        return Err(MusicError::invalid("user_id", "must not be empty"));
    }
    if user_id.contains('\0') {
        return Err(MusicError::invalid("user_id", NO_NUL));
    }
    Ok(())
}

/// Plays folded into the statistics between two yields to the runtime: about 0.2 ms of work in
/// a release build, so a 100,000-play history (about 70 ms) never holds a worker thread for
/// long, and a cancelled call stops at the next yield.
const PLAYS_PER_YIELD: usize = 256;

/// Validates the inline history of a request and computes its statistics in one pass, yielding
/// to the runtime every 256 plays (about 0.2 ms of work).
///
/// `user_id` input reads that user's stored plays page by page ([`music::stored_stats`]); an
/// empty `user_id` or a missing input is INVALID_ARGUMENT.
pub async fn stats_from_input(
    input: Option<Input>,
    max_plays: usize,
    store: &Store,
) -> Result<ListeningStats, MusicError> {
    let history = match input {
        Some(Input::History(history)) => history,
        Some(Input::UserId(user_id)) => {
            check_user_id(&user_id)?;
            let store = store.get().await?;
            return music::stored_stats(&*store, &user_id, max_plays).await;
        }
        None => {
            return Err(MusicError::invalid(
                "input",
                "one of `history` or `user_id` is required",
            ));
        }
    };
    // Checked before any conversion: an oversized history is refused without work.
    music::check_play_count(history.plays.len(), max_plays)?;
    let mut builder = StatsBuilder::new();
    for (i, message) in history.plays.into_iter().enumerate() {
        let at = |e: MusicError| e.within(&format!("history.plays[{i}]"));
        let play = Play::try_from(message).map_err(at)?;
        play.validate().map_err(at)?;
        builder.add(&play);
        if (i + 1) % PLAYS_PER_YIELD == 0 {
            tokio::task::yield_now().await;
        }
    }
    Ok(builder.finish())
}

impl TryFrom<&pb::AnalyzeMusicRequest> for MusicOptions {
    type Error = MusicError;

    /// `max_words` unset → 300; outside 1..=300 → INVALID_ARGUMENT naming `max_words`.
    fn try_from(request: &pb::AnalyzeMusicRequest) -> Result<Self, Self::Error> {
        MusicOptions::resolve(request.max_words, request.disable_fallback)
    }
}

impl TryFrom<pb::TrackPlay> for Play {
    type Error = MusicError;

    /// Fails only on an invalid `played_at` (outside the protobuf Timestamp range); the field
    /// path is relative to the play. `duration_ms == 0` means unknown.
    fn try_from(p: pb::TrackPlay) -> Result<Self, Self::Error> {
        let played_at = p
            .played_at
            .map(|ts| {
                // The one home of the Timestamp rules is `convert::system_time`.
                system_time(ts, "played_at").map_err(|e| match e {
                    PipelineError::InvalidArgument { reason, .. } => {
                        MusicError::invalid("played_at", reason)
                    }
                    other => MusicError::invalid("played_at", other.to_string()),
                })
            })
            .transpose()?;
        Ok(Self {
            track_id: p.track_id,
            track_name: p.track_name,
            artist: p.artist,
            genres: p.genres,
            played_at,
            ms_played: p.ms_played,
            features: p.features.map(AudioFeatures::from),
            skipped: p.skipped,
            duration_ms: (p.duration_ms > 0).then_some(p.duration_ms),
        })
    }
}

impl From<pb::AudioFeatures> for AudioFeatures {
    fn from(f: pb::AudioFeatures) -> Self {
        Self {
            danceability: f.danceability,
            energy: f.energy,
            valence: f.valence,
            acousticness: f.acousticness,
            instrumentalness: f.instrumentalness,
            speechiness: f.speechiness,
            liveness: f.liveness,
            tempo: f.tempo,
            loudness: f.loudness,
        }
    }
}

impl From<AudioFeatures> for pb::AudioFeatures {
    fn from(f: AudioFeatures) -> Self {
        Self {
            danceability: f.danceability,
            energy: f.energy,
            valence: f.valence,
            acousticness: f.acousticness,
            instrumentalness: f.instrumentalness,
            speechiness: f.speechiness,
            liveness: f.liveness,
            tempo: f.tempo,
            loudness: f.loudness,
        }
    }
}

impl From<RankedItem> for pb::RankedItem {
    fn from(item: RankedItem) -> Self {
        Self {
            name: item.name,
            plays: item.plays,
            ms_played: item.ms_played,
        }
    }
}

impl From<ListeningStats> for pb::ListeningStats {
    /// `feature_mean`/`feature_stddev` stay unset when no play had features (not zeros, which
    /// would read as real measurements); `plays_by_hour` always has 24 values.
    fn from(s: ListeningStats) -> Self {
        Self {
            plays: s.plays,
            unique_tracks: s.unique_tracks,
            unique_artists: s.unique_artists,
            total_ms_played: s.total_ms_played,
            top_artists: s.top_artists.into_iter().map(Into::into).collect(),
            top_genres: s.top_genres.into_iter().map(Into::into).collect(),
            feature_mean: s.feature_mean.map(Into::into),
            feature_stddev: s.feature_stddev.map(Into::into),
            plays_by_hour: s.plays_by_hour.to_vec(),
            diversity: s.diversity,
            skips: s.skips,
            skip_rate: s.skip_rate,
        }
    }
}

impl From<MusicAnalysis> for pb::MusicAnalysis {
    fn from(a: MusicAnalysis) -> Self {
        Self {
            summary: a.summary,
            mood: a.mood,
            top_genres: a.top_genres,
            top_artists: a.top_artists,
            listening_personality: a.listening_personality,
            recommendations: a.recommendations,
            stats: Some(a.stats.into()),
            degraded: a.degraded,
            backend: a.backend,
            usage: Some(a.usage.into()),
            model: a.model,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::*;
    use crate::text::word_count;

    fn track(i: u32, artist: &str) -> pb::TrackPlay {
        pb::TrackPlay {
            track_id: format!("t{i}"),
            track_name: format!("Song {i}"),
            artist: artist.into(),
            genres: vec!["pop".into()],
            played_at: Some(prost_types::Timestamp {
                seconds: 1_704_067_200 + i64::from(i) * 3_600,
                nanos: 0,
            }),
            ms_played: 180_000,
            features: Some(pb::AudioFeatures {
                danceability: 0.8,
                energy: 0.7,
                valence: 0.9,
                tempo: 118.0,
                loudness: -4.0,
                ..pb::AudioFeatures::default()
            }),
            skipped: i == 2,
            duration_ms: 200_000,
        }
    }

    fn request(plays: Vec<pb::TrackPlay>) -> pb::AnalyzeMusicRequest {
        pb::AnalyzeMusicRequest {
            input: Some(Input::History(pb::ListeningHistory { plays })),
            max_words: None,
            disable_fallback: false,
        }
    }

    /// A store that is never connected (tests of inline histories).
    fn no_store() -> Store {
        Store::new(
            crate::store::DatabaseUrl::parse("sqlite::memory:").expect("url"),
            true,
        )
    }

    fn deadline() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    fn field_of(result: Result<pb::MusicAnalysis, MusicError>) -> String {
        match result {
            Err(MusicError::InvalidArgument { field, .. }) => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_inline_history_is_analyzed_and_converted() {
        let plays = vec![track(0, "A"), track(1, "A"), track(2, "B"), track(3, "C")];
        let mut req = request(plays);
        req.max_words = Some(10);
        let analysis = analyze_request(req, None, deadline(), 100, &no_store(), None).await;
        let analysis = match analysis {
            Ok(a) => a,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(analysis.backend, "local");
        assert_eq!(analysis.model, music::LOCAL_MODEL);
        assert!(!analysis.degraded);
        assert!(word_count(&analysis.summary) <= 10);
        assert_eq!(analysis.mood, "upbeat and danceable");
        assert_eq!(analysis.top_artists, ["A", "B", "C"]);
        assert_eq!(analysis.usage.map(|u| u.llm_calls), Some(0));
        let stats = analysis.stats.unwrap_or_default();
        assert_eq!(
            (stats.plays, stats.unique_tracks, stats.unique_artists),
            (4, 4, 3)
        );
        assert_eq!(stats.total_ms_played, 720_000);
        assert_eq!(stats.skips, 1);
        assert_eq!(stats.plays_by_hour.len(), 24);
        assert_eq!(stats.plays_by_hour[..4], [1, 1, 1, 1]);
        assert_eq!(
            stats.top_artists.first(),
            Some(&pb::RankedItem {
                name: "A".into(),
                plays: 2,
                ms_played: 360_000
            })
        );
        let mean = stats.feature_mean.unwrap_or_default();
        assert!((mean.valence - 0.9).abs() < 1e-12);
        assert_eq!(stats.feature_stddev.map(|s| s.tempo), Some(0.0));
    }

    #[tokio::test]
    async fn bad_requests_name_the_field() {
        let mut no_artist = track(1, "");
        no_artist.track_id = "x".into();
        let r = analyze_request(
            request(vec![track(0, "A"), no_artist]),
            None,
            deadline(),
            100,
            &no_store(),
            None,
        )
        .await;
        assert_eq!(field_of(r), "history.plays[1].artist");

        let mut nan = track(0, "A");
        if let Some(f) = nan.features.as_mut() {
            f.energy = f64::NAN;
        }
        let r = analyze_request(request(vec![nan]), None, deadline(), 100, &no_store(), None).await;
        assert_eq!(field_of(r), "history.plays[0].features.energy");

        let mut bad_time = track(0, "A");
        bad_time.played_at = Some(prost_types::Timestamp {
            seconds: i64::MAX,
            nanos: 0,
        });
        let r = analyze_request(
            request(vec![track(1, "A"), track(2, "B"), bad_time]),
            None,
            deadline(),
            100,
            &no_store(),
            None,
        )
        .await;
        assert_eq!(field_of(r), "history.plays[2].played_at");

        let r = analyze_request(request(vec![]), None, deadline(), 100, &no_store(), None).await;
        assert_eq!(field_of(r), "history.plays");
        let r = analyze_request(
            request(vec![track(0, "A"); 3]),
            None,
            deadline(),
            2,
            &no_store(),
            None,
        )
        .await;
        assert_eq!(field_of(r), "history.plays");

        let mut words = request(vec![track(0, "A")]);
        words.max_words = Some(301);
        assert_eq!(
            field_of(analyze_request(words, None, deadline(), 100, &no_store(), None).await),
            "max_words"
        );

        let empty = pb::AnalyzeMusicRequest::default();
        assert_eq!(
            field_of(analyze_request(empty, None, deadline(), 100, &no_store(), None).await),
            "input"
        );
    }

    #[tokio::test]
    async fn user_id_input_reads_the_stored_plays_page_by_page() {
        use crate::store::{Import, ListeningRecord};
        let store = no_store();
        let mut import =
            Import::<ListeningRecord>::new(store.get().await.expect("in-memory store"));
        // More than a page, with one other user's plays in between.
        let plays = music::STORED_PAGE_PLAYS as usize + 7;
        let mut inline = Vec::new();
        for i in 0..plays {
            let mut message = track(i as u32 % 40, &format!("Artist {}", i % 9));
            message.played_at = Some(prost_types::Timestamp {
                seconds: 1_700_000_000 + i as i64 * 60,
                nanos: 0,
            });
            let play = Play::try_from(message.clone()).expect("valid play");
            for user in ["u1", "u2"] {
                let record = ListeningRecord {
                    user_id: user.to_owned(),
                    played_at: play.played_at.expect("played_at"),
                    play: play.clone(),
                };
                import.push(record).await.expect("stored");
            }
            inline.push(message);
        }
        import.finish().await.expect("stored");

        let by_user = pb::AnalyzeMusicRequest {
            input: Some(Input::UserId("u1".into())),
            ..pb::AnalyzeMusicRequest::default()
        };
        let stored = analyze_request(by_user, None, deadline(), 100_000, &store, None)
            .await
            .expect("analysis of stored plays");
        let direct = analyze_request(request(inline), None, deadline(), 100_000, &store, None)
            .await
            .expect("analysis of the same plays inline");
        assert_eq!(stored.stats, direct.stats);
        assert_eq!(stored.stats.as_ref().map(|s| s.plays), Some(plays as u32));
        assert_eq!(stored.summary, direct.summary);

        let nobody = pb::AnalyzeMusicRequest {
            input: Some(Input::UserId("nobody".into())),
            ..pb::AnalyzeMusicRequest::default()
        };
        let result = analyze_request(nobody, None, deadline(), 100, &store, None).await;
        assert!(
            matches!(&result, Err(MusicError::NoStoredPlays { user_id }) if user_id == "nobody"),
            "{result:?}"
        );
        let blank = pb::AnalyzeMusicRequest {
            input: Some(Input::UserId(" ".into())),
            ..pb::AnalyzeMusicRequest::default()
        };
        assert_eq!(
            field_of(analyze_request(blank, None, deadline(), 100, &store, None).await),
            "user_id"
        );
    }

    #[tokio::test]
    async fn the_reading_of_stored_plays_is_reserved_and_given_back_before_the_llm_call() {
        use crate::{
            admission::AdmissionError,
            llm::{GenerateRequest, Generation, LlmError},
            store::{Import, ListeningRecord},
        };
        /// Fails every call, after noting the budget in use when it was made.
        struct Watching(Arc<MemoryBudget>, std::sync::Mutex<Vec<u64>>);
        impl Generator for Watching {
            fn name(&self) -> &str {
                "fake"
            }
            fn model(&self) -> &str {
                "fake-1"
            }
            fn generate<'a>(
                &'a self,
                _: GenerateRequest<'a>,
            ) -> futures::future::BoxFuture<'a, Result<Generation, LlmError>> {
                self.1.lock().unwrap().push(self.0.in_use());
                Box::pin(std::future::ready(Err(LlmError::Server {
                    backend: "fake".into(),
                    status: 503,
                    retry_after: None,
                    message: "down".into(),
                })))
            }
        }
        let store = no_store();
        let mut import =
            Import::<ListeningRecord>::new(store.get().await.expect("in-memory store"));
        let play = Play::try_from(track(1, "Robyn")).expect("valid play");
        import
            .push(ListeningRecord {
                user_id: "u1".to_owned(),
                played_at: std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
                play,
            })
            .await
            .expect("stored");
        import.finish().await.expect("stored");
        let by_user = |max_words: Option<u32>| pb::AnalyzeMusicRequest {
            input: Some(Input::UserId("u1".into())),
            max_words,
            ..pb::AnalyzeMusicRequest::default()
        };

        let reading = music::stored_stats_bytes(100_000, 2);
        let budget = MemoryBudget::new(reading);
        let generator = Watching(budget.clone(), Default::default());
        let analysis = analyze_request(
            by_user(None),
            Some(&generator),
            deadline(),
            100_000,
            &store,
            Some((&budget, 0)),
        )
        .await
        .expect("the local fallback answers");
        assert_eq!(analysis.stats.map(|s| s.plays), Some(1));
        let seen = generator.1.lock().unwrap().clone();
        assert!(!seen.is_empty(), "the model was asked");
        assert!(
            seen.iter().all(|&in_use| in_use == 0),
            "held during the LLM call: {seen:?}"
        );
        assert_eq!(budget.in_use(), 0);

        // A budget that cannot hold the reading refuses it, but bad options are named first.
        let by_user_within = |max_words, budget, held| {
            analyze_request(
                by_user(max_words),
                None,
                deadline(),
                100_000,
                &store,
                Some((budget, held)),
            )
        };
        let refused_for_good = |refused: Result<pb::MusicAnalysis, MusicError>| {
            assert!(
                matches!(
                    refused,
                    Err(MusicError::Refused(AdmissionError::OverBudget { .. }))
                ),
                "{refused:?}"
            );
        };
        let small = MemoryBudget::new(reading - 1);
        refused_for_good(by_user_within(None, &small, 0).await);
        assert_eq!(
            field_of(by_user_within(Some(301), &small, 0).await),
            "max_words"
        );

        // A budget that holds the reading alone but not beside what admission holds for the
        // message: refused for good too, not told to wait.
        let exact = MemoryBudget::new(reading);
        let _message = exact.try_reserve(1).unwrap();
        refused_for_good(by_user_within(None, &exact, 1).await);
    }

    #[tokio::test]
    async fn a_history_at_the_server_cap_is_analyzed() {
        let plays: Vec<pb::TrackPlay> = (0..music::DEFAULT_MAX_PLAYS as u32)
            .map(|i| {
                let mut play = track(i % 20_000, &format!("Artist {}", i % 3_000));
                play.genres = vec![format!("genre {}", i % 300), "pop".into()];
                play
            })
            .collect();
        let over = {
            let mut plays = plays.clone();
            plays.push(track(0, "A"));
            request(plays)
        };
        let started = std::time::Instant::now();
        let analysis = analyze_request(
            request(plays),
            None,
            deadline(),
            music::DEFAULT_MAX_PLAYS,
            &no_store(),
            None,
        )
        .await
        .map_err(|e| e.to_string());
        println!(
            "{} plays analyzed in {:?}",
            music::DEFAULT_MAX_PLAYS,
            started.elapsed()
        );
        let stats = analysis
            .map(|a| a.stats.unwrap_or_default())
            .unwrap_or_default();
        assert_eq!(stats.plays, 100_000);
        assert_eq!(stats.unique_tracks, 20_000);
        assert_eq!(stats.unique_artists, 3_000);
        assert_eq!(
            stats.top_genres.first().map(|g| (g.name.as_str(), g.plays)),
            Some(("pop", 100_000))
        );
        let r = analyze_request(
            over,
            None,
            deadline(),
            music::DEFAULT_MAX_PLAYS,
            &no_store(),
            None,
        )
        .await;
        assert_eq!(field_of(r), "history.plays");
    }

    #[test]
    fn conversions_round_trip_and_keep_unknowns_unknown() {
        // A play with only a track, an artist and `duration_ms`.
        let play_of = |duration_ms| {
            Play::try_from(pb::TrackPlay {
                track_id: "t".into(),
                artist: "A".into(),
                duration_ms,
                ..pb::TrackPlay::default()
            })
            .expect("a play with only a track and an artist is valid")
        };
        // Zero (proto3's "not set") stays unknown: not a 0 ms track, not the epoch.
        let play = play_of(0);
        assert_eq!(play.artist, "A");
        assert_eq!(play.duration_ms, None);
        assert_eq!(play.played_at, None);
        assert_eq!(play.features, None);
        assert_eq!(play_of(200_000).duration_ms, Some(200_000));
        let features = pb::AudioFeatures {
            danceability: 0.1,
            energy: 0.2,
            valence: 0.3,
            acousticness: 0.4,
            instrumentalness: 0.5,
            speechiness: 0.6,
            liveness: 0.7,
            tempo: 80.0,
            loudness: -9.0,
        };
        assert_eq!(
            pb::AudioFeatures::from(AudioFeatures::from(features)),
            features
        );
        let stats = pb::ListeningStats::from(ListeningStats::default());
        assert_eq!(stats.feature_mean, None);
        assert_eq!(stats.plays_by_hour, vec![0; 24]);
    }
}
