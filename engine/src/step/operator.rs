//! Operators' requests.

use super::{Command, CommandKind, Engine, Output, Reply, Request, Unconfirmed, VmWork};
use crate::action::Action;
use crate::event::{Event, EventKind};
use crate::operation::{OpId, OpKind, OpState, Overrides, Purpose};
use crate::recovery;
use crate::{ClusterState, HostLiveness, Millis, Refusal, admission, drain, lease, migration, power};

impl Engine {
    pub(super) fn operator(
        &mut self,
        actor: &str,
        request: Request,
        now: Millis,
        out: &mut Output,
        actions: &mut Vec<Action>,
    ) -> Result<Reply, Refusal> {
        let s = &mut self.cluster;
        let unknown_host = |s: &ClusterState, h: &str| -> Result<(), Refusal> {
            if s.hosts.contains_key(h) { Ok(()) } else { Err(Refusal::UnknownHost(h.into())) }
        };
        match request {
            Request::Protection {
                vm,
                protected,
                priority,
                anti_affinity,
                allowed_hosts,
                preferred_host,
                force,
            } => {
                let uuid = s.find_vm(&vm)?.uuid.clone();
                for h in allowed_hosts.iter().flatten().chain(preferred_host.iter().filter(|p| !p.is_empty()))
                {
                    unknown_host(s, h)?;
                }
                let Some(vm) = s.vms.get_mut(&uuid) else { return Err(Refusal::UnknownVm(uuid)) };
                let (before, since_before) = (VmWork::of(vm), vm.protected_since);
                if protected && !vm.protected {
                    vm.protected_since = now;
                }
                if !protected || !vm.protected {
                    // Listed by the next roster built (`RosterBook::current`).
                    vm.protected_in = None;
                }
                vm.protected = protected;
                if let Some(p) = priority {
                    vm.priority = p;
                }
                if let Some(g) = anti_affinity {
                    vm.anti_affinity = (!g.is_empty()).then_some(g);
                }
                if let Some(a) = allowed_hosts {
                    vm.allowed_hosts = a;
                }
                if let Some(p) = preferred_host {
                    vm.preferred_host = (!p.is_empty()).then_some(p);
                }
                if !vm.protected {
                    vm.recovery = None;
                }
                let admitted = if protected { admission::admit(s, &uuid, now) } else { Ok(()) };
                let vm = s.vms.get_mut(&uuid).expect("found above");
                match admitted {
                    Ok(()) => vm.admission_override = None,
                    Err(why) if force => vm.admission_override = Some(format!("{actor}: {why}")),
                    Err(short) => {
                        let why = short.to_string();
                        // Nothing changes: the settings go back as they were.
                        before.apply_to(vm);
                        vm.protected_since = since_before;
                        return Err(Refusal::BeyondReserve { vm: vm.name.clone(), why });
                    }
                }
                if VmWork::of(vm) != before {
                    out.events.push(protection_event(vm).by(actor));
                }
                Ok(Reply::Vm(uuid))
            }
            Request::Migrate { vm, to, overrides } => {
                let plan = migration::plan_migration(s, &vm, &to, now)?;
                let id = self.begin_migration(
                    &plan.vm_uuid,
                    &plan.target,
                    Purpose::Operator,
                    actor,
                    overrides,
                    now,
                    out,
                );
                Ok(Reply::Operation(id))
            }
            Request::Drain { host, allow_restart } => {
                actions.extend(drain::start(s, &host, allow_restart, now)?);
                Ok(Reply::Host(host))
            }
            Request::Undrain { host, abort } => {
                actions.extend(drain::undrain(s, &host)?);
                if abort {
                    let moving: Vec<OpId> = (self.ops.values())
                        .filter(|op| {
                            op.kind == OpKind::Migrate && op.purpose == Purpose::Drain && op.source == host
                        })
                        .filter(|op| op.state == OpState::Running)
                        .map(|op| op.id)
                        .collect();
                    for id in moving {
                        self.cancel(id, actor, out)?;
                    }
                }
                Ok(Reply::Host(host))
            }
            Request::Cancel { op, vm } => {
                let id = match (op, vm) {
                    (Some(id), _) => id,
                    (None, Some(vm)) => {
                        let uuid = s.find_vm(&vm)?.uuid.clone();
                        (self.ops.values())
                            .find(|op| op.kind == OpKind::Migrate && op.vm_uuid == uuid)
                            .map(|op| op.id)
                            .ok_or(Refusal::NothingToCancel(vm))?
                    }
                    (None, None) => return Err(Refusal::NothingToCancel(String::new())),
                };
                self.cancel(id, actor, out)?;
                Ok(Reply::Operation(id))
            }
            Request::ConfirmDown { host } => {
                let a = recovery::confirm_down(s, &host, now)?;
                out.events.push(
                    Event::host(
                        &host,
                        EventKind::ConfirmedDown,
                        format!("an operator confirmed {host} is off"),
                    )
                    .by(actor),
                );
                actions.extend(a);
                Ok(Reply::Host(host))
            }
            Request::SetFencing { host, mode } => {
                let Some(h) = s.hosts.get_mut(&host) else { return Err(Refusal::UnknownHost(host)) };
                h.fencing = mode.clone();
                out.events.push(
                    Event::host(
                        &host,
                        EventKind::FencingSet,
                        format!("{host}'s fencing mode is now {}", mode.as_str()),
                    )
                    .by(actor),
                );
                Ok(Reply::Host(host))
            }
            Request::SetMemoryLimit { host, limit_kib } => {
                let Some(h) = s.hosts.get_mut(&host) else { return Err(Refusal::UnknownHost(host)) };
                h.memory_limit_kib = limit_kib;
                let message = match limit_kib {
                    Some(l) => format!("vmha places at most {} MiB of VMs on {host}", l / 1024),
                    None => format!("no memory cap on {host} beyond what it has free"),
                };
                out.events.push(Event::host(&host, EventKind::MemoryLimit, message).by(actor));
                Ok(Reply::Host(host))
            }
            Request::SetProbes { vm, probes } => {
                let uuid = s.find_vm(&vm)?.uuid.clone();
                let v = s.vms.get_mut(&uuid).expect("found above");
                crate::service_probe::check_all(&probes)
                    .map_err(|why| Refusal::BadProbes { vm: v.name.clone(), why })?;
                let message = match &probes[..] {
                    [] => format!("{} has no service probes now", v.name),
                    ps => format!(
                        "{}'s service probes: {}{}",
                        v.name,
                        ps.iter().map(|p| p.describe()).collect::<Vec<_>>().join("; "),
                        if v.protected { "" } else { " (run once it is protected)" }
                    ),
                };
                v.probes = probes;
                out.events.push(Event::vm(&v.name, EventKind::ProbesSet, message).by(actor));
                Ok(Reply::Vm(uuid))
            }
            Request::StopVm { vm, timeout_ms } => match power::stop(s, &vm, actor, now)? {
                power::Stop::Shutdown { uuid, host } => {
                    let overrides = Some(Overrides { bandwidth_mib_s: 0, timeout_ms });
                    let id = self.begin(
                        OpKind::Shutdown,
                        Purpose::Operator,
                        &uuid,
                        &host,
                        &host,
                        actor,
                        overrides,
                        now,
                        out,
                    );
                    Ok(Reply::Operation(id))
                }
                power::Stop::AlreadyOff { uuid, why } => {
                    let name = &s.vms[&uuid].name;
                    let message = format!(
                        "{name} is stopped on purpose ({why}): {}",
                        power::stopped_on_purpose(name, actor)
                    );
                    out.events.push(Event::vm(name, EventKind::VmStoppedByOperator, message).by(actor));
                    Ok(Reply::Vm(uuid))
                }
            },
            Request::StartVm { vm, on } => {
                let uuid = power::start(s, &vm, on, now)?;
                let message = power::start_message(s, &uuid);
                out.events
                    .push(Event::vm(&s.vms[&uuid].name, EventKind::VmStartRequested, message).by(actor));
                recovery::schedule_restarts(s, now, actions);
                Ok(Reply::Vm(uuid))
            }
            Request::RemoveHost { host } => {
                self.remove_host(&host, now)?;
                out.persist.removed_hosts.push(host.clone());
                let message = format!(
                    "{host} was removed from the cluster; its agent would register it again, as a new host"
                );
                out.events.push(Event::host(&host, EventKind::HostRemoved, message).by(actor));
                Ok(Reply::None)
            }
        }
    }

