//! The guest inside a VM, as the agent of the host running it sees it: its guest agent's
//! answers to pings, and whether it works (vCPU time and I/O of its own). Kept by VM, only
//! from the host the VM runs on: what another host says of it is ignored.
//!
//! Not persisted: a new leader learns it from the next heartbeats.

use crate::Millis;
use crate::cluster::{ClusterState, RunState};
use crate::inventory::ReportedDomain;
use crate::time::secs;

/// What one heartbeat says of a guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestSeen {
    /// Its definition has no guest agent channel: never judged by pings.
    NoAgent,
    /// Its agent has not answered since QEMU started (booting, or no qemu-ga inside).
    Waiting,
    Answering {
        since_answer_ms: u64,
    },
    /// It answered before, and not the last `missed` pings. `active`: meanwhile its vCPUs ran
    /// and it did disk or network I/O of its own.
    Silent {
        since_answer_ms: u64,
        missed: u32,
        active: bool,
    },
}

impl GuestSeen {
    /// One word for metrics and tables: no_agent, waiting, answering, silent, busy.
    pub fn as_str(&self) -> &'static str {
        match self {
            GuestSeen::NoAgent => "no_agent",
            GuestSeen::Waiting => "waiting",
            GuestSeen::Answering { .. } => "answering",
            GuestSeen::Silent { active: false, .. } => "silent",
            GuestSeen::Silent { active: true, .. } => "busy",
        }
    }

    /// For `vmha vm show`: "answering (last answer 0.4 s ago)".
    pub fn describe(&self) -> String {
        match *self {
            GuestSeen::NoAgent => "no guest agent channel: not watched by pings".into(),
            GuestSeen::Waiting => "waiting for its guest agent's first answer since it started".into(),
            GuestSeen::Answering { since_answer_ms } => {
                format!("answering (last answer {} ago)", secs(since_answer_ms))
            }
            GuestSeen::Silent { since_answer_ms, missed, active } => format!(
                "SILENT for {} ({missed} pings unanswered), {}",
                secs(since_answer_ms),
                if active { "but its vCPUs run and it does I/O: busy" } else { "and no I/O of its own" }
            ),
        }
    }
}

/// A guest's latest report, from its host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestReport {
    pub host: String,
    pub seen: GuestSeen,
    pub at: Millis,
}

impl GuestReport {
    /// What it says, aged to `now`, with how old the report is when that matters.
    pub fn describe(&self, now: Millis) -> String {
        let age = now.since(self.at);
        let seen = match self.seen {
            GuestSeen::Answering { since_answer_ms } => {
                GuestSeen::Answering { since_answer_ms: since_answer_ms + age }
            }
            GuestSeen::Silent { since_answer_ms, missed, active } => {
                GuestSeen::Silent { since_answer_ms: since_answer_ms + age, missed, active }
            }
            other => other,
        };
        seen.describe()
    }
}

/// Takes what `host`'s report says of the guests of the VMs it runs (after the report was
/// applied, so `vm.host` is where the VM runs now).
pub fn on_report(s: &mut ClusterState, host: &str, domains: &[ReportedDomain], now: Millis) {
    for d in domains {
        let runs_here = s
            .vms
            .get(&d.uuid)
            .is_some_and(|vm| vm.host.as_deref() == Some(host) && vm.state == RunState::Running);
        match (d.guest, runs_here) {
            (Some(seen), true) => {
                s.guests.insert(d.uuid.clone(), GuestReport { host: host.into(), seen, at: now });
            }
            // No longer watched there (stopped, unprotected), or another host's claim.
            _ => {
                if s.guests.get(&d.uuid).is_some_and(|g| g.host == host) {
                    s.guests.remove(&d.uuid);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::tests::{three_hosts, vm_on};

    fn report(uuid: &str, state: RunState, guest: Option<GuestSeen>) -> ReportedDomain {
        ReportedDomain { uuid: uuid.into(), name: uuid.into(), state, memory_kib: 65_536, vcpus: 1, guest }
    }

    #[test]
    fn only_the_host_running_a_vm_speaks_for_its_guest() {
        let mut s = three_hosts();
        vm_on(&mut s, "u1", "dns1", "kvm1");
        let silent = GuestSeen::Silent { since_answer_ms: 12_000, missed: 6, active: false };
        on_report(&mut s, "kvm2", &[report("u1", RunState::Running, Some(silent))], Millis(1));
        assert!(s.guests.is_empty(), "kvm2 does not run dns1: its word on dns1's guest is ignored");
        let answering = GuestSeen::Answering { since_answer_ms: 400 };
        on_report(&mut s, "kvm1", &[report("u1", RunState::Running, Some(answering))], Millis(2));
        assert_eq!(s.guests["u1"], GuestReport { host: "kvm1".into(), seen: answering, at: Millis(2) });
        on_report(&mut s, "kvm2", &[report("u1", RunState::ShutOff, None)], Millis(3));
        assert!(s.guests.contains_key("u1"), "nor can kvm2 clear it");
        on_report(&mut s, "kvm1", &[report("u1", RunState::Running, None)], Millis(4));
        assert!(s.guests.is_empty(), "kvm1 no longer watches it");
        assert_eq!(answering.describe(), "answering (last answer 0.4 s ago)");
        assert_eq!(silent.describe(), "SILENT for 12.0 s (6 pings unanswered), and no I/O of its own");
    }
}
