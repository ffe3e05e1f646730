//! The embedded broker sink: a small MQTT 3.1.1 server inside the receiver, so the demo and a
//! first deployment can hand records to IT clients without running a broker of their own.
//!
//! It is **read-only for clients by construction**: records enter it from the route, never from
//! a connection. A client may CONNECT, SUBSCRIBE, UNSUBSCRIBE, PINGREQ and DISCONNECT; a PUBLISH
//! (or any packet a subscriber has no business sending) closes its connection, counted. There is
//! no internal client session to take over. It replaced rumqttd, which let any client publish
//! into `ot/...` (retained forgeries included), let a client with the receiver's own client id
//! take over its internal connection, panicked while holding a lock on a reconnect sequence, and
//! grew without bound with many subscriptions.
//!
//! Bounds: `max_connections` clients; per client `client_queue_bytes` of messages not yet
//! written (a client that falls behind is disconnected, counted; it may reconnect and go on),
//! at most 64 subscriptions, packets from clients of at most 64 KiB; retained messages (records
//! whose MQTT origin had the retain flag) within `retained_max_bytes`. Delivery to clients is at
//! QoS 0 (a SUBACK grants QoS 0 whatever was asked): for at-least-once delivery to IT consumers
//! across their outages, use the `mqtt` sink towards a broker such as mosquitto.
//!
//! Parsing and encoding of MQTT packets is rumqttc's (`mqttbytes`), the client the project
//! already uses for its MQTT source and sink.

use diode_common::config::default_usize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use diode_common::LogThrottle;
use diode_wire::Record;
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, Publish, SubAck, SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::QoS;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use diode_common::config::ConfigError;
use serde::Deserialize;

use super::mqtt::{republish_topic, republished_part};
use super::{Refusals, Scope, Sink, SinkError, SinkSettings};
use crate::filter::TopicFilter;
use crate::metrics::RouteMetrics;
use crate::route::RouteTask;

/// `sink = { kind = "mqtt_broker", ... }`. Topics as for the `mqtt` sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    pub listen: String,
    #[serde(default)]
    pub topic_prefix: String,
    /// Clients must log in with this username and the password in `password_file`
    /// (relative to this file; others must not be able to read it). Unset: anyone who can
    /// reach `listen` may subscribe.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password_file: Option<std::path::PathBuf>,
    /// Clients connected at once, at most.
    #[serde(default = "default_usize::<64>")]
    pub max_connections: usize,
    /// Messages waiting for one client, at most; a client that falls further behind is
    /// disconnected (it may reconnect).
    #[serde(default = "default_usize::<{ 4 << 20 }>")]
    pub client_queue_bytes: usize,
    /// Retained messages (records whose MQTT origin was retained) kept for new subscribers.
    #[serde(default = "default_usize::<{ 16 << 20 }>")]
    pub retained_max_bytes: usize,
    /// Serve MQTT over TLS only: `tls = { cert_file, key_file }` (PEM; the key mode 0600).
    #[serde(default)]
    pub tls: Option<diode_common::mqtt::ServerTls>,
}

impl BrokerConfig {
    pub fn check(&self, scope: &Scope<'_>) -> Result<BrokerSettings, ConfigError> {
        let listen = scope.socket_addr("listen", &self.listen)?;
        let tls = match &self.tls {
            Some(tls) => Some(diode_common::mqtt::server_tls_config(
                scope.source(),
                &scope.key("tls"),
                tls,
            )?),
            None => None,
        };
        let password = match (&self.username, &self.password_file) {
            (Some(_), Some(file)) => Some(
                diode_common::keyfile::read_secret(&scope.resolve(file))
                    .map_err(|e| scope.invalid("password_file", e.to_string()))?,
            ),
            (None, None) => None,
            _ => {
                return Err(
                    scope.invalid("password_file", "set username and password_file together")
                )
            }
        };
        if self.max_connections == 0 || self.max_connections > 10_000 {
            return Err(scope.invalid("max_connections", "must be 1 to 10000"));
        }
        if self.client_queue_bytes < 64 << 10 {
            return Err(scope.invalid("client_queue_bytes", "must be at least 65536"));
        }
        super::mqtt::check_topic_prefix(scope, &self.topic_prefix)?;
        Ok(BrokerSettings {
            listen,
            topic_prefix: self.topic_prefix.clone(),
            username: self.username.clone(),
            password,
            max_connections: self.max_connections,
            client_queue_bytes: self.client_queue_bytes,
            retained_max_bytes: self.retained_max_bytes,
            max_packet_bytes: scope.site().max_mqtt_packet_bytes(),
            tls,
        })
    }
}

