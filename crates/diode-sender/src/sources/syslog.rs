//! The syslog source: RFC 5424 and RFC 3164 messages over UDP, or TCP with octet counting or
//! newline framing (RFC 6587), each carried as one JSON record with its parsed fields and the
//! original text. A message that does not parse passes through as its raw text, counted
//! (`diode_source_unparsed_records_total`).

use bytes::{Buf, Bytes, BytesMut};
use diode_common::config::{default_usize, ConfigError};
use diode_common::unix_time_us;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::{emit, Claim, ConnectionError, Listening, Scope, Source, SourceContext, Started};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyslogConfig {
    pub listen: String,
    #[serde(default)]
    pub protocol: SyslogProtocol,
    #[serde(default = "default_usize::<16>")]
    pub max_connections: usize,
    /// As for `tcp`: the devices allowed to send.
    #[serde(default)]
    pub allowed_peers: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyslogProtocol {
    #[default]
    Udp,
    Tcp,
}

impl SyslogProtocol {
    fn name(self) -> &'static str {
        match self {
            SyslogProtocol::Udp => "udp",
            SyslogProtocol::Tcp => "tcp",
        }
    }
}

/// A syslog UDP socket's receive buffer: bursts of a chatty firewall fit in it.
const UDP_RECEIVE_BUFFER_BYTES: usize = 4 << 20;

impl SyslogConfig {
    pub fn check(&self, scope: &Scope<'_>) -> Result<SyslogSource, ConfigError> {
        super::check_max_connections(scope, self.max_connections)?;
        Ok(SyslogSource {
            config: self.clone(),
            at: Listening::check(scope, &self.listen, &self.allowed_peers)?,
        })
    }
}

#[derive(Debug)]
pub struct SyslogSource {
    config: SyslogConfig,
    at: Listening,
}

impl Source for SyslogSource {
    fn describe(&self) -> String {
        format!(
            "syslog over {} {}, rfc 5424 and 3164",
            self.config.protocol.name(),
            self.config.listen
        )
    }

    fn claims(&self) -> Vec<Claim> {
        vec![Claim::listen(
            self.config.protocol.name(),
            &self.config.listen,
        )]
    }

    fn start(&self, ctx: SourceContext) -> std::io::Result<Started> {
        let peers = self.at.peers.clone();
        match self.config.protocol {
            SyslogProtocol::Udp => {
                let socket = super::bind_udp(self.at.listen, UDP_RECEIVE_BUFFER_BYTES)?;
                Ok(Started {
                    local_addr: socket.local_addr().ok(),
                    task: super::run_datagrams(socket, peers, ctx, |raw, ctx| {
                        let (record, parsed) = to_record(raw);
                        if !parsed {
                            ctx.metrics.unparsed.inc();
                        }
                        (record, parsed.then(origin))
                    })?,
                })
            }
            SyslogProtocol::Tcp => {
                let listener = super::bind_tcp(self.at.listen)?;
                Ok(Started {
                    local_addr: listener.local_addr().ok(),
                    task: Box::pin(super::run_listener(
                        listener,
                        self.config.max_connections,
                        peers,
                        ctx,
                        |stream, ctx| async move { read_messages(stream, &ctx).await },
                    )),
                })
            }
        }
    }
}

async fn read_messages(mut stream: TcpStream, ctx: &SourceContext) -> Result<(), ConnectionError> {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut frames = TcpFramer::new(ctx.max_record_bytes);
    loop {
        let read = stream.read_buf(&mut buf).await.inspect_err(|_| {
            ctx.metrics.errors_io.inc();
        })?;
        let eof = read == 0;
        while let Some(frame) = frames.next(&mut buf, eof) {
            match frame {
                Frame::Message(raw) => {
                    let (record, parsed) = to_record(&raw);
                    if !parsed {
                        ctx.metrics.unparsed.inc();
                    }
                    emit(ctx, unix_time_us(), parsed.then(origin), record).await?;
                }
                Frame::Oversize { fatal } => {
                    ctx.metrics.dropped_oversize.inc();
                    if fatal {
                        ctx.metrics.errors_framing.inc();
                        return Err(ConnectionError::Framing(
                            "syslog octet count is malformed or above max_record_bytes".into(),
                        ));
                    }
                }
            }
        }
        if eof {
            return Ok(());
        }
    }
}

