//! Faults, each against the real binaries: the sender crashing, the link going dark for ten
//! seconds, a flood of hostile datagrams during real traffic. In each the services keep running,
//! what could be delivered is, what was lost is reported as exact gaps, memory stays bounded.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use common::*;
use diode_gateway::relay::RelayConfig;
use diode_wire::sim::SimRng;

const TOPIC: &str = r#"[[topic]]
name = "historian/events"
source = { kind = "tcp", listen = "127.0.0.1:PORT", framing = "lines" }
"#;

const ROUTE: &str = r##"[[route]]
topics = ["#"]
sink = { kind = "file", path = "out/records.jsonl" }
"##;

fn pair(tcp: u16) -> Pair {
    Pair::start(
        RelayConfig::default(),
        &TOPIC.replace("PORT", &tcp.to_string()),
        ROUTE,
    )
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// Writes `event N` lines for `dur`, `per_tick` at a time with `pause` between, numbering on
/// from `sent`.
fn send_events(s: &mut TcpStream, sent: &mut u64, dur: Duration, per_tick: u64, pause: Duration) {
    let until = Instant::now() + dur;
    while Instant::now() < until {
        for _ in 0..per_tick {
            writeln!(s, "event {sent}").unwrap();
            *sent += 1;
        }
        std::thread::sleep(pause);
    }
}

/// (seq, payload) of every record written, in file order, checked in order and intact.
fn delivered(pair: &Pair, prefix_of: impl Fn(u64) -> String) -> Vec<u64> {
    let mut seqs = Vec::new();
    for line in read_jsonl(&pair.path("out/records.jsonl")) {
        let seq = line["seq"].as_u64().unwrap();
        assert_eq!(line["payload"].as_str().unwrap(), prefix_of(seq));
        seqs.push(seq);
    }
    seqs
}

#[test]
fn a_sender_crash_is_a_new_session_and_the_receiver_carries_on() {
    let tcp = free_port();
    let mut pair = pair(tcp);
    let addr: SocketAddr = loopback(tcp);
    let mut s = TcpStream::connect(addr).unwrap();
    for i in 0..3000 {
        writeln!(s, "before {i}").unwrap();
    }
    drop(s);
    let out = pair.path("out/records.jsonl");
    assert!(wait_for(Duration::from_secs(10), || line_count(&out) >= 3000));
    // SIGKILL: no last heartbeat, no flush.
    pair.restart_sender(true);
    let mut s = TcpStream::connect(addr).unwrap();
    for i in 0..3000 {
        writeln!(s, "after {i}").unwrap();
    }
    drop(s);
    assert!(
        wait_for(Duration::from_secs(10), || line_count(&out) >= 6000),
        "{}",
        pair.receiver.log_text()
    );
    let lines = read_jsonl(&out);
    assert_eq!(lines[2999]["payload"], "before 2999");
    assert_eq!(lines[3000]["payload"], "after 0");
    assert_eq!(lines[3000]["seq"], 0);
    assert!(pair
        .receiver
        .log_text()
        .contains("the sender restarted: new session"));
    assert_eq!(pair.receiver.metric("diode_records_lost_total", &[]), 0.0);
    pair.assert_one_way();
}

#[test]
fn ten_seconds_of_darkness_then_the_link_comes_back() {
    let tcp = free_port();
    let pair = pair(tcp);
    let mut s = TcpStream::connect(("127.0.0.1", tcp)).unwrap();
    let mut sent = 0u64;
    let mut send_for = |s: &mut TcpStream, dur: Duration| {
        send_events(s, &mut sent, dur, 50, Duration::from_millis(10))
    };
    send_for(&mut s, Duration::from_secs(1));
    pair.relay.set_dark(true);
    let receiver_pid = pair.receiver.child.as_ref().unwrap().id();
    let mut peak = 0.0f64;
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        send_for(&mut s, Duration::from_millis(500));
        peak = peak.max(rss_mib(receiver_pid));
    }
    assert_eq!(
        pair.receiver.metric("diode_link_up", &[]),
        0.0,
        "ten dark seconds: link down"
    );
    pair.relay.set_dark(false);
    send_for(&mut s, Duration::from_secs(1));
    drop(s);
    pair.wait_accounted_for(sent);
    let receiver = &pair.receiver;
    assert_eq!(receiver.metric("diode_link_up", &[]), 1.0);
    let seqs = delivered(&pair, |seq| format!("event {seq}"));
    let lost = receiver.metric("diode_records_lost_total", &[]) as u64;
    assert_eq!(
        seqs.len() as u64 + lost,
        sent,
        "delivered and reported lost add up"
    );
    assert!(lost > 5000, "ten dark seconds lose records: {lost}");
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    assert!(
        *seqs.last().unwrap() == sent - 1,
        "what was sent after the dark is delivered"
    );
    assert!(peak < 100.0, "receiver RSS {peak:.1} MiB while dark");
    let log = receiver.log_text();
    assert!(log.contains("link down") && log.contains("records lost beyond repair"));
    pair.assert_one_way();
}

