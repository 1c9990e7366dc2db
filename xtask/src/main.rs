//! `cargo xtask <verb>`: the project's verbs that need more than cargo.
//!
//! - `test`: install what is missing (idempotently), then `cargo fmt --check`,
//!   `cargo clippy --all-targets -- -D warnings` and every test. This is the
//!   command README and CI run.
//! - `ensure`: only the installs.
//! - `lint`: only fmt and clippy.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, bail};

/// Debian packages the tests and builds need.
/// - curl: the demo test runs the commands the demo prints.
/// - llvm-22-dev: bpf-linker links libLLVM 22 (the eBPF programs).
const APT_PACKAGES: &[&str] = &["curl", "iproute2", "llvm-22-dev"];

fn main() -> anyhow::Result<()> {
    let verb = std::env::args().nth(1).unwrap_or_default();
    match verb.as_str() {
        "test" => {
            ensure()?;
            lint()?;
            test()
        }
        "ensure" => ensure(),
        "lint" => lint(),
        _ => bail!("usage: cargo xtask <test|ensure|lint>"),
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: {cmd:?}");
    let status = cmd
        .current_dir(root())
        .status()
        .with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn quiet_ok(cmd: &mut Command) -> bool {
    cmd.output().map(|o| o.status.success()).unwrap_or(false)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Installs what is missing; does nothing where all is there.
fn ensure() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect();
    if !missing.is_empty() {
        if !is_root() {
            bail!(
                "missing Debian packages {missing:?}; install them as root (apt-get install {})",
                missing.join(" ")
            );
        }
        run(Command::new("apt-get").arg("update").arg("-q"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    // The eBPF programs build with the nightly toolchain, its rust-src and
    // bpf-linker linked against Debian's LLVM 22.
    let has_src = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("rust-src"))
        .unwrap_or(false);
    if !has_src {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    if !quiet_ok(Command::new("bpf-linker").arg("--version")) {
        run(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"))?;
    }
    Ok(())
}

fn lint() -> anyhow::Result<()> {
    run(Command::new("cargo").args(["fmt", "--all", "--", "--check"]))?;
    run(Command::new("cargo").args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
}

fn test() -> anyhow::Result<()> {
    use std::io::BufRead as _;
    if !is_root() {
        eprintln!(
            "xtask: not root: tests that need root or network namespaces will say `skipped: needs root`"
        );
    }
    let mut cmd = Command::new("cargo");
    cmd.args(["test", "--workspace"])
        .current_dir(root())
        .stdout(std::process::Stdio::piped());
    eprintln!("xtask: {cmd:?}");
    let mut child = cmd.spawn().context("running cargo test")?;
    let out = child.stdout.take().context("cargo test stdout")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in std::io::BufReader::new(out).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |what: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| part.trim().strip_suffix(what))
                    .and_then(|n| n.trim().rsplit(' ').next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0)
            };
            passed += count(" passed");
            failed += count(" failed");
            ignored += count(" ignored");
        }
    }
    let status = child.wait()?;
    // One closing line for the whole workspace (the last crate's doc tests would
    // otherwise close the log with "0 passed").
    println!("workspace: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        bail!("cargo test failed: {status}");
    }
    Ok(())
}
