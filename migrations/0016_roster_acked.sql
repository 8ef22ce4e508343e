-- What each host's agent knew of the protected VMs, kept for the next leader (issue: a leader
-- and a host lost together). hosts.roster_acked: the newest roster version the host's agent
-- acknowledged; vms.protected_in: the first roster version that listed the VM's protection.
-- Versions carry the leader's epoch in their upper 32 bits, so they compare across leaders.
-- NULL: not known, and a new leader then waits for an operator as before.
ALTER TABLE hosts ADD COLUMN roster_acked bigint;
ALTER TABLE vms ADD COLUMN protected_in bigint;
