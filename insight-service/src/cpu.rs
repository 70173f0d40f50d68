//! CPU-heavy work over large inputs runs on a few low-priority threads, not on the async workers.
//!
//! The async workers also answer health checks and admission refusals, which must take
//! microseconds; a worker inside a long synchronous computation answers nothing until it
//! returns, and on a two-core node both workers can be inside one. Scanning a 100 KB chunk
//! for sentiment (the map step of every remote call) or summarizing it locally is a millisecond
//! or more, so above [`OFFLOAD_BYTES`] of input such work is handed to the offload threads;
//! below it the hand-off (two thread wake-ups) would cost more than the work, which runs inline.
//!
//! The offload threads are this module's own, not Tokio's blocking pool, for two reasons:
//! there are only [`offload_threads`] of them (the blocking pool would start up to 512, which
//! the OS schedules as equals of the workers), and on Linux each runs [`OFFLOAD_NICE_STEP`]
//! nice levels below the workers. Off the workers is not enough by itself: on a busy node the
//! kernel may let an offloaded scan run on for its time slice (up to a few milliseconds) before
//! a worker woken by a health check or a new call gets the core. A much nicer thread is
//! preempted almost at once, and still gets the cores whenever the workers are idle, which is
//! most of the time. A thread's nice value can only be raised without privileges, so the
//! threads keep theirs for good and run nothing else. (On the two-core benchmark machine,
//! where the load generator shares the cores, the refusal and health-check latencies of
//! `overload-bench` did not move measurably either way: BENCHMARKS.md, "insight-service:
//! overload".)

use std::{
    panic::{self, AssertUnwindSafe},
    sync::{Arc, Mutex, OnceLock, mpsc},
    time::Duration,
};

use tokio::{sync::Semaphore, time::Instant};

/// Input size from which [`run`] offloads: 16 KiB of text scans in ~0.1 ms, about where a
/// computation starts to delay the other calls of its worker noticeably.
pub const OFFLOAD_BYTES: usize = 16 * 1024;

/// How many nice levels the offload threads run below the workers (Linux; capped at 19, the
/// lowest priority). 10 levels weigh ~9× less than the process's own threads under CFS/EEVDF:
/// enough for a woken worker to preempt them almost at once, while they still get about a
/// tenth of a contended core.
pub const OFFLOAD_NICE_STEP: i32 = 10;

/// How many offload threads are started, and so how many offloaded computations run at once:
/// every core but one (at least one), so that however many large chunks are in flight, a core
/// is left for the async workers.
pub fn offload_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |cores| cores.get().saturating_sub(1).max(1))
}

/// A computation handed to the offload threads.
type Job = Box<dyn FnOnce() + Send>;

/// The offload threads, started on first use, shared by every runtime of the process.
struct Offload {
    /// Their queue.
    jobs: mpsc::Sender<Job>,
    /// One permit per thread that started: a computation is handed over only when a thread is
    /// free for it, so a caller that gives up while waiting for a permit leaves no work behind
    /// in the queue.
    permits: Arc<Semaphore>,
}

/// The offload threads; `None` if none could be started (then work runs inline, which is
/// slower to answer around but correct).
fn offload() -> Option<&'static Offload> {
    static OFFLOAD: OnceLock<Option<Offload>> = OnceLock::new();
    OFFLOAD
        .get_or_init(|| {
            let (jobs, receiver) = mpsc::channel::<Job>();
            let receiver = Arc::new(Mutex::new(receiver));
            let started = (0..offload_threads())
                .filter(|n| {
                    let receiver = Arc::clone(&receiver);
                    std::thread::Builder::new()
                        .name(format!("insight-cpu-{n}"))
                        .spawn(move || offload_thread(&receiver))
                        .map_err(|error| {
                            tracing::warn!(%error, "cannot start a CPU offload thread");
                        })
                        .is_ok()
                })
                .count();
            (started > 0).then(|| Offload {
                jobs,
                permits: Arc::new(Semaphore::new(started)),
            })
        })
        .as_ref()
}

/// The body of an offload thread: lower its priority, then run jobs for as long as the process
/// lives. Nothing a job does can end the thread: a job catches the panics of its work, and a
/// panic while the job drops an answer nobody waits for any more is caught here.
fn offload_thread(jobs: &Mutex<mpsc::Receiver<Job>>) {
    lower_priority();
    loop {
        // The lock is held only while waiting (the guard is dropped at the end of the
        // statement); it cannot be poisoned, as no job runs under it.
        let job = jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .recv();
        match job {
            Ok(job) => {
                let _ = panic::catch_unwind(AssertUnwindSafe(job));
            }
            // The queue's sender lives in a static: never reached.
            Err(mpsc::RecvError) => return,
        }
    }
}

