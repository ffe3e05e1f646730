//! Lanes (wire-format.md §7): the real binaries with a link of two lanes, each through a relay of
//! its own standing in for a diode, so that one lane can be impaired while the other is not.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use diode_gateway::relay::{Relay, RelayConfig};
use diode_wire::sim::Impairments;

/// Topics and the lane each takes: two on each lane.
const TOPICS: [(&str, usize); 4] = [
    ("cell1/temperature", 0),
    ("cell2/pressure", 1),
    ("cell1/vibration", 0),
    ("cell2/flow", 1),
];

struct Lanes {
    dir: tempfile::TempDir,
    sender_toml: std::path::PathBuf,
    receiver_toml: std::path::PathBuf,
    sender: Service,
    receiver: Service,
    relays: Vec<Relay>,
    /// Each topic's TCP source.
    feeds: Vec<SocketAddr>,
}

impl Lanes {
    fn start(relays: [RelayConfig; 2]) -> Lanes {
        Self::start_with(relays, "", "")
    }

    /// As `start`, with more `[link]` keys and more tables (`[journal]`) for the sender.
    fn start_with(relays: [RelayConfig; 2], sender_link: &str, sender_extra: &str) -> Lanes {
        Self::start_on(
            relays,
            sender_link,
            sender_extra,
            TOPICS.map(|(_, lane)| lane),
            false,
        )
    }

    /// Clean lanes, and a sender with a journal to replay from.
    fn journaled() -> Lanes {
        Self::start_with(
            [RelayConfig::default(), RelayConfig::default()],
            "",
            "[journal]\ndir = \"journal\"",
        )
    }

    /// As `start_with`, each topic on the lane `on_lane` gives, the link authenticated or not.
    fn start_on(
        relays: [RelayConfig; 2],
        sender_link: &str,
        sender_extra: &str,
        on_lane: [usize; 4],
        authenticated: bool,
    ) -> Lanes {
        let dir = tempfile::tempdir().unwrap();
        let key_line = if authenticated {
            keygen(dir.path());
            "key_file = \"link.key\"\n"
        } else {
            ""
        };
        let listen = [free_port(), free_port()];
        let receiver_metrics = loopback(free_port());
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        let (receiver, receiver_toml) = Service::configure_and_start(
            RECV,
            dir.path(),
            "receiver",
            &format!(
                "[link]\nlisten = \"127.0.0.1:{}\"\nstate_file = \"state/receiver.state\"\n{key_line}\
                 [[link.lane]]\nlisten = \"127.0.0.1:{}\"\n\n\
                 [metrics]\nlisten = \"{receiver_metrics}\"\n\n\
                 [[route]]\ntopics = [\"#\"]\nsink = {{ kind = \"file\", path = \"out/records.jsonl\" }}\n",
                listen[0], listen[1]
            ),
            receiver_metrics,
        );
        let relays: Vec<Relay> = relays
            .into_iter()
            .zip(listen)
            .map(|(config, port)| Relay::start(loopback(port), config).unwrap())
            .collect();
        let feeds: Vec<SocketAddr> = TOPICS.iter().map(|_| loopback(free_port())).collect();
        let mut topics = String::new();
        for (((name, _), lane), feed) in TOPICS.iter().zip(on_lane).zip(&feeds) {
            topics += &format!(
                "[[topic]]\nname = \"{name}\"\nlane = {lane}\n\
                 source = {{ kind = \"tcp\", listen = \"{feed}\", framing = \"lines\" }}\n\n"
            );
        }
        let sender_metrics = loopback(free_port());
        let (sender, sender_toml) = Service::configure_and_start(
            SEND,
            dir.path(),
            "sender",
            &format!(
                "[link]\ndestination = \"{}\"\nrate_mbps = 100\nheartbeat_interval_ms = 200\n{key_line}{sender_link}\n\
                 [[link.lane]]\ndestination = \"{}\"\n\n\
                 [metrics]\nlisten = \"{sender_metrics}\"\n\n{sender_extra}\n\n{topics}",
                relays[0].listen_addr, relays[1].listen_addr
            ),
            sender_metrics,
        );
        Lanes {
            dir,
            sender_toml,
            receiver_toml,
            sender,
            receiver,
            relays,
            feeds,
        }
    }

