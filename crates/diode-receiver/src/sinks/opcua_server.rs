//! The OPC UA mirror: a read-only OPC UA server on the IT side holding what the plant's `opcua`
//! sources sent (docs/opcua.md). Each topic is a folder under Objects (one level per level of
//! the topic's name), and under it the browse tree the source found; node ids are `ns=<mirror>;s=<topic>/<plant node id>`, so a plant node
//! always has the same mirror id. Values keep the plant's type, status code and both timestamps.
//!
//! **Read-only by construction.** Values enter from the route, never from a client: every
//! variable's access level is CurrentRead only (a Write is refused with BadNotWritable), the
//! namespace has no methods (nothing to Call), and the node manager implements no node
//! management (AddNodes and DeleteNodes are refused).
//!
//! **Bad, not stale.** Until a value arrives a variable reads BadWaitingForInitialData. When the
//! source reports its plant server lost, or nothing at all is heard from the topic for three of
//! its status intervals (the link or the sender is down), every variable of the topic reads
//! BadNoCommunication, with its last value kept beside it; good values return with the source.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use diode_common::config::{default_u64, default_usize, ConfigError};
use diode_common::LogThrottle;
use diode_opcua::{Change, Message, NodeClass, NodeEntry};
use diode_wire::Record;
use opcua::crypto::SecurityPolicy;
use opcua::server::address_space::Variable;
use opcua::server::diagnostics::NamespaceMetadata;
use opcua::server::node_manager::memory::{
    simple_node_manager, InMemoryNodeManager, SimpleNodeManager, SimpleNodeManagerImpl,
};
use opcua::server::{
    ServerBuilder, ServerEndpoint, ServerHandle, SubscriptionCache, ANONYMOUS_USER_TOKEN_ID,
};
use opcua::types::{DataTypeId, DataValue, DateTime, MessageSecurityMode, NodeId, StatusCode};
use serde::Deserialize;

use super::{Refusals, Scope, Sink, SinkError, SinkSettings};
use crate::metrics::RouteMetrics;
use crate::route::RouteTask;

/// `sink = { kind = "opcua_server", ... }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpcuaServerConfig {
    /// `host:port` it serves `opc.tcp://host:port/` on.
    pub listen: String,
    #[serde(default = "default_namespace")]
    pub namespace_uri: String,
    /// The server's own certificate and key (made at first start if absent) and the client
    /// certificates it trusts (`trusted/`) for the Basic256Sha256 SignAndEncrypt endpoint.
    pub pki_dir: PathBuf,
    /// Also offer an endpoint without security (anonymous, read-only all the same).
    #[serde(default)]
    pub allow_unsecured: bool,
    /// Variables and objects mirrored, at most; beyond it new nodes are refused, logged.
    #[serde(default = "default_usize::<200_000>")]
    pub max_nodes: usize,
    #[serde(default = "default_usize::<50>")]
    pub max_sessions: usize,
    /// Heard nothing from a topic for this long: its variables go BadNoCommunication.
    /// Default: three of the source's status intervals.
    #[serde(default)]
    pub stale_after_ms: Option<u64>,
    /// How often silence is looked for.
    #[serde(default = "default_u64::<1000>")]
    pub check_interval_ms: u64,
}

fn default_namespace() -> String {
    "urn:diode-gateway:mirror".to_owned()
}

impl OpcuaServerConfig {
    pub fn check(&self, scope: &Scope<'_>) -> Result<OpcuaServerSettings, ConfigError> {
        let listen = scope.socket_addr("listen", &self.listen)?;
        let pki_dir = scope.resolve(&self.pki_dir);
        scope.writable_dir("pki_dir", &pki_dir)?;
        if !(1..=10_000_000).contains(&self.max_nodes) {
            return Err(scope.invalid("max_nodes", "must be 1 to 10000000"));
        }
        if !(1..=1000).contains(&self.max_sessions) {
            return Err(scope.invalid("max_sessions", "must be 1 to 1000"));
        }
        if self.namespace_uri.is_empty() {
            return Err(scope.invalid("namespace_uri", "must not be empty"));
        }
        if !(100..=60_000).contains(&self.check_interval_ms) {
            return Err(scope.invalid("check_interval_ms", "must be 100 to 60000"));
        }
        if self.stale_after_ms.is_some_and(|ms| ms < 1000) {
            return Err(scope.invalid("stale_after_ms", "at least 1000"));
        }
        Ok(OpcuaServerSettings {
            config: self.clone(),
            listen,
            pki_dir,
        })
    }
}

