-- One row: the cluster-wide leader epoch. Every controller start takes the next one, and every
-- operation and lease carries it, so agents can refuse orders from a deposed leader.
CREATE TABLE cluster (
    id    boolean PRIMARY KEY DEFAULT true CHECK (id),
    epoch bigint  NOT NULL
);
INSERT INTO cluster (id, epoch) VALUES (true, 0);

CREATE TABLE hosts (
    name               text PRIMARY KEY,
    migration_uri      text NOT NULL,
    admin_state        text NOT NULL DEFAULT 'active'
                       CHECK (admin_state IN ('active', 'draining', 'maintenance')),
    cpus               integer NOT NULL DEFAULT 0,
    memory_total_kib   bigint  NOT NULL DEFAULT 0,
    cpu_model          text    NOT NULL DEFAULT '',
    libvirt_version    text    NOT NULL DEFAULT '',
    hypervisor_version text    NOT NULL DEFAULT '',
    registered_at      timestamptz NOT NULL DEFAULT now()
);
