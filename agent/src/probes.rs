//! Health probes: what this host can measure about itself that the controller cannot see from
//! outside (libvirtd answering, memory, storage space, links, md RAID, load, operator checks).
//! Their latest results go with every heartbeat; the controller decides what they mean.
//!
//! The parsing and judging are pure functions over the text the kernel gives, so they are
//! tested on captured samples; the I/O around them stays thin.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt};
use vmha_proto::v1::ProbeResult;

use crate::bounded::{Blocking, Outcome};
use crate::hypervisor::Hypervisor;

/// An operator-defined check: `sh -c command`, healthy iff it exits 0.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Check {
    pub name: String,
    pub command: String,
}

/// What the probes check and their thresholds.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeConfig {
    pub interval: Duration,
    pub memory_min_mib: u64,
    /// No storage probe by default: only the operator knows where the VM disks live.
    pub storage_paths: Vec<PathBuf>,
    pub storage_min_free_percent: f64,
    pub nics: Vec<String>,
    pub load_max: f64,
    pub libvirt_timeout: Duration,
    pub check_timeout: Duration,
    pub checks: Vec<Check>,
}

// `Config` is compared in tests; the floats are validated finite, so equality is reflexive.
impl Eq for ProbeConfig {}

impl Default for ProbeConfig {
    fn default() -> ProbeConfig {
        ProbeConfig {
            interval: Duration::from_secs(5),
            memory_min_mib: 256,
            storage_paths: Vec::new(),
            storage_min_free_percent: 5.0,
            nics: Vec::new(),
            load_max: 4.0 * online_cpus() as f64,
            libvirt_timeout: Duration::from_secs(3),
            check_timeout: Duration::from_secs(10),
            checks: Vec::new(),
        }
    }
}

/// The load average counts runnable tasks on every CPU of the host, so the threshold scales
/// with all online CPUs; `available_parallelism` alone would shrink it to the agent's own
/// cgroup quota or affinity (e.g. a systemd CPUQuota=) and flag a busy-but-fine host.
fn online_cpus() -> usize {
    // SAFETY: sysconf only reads a system value.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if n > 0 { n as usize } else { std::thread::available_parallelism().map_or(1, |n| n.get()) }
}

fn result(name: impl Into<String>, ok: bool, detail: impl Into<String>) -> ProbeResult {
    ProbeResult { name: name.into(), ok, detail: detail.into() }
}

fn human(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(d)
}

// --- pure parsing and judging -------------------------------------------------------------

