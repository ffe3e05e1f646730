//! The link thread: reads datagrams, feeds the reassembler, and hands its events on (events.rs).
//! It never writes to the link socket: the diode has no way back, and the receiver never tries
//! one.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use diode_common::{LogThrottle, Shutdown};
use diode_wire::{Reassembler, ReassemblerStats};
use quinn_udp::{RecvMeta, UdpSocketState, BATCH_SIZE};
use std::io::IoSliceMut;

use crate::events::Events;
use crate::metrics::ReceiverMetrics;

/// The longest the loop sleeps when no timer is due.
const IDLE_WAKE: Duration = Duration::from_millis(100);
const GAUGE_INTERVAL: Duration = Duration::from_secs(1);
/// `recvmmsg` calls per wake-up before timers and events get a turn.
const DRAIN_BATCHES: usize = 16;

pub struct LinkThread {
    /// This link thread's lane (wire-format.md §7): 0 unless `[[link.lane]]` adds more.
    pub lane: usize,
    pub lanes: std::sync::Arc<crate::lanes::Lanes>,
    pub reassembler: Reassembler,
    /// Where the replay floor is kept across restarts, and the floor last written there.
    pub state_file: Option<std::path::PathBuf>,
    pub saved: Option<crate::state::Saved>,
    /// Datagrams from other addresses are dropped unread (`link.allowed_sources`).
    pub allowed_sources: Vec<diode_common::net::SourceFilter>,
    pub socket: UdpSocket,
    /// GRO and `recvmmsg` state for `socket`.
    pub udp: UdpSocketState,
    pub events: Events,
    pub metrics: ReceiverMetrics,
    pub shutdown: Shutdown,
    /// The status page: what the metrics cannot say (session, open gaps), set once a second.
    pub board: std::sync::Arc<diode_common::status::Board>,
    /// Per route: name, topics, sink and disk buffer as configured, for the page.
    pub route_notes: Vec<Vec<String>>,
}

/// Per-loop state that is not configuration.
struct Scratch {
    /// Datagrams this lane refused for their source address (`allowed_sources`), for its
    /// security events; the exported counter is every lane's.
    refused_source: prometheus_client::metrics::counter::Counter,
    /// Datagrams this lane dropped, for any reason.
    lane_rejected: prometheus_client::metrics::counter::Counter,
    /// This lane's share of the gauges every lane adds to.
    gaps_open: i64,
    inflight_bytes: i64,
    last_stats: ReassemblerStats,
    rcvbuf_seen: u64,
    next_gauges: Instant,
}

