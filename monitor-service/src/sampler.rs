//! Hands samples to the gRPC handlers: one shared [`Probe`], one sequence counter, and for now
//! one sampling task per stream.
//!
//! The handlers only see [`Sampler::snapshot`] and [`Sampler::stream`], so replacing the
//! per-stream tasks with one shared sampling loop and a fan-out to subscribers changes this
//! module alone.

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::{mpsc, watch},
    time::{Instant, MissedTickBehavior},
};

use crate::probe::{Probe, Sample};

/// Shortest sampling interval a client or the server default may ask for: below it the readings
/// mostly repeat the kernel's own update granularity and only add load.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// Samples a stream may have queued for a slow reader before its task waits (and, with
/// [`MissedTickBehavior::Skip`], skips the ticks it missed rather than bursting afterwards).
pub const STREAM_BUFFER: usize = 8;

/// Why a request for samples was refused or a stream cut short.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SampleError {
    /// A stream interval below [`MIN_INTERVAL`] (0 selects the server's default instead).
    #[error("interval_ms must be 0 (server default) or at least 100, got {0}")]
    IntervalTooShort(u32),
    /// The server is shutting down; the client should reconnect (to another replica).
    #[error("the server is shutting down; reconnect to continue sampling")]
    ShuttingDown,
}

/// When a stream samples and when it ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamPlan {
    /// Time between samples.
    pub interval: Duration,
    /// Time after the first sample past which no sample is due; `None` = until cancelled.
    pub duration: Option<Duration>,
}

impl StreamPlan {
    /// The plan of a request: `interval_ms` 0 takes `default_interval`, 1..=99 is refused;
    /// `duration_ms` 0 means until the client cancels.
    pub fn new(
        interval_ms: u32,
        duration_ms: u64,
        default_interval: Duration,
    ) -> Result<Self, SampleError> {
        let interval = match interval_ms {
            0 => default_interval,
            ms => {
                let interval = Duration::from_millis(u64::from(ms));
                if interval < MIN_INTERVAL {
                    return Err(SampleError::IntervalTooShort(ms));
                }
                interval
            }
        };
        Ok(Self {
            interval,
            duration: (duration_ms > 0).then(|| Duration::from_millis(duration_ms)),
        })
    }

    /// Whether a stream that started at `start` has its last sample due by `deadline`.
    fn ends_by(&self, start: Instant, deadline: Instant) -> bool {
        self.duration
            .and_then(|duration| start.checked_add(duration))
            .is_some_and(|end| end <= deadline)
    }

    /// Whether a sample taken at `offset` after the first one is the last one due: the next
    /// tick would fall after the duration. Deciding on scheduled tick offsets rather than on
    /// the clock makes the sample count exact: duration 2000ms / interval 500ms is 5 samples.
    fn is_last(&self, offset: Duration) -> bool {
        self.duration
            .is_some_and(|duration| offset.saturating_add(self.interval) > duration)
    }
}

/// Cheap to clone: all clones share the probe, the counter and the shutdown signal.
#[derive(Clone, Debug)]
pub struct Sampler {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// A std mutex, never held across an await: a sample is a handful of small reads of
    /// in-memory kernel files (tens of microseconds), cheaper than a hop to the blocking pool,
    /// so it is taken inline on the async worker.
    probe: Mutex<Probe>,
    /// Number of the last sample handed out; the first sample is 1.
    seq: AtomicU64,
    default_interval: Duration,
    /// `Some(deadline)` once the server shuts down: streams that end by then finish, the
    /// others end at once.
    closing: watch::Sender<Option<Instant>>,
    streams: AtomicUsize,
}

