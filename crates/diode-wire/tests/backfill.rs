//! Backfill without a return channel (wire-format.md §5.5, §6.7): what the receiver reports
//! lost stays open as gaps; records replayed from the sender's journal fill them, late, once;
//! everything else replayed is a duplicate; and the bookkeeping stays bounded.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use diode_wire::gaps::MAX_GAPS_PER_TOPIC;
use diode_wire::sim::{Impairments, SimLink, SimRng};
use diode_wire::{Encoder, EncoderConfig, Event, Reassembler, ReassemblerConfig, TopicId};

const TOPICS: [&str; 3] = ["line3/telemetry", "historian/events", "plant/big"];

struct Pair {
    encoder: Encoder,
    receiver: Reassembler,
    link: SimLink,
    topics: Vec<TopicId>,
    now: Instant,
    /// What the sender sent, as its journal would keep it: (topic, seq) -> payload.
    journal: HashMap<(usize, u64), Bytes>,
    /// (topic, seq) -> (times delivered, of which late, payload as delivered).
    delivered: HashMap<(Arc<str>, u64), (u32, u32, Bytes)>,
}

fn config(session_id: u64) -> EncoderConfig {
    EncoderConfig {
        session_id,
        data_shards: 8,
        parity_shards: 2,
        flush_interval: Duration::from_millis(2),
        heartbeat_interval: Duration::from_millis(100),
        ..Default::default()
    }
}

impl Pair {
    fn new(impairments: Impairments, seed: u64) -> Pair {
        let now = Instant::now();
        let mut encoder = Encoder::new(config(7 << 20), now).unwrap();
        let topics = TOPICS
            .iter()
            .map(|t| encoder.add_topic(t).unwrap())
            .collect();
        Pair {
            encoder,
            receiver: Reassembler::new(ReassemblerConfig::default()),
            link: SimLink::new(impairments, seed),
            topics,
            now,
            journal: HashMap::new(),
            delivered: HashMap::new(),
        }
    }

    /// Pushes `count` records spread over the topics, some large enough to be fragmented.
    fn send(&mut self, rng: &mut SimRng, count: usize) {
        for _ in 0..count {
            let topic = rng.below(TOPICS.len() as u64) as usize;
            let len = if topic == 2 {
                500 + rng.below(30_000) as usize
            } else {
                1 + rng.below(200) as usize
            };
            let payload = Bytes::from((0..len).map(|_| rng.below(256) as u8).collect::<Vec<u8>>());
            let seq = self
                .encoder
                .push(self.now, self.topics[topic], 1_000, payload.clone())
                .unwrap();
            self.journal.insert((topic, seq), payload);
            if rng.chance(0.3) {
                self.pump(Duration::from_millis(1));
            }
        }
    }

    /// Sends the records of the receiver's open gaps again, as a replay from the journal.
    fn replay_open_gaps(&mut self) -> u64 {
        let mut replayed = 0;
        for (topic, gap) in self.receiver.open_gaps() {
            let index = TOPICS.iter().position(|t| **t == *topic).unwrap();
            for seq in gap.first_seq..=gap.last_seq {
                let payload = self.journal[&(index, seq)].clone();
                self.encoder
                    .push_replay(self.now, self.topics[index], seq, 5, None, payload)
                    .unwrap();
                replayed += 1;
            }
            self.pump(Duration::from_millis(1));
        }
        replayed
    }

    fn replay_everything(&mut self) -> u64 {
        let mut all: Vec<(usize, u64)> = self.journal.keys().copied().collect();
        all.sort_unstable();
        for &(topic, seq) in &all {
            let payload = self.journal[&(topic, seq)].clone();
            self.encoder
                .push_replay(self.now, self.topics[topic], seq, 5, None, payload)
                .unwrap();
        }
        all.len() as u64
    }

