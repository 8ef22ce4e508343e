//! Where a hung guest is judged, and reset in place.
//!
//! A protected VM whose guest agent answered and then stays silent for the failure interval,
//! with no disk or network I/O of its own meanwhile (vSphere's I/O check), is hung: vmha resets
//! it on the host that runs it. A reset that did not help (no answer within the boot grace)
//! is followed by a harder one: a destroy and a start, on the same host. Each VM has a budget
//! of resets per window; past it vmha stops and raises an alarm.
//!
//! Why a reset in place never makes a second copy: it is carried out by the agent of the host
//! that reports the VM running, on that host's own QEMU process; it moves nothing, and the
//! harder one starts the VM only through the same lease check as every start (SAFETY.md).
//!
//! Only the host running a VM speaks for its guest (`guest::on_report`): another host's word
//! can neither get it reset nor spare it.

use serde::{Deserialize, Serialize};

use crate::action::Action;
use crate::cluster::{ClusterState, RunState, VmView};
use crate::event::{Event, EventKind};
use crate::guest::{GuestReport, GuestSeen};
use crate::lease::HostLiveness;
use crate::time::secs;
use crate::{Millis, Policy};

/// What vmha has done about one VM's guest. Persisted with the VM: a new leader keeps
/// counting its budget.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestCare {
    /// When vmha reset it, within the budget's window, oldest first.
    pub resets: Vec<Millis>,
    /// The last reset ended then (its agent's result came): reports sent before it say
    /// nothing of the guest after it.
    pub reset_done: Option<Millis>,
    /// Its guest agent answered after the last reset: the reset helped.
    pub answered_since_reset: bool,
    /// The last reset failed: it is not judged again before then.
    #[serde(default)]
    pub not_before: Option<Millis>,
    /// A reset (or move) of its is under way: not judged until it ends.
    #[serde(default)]
    pub in_flight: bool,
    /// The service probe the last reset was for (`None`: its guest agent's silence).
    #[serde(default)]
    pub reset_for: Option<String>,
    /// The budget ran out, and what the last judgement found: vmha does not reset it again
    /// until the window has room.
    pub alarm: Option<String>,
    /// The last non-decision told (`GuestNotJudged`), so that it is told once; not persisted.
    #[serde(skip)]
    pub noted: Option<String>,
}

impl GuestCare {
    /// After a restore: times on the previous leader's clock start over at `now`, so resets
    /// count as recent (the budget is never refilled early by a failover).
    pub fn restored(&mut self, now: Millis) {
        for t in &mut self.resets {
            *t = now;
        }
        self.reset_done = self.reset_done.map(|_| now);
        self.not_before = self.not_before.map(|_| now);
        // An operation the previous leader left is followed from its own record (`busy_with`).
        self.in_flight = false;
    }

    pub fn is_default(&self) -> bool {
        *self == GuestCare::default()
    }
}

/// For `vmha vm show`: "2 of 3 this hour, the last 4.0 s ago", or nothing if vmha has not
/// reset it within the window.
pub fn resets_summary(p: &Policy, care: &GuestCare, now: Millis) -> String {
    let recent = recent_resets(p, care, now);
    match recent.last() {
        None => String::new(),
        Some(last) => format!(
            "{} of {} {}, the last {} ago",
            recent.len(),
            p.guest_resets,
            window_words(p),
            secs(now.since(*last))
        ),
    }
}

/// Its resets within the budget's window at `now`, oldest first.
pub fn recent_resets(p: &Policy, care: &GuestCare, now: Millis) -> Vec<Millis> {
    care.resets.iter().copied().filter(|t| now.since(*t) < p.guest_reset_window_ms).collect()
}

