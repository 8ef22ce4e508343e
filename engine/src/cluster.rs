//! The controller's picture of the cluster: desired state loaded from the database plus what
//! agents last reported. Plain data; the engine's functions read and update it.

use std::collections::{BTreeMap, BTreeSet};

use crate::Millis;
use crate::Timings;
use crate::host_lease::HostLease;

/// What the operator wants a host to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminState {
    /// Takes placements.
    Active,
    /// Being emptied by live migration; takes no placements.
    Draining,
    /// Empty on purpose: no placements, not counted as dead, never fenced.
    Maintenance,
}

impl AdminState {
    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::Active => "active",
            AdminState::Draining => "draining",
            AdminState::Maintenance => "maintenance",
        }
    }

    pub fn parse(s: &str) -> Option<AdminState> {
        match s {
            "active" => Some(AdminState::Active),
            "draining" => Some(AdminState::Draining),
            "maintenance" => Some(AdminState::Maintenance),
            _ => None,
        }
    }
}

/// A domain's state as libvirt reports it, reduced to what decisions need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Executing (libvirt "running" or "blocked").
    Running,
    /// Paused; also the state of the incoming side of a live migration.
    Paused,
    /// Being shut down by its guest OS.
    ShuttingDown,
    /// Defined but not running.
    ShutOff,
    /// QEMU died under it.
    Crashed,
    /// Suspended to memory by the guest (power management).
    Suspended,
    /// Its host was declared dead: no copy runs (until a restart elsewhere or the host returns).
    Lost,
    /// No host reports it.
    Unknown,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::ShuttingDown => "shutting_down",
            RunState::ShutOff => "shut_off",
            RunState::Crashed => "crashed",
            RunState::Suspended => "suspended",
            RunState::Lost => "down",
            RunState::Unknown => "unknown",
        }
    }

    /// The state `as_str` names.
    pub fn parse(s: &str) -> Option<RunState> {
        [
            RunState::Running,
            RunState::Paused,
            RunState::ShuttingDown,
            RunState::ShutOff,
            RunState::Crashed,
            RunState::Suspended,
            RunState::Lost,
            RunState::Unknown,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }

    /// A QEMU process exists for the domain: the states in which a second copy would corrupt
    /// its disks.
    pub fn has_process(self) -> bool {
        match self {
            RunState::Running | RunState::Paused | RunState::ShuttingDown | RunState::Suspended => true,
            RunState::ShutOff | RunState::Crashed | RunState::Lost | RunState::Unknown => false,
        }
    }
}

/// What changes a VM's run state. Each change names one, and `VmView::set_run` holds each
/// cause to the states it may lead to, so that a state no cause explains is refused in one
/// place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunCause {
    /// A host's report lists it in this state (libvirt's, or unknown where libvirt says none).
    Reported,
    /// Its host was declared dead.
    HostDead,
    /// A start vmha sent ended well (a restart, a drain's cold restart).
    Started,
    /// It runs elsewhere now: a live migration ended, or the second copy is the one left.
    Moved,
    /// Nobody has reported it: no host lists it any more, or a new leader restored it.
    Unreported,
}

impl RunCause {
    fn may_lead_to(self, to: RunState) -> bool {
        match self {
            RunCause::Reported => to != RunState::Lost,
            RunCause::HostDead => to == RunState::Lost,
            RunCause::Started | RunCause::Moved => to == RunState::Running,
            RunCause::Unreported => to == RunState::Unknown,
        }
    }
}

/// A run state its cause cannot explain.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{vm} cannot become {to} because of {cause:?}")]
pub struct RunRefused {
    pub vm: String,
    pub to: &'static str,
    pub cause: RunCause,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct HostResources {
    pub cpus: u32,
    pub memory_total_kib: u64,
    pub memory_free_kib: u64,
    /// Placement will only move a VM between hosts whose CPU models are compatible.
    pub cpu_model: String,
}

/// How a host that stopped renewing its lease may be declared dead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FencingMode {
    /// The agent destroys its protected VMs when its lease expires (unless its peers confirm
    /// the leader cannot have quorum); the leader waits `lease_ttl + fence_margin` under quorum.
    SelfFence,
    /// A fence command (IPMI, PDU, fence_virsh ...) must confirm power-off first.
    External,
    /// Only `vmha host confirm-down` declares it dead.
    Manual,
}

