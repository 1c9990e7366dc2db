//! `skein`: the edge networking plane of a host: proxy, mesh and DNS, fed by one
//! live catalog. This binary is the thin top: CLI, config, wiring.

mod admin;
mod cli;
mod config;
mod daemon;
mod demo;
mod demo_hosts;
mod histograms;
mod server;
mod steer;
mod telemetry;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc: per-thread free lists suit a proxy's many short-lived buffers far
/// better than glibc's malloc (about 7% of the proxy's CPU went to glibc malloc
/// and free in a keep-alive profile).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "skein",
    version,
    about = "skein: edge proxy, private mesh and DNS for a platform of micro-VMs"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon with a config file.
    Run {
        /// Path of skein.toml.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Bring up a working single-host setup on loopback (no config, no root).
    Demo(demo::DemoArgs),
    /// Check a daemon config or a catalog file; exit 1 with every problem.
    CheckConfig {
        /// skein.toml or a catalog document.
        file: PathBuf,
    },
    /// Read and change the catalog through the admin API.
    Catalog(cli::CatalogArgs),
    /// Write operators' records into the etcd cluster that hosts share.
    Etcd(cli::EtcdArgs),
    /// Print this host's WireGuard public key (creating the private key file, mode
    /// 0600, if missing): what goes in the host's catalog record.
    MeshKey {
        /// Path of skein.toml.
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::CheckConfig { file } => cli::check_config(&file),
        Cmd::MeshKey { config } => match config::Config::load(&config) {
            Ok(cfg) => match skein_mesh::agent::public_key(&cfg.mesh, &cfg.state.dir) {
                Ok(k) => {
                    println!("{}", k.to_base64());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            },
            Err(e) => {
                eprintln!("error: {}:\n{e}", config.display());
                ExitCode::FAILURE
            }
        },
        cmd => {
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(run(cmd)) {
                Ok(code) => code,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn run(cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Run { config } => {
            let cfg = config::Config::load(&config)
                .map_err(|e| anyhow::anyhow!("{}:\n{e}", config.display()))?;
            telemetry::init_logs(&cfg.log);
            if !cfg.process.transparent_huge_pages
                && let Err(e) = nix::sys::prctl::set_thp_disable(true)
            {
                tracing::warn!(error = %e, "could not turn transparent huge pages off");
            }
            daemon::start(cfg, None).await?.until_signal().await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Demo(args) => {
            telemetry::init_logs(&config::LogConfig {
                format: config::LogFormat::Human,
                level: "warn,skein=info".into(),
            });
            demo::run(args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Catalog(args) => cli::catalog(args).await,
        Cmd::Etcd(args) => cli::etcd(args).await,
        Cmd::CheckConfig { .. } | Cmd::MeshKey { .. } => Ok(ExitCode::FAILURE),
    }
}
