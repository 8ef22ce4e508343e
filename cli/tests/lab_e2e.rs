//! End to end on real KVM. The lab (`deploy/lab/up`) runs PostgreSQL, the controller and three
//! libvirt hosts with agents; each scenario drives the `vmha` binary like an operator, breaks
//! things with the lab's chaos verbs, and checks the outcome independently of vmha: with
//! libvirt (virsh) and with the machine's processes (a QEMU process per running guest, found
//! in each host's network namespace). Needs root and /dev/kvm.
//!
//! Its own harness: the scenarios share one lab and run one after another; the lab is taken
//! down at the end whatever happened. Prints a line per scenario and `N passed, M failed`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const HOSTS: [&str; 3] = ["kvm1", "kvm2", "kvm3"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn lab_verb(verb: &str, args: &[&str]) {
    let out = Command::new(repo().join("deploy/lab").join(verb)).args(args).output().expect("run a lab verb");
    assert!(
        out.status.success(),
        "deploy/lab/{verb} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Lab {
    env: HashMap<String, String>,
}

impl Lab {
    fn up() -> Lab {
        let out = Command::new(repo().join("deploy/lab/up")).output().expect("run deploy/lab/up");
        assert!(out.status.success(), "deploy/lab/up failed:\n{}", String::from_utf8_lossy(&out.stderr));
        let env = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('"').trim_matches('\'').to_string()))
            .collect::<HashMap<_, _>>();
        assert!(env.contains_key("VMHA_CONTROLLER"), "up printed no VMHA_CONTROLLER: {env:?}");
        Lab { env }
    }

    fn vmha(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_vmha"))
            .args(args)
            .env("VMHA_CONTROLLER", &self.env["VMHA_CONTROLLER"])
            .output()
            .expect("run vmha")
    }

    fn vmha_ok(&self, args: &[&str]) -> String {
        let out = self.vmha(args);
        assert!(
            out.status.success(),
            "vmha {args:?} exited {:?}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        serde_json::from_str(&self.vmha_ok(&a)).expect("vmha -o json prints JSON")
    }

    fn uri(&self, host: &str) -> String {
        self.env[&format!("VMHA_LAB_{}_URI", host.to_uppercase())].clone()
    }

    /// libvirt's own answer, not vmha's.
    fn virsh(&self, host: &str, args: &[&str]) -> String {
        let out = Command::new("timeout")
            .args(["10", "virsh", "-c", &self.uri(host)])
            .args(args)
            .output()
            .expect("run virsh");
        assert!(out.status.success(), "virsh {args:?} on {host}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    fn all_names(&self, host: &str) -> Vec<String> {
        self.virsh(host, &["list", "--all", "--name"])
            .lines()
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect()
    }

    fn events(&self) -> Vec<serde_json::Value> {
        self.vmha_ok(&["events", "--limit", "1000", "-o", "json"])
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn host_of(&self, vm: &str) -> String {
        self.json(&["vm", "show", vm])["host"].as_str().unwrap().to_string()
    }

    fn controller_pid(&self) -> i32 {
        let f = Path::new(&self.env["VMHA_LAB_DIR"]).join("controller.pid");
        std::fs::read_to_string(&f).unwrap().trim().parse().unwrap()
    }

    /// Waits until every host is online and every demo guest runs, as after `up`.
    fn settle(&self) {
        wait_until("all hosts online", Duration::from_secs(60), || {
            let hosts = self.json(&["host", "ls"]);
            hosts.as_array().unwrap().iter().all(|h| h["state"] == "online")
        });
    }
}

/// Running QEMU processes per guest name, and the hosts they run on, read from the
/// processes in each lab host's network namespace.
fn qemu_processes() -> BTreeMap<String, Vec<(String, u32)>> {
    let mut out: BTreeMap<String, Vec<(String, u32)>> = BTreeMap::new();
    for host in HOSTS {
        let pids = Command::new("ip").args(["netns", "pids", &format!("vmha-{host}")]).output();
        let Ok(pids) = pids else { continue };
        for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if stat.split_whitespace().nth(2) == Some("Z") {
                continue;
            }
            let cmd = String::from_utf8_lossy(&cmd);
            if let Some(name) = cmd.split('\0').find_map(|a| a.strip_prefix("guest=")) {
                let name = name.split(',').next().unwrap_or(name).to_string();
                out.entry(name).or_default().push((host.to_string(), pid.parse().unwrap()));
            }
        }
    }
    out
}

fn running_on(vm: &str) -> Vec<String> {
    qemu_processes().get(vm).map(|v| v.iter().map(|(h, _)| h.clone()).collect()).unwrap_or_default()
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Samples the QEMU processes every 100 ms until dropped; remembers any moment a guest ran
/// twice.
struct DoubleRunWatch {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl DoubleRunWatch {
    fn start() -> DoubleRunWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s, v) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            let mut samples = 0;
            let mut next = Instant::now();
            while !s.load(Ordering::Relaxed) {
                for (vm, copies) in qemu_processes() {
                    if copies.len() > 1 {
                        v.lock().unwrap().push(format!("{vm} on {copies:?}"));
                    }
                }
                samples += 1;
                next += Duration::from_millis(100);
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            samples
        });
        DoubleRunWatch { stop, seen, thread: Some(thread) }
    }

    /// Stops sampling; returns how many samples were taken and what ran twice.
    fn finish(mut self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let n = self.thread.take().unwrap().join().unwrap();
        (n, self.seen.lock().unwrap().clone())
    }
}

