//! The agent's half of the safety rule: its own lease, the peer polls, and the decision to
//! destroy its protected VMs (self-fence) or to keep them. Pure: the agent's shell feeds it the
//! time, lease grants and poll answers, and carries out what `tick` decides.
//!
//! The rule (controller/engine/SAFETY.md): when its lease expires, an agent keeps its
//! VMs only if its latest poll shows so many votes that the leader cannot count (itself
//! included) that the votes left are fewer than the majority. A peer's vote cannot be counted
//! if the newest lease the leader could count for it ends by the *deadline*: `fence_margin -
//! guard` after this agent's own lease ended (before the leader may declare this host dead),
//! or the start of the poll, whichever is later. Every later poll must confirm it again.

use std::collections::BTreeSet;

use crate::{Millis, Timings};

/// One peer's answer to "until when could the leader count your lease?".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAnswer {
    pub host: String,
    /// From the moment it answered; negative: that long ago.
    pub upper_remaining_ms: i64,
    /// When the answer arrived here.
    pub received_at: Millis,
    /// The newest leader epoch the peer has seen.
    pub epoch: u64,
}

/// Something from a leader older than the newest this agent has seen: a deposed leader's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "epoch {got} is older than epoch {newest}, the newest this agent has seen: it comes from a deposed leader"
)]
pub struct StaleEpoch {
    pub got: u64,
    pub newest: u64,
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
    cfg: Timings,
    started: Millis,
    /// Own view of the lease: from the send of the heartbeat that earned it.
    lease_end: Option<Millis>,
    renewed_send: Option<Millis>,
    cluster_hosts: usize,
    /// The peers the leader last listed; `None` until an answer listed them.
    peers: Option<BTreeSet<String>>,
    last_poll: Option<Poll>,
    poll_started: Option<Millis>,
    /// The latest instant at which a poll showed the leader lacked quorum.
    confirmed_at: Option<Millis>,
    phase: Phase,
    /// Fenced, and the shell confirmed that no protected VM runs here any more.
    fence_done: bool,
    /// When the peers the latest prediction counts on will all have lapsed.
    fact_poll_at: Option<Millis>,
    /// The newest leader epoch seen, in a lease, a command, a registration or a peer's answer.
    newest_epoch: u64,
}

