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
