//! Hostile input at the edges of both state machines: records whose metadata cannot be framed
//! (the sender's link thread once spun forever on one), replays after a receiver restart, and
//! floods of unconfirmed sessions.

use std::time::{Duration, Instant};

use bytes::Bytes;
use diode_wire::proto::Origin;
use diode_wire::{
    datagram, Encoder, EncoderConfig, Event, LinkKey, PushError, Reassembler, ReassemblerConfig,
    Rejected,
};
use proptest::prelude::*;

fn config(mtu_bytes: usize, data_shards: usize, parity_shards: usize, key: bool) -> EncoderConfig {
    EncoderConfig {
        session_id: 0x5E55_0001,
        mtu_bytes,
        data_shards,
        parity_shards,
        design: diode_wire::DesignPoint {
            loss: 0.01,
            burst_datagrams: 0,
        },
        key: key.then(|| LinkKey::new(&[7; 32])),
        encrypt: key,
        ..Default::default()
    }
}

/// Everything the encoder holds, through a clean link into a reassembler.
fn deliver(encoder: &mut Encoder, receiver: &mut Reassembler, now: Instant) -> Vec<Event> {
    encoder.flush(now);
    let mut events = Vec::new();
    while let Some(d) = encoder.poll_transmit(now) {
        let _ = receiver.handle_datagram(now, &d);
        while let Some(e) = receiver.poll_event() {
            events.push(e);
        }
    }
    events
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Any record, whatever its payload and origin sizes, is either framed and delivered intact
    /// or refused at once; the encoder never loops without progress, and refusal happens exactly
    /// when the origin is longer than the limit it publishes.
    #[test]
    fn any_record_is_framed_or_refused(
        mtu in prop_oneof![Just(576usize), Just(1500), 576usize..9000],
        data_shards in 1usize..40,
        parity_shards in 0usize..10,
        key in any::<bool>(),
        topic_len in 1usize..=255,
        origin_len in prop_oneof![0usize..64, 0usize..70_000],
        payload_len in prop_oneof![0usize..2000, 0usize..300_000],
    ) {
        let now = Instant::now();
        let config = config(mtu, data_shards, parity_shards, key);
        let keys = config.key.iter().cloned().collect();
        let mut encoder = Encoder::new(config, now).unwrap();
        let topic_name = "t".repeat(topic_len);
        let topic = encoder.add_topic(&topic_name).unwrap();
        let limit = encoder.limits().max_origin_topic_bytes(topic_len);
        let origin = (origin_len > 0).then(|| Origin { topic: "o".repeat(origin_len), qos: 1, retain: true, protocol: "mqtt".into() });
        let payload = Bytes::from(vec![0xA5; payload_len]);
        let pushed = encoder.push_with_origin(now, topic, 1, origin.clone(), payload.clone());
        if origin_len <= limit {
            prop_assert_eq!(pushed, Ok(0));
            let mut receiver = Reassembler::new(ReassemblerConfig { keys, require_encryption: key, ..ReassemblerConfig::default() });
            let records: Vec<_> = deliver(&mut encoder, &mut receiver, now)
                .into_iter()
                .filter_map(|e| match e { Event::Record(r) => Some(r), _ => None })
                .collect();
            prop_assert_eq!(records.len(), 1);
            prop_assert_eq!(&records[0].payload, &payload);
            prop_assert_eq!(&records[0].origin, &origin);
        } else {
            prop_assert!(matches!(pushed, Err(PushError::TooLarge(_))), "{:?}", pushed);
            prop_assert_eq!(encoder.stats().records_refused, 1);
            // A refused record takes no sequence number, and the encoder goes on working.
            prop_assert_eq!(encoder.push(now, topic, 1, Bytes::from_static(b"next")), Ok(0));
        }
    }
}

/// The probe's case: an MQTT topic longer than a 32-shard block at MTU 1500 (~46 KB).
#[test]
fn an_origin_longer_than_a_block_is_refused_not_spun_on() {
    let now = Instant::now();
    let mut encoder = Encoder::new(config(1500, 32, 8, false), now).unwrap();
    let topic = encoder.add_topic("plant/mqtt").unwrap();
    let origin = Origin {
        topic: "x".repeat(50_000),
        qos: 1,
        retain: true,
        protocol: "mqtt".into(),
    };
    let refused = encoder.push_with_origin(now, topic, 0, Some(origin), Bytes::from_static(b"v"));
    assert!(matches!(refused, Err(PushError::TooLarge(_))));
    let limit = encoder.limits().max_origin_topic_bytes("plant/mqtt".len());
    assert!((45_000..46_144).contains(&limit), "{limit}");
}

