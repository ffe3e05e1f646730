//! `diode-recv` configuration: the link, the metrics endpoint, and routes from topic filters to sinks.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use diode_common::config::Framing;
use diode_common::config::{ConfigError, ConfigSource, MetricsConfig};
use serde::Deserialize;

use crate::filter::TopicFilter;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiverConfig {
    pub link: LinkConfig,
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkConfig {
    /// Where the diode's output delivers datagrams, `host:port`.
    pub listen: String,
    /// Ask for a large socket buffer: bursts that overflow it are lost before FEC can help.
    #[serde(default = "default_receive_buffer_bytes")]
    pub receive_buffer_bytes: usize,
    /// Memory for blocks still being rebuilt; past it the oldest is given up.
    #[serde(default = "default_max_inflight_bytes")]
    pub max_inflight_bytes: usize,
    /// The oldest incomplete block is given up after this long without progress.
    #[serde(default = "default_block_timeout_ms")]
    pub block_timeout_ms: u64,
    #[serde(default = "default_max_record_bytes")]
    pub max_record_bytes: usize,
    #[serde(default = "default_max_topics")]
    pub max_topics: usize,
    /// The link key the sender uses, relative to this file: only datagrams it authenticates are
    /// accepted (docs/wire-format.md §2.1).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The key before it, accepted too while senders move to the new one.
    #[serde(default)]
    pub previous_key_file: Option<PathBuf>,
    /// Accept only encrypted blocks (docs/wire-format.md §4.4): a sender left unencrypted by
    /// mistake is refused (`auth`), not silently accepted.
    #[serde(default)]
    pub encrypt: bool,
    /// Where the receiver keeps what must outlive its restarts (relative to this file): on an
    /// authenticated link, the newest session and block delivered, so that a replay of an old
    /// session or of delivered blocks is refused after a restart too (wire-format.md §6.1).
    #[serde(default)]
    pub state_file: Option<PathBuf>,
    /// Accept datagrams only from these source addresses (`ip` or `ip:port`): the diode's output
    /// side. Others are dropped before any check and counted as
    /// `diode_datagrams_rejected_total{reason="source"}`. Empty: any source.
    #[serde(default)]
    pub allowed_sources: Vec<String>,
}

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
    /// This route's on-disk buffer (relative to this file): every record is written there first
    /// and read back by the sink, so a sink that is down or slow loses nothing and a restart
    /// replays what was not delivered.
    #[serde(default)]
    pub buffer_dir: Option<PathBuf>,
    #[serde(default = "default_buffer_max_bytes")]
    pub buffer_max_bytes: u64,
    /// What a full buffer gives up: `drop_oldest` (default) or `drop_newest`.
    #[serde(default)]
    pub buffer_full: crate::buffer::FullPolicy,
    /// Where records this route's sink can never accept go (relative to this file): a topic
    /// name its protocol refuses, a datagram too large for UDP, a Kafka topic that does not exist
    /// and may not be created. JSON lines with a `reason`. By default `dead-letter.jsonl` in the
    /// route's `buffer_dir`; without either, such records are counted and logged only.
    #[serde(default)]
    pub dead_letter_file: Option<PathBuf>,
    #[serde(default = "default_dead_letter_max_bytes")]
    pub dead_letter_max_bytes: u64,
}

fn default_dead_letter_max_bytes() -> u64 {
    64 << 20
}

fn default_broker_max_connections() -> usize {
    64
}
fn default_broker_client_queue_bytes() -> usize {
    4 << 20
}
fn default_broker_retained_max_bytes() -> usize {
    16 << 20
}

fn default_buffer_max_bytes() -> u64 {
    1 << 30
}

