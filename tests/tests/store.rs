//! The insight store through the gRPC API (ImportFeedback, ImportListening, ListFeedback),
//! against in-process servers on SQLite (a scratch file) AND on the machine's PostgreSQL
//! (127.0.0.1:5432, user postgres; each test creates its own `insight_test_<random>` database
//! and drops it; see `spotifai_e2e::db`). Without PostgreSQL the PostgreSQL variants print
//! `SKIP: <reason>` and pass, except under CI (`CI` set), where they fail.

#![allow(clippy::unwrap_used, missing_docs)]

use std::{
    collections::HashSet,
    time::{Duration, SystemTime},
};

use prost_types::Timestamp;
use spotifai_e2e::{InProcess, db::Db, start_insight};
use spotifai_proto::insight::{self as pb, insight_service_client::InsightServiceClient};
use tonic::{Code, transport::Channel};

/// Defines one test per backend for `scenario(url)`.
macro_rules! on_both_backends {
    ($($scenario:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $scenario() {
                    let db = super::Db::sqlite();
                    super::$scenario(db.url()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $scenario() {
                    let Some(db) = super::Db::postgres().await else {
                        return;
                    };
                    super::$scenario(db.url()).await;
                }
            )*
        }
    };
}

on_both_backends!(
    import_is_idempotent,
    invalid_entries_are_listed_and_valid_ones_stored,
    pagination_walks_every_row_once_under_concurrent_inserts,
    filters_narrow_the_list,
    bad_page_arguments_are_invalid_argument,
    listening_import_is_idempotent,
    a_failed_batch_writes_nothing,
    nul_characters_and_oversized_labels_are_refused_by_field,
    analyze_music_by_user_reads_the_stored_plays,
);

async fn server(url: &str) -> (InProcess, InsightServiceClient<Channel>) {
    let config = insight_service::Config {
        database_url: insight_service::store::DatabaseUrl::parse(url).unwrap(),
        ..insight_service::Config::default()
    };
    let server = start_insight(config).await;
    let client = InsightServiceClient::new(server.channel().await);
    (server, client)
}

fn at(seconds: i64) -> Timestamp {
    Timestamp { seconds, nanos: 0 }
}

/// 2025-01-01T00:00:00Z: entry times are offsets from it.
const T0: i64 = 1_735_689_600;

fn entry(id: &str, seconds: i64) -> pb::FeedbackEntry {
    pb::FeedbackEntry {
        id: id.to_owned(),
        user_id: "u1".to_owned(),
        text: format!("feedback {id}"),
        rating: 3,
        created_at: Some(at(T0 + seconds)),
        source: "appstore".to_owned(),
    }
}

async fn import(
    client: &mut InsightServiceClient<Channel>,
    entries: Vec<pb::FeedbackEntry>,
) -> pb::ImportFeedbackResponse {
    client
        .import_feedback(tokio_stream::iter(entries))
        .await
        .unwrap()
        .into_inner()
}

/// Every entry matching `filter`, walking pages of `page_size`.
async fn list_all(
    client: &mut InsightServiceClient<Channel>,
    filter: Option<pb::FeedbackSelector>,
    page_size: u32,
) -> Vec<pb::FeedbackEntry> {
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_feedback(pb::ListFeedbackRequest {
                filter: filter.clone(),
                page_size,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= page_size as usize);
        all.extend(page.entries);
        if page.next_page_token.is_empty() {
            return all;
        }
        token = page.next_page_token;
    }
}

fn ids(entries: &[pb::FeedbackEntry]) -> Vec<&str> {
    entries.iter().map(|e| e.id.as_str()).collect()
}

async fn import_is_idempotent(url: &str) {
    let (server, mut client) = server(url).await;
    // 1,200 entries span three batches of 500; "undated" has no created_at.
    let mut entries: Vec<_> = (0..1199).map(|i| entry(&format!("e{i:04}"), i)).collect();
    entries.push(pb::FeedbackEntry {
        created_at: None,
        ..entry("undated", 0)
    });
    let first = import(&mut client, entries.clone()).await;
    assert_eq!(
        (first.inserted, first.updated, first.rejected),
        (1200, 0, 0)
    );
    let stored = list_all(&mut client, None, 1000).await;
    assert_eq!(stored.len(), 1200);
    let undated = stored.iter().find(|e| e.id == "undated").unwrap().clone();
    // The import time stands in for the missing created_at: after every dated entry.
    assert_eq!(stored.last().map(|e| e.id.as_str()), Some("undated"));
    let imported_at = undated.created_at.unwrap();
    assert!(imported_at.seconds > T0 + 1199, "{imported_at:?}");

    // Same stream again: every entry is an update, nothing is duplicated, and the undated
    // entry keeps the time of its first import.
    entries[0].text = "changed text".to_owned();
    let second = import(&mut client, entries).await;
    assert_eq!(
        (second.inserted, second.updated, second.rejected),
        (0, 1200, 0)
    );
    let again = list_all(&mut client, None, 1000).await;
    assert_eq!(ids(&again), ids(&stored));
    assert_eq!(again[0].text, "changed text");
    let undated_again = again.iter().find(|e| e.id == "undated").unwrap();
    assert_eq!(undated_again.created_at, Some(imported_at));
    server.shutdown().await.unwrap();
}

async fn invalid_entries_are_listed_and_valid_ones_stored(url: &str) {
    let (server, mut client) = server(url).await;
    let bad_time = pb::FeedbackEntry {
        created_at: Some(Timestamp {
            seconds: T0,
            nanos: -1,
        }),
        ..entry("bad-time", 0)
    };
    let stream = vec![
        entry("ok-1", 1),
        pb::FeedbackEntry {
            text: "  ".to_owned(),
            ..entry("blank", 2)
        },
        pb::FeedbackEntry {
            rating: 7,
            ..entry("rating-7", 3)
        },
        pb::FeedbackEntry {
            id: String::new(),
            ..entry("", 4)
        },
        pb::FeedbackEntry {
            text: "x".repeat(8 * 1024 + 1),
            ..entry("too-long", 5)
        },
        bad_time,
        entry("ok-2", 6),
    ];
    let response = import(&mut client, stream).await;
    assert_eq!(
        (response.inserted, response.updated, response.rejected),
        (2, 0, 5)
    );
    let got: Vec<_> = response
        .rejections
        .iter()
        .map(|r| (r.id.as_str(), r.position, r.field.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("blank", 1, "text"),
            ("rating-7", 2, "rating"),
            ("", 3, "id"),
            ("too-long", 4, "text"),
            ("bad-time", 5, "created_at"),
        ]
    );
    assert!(response.rejections.iter().all(|r| !r.reason.is_empty()));
    let stored = list_all(&mut client, None, 100).await;
    assert_eq!(ids(&stored), ["ok-1", "ok-2"]);
    server.shutdown().await.unwrap();
}

async fn pagination_walks_every_row_once_under_concurrent_inserts(url: &str) {
    let (server, mut client) = server(url).await;
    // 300 entries, three per second, so ids break ties within one created_at.
    let initial: Vec<_> = (0..300)
        .map(|i| entry(&format!("p{:03}", 299 - i), i / 3))
        .collect();
    import(&mut client, initial).await;

    let mut writer = client.clone();
    let mut walked: Vec<pb::FeedbackEntry> = Vec::new();
    let mut token = String::new();
    let mut added = 0;
    loop {
        let page = client
            .list_feedback(pb::ListFeedbackRequest {
                filter: None,
                page_size: 7,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        walked.extend(page.entries);
        // While paging, entries arrive that sort after every page read so far.
        if added < 20 {
            let late = entry(&format!("late{added:02}"), 10_000 + added);
            let written = import(&mut writer, vec![late]).await;
            assert_eq!(written.inserted, 1);
            added += 1;
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let keys: Vec<_> = walked
        .iter()
        .map(|e| (e.created_at.unwrap().seconds, e.id.clone()))
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(
        keys, sorted,
        "pages are in (created_at, id) order, each row once"
    );
    assert_eq!(walked.len(), 300 + added as usize);
    let seen: HashSet<_> = walked.iter().map(|e| e.id.as_str()).collect();
    assert!((0..300).all(|i| seen.contains(format!("p{i:03}").as_str())));
    server.shutdown().await.unwrap();
}

async fn filters_narrow_the_list(url: &str) {
    let (server, mut client) = server(url).await;
    let make = |id: &str, user: &str, seconds: i64, rating: u32, source: &str| pb::FeedbackEntry {
        user_id: user.to_owned(),
        rating,
        source: source.to_owned(),
        ..entry(id, seconds)
    };
    import(
        &mut client,
        vec![
            make("a", "u1", 10, 1, "appstore"),
            make("b", "u1", 20, 5, "playstore"),
            make("c", "u2", 30, 0, "appstore"),
            make("d", "u2", 40, 3, "in-app"),
            make("e", "u1", 50, 4, "appstore"),
        ],
    )
    .await;
    let cases: Vec<(pb::FeedbackSelector, Vec<&str>)> = vec![
        (Default::default(), vec!["a", "b", "c", "d", "e"]),
        (
            pb::FeedbackSelector {
                user_id: "u1".into(),
                ..Default::default()
            },
            vec!["a", "b", "e"],
        ),
        (
            pb::FeedbackSelector {
                since: Some(at(T0 + 20)),
                until: Some(at(T0 + 40)),
                ..Default::default()
            },
            vec!["b", "c"],
        ),
        (
            pb::FeedbackSelector {
                min_rating: 3,
                ..Default::default()
            },
            vec!["b", "d", "e"],
        ),
        (
            // Unrated entries ("c") are not "rated at most 3".
            pb::FeedbackSelector {
                max_rating: 3,
                ..Default::default()
            },
            vec!["a", "d"],
        ),
        (
            pb::FeedbackSelector {
                source: "appstore".into(),
                user_id: "u1".into(),
                min_rating: 2,
                ..Default::default()
            },
            vec!["e"],
        ),
    ];
    for (filter, expected) in cases {
        let got = list_all(&mut client, Some(filter.clone()), 2).await;
        assert_eq!(ids(&got), expected, "{filter:?}");
    }
    server.shutdown().await.unwrap();
}

async fn bad_page_arguments_are_invalid_argument(url: &str) {
    let (server, mut client) = server(url).await;
    let cases = [
        (
            pb::ListFeedbackRequest {
                page_size: 1001,
                ..Default::default()
            },
            "page_size",
        ),
        (
            pb::ListFeedbackRequest {
                page_token: "not-a-token".into(),
                ..Default::default()
            },
            "page_token",
        ),
        (
            pb::ListFeedbackRequest {
                filter: Some(pb::FeedbackSelector {
                    min_rating: 9,
                    ..Default::default()
                }),
                ..Default::default()
            },
            "filter.min_rating",
        ),
        (
            pb::ListFeedbackRequest {
                filter: Some(pb::FeedbackSelector {
                    min_rating: 4,
                    max_rating: 2,
                    ..Default::default()
                }),
                ..Default::default()
            },
            "filter.max_rating",
        ),
    ];
    for (request, field) in cases {
        let status = client.list_feedback(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with(field), "{}", status.message());
    }
    // page_size 1000 is the largest accepted.
    let page = client
        .list_feedback(pb::ListFeedbackRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(page.into_inner().entries.is_empty());
    server.shutdown().await.unwrap();
}

fn listening(user: &str, track: &str, seconds: i64) -> pb::ListeningPlay {
    pb::ListeningPlay {
        user_id: user.to_owned(),
        play: Some(pb::TrackPlay {
            track_id: track.to_owned(),
            track_name: format!("Song {track}"),
            artist: "Artist".to_owned(),
            genres: vec!["pop".to_owned()],
            played_at: Some(at(T0 + seconds)),
            ms_played: 180_000,
            features: Some(pb::AudioFeatures {
                energy: 0.5,
                tempo: 120.0,
                loudness: -6.0,
                ..Default::default()
            }),
            skipped: false,
            duration_ms: 200_000,
        }),
    }
}

async fn listening_import_is_idempotent(url: &str) {
    let (server, mut client) = server(url).await;
    let mut plays = vec![
        listening("u1", "t1", 0),
        listening("u1", "t1", 60),
        listening("u2", "t1", 0),
    ];
    let first = client
        .import_listening(tokio_stream::iter(plays.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((first.inserted, first.updated, first.rejected), (3, 0, 0));

    let mut undated = listening("u1", "t9", 0);
    if let Some(play) = undated.play.as_mut() {
        play.played_at = None;
    }
    plays.push(undated);
    plays.push(listening("", "t2", 0));
    plays.push(pb::ListeningPlay {
        play: Some(pb::TrackPlay {
            artist: String::new(),
            ..listening("u1", "t3", 0).play.unwrap()
        }),
        ..listening("u1", "t3", 0)
    });
    let second = client
        .import_listening(tokio_stream::iter(plays))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (second.inserted, second.updated, second.rejected),
        (0, 3, 3)
    );
    let got: Vec<_> = second
        .rejections
        .iter()
        .map(|r| (r.position, r.field.as_str()))
        .collect();
    assert_eq!(
        got,
        [(3, "play.played_at"), (4, "user_id"), (5, "play.artist")]
    );
    assert_eq!(second.rejections[0].id, "t9@");
    assert_eq!(second.rejections[2].id, "t3@2025-01-01T00:00:00.000000Z");
    server.shutdown().await.unwrap();
}

/// A batch that fails part-way (here a row the schema refuses, which validation would
/// normally have stopped) is rolled back whole: nothing of it is stored, and the store keeps
/// working.
async fn a_failed_batch_writes_nothing(url: &str) {
    use insight_service::{
        domain::Entry,
        store::{self, DatabaseUrl, FeedbackFilter, FeedbackQuery, StoreError},
    };
    let store = store::open(&DatabaseUrl::parse(url).unwrap(), true)
        .await
        .unwrap();
    let good = |id: &str| Entry {
        id: id.to_owned(),
        user_id: "u1".to_owned(),
        text: "fine".to_owned(),
        rating: Some(4),
        created_at: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(T0 as u64)),
        source: String::new(),
    };
    let refused = Entry {
        rating: Some(9),
        ..good("refused")
    };
    let batch = [good("a"), good("b"), refused, good("c")];
    let result = store.upsert_feedback(&batch, SystemTime::now()).await;
    assert!(
        matches!(result, Err(StoreError::Unavailable(_))),
        "{result:?}"
    );
    let query = FeedbackQuery::new(0, "", FeedbackFilter::default()).unwrap();
    let page = store.list_feedback(&query).await.unwrap();
    assert!(page.entries.is_empty(), "{:?}", page.entries);
    let counts = store
        .upsert_feedback(&batch[..2], SystemTime::now())
        .await
        .unwrap();
    assert_eq!((counts.inserted, counts.updated), (2, 0));
}

/// A store that cannot be reached makes the store RPCs UNAVAILABLE (never INTERNAL), and the
/// server keeps serving everything else.
#[tokio::test]
async fn an_unreachable_store_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let missing_dir = format!("sqlite://{}/no/such/dir/x.db", dir.path().display());
    // Port 1 on loopback: nothing listens there, the connection is refused at once.
    for url in [
        "postgres://postgres@127.0.0.1:1/insight",
        missing_dir.as_str(),
    ] {
        let (server, mut client) = server(url).await;
        let statuses = [
            client
                .import_feedback(tokio_stream::iter(vec![entry("a", 0)]))
                .await
                .unwrap_err(),
            client
                .import_listening(tokio_stream::iter(vec![listening("u1", "t1", 0)]))
                .await
                .unwrap_err(),
            client
                .list_feedback(pb::ListFeedbackRequest::default())
                .await
                .unwrap_err(),
        ];
        for status in statuses {
            assert_eq!(status.code(), Code::Unavailable, "{url}: {status:?}");
            assert!(status.message().contains("store"), "{}", status.message());
        }
        // Request errors are still reported as such, before the store is needed.
        let bad = client
            .list_feedback(pb::ListFeedbackRequest {
                page_size: 5000,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(bad.code(), Code::InvalidArgument);
        // Summaries do not need the store.
        let summary = client
            .summarize_feedback(pb::SummarizeFeedbackRequest {
                input: Some(pb::summarize_feedback_request::Input::Entries(
                    pb::FeedbackBatch {
                        entries: vec![entry("a", 0)],
                    },
                )),
                options: None,
            })
            .await;
        assert!(summary.is_ok(), "{summary:?}");
        server.shutdown().await.unwrap();
    }
}

/// Dropping the PostgreSQL database under a running server: the next calls are UNAVAILABLE.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_dropped_under_the_server_is_unavailable() {
    let Some(db) = Db::postgres().await else {
        return;
    };
    let (server, mut client) = server(db.url()).await;
    assert_eq!(import(&mut client, vec![entry("a", 0)]).await.inserted, 1);
    drop(db);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let status = client
        .list_feedback(pb::ListFeedbackRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    server.shutdown().await.unwrap();
}

/// Values PostgreSQL cannot store (a NUL character) or index (a multi-KiB id) are refused by
/// validation with the field named, on both backends alike: listed as rejections on import
/// while the rest of the batch is stored, INVALID_ARGUMENT in a filter or a page token. Never
/// UNAVAILABLE, which would tell the client to retry something that can never succeed.
async fn nul_characters_and_oversized_labels_are_refused_by_field(url: &str) {
    let (server, mut client) = server(url).await;
    let mut nul_text = entry("nul-text", 1);
    nul_text.text = "a\u{0}b".into();
    let mut nul_user = entry("nul-user", 2);
    nul_user.user_id = "u\u{0}".into();
    let long_id = entry(&"x".repeat(5_000), 3);
    let mut long_source = entry("long-source", 4);
    long_source.source = "s".repeat(300);
    let response = import(
        &mut client,
        vec![
            entry("ok-1", 0),
            nul_text,
            nul_user,
            long_id,
            long_source,
            entry("ok-2", 5),
        ],
    )
    .await;
    assert_eq!(
        (response.inserted, response.rejected),
        (2, 4),
        "{response:?}"
    );
    let fields: Vec<&str> = response
        .rejections
        .iter()
        .map(|r| r.field.as_str())
        .collect();
    assert_eq!(fields, ["text", "user_id", "id", "source"]);
    assert_eq!(
        ids(&list_all(&mut client, None, 10).await),
        ["ok-1", "ok-2"]
    );

    // A token whose id holds a NUL was never issued by the server.
    let mut token = "v1".to_owned() + &format!("{:016x}", 0u64);
    token.push_str("00");
    let status = client
        .list_feedback(pb::ListFeedbackRequest {
            page_token: token,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with("page_token"), "{status:?}");

    let status = client
        .summarize_feedback(pb::SummarizeFeedbackRequest {
            input: Some(pb::summarize_feedback_request::Input::Selector(
                pb::FeedbackSelector {
                    user_id: "a\u{0}".into(),
                    ..Default::default()
                },
            )),
            options: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with("selector.user_id"),
        "{status:?}"
    );
    server.shutdown().await.unwrap();
}

/// AnalyzeMusic with a `user_id` analyzes exactly that user's stored plays: the same answer
/// as the same plays sent inline, and NOT_FOUND for a user without plays.
async fn analyze_music_by_user_reads_the_stored_plays(url: &str) {
    let (server, mut client) = server(url).await;
    let artists = ["Daft Punk", "Justice", "Air", "Phoenix"];
    let mut mine = Vec::new();
    for i in 0..1_234 {
        let mut play = listening("dj", &format!("t{}", i % 97), i * 90);
        if let Some(track) = play.play.as_mut() {
            track.artist = artists[i as usize % artists.len()].to_owned();
            track.genres = vec![["house", "electronic", "pop"][i as usize % 3].to_owned()];
            track.ms_played = 60_000 + (i as u64 % 7) * 20_000;
        }
        mine.push(play);
    }
    let others: Vec<pb::ListeningPlay> = (0..50)
        .map(|i| listening("someone-else", "x", i * 60))
        .collect();
    let imported = client
        .import_listening(tokio_stream::iter(
            mine.clone().into_iter().chain(others).collect::<Vec<_>>(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(imported.inserted, 1_284, "{imported:?}");

    let stored = client
        .analyze_music(pb::AnalyzeMusicRequest {
            input: Some(pb::analyze_music_request::Input::UserId("dj".into())),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let inline = client
        .analyze_music(pb::AnalyzeMusicRequest {
            input: Some(pb::analyze_music_request::Input::History(
                pb::ListeningHistory {
                    plays: mine.into_iter().filter_map(|p| p.play).collect(),
                },
            )),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.stats.as_ref().map(|s| s.plays), Some(1_234));
    assert_eq!(stored, inline);

    let status = client
        .analyze_music(pb::AnalyzeMusicRequest {
            input: Some(pb::analyze_music_request::Input::UserId("nobody".into())),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    server.shutdown().await.unwrap();
}