/// What a look at one guest found.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Verdict {
    /// Answering, booting, or silent for less than the failure interval.
    Fine,
    /// Would be hung, but is not judged now: the reason (told once while it lasts) and the
    /// message with the evidence.
    NotJudged { reason: String, message: String },
    /// Hung: the evidence, the service probe it is judged by (`None`: its guest agent), and
    /// whether the last reset did not help (the next is a destroy and start).
    Hung { evidence: String, probe: Option<String>, hard: bool },
}

/// The policy's reset budget, as operators read it: "3 this hour", "3 per 24 h".
fn window_words(p: &Policy) -> String {
    match p.guest_reset_window_ms {
        3_600_000 => "this hour".into(),
        w => format!("per {}", secs(w)),
    }
}

/// Looks at every watched guest; says which to reset, and tells every decision and
/// non-decision once.
pub fn tick(s: &mut ClusterState, now: Millis) -> Vec<Action> {
    let p = s.policy;
    let mut actions = Vec::new();
    let uuids: Vec<String> = s.vms.iter().filter(|(_, v)| v.protected).map(|(u, _)| u.clone()).collect();
    for uuid in uuids {
        let verdict = judge(s, &uuid, now);
        let move_to = match &verdict {
            Verdict::Hung { .. } => s.vms[&uuid].host.as_deref().and_then(|h| elsewhere(s, &uuid, h, now)),
            _ => None,
        };
        let vm = s.vms.get_mut(&uuid).expect("listed above");
        vm.guest_care.resets = recent_resets(&p, &vm.guest_care, now);
        let care = &mut vm.guest_care;
        if care.alarm.is_some() && (care.resets.len() as u32) < p.guest_resets {
            care.alarm = None;
            actions.push(Action::Event(Event::vm(
                &vm.name,
                EventKind::GuestBudget,
                format!(
                    "{}'s reset budget has room again ({} of {} used {}): vmha resets it again if it hangs",
                    vm.name,
                    care.resets.len(),
                    p.guest_resets,
                    window_words(&p)
                ),
            )));
        }
        match verdict {
            Verdict::Fine => {
                vm.guest_care.noted = None;
                answered_again(vm, s.guests.get(&uuid), now, &mut actions);
            }
            Verdict::NotJudged { reason, message } => {
                if vm.guest_care.noted.as_ref() != Some(&reason) {
                    actions.push(Action::Event(Event::vm(&vm.name, EventKind::GuestNotJudged, message)));
                    vm.guest_care.noted = Some(reason);
                }
            }
            Verdict::Hung { evidence, probe, hard } => {
                let host = vm.host.clone().expect("judged on its host");
                let care = &mut vm.guest_care;
                let used = care.resets.len() as u32;
                if used >= p.guest_resets {
                    if care.alarm.is_none() {
                        actions.push(Action::Event(Event::vm(
                            &vm.name,
                            EventKind::GuestAlarm,
                            format!(
                                "{}: {evidence}; its reset budget is spent ({used} of {} {}): vmha stops resetting it \
                                 and leaves it as it is on {host}; look at its console (`virsh console {}` on {host})",
                                vm.name,
                                p.guest_resets,
                                window_words(&p),
                                vm.name
                            ),
                        )));
                        care.alarm = Some(evidence);
                    }
                    continue;
                }
                care.reset_for = probe;
                care.resets.push(now);
                care.noted = None;
                care.in_flight = true;
                if let Some((to, why)) = move_to {
                    actions.push(Action::Event(Event::vm(
                        &vm.name,
                        EventKind::GuestHung,
                        format!(
                            "{}: {evidence}: reset {} of {} {}, on another host: {host} fails its own health probes \
                             ({why}), so it is stopped there and started on {to} once the stop is confirmed",
                            vm.name,
                            used + 1,
                            p.guest_resets,
                            window_words(&p)
                        ),
                    )));
                    let (vm_uuid, vm_name) = (uuid.clone(), vm.name.clone());
                    actions.push(Action::MoveHungGuest { vm_uuid, vm_name, from: host, to });
                    continue;
                }
                let how = if hard {
                    format!(
                        "the last reset did not help within {} of it: destroying and starting it again on {host}",
                        secs(p.guest_boot_grace_ms)
                    )
                } else {
                    format!("resetting it on {host}")
                };
                actions.push(Action::Event(Event::vm(
                    &vm.name,
                    EventKind::GuestHung,
                    format!(
                        "{}: {evidence}: reset {} of {} {}, {how}",
                        vm.name,
                        used + 1,
                        p.guest_resets,
                        window_words(&p)
                    ),
                )));
                actions.push(Action::ResetGuest {
                    vm_uuid: uuid.clone(),
                    vm_name: vm.name.clone(),
                    host,
                    hard,
                });
            }
        }
    }
    actions
}

