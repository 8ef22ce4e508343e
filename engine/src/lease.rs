//! The leader's side of the safety rule (engine/SAFETY.md): which
//! heartbeats earn a lease, which leases count toward quorum, and whether quorum has held long
//! enough for a silent host to be declared dead.
//!
//! Two refinements over the plain rule make the agents' peer polls sound (see
//! `selffence` for the agent's half, and engine/SAFETY.md for the argument):
//! - **Bounded transit.** A heartbeat echoes the stamp of the last answer its agent received
//!   and how long ago that was; the leader grants a lease only if that proves the heartbeat
//!   spent at most `max_transit` in flight. So a lease the leader grants ends at most
//!   `max_transit` after the agent's own view of it (which starts at the send).
//! - **Acknowledged leases.** Toward quorum the leader counts only leases the agent has
//!   acknowledged (echoed) in a later heartbeat: a lease the agent never learned of cannot be
//!   one it tells its peers it lacks.

use std::hash::{DefaultHasher, Hash, Hasher};

use crate::host_lease::{HostLease, Issued};
use crate::{ClusterState, Millis};

/// What the leader answers a heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseAnswer {
    /// A lease of `ttl_ms`, measured by the agent from the heartbeat's send.
    Granted { stamp: Millis, ttl_ms: u64 },
    /// No lease this time (the heartbeat was late or echoed nothing this leader sent).
    Refused { stamp: Millis, reason: &'static str },
}

impl LeaseAnswer {
    pub fn stamp(&self) -> Millis {
        match self {
            LeaseAnswer::Granted { stamp, .. } | LeaseAnswer::Refused { stamp, .. } => *stamp,
        }
    }
}

/// What a heartbeat says about the answer before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Echo {
    /// The leader (epoch) that sent it: stamps of another leader's clock mean nothing here.
    pub epoch: u64,
    /// The stamp of the newest answer the agent received from this leader.
    pub stamp: Millis,
    /// Agent time from receiving that answer to sending this heartbeat.
    pub held_ms: u64,
}

const ISSUED_KEPT: usize = 8;

/// `N + 1` votes for `N` hosts (the control plane has one); the majority of them.
pub fn votes(state: &ClusterState) -> (usize, usize) {
    let total = state.hosts.len() + 1;
    (total, total / 2 + 1)
}

/// Whether the leader holds quorum at `now`: its own vote plus every host whose acknowledged
/// lease still counts form a majority. A lease stops counting one heartbeat interval before
/// its end (`Timings::quorum_shortfall_ms`), which is what agents tell their peers.
pub fn has_quorum(state: &ClusterState, now: Millis) -> bool {
    let (_, majority) = votes(state);
    let short = state.timings.quorum_shortfall_ms();
    let leased =
        state.hosts.values().filter(|h| h.lease.acked_end.is_some_and(|e| e.0 > now.0 + short)).count();
    leased + 1 >= majority
}

/// Until when the acknowledged leases held now keep quorum (exclusive), if they do at all:
/// the end of the `majority - 1`th longest one, counted a shortfall short.
fn quorum_until(state: &ClusterState) -> Option<Millis> {
    let (_, majority) = votes(state);
    let needed = majority - 1;
    if needed == 0 {
        return Some(Millis(u64::MAX));
    }
    let mut ends: Vec<u64> = state.hosts.values().filter_map(|h| h.lease.acked_end).map(|e| e.0).collect();
    if ends.len() < needed {
        return None;
    }
    let (_, nth, _) = ends.select_nth_unstable_by(needed - 1, |a, b| b.cmp(a));
    Some(Millis(nth.saturating_sub(state.timings.quorum_shortfall_ms())))
}

