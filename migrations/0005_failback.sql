-- Failback: the host a VM should go back to when it is healthy again.
ALTER TABLE vms ADD COLUMN preferred_host text;
