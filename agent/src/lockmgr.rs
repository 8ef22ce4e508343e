//! Which lock manager libvirt uses on this host: the second layer behind fencing. With
//! `lock_manager = "lockd"` (virtlockd, leases in a lockspace on shared storage) or
//! `"sanlock"`, a second copy of a VM cannot open its disks while the first runs. Reported
//! with the host's facts and shown by `vmha host ls`.

use std::path::Path;

/// `lockd`, `sanlock`, `lockd (virtlockd not running)`, or `none`.
pub fn detect(qemu_conf: &Path, run_dir: &Path) -> String {
    let conf = std::fs::read_to_string(qemu_conf).unwrap_or_default();
    let configured = conf.lines().map(str::trim).filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == "lock_manager").then(|| v.trim().trim_matches('"').to_string())
    });
    match configured.as_deref() {
        None | Some("" | "nop") => "none".into(),
        // libvirt 9 expects systemd to start virtlockd on demand; without it, starts fail.
        Some("lockd") if !run_dir.join("virtlockd-sock").exists() => "lockd (virtlockd not running)".into(),
        Some(m) => m.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_manager_comes_from_qemu_conf_and_lockd_needs_its_daemon() {
        let dir = std::env::temp_dir().join(format!("vmha-lockmgr-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("qemu.conf");
        assert_eq!(detect(&conf, &dir), "none", "no qemu.conf");
        std::fs::write(&conf, "#lock_manager = \"lockd\"\nuser = \"root\"\n").unwrap();
        assert_eq!(detect(&conf, &dir), "none", "commented out");
        std::fs::write(&conf, "lock_manager = \"lockd\"\n").unwrap();
        assert_eq!(detect(&conf, &dir), "lockd (virtlockd not running)");
        std::fs::write(dir.join("virtlockd-sock"), "").unwrap();
        assert_eq!(detect(&conf, &dir), "lockd");
        std::fs::write(&conf, " lock_manager=\"sanlock\"\n").unwrap();
        assert_eq!(detect(&conf, &dir), "sanlock");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
