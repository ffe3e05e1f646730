//! Modbus TCP polling, read-only by construction.
//!
//! The only requests this module can build are the four read function codes of [`ReadCode`];
//! there is no type, constant or code path for a write, so no configuration can produce one.
//! One request is in flight per device at a time; a poll whose interval is below the site's floor
//! is refused at load (`[safety] min_poll_interval_ms`).

use diode_common::config::{default_u64, default_u8};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use diode_common::config::ConfigError;
use serde::Deserialize;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Scope, Source, SourceContext, Started};

/// `source = { kind = "modbus", ... }`: one device, polled with read function codes only; each
/// poll is one JSON record. There is no key for a function code.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusConfig {
    pub address: String,
    #[serde(default = "default_u8::<1>")]
    pub unit_id: u8,
    pub poll_interval_ms: u64,
    #[serde(default = "default_u64::<1000>")]
    pub timeout_ms: u64,
    pub registers: Vec<RegisterConfig>,
}

impl ModbusConfig {
    pub fn check(&self, scope: &Scope<'_>) -> Result<ModbusSource, ConfigError> {
        super::check_poll_floor(
            scope,
            "poll_interval_ms",
            self.poll_interval_ms,
            "polling",
            "device",
        )?;
        if !(1..=60_000).contains(&self.timeout_ms) {
            return Err(scope.invalid(
                "timeout_ms",
                format!("{} is outside 1..=60000", self.timeout_ms),
            ));
        }
        validate_registers(&self.registers)
            .map_err(|(i, message)| scope.invalid(&format!("registers[{i}]"), message))?;
        Ok(ModbusSource {
            address: scope.socket_addr("address", &self.address)?,
            config: self.clone(),
        })
    }
}

#[derive(Debug)]
pub struct ModbusSource {
    config: ModbusConfig,
    address: SocketAddr,
}

impl Source for ModbusSource {
    fn describe(&self) -> String {
        let c = &self.config;
        format!(
            "modbus {} unit {}, {} values in {} read requests every {} ms (read only)",
            c.address,
            c.unit_id,
            c.registers.len(),
            plan_reads(&c.registers).len(),
            c.poll_interval_ms
        )
    }

    fn start(&self, ctx: SourceContext) -> std::io::Result<Started> {
        let poller = ModbusPoller {
            address: self.address,
            unit_id: self.config.unit_id,
            poll_interval: Duration::from_millis(self.config.poll_interval_ms),
            timeout: Duration::from_millis(self.config.timeout_ms),
            registers: self.config.registers.clone(),
        };
        Ok(Started {
            local_addr: None,
            task: Box::pin(poller.run(ctx)),
        })
    }
}

/// The four Modbus tables, each read by one function code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Table {
    Coil,
    Discrete,
    Input,
    Holding,
}

/// The read function codes: the whole vocabulary this client has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ReadCode {
    ReadCoils = 0x01,
    ReadDiscreteInputs = 0x02,
    ReadHoldingRegisters = 0x03,
    ReadInputRegisters = 0x04,
}

impl Table {
    fn read_code(self) -> ReadCode {
        match self {
            Table::Coil => ReadCode::ReadCoils,
            Table::Discrete => ReadCode::ReadDiscreteInputs,
            Table::Holding => ReadCode::ReadHoldingRegisters,
            Table::Input => ReadCode::ReadInputRegisters,
        }
    }

    fn is_bits(self) -> bool {
        matches!(self, Table::Coil | Table::Discrete)
    }

