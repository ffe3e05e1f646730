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
