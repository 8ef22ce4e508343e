//! Keeps the VM inventory in step with what agents report. Which host a VM is "on" is decided
//! here, once, for the CLI, placement and the database alike.

use std::collections::HashMap;

use crate::cluster::{RunCause, SecondCopy, note_near};
use crate::{ClusterState, Millis, RunState, VmView};

/// How long a requested destroy of a second copy may take before it is asked for again.
const DESTROY_RETRY_MS: u64 = 5_000;

/// One domain as an agent reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportedDomain {
    pub uuid: String,
    pub name: String,
    pub state: RunState,
    pub memory_kib: u64,
    pub vcpus: u32,
    /// Its guest's heartbeat, when the host watches it (`guest`).
    pub guest: Option<crate::guest::GuestSeen>,
    /// Its service probes' results, from the same agent.
    pub probes: Vec<crate::service_probe::ProbeSeen>,
}

/// What `admit_new` decided of a report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Admitted {
    /// The report less the domains no record has that must wait for a later report.
    pub domains: Vec<ReportedDomain>,
    /// Those domains' UUIDs.
    pub deferred: Vec<String>,
    /// Set when the host starts to have domains deferred (said once per spell): the event's
    /// message.
    pub message: Option<String>,
}

/// Rate-limits the VM records one host's reports create (`Policy::new_vms_per_minute`):
/// domains no record has, beyond the host's budget, are left out of this report and recorded
/// from a later one. Nothing else is left out: a VM vmha knows of (protected VMs always are)
/// is always taken from the report, so the safety logic, which acts on recorded VMs only,
/// sees all of them; a VM not recorded yet is one vmha does not protect, restart or move.
pub fn admit_new(
    state: &mut ClusterState,
    host: &str,
    domains: Vec<ReportedDomain>,
    now: Millis,
) -> Admitted {
    let per_minute = state.policy.new_vms_per_minute;
    let Some(h) = state.hosts.get_mut(host) else { return Admitted { domains, ..Default::default() } };
    let unknown = domains.iter().filter(|d| !state.vms.contains_key(&d.uuid)).count();
    let mut allowed = if unknown == 0 { 0 } else { h.discovery.take(unknown, per_minute, now) };
    let mut admitted = Admitted::default();
    for d in domains {
        if state.vms.contains_key(&d.uuid) {
            admitted.domains.push(d);
        } else if allowed > 0 {
            allowed -= 1;
            admitted.domains.push(d);
        } else {
            admitted.deferred.push(d.uuid);
        }
    }
    let deferred = admitted.deferred.len();
    if deferred > 0 && h.discovery.deferred == 0 {
        admitted.message = Some(format!(
            "{host} reports more new VMs than the {per_minute} a minute one host's reports may add \
             (--new-vms-per-minute): {deferred} are recorded from its later reports"
        ));
    }
    h.discovery.deferred = deferred;
    admitted
}

/// What a report changed; the shell persists each and writes one event for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InventoryChange {
    /// A domain no VM record had.
    Appeared { uuid: String, name: String, host: String, state: RunState },
    /// The VM is now on `to` (after a migration, a restart elsewhere, or a host coming back).
    Moved { uuid: String, name: String, from: String, to: String, state: RunState },
    /// Same host, new state. `unwatched`: the first report since this leader took over, and
    /// `from` is what the previous leader last recorded: the change happened while no leader
    /// watched.
    StateChanged { uuid: String, name: String, host: String, from: RunState, to: RunState, unwatched: bool },
    /// The host it was on no longer reports it. An unprotected VM that no host reports is
    /// `forgotten`: dropped from the inventory (it was undefined or moved behind vmha's back;
    /// if it shows up somewhere, it is discovered again).
    Vanished { uuid: String, name: String, from: String, forgotten: bool },
    /// Name, memory or vCPUs changed; no event, but the record must be rewritten.
    Updated { uuid: String },
    /// `extra` runs the VM while `placed` (where vmha placed it or last saw it) runs it too.
    /// `confirmed`: `placed` reported it running again after `extra` did, so it is no live
    /// migration caught between two reports: the copy on `extra` must go.
    TwoCopies { uuid: String, name: String, placed: String, extra: String, confirmed: bool },
}