/// Keeps `quorum_since` exact. Between two calls leases only expire (grants and new hosts go
/// through a call first), so the count only falls: quorum at this call means quorum all along
/// since the previous one.
///
/// Called for every heartbeat, so it does not count every host each time: acknowledged lease
/// ends only grow, so the instant until which the leases seen at the last count keep quorum
/// (`quorum_until`) stays a sure bound until the membership changes (`quorum_cache`).
pub fn observe_quorum(state: &mut ClusterState, now: Millis) {
    let hosts = state.hosts.len();
    let until = match state.quorum_cache {
        Some((until, n)) if n == hosts && now < until => Some(until),
        _ => {
            let until = quorum_until(state);
            state.quorum_cache = until.map(|u| (u, hosts));
            until
        }
    };
    if until.is_some_and(|u| now < u) {
        state.quorum_since.get_or_insert(now);
    } else {
        state.quorum_since = None;
    }
}

/// Whether quorum has held without a break for at least `ms` up to `now`.
pub fn quorum_held_for(state: &ClusterState, now: Millis, ms: u64) -> bool {
    state.quorum_since.is_some_and(|s| now.since(s) >= ms)
}

/// A fingerprint of the cluster's membership (its hosts' names): every answer to a heartbeat
/// tells the agent how many hosts there are and who its peers are, which is how it counts the
/// votes the leader could hold.
pub fn membership(state: &ClusterState) -> u64 {
    let mut h = DefaultHasher::new();
    for name in state.hosts.keys() {
        name.hash(&mut h);
    }
    h.finish()
}

/// `membership`, kept from one heartbeat to the next while the number of hosts stays (a host
/// leaves only through `forget_membership`).
pub fn current_membership(state: &mut ClusterState) -> u64 {
    let hosts = state.hosts.len();
    match state.membership_cache {
        Some((m, n)) if n == hosts => m,
        _ => {
            let m = membership(state);
            state.membership_cache = Some((m, hosts));
            m
        }
    }
}

/// A host left the cluster: what was kept of its membership and quorum is counted again.
pub fn forget_membership(state: &mut ClusterState) {
    state.membership_cache = None;
    state.quorum_cache = None;
}

/// Whether `host` can only count votes among the hosts there are now: the answer it last
/// acknowledged, and every answer sent to it since, listed the current membership. A host that
/// missed a join or a removal counts votes among other hosts than the leader does: it could
/// keep its VMs while the leader, counting its own way, holds quorum (SAFETY.md, "Membership
/// changes"). A host that acknowledged nothing this leader or its predecessors recorded may
/// count any membership. `current` is `current_membership`, taken once by a caller that asks
/// for many hosts.
pub fn knows_membership(state: &ClusterState, host: &str, current: u64) -> bool {
    state.hosts.get(host).is_some_and(|h| h.lease.settled_members() == Some(current))
}

/// Records an answer to `host` that grants nothing (its registration), for the echo check.
pub fn issue_stamp(state: &mut ClusterState, host: &str, now: Millis) -> Millis {
    let members = current_membership(state);
    if let Some(h) = state.hosts.get_mut(host) {
        push_issued(&mut h.lease, Issued { stamp: now, lease_end: None, members, roster: 0 });
    }
    now
}

fn push_issued(l: &mut HostLease, i: Issued) {
    l.issued.push_back(i);
    while l.issued.len() > ISSUED_KEPT {
        l.issued.pop_front();
    }
}

/// How long a heartbeat that arrived at `arrived` was in flight at most: the answer it echoes
/// left at `stamp`, and the agent held it `held_ms` before sending this one. `None` for an
/// echo from the future (another leader's clock).
pub fn transit_bound(arrived: Millis, echo: &Echo) -> Option<u64> {
    (echo.stamp <= arrived).then(|| arrived.0.saturating_sub(echo.stamp.0).saturating_sub(echo.held_ms))
}

