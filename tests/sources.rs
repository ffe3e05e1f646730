//! The OT sources against real peers: mosquitto and mosquitto_pub as the plant's broker and
//! devices, pymodbus as the PLC, util-linux `logger` as the syslog client. Each record goes through
//! the real sender, the link and the real receiver to a file sink.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::{TcpStream, UdpSocket};
use std::process::Command;
use std::time::Duration;

use common::peers::{require, Mosquitto, Plc};
use common::*;
use diode_gateway::relay::RelayConfig;

const FILE_ROUTE: &str = r##"
[[route]]
topics = ["#"]
sink = { kind = "file", path = "out.jsonl" }
"##;

#[test]
fn mqtt_messages_cross_with_their_topics_through_broker_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::start(dir.path(), free_port());
    let topics = format!(
        r#"[[topic]]
name = "plant/mqtt"
source = {{ kind = "mqtt", broker = "127.0.0.1:{}", subscribe = ["plant/#"], qos = 1, client_id = "diode-send-test" }}
"#,
        broker.port
    );
    let mut pair = Pair::start_with(RelayConfig::default(), &topics, FILE_ROUTE, dir, "", "");
    let connected = |pair: &Pair| {
        wait_for(Duration::from_secs(20), || {
            pair.sender
                .metric("diode_source_connections", &["topic=\"plant/mqtt\""])
                == 1.0
        })
    };
    assert!(connected(&pair), "{}", pair.sender.log_text());

    let devices: Vec<String> = (0..5).map(|d| format!("plant/line{d}/telemetry")).collect();
    let publish = |broker: &Mosquitto, phase: &str, range: std::ops::Range<usize>| {
        std::thread::scope(|scope| {
            for (d, topic) in devices.iter().enumerate() {
                let lines: Vec<String> = range
                    .clone()
                    .map(|n| format!("{{\"device\":{d},\"phase\":\"{phase}\",\"n\":{n}}}"))
                    .collect();
                scope.spawn(move || broker.publish_lines(topic, 1, &lines));
            }
        });
    };
    // Half while everything runs, with a broker restart in the middle of it.
    publish(&broker, "a", 0..500);
    broker.restart(Duration::from_secs(1));
    publish(&broker, "a", 500..1000);
    assert!(connected(&pair), "{}", pair.sender.log_text());
    // The other half while the sender is away: the broker keeps it in the sender's persistent
    // session, across one more restart of its own.
    std::thread::sleep(Duration::from_millis(500));
    pair.sender.stop();
    publish(&broker, "b", 0..1000);
    broker.restart(Duration::from_millis(200));
    let log = pair.path("sender2.log");
    pair.sender = Service::start(SEND, &pair.sender_toml, log, pair.sender.metrics);

    let out = pair.path("out.jsonl");
    let expected = 10_000;
    let complete = wait_for(Duration::from_secs(60), || {
        let lines = read_jsonl(&out);
        let distinct: BTreeSet<String> = lines
            .iter()
            .map(|l| l["payload"].as_str().unwrap_or("").to_owned())
            .collect();
        distinct.len() >= expected
    });
    let lines = read_jsonl(&out);
    let mut seen: BTreeMap<String, Vec<(String, usize)>> = BTreeMap::new();
    let mut distinct = BTreeSet::new();
    for line in &lines {
        assert_eq!(line["topic"], "plant/mqtt");
        let payload = line["payload"].as_str().expect("text payload");
        let body: serde_json::Value = serde_json::from_str(payload).unwrap();
        let origin = &line["origin"];
        let device = body["device"].as_u64().unwrap() as usize;
        assert_eq!(origin["topic"], devices[device].as_str(), "{line}");
        assert_eq!(origin["qos"], 1);
        assert_eq!(origin["retain"], false);
        if distinct.insert(payload.to_owned()) {
            seen.entry(devices[device].clone()).or_default().push((
                body["phase"].as_str().unwrap().to_owned(),
                body["n"].as_u64().unwrap() as usize,
            ));
        }
    }
    let duplicates = lines.len() - distinct.len();
    assert!(
        complete,
        "{} of {expected} messages arrived ({duplicates} duplicates); sender log:\n{}\nfirst sender log:\n{}\nreceiver log:\n{}\nreceiver metrics:\n{}",
        distinct.len(),
        pair.sender.log_text(),
        std::fs::read_to_string(pair.path("sender.log")).unwrap_or_default(),
        pair.receiver.log_text(),
        pair.receiver.metrics_text()
    );
    // Per MQTT topic, first deliveries are in publishing order.
    for (topic, order) in &seen {
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(order, &sorted, "{topic} out of order");
        assert_eq!(order.len(), 2000, "{topic}");
    }
    println!(
        "mqtt: {} messages, {duplicates} redelivered by the broker after restarts",
        distinct.len()
    );
    pair.assert_one_way();
}

