//! The encoder fed arbitrary records: payload and origin sizes up to and past what a block can
//! frame (an MQTT topic longer than a block once made it loop forever), under arbitrary link
//! geometries. Every record must be framed or refused at once, and whatever was framed must come
//! out of a clean link exactly once, intact.
#![no_main]

use std::time::Instant;

use bytes::Bytes;
use diode_wire::proto::Origin;
use diode_wire::{Encoder, EncoderConfig, Event, LinkKey, PushError, Reassembler, ReassemblerConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let mtu = 576 + (u16::from_be_bytes([data[0], data[1]]) as usize % 8500);
    let data_shards = 1 + data[2] as usize % 48;
    let parity_shards = data[3] as usize % 12;
    let keyed = data[2] & 0x80 != 0;
    let key = keyed.then(|| LinkKey::new(&[5; 32]));
    let now = Instant::now();
    let config = EncoderConfig {
        session_id: 7 << 20,
        mtu_bytes: mtu,
        data_shards,
        parity_shards: parity_shards.min(255 - data_shards),
        interleave_depth: 1 + data[3] as usize % 6,
        key: key.clone(),
        encrypt: keyed && data[3] & 0x80 != 0,
        ..Default::default()
    };
    let require_encryption = config.encrypt;
    let Ok(mut encoder) = Encoder::new(config, now) else {
        return;
    };
    let topics: Vec<_> = (0..3)
        .map(|i| encoder.add_topic(&"t".repeat(1 + i * 127)).unwrap())
        .collect();
    let mut receiver = Reassembler::new(ReassemblerConfig {
        keys: key.into_iter().collect(),
        require_encryption,
        ..ReassemblerConfig::default()
    });
    // Input after the header: [topic: u8][origin len: u16][payload len: u24] repeated.
    // Per topic: order holds within a topic, not across topics (each block batches per topic).
    let mut expected = vec![Vec::new(); topics.len()];
    for chunk in data[4..].chunks_exact(6).take(32) {
        let topic = topics[chunk[0] as usize % topics.len()];
        let origin_len = u16::from_be_bytes([chunk[1], chunk[2]]) as usize;
        let payload_len = (u32::from_be_bytes([0, chunk[3], chunk[4], chunk[5]]) as usize) % 300_000;
        let origin = (origin_len > 0).then(|| Origin {
            topic: "o".repeat(origin_len),
            qos: 1,
            retain: false,
            protocol: "mqtt".into(),
        });
        let payload = Bytes::from(vec![chunk[0]; payload_len]);
        match encoder.push_with_origin(now, topic, 1, origin, payload) {
            Ok(_) => expected[topic.index()].push(payload_len),
            Err(PushError::TooLarge(_)) => {}
            Err(e) => panic!("{e}"),
        }
    }
    encoder.finish(now, 1);
    let mut delivered = vec![Vec::new(); topics.len()];
    let mut datagrams = 0usize;
    while let Some(d) = encoder.poll_transmit(now) {
        datagrams += 1;
        assert!(datagrams < 1_000_000, "the encoder does not stop");
        assert!(d.len() + 28 <= mtu, "a datagram larger than the MTU");
        receiver.handle_datagram(now, &d).expect("a clean link");
        while let Some(event) = receiver.poll_event() {
            if let Event::Record(r) = event {
                delivered[(r.topic.len() - 1) / 127].push(r.payload.len());
            }
        }
    }
    assert_eq!(delivered, expected);
});