impl InventoryChange {
    pub fn uuid(&self) -> &str {
        match self {
            InventoryChange::Appeared { uuid, .. }
            | InventoryChange::Moved { uuid, .. }
            | InventoryChange::StateChanged { uuid, .. }
            | InventoryChange::Vanished { uuid, .. }
            | InventoryChange::TwoCopies { uuid, .. }
            | InventoryChange::Updated { uuid } => uuid,
        }
    }
}

/// Applies `host`'s full list of domains, received at `now`, to `state`.
///
/// A VM's location moves to the reporting host only if the VM has none or the host reports it
/// running: the incoming side of a live migration reports a paused copy while the source still
/// runs it, and that must not look like a move. The report was sent after `sent_after` (on this
/// leader's clock): for a VM whose last operation ended after that, it may show the VM as it
/// was before, so its absence or stopped copy there is no news (a late report of a migration's
/// target, sent before the migration, would show the VM stopped there while it runs).
pub fn apply_report(
    state: &mut ClusterState,
    host: &str,
    domains: &[ReportedDomain],
    sent_after: Millis,
    now: Millis,
) -> Vec<InventoryChange> {
    let mut changes = Vec::new();
    for d in domains {
        let Some(vm) = state.vms.get_mut(&d.uuid) else {
            note_near(&mut state.near, host, &d.uuid);
            let mut vm = VmView::new(&d.uuid, &d.name);
            vm.host = Some(host.into());
            vm.change_run(d.state, RunCause::Reported);
            vm.memory_kib = d.memory_kib;
            vm.vcpus = d.vcpus;
            state.vms.insert(d.uuid.clone(), vm);
            changes.push(InventoryChange::Appeared {
                uuid: d.uuid.clone(),
                name: d.name.clone(),
                host: host.into(),
                state: d.state,
            });
            continue;
        };
        // A stopped or paused copy, in a report that may predate the last result, is no news:
        // the VM may have arrived since (what runs is always news: it may be a second copy).
        if vm.settled_at > sent_after && vm.host.as_deref() == Some(host) && d.state != RunState::Running {
            continue;
        }
        if (vm.name.as_str(), vm.memory_kib, vm.vcpus) != (d.name.as_str(), d.memory_kib, d.vcpus) {
            vm.name = d.name.clone();
            vm.memory_kib = d.memory_kib;
            vm.vcpus = d.vcpus;
            changes.push(InventoryChange::Updated { uuid: d.uuid.clone() });
        }
        match vm.host.as_deref() {
            Some(h) if h == host => {
                if d.state == RunState::Running
                    && let Some(second) = vm.second_copy.as_mut()
                    && second.destroy_asked.is_none_or(|t| now.since(t) >= DESTROY_RETRY_MS)
                {
                    second.destroy_asked = Some(now);
                    changes.push(InventoryChange::TwoCopies {
                        uuid: d.uuid.clone(),
                        name: d.name.clone(),
                        placed: host.into(),
                        extra: second.host.clone(),
                        confirmed: true,
                    });
                }
                // Until its host's first report to this leader, a VM's state is unknown; what the
                // previous leader last recorded says whether it stopped in between (a self-fence
                // while the controller was out, a crash), which a protected VM is restarted for.
                let unwatched = vm.state == RunState::Unknown && vm.recorded_running;
                let from = if unwatched { RunState::Running } else { vm.state };
                vm.recorded_running = false;
                if from != d.state {
                    changes.push(InventoryChange::StateChanged {
                        uuid: d.uuid.clone(),
                        name: d.name.clone(),
                        host: host.into(),
                        from,
                        to: d.state,
                        unwatched,
                    });
                }
                vm.change_run(d.state, RunCause::Reported);
            }
            None => {
                note_near(&mut state.near, host, &d.uuid);
                vm.host = Some(host.into());
                vm.change_run(d.state, RunCause::Reported);
                vm.recorded_running = false;
                changes.push(InventoryChange::Appeared {
                    uuid: d.uuid.clone(),
                    name: d.name.clone(),
                    host: host.into(),
                    state: d.state,
                });
            }
            // A second copy while the placed one may still run (fencing bypassed: a manual
            // start, a confirm-down of a live host). It is not taken as a move until the placed
            // host stops listing its copy. After a takeover the placed copy is recorded running
            // until its host reports: another host's claim then is an alarm, not a move, or any
            // host with a valid certificate could claim another's VM, have the real copy taken
            // for the second one and destroyed, and its definition taken for the restarts.
            Some(other)
                if d.state == RunState::Running
                    && (vm.state.has_process() || (vm.state == RunState::Unknown && vm.recorded_running))
                    && vm.busy_with.is_none()
                    && state.hosts.get(other).is_none_or(|h| h.dead.is_none()) =>
            {
                if vm.second_copy.as_ref().is_none_or(|c| c.host != host) {
                    note_near(&mut state.near, host, &d.uuid);
                    vm.second_copy = Some(SecondCopy { host: host.into(), destroy_asked: None });
                    changes.push(InventoryChange::TwoCopies {
                        uuid: d.uuid.clone(),
                        name: d.name.clone(),
                        placed: other.into(),
                        extra: host.into(),
                        confirmed: false,
                    });
                }
            }
            Some(other) if d.state == RunState::Running => {
                changes.push(InventoryChange::Moved {
                    uuid: d.uuid.clone(),
                    name: d.name.clone(),
                    from: other.into(),
                    to: host.into(),
                    state: d.state,
                });
                note_near(&mut state.near, host, &d.uuid);
                vm.host = Some(host.into());
                vm.change_run(d.state, RunCause::Reported);
                vm.recorded_running = false;
            }
            Some(_) => {}
        }
    }
    let reported: HashMap<&str, RunState> = domains.iter().map(|d| (d.uuid.as_str(), d.state)).collect();
    for uuid in state.vms_near(host) {
        let Some(vm) = state.vms.get_mut(&uuid).filter(|v| v.settled_at <= sent_after) else { continue };
        // (A copy missing from a report that may predate the last result is no news either.)
        let here = reported.get(uuid.as_str()).copied();
        // The extra copy is gone from the host that ran it.
        if vm.second_copy.as_ref().is_some_and(|c| c.host == host) && here != Some(RunState::Running) {
            vm.second_copy = None;
        }
        // The placed copy is gone while a second one runs: that one is where the VM is now.
        if vm.host.as_deref() == Some(host)
            && let Some(extra) = vm.second_copy.as_ref().map(|c| c.host.clone())
            && !here.is_some_and(|s| s.has_process())
        {
            vm.second_copy = None;
            note_near(&mut state.near, &extra, &uuid);
            vm.host = Some(extra.clone());
            vm.change_run(RunState::Running, RunCause::Moved);
            changes.push(InventoryChange::Moved {
                uuid: vm.uuid.clone(),
                name: vm.name.clone(),
                from: host.into(),
                to: extra,
                state: RunState::Running,
            });
            continue;
        }
        // A VM being moved by vmha is not "vanished" when its source stops listing it: the
        // operation's result says where it went.
        if vm.host.as_deref() == Some(host) && vm.busy_with.is_none() && here.is_none() {
            vm.host = None;
            vm.change_run(RunState::Unknown, RunCause::Unreported);
            changes.push(InventoryChange::Vanished {
                uuid: vm.uuid.clone(),
                name: vm.name.clone(),
                from: host.into(),
                forgotten: !vm.protected,
            });
        }
    }
    for c in &changes {
        if let InventoryChange::Vanished { uuid, forgotten: true, .. } = c {
            state.vms.remove(uuid);
        }
    }
    changes
}

