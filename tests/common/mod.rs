//! Starts the real `diode-send` and `diode-recv` binaries on loopback, with the impairing relay
//! between them, and reads what comes out.

#![allow(dead_code)]

pub mod peers;

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use diode_gateway::relay::{Relay, RelayConfig};
use diode_gateway::scrape;

/// A port free for both TCP and UDP, for a service to bind. Taken below the kernel's ephemeral
/// range (32768 and up by default): a port picked there by binding port 0 and letting it go can
/// be handed to any outgoing connection before the service binds it. Each test process gets its
/// own block, by pid, so that parallel tests and test binaries do not pick the same one.
pub fn free_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let block = 10_000 + (std::process::id() % 400) as u16 * 50;
    loop {
        let port = block + NEXT.fetch_add(1, Ordering::Relaxed) % 50;
        let tcp = TcpListener::bind(("127.0.0.1", port));
        let udp = UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
}

/// `127.0.0.1:port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Polls `check` until it holds or `timeout` passes; returns whether it held.
pub fn wait_for(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    check()
}

/// SIGTERM, then SIGKILL if `child` has not exited after `grace`.
pub fn terminate(child: &mut Child, grace: Duration) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The body of `GET path` from a service's metrics listener (`/status.json`, `/`).
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: diode\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, body)| body.to_owned())
}

/// A running service process, stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Service {
    pub child: Option<Child>,
    pub log: PathBuf,
    pub metrics: SocketAddr,
}

impl Service {
    pub fn start(binary: &str, config: &Path, log: PathBuf, metrics: SocketAddr) -> Service {
        let child = Command::new(binary)
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {binary}: {e}"));
        let service = Service {
            child: Some(child),
            log,
            metrics,
        };
        assert!(
            wait_for(Duration::from_secs(10), || scrape::fetch(metrics).is_ok()),
            "{binary} did not serve metrics; log:\n{}",
            service.log_text()
        );
        service
    }

    /// Writes `config` to `<name>.toml` in `dir` and starts `binary` with it, logging to
    /// `<name>.log` there; returns the service and its configuration's path.
    pub fn configure_and_start(
        binary: &str,
        dir: &Path,
        name: &str,
        config: &str,
        metrics: SocketAddr,
    ) -> (Service, PathBuf) {
        let toml = dir.join(format!("{name}.toml"));
        std::fs::write(&toml, config).unwrap();
        let service = Service::start(binary, &toml, dir.join(format!("{name}.log")), metrics);
        (service, toml)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn metrics_text(&self) -> String {
        scrape::fetch(self.metrics).unwrap_or_default()
    }

    pub fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        scrape::sum(&self.metrics_text(), name, labels)
    }

    /// A clean stop, as systemd would do it; waits for the process to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child, Duration::from_secs(15));
        }
    }

    /// A crash: no chance to send or write out anything.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sender, relay and receiver, configured from the TOML text given (with `{placeholders}`).
pub struct Pair {
    pub dir: tempfile::TempDir,
    pub sender: Service,
    pub receiver: Service,
    pub relay: Relay,
    pub link_port: u16,
    pub sender_toml: PathBuf,
    pub receiver_toml: PathBuf,
}

pub const SEND: &str = env!("CARGO_BIN_EXE_diode-send");
pub const RECV: &str = env!("CARGO_BIN_EXE_diode-recv");