    /// The most one request may ask for (Modbus Application Protocol v1.1b3, §6.1-6.4).
    fn max_quantity(self) -> u16 {
        if self.is_bits() {
            2000
        } else {
            125
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueType {
    Bool,
    U16,
    I16,
    U32,
    I32,
    F32,
    F64,
}

impl ValueType {
    fn words(self) -> u16 {
        match self {
            ValueType::Bool | ValueType::U16 | ValueType::I16 => 1,
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 2,
            ValueType::F64 => 4,
        }
    }
}

/// Order of the 16-bit words of a multi-word value: `big` puts the most significant word first
/// (the Modbus convention), `little` the least significant (common on some PLCs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WordOrder {
    #[default]
    Big,
    Little,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterConfig {
    pub name: String,
    pub table: Table,
    pub address: u16,
    /// `bool` for coils and discrete inputs (the default there), `u16` by default for registers.
    #[serde(default, rename = "type")]
    pub value_type: Option<ValueType>,
    #[serde(default)]
    pub word_order: WordOrder,
    /// The value is multiplied by this before it is sent.
    #[serde(default)]
    pub scale: Option<f64>,
    /// For the reader; sent with each record under `units`.
    #[serde(default)]
    pub unit: Option<String>,
}

impl RegisterConfig {
    fn value_type(&self) -> ValueType {
        self.value_type.unwrap_or(if self.table.is_bits() {
            ValueType::Bool
        } else {
            ValueType::U16
        })
    }

    fn width(&self) -> u16 {
        if self.table.is_bits() {
            1
        } else {
            self.value_type().words()
        }
    }
}

/// Checks the register list; an error carries the index of the register at fault.
fn validate_registers(registers: &[RegisterConfig]) -> Result<(), (usize, String)> {
    if registers.is_empty() {
        return Err((0, "a Modbus source needs at least one register".into()));
    }
    let mut names = std::collections::HashSet::new();
    for (i, r) in registers.iter().enumerate() {
        if r.name.is_empty() || !names.insert(r.name.as_str()) {
            return Err((i, format!("name {:?} is empty or used twice", r.name)));
        }
        let ty = r.value_type();
        if r.table.is_bits() != (ty == ValueType::Bool) {
            return Err((
                i,
                format!(
                    "type {ty:?} does not fit table {:?}: coils and discrete inputs are bool, registers are numbers",
                    r.table
                )
                .to_lowercase(),
            ));
        }
        if u32::from(r.address) + u32::from(r.width()) > 65_536 {
            return Err((i, format!("address {} runs past 65535", r.address)));
        }
        if r.scale.is_some_and(|s| !s.is_finite()) {
            return Err((i, "scale must be a finite number".into()));
        }
    }
    Ok(())
}

/// One read request of a poll: `quantity` items of `table` from `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Read {
    pub table: Table,
    pub start: u16,
    pub quantity: u16,
}

/// Coalesces the registers into as few reads as the protocol allows: per table, sorted by
/// address, spans merged while one read can still cover them (125 registers, 2000 bits).
pub fn plan_reads(registers: &[RegisterConfig]) -> Vec<Read> {
    let mut by_table: BTreeMap<Table, Vec<(u16, u16)>> = BTreeMap::new();
    for r in registers {
        by_table
            .entry(r.table)
            .or_default()
            .push((r.address, r.width()));
    }
    let mut reads = Vec::new();
    for (table, mut spans) in by_table {
        spans.sort_unstable();
        let mut current: Option<(u16, u32)> = None; // (start, end exclusive)
        for (address, width) in spans {
            let end = u32::from(address) + u32::from(width);
            current = match current {
                Some((start, cur_end))
                    if end - u32::from(start) <= u32::from(table.max_quantity()) =>
                {
                    Some((start, cur_end.max(end)))
                }
                Some((start, cur_end)) => {
                    reads.push(Read {
                        table,
                        start,
                        quantity: (cur_end - u32::from(start)) as u16,
                    });
                    Some((address, end))
                }
                None => Some((address, end)),
            };
        }
        if let Some((start, end)) = current {
            reads.push(Read {
                table,
                start,
                quantity: (end - u32::from(start)) as u16,
            });
        }
    }
    reads
}

/// A Modbus TCP request frame (MBAP header + PDU) for a read.
pub fn encode_read(transaction: u16, unit_id: u8, read: &Read) -> [u8; 12] {
    let mut frame = [0u8; 12];
    frame[0..2].copy_from_slice(&transaction.to_be_bytes());
    // Protocol id 0 (Modbus), then the length of what follows: unit id + 5-byte PDU.
    frame[4..6].copy_from_slice(&6u16.to_be_bytes());
    frame[6] = unit_id;
    frame[7] = read.table.read_code() as u8;
    frame[8..10].copy_from_slice(&read.start.to_be_bytes());
    frame[10..12].copy_from_slice(&read.quantity.to_be_bytes());
    frame
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ResponseError {
    #[error("exception {0:#04x}")]
    Exception(u8),
    #[error("malformed response: {0}")]
    Malformed(&'static str),
}

/// The data bytes of a read response (the PDU after the MBAP header), checked against the request.
pub fn decode_response<'a>(pdu: &'a [u8], read: &Read) -> Result<&'a [u8], ResponseError> {
    let code = read.table.read_code() as u8;
    match pdu {
        [fc, exception, ..] if *fc == code | 0x80 => Err(ResponseError::Exception(*exception)),
        [fc, count, data @ ..] if *fc == code => {
            let expected = if read.table.is_bits() {
                read.quantity.div_ceil(8) as usize
            } else {
                2 * read.quantity as usize
            };
            if *count as usize != expected || data.len() != expected {
                return Err(ResponseError::Malformed(
                    "byte count does not match the request",
                ));
            }
            Ok(data)
        }
        _ => Err(ResponseError::Malformed("unexpected function code")),
    }
}

/// A register's value, taken from the data of the read that covers it.
pub fn extract(register: &RegisterConfig, read: &Read, data: &[u8]) -> Option<serde_json::Value> {
    let offset = register.address.checked_sub(read.start)? as usize;
    if register.table.is_bits() {
        let byte = data.get(offset / 8)?;
        return Some(serde_json::Value::Bool(byte >> (offset % 8) & 1 == 1));
    }
    let words = register.value_type().words() as usize;
    let bytes = data.get(2 * offset..2 * (offset + words))?;
    let mut ordered = [0u8; 8];
    for w in 0..words {
        let source = match register.word_order {
            WordOrder::Big => w,
            WordOrder::Little => words - 1 - w,
        };
        ordered[2 * w..2 * w + 2].copy_from_slice(&bytes[2 * source..2 * source + 2]);
    }
    let raw: f64 = match register.value_type() {
        // The loader refuses a bool on a register table; were one to get here, it has no value
        // rather than a panic in the poll loop.
        ValueType::Bool => return None,
        ValueType::U16 => u16::from_be_bytes([ordered[0], ordered[1]]).into(),
        ValueType::I16 => i16::from_be_bytes([ordered[0], ordered[1]]).into(),
        ValueType::U32 => u32::from_be_bytes(ordered[..4].try_into().ok()?).into(),
        ValueType::I32 => i32::from_be_bytes(ordered[..4].try_into().ok()?).into(),
        ValueType::F32 => f32::from_be_bytes(ordered[..4].try_into().ok()?).into(),
        ValueType::F64 => f64::from_be_bytes(ordered),
    };
    let value = match register.scale {
        Some(scale) => raw * scale,
        None => raw,
    };
    // Integers stay integers in JSON when unscaled; NaN and infinities (f32/f64) become null.
    Some(
        if register.scale.is_none()
            && !matches!(register.value_type(), ValueType::F32 | ValueType::F64)
        {
            serde_json::Value::from(value as i64)
        } else {
            serde_json::Number::from_f64(value).map_or(serde_json::Value::Null, Into::into)
        },
    )
}

/// Modbus exception 0x02: the device has no such address.
const ILLEGAL_DATA_ADDRESS: u8 = 0x02;

fn exception_name(code: u8) -> &'static str {
    match code {
        0x01 => "illegal function",
        0x02 => "illegal data address",
        0x03 => "illegal data value",
        0x04 => "server device failure",
        0x05 => "acknowledge",
        0x06 => "server device busy",
        0x0A => "gateway path unavailable",
        0x0B => "gateway target device failed to respond",
        _ => "unknown",
    }
}

/// The indexes of the registers a read covers.
fn covered<'a>(
    registers: &'a [RegisterConfig],
    read: &'a Read,
) -> impl Iterator<Item = usize> + 'a {
    registers.iter().enumerate().filter_map(move |(i, r)| {
        (r.table == read.table
            && r.address >= read.start
            && u32::from(r.address) + u32::from(r.width())
                <= u32::from(read.start) + u32::from(read.quantity))
        .then_some(i)
    })
}

