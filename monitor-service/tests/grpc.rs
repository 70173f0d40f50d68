//! The MemoryMonitor server in-process on 127.0.0.1:0, called through real gRPC clients.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use monitor_service::{
    config::ServeArgs,
    history::{DatabaseUrl, HistoryArgs},
};
use spotifai_proto::{
    MONITOR_SERVICE_NAME,
    monitor::{
        self as pb, SnapshotRequest, StreamSamplesRequest,
        memory_monitor_client::MemoryMonitorClient,
    },
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{Code, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

struct Server {
    channel: Channel,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), monitor_service::Error>>,
    /// Holds the alert history's SQLite file, so tests neither share nor leave one behind.
    _history: tempfile::TempDir,
}

impl Server {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let history = tempfile::tempdir().unwrap();
        let database = format!("sqlite://{}", history.path().join("alerts.db").display());
        let args = ServeArgs {
            shutdown_grace: Duration::from_secs(5),
            history: HistoryArgs {
                database_url: DatabaseUrl::parse(&database).unwrap(),
                ..HistoryArgs::default()
            },
            ..ServeArgs::default()
        };
        let task = tokio::spawn(monitor_service::run(listener, args, async {
            stopped.await.ok();
        }));
        // The listener is bound already, so connecting cannot race the server's start.
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Self {
            channel,
            stop: Some(stop),
            task,
            _history: history,
        }
    }

    fn monitor(&self) -> MemoryMonitorClient<Channel> {
        MemoryMonitorClient::new(self.channel.clone())
    }

    async fn shut_down(mut self) {
        if let Some(stop) = self.stop.take() {
            stop.send(()).unwrap();
        }
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

#[tokio::test]
async fn snapshot_reads_this_process_and_the_machine() {
    let server = Server::start().await;
    let mut client = server.monitor();
    let first = client
        .get_snapshot(SnapshotRequest {})
        .await
        .unwrap()
        .into_inner();
    let second = client
        .get_snapshot(SnapshotRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(second.seq > first.seq && first.seq >= 1);
    let process = first.process.unwrap();
    assert_eq!(process.pid, std::process::id());
    assert!(process.rss_bytes > 0);
    assert!(first.system.unwrap().total_bytes > 0);
    assert!(first.at.is_some());
    assert_ne!(first.level(), pb::Level::Unspecified);
    server.shut_down().await;
}

#[tokio::test]
async fn finite_stream_ends_ok_after_its_duration() {
    let server = Server::start().await;
    let mut stream = server
        .monitor()
        .stream_samples(StreamSamplesRequest {
            interval_ms: 100,
            duration_ms: 300,
        })
        .await
        .unwrap()
        .into_inner();
    let mut seqs = Vec::new();
    while let Some(sample) = stream.message().await.unwrap() {
        seqs.push(sample.seq);
    }
    // t = 0, 100, 200, 300 ms.
    assert_eq!(seqs.len(), 4, "{seqs:?}");
    assert!(seqs.windows(2).all(|pair| pair[0] < pair[1]), "{seqs:?}");
    server.shut_down().await;
}

#[tokio::test]
async fn too_short_interval_is_invalid_argument_naming_the_field() {
    let server = Server::start().await;
    let status = server
        .monitor()
        .stream_samples(StreamSamplesRequest {
            interval_ms: 50,
            duration_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("interval_ms"),
        "{}",
        status.message()
    );
    assert!(status.message().contains("50"), "{}", status.message());
    server.shut_down().await;
}

#[tokio::test]
async fn health_reports_serving_for_the_server_and_the_service() {
    let server = Server::start().await;
    let mut health = HealthClient::new(server.channel.clone());
    for service in ["", MONITOR_SERVICE_NAME] {
        let response = health
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.status(), ServingStatus::Serving, "{service:?}");
    }
    server.shut_down().await;
}

#[tokio::test]
async fn reflection_v1_and_v1alpha_list_every_service() {
    use tonic_reflection::pb::{v1, v1alpha};

    let server = Server::start().await;
    let expected = [
        MONITOR_SERVICE_NAME,
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];

    let mut client =
        v1::server_reflection_client::ServerReflectionClient::new(server.channel.clone());
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        responses.message().await.unwrap().unwrap().message_response
    else {
        panic!("not a list-services response");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for name in expected {
        assert!(
            names.iter().any(|n| n == name),
            "v1 lacks {name}: {names:?}"
        );
    }

    let mut client =
        v1alpha::server_reflection_client::ServerReflectionClient::new(server.channel.clone());
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        responses.message().await.unwrap().unwrap().message_response
    else {
        panic!("not a list-services response");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for name in expected {
        assert!(
            names.iter().any(|n| n == name),
            "v1alpha lacks {name}: {names:?}"
        );
    }
    server.shut_down().await;
}

#[tokio::test]
async fn shutdown_ends_endless_streams_with_unavailable_and_stops_promptly() {
    let server = Server::start().await;
    let mut stream = server
        .monitor()
        .stream_samples(StreamSamplesRequest {
            interval_ms: 0,
            duration_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());

    let started = tokio::time::Instant::now();
    let mut server = server;
    let stop = server.stop.take().unwrap();
    stop.send(()).unwrap();
    let status = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("stream ended with OK during shutdown"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // Well within the 5s grace: the stream did not hold the drain.
    tokio::time::timeout(Duration::from_secs(2), server.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn shutdown_lets_a_stream_that_ends_within_the_grace_finish_with_ok() {
    let mut server = Server::start().await;
    let mut stream = server
        .monitor()
        .stream_samples(StreamSamplesRequest {
            interval_ms: 100,
            duration_ms: 500,
        })
        .await
        .unwrap()
        .into_inner();
    let mut seqs = vec![stream.message().await.unwrap().unwrap().seq];
    server.stop.take().unwrap().send(()).unwrap();

    // New calls are refused while the stream drains...
    let mut refused = None;
    for _ in 0..50 {
        match server.monitor().get_snapshot(SnapshotRequest {}).await {
            Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(status) => {
                refused = Some(status);
                break;
            }
        }
    }
    assert_eq!(refused.unwrap().code(), Code::Unavailable);

    // ...and the stream still delivers every sample due (t = 0, 100, ..., 500) and ends OK.
    while let Some(sample) = stream.message().await.unwrap() {
        seqs.push(sample.seq);
    }
    assert_eq!(seqs.len(), 6, "{seqs:?}");
    tokio::time::timeout(Duration::from_secs(5), server.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
