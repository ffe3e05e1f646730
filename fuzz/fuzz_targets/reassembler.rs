//! The reassembler fed arbitrary sequences of datagrams, most with valid CRCs so that they reach
//! sessions, blocks, rebuilding and frame decoding. It must never panic nor exceed its memory cap.
#![no_main]

use std::time::{Duration, Instant};

use diode_wire::datagram::CRC_LEN;
use diode_wire::{Reassembler, ReassemblerConfig};
use libfuzzer_sys::fuzz_target;

const CAP: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let mut receiver = Reassembler::new(ReassemblerConfig {
        max_inflight_bytes: CAP,
        max_record_bytes: 1 << 16,
        max_topics: 8,
        ..ReassemblerConfig::default()
    });
    let mut now = Instant::now();
    // Input: [len: u16][time step ms: u8][datagram bytes] repeated.
    let mut rest = data;
    while rest.len() >= 3 {
        let len = u16::from_be_bytes([rest[0], rest[1]]) as usize;
        let step = rest[2];
        rest = &rest[3..];
        let len = len.min(rest.len());
        let mut datagram = rest[..len].to_vec();
        rest = &rest[len..];
        if datagram.len() >= CRC_LEN && step & 1 == 0 {
            let body = datagram.len() - CRC_LEN;
            let crc = crc32fast::hash(&datagram[..body]);
            datagram[body..].copy_from_slice(&crc.to_be_bytes());
        }
        let _ = receiver.handle_datagram(now, &datagram);
        now += Duration::from_millis(step as u64);
        receiver.handle_timeout(now);
        while receiver.poll_event().is_some() {}
        assert!(receiver.inflight_bytes() <= CAP);
    }
});
