-- Alert history of monitor-service: one row per FIRING or RESOLVED event.
-- Codes follow the protobuf enums: state 1 = FIRING, 2 = RESOLVED; severity 1 = WARNING,
-- 2 = CRITICAL. Times are microseconds since the Unix epoch (UTC), as in the SQLite schema,
-- so both backends share one keyset encoding.
CREATE TABLE monitor_alerts (
    -- Row id: breaks ties between events of the same microsecond in the keyset order.
    event_id        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    alert_id        TEXT             NOT NULL,
    state           INTEGER          NOT NULL CHECK (state IN (1, 2)),
    at_us           BIGINT           NOT NULL,
    severity        INTEGER          NOT NULL CHECK (severity IN (1, 2)),
    metric          TEXT             NOT NULL,
    value           DOUBLE PRECISION NOT NULL,
    threshold       DOUBLE PRECISION NOT NULL,
    message         TEXT             NOT NULL,
    -- Array of strings.
    recommendations JSONB            NOT NULL,
    -- The sample that caused the event.
    sample          JSONB            NOT NULL,
    -- A retried insert of the same event is a no-op.
    UNIQUE (alert_id, state)
);

-- ListAlerts walks this index newest first; pruning deletes from its old end.
CREATE INDEX monitor_alerts_newest ON monitor_alerts (at_us DESC, event_id DESC);