/// Where a hung guest goes instead of a reset in place: another host, when its own host has
/// failed its health probes for as long as the guest has been silent (a libvirt call slow for
/// a moment under load is not a sick host), and placement finds room; with the failing
/// probes, for the event.
fn elsewhere(s: &ClusterState, uuid: &str, host: &str, now: Millis) -> Option<(String, String)> {
    let health = &s.hosts.get(host)?.health;
    if now.since(health.failing_since?) < s.policy.guest_failure_ms {
        return None;
    }
    let to = crate::placement::place(s, s.vms.get(uuid)?, now, &[host.to_string()]).ok()?;
    Some((to, health.failing_summary()))
}

/// The end of a hung guest's move: the start on `target` (after the stop on its host was
/// confirmed). Started: it runs there, its guest judged afresh. Not: it is off, and recovery
/// starts it as any protected VM found stopped on a live host.
pub fn move_finished(
    s: &mut ClusterState,
    uuid: &str,
    target: &str,
    result: Result<(), String>,
    now: Millis,
) -> Vec<Action> {
    let mut out = Vec::new();
    let Some(vm) = s.vms.get_mut(uuid) else { return out };
    vm.busy_with = None;
    vm.guest_care.in_flight = false;
    match result {
        Ok(()) => {
            crate::cluster::note_near(&mut s.near, target, uuid);
            vm.host = Some(target.into());
            vm.change_run(RunState::Running, crate::cluster::RunCause::Started);
            vm.guest_care.reset_done = Some(now);
            vm.guest_care.answered_since_reset = false;
            s.guests.remove(uuid);
            out.push(Action::Outage(crate::availability::OutageMark::Ended { vm_uuid: uuid.into() }));
        }
        Err(e) => out.push(Action::Event(Event::vm(
            &vm.name,
            EventKind::GuestHung,
            format!("{}: starting it on {target} after its stop failed: {e}", vm.name),
        ))),
    }
    out
}

/// The first answer after a reset: said once, with how long the guest took.
fn answered_again(vm: &mut VmView, report: Option<&GuestReport>, now: Millis, actions: &mut Vec<Action>) {
    let care = &mut vm.guest_care;
    let (Some(done), false) = (care.reset_done, care.answered_since_reset) else { return };
    let Some(r) = report.filter(|r| r.at > done) else { return };
    if let GuestSeen::Answering { since_answer_ms } = r.seen {
        care.answered_since_reset = true;
        let took = now.since(done).saturating_sub(since_answer_ms);
        actions.push(Action::Event(Event::vm(
            &vm.name,
            EventKind::GuestRecovered,
            format!("{}'s guest agent answers again, {} after its reset", vm.name, secs(took)),
        )));
    }
}

