//! Encoder and reassembler joined by an impaired in-memory link on a virtual clock.
//!
//! The guarantees checked, whatever the impairment:
//! - every record delivered is exactly the one sent under that topic and sequence number;
//! - per topic, records come out in order and at most once;
//! - every record sent is either delivered or inside a reported gap, never both;
//! - a block that lost at most its parity count of datagrams is always rebuilt;
//! - no input makes the reassembler panic, and its memory stays under its cap.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use bytes::Bytes;
use diode_wire::datagram;
use diode_wire::proto::Origin;
use diode_wire::sim::{Impairments, SimLink, SimRng};
use diode_wire::{
    Encoder, EncoderConfig, Event, LinkKey, Reassembler, ReassemblerConfig, Rejected, TopicId,
};
use proptest::prelude::*;

/// A record as the encoder took it: its origin and payload.
type SentRecord = (Option<Origin>, Bytes);

/// Decides per datagram whether the link carries it.
type DropFilter = Box<dyn FnMut(&[u8]) -> bool>;

const TOPICS: [&str; 3] = ["line3/telemetry", "historian/events", "plant/big"];

fn encoder_config(session_id: u64) -> EncoderConfig {
    EncoderConfig {
        session_id,
        session_start_time_us: 1_700_000_000_000_000,
        ..Default::default()
    }
}

struct Harness {
    encoder: Encoder,
    topics: Vec<TopicId>,
    receiver: Reassembler,
    link: SimLink,
    now: Instant,
    /// (session, topic) -> seq -> (origin, payload)
    sent: HashMap<(u64, String), BTreeMap<u64, SentRecord>>,
    delivered: HashMap<(u64, String), Vec<u64>>,
    gaps: HashMap<(u64, String), Vec<(u64, u64)>>,
    events: Vec<Event>,
    session: u64,
    receiver_session: Option<u64>,
    /// Optional filter deciding per datagram whether the link carries it.
    drop_filter: Option<DropFilter>,
}

impl Harness {
    fn new(impairments: Impairments, seed: u64) -> Self {
        Self::with_keys(impairments, seed, None, Vec::new())
    }

    /// The sender signs with `key`; the receiver accepts `receiver_keys`.
    fn with_keys(
        impairments: Impairments,
        seed: u64,
        key: Option<LinkKey>,
        receiver_keys: Vec<LinkKey>,
    ) -> Self {
        let now = Instant::now();
        // Non-zero, and with room for the larger ids of restarted senders.
        let session = 0x5E55_0000 + seed % (1 << 40) + 1;
        let config = EncoderConfig {
            key,
            ..encoder_config(session)
        };
        let mut encoder = Encoder::new(config, now).unwrap();
        let topics = TOPICS
            .iter()
            .map(|t| encoder.add_topic(t).unwrap())
            .collect();
        Harness {
            encoder,
            topics,
            receiver: Reassembler::new(ReassemblerConfig {
                keys: receiver_keys,
                ..ReassemblerConfig::default()
            }),
            link: SimLink::new(impairments, seed),
            now,
            sent: HashMap::new(),
            delivered: HashMap::new(),
            gaps: HashMap::new(),
            events: Vec::new(),
            session,
            receiver_session: None,
            drop_filter: None,
        }
    }

    fn wall_us(&self) -> i64 {
        1_700_000_000_000_000
    }

    /// Records of every topic carry an origin, except every third one: batches and fragments
    /// with and without origins, in every mix, cross every test.
    fn push(&mut self, topic: usize, payload: Bytes) {
        let key = (self.session, TOPICS[topic].to_owned());
        let next = self.sent.get(&key).map_or(0, |s| s.len() as u64);
        let origin = ((next + topic as u64) % 3 != 0).then(|| Origin {
            topic: format!("plant/{topic}/device{}", next % 7),
            qos: (next % 3) as u32,
            retain: next % 2 == 0,
            protocol: "mqtt".into(),
        });
        let seq = self
            .encoder
            .push_with_origin(
                self.now,
                self.topics[topic],
                self.wall_us(),
                origin.clone(),
                payload.clone(),
            )
            .unwrap();
        self.sent
            .entry(key)
            .or_default()
            .insert(seq, (origin, payload));
    }

    /// Replaces the sender with one built from `config`, with the same topics.
    fn replace_encoder(&mut self, config: EncoderConfig) {
        self.encoder = Encoder::new(config, self.now).unwrap();
        self.topics = TOPICS
            .iter()
            .map(|t| self.encoder.add_topic(t).unwrap())
            .collect();
    }

    /// Advances the virtual clock, moving everything the encoder has through the link.
    fn step(&mut self, dt: Duration) {
        self.now += dt;
        self.encoder.handle_timeout(self.now, self.wall_us());
        while let Some(d) = self.encoder.poll_transmit(self.now) {
            if let Some(filter) = self.drop_filter.as_mut() {
                if !filter(&d) {
                    continue;
                }
            }
            for out in self.link.transmit(&d) {
                let _ = self.receiver.handle_datagram(self.now, &out);
                self.collect();
            }
        }
        // Reordering is bounded in time: what the link held back comes out by the end of the step.
        for out in self.link.drain() {
            let _ = self.receiver.handle_datagram(self.now, &out);
        }
        self.receiver.handle_timeout(self.now);
        self.collect();
        assert!(self.receiver.inflight_bytes() <= ReassemblerConfig::default().max_inflight_bytes);
    }

    /// Runs until two heartbeats sent after the last record have arrived (they report tail
    /// losses) and every timeout has fired; a heavily impaired link may need many tries.
    fn settle(&mut self) {
        let start = self.receiver.stats().heartbeats;
        for step in 0..24_000 {
            self.step(Duration::from_millis(5));
            if step >= 300 && self.receiver.stats().heartbeats >= start + 2 {
                return;
            }
        }
        panic!("no heartbeat got through in two virtual minutes");
    }

