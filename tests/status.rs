//! The status pages, as an operator sees them: loaded in a real headless Chromium (Debian's,
//! installed by scripts/test) while a pair runs, after a gap the receiver's downtime made; and
//! `/status.json` checked against `/metrics`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::peers::require;
use common::*;
use diode_gateway::relay::RelayConfig;

const TOPIC: &str = "historian/events";

fn feed(tcp: u16, from: usize, to: usize) {
    let mut stream = TcpStream::connect(loopback(tcp)).unwrap();
    let text: String = (from..to).map(|n| format!("event {n}\n")).collect();
    stream.write_all(text.as_bytes()).unwrap();
}

/// The page as Chromium renders it (the DOM after parsing, what a person sees as text).
fn rendered(url: &str) -> String {
    let chromium = require("chromium", "apt-get install chromium");
    let profile = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).unwrap()
}

/// 1234567 as the page writes it: 1,234,567.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[test]
fn both_status_pages_show_the_live_figures_and_the_gap_in_a_browser() {
    let tcp = free_port();
    let topics = format!(
        "[[topic]]\nname = \"{TOPIC}\"\n\
         source = {{ kind = \"tcp\", listen = \"127.0.0.1:{tcp}\", framing = \"lines\" }}\n"
    );
    let routes =
        "[[route]]\ntopics = [\"#\"]\nsink = { kind = \"file\", path = \"out/records.jsonl\" }\n";
    let mut pair = Pair::start_with(
        RelayConfig::default(),
        &topics,
        routes,
        tempfile::tempdir().unwrap(),
        "",
        "state_file = \"receiver.state\"",
    );
    let out = pair.path("out/records.jsonl");
    feed(tcp, 0, 2_000);
    assert!(wait_for(Duration::from_secs(10), || line_count(&out) >= 2_000));
    pair.stop_receiver(false);
    feed(tcp, 2_000, 2_700);
    assert!(wait_for(Duration::from_secs(10), || pair
        .sender
        .metric("diode_records_in_total", &[])
        >= 2_700.0));
    std::thread::sleep(Duration::from_millis(300));
    pair.start_receiver();
    feed(tcp, 2_700, 3_000);
    assert!(wait_for(Duration::from_secs(10), || line_count(&out) >= 2_300));
    assert!(wait_for(Duration::from_secs(5), || pair
        .receiver
        .metric("diode_gaps_open", &[])
        == 1.0));
    // The board's notes (the gap list) are set once a second.
    std::thread::sleep(Duration::from_millis(1500));

    // The JSON says what /metrics says.
    let json: serde_json::Value =
        serde_json::from_str(&common::http_get(pair.receiver.metrics, "/status.json")).unwrap();
    let figure = |name: &str| {
        json["summary"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["metric"] == name)
            .unwrap_or_else(|| panic!("{name} not in {json}"))["value"]
            .as_f64()
            .unwrap()
    };
    let delivered = pair.receiver.metric("diode_records_out_total", &[]);
    assert_eq!(figure("diode_records_out_total"), delivered);
    assert_eq!(figure("diode_records_lost_total"), 700.0);
    assert_eq!(figure("diode_link_up"), 1.0);
    // The tables too: per topic and per route, what the labelled series say.
    let row = |title: &str, key: &str| -> Vec<f64> {
        let table = json["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["title"] == title)
            .unwrap_or_else(|| panic!("no table {title}"));
        let row = table["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r[0] == key)
            .unwrap_or_else(|| panic!("no row {key} in {table}"));
        row[1]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    };
    let topic_label = format!("topic=\"{TOPIC}\"");
    let topic = row("Topics", TOPIC);
    assert_eq!(
        topic[0],
        pair.receiver
            .metric("diode_records_out_total", &[&topic_label])
    );
    assert_eq!(topic[2], 700.0, "lost");
    // What the OT side says of its source, from the heartbeats: when it last took a record in,
    // as the sender's own page has it (its gauge is set every 50 ms, the heartbeat's is exact).
    let taken_in = topic[8];
    let sender_last = pair
        .sender
        .metric("diode_source_last_record_seconds", &[&topic_label]);
    assert!(
        taken_in > 0.0 && (taken_in - sender_last).abs() <= 2.0,
        "last record taken in at {taken_in} on the receiver's page, {sender_last} on the sender"
    );
    assert_eq!(
        topic[6],
        pair.sender
            .metric("diode_source_connections", &[&topic_label]),
        "source connections"
    );
    // A clean link: no loss measured (0 until a first 5 s window closes).
    assert!(figure("diode_link_loss_ratio") < 0.01);
    let route = row("Routes", "0-file");
    assert_eq!(
        route[0],
        pair.receiver
            .metric("diode_sink_delivered_total", &["route=\"0-file\""])
    );
    assert_eq!(json["gaps"][0]["topic"], TOPIC);
    assert_eq!(
        (
            json["gaps"][0]["first_seq"].as_u64(),
            json["gaps"][0]["last_seq"].as_u64()
        ),
        (Some(2_000), Some(2_699))
    );

    // And the browser shows it.
    let page = rendered(&format!("http://{}/", pair.receiver.metrics));
    for expected in [
        "diode-recv".to_owned(),
        "Open gaps (1)".to_owned(),
        TOPIC.to_owned(),
        "2000-2699".to_owned(),
        format!("diode-send replay --topic '{TOPIC}' --seq 2000-2699"),
        format!("<b>{}</b>", grouped(delivered as u64)),
        "<b>up</b>".to_owned(),
        // What metrics do not hold: the link's state since when, each topic's last record,
        // each route's sink.
        "<td>Link</td><td>up since 20".to_owned(),
        "<td>Sender</td><td>started 20".to_owned(),
        format!("<td>{TOPIC}</td><td>2999</td><td>20"),
        "<td>0-file</td><td>#</td><td>file".to_owned(),
        "<td>delivering since 20".to_owned(),
        "Loss on the link".to_owned(),
        "<th>in/s at the sender</th>".to_owned(),
    ] {
        assert!(
            page.contains(&expected),
            "{expected:?} not on the page:\n{page}"
        );
    }
    assert!(
        page.contains("<div class=\"card bad\" data-metric=\"diode_gaps_open\">"),
        "an open gap is shown as a problem"
    );
    assert!(!page.contains("<script"), "no script on a read-only page");

    let sent = pair.sender.metric("diode_records_in_total", &[]);
    let json: serde_json::Value =
        serde_json::from_str(&common::http_get(pair.sender.metrics, "/status.json")).unwrap();
    let records_in = json["summary"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["metric"] == "diode_records_in_total")
        .unwrap()["value"]
        .as_f64();
    assert_eq!(records_in, Some(sent));
    let page = rendered(&format!("http://{}/", pair.sender.metrics));
    for expected in [
        "diode-send".to_owned(),
        "Records in".to_owned(),
        format!("<b>{}</b>", grouped(sent as u64)),
        TOPIC.to_owned(),
        "Link ceiling".to_owned(),
        "<td>Heartbeat</td><td>every 200 ms</td>".to_owned(),
        "<th>last record ago</th>".to_owned(),
    ] {
        assert!(
            page.contains(&expected),
            "{expected:?} not on the page:\n{page}"
        );
    }
    // Read-only: nothing but GET is answered.
    let mut stream = TcpStream::connect(pair.receiver.metrics).unwrap();
    stream
        .write_all(b"POST / HTTP/1.1\r\nHost: diode\r\nContent-Length: 0\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 405"), "{response}");
    pair.assert_one_way();
}
