//! Steering on this host: the eBPF `sk_lookup` program that hands every
//! connection to an anycast address (any port) or a flycast address to the
//! proxy's steered sockets, and the `local` routes that take the anycast
//! prefixes in on `lo`. (Flycast ranges are taken in by the mesh agent, per
//! network with a machine here.) Everything goes when the daemon stops; if it
//! dies, the program goes with it and the kernel refuses those connections.

use std::net::IpAddr;

use anyhow::Context as _;
use skein_catalog::sixpn::policy::Slot;
use skein_mesh::netlink::Netlink;
use skein_proxy::{Bound, BoundKind, config::SteerConfig};
use tokio::sync::watch;

/// The steering of a running daemon. The prefixes it steers (and routes to
/// `lo`, and announces) are the ones `steer` holds.
pub struct Steering {
    steer: skein_ebpf::Steer,
    nl: Netlink,
    lo: u32,
    announced: Option<Announced>,
}

/// The announcement: the steered prefixes as routes in the speaker's table on
/// a TUN device this process owns (closed with it, so a crash withdraws too).
struct Announced {
    _device: Vec<skein_mesh::tun::Tun>,
    index: u32,
    table: u32,
}

impl Steering {
    /// Loads and attaches the program to this namespace, points it at the
    /// proxy's steered sockets and takes the anycast prefixes in.
    pub async fn start(cfg: &SteerConfig, bound: &[Bound]) -> anyhow::Result<Steering> {
        let mut steer = skein_ebpf::Steer::load().context("proxy.steer")?;
        steer.attach().context("proxy.steer: attaching sk_lookup")?;
        for b in bound.iter().filter(|b| b.kind == BoundKind::Steered) {
            let slot = match b.local.ip() {
                IpAddr::V4(_) => Slot::V4,
                IpAddr::V6(_) => Slot::V6,
            };
            let Some(socket) = b.socket() else { continue };
            steer
                .set_socket(slot, socket)
                .context("proxy.steer: the steered socket")?;
        }
        let nl = Netlink::connect().context("proxy.steer: netlink")?;
        let lo = nl
            .index("lo")
            .await?
            .context("proxy.steer: no loopback interface")?;
        let mut s = Steering {
            steer,
            nl,
            lo,
            announced: None,
        };
        for p in &cfg.anycast {
            s.nl.add_local_route(p.trunc().addr(), p.prefix_len(), s.lo)
                .await
                .with_context(|| format!("proxy.steer.anycast: routing {p} to lo"))?;
            s.steer
                .add_prefix(*p)
                .with_context(|| format!("proxy.steer.anycast: {p}"))?;
        }
        tracing::info!(anycast = ?cfg.anycast, flycast = cfg.flycast, "steering attached");
        if let Some(a) = &cfg.announce {
            s.announce(a).await?;
        }
        Ok(s)
    }

    /// Puts the anycast prefixes in the speaker's table: this edge serves.
    async fn announce(&mut self, cfg: &skein_proxy::config::AnnounceConfig) -> anyhow::Result<()> {
        let what = "proxy.steer.announce";
        let device = skein_mesh::tun::Tun::create(&cfg.interface, 1)
            .with_context(|| format!("{what}: creating {}", cfg.interface))?;
        let index = self
            .nl
            .index(&cfg.interface)
            .await?
            .with_context(|| format!("{what}: {} vanished", cfg.interface))?;
        self.nl.up(index, None).await?;
        let prefixes = self.steer.prefixes();
        for p in prefixes {
            self.nl
                .add_table_route(p.trunc().addr(), p.prefix_len(), index, cfg.table)
                .await
                .with_context(|| format!("{what}: announcing {p}"))?;
        }
        tracing::info!(table = cfg.table, interface = %cfg.interface, ?prefixes, "anycast announced");
        metrics::gauge!("skein_anycast_announced").set(1.0);
        self.announced = Some(Announced {
            _device: device,
            index,
            table: cfg.table,
        });
        Ok(())
    }

    /// Takes the announcement back (new connections go to other edges while
    /// this one drains what it has).
    async fn withdraw(&mut self) {
        let Some(a) = self.announced.take() else {
            return;
        };
        for p in self.steer.prefixes() {
            if let Err(e) = self
                .nl
                .del_table_route(p.trunc().addr(), p.prefix_len(), a.index, a.table)
                .await
            {
                tracing::warn!(prefix = %p, error = %e, "withdrawing an anycast prefix");
            }
        }
        metrics::gauge!("skein_anycast_announced").set(0.0);
        tracing::info!("anycast withdrawn");
    }

    /// Publishes the counters until `stop`; then withdraws the announcement at
    /// once (new connections go to other edges), and takes the rest away once
    /// the proxy has drained (`drained`): the connections it is finishing
    /// still arrive on the anycast addresses.
    pub async fn run(
        mut self,
        mut stop: watch::Receiver<bool>,
        drained: tokio::sync::oneshot::Receiver<()>,
    ) {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
        loop {
            tokio::select! {
                _ = skein_catalog::store::stopped(&mut stop) => break,
                _ = tick.tick() => self.export(),
            }
        }
        self.withdraw().await;
        let _ = drained.await;
        for p in self.steer.prefixes().to_vec() {
            if let Err(e) = self
                .nl
                .del_local_route(p.trunc().addr(), p.prefix_len(), self.lo)
                .await
            {
                tracing::warn!(prefix = %p, error = %e, "removing an anycast route");
            }
            self.steer.remove_prefix(p);
        }
        self.steer.detach();
        tracing::info!("steering detached");
    }

    fn export(&self) {
        match self.steer.counters() {
            Ok(cs) => {
                for (what, n) in cs {
                    metrics::counter!("skein_ebpf_steered_total", "to" => what.name()).absolute(n);
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading the steering counters"),
        }
    }
}
