//! An operation's life: begun (recorded first), sent once recorded, ended by its agent's result
//! or, past its deadline, by the agents' reports.

use super::{Command, CommandKind, Engine, Output};
use crate::action::Action;
use crate::availability::OutageMark;
use crate::drain;
use crate::event::{Event, EventKind, Subject};
use crate::guest_reset;
use crate::inventory;
use crate::operation::{Done, OpId, OpKind, OpState, Operation, Overrides, Purpose};
use crate::recovery;
use crate::{Millis, RunState};

impl Engine {
    /// An operation an earlier leader began may have ended while no controller listened: a
    /// migration whose VM the target now runs succeeded.
    pub(super) fn settle_inherited_from_report(
        &mut self,
        host: &str,
        now: Millis,
        out: &mut Output,
        actions: &mut Vec<Action>,
    ) {
        let done: Vec<OpId> = self
            .ops
            .values()
            .filter(|op| {
                op.inherited && matches!(op.kind, OpKind::Migrate | OpKind::Start) && op.target == host
            })
            .filter(|op| {
                self.cluster
                    .vms
                    .get(&op.vm_uuid)
                    .is_some_and(|v| v.host.as_deref() == Some(host) && v.state == RunState::Running)
            })
            .map(|op| op.id)
            .collect();
        for id in done {
            self.finish_op(id, Ok(Done::default()), now, out, actions);
        }
    }

    /// A recorded operation's command goes out, if it is still wanted: the cluster may have
    /// changed while the database was slow or away (the host came back with the VM, or was
    /// declared dead).
    pub(super) fn recorded(&mut self, id: OpId, now: Millis, out: &mut Output) {
        let Some(op) = self.ops.get(&id).filter(|op| op.state == OpState::Recording) else { return };
        let vm = self.cluster.vms.get(&op.vm_uuid);
        let wanted = match (op.kind, op.purpose) {
            (OpKind::Start, Purpose::Restart) => vm.is_some_and(|v| v.awaits_start_on(&op.target)),
            _ => vm.is_some(),
        };
        if !wanted {
            self.set_op_state(
                id,
                OpState::Aborted,
                "no longer wanted once recorded (the cluster changed while the database was slow or away)"
                    .into(),
                out,
            );
            return;
        }
        let xml = vm.map(|v| v.xml.clone()).unwrap_or_default();
        let kind = match op.kind {
            OpKind::Start => CommandKind::Start { uuid: op.vm_uuid.clone(), xml },
            OpKind::Migrate => CommandKind::Migrate {
                uuid: op.vm_uuid.clone(),
                dest_uri: self
                    .cluster
                    .hosts
                    .get(&op.target)
                    .map(|h| h.migration_uri.clone())
                    .unwrap_or_default(),
                bandwidth_mib_s: op.overrides.map(|o| o.bandwidth_mib_s),
                timeout_ms: op.overrides.map_or(self.cluster.policy.migration_timeout_ms, |o| o.timeout_ms),
            },
            OpKind::Destroy => CommandKind::Destroy { uuid: op.vm_uuid.clone() },
            OpKind::Shutdown => CommandKind::Shutdown {
                uuid: op.vm_uuid.clone(),
                timeout_ms: op.overrides.map_or(0, |o| o.timeout_ms),
            },
            OpKind::Reset | OpKind::PowerCycle => {
                CommandKind::Reset { uuid: op.vm_uuid.clone(), hard: op.kind == OpKind::PowerCycle }
            }
        };
        out.commands.push(Command { op: id, host: op.executor().to_string(), vm: op.vm_name.clone(), kind });
        // Its time runs from now: it may have waited long for the database.
        let deadline = Operation::deadline(op.kind, op.overrides, &self.cluster.policy, now);
        if let Some(op) = self.ops.get_mut(&id) {
            op.deadline = deadline;
        }
        self.set_op_state(id, OpState::Running, String::new(), out);
    }