/// MemAvailable from /proc/meminfo, in KiB: the kernel's own estimate of what can be allocated
/// without swapping (MemFree ignores reclaimable page cache and would cry wolf).
pub fn parse_meminfo_available_kib(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| {
        let rest = l.strip_prefix("MemAvailable:")?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

pub fn judge_memory(meminfo: Result<String, String>, min_mib: u64) -> ProbeResult {
    let available = meminfo.and_then(|t| {
        parse_meminfo_available_kib(&t).ok_or_else(|| "no MemAvailable in /proc/meminfo".to_string())
    });
    match available {
        Ok(kib) => {
            let mib = kib / 1024;
            let ok = mib >= min_mib;
            result(
                "memory",
                ok,
                format!("MemAvailable {mib} MiB {} {min_mib} MiB", if ok { ">=" } else { "<" }),
            )
        }
        Err(e) => result("memory", false, e),
    }
}

/// The 1-minute load average from /proc/loadavg.
pub fn parse_loadavg_1m(loadavg: &str) -> Option<f64> {
    loadavg.split_whitespace().next()?.parse().ok().filter(|l: &f64| l.is_finite())
}

pub fn judge_load(loadavg: Result<String, String>, max: f64) -> ProbeResult {
    let load = loadavg.and_then(|t| {
        parse_loadavg_1m(&t).ok_or_else(|| format!("cannot parse /proc/loadavg: {:?}", t.trim()))
    });
    match load {
        Ok(l) => {
            let ok = l <= max;
            result("load", ok, format!("1-minute load {l:.2} {} {max}", if ok { "<=" } else { ">" }))
        }
        Err(e) => result("load", false, e),
    }
}

/// One md array as /proc/mdstat shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MdArray {
    pub name: String,
    pub active: bool,
    /// "raid1"; empty for an inactive array, which has no personality yet.
    pub level: String,
    /// The member map, e.g. "UU_"; None for levels without redundancy (raid0, linear).
    pub members: Option<String>,
}

impl MdArray {
    pub fn degraded(&self) -> bool {
        self.members.as_deref().is_some_and(|m| m.contains('_'))
    }
}

/// The arrays in /proc/mdstat. An array is a line "mdN : active|inactive ..." followed by
/// indented lines; the status line ends in "[n/m] [UU_]" for redundant levels.
pub fn parse_mdstat(mdstat: &str) -> Vec<MdArray> {
    let mut arrays: Vec<MdArray> = Vec::new();
    for line in mdstat.lines() {
        if let Some((name, rest)) = line.split_once(" : ")
            && !line.starts_with(char::is_whitespace)
            && name.starts_with("md")
        {
            let mut words = rest.split_whitespace();
            let active = words.next() == Some("active");
            // "active (auto-read-only) raid1 sda1[0] ..." : skip the parenthesised flags.
            let level = words
                .find(|w| !w.starts_with('('))
                .filter(|w| active && !w.contains('['))
                .unwrap_or_default()
                .to_string();
            arrays.push(MdArray { name: name.trim().into(), active, level, members: None });
        } else if line.starts_with(char::is_whitespace)
            && let Some(array) = arrays.last_mut()
            && array.members.is_none()
        {
            // "[UU_]": only U and _ inside; this also skips "[2/3]", "[==>...]" and "[0KB]".
            array.members = line
                .split_whitespace()
                .filter_map(|w| w.strip_prefix('[')?.strip_suffix(']'))
                .find(|m| !m.is_empty() && m.chars().all(|c| c == 'U' || c == '_'))
                .map(str::to_string);
        }
    }
    arrays
}

/// `None`: no /proc/mdstat (md not loaded), which means no arrays.
pub fn judge_mdstat(mdstat: Option<&str>) -> ProbeResult {
    let arrays = mdstat.map(parse_mdstat).unwrap_or_default();
    if arrays.is_empty() {
        return result("mdraid", true, "no md arrays");
    }
    let bad: Vec<String> = arrays
        .iter()
        .filter_map(|a| match (&a.members, a.active) {
            (_, false) => Some(format!("{} inactive", a.name)),
            (Some(m), _) if a.degraded() => Some(format!("{} {} degraded [{m}]", a.name, a.level)),
            _ => None,
        })
        .collect();
    if bad.is_empty() {
        let all: Vec<String> = arrays
            .iter()
            .map(|a| match &a.members {
                Some(m) => format!("{} {} [{m}]", a.name, a.level),
                None => format!("{} {}", a.name, a.level),
            })
            .collect();
        result("mdraid", true, all.join(", "))
    } else {
        result("mdraid", false, bad.join(", "))
    }
}

/// Space of one filesystem as statvfs reports it, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FsSpace {
    pub total: u64,
    /// Free to unprivileged users: QEMU usually does not run as root, so the root reserve is
    /// not space its disks can grow into.
    pub available: u64,
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

pub fn judge_storage(path: &Path, space: Result<FsSpace, String>, min_free_percent: f64) -> ProbeResult {
    let name = format!("storage:{}", path.display());
    match space {
        Ok(s) if s.total == 0 => result(name, false, "the filesystem reports no size (not a disk?)"),
        Ok(s) => {
            let free = s.available as f64 * 100.0 / s.total as f64;
            let ok = free >= min_free_percent;
            result(
                name,
                ok,
                format!(
                    "free {free:.1}% ({:.1} GiB of {:.1} GiB) {} {min_free_percent}%",
                    gib(s.available),
                    gib(s.total),
                    if ok { ">=" } else { "<" }
                ),
            )
        }
        Err(e) => result(name, false, e),
    }
}

/// What /sys/class/net says about one interface.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkState {
    /// None: no such interface.
    pub operstate: Option<String>,
    /// None: unreadable, as it is while the interface is administratively down.
    pub carrier: Option<String>,
}