#[derive(Debug)]
pub struct OpcuaServerSettings {
    config: OpcuaServerConfig,
    listen: SocketAddr,
    pki_dir: PathBuf,
}

impl SinkSettings for OpcuaServerSettings {
    fn describe(&self) -> String {
        format!(
            "opcua_server opc.tcp://{}/ (read-only mirror, namespace {}, Basic256Sha256 SignAndEncrypt{})",
            self.listen,
            self.config.namespace_uri,
            if self.config.allow_unsecured { " and None" } else { "" }
        )
    }

    fn claims(&self) -> Vec<String> {
        vec![format!("tcp {}", self.listen)]
    }

    fn start(&self, route: RouteTask) -> std::io::Result<tokio::task::JoinHandle<()>> {
        diode_opcua::adopt_trusted_certificates(&self.pki_dir);
        let listener = std::net::TcpListener::bind(self.listen)?;
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let port = listener.local_addr()?.port();
        let users = [ANONYMOUS_USER_TOKEN_ID.to_owned()];
        let mut builder = ServerBuilder::new()
            .application_name("diode-recv OPC UA mirror")
            .application_uri("urn:diode-gateway:diode-recv")
            .product_uri("urn:diode-gateway")
            .host(self.listen.ip().to_string())
            .port(port)
            .pki_dir(&self.pki_dir)
            .create_sample_keypair(true)
            .trust_client_certs(false)
            .max_sessions(self.config.max_sessions)
            .discovery_urls(vec!["/".to_owned()])
            .add_endpoint(
                "basic256sha256_sign_encrypt",
                ServerEndpoint::new(
                    "/",
                    SecurityPolicy::Basic256Sha256,
                    MessageSecurityMode::SignAndEncrypt,
                    &users,
                ),
            )
            .with_node_manager(simple_node_manager(
                NamespaceMetadata {
                    namespace_uri: self.config.namespace_uri.clone(),
                    ..Default::default()
                },
                "diode-mirror",
            ));
        if self.config.allow_unsecured {
            builder = builder.add_endpoint("none", ServerEndpoint::new_none("/", &users));
        }
        // An IT client may watch the whole mirror in one subscription, and a value the plant
        // changes many times between two publishes keeps its history.
        let limits = builder.limits_mut();
        limits.subscriptions.max_monitored_items_per_sub = self.config.max_nodes;
        limits.subscriptions.max_monitored_item_queue_size = 100;
        limits.operational.max_monitored_items_per_call = 10_000;
        // A publish response holds at most 10,000 notifications (a client may ask for fewer
        // when it makes its subscription), and a message may be as large as they need.
        limits.subscriptions.max_notifications_per_publish = 10_000;
        builder = builder
            .max_message_size(4 << 20)
            .max_chunk_count(128)
            .max_array_length(100_000);
        let limits = builder.limits_mut();
        // Values enter as the plant sends them, in bursts of a publish: a client that asks for
        // the fastest sampling gets every change at least 1 ms apart by its source timestamp,
        // not the last of each burst (async-opcua's default floor is 100 ms). Not 0: the
        // server's own sampled nodes would then tick with a zero period.
        limits.subscriptions.min_sampling_interval_ms = 1.0;
        limits.subscriptions.min_publishing_interval_ms = 10.0;
        builder = builder.subscription_poll_interval_ms(10);
        let (server, handle) = builder
            .build()
            .map_err(|e| std::io::Error::other(format!("opcua_server: {e}")))?;
        let manager = handle
            .node_managers()
            .get_of_type::<SimpleNodeManager>()
            .ok_or_else(|| std::io::Error::other("opcua_server: no node manager"))?;
        let namespace = handle
            .get_namespace_index(&self.config.namespace_uri)
            .ok_or_else(|| std::io::Error::other("opcua_server: namespace not registered"))?;
        let route_name = route.name().to_owned();
        tokio::spawn(async move {
            if let Err(e) = server.run_with(listener).await {
                tracing::error!(route = %route_name, error = %e, "opcua_server stopped");
            }
        });
        let mirror = Arc::new(Mutex::new(MirrorState {
            topics: HashMap::new(),
        }));
        let space = Space {
            manager,
            subscriptions: handle.subscriptions().clone(),
            namespace,
            max_nodes: self.config.max_nodes,
        };
        tokio::spawn(watch_staleness(
            mirror.clone(),
            space.clone(),
            self.config.stale_after_ms.map(Duration::from_millis),
            Duration::from_millis(self.config.check_interval_ms),
            handle.clone(),
            self.pki_dir.clone(),
        ));
        tracing::info!(route = %route.name(), listen = %self.listen, "opcua_server mirror listening");
        Ok(route.spawn(OpcuaServerSink {
            mirror,
            space,
            handle,
        }))
    }
}

