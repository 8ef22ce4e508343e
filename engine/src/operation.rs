//! Operations: the commands the controller sends to agents (start, live-migrate, destroy a
//! VM), each with an id the agent's result names, a purpose that says which state machine
//! waits for it, and a state that only `Engine::set_op_state` changes.

use std::fmt;

use crate::Millis;

/// An operation's id: the leader's epoch and a sequence number, so ids never repeat across
/// leaders and the engine needs no randomness. Shown and stored as a UUID.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OpId(pub u128);

impl OpId {
    pub fn new(epoch: u64, seq: u64) -> OpId {
        OpId(((epoch as u128) << 64) | seq as u128)
    }

    /// Parses the UUID form (as `Display` writes it, or any UUID an earlier version stored).
    pub fn parse(s: &str) -> Option<OpId> {
        let hex: String = s.chars().filter(|c| *c != '-').collect();
        if hex.len() != 32 {
            return None;
        }
        u128::from_str_radix(&hex, 16).ok().map(OpId)
    }
}

impl fmt::Display for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = format!("{:032x}", self.0);
        write!(f, "{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
    }
}

/// How long an agent may take to destroy a VM whose shutdown timed out (its libvirt calls'
/// own timeout).
pub const SHUTDOWN_DESTROY_MS: u64 = 30_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// Define and start the VM on `target`.
    Start,
    /// Live-migrate it from `source` to `target`.
    Migrate,
    /// Destroy (power off) it on `source`.
    Destroy,
    /// Shut it down on `source` (the operator's `vmha vm stop`): gracefully, then destroyed
    /// once its timeout (`overrides.timeout_ms`) has passed.
    Shutdown,
    /// Reset it on `source` (a hung guest): the same QEMU process reboots the guest.
    Reset,
    /// Destroy it on `source` and start it there again (a reset that did not help).
    PowerCycle,
}

impl OpKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::Start => "start",
            OpKind::Migrate => "migrate",
            OpKind::Destroy => "destroy",
            OpKind::Shutdown => "shutdown",
            OpKind::Reset => "reset",
            OpKind::PowerCycle => "power_cycle",
        }
    }

    pub fn parse(s: &str) -> Option<OpKind> {
        match s {
            "start" => Some(OpKind::Start),
            "migrate" => Some(OpKind::Migrate),
            "destroy" => Some(OpKind::Destroy),
            "shutdown" => Some(OpKind::Shutdown),
            "reset" => Some(OpKind::Reset),
            "power_cycle" => Some(OpKind::PowerCycle),
            _ => None,
        }
    }
}

/// Why the operation runs: which state machine takes its result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// A restart after its host died (the VM's recovery).
    Restart,
    /// A drain's live migration.
    Drain,
    /// Back to its preferred host.
    Failback,
    /// An operator's `vmha migrate`.
    Operator,
    /// A drain's cold restart (`--allow-restart`): the destroy on `source`, then the start on
    /// `target`.
    ColdRestart,
    /// A copy on a host that came back after it was declared dead.
    StaleCopy,
    /// A hung guest, reset in place (`guest_reset`).
    GuestReset,
}

impl Purpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Restart => "restart",
            Purpose::Drain => "drain",
            Purpose::Failback => "failback",
            Purpose::Operator => "operator",
            Purpose::ColdRestart => "cold_restart",
            Purpose::StaleCopy => "stale_copy",
            Purpose::GuestReset => "guest_reset",
        }
    }

    pub fn parse(s: &str) -> Option<Purpose> {
        match s {
            "restart" => Some(Purpose::Restart),
            "drain" => Some(Purpose::Drain),
            "failback" => Some(Purpose::Failback),
            "operator" => Some(Purpose::Operator),
            "cold_restart" => Some(Purpose::ColdRestart),
            "stale_copy" => Some(Purpose::StaleCopy),
            "guest_reset" => Some(Purpose::GuestReset),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpState {
    /// Being written to the database; its command is sent once it is there.
    Recording,
    /// Sent to the agent that carries it out (or begun by an earlier leader).
    Running,
    Succeeded,
    Failed,
    /// Never sent: no longer wanted once recorded.
    Aborted,
    /// Stopped on an operator's request (`Operation::cancelled_by`) before it could end.
    Cancelled,
}

impl OpState {
    /// The state's name in the database and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            OpState::Recording => "pending",
            OpState::Running => "running",
            OpState::Succeeded => "succeeded",
            OpState::Failed => "failed",
            OpState::Aborted => "aborted",
            OpState::Cancelled => "cancelled",
        }
    }

    pub fn ended(self) -> bool {
        matches!(self, OpState::Succeeded | OpState::Failed | OpState::Aborted | OpState::Cancelled)
    }
}

