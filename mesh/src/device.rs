//! skein's userspace WireGuard device: boringtun's Noise state machine
//! (`boringtun::noise`) driven by our own I/O loops, a TUN interface, one UDP
//! socket, and the standard UAPI socket so `wg show` works against it.
//!
//! The two data paths are tasks on the tokio runtimes the device is given (the
//! daemon's serving threads, which the proxy serves on), a pair per runtime, each
//! pair with a TUN queue and a UDP socket of its own (`IFF_MULTI_QUEUE`,
//! SO_REUSEPORT: the kernel spreads flows over the queues and peers over the
//! sockets, so the crypto spreads over the threads): `tun` (packets from the
//! kernel: route by AllowedIPs, encrypt, send) and `udp` (datagrams from peers:
//! find the peer by receiver index or, for a handshake, by its static key;
//! decrypt; cryptokey-route check; write to the TUN). A proxy's backhaul frame
//! written to a mesh address is thus encrypted and sent by the thread that wrote
//! it, when it next looks for work, and a datagram decrypted for the proxy is
//! read by the same awake thread: with dedicated threads every crossing between
//! proxy and mesh woke a sleeping thread, four per proxied request on each host
//! (about 40 us off the median end-to-end request on this VM; see
//! benches/results/e2e-2026-12-02.md).
//! Two threads stay for the slow paths: `timers` (handshakes, keepalives,
//! rate-limiter resets) and `uapi` (configuration).
//! The data paths read an immutable [`Table`] through `ArcSwap` and lock only the
//! one peer they work on; UAPI writers rebuild the table and keep every unchanged
//! peer's `Arc`, so sessions survive configuration changes of other peers.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket},
    os::unix::{fs::PermissionsExt as _, net::UnixListener},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use arc_swap::ArcSwap;
use boringtun::{
    noise::{Packet, Tunn, TunnResult, handshake::parse_handshake_anon, rate_limiter::RateLimiter},
    x25519::{PublicKey, StaticSecret},
};
use parking_lot::{Mutex, RwLock};
use tokio::{io::unix::AsyncFd, runtime::Handle, sync::Notify};
use tracing::{debug, info, warn};

use crate::batch::{Inbox, Outbox};
use crate::{
    key::Key,
    tun::{Tun, readable},
    uapi::{DeviceInfo, DeviceUpdate, PeerInfo, Prefix, UapiError},
};

/// Handshakes per second before cookies are demanded.
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// How long the slow-path threads' blocking calls wait before looking at the
/// stop flag, and how long a data path pauses after its descriptor failed.
const POLL: Duration = Duration::from_millis(200);
/// Largest packet handled (no offloads yet: one MTU-sized packet at a time).
const BUF: usize = 65_536;

/// How to create a device.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    /// Interface name.
    pub name: String,
    /// UDP port (0: any).
    pub listen_port: u16,
    /// Where the UAPI socket goes (`<dir>/<name>.sock`).
    pub uapi_dir: PathBuf,
}

struct Peer {
    key: Key,
    index: u32,
    tunn: Mutex<Tunn>,
    endpoint: RwLock<Option<SocketAddr>>,
    allowed: RwLock<Vec<Prefix>>,
    keepalive: u16,
    preshared: Option<Key>,
}

impl Peer {
    fn allows(&self, src: IpAddr) -> bool {
        self.allowed.read().iter().any(|p| p.contains(src))
    }
}

/// Longest-prefix match over every peer's AllowedIPs: one hash lookup per distinct
/// prefix length (the mesh uses one, `/48`).
#[derive(Default)]
struct Routes {
    v6: Vec<(u8, HashMap<u128, Arc<Peer>>)>,
    v4: Vec<(u8, HashMap<u32, Arc<Peer>>)>,
}

fn mask6(a: Ipv6Addr, len: u8) -> u128 {
    u128::from(a)
        & u128::MAX
            .checked_shl(128 - u32::from(len.min(128)))
            .unwrap_or(0)
}