/// The plan with `read` replaced by one read per value it covered.
pub fn split_read(reads: &[Read], read: &Read, registers: &[RegisterConfig]) -> Vec<Read> {
    let mut out = Vec::with_capacity(reads.len());
    for r in reads {
        if r == read {
            out.extend(covered(registers, read).map(|i| Read {
                table: read.table,
                start: registers[i].address,
                quantity: registers[i].width(),
            }));
        } else {
            out.push(*r);
        }
    }
    out
}

/// What one poll got: values, and the reads the device answered with an exception.
struct PollResult {
    values: Vec<(usize, serde_json::Value)>,
    refused: Vec<(Read, u8)>,
}

#[derive(Debug, Error)]
enum PollError {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("no answer within the timeout")]
    Timeout,
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Response(#[from] ResponseError),
    #[error("response for another transaction or unit")]
    Mismatch,
    #[error("every read refused, the first with exception {0:#04x}")]
    AllRefused(u8),
}

struct ModbusPoller {
    address: SocketAddr,
    unit_id: u8,
    poll_interval: Duration,
    timeout: Duration,
    registers: Vec<RegisterConfig>,
}

const BACKOFF_MAX: Duration = Duration::from_secs(30);

impl ModbusPoller {
    async fn run(self, ctx: SourceContext) {
        let mut reads = plan_reads(&self.registers);
        tracing::info!(topic = %ctx.name, device = %self.address, unit = self.unit_id, reads = reads.len(),
            interval_ms = self.poll_interval.as_millis() as u64, "modbus polling");
        let mut connection: Option<TcpStream> = None;
        let mut transaction: u16 = 0;
        let mut failures: u32 = 0;
        let mut ticker = tokio::time::interval(self.poll_interval);
        // A late poll is not made up for: the device is asked at the configured rate at most.
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut data = Vec::new();
        loop {
            tokio::select! {
                _ = ctx.shutdown.wait() => return,
                _ = ticker.tick() => {}
            }
            let time_us = diode_common::unix_time_us();
            let result = self
                .poll(&mut connection, &mut transaction, &reads, &mut data)
                .await;
            // A refused read costs only its own values, reported missing in the record; a
            // coalesced read that hit an address the device does not have is split into one read
            // per value from now on, so only what really is not there stays missing.
            if let Ok(poll) = &result {
                for (read, code) in &poll.refused {
                    ctx.metrics.errors_exception.inc();
                    if *code == ILLEGAL_DATA_ADDRESS && covered(&self.registers, read).count() > 1 {
                        tracing::warn!(topic = %ctx.name, device = %self.address, ?read,
                            "the device refused a coalesced read (illegal data address): reading its values one by one");
                        reads = split_read(&reads, read, &self.registers);
                    }
                }
            }
            let result = result.and_then(|poll| match poll.refused.first() {
                Some((_, code)) if poll.values.is_empty() => Err(PollError::AllRefused(*code)),
                _ => Ok(poll),
            });
            match result {
                Ok(PollResult { values, refused }) => {
                    if failures > 0 {
                        tracing::info!(topic = %ctx.name, device = %self.address, "modbus device answers again");
                    }
                    failures = 0;
                    ctx.metrics.polls.inc();
                    ctx.metrics
                        .last_poll_seconds
                        .set(diode_common::unix_time_us() / 1_000_000);
                    let payload = self.record(time_us, values, &refused);
                    if super::emit(&ctx, time_us, None, payload).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    match &e {
                        PollError::Connect(_) => ctx.metrics.errors_connect.inc(),
                        PollError::Timeout => ctx.metrics.errors_timeout.inc(),
                        // Counted per read above.
                        PollError::AllRefused(_) => 0,
                        _ => ctx.metrics.errors_io.inc(),
                    };
                    // After anything but exceptions the stream may hold a late or partial
                    // answer: start again on a fresh connection.
                    if !matches!(e, PollError::AllRefused(_)) {
                        connection = None;
                    }
                    failures += 1;
                    let backoff = (self.poll_interval * 2u32.saturating_pow(failures.min(16)))
                        .min(BACKOFF_MAX)
                        .max(self.poll_interval);
                    if failures == 1 || backoff == BACKOFF_MAX && failures % 10 == 0 {
                        tracing::warn!(topic = %ctx.name, device = %self.address, error = %e,
                            retry_ms = backoff.as_millis() as u64, "modbus poll failed");
                    }
                    tokio::select! {
                        _ = ctx.shutdown.wait() => return,
                        _ = tokio::time::sleep(backoff.saturating_sub(self.poll_interval)) => {}
                    }
                }
            }
            ctx.metrics.connections.set(i64::from(connection.is_some()));
        }
    }

