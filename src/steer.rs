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

/// The steering of a running daemon.
pub struct Steering {
    steer: skein_ebpf::Steer,
    nl: Netlink,
    lo: u32,
    routed: Vec<ipnet::IpNet>,
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
            routed: Vec::new(),
        };
        for p in &cfg.anycast {
            s.steer
                .add_prefix(*p)
                .with_context(|| format!("proxy.steer.anycast: {p}"))?;
            s.nl.add_local_route(p.trunc().addr(), p.prefix_len(), s.lo)
                .await
                .with_context(|| format!("proxy.steer.anycast: routing {p} to lo"))?;
            s.routed.push(*p);
        }
        tracing::info!(anycast = ?cfg.anycast, flycast = cfg.flycast, "steering attached");
        Ok(s)
    }

    /// Publishes the counters until `stop`, then takes everything away.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
        loop {
            tokio::select! {
                _ = skein_catalog::store::stopped(&mut stop) => break,
                _ = tick.tick() => self.export(),
            }
        }
        for p in std::mem::take(&mut self.routed) {
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
