//! `diode-send`, the OT side: sources take plant data in as records per topic; the link thread
//! encodes them into FEC-protected blocks (`diode-wire`) and paces the datagrams onto the
//! one-way link. Nothing is ever read back from the link.
//!
//! ```text
//! sources (tokio tasks) ──bounded queue──► link thread: Encoder (paced batches) ─► UDP socket ─► diode
//! ```

pub mod config;
pub mod journal;
pub mod link;
pub mod metrics;
pub mod rate;
pub mod replay;
pub mod sources;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use diode_common::net::{udp_socket, Buffer};
use diode_common::{unix_time_us, Shutdown};
use diode_wire::{Encoder, EncoderConfig};
use prometheus_client::registry::Registry;
use thiserror::Error;

use crate::config::Loaded;
use crate::metrics::SenderMetrics;
use crate::sources::SourceContext;

#[derive(Debug, Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] diode_common::metrics::BindError),
    #[error("cannot start {what}: {source}")]
    Source {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("link settings: {0}")]
    Encoder(#[from] diode_wire::EncoderConfigError),
    #[error("topic {0}: {1}")]
    Topic(String, diode_wire::encoder::AddTopicError),
    #[error("cannot start the link thread: {0}")]
    Thread(std::io::Error),
    #[error("journal {dir}: {source}")]
    Journal {
        dir: String,
        #[source]
        source: std::io::Error,
    },
}

/// A started sender.
pub struct RunningSender {
    pub session_id: u64,
    pub metrics_addr: Option<SocketAddr>,
    /// Each listening topic's source address as bound (useful when configured with port 0).
    pub source_addrs: Vec<(String, SocketAddr)>,
    pub registry: Arc<Registry>,
    /// One per lane.
    done: Vec<tokio::sync::oneshot::Receiver<()>>,
}

impl RunningSender {
    /// Resolves when every lane's link thread has sent what it held and stopped.
    pub async fn finished(self) {
        for done in self.done {
            let _ = done.await;
        }
    }
}

/// A lane's queues between the sources and its link thread, and the topics it carries.
struct LaneQueues {
    queue_tx: flume::Sender<sources::Ingest>,
    queue_rx: flume::Receiver<sources::Ingest>,
    budget: diode_common::budget::ByteBudget,
    // Bulk topics (files) queue apart, with a budget of their own, so that they never hold room
    // a live record needs (link.rs takes them only when no live record waits).
    bulk_tx: flume::Sender<sources::Ingest>,
    bulk_rx: flume::Receiver<sources::Ingest>,
    bulk_budget: diode_common::budget::ByteBudget,
    bulk_room: usize,
    /// By the lane's own topic id.
    topic_metrics: Vec<metrics::TopicMetrics>,
    /// Each of the lane's topics' index in the configuration (the journal's and the sequence
    /// file's numbering), by the lane's own topic id.
    globals: Vec<usize>,
    waker: link::LinkWaker,
}

impl LaneQueues {
    fn new(link: &config::LinkConfig, rate_mbps: f64) -> Self {
        let (queue_tx, queue_rx) = flume::bounded(link.queue_records);
        let (bulk_tx, bulk_rx) = flume::bounded(link.queue_records);
        LaneQueues {
            queue_tx,
            queue_rx,
            budget: diode_common::budget::ByteBudget::new(link.queue_bytes),
            bulk_tx,
            bulk_rx,
            bulk_budget: diode_common::budget::ByteBudget::new(
                link.queue_bytes.min(BULK_QUEUE_BYTES),
            ),
            bulk_room: bulk_room_bytes(rate_mbps, link.max_queued_bytes),
            topic_metrics: Vec::new(),
            globals: Vec::new(),
            waker: link::LinkWaker::default(),
        }
    }
}

