//! Backfill with the real binaries (docs/backfill.md): the receiver goes down while records
//! flow, comes back, reports the gap with its exact range, and the sender's journal fills it,
//! by an operator's replay or by continuous backfill, across a sender restart too; every
//! record ends up in the file exactly once.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use common::*;
use diode_gateway::relay::RelayConfig;

const TOPIC: &str = "historian/events";

const FILE_ROUTE: &str = r#"[[route]]
topics = ["historian/#"]
sink = { kind = "file", path = "out/records.jsonl" }
"#;

/// A pair whose sender journals its one lines topic (`journal` holds more `[journal]` keys) and
/// whose receiver keeps a state file; and the topic's TCP port.
fn journaled_pair(journal: &str) -> (Pair, u16) {
    let tcp = free_port();
    let topics = format!(
        "[journal]\ndir = \"journal\"\n{journal}\n\n[[topic]]\nname = \"{TOPIC}\"\n\
         source = {{ kind = \"tcp\", listen = \"127.0.0.1:{tcp}\", framing = \"lines\" }}\n"
    );
    let pair = Pair::start_with(
        RelayConfig::default(),
        &topics,
        FILE_ROUTE,
        tempfile::tempdir().unwrap(),
        "",
        "state_file = \"receiver.state\"",
    );
    (pair, tcp)
}

/// Sends lines `from..to` at about `per_sec` a second on one connection.
fn feed(tcp: u16, from: usize, to: usize, per_sec: usize) {
    let mut stream = TcpStream::connect(loopback(tcp)).unwrap();
    let chunk = (per_sec / 20).max(1);
    let mut i = from;
    while i < to {
        let end = (i + chunk).min(to);
        let text: String = (i..end).map(|n| format!("record {n}\n")).collect();
        stream.write_all(text.as_bytes()).unwrap();
        i = end;
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Per line number `n` of "record n": how many times it is in the file, and how many of those
/// are marked late.
fn tally(out: &Path) -> BTreeMap<usize, (u32, u32)> {
    let mut tally: BTreeMap<usize, (u32, u32)> = BTreeMap::new();
    for line in read_jsonl(out) {
        let payload = line["payload"].as_str().unwrap();
        let n: usize = payload.strip_prefix("record ").unwrap().parse().unwrap();
        let entry = tally.entry(n).or_default();
        entry.0 += 1;
        entry.1 += u32::from(line["late"] == true);
    }
    tally
}

/// The `--seq A-B` ranges `diode-recv gaps` gives for replay.
fn gaps(pair: &Pair) -> (String, Vec<(u64, u64)>) {
    let output = std::process::Command::new(RECV)
        .args(["gaps", "--config"])
        .arg(&pair.receiver_toml)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    let ranges = text
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix(&format!("diode-send replay --topic '{TOPIC}' --seq "))
        })
        .map(|r| {
            let (a, b) = r.split_once('-').unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        })
        .collect();
    (text, ranges)
}

fn replay(pair: &Pair, seqs: (u64, u64)) -> String {
    let output = std::process::Command::new(SEND)
        .args(["replay", "--config"])
        .arg(&pair.sender_toml)
        .args(["--topic", TOPIC, "--seq", &format!("{}-{}", seqs.0, seqs.1)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{text}");
    text
}

fn wait_for_all(out: &Path, count: usize, pair: &Pair) {
    assert!(
        wait_for(Duration::from_secs(30), || line_count(out) >= count),
        "{} of {count} lines; receiver: {}\nsender log: {}",
        line_count(out),
        pair.receiver.metrics_text(),
        pair.sender.log_text()
    );
}

fn assert_exactly_once(out: &Path, count: usize, late: usize) {
    let tally = tally(out);
    assert_eq!(tally.len(), count, "records missing");
    let twice: Vec<_> = tally.iter().filter(|(_, (n, _))| *n != 1).take(5).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    let marked: usize = tally.values().map(|(_, l)| *l as usize).sum();
    assert_eq!(marked, late, "records marked late");
    // Sequence numbers are unique too: (topic, seq) names one record, across sessions.
    let mut seqs: Vec<u64> = read_jsonl(out)
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), count);
}

