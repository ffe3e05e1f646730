//! Routes: topic filters to one sink, each with its own memory queue, optional disk buffer and
//! dead letters. This file holds all of a route: its configuration table and checks, the
//! [`Router`] the link thread hands records to (matching, byte budgets, batching, drop
//! accounting), and the [`RouteTask`] that delivers them to the sink.

use diode_common::config::default_u64;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use diode_common::budget::ByteBudget;
use diode_common::config::{ConfigError, ConfigScope};
use diode_wire::Record;
use serde::Deserialize;
use tokio::sync::OwnedSemaphorePermit;

use crate::buffer::{DiskBuffer, FullPolicy, Next, Retired};
use crate::filter::TopicFilter;
use crate::metrics::{ReceiverMetrics, RouteMetrics};
use crate::sinks::dead_letter::DeadLetters;
use crate::sinks::{CheckedSink, Refusals, Sink, SinkConfig, SinkError, SiteLimits};

/// `[[route]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The `route` label of this route's metrics; by default its index and sink kind.
    #[serde(default)]
    pub name: Option<String>,
    /// MQTT-style filters: `+` one level, `#` the rest.
    pub topics: Vec<String>,
    pub sink: SinkConfig,
    /// Bytes of records waiting for this sink, at most (each record counts 64 bytes on top of
    /// its payload); past it they are dropped and counted.
    #[serde(default = "default_queue_bytes")]
    pub queue_bytes: usize,
    /// This route's on-disk buffer (relative to this file): records the sink does not take at
    /// once are written there and read back in order, so a sink that is down or slow loses
    /// nothing and a restart replays what was not delivered.
    #[serde(default)]
    pub buffer_dir: Option<PathBuf>,
    #[serde(default = "default_u64::<{ 1 << 30 }>")]
    pub buffer_max_bytes: u64,
    /// What a full buffer gives up: `drop_oldest` (default) or `drop_newest`.
    #[serde(default)]
    pub buffer_full: FullPolicy,
    /// Where records this route's sink can never accept go (relative to this file): a topic
    /// name its protocol refuses, a datagram too large for UDP, a Kafka topic that does not exist
    /// and may not be created. JSON lines with a `reason`. By default `dead-letter.jsonl` in the
    /// route's `buffer_dir`; without either, such records are counted and logged only.
    #[serde(default)]
    pub dead_letter_file: Option<PathBuf>,
    #[serde(default = "default_u64::<{ 64 << 20 }>")]
    pub dead_letter_max_bytes: u64,
}

/// A sink stalled for 60 ms at 1 GB/s; past it a route without a disk buffer drops records
/// (counted), and a buffered route's spooler has fallen that far behind its disk.
fn default_queue_bytes() -> usize {
    64 << 20
}

/// A route, checked and resolved, ready to start.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub filters: Vec<TopicFilter>,
    pub sink: CheckedSink,
    pub queue_bytes: usize,
    /// The route's disk buffer, resolved: (directory, most bytes, policy).
    pub buffer: Option<(PathBuf, u64, FullPolicy)>,
    /// Where records the sink refuses for good are kept, and how many bytes of them at most.
    pub dead_letter: (Option<PathBuf>, u64),
}

