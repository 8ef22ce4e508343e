//! Whether a host is heard from. (Leases, votes and fencing build on this in the failover work;
//! this module only says what the controller currently hears.)

use crate::Millis;

/// The timing knobs of the safety rule (DESIGN.md, "Liveness, leases and fencing").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timings {
    pub heartbeat_interval_ms: u64,
    pub lease_ttl_ms: u64,
    pub fence_margin_ms: u64,
}

impl Default for Timings {
    fn default() -> Self {
        Timings { heartbeat_interval_ms: 1_000, lease_ttl_ms: 5_000, fence_margin_ms: 1_000 }
    }
}

/// What the controller knows of a host's agent right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostLiveness {
    /// A heartbeat arrived within the last `lease_ttl`.
    Online,
    /// Heard from since this controller started, but not within `lease_ttl`.
    Offline,
    /// Not heard from since this controller started (known only from the database).
    NeverSeen,
}

impl HostLiveness {
    pub fn of(last_heartbeat: Option<Millis>, now: Millis, timings: &Timings) -> HostLiveness {
        match last_heartbeat {
            None => HostLiveness::NeverSeen,
            Some(t) if now.since(t) <= timings.lease_ttl_ms => HostLiveness::Online,
            Some(_) => HostLiveness::Offline,
        }
    }

    /// The word operators see in `vmha host ls` and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            HostLiveness::Online => "online",
            HostLiveness::Offline => "offline",
            HostLiveness::NeverSeen => "unknown",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn online_until_lease_ttl_then_offline() {
        let t = Timings::default();
        let hb = Some(Millis(10_000));
        assert_eq!(HostLiveness::of(hb, Millis(10_000), &t), HostLiveness::Online);
        assert_eq!(HostLiveness::of(hb, Millis(15_000), &t), HostLiveness::Online);
        assert_eq!(HostLiveness::of(hb, Millis(15_001), &t), HostLiveness::Offline);
        assert_eq!(HostLiveness::of(None, Millis(15_001), &t), HostLiveness::NeverSeen);
    }

    #[test]
    fn a_heartbeat_stamped_after_now_counts_as_fresh() {
        let t = Timings::default();
        assert_eq!(HostLiveness::of(Some(Millis(20)), Millis(10), &t), HostLiveness::Online);
    }
}
