//! The files source: a directory tree, mirrored across the link (wire-format.md §5.6).
//!
//! A file is taken only once it is stable (size and modification time unchanged for
//! `stable_ms`), so a file still being written is never sent half. Each version (a path with one
//! size and mtime) gets an id of its own and is streamed in chunks with bounded memory, between a
//! manifest and the same manifest again carrying the SHA-256 of the whole file. With no return
//! channel, a carousel sends every version `passes` times (least-sent first, newest first among
//! equals, `pass_interval_ms` apart), so a pass that loses chunks beyond FEC is completed by the
//! next; what it has sent, and where a pass stands, is kept in `state_file`, so a restart
//! resumes mid-file. Inotify makes changes seen at once; a periodic rescan makes sure nothing is
//! missed when events are dropped.
//!
//! It only reads, except in transfer mode (`after_send = "delete"` or `"move"`), which removes
//! a file from the watched tree once its passes are sent, and only if configured. It is a bulk
//! source: its records go on the link only when no live record waits (link.rs).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use diode_common::config::{default_u32, default_u64, default_usize, ConfigError};
use diode_common::unix_time_us;
use diode_common::LogThrottle;
use diode_wire::files::Part;
use diode_wire::proto::{FileChunk, FileDeleted, FileManifest};
use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};

use super::{emit, Scope, Source, SourceContext, Started};
use crate::metrics::FileMetrics;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesConfig {
    /// The directory watched, with everything below it, relative to the configuration file.
    pub dir: PathBuf,
    /// Glob patterns on the path below `dir` (`*.csv`, `reports/**`): only matching files are
    /// sent; empty: every file.
    #[serde(default)]
    pub include: Vec<String>,
    /// Glob patterns of files never sent (`*.tmp`, `**/.*`): a match wins over `include`.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// A file is taken once its size and modification time have not changed for this long.
    #[serde(default = "default_u64::<5000>")]
    pub stable_ms: u64,
    /// The whole tree is walked this often, besides what inotify reports.
    #[serde(default = "default_u64::<60_000>")]
    pub rescan_interval_ms: u64,
    /// Bytes of a file per record: what a loss costs and what the link's latency for live
    /// records can grow by (link.rs).
    #[serde(default = "default_usize::<{ 64 << 10 }>")]
    pub chunk_bytes: usize,
    /// How many times each version is sent in all.
    #[serde(default = "default_u32::<3>")]
    pub passes: u32,
    /// Two passes of one version are at least this far apart, so one outage does not take them
    /// all.
    #[serde(default = "default_u64::<30_000>")]
    pub pass_interval_ms: u64,
    /// Every version is sent again, pass after pass, for this long after its first pass, on top
    /// of `passes` (0: `passes` alone).
    #[serde(default)]
    pub resend_for_secs: u64,
    /// What the carousel has sent and where a pass stands, relative to the configuration file:
    /// a restart resumes from it.
    pub state_file: PathBuf,
    /// Tell the receiver when a file sent earlier is deleted here (mirror mode).
    #[serde(default)]
    pub propagate_deletions: bool,
    /// What happens to a file once its passes are sent: `keep` (default), `delete` or `move`
    /// (to `move_to`). Transfer mode: the only writes this source ever makes.
    #[serde(default)]
    pub after_send: AfterSend,
    /// Where `after_send = "move"` puts sent files, relative to the configuration file; outside
    /// `dir`.
    #[serde(default)]
    pub move_to: Option<PathBuf>,
    /// File versions in the carousel at most; past that, new files wait (counted as
    /// `diode_files_skipped_total{reason="limit"}`).
    #[serde(default = "default_usize::<10_000>")]
    pub max_files: usize,
    /// Larger files are not sent (counted, `reason="too_large"`).
    #[serde(default = "default_u64::<{ 1 << 40 }>")]
    pub max_file_bytes: u64,
}

/// `after_send`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AfterSend {
    #[default]
    Keep,
    Delete,
    Move,
}

