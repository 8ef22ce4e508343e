//! Emptying a host by live migration: an operator's drain (ending in maintenance) or the
//! automatic one of a degraded host (whose health probes keep failing). Also host health.

use crate::action::Action;
use crate::cluster::RunCause;
use crate::drain_record::{Drain, DrainCause, DrainState, DrainStep, StepState};
use crate::event::{Event, EventKind};
use crate::health::Probe;
use crate::operation::Purpose;
use crate::{AdminState, ClusterState, HostLiveness, Millis, Refusal, RunState, placement};

/// Takes a host's probe results.
pub fn on_probes(state: &mut ClusterState, host: &str, probes: Vec<Probe>, now: Millis) {
    let Some(h) = state.hosts.get_mut(host) else { return };
    if probes.iter().any(|p| !p.ok) {
        h.health.failing_since.get_or_insert(now);
        h.health.passing_since = None;
    } else {
        h.health.passing_since.get_or_insert(now);
        h.health.failing_since = None;
    }
    h.health.probes = probes;
}

/// The VMs to move off `host`, protected and most critical first, each with the host it would
/// go to now (given the moves before it) or why none can take it.
pub fn plan(state: &ClusterState, host: &str, now: Millis) -> Result<Vec<DrainStep>, Refusal> {
    if !state.hosts.contains_key(host) {
        return Err(Refusal::UnknownHost(host.into()));
    }
    let mut vms: Vec<_> = state
        .vms
        .values()
        .filter(|v| v.host.as_deref() == Some(host) && v.state == RunState::Running)
        .collect();
    vms.sort_by_key(|v| (!v.protected, -v.priority, v.name.clone()));
    // Plan on a copy in which every planned move is already in flight, so later VMs see the
    // room and anti-affinity groups the earlier ones take.
    let mut scratch = state.clone();
    let mut probe_drain = Drain {
        cause: DrainCause::Operator,
        allow_restart: false,
        state: DrainState::Planned,
        steps: Vec::new(),
        message: String::new(),
    };
    let mut steps = Vec::new();
    for vm in vms {
        if let Some(h) = scratch.hosts.get_mut(host) {
            h.drain = Some(probe_drain.clone());
            h.admin = AdminState::Draining;
        }
        let (planned, why, st) = match placement::place(&scratch, vm, now, &[]) {
            Ok(t) => (Some(t.clone()), format!("{t} has the most memory left after it"), StepState::Pending),
            Err(no) => (None, no.to_string(), StepState::Stuck { reason: no.to_string() }),
        };
        let step = DrainStep {
            vm_uuid: vm.uuid.clone(),
            vm_name: vm.name.clone(),
            protected: vm.protected,
            planned: planned.clone(),
            why,
            state: st,
            tried: Vec::new(),
        };
        let mut in_flight = step.clone();
        if let Some(t) = planned {
            in_flight.state = StepState::Migrating { target: t };
        }
        probe_drain.steps.push(in_flight);
        steps.push(step);
    }
    Ok(steps)
}

/// Starts an operator's drain of `host`.
pub fn start(
    state: &mut ClusterState,
    host: &str,
    allow_restart: bool,
    now: Millis,
) -> Result<Vec<Action>, Refusal> {
    let steps = plan(state, host, now)?;
    match state.liveness(host, now) {
        HostLiveness::Online => {}
        l @ (HostLiveness::Suspect | HostLiveness::Dead) => {
            return Err(Refusal::HostDown { host: host.into(), liveness: l.as_str() });
        }
    }
    let Some(h) = state.hosts.get_mut(host) else { return Err(Refusal::UnknownHost(host.into())) };
    h.admin = AdminState::Draining;
    let n = steps.len();
    h.drain = Some(Drain {
        cause: DrainCause::Operator,
        allow_restart,
        state: DrainState::Draining,
        steps,
        message: String::new(),
    });
    let mut out = vec![Action::Event(Event::host(
        host,
        EventKind::DrainStarted,
        format!("draining {host}: {n} running VMs to move by live migration, protected first"),
    ))];
    out.extend(tick(state, now));
    Ok(out)
}

/// Returns a drained (or draining) host to service.
pub fn undrain(state: &mut ClusterState, host: &str) -> Result<Vec<Action>, Refusal> {
    let h = state.hosts.get_mut(host).ok_or_else(|| Refusal::UnknownHost(host.into()))?;
    let was = h.admin;
    h.admin = AdminState::Active;
    if h.drain.as_ref().is_some_and(|d| d.cause == DrainCause::Operator) {
        h.drain = None;
    }
    Ok(vec![Action::Event(Event::host(
        host,
        EventKind::HostUndrained,
        format!("{host} is active again (was {}); it takes VMs", was.as_str()),
    ))])
}

