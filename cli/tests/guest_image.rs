//! The lab's bootable guest (`deploy/lab/guest-image`), booted for real by
//! `deploy/lab/guest-image-test`: two boots in QEMU, each answering DNS from outside its own
//! network namespace and its guest agent, respawning both services, and powering off once by
//! the agent and once by ACPI. Needs root (a netns, a tap); leaves the lab alone. The image is
//! built under cargo's target/tmp, not in the lab's directory.

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
}
