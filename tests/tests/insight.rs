//! End-to-end tests of insight-service over real gRPC: an in-process tonic server on
//! 127.0.0.1:0 and generated tonic clients.

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashSet;

use spotifai_e2e::{load_reviews, shared_data, start_insight};
use spotifai_proto::insight::{
    self as pb, insight_service_client::InsightServiceClient, summarize_feedback_request::Input,
};
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

fn entry(id: &str, text: &str, rating: u32) -> pb::FeedbackEntry {
    pb::FeedbackEntry {
        id: id.into(),
        text: text.into(),
        rating,
        ..Default::default()
    }
}

/// Forty distinct, realistic entries (the seed's app failed at 22+).
fn forty_entries() -> Vec<pb::FeedbackEntry> {
    let texts = [
        (
            "Too many ads between songs, it ruins the listening experience.",
            1,
        ),
        (
            "Shuffle keeps playing the same five songs over and over.",
            2,
        ),
        (
            "Offline downloads disappear after a few days, very annoying.",
            2,
        ),
        (
            "I love the discover weekly playlist, it finds great new artists.",
            5,
        ),
        ("The app crashes every time I open a podcast episode.", 1),
        ("Premium is worth the price, sound quality is excellent.", 5),
        ("Lyrics feature is great but often out of sync.", 4),
        ("Battery drain is terrible since the last update.", 2),
    ];
    (0..40)
        .map(|i| {
            let (text, rating) = texts[i % texts.len()];
            entry(&format!("fb-{i:03}"), &format!("{text} (user {i})"), rating)
        })
        .collect()
}

fn request(
    entries: Vec<pb::FeedbackEntry>,
    options: pb::SummaryOptions,
) -> pb::SummarizeFeedbackRequest {
    pb::SummarizeFeedbackRequest {
        input: Some(Input::Entries(pb::FeedbackBatch { entries })),
        options: Some(options),
    }
}