impl RouteConfig {
    /// Checks `route[index]`, given the routes checked before it.
    pub fn check(
        &self,
        scope: &ConfigScope<'_>,
        index: usize,
        site: &SiteLimits,
        earlier: &[Route],
    ) -> Result<Route, ConfigError> {
        if self.topics.is_empty() {
            return Err(scope.invalid("topics", "lists no topic filter"));
        }
        let mut filters = Vec::new();
        for (j, filter) in self.topics.iter().enumerate() {
            filters.push(
                TopicFilter::parse(filter)
                    .map_err(|e| scope.invalid(&format!("topics[{j}]"), e))?,
            );
        }
        let sink = self.sink.check(&scope.child("sink").with_site(*site))?;
        for claim in sink.settings.claims() {
            if let Some(first) = earlier
                .iter()
                .position(|r| r.sink.settings.claims().contains(&claim))
            {
                return Err(scope.invalid(
                    "sink",
                    format!(
                        "route[{first}] runs {claim} already: give both routes' topics to one route"
                    ),
                ));
            }
        }
        if self.queue_bytes < 65_536 {
            return Err(scope.invalid("queue_bytes", "must be at least 65536"));
        }
        let name = self
            .name
            .clone()
            .unwrap_or_else(|| format!("{index}-{}", sink.kind));
        if earlier.iter().any(|r| r.name == name) {
            return Err(scope.invalid("name", format!("{name:?} is used twice")));
        }
        // It is a metric label value and a log field.
        if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
            return Err(scope.invalid(
                "name",
                "must be 1 to 64 characters, none of them a control character",
            ));
        }
        let buffer = match &self.buffer_dir {
            Some(dir) => {
                if self.buffer_max_bytes < 1 << 20 {
                    return Err(scope.invalid("buffer_max_bytes", "must be at least 1048576"));
                }
                let dir = scope.resolve(dir);
                scope.writable_dir("buffer_dir", &dir)?;
                if earlier
                    .iter()
                    .any(|r| r.buffer.as_ref().is_some_and(|b| b.0 == dir))
                {
                    return Err(scope.invalid(
                        "buffer_dir",
                        format!("{} is the buffer of another route", dir.display()),
                    ));
                }
                Some((dir, self.buffer_max_bytes, self.buffer_full))
            }
            None => None,
        };
        let dead_letter_file = match (&self.dead_letter_file, &buffer) {
            (Some(file), _) => {
                let file = scope.resolve(file);
                if let Some(dir) = file.parent() {
                    scope.writable_dir("dead_letter_file", dir)?;
                }
                Some(file)
            }
            (None, Some((dir, _, _))) => Some(dir.join("dead-letter.jsonl")),
            (None, None) => None,
        };
        Ok(Route {
            name,
            filters,
            sink,
            queue_bytes: self.queue_bytes,
            buffer,
            dead_letter: (dead_letter_file, self.dead_letter_max_bytes),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RouteStartError {
    #[error("route {route}: cannot start its sink: {source}")]
    Sink {
        route: String,
        #[source]
        source: std::io::Error,
    },
    #[error("route {route}: cannot open its disk buffer: {source}")]
    Buffer {
        route: String,
        #[source]
        source: crate::buffer::BufferError,
    },
}

/// A record waiting for a sink, holding its share of the route's byte budget.
pub struct Queued {
    pub record: Record,
    pub _budget: OwnedSemaphorePermit,
}

/// What a queued record costs on top of its payload, in the route's byte budget.
pub(crate) const QUEUED_RECORD_OVERHEAD_BYTES: usize = 64;

/// The link thread's side of the routes: which routes take a topic, and their queues.
pub struct Router {
    routes: Vec<RouteQueue>,
    /// Per topic, the routes whose filters match it. The reassembler caps distinct topics, which
    /// bounds this map.
    matches: HashMap<Arc<str>, Vec<usize>>,
}

impl Router {
    /// Each route's sink as the status page shows it: state since when, and the last error,
    /// in route order.
    pub fn sink_health(&self) -> Vec<crate::metrics::SinkHealth> {
        self.routes
            .iter()
            .map(|r| {
                r.metrics
                    .health
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
            })
            .collect()
    }
}

struct RouteQueue {
    name: String,
    filters: Vec<TopicFilter>,
    /// Deliveries: the records of one pass over the reassembler's events, so that a block's
    /// records reach the sink with one queue operation and one wake-up.
    queue: flume::Sender<Vec<Queued>>,
    budget: ByteBudget,
    /// Records of the current pass, not yet handed over.
    pending: Vec<Queued>,
    metrics: RouteMetrics,
}

impl RouteQueue {
    /// Adds a record to this pass's delivery, within the route's byte budget; past it the
    /// record is dropped, counted.
    fn offer(&mut self, record: &Record) {
        let cost = record.payload.len() + QUEUED_RECORD_OVERHEAD_BYTES;
        match self.budget.try_acquire(cost) {
            Some(budget) => self.pending.push(Queued {
                record: record.clone(),
                _budget: budget,
            }),
            None => {
                if self.metrics.dropped.inc() % 10_000 == 0 {
                    tracing::warn!(
                        route = %self.name,
                        topic = %record.topic,
                        seq = record.seq,
                        "sink queue full: dropping records (see diode_sink_dropped_total)"
                    );
                }
            }
        }
    }
}

impl Router {
    /// Opens each route's disk buffer and starts its sink task. A buffer that cannot be opened
    /// stops the service: running without it would drop records the operator asked to keep.
    /// Must be called inside the runtime.
    pub fn start(
        routes: Vec<Route>,
        metrics: &ReceiverMetrics,
    ) -> Result<(Router, Vec<tokio::task::JoinHandle<()>>), RouteStartError> {
        let mut queues = Vec::new();
        let mut tasks = Vec::new();
        for route in routes {
            // Bounded by the route's byte budget, not by the channel: each delivery holds permits.
            let (tx, rx) = flume::unbounded();
            let budget = ByteBudget::new(route.queue_bytes);
            let route_metrics = metrics.route(&route.name, budget.clone());
            if let Some((_, max_bytes, _)) = &route.buffer {
                route_metrics.buffer_max.set(*max_bytes as i64);
            }
            let buffer = match &route.buffer {
                Some((dir, max_bytes, policy)) => {
                    let buffer = DiskBuffer::open(dir, *max_bytes, *policy).map_err(|source| {
                        RouteStartError::Buffer {
                            route: route.name.clone(),
                            source,
                        }
                    })?;
                    if buffer.unread_records() > 0 {
                        tracing::info!(route = %route.name, records = buffer.unread_records(),
                            bytes = buffer.unread_bytes(), "replaying what the disk buffer kept");
                    }
                    Some(buffer)
                }
                None => None,
            };
            let task = RouteTask {
                name: route.name.clone(),
                queue: rx,
                buffer,
                dead: DeadLetters::new(route.dead_letter.0.clone(), route.dead_letter.1),
                metrics: route_metrics.clone(),
            };
            tasks.push(route.sink.settings.start(task).map_err(|source| {
                RouteStartError::Sink {
                    route: route.name.clone(),
                    source,
                }
            })?);
            queues.push(RouteQueue {
                name: route.name,
                filters: route.filters,
                queue: tx,
                budget,
                pending: Vec::new(),
                metrics: route_metrics,
            });
        }
        Ok((
            Router {
                routes: queues,
                matches: HashMap::new(),
            },
            tasks,
        ))
    }

    /// The same routes for another lane's link thread (wire-format.md §7), with deliveries of
    /// its own. A topic comes from one lane at a time (lanes.rs), so each topic's records
    /// still reach a route in order.
    pub fn for_lane(&self) -> Router {
        Router {
            routes: self
                .routes
                .iter()
                .map(|r| RouteQueue {
                    name: r.name.clone(),
                    filters: r.filters.clone(),
                    queue: r.queue.clone(),
                    budget: r.budget.clone(),
                    pending: Vec::new(),
                    metrics: r.metrics.clone(),
                })
                .collect(),
            matches: HashMap::new(),
        }
    }

    /// Adds a record to the pending delivery of every route that takes its topic; a route whose
    /// queue is full drops it, counted.
    pub fn route(&mut self, record: &Record) {
        let routes = &self.routes;
        let matching = self.matches.entry(record.topic.clone()).or_insert_with(|| {
            routes
                .iter()
                .enumerate()
                .filter(|(_, r)| r.filters.iter().any(|f| f.matches(&record.topic)))
                .map(|(i, _)| i)
                .collect()
        });
        for &i in matching.iter() {
            self.routes[i].offer(record);
        }
    }

    /// Hands a record to route `index` alone, whatever its filters (the internal route of the
    /// security events), at once; dropped, counted, when the route's queue is full.
    pub fn push_now(&mut self, index: usize, record: &Record) {
        if let Some(route) = self.routes.get_mut(index) {
            route.offer(record);
            if !route.pending.is_empty() {
                let _ = route.queue.send(std::mem::take(&mut route.pending));
            }
        }
    }

    /// Hands each route what this pass gave it, in one delivery.
    pub fn flush(&mut self) {
        for route in &mut self.routes {
            if !route.pending.is_empty() {
                // A sink gone (shutting down) leaves nothing to do with them.
                let _ = route.queue.send(std::mem::take(&mut route.pending));
            }
        }
    }
}

/// Records taken off the queue per write batch before a flush. A batch holds its records' share
/// of the route's byte budget until it is written.
const BATCH: usize = 1024;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The longest a buffered route's sink waits for the spooler to catch up before it looks again.
const SPOOLER_CATCH_UP: Duration = Duration::from_millis(5);
/// About the most a buffered route appends to its disk buffer at a time.
const APPEND_PART_BYTES: usize = 4 << 20;
/// Records read back from the disk buffer per delivery.
const BUFFER_BATCH_RECORDS: usize = 1024;
const BUFFER_BATCH_BYTES: u64 = 4 << 20;

/// One route's delivery task, before its sink is made: what a sink's
/// [`SinkSettings::start`] hands its sink to.
pub struct RouteTask {
    name: String,
    queue: flume::Receiver<Vec<Queued>>,
    buffer: Option<DiskBuffer>,
    dead: DeadLetters,
    metrics: RouteMetrics,
}

impl RouteTask {
    /// The route's name, for a sink's own log lines.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A files sink's own metrics, labelled with this route.
    pub fn file_metrics(&self) -> crate::metrics::FileMetrics {
        self.metrics.files.route(&self.name)
    }

    /// Runs the route with `sink` until its queue closes and is drained.
    pub fn spawn<S: Sink>(self, sink: S) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.run(sink))
    }

    /// Takes deliveries off the queue (through the disk buffer, if there is one) and hands them
    /// to the sink, retrying with backoff until they are taken.
    async fn run<S: Sink>(self, mut sink: S) {
        let RouteTask {
            name,
            queue,
            buffer,
            mut dead,
            metrics,
        } = self;
        let mut delivery = Delivery {
            sink: &mut sink,
            dead: &mut dead,
            metrics: &metrics,
            route: &name,
        };
        match buffer {
            None => {
                let mut batch = Vec::new();
                while next_batch(&queue, &mut batch).await {
                    metrics.queue.set(metrics.budget.used() as i64);
                    let records: Vec<Record> = batch.iter().map(|q| q.record.clone()).collect();
                    // Without a disk buffer, the memory queue is what holds records while the
                    // sink retries; when it is full the router drops, counted.
                    delivery.deliver_with_retry(&records).await;
                    batch.clear();
                }
            }
            Some(buffer) => run_buffered(&mut delivery, queue, buffer).await,
        }
        sink.close().await;
    }
}

/// A sink with what its deliveries need.
struct Delivery<'a, S> {
    sink: &'a mut S,
    dead: &'a mut DeadLetters,
    metrics: &'a RouteMetrics,
    route: &'a str,
}