/// Whether VM `uuid`'s guest is hung, and if it is, whether vmha may act on it now.
fn judge(s: &ClusterState, uuid: &str, now: Millis) -> Verdict {
    let p = &s.policy;
    let (Some(vm), Some(r)) = (s.vms.get(uuid), s.guests.get(uuid)) else { return Verdict::Fine };
    let care = &vm.guest_care;
    if care.in_flight
        || care.reset_done.is_some_and(|d| r.at <= d)
        || care.not_before.is_some_and(|t| now < t)
    {
        // Its reset is under way, or this was sent before the last one ended (the guest it
        // speaks of is gone), or a failed reset waits before the next.
        return Verdict::Fine;
    }
    let age = now.since(r.at);
    let seen = r.aged(now);
    let not_helped = care.reset_done.is_some_and(|d| now.since(d) >= p.guest_boot_grace_ms);
    let (evidence, probe, hard) = match seen {
        GuestSeen::Silent { since_answer_ms, quiet_ms, .. }
            if since_answer_ms >= p.guest_failure_ms && !seen.busy() =>
        {
            let evidence = format!(
                "guest agent silent for {}, no disk or network I/O of its own for {}",
                secs(since_answer_ms),
                secs(quiet_ms)
            );
            (evidence, None, care.reset_done.is_some() && !care.answered_since_reset)
        }
        GuestSeen::Silent { since_answer_ms, quiet_ms, .. } if since_answer_ms >= p.guest_failure_ms => {
            return Verdict::NotJudged {
                reason: "busy".into(),
                message: format!(
                    "{}'s guest agent has been silent for {}, but its vCPUs ran and it did disk or network I/O of \
                     its own {} ago: busy, not hung; not reset",
                    vm.name,
                    secs(since_answer_ms),
                    secs(quiet_ms)
                ),
            };
        }
        // After a reset a guest has the boot grace to answer; one that does not was not helped.
        GuestSeen::Waiting if not_helped && !care.answered_since_reset => {
            let evidence = format!(
                "no answer from its guest agent in the {} since vmha reset it",
                secs(now.since(care.reset_done.unwrap_or(now)))
            );
            (evidence, None, true)
        }
        // A service that worked since the guest started and now fails its probe as declared;
        // or the one a reset was for, which has not passed within the boot grace since.
        _ => {
            let after_reset = care.reset_for.as_deref().filter(|_| not_helped);
            match crate::service_probe::failing(&vm.probes, &r.probes, after_reset) {
                Some((name, evidence)) => {
                    let hard = after_reset == Some(name.as_str());
                    (evidence, Some(name), hard)
                }
                None => return Verdict::Fine,
            }
        }
    };
    let host = r.host.as_str();
    let blocked = if vm.host.as_deref() != Some(host) || vm.state != RunState::Running {
        Some(format!("it no longer runs on {host} as that report said"))
    } else if let Some(work) = &vm.busy_with {
        Some(format!("it is busy with a {work}"))
    } else if let Some(by) = &vm.stopped_by {
        Some(format!("{by} stopped it"))
    } else if vm.recovery.is_some() || vm.second_copy.is_some() {
        Some("its restart or a second copy is being dealt with".into())
    } else if s.liveness(host, now) != HostLiveness::Online {
        Some(format!("{host} does not hold a lease now, and only a host that does may act"))
    } else if age > 3 * s.timings.heartbeat_interval_ms.max(1_000) {
        Some(format!("{host}'s last word on it is {} old", secs(age)))
    } else {
        None
    };
    match blocked {
        Some(why) => Verdict::NotJudged {
            message: format!("{}: {evidence}, but it is not reset: {why}", vm.name),
            reason: why,
        },
        None => Verdict::Hung { evidence, probe, hard },
    }
}

