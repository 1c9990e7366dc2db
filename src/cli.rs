//! `skein check-config` and `skein catalog`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use hyper::Method;
use serde_json::Value;
use skein_catalog::error::parse_toml;
use skein_catalog::sources::client::{Client, Endpoint};
use skein_catalog::{Catalog, Document, Invalid, Kind, Source};

use crate::config::Config;

const CATALOG_KEYS: [&str; 7] = [
    "regions",
    "hosts",
    "networks",
    "apps",
    "machines",
    "certificates",
    "k8s_services",
];

/// Checks a daemon config (and the catalog file it names) or a catalog document.
pub fn check_config(file: &Path) -> ExitCode {
    match check(file) {
        Ok(summary) => {
            println!("{}: ok ({summary})", file.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}: invalid\n{e}", file.display());
            ExitCode::FAILURE
        }
    }
}

fn check_catalog(text: &str) -> Result<String, Invalid> {
    let doc: Document = parse_toml(text)?;
    let cat = skein_catalog::index::build(&[(Source::File, &doc)], &Catalog::default())?;
    let counts: Vec<String> = Kind::ALL
        .iter()
        .filter(|k| cat.count(**k) > 0)
        .map(|k| format!("{} {k}", cat.count(*k)))
        .collect();
    Ok(if counts.is_empty() {
        "empty catalog".into()
    } else {
        counts.join(", ")
    })
}

fn check(file: &Path) -> Result<String, Invalid> {
    let text =
        std::fs::read_to_string(file).map_err(|e| Invalid::one("", format!("cannot read: {e}")))?;
    let table: toml::Table = parse_toml(&text)?;
    if table.keys().any(|k| CATALOG_KEYS.contains(&k.as_str())) {
        return check_catalog(&text).map(|s| format!("catalog: {s}"));
    }
    let cfg = Config::load(file)?;
    match &cfg.catalog.file {
        None => Ok("daemon config; no catalog file".into()),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                Invalid::one(
                    "catalog.file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            check_catalog(&text)
                .map(|s| format!("daemon config; catalog {}: {s}", path.display()))
                .map_err(|mut e| {
                    for p in &mut e.problems {
                        p.path = format!("{}: {}", path.display(), p.path);
                    }
                    e
                })
        }
    }
}

/// Options of `skein catalog`.
#[derive(Debug, clap::Args)]
pub struct CatalogArgs {
    /// The admin API: host:port or unix:/path.
    #[arg(long, env = "SKEIN_ADMIN", default_value = "127.0.0.1:9901")]
    admin: String,
    /// The bearer token.
    #[arg(long, env = "SKEIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file holding the bearer token.
    #[arg(long, default_value = "/var/lib/skein/admin.token")]
    token_file: PathBuf,
    #[command(subcommand)]
    op: CatalogOp,
}

#[derive(Debug, clap::Subcommand)]
enum CatalogOp {
    /// The whole catalog, every record of a kind, or one record.
    Get {
        /// regions, hosts, networks, apps, machines, certificates, k8s_services;
        /// or `acme`: what the ACME client is doing for each hostname.
        kind: Option<String>,
        /// The record's key (namespace/name for k8s_services).
        key: Option<String>,
    },
    /// Create or replace a record from a JSON or TOML file (`-` for JSON on stdin).
    Put {
        /// The kind.
        kind: String,
        /// The file.
        file: PathBuf,
    },
    /// Delete a record.
    Delete {
        /// The kind.
        kind: String,
        /// The key.
        key: String,
    },
}

/// The key of a record, from its JSON.
fn key_of(kind: Kind, v: &Value) -> Option<String> {
    let s = |f: &str| v.get(f).and_then(|x| x.as_str()).map(str::to_string);
    match kind {
        Kind::Regions => s("code"),
        Kind::Hosts => s("id").or_else(|| {
            v.get("id")
                .and_then(|x| x.as_u64())
                .map(|n| format!("{n:x}"))
        }),
        Kind::Machines => s("id"),
        Kind::K8sServices => Some(format!("{}/{}", s("namespace")?, s("name")?)),
        Kind::Networks | Kind::Apps | Kind::Certificates => s("name"),
    }
}

