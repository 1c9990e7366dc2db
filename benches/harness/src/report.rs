//! The report of a run: JSON (every figure), a self-contained HTML page with
//! SVG charts drawn here (no script, nothing fetched), a terminal table.
//! Runs are kept in a directory; the page draws the previous ones too, so a
//! regression shows as a line going the wrong way.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::load::RunResult;

/// One run: every scenario against every target.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// When (RFC 3339).
    pub started: String,
    /// Free text: the machine, the commit.
    #[serde(default)]
    pub label: String,
    /// Results, scenario by target.
    pub results: Vec<RunResult>,
    /// The target the others are compared with (`--baseline`): the table
    /// gains what each adds to its p99.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<String>,
}

impl Report {
    /// Reads a saved report.
    pub fn load(path: &Path) -> anyhow::Result<Report> {
        let text = std::fs::read_to_string(path)?;
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// One result per scenario and target: with repeats, the run whose p99
    /// is the median (a real run, not a blend), with how many runs there
    /// were and the lowest and highest p99 among them (ms; Gbit/s for
    /// throughput runs).
    pub fn medians(&self) -> Vec<(&RunResult, usize, (f64, f64))> {
        let mut keys: Vec<(&str, &str)> = Vec::new();
        for r in &self.results {
            let k = (r.scenario.as_str(), r.target.as_str());
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        keys.into_iter()
            .filter_map(|(sc, t)| {
                let mut runs: Vec<&RunResult> = self
                    .results
                    .iter()
                    .filter(|r| r.scenario == sc && r.target == t)
                    .collect();
                // Throughput runs (iperf3) by throughput; the range is then Gbit/s.
                let key = |r: &RunResult| match r.gbit_per_s {
                    Some(g) => g,
                    None => r.latency_us.p99 as f64 / 1000.0,
                };
                runs.sort_by(|a, b| key(a).total_cmp(&key(b)));
                let range = (key(runs.first()?), key(runs.last()?));
                Some((*runs.get((runs.len() - 1) / 2)?, runs.len(), range))
            })
            .collect()
    }

    /// What `target` adds to the baseline's p99 in `scenario`: each repeat
    /// against the baseline's run of the same repeat (interleaved, so the
    /// two saw the same minutes of the machine), the median of those
    /// ratios, minus one. `None` without a baseline, for the baseline
    /// itself, or without runs to pair.
    pub fn over_baseline(&self, scenario: &str, target: &str) -> Option<f64> {
        let base = self.baseline.as_deref()?;
        if base == target {
            return None;
        }
        let p99 = |t: &str, rep: u32| {
            self.results
                .iter()
                .find(|r| r.scenario == scenario && r.target == t && r.repeat == rep)
                .map(|r| r.latency_us.p99 as f64)
        };
        let mut ratios: Vec<f64> = self
            .results
            .iter()
            .filter(|r| r.scenario == scenario && r.target == target)
            .filter_map(|r| {
                let b = p99(base, r.repeat).filter(|b| *b > 0.0)?;
                Some(r.latency_us.p99 as f64 / b - 1.0)
            })
            .collect();
        ratios.sort_by(f64::total_cmp);
        let n = ratios.len();
        match n {
            0 => None,
            _ if n % 2 == 1 => Some(ratios[n / 2]),
            _ => Some((ratios[n / 2 - 1] + ratios[n / 2]) / 2.0),
        }
    }

    /// The terminal table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<18} {:<14} {:>10} {:>10} {:>7} {:>9} {:>9} {:>9} {:>8} {:>9} {:>4} {:>15} {:>7}",
            "scenario",
            "target",
            "sent/s",
            "ok/s",
            "Gbit/s",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "errors",
            "cpu us/r",
            "runs",
            "range",
            "steal %"
        );
        if let Some(b) = &self.baseline {
            // Replace the line's end with one more column.
            out.pop();
            let _ = writeln!(out, "  p99 vs {b}");
        }
        for (r, runs, (lo, hi)) in self.medians() {
            let errors: u64 = r.errors.values().sum();
            let _ = writeln!(
                out,
                "{:<18} {:<14} {:>10.0} {:>10.0} {:>7} {:>9.3} {:>9.3} {:>9.3} {:>8} {:>9} {:>4} {:>15} {:>7}",
                r.scenario,
                r.target,
                r.sent_per_second,
                r.ok_per_second,
                r.gbit_per_s.map_or("-".to_string(), |g| format!("{g:.2}")),
                r.latency_us.p50 as f64 / 1000.0,
                r.latency_us.p99 as f64 / 1000.0,
                r.latency_us.p999 as f64 / 1000.0,
                errors,
                r.cpu_us_per_req
                    .map_or("-".to_string(), |c| format!("{c:.1}")),
                runs,
                match r.gbit_per_s {
                    Some(_) => format!("{lo:.2}-{hi:.2}"),
                    None => format!("{lo:.1}-{hi:.1}"),
                },
                r.steal_pct.map_or("-".to_string(), |p| format!("{p:.1}")),
            );
            if self.baseline.is_some() {
                out.pop();
                let vs = self
                    .over_baseline(&r.scenario, &r.target)
                    .map_or("-".to_string(), |x| format!("{:+.0}%", x * 100.0));
                let _ = writeln!(out, "  {vs:>9}");
            }
        }
        out
    }