    /// Lines `from..to` of topic `index`, each naming its topic and number.
    fn feed(&self, index: usize, from: usize, to: usize) {
        let mut stream = TcpStream::connect(self.feeds[index]).unwrap();
        let text: String = (from..to)
            .map(|n| format!("{} {n}\n", TOPICS[index].0))
            .collect();
        stream.write_all(text.as_bytes()).unwrap();
    }

    /// `feed`, then until topic `index` has `to` records delivered.
    fn feed_until_delivered(&self, index: usize, from: usize, to: usize) {
        self.feed(index, from, to);
        assert!(
            wait_for(Duration::from_secs(15), || self.count(index) == to),
            "{} of {to} records of {}; receiver log:\n{}",
            self.count(index),
            TOPICS[index].0,
            self.receiver.log_text()
        );
    }

    fn delivered(&self) -> BTreeMap<String, Vec<(u64, String)>> {
        by_topic(&read_jsonl(&self.dir.path().join("out/records.jsonl")))
    }

    fn count(&self, index: usize) -> usize {
        self.delivered()
            .get(TOPICS[index].0)
            .map_or(0, |records| records.len())
    }

    fn lane_up(&self, lane: usize) -> f64 {
        self.receiver
            .metric("diode_lane_up", &[&format!("lane=\"{lane}\"")])
    }

    /// Each record of topic `index` delivered: how many times, by number, checking each payload.
    fn tally(&self, index: usize) -> BTreeMap<u64, usize> {
        let topic = TOPICS[index].0;
        let mut tally = BTreeMap::new();
        for (seq, payload) in self.delivered().remove(topic).unwrap_or_default() {
            assert_eq!(payload, format!("{topic} {seq}"), "{topic}: record {seq}");
            *tally.entry(seq).or_default() += 1;
        }
        tally
    }

    /// Lines `from..to` of topic 1 (lane 1) fed while lane 1 is dark, all journaled; then lines
    /// `to..after` with the lane back, until the last has arrived: a gap of `from..to` behind.
    fn lose_on_lane_1(&self, from: usize, to: usize, after: usize) {
        self.relays[1].set_dark(true);
        self.feed(1, from, to);
        self.wait_journaled(1, to);
        std::thread::sleep(Duration::from_millis(300));
        self.relays[1].set_dark(false);
        self.feed(1, to, after);
        let last = after as u64 - 1;
        assert!(
            wait_for(Duration::from_secs(15), || self
                .tally(1)
                .contains_key(&last)),
            "receiver log:\n{}",
            self.receiver.log_text()
        );
    }

    /// Until the sender's journal holds `count` records of topic `index`.
    fn wait_journaled(&self, index: usize, count: usize) {
        let topic = format!("topic=\"{}\"", TOPICS[index].0);
        assert!(wait_for(Duration::from_secs(10), || self
            .sender
            .metric("diode_journal_records_total", &[&topic])
            >= count as f64));
    }

    /// `diode-send replay` of topic 1's `range`, until all `total` of its records are delivered,
    /// each once, and no gap is left open.
    fn replay_until_whole(&self, range: &str, total: usize) {
        self.replay(range);
        assert!(
            wait_for(Duration::from_secs(15), || self.tally(1).len() == total),
            "after the replay of {range}: {} of {total}; gaps: {}\nreceiver log:\n{}",
            self.tally(1).len(),
            self.gaps(),
            self.receiver.log_text()
        );
        assert!(self.tally(1).values().all(|n| *n == 1), "a record twice");
        // The state files say so within their second.
        assert!(
            wait_for(Duration::from_secs(5), || self
                .gaps()
                .contains("no open gaps")),
            "{}\nreceiver log:\n{}",
            self.gaps(),
            self.receiver.log_text()
        );
    }

