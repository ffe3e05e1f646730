//! Log lines driven by input from outside (hostile datagrams, broken plant messages) go through a
//! [`LogThrottle`]: one line per interval at most, saying how many like it were folded in, so a
//! flood shows as a few lines a minute with exact counts instead of thousands a second. Counters
//! still count every event; only the log is thinned.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub struct LogThrottle {
    interval_ms: u64,
    /// Milliseconds since the process's first use of any throttle, plus one (0: never logged).
    next_ms: AtomicU64,
    folded: AtomicU64,
}

fn elapsed_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

impl LogThrottle {
    pub const fn new(interval: Duration) -> Self {
        LogThrottle {
            interval_ms: interval.as_millis() as u64,
            next_ms: AtomicU64::new(0),
            folded: AtomicU64::new(0),
        }
    }

    /// `Some(folded)` when a line may be logged now: `folded` events were held back since the
    /// last one. `None`: count it and stay quiet.
    pub fn allow(&self) -> Option<u64> {
        let now = elapsed_ms() + 1;
        let next = self.next_ms.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now + self.interval_ms,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.folded.swap(0, Ordering::AcqRel));
        }
        self.folded.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_rest_counted() {
        let throttle = LogThrottle::new(Duration::from_millis(200));
        assert_eq!(throttle.allow(), Some(0));
        for _ in 0..1000 {
            assert_eq!(throttle.allow(), None);
        }
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(throttle.allow(), Some(1000));
    }
}
