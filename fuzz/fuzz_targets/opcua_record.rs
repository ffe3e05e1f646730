//! An OPC UA topic's records (docs/opcua.md) on arbitrary bytes, as the receiver's mirror takes
//! them from the link: parsing and turning every change into a DataValue never panics, and a
//! value that converts goes back to the same JSON.
#![no_main]

use diode_opcua::{variant, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Message::Data(records)) = Message::parse(data) {
        for change in &records.changes {
            if let Ok(value) = change.data_value() {
                if let Some(v) = &value.value {
                    let again = variant::from_json(&variant::to_json(v));
                    assert!(again.is_ok(), "{:?} does not come back", change.value);
                }
            }
        }
    }
    if let Ok(json) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = variant::from_json(&json);
    }
});