/// One step of health and drain handling.
pub fn tick(state: &mut ClusterState, now: Millis) -> Vec<Action> {
    let mut out = Vec::new();
    let p = state.policy;
    let names: Vec<String> = state.hosts.keys().cloned().collect();
    for name in &names {
        let online = state.liveness(name, now) == HostLiveness::Online;
        let Some(h) = state.hosts.get_mut(name) else { continue };
        let health = &mut h.health;
        if online
            && !health.degraded
            && health.failing_since.is_some_and(|f| now.since(f) >= p.degraded_after_ms)
        {
            health.degraded = true;
            // A libvirtd that does not answer can move nothing; and once it answers again, its
            // guests are better left where they run than moved for a daemon's hiccup.
            let libvirtd_only = health.probes.iter().filter(|p| !p.ok).all(|p| p.name == "libvirtd");
            let then = if libvirtd_only {
                "its VMs stay put (none can move while libvirtd does not answer)"
            } else {
                "moving its VMs away"
            };
            out.push(Action::Event(Event::host(
                name,
                EventKind::HostDegraded,
                format!("{name} is degraded ({}): no new VMs; {then}", health.failing_summary()),
            )));
            if !libvirtd_only && h.drain.as_ref().is_none_or(|d| d.state != DrainState::Draining) {
                let steps = plan(state, name, now).unwrap_or_default();
                if let Some(h) = state.hosts.get_mut(name) {
                    h.drain = Some(Drain {
                        cause: DrainCause::Degraded,
                        allow_restart: false,
                        state: DrainState::Draining,
                        steps,
                        message: String::new(),
                    });
                }
            }
        } else if health.degraded && health.passing_since.is_some_and(|s| now.since(s) >= p.recover_after_ms)
        {
            health.degraded = false;
            out.push(Action::Event(Event::host(
                name,
                EventKind::HostRecovered,
                format!("{name} passes its health probes again: it takes VMs"),
            )));
            if h.drain.as_ref().is_some_and(|d| d.cause == DrainCause::Degraded) {
                h.drain = None;
            }
        }
    }
    let busy_in_cluster = |s: &ClusterState| {
        s.hosts
            .values()
            .filter_map(|h| h.drain.as_ref())
            .flat_map(|d| d.steps.iter())
            .filter(|st| matches!(st.state, StepState::Migrating { .. }))
            .count()
            + s.vms.values().filter(|v| v.busy_with.is_some() && !migrating_in_a_drain(s, &v.uuid)).count()
    };
    for name in &names {
        if state.liveness(name, now) != HostLiveness::Online {
            continue;
        }
        let Some(drain) = state.hosts[name].drain.as_ref().filter(|d| d.state == DrainState::Draining) else {
            continue;
        };
        let pending: Vec<usize> = drain
            .steps
            .iter()
            .enumerate()
            .filter(|(_, s)| s.state == StepState::Pending)
            .map(|(i, _)| i)
            .collect();
        for i in pending {
            let Some(drain) = state.hosts.get(name).and_then(|h| h.drain.as_ref()) else { break };
            let from_here =
                drain.steps.iter().filter(|s| matches!(s.state, StepState::Migrating { .. })).count();
            if from_here >= p.migrations_per_host || busy_in_cluster(state) >= p.migrations_per_cluster {
                break;
            }
            let step = &drain.steps[i];
            let Some(vm) = state.vms.get(&step.vm_uuid).filter(|v| v.host.as_deref() == Some(name)) else {
                // It left by other means (an operator moved it, it stopped): nothing to do.
                let to = state.vms.get(&step.vm_uuid).and_then(|v| v.host.clone()).unwrap_or_default();
                set_step(state, name, i, StepState::Migrated { target: to });
                continue;
            };
            // Busy, or down and being restarted elsewhere by its recovery (which leaves this
            // host, and the step with it): one owner at a time.
            if vm.busy_with.is_some() || vm.recovery.is_some() {
                continue;
            }
            let decision = placement::place(state, vm, now, &step.tried);
            let (uuid, vm_name) = (vm.uuid.clone(), vm.name.clone());
            match decision {
                Ok(target) => {
                    set_step(state, name, i, StepState::Migrating { target: target.clone() });
                    out.push(Action::Migrate {
                        vm_uuid: uuid,
                        vm_name,
                        host: target,
                        purpose: Purpose::Drain,
                    });
                }
                Err(no) => set_step(state, name, i, StepState::Stuck { reason: no.to_string() }),
            }
        }
        finish_if_done(state, name, &mut out);
    }
    out
}

