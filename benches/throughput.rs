//! The throughput harness: starts the real `diode-send` and `diode-recv` on loopback and drives
//! the workloads of docs/performance.md, printing what they achieved. Figures, not assertions:
//! timings on a shared 2-core machine are noisy, so targets are judged by reading them.
//!
//! ```sh
//! cargo bench --bench throughput                    # all workloads
//! cargo bench --bench throughput -- bulk small      # some of them
//! DIODE_BENCH_BULK_MIB=512 cargo bench --bench throughput -- bulk
//! ```
//!
//! Knobs: `DIODE_BENCH_BULK_MIB` (2048), `DIODE_BENCH_BULK_MBPS` (the bulk sender's ceiling,
//! 100000: unpaced), `DIODE_BENCH_SMALL_SECS` (20), `DIODE_BENCH_RCVBUF_BYTES` (the receiver's
//! `receive_buffer_bytes`, 134217728; the kernel caps it at net.core.rmem_max),
//! `DIODE_BENCH_FLUSH_MS` (the sender's `flush_interval_ms`, 5), `DIODE_BENCH_MTU` (the
//! sender's `mtu_bytes`, 1500; 9000 for jumbo frames), `DIODE_BENCH_KEY` (2: encrypted too; 1: an
//! authenticated link), `DIODE_BENCH_BUFFER` (1: the route has a disk buffer), `DIODE_BENCH_SINK_MBPS` (the bulk
//! sink reads no faster than this, in Mb/s; 0, the default: as fast as it can),
//! `DIODE_BENCH_DESIGN_LOSS` (the sender's `design_loss_percent`, 1; 0: proportional parity),
//! `DIODE_BENCH_SMALL_RATE` (records a second in `small`, 50000), `DIODE_BENCH_OUTAGE_MS` (the
//! sender's `outage_protection_ms`, 0), `DIODE_BENCH_JOURNAL` (1: the sender journals the topic,
//! docs/backfill.md).
//!
//! Workloads: `bulk` (2 GiB raw TCP -> link -> raw TCP, unpaced), `buffered` (the same bulk
//! without a disk buffer, then with one, and the page-cache write speed of the buffer's file
//! system: the ratios and the records dropped), `small` (100-byte records into
//! the UDP source at 50,000/s for 20 s, UDP sink out), `pacing` (rate_mbps = 1000, more offered:
//! the wire rate over 10 s and its worst 10 ms window), `paced1g` (the pair at 1 Gb/s for 10 s:
//! CPU per side), `hostile` (genuine telemetry while a mixed flood of forged datagrams hits the
//! receiver's port as fast as this host sends them, without and with a link key: genuine records
//! delivered, the receiver's CPU and peak RSS), `files` (one `DIODE_BENCH_FILE_MIB` file, 1024,
//! through a files source and sink, then the same bytes as `bulk`: the ratio and each side's RSS),
//! `opcua` (an OPC UA plant server in this process, 10,000 items changing once a second, then
//! 1,000 items 100 times a second, through an opcua source and an opcua_server mirror to an OPC
//! UA client here: changes delivered, latency from source timestamp to the client, CPU and RSS;
//! `DIODE_BENCH_OPCUA_SECS`, 20; `DIODE_BENCH_OPCUA_LOGS=1` prints the services' warnings).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diode_gateway::scrape;
use diode_wire::sim::SimRng;

const SEND: &str = env!("CARGO_BIN_EXE_diode-send");
const RECV: &str = env!("CARGO_BIN_EXE_diode-recv");

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wanted = |name: &str| args.is_empty() || args.iter().any(|a| a == name);
    println!(
        "diode throughput harness: both services on loopback, MTU 1500, 32 data + 8 parity shards"
    );
    match std::fs::read_to_string("/proc/sys/net/core/rmem_max") {
        Ok(v) if v.trim().parse::<u64>().unwrap_or(0) < 128 << 20 => println!(
            "note: net.core.rmem_max is {} bytes; the receiver asks for 128 MiB (see deploy/sysctl.d)",
            v.trim()
        ),
        _ => {}
    }
    if wanted("bulk") {
        bulk();
    }
    if wanted("buffered") {
        buffered();
    }
    if wanted("lanes") {
        lanes();
    }
    if wanted("small") {
        small_records();
    }
    if wanted("pacing") {
        pacing();
    }
    if wanted("paced1g") {
        paced_pair();
    }
    if wanted("hostile") {
        hostile();
    }
    if wanted("files") {
        files();
    }
    if wanted("opcua") {
        opcua_bench::run();
    }
}

mod opcua_bench;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A port free for TCP and UDP, below the kernel's ephemeral range so that no outgoing connection
/// takes it between the pick and the service's bind.
fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let block = 10_000 + (std::process::id() % 400) as u16 * 50;
    loop {
        let port = block + NEXT.fetch_add(1, Ordering::Relaxed) % 50;
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
}

/// A service process and what it cost.
struct Service {
    child: Child,
    metrics: SocketAddr,
    cpu_start: f64,
}

