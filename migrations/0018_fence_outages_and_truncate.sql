-- The epoch fence (0009) now also covers the outage history and TRUNCATE: a deposed leader's
-- session could otherwise still record or rewrite outages, or empty a table of the cluster.
-- Sessions that name no epoch (migrations, an administrator's tools) stay unchecked, as before;
-- the controllers table stays unfenced, since standbys keep their rows in it.
CREATE TRIGGER epoch_fence BEFORE INSERT OR UPDATE OR DELETE ON outages
    FOR EACH STATEMENT EXECUTE FUNCTION vmha_epoch_fence();
CREATE TRIGGER epoch_fence_truncate BEFORE TRUNCATE ON cluster
    FOR EACH STATEMENT EXECUTE FUNCTION vmha_epoch_fence();
CREATE TRIGGER epoch_fence_truncate BEFORE TRUNCATE ON hosts
    FOR EACH STATEMENT EXECUTE FUNCTION vmha_epoch_fence();
CREATE TRIGGER epoch_fence_truncate BEFORE TRUNCATE ON vms
    FOR EACH STATEMENT EXECUTE FUNCTION vmha_epoch_fence();
CREATE TRIGGER epoch_fence_truncate BEFORE TRUNCATE ON operations
    FOR EACH STATEMENT EXECUTE FUNCTION vmha_epoch_fence();
CREATE TRIGGER epoch_fence_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION vmha_epoch_fence();
CREATE TRIGGER epoch_fence_truncate BEFORE TRUNCATE ON outages
    FOR EACH STATEMENT EXECUTE FUNCTION vmha_epoch_fence();
