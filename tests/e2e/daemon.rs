//! `skein run`, `skein check-config`, `skein catalog`: as an operator uses them.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::*;

const BASIC: &str = include_str!("../../catalog/tests/fixtures/basic.toml");

fn setup(dir: &Path, port: u16) {
    std::fs::write(dir.join("catalog.toml"), BASIC).unwrap();
    std::fs::write(
        dir.join("skein.toml"),
        format!(
            "[admin]\nlisten = \"127.0.0.1:{port}\"\n[state]\ndir = \"{}\"\n[catalog]\nfile = \"catalog.toml\"\npoll_interval = \"100ms\"\n[shutdown]\ndrain_timeout = \"2s\"\n[log]\nformat = \"json\"\n",
            dir.join("state").display()
        ),
    )
    .unwrap();
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

#[test]
fn api_writes_survive_kill_9_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = skein_testkit::free_tcp_port();
    setup(dir.path(), port);
    let d = Daemon::start(dir.path(), port);
    let (st, v) = d.api(
        "PUT",
        "/v1/apps/api",
        Some(r#"{"name":"api","network":"acme","hostnames":["api.example.com"]}"#),
    );
    assert_eq!(st, 200, "{v}");
    let (st, v) = d.api(
        "PUT",
        "/v1/machines/m7",
        Some(r#"{"id":"m7","app":"api","region":"ams","host":"a7b:7d","state":"started"}"#),
    );
    assert_eq!(st, 200, "{v}");
    let address = v["record"]["address"].as_str().unwrap().to_string();
    drop(d); // SIGKILL: no chance to flush anything

    let d = Daemon::start(dir.path(), port);
    let (st, v) = d.api("GET", "/v1/machines/m7", None);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["record"]["address"], address.as_str());
    assert_eq!(v["source"], "api");
    let (st, v) = d.api("GET", "/v1/apps/api", None);
    assert_eq!(
        (st, v["record"]["hostnames"][0].as_str()),
        (200, Some("api.example.com"))
    );
    // The file's records are there too, owned by the file.
    let (_, v) = d.api("GET", "/v1/apps/web", None);
    assert_eq!(v["source"], "file");
}

#[test]
fn sigterm_drains_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let port = skein_testkit::free_tcp_port();
    setup(dir.path(), port);
    let mut d = Daemon::start(dir.path(), port);
    // An idle keep-alive connection must not hold the exit past the drain deadline.
    let _idle = std::net::TcpStream::connect(&d.admin).unwrap();
    d.signal("TERM");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = d.child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status}; log:\n{}", d.log());
    assert!(
        std::net::TcpStream::connect(&d.admin).is_err(),
        "still listening after exit"
    );
    assert!(d.log().contains("stopped"), "{}", d.log());
}

#[test]
fn the_catalog_file_is_followed_and_a_bad_one_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let port = skein_testkit::free_tcp_port();
    setup(dir.path(), port);
    let d = Daemon::start(dir.path(), port);
    let file = dir.path().join("catalog.toml");
    let hostname = |d: &Daemon| {
        d.api("GET", "/v1/apps/web", None).1["record"]["hostnames"][0]
            .as_str()
            .map(str::to_string)
    };

    std::fs::write(
        &file,
        BASIC.replace("web.example.com", "changed.example.com"),
    )
    .unwrap();
    wait_for("the change", || {
        hostname(&d).as_deref() == Some("changed.example.com")
    });

    std::fs::write(
        &file,
        BASIC.replace(
            "soft_limit = 20, hard_limit = 25",
            "soft_limit = 20, hard_limit = 5",
        ),
    )
    .unwrap();
    wait_for("the rejection in the log", || {
        d.log()
            .contains("apps[0].services[0].concurrency.hard_limit: 5 is below soft_limit 20")
    });
    assert_eq!(hostname(&d).as_deref(), Some("changed.example.com"));
    let (_, v) = d.api("GET", "/v1/apps/web", None);
    assert_eq!(v["record"]["services"][0]["concurrency"]["hard_limit"], 25);

    // SIGHUP re-reads even when the poll would not have noticed yet.
    std::fs::write(&file, BASIC.replace("web.example.com", "hup.example.com")).unwrap();
    d.signal("HUP");
    wait_for("the reload", || {
        hostname(&d).as_deref() == Some("hup.example.com")
    });
}

#[test]
fn an_invalid_catalog_at_start_is_refused_with_paths() {
    let dir = tempfile::tempdir().unwrap();
    let port = skein_testkit::free_tcp_port();
    setup(dir.path(), port);
    std::fs::write(
        dir.path().join("catalog.toml"),
        BASIC.replace(
            "app = \"web\"\nregion = \"iad\"",
            "app = \"gone\"\nregion = \"iad\"",
        ),
    )
    .unwrap();
    let out = skein()
        .args(["run", "--config"])
        .arg(dir.path().join("skein.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("machines[1].app: unknown app \"gone\""),
        "{err}"
    );
}