#[tokio::test]
async fn forty_entries_in_chunks_of_five_with_max_entries_zero_give_eight_chunks() {
    let server = start_insight(insight_service::Config::default()).await;
    let mut client = InsightServiceClient::new(server.channel().await);
    let entries = forty_entries();
    let options = pb::SummaryOptions {
        chunk_size: Some(5),
        max_entries: Some(0),
        ..Default::default()
    };
    let summary = client
        .summarize_feedback(request(entries.clone(), options))
        .await
        .unwrap()
        .into_inner();

    assert_eq!(summary.chunks.len(), 8);
    assert_eq!(summary.entries_used, 40);
    assert_eq!(summary.entries_skipped, 0);
    assert!(!summary.degraded);
    assert!(!summary.cached);
    assert_eq!(summary.backend, "local");
    let mut seen = HashSet::new();
    for (i, chunk) in summary.chunks.iter().enumerate() {
        assert_eq!(chunk.index as usize, i);
        assert_eq!(chunk.entry_ids.len(), 5);
        assert_eq!(chunk.status(), pb::ChunkStatus::Ok);
        assert!(!chunk.insight.is_empty());
        for id in &chunk.entry_ids {
            assert!(seen.insert(id.clone()), "{id} appears in two chunks");
        }
    }
    let all: HashSet<String> = entries.iter().map(|e| e.id.clone()).collect();
    assert_eq!(seen, all, "every entry id is in exactly one chunk");
    assert!(!summary.summary.is_empty());
    assert!(summary.summary.split_whitespace().count() <= 300);
    assert!(!summary.themes.is_empty());
    let usage = summary.usage.unwrap();
    assert_eq!(usage.llm_calls, 9, "8 map calls + 1 reduce");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn defaults_cap_at_fifteen_entries_in_chunks_of_five() {
    let server = start_insight(insight_service::Config::default()).await;
    let mut client = InsightServiceClient::new(server.channel().await);
    let summary = client
        .summarize_feedback(pb::SummarizeFeedbackRequest {
            input: Some(Input::Entries(pb::FeedbackBatch {
                entries: forty_entries()[..22].to_vec(),
            })),
            options: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(summary.chunks.len(), 3);
    assert_eq!(summary.entries_used, 15);
    assert_eq!(summary.entries_skipped, 7);
    let ids: Vec<String> = summary
        .chunks
        .iter()
        .flat_map(|c| c.entry_ids.clone())
        .collect();
    let expected: Vec<String> = (0..15).map(|i| format!("fb-{i:03}")).collect();
    assert_eq!(ids, expected, "the first 15 entries, in order");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn max_words_bounds_the_summary() {
    let server = start_insight(insight_service::Config::default()).await;
    let mut client = InsightServiceClient::new(server.channel().await);
    for max_words in [1, 12, 40] {
        let options = pb::SummaryOptions {
            max_words: Some(max_words),
            max_entries: Some(0),
            ..Default::default()
        };
        let summary = client
            .summarize_feedback(request(forty_entries(), options))
            .await
            .unwrap()
            .into_inner();
        let words = summary.summary.split_whitespace().count();
        assert!(
            words >= 1 && words <= max_words as usize,
            "{words} > {max_words}"
        );
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn real_reviews_give_a_useful_summary() {
    let Some(data) = shared_data() else { return };
    let reviews = load_reviews(&data);
    let negatives: Vec<pb::FeedbackEntry> = reviews
        .iter()
        .filter(|(_, text, rating)| *rating == 1 && text.len() > 80)
        .take(15)
        .map(|(id, text, rating)| entry(id, text, *rating))
        .collect();
    assert_eq!(negatives.len(), 15);
    let server = start_insight(insight_service::Config::default()).await;
    let mut client = InsightServiceClient::new(server.channel().await);
    let summary = client
        .summarize_feedback(request(negatives.clone(), pb::SummaryOptions::default()))
        .await
        .unwrap()
        .into_inner();
    let sentiment = summary.sentiment.unwrap();
    assert_eq!(sentiment.label(), pb::SentimentLabel::Negative);
    assert_eq!(
        sentiment.negative + sentiment.neutral + sentiment.positive,
        15
    );
    assert!((sentiment.average_rating - 1.0).abs() < 1e-9);
    assert_eq!(sentiment.rated, 15);
    // Extractive: every quoted sentence of the summary comes from the input.
    let corpus: String = negatives
        .iter()
        .map(|e| e.text.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    let themes_in_input = summary
        .themes
        .iter()
        .filter(|t| corpus.to_lowercase().contains(t.as_str()))
        .count();
    assert!(
        themes_in_input >= summary.themes.len().saturating_sub(1),
        "{:?}",
        summary.themes
    );
    server.shutdown().await.unwrap();
}

/// Every foreseeable bad input is INVALID_ARGUMENT naming the field, in the message and in a
/// google.rpc.BadRequest detail.
#[tokio::test]
async fn invalid_input_is_invalid_argument_naming_the_field() {
    use tonic_types::StatusExt;
    let server = start_insight(insight_service::Config::default()).await;
    let mut client = InsightServiceClient::new(server.channel().await);
    let good = || vec![entry("a", "fine app", 4), entry("b", "crashes a lot", 1)];
    let cases: Vec<(&str, pb::SummarizeFeedbackRequest)> = vec![
        ("input", pb::SummarizeFeedbackRequest::default()),
        ("entries", request(vec![], Default::default())),
        (
            "entries[1].id",
            request(
                vec![entry("a", "x", 1), entry("", "y", 1)],
                Default::default(),
            ),
        ),
        (
            "entries[0].text",
            request(vec![entry("a", "   ", 1)], Default::default()),
        ),
        (
            "entries[0].text",
            request(
                vec![entry("a", &"x".repeat(8 * 1024 + 1), 1)],
                Default::default(),
            ),
        ),
        (
            "entries[1].rating",
            request(
                vec![entry("a", "x", 1), entry("b", "y", 6)],
                Default::default(),
            ),
        ),
        (
            "entries[1].id",
            request(
                vec![entry("a", "x", 1), entry("a", "y", 2)],
                Default::default(),
            ),
        ),
        (
            "options.chunk_size",
            request(
                good(),
                pb::SummaryOptions {
                    chunk_size: Some(0),
                    ..Default::default()
                },
            ),
        ),
        (
            "options.chunk_size",
            request(
                good(),
                pb::SummaryOptions {
                    chunk_size: Some(51),
                    ..Default::default()
                },
            ),
        ),
        (
            "options.max_entries",
            request(
                good(),
                pb::SummaryOptions {
                    max_entries: Some(10_001),
                    ..Default::default()
                },
            ),
        ),
        (
            "options.max_words",
            request(
                good(),
                pb::SummaryOptions {
                    max_words: Some(0),
                    ..Default::default()
                },
            ),
        ),
        (
            "options.max_words",
            request(
                good(),
                pb::SummaryOptions {
                    max_words: Some(301),
                    ..Default::default()
                },
            ),
        ),
    ];
    for (field, req) in cases {
        let status = client.summarize_feedback(req).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            status.message().starts_with(field),
            "{field}: {}",
            status.message()
        );
        let details = status.get_error_details();
        let violation_fields: Vec<String> = details
            .bad_request()
            .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
            .unwrap_or_default();
        assert_eq!(violation_fields, vec![field.to_owned()]);
    }
    // The largest allowed text is accepted.
    let ok = client
        .summarize_feedback(request(
            vec![entry("a", &"word ".repeat(1638), 3)],
            Default::default(),
        ))
        .await;
    assert!(ok.is_ok(), "{ok:?}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn stream_sends_one_chunk_event_per_chunk_then_the_summary() {
    let server = start_insight(insight_service::Config::default()).await;
    let mut client = InsightServiceClient::new(server.channel().await);
    let options = pb::SummaryOptions {
        chunk_size: Some(5),
        max_entries: Some(0),
        ..Default::default()
    };
    let mut stream = client
        .stream_feedback_summary(request(forty_entries(), options))
        .await
        .unwrap()
        .into_inner();
    let mut chunk_indices = Vec::new();
    let mut summary = None;
    while let Some(event) = stream.message().await.unwrap() {
        assert!(summary.is_none(), "the summary is the last event");
        match event.event.unwrap() {
            pb::summary_event::Event::Chunk(chunk) => {
                assert_eq!(chunk.status(), pb::ChunkStatus::Ok);
                assert_eq!(chunk.entry_ids.len(), 5);
                chunk_indices.push(chunk.index);
            }
            pb::summary_event::Event::Summary(s) => summary = Some(s),
        }
    }
    chunk_indices.sort_unstable();
    assert_eq!(chunk_indices, (0..8).collect::<Vec<u32>>());
    let summary = summary.expect("a summary event");
    assert_eq!(summary.entries_used, 40);
    assert_eq!(summary.chunks.len(), 8);

    // The streamed summary equals the unary one for the same request.
    let unary = client
        .summarize_feedback(request(forty_entries(), options))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unary, summary);

    // Bad input is an immediate INVALID_ARGUMENT, not a stream that fails later.
    let status = client
        .stream_feedback_summary(request(vec![], Default::default()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    server.shutdown().await.unwrap();
}

pub fn play(i: usize, artist: &str, genre: &str, energy: f64) -> pb::TrackPlay {
    pb::TrackPlay {
        track_id: format!("t{i}"),
        track_name: format!("Song {i}"),
        artist: artist.into(),
        genres: vec![genre.into()],
        played_at: Some(prost_types::Timestamp {
            seconds: 1_700_000_000 + (i as i64) * 3_600,
            nanos: 0,
        }),
        ms_played: 180_000,
        features: Some(pb::AudioFeatures {
            danceability: 0.7,
            energy,
            valence: 0.6,
            acousticness: 0.1,
            instrumentalness: 0.0,
            speechiness: 0.05,
            liveness: 0.1,
            tempo: 120.0,
            loudness: -6.0,
        }),
        skipped: i.is_multiple_of(7),
        duration_ms: 200_000,
    }
}

#[tokio::test]
async fn analyze_music_answers_from_the_history_with_the_local_analysis() {
    let server = start_insight(insight_service::Config::default()).await;
    let mut client = InsightServiceClient::new(server.channel().await);
    let plays: Vec<pb::TrackPlay> = (0..60)
        .map(|i| match i % 3 {
            0 => play(i, "Daft Punk", "electronic", 0.8),
            1 => play(i, "Daft Punk", "house", 0.9),
            _ => play(i, "Norah Jones", "jazz", 0.3),
        })
        .collect();
    let analysis = client
        .analyze_music(pb::AnalyzeMusicRequest {
            input: Some(pb::analyze_music_request::Input::History(
                pb::ListeningHistory { plays },
            )),
            max_words: Some(50),
            disable_fallback: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(analysis.backend, "local");
    assert!(!analysis.degraded);
    assert!(!analysis.summary.is_empty());
    assert!(analysis.summary.split_whitespace().count() <= 50);
    assert_eq!(
        analysis.top_artists.first().map(String::as_str),
        Some("Daft Punk")
    );
    let stats = analysis.stats.unwrap();
    assert_eq!(stats.plays, 60);
    assert_eq!(stats.unique_artists, 2);
    assert_eq!(stats.plays_by_hour.len(), 24);
    assert!(!analysis.recommendations.is_empty());

    let bad = client
        .analyze_music(pb::AnalyzeMusicRequest {
            input: Some(pb::analyze_music_request::Input::History(
                pb::ListeningHistory {
                    plays: vec![play(0, "", "pop", 0.5)],
                },
            )),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(
        bad.message().starts_with("history.plays[0].artist"),
        "{}",
        bad.message()
    );
    let missing = client
        .analyze_music(pb::AnalyzeMusicRequest::default())
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::InvalidArgument);
    let stored = client
        .analyze_music(pb::AnalyzeMusicRequest {
            input: Some(pb::analyze_music_request::Input::UserId("u1".into())),
            ..Default::default()
        })
        .await
        .unwrap_err();
    // Nothing was imported for u1.
    assert_eq!(stored.code(), Code::NotFound, "{stored:?}");
    assert!(stored.message().contains("ImportListening"), "{stored:?}");
    // A NUL is refused naming the field (PostgreSQL would refuse it without one); an unknown
    // 100 KB id is NOT_FOUND with its echo cut to size (whole, it exceeded the client's header
    // limit and arrived as a protocol error).
    let analyze = |user_id: String| pb::AnalyzeMusicRequest {
        input: Some(pb::analyze_music_request::Input::UserId(user_id)),
        ..Default::default()
    };
    let bad = client
        .analyze_music(analyze("a\0b".to_owned()))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    assert!(bad.message().starts_with("user_id:"), "{}", bad.message());
    let long = client
        .analyze_music(analyze("u".repeat(100_000)))
        .await
        .unwrap_err();
    assert_eq!(long.code(), Code::NotFound, "{long:?}");
    assert!(long.message().len() <= 1024, "{}", long.message().len());
    // An unknown id of 60 KB (light calls take messages up to 64 KiB) is NOT_FOUND with a
    // short message: the whole id echoed in the trailer would exceed the client's header
    // limit and arrive as a protocol error.
    let unknown = client
        .get_job(pb::GetJobRequest {
            id: "j".repeat(60_000),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    assert!(
        unknown.message().len() <= 1024,
        "{}",
        unknown.message().len()
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn health_reports_serving_then_not_serving_on_shutdown() {
    let mut server = start_insight(insight_service::Config::default()).await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "spotifai.insight.v1.InsightService"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "nope.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    let mut watch = health
        .watch(HealthCheckRequest {
            service: "spotifai.insight.v1.InsightService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap().status();
    assert_eq!(first, ServingStatus::Serving);
    server.begin_shutdown();
    let next = watch.message().await.unwrap().unwrap().status();
    assert_eq!(next, ServingStatus::NotServing);
    server.shutdown().await.unwrap();
}
