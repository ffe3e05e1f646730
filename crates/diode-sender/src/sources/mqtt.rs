//! The MQTT source: a persistent-session subscriber. Each message becomes one record with its MQTT
//! topic, QoS and retain flag as the record's origin (wire-format.md §5.4); payloads pass untouched,
//! Sparkplug B included.
//!
//! A QoS 1 message is acknowledged only once its record is in the link queue, and the session is
//! persistent (clean session off): what the broker accepted while the sender was away or slow is
//! delivered when it comes back.

use diode_common::config::default_u8;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use diode_common::config::ConfigError;
use diode_wire::proto::Origin;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::Deserialize;

use super::{Claim, Scope, Source, SourceContext, Started};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    pub broker: String,
    pub subscribe: Vec<String>,
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

impl MqttConfig {
    pub fn check(&self, scope: &Scope<'_>) -> Result<MqttSource, ConfigError> {
        if self.subscribe.is_empty() {
            return Err(scope.invalid("subscribe", "subscribe to at least one topic filter"));
        }
        for filter in &self.subscribe {
            if !rumqttc::valid_filter(filter) {
                return Err(scope.invalid(
                    "subscribe",
                    format!("{filter:?} is not a valid MQTT topic filter"),
                ));
            }
        }
        if self.qos > 1 {
            return Err(scope.invalid(
                "qos",
                format!(
                    "{}: 0 or 1 (QoS 2 buys nothing here: the link is at most once)",
                    self.qos
                ),
            ));
        }
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
                // The broker keeps QoS 1 messages for this client while the sender is away.
                clean_session: false,
                max_packet_bytes: diode_common::mqtt::max_packet_bytes(
                    scope.site().max_record_bytes,
                ),
            },
        )?;
        Ok(MqttSource {
            config: self.clone(),
            options,
        })
    }
}

#[derive(Debug)]
pub struct MqttSource {
    config: MqttConfig,
    options: MqttOptions,
}

impl Source for MqttSource {
    fn describe(&self) -> String {
        let c = &self.config;
        format!(
            "mqtt {}{} as {:?}, subscribed to {} at QoS {}, persistent session",
            if c.tls.is_some() { "tls://" } else { "" },
            c.broker,
            c.client_id,
            c.subscribe.join(", "),
            c.qos
        )
    }

    /// Two clients with one id would throw each other off the broker in turn.
    fn claims(&self) -> Vec<Claim> {
        vec![Claim {
            what: format!(
                "MQTT client id {:?} on {}",
                self.config.client_id, self.config.broker
            ),
            conflict: "is used by",
        }]
    }

    fn start(&self, ctx: SourceContext) -> std::io::Result<Started> {
        let qos = if self.config.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        Ok(Started {
            local_addr: None,
            task: Box::pin(run(
                self.options.clone(),
                self.config.subscribe.clone(),
                qos,
                ctx,
            )),
        })
    }
}

async fn run(mut options: MqttOptions, subscribe: Vec<String>, qos: QoS, ctx: SourceContext) {
    options.set_manual_acks(true);
    let broker = {
        let (host, port) = options.broker_address();
        format!("{host}:{port}")
    };
    // Acks and subscriptions go through this channel; a broker keeps at most its inflight
    // window of QoS 1 messages unacknowledged, far below this.
    options.set_request_channel_capacity(4096);
    let (client, mut events) = AsyncClient::new(options, 4096);
    let mut backoff = Duration::ZERO;
    let mut connected = false;
    loop {
        let event = tokio::select! {
            _ = ctx.shutdown.wait() => break,
            event = events.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                tracing::info!(topic = %ctx.name, %broker, session_present = ack.session_present, "mqtt source connected");
                connected = true;
                backoff = Duration::ZERO;
                // Subscribing again to a kept session is harmless, and needed on a new one.
                let filters = subscribe
                    .iter()
                    .map(|f| rumqttc::SubscribeFilter::new(f.clone(), qos));
                if let Err(e) = client.try_subscribe_many(filters) {
                    tracing::error!(topic = %ctx.name, error = %e, "mqtt source cannot subscribe");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                {
                    ctx.metrics.errors_connect.inc();
                    tracing::error!(topic = %ctx.name, %broker, filters = ?subscribe,
                            "the broker refused a subscription (check its ACL)");
                } else {
                    // Counted as connected only once subscribed: from here on the broker
                    // keeps for us whatever matches, even while we are away.
                    ctx.metrics.connections.set(1);
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                if publish.payload.len() > ctx.max_record_bytes {
                    ctx.metrics.dropped_oversize.inc();
                } else {
                    let origin = Origin {
                        topic: publish.topic.clone(),
                        qos: publish.qos as u32,
                        retain: publish.retain,
                        protocol: "mqtt".to_owned(),
                    };
                    let time_us = diode_common::unix_time_us();
                    let payload = Bytes::clone(&publish.payload);
                    // Waiting for room in the queue stops reading from the broker, which
                    // then holds the messages: backpressure, not loss.
                    if super::emit(&ctx, time_us, Some(origin), payload)
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                if publish.qos != QoS::AtMostOnce {
                    if let Err(e) = client.try_ack(&publish) {
                        // The broker sends it again on the next connection.
                        ctx.metrics.errors_io.inc();
                        tracing::warn!(topic = %ctx.name, error = %e, "mqtt source cannot acknowledge");
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                if connected {
                    connected = false;
                    ctx.metrics.connections.set(0);
                    ctx.metrics.errors_io.inc();
                    tracing::warn!(topic = %ctx.name, %broker, error = %e, "mqtt source lost the broker; reconnecting");
                } else {
                    ctx.metrics.errors_connect.inc();
                    if backoff == Duration::ZERO || backoff.as_secs() >= 10 {
                        tracing::warn!(topic = %ctx.name, %broker, error = %e, "mqtt source cannot reach the broker; retrying");
                    }
                }
                backoff = diode_common::mqtt::next_backoff(backoff);
                tokio::select! {
                    _ = ctx.shutdown.wait() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
            }
        }
    }
    ctx.metrics.connections.set(0);
    let _ = client.try_disconnect();
}
