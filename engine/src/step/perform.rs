//! Carrying out what the decision modules ask for.

use super::{Engine, Output};
use crate::Millis;
use crate::action::Action;
use crate::drain;
use crate::event::{Event, EventKind};
use crate::migration;
use crate::operation::{OpId, OpKind, Purpose};

impl Engine {
    /// Carries out the engine's actions, and those their immediate refusals lead to.
    pub(super) fn perform(&mut self, actions: Vec<Action>, now: Millis, out: &mut Output) {
        let mut queue: std::collections::VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            match action {
                Action::DeclaredDead { host, cause } => {
                    out.events.push(Event::host(
                        &host,
                        EventKind::HostDead,
                        format!("{host} declared dead: {cause}"),
                    ));
                    out.persist.vms.extend(
                        self.cluster
                            .vms
                            .values()
                            .filter(|v| v.host.as_deref() == Some(&host))
                            .map(|v| v.uuid.clone()),
                    );
                    // What it was carrying out ended with it: nothing of it can succeed now.
                    let on_it: Vec<OpId> =
                        self.ops.values().filter(|op| op.executor() == host).map(|op| op.id).collect();
                    let mut more = Vec::new();
                    for id in on_it {
                        self.finish_op(id, Err(format!("{host} was declared dead")), now, out, &mut more);
                    }
                    queue.extend(more);
                }
                Action::Fence { host } => {
                    out.events.push(Event::host(
                        &host,
                        EventKind::Fencing,
                        format!("{host} lost its lease; running the fence command"),
                    ));
                    out.fence.push(host);
                }
                Action::Start { vm_uuid, host, .. } => {
                    let from =
                        self.cluster.vms.get(&vm_uuid).and_then(|v| v.host.clone()).unwrap_or_default();
                    self.begin(
                        OpKind::Start,
                        Purpose::Restart,
                        &vm_uuid,
                        &from,
                        &host,
                        "controller",
                        None,
                        now,
                        out,
                    );
                }
                Action::Migrate { vm_uuid, vm_name, host, purpose } => {
                    match migration::plan_migration(&self.cluster, &vm_uuid, &host, now) {
                        Ok(plan) => {
                            if purpose == Purpose::Failback {
                                out.events.push(Event::vm(
                                    &vm_name,
                                    EventKind::Failback,
                                    format!(
                                        "{vm_name}'s preferred host {host} is healthy again: moving it back"
                                    ),
                                ));
                            }
                            self.begin_migration(
                                &plan.vm_uuid,
                                &plan.target,
                                purpose,
                                "controller",
                                None,
                                now,
                                out,
                            );
                        }
                        Err(refusal) => queue.extend(drain::migration_finished(
                            &mut self.cluster,
                            &vm_uuid,
                            &host,
                            Err(refusal.to_string()),
                            now,
                        )),
                    }
                }
                Action::ColdRestart { vm_uuid, vm_name, from, to } => {
                    out.events.push(Event::vm(
                        &vm_name,
                        EventKind::ColdRestart,
                        format!(
                            "{vm_name} cannot be live-migrated off {from}; restarting it on {to} (--allow-restart)"
                        ),
                    ));
                    self.begin(
                        OpKind::Destroy,
                        Purpose::ColdRestart,
                        &vm_uuid,
                        &from,
                        &to,
                        "controller",
                        None,
                        now,
                        out,
                    );
                }
                Action::ResetGuest { vm_uuid, host, hard, .. } => {
                    if let Some(vm) = self.cluster.vms.get_mut(&vm_uuid) {
                        vm.busy_with = Some(format!("reset on {host}"));
                    }
                    let kind = if hard { OpKind::PowerCycle } else { OpKind::Reset };
                    self.begin(
                        kind,
                        Purpose::GuestReset,
                        &vm_uuid,
                        &host,
                        &host,
                        "controller",
                        None,
                        now,
                        out,
                    );
                }
                Action::MoveHungGuest { vm_uuid, from, to, .. } => {
                    if let Some(vm) = self.cluster.vms.get_mut(&vm_uuid) {
                        vm.busy_with = Some(format!("move to {to} (its guest hung)"));
                    }
                    self.begin(
                        OpKind::Destroy,
                        Purpose::GuestReset,
                        &vm_uuid,
                        &from,
                        &to,
                        "controller",
                        None,
                        now,
                        out,
                    );
                }
                Action::DestroyStale { vm_uuid, host, .. } => {
                    self.begin(
                        OpKind::Destroy,
                        Purpose::StaleCopy,
                        &vm_uuid,
                        &host,
                        "",
                        "controller",
                        None,
                        now,
                        out,
                    );
                }
                Action::Event(event) => out.events.push(event),
                Action::Outage(mark) => out.outages.push(mark),
            }
        }
    }
}