    /// The HTML page; `history` are earlier runs, oldest first.
    pub fn html(&self, history: &[Report]) -> String {
        let mut h = String::new();
        let _ = write!(
            h,
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>skein bench {}</title><style>{CSS}</style></head><body><h1>skein bench</h1><p>{} {}</p>",
            esc(&self.started),
            esc(&self.started),
            esc(&self.label)
        );
        let _ = write!(h, "<h2>Summary</h2><pre>{}</pre>", esc(&self.table()));
        let mut scenarios: Vec<&str> = Vec::new();
        for r in &self.results {
            if !scenarios.contains(&r.scenario.as_str()) {
                scenarios.push(&r.scenario);
            }
        }
        for sc in scenarios {
            let medians = self.medians();
            let rs: Vec<&RunResult> = medians
                .iter()
                .map(|(r, _, _)| *r)
                .filter(|r| r.scenario == sc)
                .collect();
            let _ = write!(h, "<h2>{}</h2>", esc(sc));
            for r in &rs {
                if let Some(c) = &r.churn {
                    let _ = write!(
                        h,
                        "<p>{}: catalog churn during the run: {} changes taken ({} certificates rotated), {} failed</p>",
                        esc(&r.target),
                        c.ok,
                        c.certificates,
                        c.failed
                    );
                }
            }
            h.push_str("<div class=\"row\">");
            let p99: Vec<(String, Vec<(f64, f64)>)> = rs
                .iter()
                .map(|r| {
                    let pts = r
                        .series
                        .iter()
                        .map(|p| (p.t as f64, p.p99_us as f64 / 1000.0))
                        .collect();
                    (r.target.clone(), pts)
                })
                .collect();
            h.push_str(&lines("p99 latency over time (ms)", "s", &p99));
            let sent: Vec<(String, Vec<(f64, f64)>)> = rs
                .iter()
                .map(|r| {
                    let pts = r
                        .series
                        .iter()
                        .map(|p| (p.t as f64, p.done as f64))
                        .collect();
                    (r.target.clone(), pts)
                })
                .collect();
            h.push_str(&lines("answered per second", "s", &sent));
            let bar = |f: &dyn Fn(&RunResult) -> Option<f64>| -> Vec<(String, f64)> {
                rs.iter()
                    .filter_map(|r| Some((r.target.clone(), f(r)?)))
                    .collect()
            };
            h.push_str(&bars(
                "answered per second",
                &bar(&|r| Some(r.ok_per_second)),
            ));
            h.push_str(&bars(
                "p50 / p99 / p99.9 (ms)",
                &rs.iter()
                    .flat_map(|r| {
                        [
                            (
                                format!("{} p50", r.target),
                                r.latency_us.p50 as f64 / 1000.0,
                            ),
                            (
                                format!("{} p99", r.target),
                                r.latency_us.p99 as f64 / 1000.0,
                            ),
                            (
                                format!("{} p99.9", r.target),
                                r.latency_us.p999 as f64 / 1000.0,
                            ),
                        ]
                    })
                    .collect::<Vec<_>>(),
            ));
            let cpu = bar(&|r| r.cpu_us_per_req);
            if !cpu.is_empty() {
                h.push_str(&bars("target CPU per request (us)", &cpu));
            }
            let mem = bar(&|r| r.kib_per_conn);
            if !mem.is_empty() {
                h.push_str(&bars("memory per connection (KiB)", &mem));
            }
            // The same scenario in earlier runs: p99 by run.
            let mut trend: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
            for r in &rs {
                let mut pts = Vec::new();
                for (i, old) in history.iter().chain(std::iter::once(self)).enumerate() {
                    if let Some((o, _, _)) = old
                        .medians()
                        .into_iter()
                        .find(|(o, _, _)| o.scenario == sc && o.target == r.target)
                    {
                        pts.push((i as f64, o.latency_us.p99 as f64 / 1000.0));
                    }
                }
                trend.push((r.target.clone(), pts));
            }
            if history
                .iter()
                .any(|o| o.results.iter().any(|x| x.scenario == sc))
            {
                h.push_str(&lines("p99 (ms) in the last runs", "run", &trend));
            }
            h.push_str("</div>");
        }
        h.push_str("</body></html>\n");
        h
    }
}

