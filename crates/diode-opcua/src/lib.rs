//! The OPC UA records both services share (docs/opcua.md): what the sender's `opcua` source
//! sends and the receiver's `opcua_server` sink mirrors. They are JSON, so the same records go
//! to MQTT, Kafka or files unchanged; values follow OPC UA Part 14's reversible encoding where
//! it fits (`variant`), and every record names its endpoint and each value its node and path, so
//! one record means something on its own.

pub mod message;
pub mod variant;

pub use message::{Change, Data, Message, NodeClass, NodeEntry, Nodes, Status};
pub use variant::VariantError;

/// The OPC UA types, as both services see them.
pub use opcua::types as ua;

/// Makes every certificate an administrator put in `pki_dir/trusted/` (DER, any file name)
/// trusted by async-opcua, which looks a certificate up by one exact file name
/// (`<common name> [<thumbprint>].der`): a copy under that name is added beside it. Returns how
/// many were added; files that are not certificates are left alone.
pub fn adopt_trusted_certificates(pki_dir: &std::path::Path) -> usize {
    use opcua::crypto::CertificateStore;
    let trusted = pki_dir.join("trusted");
    let Ok(entries) = std::fs::read_dir(&trusted) else {
        return 0;
    };
    let mut added = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        if !path.is_file() {
            continue;
        }
        let Ok(cert) = CertificateStore::read_cert(&path) else {
            continue;
        };
        let canonical = trusted.join(CertificateStore::cert_file_name(&cert));
        if canonical != path && !canonical.exists() && std::fs::copy(&path, &canonical).is_ok() {
            added += 1;
        }
    }
    added
}
