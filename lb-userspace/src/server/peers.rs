//! What other LB nodes and backends reach over TCP: the peer port (directory
//! replication and availability, framed and signed with the cluster key) and the
//! registry port (registration and load reports only).

use axum::{
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::post,
    Router,
};

use super::{
    bad,
    directory::{dir_heartbeat, dir_register, report_load},
    internal, unknown, ApiError, AppState,
};
use crate::shell::{availd::AvailHandle, dird::DirHandle};

/// Other LB nodes' directory messages (framed and signed with the cluster key).
pub fn dsd_router(directory: DirHandle) -> Router {
    async fn dsd(
        State(d): State<DirHandle>,
        headers: axum::http::HeaderMap,
        body: axum::body::Bytes,
    ) -> Result<&'static str, ApiError> {
        let from = headers
            .get("x-lb-node")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad("missing x-lb-node"))?;
        d.accept(from, &body).map_err(|why| {
            ApiError(StatusCode::UNAUTHORIZED, format!("refused: {}", why.name()))
        })?;
        Ok("ok")
    }
    Router::new()
        .route("/v1/dsd", post(dsd))
        .layer(axum::extract::DefaultBodyLimit::max(
            crate::shell::dird::MAX_DSD_MESSAGE,
        ))
        .with_state(directory)
}

/// Other LB nodes' availability messages (framed and signed with the cluster key).
pub fn avail_router(availability: AvailHandle) -> Router {
    async fn avail(
        State(a): State<AvailHandle>,
        headers: axum::http::HeaderMap,
        body: axum::body::Bytes,
    ) -> Result<Response, ApiError> {
        let from = headers
            .get("x-lb-from")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let msg = a.open(&body).map_err(|why| {
            ApiError(StatusCode::UNAUTHORIZED, format!("refused: {}", why.name()))
        })?;
        match a.receive(from, msg).await.map_err(internal)? {
            Some(records) => Ok(a.frame_answer(&records).into_response()),
            None => Ok("ok".into_response()),
        }
    }
    Router::new()
        .route("/v1/avail", post(avail))
        .layer(axum::extract::DefaultBodyLimit::max(
            crate::shell::availd::MAX_MESSAGE,
        ))
        .with_state(availability)
}

/// What backends may call over TCP (`node.registry_listen`): registering and renewing.
pub fn registry_router(state: AppState) -> Router {
    Router::new()
        .route("/v1/dir/register", post(dir_register))
        .route("/v1/dir/heartbeat", post(dir_heartbeat))
        .route("/v1/backends/report", post(report_load))
        .fallback(unknown)
        .with_state(state)
}
