-- The membership each host's agent counts votes among, kept for the next leader: a host cut
-- off just after a join or removal counts other hosts than a new leader would assume, and
-- could keep its VMs while that leader restarts them (found by the safety simulator at
-- 1,000,000 schedules). hosts.members_acked: the fingerprint of the membership the agent
-- acknowledged, when every answer sent to it since listed the same. NULL: not sure, and a new
-- leader then waits for the host to answer (or for an operator) before declaring it dead.
ALTER TABLE hosts ADD COLUMN members_acked bigint;
