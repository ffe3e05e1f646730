//! The files sink: a target directory that mirrors what a files source sends (wire-format.md
//! §5.6). Each file version is written under a temporary name in `<dir>/.diode-files/partial`,
//! verified against its SHA-256, then renamed into place, so a consumer never sees a file half
//! written or corrupt. What a pass of the sender's carousel missed is reported and filled by a
//! later pass; what is held survives a restart.
//!
//! A path from the wire is hostile until checked: [`diode_wire::files::check_path`] refuses
//! absolute paths, `..`, device names and the like, and every directory on the way is opened
//! relative to the one before it without following symbolic links, so nothing is ever written
//! outside the target directory whatever the tree holds.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use bytes::Bytes;
use diode_common::config::{default_u64, default_usize, ConfigError};
use diode_common::LogThrottle;
use diode_wire::files::{check_path, Part, PathRefused, RangeSet, RESERVED_NAME};
use diode_wire::proto::{FileChunk, FileDeleted, FileManifest};
use diode_wire::Record;
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use serde::{Deserialize, Serialize};

use super::{Refusals, Scope, Sink, SinkError, SinkSettings};
use crate::metrics::{FileMetrics, RouteMetrics};
use crate::route::RouteTask;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesConfig {
    /// The target directory, relative to the configuration file: the mirror of the plant's.
    pub dir: PathBuf,
    /// Old versions of a path kept when a newer one (or a deletion) replaces it, under
    /// `<dir>/.diode-files/versions/<path>/`; 0: replaced versions are gone.
    #[serde(default)]
    pub keep_versions: usize,
    /// Remove a file here when the plant side says it deleted it (a source with
    /// `propagate_deletions`), if the version held here is the one deleted there.
    #[serde(default = "default_true")]
    pub apply_deletions: bool,
    /// File versions being put together at once, at most; past that the one touched longest ago
    /// is given up (counted, `reason="evicted"`) and starts again with its next pass.
    #[serde(default = "default_usize::<1024>")]
    pub max_incomplete_files: usize,
    /// Bytes held in incomplete versions, in all, at most: past that the version touched longest
    /// ago is given up (counted, `reason="evicted"`).
    #[serde(default = "default_u64::<{ 64 << 30 }>")]
    pub max_incomplete_bytes: u64,
    /// An incomplete version that receives nothing for this long is given up.
    #[serde(default = "default_u64::<{ 7 * 86_400 }>")]
    pub incomplete_timeout_secs: u64,
    /// Larger files are refused.
    #[serde(default = "default_u64::<{ 1 << 40 }>")]
    pub max_file_bytes: u64,
    /// Sync each file and its directory before it counts as received, so a power cut cannot
    /// leave an empty or partial file under its final name.
    #[serde(default = "default_true")]
    pub fsync: bool,
}

fn default_true() -> bool {
    true
}

impl FilesConfig {
    pub fn check(&self, scope: &Scope<'_>) -> Result<FilesConfig, ConfigError> {
        let dir = scope.resolve(&self.dir);
        scope.writable_dir("dir", &dir)?;
        if self.max_incomplete_files == 0 {
            return Err(scope.invalid("max_incomplete_files", "must be at least 1"));
        }
        Ok(FilesConfig {
            dir,
            ..self.clone()
        })
    }
}

impl SinkSettings for FilesConfig {
    fn describe(&self) -> String {
        format!(
            "files into {} (verified, renamed into place{}{})",
            self.dir.display(),
            if self.apply_deletions {
                ", deletions applied"
            } else {
                ""
            },
            if self.keep_versions > 0 {
                format!(", {} old versions kept", self.keep_versions)
            } else {
                String::new()
            }
        )
    }

    fn start(&self, route: RouteTask) -> std::io::Result<tokio::task::JoinHandle<()>> {
        let metrics = route.file_metrics();
        let mirror = Mirror::open(self.clone(), metrics, route.name().to_owned())?;
        Ok(route.spawn(FilesSink {
            mirror: Arc::new(Mutex::new(mirror)),
        }))
    }
}

pub struct FilesSink {
    mirror: Arc<Mutex<Mirror>>,
}

impl Drop for Mirror {
    /// Whatever way the sink ends (a clean stop that ran out of time included), the ranges held
    /// are written out.
    fn drop(&mut self) {
        self.save_all();
    }
}

impl Sink for FilesSink {
    async fn deliver(
        &mut self,
        records: &[Record],
        _metrics: &RouteMetrics,
    ) -> Result<Refusals, SinkError> {
        // File I/O, hashing and fsync: off the runtime's two workers.
        let mirror = self.mirror.clone();
        let records = records.to_vec();
        tokio::task::spawn_blocking(move || {
            let mut mirror = mirror.lock().unwrap_or_else(|e| e.into_inner());
            mirror.apply(&records)
        })
        .await
        .map_err(|e| SinkError::Io(std::io::Error::other(e)))?
    }

    fn close(&mut self) -> impl std::future::Future<Output = ()> + Send {
        let mirror = self.mirror.clone();
        async move {
            let _ = tokio::task::spawn_blocking(move || {
                let mut mirror = mirror.lock().unwrap_or_else(|e| e.into_inner());
                mirror.save_all();
            })
            .await;
        }
    }
}

/// A file version held in more pieces than this is given up (a sender scattering bytes).
const MAX_RANGES: usize = 16_384;
/// Versions remembered as refused (bad path, too large, older than what is held), so their
/// chunks are dropped without work.
const MAX_REFUSED: usize = 4096;
/// Paths remembered as installed, with their version: a carousel's later passes of them cost
/// nothing. Past this, the oldest are forgotten, and at worst installed again.
const MAX_INSTALLED: usize = 1_000_000;
/// Partial files kept open at once.
const MAX_OPEN: usize = 16;
/// A partial version's ranges are written at most this often.
const PARTIAL_SAVE_INTERVAL: Duration = Duration::from_secs(1);
/// The installed index is written at most this often.
const INDEX_SAVE_INTERVAL: Duration = Duration::from_secs(5);

