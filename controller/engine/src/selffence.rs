//! The agent's half of the safety rule: its own lease, the peer polls, and the decision to
//! destroy its protected VMs (self-fence) or to keep them. Pure: the agent's shell feeds it the
//! time, lease grants and poll answers, and carries out what `tick` decides.
//!
//! The rule (DESIGN.md, refined in controller/engine/SAFETY.md): when its lease expires, an agent keeps its
//! VMs only if its latest poll shows so many votes that the leader cannot count (itself
//! included) that the votes left are fewer than the majority. A peer's vote cannot be counted
//! if the newest lease the leader could count for it ends by the *deadline*: `fence_margin -
//! guard` after this agent's own lease ended (before the leader may declare this host dead),
//! or the start of the poll, whichever is later. Every later poll must confirm it again.

use crate::Millis;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SelfFenceConfig {
    pub heartbeat_interval_ms: u64,
    pub lease_ttl_ms: u64,
    pub fence_margin_ms: u64,
    /// Longest a heartbeat may be in flight and still earn a lease (the leader enforces it).
    pub max_transit_ms: u64,
    /// How often peers are polled once renewals are missed.
    pub poll_every_ms: u64,
    /// Time kept back from the fence margin for one more poll and the destroy itself.
    pub guard_ms: u64,
}

impl Default for SelfFenceConfig {
    fn default() -> Self {
        SelfFenceConfig {
            heartbeat_interval_ms: 1_000,
            lease_ttl_ms: 5_000,
            fence_margin_ms: 1_000,
            max_transit_ms: 150,
            poll_every_ms: 200,
            guard_ms: 500,
        }
    }
}

/// One peer's answer to "until when could the leader count your lease?".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAnswer {
    pub host: String,
    /// From the moment it answered; negative: that long ago.
    pub upper_remaining_ms: i64,
    /// When the answer arrived here.
    pub received_at: Millis,
}

/// A finished poll of every peer; peers that did not answer in time are simply absent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Poll {
    pub started: Millis,
    pub answers: Vec<PeerAnswer>,
}

/// Where the agent stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Holds an unexpired lease.
    Leased,
    /// Just started, no lease yet: a short grace to get one before the rule applies.
    Starting,
    /// No lease, but its peers confirm the leader cannot have quorum: VMs kept.
    Keeping { reason: String },
    /// Destroyed its protected VMs; stays so until a lease comes back.
    Fenced { reason: String },
}

/// What the shell must do now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Nothing,
    /// Ask every peer (answers within one poll period) and report back with `polled`.
    PollPeers,
    /// Destroy every protected VM at once, and record why.
    Fence {
        reason: String,
    },
    /// Log that the VMs are kept without a lease, and why.
    Keep {
        reason: String,
    },
}

#[derive(Clone, Debug)]
pub struct LeaseKeeper {
    cfg: SelfFenceConfig,
    started: Millis,
    /// Own view of the lease: from the send of the heartbeat that earned it.
    lease_end: Option<Millis>,
    renewed_send: Option<Millis>,
    cluster_hosts: usize,
    last_poll: Option<Poll>,
    poll_started: Option<Millis>,
    /// The latest instant at which a poll showed the leader lacked quorum.
    confirmed_at: Option<Millis>,
    phase: Phase,
}

