//! Configuration files: every error names the file, the line and the key, and says what is wrong.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use thiserror::Error;
use toml::de::{DeTable, DeValue};

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key, a missing key or a value of the wrong type.
    #[error("{path}:{line}:{column}: {}{message}", key.as_deref().map(|k| format!("`{k}`: ")).unwrap_or_default())]
    Syntax {
        path: String,
        line: usize,
        column: usize,
        /// The dotted key the error is at (`topic[1].source.listen`), when it is at one.
        key: Option<String>,
        message: String,
    },
    /// A well-formed value that is not acceptable.
    #[error("{path}:{line}: `{key}`: {message}")]
    Invalid {
        path: String,
        line: usize,
        key: String,
        message: String,
    },
}

/// A field's default written at the field, `#[serde(default = "default_usize::<1500>")]`,
/// rather than in a function of its own further down.
pub fn default_usize<const N: usize>() -> usize {
    N
}

/// As [`default_usize`].
pub fn default_u64<const N: u64>() -> u64 {
    N
}

/// As [`default_usize`].
pub fn default_u32<const N: u32>() -> u32 {
    N
}

/// As [`default_usize`].
pub fn default_u8<const N: u8>() -> u8 {
    N
}

/// `[metrics]`: where the Prometheus endpoint listens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    pub listen: String,
    /// The endpoint shows topic names, rates and losses: listening on every interface
    /// (`0.0.0.0`, `[::]`) must be asked for by name.
    #[serde(default)]
    pub all_interfaces: bool,
}

impl MetricsConfig {
    /// `listen`, resolved, refusing an unspecified address unless `all_interfaces` says so.
    pub fn resolve(&self, source: &ConfigSource) -> Result<std::net::SocketAddr, ConfigError> {
        let addr = source.socket_addr("metrics.listen", &self.listen)?;
        if addr.ip().is_unspecified() && !self.all_interfaces {
            return Err(source.invalid(
                "metrics.listen",
                format!(
                    "{} listens on every interface, so anyone who can reach this host reads \
                     the metrics: give the address of the monitoring network's interface, or \
                     set metrics.all_interfaces = true",
                    self.listen
                ),
            ));
        }
        Ok(addr)
    }
}

/// One table of a configuration file (`topic[2].source`, `route[0].sink`, or a topic file's top
/// level): a connector checks its own keys through it, and its errors still name the file, the
/// line and the whole dotted key.
/// `site` carries what the whole configuration sets that a table's checks depend on (each
/// service's own limits).
#[derive(Clone)]
pub struct ConfigScope<'a, S = ()> {
    source: &'a ConfigSource,
    prefix: String,
    site: S,
}

impl<'a> ConfigScope<'a> {
    /// `prefix` is the table's key path; empty for a file's top level.
    pub fn new(source: &'a ConfigSource, prefix: impl Into<String>) -> Self {
        ConfigScope {
            source,
            prefix: prefix.into(),
            site: (),
        }
    }

    /// The same table, with the service's limits its checks depend on.
    pub fn with_site<S>(self, site: S) -> ConfigScope<'a, S> {
        ConfigScope {
            source: self.source,
            prefix: self.prefix,
            site,
        }
    }
}

impl<'a, S: Clone> ConfigScope<'a, S> {
    /// The service's limits this table is checked against.
    pub fn site(&self) -> &S {
        &self.site
    }

    pub fn source(&self) -> &'a ConfigSource {
        self.source
    }

    /// The table's own key path (`topic[2].source`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The whole key path of `key` in this table.
    pub fn key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    /// The table at `key` inside this one.
    pub fn child(&self, key: &str) -> ConfigScope<'a, S> {
        ConfigScope {
            source: self.source,
            prefix: self.key(key),
            site: self.site.clone(),
        }
    }

    pub fn invalid(&self, key: &str, message: impl Into<String>) -> ConfigError {
        self.source.invalid(&self.key(key), message)
    }

    pub fn socket_addr(&self, key: &str, addr: &str) -> Result<std::net::SocketAddr, ConfigError> {
        self.source.socket_addr(&self.key(key), addr)
    }

    pub fn writable_dir(&self, key: &str, dir: &Path) -> Result<(), ConfigError> {
        self.source.writable_dir(&self.key(key), dir)
    }

    pub fn resolve(&self, relative: &Path) -> PathBuf {
        self.source.resolve(relative)
    }
}

