//! The controller's shell around the engine: every input goes through `Engine::step`; what
//! a step leaves to do is persisted, recorded and sent as the controller does; a restart
//! reloads what `persist::Db` kept.

use vmha_engine::availability::OutageMark;
use vmha_engine::event::Event as EngineEvent;
use vmha_engine::step::{Heartbeat, Output};
use vmha_engine::{Input, Millis, Reply, Request, Watchdog};

use super::network::{Answer, Event, Followup, Report};
use super::{Log, World, secs};

impl World {
    /// The controller takes one input, then what it leads to (see `drain`).
    pub fn step(&mut self, input: Input) -> Reply {
        let reply = self.engine_step(input);
        self.drain();
        reply
    }

    /// Everything the controller's steps left to do, in turn, until nothing is left.
    pub(super) fn drain(&mut self) {
        while let Some(f) = self.outbox.pop_front() {
            match f {
                Followup::Input(input) => {
                    self.engine_step(input);
                }
                Followup::Command(c) => self.send_command(c),
            }
        }
    }

    /// One step, and what the shell does with its output at once: persist it (queued while
    /// the database is down), record operations (which waits for the database), queue the
    /// commands.
    fn engine_step(&mut self, input: Input) -> Reply {
        let out = self.engine.step(input, Millis(self.now));
        self.engine.cluster.check_near().expect("the index of VMs by host is complete");
        self.engine.check_persisted().expect("every change is persisted");
        let Output { events, outages, persist, record, commands, reply, .. } = out;
        self.log_events(&events);
        self.log_outages(&outages);
        if self.now < self.db_down_until {
            self.unwritten.push(persist);
            for op in record {
                let (t, epoch) = (self.db_down_until, self.engine.cluster.epoch);
                self.at(t, Event::Recorded { op, epoch });
            }
        } else {
            // The controller's journal is one ordered queue: what waited for the database goes
            // in before anything newer (applied out of order, an operation's older state
            // would bring it back after its end).
            for p in std::mem::take(&mut self.unwritten) {
                self.db.apply(&self.engine, &p);
            }
            self.db.apply(&self.engine, &persist);
            self.outbox.extend(record.into_iter().map(|op| Followup::Input(Input::Recorded(op))));
        }
        self.outbox.extend(commands.into_iter().map(Followup::Command));
        reply
    }

    /// The controller decides a heartbeat that reached it at `arrived`; its answer, if any.
    pub(super) fn take_heartbeat(&mut self, h: usize, r: Report, arrived: u64) -> Option<Answer> {
        let a = &self.hosts[h];
        let watchdog = match (r.armed, a.spec.watchdog) {
            (true, _) => {
                Watchdog::Armed { device: "/dev/watchdog".into(), timeout_ms: self.config.watchdog_ms }
            }
            (false, true) => Watchdog::Missing("not armed yet".into()),
            (false, false) => Watchdog::Missing("no watchdog device (sim)".into()),
        };
        let xml = (r.domains.iter().flatten())
            .map(|d| {
                let v = &self.vms[self.vm_index[&d.uuid]];
                (d.uuid.clone(), v.xml.clone(), v.disks.clone())
            })
            .collect();
        let hb = Heartbeat {
            host: a.spec.name.clone(),
            echo: r.echo,
            resources: Some((r.resources, self.lock_manager().into())),
            watchdog,
            probes: r.probes,
            domains: r.domains,
            xml,
            xml_refused: Vec::new(),
            roster_known: Some(a.roster.version),
            arrived: Some(Millis(arrived)),
            self_fenced: matches!(a.keeper.phase(), vmha_engine::selffence::Phase::Fenced { .. }),
            seq: r.seq,
            // The simulated agents run no service probes.
            probes_known: 0,
        };
        let Reply::Lease(reply) = self.step(Input::Heartbeat(hb)) else {
            if self.config.sessions {
                self.hosts[h].registered = false;
            }
            return None;
        };
        Some(Answer {
            sent_at: r.sent_at,
            conn: r.conn,
            answer: reply.answer,
            epoch: self.engine.cluster.epoch,
            hosts: reply.cluster_hosts as usize,
            roster: (reply.roster_update, reply.roster),
            next_in_ms: reply.next_in_ms,
        })
    }

