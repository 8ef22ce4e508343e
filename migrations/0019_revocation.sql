-- Revocation. `crl`: the cluster CA's newest CRL an admin published (`vmha ca publish`);
-- every controller refuses the certificates it lists and hands it to every agent. One row,
-- replaced only by a higher CRL number. `removed_hosts`: when each host was last removed
-- (`vmha host remove`); the certificates issued to that name before then are refused.
CREATE TABLE crl (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    number bigint NOT NULL CHECK (number > 0),
    der bytea NOT NULL,
    published_at timestamptz NOT NULL DEFAULT now(),
    published_by text NOT NULL
);
CREATE TABLE removed_hosts (
    name text PRIMARY KEY,
    removed_at timestamptz NOT NULL
);
CREATE TRIGGER epoch_fence BEFORE INSERT OR UPDATE OR DELETE ON crl
    FOR EACH STATEMENT EXECUTE FUNCTION vmha_epoch_fence();
CREATE TRIGGER epoch_fence BEFORE INSERT OR UPDATE OR DELETE ON removed_hosts
    FOR EACH STATEMENT EXECUTE FUNCTION vmha_epoch_fence();
CREATE TRIGGER epoch_fence_truncate BEFORE TRUNCATE ON crl
    FOR EACH STATEMENT EXECUTE FUNCTION vmha_epoch_fence();
CREATE TRIGGER epoch_fence_truncate BEFORE TRUNCATE ON removed_hosts
    FOR EACH STATEMENT EXECUTE FUNCTION vmha_epoch_fence();