impl FilesConfig {
    pub fn check(&self, scope: &Scope<'_>) -> Result<FilesSource, ConfigError> {
        // Absolute, as inotify names what it reports: a path relative to the working directory
        // would match none of its events.
        let dir = scope.resolve(&self.dir);
        let dir = std::path::absolute(&dir).unwrap_or(dir);
        // A directory not there yet (a share mounted after the service starts) is waited for;
        // anything else in its place is a mistake.
        if dir.exists() && !dir.is_dir() {
            return Err(scope.invalid("dir", format!("{} is not a directory", dir.display())));
        }
        let state_file = scope.resolve(&self.state_file);
        if let Some(parent) = state_file.parent() {
            scope.writable_dir("state_file", parent)?;
        }
        let globs = |key: &str, patterns: &[String]| -> Result<GlobSet, ConfigError> {
            let mut set = GlobSetBuilder::new();
            for (i, pattern) in patterns.iter().enumerate() {
                let glob = Glob::new(pattern).map_err(|e| {
                    scope.invalid(
                        &format!("{key}[{i}]"),
                        format!("{pattern:?} is not a glob: {e}"),
                    )
                })?;
                set.add(glob);
            }
            set.build()
                .map_err(|e| scope.invalid(key, format!("the patterns do not build: {e}")))
        };
        let include = globs("include", &self.include)?;
        let exclude = globs("exclude", &self.exclude)?;
        if self.chunk_bytes < 1024 || self.chunk_bytes > scope.site().max_record_bytes / 2 {
            return Err(scope.invalid(
                "chunk_bytes",
                format!(
                    "must be from 1024 to half of link.max_record_bytes ({})",
                    scope.site().max_record_bytes / 2
                ),
            ));
        }
        if self.passes == 0 {
            return Err(scope.invalid("passes", "must be at least 1"));
        }
        if self.stable_ms < 100 {
            return Err(scope.invalid("stable_ms", "must be at least 100"));
        }
        if self.rescan_interval_ms < 1000 {
            return Err(scope.invalid("rescan_interval_ms", "must be at least 1000"));
        }
        if self.max_files == 0 {
            return Err(scope.invalid("max_files", "must be at least 1"));
        }
        let move_to = match (self.after_send, &self.move_to) {
            (AfterSend::Move, None) => {
                return Err(scope.invalid("move_to", "after_send = \"move\" needs move_to"))
            }
            (AfterSend::Move, Some(to)) => {
                let to = scope.resolve(to);
                scope.writable_dir("move_to", &to)?;
                let (canon_to, canon_dir) = (to.canonicalize(), dir.canonicalize());
                if let (Ok(to), Ok(dir)) = (canon_to, canon_dir) {
                    if to.starts_with(&dir) {
                        return Err(scope.invalid(
                            "move_to",
                            "must be outside dir, or moved files would be sent again",
                        ));
                    }
                }
                Some(to)
            }
            (_, Some(_)) => {
                return Err(scope.invalid("move_to", "only goes with after_send = \"move\""))
            }
            (_, None) => None,
        };
        Ok(FilesSource {
            config: FilesConfig {
                dir,
                state_file,
                move_to,
                ..self.clone()
            },
            include: (!self.include.is_empty()).then_some(include),
            exclude,
        })
    }
}

#[derive(Debug)]
pub struct FilesSource {
    config: FilesConfig,
    /// None: every file.
    include: Option<GlobSet>,
    exclude: GlobSet,
}

impl Source for FilesSource {
    fn describe(&self) -> String {
        let c = &self.config;
        format!(
            "files under {}{}{}, stable after {} ms, {} passes {} s apart{}{}, read-only{}",
            c.dir.display(),
            if c.dir.is_dir() {
                ""
            } else {
                " (not there yet: waited for)"
            },
            if c.include.is_empty() {
                String::new()
            } else {
                format!(" matching {}", c.include.join(" "))
            },
            c.stable_ms,
            c.passes,
            c.pass_interval_ms / 1000,
            if c.resend_for_secs > 0 {
                format!(" and again for {} s", c.resend_for_secs)
            } else {
                String::new()
            },
            if c.propagate_deletions {
                ", deletions sent"
            } else {
                ""
            },
            match c.after_send {
                AfterSend::Keep => String::new(),
                AfterSend::Delete => " until sent: then deleted (transfer mode)".into(),
                AfterSend::Move => format!(
                    " until sent: then moved to {} (transfer mode)",
                    c.move_to.as_deref().unwrap_or(Path::new("")).display()
                ),
            }
        )
    }

    fn bulk(&self) -> bool {
        true
    }

    fn start(&self, ctx: SourceContext) -> std::io::Result<Started> {
        let metrics = ctx.sender_metrics.files(&ctx.name);
        let state = Carousel::load(&self.config.state_file, &metrics)?;
        let (events_tx, events_rx) = flume::bounded(EVENT_QUEUE);
        let watcher = watch(&self.config.dir, &events_tx);
        let mut worker = Worker {
            config: self.config.clone(),
            include: self.include.clone(),
            exclude: self.exclude.clone(),
            runtime: tokio::runtime::Handle::current(),
            ctx,
            metrics,
            carousel: state,
            observed: HashMap::new(),
            passed_over: HashMap::new(),
            events: events_rx,
            events_tx,
            watcher,
            rescan_due: Instant::now(),
            pass: None,
            state_saved: Instant::now(),
        };
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(format!("diode-files-{}", worker.ctx.name))
            .spawn(move || {
                worker.run();
                let _ = done_tx.send(());
            })?;
        Ok(Started {
            local_addr: None,
            task: Box::pin(async move {
                let _ = done_rx.await;
            }),
        })
    }
}

/// Inotify events waiting for the worker; past that, the next rescan finds what they said.
const EVENT_QUEUE: usize = 4096;
/// Directory depth walked at most.
const MAX_DEPTH: usize = 64;
/// How often the worker looks at events, stable files and deletions while it streams.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(50);
/// A directory an event names is walked with the next rescan, this soon at the latest, so a
/// burst of events costs one walk.
const DIRECTORY_EVENT_RESCAN: Duration = Duration::from_secs(1);
/// Transfer mode waits this long after a file's last pass is queued (and for the topic's queue
/// to be empty) before it removes the file.
const TRANSFER_GRACE_MS: i64 = 1000;
/// ... or, while other files topics keep that queue busy, this much longer.
const TRANSFER_WAIT_MS: i64 = 10_000;
/// The state file is written at most this often while it changes (and at a stop).
const STATE_SAVE_INTERVAL: Duration = Duration::from_secs(2);