/// Whether a drain's cold restart owns `uuid`: destroyed on its host, its start elsewhere sent
/// or still to come.
pub(crate) fn cold_restarting(s: &ClusterState, uuid: &str) -> bool {
    s.hosts.values().filter_map(|h| h.drain.as_ref()).any(|d| {
        d.steps.iter().any(|st| st.vm_uuid == uuid && matches!(st.state, StepState::Restarting { .. }))
    })
}

fn migrating_in_a_drain(s: &ClusterState, uuid: &str) -> bool {
    s.hosts.values().filter_map(|h| h.drain.as_ref()).any(|d| d.heading_to(uuid).is_some())
}

fn set_step(state: &mut ClusterState, host: &str, i: usize, st: StepState) {
    if let Some(d) = state.hosts.get_mut(host).and_then(|h| h.drain.as_mut()) {
        let changed = d.steps[i].advance(st);
        debug_assert!(changed.is_ok(), "{changed:?}");
    }
}

fn finish_if_done(state: &mut ClusterState, host: &str, out: &mut Vec<Action>) {
    let Some(h) = state.hosts.get_mut(host) else { return };
    let Some(d) = h.drain.as_mut().filter(|d| d.state == DrainState::Draining) else { return };
    if !d.steps.iter().all(|s| s.state.finished()) {
        return;
    }
    let left: Vec<String> = d
        .steps
        .iter()
        .filter_map(|s| match &s.state {
            StepState::Failed { error } => Some(format!("{}: {error}", s.vm_name)),
            StepState::Stuck { reason } => Some(format!("{}: {reason}", s.vm_name)),
            StepState::Migrated { .. }
            | StepState::Restarted { .. }
            | StepState::Pending
            | StepState::Migrating { .. }
            | StepState::Restarting { .. } => None,
        })
        .collect();
    let moved = d.steps.len() - left.len();
    if left.is_empty() {
        d.state = DrainState::Done;
        match d.cause {
            DrainCause::Operator => {
                h.admin = AdminState::Maintenance;
                d.message = format!("{moved} VMs moved; {host} is in maintenance");
                out.push(Action::Event(Event::host(
                    host,
                    EventKind::DrainDone,
                    format!("drained {host}: {}", d.message),
                )));
            }
            DrainCause::Degraded => {
                d.message = format!("{moved} VMs moved off the degraded host");
                out.push(Action::Event(Event::host(
                    host,
                    EventKind::DrainDone,
                    format!("{host}: {}", d.message),
                )));
            }
        }
    } else {
        d.state = DrainState::Incomplete;
        d.message = format!(
            "{moved} VMs moved, {} stay on {host} (nothing was stopped): {}",
            left.len(),
            left.join("; ")
        );
        out.push(Action::Event(Event::host(
            host,
            EventKind::DrainIncomplete,
            format!("drain of {host} incomplete: {}", d.message),
        )));
    }
}

/// The drain host and index of the step for `uuid` whose state is `want`.
fn find_step(state: &ClusterState, uuid: &str, want: fn(&StepState) -> bool) -> Option<(String, usize)> {
    state.hosts.iter().find_map(|(name, h)| {
        let i = h.drain.as_ref()?.steps.iter().position(|s| s.vm_uuid == uuid && want(&s.state))?;
        Some((name.clone(), i))
    })
}

