//! Shell completions and man pages come from the parser's own definitions (issue 15): every
//! shell gets a script that knows the commands, bash's parses, and the man pages are written.

use std::process::Command;

fn vmha(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_vmha")).args(args).output().expect("run vmha");
    assert!(out.status.success(), "vmha {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn completions_are_generated_for_bash_zsh_and_fish() {
    for shell in ["bash", "zsh", "fish"] {
        let script = vmha(&["completions", shell]);
        for word in ["report", "drain", "confirm-down", "controller"] {
            assert!(script.contains(word), "the {shell} completion knows '{word}'");
        }
    }
    // bash reads the script without a syntax error.
    let dir = std::env::temp_dir().join(format!("vmha-completions-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("vmha.bash");
    std::fs::write(&file, vmha(&["completions", "bash"])).unwrap();
    let check = Command::new("bash").arg("-n").arg(&file).status().expect("run bash");
    assert!(check.success(), "bash -n {}", file.display());
    // An unknown shell is refused as bad usage.
    let out = Command::new(env!("CARGO_BIN_EXE_vmha")).args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn man_pages_are_written_for_the_command_and_its_subcommands() {
    let dir = std::env::temp_dir().join(format!("vmha-man-{}", std::process::id()));
    vmha(&["manpages", dir.to_str().unwrap()]);
    for page in ["vmha.1", "vmha-report.1", "vmha-host-drain.1"] {
        let text = std::fs::read_to_string(dir.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{page} is roff: {}",
            &text[..80.min(text.len())]
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