    fn collect(&mut self) {
        while let Some(event) = self.receiver.poll_event() {
            match &event {
                Event::SessionStarted { session_id, .. } => {
                    self.receiver_session = Some(*session_id)
                }
                Event::Record(r) => {
                    let key = (self.receiver_session.unwrap(), r.topic.to_string());
                    let expected = self.sent.get(&key).and_then(|s| s.get(&r.seq));
                    assert_eq!(
                        expected,
                        Some(&(r.origin.clone(), r.payload.clone())),
                        "wrong record {}#{}",
                        r.topic,
                        r.seq
                    );
                    self.delivered.entry(key).or_default().push(r.seq);
                }
                Event::Gap(g) => {
                    let key = (self.receiver_session.unwrap(), g.topic.to_string());
                    self.gaps
                        .entry(key)
                        .or_default()
                        .push((g.first_seq, g.last_seq));
                }
                _ => {}
            }
            self.events.push(event);
        }
    }

    /// Delivered in order, once, and delivered + gaps cover all that was sent (from `from_seq`).
    fn check_accounting(&self, session: u64, complete_from_start: bool) {
        for (key, sent) in self.sent.iter().filter(|(k, _)| k.0 == session) {
            let delivered = self.delivered.get(key).cloned().unwrap_or_default();
            assert!(
                delivered.windows(2).all(|w| w[0] < w[1]),
                "{key:?} out of order or twice"
            );
            let mut covered: Vec<u64> = delivered.clone();
            for (first, last) in self.gaps.get(key).into_iter().flatten() {
                for seq in *first..=*last {
                    assert!(
                        !delivered.contains(&seq),
                        "{key:?} #{seq} both delivered and lost"
                    );
                    covered.push(seq);
                }
            }
            covered.sort_unstable();
            let before = covered.len();
            covered.dedup();
            assert_eq!(before, covered.len(), "{key:?}: a record reported twice");
            let all: Vec<u64> = sent.keys().copied().collect();
            let expected: Vec<u64> = match (complete_from_start, covered.first()) {
                (true, _) => all,
                (false, Some(first)) => all.into_iter().filter(|s| s >= first).collect(),
                (false, None) => Vec::new(),
            };
            if covered != expected {
                let missing: Vec<u64> = expected
                    .iter()
                    .filter(|s| !covered.contains(s))
                    .copied()
                    .collect();
                let extra: Vec<u64> = covered
                    .iter()
                    .filter(|s| !expected.contains(s))
                    .copied()
                    .collect();
                panic!(
                    "{key:?}: {} records neither delivered nor reported lost (first {:?}), {} unknown (first {:?}); \
                     delivered {}, gaps {:?}, stats {:?}",
                    missing.len(), missing.first(), extra.len(), extra.first(), delivered.len(),
                    self.gaps.get(key), self.receiver.stats()
                );
            }
        }
    }

    fn lost_records(&self) -> u64 {
        self.receiver.stats().records_lost
    }
}

fn payload(rng: &mut SimRng, max: usize) -> Bytes {
    let len = rng.below(max as u64 + 1) as usize;
    Bytes::from((0..len).map(|_| rng.next_u64() as u8).collect::<Vec<_>>())
}

/// Offers a mix of small telemetry, medium events and occasional large records.
fn drive(h: &mut Harness, rng: &mut SimRng, steps: usize) {
    for _ in 0..steps {
        for _ in 0..rng.below(40) {
            h.push(0, payload(rng, 120));
        }
        if rng.chance(0.3) {
            h.push(1, payload(rng, 3000));
        }
        if rng.chance(0.02) {
            h.push(2, payload(rng, 200_000));
        }
        h.step(Duration::from_millis(1 + rng.below(3)));
    }
}

#[test]
fn clean_link_delivers_everything_in_order() {
    let mut h = Harness::new(Impairments::default(), 1);
    let mut rng = SimRng::new(1);
    drive(&mut h, &mut rng, 500);
    h.settle();
    h.check_accounting(h.session, true);
    assert_eq!(h.lost_records(), 0);
    assert_eq!(h.receiver.stats().blocks_lost, 0);
    assert!(h.receiver.stats().heartbeats > 0);
    assert!(h.events.iter().any(|e| matches!(e, Event::LinkUp)));
}

#[test]
fn a_lone_small_record_costs_two_small_datagrams() {
    let mut h = Harness::new(Impairments::default(), 2);
    h.step(Duration::from_millis(1)); // the start-up heartbeat
    let before = h.encoder.stats().clone();
    h.push(0, Bytes::from(vec![7u8; 100]));
    h.step(Duration::from_millis(6));
    let after = h.encoder.stats();
    assert_eq!(after.datagrams_out - before.datagrams_out, 2);
    let wire = after.wire_bytes_out - before.wire_bytes_out;
    assert!(
        wire < 2 * (100 + 60 + 58),
        "a 100-byte record cost {wire} wire bytes"
    );
}

#[test]
fn bursts_are_spread_by_interleaving() {
    // One burst of 24 consecutive datagrams in every 400. A group of 4 full blocks is 160
    // datagrams sent round-robin, so a burst costs each block at most 6 of its 8 parity shards.
    let mut h = Harness::new(Impairments::default(), 4);
    let mut rng = SimRng::new(4);
    let mut position = 0u64;
    h.drop_filter = Some(Box::new(move |_: &[u8]| {
        position += 1;
        position % 400 >= 24
    }));
    for _ in 0..40 {
        // 40 full blocks at once, so that every group is a full one.
        for _ in 0..20 {
            h.push(2, payload(&mut rng, 100_000));
        }
        h.step(Duration::from_millis(2));
    }
    h.settle();
    h.check_accounting(h.session, true);
    assert!(
        h.receiver.stats().blocks_recovered > 50,
        "{:?}",
        h.receiver.stats()
    );
    assert_eq!(
        h.receiver.stats().blocks_lost,
        0,
        "{:?}",
        h.receiver.stats()
    );
    // Without interleaving the same bursts would cost whole blocks: a control run with depth 1.
    let mut control = Harness::new(Impairments::default(), 4);
    control.replace_encoder(EncoderConfig {
        interleave_depth: 1,
        ..encoder_config(control.session)
    });
    let mut position = 0u64;
    control.drop_filter = Some(Box::new(move |_: &[u8]| {
        position += 1;
        position % 400 >= 24
    }));
    let mut rng = SimRng::new(4);
    for _ in 0..40 {
        for _ in 0..20 {
            control.push(2, payload(&mut rng, 100_000));
        }
        control.step(Duration::from_millis(2));
    }
    control.settle();
    control.check_accounting(control.session, true);
    assert!(control.receiver.stats().blocks_lost > 10);
}