/// A client's packets are small: CONNECT, SUBSCRIBE with a few filters.
const MAX_CLIENT_PACKET_BYTES: usize = 64 << 10;
const MAX_SUBSCRIPTIONS_PER_CLIENT: usize = 64;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the broker needs from its route's configuration.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    pub listen: SocketAddr,
    pub topic_prefix: String,
    /// Clients must log in with these, when set.
    pub username: Option<String>,
    pub password: Option<String>,
    pub max_connections: usize,
    pub client_queue_bytes: usize,
    pub retained_max_bytes: usize,
    /// The largest PUBLISH it sends: a record larger than this is not served (counted).
    pub max_packet_bytes: usize,
    /// When set, clients connect over TLS only.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl SinkSettings for BrokerSettings {
    fn describe(&self) -> String {
        format!(
            "embedded MQTT broker on {}{} (read-only for clients, {}, at most {} clients), topics under {:?}",
            if self.tls.is_some() { "tls://" } else { "" },
            self.listen,
            match &self.username {
                Some(user) => format!("login as {user:?} required"),
                None => "no login: anyone who can reach it may subscribe".to_owned(),
            },
            self.max_connections,
            self.topic_prefix
        )
    }

    fn claims(&self) -> Vec<String> {
        vec![format!("a broker on {}", self.listen)]
    }

    fn start(&self, route: RouteTask) -> std::io::Result<tokio::task::JoinHandle<()>> {
        Ok(route.spawn(BrokerSink::start(self.clone())?))
    }
}

/// What the broker counts; read by tests and logged.
#[derive(Debug, Default)]
pub struct BrokerCounters {
    pub clients: AtomicUsize,
    /// Connections refused or closed: over the limit, bad login, a PUBLISH or other forbidden
    /// packet, a client too slow for its queue, a malformed packet.
    pub refused: AtomicUsize,
}

struct Client {
    subscriptions: Vec<(String, TopicFilter)>,
    queue: mpsc::UnboundedSender<Bytes>,
    /// Bytes sent to `queue` and not yet written to the socket.
    queued: Arc<AtomicUsize>,
    /// Set when the client fell behind: its writer stops and the connection closes.
    lagging: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Default)]
struct State {
    clients: HashMap<u64, Client>,
    next_id: u64,
    retained: HashMap<String, Bytes>,
    retained_bytes: usize,
}

pub struct BrokerSink {
    state: Arc<Mutex<State>>,
    pub(crate) settings: Arc<BrokerSettings>,
    pub counters: Arc<BrokerCounters>,
}

static REFUSALS: LogThrottle = LogThrottle::new(Duration::from_secs(10));

fn refuse(counters: &BrokerCounters, peer: SocketAddr, why: &str) {
    counters.refused.fetch_add(1, Ordering::Relaxed);
    if let Some(folded) = REFUSALS.allow() {
        tracing::warn!(%peer, folded, "embedded MQTT broker closed a connection: {why}");
    }
}

