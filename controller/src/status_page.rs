//! The read-only status page (`/` on the `--metrics-listen` address): hosts, protected VMs,
//! operations in flight, the latest events and the availability of the last 30 days, as one
//! HTML page that reads on a phone and refreshes itself every two seconds from
//! `/status/main` (a few lines of script, no framework; without script it reloads whole).
//! Built from the same views as the operator API, so the page and `vmha status` agree.

use std::collections::HashMap;
use std::sync::Arc;

use maud::{DOCTYPE, Markup, PreEscaped, html};
use vmha_proto::v1 as pb;

use crate::node::Node;
use crate::store::EventRow;
use crate::views;

/// How many of the latest events the page lists.
const EVENTS: u32 = 15;
/// The availability summary's window.
const REPORT_DAYS: i64 = 30;
/// At most this many rows of protected VMs, and of their availability: a page refreshed every
/// 2 s, read on a phone, lists what needs attention, not thousands of healthy VMs (`vmha vm
/// ls` and `vmha report` list them all).
const ROWS: usize = 100;

/// What the page shows, read at one moment.
pub struct Snapshot {
    who: pb::LeaderReply,
    /// From the database's record (this controller stands by), not a leader's memory.
    recorded: bool,
    quorum: Option<bool>,
    warnings: Vec<String>,
    database: Option<String>,
    hosts: Vec<pb::Host>,
    /// The protected VMs, by name.
    protected: Vec<pb::Vm>,
    /// By host, the VMs running there (name, protected): all the page shows of the others.
    running: HashMap<String, Vec<(String, bool)>>,
    operations: Vec<pb::Operation>,
    events: Vec<EventRow>,
    report: Option<pb::ReportReply>,
    at: chrono::DateTime<chrono::Utc>,
}

impl Snapshot {
    /// Reads the cluster as the operator API would show it now. What cannot be read (no
    /// leader and no database) is left empty and said so on the page.
    pub async fn read(node: &Arc<Node>) -> Snapshot {
        let who = node.who_leads();
        // One read of the state (on a standby, one load from the database) for the whole page.
        // Full views for the protected VMs only: a page refreshed every 2 s must not build one
        // for each of tens of thousands of VMs on the leader's decision loop.
        let state = node
            .state(|s, now| {
                let hosts = views::hosts(s, now);
                let protected: Vec<pb::Vm> =
                    s.vms.values().filter(|v| v.protected).map(|v| views::vm(s, v, now)).collect();
                let mut running: HashMap<String, Vec<(String, bool)>> = HashMap::new();
                for v in s.vms.values().filter(|v| v.state == vmha_engine::RunState::Running) {
                    if let Some(h) = &v.host {
                        running.entry(h.clone()).or_default().push((v.name.clone(), v.protected));
                    }
                }
                let quorum = vmha_engine::lease::has_quorum(s, now);
                (hosts, protected, running, quorum, views::warnings(s, now))
            })
            .await;
        let (hosts, mut protected, mut running, quorum, warnings, recorded) = match state {
            Ok(((hosts, protected, running, quorum, warnings), false)) => {
                (hosts, protected, running, Some(quorum), warnings, false)
            }
            Ok(((hosts, protected, running, _, _), true)) => {
                let protected = protected.into_iter().map(views::as_recorded_vm).collect();
                (hosts, protected, running, None, vec![], true)
            }
            Err(_) => (vec![], vec![], HashMap::new(), None, vec![], true),
        };
        let hosts = node.shown_hosts(hosts, recorded);
        // Those not running first, the highest priority first; then by name.
        protected.sort_by(|a, b| {
            let key = |v: &pb::Vm| (v.state == "running", -v.priority);
            key(a).cmp(&key(b)).then_with(|| (&a.name, &a.uuid).cmp(&(&b.name, &b.uuid)))
        });
        running.values_mut().for_each(|names| names.sort());
        let (operations, database) = match node.leader() {
            Ok(c) => (c.active_operations(), c.database_trouble()),
            Err(_) => (vec![], node.database_trouble()),
        };
        let at = chrono::Utc::now();
        let (mut events, mut report) = (vec![], None);
        if let Some(store) = node.store() {
            events = store.list_events(0, EVENTS).await.unwrap_or_default();
            events.reverse();
            let from = at - chrono::Duration::days(REPORT_DAYS);
            if let (Ok(outages), Ok(protected_at)) =
                (store.outages(from, at).await, store.protected_at().await)
            {
                let vms = protected.iter().map(|v| (v.uuid.clone(), v.name.clone())).collect();
                let mut r = views::report(from, at, vms, &outages, &protected_at);
                // The least available first.
                r.vms.sort_by(|a, b| {
                    a.availability_pct.total_cmp(&b.availability_pct).then_with(|| a.vm.cmp(&b.vm))
                });
                report = Some(r);
            }
        }
        Snapshot {
            who,
            recorded,
            quorum,
            warnings,
            database,
            hosts,
            protected,
            running,
            operations,
            events,
            report,
            at,
        }
    }
}