impl Service {
    fn start(binary: &str, config: &Path, metrics: SocketAddr) -> Service {
        let log = config.with_extension("log");
        let child = Command::new(binary)
            .arg("--config")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while scrape::fetch(metrics).is_err() {
            assert!(
                Instant::now() < deadline,
                "{binary} did not start: see {}",
                log.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut service = Service {
            child,
            metrics,
            cpu_start: 0.0,
        };
        service.cpu_start = service.cpu_seconds();
        service
    }

    fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, r)| r)
            .split_whitespace()
            .collect();
        let ticks: f64 = fields
            .get(11)
            .and_then(|u| u.parse::<f64>().ok())
            .unwrap_or(0.0)
            + fields
                .get(12)
                .and_then(|s| s.parse::<f64>().ok())
                .unwrap_or(0.0);
        ticks / 100.0
    }

    fn cpu_used(&self) -> f64 {
        self.cpu_seconds() - self.cpu_start
    }

    fn peak_rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    }

    fn metric(&self, name: &str) -> f64 {
        scrape::sum(&scrape::fetch(self.metrics).unwrap_or_default(), name, &[])
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Pair {
    _dir: tempfile::TempDir,
    /// The receiver's link port.
    link: u16,
    sender: Service,
    receiver: Service,
    drops_start: u64,
}

impl Pair {
    /// `destination`: where the sender sends (the receiver's port when `None`).
    fn start(rate_mbps: u32, source: &str, sink: &str, destination: Option<SocketAddr>) -> Pair {
        // DIODE_BENCH_BUFFER=1 gives the route a disk buffer.
        Pair::start_buffered(
            rate_mbps,
            source,
            sink,
            destination,
            env_or("DIODE_BENCH_BUFFER", 0) == 1,
        )
    }

    /// As `start`, the route with a disk buffer or without.
    fn start_buffered(
        rate_mbps: u32,
        source: &str,
        sink: &str,
        destination: Option<SocketAddr>,
        buffered: bool,
    ) -> Pair {
        let buffer_line = if buffered {
            "buffer_dir = \"buffer\"\nbuffer_max_bytes = 4294967296\n"
        } else {
            ""
        };
        Pair::start_tables(
            rate_mbps,
            &format!("[[topic]]\nname = \"bench\"\nsource = {source}\n"),
            &format!("[[route]]\ntopics = [\"#\"]\nsink = {sink}\n{buffer_line}"),
            destination,
        )
    }

    /// As `start`, with the `[[topic]]` and `[[route]]` tables given whole.
    fn start_tables(
        rate_mbps: u32,
        topics: &str,
        routes: &str,
        destination: Option<SocketAddr>,
    ) -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let link = free_port();
        // With DIODE_BENCH_KEY=1 both sides authenticate every datagram.
        // DIODE_BENCH_KEY=2 encrypts the blocks as well.
        let key_line = match env_or("DIODE_BENCH_KEY", 0) {
            0 => "",
            mode => {
                diode_common::keyfile::generate(&dir.path().join("link.key")).unwrap();
                if mode == 2 {
                    "key_file = \"link.key\"\nencrypt = true\n"
                } else {
                    "key_file = \"link.key\"\n"
                }
            }
        };
        // DIODE_BENCH_JOURNAL=1 journals every record the sender sends.
        let journal_table = if env_or("DIODE_BENCH_JOURNAL", 0) == 1 {
            "[journal]\ndir = \"journal\"\nmax_bytes = 4294967296\n"
        } else {
            ""
        };
        let (rm, sm) = (free_port(), free_port());
        let receiver_toml = dir.path().join("receiver.toml");
        std::fs::write(
            &receiver_toml,
            format!("[link]\nlisten = \"127.0.0.1:{link}\"\n{key_line}receive_buffer_bytes = {}\n[metrics]\nlisten = \"127.0.0.1:{rm}\"\n{routes}", env_or("DIODE_BENCH_RCVBUF_BYTES", 128 << 20)),
        )
        .unwrap();
        let receiver = Service::start(
            RECV,
            &receiver_toml,
            format!("127.0.0.1:{rm}").parse().unwrap(),
        );
        let destination = destination.unwrap_or(format!("127.0.0.1:{link}").parse().unwrap());
        let sender_toml = dir.path().join("sender.toml");
        std::fs::write(
            &sender_toml,
            format!("[link]\ndestination = \"{destination}\"\n{key_line}rate_mbps = {rate_mbps}\nmtu_bytes = {}\nflush_interval_ms = {}\ndesign_loss_percent = {}\noutage_protection_ms = {}\n[metrics]\nlisten = \"127.0.0.1:{sm}\"\n{journal_table}{topics}", env_or("DIODE_BENCH_MTU", 1500), env_or("DIODE_BENCH_FLUSH_MS", 5), std::env::var("DIODE_BENCH_DESIGN_LOSS").unwrap_or_else(|_| "1".into()), env_or("DIODE_BENCH_OUTAGE_MS", 0)),
        )
        .unwrap();
        let sender = Service::start(
            SEND,
            &sender_toml,
            format!("127.0.0.1:{sm}").parse().unwrap(),
        );
        Pair {
            _dir: dir,
            link,
            sender,
            receiver,
            drops_start: diode_common::net::udp_rcvbuf_errors().unwrap_or(0),
        }
    }

    fn kernel_drops(&self) -> u64 {
        diode_common::net::udp_rcvbuf_errors().unwrap_or(0) - self.drops_start
    }

    fn report_costs(&self, gigabytes: f64, seconds: f64) {
        if env_or("DIODE_BENCH_JOURNAL", 0) == 1 {
            println!(
                "  journal: {} records written, {} not journaled (writer behind), {} MiB on disk",
                self.sender.metric("diode_journal_records_total"),
                self.sender.metric("diode_journal_records_dropped_total"),
                self.sender.metric("diode_journal_bytes") / (1 << 20) as f64
            );
        }
        for (side, s) in [("sender", &self.sender), ("receiver", &self.receiver)] {
            println!(
                "  {side:<9} {:>6.2} CPU s/GB  {:>5.1} % of a core  peak RSS {:>6.1} MiB",
                s.cpu_used() / gigabytes,
                100.0 * s.cpu_used() / seconds,
                s.peak_rss_mib()
            );
        }
        println!("  kernel drops (RcvbufErrors)  {}", self.kernel_drops());
    }
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = SimRng::new(seed);
    let mut data = Vec::with_capacity(len + 8);
    while data.len() < len {
        data.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    data.truncate(len);
    data
}

/// The `p` quantile of sorted values (0 when there are none).
fn percentile(sorted: &[u64], p: f64) -> u64 {
    let at = ((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1));
    sorted.get(at).copied().unwrap_or(0)
}

/// A file of `mib` MiB of random bytes, written 8 MiB at a time and synced.
fn write_random_file(path: &Path, mib: usize, seed: u64) {
    let mut file = std::fs::File::create(path).unwrap();
    for piece in 0..mib.div_ceil(8) {
        let len = (8usize << 20).min((mib << 20) - piece * (8 << 20));
        file.write_all(&random_bytes(len, seed + piece as u64))
            .unwrap();
    }
    file.sync_all().unwrap();
}

/// Offers a TCP source more than any link takes, until the flag is set.
fn flood_tcp(port: u16, seed: u64) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let handle = std::thread::spawn(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let chunk = random_bytes(1 << 20, seed);
        while !flag.load(Ordering::Relaxed) {
            if s.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    (stop, handle)
}

fn bulk() {
    bulk_of(env_or("DIODE_BENCH_BULK_MIB", 2048) as usize);
}

/// Runs `bulk` with `mib` MiB; returns the goodput in MB/s.
fn bulk_of(mib: usize) -> f64 {
    bulk_run(mib, env_or("DIODE_BENCH_BUFFER", 0) == 1).0
}

/// The same bulk through an unbuffered route, then through a buffered one, with the speed at
/// which one thread writes the buffer's file system between them (issue #17: the buffered route
/// at 0.8 of the unbuffered one or at that speed, whichever is lower, and nothing dropped).
fn buffered() {
    let mib = env_or("DIODE_BENCH_BULK_MIB", 2048) as usize;
    let (plain, _) = bulk_run(mib, false);
    let disk = page_cache_write_mb_s(1024);
    let (buffered, dropped) = bulk_run(mib, true);
    println!(
        "\nbuffered route: {buffered:.1} MB/s against {plain:.1} MB/s unbuffered ({:.2} x) and \
         {disk:.1} MB/s written by one thread to its file system ({:.2} x); {dropped} records \
         dropped",
        buffered / plain,
        buffered / disk
    );
}

/// How fast one thread writes `mib` MiB in 1 MiB pieces to a new file in the temporary
/// directory the buffer's is made in, unsynced, as the buffer writes its segments.
fn page_cache_write_mb_s(mib: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let chunk = random_bytes(1 << 20, 7);
    let mut file = std::fs::File::create(dir.path().join("write-speed")).unwrap();
    let start = Instant::now();
    for _ in 0..mib {
        file.write_all(&chunk).unwrap();
    }
    (mib << 20) as f64 / start.elapsed().as_secs_f64() / 1e6
}

/// Runs `bulk` with `mib` MiB through a route with a disk buffer or without; returns the
/// goodput in MB/s and the records dropped at the route.
fn bulk_run(mib: usize, buffered: bool) -> (f64, u64) {
    let data = Arc::new(random_bytes(mib << 20, 1));
    let sink = TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp_in = free_port();
    let rate = env_or("DIODE_BENCH_BULK_MBPS", 100_000) as u32;
    let pair = Pair::start_buffered(
        rate,
        &format!("{{ kind = \"tcp\", listen = \"127.0.0.1:{tcp_in}\", framing = \"raw\" }}"),
        &format!(
            "{{ kind = \"tcp\", connect = \"{}\", framing = \"raw\" }}",
            sink.local_addr().unwrap()
        ),
        None,
        buffered,
    );
    let start = Instant::now();
    // DIODE_BENCH_SINK_MBPS: the sink reads no faster than this (0: as fast as it can), so that
    // a buffered route has to keep what the sink has not taken.
    let sink_mbps = env_or("DIODE_BENCH_SINK_MBPS", 0) as f64;
    let (got, identical, last_byte) = stream_through(&data, tcp_in, &sink, start, sink_mbps);
    // First byte in to last byte out; a stream cut short by loss waits for nothing more.
    let seconds = (last_byte - start).as_secs_f64();
    let wire = pair.sender.metric("diode_link_bytes_sent_total");
    println!(
        "\nbulk: {mib} MiB of random bytes, raw TCP -> link -> raw TCP{}, rate_mbps = {rate}, MTU {}",
        if buffered { " behind a disk buffer" } else { "" },
        env_or("DIODE_BENCH_MTU", 1500)
    );
    println!(
        "  goodput {:>8.1} MB/s   {} of {} bytes, {}",
        got as f64 / seconds / 1e6,
        got,
        data.len(),
        if identical && got == data.len() {
            "identical"
        } else {
            "DIFFERENT"
        }
    );
    println!("  wire overhead {:.3} x payload", wire / data.len() as f64);
    println!(
        "  blocks repaired {}  lost {}; records lost {}; records dropped at a full sink queue {}",
        pair.receiver.metric("diode_blocks_recovered_total"),
        pair.receiver.metric("diode_blocks_lost_total"),
        pair.receiver.metric("diode_records_lost_total"),
        pair.receiver.metric("diode_sink_dropped_total")
    );
    pair.report_costs(data.len() as f64 / 1e9, seconds);
    let dropped = pair.receiver.metric("diode_sink_dropped_total") as u64;
    (got as f64 / seconds / 1e6, dropped)
}

/// Writes `data` into a raw TCP source on `source_port` while reading what the link delivers from
/// the route's TCP sink (`sink`), compared as it comes (a reader that kept it would be too slow
/// for the route), no faster than `sink_mbps` (0: as fast as it can). Returns the bytes that
/// came, whether they were `data`'s, and when the last came; a stream cut short by loss ends
/// after 10 s without a byte.
fn stream_through(
    data: &Arc<Vec<u8>>,
    source_port: u16,
    sink: &TcpListener,
    start: Instant,
    sink_mbps: f64,
) -> (usize, bool, Instant) {
    let writer = {
        let data = data.clone();
        std::thread::spawn(move || {
            let mut s = TcpStream::connect(("127.0.0.1", source_port)).unwrap();
            s.write_all(&data).unwrap();
        })
    };
    let (mut conn, _) = sink.accept().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (mut got, mut identical, mut last_byte) = (0usize, true, start);
    let mut buf = vec![0u8; 1 << 20];
    while got < data.len() {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let end = (got + n).min(data.len());
                identical &= buf[..end - got] == data[got..end];
                got += n;
                last_byte = Instant::now();
                if sink_mbps > 0.0 {
                    let due = Duration::from_secs_f64(got as f64 * 8.0 / (sink_mbps * 1e6));
                    if let Some(ahead) = due.checked_sub(start.elapsed()) {
                        std::thread::sleep(ahead);
                    }
                }
            }
        }
    }
    let _ = writer.join();
    (got, identical, last_byte)
}

