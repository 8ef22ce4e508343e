//! The one set of timings the safety rule runs on. The controller owns it (its flags), checks
//! it at start, and sends it to every agent at registration; an agent never uses timings of
//! its own, because the rule's arithmetic holds only when both sides use the same numbers
//! (engine/SAFETY.md, "Timings").

/// The timing knobs of the safety rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timings {
    pub heartbeat_interval_ms: u64,
    pub lease_ttl_ms: u64,
    pub fence_margin_ms: u64,
    /// Longest a heartbeat may spend in flight and still earn a lease.
    pub max_transit_ms: u64,
    /// Time kept back from the fence margin for one more peer poll, the destroy itself, and a
    /// watchdog reset.
    pub guard_ms: u64,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            heartbeat_interval_ms: 1_000,
            lease_ttl_ms: 5_000,
            fence_margin_ms: 1_000,
            max_transit_ms: 150,
            guard_ms: 500,
        }
    }
}

/// Why a set of timings, or a watchdog timeout under them, cannot keep the rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TimingsError {
    #[error(
        "heartbeat interval {interval} ms is too short: at least 100 ms (peers are polled every fifth of it)"
    )]
    IntervalTooShort { interval: u64 },
    #[error(
        "lease TTL {ttl} ms must be at least 3 heartbeat intervals ({min} ms): peers are polled from an interval \
         before a lease ends, and a lease must outlast two missed renewals before that"
    )]
    LeaseTooShort { ttl: u64, min: u64 },
    #[error(
        "fence margin {margin} ms must exceed the guard ({guard} ms) by at least one peer poll ({poll} ms): \
         an agent needs that long to confirm the leader lacks quorum before it may be declared dead"
    )]
    MarginTooShort { margin: u64, guard: u64, poll: u64 },
    #[error(
        "max transit {transit} ms must be under half the heartbeat interval ({interval} ms), or prompt \
         heartbeats would be refused leases"
    )]
    TransitTooLong { transit: u64, interval: u64 },
    #[error(
        "watchdog timeout {timeout} ms does not fit: with lease TTL {ttl} ms, fence margin {margin} ms and \
         heartbeat interval {interval} ms the agent may feed the watchdog only while the host can still be \
         reset before the controller may declare it dead, so the timeout must be at most {max} ms; set a \
         shorter --watchdog-timeout or a longer --lease-ttl on the controller"
    )]
    WatchdogTooLong { timeout: u64, max: u64, ttl: u64, margin: u64, interval: u64 },
}

impl Timings {
    /// A profile for operators who want failover in under 4 s: heartbeats every 500 ms, a 2 s
    /// lease, a 500 ms margin.
    pub fn fast() -> Timings {
        Timings {
            heartbeat_interval_ms: 500,
            lease_ttl_ms: 2_000,
            fence_margin_ms: 500,
            max_transit_ms: 150,
            guard_ms: 250,
        }
    }

    /// How often an agent polls its peers once renewals are missed.
    pub fn poll_every_ms(&self) -> u64 {
        self.heartbeat_interval_ms / 5
    }

    /// How long before its end a lease stops counting toward the leader's quorum (and what an
    /// agent takes off its own lease when it answers a peer, with `max_transit` added back).
    /// One heartbeat interval plus the transit: when the leader stops in the middle of a round
    /// of aligned heartbeats, the hosts it renewed and those it did not then lapse together in
    /// the peers' eyes (SAFETY.md, "Counting leases short").
    pub fn quorum_shortfall_ms(&self) -> u64 {
        self.heartbeat_interval_ms + self.max_transit_ms
    }

    /// Checks the relations the safety rule needs.
    pub fn validate(&self) -> Result<(), TimingsError> {
        let (interval, ttl, margin, guard) =
            (self.heartbeat_interval_ms, self.lease_ttl_ms, self.fence_margin_ms, self.guard_ms);
        if interval < 100 {
            return Err(TimingsError::IntervalTooShort { interval });
        }
        if ttl < 3 * interval {
            return Err(TimingsError::LeaseTooShort { ttl, min: 3 * interval });
        }
        let poll = self.poll_every_ms();
        if margin < guard + poll {
            return Err(TimingsError::MarginTooShort { margin, guard, poll });
        }
        if 2 * self.max_transit_ms >= interval {
            return Err(TimingsError::TransitTooLong { transit: self.max_transit_ms, interval });
        }
        Ok(())
    }

    /// The longest watchdog timeout these timings allow. An agent feeds its watchdog only
    /// while `now + timeout + guard / 2` is before the earliest instant the leader may declare
    /// its host dead (its lease end plus the fence margin); in steady state a lease has at
    /// least `ttl - interval` left, and one missed renewal must not reset the host, so
    /// `ttl - 2 * interval + margin - guard / 2` is the most the timeout may be.
    pub fn max_watchdog_timeout_ms(&self) -> u64 {
        (self.lease_ttl_ms + self.fence_margin_ms)
            .saturating_sub(2 * self.heartbeat_interval_ms + self.guard_ms / 2)
    }

    /// Checks that a watchdog of `timeout_ms` can keep the rule under these timings.
    pub fn check_watchdog(&self, timeout_ms: u64) -> Result<(), TimingsError> {
        let max = self.max_watchdog_timeout_ms();
        if timeout_ms == 0 || timeout_ms > max {
            return Err(TimingsError::WatchdogTooLong {
                timeout: timeout_ms,
                max,
                ttl: self.lease_ttl_ms,
                margin: self.fence_margin_ms,
                interval: self.heartbeat_interval_ms,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_and_fast_profiles_are_valid_and_fit_the_lab_watchdogs() {
        Timings::default().validate().unwrap();
        Timings::fast().validate().unwrap();
        Timings::default().check_watchdog(3_000).unwrap();
        Timings::fast().check_watchdog(1_000).unwrap();
        assert_eq!(Timings::default().max_watchdog_timeout_ms(), 3_750);
    }

    #[test]
    fn timings_that_break_the_rule_are_refused_with_the_numbers() {
        let t = Timings { lease_ttl_ms: 2_000, ..Timings::default() };
        let e = t.validate().unwrap_err();
        assert_eq!(e, TimingsError::LeaseTooShort { ttl: 2_000, min: 3_000 });
        let t = Timings { fence_margin_ms: 600, ..Timings::default() };
        assert!(matches!(t.validate(), Err(TimingsError::MarginTooShort { .. })));
        let t = Timings { max_transit_ms: 500, ..Timings::default() };
        assert!(matches!(t.validate(), Err(TimingsError::TransitTooLong { .. })));
        let e = Timings::fast().check_watchdog(3_000).unwrap_err();
        assert!(e.to_string().contains("at most 1375 ms"), "{e}");
    }
}