/// The probe's attack: one retained MQTT message whose topic is longer than a block holds froze
/// the sender's link thread (no datagram, no heartbeat, SIGTERM ignored), again on every restart.
#[test]
fn an_mqtt_topic_longer_than_a_block_is_refused_and_the_link_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path(), free_port());
    let topics = format!(
        r#"[[topic]]
name = "plant/mqtt"
source = {{ kind = "mqtt", broker = "127.0.0.1:{}", subscribe = ["plant/#"], qos = 1, client_id = "diode-send-long" }}
"#,
        broker.port
    );
    let mut pair = Pair::start_with(RelayConfig::default(), &topics, FILE_ROUTE, dir, "", "");
    let subscribed = |pair: &Pair| {
        wait_for(Duration::from_secs(20), || {
            pair.sender
                .metric("diode_source_connections", &["topic=\"plant/mqtt\""])
                == 1.0
        })
    };
    assert!(subscribed(&pair), "{}", pair.sender.log_text());
    let long_topic = format!("plant/{}", "x".repeat(50_000));
    let published = Command::new(require(
        "mosquitto_pub",
        "apt-get install mosquitto-clients",
    ))
    .args(["-h", "127.0.0.1", "-p", &broker.port.to_string()])
    .args([
        "-q",
        "1",
        "-r",
        "-t",
        &long_topic,
        "-m",
        "retained and too long",
    ])
    .status()
    .unwrap();
    assert!(published.success());
    let out = pair.path("out.jsonl");
    let delivered = |pair: &Pair, marker: &str| {
        wait_for(Duration::from_secs(20), || {
            read_jsonl(&pair.path("out.jsonl"))
                .iter()
                .any(|l| l["payload"] == marker)
        })
    };
    broker.publish_lines("plant/line1", 1, &["after the long one".to_owned()]);
    assert!(
        delivered(&pair, "after the long one"),
        "{}",
        pair.sender.log_text()
    );
    let refused = |pair: &Pair| {
        pair.sender.metric(
            "diode_records_dropped_total",
            &["topic=\"plant/mqtt\"", "reason=\"oversize\""],
        )
    };
    assert_eq!(refused(&pair), 1.0);
    assert!(pair
        .sender
        .log_text()
        .contains("record refused: it cannot be framed"));
    assert_eq!(pair.receiver.metric("diode_link_up", &[]), 1.0);

    // The retained message comes again on every restart: refused again, and the sender still
    // stops at once when asked to.
    let stopping = std::time::Instant::now();
    pair.sender.stop();
    assert!(stopping.elapsed() < Duration::from_secs(5));
    let log = pair.path("sender2.log");
    pair.sender = Service::start(SEND, &pair.sender_toml, log, pair.sender.metrics);
    assert!(subscribed(&pair), "{}", pair.sender.log_text());
    broker.publish_lines("plant/line1", 1, &["after the restart".to_owned()]);
    assert!(
        delivered(&pair, "after the restart"),
        "{}",
        pair.sender.log_text()
    );
    assert!(wait_for(Duration::from_secs(5), || refused(&pair) == 1.0));
    assert!(read_jsonl(&out)
        .iter()
        .all(|l| l["payload"] != "retained and too long"));
    pair.assert_one_way();
}

