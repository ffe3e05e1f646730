//! The MQTT source: a persistent-session subscriber. Each message becomes one record with its MQTT
//! topic, QoS and retain flag as the record's origin (wire-format.md §5.4); payloads pass untouched,
//! Sparkplug B included.
//!
//! A QoS 1 message is acknowledged only once its record is in the link queue, and the session is
//! persistent (clean session off): what the broker accepted while the sender was away or slow is
//! delivered when it comes back.

use std::time::Duration;

use bytes::Bytes;
use diode_wire::proto::Origin;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use super::SourceContext;

pub struct MqttSource {
    pub options: MqttOptions,
    pub subscribe: Vec<String>,
    pub qos: QoS,
}

impl MqttSource {
    pub async fn run(self, ctx: SourceContext) {
        let mut options = self.options;
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
                    let filters = self
                        .subscribe
                        .iter()
                        .map(|f| rumqttc::SubscribeFilter::new(f.clone(), self.qos));
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
                        tracing::error!(topic = %ctx.name, %broker, filters = ?self.subscribe,
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
}
