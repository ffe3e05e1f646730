//! The TCP source: a listener whose connections are cut into records by `framing`: lines,
//! length-prefixed records, or a raw byte stream (then one connection at a time, in order).

use bytes::{Buf, Bytes, BytesMut};
use diode_common::config::{default_usize, ConfigError, Framing};
use diode_common::unix_time_us;
use serde::Deserialize;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::{emit, Claim, ConnectionError, Listening, Scope, Source, SourceContext, Started};

/// Chunk size read from a raw TCP stream: one record per read of up to this many bytes.
const RAW_CHUNK_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpConfig {
    pub listen: String,
    #[serde(default)]
    pub framing: Framing,
    #[serde(default = "default_usize::<16>")]
    pub max_connections: usize,
    /// Only these peers (`ip` or `ip:port`) may connect; others are refused, counted as
    /// `diode_source_errors_total{reason="peer"}`. Empty: any.
    #[serde(default)]
    pub allowed_peers: Vec<String>,
}

impl TcpConfig {
    pub fn check(&self, scope: &Scope<'_>) -> Result<TcpSource, ConfigError> {
        super::check_max_connections(scope, self.max_connections)?;
        Ok(TcpSource {
            config: self.clone(),
            at: Listening::check(scope, &self.listen, &self.allowed_peers)?,
        })
    }
}

#[derive(Debug)]
pub struct TcpSource {
    config: TcpConfig,
    at: Listening,
}

impl Source for TcpSource {
    fn describe(&self) -> String {
        format!(
            "tcp {}, framing {:?}",
            self.config.listen, self.config.framing
        )
        .to_lowercase()
    }

    fn claims(&self) -> Vec<Claim> {
        vec![Claim::listen("tcp", &self.config.listen)]
    }

    fn start(&self, ctx: SourceContext) -> std::io::Result<Started> {
        let listener = super::bind_tcp(self.at.listen)?;
        let framing = self.config.framing;
        // A raw stream is one ordered byte stream: one connection at a time.
        let max_connections = if framing == Framing::Raw {
            1
        } else {
            self.config.max_connections
        };
        Ok(Started {
            local_addr: listener.local_addr().ok(),
            task: Box::pin(super::run_listener(
                listener,
                max_connections,
                self.at.peers.clone(),
                ctx,
                move |stream, ctx| async move { read_records(stream, framing, &ctx).await },
            )),
        })
    }
}

async fn read_records(
    mut stream: TcpStream,
    framing: Framing,
    ctx: &SourceContext,
) -> Result<(), ConnectionError> {
    let mut buf = BytesMut::with_capacity(RAW_CHUNK_BYTES);
    let mut lines = LineCutter::new(ctx.max_record_bytes);
    loop {
        if framing == Framing::Raw {
            buf.reserve(RAW_CHUNK_BYTES);
        }
        let read = stream.read_buf(&mut buf).await.inspect_err(|_| {
            ctx.metrics.errors_io.inc();
        })?;
        let eof = read == 0;
        match framing {
            Framing::Raw => {
                if !buf.is_empty() {
                    emit(ctx, unix_time_us(), None, buf.split().freeze()).await?;
                }
            }
            Framing::Lines => {
                while let Some(cut) = lines.next(&mut buf, eof) {
                    match cut {
                        Cut::Record(line) => emit(ctx, unix_time_us(), None, line).await?,
                        Cut::Oversize => {
                            ctx.metrics.dropped_oversize.inc();
                        }
                    }
                }
            }
            Framing::Length => loop {
                if buf.len() < 4 {
                    break;
                }
                let len = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
                if len > ctx.max_record_bytes {
                    ctx.metrics.dropped_oversize.inc();
                    ctx.metrics.errors_framing.inc();
                    return Err(ConnectionError::Framing(format!(
                        "length prefix {len} is above max_record_bytes"
                    )));
                }
                if buf.len() < 4 + len {
                    buf.reserve(4 + len - buf.len());
                    break;
                }
                buf.advance(4);
                emit(ctx, unix_time_us(), None, buf.split_to(len).freeze()).await?;
            },
        }
        if eof {
            if framing == Framing::Length && !buf.is_empty() {
                ctx.metrics.errors_framing.inc();
            }
            return Ok(());
        }
    }
}

enum Cut {
    Record(Bytes),
    Oversize,
}

/// Cuts lines out of a stream; a line longer than the limit is dropped whole, counted once.
struct LineCutter {
    max: usize,
    scanned: usize,
    discarding: bool,
}

impl LineCutter {
    fn new(max: usize) -> Self {
        LineCutter {
            max,
            scanned: 0,
            discarding: false,
        }
    }

    fn next(&mut self, buf: &mut BytesMut, eof: bool) -> Option<Cut> {
        loop {
            if let Some(pos) = buf[self.scanned..].iter().position(|&b| b == b'\n') {
                let mut line = buf.split_to(self.scanned + pos + 1);
                self.scanned = 0;
                line.truncate(line.len() - 1);
                if line.last() == Some(&b'\r') {
                    line.truncate(line.len() - 1);
                }
                if std::mem::take(&mut self.discarding) {
                    continue;
                }
                if line.len() > self.max {
                    return Some(Cut::Oversize);
                }
                return Some(Cut::Record(line.freeze()));
            }
            self.scanned = buf.len();
            if buf.len() > self.max {
                buf.clear();
                self.scanned = 0;
                if !std::mem::replace(&mut self.discarding, true) {
                    return Some(Cut::Oversize);
                }
                return None;
            }
            if eof && !buf.is_empty() {
                // A last line without a terminator is still a line.
                self.scanned = 0;
                let line = buf.split().freeze();
                return (!std::mem::take(&mut self.discarding)).then_some(Cut::Record(line));
            }
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut_all(input: &[&[u8]], max: usize) -> Vec<Result<Vec<u8>, ()>> {
        let mut cutter = LineCutter::new(max);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for (i, chunk) in input.iter().enumerate() {
            buf.extend_from_slice(chunk);
            let eof = i + 1 == input.len();
            while let Some(cut) = cutter.next(&mut buf, eof) {
                out.push(match cut {
                    Cut::Record(b) => Ok(b.to_vec()),
                    Cut::Oversize => Err(()),
                });
            }
        }
        out
    }

    #[test]
    fn lines_across_reads_crlf_and_last_line() {
        let out = cut_all(&[b"ab", b"c\r\nde\n\nf", b"g"], 100);
        assert_eq!(
            out,
            vec![
                Ok(b"abc".to_vec()),
                Ok(b"de".to_vec()),
                Ok(vec![]),
                Ok(b"fg".to_vec())
            ]
        );
    }

    #[test]
    fn an_oversize_line_is_dropped_whole_and_counted_once() {
        let out = cut_all(&[b"ok\n0123456789", b"0123456789", b"0123\nnext\n", b""], 8);
        assert_eq!(out, vec![Ok(b"ok".to_vec()), Err(()), Ok(b"next".to_vec())]);
    }
}
