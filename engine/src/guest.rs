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
    /// It answered before, and not the last `missed` pings. `quiet_ms`: since its vCPUs ran
    /// *and* it did disk or network I/O of its own (packets it sent, never packets sent to it).
    Silent {
        since_answer_ms: u64,
        missed: u32,
        quiet_ms: u64,
    },
}

impl GuestSeen {
    /// One word for metrics and tables: no_agent, waiting, answering, silent, busy.
    pub fn as_str(&self) -> &'static str {
        match self {
            GuestSeen::NoAgent => "no_agent",
            GuestSeen::Waiting => "waiting",
            GuestSeen::Answering { .. } => "answering",
            GuestSeen::Silent { .. } if self.busy() => "busy",
            GuestSeen::Silent { .. } => "silent",
        }
    }

    /// Silent, but working: it did I/O of its own in the latter half of its silence. A
    /// panicked guest stops its I/O within a ping of its last answer; one whose agent is only
    /// slow goes on serving (vSphere's I/O check, over the silence itself rather than a fixed
    /// 120 s, so that a hang is noticed in seconds).
    pub fn busy(&self) -> bool {
        matches!(*self, GuestSeen::Silent { since_answer_ms, quiet_ms, .. } if quiet_ms.saturating_mul(2) < since_answer_ms)
    }

    /// For `vmha vm show`: "answering (last answer 0.4 s ago)".
    pub fn describe(&self) -> String {
        match *self {
            GuestSeen::NoAgent => "no guest agent channel: not watched by pings".into(),
            GuestSeen::Waiting => "waiting for its guest agent's first answer since it started".into(),
            GuestSeen::Answering { since_answer_ms } => {
                format!("answering (last answer {} ago)", secs(since_answer_ms))
            }
            GuestSeen::Silent { since_answer_ms, missed, quiet_ms } => format!(
                "SILENT for {} ({missed} pings unanswered), {} {} ago",
                secs(since_answer_ms),
                if self.busy() {
                    "but busy: its vCPUs ran and it did I/O of its own"
                } else {
                    "its vCPUs and its own I/O last moved together"
                },
                secs(quiet_ms)
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
    /// Its service probes' results (`service_probe`).
    pub probes: Vec<crate::service_probe::ProbeSeen>,
}

impl GuestReport {
    /// What it says, aged to `now`.
    pub fn describe(&self, now: Millis) -> String {
        self.aged(now).describe()
    }

    /// What it says, with its times counted to `now`.
    pub fn aged(&self, now: Millis) -> GuestSeen {
        let age = now.since(self.at);
        match self.seen {
            GuestSeen::Answering { since_answer_ms } => {
                GuestSeen::Answering { since_answer_ms: since_answer_ms.saturating_add(age) }
            }
            GuestSeen::Silent { since_answer_ms, missed, quiet_ms } => {
                // A host may send any number: none may overflow here.
                let (since_answer_ms, quiet_ms) =
                    (since_answer_ms.saturating_add(age), quiet_ms.saturating_add(age));
                GuestSeen::Silent { since_answer_ms, missed, quiet_ms }
            }
            other => other,
        }
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
                let probes = d.probes.clone();
                s.guests.insert(d.uuid.clone(), GuestReport { host: host.into(), seen, at: now, probes });
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
        let probes = Vec::new();
        ReportedDomain {
            uuid: uuid.into(),
            name: uuid.into(),
            state,
            memory_kib: 65_536,
            vcpus: 1,
            guest,
            probes,
        }
    }

    #[test]
    fn only_the_host_running_a_vm_speaks_for_its_guest() {
        let mut s = three_hosts();
        vm_on(&mut s, "u1", "dns1", "kvm1");
        let silent = GuestSeen::Silent { since_answer_ms: 12_000, missed: 6, quiet_ms: 11_000 };
        on_report(&mut s, "kvm2", &[report("u1", RunState::Running, Some(silent))], Millis(1));
        assert!(s.guests.is_empty(), "kvm2 does not run dns1: its word on dns1's guest is ignored");
        let answering = GuestSeen::Answering { since_answer_ms: 400 };
        on_report(&mut s, "kvm1", &[report("u1", RunState::Running, Some(answering))], Millis(2));
        let kept = GuestReport { host: "kvm1".into(), seen: answering, at: Millis(2), probes: Vec::new() };
        assert_eq!(s.guests["u1"], kept);
        on_report(&mut s, "kvm2", &[report("u1", RunState::ShutOff, None)], Millis(3));
        assert!(s.guests.contains_key("u1"), "nor can kvm2 clear it");
        on_report(&mut s, "kvm1", &[report("u1", RunState::Running, None)], Millis(4));
        assert!(s.guests.is_empty(), "kvm1 no longer watches it");
        assert_eq!(answering.describe(), "answering (last answer 0.4 s ago)");
        assert_eq!(
            silent.describe(),
            "SILENT for 12.0 s (6 pings unanswered), its vCPUs and its own I/O last moved together 11.0 s ago"
        );
        let busy = GuestSeen::Silent { since_answer_ms: 12_000, missed: 6, quiet_ms: 400 };
        assert_eq!((silent.as_str(), busy.as_str()), ("silent", "busy"));
    }
}
