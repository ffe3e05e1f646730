//! The `opcua` workload: a plant OPC UA server (async-opcua, in this process) whose variables
//! change at a fixed rate, the real sender subscribing to it, the real receiver's mirror, and an
//! OPC UA client here subscribed to every mirrored variable. Every change the plant made in the
//! measured window should reach the client; its latency is from the change's source timestamp
//! to the client's callback (one clock: everything is on this host).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opcua::client::{ClientBuilder, DataChangeCallback, IdentityToken};
use opcua::crypto::SecurityPolicy;
use opcua::server::node_manager::memory::{simple_node_manager, SimpleNodeManager};
use opcua::server::{address_space::Variable, diagnostics::NamespaceMetadata, ServerBuilder};
use opcua::types::{
    DataValue, DateTime, MessageSecurityMode, MonitoredItemCreateRequest, NodeId,
    TimestampsToReturn,
};

use super::{env_or, free_port, percentile, Pair};

pub fn run() {
    let seconds = env_or("DIODE_BENCH_OPCUA_SECS", 20);
    workload(10_000, 1, seconds);
    workload(1_000, 100, seconds);
}

/// What the client saw: per change, the latency in microseconds, for changes made in the window.
#[derive(Default)]
struct Seen {
    latencies_us: Vec<u64>,
}

type Window = Arc<Mutex<Option<(DateTime, Option<DateTime>)>>>;

fn in_window(window: &Window, at: DateTime) -> bool {
    window
        .lock()
        .unwrap()
        .is_some_and(|(start, end)| at >= start && end.is_none_or(|end| at < end))
}

