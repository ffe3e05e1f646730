//! The OPC UA source: subscribes to one plant server's variables and sends their data changes,
//! the browsed node set and its own connection state as JSON records (docs/opcua.md).
//!
//! **Read-only by construction.** Only [`plant::ReadOnlySession`] touches the client session,
//! and it has methods for the services that read (GetEndpoints, Browse, BrowseNext, Read,
//! CreateSubscription, CreateMonitoredItems, DeleteMonitoredItems, Publish) and no others;
//! `clippy.toml` forbids the write-side methods and request builders of the client crate
//! (Write, Call, AddNodes, DeleteNodes, AddReferences, DeleteReferences, HistoryUpdate, and the
//! raw channel), so CI refuses code anywhere in the workspace that would call one. No key of
//! this table names a service.
//!
//! Load on the plant server is bounded: sampling and publishing no faster than the site's
//! floor (`[safety] min_poll_interval_ms`), at most `max_items` monitored items, a re-browse at
//! most every `rebrowse_interval_ms` (10 s at least), never into the Server object (`i=2253`),
//! and reconnects with backoff.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use diode_common::config::{default_u32, default_u64, default_usize, ConfigError};
use diode_opcua::{Change, Data, Message, NodeClass, NodeEntry, Nodes, Status};
use globset::{Glob, GlobSet, GlobSetBuilder};
use opcua::client::{ClientBuilder, DataChangeCallback, IdentityToken, Password};
use opcua::crypto::SecurityPolicy;
use opcua::types::{MessageSecurityMode, NodeId, StatusCode};
use serde::Deserialize;

use super::{emit, QueueClosed, Scope, Source, SourceContext, Started};

/// `source = { kind = "opcua", ... }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpcuaConfig {
    /// `opc.tcp://host:port[/path]`.
    pub endpoint: String,
    /// `None`, `Basic256Sha256`, `Aes128Sha256RsaOaep` or `Aes256Sha256RsaPss`.
    #[serde(default = "default_security_policy")]
    pub security_policy: String,
    /// `None`, `Sign` or `SignAndEncrypt`; `None` exactly when the policy is `None`.
    #[serde(default = "default_security_policy")]
    pub security_mode: String,
    /// The client's certificate (`own/cert.der`), key (`private/private.pem`) and the server
    /// certificates it trusts (`trusted/`); `diode-send opcua-cert` makes the first two. A
    /// server whose certificate is not in `trusted/` is refused (and lands in `rejected/`).
    /// Required unless the policy is `None`.
    #[serde(default)]
    pub pki_dir: Option<PathBuf>,
    /// Log in as this user, with the password in `password_file`. Unset: anonymous.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Log in with this X.509 certificate (DER) and key (PEM) instead.
    #[serde(default)]
    pub user_certificate_file: Option<PathBuf>,
    #[serde(default)]
    pub user_key_file: Option<PathBuf>,
    /// Variables by node id (`ns=2;s=Line3.Temp`, `i=2258`).
    #[serde(default)]
    pub nodes: Vec<String>,
    /// Variables found by browsing.
    #[serde(default)]
    pub browse: Vec<BrowseConfig>,
    #[serde(default = "default_u64::<1000>")]
    pub sampling_interval_ms: u64,
    #[serde(default = "default_u64::<1000>")]
    pub publishing_interval_ms: u64,
    /// Values the server keeps per item between publishes.
    #[serde(default = "default_u32::<10>")]
    pub queue_size: u32,
    /// Report a numeric value only when it moved by more than this.
    #[serde(default)]
    pub deadband_absolute: Option<f64>,
    #[serde(default = "default_u64::<60_000>")]
    pub rebrowse_interval_ms: u64,
    #[serde(default = "default_usize::<10_000>")]
    pub max_items: usize,
    /// A status record at least this often, so the IT side can tell a quiet plant from a
    /// dead link.
    #[serde(default = "default_u64::<5000>")]
    pub status_interval_ms: u64,
    #[serde(default = "default_u64::<10_000>")]
    pub timeout_ms: u64,
}

fn default_security_policy() -> String {
    "None".to_owned()
}

/// `browse = [{ root = "ns=2;s=Line3", include = ["**"], max_depth = 10 }]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrowseConfig {
    /// Where to start; the Objects folder (`i=85`) by default.
    #[serde(default = "default_browse_root")]
    pub root: String,
    /// Paths of browse names below the root (`Line3/*/Temp`, `**`) of the variables taken.
    #[serde(default = "default_include")]
    pub include: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
    #[serde(default = "default_u32::<10>")]
    pub max_depth: u32,
}

fn default_browse_root() -> String {
    "i=85".to_owned()
}

fn default_include() -> Vec<String> {
    vec!["**".to_owned()]
}

const MAX_ITEMS_CEILING: usize = 100_000;
const MIN_REBROWSE_MS: u64 = 10_000;

