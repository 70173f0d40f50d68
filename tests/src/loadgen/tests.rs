//! The load generator against an in-process echo server: what it counts must add up, and each
//! status must land under its own code. About 3 s in all.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use spotifai_proto::insight::FeedbackSummary;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::Code;

use super::*;

struct Echo {
    url: String,
    service: EchoInsight,
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Echo {
    async fn start(service: EchoInsight) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(serve_echo(listener, service.clone(), async {
            let _ = stopped.await;
        }));
        Self {
            url,
            service,
            stop: Some(stop),
            handle,
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.handle.await.unwrap().unwrap();
    }
}

fn request() -> SummarizeFeedback {
    SummarizeFeedback::new(summarize_request(&RequestSpec::default(), None))
}

fn summary() -> FeedbackSummary {
    FeedbackSummary {
        summary: "canned".to_owned(),
        backend: "echo".to_owned(),
        ..FeedbackSummary::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_counts_every_status_and_adds_up() {
    let echo =
        Echo::start(EchoInsight::new(summary()).fail_every(4, Code::ResourceExhausted)).await;
    let channels = connect(&echo.url, 3).await.unwrap();
    let config = LoadConfig {
        mode: Mode::Closed { concurrency: 4 },
        warmup: Duration::from_millis(100),
        duration: Duration::from_secs(1),
        ..LoadConfig::default()
    };
    let report = run(channels, Arc::new(request()), &config).await.unwrap();

    let requests = report.requests();
    assert!(
        requests > 100,
        "only {requests} calls in 1 s against an echo server"
    );
    let ok = report.ok();
    let exhausted = report.count(Code::ResourceExhausted);
    assert_eq!(ok + exhausted, requests, "{:?}", report.status_counts());
    assert_eq!(report.transport_errors(), 0);
    assert_eq!(report.unfinished(), 0);
    // Every 4th call the server received failed; the measured calls are a window of them, so
    // the share is a quarter give or take the calls around the window's edges.
    let share = exhausted as f64 / requests as f64;
    assert!(
        (0.2..0.3).contains(&share),
        "RESOURCE_EXHAUSTED share {share}"
    );
    // The server saw the warm-up calls too, and nothing else.
    assert_eq!(
        echo.service.calls(),
        requests + report.warmup_calls(),
        "calls the server received vs calls counted"
    );
    assert_eq!(report.ok_latency().count, ok);
    assert_eq!(report.all_latency().count, requests);
    assert!(report.ok_latency().p50 > 0);
    assert!(report.ok_latency().p99 >= report.ok_latency().p50);
    let json = report.to_json();
    assert_eq!(json["codes"]["RESOURCE_EXHAUSTED"], exhausted);
    assert_eq!(json["codes"]["OK"], ok);
    assert!(report.table().contains("RESOURCE_EXHAUSTED"));
    echo.stop().await;
}

/// A call sent during the warm-up that never ends is reported as a warm-up hang, not among
/// the measured calls the percentiles cover (it has no latency in the window to miss).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_up_call_that_never_ends_is_not_a_measured_one() {
    let echo = Echo::start(EchoInsight::new(summary())).await;
    let channels = connect(&echo.url, 1).await.unwrap();
    // The first call never ends; every other one is a real call to the echo server.
    let started = Arc::new(AtomicU64::new(0));
    let echo_rpc = Arc::new(request());
    let rpc = move |channel: Channel, timeout: Option<Duration>| {
        let first = started.fetch_add(1, Ordering::Relaxed) == 0;
        let echo_rpc = echo_rpc.clone();
        async move {
            if first {
                std::future::pending::<()>().await;
            }
            echo_rpc.call(channel, timeout).await
        }
    };
    let config = LoadConfig {
        mode: Mode::Closed { concurrency: 2 },
        warmup: Duration::from_millis(100),
        duration: Duration::from_millis(300),
        drain: Duration::from_millis(200),
        ..LoadConfig::default()
    };
    let report = run(channels, Arc::new(rpc), &config).await.unwrap();
    assert!(report.requests() > 10, "{}", report.table());
    assert_eq!(report.ok(), report.requests());
    assert_eq!(report.unfinished(), 0);
    assert_eq!(report.warmup_unfinished(), 1);
    let table = report.table();
    assert!(table.contains("warm-up unfinished"), "{table}");
    assert!(!table.contains("percentiles cover"), "{table}");
    assert_eq!(report.to_json()["warmup_unfinished"], 1);
    echo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_keeps_its_rate_and_charges_queueing_to_latency() {
    // 20 ms per call and at most 2 outstanding: 100 calls/s at best, while 200/s are scheduled.
    let echo = Echo::start(EchoInsight::new(summary()).with_delay(Duration::from_millis(20))).await;
    let channels = connect(&echo.url, 2).await.unwrap();
    let config = LoadConfig {
        mode: Mode::Open {
            rate: 200.0,
            max_outstanding: 2,
        },
        warmup: Duration::ZERO,
        duration: Duration::from_secs(1),
        ..LoadConfig::default()
    };
    let report = run(channels, Arc::new(request()), &config).await.unwrap();
    assert_eq!(report.ok(), report.requests());
    // Scheduled inside the window: 200; each either sent (and measured) or not sent.
    assert_eq!(report.requests() + report.not_sent, 200);
    assert!(report.not_sent > 50, "not sent: {}", report.not_sent);
    // Calls that waited for a slot are charged from their intended time: the worst one waited
    // for most of the window, far beyond the 20 ms service time.
    assert!(
        report.ok_latency().max > 300_000,
        "{:?}",
        report.ok_latency()
    );
    assert!(report.ok_latency().p50 >= 20_000);
    assert!(report.to_json()["target_rate"] == 200.0);
    // The table says the percentiles leave the unsent calls out.
    let coverage = format!("percentiles cover {} of 200 calls", report.requests());
    assert!(report.table().contains(&coverage), "{}", report.table());
    echo.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_deadline_counts_as_deadline_exceeded() {
    let echo =
        Echo::start(EchoInsight::new(summary()).with_delay(Duration::from_millis(200))).await;
    let channels = connect(&echo.url, 1).await.unwrap();
    // A closure as the RPC, which sends no grpc-timeout: only the driver's own deadline can
    // end the call, not the server's (tonic servers answer an expired grpc-timeout CANCELLED).
    let request = summarize_request(&RequestSpec::default(), None);
    let rpc = move |channel: tonic::transport::Channel, _timeout: Option<Duration>| {
        let request = request.clone();
        async move {
            spotifai_proto::insight::insight_service_client::InsightServiceClient::new(channel)
                .summarize_feedback(request)
                .await
                .map(drop)
        }
    };
    let config = LoadConfig {
        mode: Mode::Closed { concurrency: 2 },
        warmup: Duration::ZERO,
        duration: Duration::from_millis(300),
        timeout: Some(Duration::from_millis(50)),
        ..LoadConfig::default()
    };
    let report = run(channels, Arc::new(rpc), &config).await.unwrap();
    assert!(report.requests() >= 2);
    assert_eq!(
        report.count(Code::DeadlineExceeded),
        report.requests(),
        "{}",
        report.to_json()
    );
    assert!(
        report.all_latency().max < 150_000,
        "{:?}",
        report.all_latency()
    );
    echo.stop().await;
}

#[test]
fn tonic_enforcing_grpc_timeout_counts_as_deadline_exceeded() {
    // What tonic's channel returns when the grpc-timeout it sent expires first.
    let expired = tonic::Status::from_error(Box::new(tonic::TimeoutExpired(())));
    assert_eq!(expired.code(), Code::Cancelled);
    assert_eq!(
        Outcome::from_result(Err(expired)),
        Outcome::Status(Code::DeadlineExceeded)
    );
    // The same code sent by a server stays what it is.
    assert_eq!(
        Outcome::from_result(Err(tonic::Status::cancelled("server said so"))),
        Outcome::Status(Code::Cancelled)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_a_transport_error_not_a_status() {
    // A port that was just released: connecting is refused. A lazy channel defers the failure
    // to each call, as a server that went away mid-run does.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    // Connecting up front fails at once, and says why (tonic alone says "transport error").
    let error = connect(&url, 2).await.unwrap_err().to_string();
    assert!(error.contains("Connection refused"), "{error}");
    let channel = tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect_lazy();
    let config = LoadConfig {
        mode: Mode::Closed { concurrency: 2 },
        warmup: Duration::ZERO,
        duration: Duration::from_secs(1),
        max_requests: Some(20),
        ..LoadConfig::default()
    };
    let report = run(vec![channel], Arc::new(request()), &config)
        .await
        .unwrap();
    assert_eq!(report.requests(), 20);
    assert_eq!(report.transport_errors(), 20);
    assert!(
        report.status_counts().is_empty(),
        "{:?}",
        report.status_counts()
    );
    assert!(report.first_transport_error().is_some());
}

#[tokio::test]
async fn bad_configurations_are_refused() {
    let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
    let bad = [
        LoadConfig {
            mode: Mode::Closed { concurrency: 0 },
            ..LoadConfig::default()
        },
        LoadConfig {
            mode: Mode::Open {
                rate: f64::NAN,
                max_outstanding: 1,
            },
            ..LoadConfig::default()
        },
        LoadConfig {
            duration: Duration::ZERO,
            ..LoadConfig::default()
        },
    ];
    for config in bad {
        let result = run(vec![channel.clone()], Arc::new(HealthCheck), &config).await;
        assert!(matches!(result, Err(LoadError::Invalid(_))), "{config:?}");
    }
    assert!(matches!(
        run(Vec::new(), Arc::new(HealthCheck), &LoadConfig::default()).await,
        Err(LoadError::NoChannels)
    ));
}

#[test]
fn synthetic_requests_are_deterministic_and_review_sized() {
    let a = feedback_entries(200, None);
    assert_eq!(a, feedback_entries(200, None));
    let mean = a.iter().map(|e| e.text.len()).sum::<usize>() as f64 / a.len() as f64;
    assert!((40.0..120.0).contains(&mean), "mean length {mean}");
    let mut ids: Vec<_> = a.iter().map(|e| e.id.clone()).collect();
    ids.dedup();
    assert_eq!(ids.len(), 200);
    let reviews = vec![("r1".to_owned(), "Great app".to_owned(), 5)];
    let cycled = feedback_entries(3, Some(&reviews));
    let ids: Vec<_> = cycled.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["r1", "r1#1", "r1#2"]);
}

/// The overload benchmark's bare tonic server answers the standard health check SERVING, and
/// stopping it (on drop) ends its threads once its callers are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_health_server_answers_serving_and_stops_on_drop() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let server = BareHealthServer::start().expect("start the bare server");
    let url = server.url().to_owned();
    let channel = connect(&url, 1).await.expect("connect").remove(0);
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .expect("health check")
        .into_inner();
    assert_eq!(answer.status(), ServingStatus::Serving);
    // The client is gone; the drop must return (it joins the server's thread).
    tokio::task::spawn_blocking(move || drop(server))
        .await
        .expect("stop the bare server");
    assert!(
        connect(&url, 1).await.is_err(),
        "the port still accepts connections after the server stopped"
    );
}
