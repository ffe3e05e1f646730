//! The status page: what an operator opens first. Served read-only on the metrics listener
//! (`/` as HTML, `/status.json` as the same data), with no script, no external asset and no
//! control of any kind, so it works on an air-gapped network and on a phone.
//!
//! Each service describes its page as a [`Layout`] over its own metrics (summary figures,
//! tables per topic or route, charts of rates); the page is built from the registry at each
//! request, so it can never disagree with `/metrics`. A history ring samples the charted
//! counters every [`HISTORY_STEP`] for the last hour. What metrics cannot say (the open gaps,
//! the session) the service sets as [`Notes`].

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::registry::Registry;
use serde::Serialize;

/// How often the charted counters are sampled, and how many samples are kept (an hour).
pub const HISTORY_STEP: Duration = Duration::from_secs(10);
const HISTORY_POINTS: usize = 360;
/// Gap lines shown at most (the newest).
const MAX_GAP_LINES: usize = 50;

/// One figure of the summary.
pub struct Figure {
    pub label: &'static str,
    pub metric: &'static str,
    pub unit: Unit,
    /// When the figure is a problem: above this it is shown as one.
    pub bad_above: Option<f64>,
    /// ... or below this.
    pub bad_below: Option<f64>,
}

impl Figure {
    /// A figure that is never shown as a problem.
    pub const fn new(label: &'static str, metric: &'static str, unit: Unit) -> Figure {
        Figure {
            label,
            metric,
            unit,
            bad_above: None,
            bad_below: None,
        }
    }

    /// A count any of which is a problem.
    pub const fn bad_if_any(label: &'static str, metric: &'static str) -> Figure {
        Figure {
            bad_above: Some(0.0),
            ..Figure::new(label, metric, Unit::Count)
        }
    }
}

#[derive(Clone, Copy)]
pub enum Unit {
    Count,
    Bytes,
    /// Unix seconds, shown as an age.
    Since,
    /// 1 is "up", 0 "down".
    UpDown,
    /// A fraction, shown as a percentage.
    Ratio,
}

/// A table with a row per value of `label` (a topic, a route). A column whose header ends in
/// `/s` shows its counter's rate over the last history step rather than its value; one whose
/// header ends in ` ago` holds Unix seconds and shows their age (`never` for 0).
pub struct Table {
    pub title: &'static str,
    pub label: &'static str,
    pub columns: &'static [(&'static str, &'static str)],
    /// Rows whose figures are all 0 are left out (reasons that never happened).
    pub only_nonzero: bool,
}

/// A chart of a counter's rate, scaled (8e-6 turns bytes into megabits).
pub struct Chart {
    pub title: &'static str,
    pub metric: &'static str,
    pub scale: f64,
    pub unit: &'static str,
}

pub struct Layout {
    pub service: &'static str,
    pub summary: &'static [Figure],
    pub tables: &'static [Table],
    pub charts: &'static [Chart],
}

/// What the service knows that its metrics do not say.
#[derive(Default, Clone, Serialize)]
pub struct Notes {
    /// (what, value) lines: the session, the link's state and since when, ...
    pub facts: Vec<(String, String)>,
    pub gaps: Vec<GapLine>,
    pub gaps_total: usize,
    /// Tables of what metrics do not hold (a topic's last record, a route's sink).
    pub tables: Vec<NoteTable>,
}