/// The target directory and what is on its way into it. All of it runs on the blocking pool.
struct Mirror {
    config: FilesConfig,
    route: String,
    metrics: FileMetrics,
    /// The target directory, opened once: every path is resolved from it.
    root: OwnedFd,
    /// `<dir>/.diode-files/partial`.
    partial_dir: PathBuf,
    partial_fd: OwnedFd,
    incomplete: HashMap<u64, Partial>,
    /// Bytes the incomplete versions hold, in all.
    held_bytes: u64,
    /// Path → the version installed there.
    installed: HashMap<String, Installed>,
    installed_ids: HashMap<u64, String>,
    index_dirty: bool,
    index_saved: Instant,
    refused: VecDeque<u64>,
    refused_set: HashSet<u64>,
    last_expiry: Instant,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Installed {
    file_id: u64,
    /// When the sender found the version (wire-format.md §5.6): what orders versions.
    #[serde(default)]
    found_us: i64,
    mtime_us: i64,
    size: u64,
}

/// A version being put together.
struct Partial {
    manifest: Option<FileManifest>,
    held: RangeSet,
    /// SHA-256 of bytes `[0, .0)`, fed as chunks arrive in order, so verifying a file that came
    /// in order reads nothing back.
    prefix_hash: Option<(u64, ring::digest::Context)>,
    file: Option<File>,
    touched: Instant,
    touched_unix_s: i64,
    dirty: bool,
    /// When its ranges were last written to `<id>.json`.
    saved: Instant,
    /// The last pass whose end found bytes missing, so it is reported once.
    reported_pass: u32,
}

/// What `<id>.json` keeps of a partial version across restarts.
#[derive(Serialize, Deserialize)]
struct PartialMeta {
    path_base64: Option<String>,
    size: u64,
    mtime_us: i64,
    #[serde(default)]
    found_us: i64,
    mode: u32,
    sha256_base64: Option<String>,
    ranges: Vec<(u64, u64)>,
    touched_unix_s: i64,
}

/// Why a version does not make it into the target directory (`diode_files_failed_total`).
#[derive(Debug, Clone, Copy)]
enum Failed {
    Path,
    TooLarge,
    Verify,
    Conflict,
    Fragmented,
    Evicted,
    Expired,
    Io,
}

impl Failed {
    fn reason(self) -> &'static str {
        match self {
            Failed::Path => "path",
            Failed::TooLarge => "too_large",
            Failed::Verify => "verify",
            Failed::Conflict => "conflict",
            Failed::Fragmented => "fragmented",
            Failed::Evicted => "evicted",
            Failed::Expired => "expired",
            Failed::Io => "io",
        }
    }
}

fn id_hex(id: u64) -> String {
    format!("{id:016x}")
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(text: &str) -> Option<Bytes> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()
        .map(Bytes::from)
}

fn io_err(e: rustix::io::Errno) -> std::io::Error {
    e.into()
}

/// Opens a directory without following a symbolic link in its place.
fn open_dir_at(parent: &OwnedFd, name: &str) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Opens (making it if need be) each directory of `names` in turn, from `root`, refusing a
/// symbolic link or a non-directory on the way.
fn walk_dirs(root: &OwnedFd, names: &[&str]) -> std::io::Result<OwnedFd> {
    let mut dir = rustix::io::dup(root).map_err(io_err)?;
    for name in names {
        let next = match open_dir_at(&dir, name) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => {
                match rustix::fs::mkdirat(&dir, *name, Mode::from_raw_mode(0o750)) {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(io_err(e)),
                }
                open_dir_at(&dir, name).map_err(io_err)?
            }
            Err(e) => return Err(io_err(e)),
        };
        dir = next;
    }
    Ok(dir)
}

impl Mirror {
    fn open(config: FilesConfig, metrics: FileMetrics, route: String) -> std::io::Result<Mirror> {
        std::fs::create_dir_all(&config.dir)?;
        let root = rustix::fs::open(
            &config.dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io_err)?;
        let partial_fd = walk_dirs(&root, &[RESERVED_NAME, "partial"])?;
        let partial_dir = config.dir.join(RESERVED_NAME).join("partial");
        let mut mirror = Mirror {
            config,
            route,
            metrics,
            root,
            partial_dir,
            partial_fd,
            incomplete: HashMap::new(),
            held_bytes: 0,
            installed: HashMap::new(),
            installed_ids: HashMap::new(),
            index_dirty: false,
            index_saved: Instant::now(),
            refused: VecDeque::new(),
            refused_set: HashSet::new(),
            last_expiry: Instant::now(),
        };
        mirror.load();
        Ok(mirror)
    }

    fn index_path(&self) -> PathBuf {
        self.config.dir.join(RESERVED_NAME).join("installed.json")
    }

    /// What the last run left: the installed index and every partial version with its ranges.
    fn load(&mut self) {
        if let Ok(text) = std::fs::read(self.index_path()) {
            match serde_json::from_slice::<HashMap<String, Installed>>(&text) {
                Ok(index) => {
                    self.installed_ids = index
                        .iter()
                        .map(|(path, i)| (i.file_id, path.clone()))
                        .collect();
                    self.installed = index;
                }
                Err(e) => tracing::warn!(route = %self.route, error = %e,
                    "the files sink's installed index does not parse: versions already installed will be installed again"),
            }
        }
        let Ok(entries) = std::fs::read_dir(&self.partial_dir) else {
            return;
        };
        let now_unix = diode_common::unix_time_us() / 1_000_000;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            let Ok(id) = u64::from_str_radix(stem, 16) else {
                continue;
            };
            let meta = std::fs::read(entry.path())
                .ok()
                .and_then(|text| serde_json::from_slice::<PartialMeta>(&text).ok());
            let Some(meta) = meta else {
                self.discard_files(id);
                continue;
            };
            let age = Duration::from_secs(now_unix.saturating_sub(meta.touched_unix_s) as u64);
            let manifest = meta
                .path_base64
                .as_deref()
                .and_then(unb64)
                .map(|path| FileManifest {
                    file_id: id,
                    path,
                    size: meta.size,
                    mtime_us: meta.mtime_us,
                    mode: meta.mode,
                    sha256: meta
                        .sha256_base64
                        .as_deref()
                        .and_then(unb64)
                        .unwrap_or_default(),
                    pass: 0,
                    end_of_pass: false,
                    found_us: meta.found_us,
                });
            let held = RangeSet::from_ranges(meta.ranges);
            self.held_bytes += held.len();
            self.incomplete.insert(
                id,
                Partial {
                    manifest,
                    held,
                    prefix_hash: None,
                    file: None,
                    touched: Instant::now().checked_sub(age).unwrap_or_else(Instant::now),
                    touched_unix_s: meta.touched_unix_s,
                    dirty: false,
                    saved: Instant::now(),
                    reported_pass: 0,
                },
            );
        }
        // A .part whose .json was never written holds nothing known: it starts again.
        if let Ok(entries) = std::fs::read_dir(&self.partial_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let known = name
                    .to_str()
                    .and_then(|n| n.strip_suffix(".part"))
                    .and_then(|stem| u64::from_str_radix(stem, 16).ok())
                    .is_some_and(|id| self.incomplete.contains_key(&id));
                if !known && name.to_str().is_some_and(|n| n.ends_with(".part")) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        if !self.incomplete.is_empty() {
            tracing::info!(route = %self.route, files = self.incomplete.len(),
                "files sink: incomplete versions carried over from the last run");
        }
        self.metrics.incomplete.set(self.incomplete.len() as i64);
    }

