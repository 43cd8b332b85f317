//! The daemon's listeners: the management API (HTTP/JSON on a Unix socket) and the
//! Prometheus endpoint (HTTP on TCP). Handlers parse, call `Daemon`, and answer.

mod cluster;
mod directory;
mod page;
mod peers;
pub mod reload;
mod services;
mod spm;

use std::{path::Path, sync::Arc};

use anyhow::{Context, Result};
use axum::{
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use tokio::sync::mpsc;

pub use peers::{avail_router, dsd_router, registry_router, Rejects};

use crate::{
    api::{ErrorBody, Shutdown},
    shell::{
        availd::AvailHandle, clusterd::ClusterHandle, dird::DirHandle, handle::DaemonHandle,
        neighbor::NeighborTable,
    },
};
use cluster::*;
use directory::*;
use services::*;
use spm::*;

#[derive(Clone)]
pub struct AppState {
    pub daemon: DaemonHandle,
    /// `node.registry_key`: what registry requests must be signed with.
    pub registry_key: Option<Arc<Vec<u8>>>,
    /// Peer and registry requests refused, by port and reason.
    pub rejects: Arc<Rejects>,
    pub shutdown: mpsc::Sender<Shutdown>,
    pub neighbors: Arc<NeighborTable>,
    pub cluster: Option<ClusterHandle>,
    pub directory: DirHandle,
    pub availability: AvailHandle,
    /// The config file lbd was started with (what a reload re-reads).
    pub config_path: Option<std::path::PathBuf>,
}

pub struct ApiError(pub(crate) StatusCode, pub(crate) String);

/// The largest request body of the management API (a whole desired state with
/// many backends).
pub const MAX_API_BODY: usize = 32 << 20;

/// `Json` whose refusals are the API's JSON errors naming what is wrong (an unknown
/// field, a bad value), with axum's status (400, 413, 415), not its plain text.
pub struct ApiJson<T>(pub T);

impl<T, S> axum::extract::FromRequest<S> for ApiJson<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(r) => {
                let status = match r.status() {
                    StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
                    s => s,
                };
                Err(ApiError(status, r.body_text()))
            }
        }
    }
}

/// `Query` with the API's JSON errors.
pub struct ApiQuery<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|r| ApiError(StatusCode::BAD_REQUEST, r.body_text()))
    }
}

async fn method_not_allowed() -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        "this endpoint takes another method (GET for reads, POST for changes); see docs/API.md"
            .into(),
    )
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // A refused request is the operator's to know about later too (the answer
        // goes only to whoever asked); lookups of what does not exist are not.
        if self.0 != StatusCode::NOT_FOUND && (self.0.is_client_error() || self.0.is_server_error())
        {
            tracing::warn!(status = self.0.as_u16(), "request refused: {}", self.1);
        }
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

/// What a node in a cluster still waits for before it may take VIPs (empty: ready).
pub fn waiting_for(s: &AppState) -> Vec<String> {
    let mut why = Vec::new();
    if s.cluster.is_none() {
        return why;
    }
    if !s.directory.synced() {
        why.push(if s.directory.read_only() {
            "directory: no quorum, so no master to sync the replica from".to_string()
        } else {
            "directory: the replica has not yet been synced from the master \
             (is the peer port reachable?)"
                .to_string()
        });
    }
    if !s.availability.synced() {
        why.push(
            "availability: no peer has answered the sync yet (is the peer port reachable?)"
                .to_string(),
        );
    }
    why
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

fn conflict(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::CONFLICT, msg.into())
}

fn not_found(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, msg.into())
}

fn internal(e: anyhow::Error) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
}

type ApiResult<T> = Result<Json<T>, ApiError>;

async fn unknown() -> ApiError {
    not_found("no such endpoint; the API is described in docs/API.md")
}

pub fn api_router(state: AppState) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/services", get(services))
        .route("/v1/stats", get(stats))
        .route("/v1/desired", get(desired))
        .route("/v1/services/add", post(add_service))
        .route("/v1/services/remove", post(remove_service))
        .route("/v1/backends/add", post(add_backend))
        .route("/v1/backends/remove", post(remove_backend))
        .route("/v1/backends/drain", post(drain_backend))
        .route("/v1/backends/weight", post(set_weight))
        .route("/v1/services/bump-epoch", post(bump_epoch))
        .route("/v1/services/availability", post(set_availability))
        .route("/v1/backends/report", post(report_load))
        .route("/v1/availability", get(availability))
        .route("/v1/spm", get(spm))
        .route("/v1/spm/watch", get(spm_watch))
        .route("/v1/apply", post(apply))
        .route("/v1/shutdown", post(shutdown))
        .route("/v1/reload", post(reload::reload_handler))
        .route("/v1/cluster", get(cluster))
        .route("/v1/node/quiesce", post(quiesce))
        .route("/v1/events", get(events))
        .route("/v1/dir/search", get(dir_search))
        .route("/v1/dir/find", get(dir_find))
        .route("/v1/dir/add", post(dir_add))
        .route("/v1/dir/delete", post(dir_delete))
        .route("/v1/dir/heartbeat", post(dir_heartbeat))
        .route("/v1/dir/register", post(dir_register))
        .route("/v1/dir/subscribe", get(dir_subscribe))
        .fallback(unknown)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_API_BODY))
        .with_state(state)
}

async fn metrics(State(s): State<AppState>) -> Result<String, ApiError> {
    let stats = s.daemon.monitored_stats().await.map_err(internal)?;
    let mut status = s.daemon.now().status.clone();
    status.rejected = s.rejects.snapshot();
    let cluster = s.cluster.as_ref().map(|c| c.view());
    Ok(crate::metrics::render(&status, &stats, cluster.as_ref()))
}

pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/", get(page::page))
        .route("/page.json", get(page::data))
        .with_state(state)
}

/// Binds the API socket, replacing a stale one (a socket file nobody listens on).
pub fn bind_api(path: &Path) -> Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "another lbd already serves {}; stop it first (lbctl --socket {} shutdown)",
                path.display(),
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    tokio::net::UnixListener::bind(path)
        .with_context(|| format!("binding the API socket {}", path.display()))
}

#[cfg(test)]
mod tests;