impl OpcuaConfig {
    pub fn check(&self, scope: &Scope<'_>) -> Result<OpcuaSource, ConfigError> {
        let url = self.endpoint.strip_prefix("opc.tcp://").unwrap_or("");
        if url.is_empty() || url.starts_with('/') {
            return Err(scope.invalid("endpoint", "an opc.tcp://host:port URL"));
        }
        let policy = match self.security_policy.as_str() {
            "None" => SecurityPolicy::None,
            "Basic256Sha256" => SecurityPolicy::Basic256Sha256,
            "Aes128Sha256RsaOaep" => SecurityPolicy::Aes128Sha256RsaOaep,
            "Aes256Sha256RsaPss" => SecurityPolicy::Aes256Sha256RsaPss,
            other => {
                return Err(scope.invalid(
                    "security_policy",
                    format!("{other:?}: None, Basic256Sha256, Aes128Sha256RsaOaep or Aes256Sha256RsaPss (older policies are deprecated)"),
                ))
            }
        };
        let mode = match self.security_mode.as_str() {
            "None" => MessageSecurityMode::None,
            "Sign" => MessageSecurityMode::Sign,
            "SignAndEncrypt" => MessageSecurityMode::SignAndEncrypt,
            other => {
                return Err(scope.invalid(
                    "security_mode",
                    format!("{other:?}: None, Sign or SignAndEncrypt"),
                ))
            }
        };
        if (policy == SecurityPolicy::None) != (mode == MessageSecurityMode::None) {
            return Err(scope.invalid(
                "security_mode",
                "None with security_policy None, Sign or SignAndEncrypt with any other",
            ));
        }
        let pki_dir = self.pki_dir.as_ref().map(|dir| scope.resolve(dir));
        match &pki_dir {
            Some(dir) => {
                for needed in ["own/cert.der", "private/private.pem"] {
                    if policy != SecurityPolicy::None && !dir.join(needed).is_file() {
                        return Err(scope.invalid(
                            "pki_dir",
                            format!(
                                "{} has no {needed}: make them with `diode-send opcua-cert --pki-dir {}`",
                                dir.display(),
                                dir.display()
                            ),
                        ));
                    }
                }
            }
            None if policy != SecurityPolicy::None => {
                return Err(scope.invalid(
                    "pki_dir",
                    "a secure policy needs the client's certificate and the trusted server certificates",
                ))
            }
            None => {}
        }
        let identity = match (
            &self.username,
            &self.password_file,
            &self.user_certificate_file,
            &self.user_key_file,
        ) {
            (None, None, None, None) => Identity::Anonymous,
            (Some(user), Some(file), None, None) => Identity::User(
                user.clone(),
                diode_common::keyfile::read_secret(&scope.resolve(file))
                    .map_err(|e| scope.invalid("password_file", e.to_string()))?,
            ),
            (None, None, Some(cert), Some(key)) => {
                let (cert, key) = (scope.resolve(cert), scope.resolve(key));
                for (k, path) in [("user_certificate_file", &cert), ("user_key_file", &key)] {
                    if !path.is_file() {
                        return Err(scope.invalid(k, format!("{} is not a file", path.display())));
                    }
                }
                Identity::Certificate(cert, key)
            }
            _ => {
                return Err(scope.invalid(
                    "username",
                    "log in with username and password_file, or user_certificate_file and user_key_file, or neither (anonymous)",
                ))
            }
        };
        for (key, value) in [
            ("sampling_interval_ms", self.sampling_interval_ms),
            ("publishing_interval_ms", self.publishing_interval_ms),
        ] {
            super::check_poll_floor(scope, key, value, "sampling", "server")?;
        }
        if !(1..=1000).contains(&self.queue_size) {
            return Err(scope.invalid("queue_size", "must be 1 to 1000"));
        }
        if self
            .deadband_absolute
            .is_some_and(|d| !(d >= 0.0 && d.is_finite()))
        {
            return Err(scope.invalid("deadband_absolute", "a finite value, 0 or more"));
        }
        if self.rebrowse_interval_ms < MIN_REBROWSE_MS {
            return Err(scope.invalid(
                "rebrowse_interval_ms",
                format!("at least {MIN_REBROWSE_MS}: browsing loads the server"),
            ));
        }
        if !(1..=MAX_ITEMS_CEILING).contains(&self.max_items) {
            return Err(scope.invalid("max_items", format!("must be 1 to {MAX_ITEMS_CEILING}")));
        }
        if !(1000..=60_000).contains(&self.status_interval_ms) {
            return Err(scope.invalid("status_interval_ms", "must be 1000 to 60000"));
        }
        if !(100..=60_000).contains(&self.timeout_ms) {
            return Err(scope.invalid("timeout_ms", "must be 100 to 60000"));
        }
        if self.nodes.is_empty() && self.browse.is_empty() {
            return Err(scope.invalid("nodes", "name nodes, or browse for them, or both"));
        }
        let nodes = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, text)| {
                text.parse::<NodeId>().map_err(|_| {
                    scope.invalid(&format!("nodes[{i}]"), format!("{text:?} is not a node id"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let browse = self
            .browse
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let key = |k: &str| format!("browse[{i}].{k}");
                let root = b.root.parse::<NodeId>().map_err(|_| {
                    scope.invalid(&key("root"), format!("{:?} is not a node id", b.root))
                })?;
                let globs = |k: &str, patterns: &[String]| {
                    let mut set = GlobSetBuilder::new();
                    for p in patterns {
                        set.add(Glob::new(p).map_err(|e| scope.invalid(&key(k), e.to_string()))?);
                    }
                    set.build()
                        .map_err(|e| scope.invalid(&key(k), e.to_string()))
                };
                if !(1..=64).contains(&b.max_depth) {
                    return Err(scope.invalid(&key("max_depth"), "must be 1 to 64"));
                }
                Ok(BrowseRoot {
                    root,
                    include: globs("include", &b.include)?,
                    exclude: globs("exclude", &b.exclude)?,
                    max_depth: b.max_depth,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(OpcuaSource {
            config: self.clone(),
            policy,
            mode,
            pki_dir,
            identity,
            nodes,
            browse,
        })
    }
}

/// Makes the client's certificate (2048-bit RSA, self-signed, 2 years) and key in `pki_dir`,
/// never over existing ones; returns the certificate's path.
pub fn make_client_certificate(
    pki_dir: &std::path::Path,
    hostname: &str,
) -> Result<PathBuf, String> {
    use opcua::crypto::{CertificateStore, X509Data};
    let store = CertificateStore::new(pki_dir);
    store
        .ensure_pki_path()
        .map_err(|e| format!("{}: {e}", pki_dir.display()))?;
    // The application URI first, as a URI (servers check it against the one the client
    // presents), then the host.
    let alt_host_names = X509Data::alt_host_names(
        CLIENT_URI,
        Some(vec![hostname.to_owned()]),
        false,
        false,
        false,
    );
    let data = X509Data {
        key_size: 2048,
        common_name: "diode-send".to_owned(),
        organization: "diode-gateway".to_owned(),
        organizational_unit: "plant side".to_owned(),
        country: String::new(),
        state: String::new(),
        alt_host_names,
        certificate_duration_days: 730,
    };
    store
        .create_and_store_application_instance_cert(&data, false)
        .map_err(|e| format!("{}: {e}", pki_dir.display()))?;
    // The key is the client's identity: its owner's alone.
    use std::os::unix::fs::PermissionsExt;
    let key = store.own_private_key_path();
    for (path, mode) in [
        (key.parent().unwrap_or(pki_dir), 0o700),
        (key.as_path(), 0o600),
    ] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(store.own_certificate_path())
}

/// The application URI the client presents; its certificate names it, as OPC UA requires.
const CLIENT_URI: &str = "urn:diode-gateway:diode-send";

#[derive(Debug, Clone)]
enum Identity {
    Anonymous,
    User(String, String),
    Certificate(PathBuf, PathBuf),
}

#[derive(Debug, Clone)]
struct BrowseRoot {
    root: NodeId,
    include: GlobSet,
    exclude: GlobSet,
    max_depth: u32,
}

#[derive(Debug, Clone)]
pub struct OpcuaSource {
    config: OpcuaConfig,
    policy: SecurityPolicy,
    mode: MessageSecurityMode,
    pki_dir: Option<PathBuf>,
    identity: Identity,
    nodes: Vec<NodeId>,
    browse: Vec<BrowseRoot>,
}

impl Source for OpcuaSource {
    fn describe(&self) -> String {
        format!(
            "opcua {} ({} {}), {} node(s) and {} browse root(s), sampled every {} ms, at most {} items, read-only",
            self.config.endpoint,
            self.config.security_policy,
            self.config.security_mode,
            self.nodes.len(),
            self.browse.len(),
            self.config.sampling_interval_ms,
            self.config.max_items,
        )
    }

    fn start(&self, ctx: SourceContext) -> std::io::Result<Started> {
        let source = self.clone();
        Ok(Started {
            local_addr: None,
            task: Box::pin(async move { source.run(ctx).await }),
        })
    }
}

impl OpcuaSource {
    /// Connects, subscribes and forwards until shutdown; a lost server is retried with backoff
    /// (1 s doubling to 30 s), each attempt counted as `diode_source_errors_total{reason="connect"}`.
    async fn run(&self, ctx: SourceContext) {
        let mut failures = 0u32;
        let mut state = Mirror {
            browse: diode_common::unix_time_us() as u64 / 1000,
            ..Mirror::default()
        };
        loop {
            let outcome = tokio::select! {
                _ = ctx.shutdown.wait() => return,
                outcome = self.session(&ctx, &mut state) => outcome,
            };
            ctx.metrics.connections.set(0);
            ctx.sender_metrics
                .source_items
                .get_or_create(&crate::metrics::TopicLabels {
                    topic: ctx.name.to_string(),
                })
                .set(0);
            let error = match outcome {
                Ok(()) | Err(SessionEnd::QueueClosed) => return,
                Err(SessionEnd::Failed(e)) => e,
            };
            ctx.metrics.errors_connect.inc();
            // A session that lived a minute was a success: the backoff starts again. One that
            // fails soon after opening (a refused subscription, a browse the server refuses)
            // backs off like a refused connection, so the plant server is never hammered.
            if state
                .opened
                .is_some_and(|at| at.elapsed() >= Duration::from_secs(60))
            {
                failures = 0;
            }
            state.opened = None;
            failures += 1;
            let backoff =
                Duration::from_secs(1 << (failures - 1).min(5)).min(Duration::from_secs(30));
            if failures == 1 || failures % 10 == 0 {
                tracing::warn!(topic = %ctx.name, endpoint = %self.config.endpoint, failures,
                    retry_ms = backoff.as_millis() as u64, error = %error, "opcua source: no session with the plant server");
            }
            if self
                .send_status(&ctx, &state, false, Some(error))
                .await
                .is_err()
            {
                return;
            }
            tokio::select! {
                _ = ctx.shutdown.wait() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
        }
    }

    /// Queues one JSON record; one larger than `max_record_bytes` (a single value or node
    /// entry that large) is refused and counted as oversize instead.
    async fn emit_message(
        &self,
        ctx: &SourceContext,
        message: &Message,
    ) -> Result<(), QueueClosed> {
        let payload = message.to_vec();
        if payload.len() > ctx.max_record_bytes {
            ctx.metrics.dropped_oversize.inc();
            return Ok(());
        }
        emit(
            ctx,
            diode_common::unix_time_us(),
            None,
            Bytes::from(payload),
        )
        .await
    }

    async fn send_status(
        &self,
        ctx: &SourceContext,
        state: &Mirror,
        connected: bool,
        error: Option<String>,
    ) -> Result<(), QueueClosed> {
        let message = Message::Status(Status {
            endpoint: self.config.endpoint.clone(),
            connected,
            items: state.items.len() as u64,
            interval_ms: self.config.status_interval_ms,
            error,
        });
        self.emit_message(ctx, &message).await
    }

    /// One session: connect, browse, subscribe, then forward changes and re-browse until the
    /// connection is lost for good or the link queue closes.
    async fn session(&self, ctx: &SourceContext, state: &mut Mirror) -> Result<(), SessionEnd> {
        let (changes_tx, changes_rx) = flume::bounded::<(NodeId, opcua::types::DataValue)>(
            (self.config.max_items * 4).max(10_000),
        );
        let (events_tx, events_rx) = flume::bounded::<plant::Event>(64);
        let timeout = Duration::from_millis(self.config.timeout_ms);
        let session = plant::ReadOnlySession::connect(self, events_tx, timeout).await?;
        ctx.metrics.connections.set(1);
        state.opened = Some(std::time::Instant::now());
        state.items.clear();
        tracing::info!(topic = %ctx.name, endpoint = %self.config.endpoint, "opcua source: session open");
        let mut subscriptions = Subscriptions {
            publishing_interval: Duration::from_millis(self.config.publishing_interval_ms),
            changes: changes_tx,
            dropped: ctx.metrics.dropped_queue_full.clone(),
            held: Vec::new(),
        };
        self.rebrowse(ctx, &session, &mut subscriptions, state)
            .await?;
        self.send_status(ctx, state, true, None).await?;

        // A slow browse or a stalled link queue delays the next tick, never bunches them.
        let mut status =
            tokio::time::interval(Duration::from_millis(self.config.status_interval_ms));
        status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        status.tick().await;
        let mut rebrowse =
            tokio::time::interval(Duration::from_millis(self.config.rebrowse_interval_ms));
        rebrowse.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        rebrowse.tick().await;
        let mut lost = false;
        loop {
            tokio::select! {
                first = changes_rx.recv_async() => {
                    let Ok(first) = first else { return Err(SessionEnd::Failed("subscription ended".into())) };
                    // Everything already published goes in as few records as fit.
                    let batch: Vec<_> = std::iter::once(first).chain(changes_rx.try_iter().take(8192)).collect();
                    self.forward(ctx, state, batch).await?;
                }
                event = events_rx.recv_async() => match event {
                    Ok(plant::Event::Lost(code)) => {
                        lost = true;
                        ctx.metrics.connections.set(0);
                        ctx.metrics.errors_connect.inc();
                        tracing::warn!(topic = %ctx.name, status = %code, "opcua source: connection lost, reconnecting");
                        self.send_status(ctx, state, false, Some(code.to_string())).await?;
                    }
                    Ok(plant::Event::Reactivated) => {
                        lost = false;
                        ctx.metrics.connections.set(1);
                        self.send_status(ctx, state, true, None).await?;
                    }
                    // The first session is announced too; a new one after a loss has none of
                    // the old one's subscriptions: start again.
                    Ok(plant::Event::NewSession) if lost => return Err(SessionEnd::Failed("the server started a new session".into())),
                    Ok(plant::Event::NewSession) => {}
                    Ok(plant::Event::Ended(code)) | Ok(plant::Event::ReconnectFailed(code)) => {
                        return Err(SessionEnd::Failed(code.to_string()))
                    }
                    Err(_) => return Err(SessionEnd::Failed("session event loop ended".into())),
                },
                _ = status.tick() => {
                    self.send_status(ctx, state, !lost, None).await?;
                }
                _ = rebrowse.tick() => {
                    self.rebrowse(ctx, &session, &mut subscriptions, state).await?;
                }
            }
        }
    }

    /// Browses again, monitors what is new, stops monitoring what is gone, and sends the whole
    /// node set: the receiver mirrors structure from it, and gets it again after a restart.
    async fn rebrowse(
        &self,
        ctx: &SourceContext,
        session: &plant::ReadOnlySession,
        subscriptions: &mut Subscriptions,
        state: &mut Mirror,
    ) -> Result<(), SessionEnd> {
        let found = session
            .discover(&self.nodes, &self.browse, self.config.max_items)
            .await?;
        if found.truncated {
            ctx.metrics.errors_exception.inc();
            tracing::warn!(topic = %ctx.name, max_items = self.config.max_items,
                "opcua source: more variables than max_items; the rest are not monitored");
        }
        let wanted: HashMap<NodeId, &NodeEntry> = found
            .entries
            .iter()
            .filter(|e| e.class == NodeClass::Variable)
            .filter_map(|e| Some((e.node_id.parse().ok()?, e)))
            .collect();
        let gone: Vec<NodeId> = state
            .items
            .keys()
            .filter(|id| !wanted.contains_key(*id))
            .cloned()
            .collect();
        let mut by_subscription: HashMap<u32, Vec<u32>> = HashMap::new();
        for item in gone.iter().filter_map(|id| state.items.remove(id)) {
            by_subscription
                .entry(item.subscription)
                .or_default()
                .push(item.monitored_id);
        }
        for (subscription, ids) in by_subscription {
            session.unmonitor(subscription, &ids).await?;
            subscriptions.released(subscription, ids.len());
        }
        let new: Vec<(NodeId, &NodeEntry)> = wanted
            .iter()
            .filter(|(id, _)| !state.items.contains_key(*id))
            .map(|(id, e)| (id.clone(), *e))
            .collect();
        let mut rest = new.as_slice();
        while !rest.is_empty() {
            let (subscription, room) = subscriptions.with_room(session).await?;
            let (chunk, after) = rest.split_at(room.min(rest.len()));
            rest = after;
            let ids: Vec<NodeId> = chunk.iter().map(|(id, _)| id.clone()).collect();
            let results = session
                .monitor(
                    subscription,
                    &ids,
                    self.config.sampling_interval_ms as f64,
                    self.config.queue_size,
                    self.config.deadband_absolute,
                )
                .await?;
            let mut refused = 0u64;
            for ((id, entry), result) in chunk.iter().zip(results) {
                match result {
                    Ok(monitored_id) => {
                        subscriptions.taken(subscription, 1);
                        state.items.insert(
                            id.clone(),
                            Item {
                                subscription,
                                monitored_id,
                                node_id: entry.node_id.clone(),
                                path: entry.path.clone(),
                            },
                        );
                    }
                    Err(_) => refused += 1,
                }
            }
            if refused > 0 {
                ctx.metrics.errors_exception.inc_by(refused);
                tracing::warn!(topic = %ctx.name, refused, "opcua source: the server refused monitored items");
            }
        }
        ctx.sender_metrics
            .source_items
            .get_or_create(&crate::metrics::TopicLabels {
                topic: ctx.name.to_string(),
            })
            .set(state.items.len() as i64);
        state.browse += 1;
        let budget = ctx.max_record_bytes.min(256 << 10);
        let pages = diode_opcua::message::pack(found.entries, 512, budget);
        let count = pages.len() as u32;
        for (page, nodes) in pages.into_iter().enumerate() {
            let message = Message::Nodes(Nodes {
                endpoint: self.config.endpoint.clone(),
                browse: state.browse,
                page: page as u32,
                pages: count,
                nodes,
            });
            self.emit_message(ctx, &message).await?;
        }
        Ok(())
    }

    async fn forward(
        &self,
        ctx: &SourceContext,
        state: &Mirror,
        batch: Vec<(NodeId, opcua::types::DataValue)>,
    ) -> Result<(), QueueClosed> {
        ctx.metrics
            .last_poll_seconds
            .set(diode_common::unix_time_us() / 1_000_000);
        let changes: Vec<Change> = batch
            .iter()
            .filter_map(|(id, value)| {
                // A change for an item removed since it was published is dropped with it.
                let item = state.items.get(id)?;
                Some(Change::new(item.node_id.clone(), item.path.clone(), value))
            })
            .collect();
        let budget = ctx.max_record_bytes.min(64 << 10);
        for changes in diode_opcua::message::pack(changes, 256, budget) {
            let message = Message::Data(Data {
                endpoint: self.config.endpoint.clone(),
                changes,
            });
            self.emit_message(ctx, &message).await?;
        }
        Ok(())
    }
}

/// What the source keeps across one session's re-browses.
#[derive(Default)]
struct Mirror {
    items: HashMap<NodeId, Item>,
    /// Browses number up from the source's start time in milliseconds, so a restarted sender's
    /// never repeat an earlier run's (the receiver collects pages per browse).
    browse: u64,
    /// When the current session opened.
    opened: Option<std::time::Instant>,
}

struct Item {
    subscription: u32,
    monitored_id: u32,
    node_id: String,
    path: Vec<String>,
}

/// Many servers (async-opcua's among them) take at most 1,000 monitored items per subscription
/// and per call: items are spread over as many subscriptions as that needs.
const ITEMS_PER_SUBSCRIPTION: usize = 1000;

/// Notifications per publish response asked of the server: bounded messages on both sides.
const MAX_NOTIFICATIONS_PER_PUBLISH: u32 = 1000;

/// The subscriptions of one session, with how many items each holds.
struct Subscriptions {
    publishing_interval: Duration,
    changes: flume::Sender<(NodeId, opcua::types::DataValue)>,
    /// Changes the source could not queue (its queue towards the link is full).
    dropped: prometheus_client::metrics::counter::Counter,
    held: Vec<(u32, usize)>,
}

impl Subscriptions {
    /// A subscription with room, made if none has any, and how many items it can still take.
    async fn with_room(
        &mut self,
        session: &plant::ReadOnlySession,
    ) -> Result<(u32, usize), SessionEnd> {
        if let Some((id, count)) = self.held.iter().find(|(_, c)| *c < ITEMS_PER_SUBSCRIPTION) {
            return Ok((*id, ITEMS_PER_SUBSCRIPTION - count));
        }
        let (changes, dropped) = (self.changes.clone(), self.dropped.clone());
        let id = session
            .subscribe(
                self.publishing_interval,
                DataChangeCallback::new(move |value, item| {
                    if changes
                        .try_send((item.item_to_monitor().node_id.clone(), value))
                        .is_err()
                    {
                        dropped.inc();
                    }
                }),
            )
            .await?;
        self.held.push((id, 0));
        Ok((id, ITEMS_PER_SUBSCRIPTION))
    }

    fn taken(&mut self, subscription: u32, items: usize) {
        if let Some(held) = self.held.iter_mut().find(|(id, _)| *id == subscription) {
            held.1 += items;
        }
    }

    fn released(&mut self, subscription: u32, items: usize) {
        if let Some(held) = self.held.iter_mut().find(|(id, _)| *id == subscription) {
            held.1 = held.1.saturating_sub(items);
        }
    }
}

enum SessionEnd {
    Failed(String),
    QueueClosed,
}

impl From<QueueClosed> for SessionEnd {
    fn from(_: QueueClosed) -> Self {
        SessionEnd::QueueClosed
    }
}

impl From<StatusCode> for SessionEnd {
    fn from(code: StatusCode) -> Self {
        SessionEnd::Failed(code.to_string())
    }
}

impl From<opcua::types::Error> for SessionEnd {
    fn from(e: opcua::types::Error) -> Self {
        SessionEnd::Failed(e.to_string())
    }
}

/// What a browse found.
struct Found {
    entries: Vec<NodeEntry>,
    truncated: bool,
}

/// The one place the client session is held. Everything the source asks of the plant server
/// goes through the methods below, and there is none that writes, calls or changes the server.
mod plant {
    use super::*;
    use opcua::client::Session;
    use opcua::types::{
        AttributeId, BrowseDescription, BrowseDirection, BrowseResultMask, DataChangeFilter,
        DataChangeTrigger, DeadbandType, ExtensionObject, MonitoredItemCreateRequest,
        MonitoringMode, MonitoringParameters, NodeClassMask, QualifiedName, ReadValueId,
        ReferenceTypeId, TimestampsToReturn,
    };

    pub(super) enum Event {
        Lost(StatusCode),
        Reactivated,
        NewSession,
        ReconnectFailed(StatusCode),
        Ended(StatusCode),
    }

    pub(super) struct ReadOnlySession {
        session: Arc<Session>,
        event_loop: tokio::task::JoinHandle<()>,
    }

    impl Drop for ReadOnlySession {
        fn drop(&mut self) {
            self.event_loop.abort();
            let session = self.session.clone();
            // Closing tells the server to free the session now rather than at its timeout.
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(2), session.disconnect()).await;
            });
        }
    }

    impl ReadOnlySession {
        pub(super) async fn connect(
            source: &OpcuaSource,
            events: flume::Sender<Event>,
            timeout: Duration,
        ) -> Result<ReadOnlySession, SessionEnd> {
            if let Some(dir) = &source.pki_dir {
                diode_opcua::adopt_trusted_certificates(dir);
            }
            let pki_dir = source.pki_dir.clone().unwrap_or_else(|| {
                // Security None needs no certificate; the client still wants a store.
                std::env::temp_dir().join(format!("diode-send-opcua-{}", std::process::id()))
            });
            let mut client = ClientBuilder::new()
                .application_name("diode-send")
                .application_uri(CLIENT_URI)
                .product_uri("urn:diode-gateway")
                .pki_dir(pki_dir)
                .create_sample_keypair(false)
                .trust_server_certs(false)
                .verify_server_certs(true)
                .session_retry_limit(3)
                .session_retry_initial(Duration::from_secs(1))
                .session_retry_max(Duration::from_secs(10))
                .recreate_subscriptions(false)
                .request_timeout(timeout)
                // A publish response carries up to MAX_NOTIFICATIONS_PER_PUBLISH notifications,
                // and a browse up to 1,000 references per node.
                .max_array_length(MAX_NOTIFICATIONS_PER_PUBLISH as usize * 2)
                .max_message_size(16 << 20)
                .max_chunk_count(1024)
                .client()
                .map_err(|e| SessionEnd::Failed(e.join("; ")))?;
            let identity = match &source.identity {
                Identity::Anonymous => IdentityToken::Anonymous,
                Identity::User(user, password) => {
                    IdentityToken::UserName(user.clone(), Password::new(password.clone()))
                }
                Identity::Certificate(cert, key) => {
                    let cert = opcua::crypto::X509::from_der(
                        &std::fs::read(cert).map_err(|e| SessionEnd::Failed(e.to_string()))?,
                    )
                    .map_err(|e| SessionEnd::Failed(e.to_string()))?;
                    let key = opcua::crypto::PrivateKey::read_pem_file(key)
                        .map_err(|e| SessionEnd::Failed(e.to_string()))?;
                    IdentityToken::new_x509(cert, key)
                }
            };
            let connect = client.connect_to_matching_endpoint(
                (
                    source.config.endpoint.as_str(),
                    source.policy.to_str(),
                    source.mode,
                ),
                identity,
            );
            let (session, event_loop) = tokio::time::timeout(timeout, connect)
                .await
                .map_err(|_| SessionEnd::Failed("timed out asking for endpoints".into()))??;
            let event_loop = tokio::spawn(async move {
                use futures_util::StreamExt;
                let stream = event_loop.enter();
                tokio::pin!(stream);
                while let Some(event) = stream.next().await {
                    use opcua::client::{SessionConnectMode, SessionPollResult as P};
                    let event = match event {
                        Ok(P::ConnectionLost(code)) => Event::Lost(code),
                        Ok(P::ReconnectFailed(code)) => Event::ReconnectFailed(code),
                        Ok(P::Reconnected(SessionConnectMode::NewSession(_))) => Event::NewSession,
                        Ok(P::Reconnected(SessionConnectMode::ReactivatedSession(_))) => {
                            Event::Reactivated
                        }
                        Ok(_) => continue,
                        Err(code) => {
                            let _ = events.send_async(Event::Ended(code)).await;
                            return;
                        }
                    };
                    if events.send_async(event).await.is_err() {
                        return;
                    }
                }
                let _ = events.send_async(Event::Ended(StatusCode::Good)).await;
            });
            let session = ReadOnlySession {
                session,
                event_loop,
            };
            if !tokio::time::timeout(timeout, session.session.wait_for_connection())
                .await
                .unwrap_or(false)
            {
                return Err(SessionEnd::Failed("the session did not open".into()));
            }
            Ok(session)
        }

        pub(super) async fn subscribe(
            &self,
            publishing_interval: Duration,
            callback: DataChangeCallback,
        ) -> Result<u32, SessionEnd> {
            // Keep-alive every 10 publishing intervals; the server drops it after 30 silent ones.
            Ok(self
                .session
                .create_subscription(
                    publishing_interval,
                    30,
                    10,
                    MAX_NOTIFICATIONS_PER_PUBLISH,
                    0,
                    true,
                    callback,
                )
                .await?)
        }

        /// Monitored ids, or the server's refusal, per node in order.
        pub(super) async fn monitor(
            &self,
            subscription: u32,
            nodes: &[NodeId],
            sampling_interval_ms: f64,
            queue_size: u32,
            deadband: Option<f64>,
        ) -> Result<Vec<Result<u32, StatusCode>>, SessionEnd> {
            let filter = match deadband {
                Some(value) => ExtensionObject::from_message(DataChangeFilter {
                    trigger: DataChangeTrigger::StatusValue,
                    deadband_type: DeadbandType::Absolute as u32,
                    deadband_value: value,
                }),
                None => ExtensionObject::null(),
            };
            let requests = nodes
                .iter()
                .map(|node| MonitoredItemCreateRequest {
                    item_to_monitor: ReadValueId {
                        node_id: node.clone(),
                        attribute_id: AttributeId::Value as u32,
                        ..Default::default()
                    },
                    monitoring_mode: MonitoringMode::Reporting,
                    requested_parameters: MonitoringParameters {
                        client_handle: 0,
                        sampling_interval: sampling_interval_ms,
                        filter: filter.clone(),
                        queue_size,
                        discard_oldest: true,
                    },
                })
                .collect();
            let results = self
                .session
                .create_monitored_items(subscription, TimestampsToReturn::Both, requests)
                .await?;
            Ok(results
                .into_iter()
                .map(|r| {
                    if r.result.status_code.is_good() {
                        Ok(r.result.monitored_item_id)
                    } else {
                        Err(r.result.status_code)
                    }
                })
                .collect())
        }

        pub(super) async fn unmonitor(
            &self,
            subscription: u32,
            ids: &[u32],
        ) -> Result<(), SessionEnd> {
            for chunk in ids.chunks(1000) {
                self.session
                    .delete_monitored_items(subscription, chunk)
                    .await?;
            }
            Ok(())
        }

        /// The explicit nodes and everything the browse roots lead to that their filters
        /// take, with the objects on the way; at most `max_items` variables.
        pub(super) async fn discover(
            &self,
            explicit: &[NodeId],
            roots: &[BrowseRoot],
            max_items: usize,
        ) -> Result<Found, SessionEnd> {
            let mut entries = Vec::new();
            let mut truncated = false;
            let mut variables = 0usize;
            if !explicit.is_empty() {
                let reads: Vec<ReadValueId> = explicit
                    .iter()
                    .map(|node| ReadValueId {
                        node_id: node.clone(),
                        attribute_id: AttributeId::BrowseName as u32,
                        ..Default::default()
                    })
                    .collect();
                let names = self
                    .session
                    .read(&reads, TimestampsToReturn::Neither, 0.0)
                    .await?;
                for (node, name) in explicit.iter().zip(names) {
                    let name = match name.value {
                        Some(opcua::types::Variant::QualifiedName(q)) => q.name.to_string(),
                        _ => node.to_string(),
                    };
                    if variables < max_items {
                        variables += 1;
                        entries.push(NodeEntry {
                            node_id: node.to_string(),
                            parent: None,
                            path: vec![name.clone()],
                            class: NodeClass::Variable,
                            display_name: name,
                        });
                    } else {
                        truncated = true;
                    }
                }
            }
            let mut seen: HashSet<NodeId> = HashSet::new();
            let server_object = NodeId::new(0, 2253u32);
            for root in roots {
                // (node, its entry index or None for the root, path, depth)
                let mut frontier: Vec<(NodeId, Option<String>, Vec<String>)> =
                    vec![(root.root.clone(), None, Vec::new())];
                let mut found: Vec<NodeEntry> = Vec::new();
                for _depth in 0..root.max_depth {
                    if frontier.is_empty() {
                        break;
                    }
                    let mut next = Vec::new();
                    for chunk in frontier.chunks(100) {
                        let limit = max_items * 4;
                        let (children, cut) = self
                            .children(chunk.iter().map(|(n, _, _)| n), limit)
                            .await?;
                        truncated |= cut;
                        for ((node, _, path), refs) in chunk.iter().zip(children) {
                            for (child, class, name, display) in refs {
                                // The Server object describes the server itself (diagnostics,
                                // capabilities), not the plant: not followed from Objects.
                                if child == server_object {
                                    continue;
                                }
                                if found.len() >= max_items * 4 {
                                    truncated = true;
                                    continue;
                                }
                                if !seen.insert(child.clone()) {
                                    continue;
                                }
                                let mut child_path = path.clone();
                                child_path.push(name);
                                let parent = (*node != root.root).then(|| node.to_string());
                                found.push(NodeEntry {
                                    node_id: child.to_string(),
                                    parent,
                                    path: child_path.clone(),
                                    class,
                                    display_name: display,
                                });
                                next.push((child, None, child_path));
                            }
                        }
                    }
                    frontier = next;
                }
                // Variables the filters take, and the objects above them.
                let mut keep: HashSet<String> = HashSet::new();
                let parents: HashMap<String, Option<String>> = found
                    .iter()
                    .map(|e| (e.node_id.clone(), e.parent.clone()))
                    .collect();
                for entry in found.iter().filter(|e| e.class == NodeClass::Variable) {
                    let path = entry.path.join("/");
                    if !root.include.is_match(&path) || root.exclude.is_match(&path) {
                        continue;
                    }
                    if variables >= max_items {
                        truncated = true;
                        break;
                    }
                    variables += 1;
                    let mut at = Some(entry.node_id.clone());
                    while let Some(id) = at {
                        if !keep.insert(id.clone()) {
                            break;
                        }
                        at = parents.get(&id).cloned().flatten();
                    }
                }
                entries.extend(found.into_iter().filter(|e| keep.contains(&e.node_id)));
            }
            // A node named in `nodes` and also found by a browse is mirrored once, in its place
            // in the tree.
            let placed: HashSet<String> = entries
                .iter()
                .filter(|e| e.parent.is_some())
                .map(|e| e.node_id.clone())
                .collect();
            let mut listed = HashSet::new();
            entries.retain(|e| {
                (e.parent.is_some() || !placed.contains(&e.node_id))
                    && listed.insert(e.node_id.clone())
            });
            Ok(Found { entries, truncated })
        }

        /// The hierarchical children (objects and variables) of each node, following
        /// continuation points up to `limit` children a node (true: some node had more). A
        /// browse the server refuses fails the whole browse: a refused subtree is not an empty
        /// one, and taking it for one would remove its nodes from the mirror.
        async fn children<'a>(
            &self,
            nodes: impl Iterator<Item = &'a NodeId>,
            limit: usize,
        ) -> Result<(Vec<Vec<(NodeId, NodeClass, String, String)>>, bool), SessionEnd> {
            let mut cut = false;
            let requests: Vec<BrowseDescription> = nodes
                .map(|node| BrowseDescription {
                    node_id: node.clone(),
                    browse_direction: BrowseDirection::Forward,
                    reference_type_id: ReferenceTypeId::HierarchicalReferences.into(),
                    include_subtypes: true,
                    node_class_mask: (NodeClassMask::OBJECT | NodeClassMask::VARIABLE).bits(),
                    result_mask: BrowseResultMask::All as u32,
                })
                .collect();
            let mut out = Vec::with_capacity(requests.len());
            for result in self.session.browse(&requests, 1000, None).await? {
                let mut refs = Vec::new();
                let mut result = result;
                loop {
                    if !result.status_code.is_good() {
                        return Err(SessionEnd::Failed(format!(
                            "the server refused a browse: {}",
                            result.status_code
                        )));
                    }
                    for r in result.references.take().unwrap_or_default() {
                        let class = match r.node_class {
                            opcua::types::NodeClass::Object => NodeClass::Object,
                            opcua::types::NodeClass::Variable => NodeClass::Variable,
                            _ => continue,
                        };
                        // Nodes on other servers are not followed.
                        if r.node_id.server_index != 0 {
                            continue;
                        }
                        let name: &QualifiedName = &r.browse_name;
                        refs.push((
                            r.node_id.node_id.clone(),
                            class,
                            name.name.to_string(),
                            r.display_name.text.to_string(),
                        ));
                    }
                    if result.continuation_point.is_null() {
                        break;
                    }
                    let cp = std::slice::from_ref(&result.continuation_point);
                    if refs.len() >= limit {
                        // Enough of this node: the server may free what it kept for the rest.
                        cut = true;
                        let _ = self.session.browse_next(true, cp).await;
                        break;
                    }
                    match self
                        .session
                        .browse_next(false, cp)
                        .await?
                        .into_iter()
                        .next()
                    {
                        Some(next) => result = next,
                        None => break,
                    }
                }
                out.push(refs);
            }
            Ok((out, cut))
        }
    }
}
