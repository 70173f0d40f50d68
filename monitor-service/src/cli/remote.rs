//! The client side of `watch --server` and `alerts`: subscribe through the generated tonic
//! client and hand each message to the [`Printer`].

use std::{error::Error as _, future::Future, io::Write, time::Duration};

use spotifai_proto::monitor::{
    self as pb, StreamAlertsRequest, StreamSamplesRequest,
    memory_monitor_client::MemoryMonitorClient,
};
use tonic::{
    Code, Status,
    transport::{Channel, Endpoint},
};

use super::{CliError, output::Printer};
use crate::config::MinSeverity;

/// How long to wait for the TCP connection: long enough for a port-forward or a busy node,
/// short enough that a black-holed address (a firewall dropping SYNs) fails while the user
/// still watches, instead of after the OS's two-minute retry budget.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A client of `server` (an `http://host:port` URL). The connection is made by the first call,
/// so a server that cannot be reached surfaces as that call's UNAVAILABLE status: one error
/// path for "unreachable" and "refused", both naming the gRPC status.
fn client(server: &str) -> Result<MemoryMonitorClient<Channel>, CliError> {
    let endpoint = Endpoint::from_shared(server.to_owned())
        .map_err(|error| CliError::BadServer {
            server: server.to_owned(),
            reason: error.to_string(),
        })?
        .connect_timeout(CONNECT_TIMEOUT);
    Ok(MemoryMonitorClient::new(endpoint.connect_lazy()))
}

fn rpc_error(server: &str, status: Status) -> CliError {
    CliError::Rpc {
        server: server.to_owned(),
        status: Box::new(status),
    }
}

/// Prints `server`'s StreamSamples (every `interval` for `duration`, 0 = endless) until the
/// server ends the stream (Ok), fails it (Err naming the status), or `stop` resolves (Ok).
pub async fn watch_server<W: Write>(
    server: &str,
    interval: Duration,
    duration: Duration,
    printer: &mut Printer<W>,
    stop: impl Future<Output = ()>,
) -> Result<(), CliError> {
    let request = StreamSamplesRequest {
        // The flag's parser bounds the interval to 24h, far below u32::MAX milliseconds; the
        // saturation only covers values built in code.
        interval_ms: u32::try_from(interval.as_millis()).unwrap_or(u32::MAX),
        duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
    };
    let mut client = client(server)?;
    let call = async {
        let mut stream = client
            .stream_samples(request)
            .await
            .map_err(|status| rpc_error(server, status))?
            .into_inner();
        while let Some(message) = stream
            .message()
            .await
            .map_err(|status| rpc_error(server, status))?
        {
            printer.server_sample(&message)?;
        }
        Ok(())
    };
    tokio::select! {
        // Interruption first: once the user asked to stop, nothing more is printed.
        biased;
        () = stop => Ok(()),
        result = call => result,
    }
}

/// Prints `server`'s StreamAlerts at or above `min_severity` until the server ends the stream
/// (Ok), fails it (Err; UNIMPLEMENTED becomes [`CliError::AlertsNotServed`]), or `stop`
/// resolves (Ok).
pub async fn tail_alerts<W: Write>(
    server: &str,
    min_severity: MinSeverity,
    printer: &mut Printer<W>,
    stop: impl Future<Output = ()>,
) -> Result<(), CliError> {
    let request = StreamAlertsRequest {
        min_severity: match min_severity {
            MinSeverity::Warning => pb::Severity::Warning,
            MinSeverity::Critical => pb::Severity::Critical,
        }
        .into(),
    };
    let error = |status: Status| {
        if status.code() == Code::Unimplemented {
            CliError::AlertsNotServed {
                server: server.to_owned(),
                status: Box::new(status),
            }
        } else {
            rpc_error(server, status)
        }
    };
    let mut client = client(server)?;
    let call = async {
        let mut stream = client
            .stream_alerts(request)
            .await
            .map_err(error)?
            .into_inner();
        while let Some(alert) = stream.message().await.map_err(error)? {
            printer.alert(&alert)?;
        }
        Ok(())
    };
    tokio::select! {
        biased;
        () = stop => Ok(()),
        result = call => result,
    }
}

