//! An impaired one-way link in memory, for tests: loss (independent and in bursts), reordering,
//! duplication, corruption and truncation, all from a seed so that a failing case replays.

/// SplitMix64: small, seedable, good enough to draw impairments.
#[derive(Debug, Clone)]
pub struct SimRng(u64);

impl SimRng {
    pub fn new(seed: u64) -> Self {
        SimRng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Impairments {
    /// Independent loss probability per datagram.
    pub drop_rate: f64,
    /// Probability that a burst of consecutive losses starts at a datagram.
    pub burst_rate: f64,
    /// Datagrams lost in a burst.
    pub burst_len: usize,
    /// Probability that a datagram is held back and released after `reorder_distance` others.
    pub reorder_rate: f64,
    pub reorder_distance: usize,
    pub duplicate_rate: f64,
    /// Probability of one flipped bit.
    pub corrupt_rate: f64,
    /// Probability of losing a random-length tail.
    pub truncate_rate: f64,
}

/// Carries datagrams one way, spoiling them as configured.
pub struct SimLink {
    impairments: Impairments,
    rng: SimRng,
    burst_left: usize,
    held: Vec<(usize, Vec<u8>)>,
    /// When false, everything is dropped (a blackhole).
    pub up: bool,
    pub delivered: u64,
    pub dropped: u64,
}

impl SimLink {
    pub fn new(impairments: Impairments, seed: u64) -> Self {
        SimLink {
            impairments,
            rng: SimRng::new(seed),
            burst_left: 0,
            held: Vec::new(),
            up: true,
            delivered: 0,
            dropped: 0,
        }
    }

    /// Sends one datagram; returns what comes out of the far end now (possibly none, possibly
    /// several, possibly earlier datagrams released by reordering).
    pub fn transmit(&mut self, datagram: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        // Release held datagrams whose distance has run out.
        for (left, _) in &mut self.held {
            *left = left.saturating_sub(1);
        }
        while let Some(i) = self.held.iter().position(|(left, _)| *left == 0) {
            out.push(self.held.swap_remove(i).1);
        }
        let imp = &self.impairments;
        let lost = if !self.up {
            true
        } else if self.burst_left > 0 {
            self.burst_left -= 1;
            true
        } else if self.rng.chance(imp.burst_rate) {
            self.burst_left = imp.burst_len.saturating_sub(1);
            true
        } else {
            self.rng.chance(imp.drop_rate)
        };
        if lost {
            self.dropped += 1;
        } else {
            let mut d = datagram.to_vec();
            if self.rng.chance(imp.corrupt_rate) && !d.is_empty() {
                let bit = self.rng.below(d.len() as u64 * 8) as usize;
                d[bit / 8] ^= 1 << (bit % 8);
            }
            if self.rng.chance(imp.truncate_rate) && !d.is_empty() {
                let keep = self.rng.below(d.len() as u64) as usize;
                d.truncate(keep);
            }
            if self.rng.chance(imp.duplicate_rate) {
                out.push(d.clone());
            }
            if self.rng.chance(imp.reorder_rate) {
                self.held.push((imp.reorder_distance.max(1), d));
            } else {
                out.push(d);
            }
        }
        self.delivered += out.len() as u64;
        out
    }

    /// Everything still held back by reordering.
    pub fn drain(&mut self) -> Vec<Vec<u8>> {
        let out: Vec<Vec<u8>> = self.held.drain(..).map(|(_, d)| d).collect();
        self.delivered += out.len() as u64;
        out
    }
}
