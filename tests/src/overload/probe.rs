//! A latency probe that is not itself under load.
//!
//! The load generator that offers 10× or 30× the sustainable rate is a busy client: its two
//! runtime workers copy each 3 MB request into tonic's encode buffer, push 20–65 such bodies a
//! second over 8 connections and serve the fake Gemini. A refusal it times from the call's
//! start therefore includes however long its own workers took to get round to the answer,
//! which on two shared cores is often more than the server took to send it. The probe asks the
//! same server the same questions from a thread of its own (a current-thread runtime, its own
//! HTTP/2 connection, calls on a fixed schedule), so what it times is the server and the
//! network path, as a caller that is not itself overloaded would see them:
//!
//! - a `grpc.health.v1.Health/Check` at a fixed rate (what the cheapest answer costs now);
//! - optionally, at its own fixed rate, the load's own SummarizeFeedback request (the same
//!   encoded bytes, sent without tonic's encode copy: the 5-byte frame header and the message
//!   are one prebuilt buffer that h2 slices into DATA frames), timed from the call's start to
//!   the response headers. A refusal is trailers-only, so that is the moment the caller knows.
//!   These calls carry a short deadline of their own ([`ProbeConfig::request_deadline`]): one
//!   the server queues or admits instead of refusing ends DEADLINE_EXCEEDED within it, so the
//!   probe takes no lasting share of the slots it measures (an admitted call with the load's
//!   deadline holds one for seconds) and is counted apart. Should one be answered OK all the
//!   same, its answer counts as goodput like any load call's: it is the same request.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    future::{Future, poll_fn},
    pin::Pin,
    task::{Context, Poll},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use bytes::{BufMut, Bytes, BytesMut};
use http_body::{Body as _, Frame, SizeHint};
use prost::Message;
use spotifai_proto::insight::FeedbackSummary;
use tokio::task::JoinSet;
use tonic::{
    Code, Status,
    body::Body,
    codegen::http::{self, HeaderMap, HeaderValue},
    transport::Channel,
};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_types::StatusExt;
use tower::{Service, ServiceExt};

use super::{SUMMARIZE_PATH, SummarizeRaw, refusal_reason};
use crate::loadgen::{self, LoadError, Percentiles, micros, new_histogram, request_with_timeout};

/// What the probe sends, and for how long.
#[derive(Clone, Debug)]
pub struct ProbeConfig {
    /// Health checks per second.
    pub health_rate: f64,
    /// Load requests per second (0: none).
    pub refusal_rate: f64,
    /// The measurement window: calls are made from the probe's start until its end, and the
    /// ones started inside it are recorded (the load's warm-up comes before it).
    pub window: (Instant, Instant),
    /// The health checks' deadline.
    pub deadline: Duration,
    /// The deadline of the probe's own load requests: short, so that one the server does not
    /// refuse ends soon (see the module documentation).
    pub request_deadline: Duration,
}

/// What the probe measured inside the window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProbeReport {
    /// Health checks answered (whatever serving status), latency in µs from the call's start.
    pub health: Percentiles,
    /// Health checks that failed (any status but OK, a transport error, or no answer within
    /// the deadline), and scheduled ones not sent because too many were still unanswered.
    pub health_failed: u64,
    /// Load requests refused with RESOURCE_EXHAUSTED, latency in µs from the call's start to
    /// the response headers. Refusals that waited out `--queue-timeout` are not in it (they
    /// are slow by design); they are counted under their reason.
    pub refusals: Percentiles,
    /// Every RESOURCE_EXHAUSTED by ErrorInfo reason, QUEUE_TIMEOUT included.
    pub refusal_reasons: BTreeMap<String, u64>,
    /// Load requests the server admitted and answered OK.
    pub admitted: u64,
    /// Load requests that ended any other way, by status (or "transport"): DEADLINE_EXCEEDED
    /// for the ones the server queued or admitted instead of refusing.
    pub other: BTreeMap<String, u64>,
    /// Scheduled load requests not sent because the probe already had
    /// [`MAX_PROBES_IN_FLIGHT`] of them running.
    pub skipped: u64,
    /// Whether the probe's thread ran in the real-time class (see `raise_priority`).
    pub realtime: bool,
}

impl ProbeReport {
    /// "p50 / p99" of the health checks in milliseconds, with the failed ones when there are.
    pub fn health_latency(&self) -> String {
        let latency = format!(
            "{} / {}",
            loadgen::ms(self.health.p50),
            loadgen::ms(self.health.p99)
        );
        match self.health_failed {
            0 => latency,
            failed => format!("{latency} ({failed} failed)"),
        }
    }
}

