//! The datagram parser on arbitrary bytes, with and without keys, and with a CRC made valid so
//! the fuzzer gets past it to the header and authentication checks.
#![no_main]

use diode_wire::datagram::{parse, CRC_LEN};
use diode_wire::LinkKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = LinkKey::new(&[7u8; 32]);
    let _ = parse(data, &[]);
    let _ = parse(data, std::slice::from_ref(&key));
    if data.len() >= CRC_LEN {
        let mut fixed = data.to_vec();
        let body = fixed.len() - CRC_LEN;
        let crc = crc32fast::hash(&fixed[..body]);
        fixed[body..].copy_from_slice(&crc.to_be_bytes());
        if let Ok((header, shard)) = parse(&fixed, &[]) {
            assert_eq!(shard.len(), header.geometry.shard_len as usize);
        }
        let _ = parse(&fixed, std::slice::from_ref(&key));
    }
});
