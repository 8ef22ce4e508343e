-- Admission control: a VM protected with --force beyond the host reserve keeps that fact (who
-- forced it, and what the reserve lacked) so that `vmha status` shows it after a restart too.
ALTER TABLE vms ADD COLUMN admission_override text;