/// The whole page.
pub fn page(s: &Snapshot) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "vmha status" }
                style { (PreEscaped(STYLE)) }
                noscript { meta http-equiv="refresh" content="5"; }
            }
            body data-updates="0" {
                header {
                    h1 { "vmha" }
                    span #stale hidden { "not updating: the controller does not answer" }
                }
                main { (main(s)) }
                script { (PreEscaped(SCRIPT)) }
            }
        }
    }
}

/// The part the page's script replaces at each refresh.
pub fn main(s: &Snapshot) -> Markup {
    let protected = &s.protected;
    let running = protected.iter().filter(|v| v.state == "running").count();
    html! {
        p .leader { (leadership(s)) " · updated " time datetime=(s.at.to_rfc3339()) { (s.at.format("%H:%M:%S UTC")) } }
        @if let Some(why) = &s.database {
            p .alarm { "Database: " (why) }
        }
        @for w in &s.warnings {
            p .alarm { (w) }
        }
        section .tiles {
            div {
                // Only a leader knows which hosts are online (leases, heartbeats).
                b { @if s.recorded { "?" } @else { (s.hosts.iter().filter(|h| h.state == "online").count()) } "/" (s.hosts.len()) }
                "hosts online"
            }
            div { b { (running) "/" (protected.len()) } "protected VMs running" }
            div { b { (s.operations.len()) } "operations in flight" }
        }
        h2 { "Hosts" }
        div .scroll { table #hosts {
            thead { tr { th { "host" } th { "state" } th { "lease" } th { "health" } th { "admin" } th { "VMs" } } }
            tbody { @for h in &s.hosts { (host_row(h, s.running.get(&h.name).map_or(&[][..], Vec::as_slice), !s.recorded)) } }
        } }
        h2 { "Protected VMs" }
        @if protected.is_empty() { p { "No VM is protected (`vmha protect VM`)." } } @else {
            div .scroll { table #protected {
                thead { tr { th { "VM" } th { "state" } th { "host" } th { "priority" } th { "guest" } } }
                tbody { @for v in protected.iter().take(ROWS) {
                    tr id={ "vm-" (v.name) } data-state=(v.state) {
                        td { (v.name) }
                        td { span class={ "badge " (v.state) } { (v.state) } }
                        td { (v.host) }
                        td .num { (v.priority) }
                        td .guest { (v.guest) @if !v.guest_resets.is_empty() { div .why { "resets: " (v.guest_resets) } } }
                    }
                    @if !v.guest_alarm.is_empty() { tr .note { td colspan="5" .why { "GUEST ALARM: " (v.guest_alarm) "; its reset budget is spent" } } }
                    @if !v.why_not_running.is_empty() { tr .note { td colspan="5" .why { (v.why_not_running) } } }
                } }
            } }
            @if protected.len() > ROWS { p { "… and " (protected.len() - ROWS) " more, running (`vmha vm ls` lists them all)." } }
        }
        h2 { "Operations in flight" }
        @if s.operations.is_empty() { p { "None." } } @else {
            div .scroll { table #operations {
                thead { tr { th { "operation" } th { "VM" } th { "from → to" } th { "state" } th { "progress" } } }
                tbody { @for o in &s.operations { (operation_row(o)) } }
            } }
        }
        h2 { "Latest events" }
        ul #events { @for e in &s.events {
            li data-kind=(e.kind) data-subject=(e.subject) {
                time datetime=(e.at.to_rfc3339()) { (e.at.format("%H:%M:%S")) } " " (e.message)
            }
        } }
        @if let Some(r) = &s.report {
            h2 { "Availability, last " (REPORT_DAYS) " days" }
            @if r.vms.is_empty() { p { "No VM is protected." } } @else {
                div .scroll { table #availability {
                    thead { tr { th { "VM" } th { "availability" } th { "outages" } th { "MTTR" } th { "longest" } } }
                    tbody { @for v in r.vms.iter().take(ROWS) {
                        tr {
                            td {
                                (v.vm) @if v.down_now { " " span .badge.stopped { "down now" } }
                                @if let Some(t) = v.protected_since.get(..16) { div .why { "protected " (t.replace('T', " ")) " UTC" } }
                            }
                            td .num { (format!("{:.4} %", v.availability_pct)) }
                            td .num { (v.outages) }
                            td .num { (v.mttr_s.map_or("—".into(), |s| format!("{s:.1} s"))) }
                            td .num { (format!("{:.1} s", v.longest_outage_s)) }
                        }
                    } }
                } }
                @if r.vms.len() > ROWS { p { "The " (ROWS) " least available of " (r.vms.len()) " (`vmha report` lists them all)." } }
            }
        }
    }
}

