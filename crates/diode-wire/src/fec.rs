//! Block geometry and Reed-Solomon coding: wire-format.md §3.

use std::collections::HashMap;
use std::sync::Arc;

use reed_solomon_erasure::galois_8::ReedSolomon;

/// How much parity each block size gets (wire-format.md §3.1): a block of `k` data shards gets
/// `parity(k)`, chosen so that its chance of being lost at the link's design point is no worse
/// than a full block's (`data_shards + parity_shards`). Small blocks are where low-rate plant
/// telemetry lives; with parity in proportion alone, a 3-shard block got 1 parity shard and died
/// of any two losses, while a full 32 + 8 block survives eight.
#[derive(Debug, Clone, PartialEq)]
pub struct ParityPlan {
    /// `parity[k - 1]`: the parity shards of a block of `k` data shards.
    parity: Vec<usize>,
    /// The full block's loss probability at the design point: the target every size meets.
    target: f64,
}

/// The loss the link is designed for: independent loss of `loss` (a fraction) of datagrams, plus
/// one burst of `burst_datagrams` consecutive datagrams landing on a block that is sent alone.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DesignPoint {
    pub loss: f64,
    pub burst_datagrams: usize,
}

impl ParityPlan {
    /// The plan for `data_shards` (K) and `parity_shards` (M): never less parity than `k·M/K`
    /// (today's proportion), full blocks exactly M (their overhead and throughput are the
    /// configured ones), and in between the least parity that meets the full block's loss
    /// probability at the design point, within 255 shards a block.
    pub fn new(data_shards: usize, parity_shards: usize, design: DesignPoint) -> Self {
        let (big_k, big_m) = (data_shards, parity_shards);
        // A full block is interleaved with others at the rates that fill it (§3.3): a burst
        // costs it about its share of the group, so it is judged by the independent loss.
        let target = block_loss_probability(big_k + big_m, big_m, 0, design.loss);
        let mut parity = Vec::with_capacity(big_k);
        for k in 1..=big_k {
            let proportional = (k * big_m).div_ceil(big_k);
            if big_m == 0 || k == big_k {
                parity.push(proportional);
                continue;
            }
            let mut m = proportional;
            while k + m < MAX_SHARDS {
                let n = k + m;
                // A block small enough to leave alone takes a whole burst, up to its size.
                let hits = design.burst_datagrams.min(n);
                if block_loss_probability(n, m, hits, design.loss) <= target {
                    break;
                }
                m += 1;
            }
            parity.push(m.min(MAX_SHARDS - k));
        }
        ParityPlan { parity, target }
    }

    /// Parity shards for a block of `k` data shards (`1 ≤ k ≤ data_shards`).
    pub fn parity(&self, k: usize) -> usize {
        self.parity[k.clamp(1, self.parity.len()) - 1]
    }

    /// The loss probability every block size meets at the design point (a full block's).
    pub fn target(&self) -> f64 {
        self.target
    }

    /// The loss probability of a block of `k` data shards at the design point.
    pub fn residual(&self, k: usize, design: DesignPoint) -> f64 {
        let m = self.parity(k);
        let hits = if k == self.parity.len() {
            0
        } else {
            design.burst_datagrams.min(k + m)
        };
        block_loss_probability(k + m, m, hits, design.loss)
    }
}

/// GF(2^8) Reed-Solomon: at most 255 shards a block (wire-format.md §2).
const MAX_SHARDS: usize = 255;

/// This build's Reed-Solomon kernels need CPU instructions this host lacks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "this build's Reed-Solomon kernels are compiled for x86-64 Haswell (2013) or later, and this \
     CPU lacks {missing}: they would stop the service with an illegal instruction at the first \
     block. Build for this CPU with RUST_REED_SOLOMON_ERASURE_ARCH set to its architecture, or \
     with --no-default-features (README, \"Building for older OT hardware\")"
)]
pub struct UnsupportedCpu {
    pub missing: String,
}

