//! `diode-send` configuration: the link, the metrics endpoint and the topics with their sources.
//! Topics come from `[[topic]]` tables and from `topics_dir`, one topic per file.

use diode_common::config::{default_u64, default_usize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use diode_common::config::{ConfigError, ConfigScope, ConfigSource, MetricsConfig};
use diode_wire::datagram::{DATAGRAM_OVERHEAD, IP_UDP_OVERHEAD};
use serde::Deserialize;

use crate::sources::{CheckedSource, Claim, SiteLimits};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SenderConfig {
    pub link: LinkConfig,
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    /// A directory of `*.toml` files, one topic each, relative to this file.
    #[serde(default)]
    pub topics_dir: Option<PathBuf>,
    #[serde(default, rename = "topic")]
    pub topics: Vec<TopicConfig>,
    #[serde(default)]
    pub safety: SafetyConfig,
    #[serde(default)]
    pub journal: Option<JournalConfig>,
}

/// `[journal]`: every record sent, kept on disk so it can be sent again (`diode-send replay`,
/// continuous backfill), and sequence numbers that go on across restarts (docs/backfill.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalConfig {
    /// Where the journal lives, relative to this file; it also keeps each topic's next
    /// sequence number, so a restart goes on from there.
    pub dir: PathBuf,
    /// Each topic's journal keeps at most this many bytes (oldest records dropped first),
    /// unless the topic says otherwise; 0: topics are journaled only if they say so.
    #[serde(default = "default_u64::<{ 1 << 30 }>")]
    pub max_bytes: u64,
    /// ... and records at most this old.
    #[serde(default = "default_u64::<{ 7 * 86_400 }>")]
    pub max_age_secs: u64,
    /// The ceiling of `diode-send replay`, in megabits per second of record payload.
    #[serde(default = "default_replay_rate_mbps")]
    pub replay_rate_mbps: f64,
    /// Continuous backfill: the journal's last this many seconds sent again, over and over,
    /// so that a gap shorter than that heals with no one acting. 0: off.
    #[serde(default)]
    pub backfill_window_secs: u64,
    /// The ceiling of continuous backfill, in megabits per second of record payload: a round
    /// covers its window only if this is above what the journaled topics take in.
    #[serde(default = "default_backfill_rate_mbps")]
    pub backfill_rate_mbps: f64,
}

/// A topic's own journal budget, over `[journal]`'s (`journal = { max_bytes = 0 }`: none).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicJournalConfig {
    #[serde(default)]
    pub max_bytes: Option<u64>,
    #[serde(default)]
    pub max_age_secs: Option<u64>,
}

fn default_replay_rate_mbps() -> f64 {
    10.0
}
fn default_backfill_rate_mbps() -> f64 {
    1.0
}

/// `[safety]`: the site's limits on how hard the sender may ask plant devices, kept apart from the
/// per-device tables so that a topic file cannot loosen them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SafetyConfig {
    /// No device is polled more often than this; a faster `poll_interval_ms` is refused at load.
    #[serde(default = "default_u64::<100>")]
    pub min_poll_interval_ms: u64,
}