/// Two bulk topics, one lane for both and then a lane each, alternately (issue #17 item 4).
/// This machine has two cores for both services and the harness, so two lanes cannot show
/// scaling here; what they show is that lanes work at full speed and what a lane costs.
fn lanes() {
    let mib = env_or("DIODE_BENCH_BULK_MIB", 2048) as usize / 2;
    let runs = env_or("DIODE_BENCH_LANES_RUNS", 2);
    let mut ratios = Vec::new();
    for run in 0..runs {
        let one = lanes_run(mib, 1);
        let two = lanes_run(mib, 2);
        println!("  run {run}: two lanes / one lane = {:.2}", two / one);
        ratios.push(two / one);
    }
    println!("\nlanes: two lanes carried {ratios:.2?} times what one did, in the same runs");
}

/// Two topics of `mib` MiB each, raw TCP in and out, on `lanes` lanes (topic i on lane
/// i % lanes); returns the goodput of both together in MB/s.
fn lanes_run(mib: usize, lanes: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = (0..lanes).map(|_| free_port()).collect();
    let (rm, sm) = (free_port(), free_port());
    let sinks: Vec<TcpListener> = (0..2)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let sources: Vec<u16> = (0..2).map(|_| free_port()).collect();
    let lane_tables = |key: &str| -> String {
        ports[1..]
            .iter()
            .map(|p| format!("[[link.lane]]\n{key} = \"127.0.0.1:{p}\"\n"))
            .collect()
    };
    let mut routes = String::new();
    let mut topics = String::new();
    for (i, (sink, source)) in sinks.iter().zip(&sources).enumerate() {
        routes += &format!(
            "[[route]]\ntopics = [\"bulk{i}\"]\nsink = {{ kind = \"tcp\", connect = \"{}\", framing = \"raw\" }}\n",
            sink.local_addr().unwrap()
        );
        topics += &format!(
            "[[topic]]\nname = \"bulk{i}\"\nlane = {}\nsource = {{ kind = \"tcp\", listen = \"127.0.0.1:{source}\", framing = \"raw\" }}\n",
            i % lanes
        );
    }
    let start_service = |binary: &str, name: &str, text: String, metrics: u16| {
        let toml = dir.path().join(name);
        std::fs::write(&toml, text).unwrap();
        Service::start(
            binary,
            &toml,
            format!("127.0.0.1:{metrics}").parse().unwrap(),
        )
    };
    let receiver = start_service(
        RECV,
        "receiver.toml",
        format!(
            "[link]\nlisten = \"127.0.0.1:{}\"\n{}[metrics]\nlisten = \"127.0.0.1:{rm}\"\n{routes}",
            ports[0],
            lane_tables("listen")
        ),
        rm,
    );
    let sender = start_service(
        SEND,
        "sender.toml",
        format!(
            "[link]\ndestination = \"127.0.0.1:{}\"\nrate_mbps = 100000\n{}[metrics]\nlisten = \"127.0.0.1:{sm}\"\n{topics}",
            ports[0],
            lane_tables("destination")
        ),
        sm,
    );
    let data: Vec<Arc<Vec<u8>>> = (0..2)
        .map(|i| Arc::new(random_bytes(mib << 20, 10 + i)))
        .collect();
    let drops_start = diode_common::net::udp_rcvbuf_errors().unwrap_or(0);
    let start = Instant::now();
    let streams: Vec<_> = sinks
        .into_iter()
        .zip(sources)
        .zip(data)
        .map(|((sink, source), data)| {
            std::thread::spawn(move || {
                let (got, identical, last_byte) = stream_through(&data, source, &sink, start, 0.0);
                (identical && got == data.len(), got, last_byte)
            })
        })
        .collect();
    let results: Vec<_> = streams.into_iter().map(|s| s.join().unwrap()).collect();
    let last = results.iter().map(|r| r.2).max().unwrap();
    let seconds = (last - start).as_secs_f64();
    let bytes: usize = results.iter().map(|r| r.1).sum();
    let identical = results.iter().all(|r| r.0);
    let goodput = bytes as f64 / seconds / 1e6;
    println!(
        "\nlanes: 2 topics of {mib} MiB on {lanes} lane{}: {goodput:.1} MB/s, {}",
        if lanes == 1 { "" } else { "s" },
        if identical { "identical" } else { "DIFFERENT" }
    );
    let gigabytes = bytes as f64 / 1e9;
    for (side, s) in [("sender", &sender), ("receiver", &receiver)] {
        println!(
            "  {side:<9} {:>6.2} CPU s/GB  {:>5.1} % of a core  peak RSS {:>6.1} MiB",
            s.cpu_used() / gigabytes,
            100.0 * s.cpu_used() / seconds,
            s.peak_rss_mib()
        );
    }
    println!(
        "  kernel drops (RcvbufErrors) {}; blocks lost {}; records dropped at a full sink queue {}",
        diode_common::net::udp_rcvbuf_errors().unwrap_or(0) - drops_start,
        receiver.metric("diode_blocks_lost_total"),
        receiver.metric("diode_sink_dropped_total")
    );
    goodput
}

