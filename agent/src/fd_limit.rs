//! The agent's limit on open files (RLIMIT_NOFILE). Every peer poll is a connection: at 1000
//! hosts an agent may hold hundreds at once during an outage, and systemd's default soft limit
//! is 1024. At start the agent raises its soft limit to the hard one (the unit's
//! `LimitNOFILE`); while it runs it counts its open files into `vmha_agent_open_files` and
//! warns when they pass 80% of the limit. `vmha-simagent` raises its own through the same call.

use std::fmt;
use std::time::Duration;

use crate::metrics::METRICS;

/// A resource limit's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Finite(u64),
    Unlimited,
}

impl Limit {
    fn from_raw(v: libc::rlim_t) -> Limit {
        if v == libc::RLIM_INFINITY { Limit::Unlimited } else { Limit::Finite(v) }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::Finite(n) => write!(f, "{n}"),
            Limit::Unlimited => f.write_str("unlimited"),
        }
    }
}

/// The open-file limits in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub soft: Limit,
    pub hard: Limit,
}

/// Why the soft limit was not raised.
#[derive(Debug, thiserror::Error)]
pub enum RaiseError {
    #[error("cannot read the open-file limit (getrlimit RLIMIT_NOFILE): {0}")]
    Read(std::io::Error),
    #[error(
        "cannot raise the open-file soft limit from {soft} to the hard limit {hard} (setrlimit \
         RLIMIT_NOFILE): {source}; set LimitNOFILE=65536 in the unit"
    )]
    Raise { soft: Limit, hard: Limit, source: std::io::Error },
}

fn get() -> std::io::Result<libc::rlimit> {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `r` is a valid out-parameter for getrlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

/// The open-file limits of this process now.
pub fn current() -> std::io::Result<Limits> {
    let r = get()?;
    Ok(Limits { soft: Limit::from_raw(r.rlim_cur), hard: Limit::from_raw(r.rlim_max) })
}

/// Raises this process's soft limit on open files to its hard limit (lowering the hard limit
/// is never done); returns the limits then in force.
pub fn raise_soft_to_hard() -> Result<Limits, RaiseError> {
    let r = get().map_err(RaiseError::Read)?;
    if r.rlim_cur != r.rlim_max {
        let raised = libc::rlimit { rlim_cur: r.rlim_max, rlim_max: r.rlim_max };
        // SAFETY: `raised` is a valid rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(RaiseError::Raise {
                soft: Limit::from_raw(r.rlim_cur),
                hard: Limit::from_raw(r.rlim_max),
                source: std::io::Error::last_os_error(),
            });
        }
    }
    current().map_err(RaiseError::Read)
}

/// The agent's start: raises the soft limit and says what it now is, or warns and goes on
/// with the limit it has.
pub fn raise_at_start() {
    match raise_soft_to_hard() {
        Ok(l) => tracing::info!("open files allowed: {} (the soft limit, now the hard limit)", l.soft),
        Err(e) => tracing::warn!("{e}; going on with the limit as it is"),
    }
}

/// How many files this process has open (the entries of /proc/self/fd, less the one reading
/// them).
pub fn open_files() -> std::io::Result<u64> {
    Ok((std::fs::read_dir("/proc/self/fd")?.count() as u64).saturating_sub(1))
}

/// Whether open files are near the limit: warns once when they pass 80% of it, and again only
/// after they have fallen back under 70%.
#[derive(Debug, Default)]
pub struct NearLimit {
    warned: bool,
}

/// What a sample changed.
#[derive(Debug, PartialEq, Eq)]
pub enum Crossing {
    Up,
    Down,
}

impl NearLimit {
    pub fn sample(&mut self, open: u64, limit: Limit) -> Option<Crossing> {
        let Limit::Finite(limit) = limit else { return self.warned.then(|| self.clear()) };
        let (open, limit) = (u128::from(open), u128::from(limit));
        if !self.warned && open * 10 > limit * 8 {
            self.warned = true;
            Some(Crossing::Up)
        } else if self.warned && open * 10 < limit * 7 {
            Some(self.clear())
        } else {
            None
        }
    }

    fn clear(&mut self) -> Crossing {
        self.warned = false;
        Crossing::Down
    }
}

/// Every `every`, the open files and the soft limit into the metrics, with a warning when
/// they near it. Runs for the life of the process.
pub async fn watch(every: Duration) {
    let mut near = NearLimit::default();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Ok(limits) = current() else { continue };
        let open = match (open_files(), limits.soft) {
            (Ok(open), _) => open,
            // Not even one left to list them with.
            (Err(e), Limit::Finite(n)) if e.raw_os_error() == Some(libc::EMFILE) => n,
            (Err(_), _) => continue,
        };
        METRICS.open_files(open, limits.soft);
        match near.sample(open, limits.soft) {
            Some(Crossing::Up) => tracing::warn!(
                open,
                limit = %limits.soft,
                "{open} files open, more than 80% of the {} allowed: peer polls will fail once \
                 none is left; raise LimitNOFILE in the unit",
                limits.soft
            ),
            Some(Crossing::Down) => {
                tracing::info!(open, limit = %limits.soft, "open files back under 70% of the limit")
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warns_once_past_80_percent_and_again_only_after_falling_under_70() {
        let mut n = NearLimit::default();
        let l = Limit::Finite(1000);
        assert_eq!(n.sample(800, l), None);
        assert_eq!(n.sample(801, l), Some(Crossing::Up));
        assert_eq!(n.sample(950, l), None);
        assert_eq!(n.sample(750, l), None);
        assert_eq!(n.sample(810, l), None);
        assert_eq!(n.sample(699, l), Some(Crossing::Down));
        assert_eq!(n.sample(900, l), Some(Crossing::Up));
        assert_eq!(n.sample(u64::MAX, Limit::Unlimited), Some(Crossing::Down));
        assert_eq!(n.sample(u64::MAX, Limit::Unlimited), None);
    }

    #[test]
    fn unlimited_is_named() {
        assert_eq!(Limit::from_raw(libc::RLIM_INFINITY).to_string(), "unlimited");
        assert_eq!(Limit::from_raw(20_000).to_string(), "20000");
    }
}