/// How the file sink writes records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileFormat {
    /// One JSON object per line: `topic`, `seq`, `time`, `origin`, `payload` or `payload_base64`.
    #[default]
    Json,
    /// The payloads alone, back to back, byte for byte (a stream or file sent with raw framing).
    Raw,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyslogProtocol {
    /// RFC 5425-style octet counting on a TCP stream (RFC 6587 §3.4.1).
    #[default]
    Tcp,
    Udp,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SinkConfig {
    /// JSON lines (or raw payloads), rotated by size and by age.
    File {
        path: PathBuf,
        #[serde(default)]
        format: FileFormat,
        /// Start a new file once this one holds this many bytes.
        #[serde(default)]
        rotate_bytes: Option<u64>,
        /// Start a new file once this one is this old.
        #[serde(default)]
        rotate_interval_ms: Option<u64>,
    },
    /// The same JSON lines on standard output.
    Stdout {},
    /// One datagram per record, the payload alone.
    Udp { target: String },
    /// The payloads framed as the TCP source frames them; reconnects with backoff.
    Tcp {
        connect: String,
        #[serde(default)]
        framing: Framing,
    },
    /// Publishes each record to an MQTT broker under `topic_prefix` + its MQTT topic when it came
    /// from an MQTT source, else + its diode topic.
    Mqtt {
        broker: String,
        #[serde(default)]
        topic_prefix: String,
        #[serde(default = "default_sink_qos")]
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
    /// An MQTT broker inside the receiver (rumqttd), serving the records to any MQTT client:
    /// a first deployment needs no broker of its own. Topics as for `mqtt`.
    MqttBroker {
        listen: String,
        #[serde(default)]
        topic_prefix: String,
        /// Clients must log in with this username and the password in `password_file`
        /// (relative to this file; others must not be able to read it). Unset: anyone who can
        /// reach `listen` may subscribe.
        #[serde(default)]
        username: Option<String>,
        #[serde(default)]
        password_file: Option<PathBuf>,
        /// Clients connected at once, at most.
        #[serde(default = "default_broker_max_connections")]
        max_connections: usize,
        /// Messages waiting for one client, at most; a client that falls further behind is
        /// disconnected (it may reconnect).
        #[serde(default = "default_broker_client_queue_bytes")]
        client_queue_bytes: usize,
        /// Retained messages (records whose MQTT origin was retained) kept for new subscribers.
        #[serde(default = "default_broker_retained_max_bytes")]
        retained_max_bytes: usize,
        /// Serve MQTT over TLS only: `tls = { cert_file, key_file }` (PEM; the key mode 0600).
        #[serde(default)]
        tls: Option<diode_common::mqtt::ServerTls>,
    },
    /// Produces each record to Kafka: the diode topic is the message key (one partition per
    /// diode topic, so its order holds), sequence number, ingest time and MQTT origin are headers.
    /// `topic` may contain `{topic}`: the diode topic with `/` as `.`.
    Kafka {
        brokers: Vec<String>,
        topic: String,
        #[serde(default = "default_kafka_client_id")]
        client_id: String,
        /// Partitions of a topic this sink creates when it does not exist (0: never create).
        #[serde(default = "default_kafka_create_partitions")]
        create_partitions: i32,
    },
    /// RFC 5424 messages for a SIEM, over TCP (octet counting) or UDP.
    Syslog {
        target: String,
        #[serde(default)]
        protocol: SyslogProtocol,
    },
}

fn default_sink_qos() -> u8 {
    1
}
fn default_kafka_client_id() -> String {
    "diode-recv".into()
}
fn default_kafka_create_partitions() -> i32 {
    1
}

impl SinkConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            SinkConfig::File { .. } => "file",
            SinkConfig::Stdout {} => "stdout",
            SinkConfig::Udp { .. } => "udp",
            SinkConfig::Tcp { .. } => "tcp",
            SinkConfig::Mqtt { .. } => "mqtt",
            SinkConfig::MqttBroker { .. } => "mqtt_broker",
            SinkConfig::Kafka { .. } => "kafka",
            SinkConfig::Syslog { .. } => "syslog",
        }
    }
}

/// About 100 ms of a 1 GB/s link: what it takes to ride out the receiving host's scheduling
/// stalls without the kernel dropping datagrams (see docs/performance.md).
fn default_receive_buffer_bytes() -> usize {
    128 << 20
}
fn default_max_inflight_bytes() -> usize {
    32 << 20
}
fn default_block_timeout_ms() -> u64 {
    200
}
fn default_max_record_bytes() -> usize {
    16 << 20
}
fn default_max_topics() -> usize {
    4096
}
/// A sink stalled for 60 ms at 1 GB/s; past it a route without a disk buffer drops records
/// (counted), and a buffered route's spooler has fallen that far behind its disk.
fn default_queue_bytes() -> usize {
    64 << 20
}