    /// The one place an operation changes state; each change is one event.
    pub(super) fn set_op_state(&mut self, id: OpId, to: OpState, error: String, out: &mut Output) {
        let Some(op) = self.ops.get_mut(&id) else { return };
        op.state = to;
        op.error = error;
        let what = op.describe();
        let (kind, message) = match to {
            OpState::Recording => (EventKind::OperationDone, format!("{what} is being recorded")),
            OpState::Running => match op.kind {
                OpKind::Start => (EventKind::RestartStarted, format!("{what} sent (was on {})", op.source)),
                OpKind::Migrate => (EventKind::MigrationRequested, format!("{what} requested")),
                OpKind::Destroy | OpKind::Shutdown | OpKind::Reset | OpKind::PowerCycle => {
                    (EventKind::OperationDone, format!("{what} sent"))
                }
            },
            OpState::Succeeded => match op.kind {
                OpKind::Migrate if op.done.elapsed_ms > 0 => (
                    EventKind::MigrationSucceeded,
                    format!(
                        "{} live-migrated from {} to {} in {} ms (downtime {} ms, {} MiB sent)",
                        op.vm_name,
                        op.source,
                        op.target,
                        op.done.elapsed_ms,
                        op.done.downtime_ms,
                        op.done.bytes >> 20
                    ),
                ),
                OpKind::Migrate => (EventKind::MigrationSucceeded, format!("{what} succeeded")),
                OpKind::Start | OpKind::Destroy | OpKind::Reset | OpKind::PowerCycle => {
                    (EventKind::OperationDone, format!("{what} done"))
                }
                OpKind::Shutdown => (
                    EventKind::VmStoppedByOperator,
                    format!(
                        "{} is off on {} ({}): not restarted until `vmha vm start {}`",
                        op.vm_name,
                        op.source,
                        match op.overrides.map(|o| o.timeout_ms) {
                            Some(t) if op.done.elapsed_ms >= t => format!(
                                "no clean shutdown within {}, so it was destroyed",
                                crate::time::secs(t)
                            ),
                            _ => format!("shut down in {}", crate::time::secs(op.done.elapsed_ms)),
                        },
                        op.vm_name
                    ),
                ),
            },
            OpState::Failed => match op.kind {
                OpKind::Migrate => (
                    EventKind::MigrationFailed,
                    format!("{what} failed: {}; {} stays on {}", op.error, op.vm_name, op.source),
                ),
                OpKind::Start | OpKind::Destroy | OpKind::Reset | OpKind::PowerCycle => {
                    (EventKind::OperationDone, format!("{what} failed: {}", op.error))
                }
                OpKind::Shutdown => (
                    EventKind::OperationDone,
                    format!(
                        "{what} failed: {}; {} stays as it is, and protected if it was",
                        op.error, op.vm_name
                    ),
                ),
            },
            OpState::Aborted => (EventKind::OperationAborted, format!("{what} not sent: {}", op.error)),
            OpState::Cancelled => (
                EventKind::MigrationCancelled,
                format!("{what} {}; {} stays on {}", op.error, op.vm_name, op.source),
            ),
        };
        out.events.push(Event {
            subject: Subject::Vm(op.vm_name.clone()),
            kind,
            message,
            actor: op.actor.clone(),
        });
        out.persist.ops.push(op.clone());
        if to.ended() {
            self.ops.remove(&id);
        }
    }

