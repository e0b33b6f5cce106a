//! `bench report`: medians and spread over repeated runs, as JSON, Markdown and an SVG chart.
//!
//! The input is JSON lines, each the `--json` output of one run with labels `peer`, `placement`
//! and `rep` (set by scripts/bench-compare), and optionally `case`. Runs are grouped by
//! (placement, mode[:case], peer).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;
use serde::Serialize;
use serde_json::Value;

/// A metric shown for a mode: JSON pointer, column title, and whether higher is better.
struct Metric {
    pointer: &'static str,
    title: &'static str,
    higher_is_better: bool,
}

const fn metric(pointer: &'static str, title: &'static str, higher_is_better: bool) -> Metric {
    Metric {
        pointer,
        title,
        higher_is_better,
    }
}

/// The metrics per mode; the first is the headline drawn in the chart.
fn metrics(mode: &str) -> &'static [Metric] {
    let mode = mode.split(':').next().unwrap_or(mode);
    const CONNRATE: &[Metric] = &[
        metric("/operations_per_second", "conn/s", true),
        metric("/latency_us/p50", "p50 µs", false),
        metric("/latency_us/p99", "p99 µs", false),
        metric("/cpu/proxy_us_per_operation", "proxy CPU µs/conn", false),
        metric("/cpu/system_us_per_operation", "system CPU µs/conn", false),
        metric("/errors_total", "errors", false),
    ];
    const RR: &[Metric] = &[
        metric("/latency_us/p99", "p99 µs", false),
        metric("/latency_us/p50", "p50 µs", false),
        metric("/latency_us/p999", "p99.9 µs", false),
        metric("/operations_per_second", "req/s", true),
        metric("/cpu/proxy_us_per_operation", "proxy CPU µs/req", false),
        metric("/errors_total", "errors", false),
    ];
    const BULK: &[Metric] = &[
        metric("/gbit_per_second", "Gbit/s", true),
        metric("/cpu/proxy_seconds_per_gb", "proxy CPU s/GB", false),
        metric("/cpu/system_seconds_per_gb", "system CPU s/GB", false),
        metric("/errors_total", "errors", false),
    ];
    const IDLE: &[Metric] = &[
        metric(
            "/memory/proxy_pss_per_connection",
            "proxy PSS B/conn",
            false,
        ),
        metric("/memory/kernel_per_connection", "kernel B/conn", false),
        metric("/memory/connections", "connections", true),
        metric("/errors_total", "errors", false),
    ];
    match mode {
        "connrate" => CONNRATE,
        "rr" => RR,
        "bulk" => BULK,
        "idle" => IDLE,
        _ => &[],
    }
}

#[derive(Debug, Clone, Serialize)]
struct Summary {
    median: f64,
    min: f64,
    max: f64,
    runs: usize,
}

fn summarize(values: &mut [f64]) -> Option<Summary> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    let median = if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    };
    Some(Summary {
        median,
        min: values[0],
        max: values[values.len() - 1],
        runs: values.len(),
    })
}

/// (placement, mode) → peer (in first-seen order) → metric title → summary.
type Table = BTreeMap<(String, String), Vec<(String, BTreeMap<String, Summary>)>>;