/// Watches `dir` recursively; events name paths to look at again. None if inotify is not to be
/// had (too many watches, say): the rescans alone then find changes.
fn watch(dir: &Path, events: &flume::Sender<PathBuf>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    if !dir.is_dir() {
        tracing::warn!(dir = %dir.display(), "the files source's directory is not there yet: waiting for it");
        return None;
    }
    let events = events.clone();
    let handler = move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            for path in event.paths {
                // A full queue drops the event: the rescan is the backstop.
                let _ = events.try_send(path);
            }
        }
    };
    let made = notify::recommended_watcher(handler).and_then(|mut w| {
        w.watch(dir, notify::RecursiveMode::Recursive)?;
        Ok(w)
    });
    match made {
        Ok(watcher) => Some(watcher),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e,
                "cannot watch the directory with inotify: changes are found by the periodic rescan only");
            None
        }
    }
}

/// A file as last seen: what makes it one version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    size: u64,
    mtime_ns: i64,
    ino: u64,
}

impl Seen {
    fn of(meta: &std::fs::Metadata) -> Seen {
        Seen {
            size: meta.len(),
            mtime_ns: mtime_ns(meta),
            ino: meta.ino(),
        }
    }
}

/// A file not yet stable: seen like this since `since`.
struct Observation {
    seen: Seen,
    since: Instant,
}

/// A version in the carousel, as the state file keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Version {
    /// The path below `dir`, as bytes (base64 in the state file).
    #[serde(with = "base64_bytes")]
    path: Vec<u8>,
    file_id: u64,
    size: u64,
    mtime_ns: i64,
    ino: u64,
    mode: u32,
    /// Hex; None until a first pass has read the whole file.
    sha256: Option<String>,
    passes: u32,
    first_pass_unix_ms: Option<i64>,
    last_pass_unix_ms: Option<i64>,
    /// Transfer mode has removed it from the tree.
    #[serde(default)]
    removed: bool,
    /// The last version of this path sent whole, while this one is not yet: what a deletion
    /// must name.
    #[serde(default)]
    replaces: Option<u64>,
    /// When this source found the version stable: the receiver orders versions of a path by it
    /// (wire-format.md §5.6), not by the file's mtime.
    #[serde(default)]
    found_unix_us: i64,
    /// Transfer mode: remove it once its last pass has left the queues, from then on.
    #[serde(default)]
    transfer_after_unix_ms: Option<i64>,
}

impl Version {
    fn seen(&self) -> Seen {
        Seen {
            size: self.size,
            mtime_ns: self.mtime_ns,
            ino: self.ino,
        }
    }
}

/// A deletion to announce.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Deletion {
    #[serde(with = "base64_bytes")]
    path: Vec<u8>,
    file_id: u64,
    sent: u32,
    last_sent_unix_ms: Option<i64>,
}

/// Where the pass under way stands, so that a restart goes on from there.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Progress {
    file_id: u64,
    pass: u32,
    /// Bytes queued for the link so far.
    offset: u64,
    /// Saved at a clean stop, when everything queued was sent: `offset` is exact. Otherwise a
    /// crash may have lost what was queued, and the pass resumes that much earlier.
    #[serde(default)]
    clean: bool,
}

/// The state file.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Carousel {
    versions: Vec<Version>,
    #[serde(default)]
    deletions: Vec<Deletion>,
    #[serde(default)]
    progress: Option<Progress>,
    #[serde(skip)]
    path: PathBuf,
    #[serde(skip)]
    dirty: bool,
    /// `path` → index in `versions`.
    #[serde(skip)]
    by_path: HashMap<Vec<u8>, usize>,
}

mod base64_bytes {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)
    }
}

impl Carousel {
    fn load(path: &Path, metrics: &FileMetrics) -> std::io::Result<Carousel> {
        let mut carousel = match std::fs::read(path) {
            Ok(text) => serde_json::from_slice::<Carousel>(&text).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Carousel::default(),
            Err(e) => return Err(e),
        };
        carousel.path = path.to_owned();
        carousel.reindex();
        carousel.update_gauges(metrics, u32::MAX);
        Ok(carousel)
    }

    fn reindex(&mut self) {
        self.by_path = self
            .versions
            .iter()
            .enumerate()
            .map(|(i, v)| (v.path.clone(), i))
            .collect();
    }

    fn update_gauges(&self, metrics: &FileMetrics, passes: u32) {
        metrics.tracked.set(self.versions.len() as i64);
        metrics
            .pending
            .set(self.versions.iter().filter(|v| v.passes < passes).count() as i64);
    }

    fn save(&mut self) -> std::io::Result<()> {
        let text = serde_json::to_vec(self).expect("serialising to a Vec cannot fail");
        diode_common::fsutil::replace_file(&self.path, &text, 0o600, true)?;
        self.dirty = false;
        Ok(())
    }