/// Bandwidth and timeout an operator chose for one migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overrides {
    pub bandwidth_mib_s: u64,
    pub timeout_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operation {
    pub id: OpId,
    pub kind: OpKind,
    pub purpose: Purpose,
    pub vm_uuid: String,
    pub vm_name: String,
    pub source: String,
    pub target: String,
    /// Who asked: "controller" or an operator.
    pub actor: String,
    pub state: OpState,
    pub error: String,
    /// After this, with no result, it is settled from what the agents report.
    pub deadline: Millis,
    pub overrides: Option<Overrides>,
    /// Begun by an earlier leader: its result may be lost, so reports settle it too.
    pub inherited: bool,
    /// What its agent said when it ended.
    pub done: Done,
    /// An operator asked to cancel it: who. It ends as cancelled unless it succeeded first.
    pub cancelled_by: Option<String>,
}

impl Operation {
    /// When an operation sent at `sent` is settled from reports if no result came: its
    /// timeout (the operator's or the policy's migration timeout; a shutdown's, and the
    /// destroy after it), then a grace for the result.
    pub fn deadline(
        kind: OpKind,
        overrides: Option<Overrides>,
        policy: &crate::Policy,
        sent: Millis,
    ) -> Millis {
        let timeout = overrides.map_or(policy.migration_timeout_ms, |o| o.timeout_ms);
        let destroy = if kind == OpKind::Shutdown { SHUTDOWN_DESTROY_MS } else { 0 };
        Millis(sent.0.saturating_add(timeout).saturating_add(destroy).saturating_add(policy.result_grace_ms))
    }

    /// The host that carries it out, and alone may report on it.
    pub fn executor(&self) -> &str {
        match self.kind {
            OpKind::Start => &self.target,
            OpKind::Migrate | OpKind::Destroy | OpKind::Shutdown | OpKind::Reset | OpKind::PowerCycle => {
                &self.source
            }
        }
    }

    /// "live migration of dns1 from kvm1 to kvm2" and the like, for messages.
    pub fn describe(&self) -> String {
        match self.kind {
            OpKind::Start => format!("start of {} on {}", self.vm_name, self.target),
            OpKind::Migrate => {
                format!("live migration of {} from {} to {}", self.vm_name, self.source, self.target)
            }
            OpKind::Destroy => format!("destroy of {} on {}", self.vm_name, self.source),
            OpKind::Shutdown => format!("shutdown of {} on {}", self.vm_name, self.source),
            OpKind::Reset => format!("reset of {} on {}", self.vm_name, self.source),
            OpKind::PowerCycle => format!("destroy and start of {} on {}", self.vm_name, self.source),
        }
    }
}

/// What an agent said when the operation ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Done {
    pub elapsed_ms: u64,
    pub downtime_ms: u64,
    pub bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_print_as_uuids_and_parse_back() {
        let id = OpId::new(7, 42);
        let s = id.to_string();
        assert_eq!(s, "00000000-0000-0007-0000-00000000002a");
        assert_eq!(OpId::parse(&s), Some(id));
        assert_eq!(OpId::parse("not-a-uuid"), None);
    }
}
