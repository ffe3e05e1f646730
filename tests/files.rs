//! Files across the diode with the real binaries: a files source on the plant side, a files sink
//! on the IT side, the impairing relay between them.

mod common;

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{wait_for, Pair};
use diode_gateway::relay::RelayConfig;
use diode_wire::sim::Impairments;

/// Bytes that differ from file to file and do not compress.
fn content(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn write(root: &Path, rel: &str, bytes: &[u8]) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// `sha256sum` of every regular file below `root` (but the sink's own `.diode-files`), by
/// relative path, sorted: what an operator would compare.
fn tree_digest(root: &Path) -> Vec<String> {
    let output = Command::new("sh")
        .arg("-c")
        .arg("find . -path ./.diode-files -prune -o -type f -print0 | sort -z | xargs -0 -r sha256sum")
        .current_dir(root)
        .output()
        .unwrap();
    assert!(output.status.success());
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn files_topic(plant: &Path, state: &Path, extra: &str) -> String {
    format!(
        "[[topic]]\nname = \"exports\"\nsource = {{ kind = \"files\", dir = \"{}\", state_file = \"{}\", stable_ms = 300, pass_interval_ms = 500, {extra} }}\n",
        plant.display(),
        state.display()
    )
}

fn files_route(mirror: &Path, extra: &str) -> String {
    format!(
        "[[route]]\nname = \"mirror\"\ntopics = [\"exports\"]\nsink = {{ kind = \"files\", dir = \"{}\"{extra} }}\n",
        mirror.display()
    )
}

/// A pair over a clean link with one files topic and its mirror route.
fn start_pair(s: Sides, topic: &str) -> Pair {
    let route = files_route(&s.mirror, "");
    Pair::start_with(RelayConfig::default(), topic, &route, s.dir, "", "")
}

struct Sides {
    dir: tempfile::TempDir,
    plant: PathBuf,
    mirror: PathBuf,
}

fn sides() -> Sides {
    let dir = tempfile::tempdir().unwrap();
    let plant = dir.path().join("plant");
    let mirror = dir.path().join("mirror");
    std::fs::create_dir_all(&plant).unwrap();
    std::fs::create_dir_all(&mirror).unwrap();
    Sides { dir, plant, mirror }
}

#[test]
fn a_tree_arrives_byte_identical_through_loss_beyond_parity() {
    let s = sides();
    let mut expected = 0;
    for i in 0..120u64 {
        let rel = match i % 4 {
            0 => format!("line {}/batch report {i}.csv", i % 3),
            1 => format!("recettes/été/mélange-{i}.xml"),
            2 => format!("deep/a/b/c/{i}.bin"),
            _ => format!("top-{i}"),
        };
        write(&s.plant, &rel, &content((i as usize * 977) % 40_000, i));
        expected += 1;
    }
    write(&s.plant, "empty.txt", b"");
    write(
        &s.plant,
        "historian/export-large.dat",
        &content(12 << 20, 1000),
    );
    write(
        &s.plant,
        "historian/export-medium.dat",
        &content(3 << 20, 1001),
    );
    expected += 3;
    // Names a Linux plant server can hold and no mirror may take.
    std::fs::write(
        s.plant
            .join(std::ffi::OsStr::from_bytes(b"bad\xffname.bin")),
        b"x",
    )
    .unwrap();
    write(&s.plant, "CON", b"device");

    // Whole blocks lost in bursts, beyond what parity repairs, plus scattered loss.
    let relay = RelayConfig {
        impairments: Impairments {
            drop_rate: 0.01,
            burst_rate: 0.001,
            burst_len: 60,
            reorder_rate: 0.01,
            reorder_distance: 3,
            duplicate_rate: 0.01,
            ..Impairments::default()
        },
        seed: 5,
    };
    let state = s.dir.path().join("files.state");
    let pair = Pair::start_with(
        relay,
        &files_topic(&s.plant, &state, "passes = 6"),
        &files_route(&s.mirror, ""),
        s.dir,
        "",
        "",
    );
    let received = |pair: &Pair| pair.receiver.metric("diode_files_received_total", &[]);
    assert!(
        wait_for(Duration::from_secs(120), || received(&pair)
            >= expected as f64),
        "received {} of {expected} files; sender log:\n{}\nreceiver log:\n{}",
        received(&pair),
        pair.sender.log_text(),
        pair.receiver.log_text()
    );
    let mut plant = tree_digest(&pair.path("plant"));
    plant.retain(|line| !line.ends_with("  ./CON") && !line.contains("  ./bad"));
    assert_eq!(plant.len(), expected);
    assert_eq!(tree_digest(&pair.path("mirror")), plant);
    // The loss was real: some pass of some file came up short, and a later pass completed it.
    assert!(pair.receiver.metric("diode_records_lost_total", &[]) > 0.0);
    assert!(
        pair.receiver
            .metric("diode_file_passes_incomplete_total", &[])
            > 0.0
    );
    // Names no mirror may take are not sent at all (the sink's own refusal of each hostile
    // path is tested in sinks/files.rs, with records no sender of ours would make).
    assert_eq!(
        pair.sender
            .metric("diode_files_skipped_total", &["reason=\"name\""]),
        2.0,
        "the two names no receiver takes were sent"
    );
    assert_eq!(
        pair.receiver
            .metric("diode_files_failed_total", &["reason=\"verify\""]),
        0.0
    );
    pair.assert_one_way();
}

#[test]
fn a_sender_killed_mid_file_resumes_where_it_stopped() {
    let s = sides();
    let size = 24usize << 20;
    let big = content(size, 7);
    write(&s.plant, "historian/full-export.dat", &big);
    let state = s.dir.path().join("files.state");
    // A ceiling so the file takes seconds; one pass, so only the resumed pass can complete it.
    let topic = files_topic(&s.plant, &state, "passes = 1").replace(
        "name = \"exports\"\n",
        "name = \"exports\"\nrate_mbps = 40\n",
    );
    let mut pair = start_pair(s, &topic);
    let sent = |pair: &Pair| pair.sender.metric("diode_file_bytes_sent_total", &[]);
    // Crash once the state file says a third of the file is queued.
    let saved_offset = || {
        std::fs::read(pair.path("files.state"))
            .ok()
            .and_then(|text| serde_json::from_slice::<serde_json::Value>(&text).ok())
            .and_then(|state| state["progress"]["offset"].as_u64())
            .unwrap_or(0)
    };
    assert!(wait_for(Duration::from_secs(30), || saved_offset()
        >= size as u64 / 3));
    pair.restart_sender(true);
    let received = |pair: &Pair| pair.receiver.metric("diode_files_received_total", &[]);
    assert!(
        wait_for(Duration::from_secs(60), || received(&pair) >= 1.0),
        "not received; sender log:\n{}\nreceiver log:\n{}",
        std::fs::read_to_string(pair.path("sender2.log")).unwrap_or_default(),
        pair.receiver.log_text()
    );
    assert_eq!(
        std::fs::read(pair.path("mirror/historian/full-export.dat")).unwrap(),
        big
    );
    let resumed_log = std::fs::read_to_string(pair.path("sender2.log")).unwrap();
    assert!(resumed_log.contains("resuming a pass"), "{resumed_log}");
    assert!(
        sent(&pair) < (size - (2 << 20)) as f64,
        "the restarted sender sent {} bytes: it started over",
        sent(&pair)
    );
}

#[test]
fn a_file_being_written_is_sent_only_once_stable() {
    let s = sides();
    let state = s.dir.path().join("files.state");
    let topic =
        files_topic(&s.plant, &state, "passes = 1").replace("stable_ms = 300", "stable_ms = 1000");
    let pair = start_pair(s, &topic);
    // A logger appending a line every 150 ms for 3 s.
    let path = pair.path("plant/growing.log");
    let mut whole = Vec::new();
    for i in 0..20 {
        let line = format!("{i:04} {}\n", "reading ".repeat(20));
        whole.extend_from_slice(line.as_bytes());
        std::fs::write(&path, &whole).unwrap();
        std::thread::sleep(Duration::from_millis(150));
    }
    let received = |pair: &Pair| pair.receiver.metric("diode_files_received_total", &[]);
    assert!(wait_for(Duration::from_secs(20), || received(&pair) >= 1.0));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        std::fs::read(pair.path("mirror/growing.log")).unwrap(),
        whole
    );
    // Exactly one version went out, the finished one: none was sent while it grew.
    assert_eq!(pair.sender.metric("diode_files_sent_total", &[]), 1.0);
    assert_eq!(received(&pair), 1.0);
}

#[test]
fn deletions_are_mirrored_and_transfer_mode_moves_sent_files_away() {
    let s = sides();
    let state = s.dir.path().join("files.state");
    let sent_dir = s.dir.path().join("sent");
    std::fs::create_dir_all(&sent_dir).unwrap();
    let outbox = s.dir.path().join("outbox");
    std::fs::create_dir_all(&outbox).unwrap();
    write(&s.plant, "keep.csv", b"a,b\n1,2\n");
    write(&s.plant, "remove-me.csv", b"x,y\n");
    write(&outbox, "order-1.xml", b"<order/>");
    let topics = format!(
        "{}\n[[topic]]\nname = \"outbox\"\nsource = {{ kind = \"files\", dir = \"{}\", state_file = \"{}\", stable_ms = 300, passes = 2, pass_interval_ms = 300, after_send = \"move\", move_to = \"{}\" }}\n",
        files_topic(&s.plant, &state, "passes = 2, propagate_deletions = true"),
        outbox.display(),
        s.dir.path().join("outbox.state").display(),
        sent_dir.display()
    );
    let routes = format!(
        "{}\n[[route]]\nname = \"orders\"\ntopics = [\"outbox\"]\nsink = {{ kind = \"files\", dir = \"{}\" }}\n",
        files_route(&s.mirror, ""),
        s.dir.path().join("orders").display()
    );
    let started = std::time::Instant::now();
    let pair = Pair::start_with(RelayConfig::default(), &topics, &routes, s.dir, "", "");
    let received = |pair: &Pair| pair.receiver.metric("diode_files_received_total", &[]);
    assert!(wait_for(Duration::from_secs(20), || received(&pair) >= 3.0));
    assert!(pair.path("mirror/remove-me.csv").exists());

    std::fs::remove_file(pair.path("plant/remove-me.csv")).unwrap();
    assert!(
        wait_for(Duration::from_secs(20), || !pair
            .path("mirror/remove-me.csv")
            .exists()),
        "the deletion did not cross; receiver log:\n{}",
        pair.receiver.log_text()
    );
    assert!(pair.path("mirror/keep.csv").exists());
    assert_eq!(pair.receiver.metric("diode_files_deleted_total", &[]), 1.0);

    // Transfer mode: once both passes are sent the order leaves the outbox, and is not
    // announced as deleted.
    assert!(wait_for(Duration::from_secs(20), || pair
        .path("sent/order-1.xml")
        .exists()));
    assert!(!pair.path("outbox/order-1.xml").exists());
    assert_eq!(
        std::fs::read(pair.path("orders/order-1.xml")).unwrap(),
        b"<order/>"
    );
    std::thread::sleep(Duration::from_millis(1000));
    assert!(pair.path("orders/order-1.xml").exists());

    // A sender whose topics are all files has no live source: it keeps running all the same
    // (past the 10 s a stopping sender is given to drain).
    std::thread::sleep(Duration::from_secs(12).saturating_sub(started.elapsed()));
    write(&pair.path("plant"), "later.csv", b"late,file\n");
    assert!(
        wait_for(Duration::from_secs(20), || pair
            .path("mirror/later.csv")
            .exists()),
        "a file added after 12 s did not cross; sender log:\n{}",
        pair.sender.log_text()
    );
}

#[test]
fn files_cross_beside_live_telemetry_with_outage_protection_on() {
    // Outage protection holds every block's repair shards back for hundreds of milliseconds:
    // they must not count as queued ahead of the files, or a busy link never lets a file out.
    let s = sides();
    let udp = common::free_port();
    let topics = format!(
        "[[topic]]\nname = \"line3/telemetry\"\nsource = {{ kind = \"udp\", listen = \"127.0.0.1:{udp}\" }}\n{}",
        files_topic(&s.plant, &s.dir.path().join("files.state"), "passes = 1")
    );
    let routes = format!(
        "[[route]]\ntopics = [\"line3/#\"]\nsink = {{ kind = \"file\", path = \"out/telemetry.jsonl\" }}\n{}",
        files_route(&s.mirror, "")
    );
    let plant = s.plant.clone();
    let pair = Pair::start_with(
        RelayConfig::default(),
        &topics,
        &routes,
        s.dir,
        "outage_protection_ms = 400",
        "",
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let telemetry = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let batch =
                    (n..n + 20).map(|i| format!("sample {i} {}", "x".repeat(80)).into_bytes());
                common::send_udp(common::loopback(udp), batch, 20);
                n += 20;
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let report = content(1 << 20, 77);
    write(&plant, "report.bin", &report);
    let arrived = wait_for(Duration::from_secs(15), || {
        pair.receiver.metric("diode_files_received_total", &[]) >= 1.0
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    telemetry.join().unwrap();
    assert!(
        arrived,
        "the file did not cross while telemetry flowed; sender log:\n{}",
        pair.sender.log_text()
    );
    assert_eq!(
        std::fs::read(pair.path("mirror/report.bin")).unwrap(),
        report
    );
}
