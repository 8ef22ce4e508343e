//! The watchdog stays open when the agent dies: a killed agent must not close the device,
//! because the kernel feeds a watchdog once when it is closed without the magic character, and
//! that would postpone the host's reset. A FIFO stands in for the device (as in the lab): its
//! reader sees every byte written, and an end of file only when the last writer is gone.

use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use vmha_agent::watchdog::{Device, HolderSpec};

fn wait_readable(reader: &std::fs::File, ms: i32) -> (bool, bool) {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd { fd: reader.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, ms) };
    (p.revents & libc::POLLIN != 0, p.revents & libc::POLLHUP != 0)
}

#[test]
fn the_device_outlives_the_agent_and_the_next_agent_takes_it_over() {
    let dir = std::env::temp_dir().join(format!("vmha-holder-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("watchdog");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let mut reader = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&fifo).unwrap();
    let spec = HolderSpec { exe: env!("CARGO_BIN_EXE_vmha-agent").into(), pid_file: dir.join("holder.pid") };

    let mut first = Device::open(&fifo, Duration::from_secs(3), Some(&spec)).unwrap();
    first.feed().unwrap();
    // The agent dies: its descriptor closes without the magic character.
    drop(first);
    std::thread::sleep(Duration::from_millis(200));
    let mut got = [0u8; 16];
    let n = reader.read(&mut got).unwrap();
    assert_eq!(&got[..n], b"k");
    assert_eq!(
        wait_readable(&reader, 300),
        (false, false),
        "the holder keeps it open: no close reached the device"
    );

    // The next agent takes the same open device from the holder and feeds it.
    let mut second = Device::open(&fifo, Duration::from_secs(3), Some(&spec)).unwrap();
    second.feed().unwrap();
    assert!(wait_readable(&reader, 1_000).0);
    let n = reader.read(&mut got).unwrap();
    assert_eq!(&got[..n], b"k");

    // A disarm: the magic character, then the last close (the holder left first).
    second.disarm().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"V");
    assert!(wait_readable(&reader, 100).1, "closed by everyone once disarmed");
    assert!(!spec.pid_file.exists());
    std::fs::remove_dir_all(dir).unwrap();
}
