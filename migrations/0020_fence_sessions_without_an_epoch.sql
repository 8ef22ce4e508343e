-- A controller's own sessions that do not write for a leader's epoch (a standby's, and the
-- one every controller reads and takes epochs with) now say so: `vmha.epoch = 'none'`. The
-- fence refuses their writes to the cluster's tables, so that a code path that forgot its
-- epoch fails instead of writing unfenced. Sessions that name nothing (migrations, an
-- administrator's tools) stay unchecked, as before.
CREATE OR REPLACE FUNCTION vmha_epoch_fence() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    mine text := current_setting('vmha.epoch', true);
    newest bigint;
BEGIN
    IF mine IS NULL OR mine = '' THEN
        RETURN NULL;
    END IF;
    IF mine = 'none' THEN
        RAISE EXCEPTION 'this session writes for no epoch: only the leader''s sessions change the cluster''s tables'
            USING ERRCODE = 'VH001';
    END IF;
    SELECT epoch INTO newest FROM cluster FOR SHARE;
    IF newest <> mine::bigint THEN
        RAISE EXCEPTION 'epoch % is deposed: the leader now has epoch %', mine, newest
            USING ERRCODE = 'VH001';
    END IF;
    RETURN NULL;
END;
$$;