/// A lane's link socket, which only ever sends. Connected, the kernel delivers to it only
/// datagrams from the destination's own address and port (none come back across a diode), and
/// its receive buffer is the smallest the kernel allows: nothing on the OT network can queue
/// data in it.
fn link_socket(
    lane: &config::Lane,
    send_buffer_bytes: usize,
) -> Result<(std::net::UdpSocket, quinn_udp::UdpSocketState), StartError> {
    let error = diode_common::metrics::BindError::of("the link socket", lane.bind);
    let socket = udp_socket(lane.bind, Buffer::Send, send_buffer_bytes).map_err(error)?;
    socket.connect(lane.destination).map_err(error)?;
    let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(0);
    let udp = quinn_udp::UdpSocketState::new((&socket).into()).map_err(error)?;
    // quinn-udp leaves the socket non-blocking; blocking sends are the link thread's
    // backpressure.
    socket.set_nonblocking(false).map_err(error)?;
    Ok((socket, udp))
}

/// What the bulk topics' queue may hold.
const BULK_QUEUE_BYTES: usize = 4 << 20;

/// How much encoded data bulk records may put ahead of a live one: 10 ms of the link's ceiling,
/// at least 64 KiB (so a slow link still moves a chunk at a time) and at most 1 MiB (a ceiling
/// far above what the link really carries must not let a file queue seconds ahead of a PLC's
/// records), and never more than half the encoder's queue.
fn bulk_room_bytes(rate_mbps: f64, max_queued_bytes: usize) -> usize {
    let ten_ms = (rate_mbps * 1e6 / 8.0 * 0.010) as usize;
    ten_ms.clamp(64 << 10, 1 << 20).min(max_queued_bytes / 2)
}

