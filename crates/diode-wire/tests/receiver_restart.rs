//! A receiver restarted within a session (wire-format.md §6.1): with the floor and the topics'
//! marks it kept, the records sent while it was down are reported lost with their ranges, and
//! nothing it delivered before is delivered again. And the same marks handed from one lane's
//! reassembler to another's when a topic moves (§7).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use diode_wire::{
    Encoder, EncoderConfig, Event, Gap, LinkKey, Mark, OpenGap, Reassembler, ReassemblerConfig,
};

struct Pair {
    encoder: Encoder,
    topics: Vec<diode_wire::TopicId>,
    now: Instant,
}

const TOPICS: [&str; 2] = ["line3/telemetry", "historian/events"];

const SESSION: u64 = 0x5E55 << 20;

impl Pair {
    fn new(key: &LinkKey) -> Pair {
        Pair::numbering_from(key, SESSION, 0)
    }

    /// A sender of session `session_id` whose topics' numbers go on from `next_seq`.
    fn numbering_from(key: &LinkKey, session_id: u64, next_seq: u64) -> Pair {
        let now = Instant::now();
        let mut encoder = Encoder::new(
            EncoderConfig {
                session_id,
                key: Some(key.clone()),
                ..Default::default()
            },
            now,
        )
        .unwrap();
        let topics = TOPICS
            .iter()
            .map(|t| encoder.add_topic_from(t, next_seq).unwrap())
            .collect();
        Pair {
            encoder,
            topics,
            now,
        }
    }

    /// Sends `count` records of each topic, a block at a time, over a clean link to `receiver`
    /// (none: it is down), and a second of heartbeats after them.
    fn send(&mut self, count: usize, mut receiver: Option<&mut Reassembler>) -> Vec<Event> {
        let mut events = Vec::new();
        for i in 0..count {
            for &topic in &self.topics {
                let payload = Bytes::from(format!("record {i}"));
                self.encoder.push(self.now, topic, 0, payload).unwrap();
            }
        }
        self.encoder.flush(self.now);
        let end = self.now + Duration::from_secs(1);
        while self.now < end {
            self.encoder.handle_timeout(self.now, 0);
            while let Some(datagram) = self.encoder.poll_transmit(self.now) {
                if let Some(receiver) = receiver.as_deref_mut() {
                    let _ = receiver.handle_datagram(self.now, &datagram);
                }
            }
            if let Some(receiver) = receiver.as_deref_mut() {
                receiver.handle_timeout(self.now);
                events.extend(std::iter::from_fn(|| receiver.poll_event()));
            }
            self.now += Duration::from_millis(10);
        }
        events
    }
}

impl Pair {
    /// Sends `count` records of each topic to `receiver` with no heartbeat: until one comes, the
    /// receiver cannot tell where the session's numbering of them began (§6.4).
    fn send_before_any_heartbeat(
        &mut self,
        count: usize,
        receiver: &mut Reassembler,
    ) -> Vec<Event> {
        for i in 0..count {
            for &topic in &self.topics {
                let payload = Bytes::from(format!("record {i}"));
                self.encoder.push(self.now, topic, 0, payload).unwrap();
            }
        }
        self.encoder.flush(self.now);
        while let Some(datagram) = self.encoder.poll_transmit(self.now) {
            let _ = receiver.handle_datagram(self.now, &datagram);
        }
        assert_eq!(receiver.stats().heartbeats, 0);
        std::iter::from_fn(|| receiver.poll_event()).collect()
    }
}

fn delivered(events: &[Event], topic: &str) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Record(r) if &*r.topic == topic => Some(r.seq),
            _ => None,
        })
        .collect()
}

fn gaps(events: &[Event]) -> Vec<Gap> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Gap(g) => Some(g.clone()),
            _ => None,
        })
        .collect()
}

fn receiver(key: &LinkKey) -> Reassembler {
    Reassembler::new(ReassemblerConfig {
        keys: vec![key.clone()],
        ..ReassemblerConfig::default()
    })
}

