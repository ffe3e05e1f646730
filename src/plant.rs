//! A synthetic plant for the demo: line 3's tags stream telemetry over UDP, one JSON sample per
//! datagram, a historian exports batches of events over TCP, one JSON line each, batch
//! reports land as files in an export folder, and the line's OPC UA server holds its tags.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use diode_common::{unix_time_us, Shutdown};
use diode_wire::sim::SimRng;
use tokio::io::AsyncWriteExt;

#[derive(Debug, Default)]
pub struct PlantCounters {
    pub telemetry_sent: AtomicU64,
    pub events_sent: AtomicU64,
    pub reports_written: AtomicU64,
}

/// Writes a batch report of about `bytes` bytes of CSV into `dir` every `period`, as a
/// historian's export job does: under a `.tmp` name first, then renamed into place, so the
/// files source (which excludes `*.tmp`) never sees one half written. Stops at `shutdown` or
/// once `until` has passed.
pub async fn run_reports(
    dir: std::path::PathBuf,
    period: Duration,
    bytes: usize,
    until: tokio::time::Instant,
    shutdown: Shutdown,
    counters: Arc<PlantCounters>,
) {
    let mut rng = SimRng::new(11);
    let mut tick = tokio::time::interval(period);
    for n in 1.. {
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = tick.tick() => {}
        }
        if tokio::time::Instant::now() >= until {
            return;
        }
        let mut text = String::from("time_us,tag,value,unit\n");
        while text.len() < bytes {
            let (tag, unit, mean, spread) = TAGS[rng.below(TAGS.len() as u64) as usize];
            let value = mean + spread * (rng.below(2001) as f64 / 1000.0 - 1.0);
            text += &format!("{},{tag},{value:.3},{unit}\n", unix_time_us());
        }
        let name = format!("batch-report-{n:04}.csv");
        let tmp = dir.join(format!("{name}.tmp"));
        if tokio::fs::write(&tmp, &text).await.is_ok()
            && tokio::fs::rename(&tmp, dir.join(&name)).await.is_ok()
        {
            counters.reports_written.fetch_add(1, Ordering::Relaxed);
        }
    }
}

const TAGS: [(&str, &str, f64, f64); 8] = [
    ("motor1/speed", "rpm", 1480.0, 25.0),
    ("motor1/current", "A", 42.0, 3.0),
    ("oven/temperature", "degC", 215.0, 4.0),
    ("tank2/level", "%", 63.0, 8.0),
    ("line/pressure", "bar", 6.2, 0.4),
    ("pump4/flow", "m3/h", 18.5, 1.5),
    ("press/vibration", "mm/s", 2.1, 0.6),
    ("conveyor/speed", "m/min", 31.0, 0.8),
];

