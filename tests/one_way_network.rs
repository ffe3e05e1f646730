//! A one-way network for real: the sender in network namespace `ot`, the receiver in `it`, joined by
//! a veth pair. In `it`, nftables drops and counts every packet that tries to leave towards `ot`,
//! and drops every 50th incoming UDP datagram (2 %). The drop is periodic, not random: with the few
//! hundred datagrams this test sends, a random 2 % dropped none at all about once in a hundred runs
//! (CI saw it). `it` answers no ARP (`ot` has a static neighbour entry), so nothing at all needs to
//! flow back, as across a hardware diode. Needs root, `ip` (iproute2) and `nft` (nftables);
//! `scripts/test` installs nftables.
//!
//! Addresses are from 198.18.0.0/15, the range set aside for benchmarking network devices
//! (RFC 2544), used only inside the namespaces this test creates.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const SEND: &str = env!("CARGO_BIN_EXE_diode-send");
const RECV: &str = env!("CARGO_BIN_EXE_diode-recv");

fn run(args: &[&str]) -> String {
    let output = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", args.join(" ")));
    assert!(
        output.status.success(),
        "{} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The two namespaces; removed (with the veth pair) when dropped.
struct Namespaces {
    ot: String,
    it: String,
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in [&self.ot, &self.it] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn require_tools() {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    assert!(
        root,
        "this test builds network namespaces and needs root (CI runs as root)"
    );
    for (tool, package) in [("ip", "iproute2"), ("nft", "nftables")] {
        let found = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
            || Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .status()
                .is_ok();
        assert!(
            found,
            "`{tool}` not found: `apt-get install {package}` (scripts/test does it)"
        );
    }
}

fn nft_counter(ns: &str, name: &str) -> u64 {
    let text = run(&[
        "ip", "netns", "exec", ns, "nft", "list", "counter", "inet", "diode", name,
    ]);
    text.split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no packet count in {text}"))
}

fn spawn_in(ns: &str, binary: &str, config: &Path, log: &Path) -> Child {
    Command::new("ip")
        .args(["netns", "exec", ns, binary, "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

#[test]
fn records_cross_a_one_way_network_and_nothing_comes_back() {
    require_tools();
    let id = std::process::id() % 100_000;
    let spaces = Namespaces {
        ot: format!("diode-ot-{id}"),
        it: format!("diode-it-{id}"),
    };
    let (veth_ot, veth_it) = (format!("dot{id}"), format!("dit{id}"));
    let (ot_addr, it_addr) = ("198.18.0.1", "198.18.0.2");
    run(&["ip", "netns", "add", &spaces.ot]);
    run(&["ip", "netns", "add", &spaces.it]);
    run(&[
        "ip", "link", "add", &veth_ot, "type", "veth", "peer", "name", &veth_it,
    ]);
    run(&["ip", "link", "set", &veth_ot, "netns", &spaces.ot]);
    run(&["ip", "link", "set", &veth_it, "netns", &spaces.it]);
    // The kernel's own IPv6 chatter (router solicitations, MLD, address checks) would leave `it`
    // too: a diode installation turns IPv6 off on that interface, and so does this test.
    run(&[
        "ip",
        "netns",
        "exec",
        &spaces.it,
        "sysctl",
        "-qw",
        &format!("net.ipv6.conf.{veth_it}.disable_ipv6=1"),
    ]);
    for (ns, dev, addr) in [
        (&spaces.ot, &veth_ot, ot_addr),
        (&spaces.it, &veth_it, it_addr),
    ] {
        run(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("{addr}/30"),
            "dev",
            dev,
        ]);
        run(&["ip", "-n", ns, "link", "set", dev, "up"]);
        run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }
    // No ARP from `it`: `ot` knows its neighbour's address statically, as a diode installation does.
    run(&[
        "ip", "-n", &spaces.it, "link", "set", &veth_it, "arp", "off",
    ]);
    let it_mac = run(&["ip", "-n", &spaces.it, "-br", "link", "show", &veth_it])
        .split_whitespace()
        .nth(2)
        .expect("a MAC address")
        .to_owned();
    run(&[
        "ip",
        "-n",
        &spaces.ot,
        "neigh",
        "add",
        it_addr,
        "lladdr",
        &it_mac,
        "dev",
        &veth_ot,
        "nud",
        "permanent",
    ]);
    let rules = format!(
        "table inet diode {{\n\
           counter towards_ot {{}}\n\
           counter lost_on_purpose {{}}\n\
           chain output {{ type filter hook output priority 0; oifname \"{veth_it}\" counter name towards_ot drop; }}\n\
           chain input {{ type filter hook input priority 0; iifname \"{veth_it}\" meta l4proto udp numgen inc mod 50 0 counter name lost_on_purpose drop; }}\n\
         }}\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let rules_path = dir.path().join("one-way.nft");
    std::fs::write(&rules_path, rules).unwrap();
    run(&[
        "ip",
        "netns",
        "exec",
        &spaces.it,
        "nft",
        "-f",
        rules_path.to_str().unwrap(),
    ]);

    let receiver_toml = dir.path().join("receiver.toml");
    std::fs::write(
        &receiver_toml,
        format!("[link]\nlisten = \"{it_addr}:47000\"\n[[route]]\ntopics = [\"#\"]\nsink = {{ kind = \"file\", path = \"out.jsonl\" }}\n"),
    )
    .unwrap();
    let sender_toml = dir.path().join("sender.toml");
    std::fs::write(
        &sender_toml,
        format!("[link]\ndestination = \"{it_addr}:47000\"\nrate_mbps = 100\n[[topic]]\nname = \"historian/events\"\nsource = {{ kind = \"tcp\", listen = \"127.0.0.1:5141\", framing = \"lines\" }}\n"),
    )
    .unwrap();
    let mut receiver = spawn_in(
        &spaces.it,
        RECV,
        &receiver_toml,
        &dir.path().join("receiver.log"),
    );
    std::thread::sleep(Duration::from_millis(300));
    let mut sender = spawn_in(
        &spaces.ot,
        SEND,
        &sender_toml,
        &dir.path().join("sender.log"),
    );

    // The plant side, inside `ot`: 20,000 lines into the sender's TCP source.
    let records = 20_000;
    let feeder = format!(
        "import socket, time\n\
         for _ in range(100):\n\
         \x20   try:\n\
         \x20       s = socket.create_connection(('127.0.0.1', 5141)); break\n\
         \x20   except OSError: time.sleep(0.05)\n\
         s.sendall(b''.join(b'event %d\\n' % i for i in range({records})))\n\
         s.close()\n"
    );
    run(&["ip", "netns", "exec", &spaces.ot, "python3", "-c", &feeder]);

    let out = dir.path().join("out.jsonl");
    let receiver_log = dir.path().join("receiver.log");
    let lost_in_log = || {
        common::records_lost_in_log(
            &std::fs::read_to_string(&receiver_log).unwrap_or_default(),
            None,
        )
    };
    let lines = || {
        std::fs::read_to_string(&out)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    let settled = common::wait_for(Duration::from_secs(30), || {
        lines() + lost_in_log() >= records
    });
    let _ = sender.kill();
    let _ = receiver.kill();
    let _ = sender.wait();
    let _ = receiver.wait();
    assert!(
        settled,
        "receiver log:\n{}",
        std::fs::read_to_string(&receiver_log).unwrap_or_default()
    );

    // Every record delivered is intact and in order; any loss beyond FEC is reported exactly.
    let text = std::fs::read_to_string(&out).unwrap();
    let mut last = None;
    for line in text.lines() {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        let seq = record["seq"].as_u64().unwrap();
        assert_eq!(record["payload"], format!("event {seq}"));
        assert!(last.is_none_or(|l| seq > l), "out of order at {seq}");
        last = Some(seq);
    }
    assert_eq!(lines() + lost_in_log(), records);
    assert!(
        lines() >= records * 99 / 100,
        "FEC should repair 2 % loss: {} delivered",
        lines()
    );
    assert!(
        nft_counter(&spaces.it, "lost_on_purpose") > 0,
        "the link dropped nothing: the test proves little"
    );
    assert_eq!(
        nft_counter(&spaces.it, "towards_ot"),
        0,
        "the receiver's side sent packets towards the OT side"
    );
}