const CSS: &str = "body{font:14px system-ui,sans-serif;margin:2em;color:#222}h2{margin-top:2em}.row{display:flex;flex-wrap:wrap;gap:1em}svg{background:#fafafa;border:1px solid #ddd}pre{background:#f4f4f4;padding:1em}";
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];
const W: f64 = 420.0;
const H: f64 = 220.0;
const PAD: f64 = 40.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A line chart: one line per series.
fn lines(title: &str, xlabel: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    let all = series.iter().flat_map(|(_, p)| p.iter());
    let (mut xmax, mut ymax) = (1.0f64, 0.0f64);
    for (x, y) in all {
        xmax = xmax.max(*x);
        ymax = ymax.max(*y);
    }
    let ymax = if ymax <= 0.0 { 1.0 } else { ymax * 1.1 };
    let sx = |x: f64| PAD + x / xmax * (W - 2.0 * PAD);
    let sy = |y: f64| H - PAD - y / ymax * (H - 2.0 * PAD);
    let mut s = format!(
        "<svg width=\"{W}\" height=\"{H}\" role=\"img\"><title>{t}</title><text x=\"{PAD}\" y=\"18\">{t}</text>{axes}<text x=\"{}\" y=\"{}\" font-size=\"10\">{xlabel}</text><text x=\"4\" y=\"{}\" font-size=\"10\">{ymax:.2}</text>",
        W - PAD,
        H - 8.0,
        PAD,
        t = esc(title),
        axes = axes(),
    );
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
            .collect();
        let _ = write!(
            s,
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/><text x=\"{}\" y=\"{}\" fill=\"{c}\" font-size=\"11\">{}</text>",
            path.join(" "),
            W - PAD - 90.0,
            30.0 + 14.0 * i as f64,
            esc(name)
        );
    }
    s.push_str("</svg>");
    s
}

/// A bar chart.
fn bars(title: &str, items: &[(String, f64)]) -> String {
    let max = items.iter().map(|(_, v)| *v).fold(0.0f64, f64::max);
    let max = if max <= 0.0 { 1.0 } else { max };
    let bh = ((H - 2.0 * PAD) / items.len().max(1) as f64).min(24.0);
    let mut s = format!(
        "<svg width=\"{W}\" height=\"{H}\" role=\"img\"><title>{t}</title><text x=\"{PAD}\" y=\"18\">{t}</text>",
        t = esc(title)
    );
    for (i, (name, v)) in items.iter().enumerate() {
        let y = PAD + i as f64 * bh;
        let w = v / max * (W - 2.0 * PAD - 110.0);
        let _ = write!(
            s,
            "<text x=\"4\" y=\"{:.1}\" font-size=\"11\">{}</text><rect x=\"110\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{:.1}\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\">{}</text>",
            y + bh * 0.7,
            esc(name),
            bh * 0.8,
            COLORS[i % COLORS.len()],
            114.0 + w,
            y + bh * 0.7,
            fmt(*v)
        );
    }
    s.push_str("</svg>");
    s
}

fn fmt(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn axes() -> String {
    format!(
        "<line x1=\"{PAD}\" y1=\"{y}\" x2=\"{x}\" y2=\"{y}\" stroke=\"#888\"/><line x1=\"{PAD}\" y1=\"{PAD}\" x2=\"{PAD}\" y2=\"{y}\" stroke=\"#888\"/>",
        y = H - PAD,
        x = W - PAD
    )
}

/// Writes `report` as `<dir>/<started>.json` and `<dir>/report.html` (with
/// the earlier runs in `dir`, at most `keep` of them, drawn as history).
pub fn save(report: &Report, dir: &Path, keep: usize) -> anyhow::Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir)?;
    let stamp: String = report
        .started
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let json = dir.join(format!("run-{stamp}.json"));
    std::fs::write(&json, serde_json::to_vec_pretty(report)?)?;
    let mut runs: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("run-") && n.ends_with(".json"))
                && *p != json
        })
        .collect();
    runs.sort();
    let history: Vec<Report> = runs
        .iter()
        .rev()
        .take(keep)
        .rev()
        .filter_map(|p| Report::load(p).ok())
        .collect();
    let html = dir.join("report.html");
    std::fs::write(&html, report.html(&history))?;
    Ok(html)
}