// ---------------------------------------------------------------------------------------------

fn protect_and_live_migrate(lab: &Lab) {
    let status = lab.vmha_ok(&["status"]);
    assert!(status.contains("hosts 3/3 online"), "{status}");

    lab.vmha_ok(&["protect", "dns1", "--priority", "100"]);
    let vm = lab.json(&["vm", "show", "dns1"]);
    assert_eq!(vm["protected"], true, "{vm}");
    assert_eq!(vm["priority"], 100, "{vm}");
    assert_eq!(vm["state"], "running", "{vm}");
    let source = vm["host"].as_str().unwrap().to_string();
    assert_eq!(
        running_on("dns1"),
        std::slice::from_ref(&source),
        "the processes agree dns1 runs on {source}"
    );
    let target = HOSTS.into_iter().find(|h| *h != source).unwrap();

    let out = lab.vmha_ok(&["migrate", "dns1", "--to", target]);
    assert!(out.contains(&format!("dns1 migrated from {source} to {target}")), "{out}");
    assert_eq!(lab.virsh(target, &["domstate", "dns1"]).trim(), "running");
    assert!(!lab.all_names(&source).contains(&"dns1".to_string()), "dns1 is still defined on {source}");
    let vm = lab.json(&["vm", "show", "dns1"]);
    assert_eq!(vm["host"], target, "{vm}");
    assert_eq!(vm["protected"], true, "protection survives the move: {vm}");

    let events = lab.events();
    let find =
        |kind: &str| events.iter().rev().find(|e| e["kind"] == kind && e["subject"] == "dns1").cloned();
    let requested = find("migration_requested").expect("a migration_requested event");
    assert!(requested["message"].as_str().unwrap().contains(&format!("from {source} to {target}")));
    let done = find("migration_succeeded").expect("a migration_succeeded event");
    assert!(done["message"].as_str().unwrap().contains("live-migrated"), "{done}");
    assert!(find("vm_protected").is_some(), "a vm_protected event");

    let out = lab.vmha(&["migrate", "nosuchvm", "--to", target]);
    assert_eq!(out.status.code(), Some(3), "unknown VM exits 3");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("nosuchvm"), "{err}");
    let out = lab.vmha(&["migrate", "dns1", "--to", target]);
    assert_eq!(out.status.code(), Some(4), "already there exits 4");
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("already runs on {target}")));
    let out = lab.vmha(&["migrate", "dns1", "--to", "kvm9"]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(lab.virsh(target, &["domstate", "dns1"]).trim(), "running", "refusals changed nothing");
}

/// Puts `vm` on `host` by live migration, unless it is there already.
fn place(lab: &Lab, vm: &str, host: &str) {
    if lab.host_of(vm) != host {
        lab.vmha_ok(&["migrate", vm, "--to", host]);
    }
}

