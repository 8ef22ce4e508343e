//! Why a protected VM's restart, or its failback, waits: what `vmha vm show`, `status` and the
//! `restart_waiting` events say.

use crate::placement::NoHost;
use crate::time::secs;

/// Why a restart is not started now.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RestartWait {
    /// A drain's cold restart, or another operation, owns the VM: one start at a time.
    #[error("busy with {0}")]
    Busy(String),
    /// A host that may have received the VM (by a move nobody saw end) has not reported since.
    #[error(
        "waiting for {host} to report (or be declared dead): {vm} may have been moved there since it was last seen"
    )]
    Unheard { host: String, vm: String },
    #[error("waiting for one of the {0} restarts in flight")]
    InFlight(usize),
    #[error("no domain definition accepted (the one its host sent was refused: {0})")]
    DefinitionRefused(String),
    #[error("no domain definition known (its host never sent one)")]
    NoDefinition,
    #[error("the host an operator asked for cannot take it ({0})")]
    AskedHostUnfit(String),
    #[error(transparent)]
    NoHost(#[from] NoHost),
}

/// Why a VM away from its preferred host stays where it is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FailbackWait {
    #[error("its host {0} is being drained, which moves it")]
    HostDraining(String),
    #[error("away from its preferred host {0}: failback is off (the controller's --failback-after)")]
    Off(String),
    #[error("its preferred host {0} is unknown")]
    UnknownHost(String),
    #[error("its preferred host {host} is {liveness}")]
    NotOnline { host: String, liveness: &'static str },
    #[error("its preferred host {host} fails its own health probes ({why})")]
    Unhealthy { host: String, why: String },
    #[error("its preferred host {host} has held a lease for {} of the {} failback waits for", secs(*held_ms), secs(*after_ms))]
    NotSettled { host: String, held_ms: u64, after_ms: u64 },
    #[error("operation {0} is in flight: failback moves one VM at a time, when nothing else moves")]
    Busy(String),
    #[error("its preferred host cannot take it: {0}")]
    Unfit(String),
}