#[test]
fn heavy_loss_is_reported_as_exact_gaps() {
    let impairments = Impairments {
        drop_rate: 0.25,
        ..Impairments::default()
    };
    let mut h = Harness::new(impairments, 5);
    let mut rng = SimRng::new(5);
    drive(&mut h, &mut rng, 400);
    h.settle();
    h.check_accounting(h.session, true);
    assert!(h.receiver.stats().blocks_lost > 0);
    assert!(h.lost_records() > 0);
}

#[test]
fn tail_loss_is_reported_by_the_next_heartbeat() {
    let mut h = Harness::new(Impairments::default(), 6);
    h.step(Duration::from_millis(1));
    for _ in 0..5 {
        h.push(1, Bytes::from_static(b"kept"));
    }
    h.step(Duration::from_millis(10));
    // The last three records of the topic are sent into a dead link; then it goes quiet.
    h.link.up = false;
    for _ in 0..3 {
        h.push(1, Bytes::from_static(b"lost"));
    }
    h.step(Duration::from_millis(10));
    h.link.up = true;
    h.settle();
    let key = (h.session, TOPICS[1].to_owned());
    assert_eq!(h.gaps.get(&key), Some(&vec![(5, 7)]));
    h.check_accounting(h.session, true);
}

#[test]
fn blackhole_then_recovery() {
    let mut h = Harness::new(Impairments::default(), 7);
    let mut rng = SimRng::new(7);
    drive(&mut h, &mut rng, 100);
    h.link.up = false;
    drive(&mut h, &mut rng, 2500); // several seconds of silence on the far side
    h.link.up = true;
    drive(&mut h, &mut rng, 200);
    h.settle();
    h.check_accounting(h.session, true);
    let down = h.events.iter().position(|e| matches!(e, Event::LinkDown));
    let up_again = h.events.iter().rposition(|e| matches!(e, Event::LinkUp));
    assert!(down.is_some() && up_again > down, "link down then up again");
    assert!(h.lost_records() > 0);
}

#[test]
fn sender_restart_starts_a_new_session() {
    let mut h = Harness::new(Impairments::default(), 8);
    let mut rng = SimRng::new(8);
    drive(&mut h, &mut rng, 100);
    // A clean stop sends what it holds and says so in its last heartbeat, so the new session
    // takes over at once.
    h.encoder.finish(h.now, h.wall_us());
    h.step(Duration::from_millis(10));
    let old = h.session;
    h.session = old + 1000;
    h.replace_encoder(encoder_config(h.session));
    drive(&mut h, &mut rng, 100);
    h.settle();
    h.check_accounting(old, true);
    h.check_accounting(h.session, true);
    assert!(h.events.iter().any(|e| matches!(e,
        Event::SessionStarted { session_id, previous: Some(p), .. } if *session_id == h.session && *p == old)));
    assert_eq!(h.lost_records(), 0);
}

/// A killed sender says nothing: its new session waits until the old one has been quiet for two
/// heartbeat intervals (a session still sending cannot be displaced), and what that costs is
/// reported, never silent.
#[test]
fn a_crashed_sender_is_replaced_once_its_session_goes_quiet() {
    let mut h = Harness::new(Impairments::default(), 18);
    let mut rng = SimRng::new(18);
    drive(&mut h, &mut rng, 100);
    h.encoder.flush(h.now);
    h.step(Duration::from_millis(10));
    let old = h.session;
    h.session = old + 1000;
    h.replace_encoder(encoder_config(h.session));
    drive(&mut h, &mut rng, 2500);
    h.settle();
    h.check_accounting(old, true);
    h.check_accounting(h.session, true);
    assert_eq!(h.receiver.session_id(), Some(h.session));
    let delivered: usize = h
        .delivered
        .iter()
        .filter(|(k, _)| k.0 == h.session)
        .map(|(_, v)| v.len())
        .sum();
    let sent: usize = h
        .sent
        .iter()
        .filter(|(k, _)| k.0 == h.session)
        .map(|(_, v)| v.len())
        .sum();
    assert!(
        delivered * 2 > sent,
        "the new session delivered {delivered} of {sent}"
    );
}

/// One forged datagram carrying a heartbeat of a new session used to retire the genuine one.
#[test]
fn a_forged_heartbeat_cannot_retire_a_live_session() {
    let mut h = Harness::new(Impairments::default(), 19);
    let mut rng = SimRng::new(19);
    drive(&mut h, &mut rng, 100);
    let session = h.receiver.session_id();
    let mut forger = Encoder::new(encoder_config(h.session + 5), h.now).unwrap();
    forger.handle_timeout(h.now, 0);
    while let Some(d) = forger.poll_transmit(h.now) {
        assert_eq!(
            h.receiver.handle_datagram(h.now, &d),
            Err(Rejected::Unconfirmed)
        );
    }
    drive(&mut h, &mut rng, 400);
    h.settle();
    assert_eq!(
        h.receiver.session_id(),
        session,
        "a forged heartbeat took over"
    );
    h.check_accounting(h.session, true);
    assert_eq!(h.lost_records(), 0);
    let delivered: usize = h.delivered.values().map(Vec::len).sum();
    let sent: usize = h.sent.values().map(|v| v.len()).sum();
    assert_eq!(delivered, sent);
}

