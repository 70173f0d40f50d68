//! The StreamSamples fan-out as a client sees it: the subscriber cap through a real server on
//! 127.0.0.1:0, and slow-subscriber handling through the gRPC adapter under paused time.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use monitor_service::{
    config::{Cli, Command, ConfigError, ServeArgs},
    grpc::MonitorGrpc,
    probe::{Probe, ProbeConfig},
    sampler::{Sampler, SamplerConfig},
};
use spotifai_proto::monitor::{
    MemorySample, StreamSamplesRequest, memory_monitor_client::MemoryMonitorClient,
    memory_monitor_server::MemoryMonitor,
};
use tokio::{net::TcpListener, sync::oneshot};
use tokio_stream::StreamExt;
use tonic::{Code, Request, Status, transport::Channel};

async fn start(args: ServeArgs) -> (Channel, oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(monitor_service::run(listener, args, async {
        stopped.await.ok();
    }));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (channel, stop)
}

fn endless(interval_ms: u32) -> StreamSamplesRequest {
    StreamSamplesRequest {
        interval_ms,
        duration_ms: 0,
    }
}

#[tokio::test]
async fn past_the_cap_streams_are_refused_with_resource_exhausted_until_one_ends() {
    let (channel, _stop) = start(ServeArgs {
        max_subscribers: 2,
        ..ServeArgs::default()
    })
    .await;
    let mut client = MemoryMonitorClient::new(channel);
    let mut first = client
        .stream_samples(endless(100))
        .await
        .unwrap()
        .into_inner();
    let mut second = client
        .stream_samples(endless(100))
        .await
        .unwrap()
        .into_inner();
    assert!(first.message().await.unwrap().is_some());
    assert!(second.message().await.unwrap().is_some());

    let status = client.stream_samples(endless(100)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("at most 2"),
        "{}",
        status.message()
    );

    // Cancelling one gives its place back (the server learns of it from the stream reset).
    drop(first);
    let mut admitted = None;
    for _ in 0..200 {
        match client.stream_samples(endless(100)).await {
            Ok(response) => {
                admitted = Some(response.into_inner());
                break;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    let mut third = admitted.expect("a place freed within 2s of the cancel");
    assert!(third.message().await.unwrap().is_some());

    // A finite stream that ended frees its place too.
    drop(third);
    drop(second);
    for _ in 0..3 {
        let mut finite = loop {
            match client
                .stream_samples(StreamSamplesRequest {
                    interval_ms: 100,
                    duration_ms: 100,
                })
                .await
            {
                Ok(response) => break response.into_inner(),
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        let mut count = 0;
        while finite.message().await.unwrap().is_some() {
            count += 1;
        }
        assert_eq!(count, 2);
    }
}

fn adapter(config: SamplerConfig) -> (MonitorGrpc, Sampler) {
    let sampler = Sampler::with_config(Probe::new(ProbeConfig::default()), config);
    (MonitorGrpc::new(sampler.clone()), sampler)
}

#[tokio::test(start_paused = true)]
async fn a_slow_reader_is_told_what_it_missed_and_a_stuck_one_is_cut_off() {
    let (service, sampler) = adapter(SamplerConfig {
        subscriber_buffer: 4,
        slow_subscriber_timeout: Duration::from_secs(10),
        ..SamplerConfig::default()
    });
    let mut slow = service
        .stream_samples(Request::new(endless(100)))
        .await
        .unwrap()
        .into_inner();
    let mut stuck = service
        .stream_samples(Request::new(endless(100)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sampler.subscriber_count(), 2);

    // Neither reads for 2 s: each keeps its 4 oldest samples (t = 0..300 ms) and misses 17.
    tokio::time::sleep(Duration::from_millis(2050)).await;
    let mut seen: Vec<MemorySample> = Vec::new();
    for _ in 0..5 {
        seen.push(slow.next().await.unwrap().unwrap());
    }
    let seqs: Vec<u64> = seen.iter().map(|sample| sample.seq).collect();
    let dropped: Vec<u64> = seen.iter().map(|sample| sample.dropped).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 22]);
    assert_eq!(dropped, vec![0, 0, 0, 0, 17]);

    // The stuck one never reads: first miss at 400 ms, cut off 10 s later with what it missed.
    tokio::time::sleep(Duration::from_secs(9)).await;
    let mut statuses: Vec<Status> = Vec::new();
    let mut samples = 0;
    while let Some(item) = stuck.next().await {
        match item {
            Ok(_) => samples += 1,
            Err(status) => statuses.push(status),
        }
    }
    assert_eq!(samples, 4);
    assert_eq!(statuses.len(), 1);
    let status = &statuses[0];
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("too slow"),
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("missed 101 samples"),
        "{}",
        status.message()
    );
    drop(stuck);
    assert_eq!(sampler.subscriber_count(), 1);
}

#[test]
fn fan_out_flags_parse_with_their_defaults_and_ranges() {
    let serve = |args: &[&str]| {
        Cli::try_parse_valid(["monitor-service", "serve"].iter().chain(args).copied()).map(|cli| {
            match cli.command {
                Command::Serve(args) => args,
                other => panic!("parsed as {other:?}"),
            }
        })
    };
    if !std::env::vars().any(|(name, _)| name.starts_with("MONITOR_")) {
        let args = serve(&[]).unwrap();
        assert_eq!(
            (
                args.subscriber_buffer,
                args.slow_subscriber_timeout,
                args.max_subscribers
            ),
            (16, Duration::from_secs(30), 10_000)
        );
        let defaults = ServeArgs::default();
        assert_eq!(args.sampler_config(), defaults.sampler_config());
    }
    let args = serve(&[
        "--subscriber-buffer",
        "64",
        "--slow-subscriber-timeout",
        "5s",
        "--max-subscribers",
        "50000",
    ])
    .unwrap();
    assert_eq!(
        args.sampler_config(),
        SamplerConfig {
            server_interval: args.default_interval,
            subscriber_buffer: 64,
            slow_subscriber_timeout: Duration::from_secs(5),
            max_subscribers: 50_000,
        }
    );
    for (args, flag) in [
        (&["--subscriber-buffer", "0"][..], "--subscriber-buffer"),
        (&["--subscriber-buffer", "5000"][..], "--subscriber-buffer"),
        (
            &["--slow-subscriber-timeout", "10ms"][..],
            "--slow-subscriber-timeout",
        ),
        (
            &["--slow-subscriber-timeout", "2h"][..],
            "--slow-subscriber-timeout",
        ),
        (&["--max-subscribers", "0"][..], "--max-subscribers"),
        (&["--max-subscribers", "lots"][..], "--max-subscribers"),
    ] {
        let error = serve(args).unwrap_err();
        assert!(error.to_string().contains(flag), "{args:?}: {error}");
        assert_eq!(error.exit_code(), 2, "{args:?}");
    }

    // Values built in code get the same checks.
    let mut args = ServeArgs {
        subscriber_buffer: 0,
        ..ServeArgs::default()
    };
    assert!(matches!(
        args.validate(),
        Err(ConfigError::OutOfRange { flag, .. }) if flag.starts_with("--subscriber-buffer")
    ));
    args.subscriber_buffer = 1;
    args.max_subscribers = 0;
    assert!(matches!(
        args.validate(),
        Err(ConfigError::OutOfRange { flag, .. }) if flag.starts_with("--max-subscribers")
    ));
    args.max_subscribers = 1;
    args.slow_subscriber_timeout = Duration::ZERO;
    let error = args.validate().unwrap_err();
    assert_eq!(
        error.to_string(),
        "--slow-subscriber-timeout/MONITOR_SLOW_SUBSCRIBER_TIMEOUT must be between 100ms and \
         1h, got 0s"
    );
    args.slow_subscriber_timeout = Duration::from_secs(1);
    assert_eq!(args.validate(), Ok(()));
}
