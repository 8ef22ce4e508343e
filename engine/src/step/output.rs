//! What comes out of a step: the reply, the operations and commands, the events, and what to
//! persist.

use std::sync::Arc;

use crate::Refusal;
use crate::availability::OutageMark;
use crate::cluster::Recovery;
use crate::drain_record::Drain;
use crate::event::Event;
use crate::guest_reset::GuestCare;
use crate::lease::LeaseAnswer;
use crate::operation::{OpId, Operation};
use crate::roster::{Roster, RosterUpdate};
use crate::{AdminState, FencingMode, HostView, Millis};

/// A host's work in progress, persisted so that a restarted controller resumes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostWork {
    pub admin: AdminState,
    pub fencing: FencingMode,
    pub memory_limit_kib: Option<u64>,
    /// Why it was declared dead; it stays dead until it reports again.
    pub dead: Option<String>,
    pub drain: Option<Drain>,
    /// Kept so that a new leader knows what the host's agent knew of the protected VMs: a
    /// leader and a host lost together must not leave that host's VMs waiting for an operator.
    pub roster_acked: Option<u64>,
    /// The membership its agent counts votes among, when the leader is sure of it
    /// (`HostLease::settled_members`): without it, a new leader could not tell a host that
    /// missed a join or a removal just before both failed.
    pub members_acked: Option<u64>,
}

/// A VM's desired state and work in progress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmWork {
    pub protected: bool,
    /// Protected with --force beyond the host reserve: by whom, and what it was short of.
    pub admission_override: Option<String>,
    pub priority: i32,
    pub anti_affinity: Option<String>,
    pub allowed_hosts: Vec<String>,
    pub preferred_host: Option<String>,
    /// Its restart after a host failure, while one is under way.
    pub recovery: Option<Recovery>,
    /// Stopped with `vmha vm stop`: by whom.
    pub stopped_by: Option<String>,
    /// The roster version that first listed its protection (`VmView::protected_in`).
    pub protected_in: Option<u64>,
    /// Its guest's resets and alarm (`guest_reset`).
    pub guest_care: GuestCare,
    pub probes: Vec<crate::service_probe::ServiceProbe>,
}

impl HostWork {
    pub fn of(h: &HostView) -> HostWork {
        HostWork {
            admin: h.admin,
            fencing: h.fencing.clone(),
            memory_limit_kib: h.memory_limit_kib,
            dead: h.dead.as_ref().map(|d| d.cause.clone()),
            drain: h.drain.clone(),
            roster_acked: h.roster_acked,
            members_acked: h.lease.settled_members(),
        }
    }
}

impl VmWork {
    /// Gives `vm` these settings: as persisted (a restored controller), or as they were before
    /// a refused change.
    pub fn apply_to(&self, vm: &mut crate::VmView) {
        vm.protected = self.protected;
        vm.admission_override = self.admission_override.clone();
        vm.priority = self.priority;
        vm.anti_affinity = self.anti_affinity.clone();
        vm.allowed_hosts = self.allowed_hosts.clone();
        vm.preferred_host = self.preferred_host.clone();
        vm.recovery = self.recovery.clone();
        vm.stopped_by = self.stopped_by.clone();
        vm.protected_in = self.protected_in;
        vm.guest_care = self.guest_care.clone();
        vm.probes = self.probes.clone();
    }

    pub fn of(vm: &crate::VmView) -> VmWork {
        VmWork {
            protected: vm.protected,
            admission_override: vm.admission_override.clone(),
            priority: vm.priority,
            anti_affinity: vm.anti_affinity.clone(),
            allowed_hosts: vm.allowed_hosts.clone(),
            preferred_host: vm.preferred_host.clone(),
            recovery: vm.recovery.clone(),
            stopped_by: vm.stopped_by.clone(),
            protected_in: vm.protected_in,
            guest_care: GuestCare { noted: None, ..vm.guest_care.clone() },
            probes: vm.probes.clone(),
        }
    }
}

