//! Host failure: when a silent host may be declared dead, and restarting its protected VMs
//! elsewhere, most critical first. Also the return of a host that was declared dead.

use crate::Refusal;
use crate::action::Action;
use crate::availability::OutageMark;
use crate::cluster::{DiskLocked, Recovery, RunCause};
use crate::event::{Event, EventKind};
use crate::inventory::{InventoryChange, ReportedDomain};
use crate::lease::{current_membership, has_quorum, knows_membership, observe_quorum, quorum_held_for};
use crate::operation::Purpose;
use crate::time::secs;
use crate::waits::{FailbackWait, RestartWait};
use crate::{
    AdminState, ClusterState, Death, FencingMode, HostLiveness, Millis, RunState, VmView, placement,
};

/// How often a VM whose disk was locked is tried again.
pub const DISK_LOCK_RETRY_MS: u64 = 10_000;

/// Whether a failed start's error is a storage lock refusing a second copy: QEMU's own image
/// locking ("Failed to get "write" lock ... Is another process using the image?") or libvirt's
/// lockd ("resource busy: Lockspace resource ... is locked").
pub fn is_disk_locked(error: &str) -> bool {
    let e = error.to_lowercase();
    [
        "failed to get \"write\" lock",
        "failed to get shared \"write\" lock",
        "is another process using the image",
    ]
    .iter()
    .any(|m| e.contains(m))
        || (e.contains("lockspace resource") && e.contains("is locked"))
}

/// Whether a host whose agent acknowledged roster version `roster_acked` knows of a protection
/// first listed in version `protected_in`. Versions, not times: an answer stamped in the same
/// millisecond as a protect may have been decided just before it (a double run the safety
/// simulator found at 1,000,000 schedules), and versions, unlike one leader's clock, still
/// compare after a takeover.
pub fn protection_acknowledged(roster_acked: Option<u64>, protected_in: Option<u64>) -> bool {
    matches!((roster_acked, protected_in), (Some(acked), Some(listed)) if acked >= listed)
}

impl VmView {
    /// Whether a self-fence of a host whose agent acknowledged roster version `roster_acked`
    /// destroyed this VM: that roster listed its protection.
    pub fn fenced_by(&self, roster_acked: Option<u64>) -> bool {
        self.protected && protection_acknowledged(roster_acked, self.protected_in)
    }

    /// Whether its recovery waits for a start sent to `host` (whose result, or a report of the
    /// VM there, is still to come).
    pub fn awaits_start_on(&self, host: &str) -> bool {
        self.recovery.as_ref().is_some_and(|r| r.starting_on.as_deref() == Some(host))
    }
}

/// How a host was found dead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proof {
    /// Its lease lapsed under quorum: its agent self-fenced (or its watchdog reset it), which
    /// destroyed only the VMs it knew were protected.
    Lease,
    /// A fence device or an operator says it is off: nothing runs there.
    Off,
}

/// Declares `host` dead and queues its protected VMs for restart.
fn declare_dead(
    state: &mut ClusterState,
    host: &str,
    cause: String,
    proof: Proof,
    now: Millis,
    out: &mut Vec<Action>,
) {
    let Some(h) = state.hosts.get_mut(host) else { return };
    if h.dead.is_some() {
        return;
    }
    let known = h.roster_acked;
    // Its VMs stopped with it: at the latest when it was last heard from.
    let down_for = now.since(h.last_heartbeat.unwrap_or(now));
    h.dead = Some(Death { at: now, cause: cause.clone() });
    h.fencing_since = None;
    out.push(Action::DeclaredDead { host: host.into(), cause });
    // A start sent there may or may not have happened; the host is off now, so the VM goes
    // elsewhere. Until now it waited, whatever the start's fate (its result may be lost).
    for vm in state.vms.values_mut() {
        if let Some(r) = vm.recovery.as_mut().filter(|r| r.starting_on.as_deref() == Some(host)) {
            r.starting_on = None;
            r.tried.push(host.into());
        }
    }
    let alive: Vec<String> =
        state.hosts.values().filter(|h| h.dead.is_none()).map(|h| h.name.clone()).collect();
    let cold_restarting: Vec<String> = (state.vms.values())
        .filter(|v| v.host.as_deref() == Some(host) && crate::drain::cold_restarting(state, &v.uuid))
        .map(|v| v.uuid.clone())
        .collect();
    for vm in state.vms.values_mut().filter(|v| v.host.as_deref() == Some(host)) {
        // Another live host reports it running (it was moved behind vmha's back, or started
        // there by hand): that copy is the one left, and nothing is restarted. (`near` lists
        // it there already, as a second copy.)
        if let Some(second) = vm.second_copy.take().filter(|c| alive.contains(&c.host)) {
            vm.host = Some(second.host.clone());
            vm.change_run(RunState::Running, RunCause::Moved);
            vm.busy_with = None;
            out.push(Action::Event(Event::vm(
                &vm.name,
                EventKind::VmMoved,
                format!(
                    "{} runs on {}, where it was also reported while {host} ran it: nothing to restart",
                    vm.name, second.host
                ),
            )));
            continue;
        }
        let had_process = vm.state.has_process() || vm.state == RunState::Unknown;
        vm.change_run(RunState::Lost, RunCause::HostDead);
        // Busy: a live migration was under way, and may have ended on its target first. A
        // drain's cold restart stays in charge (destroyed here, its start elsewhere still to
        // come): the recovery waits for its end, and restarts the VM only if that start
        // failed (found by 400,000 schedules: both started it, once the target reported).
        let migrating = if cold_restarting.contains(&vm.uuid) { true } else { vm.busy_with.take().is_some() };
        let covered = proof == Proof::Off || vm.fenced_by(known);
        if vm.stopped_by.is_some() {
            continue;
        }
        if vm.protected && had_process {
            out.push(Action::Outage(OutageMark::Began {
                vm_uuid: vm.uuid.clone(),
                vm_name: vm.name.clone(),
                ago_ms: down_for,
                planned: false,
                cause: format!("{host} died"),
            }));
        }
        if vm.protected && had_process && vm.recovery.is_none() && covered {
            vm.recovery =
                Some(Recovery { may_have_moved_since: migrating.then_some(now), ..Recovery::new(now) });
        } else if vm.protected && had_process && vm.recovery.is_none() {
            out.push(Action::Event(Event::vm(
                &vm.name,
                EventKind::RestartUnsafe,
                format!(
                    "{} is not restarted: it was protected after {host} last confirmed its list of protected VMs, \
                     so its agent may not have destroyed it; once you know {host} is off, run `vmha host \
                     confirm-down {host}`",
                    vm.name
                ),
            )));
        } else if !vm.protected && had_process {
            out.push(Action::Event(Event::vm(
                &vm.name,
                EventKind::VmDown,
                format!("{} is down with {host}; it is not protected, so it is not restarted", vm.name),
            )));
        }
    }
}

