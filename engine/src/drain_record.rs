//! What a drain is, as it is kept in the cluster state and the database: its steps, one per
//! VM, and how each stands. The decisions that move them are in `drain`.

/// Who asked for the drain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DrainCause {
    /// `vmha host drain`: ends in maintenance.
    Operator,
    /// Health probes failed: the host stays active and takes VMs again once healthy.
    Degraded,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum StepState {
    /// Waiting for a migration slot.
    Pending,
    /// Live migration in flight to `target`.
    Migrating {
        target: String,
    },
    Migrated {
        target: String,
    },
    /// Live migration failed and the operator allowed a cold restart: destroyed here, then
    /// started on `target`.
    Restarting {
        target: String,
    },
    Restarted {
        target: String,
    },
    /// Every try failed.
    Failed {
        error: String,
    },
    /// No host can take it; it stays where it is.
    Stuck {
        reason: String,
    },
}

impl StepState {
    pub fn as_str(&self) -> &'static str {
        match self {
            StepState::Pending => "pending",
            StepState::Migrating { .. } => "migrating",
            StepState::Migrated { .. } => "migrated",
            StepState::Restarting { .. } => "restarting",
            StepState::Restarted { .. } => "restarted",
            StepState::Failed { .. } => "failed",
            StepState::Stuck { .. } => "stuck",
        }
    }

    pub fn finished(&self) -> bool {
        match self {
            StepState::Migrated { .. }
            | StepState::Restarted { .. }
            | StepState::Failed { .. }
            | StepState::Stuck { .. } => true,
            StepState::Pending | StepState::Migrating { .. } | StepState::Restarting { .. } => false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DrainStep {
    pub vm_uuid: String,
    pub vm_name: String,
    pub protected: bool,
    /// The planned target (a dry run's answer); the actual one is chosen when it starts.
    pub planned: Option<String>,
    pub why: String,
    pub state: StepState,
    pub tried: Vec<String>,
}

impl DrainStep {
    /// The one way a step changes. A change its life never makes (a result for a step that
    /// waits for none, say) is refused and the step kept as it was.
    pub fn advance(&mut self, to: StepState) -> Result<(), StepRefused> {
        use StepState::*;
        let allowed = matches!(
            (&self.state, &to),
            (Pending, Migrating { .. } | Migrated { .. } | Stuck { .. })
                | (Migrating { .. }, Migrated { .. } | Pending | Failed { .. } | Restarting { .. })
                | (Restarting { .. }, Restarted { .. } | Failed { .. } | Pending)
        );
        if !allowed {
            return Err(StepRefused { vm: self.vm_name.clone(), from: self.state.as_str(), to: to.as_str() });
        }
        self.state = to;
        Ok(())
    }
}

/// A drain step asked to change in a way it never does.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the drain step of {vm} cannot go from {from} to {to}")]
pub struct StepRefused {
    pub vm: String,
    pub from: &'static str,
    pub to: &'static str,
}

/// How a drain stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DrainState {
    /// Only a plan (`--dry-run`).
    Planned,
    Draining,
    /// Every VM moved (an operator's drain: the host is in maintenance).
    Done,
    /// Some VMs could not move; they stay, and the host does not enter maintenance.
    Incomplete,
}

impl DrainState {
    pub fn as_str(self) -> &'static str {
        match self {
            DrainState::Planned => "planned",
            DrainState::Draining => "draining",
            DrainState::Done => "done",
            DrainState::Incomplete => "incomplete",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Drain {
    pub cause: DrainCause,
    /// A VM whose live migration fails may be cold-restarted elsewhere.
    pub allow_restart: bool,
    pub state: DrainState,
    pub steps: Vec<DrainStep>,
    pub message: String,
}

impl Drain {
    /// Where a VM of this drain is migrating to right now.
    pub fn heading_to(&self, uuid: &str) -> Option<&str> {
        self.steps.iter().find(|s| s.vm_uuid == uuid).and_then(|s| match &s.state {
            StepState::Migrating { target } | StepState::Restarting { target } => Some(target.as_str()),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_changes_only_along_a_drains_life() {
        let mut step = DrainStep {
            vm_uuid: "a".into(),
            vm_name: "dns1".into(),
            protected: true,
            planned: None,
            why: String::new(),
            state: StepState::Pending,
            tried: Vec::new(),
        };
        let migrated = StepState::Migrated { target: "kvm2".into() };
        assert!(step.advance(StepState::Migrating { target: "kvm2".into() }).is_ok());
        assert!(step.advance(migrated.clone()).is_ok());
        // A late result for a step that ended: refused, and the step stays as it was.
        let late = step.advance(StepState::Failed { error: "timeout".into() });
        assert_eq!(late.unwrap_err().to_string(), "the drain step of dns1 cannot go from migrated to failed");
        assert_eq!(step.state, migrated);
        assert!(step.advance(StepState::Restarting { target: "kvm3".into() }).is_err());
    }
}
