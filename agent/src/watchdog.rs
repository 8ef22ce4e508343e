//! The host's watchdog device, with the Linux kernel's semantics: opening arms it, any write
//! feeds it, and writing `V` right before closing disarms it ("magic close"); a close without
//! it (the agent killed or crashed) leaves it armed, and the host is reset when the timeout
//! passes without a feed. The same code drives `/dev/watchdog` in production and the lab's
//! emulated device (a FIFO read by a monitor that resets the lab host).
//!
//! Whether to feed is the lease state machine's decision (`LeaseKeeper::may_feed`); this
//! module only talks to the device.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vmha_proto::v1::WatchdogStatus;

#[derive(Debug, thiserror::Error)]
pub enum WatchdogError {
    #[error(
        "cannot open the watchdog {path}: {source}; load a driver (`modprobe softdog` if the host has no \
         hardware watchdog), point --watchdog-device at it, or run with --no-watchdog (its VMs then wait \
         for `vmha host confirm-down` when it fails)"
    )]
    Open { path: PathBuf, source: std::io::Error },
    #[error("feeding the watchdog {path} failed: {source}")]
    Feed { path: PathBuf, source: std::io::Error },
}

// From <linux/watchdog.h>: _IOWR('W', 6, int) and _IOR('W', 7, int).
const WDIOC_SETTIMEOUT: libc::c_ulong = 0xC004_5706;
const WDIOC_GETTIMEOUT: libc::c_ulong = 0x8004_5707;

pub struct Device {
    path: PathBuf,
    file: File,
    timeout: Duration,
    holder: Option<Holder>,
}

/// A process that holds the device open besides the agent, so that the agent's death closes
/// nothing. The kernel feeds a watchdog once when its last holder closes it without the
/// magic character ("watchdog did not stop!"): an agent killed while it may no longer feed
/// would otherwise postpone the reset by a whole timeout. The holder only waits; it ignores
/// SIGTERM, SIGINT and SIGHUP, and leaves on SIGUSR1 (a disarm). A restarted agent takes the
/// device from it (pidfd_getfd) instead of opening it again, which would not feed it either.
pub struct HolderSpec {
    /// The program run as `PROGRAM --hold-watchdog` (the agent's own binary).
    pub exe: PathBuf,
    /// Where its pid is kept, for the next agent.
    pub pid_file: PathBuf,
}

struct Holder {
    pid: i32,
    pid_file: PathBuf,
}

/// The argument that makes the agent's binary a holder (see `hold`).
pub const HOLD_FLAG: &str = "--hold-watchdog";
/// The descriptor the holder keeps the device on.
const HELD_FD: i32 = 3;

impl Device {
    /// Arms the device (or takes it, still armed, from the holder an earlier agent left),
    /// asking for `timeout`. A device that takes the ioctl is asked for whole seconds (rounded
    /// down) and the agent assumes what it reports; one that does not (the lab's FIFO) is
    /// taken to have `timeout`.
    pub fn open(
        path: &Path,
        timeout: Duration,
        holder: Option<&HolderSpec>,
    ) -> Result<Device, WatchdogError> {
        let adopted = holder.and_then(|h| {
            adopt(h, path).map(|(file, pid)| (file, Holder { pid, pid_file: h.pid_file.clone() }))
        });
        let (file, holder) = match adopted {
            Some((file, held)) => {
                tracing::info!(device = %path.display(), holder = held.pid, "watchdog taken over from its holder");
                (file, Some(held))
            }
            None => {
                let file = OpenOptions::new()
                    .write(true)
                    // A FIFO without its reader fails at once (ENXIO) instead of blocking the agent.
                    .custom_flags(libc::O_NONBLOCK)
                    .open(path)
                    .map_err(|source| WatchdogError::Open { path: path.into(), source })?;
                let held = holder.and_then(|h| match spawn_holder(h, &file) {
                    Ok(pid) => Some(Holder { pid, pid_file: h.pid_file.clone() }),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot start the watchdog holder; an agent killed now feeds the device once as it dies");
                        None
                    }
                });
                (file, held)
            }
        };
        let is_char_device = file.metadata().map(|m| m.file_type().is_char_device()).unwrap_or(false);
        let timeout = if is_char_device { set_timeout(&file, timeout) } else { timeout };
        tracing::info!(device = %path.display(), timeout_ms = timeout.as_millis() as u64, "watchdog armed");
        Ok(Device { path: path.into(), file, timeout, holder })
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn feed(&mut self) -> Result<(), WatchdogError> {
        // Any character but `V` feeds it and cancels an earlier magic character.
        self.file.write_all(b"k").map_err(|source| WatchdogError::Feed { path: self.path.clone(), source })
    }

    /// Disarms the device (magic close): only when no protected VM runs on the host. The
    /// holder leaves first, so that this agent's close is the last one.
    pub fn disarm(mut self) -> Result<(), WatchdogError> {
        self.file
            .write_all(b"V")
            .map_err(|source| WatchdogError::Feed { path: self.path.clone(), source })?;
        if let Some(h) = self.holder.take() {
            // SAFETY: kill(2) of the holder this agent started or took over.
            unsafe { libc::kill(h.pid, libc::SIGUSR1) };
            let _ = std::fs::remove_file(&h.pid_file);
        }
        tracing::info!(device = %self.path.display(), "watchdog disarmed");
        Ok(())
    }
}