/// One step of failure handling at `now`: declare hosts dead where the rule allows, start
/// fencing, and start waiting protected VMs in priority order.
pub fn tick(state: &mut ClusterState, now: Millis) -> Vec<Action> {
    observe_quorum(state, now);
    let mut out = Vec::new();
    let t = state.timings;
    let window = t.lease_ttl_ms + t.fence_margin_ms;
    let members = current_membership(state);
    let hosts: Vec<String> = state.hosts.keys().cloned().collect();
    for name in hosts {
        let h = &state.hosts[&name];
        if h.dead.is_some()
            || h.admin == AdminState::Maintenance
            || state.liveness(&name, now) == HostLiveness::Online
        {
            continue;
        }
        // A lease granted by an earlier leader ended by `started + ttl` at the latest.
        let lease_end = h.lease.end(&t).unwrap_or(Millis(state.started.0 + t.lease_ttl_ms));
        if now.0 < lease_end.0 + t.fence_margin_ms {
            continue;
        }
        let silent = now.since(h.last_heartbeat.unwrap_or(state.started));
        // Hosts on which a killed or hung agent may leave VMs running wait for an operator (or
        // a fence device) instead of their lease.
        let wait_for_operator = match (&h.fencing, &h.watchdog) {
            (FencingMode::Manual, _) => Some("its fencing mode is manual".to_string()),
            (FencingMode::SelfFence, w) if !w.works() && !state.policy.accept_no_watchdog => Some(format!(
                "it has no working watchdog ({}), so a killed or hung agent there may leave its VMs running",
                match w {
                    crate::Watchdog::Missing(why) => why.as_str(),
                    _ => "its agent never said it has one",
                }
            )),
            (FencingMode::SelfFence, _) if !knows_membership(state, &name, members) => Some(
                "a host joined or left the cluster since it last answered, so it may count the votes among other \
                 hosts than this controller does and keep its VMs"
                    .to_string(),
            ),
            _ => None,
        };
        if let Some(why) = wait_for_operator {
            if h.fencing_since.is_none() {
                if let Some(h) = state.hosts.get_mut(&name) {
                    h.fencing_since = Some(now);
                }
                out.push(Action::Event(Event::host(
                    &name,
                    EventKind::ConfirmDownNeeded,
                    format!(
                        "{name} lost its lease, but {why}: nothing is restarted until a fence device or an operator \
                         who knows it is off runs `vmha host confirm-down {name}`"
                    ),
                )));
            }
            continue;
        }
        if h.fencing == FencingMode::External {
            if h.fencing_since.is_none() && has_quorum(state, now) {
                if let Some(h) = state.hosts.get_mut(&name) {
                    h.fencing_since = Some(now);
                }
                out.push(Action::Fence { host: name.clone() });
            }
        } else if quorum_held_for(state, now, window) {
            let cause = format!(
                "no lease for {} (heard from {} ago) while this controller held quorum; its agent has destroyed its \
                 protected VMs, or its watchdog reset it",
                secs(now.since(lease_end)),
                secs(silent)
            );
            declare_dead(state, &name, cause, Proof::Lease, now, &mut out);
        }
    }
    schedule_restarts(state, now, &mut out);
    schedule_failback(state, now, &mut out);
    out
}

/// With failback on, one running VM at a time goes back to its preferred host once that host
/// has held a lease for `failback_after` and can take it.
fn schedule_failback(state: &ClusterState, now: Millis, out: &mut Vec<Action>) {
    if state.policy.failback_after_ms.is_none() || state.vms.values().any(|v| v.busy_with.is_some()) {
        return;
    }
    // Summed only once a VM gets as far as asking, and then once for all of them.
    let usage = std::cell::OnceCell::new();
    let due = state.vms.values().find_map(|v| failback(state, &usage, v, None, now)?.ok().map(|p| (v, p)));
    if let Some((v, host)) = due {
        out.push(Action::Migrate {
            vm_uuid: v.uuid.clone(),
            vm_name: v.name.clone(),
            host,
            purpose: Purpose::Failback,
        });
    }
}

/// For a running VM away from its preferred host: that host if failback may take it back now,
/// or why it waits. `None` for a VM at home, without one, or not running. `busy`: a migration
/// in flight (failback moves one VM at a time, and none while anything else moves).
pub fn failback<'s>(
    state: &'s ClusterState,
    usage: &std::cell::OnceCell<placement::Usage<'s>>,
    vm: &VmView,
    busy: Option<&str>,
    now: Millis,
) -> Option<Result<String, FailbackWait>> {
    let p = vm.preferred_host.as_deref()?;
    if vm.state != RunState::Running || vm.recovery.is_some() || vm.host.as_deref().is_none_or(|h| h == p) {
        return None;
    }
    // A drain owns the VMs of its host: a failback beside it would start a second operation
    // on one VM (found by 1,000,000 schedules: the failback's migration and the drain's cold
    // restart, begun in the same tick, started the VM on two hosts).
    if let Some(h) =
        vm.host.as_deref().and_then(|h| state.hosts.get(h)).filter(|h| h.admin == AdminState::Draining)
    {
        return Some(Err(FailbackWait::HostDraining(h.name.clone())));
    }
    let Some(after) = state.policy.failback_after_ms else { return Some(Err(FailbackWait::Off(p.into()))) };
    let Some(h) = state.hosts.get(p) else { return Some(Err(FailbackWait::UnknownHost(p.into()))) };
    let held = h.lease.held_since.map_or(0, |s| now.since(s));
    Some(Err(match state.liveness(p, now) {
        l if h.dead.is_some() || l != HostLiveness::Online => {
            FailbackWait::NotOnline { host: p.into(), liveness: l.as_str() }
        }
        // Back to a host whose probes fail would only move it again (a degraded host is
        // emptied; a hung guest there is moved off).
        _ if h.health.failing_since.is_some() || h.health.degraded => {
            FailbackWait::Unhealthy { host: p.into(), why: h.health.failing_summary() }
        }
        _ if held < after => FailbackWait::NotSettled { host: p.into(), held_ms: held, after_ms: after },
        _ if busy.is_some() => FailbackWait::Busy(busy.unwrap_or_default().into()),
        _ => {
            let usage = usage.get_or_init(|| placement::Usage::of(state));
            match placement::why_not(state, usage, vm, p, now) {
                Some(why) => FailbackWait::Unfit(why),
                None => return Some(Ok(p.to_string())),
            }
        }
    }))
}

/// A host that has not reported its domains since `t` (a report that earned a lease was sent
/// at most `max_transit` before it arrived) and is not dead: it may run a copy nobody knows of
/// yet. The VM's own host is left out once its state there is known.
pub(crate) fn not_reported_since(state: &ClusterState, vm: &VmView, t: Millis) -> Option<String> {
    let since = Millis(t.0 + state.timings.max_transit_ms);
    // Its own host counts too while this leader has not heard of the VM there (a takeover
    // restores every VM as unknown): what an earlier leader saw there (it stopped, its host
    // self-fenced) may have been undone since, by a move whose end was never written down.
    let unknown_at_home = vm.state == crate::RunState::Unknown;
    state
        .hosts
        .values()
        .filter(|h| (unknown_at_home || vm.host.as_deref() != Some(h.name.as_str())) && h.dead.is_none())
        .find(|h| h.reported_at.is_none_or(|r| r < since))
        .map(|h| h.name.clone())
}

