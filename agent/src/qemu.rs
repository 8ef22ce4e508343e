//! Finding and killing this host's QEMU processes without libvirt: the self-fence must work
//! when libvirtd hangs. libvirt starts every guest as `qemu-system-* ... -uuid UUID ...`, so
//! the domain's UUID in a process's command line identifies its QEMU. Only processes in this
//! agent's UTS namespace (its host) count: on a lab machine several hosts share one kernel.

use std::path::Path;

/// The pids of running QEMU processes of these domains on this host.
pub fn find(uuids: &[String]) -> Vec<(String, i32)> {
    // A fenced agent asks every tick; with nothing protected there is nothing to read /proc for.
    if uuids.is_empty() {
        return Vec::new();
    }
    find_in(Path::new("/proc"), uuids)
}

fn find_in(proc: &Path, uuids: &[String]) -> Vec<(String, i32)> {
    let own_uts = std::fs::read_link(proc.join("self/ns/uts")).ok();
    let Ok(entries) = std::fs::read_dir(proc) else { return Vec::new() };
    let mut found = Vec::new();
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let dir = e.path();
        let Ok(cmdline) = std::fs::read(dir.join("cmdline")) else { continue };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let Some(uuid) = args
            .windows(2)
            .find(|w| w[0] == b"-uuid")
            .and_then(|w| std::str::from_utf8(w[1]).ok())
            .map(str::to_lowercase)
        else {
            continue;
        };
        if !uuids.iter().any(|u| u.eq_ignore_ascii_case(&uuid)) {
            continue;
        }
        if own_uts.is_some() && std::fs::read_link(dir.join("ns/uts")).ok() != own_uts {
            continue;
        }
        // A zombie is dead already; it only waits for its parent.
        let zombie = std::fs::read_to_string(dir.join("stat"))
            .ok()
            .and_then(|s| s.rsplit(')').next().map(|r| r.trim_start().starts_with('Z')))
            .unwrap_or(false);
        if !zombie {
            found.push((uuid, pid));
        }
    }
    found
}

/// SIGKILLs the QEMU processes of these domains; returns those still found afterwards.
pub fn kill(uuids: &[String]) -> Vec<(String, i32)> {
    for (uuid, pid) in find(uuids) {
        // SAFETY: kill(2) with a pid read from /proc; at worst ESRCH if it is gone.
        let r = unsafe { libc::kill(pid, libc::SIGKILL) };
        tracing::error!(domain = %uuid, pid, ok = r == 0, "self-fence: killed QEMU directly");
    }
    find(uuids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_qemu_is_found_by_the_uuid_in_its_command_line_and_killed() {
        let uuid = "0f3c3a2e-1111-4222-8333-944455556666".to_string();
        // A stand-in process whose command line carries `-uuid UUID`, as libvirt's QEMU does
        // (`sh -c SCRIPT NAME ARGS...` keeps them in the shell's own argv; it waits on its
        // stdin, so no child of its own outlives it).
        let mut child = std::process::Command::new("sh")
            .args(["-c", "read x", "qemu-system-x86_64", "-uuid", &uuid])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        // Until the child has exec'd, its command line is still this test's.
        let mut found = Vec::new();
        for _ in 0..100 {
            found = find(std::slice::from_ref(&uuid));
            if !found.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(found, vec![(uuid.clone(), pid)]);
        assert!(find(&["00000000-0000-0000-0000-000000000000".into()]).is_empty());
        let mut left = kill(std::slice::from_ref(&uuid));
        for _ in 0..100 {
            if left.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
            left = find(std::slice::from_ref(&uuid));
        }
        assert!(left.is_empty(), "a killed QEMU (a zombie until reaped) is gone: {left:?}");
        assert!(!child.wait().unwrap().success());
    }
}