#[derive(Clone, Serialize)]
pub struct NoteTable {
    pub title: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

#[derive(Clone, Serialize)]
pub struct GapLine {
    pub topic: String,
    pub first_seq: u64,
    pub last_seq: u64,
    pub records: u64,
    pub after: String,
    pub before: String,
    pub replay: String,
}

/// The page's data: `/status.json` as it is, and the HTML rendered from it.
#[derive(Serialize)]
pub struct Status {
    pub service: &'static str,
    pub version: &'static str,
    pub time: String,
    pub summary: Vec<SummaryItem>,
    pub facts: Vec<(String, String)>,
    pub tables: Vec<TableData>,
    pub charts: Vec<ChartData>,
    pub gaps: Vec<GapLine>,
    pub gaps_total: usize,
    pub notes: Vec<NoteTable>,
}

#[derive(Serialize)]
pub struct SummaryItem {
    pub label: &'static str,
    pub metric: &'static str,
    pub value: f64,
    pub shown: String,
    pub bad: bool,
}

#[derive(Serialize)]
pub struct TableData {
    pub title: &'static str,
    pub label: &'static str,
    pub columns: Vec<&'static str>,
    /// Per row: the label's value, then one figure per column.
    pub rows: Vec<(String, Vec<f64>)>,
}

#[derive(Serialize)]
pub struct ChartData {
    pub title: &'static str,
    pub unit: &'static str,
    /// Rates, oldest first, one per HISTORY_STEP.
    pub points: Vec<f64>,
}

/// A service's status: its layout, its registry, its notes and the history ring.
pub struct Board {
    layout: &'static Layout,
    registry: Arc<Registry>,
    notes: Mutex<Notes>,
    /// Per chart: the counter's samples, oldest first.
    history: Mutex<Vec<VecDeque<f64>>>,
    /// The two latest samples of the tables' counters, per (metric, label value), and when:
    /// what rate columns are computed from.
    rates: Mutex<VecDeque<(std::time::Instant, Snapshot)>>,
}

/// Counter values by (metric, label value), for rates.
type Snapshot = BTreeMap<(String, String), f64>;

/// One series of the exposition text: its name, its labels, its value.
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

fn samples(registry: &Registry) -> Vec<Sample> {
    let mut text = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut text, registry);
    parse_exposition(&text).collect()
}

/// Every series of a Prometheus exposition text (comments skipped, lines that do not parse
/// left out): what this page and the project's scrapers (`diode_gateway::scrape`) read.
pub fn parse_exposition(text: &str) -> impl Iterator<Item = Sample> + '_ {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(parse_sample)
}

/// One line of the exposition text: `name{k="v",...} value`, label values unescaped (`\\`,
/// `\"`, `\n`): a topic may hold commas, quotes and equals signs.
fn parse_sample(line: &str) -> Option<Sample> {
    let (name, mut rest) = match line.find('{') {
        Some(at) => (&line[..at], &line[at + 1..]),
        None => {
            let (name, value) = line.split_once(' ')?;
            return Some(Sample {
                name: name.to_owned(),
                labels: BTreeMap::new(),
                value: value.trim().parse().ok()?,
            });
        }
    };
    let mut labels = BTreeMap::new();
    loop {
        rest = rest.trim_start_matches(',');
        if let Some(after) = rest.strip_prefix('}') {
            return Some(Sample {
                name: name.to_owned(),
                labels,
                value: after.trim().split(' ').next()?.parse().ok()?,
            });
        }
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.to_owned(), value);
        rest = &after[end + 1..];
    }
}

fn total(samples: &[Sample], name: &str) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .fold(0.0, |sum, s| sum + s.value)
}

impl Board {
    pub fn new(layout: &'static Layout, registry: Arc<Registry>) -> Arc<Self> {
        Arc::new(Board {
            layout,
            registry,
            notes: Mutex::new(Notes::default()),
            history: Mutex::new(vec![VecDeque::new(); layout.charts.len()]),
            rates: Mutex::new(VecDeque::new()),
        })
    }

    pub fn set_notes(&self, notes: Notes) {
        *self.notes.lock().unwrap_or_else(|e| e.into_inner()) = notes;
    }