/// The canonical upper-case name of a gRPC code, as grpcurl and the gRPC docs spell it
/// (tonic's `Display` gives a sentence instead).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// `CODE: message: cause: cause...` on one line. Transport failures carry the useful part
/// ("Connection refused") only in the source chain, so it is walked; a cause the message
/// already quotes is not repeated.
pub fn describe_status(status: &Status) -> String {
    let mut text = format!("{}: {}", code_name(status.code()), status.message());
    let mut source = status.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::{net::SocketAddr, pin::Pin, sync::Arc};

    use spotifai_proto::monitor::{
        ListAlertsRequest, ListAlertsResponse, MemoryAlert, MemorySample, SnapshotRequest,
        memory_monitor_server::{MemoryMonitor, MemoryMonitorServer},
    };
    use tokio::{net::TcpListener, sync::Mutex};
    use tokio_stream::{Stream, wrappers::TcpListenerStream};
    use tonic::{Request, Response};

    use super::*;

    type Items<T> = Vec<Result<T, Status>>;
    type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

    /// A MemoryMonitor that answers each stream with scripted items (or refuses it) and
    /// records the requests it got.
    #[derive(Default)]
    struct Fake {
        samples: Items<MemorySample>,
        alerts: Option<Items<MemoryAlert>>,
        /// Keep the stream open after the items (like an endless server stream).
        hold_open: bool,
        sample_requests: Arc<Mutex<Vec<StreamSamplesRequest>>>,
        alert_requests: Arc<Mutex<Vec<StreamAlertsRequest>>>,
    }

    fn scripted<T: Send + 'static>(items: Items<T>, hold_open: bool) -> BoxStream<T> {
        let items = tokio_stream::iter(items);
        if hold_open {
            Box::pin(tokio_stream::StreamExt::chain(
                items,
                tokio_stream::pending(),
            ))
        } else {
            Box::pin(items)
        }
    }

    #[tonic::async_trait]
    impl MemoryMonitor for Fake {
        async fn get_snapshot(
            &self,
            _: Request<SnapshotRequest>,
        ) -> Result<Response<MemorySample>, Status> {
            Err(Status::unimplemented("fake"))
        }

        type StreamSamplesStream = BoxStream<MemorySample>;

        async fn stream_samples(
            &self,
            request: Request<StreamSamplesRequest>,
        ) -> Result<Response<Self::StreamSamplesStream>, Status> {
            self.sample_requests.lock().await.push(request.into_inner());
            Ok(Response::new(scripted(
                self.samples.clone(),
                self.hold_open,
            )))
        }

        type StreamAlertsStream = BoxStream<MemoryAlert>;

        async fn stream_alerts(
            &self,
            request: Request<StreamAlertsRequest>,
        ) -> Result<Response<Self::StreamAlertsStream>, Status> {
            self.alert_requests.lock().await.push(request.into_inner());
            match &self.alerts {
                None => Err(Status::unimplemented("alerts are not available yet")),
                Some(items) => Ok(Response::new(scripted(items.clone(), self.hold_open))),
            }
        }

        async fn list_alerts(
            &self,
            _: Request<ListAlertsRequest>,
        ) -> Result<Response<ListAlertsResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }
    }

    async fn serve(fake: Fake) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(MemoryMonitorServer::new(fake))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }

    fn sample(seq: u64, dropped: u64) -> MemorySample {
        MemorySample {
            seq,
            dropped,
            level: pb::Level::Warning.into(),
            ..MemorySample::default()
        }
    }

    fn output(printer: Printer<Vec<u8>>) -> String {
        String::from_utf8(printer.into_inner()).unwrap()
    }

    #[tokio::test]
    async fn watch_prints_what_the_server_streams_and_asks_for_the_flags() {
        let requests = Arc::default();
        let server = serve(Fake {
            samples: vec![Ok(sample(1, 0)), Ok(sample(5, 3)), Ok(sample(6, 0))],
            sample_requests: Arc::clone(&requests),
            ..Fake::default()
        })
        .await;
        let mut printer = Printer::new(Vec::new(), false, false);
        watch_server(
            &server,
            Duration::from_millis(250),
            Duration::from_secs(3),
            &mut printer,
            std::future::pending(),
        )
        .await
        .unwrap();
        assert_eq!(
            *requests.lock().await,
            [StreamSamplesRequest {
                interval_ms: 250,
                duration_ms: 3000
            }]
        );
        let text = output(printer);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert!(lines[0].starts_with("TIME"), "{text}");
        assert!(lines[1].ends_with("WARNING"), "{text}");
        assert!(lines[2].contains("3 samples missed"), "{text}");
        assert!(lines[3].contains("  5  "), "{text}");
    }

    #[tokio::test]
    async fn watch_fails_with_the_servers_status() {
        let server = serve(Fake {
            samples: vec![
                Ok(sample(1, 0)),
                Err(Status::unavailable("server is shutting down")),
            ],
            ..Fake::default()
        })
        .await;
        let mut printer = Printer::new(Vec::new(), true, false);
        let error = watch_server(
            &server,
            Duration::from_secs(1),
            Duration::ZERO,
            &mut printer,
            std::future::pending(),
        )
        .await
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("server {server}: UNAVAILABLE: server is shutting down")
        );
        // What arrived before the error was printed.
        assert_eq!(output(printer).lines().count(), 1);
    }

    #[tokio::test]
    async fn watch_of_an_unreachable_server_names_it_and_the_status() {
        // Bound and dropped: nothing listens there any more.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let server = format!("http://{addr}");
        let mut printer = Printer::new(Vec::new(), false, false);
        let error = watch_server(
            &server,
            Duration::from_secs(1),
            Duration::ZERO,
            &mut printer,
            std::future::pending(),
        )
        .await
        .unwrap_err();
        let text = error.to_string();
        assert!(
            text.starts_with(&format!("server {server}: UNAVAILABLE: ")),
            "{text}"
        );
        assert!(!text.contains('\n'), "{text}");
        assert!(output(printer).is_empty());
    }

    #[tokio::test]
    async fn stop_ends_an_endless_stream_cleanly() {
        let server = serve(Fake {
            samples: vec![Ok(sample(1, 0))],
            hold_open: true,
            ..Fake::default()
        })
        .await;
        let mut printer = Printer::new(Vec::new(), true, false);
        let (stopped, stop) = tokio::sync::oneshot::channel::<()>();
        let stopper = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let _ = stopped.send(());
        });
        watch_server(
            &server,
            Duration::from_secs(1),
            Duration::ZERO,
            &mut printer,
            async {
                let _ = stop.await;
            },
        )
        .await
        .unwrap();
        stopper.await.unwrap();
        assert_eq!(output(printer).lines().count(), 1);
    }

    #[tokio::test]
    async fn alerts_prints_each_event_and_sends_the_severity() {
        let requests = Arc::default();
        let firing = MemoryAlert {
            id: "a1".to_owned(),
            severity: pb::Severity::Critical.into(),
            state: pb::AlertState::Firing.into(),
            metric: "oom_kills".to_owned(),
            value: 1.0,
            threshold: 0.0,
            message: "the kernel killed a process".to_owned(),
            recommendations: vec!["raise the limit".to_owned()],
            ..MemoryAlert::default()
        };
        let resolved = MemoryAlert {
            state: pb::AlertState::Resolved.into(),
            ..firing.clone()
        };
        let server = serve(Fake {
            alerts: Some(vec![Ok(firing), Ok(resolved)]),
            alert_requests: Arc::clone(&requests),
            ..Fake::default()
        })
        .await;
        let mut printer = Printer::new(Vec::new(), false, false);
        tail_alerts(
            &server,
            MinSeverity::Critical,
            &mut printer,
            std::future::pending(),
        )
        .await
        .unwrap();
        assert_eq!(
            *requests.lock().await,
            [StreamAlertsRequest {
                min_severity: pb::Severity::Critical.into()
            }]
        );
        let text = output(printer);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(
            lines[0].contains(
                "CRITICAL  FIRING    oom_kills 1 vs threshold 0  the kernel killed a process"
            ),
            "{text}"
        );
        assert_eq!(lines[1], "    - raise the limit");
        assert!(lines[2].contains("CRITICAL  RESOLVED"), "{text}");
    }

    #[tokio::test]
    async fn alerts_from_a_server_without_them_is_a_clear_error() {
        let server = serve(Fake::default()).await;
        let mut printer = Printer::new(Vec::new(), false, false);
        let error = tail_alerts(
            &server,
            MinSeverity::Warning,
            &mut printer,
            std::future::pending(),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(error, CliError::AlertsNotServed { .. }),
            "{error:?}"
        );
        let text = error.to_string();
        assert!(text.contains(&server), "{text}");
        assert!(text.contains("UNIMPLEMENTED"), "{text}");
    }

    #[test]
    fn statuses_read_as_code_and_message_on_one_line() {
        assert_eq!(
            describe_status(&Status::invalid_argument(
                "interval_ms must be\nat least 100"
            )),
            "INVALID_ARGUMENT: interval_ms must be at least 100"
        );
        assert_eq!(code_name(Code::DeadlineExceeded), "DEADLINE_EXCEEDED");
    }
}