/// Words of a big-endian f32, most significant first.
fn f32_words(value: f32) -> [u16; 2] {
    let b = value.to_be_bytes();
    [
        u16::from_be_bytes([b[0], b[1]]),
        u16::from_be_bytes([b[2], b[3]]),
    ]
}

#[test]
fn modbus_values_are_polled_typed_and_scaled_and_nothing_is_written() {
    let _ = require("python3", "apt-get install python3 python3-venv");
    let plc_port = free_port();
    let mut plc = Plc::start(plc_port);
    plc.set("holding", 100, &[12345]);
    plc.set("input", 10, &f32_words(42.25));
    plc.set("coil", 5, &[1]);
    // u32 0x0001_E240 = 123456 with the low word first; i16 -2.
    plc.set("holding", 200, &[0xE240, 0x0001]);
    plc.set("holding", 300, &[0xFFFE]);
    plc.set("input", 2990, &[4242]);
    let topics = format!(
        r#"[[topic]]
name = "line3/plc7"
source = {{ kind = "modbus", address = "127.0.0.1:{plc_port}", unit_id = 1, poll_interval_ms = 100, timeout_ms = 300, registers = [
  {{ name = "motor_speed", table = "holding", address = 100, type = "u16", scale = 0.1, unit = "rpm" }},
  {{ name = "tank_level",  table = "input",   address = 10,  type = "f32", word_order = "big" }},
  {{ name = "pump_on",     table = "coil",    address = 5 }},
  {{ name = "counter",     table = "holding", address = 200, type = "u32", word_order = "little" }},
  {{ name = "offset",      table = "holding", address = 300, type = "i16" }},
  {{ name = "beyond",      table = "input",   address = 2990 }},
  {{ name = "missing",     table = "input",   address = 3050 }},
] }}

# A device whose only (coalesced) read is refused at first: it must still split and recover.
[[topic]]
name = "line3/plc7-edge"
source = {{ kind = "modbus", address = "127.0.0.1:{plc_port}", poll_interval_ms = 100, registers = [
  {{ name = "beyond",      table = "input",   address = 2990 }},
  {{ name = "missing",     table = "input",   address = 3050 }},
] }}
"#
    );
    let pair = Pair::start(RelayConfig::default(), &topics, FILE_ROUTE);
    let out = pair.path("out.jsonl");
    let latest_of = |topic: &str| {
        read_jsonl(&out)
            .iter()
            .rev()
            .find(|l| l["topic"] == topic)
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l["payload"].as_str().unwrap()).unwrap()
            })
    };
    let latest = || latest_of("line3/plc7");
    // "missing" is past the end of the PLC's input registers: the coalesced read 2990-3050 is
    // refused, split, and from then on only "missing" is reported, with the reason.
    let expect = serde_json::json!({
        "motor_speed": 1234.5, "tank_level": 42.25, "pump_on": true, "counter": 123456, "offset": -2,
        "beyond": 4242
    });
    assert!(
        wait_for(Duration::from_secs(15), || latest()
            .is_some_and(|r| r["values"] == expect)),
        "latest record {:?}; sender log:\n{}",
        latest(),
        pair.sender.log_text()
    );
    let record = latest().unwrap();
    assert_eq!(
        record["errors"],
        serde_json::json!({"missing": "exception 0x02 (illegal data address)"})
    );
    assert!(
        pair.sender.metric(
            "diode_source_errors_total",
            &["topic=\"line3/plc7\"", "reason=\"exception\""]
        ) >= 2.0
    );
    assert!(pair
        .sender
        .log_text()
        .contains("reading its values one by one"));
    assert!(
        wait_for(Duration::from_secs(10), || latest_of("line3/plc7-edge")
            .is_some_and(|r| r["values"]
                == serde_json::json!({"beyond": 4242})
                && r["errors"]["missing"].is_string())),
        "{:?}",
        latest_of("line3/plc7-edge")
    );
    assert_eq!(record["units"]["motor_speed"], "rpm");
    assert!(record["ts"].as_str().unwrap().ends_with('Z'));

    plc.set("holding", 100, &[1000]);
    plc.set("coil", 5, &[0]);
    assert!(wait_for(Duration::from_secs(10), || latest().is_some_and(
        |r| r["values"]["motor_speed"] == 100.0 && r["values"]["pump_on"] == false
    )));
    // Four tables, each coalesced to one read per poll: only read codes ever reached the PLC.
    assert_eq!(plc.function_codes(), vec![1, 3, 4]);

    // The PLC goes away: polls fail, are counted and backed off; it comes back: polling resumes.
    plc.stop();
    let failed = |pair: &Pair| {
        ["connect", "timeout", "io"]
            .iter()
            .map(|r| {
                pair.sender.metric(
                    "diode_source_errors_total",
                    &["topic=\"line3/plc7\"", &format!("reason=\"{r}\"")],
                )
            })
            .sum::<f64>()
    };
    assert!(wait_for(Duration::from_secs(10), || failed(&pair) >= 2.0));
    let records_while_down = line_count(&out);
    std::thread::sleep(Duration::from_secs(2));
    let failures = failed(&pair);
    // Backed off: 2 s at a 100 ms interval would be 20 attempts without backoff.
    assert!(
        failures < 15.0,
        "{failures} failed polls in 2 s: no backoff"
    );
    let mut plc = Plc::start(plc_port);
    plc.set("holding", 100, &[777]);
    assert!(
        wait_for(Duration::from_secs(40), || latest()
            .is_some_and(|r| r["values"]["motor_speed"] == 77.7)),
        "polling did not resume; sender log:\n{}",
        pair.sender.log_text()
    );
    assert!(line_count(&out) > records_while_down);
    let codes = plc.function_codes();
    assert!(codes.iter().all(|c| (1..=4).contains(c)), "{codes:?}");
    pair.assert_one_way();
}

