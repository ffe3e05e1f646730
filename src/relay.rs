//! A UDP relay standing in for the hardware diode between the two services: it forwards datagrams
//! one way through an impaired link (loss, bursts, reordering, duplication, corruption), can go
//! dark on command, and counts anything that comes back the other way, which
//! must always be nothing.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use diode_wire::sim::{Impairments, SimLink};

#[derive(Debug, Clone, Default)]
pub struct RelayConfig {
    pub impairments: Impairments,
    pub seed: u64,
}

#[derive(Debug, Default)]
pub struct RelayStats {
    pub received: AtomicU64,
    pub forwarded: AtomicU64,
    pub dropped: AtomicU64,
    /// Datagrams that reached the relay from the receiver's side: a diode would make them
    /// impossible, and the receiver must never try.
    pub backwards: AtomicU64,
}

pub struct Relay {
    /// Where the sender should send.
    pub listen_addr: SocketAddr,
    pub stats: Arc<RelayStats>,
    dark: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// What an attacker on the IT side could record: every datagram forwarded, while capturing.
    capture: Arc<std::sync::Mutex<Option<Vec<Vec<u8>>>>>,
    /// The socket datagrams leave from, and where they go: `inject` sends from it too.
    outbound: UdpSocket,
    to: SocketAddr,
}

impl Relay {
    /// Starts relaying from a fresh loopback port to `to`.
    pub fn start(to: SocketAddr, config: RelayConfig) -> std::io::Result<Relay> {
        let inbound = UdpSocket::bind("127.0.0.1:0")?;
        let outbound = UdpSocket::bind("127.0.0.1:0")?;
        inbound.set_read_timeout(Some(Duration::from_millis(2)))?;
        outbound.set_read_timeout(Some(Duration::from_millis(50)))?;
        let _ = socket2::SockRef::from(&inbound).set_recv_buffer_size(8 << 20);
        let listen_addr = inbound.local_addr()?;
        let stats = Arc::new(RelayStats::default());
        let dark = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let capture: Arc<std::sync::Mutex<Option<Vec<Vec<u8>>>>> = Arc::default();
        let mut threads = Vec::new();
        {
            let (stats, dark, stop) = (stats.clone(), dark.clone(), stop.clone());
            let capture = capture.clone();
            let outbound = outbound.try_clone()?;
            threads.push(std::thread::spawn(move || {
                let mut link = SimLink::new(config.impairments, config.seed);
                let mut buf = vec![0u8; 65_536];
                while !stop.load(Ordering::Relaxed) {
                    let len = match inbound.recv(&mut buf) {
                        Ok(len) => len,
                        Err(_) => {
                            // Quiet moment: release what reordering held back.
                            for d in link.drain() {
                                let _ = outbound.send_to(&d, to);
                            }
                            continue;
                        }
                    };
                    stats.received.fetch_add(1, Ordering::Relaxed);
                    link.up = !dark.load(Ordering::Relaxed);
                    let dropped_before = link.dropped;
                    for d in link.transmit(&buf[..len]) {
                        if let Some(captured) = capture.lock().expect("not poisoned").as_mut() {
                            captured.push(d.to_vec());
                        }
                        if outbound.send_to(&d, to).is_ok() {
                            stats.forwarded.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    stats
                        .dropped
                        .fetch_add(link.dropped - dropped_before, Ordering::Relaxed);
                }
            }));
        }
        {
            let (stats, stop) = (stats.clone(), stop.clone());
            let outbound = outbound.try_clone()?;
            threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 65_536];
                while !stop.load(Ordering::Relaxed) {
                    if outbound.recv(&mut buf).is_ok() {
                        stats.backwards.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        Ok(Relay {
            listen_addr,
            stats,
            dark,
            stop,
            threads,
            capture,
            outbound,
            to,
        })
    }

    /// Starts recording every datagram forwarded (what a tap on the IT side would see).
    pub fn start_capture(&self) {
        *self.capture.lock().expect("not poisoned") = Some(Vec::new());
    }

    /// Stops recording and hands over what was recorded.
    pub fn take_capture(&self) -> Vec<Vec<u8>> {
        self.capture
            .lock()
            .expect("not poisoned")
            .take()
            .unwrap_or_default()
    }

    /// Sends `datagrams` to the receiver as they are, from the relay's own address: a replay.
    pub fn inject(&self, datagrams: &[Vec<u8>]) {
        for d in datagrams {
            let _ = self.outbound.send_to(d, self.to);
            // Paced a little, so the receiver's socket buffer is not what refuses them.
            std::thread::sleep(Duration::from_micros(20));
        }
    }

    /// The switch behind `set_dark`, for a task that schedules outages.
    pub fn dark_handle(&self) -> Arc<AtomicBool> {
        self.dark.clone()
    }

    /// Blackhole: while dark, nothing gets through.
    pub fn set_dark(&self, dark: bool) {
        self.dark.store(dark, Ordering::Relaxed);
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