/// A receiver that restarts keeps its replay floor: a captured old session, and the current
/// session's already delivered blocks, are refused after the restart as before it.
#[test]
fn replays_are_refused_across_a_receiver_restart() {
    let key = LinkKey::new(&[9; 32]);
    let mut now = Instant::now();
    let receiver_config = || ReassemblerConfig {
        keys: vec![key.clone()],
        ..ReassemblerConfig::default()
    };
    let mut receiver = Reassembler::new(receiver_config());
    let session = |id| {
        EncoderConfig {
            key: Some(key.clone()),
            encrypt: false,
            ..config(1500, 32, 8, true)
        }
        .with_session(id)
    };
    let mut captured_old = Vec::new();
    let mut old = Encoder::new(session(100 << 20), now).unwrap();
    let t = old.add_topic("line3").unwrap();
    for i in 0..50 {
        old.push(now, t, 1, Bytes::from(format!("old {i}")))
            .unwrap();
        old.flush(now);
        while let Some(d) = old.poll_transmit(now) {
            captured_old.push(d.to_vec());
            receiver.handle_datagram(now, &d).unwrap();
        }
    }
    let mut current = Encoder::new(session(200 << 20), now).unwrap();
    let t = current.add_topic("line3").unwrap();
    let mut captured_current = Vec::new();
    for i in 0..50 {
        now += Duration::from_millis(1);
        current
            .push(now, t, 1, Bytes::from(format!("new {i}")))
            .unwrap();
        current.flush(now);
        while let Some(d) = current.poll_transmit(now) {
            captured_current.push(d.to_vec());
            receiver.handle_datagram(now, &d).unwrap();
        }
    }
    let floor = receiver
        .replay_floor()
        .expect("an authenticated link has a floor");
    assert_eq!(floor.session_id, 200 << 20);

    // The receiver restarts with its floor.
    let mut restarted = Reassembler::new(receiver_config());
    restarted.restore_replay_floor(floor);
    for d in &captured_old {
        assert_eq!(restarted.handle_datagram(now, d), Err(Rejected::Replay));
    }
    for d in &captured_current {
        let _ = restarted.handle_datagram(now, d);
    }
    restarted.handle_timeout(now + Duration::from_secs(1));
    assert!(
        std::iter::from_fn(|| restarted.poll_event()).all(|e| !matches!(e, Event::Record(_))),
        "a replayed record was delivered again"
    );
    // The sender goes on: its new records are delivered.
    current
        .push(now, t, 1, Bytes::from_static(b"live"))
        .unwrap();
    let events = deliver(&mut current, &mut restarted, now);
    let live: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::Record(r) => Some(r.payload.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(live, vec![Bytes::from_static(b"live")]);
    // Without the floor, the same replay is delivered: the floor is what refuses it.
    let mut forgetful = Reassembler::new(receiver_config());
    for d in &captured_old {
        let _ = forgetful.handle_datagram(now, d);
    }
    assert!(forgetful.stats().records_out > 0);
}

/// A flood of small datagrams of one unconfirmed session used to cost a re-check of everything
/// held for it per datagram (quadratic). Now each costs the same bounded work: compared with
/// the same number of a live session's datagrams in the same run, with a wide margin for noise.
#[test]
fn unconfirmed_floods_cost_bounded_work_per_datagram() {
    let now = Instant::now();
    let mut receiver = Reassembler::new(ReassemblerConfig::default());
    let mut genuine = Encoder::new(config(1500, 32, 8, false), now).unwrap();
    let t = genuine.add_topic("line3").unwrap();
    let mut live = Vec::new();
    for i in 0..20_000u32 {
        genuine
            .push(now, t, 1, Bytes::from(i.to_be_bytes().to_vec()))
            .unwrap();
        if i % 3 == 0 {
            genuine.flush(now);
        }
        while let Some(d) = genuine.poll_transmit(now) {
            live.push(d.to_vec());
        }
    }
    let flood: Vec<Vec<u8>> = (0..live.len() as u64)
        .map(|i| {
            let header = datagram::Header {
                authenticated: false,
                encrypted: false,
                session_id: 0xF0F0_0000,
                block: i,
                shard_index: 0,
                geometry: datagram::BlockGeometry {
                    data_shards: 2,
                    parity_shards: 1,
                    interleave_depth: 4,
                    shard_len: 8,
                },
            };
            let mut d = vec![0u8; header.geometry.datagram_len(false)];
            header.write(&mut d);
            datagram::seal(&mut d, None);
            d
        })
        .collect();
    let started = Instant::now();
    for d in &live {
        let _ = receiver.handle_datagram(now, d);
    }
    while receiver.poll_event().is_some() {}
    let live_time = started.elapsed();
    let started = Instant::now();
    for d in &flood {
        assert_eq!(receiver.handle_datagram(now, d), Err(Rejected::Unconfirmed));
    }
    let flood_time = started.elapsed();
    assert!(
        flood_time < live_time * 20 + Duration::from_millis(50),
        "{} flood datagrams took {flood_time:?}, {} live ones {live_time:?}",
        flood.len(),
        live.len()
    );
    // The genuine session is still the receiver's.
    assert_eq!(receiver.session_id(), Some(0x5E55_0001));
}
