//! Pacing: the sender is the only party that can keep a hardware diode's receiving NIC from
//! overflowing, so it never exceeds `rate_mbps`, measured in wire bytes (wire-format.md §1).
//! The encoder keeps one (`EncoderConfig::rate_mbps`) and hands out no datagram beyond it.

use std::time::{Duration, Instant};

/// A token bucket in bytes. Sending is allowed while the balance is not negative; a send may take
/// it below zero by one batch, which the refill then pays back. The bucket holds at most a quarter
/// of a millisecond of traffic (and at least two datagrams), so over any 10 ms window the rate stays
/// within a few percent of the ceiling.
#[derive(Debug, Clone)]
pub struct Pacer {
    bytes_per_sec: f64,
    burst_bytes: f64,
    balance: f64,
    last: Instant,
}

impl Pacer {
    pub fn new(rate_mbps: f64, max_datagram_wire_bytes: usize, now: Instant) -> Self {
        let bytes_per_sec = rate_mbps * 1e6 / 8.0;
        let burst_bytes = (bytes_per_sec * 0.00025).max(2.0 * max_datagram_wire_bytes as f64);
        Pacer {
            bytes_per_sec,
            burst_bytes,
            balance: burst_bytes,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now.max(self.last);
        self.balance = (self.balance + elapsed * self.bytes_per_sec).min(self.burst_bytes);
    }

    /// Bytes that may be sent now without going into debt: the budget of a send batch.
    pub fn budget(&mut self, now: Instant) -> usize {
        self.refill(now);
        self.balance.max(0.0) as usize
    }

    /// Whether anything may be sent now.
    pub fn ready(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.balance >= 0.0
    }

    pub fn consume(&mut self, wire_bytes: usize) {
        self.balance -= wire_bytes as f64;
    }

    /// When anything may be sent again: once the debt of the last batch is paid back, with a
    /// byte of credit so that a rounding remainder of debt cannot make a caller wake, find the
    /// pacer still not ready, and ask again at the same instant.
    pub fn next_send_time(&self) -> Instant {
        if self.balance >= 0.0 {
            self.last
        } else {
            self.last + Duration::from_secs_f64((1.0 - self.balance) / self.bytes_per_sec)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends as fast as allowed on a virtual clock and checks every 10 ms window.
    #[test]
    fn holds_the_rate_in_every_window() {
        let start = Instant::now();
        let mut pacer = Pacer::new(1000.0, 1500, start);
        let mut now = start;
        let mut sent = Vec::new();
        while now < start + Duration::from_secs(1) {
            if pacer.ready(now) {
                pacer.consume(1500);
                sent.push(now);
            } else {
                now = pacer.next_send_time();
            }
        }
        let total = sent.len() as f64 * 1500.0 * 8.0 / 1e6;
        assert!((total - 1000.0).abs() < 10.0, "{total} Mb in 1 s");
        let window = Duration::from_millis(10);
        let mut lo = 0;
        for hi in 0..sent.len() {
            while sent[hi] - sent[lo] >= window {
                lo += 1;
            }
            let mbits = (hi - lo + 1) as f64 * 1500.0 * 8.0 / 1e6;
            assert!(mbits <= 10.0 * 1.10, "{mbits} Mb in a 10 ms window");
        }
    }
}
