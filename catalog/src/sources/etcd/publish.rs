//! Publishes this host's machines to etcd under a lease it keeps alive.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::Instrument as _;

use super::wire::{self, LeaseKeepAliveRequest};
use super::{Backoff, Conn, Error, Layout, Status, TXN_OPS};
use crate::index::Source;
use crate::record::Kind;
use crate::store::{Snapshot, Store, stopped};

/// Publishes the machines of one host.
pub struct Publisher {
    client: wire::Client,
    layout: Layout,
    store: Arc<Store>,
    host: String,
    ttl: Duration,
    status: Arc<Status>,
}

impl Publisher {
    /// A publisher of `host`'s machines (the host's name).
    pub fn new(
        client: wire::Client,
        layout: Layout,
        store: Arc<Store>,
        host: String,
        ttl: Duration,
        status: Arc<Status>,
    ) -> Self {
        Publisher {
            client,
            layout,
            store,
            host,
            ttl,
            status,
        }
    }

    /// The machines this host runs that it must publish, as `(etcd key, JSON)`:
    /// those of the local sources (not the ones etcd itself brought) whose host
    /// is this one.
    pub fn desired(&self, snap: &Snapshot) -> BTreeMap<String, Vec<u8>> {
        let cat = &snap.catalog;
        let Some(me) = cat.hosts.values().find(|h| h.name == self.host) else {
            return BTreeMap::new();
        };
        cat.machines
            .values()
            .filter(|m| m.host == me.id)
            .filter(|m| cat.owners.get(&(Kind::Machines, m.id.clone())) != Some(&Source::Etcd))
            .filter_map(|m| {
                let json = serde_json::to_vec(&**m).ok()?;
                Some((self.layout.machine(&self.host, &m.id), json))
            })
            .collect()
    }

    /// Runs until `stop`. The lease is not revoked on stop: a restart within
    /// the TTL takes the keys over without them ever leaving other hosts.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let span = tracing::info_span!("etcd_publish", host = %self.host);
        async move {
            let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
            loop {
                if *stop.borrow() {
                    return;
                }
                let conn = tokio::select! {
                    _ = stopped(&mut stop) => return,
                    c = self.client.connect() => c,
                };
                let err = match conn {
                    Ok(conn) => match self.session(&conn, &mut stop, &mut backoff).await {
                        Ok(()) => return,
                        Err(e) => {
                            conn.failed();
                            e
                        }
                    },
                    Err(e) => e,
                };
                self.status.set_lease(false, 0);
                tracing::warn!(error = %err, "publishing machines to etcd failed; retrying");
                metrics::counter!("skein_etcd_lease_lost_total").increment(1);
                let wait = backoff.next();
                tokio::select! {
                    _ = stopped(&mut stop) => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn session(
        &self,
        conn: &Conn,
        stop: &mut watch::Receiver<bool>,
        backoff: &mut Backoff,
    ) -> Result<(), Error> {
        let (lease, granted) = conn.grant(self.ttl.as_secs() as i64).await?;
        let (ka, mut answers) = conn.keepalive(lease).await?;
        let mut rx = self.store.subscribe();
        // Everything goes out again under the new lease; keys of this host that
        // the catalog no longer has (left from before a restart) go.
        let mut published: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let (old, _) = conn
            .range_prefix(self.layout.machines_of(&self.host).as_bytes(), 2000)
            .await?;
        let stale: BTreeMap<String, Vec<u8>> = old
            .into_iter()
            .map(|kv| (String::from_utf8_lossy(&kv.key).into_owned(), Vec::new()))
            .collect();
        let want = self.desired(&rx.borrow_and_update());
        self.sync(conn, lease, &stale, &want, true).await?;
        published.clone_from(&want);
        self.status.set_lease(true, published.len());
        backoff.reset();
        tracing::info!(
            lease,
            ttl = granted,
            machines = published.len(),
            endpoint = conn.endpoint(),
            "machines published to etcd"
        );

        // Renew at a third of the TTL: two renewals may be lost before it lapses.
        let mut tick = tokio::time::interval(self.ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stopped(stop) => return Ok(()),
                _ = tick.tick() => {
                    if ka.send(LeaseKeepAliveRequest { id: lease }).await.is_err() {
                        return Err(Error::Protocol("the keep-alive stream closed".into()));
                    }
                }
                a = answers.message() => match a {
                    Ok(Some(r)) if r.ttl <= 0 => {
                        return Err(Error::Protocol(format!("lease {lease:x} expired")));
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return Err(Error::Protocol("the keep-alive stream ended".into())),
                    Err(s) => return Err(Error::Status(s)),
                },
                r = rx.changed() => {
                    if r.is_err() {
                        return Ok(());
                    }
                    let want = self.desired(&rx.borrow_and_update());
                    if want != published {
                        self.sync(conn, lease, &published, &want, false).await?;
                        published = want;
                        self.status.set_lease(true, published.len());
                    }
                }
            }
        }
    }

    /// Writes what changed from `have` to `want`: puts under `lease`, deletes,
    /// [`TXN_OPS`] per transaction. With `all`, every wanted key is written
    /// (to move it to a new lease).
    async fn sync(
        &self,
        conn: &Conn,
        lease: i64,
        have: &BTreeMap<String, Vec<u8>>,
        want: &BTreeMap<String, Vec<u8>>,
        all: bool,
    ) -> Result<(), Error> {
        let mut ops: Vec<wire::RequestOp> = Vec::new();
        for (k, v) in want {
            if all || have.get(k) != Some(v) {
                ops.push(
                    wire::PutRequest {
                        key: k.clone().into_bytes(),
                        value: v.clone(),
                        lease,
                    }
                    .into(),
                );
            }
        }
        for k in have.keys().filter(|k| !want.contains_key(*k)) {
            ops.push(
                wire::DeleteRangeRequest {
                    key: k.clone().into_bytes(),
                    range_end: Vec::new(),
                }
                .into(),
            );
        }
        let n = ops.len();
        while !ops.is_empty() {
            let rest = ops.split_off(ops.len().min(TXN_OPS));
            let batch = std::mem::replace(&mut ops, rest);
            conn.txn(wire::TxnRequest {
                compare: Vec::new(),
                success: batch,
                failure: Vec::new(),
            })
            .await?;
        }
        if n > 0 {
            metrics::counter!("skein_etcd_publish_ops_total").increment(n as u64);
            tracing::debug!(ops = n, "machines synced to etcd");
        }
        Ok(())
    }
}
