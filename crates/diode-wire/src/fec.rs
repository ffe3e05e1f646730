//! Block geometry and Reed-Solomon coding: wire-format.md §3.

use std::collections::HashMap;
use std::sync::Arc;

use reed_solomon_erasure::galois_8::ReedSolomon;

/// Picks the geometry of a block holding `content_len` bytes (wire-format.md §3.1).
///
/// Returns `(k, m, shard_len)`. `max_shard_len` is the largest shard an MTU allows,
/// `data_shards` and `parity_shards` the configured K and M.
pub fn geometry_for(
    content_len: usize,
    max_shard_len: usize,
    data_shards: usize,
    parity_shards: usize,
) -> (usize, usize, usize) {
    let content_len = content_len.max(1);
    let k = content_len.div_ceil(max_shard_len).clamp(1, data_shards);
    let shard_len = content_len.div_ceil(k);
    let m = (k * parity_shards).div_ceil(data_shards);
    (k, m, shard_len)
}

/// Building a codec inverts a matrix; blocks reuse a handful of geometries, so codecs are kept.
#[derive(Default)]
pub struct CodecCache {
    codecs: HashMap<(usize, usize), Arc<ReedSolomon>>,
}

impl CodecCache {
    /// `k ≥ 1, m ≥ 1, k + m ≤ 255` is checked by callers (datagram header rules).
    pub fn get(&mut self, k: usize, m: usize) -> Arc<ReedSolomon> {
        self.codecs
            .entry((k, m))
            .or_insert_with(|| {
                Arc::new(ReedSolomon::new(k, m).expect("geometry checked by caller"))
            })
            .clone()
    }
}

/// Computes parity in place in a buffer of `k + m` equal-stride slots, each holding its shard at
/// `[offset, offset + shard_len)` (the datagram layout, so no copy is needed afterwards).
pub fn encode_strided(
    codec: &ReedSolomon,
    buf: &mut [u8],
    k: usize,
    stride: usize,
    offset: usize,
    shard_len: usize,
) {
    let (data, parity) = buf.split_at_mut(k * stride);
    let data: Vec<&[u8]> = data
        .chunks(stride)
        .map(|slot| &slot[offset..offset + shard_len])
        .collect();
    let mut parity: Vec<&mut [u8]> = parity
        .chunks_mut(stride)
        .map(|slot| &mut slot[offset..offset + shard_len])
        .collect();
    codec
        .encode_sep(&data, &mut parity)
        .expect("shard counts and lengths are consistent by construction");
}

/// Rebuilds missing data shards in place. `data` holds k shards of `shard_len` back to back,
/// `parity` m shards; `present[i]` says whether shard i (data first, then parity) arrived.
/// Fails only when fewer than k shards are present.
pub fn reconstruct(
    codec: &ReedSolomon,
    data: &mut [u8],
    parity: &mut [u8],
    shard_len: usize,
    present: &[bool],
) -> Result<(), reed_solomon_erasure::Error> {
    let mut shards: Vec<(&mut [u8], bool)> = data
        .chunks_mut(shard_len)
        .chain(parity.chunks_mut(shard_len))
        .zip(present.iter().copied())
        .collect();
    codec.reconstruct_data(&mut shards)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_and_small_blocks() {
        // A full block at MTU 1500 with 32 + 8.
        assert_eq!(geometry_for(32 * 1442, 1442, 32, 8), (32, 8, 1442));
        // A lone small record: one shard of its own size and one parity shard.
        assert_eq!(geometry_for(120, 1442, 32, 8), (1, 1, 120));
        // The parity ratio never drops below M/K.
        for c in 1..(32 * 1442) {
            let (k, m, len) = geometry_for(c, 1442, 32, 8);
            assert!(k * len >= c && len <= 1442);
            assert!(m * 32 >= k * 8);
        }
        assert_eq!(geometry_for(5000, 1442, 32, 0).1, 0);
    }

    #[test]
    fn any_k_shards_rebuild() {
        let (k, m, len) = (5, 3, 16);
        let stride = len + 4;
        let mut buf = vec![0u8; (k + m) * stride];
        for (i, b) in buf[..k * stride].iter_mut().enumerate() {
            *b = (i * 7 % 251) as u8;
        }
        let mut cache = CodecCache::default();
        let codec = cache.get(k, m);
        encode_strided(&codec, &mut buf, k, stride, 2, len);
        let shard = |i: usize| buf[i * stride + 2..i * stride + 2 + len].to_vec();
        let original: Vec<u8> = (0..k).flat_map(shard).collect();
        // Lose every combination of m shards.
        for lost in 0u32..(1 << (k + m)) {
            if lost.count_ones() as usize != m {
                continue;
            }
            let present: Vec<bool> = (0..k + m).map(|i| lost & (1 << i) == 0).collect();
            let mut data: Vec<u8> = (0..k)
                .flat_map(|i| if present[i] { shard(i) } else { vec![0; len] })
                .collect();
            let mut parity: Vec<u8> = (k..k + m)
                .flat_map(|i| if present[i] { shard(i) } else { vec![0; len] })
                .collect();
            reconstruct(&codec, &mut data, &mut parity, len, &present).unwrap();
            assert_eq!(data, original, "lost set {lost:b}");
        }
    }
}
