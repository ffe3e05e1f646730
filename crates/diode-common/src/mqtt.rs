//! MQTT connections, shared by the sender's MQTT source and the receiver's MQTT sink: one way to
//! name a broker, log in and set up TLS, checked when the configuration is loaded.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

use crate::config::{ConfigError, ConfigSource};

/// `tls = { ca_file = "...", cert_file = "...", key_file = "..." }`: the broker is checked against
/// `ca_file`; `cert_file` and `key_file` (PEM) log this client in with a certificate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttTls {
    pub ca_file: PathBuf,
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// What an MQTT client needs, as spelled in a source or sink table.
pub struct MqttClient<'a> {
    /// `host:port`.
    pub broker: &'a str,
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub password: Option<&'a str>,
    /// A file holding the password, so it can stay out of the configuration.
    pub password_file: Option<&'a PathBuf>,
    pub tls: Option<&'a MqttTls>,
    /// Off for a source: the broker keeps QoS 1 messages for us while we are away.
    pub clean_session: bool,
    pub max_packet_bytes: usize,
}

/// Builds the client options, or says which key is wrong; `prefix` is the table's key path
/// (`topic[2].source`).
pub fn options(
    source: &ConfigSource,
    prefix: &str,
    client: &MqttClient<'_>,
) -> Result<MqttOptions, ConfigError> {
    let key = |k: &str| format!("{prefix}.{k}");
    let (host, port) = split_host_port(client.broker).ok_or_else(|| {
        source.invalid(
            &key("broker"),
            format!("{:?} is not host:port", client.broker),
        )
    })?;
    if client.client_id.is_empty() || client.client_id.len() > 65_535 {
        return Err(source.invalid(&key("client_id"), "must be 1 to 65535 bytes"));
    }
    let mut options = MqttOptions::new(client.client_id, host, port);
    options
        .set_clean_session(client.clean_session)
        .set_keep_alive(Duration::from_secs(15))
        .set_max_packet_size(client.max_packet_bytes, client.max_packet_bytes);
    let password = match (client.password, client.password_file) {
        (Some(_), Some(_)) => {
            return Err(source.invalid(
                &key("password_file"),
                "set password or password_file, not both",
            ))
        }
        (Some(p), None) => Some(p.to_owned()),
        (None, Some(file)) => {
            let file = source.resolve(file);
            let text = crate::keyfile::read_secret(&file)
                .map_err(|e| source.invalid(&key("password_file"), e.to_string()))?;
            Some(text)
        }
        (None, None) => None,
    };
    match (client.username, password) {
        (Some(user), password) => {
            options.set_credentials(user, password.unwrap_or_default());
        }
        (None, Some(_)) => {
            return Err(source.invalid(&key("username"), "a password needs a username"));
        }
        (None, None) => {}
    }
    if let Some(tls) = client.tls {
        let config = tls_config(source, &key("tls"), tls)?;
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(config),
        )));
    }
    Ok(options)
}

fn tls_config(
    source: &ConfigSource,
    prefix: &str,
    tls: &MqttTls,
) -> Result<rustls::ClientConfig, ConfigError> {
    let key = |k: &str| format!("{prefix}.{k}");
    let pem_error = |k: &str, path: &PathBuf, e: &dyn std::fmt::Display| {
        source.invalid(&key(k), format!("{}: {e}", path.display()))
    };
    let ca_path = source.resolve(&tls.ca_file);
    let mut roots = rustls::RootCertStore::empty();
    let cas = CertificateDer::pem_file_iter(&ca_path)
        .map_err(|e| pem_error("ca_file", &ca_path, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error("ca_file", &ca_path, &e))?;
    if cas.is_empty() {
        return Err(pem_error("ca_file", &ca_path, &"no certificate in it"));
    }
    for ca in cas {
        roots
            .add(ca)
            .map_err(|e| pem_error("ca_file", &ca_path, &e))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| source.invalid(prefix, e.to_string()))?
    .with_root_certificates(roots);
    match (&tls.cert_file, &tls.key_file) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(cert), Some(private)) => {
            let cert = source.resolve(cert);
            let private = source.resolve(private);
            let chain = CertificateDer::pem_file_iter(&cert)
                .map_err(|e| pem_error("cert_file", &cert, &e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| pem_error("cert_file", &cert, &e))?;
            let private_key = PrivateKeyDer::from_pem_file(&private)
                .map_err(|e| pem_error("key_file", &private, &e))?;
            builder
                .with_client_auth_cert(chain, private_key)
                .map_err(|e| pem_error("key_file", &private, &e))
        }
        _ => Err(source.invalid(
            &key("cert_file"),
            "a client certificate needs both cert_file and key_file",
        )),
    }
}

