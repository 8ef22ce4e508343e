//! The guest's heartbeat: every `--guest-ping-interval` the agent pings the QEMU guest agent of
//! each protected VM running here and reads its vCPU time and I/O counters. What it saw goes
//! with every heartbeat; the controller decides what a silence means.
//!
//! A guest is only judged by pings once its agent has answered in the current QEMU process:
//! one without a channel, or still booting, or without qemu-ga inside, is never "silent".
//! With the silence goes how long the guest has been *quiet*: since two looks in a row found
//! its vCPUs ran *and* it did disk or network I/O of its own (packets it sent, not packets sent
//! to it), vSphere's I/O check. A panicked kernel may spin its vCPU, but it sends nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmha_proto::v1::{GuestAgent, GuestHealth, ServiceProbe, ServiceProbeResult, VmProbes};

use crate::bounded::{Blocking, Outcome};
use crate::hypervisor::{Activity, GuestCheck, GuestLook, Hypervisor, Ping};
use crate::lease::LeaseShell;

/// How long a ping may wait for the guest's answer.
const PING_WAIT: Duration = Duration::from_secs(1);
/// How long reading the counters may take before libvirt counts as not answering.
const LOOK_WAIT: Duration = Duration::from_secs(2);
/// What the agent knows of one guest, in its current QEMU process.
#[derive(Clone, Debug)]
pub struct Watched {
    instance: u32,
    no_channel: bool,
    last_answer: Option<Instant>,
    missed: u32,
    /// The newest look's counters.
    last_look: Option<Activity>,
    /// When a look last found both counters moved since the one before (or when watching
    /// began: a guest is not quiet for longer than it has been watched).
    last_active: Option<Instant>,
    /// Its service probes in this QEMU process (a reset or a restart starts them afresh), by
    /// name.
    probes: HashMap<String, ProbeState>,
}

/// One service probe of a guest, since the guest started.
#[derive(Clone, Debug, Default)]
struct ProbeState {
    due: Option<Instant>,
    failures_in_row: u32,
    passed_once: bool,
    last_error: String,
}

impl Watched {
    fn new(instance: u32) -> Watched {
        Watched {
            instance,
            no_channel: false,
            last_answer: None,
            missed: 0,
            last_look: None,
            last_active: None,
            probes: HashMap::new(),
        }
    }

    /// Takes one look's result. A new QEMU process (a restart, a reset by vmha) starts afresh.
    pub fn observe(&mut self, now: Instant, check: GuestCheck) {
        if check.instance != self.instance {
            *self = Watched::new(check.instance);
        }
        self.no_channel = check.ping == Ping::NoChannel;
        match check.ping {
            Ping::Answered => {
                self.last_answer = Some(now);
                self.missed = 0;
            }
            Ping::Unanswered => self.missed += 1,
            Ping::NoChannel => {}
        }
        let a = check.activity;
        let worked = self.last_look.is_none_or(|b| a.cpu_ns > b.cpu_ns && a.io_ops > b.io_ops);
        if worked {
            self.last_active = Some(now);
        }
        self.last_look = Some(a);
    }

    /// What goes with the heartbeat.
    pub fn health(&self, now: Instant) -> GuestHealth {
        let since = |t: Instant| now.duration_since(t).as_millis() as u64;
        let (agent, since_answer_ms) = match (self.no_channel, self.last_answer) {
            (true, _) => (GuestAgent::None, 0),
            (false, None) => (GuestAgent::Waiting, 0),
            (false, Some(t)) if self.missed == 0 => (GuestAgent::Answering, since(t)),
            (false, Some(t)) => (GuestAgent::Silent, since(t)),
        };
        let quiet_ms = match agent {
            GuestAgent::Silent => self.last_active.map_or(0, since),
            _ => 0,
        };
        let mut probes: Vec<ServiceProbeResult> = (self.probes.iter())
            .map(|(name, p)| ServiceProbeResult {
                name: name.clone(),
                failures_in_row: p.failures_in_row,
                passed_once: p.passed_once,
                last_error: p.last_error.clone(),
            })
            .collect();
        probes.sort_by(|a, b| a.name.cmp(&b.name));
        GuestHealth { agent: agent as i32, since_answer_ms, missed: self.missed, quiet_ms, probes }
    }

    /// Whether the guest is up enough for its services to be probed: its agent answers, or it
    /// has no agent channel at all. A booting guest's services are not probed (nor counted).
    fn up(&self) -> bool {
        self.no_channel || (self.last_answer.is_some() && self.missed == 0)
    }
}