impl LeaseKeeper {
    pub fn new(cfg: Timings, now: Millis) -> LeaseKeeper {
        LeaseKeeper {
            cfg,
            started: now,
            lease_end: None,
            renewed_send: None,
            cluster_hosts: 0,
            peers: None,
            last_poll: None,
            poll_started: None,
            confirmed_at: None,
            phase: Phase::Starting,
            fence_done: false,
            fact_poll_at: None,
            newest_epoch: 0,
        }
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    pub fn timings(&self) -> Timings {
        self.cfg
    }

    /// The leader's timings, as it sent them at registration: from now on the rule runs on
    /// them. A lease already held keeps the end it was granted with.
    pub fn set_timings(&mut self, cfg: Timings) {
        self.cfg = cfg;
    }

    /// The end of the lease this agent holds, if any, in its own view.
    pub fn lease_end(&self) -> Option<Millis> {
        self.lease_end
    }

    /// Whether this host may start a VM (or take one by live migration) now: only while it
    /// holds a lease, so that every copy it runs is one its self-fence covers.
    pub fn may_start(&self, now: Millis) -> Result<(), String> {
        match self.lease_end {
            Some(end) if now < end => Ok(()),
            Some(end) => Err(format!("this host's lease expired {} ms ago", now.since(end))),
            None => Err("this host holds no lease yet".into()),
        }
    }

    /// The shell destroyed every protected VM after a `Fence`: nothing here needs the
    /// watchdog to reset the host any more.
    pub fn fence_completed(&mut self) {
        if matches!(self.phase, Phase::Fenced { .. }) {
            self.fence_done = true;
        }
    }

    /// The earliest instant at which the leader may declare this host dead, as far as this
    /// agent can prove: its own lease end plus the fence margin (the leader's view of the lease
    /// ends no earlier), or later after a poll showed the leader lacked quorum at `c` (it then
    /// needs quorum for `lease_ttl + fence_margin` first). `None`: nothing is proved.
    fn declarable_from(&self) -> Option<Millis> {
        let margin = self.cfg.fence_margin_ms;
        let by_lease = self.lease_end.map(|e| Millis(e.0 + margin));
        let by_fact = self.confirmed_at.map(|c| Millis(c.0 + self.cfg.lease_ttl_ms + margin));
        by_lease.max(by_fact)
    }

    /// Whether the watchdog may be fed at `now`. A feed keeps the host up for `timeout_ms`
    /// more even if this agent dies or hangs right after it, so it is allowed only when the
    /// host would then be reset (`guard / 2` kept for the reset itself) before the leader may
    /// declare it dead, or when no protected VM can run here (fence done, or a one-host
    /// cluster, where nothing is ever restarted elsewhere).
    pub fn may_feed(&self, now: Millis, timeout_ms: u64) -> bool {
        if self.cluster_hosts == 1 || (self.fence_done && matches!(self.phase, Phase::Fenced { .. })) {
            return true;
        }
        self.declarable_from().is_some_and(|d| now.0 + timeout_ms + self.cfg.guard_ms / 2 <= d.0)
    }

    /// The newest leader epoch this agent has seen.
    pub fn newest_epoch(&self) -> u64 {
        self.newest_epoch
    }

    /// Takes note of a leader's epoch (a registration, a command): refused if it is older than
    /// the newest seen, since that leader has been deposed.
    pub fn see_epoch(&mut self, epoch: u64) -> Result<(), StaleEpoch> {
        if epoch < self.newest_epoch {
            return Err(StaleEpoch { got: epoch, newest: self.newest_epoch });
        }
        self.newest_epoch = epoch;
        Ok(())
    }

    /// The leader of `epoch` granted `ttl_ms` to the heartbeat sent at `sent_at`, in a cluster
    /// of `cluster_hosts` hosts. A deposed leader's lease is refused: its successor does not
    /// count it.
    pub fn granted(
        &mut self,
        sent_at: Millis,
        ttl_ms: u64,
        cluster_hosts: usize,
        epoch: u64,
    ) -> Result<(), StaleEpoch> {
        self.see_epoch(epoch)?;
        let end = Millis(sent_at.0 + ttl_ms);
        self.fence_done = false;
        self.lease_end = Some(self.lease_end.map_or(end, |e| e.max(end)));
        self.renewed_send = Some(self.renewed_send.map_or(sent_at, |s| s.max(sent_at)));
        self.cluster_hosts = cluster_hosts;
        Ok(())
    }

    /// The size of the cluster as the leader last said, also from answers without a lease.
    pub fn set_cluster_hosts(&mut self, n: usize) {
        self.cluster_hosts = n;
    }

    /// The peers the leader last listed (this host's fellow members). Only their poll answers
    /// count: a host removed from the cluster may still answer, and its lapse says nothing of
    /// the votes the leader counts.
    pub fn set_peers(&mut self, peers: impl IntoIterator<Item = String>) {
        self.peers = Some(peers.into_iter().collect());
    }

    /// What this agent answers a peer: until when the leader could count its lease, from now
    /// (negative: it could not since that long). The leader counts only leases this agent
    /// received, each until one interval before its end (`Timings::quorum_shortfall_ms`), and
    /// each ends at most `max_transit` after this agent's own view of it. Before its first
    /// lease, an earlier run of this agent may have held one, sent before this run started: it
    /// ended by `started + lease_ttl` in this agent's view.
    pub fn upper_remaining_ms(&self, now: Millis) -> i64 {
        let end = self.lease_end.unwrap_or(Millis(self.started.0 + self.cfg.lease_ttl_ms));
        (end.0 + self.cfg.max_transit_ms) as i64 - self.cfg.quorum_shortfall_ms() as i64 - now.0 as i64
    }

    /// A finished poll. A peer that has seen a newer epoch makes it the newest here too; the
    /// answer of a peer that has not seen the newest is not counted (it may speak of a deposed
    /// leader's lease): it returns those peers, for the log.
    pub fn polled(&mut self, mut poll: Poll) -> Vec<String> {
        let newest = poll.answers.iter().map(|a| a.epoch).max().unwrap_or(0);
        self.newest_epoch = self.newest_epoch.max(newest);
        let (current, stale): (Vec<PeerAnswer>, Vec<PeerAnswer>) =
            poll.answers.into_iter().partition(|a| a.epoch >= self.newest_epoch);
        poll.answers = current;
        if self.last_poll.as_ref().is_none_or(|p| p.started <= poll.started) {
            self.last_poll = Some(poll);
        }
        stale.into_iter().map(|a| a.host).collect()
    }

    /// A poll every `poll_every`, and one more as soon as the peers a prediction counts on
    /// have lapsed: that poll turns the prediction into a fact.
    fn poll_due(&mut self, now: Millis) -> bool {
        let due = self.poll_started.is_none_or(|p| {
            now.since(p) >= self.cfg.poll_every_ms() || self.fact_poll_at.is_some_and(|f| p < f && f <= now)
        });
        if due {
            self.poll_started = Some(now);
        }
        due
    }

    /// What the latest poll shows about the leader's quorum.
    fn judge(&self, own_end: Millis, now: Millis) -> Verdict {
        let Some(poll) = &self.last_poll else { return Verdict::No("no peer poll has answered".into()) };
        // A poll older than that says nothing about now.
        if now.since(poll.started) > 2 * self.cfg.poll_every_ms() + self.cfg.heartbeat_interval_ms {
            return Verdict::No("the latest peer poll is too old".into());
        }
        let total = self.cluster_hosts + 1;
        let majority = total / 2 + 1;
        // received_at + remaining is no earlier than the true end: the answer was given before
        // it arrived.
        let lapse = |a: &PeerAnswer| a.received_at.0 as i64 + a.upper_remaining_ms;
        let answers: Vec<&PeerAnswer> =
            poll.answers.iter().filter(|a| self.peers.as_ref().is_none_or(|p| p.contains(&a.host))).collect();
        let lapsed_by = |t: Millis| -> Vec<&str> {
            answers.iter().filter(|a| lapse(a) <= t.0 as i64).map(|a| a.host.as_str()).collect()
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
            let last =
                answers.iter().map(|a| lapse(a)).filter(|l| *l <= deadline.0 as i64).max().unwrap_or(0);
            return Verdict::Predicted(detail(&by_deadline), Millis(last.max(0) as u64 + 1));
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
            Verdict::Predicted(reason, lapsed_at) => {
                self.fact_poll_at = Some(lapsed_at);
                Ok(format!("{reason}, once their leases lapse"))
            }
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
    /// Also when the last of the peers it counts on lapses.
    Predicted(String, Millis),
    No(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(host: &str, upper: i64, at: u64) -> PeerAnswer {
        PeerAnswer { host: host.into(), upper_remaining_ms: upper, received_at: Millis(at), epoch: 1 }
    }

    fn leased(at: u64) -> LeaseKeeper {
        let mut k = LeaseKeeper::new(Timings::default(), Millis(0));
        k.granted(Millis(at), 5_000, 3, 1).unwrap();
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
    fn a_deposed_leaders_lease_and_its_followers_answers_are_not_counted() {
        let mut k = leased(1_000); // epoch 1, lease to 6_000
        k.granted(Millis(1_500), 5_000, 3, 2).unwrap();
        assert_eq!(k.lease_end(), Some(Millis(6_500)));
        // A lease of epoch 1 answered late: refused, the lease is not extended.
        let stale = k.granted(Millis(2_000), 5_000, 3, 1);
        assert_eq!(stale, Err(StaleEpoch { got: 1, newest: 2 }));
        assert_eq!(k.lease_end(), Some(Millis(6_500)));
        assert!(k.see_epoch(1).is_err(), "a command of epoch 1 is refused too");
        // Both peers say they have no lease, but only of epoch 1: not counted, so nothing shows
        // the leader of epoch 2 lacks quorum.
        let stale_peers = k.polled(Poll {
            started: Millis(6_400),
            answers: vec![answer("kvm2", 0, 6_410), answer("kvm3", 0, 6_420)],
        });
        assert_eq!(stale_peers, ["kvm2", "kvm3"]);
        assert!(matches!(k.tick(Millis(6_500)), Decision::Fence { .. }));
        // The same answers from peers that know epoch 2 keep the VMs.
        let mut k = leased(1_000);
        k.granted(Millis(1_500), 5_000, 3, 2).unwrap();
        let current = |h: &str, at| PeerAnswer { epoch: 2, ..answer(h, 0, at) };
        let stale_peers = k.polled(Poll {
            started: Millis(6_400),
            answers: vec![current("kvm2", 6_410), current("kvm3", 6_420)],
        });
        assert!(stale_peers.is_empty());
        assert!(matches!(k.tick(Millis(6_500)), Decision::Keep { .. }));
    }

    #[test]
    fn a_peer_that_has_seen_a_newer_epoch_makes_it_the_newest() {
        let mut k = leased(1_000);
        let newer = PeerAnswer { epoch: 3, ..answer("kvm2", 0, 5_910) };
        k.polled(Poll { started: Millis(5_900), answers: vec![newer] });
        assert_eq!(k.newest_epoch(), 3);
        assert!(k.see_epoch(1).is_err(), "the leader of epoch 1 has been deposed");
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
        let mut k = LeaseKeeper::new(Timings::default(), Millis(0));
        k.granted(Millis(0), 5_000, 1, 1).unwrap();
        assert_eq!(k.tick(Millis(60_000)), Decision::Nothing);
        let mut k = leased(0);
        assert!(matches!(k.tick(Millis(5_000)), Decision::Fence { .. }));
        k.granted(Millis(9_000), 5_000, 3, 1).unwrap();
        assert_eq!(k.tick(Millis(9_100)), Decision::Nothing);
        assert_eq!(k.phase(), &Phase::Leased);
    }

    #[test]
    fn what_peers_are_told_covers_the_leaders_longer_view() {
        // Lease to 6_000 in this agent's view; the leader's view may end 150 ms later, and it
        // counts a lease toward quorum until an interval and a transit before its end.
        let k = leased(1_000);
        assert_eq!(k.upper_remaining_ms(Millis(5_000)), 0);
        assert_eq!(k.upper_remaining_ms(Millis(5_200)), -200);
        // A fresh agent: an earlier run's lease may be counted until start + ttl - interval.
        assert_eq!(LeaseKeeper::new(Timings::default(), Millis(100)).upper_remaining_ms(Millis(200)), 3_900);
    }

    #[test]
    fn starts_need_a_lease() {
        let mut k = LeaseKeeper::new(Timings::default(), Millis(0));
        assert!(k.may_start(Millis(10)).unwrap_err().contains("no lease yet"));
        k.granted(Millis(1_000), 5_000, 3, 1).unwrap();
        assert_eq!(k.may_start(Millis(5_999)), Ok(()));
        assert!(k.may_start(Millis(6_000)).unwrap_err().contains("expired 0 ms ago"));
    }

    #[test]
    fn the_watchdog_is_fed_only_while_a_reset_would_come_before_the_host_may_be_declared_dead() {
        // Lease to 6_000: the leader may declare the host dead from 7_000 on. A 3 s watchdog
        // fed at t resets the host by t + 3_000 (+ 250 for the reset).
        let mut k = leased(1_000);
        assert!(k.may_feed(Millis(3_750), 3_000));
        assert!(!k.may_feed(Millis(3_751), 3_000));
        assert!(!LeaseKeeper::new(Timings::default(), Millis(0)).may_feed(Millis(0), 3_000), "no lease yet");
        // The lease expired, but a poll proved the leader lacked quorum at 6_100: it needs quorum
        // for lease_ttl + fence_margin before it may declare anybody dead (12_100).
        k.polled(Poll {
            started: Millis(6_100),
            answers: vec![answer("kvm2", -100, 6_110), answer("kvm3", -90, 6_110)],
        });
        assert!(matches!(k.tick(Millis(6_150)), Decision::Keep { .. }));
        assert!(k.may_feed(Millis(8_850), 3_000));
        assert!(!k.may_feed(Millis(8_851), 3_000));
        // Fenced: fed again only once the shell confirmed its protected VMs are gone.
        let mut k = leased(1_000);
        assert!(matches!(k.tick(Millis(6_000)), Decision::Fence { .. }));
        assert!(!k.may_feed(Millis(6_000), 3_000));
        k.fence_completed();
        assert!(k.may_feed(Millis(6_050), 3_000));
    }
}
