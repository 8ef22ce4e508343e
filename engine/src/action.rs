//! What the decision modules (`recovery`, `drain`) ask the step to carry out (`step::perform`).

use crate::availability::OutageMark;
use crate::event::Event;
use crate::operation::Purpose;

/// What the shell must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Record that the host was declared dead, and why.
    DeclaredDead { host: String, cause: String },
    /// Run the external fence command for the host.
    Fence { host: String },
    /// Define and start the VM on `host` (its XML is in the state).
    Start { vm_uuid: String, vm_name: String, host: String },
    /// Live-migrate the VM to `host`: `Purpose::Failback` (to its preferred host) or
    /// `Purpose::Drain`.
    Migrate { vm_uuid: String, vm_name: String, host: String, purpose: Purpose },
    /// Destroy the VM on `from`, then start it on `to` (a drain the operator allowed to
    /// restart VMs that cannot be live-migrated).
    ColdRestart { vm_uuid: String, vm_name: String, from: String, to: String },
    /// Reset a hung guest on the host running it; `hard`: destroy it and start it again there.
    ResetGuest { vm_uuid: String, vm_name: String, host: String, hard: bool },
    /// A hung guest on a host failing its own health probes: destroy it on `from`, then, once
    /// that is confirmed and every other host has reported since, start it on `to`.
    MoveHungGuest { vm_uuid: String, vm_name: String, from: String, to: String },
    /// Destroy a stale copy on a host that came back (fencing was bypassed).
    DestroyStale { vm_uuid: String, vm_name: String, host: String },
    /// Write an event.
    Event(Event),
    /// Keep in the outage history.
    Outage(OutageMark),
}