/// Every watched guest's latest state, by UUID; read by each heartbeat. Also the service
/// probes the controller gave for them, with their version.
#[derive(Default)]
pub struct GuestBoard {
    watched: Mutex<HashMap<String, Watched>>,
    probes: Mutex<(u64, HashMap<String, Vec<ServiceProbe>>)>,
}

/// A probe that is due: its guest, the guest's QEMU process, and the probe.
pub struct DueProbe {
    pub uuid: String,
    pub instance: u32,
    pub probe: ServiceProbe,
}

impl GuestBoard {
    /// The version of the probes held, for the heartbeat.
    pub fn probes_version(&self) -> u64 {
        self.probes.lock().unwrap_or_else(|p| p.into_inner()).0
    }

    /// The controller's probes, by VM, replacing those held.
    pub fn set_probes(&self, version: u64, by_vm: Vec<VmProbes>) {
        let map = by_vm.into_iter().map(|v| (v.uuid, v.probes)).collect();
        *self.probes.lock().unwrap_or_else(|p| p.into_inner()) = (version, map);
    }

    /// The probes due at `now` of the guests that are up, each marked as run until its next
    /// interval.
    pub fn due_probes(&self, now: Instant) -> Vec<DueProbe> {
        let probes = self.probes.lock().unwrap_or_else(|p| p.into_inner());
        let mut w = self.watched.lock().unwrap_or_else(|p| p.into_inner());
        let mut due = Vec::new();
        for (uuid, list) in &probes.1 {
            let Some(g) = w.get_mut(uuid).filter(|g| g.up()) else { continue };
            g.probes.retain(|name, _| list.iter().any(|p| &p.name == name));
            for p in list {
                let st = g.probes.entry(p.name.clone()).or_default();
                if st.due.is_none_or(|t| t <= now) {
                    st.due = Some(now + Duration::from_millis(p.interval_ms.max(1_000)));
                    due.push(DueProbe { uuid: uuid.clone(), instance: g.instance, probe: p.clone() });
                }
            }
        }
        due
    }

    /// A probe's result, unless its guest was reset or restarted meanwhile.
    pub fn probe_result(&self, uuid: &str, instance: u32, name: &str, result: Result<(), String>) {
        let mut w = self.watched.lock().unwrap_or_else(|p| p.into_inner());
        let Some(st) =
            w.get_mut(uuid).filter(|g| g.instance == instance).and_then(|g| g.probes.get_mut(name))
        else {
            return;
        };
        match result {
            Ok(()) => {
                st.failures_in_row = 0;
                st.passed_once = true;
                st.last_error.clear();
            }
            Err(e) => {
                st.failures_in_row += 1;
                st.last_error = e;
            }
        }
    }

    pub fn health(&self, uuid: &str) -> Option<GuestHealth> {
        let w = self.watched.lock().unwrap_or_else(|p| p.into_inner());
        w.get(uuid).map(|g| g.health(Instant::now()))
    }

    /// Forgets what was seen of a guest vmha just reset: its agent must answer again before
    /// its silence counts (libvirt keeps the domain's id across a reset).
    pub fn forget(&self, uuid: &str) {
        self.watched.lock().unwrap_or_else(|p| p.into_inner()).remove(uuid);
    }

    fn observe(&self, uuid: &str, now: Instant, check: Option<GuestCheck>) {
        let mut w = self.watched.lock().unwrap_or_else(|p| p.into_inner());
        match check {
            Some(c) => w.entry(uuid.to_string()).or_insert_with(|| Watched::new(c.instance)).observe(now, c),
            None => {
                w.remove(uuid);
            }
        }
    }

    fn keep_only(&self, uuids: &[String]) {
        self.watched.lock().unwrap_or_else(|p| p.into_inner()).retain(|u, _| uuids.contains(u));
    }
}