impl<S: Sink> Delivery<'_, S> {
    /// One attempt, for records that are not on disk: true if the sink took them. If not, the
    /// caller writes them to disk and they come again from there, with retries.
    async fn deliver_once(&mut self, records: &[Record]) -> bool {
        // Refused records are rare: their part goes by disk, to be set aside once, there.
        if records.iter().any(|r| self.sink.refusal(r).is_some()) {
            return false;
        }
        match self.sink.deliver(records, self.metrics).await {
            Ok(refused) => {
                self.delivered(records, refused);
                true
            }
            Err(e) => {
                self.failed(&e);
                tracing::warn!(route = %self.route, error = %e, records = records.len(),
                    "sink delivery failed; keeping the records on disk and retrying");
                false
            }
        }
    }

    /// Tries a part the spooler handed over, once; one it gave up on meanwhile is on disk.
    async fn deliver_handed(&mut self, (records, handoff): Direct) {
        if handoff.abandoned() {
            return;
        }
        let delivered = self.deliver_once(&records).await;
        handoff.report(delivered);
    }

    /// The records the sink can take, if it refuses some (those are set aside as dead letters).
    fn screen(&mut self, records: &[Record]) -> Option<Vec<Record>> {
        if !records.iter().any(|r| self.sink.refusal(r).is_some()) {
            return None;
        }
        let mut kept = Vec::with_capacity(records.len());
        for record in records {
            match self.sink.refusal(record) {
                Some(why) => self.dead.put(record, &why, self.metrics, self.route),
                None => kept.push(record.clone()),
            }
        }
        Some(kept)
    }

    /// Counts a failed delivery, and has the sink start the next one on a fresh connection.
    fn failed(&mut self, e: &SinkError) {
        self.metrics.errors.inc();
        self.metrics.sink_fails(&e.to_string());
        self.sink.reset();
    }

    /// Counts a delivery, and sets aside what the sink refused.
    fn delivered(&mut self, records: &[Record], refused: Refusals) {
        for (i, why) in &refused {
            self.dead.put(&records[*i], why, self.metrics, self.route);
        }
        self.metrics
            .delivered
            .inc_by((records.len() - refused.len()) as u64);
        self.metrics.sink_delivers();
    }

    async fn deliver_with_retry(&mut self, records: &[Record]) {
        let screened = self.screen(records);
        let records = screened.as_deref().unwrap_or(records);
        if records.is_empty() {
            return;
        }
        let route = self.route;
        let mut backoff = BACKOFF_MIN;
        let mut failures = 0u32;
        loop {
            match self.sink.deliver(records, self.metrics).await {
                Ok(refused) => {
                    self.delivered(records, refused);
                    if failures > 0 {
                        tracing::info!(%route, failures, "sink delivers again");
                    }
                    return;
                }
                Err(e) => {
                    self.failed(&e);
                    if failures == 0 || backoff == BACKOFF_MAX && failures % 12 == 0 {
                        tracing::warn!(%route, error = %e, records = records.len(), "sink delivery failed; retrying");
                    }
                    failures += 1;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

/// Runs `work` on the disk buffer on tokio's blocking pool: its reads, writes and fsyncs must not
/// hold up the runtime's two workers, which also run the other routes and the metrics endpoint.
/// Callers await each call before the next, so the buffer sees appends, reads and commits in
/// the order the route makes them.
async fn on_disk<T: Send + 'static>(
    buffer: &Arc<Mutex<DiskBuffer>>,
    work: impl FnOnce(&mut DiskBuffer) -> T + Send + 'static,
) -> T {
    let buffer = buffer.clone();
    blocking(move || work(&mut buffer.lock().expect("not poisoned"))).await
}

/// Runs `work` on tokio's blocking pool.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(work).await {
        Ok(done) => done,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            // Cancelled only while the runtime shuts down, which drops this task too.
            Err(_) => std::future::pending().await,
        },
    }
}