#[test]
fn what_was_sent_while_the_receiver_was_down_is_reported_lost_with_its_ranges() {
    let key = LinkKey::new(&[7; 32]);
    let mut pair = Pair::new(&key);
    let mut first = receiver(&key);
    let events = pair.send(300, Some(&mut first));
    assert_eq!(delivered(&events, TOPICS[0]), (0..300).collect::<Vec<_>>());
    assert!(gaps(&events).is_empty());
    let floor = first.replay_floor().unwrap();
    let marks = first.watermarks();
    let next: Vec<(Arc<str>, u64, u64)> = marks
        .iter()
        .map(|(t, m)| (t.clone(), m.next_seq, m.session_id))
        .collect();
    assert_eq!(
        next,
        vec![
            (Arc::from(TOPICS[1]), 300, SESSION),
            (Arc::from(TOPICS[0]), 300, SESSION)
        ]
    );
    drop(first);

    // Down while 200 records of each topic go by.
    pair.send(200, None);

    // Restarted again before the session came back: what it would keep still holds the marks.
    let mut crashed_again = receiver(&key);
    crashed_again.restore_replay_floor(floor);
    crashed_again.restore_watermarks(marks.clone());
    assert_eq!(crashed_again.watermarks(), marks);
    drop(crashed_again);

    let mut restarted = receiver(&key);
    restarted.restore_replay_floor(floor);
    restarted.restore_watermarks(marks);
    let events = pair.send(100, Some(&mut restarted));
    for topic in TOPICS {
        assert_eq!(
            delivered(&events, topic),
            (500..600).collect::<Vec<_>>(),
            "{topic}"
        );
        let lost: Vec<_> = gaps(&events)
            .into_iter()
            .filter(|g| &*g.topic == topic)
            .map(|g| (g.first_seq, g.last_seq))
            .collect();
        assert_eq!(lost, vec![(300, 499)], "{topic}");
    }
    assert_eq!(restarted.stats().records_lost, 400);

    // Without the marks, the restart joins mid-stream and says nothing: what the state file
    // changes.
    let mut key_only = receiver(&key);
    key_only.restore_replay_floor(restarted.replay_floor().unwrap());
    pair.send(50, None);
    let events = pair.send(10, Some(&mut key_only));
    assert!(gaps(&events).is_empty());
    assert_eq!(delivered(&events, TOPICS[0]).first(), Some(&650));
}

/// Lane 0 saw session `SESSION` number its topics 0..300 and missed 300..500 (the receiver was
/// down, or the lane's last moments were lost with the heartbeats that would have shown them);
/// the sender restarted numbering on from 500 with its topics on lane 1. Returns lane 0's
/// reassembler and the new session's sender.
fn moved_to_another_lane(key: &LinkKey) -> (Reassembler, Pair) {
    let mut old_session = Pair::new(key);
    let mut lane_0 = receiver(key);
    old_session.send(300, Some(&mut lane_0));
    old_session.send(200, None);
    (lane_0, Pair::numbering_from(key, (0x5E56 << 20) | 1, 500))
}

fn lost(events: &[Event], topic: &str) -> Vec<(u64, u64)> {
    gaps(events)
        .into_iter()
        .filter(|g| &*g.topic == topic)
        .map(|g| (g.first_seq, g.last_seq))
        .collect()
}

#[test]
fn a_moved_topic_brings_its_mark_and_what_neither_lane_saw_is_reported_where_it_goes_on() {
    let key = LinkKey::new(&[7; 32]);
    let (mut lane_0, mut new_session) = moved_to_another_lane(&key);
    let mut lane_1 = receiver(&key);
    let events = new_session.send(100, Some(&mut lane_1));
    assert_eq!(
        delivered(&events, TOPICS[0]),
        (500..600).collect::<Vec<_>>()
    );
    assert!(gaps(&events).is_empty(), "lane 1 alone cannot know");

    let handover = lane_0.hand_over(TOPICS[0]);
    assert_eq!(
        handover.mark.map(|m| (m.next_seq, m.session_id)),
        Some((300, SESSION))
    );
    assert!(lane_0.watermarks().iter().all(|(t, _)| &**t != TOPICS[0]));
    lane_1.take_over(TOPICS[0], handover.clone());
    let events: Vec<Event> = std::iter::from_fn(|| lane_1.poll_event()).collect();
    assert_eq!(lost(&events, TOPICS[0]), vec![(300, 499)]);
    assert_eq!(lane_1.stats().records_lost, 200);
    assert_eq!(lane_1.open_gaps().len(), 1, "open for a replay to fill");

    // Handed twice (two lanes answering a first claim): reported once.
    lane_1.take_over(TOPICS[0], handover);
    assert!(lane_1.poll_event().is_none());
    assert_eq!(lane_1.stats().records_lost, 200);
}

#[test]
fn a_mark_handed_over_before_the_topic_comes_is_judged_when_it_does() {
    let key = LinkKey::new(&[7; 32]);
    let (mut lane_0, mut new_session) = moved_to_another_lane(&key);
    let mut lane_1 = receiver(&key);
    lane_1.take_over(TOPICS[1], lane_0.hand_over(TOPICS[1]));
    let events = new_session.send(100, Some(&mut lane_1));
    assert_eq!(
        delivered(&events, TOPICS[1]),
        (500..600).collect::<Vec<_>>()
    );
    assert_eq!(lost(&events, TOPICS[1]), vec![(300, 499)]);
    // The topic that stayed put on lane 0 lost nothing on lane 1.
    assert!(lost(&events, TOPICS[0]).is_empty());
}

