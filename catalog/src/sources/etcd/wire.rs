//! The part of the etcd v3 gRPC API that skein speaks: KV (range, put, delete,
//! txn, compact), Watch and Lease.
//!
//! Messages are declared here with `prost` derives, field numbers as in etcd's
//! `rpc.proto`/`kv.proto` (API v3.4+), so building skein needs no `protoc`: a
//! plain `cargo build` on a fresh machine works. Only the fields skein uses are
//! declared; protobuf skips the others on decode.
//!
//! [`Client`] holds the cluster's endpoints and hands out a [`Conn`] to the
//! first member that answers, starting after the one that failed last, so a
//! dead member costs one connect timeout and then nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};
use tonic_prost::ProstCodec;

/// gRPC messages this large are accepted (a page of records, a large txn).
const MAX_MESSAGE: usize = 64 << 20;

/// Common header of every response.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResponseHeader {
    /// The cluster.
    #[prost(uint64, tag = "1")]
    pub cluster_id: u64,
    /// The member that answered.
    #[prost(uint64, tag = "2")]
    pub member_id: u64,
    /// The store's revision when the response was made.
    #[prost(int64, tag = "3")]
    pub revision: i64,
    /// Raft term.
    #[prost(uint64, tag = "4")]
    pub raft_term: u64,
}

/// A key and its value.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyValue {
    /// Key.
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    /// Revision of its creation.
    #[prost(int64, tag = "2")]
    pub create_revision: i64,
    /// Revision of its last change.
    #[prost(int64, tag = "3")]
    pub mod_revision: i64,
    /// Number of changes since creation.
    #[prost(int64, tag = "4")]
    pub version: i64,
    /// Value.
    #[prost(bytes = "vec", tag = "5")]
    pub value: Vec<u8>,
    /// The lease it is attached to (0: none).
    #[prost(int64, tag = "6")]
    pub lease: i64,
}

/// `KV.Range`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RangeRequest {
    /// First key.
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    /// End of the range, exclusive (see [`prefix_end`]).
    #[prost(bytes = "vec", tag = "2")]
    pub range_end: Vec<u8>,
    /// At most this many keys (0: all).
    #[prost(int64, tag = "3")]
    pub limit: i64,
    /// Read at this revision (0: newest).
    #[prost(int64, tag = "4")]
    pub revision: i64,
    /// Sort order (0 none, 1 ascend, 2 descend).
    #[prost(int32, tag = "5")]
    pub sort_order: i32,
    /// Sort target (0 key).
    #[prost(int32, tag = "6")]
    pub sort_target: i32,
    /// Serve from the member's copy without a quorum read.
    #[prost(bool, tag = "7")]
    pub serializable: bool,
    /// Keys only.
    #[prost(bool, tag = "8")]
    pub keys_only: bool,
    /// Count only.
    #[prost(bool, tag = "9")]
    pub count_only: bool,
}

/// `KV.Range` answer.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RangeResponse {
    /// Header.
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    /// The keys.
    #[prost(message, repeated, tag = "2")]
    pub kvs: Vec<KeyValue>,
    /// More keys than `limit` remain.
    #[prost(bool, tag = "3")]
    pub more: bool,
    /// Keys in the range.
    #[prost(int64, tag = "4")]
    pub count: i64,
}

/// `KV.Put`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PutRequest {
    /// Key.
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    /// Value.
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
    /// Lease to attach (0: none).
    #[prost(int64, tag = "3")]
    pub lease: i64,
}

/// `KV.Put` answer.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PutResponse {
    /// Header.
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
}

/// `KV.DeleteRange`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeleteRangeRequest {
    /// Key.
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    /// End of the range (empty: the key alone).
    #[prost(bytes = "vec", tag = "2")]
    pub range_end: Vec<u8>,
}

/// `KV.DeleteRange` answer.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeleteRangeResponse {
    /// Header.
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    /// Keys deleted.
    #[prost(int64, tag = "2")]
    pub deleted: i64,
}

/// One condition of a transaction.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Compare {
    /// [`Compare::EQUAL`] and friends.
    #[prost(int32, tag = "1")]
    pub result: i32,
    /// [`Compare::CREATE`] and friends.
    #[prost(int32, tag = "2")]
    pub target: i32,
    /// Key.
    #[prost(bytes = "vec", tag = "3")]
    pub key: Vec<u8>,
    /// What to compare with.
    #[prost(oneof = "CompareWith", tags = "4, 5, 6, 7, 8")]
    pub target_union: Option<CompareWith>,
}