pub(crate) fn schedule_restarts(state: &mut ClusterState, now: Millis, out: &mut Vec<Action>) {
    // A live host reports it running: there is nothing to restart, whatever led here (a start
    // an earlier leader sent elsewhere and whose fate is unknown, say: that host is followed
    // on its own, and a copy it may run is a second copy).
    // One pass over every VM (this runs every tick); the rest looks at those with a recovery.
    let recovering: Vec<String> =
        state.vms.values().filter(|v| v.recovery.is_some()).map(|v| v.uuid.clone()).collect();
    let running: Vec<(String, String)> = (recovering.iter().map(|u| &state.vms[u]))
        .filter(|v| v.recovery.as_ref().is_some_and(|r| r.starting_on.is_none()) && v.state.has_process())
        .filter_map(|v| v.host.clone().map(|h| (v.uuid.clone(), h)))
        .filter(|(_, h)| state.hosts.get(h).is_some_and(|h| h.dead.is_none()))
        .collect();
    for (uuid, host) in running {
        let Some(vm) = state.vms.get_mut(&uuid) else { continue };
        vm.recovery = None;
        out.push(Action::Outage(OutageMark::Ended { vm_uuid: uuid.clone() }));
        out.push(Action::Event(Event::vm(
            &vm.name,
            EventKind::RestartCancelled,
            format!("{} runs on {host}, which reports it: nothing to restart", vm.name),
        )));
    }
    let recovering = recovering.iter().filter_map(|u| state.vms.get(u));
    let mut in_flight =
        recovering.clone().filter(|v| v.recovery.as_ref().is_some_and(|r| r.starting_on.is_some())).count();
    let mut queue: Vec<(i32, String, String)> = recovering
        .filter(|v| {
            v.recovery.as_ref().is_some_and(|r| {
                r.starting_on.is_none()
                    && r.error.is_none()
                    && r.disk_locked.as_ref().is_none_or(|l| now >= l.retry_at)
            })
        })
        .map(|v| (-v.priority, v.name.clone(), v.uuid.clone()))
        .collect();
    queue.sort();
    for (_, _, uuid) in queue {
        let vm = &state.vms[&uuid];
        let tried = vm.recovery.as_ref().map(|r| r.tried.clone()).unwrap_or_default();
        let unheard = vm
            .recovery
            .as_ref()
            .and_then(|r| r.may_have_moved_since)
            .and_then(|t| not_reported_since(state, vm, t));
        let decision = if let Some(op) = &vm.busy_with {
            // A drain's cold restart may own it: one start at a time.
            Err(RestartWait::Busy(op.clone()))
        } else if let Some(host) = unheard {
            Err(RestartWait::Unheard { host, vm: vm.name.clone() })
        } else if in_flight >= state.policy.max_parallel_starts {
            Err(RestartWait::InFlight(in_flight))
        } else if vm.xml.is_empty() {
            Err(match &vm.definition_refused {
                Some(why) => RestartWait::DefinitionRefused(why.clone()),
                None => RestartWait::NoDefinition,
            })
        } else if let Some(on) = vm.recovery.as_ref().and_then(|r| r.on.as_deref()) {
            match placement::why_not(state, &placement::Usage::of(state), vm, on, now) {
                Some(why) => Err(RestartWait::AskedHostUnfit(why)),
                None => Ok(on.to_string()),
            }
        } else {
            placement::place(state, vm, now, &tried).map_err(RestartWait::from)
        };
        let Some(vm) = state.vms.get_mut(&uuid) else { continue };
        let Some(r) = vm.recovery.as_mut() else { continue };
        match decision {
            Ok(host) => {
                r.starting_on = Some(host.clone());
                r.attempts += 1;
                r.waiting = None;
                in_flight += 1;
                out.push(Action::Start { vm_uuid: uuid.clone(), vm_name: vm.name.clone(), host });
            }
            Err(wait) => {
                let why = wait.to_string();
                if r.waiting.as_deref() != Some(why.as_str()) {
                    out.push(Action::Event(Event::vm(
                        &vm.name,
                        EventKind::RestartWaiting,
                        format!("{} waits: {why}", vm.name),
                    )));
                    r.waiting = Some(why);
                }
            }
        }
    }
}

/// A restart ended. On failure the VM is tried on another host, up to `max_relocate` times.
pub fn start_finished(
    state: &mut ClusterState,
    uuid: &str,
    host: &str,
    result: Result<(), String>,
    now: Millis,
) -> Vec<Action> {
    let max_relocate = state.policy.max_relocate;
    let Some(vm) = state.vms.get_mut(uuid) else { return Vec::new() };
    // A result for a start this recovery no longer waits for (its host was declared dead
    // meanwhile, or a report already showed the VM running) changes nothing.
    let Some(r) = vm.recovery.as_mut().filter(|r| r.starting_on.as_deref() == Some(host)) else {
        return Vec::new();
    };
    r.starting_on = None;
    let mut out = Vec::new();
    match result {
        Ok(()) => {
            let took = now.since(r.since);
            let unlocked = if r.disk_locked.is_some() { " (its disk lock is gone)" } else { "" };
            vm.recovery = None;
            crate::cluster::note_near(&mut state.near, host, uuid);
            vm.host = Some(host.into());
            vm.change_run(RunState::Running, RunCause::Started);
            out.push(Action::Outage(OutageMark::Ended { vm_uuid: uuid.into() }));
            out.push(Action::Event(Event::vm(
                &vm.name,
                EventKind::VmRestarted,
                format!("{} restarted on {host}, {} after it was found down{unlocked}", vm.name, secs(took)),
            )));
        }
        Err(e) if is_disk_locked(&e) => {
            let last_seen = vm.host.clone().unwrap_or_else(|| "an unknown host".into());
            if r.disk_locked.is_none() {
                out.push(Action::Event(Event::vm(
                    &vm.name,
                    EventKind::DiskLocked,
                    format!(
                        "DISK LOCKED: starting {} on {host} was refused because its disk is locked: another copy may \
                         run (last seen on {last_seen}; fencing was bypassed?). vmha tries no other host, and tries \
                         again every {} until the lock is gone. ({e})",
                        vm.name,
                        secs(DISK_LOCK_RETRY_MS)
                    ),
                )));
            }
            let since = r.disk_locked.as_ref().map_or(now, |l| l.since);
            r.waiting = Some(format!("disk locked: another copy may run (last seen on {last_seen})"));
            r.disk_locked =
                Some(DiskLocked { since, last_seen, retry_at: Millis(now.0 + DISK_LOCK_RETRY_MS) });
        }
        Err(e) => {
            r.tried.push(host.into());
            if r.attempts > max_relocate {
                let msg = format!(
                    "{} could not be restarted: {} attempts failed, on {} (the last on {host}: {e}); fix the cause and \
                     start it by hand",
                    vm.name,
                    r.attempts,
                    r.tried.join(", ")
                );
                r.error = Some(msg.clone());
                out.push(Action::Event(Event::vm(&vm.name, EventKind::RestartFailed, msg)));
            } else {
                out.push(Action::Event(Event::vm(
                    &vm.name,
                    EventKind::RestartRetry,
                    format!("starting {} on {host} failed: {e}; trying another host", vm.name),
                )));
                schedule_restarts(state, now, &mut out);
            }
        }
    }
    out
}

