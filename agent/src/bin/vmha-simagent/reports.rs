//! What the simulated agents report, one kind per line, and how the reports of several shards
//! (processes) add up to one: a shard prints them as JSON (`shard: {...}`), the parent sums
//! them and prints the same lines a single process prints.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One report of one process.
#[derive(Debug, Serialize, Deserialize)]
pub enum Report {
    Leased(Leased),
    Protected(Protected),
    Stats(Stats),
    Polls(Polls),
    Killed(Killed),
    /// The start commands a shard carried out since an instant: a dead host's VM may be
    /// started on a host of another shard.
    Starts(Vec<(String, u64)>),
}

impl Report {
    /// Which kind it is: the parent waits for one of each kind from every shard.
    pub fn kind(&self) -> &'static str {
        match self {
            Report::Leased(_) => "leased",
            Report::Protected(_) => "protected",
            Report::Stats(_) => "stats",
            Report::Polls(_) => "polls",
            Report::Killed(_) => "killed",
            Report::Starts(_) => "starts",
        }
    }

    /// The reports of every shard, of one kind, as one.
    pub fn merge(reports: Vec<Report>) -> Option<Report> {
        let mut reports = reports.into_iter();
        let first = reports.next()?;
        Some(reports.fold(first, |sum, r| match (sum, r) {
            (Report::Leased(a), Report::Leased(b)) => {
                Report::Leased(Leased { after_s: a.after_s.max(b.after_s) })
            }
            (Report::Protected(a), Report::Protected(b)) => Report::Protected(Protected {
                count: a.count + b.count,
                secs: a.secs.max(b.secs),
                refused: a.refused + b.refused,
                example: a.example.or(b.example),
            }),
            (Report::Stats(a), Report::Stats(b)) => Report::Stats(Stats {
                hosts: a.hosts + b.hosts,
                sent: a.sent + b.sent,
                answered: a.answered + b.answered,
                leased: a.leased + b.leased,
                bytes: a.bytes + b.bytes,
                polls_per_s: a.polls_per_s + b.polls_per_s,
                fenced: a.fenced + b.fenced,
                latencies_us: [a.latencies_us, b.latencies_us].concat(),
                tick_late_p99_ms: a.tick_late_p99_ms.max(b.tick_late_p99_ms),
            }),
            (Report::Polls(a), Report::Polls(b)) => Report::Polls(Polls {
                polls: a.polls + b.polls,
                secs: a.secs.max(b.secs),
                fenced: a.fenced + b.fenced,
                fenced_before: a.fenced_before + b.fenced_before,
                open: a.open.max(b.open),
                limit: a.limit,
                near: a.near || b.near,
                tick_late_p99_ms: a.tick_late_p99_ms.max(b.tick_late_p99_ms),
            }),
            (Report::Killed(a), Report::Killed(b)) => Report::Killed(Killed {
                names: [a.names, b.names].concat(),
                lease_end: a.lease_end.max(b.lease_end),
                started: a.started + b.started,
                total: a.total + b.total,
                last: a.last.max(b.last),
                protected: [a.protected, b.protected].concat(),
                killed_at: a.killed_at.min(b.killed_at),
            }),
            (Report::Starts(a), Report::Starts(b)) => Report::Starts([a, b].concat()),
            (sum, _) => sum,
        }))
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Report::Leased(r) => {
                write!(f, "simagent: every host holds a lease, {:.1} s after the start", r.after_s)
            }
            Report::Protected(r) => {
                write!(f, "simagent: protected {} VMs in {:.1} s", r.count, r.secs)?;
                match &r.example {
                    Some(e) if r.refused > 0 => write!(f, "; {} refused, e.g. {e}", r.refused),
                    _ => Ok(()),
                }
            }
            Report::Stats(r) => r.fmt(f),
            Report::Polls(r) => r.fmt(f),
            Report::Killed(r) => r.fmt(f),
            Report::Starts(s) => write!(f, "simagent: {} start commands", s.len()),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Leased {
    pub after_s: f64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Protected {
    pub count: usize,
    pub secs: f64,
    pub refused: usize,
    pub example: Option<String>,
}

/// The `p` quantile (0 to 1) of `samples`, if there are any.
pub fn percentile(samples: &[u64], p: f64) -> Option<u64> {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    sorted.get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1))).copied()
}

/// The heartbeat figures of a report period.
#[derive(Debug, Serialize, Deserialize)]
pub struct Stats {
    pub hosts: usize,
    pub sent: u64,
    pub answered: u64,
    pub leased: u64,
    pub bytes: u64,
    pub polls_per_s: f64,
    pub fenced: usize,
    pub latencies_us: Vec<u64>,
    /// How late the process's own 50 ms ticks came (p99): past a tick or two, the simulated
    /// agents, not the controller, are what a run measures.
    pub tick_late_p99_ms: f64,
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pct = |p: f64| percentile(&self.latencies_us, p);
        let ms = |v: Option<u64>| v.map_or("-".into(), |us| format!("{:.1}", us as f64 / 1000.0));
        write!(
            f,
            "simagent: {} hosts: {} heartbeats sent, {} answered, {:.1}% of those earned a lease; latency p50 {} ms, \
             p99 {} ms; {} bytes per answer; {:.0} peer polls/s; {} hosts self-fenced; its own ticks late by {:.1} ms \
             (p99)",
            self.hosts,
            self.sent,
            self.answered,
            if self.answered == 0 { 0.0 } else { self.leased as f64 * 100.0 / self.answered as f64 },
            ms(pct(0.5)),
            ms(pct(0.99)),
            self.bytes.checked_div(self.answered).unwrap_or(0),
            self.polls_per_s,
            self.fenced,
            self.tick_late_p99_ms,
        )
    }
}

