//! The durable job queue of the insight store (`store::JobStore`), on SQLite (a scratch file)
//! AND on the machine's PostgreSQL (a database per test with a non-bytewise collation, dropped
//! afterwards; see `spotifai_e2e::db`). Time is passed explicitly, so lease expiry is
//! simulated by handing a later `now`, never by sleeping.

#![allow(clippy::unwrap_used, missing_docs)]

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use insight_service::store::{
    self, CANCELLED_ERROR, DatabaseUrl, FeedbackStore, JobOutcome, JobRecord, JobState, Lease,
    StoreError,
};
use spotifai_e2e::db::Db;

/// Defines one test per backend for `scenario(url)`.
macro_rules! on_both_backends {
    ($($scenario:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $scenario() {
                    let db = super::Db::sqlite();
                    super::$scenario(db.url()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $scenario() {
                    let Some(db) = super::Db::postgres_with_locale(super::LOCALE).await else {
                        return;
                    };
                    super::$scenario(db.url()).await;
                }
            )*
        }
    };
}

on_both_backends!(
    submit_then_get_and_unknown_ids,
    claims_oldest_first_until_nothing_is_left,
    an_expired_lease_is_taken_over_and_the_old_worker_can_write_nothing,
    cancel_stops_queued_and_running_jobs,
    checkpoints_are_idempotent_and_listed_bytewise,
    finish_sets_the_outcome_once_and_deletes_checkpoints,
    release_puts_a_job_back_at_once,
    prune_deletes_only_jobs_that_ended_before,
);

/// The PostgreSQL databases' collation: one where `'a' < 'B'`, unlike bytewise order, so the
/// order assertions fail if a query forgets `COLLATE "C"`.
const LOCALE: &str = "en-US";

/// The lease every scenario asks for.
const LEASE: Duration = Duration::from_secs(30);

/// `secs` seconds after a fixed origin (2023-11-14), so every time in a test is explicit.
fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

async fn open(url: &str) -> Arc<dyn FeedbackStore> {
    store::open(&DatabaseUrl::parse(url).unwrap(), true)
        .await
        .unwrap()
}

async fn job(store: &Arc<dyn FeedbackStore>, id: &str) -> JobRecord {
    store.get_job(id).await.unwrap().unwrap()
}

async fn claim(store: &Arc<dyn FeedbackStore>, owner: &str, now: SystemTime) -> (JobRecord, Lease) {
    store.claim_job(owner, LEASE, now).await.unwrap().unwrap()
}

fn succeeded(result: &str) -> JobOutcome {
    JobOutcome::Succeeded {
        result: result.to_owned(),
    }
}

async fn submit_then_get_and_unknown_ids(url: &str) {
    let store = open(url).await;
    let request = r#"{"selector":{"user_id":"u1"}}"#;

    let submitted = store.submit_job("job-1", request, at(10)).await.unwrap();
    let expected = JobRecord {
        id: "job-1".into(),
        state: JobState::Queued,
        request: request.into(),
        chunks_done: 0,
        chunks_total: 0,
        result: None,
        error: None,
        created_at: at(10),
        updated_at: at(10),
        attempt: 0,
    };
    assert_eq!(submitted, expected);
    assert_eq!(job(&store, "job-1").await, expected);
    assert_eq!(store.get_job("no-such-job").await.unwrap(), None);
    assert_eq!(store.checkpoints("no-such-job").await.unwrap(), []);

    // A retried submit returns the stored job unchanged (not re-stamped, not re-queued).
    assert_eq!(
        store.submit_job("job-1", request, at(20)).await.unwrap(),
        expected
    );
    // The same id for another request is the caller's mistake, and nothing changes.
    let clash = store.submit_job("job-1", "{}", at(20)).await.unwrap_err();
    assert!(
        matches!(&clash, StoreError::InvalidArgument { field, .. } if field == "id"),
        "{clash:?}"
    );
    let empty = store.submit_job("", request, at(20)).await.unwrap_err();
    assert!(
        matches!(&empty, StoreError::InvalidArgument { field, .. } if field == "id"),
        "{empty:?}"
    );
    assert_eq!(job(&store, "job-1").await, expected);
    assert_eq!(store.get_job("").await.unwrap(), None);
}

async fn claims_oldest_first_until_nothing_is_left(url: &str) {
    let store = open(url).await;
    assert!(
        store.claim_job("w", LEASE, at(0)).await.unwrap().is_none(),
        "an empty queue has nothing to claim"
    );
    // Submitted out of creation order, with ids that sort differently from it; two share a
    // creation time, and then the id decides, bytewise ("B" < "a").
    for (id, created) in [("c", 3), ("a-tie", 2), ("z", 1), ("B-tie", 2)] {
        store.submit_job(id, "{}", at(created)).await.unwrap();
    }

    let mut order = Vec::new();
    for worker in ["w1", "w2", "w3", "w4"] {
        let (job, lease) = claim(&store, worker, at(100)).await;
        assert_eq!(job.state, JobState::Running);
        assert_eq!(job.attempt, 1);
        assert_eq!(job.updated_at, at(100));
        assert_eq!(
            lease,
            Lease {
                job_id: job.id.clone(),
                attempt: 1,
                owner: worker.into()
            }
        );
        assert_eq!(self::job(&store, &job.id).await, job);
        order.push(job.id);
    }
    assert_eq!(order, ["z", "B-tie", "a-tie", "c"]);
    // Every job is running under a live lease.
    assert!(
        store
            .claim_job("w5", LEASE, at(110))
            .await
            .unwrap()
            .is_none()
    );
}

async fn an_expired_lease_is_taken_over_and_the_old_worker_can_write_nothing(url: &str) {
    let store = open(url).await;
    store.submit_job("job", "{}", at(0)).await.unwrap();

    let (_, lease_a) = claim(&store, "worker-a", at(10)).await;
    assert!(
        store
            .save_checkpoint(&lease_a, "chunk-0", "A0", 1, 4, at(12))
            .await
            .unwrap()
    );
    // Renewed at 20 for 30 s: valid until 50, so B finds nothing at 49.
    assert!(store.renew_lease(&lease_a, LEASE, at(20)).await.unwrap());
    assert!(
        store
            .claim_job("worker-b", LEASE, at(49))
            .await
            .unwrap()
            .is_none()
    );

    // A stalls; at 50 its lease has expired and B takes the job over, progress intact.
    let (taken, lease_b) = claim(&store, "worker-b", at(50)).await;
    assert_eq!(taken.id, "job");
    assert_eq!(taken.attempt, 2);
    assert_eq!(lease_b.attempt, 2);
    assert_eq!((taken.chunks_done, taken.chunks_total), (1, 4));
    assert_eq!(
        store.checkpoints("job").await.unwrap(),
        [("chunk-0".to_owned(), "A0".to_owned())]
    );
    let before = job(&store, "job").await;

    // A wakes up: every write it tries is refused and changes nothing.
    assert!(!store.renew_lease(&lease_a, LEASE, at(51)).await.unwrap());
    assert!(
        !store
            .save_checkpoint(&lease_a, "chunk-1", "A1", 2, 4, at(52))
            .await
            .unwrap()
    );
    assert!(!store.set_progress(&lease_a, 3, 4, at(53)).await.unwrap());
    assert!(
        !store
            .finish_job(&lease_a, succeeded("from A"), at(54))
            .await
            .unwrap()
    );
    assert!(!store.release_job(&lease_a, at(55)).await.unwrap());
    assert_eq!(job(&store, "job").await, before);
    assert_eq!(
        store.checkpoints("job").await.unwrap(),
        [("chunk-0".to_owned(), "A0".to_owned())]
    );
    // A lease naming the right attempt but another owner is not B's either.
    let impostor = Lease {
        owner: "worker-a".into(),
        ..lease_b.clone()
    };
    assert!(!store.renew_lease(&impostor, LEASE, at(56)).await.unwrap());

    // B's lease is the one that counts: the job ends once, with B's result.
    assert!(
        store
            .finish_job(&lease_b, succeeded("from B"), at(60))
            .await
            .unwrap()
    );
    let done = job(&store, "job").await;
    assert_eq!(done.state, JobState::Succeeded);
    assert_eq!(done.result.as_deref(), Some("from B"));
    assert_eq!(done.attempt, 2);
    assert!(
        !store
            .finish_job(&lease_a, succeeded("from A"), at(61))
            .await
            .unwrap()
    );
    assert_eq!(job(&store, "job").await, done);

    // An expired lease that nobody took over is still held, and renewing rescues it.
    store.submit_job("slow", "{}", at(100)).await.unwrap();
    let (_, slow) = claim(&store, "worker-c", at(100)).await;
    assert!(store.renew_lease(&slow, LEASE, at(200)).await.unwrap());
    assert!(
        store
            .claim_job("worker-d", LEASE, at(229))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(job(&store, "slow").await.attempt, 1);
}

async fn cancel_stops_queued_and_running_jobs(url: &str) {
    let store = open(url).await;
    assert_eq!(store.cancel_job("no-such-job", at(0)).await.unwrap(), None);

    // A queued job is cancelled and never claimed.
    store.submit_job("queued", "{}", at(0)).await.unwrap();
    let cancelled = store.cancel_job("queued", at(5)).await.unwrap().unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
    assert_eq!(cancelled.error.as_deref(), Some(CANCELLED_ERROR));
    assert_eq!(cancelled.result, None);
    assert_eq!(cancelled.updated_at, at(5));
    assert_eq!(job(&store, "queued").await, cancelled);
    assert!(store.claim_job("w", LEASE, at(6)).await.unwrap().is_none());

    // A running job is cancelled; its worker learns it at its next lease check.
    store.submit_job("running", "{}", at(10)).await.unwrap();
    let (_, lease) = claim(&store, "w", at(11)).await;
    assert!(
        store
            .save_checkpoint(&lease, "chunk-0", "x", 1, 3, at(12))
            .await
            .unwrap()
    );
    let cancelled = store.cancel_job("running", at(13)).await.unwrap().unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
    assert_eq!(cancelled.error.as_deref(), Some(CANCELLED_ERROR));
    assert_eq!((cancelled.chunks_done, cancelled.chunks_total), (1, 3));
    assert_eq!(store.checkpoints("running").await.unwrap(), []);
    assert!(!store.renew_lease(&lease, LEASE, at(14)).await.unwrap());
    assert!(!store.set_progress(&lease, 2, 3, at(14)).await.unwrap());
    assert!(
        !store
            .save_checkpoint(&lease, "chunk-1", "y", 2, 3, at(14))
            .await
            .unwrap()
    );
    assert!(
        !store
            .finish_job(&lease, succeeded("late"), at(15))
            .await
            .unwrap()
    );
    assert_eq!(job(&store, "running").await, cancelled);
    assert_eq!(store.checkpoints("running").await.unwrap(), []);
    // Not claimable even once its old lease has long expired.
    assert!(
        store
            .claim_job("w2", LEASE, at(1000))
            .await
            .unwrap()
            .is_none()
    );

    // Cancelling an ended job returns it unchanged.
    assert_eq!(
        store.cancel_job("running", at(20)).await.unwrap(),
        Some(cancelled)
    );
    store.submit_job("done", "{}", at(30)).await.unwrap();
    let (_, lease) = claim(&store, "w", at(31)).await;
    assert!(
        store
            .finish_job(&lease, succeeded("r"), at(32))
            .await
            .unwrap()
    );
    let done = job(&store, "done").await;
    assert_eq!(store.cancel_job("done", at(33)).await.unwrap(), Some(done));
}

async fn checkpoints_are_idempotent_and_listed_bytewise(url: &str) {
    let store = open(url).await;
    store.submit_job("job", "{}", at(0)).await.unwrap();
    store.submit_job("other", "{}", at(1)).await.unwrap();
    let (_, lease) = claim(&store, "w", at(2)).await;
    assert_eq!(lease.job_id, "job");

    assert!(store.set_progress(&lease, 0, 3, at(3)).await.unwrap());
    let job_now = job(&store, "job").await;
    assert_eq!((job_now.chunks_done, job_now.chunks_total), (0, 3));
    assert_eq!(job_now.updated_at, at(3));

    for (key, value, done, now) in [
        ("a", "first a", 1, 4),
        ("B", "first B", 2, 5),
        // A retried save of a stored key: the first value stays.
        ("a", "second a", 2, 6),
    ] {
        assert!(
            store
                .save_checkpoint(&lease, key, value, done, 3, at(now))
                .await
                .unwrap()
        );
    }
    // Bytewise: "B" (0x42) before "a" (0x61) on both backends, whatever PostgreSQL's locale.
    assert_eq!(
        store.checkpoints("job").await.unwrap(),
        [
            ("B".to_owned(), "first B".to_owned()),
            ("a".to_owned(), "first a".to_owned())
        ]
    );
    let job_now = job(&store, "job").await;
    assert_eq!((job_now.chunks_done, job_now.chunks_total), (2, 3));
    assert_eq!(job_now.updated_at, at(6));
    assert_eq!(store.checkpoints("other").await.unwrap(), []);
}

async fn finish_sets_the_outcome_once_and_deletes_checkpoints(url: &str) {
    let store = open(url).await;
    store.submit_job("ok", "{}", at(0)).await.unwrap();
    store.submit_job("bad", "{}", at(1)).await.unwrap();
    let (_, ok) = claim(&store, "w", at(2)).await;
    let (_, bad) = claim(&store, "w", at(2)).await;
    for (lease, key) in [(&ok, "k1"), (&ok, "k2"), (&bad, "k1")] {
        assert!(
            store
                .save_checkpoint(lease, key, "v", 1, 2, at(3))
                .await
                .unwrap()
        );
    }

    let summary = r#"{"summary":"fine","themes":["speed"]}"#;
    assert!(
        store
            .finish_job(&ok, succeeded(summary), at(4))
            .await
            .unwrap()
    );
    let finished = job(&store, "ok").await;
    assert_eq!(finished.state, JobState::Succeeded);
    assert_eq!(finished.result.as_deref(), Some(summary));
    assert_eq!(finished.error, None);
    assert_eq!(finished.updated_at, at(4));
    assert_eq!(finished.created_at, at(0));
    assert_eq!(store.checkpoints("ok").await.unwrap(), []);
    // The other job's checkpoints are its own.
    assert_eq!(store.checkpoints("bad").await.unwrap().len(), 1);

    let failed = JobOutcome::Failed {
        error: "every chunk failed".into(),
    };
    assert!(store.finish_job(&bad, failed.clone(), at(5)).await.unwrap());
    let finished_bad = job(&store, "bad").await;
    assert_eq!(finished_bad.state, JobState::Failed);
    assert_eq!(finished_bad.error.as_deref(), Some("every chunk failed"));
    assert_eq!(finished_bad.result, None);
    assert_eq!(store.checkpoints("bad").await.unwrap(), []);

    // Exactly once: the same lease cannot finish again, nor renew.
    assert!(
        !store
            .finish_job(&bad, succeeded("again"), at(6))
            .await
            .unwrap()
    );
    assert!(!store.renew_lease(&ok, LEASE, at(6)).await.unwrap());
    assert_eq!(job(&store, "bad").await, finished_bad);
    assert_eq!(job(&store, "ok").await, finished);
    // Ended jobs are never claimed, however much later.
    assert!(
        store
            .claim_job("w", LEASE, at(10_000))
            .await
            .unwrap()
            .is_none()
    );
}

async fn release_puts_a_job_back_at_once(url: &str) {
    let store = open(url).await;
    store.submit_job("job", "{}", at(0)).await.unwrap();
    let (_, first) = claim(&store, "shutting-down", at(1)).await;
    assert!(
        store
            .save_checkpoint(&first, "k", "v", 1, 2, at(2))
            .await
            .unwrap()
    );

    assert!(store.release_job(&first, at(3)).await.unwrap());
    let released = job(&store, "job").await;
    assert_eq!(released.state, JobState::Queued);
    assert_eq!(released.attempt, 1);
    assert_eq!(released.updated_at, at(3));
    assert_eq!((released.chunks_done, released.chunks_total), (1, 2));
    assert_eq!(
        store.checkpoints("job").await.unwrap(),
        [("k".to_owned(), "v".to_owned())]
    );
    assert!(!store.renew_lease(&first, LEASE, at(4)).await.unwrap());
    assert!(!store.release_job(&first, at(4)).await.unwrap());

    // Claimable at once, long before the old lease (1 + 30 s) would have expired. The same
    // owner claims it again: only the attempt tells its old lease from the new one.
    let (resumed, second) = claim(&store, "shutting-down", at(4)).await;
    assert_eq!(resumed.id, "job");
    assert_eq!(second.attempt, 2);
    assert!(!store.renew_lease(&first, LEASE, at(5)).await.unwrap());
    assert!(
        !store
            .finish_job(&first, succeeded("stale"), at(5))
            .await
            .unwrap()
    );
    assert!(
        store
            .finish_job(&second, succeeded("r"), at(5))
            .await
            .unwrap()
    );
}

async fn prune_deletes_only_jobs_that_ended_before(url: &str) {
    let store = open(url).await;
    for id in [
        "old-done",
        "old-failed",
        "old-cancelled",
        "new-done",
        "running",
    ] {
        store.submit_job(id, "{}", at(0)).await.unwrap();
    }
    // Submitted last, so the five claims below (oldest first) leave it queued.
    store.submit_job("queued", "{}", at(1)).await.unwrap();
    let mut leases = HashMap::new();
    for _ in 0..5 {
        let (job, lease) = claim(&store, "w", at(2)).await;
        leases.insert(job.id, lease);
    }
    assert_eq!(job(&store, "queued").await.state, JobState::Queued);
    assert!(
        store
            .finish_job(&leases["old-done"], succeeded("r"), at(10))
            .await
            .unwrap()
    );
    let failed = JobOutcome::Failed { error: "e".into() };
    assert!(
        store
            .finish_job(&leases["old-failed"], failed, at(10))
            .await
            .unwrap()
    );
    store.cancel_job("old-cancelled", at(10)).await.unwrap();
    assert!(
        store
            .finish_job(&leases["new-done"], succeeded("r"), at(30))
            .await
            .unwrap()
    );

    // Only jobs that ended strictly before 20; running and queued ones never, however old.
    assert_eq!(store.prune_jobs(at(20)).await.unwrap(), 3);
    for id in ["old-done", "old-failed", "old-cancelled"] {
        assert_eq!(store.get_job(id).await.unwrap(), None, "{id}");
    }
    for id in ["new-done", "running", "queued"] {
        assert!(store.get_job(id).await.unwrap().is_some(), "{id}");
    }
    assert_eq!(store.prune_jobs(at(20)).await.unwrap(), 0);
    // The boundary is exclusive: a job that ended at 30 survives a prune before 30.
    assert_eq!(store.prune_jobs(at(30)).await.unwrap(), 0);
    assert_eq!(store.prune_jobs(at(31)).await.unwrap(), 1);
    // A pruned id can be used again.
    store.submit_job("old-done", "{}", at(40)).await.unwrap();
    assert_eq!(job(&store, "old-done").await.state, JobState::Queued);
}

/// `pools` stores (each with its own connection pool, as separate replicas would have) on one
/// database, `claimers_per_pool` tasks on each, all claiming and finishing in a loop until the
/// queue is empty: every one of `jobs` jobs is claimed exactly once, with no errors.
async fn every_job_is_claimed_exactly_once(url: &str, pools: usize, claimers_per_pool: usize) {
    const JOBS: usize = 40;
    let first = open(url).await;
    let now = SystemTime::now();
    for n in 0..JOBS {
        first
            .submit_job(&format!("job-{n:02}"), "{}", now)
            .await
            .unwrap();
    }
    let mut stores = vec![first];
    for _ in 1..pools {
        stores.push(open(url).await);
    }

    // All claimers start together, so they really contend for the first rows.
    let start = Arc::new(tokio::sync::Barrier::new(pools * claimers_per_pool));
    let mut tasks = Vec::new();
    for (p, store) in stores.iter().enumerate() {
        for c in 0..claimers_per_pool {
            let store = Arc::clone(store);
            let start = Arc::clone(&start);
            let owner = format!("pool-{p}-claimer-{c}");
            tasks.push(tokio::spawn(async move {
                start.wait().await;
                let mut claimed = Vec::new();
                // A long lease: nothing may expire, so a second claim could only be a bug.
                let lease_for = Duration::from_secs(3600);
                while let Some((job, lease)) = store
                    .claim_job(&owner, lease_for, SystemTime::now())
                    .await
                    .map_err(|error| format!("{owner}: claim: {error}"))?
                {
                    if job.attempt != 1 {
                        return Err(format!(
                            "{owner}: {} claimed at attempt {}",
                            job.id, job.attempt
                        ));
                    }
                    let finished = store
                        .finish_job(&lease, succeeded(&owner), SystemTime::now())
                        .await
                        .map_err(|error| format!("{owner}: finish: {error}"))?;
                    if !finished {
                        return Err(format!("{owner}: lost the lease on {}", job.id));
                    }
                    claimed.push(job.id);
                }
                Ok::<_, String>((owner, claimed))
            }));
        }
    }

    let mut claimed_by: HashMap<String, Vec<String>> = HashMap::new();
    let mut busy_claimers = 0;
    for task in tasks {
        let (owner, claimed) = task.await.unwrap().unwrap();
        busy_claimers += usize::from(!claimed.is_empty());
        for id in claimed {
            claimed_by.entry(id).or_default().push(owner.clone());
        }
    }
    let twice: Vec<_> = claimed_by
        .iter()
        .filter(|(_, owners)| owners.len() > 1)
        .collect();
    assert!(twice.is_empty(), "claimed more than once: {twice:?}");
    assert_eq!(claimed_by.len(), JOBS, "every job claimed");
    assert!(busy_claimers > 1, "the claimers did not run concurrently");
    for (id, owners) in &claimed_by {
        let job = job(&stores[0], id).await;
        assert_eq!(job.state, JobState::Succeeded, "{id}");
        assert_eq!(job.attempt, 1, "{id}");
        assert_eq!(job.result.as_deref(), Some(owners[0].as_str()), "{id}");
    }
    assert!(
        stores[0]
            .claim_job("late", LEASE, SystemTime::now())
            .await
            .unwrap()
            .is_none()
    );
}

/// Four replicas with two claimers each: `FOR UPDATE SKIP LOCKED` hands every job out once.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn postgres_concurrent_claimers_take_every_job_exactly_once() {
    let Some(db) = Db::postgres_with_locale(LOCALE).await else {
        return;
    };
    every_job_is_claimed_exactly_once(db.url(), 4, 2).await;
}

/// Two pools on one SQLite file, two claimers each: the single-statement claim under
/// SQLite's one writer hands every job out once, and lock waits stay within busy_timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_concurrent_claimers_take_every_job_exactly_once() {
    let db = Db::sqlite();
    every_job_is_claimed_exactly_once(db.url(), 2, 2).await;
}