fn mask4(a: std::net::Ipv4Addr, len: u8) -> u32 {
    u32::from(a)
        & u32::MAX
            .checked_shl(32 - u32::from(len.min(32)))
            .unwrap_or(0)
}

impl Routes {
    fn build(peers: &[Arc<Peer>]) -> Routes {
        let mut v6: HashMap<u8, HashMap<u128, Arc<Peer>>> = HashMap::new();
        let mut v4: HashMap<u8, HashMap<u32, Arc<Peer>>> = HashMap::new();
        for p in peers {
            for a in p.allowed.read().iter() {
                match a.addr {
                    IpAddr::V6(x) => {
                        v6.entry(a.len)
                            .or_default()
                            .insert(mask6(x, a.len), p.clone());
                    }
                    IpAddr::V4(x) => {
                        v4.entry(a.len)
                            .or_default()
                            .insert(mask4(x, a.len), p.clone());
                    }
                }
            }
        }
        let mut r = Routes {
            v6: v6.into_iter().collect(),
            v4: v4.into_iter().collect(),
        };
        r.v6.sort_by_key(|b| std::cmp::Reverse(b.0));
        r.v4.sort_by_key(|b| std::cmp::Reverse(b.0));
        r
    }

    fn lookup(&self, dst: IpAddr) -> Option<&Arc<Peer>> {
        match dst {
            IpAddr::V6(a) => self.v6.iter().find_map(|(len, m)| m.get(&mask6(a, *len))),
            IpAddr::V4(a) => self.v4.iter().find_map(|(len, m)| m.get(&mask4(a, *len))),
        }
    }
}

struct Identity {
    private: Key,
    secret: StaticSecret,
    public: PublicKey,
    limiter: Arc<RateLimiter>,
}

/// What the data paths read.
#[derive(Default)]
struct Table {
    identity: Option<Arc<Identity>>,
    peers: Vec<Arc<Peer>>,
    by_key: HashMap<Key, Arc<Peer>>,
    by_index: HashMap<u32, Arc<Peer>>,
    routes: Routes,
}

/// One data path: a TUN queue and an underlay socket, served by a pair of
/// tasks on one runtime.
struct Queue {
    tun: AsyncFd<Tun>,
    /// Non-blocking, registered with `runtime`; replaced when UAPI moves the
    /// port (`rebound` tells the receiving task).
    udp: ArcSwap<AsyncFd<UdpSocket>>,
    rebound: Notify,
    runtime: Handle,
}

struct Shared {
    name: String,
    /// At least one; the first also sends what the slow paths send.
    queues: Vec<Queue>,
    listen_port: AtomicU32,
    fwmark: AtomicU32,
    table: ArcSwap<Table>,
    /// Serialises writers (UAPI sets).
    writer: Mutex<()>,
    next_index: AtomicU32,
    stop: AtomicBool,
}

/// A running WireGuard device. Dropping it stops its tasks and threads, removes
/// its UAPI socket and, once the runtime has dropped the stopped tasks, its
/// interface.
pub struct Device {
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    threads: Vec<JoinHandle<()>>,
    uapi_path: PathBuf,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("name", &self.shared.name)
            .finish()
    }
}

/// One underlay socket per runtime on `port` (0: any; the rest join the port
/// the first got), each registered with its runtime.
fn bind(port: u16, runtimes: &[Handle]) -> io::Result<Vec<AsyncFd<UdpSocket>>> {
    let mut out = Vec::new();
    let mut port = port;
    for rt in runtimes {
        let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::DGRAM, None)?;
        s.set_only_v6(false)?;
        s.set_reuse_port(runtimes.len() > 1)?;
        s.set_recv_buffer_size(4 << 20)?;
        s.set_send_buffer_size(4 << 20)?;
        s.set_nonblocking(true)?;
        s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
        let s: UdpSocket = s.into();
        port = s.local_addr()?.port();
        let _in = rt.enter();
        out.push(crate::tun::register(s)?);
    }
    Ok(out)
}

