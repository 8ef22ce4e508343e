-- Outages of protected VMs, for `vmha report`: when each began and ended, and whether it was
-- planned (an operator's stop, a live migration's pause, a drain's cold restart). At most one
-- is open per VM.
CREATE TABLE outages (
    id         bigserial PRIMARY KEY,
    vm_uuid    uuid        NOT NULL,
    vm_name    text        NOT NULL,
    started_at timestamptz NOT NULL,
    ended_at   timestamptz,
    planned    boolean     NOT NULL,
    cause      text        NOT NULL
);
CREATE INDEX outages_by_end ON outages (ended_at);
CREATE UNIQUE INDEX outages_open ON outages (vm_uuid) WHERE ended_at IS NULL;
