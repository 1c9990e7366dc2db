//! `skein run`: load the catalog, start the admin listener and the planes the
//! config enables, follow the catalog file, and on SIGTERM/SIGINT drain and exit.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context as _;
use skein_catalog::sources::api::Api;
use skein_catalog::sources::client::Endpoint;
use skein_catalog::sources::etcd::follow::Follower;
use skein_catalog::sources::etcd::publish::Publisher;
use skein_catalog::sources::file::{self, FileSource};
use skein_catalog::sources::sqlite::Persist;
use skein_catalog::{Document, Source, Store};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

use crate::admin::{self, Readiness};
use crate::config::{Config, ensure_token};
use crate::server::{self, Limits, Listener};

/// A daemon that is up.
pub struct Running {
    /// The live catalog.
    pub store: Arc<Store>,
    /// Where the admin listener is bound.
    pub admin: Endpoint,
    /// Where the proxy listens, in the order of `proxy.listeners`.
    pub proxy: Vec<std::net::SocketAddr>,
    /// Where the DNS server listens.
    pub dns: Vec<std::net::SocketAddr>,
    /// Readiness flags.
    pub ready: Arc<Readiness>,
    stop: watch::Sender<bool>,
    hup: Arc<Notify>,
    tasks: JoinSet<()>,
    drain: std::time::Duration,
    /// The serving threads (the proxy's, and the mesh's data path): stopped
    /// last, once every plane has drained.
    workers: Option<skein_proxy::Workers>,
}

