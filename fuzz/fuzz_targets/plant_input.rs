//! What plant devices send the sender, whatever it is: syslog messages (datagrams and TCP
//! streams cut at arbitrary points) and Modbus read responses. None of it may panic.
#![no_main]

use bytes::BytesMut;
use diode_sender::sources::modbus::{self, Read, RegisterConfig, Table, ValueType, WordOrder};
use diode_sender::sources::syslog;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    match selector % 3 {
        0 => {
            let _ = syslog::to_record(rest);
        }
        1 => {
            // The stream arrives in pieces whose sizes the input chooses.
            let mut framer = syslog::TcpFramer::new(512);
            let mut buf = BytesMut::new();
            let mut input = rest;
            while let Some((&cut, tail)) = input.split_first() {
                let take = (cut as usize).min(tail.len());
                buf.extend_from_slice(&tail[..take]);
                input = &tail[take..];
                let eof = input.is_empty();
                let mut fatal = false;
                while let Some(frame) = framer.next(&mut buf, eof) {
                    match frame {
                        syslog::Frame::Message(m) => {
                            let _ = syslog::to_record(&m);
                        }
                        // The source closes the connection here, as it must: nothing after a
                        // broken octet count can be framed.
                        syslog::Frame::Oversize { fatal: true } => {
                            fatal = true;
                            break;
                        }
                        syslog::Frame::Oversize { fatal: false } => {}
                    }
                }
                if eof || fatal {
                    break;
                }
            }
        }
        _ => {
            let table = [Table::Coil, Table::Discrete, Table::Input, Table::Holding]
                [(rest.first().copied().unwrap_or(0) % 4) as usize];
            let read = Read {
                table,
                start: 100,
                quantity: u16::from(rest.get(1).copied().unwrap_or(1)).max(1),
            };
            let pdu = rest.get(2..).unwrap_or(&[]);
            if let Ok(bytes) = modbus::decode_response(pdu, &read) {
                for (i, ty) in [
                    ValueType::Bool,
                    ValueType::U16,
                    ValueType::I16,
                    ValueType::U32,
                    ValueType::I32,
                    ValueType::F32,
                    ValueType::F64,
                ]
                .into_iter()
                .enumerate()
                {
                    let register = RegisterConfig {
                        name: "v".into(),
                        table,
                        address: 100 + i as u16 * 3,
                        value_type: Some(ty),
                        word_order: if i % 2 == 0 {
                            WordOrder::Big
                        } else {
                            WordOrder::Little
                        },
                        scale: (i % 3 == 0).then_some(0.1),
                        unit: None,
                    };
                    let _ = modbus::extract(&register, &read, bytes);
                }
            }
        }
    }
});