/// The external fence command for `host` finished.
pub fn fence_finished(
    state: &mut ClusterState,
    host: &str,
    result: Result<String, String>,
    now: Millis,
) -> Vec<Action> {
    let mut out = Vec::new();
    match result {
        Ok(said) => {
            declare_dead(
                state,
                host,
                format!("the fence command {} ({said})", Death::OFF),
                Proof::Off,
                now,
                &mut out,
            );
            schedule_restarts(state, now, &mut out);
        }
        Err(e) => out.push(Action::Event(Event::host(
            host,
            EventKind::FenceFailed,
            format!(
                "FENCING {host} FAILED: {e}; nothing of it is restarted. Fix the fence device, or run \
                 `vmha host confirm-down {host}` once you know it is off"
            ),
        ))),
    }
    out
}

/// An operator says `host` is off.
pub fn confirm_down(state: &mut ClusterState, host: &str, now: Millis) -> Result<Vec<Action>, Refusal> {
    match state.hosts.get(host) {
        None => return Err(Refusal::UnknownHost(host.into())),
        Some(_) if state.liveness(host, now) == HostLiveness::Online => {
            return Err(Refusal::HostOnline(host.into()));
        }
        Some(_) => {}
    }
    let mut out = Vec::new();
    let cause = format!("an operator {}", Death::OFF);
    // Declared dead before on its lease: now it is known to be off, which is what a start by an
    // operator of a VM its self-fence did not cover needs (`power::start`).
    if let Some(d) = state.hosts.get_mut(host).and_then(|h| h.dead.as_mut()) {
        d.cause = cause.clone();
    }
    declare_dead(state, host, cause, Proof::Off, now, &mut out);
    // Declared dead before on its lease: what its agent may not have destroyed waited for this.
    for vm in state.vms.values_mut().filter(|v| v.host.as_deref() == Some(host)) {
        if vm.protected && vm.state == RunState::Lost && vm.recovery.is_none() {
            vm.recovery = Some(Recovery::new(now));
        }
    }
    schedule_restarts(state, now, &mut out);
    Ok(out)
}

/// A host reports a VM whose restart its disk lock refused, and no process of it: whatever
/// held the lock there is gone (its agent destroyed the stale copy once it saw its lease had
/// lapsed), so the start is tried at the next tick, not at the next retry, up to 10 s later.
/// Returns the VMs whose recovery changed.
pub fn lock_holder_reported(
    state: &mut ClusterState,
    host: &str,
    domains: &[ReportedDomain],
    now: Millis,
) -> Vec<String> {
    let mut changed = Vec::new();
    for uuid in state.vms_near(host) {
        let runs_here = domains.iter().any(|d| d.uuid == uuid && d.state.has_process());
        let Some(vm) = state.vms.get_mut(&uuid) else { continue };
        if let Some(l) = vm.recovery.as_mut().and_then(|r| r.disk_locked.as_mut())
            && l.last_seen == host
            && !runs_here
            && l.retry_at > now
        {
            l.retry_at = now;
            changed.push(uuid);
        }
    }
    changed
}

/// A host reports (before the inventory takes the report). If it had been declared dead, any
/// protected VM it still runs that was restarted elsewhere is a stale copy to destroy at once;
/// one not restarted yet stays where it is. Returns the actions and the stale domains, which the
/// inventory must not take as the VM's location.
pub fn on_report(
    state: &mut ClusterState,
    host: &str,
    domains: &[ReportedDomain],
    now: Millis,
) -> (Vec<Action>, Vec<String>) {
    let mut out = Vec::new();
    let mut stale = Vec::new();
    let Some(h) = state.hosts.get_mut(host) else { return (out, stale) };
    h.fencing_since = None;
    let Some(death) = h.dead.take() else { return (out, stale) };
    out.push(Action::Event(Event::host(
        host,
        EventKind::HostReturned,
        format!("{host} is back, {} after it was declared dead ({})", secs(now.since(death.at)), death.cause),
    )));
    for d in domains.iter().filter(|d| d.state.has_process()) {
        let Some(vm) = state.vms.get_mut(&d.uuid) else { continue };
        let elsewhere = vm.host.as_deref().is_some_and(|h| h != host);
        let starting = vm.recovery.as_ref().is_some_and(|r| r.starting_on.is_some());
        if elsewhere || starting {
            stale.push(d.uuid.clone());
            out.push(Action::Event(Event::vm(
                &vm.name,
                EventKind::StaleCopy,
                format!(
                    "{host} came back still running {} although it was restarted elsewhere: FENCING WAS \
                     BYPASSED (agent down without a watchdog?); destroying the copy on {host}",
                    vm.name
                ),
            )));
            out.push(Action::DestroyStale {
                vm_uuid: d.uuid.clone(),
                vm_name: vm.name.clone(),
                host: host.into(),
            });
        } else if vm.recovery.take().is_some() {
            out.push(Action::Event(Event::vm(
                &vm.name,
                EventKind::RestartCancelled,
                format!("{} still runs on {host}, which is back; not restarting it elsewhere", vm.name),
            )));
        }
    }
    (out, stale)
}