    /// Asks the source of live migration `id` to abort it. It ends when its agent's result
    /// (or reports, past its deadline) says so: cancelled, or succeeded if it ended first.
    pub(super) fn cancel(&mut self, id: OpId, actor: &str, out: &mut Output) -> Result<(), Refusal> {
        let op = self.ops.get_mut(&id).ok_or_else(|| Refusal::UnknownOperation(id.to_string()))?;
        let what = op.describe();
        if op.kind != OpKind::Migrate {
            return Err(Refusal::CannotCancel {
                what,
                why: "only a live migration can be cancelled; a start or a stop runs to its end".into(),
            });
        }
        if op.state == OpState::Recording {
            return Err(Refusal::CannotCancel {
                what,
                why: "it is being recorded and not sent yet; retry in a moment".into(),
            });
        }
        if op.cancelled_by.is_some() {
            return Ok(());
        }
        op.cancelled_by = Some(actor.into());
        out.commands.push(Command {
            op: id,
            host: op.source.clone(),
            vm: op.vm_name.clone(),
            kind: CommandKind::Cancel { uuid: op.vm_uuid.clone() },
        });
        let message =
            format!("cancel of the {what} asked for; it stays on {} unless it has just ended", op.source);
        out.events.push(Event::vm(&op.vm_name, EventKind::MigrationCancelRequested, message).by(actor));
        Ok(())
    }