/// Where the mirror's nodes live.
#[derive(Clone)]
struct Space {
    manager: Arc<InMemoryNodeManager<SimpleNodeManagerImpl>>,
    subscriptions: Arc<SubscriptionCache>,
    namespace: u16,
    max_nodes: usize,
}

struct MirrorState {
    topics: HashMap<Arc<str>, TopicMirror>,
}

struct TopicMirror {
    folder: NodeId,
    nodes: HashMap<String, MirrorNode>,
    heard: Instant,
    /// The source's status interval: three of them silent and the topic is stale.
    status_interval: Duration,
    /// The plant server as the source last reported it.
    source_connected: bool,
    /// Variables currently read as BadNoCommunication.
    bad: bool,
    /// Pages of the browse being collected: (browse, pages seen, node ids in them).
    browse: Option<(u64, HashSet<u32>, HashSet<String>)>,
}

struct MirrorNode {
    id: NodeId,
    parent: NodeId,
    class: NodeClass,
    /// The last value the plant sent.
    last: Option<DataValue>,
    /// Built-in type id of the data type the node was given.
    type_id: Option<u32>,
}

pub struct OpcuaServerSink {
    mirror: Arc<Mutex<MirrorState>>,
    space: Space,
    handle: ServerHandle,
}

impl Sink for OpcuaServerSink {
    async fn deliver(
        &mut self,
        records: &[Record],
        _metrics: &RouteMetrics,
    ) -> Result<Refusals, SinkError> {
        let mut refusals = Refusals::new();
        let mut mirror = self.mirror.lock().unwrap_or_else(PoisonError::into_inner);
        for (i, record) in records.iter().enumerate() {
            let message = match Message::parse(&record.payload) {
                Ok(m) => m,
                Err(e) => {
                    // Refused here rather than in `refusal`, so each record is parsed once.
                    refusals.push((i, format!("not an OPC UA record from an opcua source: {e}")));
                    continue;
                }
            };
            if let Err(why) = mirror.apply(&self.space, &record.topic, message) {
                refusals.push((i, why));
            }
        }
        Ok(refusals)
    }

    async fn close(&mut self) {
        self.handle.cancel();
    }
}

static REFUSED_NODES: LogThrottle = LogThrottle::new(Duration::from_secs(60));

impl MirrorState {
    fn topic<'a>(&'a mut self, space: &Space, topic: &Arc<str>) -> &'a mut TopicMirror {
        self.topics.entry(topic.clone()).or_insert_with(|| {
            // The topic's levels are nested folders (`line3/opcua`: Objects/line3/opcua), as a
            // client browsing by path expects; folder ids are `topic:<levels so far>`, apart
            // from node ids, which start with the topic itself.
            let mut address_space = space.manager.address_space().write();
            let mut parent = NodeId::objects_folder_id();
            let mut prefix = String::new();
            for level in topic.split('/') {
                if !prefix.is_empty() {
                    prefix.push('/');
                }
                prefix.push_str(level);
                let folder = NodeId::new(space.namespace, format!("topic:{prefix}"));
                if !address_space.node_exists(&folder) {
                    address_space.add_folder(&folder, level, level, &parent);
                }
                parent = folder;
            }
            let folder = parent;
            TopicMirror {
                folder,
                nodes: HashMap::new(),
                heard: Instant::now(),
                status_interval: Duration::from_secs(5),
                source_connected: true,
                bad: false,
                browse: None,
            }
        })
    }

    /// Applies one record; an error says why (part of) it could not be.
    fn apply(&mut self, space: &Space, topic: &Arc<str>, message: Message) -> Result<(), String> {
        let total = self.topics.values().map(|t| t.nodes.len()).sum();
        let mirror = self.topic(space, topic);
        mirror.heard = Instant::now();
        let outcome = match message {
            Message::Status(status) => {
                mirror.status_interval =
                    Duration::from_millis(status.interval_ms.clamp(1000, 60_000));
                mirror.source_connected = status.connected;
                Ok(())
            }
            Message::Nodes(nodes) => {
                mirror.add_nodes(space, topic, &nodes.nodes, total);
                mirror.collect_browse(space, nodes.browse, nodes.page, nodes.pages, &nodes.nodes);
                Ok(())
            }
            Message::Data(data) => mirror.set_values(space, topic, &data.changes, total),
        };
        // Whatever came in, the topic is heard from; the status decides whether it is good.
        let now_bad = !mirror.source_connected;
        if mirror.bad != now_bad {
            mirror.set_bad(space, now_bad);
        }
        outcome
    }
}

