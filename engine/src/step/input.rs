//! What enters a step: what agents and operators say, and the results of what it asked for.

use crate::cluster::HostResources;
use crate::health::Probe;
use crate::inventory::ReportedDomain;
use crate::lease::Echo;
use crate::operation::{Done, OpId, Overrides};
use crate::{FencingMode, Millis, Watchdog};

/// A host's agent registers (again).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub host: String,
    pub migration_uri: String,
    pub peer_address: String,
    pub resources: HostResources,
    pub libvirt_version: String,
    pub lock_manager: String,
    /// For the log: "vmha-agent 0.1.0, libvirt 9.0.0".
    pub describe: String,
}

/// A host's heartbeat, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    pub host: String,
    pub echo: Option<Echo>,
    pub resources: Option<(HostResources, String)>,
    pub watchdog: Watchdog,
    pub probes: Vec<Probe>,
    /// `None`: libvirt did not answer the agent, so this report says nothing of its VMs.
    pub domains: Option<Vec<ReportedDomain>>,
    /// Domain XML that came with the report and passed the controller's checks, by UUID,
    /// with the writable disks it uses.
    pub xml: Vec<(String, String, Vec<String>)>,
    /// Domain XML that came with the report and failed them: UUID and why. The VM keeps the
    /// definition accepted before, if any.
    pub xml_refused: Vec<(String, String)>,
    /// When the controller received it, if earlier than the step that decides it (see
    /// `lease::on_heartbeat`).
    pub arrived: Option<Millis>,
    /// The roster version the agent holds (0: none); `None`: an agent that predates rosters,
    /// which gets the whole one every time.
    pub roster_known: Option<u64>,
    /// The agent says it has self-fenced: it destroyed its protected VMs and starts none
    /// until it holds a lease again.
    pub self_fenced: bool,
    /// The agent's count of its heartbeats (0: not given). One that a later heartbeat of the
    /// same agent overtook (a slow one the agent gave up on, then let go) lists its domains as
    /// they were before that later report's: its list is not taken.
    pub seq: u64,
    /// The version of the service probes the agent holds (0: none).
    pub probes_known: u64,
}

/// A change an operator asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// `vmha protect` / `unprotect`; `None`s leave a setting as it is.
    Protection {
        vm: String,
        protected: bool,
        priority: Option<i32>,
        anti_affinity: Option<String>,
        allowed_hosts: Option<Vec<String>>,
        preferred_host: Option<String>,
        /// Protect it even beyond the host reserve (`admission`); recorded and shown.
        force: bool,
    },
    Migrate {
        vm: String,
        to: String,
        overrides: Option<Overrides>,
    },
    /// `vmha vm probe`: replaces the VM's service probes.
    SetProbes {
        vm: String,
        probes: Vec<crate::service_probe::ServiceProbe>,
    },
    Drain {
        host: String,
        allow_restart: bool,
    },
    /// `abort`: also cancel the drain's live migrations in flight.
    Undrain {
        host: String,
        abort: bool,
    },
    ConfirmDown {
        host: String,
    },
    SetFencing {
        host: String,
        mode: FencingMode,
    },
    SetMemoryLimit {
        host: String,
        limit_kib: Option<u64>,
    },
    /// `vmha host remove`: forget a retired host (no lease, no VMs, no operations).
    RemoveHost {
        host: String,
    },
    /// `vmha vm stop`: shut it down, destroyed after `timeout_ms`; not started again by vmha.
    StopVm {
        vm: String,
        timeout_ms: u64,
    },
    /// `vmha vm start`: start it (on `on`, or where placement says) when no copy may run.
    StartVm {
        vm: String,
        on: Option<String>,
    },
    /// `vmha cancel OP` / `vmha migrate VM --cancel`: abort a live migration in flight (by its
    /// operation, or the VM's); the VM stays on its source.
    Cancel {
        op: Option<OpId>,
        vm: Option<String>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    Register(Registration),
    Heartbeat(Heartbeat),
    /// The operation is in the database: its command may be sent.
    Recorded(OpId),
    /// The agent on `host` says how the operation ended (or the shell could not send it).
    Result {
        host: String,
        id: OpId,
        result: Result<Done, String>,
    },
    /// The external fence command for `host` finished: `Ok` means it is off.
    FenceResult {
        host: String,
        result: Result<String, String>,
    },
    Operator {
        actor: String,
        request: Request,
    },
    Tick,
    /// `vmha protect` waited for the VM's host to know of the protection and for that to be on
    /// record, and one of them did not happen in time: the operator is told what follows.
    ProtectionUnconfirmed {
        actor: String,
        vm: String,
        host: String,
        why: Unconfirmed,
    },
}

/// What a protection still lacks when `vmha protect` answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unconfirmed {
    /// The host has not acknowledged a roster that lists it.
    NotAcknowledged,
    /// The host acknowledged it, but the database has not recorded that (the trouble).
    NotOnRecord(String),
}