async fn run_buffered<S: Sink>(
    delivery: &mut Delivery<'_, S>,
    queue: flume::Receiver<Vec<Queued>>,
    buffer: DiskBuffer,
) {
    let metrics = delivery.metrics;
    let route = delivery.route;
    metrics.backlog.set(buffer.unread_bytes() as i64);
    let buffer = Arc::new(Mutex::new(buffer));
    let signals = Arc::new(Signals::default());
    let (direct_tx, direct) = flume::bounded::<Direct>(1);
    let spooler = tokio::spawn(spool(
        queue,
        buffer.clone(),
        direct_tx,
        signals.clone(),
        metrics.clone(),
        route.to_owned(),
    ));
    let mut reader = buffer.lock().expect("not poisoned").segment_reader();
    loop {
        // Read first: if the spooler had closed by then, its last hand-over is in the channel
        // and its last append in what the peek sees, so finding neither means all is delivered.
        let was_closed = signals.closed.load(std::sync::atomic::Ordering::Acquire);
        // A part handed over is older than anything on disk that is not delivered yet.
        if let Ok(handed) = direct.try_recv() {
            delivery.deliver_handed(handed).await;
            continue;
        }
        let next = on_disk(&buffer, |b| {
            b.next(BUFFER_BATCH_RECORDS, BUFFER_BATCH_BYTES)
        })
        .await;
        let (records, position) = match next {
            Next::Cached(records, position) => (records, position),
            Next::OnDisk(plan) => {
                // Without the buffer's lock: the spooler appends meanwhile.
                let from = plan.from();
                let read;
                (reader, read) = blocking(move || {
                    let read = reader.read(&plan, BUFFER_BATCH_RECORDS, BUFFER_BATCH_BYTES);
                    (reader, read)
                })
                .await;
                match read {
                    Ok(read) => read,
                    Err(e) => {
                        // A full buffer may have dropped the segment being read: go on from
                        // where the read now starts. Anything else is the disk's.
                        if on_disk(&buffer, move |b| b.read_position() != from).await {
                            continue;
                        }
                        metrics.errors.inc();
                        tracing::error!(%route, error = %e, "cannot read the disk buffer; retrying");
                        tokio::time::sleep(BACKOFF_MAX).await;
                        continue;
                    }
                }
            }
            Next::Drained => {
                // Read again after a wake-up: an append may land between the read and the wait,
                // and Notify keeps that one permit for us.
                if was_closed {
                    break;
                }
                // Only now can the spooler hand a part over: nothing is left on disk before it.
                tokio::select! {
                    _ = signals.appended.notified() => {}
                    handed = direct.recv_async() => {
                        if let Ok(handed) = handed {
                            delivery.deliver_handed(handed).await;
                        }
                    }
                }
                continue;
            }
        };
        // The spooler first: a record not yet on disk is lost if the queue overflows, one on
        // disk only waits. When the spooler falls behind, the sink gives it the CPU.
        while metrics.budget.used() * 2 > metrics.budget.capacity() {
            let _ = tokio::time::timeout(SPOOLER_CATCH_UP, signals.spooled.notified()).await;
        }
        // Empty when what was read held only damaged frames: the commit steps past them.
        delivery.deliver_with_retry(&records).await;
        let delivered = records.len();
        let (committed, unread, retired) = on_disk(&buffer, move |b| {
            (
                b.commit(delivered, position),
                b.unread_bytes(),
                b.take_retired(),
            )
        })
        .await;
        if let Err(e) = committed {
            metrics.errors.inc();
            tracing::error!(%route, error = %e, "cannot update the disk buffer's cursor");
        }
        metrics.backlog.set(unread as i64);
        remove_retired(retired, metrics, route).await;
    }
    let _ = spooler.await;
}

