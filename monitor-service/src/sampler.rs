//! The one sampling loop and its fan-out to subscribers.
//!
//! Modelled on tokio-console's aggregator (`console-subscriber/src/aggregator/mod.rs`): one
//! producer task owns the cadence, the latest sample and the list of subscribers. A
//! `StreamSamples` call registers through a command channel and gets a bounded channel of its own;
//! the producer publishes with `try_reserve`, so a slow client never blocks the loop or the other
//! clients. It is told how many samples it missed (`dropped` on its next message), and is cut off
//! only once it has taken nothing for [`SamplerConfig::slow_subscriber_timeout`].
//!
//! # The time grid
//!
//! Every interval is a whole number of [`BASE_TICK`]s (a requested interval is rounded up), and
//! every sample is taken on the grid `start + n × BASE_TICK` of the loop's start. A subscriber
//! with an interval of `k` ticks receives the samples taken at multiples of `k`, so all
//! subscribers of one interval share the very same samples, and a thousand subscribers at 10 Hz
//! cost one probe read per 100 ms. The loop lives on the grid of the gcd of the active intervals
//! and of the server interval (at which in-process consumers get samples even with no
//! subscriber); grid points where no interval is due are slept through rather than sampled, so
//! 300 ms and 1 s subscribers cost 13 reads per 3 s, not 30. A loop that falls behind (a stalled
//! machine) takes one sample for every overdue interval and realigns, rather than bursting to
//! catch up.
//!
//! # Phases: many subscribers are spread over the tick
//!
//! Handing one sample to N subscribers is a burst of N messages that all fall due at the same
//! instant, and the last of them waits for the other N − 1 to be encoded and written: with
//! 10,000 subscribers at 10 Hz that wait is tens of milliseconds of lag on every sample. So each
//! tick is cut into [`PHASES`] slots of [`SLOT`], and the subscribers of one interval are spread
//! over them once there are many: a phase takes up to [`PHASE_CAPACITY`] subscribers before the
//! next one opens, and each phase has its own, fresh sample (taken at its slot, so freshness, the
//! lag from reading to receipt, is what shrinks). Below [`PHASE_CAPACITY`] everything stays in
//! phase 0 and nothing changes; at 10,000 subscribers the loop reads 20 samples per 100 ms
//! (~2 µs each) instead of one, and sends 20 bursts of 500 instead of one of 10,000. Prometheus
//! spreads its scrapes over the scrape interval for the same reason.
//!
//! The streams of one HTTP/2 connection are kept in one phase (the connection's first stream
//! picks it, later ones follow while it has room): their messages then leave in one socket write
//! (see [`crate::coalesce`]) instead of one write per phase.
use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use tokio::{
    sync::{broadcast, mpsc, oneshot, watch},
    time::Instant,
};
use tokio_stream::Stream;

use crate::probe::{Probe, Sample};

/// The grid every sampling interval is a multiple of: below it the readings mostly repeat the
/// kernel's own update granularity and only add load.
pub const BASE_TICK: Duration = Duration::from_millis(100);

/// [`BASE_TICK`] in milliseconds, for the grid arithmetic.
const BASE_TICK_MS: u64 = 100;

/// Shortest sampling interval a client or the server default may ask for: one [`BASE_TICK`].
pub const MIN_INTERVAL: Duration = BASE_TICK;

/// Slots a [`BASE_TICK`] is cut into for spreading subscribers (see the module docs).
pub const PHASES: usize = 20;

/// [`PHASES`] as the grid arithmetic's integer type.
const PHASES_U64: u64 = PHASES as u64;

/// One phase slot: [`BASE_TICK`] / [`PHASES`]. Well above the timer's 1 ms resolution.
pub const SLOT: Duration = Duration::from_millis(SLOT_MS);

/// [`SLOT`] in milliseconds.
const SLOT_MS: u64 = BASE_TICK_MS / PHASES_U64;

/// Subscribers of one interval a phase takes before new connections are given another phase.
/// A burst of 500 messages is encoded and written in a few milliseconds, well inside a
/// [`SLOT`], so bursts do not pile onto each other; and up to 500 subscribers there is
/// one sample per tick, as before phases existed.
pub const PHASE_CAPACITY: usize = 500;

/// Samples an in-process consumer ([`Sampler::subscribe_internal`]) may fall behind before it
/// is told it lagged: 64 is over 6 s at the fastest cadence, far more than an alert evaluation
/// takes, and costs 64 pointers.
pub const INTERNAL_BUFFER: usize = 64;

/// Largest per-subscriber buffer: 4096 samples is over 6 minutes at 10 Hz, past any useful
/// cushion, and keeps a code-built configuration from asking tokio for a channel it refuses.
pub const MAX_SUBSCRIBER_BUFFER: usize = 4096;

/// How often the loop forgets subscribers whose stream was cancelled between two of their
/// samples, so a long-interval subscriber that hung up does not hold its entry for an hour.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// Why a request for samples was refused or a stream cut short.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum SampleError {
    /// A stream interval below [`MIN_INTERVAL`] (0 selects the server's default instead).
    #[error("interval_ms must be 0 (server default) or at least 100, got {0}")]
    IntervalTooShort(u32),
    /// The server is shutting down; the client should reconnect (to another replica).
    #[error("the server is shutting down; reconnect to continue sampling")]
    ShuttingDown,
    /// `--max-subscribers` streams are open already.
    #[error(
        "too many subscribers: this server streams samples to at most {limit} clients at once \
         (--max-subscribers); retry later or use another replica"
    )]
    TooManySubscribers {
        /// The configured limit.
        limit: usize,
    },
    /// The client read too slowly: its buffer stayed full past the slow-subscriber timeout.
    #[error(
        "subscriber too slow: it took no sample for {} and missed {missed} samples; read \
         faster or ask for a longer interval_ms",
        humantime::format_duration(*stuck_for)
    )]
    TooSlow {
        /// Samples it missed since its last delivery.
        missed: u64,
        /// How long its buffer had been full when it was cut off.
        stuck_for: Duration,
    },
    /// The sampling loop is gone (the server is stopping); the client should reconnect.
    #[error("the sampler stopped; reconnect to continue sampling")]
    Stopped,
}

/// The fan-out's settings (`--default-interval`, `--subscriber-buffer`,
/// `--slow-subscriber-timeout`, `--max-subscribers`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SamplerConfig {
    /// The always-on cadence: in-process consumers get a sample at least this often even with
    /// no subscriber, and streams asking for interval 0 use it. Rounded up to [`BASE_TICK`]s.
    pub server_interval: Duration,
    /// Samples each subscriber may have queued; past it samples are dropped for it (and
    /// counted). Clamped to 1..=[`MAX_SUBSCRIBER_BUFFER`].
    pub subscriber_buffer: usize,
    /// How long a subscriber may take nothing (its buffer full) before it is disconnected.
    pub slow_subscriber_timeout: Duration,
    /// Concurrent subscribers; past it [`Sampler::subscribe`] refuses.
    pub max_subscribers: usize,
}