/// A forged session can get in only while the genuine one is silent (the link was down); when
/// the genuine one is heard again it takes the link back, and what it sent meanwhile is
/// reported lost with exact ranges instead of being dropped as `stale`.
#[test]
fn a_displaced_session_comes_back_with_its_losses_counted() {
    let mut h = Harness::new(Impairments::default(), 20);
    let mut rng = SimRng::new(20);
    drive(&mut h, &mut rng, 100);
    let genuine = h.session;
    h.drop_filter = Some(Box::new(|_| false));
    drive(&mut h, &mut rng, 700);
    let mut forger = Encoder::new(encoder_config(genuine + 5), h.now).unwrap();
    forger.finish(h.now, 0);
    while let Some(d) = forger.poll_transmit(h.now) {
        let _ = h.receiver.handle_datagram(h.now, &d);
    }
    h.collect();
    assert_eq!(h.receiver.session_id(), Some(genuine + 5));
    h.drop_filter = None;
    drive(&mut h, &mut rng, 600);
    h.settle();
    assert_eq!(
        h.receiver.session_id(),
        Some(genuine),
        "the genuine sender is back"
    );
    h.check_accounting(genuine, true);
    assert!(h.lost_records() > 0);
    let delivered_after: usize = h
        .delivered
        .get(&(genuine, TOPICS[0].to_owned()))
        .map_or(0, |v| v.len());
    assert!(delivered_after > 1000, "{delivered_after} delivered");
}

/// A datagram of the current session whose block number no sender could have reached yet is
/// refused: it could otherwise make every genuine block look old and drive the block-loss
/// counter to saturation.
#[test]
fn block_numbers_and_sequence_numbers_cannot_jump_beyond_plausibility() {
    let mut h = Harness::new(Impairments::default(), 21);
    let mut rng = SimRng::new(21);
    drive(&mut h, &mut rng, 100);
    let session = h.session;
    for block in [u64::MAX - 3, u64::MAX / 2, 1 << 40] {
        let d = forged_datagram(session, block, &batch_content(TOPICS[0], 5, b"x"));
        assert_eq!(
            h.receiver.handle_datagram(h.now, &d),
            Err(Rejected::FarAhead)
        );
    }
    drive(&mut h, &mut rng, 200);
    h.settle();
    h.check_accounting(session, true);
    assert_eq!(h.lost_records(), 0);
    assert!(h.receiver.stats().blocks_lost < 10);

    // Within the block frontier, but a sequence number far beyond what the topic could have
    // reached since it was first seen: dropped as malformed, no loss counted.
    let mut receiver = Reassembler::new(ReassemblerConfig::default());
    let now = Instant::now();
    let forged = |block, seq| forged_datagram(99, block, &batch_content("t", seq, b"r"));
    receiver.handle_datagram(now, &forged(0, 0)).unwrap();
    receiver.handle_datagram(now, &forged(1, 1 << 62)).unwrap();
    receiver
        .handle_datagram(now, &forged(2, u64::MAX - 1))
        .unwrap();
    receiver.handle_datagram(now, &forged(3, 1)).unwrap();
    let mut records = 0;
    while let Some(event) = receiver.poll_event() {
        assert!(!matches!(event, Event::Gap(_)), "{event:?}");
        records += matches!(event, Event::Record(_)) as usize;
    }
    assert_eq!(records, 2);
    assert_eq!(receiver.stats().records_lost, 0);
    assert_eq!(receiver.stats().malformed_frames, 2);
}

/// Low-rate telemetry: a dozen small records every 5 ms, so blocks of one or two shards leave
/// alone at their flush deadline. At 3 % independent loss, the proportional parity of old (one
/// parity shard for a one-shard block) lost blocks; the parity plan for that design point loses
/// none on the same link and seed.
#[test]
fn small_blocks_at_the_design_loss_are_as_safe_as_full_ones() {
    let run = |design: diode_wire::DesignPoint| {
        let impairments = Impairments {
            drop_rate: 0.03,
            ..Impairments::default()
        };
        let mut h = Harness::new(impairments, 31);
        h.replace_encoder(EncoderConfig {
            design,
            ..encoder_config(h.session)
        });
        let mut rng = SimRng::new(31);
        for _ in 0..3000 {
            for _ in 0..12 {
                h.push(0, payload(&mut rng, 100));
            }
            h.step(Duration::from_millis(5));
        }
        h.settle();
        h.check_accounting(h.session, true);
        (h.receiver.stats().blocks_lost, h.lost_records())
    };
    let (blocks_lost, records_lost) = run(diode_wire::DesignPoint {
        loss: 0.0,
        burst_datagrams: 0,
    });
    assert!(
        blocks_lost > 3,
        "the proportional plan lost {blocks_lost} blocks"
    );
    assert!(records_lost > 0);
    assert_eq!(
        run(diode_wire::DesignPoint {
            loss: 0.03,
            burst_datagrams: 0,
        }),
        (0, 0)
    );
}

/// Outage protection (wire-format.md §3.4): a 300 ms blackhole in the middle of mixed traffic
/// loses records without it and none with a 450 ms repair delay; and with it, records on a clean
/// link still arrive at once, not a repair delay later.
#[test]
fn an_outage_shorter_than_the_repair_delay_loses_nothing() {
    let run = |repair_delay: Duration| {
        let mut h = Harness::new(Impairments::default(), 40);
        h.replace_encoder(EncoderConfig {
            repair_delay,
            ..encoder_config(h.session)
        });
        let mut rng = SimRng::new(40);
        drive(&mut h, &mut rng, 200);
        h.drop_filter = Some(Box::new(|_| false));
        let dark_from = h.now;
        while h.now < dark_from + Duration::from_millis(300) {
            drive(&mut h, &mut rng, 1);
        }
        h.drop_filter = None;
        drive(&mut h, &mut rng, 400);
        h.settle();
        h.check_accounting(h.session, true);
        (h.lost_records(), h.encoder.stats().repair_datagrams_out)
    };
    let (lost, repairs) = run(Duration::ZERO);
    assert!(lost > 100, "the outage cost {lost} records unprotected");
    assert_eq!(repairs, 0);
    let (lost, repairs) = run(Duration::from_millis(450));
    assert_eq!(lost, 0);
    assert!(repairs > 0);

    // Nothing lost: nothing waits for repair shards.
    let mut h = Harness::new(Impairments::default(), 41);
    h.replace_encoder(EncoderConfig {
        repair_delay: Duration::from_millis(450),
        ..encoder_config(h.session)
    });
    h.step(Duration::from_millis(1));
    for i in 0..10u8 {
        h.push(0, Bytes::from(vec![i; 50]));
    }
    h.step(Duration::from_millis(6));
    h.step(Duration::from_millis(1));
    let delivered: usize = h.delivered.values().map(Vec::len).sum();
    assert_eq!(delivered, 10, "delivered within the flush interval");
}

