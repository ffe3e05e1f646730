//! Reads the services' Prometheus metrics, as an operator's scraper would.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use prometheus_client::registry::Registry;

/// `GET /metrics` from a running service.
pub fn fetch(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: diode\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default())
}

/// The exposition text of an in-process registry.
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut text, registry);
    text
}

/// The sum of every series of metric `name` whose labels contain all of `labels`
/// (each `key="value"`).
pub fn sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    let wanted: Option<Vec<(&str, &str)>> = labels
        .iter()
        .map(|l| {
            let (key, value) = l.split_once('=')?;
            Some((key, value.strip_prefix('"')?.strip_suffix('"')?))
        })
        .collect();
    // A label not written `key="value"` matches no series.
    let Some(wanted) = wanted else {
        return 0.0;
    };
    diode_common::status::parse_exposition(text)
        .filter(|s| {
            s.name == name
                && wanted
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
        })
        .fold(0.0, |sum, s| sum + s.value)
}

#[cfg(test)]
mod tests {
    #[test]
    fn sums_series() {
        let text = "# HELP x\ndiode_records_out_total{topic=\"a\"} 3\ndiode_records_out_total{topic=\"b\"} 4\ndiode_link_up 1\n";
        assert_eq!(super::sum(text, "diode_records_out_total", &[]), 7.0);
        assert_eq!(
            super::sum(text, "diode_records_out_total", &["topic=\"b\""]),
            4.0
        );
        assert_eq!(super::sum(text, "diode_link_up", &[]), 1.0);
    }
}
