//! A receiver restarted within a session (wire-format.md §6.1): with the floor and the topics'
//! marks it kept, the records sent while it was down are reported lost with their ranges, and
//! nothing it delivered before is delivered again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use diode_wire::{Encoder, EncoderConfig, Event, Gap, LinkKey, Reassembler, ReassemblerConfig};

struct Pair {
    encoder: Encoder,
    topics: Vec<diode_wire::TopicId>,
    now: Instant,
}

const TOPICS: [&str; 2] = ["line3/telemetry", "historian/events"];

impl Pair {
    fn new(key: &LinkKey) -> Pair {
        let now = Instant::now();
        let mut encoder = Encoder::new(
            EncoderConfig {
                session_id: 0x5E55 << 20,
                key: Some(key.clone()),
                ..Default::default()
            },
            now,
        )
        .unwrap();
        let topics = TOPICS
            .iter()
            .map(|t| encoder.add_topic(t).unwrap())
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
    let session = 0x5E55 << 20;
    assert_eq!(
        next,
        vec![
            (Arc::from(TOPICS[1]), 300, session),
            (Arc::from(TOPICS[0]), 300, session)
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
