//! The admin API: list, get, put and delete catalog records over HTTP/JSON,
//! behind a bearer token. Writes are validated against the whole catalog,
//! stored durably in SQLite, then published; a rejected write changes nothing and
//! answers with the same field paths as a rejected file.
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/v1/catalog` | `{version, document}`: every record of every source |
//! | GET | `/v1/{kind}` | `{version, items}` |
//! | GET | `/v1/{kind}/{key}` | `{version, source, record}` |
//! | PUT | `/v1/{kind}/{key}` | body: the record; `{version, changed, record}` as stored (machines get their address) |
//! | DELETE | `/v1/{kind}/{key}` | `{version}` |
//!
//! `kind` is one of `regions hosts networks apps machines certificates
//! k8s_services`; a Kubernetes Service's key is `namespace/name`. Errors are
//! `{"error": code, "message": text, "problems": [{path, message}]}` with 400
//! (bad request), 401 (token), 404 (no such record), 409 (owned by another
//! source), 422 (invalid), 500 (storage).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::error::{Invalid, Problem, parse_json};
use crate::index::Source;
use crate::model::*;
use crate::record::{Kind, Record};
use crate::sources::sqlite::{Persist, PersistError};
use crate::store::{Store, WriteError};

/// What the API serves from.
#[derive(Clone)]
pub struct Api {
    /// The live catalog.
    pub store: Arc<Store>,
    /// Where API writes are stored; without it writes live only in memory.
    pub persist: Option<Arc<Persist>>,
    /// The bearer token every `/v1` request must carry.
    pub token: Arc<str>,
}

impl Api {
    /// Creates or replaces a record of the API's layer: validated with the
    /// whole catalog, stored, published. Blocking (SQLite): call it from a
    /// blocking thread. A record another source owns is refused.
    pub fn put_record<T: Record>(&self, rec: T) -> Result<crate::store::Written, ApiError> {
        let key = rec.key();
        owned_elsewhere::<T>(self, &key)?;
        let persist = self.persist.clone();
        let k = key.clone();
        self.store
            .write(
                Source::Api,
                |doc| {
                    let list = T::list_mut(doc);
                    match list.iter_mut().find(|r| r.key() == key) {
                        Some(slot) => *slot = rec,
                        None => list.push(rec),
                    }
                    Ok(())
                },
                |cat, _| {
                    // Store the record as resolved (a machine with its address),
                    // so a restart brings back exactly what was answered.
                    match (persist, T::map(cat).get(&k)) {
                        (Some(p), Some(r)) => p.put(&**r).map_err(ApiError::from),
                        _ => Ok(()),
                    }
                },
            )
            .map_err(write_error)
    }

    /// Deletes a record of the API's layer (404 when it has none).
    pub fn delete_record<T: Record>(
        &self,
        key: &T::Key,
    ) -> Result<crate::store::Written, ApiError> {
        owned_elsewhere::<T>(self, key)?;
        let persist = self.persist.clone();
        self.store
            .write(
                Source::Api,
                |doc| {
                    let list = T::list_mut(doc);
                    let before = list.len();
                    list.retain(|r| r.key() != *key);
                    if list.len() == before {
                        Err(not_found::<T>(key))
                    } else {
                        Ok(())
                    }
                },
                |_, _| match &persist {
                    Some(p) => p.delete::<T>(key).map(|_| ()).map_err(ApiError::from),
                    None => Ok(()),
                },
            )
            .map_err(write_error)
    }
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    problems: Vec<Problem>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            problems: Vec::new(),
        }
    }

    fn invalid(i: Invalid) -> Self {
        ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "invalid",
            message: i.to_string(),
            problems: i.problems,
        }
    }
}

impl From<PersistError> for ApiError {
    fn from(e: PersistError) -> Self {
        tracing::error!(error = %e, "admin api: storage failed");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "storage", e.to_string())
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.status, self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": self.code, "message": self.message, "problems": self.problems});
        (self.status, Json(body)).into_response()
    }
}

/// The `/v1` routes, with the bearer-token check and a body size limit.
pub fn router(api: Api, body_limit: usize) -> Router {
    Router::new()
        .route("/v1/catalog", get(catalog))
        .route("/v1/{kind}", get(list))
        .route("/v1/{kind}/{*key}", get(get_one).put(put).delete(delete))
        .layer(axum::extract::DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(api.clone(), auth))
        .with_state(api)
}

/// Compares in time independent of where the strings differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The bearer-token check of every `/v1` route (a middleware), for routes
/// the daemon adds beside the catalog's.
pub async fn auth(State(api): State<Api>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if same_secret(t.trim().as_bytes(), api.token.as_bytes()) => next.run(req).await,
        _ => {
            metrics::counter!("skein_admin_unauthorized_total").increment(1);
            let mut r = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid bearer token is required",
            )
            .into_response();
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            r
        }
    }
}

