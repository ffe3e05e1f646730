//! `diode-send` configuration: the link, the metrics endpoint and the topics with their sources.
//! Topics come from `[[topic]]` tables and from `topics_dir`, one topic per file.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use diode_common::config::Framing;
use diode_common::config::{ConfigError, ConfigSource, MetricsConfig};
use diode_wire::datagram::{DATAGRAM_OVERHEAD, IP_UDP_OVERHEAD};
use serde::Deserialize;

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
}

/// `[safety]`: the site's limits on how hard the sender may ask plant devices, kept apart from the
/// per-device tables so that a topic file cannot loosen them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SafetyConfig {
    /// No device is polled more often than this; a faster `poll_interval_ms` is refused at load.
    #[serde(default = "default_min_poll_interval_ms")]
    pub min_poll_interval_ms: u64,
}

impl Default for SafetyConfig {
    fn default() -> Self {
        SafetyConfig {
            min_poll_interval_ms: default_min_poll_interval_ms(),
        }
    }
}

fn default_min_poll_interval_ms() -> u64 {
    100
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
    #[serde(default = "default_mtu")]
    pub mtu_bytes: usize,
    #[serde(default = "default_data_shards")]
    pub data_shards: usize,
    #[serde(default = "default_parity_shards")]
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
    #[serde(default = "default_interleave_depth")]
    pub interleave_depth: usize,
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    /// A partial block leaves at most this long after its first record.
    #[serde(default = "default_flush_interval_ms")]
    pub flush_interval_ms: u64,
    #[serde(default = "default_send_buffer_bytes")]
    pub send_buffer_bytes: usize,
    /// Encoded data held for the link before sources are slowed (TCP) or dropped (UDP).
    #[serde(default = "default_max_queued_bytes")]
    pub max_queued_bytes: usize,
    /// Records waiting between the sources and the encoder, at most.
    #[serde(default = "default_queue_records")]
    pub queue_records: usize,
    /// Bytes of records waiting between the sources and the encoder, at most: with
    /// `max_queued_bytes`, what bounds the sender's memory.
    #[serde(default = "default_queue_bytes")]
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
    #[serde(default = "default_max_record_bytes")]
    pub max_record_bytes: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    pub name: String,
    pub source: SourceConfig,
    /// This topic's ceiling in megabits per second of record payload, so that it cannot take the
    /// link from the others: sources that can wait are slowed, UDP sources drop (counted).
    #[serde(default)]
    pub rate_mbps: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceConfig {
    /// One datagram is one record.
    Udp {
        listen: String,
        #[serde(default = "default_udp_receive_buffer_bytes")]
        receive_buffer_bytes: usize,
        /// Only datagrams from these peers (`ip` or `ip:port`) are taken; others are dropped,
        /// counted as `diode_source_errors_total{reason="peer"}`. Empty: any.
        #[serde(default)]
        allowed_peers: Vec<String>,
    },
    /// A TCP listener; records are cut from each connection by `framing`.
    Tcp {
        listen: String,
        #[serde(default)]
        framing: Framing,
        #[serde(default = "default_max_connections")]
        max_connections: usize,
        /// Only these peers (`ip` or `ip:port`) may connect; others are refused, counted as
        /// `diode_source_errors_total{reason="peer"}`. Empty: any.
        #[serde(default)]
        allowed_peers: Vec<String>,
    },
    /// Subscribes to an MQTT broker; each message is one record carrying its MQTT topic, QoS and
    /// retain flag (wire-format.md §5.4).
    Mqtt {
        broker: String,
        subscribe: Vec<String>,
        #[serde(default = "default_mqtt_qos")]
        qos: u8,
        client_id: String,
        #[serde(default)]
        username: Option<String>,
        #[serde(default)]
        password: Option<String>,
        #[serde(default)]
        password_file: Option<PathBuf>,
        #[serde(default)]
        tls: Option<diode_common::mqtt::MqttTls>,
    },
    /// Polls a Modbus TCP device with read function codes only; each poll is one JSON record.
    Modbus {
        address: String,
        #[serde(default = "default_unit_id")]
        unit_id: u8,
        poll_interval_ms: u64,
        #[serde(default = "default_modbus_timeout_ms")]
        timeout_ms: u64,
        registers: Vec<crate::sources::modbus::RegisterConfig>,
    },
    /// Syslog (RFC 5424 and RFC 3164) over UDP, or TCP with octet counting or newlines.
    Syslog {
        listen: String,
        #[serde(default)]
        protocol: SyslogProtocol,
        #[serde(default = "default_max_connections")]
        max_connections: usize,
        /// As for `tcp`: the devices allowed to send.
        #[serde(default)]
        allowed_peers: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyslogProtocol {
    #[default]
    Udp,
    Tcp,
}

fn default_mqtt_qos() -> u8 {
    1
}
fn default_unit_id() -> u8 {
    1
}
fn default_modbus_timeout_ms() -> u64 {
    1000
}

impl SourceConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            SourceConfig::Udp { .. } => "udp",
            SourceConfig::Tcp { .. } => "tcp",
            SourceConfig::Mqtt { .. } => "mqtt",
            SourceConfig::Modbus { .. } => "modbus",
            SourceConfig::Syslog { .. } => "syslog",
        }
    }

    /// The peers a listening source takes data from (empty: any).
    pub fn allowed_peers(&self) -> &[String] {
        match self {
            SourceConfig::Udp { allowed_peers, .. }
            | SourceConfig::Tcp { allowed_peers, .. }
            | SourceConfig::Syslog { allowed_peers, .. } => allowed_peers,
            SourceConfig::Mqtt { .. } | SourceConfig::Modbus { .. } => &[],
        }
    }

    /// The local socket this source listens on, as (protocol, address), if it listens.
    fn listen(&self) -> Option<(&'static str, &str)> {
        match self {
            SourceConfig::Udp { listen, .. } => Some(("udp", listen)),
            SourceConfig::Tcp { listen, .. } => Some(("tcp", listen)),
            SourceConfig::Syslog {
                listen, protocol, ..
            } => Some((
                match protocol {
                    SyslogProtocol::Udp => "udp",
                    SyslogProtocol::Tcp => "tcp",
                },
                listen,
            )),
            SourceConfig::Mqtt { .. } | SourceConfig::Modbus { .. } => None,
        }
    }
}