    async fn poll(
        &self,
        connection: &mut Option<TcpStream>,
        transaction: &mut u16,
        reads: &[Read],
        data: &mut Vec<u8>,
    ) -> Result<PollResult, PollError> {
        if connection.is_none() {
            let stream = tokio::time::timeout(self.timeout, TcpStream::connect(self.address))
                .await
                .map_err(|_| PollError::Connect(std::io::ErrorKind::TimedOut.into()))?
                .map_err(PollError::Connect)?;
            let _ = stream.set_nodelay(true);
            *connection = Some(stream);
        }
        let stream = connection.as_mut().expect("connected above");
        let mut values = Vec::with_capacity(self.registers.len());
        let mut refused = Vec::new();
        for read in reads {
            *transaction = transaction.wrapping_add(1);
            let request = encode_read(*transaction, self.unit_id, read);
            tokio::time::timeout(self.timeout, async {
                stream.write_all(&request).await?;
                let mut header = [0u8; 7];
                stream.read_exact(&mut header).await?;
                let len = u16::from_be_bytes([header[4], header[5]]) as usize;
                // A read answer is at most 2 + 250 bytes of PDU plus the unit id.
                if !(3..=254).contains(&len) {
                    return Err(PollError::Response(ResponseError::Malformed(
                        "MBAP length out of range",
                    )));
                }
                data.resize(len - 1, 0);
                stream.read_exact(data).await?;
                if header[0..2] != transaction.to_be_bytes()
                    || header[2..4] != [0, 0]
                    || header[6] != self.unit_id
                {
                    return Err(PollError::Mismatch);
                }
                Ok(())
            })
            .await
            .map_err(|_| PollError::Timeout)??;
            let bytes = match decode_response(data, read) {
                Ok(bytes) => bytes,
                Err(ResponseError::Exception(code)) => {
                    refused.push((*read, code));
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            for i in covered(&self.registers, read) {
                if let Some(value) = extract(&self.registers[i], read, bytes) {
                    values.push((i, value));
                }
            }
        }
        Ok(PollResult { values, refused })
    }

    /// `{"ts": RFC 3339, "values": {name: value}, "units": {name: unit}, "errors": {name: why}}`,
    /// names in config order; `errors` only for values the device refused this time.
    fn record(
        &self,
        time_us: i64,
        mut values: Vec<(usize, serde_json::Value)>,
        refused: &[(Read, u8)],
    ) -> Bytes {
        values.sort_by_key(|(i, _)| *i);
        let mut map = serde_json::Map::new();
        for (i, value) in values {
            map.insert(self.registers[i].name.clone(), value);
        }
        let mut record = serde_json::Map::new();
        record.insert("ts".into(), diode_common::format_rfc3339_us(time_us).into());
        record.insert("values".into(), map.into());
        let units: serde_json::Map<String, serde_json::Value> = self
            .registers
            .iter()
            .filter_map(|r| Some((r.name.clone(), r.unit.clone()?.into())))
            .collect();
        if !units.is_empty() {
            record.insert("units".into(), units.into());
        }
        let mut errors = serde_json::Map::new();
        for (read, code) in refused {
            for i in covered(&self.registers, read) {
                errors.insert(
                    self.registers[i].name.clone(),
                    format!("exception {code:#04x} ({})", exception_name(*code)).into(),
                );
            }
        }
        if !errors.is_empty() {
            record.insert("errors".into(), errors.into());
        }
        Bytes::from(serde_json::to_vec(&record).expect("JSON values serialise"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(name: &str, table: Table, address: u16, ty: Option<ValueType>) -> RegisterConfig {
        RegisterConfig {
            name: name.into(),
            table,
            address,
            value_type: ty,
            word_order: WordOrder::Big,
            scale: None,
            unit: None,
        }
    }

    /// Found by the plant_input fuzz target: a bool typed register on a register table reached
    /// an `unreachable!` (the loader refuses such a register; the decoder must not panic).
    #[test]
    fn a_bool_on_a_register_table_has_no_value_instead_of_a_panic() {
        let register = reg("v", Table::Holding, 100, Some(ValueType::Bool));
        let read = Read {
            table: Table::Holding,
            start: 100,
            quantity: 1,
        };
        assert_eq!(extract(&register, &read, &[0, 1]), None);
    }

    #[test]
    fn reads_are_coalesced_within_protocol_limits() {
        let registers = vec![
            reg("a", Table::Holding, 100, None),
            reg("b", Table::Holding, 101, Some(ValueType::F32)),
            reg("c", Table::Holding, 224, None),
            reg("d", Table::Holding, 225, None),
            reg("e", Table::Input, 10, Some(ValueType::F64)),
            reg("f", Table::Coil, 5, None),
            reg("g", Table::Coil, 2004, None),
            reg("h", Table::Coil, 2005, None),
        ];
        validate_registers(&registers).unwrap();
        let reads = plan_reads(&registers);
        assert_eq!(
            reads,
            vec![
                Read {
                    table: Table::Coil,
                    start: 5,
                    quantity: 2000
                },
                Read {
                    table: Table::Coil,
                    start: 2005,
                    quantity: 1
                },
                Read {
                    table: Table::Input,
                    start: 10,
                    quantity: 4
                },
                Read {
                    table: Table::Holding,
                    start: 100,
                    quantity: 125
                },
                Read {
                    table: Table::Holding,
                    start: 225,
                    quantity: 1
                },
            ]
        );
    }

    #[test]
    fn a_refused_coalesced_read_splits_into_one_read_per_value() {
        let registers = vec![
            reg("a", Table::Input, 10, Some(ValueType::F32)),
            reg("b", Table::Input, 20, None),
            reg("c", Table::Holding, 1, None),
        ];
        let reads = plan_reads(&registers);
        let input = reads.iter().find(|r| r.table == Table::Input).unwrap();
        assert_eq!(input.quantity, 11);
        let split = split_read(&reads, input, &registers);
        assert_eq!(
            split,
            vec![
                Read {
                    table: Table::Input,
                    start: 10,
                    quantity: 2
                },
                Read {
                    table: Table::Input,
                    start: 20,
                    quantity: 1
                },
                Read {
                    table: Table::Holding,
                    start: 1,
                    quantity: 1
                },
            ]
        );
    }

    #[test]
    fn only_read_function_codes_exist() {
        for table in [Table::Coil, Table::Discrete, Table::Input, Table::Holding] {
            let frame = encode_read(
                7,
                1,
                &Read {
                    table,
                    start: 0,
                    quantity: 1,
                },
            );
            assert!((1..=4).contains(&frame[7]), "function code {}", frame[7]);
        }
    }

    #[test]
    fn values_decode_with_types_word_order_and_scale() {
        let read = Read {
            table: Table::Holding,
            start: 100,
            quantity: 7,
        };
        let f = 1234.5f32.to_be_bytes();
        // 100: u16 12345; 101-102: f32 big; 103-104: f32 little; 105-106: i32 -2 big
        let mut data = vec![0x30, 0x39, f[0], f[1], f[2], f[3], f[2], f[3], f[0], f[1]];
        data.extend_from_slice(&(-2i32).to_be_bytes());
        let mut speed = reg("speed", Table::Holding, 100, None);
        speed.scale = Some(0.1);
        assert_eq!(
            extract(&speed, &read, &data),
            Some(serde_json::json!(1234.5))
        );
        let big = reg("big", Table::Holding, 101, Some(ValueType::F32));
        assert_eq!(extract(&big, &read, &data), Some(serde_json::json!(1234.5)));
        let mut little = reg("little", Table::Holding, 103, Some(ValueType::F32));
        little.word_order = WordOrder::Little;
        assert_eq!(
            extract(&little, &read, &data),
            Some(serde_json::json!(1234.5))
        );
        let signed = reg("signed", Table::Holding, 105, Some(ValueType::I32));
        assert_eq!(extract(&signed, &read, &data), Some(serde_json::json!(-2)));
        let coils = Read {
            table: Table::Coil,
            start: 0,
            quantity: 10,
        };
        let pump = reg("pump", Table::Coil, 9, None);
        assert_eq!(
            extract(&pump, &coils, &[0, 0b10]),
            Some(serde_json::json!(true))
        );
    }

    #[test]
    fn responses_are_checked() {
        let read = Read {
            table: Table::Holding,
            start: 0,
            quantity: 2,
        };
        assert_eq!(
            decode_response(&[3, 4, 0, 1, 0, 2], &read),
            Ok(&[0, 1, 0, 2][..])
        );
        assert_eq!(
            decode_response(&[0x83, 2], &read),
            Err(ResponseError::Exception(2))
        );
        assert!(decode_response(&[3, 2, 0, 1], &read).is_err());
        assert!(decode_response(&[4, 4, 0, 1, 0, 2], &read).is_err());
        assert!(decode_response(&[], &read).is_err());
    }

    #[test]
    fn bad_register_lists_are_refused() {
        assert!(validate_registers(&[]).is_err());
        let twice = [
            reg("a", Table::Holding, 1, None),
            reg("a", Table::Input, 1, None),
        ];
        assert_eq!(validate_registers(&twice).unwrap_err().0, 1);
        let wrong = [reg("a", Table::Coil, 1, Some(ValueType::F32))];
        assert!(validate_registers(&wrong).is_err());
        let past = [reg("a", Table::Holding, 65_535, Some(ValueType::U32))];
        assert!(validate_registers(&past).is_err());
    }
}
