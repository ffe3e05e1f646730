//! The real binaries on loopback, with an impairing relay standing in for the diode.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use common::*;
use diode_gateway::relay::RelayConfig;
use diode_wire::sim::{Impairments, SimRng};

/// A pair with the topics of `topics_udp_and_lines` behind `relay`, to `FILE_ROUTE`; returns it
/// with the UDP and TCP sources' ports.
fn udp_and_lines_pair(relay: RelayConfig) -> (Pair, u16, u16) {
    let (udp, tcp) = (free_port(), free_port());
    let pair = Pair::start(relay, &topics_udp_and_lines(udp, tcp), FILE_ROUTE);
    (pair, udp, tcp)
}

/// As `udp_and_lines_pair` on a clean relay, in `dir`, with more `[link]` keys for each side.
fn udp_and_lines_pair_in(
    dir: tempfile::TempDir,
    sender_link: &str,
    receiver_link: &str,
) -> (Pair, u16, u16) {
    let (udp, tcp) = (free_port(), free_port());
    let pair = Pair::start_with(
        RelayConfig::default(),
        &topics_udp_and_lines(udp, tcp),
        FILE_ROUTE,
        dir,
        sender_link,
        receiver_link,
    );
    (pair, udp, tcp)
}

fn topics_udp_and_lines(udp: u16, tcp: u16) -> String {
    format!(
        r#"[[topic]]
name = "line3/telemetry"
source = {{ kind = "udp", listen = "127.0.0.1:{udp}" }}

[[topic]]
name = "historian/events"
source = {{ kind = "tcp", listen = "127.0.0.1:{tcp}", framing = "lines" }}
"#
    )
}

const PAD: &str =
    "................................................................................";

const FILE_ROUTE: &str = r#"[[route]]
topics = ["line3/#", "historian/#"]
sink = { kind = "file", path = "out/records.jsonl" }
"#;

fn send_lines(addr: SocketAddr, lines: impl IntoIterator<Item = String>) {
    let mut stream = TcpStream::connect(addr).unwrap();
    let mut text = String::new();
    for line in lines {
        text += &line;
        text.push('\n');
    }
    stream.write_all(text.as_bytes()).unwrap();
}

/// The status page's "loss on the link": what the sender had sent by each heartbeat against
/// what arrived, measured over a 5 s window while telemetry flows through 5 % loss.
#[test]
fn loss_on_the_link_is_measured_against_what_the_sender_sent() {
    let relay = RelayConfig {
        impairments: Impairments {
            drop_rate: 0.05,
            ..Impairments::default()
        },
        seed: 9,
    };
    let (pair, udp, _) = udp_and_lines_pair(relay);
    let until = std::time::Instant::now() + Duration::from_secs(8);
    let mut next = 0u64;
    while std::time::Instant::now() < until {
        let batch = (next..next + 100).map(|n| format!("telemetry {n} {PAD}").into_bytes());
        send_udp(loopback(udp), batch, 100);
        next += 100;
        std::thread::sleep(Duration::from_millis(50));
    }
    let ratio = pair.receiver.metric("diode_link_loss_ratio", &[]);
    assert!(
        (0.03..=0.08).contains(&ratio),
        "loss on the link measured as {ratio}, the relay drops 5 %"
    );
}

/// The sender's counters as the receiver mirrors them: all of a session it saw start, and after
/// a receiver restart only what came since, with no burst of the sender's totals so far.
#[test]
fn mirrored_sender_counters_count_what_this_receiver_saw() {
    let (mut pair, udp, _) = udp_and_lines_pair_in(
        tempfile::tempdir().unwrap(),
        "",
        "state_file = \"receiver.state\"",
    );
    let topic = "topic=\"line3/telemetry\"";
    let send = |from: u64, to: u64| {
        send_udp(
            loopback(udp),
            (from..to).map(|n| format!("telemetry {n} {PAD}").into_bytes()),
            100,
        )
    };
    send(0, 2000);
    let counted = |pair: &Pair, name: &str, labels: &[&str]| pair.receiver.metric(name, labels);
    let settled = wait_for(Duration::from_secs(10), || {
        counted(&pair, "diode_sender_topic_records_in_total", &[topic]) == 2000.0
    });
    assert!(
        settled,
        "{} taken in at the sender as the receiver counts it; metrics:\n{}",
        counted(&pair, "diode_sender_topic_records_in_total", &[topic]),
        pair.receiver.metrics_text()
    );
    assert_eq!(counted(&pair, "diode_sender_records_in_total", &[]), 2000.0);
    // Well into the session, as a receiver restart usually is.
    std::thread::sleep(Duration::from_millis(1000));
    pair.restart_receiver(false);
    // Heartbeats of the same session: the baseline, not an increase.
    std::thread::sleep(Duration::from_millis(800));
    send(2000, 2500);
    let settled = wait_for(Duration::from_secs(10), || {
        counted(&pair, "diode_sender_topic_records_in_total", &[topic]) == 500.0
    });
    assert!(
        settled,
        "{} taken in since the restart, as the receiver counts it; log:\n{}",
        counted(&pair, "diode_sender_topic_records_in_total", &[topic]),
        std::fs::read_to_string(pair.path("receiver2.log")).unwrap_or_default()
    );
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(counted(&pair, "diode_sender_records_in_total", &[]), 500.0);
    assert_eq!(
        counted(&pair, "diode_sender_topic_records_in_total", &[topic]),
        500.0
    );
}