/// 20,000 records at 2,000 a second, the receiver stopped (cleanly) from the 2nd second to the
/// 7th.
fn receiver_down_for_5_s_of_20_000_records(pair: &mut Pair, tcp: u16) {
    let feeder = std::thread::spawn(move || feed(tcp, 0, 20_000, 2_000));
    std::thread::sleep(Duration::from_secs(2));
    pair.stop_receiver(false);
    std::thread::sleep(Duration::from_secs(5));
    pair.start_receiver();
    feeder.join().unwrap();
}

/// The issue's case: the receiver down for 5 s while 20,000 records flow; back up, it reports
/// the gap with its exact range; the OT operator replays that range from the journal; every
/// record is in the file once, the replayed ones marked late, and no gap is left open.
#[test]
fn an_operator_replay_fills_the_gap_a_receiver_restart_left() {
    let (mut pair, tcp) = journaled_pair("");
    let out = pair.path("out/records.jsonl");
    receiver_down_for_5_s_of_20_000_records(&mut pair, tcp);
    assert!(wait_for(Duration::from_secs(10), || pair
        .receiver
        .metric("diode_gaps_open", &[])
        >= 1.0));
    std::thread::sleep(Duration::from_millis(1500));
    let delivered = tally(&out);
    let missing: Vec<usize> = (0..20_000).filter(|n| !delivered.contains_key(n)).collect();
    assert!(
        missing.len() > 5_000,
        "the receiver was down for 5 s: {}",
        missing.len()
    );
    let (text, ranges) = gaps(&pair);
    // Sequence numbers are the line numbers here: one source, one connection, from 0.
    let expected = (
        *missing.first().unwrap() as u64,
        *missing.last().unwrap() as u64,
    );
    assert_eq!(ranges, vec![expected], "{text}");
    assert_eq!(
        missing.len() as u64,
        expected.1 - expected.0 + 1,
        "one contiguous gap"
    );
    // A dry run says what it would send, and sends nothing.
    let dry = std::process::Command::new(SEND)
        .args(["replay", "--config"])
        .arg(&pair.sender_toml)
        .args([
            "--topic",
            TOPIC,
            "--seq",
            &format!("{}-{}", expected.0, expected.1),
        ])
        .arg("--dry-run")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&dry.stdout);
    assert!(
        dry.status.success() && text.contains("dry run: nothing sent"),
        "{dry:?}"
    );
    assert!(
        std::fs::read_dir(pair.path("journal/replay")).map_or(true, |d| d.count() == 0),
        "a dry run left a request"
    );
    // Records no journal holds: refused, saying why.
    let none = std::process::Command::new(SEND)
        .args(["replay", "--config"])
        .arg(&pair.sender_toml)
        .args(["--topic", TOPIC, "--seq", "900000-900010"])
        .output()
        .unwrap();
    assert!(!none.status.success());
    assert!(
        String::from_utf8_lossy(&none.stderr)
            .contains("none of the requested records is in the journal"),
        "{none:?}"
    );
    let said = replay(&pair, expected);
    assert!(
        said.contains(&format!(
            "requested: {} records in the journal",
            missing.len()
        )),
        "{said}"
    );
    wait_for_all(&out, 20_000, &pair);
    std::thread::sleep(Duration::from_millis(500));
    assert_exactly_once(&out, 20_000, missing.len());
    // The state file is written once a second.
    assert!(
        wait_for(Duration::from_secs(5), || gaps(&pair).1.is_empty()),
        "{}",
        gaps(&pair).0
    );
    assert!(gaps(&pair).0.starts_with("no open gaps"));
    let labels = [format!("topic=\"{TOPIC}\"")];
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    assert_eq!(
        pair.receiver
            .metric("diode_records_recovered_total", &labels),
        missing.len() as f64
    );
    assert!(pair
        .sender
        .log_text()
        .contains("replay: sent again from the journal"));
    pair.assert_one_way();
}

