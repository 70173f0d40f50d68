//! Durable background jobs against the REAL insight-service binary (issue 6, items 6 and 8):
//!
//! * `kill -9` of a server with one RUNNING and two QUEUED jobs, then a restart on the same
//!   database (a SQLite file, and PostgreSQL when it answers), finishes every job exactly once,
//!   and the running job resumes from its chunk checkpoints: a checkpointed chunk is never asked
//!   of the LLM again, and its progress never goes back below what was checkpointed.
//! * Two server processes on one PostgreSQL database share the queue (`FOR UPDATE SKIP
//!   LOCKED`): both run jobs, and no job runs in both (each process has its own fake Gemini,
//!   so the fake that answered a chunk tells which process ran it).
//!
//! The binary is the one in the target directory (`spotifai_e2e::bin_path`): build it first
//! (`cargo build -p insight-service`) when running this test crate alone.

#![allow(clippy::unwrap_used, missing_docs)]

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::Duration,
};

use insight_service::store::{self, DatabaseUrl, FeedbackStore, JobState};
use spotifai_e2e::{
    Spawned, bin_path,
    db::Db,
    fakes::{FakeLlm, Fault, Outcome, RecordedRequest},
};
use spotifai_proto::insight::{
    self as pb, insight_service_client::InsightServiceClient, summarize_feedback_request::Input,
};
use tokio::time::Instant;
use tonic::transport::Channel;

const KEY: &str = "fake-gemini-key-jobs-durable";

/// Generous bounds for a loaded 2-core machine; every wait below polls up to one of them.
const START_LIMIT: Duration = Duration::from_secs(60);
const FINISH_LIMIT: Duration = Duration::from_secs(120);
/// The whole of one scenario, so that no RPC can hang a test forever.
const TEST_LIMIT: Duration = Duration::from_secs(300);

type Client = InsightServiceClient<Channel>;

/// A fake Gemini answering every call after `delay`, with its API key in a file.
struct Gemini {
    fake: FakeLlm,
    key_file: tempfile::NamedTempFile,
}

impl Gemini {
    async fn start(delay: Duration) -> Self {
        let fake = FakeLlm::gemini().await;
        fake.require_api_key(KEY);
        fake.set_answer_fn(|request: &RecordedRequest| {
            if is_reduce(request) {
                r#"{"summary": "Listeners want fewer ads.", "themes": ["ads"]}"#.to_owned()
            } else {
                r#"{"insight": "Ads interrupt songs.", "themes": ["ads"]}"#.to_owned()
            }
        });
        fake.set_default_fault(Fault::Delay(delay));
        let key_file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(key_file.path(), KEY).unwrap();
        Self { fake, key_file }
    }
}

fn is_reduce(request: &RecordedRequest) -> bool {
    request
        .system()
        .unwrap_or_default()
        .contains("combine summaries")
}

/// The job tag a map prompt belongs to (its entries' texts name it), `None` for a reduce.
fn map_tag(request: &RecordedRequest, tags: &[String]) -> Option<String> {
    if is_reduce(request) {
        return None;
    }
    let prompt = request.prompt().unwrap_or_default();
    let found: Vec<&String> = tags
        .iter()
        .filter(|tag| prompt.contains(&format!("({tag})")))
        .collect();
    assert_eq!(found.len(), 1, "a map prompt of exactly one job: {prompt}");
    Some(found[0].clone())
}