impl Default for SamplerConfig {
    /// The command line's defaults: see `ServeArgs`.
    fn default() -> Self {
        Self {
            server_interval: Duration::from_secs(1),
            subscriber_buffer: 16,
            slow_subscriber_timeout: Duration::from_secs(30),
            max_subscribers: 10_000,
        }
    }
}

/// When a stream samples and when it ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamPlan {
    /// Time between samples, a multiple of [`BASE_TICK`].
    pub interval: Duration,
    /// Time after the first sample past which no sample is due; `None` = until cancelled.
    pub duration: Option<Duration>,
}

impl StreamPlan {
    /// The plan of a request: `interval_ms` 0 takes `default_interval`, 1..=99 is refused, and
    /// any interval is rounded up to a multiple of [`BASE_TICK`] (the grid samples are shared
    /// on); `duration_ms` 0 means until the client cancels.
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
            interval: grid_duration(ticks_of(interval)),
            duration: (duration_ms > 0).then(|| Duration::from_millis(duration_ms)),
        })
    }

    /// Samples a finite stream receives: the first at once, then one per interval up to the
    /// duration, so 2000 ms at 500 ms is 5 (t = 0, 500, ..., 2000), as the old per-stream loop
    /// sent. `None` for an endless stream.
    pub fn samples_due(&self) -> Option<u64> {
        let interval = self.interval.as_millis().max(1);
        self.duration.map(|duration| {
            u64::try_from(duration.as_millis() / interval)
                .unwrap_or(u64::MAX)
                .saturating_add(1)
        })
    }

    /// Whether a stream that started at `start` has its last sample due by `deadline`: with
    /// the count rule of [`StreamPlan::samples_due`], the last sample is never later than
    /// `start + duration`.
    fn ends_by(&self, start: Instant, deadline: Instant) -> bool {
        self.duration
            .and_then(|duration| start.checked_add(duration))
            .is_some_and(|end| end <= deadline)
    }
}

/// [`BASE_TICK`]s in `interval`, rounded up; at least 1.
fn ticks_of(interval: Duration) -> u64 {
    let ticks = interval
        .as_millis()
        .div_ceil(u128::from(BASE_TICK_MS))
        .max(1);
    u64::try_from(ticks).unwrap_or(u64::MAX)
}

/// `ticks` [`BASE_TICK`]s as a duration, saturating far beyond any real interval.
fn grid_duration(ticks: u64) -> Duration {
    Duration::from_millis(ticks.saturating_mul(BASE_TICK_MS))
}

/// The first slot after slot `n` that is `phase` slots past a multiple of `every`.
fn next_at(n: u64, every: u64, phase: u64) -> u64 {
    let every = every.max(1);
    match n.checked_sub(phase) {
        None => phase,
        Some(past) => (past / every)
            .saturating_add(1)
            .saturating_mul(every)
            .saturating_add(phase),
    }
}

/// Slots in an interval of `ticks` [`BASE_TICK`]s.
fn slots_of(ticks: u64) -> u64 {
    ticks.saturating_mul(PHASES_U64)
}

/// The phase a new subscriber of one interval joins, given how many subscribers of that
/// interval each phase holds and the phase its connection's streams are in (if any).
///
/// Its connection's phase while that has room, so a connection's messages leave together; for
/// a connection not seen yet, the least-filled phase already in use that has room, so that up to
/// [`PHASE_CAPACITY`] everything shares phase 0 (one sample per tick) and phases open one at a
/// time; otherwise the least-filled phase of all (the lowest on a tie), which opens a new one,
/// so that connections that outgrow their phase (all of them, when many open their streams
/// side by side) are dealt over the phases evenly.
fn choose_phase(counts: &[usize; PHASES], connection_phase: Option<usize>) -> usize {
    let least = |open_only: bool| {
        (0..PHASES)
            .filter(|&phase| !open_only || (counts[phase] > 0 && counts[phase] < PHASE_CAPACITY))
            .min_by_key(|&phase| counts[phase])
    };
    match connection_phase {
        Some(phase) if counts.get(phase).is_some_and(|&n| n < PHASE_CAPACITY) => phase,
        Some(_) => least(false).unwrap_or(0),
        None => least(true).or_else(|| least(false)).unwrap_or(0),
    }
}

/// One sample as a subscriber receives it.
#[derive(Clone, Debug, PartialEq)]
pub struct Delivery {
    /// The sample, shared with every subscriber it went to.
    pub sample: Arc<Sample>,
    /// Samples of this subscriber's cadence it missed just before this one because its buffer
    /// was full; 0 when it kept up.
    pub dropped: u64,
}

/// Cheap to clone: all clones share the probe, the counter and the sampling loop.
///
/// The loop runs while any clone is alive and stops when the last one is dropped.
#[derive(Clone, Debug)]
pub struct Sampler {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    core: Arc<Core>,
    config: SamplerConfig,
    /// Unbounded because every command holds a subscriber slot first, so at most
    /// `max_subscribers` can be queued; and registering never waits.
    commands: mpsc::UnboundedSender<Command>,
    /// `Some(deadline)` once the server shuts down: streams that end by then finish, the
    /// others end at once.
    closing: watch::Sender<Option<Instant>>,
    internal: broadcast::Sender<Arc<Sample>>,
    subscribers: Arc<AtomicUsize>,
}

/// What the loop and [`Sampler::snapshot`] share: the probe and the server-wide sample number.
#[derive(Debug)]
struct Core {
    /// A std mutex, never held across an await: a sample is a handful of small reads of
    /// in-memory kernel files (microseconds), cheaper than a hop to the blocking pool, so it is
    /// taken inline on the async worker.
    probe: Mutex<Probe>,
    /// Number of the last sample taken; the first sample is 1.
    seq: AtomicU64,
}

impl Core {
    fn read(&self) -> Sample {
        // A panic while sampling cannot leave the probe inconsistent (it holds open files and
        // nothing else), so a poisoned lock is used as is rather than failing every later call.
        let mut probe = self.probe.lock().unwrap_or_else(PoisonError::into_inner);
        let mut sample = probe.sample();
        // Numbered under the lock, so seq order is the order of the readings.
        sample.seq = self.seq.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        sample
    }
}