/// The fields of a parsed message; `-` (nil) fields of RFC 5424 are left out.
#[derive(Debug, Serialize, PartialEq)]
pub struct Message<'a> {
    pub format: &'static str,
    pub facility: u8,
    pub severity: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub procid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub msgid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub structured_data: Option<&'a str>,
    pub message: &'a str,
    pub raw: &'a str,
}

/// The origin of a record the syslog source parsed: the syslog sink takes facility, severity,
/// host and application from such records only, never from a payload that merely looks alike.
pub fn origin() -> diode_wire::proto::Origin {
    diode_wire::proto::Origin {
        protocol: "syslog".to_owned(),
        ..Default::default()
    }
}

/// The record for one message: JSON when it parses, else the raw bytes and `false`.
pub fn to_record(raw: &[u8]) -> (Bytes, bool) {
    let trimmed = trim_end(raw);
    match std::str::from_utf8(trimmed).ok().and_then(parse) {
        Some(message) => (
            Bytes::from(serde_json::to_vec(&message).expect("strings serialise")),
            true,
        ),
        None => (Bytes::copy_from_slice(trimmed), false),
    }
}

fn trim_end(raw: &[u8]) -> &[u8] {
    let mut end = raw.len();
    while end > 0 && matches!(raw[end - 1], b'\n' | b'\r' | 0) {
        end -= 1;
    }
    &raw[..end]
}

pub fn parse(raw: &str) -> Option<Message<'_>> {
    let rest = raw.strip_prefix('<')?;
    let close = rest.find('>')?;
    if close == 0 || close > 3 {
        return None;
    }
    let pri: u8 = rest[..close].parse().ok().filter(|p| *p <= 191)?;
    let rest = &rest[close + 1..];
    let (facility, severity) = (pri / 8, pri % 8);
    if let Some(after_version) = rest.strip_prefix("1 ") {
        return parse_5424(raw, facility, severity, after_version);
    }
    parse_3164(raw, facility, severity, rest)
}

/// `TIMESTAMP HOSTNAME APP-NAME PROCID MSGID STRUCTURED-DATA [MSG]` (RFC 5424 §6).
fn parse_5424<'a>(raw: &'a str, facility: u8, severity: u8, rest: &'a str) -> Option<Message<'a>> {
    let mut fields = rest.splitn(5, ' ');
    let nil = |s: &'a str| (s != "-").then_some(s);
    let timestamp = nil(fields.next()?);
    let host = nil(fields.next()?);
    let app = nil(fields.next()?);
    let procid = nil(fields.next()?);
    let rest = fields.next()?;
    let (msgid, rest) = rest.split_once(' ').unwrap_or((rest, ""));
    let (structured_data, message) = if let Some(after) = rest.strip_prefix('-') {
        (None, after)
    } else if rest.starts_with('[') {
        let end = structured_data_end(rest)?;
        (Some(&rest[..end]), &rest[end..])
    } else {
        return None;
    };
    let message = message.strip_prefix(' ').unwrap_or(message);
    let message = message.strip_prefix('\u{feff}').unwrap_or(message);
    Some(Message {
        format: "rfc5424",
        facility,
        severity,
        timestamp,
        host,
        app,
        procid,
        msgid: nil(msgid),
        structured_data,
        message,
        raw,
    })
}

/// The end of one or more `[...]` elements, minding quoted values with `\]` escapes.
fn structured_data_end(s: &str) -> Option<usize> {
    let bytes = s.as_bytes();
    let mut i = 0;
    while bytes.get(i) == Some(&b'[') {
        let mut quoted = false;
        i += 1;
        loop {
            match *bytes.get(i)? {
                b'\\' if quoted => i += 1,
                b'"' => quoted = !quoted,
                b']' if !quoted => break,
                _ => {}
            }
            i += 1;
        }
        i += 1;
    }
    Some(i)
}

