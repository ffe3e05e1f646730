//! The MQTT sink: republishes records to a broker under `topic_prefix` + the record's MQTT topic
//! (when it came from an MQTT source, wire-format.md §5.4) or + its diode topic. At QoS 1 a batch
//! counts as delivered only once the broker has acknowledged every message of it.

use diode_common::config::default_u8;
use std::path::PathBuf;
use std::time::Duration;

use diode_common::config::ConfigError;
use diode_wire::Record;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::Deserialize;
use tokio::sync::watch;

use super::{Refusals, Scope, Sink, SinkError, SinkSettings};
use crate::metrics::RouteMetrics;
use crate::route::RouteTask;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    pub broker: String,
    #[serde(default)]
    pub topic_prefix: String,
    #[serde(default = "default_u8::<1>")]
    pub qos: u8,
    pub client_id: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub tls: Option<diode_common::mqtt::MqttTls>,
}

/// A topic prefix is published under, so it must be a topic itself, without wildcards.
pub(crate) fn check_topic_prefix(scope: &Scope<'_>, topic_prefix: &str) -> Result<(), ConfigError> {
    if topic_prefix.contains(['+', '#']) {
        return Err(scope.invalid("topic_prefix", "must not contain MQTT wildcards"));
    }
    Ok(())
}

impl MqttConfig {
    pub fn check(&self, scope: &Scope<'_>) -> Result<MqttSettings, ConfigError> {
        if self.qos > 1 {
            return Err(scope.invalid("qos", format!("{}: 0 or 1", self.qos)));
        }
        check_topic_prefix(scope, &self.topic_prefix)?;
        let options = diode_common::mqtt::options(
            scope.source(),
            scope.prefix(),
            &diode_common::mqtt::MqttClient {
                broker: &self.broker,
                client_id: &self.client_id,
                username: self.username.as_deref(),
                password: self.password.as_deref(),
                password_file: self.password_file.as_ref(),
                tls: self.tls.as_ref(),
                clean_session: false,
                max_packet_bytes: scope.site().max_mqtt_packet_bytes(),
            },
        )?;
        Ok(MqttSettings {
            config: self.clone(),
            options,
        })
    }
}

#[derive(Debug)]
pub struct MqttSettings {
    config: MqttConfig,
    options: MqttOptions,
}

impl SinkSettings for MqttSettings {
    fn describe(&self) -> String {
        let c = &self.config;
        format!(
            "mqtt {}{}, topics under {:?}, QoS {}",
            if c.tls.is_some() { "tls://" } else { "" },
            c.broker,
            c.topic_prefix,
            c.qos
        )
    }

    fn start(&self, route: RouteTask) -> std::io::Result<tokio::task::JoinHandle<()>> {
        let sink = MqttSink::new(
            self.options.clone(),
            self.config.topic_prefix.clone(),
            self.config.qos,
            route.name(),
        );
        Ok(route.spawn(sink))
    }
}

/// A batch whose acknowledgements stop coming for this long is offered again.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);

pub struct MqttSink {
    client: AsyncClient,
    prefix: String,
    qos: QoS,
    /// PUBACKs received, counted by the event loop task.
    acked: watch::Receiver<u64>,
    /// QoS 1 messages handed to the client whose acknowledgement we wait for.
    published: u64,
    events: tokio::task::JoinHandle<()>,
    route: String,
}

impl MqttSink {
    /// Must be called inside the runtime: it starts the client's event loop.
    fn new(mut options: MqttOptions, prefix: String, qos: u8, route: &str) -> MqttSink {
        options.set_request_channel_capacity(4096);
        options.set_inflight(1000);
        let (client, mut eventloop) = AsyncClient::new(options, 4096);
        let (acked_tx, acked) = watch::channel(0u64);
        let route_name = route.to_owned();
        let events = tokio::spawn(async move {
            let mut backoff = Duration::ZERO;
            let mut connected = false;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        acked_tx.send_modify(|n| *n += 1);
                    }
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        tracing::info!(route = %route_name, "mqtt sink connected");
                        connected = true;
                        backoff = Duration::ZERO;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if connected || backoff.is_zero() {
                            tracing::warn!(route = %route_name, error = %e, "mqtt sink: broker unreachable; retrying");
                        }
                        connected = false;
                        backoff = diode_common::mqtt::next_backoff(backoff);
                        tokio::time::sleep(backoff).await;
                    }
                }
            }
        });
        MqttSink {
            client,
            prefix,
            qos: if qos == 0 {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            },
            acked,
            published: 0,
            events,
            route: route.to_owned(),
        }
    }

    async fn publish(&mut self, records: &[Record]) -> Result<(), SinkError> {
        for record in records {
            let retain = record.origin.as_ref().is_some_and(|o| o.retain);
            // Screened before delivery (`Sink::refusal`); a record without a topic is skipped.
            let Ok(topic) = republish_topic(&self.prefix, record) else {
                continue;
            };
            self.client
                .publish_bytes(topic, self.qos, retain, record.payload.clone())
                .await
                .map_err(|_| SinkError::ClientGone)?;
            if self.qos == QoS::AtLeastOnce {
                self.published += 1;
            }
        }
        loop {
            let acked = *self.acked.borrow_and_update();
            if acked >= self.published {
                return Ok(());
            }
            match tokio::time::timeout(ACK_TIMEOUT, self.acked.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(SinkError::ClientGone),
                Err(_) => {
                    // Whatever is still unacknowledged is sent again with the batch.
                    tracing::warn!(route = %self.route, waiting = self.published - acked, "mqtt sink: acknowledgements stopped");
                    self.published = acked;
                    return Err(SinkError::AckTimeout(ACK_TIMEOUT));
                }
            }
        }
    }
}