/// One large file through a files source and a files sink, unpaced, then the same number of
/// bytes as raw bulk TCP in the same run: the ratio, and each side's peak RSS whatever the size.
fn files() {
    let mib = env_or("DIODE_BENCH_FILE_MIB", 1024) as usize;
    let dir = tempfile::tempdir().unwrap();
    let (plant, mirror) = (dir.path().join("plant"), dir.path().join("mirror"));
    std::fs::create_dir_all(&plant).unwrap();
    let path = plant.join("historian-export.dat");
    write_random_file(&path, mib, 100);
    let pair = Pair::start(
        100_000,
        &format!(
            "{{ kind = \"files\", dir = \"{}\", state_file = \"{}\", stable_ms = 100, passes = 3, pass_interval_ms = 1000 }}",
            plant.display(),
            dir.path().join("files.state").display()
        ),
        &format!("{{ kind = \"files\", dir = \"{}\" }}", mirror.display()),
        None,
    );
    let deadline = Instant::now() + Duration::from_secs(1200);
    while pair.sender.metric("diode_file_bytes_sent_total") == 0.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let start = Instant::now();
    while pair.receiver.metric("diode_files_received_total") < 1.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let seconds = start.elapsed().as_secs_f64();
    let identical = Command::new("cmp")
        .arg("-s")
        .arg(&path)
        .arg(mirror.join("historian-export.dat"))
        .status()
        .is_ok_and(|s| s.success());
    let bytes = (mib << 20) as f64;
    let goodput = bytes / seconds / 1e6;
    println!("\nfiles: one {mib} MiB file, files source -> link -> files sink (SHA-256 verified, fsync), unpaced, until it is whole");
    println!(
        "  goodput {goodput:>8.1} MB/s   {}",
        if identical { "identical" } else { "DIFFERENT" }
    );
    println!(
        "  passes sent {} ({} MiB), incomplete at the receiver {}; records lost on the link {}, dropped at the sink's full queue {}",
        pair.sender.metric("diode_file_passes_total"),
        pair.sender.metric("diode_file_bytes_sent_total") / (1 << 20) as f64,
        pair.receiver.metric("diode_file_passes_incomplete_total"),
        pair.receiver.metric("diode_records_lost_total"),
        pair.receiver.metric("diode_sink_dropped_total")
    );
    pair.report_costs(bytes / 1e9, seconds);
    drop(pair);
    drop(dir);
    let tcp = bulk_of(mib);
    println!(
        "\nfiles vs bulk TCP, same run, same size: {goodput:.1} / {tcp:.1} MB/s = {:.2}",
        goodput / tcp
    );
    files_beside_telemetry(mib, None);
    files_beside_telemetry(128, Some(200));
}

