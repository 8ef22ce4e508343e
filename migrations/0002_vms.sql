-- VMs are keyed by libvirt domain UUID: names can change, UUIDs survive migration.
CREATE TABLE vms (
    uuid         uuid PRIMARY KEY,
    name         text    NOT NULL,
    memory_kib   bigint  NOT NULL,
    vcpus        integer NOT NULL,
    -- Desired state, set by operators.
    protected    boolean NOT NULL DEFAULT false,
    priority     integer NOT NULL DEFAULT 0,
    -- Observed state, as of the last report; NULL host: no host reports it.
    current_host text REFERENCES hosts (name),
    state        text    NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX vms_name ON vms (name);
