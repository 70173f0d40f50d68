-- The insight cache: finished summaries and per-chunk insights, keyed by a hash of everything
-- that decides the answer (entry ids and text hashes, options, backend, model, prompt version).
-- Values are JSON of the domain types; times are microseconds since the Unix epoch.
CREATE TABLE summary_cache (
    key        TEXT    NOT NULL PRIMARY KEY,
    value      TEXT    NOT NULL,
    created_at BIGINT  NOT NULL,
    -- A row past this instant is a miss, and the pruner deletes it.
    expires_at BIGINT  NOT NULL
);
CREATE INDEX summary_cache_expires ON summary_cache (expires_at);

CREATE TABLE chunk_cache (
    key        TEXT    NOT NULL PRIMARY KEY,
    value      TEXT    NOT NULL,
    created_at BIGINT  NOT NULL,
    expires_at BIGINT  NOT NULL
);
CREATE INDEX chunk_cache_expires ON chunk_cache (expires_at);
