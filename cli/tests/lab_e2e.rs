//! End to end on real KVM: the lab (`deploy/lab/up`) runs PostgreSQL, the controller and three
//! libvirt hosts with agents; this drives the `vmha` binary like an operator and checks the
//! result with libvirt itself (virsh), independently of vmha. Needs root and /dev/kvm.
//! The lab is taken down at the end, also when the test fails.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
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
        let out = Command::new("virsh").arg("-c").arg(self.uri(host)).args(args).output().expect("run virsh");
        assert!(out.status.success(), "virsh {args:?} on {host}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    fn running_names(&self, host: &str) -> Vec<String> {
        self.virsh(host, &["list", "--name"]).lines().filter(|l| !l.is_empty()).map(String::from).collect()
    }

    fn all_names(&self, host: &str) -> Vec<String> {
        self.virsh(host, &["list", "--all", "--name"])
            .lines()
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let ok = Command::new(repo().join("deploy/lab/down")).status().map(|s| s.success()).unwrap_or(false);
        if !ok {
            eprintln!("deploy/lab/down failed; the lab may still run");
        }
    }
}

#[test]
fn protect_and_live_migrate_a_vm_on_real_kvm() {
    let lab = Lab::up();

    let status = lab.vmha_ok(&["status"]);
    assert!(status.contains("hosts 3/3 online"), "{status}");

    // Protection shows in the VM's JSON.
    lab.vmha_ok(&["protect", "dns1", "--priority", "100"]);
    let vm = lab.json(&["vm", "show", "dns1"]);
    assert_eq!(vm["protected"], true, "{vm}");
    assert_eq!(vm["priority"], 100, "{vm}");
    assert_eq!(vm["state"], "running", "{vm}");
    let source = vm["host"].as_str().unwrap().to_string();
    assert!(lab.running_names(&source).contains(&"dns1".to_string()), "libvirt on {source} runs dns1");
    let target = ["kvm1", "kvm2", "kvm3"].into_iter().find(|h| *h != source).unwrap();

    // The migration completes, and libvirt agrees: running on the target, gone from the source.
    let out = lab.vmha_ok(&["migrate", "dns1", "--to", target]);
    assert!(out.contains(&format!("dns1 migrated from {source} to {target}")), "{out}");
    assert_eq!(lab.virsh(target, &["domstate", "dns1"]).trim(), "running");
    assert!(!lab.all_names(&source).contains(&"dns1".to_string()), "dns1 is still defined on {source}");
    let vm = lab.json(&["vm", "show", "dns1"]);
    assert_eq!(vm["host"], target, "{vm}");
    assert_eq!(vm["protected"], true, "protection survives the move: {vm}");

    // The operation and its events are recorded.
    let events = lab.vmha_ok(&["events", "--limit", "500", "-o", "json"]);
    let events: Vec<serde_json::Value> = events.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let find =
        |kind: &str| events.iter().rev().find(|e| e["kind"] == kind && e["subject"] == "dns1").cloned();
    let requested = find("migration_requested").expect("a migration_requested event");
    assert!(requested["message"].as_str().unwrap().contains(&format!("from {source} to {target}")));
    let done = find("migration_succeeded").expect("a migration_succeeded event");
    assert!(done["message"].as_str().unwrap().contains("live-migrated"), "{done}");
    assert!(find("vm_protected").is_some(), "a vm_protected event");

    // Bad requests: one line naming the thing, a non-zero exit, nothing changed.
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
