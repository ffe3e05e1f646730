//! A topic's rate ceiling (`rate_mbps` on a topic): one chatty source cannot take the whole link
//! from the others. Sources that can wait (TCP, MQTT, Modbus) wait for it, which slows their peer
//! by flow control or leaves messages with the broker; UDP sources cannot, and drop what is over
//! it, counted as `diode_records_dropped_total{reason="rate"}`.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// A token bucket in bytes of record payload.
pub struct TopicRate {
    bytes_per_sec: f64,
    burst_bytes: f64,
    state: Mutex<(f64, Instant)>,
}

impl TopicRate {
    /// `burst` is the most that may pass at once after a quiet spell: 100 ms of the rate, and
    /// never less than 64 KiB so a single large record can pass at all.
    pub fn new(rate_mbps: f64) -> TopicRate {
        let bytes_per_sec = rate_mbps * 1e6 / 8.0;
        let burst_bytes = (bytes_per_sec / 10.0).max(65_536.0);
        TopicRate {
            bytes_per_sec,
            burst_bytes,
            state: Mutex::new((burst_bytes, Instant::now())),
        }
    }

    /// Takes `bytes` now if the bucket holds them; otherwise how long until it will.
    fn take(&self, bytes: usize) -> Result<(), Duration> {
        let mut state = self.state.lock().expect("not poisoned");
        let now = Instant::now();
        let (tokens, last) = *state;
        let tokens = (tokens + now.duration_since(last).as_secs_f64() * self.bytes_per_sec)
            .min(self.burst_bytes);
        // A record larger than the burst passes once the bucket is full, leaving it in debt.
        let need = (bytes as f64).min(self.burst_bytes);
        if tokens >= need {
            *state = (tokens - bytes as f64, now);
            Ok(())
        } else {
            *state = (tokens, now);
            Err(Duration::from_secs_f64(
                (need - tokens) / self.bytes_per_sec,
            ))
        }
    }

    pub fn try_acquire(&self, bytes: usize) -> bool {
        self.take(bytes).is_ok()
    }

    pub async fn acquire(&self, bytes: usize) {
        while let Err(wait) = self.take(bytes) {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waiting_sources_get_the_rate_and_no_more() {
        // 8 Mb/s = 1 MB/s; a burst of 100 KB.
        let rate = TopicRate::new(8.0);
        let start = Instant::now();
        for _ in 0..2100 {
            rate.acquire(1000).await;
        }
        // 2.1 MB at 1 MB/s, of which the first 100 KB is the burst: 2.0 s.
        let took = start.elapsed().as_secs_f64();
        assert!((1.99..2.02).contains(&took), "{took}");
    }

    #[tokio::test(start_paused = true)]
    async fn datagrams_over_the_rate_are_refused() {
        let rate = TopicRate::new(8.0);
        let mut passed = 0;
        for _ in 0..1000 {
            // 1,000 datagrams of 1 KB every millisecond: 1 MB/s offered... twice over.
            for _ in 0..2 {
                if rate.try_acquire(1000) {
                    passed += 1;
                }
            }
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        // 1 s at 1 MB/s plus the 100 KB burst.
        assert!((1095..=1105).contains(&passed), "{passed}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_larger_than_the_burst_still_passes() {
        let rate = TopicRate::new(0.8); // 100 KB/s, burst 64 KiB
        rate.acquire(1 << 20).await;
        let start = Instant::now();
        rate.acquire(1000).await;
        // The 1 MiB record left the bucket ~1 MB in debt: about 10 s to pay back.
        assert!(start.elapsed() >= Duration::from_secs(9));
    }
}