impl Default for SafetyConfig {
    fn default() -> Self {
        SafetyConfig {
            min_poll_interval_ms: default_u64::<100>(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkConfig {
    /// Where datagrams go: the diode's input side, `host:port`.
    pub destination: String,
    /// Local address to send from.
    #[serde(default = "default_bind")]
    pub bind: String,
    /// Pacing ceiling in megabits per second of wire bytes (UDP payload + IP/UDP headers).
    pub rate_mbps: f64,
    #[serde(default = "default_usize::<1500>")]
    pub mtu_bytes: usize,
    #[serde(default = "default_usize::<32>")]
    pub data_shards: usize,
    #[serde(default = "default_usize::<8>")]
    pub parity_shards: usize,
    /// The independent datagram loss, in percent, at which every block, however small, is to be
    /// lost no more often than a full block of data_shards + parity_shards (wire-format.md §3.1):
    /// small blocks get more parity than their proportion. 0 keeps the proportion alone.
    #[serde(default = "default_design_loss_percent")]
    pub design_loss_percent: f64,
    /// A burst of this many consecutive lost datagrams that a partial block, which at low rates
    /// leaves alone, must survive on top of that (0: none). Costly for small blocks: see
    /// docs/performance.md.
    #[serde(default)]
    pub design_burst_datagrams: usize,
    /// Any single outage of the link up to this long loses no record (wire-format.md §3.4):
    /// every block is followed, this long (plus the flush interval and a margin) later, by as
    /// many repair shards again, new parity of the same code. Doubles the wire bytes, and holds
    /// that delay's worth of repair shards in `max_queued_bytes`. 0: off.
    #[serde(default)]
    pub outage_protection_ms: u64,
    /// Blocks whose shards are spread over each other on the wire, against burst loss.
    #[serde(default = "default_usize::<4>")]
    pub interleave_depth: usize,
    #[serde(default = "default_u64::<500>")]
    pub heartbeat_interval_ms: u64,
    /// A partial block leaves at most this long after its first record.
    #[serde(default = "default_u64::<5>")]
    pub flush_interval_ms: u64,
    #[serde(default = "default_usize::<{ 4 << 20 }>")]
    pub send_buffer_bytes: usize,
    /// Encoded data held for the link before sources are slowed (TCP) or dropped (UDP).
    #[serde(default = "default_usize::<{ 16 << 20 }>")]
    pub max_queued_bytes: usize,
    /// Records waiting between the sources and the encoder, at most.
    #[serde(default = "default_usize::<65_536>")]
    pub queue_records: usize,
    /// Bytes of records waiting between the sources and the encoder, at most: with
    /// `max_queued_bytes`, what bounds the sender's memory.
    #[serde(default = "default_usize::<{ 16 << 20 }>")]
    pub queue_bytes: usize,
    /// The link key (`diode-send keygen --out FILE`), relative to this file: every datagram is
    /// then authenticated (docs/wire-format.md §2.1). The receiver needs the same key.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Encrypt every block's records with AES-256-GCM under a key derived from the link key
    /// (docs/wire-format.md §4.4), for links that cross untrusted segments.
    #[serde(default)]
    pub encrypt: bool,
    /// Largest record accepted from any source.
    #[serde(default = "default_usize::<{ 16 << 20 }>")]
    pub max_record_bytes: usize,
    /// Keeps each topic's next sequence number (relative to this file), so that a restart goes
    /// on from there and (topic, seq) names one record for the life of the installation. Not
    /// needed with `[journal]`, which keeps them itself.
    #[serde(default)]
    pub state_file: Option<PathBuf>,
    /// `[[link.lane]]`: lanes beside the one `destination` names (lane 0), each a link of its
    /// own with its own link thread, so that a sender can use more than one core and more than
    /// one diode (wire-format.md §7). Topics choose theirs with `lane`.
    #[serde(default, rename = "lane")]
    pub lanes: Vec<LaneConfig>,
}

/// One more lane: `[[link.lane]] destination = "host:port"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaneConfig {
    pub destination: String,
    #[serde(default = "default_bind")]
    pub bind: String,
    /// This lane's pacing ceiling, when it differs from `link.rate_mbps` (a lane on a diode of
    /// its own may have a different one).
    #[serde(default)]
    pub rate_mbps: Option<f64>,
}

/// A lane as resolved: lane 0 is `link.destination`, then `[[link.lane]]` in order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lane {
    pub destination: SocketAddr,
    pub bind: SocketAddr,
    pub rate_mbps: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    pub name: String,
    pub source: crate::sources::SourceConfig,
    /// This topic's ceiling in megabits per second of record payload, so that it cannot take the
    /// link from the others: sources that can wait are slowed, UDP sources drop (counted).
    #[serde(default)]
    pub rate_mbps: Option<f64>,
    /// This topic's journal budget, when it differs from `[journal]`'s.
    #[serde(default)]
    pub journal: Option<TopicJournalConfig>,
    /// The lane this topic's records travel on (0: `link.destination`; 1 and up:
    /// `[[link.lane]]` in order). All of a topic's records take the one lane, which is what
    /// keeps them in order.
    #[serde(default)]
    pub lane: usize,
}

fn default_bind() -> String {
    "0.0.0.0:0".into()
}
fn default_design_loss_percent() -> f64 {
    1.0
}

/// A loaded, checked configuration with every address resolved.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: SenderConfig,
    /// Lane 0 (`link.destination`), then each `[[link.lane]]`.
    pub lanes: Vec<Lane>,
    /// Where each topic was defined, for messages.
    pub topic_origins: Vec<String>,
    /// The link key, when `link.key_file` is set.
    pub key: Option<[u8; 32]>,
    /// `metrics.listen`, resolved.
    pub metrics_listen: Option<SocketAddr>,
    /// Each topic's source, checked and resolved, in topic order.
    pub sources: Vec<CheckedSource>,
    /// `journal.dir`, resolved.
    pub journal_dir: Option<PathBuf>,
    /// Each topic's journal budget, in topic order (`None`: not journaled).
    pub journal_budgets: Vec<Option<crate::journal::Budget>>,
    /// `link.state_file`, resolved: where the sequence numbers are kept when there is no
    /// journal, and what a journal's numbers start no lower than when there is.
    pub sequences_file: Option<PathBuf>,
}

impl LinkConfig {
    /// Lane `lane`'s pacing ceiling (lane 0 and lanes without one of their own: `rate_mbps`).
    pub fn lane_rate_mbps(&self, lane: usize) -> f64 {
        lane.checked_sub(1)
            .and_then(|i| self.lanes.get(i))
            .and_then(|l| l.rate_mbps)
            .unwrap_or(self.rate_mbps)
    }