/// How a byte stream is cut into records: the TCP source's framing and the TCP sink's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Framing {
    /// One line without its `\n` (or `\r\n`) terminator is one record.
    #[default]
    Lines,
    /// Each record is preceded by its length as a big-endian u32.
    Length,
    /// A byte stream cut at arbitrary points; order is kept, one connection at a time.
    Raw,
}

/// The text of one configuration file, kept to point errors at lines.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    path: PathBuf,
    text: String,
}

impl ConfigSource {
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Ok(ConfigSource {
            path: path.to_owned(),
            text,
        })
    }

    pub fn from_text(path: impl Into<PathBuf>, text: impl Into<String>) -> Self {
        ConfigSource {
            path: path.into(),
            text: text.into(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory relative paths in this file are resolved against.
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// Checks a directory the service will write into (a buffer, a file sink's, state): not a
    /// symbolic link (it could point anywhere, and is followed silently), and it or its nearest
    /// existing ancestor a directory this user may write, so that `check` finds what the
    /// service would otherwise retry forever.
    pub fn writable_dir(&self, key: &str, dir: &Path) -> Result<(), ConfigError> {
        if std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(self.invalid(
                key,
                format!(
                    "{} is a symbolic link: name the directory itself",
                    dir.display()
                ),
            ));
        }
        let mut existing = dir;
        while !existing.exists() {
            match existing.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => existing = parent,
                _ => {
                    existing = Path::new(".");
                    break;
                }
            }
        }
        if !existing.is_dir() {
            return Err(self.invalid(key, format!("{} is not a directory", existing.display())));
        }
        let writable = std::ffi::CString::new(existing.as_os_str().as_encoded_bytes())
            // SAFETY: access reads a NUL-terminated path and has no other preconditions.
            .is_ok_and(|c| unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0);
        if !writable {
            return Err(self.invalid(
                key,
                format!(
                    "{} cannot be created: {} is not writable by this user",
                    dir.display(),
                    existing.display()
                ),
            ));
        }
        Ok(())
    }

    pub fn resolve(&self, relative: &Path) -> PathBuf {
        if relative.is_absolute() {
            relative.to_owned()
        } else {
            self.dir().join(relative)
        }
    }

    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        toml::from_str(&self.text).map_err(|e| {
            let start = e.span().map_or(0, |s| s.start).min(self.text.len());
            let (line, column) = line_column(&self.text, start);
            let mut message = in_words(e.message().trim_end());
            // Serde's type errors do not name the key: the key path at the error does, and the
            // line's own text shows the value.
            if let Some(text) = self.text.lines().nth(line - 1) {
                let text = text.trim();
                if !text.is_empty() && !message.contains(text) {
                    message = format!("{message} (in `{text}`)");
                }
            }
            ConfigError::Syntax {
                path: self.path.display().to_string(),
                line,
                column,
                key: e.span().and_then(|span| self.key_at(span.start)),
                message,
            }
        })
    }

    /// Resolves the `host:port` set at `key`, or says why not.
    pub fn socket_addr(&self, key: &str, addr: &str) -> Result<std::net::SocketAddr, ConfigError> {
        use std::net::ToSocketAddrs;
        addr.to_socket_addrs()
            .map_err(|e| self.invalid(key, format!("{addr:?} is not a host:port address: {e}")))?
            .next()
            .ok_or_else(|| self.invalid(key, format!("{addr:?} resolves to no address")))
    }

    /// An error about `key` (a path such as `topic[1].source.listen`), pointing at its line.
    pub fn invalid(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.display().to_string(),
            line: self.line_of(key),
            key: key.to_owned(),
            message: message.into(),
        }
    }

    /// The dotted key path of the entry at byte `offset`: at each level the last key that
    /// starts before it, so a value, a key or a table header all name their key; the deepest
    /// table when the offset is at a table before its first key.
    fn key_at(&self, offset: usize) -> Option<String> {
        let root = DeTable::parse(&self.text).ok()?;
        // A table's own errors (a missing key) point at its header: read the name inside it.
        let offset = offset
            + self.text.as_bytes()[offset.min(self.text.len())..]
                .iter()
                .take_while(|&&b| b == b'[')
                .count();
        let mut path = String::new();
        let mut value: Option<&DeValue> = None;
        let mut table = Some(root.get_ref());
        loop {
            if let Some(t) = table.take() {
                let Some((k, v)) = t
                    .iter()
                    .filter(|(k, _)| k.span().start <= offset)
                    .max_by_key(|(k, _)| k.span().start)
                else {
                    // At the table itself, before its first key (a value of the wrong kind).
                    break;
                };
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k.get_ref());
                value = Some(v.get_ref());
            }
            match value {
                Some(DeValue::Table(t)) => table = Some(t),
                Some(DeValue::Array(items)) => {
                    let Some((i, item)) = items
                        .iter()
                        .enumerate()
                        .filter(|(_, item)| item.span().start <= offset)
                        .max_by_key(|(_, item)| item.span().start)
                    else {
                        break;
                    };
                    path.push_str(&format!("[{i}]"));
                    value = Some(item.get_ref());
                }
                _ => break,
            }
        }
        (!path.is_empty()).then_some(path)
    }

    /// The line where `key` is set, or the deepest part of it that is; 1 if none is.
    pub fn line_of(&self, key: &str) -> usize {
        let Ok(root) = DeTable::parse(&self.text) else {
            return 1;
        };
        let mut offset = 0;
        let mut table: Option<&DeTable> = Some(root.get_ref());
        let mut value: Option<&DeValue> = None;
        for segment in parse_key_path(key) {
            match segment {
                Segment::Key(name) => {
                    let Some(t) = table.or(match value {
                        Some(DeValue::Table(t)) => Some(t),
                        _ => None,
                    }) else {
                        break;
                    };
                    let Some((k, v)) = t.iter().find(|(k, _)| k.get_ref().as_ref() == name) else {
                        break;
                    };
                    offset = k.span().start;
                    table = None;
                    value = Some(v.get_ref());
                }
                Segment::Index(index) => {
                    let Some(DeValue::Array(items)) = value else {
                        break;
                    };
                    let Some(item) = items.get(index) else {
                        break;
                    };
                    offset = item.span().start;
                    table = None;
                    value = Some(item.get_ref());
                }
            }
        }
        line_column(&self.text, offset).0
    }
}