/// The same outage with continuous backfill on and no operator: the gap heals by itself.
#[test]
fn continuous_backfill_heals_the_gap_with_no_one_acting() {
    let (mut pair, tcp) = journaled_pair("backfill_window_secs = 60\nbackfill_rate_mbps = 20");
    let out = pair.path("out/records.jsonl");
    receiver_down_for_5_s_of_20_000_records(&mut pair, tcp);
    wait_for_all(&out, 20_000, &pair);
    assert!(wait_for(Duration::from_secs(10), || pair
        .receiver
        .metric("diode_gaps_open", &[])
        == 0.0));
    std::thread::sleep(Duration::from_millis(500));
    let late = tally(&out).values().filter(|(_, l)| *l > 0).count();
    assert!(late > 5_000, "{late} records came late");
    assert_exactly_once(&out, 20_000, late);
    assert!(pair.sender.metric("diode_backfill_records_total", &[]) > 0.0);
    assert!(
        pair.receiver
            .metric("diode_replayed_records_duplicate_total", &[])
            > 0.0
    );
    pair.assert_one_way();
}

/// The sender restarts while the receiver is down: the journal is kept, sequence numbers go on,
/// the receiver reports one gap spanning both sessions, and a replay from the new sender run
/// fills it.
#[test]
fn a_sender_restart_keeps_the_journal_and_its_numbers() {
    let (mut pair, tcp) = journaled_pair("");
    let out = pair.path("out/records.jsonl");
    feed(tcp, 0, 3_000, 6_000);
    wait_for_all(&out, 3_000, &pair);
    pair.stop_receiver(false);
    feed(tcp, 3_000, 6_000, 6_000);
    assert!(wait_for(Duration::from_secs(10), || pair.sender.metric(
        "diode_journal_records_total",
        &[&format!("topic=\"{TOPIC}\"")]
    ) >= 6_000.0));
    pair.restart_sender(false);
    assert!(wait_for(Duration::from_secs(10), || {
        std::net::TcpStream::connect(loopback(tcp)).is_ok()
    }));
    feed(tcp, 6_000, 9_000, 6_000);
    pair.start_receiver();
    std::thread::sleep(Duration::from_millis(500));
    feed(tcp, 9_000, 12_000, 6_000);
    wait_for_all(&out, 6_000, &pair);
    assert!(wait_for(Duration::from_secs(10), || !gaps(&pair)
        .1
        .is_empty()));
    let (text, ranges) = gaps(&pair);
    assert_eq!(ranges, vec![(3_000, 8_999)], "{text}");
    replay(&pair, ranges[0]);
    wait_for_all(&out, 12_000, &pair);
    std::thread::sleep(Duration::from_millis(500));
    assert_exactly_once(&out, 12_000, 6_000);
    let sessions: std::collections::BTreeSet<String> = read_jsonl(&out)
        .iter()
        .map(|r| r["session"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(sessions.len(), 2, "{sessions:?}");
    pair.assert_one_way();
}

/// Without a journal, `link.state_file` alone keeps the numbers: a sender restart goes on from
/// where it stopped, so (topic, seq) names one record across runs, and the receiver calls
/// nothing lost.
#[test]
fn a_sender_state_file_keeps_the_numbers_without_a_journal() {
    let tcp = free_port();
    let topics = format!(
        "[[topic]]\nname = \"{TOPIC}\"\n\
         source = {{ kind = \"tcp\", listen = \"127.0.0.1:{tcp}\", framing = \"lines\" }}\n"
    );
    let mut pair = Pair::start_with(
        RelayConfig::default(),
        &topics,
        FILE_ROUTE,
        tempfile::tempdir().unwrap(),
        "state_file = \"sender.state\"",
        "",
    );
    let out = pair.path("out/records.jsonl");
    feed(tcp, 0, 500, 5_000);
    wait_for_all(&out, 500, &pair);
    pair.restart_sender(false);
    assert!(wait_for(Duration::from_secs(10), || TcpStream::connect(
        loopback(tcp)
    )
    .is_ok()));
    feed(tcp, 500, 1_000, 5_000);
    wait_for_all(&out, 1_000, &pair);
    std::thread::sleep(Duration::from_millis(500));
    assert_exactly_once(&out, 1_000, 0);
    let seqs: Vec<u64> = read_jsonl(&out)
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (0..1_000).collect::<Vec<_>>());
    assert_eq!(pair.receiver.metric("diode_records_lost_total", &[]), 0.0);
    assert!(pair.path("sender.state").exists());
    pair.assert_one_way();
}