    fn pump(&mut self, duration: Duration) {
        let end = self.now + duration;
        loop {
            self.encoder.handle_timeout(self.now, 0);
            while let Some(datagram) = self.encoder.poll_transmit(self.now) {
                for d in self.link.transmit(&datagram) {
                    let _ = self.receiver.handle_datagram(self.now, &d);
                }
            }
            self.receiver.handle_timeout(self.now);
            self.collect();
            if self.now >= end {
                break;
            }
            self.now += Duration::from_millis(1);
        }
    }

    /// Everything sent so far settles: flushed, then a second of heartbeats on a clean link.
    fn settle(&mut self) {
        self.encoder.flush(self.now);
        self.pump(Duration::from_millis(50));
        for d in self.link.drain() {
            let _ = self.receiver.handle_datagram(self.now, &d);
        }
        self.link = SimLink::new(Impairments::default(), 0);
        self.pump(Duration::from_secs(1));
    }

    fn collect(&mut self) {
        while let Some(event) = self.receiver.poll_event() {
            if let Event::Record(r) = event {
                let entry = self.delivered.entry((r.topic.clone(), r.seq)).or_insert((
                    0,
                    0,
                    r.payload.clone(),
                ));
                entry.0 += 1;
                entry.1 += u32::from(r.late);
                entry.2 = r.payload;
            }
        }
    }

    fn assert_exactly_once(&self) {
        for ((topic, seq), payload) in &self.journal {
            let key = (Arc::from(TOPICS[*topic]), *seq);
            let (times, _, got) = self
                .delivered
                .get(&key)
                .unwrap_or_else(|| panic!("{key:?} never delivered"));
            assert_eq!(*times, 1, "{key:?} delivered {times} times");
            assert_eq!(got, payload, "{key:?} payload");
        }
        assert_eq!(
            self.delivered.len(),
            self.journal.len(),
            "nothing else delivered"
        );
    }
}

#[test]
fn arbitrary_loss_then_a_replay_of_the_lost_ranges_delivers_every_record_exactly_once() {
    for seed in 0..24u64 {
        let mut rng = SimRng::new(seed);
        let impairments = Impairments {
            drop_rate: 0.02 + rng.below(20) as f64 / 100.0,
            burst_rate: rng.below(3) as f64 / 100.0,
            burst_len: 1 + rng.below(40) as usize,
            reorder_rate: 0.05,
            reorder_distance: 6,
            duplicate_rate: 0.02,
            corrupt_rate: 0.01,
            ..Impairments::default()
        };
        let mut pair = Pair::new(impairments.clone(), seed);
        pair.send(&mut rng, 1500);
        pair.settle();
        let lost = pair.receiver.stats().records_lost;
        assert!(lost > 0, "seed {seed}: the link lost nothing, a weak test");
        let open: u64 = pair
            .receiver
            .open_gaps()
            .iter()
            .map(|(_, g)| g.records())
            .sum();
        assert_eq!(
            open, lost,
            "seed {seed}: every lost record is in an open gap"
        );
        // The replay may itself be lost in part, over the same impaired link: go again until
        // nothing is open (the last rounds over a clean one, so the test ends).
        let mut rounds = 0;
        while pair.receiver.open_gap_count() > 0 {
            rounds += 1;
            assert!(
                rounds <= 6,
                "seed {seed}: {} gaps still open after 6 replays",
                pair.receiver.open_gap_count(),
            );
            pair.link = if rounds <= 3 {
                SimLink::new(impairments.clone(), seed + 100 * rounds)
            } else {
                SimLink::new(Impairments::default(), 0)
            };
            pair.replay_open_gaps();
            pair.settle();
        }
        pair.assert_exactly_once();
        let stats = pair.receiver.stats();
        assert_eq!(stats.records_recovered, stats.records_lost, "seed {seed}");
        let late: u32 = pair.delivered.values().map(|d| d.1).sum();
        assert_eq!(
            late as u64, stats.records_recovered,
            "late marks, seed {seed}"
        );
    }
}