    /// Takes one sample of every charted counter (every HISTORY_STEP).
    pub fn sample(&self) {
        let samples = samples(&self.registry);
        let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        for (chart, ring) in self.layout.charts.iter().zip(history.iter_mut()) {
            if ring.len() == HISTORY_POINTS + 1 {
                ring.pop_front();
            }
            ring.push_back(total(&samples, chart.metric));
        }
        drop(history);
        let mut snapshot = BTreeMap::new();
        for table in self.layout.tables {
            for (_, metric) in table.columns.iter().filter(|(h, _)| h.ends_with("/s")) {
                for s in samples.iter().filter(|s| s.name == *metric) {
                    if let Some(key) = s.labels.get(table.label) {
                        *snapshot
                            .entry((metric.to_string(), key.clone()))
                            .or_insert(0.0) += s.value;
                    }
                }
            }
        }
        let mut rates = self.rates.lock().unwrap_or_else(|e| e.into_inner());
        if rates.len() == 2 {
            rates.pop_front();
        }
        rates.push_back((std::time::Instant::now(), snapshot));
    }

    /// A counter's rate per second over the last step, for a table's rate column.
    fn rate(&self, metric: &str, key: &str) -> f64 {
        let rates = self.rates.lock().unwrap_or_else(|e| e.into_inner());
        let (Some((t0, before)), Some((t1, after))) = (rates.front(), rates.back()) else {
            return 0.0;
        };
        let seconds = t1.duration_since(*t0).as_secs_f64();
        let id = (metric.to_owned(), key.to_owned());
        match (before.get(&id), after.get(&id)) {
            (Some(a), Some(b)) if seconds > 0.0 => (b - a).max(0.0) / seconds,
            _ => 0.0,
        }
    }

    pub fn status(&self) -> Status {
        let samples = samples(&self.registry);
        let now_s = crate::unix_time_us() as f64 / 1e6;
        let summary = self
            .layout
            .summary
            .iter()
            .map(|f| {
                let value = total(&samples, f.metric);
                let shown = match f.unit {
                    Unit::Count => count(value),
                    Unit::Bytes => bytes(value),
                    Unit::UpDown if value >= 1.0 => "up".to_owned(),
                    Unit::UpDown => "down".to_owned(),
                    Unit::Since if value <= 0.0 => "never".to_owned(),
                    Unit::Since => format!("{} ago", age(now_s - value)),
                    Unit::Ratio => format!("{:.2} %", value * 100.0),
                };
                let compared = match f.unit {
                    Unit::Since if value > 0.0 => now_s - value,
                    _ => value,
                };
                let bad = f.bad_above.is_some_and(|b| compared > b)
                    || f.bad_below.is_some_and(|b| compared < b);
                SummaryItem {
                    label: f.label,
                    metric: f.metric,
                    value,
                    shown,
                    bad,
                }
            })
            .collect();
        let tables = self
            .layout
            .tables
            .iter()
            .map(|t| {
                let mut rows: BTreeMap<String, Vec<f64>> = BTreeMap::new();
                for (i, (header, metric)) in t.columns.iter().enumerate() {
                    for s in samples.iter().filter(|s| s.name == *metric) {
                        if let Some(key) = s.labels.get(t.label) {
                            let row = rows
                                .entry(key.clone())
                                .or_insert_with(|| vec![0.0; t.columns.len()]);
                            if header.ends_with("/s") {
                                row[i] = self.rate(metric, key);
                            } else {
                                row[i] += s.value;
                            }
                        }
                    }
                }
                TableData {
                    title: t.title,
                    label: t.label,
                    columns: t.columns.iter().map(|(h, _)| *h).collect(),
                    rows: rows
                        .into_iter()
                        .filter(|(_, v)| !t.only_nonzero || v.iter().any(|x| *x != 0.0))
                        .collect(),
                }
            })
            .collect();
        let history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        let step = HISTORY_STEP.as_secs_f64();
        let charts = self
            .layout
            .charts
            .iter()
            .zip(history.iter())
            .map(|(chart, ring)| ChartData {
                title: chart.title,
                unit: chart.unit,
                points: ring
                    .iter()
                    .zip(ring.iter().skip(1))
                    // A counter that went back is a restart: no rate for that step.
                    .map(|(a, b)| ((b - a).max(0.0) / step) * chart.scale)
                    .collect(),
            })
            .collect();
        let notes = self.notes.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Status {
            service: self.layout.service,
            version: env!("CARGO_PKG_VERSION"),
            time: crate::format_rfc3339_us(crate::unix_time_us()),
            summary,
            facts: notes.facts,
            tables,
            charts,
            gaps: notes.gaps,
            gaps_total: notes.gaps_total,
            notes: notes.tables,
        }
    }
}