impl FencingMode {
    pub fn as_str(&self) -> &'static str {
        match self {
            FencingMode::SelfFence => "self",
            FencingMode::External => "external",
            FencingMode::Manual => "manual",
        }
    }

    pub fn parse(s: &str) -> Option<FencingMode> {
        match s {
            "self" => Some(FencingMode::SelfFence),
            "external" => Some(FencingMode::External),
            "manual" => Some(FencingMode::Manual),
            _ => None,
        }
    }
}

/// Whether a host's watchdog would reset it if its agent died or hung, as its agent last said.
/// A self-fencing host may be declared dead on its lease alone only with one: without it, a
/// killed or hung agent leaves its VMs running unfenced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Watchdog {
    /// Its agent has not said (yet).
    #[default]
    Unknown,
    /// Armed with this timeout, which fits the cluster's timings.
    Armed { device: String, timeout_ms: u64 },
    /// Not working, and why.
    Missing(String),
}

impl Watchdog {
    pub fn works(&self) -> bool {
        matches!(self, Watchdog::Armed { .. })
    }

    /// One word for tables: "armed", "missing", "unknown".
    pub fn as_str(&self) -> &'static str {
        match self {
            Watchdog::Unknown => "unknown",
            Watchdog::Armed { .. } => "armed",
            Watchdog::Missing(_) => "missing",
        }
    }
}

/// Why and when a host was declared dead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Death {
    pub at: Millis,
    pub cause: String,
}

impl Death {
    /// What a death's cause says when a fence device or an operator confirmed the host is off
    /// (not only that its lease lapsed).
    pub const OFF: &'static str = "confirmed it is off";

