//! Overload protection end to end: a real tonic server (`start_insight` on 127.0.0.1:0) with a
//! tuned `Config`, generated tonic clients, and a fake Gemini on loopback whose answers are
//! slow, so calls really occupy the server. Every assertion is on what a caller or the backend
//! sees: status codes, ErrorInfo reasons, RetryInfo, health statuses, what the fake received.
//!
//! Proves:
//! - concurrency: N running + Q queued + 1 simultaneous heavy calls → exactly the one excess
//!   call is refused RESOURCE_EXHAUSTED (CONCURRENCY_LIMIT, with RetryInfo), the others
//!   succeed, and health checks and cheap reads answer while every heavy slot is taken; with
//!   `--overload-protection off` the same burst is admitted whole (the control);
//! - deadlines reach the backend call: with a caller's deadline or `--request-timeout` and a
//!   Gemini slower than either, the in-flight Gemini request is dropped before the deadline
//!   (the fake sees it cancelled), no further backend request is made, and the local fallback
//!   answers in time (degraded); a heavy call stuck before its handler (its message never
//!   comes) ends DEADLINE_EXCEEDED at `--request-timeout`, never UNKNOWN, freeing its slot;
//! - memory admission: a request whose estimate exceeds the free budget is refused
//!   MEMORY_BUDGET with a positive RetryInfo delay (none when it exceeds the whole budget and
//!   can never be admitted) while small ones pass, decided from the 5-byte length
//!   prefix before the body is read (a body that never comes is not waited for); budget held
//!   by a running call is released when it ends; a message over `--max-message-size` is
//!   refused MESSAGE_TOO_LARGE, also from the prefix, without waiting for the body, and a
//!   light call's message over 64 KiB likewise; a body without its message or cut inside one is
//!   INVALID_ARGUMENT (never tonic's INTERNAL), and one that stops sending ends
//!   DEADLINE_EXCEEDED after `--recv-timeout`, freeing its slot;
//! - readiness: under an injected cgroup memory reading at 95% of the limit the health status
//!   of `spotifai.insight.v1.InsightService` turns NOT_SERVING while "" stays SERVING, and heavy
//!   calls are shed MEMORY_PRESSURE; back at 50% both are SERVING and calls succeed.
//!
//! Timing: waits are on events (the fake's request/cancel notifications, health Watch
//! streams, task completion) with generous timeouts; durations are asserted only as bounds
//! far from the event they separate (2 s deadlines against a 5 s backend delay).

#![allow(clippy::unwrap_used, missing_docs)]

use std::{future::Future, path::Path, time::Duration};

use futures::StreamExt;
use insight_service::{
    Config,
    admission::estimator::estimate,
    config::{BackendKind, Switch},
};
use prost::Message;
use spotifai_e2e::{
    fake_cgroup::{FakeCgroup, calm_probe_root},
    fakes::{FakeLlm, Fault, Outcome, RecordedRequest},
    start_insight, start_monitor,
};
use spotifai_proto::{
    INSIGHT_SERVICE_NAME,
    insight::{
        self as pb, insight_service_client::InsightServiceClient, summarize_feedback_request::Input,
    },
};
use tokio::{task::JoinSet, time::Instant};
use tonic::{Code, Status, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_types::StatusExt;

const KEY: &str = "overload-e2e-key";
/// Upper bound on waiting for something that should happen at once (a refusal, a health
/// change, a cancellation): generous, because this 2-core machine is shared and noisy.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Scheduling slack allowed past a deadline.
const SLACK: Duration = Duration::from_millis(1500);
/// How long the backend holds a call that must stay in flight while the test looks around.
const HOLD: Duration = Duration::from_millis(1500);
/// Backend latency of calls that only need to be slow-ish.
const QUICK: Duration = Duration::from_millis(200);

/// Awaits `future`, failing with `what` instead of hanging if it takes over [`EVENT_TIMEOUT`].
async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(EVENT_TIMEOUT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out after {EVENT_TIMEOUT:?}: {what}"))
}

/// Answers map prompts with a chunk insight and reduce prompts with a summary, in the JSON
/// shapes the pipeline asks for (the reduce prompt fences its data as `<<<CHUNK n>>>`).
fn answer(request: &RecordedRequest) -> String {
    if request.system().unwrap_or_default().contains("<<<CHUNK") {
        r#"{"summary": "Listeners want fewer ads.", "themes": ["ads"]}"#.to_owned()
    } else {
        r#"{"insight": "Ads interrupt songs too often.", "themes": ["ads"]}"#.to_owned()
    }
}

/// What a test needs alive while its server runs: the files the server reads live in
/// temporary directories removed on drop.
struct Setup {
    config: Config,
    fake: Option<FakeLlm>,
    _files: Vec<tempfile::TempDir>,
}

impl Setup {
    fn fake(&self) -> &FakeLlm {
        self.fake.as_ref().unwrap()
    }
}

/// The server defaults with the pressure probe pointed at an empty tree (a usage ratio of 0,
/// so the load of the machine running the tests never sheds a call) and an explicit budget
/// (what --memory-budget 0 would derive depends on the machine).
fn calm(mut config: Config, probe_root: &Path) -> Config {
    config.probe_proc_root = probe_root.to_path_buf();
    config.probe_cgroup_root = probe_root.to_path_buf();
    config.memory_budget = 256 << 20;
    config
}

/// The local backend, calm probe.
fn local() -> Setup {
    let probe = calm_probe_root();
    Setup {
        config: calm(Config::default(), probe.path()),
        fake: None,
        _files: vec![probe],
    }
}

/// The gemini backend against a fake Gemini, key from a file (not the process env, which
/// tests running in parallel share), no retries so every backend request is one the test
/// accounts for; calm probe.
async fn gemini() -> Setup {
    let fake = FakeLlm::gemini().await;
    fake.require_api_key(KEY);
    fake.set_answer_fn(answer);
    let files = tempfile::tempdir().unwrap();
    let key_file = files.path().join("gemini.key");
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();
    let config = Config {
        llm_backend: BackendKind::Gemini,
        llm_base_url: Some(fake.base_url()),
        llm_api_key_file: Some(key_file),
        llm_max_retries: 0,
        ..Config::default()
    };
    Setup {
        config: calm(config, files.path()),
        fake: Some(fake),
        _files: vec![files],
    }
}

/// A summary request of `count` entries of about `text_bytes` bytes each, all summarized
/// (`max_entries` 0 = the server cap).
fn summarize(count: usize, text_bytes: usize) -> pb::SummarizeFeedbackRequest {
    let sentence = "Too many ads between songs, and shuffle repeats the same tracks. ";
    let entries = (0..count)
        .map(|i| {
            let mut text = format!("Review {i}: ");
            while text.len() < text_bytes {
                text.push_str(sentence);
            }
            text.truncate(text_bytes.max(12));
            pb::FeedbackEntry {
                id: format!("fb-{i:05}"),
                text,
                rating: 2,
                ..Default::default()
            }
        })
        .collect();
    pb::SummarizeFeedbackRequest {
        input: Some(Input::Entries(pb::FeedbackBatch { entries })),
        options: Some(pb::SummaryOptions {
            max_entries: Some(0),
            ..Default::default()
        }),
    }
}

/// The ErrorInfo reason of a status, if it carries one.
fn reason(status: &Status) -> Option<String> {
    status
        .get_error_details()
        .error_info()
        .map(|info| info.reason.clone())
}

/// The RetryInfo delay of a status, if it carries one.
fn retry_delay(status: &Status) -> Option<Duration> {
    status
        .get_error_details()
        .retry_info()
        .and_then(|info| info.retry_delay)
}

/// Asserts a RESOURCE_EXHAUSTED refusal with `expected` as ErrorInfo reason.
fn assert_refused(status: &Status, expected: &str) {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(status).as_deref(), Some(expected), "{status:?}");
}