/// Samples `stations` copies of line 3's tags `rate_hz` times a second each.
pub async fn run_telemetry(
    target: SocketAddr,
    stations: usize,
    rate_hz: u32,
    shutdown: Shutdown,
    counters: Arc<PlantCounters>,
) {
    let Ok(socket) = tokio::net::UdpSocket::bind("127.0.0.1:0").await else {
        return;
    };
    let mut rng = SimRng::new(3);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let per_tick = (stations * TAGS.len() * rate_hz as usize).div_ceil(100);
    let mut t = 0.0f64;
    loop {
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = tick.tick() => {}
        }
        t += 0.01;
        for i in 0..per_tick {
            let station = i / TAGS.len() % stations.max(1);
            let (tag, unit, base, swing) = TAGS[i % TAGS.len()];
            let noise = (rng.below(1000) as f64 / 1000.0 - 0.5) * swing * 0.1;
            let value = base + swing * (t / 7.0 + i as f64).sin() + noise;
            let sample = format!(
                r#"{{"tag":"line3/st{station}/{tag}","value":{value:.3},"unit":"{unit}","quality":"good","ts":{}}}"#,
                unix_time_us() / 1000
            );
            if socket.send_to(sample.as_bytes(), target).await.is_ok() {
                counters.telemetry_sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Every `period`, the historian exports `batch` events over one kept-open TCP connection.
pub async fn run_historian(
    target: SocketAddr,
    period: Duration,
    batch: usize,
    shutdown: Shutdown,
    counters: Arc<PlantCounters>,
) {
    let mut rng = SimRng::new(5);
    let mut tick = tokio::time::interval(period);
    let mut conn: Option<tokio::net::TcpStream> = None;
    let kinds = [
        "alarm_high",
        "alarm_cleared",
        "setpoint_change",
        "batch_start",
        "batch_end",
        "operator_note",
    ];
    loop {
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = tick.tick() => {}
        }
        if conn.is_none() {
            conn = tokio::net::TcpStream::connect(target).await.ok();
        }
        let Some(stream) = conn.as_mut() else {
            continue;
        };
        let mut text = String::new();
        for _ in 0..batch {
            let (tag, _, base, swing) = TAGS[rng.below(TAGS.len() as u64) as usize];
            let kind = kinds[rng.below(kinds.len() as u64) as usize];
            text += &format!(
                r#"{{"ts":{},"source":"historian","tag":"line3/{tag}","event":"{kind}","value":{:.2}}}"#,
                unix_time_us() / 1000,
                base + swing * (rng.below(200) as f64 / 100.0 - 1.0)
            );
            text.push('\n');
        }
        if stream.write_all(text.as_bytes()).await.is_ok() {
            counters
                .events_sent
                .fetch_add(batch as u64, Ordering::Relaxed);
        } else {
            conn = None;
        }
    }
}

/// Line 3's OPC UA server on `127.0.0.1` (a free port): Objects/Line3 with a few tags of
/// different types, each changed every `period` with the time as its source timestamp, and a
/// Cell1 folder beneath. Returns its endpoint; it stops at `shutdown`.
pub async fn start_opcua_server(period: Duration, shutdown: Shutdown) -> std::io::Result<String> {
    use opcua::server::address_space::Variable;
    use opcua::server::diagnostics::NamespaceMetadata;
    use opcua::server::node_manager::memory::{simple_node_manager, SimpleNodeManager};
    use opcua::server::ServerBuilder;
    use opcua::types::{DataValue, DateTime, NodeId, StatusCode, UAString, Variant};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let (server, handle) = ServerBuilder::new_anonymous("demo plant: line 3")
        .host("127.0.0.1")
        .port(port)
        .pki_dir(std::env::temp_dir().join(format!("diode-demo-plant-pki-{}", std::process::id())))
        .create_sample_keypair(false)
        .with_node_manager(simple_node_manager(
            NamespaceMetadata {
                namespace_uri: "urn:diode-demo:line3".to_owned(),
                ..Default::default()
            },
            "line3",
        ))
        .build()
        .map_err(std::io::Error::other)?;
    let manager = handle
        .node_managers()
        .get_of_type::<SimpleNodeManager>()
        .ok_or_else(|| std::io::Error::other("no node manager"))?;
    let ns = handle
        .get_namespace_index("urn:diode-demo:line3")
        .ok_or_else(|| std::io::Error::other("no namespace"))?;
    let id = move |name: &str| NodeId::new(ns, format!("Line3.{name}"));
    let (line, cell) = (NodeId::new(ns, "Line3"), NodeId::new(ns, "Line3.Cell1"));
    {
        let mut space = manager.address_space().write();
        space.add_folder(&line, "Line3", "Line 3", &NodeId::objects_folder_id());
        space.add_folder(&cell, "Cell1", "Cell 1", &line);
        space.add_variables(
            vec![
                Variable::new(
                    &id("Temperature"),
                    "Temperature",
                    "Temperature (°C)",
                    20.0f64,
                ),
                Variable::new(&id("MotorSpeed"), "MotorSpeed", "Motor speed (rpm)", 0i32),
                Variable::new(&id("Running"), "Running", "Running", false),
                Variable::new(&id("BatchId"), "BatchId", "Batch", UAString::from("")),
            ],
            &line,
        );
        space.add_variables(
            vec![Variable::new(
                &id("Cell1.Pressure"),
                "Pressure",
                "Pressure (bar)",
                1.0f64,
            )],
            &cell,
        );
    }
    let subscriptions = handle.subscriptions().clone();
    tokio::spawn(server.run_with(listener));
    tokio::spawn(async move {
        let mut rng = SimRng::new(7);
        let mut tick = tokio::time::interval(period);
        for n in 0u64.. {
            tokio::select! {
                _ = shutdown.wait() => break,
                _ = tick.tick() => {}
            }
            let now = DateTime::now();
            let value = |v: Variant| DataValue {
                value: Some(v),
                status: Some(StatusCode::Good),
                source_timestamp: Some(now),
                server_timestamp: Some(now),
                ..DataValue::null()
            };
            let wobble = |mean: f64, spread: f64, rng: &mut SimRng| {
                mean + spread * (rng.below(2001) as f64 / 1000.0 - 1.0)
            };
            let updates = [
                (id("Temperature"), value(wobble(72.0, 1.5, &mut rng).into())),
                (
                    id("MotorSpeed"),
                    value((1450 + rng.below(20) as i32).into()),
                ),
                (id("Running"), value((n % 30 < 25).into())),
                (
                    id("BatchId"),
                    value(UAString::from(format!("B-{:05}", n / 30)).into()),
                ),
                (
                    id("Cell1.Pressure"),
                    value(wobble(4.2, 0.2, &mut rng).into()),
                ),
            ];
            let _ = manager.set_values(
                &subscriptions,
                updates.iter().map(|(id, v)| (id, None, v.clone())),
            );
        }
        handle.cancel();
    });
    Ok(format!("opc.tcp://127.0.0.1:{port}/"))
}