/// `tls = { cert_file = "...", key_file = "..." }` of a server (the embedded broker): its
/// certificate chain and private key, PEM. The key file is a secret: the service's own, mode 0600.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// The server side of TLS for a listener, checked at load; `prefix` is the table's key path.
pub fn server_tls_config(
    source: &ConfigSource,
    prefix: &str,
    tls: &ServerTls,
) -> Result<Arc<rustls::ServerConfig>, ConfigError> {
    let key = |k: &str| format!("{prefix}.{k}");
    let cert = source.resolve(&tls.cert_file);
    let chain = CertificateDer::pem_file_iter(&cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| source.invalid(&key("cert_file"), format!("{}: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(source.invalid(
            &key("cert_file"),
            format!("{}: no certificate in it", cert.display()),
        ));
    }
    let private = source.resolve(&tls.key_file);
    let text = crate::keyfile::read_secret(&private)
        .map_err(|e| source.invalid(&key("key_file"), e.to_string()))?;
    let private_key = PrivateKeyDer::from_pem_slice(text.as_bytes())
        .map_err(|e| source.invalid(&key("key_file"), format!("{}: {e}", private.display())))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| source.invalid(prefix, e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(chain, private_key)
    .map_err(|e| source.invalid(&key("key_file"), e.to_string()))?;
    Ok(Arc::new(config))
}

/// The largest MQTT packet a record of `max_record_bytes` can need: its payload, a topic of at
/// most 65,535 bytes with its length, the fixed header and a packet id.
pub fn max_packet_bytes(max_record_bytes: usize) -> usize {
    max_record_bytes + 65_536 + 16
}

/// `host:port` or `[v6]:port`, without resolving the host: the client resolves it at each
/// connection attempt, so a broker that moves is found again.
pub fn split_host_port(broker: &str) -> Option<(String, u16)> {
    let (host, port) = broker.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    (!host.is_empty() && !host.contains(':') || host.contains(':') && broker.starts_with('['))
        .then(|| (host.to_owned(), port))
}

/// Delay before the next connection attempt: doubling from 100 ms to 10 s.
pub fn next_backoff(current: Duration) -> Duration {
    (current * 2).clamp(Duration::from_millis(100), Duration::from_secs(10))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brokers_are_host_and_port() {
        assert_eq!(
            split_host_port("127.0.0.1:1883"),
            Some(("127.0.0.1".into(), 1883))
        );
        assert_eq!(
            split_host_port("broker.plant:8883"),
            Some(("broker.plant".into(), 8883))
        );
        assert_eq!(split_host_port("[::1]:1883"), Some(("::1".into(), 1883)));
        assert_eq!(split_host_port("::1:1883"), None);
        assert_eq!(split_host_port("broker"), None);
        assert_eq!(split_host_port(":1883"), None);
        assert_eq!(split_host_port("host:99999"), None);
    }

    #[test]
    fn a_missing_ca_file_is_a_config_error_naming_the_key() {
        let source = ConfigSource::from_text("/etc/diode/s.toml", "[[topic]]\nname = \"x\"\n");
        let tls = MqttTls {
            ca_file: "/nonexistent/ca.pem".into(),
            cert_file: None,
            key_file: None,
        };
        let err = options(
            &source,
            "topic[0].source",
            &MqttClient {
                broker: "127.0.0.1:8883",
                client_id: "c",
                username: None,
                password: None,
                password_file: None,
                tls: Some(&tls),
                clean_session: false,
                max_packet_bytes: 1 << 20,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("topic[0].source.tls.ca_file"), "{err}");
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }
}
