//! The loop that keeps every hostname's certificate issued and fresh.
//!
//! It plans from the catalog ([`crate::plan`]) when apps or certificates
//! change and on a timer, starts at most `max_in_flight` orders and at most
//! `max_orders` per `rate_window`, and waits for a name's backoff to pass
//! before trying it again. One name is ordered by one host at a time: with
//! etcd, the host claims `<prefix>acme/claims/<hostname>` under a lease first
//! (a host that dies mid-order frees the claim when the lease runs out).

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Identifier, NewOrder, OrderStatus, RetryPolicy,
};
use skein_catalog::model::{CertSource, Certificate};
use skein_catalog::sources::api::Api;
use skein_catalog::sources::etcd;
use skein_catalog::{Diff, Kind, Snapshot, Store};
use skein_proxy::acme::Challenges;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument as _;

use crate::owner::{Owner, Verdict};
use crate::plan::{self, Due, Ends, cert_name};
use crate::shared::{Answer, answer_path, hex};
use crate::status::{AcmeStatus, State};
use crate::{AcmeConfig, ChallengeKind};

/// Where issued certificates are written.
#[derive(Clone)]
pub enum Sink {
    /// This host's catalog (the admin API's layer, stored in SQLite): a
    /// single host, or hosts that share no store.
    Api(Api),
    /// etcd, as an operator's record: every host's follower picks it up. The
    /// claims that keep two hosts from ordering one name live there too.
    Etcd {
        /// The cluster.
        client: etcd::Client,
        /// Its keys.
        layout: etcd::Layout,
        /// This host's name, written into its claims.
        host: String,
    },
}

impl Sink {
    async fn put(&self, cert: Certificate) -> Result<(), String> {
        match self {
            Sink::Api(api) => {
                let api = api.clone();
                tokio::task::spawn_blocking(move || api.put_record(cert).map(|_| ()))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())
            }
            Sink::Etcd { client, layout, .. } => {
                let key = layout.record(Kind::Certificates, &cert.name);
                let json = serde_json::to_vec(&cert).map_err(|e| e.to_string())?;
                let conn = client.connect().await.map_err(|e| e.to_string())?;
                conn.put(key.as_bytes(), json, 0)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        }
    }

