//! Sinks: where records leave the receiver.
//!
//! Every kind of sink is a module of its own (docs/connectors.md): its configuration table, its
//! checks, its `check` line, and the [`Sink`] that delivers batches. [`SinkConfig`] is the closed
//! list of kinds, and [`SinkConfig::check`] the one place that dispatches on it. Routes
//! (route.rs) run sinks: each has its own queue and task, so a slow or absent sink never stalls
//! the link or other routes.

pub mod broker;
pub mod dead_letter;
pub mod file;
pub mod files;
pub mod kafka;
pub mod mqtt;
pub mod opcua_server;
pub mod stdout;
pub mod syslog;
pub mod tcp;
pub mod udp;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use diode_common::config::{ConfigError, ConfigScope};
use diode_wire::Record;
use serde::Deserialize;

use crate::metrics::RouteMetrics;
use crate::route::RouteTask;

/// The kinds of sink, as `sink = { kind = "...", ... }` names them. Closed on purpose: nothing
/// loads code into the receiver. A new kind is one module and one line here and one in
/// [`SinkConfig::check`].
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SinkConfig {
    File(file::FileConfig),
    Files(files::FilesConfig),
    Stdout(stdout::StdoutConfig),
    Udp(udp::UdpConfig),
    Tcp(tcp::TcpConfig),
    Mqtt(mqtt::MqttConfig),
    MqttBroker(broker::BrokerConfig),
    Kafka(kafka::KafkaConfig),
    Syslog(syslog::SyslogConfig),
    OpcuaServer(opcua_server::OpcuaServerConfig),
}

impl SinkConfig {
    /// Checks the table (errors name its keys under `scope`) and resolves paths and addresses.
    pub fn check(&self, scope: &Scope<'_>) -> Result<CheckedSink, ConfigError> {
        let (kind, settings): (_, Arc<dyn SinkSettings>) = match self {
            SinkConfig::File(c) => ("file", Arc::new(c.check(scope)?)),
            SinkConfig::Files(c) => ("files", Arc::new(c.check(scope)?)),
            SinkConfig::Stdout(c) => ("stdout", Arc::new(c.clone())),
            SinkConfig::Udp(c) => ("udp", Arc::new(c.check(scope)?)),
            SinkConfig::Tcp(c) => ("tcp", Arc::new(c.check(scope)?)),
            SinkConfig::Mqtt(c) => ("mqtt", Arc::new(c.check(scope)?)),
            SinkConfig::MqttBroker(c) => ("mqtt_broker", Arc::new(c.check(scope)?)),
            SinkConfig::Kafka(c) => ("kafka", Arc::new(c.check(scope)?)),
            SinkConfig::Syslog(c) => ("syslog", Arc::new(c.check(scope)?)),
            SinkConfig::OpcuaServer(c) => ("opcua_server", Arc::new(c.check(scope)?)),
        };
        Ok(CheckedSink { kind, settings })
    }
}

/// A route's sink as checked at load.
#[derive(Debug, Clone)]
pub struct CheckedSink {
    /// The `kind` of its table.
    pub kind: &'static str,
    pub settings: Arc<dyn SinkSettings>,
}

/// A sink's table, with the limits its checks depend on.
pub type Scope<'a> = ConfigScope<'a, SiteLimits>;

/// What the whole configuration sets that a sink's checks depend on.
#[derive(Debug, Clone, Copy)]
pub struct SiteLimits {
    /// `link.max_record_bytes`.
    pub max_record_bytes: usize,
}

impl SiteLimits {
    /// The largest MQTT packet a record can need: its payload, a topic and properties.
    pub fn max_mqtt_packet_bytes(&self) -> usize {
        diode_common::mqtt::max_packet_bytes(self.max_record_bytes)
    }
}

/// A sink's settings, checked and resolved, ready to start.
pub trait SinkSettings: std::fmt::Debug + Send + Sync {
    /// What it does, in one line, for `diode-recv check`.
    fn describe(&self) -> String;

    /// What only one route's sink may hold (a listening socket), as an error would name it.
    fn claims(&self) -> Vec<String> {
        Vec::new()
    }

    /// Makes the sink and spawns its route's task. Called inside the runtime; fails only for a
    /// sink that listens (a taken port stops the service).
    fn start(&self, route: RouteTask) -> std::io::Result<tokio::task::JoinHandle<()>>;
}

