//! The diode link protocol, shared by `diode-send` and `diode-recv`, as deterministic state
//! machines with no sockets and no clock (the quinn-proto model): time is passed in, datagrams are
//! bytes in and out. The format is specified in `docs/wire-format.md`.
//!
//! - [`Encoder`]: records in (`push`), datagrams out (`poll_transmit`, or
//!   `poll_transmit_batch` for one paced send of up to N datagrams), timers via `poll_timeout` /
//!   `handle_timeout`.
//! - [`Reassembler`]: datagrams in (`handle_datagram`), records, gaps and link events out
//!   (`poll_event`), timers via `poll_timeout` / `handle_timeout`.
//! - [`Pacer`]: the rate ceiling the encoder keeps to.
//! - [`sim`]: an impaired in-memory link for tests.

pub mod auth;
pub mod datagram;
pub mod encoder;
pub mod fec;
pub mod files;
pub mod frames;
pub mod gaps;
pub mod pacer;
pub mod reassembler;
pub mod sim;
pub mod stored;

pub use auth::LinkKey;
pub use datagram::Rejected;
pub use encoder::{
    Batch, Encoder, EncoderConfig, EncoderConfigError, EncoderStats, PushError, RecordLimits,
    RecordTooLarge, TopicId,
};
pub use fec::{DesignPoint, ParityPlan};
pub use frames::{is_valid_topic, origin_is_present, proto};
pub use gaps::OpenGap;
pub use pacer::Pacer;
pub use reassembler::{
    Event, Gap, Mark, Reassembler, ReassemblerConfig, ReassemblerStats, Record, ReplayFloor,
    TopicHandover,
};
