//! What deploy/ ships for monitoring: the Prometheus alert rules pass `promtool check rules`
//! and their unit tests (`promtool test rules`, Debian's prometheus package, installed by
//! scripts/test); every alert has a test that fires it and a section in docs/operations.md;
//! the Grafana dashboard's queries parse; and every metric either names is one the services
//! export (docs/metrics.md, which tests/end_to_end.rs keeps in step with the services).

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use common::peers::require;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(path)).unwrap()
}

fn promtool(args: &[&str], dir: &Path) {
    let promtool = require("promtool", "apt-get install prometheus");
    let output = Command::new(promtool)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Every `diode_...` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("diode_") {
        let start = i + at;
        let end = start
            + text[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(text.len() - start);
        if start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
            names.insert(text[start..end].to_owned());
        }
        i = end;
    }
    names
}

/// The names docs/metrics.md lists (its tables' first column).
fn documented() -> BTreeSet<String> {
    read("docs/metrics.md")
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_owned)
        .collect()
}

fn alerts() -> Vec<String> {
    read("deploy/prometheus/diode-alerts.yml")
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_alert_rules_pass_promtool_and_their_tests() {
    let dir = Path::new(ROOT).join("deploy/prometheus");
    promtool(&["check", "rules", "diode-alerts.yml"], &dir);
    promtool(&["test", "rules", "diode-alerts.test.yml"], &dir);
}

#[test]
fn every_alert_is_tested_firing_and_documented_for_the_on_call_operator() {
    let tests = read("deploy/prometheus/diode-alerts.test.yml");
    let operations = read("docs/operations.md");
    let alerts = alerts();
    assert!(alerts.len() >= 10, "{alerts:?}");
    for alert in &alerts {
        // A test case of this alert that expects it to fire (exp_alerts with labels).
        let fires = tests.split("- eval_time:").any(|case| {
            case.contains(&format!("alertname: {alert}\n")) && case.contains("exp_labels")
        });
        assert!(fires, "no test in diode-alerts.test.yml fires {alert}");
        assert!(
            operations.contains(&format!("### {alert}")),
            "docs/operations.md has no section `### {alert}`"
        );
    }
}

#[test]
fn rules_and_dashboard_name_only_metrics_the_services_export() {
    let documented = documented();
    // The rules without their comments, which speak of metrics in general (`diode_sender_*`).
    let rules: String = read("deploy/prometheus/diode-alerts.yml")
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    let dashboard = read("deploy/grafana/diode-dashboard.json");
    for (what, text) in [("the alert rules", &rules), ("the dashboard", &dashboard)] {
        for name in metric_names(text) {
            assert!(
                documented.contains(&name),
                "{what} name {name}, which no service exports (docs/metrics.md)"
            );
        }
    }
}

/// Grafana would show an error panel for a query that does not parse: each one is checked by
/// promtool as a recording rule.
#[test]
fn the_dashboard_queries_parse() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/diode-dashboard.json")).unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let mut count = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        assert!(panel["title"].as_str().is_some_and(|t| !t.is_empty()));
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            count += 1;
            rules += &format!(
                "      - record: dashboard_query_{count}\n        expr: {}\n",
                serde_json::to_string(expr).unwrap()
            );
        }
    }
    assert!(count >= 15, "{count} queries");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dashboard.yml"), rules).unwrap();
    promtool(&["check", "rules", "dashboard.yml"], dir.path());
}