impl Compare {
    /// `result`: equal.
    pub const EQUAL: i32 = 0;
    /// `target`: create revision.
    pub const CREATE: i32 = 1;
    /// `target`: mod revision.
    pub const MOD: i32 = 2;

    /// True when `key` does not exist (its create revision is 0).
    pub fn absent(key: impl Into<Vec<u8>>) -> Compare {
        Compare {
            result: Compare::EQUAL,
            target: Compare::CREATE,
            key: key.into(),
            target_union: Some(CompareWith::CreateRevision(0)),
        }
    }

    /// True when `key` was last changed at `revision`.
    pub fn unchanged_since(key: impl Into<Vec<u8>>, revision: i64) -> Compare {
        Compare {
            result: Compare::EQUAL,
            target: Compare::MOD,
            key: key.into(),
            target_union: Some(CompareWith::ModRevision(revision)),
        }
    }
}

/// The value a [`Compare`] compares with.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum CompareWith {
    /// Version.
    #[prost(int64, tag = "4")]
    Version(i64),
    /// Create revision.
    #[prost(int64, tag = "5")]
    CreateRevision(i64),
    /// Mod revision.
    #[prost(int64, tag = "6")]
    ModRevision(i64),
    /// Value.
    #[prost(bytes = "vec", tag = "7")]
    Value(Vec<u8>),
    /// Lease.
    #[prost(int64, tag = "8")]
    Lease(i64),
}

/// One operation of a transaction.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RequestOp {
    /// The operation.
    #[prost(oneof = "Op", tags = "1, 2, 3")]
    pub request: Option<Op>,
}

/// What a [`RequestOp`] does.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Op {
    /// Read.
    #[prost(message, tag = "1")]
    Range(RangeRequest),
    /// Write.
    #[prost(message, tag = "2")]
    Put(PutRequest),
    /// Delete.
    #[prost(message, tag = "3")]
    Delete(DeleteRangeRequest),
}

impl From<PutRequest> for RequestOp {
    fn from(p: PutRequest) -> Self {
        RequestOp {
            request: Some(Op::Put(p)),
        }
    }
}

impl From<DeleteRangeRequest> for RequestOp {
    fn from(d: DeleteRangeRequest) -> Self {
        RequestOp {
            request: Some(Op::Delete(d)),
        }
    }
}

/// `KV.Txn`: if every compare holds, `success`, else `failure`, atomically.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TxnRequest {
    /// Conditions.
    #[prost(message, repeated, tag = "1")]
    pub compare: Vec<Compare>,
    /// Done when all hold.
    #[prost(message, repeated, tag = "2")]
    pub success: Vec<RequestOp>,
    /// Done otherwise.
    #[prost(message, repeated, tag = "3")]
    pub failure: Vec<RequestOp>,
}

/// `KV.Txn` answer (the per-operation answers are not decoded).
#[derive(Clone, PartialEq, prost::Message)]
pub struct TxnResponse {
    /// Header.
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    /// Whether the compares held.
    #[prost(bool, tag = "2")]
    pub succeeded: bool,
}

/// `KV.Compact`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CompactionRequest {
    /// Drop history before this revision.
    #[prost(int64, tag = "1")]
    pub revision: i64,
    /// Wait until the compaction is applied.
    #[prost(bool, tag = "2")]
    pub physical: bool,
}

/// `KV.Compact` answer.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CompactionResponse {
    /// Header.
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
}

/// `Watch.Watch` client message.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WatchRequest {
    /// Create, cancel or ask for progress.
    #[prost(oneof = "WatchOp", tags = "1, 2, 3")]
    pub request_union: Option<WatchOp>,
}

/// What a [`WatchRequest`] asks.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum WatchOp {
    /// Start a watch.
    #[prost(message, tag = "1")]
    Create(WatchCreateRequest),
    /// Stop one.
    #[prost(message, tag = "2")]
    Cancel(WatchCancelRequest),
    /// Ask for a progress notification.
    #[prost(message, tag = "3")]
    Progress(WatchProgressRequest),
}

/// Start watching a range.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WatchCreateRequest {
    /// First key.
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    /// End of the range.
    #[prost(bytes = "vec", tag = "2")]
    pub range_end: Vec<u8>,
    /// First revision to send (0: from now).
    #[prost(int64, tag = "3")]
    pub start_revision: i64,
    /// Send empty responses now and then with the revision reached.
    #[prost(bool, tag = "4")]
    pub progress_notify: bool,
}

/// Stop a watch.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WatchCancelRequest {
    /// Which.
    #[prost(int64, tag = "1")]
    pub watch_id: i64,
}