/// Peer polls and self-fences since the mark.
#[derive(Debug, Serialize, Deserialize)]
pub struct Polls {
    pub polls: u64,
    pub secs: f64,
    pub fenced: usize,
    pub fenced_before: usize,
    /// The most files one process held open.
    pub open: u64,
    pub limit: String,
    /// A process came within 10% of its limit: connections were surely refused.
    pub near: bool,
    /// How late the processes' own ticks came since the mark (p99).
    pub tick_late_p99_ms: f64,
}

impl fmt::Display for Polls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "simagent: since the mark ({:.1} s): {} peer polls, {:.0} per second; {} hosts self-fenced ({} before the \
             mark); at most {} files open of the {} allowed; the simulation's ticks late by {:.1} ms (p99)",
            self.secs,
            self.polls,
            self.polls as f64 / self.secs,
            self.fenced,
            self.fenced_before,
            self.open,
            self.limit,
            self.tick_late_p99_ms,
        )?;
        if self.near {
            // Self-fences then say what the simulation can hold, not what agents on their own
            // hosts would do.
            write!(
                f,
                " (NEAR THE LIMIT: peer connections were refused for lack of file descriptors; these self-fences are \
                 the simulation's limit, not the agents')"
            )?;
        }
        Ok(())
    }
}

/// Hosts whose power was cut, and the starts of their protected VMs elsewhere.
#[derive(Debug, Serialize, Deserialize)]
pub struct Killed {
    pub names: Vec<String>,
    /// Unix ms at which the last of their leases ended.
    pub lease_end: u64,
    pub started: usize,
    pub total: usize,
    /// Unix ms of the last start command.
    pub last: u64,
    /// The protected VMs that ran on them.
    pub protected: Vec<String>,
    /// Unix ms at which they were killed.
    pub killed_at: u64,
}

impl Killed {
    /// Counts the start commands, anywhere, of the protected VMs that ran on them.
    pub fn count_starts(&mut self, starts: &[(String, u64)]) {
        let mut first: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
        for (uuid, at) in starts.iter().filter(|(_, at)| *at >= self.killed_at) {
            first.entry(uuid.as_str()).or_insert(*at);
        }
        let seen: Vec<u64> = self.protected.iter().filter_map(|u| first.get(u.as_str()).copied()).collect();
        self.started = seen.len();
        self.last = seen.into_iter().max().unwrap_or(0);
    }
}

impl fmt::Display for Killed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: Vec<&str> = self.names.iter().take(3).map(String::as_str).collect();
        write!(
            f,
            "simagent: killed {} hosts ({}{}): leases ended at {} ms; {} of {} protected VMs started, the last start \
             command at {} ms (unix)",
            self.names.len(),
            shown.join(", "),
            if self.names.len() > 3 { ", ..." } else { "" },
            self.lease_end,
            self.started,
            self.total,
            self.last,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_add_up_to_the_line_one_process_prints() {
        let killed = |names: &[&str], end, started, total, last| {
            Report::Killed(Killed {
                names: names.iter().map(|n| n.to_string()).collect(),
                lease_end: end,
                started,
                total,
                last,
                protected: vec![],
                killed_at: 0,
            })
        };
        let merged = Report::merge(vec![
            killed(&["sim0200"], 1_000, 4, 4, 3_000),
            killed(&["sim0100"], 1_200, 3, 4, 2_500),
        ]);
        assert_eq!(
            merged.unwrap().to_string(),
            "simagent: killed 2 hosts (sim0200, sim0100): leases ended at 1200 ms; 7 of 8 protected VMs started, the \
             last start command at 3000 ms (unix)"
        );
        let polls = |polls, fenced, open, near| {
            Report::Polls(Polls {
                polls,
                secs: 10.0,
                fenced,
                fenced_before: 0,
                open,
                limit: "20000".into(),
                near,
                tick_late_p99_ms: 1.0,
            })
        };
        let merged =
            Report::merge(vec![polls(100, 1, 300, false), polls(50, 0, 500, true)]).unwrap().to_string();
        assert!(
            merged.starts_with("simagent: since the mark (10.0 s): 150 peer polls, 15 per second; 1 hosts"),
            "{merged}"
        );
        assert!(merged.contains("at most 500 files open") && merged.contains("NEAR THE LIMIT"), "{merged}");
    }
}