impl Sampler {
    /// A sampler over `probe`; streams asking for interval 0 sample every `default_interval`.
    pub fn new(probe: Probe, default_interval: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                probe: Mutex::new(probe),
                seq: AtomicU64::new(0),
                default_interval,
                closing: watch::Sender::new(None),
                streams: AtomicUsize::new(0),
            }),
        }
    }

    /// The interval of streams that ask for the server default.
    pub fn default_interval(&self) -> Duration {
        self.inner.default_interval
    }

    /// Takes one sample now and numbers it.
    pub fn snapshot(&self) -> Sample {
        // A panic while sampling cannot leave the probe inconsistent (it holds open files and
        // nothing else), so a poisoned lock is used as is rather than failing every later call.
        let mut sample = self
            .inner
            .probe
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .sample();
        sample.seq = self.inner.seq.fetch_add(1, Ordering::Relaxed) + 1;
        sample
    }

    /// Starts sampling per `plan`: the first sample immediately, then one per interval. The
    /// receiver closes after the last sample due within the duration, or yields
    /// [`SampleError::ShuttingDown`] when [`Sampler::close`] cuts it short; dropping it (the
    /// client cancelled) stops the sampling task.
    pub fn stream(&self, plan: StreamPlan) -> mpsc::Receiver<Result<Sample, SampleError>> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let sampler = self.clone();
        tokio::spawn(async move {
            let _active = StreamGuard::enter(&sampler.inner.streams);
            sampler.run_stream(plan, tx).await;
        });
        rx
    }

    async fn run_stream(&self, plan: StreamPlan, tx: mpsc::Sender<Result<Sample, SampleError>>) {
        let mut closing = self.inner.closing.subscribe();
        // Set once shutdown began but this stream ends within the grace: it runs to its end.
        let mut finishing = false;
        let start = Instant::now();
        let mut ticks = tokio::time::interval_at(start, plan.interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
        loop {
            // Biased, in this order: a gone client or a shutdown wins over a due tick, so no
            // sample is taken for nobody and a stream opened during shutdown ends at once.
            let tick = tokio::select! {
                biased;
                () = tx.closed() => return,
                deadline = closing.wait_for(Option::is_some), if !finishing => {
                    // An error means the sender is gone, which `Inner` owning it rules out;
                    // treating it as "finish" keeps this branch from firing in a loop.
                    let deadline = deadline.ok().and_then(|deadline| *deadline);
                    if deadline.is_none_or(|deadline| plan.ends_by(start, deadline)) {
                        finishing = true;
                        continue;
                    }
                    // If a slow client's buffer is full it misses the reason; the stream still
                    // ends, and the server is going away anyway.
                    let _ = tx.try_send(Err(SampleError::ShuttingDown));
                    return;
                }
                tick = ticks.tick() => tick,
            };
            if tx.send(Ok(self.snapshot())).await.is_err() {
                return;
            }
            if plan.is_last(tick.saturating_duration_since(start)) {
                return;
            }
        }
    }

    /// Starts shutdown: streams whose last sample is due by `finish_by` (the end of the grace
    /// period) run to their end, as in-flight calls should; the others, endless streams above
    /// all, end now with [`SampleError::ShuttingDown`] rather than hold the server's exit for
    /// the whole grace period and then be cut. Streams started later follow the same rule.
    pub fn close(&self, finish_by: Instant) {
        self.inner.closing.send_replace(Some(finish_by));
    }

    /// Streams currently sampling.
    pub fn active_streams(&self) -> usize {
        self.inner.streams.load(Ordering::Relaxed)
    }
}

/// Counts one running stream task.
struct StreamGuard<'a>(&'a AtomicUsize);

