-- A cap on the memory vmha places on a host, whatever the host reports free.
ALTER TABLE hosts ADD COLUMN memory_limit_kib bigint;
