//! How much one caller may ask per second. A host or an operator holds a valid certificate and
//! is still untrusted: a runaway agent re-registering in a loop (each registration is an event
//! row) or a script hammering `vmha status` must not starve the heartbeats that keep leases.
//! Each limit is per caller (the name on its certificate, or the host it claims under
//! `--insecure-dev`), so one noisy caller never spends another's allowance.

use std::num::NonZeroU32;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::errors::Error;

pub struct PerCaller {
    limiter: DefaultKeyedRateLimiter<String>,
    what: &'static str,
    per_second: u32,
}

impl PerCaller {
    /// At most `per_second` requests of `what` per second from each caller, after a burst of
    /// `burst`.
    pub fn new(what: &'static str, per_second: u32, burst: u32) -> PerCaller {
        let nz = |n: u32| NonZeroU32::new(n.max(1)).expect("at least 1");
        let quota = Quota::per_second(nz(per_second)).allow_burst(nz(burst));
        PerCaller { limiter: RateLimiter::keyed(quota), what, per_second }
    }

    /// Admits one request of `caller`, or refuses it saying so.
    pub fn admit(&self, caller: &str) -> Result<(), Error> {
        if self.limiter.check_key(&caller.to_string()).is_ok() {
            return Ok(());
        }
        // Keys of callers quiet for a while go, so that the table stays the size of the
        // callers that are busy now.
        if self.limiter.len() > 4096 {
            self.limiter.retain_recent();
        }
        Err(Error::TooMany(format!(
            "{caller} sent more than {} {} per second; this one was refused, nothing was done (a stuck loop on \
             {caller}? its next ones are taken once it slows down)",
            self.per_second, self.what
        )))
    }
}

/// An agent's limits. Agents send one heartbeat a second (a few more when their VMs change)
/// and register once per connection. An agent's requests count only where a leader takes
/// them: a refusal must never cost an honest agent its lease (the lab found one: an agent
/// restarted during a takeover spent its registrations on the standby, was refused by the new
/// leader, and self-fenced).
pub struct AgentLimits {
    pub register: PerCaller,
    pub heartbeat: PerCaller,
}

impl Default for AgentLimits {
    fn default() -> AgentLimits {
        AgentLimits {
            register: PerCaller::new("registrations", 2, 30),
            heartbeat: PerCaller::new("heartbeats", 20, 60),
        }
    }
}

/// An operator's limit: their tools poll every second or two.
pub fn operator_requests() -> PerCaller {
    PerCaller::new("requests", 50, 200)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_taken_then_refused_and_other_callers_are_untouched() {
        let limit = PerCaller::new("registrations", 1, 3);
        for _ in 0..3 {
            limit.admit("kvm9").unwrap();
        }
        let refused = limit.admit("kvm9").unwrap_err().to_string();
        assert!(refused.starts_with("kvm9 sent more than 1 registrations per second"), "{refused}");
        limit.admit("kvm1").unwrap();
    }
}