/// Ask for the revision reached.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WatchProgressRequest {}

/// `Watch.Watch` server message.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WatchResponse {
    /// Header; its revision is how far the watch has come.
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    /// Which watch.
    #[prost(int64, tag = "2")]
    pub watch_id: i64,
    /// Answer to a create.
    #[prost(bool, tag = "3")]
    pub created: bool,
    /// The watch ended.
    #[prost(bool, tag = "4")]
    pub canceled: bool,
    /// Non-zero: the start revision was compacted away; history begins here.
    #[prost(int64, tag = "5")]
    pub compact_revision: i64,
    /// Why it was canceled.
    #[prost(string, tag = "6")]
    pub cancel_reason: String,
    /// The changes.
    #[prost(message, repeated, tag = "11")]
    pub events: Vec<Event>,
}

/// One change.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    /// [`Event::PUT`] or [`Event::DELETE`].
    #[prost(int32, tag = "1")]
    pub r#type: i32,
    /// The key after the change (for a delete: the key and the revision).
    #[prost(message, optional, tag = "2")]
    pub kv: Option<KeyValue>,
}

impl Event {
    /// A put.
    pub const PUT: i32 = 0;
    /// A delete.
    pub const DELETE: i32 = 1;
}

/// `Lease.LeaseGrant`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseGrantRequest {
    /// Seconds.
    #[prost(int64, tag = "1")]
    pub ttl: i64,
    /// Wanted id (0: chosen by etcd).
    #[prost(int64, tag = "2")]
    pub id: i64,
}

/// `Lease.LeaseGrant` answer.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseGrantResponse {
    /// Header.
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    /// The lease.
    #[prost(int64, tag = "2")]
    pub id: i64,
    /// Granted seconds.
    #[prost(int64, tag = "3")]
    pub ttl: i64,
    /// Why not.
    #[prost(string, tag = "4")]
    pub error: String,
}

/// `Lease.LeaseRevoke`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseRevokeRequest {
    /// The lease.
    #[prost(int64, tag = "1")]
    pub id: i64,
}

/// `Lease.LeaseRevoke` answer.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseRevokeResponse {
    /// Header.
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
}

/// `Lease.LeaseKeepAlive` client message.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseKeepAliveRequest {
    /// The lease.
    #[prost(int64, tag = "1")]
    pub id: i64,
}

/// `Lease.LeaseKeepAlive` server message.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseKeepAliveResponse {
    /// Header.
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    /// The lease.
    #[prost(int64, tag = "2")]
    pub id: i64,
    /// Seconds left; 0 or less: the lease is gone.
    #[prost(int64, tag = "3")]
    pub ttl: i64,
}

/// The end of the range of keys that start with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): to the end of the key space.
    vec![0]
}

/// What went wrong talking to etcd.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No member could be reached.
    #[error("no etcd member answered ({0})")]
    Unreachable(String),
    /// A member answered with an error.
    #[error("etcd: {0}")]
    Status(#[from] tonic::Status),
    /// A call took longer than the request timeout.
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    /// The cluster answered something skein cannot use.
    #[error("etcd: {0}")]
    Protocol(String),
}

/// Endpoints and timeouts of one etcd cluster.
#[derive(Clone, Debug)]
pub struct Client {
    endpoints: Arc<[String]>,
    next: Arc<AtomicUsize>,
    connect_timeout: Duration,
    request_timeout: Duration,
}

impl Client {
    /// A client for these members (`http://host:port`).
    pub fn new(
        endpoints: Vec<String>,
        connect_timeout: Duration,
        request_timeout: Duration,
    ) -> Self {
        Client {
            endpoints: endpoints.into(),
            next: Arc::new(AtomicUsize::new(0)),
            connect_timeout,
            request_timeout,
        }
    }

    /// The members, as configured.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// A connection to the first member that answers, trying each once,
    /// starting with the one after the member that failed last.
    pub async fn connect(&self) -> Result<Conn, Error> {
        let n = self.endpoints.len();
        let start = self.next.load(Ordering::Relaxed);
        let mut why = Vec::new();
        for i in 0..n {
            let idx = (start + i) % n;
            let url = &self.endpoints[idx];
            match self.dial(url).await {
                Ok(ch) => {
                    return Ok(Conn {
                        channel: ch,
                        endpoint: url.clone(),
                        index: idx,
                        client: self.clone(),
                    });
                }
                Err(e) => why.push(format!("{url}: {e}")),
            }
        }
        Err(Error::Unreachable(why.join("; ")))
    }