impl Sampler {
    /// A sampler over `probe` with the default fan-out settings and `default_interval` as the
    /// server interval.
    ///
    /// # Panics
    /// Outside a Tokio runtime, as `tokio::spawn` does: the sampling loop is spawned here.
    pub fn new(probe: Probe, default_interval: Duration) -> Self {
        Self::with_config(
            probe,
            SamplerConfig {
                server_interval: default_interval,
                ..SamplerConfig::default()
            },
        )
    }

    /// A sampler over `probe`; spawns the sampling loop, which takes its first sample at once.
    ///
    /// # Panics
    /// Outside a Tokio runtime, as `tokio::spawn` does.
    pub fn with_config(probe: Probe, config: SamplerConfig) -> Self {
        let config = SamplerConfig {
            server_interval: grid_duration(ticks_of(config.server_interval)),
            // tokio's channels panic on a zero or enormous capacity.
            subscriber_buffer: config.subscriber_buffer.clamp(1, MAX_SUBSCRIBER_BUFFER),
            ..config
        };
        let core = Arc::new(Core {
            probe: Mutex::new(probe),
            seq: AtomicU64::new(0),
        });
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let (closing, closing_rx) = watch::channel(None);
        let (internal, _) = broadcast::channel(INTERNAL_BUFFER);
        let producer = Producer::new(
            Arc::clone(&core),
            &config,
            commands_rx,
            closing_rx,
            internal.clone(),
        );
        tokio::spawn(producer.run());
        Self {
            shared: Arc::new(Shared {
                core,
                config,
                commands,
                closing,
                internal,
                subscribers: Arc::new(AtomicUsize::new(0)),
            }),
        }
    }

    /// The interval of streams that ask for the server default (rounded up to the grid).
    pub fn default_interval(&self) -> Duration {
        self.shared.config.server_interval
    }

    /// The settings in force (buffer at least 1, server interval on the grid).
    pub fn config(&self) -> SamplerConfig {
        self.shared.config
    }

    /// Takes one fresh sample now, outside the loop (for `GetSnapshot`), and numbers it: `seq`
    /// counts every probe read of the server.
    pub fn snapshot(&self) -> Sample {
        self.shared.core.read()
    }

    /// Probe reads so far (the loop's and [`Sampler::snapshot`]'s): the last `seq` handed out.
    pub fn samples_taken(&self) -> u64 {
        self.shared.core.seq.load(Ordering::Relaxed)
    }

    /// Registers a subscriber per `plan`: it gets the latest sample at once (there is one as
    /// soon as the loop has started), then the samples of its interval's grid points. A finite
    /// stream ends after [`StreamPlan::samples_due`] samples (dropped ones included, so it ends
    /// on time even when slow).
    ///
    /// Refused with [`SampleError::TooManySubscribers`] past `max_subscribers`, and with
    /// [`SampleError::ShuttingDown`] after [`Sampler::close`] unless the stream would end within
    /// the grace. Dropping the [`Subscription`] (the client cancelled) frees its slot at once.
    pub fn subscribe(&self, plan: StreamPlan) -> Result<Subscription, SampleError> {
        self.subscribe_from(plan, None)
    }

    /// [`Sampler::subscribe`] for a stream of the HTTP/2 connection from `peer`: the streams of
    /// one connection are kept in one phase (see the module docs) so their messages leave in
    /// one write. `None` (unknown peer) is treated as a connection of its own.
    pub fn subscribe_from(
        &self,
        plan: StreamPlan,
        peer: Option<SocketAddr>,
    ) -> Result<Subscription, SampleError> {
        let start = Instant::now();
        if let Some(finish_by) = *self.shared.closing.borrow()
            && !plan.ends_by(start, finish_by)
        {
            return Err(SampleError::ShuttingDown);
        }
        let limit = self.shared.config.max_subscribers;
        let slot = SubscriberSlot::take(&self.shared.subscribers, limit)
            .ok_or(SampleError::TooManySubscribers { limit })?;
        let (tx, samples) = mpsc::channel(self.shared.config.subscriber_buffer);
        let (end_tx, end) = oneshot::channel();
        let subscriber = Subscriber {
            tx,
            end: end_tx,
            ticks: ticks_of(plan.interval),
            peer,
            remaining: plan.samples_due(),
            plan,
            start,
            dropped: 0,
            stuck_since: None,
        };
        self.shared
            .commands
            .send(Command::Subscribe(subscriber))
            .map_err(|_| SampleError::Stopped)?;
        Ok(Subscription {
            samples,
            end,
            _slot: slot,
            done: false,
        })
    }

    /// The samples the loop takes on the [`BASE_TICK`] grid, for in-process consumers such as
    /// the alert engine.
    ///
    /// Guarantee: each sample the loop takes from now on at a whole tick (phase 0), in `seq`
    /// order: at least once per server interval and more often while subscribers ask for faster
    /// cadences, at most once per tick. The samples of the other phases (many subscribers, see
    /// the module docs) are not included, nor are readings for [`Sampler::snapshot`], so `seq`
    /// may skip: an alert engine judging 200 samples a second would do 20 times the work for
    /// the same decisions, and would lag behind its buffer under exactly that load. The loop
    /// never waits for a receiver: one that falls more than [`INTERNAL_BUFFER`] samples behind
    /// gets `RecvError::Lagged(missed)` and then continues with the oldest sample still held.
    pub fn subscribe_internal(&self) -> broadcast::Receiver<Arc<Sample>> {
        self.shared.internal.subscribe()
    }

    /// Starts shutdown: streams whose last sample is due by `finish_by` (the end of the grace
    /// period) run to their end, as in-flight calls should; the others, endless streams above
    /// all, end now with [`SampleError::ShuttingDown`] rather than hold the server's exit for
    /// the whole grace period and then be cut. Streams started later follow the same rule.
    pub fn close(&self, finish_by: Instant) {
        self.shared.closing.send_replace(Some(finish_by));
    }

    /// Subscribers currently registered (open `StreamSamples` calls).
    pub fn subscriber_count(&self) -> usize {
        self.shared.subscribers.load(Ordering::Relaxed)
    }
}

/// A subscriber's end of the fan-out: a stream of [`Delivery`]s.
///
/// It ends (`None`) when a finite stream has had all its samples; it yields one error and then
/// ends when the loop cut it off ([`SampleError::TooSlow`], [`SampleError::ShuttingDown`]) or
/// stopped ([`SampleError::Stopped`]). Samples already queued are yielded before that error.
#[derive(Debug)]
pub struct Subscription {
    samples: mpsc::Receiver<Delivery>,
    /// Set by the loop before it drops the sender, so once `samples` reports closed the reason
    /// is here; a dropped sender without a reason means the loop itself went away.
    end: oneshot::Receiver<End>,
    _slot: SubscriberSlot,
    done: bool,
}

