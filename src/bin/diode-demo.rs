//! The demo: a sender and a receiver on loopback with a synthetic plant and a lossy link between
//! them, showing live throughput, repairs and losses, then an exact account of every record.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use diode_common::Shutdown;
use diode_gateway::plant::{self, PlantCounters};
use diode_gateway::relay::{Relay, RelayConfig};
use diode_gateway::scrape;
use diode_wire::sim::Impairments;

/// Runs diode-send and diode-recv on loopback with a synthetic plant and a lossy link.
#[derive(Parser)]
struct Args {
    /// How long to run; 0 runs until Ctrl-C.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Random datagram loss on the link, in percent.
    #[arg(long, default_value_t = 1.0)]
    loss_percent: f64,
    /// Every this many seconds the link goes dark for --outage-ms (0: never), as a media
    /// converter or switch restart would take a fibre link down.
    #[arg(long, default_value_t = 12)]
    outage_every_secs: u64,
    /// How long each outage lasts.
    #[arg(long, default_value_t = 300)]
    outage_ms: u64,
    /// Any outage up to this long loses nothing: the sender sends each block's repair shards
    /// again this long later (the sender's link.outage_protection_ms).
    #[arg(long, default_value_t = 400)]
    outage_protection_ms: u64,
    /// The unprotected behaviour for comparison: no outage protection and parity in proportion
    /// to block size only (link.design_loss_percent = 0).
    #[arg(long)]
    unprotected: bool,
    /// Telemetry samples per second from the synthetic plant.
    #[arg(long, default_value_t = 8000)]
    telemetry_per_sec: u32,
    /// The sender's pacing ceiling (link.rate_mbps), in megabits per second on the wire.
    #[arg(long, default_value_t = 40.0)]
    rate_mbps: f64,
    /// The embedded MQTT broker the receiver serves the telemetry on ("" for none).
    #[arg(long, default_value = "127.0.0.1:11883")]
    mqtt_listen: String,
    /// Where configs and received records go.
    #[arg(long, default_value = "demo-out")]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    diode_wire::fec::check_cpu()?;
    // The terminal shows the live table; the services' log lines go to a file beside the
    // configs (named when the demo starts), not between the table's rows.
    let out = &args.out;
    if out.exists() {
        std::fs::remove_dir_all(out).with_context(|| format!("clearing {}", out.display()))?;
    }
    std::fs::create_dir_all(out)?;
    diode_common::init_logging_to(&out.join("demo.log"))
        .with_context(|| format!("creating {}", out.join("demo.log").display()))?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(demo(args))
}