#[test]
fn a_replay_of_delivered_records_delivers_nothing() {
    let mut rng = SimRng::new(5);
    let mut pair = Pair::new(Impairments::default(), 5);
    pair.send(&mut rng, 600);
    pair.settle();
    pair.assert_exactly_once();
    let replayed = pair.replay_everything();
    pair.settle();
    pair.assert_exactly_once();
    let stats = pair.receiver.stats();
    assert_eq!(stats.replayed_duplicates, replayed);
    assert_eq!(stats.records_recovered, 0);
    assert_eq!(pair.receiver.open_gap_count(), 0);
}

/// The receiver restarts (keeping its marks and gaps) and the sender restarts with its
/// numbering carried on, as with a journal: the records sent while the receiver was down are
/// one gap with its exact range, and a replay fills it.
#[test]
fn restarts_on_both_sides_leave_one_exact_gap_that_a_replay_fills() {
    let mut rng = SimRng::new(9);
    let mut pair = Pair::new(Impairments::default(), 9);
    pair.send(&mut rng, 300);
    pair.settle();
    let marks = pair.receiver.watermarks();
    let gaps = pair.receiver.open_gaps();
    // Receiver down: these go nowhere.
    let down_from: Vec<u64> = pair
        .topics
        .iter()
        .map(|t| pair.encoder.next_seq(*t).unwrap())
        .collect();
    pair.link.up = false;
    pair.send(&mut rng, 200);
    pair.settle();
    // The sender restarts too, going on from its numbers.
    let next: Vec<u64> = pair
        .topics
        .iter()
        .map(|t| pair.encoder.next_seq(*t).unwrap())
        .collect();
    let mut encoder = Encoder::new(config(8 << 20), pair.now).unwrap();
    pair.topics = TOPICS
        .iter()
        .zip(&next)
        .map(|(t, n)| encoder.add_topic_from(t, *n).unwrap())
        .collect();
    pair.encoder = encoder;
    pair.receiver = Reassembler::new(ReassemblerConfig::default());
    pair.receiver.restore_watermarks(marks);
    pair.receiver.restore_gaps(gaps);
    pair.link = SimLink::new(Impairments::default(), 1);
    pair.send(&mut rng, 300);
    pair.settle();
    let open = pair.receiver.open_gaps();
    for (i, topic) in TOPICS.iter().enumerate() {
        let expected: Vec<(u64, u64)> = (down_from[i] < next[i])
            .then_some((down_from[i], next[i] - 1))
            .into_iter()
            .collect();
        let got: Vec<(u64, u64)> = open
            .iter()
            .filter(|(t, _)| &**t == *topic)
            .map(|(_, g)| (g.first_seq, g.last_seq))
            .collect();
        assert_eq!(got, expected, "{topic}");
    }
    pair.replay_open_gaps();
    pair.settle();
    assert_eq!(pair.receiver.open_gap_count(), 0);
    pair.assert_exactly_once();
}

/// A sender without a journal starts its numbering over: the receiver neither calls the
/// records between the old mark and the new numbers lost, nor keeps the old gaps open.
#[test]
fn a_sender_that_starts_over_is_not_taken_for_loss() {
    let mut rng = SimRng::new(11);
    let mut pair = Pair::new(Impairments::default(), 11);
    pair.send(&mut rng, 400);
    pair.settle();
    pair.encoder.finish(pair.now, 0);
    pair.pump(Duration::from_millis(100));
    let mut encoder = Encoder::new(config(9 << 20), pair.now).unwrap();
    pair.topics = TOPICS
        .iter()
        .map(|t| encoder.add_topic(t).unwrap())
        .collect();
    pair.encoder = encoder;
    let lost_before = pair.receiver.stats().records_lost;
    pair.send(&mut rng, 100);
    pair.settle();
    assert_eq!(pair.receiver.stats().records_lost, lost_before);
    assert_eq!(pair.receiver.open_gap_count(), 0);
}

