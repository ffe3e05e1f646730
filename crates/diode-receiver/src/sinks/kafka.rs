//! The Kafka sink (rskafka): how a site that outgrows one machine scales, since consumers scale in
//! Kafka. Each record is produced with its diode topic as the key, to one partition per diode
//! topic (chosen by a stable hash), so a topic's records stay in order; its sequence number,
//! ingest time and MQTT origin travel as headers.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use diode_common::config::ConfigError;
use diode_wire::Record;
use rskafka::client::partition::{Compression, PartitionClient, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder};
use serde::Deserialize;

use super::{Refusals, Scope, Sink, SinkError, SinkSettings};
use crate::metrics::RouteMetrics;
use crate::route::RouteTask;

/// `sink = { kind = "kafka", ... }`: the diode topic is the message key (one partition per
/// diode topic, so its order holds); sequence number, ingest time and MQTT origin are headers.
/// `topic` may contain `{topic}`: the diode topic with `/` as `.`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    pub brokers: Vec<String>,
    pub topic: String,
    #[serde(default = "default_client_id")]
    pub client_id: String,
    /// Partitions of a topic this sink creates when it does not exist (0: never create).
    #[serde(default = "default_create_partitions")]
    pub create_partitions: i32,
}

fn default_client_id() -> String {
    "diode-recv".into()
}
fn default_create_partitions() -> i32 {
    1
}

impl KafkaConfig {
    pub fn check(&self, scope: &Scope<'_>) -> Result<KafkaConfig, ConfigError> {
        if self.brokers.is_empty() {
            return Err(scope.invalid("brokers", "list at least one bootstrap broker"));
        }
        for broker in &self.brokers {
            if diode_common::mqtt::split_host_port(broker).is_none() {
                return Err(scope.invalid("brokers", format!("{broker:?} is not host:port")));
            }
        }
        let sample = kafka_topic(&self.topic, "line3/plc7");
        if !valid_kafka_topic(&sample) {
            return Err(scope.invalid(
                "topic",
                format!(
                    "{:?} gives Kafka topic names such as {sample:?}: 1 to 249 of a-z A-Z 0-9 . _ -",
                    self.topic
                ),
            ));
        }
        if self.create_partitions < 0 {
            return Err(scope.invalid(
                "create_partitions",
                "must be 0 (never create topics) or more",
            ));
        }
        Ok(self.clone())
    }
}

impl SinkSettings for KafkaConfig {
    fn describe(&self) -> String {
        format!(
            "kafka {} topic {:?}, keyed by diode topic",
            self.brokers.join(","),
            self.topic
        )
    }

    fn start(&self, route: RouteTask) -> std::io::Result<tokio::task::JoinHandle<()>> {
        Ok(route.spawn(KafkaSink {
            brokers: self.brokers.clone(),
            pattern: self.topic.clone(),
            client_id: self.client_id.clone(),
            create_partitions: self.create_partitions,
            client: None,
            partitions: HashMap::new(),
        }))
    }
}

/// How long one produce may retry inside the client before the batch counts as failed (and the
/// route's own retry, with its counter and log line, takes over).
const PRODUCE_DEADLINE: Duration = Duration::from_secs(20);

/// The Kafka topic for a diode topic: `{topic}` in the pattern becomes the diode topic with `/`
/// as `.`, and every other character Kafka does not allow escaped with `-`: `-` as `--`, `.` as
/// `-.`, others as `-` and the hex of their UTF-8 bytes. So two diode topics never share a Kafka
/// topic (`a/b` is `a.b`, `a.b` is `a-.b`). The caller checks the result with
/// [`valid_kafka_topic`] (it may be too long).
pub fn kafka_topic(pattern: &str, diode_topic: &str) -> String {
    let mut escaped = String::with_capacity(diode_topic.len());
    for c in diode_topic.chars() {
        match c {
            '/' => escaped.push('.'),
            '-' => escaped.push_str("--"),
            '.' => escaped.push_str("-."),
            c if c.is_ascii_alphanumeric() || c == '_' => escaped.push(c),
            c => {
                let mut utf8 = [0u8; 4];
                for byte in c.encode_utf8(&mut utf8).bytes() {
                    escaped.push_str(&format!("-{byte:02x}"));
                }
            }
        }
    }
    pattern.replace("{topic}", &escaped)
}

