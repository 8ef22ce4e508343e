-- Host failure handling: how each host may be fenced, where its agent answers peer polls,
-- and what a VM needs to be restarted elsewhere.
ALTER TABLE hosts ADD COLUMN fencing text NOT NULL DEFAULT 'self'
    CHECK (fencing IN ('self', 'external', 'manual'));
ALTER TABLE hosts ADD COLUMN peer_address text NOT NULL DEFAULT '';
ALTER TABLE vms ADD COLUMN anti_affinity text;
ALTER TABLE vms ADD COLUMN allowed_hosts text[] NOT NULL DEFAULT '{}';
ALTER TABLE vms ADD COLUMN xml text NOT NULL DEFAULT '';
