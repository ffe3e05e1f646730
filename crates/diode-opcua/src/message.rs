//! The three records of an OPC UA topic (docs/opcua.md): data changes, the browsed node set, and
//! the source's connection state. Unknown fields are ignored, so a newer sender's records still
//! mirror on an older receiver.

use std::str::FromStr;

use opcua::types::{DataValue, DateTime, StatusCode};
use serde::{Deserialize, Serialize};

use crate::variant::{self, time_text, VariantError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "MessageType")]
pub enum Message {
    #[serde(rename = "diode-opcua-data")]
    Data(Data),
    #[serde(rename = "diode-opcua-nodes")]
    Nodes(Nodes),
    #[serde(rename = "diode-opcua-status")]
    Status(Status),
}

impl Message {
    pub fn parse(payload: &[u8]) -> Result<Message, serde_json::Error> {
        serde_json::from_slice(payload)
    }

    pub fn to_vec(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("plain data serialises")
    }
}

/// Data changes, in the order the server published them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Data {
    pub endpoint: String,
    pub changes: Vec<Change>,
}

/// One data change: Part 14's DataValue fields beside the node it is of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Change {
    /// As the plant server names it (`ns=2;s=Line3.Temp`).
    pub node_id: String,
    /// Browse names from the browse root to the node.
    pub path: Vec<String>,
    /// The value ([`variant::to_json`]), null when the server sent none.
    #[serde(default)]
    pub value: serde_json::Value,
    /// The status code; absent when Good (0), as in Part 14.
    #[serde(default, skip_serializing_if = "is_good")]
    pub status: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_timestamp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_timestamp: Option<String>,
}

fn is_good(status: &u32) -> bool {
    *status == 0
}

/// Why a change does not make a DataValue.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("value: {0}")]
    Value(#[from] VariantError),
    #[error("timestamp {0:?} is not RFC 3339")]
    Timestamp(String),
}

impl Change {
    pub fn new(node_id: String, path: Vec<String>, value: &DataValue) -> Change {
        Change {
            node_id,
            path,
            value: value
                .value
                .as_ref()
                .map_or(serde_json::Value::Null, variant::to_json),
            status: value.status.map_or(0, |s| s.bits()),
            source_timestamp: value.source_timestamp.as_ref().map(time_text),
            server_timestamp: value.server_timestamp.as_ref().map(time_text),
        }
    }

    pub fn data_value(&self) -> Result<DataValue, ChangeError> {
        let time = |text: &Option<String>| -> Result<Option<DateTime>, ChangeError> {
            text.as_deref()
                .map(|t| DateTime::from_str(t).map_err(|_| ChangeError::Timestamp(t.to_owned())))
                .transpose()
        };
        let value = variant::from_json(&self.value)?;
        Ok(DataValue {
            value: (!value.is_empty()).then_some(value),
            status: Some(StatusCode::from(self.status)),
            source_timestamp: time(&self.source_timestamp)?,
            source_picoseconds: None,
            server_timestamp: time(&self.server_timestamp)?,
            server_picoseconds: None,
        })
    }
}

/// The node set one browse found, in pages: a receiver removes what is gone only once it holds
/// every page of one browse.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Nodes {
    pub endpoint: String,
    /// Which browse (counts up within a sender's run; a new run may start again at 1).
    pub browse: u64,
    /// This page, from 0.
    pub page: u32,
    pub pages: u32,
    pub nodes: Vec<NodeEntry>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeClass {
    Object,
    Variable,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NodeEntry {
    pub node_id: String,
    /// The node it was found under; absent for a browse root's children and explicit nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    pub path: Vec<String>,
    pub class: NodeClass,
    #[serde(default)]
    pub display_name: String,
}

/// The source's state, sent when it changes and at a fixed interval: a receiver that hears
/// nothing for several intervals knows the link or the sender is gone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Status {
    pub endpoint: String,
    /// Whether the source has a session with the plant server.
    pub connected: bool,
    /// Monitored items it holds.
    pub items: u64,
    /// The interval to the next status record, in milliseconds.
    pub interval_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Splits `items` into groups whose JSON fits in `budget_bytes` beside `overhead_bytes` of
/// envelope: each group becomes one record. An item too large alone is a group of its own
/// (the caller's frameable check refuses it, counted).
pub fn pack<T: Serialize>(
    items: Vec<T>,
    overhead_bytes: usize,
    budget_bytes: usize,
) -> Vec<Vec<T>> {
    let mut groups = Vec::new();
    let mut group = Vec::new();
    let mut size = overhead_bytes;
    for item in items {
        let item_bytes = serde_json::to_vec(&item).map_or(0, |v| v.len()) + 1;
        if !group.is_empty() && size + item_bytes > budget_bytes {
            groups.push(std::mem::take(&mut group));
            size = overhead_bytes;
        }
        size += item_bytes;
        group.push(item);
    }
    if !group.is_empty() {
        groups.push(group);
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use opcua::types::Variant;

    #[test]
    fn a_change_keeps_value_status_and_both_timestamps() {
        let value = DataValue {
            value: Some(Variant::Double(21.5)),
            status: Some(StatusCode::UncertainLastUsableValue),
            source_timestamp: Some(DateTime::from_str("2026-12-04T18:00:00.123456Z").unwrap()),
            source_picoseconds: None,
            server_timestamp: Some(DateTime::from_str("2026-12-04T18:00:00.2Z").unwrap()),
            server_picoseconds: None,
        };
        let change = Change::new("ns=2;s=T".into(), vec!["Line3".into(), "T".into()], &value);
        let message = Message::Data(Data {
            endpoint: "opc.tcp://plc:4840".into(),
            changes: vec![change],
        });
        let text = String::from_utf8(message.to_vec()).unwrap();
        assert!(
            text.contains(r#""MessageType":"diode-opcua-data""#),
            "{text}"
        );
        assert!(
            text.contains(r#""SourceTimestamp":"2026-12-04T18:00:00.123456Z""#),
            "{text}"
        );
        let Message::Data(back) = Message::parse(text.as_bytes()).unwrap() else {
            panic!("not data")
        };
        assert_eq!(back.changes[0].data_value().unwrap(), value);
    }

    #[test]
    fn pack_keeps_every_group_within_the_budget() {
        let items: Vec<String> = (0..100).map(|i| format!("item-{i:04}")).collect();
        let groups = pack(items.clone(), 50, 200);
        assert!(groups.len() > 1);
        for group in &groups {
            assert!(50 + serde_json::to_vec(group).unwrap().len() <= 200 + 1);
        }
        assert_eq!(groups.concat(), items);
    }

    #[test]
    fn hostile_records_are_errors() {
        for bad in [
            &b"{"[..],
            br#"{"MessageType":"nope"}"#,
            br#"{"MessageType":"diode-opcua-data","Endpoint":1,"Changes":[]}"#,
            br#"{"MessageType":"diode-opcua-data","Endpoint":"e","Changes":[{"NodeId":"x"}]}"#,
        ] {
            assert!(Message::parse(bad).is_err());
        }
    }
}