impl Stream for Subscription {
    type Item = Result<Delivery, SampleError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(delivery) = ready!(this.samples.poll_recv(cx)) {
            return Poll::Ready(Some(Ok(delivery)));
        }
        let end = ready!(Pin::new(&mut this.end).poll(cx));
        this.done = true;
        Poll::Ready(match end {
            Ok(End::Completed) => None,
            Ok(End::Failed(error)) => Some(Err(error)),
            Err(_) => Some(Err(SampleError::Stopped)),
        })
    }
}

/// Holds one of the `max_subscribers` places until dropped, so a stream that ends or is
/// cancelled (tonic drops it) frees its place however it ends.
#[derive(Debug)]
struct SubscriberSlot(Arc<AtomicUsize>);

impl SubscriberSlot {
    fn take(count: &Arc<AtomicUsize>, limit: usize) -> Option<Self> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(Arc::clone(count)))
    }
}

impl Drop for SubscriberSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Requests to the loop.
#[derive(Debug)]
enum Command {
    Subscribe(Subscriber),
}

/// How a stream ended, as the loop tells its [`Subscription`].
#[derive(Debug)]
enum End {
    Completed,
    Failed(SampleError),
}

/// The loop's side of one subscriber.
#[derive(Debug)]
struct Subscriber {
    tx: mpsc::Sender<Delivery>,
    end: oneshot::Sender<End>,
    ticks: u64,
    /// The client's address, which identifies its HTTP/2 connection.
    peer: Option<SocketAddr>,
    plan: StreamPlan,
    start: Instant,
    /// Samples still due to a finite stream.
    remaining: Option<u64>,
    /// Samples missed since the last delivery.
    dropped: u64,
    /// When its buffer was first found full since its last delivery.
    stuck_since: Option<Instant>,
}

impl Subscriber {
    /// Hands `sample` over without waiting; `Some` when the subscriber is done (finished,
    /// gone, or too slow for too long).
    fn offer(&mut self, sample: &Arc<Sample>, now: Instant, timeout: Duration) -> Option<End> {
        match self.tx.try_reserve() {
            Ok(permit) => {
                permit.send(Delivery {
                    sample: Arc::clone(sample),
                    dropped: self.dropped,
                });
                self.dropped = 0;
                self.stuck_since = None;
            }
            Err(mpsc::error::TrySendError::Full(())) => {
                self.dropped = self.dropped.saturating_add(1);
                let stuck_for = now.saturating_duration_since(*self.stuck_since.get_or_insert(now));
                if stuck_for >= timeout {
                    tracing::warn!(
                        missed = self.dropped,
                        stuck_for_ms = u64::try_from(stuck_for.as_millis()).unwrap_or(u64::MAX),
                        interval_ms = u64::try_from(self.plan.interval.as_millis()).unwrap_or(0),
                        "disconnecting a subscriber that stopped reading"
                    );
                    return Some(End::Failed(SampleError::TooSlow {
                        missed: self.dropped,
                        stuck_for,
                    }));
                }
            }
            // The client cancelled; nobody is left to tell.
            Err(mpsc::error::TrySendError::Closed(())) => return Some(End::Completed),
        }
        let remaining = self.remaining.as_mut()?;
        *remaining = remaining.saturating_sub(1);
        (*remaining == 0).then_some(End::Completed)
    }

    /// Tells the subscription why it ends, then closes its channel (by dropping `self`), in
    /// that order so the reason is there when the stream sees the channel closed.
    fn finish(self, end: End) {
        let _ = self.end.send(end);
    }
}

/// Subscribers of one interval and phase: they share its grid points.
#[derive(Debug)]
struct Group {
    next_due: u64,
    members: Vec<Subscriber>,
}

/// The sampling loop: owns the cadence, the latest sample and the subscribers.
struct Producer {
    core: Arc<Core>,
    commands: mpsc::UnboundedReceiver<Command>,
    closing: watch::Receiver<Option<Instant>>,
    internal: broadcast::Sender<Arc<Sample>>,
    timeout: Duration,
    epoch: Instant,
    server_ticks: u64,
    server_next_due: u64,
    /// Keyed by interval in ticks, then phase.
    groups: BTreeMap<(u64, usize), Group>,
    /// The phase of each connection's streams, per interval in ticks. Rebuilt from the
    /// members at every sweep, so entries of closed connections go within [`SWEEP_EVERY`].
    phases: HashMap<(u64, SocketAddr), usize>,
    latest: Option<Arc<Sample>>,
    finish_by: Option<Instant>,
    last_sweep: Instant,
}

impl Producer {
    fn new(
        core: Arc<Core>,
        config: &SamplerConfig,
        commands: mpsc::UnboundedReceiver<Command>,
        closing: watch::Receiver<Option<Instant>>,
        internal: broadcast::Sender<Arc<Sample>>,
    ) -> Self {
        let epoch = Instant::now();
        Self {
            core,
            commands,
            closing,
            internal,
            timeout: config.slow_subscriber_timeout,
            epoch,
            server_ticks: ticks_of(config.server_interval),
            server_next_due: 0,
            groups: BTreeMap::new(),
            phases: HashMap::new(),
            latest: None,
            finish_by: None,
            last_sweep: epoch,
        }
    }

    async fn run(mut self) {
        // Grid point 0, before any command: every subscriber then finds a latest sample.
        self.tick(0, self.epoch);
        let sleep = tokio::time::sleep_until(self.time_of(self.next_tick()));
        tokio::pin!(sleep);
        loop {
            // Biased, ticks first: the pace must hold even while thousands of clients
            // subscribe at once; the subscriptions wait at most one tick.
            tokio::select! {
                biased;
                () = &mut sleep => {
                    let now = Instant::now();
                    // Late by whole ticks (a stalled machine): sample once for what is
                    // overdue, at the current grid point, and realign instead of bursting.
                    let n = self.next_tick().max(self.grid_index(now));
                    self.tick(n, now);
                }
                changed = self.closing.changed(), if self.finish_by.is_none() => {
                    if changed.is_err() {
                        // The last `Sampler` is gone: nobody can subscribe or read any more.
                        return;
                    }
                    let finish_by = *self.closing.borrow_and_update();
                    if let Some(finish_by) = finish_by {
                        self.close(finish_by);
                    }
                }
                command = self.commands.recv() => match command {
                    Some(Command::Subscribe(subscriber)) => self.add(subscriber, Instant::now()),
                    None => return,
                },
            }
            sleep.as_mut().reset(self.time_of(self.next_tick()));
        }
    }

    /// The slot `at` falls in.
    fn grid_index(&self, at: Instant) -> u64 {
        let elapsed = at.saturating_duration_since(self.epoch).as_millis() / u128::from(SLOT_MS);
        u64::try_from(elapsed).unwrap_or(u64::MAX)
    }