#[test]
fn check_config_names_fields_and_sets_the_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path(), 9);
    let ok = skein()
        .arg("check-config")
        .arg(dir.path().join("catalog.toml"))
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("2 machines"));
    let ok = skein()
        .arg("check-config")
        .arg(dir.path().join("skein.toml"))
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    std::fs::write(
        dir.path().join("catalog.toml"),
        BASIC.replace("hard_limit = 25", "hard_limit = 5"),
    )
    .unwrap();
    let bad = skein()
        .arg("check-config")
        .arg(dir.path().join("skein.toml"))
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bad.stderr)
            .contains("apps[0].services[0].concurrency.hard_limit: 5 is below soft_limit 20")
    );

    // `skein check-config` of a daemon config: (exit code, stderr).
    let check = |text: &str| {
        std::fs::write(dir.path().join("skein.toml"), text).unwrap();
        let out = skein()
            .arg("check-config")
            .arg(dir.path().join("skein.toml"))
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Refused (exit 1), naming each of `why` in what it prints.
    let refused = |text: &str, why: &[&str]| {
        let (code, err) = check(text);
        assert_eq!(code, Some(1), "{err}");
        for w in why {
            assert!(err.contains(w), "no {w:?} in {err}");
        }
    };
    refused(
        "[admin]\nlisten = \"0.0.0.0:9901\"\n[log]\nlevel = \"info\"\ncolour = 1\n",
        &["log.colour"],
    );
    let (_, err) = check("[admin]\nlisten = \"0.0.0.0:9901\"\n");
    assert!(err.contains("admin.listen: 0.0.0.0:9901 is not loopback"));
    refused(
        "[host]\nregion = \"ams\"\n[proxy]\nenabled = true\nlisteners = [{ bind = \"127.0.0.1:9\" }]\nrequests_per_turn = 0\n",
        &["proxy.requests_per_turn: must be at least 1"],
    );
    refused(
        "[kubernetes]\nenabled = true\napi = \"10.0.0.1\"\n",
        &[
            "kubernetes.network",
            "kubernetes.api: \"10.0.0.1\" is not a URL",
        ],
    );
    // An unknown challenge type is named where it stands.
    refused(
        "[acme]\nenabled = true\ndirectory = \"letsencrypt\"\nchallenges = [\"dns-01\"]\n",
        &["acme.challenges"],
    );
    refused(
        "[acme]\nenabled = true\ndirectory = \"letsencrypt\"\nretry_min = \"2h\"\nretry_max = \"1h\"\n[acme.ownership]\nplatform = [\"10.0.0.0/40\"]\n",
        &[
            "acme.directory: \"letsencrypt\" is not an http(s) URL",
            "acme.retry_min",
            "acme.ownership.platform[0]",
            "acme.enabled: the proxy answers",
        ],
    );
    let proxy = |cc: &str| {
        format!(
            "[host]\nregion = \"ams\"\n[proxy]\nenabled = true\nmultiplexed_congestion = \"{cc}\"\n"
        )
    };
    refused(
        &proxy("bbr; reno"),
        &["proxy.multiplexed_congestion: \"bbr; reno\" is not an algorithm name"],
    );
    refused(
        &proxy("nosuchalgo"),
        &["proxy.multiplexed_congestion: \"nosuchalgo\" is not loaded in this kernel (available: "],
    );
    // reno is built into every kernel.
    let (_, err) = check(&proxy("reno"));
    assert!(!err.contains("multiplexed_congestion"), "{err}");
}

#[test]
fn the_catalog_command_is_a_client_of_the_admin_api() {
    let dir = tempfile::tempdir().unwrap();
    let port = skein_testkit::free_tcp_port();
    setup(dir.path(), port);
    let d = Daemon::start(dir.path(), port);
    let admin = d.admin.clone();
    let token_file = dir.path().join("state/admin.token");
    let cli = |args: &[&str]| {
        skein()
            .args(["catalog", "--admin", &admin, "--token-file"])
            .arg(&token_file)
            .args(args)
            .output()
            .unwrap()
    };
    std::fs::write(
        dir.path().join("m.toml"),
        "id = \"m5\"\napp = \"web\"\nregion = \"ams\"\nhost = \"a7b:7d\"\n",
    )
    .unwrap();
    let put = cli(&[
        "put",
        "machines",
        dir.path().join("m.toml").to_str().unwrap(),
    ]);
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    let get = cli(&["get", "machines", "m5"]);
    assert!(String::from_utf8_lossy(&get.stdout).contains("\"address\": \"fdaa:0:18:a7b:7d:"));
    let del = cli(&["delete", "apps", "web"]);
    assert_eq!(del.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&del.stderr).contains("defined by the catalog file"));
    // Metrics are served and count what happened.
    let (st, metrics) = http(&d.admin, "GET", "/metrics", None, None).unwrap();
    assert_eq!(st, 200);
    assert!(
        metrics.contains("skein_catalog_writes_total{source=\"api\",result=\"published\"} 1"),
        "{metrics}"
    );
}

#[test]
fn the_admin_api_can_listen_on_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path(), 9);
    let sock = dir.path().join("admin.sock");
    let cfg = std::fs::read_to_string(dir.path().join("skein.toml"))
        .unwrap()
        .replace(
            "listen = \"127.0.0.1:9\"",
            &format!("listen = \"unix:{}\"", sock.display()),
        );
    std::fs::write(dir.path().join("skein.toml"), cfg).unwrap();
    let mut child = skein()
        .args(["run", "--config"])
        .arg(dir.path().join("skein.toml"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let admin = format!("unix:{}", sock.display());
    let token_file = dir.path().join("state/admin.token");
    let get = || {
        skein()
            .args(["catalog", "--admin", &admin, "--token-file"])
            .arg(&token_file)
            .args(["get", "apps", "web"])
            .output()
            .unwrap()
    };
    wait_for("the socket", || get().status.success());
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the admin socket is open to others");
    let token_mode = std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(token_mode, 0o600);
    assert!(String::from_utf8_lossy(&get().stdout).contains("web.example.com"));
    let _ = child.kill();
    let _ = child.wait();
}