fn workload(items: usize, hz: u64, seconds: u64) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let plant_port = free_port();
    let mirror_port = free_port();
    let period = Duration::from_millis(1000 / hz);
    let running = Arc::new(AtomicBool::new(true));
    // Changes with a source timestamp in [start, end) are counted, by the plant as it makes
    // them and by the client as it sees them.
    let window: Window = Arc::new(Mutex::new(None));
    let made = Arc::new(std::sync::atomic::AtomicU64::new(0));

    // The plant: `items` Double variables under Objects/Bench, all changed every period.
    let plant_ns = runtime.block_on(async {
        let mut server = ServerBuilder::new_anonymous("bench plant")
            .host("127.0.0.1")
            .port(plant_port)
            .pki_dir(dir.path().join("plant-pki"))
            .create_sample_keypair(false)
            .with_node_manager(simple_node_manager(
                NamespaceMetadata {
                    namespace_uri: "urn:bench:plant".to_owned(),
                    ..Default::default()
                },
                "bench",
            ))
            .max_message_size(64 << 20)
            .max_array_length(1 << 20)
            // A plant historian or PLC gateway samples as fast as it changes: so does this one.
            .subscription_poll_interval_ms(10);
        let limits = server.limits_mut();
        limits.subscriptions.min_sampling_interval_ms = 10.0;
        limits.subscriptions.min_publishing_interval_ms = 10.0;
        limits.subscriptions.max_monitored_item_queue_size = 1000;
        let (server, handle) = server.build().unwrap();
        let manager = handle
            .node_managers()
            .get_of_type::<SimpleNodeManager>()
            .unwrap();
        let ns = handle.get_namespace_index("urn:bench:plant").unwrap();
        let folder = NodeId::new(ns, "Bench");
        let ids: Vec<NodeId> = (0..items)
            .map(|i| NodeId::new(ns, format!("v{i}")))
            .collect();
        {
            let mut space = manager.address_space().write();
            space.add_folder(&folder, "Bench", "Bench", &NodeId::objects_folder_id());
            let variables = ids
                .iter()
                .enumerate()
                .map(|(i, id)| Variable::new(id, format!("v{i}"), format!("v{i}"), 0.0f64))
                .collect();
            space.add_variables(variables, &folder);
        }
        tokio::spawn(server.run());
        let subscriptions = handle.subscriptions().clone();
        let running = running.clone();
        let (window, made) = (window.clone(), made.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut n = 0f64;
            while running.load(Ordering::Relaxed) {
                tick.tick().await;
                n += 1.0;
                let now = DateTime::now();
                if in_window(&window, now) {
                    made.fetch_add(items as u64, Ordering::Relaxed);
                }
                let _ = manager.set_values(
                    &subscriptions,
                    ids.iter().map(|id| {
                        (
                            id,
                            None,
                            DataValue {
                                value: Some(n.into()),
                                status: Some(opcua::types::StatusCode::Good),
                                source_timestamp: Some(now),
                                server_timestamp: Some(now),
                                ..DataValue::null()
                            },
                        )
                    }),
                );
            }
        });
        ns
    });

    let sampling_ms = (1000 / hz).max(10);
    let pair = Pair::start_tables(
        1000,
        &format!(
            "[safety]\nmin_poll_interval_ms = 10\n[[topic]]\nname = \"bench\"\nsource = {{ kind = \"opcua\", endpoint = \"opc.tcp://127.0.0.1:{plant_port}/\", browse = [{{ include = [\"Bench/**\"] }}], sampling_interval_ms = {sampling_ms}, publishing_interval_ms = 100, queue_size = {}, max_items = {items} }}\n",
            (hz / 5).max(10)
        ),
        &format!(
            "[[route]]\ntopics = [\"bench\"]\nsink = {{ kind = \"opcua_server\", listen = \"127.0.0.1:{mirror_port}\", pki_dir = \"mirror-pki\", allow_unsecured = true, max_nodes = {} }}\n",
            items + 10
        ),
        None,
    );

    // The IT client: every mirrored variable, as fast as the mirror publishes.
    let seen = Arc::new(Mutex::new(Seen::default()));
    let subscribed = runtime.block_on(async {
        let mut client = ClientBuilder::new()
            .application_name("bench IT client")
            .application_uri("urn:bench:it-client")
            .pki_dir(dir.path().join("client-pki"))
            .create_sample_keypair(false)
            .trust_server_certs(true)
            .session_retry_limit(-1)
            .max_message_size(64 << 20)
            .max_chunk_count(1024)
            .max_array_length(1 << 20)
            .client()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        let (session, event_loop) = loop {
            match client
                .connect_to_matching_endpoint(
                    (
                        format!("opc.tcp://127.0.0.1:{mirror_port}/").as_str(),
                        SecurityPolicy::None.to_str(),
                        MessageSecurityMode::None,
                    ),
                    IdentityToken::Anonymous,
                )
                .await
            {
                Ok(connected) => break connected,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(500)).await
                }
                Err(e) => panic!("no session with the mirror: {e}"),
            }
        };
        event_loop.spawn();
        session.wait_for_connection().await;
        let mirror_ns = session
            .get_namespace_index("urn:diode-gateway:mirror")
            .await
            .unwrap();
        let seen_cb = seen.clone();
        let window = window.clone();
        let subscription = session
            .create_subscription(
                Duration::from_millis(50),
                100,
                20,
                0,
                0,
                true,
                DataChangeCallback::new(move |value, _item| {
                    let Some(source) = value.source_timestamp else {
                        return;
                    };
                    if in_window(&window, source) {
                        let latency = DateTime::now().as_chrono() - source.as_chrono();
                        seen_cb
                            .lock()
                            .unwrap()
                            .latencies_us
                            .push(latency.num_microseconds().unwrap_or(0).max(0) as u64);
                    }
                }),
            )
            .await
            .unwrap();
        // The mirror has the variables once the sender's browse crossed; until then they are
        // refused as unknown, and asked for again.
        let mut pending: Vec<NodeId> = (0..items)
            .map(|i| NodeId::new(mirror_ns, format!("bench/ns={plant_ns};s=v{i}")))
            .collect();
        while !pending.is_empty() && Instant::now() < deadline {
            let mut still = Vec::new();
            for chunk in pending.chunks(1000) {
                let requests: Vec<MonitoredItemCreateRequest> = chunk
                    .iter()
                    .map(|id| {
                        let mut request: MonitoredItemCreateRequest = id.clone().into();
                        request.requested_parameters.sampling_interval = 0.0;
                        request.requested_parameters.queue_size = 1000;
                        request
                    })
                    .collect();
                let results = session
                    .create_monitored_items(subscription, TimestampsToReturn::Both, requests)
                    .await
                    .unwrap();
                for (id, r) in chunk.iter().zip(results) {
                    if !r.result.status_code.is_good() {
                        still.push(id.clone());
                    }
                }
            }
            if !still.is_empty() {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            pending = still;
        }
        pending.is_empty()
    });
    assert!(subscribed, "the mirror never had every variable");

    // The measured window: changes made from now on, for `seconds`.
    let (sender_cpu, receiver_cpu) = (pair.sender.cpu_seconds(), pair.receiver.cpu_seconds());
    *window.lock().unwrap() = Some((DateTime::now(), None));
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    if let Some((_, end)) = window.lock().unwrap().as_mut() {
        *end = Some(DateTime::now());
    }
    let measured = started.elapsed().as_secs_f64();
    // Late changes of the window still arrive: give them a moment, then stop counting.
    std::thread::sleep(Duration::from_secs(3));
    *window.lock().unwrap() = None;
    running.store(false, Ordering::Relaxed);
    let (sender_cpu, receiver_cpu) = (
        pair.sender.cpu_seconds() - sender_cpu,
        pair.receiver.cpu_seconds() - receiver_cpu,
    );
    let mut latencies = std::mem::take(&mut seen.lock().unwrap().latencies_us);
    latencies.sort_unstable();
    let made = made.load(Ordering::Relaxed);
    println!(
        "\nopcua: {items} items changing {hz} times a second ({:.0} changes/s), plant server -> opcua source -> link -> opcua_server mirror -> OPC UA client, {seconds} s",
        items as f64 * hz as f64
    );
    println!(
        "  changes delivered {} of {made} made ({:.1} %; at {items} x {hz}/s the plant would make {:.0})",
        latencies.len(),
        100.0 * latencies.len() as f64 / made as f64,
        items as f64 * hz as f64 * measured
    );
    if !latencies.is_empty() {
        println!(
            "  latency source timestamp -> IT client: p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
            percentile(&latencies, 0.50) as f64 / 1000.0,
            percentile(&latencies, 0.99) as f64 / 1000.0,
            *latencies.last().unwrap() as f64 / 1000.0
        );
    }
    println!(
        "  records lost on the link {}, dropped at the source {}, dead letters {}",
        pair.receiver.metric("diode_records_lost_total"),
        pair.sender.metric("diode_records_dropped_total"),
        pair.receiver.metric("diode_sink_dead_letters_total")
    );
    for (side, cpu, s) in [
        ("sender", sender_cpu, &pair.sender),
        ("receiver", receiver_cpu, &pair.receiver),
    ] {
        println!(
            "  {side:<9} {:>5.1} % of a core  peak RSS {:>6.1} MiB",
            100.0 * cpu / measured,
            s.peak_rss_mib()
        );
    }
    println!(
        "  monitored items at the sender {}",
        pair.sender.metric("diode_source_items")
    );
    if std::env::var("DIODE_BENCH_OPCUA_LOGS").is_ok() {
        for log in ["sender.log", "receiver.log"] {
            let text = std::fs::read_to_string(pair._dir.path().join(log)).unwrap_or_default();
            for line in text
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .take(15)
            {
                println!("  {log}: {line}");
            }
        }
    }
    drop(pair);
    runtime.shutdown_timeout(Duration::from_secs(2));
}