impl LinkThread {
    /// Runs until shutdown. Reads are driven by a single-threaded runtime of the thread's own:
    /// readiness, then `recvmmsg` batches of up to 32 buffers, each holding up to 64 datagrams
    /// coalesced by GRO.
    pub fn run(self) {
        // With several lanes, each link thread's lines say which; one lane logs as it always has.
        let _lane = (self.lanes.count() > 1)
            .then(|| tracing::info_span!("lane", lane = self.lane).entered());
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the link thread's runtime");
                return;
            }
        };
        runtime.block_on(self.run_loop());
    }

    async fn run_loop(mut self) {
        let socket = match self.socket.try_clone().and_then(|s| {
            s.set_nonblocking(true)?;
            tokio::net::UdpSocket::from_std(s)
        }) {
            Ok(socket) => socket,
            Err(e) => {
                tracing::error!(error = %e, "cannot register the link socket");
                return;
            }
        };
        let segments = self.udp.gro_segments().max(1);
        let mut buffers: Vec<Vec<u8>> = (0..BATCH_SIZE)
            .map(|_| vec![0u8; (segments * 1500).max(65_536)])
            .collect();
        let mut metas = vec![RecvMeta::default(); BATCH_SIZE];
        let shutdown = self.shutdown.clone();
        let refused_source =
            self.metrics
                .datagrams_rejected
                .get_or_create_owned(&crate::metrics::ReasonLabels {
                    reason: "source".to_owned(),
                });
        let lane_labels = crate::metrics::LaneLabels {
            lane: self.lane.to_string(),
        };
        let lane_received = self
            .metrics
            .lane_datagrams_received
            .get_or_create_owned(&lane_labels);
        let mut scratch = Scratch {
            refused_source: Default::default(),
            lane_rejected: self
                .metrics
                .lane_datagrams_rejected
                .get_or_create_owned(&lane_labels),
            gaps_open: 0,
            inflight_bytes: 0,
            last_stats: ReassemblerStats::default(),
            rcvbuf_seen: diode_common::net::udp_rcvbuf_errors().unwrap_or(0),
            next_gauges: Instant::now(),
        };
        loop {
            let wake = self
                .reassembler
                .poll_timeout()
                .unwrap_or_else(|| Instant::now() + IDLE_WAKE)
                .min(Instant::now() + IDLE_WAKE);
            tokio::select! {
                _ = shutdown.wait() => {
                    self.exchange_with_other_lanes(true);
                    self.save_state(self.reassembler.open_gaps());
                    // What the last, unfinished interval rejected or lost is reported too.
                    let refused = scratch.refused_source.get();
                    self.events
                        .security_tick(Instant::now(), self.reassembler.stats(), refused, true);
                    self.events.router.flush();
                    return;
                }
                _ = tokio::time::sleep_until(wake.into()) => {}
                ready = socket.readable() => {
                    if let Err(e) = ready {
                        tracing::warn!(error = %e, "link socket failed");
                        tokio::time::sleep(IDLE_WAKE).await;
                    }
                    // Drain what the kernel holds, then see to timers and events.
                    for _ in 0..DRAIN_BATCHES {
                        let mut slices: Vec<IoSliceMut<'_>> = buffers.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                        let received = socket.try_io(tokio::io::Interest::READABLE, || {
                            self.udp.recv((&socket).into(), &mut slices, &mut metas)
                        });
                        let count = match received {
                            Ok(count) => count,
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                            Err(e) => {
                                tracing::warn!(error = %e, "link socket read failed");
                                break;
                            }
                        };
                        let now = Instant::now();
                        for (meta, buffer) in metas.iter().zip(&buffers).take(count) {
                            let stride = meta.stride.max(1);
                            let allowed = diode_common::net::SourceFilter::allows(&self.allowed_sources, meta.addr);
                            let datagrams = meta.len.div_ceil(stride) as u64;
                            self.metrics.datagrams_received.inc_by(datagrams);
                            lane_received.inc_by(datagrams);
                            for datagram in buffer[..meta.len].chunks(stride) {
                                if allowed {
                                    let _ = self.reassembler.handle_datagram(now, datagram);
                                } else {
                                    refused_source.inc();
                                    scratch.refused_source.inc();
                                    scratch.lane_rejected.inc();
                                }
                            }
                        }
                        self.after_input(&mut scratch);
                    }
                }
            }
            self.after_input(&mut scratch);
        }
    }

    /// Topics moved between lanes (wire-format.md §7): the gaps a topic brings here are
    /// reported at once, with the topic's other losses. `stopping`: the last pass.
    fn exchange_with_other_lanes(&mut self, stopping: bool) {
        self.events.lane.exchange(&mut self.reassembler, stopping);
        while let Some(event) = self.reassembler.poll_event() {
            self.events.handle(event);
        }
    }

    /// Timers, events, metrics: after every batch of input and every wake-up.
    fn after_input(&mut self, scratch: &mut Scratch) {
        let now = Instant::now();
        self.reassembler.handle_timeout(now);
        // Counted before the events are handled, so that a heartbeat compares its sender's
        // counts with every datagram read before it (diode_link_loss_ratio).
        let stats = self.reassembler.stats();
        if stats != &scratch.last_stats {
            self.metrics.add_stats(stats, &scratch.last_stats);
            scratch
                .lane_rejected
                .inc_by(stats.rejected_total() - scratch.last_stats.rejected_total());
            scratch.last_stats = stats.clone();
        }
        while let Some(event) = self.reassembler.poll_event() {
            self.events.handle(event);
        }
        self.events.end_pass(now);
        if now >= scratch.next_gauges {
            scratch.next_gauges = now + GAUGE_INTERVAL;
            // Listed once a second, for the state file and the status page both.
            self.exchange_with_other_lanes(false);
            let gaps = self.reassembler.open_gaps();
            // The status page is lane 0's, with every lane's state, gaps and topics.
            if self.lanes.count() == 1 {
                self.update_board(&gaps, None);
            } else {
                self.lanes.set_gaps(self.lane, gaps.clone());
                self.lanes
                    .set_last_records(self.lane, self.events.status_notes().1);
                if self.lane == 0 {
                    let records = self.lanes.all_last_records();
                    self.update_board(&self.lanes.all_gaps(), Some(records));
                }
            }
            self.save_state(gaps);
            let refused = scratch.refused_source.get();
            self.events
                .security_tick(now, self.reassembler.stats(), refused, false);
            self.events.router.flush();
            // Every lane adds what its own share moved by.
            let gaps_open = self.reassembler.open_gap_count() as i64;
            self.metrics.gaps_open.inc_by(gaps_open - scratch.gaps_open);
            scratch.gaps_open = gaps_open;
            let inflight = self.reassembler.inflight_bytes() as i64;
            self.metrics
                .inflight_bytes
                .inc_by(inflight - scratch.inflight_bytes);
            scratch.inflight_bytes = inflight;
            // The host's count, not the lane's: lane 0 alone reports it.
            let host_drops = (self.lane == 0)
                .then(diode_common::net::udp_rcvbuf_errors)
                .flatten();
            if let Some(errors) = host_drops {
                if errors > scratch.rcvbuf_seen {
                    tracing::warn!(
                        dropped = errors - scratch.rcvbuf_seen,
                        "the kernel dropped UDP datagrams for a full receive buffer; \
                         raise link.receive_buffer_bytes and net.core.rmem_max"
                    );
                    self.metrics
                        .kernel_rcvbuf_errors
                        .inc_by(errors - scratch.rcvbuf_seen);
                    scratch.rcvbuf_seen = errors;
                }
            }
        }
    }

    /// `last_records`: every lane's topics, when there are several.
    fn update_board(
        &self,
        open: &[(std::sync::Arc<str>, diode_wire::OpenGap)],
        last_records: Option<Vec<Vec<String>>>,
    ) {
        let gaps: Vec<_> = open
            .iter()
            .map(|(topic, g)| (topic, g.first_seq, g.last_seq, g.after_us, g.before_us))
            .collect();
        let (gaps, gaps_total) = diode_common::status::gap_lines(&gaps);
        let session = self
            .reassembler
            .session_id()
            .map_or("none yet".to_owned(), |id| format!("{id:016x}"));
        let (link, own_records) = self.events.status_notes();
        let last_records = last_records.unwrap_or(own_records);
        let mut facts = vec![(
            "Link".to_owned(),
            link.unwrap_or_else(|| "no datagram yet".into()),
        )];
        if self.lanes.count() > 1 {
            facts.push(("Lanes".to_owned(), self.lanes.describe()));
        }
        facts.extend([
            ("Sender session".to_owned(), session),
            (
                "Sender".to_owned(),
                self.events
                    .sender_notes()
                    .unwrap_or_else(|| "no heartbeat yet".into()),
            ),
            (
                "State file".to_owned(),
                self.state_file
                    .as_ref()
                    .map_or("none: gaps are not kept across restarts".into(), |p| {
                        p.display().to_string()
                    }),
            ),
        ]);
        let tables = vec![
            diode_common::status::NoteTable {
                title: "Last record per topic".into(),
                columns: vec!["topic".into(), "seq".into(), "taken in".into()],
                rows: last_records,
            },
            diode_common::status::NoteTable {
                title: "Routes and their sinks".into(),
                columns: vec![
                    "route".into(),
                    "topics".into(),
                    "sink".into(),
                    "disk buffer".into(),
                    "state".into(),
                    "last error".into(),
                ],
                rows: self
                    .route_notes
                    .iter()
                    .zip(self.events.router.sink_health())
                    .map(|(note, health)| {
                        let mut row = note.clone();
                        let since = |us: i64| diode_common::format_rfc3339_us(us);
                        row.push(match (health.failing, health.since_us) {
                            (_, 0) => "nothing delivered yet".into(),
                            (true, at) => format!("failing since {}", since(at)),
                            (false, at) => format!("delivering since {}", since(at)),
                        });
                        row.push(
                            health
                                .last_error
                                .map_or("none".into(), |(at, e)| format!("{}: {e}", since(at))),
                        );
                        row
                    })
                    .collect(),
            },
        ];
        self.board.set_notes(diode_common::status::Notes {
            facts,
            gaps,
            gaps_total,
            tables,
        });
    }

    /// Writes the replay floor, the topics' marks and the open gaps when they moved (once a
    /// second at most, and at a clean stop).
    fn save_state(&mut self, gaps: Vec<(std::sync::Arc<str>, diode_wire::OpenGap)>) {
        let Some(path) = &self.state_file else {
            return;
        };
        let saved = crate::state::Saved {
            floor: self.reassembler.replay_floor(),
            watermarks: self.reassembler.watermarks(),
            gaps,
        };
        // Nothing to keep and nothing kept yet (a first start): no file. Once there is one,
        // it follows the state, down to empty, so filled gaps never come back after a restart.
        let empty = saved.floor.is_none() && saved.watermarks.is_empty() && saved.gaps.is_empty();
        if empty && self.saved.is_none() && !path.exists() {
            return;
        }
        if self.saved.as_ref() == Some(&saved) {
            return;
        }
        match crate::state::save(path, &saved) {
            Ok(()) => self.saved = Some(saved),
            Err(e) => {
                static FAILED: LogThrottle = LogThrottle::new(Duration::from_secs(60));
                if let Some(folded) = FAILED.allow() {
                    tracing::error!(error = %e, folded, "cannot keep the replay floor");
                }
            }
        }
    }
}