    /// Whether nothing can run on the host: confirmed off, not only silent past its lease (its
    /// agent then destroyed only the VMs it knew were protected).
    pub fn proves_off(&self) -> bool {
        self.cause.contains(Death::OFF)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostView {
    pub name: String,
    pub admin: AdminState,
    pub migration_uri: String,
    /// Where its agent answers peer polls.
    pub peer_address: String,
    pub resources: HostResources,
    pub libvirt_version: String,
    /// libvirt's lock manager there, as its agent reports ("lockd", "none", ...).
    pub lock_manager: String,
    /// Arrival of its last heartbeat, granted or not; `None` until the first one.
    pub last_heartbeat: Option<Millis>,
    /// Arrival of its last heartbeat that listed its domains and earned a lease (so it was
    /// sent at most `max_transit` before).
    pub reported_at: Option<Millis>,
    pub lease: HostLease,
    pub fencing: FencingMode,
    pub watchdog: Watchdog,
    /// Its agent said, in its last heartbeat, that it has self-fenced (not persisted: the next
    /// heartbeat says it again).
    pub self_fenced: bool,
    /// The newest roster version among the answers its agent acknowledged, this leader's or
    /// (restored from the database) an earlier one's: the agent knows of every protection that
    /// roster listed, and keeps its list across restarts. Versions carry the leader's epoch in
    /// their upper half, so they compare across leaders.
    pub roster_acked: Option<u64>,
    pub dead: Option<Death>,
    /// An external fence command is running since then.
    pub fencing_since: Option<Millis>,
    pub health: crate::health::Health,
    /// Memory vmha may place on it, whatever the host has free; `None`: no cap.
    pub memory_limit_kib: Option<u64>,
    /// The current or last drain.
    pub drain: Option<crate::drain_record::Drain>,
    /// The `seq` of the newest heartbeat whose domain list was taken since its agent last
    /// registered (not persisted: a new leader takes the next one).
    pub report_seq: u64,
    /// How many new VMs its reports may still record now; not persisted (a new controller
    /// starts with a full budget).
    pub discovery: crate::discovery::Discovery,
    /// When its last `agent_connected` event was logged, and the registrations since that
    /// were not (see `step::CONNECTED_EVENT_EVERY_MS`); not persisted.
    pub connected_logged: Option<(Millis, u32)>,
}

impl HostView {
    pub fn new(name: &str) -> HostView {
        HostView {
            name: name.into(),
            admin: AdminState::Active,
            migration_uri: String::new(),
            peer_address: String::new(),
            resources: HostResources::default(),
            libvirt_version: String::new(),
            lock_manager: String::new(),
            last_heartbeat: None,
            reported_at: None,
            lease: HostLease::default(),
            fencing: FencingMode::SelfFence,
            watchdog: Watchdog::Unknown,
            self_fenced: false,
            roster_acked: None,
            dead: None,
            fencing_since: None,
            health: Default::default(),
            memory_limit_kib: None,
            drain: None,
            report_seq: 0,
            discovery: Default::default(),
            connected_logged: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmView {
    /// libvirt domain UUID: the identity (names can change).
    pub uuid: String,
    pub name: String,
    /// The host that last reported the domain; `None` when no host does.
    pub host: Option<String>,
    pub state: RunState,
    pub memory_kib: u64,
    pub vcpus: u32,
    pub protected: bool,
    /// When it became protected, on this leader's clock (its start for VMs protected before).
    pub protected_since: Millis,
    /// The first roster version that listed its protection (`None` until a roster is built
    /// after it was protected). Its host's self-fence covers it once the host acknowledged that
    /// version or a later one (`HostView::roster_acked`).
    pub protected_in: Option<u64>,
    /// When the last operation on it ended (its result reached this leader). A report sent
    /// before then may show it as it was before that result: such a report is not taken for it
    /// (`inventory::apply_report`).
    pub settled_at: Millis,
    pub priority: i32,
    /// Set while a migration or other operation owns the VM, so that no second one starts.
    pub busy_with: Option<String>,
    /// The previous leader last recorded it with a running process, and its host has not
    /// reported it to this one yet (its `state` is `Unknown` until then).
    pub recorded_running: bool,
    /// Stopped on purpose with `vmha vm stop` (by whom): vmha does not start it again, even if
    /// protected, until `vmha vm start` (or a report shows it running: started by hand).
    pub stopped_by: Option<String>,
    /// VMs of one group never share a host.
    pub anti_affinity: Option<String>,
    /// Hosts it may run on; empty: any.
    pub allowed_hosts: Vec<String>,
    /// Protected with --force beyond the host reserve: by whom, and what it was short of.
    pub admission_override: Option<String>,
    /// Where it should run when that host is healthy (failback goes there).
    pub preferred_host: Option<String>,
    /// The inactive domain XML, to define it elsewhere; empty until an agent sent it.
    pub xml: String,
    /// The writable disks `xml` uses (files, block devices, network images), as the
    /// controller's checks read them: a disk belongs to one VM only. Derived from `xml` (at a
    /// report, and by the controller when it loads the database).
    pub disks: Vec<String>,
    /// Why the definition its host last reported was refused (the controller's checks on
    /// domain XML); `xml` is then the last one accepted. Not persisted: the host sends its
    /// definitions again to a new controller.
    pub definition_refused: Option<String>,
    /// Set while it must be restarted elsewhere.
    pub recovery: Option<Recovery>,
    /// Another host reports a running copy while `host` still runs it (see
    /// `InventoryChange::TwoCopies`); derived from reports, so a restarted controller finds
    /// it again from the next ones.
    pub second_copy: Option<SecondCopy>,
    /// Its guest's resets in place and alarm (`guest_reset`).
    pub guest_care: crate::guest_reset::GuestCare,
    /// Checks of its services, run by its host's agent (`service_probe`).
    pub probes: Vec<crate::service_probe::ServiceProbe>,
}

/// A copy of a VM on a host other than the one vmha placed it on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecondCopy {
    pub host: String,
    /// When its destroy was last asked for: asked again only after a while (a failed destroy
    /// is retried, a slow one not duplicated).
    pub destroy_asked: Option<Millis>,
}

impl VmView {
    /// The one way its run state changes (a report, a death, a start, a move).
    pub fn set_run(&mut self, to: RunState, cause: RunCause) -> Result<(), RunRefused> {
        if !cause.may_lead_to(to) {
            return Err(RunRefused { vm: self.name.clone(), to: to.as_str(), cause });
        }
        self.state = to;
        Ok(())
    }

    /// `set_run` for the engine's own causes, which a test would catch going wrong.
    pub(crate) fn change_run(&mut self, to: RunState, cause: RunCause) {
        let changed = self.set_run(to, cause);
        debug_assert!(changed.is_ok(), "{changed:?}");
    }

    /// The hosts where a copy of it may run: where it is placed, and a second copy's host.
    pub fn hosts_near(&self) -> impl Iterator<Item = &String> {
        self.host.iter().chain(self.second_copy.as_ref().map(|c| &c.host))
    }

    pub fn new(uuid: &str, name: &str) -> VmView {
        VmView {
            uuid: uuid.into(),
            name: name.into(),
            host: None,
            state: RunState::Unknown,
            memory_kib: 0,
            vcpus: 0,
            protected: false,
            protected_since: Millis(0),
            protected_in: None,
            settled_at: Millis(0),
            priority: 0,
            busy_with: None,
            recorded_running: false,
            stopped_by: None,
            anti_affinity: None,
            allowed_hosts: Vec::new(),
            preferred_host: None,
            admission_override: None,
            xml: String::new(),
            disks: Vec::new(),
            definition_refused: None,
            recovery: None,
            second_copy: None,
            guest_care: Default::default(),
            probes: Vec::new(),
        }
    }
}

/// A protected VM's way back after its host died.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Recovery {
    /// When its host was declared dead.
    pub since: Millis,
    pub attempts: u32,
    /// Hosts where a start failed.
    pub tried: Vec<String>,
    /// A start is in flight there.
    pub starting_on: Option<String>,
    /// Why it is not being started right now.
    pub waiting: Option<String>,
    /// Set when it gave up: the VM needs an operator.
    pub error: Option<String>,
    /// A start was refused because the VM's disk is locked: another copy may run.
    pub disk_locked: Option<DiskLocked>,
    /// It may have moved rather than stopped, since then: it stopped on a live host without
    /// vmha asking (a live migration whose result was missed, a `virsh migrate` by hand), or
    /// its host died while migrating it. It is restarted only once every other live host has
    /// reported since, and not at all if one reports it running.
    #[serde(default)]
    pub may_have_moved_since: Option<Millis>,
    /// The host an operator asked for (`vmha vm start --on`, or the host it is off on).
    #[serde(default)]
    pub on: Option<String>,
}

/// The storage lock (libvirt's lockd, QEMU's image locking) refused a start: the second layer
/// behind fencing caught what may be a second copy. An alarm, not a failure to try elsewhere.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskLocked {
    pub since: Millis,
    /// Where the VM was last seen running (its host before the restart).
    pub last_seen: String,
    /// When a start is tried again: only a start can tell the lock is gone, and a refused one
    /// runs nothing.
    pub retry_at: Millis,
}

impl Recovery {
    pub fn new(since: Millis) -> Recovery {
        Recovery {
            since,
            attempts: 0,
            tried: Vec::new(),
            starting_on: None,
            waiting: None,
            error: None,
            disk_locked: None,
            may_have_moved_since: None,
            on: None,
        }
    }

    /// A start an earlier leader sent to `host` and whose outcome nobody knows: the VM waits
    /// for that host to report it running, or for the host to be declared dead, and is never
    /// started elsewhere meanwhile.
    pub fn in_doubt(host: &str, since: Millis) -> Recovery {
        Recovery { starting_on: Some(host.into()), attempts: 1, ..Recovery::new(since) }
    }
}

/// Knobs of recovery and placement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// A failed restart is retried on another host this many times.
    pub max_relocate: u32,
    /// Restarts in flight at once, cluster-wide.
    pub max_parallel_starts: usize,
    /// vCPUs a host may carry per physical CPU.
    pub vcpu_overcommit: u32,
    /// Move a VM back to its preferred host by live migration once that host has held a lease
    /// without a break for this long; `None`: never (Linux-HA's nice_failback).
    pub failback_after_ms: Option<u64>,
    /// Live migrations at once from one host, and in the whole cluster.
    pub migrations_per_host: usize,
    pub migrations_per_cluster: usize,
    /// Probes failing this long make a host degraded; passing this long make it healthy again.
    pub degraded_after_ms: u64,
    pub recover_after_ms: u64,
    /// Declare self-fencing hosts without a working watchdog dead on their lease alone, as if
    /// they had one (the operator accepted that a killed agent may leave a second copy).
    pub accept_no_watchdog: bool,
    /// A live migration's timeout (the agent aborts it then); operations without a result
    /// are settled from reports a grace period after it.
    pub migration_timeout_ms: u64,
    /// How long past its timeout an operation without a result is settled from reports.
    pub result_grace_ms: u64,
    /// Hosts the cluster admits: a new host registering beyond it is refused.
    pub max_hosts: usize,
    /// VM records one host's reports may create per minute; VMs beyond it are recorded from
    /// its later reports (see `inventory::admit_new`).
    pub new_vms_per_minute: u32,
    /// Admission control (N+k): protecting a VM is refused when losing the worst this many
    /// hosts would leave a protected VM with nowhere to restart (`admission`); 0: no check.
    pub reserve_hosts: usize,
    /// A guest whose agent answered, then stays silent this long with no I/O of its own, is
    /// hung (`guest_reset`).
    pub guest_failure_ms: u64,
    /// How long a guest vmha reset has to answer again before the reset counts as not having
    /// helped (the next one is a destroy and start).
    pub guest_boot_grace_ms: u64,
    /// Resets in place per VM within `guest_reset_window_ms`; past it, an alarm.
    pub guest_resets: u32,
    pub guest_reset_window_ms: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            max_relocate: 2,
            max_parallel_starts: 4,
            vcpu_overcommit: 4,
            failback_after_ms: None,
            migrations_per_host: 2,
            migrations_per_cluster: 4,
            degraded_after_ms: 30_000,
            recover_after_ms: 60_000,
            accept_no_watchdog: false,
            migration_timeout_ms: 300_000,
            result_grace_ms: 60_000,
            max_hosts: 2_000,
            new_vms_per_minute: 600,
            reserve_hosts: 1,
            guest_failure_ms: 10_000,
            guest_boot_grace_ms: 60_000,
            guest_resets: 3,
            guest_reset_window_ms: 3_600_000,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    pub hosts: BTreeMap<String, HostView>,
    /// Keyed by domain UUID.
    pub vms: BTreeMap<String, VmView>,
    pub timings: Timings,
    pub policy: Policy,
    /// Since when the leader has held quorum without a break (see `lease::observe_quorum`).
    pub quorum_since: Option<Millis>,
    /// When this leader took over: no lease of an earlier leader outlives `started + ttl`.
    pub started: Millis,
    /// This leader's epoch.
    pub epoch: u64,
    /// How long before `started` no leader watched (since the previous leader's last sign of
    /// life): a VM found stopped after the takeover may have stopped that long before it. An
    /// outage begun then is dated back to there, so downtime is not under-counted.
    pub unwatched_before_ms: u64,
    /// By host, the VMs that may be placed on it or run a second copy there: a superset,
    /// pruned as it is read (`vms_near`), so that a report costs in proportion to its host's
    /// VMs and not to the cluster's. `None` (a state built by hand) means every VM is looked
    /// at; the engine builds it (`index_vms`) and every placement keeps it (`note_near`).
    pub near: Option<BTreeMap<String, BTreeSet<String>>>,
    /// `lease::observe_quorum`'s bound and the number of hosts it was taken with.
    pub quorum_cache: Option<(Millis, usize)>,
    /// `lease::membership` and the number of hosts it was taken with.
    pub membership_cache: Option<(u64, usize)>,
    /// Which VM each writable disk of an accepted definition belongs to (`VmView::disks`).
    /// An entry whose VM is gone is free again.
    pub disk_owners: BTreeMap<String, String>,
    /// The guests' heartbeats, by VM UUID, from the hosts running them (`guest`).
    pub guests: BTreeMap<String, crate::guest::GuestReport>,
}

/// Notes that VM `uuid` may now be on `host` (placed, or a second copy), for `vms_near`.
pub fn note_near(near: &mut Option<BTreeMap<String, BTreeSet<String>>>, host: &str, uuid: &str) {
    if let Some(near) = near {
        near.entry(host.to_string()).or_default().insert(uuid.to_string());
    }
}

impl ClusterState {
    /// Builds `near` and `disk_owners` from scratch.
    pub fn index_vms(&mut self) {
        let mut near = Some(BTreeMap::new());
        self.disk_owners.clear();
        for vm in self.vms.values() {
            for host in vm.hosts_near() {
                note_near(&mut near, host, &vm.uuid);
            }
            for d in &vm.disks {
                self.disk_owners.insert(d.clone(), vm.uuid.clone());
            }
        }
        self.near = near;
    }

