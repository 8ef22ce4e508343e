//! How available each protected VM was: its outages, as the engine marks them for the
//! controller to keep (`OutageMark`), and the arithmetic an ISP reports from them (`summarize`):
//! uptime as a share and in nines, outages, MTBF, MTTR, the longest outage, with planned
//! downtime (operator stops, live migrations' pauses, cold restarts) kept apart. Pure.
//!
//! Planned downtime is left out of the availability, as SLAs count it: availability is
//! `uptime / (uptime + unplanned downtime)`, uptime being the window less all downtime. With
//! `MTBF = uptime / outages` and `MTTR = unplanned downtime / outages`, that is also
//! `MTBF / (MTBF + MTTR)`.

/// What the controller writes into its outage history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutageMark {
    /// The VM stopped serving `ago_ms` before now (its host's last heartbeat, for a host that
    /// died), unless an outage of it is open already.
    Began { vm_uuid: String, vm_name: String, ago_ms: u64, planned: bool, cause: String },
    /// It runs again: its open outage, if any, ends now.
    Ended { vm_uuid: String },
    /// A planned pause that is over already: a live migration's downtime.
    Pause { vm_uuid: String, vm_name: String, ms: u64, cause: String },
}

/// One outage as kept, in milliseconds on any one clock (the store's: unix time).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outage {
    pub start: i64,
    /// `None`: still down.
    pub end: Option<i64>,
    pub planned: bool,
}

/// One VM's availability over a window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Availability {
    pub window_ms: u64,
    /// The window less all downtime.
    pub uptime_ms: u64,
    pub unplanned_ms: u64,
    pub planned_ms: u64,
    /// Unplanned outages that overlap the window.
    pub outages: u32,
    pub planned_outages: u32,
    /// The longest unplanned outage (its part in the window).
    pub longest_ms: u64,
    /// `uptime / (uptime + unplanned downtime)`; 1 with no time to count.
    pub availability: f64,
    /// Mean time between failures and to repair; `None` without an unplanned outage.
    pub mtbf_ms: Option<u64>,
    pub mttr_ms: Option<u64>,
    /// An outage is open at the window's end.
    pub down_now: bool,
}

/// The availability over `[from, to)` from a VM's outages. Each counts for its part in the
/// window; an open one lasts until `to`. Overlapping outages count once (the unplanned one
/// where they overlap: a planned stop does not hide a failure).
pub fn summarize(from: i64, to: i64, outages: &[Outage]) -> Availability {
    let window_ms = to.saturating_sub(from).max(0) as u64;
    let clip = |o: &Outage| (o.start.max(from), o.end.unwrap_or(to).min(to));
    let mut spans: Vec<(i64, i64, bool)> = outages
        .iter()
        .map(|o| (clip(o), o.planned))
        .filter(|((s, e), _)| e > s)
        .map(|((s, e), p)| (s, e, p))
        .collect();
    let (mut outages_n, mut planned_n, mut longest) = (0u32, 0u32, 0u64);
    for (s, e, planned) in &spans {
        if *planned {
            planned_n += 1;
        } else {
            outages_n += 1;
            longest = longest.max((e - s) as u64);
        }
    }
    // Down time, each instant once: unplanned first, then what planned adds.
    let unplanned_ms = covered(spans.iter().filter(|s| !s.2).map(|s| (s.0, s.1)).collect());
    spans.sort();
    let all_ms = covered(spans.iter().map(|s| (s.0, s.1)).collect());
    let planned_ms = all_ms - unplanned_ms;
    let uptime_ms = window_ms.saturating_sub(all_ms);
    let availability = if uptime_ms + unplanned_ms == 0 {
        1.0
    } else {
        uptime_ms as f64 / (uptime_ms + unplanned_ms) as f64
    };
    let per = |total: u64| (outages_n > 0).then(|| total / u64::from(outages_n));
    Availability {
        window_ms,
        uptime_ms,
        unplanned_ms,
        planned_ms,
        outages: outages_n,
        planned_outages: planned_n,
        longest_ms: longest,
        availability,
        mtbf_ms: per(uptime_ms),
        mttr_ms: per(unplanned_ms),
        down_now: outages.iter().any(|o| o.end.is_none_or(|e| e >= to) && o.start < to),
    }
}