/// A new link key in `dir/link.key`, made as a user makes one (`diode-send keygen`).
pub fn keygen(dir: &Path) -> PathBuf {
    let key = dir.join("link.key");
    let status = Command::new(SEND)
        .args(["keygen", "--out"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(status.success(), "keygen failed");
    key
}

impl Pair {
    /// `sender_topics` and `receiver_routes` are the `[[topic]]` and `[[route]]` tables.
    pub fn start(relay: RelayConfig, sender_topics: &str, receiver_routes: &str) -> Pair {
        Self::start_with(
            relay,
            sender_topics,
            receiver_routes,
            tempfile::tempdir().unwrap(),
            "",
            "",
        )
    }

    /// As `start`, in `dir`, with more `[link]` keys for each side.
    pub fn start_with(
        relay: RelayConfig,
        sender_topics: &str,
        receiver_routes: &str,
        dir: tempfile::TempDir,
        sender_link: &str,
        receiver_link: &str,
    ) -> Pair {
        let link_port = free_port();
        let receiver_metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let (receiver, receiver_toml) = Service::configure_and_start(
            RECV,
            dir.path(),
            "receiver",
            &format!(
                "[link]\nlisten = \"127.0.0.1:{link_port}\"\n{receiver_link}\n\n[metrics]\nlisten = \"{receiver_metrics}\"\n\n{receiver_routes}"
            ),
            receiver_metrics,
        );
        let relay = Relay::start(format!("127.0.0.1:{link_port}").parse().unwrap(), relay).unwrap();
        let sender_metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let (sender, sender_toml) = Service::configure_and_start(
            SEND,
            dir.path(),
            "sender",
            &format!(
                "[link]\ndestination = \"{}\"\nrate_mbps = 200\nheartbeat_interval_ms = 200\n{sender_link}\n\n[metrics]\nlisten = \"{sender_metrics}\"\n\n{sender_topics}",
                relay.listen_addr
            ),
            sender_metrics,
        );
        Pair {
            dir,
            sender,
            receiver,
            relay,
            link_port,
            sender_toml,
            receiver_toml,
        }
    }

    /// Until each of `sent` records is delivered or reported lost, and the file sink
    /// (`out/records.jsonl`) holds every record delivered.
    pub fn wait_accounted_for(&self, sent: u64) {
        let receiver = &self.receiver;
        let out = || receiver.metric("diode_records_out_total", &[]);
        assert!(
            wait_for(Duration::from_secs(20), || out()
                + receiver.metric("diode_records_lost_total", &[])
                >= sent as f64),
            "{} delivered and {} reported lost of {sent}; log:\n{}",
            out(),
            receiver.metric("diode_records_lost_total", &[]),
            receiver.log_text()
        );
        let file = self.path("out/records.jsonl");
        assert!(wait_for(Duration::from_secs(5), || line_count(&file)
            as f64
            >= out()));
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn restart_sender(&mut self, crash: bool) {
        if crash {
            self.sender.kill();
        } else {
            self.sender.stop();
        }
        let metrics = self.sender.metrics;
        self.sender = Service::start(SEND, &self.sender_toml, self.path("sender2.log"), metrics);
    }

    pub fn restart_receiver(&mut self, crash: bool) {
        self.stop_receiver(crash);
        self.start_receiver();
    }

    /// Stops the receiver (SIGTERM, or SIGKILL for a crash); `start_receiver` brings it back.
    pub fn stop_receiver(&mut self, crash: bool) {
        if crash {
            self.receiver.kill();
        } else {
            self.receiver.stop();
        }
    }

    pub fn start_receiver(&mut self) {
        let metrics = self.receiver.metrics;
        self.receiver = Service::start(
            RECV,
            &self.receiver_toml,
            self.path("receiver2.log"),
            metrics,
        );
    }

    /// Whatever else a test checks: the receiver never sent a datagram back towards the link.
    pub fn assert_one_way(&self) {
        assert_eq!(
            self.relay
                .stats
                .backwards
                .load(std::sync::atomic::Ordering::Relaxed),
            0,
            "the receiver sent datagrams towards the link"
        );
    }
}

/// Records the receiver's log reports lost beyond repair (`records lost beyond repair ...
/// records=N`), of `topic` only when given.
pub fn records_lost_in_log(log: &str, topic: Option<&str>) -> usize {
    log.lines()
        .filter(|l| l.contains("records lost beyond repair"))
        .filter(|l| topic.is_none_or(|t| l.contains(&format!("topic={t} "))))
        .filter_map(|l| {
            l.split("records=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum()
}

/// A file sink's JSON lines per topic: (seq, payload) in file order, each record's time checked
/// to be RFC 3339.
pub fn by_topic(
    lines: &[serde_json::Value],
) -> std::collections::BTreeMap<String, Vec<(u64, String)>> {
    let mut out: std::collections::BTreeMap<String, Vec<(u64, String)>> = Default::default();
    for line in lines {
        let time = line["time"].as_str().expect("time");
        assert!(
            time.len() == 27 && time.ends_with('Z') && &time[10..11] == "T",
            "not RFC 3339: {time}"
        );
        out.entry(line["topic"].as_str().unwrap().to_owned())
            .or_default()
            .push((
                line["seq"].as_u64().unwrap(),
                line["payload"].as_str().unwrap().to_owned(),
            ));
    }
    out
}

/// The JSON lines of a file sink, parsed.
pub fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // A line still being written is not read yet.
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

pub fn line_count(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// Sends UDP datagrams with a short pause every `burst` so the source's socket keeps up.
pub fn send_udp(to: SocketAddr, payloads: impl IntoIterator<Item = Vec<u8>>, burst: usize) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    for (i, payload) in payloads.into_iter().enumerate() {
        socket.send_to(&payload, to).unwrap();
        if i % burst == burst - 1 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}