#[test]
fn records_arrive_intact_in_order_once_over_an_impaired_link() {
    let relay = RelayConfig {
        impairments: Impairments {
            drop_rate: 0.03,
            reorder_rate: 0.01,
            reorder_distance: 3,
            duplicate_rate: 0.01,
            corrupt_rate: 0.005,
            truncate_rate: 0.005,
            ..Impairments::default()
        },
        seed: 7,
    };
    let (pair, udp, tcp) = udp_and_lines_pair(relay);
    let udp_addr: SocketAddr = loopback(udp);
    // 100-byte records, as plant telemetry typically is.
    send_udp(
        udp_addr,
        (0..5000).map(|i| format!("telemetry {i} {PAD}").into_bytes()),
        200,
    );
    send_lines(loopback(tcp), (0..5000).map(|i| format!("event {i} {PAD}")));
    // Noise straight at the receiver's port while real traffic flows.
    let noise = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut rng = SimRng::new(1);
    for _ in 0..500 {
        let len = rng.below(1500) as usize;
        let junk: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        noise.send_to(&junk, ("127.0.0.1", pair.link_port)).unwrap();
    }
    let out = pair.path("out/records.jsonl");
    let receiver = &pair.receiver;
    let settled = wait_for(Duration::from_secs(30), || {
        let out_n = receiver.metric("diode_records_out_total", &[]);
        let lost = receiver.metric("diode_records_lost_total", &[]);
        out_n + lost >= 10_000.0 && line_count(&out) as f64 >= out_n
    });
    assert!(settled, "receiver log:\n{}", receiver.log_text());

    let topics = by_topic(&read_jsonl(&out));
    let lost = receiver.metric("diode_records_lost_total", &[]) as usize;
    let mut delivered = 0;
    for (topic, prefix) in [
        ("line3/telemetry", "telemetry"),
        ("historian/events", "event"),
    ] {
        let records = &topics[topic];
        delivered += records.len();
        // In order, once, and each exactly the record sent under its sequence number.
        for window in records.windows(2) {
            assert!(
                window[0].0 < window[1].0,
                "{topic}: out of order or twice: {window:?}"
            );
        }
        for (seq, payload) in records {
            assert_eq!(
                payload,
                &format!("{prefix} {seq} {PAD}"),
                "{topic}: wrong record"
            );
        }
    }
    assert_eq!(
        delivered + lost,
        10_000,
        "every record is delivered or reported lost"
    );
    assert!(
        lost <= 500,
        "FEC should have repaired most of 3% loss; lost {lost}"
    );
    assert!(
        receiver.metric("diode_blocks_recovered_total", &[]) > 0.0,
        "relay dropped {}; receiver metrics:\n{}",
        pair.relay
            .stats
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed),
        receiver.metrics_text()
    );
    assert!(receiver.metric("diode_datagrams_rejected_total", &["reason=\"crc\""]) > 0.0);
    assert_eq!(receiver.metric("diode_link_up", &[]), 1.0);
    // The sender's own figures arrive with its heartbeats.
    assert!(wait_for(Duration::from_secs(3), || {
        receiver.metric("diode_sender_records_in_total", &[]) == 10_000.0
    }));
    assert_eq!(
        pair.sender
            .metric("diode_records_in_total", &["topic=\"line3/telemetry\""]),
        5000.0
    );
    pair.assert_one_way();
}