    /// A clean sender restart, with topic 1 moved onto `move_topic_1_to` when given; returns
    /// once its sources listen again. `log` names the new run's log file.
    fn restart_sender(&mut self, move_topic_1_to: Option<usize>, log: &str) {
        self.sender.stop();
        if let Some(lane) = move_topic_1_to {
            let topic = TOPICS[1].0;
            let text = std::fs::read_to_string(&self.sender_toml).unwrap();
            let from = format!("name = \"{topic}\"\nlane = {}", 1 - lane);
            assert!(text.contains(&from), "{text}");
            let to = format!("name = \"{topic}\"\nlane = {lane}");
            std::fs::write(&self.sender_toml, text.replace(&from, &to)).unwrap();
        }
        let metrics = self.sender.metrics;
        self.sender = Service::start(SEND, &self.sender_toml, self.dir.path().join(log), metrics);
        assert!(wait_for(Duration::from_secs(10), || {
            TcpStream::connect(self.feeds[1]).is_ok()
        }));
    }

    /// What `diode-recv gaps` says.
    fn gaps(&self) -> String {
        let output = std::process::Command::new(RECV)
            .args(["gaps", "--config"])
            .arg(&self.receiver_toml)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `diode-send replay` of topic 1's `range` ("A-B").
    fn replay(&self, range: &str) {
        let output = std::process::Command::new(SEND)
            .args(["replay", "--config"])
            .arg(&self.sender_toml)
            .args(["--topic", TOPICS[1].0, "--seq", range])
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
    }

    /// Neither relay saw anything come back from the receiver.
    fn assert_one_way(&self) {
        for relay in &self.relays {
            assert_eq!(
                relay
                    .stats
                    .backwards
                    .load(std::sync::atomic::Ordering::Relaxed),
                0,
                "the receiver sent datagrams towards the link"
            );
        }
    }
}

/// Every record of `topic` delivered is in order, numbered as fed (the feeder's numbers are the
/// sequence numbers, both starting at 0), and none twice.
fn assert_in_order(topic: &str, records: &[(u64, String)]) {
    for pair in records.windows(2) {
        assert!(
            pair[0].0 < pair[1].0,
            "{topic}: {} delivered before {}",
            pair[0].0,
            pair[1].0
        );
    }
    for (seq, payload) in records {
        assert_eq!(payload, &format!("{topic} {seq}"), "{topic}: record {seq}");
    }
}

#[test]
fn each_topic_keeps_its_order_over_two_lanes_through_loss() {
    let lossy = || RelayConfig {
        impairments: Impairments {
            drop_rate: 0.01,
            reorder_rate: 0.02,
            reorder_distance: 3,
            ..Impairments::default()
        },
        seed: 7,
    };
    let lanes = Lanes::start([lossy(), lossy()]);
    let per_topic = 4000;
    for index in 0..TOPICS.len() {
        lanes.feed(index, 0, per_topic);
    }
    let all_in = wait_for(Duration::from_secs(30), || {
        (0..TOPICS.len()).all(|i| lanes.count(i) == per_topic)
    });
    let delivered = lanes.delivered();
    assert!(
        all_in,
        "delivered per topic: {:?}; receiver log:\n{}",
        delivered
            .iter()
            .map(|(t, r)| (t.clone(), r.len()))
            .collect::<Vec<_>>(),
        lanes.receiver.log_text()
    );
    for (topic, records) in &delivered {
        assert_in_order(topic, records);
    }
    // Each lane carried its own topics' data, not only heartbeats: 8,000 lines of about 24
    // bytes are some 130 datagrams of data alone.
    for relay in &lanes.relays {
        let received = relay
            .stats
            .received
            .load(std::sync::atomic::Ordering::Relaxed);
        assert!(received > 130, "a lane carried {received} datagrams");
    }
    // Both sides count per lane. The receiver is read first: heartbeats go on meanwhile, so
    // what it counted can only be behind what the sender counts after it.
    for lane in 0..2 {
        let label = format!("lane=\"{lane}\"");
        let received = lanes
            .receiver
            .metric("diode_lane_datagrams_received_total", &[&label]);
        let sent = lanes
            .sender
            .metric("diode_lane_datagrams_sent_total", &[&label]);
        assert!(
            sent > 0.0 && received > 0.0,
            "lane {lane}: sent {sent}, received {received}"
        );
        assert!(
            received <= sent,
            "lane {lane}: received {received} of {sent} sent"
        );
        assert_eq!(lanes.lane_up(lane), 1.0);
    }
    assert_eq!(lanes.receiver.metric("diode_link_up", &[]), 1.0);
    assert_eq!(
        lanes
            .receiver
            .metric("diode_lane_topic_conflicts_total", &[]),
        0.0
    );
    // The status page (lane 0's) shows every lane's state and every lane's topics.
    let status = || http_get(lanes.receiver.metrics, "/status.json");
    assert!(
        wait_for(Duration::from_secs(5), || {
            let status = status();
            status.contains("lane 0 up, lane 1 up")
                && TOPICS.iter().all(|(topic, _)| status.contains(topic))
        }),
        "{}",
        status()
    );
    // The relays' loss was repaired, not reported.
    assert!(
        !lanes
            .receiver
            .log_text()
            .contains("records lost beyond repair"),
        "{}",
        lanes.receiver.log_text()
    );
    lanes.assert_one_way();
}

#[test]
fn a_lane_that_goes_silent_is_reported_and_the_other_carries_on() {
    let lanes = Lanes::start([RelayConfig::default(), RelayConfig::default()]);
    for index in 0..TOPICS.len() {
        lanes.feed(index, 0, 100);
    }
    assert!(
        wait_for(Duration::from_secs(15), || (0..TOPICS.len())
            .all(|i| lanes.count(i) == 100)),
        "first records; receiver log:\n{}",
        lanes.receiver.log_text()
    );
    assert!(wait_for(Duration::from_secs(5), || lanes.lane_up(0) == 1.0
        && lanes.lane_up(1) == 1.0));

    // Lane 1's diode goes dark. Lane 0 goes on delivering; lane 1 is reported down (four
    // heartbeat intervals of 200 ms), and the link as a whole with it.
    lanes.relays[1].set_dark(true);
    std::thread::sleep(Duration::from_millis(300));
    for index in 0..TOPICS.len() {
        lanes.feed(index, 100, 600);
    }
    assert!(
        wait_for(Duration::from_secs(15), || lanes.count(0) == 600
            && lanes.count(2) == 600),
        "lane 0's topics while lane 1 is dark; receiver log:\n{}",
        lanes.receiver.log_text()
    );
    assert!(
        wait_for(Duration::from_secs(5), || lanes.lane_up(1) == 0.0),
        "lane 1 not reported down; receiver log:\n{}",
        lanes.receiver.log_text()
    );
    assert_eq!(lanes.lane_up(0), 1.0);
    assert_eq!(lanes.receiver.metric("diode_link_up", &[]), 0.0);
    assert_eq!(lanes.count(1), 100, "lane 1 delivered through the dark");
    let log = lanes.receiver.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("link down") && l.contains("lane=1")),
        "no 'link down' line naming lane 1:\n{log}"
    );

    // Lane 1 comes back: it is up again, what it lost in the dark is reported with its ranges,
    // and what follows arrives in order.
    lanes.relays[1].set_dark(false);
    for index in [1, 3] {
        lanes.feed(index, 600, 700);
    }
    let lost = |topic: &str| records_lost_in_log(&lanes.receiver.log_text(), Some(topic));
    assert!(
        wait_for(Duration::from_secs(15), || lanes.lane_up(1) == 1.0
            && [1, 3].iter().all(|&i| {
                let records = lanes.delivered();
                records
                    .get(TOPICS[i].0)
                    .is_some_and(|r| r.last().is_some_and(|last| last.0 == 699))
            })),
        "lane 1 did not come back; receiver log:\n{}",
        lanes.receiver.log_text()
    );
    let delivered = lanes.delivered();
    for index in [1, 3] {
        let (topic, _) = TOPICS[index];
        let records = &delivered[topic];
        assert_in_order(topic, records);
        assert_eq!(
            records.len() + lost(topic),
            700,
            "{topic}: every record delivered or reported lost; receiver log:\n{}",
            lanes.receiver.log_text()
        );
        assert!(lost(topic) > 0, "{topic}: the dark lost nothing?");
    }
    for index in [0, 2] {
        let (topic, _) = TOPICS[index];
        assert_eq!(delivered[topic].len(), 600);
        assert_in_order(topic, &delivered[topic]);
        assert_eq!(
            lost(topic),
            0,
            "{topic} lost records on the lane that stayed up"
        );
    }
    lanes.assert_one_way();
}