    async fn delete(&self, name: &str) -> Result<(), String> {
        match self {
            Sink::Api(api) => {
                let (api, name) = (api.clone(), name.to_string());
                tokio::task::spawn_blocking(move || {
                    api.delete_record::<Certificate>(&name).map(|_| ())
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())
            }
            Sink::Etcd { client, layout, .. } => {
                let key = layout.record(Kind::Certificates, name);
                let conn = client.connect().await.map_err(|e| e.to_string())?;
                conn.delete(key.as_bytes(), false)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// Takes the right to order `hostname` for `ttl`; `Ok(None)` when another
    /// host holds it. The claim is released by [`Sink::release`] or when the
    /// lease runs out.
    async fn claim(&self, hostname: &str, ttl: Duration) -> Result<Option<Claim>, String> {
        let Sink::Etcd {
            client,
            layout,
            host,
        } = self
        else {
            return Ok(Some(Claim { lease: 0 }));
        };
        use etcd::wire::{Compare, PutRequest, TxnRequest};
        let conn = client.connect().await.map_err(|e| e.to_string())?;
        let secs = i64::try_from(ttl.as_secs().max(5)).unwrap_or(i64::MAX);
        let (lease, _) = conn.grant(secs).await.map_err(|e| e.to_string())?;
        let key = format!("{}acme/claims/{hostname}", layout.root()).into_bytes();
        let r = conn
            .txn(TxnRequest {
                compare: vec![Compare::absent(key.clone())],
                success: vec![
                    PutRequest {
                        key,
                        value: host.clone().into_bytes(),
                        lease,
                    }
                    .into(),
                ],
                failure: vec![],
            })
            .await
            .map_err(|e| e.to_string())?;
        if r.succeeded {
            Ok(Some(Claim { lease }))
        } else {
            let _ = conn.revoke(lease).await;
            Ok(None)
        }
    }

    /// Publishes a challenge answer to the other edges (under the claim's
    /// lease); true if it was shared (there are other edges to tell).
    async fn share(&self, claim: &Claim, answer: &Answer) -> Result<bool, String> {
        let Sink::Etcd { client, layout, .. } = self else {
            return Ok(false);
        };
        let hostname = match answer {
            Answer::Http { hostname, .. } | Answer::Tls { hostname, .. } => hostname,
        };
        let key = format!("{}{}", layout.acme(), answer_path(hostname));
        let json = serde_json::to_vec(answer).map_err(|e| e.to_string())?;
        let conn = client.connect().await.map_err(|e| e.to_string())?;
        conn.put(key.as_bytes(), json, claim.lease)
            .await
            .map_err(|e| e.to_string())?;
        Ok(true)
    }

    /// The end of a certificate for `hostname` that another host stored
    /// meanwhile, if it is still good: read after taking the claim, so a
    /// name is not ordered twice when this host's catalog lags.
    async fn fresh(&self, hostname: &str, renew_before: Duration) -> Option<SystemTime> {
        let Sink::Etcd { client, layout, .. } = self else {
            return None;
        };
        let key = layout.record(Kind::Certificates, &cert_name(hostname));
        let conn = client.connect().await.ok()?;
        let r = conn
            .range(etcd::wire::RangeRequest {
                key: key.into_bytes(),
                ..Default::default()
            })
            .await
            .ok()?;
        let cert: Certificate = serde_json::from_slice(&r.kvs.first()?.value).ok()?;
        let end = plan::not_after(&cert.chain_pem)?;
        (end > SystemTime::now() + renew_before).then_some(end)
    }

    async fn release(&self, claim: Claim) {
        if let Sink::Etcd { client, .. } = self
            && claim.lease != 0
            && let Ok(conn) = client.connect().await
        {
            let _ = conn.revoke(claim.lease).await;
        }
    }
}

/// A held claim (its lease; 0 when there is no shared store).
struct Claim {
    lease: i64,
}

/// Why an order failed.
#[derive(Debug)]
struct Failure {
    message: String,
    /// Another host holds the name's claim: not a failure of the name.
    busy: bool,
    refused: bool,
    rate_limited: bool,
    account_gone: bool,
}

impl Failure {
    fn new(message: impl Into<String>) -> Self {
        Failure {
            message: message.into(),
            busy: false,
            refused: false,
            rate_limited: false,
            account_gone: false,
        }
    }
}

/// Names the step an ACME call failed in.
fn at(stage: &'static str) -> impl Fn(instant_acme::Error) -> Failure {
    move |e| {
        let mut f = Failure::from(e);
        f.message = format!("{stage}: {}", f.message);
        f
    }
}

impl From<instant_acme::Error> for Failure {
    fn from(e: instant_acme::Error) -> Self {
        let mut f = Failure::new(e.to_string());
        if let instant_acme::Error::Api(p) = &e {
            let t = p.r#type.as_deref().unwrap_or("");
            f.rate_limited = t.ends_with(":rateLimited");
            f.account_gone = t.ends_with(":accountDoesNotExist");
            f.message = format!(
                "{} ({})",
                p.detail.as_deref().unwrap_or("no detail"),
                t.rsplit(':').next().unwrap_or(t)
            );
        }
        f
    }
}

/// The ACME loop of one host.
pub struct Manager {
    cfg: AcmeConfig,
    store: Arc<Store>,
    challenges: Arc<Challenges>,
    sink: Sink,
    state_dir: PathBuf,
    status: Arc<AcmeStatus>,
}

/// What one order task gives back.
struct Outcome {
    hostname: String,
    app: String,
    challenge: ChallengeKind,
    /// The certificate's end, and whether this host ordered it (or found
    /// one another host stored meanwhile).
    result: Result<(SystemTime, bool), Failure>,
}

impl Manager {
    /// A manager writing certificates to `sink`, answering challenges
    /// through `challenges` (the proxy's), keeping its account in
    /// `state_dir/acme/`.
    pub fn new(
        cfg: AcmeConfig,
        store: Arc<Store>,
        challenges: Arc<Challenges>,
        sink: Sink,
        state_dir: PathBuf,
        status: Arc<AcmeStatus>,
    ) -> Self {
        Manager {
            cfg,
            store,
            challenges,
            sink,
            state_dir,
            status,
        }
    }

    /// Runs until `stop`.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut rx = self.store.subscribe();
        let owner = if self.cfg.ownership.check {
            match Owner::new(&self.cfg.ownership) {
                Ok(o) => Some(Arc::new(o)),
                Err(e) => {
                    tracing::error!(error = %e, "acme: no resolver for ownership checks; ordering nothing");
                    self.status
                        .set_account_error(Some(format!("ownership resolver: {e}")));
                    return;
                }
            }
        } else {
            None
        };
        let mut account: Option<Account> = None;
        let mut account_retry = Instant::now();
        let mut ends = Ends::default();
        let mut in_flight: HashSet<String> = HashSet::new();
        let mut tasks: JoinSet<Outcome> = JoinSet::new();
        let mut started: VecDeque<Instant> = VecDeque::new();
        let mut paused_until = Instant::now();
        let mut last: Option<Arc<Snapshot>> = None;
        loop {
            let snap = self.store.snapshot();
            let relevant = match &last {
                None => true,
                Some(prev) => {
                    !Diff::of(&prev.catalog.apps, &snap.catalog.apps).is_empty()
                        || !Diff::of(&prev.catalog.certificates, &snap.catalog.certificates)
                            .is_empty()
                }
            };
            last = Some(snap.clone());
            let now_sys = SystemTime::now();
            let now = Instant::now();
            let mut wake = now + self.cfg.scan_interval;
            let p = plan::plan(&snap.catalog, now_sys, self.cfg.renew_before, &mut ends);
            if relevant {
                for name in &p.retire {
                    match self.sink.delete(name).await {
                        Ok(()) => {
                            metrics::counter!("skein_acme_retired_total").increment(1);
                            tracing::info!(certificate = %name, "acme: issued certificate no longer needed; deleted");
                        }
                        Err(e) => {
                            tracing::warn!(certificate = %name, error = %e, "acme: cannot delete")
                        }
                    }
                }
            }
            // Status: names that need nothing are issued; names gone are dropped.
            let due_names: HashSet<&str> = p.due.iter().map(|d| d.hostname.as_str()).collect();
            self.status
                .retain(|h| due_names.contains(h) || p.good.contains_key(h));
            for (h, (app, end)) in &p.good {
                // Wake when it becomes due.
                if let Some(renew_at) = end.checked_sub(self.cfg.renew_before) {
                    let wait = renew_at.duration_since(now_sys).unwrap_or_default();
                    wake = wake.min(now + wait);
                }
                self.status.update(h, app, |s| {
                    if !in_flight.contains(h) {
                        s.state = State::Issued;
                        s.not_after = Some(*end);
                        s.failures = 0;
                        s.next_attempt = None;
                    }
                });
            }
            metrics::gauge!("skein_acme_due").set(p.due.len() as f64);

            // Once a bound stops new orders this round, the rest of the due
            // names are still listed (as due), not ordered.
            let mut blocked = false;
            for d in &p.due {
                if in_flight.contains(&d.hostname) {
                    continue;
                }
                let st = self.status.get(&d.hostname);
                if let Some(next) = st.as_ref().and_then(|s| s.next_attempt)
                    && let Ok(wait) = next.duration_since(now_sys)
                {
                    wake = wake.min(now + wait);
                    continue;
                }
                if st.is_none() {
                    self.status
                        .update(&d.hostname, &d.app, |s| s.state = State::Due);
                }
                if blocked || in_flight.len() >= self.cfg.max_in_flight {
                    blocked = true;
                    continue;
                }
                if paused_until > now {
                    wake = wake.min(paused_until);
                    blocked = true;
                    continue;
                }
                while started
                    .front()
                    .is_some_and(|t| now.duration_since(*t) >= self.cfg.rate_window)
                {
                    started.pop_front();
                }
                if started.len() >= self.cfg.max_orders as usize {
                    if let Some(first) = started.front() {
                        wake = wake.min(*first + self.cfg.rate_window);
                    }
                    metrics::counter!("skein_acme_rate_limited_total", "by" => "skein")
                        .increment(1);
                    blocked = true;
                    continue;
                }
                if account.is_none() {
                    if account_retry > now {
                        wake = wake.min(account_retry);
                        blocked = true;
                        continue;
                    }
                    match crate::account::load_or_create(&self.cfg, &self.state_dir).await {
                        Ok(a) => {
                            self.status.set_account_error(None);
                            account = Some(a);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "acme: no account");
                            metrics::counter!("skein_acme_account_errors_total").increment(1);
                            self.status.set_account_error(Some(e));
                            account_retry = now + self.cfg.retry_min;
                            wake = wake.min(account_retry);
                            blocked = true;
                            continue;
                        }
                    }
                }
                let Some(acct) = account.clone() else {
                    blocked = true;
                    continue;
                };
                let failures = st.map(|s| s.failures).unwrap_or(0);
                let kind = self.cfg.challenges[failures as usize % self.cfg.challenges.len()];
                in_flight.insert(d.hostname.clone());
                started.push_back(now);
                self.status.update(&d.hostname, &d.app, |s| {
                    s.state = State::Ordering;
                    s.challenge = Some(kind.as_str());
                });
                let job = Job {
                    due: d.clone(),
                    kind,
                    account: acct,
                    challenges: self.challenges.clone(),
                    owner: owner.clone(),
                    sink: self.sink.clone(),
                    timeout: self.cfg.order_timeout,
                    renew_before: self.cfg.renew_before,
                    share_wait: self.cfg.share_wait,
                    stage: std::sync::Mutex::new("start"),
                };
                let span = tracing::info_span!("acme_order", hostname = %d.hostname, challenge = kind.as_str());
                tasks.spawn(job.run().instrument(span));
            }
            metrics::gauge!("skein_acme_orders_in_flight").set(in_flight.len() as f64);
            self.status.export_gauges();

            let sleep = tokio::time::sleep_until(wake.into());
            tokio::select! {
                _ = skein_catalog::store::stopped(&mut stop) => break,
                r = rx.changed() => if r.is_err() { break },
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    let Ok(o) = done else { continue };
                    in_flight.remove(&o.hostname);
                    self.record(&o, &mut account, &mut paused_until);
                }
                _ = sleep => {}
            }
        }
        tasks.abort_all();
    }

    fn record(&self, o: &Outcome, account: &mut Option<Account>, paused_until: &mut Instant) {
        match &o.result {
            Ok((end, ordered)) => {
                if *ordered {
                    metrics::counter!("skein_acme_orders_total", "result" => "issued", "challenge" => o.challenge.as_str()).increment(1);
                    tracing::info!(hostname = %o.hostname, challenge = o.challenge.as_str(), "acme: certificate issued");
                }
                self.status.update(&o.hostname, &o.app, |s| {
                    s.state = State::Issued;
                    s.failures = 0;
                    s.last_error = None;
                    s.next_attempt = None;
                    s.not_after = Some(*end);
                });
            }
            Err(f) if f.busy => {
                metrics::counter!("skein_acme_orders_total", "result" => "busy", "challenge" => o.challenge.as_str()).increment(1);
                self.status.update(&o.hostname, &o.app, |s| {
                    s.state = State::Due;
                    s.next_attempt = Some(SystemTime::now() + self.cfg.retry_min);
                });
            }
            Err(f) => {
                let result = if f.refused { "refused" } else { "failed" };
                metrics::counter!("skein_acme_orders_total", "result" => result, "challenge" => o.challenge.as_str()).increment(1);
                if f.account_gone {
                    crate::account::forget(&self.cfg, &self.state_dir);
                    *account = None;
                }
                let mut failures = 0;
                self.status.update(&o.hostname, &o.app, |s| {
                    s.failures += 1;
                    failures = s.failures;
                });
                let wait = backoff(
                    self.cfg.retry_min,
                    self.cfg.retry_max,
                    failures,
                    &o.hostname,
                );
                if f.rate_limited {
                    // The CA says stop: every order waits, not only this name's.
                    *paused_until = Instant::now() + wait.max(self.cfg.retry_min);
                    metrics::counter!("skein_acme_rate_limited_total", "by" => "ca").increment(1);
                }
                tracing::warn!(hostname = %o.hostname, error = %f.message, retry_in = ?wait, "acme: order failed");
                self.status.update(&o.hostname, &o.app, |s| {
                    s.state = if f.refused {
                        State::Refused
                    } else {
                        State::Failed
                    };
                    s.last_error = Some(f.message.clone());
                    s.next_attempt = Some(SystemTime::now() + wait);
                });
            }
        }
    }
}

/// The wait after the `failures`-th failure in a row: `min` doubled each
/// time, at most `max`, with the upper half jittered (so names that failed
/// together do not come back together).
pub fn backoff(min: Duration, max: Duration, failures: u32, seed: &str) -> Duration {
    let exp = min
        .saturating_mul(1u32 << failures.saturating_sub(1).min(20))
        .min(max);
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write(seed.as_bytes());
    h.write_u32(failures);
    let frac = (h.finish() % 1000) as f64 / 1000.0;
    exp.mul_f64(0.5 + 0.5 * frac)
}

/// One order.
struct Job {
    due: Due,
    kind: ChallengeKind,
    account: Account,
    challenges: Arc<Challenges>,
    owner: Option<Arc<Owner>>,
    sink: Sink,
    timeout: Duration,
    renew_before: Duration,
    share_wait: Duration,
    /// The step in progress, for a timeout's message.
    stage: std::sync::Mutex<&'static str>,
}

/// Takes a challenge answer away when the order ends, however it ends.
struct Presented<'a> {
    challenges: &'a Challenges,
    hostname: &'a str,
    http_tokens: Vec<String>,
    tls: bool,
}

