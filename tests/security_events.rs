//! The receiver's security events reach a SIEM as RFC 5424 messages with their message ids,
//! and a flood of forged datagrams makes a handful of events, not one per datagram.

mod common;

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use common::*;
use diode_gateway::relay::RelayConfig;
use diode_wire::{Encoder, EncoderConfig};

#[test]
fn a_forged_flood_makes_a_bounded_number_of_siem_events() {
    let siem = UdpSocket::bind("127.0.0.1:0").unwrap();
    siem.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    keygen(dir.path());
    let tcp = free_port();
    let topics = format!(
        "[[topic]]\nname = \"historian/events\"\n\
         source = {{ kind = \"tcp\", listen = \"127.0.0.1:{tcp}\", framing = \"lines\" }}\n"
    );
    let routes = format!(
        "[[route]]\ntopics = [\"#\"]\nsink = {{ kind = \"file\", path = \"out/records.jsonl\" }}\n\n\
         [security_events]\ntarget = \"{}\"\nprotocol = \"udp\"\n",
        siem.local_addr().unwrap()
    );
    let pair = Pair::start_with(
        RelayConfig::default(),
        &topics,
        &routes,
        dir,
        "key_file = \"link.key\"",
        "key_file = \"link.key\"",
    );
    assert!(wait_for(Duration::from_secs(10), || pair
        .receiver
        .metric("diode_link_up", &[])
        == 1.0));

    // Genuine-looking datagrams of another sender without the key: each is `auth` to a
    // receiver with one. 200 of them, each sent 100 times.
    let now = Instant::now();
    let mut forger = Encoder::new(
        EncoderConfig {
            session_id: 0xF0F0 << 20,
            ..Default::default()
        },
        now,
    )
    .unwrap();
    let topic = forger.add_topic("historian/events").unwrap();
    let mut forged = Vec::new();
    while forged.len() < 200 {
        forger
            .push(now, topic, 0, bytes::Bytes::from_static(b"forged"))
            .unwrap();
        forger.flush(now);
        forger.handle_timeout(now, 0);
        while let Some(d) = forger.poll_transmit(now) {
            forged.push(d);
        }
    }
    let attacker = UdpSocket::bind("127.0.0.1:0").unwrap();
    for _ in 0..100 {
        for d in &forged[..200] {
            let _ = attacker.send_to(d, loopback(pair.link_port));
        }
    }
    assert!(
        wait_for(Duration::from_secs(10), || pair
            .receiver
            .metric("diode_datagrams_rejected_total", &["reason=\"auth\""])
            >= 15_000.0),
        "{}",
        pair.receiver.metrics_text()
    );

    // What the SIEM got over the next report interval and a margin.
    let mut messages = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(13);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = siem.recv(&mut buf) {
            messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    let with = |msgid: &str| -> Vec<&String> {
        messages
            .iter()
            .filter(|m| m.split(' ').nth(5) == Some(msgid))
            .collect()
    };
    // RFC 5424: <PRI>1 TIMESTAMP HOST APP PROCID MSGID ...; authpriv (10) warning (4) = 84.
    let rejected = with("DIODE_REJECTED");
    assert!(!rejected.is_empty(), "{messages:#?}");
    assert!(
        rejected.len() <= 2,
        "one a reason and interval: {rejected:#?}"
    );
    assert!(rejected[0].starts_with("<84>1 "), "{}", rejected[0]);
    assert!(rejected[0].contains(" diode-recv "), "{}", rejected[0]);
    let reported: u64 = rejected
        .iter()
        .filter_map(|m| m.split("] ").nth(1)?.split(' ').next()?.parse::<u64>().ok())
        .sum();
    let counted = pair
        .receiver
        .metric("diode_datagrams_rejected_total", &["reason=\"auth\""]) as u64;
    assert!(
        reported > 0 && reported <= counted,
        "reported {reported}, counted {counted}: {rejected:#?}"
    );
    for msgid in ["DIODE_CONFIG", "DIODE_SESSION", "DIODE_LINK_UP"] {
        assert_eq!(with(msgid).len(), 1, "{msgid}: {messages:#?}");
    }
    assert!(messages.len() < 10, "{messages:#?}");
    // The same events are log lines too.
    let log = pair.receiver.log_text();
    assert!(
        log.contains("DIODE_REJECTED") && log.contains("diode::security"),
        "{log}"
    );
    pair.assert_one_way();
}