/// The dual-stack socket wants IPv4 peers as v4-mapped IPv6 addresses.
fn mapped(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V4(v4) => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        v6 => v6,
    }
}

fn unmapped(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => a,
        },
        v4 => v4,
    }
}

fn dropped(reason: &'static str) {
    metrics::counter!("skein_mesh_dropped_total", "reason" => reason).increment(1);
}

impl Device {
    /// Creates the TUN interface, binds the UDP port, serves the UAPI socket;
    /// the data paths run as tasks on `runtimes`, a TUN queue and a socket
    /// for each (at least one: an empty list is an error). The device has no
    /// key and no peers until configured through UAPI.
    pub fn create(config: &DeviceConfig, runtimes: &[Handle]) -> io::Result<Device> {
        if runtimes.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a WireGuard device needs a runtime for its data path",
            ));
        }
        let tuns = Tun::create(&config.name, runtimes.len())?;
        let udps = bind(config.listen_port, runtimes)?;
        let port = udps[0].get_ref().local_addr()?.port();
        let mut queues = Vec::new();
        for ((tun, udp), rt) in tuns.into_iter().zip(udps).zip(runtimes) {
            let tun = {
                let _in = rt.enter();
                crate::tun::register(tun)?
            };
            queues.push(Queue {
                tun,
                udp: ArcSwap::from_pointee(udp),
                rebound: Notify::new(),
                runtime: rt.clone(),
            });
        }
        let shared = Arc::new(Shared {
            name: config.name.clone(),
            queues,
            listen_port: AtomicU32::new(u32::from(port)),
            fwmark: AtomicU32::new(0),
            table: ArcSwap::from_pointee(Table::default()),
            writer: Mutex::new(()),
            next_index: AtomicU32::new(rand::random::<u32>() & 0x00ff_ffff),
            stop: AtomicBool::new(false),
        });
        std::fs::create_dir_all(&config.uapi_dir)?;
        let uapi_path = crate::uapi::socket_path(&config.uapi_dir, &config.name);
        match std::os::unix::net::UnixStream::connect(&uapi_path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is served by another process", uapi_path.display()),
                ));
            }
            Err(_) => {
                let _ = std::fs::remove_file(&uapi_path);
            }
        }
        let listener = UnixListener::bind(&uapi_path)?;
        std::fs::set_permissions(&uapi_path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        let mut threads = Vec::new();
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(format!("{}-{name}", config.name))
                .spawn(f)
        };
        let mut tasks = Vec::new();
        for (i, q) in shared.queues.iter().enumerate() {
            tasks.push(q.runtime.spawn(tun_task(shared.clone(), i)));
            tasks.push(q.runtime.spawn(udp_task(shared.clone(), i)));
        }
        let s = shared.clone();
        threads.push(spawn("timers", Box::new(move || timer_loop(&s)))?);
        let s = shared.clone();
        threads.push(spawn("uapi", Box::new(move || uapi_loop(&s, listener)))?);
        info!(device = %config.name, port, uapi = %uapi_path.display(), "wireguard device up");
        Ok(Device {
            shared,
            tasks,
            threads,
            uapi_path,
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The UAPI socket.
    pub fn uapi_path(&self) -> &Path {
        &self.uapi_path
    }

    /// The UDP port it listens on.
    pub fn listen_port(&self) -> u16 {
        self.shared.listen_port.load(Ordering::Relaxed) as u16
    }

    /// Applies a UAPI `set` (what the socket does, callable in-process too).
    pub fn apply(&self, update: &DeviceUpdate) -> Result<(), UapiError> {
        apply(&self.shared, update)
    }

    /// The UAPI `get` view.
    pub fn info(&self) -> DeviceInfo {
        info(&self.shared)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.tasks.drain(..) {
            t.abort();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.uapi_path);
        info!(device = %self.shared.name, "wireguard device down");
    }
}

/// Sends one datagram (a handshake, a cookie, a keepalive) on `q`'s socket.
fn send(q: &Queue, to: SocketAddr, b: &[u8]) {
    if let Err(e) = q.udp.load().get_ref().send_to(b, mapped(to)) {
        debug!(%to, error = %e, "wireguard send failed");
        dropped("send_failed");
    }
}

/// Packets from the kernel on queue `i`: encrypted a batch at a time and sent
/// together.
async fn tun_task(s: Arc<Shared>, i: usize) {
    let Some(q) = s.queues.get(i) else { return };
    let mut buf = vec![0u8; BUF];
    let mut outbox = Outbox::new(BUF + 32);
    loop {
        let mut ready = match q.tun.readable().await {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "tun poll failed");
                tokio::time::sleep(POLL).await;
                continue;
            }
        };
        // Encrypt what is queued, up to a batch, then send it in one go.
        let mut drained = false;
        while !outbox.is_full() {
            match ready.try_io(|tun| tun.get_ref().recv(&mut buf)) {
                Ok(Ok(n)) => encrypt(&s, &buf[..n], &mut outbox),
                Ok(Err(e)) => {
                    warn!(error = %e, "tun read failed");
                    drained = true;
                    break;
                }
                // read to empty: the readiness is cleared
                Err(_) => {
                    drained = true;
                    break;
                }
            }
        }
        drop(ready);
        send_out(q, &mut outbox).await;
        if !drained {
            // a full batch: let the runtime's other tasks (the proxy) run
            tokio::task::yield_now().await;
        }
    }
}

