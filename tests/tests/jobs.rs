//! Background summary jobs over gRPC, on SQLite and PostgreSQL: submit returns QUEUED at once,
//! WatchJob streams the progress to a terminal state, GetJob returns the result, CancelJob
//! stops the LLM calls, and unknown or missing ids get NOT_FOUND / INVALID_ARGUMENT.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use spotifai_e2e::{
    db::Db,
    fakes::{Fault, RecordedRequest, SummaryGemini as Gemini},
    start_insight,
};
use spotifai_proto::insight::{
    self as pb, insight_service_client::InsightServiceClient, summarize_feedback_request::Input,
};
use tonic::Code;

const KEY: &str = "fake-gemini-key-jobs";

async fn databases() -> Vec<Db> {
    let mut dbs = vec![Db::sqlite()];
    dbs.extend(Db::postgres().await);
    dbs
}

/// The fake's defaults for job tests: one map call at a time (progress in steps), and a
/// short job poll so WatchJob sees changes quickly.
fn job_config(gemini: &Gemini, db: &Db) -> insight_service::Config {
    insight_service::Config {
        map_parallelism: 1,
        job_poll: Duration::from_millis(100),
        ..gemini.config(db)
    }
}

fn request(n: usize, tag: &str) -> pb::SummarizeFeedbackRequest {
    let entries = (0..n)
        .map(|i| pb::FeedbackEntry {
            id: format!("{tag}-{i}"),
            text: format!("Review {i} ({tag}): the ads interrupt my playlists."),
            rating: 2,
            ..Default::default()
        })
        .collect();
    pb::SummarizeFeedbackRequest {
        input: Some(Input::Entries(pb::FeedbackBatch { entries })),
        options: Some(pb::SummaryOptions {
            chunk_size: Some(5),
            max_entries: Some(0),
            ..Default::default()
        }),
    }
}

fn job_id(id: &str) -> pb::GetJobRequest {
    pb::GetJobRequest { id: id.to_owned() }
}

