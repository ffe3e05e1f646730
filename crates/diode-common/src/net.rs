//! UDP sockets sized for bursts, and the kernel's count of datagrams it dropped.

use std::net::{SocketAddr, UdpSocket};

use socket2::{Domain, Protocol, Socket, Type};

/// Which buffer of a socket.
#[derive(Debug, Clone, Copy)]
pub enum Buffer {
    Receive,
    Send,
}

/// A blocking UDP socket bound to `addr`, with the buffer asked for. When the kernel caps the
/// buffer below the request, the warning names the sysctl to raise: a short receive buffer is the
/// first cause of loss on a diode's receiving host.
pub fn udp_socket(addr: SocketAddr, buffer: Buffer, bytes: usize) -> std::io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    let (sysctl, granted) = match buffer {
        Buffer::Receive => {
            let _ = socket.set_recv_buffer_size(bytes);
            ("net.core.rmem_max", socket.recv_buffer_size()?)
        }
        Buffer::Send => {
            let _ = socket.set_send_buffer_size(bytes);
            ("net.core.wmem_max", socket.send_buffer_size()?)
        }
    };
    // Linux reports twice what it grants, for its own bookkeeping.
    let effective = if cfg!(target_os = "linux") {
        granted / 2
    } else {
        granted
    };
    if effective < bytes {
        tracing::warn!(
            asked_bytes = bytes,
            granted_bytes = effective,
            "the kernel capped the UDP {} buffer; raise it with `sysctl -w {sysctl}={bytes}` \
             (see deploy/ for a sysctl drop-in)",
            match buffer {
                Buffer::Receive => "receive",
                Buffer::Send => "send",
            }
        );
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// The host's `Udp: RcvbufErrors` from /proc/net/snmp: datagrams the kernel dropped because a
/// socket's receive buffer was full. `None` where the file is not available.
pub fn udp_rcvbuf_errors() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    parse_rcvbuf_errors(&snmp)
}

fn parse_rcvbuf_errors(snmp: &str) -> Option<u64> {
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let names = udp.next()?;
    let values = udp.next()?;
    let index = names.split_whitespace().position(|n| n == "RcvbufErrors")?;
    values.split_whitespace().nth(index)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_snmp() {
        let text = "Ip: Forwarding\nIp: 1\nUdp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\nUdp: 10 0 3 20 7 0\nUdpLite: InDatagrams\nUdpLite: 0\n";
        assert_eq!(parse_rcvbuf_errors(text), Some(7));
    }

    #[test]
    fn binds_with_a_buffer() {
        let socket = udp_socket("127.0.0.1:0".parse().unwrap(), Buffer::Receive, 1 << 20).unwrap();
        assert!(socket.local_addr().unwrap().port() > 0);
    }
}

/// One entry of an allow-list of peers: an IP address, with or without a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceFilter {
    ip: std::net::IpAddr,
    port: Option<u16>,
}

impl SourceFilter {
    pub fn matches(&self, peer: SocketAddr) -> bool {
        // IPv4 peers of a dual-stack socket show as v4-mapped IPv6 addresses.
        let ip = match peer.ip() {
            std::net::IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
            v4 => v4,
        };
        ip == self.ip && self.port.is_none_or(|p| p == peer.port())
    }

    /// Whether `peer` is allowed by `filters` (an empty list allows everyone).
    pub fn allows(filters: &[SourceFilter], peer: SocketAddr) -> bool {
        filters.is_empty() || filters.iter().any(|f| f.matches(peer))
    }
}

impl std::str::FromStr for SourceFilter {
    type Err = std::net::AddrParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.parse::<SocketAddr>() {
            Ok(addr) => Ok(SourceFilter {
                ip: addr.ip(),
                port: Some(addr.port()),
            }),
            Err(_) => Ok(SourceFilter {
                ip: text.parse()?,
                port: None,
            }),
        }
    }
}

#[cfg(test)]
mod source_filter_tests {
    use super::*;

    #[test]
    fn addresses_with_and_without_ports() {
        let any_port: SourceFilter = "10.1.2.3".parse().unwrap();
        let one_port: SourceFilter = "10.1.2.3:5000".parse().unwrap();
        let peer: SocketAddr = "10.1.2.3:5000".parse().unwrap();
        let other: SocketAddr = "10.1.2.3:5001".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:5000".parse().unwrap();
        assert!(any_port.matches(peer) && any_port.matches(other) && any_port.matches(mapped));
        assert!(one_port.matches(peer) && !one_port.matches(other));
        assert!(!any_port.matches("10.1.2.4:5000".parse().unwrap()));
        assert!(SourceFilter::allows(&[], peer));
        assert!("10.1.2".parse::<SourceFilter>().is_err());
    }
}