fn spawn_holder(spec: &HolderSpec, file: &File) -> std::io::Result<i32> {
    use std::os::unix::process::CommandExt;
    let fd = file.as_raw_fd();
    let mut cmd = std::process::Command::new(&spec.exe);
    cmd.arg(HOLD_FLAG)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: between fork and exec only async-signal-safe calls: dup2 (which also clears
    // close-on-exec on the copy) and setsid, so the holder outlives the agent's session.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, HELD_FD) < 0 || libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    let pid = child.id() as i32;
    // Not waited for: it must outlive this process (it is reaped by whoever adopts it).
    std::mem::forget(child);
    std::fs::write(&spec.pid_file, format!("{pid}\n"))?;
    Ok(pid)
}

/// The device as an earlier agent's holder keeps it, if that holder still runs and holds
/// this very device (a holder of one that was replaced is sent away).
fn adopt(spec: &HolderSpec, path: &Path) -> Option<(File, i32)> {
    use std::os::fd::FromRawFd;
    let pid: i32 = std::fs::read_to_string(&spec.pid_file).ok()?.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    if !cmdline.split(|b| *b == 0).any(|a| a == HOLD_FLAG.as_bytes()) {
        return None;
    }
    // SAFETY: plain syscalls; the returned descriptors are checked and owned below.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0) as i32;
        if pidfd < 0 {
            return None;
        }
        let fd = libc::syscall(libc::SYS_pidfd_getfd, pidfd, HELD_FD, 0) as i32;
        libc::close(pidfd);
        if fd < 0 {
            tracing::warn!(holder = pid, error = %std::io::Error::last_os_error(), "cannot take the watchdog from its holder");
            return None;
        }
        let file = File::from_raw_fd(fd);
        let same = |a: &std::fs::Metadata, b: &std::fs::Metadata| a.dev() == b.dev() && a.ino() == b.ino();
        match (file.metadata(), std::fs::metadata(path)) {
            (Ok(held), Ok(now)) if same(&held, &now) => Some((file, pid)),
            _ => {
                tracing::warn!(holder = pid, "the watchdog holder keeps another device; sending it away");
                libc::kill(pid, libc::SIGUSR1);
                None
            }
        }
    }
}

/// The holder's life (`vmha-agent --hold-watchdog`): keep descriptor 3 open, do nothing.
pub fn hold() -> ! {
    // Never the OOM killer's choice: its death would feed the device once.
    let _ = std::fs::write("/proc/self/oom_score_adj", "-1000");
    // SAFETY: signal dispositions and a blocking pause(2); no Rust state is touched.
    unsafe {
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGPIPE] {
            libc::signal(sig, libc::SIG_IGN);
        }
        loop {
            libc::pause();
        }
    }
}

/// Sets the device's timeout in whole seconds (rounded down, so the host is reset no later
/// than the agent assumes) and returns what the device reports.
fn set_timeout(file: &File, want: Duration) -> Duration {
    let mut secs: libc::c_int = (want.as_secs().max(1)) as libc::c_int;
    // SAFETY: both ioctls take a pointer to one int, which lives across the call.
    let set = unsafe { libc::ioctl(file.as_raw_fd(), WDIOC_SETTIMEOUT as _, &mut secs) };
    let mut got: libc::c_int = 0;
    // SAFETY: as above.
    let read = unsafe { libc::ioctl(file.as_raw_fd(), WDIOC_GETTIMEOUT as _, &mut got) };
    if set != 0 || read != 0 || got <= 0 {
        tracing::warn!(wanted_s = secs, "the watchdog did not take or report a timeout; assuming {:?}", want);
        return want;
    }
    Duration::from_secs(got as u64)
}

/// What the heartbeat says about the watchdog.
pub fn status(configured: Option<&Path>, device: Option<&Device>, problem: Option<&str>) -> WatchdogStatus {
    WatchdogStatus {
        device: configured.map(|p| p.display().to_string()).unwrap_or_default(),
        armed: device.is_some() && problem.is_none(),
        timeout_ms: device.map_or(0, |d| d.timeout.as_millis() as u64),
        problem: problem.map(String::from).unwrap_or_else(|| match (configured, device) {
            (None, _) => "the agent runs with --no-watchdog".into(),
            (Some(_), None) => "not armed yet (the agent arms it with its first lease)".into(),
            _ => String::new(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A FIFO stands in for the device, as in the lab: what the agent writes is what a
    /// kernel driver would see.
    #[test]
    fn feeds_and_the_magic_close_reach_the_device_and_a_missing_reader_is_an_error() {
        let dir = std::env::temp_dir().join(format!("vmha-wd-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("watchdog");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = Device::open(&fifo, Duration::from_secs(3), None).err().expect("no reader yet");
        assert!(e.to_string().contains("--no-watchdog"), "{e}");
        let mut reader = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&fifo).unwrap();
        let mut dev = Device::open(&fifo, Duration::from_secs(3), None).unwrap();
        assert_eq!(dev.timeout(), Duration::from_secs(3), "a FIFO takes no ioctl: the configured timeout");
        dev.feed().unwrap();
        dev.feed().unwrap();
        dev.disarm().unwrap();
        let mut got = String::new();
        reader.read_to_string(&mut got).unwrap();
        assert_eq!(got, "kkV");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_status_says_why_it_is_not_armed() {
        assert!(!status(None, None, None).armed);
        assert!(status(None, None, None).problem.contains("--no-watchdog"));
        let s = status(Some(Path::new("/dev/watchdog")), None, Some("cannot open"));
        assert_eq!((s.armed, s.problem.as_str(), s.device.as_str()), (false, "cannot open", "/dev/watchdog"));
    }
}
