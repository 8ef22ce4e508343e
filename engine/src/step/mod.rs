//! The one decision step: `Engine::step(input, now) -> Output`.
//!
//! Every event of the world (a heartbeat, an operation's result, a fence verdict, an operator's
//! request, the clock) enters here, and everything the controller must do comes out: the reply,
//! the operations to record and the commands to send once they are recorded, the events to log,
//! and what to persist. The controller's shell and the safety simulator both drive this and
//! nothing else, so the order of the engine's calls lives in one place and the property tests
//! run what production runs.
//!
//! Its parts: `input` and `output`, what goes in and comes out; `hosts`, what agents say;
//! `operator`, what operators ask; `operations`, each operation from its recording to its end;
//! `perform`, carrying out what the decision modules ask for; `changes`, what a step changed,
//! so that only that is persisted.

mod changes;
mod hosts;
mod input;
mod operations;
mod operator;
mod output;
mod perform;

pub use hosts::CONNECTED_EVENT_EVERY_MS;
pub use input::{Heartbeat, Input, Registration, Request, Unconfirmed};
pub use output::{Command, CommandKind, HostWork, LeaseReply, Output, Persist, Reply, VmWork};

use std::collections::{BTreeMap, BTreeSet};

use crate::Refusal;
use crate::cluster::Recovery;
use crate::drain;
use crate::drain_record;
use crate::event::{Event, EventKind, Subject};
use crate::guest_reset;
use crate::operation::{OpId, OpKind, OpState, Operation, Purpose};
use crate::recovery;
use crate::roster::RosterBook;
use crate::{ClusterState, Millis};
use changes::Scope;

/// The controller's whole decision state: the cluster as observed, and the operations in
/// flight.
#[derive(Clone, Debug, Default)]
pub struct Engine {
    pub cluster: ClusterState,
    /// Operations in flight (ended ones leave at once).
    pub ops: BTreeMap<OpId, Operation>,
    /// Cold restarts whose destroy is done, by VM: (source, target, when it was destroyed).
    /// The start waits until every other live host has reported since: a copy nobody knew of
    /// (moved or started by hand) would show up there, and then nothing is started.
    cold_starts: BTreeMap<String, (String, String, Millis, Purpose)>,
    next_seq: u64,
    /// What was last handed out for persisting, to persist only what changed.
    saved_hosts: BTreeMap<String, HostWork>,
    saved_vms: BTreeMap<String, VmWork>,
    /// What every heartbeat answer lists, built again only after a step that may have changed
    /// it: at 1000 hosts, building it for each heartbeat cost more than everything else.
    roster: RosterBook,
}

impl Engine {
    pub fn new(cluster: ClusterState) -> Engine {
        let mut e = Engine { cluster, roster: RosterBook::new(), ..Default::default() };
        e.cluster.index_vms();
        e.mark_saved();
        e
    }

    /// A controller that starts (or takes over) from what its predecessor persisted: `cluster`
    /// as loaded, and the operations it left in flight. Times persisted on another clock start
    /// over at `now`; operations get a full timeout; a start is in doubt until its host reports
    /// or is declared dead. Nothing is re-sent: results and reports settle what was begun.
    pub fn restore(mut cluster: ClusterState, ops: Vec<Operation>, now: Millis) -> (Engine, Vec<Event>) {
        let (epoch, t) = (cluster.epoch, cluster.timings);
        let mut events = vec![Event::controller(
            &format!("epoch {epoch}"),
            EventKind::ControllerStarted,
            format!(
                "controller started with epoch {epoch}; {} hosts and {} VMs known; nothing is declared dead \
                 before it has held quorum for {} ms",
                cluster.hosts.len(),
                cluster.vms.len(),
                t.lease_ttl_ms + t.fence_margin_ms
            ),
        )];
        for h in cluster.hosts.values_mut() {
            if let Some(d) = &mut h.dead {
                d.at = now;
            }
            if let Some(d) = h.drain.as_ref().filter(|d| d.state == drain_record::DrainState::Draining) {
                events.push(Event::host(
                    &h.name,
                    EventKind::DrainResumed,
                    format!(
                        "the drain of {} continues under this controller ({} of {} VMs still to move)",
                        h.name,
                        d.steps.iter().filter(|s| !s.state.finished()).count(),
                        d.steps.len()
                    ),
                ));
            }
        }
        for vm in cluster.vms.values_mut() {
            vm.guest_care.restored(now);
            // A report that echoes an earlier leader's answer may have been sent before any
            // result that leader saw: it is no news of a VM stopping (`inventory::apply_report`)
            // until its host echoes this leader's answer, a heartbeat or two.
            vm.settled_at = now;
            if let Some(r) = &mut vm.recovery {
                r.since = now;
                r.may_have_moved_since = r.may_have_moved_since.map(|_| now);
                if let Some(l) = &mut r.disk_locked {
                    l.since = now;
                    l.retry_at = now;
                }
            }
        }
        let mut e = Engine { cluster, roster: RosterBook::new(), ..Default::default() };
        e.cluster.index_vms();
        for mut op in ops {
            e.next_seq = e.next_seq.max((op.id.0 as u64).wrapping_add(1));
            op.inherited = true;
            op.state = OpState::Running;
            op.deadline = Operation::deadline(op.kind, op.overrides, &e.cluster.policy, now);
            let what = op.describe();
            if let Some(vm) = e.cluster.vms.get_mut(&op.vm_uuid) {
                match (op.kind, op.purpose) {
                    (OpKind::Start, Purpose::Restart) if !vm.awaits_start_on(&op.target) => {
                        vm.recovery = Some(Recovery::in_doubt(&op.target, now));
                    }
                    (OpKind::Migrate, _) => vm.busy_with = Some(format!("migration to {}", op.target)),
                    (OpKind::Destroy | OpKind::Start, Purpose::ColdRestart) => {
                        vm.busy_with = Some(format!("cold restart on {}", op.target))
                    }
                    (OpKind::Destroy | OpKind::Start, Purpose::GuestReset) => {
                        vm.busy_with = Some(format!("move to {} (its guest hung)", op.target))
                    }
                    (OpKind::Shutdown, _) => vm.busy_with = Some(format!("shutdown on {}", op.source)),
                    (OpKind::Reset | OpKind::PowerCycle, _) => {
                        vm.busy_with = Some(format!("reset on {}", op.source))
                    }
                    _ => {}
                }
            }
            events.push(Event {
                subject: Subject::Operation(op.id.to_string()),
                kind: EventKind::OperationReconciled,
                message: format!(
                    "{what} was begun by an earlier controller; it is followed to its end from its agent's result \
                     or reports, and never sent again"
                ),
                actor: "controller".into(),
            });
            e.ops.insert(op.id, op);
        }
        e.forget_unrecorded();
        e.mark_saved();
        (e, events)
    }