fn host_death_restarts_protected_vms_by_priority(lab: &Lab) {
    lab.vmha_ok(&["protect", "dns1", "--priority", "100"]);
    lab.vmha_ok(&["protect", "radius1", "--priority", "50"]);
    let victim = lab.host_of("radius1");
    place(lab, "dns1", &victim);
    let before = lab.events().last().map_or(0, |e| e["id"].as_i64().unwrap());
    let watch = DoubleRunWatch::start();
    lab_verb("kill", &[&victim]);
    wait_until("dns1 and radius1 running on other hosts", Duration::from_secs(40), || {
        let p = qemu_processes();
        ["dns1", "radius1"].iter().all(|vm| p.get(*vm).is_some_and(|c| c.len() == 1 && c[0].0 != victim))
    });
    let (samples, doubles) = watch.finish();
    assert!(doubles.is_empty(), "ran twice: {doubles:?} ({samples} samples)");
    for vm in ["dns1", "radius1"] {
        let h = running_on(vm)[0].clone();
        // QEMU starts paused; libvirt resumes it once it is set up.
        wait_until(&format!("libvirt on {h} to run {vm}"), Duration::from_secs(10), || {
            lab.virsh(&h, &["domstate", vm]).trim() == "running"
        });
    }
    let events: Vec<_> = lab.events().into_iter().filter(|e| e["id"].as_i64().unwrap() > before).collect();
    assert!(events.iter().any(|e| e["kind"] == "host_dead" && e["subject"] == victim.as_str()), "{events:?}");
    let started: Vec<&str> = events
        .iter()
        .filter(|e| e["kind"] == "restart_started")
        .map(|e| e["subject"].as_str().unwrap())
        .collect();
    assert_eq!(&started[..2], ["dns1", "radius1"], "dns1 (priority 100) is started first: {started:?}");
    lab_verb("revive", &[&victim]);
    lab.settle();
    assert_eq!(running_on("dns1").len(), 1, "the revived host starts no stale copy");
}

fn anti_affinity_holds_after_failover(lab: &Lab) {
    lab.vmha_ok(&["protect", "dns1", "--priority", "100", "--anti-affinity", "dns"]);
    lab.vmha_ok(&["protect", "dns2", "--priority", "90", "--anti-affinity", "dns"]);
    let h1 = lab.host_of("dns1");
    let mut h2 = lab.host_of("dns2");
    if h1 == h2 {
        h2 = HOSTS.into_iter().find(|h| *h != h1).unwrap().to_string();
        lab.vmha_ok(&["migrate", "dns2", "--to", &h2]);
    }
    // The free host has more room than dns2's, so only the group keeps dns1 off dns2's host.
    lab_verb("kill", &[&h1]);
    wait_until("dns1 running on another host", Duration::from_secs(40), || {
        running_on("dns1").iter().any(|h| *h != h1)
    });
    let now1 = running_on("dns1");
    let now2 = running_on("dns2");
    assert_eq!(now1.len(), 1);
    assert_ne!(now1, now2, "dns1 and dns2 share a host after failover: {now1:?}");
    lab_verb("revive", &[&h1]);
    lab.settle();
    lab.vmha_ok(&["protect", "dns1", "--anti-affinity", ""]);
    lab.vmha_ok(&["protect", "dns2", "--anti-affinity", ""]);
}

fn an_isolated_host_fences_itself_and_is_replaced(lab: &Lab) {
    lab.vmha_ok(&["protect", "dns1", "--priority", "100"]);
    let victim = lab.host_of("dns1");
    let watch = DoubleRunWatch::start();
    let started = Instant::now();
    lab_verb("cut", &[&victim]);
    // It destroys its protected VMs itself, and the controller restarts them elsewhere.
    wait_until("dns1 destroyed on the cut host and running elsewhere", Duration::from_secs(40), || {
        let on = running_on("dns1");
        on.len() == 1 && on[0] != victim
    });
    std::thread::sleep(Duration::from_secs(2));
    lab_verb("heal", &[&victim]);
    lab.settle();
    std::thread::sleep(Duration::from_secs(2));
    let (samples, doubles) = watch.finish();
    let expected = started.elapsed().as_millis() as usize / 100;
    assert!(samples + 5 >= expected, "sampled every 100 ms: {samples} samples, {expected} expected");
    assert!(doubles.is_empty(), "ran twice: {doubles:?}");
    assert_eq!(running_on("dns1").len(), 1);
}