/// Starts everything `cfg` asks for. `builtin` is a document compiled into the
/// binary (the demo's), owned by [`Source::Builtin`].
pub async fn start(cfg: Config, builtin: Option<Document>) -> anyhow::Result<Running> {
    let prom = crate::telemetry::init_metrics()?;
    std::fs::create_dir_all(&cfg.state.dir)
        .with_context(|| format!("creating state dir {}", cfg.state.dir.display()))?;
    let token = ensure_token(&cfg.token_file())
        .with_context(|| format!("admin token {}", cfg.token_file().display()))?;

    // The catalog: every source's document validated together, or no start.
    let store = Arc::new(Store::new());
    // ACME challenge answers the proxy serves: this host's orders', and with
    // etcd every host's.
    let challenges = Arc::new(skein_proxy::acme::Challenges::default());
    let ready = Arc::new(Readiness::default());
    // etcd first: local records may refer to its records (a machine of an app
    // the operators put in etcd). If it cannot be read now, start from the
    // local sources; the follower catches up when etcd answers.
    let follower = if cfg.etcd.enabled() {
        let status = Arc::new(skein_catalog::sources::etcd::Status::default());
        let _ = ready.etcd.set(status.clone());
        let mut f = Follower::new(
            cfg.etcd.client(),
            cfg.etcd.layout(),
            store.clone(),
            cfg.host.name.clone(),
            status.clone(),
        );
        if cfg.proxy.enabled {
            // Every edge serves the challenge answers any host publishes.
            f = f.with_subscriber(Arc::new(skein_acme::shared::AnswerMirror::new(
                challenges.clone(),
            )));
        }
        let wait =
            cfg.etcd.connect_timeout * (cfg.etcd.endpoints.len() as u32) + cfg.etcd.request_timeout;
        match tokio::time::timeout(wait, f.load()).await {
            Ok(Ok(keys)) => tracing::info!(keys, "catalog read from etcd"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "etcd unreachable at start; starting from the local sources")
            }
            Err(_) => tracing::warn!(
                "etcd did not answer within {wait:?} at start; starting from the local sources"
            ),
        }
        Some((f, status))
    } else {
        None
    };
    let db = cfg.state.dir.join("catalog.db");
    let persist =
        Arc::new(Persist::open(&db).with_context(|| format!("opening {}", db.display()))?);
    let mut layers = vec![(
        Source::Api,
        persist
            .load()
            .with_context(|| format!("reading {}", db.display()))?,
    )];
    if let Some(doc) = builtin {
        layers.push((Source::Builtin, doc));
    }
    if let Some(path) = &cfg.catalog.file {
        let (doc, _) = file::read(path)
            .map_err(|e| anyhow::anyhow!("catalog file {}:\n{e}", path.display()))?;
        layers.push((Source::File, doc));
    }
    let written = store
        .replace_all(layers)
        .map_err(|e| anyhow::anyhow!("the catalog is invalid, not starting:\n{e}"))?;
    tracing::info!(version = written.snapshot.version, "catalog loaded");
    ready.loaded.store(true, Ordering::Relaxed);

    let (stop, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move { skein_catalog::store::stopped(&mut rx).await }
    };
    let hup = Arc::new(Notify::new());
    let mut tasks = JoinSet::new();
    let mut listening = Vec::new();

    if let Some(path) = &cfg.catalog.file {
        let src = Arc::new(FileSource::new(path.clone(), store.clone()));
        tasks.spawn(src.watch(cfg.catalog.poll_interval, hup.clone(), stopped()));
    }

    if let Some((follower, status)) = follower {
        tasks.spawn(follower.run(stop.subscribe()));
        match &cfg.host.name {
            Some(name) => {
                let p = Publisher::new(
                    cfg.etcd.client(),
                    cfg.etcd.layout(),
                    store.clone(),
                    name.clone(),
                    cfg.etcd.lease_ttl,
                    status,
                );
                tasks.spawn(p.run(stop.subscribe()));
            }
            None => tracing::info!("no host.name: this host publishes no machines to etcd"),
        }
    }

    if cfg.kubernetes.enabled {
        // A cluster that cannot be reached keeps its services out of the
        // catalog until it answers; the rest of the host serves regardless.
        let status = Arc::new(skein_catalog::sources::kubernetes::KubeStatus::default());
        let _ = ready.kubernetes.set(status.clone());
        let client = cfg
            .kubernetes
            .client()
            .await
            .map_err(|e| anyhow::anyhow!("kubernetes: {e}"))?;
        let source = skein_catalog::sources::kubernetes::KubeSource::new(
            client,
            cfg.kubernetes.clone(),
            store.clone(),
            status,
        );
        tasks.spawn(source.run(stop.subscribe()));
    }

    // The serving threads, one single-threaded runtime each: the proxy
    // serves on them, and skein's userspace WireGuard runs its data path on
    // them (a TUN queue each), so what the proxy sends over the mesh is
    // encrypted by an awake thread rather than a woken one.
    let workers = if cfg.proxy.enabled {
        let n = skein_catalog::serving_threads(cfg.proxy.threads);
        Some(
            skein_proxy::Workers::start(n, "skein-worker")
                .context("starting the serving threads")?,
        )
    } else {
        None
    };
    // With a proxy, the mesh stops after the proxy has drained: requests in
    // flight to other hosts' machines cross it until they end.
    let (mesh_stop, mesh_stop_rx) = if cfg.proxy.enabled {
        let (tx, rx) = watch::channel(false);
        (Some(tx), rx)
    } else {
        (None, stop.subscribe())
    };

    // The mesh first: it puts the host's local addresses (the resolver,
    // the mesh address) in place before the proxy and DNS bind them.
    if cfg.mesh.enabled {
        let name = cfg.host.name.clone().unwrap_or_default();
        // A TUN queue per serving thread; with no proxy, as many on the
        // main runtime, whose threads share them.
        let datapath = match &workers {
            Some(w) => w.handles().to_vec(),
            None => vec![tokio::runtime::Handle::current(); skein_catalog::serving_threads(None)],
        };
        let agent = skein_mesh::Agent::start(&cfg.mesh, &name, &cfg.state.dir, &datapath)
            .await
            .context("starting the mesh")?;
        tasks.spawn(skein_mesh::agent::run(
            agent,
            store.subscribe(),
            mesh_stop_rx,
        ));
    }

    if cfg.proxy.enabled {
        let proxy = skein_proxy::Proxy::on_host(
            cfg.proxy.clone(),
            cfg.host.region.clone(),
            cfg.host.name.clone(),
            challenges.clone(),
        )?;
        // Tables first: the backhaul listener's address is in this host's record.
        proxy.apply(&store.snapshot());
        let bound = proxy.bind()?;
        let (drained_tx, drained) = tokio::sync::oneshot::channel::<()>();
        if cfg.proxy.steer.enabled() {
            let steering = crate::steer::Steering::start(&cfg.proxy.steer, &bound).await?;
            tasks.spawn(steering.run(stop.subscribe(), drained));
        }
        listening.extend(bound.iter().map(|b| b.local));
        tasks.spawn(proxy.clone().follow(store.subscribe(), stop.subscribe()));
        tasks.spawn(skein_proxy::health::run(proxy.clone(), stop.subscribe()));
        let handles = workers
            .as_ref()
            .map(|w| w.handles().to_vec())
            .unwrap_or_default();
        let (stop_rx, drain) = (stop.subscribe(), cfg.shutdown.drain_timeout);
        tasks.spawn(async move {
            proxy.serve_on(&handles, bound, stop_rx, drain).await;
            let _ = drained_tx.send(());
            if let Some(mesh) = mesh_stop {
                let _ = mesh.send(true);
            }
        });
    }

    let mut dns_at = Vec::new();
    if cfg.dns.enabled {
        let dns = skein_dns::Dns::new(cfg.dns.clone());
        let bound = dns.bind().context("binding the DNS listeners")?;
        dns_at.extend(bound.iter().map(|b| b.local));
        dns.apply(&store.snapshot());
        tasks.spawn(dns.clone().follow(store.subscribe(), stop.subscribe()));
        tasks.spawn(dns.serve(bound, stop.subscribe()));
    }

    let api = Api {
        store: store.clone(),
        persist: Some(persist),
        token: Arc::from(token.as_str()),
    };
    let acme_status = Arc::new(skein_acme::AcmeStatus::default());
    if cfg.acme.enabled && cfg.proxy.enabled {
        // With etcd, issued certificates go there, so every edge serves them
        // and one host orders each name; alone, into this host's catalog.
        let sink = if cfg.etcd.enabled() {
            skein_acme::Sink::Etcd {
                client: cfg.etcd.client(),
                layout: cfg.etcd.layout(),
                host: cfg
                    .host
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("pid {}", std::process::id())),
            }
        } else {
            skein_acme::Sink::Api(api.clone())
        };
        let manager = skein_acme::Manager::new(
            cfg.acme.clone(),
            store.clone(),
            challenges,
            sink,
            cfg.state.dir.clone(),
            acme_status.clone(),
        );
        tasks.spawn(manager.run(stop.subscribe()));
    }

    let endpoint: Endpoint = cfg
        .admin
        .listen
        .parse()
        .map_err(|e: String| anyhow::anyhow!("admin.listen: {e}"))?;
    let listener = Listener::bind(&endpoint)
        .await
        .with_context(|| format!("binding the admin listener on {endpoint}"))?;
    let admin_at = listener.local();
    let router = admin::router(
        api,
        cfg.admin.max_body_bytes,
        ready.clone(),
        prom,
        acme_status,
    );
    let limits = Limits {
        max_connections: cfg.admin.max_connections,
        max_header_bytes: cfg.admin.max_header_bytes,
        header_timeout: cfg.admin.header_timeout,
        request_timeout: cfg.admin.request_timeout,
    };
    tasks.spawn(server::serve(
        "admin",
        listener,
        router,
        limits,
        stopped(),
        cfg.shutdown.drain_timeout,
    ));
    tracing::info!(admin = %admin_at, "skein is up");

    Ok(Running {
        store,
        admin: admin_at,
        proxy: listening,
        dns: dns_at,
        ready,
        stop,
        hup,
        tasks,
        drain: cfg.shutdown.drain_timeout,
        workers,
    })
}

impl Running {
    /// Waits for SIGTERM or SIGINT (reloading the catalog file on SIGHUP), then
    /// drains and returns.
    pub async fn until_signal(self) -> anyhow::Result<()> {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM: draining"); break }
                _ = int.recv() => { tracing::info!("SIGINT: draining"); break }
                _ = hup.recv() => { tracing::info!("SIGHUP: reloading the catalog file"); self.hup.notify_one() }
            }
        }
        self.shutdown().await;
        Ok(())
    }

    /// Stops accepting, lets in-flight work finish within the drain deadline.
    pub async fn shutdown(mut self) {
        self.ready.draining.store(true, Ordering::Relaxed);
        let _ = self.stop.send(true);
        let all = async { while self.tasks.join_next().await.is_some() {} };
        // Each listener has the drain deadline; this one is a backstop.
        if tokio::time::timeout(self.drain + std::time::Duration::from_secs(1), all)
            .await
            .is_err()
        {
            tracing::warn!("drain deadline passed");
        }
        // What is still open on the serving threads ends with them.
        self.tasks.abort_all();
        drop(self.workers.take());
        tracing::info!("stopped");
    }
}
