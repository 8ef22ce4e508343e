-- Written before a command is sent, so that whoever leads next can see what was begun.
CREATE TABLE operations (
    id             uuid PRIMARY KEY,
    kind           text NOT NULL CHECK (kind IN ('migrate', 'start', 'shutdown', 'destroy')),
    vm_uuid        uuid NOT NULL,
    vm_name        text NOT NULL,
    source         text NOT NULL DEFAULT '',
    target         text NOT NULL DEFAULT '',
    state          text NOT NULL
                   CHECK (state IN ('pending', 'running', 'succeeded', 'failed', 'aborted')),
    epoch          bigint NOT NULL,
    data_total     bigint NOT NULL DEFAULT 0,
    data_processed bigint NOT NULL DEFAULT 0,
    data_remaining bigint NOT NULL DEFAULT 0,
    elapsed_ms     bigint NOT NULL DEFAULT 0,
    downtime_ms    bigint NOT NULL DEFAULT 0,
    bytes          bigint NOT NULL DEFAULT 0,
    error          text   NOT NULL DEFAULT '',
    created_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz
);
CREATE INDEX operations_unfinished ON operations (state) WHERE state IN ('pending', 'running');

-- Append-only: who or what did what, and why.
CREATE TABLE events (
    id           bigserial PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT now(),
    subject_kind text NOT NULL CHECK (subject_kind IN ('host', 'vm', 'operation', 'controller')),
    subject      text NOT NULL,
    kind         text NOT NULL,
    message      text NOT NULL,
    actor        text NOT NULL
);