/// Sends what the outbox holds, waiting for room in the socket's buffer when
/// it is full rather than dropping.
async fn send_out(q: &Queue, outbox: &mut Outbox) {
    while !outbox.is_empty() {
        let flushed = outbox.flush(q.udp.load().get_ref());
        for _ in 0..flushed.failed {
            dropped("send_failed");
        }
        if !flushed.blocked {
            return;
        }
        // Only a full buffer holds on to the socket (across the wait).
        let sock = q.udp.load_full();
        match sock.writable().await {
            Ok(mut w) => w.clear_ready(),
            Err(_) => {
                for _ in 0..outbox.len() {
                    dropped("send_failed");
                }
                outbox.clear();
                return;
            }
        }
    }
}

/// Encrypts one packet from the TUN into the outbox (its peer by AllowedIPs).
fn encrypt(s: &Shared, packet: &[u8], outbox: &mut Outbox) {
    let Some(dst) = Tunn::dst_address(packet) else {
        dropped("malformed_inner");
        return;
    };
    let table = s.table.load();
    let Some(peer) = table.routes.lookup(dst) else {
        dropped("no_route");
        return;
    };
    let Some(endpoint) = *peer.endpoint.read() else {
        dropped("no_endpoint");
        return;
    };
    let mut tunn = peer.tunn.lock();
    let out = outbox.next_buf();
    let base = out.as_ptr() as usize;
    let span = match tunn.encapsulate(packet, out) {
        TunnResult::WriteToNetwork(b) => Some(((b.as_ptr() as usize).wrapping_sub(base), b.len())),
        TunnResult::Err(e) => {
            debug!(error = ?e, "encapsulate failed");
            dropped("encapsulate");
            None
        }
        _ => None,
    };
    drop(tunn);
    if let Some((start, len)) = span {
        outbox.commit(start, len, endpoint);
    }
}

