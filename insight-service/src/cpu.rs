//! CPU-heavy work over large inputs runs on Tokio's blocking pool, not on the async workers.
//!
//! The async workers also answer health checks and admission refusals, which must take
//! microseconds; a worker inside a long synchronous computation answers nothing until it
//! returns, and on a two-core node both workers can be inside one. Scanning a 100 KB chunk
//! for sentiment (the map step of every remote call) or summarizing it locally is a millisecond
//! or more, so above [`OFFLOAD_BYTES`] of input such work is handed to the blocking pool; below
//! it the hand-off (two thread wake-ups) would cost more than the work, which runs inline.

use std::{
    panic,
    sync::{Arc, OnceLock},
    time::Duration,
};

use tokio::{sync::Semaphore, time::Instant};

/// Input size from which [`run`] offloads: 16 KiB of text scans in ~0.1 ms, about where a
/// computation starts to delay the other calls of its worker noticeably.
pub const OFFLOAD_BYTES: usize = 16 * 1024;

/// How many offloaded computations run at once: every core but one (at least one), so that
/// however many large chunks are in flight, a core is left for the async workers. Tokio's
/// blocking pool itself would start up to 512 threads, which the OS schedules as equals of
/// the workers.
pub fn offload_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |cores| cores.get().saturating_sub(1).max(1))
}

/// The permits of [`offload_threads`], shared by every runtime of the process.
fn permits() -> &'static Arc<Semaphore> {
    static PERMITS: OnceLock<Arc<Semaphore>> = OnceLock::new();
    PERMITS.get_or_init(|| Arc::new(Semaphore::new(offload_threads())))
}

/// Whether [`run`] hands work over `input_bytes` of input to the blocking pool ([`run_on`]
/// copies borrowed input only then).
fn offloads(input_bytes: usize) -> bool {
    input_bytes >= OFFLOAD_BYTES
}

/// Runs `work`, whose input is `input_bytes` long, inline when that is small (or when there is
/// no Tokio runtime) and on the blocking pool otherwise, at most [`offload_threads`] at once,
/// and returns its result.
///
/// A panic in `work` is resumed here, as if it had run inline. Dropping the future does not
/// stop work already handed over; it runs to its end (bounded by its input) and is discarded.
pub async fn run<T, F>(input_bytes: usize, work: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    // Outside a Tokio runtime (a plain executor, a synchronous test) there is no pool.
    let runtime = match tokio::runtime::Handle::try_current() {
        Ok(handle) if offloads(input_bytes) => handle,
        _ => return work(),
    };
    // Held by the work itself, so it is released when the work ends, not when a caller that
    // stopped waiting drops this future.
    let Ok(permit) = Arc::clone(permits()).acquire_owned().await else {
        // Never closed; were it, running inline is still correct.
        return work();
    };
    match runtime
        .spawn_blocking(move || {
            let _permit = permit;
            work()
        })
        .await
    {
        Ok(value) => value,
        Err(error) if error.is_panic() => panic::resume_unwind(error.into_panic()),
        // Blocking tasks are cancelled only when the runtime shuts down, which drops this
        // future too: nothing is waiting for an answer.
        Err(_) => std::future::pending().await,
    }
}

/// [`run`] over borrowed `items` (`input_bytes` of them): `work` sees them in place when they
/// are small, or a copy on the blocking pool (which needs owned input) when they are large, so
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
    async fn small_work_runs_inline_and_large_work_on_the_blocking_pool() {
        let caller = std::thread::current().id();
        let inline = run(OFFLOAD_BYTES - 1, move || std::thread::current().id()).await;
        assert_eq!(inline, caller);
        let offloaded = run(OFFLOAD_BYTES, move || std::thread::current().id()).await;
        assert_ne!(offloaded, caller);
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
        assert!(most >= 1 && most <= offload_threads(), "{most}");
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