fn kind_of(s: &str) -> Result<Kind, ApiError> {
    Kind::parse(s).ok_or_else(|| {
        let all: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_kind",
            format!("no kind {s:?}; kinds are {}", all.join(", ")),
        )
    })
}

/// Calls a generic function with the record type of a runtime kind.
macro_rules! by_kind {
    ($kind:expr, $f:ident ( $($arg:expr),* )) => {
        match $kind {
            Kind::Regions => $f::<Region>($($arg),*).await,
            Kind::Hosts => $f::<Host>($($arg),*).await,
            Kind::Networks => $f::<Network>($($arg),*).await,
            Kind::Apps => $f::<App>($($arg),*).await,
            Kind::Machines => $f::<Machine>($($arg),*).await,
            Kind::Certificates => $f::<Certificate>($($arg),*).await,
            Kind::K8sServices => $f::<K8sService>($($arg),*).await,
        }
    };
}

async fn catalog(State(api): State<Api>) -> Json<Value> {
    let snap = api.store.snapshot();
    Json(json!({"version": snap.version, "document": snap.catalog.to_document()}))
}

async fn list(State(api): State<Api>, Path(kind): Path<String>) -> Result<Json<Value>, ApiError> {
    async fn go<T: Record>(api: &Api) -> Result<Json<Value>, ApiError> {
        let snap = api.store.snapshot();
        let items: Vec<&T> = T::map(&snap.catalog).values().map(|v| &**v).collect();
        Ok(Json(json!({"version": snap.version, "items": items})))
    }
    by_kind!(kind_of(&kind)?, go(&api))
}

fn key_of<T: Record>(key: &str) -> Result<T::Key, ApiError> {
    T::parse_key(key).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_key",
            format!("{key:?} is not a key of {}", T::KIND),
        )
    })
}

fn not_found<T: Record>(key: &T::Key) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no {} {:?}", T::KIND, key.to_string()),
    )
}

async fn get_one(
    State(api): State<Api>,
    Path((kind, key)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    async fn go<T: Record>(api: &Api, key: &str) -> Result<Json<Value>, ApiError> {
        let key = key_of::<T>(key)?;
        let snap = api.store.snapshot();
        let rec = T::map(&snap.catalog)
            .get(&key)
            .ok_or_else(|| not_found::<T>(&key))?;
        let source = snap.catalog.owners.get(&(T::KIND, key.to_string()));
        Ok(Json(
            json!({"version": snap.version, "source": source, "record": &**rec}),
        ))
    }
    by_kind!(kind_of(&kind)?, go(&api, &key))
}

/// Refuses to touch a record another source owns.
fn owned_elsewhere<T: Record>(api: &Api, key: &T::Key) -> Result<(), ApiError> {
    let snap = api.store.snapshot();
    match snap.catalog.owners.get(&(T::KIND, key.to_string())) {
        Some(s) if *s != Source::Api => Err(ApiError::new(
            StatusCode::CONFLICT,
            "owned_elsewhere",
            format!(
                "{} {:?} is defined by {s}; change it there",
                T::KIND,
                key.to_string()
            ),
        )),
        _ => Ok(()),
    }
}

fn write_error(e: WriteError<ApiError>) -> ApiError {
    match e {
        WriteError::Invalid(i) => ApiError::invalid(i),
        WriteError::Refused(e) => e,
    }
}

async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> Result<R, ApiError> + Send + 'static,
) -> Result<R, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
}

async fn put(
    State(api): State<Api>,
    Path((kind, key)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    async fn go<T: Record>(api: Api, key: String, body: Bytes) -> Result<Json<Value>, ApiError> {
        let key = key_of::<T>(&key)?;
        let rec: T = parse_json(&body).map_err(ApiError::invalid)?;
        if rec.key() != key {
            return Err(ApiError::invalid(Invalid::one(
                "",
                format!(
                    "the record's key {:?} is not the path's {:?}",
                    rec.key().to_string(),
                    key.to_string()
                ),
            )));
        }
        blocking(move || {
            let w = api.put_record(rec)?;
            let stored = T::map(&w.snapshot.catalog).get(&key).map(|r| (**r).clone());
            Ok(Json(
                json!({"version": w.snapshot.version, "changed": w.changed, "record": stored}),
            ))
        })
        .await
    }
    by_kind!(kind_of(&kind)?, go(api, key, body))
}

async fn delete(
    State(api): State<Api>,
    Path((kind, key)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    async fn go<T: Record>(api: Api, key: String) -> Result<Json<Value>, ApiError> {
        let key = key_of::<T>(&key)?;
        blocking(move || {
            let w = api.delete_record::<T>(&key)?;
            Ok(Json(json!({"version": w.snapshot.version})))
        })
        .await
    }
    by_kind!(kind_of(&kind)?, go(api, key))
}
