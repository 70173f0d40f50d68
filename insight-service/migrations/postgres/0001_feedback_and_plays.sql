-- Feedback and listening plays of insight-service. Times are microseconds since the Unix
-- epoch (UTC), as in the SQLite schema, so both backends share one page-token encoding.
CREATE TABLE feedback (
    id         TEXT     NOT NULL PRIMARY KEY,
    user_id    TEXT     NOT NULL,
    text       TEXT     NOT NULL,
    -- 0 = no rating, else 1..5 (the proto's encoding).
    rating     SMALLINT NOT NULL CHECK (rating BETWEEN 0 AND 5),
    -- When the user wrote it; the import time when the entry carried none.
    created_at BIGINT   NOT NULL,
    source     TEXT     NOT NULL,
    -- When this row was last written (first import or a re-import).
    updated_at BIGINT   NOT NULL
);

-- ListFeedback without a user filter walks this index in keyset order. COLLATE "C" makes the
-- id order bytewise, as SQLite's, so both backends page in the same order.
CREATE INDEX feedback_created ON feedback (created_at, id COLLATE "C");
-- ListFeedback of one user walks this one.
CREATE INDEX feedback_user_created ON feedback (user_id, created_at, id COLLATE "C");

CREATE TABLE listening_plays (
    user_id     TEXT    NOT NULL,
    track_id    TEXT    NOT NULL,
    played_at   BIGINT  NOT NULL,
    track_name  TEXT    NOT NULL,
    artist      TEXT    NOT NULL,
    -- JSON array of strings.
    genres      TEXT    NOT NULL,
    ms_played   BIGINT  NOT NULL,
    skipped     BOOLEAN NOT NULL,
    -- NULL = unknown.
    duration_ms BIGINT,
    -- JSON array of the nine audio features in proto order; NULL = unknown.
    features    TEXT,
    updated_at  BIGINT  NOT NULL,
    -- A play's identity: re-importing it replaces it.
    PRIMARY KEY (user_id, track_id, played_at)
);

-- AnalyzeMusic by user reads one user's plays in time order.
CREATE INDEX listening_plays_user_time ON listening_plays (user_id, played_at);