/// Up when operstate says so, or when a driver that reports no operstate ("unknown", e.g.
/// some virtual NICs) has carrier.
pub fn judge_link(nic: &str, member_of: Option<&str>, s: &LinkState) -> ProbeResult {
    let name = format!("link:{nic}");
    let of = member_of.map(|b| format!(" (member of {b})")).unwrap_or_default();
    let Some(oper) = s.operstate.as_deref() else {
        return result(name, false, format!("no interface {nic}{of}"));
    };
    let carrier = s.carrier.as_deref();
    let ok = oper == "up" || carrier == Some("1");
    let detail = match carrier {
        Some(c) if oper != "up" => format!("operstate {oper}, carrier {c}{of}"),
        _ => format!("operstate {oper}{of}"),
    };
    result(name, ok, detail)
}

/// The first non-blank line of stdout, else of stderr, cut to a readable length.
pub fn first_line(stdout: &[u8], stderr: &[u8]) -> Option<String> {
    [stdout, stderr].into_iter().find_map(|out| {
        let text = String::from_utf8_lossy(out);
        let line = text.lines().map(str::trim).find(|l| !l.is_empty())?;
        const MAX: usize = 200;
        Some(match line.char_indices().nth(MAX) {
            Some((cut, _)) => format!("{}...", &line[..cut]),
            None => line.to_string(),
        })
    })
}

pub fn judge_check(name: &str, status: ExitStatus, stdout: &[u8], stderr: &[u8]) -> ProbeResult {
    let how = match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => format!("{status}"),
    };
    let detail = match first_line(stdout, stderr) {
        Some(line) => format!("{how}: {line}"),
        None => how,
    };
    result(format!("check:{name}"), status.success(), detail)
}

// --- I/O -------------------------------------------------------------------------------------

// /proc and /sys are answered by the kernel from memory: reading them on the async runtime
// cannot stall it the way a disk or network filesystem can.
fn read_proc(path: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))
}

fn statvfs(path: &Path) -> std::io::Result<FsSpace> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is NUL-terminated and `st` is a properly sized out-parameter.
    if unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    // The field types differ between targets (u32 on some 32-bit ones).
    #[allow(clippy::unnecessary_cast)]
    let (blocks, avail, frsize) = (st.f_blocks as u64, st.f_bavail as u64, st.f_frsize as u64);
    Ok(FsSpace { total: blocks.saturating_mul(frsize), available: avail.saturating_mul(frsize) })
}

/// The link probe's results: the interface and, for a bond, each member, so that a bond still
/// up on one leg is seen as the lost redundancy it is.
pub fn link_results(sys_class_net: &Path, nic: &str) -> Vec<ProbeResult> {
    let read = |nic: &str, file: &str| {
        std::fs::read_to_string(sys_class_net.join(nic).join(file)).ok().map(|s| s.trim().to_string())
    };
    let state = |nic: &str| LinkState { operstate: read(nic, "operstate"), carrier: read(nic, "carrier") };
    let mut out = vec![judge_link(nic, None, &state(nic))];
    if let Some(members) = read(nic, "bonding/slaves") {
        for m in members.split_whitespace() {
            out.push(judge_link(m, Some(nic), &state(m)));
        }
    }
    out
}

/// Reads a pipe to its end, keeping the first `cap` bytes: a chatty check must neither grow
/// the agent without bound nor block on a full pipe.
async fn read_capped(mut r: impl AsyncRead + Unpin, keep: &mut Vec<u8>, cap: usize) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let room = cap.saturating_sub(keep.len());
        keep.extend_from_slice(&buf[..n.min(room)]);
    }
}

