//! `skein-bench`: run a scenario file against targets, or build a report.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use skein_bench::{Report, Scenario, Target};

#[derive(Parser)]
#[command(about = "skein's load generator")]
enum Cli {
    /// Runs scenarios against targets, prints the table, writes the report.
    Run {
        /// Scenario files (TOML).
        #[arg(required = true)]
        scenarios: Vec<PathBuf>,
        /// `name=https://ip:port[@pid,…]` (every hostname is served there;
        /// with pids, their CPU per request is measured); repeat.
        #[arg(long = "target", required = true)]
        targets: Vec<String>,
        /// `name=ip:port`: the target's admin API, for scenarios with
        /// `[churn]` (skein's catalog); repeat.
        #[arg(long = "admin")]
        admins: Vec<String>,
        /// The admin API's bearer token, from this file.
        #[arg(long)]
        admin_token_file: Option<PathBuf>,
        /// Where runs and report.html are kept.
        #[arg(long, default_value = "target/bench-report")]
        out: PathBuf,
        /// Free text in the report (machine, commit).
        #[arg(long, default_value = "")]
        label: String,
        /// Load threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Runs of every scenario against every target, interleaved (all
        /// targets once, then again), so noise falls on all of them; the
        /// table and charts show the run with the median p99.
        #[arg(long, default_value_t = 1)]
        repeat: u32,
        /// A target the others are compared with: the table gains what each
        /// adds to its p99 (per repeat against the same repeat, the median).
        #[arg(long)]
        baseline: Option<String>,
    },
    /// Builds report.html from a saved run (JSON) and the runs beside it.
    Report {
        /// The run's JSON.
        json: PathBuf,
    },
    /// Adds dnsperf's peak figures (the table `dns-peers.sh` prints, in a
    /// file) to the reports as one run of `scenario`.
    ImportDnsperf {
        /// The scenario's name in the report.
        #[arg(long)]
        scenario: String,
        /// The table.
        table: PathBuf,
        /// Where reports are kept.
        #[arg(long, default_value = "target/bench-report")]
        out: PathBuf,
        /// Free text: the machine, the commit.
        #[arg(long, default_value = "")]
        label: String,
    },
    /// Adds iperf3 runs (`iperf3 -J` files) to the reports as one run of
    /// `scenario`: `--run name=file.json`, a name once per repeat.
    ImportIperf3 {
        /// The scenario's name in the report.
        #[arg(long)]
        scenario: String,
        /// `target=iperf3.json`, repeated.
        #[arg(long = "run", required = true)]
        runs: Vec<String>,
        /// Where reports are kept.
        #[arg(long, default_value = "target/bench-report")]
        out: PathBuf,
        /// Free text: the machine, the commit.
        #[arg(long, default_value = "")]
        label: String,
    },
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("skein-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<()> {
    match Cli::parse() {
        Cli::Run {
            scenarios,
            targets,
            admins,
            admin_token_file,
            out,
            label,
            threads,
            repeat,
            baseline,
        } => {
            let targets: Vec<Target> = targets
                .iter()
                .map(|t| Target::parse(t).map_err(anyhow::Error::msg))
                .collect::<Result<_, _>>()?;
            if let Some(b) = &baseline
                && !targets.iter().any(|t| &t.name == b)
            {
                anyhow::bail!("--baseline {b:?}: no such target");
            }
            let mut targets = targets;
            for a in &admins {
                let (name, addr) = a
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("--admin {a:?}: expected name=ip:port"))?;
                let file = admin_token_file
                    .as_ref()
                    .ok_or_else(|| anyhow::anyhow!("--admin needs --admin-token-file"))?;
                let token = std::fs::read_to_string(file)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
                let t = targets
                    .iter_mut()
                    .find(|t| t.name == name)
                    .ok_or_else(|| anyhow::anyhow!("--admin {a:?}: no target {name:?}"))?;
                t.admin = Some(skein_bench::churn::Admin {
                    addr: addr
                        .parse()
                        .map_err(|_| anyhow::anyhow!("--admin {a:?}: {addr:?} is not ip:port"))?,
                    token: token.trim().to_string(),
                });
            }
            let mut list = Vec::new();
            for p in &scenarios {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
                list.push(
                    Scenario::parse(&text).map_err(|e| anyhow::anyhow!("{}:\n{e}", p.display()))?,
                );
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads.max(1))
                .enable_all()
                .build()?;
            let mut results = Vec::new();
            for rep in 0..repeat.max(1) {
                for s in &list {
                    for t in &targets {
                        if s.churn.is_some() && t.admin.is_none() {
                            eprintln!(
                                "skein-bench: {} -> {}: skipped (churn needs the target's admin API)",
                                s.name, t.name
                            );
                            continue;
                        }
                        eprintln!("skein-bench: {} -> {} (run {})", s.name, t.name, rep + 1);
                        let mut r = rt.block_on(skein_bench::run(s, t))?;
                        r.repeat = rep;
                        results.push(r);
                    }
                }
            }
            let report = Report {
                started: now_rfc3339(),
                label,
                results,
                baseline,
            };
            print!("{}", report.table());
            let html = skein_bench::report::save(&report, &out, 20)?;
            eprintln!("skein-bench: report in {}", html.display());
            Ok(())
        }
        Cli::ImportDnsperf {
            scenario,
            table,
            out,
            label,
        } => {
            let text = std::fs::read_to_string(&table)
                .map_err(|e| anyhow::anyhow!("{}: {e}", table.display()))?;
            let results = skein_bench::dnsperf::results(&scenario, &text);
            if results.is_empty() {
                anyhow::bail!("{}: no dnsperf rows", table.display());
            }
            save(
                Report {
                    started: now_rfc3339(),
                    label,
                    results,
                    baseline: None,
                },
                &out,
            )
        }
        Cli::ImportIperf3 {
            scenario,
            runs,
            out,
            label,
        } => {
            let mut results: Vec<skein_bench::RunResult> = Vec::new();
            for r in &runs {
                let (name, file) = r
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("--run {r:?}: expected name=file.json"))?;
                let text =
                    std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
                let repeat = results.iter().filter(|x| x.target == name).count() as u32;
                results.push(
                    skein_bench::iperf::result(&scenario, name, repeat, &text)
                        .map_err(|e| anyhow::anyhow!("{file}: {e}"))?,
                );
            }
            save(
                Report {
                    started: now_rfc3339(),
                    label,
                    results,
                    baseline: None,
                },
                &out,
            )
        }
        Cli::Report { json } => {
            let report = Report::load(&json)?;
            let dir = json.parent().map(PathBuf::from).unwrap_or_default();
            let html = dir.join("report.html");
            std::fs::write(&html, report.html(&[]))?;
            print!("{}", report.table());
            eprintln!("skein-bench: report in {}", html.display());
            Ok(())
        }
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// Prints the table and saves the report (JSON, page, history).
fn save(report: Report, out: &std::path::Path) -> anyhow::Result<()> {
    print!("{}", report.table());
    let html = skein_bench::report::save(&report, out, 20)?;
    eprintln!("skein-bench: report in {}", html.display());
    Ok(())
}