fn leadership(s: &Snapshot) -> Markup {
    let w = &s.who;
    html! {
        @if w.leading {
            (w.name) " leads (epoch " (w.epoch) ")"
            @match s.quorum {
                Some(true) => { " · quorum" }
                Some(false) => { " · " span .badge.dead { "no quorum" } }
                None => {}
            }
        } @else if !w.leader_name.is_empty() {
            (w.name) " stands by; " (w.leader_name) " leads at " (w.leader_endpoint) "."
        } @else {
            span .badge.dead { "no leader" } " " (w.why_no_leader)
        }
        @if s.recorded { " Shown: the database's record (no leases, heartbeats or operations)." }
    }
}

/// `notes`: whether to say why a host is in its state (a record has no such why: the header
/// says what the record is).
fn host_row(h: &pb::Host, running: &[(String, bool)], notes: bool) -> Markup {
    let lease = match (h.lease_left_s, h.heartbeat_age_s) {
        (Some(left), _) if left > 0.0 => format!("{left:.1} s left"),
        (_, Some(age)) => format!("lapsed; heard {age:.0} s ago"),
        _ => "—".into(),
    };
    let failing: Vec<&pb::Probe> = h.probes.iter().filter(|p| !p.ok).collect();
    html! {
        tr id={ "host-" (h.name) } data-state=(h.state) {
            td { (h.name) }
            td { span class={ "badge " (h.state) } { (h.state) } }
            td { (lease) }
            td {
                (h.health)
                @for p in failing { div .why { (p.name) ": " (p.detail) } }
            }
            td {
                (h.admin_state)
                @if let Some(d) = &h.drain { div .why { (drain_summary(d)) } }
            }
            td { @for (i, (name, protected)) in running.iter().enumerate() { @if i > 0 { ", " } (name) @if *protected { "*" } } }
        }
        // Notes go under their row, the whole width: sentences, too long for a phone's column.
        @if notes && !h.note.is_empty() { tr .note { td colspan="6" .why { (h.note) } } }
    }
}

/// A drain at a glance: "drain draining: 2 of 5 moved, 1 stuck".
fn drain_summary(d: &pb::DrainPlan) -> String {
    let count = |states: &[&str]| d.steps.iter().filter(|s| states.contains(&s.state.as_str())).count();
    let mut text =
        format!("drain {}: {} of {} moved", d.state, count(&["migrated", "restarted"]), d.steps.len());
    for (what, states) in
        [("moving", &["migrating", "restarting"][..]), ("failed", &["failed"]), ("stuck", &["stuck"])]
    {
        match count(states) {
            0 => {}
            n => text += &format!(", {n} {what}"),
        }
    }
    text
}

fn operation_row(o: &pb::Operation) -> Markup {
    let route = if o.source.is_empty() { o.target.clone() } else { format!("{} → {}", o.source, o.target) };
    html! {
        tr {
            td { (o.kind) }
            td { (o.vm) }
            td { (route) }
            td { (o.state) }
            td {
                @if o.data_total > 0 {
                    progress max=(o.data_total) value=(o.data_processed) {}
                    " " (o.data_processed * 100 / o.data_total) " %"
                }
                " " (format!("{:.1} s", o.elapsed_ms as f64 / 1000.0))
            }
        }
    }
}

