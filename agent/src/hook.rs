//! libvirt's `qemu` hook: the second guard on starts. libvirt runs
//! `/etc/libvirt/hooks/qemu DOMAIN OPERATION SUB-OPERATION EXTRA` with the domain's XML on
//! stdin before it starts a domain ("prepare") and when one arrives by live migration
//! ("migrate"); a non-zero exit stops it. Installed as
//!
//! ```sh
//! #!/bin/sh
//! exec /usr/bin/vmha-agent --libvirt-hook /var/lib/vmha-agent "$@"
//! ```
//!
//! it lets a protected VM start or arrive only while this host holds a lease, as the agent
//! last wrote it down in its state directory: whoever starts it (the agent, a hung libvirtd
//! finishing a start late, an incoming migration, an operator's `virsh start`), every copy a
//! host runs is one its self-fence covers.

use std::io::Read;
use std::path::Path;

pub const HOOK_FLAG: &str = "--libvirt-hook";

/// The lease file: the boot it was written in and the end of this host's lease on
/// CLOCK_MONOTONIC (shared by every process of the host, restarted at every boot), in
/// nanoseconds: `BOOT_ID END_NS`; or `none`. The file sits in the persistent state
/// directory, and after a watchdog reset libvirt's autostart (or an operator's `virsh start`)
/// runs before the agent rewrites it: an end from the boot before must not pass for a lease.
pub const LEASE_FILE: &str = "lease";

/// This boot's identity, which the kernel draws afresh at every boot.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|b| b.trim().to_string())
        .unwrap_or_default()
}

/// The lease file's text for a lease ending at `end_ns` on CLOCK_MONOTONIC in this boot.
pub fn lease_text(end_ns: u64) -> String {
    format!("{} {end_ns}\n", boot_id())
}

/// Nanoseconds on CLOCK_MONOTONIC, the clock `std::time::Instant` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Runs the hook; `args` are those after `--libvirt-hook`. Returns the exit status.
pub fn run(args: &[String]) -> i32 {
    let [state_dir, domain, op, ..] = args else {
        eprintln!("usage: vmha-agent --libvirt-hook STATE_DIR DOMAIN OPERATION SUB-OPERATION EXTRA");
        return 2;
    };
    if op != "prepare" && op != "migrate" {
        return 0;
    }
    let mut xml = String::new();
    let _ = std::io::stdin().read_to_string(&mut xml);
    match verdict(Path::new(state_dir), &xml, &boot_id(), monotonic_ns()) {
        Ok(()) => 0,
        Err(why) => {
            // libvirt shows this to whoever asked for the start.
            eprintln!(
                "vmha: refusing to {} protected VM {domain} here: {why}",
                if op == "migrate" { "take" } else { "start" }
            );
            1
        }
    }
}

fn verdict(state_dir: &Path, xml: &str, boot: &str, now_ns: u64) -> Result<(), String> {
    let Some(uuid) = xml
        .split_once("<uuid>")
        .and_then(|(_, r)| r.split_once("</uuid>"))
        .map(|(u, _)| u.trim().to_lowercase())
    else {
        return Ok(());
    };
    let protected = std::fs::read_to_string(state_dir.join("protected")).unwrap_or_default();
    if !protected.lines().any(|l| l.trim().eq_ignore_ascii_case(&uuid)) {
        return Ok(());
    }
    let lease = std::fs::read_to_string(state_dir.join(LEASE_FILE)).unwrap_or_default();
    let no_lease = || Err("this host holds no vmha lease (is vmha-agent running and connected?)".to_string());
    let Some((written_in, end)) = lease.trim().split_once(' ') else { return no_lease() };
    let Ok(end) = end.parse::<u64>() else { return no_lease() };
    if boot.is_empty() || written_in != boot {
        return Err(
            "the lease on file was held before this host last booted; vmha starts it where a lease is held \
                    (the agent writes a new one once it is connected)"
                .into(),
        );
    }
    if end > now_ns {
        Ok(())
    } else {
        Err(format!(
            "this host's lease expired {:.1} s ago; vmha starts it where a lease is held",
            (now_ns - end) as f64 / 1e9
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_protected_vms_need_a_lease_to_start_or_arrive() {
        let dir = std::env::temp_dir().join(format!("vmha-hook-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("protected"), "0f3c3a2e-1111-4222-8333-944455556666\n").unwrap();
        let xml = |u: &str| format!("<domain type='kvm'><name>dns1</name><uuid>{u}</uuid></domain>");
        let dns1 = xml("0F3C3A2E-1111-4222-8333-944455556666");
        assert!(verdict(&dir, &dns1, "b1", 5).unwrap_err().contains("no vmha lease"));
        std::fs::write(dir.join(LEASE_FILE), "b1 10\n").unwrap();
        assert_eq!(verdict(&dir, &dns1, "b1", 5), Ok(()));
        assert!(verdict(&dir, &dns1, "b1", 2_000_000_010).unwrap_err().contains("expired 2.0 s ago"));
        std::fs::write(dir.join(LEASE_FILE), "none\n").unwrap();
        assert_eq!(
            verdict(&dir, &xml("00000000-0000-0000-0000-000000000001"), "b1", 5),
            Ok(()),
            "not protected"
        );
        assert!(verdict(&dir, &dns1, "b1", 5).unwrap_err().contains("no vmha lease"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A watchdog reset restarts CLOCK_MONOTONIC near zero, so a lease written late in the
    /// boot before looks valid for hours to a hook that compares the numbers alone.
    #[test]
    fn a_lease_from_before_a_reboot_is_refused() {
        let dir = std::env::temp_dir().join(format!("vmha-hook-reboot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("protected"), "0f3c3a2e-1111-4222-8333-944455556666\n").unwrap();
        let dns1 = "<domain><name>dns1</name><uuid>0f3c3a2e-1111-4222-8333-944455556666</uuid></domain>";
        let hours = 5 * 3600 * 1_000_000_000u64;
        std::fs::write(dir.join(LEASE_FILE), format!("old-boot {hours}\n")).unwrap();
        assert!(
            verdict(&dir, dns1, "new-boot", 20_000_000_000)
                .unwrap_err()
                .contains("before this host last booted")
        );
        // The file as an older agent wrote it (no boot) is no lease either.
        std::fs::write(dir.join(LEASE_FILE), format!("{hours}\n")).unwrap();
        assert!(verdict(&dir, dns1, "new-boot", 20_000_000_000).unwrap_err().contains("no vmha lease"));
        // What this agent writes names this boot, which the hook then reads back.
        let text = lease_text(hours);
        assert!(!boot_id().is_empty() && text.starts_with(&boot_id()), "{text}");
        std::fs::write(dir.join(LEASE_FILE), text).unwrap();
        assert_eq!(verdict(&dir, dns1, &boot_id(), 20_000_000_000), Ok(()));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