#[test]
fn a_clean_link_loses_nothing() {
    let (pair, _, tcp) = udp_and_lines_pair(RelayConfig::default());
    send_lines(loopback(tcp), (0..20_000).map(|i| format!("event {i}")));
    let out = pair.path("out/records.jsonl");
    assert!(wait_for(Duration::from_secs(30), || line_count(&out) >= 20_000));
    let topics = by_topic(&read_jsonl(&out));
    let seqs: Vec<u64> = topics["historian/events"].iter().map(|r| r.0).collect();
    assert_eq!(seqs, (0..20_000).collect::<Vec<_>>());
    assert_eq!(pair.receiver.metric("diode_records_lost_total", &[]), 0.0);
    assert_eq!(pair.receiver.metric("diode_blocks_lost_total", &[]), 0.0);
    pair.assert_one_way();
}

#[test]
fn an_outage_is_reported_as_exact_gaps_and_link_down() {
    let (pair, _, tcp) = udp_and_lines_pair(RelayConfig::default());
    let tcp_addr: SocketAddr = loopback(tcp);
    let mut stream = TcpStream::connect(tcp_addr).unwrap();
    let mut sent = 0;
    let mut send_for = |stream: &mut TcpStream, ms: u64| {
        for _ in 0..ms / 10 {
            for _ in 0..20 {
                writeln!(stream, "event {sent}").unwrap();
                sent += 1;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    send_for(&mut stream, 500);
    pair.relay.set_dark(true);
    send_for(&mut stream, 1200); // longer than four 200 ms heartbeats: the link is called down
    pair.relay.set_dark(false);
    send_for(&mut stream, 500);
    drop(stream);
    pair.wait_accounted_for(sent);
    let receiver = &pair.receiver;
    let out = pair.path("out/records.jsonl");
    let records = &by_topic(&read_jsonl(&out))["historian/events"];
    let lost = receiver.metric("diode_records_lost_total", &["topic=\"historian/events\""]) as u64;
    assert!(lost > 0);
    assert_eq!(records.len() as u64 + lost, sent);
    // The holes in the file are exactly the gaps the log reports.
    let log = receiver.log_text();
    let mut expected = 0;
    for (seq, payload) in records {
        if *seq != expected {
            let needle = format!("first_seq={expected} last_seq={}", seq - 1);
            assert!(log.contains(&needle), "gap {needle} not logged:\n{log}");
        }
        assert_eq!(payload, &format!("event {seq}"));
        expected = seq + 1;
    }
    assert!(log.contains("link down"), "{log}");
    assert!(log.contains("records lost beyond repair") && log.contains("topic=historian/events"));
    assert_eq!(receiver.metric("diode_link_up", &[]), 1.0);
    pair.assert_one_way();
}

#[test]
fn byte_streams_round_trip_through_tcp_sinks() {
    let (raw_in, len_in) = (free_port(), free_port());
    let raw_out = TcpListener::bind("127.0.0.1:0").unwrap();
    let len_out = TcpListener::bind("127.0.0.1:0").unwrap();
    let udp_out = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp_out
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let udp_in = free_port();
    let topics = format!(
        r#"[[topic]]
name = "bulk/raw"
source = {{ kind = "tcp", listen = "127.0.0.1:{raw_in}", framing = "raw" }}

[[topic]]
name = "bulk/length"
source = {{ kind = "tcp", listen = "127.0.0.1:{len_in}", framing = "length" }}

[[topic]]
name = "line3/udp"
source = {{ kind = "udp", listen = "127.0.0.1:{udp_in}" }}
"#
    );
    let routes = format!(
        r#"[[route]]
topics = ["bulk/raw"]
sink = {{ kind = "tcp", connect = "{}", framing = "raw" }}

[[route]]
topics = ["bulk/length"]
sink = {{ kind = "tcp", connect = "{}", framing = "length" }}

[[route]]
topics = ["+/udp"]
sink = {{ kind = "udp", target = "{}" }}
"#,
        raw_out.local_addr().unwrap(),
        len_out.local_addr().unwrap(),
        udp_out.local_addr().unwrap()
    );
    let pair = Pair::start(RelayConfig::default(), &topics, &routes);
    let mut rng = SimRng::new(9);

    // 4 MiB of random bytes as a raw stream.
    let raw: Vec<u8> = (0..4 << 20).map(|_| rng.next_u64() as u8).collect();
    let raw_sent = raw.clone();
    let raw_writer = std::thread::spawn(move || {
        let mut s = TcpStream::connect(("127.0.0.1", raw_in)).unwrap();
        s.write_all(&raw_sent).unwrap();
    });
    // Length-prefixed records of every size from empty to 40 KB.
    let records: Vec<Vec<u8>> = (0..300)
        .map(|i| {
            (0..(i * 137) % 40_000)
                .map(|_| rng.next_u64() as u8)
                .collect()
        })
        .collect();
    let mut framed = Vec::new();
    for r in &records {
        framed.extend_from_slice(&(r.len() as u32).to_be_bytes());
        framed.extend_from_slice(r);
    }
    TcpStream::connect(("127.0.0.1", len_in))
        .unwrap()
        .write_all(&framed)
        .unwrap();
    send_udp(
        loopback(udp_in),
        (0..100).map(|i| format!("u{i}").into_bytes()),
        50,
    );

    let (mut raw_conn, _) = raw_out.accept().unwrap();
    raw_conn
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut raw_got = vec![0u8; raw.len()];
    raw_conn.read_exact(&mut raw_got).unwrap();
    assert!(raw_got == raw, "the raw stream came out different");
    raw_writer.join().unwrap();

    let (mut len_conn, _) = len_out.accept().unwrap();
    len_conn
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    for (i, expected) in records.iter().enumerate() {
        let mut len = [0u8; 4];
        len_conn.read_exact(&mut len).unwrap();
        let mut got = vec![0u8; u32::from_be_bytes(len) as usize];
        len_conn.read_exact(&mut got).unwrap();
        assert!(&got == expected, "length-framed record {i} differs");
    }

    let mut buf = [0u8; 100];
    for i in 0..100 {
        let n = udp_out.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], format!("u{i}").as_bytes());
    }
    pair.assert_one_way();
}

#[test]
fn sender_restart_starts_a_new_session_and_receiver_restart_joins() {
    let (mut pair, _, tcp) = udp_and_lines_pair(RelayConfig::default());
    let tcp_addr: SocketAddr = loopback(tcp);
    let out = pair.path("out/records.jsonl");
    send_lines(tcp_addr, (0..1000).map(|i| format!("first {i}")));
    assert!(wait_for(Duration::from_secs(10), || line_count(&out) >= 1000));

    // A clean sender restart: a new session, sequence numbers from 0 again, nothing called lost.
    pair.restart_sender(false);
    send_lines(tcp_addr, (0..1000).map(|i| format!("second {i}")));
    assert!(
        wait_for(Duration::from_secs(10), || line_count(&out) >= 2000),
        "{}",
        pair.receiver.log_text()
    );
    let log = pair.receiver.log_text();
    assert!(log.contains("the sender restarted: new session"), "{log}");
    assert_eq!(pair.receiver.metric("diode_records_lost_total", &[]), 0.0);
    assert_eq!(pair.receiver.metric("diode_sessions_total", &[]), 2.0);
    let records = &by_topic(&read_jsonl(&out))["historian/events"];
    assert_eq!(records[999], (999, "first 999".to_owned()));
    assert_eq!(records[1000], (0, "second 0".to_owned()));

    // The receiver crashes and comes back while the sender keeps going: it joins mid-stream and
    // does not call what went before lost.
    let sender_thread = std::thread::spawn(move || {
        let mut s = TcpStream::connect(tcp_addr).unwrap();
        for i in 0..300 {
            writeln!(s, "third {i}").unwrap();
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    std::thread::sleep(Duration::from_millis(800));
    pair.restart_receiver(true);
    sender_thread.join().unwrap();
    assert!(wait_for(Duration::from_secs(10), || {
        read_jsonl(&out)
            .last()
            .and_then(|l| l["payload"].as_str().map(str::to_owned))
            .as_deref()
            == Some("third 299")
    }));
    assert_eq!(pair.receiver.metric("diode_records_lost_total", &[]), 0.0);
    assert!(pair.receiver.log_text().contains("mid_stream=true"));
    pair.assert_one_way();
}

#[test]
fn a_bad_config_stops_the_service_naming_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    // The service's stderr, after checking it refused to start with status 2.
    let refused = |binary: &str, name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let output = std::process::Command::new(binary)
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2));
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let stderr = refused(
        SEND,
        "sender.toml",
        "[link]\ndestination = \"127.0.0.1:47000\"\nmtu_bytes = 1500\nrate_mbps = -4\n\n[[topic]]\nname = \"a\"\nsource = { kind = \"udp\", listen = \"127.0.0.1:0\" }\n",
    );
    assert!(
        stderr.contains("sender.toml:4: `link.rate_mbps`"),
        "{stderr}"
    );
    let stderr = refused(
        RECV,
        "receiver.toml",
        "[link]\nlisten = \"127.0.0.1:47000\"\nlisten_port = 3\n",
    );
    assert!(
        stderr.contains("receiver.toml:3:") && stderr.contains("listen_port"),
        "{stderr}"
    );
}

#[test]
fn the_documented_metrics_are_exported() {
    let (pair, udp, _) = udp_and_lines_pair(RelayConfig::default());
    send_udp(loopback(udp), (0..10).map(|i| vec![0xff, i]), 10);
    let out = pair.path("out/records.jsonl");
    assert!(wait_for(Duration::from_secs(10), || line_count(&out) >= 10));
    let sender = pair.sender.metrics_text();
    for name in [
        "diode_records_in_total{topic=\"line3/telemetry\"}",
        "diode_datagrams_sent_total",
        "diode_link_bytes_sent_total",
    ] {
        assert!(sender.contains(name), "sender lacks {name}:\n{sender}");
    }
    let receiver = pair.receiver.metrics_text();
    for name in [
        "diode_datagrams_received_total",
        "diode_datagrams_rejected_total{reason=\"crc\"}",
        "diode_datagrams_rejected_total{reason=\"malformed\"}",
        "diode_datagrams_rejected_total{reason=\"stale\"}",
        "diode_blocks_recovered_total",
        "diode_blocks_lost_total",
        "diode_records_out_total{topic=\"line3/telemetry\"}",
        "diode_records_lost_total{topic=\"line3/telemetry\"}",
        "diode_link_up 1",
    ] {
        assert!(
            receiver.contains(name),
            "receiver lacks {name}:\n{receiver}"
        );
    }
    // Binary payloads come out base64-encoded.
    let first = &read_jsonl(&out)[0];
    assert_eq!(first["payload_base64"], "/wA=");
}

#[test]
fn an_authenticated_encrypted_link_rejects_forgeries_and_loose_key_files() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("link.key");
    let output = std::process::Command::new(SEND)
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // A key file others can read is refused at start-up.
    let loose = dir.path().join("loose.key");
    std::fs::copy(&key, &loose).unwrap();
    std::fs::set_permissions(&loose, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let config = dir.path().join("loose.toml");
    std::fs::write(&config, "[link]\nlisten = \"127.0.0.1:0\"\nkey_file = \"loose.key\"\n[[route]]\ntopics = [\"#\"]\nsink = { kind = \"stdout\" }\n").unwrap();
    let output = std::process::Command::new(RECV)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("`link.key_file`") && stderr.contains("chmod 600"),
        "{stderr}"
    );

    // Encrypted as well (wire-format.md §4.4): records cross whole, forgeries still fail.
    let (pair, _, tcp) = udp_and_lines_pair_in(
        dir,
        "key_file = \"link.key\"\nencrypt = true",
        "key_file = \"link.key\"\nencrypt = true",
    );
    send_lines(loopback(tcp), (0..2000).map(|i| format!("event {i}")));

    // Forgeries with valid CRCs at the receiver's port: unauthenticated, and signed with another key.
    let noise = UdpSocket::bind("127.0.0.1:0").unwrap();
    for key in [None, Some(diode_wire::LinkKey::new(&[9u8; 32]))] {
        let now = std::time::Instant::now();
        let config = diode_wire::EncoderConfig {
            session_id: u64::MAX >> 1,
            session_start_time_us: 0,
            key,
            ..Default::default()
        };
        let mut forger = diode_wire::Encoder::new(config, now).unwrap();
        let topic = forger.add_topic("historian/events").unwrap();
        for i in 0..100 {
            forger
                .push(now, topic, 0, format!("forged {i}").into())
                .unwrap();
        }
        forger.finish(now, 0);
        while let Some(d) = forger.poll_transmit(now) {
            noise.send_to(&d, ("127.0.0.1", pair.link_port)).unwrap();
        }
    }
    let out = pair.path("out/records.jsonl");
    assert!(
        wait_for(Duration::from_secs(10), || line_count(&out) >= 2000),
        "{}",
        pair.receiver.log_text()
    );
    std::thread::sleep(Duration::from_millis(300));
    let records = &by_topic(&read_jsonl(&out))["historian/events"];
    assert_eq!(records.len(), 2000, "forged records were delivered");
    for (seq, payload) in records {
        assert_eq!(payload, &format!("event {seq}"));
    }
    assert!(
        pair.receiver
            .metric("diode_datagrams_rejected_total", &["reason=\"auth\""])
            >= 4.0
    );
    assert_eq!(
        pair.receiver.metric("diode_sessions_total", &[]),
        1.0,
        "a forger started a session"
    );
    pair.assert_one_way();
}