    /// The design point of the block parity (wire-format.md §3.1).
    pub fn design(&self) -> diode_wire::DesignPoint {
        diode_wire::DesignPoint {
            loss: self.design_loss_percent / 100.0,
            burst_datagrams: self.design_burst_datagrams,
        }
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }

    pub fn flush_interval(&self) -> Duration {
        Duration::from_millis(self.flush_interval_ms)
    }

    /// Wire bytes per payload byte at full blocks, repair shards included: what the topics'
    /// ceilings cost on the link.
    pub fn full_block_wire_factor(&self) -> f64 {
        let shards = if self.outage_protection_ms > 0 {
            2 * (self.data_shards + self.parity_shards)
        } else {
            self.data_shards + self.parity_shards
        };
        shards as f64 * self.mtu_bytes as f64 / (self.data_shards * self.shard_bytes()) as f64
    }

    /// When a block's repair shards follow it (§3.4): longer than the outage to ride through by
    /// the time a block may wait for its flush deadline, and a margin for scheduling.
    pub fn repair_delay(&self) -> Duration {
        if self.outage_protection_ms == 0 {
            Duration::ZERO
        } else {
            Duration::from_millis(self.outage_protection_ms + self.flush_interval_ms + 50)
        }
    }

    /// Bytes of one shard (wire-format.md §2): the MTU less the IP, UDP and datagram headers (an
    /// upper bound: an authenticated link's trailer takes a little of it).
    pub fn shard_bytes(&self) -> usize {
        self.mtu_bytes - IP_UDP_OVERHEAD - DATAGRAM_OVERHEAD
    }

    /// Payload bytes one full block carries (an upper bound: authentication and encryption take
    /// a little of it).
    pub fn block_capacity_bytes(&self) -> usize {
        self.data_shards * self.shard_bytes()
    }
}

pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    load_source(ConfigSource::read(path)?)
}