/// Datagrams from peers on queue `i`'s socket, a batch per system call.
async fn udp_task(s: Arc<Shared>, i: usize) {
    let Some(q) = s.queues.get(i) else { return };
    let mut inbox = Inbox::new(BUF);
    let mut out = vec![0u8; BUF];
    loop {
        // A permit taken here is one for a socket loaded below: at worst a
        // spurious reload.
        let rebound = q.rebound.notified();
        tokio::pin!(rebound);
        let sock = q.udp.load_full();
        loop {
            let mut ready = tokio::select! {
                r = sock.readable() => match r {
                    Ok(r) => r,
                    Err(e) => {
                        warn!(error = %e, "udp poll failed");
                        tokio::time::sleep(POLL).await;
                        continue;
                    }
                },
                () = &mut rebound => break,
            };
            let n = match ready.try_io(|sock| inbox.recv(sock.get_ref())) {
                Ok(Ok(n)) => n,
                Ok(Err(e)) => {
                    debug!(error = %e, "udp receive failed");
                    continue;
                }
                Err(_) => continue,
            };
            drop(ready);
            for i in 0..n {
                if let Some((datagram, from)) = inbox.get(i) {
                    receive(&s, q, datagram, unmapped(from), &mut out);
                }
            }
            if n == crate::batch::BATCH {
                tokio::task::yield_now().await;
            }
        }
    }
}

/// Handles one datagram from the underlay that came in on `q`: handshake,
/// cookie or data (written to `q`'s TUN queue).
fn receive(s: &Shared, q: &Queue, datagram: &[u8], from: SocketAddr, out: &mut [u8]) {
    let table = s.table.load();
    let Some(id) = table.identity.as_ref() else {
        dropped("no_private_key");
        return;
    };
    // MACs and the handshake rate limit before any expensive work
    let packet = match id.limiter.verify_packet(Some(from.ip()), datagram, out) {
        Ok(p) => p,
        Err(TunnResult::WriteToNetwork(cookie)) => {
            send(q, from, cookie);
            return;
        }
        Err(_) => {
            dropped("invalid_packet");
            return;
        }
    };
    let peer = match &packet {
        Packet::HandshakeInit(init) => parse_handshake_anon(&id.secret, &id.public, init)
            .ok()
            .and_then(|h| table.by_key.get(&Key(h.peer_static_public))),
        Packet::HandshakeResponse(r) => table.by_index.get(&(r.receiver_idx >> 8)),
        Packet::PacketCookieReply(c) => table.by_index.get(&(c.receiver_idx >> 8)),
        Packet::PacketData(d) => table.by_index.get(&(d.receiver_idx >> 8)),
    };
    let Some(peer) = peer else {
        dropped("unknown_peer");
        return;
    };
    let mut tunn = peer.tunn.lock();
    match tunn.decapsulate(Some(from.ip()), datagram, out) {
        TunnResult::Done => {}
        TunnResult::Err(e) => {
            debug!(error = ?e, peer = ?peer.key, "decapsulate failed");
            dropped("decapsulate");
            return;
        }
        TunnResult::WriteToNetwork(b) => {
            send(q, from, b);
            // flush what waited for the handshake
            let mut more = vec![0u8; BUF];
            while let TunnResult::WriteToNetwork(b) = tunn.decapsulate(None, &[], &mut more) {
                send(q, from, b);
            }
        }
        TunnResult::WriteToTunnelV6(b, src) => {
            if peer.allows(IpAddr::V6(src)) {
                let _ = q.tun.get_ref().send(b);
            } else {
                dropped("source_not_allowed");
            }
        }
        TunnResult::WriteToTunnelV4(b, src) => {
            if peer.allows(IpAddr::V4(src)) {
                let _ = q.tun.get_ref().send(b);
            } else {
                dropped("source_not_allowed");
            }
        }
    }
    drop(tunn);
    // authenticated: the peer is at `from` now (roaming)
    let mut ep = peer.endpoint.write();
    if *ep != Some(from) {
        *ep = Some(from);
    }
}

fn timer_loop(s: &Shared) {
    let mut out = vec![0u8; BUF];
    let mut last_reset = Instant::now();
    while !s.stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(250));
        let table = s.table.load();
        if last_reset.elapsed() >= Duration::from_secs(1) {
            if let Some(id) = &table.identity {
                id.limiter.reset_count();
            }
            last_reset = Instant::now();
        }
        for peer in &table.peers {
            let endpoint = *peer.endpoint.read();
            let mut tunn = peer.tunn.lock();
            if let TunnResult::WriteToNetwork(b) = tunn.update_timers(&mut out)
                && let Some(ep) = endpoint
                && let Some(q) = s.queues.first()
            {
                send(q, ep, b);
            }
        }
    }
}

