-- The first schema. Records are the same JSON the other stores keep (in
-- `record`); the columns beside them are what queries select and order on,
-- written from the record in the same statement.

CREATE TABLE repos (
    full_name text PRIMARY KEY,
    hook_id   text,
    record    text NOT NULL
);
CREATE INDEX repos_by_hook ON repos (hook_id) WHERE hook_id IS NOT NULL;

CREATE SEQUENCE job_ids AS bigint START 1;

CREATE TABLE jobs (
    id           bigint PRIMARY KEY,
    repo         text NOT NULL,
    kind         text NOT NULL,
    state        text NOT NULL,
    attempt      bigint NOT NULL,
    agent        text,
    finished_at  timestamptz,
    -- The log's committed length, and how much of it is in log_segments.
    log_len      bigint NOT NULL DEFAULT 0,
    archived_len bigint NOT NULL DEFAULT 0,
    archived     boolean NOT NULL DEFAULT false,
    record       text NOT NULL
);
CREATE INDEX jobs_queued ON jobs (id) WHERE state = 'queued';
CREATE INDEX jobs_running ON jobs (id) WHERE state = 'running';
CREATE INDEX jobs_by_repo ON jobs (repo, id);
CREATE INDEX jobs_by_agent ON jobs (agent, id);
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX jobs_unarchived ON jobs (finished_at) WHERE finished_at IS NOT NULL AND NOT archived;
-- Deploys of one repository run one at a time: a second claim fails here.
CREATE UNIQUE INDEX one_running_deploy_per_repo ON jobs (repo)
    WHERE kind = 'deploy' AND state = 'running';

-- A running (or unarchived) job's log: one row per appended piece, keyed by
-- the offset it starts at.
CREATE TABLE log_chunks (
    job   bigint NOT NULL REFERENCES jobs ON DELETE CASCADE,
    start bigint NOT NULL,
    data  bytea NOT NULL,
    PRIMARY KEY (job, start)
);
-- An archived log: deflate-compressed segments of 1 MiB of log each.
CREATE TABLE log_segments (
    job     bigint NOT NULL REFERENCES jobs ON DELETE CASCADE,
    segment bigint NOT NULL,
    data    bytea NOT NULL,
    PRIMARY KEY (job, segment)
);

-- Webhook delivery ids and idempotency keys, and the jobs named by them.
CREATE TABLE seen_keys (
    key text PRIMARY KEY,
    at  timestamptz NOT NULL
);
CREATE TABLE key_jobs (
    name text PRIMARY KEY,
    job  bigint NOT NULL,
    at   timestamptz NOT NULL
);

CREATE TABLE sessions (
    id_hash    text PRIMARY KEY,
    expires_at timestamptz NOT NULL,
    record     text NOT NULL
);

CREATE TABLE agents (
    id       text PRIMARY KEY,
    name     text NOT NULL UNIQUE,
    token_id text NOT NULL,
    record   text NOT NULL
);

CREATE TABLE agent_tokens (
    id         text PRIMARY KEY,
    token_hash text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL,
    record     text NOT NULL
);

CREATE TABLE notifications (
    id      text PRIMARY KEY,
    due_at  timestamptz NOT NULL,
    attempt bigint NOT NULL,
    record  text NOT NULL
);
CREATE INDEX notifications_due ON notifications (due_at, id);

-- Events too large for a NOTIFY payload: the payload names the row.
CREATE TABLE large_events (
    id    bigserial PRIMARY KEY,
    at    timestamptz NOT NULL DEFAULT now(),
    event text NOT NULL
);

-- A row while an import into this database has begun and not finished
-- (`hobot admin import`): a controller does not start on it.
CREATE TABLE import_unfinished (
    marked boolean PRIMARY KEY CHECK (marked)
);