#[test]
fn a_mark_handed_over_between_a_moved_topics_first_records_and_its_first_heartbeat_counts() {
    let key = LinkKey::new(&[7; 32]);
    let (mut lane_0, mut new_session) = moved_to_another_lane(&key);
    let mut lane_1 = receiver(&key);
    let events = new_session.send_before_any_heartbeat(10, &mut lane_1);
    assert_eq!(
        delivered(&events, TOPICS[0]),
        (500..510).collect::<Vec<_>>()
    );
    lane_1.take_over(TOPICS[0], lane_0.hand_over(TOPICS[0]));
    let events = new_session.send(100, Some(&mut lane_1));
    assert_eq!(
        delivered(&events, TOPICS[0]),
        (510..610).collect::<Vec<_>>()
    );
    assert_eq!(lost(&events, TOPICS[0]), vec![(300, 499)]);
    assert!(lost(&events, TOPICS[1]).is_empty());
}

#[test]
fn a_sender_that_numbered_over_from_zero_leaves_nothing_to_report_from_a_mark() {
    let key = LinkKey::new(&[7; 32]);
    let (mut lane_0, _) = moved_to_another_lane(&key);
    let mut started_over = Pair::numbering_from(&key, (0x5E56 << 20) | 1, 0);
    let mut lane_1 = receiver(&key);
    let events = started_over.send(100, Some(&mut lane_1));
    assert_eq!(delivered(&events, TOPICS[0]), (0..100).collect::<Vec<_>>());
    let mut handover = lane_0.hand_over(TOPICS[0]);
    // A gap the old numbering left open names other records than the new one's: not kept.
    handover.gaps.push(OpenGap {
        first_seq: 40,
        last_seq: 49,
        after_us: 0,
        before_us: 0,
    });
    lane_1.take_over(TOPICS[0], handover);
    assert!(lane_1.poll_event().is_none());
    assert_eq!(lane_1.stats().records_lost, 0);
    assert!(lane_1.open_gaps().is_empty());
}

/// A topic that came with a mark and leaves before any heartbeat placed its numbering: what its
/// first record showed lost goes with it, as at the end of a session.
/// Lane 0 came with a mark of `SESSION` at 300 and has seen records 500..510 of a later session
/// and no heartbeat of it.
fn with_first_records_after_a_mark(key: &LinkKey) -> Reassembler {
    let mut lane_0 = receiver(key);
    lane_0.restore_watermarks([(
        Arc::from(TOPICS[0]),
        Mark {
            next_seq: 300,
            last_time_us: 0,
            session_id: SESSION,
        },
    )]);
    let mut new_session = Pair::numbering_from(key, (0x5E56 << 20) | 1, 500);
    let events = new_session.send_before_any_heartbeat(10, &mut lane_0);
    assert_eq!(
        delivered(&events, TOPICS[0]),
        (500..510).collect::<Vec<_>>()
    );
    assert!(gaps(&events).is_empty(), "not known until a heartbeat");
    lane_0
}

#[test]
fn a_topic_handed_over_before_its_first_heartbeat_takes_the_gap_its_first_record_showed() {
    let key = LinkKey::new(&[7; 32]);
    let mut lane_0 = with_first_records_after_a_mark(&key);
    let handover = lane_0.hand_over(TOPICS[0]);
    assert_eq!(handover.mark.map(|m| m.next_seq), Some(510));
    let handed: Vec<_> = handover
        .gaps
        .iter()
        .map(|g| (g.first_seq, g.last_seq))
        .collect();
    assert_eq!(handed, vec![(300, 499)]);
    assert_eq!(
        lane_0.stats().records_lost,
        200,
        "reported where it was seen"
    );
}

/// A numbering refused (a second sender of the topic, §7) is forgotten: nothing it showed is
/// called lost.
#[test]
fn a_refused_topic_is_forgotten_without_a_loss() {
    let key = LinkKey::new(&[7; 32]);
    let mut lane_0 = with_first_records_after_a_mark(&key);
    let forgotten = lane_0.forget(TOPICS[0]);
    assert!(forgotten.gaps.is_empty());
    assert_eq!(lane_0.stats().records_lost, 0);
    assert!(lane_0.poll_event().is_none());
    assert!(lane_0.watermarks().iter().all(|(t, _)| &**t != TOPICS[0]));
}