/// A route ready to run.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub filters: Vec<TopicFilter>,
    pub sink: SinkConfig,
    pub queue_bytes: usize,
    /// The route's disk buffer, resolved: (directory, most bytes, policy).
    pub buffer: Option<(PathBuf, u64, crate::buffer::FullPolicy)>,
    /// Client options of an MQTT sink, checked at load.
    pub mqtt: Option<Box<rumqttc::MqttOptions>>,
    /// The embedded broker's settings, resolved at load.
    pub broker: Option<Box<crate::sinks::broker::BrokerSettings>>,
    /// Where records the sink refuses for good are kept, and how many bytes of them at most.
    pub dead_letter: (Option<PathBuf>, u64),
}

#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: ReceiverConfig,
    pub listen: SocketAddr,
    pub routes: Vec<Route>,
    /// Accepted link keys, current first.
    pub keys: Vec<[u8; 32]>,
    /// `metrics.listen`, resolved.
    pub metrics_listen: Option<SocketAddr>,
    /// `link.state_file`, resolved against the config file's directory.
    pub state_file: Option<PathBuf>,
    /// `link.allowed_sources`, parsed.
    pub allowed_sources: Vec<diode_common::net::SourceFilter>,
}

impl LinkConfig {
    pub fn block_timeout(&self) -> Duration {
        Duration::from_millis(self.block_timeout_ms)
    }
}

pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    load_source(ConfigSource::read(path)?)
}