/// The health status of `service`, by Check.
async fn health_of(channel: &Channel, service: &str) -> ServingStatus {
    let mut health = HealthClient::new(channel.clone());
    let response = within("health check", async {
        health
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
    })
    .await;
    response.unwrap().into_inner().status()
}

/// A health Watch of the insight service's readiness status.
async fn readiness_of(
    channel: &Channel,
) -> tonic::Streaming<tonic_health::pb::HealthCheckResponse> {
    HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: INSIGHT_SERVICE_NAME.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// A small summary goes through whole.
async fn assert_summarizes(client: &mut InsightServiceClient<Channel>) {
    let summary = client
        .summarize_feedback(summarize(3, 100))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(summary.entries_used, 3);
}

/// Reads a health Watch stream until it reports `expected`.
async fn watch_until(
    stream: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
    expected: ServingStatus,
) {
    within(&format!("health Watch reporting {expected:?}"), async {
        loop {
            let update = stream.message().await.unwrap().expect("watch ended");
            if update.status() == expected {
                return;
            }
        }
    })
    .await;
}

/// Reads a health Watch stream for `period` and fails if it reports anything but `expected`.
async fn watch_stays(
    stream: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
    expected: ServingStatus,
    period: Duration,
) {
    let end = tokio::time::Instant::now() + period;
    while let Ok(update) = tokio::time::timeout_at(end, stream.message()).await {
        let update = update.unwrap().expect("watch ended");
        assert_eq!(
            update.status(),
            expected,
            "the status changed within {period:?}"
        );
    }
}

/// Starts `count` SummarizeFeedback calls of one entry at once on `channel`.
fn burst(
    channel: &Channel,
    count: usize,
) -> JoinSet<Result<tonic::Response<pb::FeedbackSummary>, Status>> {
    let mut calls = JoinSet::new();
    for call in 0..count {
        let mut client = InsightServiceClient::new(channel.clone());
        // Distinct texts: identical concurrent requests would be computed once (and answered
        // from the cache after), so they would not each take a slot to the backend.
        let mut request = summarize(1, 80);
        if let Some(Input::Entries(batch)) = request.input.as_mut() {
            batch.entries[0].text = format!("Call {call}. {}", batch.entries[0].text);
        }
        calls.spawn(async move { client.summarize_feedback(request).await });
    }
    calls
}

/// Backend requests still waiting for their answer.
fn pending(fake: &FakeLlm) -> usize {
    fake.requests()
        .iter()
        .filter(|r| r.outcome == Outcome::Pending)
        .count()
}

// ---------------------------------------------------------------------------------------------
// Concurrency limit

#[tokio::test]
async fn the_concurrency_limit_refuses_exactly_the_excess_and_cheap_calls_still_answer() {
    const N: usize = 2;
    const Q: usize = 2;
    let setup = gemini().await;
    let fake = setup.fake();
    // The N calls that get a slot hold it: their map calls (the first backend requests; queued
    // calls cannot reach the backend) answer only after HOLD, so all N+Q+1 calls arrive while
    // the slots and the queue are taken. Every later backend call is quick.
    fake.push_faults(std::iter::repeat_n(Fault::Delay(HOLD), N));
    fake.set_default_fault(Fault::Delay(QUICK));
    let server = start_insight(Config {
        max_concurrency: N as u32,
        queue_depth: Q as u32,
        // Long, so the queued calls wait for a slot rather than time out.
        queue_timeout: Duration::from_secs(30),
        ..setup.config.clone()
    })
    .await;
    let channel = server.channel().await;

    let mut calls = burst(&channel, N + Q + 1);
    // The refusal is immediate, so it is the first call to end, before any admitted one.
    let first = within("the first call to end", calls.join_next())
        .await
        .unwrap()
        .unwrap();
    let status = first.expect_err("the first call to end must be the refused excess");
    assert_refused(&status, "CONCURRENCY_LIMIT");
    assert!(
        retry_delay(&status).is_some_and(|d| d > Duration::ZERO),
        "RetryInfo with a delay: {status:?}"
    );

    // The admitted calls reach the backend; the queued ones do not (no slot).
    assert!(fake.wait_for_requests(N, EVENT_TIMEOUT).await);
    // While every heavy slot is taken and the queue is full, health and cheap reads answer.
    assert_eq!(health_of(&channel, "").await, ServingStatus::Serving);
    assert_eq!(
        health_of(&channel, INSIGHT_SERVICE_NAME).await,
        ServingStatus::Serving
    );
    let mut client = InsightServiceClient::new(channel.clone());
    let list = within("ListFeedback", async {
        client
            .list_feedback(pb::ListFeedbackRequest::default())
            .await
    })
    .await;
    // Answered by its handler (an empty page of the test's scratch store), not refused.
    assert!(list.unwrap().into_inner().entries.is_empty());
    assert_eq!(
        (fake.request_count(), pending(fake)),
        (N, N),
        "the cheap calls were answered while the admitted calls still held their slots"
    );

    // Every admitted call, running or queued, succeeds.
    let mut ok = 0;
    while let Some(joined) = within("the admitted calls", calls.join_next()).await {
        let summary = joined.unwrap().unwrap().into_inner();
        assert_eq!(summary.entries_used, 1);
        assert_eq!(summary.backend, "gemini");
        ok += 1;
    }
    assert_eq!(ok, N + Q);
    // One map and one reduce per admitted call; none from the refused one.
    assert_eq!(fake.request_count(), 2 * (N + Q));
    drop(client);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn callers_whose_deadline_passes_in_the_queue_give_their_place_back() {
    // One slot and one queue place. Before the fix, a queued caller dropped by its deadline
    // kept its place: after one such caller, every later one was refused at once.
    let setup = gemini().await;
    let fake = setup.fake();
    fake.push_faults([Fault::Delay(HOLD)]);
    fake.set_default_fault(Fault::Delay(QUICK));
    let server = start_insight(Config {
        max_concurrency: 1,
        queue_depth: 1,
        queue_timeout: Duration::from_secs(30),
        ..setup.config.clone()
    })
    .await;
    let channel = server.channel().await;
    let mut calls = burst(&channel, 1);
    assert!(fake.wait_for_requests(1, EVENT_TIMEOUT).await);

    // Three callers in turn take the queue place and give up at their 100 ms deadline.
    for call in 0..3 {
        let mut client = InsightServiceClient::new(channel.clone());
        let mut request = tonic::Request::new(summarize(1, 80 + call));
        request.set_timeout(Duration::from_millis(100));
        let status = within(
            "a queued call with a short deadline",
            client.summarize_feedback(request),
        )
        .await
        .expect_err("no slot is free before its deadline");
        assert_eq!(
            status.code(),
            Code::DeadlineExceeded,
            "call {call}: {status:?}"
        );
    }

    // The place is free: the next caller waits in it and gets the slot when the first call ends.
    let mut client = InsightServiceClient::new(channel.clone());
    let queued = within(
        "a queued call",
        client.summarize_feedback(summarize(1, 200)),
    )
    .await
    .expect("queued, then admitted, not refused");
    assert_eq!(queued.into_inner().entries_used, 1);
    let first = within("the first call", calls.join_next())
        .await
        .unwrap()
        .unwrap();
    assert!(first.is_ok(), "{first:?}");
    drop(client);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn with_overload_protection_off_the_same_burst_is_admitted_whole() {
    const N: usize = 2;
    const Q: usize = 2;
    let setup = gemini().await;
    let fake = setup.fake();
    fake.push_faults(std::iter::repeat_n(Fault::Delay(HOLD), N + Q + 1));
    fake.set_default_fault(Fault::Delay(QUICK));
    let server = start_insight(Config {
        overload_protection: Switch::Off,
        max_concurrency: N as u32,
        queue_depth: Q as u32,
        ..setup.config.clone()
    })
    .await;
    let channel = server.channel().await;

    let mut calls = burst(&channel, N + Q + 1);
    // Nothing limits them: all N+Q+1 map calls are at the backend at the same time.
    assert!(fake.wait_for_requests(N + Q + 1, EVENT_TIMEOUT).await);
    assert_eq!(pending(fake), N + Q + 1);
    let mut ok = 0;
    while let Some(joined) = within("the calls", calls.join_next()).await {
        joined.unwrap().unwrap();
        ok += 1;
    }
    assert_eq!(ok, N + Q + 1);
    server.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Deadlines
//
// A remote backend call gets the request's deadline less some headroom (a fifth of what is
// left, at most 500 ms; `pipeline::mapreduce::with_headroom`), so that the local fallback can
// still answer within the deadline. So with a backend slower than the deadline the caller
// gets a degraded answer in time, and the backend request is dropped before the deadline.

/// Checks that the one backend request was dropped by the server before `deadline` (counted
/// from `start`), and that no other backend request follows.
async fn assert_backend_call_cancelled(fake: &FakeLlm, start: Instant, deadline: Duration) {
    assert!(
        fake.wait_for_cancelled(1, EVENT_TIMEOUT).await,
        "the in-flight Gemini request was never cancelled"
    );
    let seen = start.elapsed();
    assert!(
        seen < deadline + SLACK,
        "the backend call was cancelled only after {seen:?}, for a {deadline:?} deadline; \
         the fake would have answered at 5 s"
    );
    // Absence cannot be awaited: give a retry or a reduce call time to show up.
    assert!(
        !fake.wait_for_requests(2, Duration::from_millis(500)).await,
        "a backend request was made after the deadline: {:?}",
        fake.requests()
    );
    assert_eq!(fake.requests()[0].outcome, Outcome::Cancelled);
}

/// Checks that `summary` came from the local fallback after Gemini was cut off.
fn assert_fallback(summary: &pb::FeedbackSummary) {
    assert!(summary.degraded, "{summary:?}");
    assert_eq!(summary.backend, "local (fallback from gemini)");
    assert_eq!(summary.entries_used, 1);
    assert!(!summary.summary.is_empty());
}

/// Deadline of the deadline tests: long enough that the headroom (400 ms) dwarfs scheduling
/// noise, far below the fake's 5 s answer.
const DEADLINE: Duration = Duration::from_secs(2);

#[tokio::test]
async fn a_client_deadline_reaches_the_backend_call_and_the_fallback_answers_in_time() {
    let setup = gemini().await;
    let fake = setup.fake();
    fake.set_default_fault(Fault::Delay(Duration::from_secs(5)));
    let server = start_insight(setup.config.clone()).await;
    let mut client = InsightServiceClient::new(server.channel().await);

    let mut request = tonic::Request::new(summarize(1, 80));
    request.set_timeout(DEADLINE);
    let start = Instant::now();
    let result = within("the call", client.summarize_feedback(request)).await;
    let elapsed = start.elapsed();
    // Answered before the deadline: tonic's client enforces the grpc-timeout itself and would
    // report CANCELLED "Timeout expired" had the server been late.
    let summary = result.unwrap().into_inner();
    assert!(elapsed < DEADLINE, "answered after {elapsed:?}");
    assert_fallback(&summary);
    assert_backend_call_cancelled(fake, start, DEADLINE).await;
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_server_request_timeout_reaches_the_backend_call_too() {
    let setup = gemini().await;
    let fake = setup.fake();
    fake.set_default_fault(Fault::Delay(Duration::from_secs(5)));
    let server = start_insight(Config {
        request_timeout: DEADLINE,
        ..setup.config.clone()
    })
    .await;
    let mut client = InsightServiceClient::new(server.channel().await);

    // No client deadline: only the server's --request-timeout bounds the call.
    let start = Instant::now();
    let summary = within("the call", client.summarize_feedback(summarize(1, 80)))
        .await
        .unwrap()
        .into_inner();
    let elapsed = start.elapsed();
    assert!(elapsed < DEADLINE + SLACK, "answered after {elapsed:?}");
    assert_fallback(&summary);
    assert_backend_call_cancelled(fake, start, DEADLINE).await;
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_call_stuck_before_its_handler_ends_deadline_exceeded_at_the_request_timeout() {
    let setup = local();
    let timeout = Duration::from_millis(400);
    let server = start_insight(Config {
        request_timeout: timeout,
        max_concurrency: 1,
        ..setup.config.clone()
    })
    .await;
    let channel = server.channel().await;

    // A heavy call whose message never comes holds the only slot, waiting in memory admission
    // for its length prefix. No client deadline: the server's deadline layer must end it, with
    // DEADLINE_EXCEEDED (tower's own timeout error would have become UNKNOWN).
    let start = Instant::now();
    let status = within("the stalled call", stalled_call(&channel, None)).await;
    let elapsed = start.elapsed();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        elapsed >= timeout - Duration::from_millis(50) && elapsed < timeout + SLACK,
        "ended after {elapsed:?} for a {timeout:?} request timeout"
    );
    // Ending it freed the slot.
    let mut client = InsightServiceClient::new(channel.clone());
    let summary = client
        .summarize_feedback(summarize(1, 80))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(summary.entries_used, 1);
    server.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Memory admission

/// The estimate the server computes for `request`, from the same settings `run` uses.
fn server_estimate(config: &Config, request: &pb::SummarizeFeedbackRequest) -> u64 {
    estimate(request.encoded_len() as u64, &config.estimator_config())
}

/// A 1 MiB budget, with one map call in flight and 64 KiB responses so that a small request
/// costs well under it (with a remote backend, the defaults' in-flight term alone, 4 x 3 x
/// 1 MiB, would not fit).
fn small_budget(config: Config) -> Config {
    Config {
        memory_budget: 1 << 20,
        map_parallelism: 1,
        llm_max_response_bytes: 64 << 10,
        ..config
    }
}

#[tokio::test]
async fn memory_admission_refuses_what_the_budget_can_never_hold_without_retry_info() {
    let setup = local();
    let config = small_budget(setup.config.clone());
    let small = summarize(3, 200);
    let large = summarize(300, 1_000);
    assert!(server_estimate(&config, &small) < config.memory_budget);
    assert!(server_estimate(&config, &large) > config.memory_budget);
    let server = start_insight(config).await;
    let mut client = InsightServiceClient::new(server.channel().await);

    let summary = client
        .summarize_feedback(small.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(summary.entries_used, 3);

    // Larger than the whole budget: it can never be admitted, so no RetryInfo (a client that
    // honours it would retry forever); the message says what to change. (A call refused only
    // for now gets a delay: `budget_held_by_a_running_call_is_released_when_it_ends`.)
    let status = client.summarize_feedback(large).await.unwrap_err();
    assert_refused(&status, "MEMORY_BUDGET");
    assert_eq!(retry_delay(&status), None, "{status:?}");
    assert!(
        status.message().contains("can never be admitted"),
        "{status:?}"
    );

    // Decided from the 5-byte length prefix, before any of the body is buffered: a request
    // that announces 1 MiB (under --max-message-size) and never sends it is refused at once.
    let status = within(
        "the prefix-only call",
        stalled_call(&server.channel().await, Some(1 << 20)),
    )
    .await;
    assert_refused(&status, "MEMORY_BUDGET");

    // Nothing of the refused calls was kept: small calls still pass.
    let summary = client.summarize_feedback(small).await.unwrap().into_inner();
    assert_eq!(summary.entries_used, 3);
    server.shutdown().await.unwrap();
}

/// AnalyzeMusic by user id is a request of a few bytes that reads up to 100,000 stored plays:
/// the pages and the statistics' counts (`music::stored_stats_bytes`, about 40 MB at their
/// largest) are reserved before reading, and given back when the analysis ends.
#[tokio::test]
async fn an_analysis_of_stored_plays_reserves_its_reading_before_it_reads() {
    let by_user = |user_id: &str| pb::AnalyzeMusicRequest {
        input: Some(pb::analyze_music_request::Input::UserId(user_id.to_owned())),
        ..Default::default()
    };
    let setup = local();
    let reading = insight_service::music::stored_stats_bytes(
        insight_service::music::DEFAULT_MAX_PLAYS,
        "nobody".len(),
    );
    // A budget that holds one reading (and the small message), not two.
    let config = Config {
        memory_budget: reading + reading / 2,
        ..setup.config.clone()
    };
    let server = start_insight(config).await;
    let mut client = InsightServiceClient::new(server.channel().await);
    // Reserved, read (no plays: NOT_FOUND), released: twice in a row.
    for _ in 0..2 {
        let status = client.analyze_music(by_user("nobody")).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }
    // Bad input hears why, whatever the budget.
    let status = client.analyze_music(by_user(" ")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    server.shutdown().await.unwrap();

    // A budget that cannot hold the reading: refused before the store is read.
    let server = start_insight(small_budget(setup.config.clone())).await;
    let mut client = InsightServiceClient::new(server.channel().await);
    let status = client.analyze_music(by_user("nobody")).await.unwrap_err();
    assert_refused(&status, "MEMORY_BUDGET");
    server.shutdown().await.unwrap();

    // One that holds the reading alone but not beside the message's own charge, which the
    // call holds meanwhile: refused for good, without a delay to wait for.
    let server = start_insight(Config {
        memory_budget: reading + 1,
        ..setup.config.clone()
    })
    .await;
    let mut client = InsightServiceClient::new(server.channel().await);
    let status = client.analyze_music(by_user("nobody")).await.unwrap_err();
    assert_refused(&status, "MEMORY_BUDGET");
    assert_eq!(retry_delay(&status), None, "{status:?}");
    server.shutdown().await.unwrap();
}

/// prost decodes every element of a repeated field before validation sees how many there are,
/// and an empty entry is 2 bytes on the wire but 128 decoded: the gate counts the entries in
/// the encoded message and charges them before the handler decodes it. 500,000 empty entries
/// (1 MB) pass the estimate made from the prefix (7.5 MB) and are refused once counted
/// (256 MB); the server stays up and answers the next call.
#[tokio::test]
async fn many_tiny_entries_are_charged_for_what_they_decode_to_before_decoding() {
    let setup = local();
    let config = Config {
        memory_budget: 64 << 20,
        ..setup.config.clone()
    };
    let swarm = pb::SummarizeFeedbackRequest {
        input: Some(Input::Entries(pb::FeedbackBatch {
            entries: vec![pb::FeedbackEntry::default(); 500_000],
        })),
        options: None,
    };
    assert!(server_estimate(&config, &swarm) < config.memory_budget);
    let server = start_insight(config).await;
    let mut client = InsightServiceClient::new(server.channel().await);
    let status = client.summarize_feedback(swarm).await.unwrap_err();
    assert_refused(&status, "MEMORY_BUDGET");
    assert_summarizes(&mut client).await;
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn budget_held_by_a_running_call_is_released_when_it_ends() {
    let setup = gemini().await;
    let fake = setup.fake();
    let config = small_budget(setup.config.clone());
    // One of these fits the budget, two at once do not.
    let request = summarize(10, 450);
    let one = server_estimate(&config, &request);
    assert!(one < config.memory_budget && 2 * one > config.memory_budget);
    // The first call's map request is held; everything after answers at once.
    fake.push_fault(Fault::Delay(HOLD));
    let server = start_insight(config).await;
    let channel = server.channel().await;

    let mut first_client = InsightServiceClient::new(channel.clone());
    let first_request = request.clone();
    let first = tokio::spawn(async move { first_client.summarize_feedback(first_request).await });
    // Admitted, so its reservation is held, and running at the backend.
    assert!(fake.wait_for_requests(1, EVENT_TIMEOUT).await);

    let mut client = InsightServiceClient::new(channel.clone());
    let status = client
        .summarize_feedback(request.clone())
        .await
        .unwrap_err();
    assert_refused(&status, "MEMORY_BUDGET");
    let delay = retry_delay(&status).expect("RetryInfo");
    assert!(
        delay >= Duration::from_millis(50) && delay <= Duration::from_secs(10),
        "a delay a client can act on: {delay:?}"
    );
    assert_eq!(pending(fake), 1, "refused while the first call was running");

    within("the first call", first).await.unwrap().unwrap();
    // Released when the first call ended. The server drops the reservation with the response
    // body, which can trail the client's receipt of the trailers by a scheduler tick, so a
    // refusal here is retried once after its RetryInfo delay, as a client should.
    let again = match client.summarize_feedback(request.clone()).await {
        Err(status) if reason(&status).as_deref() == Some("MEMORY_BUDGET") => {
            eprintln!("refused once right after the first call ended: {status:?}");
            tokio::time::sleep(retry_delay(&status).unwrap_or(HOLD)).await;
            client.summarize_feedback(request).await
        }
        other => other,
    };
    assert_eq!(again.unwrap().into_inner().entries_used, 10);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn oversized_messages_are_refused_from_their_length_prefix() {
    let setup = local();
    let server = start_insight(Config {
        max_message_size: 64 << 10,
        ..setup.config.clone()
    })
    .await;
    let channel = server.channel().await;
    let mut client = InsightServiceClient::new(channel.clone());

    // ~100 KB, over the 64 KiB limit.
    let over = summarize(100, 1_000);
    assert!(over.encoded_len() > 64 << 10);
    let status = client.summarize_feedback(over).await.unwrap_err();
    assert_refused(&status, "MESSAGE_TOO_LARGE");
    assert!(
        status.message().contains("--max-message-size"),
        "{status:?}"
    );

    // 8 MiB: answered promptly, with the same refusal.
    let huge = summarize(1_024, 8 * 1_024);
    assert!(huge.encoded_len() > 8 << 20);
    let start = Instant::now();
    let status = within("the 8 MiB call", client.summarize_feedback(huge))
        .await
        .unwrap_err();
    assert_refused(&status, "MESSAGE_TOO_LARGE");
    assert!(start.elapsed() < SLACK, "took {:?}", start.elapsed());

    // The proof that nothing waits for the body: a request that sends only the 5-byte prefix
    // announcing 8 MiB, then never another byte. A server that buffered the message first
    // would wait forever; this one answers from the prefix alone.
    let status = within(
        "the prefix-only call",
        stalled_call(&channel, Some(8 << 20)),
    )
    .await;
    assert_refused(&status, "MESSAGE_TOO_LARGE");

    // A message under the limit still passes.
    let summary = client
        .summarize_feedback(summarize(5, 200))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(summary.entries_used, 5);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_client_with_no_window_that_never_reads_loses_the_connection_and_the_slot() {
    // A stream window of 0: not one byte of the answer can be sent.
    let mut request = summarize(15, 200);
    if let Some(Input::Entries(batch)) = request.input.as_mut() {
        batch.entries[0].text = "Never read. Ads between every song.".into();
    }
    unread_answer_frees_its_slot(0, request, Rpc::Unary).await;
}

#[tokio::test]
async fn a_client_with_an_ordinary_window_that_stops_reading_loses_the_connection_too() {
    // A 64 KiB stream window and an answer several times larger: with a byte of window free
    // hyper hands h2 a whole frame, so an answer sent as one frame would be queued in h2
    // whole, its body would end and release the slot, and the answer would sit unaccounted
    // for as long as the client stayed connected.
    let mut request = summarize(3_000, 200);
    if let Some(options) = request.options.as_mut() {
        options.chunk_size = Some(5);
    }
    unread_answer_frees_its_slot(64 << 10, request, Rpc::Unary).await;
}

#[tokio::test]
async fn a_client_that_stops_reading_a_summary_stream_loses_the_connection_too() {
    // StreamFeedbackSummary: 600 chunk insights, each its own message, then the summary; the
    // client reads none of them and its 64 KiB window fills while the stream still holds the
    // slot.
    let mut request = summarize(3_000, 200);
    if let Some(options) = request.options.as_mut() {
        options.chunk_size = Some(5);
    }
    unread_answer_frees_its_slot(64 << 10, request, Rpc::Stream).await;
}

/// Which RPC an unread answer comes from.
#[derive(Clone, Copy, Debug)]
enum Rpc {
    /// SummarizeFeedback: one message.
    Unary,
    /// StreamFeedbackSummary: a message per chunk, then the summary.
    Stream,
}

impl Rpc {
    fn path(self) -> &'static str {
        match self {
            Rpc::Unary => "/spotifai.insight.v1.InsightService/SummarizeFeedback",
            Rpc::Stream => "/spotifai.insight.v1.InsightService/StreamFeedbackSummary",
        }
    }

    /// Bytes of the whole answer to `request` (messages with their 5-byte prefixes), read by
    /// an ordinary client.
    async fn answer_bytes(
        self,
        client: &mut InsightServiceClient<Channel>,
        request: &pb::SummarizeFeedbackRequest,
    ) -> usize {
        match self {
            Rpc::Unary => {
                let answer = client.summarize_feedback(request.clone()).await.unwrap();
                5 + answer.into_inner().encoded_len()
            }
            Rpc::Stream => {
                let mut events = client
                    .stream_feedback_summary(request.clone())
                    .await
                    .unwrap()
                    .into_inner();
                let mut total = 0;
                while let Some(event) = events.message().await.unwrap() {
                    total += 5 + event.encoded_len();
                }
                total
            }
        }
    }
}

/// One heavy slot, no queue. A client whose stream window is `window` sends `request` and
/// never reads the answer: hyper holds what does not fit and waits for window that never
/// comes. Before --send-timeout the call kept its slot for as long as the client stayed
/// connected, refusing every other heavy call; now the connection is closed and the slot freed.
async fn unread_answer_frees_its_slot(
    window: u32,
    request: pb::SummarizeFeedbackRequest,
    rpc: Rpc,
) {
    const SEND_TIMEOUT: Duration = Duration::from_secs(2);
    let setup = local();
    let server = start_insight(Config {
        max_concurrency: 1,
        queue_depth: 0,
        send_timeout: SEND_TIMEOUT,
        ..setup.config.clone()
    })
    .await;
    // Connected first, so that the refusal below comes well inside SEND_TIMEOUT.
    let channel = server.channel().await;
    let mut client = InsightServiceClient::new(channel.clone());
    let answer_bytes = rpc.answer_bytes(&mut client, &request).await;
    // With no window nothing is sent; with some, hyper takes a slice beyond what fits.
    let must_exceed = if window == 0 {
        0
    } else {
        window as usize + (32 << 10)
    };
    assert!(
        answer_bytes > must_exceed,
        "the answer ({answer_bytes} B) must not fit the window ({window} B) and a slice or two"
    );

    let stalled = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .initial_stream_window_size(Some(window))
        .connect()
        .await
        .unwrap();
    // The response headers come once the handler has answered (a unary call, from the cache:
    // the same request) or started (a stream): from then on the body holds the slot.
    let response = within(
        "the unread call's headers",
        raw_call(&stalled, rpc.path(), &request),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers().get("grpc-status").is_none(),
        "an answer, not a refusal: {response:?}"
    );
    let held_since = Instant::now();
    let status = client
        .summarize_feedback(summarize(3, 100))
        .await
        .expect_err("the slot is held by the unread answer");
    assert_refused(&status, "CONCURRENCY_LIMIT");

    // Within --send-timeout and a scan period the connection is closed, the slot is free and
    // heavy calls are answered again.
    let summary = within("a heavy call after the stall", async {
        loop {
            match client.summarize_feedback(summarize(3, 100)).await {
                Ok(summary) => break summary.into_inner(),
                Err(status) => {
                    assert_refused(&status, "CONCURRENCY_LIMIT");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
    .await;
    assert_eq!(summary.entries_used, 3);
    let freed_after = held_since.elapsed();
    assert!(
        freed_after >= SEND_TIMEOUT / 2,
        "freed after {freed_after:?}: before the send timeout, by something else"
    );
    // The unread answer is cut off with its connection: an error, never the trailers.
    use http_body::Body as _;
    let mut body = response.into_body();
    let end = within("the unread body", async {
        loop {
            match std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await {
                Some(Ok(frame)) if frame.is_data() => continue,
                other => break other,
            }
        }
    })
    .await;
    assert!(
        matches!(end, Some(Err(_))),
        "the closed connection ends the unread body with an error: {end:?}"
    );
    // Only that connection was closed: this one still answers.
    assert_eq!(health_of(&channel, "").await, ServingStatus::Serving);
    server.shutdown().await.unwrap();
}

/// The gRPC status of a raw call's response: from its headers (trailers-only) or, after
/// reading the body, from its trailers.
async fn raw_status(response: tonic::codegen::http::Response<tonic::body::Body>) -> Status {
    use http_body::Body as _;
    if let Some(status) = Status::from_header_map(response.headers()) {
        return status;
    }
    let mut body = response.into_body();
    let trailers = within("the response body", async {
        loop {
            let frame = std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx));
            match frame.await {
                Some(Ok(frame)) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        return trailers;
                    }
                }
                other => panic!("the body ended without trailers: {other:?}"),
            }
        }
    })
    .await;
    Status::from_header_map(&trailers).expect("a gRPC status in the trailers")
}

#[tokio::test]
async fn bodies_that_end_early_or_stop_get_their_status_and_light_calls_take_small_messages() {
    let setup = local();
    let recv_timeout = Duration::from_millis(300);
    let server = start_insight(Config {
        recv_timeout,
        max_concurrency: 1,
        ..small_budget(setup.config.clone())
    })
    .await;
    let channel = server.channel().await;
    let get_job = "/spotifai.insight.v1.InsightService/GetJob";
    let invalid = |status: Status, reason: &str| {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(reason), "{status:?}");
    };
    // No message at all, heavy and light: INVALID_ARGUMENT (tonic alone answers INTERNAL
    // "Missing request message").
    for path in [Rpc::Unary.path(), get_job] {
        let response = send_raw(&channel, path, axum::body::Body::empty()).await;
        invalid(raw_status(response).await, "no request message");
    }
    // A message cut short by the end of the body (tonic alone: INTERNAL "Unexpected EOF").
    let mut cut = vec![0u8, 0, 0, 0, 100];
    cut.extend_from_slice(&[0x0a; 10]);
    for path in [Rpc::Unary.path(), get_job] {
        let response = send_raw(&channel, path, axum::body::Body::from(cut.clone())).await;
        invalid(raw_status(response).await, "ended inside a message");
    }
    // A compressed message (this server accepts none): tonic's UNIMPLEMENTED naming what it
    // accepts, not INVALID_ARGUMENT "not a valid protobuf message" from counting gzip bytes.
    let gzipped = vec![1u8, 0, 0, 0, 3, 0x1f, 0x8b, 0x08];
    let response = send_raw_with(
        &channel,
        Rpc::Unary.path(),
        &[("grpc-encoding", "gzip")],
        axum::body::Body::from(gzipped),
    )
    .await;
    let status = raw_status(response).await;
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    assert!(status.message().contains("gzip"), "{status:?}");
    // A heavy call whose body stops after its prefix holds the only slot for
    // --recv-timeout, not --request-timeout (120 s): DEADLINE_EXCEEDED, then the slot is free.
    let start = Instant::now();
    let status = within("the stalled call", stalled_call(&channel, Some(1_000))).await;
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("--recv-timeout"), "{status:?}");
    assert!(
        start.elapsed() >= recv_timeout - Duration::from_millis(50),
        "ended after {:?}",
        start.elapsed()
    );
    let mut client = InsightServiceClient::new(channel.clone());
    let summary = client.summarize_feedback(summarize(1, 80)).await.unwrap();
    assert_eq!(summary.into_inner().entries_used, 1);
    // A light call takes no slot and no budget, so its message is held to 64 KiB: a 600 KB
    // job id is refused before tonic buffers it (without the limit: NOT_FOUND, after
    // buffering and decoding it).
    let status = client
        .get_job(pb::GetJobRequest {
            id: "j".repeat(600_000),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status).as_deref(), Some("MESSAGE_TOO_LARGE"));
    // A small one is not.
    let status = client
        .get_job(pb::GetJobRequest {
            id: "j".repeat(1_000),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    server.shutdown().await.unwrap();
}

/// Sends `request` to the method at `path` over `channel` and returns the response as soon
/// as its headers arrive, without reading its body.
async fn raw_call(
    channel: &Channel,
    path: &str,
    request: &pb::SummarizeFeedbackRequest,
) -> tonic::codegen::http::Response<tonic::body::Body> {
    let mut message = vec![0u8];
    message.extend_from_slice(&(request.encoded_len() as u32).to_be_bytes());
    request.encode(&mut message).unwrap();
    send_raw(channel, path, axum::body::Body::from(message)).await
}

/// Sends a SummarizeFeedback whose body is the 5-byte gRPC length prefix announcing
/// `announced` bytes (nothing at all for `None`) and then never another byte, and returns the
/// status of the (trailers-only) answer.
async fn stalled_call(channel: &Channel, announced: Option<u32>) -> Status {
    let prefix = announced.map(|len| {
        let mut prefix = vec![0u8];
        prefix.extend_from_slice(&len.to_be_bytes());
        Ok::<_, std::io::Error>(bytes::Bytes::from(prefix))
    });
    let body = futures::stream::iter(prefix).chain(futures::stream::pending());
    let response = send_raw(
        channel,
        Rpc::Unary.path(),
        axum::body::Body::from_stream(body),
    )
    .await;
    Status::from_header_map(response.headers()).expect("a trailers-only gRPC status")
}

/// A call of the method at `path` with `body` as its raw gRPC request body (length-prefixed
/// messages); the response as soon as its headers arrive.
async fn send_raw(
    channel: &Channel,
    path: &str,
    body: axum::body::Body,
) -> tonic::codegen::http::Response<tonic::body::Body> {
    send_raw_with(channel, path, &[], body).await
}

/// [`send_raw`] with more request `headers`.
async fn send_raw_with(
    channel: &Channel,
    path: &str,
    headers: &[(&str, &str)],
    body: axum::body::Body,
) -> tonic::codegen::http::Response<tonic::body::Body> {
    use tonic::codegen::{Service, http};
    let mut request = http::Request::builder()
        .method(http::Method::POST)
        .uri(path)
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(tonic::body::Body::new(body)).unwrap();
    let mut channel = channel.clone();
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .unwrap();
    channel.call(request).await.unwrap()
}

// ---------------------------------------------------------------------------------------------
// Readiness under memory pressure

#[tokio::test]
async fn readiness_flips_under_injected_memory_pressure_and_back() {
    let cgroup = FakeCgroup::new(1 << 30, 0.50);
    let server = start_insight(Config {
        probe_proc_root: cgroup.proc_root(),
        probe_cgroup_root: cgroup.cgroup_root(),
        pressure_interval: Duration::from_millis(50),
        ..Config::default()
    })
    .await;
    let channel = server.channel().await;
    let mut client = InsightServiceClient::new(channel.clone());
    let mut readiness = readiness_of(&channel).await;
    watch_until(&mut readiness, ServingStatus::Serving).await;
    client.summarize_feedback(summarize(3, 100)).await.unwrap();

    // 95% of the limit: above the 90% critical ratio.
    cgroup.set_usage(0.95);
    watch_until(&mut readiness, ServingStatus::NotServing).await;
    // Liveness is untouched: restarting would not free memory sooner.
    assert_eq!(health_of(&channel, "").await, ServingStatus::Serving);
    let status = client
        .summarize_feedback(summarize(3, 100))
        .await
        .unwrap_err();
    assert_refused(&status, "MEMORY_PRESSURE");
    assert!(retry_delay(&status).is_some(), "{status:?}");

    // 88%: below the 90% critical ratio but inside the hysteresis band (critical is left
    // below 85.5%, 5% under the threshold), so it keeps
    // shedding (over ten probe intervals) rather than flapping at the threshold.
    cgroup.set_usage(0.88);
    watch_stays(
        &mut readiness,
        ServingStatus::NotServing,
        Duration::from_millis(600),
    )
    .await;
    let status = client
        .summarize_feedback(summarize(3, 100))
        .await
        .unwrap_err();
    assert_refused(&status, "MEMORY_PRESSURE");

    // 50%: well below the hysteresis band, back to normal.
    cgroup.set_usage(0.50);
    watch_until(&mut readiness, ServingStatus::Serving).await;
    assert_eq!(health_of(&channel, "").await, ServingStatus::Serving);
    assert_summarizes(&mut client).await;

    drop(readiness);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_server_started_under_critical_pressure_is_not_ready_from_its_first_answer() {
    // A pod restarted into a nearly full cgroup: the first sample, taken before the server
    // listens, decides the starting level. The next sample is a minute away, so a server that
    // started at Normal and waited for it would answer SERVING here.
    let cgroup = FakeCgroup::new(1 << 30, 0.95);
    let server = start_insight(Config {
        probe_proc_root: cgroup.proc_root(),
        probe_cgroup_root: cgroup.cgroup_root(),
        pressure_interval: Duration::from_secs(60),
        ..Config::default()
    })
    .await;
    let channel = server.channel().await;
    assert_eq!(
        health_of(&channel, INSIGHT_SERVICE_NAME).await,
        ServingStatus::NotServing
    );
    assert_eq!(health_of(&channel, "").await, ServingStatus::Serving);
    let status = InsightServiceClient::new(channel.clone())
        .summarize_feedback(summarize(3, 100))
        .await
        .unwrap_err();
    assert_refused(&status, "MEMORY_PRESSURE");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_calm_probe_root_reads_no_pressure_whatever_the_machine_uses() {
    // The calm root has its own meminfo: the probe must not fall back to the host's.
    let root = calm_probe_root();
    let mut probe = monitor_service::probe::Probe::new(monitor_service::probe::ProbeConfig {
        proc_root: root.path().to_path_buf(),
        cgroup_root: root.path().to_path_buf(),
        pids: Vec::new(),
        warn_ratio: 0.8,
        critical_ratio: 0.9,
    });
    let sample = probe.sample();
    assert_eq!(sample.usage_ratio, 0.0, "{sample:?}");
    assert_eq!(sample.system.total_bytes, 16 << 30);
}

/// `--monitor-url`: a monitor-service's firing CRITICAL alert sheds like local pressure and
/// turns readiness NOT_SERVING; its RESOLVED restores both; and a monitor that goes away
/// leaves the service as its own probe sees it (calm here), serving.
#[tokio::test]
async fn a_monitors_critical_alert_sheds_too_and_losing_the_monitor_changes_nothing_else() {
    // The monitor watches a group of its own (a fixture tree), alerts without dwell.
    let watched = FakeCgroup::new(1 << 30, 0.50);
    let (proc_root, cgroup_root) = (watched.proc_root(), watched.cgroup_root());
    let monitor = start_monitor(&[
        "--proc-root",
        proc_root.to_str().unwrap(),
        "--cgroup-root",
        cgroup_root.to_str().unwrap(),
        "--dwell",
        "0s",
        "--default-interval",
        "100ms",
    ])
    .await;
    // The service's own probe reads a calm tree: only the monitor can raise its level.
    let probe = calm_probe_root();
    let server = start_insight(Config {
        monitor_url: Some(monitor.url()),
        pressure_interval: Duration::from_millis(50),
        ..calm(Config::default(), probe.path())
    })
    .await;
    let channel = server.channel().await;
    let mut client = InsightServiceClient::new(channel.clone());
    let mut readiness = readiness_of(&channel).await;
    watch_until(&mut readiness, ServingStatus::Serving).await;

    watched.set_usage(0.95);
    watch_until(&mut readiness, ServingStatus::NotServing).await;
    assert_eq!(health_of(&channel, "").await, ServingStatus::Serving);
    let status = client
        .summarize_feedback(summarize(3, 100))
        .await
        .unwrap_err();
    assert_refused(&status, "MEMORY_PRESSURE");

    watched.set_usage(0.50);
    watch_until(&mut readiness, ServingStatus::Serving).await;
    client.summarize_feedback(summarize(3, 100)).await.unwrap();

    // Critical again, then the monitor goes away: its alerts no longer count.
    watched.set_usage(0.95);
    watch_until(&mut readiness, ServingStatus::NotServing).await;
    monitor.shutdown().await.unwrap();
    watch_until(&mut readiness, ServingStatus::Serving).await;
    assert_summarizes(&mut client).await;

    drop(readiness);
    server.shutdown().await.unwrap();
}
