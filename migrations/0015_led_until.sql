-- The last time each controller said it was alive while leading; kept when it stands by again
-- (a restarted leader overwrites its row with a NULL epoch). The next leader dates an outage
-- it finds after its takeover (a protected VM stopped while no leader watched) back to the
-- newest of these, so that downtime is not under-counted.
ALTER TABLE controllers ADD COLUMN led_until timestamptz;