#[test]
fn receiver_restart_joins_mid_stream() {
    let mut h = Harness::new(Impairments::default(), 9);
    let mut rng = SimRng::new(9);
    drive(&mut h, &mut rng, 300);
    h.receiver = Reassembler::new(ReassemblerConfig::default());
    h.delivered.clear();
    h.gaps.clear();
    let sent_before: usize = h.sent.values().map(|s| s.len()).sum();
    drive(&mut h, &mut rng, 300);
    h.settle();
    assert!(h.events.iter().any(|e| matches!(
        e,
        Event::SessionStarted {
            mid_stream: true,
            ..
        }
    )));
    h.check_accounting(h.session, false);
    assert_eq!(
        h.lost_records(),
        0,
        "nothing before the join is called lost"
    );
    // A floor a receiver that delivered nothing after the join would miss: on a clean link all
    // but what was in flight at the join arrives.
    let sent_after = h.sent.values().map(|s| s.len()).sum::<usize>() - sent_before;
    let delivered: usize = h.delivered.values().map(Vec::len).sum();
    assert!(
        delivered * 10 >= sent_after * 9,
        "{delivered} delivered of {sent_after} sent after the join"
    );
}

#[test]
fn replayed_datagrams_are_rejected_or_ignored() {
    let mut h = Harness::new(Impairments::default(), 10);
    let mut rng = SimRng::new(10);
    let mut capture = Vec::new();
    h.step(Duration::from_millis(1));
    for _ in 0..50 {
        h.push(0, payload(&mut rng, 100));
        h.now += Duration::from_millis(6);
        h.encoder.handle_timeout(h.now, 0);
        while let Some(d) = h.encoder.poll_transmit(h.now) {
            capture.push(d.to_vec());
            let _ = h.receiver.handle_datagram(h.now, &d);
        }
        h.collect();
    }
    let delivered = h.receiver.stats().records_out;
    for d in &capture {
        let _ = h.receiver.handle_datagram(h.now, d);
        h.collect();
    }
    assert_eq!(
        h.receiver.stats().records_out,
        delivered,
        "a replay delivered records again"
    );
    h.check_accounting(h.session, true);
}

/// Drops, per block, a random choice of at most its parity count: nothing may be lost.
fn lose_at_most_parity_per_block(seed: u64) {
    let mut h = Harness::new(Impairments::default(), seed);
    let mut rng = SimRng::new(seed);
    let mut choice = SimRng::new(seed ^ 0x5EED);
    let mut dropped_per_block: HashMap<u64, usize> = HashMap::new();
    h.drop_filter = Some(Box::new(move |d: &[u8]| {
        let (header, _) = datagram::parse(d, &[]).unwrap();
        let m = header.geometry.parity_shards as usize;
        let n = dropped_per_block.entry(header.block).or_default();
        let left = header.geometry.total_shards() - header.shard_index as usize;
        // Spend the block's whole parity budget at random positions.
        if *n < m && (choice.below(left as u64) < (m - *n) as u64) {
            *n += 1;
            false
        } else {
            true
        }
    }));
    drive(&mut h, &mut rng, 300);
    h.settle();
    h.check_accounting(h.session, true);
    assert_eq!(h.receiver.stats().blocks_lost, 0);
    assert_eq!(h.lost_records(), 0);
    assert!(h.receiver.stats().blocks_recovered > 20);
}

/// A CRC-valid, unauthenticated one-shard block holding `content` (wire-format.md §2, §4.1).
fn forged_datagram(session_id: u64, block: u64, content: &[u8]) -> Vec<u8> {
    let header = datagram::Header {
        authenticated: false,
        encrypted: false,
        session_id,
        block,
        shard_index: 0,
        geometry: datagram::BlockGeometry {
            data_shards: 1,
            parity_shards: 0,
            interleave_depth: 4,
            shard_len: content.len() as u16,
        },
    };
    let mut d = vec![0u8; header.geometry.datagram_len(false)];
    header.write(&mut d);
    d[datagram::HEADER_LEN..datagram::HEADER_LEN + content.len()].copy_from_slice(content);
    datagram::seal(&mut d, None);
    d
}

/// Block content holding one record batch.
fn batch_content(topic: &str, first_seq: u64, payload: &[u8]) -> Vec<u8> {
    use diode_wire::proto;
    use prost::Message;
    let frame = proto::Frame {
        body: Some(proto::frame::Body::Records(proto::RecordBatch {
            topic: topic.to_owned(),
            first_seq,
            first_time_us: 1,
            time_deltas_us: vec![0],
            payloads: vec![Bytes::copy_from_slice(payload)],
            origins: Vec::new(),
            session_id: 0,
            replayed: false,
        })),
    };
    let frames = frame.encode_length_delimited_to_vec();
    let mut content = (frames.len() as u32).to_be_bytes().to_vec();
    content.extend_from_slice(&frames);
    content
}

fn key(byte: u8) -> LinkKey {
    LinkKey::new(&[byte; 32])
}