/// Loads and checks a configuration already read (the fuzzer feeds it arbitrary text).
pub fn load_source(source: ConfigSource) -> Result<Loaded, ConfigError> {
    let path = source.path().to_owned();
    let path = path.as_path();
    let mut config: SenderConfig = source.parse()?;
    let mut origins: Vec<String> = (0..config.topics.len())
        .map(|i| format!("{}: topic[{i}]", path.display()))
        .collect();
    validate_link(&source, &config.link)?;
    let site = SiteLimits {
        max_record_bytes: config.link.max_record_bytes,
        min_poll_interval_ms: config.safety.min_poll_interval_ms,
    };
    let link = config.link.clone();
    if site.min_poll_interval_ms == 0 {
        return Err(source.invalid("safety.min_poll_interval_ms", "must be at least 1"));
    }
    let mut sources = Vec::new();
    for (i, topic) in config.topics.iter().enumerate() {
        let scope = ConfigScope::new(&source, format!("topic[{i}]"));
        sources.push(check_topic(&scope, topic, &link, &site)?);
    }
    if let Some(dir) = &config.topics_dir {
        let dir = source.resolve(dir);
        let entries = std::fs::read_dir(&dir).map_err(|e| {
            source.invalid("topics_dir", format!("cannot read {}: {e}", dir.display()))
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        files.sort();
        for file in files {
            let topic_source = ConfigSource::read(&file)?;
            let topic: TopicConfig = topic_source.parse()?;
            let scope = ConfigScope::new(&topic_source, "");
            sources.push(check_topic(&scope, &topic, &link, &site)?);
            origins.push(file.display().to_string());
            config.topics.push(topic);
        }
    }
    if config.topics.is_empty() {
        return Err(source.invalid("topic", "no topics: add [[topic]] tables or a topics_dir"));
    }
    let mut seen_names: HashMap<&str, usize> = HashMap::new();
    let mut claimed: HashMap<Claim, usize> = HashMap::new();
    for (i, (topic, checked)) in config.topics.iter().zip(&sources).enumerate() {
        if let Some(first) = seen_names.insert(&topic.name, i) {
            return Err(source.invalid(
                "topic",
                format!(
                    "topic {:?} is defined twice: {} and {}",
                    topic.name, origins[first], origins[i]
                ),
            ));
        }
        for claim in checked.source.claims() {
            if let Some(first) = claimed.get(&claim) {
                return Err(source.invalid(
                    "topic",
                    format!(
                        "{} {} two topics: {} and {}",
                        claim.what, claim.conflict, origins[*first], origins[i]
                    ),
                ));
            }
            claimed.insert(claim, i);
        }
    }
    let metrics_listen = match &config.metrics {
        Some(metrics) => Some(metrics.resolve(&source)?),
        None => None,
    };
    let key = match &config.link.key_file {
        Some(file) => Some(
            diode_common::keyfile::load(&source.resolve(file))
                .map_err(|e| source.invalid("link.key_file", e.to_string()))?,
        ),
        None => None,
    };
    if config.link.encrypt && key.is_none() {
        return Err(source.invalid(
            "link.encrypt",
            "encryption derives its keys from the link key: set link.key_file too",
        ));
    }
    let mut lanes = vec![Lane {
        destination: source.socket_addr("link.destination", &config.link.destination)?,
        bind: source.socket_addr("link.bind", &config.link.bind)?,
        rate_mbps: config.link.rate_mbps,
    }];
    for (i, lane) in config.link.lanes.iter().enumerate() {
        let key = |k: &str| format!("link.lane[{i}].{k}");
        let rate_mbps = config.link.lane_rate_mbps(i + 1);
        if !(rate_mbps.is_finite() && rate_mbps > 0.0) {
            return Err(source.invalid(
                &key("rate_mbps"),
                format!("{rate_mbps} must be a positive number of megabits per second"),
            ));
        }
        let destination = source.socket_addr(&key("destination"), &lane.destination)?;
        if let Some(other) = lanes.iter().position(|l| l.destination == destination) {
            return Err(source.invalid(
                &key("destination"),
                format!("{destination} is lane {other}'s already: each lane needs its own"),
            ));
        }
        lanes.push(Lane {
            destination,
            bind: source.socket_addr(&key("bind"), &lane.bind)?,
            rate_mbps,
        });
    }
    for (topic, origin) in config.topics.iter().zip(&origins) {
        if topic.lane >= lanes.len() {
            return Err(source.invalid(
                "topic",
                format!(
                    "{origin}: lane = {} but the link has {} (lane 0 and {} [[link.lane]])",
                    topic.lane,
                    lanes.len(),
                    lanes.len() - 1
                ),
            ));
        }
    }
    let (journal_dir, journal_budgets) = check_journal(&source, &config, &origins, &sources)?;
    let sequences_file = match &config.link.state_file {
        Some(file) => {
            let file = source.resolve(file);
            if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
                source.writable_dir("link.state_file", dir)?;
            }
            Some(file)
        }
        None => None,
    };
    Ok(Loaded {
        config,
        lanes,
        topic_origins: origins,
        key,
        metrics_listen,
        sources,
        journal_dir,
        journal_budgets,
        sequences_file,
    })
}

type JournalPlan = (Option<PathBuf>, Vec<Option<crate::journal::Budget>>);

fn check_journal(
    source: &ConfigSource,
    config: &SenderConfig,
    origins: &[String],
    sources: &[CheckedSource],
) -> Result<JournalPlan, ConfigError> {
    let Some(journal) = &config.journal else {
        if let Some((i, _)) = config
            .topics
            .iter()
            .enumerate()
            .find(|(_, t)| t.journal.is_some())
        {
            return Err(source.invalid(
                "journal",
                format!(
                    "{} sets a journal budget, but there is no [journal] section to say where \
                     the journal lives",
                    origins[i]
                ),
            ));
        }
        return Ok((None, vec![None; config.topics.len()]));
    };
    let dir = source.resolve(&journal.dir);
    source.writable_dir("journal.dir", &dir)?;
    for (key, rate) in [
        ("journal.replay_rate_mbps", journal.replay_rate_mbps),
        ("journal.backfill_rate_mbps", journal.backfill_rate_mbps),
    ] {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(source.invalid(
                key,
                format!("{rate} must be a positive number of megabits per second"),
            ));
        }
    }
    if journal.max_age_secs == 0 {
        return Err(source.invalid("journal.max_age_secs", "must be at least 1"));
    }
    let budgets = config
        .topics
        .iter()
        .zip(sources)
        .map(|(topic, source)| {
            // A bulk topic (files) is sent again by its own carousel: journaled only if it
            // says so.
            if source.source.bulk() && topic.journal.is_none() {
                return None;
            }
            let own = topic.journal.unwrap_or(TopicJournalConfig {
                max_bytes: None,
                max_age_secs: None,
            });
            let max_bytes = own.max_bytes.unwrap_or(journal.max_bytes);
            let max_age_secs = own.max_age_secs.unwrap_or(journal.max_age_secs).max(1);
            (max_bytes > 0).then(|| crate::journal::Budget {
                max_bytes,
                max_age: Duration::from_secs(max_age_secs),
            })
        })
        .collect();
    Ok((Some(dir), budgets))
}

