//! The leader's lease book for one host, as kept in the cluster state; `lease` decides with it.

use std::collections::VecDeque;

use crate::{Millis, Timings};

/// An answer the leader sent to one host, remembered until the host echoes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Issued {
    pub stamp: Millis,
    /// The lease it granted, if any.
    pub lease_end: Option<Millis>,
    /// The membership it told the agent of (`membership`): the hosts it counts votes among.
    pub members: u64,
    /// The roster version it brought the agent to (0: none, a registration's answer).
    pub roster: u64,
}

/// The leader's lease book for one host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostLease {
    /// Recent answers, newest last (a few: the agent echoes the newest it received).
    pub issued: VecDeque<Issued>,
    /// End of the newest lease the agent has acknowledged: what quorum counts.
    pub acked_end: Option<Millis>,
    /// When the newest lease was granted (the heartbeat's arrival).
    pub granted_at: Option<Millis>,
    /// Since when it has held a lease without a break.
    pub held_since: Option<Millis>,
    /// The newest answer the agent acknowledged: its stamp and the membership it listed.
    pub acked_members: Option<(Millis, u64)>,
}

impl HostLease {
    /// The end of the newest lease granted, acknowledged or not: the host is `online` until
    /// then, and may be declared dead only `fence_margin` after it.
    pub fn end(&self, t: &Timings) -> Option<Millis> {
        self.granted_at.map(|g| Millis(g.0 + t.lease_ttl_ms))
    }

    /// The membership the agent counts votes among, if the leader can be sure of it: the one
    /// it acknowledged last, when every answer sent to it since listed the same. Persisted
    /// (`HostWork::members_acked`), so that a new leader knows it too.
    pub fn settled_members(&self) -> Option<u64> {
        let (since, members) = self.acked_members?;
        self.issued.iter().filter(|i| i.stamp > since).all(|i| i.members == members).then_some(members)
    }
}