/// A new sender session signing with `key`, with a larger session id as a restarted sender has.
fn restart_sender(h: &mut Harness, key: Option<LinkKey>) {
    h.encoder.flush(h.now);
    h.step(Duration::from_millis(10));
    h.session += 1000;
    h.replace_encoder(EncoderConfig {
        key,
        ..encoder_config(h.session)
    });
}

#[test]
fn an_authenticated_link_delivers_and_forgeries_are_rejected() {
    let mut h = Harness::with_keys(Impairments::default(), 11, Some(key(1)), vec![key(1)]);
    let mut rng = SimRng::new(11);
    drive(&mut h, &mut rng, 200);
    // Forgeries with valid CRCs: unauthenticated, under an unknown key, and tampered genuine ones.
    let mut forger = Encoder::new(
        EncoderConfig {
            key: Some(key(9)),
            ..encoder_config(h.session)
        },
        h.now,
    )
    .unwrap();
    let mut plain = Encoder::new(encoder_config(h.session + 5), h.now).unwrap();
    for enc in [&mut forger, &mut plain] {
        let topic = enc.add_topic(TOPICS[0]).unwrap();
        enc.push(h.now, topic, 0, Bytes::from_static(b"forged"))
            .unwrap();
        enc.flush(h.now);
        enc.handle_timeout(h.now, 0);
        while let Some(d) = enc.poll_transmit(h.now) {
            assert_eq!(h.receiver.handle_datagram(h.now, &d), Err(Rejected::Auth));
        }
    }
    h.settle();
    h.check_accounting(h.session, true);
    assert_eq!(h.lost_records(), 0);
    assert!(h.receiver.stats().rejected(Rejected::Auth) >= 4);
}

/// A sender that encrypts with `key(1)`, and a receiver holding `receiver_keys`.
fn encrypted_harness(
    impairments: Impairments,
    seed: u64,
    receiver_keys: Vec<LinkKey>,
    require_encryption: bool,
) -> Harness {
    let mut h = Harness::with_keys(impairments, seed, Some(key(1)), Vec::new());
    h.replace_encoder(EncoderConfig {
        key: Some(key(1)),
        encrypt: true,
        ..encoder_config(h.session)
    });
    h.receiver = Reassembler::new(ReassemblerConfig {
        keys: receiver_keys,
        require_encryption,
        ..ReassemblerConfig::default()
    });
    h
}

/// Pushes records that all contain `marker` and says whether any datagram on the wire did.
fn marker_on_the_wire(h: &mut Harness, marker: &'static [u8]) -> bool {
    let seen = std::rc::Rc::new(std::cell::Cell::new(false));
    let seen_in_filter = seen.clone();
    h.drop_filter = Some(Box::new(move |d: &[u8]| {
        if d.windows(marker.len()).any(|w| w == marker) {
            seen_in_filter.set(true);
        }
        true
    }));
    for i in 0..200u32 {
        let mut payload = marker.to_vec();
        payload.extend_from_slice(&i.to_be_bytes());
        h.push((i % 3) as usize, Bytes::from(payload));
        h.step(Duration::from_millis(1));
    }
    h.drop_filter = None;
    seen.get()
}

#[test]
fn an_encrypted_link_delivers_under_loss_and_shows_no_plaintext() {
    let impaired = Impairments {
        drop_rate: 0.03,
        reorder_rate: 0.05,
        reorder_distance: 4,
        duplicate_rate: 0.01,
        ..Impairments::default()
    };
    let mut h = encrypted_harness(impaired, 21, vec![key(1)], true);
    let mut rng = SimRng::new(21);
    assert!(!marker_on_the_wire(&mut h, b"PLANT-SECRET-7"));
    drive(&mut h, &mut rng, 300);
    h.settle();
    h.check_accounting(h.session, true);
    assert_eq!(h.receiver.stats().undecryptable_blocks, 0);
    assert!(
        h.receiver.stats().blocks_recovered > 0,
        "loss was repaired from parity"
    );
    // The same records on an authenticated but unencrypted link are readable on the wire.
    let mut plain = Harness::with_keys(Impairments::default(), 22, Some(key(1)), vec![key(1)]);
    assert!(marker_on_the_wire(&mut plain, b"PLANT-SECRET-7"));
}

#[test]
fn encrypted_blocks_open_with_either_key_while_keys_rotate() {
    let mut h = encrypted_harness(Impairments::default(), 23, vec![key(2), key(1)], false);
    let mut rng = SimRng::new(23);
    drive(&mut h, &mut rng, 100);
    h.settle();
    h.check_accounting(h.session, true);
    assert_eq!(h.lost_records(), 0);
    assert_eq!(h.receiver.stats().undecryptable_blocks, 0);
}

#[test]
fn a_receiver_that_requires_encryption_refuses_plaintext() {
    let mut h = Harness::with_keys(Impairments::default(), 24, Some(key(1)), vec![key(1)]);
    h.receiver = Reassembler::new(ReassemblerConfig {
        keys: vec![key(1)],
        require_encryption: true,
        ..ReassemblerConfig::default()
    });
    h.push(0, Bytes::from_static(b"clear"));
    h.encoder.flush(h.now);
    while let Some(d) = h.encoder.poll_transmit(h.now) {
        assert_eq!(h.receiver.handle_datagram(h.now, &d), Err(Rejected::Auth));
    }
    assert!(h.receiver.poll_event().is_none());
}

#[test]
fn keys_rotate_without_a_gap() {
    // The receiver holds the old and the new key; the sender moves to the new one on restart.
    let mut h = Harness::with_keys(
        Impairments::default(),
        12,
        Some(key(1)),
        vec![key(1), key(2)],
    );
    let mut rng = SimRng::new(12);
    drive(&mut h, &mut rng, 100);
    let old = h.session;
    restart_sender(&mut h, Some(key(2)));
    drive(&mut h, &mut rng, 100);
    h.settle();
    h.check_accounting(old, true);
    h.check_accounting(h.session, true);
    assert_eq!(h.lost_records(), 0);
}