/// A plant's telemetry (1,000 records of 100 bytes a second on a UDP topic) alone, then while
/// a `mib` MiB file streams on a files topic of the same link (unpaced, or under the topic's
/// own `rate_mbps`): each record's latency from the UDP source to the UDP sink, in one run.
fn files_beside_telemetry(mib: usize, files_rate_mbps: Option<u32>) {
    let dir = tempfile::tempdir().unwrap();
    let (plant, mirror) = (dir.path().join("plant"), dir.path().join("mirror"));
    std::fs::create_dir_all(&plant).unwrap();
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    sink.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let udp_in = free_port();
    let topics = format!(
        "[[topic]]\nname = \"line3/telemetry\"\nsource = {{ kind = \"udp\", listen = \"127.0.0.1:{udp_in}\" }}\n\
         [[topic]]\nname = \"exports\"\n{}source = {{ kind = \"files\", dir = \"{}\", state_file = \"{}\", stable_ms = 100, passes = 1 }}\n",
        files_rate_mbps.map_or(String::new(), |r| format!("rate_mbps = {r}\n")),
        plant.display(),
        dir.path().join("files.state").display()
    );
    let routes = format!(
        "[[route]]\ntopics = [\"line3/#\"]\nsink = {{ kind = \"udp\", target = \"{}\" }}\n\
         [[route]]\ntopics = [\"exports\"]\nsink = {{ kind = \"files\", dir = \"{}\" }}\n",
        sink.local_addr().unwrap(),
        mirror.display()
    );
    let pair = Pair::start_tables(100_000, &topics, &routes, None);
    let epoch = Instant::now();
    let measure = |seconds: u64| -> Vec<u64> {
        let per_sec = 1000u64;
        let generator = std::thread::spawn(move || {
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            let mut record = [b'.'; 100];
            let started = Instant::now();
            for seq in 0..per_sec * seconds {
                let due = started + Duration::from_micros(seq * 1_000_000 / per_sec);
                if let Some(pause) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(pause);
                }
                record[..8].copy_from_slice(&(epoch.elapsed().as_nanos() as u64).to_le_bytes());
                let _ = socket.send_to(&record, ("127.0.0.1", udp_in));
            }
        });
        let mut latencies_us = Vec::new();
        let mut buf = [0u8; 2048];
        let until = Instant::now() + Duration::from_secs(seconds + 2);
        while Instant::now() < until && (latencies_us.len() as u64) < per_sec * seconds {
            if let Ok(n) = sink.recv(&mut buf) {
                if n >= 8 {
                    let sent = u64::from_le_bytes(buf[..8].try_into().unwrap());
                    let now = epoch.elapsed().as_nanos() as u64;
                    latencies_us.push(now.saturating_sub(sent) / 1000);
                }
            }
        }
        generator.join().unwrap();
        latencies_us.sort_unstable();
        latencies_us
    };
    let report = |what: &str, latencies_us: &[u64], expected: u64| {
        let pct = |p: f64| percentile(latencies_us, p) as f64 / 1000.0;
        println!(
            "  {what:<28} {} of {expected} delivered, latency p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
            latencies_us.len(),
            pct(0.5),
            pct(0.99),
            latencies_us.last().copied().unwrap_or(0) as f64 / 1000.0
        );
    };
    println!(
        "\ntelemetry beside files ({}): 1,000 records of 100 bytes a second (UDP in, UDP out), flush 5 ms",
        files_rate_mbps.map_or("files unpaced".into(), |r| format!("files topic rate_mbps = {r}"))
    );
    let alone = measure(5);
    report("alone", &alone, 5000);
    // The export lands in the watched folder; the telemetry goes on while it streams.
    write_random_file(&plant.join("historian-export.dat"), mib, 300);
    let started = Instant::now();
    let beside = measure(5);
    let received_within = pair.receiver.metric("diode_files_received_total");
    let sent_during = pair.sender.metric("diode_file_bytes_sent_total") / (1 << 20) as f64;
    report("while the file streams", &beside, 5000);
    let deadline = Instant::now() + Duration::from_secs(600);
    while pair.receiver.metric("diode_files_received_total") < 1.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "  the file: {mib} MiB, {sent_during:.0} MiB of it sent during those 5 s, whole after {:.1} s{}",
        started.elapsed().as_secs_f64(),
        if received_within >= 1.0 {
            " (within them)"
        } else {
            ""
        }
    );
}

