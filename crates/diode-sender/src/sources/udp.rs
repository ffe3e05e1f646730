//! The UDP source: one datagram is one record, from the devices in `allowed_peers`.

use bytes::Bytes;
use diode_common::config::default_usize;
use diode_common::config::ConfigError;
use serde::Deserialize;

use super::{Claim, Listening, Scope, Source, SourceContext, Started};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UdpConfig {
    pub listen: String,
    #[serde(default = "default_usize::<{ 4 << 20 }>")]
    pub receive_buffer_bytes: usize,
    /// Only datagrams from these peers (`ip` or `ip:port`) are taken; others are dropped,
    /// counted as `diode_source_errors_total{reason="peer"}`. Empty: any.
    #[serde(default)]
    pub allowed_peers: Vec<String>,
}

impl UdpConfig {
    pub fn check(&self, scope: &Scope<'_>) -> Result<UdpSource, ConfigError> {
        Ok(UdpSource {
            config: self.clone(),
            at: Listening::check(scope, &self.listen, &self.allowed_peers)?,
        })
    }
}

#[derive(Debug)]
pub struct UdpSource {
    config: UdpConfig,
    at: Listening,
}

impl Source for UdpSource {
    fn describe(&self) -> String {
        format!("udp {}, one datagram a record", self.config.listen)
    }

    fn claims(&self) -> Vec<Claim> {
        vec![Claim::listen("udp", &self.config.listen)]
    }

    fn start(&self, ctx: SourceContext) -> std::io::Result<Started> {
        let socket = super::bind_udp(self.at.listen, self.config.receive_buffer_bytes)?;
        Ok(Started {
            local_addr: socket.local_addr().ok(),
            task: super::run_datagrams(socket, self.at.peers.clone(), ctx, |datagram, _| {
                (Bytes::copy_from_slice(datagram), None)
            })?,
        })
    }
}