/// What a buffered route's spooler tells its sink's side.
#[derive(Default)]
struct Signals {
    /// Something was written to disk.
    appended: tokio::sync::Notify,
    /// A part left the memory queue.
    spooled: tokio::sync::Notify,
    /// The queue is closed and all of it handed over or written.
    closed: std::sync::atomic::AtomicBool,
}

/// A part the spooler hands to the sink to deliver at once, and how that went.
type Direct = (Vec<Record>, Arc<Handoff>);

/// How long the spooler waits for the sink to take a part handed to it before it writes what
/// follows to disk: longer, and a sink that hangs rather than fails would keep a whole outage
/// in memory.
const HANDOFF_PATIENCE: Duration = Duration::from_millis(100);

/// What became of a part handed to the sink, settled under one lock by whichever of spooler and
/// sink comes first. Unless it was delivered in time, the spooler writes it to disk before
/// anything that follows it, so no part is held only in memory past the patience.
#[derive(Default)]
struct Handoff {
    outcome: Mutex<Option<Outcome>>,
    settled: tokio::sync::Notify,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Delivered,
    Failed,
    /// The spooler stopped waiting and wrote the part to disk.
    Abandoned,
}

impl Handoff {
    /// The spooler's side: the outcome, or `Abandoned` after [`HANDOFF_PATIENCE`].
    async fn outcome(&self) -> Outcome {
        let _ = tokio::time::timeout(HANDOFF_PATIENCE, self.settled.notified()).await;
        *self
            .outcome
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(Outcome::Abandoned)
    }