fn a_stopped_controller_stops_no_vm(lab: &Lab) {
    lab.settle();
    let before = qemu_processes();
    let last_event = lab.events().last().map_or(0, |e| e["id"].as_i64().unwrap());
    // Stop it mid-second: heartbeats are aligned on its whole seconds (controller/engine/SAFETY.md).
    wait_until("the middle of a leader second", Duration::from_secs(5), || {
        let clock = lab.json(&["status"])["leader_clock_ms"].as_u64().unwrap();
        (300..700).contains(&(clock % 1000))
    });
    let pid = lab.controller_pid().to_string();
    assert!(Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    std::thread::sleep(Duration::from_secs(16)); // more than three lease_ttl
    assert_eq!(qemu_processes(), before, "while the controller was stopped");
    assert!(Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(
        qemu_processes(),
        before,
        "after it ran again: the same QEMU processes, none stopped or moved"
    );
    let events: Vec<_> =
        lab.events().into_iter().filter(|e| e["id"].as_i64().unwrap() > last_event).collect();
    let bad: Vec<_> = events
        .iter()
        .filter(|e| ["host_dead", "restart_started", "vm_stopped"].contains(&e["kind"].as_str().unwrap()))
        .collect();
    assert!(bad.is_empty(), "{bad:?}");
}

const GUESTS: [&str; 3] = ["dns1", "radius1", "dns2"];

fn host_json(lab: &Lab, host: &str) -> serde_json::Value {
    let hosts = lab.json(&["host", "ls"]);
    hosts.as_array().unwrap().iter().find(|h| h["name"] == host).cloned().expect("host listed")
}

/// Kinds of the events after `after`, for `vm`.
fn kinds_since(lab: &Lab, after: i64, vm: &str) -> Vec<String> {
    lab.events()
        .into_iter()
        .filter(|e| e["id"].as_i64().unwrap() > after && e["subject"] == vm)
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect()
}

fn last_event_id(lab: &Lab) -> i64 {
    lab.events().last().map_or(0, |e| e["id"].as_i64().unwrap())
}

fn drain_moves_every_vm_live_and_ends_in_maintenance(lab: &Lab) {
    lab.settle();
    let host = "kvm3";
    for vm in GUESTS {
        place(lab, vm, host);
    }
    let before = last_event_id(lab);
    let plan = lab.vmha_ok(&["host", "drain", host, "--dry-run"]);
    for vm in GUESTS {
        assert!(plan.contains(vm), "the dry run lists {vm}: {plan}");
    }
    assert_eq!(host_json(lab, host)["admin_state"], "active", "a dry run changes nothing");
    let out = lab.vmha_ok(&["host", "drain", host]);
    assert!(out.contains(&format!("drain of {host} done")), "{out}");
    for vm in GUESTS {
        let on = running_on(vm);
        assert!(on.len() == 1 && on[0] != host, "{vm} runs on {on:?}");
        let kinds = kinds_since(lab, before, vm);
        assert!(kinds.contains(&"migration_succeeded".to_string()), "{vm} was migrated: {kinds:?}");
        assert!(!kinds.iter().any(|k| k.starts_with("restart")), "{vm} was not restarted: {kinds:?}");
    }
    assert_eq!(host_json(lab, host)["admin_state"], "maintenance");
    lab.vmha_ok(&["host", "undrain", host]);
    assert_eq!(host_json(lab, host)["admin_state"], "active");
}

fn a_drain_without_room_ends_incomplete_and_stops_nothing(lab: &Lab) {
    lab.settle();
    let host = "kvm1";
    for vm in GUESTS {
        place(lab, vm, host);
    }
    // Room for one 64 MiB guest on each other host: the third must stay.
    lab.vmha_ok(&["host", "limit", "kvm2", "--memory", "64"]);
    lab.vmha_ok(&["host", "limit", "kvm3", "--memory", "64"]);
    let out = lab.vmha(&["host", "drain", host]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    lab.vmha_ok(&["host", "limit", "kvm2", "--memory", "0"]);
    lab.vmha_ok(&["host", "limit", "kvm3", "--memory", "0"]);
    assert_eq!(out.status.code(), Some(1), "an incomplete drain exits 1: {text}");
    assert!(text.contains("incomplete") && text.contains("limit in use"), "{text}");
    let stayed: Vec<_> = GUESTS.iter().filter(|vm| running_on(vm) == [host.to_string()]).collect();
    assert_eq!(stayed.len(), 1, "exactly one guest stays, still running: {stayed:?}");
    for vm in GUESTS {
        assert_eq!(running_on(vm).len(), 1, "{vm} runs exactly once");
    }
    assert_eq!(host_json(lab, host)["admin_state"], "draining", "not in maintenance");
    lab.vmha_ok(&["host", "undrain", host]);
}

fn a_failing_check_degrades_and_empties_a_host(lab: &Lab) {
    lab.settle();
    let host = "kvm2";
    place(lab, "dns2", host);
    let flag = PathBuf::from(&lab.env["VMHA_LAB_KVM2_FAIL"]);
    std::fs::write(&flag, "simulated RAID failure\n").unwrap();
    let emptied = std::panic::catch_unwind(|| {
        wait_until("kvm2 degraded and empty", Duration::from_secs(40), || {
            host_json(lab, host)["health"] == "degraded"
                && GUESTS.iter().all(|vm| running_on(vm) != [host.to_string()])
        })
    });
    std::fs::remove_file(&flag).unwrap();
    emptied.unwrap();
    let h = host_json(lab, host);
    assert!(
        h["probes"].as_array().unwrap().iter().any(|p| p["name"] == "check:lab-flag" && p["ok"] == false),
        "{h}"
    );
    wait_until("kvm2 healthy again", Duration::from_secs(30), || host_json(lab, host)["health"] == "healthy");
}

fn a_throttled_migration_times_out_and_the_guest_stays(lab: &Lab) {
    lab.settle();
    let source = lab.host_of("radius1");
    let target = HOSTS.into_iter().find(|h| *h != source).unwrap();
    let out = lab.vmha(&["migrate", "radius1", "--to", target, "--bandwidth", "1", "--timeout", "100ms"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "a failed migration exits 1: {text}");
    assert!(text.contains("failed") && text.contains("timeout"), "{text}");
    assert_eq!(running_on("radius1"), std::slice::from_ref(&source), "still running on the source");
    assert_eq!(lab.virsh(&source, &["domstate", "radius1"]).trim(), "running");
    assert_eq!(lab.host_of("radius1"), source);
}

fn main() {
    type Scenario = (&'static str, fn(&Lab));
    let scenarios: [Scenario; 9] = [
        ("protect_and_live_migrate", protect_and_live_migrate),
        ("host_death_restarts_protected_vms_by_priority", host_death_restarts_protected_vms_by_priority),
        ("anti_affinity_holds_after_failover", anti_affinity_holds_after_failover),
        ("an_isolated_host_fences_itself_and_is_replaced", an_isolated_host_fences_itself_and_is_replaced),
        ("a_stopped_controller_stops_no_vm", a_stopped_controller_stops_no_vm),
        (
            "drain_moves_every_vm_live_and_ends_in_maintenance",
            drain_moves_every_vm_live_and_ends_in_maintenance,
        ),
        (
            "a_drain_without_room_ends_incomplete_and_stops_nothing",
            a_drain_without_room_ends_incomplete_and_stops_nothing,
        ),
        ("a_failing_check_degrades_and_empties_a_host", a_failing_check_degrades_and_empties_a_host),
        (
            "a_throttled_migration_times_out_and_the_guest_stays",
            a_throttled_migration_times_out_and_the_guest_stays,
        ),
    ];
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let lab = Lab::up();
    let (mut passed, mut failed) = (0, 0);
    for (name, scenario) in scenarios {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        let start = Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| scenario(&lab)));
        let took = start.elapsed().as_secs_f64();
        match result {
            Ok(()) => {
                passed += 1;
                println!("test {name} ... ok ({took:.1} s)");
            }
            Err(_) => {
                failed += 1;
                println!("test {name} ... FAILED ({took:.1} s)");
                // Leave the lab healthy for the next scenario.
                for h in HOSTS {
                    let _ = Command::new(repo().join("deploy/lab/heal")).arg(h).output();
                    let _ = Command::new(repo().join("deploy/lab/revive")).arg(h).output();
                }
                let _ = Command::new("pkill").args(["-CONT", "-f", "vmha-controller"]).status();
                for h in HOSTS {
                    let _ = lab.vmha(&["host", "limit", h, "--memory", "0"]);
                    let _ = lab.vmha(&["host", "undrain", h]);
                }
            }
        }
    }
    drop(lab);
    let down = Command::new(repo().join("deploy/lab/down")).status().map(|s| s.success()).unwrap_or(false);
    if !down {
        eprintln!("deploy/lab/down failed; the lab may still run");
    }
    println!("lab_e2e: {passed} passed, {failed} failed");
    std::process::exit(if failed == 0 && down { 0 } else { 1 });
}