fn validate_link(source: &ConfigSource, link: &LinkConfig) -> Result<(), ConfigError> {
    let check = |ok: bool, key: &str, message: String| {
        if ok {
            Ok(())
        } else {
            Err(source.invalid(&format!("link.{key}"), message))
        }
    };
    check(
        link.rate_mbps.is_finite() && link.rate_mbps > 0.0,
        "rate_mbps",
        format!(
            "{} must be a positive number of megabits per second",
            link.rate_mbps
        ),
    )?;
    check(
        (576..=65_535).contains(&link.mtu_bytes),
        "mtu_bytes",
        format!("{} is outside 576..=65535", link.mtu_bytes),
    )?;
    check(
        (1..=200).contains(&link.data_shards),
        "data_shards",
        format!("{} is outside 1..=200", link.data_shards),
    )?;
    check(
        link.data_shards + link.parity_shards <= 255,
        "parity_shards",
        format!(
            "data_shards + parity_shards is {}, at most 255 fit one block",
            link.data_shards + link.parity_shards
        ),
    )?;
    check(
        (0.0..=50.0).contains(&link.design_loss_percent),
        "design_loss_percent",
        format!("{} is outside 0..=50", link.design_loss_percent),
    )?;
    check(
        link.outage_protection_ms <= 9000,
        "outage_protection_ms",
        format!("{} is above 9000", link.outage_protection_ms),
    )?;
    check(
        link.outage_protection_ms == 0 || link.parity_shards > 0,
        "outage_protection_ms",
        "outage protection sends parity shards again: needs parity_shards above 0".to_owned(),
    )?;
    check(
        link.design_burst_datagrams <= 64,
        "design_burst_datagrams",
        format!("{} is above 64", link.design_burst_datagrams),
    )?;
    check(
        (1..=64).contains(&link.interleave_depth),
        "interleave_depth",
        format!("{} is outside 1..=64", link.interleave_depth),
    )?;
    check(
        (10..=60_000).contains(&link.heartbeat_interval_ms),
        "heartbeat_interval_ms",
        format!("{} is outside 10..=60000", link.heartbeat_interval_ms),
    )?;
    check(
        link.flush_interval_ms <= 10_000,
        "flush_interval_ms",
        format!("{} is above 10000", link.flush_interval_ms),
    )?;
    check(
        link.max_queued_bytes >= 2 * link.block_capacity_bytes(),
        "max_queued_bytes",
        format!(
            "{} is below two full blocks ({} bytes)",
            link.max_queued_bytes,
            2 * link.block_capacity_bytes()
        ),
    )?;
    check(
        link.queue_records >= 1,
        "queue_records",
        "must be at least 1".into(),
    )?;
    check(
        link.queue_bytes >= 65_536,
        "queue_bytes",
        format!("{} is below 65536", link.queue_bytes),
    )?;
    check(
        (1..=(256 << 20)).contains(&link.max_record_bytes),
        "max_record_bytes",
        format!("{} is outside 1..=268435456", link.max_record_bytes),
    )
}