/// Runs `skein catalog`.
pub async fn catalog(args: CatalogArgs) -> anyhow::Result<ExitCode> {
    let token = match args.token {
        Some(t) => t,
        None => std::fs::read_to_string(&args.token_file)
            .map_err(|e| {
                anyhow::anyhow!(
                    "reading the token from {}: {e} (or pass --token)",
                    args.token_file.display()
                )
            })?
            .trim()
            .to_string(),
    };
    let endpoint: Endpoint = args.admin.parse().map_err(anyhow::Error::msg)?;
    let client = Client::new(endpoint, token);
    let kind = |k: &str| Kind::parse(k).ok_or_else(|| anyhow::anyhow!("unknown kind {k:?}"));
    // `acme [hostname]`: the ACME client's status (one name's when given).
    let mut pick: Option<String> = None;
    let (method, path, body) = match args.op {
        CatalogOp::Get { kind: None, .. } => (Method::GET, "/v1/catalog".to_string(), None),
        CatalogOp::Get { kind: Some(k), key } if k == "acme" => {
            pick = key;
            (Method::GET, "/v1/acme".to_string(), None)
        }
        CatalogOp::Get {
            kind: Some(k),
            key: None,
        } => (Method::GET, format!("/v1/{}", kind(&k)?), None),
        CatalogOp::Get {
            kind: Some(k),
            key: Some(key),
        } => (Method::GET, format!("/v1/{}/{key}", kind(&k)?), None),
        CatalogOp::Delete { kind: k, key } => {
            (Method::DELETE, format!("/v1/{}/{key}", kind(&k)?), None)
        }
        CatalogOp::Put { kind: k, file } => {
            let k = kind(&k)?;
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(&file)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?
            };
            let v: Value = if file.extension().is_some_and(|e| e == "toml") {
                parse_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?
            } else {
                serde_json::from_str(&text)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?
            };
            let key = key_of(k, &v).ok_or_else(|| {
                anyhow::anyhow!("{}: the record has no key field", file.display())
            })?;
            (
                Method::PUT,
                format!("/v1/{k}/{key}"),
                Some(serde_json::to_vec(&v)?),
            )
        }
    };
    let (status, v) = client.call(method, &path, body).await?;
    if status.is_success() {
        let v = match pick {
            None => v,
            Some(name) => match v["names"].get(&name) {
                Some(one) => one.clone(),
                None => {
                    eprintln!(
                        "acme: no status for {name:?} (not a hostname that needs a certificate)"
                    );
                    return Ok(ExitCode::FAILURE);
                }
            },
        };
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("{status}: {}", v["message"].as_str().unwrap_or(""));
    Ok(ExitCode::FAILURE)
}

/// Options of `skein etcd`: operators' records in the shared catalog.
#[derive(Debug, clap::Args)]
pub struct EtcdArgs {
    /// Take the cluster from this daemon config's `[etcd]`.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Or name the members (comma-separated client URLs).
    #[arg(long, env = "SKEIN_ETCD", value_delimiter = ',')]
    endpoints: Vec<String>,
    /// Key prefix (with --endpoints).
    #[arg(long, default_value = "/skein/")]
    prefix: String,
    #[command(subcommand)]
    op: EtcdOp,
}

#[derive(Debug, clap::Subcommand)]
enum EtcdOp {
    /// Write every record of a catalog document (TOML) but machines, which
    /// their workers publish. The document is checked first, alone.
    Load {
        /// The document.
        file: PathBuf,
    },
    /// Delete an operator's record.
    Delete {
        /// The kind.
        kind: String,
        /// The key (namespace/name for k8s_services).
        key: String,
    },
}

/// `skein etcd`.
pub async fn etcd(args: EtcdArgs) -> anyhow::Result<ExitCode> {
    use skein_catalog::sources::etcd::{self, EtcdConfig};
    let cfg = match &args.config {
        Some(path) => {
            Config::load(path)
                .map_err(|e| anyhow::anyhow!("{}:\n{e}", path.display()))?
                .etcd
        }
        None => EtcdConfig {
            endpoints: args.endpoints.clone(),
            prefix: args.prefix.clone(),
            ..EtcdConfig::default()
        },
    };
    if !cfg.enabled() {
        anyhow::bail!("no etcd members: give --endpoints or a config with [etcd] endpoints");
    }
    if let Some((field, why)) = cfg.problems().into_iter().next() {
        anyhow::bail!("{field}: {why}");
    }
    let layout = cfg.layout();
    let conn = cfg.client().connect().await?;
    match args.op {
        EtcdOp::Load { file } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let doc: Document = parse_toml(&text)
                .map_err(|e| anyhow::anyhow!("{}: invalid\n{e}", file.display()))?;
            if !doc.machines.is_empty() {
                anyhow::bail!(
                    "{}: has machines; they are published by the worker that runs them",
                    file.display()
                );
            }
            skein_catalog::index::build(&[(Source::Etcd, &doc)], &Catalog::default())
                .map_err(|e| anyhow::anyhow!("{}: invalid\n{e}", file.display()))?;
            let recs = etcd::operator_records(&layout, &doc).map_err(|e| anyhow::anyhow!(e))?;
            let n = etcd::put_records(&conn, recs).await?;
            println!("{n} records written under {}", layout.root());
        }
        EtcdOp::Delete { kind, key } => {
            let k = Kind::parse(&kind).ok_or_else(|| anyhow::anyhow!("unknown kind {kind:?}"))?;
            if k == Kind::Machines {
                anyhow::bail!("machines are published by their worker; delete them there");
            }
            let n = conn
                .delete(layout.record(k, &key).as_bytes(), false)
                .await?;
            if n == 0 {
                eprintln!("no {kind} {key:?} in etcd");
                return Ok(ExitCode::FAILURE);
            }
            println!("deleted {kind} {key:?}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
