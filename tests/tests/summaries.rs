//! Summaries of stored feedback and the insight cache, over gRPC, on SQLite and on the
//! machine's PostgreSQL: a selector summary equals the inline summary of the same entries,
//! a cache hit makes no backend call (counted by a fake Gemini on loopback), chunk insights
//! are reused by overlapping requests, identical concurrent requests are computed once.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, SystemTime};

use insight_service::store::{CacheTable, DatabaseUrl};
use spotifai_e2e::{
    db::Db,
    fakes::{Fault, SummaryGemini as Gemini},
    start_insight,
};
use spotifai_proto::insight::{
    self as pb, insight_service_client::InsightServiceClient, summarize_feedback_request::Input,
};
use tonic::{Code, transport::Channel};

const KEY: &str = "fake-gemini-key-7";

/// The databases every test runs on: a scratch SQLite file, and a scratch PostgreSQL
/// database unless PostgreSQL is absent outside CI (then SKIP is printed).
async fn databases() -> Vec<Db> {
    let mut dbs = vec![Db::sqlite()];
    dbs.extend(Db::postgres().await);
    dbs
}

fn config(db: &Db) -> insight_service::Config {
    insight_service::Config {
        database_url: DatabaseUrl::parse(db.url()).unwrap(),
        ..insight_service::Config::default()
    }
}

fn at(seconds: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds, nanos: 0 }
}

/// `n` entries of `user`, created one minute apart from `start`, ratings cycling 1..5.
fn entries(user: &str, n: usize, start: i64) -> Vec<pb::FeedbackEntry> {
    let topics = [
        "the ads interrupt my playlists every two songs",
        "shuffle keeps repeating the same artist",
        "offline downloads vanish after an update",
        "the new podcast tab is great and discovery is better",
        "lyrics are out of sync on some tracks",
    ];
    (0..n)
        .map(|i| pb::FeedbackEntry {
            id: format!("{user}-{i:04}"),
            user_id: user.to_owned(),
            text: format!("Review {i} by {user}: {}.", topics[i % topics.len()]),
            rating: (i % 5 + 1) as u32,
            created_at: Some(at(start + i as i64 * 60)),
            source: if i % 2 == 0 { "android" } else { "ios" }.to_owned(),
        })
        .collect()
}

async fn import(client: &mut InsightServiceClient<Channel>, entries: Vec<pb::FeedbackEntry>) {
    let response = client
        .import_feedback(tokio_stream::iter(entries))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.rejected, 0, "{response:?}");
}

fn inline(
    entries: Vec<pb::FeedbackEntry>,
    options: pb::SummaryOptions,
) -> pb::SummarizeFeedbackRequest {
    pb::SummarizeFeedbackRequest {
        input: Some(Input::Entries(pb::FeedbackBatch { entries })),
        options: Some(options),
    }
}

fn selected(
    selector: pb::FeedbackSelector,
    options: pb::SummaryOptions,
) -> pb::SummarizeFeedbackRequest {
    pb::SummarizeFeedbackRequest {
        input: Some(Input::Selector(selector)),
        options: Some(options),
    }
}

fn by_user(user: &str) -> pb::FeedbackSelector {
    pb::FeedbackSelector {
        user_id: user.to_owned(),
        ..Default::default()
    }
}

/// Everything but the provenance fields a cache changes.
fn content(summary: &pb::FeedbackSummary) -> pb::FeedbackSummary {
    pb::FeedbackSummary {
        cached: false,
        usage: None,
        ..summary.clone()
    }
}

