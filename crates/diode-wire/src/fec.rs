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

/// Decode matrices reed-solomon-erasure keeps per codec (its `DATA_DECODE_MATRIX_CACHE_CAPACITY`).
const DECODE_MATRICES_PER_CODEC: usize = 254;
/// Bytes a codec of `k` data shards can come to hold: its encoding matrix and a full cache of
/// k×k decode matrices, with a little bookkeeping each.
pub fn codec_cost_bytes(k: usize, m: usize) -> usize {
    (k + m) * k + DECODE_MATRICES_PER_CODEC * (k * k + 64)
}

/// Codecs kept across blocks by default: a 32 + 8 link uses at most 32 geometries of at most
/// 277 KiB each; anything beyond that is evicted least recently used first.
pub const DEFAULT_CODEC_CACHE_BYTES: usize = 16 << 20;

/// Building a codec inverts a matrix, and blocks reuse a handful of geometries, so codecs are
/// kept; but the geometry comes from datagram headers, which on an unauthenticated link only
/// need a valid CRC, and every codec grows its own cache of decode matrices. So the cache is
/// bounded by what its codecs can come to hold ([`codec_cost_bytes`]), not by their number.
pub struct CodecCache {
    codecs: HashMap<(usize, usize), CachedCodec>,
    budget_bytes: usize,
    used_bytes: usize,
    clock: u64,
    built: u64,
    evicted: u64,
}

struct CachedCodec {
    codec: Arc<ReedSolomon>,
    cost: usize,
    last_used: u64,
}

impl Default for CodecCache {
    fn default() -> Self {
        CodecCache::with_budget(DEFAULT_CODEC_CACHE_BYTES)
    }
}

impl CodecCache {
    /// A cache whose codecs can hold at most `budget_bytes` (one codec is always kept, however
    /// large: the largest, k = 254, costs about 16 MiB).
    pub fn with_budget(budget_bytes: usize) -> Self {
        CodecCache {
            codecs: HashMap::new(),
            budget_bytes,
            used_bytes: 0,
            clock: 0,
            built: 0,
            evicted: 0,
        }
    }

    /// `k ≥ 1, m ≥ 1, k + m ≤ 255` is checked by callers (datagram header rules).
    pub fn get(&mut self, k: usize, m: usize) -> Arc<ReedSolomon> {
        self.clock += 1;
        if let Some(entry) = self.codecs.get_mut(&(k, m)) {
            entry.last_used = self.clock;
            return entry.codec.clone();
        }
        let cost = codec_cost_bytes(k, m);
        while !self.codecs.is_empty() && self.used_bytes + cost > self.budget_bytes {
            let stalest = *self
                .codecs
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(key, _)| key)
                .expect("not empty");
            let entry = self.codecs.remove(&stalest).expect("present");
            self.used_bytes -= entry.cost;
            self.evicted += 1;
        }
        let codec = Arc::new(ReedSolomon::new(k, m).expect("geometry checked by caller"));
        self.built += 1;
        self.used_bytes += cost;
        self.codecs.insert(
            (k, m),
            CachedCodec {
                codec: codec.clone(),
                cost,
                last_used: self.clock,
            },
        );
        codec
    }

    /// What the cached codecs can come to hold, at most.
    pub fn bytes(&self) -> usize {
        self.used_bytes
    }

    /// Codecs built and codecs evicted since the start: a steady stream of either means
    /// datagrams with ever-new geometries.
    pub fn built(&self) -> u64 {
        self.built
    }

    pub fn evicted(&self) -> u64 {
        self.evicted
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
    fn the_cache_stays_within_its_budget_whatever_the_geometries() {
        let mut cache = CodecCache::with_budget(2 << 20);
        for k in 1..200 {
            for m in [1, 7, 55] {
                let _ = cache.get(k, m);
                assert!(
                    cache.bytes() <= (2 << 20).max(codec_cost_bytes(k, m)),
                    "{} bytes at k {k} m {m}",
                    cache.bytes()
                );
            }
        }
        assert!(cache.evicted() > 0);
        // Geometries in use stay cached.
        let built = cache.built();
        for _ in 0..100 {
            let _ = cache.get(32, 8);
            let _ = cache.get(3, 1);
        }
        assert_eq!(cache.built(), built + 2);
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