/// A drain's live migration ended; a failed one is tried on another host.
pub fn migration_finished(
    state: &mut ClusterState,
    uuid: &str,
    target: &str,
    result: Result<(), String>,
    now: Millis,
) -> Vec<Action> {
    let mut out = Vec::new();
    let Some((name, i)) = find_step(state, uuid, |s| matches!(s, StepState::Migrating { .. })) else {
        return out;
    };
    let max_tries = 1 + state.policy.max_relocate as usize;
    // Another live migration only if some host not tried yet can take the VM: otherwise the
    // step would only be found stuck, and a cold restart the operator allowed never tried.
    let another_host = {
        let tried = state.hosts.get(&name).and_then(|h| h.drain.as_ref()).map(|d| {
            let mut t = d.steps[i].tried.clone();
            t.push(target.into());
            t
        });
        match (state.vms.get(uuid), tried) {
            (Some(vm), Some(tried)) => {
                tried.len() < max_tries && placement::place(state, vm, now, &tried).is_ok()
            }
            _ => false,
        }
    };
    let recovering = state.vms.get(uuid).is_some_and(|v| v.recovery.is_some());
    let Some(d) = state.hosts.get_mut(&name).and_then(|h| h.drain.as_mut()) else { return out };
    let allow_restart = d.allow_restart;
    let step = &mut d.steps[i];
    match result {
        Ok(()) => set_step(state, &name, i, StepState::Migrated { target: target.into() }),
        Err(e) => {
            step.tried.push(target.into());
            if another_host || recovering {
                set_step(state, &name, i, StepState::Pending);
            } else if !allow_restart {
                set_step(state, &name, i, StepState::Failed { error: e });
            } else {
                // Live migration is out; the operator accepted a restart elsewhere.
                let vm = state.vms.get(uuid).cloned();
                let to = vm
                    .as_ref()
                    .and_then(|v| placement::place(state, v, now, std::slice::from_ref(&name)).ok());
                match (vm, to) {
                    (Some(vm), Some(to)) => {
                        set_step(state, &name, i, StepState::Restarting { target: to.clone() });
                        if let Some(v) = state.vms.get_mut(uuid) {
                            v.busy_with = Some(format!("cold restart on {to}"));
                        }
                        out.push(Action::ColdRestart {
                            vm_uuid: uuid.into(),
                            vm_name: vm.name,
                            from: name.clone(),
                            to,
                        });
                    }
                    _ => {
                        let error = format!("{e}; no host for a cold restart either");
                        set_step(state, &name, i, StepState::Failed { error });
                    }
                }
            }
        }
    }
    out.extend(tick(state, now));
    finish_if_done(state, &name, &mut out);
    out
}