/// UDP sockets of a process as /proc/net/udp shows them: (local, remote, queued bytes).
fn udp_sockets_of(pid: u32) -> Vec<(SocketAddr, SocketAddr, u64)> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            l.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')
                .map(str::to_owned)
        })
        .collect();
    let addr = |hex: &str| -> SocketAddr {
        let (ip, port) = hex.split_once(':').unwrap();
        let ip = u32::from_str_radix(ip, 16).unwrap();
        SocketAddr::from((ip.to_le_bytes(), u16::from_str_radix(port, 16).unwrap()))
    };
    std::fs::read_to_string("/proc/net/udp")
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            inodes.contains(&f[9].to_owned()).then(|| {
                let rx = u64::from_str_radix(f[4].split(':').nth(1).unwrap(), 16).unwrap();
                (addr(f[1]), addr(f[2]), rx)
            })
        })
        .collect()
}

/// The sender's link socket only sends: it is connected to the destination, so nothing another
/// host on the OT network sends to it is ever queued (it was bound to 0.0.0.0 and unconnected).
#[test]
fn the_sender_link_socket_accepts_nothing() {
    let (pair, udp, _) = udp_and_lines_pair(RelayConfig::default());
    let pid = pair.sender.child.as_ref().unwrap().id();
    let destination = pair.relay.listen_addr;
    let mut link = Vec::new();
    assert!(wait_for(Duration::from_secs(10), || {
        link = udp_sockets_of(pid)
            .into_iter()
            .filter(|(local, _, _)| local.port() != udp)
            .collect();
        !link.is_empty()
    }));
    assert_eq!(link.len(), 1, "{link:?}");
    let (local, remote, _) = link[0];
    assert_eq!(remote, destination, "the link socket is not connected");
    let to = SocketAddr::from(([127, 0, 0, 1], local.port()));
    let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
    for _ in 0..100 {
        probe.send_to(&[0u8; 1000], to).unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    let queued: u64 = udp_sockets_of(pid)
        .iter()
        .filter(|(l, _, _)| l.port() == local.port())
        .map(|s| s.2)
        .sum();
    assert_eq!(queued, 0, "datagrams queued on the sender's link socket");
}

/// A pair on a link key made by `diode-send keygen`, the receiver with a state file and
/// `receiver_link` besides, the udp and lines topics; and the lines topic's TCP port.
fn authenticated_pair_with_state(receiver_link: &str) -> (Pair, u16) {
    let dir = tempfile::tempdir().unwrap();
    keygen(dir.path());
    let (pair, _, tcp) = udp_and_lines_pair_in(
        dir,
        "key_file = \"link.key\"",
        &format!("key_file = \"link.key\"\nstate_file = \"receiver.state\"\n{receiver_link}"),
    );
    (pair, tcp)
}

/// With a key and a state file, a receiver that restarts still refuses a replay: of an old
/// session, and of the current session's blocks it had already delivered (before, the restarted
/// receiver delivered them all again as new). `allowed_sources` drops anything not from the
/// diode's address before any check.
#[test]
fn replays_are_refused_across_a_receiver_restart() {
    let (mut pair, tcp) = authenticated_pair_with_state("allowed_sources = [\"127.0.0.1\"]");
    let out = pair.path("out/records.jsonl");
    pair.relay.start_capture();
    send_lines(loopback(tcp), (0..500).map(|i| format!("first {i}")));
    assert!(wait_for(Duration::from_secs(10), || line_count(&out) >= 500));
    let first_session = pair.relay.take_capture();
    pair.restart_sender(false);
    pair.relay.start_capture();
    send_lines(loopback(tcp), (0..500).map(|i| format!("second {i}")));
    assert!(wait_for(Duration::from_secs(10), || line_count(&out) >= 1000));
    std::thread::sleep(Duration::from_millis(1500));
    let second_session = pair.relay.take_capture();
    pair.sender.stop();
    pair.restart_receiver(false);
    assert!(wait_for(Duration::from_secs(5), || pair
        .receiver
        .log_text()
        .contains("replay floor restored")));
    pair.relay.inject(&first_session);
    pair.relay.inject(&second_session);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        line_count(&out),
        1000,
        "a replayed record was delivered again"
    );
    assert!(
        pair.receiver
            .metric("diode_datagrams_rejected_total", &["reason=\"replay\""])
            > 0.0
    );

    // Another host on the IT side, even with genuine datagrams, is not the diode.
    let stranger = UdpSocket::bind("127.0.0.2:0").unwrap();
    let strays = second_session.len().min(50);
    assert!(strays > 10);
    for d in &second_session[..strays] {
        stranger.send_to(d, loopback(pair.link_port)).unwrap();
    }
    assert!(
        wait_for(Duration::from_secs(5), || pair
            .receiver
            .metric("diode_datagrams_rejected_total", &["reason=\"source\""])
            == strays as f64),
        "{}",
        pair.receiver.metrics_text()
    );
    pair.assert_one_way();
}

