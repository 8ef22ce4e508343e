-- An operator's cancel (`vmha cancel`, `vmha migrate --cancel`, `vmha host undrain --abort`)
-- ends a live migration as cancelled, which is neither a failure nor an abort before sending.
ALTER TABLE operations DROP CONSTRAINT operations_state_check;
ALTER TABLE operations ADD CONSTRAINT operations_state_check
    CHECK (state IN ('pending', 'running', 'succeeded', 'failed', 'aborted', 'cancelled'));
