-- Work in progress that a restarted controller resumes instead of forgetting: a host declared
-- dead stays dead until it reports again, a drain continues, a restart after a host failure
-- finishes, and an operation in flight is followed to its end (never sent again). The JSON
-- columns hold the engine's own types (controller/engine/src/persist.rs says what survives).
ALTER TABLE hosts ADD COLUMN dead_cause text;
ALTER TABLE hosts ADD COLUMN drain text;
ALTER TABLE vms ADD COLUMN recovery text;
-- Which state machine takes an operation's result (engine: operation::Purpose), who asked,
-- and an operator's bandwidth and timeout for one migration.
ALTER TABLE operations ADD COLUMN purpose text NOT NULL DEFAULT 'operator';
ALTER TABLE operations ADD COLUMN actor text NOT NULL DEFAULT 'controller';
ALTER TABLE operations ADD COLUMN bandwidth_mib_s bigint;
ALTER TABLE operations ADD COLUMN timeout_ms bigint;
