//! OPC UA across the diode, between independent implementations: asyncua's server as the plant
//! (tests/peers/opcua_plant.py), our sender subscribing to it, our receiver's read-only mirror,
//! and asyncua's client browsing, reading and trying to write the mirror
//! (tests/peers/opcua_client.py).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::peers::{opcua_client, opcua_client_with, test_python, PlantServer};
use common::{free_port, read_jsonl, wait_for, Pair};
use diode_gateway::relay::RelayConfig;
use serde_json::Value;

/// What the plant's and the mirror's dumps are compared on, keyed by path under Line3.
fn by_path(dump: &Value) -> BTreeMap<String, Value> {
    dump["nodes"]
        .as_array()
        .map(|nodes| {
            nodes
                .iter()
                .map(|n| {
                    let mut n = n.clone();
                    // Node ids differ on purpose (the mirror's own namespace).
                    n.as_object_mut().unwrap().remove("node_id");
                    (n["path"].as_str().unwrap().to_owned(), n)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The client's `wait-path` found the path on the mirror; if not, both services' logs say why.
fn assert_found(pair: &Pair, found: &Value) {
    assert_eq!(
        found["found"],
        true,
        "{found}\nsender:\n{}\nreceiver:\n{}",
        pair.sender.log_text(),
        pair.receiver.log_text()
    );
}

/// Services that change a server's state: none of them may ever reach the plant.
const WRITE_SERVICES: &[&str] = &[
    "WriteRequest",
    "CallRequest",
    "AddNodesRequest",
    "DeleteNodesRequest",
    "AddReferencesRequest",
    "DeleteReferencesRequest",
    "HistoryUpdateRequest",
    "RegisterServerRequest",
    "RegisterServer2Request",
];

#[test]
fn plant_values_types_timestamps_and_status_mirror_read_only() {
    let _ = test_python();
    let plant_port = free_port();
    let mut plant = PlantServer::start(plant_port);
    let mirror_port = free_port();
    let mirror = format!("opc.tcp://127.0.0.1:{mirror_port}/");
    let topics = format!(
        r#"[[topic]]
name = "plant"
source = {{ kind = "opcua", endpoint = "{}", sampling_interval_ms = 100, publishing_interval_ms = 100, rebrowse_interval_ms = 10000, status_interval_ms = 1000, browse = [{{ include = ["Line3/**"] }}] }}
"#,
        plant.endpoint
    );
    let routes = format!(
        r#"[[route]]
topics = ["plant"]
sink = {{ kind = "file", path = "out.jsonl" }}

[[route]]
topics = ["plant"]
sink = {{ kind = "opcua_server", listen = "127.0.0.1:{mirror_port}", pki_dir = "mirror-pki", allow_unsecured = true }}
"#
    );
    let pair = Pair::start(RelayConfig::default(), &topics, &routes);
    assert_found(
        &pair,
        &opcua_client(&mirror, &["wait-path", "plant/Line3/Cell1", "30"]),
    );

    // Frozen, the plant's values stop changing: the mirror must come to hold exactly them.
    assert_eq!(plant.command("freeze")["frozen"], true);
    let plant_dump = by_path(&plant.command("dump"));
    assert_eq!(plant_dump.len(), 12, "{plant_dump:?}");
    let mut mirror_dump = BTreeMap::new();
    let same = wait_for(Duration::from_secs(15), || {
        mirror_dump = by_path(&opcua_client(&mirror, &["dump", "plant/Line3"]));
        mirror_dump == plant_dump
    });
    if !same {
        for (path, want) in &plant_dump {
            let got = mirror_dump.get(path);
            if got != Some(want) {
                eprintln!("{path}: plant {want}\n{path}: mirror {got:?}");
            }
        }
        let records = read_jsonl(&pair.path("out.jsonl"));
        panic!(
            "the mirror does not hold the plant's values; {} records, first {:?}\nreceiver:\n{}",
            records.len(),
            records
                .iter()
                .map(|r| r["payload"]
                    .as_str()
                    .unwrap_or("")
                    .chars()
                    .take(300)
                    .collect::<String>())
                .filter(|p| !p.contains("diode-opcua-nodes"))
                .take(6)
                .collect::<Vec<_>>(),
            pair.receiver.log_text()
        );
    }
    // The comparison covered every type, a bad status code and both timestamps.
    assert_eq!(plant_dump["Line3/Levels"]["data_type"], "Double");
    assert!(plant_dump["Line3/Levels"]["value"].is_array());
    assert!(plant_dump["Line3/Faulty"]["status"].as_u64().unwrap() & 0x8000_0000 != 0);
    assert!(plant_dump["Line3/Temp"]["source_ts"].is_string());
    assert!(plant_dump["Line3/Temp"]["server_ts"].is_string());

    // Read-only: IT clients can neither write a mirrored variable nor add nodes.
    let raw = opcua_client(&mirror, &["dump", "plant/Line3"]);
    let node_id = |path: &str| {
        raw["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["path"] == path)
            .map(|n| n["node_id"].as_str().unwrap().to_owned())
            .unwrap()
    };
    let temp = node_id("Line3/Temp");
    assert!(temp.ends_with(";s=plant/ns=2;s=Line3.Temp"), "{temp}");
    let write = opcua_client(&mirror, &["write", &temp, "99.5"]);
    assert!(
        write["status"].as_u64().unwrap_or(0) & 0x8000_0000 != 0,
        "write taken: {write}"
    );
    // The topic's folder, an existing node: the refusal is of AddNodes, not of a bad parent.
    let folder = temp.replacen(";s=plant/ns=2;s=Line3.Temp", ";s=topic:plant", 1);
    let add = opcua_client(&mirror, &["addnode", &folder]);
    assert!(
        add["status"].as_u64().unwrap_or(0) & 0x8000_0000 != 0,
        "add taken: {add}"
    );
    let after = by_path(&opcua_client(&mirror, &["dump", "plant/Line3"]));
    assert_eq!(after["Line3/Temp"], plant_dump["Line3/Temp"]);

    // A node added on the plant appears on the mirror at the next browse.
    assert!(plant.command("add NewTag")["added"].is_string());
    let added = opcua_client(&mirror, &["wait-path", "plant/Line3/NewTag", "30"]);
    assert_eq!(added["found"], true, "{added}");
    assert!(wait_for(Duration::from_secs(10), || {
        by_path(&opcua_client(&mirror, &["dump", "plant/Line3"]))
            .get("Line3/NewTag")
            .is_some_and(|n| n["value"] == 42.5 && n["data_type"] == "Double")
    }));

    // IT clients can subscribe to the mirror, and see changes as the plant makes them.
    assert_eq!(plant.command("thaw")["frozen"], false);
    let changes = opcua_client(&mirror, &["subscribe", "plant/Line3", "3"]);
    assert!(
        changes["changes"]["Line3/Count"].as_u64().unwrap_or(0) >= 3,
        "{changes}"
    );

    // The records also went to the file sink as documented JSON.
    let records = read_jsonl(&pair.path("out.jsonl"));
    let payloads: Vec<Value> = records
        .iter()
        .filter_map(|r| serde_json::from_str(r["payload"].as_str()?).ok())
        .collect();
    // A change of Temp (a Double), wherever it falls among the records' changes.
    let change = payloads
        .iter()
        .filter(|p| p["MessageType"] == "diode-opcua-data")
        .flat_map(|p| p["Changes"].as_array().cloned().unwrap_or_default())
        .find(|c| c["NodeId"] == "ns=2;s=Line3.Temp")
        .expect("a data change of Line3.Temp");
    assert_eq!(change["Path"], serde_json::json!(["Line3", "Temp"]));
    assert_eq!(change["Value"]["Type"], 11, "{change}");
    assert!(change["Value"]["Body"].is_number(), "{change}");
    assert!(payloads
        .iter()
        .any(|p| p["MessageType"] == "diode-opcua-nodes"));
    assert!(payloads
        .iter()
        .any(|p| p["MessageType"] == "diode-opcua-status"));

    assert_eq!(
        pair.sender
            .metric("diode_source_items", &["topic=\"plant\""]),
        13.0
    );
    assert_eq!(
        pair.sender
            .metric("diode_source_connections", &["topic=\"plant\""]),
        1.0
    );

    // A node removed on the plant goes from the mirror at the next browse, and from the
    // sender's monitored items.
    assert!(plant.command("remove NewTag")["removed"].is_string());
    assert!(
        wait_for(Duration::from_secs(30), || {
            let dump = by_path(&opcua_client(&mirror, &["dump", "plant/Line3"]));
            dump.len() == 12 && !dump.contains_key("Line3/NewTag")
        }),
        "{:?}",
        opcua_client(&mirror, &["dump", "plant/Line3"])
    );
    assert_eq!(
        pair.sender
            .metric("diode_source_items", &["topic=\"plant\""]),
        12.0
    );

    // The plant server saw reads, browses and subscriptions from the sender, and no request
    // that changes anything (the test's own client wrote only to the mirror).
    let requests = plant.command("requests");
    let requests: Vec<&str> = requests["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert!(
        requests.contains(&"CreateMonitoredItemsRequest"),
        "{requests:?}"
    );
    for service in WRITE_SERVICES {
        assert!(
            !requests.contains(service),
            "the plant saw {service}: {requests:?}"
        );
    }

    // The plant server goes away: the mirror says so with a bad status, not a stale good value.
    plant.stop();
    let no_communication = 0x8031_0000u64;
    assert!(
        wait_for(Duration::from_secs(20), || {
            let dump = by_path(&opcua_client(&mirror, &["dump", "plant/Line3"]));
            !dump.is_empty()
                && dump
                    .values()
                    .all(|n| n["status"].as_u64() == Some(no_communication))
        }),
        "{:?}",
        opcua_client(&mirror, &["dump", "plant/Line3"])
    );
    assert!(
        pair.sender.metric(
            "diode_source_errors_total",
            &["topic=\"plant\"", "reason=\"connect\""]
        ) >= 1.0
    );
    pair.assert_one_way();
}

/// `src` copied into `dir` as `name`, `dir` made first.
fn trust(src: impl AsRef<std::path::Path>, dir: &std::path::Path, name: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(src, dir.join(name)).unwrap();
}

#[test]
fn secured_plant_and_mirror_with_certificates_and_a_password() {
    use std::os::unix::fs::PermissionsExt;
    let _ = test_python();
    let dir = tempfile::tempdir().unwrap();
    let at = |name: &str| dir.path().join(name);
    // The sender's client certificate, made as the README says, trusted by the plant server.
    let status = std::process::Command::new(common::SEND)
        .args(["opcua-cert", "--pki-dir"])
        .arg(at("sender-pki"))
        .status()
        .unwrap();
    assert!(status.success());
    trust(
        at("sender-pki/own/cert.der"),
        &at("plant/trusted"),
        "diode-send.der",
    );
    let plant_port = free_port();
    let plant_pki = at("plant").display().to_string();
    let mut plant = PlantServer::start_with(
        plant_port,
        &["--secure", &plant_pki, "--user", "diode:secret"],
    );
    // The plant server's certificate, trusted by the sender.
    // Under any file name: the service adopts it under the name its OPC UA stack looks for.
    let cert = plant.command("cert");
    trust(
        cert["cert"].as_str().unwrap(),
        &at("sender-pki/trusted"),
        "plant-server.der",
    );
    std::fs::write(at("opcua.pass"), "secret\n").unwrap();
    std::fs::set_permissions(at("opcua.pass"), std::fs::Permissions::from_mode(0o600)).unwrap();
    // The IT client's certificate, trusted by the mirror; another client's is not.
    let it = at("it").display().to_string();
    let made = secure_client(&it, "-", &["make-cert"]);
    trust(
        made["cert"].as_str().unwrap(),
        &at("mirror-pki/trusted"),
        "it-client.der",
    );
    let stranger = at("stranger").display().to_string();
    let _ = secure_client(&stranger, "-", &["make-cert"]);

    let mirror_port = free_port();
    let mirror = format!("opc.tcp://127.0.0.1:{mirror_port}/");
    let topics = format!(
        r#"[[topic]]
name = "plant"
source = {{ kind = "opcua", endpoint = "{}", security_policy = "Basic256Sha256", security_mode = "SignAndEncrypt", pki_dir = "sender-pki", username = "diode", password_file = "opcua.pass", sampling_interval_ms = 100, publishing_interval_ms = 100, rebrowse_interval_ms = 10000, browse = [{{ include = ["Line3/**"] }}] }}
"#,
        plant.endpoint
    );
    let routes = format!(
        r#"[[route]]
topics = ["plant"]
sink = {{ kind = "opcua_server", listen = "127.0.0.1:{mirror_port}", pki_dir = "mirror-pki" }}
"#
    );
    let pair = Pair::start_with(RelayConfig::default(), &topics, &routes, dir, "", "");
    assert_found(
        &pair,
        &secure_client(&it, &mirror, &["wait-path", "plant/Line3/Cell1", "40"]),
    );
    assert_eq!(plant.command("freeze")["frozen"], true);
    let plant_dump = by_path(&plant.command("dump"));
    assert!(wait_for(Duration::from_secs(15), || {
        by_path(&secure_client(&it, &mirror, &["dump", "plant/Line3"])) == plant_dump
    }));
    // The plant saw the sender log in as diode, and nobody refused.
    let logins = plant.command("logins");
    assert!(
        logins["accepted"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u == "diode"),
        "{logins}"
    );
    assert_eq!(logins["refused"], serde_json::json!([]), "{logins}");
    // The mirror serves no unsecured endpoint, and no client it does not trust.
    let unsecured = opcua_client(&mirror, &["dump", "plant/Line3"]);
    assert!(unsecured["error"].is_string(), "{unsecured}");
    let untrusted = secure_client(&stranger, &mirror, &["dump", "plant/Line3"]);
    assert!(untrusted["error"].is_string(), "{untrusted}");
    pair.assert_one_way();
}

/// opcua_client.py with `--secure dir`.
fn secure_client(dir: &str, endpoint: &str, args: &[&str]) -> Value {
    let mut all = vec!["--secure", dir, endpoint];
    all.extend_from_slice(args);
    opcua_client_with(&all)
}