/// After a report from a live host: a protected VM that stopped although vmha did not stop it
/// (its agent self-fenced on a lease it then got back, or the guest died) is restarted.
pub fn after_report(
    state: &mut ClusterState,
    host: &str,
    changes: &[InventoryChange],
    now: Millis,
) -> Vec<Action> {
    let mut out = Vec::new();
    let self_fenced = state.hosts.get(host).is_some_and(|h| h.self_fenced);
    // A start whose result was lost (or is still on its way) is done once the host shows the VM
    // running.
    let started: Vec<String> = (state.vms_near(host).into_iter())
        .filter(|u| {
            let v = &state.vms[u];
            v.host.as_deref() == Some(host) && v.state.has_process() && v.awaits_start_on(host)
        })
        .collect();
    for uuid in started {
        out.extend(start_finished(state, &uuid, host, Ok(()), now));
    }
    for c in changes {
        if let InventoryChange::TwoCopies { uuid, name, placed, extra, confirmed } = c {
            if *confirmed {
                out.push(Action::Event(Event::vm(
                    name,
                    EventKind::TwoCopies,
                    format!(
                        "{name} RUNS TWICE: on {placed}, where vmha placed it, and on {extra}; destroying the copy on \
                         {extra} (fencing was bypassed: a start by hand, or a confirm-down of a live host?)"
                    ),
                )));
                out.push(Action::DestroyStale {
                    vm_uuid: uuid.clone(),
                    vm_name: name.clone(),
                    host: extra.clone(),
                });
            } else {
                out.push(Action::Event(Event::vm(
                    name,
                    EventKind::SecondCopySeen,
                    format!(
                        "{extra} reports {name} running while {placed} runs it too; destroying the copy on {extra} \
                         if {placed}'s next report still shows its own"
                    ),
                )));
            }
            continue;
        }
        if let InventoryChange::Moved { uuid, name, to, .. }
        | InventoryChange::StateChanged { uuid, name, host: to, .. } = c
            && let Some(vm) = state.vms.get_mut(uuid)
            && vm.state.has_process()
            && vm
                .recovery
                .as_ref()
                .is_some_and(|r| r.starting_on.is_none() && r.may_have_moved_since.is_some())
        {
            vm.recovery = None;
            out.push(Action::Event(Event::vm(
                name,
                EventKind::RestartCancelled,
                format!("{name} runs on {to}: it had moved, not stopped; nothing to restart"),
            )));
            continue;
        }
        if let InventoryChange::Moved { uuid, to: at, .. }
        | InventoryChange::StateChanged { uuid, host: at, .. } = c
            && let Some(vm) = state.vms.get_mut(uuid)
            && vm.state.has_process()
            && vm.busy_with.is_none()
            && let Some(by) = vm.stopped_by.take()
        {
            out.push(Action::Event(Event::vm(
                &vm.name,
                EventKind::VmState,
                format!(
                    "{} runs on {at} again, started outside vmha after {by} stopped it: vmha {} it again",
                    vm.name,
                    if vm.protected { "protects" } else { "watches" }
                ),
            )));
            continue;
        }
        let InventoryChange::StateChanged { uuid, name, from, to, unwatched, .. } = c else { continue };
        // Down with its host (`Lost`) counts as running: a host that came back may first send a
        // report from before its agent self-fenced, which makes its return cancel the restart
        // ("still runs there"), and only then the one that shows the VM off.
        let ran = from.has_process() || *from == RunState::Lost;
        if !ran || to.has_process() || *to == RunState::Lost {
            continue;
        }
        let Some(vm) = state.vms.get_mut(uuid) else { continue };
        if !vm.protected || vm.busy_with.is_some() || vm.recovery.is_some() || vm.stopped_by.is_some() {
            continue;
        }
        // The same report may show it moved: shut off here because it runs on another host now
        // (a live migration whose result was missed, a `virsh migrate` by hand). Nothing stopped.
        if vm.host.as_deref() != Some(host) || vm.state.has_process() {
            continue;
        }
        vm.recovery = Some(Recovery { may_have_moved_since: Some(now), ..Recovery::new(now) });
        out.push(Action::Outage(OutageMark::Began {
            vm_uuid: uuid.clone(),
            vm_name: name.clone(),
            // Stopped while no leader watched: at the earliest when the last one stopped watching.
            ago_ms: if *unwatched { now.since(state.started) + state.unwatched_before_ms } else { 0 },
            planned: false,
            cause: format!("stopped on {host} without vmha asking ({})", to.as_str()),
        }));
        out.push(Action::Event(Event::vm(
            name,
            EventKind::VmStopped,
            if self_fenced {
                format!(
                    "{name} stopped on {host} ({}): {host}'s agent self-fenced and destroyed it; restarting it",
                    to.as_str()
                )
            } else if *unwatched {
                format!(
                    "{name} is {} on {host}, but was recorded running before this controller took over: it stopped \
                     while no leader watched ({host}'s agent self-fenced, the guest died or it was stopped by hand); \
                     restarting it",
                    to.as_str()
                )
            } else {
                format!(
                    "{name} stopped on {host} ({}) without vmha asking: the guest died or was stopped by hand; \
                     restarting it (unprotect a VM before stopping it on purpose)",
                    to.as_str()
                )
            },
        )));
    }
    if !out.is_empty() {
        schedule_restarts(state, now, &mut out);
    }
    out
}

