//! What deploy/ ships: the systemd units verify, and say what the hardening promises.

use std::process::Command;

#[test]
fn systemd_units_verify_and_are_hardened() {
    let available = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok();
    assert!(
        available,
        "systemd-analyze not found: `apt-get install systemd` (scripts/test does it)"
    );
    let dir = tempfile::tempdir().unwrap();
    for (unit, binary) in [
        ("diode-send.service", env!("CARGO_BIN_EXE_diode-send")),
        ("diode-recv.service", env!("CARGO_BIN_EXE_diode-recv")),
    ] {
        let text = std::fs::read_to_string(format!(
            "{}/deploy/systemd/{unit}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        for directive in [
            "User=diode",
            "ProtectSystem=strict",
            "NoNewPrivileges=yes",
            "PrivateTmp=yes",
            "CapabilityBoundingSet=\n",
            "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
            "MemoryMax=",
        ] {
            assert!(text.contains(directive), "{unit} lacks {directive:?}");
        }
        // Verify with ExecStart pointing at the binaries just built.
        let name = unit.trim_end_matches(".service");
        let local = text.replace(&format!("/usr/local/bin/{name}"), binary);
        let path = dir.path().join(unit);
        std::fs::write(&path, local).unwrap();
        let output = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            output.status.success() && output.stderr.is_empty(),
            "{unit}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// The configuration examples in the README are what a new user copies first: each must pass
/// `check` as written.
#[test]
fn the_readme_config_examples_pass_check() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let blocks: Vec<&str> = readme
        .split("```toml\n")
        .skip(1)
        .filter_map(|rest| rest.split("```").next())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("topics.d")).unwrap();
    let mut checked = 0;
    for block in blocks {
        let binary = if block.contains("destination =") {
            env!("CARGO_BIN_EXE_diode-send")
        } else if block.contains("[[route]]") {
            env!("CARGO_BIN_EXE_diode-recv")
        } else {
            continue;
        };
        let path = dir.path().join(format!("example-{checked}.toml"));
        std::fs::write(&path, block).unwrap();
        let output = Command::new(binary)
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "README example fails check:\n{block}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        checked += 1;
    }
    assert_eq!(checked, 2, "the README's sender and receiver examples");
}
