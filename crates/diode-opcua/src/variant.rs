//! Values as JSON: OPC UA Part 14's reversible form `{"Type": <built-in type id>, "Body": ...}`
//! for the built-in types a plant value has (numbers, text, times, ids, arrays of them), and
//! `{"Type": <id>, "UaBinary": "<base64>"}` (the Variant's OPC UA binary encoding) for the
//! structured rest, which a JSON consumer cannot use without the server's type dictionary anyway.
//!
//! Where this differs from Part 14: NodeIds and ExpandedNodeIds are their string form
//! (`ns=2;s=Line3.Temp`), not the object form, so a person can read them; 64-bit integers are
//! strings as Part 14 says (JSON numbers lose precision past 2^53).

use std::io::Cursor;
use std::str::FromStr;

use base64::Engine;
use opcua::types::{
    Array, BinaryDecodable, BinaryEncodable, ByteString, ContextOwned, DateTime, ExpandedNodeId,
    Guid, LocalizedText, NodeId, QualifiedName, StatusCode, UAString, Variant, VariantScalarTypeId,
    XmlElement,
};
use serde_json::{json, Value};

/// Why a JSON value is not a Variant. The records come from the link: a hostile or broken one
/// is refused with this, never trusted.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum VariantError {
    #[error("not an object with a numeric \"Type\"")]
    NoType,
    #[error("type {0} is not a built-in type")]
    UnknownType(u64),
    #[error("the body does not hold a value of type {0}")]
    Body(u32),
    #[error("the binary encoding does not decode: {0}")]
    Binary(String),
    #[error("array dimensions do not match its values")]
    Dimensions,
}

const BASE64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The binary encoding's context (namespaces, type loaders): the default one, made once.
static CONTEXT: std::sync::LazyLock<ContextOwned> = std::sync::LazyLock::new(ContextOwned::default);

/// The built-in types carried as readable JSON; the rest go as their binary encoding.
fn readable(id: VariantScalarTypeId) -> bool {
    use VariantScalarTypeId as T;
    !matches!(
        id,
        T::ExtensionObject | T::DataValue | T::Variant | T::DiagnosticInfo
    )
}

/// `value` as JSON; `null` for an empty Variant.
pub fn to_json(value: &Variant) -> Value {
    let Some(id) = value.scalar_type_id() else {
        return Value::Null;
    };
    if !readable(id) {
        let binary = value.encode_to_vec(&CONTEXT.context());
        return json!({"Type": id as u32, "UaBinary": BASE64.encode(binary)});
    }
    match value {
        Variant::Array(array) => {
            let body: Vec<Value> = array.values.iter().map(scalar_body).collect();
            match &array.dimensions {
                Some(dims) if dims.len() > 1 => {
                    json!({"Type": id as u32, "Body": body, "Dimensions": dims})
                }
                _ => json!({"Type": id as u32, "Body": body}),
            }
        }
        scalar => json!({"Type": id as u32, "Body": scalar_body(scalar)}),
    }
}

fn text(s: &UAString) -> Value {
    s.value()
        .as_ref()
        .map_or(Value::Null, |s| Value::from(s.as_str()))
}

/// A float as Part 14 writes it: special values as strings.
fn float(f: f64) -> Value {
    if f.is_nan() {
        Value::from("NaN")
    } else if f.is_infinite() {
        Value::from(if f > 0.0 { "Infinity" } else { "-Infinity" })
    } else {
        serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
    }
}