fn small_records() {
    let per_sec: u64 = env_or("DIODE_BENCH_SMALL_RATE", 50_000);
    let seconds: u64 = std::env::var("DIODE_BENCH_SMALL_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    let _ = socket2::SockRef::from(&sink).set_recv_buffer_size(16 << 20);
    let udp_in = free_port();
    let pair = Pair::start(
        1000,
        &format!("{{ kind = \"udp\", listen = \"127.0.0.1:{udp_in}\" }}"),
        &format!(
            "{{ kind = \"udp\", target = \"{}\" }}",
            sink.local_addr().unwrap()
        ),
        None,
    );
    let epoch = Instant::now();
    let total = per_sec * seconds;
    let generator = std::thread::spawn(move || {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut record = [b'.'; 100];
        let started = Instant::now();
        // Keep to the schedule a tenth of a millisecond at a time, sleeping between: a spinning
        // generator would take a core from the services it measures, and coarser bursts would
        // line up with the flush deadline and lengthen every record's wait.
        let per_tick = (per_sec / 10_000).max(1);
        for seq in 0..total {
            if seq % per_tick == 0 {
                let due = started + Duration::from_micros(seq / per_tick * 100);
                if let Some(pause) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(pause);
                }
            }
            record[..8].copy_from_slice(&seq.to_le_bytes());
            record[8..16].copy_from_slice(&(epoch.elapsed().as_nanos() as u64).to_le_bytes());
            let _ = socket.send_to(&record, ("127.0.0.1", udp_in));
        }
    });
    let mut seen = vec![false; total as usize];
    let mut latencies_us = Vec::with_capacity(total as usize);
    // Read as the services do (recvmmsg + GRO), so that reading a burst one datagram at a time
    // does not add its own delay to the records at the end of it.
    let gro = quinn_udp::UdpSocketState::new((&sink).into()).unwrap();
    let mut buffers = vec![vec![0u8; 64 * 1024]; quinn_udp::BATCH_SIZE];
    let mut metas = vec![quinn_udp::RecvMeta::default(); quinn_udp::BATCH_SIZE];
    let mut idle_since = Instant::now();
    while (latencies_us.len() as u64) < total && idle_since.elapsed() < Duration::from_secs(3) {
        let mut slices: Vec<std::io::IoSliceMut<'_>> = buffers
            .iter_mut()
            .map(|b| std::io::IoSliceMut::new(b))
            .collect();
        let count = match gro.recv((&sink).into(), &mut slices, &mut metas) {
            Ok(count) => count,
            Err(_) => {
                std::thread::sleep(Duration::from_micros(20));
                continue;
            }
        };
        idle_since = Instant::now();
        let now_ns = epoch.elapsed().as_nanos() as u64;
        for (meta, buffer) in metas.iter().zip(&buffers).take(count) {
            for record in buffer[..meta.len].chunks(meta.stride.max(1)) {
                if record.len() < 16 {
                    continue;
                }
                let seq = u64::from_le_bytes(record[..8].try_into().unwrap());
                let sent = u64::from_le_bytes(record[8..16].try_into().unwrap());
                if let Some(slot) = seen.get_mut(seq as usize) {
                    *slot = true;
                }
                latencies_us.push(now_ns.saturating_sub(sent) / 1000);
            }
        }
    }
    generator.join().unwrap();
    let delivered = seen.iter().filter(|s| **s).count();
    latencies_us.sort_unstable();
    let pct = |p: f64| percentile(&latencies_us, p);
    let wire = pair.sender.metric("diode_link_bytes_sent_total");
    println!(
        "\nsmall: 100-byte records into the UDP source at {per_sec}/s for {seconds} s, UDP sink out, flush {} ms",
        env_or("DIODE_BENCH_FLUSH_MS", 5)
    );
    println!("  delivered {delivered} of {total}");
    println!(
        "  wire overhead {:.3} x payload (parity, headers, IP/UDP included)",
        wire / (total as f64 * 100.0)
    );
    println!(
        "  latency p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        pct(0.50) as f64 / 1000.0,
        pct(0.99) as f64 / 1000.0,
        latencies_us.last().copied().unwrap_or(0) as f64 / 1000.0
    );
    pair.report_costs(total as f64 * 100.0 / 1e9, seconds as f64);
}