/// `Mmm dd hh:mm:ss HOSTNAME TAG[PID]: MSG` (RFC 3164 §4.1), leniently: senders vary.
fn parse_3164<'a>(raw: &'a str, facility: u8, severity: u8, rest: &'a str) -> Option<Message<'a>> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let timestamp = rest.get(..15)?;
    let b = timestamp.as_bytes();
    let valid_time = timestamp.get(..3).is_some_and(|m| MONTHS.contains(&m))
        && b[3] == b' '
        && (b[4] == b' ' || b[4].is_ascii_digit())
        && b[5].is_ascii_digit()
        && b[6] == b' '
        && b[9] == b':'
        && b[12] == b':'
        && [7, 8, 10, 11, 13, 14]
            .iter()
            .all(|&i| b[i].is_ascii_digit());
    if !valid_time {
        return None;
    }
    let rest = rest[15..].strip_prefix(' ')?;
    let (host, rest) = rest.split_once(' ').unwrap_or((rest, ""));
    // The tag is the leading run of characters up to `[`, `:` or a space.
    let tag_end = rest.find(['[', ':', ' ']).unwrap_or(rest.len());
    let (app, mut message) = rest.split_at(tag_end);
    let mut procid = None;
    if let Some(after) = message.strip_prefix('[') {
        let close = after.find(']')?;
        procid = Some(&after[..close]);
        message = &after[close + 1..];
    }
    let message = message.strip_prefix(':').unwrap_or(message);
    let message = message.strip_prefix(' ').unwrap_or(message);
    Some(Message {
        format: "rfc3164",
        facility,
        severity,
        timestamp: Some(timestamp),
        host: (!host.is_empty()).then_some(host),
        app: (!app.is_empty()).then_some(app),
        procid,
        msgid: None,
        structured_data: None,
        message,
        raw,
    })
}

#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Message(Bytes),
    /// A message above the size limit: skipped (newline framing) or the stream is given up
    /// (octet counting, where it cannot be resynchronised).
    Oversize {
        fatal: bool,
    },
}

/// Cuts syslog messages from a TCP stream (RFC 6587): a frame that starts with a digit is
/// `LEN SP MSG` (octet counting), anything else ends at a newline.
pub struct TcpFramer {
    max: usize,
    discarding: bool,
}

impl TcpFramer {
    pub fn new(max: usize) -> Self {
        TcpFramer {
            max,
            discarding: false,
        }
    }