#[test]
fn a_lane_whose_datagrams_are_all_corrupted_is_refused_and_the_other_carries_on() {
    let corrupting = RelayConfig {
        impairments: Impairments {
            corrupt_rate: 1.0,
            ..Impairments::default()
        },
        seed: 11,
    };
    let lanes = Lanes::start([RelayConfig::default(), corrupting]);
    for index in 0..TOPICS.len() {
        lanes.feed(index, 0, 1000);
    }
    assert!(
        wait_for(Duration::from_secs(15), || lanes.count(0) == 1000
            && lanes.count(2) == 1000),
        "lane 0's topics; receiver log:\n{}",
        lanes.receiver.log_text()
    );
    let lane1 = ["lane=\"1\""];
    assert!(
        wait_for(Duration::from_secs(5), || {
            let received = lanes
                .receiver
                .metric("diode_lane_datagrams_received_total", &lane1);
            let rejected = lanes
                .receiver
                .metric("diode_lane_datagrams_rejected_total", &lane1);
            received > 10.0 && rejected == received
        }),
        "every datagram of lane 1 rejected: {}",
        lanes.receiver.metrics_text()
    );
    assert!(
        lanes
            .receiver
            .metric("diode_datagrams_rejected_total", &["reason=\"crc\""])
            > 0.0
    );
    assert_eq!(
        lanes
            .receiver
            .metric("diode_lane_datagrams_rejected_total", &["lane=\"0\""]),
        0.0
    );
    // Nothing of a corrupted lane is delivered, and it never counts as up.
    assert_eq!(lanes.count(1) + lanes.count(3), 0);
    assert_eq!(lanes.lane_up(1), 0.0);
    assert_eq!(lanes.lane_up(0), 1.0);
    assert_eq!(lanes.receiver.metric("diode_link_up", &[]), 0.0);
    for index in [0, 2] {
        let (topic, _) = TOPICS[index];
        assert_in_order(topic, &lanes.delivered()[topic]);
    }
    lanes.assert_one_way();
}

