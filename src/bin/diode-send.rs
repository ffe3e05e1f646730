//! `diode-send`: the OT side of the diode.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use diode_gateway::service::{Service, Tool};
use diode_sender::config::Loaded;
use diode_sender::replay;

#[derive(Subcommand)]
enum SenderTool {
    /// Sends records again from the journal, through the sender running with this
    /// configuration: the ranges the IT side reports lost (`diode-recv gaps`, or its log).
    Replay {
        /// The sender's configuration file (or give --config before `replay`).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The topic, as configured.
        #[arg(long)]
        topic: String,
        /// Sequence numbers: `A-B`, or one number.
        #[arg(long)]
        seq: Option<String>,
        /// Only records taken in at or after this time (RFC 3339, e.g. 2026-12-03T16:00:00Z).
        #[arg(long)]
        since: Option<String>,
        /// Only records taken in at or before this time (RFC 3339).
        #[arg(long)]
        until: Option<String>,
        /// Say what the journal holds of it, and send nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Makes the OPC UA client certificate and key of an `opcua` source in its `pki_dir`
    /// (own/cert.der, private/private.pem, mode 0600) and the trusted/ directory where the plant
    /// server's certificate goes. Give own/cert.der to the plant server's administrator to trust.
    OpcuaCert {
        /// The source's `pki_dir`.
        #[arg(long)]
        pki_dir: PathBuf,
        /// This host's name, written in the certificate.
        #[arg(long, default_value = "localhost")]
        hostname: String,
    },
}

impl Tool for SenderTool {
    fn config(&self) -> Option<&Path> {
        match self {
            SenderTool::Replay { config, .. } => config.as_deref(),
            SenderTool::OpcuaCert { .. } => None,
        }
    }

    fn run_without_config(&self) -> Option<ExitCode> {
        let SenderTool::OpcuaCert { pki_dir, hostname } = self else {
            return None;
        };
        Some(
            match diode_sender::sources::opcua::make_client_certificate(pki_dir, hostname) {
                Ok(cert) => {
                    println!(
                        "wrote {}: trust it on the plant server; put the server's certificate in {}",
                        cert.display(),
                        pki_dir.join("trusted").display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            },
        )
    }
}

fn main() -> ExitCode {
    let service = Service {
        name: "diode-send",
        about: "Sends plant data one way across a data diode: sources in, paced FEC-protected datagrams out",
        load: diode_sender::config::load,
        describe: diode_sender::describe,
        tool: run_tool,
    };
    service.main(|loaded, shutdown| async move {
        diode_sender::start(loaded, shutdown)
            .await?
            .finished()
            .await;
        Ok::<(), diode_sender::StartError>(())
    })
}

fn run_tool(loaded: &Loaded, tool: SenderTool) -> ExitCode {
    let SenderTool::Replay {
        topic,
        seq,
        since,
        until,
        dry_run,
        ..
    } = tool
    else {
        unreachable!("opcua-cert runs without a configuration");
    };
    match replay_request(loaded, topic, seq, since, until, dry_run) {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn replay_request(
    loaded: &Loaded,
    topic: String,
    seq: Option<String>,
    since: Option<String>,
    until: Option<String>,
    dry_run: bool,
) -> Result<String, String> {
    let root = loaded
        .journal_dir
        .as_ref()
        .ok_or("this sender keeps no journal: add a [journal] section (docs/backfill.md)")?;
    let index = loaded
        .config
        .topics
        .iter()
        .position(|t| t.name == topic)
        .ok_or_else(|| format!("no topic {topic:?} in this configuration"))?;
    if loaded.journal_budgets[index].is_none() {
        return Err(format!(
            "topic {topic:?} is not journaled (its journal max_bytes is 0)"
        ));
    }
    if seq.is_none() && since.is_none() && until.is_none() {
        return Err("say which records: --seq A-B, --since and/or --until".into());
    }
    let seqs = match &seq {
        Some(text) => parse_seqs(text)
            .ok_or_else(|| format!("--seq {text:?}: expected A-B or one number, A <= B"))?,
        None => 0..=u64::MAX,
    };
    let time = |text: &Option<String>, default: i64, flag: &str| match text {
        Some(text) => humantime::parse_rfc3339_weak(text)
            .map_err(|e| format!("{flag} {text:?}: {e} (expected e.g. 2026-12-03T16:00:00Z)"))
            .and_then(|t| {
                t.duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_micros() as i64)
                    .map_err(|_| format!("{flag} {text:?} is before 1970"))
            }),
        None => Ok(default),
    };
    let times = time(&since, i64::MIN, "--since")?..=time(&until, i64::MAX, "--until")?;
    let request = replay::Request {
        topic: topic.clone(),
        seqs,
        times,
    };
    let found = replay::survey(root, &request)
        .map_err(|e| format!("cannot read the journal in {}: {e}", root.display()))?;
    let mut report = match found.span {
        Some(span) => format!(
            "journal of {topic:?}: seq {}-{}, taken in {} to {}, {} records, {} bytes\n",
            span.first_seq,
            span.last_seq,
            diode_common::format_rfc3339_us(span.first_time_us),
            diode_common::format_rfc3339_us(span.last_time_us),
            span.records,
            span.bytes
        ),
        None => format!("journal of {topic:?}: empty\n"),
    };
    let Some((first, last)) = found.matched_seqs else {
        return Err(format!(
            "{report}none of the requested records is in the journal: older than what it keeps \
             (journal max_bytes, max_age_secs), or never sent (a sender that crashed skips the \
             rest of its reserved sequence numbers)"
        ));
    };
    report += &format!(
        "requested: {} records in the journal, seq {first}-{last}\n",
        found.matched
    );
    if dry_run {
        report += "dry run: nothing sent\n";
        return Ok(report);
    }
    let path = replay::submit(root, &request)
        .map_err(|e| format!("cannot leave the request in {}: {e}", root.display()))?;
    let rate = loaded
        .config
        .journal
        .as_ref()
        .map_or(0.0, |j| j.replay_rate_mbps);
    report += &format!(
        "queued as {}: the running sender sends them within a second, at most {rate} Mb/s \
         (its log says \"replay: sent again from the journal\")\n",
        path.display()
    );
    Ok(report)
}

fn parse_seqs(text: &str) -> Option<std::ops::RangeInclusive<u64>> {
    let (first, last) = match text.split_once('-') {
        Some((a, b)) => (a.trim().parse().ok()?, b.trim().parse().ok()?),
        None => {
            let n = text.trim().parse().ok()?;
            (n, n)
        }
    };
    (first <= last).then_some(first..=last)
}