/// Moves the calling thread [`OFFLOAD_NICE_STEP`] nice levels below where it is (an offload
/// thread starts at the nice value of the thread that first offloaded, normally a worker at the
/// process's value; capped at 19). On Linux `setpriority(PRIO_PROCESS, 0, ..)` applies to the
/// calling thread only (see setpriority(2), BUGS); elsewhere it would renice the whole
/// process, so it is not done. Should the kernel refuse, the thread keeps its priority and
/// only a debug line says so: nothing else depends on it.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{getpriority_process, setpriority_process};
        let lowered = getpriority_process(None)
            .and_then(|nice| setpriority_process(None, (nice + OFFLOAD_NICE_STEP).min(19)));
        if let Err(error) = lowered {
            tracing::debug!(%error, "the CPU offload thread keeps its priority");
        }
    }
}

/// Whether [`run`] hands work over `input_bytes` of input to the offload threads ([`run_on`]
/// copies borrowed input only then).
fn offloads(input_bytes: usize) -> bool {
    input_bytes >= OFFLOAD_BYTES
}

/// Runs `work`, whose input is `input_bytes` long, inline when that is small (or when there is
/// no Tokio runtime) and on the offload threads otherwise, at most [`offload_threads`] at
/// once, and returns its result.
///
/// A panic in `work` is resumed here, as if it had run inline. Dropping the future does not
/// stop work already handed over; it runs to its end (bounded by its input) and is discarded.
pub async fn run<T, F>(input_bytes: usize, work: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    // Outside a Tokio runtime (a plain executor, a synchronous test) the calling thread has
    // nothing else to do while it waits, so the work runs there.
    if !offloads(input_bytes) || tokio::runtime::Handle::try_current().is_err() {
        return work();
    }
    let Some(offload) = offload() else {
        return work();
    };
    // Held by the work itself, so it is released when the work ends, not when a caller that
    // stopped waiting drops this future.
    let Ok(permit) = Arc::clone(&offload.permits).acquire_owned().await else {
        // Never closed; were it, running inline is still correct.
        return work();
    };
    let (answer, result) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        let _permit = permit;
        let _ = answer.send(panic::catch_unwind(AssertUnwindSafe(work)));
    });
    if let Err(mpsc::SendError(job)) = offload.jobs.send(job) {
        // The receiving end is gone (the threads never let it go): run here.
        job();
    }
    match result.await {
        Ok(Ok(value)) => value,
        Ok(Err(panicked)) => panic::resume_unwind(panicked),
        // A job always answers before it is dropped (its work's panics are caught), and the
        // threads outlive every job; were that ever broken, fail loudly rather than hang.
        Err(_) => panic::resume_unwind(Box::new("an offloaded computation ended unanswered")),
    }
}

/// [`run`] over borrowed `items` (`input_bytes` of them): `work` sees them in place when they
/// are small, or a copy on an offload thread (which needs owned input) when they are large, so
/// they are copied only then.
pub async fn run_on<I, T, F>(items: &[I], input_bytes: usize, work: F) -> T
where
    I: Clone + Send + 'static,
    T: Send + 'static,
    F: FnOnce(&[I]) -> T + Send + 'static,
{
    if !offloads(input_bytes) {
        return work(items);
    }
    let owned = items.to_vec();
    run(input_bytes, move || work(&owned)).await
}

/// Longest stretch a [`Pacer`] lets a loop run before it yields to the worker's other tasks.
pub const SLICE: Duration = Duration::from_micros(500);

/// Makes a loop over items that are all ready at once (inline entries, locally summarized
/// chunks) yield to the worker every [`SLICE`], so that thousands of cheap steps do not add up
/// to one long poll. Tokio's own budget only counts Tokio resources, which such a loop never
/// touches.
#[derive(Debug)]
pub struct Pacer {
    since: Instant,
}

impl Pacer {
    /// A pacer whose first slice starts now.
    pub fn new() -> Self {
        Self {
            since: Instant::now(),
        }
    }

    /// Call once per step: yields when the current slice is used up.
    pub async fn step(&mut self) {
        if self.since.elapsed() >= SLICE {
            tokio::task::yield_now().await;
            self.since = Instant::now();
        }
    }
}

