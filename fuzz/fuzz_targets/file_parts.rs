//! A files topic's payloads (wire-format.md §5.6) on arbitrary bytes: decoding never panics, a
//! path `check_path` accepts can only name something below the directory it is joined to, and
//! the byte ranges a receiver keeps stay sorted, disjoint and within their bound.
#![no_main]

use bytes::Bytes;
use diode_wire::files::{check_path, Part, RangeSet};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Part::Manifest(m)) = Part::decode(Bytes::copy_from_slice(data)) {
        if let Ok(names) = check_path(&m.path) {
            assert!(!names.is_empty());
            for name in names {
                assert!(!name.is_empty() && name != "." && name != "..");
                assert!(!name.contains('/') && !name.contains('\\') && !name.contains('\0'));
            }
        }
    }
    let _ = check_path(data);
    let mut set = RangeSet::default();
    for pair in data.chunks_exact(4) {
        let start = u64::from(u16::from_le_bytes([pair[0], pair[1]]));
        let len = u64::from(pair[2] % 64);
        let _ = set.insert(start, start + len, 16);
        let ranges = set.ranges();
        assert!(ranges.len() <= 16);
        assert!(ranges.windows(2).all(|w| w[0].1 < w[1].0));
        assert!(ranges.iter().all(|(s, e)| s < e));
    }
});
