//! `vmha report`: each protected VM's availability, as a table, JSON or CSV.

use vmha_proto::v1::{ReportReply, VmAvailability};

use crate::output::{self, Format};

/// "99.95% (3.3 nines)", or "100%" with no downtime.
fn availability(v: &VmAvailability) -> String {
    match v.nines {
        Some(n) => format!("{:.3}% ({n:.1} nines)", v.availability_pct),
        None => "100%".into(),
    }
}

/// A duration for people: "4.2 s", "12 min", "3.5 h", "2.0 d".
fn span(s: f64) -> String {
    match s {
        s if s < 120.0 => format!("{s:.1} s"),
        s if s < 7_200.0 => format!("{:.0} min", s / 60.0),
        s if s < 172_800.0 => format!("{:.1} h", s / 3_600.0),
        s => format!("{:.1} d", s / 86_400.0),
    }
}

pub fn show(fmt: Format, r: &ReportReply) {
    match fmt {
        Format::Json => output::json(r),
        Format::Csv => {
            println!(
                "vm,uuid,availability_pct,nines,outages,unplanned_downtime_s,mtbf_s,mttr_s,longest_outage_s,\
                 planned_outages,planned_downtime_s,uptime_s,down_now,protected_since"
            );
            let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.3}"));
            for v in &r.vms {
                println!(
                    "{},{},{:.6},{},{},{:.3},{},{},{:.3},{},{:.3},{:.3},{},{}",
                    v.vm,
                    v.uuid,
                    v.availability_pct,
                    opt(v.nines),
                    v.outages,
                    v.unplanned_downtime_s,
                    opt(v.mtbf_s),
                    opt(v.mttr_s),
                    v.longest_outage_s,
                    v.planned_outages,
                    v.planned_downtime_s,
                    v.uptime_s,
                    v.down_now,
                    v.protected_since
                );
            }
        }
        Format::Table => {
            println!(
                "from {} to {}; planned downtime is kept apart and not counted against availability",
                r.from, r.to
            );
            if r.vms.is_empty() {
                println!("no protected VM");
                return;
            }
            let dash = |v: Option<f64>| v.map_or("-".to_string(), span);
            output::table(
                &["VM", "AVAILABILITY", "OUTAGES", "DOWNTIME", "MTBF", "MTTR", "LONGEST", "PLANNED", "NOW"],
                r.vms
                    .iter()
                    .map(|v| {
                        vec![
                            v.vm.clone(),
                            availability(v),
                            v.outages.to_string(),
                            span(v.unplanned_downtime_s),
                            dash(v.mtbf_s),
                            dash(v.mttr_s),
                            span(v.longest_outage_s),
                            format!("{} ({})", v.planned_outages, span(v.planned_downtime_s)),
                            if v.down_now { "DOWN".into() } else { "up".into() },
                        ]
                    })
                    .collect(),
            );
            for v in r.vms.iter().filter(|v| !v.protected_since.is_empty()) {
                println!("{}: protected at {}; its figures count from then", v.vm, v.protected_since);
            }
        }
    }
}