/// Outage protection (wire-format.md §3.4) with the real binaries: a 300 ms blackhole in the
/// middle of a stream, ridden through with outage_protection_ms = 400: every record arrives, in
/// order, none reported lost; the same outage without protection loses records.
#[test]
fn a_short_outage_is_ridden_through_with_outage_protection() {
    let run = |protection_ms: u64| {
        let tcp = free_port();
        let pair = Pair::start_with(
            RelayConfig::default(),
            &TOPIC.replace("PORT", &tcp.to_string()),
            ROUTE,
            tempfile::tempdir().unwrap(),
            &format!("outage_protection_ms = {protection_ms}"),
            "",
        );
        let mut s = TcpStream::connect(("127.0.0.1", tcp)).unwrap();
        let mut sent = 0u64;
        let mut send_for = |s: &mut TcpStream, dur: Duration| {
            send_events(s, &mut sent, dur, 20, Duration::from_millis(5))
        };
        send_for(&mut s, Duration::from_millis(700));
        pair.relay.set_dark(true);
        send_for(&mut s, Duration::from_millis(300));
        pair.relay.set_dark(false);
        send_for(&mut s, Duration::from_millis(700));
        drop(s);
        pair.wait_accounted_for(sent);
        let receiver = &pair.receiver;
        let seqs = delivered(&pair, |seq| format!("event {seq}"));
        assert!(seqs.windows(2).all(|w| w[0] < w[1]));
        pair.assert_one_way();
        (
            sent,
            seqs.len() as u64,
            receiver.metric("diode_records_lost_total", &[]) as u64,
            pair.sender.metric("diode_repair_datagrams_sent_total", &[]),
        )
    };
    let (sent, delivered, lost, repairs) = run(400);
    assert_eq!(
        (delivered, lost),
        (sent, 0),
        "protected: everything arrives"
    );
    assert!(repairs > 0.0);
    let (sent, delivered, lost, _) = run(0);
    assert!(lost > 0, "unprotected, the same outage loses records");
    assert_eq!(delivered + lost, sent);
}

#[test]
fn a_flood_of_hostile_datagrams_during_real_traffic() {
    let tcp = free_port();
    let pair = pair(tcp);
    let link = pair.link_port;
    // The link is working (a heartbeat decoded) before the flood begins: the flood tests that it
    // cannot be taken away, not the instant before it exists (wire-format.md §6.1).
    assert!(wait_for(Duration::from_secs(5), || {
        pair.receiver.metric("diode_last_heartbeat_seconds", &[]) > 0.0
    }));
    let flood = std::thread::spawn(move || {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut rng = SimRng::new(77);
        let started = Instant::now();
        let mut count = 0u64;
        while started.elapsed() < Duration::from_secs(3) {
            let len = 1 + rng.below(1500) as usize;
            let mut d: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            // Two in three with a valid CRC, half of those with a plausible header: random
            // sessions, blocks and geometry, so they get past the cheap checks.
            if rng.below(3) > 0 && d.len() >= 30 {
                if rng.below(2) == 0 {
                    d[0..4].copy_from_slice(&[0xD1, 0x0D, 1, 0]);
                    d[20] = 0;
                    d[21] = 1 + rng.below(32) as u8;
                    d[22] = rng.below(8) as u8;
                    d[23] = 4;
                    let shard = (d.len() - 30) as u16;
                    d[24..26].copy_from_slice(&shard.to_be_bytes());
                }
                let body = d.len() - 4;
                let crc = crc32fast::hash(&d[..body]);
                d[body..].copy_from_slice(&crc.to_be_bytes());
            }
            let _ = socket.send_to(&d, ("127.0.0.1", link));
            count += 1;
        }
        count
    });
    let mut s = TcpStream::connect(("127.0.0.1", tcp)).unwrap();
    for i in 0..20_000 {
        writeln!(s, "event {i}").unwrap();
        if i % 500 == 0 {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    drop(s);
    let flooded = flood.join().unwrap();
    pair.wait_accounted_for(20_000);
    let receiver = &pair.receiver;
    // Datagrams of invented sessions never yield a heartbeat, so none takes the link over
    // (wire-format.md §6.1): every record arrives, intact and in order.
    let seqs = delivered(&pair, |seq| format!("event {seq}"));
    assert_eq!(seqs, (0..20_000).collect::<Vec<u64>>());
    assert_eq!(receiver.metric("diode_sessions_total", &[]), 1.0);
    assert!(
        receiver.metric(
            "diode_datagrams_rejected_total",
            &["reason=\"unconfirmed\""]
        ) > 0.0
    );
    let rejected = receiver.metric("diode_datagrams_rejected_total", &[]);
    assert!(
        rejected as u64 > flooded / 3,
        "{rejected} of {flooded} rejected"
    );
    assert!(rss_mib(receiver.child.as_ref().unwrap().id()) < 100.0);
    assert!(
        receiver.child.is_some() && scrape_ok(receiver.metrics),
        "the receiver kept running"
    );
    pair.assert_one_way();
}

fn scrape_ok(addr: SocketAddr) -> bool {
    diode_gateway::scrape::fetch(addr).is_ok()
}