impl Drop for Presented<'_> {
    fn drop(&mut self) {
        for t in &self.http_tokens {
            self.challenges.remove_http(t);
        }
        if self.tls {
            self.challenges.remove_tls(self.hostname);
        }
    }
}

impl Job {
    fn stage(&self, s: &'static str) {
        if let Ok(mut g) = self.stage.lock() {
            *g = s;
        }
    }

    async fn run(self) -> Outcome {
        let started = Instant::now();
        let result = match tokio::time::timeout(self.timeout, self.order()).await {
            Ok(r) => r,
            Err(_) => Err(Failure::new(format!(
                "the order took longer than {:?} (stuck in: {})",
                self.timeout,
                self.stage.lock().map(|s| *s).unwrap_or("?")
            ))),
        };
        metrics::histogram!("skein_acme_order_seconds").record(started.elapsed().as_secs_f64());
        Outcome {
            hostname: self.due.hostname.clone(),
            app: self.due.app.clone(),
            challenge: self.kind,
            result,
        }
    }

    async fn order(&self) -> Result<(SystemTime, bool), Failure> {
        let host = self.due.hostname.as_str();
        self.stage("ownership check");
        if let Some(owner) = &self.owner
            && let Verdict::Refused(why) = owner.check(host, &self.due.app).await
        {
            let mut f = Failure::new(why);
            f.refused = true;
            return Err(f);
        }
        self.stage("claim");
        let claim = self
            .sink
            .claim(host, self.timeout * 2)
            .await
            .map_err(|e| Failure::new(format!("claim: {e}")))?
            .ok_or_else(|| Failure {
                busy: true,
                ..Failure::new("another host is ordering this name")
            })?;
        if let Some(end) = self.sink.fresh(host, self.renew_before).await {
            self.sink.release(claim).await;
            tracing::info!(hostname = host, "acme: another host issued it meanwhile");
            return Ok((end, false));
        }
        let r = self.order_claimed(&claim).await;
        // Stored before the claim is released: whoever claims next finds it.
        let r = match r {
            Ok(cert) => match plan::not_after(&cert.chain_pem) {
                None => Err(Failure::new(
                    "the CA's certificate has no readable notAfter",
                )),
                Some(end) => self
                    .sink
                    .put(cert)
                    .await
                    .map(|()| (end, true))
                    .map_err(|e| Failure::new(format!("storing the certificate: {e}"))),
            },
            Err(f) => Err(f),
        };
        self.sink.release(claim).await;
        r
    }