/// A sink at work. Connections are made on first use and again after a failure.
pub trait Sink: Send + 'static {
    /// Why this sink could never accept `record`, if so: checked before delivery, so one bad
    /// record goes to the dead letters instead of failing its batch forever.
    fn refusal(&self, _record: &Record) -> Option<String> {
        None
    }

    /// Delivers the whole batch or fails; a failed batch is offered again whole, so a sink may
    /// see records twice after a failure (at least once), never lose them. Records a sink finds
    /// it can never accept while delivering are returned rather than failing the batch.
    fn deliver(
        &mut self,
        records: &[Record],
        metrics: &RouteMetrics,
    ) -> impl Future<Output = Result<Refusals, SinkError>> + Send;

    /// Called after a failed delivery, so the next one starts on a fresh connection.
    fn reset(&mut self) {}

    /// Called once the route's queue is drained on a clean stop.
    fn close(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Records of a batch a sink took as delivered but can never accept: (index in the batch, why).
pub type Refusals = Vec<(usize, String)>;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("cannot connect to {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the broker has not acknowledged for {0:?}")]
    AckTimeout(Duration),
    #[error("the MQTT client stopped")]
    ClientGone,
    #[error("kafka: {0}")]
    Kafka(String),
}

/// One JSON line: `topic`, `seq`, `session` (the sender's session, 16 hex digits: with topic and
/// seq what identifies a record for good), `time` (RFC 3339, when the sender took it in), `origin` when
/// the source gave one (`{"topic", "qos", "retain"}`, wire-format.md §5.4), `late: true` when it
/// filled a gap from a replay of the sender's journal (§6.7), and `payload` (UTF-8) or
/// `payload_base64`.
pub fn json_line(record: &Record, out: &mut Vec<u8>) {
    #[derive(serde::Serialize)]
    struct Line<'a> {
        topic: &'a str,
        seq: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        session: Option<String>,
        time: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        origin: Option<Origin<'a>>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        late: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        payload: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        payload_base64: Option<String>,
    }
    #[derive(serde::Serialize)]
    struct Origin<'a> {
        topic: &'a str,
        qos: u32,
        retain: bool,
        #[serde(skip_serializing_if = "str::is_empty")]
        protocol: &'a str,
    }
    let (payload, payload_base64) = match std::str::from_utf8(&record.payload) {
        Ok(text) => (Some(text), None),
        Err(_) => (
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(&record.payload)),
        ),
    };
    let line = Line {
        topic: &record.topic,
        seq: record.seq,
        session: (record.session_id != 0).then(|| format!("{:016x}", record.session_id)),
        time: diode_common::format_rfc3339_us(record.time_us),
        origin: record.origin.as_ref().map(|o| Origin {
            topic: &o.topic,
            qos: o.qos,
            retain: o.retain,
            protocol: &o.protocol,
        }),
        late: record.late,
        payload,
        payload_base64,
    };
    serde_json::to_writer(&mut *out, &line).expect("serialising to a Vec cannot fail");
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn json_lines_follow_the_documented_shape() {
        let mut out = Vec::new();
        let record = Record {
            topic: "line3/telemetry".into(),
            seq: 7,
            session_id: 0x0123_4567_89ab_cdef,
            time_us: 1_764_100_000_123_456,
            origin: None,
            late: false,
            payload: Bytes::from_static(b"{\"t\":21.5}"),
        };
        json_line(&record, &mut out);
        let line: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(line["topic"], "line3/telemetry");
        assert_eq!(line["seq"], 7);
        assert_eq!(line["session"], "0123456789abcdef");
        assert_eq!(line["time"], "2025-11-25T19:46:40.123456Z");
        assert_eq!(line["payload"], "{\"t\":21.5}");
        let binary = Record {
            payload: Bytes::from_static(&[0xff, 0x00]),
            ..record
        };
        out.clear();
        json_line(&binary, &mut out);
        let line: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(line["payload_base64"], "/wA=");
        assert!(line.get("payload").is_none());
        assert!(line.get("origin").is_none());
        assert!(line.get("late").is_none());
        let from_mqtt = Record {
            origin: Some(diode_wire::proto::Origin {
                topic: "plant/line3/speed".into(),
                qos: 1,
                retain: true,
                protocol: "mqtt".into(),
            }),
            ..binary
        };
        out.clear();
        json_line(&from_mqtt, &mut out);
        let line: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(line["origin"]["topic"], "plant/line3/speed");
        assert_eq!(line["origin"]["qos"], 1);
        assert_eq!(line["origin"]["retain"], true);
        let late = Record {
            late: true,
            ..from_mqtt
        };
        out.clear();
        json_line(&late, &mut out);
        let line: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(line["late"], true);
    }
}