/// Runs one operator check. The shell gets its own process group so that a timeout kills
/// everything it started, not only `sh`, and nothing it left behind keeps its pipes open.
pub async fn run_check(check: &Check, timeout: Duration) -> ProbeResult {
    let name = format!("check:{}", check.name);
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(&check.command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return result(name, false, format!("cannot start sh: {e}")),
    };
    let pgid = child.id();
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let (mut out, mut err) = (Vec::new(), Vec::new());
    const CAP: usize = 64 << 10;
    let outcome = tokio::time::timeout(timeout, async {
        let (status, (), ()) = tokio::join!(
            child.wait(),
            async {
                if let Some(s) = stdout {
                    read_capped(s, &mut out, CAP).await
                }
            },
            async {
                if let Some(s) = stderr {
                    read_capped(s, &mut err, CAP).await
                }
            },
        );
        status
    })
    .await;
    match outcome {
        Ok(Ok(status)) => judge_check(&check.name, status, &out, &err),
        Ok(Err(e)) => result(name, false, format!("cannot wait for sh: {e}")),
        Err(_) => {
            // Still running here means sh is unreaped or something of its group holds its
            // pipes open: either way the group id is still this check's, not a reused one.
            if let Some(pgid) = pgid.and_then(|p| i32::try_from(p).ok()) {
                // SAFETY: kill has no memory effects.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
            }
            let _ = child.wait().await;
            result(name, false, format!("timed out after {}; killed", human(timeout)))
        }
    }
}

/// How long statvfs may take: a local filesystem answers at once; one that does not is hung.
const STATVFS_TIMEOUT: Duration = Duration::from_secs(3);

/// One probe and what it keeps between rounds.
enum Probe {
    Libvirtd(Blocking<Result<(), String>>),
    Memory,
    Storage(PathBuf, Blocking<std::io::Result<FsSpace>>),
    Link(String),
    MdRaid,
    Load,
    Check(Check),
}

fn probe_list(cfg: &ProbeConfig) -> Vec<Probe> {
    let mut list = vec![Probe::Libvirtd(Blocking::new()), Probe::Memory];
    list.extend(cfg.storage_paths.iter().map(|p| Probe::Storage(p.clone(), Blocking::new())));
    list.extend(cfg.nics.iter().cloned().map(Probe::Link));
    list.extend([Probe::MdRaid, Probe::Load]);
    list.extend(cfg.checks.iter().cloned().map(Probe::Check));
    list
}