/// How long the union of `spans` lasts.
fn covered(mut spans: Vec<(i64, i64)>) -> u64 {
    spans.sort();
    let (mut total, mut reach) = (0u64, i64::MIN);
    for (s, e) in spans {
        let s = s.max(reach);
        if e > s {
            total += (e - s) as u64;
        }
        reach = reach.max(e);
    }
    total
}

/// Availability in nines: 0.999 is 3. `None` for 100% (no downtime to count).
pub fn nines(availability: f64) -> Option<f64> {
    (availability < 1.0).then(|| -(1.0 - availability).log10())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;

    fn out(start: i64, ms: i64, planned: bool) -> Outage {
        Outage { start, end: Some(start + ms), planned }
    }

    #[test]
    fn a_month_with_two_failures_and_a_planned_stop() {
        // 30 days; two failures of 10 and 20 minutes, one 1 h maintenance stop.
        let min = 60_000;
        let history =
            [out(2 * DAY, 10 * min, false), out(10 * DAY, 60 * min, true), out(20 * DAY, 20 * min, false)];
        let a = summarize(0, 30 * DAY, &history);
        assert_eq!((a.outages, a.planned_outages), (2, 1));
        assert_eq!((a.unplanned_ms, a.planned_ms), (30 * min as u64, 60 * min as u64));
        assert_eq!(a.uptime_ms, (30 * DAY - 90 * min) as u64);
        assert_eq!(a.longest_ms, 20 * min as u64);
        // uptime / (uptime + downtime), planned time left out.
        let expected = (30 * DAY - 90 * min) as f64 / (30 * DAY - 60 * min) as f64;
        assert!((a.availability - expected).abs() < 1e-12, "{}", a.availability);
        assert!((a.availability - 0.999_305).abs() < 1e-6, "{}", a.availability);
        let (mtbf, mttr) = (a.mtbf_ms.unwrap(), a.mttr_ms.unwrap());
        assert_eq!(mttr, 15 * min as u64);
        assert_eq!(mtbf, (30 * DAY - 90 * min) as u64 / 2);
        // MTBF / (MTBF + MTTR) is the same figure.
        assert!((mtbf as f64 / (mtbf + mttr) as f64 - a.availability).abs() < 1e-9);
        assert!((nines(a.availability).unwrap() - 3.158).abs() < 1e-3);
        assert!(!a.down_now);
    }

    #[test]
    fn outages_count_for_their_part_in_the_window_and_an_open_one_runs_to_its_end() {
        // Begun before the window (half inside), and one still open at its end.
        let history = [out(-5_000, 10_000, false), Outage { start: 95_000, end: None, planned: false }];
        let a = summarize(0, 100_000, &history);
        assert_eq!((a.outages, a.unplanned_ms, a.longest_ms), (2, 10_000, 5_000));
        assert!(a.down_now);
        assert!((a.availability - 0.9).abs() < 1e-12);
        // Outside the window: nothing.
        let a = summarize(200_000, 300_000, &[out(0, 1_000, false)]);
        assert_eq!((a.outages, a.unplanned_ms, a.availability), (0, 0, 1.0));
        assert_eq!((a.mtbf_ms, a.mttr_ms, nines(a.availability)), (None, None, None));
    }

    #[test]
    fn overlapping_outages_count_each_instant_once_and_a_failure_is_not_hidden_by_a_stop() {
        // A failure during a planned stop (the stop's 10 s, the failure's 4 s inside it).
        let history = [out(0, 10_000, true), out(3_000, 4_000, false)];
        let a = summarize(0, 20_000, &history);
        assert_eq!((a.unplanned_ms, a.planned_ms, a.uptime_ms), (4_000, 6_000, 10_000));
        assert!((a.availability - 10_000.0 / 14_000.0).abs() < 1e-12);
        // A window that is all planned downtime: nothing to count against.
        let a = summarize(0, 10_000, &[out(0, 10_000, true)]);
        assert_eq!((a.uptime_ms, a.availability), (0, 1.0));
    }

    #[test]
    fn nines_of_common_figures() {
        assert!((nines(0.99).unwrap() - 2.0).abs() < 1e-9);
        assert!((nines(0.99999).unwrap() - 5.0).abs() < 1e-6);
        assert_eq!(nines(1.0), None);
    }
}