impl TopicMirror {
    fn mirror_id(space: &Space, topic: &str, plant_id: &str) -> NodeId {
        NodeId::new(space.namespace, format!("{topic}/{plant_id}"))
    }

    /// Adds the nodes not mirrored yet, parents first (a browse lists them so).
    fn add_nodes(&mut self, space: &Space, topic: &str, entries: &[NodeEntry], total: usize) {
        let mut refused = 0usize;
        let mut added = total;
        for entry in entries {
            let parent = entry
                .parent
                .as_ref()
                .and_then(|p| self.nodes.get(p))
                .map_or_else(|| self.folder.clone(), |n| n.id.clone());
            if let Some(node) = self.nodes.get(&entry.node_id) {
                if node.parent == parent && node.class == entry.class {
                    continue;
                }
                // Found under another parent (or first made before its browse arrived): move it.
                // Deleting it drops its references to its children too: they are linked again.
                let node = self.nodes.remove(&entry.node_id).expect("just found");
                space.manager.address_space().write().delete(&node.id, true);
                let last = node.last;
                self.insert(space, topic, entry, parent, last);
                let mut address_space = space.manager.address_space().write();
                for child in self.nodes.values().filter(|n| n.parent == node.id) {
                    address_space.insert_reference(
                        &node.id,
                        &child.id,
                        opcua::types::ReferenceTypeId::Organizes,
                    );
                }
                continue;
            }
            if added >= space.max_nodes {
                refused += 1;
                continue;
            }
            added += 1;
            self.insert(space, topic, entry, parent, None);
        }
        if refused > 0 {
            if let Some(folded) = REFUSED_NODES.allow() {
                tracing::warn!(
                    topic,
                    refused,
                    folded,
                    max_nodes = space.max_nodes,
                    "opcua_server: more nodes than max_nodes; the rest are not mirrored"
                );
            }
        }
    }

    fn insert(
        &mut self,
        space: &Space,
        topic: &str,
        entry: &NodeEntry,
        parent: NodeId,
        last: Option<DataValue>,
    ) {
        let id = Self::mirror_id(space, topic, &entry.node_id);
        let name = entry
            .path
            .last()
            .cloned()
            .unwrap_or_else(|| entry.node_id.clone());
        let display = if entry.display_name.is_empty() {
            name.clone()
        } else {
            entry.display_name.clone()
        };
        let mut type_id = None;
        {
            let mut address_space = space.manager.address_space().write();
            match entry.class {
                NodeClass::Object => {
                    address_space.add_folder(&id, name.as_str(), display.as_str(), &parent);
                }
                NodeClass::Variable => {
                    let mut variable = Variable::new_data_value(
                        &id,
                        name.as_str(),
                        display.as_str(),
                        DataTypeId::BaseDataType,
                        Some(-2),
                        None,
                        opcua::types::Variant::Empty,
                    );
                    let value = last
                        .clone()
                        .unwrap_or_else(|| servable(waiting(DateTime::now())));
                    if let Some(v) = &value.value {
                        type_id = give_type(&mut variable, v);
                    }
                    variable.set_data_value(value);
                    address_space.add_variables(vec![variable], &parent);
                }
            }
        }
        self.nodes.insert(
            entry.node_id.clone(),
            MirrorNode {
                id,
                parent,
                class: entry.class,
                last,
                type_id,
            },
        );
    }

