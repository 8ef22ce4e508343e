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
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
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
}

impl Device {
    /// Opens (and so arms) the device, asking for `timeout`. A device that takes the ioctl is
    /// asked for whole seconds (rounded down) and the agent assumes what it reports; one that
    /// does not (the lab's FIFO) is taken to have `timeout`.
    pub fn open(path: &Path, timeout: Duration) -> Result<Device, WatchdogError> {
        let file = OpenOptions::new()
            .write(true)
            // A FIFO without its reader fails at once (ENXIO) instead of blocking the agent.
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|source| WatchdogError::Open { path: path.into(), source })?;
        let is_char_device = file.metadata().map(|m| m.file_type().is_char_device()).unwrap_or(false);
        let timeout = if is_char_device { set_timeout(&file, timeout) } else { timeout };
        tracing::info!(device = %path.display(), timeout_ms = timeout.as_millis() as u64, "watchdog armed");
        Ok(Device { path: path.into(), file, timeout })
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn feed(&mut self) -> Result<(), WatchdogError> {
        // Any character but `V` feeds it and cancels an earlier magic character.
        self.file.write_all(b"k").map_err(|source| WatchdogError::Feed { path: self.path.clone(), source })
    }

    /// Disarms the device (magic close): only when no protected VM runs on the host.
    pub fn disarm(mut self) -> Result<(), WatchdogError> {
        self.file
            .write_all(b"V")
            .map_err(|source| WatchdogError::Feed { path: self.path.clone(), source })?;
        tracing::info!(device = %self.path.display(), "watchdog disarmed");
        Ok(())
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
        let e = Device::open(&fifo, Duration::from_secs(3)).err().expect("no reader yet");
        assert!(e.to_string().contains("--no-watchdog"), "{e}");
        let mut reader = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&fifo).unwrap();
        let mut dev = Device::open(&fifo, Duration::from_secs(3)).unwrap();
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