#[test]
fn the_key_in_use_is_announced_as_it_changes() {
    // The receiver has moved to key 2 and still accepts key 1; the sender moves on restart.
    let mut h = Harness::with_keys(
        Impairments::default(),
        15,
        Some(key(1)),
        vec![key(2), key(1)],
    );
    let mut rng = SimRng::new(15);
    drive(&mut h, &mut rng, 50);
    restart_sender(&mut h, Some(key(2)));
    drive(&mut h, &mut rng, 50);
    h.settle();
    // A holder of the old key slips datagrams into the new session: no new announcement.
    let mut rogue = Encoder::new(
        EncoderConfig {
            key: Some(key(1)),
            ..encoder_config(h.session)
        },
        h.now,
    )
    .unwrap();
    let topic = rogue.add_topic("t0").unwrap();
    rogue.push(h.now, topic, 0, payload(&mut rng, 100)).unwrap();
    rogue.flush(h.now);
    while let Some(d) = rogue.poll_transmit(h.now) {
        let _ = h.receiver.handle_datagram(h.now, &d);
    }
    h.collect();
    let announced: Vec<(u8, bool)> = h
        .events
        .iter()
        .filter_map(|e| match e {
            Event::KeyInUse { key_id, previous } => Some((*key_id, *previous)),
            _ => None,
        })
        .collect();
    // Once per change, not once per datagram.
    assert_eq!(announced, vec![(key(1).id(), true), (key(2).id(), false)]);
}

#[test]
fn old_sessions_cannot_be_replayed() {
    let mut h = Harness::with_keys(Impairments::default(), 13, Some(key(1)), vec![key(1)]);
    let mut rng = SimRng::new(13);
    let mut captured = Vec::new();
    h.drop_filter = None;
    // Capture a first session's datagrams as an attacker on the IT side would.
    for _ in 0..20 {
        h.push(0, payload(&mut rng, 100));
        h.now += Duration::from_millis(6);
        h.encoder.handle_timeout(h.now, 0);
        while let Some(d) = h.encoder.poll_transmit(h.now) {
            captured.push(d.to_vec());
            let _ = h.receiver.handle_datagram(h.now, &d);
        }
        h.collect();
    }
    // More restarts than the receiver remembers retired sessions.
    for _ in 0..20 {
        restart_sender(&mut h, Some(key(1)));
        drive(&mut h, &mut rng, 5);
    }
    let session = h.receiver.session_id();
    let delivered = h.receiver.stats().records_out;
    for d in &captured {
        assert_eq!(h.receiver.handle_datagram(h.now, d), Err(Rejected::Replay));
    }
    h.collect();
    assert_eq!(
        h.receiver.session_id(),
        session,
        "a replayed session took over"
    );
    assert_eq!(h.receiver.stats().records_out, delivered);
}