/// Every other block lost, for long: the open gaps stay within their cap, the oldest forgotten
/// and counted; replayed records of no open gap deliver nothing.
#[test]
fn gap_bookkeeping_stays_bounded() {
    let mut pair = Pair::new(Impairments::default(), 3);
    let topic = pair.topics[0];
    for i in 0..(MAX_GAPS_PER_TOPIC as u64 * 3) {
        pair.encoder
            .push(pair.now, topic, 0, Bytes::from(vec![i as u8; 8]))
            .unwrap();
        pair.encoder.flush(pair.now);
        pair.encoder.handle_timeout(pair.now, 0);
        while let Some(d) = pair.encoder.poll_transmit(pair.now) {
            // Every other block lost.
            if i % 2 == 0 {
                let _ = pair.receiver.handle_datagram(pair.now, &d);
            }
        }
        pair.now += Duration::from_millis(3);
        pair.receiver.handle_timeout(pair.now);
        pair.collect();
    }
    let stats = pair.receiver.stats().clone();
    assert!(stats.records_lost > MAX_GAPS_PER_TOPIC as u64);
    assert!(pair.receiver.open_gap_count() <= MAX_GAPS_PER_TOPIC);
    assert!(stats.gaps_forgotten > 0);
    pair.settle();
    // Replays of the forgotten range deliver nothing.
    for seq in 0..50 {
        pair.encoder
            .push_replay(pair.now, topic, seq, 0, None, Bytes::from_static(b"x"))
            .unwrap();
    }
    let before: Vec<_> = pair.delivered.keys().cloned().collect();
    pair.settle();
    let new: Vec<_> = pair
        .delivered
        .keys()
        .filter(|k| !before.contains(k))
        .collect();
    assert!(
        new.is_empty(),
        "{new:?} {:?}",
        pair.receiver.open_gaps().first()
    );
    let next = pair.encoder.next_seq(topic).unwrap();
    assert!(pair
        .encoder
        .push_replay(pair.now, topic, next, 0, None, Bytes::from_static(b"x"))
        .is_err());
}

/// A receiver installed fresh beside a sender whose numbering has gone on for long (a billion
/// records): it delivers from the session's first record and calls nothing before it lost,
/// rather than reporting a billion records lost or refusing the numbers as implausible.
#[test]
fn a_fresh_receiver_meets_a_sender_that_numbered_on_for_long() {
    let mut rng = SimRng::new(13);
    let mut pair = Pair::new(Impairments::default(), 13);
    let mut encoder = Encoder::new(config(10 << 20), pair.now).unwrap();
    pair.topics = TOPICS
        .iter()
        .map(|t| encoder.add_topic_from(t, 1_000_000_000).unwrap())
        .collect();
    pair.encoder = encoder;
    pair.send(&mut rng, 300);
    pair.settle();
    pair.assert_exactly_once();
    assert_eq!(pair.receiver.stats().records_lost, 0);
    assert_eq!(pair.receiver.stats().malformed_frames, 0);
}

/// A mark carried across a receiver restart, then a record far beyond what the sender could
/// have sent since (by its own clock): no gap of that size is reported.
#[test]
fn a_carried_mark_bounds_the_gap_a_forged_number_could_open() {
    let mut rng = SimRng::new(17);
    let mut pair = Pair::new(Impairments::default(), 17);
    pair.send(&mut rng, 100);
    pair.settle();
    let marks = pair.receiver.watermarks();
    let mut encoder = Encoder::new(config(11 << 20), pair.now).unwrap();
    // The same ingest time as the mark's records: no time for 2^40 more records to go by.
    pair.topics = TOPICS
        .iter()
        .map(|t| encoder.add_topic_from(t, 1 << 40).unwrap())
        .collect();
    pair.encoder = encoder;
    pair.receiver = Reassembler::new(ReassemblerConfig::default());
    pair.receiver.restore_watermarks(marks);
    pair.send(&mut rng, 50);
    pair.settle();
    assert_eq!(pair.receiver.stats().records_lost, 0);
    assert_eq!(pair.receiver.open_gap_count(), 0);
}