/// Serde's messages name Rust types (`expected usize`): what a configuration file needs is the
/// kind of value, in words.
fn in_words(message: &str) -> String {
    const WORDS: [(&str, &str); 14] = [
        ("expected usize", "expected a whole number, 0 or more"),
        ("expected u64", "expected a whole number, 0 or more"),
        ("expected u32", "expected a whole number, 0 or more"),
        ("expected u16", "expected a whole number from 0 to 65535"),
        ("expected u8", "expected a whole number from 0 to 255"),
        ("expected i64", "expected a whole number"),
        ("expected i32", "expected a whole number"),
        ("expected f64", "expected a number"),
        ("expected f32", "expected a number"),
        ("expected a boolean", "expected true or false"),
        ("expected a sequence", "expected a list, [ ... ]"),
        ("expected a map", "expected a table, { ... }"),
        ("expected a string", "expected a string in quotes"),
        ("expected a borrowed string", "expected a string in quotes"),
    ];
    let mut message = message.to_owned();
    for (rust, words) in WORDS {
        if let Some(at) = message.find(rust) {
            // Only a whole word: `expected u8` is not `expected u80`.
            let end = at + rust.len();
            if !message[end..].starts_with(|c: char| c.is_alphanumeric()) {
                message.replace_range(at..end, words);
            }
        }
    }
    if let Some(at) = message.find("expected struct ") {
        let end = message[at + 16..]
            .find(|c: char| !c.is_alphanumeric() && c != '_')
            .map_or(message.len(), |e| at + 16 + e);
        message.replace_range(at..end, "expected a table, { ... }");
    }
    message
}

enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

fn parse_key_path(path: &str) -> Vec<Segment<'_>> {
    let mut segments = Vec::new();
    for part in path.split('.') {
        let (name, mut rest) = part.split_once('[').map_or((part, ""), |(n, r)| (n, r));
        if !name.is_empty() {
            segments.push(Segment::Key(name));
        }
        while let Some((index, after)) = rest.split_once(']') {
            if let Ok(index) = index.parse() {
                segments.push(Segment::Index(index));
            }
            rest = after.strip_prefix('[').unwrap_or(after);
        }
    }
    segments
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        #[allow(dead_code)]
        link: Link,
        #[allow(dead_code)]
        #[serde(default)]
        topic: Vec<toml::Value>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Link {
        #[allow(dead_code)]
        rate_mbps: f64,
    }

    const TEXT: &str = "[link]\nrate_mbps = 40\n\n[[topic]]\nname = \"a\"\n\n[[topic]]\nname = \"b\"\nsource = { kind = \"udp\", listen = \"x\" }\n";

    #[test]
    fn keys_are_located() {
        let src = ConfigSource::from_text("sender.toml", TEXT);
        assert_eq!(src.line_of("link.rate_mbps"), 2);
        assert_eq!(src.line_of("topic[1].name"), 8);
        assert_eq!(src.line_of("topic[1].source.listen"), 9);
        let err = src.invalid("link.rate_mbps", "must be above 0").to_string();
        assert_eq!(err, "sender.toml:2: `link.rate_mbps`: must be above 0");
    }

    #[test]
    fn unknown_keys_and_bad_types_name_file_line_and_key() {
        let src = ConfigSource::from_text("s.toml", "[link]\nrate_mbs = 40\n");
        let err = src.parse::<Doc>().unwrap_err().to_string();
        assert!(
            err.starts_with("s.toml:2:1: `link.rate_mbs`: unknown field `rate_mbs`"),
            "{err}"
        );
        let src = ConfigSource::from_text("s.toml", "[link]\nrate_mbps = \"fast\"\n");
        let err = src.parse::<Doc>().unwrap_err().to_string();
        assert!(
            err.starts_with("s.toml:2:") && err.contains("rate_mbps"),
            "{err}"
        );
    }

    /// Parser errors say what is expected in words and name the dotted key, as value errors do.
    #[test]
    fn type_errors_name_the_dotted_key_and_say_what_is_expected_in_words() {
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Sized {
            #[allow(dead_code)]
            link: SizedLink,
            #[allow(dead_code)]
            topic: Vec<Topic>,
        }
        #[derive(Debug, Deserialize)]
        struct SizedLink {
            #[allow(dead_code)]
            mtu_bytes: usize,
        }
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Topic {
            #[allow(dead_code)]
            name: String,
            #[allow(dead_code)]
            source: Source,
        }
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Source {
            #[allow(dead_code)]
            listen: String,
            #[allow(dead_code)]
            #[serde(default)]
            allowed_peers: Vec<String>,
        }
        let text = "[link]\nmtu_bytes = 1500\n\n[[topic]]\nname = \"a\"\nsource = { listen = \"x\" }\n\n[[topic]]\nname = \"b\"\nsource = { listen = \"y\", allowed_peers = \"10.0.0.1\" }\n";
        let parse = |text: &str| {
            ConfigSource::from_text("s.toml", text)
                .parse::<Sized>()
                .unwrap_err()
                .to_string()
        };
        let err = parse(&text.replace("1500", "\"big\""));
        assert!(
            err.starts_with("s.toml:2:")
                && err.contains("`link.mtu_bytes`: ")
                && err.contains("expected a whole number, 0 or more")
                && !err.contains("usize"),
            "{err}"
        );
        let err = parse(text);
        assert!(
            err.starts_with("s.toml:10:")
                && err.contains("`topic[1].source.allowed_peers`: ")
                && err.contains("expected a list"),
            "{err}"
        );
        let err = parse(&text.replace("name = \"b\"", "name = \"b\"\ncolour = 1"));
        assert!(err.contains("`topic[1].colour`: unknown field"), "{err}");
    }
}