    /// Takes a batch: every record is applied before the batch counts as delivered. Records
    /// that can never be used (not a file part, a hostile path) come back as refusals, for the
    /// route's dead letters.
    fn apply(&mut self, records: &[Record]) -> Result<Refusals, SinkError> {
        let mut refusals = Refusals::new();
        for (i, record) in records.iter().enumerate() {
            if !diode_wire::files::is_file_part(record.origin.as_ref()) {
                refusals.push((
                    i,
                    "not a file part: the files sink takes only a files source's records".into(),
                ));
                continue;
            }
            let part = match Part::decode(record.payload.clone()) {
                Ok(part) => part,
                Err(e) => {
                    refusals.push((i, format!("not a file part: {e}")));
                    continue;
                }
            };
            let result = match part {
                Part::Manifest(m) => self.manifest(m),
                Part::Chunk(c) => self.chunk(c),
                Part::Deleted(d) => self.deleted(d),
            };
            match result {
                Ok(()) => {}
                Err(Outcome::Refused(why)) => refusals.push((i, why)),
                Err(Outcome::Io(e)) => {
                    // A full disk fails every retry: what has waited too long makes room.
                    self.expire();
                    self.save_all();
                    return Err(SinkError::Io(e));
                }
            }
        }
        self.save_dirty(false);
        if self.last_expiry.elapsed() >= Duration::from_secs(10) {
            self.last_expiry = Instant::now();
            self.expire();
        }
        self.metrics.incomplete.set(self.incomplete.len() as i64);
        Ok(refusals)
    }

    fn is_refused(&self, id: u64) -> bool {
        self.refused_set.contains(&id)
    }

    fn refuse(&mut self, id: u64, failed: Option<Failed>) {
        if let Some(failed) = failed {
            self.metrics.failed(failed.reason()).inc();
        }
        if self.take_partial(&id).is_some() {
            self.discard_files(id);
        }
        if self.refused_set.insert(id) {
            self.refused.push_back(id);
            if self.refused.len() > MAX_REFUSED {
                if let Some(old) = self.refused.pop_front() {
                    self.refused_set.remove(&old);
                }
            }
        }
    }

    /// Whether `path` holds a version found after `m` (or, from senders that do not say when
    /// they found a version, modified after it).
    fn newer_installed(&self, path: &str, m: &FileManifest) -> bool {
        self.installed
            .get(path)
            .is_some_and(|held| (held.found_us, held.mtime_us) > (m.found_us, m.mtime_us))
    }

    /// Whether this version is the one installed at its path, and still there.
    fn is_installed(&self, id: u64) -> bool {
        self.installed_ids.contains_key(&id)
    }

    fn manifest(&mut self, m: FileManifest) -> Result<(), Outcome> {
        let id = m.file_id;
        if self.is_refused(id) {
            return Ok(());
        }
        if self.is_installed(id) {
            // The carousel sends it again; if a consumer removed the file here meanwhile, this
            // pass brings it back.
            if !m.end_of_pass || self.still_installed(id) {
                return Ok(());
            }
            self.forget_installed(id);
        }
        let names = match check_path(&m.path) {
            Ok(names) => names.join("/"),
            Err(why) => {
                self.refuse(id, Some(Failed::Path));
                return Err(Outcome::Refused(refused_path(&m.path, why)));
            }
        };
        if m.size > self.config.max_file_bytes {
            self.refuse(id, Some(Failed::TooLarge));
            return Err(Outcome::Refused(format!(
                "{names}: {} bytes, more than max_file_bytes ({})",
                m.size, self.config.max_file_bytes
            )));
        }
        if self.newer_installed(&names, &m) {
            // An older version still in the carousel: the newer one stays.
            static OLDER: LogThrottle = LogThrottle::new(Duration::from_secs(60));
            if let Some(folded) = OLDER.allow() {
                tracing::info!(route = %self.route, path = %names, file_id = %id_hex(id), folded,
                    "an older version of a file held here arrived: not installed (the sender found it earlier)");
            }
            self.refuse(id, None);
            return Ok(());
        }
        let partial = self.partial(id)?;
        if partial
            .held
            .ranges()
            .last()
            .is_some_and(|&(_, end)| end > m.size)
        {
            // Chunks came first that this manifest says are past the end: not one version.
            self.refuse(id, Some(Failed::Verify));
            return Ok(());
        }
        let sha = match &partial.manifest {
            Some(known) if m.sha256.is_empty() => known.sha256.clone(),
            _ => m.sha256.clone(),
        };
        let end_of_pass = m.end_of_pass;
        let pass = m.pass;
        if end_of_pass {
            // The end of a pass may be the last record for a while: its ranges are written now.
            if let Some(due) = Instant::now().checked_sub(PARTIAL_SAVE_INTERVAL) {
                partial.saved = due;
            }
        }
        partial.manifest = Some(FileManifest { sha256: sha, ..m });
        partial.dirty = true;
        if self.ready(id) {
            return self.complete(id);
        }
        if end_of_pass {
            self.report_incomplete(id, pass);
        }
        Ok(())
    }