impl<'a> StreamGuard<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for StreamGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::probe::ProbeConfig;

    fn sampler() -> Sampler {
        Sampler::new(Probe::new(ProbeConfig::default()), Duration::from_secs(1))
    }

    #[test]
    fn plan_validation() {
        let default = Duration::from_secs(1);
        assert_eq!(
            StreamPlan::new(0, 0, default),
            Ok(StreamPlan {
                interval: default,
                duration: None
            })
        );
        assert_eq!(
            StreamPlan::new(100, 2500, default),
            Ok(StreamPlan {
                interval: Duration::from_millis(100),
                duration: Some(Duration::from_millis(2500)),
            })
        );
        let error = StreamPlan::new(50, 0, default).unwrap_err();
        assert_eq!(error, SampleError::IntervalTooShort(50));
        assert_eq!(
            error.to_string(),
            "interval_ms must be 0 (server default) or at least 100, got 50"
        );
        assert!(StreamPlan::new(99, 0, default).is_err());
        assert!(StreamPlan::new(1, 0, default).is_err());
    }

    #[test]
    fn snapshots_are_numbered_from_one() {
        let sampler = sampler();
        assert_eq!(sampler.snapshot().seq, 1);
        assert_eq!(sampler.clone().snapshot().seq, 2);
        assert!(sampler.snapshot().process.rss_bytes > 0);
    }

    async fn collect(mut rx: mpsc::Receiver<Result<Sample, SampleError>>) -> Vec<(Duration, u64)> {
        let start = Instant::now();
        let mut seen = Vec::new();
        while let Some(item) = rx.recv().await {
            seen.push((start.elapsed(), item.unwrap().seq));
        }
        seen
    }

    #[tokio::test(start_paused = true)]
    async fn finite_stream_sends_every_tick_up_to_the_duration() {
        let sampler = sampler();
        let plan = StreamPlan::new(500, 2000, sampler.default_interval()).unwrap();
        let seen = collect(sampler.stream(plan)).await;
        let ms = |ms| Duration::from_millis(ms);
        assert_eq!(
            seen,
            vec![
                (ms(0), 1),
                (ms(500), 2),
                (ms(1000), 3),
                (ms(1500), 4),
                (ms(2000), 5)
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn duration_between_ticks_ends_after_the_last_tick_inside_it() {
        let sampler = sampler();
        let plan = StreamPlan::new(1000, 2500, sampler.default_interval()).unwrap();
        let seen = collect(sampler.stream(plan)).await;
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[2].0, Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn default_interval_and_cancellation() {
        let sampler = sampler();
        let mut rx = sampler.stream(StreamPlan::new(0, 0, sampler.default_interval()).unwrap());
        let start = Instant::now();
        assert_eq!(rx.recv().await.unwrap().unwrap().seq, 1);
        assert_eq!(rx.recv().await.unwrap().unwrap().seq, 2);
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        assert_eq!(sampler.active_streams(), 1);

        drop(rx);
        // The task notices the closed channel without waiting for its next tick.
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(sampler.active_streams(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn close_ends_endless_streams_with_shutting_down() {
        let sampler = sampler();
        let mut rx = sampler.stream(StreamPlan::new(0, 0, sampler.default_interval()).unwrap());
        assert!(rx.recv().await.unwrap().is_ok());
        sampler.close(Instant::now() + Duration::from_secs(3600));
        assert_eq!(rx.recv().await.unwrap(), Err(SampleError::ShuttingDown));
        assert!(rx.recv().await.is_none());

        let mut late = sampler.stream(StreamPlan::new(0, 0, sampler.default_interval()).unwrap());
        assert_eq!(late.recv().await.unwrap(), Err(SampleError::ShuttingDown));
    }

    #[tokio::test(start_paused = true)]
    async fn close_lets_streams_that_end_within_the_grace_finish() {
        let sampler = sampler();
        let within =
            sampler.stream(StreamPlan::new(500, 2000, sampler.default_interval()).unwrap());
        let mut beyond =
            sampler.stream(StreamPlan::new(500, 60_000, sampler.default_interval()).unwrap());
        tokio::time::sleep(Duration::from_millis(10)).await;
        sampler.close(Instant::now() + Duration::from_secs(25));

        let seen = collect(within).await;
        assert_eq!(seen.len(), 5, "{seen:?}");

        assert!(beyond.recv().await.unwrap().is_ok());
        assert_eq!(beyond.recv().await.unwrap(), Err(SampleError::ShuttingDown));
        assert!(beyond.recv().await.is_none());
    }

    #[test]
    fn ends_by_never_overflows() {
        let plan = StreamPlan::new(100, u64::MAX, Duration::from_secs(1)).unwrap();
        let now = Instant::now();
        assert!(!plan.ends_by(now, now + Duration::from_secs(1)));
        assert!(!plan.is_last(Duration::from_secs(3600)));
    }

    #[tokio::test(start_paused = true)]
    async fn slow_reader_skips_ticks_instead_of_bursting() {
        let sampler = sampler();
        let plan = StreamPlan::new(100, 0, sampler.default_interval()).unwrap();
        let mut rx = sampler.stream(plan);
        // Read nothing for 5s: the buffer fills, one more sample waits to be sent, and the
        // 40-odd ticks meanwhile are skipped rather than sampled.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let taken = STREAM_BUFFER as u64 + 1;
        assert_eq!(sampler.inner.seq.load(Ordering::Relaxed), taken);
        for expected in 1..=taken {
            assert_eq!(rx.recv().await.unwrap().unwrap().seq, expected);
        }
        // Then sampling resumes at the interval: about 10 samples per second, not a burst.
        let window_end = Instant::now() + Duration::from_secs(1);
        let mut count = 0;
        while let Ok(Some(item)) = tokio::time::timeout_at(window_end, rx.recv()).await {
            item.unwrap();
            count += 1;
        }
        assert!((9..=11).contains(&count), "{count} samples in 1s at 100ms");
    }
}