#[test]
fn syslog_in_both_rfc_formats_over_udp_and_tcp() {
    let logger = require("logger", "apt-get install bsdutils");
    let udp_port = free_port();
    let tcp_port = free_port();
    let topics = format!(
        r#"[[topic]]
name = "security/udp"
source = {{ kind = "syslog", listen = "127.0.0.1:{udp_port}", protocol = "udp" }}

[[topic]]
name = "security/tcp"
source = {{ kind = "syslog", listen = "127.0.0.1:{tcp_port}", protocol = "tcp" }}
"#
    );
    let pair = Pair::start(RelayConfig::default(), &topics, FILE_ROUTE);
    let log = |args: &[&str], message: &str| {
        let status = Command::new(&logger)
            .args(["--server", "127.0.0.1"])
            .args(args)
            .args(["-t", "plcmon", "-p", "local4.warning", "--id=4242"])
            .arg(message)
            .status()
            .unwrap();
        assert!(status.success());
    };
    let udp = udp_port.to_string();
    let tcp = tcp_port.to_string();
    log(&["--port", &udp, "--udp", "--rfc5424"], "udp 5424");
    log(&["--port", &udp, "--udp", "--rfc3164"], "udp 3164");
    log(
        &["--port", &tcp, "--tcp", "--rfc5424", "--octet-count"],
        "tcp 5424 counted",
    );
    log(&["--port", &tcp, "--tcp", "--rfc3164"], "tcp 3164 newline");
    // A device that speaks neither format, and a newline-framed stream of two messages.
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .send_to(b"PLC7 door opened", ("127.0.0.1", udp_port))
        .unwrap();
    let mut stream = TcpStream::connect(("127.0.0.1", tcp_port)).unwrap();
    stream
        .write_all(b"<14>1 2026-11-25T22:14:15Z gw app - ID1 - first\n<14>Nov 25 22:14:16 gw app: second\n")
        .unwrap();
    drop(stream);

    let out = pair.path("out.jsonl");
    assert!(
        wait_for(Duration::from_secs(15), || line_count(&out) >= 7),
        "{} records; sender log:\n{}",
        line_count(&out),
        pair.sender.log_text()
    );
    let mut by_message = BTreeMap::new();
    let mut raw = Vec::new();
    for line in read_jsonl(&out) {
        let payload = line["payload"].as_str().unwrap().to_owned();
        match serde_json::from_str::<serde_json::Value>(&payload) {
            Ok(parsed) => {
                by_message.insert(
                    parsed["message"].as_str().unwrap().to_owned(),
                    (line["topic"].clone(), parsed),
                );
            }
            Err(_) => raw.push(payload),
        }
    }
    for (message, topic, format) in [
        ("udp 5424", "security/udp", "rfc5424"),
        ("udp 3164", "security/udp", "rfc3164"),
        ("tcp 5424 counted", "security/tcp", "rfc5424"),
        ("tcp 3164 newline", "security/tcp", "rfc3164"),
    ] {
        let (t, parsed) = by_message
            .get(message)
            .unwrap_or_else(|| panic!("{message} missing: {by_message:?}"));
        assert_eq!(t, topic);
        assert_eq!(parsed["format"], format, "{parsed}");
        assert_eq!(parsed["facility"], 20, "local4: {parsed}");
        assert_eq!(parsed["severity"], 4, "warning: {parsed}");
        assert_eq!(parsed["app"], "plcmon", "{parsed}");
        assert_eq!(parsed["procid"], "4242", "{parsed}");
        assert!(
            parsed["host"].is_string() && parsed["timestamp"].is_string(),
            "{parsed}"
        );
        assert!(
            parsed["raw"].as_str().unwrap().contains(message),
            "{parsed}"
        );
    }
    assert_eq!(by_message["first"].1["msgid"], "ID1");
    assert_eq!(by_message["second"].1["host"], "gw");
    assert_eq!(raw, vec!["PLC7 door opened".to_owned()]);
    assert_eq!(
        pair.sender.metric(
            "diode_source_unparsed_records_total",
            &["topic=\"security/udp\""]
        ),
        1.0
    );
    pair.assert_one_way();
}