    /// Begins an operation: recorded first, sent once recorded.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn begin(
        &mut self,
        kind: OpKind,
        purpose: Purpose,
        vm_uuid: &str,
        source: &str,
        target: &str,
        actor: &str,
        overrides: Option<Overrides>,
        now: Millis,
        out: &mut Output,
    ) -> OpId {
        let id = OpId::new(self.cluster.epoch, self.next_seq);
        self.next_seq += 1;
        let vm_name = self.cluster.vms.get(vm_uuid).map(|v| v.name.clone()).unwrap_or_default();
        let op = Operation {
            id,
            kind,
            purpose,
            vm_uuid: vm_uuid.into(),
            vm_name,
            source: source.into(),
            target: target.into(),
            actor: actor.into(),
            state: OpState::Recording,
            error: String::new(),
            // Set again when it is sent (`recorded`); a recording operation never expires.
            deadline: Operation::deadline(kind, overrides, &self.cluster.policy, now),
            overrides,
            inherited: false,
            done: Done::default(),
            cancelled_by: None,
        };
        out.persist.ops.push(op.clone());
        self.ops.insert(id, op);
        out.record.push(id);
        id
    }

    /// An operation ended: its purpose says which state machine goes on.
    pub(super) fn finish_op(
        &mut self,
        id: OpId,
        result: Result<Done, String>,
        now: Millis,
        out: &mut Output,
        actions: &mut Vec<Action>,
    ) {
        let Some(op) = self.ops.get(&id).cloned() else { return };
        if let Some(vm) = self.cluster.vms.get_mut(&op.vm_uuid) {
            vm.settled_at = now;
        }
        let (to, error) = match (&result, &op.cancelled_by) {
            (Ok(_), _) => (OpState::Succeeded, String::new()),
            (Err(e), Some(by)) => (OpState::Cancelled, format!("cancelled by {by} ({e})")),
            (Err(e), None) => (OpState::Failed, e.clone()),
        };
        if let (Ok(d), Some(op)) = (&result, self.ops.get_mut(&id)) {
            op.done = d.clone();
        }
        self.set_op_state(id, to, error, out);
        let done = result.as_ref().cloned().unwrap_or_default();
        let verdict = result.map(|_| ());
        let s = &mut self.cluster;
        let protected = s.vms.get(&op.vm_uuid).is_some_and(|v| v.protected);
        match (op.kind, op.purpose) {
            (OpKind::Migrate, _) => {
                if verdict.is_ok() && protected && done.downtime_ms > 0 {
                    out.outages.push(OutageMark::Pause {
                        vm_uuid: op.vm_uuid.clone(),
                        vm_name: op.vm_name.clone(),
                        ms: done.downtime_ms,
                        cause: format!("live migration from {} to {}", op.source, op.target),
                    });
                }
                if verdict.is_ok() {
                    let change = inventory::apply_migrated(s, &op.vm_uuid, &op.target);
                    self.inventory_changes(change.into_iter().collect(), "controller", out);
                }
                let s = &mut self.cluster;
                if let Some(vm) = s.vms.get_mut(&op.vm_uuid) {
                    vm.busy_with = None;
                }
                actions.extend(drain::migration_finished(s, &op.vm_uuid, &op.target, verdict, now));
            }
            (OpKind::Start, Purpose::Restart) => {
                actions.extend(recovery::start_finished(s, &op.vm_uuid, &op.target, verdict, now));
                out.persist.vms.push(op.vm_uuid.clone());
            }
            (OpKind::Start, Purpose::GuestReset) => {
                actions.extend(guest_reset::move_finished(s, &op.vm_uuid, &op.target, verdict, now));
                out.persist.vms.push(op.vm_uuid.clone());
            }
            (OpKind::Start, _) => {
                actions.extend(drain::restart_finished(s, &op.vm_uuid, &op.target, verdict, now));
                out.persist.vms.push(op.vm_uuid.clone());
            }
            (OpKind::Destroy, Purpose::ColdRestart) => match verdict {
                // The first half of a cold restart: the second follows once every host reported.
                Ok(()) => {
                    if protected {
                        out.outages.push(OutageMark::Began {
                            vm_uuid: op.vm_uuid.clone(),
                            vm_name: op.vm_name.clone(),
                            ago_ms: 0,
                            planned: true,
                            cause: format!("cold restart by the drain of {}", op.source),
                        });
                    }
                    self.cold_starts.insert(
                        op.vm_uuid.clone(),
                        (op.source.clone(), op.target.clone(), now, Purpose::ColdRestart),
                    );
                }
                Err(e) => {
                    let why = format!("destroying it on {} failed: {e}; it keeps running there", op.source);
                    actions.extend(drain::restart_finished(s, &op.vm_uuid, &op.target, Err(why), now));
                }
            },
            // A hung guest's move: stopped on its host, as confirmed; the start follows once every
            // host reported since, as a cold restart's.
            (OpKind::Destroy, Purpose::GuestReset) => match verdict {
                Ok(()) => {
                    out.outages.push(OutageMark::Began {
                        vm_uuid: op.vm_uuid.clone(),
                        vm_name: op.vm_name.clone(),
                        ago_ms: 0,
                        planned: false,
                        cause: format!("its guest hung on {}, which fails its health probes", op.source),
                    });
                    self.cold_starts.insert(
                        op.vm_uuid.clone(),
                        (op.source.clone(), op.target.clone(), now, Purpose::GuestReset),
                    );
                }
                Err(e) => {
                    actions.extend(guest_reset::reset_finished(s, &op.vm_uuid, &op.source, Err(e), now))
                }
            },
            (OpKind::Destroy, _) => {}
            (OpKind::Reset | OpKind::PowerCycle, _) => {
                actions.extend(guest_reset::reset_finished(s, &op.vm_uuid, &op.source, verdict, now));
                out.persist.vms.push(op.vm_uuid.clone());
            }
            (OpKind::Shutdown, _) => {
                if let Some(vm) = s.vms.get_mut(&op.vm_uuid) {
                    vm.busy_with = None;
                    // Still running: the stop did not happen, so vmha keeps it up as before.
                    if verdict.is_err() {
                        vm.stopped_by = None;
                    } else if vm.protected {
                        out.outages.push(OutageMark::Began {
                            vm_uuid: vm.uuid.clone(),
                            vm_name: vm.name.clone(),
                            ago_ms: done.elapsed_ms,
                            planned: true,
                            cause: format!("stopped by {} with `vmha vm stop`", op.actor),
                        });
                    }
                }
                out.persist.vms.push(op.vm_uuid.clone());
            }
        }
    }

    /// The second half of cold restarts whose hosts have all reported since the destroy: the
    /// start, unless a report showed the VM running elsewhere (then it has left the host).
    pub(super) fn start_cold_restarts(&mut self, now: Millis, out: &mut Output, actions: &mut Vec<Action>) {
        let due: Vec<(String, String, String, Purpose)> = self
            .cold_starts
            .iter()
            .filter(|(uuid, (_, _, since, _))| {
                self.cluster
                    .vms
                    .get(*uuid)
                    .is_none_or(|vm| recovery::not_reported_since(&self.cluster, vm, *since).is_none())
            })
            .map(|(uuid, (source, target, _, purpose))| {
                (uuid.clone(), source.clone(), target.clone(), *purpose)
            })
            .collect();
        for (uuid, source, target, purpose) in due {
            self.cold_starts.remove(&uuid);
            let Some(vm) = self.cluster.vms.get(&uuid) else { continue };
            match vm.host.clone().filter(|h| *h != source && vm.state.has_process()) {
                Some(elsewhere) => {
                    out.events.push(Event::vm(
                        &vm.name,
                        EventKind::RestartCancelled,
                        format!("{} runs on {elsewhere} already: it is not started on {target}", vm.name),
                    ));
                    let s = &mut self.cluster;
                    actions.extend(match purpose {
                        Purpose::GuestReset => guest_reset::move_finished(s, &uuid, &elsewhere, Ok(()), now),
                        _ => drain::restart_finished(s, &uuid, &elsewhere, Ok(()), now),
                    });
                }
                None => {
                    self.begin(OpKind::Start, purpose, &uuid, &source, &target, "controller", None, now, out);
                }
            }
        }
    }

    /// Whether `host` reported its domains (with a lease) after the time an operation with this
    /// deadline ran out (before the grace for its result), or is dead: either way, a VM it does
    /// not report running is not there.
    pub(super) fn reported_after(&self, host: &str, deadline: Millis) -> bool {
        let ran_out = Millis(deadline.0.saturating_sub(self.cluster.policy.result_grace_ms));
        self.cluster
            .hosts
            .get(host)
            .is_none_or(|h| h.dead.is_some() || h.reported_at.is_some_and(|r| r > ran_out))
    }

    /// Operations without a result past their deadline are settled from what the agents
    /// report. A restart's start never is: a hung libvirtd may still carry it out, so its VM
    /// waits for its host to report it or to be declared dead.
    pub(super) fn expire_ops(&mut self, now: Millis, out: &mut Output, actions: &mut Vec<Action>) {
        let due: Vec<OpId> = self
            .ops
            .values()
            .filter(|op| op.state == OpState::Running && op.deadline <= now)
            .filter(|op| {
                !(op.kind == OpKind::Start
                    && self.cluster.vms.get(&op.vm_uuid).is_some_and(|v| v.awaits_start_on(&op.target)))
            })
            .map(|op| op.id)
            .collect();
        for id in due {
            let op = self.ops[&id].clone();
            let vm = self.cluster.vms.get(&op.vm_uuid);
            let at = |h: &str| vm.is_some_and(|v| v.host.as_deref() == Some(h) && v.state.has_process());
            // Gone only by a report that shows it: a host whose libvirt does not answer leaves
            // the VM's state unknown, and unknown is not off.
            let gone_from = |h: &str| {
                vm.is_some_and(|v| {
                    v.state != RunState::Unknown && !(v.host.as_deref() == Some(h) && v.state.has_process())
                })
            };
            let settled = match op.kind {
                OpKind::Migrate if !at(&op.target) && !self.reported_after(&op.target, op.deadline) => {
                    // Neither its result nor a report of the target since the migration's time
                    // ran out: it may have ended there. Wait for one (or the target's death).
                    continue;
                }
                OpKind::Migrate | OpKind::Start => at(&op.target),
                // Still running there: whether or not the guest was reset, the next judgement
                // of its guest says what to do.
                OpKind::Reset | OpKind::PowerCycle => at(&op.source),
                OpKind::Destroy | OpKind::Shutdown => gone_from(&op.source),
            };
            let result = if settled {
                Ok(Done::default())
            } else {
                Err(format!(
                    "no result from the agent on {} in time; it may have restarted mid-command, and its reports \
                     do not show it done",
                    op.executor()
                ))
            };
            out.events.push(Event {
                subject: Subject::Operation(id.to_string()),
                kind: EventKind::OperationExpired,
                message: format!(
                    "{} sent no result in time; settled as {} from the agents' reports",
                    op.describe(),
                    if settled { "done" } else { "failed" }
                ),
                actor: "controller".into(),
            });
            self.finish_op(id, result, now, out, actions);
        }
    }

    /// Claims the VM and begins its live migration.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn begin_migration(
        &mut self,
        vm_uuid: &str,
        target: &str,
        purpose: Purpose,
        actor: &str,
        overrides: Option<Overrides>,
        now: Millis,
        out: &mut Output,
    ) -> OpId {
        let source = self.cluster.vms.get(vm_uuid).and_then(|v| v.host.clone()).unwrap_or_default();
        if let Some(vm) = self.cluster.vms.get_mut(vm_uuid) {
            vm.busy_with = Some(format!("migration to {target}"));
        }
        self.begin(OpKind::Migrate, purpose, vm_uuid, &source, target, actor, overrides, now, out)
    }
}