/// Starts the real binary on `db` with `args` after the common flags, off the runtime's
/// threads (the start blocks until the server logs its address).
async fn spawn_server(gemini: &Gemini, db: &str, args: &[&str]) -> Spawned {
    let mut argv: Vec<String> = [
        "--listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
        "--llm-backend",
        "gemini",
        "--llm-base-url",
        &gemini.fake.base_url(),
        "--llm-api-key-file",
        gemini.key_file.path().to_str().unwrap(),
        "--llm-max-retries",
        "0",
        "--database-url",
        db,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    argv.extend(args.iter().map(|s| (*s).to_owned()));
    tokio::task::spawn_blocking(move || {
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        Spawned::start(&bin_path("insight-service"), &argv)
    })
    .await
    .unwrap()
}

/// SIGKILLs `server` and waits (bounded) until it is gone.
async fn kill_9(mut server: Spawned) {
    server.signal(libc::SIGKILL);
    tokio::task::spawn_blocking(move || {
        let code = server.wait_exit(Duration::from_secs(30));
        assert_eq!(code, None, "killed by a signal, not exited");
    })
    .await
    .unwrap();
}

async fn connect(server: &Spawned) -> Client {
    let channel = Channel::from_shared(server.url())
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap();
    InsightServiceClient::new(channel)
}

fn request(n: usize, tag: &str) -> pb::SummarizeFeedbackRequest {
    let entries = (0..n)
        .map(|i| pb::FeedbackEntry {
            id: format!("{tag}-{i}"),
            text: format!("Review {i} ({tag}): the ads interrupt my playlists."),
            rating: 2,
            ..Default::default()
        })
        .collect();
    pb::SummarizeFeedbackRequest {
        input: Some(Input::Entries(pb::FeedbackBatch { entries })),
        options: Some(pb::SummaryOptions {
            chunk_size: Some(5),
            max_entries: Some(0),
            ..Default::default()
        }),
    }
}

async fn get(client: &mut Client, id: &str) -> pb::Job {
    client
        .get_job(pb::GetJobRequest { id: id.to_owned() })
        .await
        .unwrap()
        .into_inner()
}

fn done(job: &pb::Job) -> u32 {
    job.progress.unwrap_or_default().chunks_done
}

/// Polls GetJob until every job in `ids` has ended (bounded by `limit`); returns them.
async fn wait_all_ended(client: &mut Client, ids: &[String], limit: Duration) -> Vec<pb::Job> {
    let deadline = Instant::now() + limit;
    loop {
        let mut jobs = Vec::with_capacity(ids.len());
        for id in ids {
            jobs.push(get(client, id).await);
        }
        let ended = jobs.iter().all(|job| {
            !matches!(
                job.state(),
                pb::JobState::Queued | pb::JobState::Running | pb::JobState::Unspecified
            )
        });
        if ended {
            return jobs;
        }
        assert!(
            Instant::now() < deadline,
            "jobs did not end within {limit:?}: {:?}",
            jobs.iter()
                .map(|j| (j.id.as_str(), j.state(), j.progress))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn open_store(db: &Db) -> Arc<dyn FeedbackStore> {
    store::open(&DatabaseUrl::parse(db.url()).unwrap(), false)
        .await
        .unwrap()
}

fn assert_succeeded(job: &pb::Job, entries: u32, chunks: u32) {
    assert_eq!(job.state(), pb::JobState::Succeeded, "{job:?}");
    let result = job.result.as_ref().expect("a SUCCEEDED job has a result");
    assert_eq!(result.entries_used, entries, "{job:?}");
    assert!(!result.degraded, "{job:?}");
    assert_eq!(result.summary, "Listeners want fewer ads.");
    let progress = job.progress.unwrap_or_default();
    assert_eq!(
        (progress.chunks_done, progress.chunks_total),
        (chunks, chunks),
        "{job:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_with_queued_and_running_jobs_then_restart_finishes_every_job_exactly_once() {
    let mut dbs = vec![Db::sqlite()];
    dbs.extend(Db::postgres().await);
    for db in &dbs {
        tokio::time::timeout(TEST_LIMIT, kill_9_and_restart(db))
            .await
            .expect("the kill -9 scenario did not end within its limit");
    }
}

async fn kill_9_and_restart(db: &Db) {
    const ENTRIES: usize = 30;
    const CHUNKS: usize = 6; // 30 entries, chunk_size 5
    let started = std::time::Instant::now();
    let gemini = Gemini::start(Duration::from_millis(150)).await;
    let flags = [
        "--job-workers",
        "1",
        "--map-parallelism",
        "1",
        "--job-lease",
        "2s",
        "--job-poll",
        "100ms",
    ];
    let server = spawn_server(&gemini, db.url(), &flags).await;
    let mut client = connect(&server).await;

    let tags: Vec<String> = (0..3).map(|i| format!("d{i}")).collect();
    let mut ids = Vec::new();
    for tag in &tags {
        let job = client
            .submit_summary_job(request(ENTRIES, tag))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(job.state(), pb::JobState::Queued, "{job:?}");
        ids.push(job.id);
    }
    let first = ids[0].clone();

    // The first job is RUNNING with at least 2 chunks done; one worker, so the others wait.
    let deadline = Instant::now() + START_LIMIT;
    let seen_at_kill = loop {
        let job = get(&mut client, &first).await;
        if job.state() == pb::JobState::Running && done(&job) >= 2 {
            break done(&job);
        }
        assert!(
            Instant::now() < deadline,
            "the first job did not get 2 chunks done: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for id in &ids[1..] {
        assert_eq!(get(&mut client, id).await.state(), pb::JobState::Queued);
    }
    drop(client);
    kill_9(server).await;

    // What the dead process left behind: the calls it made (answered, or in flight at the
    // kill), and checkpoints in the database.
    let before = gemini.fake.requests();
    let requested_before: BTreeSet<String> = before
        .iter()
        .map(|r| r.prompt().unwrap_or_default().to_owned())
        .collect();
    let answered_before = before
        .iter()
        .filter(|r| r.outcome == Outcome::Answered)
        .count();
    assert!(
        before
            .iter()
            .all(|r| map_tag(r, &tags).as_deref() == Some(tags[0].as_str())),
        "only the first job called the LLM before the kill"
    );
    let checkpointed = {
        let store = open_store(db).await;
        let running = store.get_job(&first).await.unwrap().unwrap();
        assert_eq!(
            (running.state, running.attempt),
            (JobState::Running, 1),
            "{running:?}"
        );
        for id in &ids[1..] {
            let queued = store.get_job(id).await.unwrap().unwrap();
            assert_eq!((queued.state, queued.attempt), (JobState::Queued, 0));
        }
        store.checkpoints(&first).await.unwrap().len()
    };
    // At most the one chunk in flight (map_parallelism 1) was asked but not checkpointed.
    assert!(
        checkpointed >= seen_at_kill as usize
            && checkpointed <= requested_before.len()
            && requested_before.len() <= checkpointed + 1,
        "checkpoints {checkpointed}, progress seen {seen_at_kill}, chunks asked {}",
        requested_before.len()
    );
    assert!(
        checkpointed < CHUNKS,
        "killed before the first job mapped every chunk"
    );

    // Restart on the same database (a new port) and watch the resumed job from there.
    let server = spawn_server(&gemini, db.url(), &flags).await;
    // The dead process makes no more calls: what follows these is the new process's.
    let restarted_at = before.len();
    let mut client = connect(&server).await;
    let mut watch = client
        .watch_job(pb::GetJobRequest { id: first.clone() })
        .await
        .unwrap()
        .into_inner();
    let watched = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(job) = watch.message().await.unwrap() {
            seen.push(job);
        }
        seen
    });
    let jobs = wait_all_ended(&mut client, &ids, FINISH_LIMIT).await;
    for job in &jobs {
        assert_succeeded(job, ENTRIES as u32, CHUNKS as u32);
    }
    let seen = tokio::time::timeout(Duration::from_secs(30), watched)
        .await
        .expect("WatchJob ends at the terminal state")
        .unwrap();
    assert_eq!(seen.last().unwrap().state(), pb::JobState::Succeeded);
    let progress: Vec<u32> = seen.iter().map(done).collect();
    assert!(
        progress.iter().all(|&n| n >= seen_at_kill) && progress.windows(2).all(|w| w[0] <= w[1]),
        "the resumed job's progress goes back (it was {seen_at_kill} at the kill): {progress:?}"
    );

    // Exactly once: the first job was taken over once (attempt 2), the queued ones ran once;
    // nothing is left to resume.
    {
        let store = open_store(db).await;
        for (id, attempt) in ids.iter().zip([2, 1, 1]) {
            let job = store.get_job(id).await.unwrap().unwrap();
            assert_eq!((job.state, job.attempt), (JobState::Succeeded, attempt));
            assert!(job.result.is_some());
            assert!(store.checkpoints(id).await.unwrap().is_empty());
        }
    }

    // The calls: checkpointed chunks were not asked again; at most the one chunk in flight at
    // the kill (map_parallelism 1) was asked twice.
    let requests = gemini.fake.requests();
    let mut per_prompt: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut reduces = 0;
    for request in &requests {
        match map_tag(request, &tags) {
            Some(tag) => {
                let prompt = request.prompt().unwrap_or_default().to_owned();
                *per_prompt.entry((tag, prompt)).or_default() += 1;
            }
            None => reduces += 1,
        }
    }
    let maps: usize = per_prompt.values().sum();
    for tag in &tags {
        let distinct = per_prompt.keys().filter(|(t, _)| t == tag).count();
        assert_eq!(distinct, CHUNKS, "every chunk of job {tag} was mapped");
    }
    let repeated: Vec<_> = per_prompt.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        repeated.len() <= 1 && repeated.iter().all(|(_, n)| **n == 2),
        "more than the chunk in flight at the kill was mapped twice: {repeated:?}"
    );
    assert!(
        maps <= 3 * CHUNKS + 1,
        "{maps} map calls for {} chunks",
        3 * CHUNKS
    );
    assert_eq!(reduces, 3, "one reduce per job");
    let resumed: Vec<&RecordedRequest> = requests[restarted_at..]
        .iter()
        .filter(|r| map_tag(r, &tags).as_deref() == Some(tags[0].as_str()))
        .collect();
    assert_eq!(
        resumed.len(),
        CHUNKS - checkpointed,
        "after the restart only the {} chunks without a checkpoint are mapped",
        CHUNKS - checkpointed
    );
    let again = resumed
        .iter()
        .filter(|r| requested_before.contains(r.prompt().unwrap_or_default()))
        .count();
    assert!(
        again <= requested_before.len() - checkpointed,
        "a checkpointed chunk was mapped again ({again} of the {} asked before the kill)",
        requested_before.len()
    );
    drop(client);
    drop(server);
    println!(
        "kill -9 on {}: killed at {seen_at_kill} chunks done, {checkpointed} checkpointed, \
         {answered_before} answered; {maps} map calls for {} chunks, {reduces} reduces; {:.1} s",
        match db {
            Db::Sqlite { .. } => "SQLite",
            Db::Postgres { .. } => "PostgreSQL",
        },
        3 * CHUNKS,
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_on_one_postgres_database_share_the_queue_and_never_run_a_job_twice() {
    let Some(db) = Db::postgres().await else {
        println!("SKIP: the two-process queue test needs PostgreSQL");
        return;
    };
    tokio::time::timeout(TEST_LIMIT, two_processes_share_the_queue(&db))
        .await
        .expect("the two-process scenario did not end within its limit");
}

async fn two_processes_share_the_queue(db: &Db) {
    const JOBS: usize = 12;
    const ENTRIES: usize = 10;
    const CHUNKS: usize = 2; // 10 entries, chunk_size 5
    let started = std::time::Instant::now();
    let flags = [
        "--job-workers",
        "2",
        "--job-poll",
        "100ms",
        "--job-lease",
        "5s",
    ];
    let geminis = [
        Gemini::start(Duration::from_millis(100)).await,
        Gemini::start(Duration::from_millis(100)).await,
    ];
    // One after the other, so the second finds the schema migrated.
    let first = spawn_server(&geminis[0], db.url(), &flags).await;
    let second = spawn_server(&geminis[1], db.url(), &flags).await;
    let mut clients = [connect(&first).await, connect(&second).await];

    // Two thirds through the first process, then the rest through the second: the second's
    // workers, woken by their own submissions, find the first's older jobs waiting.
    let tags: Vec<String> = (0..JOBS).map(|i| format!("q{i}")).collect();
    let submitted_to = |i: usize| usize::from(i >= JOBS * 2 / 3);
    let mut ids = Vec::new();
    for (i, tag) in tags.iter().enumerate() {
        let job = clients[submitted_to(i)]
            .submit_summary_job(request(ENTRIES, tag))
            .await
            .unwrap()
            .into_inner();
        ids.push(job.id);
    }
    let jobs = wait_all_ended(&mut clients[0], &ids, FINISH_LIMIT).await;
    for job in &jobs {
        assert_succeeded(job, ENTRIES as u32, CHUNKS as u32);
    }
    // The other process reads the same outcome.
    for job in &jobs {
        assert_eq!(&get(&mut clients[1], &job.id).await, job);
    }
    // Each claimed once: no takeover, no second run.
    {
        let store = open_store(db).await;
        for id in &ids {
            let job = store.get_job(id).await.unwrap().unwrap();
            assert_eq!((job.state, job.attempt), (JobState::Succeeded, 1), "{id}");
        }
    }

    // Which process ran which job: the fake that answered its chunks.
    let mut runners: HashMap<String, BTreeSet<usize>> = HashMap::new();
    let mut per_prompt: HashMap<String, usize> = HashMap::new();
    let mut reduces = [0; 2];
    for (process, gemini) in geminis.iter().enumerate() {
        for request in gemini.fake.requests() {
            match map_tag(&request, &tags) {
                Some(tag) => {
                    runners.entry(tag).or_default().insert(process);
                    *per_prompt
                        .entry(request.prompt().unwrap_or_default().to_owned())
                        .or_default() += 1;
                }
                None => reduces[process] += 1,
            }
        }
    }
    for tag in &tags {
        let by = runners.get(tag).cloned().unwrap_or_default();
        assert_eq!(by.len(), 1, "job {tag} ran in processes {by:?}");
    }
    assert_eq!(per_prompt.len(), JOBS * CHUNKS, "every chunk was mapped");
    let twice: Vec<_> = per_prompt.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "chunks mapped more than once: {twice:?}");
    let ran: [usize; 2] =
        [0, 1].map(|process| runners.values().filter(|by| by.contains(&process)).count());
    assert_eq!(ran[0] + ran[1], JOBS);
    assert!(
        ran[0] > 0 && ran[1] > 0,
        "both processes take jobs from the shared queue: {ran:?}"
    );
    assert_eq!(
        reduces, ran,
        "one reduce per job, in the process that ran it"
    );
    let elsewhere = tags
        .iter()
        .enumerate()
        .filter(|(i, tag)| !runners[*tag].contains(&submitted_to(*i)))
        .count();
    assert!(
        elsewhere > 0,
        "no job ran in the process it was not submitted to"
    );
    drop(clients);
    drop(first);
    drop(second);
    println!(
        "two processes on one PostgreSQL database: {JOBS} jobs, {} and {} run by each, {elsewhere} \
         not where submitted; {:.1} s",
        ran[0],
        ran[1],
        started.elapsed().as_secs_f64()
    );
}