/// Loads and checks a configuration already read (the fuzzer feeds it arbitrary text).
pub fn load_source(source: ConfigSource) -> Result<Loaded, ConfigError> {
    let config: ReceiverConfig = source.parse()?;
    let listen = source.socket_addr("link.listen", &config.link.listen)?;
    let link = &config.link;
    if !(1 << 20..=1 << 34).contains(&link.max_inflight_bytes) {
        return Err(source.invalid(
            "link.max_inflight_bytes",
            "must be between 1 MiB and 16 GiB",
        ));
    }
    if !(10..=60_000).contains(&link.block_timeout_ms) {
        return Err(source.invalid("link.block_timeout_ms", "must be between 10 and 60000"));
    }
    if !(1..=256 << 20).contains(&link.max_record_bytes) {
        return Err(source.invalid("link.max_record_bytes", "must be between 1 and 268435456"));
    }
    let mut keys = Vec::new();
    for (name, file) in [
        ("key_file", &link.key_file),
        ("previous_key_file", &link.previous_key_file),
    ] {
        if let Some(file) = file {
            let key = diode_common::keyfile::load(&source.resolve(file))
                .map_err(|e| source.invalid(&format!("link.{name}"), e.to_string()))?;
            keys.push(key);
        }
    }
    if link.previous_key_file.is_some() && link.key_file.is_none() {
        return Err(source.invalid("link.previous_key_file", "needs link.key_file too"));
    }
    if let [current, previous] = &keys[..] {
        if diode_wire::LinkKey::new(current).id() == diode_wire::LinkKey::new(previous).id() {
            return Err(source.invalid(
                "link.previous_key_file",
                "both keys have the same key id, so datagrams could not tell them apart: \
                 generate another new key",
            ));
        }
    }
    if link.encrypt && keys.is_empty() {
        return Err(source.invalid(
            "link.encrypt",
            "encryption derives its keys from the link key: set link.key_file too",
        ));
    }
    if link.max_topics == 0 {
        return Err(source.invalid("link.max_topics", "must be at least 1"));
    }
    let state_file = link.state_file.as_ref().map(|f| source.resolve(f));
    if let Some(dir) = state_file.as_ref().and_then(|f| f.parent()) {
        source.writable_dir("link.state_file", dir)?;
    }
    let mut allowed_sources = Vec::new();
    for (i, text) in link.allowed_sources.iter().enumerate() {
        let filter = text.parse().map_err(|_| {
            source.invalid(
                &format!("link.allowed_sources[{i}]"),
                format!("{text:?} is not an IP address or ip:port"),
            )
        })?;
        allowed_sources.push(filter);
    }
    let metrics_listen = match &config.metrics {
        Some(m) => Some(m.resolve(&source)?),
        None => None,
    };
    if config.routes.is_empty() {
        return Err(source.invalid("route", "no routes: records would have nowhere to go"));
    }
    let mut routes = Vec::new();
    for (i, route) in config.routes.iter().enumerate() {
        if route.topics.is_empty() {
            return Err(source.invalid(&format!("route[{i}].topics"), "lists no topic filter"));
        }
        let mut filters = Vec::new();
        for (j, filter) in route.topics.iter().enumerate() {
            filters.push(
                TopicFilter::parse(filter)
                    .map_err(|e| source.invalid(&format!("route[{i}].topics[{j}]"), e))?,
            );
        }
        let mut sink = route.sink.clone();
        let mut mqtt = None;
        let mut broker = None;
        match &mut sink {
            SinkConfig::File {
                path,
                rotate_bytes,
                rotate_interval_ms,
                ..
            } => {
                *path = source.resolve(path);
                if let Some(dir) = path.parent() {
                    source.writable_dir(&format!("route[{i}].sink.path"), dir)?;
                }
                if rotate_bytes.is_some_and(|b| b < 4096) {
                    return Err(source.invalid(
                        &format!("route[{i}].sink.rotate_bytes"),
                        "must be at least 4096",
                    ));
                }
                if rotate_interval_ms.is_some_and(|ms| ms < 1000) {
                    return Err(source.invalid(
                        &format!("route[{i}].sink.rotate_interval_ms"),
                        "must be at least 1000",
                    ));
                }
            }
            SinkConfig::Mqtt {
                broker,
                topic_prefix,
                qos,
                client_id,
                username,
                password,
                password_file,
                tls,
            } => {
                if *qos > 1 {
                    return Err(
                        source.invalid(&format!("route[{i}].sink.qos"), format!("{qos}: 0 or 1"))
                    );
                }
                if topic_prefix.contains(['+', '#']) {
                    return Err(source.invalid(
                        &format!("route[{i}].sink.topic_prefix"),
                        "must not contain MQTT wildcards",
                    ));
                }
                mqtt = Some(Box::new(diode_common::mqtt::options(
                    &source,
                    &format!("route[{i}].sink"),
                    &diode_common::mqtt::MqttClient {
                        broker,
                        client_id,
                        username: username.as_deref(),
                        password: password.as_deref(),
                        password_file: password_file.as_ref(),
                        tls: tls.as_ref(),
                        clean_session: false,
                        max_packet_bytes: link.max_record_bytes + 65_536 + 16,
                    },
                )?));
            }
            SinkConfig::Syslog { target, .. } => {
                source.socket_addr(&format!("route[{i}].sink.target"), target)?;
            }
            SinkConfig::Kafka {
                brokers,
                topic,
                create_partitions,
                ..
            } => {
                if brokers.is_empty() {
                    return Err(source.invalid(
                        &format!("route[{i}].sink.brokers"),
                        "list at least one bootstrap broker",
                    ));
                }
                for broker in brokers.iter() {
                    if diode_common::mqtt::split_host_port(broker).is_none() {
                        return Err(source.invalid(
                            &format!("route[{i}].sink.brokers"),
                            format!("{broker:?} is not host:port"),
                        ));
                    }
                }
                let sample = crate::sinks::kafka::kafka_topic(topic, "line3/plc7");
                if !crate::sinks::kafka::valid_kafka_topic(&sample) {
                    return Err(source.invalid(
                        &format!("route[{i}].sink.topic"),
                        format!(
                            "{topic:?} gives Kafka topic names such as {sample:?}: 1 to 249 of a-z A-Z 0-9 . _ -"
                        ),
                    ));
                }
                if *create_partitions < 0 {
                    return Err(source.invalid(
                        &format!("route[{i}].sink.create_partitions"),
                        "must be 0 (never create topics) or more",
                    ));
                }
            }
            SinkConfig::MqttBroker {
                listen,
                topic_prefix,
                username,
                password_file,
                max_connections,
                client_queue_bytes,
                retained_max_bytes,
                tls,
            } => {
                let addr = source.socket_addr(&format!("route[{i}].sink.listen"), listen)?;
                let tls = match tls {
                    Some(tls) => Some(diode_common::mqtt::server_tls_config(
                        &source,
                        &format!("route[{i}].sink.tls"),
                        tls,
                    )?),
                    None => None,
                };
                let key = |k: &str| format!("route[{i}].sink.{k}");
                let password = match (username.as_ref(), password_file.as_ref()) {
                    (Some(_), Some(file)) => {
                        let file = source.resolve(file);
                        let text = diode_common::keyfile::read_secret(&file)
                            .map_err(|e| source.invalid(&key("password_file"), e.to_string()))?;
                        Some(text)
                    }
                    (None, None) => None,
                    _ => {
                        return Err(source.invalid(
                            &key("password_file"),
                            "set username and password_file together",
                        ))
                    }
                };
                if *max_connections == 0 || *max_connections > 10_000 {
                    return Err(source.invalid(&key("max_connections"), "must be 1 to 10000"));
                }
                if *client_queue_bytes < 64 << 10 {
                    return Err(
                        source.invalid(&key("client_queue_bytes"), "must be at least 65536")
                    );
                }
                broker = Some(Box::new(crate::sinks::broker::BrokerSettings {
                    listen: addr,
                    topic_prefix: topic_prefix.clone(),
                    username: username.clone(),
                    password,
                    max_connections: *max_connections,
                    client_queue_bytes: *client_queue_bytes,
                    retained_max_bytes: *retained_max_bytes,
                    max_packet_bytes: link.max_record_bytes + 65_536 + 16,
                    tls,
                }));
                if topic_prefix.contains(['+', '#']) {
                    return Err(source.invalid(
                        &format!("route[{i}].sink.topic_prefix"),
                        "must not contain MQTT wildcards",
                    ));
                }
                if let Some(first) = config.routes[..i].iter().position(|r| {
                    matches!(&r.sink, SinkConfig::MqttBroker { listen: other, .. } if other == listen)
                }) {
                    return Err(source.invalid(
                        &format!("route[{i}].sink.listen"),
                        format!("route[{first}] runs a broker on {listen} already: give both routes' topics to one route"),
                    ));
                }
            }
            SinkConfig::Udp { target } => {
                source.socket_addr(&format!("route[{i}].sink.target"), target)?;
            }
            SinkConfig::Tcp { connect, .. } => {
                source.socket_addr(&format!("route[{i}].sink.connect"), connect)?;
            }
            SinkConfig::Stdout {} => {}
        }
        if route.queue_bytes < 65_536 {
            return Err(
                source.invalid(&format!("route[{i}].queue_bytes"), "must be at least 65536")
            );
        }
        let name = route
            .name
            .clone()
            .unwrap_or_else(|| format!("{i}-{}", route.sink.kind()));
        if routes.iter().any(|r: &Route| r.name == name) {
            return Err(source.invalid(
                &format!("route[{i}].name"),
                format!("{name:?} is used twice"),
            ));
        }
        // It is a metric label value and a log field.
        if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
            return Err(source.invalid(
                &format!("route[{i}].name"),
                "must be 1 to 64 characters, none of them a control character",
            ));
        }
        let buffer = match &route.buffer_dir {
            Some(dir) => {
                if route.buffer_max_bytes < 1 << 20 {
                    return Err(source.invalid(
                        &format!("route[{i}].buffer_max_bytes"),
                        "must be at least 1048576",
                    ));
                }
                let dir = source.resolve(dir);
                source.writable_dir(&format!("route[{i}].buffer_dir"), &dir)?;
                if routes
                    .iter()
                    .any(|r: &Route| r.buffer.as_ref().is_some_and(|b| b.0 == dir))
                {
                    return Err(source.invalid(
                        &format!("route[{i}].buffer_dir"),
                        format!("{} is the buffer of another route", dir.display()),
                    ));
                }
                Some((dir, route.buffer_max_bytes, route.buffer_full))
            }
            None => None,
        };
        let dead_letter_file = match (&route.dead_letter_file, &buffer) {
            (Some(file), _) => {
                let file = source.resolve(file);
                if let Some(dir) = file.parent() {
                    source.writable_dir(&format!("route[{i}].dead_letter_file"), dir)?;
                }
                Some(file)
            }
            (None, Some((dir, _, _))) => Some(dir.join("dead-letter.jsonl")),
            (None, None) => None,
        };
        routes.push(Route {
            name,
            filters,
            sink,
            queue_bytes: route.queue_bytes,
            buffer,
            mqtt,
            broker,
            dead_letter: (dead_letter_file, route.dead_letter_max_bytes),
        });
    }
    Ok(Loaded {
        config,
        listen,
        routes,
        keys,
        metrics_listen,
        state_file,
        allowed_sources,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISSUE_EXAMPLE: &str = r#"# receiver.toml (IT side)
[link]
listen = "127.0.0.1:47000"

[metrics]
listen = "127.0.0.1:9182"

[[route]]
topics = ["line3/#", "historian/#"]   # MQTT-style filters: + one level, # the rest
sink = { kind = "file", path = "out/records.jsonl" }
"#;

    /// The probe's config findings: each refused at load, naming the key.
    #[test]
    fn unsafe_settings_are_refused_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let refused = |text: &str| -> String {
            let path = dir.path().join("receiver.toml");
            std::fs::write(&path, text).unwrap();
            match load(&path) {
                Ok(_) => panic!("accepted:\n{text}"),
                Err(e) => e.to_string(),
            }
        };
        let error = refused(&ISSUE_EXAMPLE.replace("127.0.0.1:9182", "0.0.0.0:9182"));
        assert!(
            error.contains("`metrics.listen`") && error.contains("every interface"),
            "{error}"
        );
        let path = dir.path().join("receiver.toml");
        std::fs::write(
            &path,
            ISSUE_EXAMPLE.replace("127.0.0.1:9182\"", "0.0.0.0:9182\"\nall_interfaces = true"),
        )
        .unwrap();
        assert!(load(&path).is_ok(), "asked for by name");

        std::fs::create_dir(dir.path().join("real")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("real"), dir.path().join("link")).unwrap();
        let error = refused(&format!("{ISSUE_EXAMPLE}buffer_dir = \"link\"\n"));
        assert!(
            error.contains("buffer_dir") && error.contains("symbolic link"),
            "{error}"
        );

        std::fs::write(dir.path().join("a-file"), "").unwrap();
        let error =
            refused(&ISSUE_EXAMPLE.replace("out/records.jsonl", "a-file/out/records.jsonl"));
        assert!(
            error.contains("route[0].sink.path") && error.contains("not a directory"),
            "{error}"
        );

        let error =
            refused(&ISSUE_EXAMPLE.replace("[[route]]", "[[route]]\nname = \"a\\u001b[2Jb\""));
        assert!(error.contains("route[0].name"), "{error}");
    }

    #[test]
    fn the_documented_example_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("receiver.toml");
        std::fs::write(&path, ISSUE_EXAMPLE).unwrap();
        let loaded = load(&path).unwrap();
        assert_eq!(loaded.routes.len(), 1);
        assert_eq!(loaded.routes[0].name, "0-file");
        assert!(loaded.routes[0].filters[0].matches("line3/telemetry"));
        // Relative sink paths are relative to the configuration file.
        let SinkConfig::File { path: out, .. } = &loaded.routes[0].sink else {
            panic!()
        };
        assert_eq!(out, &dir.path().join("out/records.jsonl"));
    }

    #[test]
    fn bad_filters_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.toml");
        std::fs::write(&path, ISSUE_EXAMPLE.replace("historian/#", "historian/#/x")).unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(err.contains("r.toml:9: `route[0].topics[1]`"), "{err}");
        std::fs::write(
            &path,
            ISSUE_EXAMPLE.replace("kind = \"file\"", "kind = \"fax\""),
        )
        .unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(err.contains("r.toml:10:") && err.contains("fax"), "{err}");
    }
}