    /// Removes what a whole browse no longer found, once every page of it is in.
    fn collect_browse(
        &mut self,
        space: &Space,
        browse: u64,
        page: u32,
        pages: u32,
        entries: &[NodeEntry],
    ) {
        if pages == 0 || page >= pages || pages > 100_000 {
            return;
        }
        let collecting = match &mut self.browse {
            Some((current, _, _)) if *current == browse => self.browse.as_mut().expect("some"),
            _ => self.browse.insert((browse, HashSet::new(), HashSet::new())),
        };
        collecting.1.insert(page);
        // Only what is mirrored matters for removal: the set stays within max_nodes.
        collecting.2.extend(
            entries
                .iter()
                .filter(|e| self.nodes.contains_key(&e.node_id))
                .map(|e| e.node_id.clone()),
        );
        if collecting.1.len() as u32 != pages {
            return;
        }
        let (_, _, found) = self.browse.take().expect("collecting");
        let gone: Vec<String> = self
            .nodes
            .keys()
            .filter(|id| !found.contains(*id))
            .cloned()
            .collect();
        if gone.is_empty() {
            return;
        }
        let mut address_space = space.manager.address_space().write();
        for id in &gone {
            if let Some(node) = self.nodes.remove(id) {
                address_space.delete(&node.id, true);
            }
        }
        tracing::info!(
            removed = gone.len(),
            "opcua_server: nodes gone from the plant server removed"
        );
    }

    fn set_values(
        &mut self,
        space: &Space,
        topic: &str,
        changes: &[Change],
        total: usize,
    ) -> Result<(), String> {
        let mut broken = 0usize;
        let mut first_error = None;
        let mut updates: Vec<(NodeId, DataValue)> = Vec::with_capacity(changes.len());
        let mut added = total;
        for change in changes {
            let value = match change.data_value() {
                Ok(v) => servable(v),
                Err(e) => {
                    broken += 1;
                    first_error.get_or_insert_with(|| format!("{}: {e}", change.node_id));
                    continue;
                }
            };
            if !self.nodes.contains_key(&change.node_id) {
                // Its browse has not arrived (lost, or this receiver started after it): mirror
                // the variable under the topic's folder until a browse places it.
                if added >= space.max_nodes {
                    if let Some(folded) = REFUSED_NODES.allow() {
                        tracing::warn!(topic, folded, max_nodes = space.max_nodes,
                            "opcua_server: more nodes than max_nodes; values of the rest are not mirrored");
                    }
                    continue;
                }
                added += 1;
                let entry = NodeEntry {
                    node_id: change.node_id.clone(),
                    parent: None,
                    path: change.path.clone(),
                    class: NodeClass::Variable,
                    display_name: String::new(),
                };
                let folder = self.folder.clone();
                self.insert(space, topic, &entry, folder, None);
            }
            let node = self.nodes.get_mut(&change.node_id).expect("inserted above");
            if node.class != NodeClass::Variable {
                continue;
            }
            let type_now = value
                .value
                .as_ref()
                .and_then(|v| v.scalar_type_id())
                .map(|t| t as u32);
            if type_now.is_some() && type_now != node.type_id {
                let mut address_space = space.manager.address_space().write();
                if let Some(opcua::server::address_space::NodeType::Variable(variable)) =
                    address_space.find_mut(&node.id)
                {
                    node.type_id = give_type(variable, value.value.as_ref().expect("typed"));
                }
            }
            if !self.bad {
                updates.push((node.id.clone(), value.clone()));
            }
            node.last = Some(value);
        }
        if !updates.is_empty() {
            // The server notifies subscribers with each node's value as it stands after the
            // whole call: a node changed several times in one call would report only its last
            // value. One call per round, each with at most one change of each node, reports all.
            let mut rounds: Vec<Vec<(NodeId, DataValue)>> = Vec::new();
            let mut seen: HashMap<NodeId, usize> = HashMap::new();
            for (id, value) in updates {
                let round = seen.entry(id.clone()).and_modify(|r| *r += 1).or_insert(0);
                if rounds.len() <= *round {
                    rounds.push(Vec::new());
                }
                rounds[*round].push((id, value));
            }
            for round in rounds {
                let (ids, values): (Vec<NodeId>, Vec<DataValue>) = round.into_iter().unzip();
                let _ = space.manager.set_values(
                    &space.subscriptions,
                    ids.iter().zip(values).map(|(id, v)| (id, None, v)),
                );
            }
        }
        match first_error {
            Some(e) => Err(format!("{broken} value(s) not mirrored, first {e}")),
            None => Ok(()),
        }
    }