/// The new-user issue's finding: records sent while the receiver was down were missing from the
/// file with `diode_records_lost_total` at 0 and nothing logged. With a state file, the restarted
/// receiver reports exactly the records it missed, with their range.
#[test]
fn records_sent_while_the_receiver_was_down_are_reported_lost() {
    let (mut pair, tcp) = authenticated_pair_with_state("");
    let out = pair.path("out/records.jsonl");
    send_lines(loopback(tcp), (0..500).map(|i| format!("before {i}")));
    assert!(wait_for(Duration::from_secs(10), || line_count(&out) >= 500));
    pair.stop_receiver(false);
    send_lines(loopback(tcp), (0..300).map(|i| format!("while down {i}")));
    // Sent: the sender's own count of records taken in says so.
    assert!(wait_for(Duration::from_secs(10), || pair.sender.metric(
        "diode_records_in_total",
        &["topic=\"historian/events\""]
    ) >= 800.0));
    std::thread::sleep(Duration::from_millis(300));
    pair.start_receiver();
    send_lines(loopback(tcp), (0..200).map(|i| format!("after {i}")));
    assert!(wait_for(Duration::from_secs(10), || line_count(&out) >= 700));
    let lost = "topic=\"historian/events\"";
    assert!(
        wait_for(Duration::from_secs(5), || pair
            .receiver
            .metric("diode_records_lost_total", &[lost])
            == 300.0),
        "{}",
        pair.receiver.metrics_text()
    );
    let log = pair.receiver.log_text();
    assert!(
        log.contains("records lost beyond repair")
            && log.contains("first_seq=500")
            && log.contains("last_seq=799"),
        "{log}"
    );
    let seqs: Vec<u64> = read_jsonl(&out)
        .iter()
        .filter(|r| r["topic"] == "historian/events")
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (0..500).chain(800..1000).collect::<Vec<_>>());
    // One sender session throughout, and every record says which: what makes (topic, seq) unique.
    let sessions: std::collections::BTreeSet<String> = read_jsonl(&out)
        .iter()
        .map(|r| r["session"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    pair.assert_one_way();
}

/// The protection issue's case: telemetry at 2,500 small records a second over 3 % random loss
/// with bursts of 6, reordering and duplicates. Under the proportional parity of old its one-shard
/// blocks (one parity shard) lost whole blocks of records; with the parity plan at that design
/// point every record arrives, in order, once.
#[test]
fn small_blocks_ride_through_random_loss_and_bursts_at_the_design_point() {
    let udp = free_port();
    let relay = RelayConfig {
        impairments: Impairments {
            drop_rate: 0.03,
            burst_rate: 0.002,
            burst_len: 6,
            reorder_rate: 0.02,
            reorder_distance: 4,
            duplicate_rate: 0.01,
            ..Impairments::default()
        },
        seed: 11,
    };
    let pair = Pair::start_with(
        relay,
        &format!(
            "[[topic]]\nname = \"line3/telemetry\"\nsource = {{ kind = \"udp\", listen = \"127.0.0.1:{udp}\" }}\n"
        ),
        FILE_ROUTE,
        tempfile::tempdir().unwrap(),
        "design_loss_percent = 3\ndesign_burst_datagrams = 6",
        "",
    );
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let started = std::time::Instant::now();
    for i in 0..5000u64 {
        let due = started + Duration::from_micros(i * 400);
        if let Some(pause) = due.checked_duration_since(std::time::Instant::now()) {
            std::thread::sleep(pause);
        }
        socket
            .send_to(format!("t {i}").as_bytes(), loopback(udp))
            .unwrap();
    }
    let out = pair.path("out/records.jsonl");
    assert!(
        wait_for(Duration::from_secs(15), || line_count(&out) >= 5000),
        "{} of 5000 delivered; lost {}; receiver log:\n{}",
        line_count(&out),
        pair.receiver.metric("diode_records_lost_total", &[]),
        pair.receiver.log_text()
    );
    let records = &by_topic(&read_jsonl(&out))["line3/telemetry"];
    let expected: Vec<(u64, String)> = (0..5000).map(|i| (i, format!("t {i}"))).collect();
    assert_eq!(records, &expected);
    assert_eq!(pair.receiver.metric("diode_records_lost_total", &[]), 0.0);
    assert!(pair.receiver.metric("diode_blocks_recovered_total", &[]) > 10.0);
    pair.assert_one_way();
}

/// Listening sources take data only from their allowed peers: an HTTP request to the historian's
/// port once became five historian records.
#[test]
fn listening_sources_refuse_peers_not_allowed() {
    let (udp, tcp) = (free_port(), free_port());
    let topics = format!(
        "[[topic]]\nname = \"line3/telemetry\"\nsource = {{ kind = \"udp\", listen = \"127.0.0.1:{udp}\", allowed_peers = [\"127.0.0.2\"] }}\n\n[[topic]]\nname = \"historian/events\"\nsource = {{ kind = \"tcp\", listen = \"127.0.0.1:{tcp}\", framing = \"lines\", allowed_peers = [\"127.0.0.2\"] }}\n"
    );
    let pair = Pair::start(RelayConfig::default(), &topics, FILE_ROUTE);
    // Not allowed: from 127.0.0.1.
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .send_to(b"stranger", loopback(udp))
        .unwrap();
    {
        let mut s = TcpStream::connect(loopback(tcp)).unwrap();
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: historian\r\n\r\n");
    }
    // Allowed: from 127.0.0.2.
    UdpSocket::bind("127.0.0.2:0")
        .unwrap()
        .send_to(b"plc", loopback(udp))
        .unwrap();
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 2], 0)).into())
        .unwrap();
    socket.connect(&loopback(tcp).into()).unwrap();
    let mut allowed: TcpStream = socket.into();
    allowed.write_all(b"historian line\n").unwrap();
    drop(allowed);
    let out = pair.path("out/records.jsonl");
    assert!(wait_for(Duration::from_secs(10), || line_count(&out) >= 2));
    std::thread::sleep(Duration::from_millis(500));
    let records = by_topic(&read_jsonl(&out));
    assert_eq!(records["line3/telemetry"], vec![(0, "plc".to_owned())]);
    assert_eq!(
        records["historian/events"],
        vec![(0, "historian line".to_owned())]
    );
    assert_eq!(
        pair.sender
            .metric("diode_source_errors_total", &["reason=\"peer\""]),
        2.0
    );
}