/// Checks a topic and returns its source, resolved.
fn check_topic(
    scope: &ConfigScope<'_>,
    topic: &TopicConfig,
    link: &LinkConfig,
    site: &SiteLimits,
) -> Result<CheckedSource, ConfigError> {
    if !diode_wire::is_valid_topic(&topic.name) {
        return Err(scope.invalid(
            "name",
            format!(
                "{:?}: a topic name is 1 to 255 bytes without + or #",
                topic.name
            ),
        ));
    }
    if let Some(rate) = topic.rate_mbps {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(scope.invalid(
                "rate_mbps",
                format!("{rate} must be a positive number of megabits per second"),
            ));
        }
        let ceiling = link.lane_rate_mbps(topic.lane);
        if rate > ceiling {
            return Err(scope.invalid(
                "rate_mbps",
                format!("{rate} is above its lane's own ceiling ({ceiling} Mb/s)"),
            ));
        }
    }
    topic.source.check(&scope.child("source").with_site(*site))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    const ISSUE_EXAMPLE: &str = r#"
[link]
destination = "127.0.0.1:47000"
rate_mbps = 40            # pacing ceiling: the sender never exceeds it
mtu_bytes = 1500
data_shards = 32
parity_shards = 8
heartbeat_interval_ms = 500
flush_interval_ms = 5     # a partial block leaves at most this long after its first record

[metrics]
listen = "127.0.0.1:9181"

[[topic]]
name = "line3/telemetry"
source = { kind = "udp", listen = "127.0.0.1:5140" }        # one datagram = one record