    fn chunk(&mut self, c: FileChunk) -> Result<(), Outcome> {
        let id = c.file_id;
        if self.is_refused(id) || self.is_installed(id) || c.data.is_empty() {
            return Ok(());
        }
        let end = c.offset + c.data.len() as u64;
        let too_far = match self.incomplete.get(&id).and_then(|p| p.manifest.as_ref()) {
            Some(m) => end > m.size,
            None => end > self.config.max_file_bytes,
        };
        if too_far {
            self.refuse(id, Some(Failed::TooLarge));
            return Ok(());
        }
        let partial = self.partial(id)?;
        let new = match partial.held.insert(c.offset, end, MAX_RANGES) {
            Ok(new) => new,
            Err(_) => {
                self.refuse(id, Some(Failed::Fragmented));
                return Ok(());
            }
        };
        if new == 0 {
            return Ok(());
        }
        self.held_bytes += new;
        self.bound_held_bytes(id);
        let partial = self.incomplete.get_mut(&id).expect("made above");
        if partial.file.is_none() {
            let open_now = self
                .incomplete
                .values()
                .filter(|p| p.file.is_some())
                .count();
            if open_now >= MAX_OPEN {
                // Few versions are written at once (the sender sends one file at a time); the
                // handles of others are closed rather than held.
                for other in self.incomplete.values_mut() {
                    other.file = None;
                }
            }
            let file = self.open_partial(id).map_err(Outcome::Io)?;
            self.incomplete.get_mut(&id).expect("made above").file = Some(file);
        }
        let partial = self.incomplete.get_mut(&id).expect("made above");
        let file = partial.file.as_ref().expect("opened above");
        file.write_all_at(&c.data, c.offset).map_err(Outcome::Io)?;
        if partial
            .prefix_hash
            .as_ref()
            .is_some_and(|(hashed, _)| c.offset < *hashed)
        {
            // Bytes already hashed were written again: verification reads the file back.
            partial.prefix_hash = None;
        } else if let Some((hashed, context)) = &mut partial.prefix_hash {
            if *hashed == c.offset {
                context.update(&c.data);
                *hashed = end;
            }
        } else if c.offset == 0 {
            let mut context = ring::digest::Context::new(&ring::digest::SHA256);
            context.update(&c.data);
            partial.prefix_hash = Some((end, context));
        }
        self.metrics.bytes_written.inc_by(c.data.len() as u64);
        if self.ready(id) {
            return self.complete(id);
        }
        Ok(())
    }

    fn deleted(&mut self, d: FileDeleted) -> Result<(), Outcome> {
        if !self.config.apply_deletions {
            return Ok(());
        }
        let Ok(names) = check_path(&d.path) else {
            return Ok(());
        };
        let path = names.join("/");
        if self
            .installed
            .get(&path)
            .is_none_or(|i| i.file_id != d.file_id)
        {
            // Not the version deleted on the plant side (or already gone): left alone.
            return Ok(());
        }
        let (parent_names, name) = names.split_at(names.len() - 1);
        let removed = walk_dirs(&self.root, parent_names).and_then(|parent| {
            if self.config.keep_versions > 0 {
                self.keep_old_version(&parent, name[0], &names, d.file_id)
            } else {
                match rustix::fs::unlinkat(&parent, name[0], AtFlags::empty()) {
                    Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
                    Err(e) => Err(io_err(e)),
                }
            }
        });
        if let Err(e) = removed {
            // Not retried: a deletion that cannot be done now must not hold the route up.
            tracing::warn!(route = %self.route, path = %path, error = %e,
                "file deleted on the plant side could not be removed here");
            self.metrics.failed(Failed::Io.reason()).inc();
            return Ok(());
        }
        self.forget_installed(d.file_id);
        self.metrics.deleted.inc();
        tracing::info!(route = %self.route, path = %path, "file deleted, as on the plant side");
        Ok(())
    }

    /// Takes a version out of those being put together.
    fn take_partial(&mut self, id: &u64) -> Option<Partial> {
        let partial = self.incomplete.remove(id)?;
        self.held_bytes = self.held_bytes.saturating_sub(partial.held.len());
        Some(partial)
    }

    /// Past `max_incomplete_bytes`, the versions touched longest ago (but `keep`) start again
    /// with their next pass.
    fn bound_held_bytes(&mut self, keep: u64) {
        while self.held_bytes > self.config.max_incomplete_bytes {
            let oldest = self
                .incomplete
                .iter()
                .filter(|(id, _)| **id != keep)
                .min_by_key(|(_, p)| p.touched)
                .map(|(id, _)| *id);
            let Some(oldest) = oldest else {
                return;
            };
            tracing::warn!(route = %self.route, file_id = %id_hex(oldest),
                "files sink: incomplete versions hold max_incomplete_bytes; the oldest starts again with its next pass");
            self.metrics.failed(Failed::Evicted.reason()).inc();
            self.take_partial(&oldest);
            self.discard_files(oldest);
        }
    }

    /// The partial version `id`, made if new (giving up the least recently touched one if there
    /// are too many).
    fn partial(&mut self, id: u64) -> Result<&mut Partial, Outcome> {
        if !self.incomplete.contains_key(&id) {
            if self.incomplete.len() >= self.config.max_incomplete_files {
                let oldest = self
                    .incomplete
                    .iter()
                    .min_by_key(|(_, p)| p.touched)
                    .map(|(id, _)| *id);
                if let Some(oldest) = oldest {
                    tracing::warn!(route = %self.route, file_id = %id_hex(oldest),
                        "files sink: too many incomplete versions (max_incomplete_files); the oldest starts again with its next pass");
                    self.metrics.failed(Failed::Evicted.reason()).inc();
                    self.take_partial(&oldest);
                    self.discard_files(oldest);
                }
            }
            self.incomplete.insert(
                id,
                Partial {
                    manifest: None,
                    held: RangeSet::default(),
                    prefix_hash: None,
                    file: None,
                    touched: Instant::now(),
                    touched_unix_s: 0,
                    dirty: true,
                    saved: Instant::now(),
                    reported_pass: 0,
                },
            );
        }
        let partial = self.incomplete.get_mut(&id).expect("inserted above");
        partial.touched = Instant::now();
        partial.dirty = true;
        Ok(partial)
    }