    /// The sink's side: reports how its attempt went, unless the spooler has given up.
    fn report(&self, delivered: bool) {
        let mut outcome = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        if outcome.is_none() {
            *outcome = Some(if delivered {
                Outcome::Delivered
            } else {
                Outcome::Failed
            });
            self.settled.notify_one();
        }
    }

    fn abandoned(&self) -> bool {
        *self.outcome.lock().unwrap_or_else(|e| e.into_inner()) == Some(Outcome::Abandoned)
    }
}

/// Takes the route's deliveries as they arrive, a part at a time: hands a part to the sink while
/// the sink keeps up and nothing waits on disk, and writes it to the disk buffer otherwise. The
/// records keep their share of the route's memory budget until the sink or the disk has them:
/// a slow disk then slows the router's hand-over (counted drops there) instead of letting
/// memory grow.
async fn spool(
    queue: flume::Receiver<Vec<Queued>>,
    buffer: Arc<Mutex<DiskBuffer>>,
    direct: flume::Sender<Direct>,
    signals: Arc<Signals>,
    metrics: RouteMetrics,
    route: String,
) {
    let mut batch = Vec::new();
    let mut last_warning: Option<std::time::Instant> = None;
    let mut unreported = crate::buffer::Dropped::new();
    let drained = |buffer: &Mutex<DiskBuffer>| {
        buffer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_drained()
    };
    // Whether records go to disk: from the first the sink did not take at once until the
    // sink has caught up with the disk again.
    let mut spilling = !drained(&buffer);
    loop {
        if batch.is_empty() && !next_batch(&queue, &mut batch).await {
            break;
        }
        // A few MiB at a time: the reader takes the buffer's lock between appends, and the
        // budget goes back to the router as each part lands, not at the end.
        let mut bytes = 0;
        let part = batch
            .iter()
            .take_while(|q| {
                let more = bytes < APPEND_PART_BYTES;
                bytes += q.record.payload.len();
                more
            })
            .count();
        let part: Vec<Queued> = batch.drain(..part).collect();
        let records: Vec<Record> = part.iter().map(|q| q.record.clone()).collect();
        if spilling && drained(&buffer) {
            spilling = false;
        }
        // Half the queue used: the sink is not keeping up, and waiting for it would let the
        // queue overflow.
        let pressed = metrics.budget.used() * 2 > metrics.budget.capacity();
        if !spilling && !pressed {
            let handoff = Arc::new(Handoff::default());
            // Full only while the sink is still busy with one handed over before: then this
            // part goes to disk, after it.
            let taken = match direct.try_send((records.clone(), handoff.clone())) {
                Ok(()) => handoff.outcome().await,
                Err(_) => Outcome::Failed,
            };
            if taken == Outcome::Delivered {
                release(part, &signals, &metrics);
                continue;
            }
        }
        // Not taken, not taken in time (it may still be, and then comes again from disk: at
        // least once), or not offered: to disk, and everything after it until the disk is
        // delivered, so order holds.
        spilling = true;
        let count = records.len();
        let first = records.first().map(|r| (r.topic.clone(), r.seq));
        let (result, unread, retired) = on_disk(&buffer, move |b| {
            (b.append(&records), b.unread_bytes(), b.take_retired())
        })
        .await;
        metrics.backlog.set(unread as i64);
        remove_retired(retired, &metrics, &route).await;
        release(part, &signals, &metrics);
        match result {
            Ok(dropped) if dropped.is_empty() => {}
            Ok(dropped) => {
                metrics
                    .dropped
                    .inc_by(dropped.values().map(|d| d.2).sum::<u64>());
                crate::buffer::merge_dropped(&mut unreported, dropped);
                if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    last_warning = Some(std::time::Instant::now());
                    log_buffer_drops(&route, std::mem::take(&mut unreported));
                }
            }
            Err(e) => {
                // The disk refused (full, read-only): these records cannot be kept.
                metrics.errors.inc();
                metrics.dropped.inc_by(count as u64);
                tracing::error!(%route, error = %e, records = count, first = ?first,
                    "cannot write to the disk buffer: records dropped");
            }
        }
        signals.appended.notify_one();
    }
    log_buffer_drops(&route, unreported);
    signals
        .closed
        .store(true, std::sync::atomic::Ordering::Release);
    signals.appended.notify_one();
}