    async fn order_claimed(&self, claim: &Claim) -> Result<Certificate, Failure> {
        let host = self.due.hostname.as_str();
        self.stage("new order");
        let ids = [Identifier::Dns(host.to_string())];
        let mut order = self
            .account
            .new_order(&NewOrder::new(&ids))
            .await
            .map_err(at("new order"))?;
        let mut presented = Presented {
            challenges: &self.challenges,
            hostname: host,
            http_tokens: Vec::new(),
            tls: false,
        };
        let want = match self.kind {
            ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
            ChallengeKind::Http01 => ChallengeType::Http01,
        };
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        {
            self.stage("authorizations");
            let mut authzs = order.authorizations();
            while let Some(a) = authzs.next().await {
                let mut a = a.map_err(at("authorization"))?;
                match a.status {
                    AuthorizationStatus::Valid => continue,
                    AuthorizationStatus::Pending => {}
                    other => {
                        return Err(Failure::new(format!("authorization is {other:?}")));
                    }
                }
                let mut ch = a.challenge(want.clone()).ok_or_else(|| {
                    Failure::new(format!("the CA offers no {} challenge", self.kind.as_str()))
                })?;
                let ka = ch.key_authorization();
                let answer = match self.kind {
                    ChallengeKind::Http01 => {
                        self.challenges.put_http(host, &ch.token, ka.as_str());
                        presented.http_tokens.push(ch.token.clone());
                        Answer::Http {
                            hostname: host.to_string(),
                            token: ch.token.clone(),
                            key_authorization: ka.as_str().to_string(),
                        }
                    }
                    ChallengeKind::TlsAlpn01 => {
                        self.challenges
                            .put_tls(host, ka.digest().as_ref(), &provider)
                            .map_err(Failure::new)?;
                        presented.tls = true;
                        Answer::Tls {
                            hostname: host.to_string(),
                            digest: hex(ka.digest().as_ref()),
                        }
                    }
                };
                // Any edge may take the validation: give them the answer first.
                let shared = self
                    .sink
                    .share(claim, &answer)
                    .await
                    .map_err(|e| Failure::new(format!("sharing the answer: {e}")))?;
                if shared {
                    tokio::time::sleep(self.share_wait).await;
                }
                self.stage("challenge ready");
                ch.set_ready().await.map_err(at("challenge ready"))?;
            }
        }
        let poll = RetryPolicy::new()
            .initial_delay(Duration::from_millis(250))
            .backoff(1.5)
            .timeout(self.timeout);
        self.stage("validation");
        let status = order.poll_ready(&poll).await.map_err(at("validation"))?;
        if status != OrderStatus::Ready {
            return Err(Failure::new(self.why_invalid(&mut order).await));
        }
        drop(presented);
        let key = rcgen::KeyPair::generate().map_err(|e| Failure::new(e.to_string()))?;
        let mut params = rcgen::CertificateParams::new(vec![host.to_string()])
            .map_err(|e| Failure::new(e.to_string()))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params
            .serialize_request(&key)
            .map_err(|e| Failure::new(e.to_string()))?;
        self.stage("finalize");
        order
            .finalize_csr(csr.der())
            .await
            .map_err(at("finalize"))?;
        self.stage("certificate");
        let chain_pem = order
            .poll_certificate(&poll)
            .await
            .map_err(at("certificate"))?;
        Ok(Certificate {
            name: cert_name(host),
            hostnames: vec![host.to_string()],
            chain_pem,
            key_pem: key.serialize_pem(),
            source: CertSource::Issued,
        })
    }

    /// The CA's reason an order went invalid (the failed challenge's error).
    async fn why_invalid(&self, order: &mut instant_acme::Order) -> String {
        let mut authzs = order.authorizations();
        while let Some(Ok(mut a)) = authzs.next().await {
            if let Ok(state) = a.refresh().await {
                for c in &state.challenges {
                    if let Some(e) = &c.error {
                        return format!(
                            "{} challenge failed: {}",
                            self.kind.as_str(),
                            e.detail.as_deref().unwrap_or("no detail")
                        );
                    }
                }
            }
        }
        "the order became invalid".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_is_bounded_and_jittered() {
        let (min, max) = (Duration::from_secs(60), Duration::from_secs(3600));
        for n in 1..12 {
            let full = min.saturating_mul(1 << (n - 1)).min(max);
            let w = backoff(min, max, n, "a.example.com");
            assert!(
                w >= full / 2 && w <= full,
                "{n}: {w:?} not in [{:?}, {full:?}]",
                full / 2
            );
        }
        assert!(backoff(min, max, 30, "x") <= max);
    }
}