/// A heartbeat from `host` arrived at `arrived` and is decided at `now`: acknowledge what it
/// echoes, then grant a lease if it provably spent at most `max_transit` in flight.
///
/// `arrived` is when the controller received it, before it waited for its turn (a burst of
/// 1000 aligned heartbeats queues for tens of ms): transit is measured to there, and the
/// lease runs from there. That keeps both bounds of SAFETY.md (1): the leader's view of the
/// lease starts after the agent's (the send), and at most the measured transit later.
/// `roster` is the version of the roster the answer brings the agent to.
pub fn on_heartbeat(
    state: &mut ClusterState,
    host: &str,
    echo: Option<Echo>,
    roster: u64,
    arrived: Millis,
    now: Millis,
) -> LeaseAnswer {
    let arrived = arrived.min(now);
    observe_quorum(state, now);
    let t = state.timings;
    let epoch = state.epoch;
    let members = current_membership(state);
    let Some(h) = state.hosts.get_mut(host) else {
        return LeaseAnswer::Refused { stamp: now, reason: "host not registered" };
    };
    if h.dead.is_some() {
        // Its VMs may run elsewhere now. No lease (and so no start: the agent and its start
        // hook need one) until a report with its domains has shown what it still runs and
        // the stale copies are on their way out (`recovery::on_report`).
        push_issued(&mut h.lease, Issued { stamp: now, lease_end: None, members, roster });
        return LeaseAnswer::Refused {
            stamp: now,
            reason: "the host was declared dead; it gets a lease once it has reported its domains",
        };
    }
    let known = echo
        .filter(|e| e.epoch == epoch)
        .and_then(|e| h.lease.issued.iter().find(|i| i.stamp == e.stamp).copied().map(|i| (e, i)));
    let Some((echo, issued)) = known else {
        push_issued(&mut h.lease, Issued { stamp: now, lease_end: None, members, roster });
        return LeaseAnswer::Refused { stamp: now, reason: "it echoed no answer of this leader" };
    };
    if let Some(end) = issued.lease_end {
        h.lease.acked_end = Some(h.lease.acked_end.map_or(end, |a| a.max(end)));
    }
    if issued.roster != 0 {
        h.roster_acked = h.roster_acked.max(Some(issued.roster));
    }
    if h.lease.acked_members.is_none_or(|(s, _)| s < issued.stamp) {
        h.lease.acked_members = Some((issued.stamp, issued.members));
    }
    if transit_bound(arrived, &echo).is_none_or(|transit| transit > t.max_transit_ms) {
        push_issued(&mut h.lease, Issued { stamp: now, lease_end: None, members, roster });
        return LeaseAnswer::Refused { stamp: now, reason: "the heartbeat was in flight too long" };
    }
    let end = Millis(arrived.0 + t.lease_ttl_ms);
    push_issued(&mut h.lease, Issued { stamp: now, lease_end: Some(end), members, roster });
    if h.lease.end(&t).is_none_or(|e| e <= arrived) {
        h.lease.held_since = Some(arrived);
    }
    h.lease.granted_at = Some(h.lease.granted_at.map_or(arrived, |g| g.max(arrived)));
    LeaseAnswer::Granted { stamp: now, ttl_ms: t.lease_ttl_ms }
}

/// How the controller sees a host now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostLiveness {
    /// Holds an unexpired lease.
    Online,
    /// No unexpired lease, not (yet) declared dead: nothing is restarted from it.
    Suspect,
    /// Declared dead (lease expired under quorum, fenced, or confirmed by an operator); its
    /// protected VMs are restarted elsewhere.
    Dead,
}

impl HostLiveness {
    pub fn as_str(self) -> &'static str {
        match self {
            HostLiveness::Online => "online",
            HostLiveness::Suspect => "suspect",
            HostLiveness::Dead => "dead",
        }
    }
}