async fn demo(args: Args) -> anyhow::Result<()> {
    let out = &args.out;
    let records_path = out.join("records.jsonl");
    // Secure as a deployment should be: the link authenticated with a key made for this run.
    diode_common::keyfile::generate(&out.join("link.key"))?;
    // Fixed ports, written into the configs, so that a second look at them (or a Prometheus
    // scrape) finds the same endpoints the demo prints.
    let free = || -> anyhow::Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    };
    let (receiver_metrics, sender_metrics, opcua_mirror) = (free()?, free()?, free()?);
    // Line 3's OPC UA server, mirrored read-only on the IT side.
    let plant_stop = Shutdown::new();
    let opcua_plant = plant::start_opcua_server(Duration::from_secs(1), plant_stop.clone()).await?;

    let broker_route = if args.mqtt_listen.is_empty() {
        String::new()
    } else {
        format!(
            "\n[[route]]\ntopics = [\"line3/#\"]\nsink = {{ kind = \"mqtt_broker\", listen = \"{}\", topic_prefix = \"ot/\" }}\n",
            args.mqtt_listen
        )
    };
    let receiver_toml = write(
        &out.join("receiver.toml"),
        &format!(
            r#"# Written by diode-demo: the IT side.
[link]
listen = "127.0.0.1:0"
key_file = "link.key"
state_file = "receiver.state"

[metrics]
listen = "127.0.0.1:{receiver_metrics}"

[[route]]
topics = ["line3/#", "historian/#"]
sink = {{ kind = "file", path = "records.jsonl" }}
buffer_dir = "buffer/records"

[[route]]
name = "reports"
topics = ["exports/reports"]
sink = {{ kind = "files", dir = "mirror/reports" }}

[[route]]
name = "opcua-mirror"
topics = ["line3/opcua"]
sink = {{ kind = "opcua_server", listen = "127.0.0.1:{opcua_mirror}", pki_dir = "mirror/opcua-pki", allow_unsecured = true }}
{broker_route}"#
        ),
    )?;
    let receiver_stop = Shutdown::new();
    let receiver = diode_receiver::start(
        diode_receiver::config::load(&receiver_toml)?,
        receiver_stop.clone(),
    )
    .await?;

    let relay = Relay::start(
        receiver.link_addr,
        RelayConfig {
            impairments: Impairments {
                drop_rate: args.loss_percent / 100.0,
                burst_rate: 0.0002,
                burst_len: 8,
                reorder_rate: 0.002,
                reorder_distance: 3,
                ..Impairments::default()
            },
            seed: 42,
        },
    )?;

    let sender_toml = write(
        &out.join("sender.toml"),
        &format!(
            r#"# Written by diode-demo: the OT side. The destination is the lossy relay standing in for the diode.
[link]
destination = "{}"
rate_mbps = {}
mtu_bytes = 1500
data_shards = 32
parity_shards = 8
heartbeat_interval_ms = 500
flush_interval_ms = 5
design_loss_percent = {}
outage_protection_ms = {}
key_file = "link.key"

[metrics]
listen = "127.0.0.1:{}"

[[topic]]
name = "line3/telemetry"
source = {{ kind = "udp", listen = "127.0.0.1:0" }}

[[topic]]
name = "historian/events"
source = {{ kind = "tcp", listen = "127.0.0.1:0", framing = "lines" }}

[[topic]]
name = "line3/opcua"
source = {{ kind = "opcua", endpoint = "{opcua_plant}", browse = [{{ include = ["Line3/**"] }}], sampling_interval_ms = 500, publishing_interval_ms = 500 }}

[[topic]]
name = "exports/reports"
rate_mbps = 4
source = {{ kind = "files", dir = "plant/reports", state_file = "reports.files-state", exclude = ["**/*.tmp"], stable_ms = 1000, passes = 2, pass_interval_ms = 3000 }}
"#,
            relay.listen_addr,
            args.rate_mbps,
            if args.unprotected { 0.0 } else { 1.0 },
            if args.unprotected {
                0
            } else {
                args.outage_protection_ms
            },
            sender_metrics,
        ),
    )?;
    let reports_dir = out.join("plant/reports");
    std::fs::create_dir_all(&reports_dir)?;
    let sender_stop = Shutdown::new();
    let sender = diode_sender::start(
        diode_sender::config::load(&sender_toml)?,
        sender_stop.clone(),
    )
    .await?;
    let source = |topic: &str| {
        sender
            .source_addrs
            .iter()
            .find(|(name, _)| name == topic)
            .map(|(_, addr)| *addr)
            .expect("configured above")
    };

    let counters = Arc::new(PlantCounters::default());
    tokio::spawn(plant::run_telemetry(
        source("line3/telemetry"),
        (args.telemetry_per_sec as usize / 800).max(1),
        100,
        plant_stop.clone(),
        counters.clone(),
    ));
    tokio::spawn(plant::run_historian(
        source("historian/events"),
        Duration::from_secs(1),
        500,
        plant_stop.clone(),
        counters.clone(),
    ));
    // Reports stop 5 s before the end, so that the last one's first pass has crossed.
    let reports_until =
        tokio::time::Instant::now() + Duration::from_secs(args.seconds.saturating_sub(5).max(1));
    tokio::spawn(plant::run_reports(
        reports_dir.clone(),
        Duration::from_secs(3),
        256 << 10,
        if args.seconds > 0 {
            reports_until
        } else {
            tokio::time::Instant::now() + Duration::from_secs(u64::from(u32::MAX))
        },
        plant_stop.clone(),
        counters.clone(),
    ));
    let outages = tokio::spawn(schedule_outages(
        relay.dark_handle(),
        Duration::from_secs(args.outage_every_secs),
        Duration::from_millis(args.outage_ms),
    ));

    println!("diode demo: plant -> diode-send -> lossy link ({}% loss, bursts, reordering{}) -> diode-recv -> {}",
        args.loss_percent,
        if args.outage_every_secs > 0 { format!(", {} ms outage every {} s", args.outage_ms, args.outage_every_secs) } else { String::new() },
        records_path.display());
    println!(
        "configs: {} and {} (link authenticated with {}); log: {}",
        sender_toml.display(),
        receiver_toml.display(),
        out.join("link.key").display(),
        out.join("demo.log").display()
    );
    if let (Some(s), Some(r)) = (sender.metrics_addr, receiver.metrics_addr) {
        println!(
            "status pages, live while the demo runs: http://{s}/ (sender), http://{r}/ (receiver)"
        );
        println!("metrics: http://{s}/metrics (sender), http://{r}/metrics (receiver)");
    }
    println!(
        "OPC UA: line 3's server {opcua_plant} is mirrored read-only at opc.tcp://127.0.0.1:{opcua_mirror}/ (Objects/line3/opcua/Line3)"
    );
    if let Some((host, port)) = args.mqtt_listen.rsplit_once(':') {
        println!("telemetry over MQTT: mosquitto_sub -h {host} -p {port} -t 'ot/#' -v");
    }
    println!();
    println!(
        "{:>5}  {:>11}  {:>11}  {:>9}  {:>11}  {:>8}  {:>7}  {:>8}  {:>4}",
        "time",
        "plant rec/s",
        "out rec/s",
        "link Mb/s",
        "link losses",
        "repaired",
        "lost",
        "lost",
        "link"
    );
    println!(
        "{:>5}  {:>11}  {:>11}  {:>9}  {:>11}  {:>8}  {:>7}  {:>8}  {:>4}",
        "", "", "", "", "datagrams", "blocks", "blocks", "records", ""
    );
    println!(
        "{:>5}  {:>11}  {:>11}  {:>9}  {:>11}  {:>8}  {:>7}  {:>8}  {:>4}",
        "", "per second", "per second", "", "total", "total", "total", "total", "now"
    );

    let started = Instant::now();
    let mut last = (0u64, 0.0f64, 0.0f64);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut ctrl_c => break,
        }
        let rx = scrape::encode(&receiver.registry);
        let tx = scrape::encode(&sender.registry);
        let plant_total = counters.telemetry_sent.load(Ordering::Relaxed)
            + counters.events_sent.load(Ordering::Relaxed);
        let out_total = scrape::sum(&rx, "diode_records_out_total", &[]);
        let bytes = scrape::sum(&tx, "diode_link_bytes_sent_total", &[]);
        println!(
            "{:>4}s  {:>11}  {:>11}  {:>9.1}  {:>11}  {:>8}  {:>7}  {:>8}  {:>4}",
            started.elapsed().as_secs(),
            plant_total - last.0,
            (out_total - last.1) as u64,
            (bytes - last.2) * 8.0 / 1e6,
            relay.stats.dropped.load(Ordering::Relaxed),
            scrape::sum(&rx, "diode_blocks_recovered_total", &[]) as u64,
            scrape::sum(&rx, "diode_blocks_lost_total", &[]) as u64,
            scrape::sum(&rx, "diode_records_lost_total", &[]) as u64,
            if scrape::sum(&rx, "diode_link_up", &[]) > 0.0 {
                "up"
            } else {
                "DOWN"
            }
        );
        last = (plant_total, out_total, bytes);
        if args.seconds > 0 && started.elapsed() >= Duration::from_secs(args.seconds) {
            break;
        }
    }

    // A clean stop: the plant first, then the sender sends what it holds and a last heartbeat
    // over a link that is up again, then the receiver writes out its queues.
    plant_stop.trigger();
    outages.abort();
    relay.set_dark(false);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sender_registry = sender.registry.clone();
    sender_stop.trigger();
    sender.finished().await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let rx = scrape::encode(&receiver.registry);
    let tx = scrape::encode(&sender_registry);
    receiver_stop.trigger();
    receiver.finished().await;
    let backwards = relay.stats.backwards.load(Ordering::Relaxed);
    let link_dropped = relay.stats.dropped.load(Ordering::Relaxed);
    relay.stop();

    println!();
    println!(
        "{:<18} {:>10} {:>10} {:>10} {:>10}",
        "topic", "taken in", "delivered", "lost", "unaccounted"
    );
    let mut all_accounted = true;
    for topic in ["line3/telemetry", "historian/events", "line3/opcua"] {
        let label = format!("topic=\"{topic}\"");
        let taken = scrape::sum(&tx, "diode_records_in_total", &[&label]) as u64;
        let delivered = scrape::sum(&rx, "diode_records_out_total", &[&label]) as u64;
        let lost = scrape::sum(&rx, "diode_records_lost_total", &[&label]) as u64;
        let unaccounted = taken as i64 - delivered as i64 - lost as i64;
        all_accounted &= unaccounted == 0;
        println!("{topic:<18} {taken:>10} {delivered:>10} {lost:>10} {unaccounted:>10}");
    }
    let lines = std::fs::read_to_string(&records_path)
        .map(|t| t.lines().count())
        .unwrap_or(0);
    let (written, mirrored) = compare_reports(&reports_dir, &out.join("mirror/reports"));
    println!();
    println!(
        "link: {} datagrams sent, {} dropped by the link, {} blocks repaired with parity, {} lost beyond repair",
        scrape::sum(&tx, "diode_datagrams_sent_total", &[]) as u64,
        link_dropped,
        scrape::sum(&rx, "diode_blocks_recovered_total", &[]) as u64,
        scrape::sum(&rx, "diode_blocks_lost_total", &[]) as u64,
    );
    println!(
        "{lines} records written to {} (one JSON object per line)",
        records_path.display()
    );
    println!(
        "batch reports: {written} written to {}, {mirrored} of them in {} byte for byte (SHA-256 verified on the way)",
        reports_dir.display(),
        out.join("mirror/reports").display()
    );
    let repairs = scrape::sum(&tx, "diode_repair_datagrams_sent_total", &[]);
    let datagrams = scrape::sum(&tx, "diode_datagrams_sent_total", &[]);
    if args.unprotected {
        println!(
            "protection: off (--unprotected): parity in proportion to block size, no repair shards"
        );
    } else {
        println!(
            "protection: parity for 1% loss at every block size, outages up to {} ms ridden through; \
             {} repair datagrams sent again, {:.0}% of the link's datagrams",
            args.outage_protection_ms,
            repairs as u64,
            100.0 * repairs / datagrams.max(1.0)
        );
    }
    println!("datagrams the receiver sent back towards the link: {backwards}");
    if all_accounted {
        println!("every record taken in was delivered in order or reported lost with its exact sequence range");
    } else {
        println!("some records are unaccounted for: see the log above");
    }
    Ok(())
}

/// How many reports the plant wrote, and how many of them the mirror holds identical.
fn compare_reports(plant: &Path, mirror: &Path) -> (usize, usize) {
    let mut written = 0;
    let mut identical = 0;
    for entry in std::fs::read_dir(plant).into_iter().flatten().flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().ends_with(".tmp") {
            continue;
        }
        written += 1;
        let same = std::fs::read(entry.path())
            .ok()
            .zip(std::fs::read(mirror.join(&name)).ok())
            .is_some_and(|(a, b)| a == b);
        identical += usize::from(same);
    }
    (written, identical)
}

fn write(path: &Path, text: &str) -> anyhow::Result<PathBuf> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path.to_owned())
}

/// Every `every`, the relay goes dark for `length`.
async fn schedule_outages(dark: Arc<AtomicBool>, every: Duration, length: Duration) {
    if every.is_zero() {
        return;
    }
    loop {
        tokio::time::sleep(every.saturating_sub(length)).await;
        dark.store(true, Ordering::Relaxed);
        tokio::time::sleep(length).await;
        dark.store(false, Ordering::Relaxed);
    }
}
