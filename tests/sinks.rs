//! The IT sinks against real peers (mosquitto and mosquitto_sub, a syslog socket, files), and the
//! disk buffers that keep records while a sink is down or the receiver restarts.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::peers::{require, Mosquitto};
use common::*;
use diode_gateway::relay::RelayConfig;

fn udp_topic(name: &str, port: u16) -> String {
    format!(
        "[[topic]]\nname = \"{name}\"\nsource = {{ kind = \"udp\", listen = \"127.0.0.1:{port}\" }}\n"
    )
}

/// A consumer process, killed however the test ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Numbers seen in first-arrival order, and how many arrived more than once.
fn first_arrivals(values: impl IntoIterator<Item = u64>) -> (Vec<u64>, usize) {
    let mut seen = std::collections::HashSet::new();
    let mut order = Vec::new();
    let mut again = 0;
    for v in values {
        if seen.insert(v) {
            order.push(v);
        } else {
            again += 1;
        }
    }
    (order, again)
}

#[test]
fn mqtt_sink_keeps_every_record_through_a_ten_second_broker_outage() {
    let sub = require("mosquitto_sub", "apt-get install mosquitto-clients");
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Mosquitto::start(dir.path(), free_port());
    // The consumer keeps a persistent session too, so it misses nothing across the restart.
    let mut consumer = KillOnDrop(
        Command::new(sub)
            .args(["-h", "127.0.0.1", "-p", &broker.port.to_string()])
            .args(["-t", "ot/#", "-q", "1", "-v", "-c", "-i", "it-analytics"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let received = Arc::new(Mutex::new(Vec::<String>::new()));
    {
        let received = received.clone();
        let stdout = consumer.0.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                received.lock().unwrap().push(line);
            }
        });
    }
    let source_port = free_port();
    let routes = format!(
        r#"[[route]]
name = "it-broker"
topics = ["plant/#"]
sink = {{ kind = "mqtt", broker = "127.0.0.1:{}", topic_prefix = "ot/", qos = 1, client_id = "diode-recv-test" }}
buffer_dir = "buffer/it-broker"
"#,
        broker.port
    );
    let pair = Pair::start_with(
        RelayConfig::default(),
        &udp_topic("plant/line3", source_port),
        &routes,
        dir,
        "",
        "",
    );
    std::thread::sleep(Duration::from_millis(500));
    let source = loopback(source_port);
    let total = 10_000u64;
    let sender = std::thread::spawn(move || {
        for chunk in 0..20 {
            let payloads = (chunk * 500..(chunk + 1) * 500).map(|n| format!("n={n}").into_bytes());
            send_udp(source, payloads, 50);
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    std::thread::sleep(Duration::from_secs(1));
    broker.stop();
    let backlog = |pair: &Pair| {
        pair.receiver
            .metric("diode_sink_backlog_bytes", &["route=\"it-broker\""])
    };
    sender.join().unwrap();
    let buffered = backlog(&pair);
    std::thread::sleep(Duration::from_secs(8));
    broker.restart(Duration::ZERO);
    let complete = wait_for(Duration::from_secs(60), || {
        received.lock().unwrap().len() as u64 >= total && backlog(&pair) == 0.0
    });
    std::thread::sleep(Duration::from_millis(500));
    let lines = received.lock().unwrap().clone();
    let numbers = lines.iter().map(|l| {
        let (topic, payload) = l.split_once(' ').unwrap();
        assert_eq!(topic, "ot/plant/line3");
        payload.strip_prefix("n=").unwrap().parse::<u64>().unwrap()
    });
    let (order, again) = first_arrivals(numbers);
    assert!(
        complete && order.len() as u64 == total,
        "{} of {total} records reached the consumer; receiver log:\n{}",
        order.len(),
        pair.receiver.log_text()
    );
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(order, sorted, "out of order");
    assert!(buffered > 0.0, "the outage never reached the disk buffer");
    assert_eq!(pair.receiver.metric("diode_sink_dropped_total", &[]), 0.0);
    println!("mqtt sink: {total} records, {again} sent twice after the outage, {buffered} bytes buffered");
    drop(consumer);
    pair.assert_one_way();
}

#[test]
fn a_buffered_route_replays_after_a_receiver_restart() {
    let target_port = free_port();
    let source_port = free_port();
    let routes = format!(
        r##"[[route]]
name = "historian"
topics = ["#"]
sink = {{ kind = "tcp", connect = "127.0.0.1:{target_port}", framing = "lines" }}
buffer_dir = "buffer/historian"
buffer_max_bytes = 16777216
"##
    );
    let mut pair = Pair::start(
        RelayConfig::default(),
        &udp_topic("historian/events", source_port),
        &routes,
    );
    let source = loopback(source_port);
    // The historian is down: everything goes to disk.
    send_udp(
        source,
        (0..3000).map(|n| format!("event {n}").into_bytes()),
        100,
    );
    assert!(wait_for(Duration::from_secs(10), || pair
        .receiver
        .metric("diode_records_out_total", &[])
        == 3000.0));
    pair.restart_receiver(false);
    send_udp(
        source,
        (3000..4000).map(|n| format!("event {n}").into_bytes()),
        100,
    );
    // The operator sees the sink down: the gauge, and on the status page since when and why.
    let sink_up = |pair: &Pair| {
        pair.receiver
            .metric("diode_sink_up", &["route=\"historian\""])
    };
    let sink_state = |pair: &Pair| {
        let status: serde_json::Value =
            serde_json::from_str(&http_get(pair.receiver.metrics, "/status.json")).unwrap();
        let row = status["notes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["title"] == "Routes and their sinks")
            .and_then(|t| t["rows"].as_array().unwrap().first().cloned())
            .unwrap();
        let text = |i: usize| row[i].as_str().unwrap().to_owned();
        (text(4), text(5))
    };
    assert!(wait_for(Duration::from_secs(10), || sink_up(&pair) == 0.0
        && sink_state(&pair).0.starts_with("failing since")));
    let (_, last_error) = sink_state(&pair);
    assert!(
        last_error.contains(&format!("cannot connect to 127.0.0.1:{target_port}")),
        "{last_error}"
    );
    // Now the historian comes up and gets everything, in order.
    let listener = TcpListener::bind(("127.0.0.1", target_port)).unwrap();
    let (mut conn, _) = listener.accept().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut text = String::new();
    let mut buf = [0u8; 65536];
    while text.lines().count() < 4000 {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => text.push_str(std::str::from_utf8(&buf[..n]).unwrap()),
        }
    }
    let numbers = text
        .lines()
        .map(|l| l.strip_prefix("event ").unwrap().parse::<u64>().unwrap());
    let (order, again) = first_arrivals(numbers);
    assert_eq!(order, (0..4000).collect::<Vec<_>>(), "{again} repeated");
    assert!(wait_for(Duration::from_secs(5), || sink_up(&pair) == 1.0
        && sink_state(&pair).0.starts_with("delivering since")));
    assert!(pair
        .receiver
        .log_text()
        .contains("replaying what the disk buffer kept"));
    pair.assert_one_way();
}

#[test]
fn syslog_sink_frames_rfc5424_with_octet_counting() {
    let siem = TcpListener::bind("127.0.0.1:0").unwrap();
    let siem_addr = siem.local_addr().unwrap();
    let source_port = free_port();
    let routes = format!(
        "[[route]]\ntopics = [\"security/#\"]\nsink = {{ kind = \"syslog\", target = \"{siem_addr}\", protocol = \"tcp\" }}\n"
    );
    let pair = Pair::start(
        RelayConfig::default(),
        &udp_topic("security/door", source_port),
        &routes,
    );
    let source = loopback(source_port);
    send_udp(
        source,
        (0..20).map(|n| format!("door {n} opened").into_bytes()),
        100,
    );
    let (mut conn, _) = siem.accept().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut stream = Vec::new();
    let mut buf = [0u8; 4096];
    let mut messages = Vec::new();
    while messages.len() < 20 {
        let n = conn.read(&mut buf).unwrap();
        assert!(n > 0, "the sink closed the connection");
        stream.extend_from_slice(&buf[..n]);
        // Octet counting: "LEN SP MSG", LEN the exact byte length of MSG.
        while let Some(space) = stream.iter().position(|&b| b == b' ') {
            let len: usize = std::str::from_utf8(&stream[..space])
                .unwrap()
                .parse()
                .unwrap();
            if stream.len() < space + 1 + len {
                break;
            }
            messages.push(String::from_utf8(stream[space + 1..space + 1 + len].to_vec()).unwrap());
            stream.drain(..space + 1 + len);
        }
    }
    for (n, message) in messages.iter().enumerate() {
        assert!(message.starts_with("<133>1 "), "{message}");
        let fields: Vec<&str> = message.splitn(7, ' ').collect();
        assert!(fields[1].ends_with('Z'), "timestamp {message}");
        assert_eq!(fields[3], "diode");
        let (sd, text) = message.split_once("\"] ").expect("structured data");
        assert_eq!(text, format!("door {n} opened"), "{message}");
        let (ids, session) = sd.split_once(" session=\"").expect("the session");
        assert!(
            ids.ends_with(&format!("[diode@32473 topic=\"security/door\" seq=\"{n}\"")),
            "{message}"
        );
        assert!(
            session.len() == 16 && session.chars().all(|c| c.is_ascii_hexdigit()),
            "{message}"
        );
    }
    pair.assert_one_way();
}

#[test]
fn file_sink_rotates_and_raw_mode_is_byte_exact() {
    let source_port = free_port();
    let routes = "[[route]]\ntopics = [\"#\"]\nsink = { kind = \"file\", path = \"raw/stream.bin\", format = \"raw\", rotate_bytes = 4096 }\n";
    let pair = Pair::start(
        RelayConfig::default(),
        &udp_topic("files/stream", source_port),
        routes,
    );
    let source = loopback(source_port);
    let payloads: Vec<Vec<u8>> = (0..400u32)
        .map(|n| (0..100).map(|i| (n * 7 + i) as u8).collect())
        .collect();
    // Slowly enough that deliveries are many, so rotation has places to cut.
    for chunk in payloads.chunks(20) {
        send_udp(source, chunk.to_vec(), 100);
        std::thread::sleep(Duration::from_millis(30));
    }
    let dir = pair.path("raw");
    let total = || -> u64 {
        std::fs::read_dir(&dir)
            .map(|d| {
                d.filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    };
    assert!(
        wait_for(Duration::from_secs(10), || total() == 40_000),
        "{} bytes",
        total()
    );
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(files.len() >= 5, "rotated into {} files", files.len());
    // Rotated files carry the time they were closed; the live file comes last.
    files.sort();
    let live = dir.join("stream.bin");
    files.retain(|f| f != &live);
    files.push(live);
    let joined: Vec<u8> = files
        .iter()
        .flat_map(|f| std::fs::read(f).unwrap())
        .collect();
    assert_eq!(joined, payloads.concat());
    for f in &files[..files.len() - 1] {
        let len = std::fs::metadata(f).unwrap().len();
        assert!(len >= 4096, "{} rotated at {len} bytes", f.display());
    }
}

/// Everything a consumer printed, once it has exited.
fn stdout_of(consumer: &mut KillOnDrop) -> String {
    let mut text = String::new();
    let _ = consumer.0.stdout.take().unwrap().read_to_string(&mut text);
    let _ = consumer.0.wait();
    text
}

/// Raw MQTT 3.1.1 packets, for clients that misbehave on purpose.
fn mqtt_packet(packet: rumqttc::mqttbytes::v4::Packet) -> Vec<u8> {
    let mut out = bytes::BytesMut::new();
    packet.write(&mut out, usize::MAX).unwrap();
    out.to_vec()
}

fn mqtt_connect(client_id: &str, login: Option<(&str, &str)>) -> Vec<u8> {
    let mut connect = rumqttc::mqttbytes::v4::Connect::new(client_id);
    if let Some((user, password)) = login {
        connect.set_login(user, password);
    }
    mqtt_packet(rumqttc::mqttbytes::v4::Packet::Connect(connect))
}

/// The probe's findings against the embedded broker (rumqttd then): any client could publish
/// into `ot/...`, retained forgeries were served to every new subscriber, a wrong password got
/// in, a CONNECT-reset-CONNECT sequence panicked it for good, and subscribers that do not read
/// grew the receiver without bound.
#[test]
fn the_embedded_broker_is_read_only_authenticated_and_bounded() {
    use std::io::Write;
    use std::net::TcpStream;
    let sub = require("mosquitto_sub", "apt-get install mosquitto-clients");
    let publish = require("mosquitto_pub", "apt-get install mosquitto-clients");
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("broker.password");
    std::fs::write(&password, "it-side secret\n").unwrap();
    std::fs::set_permissions(
        &password,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let broker_port = free_port();
    let source_port = free_port();
    let routes = format!(
        "[[route]]\ntopics = [\"#\"]\nsink = {{ kind = \"mqtt_broker\", listen = \"127.0.0.1:{broker_port}\", topic_prefix = \"ot/\", username = \"scada\", password_file = \"broker.password\", max_connections = 40, client_queue_bytes = 1048576 }}\n"
    );
    let topics = format!(
        "[[topic]]\nname = \"plant/line1\"\nsource = {{ kind = \"tcp\", listen = \"127.0.0.1:{source_port}\", framing = \"lines\" }}\n"
    );
    let pair = Pair::start_with(RelayConfig::default(), &topics, &routes, dir, "", "");
    let port = broker_port.to_string();
    let login = ["-u", "scada", "-P", "it-side secret"];
    let subscriber = |count: &str| {
        KillOnDrop(
            Command::new(&sub)
                .args(["-h", "127.0.0.1", "-p", &port])
                .args(login)
                .args(["-t", "ot/#", "-v", "-C", count, "-W", "30"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        )
    };
    // A wrong password is refused.
    let refused = Command::new(&sub)
        .args(["-h", "127.0.0.1", "-p", &port, "-u", "scada", "-P", "guess"])
        .args(["-t", "ot/#", "-C", "1", "-W", "5"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let mut good = subscriber("3");
    std::thread::sleep(Duration::from_millis(500));
    // Publishing, retained or not, even with the right login, is refused: nothing forged
    // reaches the subscriber, nor a later one.
    for retain in [false, true] {
        let mut forge = Command::new(&publish);
        forge
            .args(["-h", "127.0.0.1", "-p", &port])
            .args(login)
            .args(["-t", "ot/plant/line1", "-m", "forged", "-q", "1"]);
        if retain {
            forge.arg("-r");
        }
        let _ = forge.output().unwrap();
    }
    // CONNECT, reset, CONNECT with the same client id (it panicked rumqttd), then a storm of
    // subscribers that never read while large records flow.
    for _ in 0..2 {
        let mut raw = TcpStream::connect(("127.0.0.1", broker_port)).unwrap();
        raw.write_all(&mqtt_connect(
            "diode-recv",
            Some(("scada", "it-side secret")),
        ))
        .unwrap();
        let _ = socket2::SockRef::from(&raw).set_linger(Some(Duration::ZERO));
    }
    let mut stalled = Vec::new();
    for i in 0..30 {
        let mut raw = TcpStream::connect(("127.0.0.1", broker_port)).unwrap();
        raw.write_all(&mqtt_connect(
            &format!("stall{i}"),
            Some(("scada", "it-side secret")),
        ))
        .unwrap();
        raw.write_all(&mqtt_packet(rumqttc::mqttbytes::v4::Packet::Subscribe(
            rumqttc::mqttbytes::v4::Subscribe::new("#", rumqttc::mqttbytes::QoS::AtMostOnce),
        )))
        .unwrap();
        let _ = socket2::SockRef::from(&raw).set_recv_buffer_size(4096);
        stalled.push(raw);
    }
    std::thread::sleep(Duration::from_millis(500));
    let receiver_pid = pair.receiver.child.as_ref().unwrap().id();
    let rss = || {
        std::fs::read_to_string(format!("/proc/{receiver_pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap()
            >> 10
    };
    let before = rss();
    let mut source = TcpStream::connect(("127.0.0.1", source_port)).unwrap();
    let big = "x".repeat(500_000);
    for i in 0..40 {
        writeln!(source, "{i} {big}").unwrap();
    }
    writeln!(source, "last").unwrap();
    drop(source);
    let mut good_again = subscriber("1");
    std::thread::sleep(Duration::from_secs(3));
    let grown = rss().saturating_sub(before);
    assert!(
        grown < 120,
        "30 stalled subscribers and 20 MB of records: {grown} MiB more"
    );
    drop(stalled);
    // The broker still serves: the first subscriber saw only genuine records.
    let text = stdout_of(&mut good);
    assert!(!text.contains("forged"), "{text}");
    assert!(
        text.lines().all(|l| l.starts_with("ot/plant/line1 ")),
        "{}",
        &text[..text.len().min(300)]
    );
    // A new subscriber gets what is published once its subscription is in (QoS 0, nothing
    // kept): offer the record until it has taken one.
    let mut fresh = subscriber("1");
    let mut source = TcpStream::connect(("127.0.0.1", source_port)).unwrap();
    let offered_until = std::time::Instant::now() + Duration::from_secs(15);
    while fresh.0.try_wait().unwrap().is_none() && std::time::Instant::now() < offered_until {
        writeln!(source, "after the storm").unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(source);
    assert_eq!(
        stdout_of(&mut fresh).trim(),
        "ot/plant/line1 after the storm",
        "receiver log:\n{}",
        pair.receiver.log_text()
    );
    let _ = good_again.0.kill();
    assert!(pair.receiver.log_text().contains("read-only for clients"));
    pair.assert_one_way();
}

#[test]
fn the_embedded_broker_serves_records_to_mqtt_clients() {
    let sub = require("mosquitto_sub", "apt-get install mosquitto-clients");
    let broker_port = free_port();
    let source_port = free_port();
    let routes = format!(
        "[[route]]\ntopics = [\"#\"]\nsink = {{ kind = \"mqtt_broker\", listen = \"127.0.0.1:{broker_port}\", topic_prefix = \"ot/\" }}\n"
    );
    let pair = Pair::start(
        RelayConfig::default(),
        &udp_topic("plant/line1", source_port),
        &routes,
    );
    let mut consumer = KillOnDrop(
        Command::new(sub)
            .args(["-h", "127.0.0.1", "-p", &broker_port.to_string()])
            .args(["-t", "ot/#", "-q", "1", "-v", "-C", "500", "-W", "30"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_secs(1));
    let source = loopback(source_port);
    send_udp(source, (0..500).map(|n| format!("v={n}").into_bytes()), 50);
    let stdout = consumer.0.stdout.take().unwrap();
    let lines: Vec<String> = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .take(500)
        .collect();
    let expected: Vec<String> = (0..500).map(|n| format!("ot/plant/line1 v={n}")).collect();
    assert_eq!(
        lines,
        expected,
        "receiver log:\n{}",
        pair.receiver.log_text()
    );
    pair.assert_one_way();
}

#[test]
fn kafka_sink_produces_keyed_ordered_records_an_independent_client_reads() {
    let broker = common::peers::Tansu::start(free_port());
    let (a, b) = (free_port(), free_port());
    let topics = format!(
        "{}{}",
        udp_topic("line3/plc7", a),
        udp_topic("line3/plc8", b)
    );
    let routes = format!(
        r#"[[route]]
name = "kafka"
topics = ["line3/#"]
sink = {{ kind = "kafka", brokers = ["127.0.0.1:{}"], topic = "ot.{{topic}}" }}
buffer_dir = "buffer/kafka"
"#,
        broker.port
    );
    let pair = Pair::start(RelayConfig::default(), &topics, &routes);
    for (port, device) in [(a, "plc7"), (b, "plc8")] {
        let source = loopback(port);
        send_udp(
            source,
            (0..1000).map(|n| format!("{device} {n}").into_bytes()),
            100,
        );
    }
    assert!(
        wait_for(Duration::from_secs(30), || pair
            .receiver
            .metric("diode_sink_delivered_total", &["route=\"kafka\""])
            >= 2000.0),
        "receiver log:\n{}",
        pair.receiver.log_text()
    );
    for device in ["plc7", "plc8"] {
        let messages = broker.consume(&format!("ot.line3.{device}"), 1000);
        assert_eq!(messages.len(), 1000, "{device}");
        for (n, m) in messages.iter().enumerate() {
            assert_eq!(m["key"], format!("line3/{device}"));
            assert_eq!(m["value"], format!("{device} {n}"), "in order");
            assert_eq!(m["headers"]["diode-seq"], n.to_string());
            assert!(
                m["headers"]["diode-time-us"]
                    .as_str()
                    .unwrap()
                    .parse::<i64>()
                    .unwrap()
                    > 0
            );
        }
    }
    pair.assert_one_way();
}

#[test]
fn mqtt_over_tls_with_client_certificates_and_passwords_both_ways() {
    let sub = require("mosquitto_sub", "apt-get install mosquitto-clients");
    let dir = tempfile::tempdir().unwrap();
    let pki = common::peers::Pki::generate(dir.path());
    let broker = Mosquitto::start_secure(dir.path(), free_port(), &pki, "diode", "s3cret pass");
    std::fs::write(dir.path().join("mqtt.pass"), "s3cret pass\n").unwrap();
    // A password file others can read is refused, like a key file.
    std::fs::set_permissions(
        dir.path().join("mqtt.pass"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let tls = format!(
        "tls = {{ ca_file = \"{}\", cert_file = \"{}\", key_file = \"{}\" }}",
        pki.ca.display(),
        pki.client_cert.display(),
        pki.client_key.display()
    );
    // The same broker stands for the plant's (source) and the IT side's (sink).
    let topics = format!(
        "[[topic]]\nname = \"plant/mqtt\"\nsource = {{ kind = \"mqtt\", broker = \"127.0.0.1:{}\", subscribe = [\"plant/#\"], qos = 1, client_id = \"diode-send-tls\", username = \"diode\", password_file = \"mqtt.pass\", {tls} }}\n",
        broker.port
    );
    let routes = format!(
        "[[route]]\ntopics = [\"plant/#\"]\nsink = {{ kind = \"mqtt\", broker = \"127.0.0.1:{}\", topic_prefix = \"it/\", qos = 1, client_id = \"diode-recv-tls\", username = \"diode\", password = \"s3cret pass\", {tls} }}\n",
        broker.port
    );
    let pair = Pair::start_with(RelayConfig::default(), &topics, &routes, dir, "", "");
    assert!(
        wait_for(Duration::from_secs(20), || pair
            .sender
            .metric("diode_source_connections", &["topic=\"plant/mqtt\""])
            == 1.0),
        "{}",
        pair.sender.log_text()
    );
    let mut consumer = KillOnDrop(
        Command::new(sub)
            .args(["-h", "127.0.0.1", "-p", &broker.port.to_string()])
            .args(&broker.client_args)
            .args(["-t", "it/#", "-q", "1", "-v", "-C", "200", "-W", "30"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // mosquitto_sub says nothing when it has subscribed: give it a moment.
    std::thread::sleep(Duration::from_secs(1));
    let lines: Vec<String> = (0..200).map(|n| format!("reading {n}")).collect();
    broker.publish_lines("plant/line1/temp", 1, &lines);
    let stdout = consumer.0.stdout.take().unwrap();
    let got: Vec<String> = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .collect();
    let expected: Vec<String> = lines
        .iter()
        .map(|l| format!("it/plant/line1/temp {l}"))
        .collect();
    assert_eq!(
        got,
        expected,
        "sender log:\n{}\nreceiver log:\n{}",
        pair.sender.log_text(),
        pair.receiver.log_text()
    );
    pair.assert_one_way();
}

#[test]
fn syslog_sink_over_udp_sends_one_message_a_datagram() {
    let siem = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    siem.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let source_port = free_port();
    let routes = format!(
        "[[route]]\ntopics = [\"#\"]\nsink = {{ kind = \"syslog\", target = \"{}\", protocol = \"udp\" }}\n",
        siem.local_addr().unwrap()
    );
    let pair = Pair::start(
        RelayConfig::default(),
        &udp_topic("security/fw", source_port),
        &routes,
    );
    let source = loopback(source_port);
    send_udp(
        source,
        (0..5).map(|n| format!("deny {n}").into_bytes()),
        100,
    );
    let mut buf = [0u8; 2048];
    for n in 0..5 {
        let len = siem.recv(&mut buf).expect("a syslog datagram");
        let message = std::str::from_utf8(&buf[..len]).unwrap();
        assert!(message.starts_with("<133>1 "), "{message}");
        assert!(
            message.contains(&format!("seq=\"{n}\" session=\""))
                && message.ends_with(&format!("\"] deny {n}")),
            "{message}"
        );
    }
    pair.assert_one_way();
}

/// One record a sink can never accept (here a 70 KB line for a UDP sink) used to fail its batch
/// forever and block the route. It goes to the route's dead-letter file, counted, and the records
/// after it are delivered.
#[test]
fn a_record_the_sink_can_never_accept_is_set_aside_and_the_route_goes_on() {
    let target = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    target
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let source = free_port();
    let topics = format!(
        "[[topic]]\nname = \"historian/events\"\nsource = {{ kind = \"tcp\", listen = \"127.0.0.1:{source}\", framing = \"lines\" }}\n"
    );
    let routes = format!(
        "[[route]]\nname = \"udp-out\"\ntopics = [\"#\"]\nsink = {{ kind = \"udp\", target = \"{}\" }}\ndead_letter_file = \"dead/udp-out.jsonl\"\n",
        target.local_addr().unwrap()
    );
    let pair = Pair::start(RelayConfig::default(), &topics, &routes);
    let mut lines: Vec<String> = (0..5).map(|i| format!("before {i}")).collect();
    lines.push("x".repeat(70_000));
    lines.extend((0..5).map(|i| format!("after {i}")));
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", source)).unwrap();
        for line in &lines {
            writeln!(s, "{line}").unwrap();
        }
    }
    let mut got = Vec::new();
    let mut buf = vec![0u8; 70_000];
    while got.len() < 10 {
        let n = target
            .recv(&mut buf)
            .expect("records after the bad one arrive");
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    let mut expected: Vec<String> = (0..5).map(|i| format!("before {i}")).collect();
    expected.extend((0..5).map(|i| format!("after {i}")));
    assert_eq!(got, expected);
    let dead = read_jsonl(&pair.path("dead/udp-out.jsonl"));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["seq"], 5);
    assert!(dead[0]["reason"].as_str().unwrap().contains("UDP"));
    assert_eq!(
        pair.receiver
            .metric("diode_sink_dead_letters_total", &["route=\"udp-out\""]),
        1.0
    );
    pair.assert_one_way();
}

/// The embedded broker over TLS: an IT client checks it against the CA and logs in; a client
/// that does not speak TLS gets nothing.
#[test]
fn the_embedded_broker_serves_over_tls_only_when_asked() {
    use std::io::{Read as _, Write};
    let sub = require("mosquitto_sub", "apt-get install mosquitto-clients");
    let dir = tempfile::tempdir().unwrap();
    let pki = common::peers::Pki::generate(dir.path());
    // The broker's private key is a secret: refused unless only its owner can read it.
    std::fs::set_permissions(
        &pki.server_key,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let broker_port = free_port();
    let source_port = free_port();
    let routes = format!(
        "[[route]]\ntopics = [\"#\"]\nsink = {{ kind = \"mqtt_broker\", listen = \"127.0.0.1:{broker_port}\", topic_prefix = \"ot/\", tls = {{ cert_file = \"{}\", key_file = \"{}\" }} }}\n",
        pki.server_cert.display(),
        pki.server_key.display()
    );
    let pair = Pair::start_with(
        RelayConfig::default(),
        &udp_topic("plant/line1", source_port),
        &routes,
        dir,
        "",
        "",
    );
    let mut consumer = KillOnDrop(
        Command::new(sub)
            .args(["-h", "127.0.0.1", "-p", &broker_port.to_string()])
            .arg("--cafile")
            .arg(&pki.ca)
            .args(["-t", "ot/#", "-v", "-C", "3", "-W", "20"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Plain MQTT to a TLS listener: the handshake fails and nothing is served.
    let mut plain = std::net::TcpStream::connect(("127.0.0.1", broker_port)).unwrap();
    plain.write_all(&mqtt_connect("plain", None)).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut reply = [0u8; 4];
    let got = plain.read(&mut reply).unwrap_or(0);
    assert!(got == 0 || reply[0] != 0x20, "a CONNACK over plain TCP");
    std::thread::sleep(Duration::from_secs(1));
    send_udp(
        loopback(source_port),
        (0..3).map(|n| format!("v={n}").into_bytes()),
        3,
    );
    let text = stdout_of(&mut consumer);
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        vec![
            "ot/plant/line1 v=0",
            "ot/plant/line1 v=1",
            "ot/plant/line1 v=2"
        ],
        "receiver log:\n{}",
        pair.receiver.log_text()
    );
    assert!(pair.receiver.log_text().contains("TLS handshake failed"));
    pair.assert_one_way();
}
