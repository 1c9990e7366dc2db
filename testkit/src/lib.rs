//! Test support shared by the crates' root tests: network namespaces that are
//! always removed (also when a test panics), and the root check that turns a test
//! into a counted skip on machines where it cannot run.
//!
//! Every namespace name carries the process id, so parallel test binaries never
//! collide, and traffic stays inside the namespaces the test made.

pub mod etcd;
pub mod kube;
pub mod nsd;
pub mod pebble;

use std::{
    fs::File,
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

/// True when running as root (the netns tests need it).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Call first in a root test: returns false (and says so) when the test must skip.
/// `cargo xtask test` counts the "skipped: needs root" lines.
pub fn require_root(test: &str) -> bool {
    if is_root() {
        return true;
    }
    println!("skipped: needs root: {test}");
    false
}

/// Call first in a test that needs a peer program from Debian: false (and
/// says so) when `bin` is missing. With `SKEIN_REQUIRE_PEERS` set (as `cargo
/// xtask test` does, after installing them) a missing peer fails the test.
pub fn require_binary(test: &str, bin: &str, version_args: &[&str], package: &str) -> bool {
    require_program(test, bin, version_args, package, "SKEIN_REQUIRE_PEERS")
}

/// [`require_binary`] with the variable that makes a missing `bin` a failure.
pub(crate) fn require_program(
    test: &str,
    bin: &str,
    version_args: &[&str],
    package: &str,
    required_by: &str,
) -> bool {
    let found = Command::new(bin)
        .args(version_args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if found {
        return true;
    }
    if std::env::var_os(required_by).is_some() {
        panic!("{test}: {bin} is not installed (apt-get install {package})");
    }
    println!("skipped: needs {bin}: {test}");
    false
}

/// Starts `cmd` with stdin closed and stdout and stderr into `log`,
/// panicking with `what` if it cannot start.
pub fn spawn_logged(cmd: &mut Command, log: &std::path::Path, what: &str) -> std::process::Child {
    let out = File::create(log).ok();
    cmd.stdin(Stdio::null())
        .stdout(
            out.as_ref()
                .and_then(|f| f.try_clone().ok())
                .map_or(Stdio::null(), Stdio::from),
        )
        .stderr(out.map_or(Stdio::null(), Stdio::from))
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"))
}

/// A free TCP port on loopback for a server a test starts. Taken below the
/// kernel's ephemeral range (32768 and up by default), so that between this
/// check and the server's bind no outgoing connection of another test can be
/// given it (a port 0 pick is ephemeral, and was seen stolen that way by a
/// concurrent test's connection); handed out at most once per process.
pub fn free_tcp_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Processes start at different places, so two test binaries rarely meet.
    let start = (std::process::id() % 60) * 200;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (start + n) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {LOW}..{}", LOW + SPAN)
}

/// A new empty directory under the system's temporary directory, named for
/// this process (the caller removes it).
pub fn temp_dir(what: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "skein-{what}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}

/// Runs a command, panicking with its output if it fails.
pub fn sh(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `ip` with these arguments, checked.
pub fn ip(args: &str) -> Output {
    let mut v = vec!["ip"];
    v.extend(args.split_whitespace());
    sh(&v)
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A network namespace that is deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `sk<tag><pid>-<n>` with loopback up.
    pub fn new(tag: &str) -> Netns {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let name = format!("sk{tag}{}-{n}", std::process::id());
        ip(&format!("netns add {name}"));
        let ns = Netns { name };
        ns.ip("link set lo up");
        ns
    }

    /// Its name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> ...`, checked.
    pub fn ip(&self, args: &str) -> Output {
        ip(&format!("-n {} {args}", self.name))
    }

    /// A command inside the namespace (not yet run).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs a command in the namespace and returns its output, unchecked.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args[0])
            .args(&args[1..])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {args:?} in {}: {e}", self.name))
    }

    /// True if `ping -6` from this namespace gets an answer (one try, one second).
    pub fn ping(&self, from: &str, to: &str) -> bool {
        self.run(&["ping", "-6", "-n", "-c", "1", "-W", "1", "-I", from, to])
            .status
            .success()
    }

    /// Moves the calling thread into the namespace (sockets and netlink calls it
    /// makes from now on live there). Use from a dedicated thread.
    pub fn enter(&self) {
        enter_netns(&self.name)
    }
}

/// Moves the calling thread into the named namespace (for a thread that
/// cannot borrow the [`Netns`]).
pub fn enter_netns(name: &str) {
    let f = File::open(format!("/run/netns/{name}"))
        .unwrap_or_else(|e| panic!("opening netns {name}: {e}"));
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
        .unwrap_or_else(|e| panic!("entering netns {name}: {e}"));
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdin(Stdio::null())
            .output();
    }
}

/// Joins `a` and `b` with a veth pair (`a_if` in `a`, `b_if` in `b`), both up.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) {
    ip(&format!(
        "link add {a_if} netns {} type veth peer name {b_if} netns {}",
        a.name(),
        b.name()
    ));
    a.ip(&format!("link set {a_if} up"));
    b.ip(&format!("link set {b_if} up"));
}

/// A bpf filesystem mounted for one test (on a fresh temporary directory, in
/// the test's own mount namespace, which `ip netns exec` children see too):
/// pins there outlive the process that made them, as on /sys/fs/bpf.
/// Unmounted (lazily) and removed when dropped.
#[derive(Debug)]
pub struct BpfFs(std::path::PathBuf);

impl BpfFs {
    /// Mounts one; panics if it cannot.
    pub fn mount(what: &str) -> BpfFs {
        let at = temp_dir(what);
        let out = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&at)
            .output()
            .unwrap_or_else(|e| panic!("mount: {e}"));
        assert!(
            out.status.success(),
            "mount -t bpf {}: {out:?}",
            at.display()
        );
        BpfFs(at)
    }

    /// Where it is mounted.
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