#[tokio::test]
async fn a_job_runs_in_the_background_and_its_progress_can_be_watched() {
    for db in databases().await {
        let gemini = Gemini::start(KEY).await;
        gemini
            .fake
            .set_default_fault(Fault::Delay(Duration::from_millis(100)));
        let server = start_insight(job_config(&gemini, &db)).await;
        let mut client = InsightServiceClient::new(server.channel().await);

        let job = client
            .submit_summary_job(request(20, "a"))
            .await
            .unwrap()
            .into_inner();
        assert!(!job.id.is_empty());
        // Returned at once: the workers have not even started the first call.
        assert_eq!(job.state(), pb::JobState::Queued, "{job:?}");

        let mut watch = client
            .watch_job(job_id(&job.id))
            .await
            .unwrap()
            .into_inner();
        let mut seen = Vec::new();
        while let Some(update) = watch.message().await.unwrap() {
            seen.push(update);
        }
        let last = seen.last().unwrap();
        assert_eq!(last.state(), pb::JobState::Succeeded, "{seen:?}");
        assert!(
            seen.iter().any(|j| j.state() == pb::JobState::Running),
            "{seen:?}"
        );
        // Progress only grows, and ends at 4 of 4 chunks.
        let done: Vec<u32> = seen
            .iter()
            .map(|j| j.progress.unwrap_or_default().chunks_done)
            .collect();
        assert!(done.windows(2).all(|w| w[0] <= w[1]), "{done:?}");
        assert_eq!(last.progress.unwrap().chunks_done, 4);
        assert_eq!(last.progress.unwrap().chunks_total, 4);

        let got = client.get_job(job_id(&job.id)).await.unwrap().into_inner();
        let result = got.result.expect("a result once SUCCEEDED");
        assert_eq!(result.entries_used, 20);
        assert_eq!(result.summary, "Listeners want fewer ads.");
        assert_eq!(gemini.fake.request_count(), 5, "4 maps + 1 reduce");

        // Watching a finished job sends it once and ends.
        let mut watch = client
            .watch_job(job_id(&job.id))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            watch.message().await.unwrap().unwrap().state(),
            pb::JobState::Succeeded
        );
        assert!(watch.message().await.unwrap().is_none());
        server.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn cancel_stops_the_llm_calls_of_a_running_job() {
    for db in databases().await {
        let gemini = Gemini::start(KEY).await;
        gemini
            .fake
            .set_default_fault(Fault::Delay(Duration::from_secs(2)));
        let server = start_insight(job_config(&gemini, &db)).await;
        let mut client = InsightServiceClient::new(server.channel().await);
        let job = client
            .submit_summary_job(request(20, "c"))
            .await
            .unwrap()
            .into_inner();
        // The first map call is in flight.
        assert!(
            gemini
                .fake
                .wait_for_requests(1, Duration::from_secs(10))
                .await
        );
        let cancelled = client
            .cancel_job(job_id(&job.id))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(cancelled.state(), pb::JobState::Cancelled);
        assert!(cancelled.error.contains("cancel"), "{cancelled:?}");
        // The call in flight is dropped (the fake sees the connection go), and no other starts.
        assert!(
            gemini
                .fake
                .wait_for_cancelled(1, Duration::from_secs(5))
                .await,
            "the in-flight LLM call was not cancelled"
        );
        let calls = gemini.fake.request_count();
        let got = client.get_job(job_id(&job.id)).await.unwrap().into_inner();
        assert_eq!(got.state(), pb::JobState::Cancelled);
        // Give a wrongly still-running worker time to make its next call (a map takes 2 s).
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            gemini.fake.request_count(),
            calls,
            "no call after CancelJob"
        );
        // Cancelling again changes nothing.
        let again = client
            .cancel_job(job_id(&job.id))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(again.state(), pb::JobState::Cancelled);
        server.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn unknown_and_missing_job_ids_are_refused_by_name() {
    let db = Db::sqlite();
    let gemini = Gemini::start(KEY).await;
    let server = start_insight(job_config(&gemini, &db)).await;
    let mut client = InsightServiceClient::new(server.channel().await);
    let unknown = job_id("job-does-not-exist");
    let statuses = [
        client.get_job(unknown.clone()).await.unwrap_err(),
        client.cancel_job(unknown.clone()).await.unwrap_err(),
        client.watch_job(unknown).await.unwrap_err(),
    ];
    for status in statuses {
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }
    let status = client.get_job(job_id(" ")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("id"), "{status:?}");
    // A bad request is refused at submit time, not stored as a job that fails later.
    let mut bad = request(3, "b");
    bad.options.as_mut().unwrap().chunk_size = Some(0);
    let status = client.submit_summary_job(bad).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("options.chunk_size"),
        "{status:?}"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_result_too_large_for_one_message_is_sent_without_its_chunk_insights() {
    let db = Db::sqlite();
    let gemini = Gemini::start(KEY).await;
    let config = insight_service::Config {
        max_message_size: 64 * 1024,
        map_parallelism: 8,
        ..job_config(&gemini, &db)
    };
    // Long chunk insights (50 words each).
    gemini.fake.set_answer_fn(|request: &RecordedRequest| {
        if request
            .system()
            .unwrap_or_default()
            .contains("combine summaries")
        {
            r#"{"summary": "Listeners want fewer ads.", "themes": ["ads"]}"#.to_owned()
        } else {
            let insight = "advertising ".repeat(50);
            format!(r#"{{"insight": "{}", "themes": ["ads"]}}"#, insight.trim())
        }
    });
    let server = start_insight(config).await;
    let mut client = InsightServiceClient::new(server.channel().await);
    // 500 one-entry chunks of ~600 bytes each: a summary of ~300 KB, over 64 KiB.
    let mut big = request(500, "big");
    big.options.as_mut().unwrap().chunk_size = Some(1);
    let job = client.submit_summary_job(big).await.unwrap().into_inner();
    let mut watch = client
        .watch_job(job_id(&job.id))
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(update) = watch.message().await.unwrap() {
        last = Some(update);
    }
    let last = last.unwrap();
    assert_eq!(last.state(), pb::JobState::Succeeded, "{last:?}");
    let got = client.get_job(job_id(&job.id)).await.unwrap().into_inner();
    let result = got.result.clone().expect("the result, without its chunks");
    assert!(result.chunks.is_empty());
    assert_eq!(result.entries_used, 500);
    assert!(!result.summary.is_empty());
    assert!(got.error.contains("result.chunks omitted"), "{got:?}");
    server.shutdown().await.unwrap();
}
