//! `skein demo` comes up with no config and no root, and every command it prints
//! works.

use std::io::BufReader;
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

/// A running demo, stopped with Ctrl-C (SIGINT, so it removes what it made)
/// when the test ends, also when it ends by a failed assertion.
struct Demo {
    child: Child,
    /// Its output, kept open: a demo that prints into a closed pipe fails.
    _out: BufReader<ChildStdout>,
}

impl Demo {
    /// Starts `skein <args>` and reads what it prints up to its Ctrl-C line.
    fn start(args: &[&str]) -> (Demo, Vec<String>) {
        let mut child = skein()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let lines = read_until(&mut out, "Ctrl-C");
        (Demo { child, _out: out }, lines)
    }

    /// Ctrl-C, then the exit status (killed after 20 s).
    fn interrupt(&mut self) -> Option<ExitStatus> {
        if let Ok(Some(st)) = self.child.try_wait() {
            return Some(st);
        }
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.interrupt();
    }
}

#[test]
fn the_demo_serves_and_its_printed_commands_work() {
    let (mut child, lines) = Demo::start(&["demo", "--admin", "127.0.0.1:0"]);
    let commands: Vec<&String> = lines
        .iter()
        .filter(|l| {
            let l = l.trim_start();
            l.starts_with("curl") || l.starts_with("dig ") || l.contains(" catalog --admin ")
        })
        .collect();
    assert!(commands.len() >= 18, "{lines:#?}");
    let mut outputs = String::new();
    for c in &commands {
        let o = Command::new("sh").arg("-c").arg(c.trim()).output().unwrap();
        assert!(
            o.status.success(),
            "{c}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        outputs.push_str(&String::from_utf8_lossy(&o.stdout));
    }
    for expect in [
        "hello from machine ams1 in ams",
        "(app demo, host header demo.skein.local)",
        "2 200",
        "skein: no_app",
        "hello from machine iad1 in iad",
        "\"hostnames\": [",
        "\"id\":\"iad2\"",
        "ready: catalog version 2",
        "5 is below soft_limit 20",
        "skein_catalog_version 2",
        "fdaa:0:18:0:3:0:1:0",
        "0 100 80 demo.default.svc.cluster.local.",
        "\"ams1 ams,ams2 ams,iad1 iad\"",
        "skein_proxy_app_requests_total{app=\"demo\",status=\"2xx\"}",
        "skein_proxy_app_request_duration_seconds_count{app=\"demo\"}",
        "skein_proxy_machine_inflight{app=\"demo\",machine=\"ams1\"} 0",
        "skein_proxy_machine_requests_total{app=\"demo\",machine=\"ams1\",status=\"2xx\"}",
    ] {
        assert!(
            outputs.contains(expect),
            "missing {expect:?} in:\n{outputs}"
        );
    }
    let dir = lines
        .iter()
        .find_map(|l| l.split("$(cat ").nth(1))
        .unwrap()
        .split("/admin.token")
        .next()
        .unwrap()
        .to_string();
    assert!(std::path::Path::new(&dir).exists());
    let status = child.interrupt().expect("the demo did not stop on Ctrl-C");
    assert!(status.success());
    assert!(
        !std::path::Path::new(&dir).exists(),
        "the demo left {dir} behind"
    );
}

/// `skein demo --hosts 3` (root): three hosts in namespaces; every command it
/// prints works (the one meant to fail fails), and Ctrl-C leaves nothing.
#[test]
fn the_three_host_demo_serves_and_leaves_nothing_behind() {
    if !skein_testkit::require_root("the_three_host_demo_serves_and_leaves_nothing_behind") {
        return;
    }
    let (mut child, lines) = Demo::start(&["demo", "--hosts", "3"]);
    let dir = lines
        .iter()
        .find_map(|l| l.split("Files: ").nth(1))
        .unwrap_or_else(|| panic!("no files line in {lines:#?}"))
        .trim()
        .to_string();
    let commands: Vec<&String> = lines
        .iter()
        .filter(|l| l.trim_start().starts_with("ip "))
        .collect();
    assert!(commands.len() >= 10, "{lines:#?}");
    let mut outputs = String::new();
    for c in &commands {
        let o = Command::new("sh").arg("-c").arg(c.trim()).output().unwrap();
        // The other network's attempt is meant to fail (curl: timeout).
        let meant_to_fail = c.contains("skd-podb curl");
        assert_eq!(
            o.status.success(),
            !meant_to_fail,
            "{c}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        outputs.push_str(&String::from_utf8_lossy(&o.stdout));
    }
    for expect in [
        "hello from machine webams in ams (client fd00:99::100)",
        "hello from machine webiad in iad (client fd00:99::100)",
        "fdaa:0:18:0:1::10\n",
        "skein_ebpf_steered_total{to=\"flycast\"}",
        "reason=\"foreign_destination\"",
    ] {
        assert!(
            outputs.contains(expect),
            "missing {expect:?} in:\n{outputs}"
        );
    }
    // podb's dig printed nothing: its network has no such name.
    assert_eq!(
        outputs.matches("fdaa:0:18:0:1::10\n").count(),
        1,
        "{outputs}"
    );
    let status = child.interrupt().expect("the demo did not stop on Ctrl-C");
    assert!(status.success());
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let left = String::from_utf8_lossy(&netns.stdout);
    assert!(
        !left.lines().any(|l| l.starts_with("skd-")),
        "namespaces left: {left}"
    );
    assert!(
        !std::path::Path::new(&dir).exists(),
        "the demo left {dir} behind"
    );
}