#[tokio::test]
async fn a_selector_summary_equals_the_inline_summary_of_the_same_entries() {
    for db in databases().await {
        let server = start_insight(config(&db)).await;
        let mut client = InsightServiceClient::new(server.channel().await);
        let alice = entries("alice", 37, 1_700_000_000);
        // Another user's entries interleaved in time, so the filter really filters.
        import(&mut client, entries("bob", 20, 1_700_000_030)).await;
        // Imported oldest first; the selector reads newest first (so `max_entries` takes the
        // most recent), not in import order.
        import(&mut client, alice.clone()).await;
        let newest_first: Vec<pb::FeedbackEntry> = alice.iter().rev().cloned().collect();

        for (max_entries, chunk_size) in [(0, 5), (12, 4), (37, 50)] {
            let options = pb::SummaryOptions {
                max_entries: Some(max_entries),
                chunk_size: Some(chunk_size),
                ..Default::default()
            };
            let stored = client
                .summarize_feedback(selected(by_user("alice"), options))
                .await
                .unwrap()
                .into_inner();
            let given = client
                .summarize_feedback(inline(newest_first.clone(), options))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(
                content(&stored),
                content(&given),
                "max_entries {max_entries}"
            );
            assert_eq!(
                stored.entries_used + stored.entries_skipped,
                37,
                "{}",
                db.url()
            );
            // The most recent entries: the first chunk starts with the newest one.
            assert_eq!(stored.chunks[0].entry_ids[0], "alice-0036");
        }

        // Filters narrow as ListFeedback's do: rating and source.
        let options = pb::SummaryOptions {
            max_entries: Some(0),
            ..Default::default()
        };
        let selector = pb::FeedbackSelector {
            min_rating: 4,
            source: "android".into(),
            ..by_user("alice")
        };
        let stored = client
            .summarize_feedback(selected(selector, options))
            .await
            .unwrap()
            .into_inner();
        let expected: Vec<pb::FeedbackEntry> = newest_first
            .iter()
            .filter(|e| e.rating >= 4 && e.source == "android")
            .cloned()
            .collect();
        let given = client
            .summarize_feedback(inline(expected, options))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(content(&stored), content(&given));

        // The stream sends the same chunks, then the same summary.
        let mut stream = client
            .stream_feedback_summary(selected(by_user("alice"), options))
            .await
            .unwrap()
            .into_inner();
        let mut chunks = 0;
        let mut last = None;
        while let Some(event) = stream.message().await.unwrap() {
            match event.event.unwrap() {
                pb::summary_event::Event::Chunk(_) => chunks += 1,
                pb::summary_event::Event::Summary(summary) => last = Some(summary),
            }
        }
        let last = last.expect("a summary ends the stream");
        assert_eq!(chunks, last.chunks.len());
        assert_eq!(last.entries_used, 37);
        server.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn bad_selectors_name_the_field_and_a_missing_store_is_unavailable() {
    for db in databases().await {
        let server = start_insight(config(&db)).await;
        let mut client = InsightServiceClient::new(server.channel().await);
        import(&mut client, entries("alice", 3, 1_700_000_000)).await;
        let options = pb::SummaryOptions::default();
        let cases = [
            (by_user("nobody"), "selector"),
            (
                pb::FeedbackSelector {
                    min_rating: 9,
                    ..Default::default()
                },
                "selector.min_rating",
            ),
            (
                pb::FeedbackSelector {
                    min_rating: 4,
                    max_rating: 2,
                    ..Default::default()
                },
                "selector.max_rating",
            ),
        ];
        for (selector, field) in cases {
            let status = client
                .summarize_feedback(selected(selector, options))
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            assert!(status.message().starts_with(field), "{status:?}");
        }
        server.shutdown().await.unwrap();
    }

    // No database at all: stored input is UNAVAILABLE (retry-safe); inline input still works.
    let gemini = Gemini::start(KEY).await;
    let nowhere = insight_service::Config {
        database_url: DatabaseUrl::parse("postgres://postgres@127.0.0.1:1/none").unwrap(),
        ..gemini.config(&Db::sqlite())
    };
    let server = start_insight(nowhere).await;
    let mut client = InsightServiceClient::new(server.channel().await);
    let status = client
        .summarize_feedback(selected(by_user("alice"), pb::SummaryOptions::default()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let summary = client
        .summarize_feedback(inline(entries("x", 6, 0), pb::SummaryOptions::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(!summary.degraded && !summary.cached, "{summary:?}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_cache_hit_makes_no_backend_call_and_bypass_cache_recomputes() {
    for db in databases().await {
        let gemini = Gemini::start(KEY).await;
        let server = start_insight(gemini.config(&db)).await;
        let mut client = InsightServiceClient::new(server.channel().await);
        let options = pb::SummaryOptions {
            chunk_size: Some(5),
            max_entries: Some(0),
            ..Default::default()
        };
        let request = inline(entries("alice", 10, 1_700_000_000), options);

        let first = client
            .summarize_feedback(request.clone())
            .await
            .unwrap()
            .into_inner();
        assert!(!first.cached && !first.degraded, "{first:?}");
        // Two map calls and one reduce.
        assert_eq!(first.usage.unwrap().llm_calls, 3);
        assert_eq!(gemini.fake.request_count(), 3);

        let second = client
            .summarize_feedback(request.clone())
            .await
            .unwrap()
            .into_inner();
        assert!(second.cached, "{second:?}");
        assert_eq!(second.usage.unwrap_or_default(), pb::Usage::default());
        assert_eq!(content(&second), content(&first));
        assert_eq!(gemini.fake.request_count(), 3, "a hit calls no backend");

        // The stream answers from the cache too, chunks first.
        let mut stream = client
            .stream_feedback_summary(request.clone())
            .await
            .unwrap()
            .into_inner();
        let mut indexes = Vec::new();
        let mut summary = None;
        while let Some(event) = stream.message().await.unwrap() {
            assert!(summary.is_none(), "nothing after the summary: {event:?}");
            match event.event {
                Some(pb::summary_event::Event::Chunk(chunk)) => indexes.push(chunk.index),
                Some(pb::summary_event::Event::Summary(s)) => summary = Some(s),
                None => panic!("an empty event"),
            }
        }
        indexes.sort_unstable();
        assert_eq!(indexes, [0, 1], "each chunk once");
        let summary = summary.expect("the summary, last");
        assert!(summary.cached);
        assert_eq!(summary.summary, first.summary);
        assert_eq!(gemini.fake.request_count(), 3);

        // bypass_cache skips reading: the chunks and the reduce are computed again.
        let mut fresh = request.clone();
        fresh.options.as_mut().unwrap().bypass_cache = true;
        let third = client.summarize_feedback(fresh).await.unwrap().into_inner();
        assert!(!third.cached);
        assert_eq!(gemini.fake.request_count(), 6);

        // Changing one text is another key.
        let mut edited = request.clone();
        if let Some(Input::Entries(batch)) = edited.input.as_mut() {
            batch.entries[7].text.push_str(" Also the app crashes.");
        }
        let fourth = client
            .summarize_feedback(edited)
            .await
            .unwrap()
            .into_inner();
        assert!(!fourth.cached);
        // The unchanged first chunk came from the chunk cache: one map call and the reduce.
        assert_eq!(fourth.usage.unwrap().llm_calls, 2);
        assert_eq!(gemini.fake.request_count(), 8);

        // A selector over stored entries is cached as well.
        import(&mut client, entries("carol", 10, 1_700_000_000)).await;
        let stored = selected(by_user("carol"), options);
        let miss = client
            .summarize_feedback(stored.clone())
            .await
            .unwrap()
            .into_inner();
        assert!(!miss.cached);
        let calls = gemini.fake.request_count();
        let hit = client
            .summarize_feedback(stored.clone())
            .await
            .unwrap()
            .into_inner();
        assert!(hit.cached);
        assert_eq!(gemini.fake.request_count(), calls);
        // A new matching entry changes the selection, so the key.
        import(&mut client, entries("carol", 11, 1_700_000_000)).await;
        let changed = client
            .summarize_feedback(stored)
            .await
            .unwrap()
            .into_inner();
        assert!(!changed.cached);
        assert_eq!(changed.entries_used, 11);
        server.shutdown().await.unwrap();
    }
}

/// A fake Gemini answering every call after `delay`, and an insight-service in front of it on
/// `db` with room for many concurrent calls (and `llm_timeout`, when given).
async fn slow_gemini(
    db: &Db,
    delay: Duration,
    llm_timeout: Option<Duration>,
) -> (Gemini, spotifai_e2e::InProcess, Channel) {
    let gemini = Gemini::start(KEY).await;
    gemini.fake.set_default_fault(Fault::Delay(delay));
    let defaults = gemini.config(db);
    let config = insight_service::Config {
        max_concurrency: 16,
        llm_timeout: llm_timeout.unwrap_or(defaults.llm_timeout),
        ..defaults
    };
    let server = start_insight(config).await;
    let channel = server.channel().await;
    (gemini, server, channel)
}

/// Returns once the fake has received a request beyond the `seen` it had: the caller started
/// just before is then leading its computation, and an identical request joins it.
async fn leading(gemini: &Gemini, seen: usize) {
    called(gemini, seen + 1).await;
}

/// Returns once the fake has received `calls` requests in all.
async fn called(gemini: &Gemini, calls: usize) {
    assert!(
        gemini
            .fake
            .wait_for_requests(calls, Duration::from_secs(10))
            .await,
        "the fake never received {calls} requests"
    );
}

/// Ten of `user`'s entries inline, in two chunks of five.
fn ten_entries(user: &str, disable_fallback: bool) -> pb::SummarizeFeedbackRequest {
    let options = pb::SummaryOptions {
        chunk_size: Some(5),
        max_entries: Some(0),
        disable_fallback,
        ..Default::default()
    };
    inline(entries(user, 10, 1_700_000_000), options)
}

/// SummarizeFeedback of [`ten_entries`] with a timeout, in a task of its own.
fn timed_call(
    channel: &Channel,
    user: &str,
    disable_fallback: bool,
    timeout: Duration,
) -> tokio::task::JoinHandle<Result<tonic::Response<pb::FeedbackSummary>, tonic::Status>> {
    let mut client = InsightServiceClient::new(channel.clone());
    let mut request = tonic::Request::new(ten_entries(user, disable_fallback));
    request.set_timeout(timeout);
    tokio::spawn(async move { client.summarize_feedback(request).await })
}

#[tokio::test]
async fn identical_concurrent_requests_are_computed_once() {
    for db in databases().await {
        // Slow enough that every caller arrives while the first is still computing.
        let (gemini, server, channel) = slow_gemini(&db, Duration::from_millis(400), None).await;
        let request = ten_entries("dave", false);
        let calls: Vec<_> = (0..6)
            .map(|_| {
                let mut client = InsightServiceClient::new(channel.clone());
                let request = request.clone();
                tokio::spawn(async move { client.summarize_feedback(request).await })
            })
            .collect();
        let mut summaries = Vec::new();
        for call in calls {
            summaries.push(call.await.unwrap().unwrap().into_inner());
        }
        assert_eq!(
            gemini.fake.request_count(),
            3,
            "one computation: 2 maps + 1 reduce"
        );
        let paying: Vec<u32> = summaries
            .iter()
            .map(|s| s.usage.unwrap_or_default().llm_calls)
            .filter(|&calls| calls > 0)
            .collect();
        assert_eq!(paying, [3], "exactly one caller's answer cost the calls");
        for summary in &summaries {
            assert_eq!(content(summary), content(&summaries[0]));
            // Shared with the computation in flight, not read from the cache afterwards.
            assert!(!summary.cached, "{summary:?}");
        }
        server.shutdown().await.unwrap();
    }
}

/// Identical requests share a computation only when each would accept the other's outcome:
/// with Gemini failing every call, a caller that disabled fallback gets UNAVAILABLE and one
/// that allowed it gets the local answer, whichever of them arrived first.
#[tokio::test]
async fn a_shared_computation_respects_each_callers_fallback_choice() {
    let db = Db::sqlite();
    // Every call outlives --llm-timeout: each chunk times out twice (first try and retry)
    // and fails, a window of ~0.6 s in which the second caller arrives.
    let timeout = Some(Duration::from_millis(300));
    let (gemini, server, channel) = slow_gemini(&db, Duration::from_secs(30), timeout).await;
    for (user, leader_disables) in [("erin", true), ("fred", false)] {
        // The follower has less time than the leader, so only the flight key keeps it from
        // taking the leader's outcome (a follower with more time would compute its own).
        let call =
            |disable_fallback, timeout| timed_call(&channel, user, disable_fallback, timeout);
        let seen = gemini.fake.request_count();
        let leader = call(leader_disables, Duration::from_secs(20));
        leading(&gemini, seen).await;
        let follower = call(!leader_disables, Duration::from_secs(10));
        for (outcome, disabled) in [
            (leader.await.unwrap(), leader_disables),
            (follower.await.unwrap(), !leader_disables),
        ] {
            if disabled {
                let status = outcome.unwrap_err();
                assert_eq!(status.code(), Code::Unavailable, "{user}: {status:?}");
                assert!(status.message().contains("gemini"), "{status:?}");
            } else {
                let summary = outcome.unwrap().into_inner();
                assert!(summary.degraded, "{user}: {summary:?}");
                assert!(
                    summary.backend.starts_with("local (fallback"),
                    "{user}: {}",
                    summary.backend
                );
                assert_eq!(summary.entries_used, 10);
            }
        }
    }
    server.shutdown().await.unwrap();
}

/// A caller that set `bypass_cache` does not take the answer of an identical computation in
/// flight that reads the cache (its chunks may come from it): it computes afresh.
#[tokio::test]
async fn a_caller_that_bypasses_the_cache_computes_its_own_answer_beside_an_identical_flight() {
    let db = Db::sqlite();
    let (gemini, server, channel) = slow_gemini(&db, Duration::from_millis(400), None).await;
    let call = |bypass_cache: bool| {
        let mut client = InsightServiceClient::new(channel.clone());
        let mut request = ten_entries("gina", false);
        request.options.as_mut().unwrap().bypass_cache = bypass_cache;
        tokio::spawn(async move { client.summarize_feedback(request).await })
    };
    let leader = call(false);
    leading(&gemini, 0).await;
    let bypassing = call(true);
    let leader = leader.await.unwrap().unwrap().into_inner();
    let bypassing = bypassing.await.unwrap().unwrap().into_inner();
    assert_eq!(leader.usage.unwrap_or_default().llm_calls, 3);
    assert_eq!(
        bypassing.usage.unwrap_or_default().llm_calls,
        3,
        "computed afresh: {bypassing:?}"
    );
    assert_eq!(gemini.fake.request_count(), 6);
    server.shutdown().await.unwrap();
}

/// A caller that joins a computation led by a caller with less time does not settle for the
/// answer that budget cut short: with Gemini answering in 1.5 s, the leader's 0.8 s leave only
/// the local fallback (degraded), and the follower, with 10 s, gets Gemini's. A caller with
/// less time left than the leader had takes the leader's degraded answer.
#[tokio::test]
async fn a_follower_with_more_time_computes_what_the_leaders_deadline_cut_short() {
    let db = Db::sqlite();
    let (gemini, server, channel) = slow_gemini(&db, Duration::from_millis(1500), None).await;
    let call = |user, timeout| timed_call(&channel, user, false, timeout);
    let leader = call("gina", Duration::from_millis(800));
    leading(&gemini, 0).await;
    let follower = call("gina", Duration::from_secs(10));
    let leader = leader.await.unwrap().unwrap().into_inner();
    assert!(leader.degraded, "{leader:?}");
    assert!(
        leader.backend.starts_with("local (fallback"),
        "{}",
        leader.backend
    );
    let follower = follower.await.unwrap().unwrap().into_inner();
    assert!(!follower.degraded, "{follower:?}");
    assert_eq!(follower.backend, "gemini");
    assert_eq!(follower.entries_used, 10);

    // Another user: leader 0.8 s, follower 0.75 s, arriving once the leader computes. The
    // follower shares the leader's degraded answer rather than computing again with less time.
    let seen = gemini.fake.request_count();
    let leader = call("hugo", Duration::from_millis(800));
    leading(&gemini, seen).await;
    let follower = call("hugo", Duration::from_millis(750));
    let leader = leader.await.unwrap().unwrap().into_inner();
    let follower = follower.await.unwrap().unwrap().into_inner();
    assert!(leader.degraded && follower.degraded, "{follower:?}");
    assert_eq!(
        follower.usage.unwrap_or_default().llm_calls,
        0,
        "shared, not recomputed: {follower:?}"
    );
    server.shutdown().await.unwrap();
}

/// When the computation a caller joined runs out of time (Gemini never answers in time and
/// fallback is disabled), nobody is told "after 0 of 0 chunks" and nobody without a chance
/// starts it again: a follower whose own deadline passes first is told that it waited for an
/// identical summary; one left with less time than the leader had in all is told the same at
/// once (DEADLINE_EXCEEDED without the leader's chunk counts), with no backend call of its own,
/// unless the leader finished a chunk: then it computes again from the cached chunk, asking
/// only for the other.
#[tokio::test]
async fn followers_of_a_computation_that_runs_out_of_time() {
    let db = Db::sqlite();
    let (gemini, server, channel) = slow_gemini(&db, Duration::from_secs(30), None).await;
    let call = |user, timeout| timed_call(&channel, user, true, timeout);

    // The follower's deadline comes before the leader's.
    let leader = call("ivan", Duration::from_millis(1500));
    leading(&gemini, 0).await;
    let follower = call("ivan", Duration::from_millis(300));
    let status = follower.await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status
            .message()
            .contains("waiting for an identical summary"),
        "{status:?}"
    );
    let status = leader.await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");

    // The follower outlives the leader, with less time left then than the leader had; first
    // with no chunk finished by the leader, then with one (the first call answers at once).
    for (user, answered, again) in [("judy", 0, 0), ("karl", 1, 1)] {
        let seen = gemini.fake.request_count();
        gemini.fake.push_faults((0..answered).map(|_| Fault::Ok));
        let leader = call(user, Duration::from_millis(1500));
        // The leader's two chunk calls.
        called(&gemini, seen + 2).await;
        // ~900 ms left when the leader's 1.5 s run out: less than the leader had, yet time
        // enough to start again from a cached chunk on a loaded machine.
        let follower = call(user, Duration::from_millis(2400));
        let status = leader.await.unwrap().unwrap_err();
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        let status = follower.await.unwrap().unwrap_err();
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        if again == 0 {
            // Told at once, without the leader's chunk counts, which are not its own.
            assert!(
                status
                    .message()
                    .contains("waiting for an identical summary"),
                "{status:?}"
            );
        }
        assert_eq!(
            gemini.fake.request_count(),
            seen + 2 + again,
            "{user}: calls of the follower's own"
        );
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn cache_rows_expire_and_are_pruned() {
    for db in databases().await {
        let store = insight_service::store::open(&DatabaseUrl::parse(db.url()).unwrap(), true)
            .await
            .unwrap();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let hour = Duration::from_secs(3600);
        for table in [CacheTable::Summary, CacheTable::Chunk] {
            store
                .cache_put(table, "k1", "v1", now, now + hour)
                .await
                .unwrap();
            store
                .cache_put(table, "k2", "v2", now, now + 2 * hour)
                .await
                .unwrap();
            // Replacing keeps one row.
            store
                .cache_put(table, "k2", "v2b", now, now + 2 * hour)
                .await
                .unwrap();
            assert_eq!(
                store.cache_get(table, "k1", now).await.unwrap().as_deref(),
                Some("v1")
            );
            assert_eq!(
                store.cache_get(table, "k1", now + hour).await.unwrap(),
                None
            );
            assert_eq!(
                store
                    .cache_get(table, "k2", now + hour)
                    .await
                    .unwrap()
                    .as_deref(),
                Some("v2b")
            );
        }
        assert_eq!(store.prune_cache(now + hour).await.unwrap(), 2);
        assert_eq!(store.prune_cache(now + 3 * hour).await.unwrap(), 2);
        assert_eq!(
            store.cache_get(CacheTable::Chunk, "k2", now).await.unwrap(),
            None
        );
    }
}

#[tokio::test]
async fn a_zero_ttl_turns_the_cache_off() {
    let db = Db::sqlite();
    let gemini = Gemini::start(KEY).await;
    let config = insight_service::Config {
        cache_ttl: Duration::ZERO,
        ..gemini.config(&db)
    };
    let server = start_insight(config).await;
    let mut client = InsightServiceClient::new(server.channel().await);
    let request = inline(entries("erin", 5, 0), pb::SummaryOptions::default());
    for _ in 0..2 {
        let summary = client
            .summarize_feedback(request.clone())
            .await
            .unwrap()
            .into_inner();
        assert!(!summary.cached);
    }
    assert_eq!(
        gemini.fake.request_count(),
        4,
        "one map and one reduce, twice"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_reply_over_the_message_limit_says_to_raise_the_chunk_size() {
    let db = Db::sqlite();
    let config = insight_service::Config {
        max_message_size: 64 * 1024,
        ..config(&db)
    };
    let server = start_insight(config).await;
    let mut client = InsightServiceClient::new(server.channel().await);
    // 500 one-entry chunks: a small request, but one chunk insight per entry in the reply.
    let many = entries("frank", 500, 0);
    let small_chunks = pb::SummaryOptions {
        chunk_size: Some(1),
        max_entries: Some(0),
        ..Default::default()
    };
    let status = client
        .summarize_feedback(inline(many.clone(), small_chunks))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("options.chunk_size"),
        "{status:?}"
    );
    // The same entries in chunks of 50 fit.
    let big_chunks = pb::SummaryOptions {
        chunk_size: Some(50),
        ..small_chunks
    };
    let summary = client
        .summarize_feedback(inline(many, big_chunks))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(summary.chunks.len(), 10);
    server.shutdown().await.unwrap();
}

/// A reply certain to exceed the message limit is refused as soon as its chunk insights alone
/// are over it, not after every chunk's backend call: 500 one-entry chunks whose Gemini
/// insights are ~300 bytes each pass a 64 KiB limit after about 220 chunks, and the
/// remaining calls are never made, in the unary call and in the stream (whose chunk events
/// up to there are still sent).
#[tokio::test]
async fn a_reply_certain_to_exceed_the_message_limit_stops_the_backend_calls() {
    let db = Db::sqlite();
    let gemini = Gemini::start(KEY).await;
    let long_insight = "Listeners say the ads interrupt their songs far too often. ".repeat(5);
    let answer = serde_json::json!({ "insight": long_insight.trim(), "themes": ["ads"] });
    gemini.fake.set_answer_fn(move |_| answer.to_string());
    let config = insight_service::Config {
        max_message_size: 64 * 1024,
        ..gemini.config(&db)
    };
    let server = start_insight(config).await;
    let mut client = InsightServiceClient::new(server.channel().await);
    let small_chunks = pb::SummaryOptions {
        chunk_size: Some(1),
        max_entries: Some(0),
        ..Default::default()
    };
    let refused = |status: &tonic::Status| {
        status.code() == Code::ResourceExhausted
            && status.message().contains("options.chunk_size")
            && status.message().contains("chunk insights alone")
    };

    let status = client
        .summarize_feedback(inline(entries("kate", 500, 0), small_chunks))
        .await
        .unwrap_err();
    assert!(refused(&status), "{status:?}");
    let calls = gemini.fake.request_count();
    assert!(
        (150..300).contains(&calls),
        "{calls} of 500 chunk calls made"
    );

    let mut stream = client
        .stream_feedback_summary(inline(entries("liam", 500, 0), small_chunks))
        .await
        .unwrap()
        .into_inner();
    let mut chunks = 0;
    let status = loop {
        match stream.message().await {
            Ok(Some(event)) => {
                assert!(
                    matches!(event.event, Some(pb::summary_event::Event::Chunk(_))),
                    "{event:?}"
                );
                chunks += 1;
            }
            Ok(None) => panic!("the stream ended without a status after {chunks} chunks"),
            Err(status) => break status,
        }
    };
    assert!(refused(&status), "{status:?}");
    assert!((150..300).contains(&chunks), "{chunks} chunk events");
    let calls = gemini.fake.request_count() - calls;
    assert!(
        (150..300).contains(&calls),
        "{calls} of 500 chunk calls made"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn entries_changed_during_a_selector_summary_do_not_get_its_answer_cached() {
    let db = Db::sqlite();
    let gemini = Gemini::start(KEY).await;
    gemini
        .fake
        .set_default_fault(Fault::Delay(Duration::from_millis(300)));
    let server = start_insight(gemini.config(&db)).await;
    let mut client = InsightServiceClient::new(server.channel().await);
    let original = entries("gina", 5, 1_700_000_000);
    import(&mut client, original.clone()).await;
    let request = selected(
        by_user("gina"),
        pb::SummaryOptions {
            max_entries: Some(0),
            ..Default::default()
        },
    );
    let mut racing = client.clone();
    let first = tokio::spawn({
        let request = request.clone();
        async move { racing.summarize_feedback(request).await }
    });
    // While its map call runs, one of its entries is re-imported with a new text.
    assert!(
        gemini
            .fake
            .wait_for_requests(1, Duration::from_secs(10))
            .await
    );
    let mut edited = original[2].clone();
    edited.text.push_str(" Update: fixed in the last release.");
    import(&mut client, vec![edited]).await;
    let first = first.await.unwrap().unwrap().into_inner();
    assert!(!first.cached);
    // Back to the original text: the selection is again the one the first request started
    // from, but which texts its answer saw cannot be known, so it was not cached at all.
    import(&mut client, original).await;
    let second = client
        .summarize_feedback(request)
        .await
        .unwrap()
        .into_inner();
    assert!(!second.cached, "{second:?}");
    // The chunk (original texts, keyed by its own content) was cached; the summary was not:
    // the second request makes only the reduce call.
    assert_eq!(gemini.fake.request_count(), 3, "map + reduce, then reduce");
    server.shutdown().await.unwrap();
}

/// A connection holding `table` locked (ACCESS EXCLUSIVE) until it runs ROLLBACK.
async fn lock_table(db: &Db, table: &str) -> sqlx::PgConnection {
    use sqlx::Connection;
    let mut locker = sqlx::PgConnection::connect(db.url()).await.unwrap();
    sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
    // A table name of the test's own, not input.
    let lock = format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE");
    sqlx::raw_sql(sqlx::AssertSqlSafe(lock))
        .execute(&mut locker)
        .await
        .unwrap();
    locker
}

/// `--cache-wait` reaches the cache: with the summary cache table locked, a cache read of a
/// server started with a 100 ms wait gives up after 100 ms and the summary is computed, well
/// before the 1 s default wait (or the fake's 5 s) would have let it.
#[tokio::test]
async fn the_cache_wait_flag_bounds_a_hung_cache_read() {
    let Some(db) = Db::postgres().await else {
        return;
    };
    let gemini = Gemini::start(KEY).await;
    let server = start_insight(insight_service::Config {
        cache_wait: Duration::from_millis(100),
        ..gemini.config(&db)
    })
    .await;
    let mut client = InsightServiceClient::new(server.channel().await);
    // The store opens (and creates its tables) on first use.
    client
        .summarize_feedback(ten_entries("nina", false))
        .await
        .unwrap();

    let mut locker = lock_table(&db, "summary_cache").await;
    let mut request = tonic::Request::new(ten_entries("mona", false));
    request.set_timeout(Duration::from_secs(8));
    let start = std::time::Instant::now();
    let summary = client.summarize_feedback(request).await;
    let elapsed = start.elapsed();
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    let summary = summary.unwrap().into_inner();
    assert_eq!(summary.backend, "gemini", "{summary:?}");
    assert!(!summary.cached);
    assert!(
        elapsed < Duration::from_millis(800),
        "answered after {elapsed:?}: the cache read waited longer than --cache-wait"
    );
    server.shutdown().await.unwrap();
}

/// The deadline layer bounds a handler until it returns its stream, not the stream: the work
/// behind a StreamFeedbackSummary (store reads included) must end at the deadline too. Here
/// the feedback table is locked, so reading the selection waits; the client sends no deadline,
/// so only the server's --request-timeout can end the call.
#[tokio::test]
async fn a_streamed_summary_waiting_on_the_store_ends_at_the_request_timeout() {
    let Some(db) = Db::postgres().await else {
        return;
    };
    let timeout = Duration::from_millis(800);
    let server = start_insight(insight_service::Config {
        request_timeout: timeout,
        ..config(&db)
    })
    .await;
    let mut client = InsightServiceClient::new(server.channel().await);
    import(&mut client, entries("locked", 12, 1_700_000_000)).await;

    let mut locker = lock_table(&db, "feedback").await;

    let start = std::time::Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        let mut stream = client
            .stream_feedback_summary(selected(by_user("locked"), pb::SummaryOptions::default()))
            .await?
            .into_inner();
        while stream.message().await?.is_some() {}
        Ok::<_, tonic::Status>(())
    })
    .await;
    let elapsed = start.elapsed();
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    let status = ended
        .expect("the stream was still open 10 s after its 800 ms request timeout")
        .expect_err("a summary of a locked table");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        elapsed < timeout + Duration::from_secs(2),
        "ended after {elapsed:?}"
    );
    server.shutdown().await.unwrap();
}