/// Gives a part's share of the route's memory budget back, now that the sink or the disk has it.
fn release(part: Vec<Queued>, signals: &Signals, metrics: &RouteMetrics) {
    drop(part);
    signals.spooled.notify_waiters();
    metrics.queue.set(metrics.budget.used() as i64);
}

/// Deletes segments the buffer is done with, without holding it: on a file system mounted
/// with `discard`, freeing a segment's blocks waits for the disk.
async fn remove_retired(retired: Retired, metrics: &RouteMetrics, route: &str) {
    if let Err(e) = blocking(move || retired.remove()).await {
        metrics.errors.inc();
        tracing::error!(%route, error = %e, "cannot delete a delivered disk buffer segment");
    }
}

fn log_buffer_drops(route: &str, dropped: crate::buffer::Dropped) {
    for (topic, (first, last, count)) in dropped {
        tracing::warn!(%route, %topic, first_seq = first, last_seq = last, records = count,
            "disk buffer full: records dropped (see diode_sink_dropped_total)");
    }
}

/// Waits for a delivery, then takes what else is queued, up to about a batch.
async fn next_batch(queue: &flume::Receiver<Vec<Queued>>, batch: &mut Vec<Queued>) -> bool {
    match queue.recv_async().await {
        Ok(delivery) => batch.extend(delivery),
        Err(_) => return false,
    }
    while batch.len() < BATCH {
        match queue.try_recv() {
            Ok(delivery) => batch.extend(delivery),
            Err(_) => break,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU8, Ordering};

    const TAKE: u8 = 0;
    const FAIL: u8 = 1;
    const HANG: u8 = 2;

    /// A sink that takes records, fails, or hangs until told otherwise, as the test says, and
    /// keeps the sequence numbers of what it took.
    struct Scripted {
        mode: Arc<AtomicU8>,
        got: Arc<Mutex<Vec<u64>>>,
    }

    impl Sink for Scripted {
        async fn deliver(
            &mut self,
            records: &[Record],
            _metrics: &RouteMetrics,
        ) -> Result<Refusals, SinkError> {
            loop {
                match self.mode.load(Ordering::SeqCst) {
                    TAKE => {
                        let mut got = self.got.lock().unwrap();
                        got.extend(records.iter().map(|r| r.seq));
                        return Ok(Refusals::new());
                    }
                    FAIL => return Err(std::io::Error::other("scripted failure").into()),
                    _ => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        }
    }

    fn segments(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "seg"))
            })
            .count()
    }

    /// A buffered route hands records straight to a sink that keeps up, writes them to disk
    /// from the first the sink does not take in time (it hangs, then fails), delivers the
    /// disk before handing over again, and keeps one order through all of it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_buffered_route_goes_to_disk_only_while_the_sink_lags_and_keeps_order() {
        let dir = tempfile::tempdir().unwrap();
        let buffer = DiskBuffer::open(dir.path(), 64 << 20, FullPolicy::DropOldest).unwrap();
        let budget = ByteBudget::new(64 << 20);
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = ReceiverMetrics::new(&mut registry).route("historian", budget.clone());
        let (tx, rx) = flume::unbounded();
        let task = RouteTask {
            name: "historian".into(),
            queue: rx,
            buffer: Some(buffer),
            dead: DeadLetters::new(None, 0),
            metrics: metrics.clone(),
        };
        let mode = Arc::new(AtomicU8::new(TAKE));
        let got = Arc::new(Mutex::new(Vec::new()));
        let handle = task.spawn(Scripted {
            mode: mode.clone(),
            got: got.clone(),
        });
        let send = |seqs: std::ops::Range<u64>| {
            for chunk in seqs.collect::<Vec<_>>().chunks(50) {
                let delivery = chunk
                    .iter()
                    .map(|&seq| Queued {
                        record: Record {
                            topic: Arc::from("line3/plc7"),
                            seq,
                            session_id: 1,
                            time_us: 1,
                            origin: None,
                            late: false,
                            payload: bytes::Bytes::from(vec![seq as u8; 200]),
                        },
                        _budget: budget.try_acquire(264).unwrap(),
                    })
                    .collect();
                tx.send(delivery).unwrap();
            }
        };
        let delivered = |n: usize| {
            let got = got.clone();
            async move {
                for _ in 0..1000 {
                    if got.lock().unwrap().len() >= n {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                false
            }
        };

        // Keeping up: nothing is written.
        send(0..1000);
        assert!(delivered(1000).await);
        assert_eq!(
            segments(dir.path()),
            0,
            "a sink that keeps up needs no disk"
        );

        // The sink hangs: after a moment what follows goes to disk, then it fails a while.
        mode.store(HANG, Ordering::SeqCst);
        send(1000..1500);
        tokio::time::sleep(HANDOFF_PATIENCE * 3).await;
        send(1500..3000);
        let mut spilled = false;
        for _ in 0..500 {
            spilled = metrics.backlog.get() > 0;
            if spilled {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(spilled, "records of a hung sink stayed in memory");
        mode.store(FAIL, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(300)).await;
        mode.store(TAKE, Ordering::SeqCst);
        assert!(delivered(3000).await);

        // Caught up: handed over again.
        send(3000..4000);
        assert!(delivered(4000).await);
        assert_eq!(*got.lock().unwrap(), (0..4000).collect::<Vec<_>>());

        // The sink hangs and then takes what it hung on: that part also went to disk when the
        // spooler gave up on it, so it comes twice (at least once), and order holds.
        mode.store(HANG, Ordering::SeqCst);
        send(4000..4050);
        tokio::time::sleep(HANDOFF_PATIENCE * 3).await;
        send(4050..4500);
        tokio::time::sleep(Duration::from_millis(100)).await;
        mode.store(TAKE, Ordering::SeqCst);
        assert!(delivered(4550).await);
        drop(tx);
        handle.await.unwrap();
        let got = got.lock().unwrap().clone();
        assert_eq!(got.len(), 4550, "the part given up on comes once more");
        let mut seen = std::collections::HashSet::new();
        let first: Vec<u64> = got.into_iter().filter(|seq| seen.insert(*seq)).collect();
        assert_eq!(first, (0..4500).collect::<Vec<_>>());
        assert_eq!(metrics.dropped.get(), 0);
        assert_eq!(metrics.backlog.get(), 0);
    }
}