[[topic]]
name = "historian/events"
source = { kind = "tcp", listen = "127.0.0.1:5141", framing = "lines" }  # one line (without its terminator) = one record
"#;

    #[test]
    fn the_documented_example_loads() {
        let dir = tempfile::tempdir().unwrap();
        let loaded = load(&write(dir.path(), "sender.toml", ISSUE_EXAMPLE)).unwrap();
        assert_eq!(loaded.config.topics.len(), 2);
        assert_eq!(loaded.lanes[0].destination.port(), 47000);
        assert_eq!(loaded.config.link.interleave_depth, 4);
    }

    #[test]
    fn lanes_load_and_a_topic_on_a_lane_that_is_not_there_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let lanes = ISSUE_EXAMPLE.replace(
            "[metrics]",
            "[[link.lane]]\ndestination = \"127.0.0.1:47001\"\nrate_mbps = 10\n\n[metrics]",
        );
        let on_lane = |lane: usize| {
            lanes.replacen(
                "name = \"historian/events\"",
                &format!("name = \"historian/events\"\nlane = {lane}"),
                1,
            )
        };
        let loaded = load(&write(dir.path(), "sender.toml", &on_lane(1))).unwrap();
        assert_eq!(loaded.lanes.len(), 2);
        assert_eq!(loaded.lanes[1].destination.port(), 47001);
        assert_eq!(
            (loaded.lanes[0].rate_mbps, loaded.lanes[1].rate_mbps),
            (40.0, 10.0)
        );
        assert_eq!(loaded.config.topics[1].lane, 1);
        let check = crate::describe(&loaded);
        assert!(
            check.contains("lane 1 0.0.0.0:0 -> 127.0.0.1:47001") && check.contains(", lane 1"),
            "{check}"
        );

        let e = load(&write(dir.path(), "sender.toml", &on_lane(2)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("topic[1]") && e.contains("lane = 2"), "{e}");
        let same = lanes.replace("127.0.0.1:47001", "127.0.0.1:47000");
        let e = load(&write(dir.path(), "sender.toml", &same))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("link.lane[0].destination") && e.contains("lane 0"),
            "{e}"
        );
    }

    #[test]
    fn topics_dir_adds_topics_and_rejects_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("topics.d")).unwrap();
        write(
            &dir.path().join("topics.d"),
            "a.toml",
            "name = \"plant/a\"\nsource = { kind = \"udp\", listen = \"127.0.0.1:5150\" }\n",
        );
        let text = format!("topics_dir = \"topics.d\"\n{ISSUE_EXAMPLE}");
        let loaded = load(&write(dir.path(), "sender.toml", &text)).unwrap();
        assert_eq!(loaded.config.topics.len(), 3);
        write(
            &dir.path().join("topics.d"),
            "b.toml",
            "name = \"line3/telemetry\"\nsource = { kind = \"udp\", listen = \"127.0.0.1:5151\" }\n",
        );
        let err = load(&dir.path().join("sender.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("defined twice") && err.contains("b.toml"),
            "{err}"
        );
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let bad = ISSUE_EXAMPLE.replace("rate_mbps = 40", "rate_mbps = 0");
        let err = load(&write(dir.path(), "s.toml", &bad))
            .unwrap_err()
            .to_string();
        assert!(err.contains("s.toml:4: `link.rate_mbps`"), "{err}");
        let bad = ISSUE_EXAMPLE.replace("kind = \"udp\"", "kind = \"carrier-pigeon\"");
        let err = load(&write(dir.path(), "s.toml", &bad))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("s.toml:16:") && err.contains("carrier-pigeon"),
            "{err}"
        );
        let bad = ISSUE_EXAMPLE.replace("framing = \"lines\"", "framing = \"lines\", colour = 1");
        let err = load(&write(dir.path(), "s.toml", &bad))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("s.toml:20:") && err.contains("colour"),
            "{err}"
        );
        let bad = ISSUE_EXAMPLE.replace("line3/telemetry", "line3/#");
        let err = load(&write(dir.path(), "s.toml", &bad))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`topic[0].name`"), "{err}");
        let bad = ISSUE_EXAMPLE
            .replace("5141", "5140")
            .replace("kind = \"tcp\"", "kind = \"udp\"")
            .replace(", framing = \"lines\"", "");
        let err = load(&write(dir.path(), "s.toml", &bad))
            .unwrap_err()
            .to_string();
        assert!(err.contains("source of two topics"), "{err}");
    }

    const PLANT_TOPICS: &str = r#"