fn uapi_loop(s: &Shared, listener: UnixListener) {
    use std::io::{BufRead as _, BufReader, Write as _};
    while !s.stop.load(Ordering::Relaxed) {
        match readable(&listener, POLL) {
            Ok(true) => {}
            _ => continue,
        }
        let Ok((conn, _)) = listener.accept() else {
            continue;
        };
        let _ = conn.set_nonblocking(false);
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        let Ok(mut w) = conn.try_clone() else {
            continue;
        };
        let mut lines = BufReader::new(conn).lines();
        // several requests may share a connection
        while let Some(Ok(first)) = lines.next() {
            let answer = match first.as_str() {
                "get=1" => {
                    // the request ends with a blank line
                    for l in lines.by_ref() {
                        if l.map(|l| l.is_empty()).unwrap_or(true) {
                            break;
                        }
                    }
                    info(s).encode()
                }
                "set=1" => {
                    let mut body = Vec::new();
                    for l in lines.by_ref() {
                        match l {
                            Ok(l) if l.is_empty() => break,
                            Ok(l) => body.push(l),
                            Err(_) => break,
                        }
                    }
                    let r = DeviceUpdate::parse(body.iter().map(String::as_str))
                        .and_then(|u| apply(s, &u));
                    match r {
                        Ok(()) => "errno=0\n\n".to_owned(),
                        Err(e) => {
                            warn!(device = %s.name, error = %e, "uapi set refused");
                            format!("errno={}\n\n", e.errno)
                        }
                    }
                }
                "" => continue,
                _ => "errno=22\n\n".to_owned(),
            };
            if w.write_all(answer.as_bytes()).is_err() {
                break;
            }
        }
    }
}

fn new_tunn(id: &Identity, key: Key, preshared: Option<Key>, keepalive: u16, index: u32) -> Tunn {
    Tunn::new(
        id.secret.clone(),
        PublicKey::from(key.0),
        preshared.map(|k| k.0),
        (keepalive > 0).then_some(keepalive),
        index,
        Some(id.limiter.clone()),
    )
}

fn identity(private: Key) -> Arc<Identity> {
    let secret = StaticSecret::from(private.0);
    let public = PublicKey::from(&secret);
    let limiter = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
    Arc::new(Identity {
        private,
        secret,
        public,
        limiter,
    })
}

