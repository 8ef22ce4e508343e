//! The lab's bootable guest (`deploy/lab/guest-image`), booted for real by
//! `deploy/lab/guest-image-test`: two boots in QEMU, each answering DNS from outside its own
//! network namespace and its guest agent, respawning both services, and powering off once by
//! the agent and once by ACPI, FreeRADIUS answering `radclient`. Needs root (a netns, a tap);
//! leaves the lab alone. The image is built under cargo's target/tmp, not in the lab's
//! directory; then built again: nothing happens while its inputs are unchanged, and a changed
//! input (a package's version) rebuilds it, identical.

use std::path::Path;
use std::process::Command;

#[test]
fn the_guest_image_boots_and_serves_dns_and_its_agent() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let image = Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-image");
    let out = Command::new(repo.join("deploy/lab/guest-image-test"))
        .arg("2")
        .env("VMHA_GUEST_IMAGE_DIR", &image)
        .output()
        .expect("run deploy/lab/guest-image-test");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "deploy/lab/guest-image-test failed:\n{stderr}");
    // Its summary line, for `cargo test -- --nocapture`.
    eprintln!("{}", stderr.lines().last().unwrap_or_default());
    assert!(stderr.contains("booted and serving DNS in"), "{stderr}");
    assert!(stderr.contains("FreeRADIUS accepts lab/lab and rejects a wrong password"), "{stderr}");

    let build = || {
        let out = Command::new(repo.join("deploy/lab/guest-image")).arg(&image).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "deploy/lab/guest-image failed:\n{stderr}");
        stderr
    };
    let modified = |f: &str| std::fs::metadata(image.join(f)).unwrap().modified().unwrap();
    let initrd = std::fs::read(image.join("initrd.img")).unwrap();
    let stamp = std::fs::read_to_string(image.join("stamp")).unwrap();
    let before = (modified("initrd.img"), modified("vmlinuz"), modified("stamp"));
    let said = build();
    assert_eq!(said, "", "a build with nothing changed says nothing");
    assert_eq!(
        (modified("initrd.img"), modified("vmlinuz"), modified("stamp")),
        before,
        "and writes nothing"
    );

    // As if dnsmasq had been upgraded since: the stamp names another version.
    let line =
        stamp.lines().find(|l| l.starts_with("package dnsmasq-base ")).expect("the stamp names dnsmasq");
    std::fs::write(image.join("stamp"), stamp.replace(line, &format!("{line}~older"))).unwrap();
    let said = build();
    assert!(said.contains("guest-image: built"), "a changed input rebuilds: {said}");
    assert_ne!(modified("initrd.img"), before.0, "initrd.img written again");
    assert_eq!(
        std::fs::read_to_string(image.join("stamp")).unwrap(),
        stamp,
        "the stamp names today's inputs"
    );
    assert!(
        std::fs::read(image.join("initrd.img")).unwrap() == initrd,
        "the same inputs give the same initrd.img"
    );
}