[[topic]]
name = "plant/mqtt"
source = { kind = "mqtt", broker = "127.0.0.1:1883", subscribe = ["plant/#"], qos = 1, client_id = "diode-send-1" }

[[topic]]
name = "line3/plc7"
source = { kind = "modbus", address = "127.0.0.1:5020", unit_id = 1, poll_interval_ms = 200, registers = [
  { name = "motor_speed", table = "holding", address = 100, type = "u16", scale = 0.1, unit = "rpm" },
  { name = "tank_level",  table = "input",   address = 10,  type = "f32", word_order = "big" },
  { name = "pump_on",     table = "coil",    address = 5 },
] }

[[topic]]
name = "security/syslog"
source = { kind = "syslog", listen = "127.0.0.1:5514", protocol = "udp" }
"#;

    #[test]
    fn the_plant_source_examples_load() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!("{ISSUE_EXAMPLE}{PLANT_TOPICS}");
        let loaded = load(&write(dir.path(), "sender.toml", &text)).unwrap();
        assert_eq!(loaded.config.topics.len(), 5);
        assert_eq!(loaded.sources[2].kind, "mqtt");
        assert_eq!(loaded.sources[3].kind, "modbus");
        let described = crate::describe(&loaded);
        assert!(
            described.contains("3 values in 3 read requests every 200 ms (read only)"),
            "{described}"
        );
    }

    #[test]
    fn polling_below_the_safety_floor_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let fast = PLANT_TOPICS.replace("poll_interval_ms = 200", "poll_interval_ms = 50");
        let err = load(&write(
            dir.path(),
            "s.toml",
            &format!("{ISSUE_EXAMPLE}{fast}"),
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`topic[3].source.poll_interval_ms`")
                && err.contains("safety.min_poll_interval_ms"),
            "{err}"
        );
        // The site may lower its floor, in its own table.
        let text = format!("[safety]\nmin_poll_interval_ms = 20\n{ISSUE_EXAMPLE}{fast}");
        load(&write(dir.path(), "s.toml", &text)).unwrap();
        // No key of any kind asks the device to write.
        let write_attempt = PLANT_TOPICS.replace("unit_id = 1,", "unit_id = 1, function_code = 6,");
        let err = load(&write(
            dir.path(),
            "s.toml",
            &format!("{ISSUE_EXAMPLE}{write_attempt}"),
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("function_code"), "{err}");
    }

    #[test]
    fn mqtt_source_mistakes_are_named() {
        let dir = tempfile::tempdir().unwrap();
        for (from, to, key) in [
            (
                "subscribe = [\"plant/#\"]",
                "subscribe = [\"plant/#/x\"]",
                "topic[2].source.subscribe",
            ),
            ("qos = 1", "qos = 2", "topic[2].source.qos"),
            ("127.0.0.1:1883", "127.0.0.1", "topic[2].source.broker"),
            (
                "name = \"plant/mqtt\"",
                "name = \"plant/mqtt\"\nrate_mbps = 41",
                "topic[2].rate_mbps",
            ),
        ] {
            let bad = PLANT_TOPICS.replace(from, to);
            let err = load(&write(
                dir.path(),
                "s.toml",
                &format!("{ISSUE_EXAMPLE}{bad}"),
            ))
            .unwrap_err()
            .to_string();
            assert!(err.contains(&format!("`{key}`")), "{key}: {err}");
        }
    }
}