/// Binds everything (so a taken port fails here), then runs until `shutdown`.
/// Must be called from within a tokio runtime.
pub async fn start(loaded: Loaded, shutdown: Shutdown) -> Result<RunningSender, StartError> {
    let config = loaded.config;
    let link = &config.link;
    // Later sessions have larger ids: start time in milliseconds, then 20 random bits
    // (wire-format.md §1), so an authenticated receiver never goes back to an older one.
    let start_ms = (unix_time_us() / 1000).max(1) as u64;
    let session_id = (start_ms << 20) | (rand::random::<u64>() & 0xF_FFFF);
    let now = Instant::now();
    let start_us = unix_time_us();
    // One encoder a lane, all in one session: each lane numbers its own blocks and announces
    // its own topics (wire-format.md §7).
    let mut encoders = loaded
        .lanes
        .iter()
        .map(|lane| {
            Encoder::new(
                EncoderConfig {
                    session_id,
                    mtu_bytes: link.mtu_bytes,
                    data_shards: link.data_shards,
                    parity_shards: link.parity_shards,
                    design: link.design(),
                    repair_delay: link.repair_delay(),
                    interleave_depth: link.interleave_depth,
                    flush_interval: link.flush_interval(),
                    heartbeat_interval: link.heartbeat_interval(),
                    session_start_time_us: start_us,
                    key: loaded.key.as_ref().map(diode_wire::LinkKey::new),
                    encrypt: link.encrypt,
                    rate_mbps: Some(lane.rate_mbps),
                },
                now,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;

    let mut registry = Registry::default();
    let metrics = SenderMetrics::new(&mut registry);
    metrics.session_start_seconds.set(start_us / 1_000_000);
    let mut lanes: Vec<LaneQueues> = loaded
        .lanes
        .iter()
        .map(|lane| LaneQueues::new(link, lane.rate_mbps))
        .collect();

    let names: Vec<String> = config.topics.iter().map(|t| t.name.clone()).collect();
    let journal_error = |dir: &std::path::Path| {
        let dir = dir.display().to_string();
        move |source| StartError::Journal { dir, source }
    };
    // The journal first: its last numbers are a floor for this run's (journal.rs).
    let opened = match (&loaded.journal_dir, &config.journal) {
        (Some(dir), Some(_)) => {
            let topics: Vec<_> = names
                .iter()
                .zip(&loaded.journal_budgets)
                .map(|(name, budget)| (name.clone(), *budget, metrics.journal(name)))
                .collect();
            let (writer, handle, floor) =
                journal::open_writer(dir, &topics, metrics.journal_errors.clone())
                    .map_err(journal_error(dir))?;
            // A sender that kept its numbers in link.state_file before it had a journal goes
            // on from them too.
            let mut floor = floor;
            if let Some(file) = &loaded.sequences_file {
                if file.exists() {
                    let (_, kept) = journal::Sequences::open_file(file, &names, &floor)
                        .map_err(journal_error(file))?;
                    floor = kept;
                }
            }
            let (sequences, first) =
                journal::Sequences::open(dir, &names, &floor).map_err(journal_error(dir))?;
            Some((writer, handle, sequences, first))
        }
        _ => None,
    };
    // Without a journal, `link.state_file` alone keeps the numbers; a thread of its own makes
    // the reservations ahead, as the journal's writer does.
    let (opened, sequences, first_seqs) = match opened {
        Some((mut writer, handle, sequences, first)) => {
            let shared = journal::SharedSequences::new(sequences);
            writer.sequences = Some(shared.clone());
            (Some((writer, handle)), Some(shared), first)
        }
        None => match &loaded.sequences_file {
            Some(path) => {
                let (sequences, first) =
                    journal::Sequences::open_file(path, &names, &vec![0; names.len()])
                        .map_err(journal_error(path))?;
                let shared = journal::SharedSequences::new(sequences);
                let (reserver, stop) = (shared.clone(), shutdown.clone());
                std::thread::Builder::new()
                    .name("diode-sequences".into())
                    .spawn(move || {
                        let mut failing = false;
                        while !stop.is_triggered() {
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            match reserver.extend_wanted(Instant::now()) {
                                Ok(()) => failing = false,
                                // Once per failure, not every 50 ms: the link thread logs
                                // every second while it lasts.
                                Err(e) if !failing => {
                                    failing = true;
                                    tracing::error!(error = %e, "cannot reserve sequence numbers");
                                }
                                Err(_) => {}
                            }
                        }
                    })
                    .map_err(StartError::Thread)?;
                (None, Some(shared), first)
            }
            None => {
                tracing::warn!(
                    "no link.state_file and no [journal]: sequence numbers start at 0 again with \
                     each run, so (topic, seq) does not name one record for good"
                );
                (None, None, vec![0; names.len()])
            }
        },
    };

    let limits = encoders[0].limits();
    let mut tasks = Vec::new();
    let mut source_addrs = Vec::new();
    for (global, ((topic, source), first_seq)) in config
        .topics
        .iter()
        .zip(&loaded.sources)
        .zip(&first_seqs)
        .enumerate()
    {
        let id = encoders[topic.lane]
            .add_topic_from(&topic.name, *first_seq)
            .map_err(|e| StartError::Topic(topic.name.clone(), e))?;
        let lane = &mut lanes[topic.lane];
        let tm = metrics.topic(&topic.name);
        lane.topic_metrics.push(tm.clone());
        lane.globals.push(global);
        let (queue, budget, queued_ahead_bytes) = if source.source.bulk() {
            (
                lane.bulk_tx.clone(),
                lane.bulk_budget.clone(),
                lane.bulk_budget.capacity() + lane.bulk_room,
            )
        } else {
            (
                lane.queue_tx.clone(),
                lane.budget.clone(),
                link.queue_bytes + link.max_queued_bytes,
            )
        };
        let ctx = SourceContext {
            link: lane.waker.clone(),
            topic: id,
            name: Arc::from(topic.name.as_str()),
            queue,
            budget,
            metrics: tm,
            sender_metrics: metrics.clone(),
            rate: topic
                .rate_mbps
                .map(|mbps| Arc::new(rate::TopicRate::new(mbps))),
            max_record_bytes: link.max_record_bytes,
            queued_ahead_bytes,
            limits,
            shutdown: shutdown.clone(),
        };
        let started = source.source.start(ctx).map_err(|e| StartError::Source {
            what: format!("the {} source of topic {}", source.kind, topic.name),
            source: e,
        })?;
        if let Some(local) = started.local_addr {
            source_addrs.push((topic.name.clone(), local));
        }
        tasks.push(started.task);
    }

    let sockets = loaded
        .lanes
        .iter()
        .map(|lane| link_socket(lane, link.send_buffer_bytes))
        .collect::<Result<Vec<_>, _>>()?;

    let registry = Arc::new(registry);
    let board = diode_common::status::Board::new(&metrics::STATUS, registry.clone());
    board.set_notes(diode_common::status::Notes {
        facts: vec![
            ("Session".into(), format!("{session_id:016x}")),
            (
                "Destination".into(),
                loaded
                    .lanes
                    .iter()
                    .enumerate()
                    .map(|(i, lane)| match loaded.lanes.len() {
                        1 => lane.destination.to_string(),
                        _ => format!("lane {i}: {}", lane.destination),
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            (
                "Link ceiling".into(),
                loaded
                    .lanes
                    .iter()
                    .map(|lane| format!("{} Mb/s", lane.rate_mbps))
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            (
                "Heartbeat".into(),
                format!("every {} ms", link.heartbeat_interval_ms),
            ),
            (
                "Authentication".into(),
                match (&loaded.key, link.encrypt) {
                    (None, _) => "none".into(),
                    (Some(_), false) => "HMAC-SHA256".into(),
                    (Some(_), true) => "HMAC-SHA256, AES-256-GCM".into(),
                },
            ),
            (
                "Journal".into(),
                loaded
                    .journal_dir
                    .as_ref()
                    .map_or("none".into(), |d| d.display().to_string()),
            ),
        ],
        ..Default::default()
    });
    let metrics_addr = diode_common::metrics::serve_if_configured(
        loaded.metrics_listen,
        registry.clone(),
        board.clone(),
        shutdown.clone(),
    )
    .await?;

    let lane_topics: Vec<&[usize]> = lanes.iter().map(|lane| lane.globals.as_slice()).collect();
    let (journals, writer) = match (&loaded.journal_dir, opened, &config.journal) {
        (Some(dir), Some((writer, handle)), Some(settings)) => {
            let (journals, writer) = start_journal(
                dir,
                (writer, handle),
                settings,
                &loaded.journal_budgets,
                &config.topics,
                &lane_topics,
                &metrics,
                &shutdown,
            )?;
            (journals.into_iter().map(Some).collect(), Some(writer))
        }
        _ => (lanes.iter().map(|_| None).collect::<Vec<_>>(), None),
    };

    for task in tasks {
        tokio::spawn(task);
    }
    let closing = link::LanesClosing::new(lanes.len(), first_seqs, sequences.clone(), writer);
    let mut done = Vec::new();
    for (index, ((lane, (socket, udp)), (encoder, journal))) in lanes
        .into_iter()
        .zip(sockets)
        .zip(encoders.into_iter().zip(journals))
        .enumerate()
    {
        // Only the sources hold the queues now: when they stop, the link thread drains and
        // stops.
        let LaneQueues {
            queue_tx,
            queue_rx,
            bulk_tx,
            bulk_rx,
            bulk_room,
            topic_metrics,
            globals,
            waker,
            ..
        } = lane;
        drop((queue_tx, bulk_tx));
        let thread = link::LinkThread {
            lane: index,
            encoder,
            socket,
            udp,
            destination: loaded.lanes[index].destination,
            queue: queue_rx,
            bulk: bulk_rx,
            bulk_room_bytes: bulk_room,
            max_queued_bytes: link.max_queued_bytes,
            metrics: metrics.clone(),
            lane_metrics: metrics.lane(index),
            topics: topic_metrics,
            globals,
            shutdown: shutdown.clone(),
            batch: Vec::with_capacity(64 * 1024),
            journal,
            sequences: sequences.clone(),
            closing: closing.clone(),
            closed: false,
            reserve_failed: None,
            waker,
        };
        done.push(
            diode_common::spawn_link_thread(move || thread.run()).map_err(StartError::Thread)?,
        );
    }

    if let Some(needed) = protected_rate_shortfall(&config) {
        tracing::warn!(
            needed_mbps = needed,
            rate_mbps = link.rate_mbps,
            "the topics' rate ceilings, with parity and outage protection, need more than the \
             link's rate_mbps: at full rate the link queue fills and sources are slowed or drop"
        );
    }
    tracing::info!(
        session = format_args!("{session_id:016x}"),
        destination = %loaded.lanes[0].destination,
        lanes = loaded.lanes.len(),
        rate_mbps = link.rate_mbps,
        topics = config.topics.len(),
        authenticated = loaded.key.is_some(),
        "sender started"
    );
    Ok(RunningSender {
        session_id,
        metrics_addr,
        source_addrs,
        registry,
        done,
    })
}

/// Opens the journal, starts its writer and the replayer, and returns each lane's link thread's
/// end; `lane_topics` is each lane's topics, by configuration index in the lane's own order.
#[allow(clippy::too_many_arguments)]
fn start_journal(
    dir: &std::path::Path,
    (writer, handle): (journal::JournalWriter, journal::JournalHandle),
    settings: &config::JournalConfig,
    budgets: &[Option<journal::Budget>],
    topics: &[config::TopicConfig],
    lane_topics: &[&[usize]],
    metrics: &SenderMetrics,
    shutdown: &Shutdown,
) -> Result<(Vec<link::LinkJournal>, std::thread::JoinHandle<()>), StartError> {
    let names: Vec<&str> = topics.iter().map(|t| t.name.as_str()).collect();
    let lane_of: Vec<usize> = topics.iter().map(|t| t.lane).collect();
    let writer = std::thread::Builder::new()
        .name("diode-journal".into())
        .spawn(move || writer.run())
        .map_err(StartError::Thread)?;
    let (replay_tx, replay_rx): (Vec<_>, Vec<_>) =
        lane_topics.iter().map(|_| flume::bounded(1024)).unzip();
    let replayer = replay::Replayer {
        root: dir.to_owned(),
        topics: names
            .iter()
            .zip(budgets)
            .map(|(name, budget)| (name.to_string(), budget.is_some()))
            .collect(),
        out: replay_tx,
        lane_of: lane_of.clone(),
        rate_mbps: settings.replay_rate_mbps,
        backfill: (settings.backfill_window_secs > 0).then(|| replay::Backfill {
            window: std::time::Duration::from_secs(settings.backfill_window_secs),
            rate_mbps: settings.backfill_rate_mbps,
        }),
        shutdown: shutdown.clone(),
        metrics: metrics.replay.clone(),
    };
    std::thread::Builder::new()
        .name("diode-replay".into())
        .spawn(move || replayer.run())
        .map_err(StartError::Thread)?;
    tracing::info!(
        dir = %dir.display(),
        topics = budgets.iter().filter(|b| b.is_some()).count(),
        backfill_window_secs = settings.backfill_window_secs,
        "journal open"
    );
    let names: Vec<Arc<str>> = names.iter().map(|n| Arc::from(*n)).collect();
    let journals = replay_rx
        .into_iter()
        .zip(lane_topics)
        .map(|(replay, globals)| {
            let mut local_ids = vec![None; names.len()];
            for (local, global) in globals.iter().enumerate() {
                local_ids[*global] = Some(diode_wire::TopicId::from_index(local));
            }
            link::LinkJournal {
                names: names.clone(),
                handle: handle.clone(),
                replay,
                local_ids,
            }
        })
        .collect();
    Ok((journals, writer))
}

/// With every topic capped (`rate_mbps`) and outage protection on, the wire rate those caps can
/// take when they all run full, if it is above the link's `rate_mbps`.
fn protected_rate_shortfall(config: &config::SenderConfig) -> Option<f64> {
    let link = &config.link;
    if link.outage_protection_ms == 0 {
        return None;
    }
    let ceilings: Option<Vec<(usize, f64)>> = config
        .topics
        .iter()
        .map(|t| Some((t.lane, t.rate_mbps?)))
        .collect();
    let ceilings = ceilings?;
    // Lane by lane: each is paced on its own.
    (0..=link.lanes.len()).find_map(|lane| {
        let needed = ceilings
            .iter()
            .filter(|(l, _)| *l == lane)
            .map(|(_, rate)| rate)
            .sum::<f64>()
            * link.full_block_wire_factor();
        (needed > link.lane_rate_mbps(lane)).then_some(needed)
    })
}

/// A readable summary of what a configuration would do, for `diode-send check`.
pub fn describe(loaded: &Loaded) -> String {
    let link = &loaded.config.link;
    let shard = link.shard_bytes();
    let mut out = format!(
        "link: {} at most {} Mb/s, MTU {} ({} bytes a shard)\n\
         fec: {} data + {} parity shards a full block ({} bytes of records), interleaved {} blocks deep;\n     \
         survives {} lost datagrams per block, {:.0}% parity overhead\n\
         timing: partial blocks leave within {} ms, heartbeat every {} ms\n",
        loaded
            .lanes
            .iter()
            .enumerate()
            .map(|(i, lane)| {
                let name = if loaded.lanes.len() > 1 {
                    format!("lane {i} ")
                } else {
                    String::new()
                };
                format!("{name}{} -> {}", lane.bind, lane.destination)
            })
            .collect::<Vec<_>>()
            .join(", "),
        link.rate_mbps,
        link.mtu_bytes,
        shard,
        link.data_shards,
        link.parity_shards,
        link.block_capacity_bytes(),
        link.interleave_depth,
        link.parity_shards,
        100.0 * link.parity_shards as f64 / link.data_shards as f64,
        link.flush_interval_ms,
        link.heartbeat_interval_ms,
    );
    // The parity plan (wire-format.md §3.1): what each block size gets, and what it risks.
    let design = link.design();
    let plan = diode_wire::ParityPlan::new(link.data_shards, link.parity_shards, design);
    let sizes: Vec<usize> = [1, 2, 3, 4, 8, 16, link.data_shards]
        .into_iter()
        .filter(|&k| k <= link.data_shards)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    out += &format!(
        "parity per block at the design point ({}% loss{}): {}; each lost with probability <= {:.1e}\n",
        link.design_loss_percent,
        if link.design_burst_datagrams > 0 {
            format!(", bursts of {} on partial blocks", link.design_burst_datagrams)
        } else {
            String::new()
        },
        sizes
            .iter()
            .map(|&k| format!("{k}+{}", plan.parity(k)))
            .collect::<Vec<_>>()
            .join(" "),
        plan.target()
    );
    if link.outage_protection_ms > 0 {
        out += &format!(
            "outage protection: any outage up to {} ms loses nothing; each block's repair shards \
             follow it {} ms later (twice the wire bytes)\n",
            link.outage_protection_ms,
            link.repair_delay().as_millis(),
        );
        if let Some(needed) = protected_rate_shortfall(&loaded.config) {
            out += &format!(
                "warning: the topics' rate ceilings need {needed:.1} Mb/s on the wire with \
                 protection, above rate_mbps {}\n",
                link.rate_mbps
            );
        }
    }
    out += &match &loaded.key {
        Some(key) => format!(
            "auth: HMAC-SHA256 on every datagram, key id {}{}\n",
            diode_wire::LinkKey::new(key).id(),
            if link.encrypt {
                "; blocks encrypted with AES-256-GCM"
            } else {
                ""
            }
        ),
        None => "auth: none (set link.key_file: see docs/wire-format.md §2.1)\n".to_owned(),
    };
    out += &match (&loaded.journal_dir, &loaded.config.journal) {
        (Some(dir), Some(journal)) => {
            let journaled = loaded.journal_budgets.iter().flatten().count();
            format!(
                "journal: {} ({journaled} of {} topics; sequence numbers go on across restarts); \
                 replay at most {} Mb/s{}\n",
                dir.display(),
                loaded.config.topics.len(),
                journal.replay_rate_mbps,
                if journal.backfill_window_secs > 0 {
                    format!(
                        ", continuous backfill of the last {} s at most {} Mb/s",
                        journal.backfill_window_secs, journal.backfill_rate_mbps
                    )
                } else {
                    String::new()
                }
            )
        }
        _ => format!(
            "journal: none (records lost on the way cannot be sent again: see docs/backfill.md); \
             sequence numbers {}\n",
            match &loaded.sequences_file {
                Some(file) => format!("kept in {} across restarts", file.display()),
                None => "start at 0 with each run (set link.state_file)".into(),
            }
        ),
    };
    if let Some(m) = &loaded.config.metrics {
        out += &format!("metrics: http://{}/metrics\n", m.listen);
    }
    out += &format!("topics ({}):\n", loaded.config.topics.len());
    for ((topic, origin), source) in loaded
        .config
        .topics
        .iter()
        .zip(&loaded.topic_origins)
        .zip(&loaded.sources)
    {
        let source = source.source.describe();
        let ceiling = topic
            .rate_mbps
            .map(|r| format!(", at most {r} Mb/s"))
            .unwrap_or_default();
        let lane = if loaded.lanes.len() > 1 {
            format!(", lane {}", topic.lane)
        } else {
            String::new()
        };
        out += &format!(
            "  {:<24} {source}{ceiling}{lane}   ({origin})\n",
            topic.name
        );
    }
    out
}
