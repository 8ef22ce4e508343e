//! `deploy/lab/deps` against a pretend Debian whose resolver misbehaves (issue 24): a fake
//! dpkg-query, apt-get and apt-cache (tests/fixtures/fake-apt) keep their state in a temp dir,
//! and PATH holds only them, the programs the fake "packages" install, and the few real tools
//! the script needs. So the script's own checks are what is tested, not this machine's packages.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const DEPS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/lab/deps");
const FAKE_APT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/fake-apt");

/// The `program:package` pairs the script checks, read from the script itself so that a
/// program added there is covered here too.
fn programs() -> BTreeMap<String, String> {
    let script = fs::read_to_string(DEPS).unwrap();
    let start = script.find("\nprograms=(").expect("deps declares programs=(");
    let body = &script[start + "\nprograms=(".len()..];
    let body = &body[..body.find("\n)").expect("programs=( ends")];
    let pairs: BTreeMap<String, String> = body
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(|l| l.split_whitespace())
        .map(|pair| {
            let (program, package) = pair.split_once(':').expect("program:package");
            (program.to_string(), package.to_string())
        })
        .collect();
    assert!(pairs.contains_key("qemu-img") && pairs.contains_key("virtlockd"), "{pairs:?}");
    pairs
}

struct FakeDebian {
    dir: tempfile::TempDir,
}

impl FakeDebian {
    fn new() -> FakeDebian {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for sub in ["installed", "bin", "tools"] {
            fs::create_dir(root.join(sub)).unwrap();
        }
        let provides: String =
            programs().iter().map(|(program, package)| format!("{package} {program}\n")).collect();
        fs::write(root.join("provides"), provides).unwrap();
        for name in ["apt-get", "apt-cache", "dpkg-query", "id"] {
            symlink(FAKE_APT, root.join("tools").join(name)).unwrap();
        }
        for tool in ["bash", "env", "grep", "awk", "sed", "head", "dpkg", "rm", "chmod"] {
            symlink(real(tool), root.join("tools").join(tool)).unwrap();
        }
        FakeDebian { dir }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn preinstall(&self, package: &str, version: &str) {
        fs::write(self.root().join("installed").join(package), version).unwrap();
        for (program, owner) in programs() {
            if owner == package {
                fs::write(self.root().join("bin").join(program), "").unwrap();
            }
        }
    }

    fn version(&self, package: &str) -> Option<String> {
        fs::read_to_string(self.root().join("installed").join(package)).ok()
    }

    fn has_program(&self, program: &str) -> bool {
        self.root().join("bin").join(program).exists()
    }

    fn deps(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let root = self.root();
        Command::new(root.join("tools/bash"))
            .arg(DEPS)
            .args(args)
            .env_clear()
            .env("PATH", format!("{}:{}", root.join("tools").display(), root.join("bin").display()))
            .env("FAKE_APT_DIR", root)
            .env("VMHA_PG_BIN_GLOB", root.join("bin"))
            .envs(env.iter().copied())
            .output()
            .unwrap()
    }
}

fn real(tool: &str) -> PathBuf {
    let out = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().unwrap();
    let path = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{tool} is not on this machine's PATH");
    PathBuf::from(path.trim())
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_package_from_a_newer_suite_that_breaks_the_rest_is_replaced_and_named() {
    let debian = FakeDebian::new();
    debian.preinstall("qemu-utils", "10.0~bpo12");
    let out = debian.deps(&[], &[("FAKE_APT_BREAKS", "qemu-utils")]);
    let err = stderr(&out);
    assert!(out.status.success(), "deps failed:\n{err}");
    assert!(
        err.contains("replacing qemu-utils 10.0~bpo12 with 7.2: qemu-utils : Breaks: qemu-system-common"),
        "deps must say which package it replaced and why:\n{err}"
    );
    assert_eq!(debian.version("qemu-utils").as_deref(), Some("7.2"));
    assert!(debian.has_program("qemu-img"), "qemu-img must be there after deps:\n{err}");
    for (program, package) in programs() {
        assert!(debian.version(&package).is_some(), "{package} not installed:\n{err}");
        assert!(debian.has_program(&program), "{program} missing:\n{err}");
    }
    let check = debian.deps(&["--check"], &[]);
    assert!(check.status.success(), "--check after deps:\n{}", stderr(&check));
}

#[test]
fn a_package_from_a_newer_suite_that_works_with_the_rest_is_kept() {
    let debian = FakeDebian::new();
    debian.preinstall("qemu-utils", "10.0~bpo12");
    let out = debian.deps(&[], &[]);
    let err = stderr(&out);
    assert!(out.status.success(), "deps failed:\n{err}");
    assert!(err.contains("keeping qemu-utils 10.0~bpo12"), "{err}");
    assert_eq!(debian.version("qemu-utils").as_deref(), Some("10.0~bpo12"));
    assert!(debian.has_program("qemu-img"));
}

#[test]
fn a_package_the_resolver_removes_behind_our_back_fails_deps_with_its_name() {
    let debian = FakeDebian::new();
    let out = debian.deps(&[], &[("FAKE_APT_SILENT_REMOVE", "bindfs")]);
    let err = stderr(&out);
    assert!(!out.status.success(), "deps must fail when apt left a package out:\n{err}");
    assert!(err.contains("package bindfs is not installed"), "{err}");
    assert!(err.contains("program bindfs is missing (package bindfs)"), "{err}");
    assert!(!err.contains("qemu-img is missing"), "only what is missing is named:\n{err}");
}

#[test]
fn the_check_names_a_missing_program_and_its_package_and_deps_reinstalls_it() {
    let debian = FakeDebian::new();
    let first = debian.deps(&[], &[]);
    assert!(first.status.success(), "{}", stderr(&first));
    fs::remove_file(debian.root().join("bin/qemu-img")).unwrap();

    let check = debian.deps(&["--check"], &[]);
    let err = stderr(&check);
    assert!(!check.status.success(), "--check must fail with qemu-img gone:\n{err}");
    assert!(err.contains("program qemu-img is missing (package qemu-utils)"), "{err}");
    assert!(err.contains("run deploy/lab/deps as root"), "{err}");

    let again = debian.deps(&[], &[]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(
        stderr(&again).contains("reinstalling (a program of theirs is missing): qemu-utils"),
        "{}",
        stderr(&again)
    );
    assert!(debian.has_program("qemu-img"), "deps must reinstall what a program is missing from");
}
