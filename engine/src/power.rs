//! The operator's `vmha vm start` and `vmha vm stop`. A start follows the rule a restart
//! follows: it goes ahead only where no copy of the VM may run anywhere, and then through the
//! restart machinery (`recovery`), with its placement checks and its wait for hosts that may
//! have moved the VM. A stop shuts the VM down and marks it stopped on purpose, so that vmha
//! does not start it again, protected or not, until an operator does.

use crate::cluster::Recovery;
use crate::{ClusterState, HostLiveness, Millis, Refusal, RunState, placement};

/// What a stop takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stop {
    /// It runs on `host`: a shutdown operation there.
    Shutdown { uuid: String, host: String },
    /// Nothing runs: it is only marked stopped (`why` says what was so).
    AlreadyOff { uuid: String, why: String },
}

/// Checks a stop of `vm` and marks it stopped by `actor`. Refused while an operation owns it
/// or a restart is in flight (the start may still happen), or while its host cannot be
/// reached (the shutdown could not be sent).
pub fn stop(state: &mut ClusterState, key: &str, actor: &str, now: Millis) -> Result<Stop, Refusal> {
    let vm = state.find_vm(key)?;
    let (uuid, name) = (vm.uuid.clone(), vm.name.clone());
    if let Some(op) = &vm.busy_with {
        return Err(Refusal::Busy { vm: name, operation: op.clone() });
    }
    let refuse = |why: String| Refusal::CannotStop { vm: name.clone(), why };
    let stop = match (&vm.recovery, vm.host.as_deref()) {
        (Some(r), _) if r.starting_on.is_some() => {
            let on = r.starting_on.clone().unwrap_or_default();
            return Err(refuse(format!(
                "a restart on {on} is in flight and may still happen; stop it once it runs there"
            )));
        }
        (Some(_), _) => Stop::AlreadyOff { uuid: uuid.clone(), why: "its restart is cancelled".into() },
        (None, Some(host)) if vm.state.has_process() || vm.state == RunState::Unknown => {
            let liveness = state.liveness(host, now);
            if liveness != HostLiveness::Online {
                return Err(Refusal::HostDown { host: host.into(), liveness: liveness.as_str() });
            }
            if vm.state == RunState::Unknown {
                return Err(refuse(format!("{host} has not reported it yet; retry in a moment")));
            }
            Stop::Shutdown { uuid: uuid.clone(), host: host.into() }
        }
        (None, _) => {
            Stop::AlreadyOff { uuid: uuid.clone(), why: format!("it is {} already", vm.state.as_str()) }
        }
    };
    let vm = state.vms.get_mut(&uuid).expect("found above");
    vm.recovery = None;
    vm.stopped_by = Some(actor.into());
    if let Stop::Shutdown { host, .. } = &stop {
        vm.busy_with = Some(format!("shutdown on {host}"));
    }
    Ok(stop)
}

/// Checks a start of `vm` (on `on`, or its own host if that is up, or where placement says)
/// and queues it as a restart. The start goes out from the restart queue: after the hosts that
/// may have moved it have reported, within the limit of starts in flight.
pub fn start(
    state: &mut ClusterState,
    key: &str,
    on: Option<String>,
    now: Millis,
) -> Result<String, Refusal> {
    let vm = state.find_vm(key)?;
    let (uuid, name) = (vm.uuid.clone(), vm.name.clone());
    if let Some(op) = &vm.busy_with {
        return Err(Refusal::Busy { vm: name, operation: op.clone() });
    }
    let refuse = |why: String| Refusal::CannotStart { vm: name.clone(), why };
    match &vm.recovery {
        Some(r) if r.starting_on.is_some() => {
            return Err(refuse(format!(
                "a start on {} is in flight already",
                r.starting_on.as_deref().unwrap_or_default()
            )));
        }
        // Queued (a restart after its host died, or a start asked for before): it goes out by
        // itself. Only a restart that gave up needs the operator.
        Some(r) if r.error.is_none() => {
            return Err(refuse(format!(
                "its start is queued already ({}); `vmha vm show {name}` follows it",
                r.waiting.as_deref().unwrap_or("it goes out in a moment")
            )));
        }
        _ => {}
    }
    if let Some(h) = on.as_deref() {
        if !state.hosts.contains_key(h) {
            return Err(Refusal::UnknownHost(h.into()));
        }
        if let Some(why) = placement::why_not(state, &placement::Usage::of(state), vm, h, now) {
            return Err(refuse(format!("the host asked for cannot take it ({why})")));
        }
    }
    let target = match vm.host.as_deref() {
        Some(host) if vm.state.has_process() => {
            return Err(Refusal::AlreadyOnTarget { vm: name, host: host.into() });
        }
        Some(host) => {
            match (state.liveness(host, now), state.hosts.get(host).and_then(|h| h.dead.as_ref())) {
                // Its host says it is not running: it may start there or anywhere else.
                (HostLiveness::Online, _) if vm.state != RunState::Unknown => {
                    on.or_else(|| Some(host.to_string()))
                }
                (HostLiveness::Online, _) => {
                    return Err(refuse(format!("{host} has not reported it yet; retry in a moment")));
                }
                // Dead: off for sure, or its agent's self-fence destroyed every copy of it (it knew
                // the VM was protected), as for a restart.
                (_, Some(death)) if death.proves_off() || vm.fenced_by(state.hosts[host].roster_acked) => on,
                (_, Some(_)) => {
                    return Err(refuse(format!(
                        "{host} was declared dead on its lease, and its agent destroys only the VMs it knew were \
                     protected, so {name} may still run there. Once you know {host} is off, run `vmha host \
                     confirm-down {host}`, then start it"
                    )));
                }
                (liveness, None) => {
                    return Err(refuse(format!(
                        "its host {host} is {} and not declared dead, so a copy may still run there; wait until vmha \
                     declares it dead, or confirm it is off with `vmha host confirm-down {host}`",
                        liveness.as_str()
                    )));
                }
            }
        }
        // No host lists it (undefined, or moved behind vmha's back): it starts once every live
        // host has reported without it running.
        None => on,
    };
    let vm = state.vms.get_mut(&uuid).expect("found above");
    vm.stopped_by = None;
    vm.recovery = Some(Recovery { on: target, may_have_moved_since: Some(now), ..Recovery::new(now) });
    Ok(uuid)
}

/// For `explain`: a VM stopped with `vmha vm stop`.
pub fn stopped_on_purpose(name: &str, by: &str) -> String {
    format!("stopped by {by} with `vmha vm stop`: vmha leaves it off until `vmha vm start {name}`")
}

/// The event of a start an operator asked for.
pub fn start_message(state: &ClusterState, uuid: &str) -> String {
    let Some(vm) = state.vms.get(uuid) else { return String::new() };
    let on = vm.recovery.as_ref().and_then(|r| r.on.as_deref());
    format!(
        "start of {} asked for, {}; it goes out once no host may still run a copy",
        vm.name,
        on.map_or("where placement finds room".to_string(), |h| format!("on {h}")),
    )
}