/// Offers more than the ceiling for 11 s and watches what leaves the sender.
fn pacing() {
    let watch = UdpSocket::bind("127.0.0.1:0").unwrap();
    let _ = socket2::SockRef::from(&watch).set_recv_buffer_size(32 << 20);
    watch
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let tcp_in = free_port();
    let pair = Pair::start(
        1000,
        &format!("{{ kind = \"tcp\", listen = \"127.0.0.1:{tcp_in}\", framing = \"raw\" }}"),
        "{ kind = \"stdout\" }",
        Some(watch.local_addr().unwrap()),
    );
    let (stop, flood) = flood_tcp(tcp_in, 2);
    // Skip the first second (queues filling), then record 10 s of arrivals.
    let mut buf = vec![0u8; 65_536];
    let warm = Instant::now() + Duration::from_secs(1);
    while Instant::now() < warm {
        let _ = watch.recv(&mut buf);
    }
    let start = Instant::now();
    let mut arrivals: Vec<(Duration, usize)> = Vec::with_capacity(1_000_000);
    while start.elapsed() < Duration::from_secs(10) {
        if let Ok(n) = watch.recv(&mut buf) {
            arrivals.push((start.elapsed(), n + 28));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = flood.join();
    let total: usize = arrivals.iter().map(|a| a.1).sum();
    let mut worst = 0usize;
    let (mut lo, mut in_window) = (0, 0usize);
    for hi in 0..arrivals.len() {
        in_window += arrivals[hi].1;
        while arrivals[hi].0 - arrivals[lo].0 >= Duration::from_millis(10) {
            in_window -= arrivals[lo].1;
            lo += 1;
        }
        worst = worst.max(in_window);
    }
    println!("\npacing: rate_mbps = 1000, more offered, 10 s of wire after 1 s of warm-up");
    println!(
        "  wire rate {:.1} Mb/s ({:+.2} % of the ceiling)   worst 10 ms window {:.1} Mb/s ({:+.1} %)",
        total as f64 * 8.0 / 10.0 / 1e6,
        (total as f64 * 8.0 / 10.0 / 1e6 / 1000.0 - 1.0) * 100.0,
        worst as f64 * 8.0 / 0.01 / 1e6,
        (worst as f64 * 8.0 / 0.01 / 1e6 / 1000.0 - 1.0) * 100.0
    );
    println!(
        "  sender {:.1} % of a core",
        100.0 * pair.sender.cpu_used() / 11.0
    );
}

/// The pair at 1 Gb/s for 10 s, a raw TCP sink draining the receiver.
fn paced_pair() {
    let sink = TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp_in = free_port();
    let pair = Pair::start(
        1000,
        &format!("{{ kind = \"tcp\", listen = \"127.0.0.1:{tcp_in}\", framing = \"raw\" }}"),
        &format!(
            "{{ kind = \"tcp\", connect = \"{}\", framing = \"raw\" }}",
            sink.local_addr().unwrap()
        ),
        None,
    );
    let (stop, flood) = flood_tcp(tcp_in, 3);
    let (mut conn, _) = sink.accept().unwrap();
    conn.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let start = Instant::now();
    let (cpu_s, cpu_r) = (pair.sender.cpu_seconds(), pair.receiver.cpu_seconds());
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    while start.elapsed() < Duration::from_secs(10) {
        if let Ok(n) = conn.read(&mut buf) {
            got += n;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let (cpu_s, cpu_r) = (
        pair.sender.cpu_seconds() - cpu_s,
        pair.receiver.cpu_seconds() - cpu_r,
    );
    stop.store(true, Ordering::Relaxed);
    drop(conn);
    let _ = flood.join();
    println!("\npaced1g: the pair at rate_mbps = 1000 for 10 s");
    println!("  goodput {:.1} MB/s", got as f64 / seconds / 1e6);
    println!(
        "  sender {:.1} % of a core, receiver {:.1} % of a core",
        100.0 * cpu_s / seconds,
        100.0 * cpu_r / seconds
    );
    println!(
        "  peak RSS sender {:.1} MiB, receiver {:.1} MiB; kernel drops {}",
        pair.sender.peak_rss_mib(),
        pair.receiver.peak_rss_mib(),
        pair.kernel_drops()
    );
}

/// A mixed flood for the receiver's port: random bytes, CRC-valid datagrams with random headers
/// (new session ids, geometries, far-ahead blocks), forged heartbeat blocks of new sessions (a
/// single one used to take an unauthenticated link), and a stream of small datagrams of one
/// unconfirmed session (once quadratic work per datagram).
fn forged_datagram(rng: &mut SimRng, kind: u64) -> Vec<u8> {
    use diode_wire::datagram::{self, BlockGeometry, Header};
    match kind % 4 {
        0 => random_bytes(30 + rng.below(1400) as usize, rng.next_u64()),
        1 | 3 => {
            let k = 1 + rng.below(200) as u8;
            let len = 1 + rng.below(if kind % 4 == 3 { 8 } else { 1400 }) as usize;
            let header = Header {
                authenticated: false,
                encrypted: false,
                session_id: if kind % 4 == 3 {
                    0xF1
                } else {
                    rng.next_u64() | 1
                },
                block: if rng.chance(0.5) {
                    rng.next_u64()
                } else {
                    rng.below(1 << 16)
                },
                shard_index: 0,
                geometry: BlockGeometry {
                    data_shards: k,
                    parity_shards: rng.below(255 - k as u64) as u8,
                    interleave_depth: 1 + rng.below(8) as u8,
                    shard_len: len as u16,
                },
            };
            let mut d = vec![0u8; header.geometry.datagram_len(false)];
            header.write(&mut d);
            d[datagram::HEADER_LEN..datagram::HEADER_LEN + len]
                .copy_from_slice(&random_bytes(len, rng.next_u64()));
            datagram::seal(&mut d, None);
            d
        }
        _ => {
            let now = Instant::now();
            let mut forger = diode_wire::Encoder::new(
                diode_wire::EncoderConfig {
                    session_id: rng.next_u64() | 1,
                    ..Default::default()
                },
                now,
            )
            .unwrap();
            forger.handle_timeout(now, 1);
            forger
                .poll_transmit(now)
                .map(|d| d.to_vec())
                .unwrap_or_default()
        }
    }
}

fn hostile() {
    let per_sec: u64 = 20_000;
    let seconds: u64 = 10;
    for keyed in [false, true] {
        std::env::set_var("DIODE_BENCH_KEY", if keyed { "1" } else { "0" });
        let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
        let _ = socket2::SockRef::from(&sink).set_recv_buffer_size(16 << 20);
        sink.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let udp_in = free_port();
        let pair = Pair::start(
            200,
            &format!("{{ kind = \"udp\", listen = \"127.0.0.1:{udp_in}\" }}"),
            &format!(
                "{{ kind = \"udp\", target = \"{}\" }}",
                sink.local_addr().unwrap()
            ),
            None,
        );
        let stop = Arc::new(AtomicBool::new(false));
        let flood = {
            let (stop, link) = (stop.clone(), pair.link);
            std::thread::spawn(move || {
                let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
                let mut rng = SimRng::new(99);
                // A pool of forgeries, sent round and round: the flood is limited by this
                // host's send rate, not by making them.
                let pool: Vec<Vec<u8>> = (0..4096).map(|i| forged_datagram(&mut rng, i)).collect();
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for d in pool.iter().take(256) {
                        let _ = socket.send_to(d, ("127.0.0.1", link));
                    }
                    sent += 256;
                    // Leave the other core to the services, most of the time.
                    std::thread::sleep(Duration::from_micros(500));
                }
                sent
            })
        };
        let total = per_sec * seconds;
        let generator = std::thread::spawn(move || {
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            let mut record = [b'.'; 100];
            let started = Instant::now();
            for seq in 0..total {
                if seq % 20 == 0 {
                    let due = started + Duration::from_micros(seq * 50);
                    if let Some(pause) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(pause);
                    }
                }
                record[..8].copy_from_slice(&seq.to_le_bytes());
                let _ = socket.send_to(&record, ("127.0.0.1", udp_in));
            }
        });
        let started = Instant::now();
        let mut seen = vec![false; total as usize];
        let mut buf = [0u8; 2048];
        let mut idle = 0;
        while idle < 10 {
            match sink.recv(&mut buf) {
                Ok(n) if n >= 8 => {
                    idle = 0;
                    let seq = u64::from_le_bytes(buf[..8].try_into().unwrap());
                    if let Some(slot) = seen.get_mut(seq as usize) {
                        *slot = true;
                    }
                }
                Ok(_) => {}
                Err(_) => {
                    if started.elapsed() > Duration::from_secs(seconds) {
                        idle += 1;
                    }
                }
            }
        }
        generator.join().unwrap();
        stop.store(true, Ordering::Relaxed);
        let forged = flood.join().unwrap();
        let elapsed = started.elapsed().as_secs_f64();
        let delivered = seen.iter().filter(|s| **s).count();
        println!(
            "\nhostile ({}): {per_sec} genuine 100-byte records/s for {seconds} s, forged datagrams at {:.0}/s",
            if keyed { "authenticated link" } else { "no key" },
            forged as f64 / elapsed
        );
        println!(
            "  genuine records delivered {delivered} of {total} ({:.3} %)",
            100.0 * delivered as f64 / total as f64
        );
        println!(
            "  receiver {:>5.1} % of a core, peak RSS {:>6.1} MiB; sessions seen {}",
            100.0 * pair.receiver.cpu_used() / elapsed,
            pair.receiver.peak_rss_mib(),
            pair.receiver.metric("diode_sessions_total"),
        );
        println!("  kernel drops (RcvbufErrors)  {}", pair.kernel_drops());
    }
    std::env::remove_var("DIODE_BENCH_KEY");
}