/// A lane's topic, journaled: what a dark lane lost is listed by `diode-recv gaps` (which reads
/// every lane's state) and replayed through that lane; a sender restart goes on numbering each
/// lane's topics from where they stopped.
#[test]
fn a_journaled_lane_replays_what_it_lost_and_keeps_its_numbers_across_a_restart() {
    let mut lanes = Lanes::journaled();
    let (topic, _) = TOPICS[1];
    lanes.feed(0, 0, 500);
    lanes.feed(1, 0, 500);
    assert!(wait_for(Duration::from_secs(15), || lanes.count(0) == 500
        && lanes.count(1) == 500));
    lanes.lose_on_lane_1(500, 1000, 1100);

    // The gap is listed from lane 1's state file, and replayed through lane 1.
    assert!(
        wait_for(Duration::from_secs(5), || lanes.gaps().contains(topic)),
        "{}",
        lanes.gaps()
    );
    let listed = lanes.gaps();
    let ranges: Vec<String> = listed
        .lines()
        .filter_map(|l| {
            l.split(&format!("diode-send replay --topic '{topic}' --seq "))
                .nth(1)
                .map(|r| r.split_whitespace().next().unwrap_or("").to_owned())
        })
        .collect();
    assert!(!ranges.is_empty(), "{listed}");
    for range in &ranges {
        lanes.replay(range);
    }
    assert!(
        wait_for(Duration::from_secs(15), || lanes.tally(1).len() == 1100),
        "after the replay of {ranges:?}: {} of 1100; receiver log:\n{}",
        lanes.tally(1).len(),
        lanes.receiver.log_text()
    );

    restart_and_go_on(&mut lanes, [500, 1100]);
}

