-- What each host's agent last said of its watchdog: a self-fencing host is declared dead on
-- its lease alone only with one armed, so a restarted controller must still know.
ALTER TABLE hosts
    ADD COLUMN watchdog text NOT NULL DEFAULT 'unknown',
    ADD COLUMN watchdog_detail text NOT NULL DEFAULT '',
    ADD COLUMN watchdog_timeout_ms bigint NOT NULL DEFAULT 0;
