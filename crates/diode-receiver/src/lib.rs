//! `diode-recv`, the IT side: datagrams from the diode are checked and rebuilt into ordered
//! records (`diode-wire`), which routes hand to sinks. It never sends anything towards the link.
//!
//! ```text
//! diode ─► UDP socket ─► link thread: Reassembler ─► Router (topic filters) ─► bounded queue ─► route task: sink
//! ```

pub mod buffer;
pub mod config;
pub mod events;
pub mod filter;
pub mod lanes;
pub mod link;
pub mod metrics;
pub mod route;
pub mod security;
pub mod sinks;
pub mod state;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use diode_common::net::{udp_socket, Buffer};
use diode_common::Shutdown;
use diode_wire::{Reassembler, ReassemblerConfig};
use prometheus_client::registry::Registry;
use thiserror::Error;

use crate::config::Loaded;
use crate::link::LinkThread;
use crate::metrics::ReceiverMetrics;

/// How long sinks may take to write out their queues on a clean stop.
const SINK_DRAIN_LIMIT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] diode_common::metrics::BindError),
    #[error("cannot start the link thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Route(#[from] route::RouteStartError),
    #[error("link.state_file: {0}")]
    State(#[from] state::StateError),
}

pub struct RunningReceiver {
    /// Lane 0's socket address as bound.
    pub link_addr: SocketAddr,
    /// Every lane's, lane 0 first.
    pub lane_addrs: Vec<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    pub registry: Arc<Registry>,
    done: Vec<tokio::sync::oneshot::Receiver<()>>,
    sinks: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningReceiver {
    /// Resolves when every lane's link thread has stopped and the sinks have written out their
    /// queues.
    pub async fn finished(self) {
        for done in self.done {
            let _ = done.await;
        }
        // Each task drains on its own; awaiting them in turn waits for the slowest.
        let drain = async {
            for sink in self.sinks {
                let _ = sink.await;
            }
        };
        if tokio::time::timeout(SINK_DRAIN_LIMIT, drain).await.is_err() {
            tracing::warn!("sinks did not finish writing out their queues in time");
        }
    }
}

/// Binds the link socket and the metrics endpoint, starts the sinks and the link thread.
/// Must be called from within a tokio runtime.
pub async fn start(mut loaded: Loaded, shutdown: Shutdown) -> Result<RunningReceiver, StartError> {
    let link = &loaded.config.link;
    let sockets = loaded
        .lanes
        .iter()
        .map(|listen| link_socket(*listen, link.receive_buffer_bytes))
        .collect::<Result<Vec<_>, _>>()?;
    let lane_addrs: Vec<SocketAddr> = sockets.iter().map(|(_, _, addr)| *addr).collect();
    let link_addr = lane_addrs[0];

    let mut registry = Registry::default();
    let metrics = ReceiverMetrics::new(&mut registry);
    let registry = Arc::new(registry);
    let board = diode_common::status::Board::new(&metrics::STATUS, registry.clone());
    let metrics_addr = diode_common::metrics::serve_if_configured(
        loaded.metrics_listen,
        registry.clone(),
        board.clone(),
        shutdown.clone(),
    )
    .await?;

    let configured_routes = loaded.config.routes.len();
    let route_notes: Vec<Vec<String>> = loaded
        .routes
        .iter()
        .zip(&loaded.config.routes)
        .map(|(route, raw)| {
            vec![
                route.name.clone(),
                raw.topics.join(", "),
                route.sink.settings.describe(),
                route
                    .buffer
                    .as_ref()
                    .map_or("none".into(), |(dir, max, _)| {
                        format!("{} (up to {max} bytes)", dir.display())
                    }),
            ]
        })
        .collect();
    let routes = std::mem::take(&mut loaded.routes);
    let (router, sinks) = route::Router::start(routes, &metrics)?;

    if loaded.keys.is_empty() {
        tracing::warn!(listen = %link_addr,
            "no link key: anyone who can reach this port can inject datagrams, and forged records \
             would be delivered as plant data; set link.key_file on both sides (diode-send keygen)");
    }
    if loaded.state_file.is_none() {
        tracing::warn!(
            "no link.state_file: after a restart this receiver cannot report what was lost \
             while it was down, nor refuse a replay of records it already delivered"
        );
    }
    let lanes = lanes::Lanes::new(sockets.len(), !loaded.keys.is_empty(), &metrics);
    let security_seq: Arc<std::sync::Mutex<u64>> = Arc::default();
    let mut done = Vec::new();
    for (index, (socket, udp, _)) in sockets.into_iter().enumerate() {
        let state_file = loaded.state_file(index);
        let (reassembler, saved) = lane_reassembler(&loaded, state_file.as_deref())?;
        // Each lane compares its own sender's counts with what it received itself
        // (diode_link_loss_ratio); every other counter is the link's, summed over lanes.
        let mut lane_metrics = metrics.clone();
        lane_metrics.datagrams_valid = Default::default();
        let mut events = events::Events::new(
            router.for_lane(),
            lane_metrics.clone(),
            link.max_topics,
            security::SecurityEvents::new(
                loaded.security_route,
                security_seq.clone(),
                (loaded.lanes.len() > 1).then_some(index),
            ),
            lanes::Lane::new(index, lanes.clone(), &metrics),
        );
        if index == 0 {
            let message = format!(
                "started: listening on {}, {} routes, link authenticated: {}, \
                 allowed sources: {}",
                lane_addrs
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                configured_routes,
                !loaded.keys.is_empty(),
                if loaded.allowed_sources.is_empty() {
                    "any".to_owned()
                } else {
                    format!("{}", loaded.allowed_sources.len())
                }
            );
            events.security_event(security::Kind::Config, message);
            events.router.flush();
        }
        let thread = LinkThread {
            lane: index,
            lanes: lanes.clone(),
            reassembler,
            state_file,
            saved,
            allowed_sources: loaded.allowed_sources.clone(),
            socket,
            udp,
            events,
            metrics: lane_metrics,
            shutdown: shutdown.clone(),
            board: board.clone(),
            route_notes: route_notes.clone(),
        };
        // When every lane's loop has ended, the route queues are gone, which lets the sinks
        // drain and stop.
        done.push(
            diode_common::spawn_link_thread(move || thread.run()).map_err(StartError::Thread)?,
        );
    }
    drop(router);
    tracing::info!(listen = %link_addr, lanes = lane_addrs.len(), authenticated = !loaded.keys.is_empty(), "receiver started");
    Ok(RunningReceiver {
        link_addr,
        lane_addrs,
        metrics_addr,
        registry,
        done,
        sinks,
    })
}

/// A lane's link socket, bound, and its address as bound.
fn link_socket(
    listen: SocketAddr,
    receive_buffer_bytes: usize,
) -> Result<(std::net::UdpSocket, quinn_udp::UdpSocketState, SocketAddr), StartError> {
    let error = diode_common::metrics::BindError::of("the link socket", listen);
    let socket = udp_socket(listen, Buffer::Receive, receive_buffer_bytes).map_err(error)?;
    let udp = quinn_udp::UdpSocketState::new((&socket).into()).map_err(error)?;
    let bound = socket.local_addr().unwrap_or(listen);
    Ok((socket, udp, bound))
}

/// A lane's reassembler, with what its state file kept.
fn lane_reassembler(
    loaded: &Loaded,
    state_file: Option<&std::path::Path>,
) -> Result<(Reassembler, Option<state::Saved>), StartError> {
    let link = &loaded.config.link;
    let mut reassembler = Reassembler::new(ReassemblerConfig {
        max_inflight_bytes: link.max_inflight_bytes,
        block_timeout: link.block_timeout(),
        max_record_bytes: link.max_record_bytes,
        max_topics: link.max_topics,
        keys: loaded.keys.iter().map(diode_wire::LinkKey::new).collect(),
        require_encryption: link.encrypt,
        ..ReassemblerConfig::default()
    });
    // A damaged state file stops the service: starting without its floor would accept a
    // replay of delivered records.
    let saved = match state_file {
        Some(path) => state::load(path)?,
        None => None,
    };
    if let Some(saved) = &saved {
        if let Some(floor) = saved.floor {
            tracing::info!(
                session = format_args!("{:016x}", floor.session_id),
                next_block = floor.next_block,
                "replay floor restored: older sessions and delivered blocks are refused"
            );
            reassembler.restore_replay_floor(floor);
        }
        tracing::info!(
            topics = saved.watermarks.len(),
            open_gaps = saved.gaps.len(),
            "state restored: what the sender sent while this receiver was down is reported \
             lost, and replays from its journal fill the open gaps"
        );
        reassembler.restore_watermarks(saved.watermarks.iter().cloned());
        reassembler.restore_gaps(saved.gaps.iter().cloned());
    }
    Ok((reassembler, saved))
}

/// A readable summary of what a configuration would do, for `diode-recv check`.
pub fn describe(loaded: &Loaded) -> String {
    let link = &loaded.config.link;
    let mut out = format!(
        "link: listening on {} (receive buffer {} bytes), pending blocks up to {} bytes, \
         incomplete blocks given up after {} ms{}\n",
        loaded
            .lanes
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        link.receive_buffer_bytes,
        link.max_inflight_bytes,
        link.block_timeout_ms,
        if loaded.lanes.len() > 1 {
            format!(
                "; {} lanes, each with its own link thread, buffer and state",
                loaded.lanes.len()
            )
        } else {
            String::new()
        }
    );
    out += &match &loaded.keys[..] {
        [] => "auth: none: anyone who can reach the receiver's port can send it datagrams\n"
            .to_owned(),
        keys => format!(
            "auth: HMAC-SHA256, accepting key ids {}\n",
            keys.iter()
                .map(|k| diode_wire::LinkKey::new(k).id().to_string())
                .collect::<Vec<_>>()
                .join(" and ")
        ),
    };
    out += &match &loaded.state_file {
        Some(path) => format!(
            "state: {} (topics' marks and open gaps kept across restarts; `diode-recv gaps` \
             lists what is missing)\n",
            path.display()
        ),
        None => "state: none (set link.state_file: after a restart, what was sent meanwhile is \
                 not reported, and no gap can be filled by a replay)\n"
            .to_owned(),
    };
    if let Some(m) = &loaded.config.metrics {
        out += &format!("metrics: http://{}/metrics\n", m.listen);
    }
    out += &match &loaded.config.security_events {
        Some(siem) => format!(
            "security events: the log (target diode::security) and {} (MSGID DIODE_*, \
             docs/operations.md)\n",
            crate::sinks::SinkSettings::describe(siem)
        ),
        None => "security events: the log only (target diode::security; [security_events] \
                 sends them to a SIEM)\n"
            .to_owned(),
    };
    out += &format!("routes ({}):\n", loaded.config.routes.len());
    for (route, raw) in loaded.routes.iter().zip(&loaded.config.routes) {
        let sink = route.sink.settings.describe();
        out += &format!("  {:<10} {} -> {sink}\n", route.name, raw.topics.join(", "));
        out += &match &route.buffer {
            Some((dir, max, policy)) => format!(
                "             disk buffer {} up to {max} bytes, when full {policy:?}\n",
                dir.display()
            ),
            None => format!(
                "             no disk buffer: past {} bytes queued, records are dropped\n",
                route.queue_bytes
            ),
        };
    }
    out
}
