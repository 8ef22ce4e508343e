//! How many VM records a host's reports may still create.

use crate::Millis;

/// A host's budget of new VM records, a token bucket that holds up to a minute's worth
/// (`Policy::new_vms_per_minute`) and refills continuously. Counted in 1/60000 of a VM, so
/// that a millisecond's refill is a whole number.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Discovery {
    /// What is left, in 1/60000 of a VM, as of `at`; `None`: never used (full).
    left: Option<(u64, Millis)>,
    /// VMs of its last report left unrecorded for now, to say so once per spell.
    pub deferred: usize,
}

const PER_MINUTE: u64 = 60_000;

impl Discovery {
    /// Takes up to `want` new records at `now` at `per_minute`; how many it may create.
    pub fn take(&mut self, want: usize, per_minute: u32, now: Millis) -> usize {
        let full = u64::from(per_minute) * PER_MINUTE;
        let left = match self.left {
            None => full,
            Some((left, at)) => {
                left.saturating_add(now.since(at).saturating_mul(u64::from(per_minute))).min(full)
            }
        };
        let granted = (left / PER_MINUTE).min(want as u64);
        self.left = Some((left - granted * PER_MINUTE, now));
        granted as usize
    }
}