    pub fn next(&mut self, buf: &mut BytesMut, eof: bool) -> Option<Frame> {
        loop {
            if buf.is_empty() {
                return None;
            }
            if !self.discarding && buf[0].is_ascii_digit() {
                let digits = buf.iter().take_while(|b| b.is_ascii_digit()).count();
                if digits == buf.len() && digits < 10 && !eof {
                    return None;
                }
                if digits >= 10 || buf.get(digits) != Some(&b' ') {
                    return Some(Frame::Oversize { fatal: true });
                }
                let len: usize = std::str::from_utf8(&buf[..digits])
                    .expect("digits")
                    .parse()
                    .expect("fewer than 10 digits");
                if len > self.max {
                    return Some(Frame::Oversize { fatal: true });
                }
                if buf.len() < digits + 1 + len {
                    if eof {
                        buf.clear();
                    }
                    return None;
                }
                buf.advance(digits + 1);
                return Some(Frame::Message(buf.split_to(len).freeze()));
            }
            match buf.iter().position(|&b| b == b'\n') {
                Some(pos) => {
                    let line = buf.split_to(pos + 1);
                    if std::mem::take(&mut self.discarding) {
                        continue;
                    }
                    if line.len() > self.max + 1 {
                        return Some(Frame::Oversize { fatal: false });
                    }
                    if trim_end(&line).is_empty() {
                        continue;
                    }
                    return Some(Frame::Message(line.freeze()));
                }
                None if buf.len() > self.max => {
                    buf.clear();
                    if !std::mem::replace(&mut self.discarding, true) {
                        return Some(Frame::Oversize { fatal: false });
                    }
                    return None;
                }
                None if eof => {
                    let line = buf.split().freeze();
                    return (!std::mem::take(&mut self.discarding)).then_some(Frame::Message(line));
                }
                None => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc5424_with_structured_data() {
        let raw = r#"<165>1 2026-11-25T22:14:15.003Z plc-gw.plant evtlog 1234 ID47 [exampleSDID@32473 iut="3" eventSource="App\]x"][b@1 c="d"] BOMless message here"#;
        let m = parse(raw).unwrap();
        assert_eq!(m.format, "rfc5424");
        assert_eq!((m.facility, m.severity), (20, 5));
        assert_eq!(m.timestamp, Some("2026-11-25T22:14:15.003Z"));
        assert_eq!(m.host, Some("plc-gw.plant"));
        assert_eq!(m.app, Some("evtlog"));
        assert_eq!(m.procid, Some("1234"));
        assert_eq!(m.msgid, Some("ID47"));
        assert_eq!(
            m.structured_data,
            Some(r#"[exampleSDID@32473 iut="3" eventSource="App\]x"][b@1 c="d"]"#)
        );
        assert_eq!(m.message, "BOMless message here");
    }

    #[test]
    fn rfc5424_with_nil_fields() {
        let m = parse("<14>1 - - - - - -").unwrap();
        assert_eq!((m.facility, m.severity), (1, 6));
        assert_eq!(m.host, None);
        assert_eq!(m.message, "");
        let m = parse("<14>1 2026-11-25T22:14:15Z host app - - - \u{feff}hello").unwrap();
        assert_eq!(m.message, "hello");
    }

    #[test]
    fn rfc3164_as_logger_and_devices_send_it() {
        let m = parse("<13>Nov 25 22:55:01 scada01 sshd[4242]: Accepted publickey for op").unwrap();
        assert_eq!(m.format, "rfc3164");
        assert_eq!((m.facility, m.severity), (1, 5));
        assert_eq!(m.timestamp, Some("Nov 25 22:55:01"));
        assert_eq!(m.host, Some("scada01"));
        assert_eq!(m.app, Some("sshd"));
        assert_eq!(m.procid, Some("4242"));
        assert_eq!(m.message, "Accepted publickey for op");
        let m = parse("<34>Oct  1 02:03:04 fw1 kernel: DROP IN=eth0").unwrap();
        assert_eq!(m.app, Some("kernel"));
        assert_eq!(m.message, "DROP IN=eth0");
    }

    #[test]
    fn what_does_not_parse_passes_raw() {
        for raw in [
            &b"no priority here"[..],
            b"<999>1 x",
            b"<13>yesterday host app: hi",
            b"<13>1 2026-11-25T22:14:15Z host app - - [unclosed",
            b"\xff\xfe binary",
            // Multi-byte characters where a timestamp's month would be (found by reading).
            "<13>\u{e9}\u{e9}abcdefghijk host app: x".as_bytes(),
        ] {
            let (record, parsed) = to_record(raw);
            assert!(!parsed, "{raw:?}");
            assert_eq!(&record[..], trim_end(raw));
        }
        let (record, parsed) = to_record(b"<13>1 - h a - - - x\n");
        assert!(parsed);
        let json: serde_json::Value = serde_json::from_slice(&record).unwrap();
        assert_eq!(json["raw"], "<13>1 - h a - - - x");
    }

    #[test]
    fn tcp_framing_octet_counting_and_newlines() {
        let mut framer = TcpFramer::new(100);
        let mut buf = BytesMut::from(&b"11 <13>1 - - -<14>Oct  1 02:03:04 h a: x\n5 ab"[..]);
        assert_eq!(
            framer.next(&mut buf, false),
            Some(Frame::Message(Bytes::from_static(b"<13>1 - - -")))
        );
        assert_eq!(
            framer.next(&mut buf, false),
            Some(Frame::Message(Bytes::from_static(
                b"<14>Oct  1 02:03:04 h a: x\n"
            )))
        );
        assert_eq!(framer.next(&mut buf, false), None);
        buf.extend_from_slice(b"cde");
        assert_eq!(
            framer.next(&mut buf, false),
            Some(Frame::Message(Bytes::from_static(b"abcde")))
        );
        let mut buf = BytesMut::from(&b"999 x"[..]);
        assert_eq!(
            framer.next(&mut buf, false),
            Some(Frame::Oversize { fatal: true })
        );
    }
}
