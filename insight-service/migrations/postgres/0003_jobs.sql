-- Background summary jobs and their per-chunk checkpoints. Times are microseconds since the
-- Unix epoch, as in the other tables. `request` and `result` are opaque JSON written by the
-- job runner; the store only keeps them.
CREATE TABLE jobs (
    id            TEXT    NOT NULL PRIMARY KEY,
    state         TEXT    NOT NULL
                  CHECK (state IN ('QUEUED', 'RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELLED')),
    request       TEXT    NOT NULL,
    chunks_done   BIGINT  NOT NULL CHECK (chunks_done >= 0),
    chunks_total  BIGINT  NOT NULL CHECK (chunks_total >= 0),
    result        TEXT,
    error         TEXT,
    created_at    BIGINT  NOT NULL,
    -- The last change a watcher can see (state or progress); lease renewals do not count.
    updated_at    BIGINT  NOT NULL,
    -- How many times the job was claimed; a lease is valid only for its own attempt, so a
    -- worker whose lease was taken over can no longer write.
    attempt       BIGINT  NOT NULL CHECK (attempt >= 0),
    -- Who holds the job and until when: set exactly while the job is RUNNING.
    lease_owner   TEXT,
    lease_expires BIGINT,
    CHECK ((state = 'RUNNING') = (lease_owner IS NOT NULL AND lease_expires IS NOT NULL))
);

-- The claim query walks the unfinished jobs oldest first. Finished jobs (the bulk, kept until
-- pruned) stay out of this index, and the RUNNING ones it skips are at most one per worker.
-- COLLATE "C" orders ids bytewise, as SQLite's, so both backends claim in the same order.
CREATE INDEX jobs_claimable ON jobs (created_at, id COLLATE "C")
    WHERE state IN ('QUEUED', 'RUNNING');
-- The pruner deletes finished jobs by age.
CREATE INDEX jobs_finished ON jobs (updated_at)
    WHERE state IN ('SUCCEEDED', 'FAILED', 'CANCELLED');

-- What a running job has finished so far, so a job taken over after a crash resumes instead of
-- redoing its chunks. Deleted with the job's terminal state.
CREATE TABLE job_checkpoints (
    job_id     TEXT    NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    chunk_key  TEXT    NOT NULL,
    value      TEXT    NOT NULL,
    created_at BIGINT  NOT NULL,
    PRIMARY KEY (job_id, chunk_key)
);