#[test]
fn stray_datagrams_of_another_session_cannot_take_a_working_link() {
    let mut h = Harness::new(Impairments::default(), 14);
    let mut rng = SimRng::new(14);
    drive(&mut h, &mut rng, 100);
    let session = h.receiver.session_id();
    // Another session's record blocks without its heartbeat (block 0 withheld), and valid-CRC
    // junk with plausible headers: neither may move the receiver.
    let mut stray = Encoder::new(encoder_config(h.session + 77), h.now).unwrap();
    let topic = stray.add_topic(TOPICS[0]).unwrap();
    stray.handle_timeout(h.now, 0);
    while stray.poll_transmit(h.now).is_some() {}
    for i in 0..200 {
        stray
            .push(h.now, topic, 0, Bytes::from(format!("stray {i}")))
            .unwrap();
    }
    stray.flush(h.now);
    while let Some(d) = stray.poll_transmit(h.now) {
        assert_eq!(
            h.receiver.handle_datagram(h.now, &d),
            Err(Rejected::Unconfirmed)
        );
    }
    for _ in 0..500 {
        let len = 1 + rng.below(200) as usize;
        let header = datagram::Header {
            authenticated: false,
            encrypted: false,
            session_id: rng.next_u64() | 1,
            block: rng.below(100),
            shard_index: 0,
            geometry: datagram::BlockGeometry {
                data_shards: 1,
                parity_shards: 1,
                interleave_depth: 4,
                shard_len: len as u16,
            },
        };
        let mut d = vec![0u8; header.geometry.datagram_len(false)];
        header.write(&mut d);
        for b in &mut d[datagram::HEADER_LEN..datagram::HEADER_LEN + len] {
            *b = rng.next_u64() as u8;
        }
        datagram::seal(&mut d, None);
        assert!(h.receiver.handle_datagram(h.now, &d).is_err());
    }
    drive(&mut h, &mut rng, 100);
    h.settle();
    assert_eq!(
        h.receiver.session_id(),
        session,
        "a stray session took over"
    );
    h.check_accounting(h.session, true);
    assert_eq!(h.lost_records(), 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Outage protection (wire-format.md §3.4): any single outage up to the protected length,
    /// wherever it falls, loses no record, with 1 % random loss besides.
    #[test]
    fn any_outage_up_to_the_protection_loses_nothing(
        seed in any::<u64>(),
        before_ms in 50u64..600,
        outage_ms in 0u64..=400,
    ) {
        let impairments = Impairments { drop_rate: 0.01, ..Impairments::default() };
        let mut h = Harness::new(impairments, seed);
        h.replace_encoder(EncoderConfig {
            design: diode_wire::DesignPoint { loss: 0.01, burst_datagrams: 0 },
            repair_delay: Duration::from_millis(400 + 5 + 50),
            ..encoder_config(h.session)
        });
        let mut rng = SimRng::new(seed);
        let start = h.now;
        while h.now < start + Duration::from_millis(before_ms) {
            drive(&mut h, &mut rng, 1);
        }
        h.drop_filter = Some(Box::new(|_| false));
        let dark_from = h.now;
        while h.now < dark_from + Duration::from_millis(outage_ms) {
            drive(&mut h, &mut rng, 1);
        }
        h.drop_filter = None;
        drive(&mut h, &mut rng, 300);
        h.settle();
        h.check_accounting(h.session, true);
        prop_assert_eq!(h.lost_records(), 0);
    }
}

proptest! {
    /// Authentication changes nothing of the guarantees on an impaired link.
    #[test]
    fn authenticated_impaired_links_keep_exact_accounting(
        seed in any::<u64>(),
        drop_rate in 0.0f64..0.2,
        corrupt_rate in 0.0f64..0.05,
        duplicate_rate in 0.0f64..0.05,
    ) {
        let impairments = Impairments { drop_rate, corrupt_rate, duplicate_rate, ..Impairments::default() };
        let mut h = Harness::with_keys(impairments, seed, Some(key(3)), vec![key(7), key(3)]);
        let mut rng = SimRng::new(seed);
        drive(&mut h, &mut rng, 100);
        h.settle();
        h.check_accounting(h.session, true);
    }

    /// Every block that lost at most `parity_shards` of its datagrams is rebuilt.
    #[test]
    fn loss_within_parity_is_always_repaired(seed in any::<u64>()) {
        lose_at_most_parity_per_block(seed);
    }

    /// Any mix of impairments keeps the accounting exact and never delivers a wrong record.
    #[test]
    fn impaired_links_keep_exact_accounting(
        seed in any::<u64>(),
        drop_rate in 0.0f64..0.3,
        burst_rate in 0.0f64..0.01,
        burst_len in 1usize..40,
        reorder_rate in 0.0f64..0.1,
        reorder_distance in 1usize..20,
        duplicate_rate in 0.0f64..0.1,
        corrupt_rate in 0.0f64..0.05,
        truncate_rate in 0.0f64..0.05,
    ) {
        let impairments = Impairments {
            drop_rate, burst_rate, burst_len, reorder_rate, reorder_distance,
            duplicate_rate, corrupt_rate, truncate_rate,
        };
        let mut h = Harness::new(impairments, seed);
        let mut rng = SimRng::new(seed ^ 0xABCD);
        drive(&mut h, &mut rng, 150);
        h.settle();
        h.check_accounting(h.session, true);
        // A floor: on a gentle link most records arrive, which a reassembler that delivered
        // nothing (and reported everything lost) would miss.
        let lossy = drop_rate + corrupt_rate + truncate_rate + burst_rate * burst_len as f64;
        if lossy < 0.05 {
            let sent: usize = h.sent.values().map(|s| s.len()).sum();
            let delivered: usize = h.delivered.values().map(Vec::len).sum();
            prop_assert!(delivered * 2 >= sent, "{} of {} delivered at {:.3} loss", delivered, sent, lossy);
        }
    }

    /// Reordering within the interleave window and duplication alone lose nothing.
    #[test]
    fn reorder_and_duplicates_lose_nothing(seed in any::<u64>(), distance in 1usize..12) {
        let impairments = Impairments {
            reorder_rate: 0.05, reorder_distance: distance, duplicate_rate: 0.05,
            ..Impairments::default()
        };
        let mut h = Harness::new(impairments, seed);
        let mut rng = SimRng::new(seed);
        drive(&mut h, &mut rng, 150);
        h.settle();
        h.check_accounting(h.session, true);
        prop_assert_eq!(h.lost_records(), 0);
    }

    /// Arbitrary bytes never panic the reassembler nor grow it past its cap.
    #[test]
    fn random_datagrams_are_harmless(datagrams in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..1600), 0..200)) {
        let config = ReassemblerConfig { max_inflight_bytes: 1 << 20, ..ReassemblerConfig::default() };
        let mut receiver = Reassembler::new(config);
        let now = Instant::now();
        for d in &datagrams {
            prop_assert!(receiver.handle_datagram(now, d).is_err());
        }
        prop_assert!(receiver.poll_event().is_none());
    }

    /// Valid-CRC datagrams with hostile headers and contents: no panic, bounded memory.
    #[test]
    fn hostile_but_well_formed_datagrams_are_harmless(
        seed in any::<u64>(),
        count in 1usize..400,
    ) {
        let config = ReassemblerConfig { max_inflight_bytes: 1 << 20, ..ReassemblerConfig::default() };
        let mut receiver = Reassembler::new(config);
        let mut rng = SimRng::new(seed);
        let mut now = Instant::now();
        for _ in 0..count {
            let k = 1 + rng.below(40) as u8;
            let m = rng.below(20) as u8;
            let len = 1 + rng.below(1400) as usize;
            let header = datagram::Header {
                authenticated: false,
                encrypted: false,
                session_id: 1 + rng.below(3),
                block: if rng.chance(0.1) { rng.next_u64() } else { rng.below(64) },
                shard_index: rng.below(k as u64 + m as u64) as u8,
                geometry: datagram::BlockGeometry {
                    data_shards: k, parity_shards: m,
                    interleave_depth: 1 + rng.below(8) as u8, shard_len: len as u16,
                },
            };
            let mut d = vec![0u8; header.geometry.datagram_len(false)];
            header.write(&mut d);
            for b in &mut d[datagram::HEADER_LEN..datagram::HEADER_LEN + len] {
                *b = rng.next_u64() as u8;
            }
            // Sometimes a plausible content header so frames get parsed.
            if rng.chance(0.5) && len >= 4 {
                let n = rng.below(len as u64) as u32;
                d[datagram::HEADER_LEN..datagram::HEADER_LEN + 4].copy_from_slice(&n.to_be_bytes());
            }
            datagram::seal(&mut d, None);
            let _ = receiver.handle_datagram(now, &d);
            prop_assert!(receiver.inflight_bytes() <= 1 << 20);
            now += Duration::from_micros(rng.below(300_000));
            receiver.handle_timeout(now);
            while receiver.poll_event().is_some() {}
        }
    }
}