    fn time_of(&self, n: u64) -> Instant {
        // Past Instant's range (hundreds of millions of years) the tick never comes; a year
        // from the epoch is as good as never for a sleep that is reset on every event.
        let far = Duration::from_secs(365 * 24 * 3600);
        self.epoch
            .checked_add(Duration::from_millis(n.saturating_mul(SLOT_MS)))
            .or_else(|| self.epoch.checked_add(far))
            .unwrap_or(self.epoch)
    }

    /// The next slot at which the server interval or some group is due.
    fn next_tick(&self) -> u64 {
        self.groups
            .values()
            .map(|group| group.next_due)
            .fold(self.server_next_due, u64::min)
    }

    /// Takes one sample at slot `n` and hands it to whoever is due.
    fn tick(&mut self, n: u64, now: Instant) {
        let sample = Arc::new(self.core.read());
        // In-process consumers get the whole ticks' samples: those due to the server interval
        // or to a phase-0 group (a late loop may take them at a later slot).
        let whole_tick = self.server_next_due <= n
            || self
                .groups
                .iter()
                .any(|(&(_, phase), group)| phase == 0 && group.next_due <= n);
        if whole_tick {
            // An error only means no in-process consumer is listening right now.
            let _ = self.internal.send(Arc::clone(&sample));
        }
        if self.server_next_due <= n {
            self.server_next_due = next_at(n, slots_of(self.server_ticks), 0);
        }
        let timeout = self.timeout;
        for (&(ticks, phase), group) in &mut self.groups {
            if group.next_due > n {
                continue;
            }
            group.next_due = next_at(n, slots_of(ticks), phase as u64);
            let mut i = 0;
            while let Some(subscriber) = group.members.get_mut(i) {
                match subscriber.offer(&sample, now, timeout) {
                    None => i += 1,
                    Some(end) => group.members.swap_remove(i).finish(end),
                }
            }
        }
        if now.saturating_duration_since(self.last_sweep) >= SWEEP_EVERY {
            self.last_sweep = now;
            self.phases.clear();
            for (&(ticks, phase), group) in &mut self.groups {
                group
                    .members
                    .retain(|subscriber| !subscriber.tx.is_closed());
                for peer in group.members.iter().filter_map(|member| member.peer) {
                    self.phases.insert((ticks, peer), phase);
                }
            }
        }
        self.groups.retain(|_, group| !group.members.is_empty());
        self.latest = Some(sample);
    }

    /// Registers `subscriber`: the latest sample at once, then its interval's grid points.
    fn add(&mut self, mut subscriber: Subscriber, now: Instant) {
        if let Some(finish_by) = self.finish_by
            && !subscriber.plan.ends_by(subscriber.start, finish_by)
        {
            subscriber.finish(End::Failed(SampleError::ShuttingDown));
            return;
        }
        if let Some(latest) = &self.latest
            && let Some(end) = subscriber.offer(latest, now, self.timeout)
        {
            subscriber.finish(end);
            return;
        }
        let ticks = subscriber.ticks;
        let mut counts = [0; PHASES];
        for (&(_, phase), group) in self.groups.range((ticks, 0)..=(ticks, PHASES)) {
            if let Some(count) = counts.get_mut(phase) {
                *count = group.members.len();
            }
        }
        let connection_phase = subscriber
            .peer
            .and_then(|peer| self.phases.get(&(ticks, peer)).copied());
        let phase = choose_phase(&counts, connection_phase);
        if let Some(peer) = subscriber.peer {
            self.phases.insert((ticks, peer), phase);
        }
        // A new interval starts at its next grid point after now, not after the last tick, so
        // a loop that was idle does not fire an overdue sample just for it.
        let current = self.grid_index(now);
        self.groups
            .entry((ticks, phase))
            .or_insert_with(|| Group {
                next_due: next_at(current, slots_of(ticks), phase as u64),
                members: Vec::new(),
            })
            .members
            .push(subscriber);
    }

