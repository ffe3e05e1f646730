//! The syslog sink: RFC 5424 messages for a SIEM, over TCP with octet counting (RFC 6587 §3.4.1)
//! or UDP. A record that came from the sender's syslog source keeps its facility, severity, host,
//! application and message; any other record is sent as local0.notice from `diode`, with its
//! topic and sequence number as structured data so the SIEM can trace it.

use diode_common::config::ConfigError;
use diode_wire::Record;
use serde::Deserialize;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::{TcpStream, UdpSocket};

use super::{Refusals, Scope, Sink, SinkError, SinkSettings};
use crate::metrics::RouteMetrics;
use crate::route::RouteTask;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyslogConfig {
    pub target: String,
    #[serde(default)]
    pub protocol: SyslogProtocol,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyslogProtocol {
    /// RFC 5425-style octet counting on a TCP stream (RFC 6587 §3.4.1).
    #[default]
    Tcp,
    Udp,
}

impl SyslogConfig {
    pub fn check(&self, scope: &Scope<'_>) -> Result<SyslogConfig, ConfigError> {
        scope.socket_addr("target", &self.target)?;
        Ok(self.clone())
    }
}

impl SinkSettings for SyslogConfig {
    fn describe(&self) -> String {
        format!(
            "syslog RFC 5424 over {:?} to {}",
            self.protocol, self.target
        )
        .to_lowercase()
    }

    fn start(&self, route: RouteTask) -> std::io::Result<tokio::task::JoinHandle<()>> {
        Ok(route.spawn(SyslogSink::new(self.target.clone(), self.protocol)))
    }
}

pub struct SyslogSink {
    target: String,
    protocol: SyslogProtocol,
    tcp: Option<BufWriter<TcpStream>>,
    udp: Option<UdpSocket>,
    hostname: String,
    buf: Vec<u8>,
}

impl SyslogSink {
    fn new(target: String, protocol: SyslogProtocol) -> SyslogSink {
        let hostname = diode_common::hostname();
        SyslogSink {
            target,
            protocol,
            tcp: None,
            udp: None,
            hostname,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, records: &[Record]) -> Result<(), SinkError> {
        let connect_error = |target: &str| {
            let target = target.to_owned();
            move |source| SinkError::Connect { target, source }
        };
        match self.protocol {
            SyslogProtocol::Tcp => {
                if self.tcp.is_none() {
                    let stream = TcpStream::connect(&self.target)
                        .await
                        .map_err(connect_error(&self.target))?;
                    let _ = stream.set_nodelay(true);
                    self.tcp = Some(BufWriter::with_capacity(256 << 10, stream));
                }
                let mut message = Vec::new();
                for record in records {
                    message.clear();
                    format_5424(record, &self.hostname, &mut message);
                    self.buf.clear();
                    self.buf
                        .extend_from_slice(format!("{} ", message.len()).as_bytes());
                    self.buf.extend_from_slice(&message);
                    let conn = self.tcp.as_mut().expect("connected above");
                    conn.write_all(&self.buf).await?;
                }
                self.tcp.as_mut().expect("connected above").flush().await?;
            }
            SyslogProtocol::Udp => {
                if self.udp.is_none() {
                    let target = tokio::net::lookup_host(&self.target)
                        .await
                        .and_then(|mut addrs| {
                            addrs
                                .next()
                                .ok_or_else(|| std::io::Error::other("resolves to no address"))
                        })
                        .map_err(connect_error(&self.target))?;
                    let socket = UdpSocket::bind(if target.is_ipv4() {
                        "0.0.0.0:0"
                    } else {
                        "[::]:0"
                    })
                    .await?;
                    socket
                        .connect(target)
                        .await
                        .map_err(connect_error(&self.target))?;
                    self.udp = Some(socket);
                }
                let socket = self.udp.as_ref().expect("bound above");
                for record in records {
                    self.buf.clear();
                    format_5424(record, &self.hostname, &mut self.buf);
                    socket.send(&self.buf).await?;
                }
            }
        }
        Ok(())
    }
}

impl Sink for SyslogSink {
    async fn deliver(
        &mut self,
        records: &[Record],
        _metrics: &RouteMetrics,
    ) -> Result<Refusals, SinkError> {
        self.send(records).await.map(|()| Refusals::new())
    }

    fn reset(&mut self) {
        self.tcp = None;
        self.udp = None;
    }
}

/// `<PRI>1 TIMESTAMP HOST APP PROCID MSGID [diode@32473 topic=".." seq=".." session=".."] MSG`
/// (RFC 5424 §6).
pub fn format_5424(record: &Record, hostname: &str, out: &mut Vec<u8>) {
    // The sender's syslog source sends JSON with these fields (crates/diode-sender syslog.rs),
    // and says so in the record's origin: a payload of any other record that merely looks like
    // it (a JSON document with `format` and `raw`) must not set host, application or severity.
    let from_syslog = record
        .origin
        .as_ref()
        .is_some_and(|o| o.protocol == "syslog");
    let parsed: Option<serde_json::Value> = from_syslog
        .then(|| serde_json::from_slice(&record.payload).ok())
        .flatten()
        .filter(|v: &serde_json::Value| v.get("format").is_some() && v.get("raw").is_some());
    let field = |name: &str, max: usize| -> String {
        parsed
            .as_ref()
            .and_then(|p| p.get(name))
            .and_then(|v| v.as_str())
            .map(|s| header_field(s, max))
            .unwrap_or_else(|| "-".into())
    };
    let number = |name: &str, default: u64, max: u64| {
        parsed
            .as_ref()
            .and_then(|p| p.get(name))
            .and_then(|v| v.as_u64())
            .filter(|n| *n <= max)
            .unwrap_or(default)
    };
    let pri = number("facility", 16, 23) * 8 + number("severity", 5, 7);
    let (host, app) = match &parsed {
        Some(_) => (field("host", 255), field("app", 48)),
        None => (header_field(hostname, 255), "diode".to_owned()),
    };
    let time = diode_common::format_rfc3339_us(record.time_us);
    out.extend_from_slice(
        format!(
            "<{pri}>1 {time} {host} {app} {} {} [diode@32473 topic=\"{}\" seq=\"{}\"{}{}] ",
            field("procid", 128),
            field("msgid", 32),
            sd_escape(&record.topic),
            record.seq,
            match record.session_id {
                0 => String::new(),
                id => format!(" session=\"{id:016x}\""),
            },
            // Filled a gap from a replay of the sender's journal (wire-format.md §6.7).
            if record.late { " late=\"1\"" } else { "" }
        )
        .as_bytes(),
    );
    match parsed
        .as_ref()
        .and_then(|p| p.get("message"))
        .and_then(|m| m.as_str())
    {
        Some(message) => escape_controls(message, out),
        None => escape_controls(&String::from_utf8_lossy(&record.payload), out),
    }
}

/// Control characters (CR, LF, ESC, NUL, ...) as `#ooo`, the octal escape rsyslog uses: a record
/// cannot end its message early and forge a second one, nor reach a terminal as an escape
/// sequence. `#` itself stays as it is, as in rsyslog.
fn escape_controls(text: &str, out: &mut Vec<u8>) {
    for c in text.chars() {
        if c.is_control() && (c as u32) < 0x100 {
            out.extend_from_slice(format!("#{:03o}", c as u32).as_bytes());
        } else {
            let mut utf8 = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
        }
    }
}

/// A header field: printable ASCII without spaces, at most `max` characters, `-` if empty.
fn header_field(s: &str, max: usize) -> String {
    let cleaned: String = s
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(max)
        .collect();
    if cleaned.is_empty() {
        "-".into()
    } else {
        cleaned
    }
}

/// An SD-PARAM value (RFC 5424 §6.3.3): `"`, `\\` and `]` escaped, control characters as
/// `#ooo`.
fn sd_escape(s: &str) -> String {
    let escaped = s
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace(']', "\\]");
    let mut out = Vec::with_capacity(escaped.len());
    escape_controls(&escaped, &mut out);
    String::from_utf8(out).expect("escaping keeps UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn record(payload: &[u8]) -> Record {
        Record {
            session_id: 0,
            topic: "security/syslog".into(),
            seq: 42,
            time_us: 1_764_100_000_123_456,
            origin: None,
            late: false,
            payload: Bytes::copy_from_slice(payload),
        }
    }

    #[test]
    fn plain_records_become_local0_notice_from_diode() {
        let mut out = Vec::new();
        format_5424(&record(b"door opened"), "gw1", &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "<133>1 2025-11-25T19:46:40.123456Z gw1 diode - - [diode@32473 topic=\"security/syslog\" seq=\"42\"] door opened"
        );
    }

    fn from_syslog(payload: &[u8]) -> Record {
        Record {
            origin: Some(diode_wire::proto::Origin {
                protocol: "syslog".into(),
                ..Default::default()
            }),
            ..record(payload)
        }
    }

    /// The probe's injection: CR, LF, ESC and NUL went through as they were, and a second,
    /// forged syslog message reached the SIEM; and any JSON payload with `format` and `raw`
    /// keys set host, application and severity.
    #[test]
    fn control_characters_are_escaped_and_lookalike_payloads_set_nothing() {
        let mut out = Vec::new();
        let forged = b"ok\n<0>1 2025-01-01T00:00:00Z dc01 kernel - - - forged\x1b[2J\0\r";
        format_5424(&record(forged), "gw1", &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains(['\n', '\r', '\x1b', '\0']), "{text:?}");
        assert!(text
            .ends_with("ok#012<0>1 2025-01-01T00:00:00Z dc01 kernel - - - forged#033[2J#000#015"));
        let lookalike = br#"{"format":"rfc5424","facility":0,"severity":0,"host":"dc01","app":"kernel","message":"x","raw":"x"}"#;
        let mut out = Vec::new();
        format_5424(&record(lookalike), "gw1", &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("<133>1 2025-11-25T19:46:40.123456Z gw1 diode "),
            "{text}"
        );
        let mut out = Vec::new();
        let sneaky = Record {
            topic: "a\"] [x@1 y=\"\n".into(),
            ..from_syslog(b"{}")
        };
        format_5424(&sneaky, "gw1", &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(r##"topic="a\"\] [x@1 y=\"#012""##), "{text}");
    }

    #[test]
    fn syslog_records_keep_their_fields() {
        let json = br#"{"format":"rfc3164","facility":4,"severity":2,"timestamp":"Nov 25 22:55:01","host":"scada01","app":"sshd","procid":"4242","message":"Failed password","raw":"x"}"#;
        let mut out = Vec::new();
        format_5424(&from_syslog(json), "gw1", &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "<34>1 2025-11-25T19:46:40.123456Z scada01 sshd 4242 - [diode@32473 topic=\"security/syslog\" seq=\"42\"] Failed password"
        );
    }
}