/// Whether this CPU runs the parity code this build carries. reed-solomon-erasure's SIMD
/// kernels are C compiled for `-march=haswell` unless `RUST_REED_SOLOMON_ERASURE_ARCH` named
/// another architecture at build time; on an older CPU (OT hosts often are) they would die of
/// an illegal instruction at the first block. The services check at start instead.
pub fn check_cpu() -> Result<(), UnsupportedCpu> {
    #[cfg(all(feature = "simd", target_arch = "x86_64"))]
    if option_env!("RUST_REED_SOLOMON_ERASURE_ARCH").is_none() {
        // What -march=haswell lets the compiler use beyond x86-64-v2.
        let missing: Vec<&str> = [
            ("avx2", std::arch::is_x86_feature_detected!("avx2")),
            ("fma", std::arch::is_x86_feature_detected!("fma")),
            ("bmi1", std::arch::is_x86_feature_detected!("bmi1")),
            ("bmi2", std::arch::is_x86_feature_detected!("bmi2")),
            ("lzcnt", std::arch::is_x86_feature_detected!("lzcnt")),
            ("movbe", std::arch::is_x86_feature_detected!("movbe")),
            ("f16c", std::arch::is_x86_feature_detected!("f16c")),
        ]
        .into_iter()
        .filter(|(_, present)| !present)
        .map(|(name, _)| name)
        .collect();
        if !missing.is_empty() {
            return Err(UnsupportedCpu {
                missing: missing.join(", "),
            });
        }
    }
    Ok(())
}

/// The chance that a block of `n` datagrams with `m` parity is lost when `hits` of them are lost
/// to a burst and each of the others independently with probability `p`: more than `m` lost.
pub fn block_loss_probability(n: usize, m: usize, hits: usize, p: f64) -> f64 {
    if hits > m {
        return 1.0;
    }
    let rest = n - hits;
    let allowed = m - hits;
    // P(Binomial(rest, p) > allowed), summed from the top, where the terms are smallest.
    let mut lost = 0.0;
    let mut term = p.powi(rest as i32);
    for j in (allowed + 1..=rest).rev() {
        lost += term;
        // term(j-1) = term(j) · j / (rest - j + 1) · (1 - p) / p
        if p > 0.0 && j > 0 {
            term *= j as f64 / (rest - j + 1) as f64 * (1.0 - p) / p;
        }
    }
    lost.min(1.0)
}