#[test]
fn a_topic_over_its_rate_ceiling_cannot_take_the_link_from_the_others() {
    let (limited, free) = (free_port(), free_port());
    let topics = format!(
        r#"[[topic]]
name = "plant/chatty"
rate_mbps = 0.8
source = {{ kind = "udp", listen = "127.0.0.1:{limited}" }}

[[topic]]
name = "plant/alarms"
source = {{ kind = "udp", listen = "127.0.0.1:{free}" }}
"#
    );
    let pair = Pair::start(RelayConfig::default(), &topics, FILE_ROUTE);
    let send = |port: u16| {
        let to = loopback(port);
        send_udp(to, (0..2000).map(|n| format!("{n:0500}").into_bytes()), 200);
    };
    // 1 MB offered at once to a topic allowed 100 kB/s (64 KiB of burst), and as much to another.
    send(limited);
    send(free);
    let dropped = || {
        pair.sender.metric(
            "diode_records_dropped_total",
            &["topic=\"plant/chatty\"", "reason=\"rate\""],
        )
    };
    let out = pair.path("out.jsonl");
    let count = |topic: &str| {
        read_jsonl(&out)
            .iter()
            .filter(|l| l["topic"] == topic)
            .count()
    };
    assert!(
        wait_for(Duration::from_secs(10), || count("plant/alarms") == 2000
            && count("plant/chatty") as f64 + dropped() == 2000.0),
        "alarms {}, chatty {} + {} dropped",
        count("plant/alarms"),
        count("plant/chatty"),
        dropped()
    );
    assert!(
        count("plant/chatty") < 1000,
        "the ceiling held back nothing"
    );
    // The IT side sees the OT side's drops too, through the heartbeats.
    assert!(wait_for(Duration::from_secs(5), || pair.receiver.metric(
        "diode_sender_records_dropped_total",
        &["topic=\"plant/chatty\""]
    ) == dropped()));
    pair.assert_one_way();
}