/// Why a protected VM is not running, and what happens next; `None` if it runs.
pub fn explain(state: &ClusterState, uuid: &str, now: Millis) -> Option<String> {
    let vm = state.vms.get(uuid)?;
    if let Some(r) = &vm.recovery {
        return Some(match (&r.error, &r.starting_on, &r.waiting) {
            (Some(e), _, _) => e.clone(),
            (None, None, Some(w)) if r.disk_locked.is_some() => w.clone(),
            (None, Some(h), _) => format!("restarting on {h} (attempt {})", r.attempts),
            (None, None, Some(w)) => format!("waits to restart: {w}"),
            (None, None, None) => "queued for restart".into(),
        });
    }
    let Some(host) = vm.host.as_deref() else {
        return Some("no host reports it".into());
    };
    let h = state.hosts.get(host)?;
    if vm.state == RunState::Running && state.liveness(host, now) == HostLiveness::Online {
        return None;
    }
    if let (Some(by), None) = (&vm.stopped_by, &vm.busy_with) {
        return Some(format!(
            "{} on {host}, {}",
            vm.state.as_str(),
            crate::power::stopped_on_purpose(&vm.name, by)
        ));
    }
    let t = state.timings;
    Some(match state.liveness(host, now) {
        HostLiveness::Suspect => {
            let lease_end = h.lease.end(&t).unwrap_or(Millis(state.started.0 + t.lease_ttl_ms));
            let due = lease_end.0 + t.fence_margin_ms;
            match h.fencing {
                FencingMode::SelfFence if !h.watchdog.works() && !state.policy.accept_no_watchdog => format!(
                    "{host} is suspect and has no working watchdog: waiting for `vmha host confirm-down {host}`"
                ),
                FencingMode::SelfFence if now.0 < due => format!(
                    "{host} is suspect; it may be declared dead in {} if this controller keeps quorum",
                    secs(due - now.0)
                ),
                FencingMode::SelfFence => format!(
                    "{host} is suspect, but this controller has not held quorum for {}: waiting (a partition \
                     may hide a live host)",
                    secs(t.lease_ttl_ms + t.fence_margin_ms)
                ),
                FencingMode::External => format!("{host} is suspect; waiting for its fence command"),
                FencingMode::Manual => {
                    format!("{host} is suspect; waiting for `vmha host confirm-down {host}`")
                }
            }
        }
        HostLiveness::Dead if vm.protected => format!(
            "{host} is dead, but it never confirmed that {} is protected, so its agent may not have destroyed it: \
             once you know {host} is off, run `vmha host confirm-down {host}`",
            vm.name
        ),
        HostLiveness::Dead => format!("{host} is dead; {} is not protected", vm.name),
        HostLiveness::Online => match (&vm.busy_with, vm.protected, vm.state) {
            (Some(op), _, state) => format!("{} on {host}, busy with operation {op}", state.as_str()),
            (None, true, RunState::Paused) => format!(
                "paused on {host}, a live host: vmha neither resumes nor restarts a paused guest (it still holds \
                 its memory there); resume it there (`virsh resume {}`)",
                vm.name
            ),
            (None, true, state) => format!(
                "{} on {host}, a live host, so it is not restarted: vmha restarts a protected VM that stops \
                 without being asked, or whose host dies, and {} was already off when it was protected (or its \
                 restart was given up or cancelled); `vmha vm start {}` starts it",
                state.as_str(),
                vm.name,
                vm.name
            ),
            (None, false, state) => format!("{} on {host}", state.as_str()),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::tests::{three_hosts, vm_on};
    use crate::lease::{Echo, issue_stamp, on_heartbeat};

    #[test]
    fn a_vm_down_with_its_host_is_restarted_when_the_host_comes_back_and_shows_it_off() {
        let mut s = three_hosts();
        s.hosts.get_mut("kvm1").unwrap().self_fenced = true;
        let mut vm = vm_on(&mut s, "a", "dns1", "kvm1");
        vm.protected = true;
        // Its host came back; a report from before its agent self-fenced cancelled the
        // restart; this one shows the VM off.
        vm.state = RunState::ShutOff;
        s.vms.insert("a".into(), vm);
        let change = InventoryChange::StateChanged {
            uuid: "a".into(),
            name: "dns1".into(),
            host: "kvm1".into(),
            from: RunState::Lost,
            to: RunState::ShutOff,
            unwatched: false,
        };
        let out = after_report(&mut s, "kvm1", &[change], Millis(1_000));
        assert!(s.vms["a"].recovery.is_some(), "dns1 is to be restarted: {out:?}");
    }

    #[test]
    fn a_restart_waits_for_the_vms_own_host_until_this_leader_has_heard_of_it_there() {
        let mut s = three_hosts();
        for h in s.hosts.values_mut() {
            h.reported_at = Some(Millis(10_000));
        }
        // A takeover: the VM's state is unknown, and its own host has not reported since.
        s.hosts.get_mut("kvm1").unwrap().reported_at = None;
        let mut vm = vm_on(&mut s, "a", "dns1", "kvm1");
        vm.state = RunState::Unknown;
        assert_eq!(not_reported_since(&s, &vm, Millis(5_000)).as_deref(), Some("kvm1"));
        // Its host reported it stopped: only the others count then.
        vm.state = RunState::ShutOff;
        assert_eq!(not_reported_since(&s, &vm, Millis(5_000)), None);
        // A dead host is waited for by nobody.
        vm.state = RunState::Unknown;
        s.hosts.get_mut("kvm1").unwrap().dead =
            Some(crate::cluster::Death { at: Millis(9_000), cause: "silent".into() });
        assert_eq!(not_reported_since(&s, &vm, Millis(5_000)), None);
    }

    #[test]
    fn a_protected_vm_off_on_a_live_host_says_why_it_is_not_restarted() {
        let mut s = three_hosts();
        s.hosts.get_mut("kvm1").unwrap().lease.granted_at = Some(Millis(0));
        let mut vm = vm_on(&mut s, "a", "dns1", "kvm1");
        vm.protected = true;
        vm.state = RunState::ShutOff;
        s.vms.insert("a".into(), vm);
        let why = explain(&s, "a", Millis(1)).unwrap();
        assert!(why.starts_with("shut_off on kvm1, a live host, so it is not restarted"), "{why}");
        assert!(why.contains("`vmha vm start dns1` starts it"), "{why}");
        s.vms.get_mut("a").unwrap().busy_with = Some("op-1".into());
        assert_eq!(explain(&s, "a", Millis(1)).unwrap(), "shut_off on kvm1, busy with operation op-1");
        // Stopped on purpose: said so, whatever its host's state.
        let vm = s.vms.get_mut("a").unwrap();
        (vm.busy_with, vm.stopped_by) = (None, Some("alice".into()));
        let why = explain(&s, "a", Millis(1)).unwrap();
        assert!(why.contains("stopped by alice with `vmha vm stop`"), "{why}");
    }

    #[test]
    fn a_failback_that_waits_says_why() {
        let mut s = three_hosts();
        for h in s.hosts.values_mut() {
            h.lease.granted_at = Some(Millis(0));
            h.lease.held_since = Some(Millis(0));
        }
        let mut vm = vm_on(&mut s, "a", "dns1", "kvm2");
        vm.preferred_host = Some("kvm1".into());
        s.vms.insert("a".into(), vm.clone());
        let why = |s: &ClusterState, busy, now| {
            failback(s, &std::cell::OnceCell::new(), &vm, busy, Millis(now))
                .map(|r| r.map_err(|e| e.to_string()))
        };
        assert_eq!(
            why(&s, None, 1),
            Some(Err(
                "away from its preferred host kvm1: failback is off (the controller's --failback-after)"
                    .into()
            ))
        );
        s.policy.failback_after_ms = Some(60_000);
        let renewed = |s: &mut ClusterState, at: u64| {
            s.hosts.get_mut("kvm1").unwrap().lease.granted_at = Some(Millis(at))
        };
        renewed(&mut s, 29_500);
        assert_eq!(
            why(&s, None, 30_000),
            Some(Err(
                "its preferred host kvm1 has held a lease for 30.0 s of the 60.0 s failback waits for".into()
            ))
        );
        renewed(&mut s, 59_500);
        assert!(
            why(&s, Some("op-7"), 60_000).unwrap().unwrap_err().starts_with("operation op-7 is in flight")
        );
        assert_eq!(why(&s, None, 60_000), Some(Ok("kvm1".into())));
    }

    /// The roster version every answer of these tests brings, and which lists the VMs
    /// `cluster` protects.
    const ROSTER: u64 = 1;

    /// Every host heartbeats at `t` (echoing its previous answer promptly).
    fn beat(s: &mut ClusterState, hosts: &[&str], t: Millis) {
        for h in hosts {
            let last = s.hosts[*h].lease.issued.back().map(|i| i.stamp);
            let stamp = last.unwrap_or_else(|| issue_stamp(s, h, Millis(t.0.saturating_sub(10))));
            let answer = on_heartbeat(
                s,
                h,
                Some(Echo { epoch: 0, stamp, held_ms: t.0.saturating_sub(stamp.0).saturating_sub(5) }),
                ROSTER,
                t,
                t,
            );
            // A heartbeat with its domains, as `Engine::step` records it.
            if matches!(answer, crate::lease::LeaseAnswer::Granted { .. }) {
                s.hosts.get_mut(*h).unwrap().reported_at = Some(t);
            }
        }
    }

    fn cluster() -> ClusterState {
        let mut s = three_hosts();
        for (u, n, h, p) in
            [("a", "dns1", "kvm1", 100), ("b", "radius1", "kvm1", 50), ("c", "dns2", "kvm2", 100)]
        {
            let mut vm = vm_on(&mut s, u, n, h);
            vm.protected = true;
            vm.protected_in = Some(ROSTER);
            vm.priority = p;
            s.vms.insert(u.into(), vm);
        }
        s
    }

    fn starts(actions: &[Action]) -> Vec<(String, String)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Start { vm_name, host, .. } => Some((vm_name.clone(), host.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_silent_host_is_declared_dead_after_lease_and_margin_under_quorum_and_its_vms_restart_by_priority() {
        let mut s = cluster();
        let mut t = 0;
        while t <= 10_000 {
            beat(&mut s, &["kvm1", "kvm2", "kvm3"], Millis(t));
            assert!(tick(&mut s, Millis(t)).is_empty());
            t += 1_000;
        }
        // kvm1 falls silent after its heartbeat at 10 s: lease to 15 s, dead at 16 s.
        while t < 16_000 {
            beat(&mut s, &["kvm2", "kvm3"], Millis(t));
            let a = tick(&mut s, Millis(t));
            assert!(a.is_empty(), "at {t}: {a:?}");
            t += 500;
        }
        beat(&mut s, &["kvm2", "kvm3"], Millis(16_000));
        let a = tick(&mut s, Millis(16_000));
        assert!(matches!(&a[0], Action::DeclaredDead { host, .. } if host == "kvm1"), "{a:?}");
        let st = starts(&a);
        assert_eq!(
            st.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            ["dns1", "radius1"],
            "priority order"
        );
        assert_eq!(s.vms["a"].state, RunState::Lost);
        assert!(explain(&s, "a", Millis(16_000)).unwrap().starts_with("restarting on"));
        let ev = start_finished(&mut s, "a", &st[0].1, Ok(()), Millis(16_500));
        assert!(
            matches!(&ev[..], [Action::Outage(OutageMark::Ended { vm_uuid }), Action::Event(Event { kind: EventKind::VmRestarted, .. })] if vm_uuid == "a"),
            "its outage ends: {ev:?}"
        );
        assert_eq!(
            (s.vms["a"].host.as_deref(), s.vms["a"].state),
            (Some(st[0].1.as_str()), RunState::Running)
        );
    }

    #[test]
    fn without_quorum_nothing_is_declared_dead() {
        let mut s = cluster();
        beat(&mut s, &["kvm1", "kvm2", "kvm3"], Millis(0));
        beat(&mut s, &["kvm1", "kvm2", "kvm3"], Millis(1_000));
        // Only kvm2 keeps renewing: 1 host + control plane = 2 of 4.
        for t in (2_000..60_000).step_by(500) {
            beat(&mut s, &["kvm2"], Millis(t));
            let a = tick(&mut s, Millis(t));
            assert!(a.iter().all(|a| !matches!(a, Action::DeclaredDead { .. })), "at {t}: {a:?}");
        }
        let why = explain(&s, "a", Millis(60_000)).unwrap();
        assert!(why.contains("has not held quorum"), "{why}");
    }

    #[test]
    fn a_new_leader_waits_a_full_lease_and_margin_before_declaring_anyone() {
        let mut s = cluster();
        s.started = Millis(0);
        // kvm1 answers this leader never: what it counts votes among is known from the database.
        let members = crate::lease::membership(&s);
        s.hosts.get_mut("kvm1").unwrap().lease.acked_members = Some((Millis(0), members));
        // Quorum forms at 500 ms, once both hosts have acknowledged a lease.
        for t in (0..6_500).step_by(250) {
            beat(&mut s, &["kvm2", "kvm3"], Millis(t));
            assert!(tick(&mut s, Millis(t)).is_empty(), "at {t}");
        }
        beat(&mut s, &["kvm2", "kvm3"], Millis(6_500));
        let a = tick(&mut s, Millis(6_500));
        assert!(matches!(&a[0], Action::DeclaredDead { host, .. } if host == "kvm1"), "{a:?}");
    }

    #[test]
    fn manual_and_external_hosts_wait_for_confirmation() {
        let mut s = cluster();
        s.hosts.get_mut("kvm1").unwrap().fencing = FencingMode::Manual;
        s.hosts.get_mut("kvm2").unwrap().fencing = FencingMode::External;
        // A fourth host, so that kvm3 and kvm4 give the controller quorum (3 of 5 votes).
        let mut kvm4 = s.hosts["kvm3"].clone();
        kvm4.name = "kvm4".into();
        s.hosts.insert("kvm4".into(), kvm4);
        let mut a = Vec::new();
        for t in (0..20_000).step_by(500) {
            beat(&mut s, &["kvm3", "kvm4"], Millis(t));
            a.extend(tick(&mut s, Millis(t)));
        }
        assert!(
            a.iter().any(|a| matches!(a, Action::Event(Event { kind: EventKind::ConfirmDownNeeded, .. })))
        );
        assert!(a.iter().any(|a| matches!(a, Action::Fence { host } if host == "kvm2")));
        assert!(a.iter().all(|a| !matches!(a, Action::DeclaredDead { .. })), "{a:?}");
        let f = fence_finished(&mut s, "kvm2", Err("ipmitool: timeout".into()), Millis(20_000));
        assert!(
            matches!(&f[0], Action::Event(Event { kind: EventKind::FenceFailed, message, .. }) if message.contains("confirm-down kvm2"))
        );
        let f = fence_finished(&mut s, "kvm2", Ok("off".into()), Millis(20_000));
        assert!(matches!(&f[0], Action::DeclaredDead { .. }));
        assert_eq!(starts(&f).len(), 1, "{f:?}");
        let c = confirm_down(&mut s, "kvm1", Millis(20_000)).unwrap();
        assert!(matches!(&c[0], Action::DeclaredDead { cause, .. } if cause.contains("operator")));
        assert_eq!(confirm_down(&mut s, "kvm3", Millis(20_000)), Err(Refusal::HostOnline("kvm3".into())));
        assert_eq!(confirm_down(&mut s, "kvm9", Millis(20_000)), Err(Refusal::UnknownHost("kvm9".into())));
    }

    #[test]
    fn no_room_waits_with_the_reason_and_failed_starts_move_on_then_give_up() {
        let mut s = cluster();
        s.policy.max_relocate = 1;
        beat(&mut s, &["kvm1", "kvm2", "kvm3"], Millis(0));
        beat(&mut s, &["kvm2", "kvm3"], Millis(5_500));
        s.hosts.get_mut("kvm3").unwrap().resources.memory_free_kib = 100 << 10;
        let mut a = confirm_down(&mut s, "kvm1", Millis(5_500)).unwrap();
        // dns1 and radius1 need 64 MiB each; kvm2 has room for both, kvm3 for one.
        assert_eq!(starts(&a).len(), 2);
        a = start_finished(&mut s, "a", "kvm2", Err("qemu: no KVM".into()), Millis(2));
        assert_eq!(starts(&a), [("dns1".to_string(), "kvm3".to_string())]);
        a = start_finished(&mut s, "a", "kvm3", Err("qemu: no KVM".into()), Millis(3));
        assert!(matches!(&a[0], Action::Event(Event { kind: EventKind::RestartFailed, .. })), "{a:?}");
        assert!(explain(&s, "a", Millis(3)).unwrap().contains("2 attempts failed"));
    }

    /// kvm1 confirmed down at 5.5 s while it still runs dns1: the restart's start is refused
    /// on dns1's disk lock at 5.6 s. Returns what that refusal did.
    fn refused_on_the_lock(s: &mut ClusterState) -> Vec<Action> {
        beat(s, &["kvm1", "kvm2", "kvm3"], Millis(0));
        beat(s, &["kvm2", "kvm3"], Millis(5_500));
        let a = confirm_down(s, "kvm1", Millis(5_500)).unwrap();
        let (_, target) = starts(&a).into_iter().find(|(n, _)| n == "dns1").unwrap();
        let locked = "internal error: qemu unexpectedly closed the monitor: Failed to get \"write\" lock\nIs another \
                      process using the image [/srv/images/dns1.qcow2]?";
        start_finished(s, "a", &target, Err(locked.into()), Millis(5_600))
    }

    #[test]
    fn a_locked_disk_is_an_alarm_tried_again_later_never_elsewhere() {
        let mut s = cluster();
        let a = refused_on_the_lock(&mut s);
        assert!(
            matches!(&a[..], [Action::Event(Event { kind: EventKind::DiskLocked, message, .. })] if message.contains("last seen on kvm1")),
            "an alarm, and no start elsewhere: {a:?}"
        );
        assert_eq!(
            explain(&s, "a", Millis(5_600)).unwrap(),
            "disk locked: another copy may run (last seen on kvm1)"
        );
        let a = tick(&mut s, Millis(15_500));
        assert!(starts(&a).iter().all(|(n, _)| n != "dns1"), "not before the retry: {a:?}");
        beat(&mut s, &["kvm2", "kvm3"], Millis(15_600));
        let a = tick(&mut s, Millis(15_600));
        let (_, again) = starts(&a).into_iter().find(|(n, _)| n == "dns1").expect("tried again after 10 s");
        // Still locked: no second alarm, no giving up.
        let a = start_finished(
            &mut s,
            "a",
            &again,
            Err("resource busy: Lockspace resource '/x' is locked".into()),
            Millis(15_700),
        );
        assert!(a.is_empty(), "{a:?}");
        beat(&mut s, &["kvm2", "kvm3"], Millis(25_700));
        let a = tick(&mut s, Millis(25_700));
        let (_, last) = starts(&a).into_iter().find(|(n, _)| n == "dns1").unwrap();
        let a = start_finished(&mut s, "a", &last, Ok(()), Millis(25_800));
        assert!(
            matches!(&a[..], [Action::Outage(_), Action::Event(Event { kind: EventKind::VmRestarted, message, .. })] if message.contains("lock is gone"))
        );
        assert!(!is_disk_locked("qemu: no KVM"));
    }

    fn running(uuid: &str, name: &str) -> ReportedDomain {
        ReportedDomain {
            uuid: uuid.into(),
            name: name.into(),
            state: RunState::Running,
            memory_kib: 65_536,
            vcpus: 1,
            guest: None,
            probes: Vec::new(),
        }
    }

    #[test]
    fn the_lock_holder_reporting_its_copy_gone_brings_the_retry_forward() {
        let mut s = cluster();
        refused_on_the_lock(&mut s);
        let retry_at =
            |s: &ClusterState| s.vms["a"].recovery.as_ref().unwrap().disk_locked.as_ref().unwrap().retry_at;
        // Another host's report, or kvm1 still running it, changes nothing.
        assert!(lock_holder_reported(&mut s, "kvm2", &[], Millis(6_000)).is_empty());
        assert!(lock_holder_reported(&mut s, "kvm1", &[running("a", "dns1")], Millis(6_000)).is_empty());
        assert_eq!(retry_at(&s), Millis(15_600));
        // kvm1 reports dns1 shut off: its copy is gone, and so is the lock.
        let stopped = ReportedDomain { state: RunState::ShutOff, ..running("a", "dns1") };
        assert_eq!(lock_holder_reported(&mut s, "kvm1", &[stopped], Millis(7_000)), ["a"]);
        assert_eq!(retry_at(&s), Millis(7_000));
        beat(&mut s, &["kvm2", "kvm3"], Millis(7_000));
        let a = tick(&mut s, Millis(7_000));
        assert!(starts(&a).iter().any(|(n, _)| n == "dns1"), "tried at once, not at 15.6 s: {a:?}");
    }

    #[test]
    fn a_returning_host_destroys_copies_restarted_elsewhere_and_keeps_the_rest() {
        let mut s = cluster();
        beat(&mut s, &["kvm1", "kvm2", "kvm3"], Millis(0));
        beat(&mut s, &["kvm2", "kvm3"], Millis(5_500));
        s.hosts.get_mut("kvm2").unwrap().resources.memory_free_kib = 0;
        s.hosts.get_mut("kvm3").unwrap().resources.memory_free_kib = 100 << 10;
        let a = confirm_down(&mut s, "kvm1", Millis(5_500)).unwrap();
        assert_eq!(starts(&a), [("dns1".to_string(), "kvm3".to_string())], "radius1 has no room: {a:?}");
        start_finished(&mut s, "a", "kvm3", Ok(()), Millis(2));
        let (a, stale) =
            on_report(&mut s, "kvm1", &[running("a", "dns1"), running("b", "radius1")], Millis(5_600));
        beat(&mut s, &["kvm1"], Millis(5_600));
        assert_eq!(stale, ["a"]);
        assert!(a.iter().any(
            |x| matches!(x, Action::DestroyStale { vm_name, host, .. } if vm_name == "dns1" && host == "kvm1")
        ));
        assert!(
            a.iter().any(|x| matches!(x, Action::Event(Event { kind: EventKind::RestartCancelled, .. })))
        );
        assert_eq!(s.vms["b"].recovery, None);
        assert_eq!(s.liveness("kvm1", Millis(5_600)), HostLiveness::Online);
    }

    #[test]
    fn failback_moves_a_vm_home_once_its_host_has_been_healthy_for_a_while() {
        let mut s = cluster();
        s.policy.failback_after_ms = Some(10_000);
        let vm = s.vms.get_mut("a").unwrap();
        vm.preferred_host = Some("kvm3".into());
        let mut a = Vec::new();
        for t in (0..9_000).step_by(500) {
            beat(&mut s, &["kvm1", "kvm2", "kvm3"], Millis(t));
            a.extend(tick(&mut s, Millis(t)));
        }
        assert!(a.is_empty(), "{a:?}");
        for t in (9_000..=11_000).step_by(500) {
            beat(&mut s, &["kvm1", "kvm2", "kvm3"], Millis(t));
            a.extend(tick(&mut s, Millis(t)));
        }
        assert!(
            matches!(&a[..], [Action::Migrate { vm_name, host, purpose: Purpose::Failback, .. }, ..] if vm_name == "dns1" && host == "kvm3"),
            "{a:?}"
        );
        s.policy.failback_after_ms = None;
        assert!(tick(&mut s, Millis(11_500)).is_empty(), "off by default");
    }

    #[test]
    fn a_protected_vm_that_stops_on_a_live_host_is_restarted_unless_vmha_is_moving_it() {
        let mut s = cluster();
        beat(&mut s, &["kvm1", "kvm2", "kvm3"], Millis(0));
        let stopped = |u: &str| InventoryChange::StateChanged {
            uuid: u.into(),
            name: "x".into(),
            host: "kvm1".into(),
            from: RunState::Running,
            to: RunState::ShutOff,
            unwatched: false,
        };
        s.vms.get_mut("b").unwrap().busy_with = Some("op".into());
        // As the report applied them.
        for u in ["a", "b"] {
            s.vms.get_mut(u).unwrap().state = RunState::ShutOff;
        }
        let a = after_report(&mut s, "kvm1", &[stopped("a"), stopped("b")], Millis(10));
        assert!(a.iter().any(|x| matches!(x, Action::Event(Event { kind: EventKind::VmStopped, .. }))));
        assert!(s.vms["b"].recovery.is_none(), "a VM being migrated is not restarted");
        assert!(starts(&a).is_empty(), "not before the other hosts reported it does not run there: {a:?}");
        assert!(
            explain(&s, "a", Millis(10)).unwrap().contains("may have been moved"),
            "{:?}",
            explain(&s, "a", Millis(10))
        );
        let heard = Millis(10 + s.timings.max_transit_ms);
        for h in ["kvm2", "kvm3"] {
            s.hosts.get_mut(h).unwrap().reported_at = Some(heard);
        }
        let a = tick(&mut s, heard);
        assert_eq!(starts(&a).len(), 1, "{a:?}");
    }
}