    /// A restart or drain step persisted as under way, whose operation never reached the
    /// database, was never sent (commands go out only once recorded): it is tried again.
    fn forget_unrecorded(&mut self) {
        let in_flight: BTreeSet<&str> = self.ops.values().map(|op| op.vm_uuid.as_str()).collect();
        for vm in self.cluster.vms.values_mut().filter(|v| !in_flight.contains(v.uuid.as_str())) {
            if let Some(r) = vm.recovery.as_mut() {
                r.starting_on = None;
            }
        }
        for h in self.cluster.hosts.values_mut() {
            for step in h.drain.iter_mut().flat_map(|d| d.steps.iter_mut()) {
                let sent = matches!(
                    step.state,
                    drain_record::StepState::Migrating { .. } | drain_record::StepState::Restarting { .. }
                );
                if sent && !in_flight.contains(step.vm_uuid.as_str()) {
                    let changed = step.advance(drain_record::StepState::Pending);
                    debug_assert!(changed.is_ok(), "{changed:?}");
                }
            }
        }
    }

    /// Takes one input at `now` and says what to do.
    pub fn step(&mut self, input: Input, now: Millis) -> Output {
        let mut out = Output::default();
        let mut actions = Vec::new();
        // Heartbeats, the most frequent input, touch one host and its VMs, registrations their
        // host, and ticks only restarts in progress: only those are compared for persisting.
        // Results and operator requests may touch anything.
        let mut scope = Scope::Everything;
        match input {
            Input::Register(r) => {
                scope = Scope::Host(r.host.clone());
                self.register(r, now, &mut out)
            }
            Input::Heartbeat(hb) => {
                let host = hb.host.clone();
                let vms = self.heartbeat(hb, now, &mut out, &mut actions);
                scope = Scope::Report(host, vms);
            }
            Input::Recorded(id) => {
                scope = Scope::Operations;
                self.recorded(id, now, &mut out)
            }
            Input::Result { host, id, result } => match self.ops.get(&id) {
                None => out.reply = Reply::Refused(Refusal::UnknownOperation(id.to_string())),
                Some(op) if op.executor() != host => {
                    out.reply = Reply::Refused(Refusal::NotExecutor { operation: id.to_string(), host })
                }
                Some(_) => self.finish_op(id, result, now, &mut out, &mut actions),
            },
            Input::FenceResult { host, result } => {
                actions.extend(recovery::fence_finished(&mut self.cluster, &host, result, now))
            }
            Input::Operator { actor, request } => {
                // A protection change touches its VM alone (scripts protect thousands).
                let protection = matches!(request, Request::Protection { .. });
                match self.operator(&actor, request, now, &mut out, &mut actions) {
                    Ok(reply) => out.reply = reply,
                    Err(refusal) => out.reply = Reply::Refused(refusal),
                }
                if protection {
                    let vm = match &out.reply {
                        Reply::Vm(uuid) => vec![uuid.clone()],
                        _ => Vec::new(),
                    };
                    scope = Scope::Vms(vm);
                }
            }
            Input::ProtectionUnconfirmed { actor, vm, host, why } => {
                scope = Scope::Vms(Vec::new());
                out.events.push(operator::protection_unconfirmed(&vm, &host, &why).by(&actor));
            }
            Input::Tick => {
                self.expire_ops(now, &mut out, &mut actions);
                self.start_cold_restarts(now, &mut out, &mut actions);
                actions.extend(recovery::tick(&mut self.cluster, now));
                actions.extend(drain::tick(&mut self.cluster, now));
                actions.extend(guest_reset::tick(&mut self.cluster, now));
                scope = Scope::Tick;
            }
        }
        self.perform(actions, now, &mut out);
        let narrow = !matches!(scope, Scope::Everything);
        self.collect_persist(scope, &mut out);
        let p = &out.persist;
        if !narrow || [p.vm_work.is_empty(), p.host_work.is_empty(), p.registered.is_empty()].contains(&false)
        {
            self.roster.may_have_changed();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::tests::{three_hosts, vm_on};
    use crate::drain_record::{Drain, DrainCause, DrainState, DrainStep, StepState};
    use crate::operation::Done;

    fn step_of(uuid: &str, state: StepState) -> DrainStep {
        DrainStep {
            vm_uuid: uuid.into(),
            vm_name: uuid.into(),
            protected: false,
            planned: None,
            why: String::new(),
            state,
            tried: Vec::new(),
        }
    }

    fn start_op(vm: &str, target: &str) -> Operation {
        Operation {
            id: OpId::new(1, 0),
            kind: OpKind::Start,
            purpose: Purpose::Restart,
            vm_uuid: vm.into(),
            vm_name: vm.into(),
            source: "kvm1".into(),
            target: target.into(),
            actor: "controller".into(),
            state: OpState::Running,
            error: String::new(),
            deadline: Millis(0),
            overrides: None,
            inherited: true,
            done: Done::default(),
            cancelled_by: None,
        }
    }

    /// Work persisted as under way whose operation never reached the database was never sent:
    /// a restarted controller tries it again instead of waiting for it for ever; work whose
    /// operation was recorded is followed, never re-sent.
    #[test]
    fn a_restart_resumes_recorded_work_and_retries_what_was_never_sent() {
        let mut s = three_hosts();
        vm_on(&mut s, "a", "dns1", "kvm1");
        vm_on(&mut s, "b", "web1", "kvm1");
        vm_on(&mut s, "c", "db1", "kvm2");
        s.hosts.get_mut("kvm1").unwrap().drain = Some(Drain {
            cause: DrainCause::Operator,
            allow_restart: false,
            state: DrainState::Draining,
            steps: vec![
                step_of("a", StepState::Migrating { target: "kvm2".into() }),
                step_of("b", StepState::Pending),
            ],
            message: String::new(),
        });
        for (uuid, on) in [("b", "kvm3"), ("c", "kvm3")] {
            s.vms.get_mut(uuid).unwrap().recovery = Some(Recovery::in_doubt(on, Millis(0)));
        }
        let (e, events) = Engine::restore(s, vec![start_op("c", "kvm3")], Millis(5));
        let steps = &e.cluster.hosts["kvm1"].drain.as_ref().unwrap().steps;
        assert_eq!(steps[0].state, StepState::Pending, "a migration never recorded is tried again");
        assert_eq!(e.cluster.vms["b"].recovery.as_ref().unwrap().starting_on, None, "nor sent: retried");
        assert!(e.cluster.vms["c"].awaits_start_on("kvm3"), "a recorded start stays in doubt");
        assert!(e.ops.values().all(|op| op.inherited && op.deadline > Millis(5)));
        let kinds: Vec<EventKind> = events.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [EventKind::ControllerStarted, EventKind::DrainResumed, EventKind::OperationReconciled]
        );
    }

    #[test]
    fn an_unconfirmed_protection_is_told_to_the_operator_who_asked_and_changes_nothing() {
        let s = three_hosts();
        let (mut e, _) = Engine::restore(s.clone(), Vec::new(), Millis(0));
        for (why, says) in [
            (Unconfirmed::NotAcknowledged, "kvm1 has not confirmed that dns1 is protected yet"),
            (Unconfirmed::NotOnRecord("PostgreSQL is down".into()), "not recorded it (PostgreSQL is down)"),
        ] {
            let (actor, vm, host) = ("alice".to_string(), "dns1".to_string(), "kvm1".to_string());
            let out = e.step(Input::ProtectionUnconfirmed { actor, vm, host, why }, Millis(10));
            let [ev] = &out.events[..] else { panic!("{:?}", out.events) };
            assert_eq!((ev.kind, ev.actor.as_str()), (EventKind::ProtectionUnconfirmed, "alice"));
            assert!(ev.message.contains(says), "{}", ev.message);
            assert!(ev.message.ends_with("only after `vmha host confirm-down kvm1`"), "{}", ev.message);
            assert_eq!(out.persist, Persist::default());
        }
    }
}