/// Where a source takes its data from, resolved and checked at load.
#[derive(Debug, Clone)]
pub enum SourceEndpoint {
    Listen(SocketAddr),
    Mqtt(Box<rumqttc::MqttOptions>),
    Modbus(SocketAddr),
}

fn default_bind() -> String {
    "0.0.0.0:0".into()
}
fn default_mtu() -> usize {
    1500
}
fn default_data_shards() -> usize {
    32
}
fn default_parity_shards() -> usize {
    8
}
fn default_design_loss_percent() -> f64 {
    1.0
}
fn default_interleave_depth() -> usize {
    4
}
fn default_heartbeat_interval_ms() -> u64 {
    500
}
fn default_flush_interval_ms() -> u64 {
    5
}
fn default_send_buffer_bytes() -> usize {
    4 << 20
}
fn default_max_queued_bytes() -> usize {
    16 << 20
}
fn default_queue_records() -> usize {
    65_536
}
fn default_queue_bytes() -> usize {
    16 << 20
}
fn default_max_record_bytes() -> usize {
    16 << 20
}
fn default_udp_receive_buffer_bytes() -> usize {
    4 << 20
}
fn default_max_connections() -> usize {
    16
}

/// A loaded, checked configuration with every address resolved.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: SenderConfig,
    pub destination: SocketAddr,
    pub bind: SocketAddr,
    /// Where each topic was defined, for messages.
    pub topic_origins: Vec<String>,
    /// The link key, when `link.key_file` is set.
    pub key: Option<[u8; 32]>,
    /// `metrics.listen`, resolved.
    pub metrics_listen: Option<SocketAddr>,
    /// Each topic's source endpoint, resolved, in topic order.
    pub source_endpoints: Vec<SourceEndpoint>,
    /// Each topic's allowed peers, parsed (empty: any), in topic order.
    pub source_peers: Vec<Vec<diode_common::net::SourceFilter>>,
}