impl Probe {
    async fn run(&mut self, cfg: &ProbeConfig, hv: &Arc<dyn Hypervisor>) -> Vec<ProbeResult> {
        let one = match self {
            Probe::Libvirtd(b) => {
                let hv = hv.clone();
                let t = cfg.libvirt_timeout;
                let started = Instant::now();
                match b.call(t, move || hv.host_facts().map(|_| ()).map_err(|e| e.to_string())).await {
                    Outcome::Done(Ok(())) => result(
                        "libvirtd",
                        true,
                        format!(
                            "host_facts answered in {} ms (timeout {})",
                            started.elapsed().as_millis(),
                            human(t)
                        ),
                    ),
                    Outcome::Done(Err(e)) => result("libvirtd", false, format!("host_facts failed: {e}")),
                    Outcome::Hung(d) => result(
                        "libvirtd",
                        false,
                        format!("host_facts has not answered for {} (timeout {})", human(secs(d)), human(t)),
                    ),
                    Outcome::Panicked(e) => result("libvirtd", false, format!("host_facts panicked: {e}")),
                }
            }
            Probe::Storage(path, b) => {
                let p = path.clone();
                let space = match b.call(STATVFS_TIMEOUT, move || statvfs(&p)).await {
                    Outcome::Done(r) => r.map_err(|e| format!("statvfs failed: {e}")),
                    Outcome::Hung(d) => Err(format!(
                        "statvfs has not answered for {} (timeout {}): is the filesystem hung?",
                        human(secs(d)),
                        human(STATVFS_TIMEOUT)
                    )),
                    Outcome::Panicked(e) => Err(format!("statvfs panicked: {e}")),
                };
                judge_storage(path, space, cfg.storage_min_free_percent)
            }
            Probe::Memory => judge_memory(read_proc("/proc/meminfo"), cfg.memory_min_mib),
            Probe::Link(nic) => return link_results(Path::new("/sys/class/net"), nic),
            Probe::MdRaid => match std::fs::read_to_string("/proc/mdstat") {
                Ok(t) => judge_mdstat(Some(&t)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => judge_mdstat(None),
                Err(e) => result("mdraid", false, format!("cannot read /proc/mdstat: {e}")),
            },
            Probe::Load => judge_load(read_proc("/proc/loadavg"), cfg.load_max),
            Probe::Check(c) => run_check(c, cfg.check_timeout).await,
        };
        vec![one]
    }
}

/// Whole seconds read better in a detail than "3s 2ms 871us 12ns".
fn secs(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

/// The latest results, one slot per probe in configuration order, shared with the session.
#[derive(Default)]
pub struct ProbeBoard {
    slots: Mutex<Vec<Vec<ProbeResult>>>,
}

impl ProbeBoard {
    fn slots(&self) -> std::sync::MutexGuard<'_, Vec<Vec<ProbeResult>>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Also logs each change of a probe's verdict (not every failing round: the log would
    /// drown in a probe that fails for hours).
    fn publish(&self, slot: usize, results: Vec<ProbeResult>) {
        let before = {
            let mut slots = self.slots();
            if slots.len() <= slot {
                slots.resize(slot + 1, Vec::new());
            }
            std::mem::replace(&mut slots[slot], results.clone())
        };
        for r in &results {
            crate::metrics::METRICS.probe(&r.name, r.ok);
            match (before.iter().find(|b| b.name == r.name).map(|b| b.ok), r.ok) {
                (Some(true) | None, false) => {
                    tracing::warn!(probe = %r.name, detail = %r.detail, "probe failing")
                }
                (Some(false), true) => tracing::info!(probe = %r.name, detail = %r.detail, "probe ok again"),
                _ => {}
            }
        }
    }

    /// Every probe that has finished at least once; a probe still in its first round is
    /// missing rather than reported with a guess. A name seen twice (a NIC configured on its
    /// own and also a bond member) is reported once.
    pub fn latest(&self) -> Vec<ProbeResult> {
        let slots = self.slots();
        let mut out: Vec<ProbeResult> = Vec::new();
        for r in slots.iter().flatten() {
            if !out.iter().any(|o| o.name == r.name) {
                out.push(r.clone());
            }
        }
        out
    }
}

/// Runs every probe forever, each on its own schedule of `cfg.interval`: a slow check delays
/// only its own next run, never the others' results. The first round starts at once, so the
/// quick probes are on the board before the first heartbeat goes out.
pub async fn run(cfg: ProbeConfig, hv: Arc<dyn Hypervisor>, board: Arc<ProbeBoard>) {
    let cfg = Arc::new(cfg);
    let mut tasks = tokio::task::JoinSet::new();
    for (slot, probe) in probe_list(&cfg).into_iter().enumerate() {
        let (cfg, hv, board) = (cfg.clone(), hv.clone(), board.clone());
        tasks.spawn(async move {
            let mut probe = probe;
            let mut tick = tokio::time::interval(cfg.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let results = probe.run(&cfg, &hv).await;
                board.publish(slot, results);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    const MDSTAT_HEALTHY: &str = "\
Personalities : [raid1] [raid0] [linear] [multipath] [raid6] [raid5] [raid4] [raid10]
md1 : active raid1 sdb2[1] sda2[0]
      976117824 blocks super 1.2 [2/2] [UU]
      bitmap: 2/8 pages [8KB], 65536KB chunk

md0 : active (auto-read-only) raid0 sdc1[1] sdd1[0]
      2096128 blocks super 1.2 512k chunks

unused devices: <none>
";

    const MDSTAT_DEGRADED: &str = "\
Personalities : [raid1]
md0 : active raid1 sdb1[1](F) sda1[0]
      1048512 blocks super 1.2 [2/1] [U_]
      [===>.................]  recovery = 17.1% (179584/1048512) finish=0.5min speed=29930K/sec

unused devices: <none>
";

    const MDSTAT_INACTIVE: &str = "\
Personalities :
md127 : inactive sdc[0](S)
      1048576 blocks super 1.2

unused devices: <none>
";

    #[test]
    fn mdstat_healthy_arrays_are_ok() {
        let arrays = parse_mdstat(MDSTAT_HEALTHY);
        assert_eq!(
            arrays,
            [
                MdArray {
                    name: "md1".into(),
                    active: true,
                    level: "raid1".into(),
                    members: Some("UU".into())
                },
                MdArray { name: "md0".into(), active: true, level: "raid0".into(), members: None },
            ]
        );
        let r = judge_mdstat(Some(MDSTAT_HEALTHY));
        assert!(r.ok, "{r:?}");
        assert_eq!(r.detail, "md1 raid1 [UU], md0 raid0");
    }

    #[test]
    fn mdstat_degraded_array_fails() {
        let r = judge_mdstat(Some(MDSTAT_DEGRADED));
        assert!(!r.ok);
        assert_eq!(r.detail, "md0 raid1 degraded [U_]");
    }

    #[test]
    fn mdstat_inactive_array_fails() {
        let r = judge_mdstat(Some(MDSTAT_INACTIVE));
        assert!(!r.ok);
        assert_eq!(r.detail, "md127 inactive");
    }

    #[test]
    fn mdstat_without_arrays_is_ok() {
        for text in [None, Some("Personalities :\nunused devices: <none>\n")] {
            let r = judge_mdstat(text);
            assert!(r.ok);
            assert_eq!(r.detail, "no md arrays");
        }
    }

    #[test]
    fn meminfo_gives_mem_available() {
        let text = "MemTotal:       16318480 kB\nMemFree:          211228 kB\nMemAvailable:     831488 kB\n";
        assert_eq!(parse_meminfo_available_kib(text), Some(831_488));
        let r = judge_memory(Ok(text.into()), 256);
        assert!(r.ok);
        assert_eq!(r.detail, "MemAvailable 812 MiB >= 256 MiB");
        let r = judge_memory(Ok(text.into()), 1024);
        assert!(!r.ok);
        assert_eq!(r.detail, "MemAvailable 812 MiB < 1024 MiB");
        let r = judge_memory(Ok("MemTotal: 1 kB\n".into()), 1);
        assert!(!r.ok && r.detail.contains("no MemAvailable"), "{r:?}");
    }

    #[test]
    fn loadavg_gives_the_one_minute_load() {
        assert_eq!(parse_loadavg_1m("0.52 0.58 0.59 1/467 12345\n"), Some(0.52));
        assert_eq!(parse_loadavg_1m(""), None);
        let r = judge_load(Ok("17.25 3.00 1.00 9/467 1\n".into()), 16.0);
        assert!(!r.ok);
        assert_eq!(r.detail, "1-minute load 17.25 > 16");
        assert!(judge_load(Ok("16.00 0 0 1/1 1".into()), 16.0).ok);
    }

    #[test]
    fn storage_compares_free_percent() {
        let p = Path::new("/var/lib/libvirt/images");
        let r = judge_storage(p, Ok(FsSpace { total: 100 << 30, available: 3 << 30 }), 5.0);
        assert_eq!(r.name, "storage:/var/lib/libvirt/images");
        assert!(!r.ok);
        assert_eq!(r.detail, "free 3.0% (3.0 GiB of 100.0 GiB) < 5%");
        assert!(judge_storage(p, Ok(FsSpace { total: 100, available: 5 }), 5.0).ok);
        let here = statvfs(Path::new("/")).unwrap();
        assert!(here.total > 0 && here.available <= here.total);
        assert!(statvfs(Path::new("/no/such/dir")).is_err());
    }

    #[test]
    fn links_and_bond_members() {
        let dir = std::env::temp_dir().join(format!("vmha-probe-net-{}", std::process::id()));
        let put = |p: &str, v: &str| {
            let p = dir.join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, v).unwrap();
        };
        put("bond0/operstate", "up\n");
        put("bond0/carrier", "1\n");
        put("bond0/bonding/slaves", "eth0 eth1\n");
        put("eth0/operstate", "up\n");
        put("eth1/operstate", "down\n");
        put("eth1/carrier", "0\n");
        put("tun0/operstate", "unknown\n");
        put("tun0/carrier", "1\n");
        let r = link_results(&dir, "bond0");
        let got: Vec<(&str, bool, &str)> = r.iter().map(|r| (&*r.name, r.ok, &*r.detail)).collect();
        assert_eq!(
            got,
            [
                ("link:bond0", true, "operstate up"),
                ("link:eth0", true, "operstate up (member of bond0)"),
                ("link:eth1", false, "operstate down, carrier 0 (member of bond0)"),
            ]
        );
        assert!(link_results(&dir, "tun0")[0].ok);
        let missing = link_results(&dir, "eth9");
        assert_eq!((missing[0].ok, &*missing[0].detail), (false, "no interface eth9"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn check(command: &str) -> Check {
        Check { name: "t".into(), command: command.into() }
    }

    #[tokio::test]
    async fn check_exit_0_is_ok() {
        let r = run_check(&check("echo fine"), Duration::from_secs(5)).await;
        assert_eq!((r.name.as_str(), r.ok, r.detail.as_str()), ("check:t", true, "exit 0: fine"));
    }

    #[tokio::test]
    async fn check_exit_3_fails_with_its_first_line() {
        let r =
            run_check(&check("echo; echo '  disk gone  '; echo more; exit 3"), Duration::from_secs(5)).await;
        assert_eq!((r.ok, r.detail.as_str()), (false, "exit 3: disk gone"));
        let r = run_check(&check("echo oops >&2; exit 1"), Duration::from_secs(5)).await;
        assert_eq!((r.ok, r.detail.as_str()), (false, "exit 1: oops"));
        let r = run_check(&check("exit 2"), Duration::from_secs(5)).await;
        assert_eq!(r.detail, "exit 2");
    }

    #[tokio::test]
    async fn check_is_killed_on_timeout_with_what_it_started() {
        let dir = std::env::temp_dir().join(format!("vmha-probe-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pidfile = dir.join("pid");
        // A background child holding the pipe open and a foreground one: both must die.
        let cmd = format!("sleep 30 & echo $! > {}; sleep 30", pidfile.display());
        let started = Instant::now();
        let r = run_check(&check(&cmd), Duration::from_millis(300)).await;
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        assert_eq!((r.ok, r.detail.as_str()), (false, "timed out after 300ms; killed"));
        let pid = std::fs::read_to_string(&pidfile).unwrap().trim().to_string();
        let deadline = Instant::now() + Duration::from_secs(5);
        // Dead: gone, or a zombie waiting for init to reap it.
        while std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.rsplit(')').next().unwrap().split_whitespace().next() != Some("Z"))
        {
            assert!(Instant::now() < deadline, "background child {pid} survived the timeout");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn first_line_is_cut_and_falls_back_to_stderr() {
        assert_eq!(first_line(b"\n \n", b"err\n"), Some("err".into()));
        assert_eq!(first_line(b"", b""), None);
        let long = "x".repeat(300);
        assert_eq!(first_line(long.as_bytes(), b"").unwrap().len(), 203);
    }

    #[tokio::test]
    async fn a_hung_libvirtd_holds_one_thread_and_reports_how_long() {
        let mut b: Blocking<()> = Blocking::new();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let t = Duration::from_millis(50);
        assert!(matches!(b.call(t, move || rx.recv().unwrap()).await, Outcome::Hung(_)));
        // Still stuck: no second call is started.
        let started_again = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = started_again.clone();
        let again = b.call(t, move || flag.store(true, std::sync::atomic::Ordering::SeqCst)).await;
        assert!(matches!(again, Outcome::Hung(d) if d >= t));
        assert!(!started_again.load(std::sync::atomic::Ordering::SeqCst));
        tx.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(matches!(b.call(t, || ()).await, Outcome::Done(())));
    }

    #[tokio::test]
    async fn the_board_fills_from_a_first_round() {
        let cfg = ProbeConfig {
            interval: Duration::from_millis(100),
            checks: vec![Check { name: "flag".into(), command: "exit 1".into() }],
            ..ProbeConfig::default()
        };
        let board = Arc::new(ProbeBoard::default());
        let hv: Arc<dyn Hypervisor> = Arc::new(crate::hypervisor::fake::FakeHypervisor::default());
        let runner = tokio::spawn(run(cfg, hv, board.clone()));
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let names: Vec<String> = board.latest().into_iter().map(|r| r.name).collect();
            if names == ["libvirtd", "memory", "mdraid", "load", "check:flag"] {
                break;
            }
            assert!(Instant::now() < deadline, "board after 5s: {names:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let latest = board.latest();
        assert!(latest[0].ok, "{:?}", latest[0]);
        assert_eq!((latest[4].ok, latest[4].detail.as_str()), (false, "exit 1"));
        runner.abort();
    }
}