/// The reset's result: it counts as done from now (reports sent before say nothing of the
/// guest after it); a failed one is said, and tried again at the next judgement while the
/// budget lasts.
pub fn reset_finished(
    s: &mut ClusterState,
    uuid: &str,
    host: &str,
    result: Result<(), String>,
    now: Millis,
) -> Vec<Action> {
    let Some(vm) = s.vms.get_mut(uuid) else { return Vec::new() };
    vm.busy_with = None;
    vm.guest_care.in_flight = false;
    match result {
        Ok(()) => {
            vm.guest_care.reset_done = Some(now);
            vm.guest_care.answered_since_reset = false;
            vm.guest_care.not_before = None;
            s.guests.remove(uuid);
            Vec::new()
        }
        // The attempt counts against the budget, and the next waits a failure interval: a reset
        // that keeps failing ends in the alarm, not in a loop.
        Err(e) => {
            vm.guest_care.not_before = Some(Millis(now.0 + s.policy.guest_failure_ms));
            vec![Action::Event(Event::vm(
                &vm.name,
                EventKind::GuestHung,
                format!(
                    "{}: the reset on {host} failed: {e}; it is judged again in {}",
                    vm.name,
                    secs(s.policy.guest_failure_ms)
                ),
            ))]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::tests::{three_hosts, vm_on};

    /// dns1, protected, on kvm1, which holds a lease from `at`.
    fn dns1_at(at: u64) -> ClusterState {
        let mut s = three_hosts();
        s.hosts.get_mut("kvm1").unwrap().lease.granted_at = Some(Millis(at));
        let mut vm = vm_on(&mut s, "u1", "dns1", "kvm1");
        vm.protected = true;
        s.vms.insert("u1".into(), vm);
        s
    }

    fn seen(s: &mut ClusterState, seen: GuestSeen, at: u64) {
        let report = GuestReport { host: "kvm1".into(), seen, at: Millis(at), probes: Vec::new() };
        s.guests.insert("u1".into(), report);
    }

    fn silent(ms: u64, active: bool) -> GuestSeen {
        let quiet_ms = if active { 300 } else { ms.saturating_sub(1_500) };
        GuestSeen::Silent { since_answer_ms: ms, missed: (ms / 2_000) as u32, quiet_ms }
    }

    fn events(actions: &[Action]) -> Vec<(EventKind, String)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Event(e) => Some((e.kind, e.message.clone())),
                _ => None,
            })
            .collect()
    }

    fn resets(actions: &[Action]) -> Vec<bool> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::ResetGuest { hard, .. } => Some(*hard),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_guest_silent_for_the_failure_interval_with_no_io_is_reset_with_its_evidence() {
        let mut s = dns1_at(1_000);
        seen(&mut s, silent(9_000, false), 1_000);
        assert!(tick(&mut s, Millis(1_500)).is_empty(), "9.5 s is under the failure interval");
        let a = tick(&mut s, Millis(2_200));
        assert_eq!(resets(&a), [false]);
        assert_eq!(
            events(&a),
            [(
                EventKind::GuestHung,
                "dns1: guest agent silent for 10.2 s, no disk or network I/O of its own for 8.7 s: reset 1 of 3 \
                 this hour, resetting it on kvm1"
                    .to_string()
            )]
        );
    }

    #[test]
    fn a_busy_guest_with_a_slow_agent_is_told_once_and_not_reset() {
        let mut s = dns1_at(1_000);
        seen(&mut s, silent(12_000, true), 1_000);
        let a = tick(&mut s, Millis(1_000));
        assert!(resets(&a).is_empty());
        let [(kind, msg)] = &events(&a)[..] else { panic!("{a:?}") };
        assert_eq!(*kind, EventKind::GuestNotJudged);
        assert!(msg.contains("busy, not hung; not reset"), "{msg}");
        seen(&mut s, silent(12_000, true), 1_000);
        assert!(tick(&mut s, Millis(1_000)).is_empty(), "said once");
    }

    #[test]
    fn a_vm_being_migrated_or_on_a_host_without_a_lease_is_not_reset() {
        let mut s = dns1_at(1_000);
        s.vms.get_mut("u1").unwrap().busy_with = Some("migration to kvm2".into());
        seen(&mut s, silent(20_000, false), 1_000);
        let a = tick(&mut s, Millis(1_000));
        assert!(resets(&a).is_empty());
        assert!(events(&a)[0].1.ends_with("not reset: it is busy with a migration to kvm2"), "{a:?}");
        s.vms.get_mut("u1").unwrap().busy_with = None;
        let a = tick(&mut s, Millis(7_000));
        assert!(resets(&a).is_empty(), "kvm1's lease ended at 6 s");
        assert!(events(&a)[0].1.contains("kvm1 does not hold a lease now"), "{a:?}");
    }

    #[test]
    fn past_its_budget_a_guest_raises_one_alarm_and_is_not_reset_until_the_window_has_room() {
        let mut s = dns1_at(0);
        let hour = 3_600_000;
        for (i, at) in [10_000u64, 100_000, 200_000].into_iter().enumerate() {
            s.hosts.get_mut("kvm1").unwrap().lease.granted_at = Some(Millis(at));
            seen(&mut s, silent(10_000, false), at);
            let a = tick(&mut s, Millis(at));
            assert_eq!(resets(&a).len(), 1, "reset {}", i + 1);
            reset_finished(&mut s, "u1", "kvm1", Ok(()), Millis(at + 100));
            seen(&mut s, GuestSeen::Answering { since_answer_ms: 0 }, at + 8_000);
            let a = tick(&mut s, Millis(at + 8_000));
            assert_eq!(events(&a)[0].0, EventKind::GuestRecovered);
        }
        s.hosts.get_mut("kvm1").unwrap().lease.granted_at = Some(Millis(300_000));
        seen(&mut s, silent(10_000, false), 300_000);
        let a = tick(&mut s, Millis(300_000));
        assert!(resets(&a).is_empty());
        assert_eq!(events(&a)[0].0, EventKind::GuestAlarm);
        assert!(events(&a)[0].1.contains("its reset budget is spent (3 of 3 this hour)"), "{a:?}");
        assert!(tick(&mut s, Millis(300_100)).is_empty(), "one alarm");
        assert!(s.vms["u1"].guest_care.alarm.is_some());
        s.hosts.get_mut("kvm1").unwrap().lease.granted_at = Some(Millis(hour + 10_000));
        seen(&mut s, silent(10_000, false), hour + 10_000);
        let a = tick(&mut s, Millis(hour + 10_000));
        assert_eq!(events(&a)[0].0, EventKind::GuestBudget);
        assert_eq!(resets(&a).len(), 1, "the first reset left the window");
    }

    #[test]
    fn a_reset_that_did_not_help_is_followed_by_a_destroy_and_start_and_old_reports_are_ignored() {
        let mut s = dns1_at(1_000);
        seen(&mut s, silent(10_000, false), 1_000);
        assert_eq!(resets(&tick(&mut s, Millis(1_000))), [false]);
        assert_eq!(s.vms["u1"].busy_with, None, "set by the step when it begins the reset");
        reset_finished(&mut s, "u1", "kvm1", Ok(()), Millis(2_000));
        seen(&mut s, silent(11_000, false), 1_900);
        assert!(resets(&tick(&mut s, Millis(2_000))).is_empty(), "sent before the reset ended");
        s.hosts.get_mut("kvm1").unwrap().lease.granted_at = Some(Millis(62_000));
        seen(&mut s, GuestSeen::Waiting, 61_000);
        assert!(resets(&tick(&mut s, Millis(61_000))).is_empty(), "59 s: still in its boot grace");
        seen(&mut s, GuestSeen::Waiting, 62_000);
        let a = tick(&mut s, Millis(62_000));
        assert_eq!(resets(&a), [true]);
        assert!(
            events(&a)[0].1.contains("no answer from its guest agent in the 60.0 s since vmha reset it"),
            "{a:?}"
        );
        assert!(events(&a)[0].1.contains("destroying and starting it again on kvm1"), "{a:?}");
    }

    #[test]
    fn a_failed_reset_counts_and_the_next_waits_a_failure_interval() {
        let mut s = dns1_at(1_000);
        seen(&mut s, silent(10_000, false), 1_000);
        assert_eq!(resets(&tick(&mut s, Millis(1_000))), [false]);
        let a = reset_finished(&mut s, "u1", "kvm1", Err("libvirt hung".into()), Millis(1_500));
        assert!(events(&a)[0].1.ends_with("failed: libvirt hung; it is judged again in 10.0 s"), "{a:?}");
        s.hosts.get_mut("kvm1").unwrap().lease.granted_at = Some(Millis(11_000));
        seen(&mut s, silent(19_000, false), 10_000);
        assert!(resets(&tick(&mut s, Millis(10_000))).is_empty(), "not before 11.5 s");
        seen(&mut s, silent(20_500, false), 11_500);
        let a = tick(&mut s, Millis(11_500));
        assert_eq!(resets(&a), [false], "the failed one did nothing: not a reason for the hard way");
        assert!(events(&a)[0].1.contains("reset 2 of 3"), "{a:?}");
    }

    #[test]
    fn a_service_failing_its_probe_after_it_worked_gets_its_guest_reset() {
        use crate::service_probe::{ProbeKind, ProbeSeen, ServiceProbe};
        let mut s = dns1_at(1_000);
        s.vms.get_mut("u1").unwrap().probes = vec![ServiceProbe {
            name: "dns".into(),
            kind: ProbeKind::Dns { name: "lab.vmha".into(), expect: None },
            address: "10.0.0.5".into(),
            interval_ms: 2_000,
            timeout_ms: 1_000,
            failures: 3,
        }];
        let report = |failures_in_row, passed_once| GuestReport {
            host: "kvm1".into(),
            seen: GuestSeen::Answering { since_answer_ms: 500 },
            at: Millis(1_000),
            probes: vec![ProbeSeen {
                name: "dns".into(),
                failures_in_row,
                passed_once,
                last_error: "no DNS answer from 10.0.0.5 within 1.0 s".into(),
            }],
        };
        s.guests.insert("u1".into(), report(2, true));
        assert!(tick(&mut s, Millis(1_000)).is_empty(), "2 of 3");
        s.guests.insert("u1".into(), report(5, false));
        assert!(tick(&mut s, Millis(1_000)).is_empty(), "never passed since the guest started");
        s.guests.insert("u1".into(), report(3, true));
        let a = tick(&mut s, Millis(1_000));
        assert_eq!(resets(&a), [false]);
        assert!(
            events(&a)[0]
                .1
                .starts_with("dns1: its dns probe failed 3 times in a row (dns lab.vmha @10.0.0.5"),
            "{a:?}"
        );
        // The reset did not bring the service back: within the boot grace nothing is done;
        // after it, a destroy and start.
        reset_finished(&mut s, "u1", "kvm1", Ok(()), Millis(1_500));
        let mut later = |at: u64| {
            s.hosts.get_mut("kvm1").unwrap().lease.granted_at = Some(Millis(at));
            s.guests.insert("u1".into(), GuestReport { at: Millis(at), ..report(9, false) });
            tick(&mut s, Millis(at))
        };
        assert!(resets(&later(30_000)).is_empty(), "in its boot grace");
        let a = later(61_500);
        assert_eq!(resets(&a), [true]);
        assert!(
            events(&a)[0].1.contains("its dns probe has not passed since vmha reset the guest for it"),
            "{a:?}"
        );
        assert!(
            events(&a)[0].1.contains("the last reset did not help within 60.0 s of it: destroying"),
            "{a:?}"
        );
    }

    #[test]
    fn a_guest_that_never_answered_is_never_judged() {
        let mut s = dns1_at(1_000);
        seen(&mut s, GuestSeen::Waiting, 1_000);
        assert!(tick(&mut s, Millis(1_000)).is_empty());
        seen(&mut s, GuestSeen::NoAgent, 1_000);
        assert!(tick(&mut s, Millis(1_000)).is_empty());
    }
}
