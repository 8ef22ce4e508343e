//! A host's health as its probes report it.

use crate::Millis;

/// One health probe's latest result, as the agent reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// A host's health as its probes tell it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Health {
    pub probes: Vec<Probe>,
    pub failing_since: Option<Millis>,
    pub passing_since: Option<Millis>,
    /// Failing for `degraded_after`: no placements, VMs migrated away.
    pub degraded: bool,
}

impl Health {
    pub fn failing_summary(&self) -> String {
        let f: Vec<String> =
            self.probes.iter().filter(|p| !p.ok).map(|p| format!("{}: {}", p.name, p.detail)).collect();
        if f.is_empty() { "no probe failing".into() } else { f.join("; ") }
    }

    /// "healthy" | "failing" | "degraded"
    pub fn as_str(&self) -> &'static str {
        match (self.degraded, self.failing_since.is_some()) {
            (true, _) => "degraded",
            (false, true) => "failing",
            (false, false) => "healthy",
        }
    }
}