impl Sink for MqttSink {
    fn refusal(&self, record: &Record) -> Option<String> {
        republished_part(&self.prefix, record)
            .err()
            .map(str::to_owned)
    }

    async fn deliver(
        &mut self,
        records: &[Record],
        _metrics: &RouteMetrics,
    ) -> Result<Refusals, SinkError> {
        self.publish(records).await.map(|()| Refusals::new())
    }

    async fn close(&mut self) {
        let _ = self.client.try_disconnect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.events.abort();
    }
}

/// Where an MQTT sink or the embedded broker publishes a record: `prefix` + its MQTT topic when
/// it came from an MQTT source, else + its diode topic. The link does not check origins (§5.4):
/// when prefix + MQTT topic is not a topic a broker accepts (too long with the prefix, a control
/// character), the diode topic stands in; when that is not either, the record cannot be
/// published at all (it goes to the route's dead letters).
pub fn republish_topic(prefix: &str, record: &Record) -> Result<String, &'static str> {
    republished_part(prefix, record).map(|part| format!("{prefix}{part}"))
}

/// What `republish_topic` puts after the prefix, chosen and checked without building the topic:
/// sinks screen every record with it before delivery.
pub fn republished_part<'a>(prefix: &str, record: &'a Record) -> Result<&'a str, &'static str> {
    let mqtt_origin = record
        .origin
        .as_ref()
        .filter(|o| !o.topic.is_empty() && (o.protocol.is_empty() || o.protocol == "mqtt"));
    if let Some(origin) = mqtt_origin.filter(|o| valid_topic_parts(prefix, &o.topic)) {
        return Ok(&origin.topic);
    }
    if valid_topic_parts(prefix, &record.topic) {
        Ok(&record.topic)
    } else {
        Err("no valid MQTT topic: neither its MQTT topic nor its diode topic under the prefix")
    }
}

/// A topic a broker accepts for PUBLISH: 1 to 65535 bytes (MQTT's limit, prefix included), no
/// wildcards, no NUL or other control character (mosquitto drops the connection on those).
pub fn valid_topic(topic: &str) -> bool {
    valid_topic_parts(topic, "")
}

/// `valid_topic` of `prefix` followed by `rest`.
fn valid_topic_parts(prefix: &str, rest: &str) -> bool {
    let allowed = |part: &str| !part.chars().any(|c| c == '+' || c == '#' || c.is_control());
    let len = prefix.len() + rest.len();
    len > 0 && len <= 65_535 && allowed(prefix) && allowed(rest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use diode_wire::proto::Origin;

    fn record(topic: &str, origin: Option<&str>) -> Record {
        Record {
            session_id: 0,
            topic: topic.into(),
            seq: 1,
            time_us: 0,
            origin: origin.map(|o| Origin {
                topic: o.to_owned(),
                protocol: "mqtt".into(),
                ..Origin::default()
            }),
            late: false,
            payload: Bytes::new(),
        }
    }

    /// The probe's cases: prefix + a 65,518-byte plant topic went out truncated, outside the
    /// prefix; a NUL or control character made mosquitto drop the connection again and again.
    #[test]
    fn topics_are_checked_whole_prefix_included() {
        let long = "x".repeat(65_533);
        assert!(
            republish_topic("ot/", &record("plant/mqtt", Some(&long))).as_deref()
                == Ok("ot/plant/mqtt"),
            "too long with the prefix: the diode topic stands in"
        );
        assert_eq!(
            republish_topic("ot/", &record("plant/mqtt", Some("line3/a\u{1}b"))),
            Ok("ot/plant/mqtt".to_owned())
        );
        assert_eq!(
            republish_topic("ot/", &record("plant/mqtt", Some("line3/plc"))),
            Ok("ot/line3/plc".to_owned())
        );
        assert!(republish_topic("ot/", &record("bad\0topic", None)).is_err());
        assert!(republish_topic("ot/", &record("esc\u{1b}[2J", Some("a\rb"))).is_err());
        assert!(!valid_topic("ot/a+b") && !valid_topic("") && valid_topic("ot/Ünit 2"));
    }
}