/// Without a journal, `link.state_file` keeps every lane's numbers: the lane that stops last
/// writes them all, each lane's own.
#[test]
fn a_sender_state_file_keeps_every_lanes_numbers() {
    let mut lanes = Lanes::start_with(
        [RelayConfig::default(), RelayConfig::default()],
        "state_file = \"sender.state\"",
        "",
    );
    lanes.feed(0, 0, 300);
    lanes.feed(1, 0, 700);
    assert!(wait_for(Duration::from_secs(15), || lanes.count(0) == 300
        && lanes.count(1) == 700));
    restart_and_go_on(&mut lanes, [300, 700]);
    assert!(
        !lanes
            .receiver
            .log_text()
            .contains("records lost beyond repair"),
        "a clean restart lost records:\n{}",
        lanes.receiver.log_text()
    );
}

/// A lane made ready before any topic is on it sends heartbeats and stays up.
#[test]
fn a_lane_without_topics_stays_up() {
    let lanes = Lanes::start_on(
        [RelayConfig::default(), RelayConfig::default()],
        "",
        "",
        [0; 4],
        false,
    );
    lanes.feed_until_delivered(0, 0, 100);
    assert!(
        wait_for(Duration::from_secs(5), || lanes.lane_up(1) == 1.0
            && lanes.receiver.metric("diode_link_up", &[]) == 1.0),
        "{}",
        lanes.receiver.metrics_text()
    );
    // Still up well past four heartbeat intervals: the idle lane did not stop.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(lanes.lane_up(1), 1.0);
    lanes.assert_one_way();
}

/// A topic moved to the other lane by a sender restart goes on there at once, with nothing
/// refused; the gap it left open on its old lane moves with it, before any record of the topic,
/// and a replay fills it; moved back, it is not taken for lost on the lane it left.
#[test]
fn a_topic_moved_to_another_lane_goes_on_there_with_its_open_gaps() {
    let mut lanes = Lanes::journaled();
    let (topic, _) = TOPICS[1];
    lanes.feed_until_delivered(1, 0, 300);
    lanes.lose_on_lane_1(300, 500, 600);
    assert!(records_lost_in_log(&lanes.receiver.log_text(), Some(topic)) > 0);

    // Onto lane 0.
    lanes.restart_sender(Some(0), "sender2.log");
    // The gap moves to lane 0's state on the new session's heartbeats alone, before any record of
    // the topic: a replay straight after the move is filled through lane 0.
    let state0 = lanes.dir.path().join("state/receiver.state");
    assert!(
        wait_for(Duration::from_secs(10), || std::fs::read_to_string(&state0)
            .is_ok_and(|t| t.contains(topic) && t.contains("300"))),
        "the gap did not move to lane 0's state: {}",
        lanes.gaps()
    );
    lanes.replay_until_whole("300-499", 600);
    lanes.feed(1, 600, 700);
    assert!(
        wait_for(Duration::from_secs(15), || lanes.tally(1).len() == 700),
        "after the move; receiver log:\n{}",
        lanes.receiver.log_text()
    );
    assert_eq!(
        lanes
            .receiver
            .metric("diode_lane_topic_conflicts_total", &[]),
        0.0
    );
    assert!(lanes.gaps().contains("no open gaps"), "{}", lanes.gaps());

    // And back onto lane 1: nothing is called lost there.
    let lost_before = records_lost_in_log(&lanes.receiver.log_text(), Some(topic));
    lanes.restart_sender(Some(1), "sender3.log");
    lanes.feed(1, 700, 800);
    assert!(
        wait_for(Duration::from_secs(15), || lanes.tally(1).len() == 800),
        "after moving back: {} of 800; receiver log:\n{}",
        lanes.tally(1).len(),
        lanes.receiver.log_text()
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        records_lost_in_log(&lanes.receiver.log_text(), Some(topic)),
        lost_before,
        "moving back reported records lost:\n{}",
        lanes.receiver.log_text()
    );
    assert!(lanes.tally(1).values().all(|n| *n == 1), "a record twice");
    assert!(lanes.gaps().contains("no open gaps"), "{}", lanes.gaps());
    lanes.assert_one_way();
}