impl BrokerSink {
    /// Binds now (a taken port stops the service) and serves from a task of its own.
    /// Must be called inside the runtime.
    pub fn start(settings: BrokerSettings) -> std::io::Result<BrokerSink> {
        let listener = std::net::TcpListener::bind(settings.listen)?;
        listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(listener)?;
        let sink = BrokerSink {
            state: Arc::default(),
            settings: Arc::new(settings),
            counters: Arc::default(),
        };
        let (state, settings, counters) = (
            sink.state.clone(),
            sink.settings.clone(),
            sink.counters.clone(),
        );
        tokio::spawn(async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "embedded MQTT broker: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if counters.clients.load(Ordering::Relaxed) >= settings.max_connections {
                    refuse(&counters, peer, "max_connections reached");
                    continue;
                }
                let _ = stream.set_nodelay(true);
                counters.clients.fetch_add(1, Ordering::Relaxed);
                let (state, settings, counters) =
                    (state.clone(), settings.clone(), counters.clone());
                tokio::spawn(async move {
                    let served = match &settings.tls {
                        None => serve(stream, &state, &settings).await,
                        Some(tls) => {
                            let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
                            match tokio::time::timeout(CONNECT_TIMEOUT, acceptor.accept(stream))
                                .await
                            {
                                Ok(Ok(stream)) => serve(stream, &state, &settings).await,
                                Ok(Err(e)) => Err(format!("TLS handshake failed: {e}")),
                                Err(_) => Err("no TLS handshake within 10 s".to_owned()),
                            }
                        }
                    };
                    if let Err(why) = served {
                        refuse(&counters, peer, &why);
                    }
                    counters.clients.fetch_sub(1, Ordering::Relaxed);
                });
            }
        });
        tracing::info!(listen = %sink.settings.listen, "embedded MQTT broker listening (read-only for clients)");
        Ok(sink)
    }

    fn publish(&mut self, records: &[Record]) {
        let mut state = self.state.lock().expect("not poisoned");
        for record in records {
            let Ok(topic) = republish_topic(&self.settings.topic_prefix, record) else {
                continue;
            };
            let retain = record.origin.as_ref().is_some_and(|o| o.retain);
            let Some(packet) = encode_publish(
                &topic,
                &record.payload,
                false,
                self.settings.max_packet_bytes,
            ) else {
                continue;
            };
            if retain {
                // An empty retained message clears the topic, as in MQTT.
                let retained = (!record.payload.is_empty()).then(|| {
                    encode_publish(&topic, &record.payload, true, usize::MAX)
                        .expect("encoded once already")
                });
                state.retain(topic.clone(), retained, self.settings.retained_max_bytes);
            }
            let limit = self.settings.client_queue_bytes;
            for client in state.clients.values() {
                if client.subscriptions.iter().any(|(_, f)| f.matches(&topic)) {
                    client.offer(&packet, limit);
                }
            }
        }
    }
}

impl Sink for BrokerSink {
    fn refusal(&self, record: &Record) -> Option<String> {
        republished_part(&self.settings.topic_prefix, record)
            .err()
            .map(str::to_owned)
            .or_else(|| {
                (record.payload.len() + 65_536 > self.settings.max_packet_bytes)
                    .then(|| "larger than the broker's largest packet".to_owned())
            })
    }

    async fn deliver(
        &mut self,
        records: &[Record],
        _metrics: &RouteMetrics,
    ) -> Result<Refusals, SinkError> {
        self.publish(records);
        Ok(Refusals::new())
    }
}

impl State {
    /// Keeps `packet` as the topic's retained message; `None` clears it.
    fn retain(&mut self, topic: String, packet: Option<Bytes>, max_bytes: usize) {
        if let Some(old) = self.retained.remove(&topic) {
            self.retained_bytes -= old.len() + topic.len();
        }
        let Some(packet) = packet.filter(|p| p.len() + topic.len() <= max_bytes) else {
            return;
        };
        while self.retained_bytes + packet.len() + topic.len() > max_bytes {
            let Some(victim) = self.retained.keys().next().cloned() else {
                break;
            };
            let old = self.retained.remove(&victim).expect("present");
            self.retained_bytes -= old.len() + victim.len();
        }
        self.retained_bytes += packet.len() + topic.len();
        self.retained.insert(topic, packet);
    }
}

impl Client {
    /// Queues a packet within the client's byte bound; a client over it is marked lagging and
    /// its connection closes (one packet may exceed the bound when nothing else is queued).
    fn offer(&self, packet: &Bytes, limit: usize) {
        if self.lagging.load(Ordering::Relaxed) {
            return;
        }
        let queued = self.queued.load(Ordering::Relaxed);
        if queued > 0 && queued + packet.len() > limit {
            self.lagging.store(true, Ordering::Relaxed);
            return;
        }
        self.queued.fetch_add(packet.len(), Ordering::Relaxed);
        let _ = self.queue.send(packet.clone());
    }
}