pub fn run(input: &Path, out_dir: &Path) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(input).with_context(|| format!("reading {}", input.display()))?;
    // (placement, mode, peer) → metric → values, keeping the peers' first-seen order.
    let mut peers_in_order: Vec<String> = Vec::new();
    let mut values: BTreeMap<(String, String, String), BTreeMap<&'static str, Vec<f64>>> =
        BTreeMap::new();
    for (number, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let run: Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", input.display(), number + 1))?;
        let label = |key: &str| {
            run.pointer(&format!("/labels/{key}"))
                .and_then(Value::as_str)
                .unwrap_or("-")
                .to_owned()
        };
        // A `case` label splits one mode into several tables (rr at 1 and at 64 connections,
        // open-loop rates); the part before the colon still names the mode's metrics.
        let mode = run
            .pointer("/mode")
            .and_then(Value::as_str)
            .unwrap_or("-")
            .to_owned();
        let mode = match run.pointer("/labels/case").and_then(Value::as_str) {
            Some(case) => format!("{mode}:{case}"),
            None => mode,
        };
        let peer = label("peer");
        if !peers_in_order.contains(&peer) {
            peers_in_order.push(peer.clone());
        }
        let entry = values
            .entry((label("placement"), mode.clone(), peer))
            .or_default();
        for metric in metrics(&mode) {
            if let Some(value) = run.pointer(metric.pointer).and_then(Value::as_f64) {
                entry.entry(metric.title).or_default().push(value);
            }
        }
    }
    let mut table: Table = BTreeMap::new();
    for peer in &peers_in_order {
        for ((placement, mode, run_peer), metrics) in &mut values {
            if run_peer != peer {
                continue;
            }
            let summaries = metrics
                .iter_mut()
                .filter_map(|(title, values)| summarize(values).map(|s| ((*title).to_owned(), s)))
                .collect();
            table
                .entry((placement.clone(), mode.clone()))
                .or_default()
                .push((peer.clone(), summaries));
        }
    }
    std::fs::create_dir_all(out_dir)?;
    let json: BTreeMap<String, BTreeMap<String, &BTreeMap<String, Summary>>> = table
        .iter()
        .map(|((placement, mode), peers)| {
            (
                format!("{placement}/{mode}"),
                peers.iter().map(|(peer, s)| (peer.clone(), s)).collect(),
            )
        })
        .collect();
    std::fs::write(
        out_dir.join("summary.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    std::fs::write(out_dir.join("summary.md"), markdown(&table))?;
    std::fs::write(out_dir.join("chart.svg"), chart(&table))?;
    print!("{}", markdown(&table));
    Ok(())
}

fn format_value(value: f64) -> String {
    if value.abs() >= 100.0 || value.fract() == 0.0 {
        format!("{value:.0}")
    } else if value.abs() >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

fn markdown(table: &Table) -> String {
    let mut out = String::new();
    for ((placement, mode), peers) in table {
        let metrics = metrics(mode);
        let _ = writeln!(out, "### {mode}, placement {placement}\n");
        let _ = write!(out, "| peer |");
        for metric in metrics {
            let _ = write!(out, " {} |", metric.title);
        }
        let _ = writeln!(
            out,
            " ×direct ({}) |",
            metrics.first().map_or("", |m| m.title)
        );
        let _ = writeln!(out, "|---|{}---|", "---|".repeat(metrics.len()));
        let direct = peers
            .iter()
            .find(|(peer, _)| peer == "direct")
            .and_then(|(_, s)| metrics.first().and_then(|m| s.get(m.title)))
            .map(|s| s.median);
        for (peer, summaries) in peers {
            let _ = write!(out, "| {peer} |");
            for metric in metrics {
                match summaries.get(metric.title) {
                    Some(s) if s.runs > 1 => {
                        let _ = write!(
                            out,
                            " {} ({}–{}) |",
                            format_value(s.median),
                            format_value(s.min),
                            format_value(s.max)
                        );
                    }
                    Some(s) => {
                        let _ = write!(out, " {} |", format_value(s.median));
                    }
                    None => {
                        let _ = write!(out, " – |");
                    }
                }
            }
            let headline = metrics.first().and_then(|m| summaries.get(m.title));
            match (headline, direct) {
                (Some(s), Some(d)) if d != 0.0 => {
                    let _ = writeln!(out, " {:.2} |", s.median / d);
                }
                _ => {
                    let _ = writeln!(out, " – |");
                }
            }
        }
        let _ = writeln!(out, "\nMedian (min–max) over the repetitions.\n");
    }
    out
}

/// One panel per (placement, mode) with a bar per peer for the headline metric, whiskers from
/// min to max. Hand-written SVG keeps the bench free of plotting dependencies.
fn chart(table: &Table) -> String {
    const PANEL_WIDTH: f64 = 360.0;
    const PANEL_HEIGHT: f64 = 260.0;
    const COLUMNS: usize = 2;
    const COLORS: &[&str] = &[
        "#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c",
    ];
    let panels = table.len().max(1);
    let rows = panels.div_ceil(COLUMNS);
    let width = PANEL_WIDTH * COLUMNS as f64;
    let height = PANEL_HEIGHT * rows as f64;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (index, ((placement, mode), peers)) in table.iter().enumerate() {
        let Some(metric) = metrics(mode).first() else {
            continue;
        };
        let x0 = PANEL_WIDTH * (index % COLUMNS) as f64;
        let y0 = PANEL_HEIGHT * (index / COLUMNS) as f64;
        let better = if metric.higher_is_better {
            "higher is better"
        } else {
            "lower is better"
        };
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" font-size="13" font-weight="bold">{mode} ({placement}): {} — {better}</text>"#,
            x0 + 10.0,
            y0 + 18.0,
            escape(metric.title)
        );
        let bars: Vec<(&String, &Summary)> = peers
            .iter()
            .filter_map(|(peer, s)| s.get(metric.title).map(|s| (peer, s)))
            .collect();
        let top = bars
            .iter()
            .map(|(_, s)| s.max)
            .fold(0.0, f64::max)
            .max(f64::MIN_POSITIVE);
        let plot_left = x0 + 10.0;
        let plot_bottom = y0 + PANEL_HEIGHT - 50.0;
        let plot_height = PANEL_HEIGHT - 90.0;
        let slot = (PANEL_WIDTH - 20.0) / bars.len().max(1) as f64;
        let scale = |value: f64| plot_height * value / top;
        let _ = writeln!(
            svg,
            r##"<line x1="{plot_left}" y1="{plot_bottom}" x2="{}" y2="{plot_bottom}" stroke="#333"/>"##,
            x0 + PANEL_WIDTH - 10.0
        );
        for (bar, (peer, summary)) in bars.iter().enumerate() {
            let x = plot_left + slot * bar as f64 + slot * 0.15;
            let bar_width = slot * 0.7;
            let color = COLORS[bar % COLORS.len()];
            let height = scale(summary.median);
            let _ = writeln!(
                svg,
                r#"<rect x="{x:.1}" y="{:.1}" width="{bar_width:.1}" height="{height:.1}" fill="{color}"/>"#,
                plot_bottom - height
            );
            let middle = x + bar_width / 2.0;
            let _ = writeln!(
                svg,
                r##"<line x1="{middle:.1}" y1="{:.1}" x2="{middle:.1}" y2="{:.1}" stroke="#000"/>"##,
                plot_bottom - scale(summary.min),
                plot_bottom - scale(summary.max)
            );
            let _ = writeln!(
                svg,
                r#"<text x="{middle:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                plot_bottom - scale(summary.max) - 4.0,
                format_value(summary.median)
            );
            let _ = writeln!(
                svg,
                r#"<text x="{middle:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                plot_bottom + 14.0,
                escape(peer)
            );
        }
    }
    let _ = writeln!(svg, "</svg>");
    svg
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        let summary = summarize(&mut [3.0, 1.0, 2.0]).map(|s| (s.median, s.min, s.max));
        assert_eq!(summary, Some((2.0, 1.0, 3.0)));
        let even = summarize(&mut [4.0, 1.0, 2.0, 3.0]).map(|s| s.median);
        assert_eq!(even, Some(2.5));
        assert!(summarize(&mut []).is_none());
    }

    #[test]
    fn a_case_label_splits_a_mode_into_its_own_table() {
        let dir = std::env::temp_dir().join(format!("bench-aggregate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let input = dir.join("results.jsonl");
        let lines = [
            r#"{"mode":"rr","operations_per_second":10,"labels":{"peer":"a","placement":"P2","case":"c1"}}"#,
            r#"{"mode":"rr","operations_per_second":99,"labels":{"peer":"a","placement":"P2","case":"c64"}}"#,
            r#"{"mode":"rr","operations_per_second":5,"labels":{"peer":"a","placement":"P2"}}"#,
        ];
        std::fs::write(&input, lines.join("\n")).expect("write input");
        run(&input, &dir).expect("aggregate");
        let summary: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("summary.json")).expect("summary"),
        )
        .expect("summary is JSON");
        let rate = |key: &str| {
            summary
                .pointer(&format!("/{key}/a/req~1s/median"))
                .and_then(Value::as_f64)
        };
        assert_eq!(rate("P2~1rr:c1"), Some(10.0));
        assert_eq!(rate("P2~1rr:c64"), Some(99.0));
        assert_eq!(rate("P2~1rr"), Some(5.0));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