/// Starts the probe on its own thread; join the handle for its report once the window is over.
/// `load` is the load's RPC: the probe sends its request and counts any answer it gets into
/// its goodput tally.
pub fn spawn(
    url: String,
    load: SummarizeRaw,
    config: ProbeConfig,
) -> std::io::Result<JoinHandle<Result<ProbeReport, LoadError>>> {
    std::thread::Builder::new()
        .name("latency-probe".to_owned())
        .spawn(move || {
            let realtime = raise_priority();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| LoadError::Task(format!("the probe's runtime: {e}")))?;
            let mut report = runtime.block_on(run(url, load, config))?;
            report.realtime = realtime;
            Ok(report)
        })
}

/// Puts this thread in the `SCHED_FIFO` class (priority 1), so that when an answer arrives it
/// runs at once instead of waiting for a time slice behind the load generator's and the
/// server's threads on the same two cores: a caller on another machine would not wait for
/// those. The other side of it: while it sends, it runs ahead of the server's threads too,
/// which a remote caller would not (its own request body, 64 KiB per stream window, is the
/// most it writes at once). Threads its runtime starts later inherit the class. Done with
/// util-linux's `chrt` on this thread's id (no unsafe code here); needs root (CAP_SYS_NICE).
/// False when it could not be done; the probe still runs.
fn raise_priority() -> bool {
    let Ok(link) = std::fs::read_link("/proc/thread-self") else {
        return false;
    };
    // "<pid>/task/<tid>"
    let Some(tid) = link
        .file_name()
        .map(|tid| tid.to_string_lossy().into_owned())
    else {
        return false;
    };
    std::process::Command::new("chrt")
        .args(["--fifo", "--pid", "1", &tid])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

async fn run(
    url: String,
    load: SummarizeRaw,
    config: ProbeConfig,
) -> Result<ProbeReport, LoadError> {
    // Created inside this runtime, so the connection's task runs on this thread.
    let channel = loadgen::connect(&url, 1).await?.remove(0);
    let frame = grpc_frame(&load.body);
    let (health, refusals) = tokio::join!(
        health_loop(channel.clone(), &config),
        refusal_loop(channel, frame, load, &config),
    );
    let (health, health_failed) = health?;
    let mut report = refusals?;
    report.health = health;
    report.health_failed = health_failed;
    Ok(report)
}

/// Runs `call` `rate` times a second from `offset` on, each call its own task (a slow answer
/// never delays the next call, so a stall shows as every call it held up, not as one slow
/// sample), at most `max_in_flight` at once (a slot that finds that many is skipped). Returns
/// the start and outcome of every call started inside `window`, and the slots skipped in it.
/// Calls still running when the window ends are waited for (each is bounded by its deadline).
async fn on_schedule<T, F, Fut>(
    rate: f64,
    window: (Instant, Instant),
    offset: Duration,
    max_in_flight: usize,
    call: F,
) -> (Vec<(Instant, T)>, u64)
where
    T: Send + 'static,
    F: Fn() -> Fut,
    Fut: Future<Output = T> + Send + 'static,
{
    let mut outcomes = Vec::new();
    let mut skipped = 0;
    if rate <= 0.0 {
        return (outcomes, skipped);
    }
    let interval = Duration::from_secs_f64(1.0 / rate);
    let inside = |start: Instant| start >= window.0 && start < window.1;
    let mut running = JoinSet::new();
    let mut next = tokio::time::Instant::now() + offset;
    while next.into_std() < window.1 {
        tokio::select! {
            biased;
            Some(Ok((start, outcome))) = running.join_next() => {
                if inside(start) {
                    outcomes.push((start, outcome));
                }
            }
            () = tokio::time::sleep_until(next) => {
                next += interval;
                if running.len() >= max_in_flight {
                    skipped += u64::from(inside(Instant::now()));
                    continue;
                }
                let call = call();
                running.spawn(async move { (Instant::now(), call.await) });
            }
        }
    }
    while let Some(done) = running.join_next().await {
        if let Ok((start, outcome)) = done
            && inside(start)
        {
            outcomes.push((start, outcome));
        }
    }
    (outcomes, skipped)
}

/// Health checks on schedule until the window ends: (latency of the answered ones, failures).
async fn health_loop(
    channel: Channel,
    config: &ProbeConfig,
) -> Result<(Percentiles, u64), LoadError> {
    let mut histogram = new_histogram()?;
    let deadline = config.deadline;
    let (outcomes, skipped) = on_schedule(
        config.health_rate,
        config.window,
        Duration::ZERO,
        HEALTH_CHECKS_IN_FLIGHT,
        || {
            let mut client = HealthClient::new(channel.clone());
            async move {
                let start = Instant::now();
                let request = request_with_timeout(HealthCheckRequest::default(), Some(deadline));
                match tokio::time::timeout(deadline, client.check(request)).await {
                    Ok(Ok(_)) => Some(start.elapsed()),
                    _ => None,
                }
            }
        },
    )
    .await;
    // A slot skipped because [`HEALTH_CHECKS_IN_FLIGHT`] checks were still unanswered is a
    // check the server failed too.
    let mut failed = skipped;
    for (_, latency) in outcomes {
        match latency {
            Some(latency) => histogram.saturating_record(micros(latency)),
            None => failed += 1,
        }
    }
    Ok((Percentiles::of(&histogram), failed))
}

/// Most health checks in flight at once (a server that stops answering is counted as many
/// failures, not waited on).
const HEALTH_CHECKS_IN_FLIGHT: usize = 64;

/// Most of the probe's own requests running at once; a slot that finds this many is skipped
/// (and counted), so the probe never adds more than this to the server's work.
pub const MAX_PROBES_IN_FLIGHT: usize = 2;

/// The load's request on schedule until the window ends, each call its own task.
async fn refusal_loop(
    channel: Channel,
    frame: Bytes,
    load: SummarizeRaw,
    config: &ProbeConfig,
) -> Result<ProbeReport, LoadError> {
    let mut report = ProbeReport::default();
    let mut fast = new_histogram()?;
    let deadline = config.request_deadline;
    // Half a slot after the health checks, so the two rarely start together.
    let offset = if config.refusal_rate > 0.0 {
        Duration::from_secs_f64(0.5 / config.refusal_rate)
    } else {
        Duration::ZERO
    };
    let (outcomes, skipped) = on_schedule(
        config.refusal_rate,
        config.window,
        offset,
        MAX_PROBES_IN_FLIGHT,
        || {
            let (mut channel, frame, load) = (channel.clone(), frame.clone(), load.clone());
            async move {
                let start = Instant::now();
                // The server enforces `deadline`; the local bound only catches a server that
                // does not.
                let outcome = tokio::time::timeout(
                    deadline + LOCAL_DEADLINE_MARGIN,
                    call(&mut channel, &frame, deadline),
                )
                .await
                .unwrap_or_else(|_| Outcome::Failed("no answer (local timeout)".to_owned()));
                if let Outcome::Answered(summary, done) = &outcome {
                    load.record_answer(start, *done, summary);
                }
                outcome
            }
        },
    )
    .await;
    for (_, outcome) in outcomes {
        match outcome {
            Outcome::Refused { reason, after } => {
                if reason != super::QUEUE_TIMEOUT_REASON {
                    fast.saturating_record(micros(after));
                }
                *report.refusal_reasons.entry(reason).or_default() += 1;
            }
            Outcome::Answered(..) => report.admitted += 1,
            Outcome::Failed(what) => *report.other.entry(what).or_default() += 1,
        }
    }
    report.refusals = Percentiles::of(&fast);
    report.skipped = skipped;
    Ok(report)
}

/// How long past its deadline a probe request may go unanswered before the probe gives up on it.
const LOCAL_DEADLINE_MARGIN: Duration = Duration::from_secs(2);

/// How one probe call of the load's request ended.
enum Outcome {
    /// RESOURCE_EXHAUSTED with this ErrorInfo reason, known this long after the start.
    Refused { reason: String, after: Duration },
    /// OK, with the answer, finished at this instant.
    Answered(Box<FeedbackSummary>, Instant),
    /// Anything else: the status name, or "transport".
    Failed(String),
}

/// One SummarizeFeedback call with the prebuilt `frame` as its body.
async fn call(channel: &mut Channel, frame: &Bytes, deadline: Duration) -> Outcome {
    let start = Instant::now();
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri(SUMMARIZE_PATH)
        .header(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        )
        .header(http::header::TE, HeaderValue::from_static("trailers"))
        .header("grpc-timeout", format!("{}m", deadline.as_millis()))
        .body(Body::new(OneFrame(Some(frame.clone()))));
    let Ok(request) = request else {
        return Outcome::Failed("request".to_owned());
    };
    let response = match channel.ready().await {
        Ok(service) => service.call(request).await,
        Err(error) => Err(error),
    };
    let Ok(response) = response else {
        return Outcome::Failed("transport".to_owned());
    };
    let after = start.elapsed();
    let (parts, mut body) = response.into_parts();
    // Trailers-only: the status is in the headers, the body is empty.
    if let Some(status) = Status::from_header_map(&parts.headers) {
        return refused_or_failed(&status, after);
    }
    let mut data = BytesMut::new();
    let mut trailers: Option<HeaderMap> = None;
    while let Some(frame) = poll_fn(|cx: &mut Context<'_>| Pin::new(&mut body).poll_frame(cx)).await
    {
        let Ok(frame) = frame else {
            return Outcome::Failed("transport".to_owned());
        };
        match frame.into_data() {
            Ok(chunk) => data.put(chunk),
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    let done = Instant::now();
    let status = trailers.as_ref().and_then(Status::from_header_map);
    match status {
        Some(status) if status.code() != Code::Ok => refused_or_failed(&status, after),
        // OK: one message after its 5-byte frame header.
        Some(_) if data.len() >= 5 => match FeedbackSummary::decode(&data[5..]) {
            Ok(summary) => Outcome::Answered(Box::new(summary), done),
            Err(_) => Outcome::Failed("undecodable answer".to_owned()),
        },
        _ => Outcome::Failed("no grpc-status".to_owned()),
    }
}

fn refused_or_failed(status: &Status, after: Duration) -> Outcome {
    if status.code() == Code::ResourceExhausted {
        Outcome::Refused {
            reason: refusal_reason(&status.get_error_details()),
            after,
        }
    } else {
        Outcome::Failed(format!("{:?}", status.code()))
    }
}

/// `message` as one gRPC length-prefixed frame (uncompressed).
fn grpc_frame(message: &Bytes) -> Bytes {
    let mut frame = BytesMut::with_capacity(message.len() + 5);
    frame.put_u8(0);
    frame.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    frame.put_slice(message);
    frame.freeze()
}

/// A request body that is one prebuilt buffer: h2 sends it in window-sized slices of the same
/// allocation, where tonic's encoder would first copy it.
struct OneFrame(Option<Bytes>);

impl http_body::Body for OneFrame {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.get_mut().0.take().map(|data| Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.0.as_ref().map_or(0, |data| data.len() as u64))
    }
}

#[cfg(test)]
mod tests {
    use insight_service::{Config, config::BackendKind};

    use super::*;
    use crate::{
        fake_cgroup::calm_probe_root,
        fakes::{FakeLlm, Fault},
        overload::Workload,
        start_insight,
    };
    use spotifai_proto::insight::insight_service_client::InsightServiceClient;

    /// A real in-process insight-service with one slot and no queue, the slot held by a call
    /// whose model answer the fake Gemini delays: every request the probe sends is refused
    /// with CONCURRENCY_LIMIT and timed, none is admitted, and its health checks are answered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_probe_times_refusals_of_the_loads_request_and_health_checks() {
        let fake = FakeLlm::gemini().await;
        fake.push_faults([Fault::Delay(Duration::from_secs(20))]);
        let files = calm_probe_root();
        let key_file = files.path().join("gemini.key");
        std::fs::write(&key_file, "probe-test-key\n").unwrap();
        let mut config = Config {
            llm_backend: BackendKind::Gemini,
            llm_base_url: Some(fake.base_url()),
            llm_api_key_file: Some(key_file),
            llm_max_retries: 0,
            max_concurrency: 1,
            queue_depth: 0,
            memory_budget: 256 << 20,
            ..Config::default()
        };
        config.probe_proc_root = files.path().to_path_buf();
        config.probe_cgroup_root = files.path().to_path_buf();
        let server = start_insight(config).await;

        let workload = Workload {
            entries: 3,
            entry_bytes: 200,
            chunk_size: 5,
        };
        let mut holder = InsightServiceClient::new(server.channel().await);
        let held = tokio::spawn(async move { holder.summarize_feedback(workload.request()).await });
        assert!(
            fake.wait_for_requests(1, Duration::from_secs(10)).await,
            "the first call never reached the fake Gemini"
        );

        let now = Instant::now();
        let window = (now, now + Duration::from_secs(1));
        let load = SummarizeRaw::new(workload.encoded(), 3, window);
        let config = ProbeConfig {
            health_rate: 20.0,
            refusal_rate: 40.0,
            window,
            deadline: Duration::from_secs(5),
            request_deadline: Duration::from_secs(5),
        };
        let probe = spawn(server.url(), load.clone(), config).unwrap();
        let report = tokio::task::spawn_blocking(move || probe.join())
            .await
            .unwrap()
            .unwrap()
            .unwrap();

        assert!(report.refusals.count >= 5, "{report:?}");
        assert_eq!(
            report.refusal_reasons.keys().collect::<Vec<_>>(),
            ["CONCURRENCY_LIMIT"],
            "{report:?}"
        );
        assert_eq!(
            report.refusals.count,
            report.refusal_reasons["CONCURRENCY_LIMIT"]
        );
        assert_eq!((report.admitted, report.skipped), (0, 0), "{report:?}");
        assert!(report.other.is_empty(), "{report:?}");
        assert!(
            report.health.count >= 5 && report.health_failed == 0,
            "{report:?}"
        );
        assert!(report.refusals.max < 5_000_000, "{report:?}");
        assert_eq!(load.snapshot().unwrap().completed_in_window, 0.0);
        held.abort();
    }
}
