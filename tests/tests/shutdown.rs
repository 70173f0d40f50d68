//! SIGTERM drain of the real binaries: health turns NOT_SERVING, an in-flight stream finishes,
//! new calls get UNAVAILABLE, and the process exits 0.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use spotifai_e2e::{Spawned, bin_path};
use spotifai_proto::{
    insight::{self as ipb, insight_service_client::InsightServiceClient},
    monitor::{self as mpb, memory_monitor_client::MemoryMonitorClient},
};
use tonic::{Code, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

async fn connect(url: String) -> Channel {
    Channel::from_shared(url).unwrap().connect().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn insight_sigterm_turns_not_serving_and_exits_zero() {
    let bin = bin_path("insight-service");
    // A scratch store: never an insight.db in the working directory.
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("insight.db").display());
    let mut child = Spawned::start(
        &bin,
        &[
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--shutdown-grace",
            "10s",
            "--database-url",
            &db,
        ],
    );
    let channel = connect(child.url()).await;
    let mut client = InsightServiceClient::new(channel.clone());
    let summary = client
        .summarize_feedback(ipb::SummarizeFeedbackRequest {
            input: Some(ipb::summarize_feedback_request::Input::Entries(
                ipb::FeedbackBatch {
                    entries: vec![ipb::FeedbackEntry {
                        id: "1".into(),
                        text: "Ads are far too frequent.".into(),
                        rating: 2,
                        ..Default::default()
                    }],
                },
            )),
            options: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(summary.entries_used, 1);

    let mut health = HealthClient::new(channel.clone());
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "spotifai.insight.v1.InsightService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );

    child.signal(libc::SIGTERM);
    let next = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next.status(), ServingStatus::NotServing);
    let code = tokio::task::spawn_blocking(move || child.wait_exit(Duration::from_secs(15)))
        .await
        .unwrap();
    assert_eq!(code, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn monitor_sigterm_finishes_the_stream_refuses_new_calls_and_exits_zero() {
    let bin = bin_path("monitor-service");
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("alerts.db").display());
    let mut child = Spawned::start(
        &bin,
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--shutdown-grace",
            "20s",
            "--database-url",
            &db,
        ],
    );
    let channel = connect(child.url()).await;
    let mut client = MemoryMonitorClient::new(channel.clone());
    let mut health = HealthClient::new(channel.clone());
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );

    // 100 ms interval for 1.5 s: 16 samples (t = 0, 100, ..., 1500).
    let mut stream = client
        .stream_samples(mpb::StreamSamplesRequest {
            interval_ms: 100,
            duration_ms: 1500,
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    child.signal(libc::SIGTERM);

    let not_serving = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(not_serving.status(), ServingStatus::NotServing);

    let refused = client
        .get_snapshot(mpb::SnapshotRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");

    // The in-flight stream runs to its natural end with OK.
    let mut seqs = vec![first.seq];
    while let Some(sample) = stream.message().await.unwrap() {
        seqs.push(sample.seq);
    }
    assert_eq!(seqs.len(), 16, "{seqs:?}");
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");

    let code = tokio::task::spawn_blocking(move || child.wait_exit(Duration::from_secs(15)))
        .await
        .unwrap();
    assert_eq!(code, Some(0));
}