/// A timestamp with all the precision chrono keeps (OPC UA has 100 ns ticks).
pub fn time_text(t: &DateTime) -> String {
    t.as_chrono()
        .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

fn scalar_body(value: &Variant) -> Value {
    match value {
        Variant::Empty => Value::Null,
        Variant::Boolean(v) => Value::from(*v),
        Variant::SByte(v) => Value::from(*v),
        Variant::Byte(v) => Value::from(*v),
        Variant::Int16(v) => Value::from(*v),
        Variant::UInt16(v) => Value::from(*v),
        Variant::Int32(v) => Value::from(*v),
        Variant::UInt32(v) => Value::from(*v),
        Variant::Int64(v) => Value::from(v.to_string()),
        Variant::UInt64(v) => Value::from(v.to_string()),
        Variant::Float(v) => float(f64::from(*v)),
        Variant::Double(v) => float(*v),
        Variant::String(v) => text(v),
        Variant::DateTime(v) => Value::from(time_text(v)),
        Variant::Guid(v) => Value::from(v.to_string()),
        Variant::StatusCode(v) => Value::from(v.bits()),
        Variant::ByteString(v) => v
            .value
            .as_ref()
            .map_or(Value::Null, |b| Value::from(BASE64.encode(b))),
        Variant::XmlElement(v) => Value::from(v.to_string()),
        Variant::QualifiedName(v) => {
            json!({"Name": text(&v.name), "Uri": v.namespace_index})
        }
        Variant::LocalizedText(v) => json!({"Locale": text(&v.locale), "Text": text(&v.text)}),
        Variant::NodeId(v) => Value::from(v.to_string()),
        Variant::ExpandedNodeId(v) => Value::from(v.to_string()),
        // Not readable (see `readable`): never reached for these, nor for nested arrays.
        Variant::ExtensionObject(_)
        | Variant::Variant(_)
        | Variant::DataValue(_)
        | Variant::DiagnosticInfo(_)
        | Variant::Array(_) => Value::Null,
    }
}

/// The Variant a JSON value written by [`to_json`] stands for.
pub fn from_json(value: &Value) -> Result<Variant, VariantError> {
    if value.is_null() {
        return Ok(Variant::Empty);
    }
    let type_number = value
        .get("Type")
        .and_then(Value::as_u64)
        .ok_or(VariantError::NoType)?;
    let id = scalar_type(type_number)?;
    if let Some(binary) = value.get("UaBinary").and_then(Value::as_str) {
        let bytes = BASE64
            .decode(binary)
            .map_err(|e| VariantError::Binary(e.to_string()))?;
        let mut cursor = Cursor::new(bytes.as_slice());
        let decoded = Variant::decode(&mut cursor, &CONTEXT.context())
            .map_err(|e| VariantError::Binary(e.to_string()))?;
        // What the record says it holds is what it holds, and nothing trails it.
        if decoded.scalar_type_id() != Some(id) || cursor.position() != bytes.len() as u64 {
            return Err(VariantError::Body(id as u32));
        }
        return Ok(decoded);
    }
    let body = value.get("Body").unwrap_or(&Value::Null);
    match body {
        Value::Array(items) => {
            let values = items
                .iter()
                .map(|item| scalar_from(id, item))
                .collect::<Result<Vec<_>, _>>()?;
            let array = match value.get("Dimensions") {
                Some(dims) => {
                    let dims = <Vec<u32> as serde::Deserialize>::deserialize(dims)
                        .map_err(|_| VariantError::Dimensions)?;
                    Array::new_multi(id, values, dims).map_err(|_| VariantError::Dimensions)?
                }
                None => Array::new(id, values).map_err(|_| VariantError::Body(id as u32))?,
            };
            Ok(Variant::Array(Box::new(array)))
        }
        scalar => scalar_from(id, scalar),
    }
}

fn scalar_type(number: u64) -> Result<VariantScalarTypeId, VariantError> {
    // The range first: the library's conversion logs an error for a number outside it, and a
    // number from the link is no reason for an error line.
    u32::try_from(number)
        .ok()
        .filter(|n| (1..=25).contains(n))
        .and_then(|n| VariantScalarTypeId::try_from(n).ok())
        .ok_or(VariantError::UnknownType(number))
}

fn ua_string(body: &Value) -> Option<UAString> {
    match body {
        Value::Null => Some(UAString::null()),
        Value::String(s) => Some(UAString::from(s.as_str())),
        _ => None,
    }
}

fn float_from(body: &Value) -> Option<f64> {
    match body {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => match s.as_str() {
            "NaN" => Some(f64::NAN),
            "Infinity" => Some(f64::INFINITY),
            "-Infinity" => Some(f64::NEG_INFINITY),
            _ => None,
        },
        _ => None,
    }
}

fn int_from<T: TryFrom<i64> + FromStr>(body: &Value) -> Option<T> {
    match body {
        Value::Number(n) => n.as_i64().and_then(|v| T::try_from(v).ok()),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn scalar_from(id: VariantScalarTypeId, body: &Value) -> Result<Variant, VariantError> {
    use VariantScalarTypeId as T;
    let wrong = || VariantError::Body(id as u32);
    let value = match id {
        T::Boolean => Variant::Boolean(body.as_bool().ok_or_else(wrong)?),
        T::SByte => Variant::SByte(int_from(body).ok_or_else(wrong)?),
        T::Byte => Variant::Byte(int_from(body).ok_or_else(wrong)?),
        T::Int16 => Variant::Int16(int_from(body).ok_or_else(wrong)?),
        T::UInt16 => Variant::UInt16(int_from(body).ok_or_else(wrong)?),
        T::Int32 => Variant::Int32(int_from(body).ok_or_else(wrong)?),
        T::UInt32 => Variant::UInt32(int_from(body).ok_or_else(wrong)?),
        T::Int64 => Variant::Int64(int_from(body).ok_or_else(wrong)?),
        T::UInt64 => Variant::UInt64(
            match body {
                Value::Number(n) => n.as_u64(),
                Value::String(s) => s.parse().ok(),
                _ => None,
            }
            .ok_or_else(wrong)?,
        ),
        T::Float => Variant::Float(float_from(body).ok_or_else(wrong)? as f32),
        T::Double => Variant::Double(float_from(body).ok_or_else(wrong)?),
        T::String => Variant::String(ua_string(body).ok_or_else(wrong)?),
        T::DateTime => Variant::from(
            body.as_str()
                .and_then(|s| DateTime::from_str(s).ok())
                .ok_or_else(wrong)?,
        ),
        T::Guid => Variant::from(
            body.as_str()
                .and_then(|s| Guid::from_str(s).ok())
                .ok_or_else(wrong)?,
        ),
        T::StatusCode => Variant::StatusCode(StatusCode::from(
            body.as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(wrong)?,
        )),
        T::ByteString => Variant::ByteString(match body {
            Value::Null => ByteString::null(),
            Value::String(s) => ByteString::from(BASE64.decode(s).map_err(|_| wrong())?),
            _ => return Err(wrong()),
        }),
        T::XmlElement => Variant::XmlElement(XmlElement::from(
            body.as_str().ok_or_else(wrong)?.to_owned(),
        )),
        T::QualifiedName => {
            let name = ua_string(body.get("Name").unwrap_or(&Value::Null)).ok_or_else(wrong)?;
            let ns = body
                .get("Uri")
                .and_then(Value::as_u64)
                .and_then(|n| u16::try_from(n).ok())
                .unwrap_or(0);
            Variant::from(QualifiedName::new(ns, name))
        }
        T::LocalizedText => {
            let locale = ua_string(body.get("Locale").unwrap_or(&Value::Null)).ok_or_else(wrong)?;
            let text = ua_string(body.get("Text").unwrap_or(&Value::Null)).ok_or_else(wrong)?;
            Variant::from(LocalizedText { locale, text })
        }
        T::NodeId => Variant::from(
            body.as_str()
                .and_then(|s| NodeId::from_str(s).ok())
                .ok_or_else(wrong)?,
        ),
        T::ExpandedNodeId => Variant::from(
            body.as_str()
                .and_then(|s| ExpandedNodeId::from_str(s).ok())
                .ok_or_else(wrong)?,
        ),
        T::ExtensionObject | T::DataValue | T::Variant | T::DiagnosticInfo => return Err(wrong()),
    };
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(value: Variant) {
        let json = to_json(&value);
        let text = serde_json::to_string(&json).unwrap();
        let back = from_json(&serde_json::from_str(&text).unwrap()).unwrap();
        assert_eq!(back, value, "through {text}");
    }

    #[test]
    fn every_readable_built_in_type_round_trips() {
        round_trip(Variant::Empty);
        round_trip(Variant::Boolean(true));
        round_trip(Variant::SByte(-7));
        round_trip(Variant::Byte(200));
        round_trip(Variant::Int16(-30_000));
        round_trip(Variant::UInt16(60_000));
        round_trip(Variant::Int32(-2_000_000_000));
        round_trip(Variant::UInt32(4_000_000_000));
        round_trip(Variant::Int64(i64::MIN));
        round_trip(Variant::UInt64(u64::MAX));
        round_trip(Variant::Float(1.5));
        round_trip(Variant::Double(-21.125));
        round_trip(Variant::Double(f64::INFINITY));
        round_trip(Variant::String(UAString::from("Line 3 ⚙")));
        round_trip(Variant::String(UAString::null()));
        round_trip(Variant::from(
            DateTime::from_str("2026-12-04T18:00:00.1234567Z").unwrap(),
        ));
        round_trip(Variant::from(Guid::new()));
        round_trip(Variant::StatusCode(StatusCode::BadSensorFailure));
        round_trip(Variant::ByteString(ByteString::from(vec![0u8, 1, 255])));
        round_trip(Variant::from(QualifiedName::new(2, "Temp")));
        round_trip(Variant::from(LocalizedText::new("en", "Temperature")));
        round_trip(Variant::from(NodeId::new(3, "Line3.Temp")));
        round_trip(Variant::from(NodeId::new(0, 2258u32)));
        round_trip(Variant::from(vec![1.0f64, 2.5, -3.0]));
        round_trip(Variant::from(vec![
            UAString::from("a"),
            UAString::from("b"),
        ]));
        round_trip(Variant::Array(Box::new(
            Array::new_multi(
                VariantScalarTypeId::Int32,
                (0..6).map(Variant::Int32).collect::<Vec<_>>(),
                vec![2u32, 3],
            )
            .unwrap(),
        )));
    }

    #[test]
    fn the_json_is_part_14_readable() {
        assert_eq!(
            to_json(&Variant::Double(21.5)),
            json!({"Type": 11, "Body": 21.5})
        );
        assert_eq!(
            to_json(&Variant::UInt64(1 << 60)),
            json!({"Type": 9, "Body": "1152921504606846976"})
        );
        assert_eq!(
            to_json(&Variant::Float(f32::NAN)),
            json!({"Type": 10, "Body": "NaN"})
        );
    }

    #[test]
    fn structured_values_travel_as_their_binary_encoding() {
        let nested = Variant::Variant(Box::new(Variant::Int32(5)));
        let json = to_json(&nested);
        assert!(json.get("UaBinary").is_some(), "{json}");
        assert_eq!(from_json(&json).unwrap(), nested);
    }

    #[test]
    fn broken_values_are_refused() {
        for bad in [
            json!(5),
            json!({"Body": 1}),
            json!({"Type": 99, "Body": 1}),
            json!({"Type": 6, "Body": "x"}),
            json!({"Type": 6, "Body": 1e20}),
            json!({"Type": 3, "Body": 300}),
            json!({"Type": 13, "Body": "yesterday"}),
            json!({"Type": 22, "Body": {}}),
            json!({"Type": 22, "UaBinary": "!!"}),
            json!({"Type": 22, "UaBinary": "AAAA"}),
            json!({"Type": 11, "Body": [1.0, 2.0], "Dimensions": [3, 3]}),
            json!({"Type": 15, "Body": "not base64!"}),
        ] {
            assert!(from_json(&bad).is_err(), "{bad} was taken");
        }
    }
}