    fn remove(&mut self, path: &[u8]) -> Option<Version> {
        let i = self.by_path.remove(path)?;
        let version = self.versions.swap_remove(i);
        if let Some(moved) = self.versions.get(i) {
            self.by_path.insert(moved.path.clone(), i);
        }
        self.dirty = true;
        Some(version)
    }
}

/// A pass under way: one file open, read a chunk at a time.
struct Pass {
    file_id: u64,
    path: Vec<u8>,
    pass: u32,
    file: File,
    offset: u64,
    /// Hashing as it reads, when the digest is not known yet.
    hasher: Option<ring::digest::Context>,
}

struct Worker {
    config: FilesConfig,
    include: Option<GlobSet>,
    exclude: GlobSet,
    runtime: tokio::runtime::Handle,
    ctx: SourceContext,
    metrics: FileMetrics,
    carousel: Carousel,
    observed: HashMap<Vec<u8>, Observation>,
    /// Files not sent (too large, a name no receiver takes), as they were seen: looked at again
    /// only once they change.
    passed_over: HashMap<Vec<u8>, Seen>,
    events: flume::Receiver<PathBuf>,
    events_tx: flume::Sender<PathBuf>,
    /// None while the directory cannot be watched (not there yet): each rescan tries again.
    watcher: Option<notify::RecommendedWatcher>,
    rescan_due: Instant,
    pass: Option<Pass>,
    state_saved: Instant,
}

/// Why a record could not be queued: the sender is stopping.
struct Stopping;

impl Worker {
    fn run(&mut self) {
        tracing::info!(topic = %self.ctx.name, dir = %self.config.dir.display(),
            versions = self.carousel.versions.len(), "files source started");
        let mut next_housekeeping = Instant::now();
        while !self.ctx.shutdown.is_triggered() {
            let now = Instant::now();
            // The tree's changes are looked at every 50 ms, not between every two chunks.
            if now >= next_housekeeping {
                next_housekeeping = now + HOUSEKEEPING_INTERVAL;
                self.take_events();
                if now >= self.rescan_due {
                    self.rescan_due = now + Duration::from_millis(self.config.rescan_interval_ms);
                    self.rescan();
                }
                self.promote_stable(now);
                if self.send_deletions().is_err() {
                    break;
                }
                self.transfer_due();
            }
            let worked = match self.step() {
                Ok(worked) => worked,
                Err(Stopping) => break,
            };
            if self.carousel.dirty && self.state_saved.elapsed() >= STATE_SAVE_INTERVAL {
                self.save_state();
            }
            if !worked {
                // Nothing to send: wait for an event, a file to become stable, or a pass due.
                let wait = Duration::from_millis(200);
                if let Ok(path) = self.events.recv_timeout(wait) {
                    self.look_at(&path);
                }
            }
        }
        // What was queued is sent before the link thread stops (link.rs): the offset is exact.
        if let Some(progress) = &mut self.carousel.progress {
            progress.clean = true;
        }
        self.save_state();
        tracing::info!(topic = %self.ctx.name, "files source stopped");
    }

    fn save_state(&mut self) {
        self.state_saved = Instant::now();
        self.carousel
            .update_gauges(&self.metrics, self.config.passes);
        if let Err(e) = self.carousel.save() {
            self.ctx.metrics.errors_io.inc();
            tracing::warn!(topic = %self.ctx.name, error = %e, file = %self.carousel.path.display(),
                "cannot write the files source's state: a restart would send files again");
        }
    }

    /// Queues one record, waiting for room as every source that can wait does.
    fn send(&self, part: Part) -> Result<(), Stopping> {
        let payload = part.encode();
        let ctx = &self.ctx;
        self.runtime.block_on(async {
            tokio::select! {
                _ = ctx.shutdown.wait() => Err(Stopping),
                sent = emit(ctx, unix_time_us(), Some(diode_wire::files::origin()), payload) => {
                    sent.map_err(|_| Stopping)
                }
            }
        })
    }

    fn relative(&self, path: &Path) -> Option<Vec<u8>> {
        let rel = path.strip_prefix(&self.config.dir).ok()?;
        let bytes = rel.as_os_str().as_bytes();
        (!bytes.is_empty()).then(|| bytes.to_vec())
    }

    fn wanted(&self, rel: &[u8]) -> bool {
        let text = String::from_utf8_lossy(rel);
        let path = Path::new(text.as_ref());
        !self.exclude.is_match(path) && self.include.as_ref().is_none_or(|i| i.is_match(path))
    }

    fn take_events(&mut self) {
        let paths: Vec<PathBuf> = self.events.try_iter().take(EVENT_QUEUE).collect();
        let unique: HashSet<PathBuf> = paths.into_iter().collect();
        for path in unique {
            self.look_at(&path);
        }
    }