impl LeaseKeeper {
    pub fn new(cfg: SelfFenceConfig, now: Millis) -> LeaseKeeper {
        LeaseKeeper {
            cfg,
            started: now,
            lease_end: None,
            renewed_send: None,
            cluster_hosts: 0,
            last_poll: None,
            poll_started: None,
            confirmed_at: None,
            phase: Phase::Starting,
        }
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// The leader granted `ttl_ms` to the heartbeat sent at `sent_at`, in a cluster of
    /// `cluster_hosts` hosts.
    pub fn granted(&mut self, sent_at: Millis, ttl_ms: u64, cluster_hosts: usize) {
        let end = Millis(sent_at.0 + ttl_ms);
        self.lease_end = Some(self.lease_end.map_or(end, |e| e.max(end)));
        self.renewed_send = Some(self.renewed_send.map_or(sent_at, |s| s.max(sent_at)));
        self.cluster_hosts = cluster_hosts;
    }

    /// The size of the cluster as the leader last said, also from answers without a lease.
    pub fn set_cluster_hosts(&mut self, n: usize) {
        self.cluster_hosts = n;
    }

    /// What this agent answers a peer: until when the leader could count its lease, from now
    /// (negative: it could not since that long). The leader counts only leases this agent
    /// received, and each ends at most `max_transit` after this agent's own view of it. Before
    /// its first lease, an earlier run of this agent may have held one, sent before this run
    /// started: it ended by `started + lease_ttl` in this agent's view.
    pub fn upper_remaining_ms(&self, now: Millis) -> i64 {
        let end = self.lease_end.unwrap_or(Millis(self.started.0 + self.cfg.lease_ttl_ms));
        (end.0 + self.cfg.max_transit_ms) as i64 - now.0 as i64
    }

    pub fn polled(&mut self, poll: Poll) {
        if self.last_poll.as_ref().is_none_or(|p| p.started <= poll.started) {
            self.last_poll = Some(poll);
        }
    }

    fn poll_due(&mut self, now: Millis) -> bool {
        let due = self.poll_started.is_none_or(|p| now.since(p) >= self.cfg.poll_every_ms);
        if due {
            self.poll_started = Some(now);
        }
        due
    }

    /// What the latest poll shows about the leader's quorum.
    fn judge(&self, own_end: Millis, now: Millis) -> Verdict {
        let Some(poll) = &self.last_poll else { return Verdict::No("no peer poll has answered".into()) };
        // A poll older than that says nothing about now.
        if now.since(poll.started) > 2 * self.cfg.poll_every_ms + self.cfg.heartbeat_interval_ms {
            return Verdict::No("the latest peer poll is too old".into());
        }
        let total = self.cluster_hosts + 1;
        let majority = total / 2 + 1;
        // received_at + remaining is no earlier than the true end: the answer was given before
        // it arrived.
        let lapsed_by = |t: Millis| -> Vec<&str> {
            poll.answers
                .iter()
                .filter(|a| a.received_at.0 as i64 + a.upper_remaining_ms <= t.0 as i64)
                .map(|a| a.host.as_str())
                .collect()
        };
        let detail = |lapsed: &[&str]| {
            format!(
                "{} of {} hosts without a lease the leader could count (this host and {}); the leader can hold \
                 at most {} of {total} votes, majority {majority}",
                lapsed.len() + 1,
                self.cluster_hosts,
                if lapsed.is_empty() { "none of its peers".to_string() } else { lapsed.join(", ") },
                total - (lapsed.len() + 1).min(total),
            )
        };
        let blocks = |lapsed: &[&str]| total.saturating_sub(lapsed.len() + 1) < majority;
        let at_start = lapsed_by(poll.started);
        if blocks(&at_start) {
            return Verdict::Fact(poll.started, detail(&at_start));
        }
        let deadline = Millis((own_end.0 + self.cfg.fence_margin_ms).saturating_sub(self.cfg.guard_ms));
        let by_deadline = lapsed_by(deadline);
        if now < deadline && blocks(&by_deadline) {
            return Verdict::Predicted(detail(&by_deadline));
        }
        Verdict::No(detail(&by_deadline))
    }

    pub fn tick(&mut self, now: Millis) -> Decision {
        if self.lease_end.is_some_and(|e| now < e) {
            self.phase = Phase::Leased;
            // Two renewals missed: start asking the peers, so a poll is at hand at expiry.
            let missed =
                self.renewed_send.is_some_and(|s| now.since(s) >= 2 * self.cfg.heartbeat_interval_ms);
            return if missed && self.poll_due(now) { Decision::PollPeers } else { Decision::Nothing };
        }
        if matches!(self.phase, Phase::Fenced { .. }) {
            return Decision::Nothing;
        }
        if self.cluster_hosts == 1 {
            return Decision::Nothing; // one host: nowhere to fail over to, never self-fence
        }
        let own_end = self.lease_end.unwrap_or(self.started);
        if self.lease_end.is_none() && now.since(self.started) < 2 * self.cfg.heartbeat_interval_ms {
            // Just started: give the leader a chance to answer before judging.
            return if self.poll_due(now) { Decision::PollPeers } else { Decision::Nothing };
        }
        if self.cluster_hosts == 0 {
            let reason = "no lease, and no leader ever said how big the cluster is: nothing can confirm the \
                          leader lacks quorum"
                .to_string();
            self.phase = Phase::Fenced { reason: reason.clone() };
            return Decision::Fence { reason };
        }
        let keep = match self.judge(own_end, now) {
            Verdict::Fact(at, reason) => {
                self.confirmed_at = Some(self.confirmed_at.map_or(at, |c| c.max(at)));
                Ok(reason)
            }
            Verdict::Predicted(reason) => Ok(format!("{reason}, once their leases lapse")),
            // At the last confirmed instant the leader lacked quorum: it cannot declare this host
            // dead before holding quorum for lease_ttl + fence_margin after it. Until then keep
            // trying for a lease (the leader may just have come back for another host first).
            Verdict::No(reason) => match self.confirmed_at {
                Some(c)
                    if now.0 + self.cfg.guard_ms < c.0 + self.cfg.lease_ttl_ms + self.cfg.fence_margin_ms =>
                {
                    Ok(format!(
                        "not confirmed any more ({reason}), but the leader lacked quorum {} ms ago",
                        now.since(c)
                    ))
                }
                _ => Err(reason),
            },
        };
        match keep {
            Ok(reason) => {
                let first = !matches!(self.phase, Phase::Keeping { .. });
                self.phase = Phase::Keeping { reason: reason.clone() };
                if first {
                    Decision::Keep { reason }
                } else if self.poll_due(now) {
                    Decision::PollPeers
                } else {
                    Decision::Nothing
                }
            }
            Err(reason) => {
                let reason = format!("lease expired and the leader may hold quorum: {reason}");
                self.phase = Phase::Fenced { reason: reason.clone() };
                Decision::Fence { reason }
            }
        }
    }
}

/// What a poll shows.
enum Verdict {
    /// At this instant (the poll's start) the leader lacked quorum.
    Fact(Millis, String),
    /// The leader will lack quorum by the deadline unless peers renew, which the next polls see.
    Predicted(String),
    No(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(host: &str, upper: i64, at: u64) -> PeerAnswer {
        PeerAnswer { host: host.into(), upper_remaining_ms: upper, received_at: Millis(at) }
    }

    fn leased(at: u64) -> LeaseKeeper {
        let mut k = LeaseKeeper::new(SelfFenceConfig::default(), Millis(0));
        k.granted(Millis(at), 5_000, 3);
        k
    }

    #[test]
    fn polls_start_after_two_missed_renewals() {
        let mut k = leased(1_000);
        assert_eq!(k.tick(Millis(2_500)), Decision::Nothing);
        assert_eq!(k.tick(Millis(3_000)), Decision::PollPeers);
        assert_eq!(k.tick(Millis(3_100)), Decision::Nothing, "one poll per period");
        assert_eq!(k.tick(Millis(3_200)), Decision::PollPeers);
    }

    #[test]
    fn keeps_vms_when_peers_confirm_the_leader_cannot_have_quorum_and_fences_when_that_ends() {
        let mut k = leased(1_000); // lease to 6_000
        // kvm2 has no lease; kvm3's lease lapses before the deadline (6_000 + 1_000 - 500).
        k.polled(Poll {
            started: Millis(5_900),
            answers: vec![answer("kvm2", 0, 5_910), answer("kvm3", 400, 5_920)],
        });
        assert!(matches!(k.tick(Millis(6_000)), Decision::Keep { .. }));
        assert!(matches!(k.phase(), Phase::Keeping { .. }));
        // The control plane came back for kvm2 and kvm3: they hold fresh leases.
        k.polled(Poll {
            started: Millis(6_200),
            answers: vec![answer("kvm2", 5_000, 6_210), answer("kvm3", 5_000, 6_210)],
        });
        let d = k.tick(Millis(6_250));
        assert!(matches!(&d, Decision::Fence { reason } if reason.contains("none of its peers")), "{d:?}");
        assert_eq!(k.tick(Millis(6_300)), Decision::Nothing, "fenced once");
    }

    #[test]
    fn fences_when_a_peer_holds_a_lease_past_the_deadline_or_nobody_answers() {
        let mut k = leased(1_000);
        k.polled(Poll { started: Millis(5_900), answers: vec![answer("kvm2", 4_000, 5_910)] });
        assert!(matches!(k.tick(Millis(6_000)), Decision::Fence { .. }));
        let mut k = leased(1_000);
        k.polled(Poll { started: Millis(5_900), answers: vec![] });
        assert!(matches!(k.tick(Millis(6_000)), Decision::Fence { .. }));
        let mut k = leased(1_000);
        assert!(
            matches!(k.tick(Millis(6_000)), Decision::Fence { reason } if reason.contains("no peer poll"))
        );
    }

    #[test]
    fn a_one_host_cluster_never_fences_and_a_new_lease_ends_a_fence() {
        let mut k = LeaseKeeper::new(SelfFenceConfig::default(), Millis(0));
        k.granted(Millis(0), 5_000, 1);
        assert_eq!(k.tick(Millis(60_000)), Decision::Nothing);
        let mut k = leased(0);
        assert!(matches!(k.tick(Millis(5_000)), Decision::Fence { .. }));
        k.granted(Millis(9_000), 5_000, 3);
        assert_eq!(k.tick(Millis(9_100)), Decision::Nothing);
        assert_eq!(k.phase(), &Phase::Leased);
    }

    #[test]
    fn what_peers_are_told_covers_the_leaders_longer_view() {
        let k = leased(1_000);
        assert_eq!(k.upper_remaining_ms(Millis(6_000)), 150);
        assert_eq!(k.upper_remaining_ms(Millis(6_200)), -50);
        // A fresh agent: an earlier run's lease may be counted until start + ttl + transit.
        assert_eq!(
            LeaseKeeper::new(SelfFenceConfig::default(), Millis(100)).upper_remaining_ms(Millis(200)),
            5_050
        );
    }
}
