//! The receiver's own security events (docs/operations.md, "Security events"): structured log
//! lines under the target `diode::security`, and, with `[security_events]` configured, RFC 5424
//! messages to a SIEM through the syslog sink's own code path (an internal route). Each kind
//! has a message id. Floods are aggregated: rejected datagrams and lost records are reported
//! at most once per reason every [`REPORT_INTERVAL`], whatever their number, so a flood of
//! forged datagrams costs the SIEM a handful of messages, not one per datagram.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use diode_wire::{proto, Record, Rejected};

use crate::route::Router;

/// Rejections and losses are summed over this long before they are reported.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// The kinds of event, with their RFC 5424 MSGID and severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The service started with a configuration.
    Config,
    /// A sender session started, or a new one replaced another.
    Session,
    LinkUp,
    LinkDown,
    /// Datagrams refused as forged (`auth`), replayed (`replay`), from a host that is not the
    /// diode (`source`), or from an unproven session (`unconfirmed`).
    Rejected,
    /// Records lost beyond repair.
    Loss,
    /// The key that authenticates the sender's datagrams changed (a rotation, §2.1).
    Key,
}

impl Kind {
    pub fn msgid(self) -> &'static str {
        match self {
            Kind::Config => "DIODE_CONFIG",
            Kind::Session => "DIODE_SESSION",
            Kind::LinkUp => "DIODE_LINK_UP",
            Kind::LinkDown => "DIODE_LINK_DOWN",
            Kind::Rejected => "DIODE_REJECTED",
            Kind::Loss => "DIODE_LOSS",
            Kind::Key => "DIODE_KEY",
        }
    }

    /// RFC 5424 severity: 4 warning, 5 notice, 6 informational.
    fn severity(self) -> u64 {
        match self {
            Kind::Rejected | Kind::Loss => 4,
            Kind::Session | Kind::LinkDown | Kind::Key => 5,
            Kind::Config | Kind::LinkUp => 6,
        }
    }
}

/// The reasons of rejection that are security events (the others are link damage).
const SECURITY_REASONS: [Rejected; 3] = [Rejected::Auth, Rejected::Replay, Rejected::Unconfirmed];

pub struct SecurityEvents {
    /// The internal route to the SIEM, if configured.
    route: Option<usize>,
    hostname: String,
    /// Counts as last reported: per security reason, then `source`, then records lost.
    reported: [u64; SECURITY_REASONS.len() + 2],
    next_report: Instant,
    /// The events' sequence numbers, shared by every lane's link thread (wire-format.md §7):
    /// one topic, numbered once, handed to the route in that order.
    seq: Arc<std::sync::Mutex<u64>>,
    /// With several lanes, each message says which lane it is about.
    lane: Option<usize>,
}

impl SecurityEvents {
    /// `seq` is shared by the lanes; `lane` is set when there are several.
    pub fn new(route: Option<usize>, seq: Arc<std::sync::Mutex<u64>>, lane: Option<usize>) -> Self {
        SecurityEvents {
            route,
            hostname: diode_common::hostname(),
            reported: [0; SECURITY_REASONS.len() + 2],
            next_report: Instant::now() + REPORT_INTERVAL,
            seq,
            lane,
        }
    }

    /// One event: a log line and, when configured, a syslog message.
    pub fn emit(&mut self, router: &mut Router, kind: Kind, message: String) {
        let message = match self.lane {
            Some(lane) => format!("lane {lane}: {message}"),
            None => message,
        };
        if kind.severity() <= 4 {
            tracing::warn!(target: "diode::security", msgid = kind.msgid(), "{message}");
        } else {
            tracing::info!(target: "diode::security", msgid = kind.msgid(), "{message}");
        }
        let Some(route) = self.route else {
            return;
        };
        // The syslog sink takes host, application, facility, severity and message id from a
        // record whose origin says it is syslog (sinks/syslog.rs); facility 10 is authpriv.
        let payload = serde_json::json!({
            "format": "rfc5424",
            "raw": "",
            "facility": 10,
            "severity": kind.severity(),
            "host": self.hostname,
            "app": "diode-recv",
            "msgid": kind.msgid(),
            "message": message,
        });
        // Numbered and handed over under one lock, so that the route gets them in order.
        let mut seq = self.seq.lock().unwrap_or_else(|e| e.into_inner());
        let record = Record {
            topic: Arc::from("diode/security-events"),
            seq: *seq,
            session_id: 0,
            time_us: diode_common::unix_time_us(),
            origin: Some(proto::Origin {
                protocol: "syslog".into(),
                ..Default::default()
            }),
            late: false,
            payload: Bytes::from(payload.to_string()),
        };
        *seq += 1;
        router.push_now(route, &record);
    }

    /// Reports what was rejected or lost since the last report, once per interval at most.
    pub fn tick(
        &mut self,
        router: &mut Router,
        now: Instant,
        stats: &diode_wire::ReassemblerStats,
        refused_source: u64,
        last: bool,
    ) {
        if now < self.next_report && !last {
            return;
        }
        self.next_report = now + REPORT_INTERVAL;
        let counts: Vec<(&str, u64)> = SECURITY_REASONS
            .iter()
            .map(|r| (r.as_str(), stats.rejected(*r)))
            .chain([("source", refused_source)])
            .collect();
        for (i, (reason, count)) in counts.into_iter().enumerate() {
            let new = count.saturating_sub(self.reported[i]);
            self.reported[i] = count;
            if new > 0 {
                let message = format!(
                    "{new} datagrams rejected as {reason} in the last {} s",
                    REPORT_INTERVAL.as_secs()
                );
                self.emit(router, Kind::Rejected, message);
            }
        }
        let lost = stats.records_lost;
        let new = lost.saturating_sub(self.reported[SECURITY_REASONS.len() + 1]);
        self.reported[SECURITY_REASONS.len() + 1] = lost;
        if new > 0 {
            let message = format!(
                "{new} records lost beyond repair in the last {} s (ranges in the log and in diode-recv gaps)",
                REPORT_INTERVAL.as_secs()
            );
            self.emit(router, Kind::Loss, message);
        }
    }
}