/// Records the outcome of a successful live migration at once, so the CLI shows the VM on its
/// new host without waiting for the target's next heartbeat.
pub fn apply_migrated(state: &mut ClusterState, uuid: &str, target: &str) -> Option<InventoryChange> {
    let vm = state.vms.get_mut(uuid)?;
    note_near(&mut state.near, target, uuid);
    let from = vm.host.replace(target.into());
    vm.change_run(RunState::Running, RunCause::Moved);
    match from {
        Some(f) if f == target => None,
        from => Some(InventoryChange::Moved {
            uuid: uuid.into(),
            name: vm.name.clone(),
            from: from.unwrap_or_default(),
            to: target.into(),
            state: RunState::Running,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dom(uuid: &str, state: RunState) -> ReportedDomain {
        ReportedDomain {
            uuid: uuid.into(),
            name: format!("vm-{uuid}"),
            state,
            memory_kib: 65_536,
            vcpus: 1,
            guest: None,
            probes: Vec::new(),
        }
    }

    #[test]
    fn a_live_migration_moves_the_vm_only_once_the_target_runs_it() {
        let mut s = ClusterState::default();
        let c = apply_report(&mut s, "kvm1", &[dom("a", RunState::Running)], Millis(0), Millis(0));
        assert!(matches!(&c[..], [InventoryChange::Appeared { host, .. }] if host == "kvm1"));
        s.vms.get_mut("a").unwrap().busy_with = Some("migration to kvm2".into());
        // Mid-migration the target holds a paused copy: still on kvm1.
        let c = apply_report(&mut s, "kvm2", &[dom("a", RunState::Paused)], Millis(0), Millis(10));
        assert!(c.is_empty(), "{c:?}");
        assert_eq!(s.vms["a"].host.as_deref(), Some("kvm1"));
        let c = apply_report(&mut s, "kvm2", &[dom("a", RunState::Running)], Millis(0), Millis(20));
        assert!(
            matches!(&c[..], [InventoryChange::Moved { from, to, .. }] if from == "kvm1" && to == "kvm2")
        );
        // The source's next report no longer lists it: that is not a vanishing, it moved.
        let c = apply_report(&mut s, "kvm1", &[], Millis(0), Millis(30));
        assert!(c.is_empty(), "{c:?}");
        assert_eq!(s.vms["a"].host.as_deref(), Some("kvm2"));
    }

    #[test]
    fn a_vm_no_host_reports_is_unplaced_until_one_does() {
        let mut s = ClusterState::default();
        apply_report(&mut s, "kvm1", &[dom("a", RunState::Running)], Millis(0), Millis(0));
        let c = apply_report(&mut s, "kvm1", &[], Millis(0), Millis(1));
        assert!(
            matches!(&c[..], [InventoryChange::Vanished { from, forgotten: true, .. }] if from == "kvm1")
        );
        assert!(!s.vms.contains_key("a"), "an unprotected VM defined nowhere is forgotten");
        apply_report(&mut s, "kvm1", &[dom("a", RunState::Running)], Millis(0), Millis(1));
        s.vms.get_mut("a").unwrap().protected = true;
        let c = apply_report(&mut s, "kvm1", &[], Millis(0), Millis(1));
        assert!(matches!(&c[..], [InventoryChange::Vanished { forgotten: false, .. }]));
        assert_eq!((s.vms["a"].host.as_deref(), s.vms["a"].state), (None, RunState::Unknown));
        let c = apply_report(&mut s, "kvm3", &[dom("a", RunState::ShutOff)], Millis(0), Millis(2));
        assert!(matches!(&c[..], [InventoryChange::Appeared { host, .. }] if host == "kvm3"));
    }

    #[test]
    fn a_vm_vmha_is_moving_does_not_vanish_when_its_source_stops_listing_it() {
        let mut s = ClusterState::default();
        apply_report(&mut s, "kvm1", &[dom("a", RunState::Running)], Millis(0), Millis(0));
        s.vms.get_mut("a").unwrap().busy_with = Some("migration to kvm2".into());
        assert!(apply_report(&mut s, "kvm1", &[], Millis(0), Millis(1)).is_empty());
        let moved = apply_migrated(&mut s, "a", "kvm2");
        assert!(matches!(moved, Some(InventoryChange::Moved { from, .. }) if from == "kvm1"));
    }

    #[test]
    fn state_changes_and_resizes_are_reported_once() {
        let mut s = ClusterState::default();
        apply_report(&mut s, "kvm1", &[dom("a", RunState::Running)], Millis(0), Millis(0));
        let mut d = dom("a", RunState::ShutOff);
        d.memory_kib *= 2;
        let c = apply_report(&mut s, "kvm1", std::slice::from_ref(&d), Millis(0), Millis(1));
        assert_eq!(c.len(), 2, "{c:?}");
        assert!(apply_report(&mut s, "kvm1", &[d], Millis(0), Millis(2)).is_empty());
    }

    /// Issue 26, item 3: after a takeover every VM's state is unknown until its host reports;
    /// a fourth host claiming dns1 then must not become its host.
    #[test]
    fn after_a_takeover_another_hosts_claim_is_an_alarm_not_a_move() {
        let mut s = ClusterState::default();
        apply_report(&mut s, "kvm1", &[dom("a", RunState::Running)], Millis(0), Millis(0));
        let vm = s.vms.get_mut("a").unwrap();
        (vm.state, vm.recorded_running) = (RunState::Unknown, true);
        let c = apply_report(&mut s, "kvm9", &[dom("a", RunState::Running)], Millis(0), Millis(10));
        assert!(
            matches!(&c[..], [InventoryChange::TwoCopies { placed, extra, confirmed: false, .. }] if placed == "kvm1" && extra == "kvm9"),
            "{c:?}"
        );
        assert_eq!(s.vms["a"].host.as_deref(), Some("kvm1"), "kvm9's claim moved nothing");
        // The real host reports its copy: the claimed one is the one to destroy.
        let c = apply_report(&mut s, "kvm1", &[dom("a", RunState::Running)], Millis(0), Millis(20));
        assert!(
            c.iter().any(
                |x| matches!(x, InventoryChange::TwoCopies { extra, confirmed: true, .. } if extra == "kvm9")
            ),
            "{c:?}"
        );
        assert_eq!(s.vms["a"].host.as_deref(), Some("kvm1"));
    }

    #[test]
    fn a_second_copy_is_confirmed_by_the_placed_hosts_next_report_and_ends_when_either_goes() {
        let mut s = ClusterState::default();
        apply_report(&mut s, "kvm1", &[dom("a", RunState::Running)], Millis(0), Millis(0));
        let c = apply_report(&mut s, "kvm2", &[dom("a", RunState::Running)], Millis(0), Millis(10));
        assert!(
            matches!(&c[..], [InventoryChange::TwoCopies { placed, extra, confirmed: false, .. }] if placed == "kvm1" && extra == "kvm2"),
            "{c:?}"
        );
        assert_eq!(s.vms["a"].host.as_deref(), Some("kvm1"), "not taken as a move");
        let c = apply_report(&mut s, "kvm1", &[dom("a", RunState::Running)], Millis(0), Millis(20));
        assert!(
            matches!(&c[..], [InventoryChange::TwoCopies { extra, confirmed: true, .. }] if extra == "kvm2")
        );
        // The destroy is asked for once, and again if the copy is still there 5 s later.
        assert!(
            apply_report(&mut s, "kvm1", &[dom("a", RunState::Running)], Millis(0), Millis(1_020)).is_empty()
        );
        let c = apply_report(&mut s, "kvm1", &[dom("a", RunState::Running)], Millis(0), Millis(5_020));
        assert!(matches!(&c[..], [InventoryChange::TwoCopies { confirmed: true, .. }]), "{c:?}");
        // The extra copy is destroyed: no more reports of two copies.
        apply_report(&mut s, "kvm2", &[dom("a", RunState::ShutOff)], Millis(0), Millis(5_030));
        assert!(
            apply_report(&mut s, "kvm1", &[dom("a", RunState::Running)], Millis(0), Millis(5_040)).is_empty()
        );
        // A live migration by hand: the target runs it before the source's report drops it.
        apply_report(&mut s, "kvm2", &[dom("a", RunState::Running)], Millis(0), Millis(5_050));
        let c = apply_report(&mut s, "kvm1", &[], Millis(0), Millis(5_060));
        assert!(
            matches!(&c[..], [InventoryChange::Moved { from, to, .. }] if from == "kvm1" && to == "kvm2"),
            "{c:?}"
        );
        assert_eq!(s.vms["a"].host.as_deref(), Some("kvm2"));
        assert_eq!(s.vms["a"].second_copy, None);
    }

    #[test]
    fn new_vm_records_are_rate_limited_per_host_and_known_vms_never_wait() {
        let mut s = ClusterState::default();
        s.policy.new_vms_per_minute = 2;
        s.hosts.insert("kvm1".into(), crate::HostView::new("kvm1"));
        s.hosts.insert("kvm2".into(), crate::HostView::new("kvm2"));
        let report: Vec<_> = ["a", "b", "c", "d"].iter().map(|u| dom(u, RunState::Running)).collect();
        let first = admit_new(&mut s, "kvm1", report.clone(), Millis(0));
        assert_eq!(first.domains.len(), 2);
        assert_eq!(first.deferred, ["c", "d"]);
        assert!(first.message.as_deref().is_some_and(|m| m.contains("2 are recorded")), "{first:?}");
        apply_report(&mut s, "kvm1", &first.domains, Millis(0), Millis(0));
        // Another host has its own budget.
        assert_eq!(admit_new(&mut s, "kvm2", vec![dom("e", RunState::Running)], Millis(0)).deferred.len(), 0);
        // Half a minute later one more may be recorded; the known ones always pass; the
        // spell is announced once.
        let later = admit_new(&mut s, "kvm1", report.clone(), Millis(30_000));
        assert_eq!(later.domains.iter().map(|d| d.uuid.as_str()).collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!((later.deferred.len(), later.message), (1, None));
        apply_report(&mut s, "kvm1", &later.domains, Millis(0), Millis(30_000));
        let done = admit_new(&mut s, "kvm1", report, Millis(60_000));
        assert_eq!((done.domains.len(), done.deferred.len()), (4, 0));
        // An idle minute refills the bucket to a minute's worth, no more.
        let mut d = crate::discovery::Discovery::default();
        assert_eq!(d.take(5, 2, Millis(0)), 2);
        assert_eq!(d.take(5, 2, Millis(600_000)), 2);
        assert_eq!(d.take(5, 2, Millis(629_999)), 0);
        assert_eq!(d.take(5, 2, Millis(630_000)), 1);
    }

    #[test]
    fn a_finished_migration_moves_the_vm_before_any_heartbeat() {
        let mut s = ClusterState::default();
        apply_report(&mut s, "kvm1", &[dom("a", RunState::Running)], Millis(0), Millis(0));
        assert!(apply_migrated(&mut s, "a", "kvm2").is_some());
        assert_eq!(s.vms["a"].host.as_deref(), Some("kvm2"));
        assert!(apply_migrated(&mut s, "a", "kvm2").is_none());
        assert!(apply_migrated(&mut s, "zzz", "kvm2").is_none());
    }
}
