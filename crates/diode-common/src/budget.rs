//! Byte budgets for queues between tasks and threads.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A budget of bytes for a queue of records, whatever their sizes: what bounds its memory.
#[derive(Clone)]
pub struct ByteBudget {
    permits: Arc<Semaphore>,
    total: usize,
}

impl ByteBudget {
    pub fn new(bytes: usize) -> Self {
        let total = bytes.clamp(1, Semaphore::MAX_PERMITS);
        ByteBudget {
            permits: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// Bytes it holds at most.
    pub fn capacity(&self) -> usize {
        self.total
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.total - self.permits.available_permits()
    }

    /// A record larger than the whole budget takes all of it, so it can still pass alone.
    fn share(&self, len: usize) -> u32 {
        len.clamp(1, self.total).min(u32::MAX as usize) as u32
    }

    /// Waits for room (a TCP source, whose sender TCP flow control then slows).
    pub async fn acquire(&self, len: usize) -> OwnedSemaphorePermit {
        self.permits
            .clone()
            .acquire_many_owned(self.share(len))
            .await
            .expect("the budget's semaphore is never closed")
    }

    /// Room now or never (a UDP source or a receiver, which cannot slow their senders).
    pub fn try_acquire(&self, len: usize) -> Option<OwnedSemaphorePermit> {
        self.permits
            .clone()
            .try_acquire_many_owned(self.share(len))
            .ok()
    }
}