/// Looks at the protected guests running here every `interval`, forever: their counters in
/// one libvirt call at a time (a hung libvirtd holds one blocking thread, and nothing is
/// learnt meanwhile), then a ping of each. A ping libvirt has not given up on by
/// `PING_WAIT` counts as unanswered for this round and keeps its thread; the next round finds
/// it still running and counts another miss, so misses count rounds, not libvirt's timeouts.
pub async fn run(
    interval: Duration,
    hv: Arc<dyn Hypervisor>,
    lease: Arc<LeaseShell>,
    board: Arc<GuestBoard>,
) {
    let mut looking: Blocking<Vec<(String, Option<GuestLook>)>> = Blocking::new();
    let mut pings: HashMap<String, Blocking<bool>> = HashMap::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let protected = lease.protected_list();
        board.keep_only(&protected);
        pings.retain(|u, _| protected.contains(u));
        if protected.is_empty() {
            continue;
        }
        let hv_look = hv.clone();
        let looks = looking
            .call(LOOK_WAIT, move || {
                // A failed look says nothing: the guest keeps its state.
                protected.into_iter().filter_map(|u| hv_look.guest_look(&u).ok().map(|l| (u, l))).collect()
            })
            .await;
        let Outcome::Done(looks) = looks else { continue };
        for (uuid, look) in looks {
            let Some(look) = look else {
                board.observe(&uuid, Instant::now(), None);
                continue;
            };
            let ping = if !look.channel {
                Ping::NoChannel
            } else {
                let (hv, u) = (hv.clone(), uuid.clone());
                match pings
                    .entry(uuid.clone())
                    .or_default()
                    .call(PING_WAIT, move || hv.guest_ping(&u, PING_WAIT))
                    .await
                {
                    Outcome::Done(true) => Ping::Answered,
                    _ => Ping::Unanswered,
                }
            };
            let check = GuestCheck { instance: look.instance, ping, activity: look.activity };
            board.observe(&uuid, Instant::now(), Some(check));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(instance: u32, ping: Ping, cpu_ns: u64, io_ops: u64) -> GuestCheck {
        GuestCheck { instance, ping, activity: Activity { cpu_ns, io_ops } }
    }

    #[test]
    fn a_guest_is_silent_only_after_it_answered_and_quiet_only_without_cpu_and_io() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut w = Watched::new(7);
        // Booting: nothing answers yet; not silent, however long.
        w.observe(at(0), check(7, Ping::Unanswered, 10, 0));
        w.observe(at(8), check(7, Ping::Unanswered, 20, 5));
        assert_eq!(w.health(at(8)).agent, GuestAgent::Waiting as i32);
        w.observe(at(10), check(7, Ping::Answered, 30, 9));
        let h = w.health(at(11));
        assert_eq!(
            (h.agent, h.since_answer_ms, h.missed, h.quiet_ms),
            (GuestAgent::Answering as i32, 1000, 0, 0)
        );
        // A panic: the vCPU spins, nothing is sent: silent, and quiet since the last look that
        // found it working.
        w.observe(at(12), check(7, Ping::Unanswered, 40, 9));
        w.observe(at(14), check(7, Ping::Unanswered, 50, 9));
        let h = w.health(at(15));
        assert_eq!(
            (h.agent, h.since_answer_ms, h.missed, h.quiet_ms),
            (GuestAgent::Silent as i32, 5000, 2, 5000)
        );
        // The guest sends again while its agent stays slow: not quiet.
        w.observe(at(16), check(7, Ping::Unanswered, 60, 15));
        assert_eq!(w.health(at(16)).quiet_ms, 0);
        // Reset (a new QEMU process after a restart elsewhere, or a new boot): judged afresh.
        w.observe(at(18), check(8, Ping::Unanswered, 1, 0));
        assert_eq!(w.health(at(18)).agent, GuestAgent::Waiting as i32);
    }

    #[test]
    fn io_without_cpu_or_cpu_without_io_is_not_activity() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut w = Watched::new(1);
        w.observe(at(0), check(1, Ping::Answered, 100, 100));
        w.observe(at(2), check(1, Ping::Unanswered, 100, 200));
        assert_eq!(w.health(at(2)).quiet_ms, 2000, "I/O counters moved but the vCPUs did not run");
        w.observe(at(4), check(1, Ping::Unanswered, 900, 300));
        assert_eq!(w.health(at(4)).quiet_ms, 0, "both moved");
        let mut spin = Watched::new(1);
        spin.observe(at(0), check(1, Ping::Answered, 100, 100));
        spin.observe(at(2), check(1, Ping::Unanswered, 5000, 100));
        assert_eq!(spin.health(at(2)).quiet_ms, 2000, "a spinning vCPU that sends nothing");
        let mut none = Watched::new(1);
        none.observe(at(0), check(1, Ping::NoChannel, 1, 1));
        assert_eq!(none.health(at(0)).agent, GuestAgent::None as i32);
    }
}