/// The receiver stopped while topic 1 went on over lane 1, then came back with the sender
/// restarted and the topic moved to lane 0, and lane 1 saw nothing of the old session again (it
/// was dark until the sender had restarted): what was sent while the receiver was down is
/// reported lost on lane 0, from the mark lane 1's state file kept, and a replay fills it.
#[test]
fn what_a_moved_topic_sent_while_the_receiver_was_down_is_reported_on_its_new_lane() {
    let mut lanes = Lanes::journaled();
    let (topic, _) = TOPICS[1];
    lanes.feed_until_delivered(1, 0, 300);
    lanes.receiver.stop();
    lanes.relays[1].set_dark(true);
    lanes.feed(1, 300, 500);
    lanes.wait_journaled(1, 500);
    lanes.receiver = Service::start(
        RECV,
        &lanes.receiver_toml,
        lanes.dir.path().join("receiver2.log"),
        lanes.receiver.metrics,
    );
    lanes.restart_sender(Some(0), "sender2.log");
    lanes.relays[1].set_dark(false);
    lanes.feed(1, 500, 600);
    assert!(
        wait_for(Duration::from_secs(15), || lanes
            .tally(1)
            .contains_key(&599)),
        "receiver log:\n{}\nsender log:\n{}",
        lanes.receiver.log_text(),
        lanes.sender.log_text()
    );
    assert!(
        wait_for(Duration::from_secs(5), || lanes
            .gaps()
            .contains(&format!("--topic '{topic}' --seq 300-499"))),
        "{}\nreceiver log:\n{}",
        lanes.gaps(),
        lanes.receiver.log_text()
    );
    assert_eq!(
        records_lost_in_log(&lanes.receiver.log_text(), Some(topic)),
        200,
        "{}",
        lanes.receiver.log_text()
    );
    lanes.replay_until_whole("300-499", 600);
    lanes.assert_one_way();
}

/// Authenticated, both lanes: a topic moved by a sender restart goes on at once on its new lane,
/// and nothing is refused, lost or delivered twice.
#[test]
fn on_an_authenticated_link_a_moved_topic_goes_on_at_once() {
    let mut lanes = Lanes::start_on(
        [RelayConfig::default(), RelayConfig::default()],
        "state_file = \"sender.state\"",
        "",
        TOPICS.map(|(_, lane)| lane),
        true,
    );
    for index in 0..TOPICS.len() {
        lanes.feed(index, 0, 300);
    }
    assert!(wait_for(Duration::from_secs(15), || (0..TOPICS.len())
        .all(|i| lanes.count(i) == 300)));
    lanes.restart_sender(Some(0), "sender2.log");
    for index in 0..TOPICS.len() {
        lanes.feed(index, 300, 400);
    }
    assert!(
        wait_for(Duration::from_secs(15), || (0..TOPICS.len())
            .all(|i| lanes.count(i) == 400)),
        "receiver log:\n{}",
        lanes.receiver.log_text()
    );
    for (topic, records) in &lanes.delivered() {
        assert_in_order(topic, records);
    }
    assert_eq!(
        lanes
            .receiver
            .metric("diode_lane_topic_conflicts_total", &[]),
        0.0
    );
    assert_eq!(
        lanes
            .receiver
            .metric("diode_datagrams_rejected_total", &["reason=\"auth\""]),
        0.0
    );
    assert!(lanes
        .receiver
        .log_text()
        .contains("topic moved to this lane"));
    assert!(
        !lanes
            .receiver
            .log_text()
            .contains("records lost beyond repair"),
        "{}",
        lanes.receiver.log_text()
    );
    lanes.assert_one_way();
}

/// A clean sender restart, then 100 more lines for topics 0 (lane 0) and 1 (lane 1), numbered on
/// from `next`: each must arrive with the number it was fed with, once.
fn restart_and_go_on(lanes: &mut Lanes, next: [usize; 2]) {
    lanes.restart_sender(None, "sender2.log");
    lanes.feed(0, next[0], next[0] + 100);
    lanes.feed(1, next[1], next[1] + 100);
    assert!(
        wait_for(Duration::from_secs(15), || lanes.count(0) == next[0] + 100
            && lanes.tally(1).len() == next[1] + 100),
        "after the restart: {} and {}; receiver log:\n{}",
        lanes.count(0),
        lanes.tally(1).len(),
        lanes.receiver.log_text()
    );
    assert!(lanes.tally(1).values().all(|n| *n == 1), "a record twice");
    assert_in_order(TOPICS[0].0, &lanes.delivered()[TOPICS[0].0]);
    lanes.assert_one_way();
}