    /// `<id>.part`, made if new, never through a symbolic link.
    fn open_partial(&self, id: u64) -> std::io::Result<File> {
        let fd = rustix::fs::openat(
            &self.partial_fd,
            format!("{}.part", id_hex(id)),
            OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(io_err)?;
        Ok(File::from(fd))
    }

    /// Whole and with its digest known.
    fn ready(&self, id: u64) -> bool {
        self.incomplete.get(&id).is_some_and(|p| {
            p.manifest
                .as_ref()
                .is_some_and(|m| m.sha256.len() == 32 && p.held.covers(m.size))
        })
    }

    fn report_incomplete(&mut self, id: u64, pass: u32) {
        static REPORTED: LogThrottle = LogThrottle::new(Duration::from_secs(1));
        let Some(partial) = self.incomplete.get_mut(&id) else {
            return;
        };
        let Some(manifest) = &partial.manifest else {
            return;
        };
        if partial.reported_pass >= pass && pass != 0 {
            return;
        }
        partial.reported_pass = pass;
        self.metrics.incomplete_passes.inc();
        if let Some(folded) = REPORTED.allow() {
            let missing: Vec<String> = partial
                .held
                .missing(manifest.size, 8)
                .iter()
                .map(|(s, e)| format!("{s}..{e}"))
                .collect();
            tracing::warn!(route = %self.route, path = %String::from_utf8_lossy(&manifest.path),
                file_id = %id_hex(id), pass, held_bytes = partial.held.len(), size = manifest.size,
                missing = %missing.join(","), folded,
                "file incomplete after a pass of the carousel: kept, and completed by a later pass");
        }
    }

    /// Verifies a whole version and renames it into place.
    fn complete(&mut self, id: u64) -> Result<(), Outcome> {
        // The I/O that can fail for a while (no descriptors, a read error) comes first, with the
        // version still held: the batch is offered again and finds its ranges where they were.
        let partial = self.incomplete.get_mut(&id).expect("ready");
        let size = partial.manifest.as_ref().expect("ready").size;
        let (held_file, prefix) = (partial.file.take(), partial.prefix_hash.take());
        let file = match held_file {
            Some(file) => file,
            None => self.open_partial(id).map_err(Outcome::Io)?,
        };
        file.set_len(size).map_err(Outcome::Io)?;
        let digest = diode_common::fsutil::sha256_of(&file, size, prefix).map_err(Outcome::Io)?;
        let mut partial = self.take_partial(&id).expect("ready");
        let manifest = partial.manifest.take().expect("ready");
        let path_text = String::from_utf8_lossy(&manifest.path).into_owned();
        if digest.as_ref() != &manifest.sha256[..] {
            tracing::warn!(route = %self.route, path = %path_text, file_id = %id_hex(id),
                "file failed verification (SHA-256 differs): not installed, taken again from the next pass");
            self.metrics.failed(Failed::Verify.reason()).inc();
            self.discard_files(id);
            return Ok(());
        }
        let names: Vec<&str> = check_path(&manifest.path).expect("checked at the manifest");
        if self.newer_installed(&names.join("/"), &manifest) {
            // A newer version was installed while this one was put together.
            self.discard_files(id);
            return Ok(());
        }
        match self.install(&file, id, &manifest, &names) {
            Ok(()) => {}
            Err(Outcome::Refused(why)) => {
                tracing::warn!(route = %self.route, path = %path_text, file_id = %id_hex(id), why = %why,
                    "file not installed");
                self.refuse(id, Some(Failed::Conflict));
                self.discard_files(id);
                return Ok(());
            }
            Err(Outcome::Io(e)) => {
                tracing::warn!(route = %self.route, path = %path_text, error = %e, "file not installed");
                self.metrics.failed(Failed::Io.reason()).inc();
                self.discard_files(id);
                return Ok(());
            }
        }
        let _ = std::fs::remove_file(self.partial_dir.join(format!("{}.json", id_hex(id))));
        let path = names.join("/");
        if let Some(old) = self.installed.insert(
            path.clone(),
            Installed {
                file_id: id,
                found_us: manifest.found_us,
                mtime_us: manifest.mtime_us,
                size: manifest.size,
            },
        ) {
            self.installed_ids.remove(&old.file_id);
        }
        self.installed_ids.insert(id, path.clone());
        self.bound_index();
        self.index_dirty = true;
        self.metrics.received.inc();
        self.metrics.bytes_received.inc_by(manifest.size);
        tracing::info!(route = %self.route, path = %path, size = manifest.size, file_id = %id_hex(id),
            "file received and verified");
        Ok(())
    }

    fn install(
        &mut self,
        file: &File,
        id: u64,
        manifest: &FileManifest,
        names: &[&str],
    ) -> Result<(), Outcome> {
        let mtime = SystemTime::UNIX_EPOCH + Duration::from_micros(manifest.mtime_us.max(0) as u64);
        file.set_permissions(std::fs::Permissions::from_mode(manifest.mode & 0o775))
            .map_err(Outcome::Io)?;
        file.set_times(std::fs::FileTimes::new().set_modified(mtime))
            .map_err(Outcome::Io)?;
        if self.config.fsync {
            file.sync_all().map_err(Outcome::Io)?;
        }
        let (parent_names, name) = names.split_at(names.len() - 1);
        let name = name[0];
        let parent = match walk_dirs(&self.root, parent_names) {
            Ok(parent) => parent,
            Err(e) if e.raw_os_error().is_some_and(is_not_a_dir) => {
                return Err(Outcome::Refused(format!(
                    "a symbolic link or a file stands where a directory of its path should be ({e})"
                )))
            }
            Err(e) => return Err(Outcome::Io(e)),
        };
        match rustix::fs::statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => match FileType::from_raw_mode(stat.st_mode) {
                FileType::RegularFile => {
                    if self.config.keep_versions > 0 {
                        let old_id = self.installed.get(&names.join("/")).map(|i| i.file_id);
                        self.keep_old_version(&parent, name, names, old_id.unwrap_or(0))
                            .map_err(Outcome::Io)?;
                    }
                }
                other => {
                    return Err(Outcome::Refused(format!(
                        "a {other:?} is in the way of the file"
                    )))
                }
            },
            Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(Outcome::Io(io_err(e))),
        }
        rustix::fs::renameat(
            &self.partial_fd,
            format!("{}.part", id_hex(id)),
            &parent,
            name,
        )
        .map_err(|e| Outcome::Io(io_err(e)))?;
        if self.config.fsync {
            rustix::fs::fsync(&parent).map_err(|e| Outcome::Io(io_err(e)))?;
        }
        Ok(())
    }