impl LinkConfig {
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
        let shard = (self.mtu_bytes - IP_UDP_OVERHEAD - DATAGRAM_OVERHEAD) as f64;
        shards as f64 * self.mtu_bytes as f64 / (self.data_shards as f64 * shard)
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

    /// Wire bytes of the largest datagram.
    pub fn max_datagram_wire_bytes(&self) -> usize {
        self.mtu_bytes
    }

    /// Payload bytes one full block carries (an upper bound: authentication and encryption take
    /// a little of it).
    pub fn block_capacity_bytes(&self) -> usize {
        self.data_shards * (self.mtu_bytes - IP_UDP_OVERHEAD - DATAGRAM_OVERHEAD)
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
    let mut source_endpoints = Vec::new();
    let mut source_peers = Vec::new();
    let link = config.link.clone();
    let safety = config.safety.clone();
    if safety.min_poll_interval_ms == 0 {
        return Err(source.invalid("safety.min_poll_interval_ms", "must be at least 1"));
    }
    for (i, topic) in config.topics.iter().enumerate() {
        source_endpoints.push(validate_topic(
            &source,
            &format!("topic[{i}]"),
            topic,
            &link,
            &safety,
        )?);
        source_peers.push(parse_peers(&source, &format!("topic[{i}]."), topic)?);
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
            source_endpoints.push(validate_topic(&topic_source, "", &topic, &link, &safety)?);
            source_peers.push(parse_peers(&topic_source, "", &topic)?);
            origins.push(file.display().to_string());
            config.topics.push(topic);
        }
    }
    if config.topics.is_empty() {
        return Err(source.invalid("topic", "no topics: add [[topic]] tables or a topics_dir"));
    }
    let mut seen_names: HashMap<&str, usize> = HashMap::new();
    let mut seen_listens: HashMap<(&str, &str), usize> = HashMap::new();
    let mut seen_client_ids: HashMap<(&str, &str), usize> = HashMap::new();
    for (i, topic) in config.topics.iter().enumerate() {
        if let Some(first) = seen_names.insert(&topic.name, i) {
            return Err(source.invalid(
                "topic",
                format!(
                    "topic {:?} is defined twice: {} and {}",
                    topic.name, origins[first], origins[i]
                ),
            ));
        }
        if let SourceConfig::Mqtt {
            broker, client_id, ..
        } = &topic.source
        {
            // Two clients with one id would throw each other off the broker in turn.
            if let Some(first) = seen_client_ids.insert((broker, client_id), i) {
                return Err(source.invalid(
                    "topic",
                    format!(
                        "MQTT client id {client_id:?} on {broker} is used by two topics: {} and {}",
                        origins[first], origins[i]
                    ),
                ));
            }
        }
        let Some((protocol, listen)) = topic.source.listen() else {
            continue;
        };
        if let Some(first) = seen_listens.insert((protocol, listen), i) {
            return Err(source.invalid(
                "topic",
                format!(
                    "{} {} is the source of two topics: {} and {}",
                    protocol, listen, origins[first], origins[i]
                ),
            ));
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
    let destination = source.socket_addr("link.destination", &config.link.destination)?;
    let bind = source.socket_addr("link.bind", &config.link.bind)?;
    Ok(Loaded {
        config,
        destination,
        bind,
        topic_origins: origins,
        key,
        metrics_listen,
        source_endpoints,
        source_peers,
    })
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

/// Checks a topic and returns its source endpoint, resolved.
/// A listening source's `allowed_peers`, parsed; errors name the entry.
fn parse_peers(
    source: &ConfigSource,
    prefix: &str,
    topic: &TopicConfig,
) -> Result<Vec<diode_common::net::SourceFilter>, ConfigError> {
    topic
        .source
        .allowed_peers()
        .iter()
        .enumerate()
        .map(|(j, text)| {
            text.parse().map_err(|_| {
                source.invalid(
                    &format!("{prefix}source.allowed_peers[{j}]"),
                    format!("{text:?} is not an IP address or ip:port"),
                )
            })
        })
        .collect()
}

fn validate_topic(
    source: &ConfigSource,
    prefix: &str,
    topic: &TopicConfig,
    link: &LinkConfig,
    safety: &SafetyConfig,
) -> Result<SourceEndpoint, ConfigError> {
    let key = |k: &str| {
        if prefix.is_empty() {
            k.to_owned()
        } else {
            format!("{prefix}.{k}")
        }
    };
    if !diode_wire::is_valid_topic(&topic.name) {
        return Err(source.invalid(
            &key("name"),
            format!(
                "{:?}: a topic name is 1 to 255 bytes without + or #",
                topic.name
            ),
        ));
    }
    if let Some(rate) = topic.rate_mbps {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(source.invalid(
                &key("rate_mbps"),
                format!("{rate} must be a positive number of megabits per second"),
            ));
        }
        if rate > link.rate_mbps {
            return Err(source.invalid(
                &key("rate_mbps"),
                format!(
                    "{rate} is above the link's own ceiling ({} Mb/s)",
                    link.rate_mbps
                ),
            ));
        }
    }
    match &topic.source {
        SourceConfig::Udp { listen, .. } => Ok(SourceEndpoint::Listen(
            source.socket_addr(&key("source.listen"), listen)?,
        )),
        SourceConfig::Tcp {
            listen,
            max_connections,
            ..
        }
        | SourceConfig::Syslog {
            listen,
            max_connections,
            ..
        } => {
            if *max_connections == 0 {
                return Err(source.invalid(&key("source.max_connections"), "must be at least 1"));
            }
            Ok(SourceEndpoint::Listen(
                source.socket_addr(&key("source.listen"), listen)?,
            ))
        }
        SourceConfig::Mqtt {
            broker,
            subscribe,
            qos,
            client_id,
            username,
            password,
            password_file,
            tls,
        } => {
            if subscribe.is_empty() {
                return Err(source.invalid(
                    &key("source.subscribe"),
                    "subscribe to at least one topic filter",
                ));
            }
            for filter in subscribe {
                if !rumqttc::valid_filter(filter) {
                    return Err(source.invalid(
                        &key("source.subscribe"),
                        format!("{filter:?} is not a valid MQTT topic filter"),
                    ));
                }
            }
            if *qos > 1 {
                return Err(source.invalid(
                    &key("source.qos"),
                    format!("{qos}: 0 or 1 (QoS 2 buys nothing here: the link is at most once)"),
                ));
            }
            let options = diode_common::mqtt::options(
                source,
                &key("source"),
                &diode_common::mqtt::MqttClient {
                    broker,
                    client_id,
                    username: username.as_deref(),
                    password: password.as_deref(),
                    password_file: password_file.as_ref(),
                    tls: tls.as_ref(),
                    // The broker keeps QoS 1 messages for this client while the sender is away.
                    clean_session: false,
                    max_packet_bytes: link.max_record_bytes + 65_536 + 16,
                },
            )?;
            Ok(SourceEndpoint::Mqtt(Box::new(options)))
        }
        SourceConfig::Modbus {
            address,
            poll_interval_ms,
            timeout_ms,
            registers,
            ..
        } => {
            if *poll_interval_ms < safety.min_poll_interval_ms {
                return Err(source.invalid(
                    &key("source.poll_interval_ms"),
                    format!(
                        "{poll_interval_ms} ms is below the site's floor of {} ms \
                         (safety.min_poll_interval_ms): polling faster could load the device",
                        safety.min_poll_interval_ms
                    ),
                ));
            }
            if !(1..=60_000).contains(timeout_ms) {
                return Err(source.invalid(
                    &key("source.timeout_ms"),
                    format!("{timeout_ms} is outside 1..=60000"),
                ));
            }
            crate::sources::modbus::validate_registers(registers).map_err(|(i, message)| {
                source.invalid(&key(&format!("source.registers[{i}]")), message)
            })?;
            Ok(SourceEndpoint::Modbus(
                source.socket_addr(&key("source.address"), address)?,
            ))
        }
    }
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
        assert_eq!(loaded.destination.port(), 47000);
        assert_eq!(loaded.config.link.interleave_depth, 4);
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
        assert!(matches!(
            loaded.source_endpoints[2],
            SourceEndpoint::Mqtt(_)
        ));
        assert!(matches!(
            loaded.source_endpoints[3],
            SourceEndpoint::Modbus(_)
        ));
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
