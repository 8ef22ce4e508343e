-- `vmha vm stop`: a VM stopped on purpose keeps who stopped it, so that no controller (this one
-- after a restart, or a new leader) starts it again until `vmha vm start`.
ALTER TABLE vms ADD COLUMN stopped_by text;