/// docs/metrics.md lists every metric: what either service exposes is in its table, and what the
/// table lists is registered by a service (families with labels appear only once sampled, so
/// that direction is checked against the registrations in the sources).
#[test]
fn every_metric_is_documented_and_every_documented_metric_exists() {
    let root = env!("CARGO_MANIFEST_DIR");
    let doc = std::fs::read_to_string(format!("{root}/docs/metrics.md")).unwrap();
    let documented: std::collections::BTreeSet<String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_owned)
        .collect();
    let (pair, udp, _) = udp_and_lines_pair(RelayConfig::default());
    send_udp(loopback(udp), (0..10).map(|i| vec![b'x', i]), 10);
    let out = pair.path("out/records.jsonl");
    assert!(wait_for(Duration::from_secs(10), || line_count(&out) >= 10));
    for text in [pair.sender.metrics_text(), pair.receiver.metrics_text()] {
        for family in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
            let (name, kind) = family.split_once(' ').unwrap();
            let exposed = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            };
            assert!(
                documented.contains(&exposed),
                "{exposed} is exposed but not in docs/metrics.md"
            );
        }
    }
    let mut registered = String::new();
    for file in [
        "crates/diode-sender/src/metrics.rs",
        "crates/diode-receiver/src/metrics.rs",
    ] {
        registered += &std::fs::read_to_string(format!("{root}/{file}")).unwrap();
    }
    for name in &documented {
        let family = name.strip_suffix("_total").unwrap_or(name);
        assert!(
            registered.contains(&format!("\"{family}\"")),
            "docs/metrics.md lists {name}, which no service registers"
        );
    }
    assert!(documented.len() >= 40);
}
