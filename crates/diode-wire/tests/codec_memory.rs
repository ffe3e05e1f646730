//! The Reed-Solomon codec cache, measured in the process's real memory (this file is its own
//! test binary, so nothing else runs beside it): CRC-valid datagrams with ever-new geometries,
//! each block forcing a decode, used to grow the receiver without bound.

use std::time::Instant;

use diode_wire::datagram;
use diode_wire::{Reassembler, ReassemblerConfig};

fn resident_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("Linux /proc");
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[test]
fn new_geometries_and_decode_patterns_cannot_grow_memory_without_bound() {
    let mut receiver = Reassembler::new(ReassemblerConfig::default());
    let now = Instant::now();
    let mut rng = diode_wire::sim::SimRng::new(5);
    let before = resident_bytes();
    let mut block = 0u64;
    for k in 60..100usize {
        for m in 1..=(255 - k).min(40) {
            // Lose a different set of data shards each time, so each block needs a decode
            // matrix of its own; send exactly k of the k + m shards.
            let skip = 1 + rng.below(m as u64) as usize;
            let start = rng.below((k - skip) as u64) as usize;
            for index in (0..k + m)
                .filter(|i| !(start..start + skip).contains(i))
                .take(k)
            {
                let header = datagram::Header {
                    authenticated: false,
                    encrypted: false,
                    session_id: 42,
                    block,
                    shard_index: index as u8,
                    geometry: datagram::BlockGeometry {
                        data_shards: k as u8,
                        parity_shards: m as u8,
                        interleave_depth: 1,
                        shard_len: 4,
                    },
                };
                let mut d = vec![0u8; header.geometry.datagram_len(false)];
                header.write(&mut d);
                d[datagram::HEADER_LEN..datagram::HEADER_LEN + 4]
                    .copy_from_slice(&(rng.next_u64() as u32).to_be_bytes());
                datagram::seal(&mut d, None);
                let _ = receiver.handle_datagram(now, &d);
            }
            block += 1;
            while receiver.poll_event().is_some() {}
        }
    }
    let stats = receiver.stats();
    assert!(stats.blocks_recovered > 1500, "{stats:?}");
    assert!(stats.codecs_evicted > 1500, "{stats:?}");
    let grown = resident_bytes().saturating_sub(before);
    assert!(receiver.codec_cache_bytes() <= 32 << 20);
    // Unbounded, the 1,600 codecs above took 40 MiB here (each its encoding matrix and a decode
    // matrix); bounded, under 1 MiB.
    assert!(
        grown < 12 << 20,
        "resident memory grew by {} MiB",
        grown >> 20
    );
}
