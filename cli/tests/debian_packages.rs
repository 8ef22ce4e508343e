//! The Debian packages (issue 15), as an operator gets them: `deploy/deb/build` makes
//! vmha-agent, vmha-controller and vmha; `dpkg -i` installs them on this machine; systemd
//! accepts the units, which are installed but not enabled; the binaries, man pages, completions,
//! conffiles and the controller's system user are where Debian puts them; `dpkg -r` takes the
//! files away and `dpkg --purge` the configuration. Needs root and dpkg, as CI has.

use std::path::Path;
use std::process::{Command, Output};

const PACKAGES: [&str; 3] = ["vmha-agent", "vmha-controller", "vmha"];

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program).args(args).output().unwrap_or_else(|e| panic!("run {program}: {e}"))
}

fn ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn installed(package: &str) -> bool {
    let out = run("dpkg-query", &["-W", "-f=${db:Status-Status}", package]);
    out.status.success() && !out.stdout.is_empty() && out.stdout != b"not-installed"
}

/// Purges what the test installed, also when an assertion fails half-way.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = run("dpkg", &[&["--purge"][..], &PACKAGES[..]].concat());
    }
}

#[test]
fn the_packages_install_verify_run_and_remove_cleanly() {
    assert_eq!(uid(), 0, "dpkg -i needs root: run this test as root (CI does)");
    for p in PACKAGES {
        assert!(
            !installed(p),
            "{p} is already installed on this machine: this test installs and removes the packages, so it \
             refuses to touch an install it did not make"
        );
    }
    let out = std::env::temp_dir().join(format!("vmha-deb-{}", std::process::id()));
    let build = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/deb/build");
    ok(build, &["--profile", "dev", "--out", out.to_str().unwrap()]);
    let mut debs: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .filter(|p| p.ends_with(".deb"))
        .collect();
    debs.sort();
    assert_eq!(debs.len(), 3, "one package each for the agent, the controller and the CLI: {debs:?}");

    let _purge = Purge;
    let args: Vec<&str> = std::iter::once("-i").chain(debs.iter().map(String::as_str)).collect();
    ok("dpkg", &args);
    for p in PACKAGES {
        assert!(installed(p), "{p} is installed");
    }

    // systemd accepts the units (their ExecStart binaries exist now); not enabled, not started.
    let units =
        ["/usr/lib/systemd/system/vmha-agent.service", "/usr/lib/systemd/system/vmha-controller.service"];
    let verify = run("systemd-analyze", &[&["verify"][..], &units[..]].concat());
    // It also loads the units ours are ordered after, and says what it dislikes in those: other
    // packages' units (freeradius.service's MemoryLimit=, installed for the lab's guests) are
    // not ours to judge.
    let stderr = String::from_utf8_lossy(&verify.stderr);
    let complaints: Vec<&str> = stderr.lines().filter(|l| l.contains("vmha")).collect();
    assert!(verify.status.success() && complaints.is_empty(), "systemd-analyze verify: {stderr}");
    for unit in ["vmha-agent.service", "vmha-controller.service"] {
        let wanted = Path::new("/etc/systemd/system/multi-user.target.wants").join(unit);
        assert!(!wanted.exists(), "{unit} is enabled by the install; it must wait until it is configured");
    }
    let unit = std::fs::read_to_string(units[1]).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/vmha-controller") && unit.contains("User=vmha"), "{unit}");
    // systemd's default soft limit (1024 files) is too few for a large cluster's connections.
    for path in units {
        let text = std::fs::read_to_string(path).unwrap();
        assert!(text.lines().any(|l| l == "LimitNOFILE=65536"), "{path} raises LimitNOFILE");
    }

    assert_eq!(
        ok("/usr/bin/vmha-agent", &["--version"]).trim(),
        concat!("vmha-agent ", env!("CARGO_PKG_VERSION"))
    );
    assert!(ok("/usr/bin/vmha-controller", &["--version"]).starts_with("vmha-controller "));
    assert!(ok("/usr/bin/vmha", &["--version"]).starts_with("vmha "));

    // The controller's system user, and its configuration readable by root only.
    assert!(ok("getent", &["passwd", "vmha"]).contains("/usr/sbin/nologin"));
    let env_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata("/etc/vmha/controller.env").unwrap().permissions(),
    );
    assert_eq!(env_mode & 0o777, 0o600, "controller.env holds the database password");
    let conffiles = ok("dpkg-query", &["-W", "-f=${Conffiles}\n", "vmha-agent", "vmha-controller"]);
    for file in ["/etc/vmha/agent.toml", "/etc/vmha/controller.env"] {
        assert!(conffiles.contains(file), "{file} is a conffile: {conffiles}");
    }

    for file in [
        "/usr/share/man/man8/vmha-agent.8.gz",
        "/usr/share/man/man8/vmha-controller.8.gz",
        "/usr/share/man/man1/vmha.1.gz",
        "/usr/share/man/man1/vmha-host-drain.1.gz",
        "/usr/share/bash-completion/completions/vmha",
        "/usr/share/zsh/vendor-completions/_vmha",
        "/usr/share/fish/vendor_completions.d/vmha.fish",
        "/usr/share/doc/vmha-agent/examples/libvirt-hook-qemu",
    ] {
        assert!(Path::new(file).exists(), "{file} is installed");
    }
    let page = ok("sh", &["-c", "zcat /usr/share/man/man8/vmha-agent.8.gz"]);
    assert!(
        page.contains(".TH vmha-agent 8") && page.contains("watchdog"),
        "the agent's man page: {page:.300}"
    );

    // Removed: the files go, the configuration stays until purged.
    ok("dpkg", &[&["-r"][..], &PACKAGES[..]].concat());
    for file in ["/usr/bin/vmha-agent", "/usr/bin/vmha-controller", "/usr/bin/vmha", units[0], units[1]] {
        assert!(!Path::new(file).exists(), "{file} is gone after dpkg -r");
    }
    assert!(Path::new("/etc/vmha/agent.toml").exists(), "dpkg -r keeps the configuration");
    ok("dpkg", &[&["--purge"][..], &PACKAGES[..]].concat());
    assert!(!Path::new("/etc/vmha").exists(), "dpkg --purge removes /etc/vmha");
    std::fs::remove_dir_all(&out).unwrap();
}

fn uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}
