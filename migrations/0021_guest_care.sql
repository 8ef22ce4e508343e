-- A hung guest's resets in place and its alarm (engine/src/guest_reset.rs, as JSON): a new
-- leader keeps counting its reset budget. NULL: vmha never reset it.
ALTER TABLE vms ADD COLUMN guest_care text;
-- A hung guest's reset in place, and the destroy and start in place that follows one that did
-- not help.
ALTER TABLE operations DROP CONSTRAINT operations_kind_check;
ALTER TABLE operations ADD CONSTRAINT operations_kind_check
    CHECK (kind IN ('migrate', 'start', 'shutdown', 'destroy', 'reset', 'power_cycle'));
-- Its service probes (`vmha vm probe`, engine/src/service_probe.rs, as JSON); NULL: none.
ALTER TABLE vms ADD COLUMN probes text;