    async fn dial(&self, url: &str) -> Result<Channel, String> {
        let ep = Endpoint::from_shared(url.to_string())
            .map_err(|e| e.to_string())?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            // Finds a member that died under an open watch within seconds.
            .http2_keep_alive_interval(Duration::from_secs(3))
            .keep_alive_timeout(Duration::from_secs(3))
            .keep_alive_while_idle(true);
        match tokio::time::timeout(self.connect_timeout, ep.connect()).await {
            Ok(Ok(ch)) => Ok(ch),
            Ok(Err(e)) => Err(source_chain(&e)),
            Err(_) => Err(format!("no connection within {:?}", self.connect_timeout)),
        }
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// One connection to one member.
#[derive(Clone)]
pub struct Conn {
    channel: Channel,
    endpoint: String,
    index: usize,
    client: Client,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

impl Conn {
    /// The member this is connected to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Marks this member as failed: the next [`Client::connect`] starts with
    /// the member after it.
    pub fn failed(&self) {
        let n = self.client.endpoints.len().max(1);
        let _ = self.client.next.compare_exchange(
            self.index,
            (self.index + 1) % n,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    fn grpc(&self) -> tonic::client::Grpc<Channel> {
        tonic::client::Grpc::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    async fn unary<Q, R>(&self, path: &'static str, req: Q) -> Result<R, Error>
    where
        Q: prost::Message + Send + Sync + 'static,
        R: prost::Message + Default + Send + Sync + 'static,
    {
        let timeout = self.client.request_timeout;
        let call = async {
            let mut g = self.grpc();
            g.ready()
                .await
                .map_err(|e| Error::Unreachable(format!("{}: {e}", self.endpoint)))?;
            let r = g
                .unary(
                    tonic::Request::new(req),
                    PathAndQuery::from_static(path),
                    ProstCodec::<Q, R>::default(),
                )
                .await?;
            Ok(r.into_inner())
        };
        match tokio::time::timeout(timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout(timeout)),
        }
    }

    /// `KV.Range`.
    pub async fn range(&self, req: RangeRequest) -> Result<RangeResponse, Error> {
        self.unary("/etcdserverpb.KV/Range", req).await
    }

    /// Every key under `prefix` at one revision, read in pages of `page` keys
    /// (a large catalog never needs one huge message). Returns the keys and the
    /// revision they were read at.
    pub async fn range_prefix(
        &self,
        prefix: &[u8],
        page: i64,
    ) -> Result<(Vec<KeyValue>, i64), Error> {
        let end = prefix_end(prefix);
        let mut out = Vec::new();
        let mut from = prefix.to_vec();
        let mut revision = 0;
        loop {
            let r = self
                .range(RangeRequest {
                    key: from.clone(),
                    range_end: end.clone(),
                    limit: page,
                    revision,
                    ..Default::default()
                })
                .await?;
            if revision == 0 {
                revision = r.header.as_ref().map(|h| h.revision).unwrap_or(0);
            }
            let more = r.more;
            if let Some(last) = r.kvs.last() {
                from = last.key.clone();
                from.push(0);
            }
            out.extend(r.kvs);
            if !more {
                return Ok((out, revision));
            }
        }
    }

    /// `KV.Put`; returns the revision of the write.
    pub async fn put(&self, key: &[u8], value: Vec<u8>, lease: i64) -> Result<i64, Error> {
        let r: PutResponse = self
            .unary(
                "/etcdserverpb.KV/Put",
                PutRequest {
                    key: key.to_vec(),
                    value,
                    lease,
                },
            )
            .await?;
        Ok(r.header.map(|h| h.revision).unwrap_or(0))
    }

    /// `KV.DeleteRange` of one key, or of every key under it when `prefix`.
    pub async fn delete(&self, key: &[u8], prefix: bool) -> Result<i64, Error> {
        let r: DeleteRangeResponse = self
            .unary(
                "/etcdserverpb.KV/DeleteRange",
                DeleteRangeRequest {
                    key: key.to_vec(),
                    range_end: if prefix { prefix_end(key) } else { Vec::new() },
                },
            )
            .await?;
        Ok(r.deleted)
    }

    /// `KV.Txn`.
    pub async fn txn(&self, req: TxnRequest) -> Result<TxnResponse, Error> {
        self.unary("/etcdserverpb.KV/Txn", req).await
    }

    /// `KV.Compact` up to `revision`, waiting until it is applied.
    pub async fn compact(&self, revision: i64) -> Result<(), Error> {
        let _: CompactionResponse = self
            .unary(
                "/etcdserverpb.KV/Compact",
                CompactionRequest {
                    revision,
                    physical: true,
                },
            )
            .await?;
        Ok(())
    }

    /// `Lease.LeaseGrant`: a lease of `ttl` seconds.
    pub async fn grant(&self, ttl: i64) -> Result<(i64, i64), Error> {
        let r: LeaseGrantResponse = self
            .unary(
                "/etcdserverpb.Lease/LeaseGrant",
                LeaseGrantRequest { ttl, id: 0 },
            )
            .await?;
        if !r.error.is_empty() {
            return Err(Error::Protocol(format!("lease not granted: {}", r.error)));
        }
        Ok((r.id, r.ttl))
    }

    /// `Lease.LeaseRevoke`: the lease and every key attached to it go.
    pub async fn revoke(&self, id: i64) -> Result<(), Error> {
        let _: LeaseRevokeResponse = self
            .unary("/etcdserverpb.Lease/LeaseRevoke", LeaseRevokeRequest { id })
            .await?;
        Ok(())
    }

    /// Opens a `Lease.LeaseKeepAlive` stream, renewing `lease` once: send
    /// more renewals on the sender, read the answers from the stream.
    pub async fn keepalive(
        &self,
        lease: i64,
    ) -> Result<
        (
            tokio::sync::mpsc::Sender<LeaseKeepAliveRequest>,
            tonic::Streaming<LeaseKeepAliveResponse>,
        ),
        Error,
    > {
        self.bidi(
            "/etcdserverpb.Lease/LeaseKeepAlive",
            LeaseKeepAliveRequest { id: lease },
        )
        .await
    }

    /// Opens a `Watch.Watch` stream with its first request.
    pub async fn watch(
        &self,
        first: WatchRequest,
    ) -> Result<
        (
            tokio::sync::mpsc::Sender<WatchRequest>,
            tonic::Streaming<WatchResponse>,
        ),
        Error,
    > {
        self.bidi("/etcdserverpb.Watch/Watch", first).await
    }

    /// A bidirectional stream. The first message is queued before the call:
    /// a gRPC server may hold its response headers until it has something to
    /// answer.
    async fn bidi<Q, R>(
        &self,
        path: &'static str,
        first: Q,
    ) -> Result<(tokio::sync::mpsc::Sender<Q>, tonic::Streaming<R>), Error>
    where
        Q: prost::Message + Send + Sync + 'static,
        R: prost::Message + Default + Send + Sync + 'static,
    {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tx.try_send(first)
            .map_err(|_| Error::Protocol("cannot queue the first message".into()))?;
        let timeout = self.client.request_timeout;
        let open = async {
            let mut g = self.grpc();
            g.ready()
                .await
                .map_err(|e| Error::Unreachable(format!("{}: {e}", self.endpoint)))?;
            let r = g
                .streaming(
                    tonic::Request::new(ReceiverStream::new(rx)),
                    PathAndQuery::from_static(path),
                    ProstCodec::<Q, R>::default(),
                )
                .await?;
            Ok::<_, Error>(r.into_inner())
        };
        match tokio::time::timeout(timeout, open).await {
            Ok(Ok(stream)) => Ok((tx, stream)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::Timeout(timeout)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn prefix_end_is_the_next_key_after_every_key_with_the_prefix() {
        assert_eq!(prefix_end(b"/skein/"), b"/skein0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }

    #[test]
    fn messages_use_etcds_field_numbers() {
        // A put of key "k", value "v", lease 7: tags 1, 2 (bytes) and 3 (varint).
        let bytes = PutRequest {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            lease: 7,
        }
        .encode_to_vec();
        assert_eq!(bytes, vec![0x0a, 1, b'k', 0x12, 1, b'v', 0x18, 7]);
        // A watch create is field 1 of WatchRequest; start_revision is field 3.
        let w = WatchRequest {
            request_union: Some(WatchOp::Create(WatchCreateRequest {
                key: b"a".to_vec(),
                range_end: Vec::new(),
                start_revision: 5,
                progress_notify: false,
            })),
        }
        .encode_to_vec();
        assert_eq!(w, vec![0x0a, 5, 0x0a, 1, b'a', 0x18, 5]);
        // Events are field 11 of WatchResponse (tag byte 0x5a).
        let r = WatchResponse {
            events: vec![Event {
                r#type: Event::DELETE,
                kv: None,
            }],
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(r, vec![0x5a, 2, 0x08, 1]);
        assert_eq!(
            WatchResponse::decode(&r[..]).map(|w| w.events.len()).ok(),
            Some(1)
        );
    }
}