/// Picks the geometry of a block holding `content_len` bytes (wire-format.md §3.1).
///
/// Returns `(k, m, shard_len)`. `max_shard_len` is the largest shard an MTU allows,
/// `data_shards` the configured K, `plan` the parity of each block size.
pub fn geometry_for(
    content_len: usize,
    max_shard_len: usize,
    data_shards: usize,
    plan: &ParityPlan,
) -> (usize, usize, usize) {
    let content_len = content_len.max(1);
    let k = content_len.div_ceil(max_shard_len).clamp(1, data_shards);
    let shard_len = content_len.div_ceil(k);
    (k, plan.parity(k), shard_len)
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

/// A block's shards as they arrive (wire-format.md §3.2), laid out for [`reconstruct`]: data
/// shards back to back in `data`, parity shards in `parity`.
#[derive(Debug)]
pub struct ShardSet {
    data_shards: usize,
    shard_len: usize,
    pub data: Vec<u8>,
    pub parity: Vec<u8>,
    present: Vec<bool>,
    received: usize,
    data_received: usize,
}

impl ShardSet {
    pub fn new(data_shards: usize, parity_shards: usize, shard_len: usize) -> Self {
        ShardSet {
            data_shards,
            shard_len,
            data: vec![0; data_shards * shard_len],
            parity: vec![0; parity_shards * shard_len],
            present: vec![false; data_shards + parity_shards],
            received: 0,
            data_received: 0,
        }
    }

    /// Keeps shard `index` (which the caller has checked is in the block); false if it was
    /// there already.
    pub fn put(&mut self, index: usize, shard: &[u8]) -> bool {
        if self.present[index] {
            return false;
        }
        self.present[index] = true;
        self.received += 1;
        let (k, len) = (self.data_shards, self.shard_len);
        if index < k {
            self.data[index * len..(index + 1) * len].copy_from_slice(shard);
            self.data_received += 1;
        } else {
            self.parity[(index - k) * len..(index - k + 1) * len].copy_from_slice(shard);
        }
        true
    }

    /// Whether k shards are here, enough to rebuild the block.
    pub fn is_complete(&self) -> bool {
        self.received >= self.data_shards
    }

    /// Rebuilds the missing data shards of a complete set; `Ok(false)` when none was missing
    /// (no decoding at all).
    pub fn rebuild(&mut self, cache: &mut CodecCache) -> Result<bool, reed_solomon_erasure::Error> {
        if self.data_received == self.data_shards {
            return Ok(false);
        }
        let parity_shards = self.present.len() - self.data_shards;
        let codec = cache.get(self.data_shards, parity_shards);
        reconstruct(
            &codec,
            &mut self.data,
            &mut self.parity,
            self.shard_len,
            &self.present,
        )?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unsupported_cpu_is_told_what_it_lacks_and_what_to_build() {
        let text = UnsupportedCpu {
            missing: "avx2, fma".into(),
        }
        .to_string();
        assert!(text.contains("lacks avx2, fma"), "{text}");
        assert!(
            text.contains("RUST_REED_SOLOMON_ERASURE_ARCH")
                && text.contains("--no-default-features")
        );
        // The machine that builds and tests this runs what it built.
        assert_eq!(check_cpu(), Ok(()));
    }

    const NO_DESIGN: DesignPoint = DesignPoint {
        loss: 0.0,
        burst_datagrams: 0,
    };

    #[test]
    fn full_and_small_blocks() {
        // With no design loss the plan is the proportional one of old.
        let plan = ParityPlan::new(32, 8, NO_DESIGN);
        assert_eq!(geometry_for(32 * 1442, 1442, 32, &plan), (32, 8, 1442));
        assert_eq!(geometry_for(120, 1442, 32, &plan), (1, 1, 120));
        for c in 1..(32 * 1442) {
            let (k, m, len) = geometry_for(c, 1442, 32, &plan);
            assert!(k * len >= c && len <= 1442);
            assert!(m * 32 >= k * 8);
        }
        assert_eq!(
            geometry_for(5000, 1442, 32, &ParityPlan::new(32, 0, NO_DESIGN)).1,
            0
        );
    }

    /// The case: at 3 % loss a 3-shard block had 1 parity shard and a 50-record UDP
    /// block died of any two losses. Every size now meets the full block's loss probability,
    /// full blocks keep their configured overhead.
    #[test]
    fn every_block_is_as_safe_as_a_full_one() {
        for design in [
            DesignPoint {
                loss: 0.01,
                burst_datagrams: 0,
            },
            DesignPoint {
                loss: 0.03,
                burst_datagrams: 0,
            },
            DesignPoint {
                loss: 0.03,
                burst_datagrams: 6,
            },
            DesignPoint {
                loss: 0.10,
                burst_datagrams: 2,
            },
        ] {
            let plan = ParityPlan::new(32, 8, design);
            assert_eq!(plan.parity(32), 8);
            for k in 1..=32 {
                assert!(plan.parity(k) * 32 >= k * 8, "never below the proportion");
                assert!(
                    plan.residual(k, design) <= plan.target() * (1.0 + 1e-9),
                    "{design:?} k {k}: {} > {}",
                    plan.residual(k, design),
                    plan.target()
                );
            }
        }
        let plan = ParityPlan::new(
            32,
            8,
            DesignPoint {
                loss: 0.03,
                burst_datagrams: 0,
            },
        );
        assert_eq!((plan.parity(1), plan.parity(3), plan.parity(16)), (3, 4, 7));
        // Within a block's 255 shards whatever is asked.
        let plan = ParityPlan::new(
            200,
            55,
            DesignPoint {
                loss: 0.3,
                burst_datagrams: 100,
            },
        );
        assert!((1..=200).all(|k| k + plan.parity(k) <= 255));
    }

    #[test]
    fn loss_probabilities_match_the_binomial() {
        // 40 datagrams, 8 parity, 3 %: the sum of the tail terms.
        let exact: f64 = (9..=40)
            .map(|j| {
                let c: f64 = (0..j).map(|i| (40 - i) as f64 / (i + 1) as f64).product();
                c * 0.03f64.powi(j) * 0.97f64.powi(40 - j)
            })
            .sum();
        let computed = block_loss_probability(40, 8, 0, 0.03);
        assert!(
            (computed - exact).abs() < exact * 1e-9,
            "{computed} vs {exact}"
        );
        assert_eq!(block_loss_probability(4, 1, 2, 0.01), 1.0);
        assert_eq!(block_loss_probability(4, 3, 0, 0.0), 0.0);
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