    /// An operator's request, as the controller takes it: not at all while it is stopped or
    /// the database is away.
    pub fn operator(&mut self, request: Request) -> Reply {
        if self.now < self.paused_until || self.now < self.db_down_until {
            return Reply::None;
        }
        self.step(Input::Operator { actor: "admin".into(), request })
    }

    /// The controller's tick, when it runs; writes queued for the database go first once it
    /// is back.
    pub(super) fn tick(&mut self) {
        if self.now < self.paused_until || !self.now.is_multiple_of(super::TICK_MS) {
            return;
        }
        if self.now >= self.db_down_until {
            for p in std::mem::take(&mut self.unwritten) {
                self.db.apply(&self.engine, &p);
            }
        }
        self.step(Input::Tick);
    }

    /// The controller is stopped (SIGSTOP) for `ms`, then runs on with what queued up.
    pub fn pause_controller(&mut self, ms: u64) {
        self.paused_until = self.paused_until.max(self.now + ms);
    }

    /// A new controller, with the next epoch, from what the database holds; it acts only
    /// after `gap_ms` (a standby's takeover: the lock's release, the wait, the restore).
    /// What the old one had sent is still in flight; what it queued for the database is lost.
    pub fn restart_controller(&mut self, gap_ms: u64) {
        self.unwritten.clear();
        let epoch = self.engine.cluster.epoch + 1;
        let (engine, events) = self.db.load(&self.engine.cluster, epoch, Millis(self.now));
        self.engine = engine;
        self.log_events(&events);
        if self.config.sessions {
            for a in &mut self.hosts {
                a.registered = false;
            }
        }
        self.pause_controller(gap_ms);
    }

    /// PostgreSQL is down for `ms`: leases go on from memory; starts wait for the database.
    pub fn db_outage(&mut self, ms: u64) {
        self.db_down_until = self.db_down_until.max(self.now + ms);
    }

    /// The external fence command of host `h` finished; `ok`: the host is off.
    pub fn fence_result(&mut self, h: usize, ok: bool) {
        let result = if ok {
            self.power_off(h);
            Ok("power is off (sim)".into())
        } else {
            Err("ipmitool: no answer from the BMC (sim)".into())
        };
        let host = self.hosts[h].spec.name.clone();
        self.step(Input::FenceResult { host, result });
    }

    /// The engine's events: subject kind, subject, kind and message (the actor is left out:
    /// the subject and the message say enough).
    fn log_events(&mut self, events: &[EngineEvent]) {
        for e in events {
            self.line(|| {
                format!("{} {} {}: {}", e.subject.kind(), e.subject.name(), e.kind.as_str(), e.message)
            });
        }
    }

    /// The outage marks, kept as the store keeps them; a line for each outage that begins or
    /// ends (an end with none open is nothing).
    fn log_outages(&mut self, marks: &[OutageMark]) {
        if self.config.log == Log::Off {
            return;
        }
        for m in marks {
            let text = match m {
                OutageMark::Began { vm_uuid, vm_name, ago_ms, planned, cause } => {
                    if self.outages.contains_key(vm_uuid) {
                        continue;
                    }
                    self.outages.insert(vm_uuid.clone(), self.now.saturating_sub(*ago_ms));
                    let how = if *planned { "planned" } else { "unplanned" };
                    format!("outage {vm_name} began {} ago, {how}: {cause}", secs(*ago_ms).trim())
                }
                OutageMark::Ended { vm_uuid } => {
                    let Some(began) = self.outages.remove(vm_uuid) else { continue };
                    let name = self
                        .vm_index
                        .get(vm_uuid)
                        .map_or(vm_uuid.as_str(), |v| self.vms[*v].spec.name.as_str());
                    format!("outage {name} ended after {}", secs(self.now - began).trim())
                }
                OutageMark::Pause { vm_name, ms, cause, .. } => {
                    format!("outage {vm_name} paused {ms} ms, planned: {cause}")
                }
            };
            self.line(|| text);
        }
    }
}