pub fn valid_kafka_topic(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

pub struct KafkaSink {
    brokers: Vec<String>,
    pattern: String,
    client_id: String,
    create_partitions: i32,
    client: Option<Client>,
    /// Per Kafka topic, a client for each of its partitions.
    partitions: HashMap<String, Vec<PartitionClient>>,
}

impl KafkaSink {
    fn error(e: impl std::fmt::Display) -> SinkError {
        SinkError::Kafka(e.to_string())
    }

    /// Produces the batch; records whose Kafka topic is missing (and may not be created) are
    /// returned, with why, for the route's dead letters instead of failing the batch forever.
    async fn produce(&mut self, records: &[Record]) -> Result<Refusals, SinkError> {
        if self.client.is_none() {
            let client = ClientBuilder::new(self.brokers.clone())
                .client_id(self.client_id.as_str())
                .backoff_config(rskafka::BackoffConfig {
                    deadline: Some(PRODUCE_DEADLINE),
                    max_backoff: Duration::from_secs(2),
                    ..rskafka::BackoffConfig::default()
                })
                .build()
                .await
                .map_err(Self::error)?;
            self.client = Some(client);
        }
        // Records grouped by (Kafka topic, partition), each group in arrival order.
        let mut groups: BTreeMap<(String, usize), Vec<rskafka::record::Record>> = BTreeMap::new();
        let mut refused = Vec::new();
        for (i, record) in records.iter().enumerate() {
            let topic = kafka_topic(&self.pattern, &record.topic);
            let Some(partitions) = self.partitions_of(&topic).await? else {
                refused.push((
                    i,
                    format!("Kafka topic {topic} does not exist and create_partitions is 0"),
                ));
                continue;
            };
            let partition = crc32fast::hash(record.topic.as_bytes()) as usize % partitions;
            groups
                .entry((topic, partition))
                .or_default()
                .push(to_kafka(record));
        }
        for ((topic, partition), batch) in groups {
            let client = &self.partitions[&topic][partition];
            client
                .produce(batch, Compression::NoCompression)
                .await
                .map_err(Self::error)?;
        }
        Ok(refused)
    }

    /// The number of partitions of `topic`, creating the topic if it is missing and allowed;
    /// `None` if it is missing and may not be created.
    async fn partitions_of(&mut self, topic: &str) -> Result<Option<usize>, SinkError> {
        if let Some(clients) = self.partitions.get(topic) {
            return Ok(Some(clients.len()));
        }
        let client = self.client.as_ref().expect("connected by the caller");
        let mut existing = client
            .list_topics()
            .await
            .map_err(Self::error)?
            .into_iter()
            .find(|t| t.name == topic)
            .map(|t| t.partitions);
        if existing.is_none() && self.create_partitions > 0 {
            client
                .controller_client()
                .map_err(Self::error)?
                .create_topic(topic, self.create_partitions, 1, 5_000)
                .await
                .map_err(Self::error)?;
            tracing::info!(%topic, partitions = self.create_partitions, "kafka sink created its topic");
            existing = Some((0..self.create_partitions).collect());
        }
        let Some(partitions) = existing.filter(|p| !p.is_empty()) else {
            return Ok(None);
        };
        let mut clients = Vec::new();
        for partition in partitions {
            clients.push(
                client
                    .partition_client(topic, partition, UnknownTopicHandling::Retry)
                    .await
                    .map_err(Self::error)?,
            );
        }
        let count = clients.len();
        self.partitions.insert(topic.to_owned(), clients);
        Ok(Some(count))
    }
}

fn to_kafka(record: &Record) -> rskafka::record::Record {
    let mut headers = BTreeMap::new();
    headers.insert("diode-seq".to_owned(), record.seq.to_string().into_bytes());
    if record.session_id != 0 {
        headers.insert(
            "diode-session".to_owned(),
            format!("{:016x}", record.session_id).into_bytes(),
        );
    }
    headers.insert(
        "diode-time-us".to_owned(),
        record.time_us.to_string().into_bytes(),
    );
    if record.late {
        // Filled a gap from a replay of the sender's journal (wire-format.md §6.7).
        headers.insert("diode-late".to_owned(), b"1".to_vec());
    }
    if let Some(origin) = record
        .origin
        .as_ref()
        .filter(|o| !o.topic.is_empty() && (o.protocol.is_empty() || o.protocol == "mqtt"))
    {
        headers.insert("mqtt-topic".to_owned(), origin.topic.clone().into_bytes());
    }
    let timestamp =
        rskafka::chrono::DateTime::from_timestamp_micros(record.time_us).unwrap_or_default();
    rskafka::record::Record {
        key: Some(record.topic.as_bytes().to_vec()),
        value: Some(record.payload.to_vec()),
        headers,
        timestamp,
    }
}

impl Sink for KafkaSink {
    fn refusal(&self, record: &Record) -> Option<String> {
        let topic = kafka_topic(&self.pattern, &record.topic);
        (!valid_kafka_topic(&topic))
            .then(|| format!("{topic:?} is not a valid Kafka topic name (at most 249 characters)"))
    }

    async fn deliver(
        &mut self,
        records: &[Record],
        _metrics: &RouteMetrics,
    ) -> Result<Refusals, SinkError> {
        self.produce(records).await
    }

    fn reset(&mut self) {
        self.client = None;
        self.partitions.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_follow_kafka_rules() {
        assert_eq!(kafka_topic("ot-telemetry", "line3/plc7"), "ot-telemetry");
        assert_eq!(kafka_topic("ot.{topic}", "line3/plc7"), "ot.line3.plc7");
        assert_eq!(
            kafka_topic("{topic}", "plant/Ünit 2"),
            "plant.-c3-9cnit-202"
        );
        // Distinct diode topics never share a Kafka topic.
        let names: std::collections::HashSet<String> =
            ["a/b", "a.b", "a_b", "a-b", "a b", "a-.b", "a--b"]
                .iter()
                .map(|t| kafka_topic("ot.{topic}", t))
                .collect();
        assert_eq!(names.len(), 7);
        assert!(names.iter().all(|n| valid_kafka_topic(n)));
        assert!(valid_kafka_topic("ot.line3.plc7"));
        assert!(!valid_kafka_topic(""));
        assert!(!valid_kafka_topic(".."));
        assert!(!valid_kafka_topic(&"x".repeat(250)));
    }
}