    /// A path an event named: a file to observe, a new directory to walk, or something gone.
    fn look_at(&mut self, path: &Path) {
        let Some(rel) = self.relative(path) else {
            return;
        };
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.is_dir() => {
                // A directory moved in arrives whole, with no event for its files.
                self.rescan_due = self.rescan_due.min(Instant::now() + DIRECTORY_EVENT_RESCAN);
            }
            Ok(meta) if meta.is_file() => self.observe(rel, &meta),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => self.vanished(&rel),
            // Not readable now (permissions, a share gone stale): not a deletion.
            Err(_) => {}
        }
    }

    /// Walks the whole tree: every file is observed, and tracked files no longer there are gone.
    fn rescan(&mut self) {
        if self.watcher.is_none() && self.config.dir.is_dir() {
            self.watcher = watch(&self.config.dir, &self.events_tx);
        }
        let mut found = Vec::new();
        let whole = walk(&self.config.dir, &self.config.dir, 0, &mut found);
        let present: HashSet<Vec<u8>> = found.iter().map(|(rel, _)| rel.clone()).collect();
        for (rel, meta) in found {
            self.observe(rel, &meta);
        }
        if !whole {
            // Part of the tree could not be read (a share not mounted, a directory without
            // permission): what was not seen is not taken as deleted.
            static PARTIAL: LogThrottle = LogThrottle::new(Duration::from_secs(60));
            if let Some(folded) = PARTIAL.allow() {
                tracing::warn!(topic = %self.ctx.name, dir = %self.config.dir.display(), folded,
                    "files source: part of the tree could not be read; nothing is taken as deleted until it can");
            }
            self.ctx.metrics.errors_io.inc();
            return;
        }
        let gone: Vec<Vec<u8>> = self
            .carousel
            .versions
            .iter()
            .filter(|v| !v.removed && !present.contains(&v.path))
            .map(|v| v.path.clone())
            .collect();
        for rel in gone {
            self.vanished(&rel);
        }
        self.observed.retain(|rel, _| present.contains(rel));
        self.passed_over.retain(|rel, _| present.contains(rel));
    }

    fn observe(&mut self, rel: Vec<u8>, meta: &std::fs::Metadata) {
        if !self.wanted(&rel) {
            return;
        }
        let seen = Seen::of(meta);
        if let Some(&i) = self.carousel.by_path.get(&rel) {
            if self.carousel.versions[i].seen() == seen {
                self.observed.remove(&rel);
                return;
            }
        }
        if self.passed_over.get(&rel) == Some(&seen) {
            return;
        }
        match self.observed.get_mut(&rel) {
            Some(o) if o.seen == seen => {}
            Some(o) => {
                o.seen = seen;
                o.since = Instant::now();
            }
            None => {
                if self.observed.len() >= self.config.max_files {
                    self.metrics.skipped("limit").inc();
                    return;
                }
                self.observed.insert(
                    rel,
                    Observation {
                        seen,
                        since: Instant::now(),
                    },
                );
            }
        }
    }

    /// A tracked file is no longer in the tree.
    fn vanished(&mut self, rel: &[u8]) {
        self.observed.remove(rel);
        let Some(&i) = self.carousel.by_path.get(rel) else {
            return;
        };
        if self.carousel.versions[i].removed {
            return;
        }
        let version = self.carousel.remove(rel).expect("indexed");
        self.end_pass_of(version.file_id);
        let sent_whole = if version.passes > 0 {
            Some(version.file_id)
        } else {
            version.replaces
        };
        if let (true, Some(file_id)) = (self.config.propagate_deletions, sent_whole) {
            self.carousel.deletions.retain(|d| d.path != version.path);
            self.carousel.deletions.push(Deletion {
                path: version.path,
                file_id,
                sent: 0,
                last_sent_unix_ms: None,
            });
        }
    }

    /// Files unchanged for `stable_ms` become versions in the carousel.
    fn promote_stable(&mut self, now: Instant) {
        let stable_for = Duration::from_millis(self.config.stable_ms);
        let stable: Vec<Vec<u8>> = self
            .observed
            .iter()
            .filter(|(_, o)| now.duration_since(o.since) >= stable_for)
            .map(|(rel, _)| rel.clone())
            .collect();
        for rel in stable {
            let observation = self.observed.remove(&rel).expect("listed above");
            // Looked at once more: stable means unchanged now too.
            let path = self.config.dir.join(std::ffi::OsStr::from_bytes(&rel));
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                self.vanished(&rel);
                continue;
            };
            let seen = Seen::of(&meta);
            if seen != observation.seen || !meta.is_file() {
                self.observe(rel, &meta);
                continue;
            }
            if seen.size > self.config.max_file_bytes {
                self.metrics.skipped("too_large").inc();
                self.pass_over(rel, seen);
                continue;
            }
            if let Err(why) = diode_wire::files::check_path(&rel) {
                // Every receiver refuses it (wire-format.md §5.6): sending it is only noise.
                static NAMES: LogThrottle = LogThrottle::new(Duration::from_secs(60));
                self.metrics.skipped("name").inc();
                if let Some(folded) = NAMES.allow() {
                    tracing::warn!(topic = %self.ctx.name, path = %String::from_utf8_lossy(&rel),
                        error = %why, folded, "files source: a name no receiver takes; not sent");
                }
                self.pass_over(rel, seen);
                continue;
            }
            if self.carousel.versions.len() >= self.config.max_files
                && !self.carousel.by_path.contains_key(&rel)
            {
                static LIMIT: LogThrottle = LogThrottle::new(Duration::from_secs(60));
                self.metrics.skipped("limit").inc();
                if let Some(folded) = LIMIT.allow() {
                    tracing::warn!(topic = %self.ctx.name, max_files = self.config.max_files, folded,
                        "files source: max_files versions tracked; new files wait (raise max_files, or use transfer mode)");
                }
                continue;
            }
            // A file back in the tree is not deleted any more.
            self.carousel.deletions.retain(|d| d.path != rel);
            // A new version replaces the old one of the same path: its passes start over. What
            // the IT side may hold is the last version sent whole, should this one be deleted
            // before it is.
            let mut replaces = None;
            if let Some(old) = self.carousel.remove(&rel) {
                self.end_pass_of(old.file_id);
                replaces = if old.passes > 0 {
                    Some(old.file_id)
                } else {
                    old.replaces
                };
            }
            let version = Version {
                file_id: file_id(&rel, seen),
                path: rel.clone(),
                size: seen.size,
                mtime_ns: seen.mtime_ns,
                ino: seen.ino,
                mode: std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777,
                sha256: None,
                passes: 0,
                first_pass_unix_ms: None,
                last_pass_unix_ms: None,
                removed: false,
                replaces,
                found_unix_us: unix_time_us(),
                transfer_after_unix_ms: None,
            };
            self.carousel
                .by_path
                .insert(rel, self.carousel.versions.len());
            self.carousel.versions.push(version);
            self.carousel.dirty = true;
        }
    }

    /// A version leaves the carousel: if its pass was under way, that pass ends unfinished.
    fn end_pass_of(&mut self, file_id: u64) {
        if self.pass.as_ref().is_some_and(|p| p.file_id == file_id) {
            self.pass = None;
            self.carousel.progress = None;
        }
    }

    fn pass_over(&mut self, rel: Vec<u8>, seen: Seen) {
        if self.passed_over.len() < self.config.max_files {
            self.passed_over.insert(rel, seen);
        }
    }

    fn send_deletions(&mut self) -> Result<(), Stopping> {
        let now_ms = unix_time_us() / 1000;
        let interval = self.config.pass_interval_ms as i64;
        let due: Vec<usize> = (0..self.carousel.deletions.len())
            .filter(|&i| {
                let d = &self.carousel.deletions[i];
                d.last_sent_unix_ms.is_none_or(|at| now_ms - at >= interval)
            })
            .collect();
        for i in due {
            let d = &self.carousel.deletions[i];
            self.send(Part::Deleted(FileDeleted {
                file_id: d.file_id,
                path: Bytes::from(d.path.clone()),
            }))?;
            let d = &mut self.carousel.deletions[i];
            d.sent += 1;
            d.last_sent_unix_ms = Some(now_ms);
            self.carousel.dirty = true;
            if d.sent == 1 {
                self.metrics.deletions.inc();
            }
        }
        let passes = self.config.passes;
        self.carousel.deletions.retain(|d| d.sent < passes);
        Ok(())
    }

    /// Sends the next chunk of the pass under way, or starts the next pass due. Returns whether
    /// there was anything to do.
    fn step(&mut self) -> Result<bool, Stopping> {
        if self.pass.is_none() && !self.start_next_pass()? {
            return Ok(false);
        }
        // A version abandoned as it was opened leaves no pass: the next round picks another.
        let Some(pass) = self.pass.as_mut() else {
            return Ok(true);
        };
        let Some(i) = self
            .carousel
            .by_path
            .get(&pass.path)
            .copied()
            .filter(|&i| self.carousel.versions[i].file_id == pass.file_id)
        else {
            self.pass = None;
            return Ok(true);
        };
        let size = self.carousel.versions[i].size;
        if pass.offset < size {
            let want = ((size - pass.offset) as usize).min(self.config.chunk_bytes);
            let mut data = vec![0u8; want];
            let read = match diode_common::fsutil::read_full_at(&pass.file, &mut data, pass.offset)
            {
                Ok(read) => read,
                Err(e) => {
                    self.abandon(i, "unreadable", &e.to_string());
                    return Ok(true);
                }
            };
            if read < want {
                self.abandon(i, "changed", "it became shorter while being sent");
                return Ok(true);
            }
            if let Some(hasher) = &mut pass.hasher {
                hasher.update(&data);
            }
            let chunk = FileChunk {
                file_id: pass.file_id,
                offset: pass.offset,
                data: Bytes::from(data),
            };
            pass.offset += want as u64;
            let offset = pass.offset;
            let (file_id, pass_no) = (pass.file_id, pass.pass);
            self.send(Part::Chunk(chunk))?;
            self.metrics.bytes_sent.inc_by(want as u64);
            self.carousel.progress = Some(Progress {
                file_id,
                pass: pass_no,
                offset,
                clean: false,
            });
            self.carousel.dirty = true;
            return Ok(true);
        }
        self.finish_pass(i)?;
        Ok(true)
    }

    /// Picks the version due next (fewest passes first, then the newest) and opens it.
    fn start_next_pass(&mut self) -> Result<bool, Stopping> {
        let now_ms = unix_time_us() / 1000;
        let interval = self.config.pass_interval_ms as i64;
        let resend_ms = self.config.resend_for_secs as i64 * 1000;
        let passes = self.config.passes;
        let due = |v: &Version| {
            let wanted = v.passes < passes
                || v.first_pass_unix_ms
                    .is_some_and(|first| now_ms - first < resend_ms);
            let rested = v
                .last_pass_unix_ms
                .is_none_or(|last| now_ms - last >= interval);
            !v.removed && wanted && rested
        };
        // A pass cut short by a restart goes on first.
        let resumed = self.carousel.progress.clone().and_then(|p| {
            self.carousel
                .versions
                .iter()
                .position(|v| v.file_id == p.file_id && !v.removed)
                .map(|i| (i, p))
        });
        let (i, pass_no, offset) = match resumed {
            Some((i, p)) if p.clean => (i, p.pass, p.offset),
            Some((i, p)) => (
                i,
                p.pass,
                p.offset
                    .saturating_sub((self.ctx.queued_ahead_bytes + self.config.chunk_bytes) as u64),
            ),
            None => {
                let next = self
                    .carousel
                    .versions
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| due(v))
                    .min_by_key(|(_, v)| (v.passes, std::cmp::Reverse(v.mtime_ns)))
                    .map(|(i, _)| i);
                match next {
                    Some(i) => (i, self.carousel.versions[i].passes + 1, 0),
                    None => return Ok(false),
                }
            }
        };
        let version = self.carousel.versions[i].clone();
        let path = self
            .config
            .dir
            .join(std::ffi::OsStr::from_bytes(&version.path));
        let file = match std::fs::OpenOptions::new()
            .read(true)
            // A file replaced by a symbolic link since the scan is not followed out of the tree.
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
        {
            Ok(file) => file,
            Err(e) => {
                self.abandon(i, "unreadable", &e.to_string());
                return Ok(true);
            }
        };
        let unchanged = file
            .metadata()
            .is_ok_and(|meta| Seen::of(&meta) == version.seen());
        if !unchanged {
            self.abandon(i, "changed", "it changed after it was found stable");
            return Ok(true);
        }
        let offset = offset.min(version.size);
        if offset > 0 {
            tracing::info!(topic = %self.ctx.name, path = %String::from_utf8_lossy(&version.path),
                pass = pass_no, offset, "files source: resuming a pass cut short by a restart");
        }
        // A pass resumed mid-file has not seen the start: the digest is read first, whole.
        let mut hasher = None;
        if version.sha256.is_none() {
            if offset == 0 {
                hasher = Some(ring::digest::Context::new(&ring::digest::SHA256));
            } else {
                match diode_common::fsutil::sha256_of(&file, version.size, None) {
                    Ok(digest) => {
                        self.carousel.versions[i].sha256 =
                            Some(diode_common::hex::encode(digest.as_ref()));
                    }
                    Err(e) => {
                        self.abandon(i, "unreadable", &e.to_string());
                        return Ok(true);
                    }
                }
            }
        }
        let manifest = self.manifest(i, pass_no, false);
        self.pass = Some(Pass {
            file_id: version.file_id,
            path: version.path.clone(),
            pass: pass_no,
            file,
            offset,
            hasher,
        });
        self.carousel.progress = Some(Progress {
            file_id: version.file_id,
            pass: pass_no,
            offset,
            clean: false,
        });
        self.carousel.dirty = true;
        self.send(Part::Manifest(manifest))?;
        Ok(true)
    }

    fn manifest(&self, i: usize, pass: u32, end_of_pass: bool) -> FileManifest {
        let v = &self.carousel.versions[i];
        FileManifest {
            file_id: v.file_id,
            path: Bytes::from(v.path.clone()),
            size: v.size,
            mtime_us: v.mtime_ns.div_euclid(1000),
            mode: v.mode,
            sha256: v
                .sha256
                .as_deref()
                .and_then(diode_common::hex::decode)
                .map(Bytes::from)
                .unwrap_or_default(),
            pass,
            end_of_pass,
            found_us: v.found_unix_us,
        }
    }

    /// The whole file was read: if it did not change meanwhile, the closing manifest carries
    /// its digest and the pass counts.
    fn finish_pass(&mut self, i: usize) -> Result<(), Stopping> {
        let pass = self.pass.take().expect("a pass under way");
        self.carousel.progress = None;
        self.carousel.dirty = true;
        let unchanged = pass
            .file
            .metadata()
            .is_ok_and(|meta| Seen::of(&meta) == self.carousel.versions[i].seen());
        if !unchanged {
            self.abandon(i, "changed", "it changed while being sent");
            return Ok(());
        }
        if let Some(hasher) = pass.hasher {
            self.carousel.versions[i].sha256 =
                Some(diode_common::hex::encode(hasher.finish().as_ref()));
        }
        let manifest = self.manifest(i, pass.pass, true);
        self.send(Part::Manifest(manifest))?;
        let now_ms = unix_time_us() / 1000;
        let version = &mut self.carousel.versions[i];
        version.passes = version.passes.max(pass.pass);
        version.last_pass_unix_ms = Some(now_ms);
        if version.first_pass_unix_ms.is_none() {
            version.first_pass_unix_ms = Some(now_ms);
            self.metrics.sent.inc();
        }
        self.metrics.passes.inc();
        let finished = version.passes >= self.config.passes && self.config.resend_for_secs == 0;
        if finished && self.config.after_send != AfterSend::Keep {
            // Not yet: the closing records are only queued. `transfer_due` removes it once
            // the topic's queue is empty and a moment has passed for the encoder to send them.
            version.transfer_after_unix_ms = Some(now_ms + TRANSFER_GRACE_MS);
            self.carousel.dirty = true;
        }
        self.carousel
            .update_gauges(&self.metrics, self.config.passes);
        Ok(())
    }

    /// Transfer mode: files whose last pass has left the queues leave the watched tree.
    fn transfer_due(&mut self) {
        // The bulk queue is every files topic's: while another keeps it busy, the grace alone
        // (long enough for the queue to drain at any usable rate) has to do.
        let queue_empty = self.ctx.budget.used() == 0;
        let now_ms = unix_time_us() / 1000;
        let due_at = |at: i64| now_ms >= at && (queue_empty || now_ms >= at + TRANSFER_WAIT_MS);
        let due: Vec<Vec<u8>> = self
            .carousel
            .versions
            .iter()
            .filter(|v| !v.removed && v.transfer_after_unix_ms.is_some_and(due_at))
            .map(|v| v.path.clone())
            .collect();
        for rel in due {
            if let Some(&i) = self.carousel.by_path.get(&rel) {
                self.transfer_done(i);
            }
        }
    }

    /// Transfer mode: the file has had its passes; it leaves the watched tree, unless what is
    /// at its path now is not the version sent (replaced since, by a rename into place).
    fn transfer_done(&mut self, i: usize) {
        let rel = self.carousel.versions[i].path.clone();
        let path = self.config.dir.join(std::ffi::OsStr::from_bytes(&rel));
        let now = std::fs::symlink_metadata(&path)
            .ok()
            .map(|meta| Seen::of(&meta));
        if now != Some(self.carousel.versions[i].seen()) {
            self.carousel.versions[i].transfer_after_unix_ms = None;
            return;
        }
        let result = match (self.config.after_send, &self.config.move_to) {
            (AfterSend::Delete, _) => std::fs::remove_file(&path),
            (AfterSend::Move, Some(to)) => {
                let target = to.join(std::ffi::OsStr::from_bytes(&rel));
                target
                    .parent()
                    .map_or(Ok(()), std::fs::create_dir_all)
                    .and_then(|()| std::fs::rename(&path, &target))
            }
            _ => Ok(()),
        };
        match result {
            Ok(()) => {
                self.carousel.remove(&rel);
            }
            Err(e) => {
                self.carousel.versions[i].removed = true;
                self.ctx.metrics.errors_io.inc();
                tracing::warn!(topic = %self.ctx.name, path = %path.display(), error = %e,
                    "files source: cannot remove a sent file (transfer mode)");
            }
        }
    }

    /// The version cannot be sent as it is: out of the carousel. If the file is still there, it
    /// is found again (as a new version once stable).
    fn abandon(&mut self, i: usize, reason: &'static str, why: &str) {
        let version = self.carousel.versions[i].clone();
        self.end_pass_of(version.file_id);
        // Abandoned as it opened: its resumed progress, if it had one, is void too.
        self.carousel.progress = None;
        self.carousel.remove(&version.path);
        self.metrics.skipped(reason).inc();
        tracing::info!(topic = %self.ctx.name, path = %String::from_utf8_lossy(&version.path),
            reason, why, "files source: version not sent; it is taken again once stable");
    }
}