/// The newest open gaps (by when their records were taken in) as the page lists them, with
/// the command that replays each. Only those shown are formatted.
pub fn gap_lines(gaps: &[(impl AsRef<str>, u64, u64, i64, i64)]) -> (Vec<GapLine>, usize) {
    let mut newest: Vec<usize> = (0..gaps.len()).collect();
    if newest.len() > MAX_GAP_LINES {
        newest.select_nth_unstable_by_key(MAX_GAP_LINES, |&i| std::cmp::Reverse(gaps[i].4));
        newest.truncate(MAX_GAP_LINES);
    }
    newest.sort_by_key(|&i| std::cmp::Reverse(gaps[i].4));
    let time = |us: i64| {
        if us == 0 {
            "unknown".to_owned()
        } else {
            crate::format_rfc3339_us(us)
        }
    };
    let lines: Vec<GapLine> = newest
        .into_iter()
        .map(|i| &gaps[i])
        .map(|(topic, first, last, after, before)| GapLine {
            topic: topic.as_ref().to_owned(),
            first_seq: *first,
            last_seq: *last,
            records: last.saturating_sub(*first).saturating_add(1),
            after: time(*after),
            before: time(*before),
            replay: format!(
                "diode-send replay --topic {} --seq {first}-{last}",
                crate::shell_quote(topic.as_ref())
            ),
        })
        .collect();
    (lines, gaps.len())
}

fn count(v: f64) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    let v = v.round() as i64;
    let digits = v.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if v < 0 {
        out.insert(0, '-');
    }
    out
}