/// A drain's cold restart ended (destroyed on its host, then started on `target`).
pub fn restart_finished(
    state: &mut ClusterState,
    uuid: &str,
    target: &str,
    result: Result<(), String>,
    now: Millis,
) -> Vec<Action> {
    let mut out = Vec::new();
    let Some((name, i)) = find_step(state, uuid, |s| matches!(s, StepState::Restarting { .. })) else {
        return out;
    };
    let st = match &result {
        Ok(()) => StepState::Restarted { target: target.into() },
        Err(e) => StepState::Failed { error: format!("cold restart failed: {e}") },
    };
    set_step(state, &name, i, st);
    if let Some(vm) = state.vms.get_mut(uuid) {
        vm.busy_with = None;
        if result.is_ok() {
            crate::cluster::note_near(&mut state.near, target, uuid);
            vm.host = Some(target.into());
            vm.change_run(RunState::Running, RunCause::Started);
            out.push(Action::Outage(crate::availability::OutageMark::Ended { vm_uuid: uuid.into() }));
        }
    }
    out.extend(tick(state, now));
    finish_if_done(state, &name, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::tests::{three_hosts, vm_on};

    fn cluster() -> ClusterState {
        let mut s = three_hosts();
        for h in s.hosts.values_mut() {
            h.lease.granted_at = Some(Millis(0));
        }
        for (u, n, p, prot) in
            [("a", "dns1", 100, true), ("b", "radius1", 50, true), ("c", "billing", 0, false)]
        {
            let mut vm = vm_on(&mut s, u, n, "kvm1");
            vm.protected = prot;
            vm.priority = p;
            s.vms.insert(u.into(), vm);
        }
        s
    }

    fn migrations(a: &[Action]) -> Vec<(String, String)> {
        a.iter()
            .filter_map(|a| match a {
                Action::Migrate { vm_name, host, .. } => Some((vm_name.clone(), host.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_plan_moves_protected_vms_first_and_respects_anti_affinity_and_room() {
        let mut s = cluster();
        let mut dns2 = vm_on(&mut s, "d", "dns2", "kvm2");
        dns2.anti_affinity = Some("dns".into());
        s.vms.insert("d".into(), dns2);
        s.vms.get_mut("a").unwrap().anti_affinity = Some("dns".into());
        s.hosts.get_mut("kvm3").unwrap().memory_limit_kib = Some(100 << 10);
        let p = plan(&s, "kvm1", Millis(1)).unwrap();
        let got: Vec<(&str, Option<&str>)> =
            p.iter().map(|s| (s.vm_name.as_str(), s.planned.as_deref())).collect();
        // dns1 may not join dns2 on kvm2, so it takes kvm3's 100 MiB; then kvm3 is full.
        assert_eq!(got, [("dns1", Some("kvm3")), ("radius1", Some("kvm2")), ("billing", Some("kvm2"))]);
        s.hosts.get_mut("kvm2").unwrap().memory_limit_kib = Some(100 << 10);
        let p = plan(&s, "kvm1", Millis(1)).unwrap();
        assert!(matches!(&p[2].state, StepState::Stuck { reason } if reason.contains("limit")), "{p:?}");
    }

    #[test]
    fn a_drain_runs_two_migrations_per_host_then_ends_in_maintenance() {
        let mut s = cluster();
        let a = start(&mut s, "kvm1", false, Millis(1)).unwrap();
        let m = migrations(&a);
        assert_eq!(m.len(), 2, "per-host limit: {a:?}");
        assert_eq!(m[0].0, "dns1");
        assert!(placement::place(&s, &s.vms["c"], Millis(1), &[]).is_ok());
        assert!(tick(&mut s, Millis(2)).is_empty(), "no third while two run");
        let a = migration_finished(&mut s, "a", &m[0].1, Ok(()), Millis(3));
        assert_eq!(migrations(&a).len(), 1, "billing starts when a slot frees: {a:?}");
        migration_finished(&mut s, "b", &m[1].1, Ok(()), Millis(4));
        let target = migrations(&a)[0].1.clone();
        let a = migration_finished(&mut s, "c", &target, Ok(()), Millis(5));
        assert!(
            a.iter().any(|x| matches!(x, Action::Event(Event { kind: EventKind::DrainDone, .. }))),
            "{a:?}"
        );
        assert_eq!(s.hosts["kvm1"].admin, AdminState::Maintenance);
        undrain(&mut s, "kvm1").unwrap();
        assert_eq!(s.hosts["kvm1"].admin, AdminState::Active);
    }

    #[test]
    fn a_vm_with_no_room_leaves_the_drain_incomplete_and_the_host_out_of_maintenance() {
        let mut s = cluster();
        for h in ["kvm2", "kvm3"] {
            s.hosts.get_mut(h).unwrap().memory_limit_kib = Some(64 << 10);
        }
        let a = start(&mut s, "kvm1", false, Millis(1)).unwrap();
        let m = migrations(&a);
        assert_eq!(m.len(), 2);
        migration_finished(&mut s, "a", &m[0].1, Ok(()), Millis(2));
        crate::inventory::apply_migrated(&mut s, "a", &m[0].1);
        let a = migration_finished(&mut s, "b", &m[1].1, Err("target died".into()), Millis(3));
        // radius1 is retried nowhere (no room left anywhere), billing never had room.
        assert!(
            a.iter().any(|x| matches!(x, Action::Event(Event { kind: EventKind::DrainIncomplete, .. }))),
            "{a:?}"
        );
        let d = s.hosts["kvm1"].drain.as_ref().unwrap();
        assert_eq!(d.state, DrainState::Incomplete);
        assert!(d.message.contains("billing") && d.message.contains("nothing was stopped"), "{}", d.message);
        assert_eq!(s.hosts["kvm1"].admin, AdminState::Draining);
    }

    /// dns1 alone on kvm1, drained (`allow_restart` as given), its one live migration failed:
    /// the state, the migration's target and what the failure led to.
    fn migration_failed_in_a_drain(allow_restart: bool) -> (ClusterState, String, Vec<Action>) {
        let mut s = cluster();
        s.policy.max_relocate = 0;
        s.vms.retain(|u, _| u == "a");
        let a = start(&mut s, "kvm1", allow_restart, Millis(1)).unwrap();
        let (_, to) = migrations(&a).pop().unwrap();
        let a = migration_finished(&mut s, "a", &to, Err("CPU incompatible".into()), Millis(2));
        (s, to, a)
    }

    #[test]
    fn a_vm_that_cannot_be_migrated_is_cold_restarted_only_if_the_operator_allowed_it() {
        for allow in [false, true] {
            let (mut s, _, a) = migration_failed_in_a_drain(allow);
            let cold: Vec<_> = a.iter().filter(|x| matches!(x, Action::ColdRestart { .. })).collect();
            if !allow {
                assert!(cold.is_empty(), "never without --allow-restart: {a:?}");
                assert_eq!(s.hosts["kvm1"].drain.as_ref().unwrap().state, DrainState::Incomplete);
                continue;
            }
            let Some(Action::ColdRestart { to, from, .. }) = cold.first() else { panic!("{a:?}") };
            assert_eq!(from, "kvm1");
            assert!(s.vms["a"].busy_with.is_some(), "nothing else may restart it meanwhile");
            let to = to.clone();
            let a = restart_finished(&mut s, "a", &to, Ok(()), Millis(3));
            assert!(
                a.iter().any(|x| matches!(x, Action::Event(Event { kind: EventKind::DrainDone, .. }))),
                "{a:?}"
            );
            assert_eq!(s.vms["a"].host.as_deref(), Some(to.as_str()));
        }
    }

    #[test]
    fn a_host_lost_during_a_cold_restart_leaves_the_start_to_the_drain_unless_it_fails() {
        for start_works in [true, false] {
            let (mut s, to, a) = migration_failed_in_a_drain(true);
            assert!(a.iter().any(|x| matches!(x, Action::ColdRestart { .. })), "{a:?}");
            crate::recovery::confirm_down(&mut s, "kvm1", Millis(20_000)).unwrap();
            for h in s.hosts.values_mut() {
                h.reported_at = Some(Millis(25_000));
                h.lease.granted_at = Some(Millis(25_000));
            }
            let starts = |a: &[Action]| a.iter().filter(|x| matches!(x, Action::Start { .. })).count();
            let a = crate::recovery::tick(&mut s, Millis(25_001));
            assert_eq!(starts(&a), 0, "the drain's start is still to come: {a:?}");
            let result = if start_works { Ok(()) } else { Err("no such file".into()) };
            restart_finished(&mut s, "a", &to, result, Millis(25_002));
            let a = crate::recovery::tick(&mut s, Millis(25_003));
            assert_eq!(starts(&a), usize::from(!start_works), "{a:?}");
            assert_eq!(s.vms["a"].recovery.is_some(), !start_works);
        }
    }

    #[test]
    fn failing_probes_degrade_a_host_which_then_takes_no_vms_and_is_emptied() {
        let mut s = cluster();
        let bad = vec![Probe { name: "check:raid".into(), ok: false, detail: "exit 1: degraded".into() }];
        on_probes(&mut s, "kvm1", bad, Millis(0));
        let online = |s: &mut ClusterState, t: u64| {
            for h in s.hosts.values_mut() {
                h.lease.granted_at = Some(Millis(t));
            }
        };
        online(&mut s, 29_000);
        assert!(tick(&mut s, Millis(29_999)).is_empty());
        let a = tick(&mut s, Millis(30_000));
        assert!(
            a.iter().any(|x| matches!(x, Action::Event(Event { kind: EventKind::HostDegraded, .. }))),
            "{a:?}"
        );
        assert_eq!(migrations(&a).len(), 2);
        assert_eq!(s.hosts["kvm1"].health.as_str(), "degraded");
        let vm = s.vms["c"].clone();
        let e = placement::place(&s, &vm, Millis(30_000), &["kvm2".into(), "kvm3".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("kvm1: degraded (check:raid: exit 1: degraded)"), "{e}");
        on_probes(&mut s, "kvm1", vec![], Millis(31_000));
        online(&mut s, 90_000);
        let a = tick(&mut s, Millis(91_000));
        assert!(
            a.iter().any(|x| matches!(x, Action::Event(Event { kind: EventKind::HostRecovered, .. }))),
            "{a:?}"
        );
        assert_eq!(s.hosts["kvm1"].admin, AdminState::Active);
    }

    #[test]
    fn a_host_whose_libvirtd_hangs_is_degraded_but_its_vms_stay_put() {
        let mut s = cluster();
        let hung = vec![Probe { name: "libvirtd".into(), ok: false, detail: "no answer for 3 s".into() }];
        on_probes(&mut s, "kvm1", hung, Millis(0));
        for h in s.hosts.values_mut() {
            h.lease.granted_at = Some(Millis(29_000));
        }
        let a = tick(&mut s, Millis(30_000));
        assert!(
            a.iter().any(|x| matches!(x, Action::Event(Event { kind: EventKind::HostDegraded, message, .. }) if message.contains("stay put"))),
            "{a:?}"
        );
        assert!(migrations(&a).is_empty(), "{a:?}");
        assert_eq!(s.hosts["kvm1"].health.as_str(), "degraded", "no new VMs go there");
    }
}