fn apply(s: &Shared, u: &DeviceUpdate) -> Result<(), UapiError> {
    let _w = s.writer.lock();
    let old = s.table.load_full();
    let mut id = old.identity.clone();
    if let Some(pk) = u.private_key {
        id = pk.map(identity);
    }
    if let Some(port) = u.listen_port
        && u32::from(port) != s.listen_port.load(Ordering::Relaxed)
    {
        let runtimes: Vec<Handle> = s.queues.iter().map(|q| q.runtime.clone()).collect();
        let socks = bind(port, &runtimes).map_err(|e| UapiError {
            errno: e.raw_os_error().unwrap_or(libc::EADDRINUSE),
            reason: format!("listen_port {port}: {e}"),
        })?;
        let bound = socks
            .first()
            .and_then(|s| s.get_ref().local_addr().ok())
            .map_or(port, |a| a.port());
        let mark = s.fwmark.load(Ordering::Relaxed);
        for (q, sock) in s.queues.iter().zip(socks) {
            if mark != 0 {
                let _ = socket2::SockRef::from(sock.get_ref()).set_mark(mark);
            }
            q.udp.store(Arc::new(sock));
            q.rebound.notify_one();
        }
        s.listen_port.store(u32::from(bound), Ordering::Relaxed);
    }
    if let Some(m) = u.fwmark {
        s.fwmark.store(m, Ordering::Relaxed);
        for q in &s.queues {
            let sock = q.udp.load();
            let _ = socket2::SockRef::from(sock.get_ref()).set_mark(m);
        }
    }
    let key_changed = id.as_ref().map(|i| i.private) != old.identity.as_ref().map(|i| i.private);
    let mut peers: Vec<Arc<Peer>> = if u.replace_peers {
        Vec::new()
    } else {
        old.peers.clone()
    };
    for pu in &u.peers {
        let pos = peers.iter().position(|p| p.key == pu.public_key);
        if pu.remove {
            if let Some(i) = pos {
                peers.remove(i);
            }
            continue;
        }
        if pos.is_none() && pu.update_only {
            continue;
        }
        let Some(ident) = id.as_ref() else {
            return Err(UapiError {
                errno: libc::EINVAL,
                reason: "peers need the device's private key first".into(),
            });
        };
        let existing = pos.map(|i| peers[i].clone());
        let keepalive = pu
            .persistent_keepalive
            .or(existing.as_ref().map(|p| p.keepalive))
            .unwrap_or(0);
        let preshared = match pu.preshared_key {
            Some(k) => k,
            None => existing.as_ref().and_then(|p| p.preshared),
        };
        let mut allowed = if pu.replace_allowed_ips {
            Vec::new()
        } else {
            existing
                .as_ref()
                .map(|p| p.allowed.read().clone())
                .unwrap_or_default()
        };
        for a in &pu.allowed_ips {
            if !allowed.contains(a) {
                allowed.push(*a);
            }
        }
        let endpoint = pu
            .endpoint
            .or(existing.as_ref().and_then(|p| *p.endpoint.read()));
        let reuse = existing
            .filter(|p| !key_changed && p.keepalive == keepalive && p.preshared == preshared);
        let peer = match reuse {
            Some(p) => {
                *p.allowed.write() = allowed;
                *p.endpoint.write() = endpoint;
                p
            }
            None => {
                let index = s.next_index.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff;
                Arc::new(Peer {
                    key: pu.public_key,
                    index,
                    tunn: Mutex::new(new_tunn(ident, pu.public_key, preshared, keepalive, index)),
                    endpoint: RwLock::new(endpoint),
                    allowed: RwLock::new(allowed),
                    keepalive,
                    preshared,
                })
            }
        };
        match pos {
            Some(i) => peers[i] = peer,
            None => peers.push(peer),
        }
    }
    if key_changed {
        // every session was made with the old key
        match id.as_ref() {
            None => peers.clear(),
            Some(ident) => {
                for p in &peers {
                    p.tunn.lock().set_static_private(
                        ident.secret.clone(),
                        ident.public,
                        Some(ident.limiter.clone()),
                    );
                }
            }
        }
    }
    let by_key = peers.iter().map(|p| (p.key, p.clone())).collect();
    let by_index = peers.iter().map(|p| (p.index, p.clone())).collect();
    let routes = Routes::build(&peers);
    s.table.store(Arc::new(Table {
        identity: id,
        peers,
        by_key,
        by_index,
        routes,
    }));
    Ok(())
}

fn info(s: &Shared) -> DeviceInfo {
    let t = s.table.load();
    let now = SystemTime::now();
    DeviceInfo {
        private_key: t.identity.as_ref().map(|i| i.private),
        listen_port: s.listen_port.load(Ordering::Relaxed) as u16,
        fwmark: s.fwmark.load(Ordering::Relaxed),
        peers: t
            .peers
            .iter()
            .map(|p| {
                let (since, tx, rx, _, _) = p.tunn.lock().stats();
                PeerInfo {
                    public_key: p.key,
                    preshared_key: p.preshared,
                    endpoint: *p.endpoint.read(),
                    last_handshake: since.and_then(|d| now.checked_sub(d)),
                    rx_bytes: rx as u64,
                    tx_bytes: tx as u64,
                    persistent_keepalive: p.keepalive,
                    allowed_ips: p.allowed.read().clone(),
                }
            })
            .collect(),
    }
}