/// The leader's answer to a heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseReply {
    pub answer: LeaseAnswer,
    /// When to send the next one, aligned on the leader's clock.
    pub next_in_ms: u64,
    pub cluster_hosts: u32,
    /// The peers and the protected VMs (which the host's agent destroys if it fences).
    pub roster: Arc<Roster>,
    /// What the answer carries of it, for the roster version the agent said it holds.
    pub roster_update: RosterUpdate,
    /// Domains whose XML came with this heartbeat but were not recorded yet
    /// (`inventory::admit_new`): the agent sends their XML again.
    pub xml_not_taken: Vec<String>,
    /// The service probes of the protected VMs the host runs, when the agent does not hold
    /// their version: the version, and the probes by VM.
    pub service_probes: Option<(u64, crate::service_probe::ProbesByVm)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Nothing to answer (a tick, a fence verdict).
    None,
    Registered {
        stamp: Millis,
    },
    Lease(LeaseReply),
    /// The request was carried out; it concerned this VM (UUID).
    Vm(String),
    /// The request was carried out; it concerned this host.
    Host(String),
    /// An operation was begun.
    Operation(OpId),
    Refused(Refusal),
}

/// A command for an agent, sent once its operation is recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    pub op: OpId,
    /// The host whose agent carries it out.
    pub host: String,
    /// The VM's name, for the agent's log lines.
    pub vm: String,
    pub kind: CommandKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandKind {
    Start {
        uuid: String,
        xml: String,
    },
    /// `timeout_ms`: the operator's or the policy's, the one the deadline counts on;
    /// `bandwidth_mib_s`: the operator's, else the shell's default.
    Migrate {
        uuid: String,
        dest_uri: String,
        bandwidth_mib_s: Option<u64>,
        timeout_ms: u64,
    },
    Destroy {
        uuid: String,
    },
    /// A graceful shutdown, then a destroy if it has not ended within `timeout_ms`.
    Shutdown {
        uuid: String,
        timeout_ms: u64,
    },
    /// Reset a hung guest; `hard`: destroy the domain and start it again on the same host
    /// (through the same lease check as every start).
    Reset {
        uuid: String,
        hard: bool,
    },
    /// Abort the job (a live migration) that operation `op` of the command runs on the VM. No
    /// result of its own: the migration's says how it ended.
    Cancel {
        uuid: String,
    },
}

/// What to write to the database after this step, named; the shell writes each as the state
/// now has it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Persist {
    /// Hosts whose registration (addresses, resources) is new.
    pub registered: Vec<String>,
    /// Hosts whose watchdog changed.
    pub watchdog: Vec<String>,
    pub host_work: Vec<(String, HostWork)>,
    /// VMs whose observed state (host, run state, sizes) changed.
    pub vms: Vec<String>,
    /// VMs no host reports any more, dropped from the inventory.
    pub forgotten: Vec<String>,
    pub vm_work: Vec<(String, VmWork)>,
    /// VMs whose domain XML changed.
    pub xml: Vec<String>,
    /// Hosts an operator removed.
    pub removed_hosts: Vec<String>,
    /// Operations whose row changed (begun, sent, ended), as they are now.
    pub ops: Vec<Operation>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    pub reply: Reply,
    pub events: Vec<Event>,
    /// Operations to write down before anything else; once written, feed `Input::Recorded`.
    pub record: Vec<OpId>,
    pub commands: Vec<Command>,
    /// Run the external fence command for these hosts; feed back `Input::FenceResult`.
    pub fence: Vec<String>,
    pub persist: Persist,
    /// For the outage history (`vmha report`).
    pub outages: Vec<OutageMark>,
}

impl Default for Output {
    fn default() -> Output {
        Output {
            reply: Reply::None,
            events: Vec::new(),
            record: Vec::new(),
            commands: Vec::new(),
            fence: Vec::new(),
            persist: Persist::default(),
            outages: Vec::new(),
        }
    }
}
