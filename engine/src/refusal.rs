//! The engine's one error type: why it will not do what was asked. The controller maps each
//! variant to a gRPC status code in one place (`controller/src/errors.rs`).

/// Why the controller will not do what was asked. Each message names the VM or host and says
/// what to do, because it is printed to the operator as it is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no VM named or with UUID '{0}' is known; `vmha vm ls` lists the VMs agents report")]
    UnknownVm(String),
    #[error("the name '{name}' matches several VMs ({}); use the UUID", uuids.join(", "))]
    AmbiguousVm { name: String, uuids: Vec<String> },
    #[error("no host named '{0}' is known; `vmha host ls` lists the hosts")]
    UnknownHost(String),
    #[error("VM {vm} already runs on {host}; nothing to do")]
    AlreadyOnTarget { vm: String, host: String },
    #[error("VM {vm} is {state} on no host; only a running VM can be live-migrated")]
    NotPlaced { vm: String, state: &'static str },
    #[error("VM {vm} is {state} on {host}; only a running VM can be live-migrated")]
    NotRunning { vm: String, host: String, state: &'static str },
    #[error("VM {vm} is busy with operation {operation}; wait for it (`vmha events`) and retry")]
    Busy { vm: String, operation: String },
    #[error(
        "host {host} is {liveness}: it holds no lease (no timely heartbeat); \
         check vmha-agent and libvirtd on {host}"
    )]
    HostDown { host: String, liveness: &'static str },
    #[error("host {host} is in {admin}; `vmha host undrain {host}` makes it take VMs again")]
    HostNotActive { host: String, admin: &'static str },
    #[error(
        "host {host} has {free_mib} MiB free, VM {vm} needs {need_mib} MiB; \
         pick another host or free memory on {host}"
    )]
    NoRoom { vm: String, host: String, free_mib: u64, need_mib: u64 },
    #[error("{0} holds a lease (its agent sent a heartbeat within the lease); it is not down")]
    HostOnline(String),
    #[error(
        "host {host} is not admitted: the cluster already has {hosts} hosts, the most it takes \
         (the controller's --max-hosts)"
    )]
    TooManyHosts { host: String, hosts: usize },
    #[error(
        "host {host} still has {what}; drain it first (`vmha host drain {host}`), or wait for them to end"
    )]
    HostInUse { host: String, what: String },
    #[error("host {0} has not registered with this controller")]
    NotRegistered(String),
    #[error("operation {0} is not in flight")]
    UnknownOperation(String),
    #[error(
        "protecting {vm} would break the host reserve: {why}. Add capacity, unprotect another VM, or run \
         `vmha protect {vm} --force` (the override is recorded and shown by `vmha status`)"
    )]
    BeyondReserve { vm: String, why: String },
    #[error("no live migration of {0} is in flight; `vmha events` shows how the last one ended")]
    NothingToCancel(String),
    #[error("cannot cancel the {what}: {why}")]
    CannotCancel { what: String, why: String },
    #[error("cannot start {vm}: {why}")]
    CannotStart { vm: String, why: String },
    #[error("cannot stop {vm}: {why}")]
    CannotStop { vm: String, why: String },
    #[error("the service probes given for {vm} are refused: {why}")]
    BadProbes { vm: String, why: String },
    #[error("operation {operation} does not run on {host}")]
    NotExecutor { operation: String, host: String },
}