const STYLE: &str = "
body{font:15px/1.4 system-ui,sans-serif;margin:0;color:#1b1f24;background:#f6f7f9}
header{display:flex;gap:1em;align-items:center;padding:.5em 1em;background:#1b1f24;color:#fff}
h1{font-size:1.2em;margin:0}
main{padding:0 1em 2em;max-width:70em}
h2{font-size:1.05em;margin:1.4em 0 .4em}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;background:#fff}
th,td{text-align:left;padding:.35em .6em;border-bottom:1px solid #e3e6ea;vertical-align:top}
th{font-weight:600;font-size:.85em;color:#57606a}
.num{text-align:right}
.why{font-size:.85em;color:#57606a}
tr.note td{padding-top:0}
tr:has(+ tr.note) td{border-bottom:0}
.badge{display:inline-block;padding:0 .45em;border-radius:.6em;font-size:.85em;background:#d0d7de}
.online,.running{background:#c6f0cf}
.suspect,.maintenance,.draining,.paused,.migrating{background:#fde8a6}
.dead,.stopped,.crashed{background:#f8c7c3}
.alarm{background:#f8c7c3;padding:.5em;border-radius:.3em}
.leader{color:#57606a}
#stale{background:#d1242f;padding:0 .5em;border-radius:.3em}
.tiles{display:flex;flex-wrap:wrap;gap:.6em}
.tiles div{background:#fff;padding:.5em .8em;border-radius:.3em;flex:1 1 9em}
.tiles b{display:block;font-size:1.5em}
ul#events{list-style:none;padding:0;margin:0;background:#fff}
ul#events li{padding:.3em .6em;border-bottom:1px solid #e3e6ea}
time{color:#57606a;font-variant-numeric:tabular-nums}
@media (max-width:40em){th,td{padding:.3em .35em}}
";

/// Replaces `main` every two seconds; `data-updates` on the body counts the refreshes (the
/// browser test reads it). The banner shows once no refresh has succeeded for 5 s: a refused
/// connection fails at once, but a hung or frozen controller never answers, so a request is
/// abandoned after 4 s and none is sent while one is pending.
const SCRIPT: &str = "
(function(){
  var updates = 0, last = Date.now(), pending = false, stale = document.getElementById('stale');
  setInterval(function(){
    stale.hidden = Date.now() - last < 5000;
    if (pending) return;
    pending = true;
    var abort = new AbortController(), timer = setTimeout(function(){ abort.abort(); }, 4000);
    fetch('/status/main', {cache: 'no-store', signal: abort.signal}).then(function(r){
      if (!r.ok) throw new Error(r.status);
      return r.text();
    }).then(function(html){
      document.querySelector('main').innerHTML = html;
      document.body.dataset.updates = ++updates;
      last = Date.now();
      stale.hidden = true;
    }).catch(function(){}).finally(function(){ clearTimeout(timer); pending = false; });
  }, 2000);
})();
";

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        let host = |name: &str, state: &str, note: &str| pb::Host {
            name: name.into(),
            state: state.into(),
            admin_state: "active".into(),
            health: "healthy".into(),
            note: note.into(),
            lease_left_s: (state == "online").then_some(4.2),
            heartbeat_age_s: Some(if state == "online" { 0.8 } else { 7.0 }),
            ..Default::default()
        };
        let vm = |name: &str, host: &str, state: &str, why: &str| pb::Vm {
            name: name.into(),
            host: host.into(),
            state: state.into(),
            protected: true,
            priority: 10,
            why_not_running: why.into(),
            ..Default::default()
        };
        Snapshot {
            who: pb::LeaderReply { name: "ctl1".into(), leading: true, epoch: 3, ..Default::default() },
            recorded: false,
            quorum: Some(true),
            warnings: vec!["BELOW THE 1-HOST RESERVE".into()],
            database: None,
            hosts: vec![
                host("kvm1", "dead", "no lease for 1.0 s"),
                pb::Host {
                    drain: Some(pb::DrainPlan {
                        state: "draining".into(),
                        steps: ["migrated", "migrating", "stuck", "pending"]
                            .map(|state| pb::DrainStep { state: state.into(), ..Default::default() })
                            .to_vec(),
                        ..Default::default()
                    }),
                    ..host("kvm2", "online", "")
                },
            ],
            protected: vec![
                vm("dns1", "kvm2", "running", ""),
                vm("<b>x</b>", "kvm1", "stopped", "waiting for a host with 512 MiB free"),
            ],
            running: HashMap::from([("kvm2".into(), vec![("dns1".into(), true), ("web1".into(), false)])]),
            operations: vec![pb::Operation {
                kind: "migrate".into(),
                vm: "dns1".into(),
                source: "kvm2".into(),
                target: "kvm3".into(),
                state: "running".into(),
                data_total: 200,
                data_processed: 50,
                elapsed_ms: 1500,
                ..Default::default()
            }],
            events: vec![],
            report: None,
            at: chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
        }
    }

    #[test]
    fn the_page_shows_host_states_why_vms_do_not_run_and_progress() {
        let html = page(&snapshot()).into_string();
        assert!(html.contains(r#"<tr id="host-kvm1" data-state="dead">"#), "{html}");
        assert!(html.contains(r#"<tr id="host-kvm2" data-state="online">"#));
        assert!(html.contains("no lease for 1.0 s") && html.contains("waiting for a host with 512 MiB free"));
        assert!(html.contains("4.2 s left") && html.contains("lapsed; heard 7 s ago"));
        assert!(html.contains("1/2</b>hosts online") && html.contains("1/2</b>protected VMs running"));
        assert!(html.contains(r#"<progress max="200" value="50"></progress> 25 %"#), "{html}");
        assert!(html.contains("ctl1 leads (epoch 3) · quorum") && html.contains("BELOW THE 1-HOST RESERVE"));
        assert!(html.contains(r#"name="viewport""#), "readable on a phone");
        assert!(html.contains("drain draining: 1 of 4 moved, 1 moving, 1 stuck"), "{html}");
        assert!(html.contains("<td>dns1*, web1</td>"), "kvm2's VMs, the protected starred: {html}");
    }

    /// Thousands of protected VMs: the ones not running come first, and the page stops at
    /// `ROWS` and says how many more run.
    #[test]
    fn a_large_cluster_lists_the_protected_vms_not_running_first_and_stops_at_a_hundred() {
        let mut s = snapshot();
        let running = |i: usize| pb::Vm {
            name: format!("vm{i:04}"),
            state: "running".into(),
            protected: true,
            ..Default::default()
        };
        s.protected = (0..1000)
            .map(running)
            .chain(s.protected.iter().filter(|v| v.state != "running").cloned())
            .collect();
        // As `Snapshot::read` sorts them.
        s.protected.sort_by_key(|v| v.state == "running");
        let html = main(&s).into_string();
        assert_eq!(html.matches(r#"<tr id="vm-"#).count(), ROWS, "{html:.2000}");
        assert!(
            html.contains(r#"<tr id="vm-&lt;b&gt;x&lt;/b&gt;" data-state="stopped">"#),
            "the one down is listed"
        );
        assert!(html.contains("… and 901 more, running"), "{html:.200}");
    }

    #[test]
    fn names_are_escaped() {
        let html = main(&snapshot()).into_string();
        assert!(html.contains("&lt;b&gt;x&lt;/b&gt;") && !html.contains("<b>x</b>"), "{html}");
    }

    #[test]
    fn a_standby_names_the_leader_and_says_what_it_shows() {
        let mut s = snapshot();
        s.who = pb::LeaderReply {
            name: "ctl2".into(),
            leader_name: "ctl1".into(),
            leader_endpoint: "https://ctl1:7400".into(),
            ..Default::default()
        };
        s.recorded = true;
        let html = main(&s).into_string();
        assert!(html.contains("ctl2 stands by; ctl1 leads at https://ctl1:7400"), "{html}");
        assert!(html.contains("?/2</b>hosts online") && !html.contains("no lease for 1.0 s"), "{html}");
        assert!(
            html.contains("the database&#39;s record") || html.contains("the database's record"),
            "{html}"
        );
    }
}