    /// Forgets a retired host. Only one that holds no lease (it cannot be counted for quorum or
    /// run anything vmha knows of), is the place of no VM and takes part in no operation: its
    /// removal then changes nothing but the count of hosts a majority is taken of.
    pub(super) fn remove_host(&mut self, host: &str, now: Millis) -> Result<(), Refusal> {
        let s = &mut self.cluster;
        if !s.hosts.contains_key(host) {
            return Err(Refusal::UnknownHost(host.into()));
        }
        if s.liveness(host, now) == HostLiveness::Online {
            return Err(Refusal::HostOnline(host.into()));
        }
        let vms: Vec<&str> =
            s.vms.values().filter(|v| v.host.as_deref() == Some(host)).map(|v| v.name.as_str()).collect();
        if !vms.is_empty() {
            return Err(Refusal::HostInUse { host: host.into(), what: format!("VMs: {}", vms.join(", ")) });
        }
        if let Some(op) = self.ops.values().find(|o| o.source == host || o.target == host) {
            return Err(Refusal::HostInUse {
                host: host.into(),
                what: format!("operation {} in flight", op.id),
            });
        }
        s.hosts.remove(host);
        lease::forget_membership(s);
        self.saved_hosts.remove(host);
        Ok(())
    }
}

fn protection_event(vm: &crate::VmView) -> Event {
    if vm.protected {
        let mut m = format!("{} is protected with priority {} (higher restarts first)", vm.name, vm.priority);
        if let Some(g) = &vm.anti_affinity {
            m += &format!(", anti-affinity group {g}");
        }
        if !vm.allowed_hosts.is_empty() {
            m += &format!(", only on {}", vm.allowed_hosts.join(","));
        }
        if let Some(p) = &vm.preferred_host {
            m += &format!(", prefers {p}");
        }
        if let Some(o) = &vm.admission_override {
            m += &format!("; FORCED beyond the host reserve by {o}");
        }
        Event::vm(&vm.name, EventKind::VmProtected, m)
    } else {
        Event::vm(
            &vm.name,
            EventKind::VmUnprotected,
            format!("{} is no longer protected: it will not be restarted elsewhere", vm.name),
        )
    }
}

/// What an operator is told when a protection is not yet covered: a failure of its host would
/// restart the VM only after a confirm-down.
pub(super) fn protection_unconfirmed(vm: &str, host: &str, why: &Unconfirmed) -> Event {
    let lacks = match why {
        Unconfirmed::NotAcknowledged => {
            format!("{host} has not confirmed that {vm} is protected yet; until it does")
        }
        Unconfirmed::NotOnRecord(trouble) => format!(
            "{host} confirmed that {vm} is protected, but the database has not recorded it ({trouble}); if this \
             controller fails together with {host} before it does"
        ),
    };
    let restart = format!("a failure of {host} restarts {vm} only after `vmha host confirm-down {host}`");
    Event::vm(vm, EventKind::ProtectionUnconfirmed, format!("{lacks}: {restart}"))
}