    /// Moves the file at `parent/name` to `.diode-files/versions/<path>/<time>-<id>` and keeps
    /// the newest `keep_versions` there.
    fn keep_old_version(
        &self,
        parent: &OwnedFd,
        name: &str,
        names: &[&str],
        old_id: u64,
    ) -> std::io::Result<()> {
        let mut version_dir: Vec<&str> = vec![RESERVED_NAME, "versions"];
        version_dir.extend_from_slice(names);
        let versions = walk_dirs(&self.root, &version_dir)?;
        let stamp =
            diode_common::format_rfc3339_us(diode_common::unix_time_us()).replace([':', '-'], "");
        let kept_name = format!("{stamp}-{}", id_hex(old_id));
        match rustix::fs::renameat(parent, name, &versions, kept_name.as_str()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(io_err(e)),
        }
        // Pruning is best effort: the old version is already out of the way.
        let mut kept: Vec<String> = Vec::new();
        if let Ok(mut listing) = rustix::fs::Dir::read_from(&versions) {
            while let Some(Ok(entry)) = listing.read() {
                let name = entry.file_name().to_string_lossy();
                if name != "." && name != ".." {
                    kept.push(name.into_owned());
                }
            }
        }
        kept.sort();
        let excess = kept.len().saturating_sub(self.config.keep_versions);
        for old in &kept[..excess] {
            let _ = rustix::fs::unlinkat(&versions, old.as_str(), AtFlags::empty());
        }
        Ok(())
    }

    fn still_installed(&self, id: u64) -> bool {
        let Some(path) = self.installed_ids.get(&id) else {
            return false;
        };
        let names: Vec<&str> = path.split('/').collect();
        let (parent_names, name) = names.split_at(names.len() - 1);
        let mut dir = match rustix::io::dup(&self.root) {
            Ok(fd) => fd,
            Err(_) => return true,
        };
        for n in parent_names {
            match open_dir_at(&dir, n) {
                Ok(fd) => dir = fd,
                Err(_) => return false,
            }
        }
        rustix::fs::statat(&dir, name[0], AtFlags::SYMLINK_NOFOLLOW).is_ok()
    }

    fn forget_installed(&mut self, id: u64) {
        if let Some(path) = self.installed_ids.remove(&id) {
            self.installed.remove(&path);
            self.index_dirty = true;
        }
    }

    fn bound_index(&mut self) {
        if self.installed.len() <= MAX_INSTALLED {
            return;
        }
        let mut by_age: Vec<(i64, String)> = self
            .installed
            .iter()
            .map(|(path, i)| (i.mtime_us, path.clone()))
            .collect();
        by_age.sort_unstable();
        for (_, path) in by_age.into_iter().take(MAX_INSTALLED / 10) {
            if let Some(i) = self.installed.remove(&path) {
                self.installed_ids.remove(&i.file_id);
            }
        }
    }

    fn discard_files(&self, id: u64) {
        for ext in ["part", "json"] {
            let _ = std::fs::remove_file(self.partial_dir.join(format!("{}.{ext}", id_hex(id))));
        }
    }

    fn expire(&mut self) {
        let timeout = Duration::from_secs(self.config.incomplete_timeout_secs);
        let expired: Vec<u64> = self
            .incomplete
            .iter()
            .filter(|(_, p)| p.touched.elapsed() >= timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            let partial = self.take_partial(&id).expect("listed above");
            tracing::warn!(route = %self.route, file_id = %id_hex(id),
                path = %partial.manifest.as_ref().map(|m| String::from_utf8_lossy(&m.path).into_owned()).unwrap_or_default(),
                held_bytes = partial.held.len(),
                "incomplete file given up: nothing of it arrived for incomplete_timeout_secs");
            self.metrics.failed(Failed::Expired.reason()).inc();
            self.discard_files(id);
        }
    }

    /// Writes the ranges of every partial version touched since the last save, and the
    /// installed index when it is due.
    fn save_dirty(&mut self, all: bool) {
        let now_unix = diode_common::unix_time_us() / 1_000_000;
        // A file streaming in touches its ranges with every batch: they are written once a
        // second (a restart then takes again at most the last second's chunks), and whole at a
        // stop or a failure.
        let due = |p: &Partial| p.dirty && (all || p.saved.elapsed() >= PARTIAL_SAVE_INTERVAL);
        for (id, partial) in self.incomplete.iter_mut().filter(|(_, p)| due(p)) {
            partial.dirty = false;
            partial.saved = Instant::now();
            partial.touched_unix_s = now_unix;
            let manifest = partial.manifest.as_ref();
            let meta = PartialMeta {
                path_base64: manifest.map(|m| b64(&m.path)),
                size: manifest.map_or(0, |m| m.size),
                mtime_us: manifest.map_or(0, |m| m.mtime_us),
                found_us: manifest.map_or(0, |m| m.found_us),
                mode: manifest.map_or(0, |m| m.mode),
                sha256_base64: manifest
                    .filter(|m| !m.sha256.is_empty())
                    .map(|m| b64(&m.sha256)),
                ranges: partial.held.ranges().to_vec(),
                touched_unix_s: now_unix,
            };
            let path = self.partial_dir.join(format!("{}.json", id_hex(*id)));
            let text = serde_json::to_vec(&meta).expect("serialising to a Vec cannot fail");
            if let Err(e) = diode_common::fsutil::replace_file(&path, &text, 0o600, false) {
                tracing::warn!(route = %self.route, error = %e, "cannot keep a partial file's ranges");
            }
        }
        if self.index_dirty && self.index_saved.elapsed() >= INDEX_SAVE_INTERVAL {
            self.save_index();
        }
    }

    fn save_all(&mut self) {
        self.save_dirty(true);
        if self.index_dirty {
            self.save_index();
        }
    }

    fn save_index(&mut self) {
        self.index_dirty = false;
        self.index_saved = Instant::now();
        let text = serde_json::to_vec(&self.installed).expect("serialising to a Vec cannot fail");
        if let Err(e) =
            diode_common::fsutil::replace_file(&self.index_path(), &text, 0o600, self.config.fsync)
        {
            tracing::warn!(route = %self.route, error = %e, "cannot keep the files sink's installed index");
        }
    }
}