fn bytes(v: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = v;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn age(secs: f64) -> String {
    let secs = secs.max(0.0);
    if secs < 120.0 {
        format!("{secs:.0} s")
    } else if secs < 7200.0 {
        format!("{:.0} min", secs / 60.0)
    } else {
        format!("{:.1} h", secs / 3600.0)
    }
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// An inline SVG line of the points, scaled to its own maximum.
fn sparkline(points: &[f64]) -> String {
    let (w, h) = (360.0, 60.0);
    let max = points.iter().copied().fold(0.0, f64::max);
    let mut path = String::new();
    let n = points.len().max(2) as f64 - 1.0;
    for (i, p) in points.iter().enumerate() {
        let x = i as f64 * w / n;
        let y = if max > 0.0 {
            h - p / max * (h - 4.0) - 2.0
        } else {
            h - 2.0
        };
        let _ = write!(path, "{}{x:.1},{y:.1} ", if i == 0 { "M" } else { "L" });
    }
    format!(
        "<svg viewBox=\"0 0 {w} {h}\" width=\"100%\" height=\"60\" role=\"img\" \
         preserveAspectRatio=\"none\"><path d=\"{path}\" fill=\"none\" stroke=\"#2a6\" \
         stroke-width=\"1.5\"/></svg>"
    )
}

fn figure(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        count(v)
    } else {
        format!("{v:.2}")
    }
}

/// The HTML page of a status: no script, no external asset, refreshed every 10 s.
pub fn html(status: &Status) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta http-equiv=\"refresh\" content=\"10\"><title>{service} status</title><style>\
         body{{font-family:system-ui,sans-serif;margin:1em;max-width:60em;color:#222}}\
         h1{{font-size:1.3em}} h2{{font-size:1.1em;margin-top:1.5em}}\
         .cards{{display:flex;flex-wrap:wrap;gap:.5em}}\
         .card{{border:1px solid #ccc;border-radius:6px;padding:.4em .7em;min-width:9em}}\
         .card b{{display:block;font-size:1.2em}} .bad{{border-color:#c33;background:#fee}}\
         .scroll{{overflow-x:auto}} table{{border-collapse:collapse}}\
         td,th{{border-bottom:1px solid #ddd;padding:.2em .6em;text-align:right}}\
         td:first-child,th:first-child{{text-align:left}} code{{font-size:.9em}}\
         </style></head><body><h1>{service} <small>{version}</small></h1>\
         <p>As of <time id=\"time\">{time}</time>; read-only; the same data as \
         <a href=\"/status.json\">/status.json</a> and <a href=\"/metrics\">/metrics</a>.</p>",
        service = escape(status.service),
        version = escape(status.version),
        time = escape(&status.time),
    );
    out.push_str("<div class=\"cards\" id=\"summary\">");
    for item in &status.summary {
        let _ = write!(
            out,
            "<div class=\"card{}\" data-metric=\"{}\">{}<b>{}</b></div>",
            if item.bad { " bad" } else { "" },
            escape(item.metric),
            escape(item.label),
            escape(&item.shown)
        );
    }
    out.push_str("</div>");
    if !status.facts.is_empty() {
        out.push_str("<h2>Link</h2><table id=\"facts\">");
        for (what, value) in &status.facts {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td></tr>",
                escape(what),
                escape(value)
            );
        }
        out.push_str("</table>");
    }
    if status.service == "diode-recv" {
        let _ = write!(
            out,
            "<h2>Open gaps ({})</h2><div class=\"scroll\"><table id=\"gaps\">",
            status.gaps_total
        );
        if status.gaps.is_empty() {
            out.push_str("<tr><td>none: nothing is missing</td></tr>");
        } else {
            out.push_str(
                "<tr><th>topic</th><th>seq</th><th>records</th><th>taken in between</th>\
                 <th>to send again (OT side)</th></tr>",
            );
        }
        for gap in &status.gaps {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}-{}</td><td>{}</td><td>{} and {}</td><td><code>{}</code></td></tr>",
                escape(&gap.topic),
                gap.first_seq,
                gap.last_seq,
                count(gap.records as f64),
                escape(&gap.after),
                escape(&gap.before),
                escape(&gap.replay)
            );
        }
        out.push_str("</table></div>");
    }
    for table in &status.notes {
        let _ = write!(
            out,
            "<h2>{}</h2><div class=\"scroll\"><table><tr>",
            escape(&table.title)
        );
        for column in &table.columns {
            let _ = write!(out, "<th>{}</th>", escape(column));
        }
        out.push_str("</tr>");
        for row in &table.rows {
            out.push_str("<tr>");
            for cell in row {
                let _ = write!(out, "<td>{}</td>", escape(cell));
            }
            out.push_str("</tr>");
        }
        out.push_str("</table></div>");
    }
    for table in &status.tables {
        let _ = write!(
            out,
            "<h2>{}</h2><div class=\"scroll\"><table><tr><th>{}</th>",
            escape(table.title),
            escape(table.label)
        );
        for column in &table.columns {
            let _ = write!(out, "<th>{}</th>", escape(column));
        }
        out.push_str("</tr>");
        let now_s = crate::unix_time_us() as f64 / 1e6;
        for (key, values) in &table.rows {
            let _ = write!(out, "<tr><td>{}</td>", escape(key));
            for (v, header) in values.iter().zip(&table.columns) {
                let shown = match header.ends_with(" ago") {
                    true if *v <= 0.0 => "never".to_owned(),
                    true => age(now_s - v),
                    false => figure(*v),
                };
                let _ = write!(out, "<td>{shown}</td>");
            }
            out.push_str("</tr>");
        }
        if table.rows.is_empty() {
            out.push_str("<tr><td>none yet</td></tr>");
        }
        out.push_str("</table></div>");
    }
    out.push_str("<h2>The last hour</h2>");
    for chart in &status.charts {
        let last = chart.points.last().copied().unwrap_or(0.0);
        let max = chart.points.iter().copied().fold(0.0, f64::max);
        let _ = write!(
            out,
            "<p>{} <small>now {:.1} {unit}, peak {:.1} {unit}</small></p>{}",
            escape(chart.title),
            last,
            max,
            if chart.points.len() < 2 {
                "<p><small>(a point every 10 s; the chart fills as the service runs)</small></p>"
                    .to_owned()
            } else {
                sparkline(&chart.points)
            },
            unit = escape(chart.unit)
        );
    }
    out.push_str("</body></html>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::EncodeLabelSet;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;

    #[derive(Clone, Hash, PartialEq, Eq, EncodeLabelSet, Debug)]
    struct Topic {
        topic: String,
    }

    static LAYOUT: Layout = Layout {
        service: "diode-recv",
        summary: &[Figure {
            label: "Records lost",
            metric: "diode_records_lost_total",
            unit: Unit::Count,
            bad_above: Some(0.0),
            bad_below: None,
        }],
        tables: &[Table {
            title: "Topics",
            label: "topic",
            columns: &[
                ("lost", "diode_records_lost_total"),
                ("lost/s", "diode_records_lost_total"),
            ],
            only_nonzero: false,
        }],
        charts: &[Chart {
            title: "lost",
            metric: "diode_records_lost_total",
            scale: 1.0,
            unit: "/s",
        }],
    };

    #[test]
    fn label_values_with_commas_quotes_and_escapes_are_read_whole() {
        let s = parse_sample(r#"diode_x_total{topic="a,b=\"c\"\\d",route="r"} 7"#).unwrap();
        assert_eq!(s.name, "diode_x_total");
        assert_eq!(s.labels["topic"], r#"a,b="c"\d"#);
        assert_eq!(s.labels["route"], "r");
        assert_eq!(s.value, 7.0);
        assert_eq!(parse_sample("diode_up 1").unwrap().value, 1.0);
        assert!(parse_sample(r#"diode_x{topic="unterminated} 1"#).is_none());
        assert_eq!(count(f64::NEG_INFINITY), "-inf");
    }

    #[test]
    fn the_page_shows_what_the_metrics_say_escaped() {
        let mut registry = Registry::default();
        let lost: Family<Topic, Counter> = Family::default();
        registry.register("diode_records_lost", "lost", lost.clone());
        lost.get_or_create(&Topic {
            topic: "<script>x".into(),
        })
        .inc_by(1234);
        let board = Board::new(&LAYOUT, Arc::new(registry));
        board.sample();
        lost.get_or_create(&Topic {
            topic: "<script>x".into(),
        })
        .inc_by(1000);
        board.sample();
        board.sample();
        let (gaps, total) = gap_lines(&[("a'b", 5u64, 9u64, 0i64, 1_764_100_000_000_000i64)]);
        board.set_notes(Notes {
            facts: vec![("Session".into(), "0123".into())],
            gaps,
            gaps_total: total,
            tables: vec![NoteTable {
                title: "Routes".into(),
                columns: vec!["route".into(), "sink".into()],
                rows: vec![vec!["0-file".into(), "<file>".into()]],
            }],
        });
        let status = board.status();
        assert_eq!(status.summary[0].value, 2234.0);
        assert!(status.summary[0].bad);
        // The rate over the last step: nothing was lost between the last two samples.
        assert_eq!(status.tables[0].rows[0].1, vec![2234.0, 0.0]);
        assert_eq!(status.charts[0].points, vec![100.0, 0.0], "per second");
        let page = html(&status);
        assert!(page.contains("2,234"), "{page}");
        assert!(
            page.contains("<svg") && page.contains("peak 100.0 /s"),
            "{page}"
        );
        assert!(!page.contains("<script>"), "escaped");
        assert!(page.contains("&lt;script&gt;x"));
        assert!(
            page.contains("<td>0-file</td><td>&lt;file&gt;</td>"),
            "{page}"
        );
        assert!(
            page.contains("5-9") && page.contains("--topic &#39;a&#39;\\&#39;&#39;b&#39;"),
            "{page}"
        );
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["gaps"][0]["records"], 5);
    }
}
