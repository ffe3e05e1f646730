//! The embedded broker sink: rumqttd inside the receiver, so the demo and a first deployment can
//! hand records to MQTT clients without running a broker. Records are published into it through
//! a local link; clients subscribe over MQTT 3.1.1. It keeps messages in memory only, a log of at
//! most 2 MiB per topic (rumqttd keeps one per topic, so a plant tree of many MQTT topics costs
//! that much each at worst), and does not keep retain flags: for durability behind an outage and
//! for large topic trees, use the `mqtt` sink to a real broker.

use std::net::SocketAddr;

use diode_wire::Record;
use rumqttd::local::LinkTx;

use super::mqtt::republish_topic;
use super::SinkError;

pub struct BrokerSink {
    link: LinkTx,
    prefix: String,
}

impl BrokerSink {
    pub fn start(
        listen: SocketAddr,
        prefix: String,
        max_record_bytes: usize,
    ) -> std::io::Result<BrokerSink> {
        // rumqttd binds in its own thread and only logs a failure there: find out here.
        drop(std::net::TcpListener::bind(listen)?);
        let settings = format!(
            r#"id = 0
[router]
id = 0
max_connections = 1000
max_outgoing_packet_count = 200
max_segment_size = 1048576
max_segment_count = 2

[v4.1]
name = "diode"
listen = "{listen}"
next_connection_delay_ms = 1
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = {max_payload}
max_inflight_count = 100
dynamic_filters = true
"#,
            max_payload = max_record_bytes + 65_536,
        );
        let config: rumqttd::Config = toml::from_str(&settings).map_err(std::io::Error::other)?;
        let mut broker = rumqttd::Broker::new(config);
        let (link, _) = broker.link("diode-recv").map_err(std::io::Error::other)?;
        std::thread::Builder::new()
            .name("mqtt-broker".into())
            .spawn(move || {
                if let Err(e) = broker.start() {
                    tracing::error!(error = %e, "the embedded MQTT broker stopped");
                }
            })?;
        tracing::info!(%listen, "embedded MQTT broker listening");
        Ok(BrokerSink { link, prefix })
    }

    pub fn deliver(&mut self, records: &[Record]) -> Result<(), SinkError> {
        for record in records {
            let topic = republish_topic(&self.prefix, record);
            self.link
                .publish(topic, record.payload.clone())
                .map_err(|e| SinkError::Io(std::io::Error::other(e)))?;
        }
        Ok(())
    }
}