impl Default for Pacer {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn small_work_runs_inline_and_large_work_on_an_offload_thread() {
        let caller = std::thread::current().id();
        let inline = run(OFFLOAD_BYTES - 1, move || std::thread::current().id()).await;
        assert_eq!(inline, caller);
        let offloaded = run(OFFLOAD_BYTES, move || {
            let thread = std::thread::current();
            (thread.id(), thread.name().map(str::to_owned))
        })
        .await;
        assert_ne!(offloaded.0, caller);
        let name = offloaded.1.unwrap_or_default();
        assert!(name.starts_with("insight-cpu-"), "{name}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn offloaded_work_runs_at_most_offload_threads_at_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let calls = (0..8).map(|_| {
            let (running, most) = (Arc::clone(&running), Arc::clone(&most));
            tokio::spawn(run(OFFLOAD_BYTES, move || {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
                running.fetch_sub(1, Ordering::SeqCst);
            }))
        });
        for call in calls.collect::<Vec<_>>() {
            call.await.unwrap();
        }
        // Other tests of this binary may hold permits too, so the cap bounds ours from above.
        let most = most.load(Ordering::SeqCst);
        assert!((1..=offload_threads()).contains(&most), "{most}");
    }

    /// The point of the offload threads: they run below the workers' priority, so a worker
    /// woken by a health check or a refusal preempts them.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn offload_threads_run_nicer_than_the_caller() {
        use rustix::process::getpriority_process;
        let caller = getpriority_process(None).unwrap();
        if caller >= 19 {
            eprintln!("skipped: the tests run at nice {caller}, there is no lower priority");
            return;
        }
        let offloaded = run(OFFLOAD_BYTES, || getpriority_process(None).unwrap()).await;
        // The threads took the nice value of whichever thread started them (a test thread,
        // like this one, at the process's nice value) and went OFFLOAD_NICE_STEP below it.
        assert_eq!(offloaded, (caller + OFFLOAD_NICE_STEP).min(19));
        // Inline work keeps the caller's.
        assert_eq!(run(1, || getpriority_process(None).unwrap()).await, caller);
    }

    /// Work is handed over only once a thread is free for it: a caller that gives up while
    /// every thread is busy leaves nothing in the queue to run later for nobody.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_caller_that_gives_up_before_a_thread_is_free_leaves_no_work_behind() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let open = Arc::new(AtomicBool::new(false));
        let offload = offload().unwrap();
        // Occupy every offload thread (other tests of this binary may hold some already).
        let blockers: Vec<_> = (0..offload_threads())
            .map(|_| {
                let open = Arc::clone(&open);
                tokio::spawn(run(OFFLOAD_BYTES, move || {
                    while !open.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }))
            })
            .collect();
        while offload.permits.available_permits() > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let ran = Arc::new(AtomicBool::new(false));
        let gave_up = {
            let ran = Arc::clone(&ran);
            tokio::spawn(run(OFFLOAD_BYTES, move || {
                ran.store(true, Ordering::SeqCst)
            }))
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        gave_up.abort();
        assert!(gave_up.await.unwrap_err().is_cancelled());
        open.store(true, Ordering::SeqCst);
        for blocker in blockers {
            blocker.await.unwrap();
        }
        // The queue is first in, first out: once a later job has run, an earlier one would have.
        run(OFFLOAD_BYTES, || ()).await;
        assert!(
            !ran.load(Ordering::SeqCst),
            "work of a caller that gave up ran"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_pacer_yields_only_once_its_slice_is_used_up() {
        let mut pacer = Pacer::new();
        // Steps that take no (paused) time never yield.
        for _ in 0..1000 {
            assert!(futures::poll!(std::pin::pin!(pacer.step())).is_ready());
        }
        tokio::time::advance(SLICE).await;
        {
            let mut step = std::pin::pin!(pacer.step());
            assert!(
                futures::poll!(step.as_mut()).is_pending(),
                "the slice is used up"
            );
            assert!(futures::poll!(step.as_mut()).is_ready());
        }
        // The yield started a new slice.
        assert!(futures::poll!(std::pin::pin!(pacer.step())).is_ready());
    }

    #[test]
    fn without_a_runtime_large_work_runs_inline() {
        let caller = std::thread::current().id();
        let ran_on = futures::executor::block_on(run(OFFLOAD_BYTES * 4, move || {
            std::thread::current().id()
        }));
        assert_eq!(ran_on, caller);
    }

    #[tokio::test]
    async fn a_panic_in_offloaded_work_reaches_the_caller() {
        let caller = tokio::spawn(run(OFFLOAD_BYTES, || -> u32 { panic!("boom") }));
        let error = caller.await.unwrap_err();
        assert!(error.is_panic());
        let message = error.into_panic();
        assert_eq!(message.downcast_ref::<&str>(), Some(&"boom"));
    }
}
