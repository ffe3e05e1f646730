//! What deploy/ ships and the README shows: configs that pass `check`, systemd units that verify
//! and say what the hardening promises.

use std::path::Path;
use std::process::Command;

const SEND: &str = env!("CARGO_BIN_EXE_diode-send");
const RECV: &str = env!("CARGO_BIN_EXE_diode-recv");

/// `binary check --config path` succeeds.
fn assert_check_passes(binary: &str, path: &Path, what: &str) {
    let output = Command::new(binary)
        .args(["check", "--config"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{what} fails check: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Each example, in a copy of `deploy/` with the link key its first step makes (`keygen`), the
/// OPC UA client certificate (`opcua-cert`), and
/// the plant examples' `/etc/diode` and `/var/lib/diode` moved into the copy.
#[test]
fn every_config_under_deploy_loads_and_checks() {
    let mut checked = 0;
    let copy = tempfile::tempdir().unwrap();
    let status = Command::new(SEND)
        .args(["keygen", "--out"])
        .arg(copy.path().join("link.key"))
        .status()
        .unwrap();
    assert!(status.success());
    // The OPC UA source's client certificate and login, made as the example's comment says.
    let status = Command::new(SEND)
        .args(["opcua-cert", "--pki-dir"])
        .arg(copy.path().join("opcua-pki"))
        .status()
        .unwrap();
    assert!(status.success());
    let key = copy.path().join("opcua-pki/private/private.pem");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let password = copy.path().join("opcua.pass");
    std::fs::write(&password, "plant-password\n").unwrap();
    std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o600)).unwrap();
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy")).unwrap() {
        let original = entry.unwrap().path();
        let name = original.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with(".toml") {
            continue;
        }
        let root = copy.path().display().to_string();
        let text = std::fs::read_to_string(&original)
            .unwrap()
            .replace("/etc/diode/", &format!("{root}/"))
            .replace("/var/lib/diode/", &format!("{root}/var/"));
        let path = copy.path().join(&name);
        std::fs::write(&path, text).unwrap();
        let binary = if name.starts_with("sender") {
            diode_sender::config::load(&path).unwrap_or_else(|e| panic!("{e}"));
            SEND
        } else if name.starts_with("receiver") {
            diode_receiver::config::load(&path).unwrap_or_else(|e| panic!("{e}"));
            RECV
        } else {
            panic!("{name}: deploy configs are named sender*.toml or receiver*.toml");
        };
        assert_check_passes(binary, &path, &name);
        checked += 1;
    }
    assert!(checked >= 2);
}

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
    for (unit, binary) in [("diode-send.service", SEND), ("diode-recv.service", RECV)] {
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
/// `check` as written, alone in an empty directory.
#[test]
fn the_readme_config_examples_pass_check() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let blocks: Vec<&str> = readme
        .split("```toml\n")
        .skip(1)
        .filter_map(|rest| rest.split("```").next())
        .collect();
    let mut checked = 0;
    for block in blocks {
        let binary = if block.contains("destination =") {
            SEND
        } else if block.contains("[[route]]") {
            RECV
        } else {
            continue;
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format!("example-{checked}.toml"));
        std::fs::write(&path, block).unwrap();
        assert_check_passes(binary, &path, &format!("README example:\n{block}\n"));
        checked += 1;
    }
    assert_eq!(checked, 2, "the README's sender and receiver examples");
}
