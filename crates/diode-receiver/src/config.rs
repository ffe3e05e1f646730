//! `diode-recv` configuration: the link, the metrics endpoint, and routes from topic filters to sinks.

use diode_common::config::{default_u64, default_usize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use diode_common::config::{ConfigError, ConfigScope, ConfigSource, MetricsConfig};
use serde::Deserialize;

use crate::route::{Route, RouteConfig};
use crate::sinks::SiteLimits;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiverConfig {
    pub link: LinkConfig,
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteConfig>,
    /// The receiver's own security events (rejected datagrams, sessions, link down and up,
    /// losses: docs/operations.md) also as RFC 5424 messages to a SIEM, besides the log.
    #[serde(default)]
    pub security_events: Option<crate::sinks::syslog::SyslogConfig>,
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
    #[serde(default = "default_usize::<{ 32 << 20 }>")]
    pub max_inflight_bytes: usize,
    /// The oldest incomplete block is given up after this long without progress.
    #[serde(default = "default_u64::<200>")]
    pub block_timeout_ms: u64,
    #[serde(default = "default_usize::<{ 16 << 20 }>")]
    pub max_record_bytes: usize,
    #[serde(default = "default_usize::<4096>")]
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
    /// `[[link.lane]]`: lanes beside the one `listen` names (lane 0), each with its own socket,
    /// link thread and reassembler (wire-format.md §7), as the sender's `[[link.lane]]`.
    #[serde(default, rename = "lane")]
    pub lanes: Vec<LaneConfig>,
}

/// One more lane: `[[link.lane]] listen = "host:port"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaneConfig {
    pub listen: String,
}

/// About 100 ms of a 1 GB/s link: what it takes to ride out the receiving host's scheduling
/// stalls without the kernel dropping datagrams (see docs/performance.md).
fn default_receive_buffer_bytes() -> usize {
    128 << 20
}
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: ReceiverConfig,
    /// Lane 0 (`link.listen`), then each `[[link.lane]]`.
    pub lanes: Vec<SocketAddr>,
    pub routes: Vec<Route>,
    /// Accepted link keys, current first.
    pub keys: Vec<[u8; 32]>,
    /// `metrics.listen`, resolved.
    pub metrics_listen: Option<SocketAddr>,
    /// `link.state_file`, resolved against the config file's directory.
    pub state_file: Option<PathBuf>,
    /// The index in `routes` of the internal route of the security events, if configured.
    pub security_route: Option<usize>,
    /// `link.allowed_sources`, parsed.
    pub allowed_sources: Vec<diode_common::net::SourceFilter>,
}

impl Loaded {
    /// Where a lane keeps its state: `link.state_file` for lane 0, the same name with `.lane<N>`
    /// added for the others, since each lane's reassembler has a floor and marks of its own.
    pub fn state_file(&self, lane: usize) -> Option<PathBuf> {
        let file = self.state_file.as_ref()?;
        if lane == 0 {
            return Some(file.clone());
        }
        let mut name = file.file_name()?.to_owned();
        name.push(format!(".lane{lane}"));
        Some(file.with_file_name(name))
    }
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
    let mut lanes = vec![source.socket_addr("link.listen", &config.link.listen)?];
    for (i, lane) in config.link.lanes.iter().enumerate() {
        let key = format!("link.lane[{i}].listen");
        let listen = source.socket_addr(&key, &lane.listen)?;
        if listen.port() != 0 {
            if let Some(other) = lanes.iter().position(|l| *l == listen) {
                return Err(source.invalid(
                    &key,
                    format!("{listen} is lane {other}'s already: each lane needs its own"),
                ));
            }
        }
        lanes.push(listen);
    }
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
    let site = SiteLimits {
        max_record_bytes: link.max_record_bytes,
    };
    let mut routes = Vec::new();
    for (i, route) in config.routes.iter().enumerate() {
        let scope = ConfigScope::new(&source, format!("route[{i}]"));
        let checked = route.check(&scope, i, &site, &routes)?;
        routes.push(checked);
    }
    // The security events go through a route of their own, which no topic matches: the
    // syslog sink's queue, reconnection and framing, and the route's metrics.
    let security_route = match &config.security_events {
        Some(settings) => {
            if let Some(i) = routes.iter().position(|r| r.name == "security-events") {
                return Err(source.invalid(
                    &format!("route[{i}].name"),
                    "\"security-events\" is the name of the route [security_events] makes: \
                     choose another",
                ));
            }
            let scope = ConfigScope::new(&source, "security_events").with_site(site);
            let checked = settings.check(&scope)?;
            routes.push(Route {
                name: "security-events".into(),
                filters: Vec::new(),
                sink: crate::sinks::CheckedSink {
                    kind: "syslog",
                    settings: std::sync::Arc::new(checked),
                },
                queue_bytes: 1 << 20,
                buffer: None,
                dead_letter: (None, 0),
            });
            Some(routes.len() - 1)
        }
        None => None,
    };
    Ok(Loaded {
        security_route,
        config,
        lanes,
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
        let out = dir.path().join("out/records.jsonl");
        assert!(
            loaded.routes[0]
                .sink
                .settings
                .describe()
                .starts_with(&format!("file {} ", out.display())),
            "{:?}",
            loaded.routes[0].sink
        );
    }

    #[test]
    fn each_lane_has_its_own_port_and_state_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("receiver.toml");
        let lanes = ISSUE_EXAMPLE.replace(
            "[metrics]",
            "state_file = \"state/receiver.state\"\n[[link.lane]]\nlisten = \"127.0.0.1:47001\"\n\n[metrics]",
        );
        std::fs::create_dir(dir.path().join("state")).unwrap();
        std::fs::write(&path, &lanes).unwrap();
        let loaded = load(&path).unwrap();
        assert_eq!(loaded.lanes.len(), 2);
        assert_eq!(loaded.lanes[1].port(), 47001);
        let state = dir.path().join("state");
        assert_eq!(loaded.state_file(0), Some(state.join("receiver.state")));
        assert_eq!(
            loaded.state_file(1),
            Some(state.join("receiver.state.lane1"))
        );
        assert!(crate::describe(&loaded).contains("127.0.0.1:47000, 127.0.0.1:47001"));

        std::fs::write(&path, lanes.replace("47001", "47000")).unwrap();
        let error = load(&path).unwrap_err().to_string();
        assert!(
            error.contains("link.lane[0].listen") && error.contains("lane 0"),
            "{error}"
        );
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
