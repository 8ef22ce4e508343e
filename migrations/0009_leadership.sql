-- Several controllers on one database: one leads (it holds the session advisory lock, see
-- controller/src/leadership.rs), the others stand by. Each keeps its row fresh, so that
-- `vmha status`, agents and the CLI can name the leader and the standbys.
CREATE TABLE controllers (
    name       text PRIMARY KEY,
    endpoint   text        NOT NULL,
    -- The epoch it leads with; NULL while it stands by.
    epoch      bigint,
    started_at timestamptz NOT NULL DEFAULT now(),
    seen_at    timestamptz NOT NULL DEFAULT now()
);

-- The database's half of epoch fencing: a session that says which epoch it writes for
-- (`SET vmha.epoch`, done by the leader's connections) may change the cluster's tables only
-- while that epoch is the newest. FOR SHARE makes a new leader's `UPDATE cluster SET epoch`
-- wait for the deposed leader's writes in progress, and makes every later one of them fail:
-- a leader frozen with writes queued (SIGSTOP, a long pause) cannot overwrite, once resumed,
-- the state its successor loaded. Sessions that name no epoch (migrations, tools) are not
-- checked.
CREATE FUNCTION vmha_epoch_fence() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    mine text := current_setting('vmha.epoch', true);
    newest bigint;
BEGIN
    IF mine IS NULL OR mine = '' THEN
        RETURN NULL;
    END IF;
    SELECT epoch INTO newest FROM cluster FOR SHARE;
    IF newest <> mine::bigint THEN
        RAISE EXCEPTION 'epoch % is deposed: the leader now has epoch %', mine, newest
            USING ERRCODE = 'VH001';
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER epoch_fence BEFORE INSERT OR UPDATE OR DELETE ON hosts
    FOR EACH STATEMENT EXECUTE FUNCTION vmha_epoch_fence();
CREATE TRIGGER epoch_fence BEFORE INSERT OR UPDATE OR DELETE ON vms
    FOR EACH STATEMENT EXECUTE FUNCTION vmha_epoch_fence();
CREATE TRIGGER epoch_fence BEFORE INSERT OR UPDATE OR DELETE ON operations
    FOR EACH STATEMENT EXECUTE FUNCTION vmha_epoch_fence();
CREATE TRIGGER epoch_fence BEFORE INSERT OR UPDATE OR DELETE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION vmha_epoch_fence();