fn encode_publish(topic: &str, payload: &Bytes, retain: bool, max: usize) -> Option<Bytes> {
    let publish = Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain,
        topic: topic.to_owned(),
        pkid: 0,
        payload: payload.clone(),
    };
    let mut out = BytesMut::new();
    Packet::Publish(publish).write(&mut out, max).ok()?;
    Some(out.freeze())
}

/// Reads the next whole packet, at most `MAX_CLIENT_PACKET_BYTES`.
async fn read_packet(
    reader: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
) -> Result<Option<Packet>, String> {
    loop {
        match Packet::read(buf, MAX_CLIENT_PACKET_BYTES) {
            Ok(packet) => return Ok(Some(packet)),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => return Err(format!("malformed packet: {e}")),
        }
        buf.reserve(4096);
        match reader.read_buf(buf).await {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(e) => return Err(format!("read failed: {e}")),
        }
    }
}

/// One client connection, until it closes or breaks a rule; `Err` says which rule.
async fn serve(
    stream: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    state: &Mutex<State>,
    settings: &BrokerSettings,
) -> Result<(), String> {
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut buf = BytesMut::with_capacity(4096);
    let connect =
        match tokio::time::timeout(CONNECT_TIMEOUT, read_packet(&mut reader, &mut buf)).await {
            Err(_) => return Err("no CONNECT within 10 s".into()),
            Ok(Ok(Some(Packet::Connect(connect)))) => connect,
            Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some(_))) => return Err("the first packet was not CONNECT".into()),
            Ok(Err(why)) => return Err(why),
        };
    let authorised = match (&settings.username, &settings.password) {
        (Some(user), Some(password)) => connect.login.as_ref().is_some_and(|login| {
            use subtle::ConstantTimeEq;
            let user_ok = login.username.as_bytes().ct_eq(user.as_bytes());
            let password_ok = login.password.as_bytes().ct_eq(password.as_bytes());
            bool::from(user_ok & password_ok)
        }),
        _ => true,
    };
    let code = if authorised {
        ConnectReturnCode::Success
    } else {
        ConnectReturnCode::BadUserNamePassword
    };
    let mut out = BytesMut::new();
    Packet::ConnAck(ConnAck::new(code, false))
        .write(&mut out, usize::MAX)
        .map_err(|e| e.to_string())?;
    writer
        .write_all(&out)
        .await
        .map_err(|e| format!("write failed: {e}"))?;
    if !authorised {
        return Err(format!(
            "bad username or password (client id {:?})",
            connect.client_id
        ));
    }

    // Registered: from here records reach the client through its queue, written by a task of
    // its own so that a slow socket never holds the broker's lock.
    let (queue, mut outgoing) = mpsc::unbounded_channel::<Bytes>();
    let queued = Arc::new(AtomicUsize::new(0));
    let lagging = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let id = {
        let mut state = state.lock().expect("not poisoned");
        state.next_id += 1;
        let id = state.next_id;
        state.clients.insert(
            id,
            Client {
                subscriptions: Vec::new(),
                queue: queue.clone(),
                queued: queued.clone(),
                lagging: lagging.clone(),
            },
        );
        id
    };
    let mut writer_task = {
        let (queued, lagging) = (queued.clone(), lagging.clone());
        tokio::spawn(async move {
            let mut why = None;
            while let Some(packet) = outgoing.recv().await {
                if lagging.load(Ordering::Relaxed) {
                    why = Some("too slow: its queue reached client_queue_bytes".to_owned());
                    break;
                }
                if let Err(e) = writer.write_all(&packet).await {
                    why = Some(format!("write failed: {e}"));
                    break;
                }
                queued.fetch_sub(packet.len(), Ordering::Relaxed);
            }
            let _ = writer.shutdown().await;
            why
        })
    };
    let mut writer_done = false;
    // Keep-alive: a client silent for 1.5 times what it announced is gone (MQTT 3.1.1 §3.1.2.10).
    let keep_alive =
        (connect.keep_alive > 0).then(|| Duration::from_millis(connect.keep_alive as u64 * 1500));
    let result = loop {
        let limit = keep_alive.unwrap_or(Duration::from_secs(365 * 86_400));
        let packet = tokio::select! {
            read = tokio::time::timeout(limit, read_packet(&mut reader, &mut buf)) => match read {
                Ok(packet) => packet,
                Err(_) => break Err("keep-alive expired".to_owned()),
            },
            ended = &mut writer_task => {
                writer_done = true;
                break Err(ended.ok().flatten().unwrap_or_else(|| "its writer stopped".to_owned()));
            }
        };
        let packet = match packet {
            Ok(Some(packet)) => packet,
            Ok(None) => break Ok(()),
            Err(why) => break Err(why),
        };
        let replies = match packet {
            Packet::Subscribe(subscribe) => {
                let mut codes = Vec::with_capacity(subscribe.filters.len());
                let mut retained = Vec::new();
                {
                    let mut state = state.lock().expect("not poisoned");
                    let State {
                        clients,
                        retained: kept,
                        ..
                    } = &mut *state;
                    let client = clients.get_mut(&id).expect("registered above");
                    for filter in subscribe.filters {
                        let parsed = TopicFilter::parse(&filter.path).ok().filter(|_| {
                            client.subscriptions.len() < MAX_SUBSCRIPTIONS_PER_CLIENT
                                && !filter.path.contains('\0')
                        });
                        match parsed {
                            Some(parsed) => {
                                retained.extend(
                                    kept.iter()
                                        .filter(|(topic, _)| parsed.matches(topic))
                                        .map(|(_, packet)| packet.clone()),
                                );
                                client.subscriptions.retain(|(p, _)| *p != filter.path);
                                client.subscriptions.push((filter.path, parsed));
                                codes.push(SubscribeReasonCode::Success(QoS::AtMostOnce));
                            }
                            None => codes.push(SubscribeReasonCode::Failure),
                        }
                    }
                }
                let mut out = BytesMut::new();
                Packet::SubAck(SubAck::new(subscribe.pkid, codes))
                    .write(&mut out, usize::MAX)
                    .map_err(|e| e.to_string())?;
                let mut replies = vec![out.freeze()];
                replies.extend(retained);
                replies
            }
            Packet::Unsubscribe(unsubscribe) => {
                if let Some(client) = state.lock().expect("not poisoned").clients.get_mut(&id) {
                    client
                        .subscriptions
                        .retain(|(p, _)| !unsubscribe.topics.contains(p));
                }
                let mut out = BytesMut::new();
                Packet::UnsubAck(UnsubAck::new(unsubscribe.pkid))
                    .write(&mut out, usize::MAX)
                    .map_err(|e| e.to_string())?;
                vec![out.freeze()]
            }
            Packet::PingReq => {
                let mut out = BytesMut::new();
                Packet::PingResp
                    .write(&mut out, usize::MAX)
                    .map_err(|e| e.to_string())?;
                vec![out.freeze()]
            }
            Packet::Disconnect => break Ok(()),
            // QoS 0 outbound: no acknowledgement is expected, one that comes is harmless.
            Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_) => Vec::new(),
            Packet::Publish(publish) => {
                break Err(format!(
                    "PUBLISH to {:?} refused: the broker is read-only for clients",
                    publish.topic.chars().take(80).collect::<String>()
                ))
            }
            other => break Err(format!("unexpected {:?} packet", packet_name(&other))),
        };
        for packet in replies {
            // Replies go through the client's own queue, after what it already holds, and
            // count against its bound like records do.
            queued.fetch_add(packet.len(), Ordering::Relaxed);
            let _ = queue.send(packet);
        }
    };
    state.lock().expect("not poisoned").clients.remove(&id);
    drop(queue);
    if !writer_done {
        if result.is_err() {
            writer_task.abort();
        } else {
            let _ = tokio::time::timeout(Duration::from_secs(1), writer_task).await;
        }
    }
    result
}

fn packet_name(packet: &Packet) -> &'static str {
    match packet {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::PubRel(_) => "PUBREL",
        Packet::SubAck(_) => "SUBACK",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingResp => "PINGRESP",
        _ => "other",
    }
}