    /// Gives VM `uuid` the writable disks of its newly accepted definition, keeping
    /// `disk_owners` in step.
    pub fn set_disks(&mut self, uuid: &str, disks: Vec<String>) {
        let Some(vm) = self.vms.get_mut(uuid) else { return };
        if vm.disks == disks {
            return;
        }
        for d in &vm.disks {
            if self.disk_owners.get(d).is_some_and(|o| o == uuid) {
                self.disk_owners.remove(d);
            }
        }
        for d in &disks {
            self.disk_owners.insert(d.clone(), uuid.to_string());
        }
        vm.disks = disks;
    }

    /// Another VM (still known) whose definition uses one of `disks`: that disk, and its name.
    pub fn disk_taken(&self, uuid: &str, disks: &[String]) -> Option<(String, String)> {
        disks.iter().find_map(|d| {
            let owner = self.disk_owners.get(d).filter(|o| o.as_str() != uuid)?;
            self.vms.get(owner).map(|vm| (d.clone(), vm.name.clone()))
        })
    }

    /// The VMs placed on `host` or running a second copy there, in UUID order.
    /// The VMs placed on `host` (running or not), through the index when it is built; for
    /// readers that cannot prune it (`vms_near`).
    pub fn vms_placed_on<'a>(&'a self, host: &str) -> Vec<&'a VmView> {
        let placed = |v: &&VmView| v.host.as_deref() == Some(host);
        match &self.near {
            Some(near) => {
                near.get(host).into_iter().flatten().filter_map(|u| self.vms.get(u)).filter(placed).collect()
            }
            None => self.vms.values().filter(placed).collect(),
        }
    }

    pub fn vms_near(&mut self, host: &str) -> Vec<String> {
        let on = |vm: &VmView| vm.hosts_near().any(|h| h == host);
        let vms = &self.vms;
        match self.near.as_mut() {
            None => vms.values().filter(|v| on(v)).map(|v| v.uuid.clone()).collect(),
            Some(near) => {
                let Some(here) = near.get_mut(host) else { return Vec::new() };
                here.retain(|u| vms.get(u).is_some_and(on));
                here.iter().cloned().collect()
            }
        }
    }

    /// Whether `near` (when built) lists every VM where it is: checked by the simulator after
    /// every step.
    pub fn check_near(&self) -> Result<(), String> {
        let Some(near) = &self.near else { return Ok(()) };
        for vm in self.vms.values() {
            for host in vm.hosts_near() {
                if !near.get(host).is_some_and(|n| n.contains(&vm.uuid)) {
                    return Err(format!("VM {} is on {host} but the index does not say so", vm.uuid));
                }
            }
        }
        Ok(())
    }

    /// Finds a VM by UUID or, failing that, by name. Names are unique per host in libvirt but
    /// not across a cluster, so a name that matches two UUIDs is ambiguous.
    pub fn find_vm(&self, key: &str) -> Result<&VmView, crate::Refusal> {
        if let Some(vm) = self.vms.get(key) {
            return Ok(vm);
        }
        let named: Vec<&VmView> = self.vms.values().filter(|vm| vm.name == key).collect();
        // Two records may share a name when one is a leftover no host reports: take the placed one.
        let placed: Vec<&VmView> = named.iter().copied().filter(|vm| vm.host.is_some()).collect();
        let mut by_name = if placed.len() == 1 { placed.into_iter() } else { named.into_iter() };
        match (by_name.next(), by_name.next()) {
            (Some(vm), None) => Ok(vm),
            (Some(a), Some(b)) => Err(crate::Refusal::AmbiguousVm {
                name: key.to_string(),
                uuids: vec![a.uuid.clone(), b.uuid.clone()],
            }),
            (None, _) => Err(crate::Refusal::UnknownVm(key.to_string())),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn a_run_state_parses_back_from_its_name() {
        for name in
            ["running", "paused", "shutting_down", "shut_off", "crashed", "suspended", "down", "unknown"]
        {
            assert_eq!(RunState::parse(name).map(RunState::as_str), Some(name));
        }
        assert_eq!(RunState::parse("gone"), None);
    }

    /// kvm1..kvm3, active, 4 CPUs and 4 GiB free each, no lease yet.
    pub fn three_hosts() -> ClusterState {
        let mut s = ClusterState::default();
        for name in ["kvm1", "kvm2", "kvm3"] {
            let mut h = HostView::new(name);
            h.migration_uri = format!("qemu+tcp://{name}/system");
            h.resources = HostResources {
                cpus: 4,
                memory_total_kib: 8 << 20,
                memory_free_kib: 4 << 20,
                cpu_model: "x86".into(),
            };
            h.watchdog = Watchdog::Armed { device: "/dev/watchdog".into(), timeout_ms: 3_000 };
            s.hosts.insert(name.into(), h);
        }
        s
    }

    /// A running 64 MiB VM on `host`.
    pub fn vm_on(s: &mut ClusterState, uuid: &str, name: &str, host: &str) -> VmView {
        let mut vm = VmView::new(uuid, name);
        vm.host = Some(host.into());
        vm.state = RunState::Running;
        vm.memory_kib = 65_536;
        vm.vcpus = 1;
        vm.xml = format!("<domain><name>{name}</name></domain>");
        s.vms.insert(uuid.into(), vm.clone());
        vm
    }

    #[test]
    fn a_run_state_changes_only_as_its_cause_allows() {
        let mut vm = VmView::new("a", "dns1");
        assert!(vm.set_run(RunState::Running, RunCause::Reported).is_ok());
        assert!(vm.set_run(RunState::Lost, RunCause::HostDead).is_ok());
        // Only vmha declares a VM down; a report never does, nor does a start leave it stopped.
        let refused = vm.set_run(RunState::Lost, RunCause::Reported).unwrap_err();
        assert_eq!(refused.to_string(), "dns1 cannot become down because of Reported");
        assert!(vm.set_run(RunState::ShutOff, RunCause::Started).is_err());
        assert_eq!(vm.state, RunState::Lost);
        assert!(vm.set_run(RunState::Running, RunCause::Started).is_ok());
    }
}