    /// Every variable of the topic to BadNoCommunication (its last value beside it), or back to
    /// the last values the plant sent.
    fn set_bad(&mut self, space: &Space, bad: bool) {
        self.bad = bad;
        let now = DateTime::now();
        let (ids, values): (Vec<NodeId>, Vec<DataValue>) = self
            .nodes
            .values()
            .filter(|n| n.class == NodeClass::Variable)
            .map(|n| {
                let value = servable(match (&n.last, bad) {
                    // Changes may have been missed while the topic was silent: the last value
                    // is Uncertain until the plant sends a fresh one.
                    (Some(last), false) if last.status.is_none_or(|s| s.is_good()) => DataValue {
                        status: Some(StatusCode::UncertainLastUsableValue),
                        ..last.clone()
                    },
                    (Some(last), false) => last.clone(),
                    (None, false) => waiting(now),
                    (last, true) => DataValue {
                        value: last.as_ref().and_then(|l| l.value.clone()),
                        status: Some(StatusCode::BadNoCommunication),
                        source_timestamp: last.as_ref().and_then(|l| l.source_timestamp),
                        server_timestamp: Some(now),
                        ..DataValue::null()
                    },
                });
                (n.id.clone(), value)
            })
            .collect();
        let _ = space.manager.set_values(
            &space.subscriptions,
            ids.iter().zip(values).map(|(id, v)| (id, None, v)),
        );
    }
}

/// A variable no value has come for yet.
fn waiting(now: DateTime) -> DataValue {
    DataValue {
        status: Some(StatusCode::BadWaitingForInitialData),
        server_timestamp: Some(now),
        ..DataValue::null()
    }
}

/// The server reads a value's status only beside a value: a bad status without one would read
/// Good, so it gets an empty Variant to stand beside.
fn servable(mut value: DataValue) -> DataValue {
    if value.value.is_none() {
        value.value = Some(opcua::types::Variant::Empty);
    }
    value
}

/// Sets a variable's data type and value rank from the value the plant sent, so IT clients
/// see the plant's types; returns the built-in type id given.
fn give_type(variable: &mut Variable, value: &opcua::types::Variant) -> Option<u32> {
    let type_id = value.scalar_type_id()?;
    if let Some(data_type) = value.data_type() {
        variable.set_data_type(data_type.node_id);
    }
    match value {
        opcua::types::Variant::Array(array) => {
            let dims = array
                .dimensions
                .clone()
                .unwrap_or_else(|| vec![array.values.len() as u32]);
            variable.set_value_rank(dims.len() as i32);
            variable.set_array_dimensions(&dims);
        }
        _ => variable.set_value_rank(-1),
    }
    Some(type_id as u32)
}

/// Marks topics that went silent as BadNoCommunication, until they are heard from again, and
/// adopts newly trusted client certificates.
async fn watch_staleness(
    mirror: Arc<Mutex<MirrorState>>,
    space: Space,
    stale_after: Option<Duration>,
    every: Duration,
    handle: ServerHandle,
    pki_dir: PathBuf,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = handle.token().cancelled() => return,
            _ = tick.tick() => {}
        }
        // A client certificate an administrator trusts while the mirror runs is taken at once.
        let dir = pki_dir.clone();
        let _ = tokio::task::spawn_blocking(move || diode_opcua::adopt_trusted_certificates(&dir))
            .await;
        let mut mirror = mirror.lock().unwrap_or_else(PoisonError::into_inner);
        for (topic, t) in mirror.topics.iter_mut() {
            let limit = stale_after.unwrap_or(t.status_interval * 3);
            let stale = t.heard.elapsed() > limit;
            if stale && !t.bad {
                tracing::warn!(topic = %topic, silent_ms = t.heard.elapsed().as_millis() as u64,
                    "opcua_server: nothing from the topic; its variables read BadNoCommunication");
                t.set_bad(&space, true);
            }
        }
    }
}