/// Walks `dir` (not following symbolic links), collecting regular files by path below `root`.
/// Returns whether every directory and entry could be read.
fn walk(
    dir: &Path,
    root: &Path,
    depth: usize,
    found: &mut Vec<(Vec<u8>, std::fs::Metadata)>,
) -> bool {
    if depth > MAX_DEPTH {
        return false;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    let mut whole = true;
    for entry in entries {
        let Ok(entry) = entry else {
            whole = false;
            continue;
        };
        let Ok(kind) = entry.file_type() else {
            whole = false;
            continue;
        };
        let path = entry.path();
        if kind.is_dir() {
            whole &= walk(&path, root, depth + 1, found);
        } else if kind.is_file() {
            let (Ok(rel), Ok(meta)) = (path.strip_prefix(root), entry.metadata()) else {
                whole = false;
                continue;
            };
            found.push((rel.as_os_str().as_bytes().to_vec(), meta));
        }
    }
    whole
}

fn mtime_ns(meta: &std::fs::Metadata) -> i64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as i64)
}

/// A version's id: the same path, size, mtime and inode give the same id after a restart, and
/// any change gives another (wire-format.md §5.6).
fn file_id(rel: &[u8], seen: Seen) -> u64 {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(rel);
    context.update(&[0]);
    context.update(&seen.size.to_le_bytes());
    context.update(&seen.mtime_ns.to_le_bytes());
    context.update(&seen.ino.to_le_bytes());
    let digest = context.finish();
    u64::from_le_bytes(digest.as_ref()[..8].try_into().expect("8 bytes"))
}