    /// Shutdown: ends at once every stream that would outlive `finish_by`.
    fn close(&mut self, finish_by: Instant) {
        self.finish_by = Some(finish_by);
        for group in self.groups.values_mut() {
            let mut i = 0;
            while let Some(subscriber) = group.members.get(i) {
                if subscriber.plan.ends_by(subscriber.start, finish_by) {
                    i += 1;
                } else {
                    group
                        .members
                        .swap_remove(i)
                        .finish(End::Failed(SampleError::ShuttingDown));
                }
            }
        }
        self.groups.retain(|_, group| !group.members.is_empty());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use tokio_stream::StreamExt;

    use super::*;
    use crate::probe::ProbeConfig;

    fn sampler() -> Sampler {
        Sampler::new(Probe::new(ProbeConfig::default()), Duration::from_secs(1))
    }

    fn sampler_with(config: SamplerConfig) -> Sampler {
        Sampler::with_config(Probe::new(ProbeConfig::default()), config)
    }

    fn plan(interval_ms: u32, duration_ms: u64) -> StreamPlan {
        StreamPlan::new(interval_ms, duration_ms, Duration::from_secs(1)).unwrap()
    }

    const fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn plan_validation_and_rounding() {
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
                interval: ms(100),
                duration: Some(ms(2500)),
            })
        );
        // Rounded up onto the 100 ms grid, the default interval too.
        assert_eq!(StreamPlan::new(150, 0, default).unwrap().interval, ms(200));
        assert_eq!(StreamPlan::new(0, 0, ms(101)).unwrap().interval, ms(200));
        assert_eq!(
            StreamPlan::new(u32::MAX, 0, default).unwrap().interval,
            Duration::from_millis(4_294_967_300)
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
    fn count_rule_matches_the_per_stream_loop() {
        assert_eq!(plan(500, 2000).samples_due(), Some(5));
        assert_eq!(plan(1000, 2500).samples_due(), Some(3));
        assert_eq!(plan(100, 300).samples_due(), Some(4));
        assert_eq!(plan(500, 100).samples_due(), Some(1));
        assert_eq!(plan(100, 0).samples_due(), None);
        assert_eq!(plan(100, u64::MAX).samples_due(), Some(u64::MAX / 100 + 1));
    }

    #[test]
    fn ends_by_never_overflows() {
        let plan = plan(100, u64::MAX);
        let now = Instant::now();
        assert!(!plan.ends_by(now, now + Duration::from_secs(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn snapshots_are_numbered_with_the_loops_samples() {
        let sampler = sampler();
        // Let the loop take its first sample (seq 1).
        tokio::time::sleep(ms(1)).await;
        assert_eq!(sampler.samples_taken(), 1);
        assert_eq!(sampler.snapshot().seq, 2);
        assert_eq!(sampler.clone().snapshot().seq, 3);
        assert!(sampler.snapshot().process.rss_bytes > 0);
    }

    async fn collect(mut subscription: Subscription) -> Vec<(Duration, u64)> {
        let start = Instant::now();
        let mut seen = Vec::new();
        while let Some(item) = subscription.next().await {
            let delivery = item.unwrap();
            assert_eq!(delivery.dropped, 0);
            seen.push((start.elapsed(), delivery.sample.seq));
        }
        seen
    }

    #[tokio::test(start_paused = true)]
    async fn finite_stream_sends_every_tick_up_to_the_duration() {
        let sampler = sampler();
        let seen = collect(sampler.subscribe(plan(500, 2000)).unwrap()).await;
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
        assert_eq!(sampler.subscriber_count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn finite_stream_off_the_grid_phase_keeps_the_count_and_ends_in_time() {
        let sampler = sampler();
        tokio::time::sleep(ms(730)).await;
        // Joins 30 ms after a 100 ms grid point: the latest sample at once, then 500 ms points.
        let seen = collect(sampler.subscribe(plan(500, 2000)).unwrap()).await;
        let times: Vec<Duration> = seen.iter().map(|(at, _)| *at).collect();
        assert_eq!(times, vec![ms(0), ms(270), ms(770), ms(1270), ms(1770)]);
    }

    #[tokio::test(start_paused = true)]
    async fn duration_between_ticks_ends_after_the_last_tick_inside_it() {
        let sampler = sampler();
        let seen = collect(sampler.subscribe(plan(1000, 2500)).unwrap()).await;
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[2].0, Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn default_interval_and_cancellation() {
        let sampler = sampler();
        let mut subscription = sampler.subscribe(plan(0, 0)).unwrap();
        let start = Instant::now();
        assert_eq!(subscription.next().await.unwrap().unwrap().sample.seq, 1);
        assert_eq!(subscription.next().await.unwrap().unwrap().sample.seq, 2);
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        assert_eq!(sampler.subscriber_count(), 1);
        // The slot is freed as soon as the stream is dropped, not at the next tick.
        drop(subscription);
        assert_eq!(sampler.subscriber_count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn close_ends_endless_streams_with_shutting_down() {
        let sampler = sampler();
        let mut subscription = sampler.subscribe(plan(0, 0)).unwrap();
        assert!(subscription.next().await.unwrap().is_ok());
        sampler.close(Instant::now() + Duration::from_secs(3600));
        assert_eq!(
            subscription.next().await.unwrap(),
            Err(SampleError::ShuttingDown)
        );
        assert!(subscription.next().await.is_none());

        assert_eq!(
            sampler.subscribe(plan(0, 0)).unwrap_err(),
            SampleError::ShuttingDown
        );
        // A stream short enough to end within the grace is still served.
        assert_eq!(
            collect(sampler.subscribe(plan(100, 200)).unwrap())
                .await
                .len(),
            3
        );
    }

    #[tokio::test(start_paused = true)]
    async fn close_lets_streams_that_end_within_the_grace_finish() {
        let sampler = sampler();
        let within = sampler.subscribe(plan(500, 2000)).unwrap();
        let mut beyond = sampler.subscribe(plan(500, 60_000)).unwrap();
        tokio::time::sleep(ms(10)).await;
        sampler.close(Instant::now() + Duration::from_secs(25));

        let seen = collect(within).await;
        assert_eq!(seen.len(), 5, "{seen:?}");

        assert!(beyond.next().await.unwrap().is_ok());
        assert_eq!(beyond.next().await.unwrap(), Err(SampleError::ShuttingDown));
        assert!(beyond.next().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_sampler_ends_streams_with_stopped() {
        let sampler = sampler();
        let mut subscription = sampler.subscribe(plan(100, 0)).unwrap();
        assert!(subscription.next().await.unwrap().is_ok());
        drop(sampler);
        let mut last = None;
        while let Some(item) = subscription.next().await {
            last = Some(item);
        }
        assert_eq!(last, Some(Err(SampleError::Stopped)));
    }

    /// 200 subscribers at 100 ms, 20 of which never read for 5 s.
    #[tokio::test(start_paused = true)]
    async fn slow_subscribers_neither_block_the_loop_nor_the_others() {
        let sampler = sampler_with(SamplerConfig::default());
        let start = Instant::now();
        let mut fast = Vec::new();
        let mut slow = Vec::new();
        for i in 0..200 {
            let subscription = sampler.subscribe(plan(100, 0)).unwrap();
            if i % 10 == 0 {
                slow.push(subscription);
            } else {
                fast.push(tokio::spawn(async move {
                    let mut subscription = subscription;
                    let mut seen = Vec::new();
                    let until = start + ms(5050);
                    while let Ok(Some(item)) =
                        tokio::time::timeout_at(until, subscription.next()).await
                    {
                        let delivery = item.unwrap();
                        seen.push((start.elapsed(), delivery.sample.seq, delivery.dropped));
                    }
                    seen
                }));
            }
        }
        assert_eq!(sampler.subscriber_count(), 200);
        tokio::time::sleep_until(start + ms(5050)).await;

        // One probe read per 100 ms tick, whatever the 20 slow ones do: t = 0, 100, ..., 5000.
        assert_eq!(sampler.samples_taken(), 51);
        let expected: Vec<(Duration, u64, u64)> =
            (0..51).map(|i| (ms(i * 100), i + 1, 0)).collect();
        assert_eq!(fast.len(), 180);
        for reader in fast {
            assert_eq!(reader.await.unwrap(), expected);
        }

        // The slow ones kept their 16 oldest samples, and the next one says what they missed.
        for subscription in &mut slow {
            for seq in 1..=16 {
                let delivery = subscription.next().await.unwrap().unwrap();
                assert_eq!((delivery.sample.seq, delivery.dropped), (seq, 0));
            }
        }
        for subscription in &mut slow {
            let next = subscription.next().await.unwrap().unwrap();
            assert_eq!((next.sample.seq, next.dropped), (52, 51 - 16));
        }
        for subscription in &mut slow {
            let after = subscription.next().await.unwrap().unwrap();
            assert_eq!((after.sample.seq, after.dropped), (53, 0));
        }
        assert_eq!(sampler.samples_taken(), 53);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_subscriber_is_disconnected_after_the_timeout() {
        let sampler = sampler_with(SamplerConfig {
            slow_subscriber_timeout: Duration::from_secs(30),
            ..SamplerConfig::default()
        });
        let start = Instant::now();
        let mut stuck = sampler.subscribe(plan(100, 0)).unwrap();
        let reader = sampler.subscribe(plan(100, 0)).unwrap();
        let reader = tokio::spawn(seqs_until(reader, start + ms(31_950)));
        // Full after 16 samples (t = 1.5 s); first miss at 1.6 s; cut off 30 s later.
        tokio::time::sleep_until(start + ms(31_550)).await;
        assert_eq!(sampler.subscriber_count(), 2);
        tokio::time::sleep_until(start + ms(31_650)).await;
        for seq in 1..=16 {
            assert_eq!(stuck.next().await.unwrap().unwrap().sample.seq, seq);
        }
        let error = stuck.next().await.unwrap().unwrap_err();
        assert_eq!(
            error,
            SampleError::TooSlow {
                missed: 301,
                stuck_for: Duration::from_secs(30)
            }
        );
        assert_eq!(
            error.to_string(),
            "subscriber too slow: it took no sample for 30s and missed 301 samples; read \
             faster or ask for a longer interval_ms"
        );
        assert!(stuck.next().await.is_none());
        drop(stuck);
        assert_eq!(sampler.subscriber_count(), 1);
        // The reader was not affected: every sample, t = 0, 100, ..., 31 900 ms.
        assert_eq!(reader.await.unwrap(), (1..=320).collect::<Vec<_>>());
    }

    #[tokio::test(start_paused = true)]
    async fn a_subscriber_that_reads_again_in_time_stays() {
        let sampler = sampler_with(SamplerConfig {
            slow_subscriber_timeout: Duration::from_secs(2),
            ..SamplerConfig::default()
        });
        let mut subscription = sampler.subscribe(plan(100, 0)).unwrap();
        let start = Instant::now();
        // Full at 1.5 s, first miss at 1.6 s: reading at 3.55 s is within the 2 s bound.
        tokio::time::sleep_until(start + ms(3550)).await;
        for _ in 0..16 {
            subscription.next().await.unwrap().unwrap();
        }
        let next = subscription.next().await.unwrap().unwrap();
        assert_eq!(next.dropped, 20);
        assert_eq!(start.elapsed(), ms(3600));
    }

    #[tokio::test(start_paused = true)]
    async fn the_subscriber_cap_is_enforced_and_freed() {
        let sampler = sampler_with(SamplerConfig {
            max_subscribers: 2,
            ..SamplerConfig::default()
        });
        let first = sampler.subscribe(plan(100, 0)).unwrap();
        let _second = sampler.subscribe(plan(100, 0)).unwrap();
        let error = sampler.subscribe(plan(100, 0)).unwrap_err();
        assert_eq!(error, SampleError::TooManySubscribers { limit: 2 });
        assert!(error.to_string().contains("at most 2"), "{error}");
        drop(first);
        let _third = sampler.subscribe(plan(100, 0)).unwrap();
        // A finished stream frees its place too.
        drop(_third);
        let short = sampler.subscribe(plan(100, 100)).unwrap();
        assert_eq!(collect(short).await.len(), 2);
        assert_eq!(sampler.subscriber_count(), 1);
    }

    async fn seqs_until(mut subscription: Subscription, until: Instant) -> Vec<u64> {
        let mut seqs = Vec::new();
        while let Ok(Some(item)) = tokio::time::timeout_at(until, subscription.next()).await {
            seqs.push(item.unwrap().sample.seq);
        }
        seqs
    }

    #[tokio::test(start_paused = true)]
    async fn one_loop_serves_every_interval_from_shared_samples() {
        let sampler = sampler();
        let start = Instant::now();
        let until = start + ms(3050);
        let fast = tokio::spawn(seqs_until(sampler.subscribe(plan(100, 0)).unwrap(), until));
        let mid = tokio::spawn(seqs_until(sampler.subscribe(plan(300, 0)).unwrap(), until));
        let slow = tokio::spawn(seqs_until(sampler.subscribe(plan(1000, 0)).unwrap(), until));
        let (fast, mid, slow) = (fast.await.unwrap(), mid.await.unwrap(), slow.await.unwrap());
        // 31 probe reads in all (t = 0, 100, ..., 3000), not one per subscriber per tick.
        assert_eq!(sampler.samples_taken(), 31);
        assert_eq!(fast, (1..=31).collect::<Vec<_>>());
        // Grid points 0, 3, 6, ..., 30 and 0, 10, 20, 30: the same samples the fast one got.
        assert_eq!(mid, (0..=10).map(|i| i * 3 + 1).collect::<Vec<_>>());
        assert_eq!(slow, vec![1, 11, 21, 31]);
    }

    #[tokio::test(start_paused = true)]
    async fn grid_points_nobody_needs_are_not_sampled() {
        let sampler = sampler();
        let start = Instant::now();
        let until = start + ms(3050);
        let mid = tokio::spawn(seqs_until(sampler.subscribe(plan(300, 0)).unwrap(), until));
        let mid = mid.await.unwrap();
        // Reads at grid points 0, 3, 6, 9, 10 (server), 12, 15, 18, 20, 21, 24, 27, 30.
        assert_eq!(sampler.samples_taken(), 13);
        assert_eq!(mid.len(), 11);
    }

    #[test]
    fn slots_of_a_phase() {
        // Phase 0 of a 100 ms interval is the old grid: slots 0, 20, 40, ...
        assert_eq!(next_at(0, 20, 0), 20);
        assert_eq!(next_at(19, 20, 0), 20);
        assert_eq!(next_at(20, 20, 0), 40);
        // Phase 3: slots 3, 23, 43, ...
        assert_eq!(next_at(0, 20, 3), 3);
        assert_eq!(next_at(3, 20, 3), 23);
        assert_eq!(next_at(22, 20, 3), 23);
        assert_eq!(next_at(u64::MAX - 1, 20, 3), u64::MAX);
    }

    /// Where `arrivals` (each a connection number) end up: the phase of every stream, and the
    /// subscribers per phase.
    fn deal(arrivals: impl IntoIterator<Item = usize>) -> (Vec<usize>, [usize; PHASES]) {
        let mut counts = [0; PHASES];
        let mut of_connection = HashMap::new();
        let mut phases = Vec::new();
        for connection in arrivals {
            let phase = choose_phase(&counts, of_connection.get(&connection).copied());
            of_connection.insert(connection, phase);
            counts[phase] += 1;
            phases.push(phase);
        }
        (phases, counts)
    }

    #[test]
    fn few_subscribers_share_phase_zero() {
        // 500 streams of one interval, on 5 connections or on 500: one phase, one sample.
        let (phases, _) = deal((0..5).flat_map(|c| std::iter::repeat_n(c, 100)));
        assert!(phases.iter().all(|&phase| phase == 0));
        let (phases, _) = deal(0..PHASE_CAPACITY);
        assert!(phases.iter().all(|&phase| phase == 0));
    }

    #[test]
    fn connections_opened_one_after_another_fill_phases_in_turn() {
        // 100 connections of 100 streams each, one connection at a time.
        let (phases, counts) = deal((0..100).flat_map(|c| std::iter::repeat_n(c, 100)));
        assert_eq!(counts, [PHASE_CAPACITY; PHASES]);
        // Every connection's streams in a single phase.
        for streams in phases.chunks(100) {
            assert!(streams.iter().all(|&phase| phase == streams[0]));
        }
    }

    #[test]
    fn connections_opened_side_by_side_are_dealt_evenly_and_kept_together() {
        // 100 connections opening their 100 streams in turn, one stream each at a time.
        let (phases, counts) = deal((0..100).flat_map(|_| 0..100));
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(
            *max <= PHASE_CAPACITY + 100 && *min >= PHASE_CAPACITY - 100,
            "{counts:?}"
        );
        // Each connection in few phases (not 20): phase 0, which the first streams of every
        // connection filled, the one it moved to, and another whenever that one filled up, which
        // happens more often as every phase nears its capacity at the end.
        let mut spread = Vec::new();
        for connection in 0..100 {
            let mut used: Vec<usize> = phases
                .iter()
                .skip(connection)
                .step_by(100)
                .copied()
                .collect();
            used.sort_unstable();
            used.dedup();
            spread.push(used.len());
        }
        assert!(spread.iter().sum::<usize>() <= 300, "{spread:?}");
        assert!(spread.iter().all(|&n| n <= 5), "{spread:?}");
    }

    #[test]
    fn past_capacity_every_phase_takes_more() {
        let (_, counts) = deal(0..PHASES * PHASE_CAPACITY + 40);
        assert_eq!(counts.iter().sum::<usize>(), PHASES * PHASE_CAPACITY + 40);
        assert!(
            counts.iter().all(|&n| n == PHASE_CAPACITY + 2),
            "{counts:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn many_subscribers_get_fresh_samples_at_their_own_slot() {
        let sampler = sampler_with(SamplerConfig {
            max_subscribers: 2000,
            ..SamplerConfig::default()
        });
        tokio::time::sleep(ms(1)).await;
        let mut internal = sampler.subscribe_internal();
        let start = Instant::now();
        let until = start + ms(1000);
        // 1,200 subscribers at 100 ms: phases 0, 1, 2 with 500, 500 and 200 of them.
        let mut readers = Vec::new();
        for _ in 0..1200 {
            let subscription = sampler.subscribe(plan(100, 0)).unwrap();
            readers.push(tokio::spawn(async move {
                let mut subscription = subscription;
                let mut seen = Vec::new();
                while let Ok(Some(item)) = tokio::time::timeout_at(until, subscription.next()).await
                {
                    seen.push((Instant::now(), item.unwrap().sample.seq));
                }
                seen
            }));
        }
        let mut slots = HashMap::new();
        for (i, reader) in readers.into_iter().enumerate() {
            let seen = reader.await.unwrap();
            // The latest sample at once, then one every 100 ms exactly.
            assert_eq!(seen.len(), 11, "subscriber {i}");
            let times: Vec<Duration> = seen.iter().skip(1).map(|(at, _)| *at - start).collect();
            for pair in times.windows(2) {
                assert_eq!(pair[1] - pair[0], ms(100));
            }
            let phase = match i {
                0..500 => 0,
                500..1000 => 1,
                _ => 2,
            };
            // Its slot in the tick, phase × 5 ms past the loop's start (1 ms before `start`):
            // phase 0 waits for the next tick, the others come within the first one.
            let first = [ms(99), ms(4), ms(9)][phase];
            assert_eq!(times[0], first, "subscriber {i}");
            *slots.entry(phase).or_insert(0) += 1;
        }
        assert_eq!(slots, HashMap::from([(0, 500), (1, 500), (2, 200)]));
        // Three fresh readings per tick (one per phase) over ten ticks, plus the first one and
        // the server interval's (which falls on phase 0's).
        assert_eq!(sampler.samples_taken(), 31);
        // In-process consumers get phase 0's, one per tick.
        let mut whole_ticks = 0;
        while internal.try_recv().is_ok() {
            whole_ticks += 1;
        }
        assert_eq!(whole_ticks, 10);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_subscriber_gets_the_latest_sample_at_once() {
        let sampler = sampler();
        // Server interval 1 s: samples at t = 0, 1, 2 s.
        tokio::time::sleep(ms(2550)).await;
        let mut subscription = sampler.subscribe(plan(1000, 0)).unwrap();
        let joined = Instant::now();
        let first = subscription.next().await.unwrap().unwrap();
        assert_eq!(joined.elapsed(), Duration::ZERO);
        assert_eq!((first.sample.seq, first.dropped), (3, 0));
        let second = subscription.next().await.unwrap().unwrap();
        assert_eq!(second.sample.seq, 4);
        assert_eq!(joined.elapsed(), ms(450));
    }

    #[tokio::test(start_paused = true)]
    async fn in_process_consumers_get_every_sample_of_the_loop() {
        let sampler = sampler();
        tokio::time::sleep(ms(10)).await;
        let mut internal = sampler.subscribe_internal();
        // No subscriber: the server interval (1 s).
        let start = Instant::now();
        assert_eq!(internal.recv().await.unwrap().seq, 2);
        assert_eq!(start.elapsed(), ms(990));
        // With a 100 ms subscriber: every 100 ms.
        let _subscription = sampler.subscribe(plan(100, 0)).unwrap();
        for seq in 3..=12 {
            assert_eq!(internal.recv().await.unwrap().seq, seq);
        }
        assert_eq!(start.elapsed(), ms(1990));
    }

    #[tokio::test(start_paused = true)]
    async fn out_of_range_buffers_are_clamped() {
        let huge = sampler_with(SamplerConfig {
            subscriber_buffer: usize::MAX,
            ..SamplerConfig::default()
        });
        assert_eq!(huge.config().subscriber_buffer, MAX_SUBSCRIBER_BUFFER);
        assert!(huge.subscribe(plan(100, 0)).is_ok());

        let sampler = sampler_with(SamplerConfig {
            subscriber_buffer: 0,
            ..SamplerConfig::default()
        });
        assert_eq!(sampler.config().subscriber_buffer, 1);
        let mut subscription = sampler.subscribe(plan(100, 0)).unwrap();
        tokio::time::sleep(ms(250)).await;
        assert_eq!(subscription.next().await.unwrap().unwrap().dropped, 0);
        let next = subscription.next().await.unwrap().unwrap();
        assert_eq!((next.sample.seq, next.dropped), (4, 2));
    }
}
