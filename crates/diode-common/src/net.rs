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