/// How one part of a file could not be taken.
enum Outcome {
    /// Never: to the dead letters, with why.
    Refused(String),
    /// Not now: the batch is offered again.
    Io(std::io::Error),
}

fn refused_path(raw: &[u8], why: PathRefused) -> String {
    let shown: String = String::from_utf8_lossy(raw).chars().take(200).collect();
    format!("path {shown:?} refused: {why}")
}

/// ELOOP (a symbolic link opened with O_NOFOLLOW) or ENOTDIR (a file where a directory should be).
fn is_not_a_dir(errno: i32) -> bool {
    errno == rustix::io::Errno::LOOP.raw_os_error()
        || errno == rustix::io::Errno::NOTDIR.raw_os_error()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::FileFamilies;
    use std::path::Path;

    fn config(dir: &Path) -> FilesConfig {
        FilesConfig {
            dir: dir.to_owned(),
            keep_versions: 0,
            apply_deletions: true,
            max_incomplete_files: 1024,
            max_incomplete_bytes: 1 << 30,
            incomplete_timeout_secs: 3600,
            max_file_bytes: 1 << 30,
            fsync: false,
        }
    }

    fn mirror(config: FilesConfig) -> Mirror {
        Mirror::open(
            config,
            FileFamilies::default().route("files"),
            "files".into(),
        )
        .unwrap()
    }

    fn record(part: Part) -> Record {
        Record {
            topic: "exports".into(),
            seq: 0,
            session_id: 1,
            time_us: 0,
            origin: Some(diode_wire::files::origin()),
            late: false,
            payload: part.encode(),
        }
    }

    fn manifest(id: u64, path: &[u8], data: &[u8], pass: u32, end: bool) -> Record {
        let sha = ring::digest::digest(&ring::digest::SHA256, data);
        record(Part::Manifest(FileManifest {
            file_id: id,
            path: Bytes::copy_from_slice(path),
            size: data.len() as u64,
            mtime_us: 1_700_000_000_000_000 + id as i64,
            mode: 0o640,
            // As the sender does: no digest before the first pass has read the file.
            sha256: if end || pass > 1 {
                Bytes::copy_from_slice(sha.as_ref())
            } else {
                Bytes::new()
            },
            pass,
            end_of_pass: end,
            // Versions with larger ids are found later, so newer.
            found_us: 1_700_000_000_000_000 + id as i64,
        }))
    }

    fn chunks(id: u64, data: &[u8], chunk: usize) -> Vec<Record> {
        data.chunks(chunk)
            .enumerate()
            .map(|(i, piece)| {
                record(Part::Chunk(FileChunk {
                    file_id: id,
                    offset: (i * chunk) as u64,
                    data: Bytes::copy_from_slice(piece),
                }))
            })
            .collect()
    }

    /// A whole pass: manifest, chunks, closing manifest.
    fn pass(id: u64, path: &[u8], data: &[u8], pass_no: u32) -> Vec<Record> {
        let mut records = vec![manifest(id, path, data, pass_no, false)];
        records.extend(chunks(id, data, 1000));
        records.push(manifest(id, path, data, pass_no, true));
        records
    }

    fn data(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn a_whole_pass_is_verified_and_renamed_into_place() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = mirror(config(dir.path()));
        let content = data(10_500, 1);
        let refused = m
            .apply(&pass(7, "line 3/résumé.csv".as_bytes(), &content, 1))
            .unwrap();
        assert!(refused.is_empty());
        let target = dir.path().join("line 3/résumé.csv");
        assert_eq!(std::fs::read(&target).unwrap(), content);
        let meta = std::fs::metadata(&target).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o640);
        let mtime = meta
            .modified()
            .unwrap()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap();
        assert_eq!(mtime.as_micros() as i64, 1_700_000_000_000_007);
        assert_eq!(m.metrics.received.get(), 1);
        assert_eq!(m.metrics.bytes_received.get(), 10_500);
        assert_eq!(m.incomplete.len(), 0);
        assert_eq!(std::fs::read_dir(&m.partial_dir).unwrap().count(), 0);
        // The carousel's next pass costs no write.
        let written = m.metrics.bytes_written.get();
        m.apply(&pass(7, "line 3/résumé.csv".as_bytes(), &content, 2))
            .unwrap();
        assert_eq!(m.metrics.bytes_written.get(), written);
        assert_eq!(m.metrics.received.get(), 1);
    }

    #[test]
    fn a_pass_with_chunks_missing_is_reported_kept_across_a_restart_and_completed_by_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let content = data(5_000, 2);
        let mut first = pass(9, b"report.bin", &content, 1);
        first.remove(3); // chunk 2 of 5 lost beyond FEC
        first.remove(0); // and the opening manifest
        {
            let mut m = mirror(config(dir.path()));
            m.apply(&first).unwrap();
            assert!(!dir.path().join("report.bin").exists());
            assert_eq!(m.metrics.incomplete.get(), 1);
            assert_eq!(m.metrics.incomplete_passes.get(), 1);
            assert_eq!(
                m.incomplete[&9].held.missing(5_000, 8),
                vec![(2_000, 3_000)]
            );
            // A clean stop, as the sink's close does.
            m.save_all();
        }
        // The receiver restarts; the next pass arrives out of order, only the missing chunk
        // counts.
        let mut m = mirror(config(dir.path()));
        assert_eq!(m.incomplete.len(), 1);
        let mut second = pass(9, b"report.bin", &content, 2);
        second.reverse();
        m.apply(&second).unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("report.bin")).unwrap(),
            content
        );
        assert_eq!(m.metrics.received.get(), 1);
        assert_eq!(m.metrics.incomplete.get(), 0);
    }

    #[test]
    fn corrupt_content_is_never_installed_and_the_next_pass_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = mirror(config(dir.path()));
        let content = data(3_000, 3);
        let mut bad = pass(11, b"a.dat", &content, 1);
        // A chunk whose bytes differ from what the digest says (a sender bug, or a forged link
        // without a key).
        bad[2] = record(Part::Chunk(FileChunk {
            file_id: 11,
            offset: 1000,
            data: Bytes::from(vec![0u8; 1000]),
        }));
        m.apply(&bad).unwrap();
        assert!(!dir.path().join("a.dat").exists());
        assert_eq!(m.metrics.failed("verify").get(), 1);
        m.apply(&pass(11, b"a.dat", &content, 2)).unwrap();
        assert_eq!(std::fs::read(dir.path().join("a.dat")).unwrap(), content);
    }

    #[test]
    fn hostile_paths_are_refused_and_nothing_is_written_outside_the_target() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("mirror");
        let outside = root.path().join("outside");
        std::fs::create_dir_all(&target).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("victim"), b"keep me").unwrap();
        // Links planted in the target tree, to a directory and to a file outside it.
        std::os::unix::fs::symlink(&outside, target.join("linkdir")).unwrap();
        std::os::unix::fs::symlink(outside.join("victim"), target.join("linkfile")).unwrap();
        let mut m = mirror(config(&target));
        let content = b"payload".to_vec();
        let hostile: &[&[u8]] = &[
            b"../outside/victim",
            b"/tmp/absolute",
            b"a/../../outside/x",
            b"\xff\xfe-not-utf8",
            b"CON",
            b"dir/lpt1.txt",
            b".diode-files/installed.json",
            b"back\\slash",
        ];
        for (i, path) in hostile.iter().enumerate() {
            let refusals = m.apply(&pass(100 + i as u64, path, &content, 1)).unwrap();
            assert!(
                !refusals.is_empty(),
                "{:?} was not refused",
                String::from_utf8_lossy(path)
            );
        }
        let long = "n".repeat(300);
        assert!(!m
            .apply(&pass(200, long.as_bytes(), &content, 1))
            .unwrap()
            .is_empty());
        assert_eq!(m.metrics.failed("path").get(), hostile.len() as u64 + 1);
        // Through the planted links: not installed, and counted.
        m.apply(&pass(300, b"linkdir/victim", &content, 1)).unwrap();
        m.apply(&pass(301, b"linkfile", &content, 1)).unwrap();
        assert_eq!(m.metrics.failed("conflict").get(), 2);
        assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"keep me");
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);
        assert_eq!(m.metrics.received.get(), 0);
        assert!(std::fs::symlink_metadata(target.join("linkfile"))
            .unwrap()
            .is_symlink());
        // Chunks of a refused version cost nothing more.
        let written = m.metrics.bytes_written.get();
        m.apply(&chunks(100, &content, 3)).unwrap();
        assert_eq!(m.metrics.bytes_written.get(), written);
    }

    #[test]
    fn records_that_are_not_file_parts_go_to_the_dead_letters() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = mirror(config(dir.path()));
        let plain = Record {
            origin: None,
            ..record(Part::Chunk(FileChunk::default()))
        };
        let garbage = Record {
            payload: Bytes::from_static(b"\xff\xff\xff"),
            ..record(Part::Chunk(FileChunk::default()))
        };
        let refusals = m.apply(&[plain, garbage]).unwrap();
        assert_eq!(
            refusals.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            vec![0, 1]
        );
    }

    #[test]
    fn a_newer_version_replaces_the_old_only_when_whole_and_old_ones_are_kept_if_asked() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = mirror(FilesConfig {
            keep_versions: 1,
            ..config(dir.path())
        });
        let v1 = data(2_500, 4);
        let v2 = data(4_000, 5);
        m.apply(&pass(21, b"recipes/mix.xml", &v1, 1)).unwrap();
        // Half of version 2: version 1 stays in place.
        let mut half = pass(22, b"recipes/mix.xml", &v2, 1);
        half.truncate(3);
        m.apply(&half).unwrap();
        let path = dir.path().join("recipes/mix.xml");
        assert_eq!(std::fs::read(&path).unwrap(), v1);
        m.apply(&pass(22, b"recipes/mix.xml", &v2, 2)).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), v2);
        let kept = dir.path().join(".diode-files/versions/recipes/mix.xml");
        let old: Vec<_> = std::fs::read_dir(&kept).unwrap().flatten().collect();
        assert_eq!(old.len(), 1);
        assert_eq!(std::fs::read(old[0].path()).unwrap(), v1);
        // Version 1 again, from a carousel still sending it: the newer one stays.
        m.apply(&pass(21, b"recipes/mix.xml", &v1, 3)).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), v2);
    }

    #[test]
    fn a_deletion_removes_only_the_version_that_was_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = mirror(config(dir.path()));
        let content = data(100, 6);
        m.apply(&pass(31, b"old.csv", &content, 1)).unwrap();
        let deleted = |id| {
            record(Part::Deleted(FileDeleted {
                file_id: id,
                path: Bytes::from_static(b"old.csv"),
            }))
        };
        m.apply(&[deleted(30)]).unwrap();
        assert!(dir.path().join("old.csv").exists());
        m.apply(&[deleted(31)]).unwrap();
        assert!(!dir.path().join("old.csv").exists());
        assert_eq!(m.metrics.deleted.get(), 1);
    }

    #[test]
    fn scattered_or_oversized_chunks_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = mirror(FilesConfig {
            max_incomplete_files: 2,
            max_file_bytes: 1 << 20,
            ..config(dir.path())
        });
        let past_end = record(Part::Chunk(FileChunk {
            file_id: 41,
            offset: 2 << 20,
            data: Bytes::from_static(b"x"),
        }));
        m.apply(&[past_end]).unwrap();
        assert_eq!(m.metrics.failed("too_large").get(), 1);
        assert!(m.incomplete.is_empty());
        // Three versions begun with room for two: the oldest gives way.
        for id in [51, 52, 53] {
            m.apply(&chunks(id, b"abc", 3)).unwrap();
        }
        assert_eq!(m.incomplete.len(), 2);
        assert!(!m.incomplete.contains_key(&51));
        assert_eq!(m.metrics.failed("evicted").get(), 1);

        // And a bound on the bytes they hold: the one being written stays.
        let dir = tempfile::tempdir().unwrap();
        let mut m = mirror(FilesConfig {
            max_incomplete_bytes: 5,
            ..config(dir.path())
        });
        m.apply(&chunks(61, b"abc", 3)).unwrap();
        m.apply(&chunks(62, b"abcd", 4)).unwrap();
        assert!(!m.incomplete.contains_key(&61));
        assert_eq!(m.held_bytes, 4);
        assert_eq!(m.metrics.failed("evicted").get(), 1);
    }
}