impl ClusterState {
    pub fn liveness(&self, host: &str, now: Millis) -> HostLiveness {
        let Some(h) = self.hosts.get(host) else { return HostLiveness::Suspect };
        if h.dead.is_some() {
            HostLiveness::Dead
        } else if h.lease.end(&self.timings).is_some_and(|e| e > now) {
            HostLiveness::Online
        } else {
            HostLiveness::Suspect
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::tests::three_hosts;

    fn echo(stamp: Millis, held_ms: u64) -> Option<Echo> {
        Some(Echo { epoch: 0, stamp, held_ms })
    }

    #[test]
    fn a_prompt_heartbeat_echoing_our_answer_earns_a_lease_and_the_next_acknowledges_it() {
        let mut s = three_hosts();
        let r = issue_stamp(&mut s, "kvm1", Millis(1_000));
        let a = on_heartbeat(&mut s, "kvm1", echo(r, 950), 1, Millis(1_960), Millis(1_960));
        assert_eq!(a, LeaseAnswer::Granted { stamp: Millis(1_960), ttl_ms: 5_000 });
        assert_eq!(s.liveness("kvm1", Millis(6_959)), HostLiveness::Online);
        assert_eq!(s.liveness("kvm1", Millis(6_960)), HostLiveness::Suspect);
        assert_eq!(s.hosts["kvm1"].lease.acked_end, None, "not acknowledged yet");
        on_heartbeat(&mut s, "kvm1", echo(a.stamp(), 1_000), 1, Millis(2_970), Millis(2_970));
        assert_eq!(s.hosts["kvm1"].lease.acked_end, Some(Millis(6_960)));
    }

    #[test]
    fn a_heartbeat_that_may_have_been_in_flight_too_long_earns_nothing() {
        let mut s = three_hosts();
        let r = issue_stamp(&mut s, "kvm1", Millis(1_000));
        // Held 100 ms, arrived 2 s after the answer: up to 1.9 s in flight.
        let a = on_heartbeat(&mut s, "kvm1", echo(r, 100), 1, Millis(3_000), Millis(3_000));
        assert!(matches!(a, LeaseAnswer::Refused { .. }), "{a:?}");
        // An echo this leader never sent earns nothing either, nor one of an older leader.
        let a = on_heartbeat(&mut s, "kvm1", echo(Millis(999), 0), 1, Millis(3_000), Millis(3_000));
        assert!(matches!(a, LeaseAnswer::Refused { .. }), "{a:?}");
        let stamp = a.stamp();
        s.epoch = 7;
        let a = on_heartbeat(&mut s, "kvm1", echo(stamp, 0), 1, Millis(3_001), Millis(3_001));
        assert!(matches!(a, LeaseAnswer::Refused { .. }), "{a:?}");
        assert_eq!(s.liveness("kvm1", Millis(3_000)), HostLiveness::Suspect);
    }

    proptest::proptest! {
        /// The kept bound never says quorum where a full count would not, nor the reverse.
        #[test]
        fn observed_quorum_agrees_with_a_full_count(
            hosts in 1usize..9,
            grants in proptest::collection::vec((0usize..9, 0u64..400, 0u64..8_000), 1..60),
        ) {
            let mut s = ClusterState::default();
            for i in 0..hosts {
                s.hosts.insert(format!("kvm{i}"), crate::HostView::new(&format!("kvm{i}")));
            }
            let mut now = 0;
            for (host, advance, ttl) in grants {
                now += advance;
                observe_quorum(&mut s, Millis(now));
                proptest::prop_assert_eq!(s.quorum_since.is_some(), has_quorum(&s, Millis(now)));
                let name = format!("kvm{}", host % hosts);
                let l = &mut s.hosts.get_mut(&name).unwrap().lease;
                l.acked_end = Some(l.acked_end.map_or(Millis(now + ttl), |e| e.max(Millis(now + ttl))));
            }
        }
    }

    #[test]
    fn quorum_counts_acknowledged_leases_an_interval_and_a_transit_short_and_the_control_plane_vote() {
        let mut s = three_hosts();
        assert_eq!(votes(&s), (4, 3));
        s.hosts.get_mut("kvm1").unwrap().lease.acked_end = Some(Millis(6_160));
        assert!(!has_quorum(&s, Millis(5)), "1 host + control plane = 2 of 4");
        s.hosts.get_mut("kvm2").unwrap().lease.acked_end = Some(Millis(6_170));
        assert!(has_quorum(&s, Millis(5)));
        assert!(!has_quorum(&s, Millis(5_010)), "kvm1's lease ends at 6160: it counts until 5010");
        observe_quorum(&mut s, Millis(5));
        observe_quorum(&mut s, Millis(5_009));
        assert!(quorum_held_for(&s, Millis(5_009), 5_004));
        observe_quorum(&mut s, Millis(5_010));
        assert!(!quorum_held_for(&s, Millis(5_010), 0));
    }
}
