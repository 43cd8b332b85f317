//! What other LB nodes and backends reach over TCP: the peer port (directory
//! replication and availability, signed with the cluster key) and the registry port
//! (registration, renewal and load reports, signed with the registry key). A body is
//! read through its signed header: one that is not signed with the key, too long or
//! too old is refused after its first 32 bytes, before anything more is read, and
//! every refusal is counted by port and reason.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use axum::{
    body::Body,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
    Router,
};
use http_body_util::BodyExt;

use super::{bad, internal, unknown, ApiError, AppState};
use crate::{
    api,
    cluster::wire::{self, Reject},
    shell::{availd::AvailHandle, dird::DirHandle},
};

/// The largest registry request (a registration or a load report is a few hundred
/// bytes).
pub const MAX_REGISTRY_BODY: usize = 64 << 10;
/// How long a peer may take to send a body it announced.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Requests refused on the peer and registry ports, by port and reason.
#[derive(Default)]
pub struct Rejects {
    counts: Mutex<BTreeMap<(&'static str, &'static str), Arc<AtomicU64>>>,
}

impl Rejects {
    pub fn count(&self, port: &'static str, why: Reject) {
        self.counts
            .lock()
            .expect("not poisoned")
            .entry((port, why.name()))
            .or_default()
            .fetch_add(1, Ordering::Relaxed);
    }

    /// `(port, reason) -> count`, for the metrics and `lbctl status`.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.counts
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|((p, r), n)| (format!("{p}/{r}"), n.load(Ordering::Relaxed)))
            .collect()
    }
}

/// Reads a signed body: its header first (refused there without the key, when too
/// long or too old), then exactly the announced length; returns the payload.
pub async fn read_signed(body: Body, key: &[u8], max: usize) -> Result<Vec<u8>, Reject> {
    let mut body = body;
    let mut buf: Vec<u8> = Vec::new();
    let mut total: Option<usize> = None;
    let read = async {
        loop {
            if let Some(t) = total {
                if buf.len() >= t {
                    break;
                }
            } else if buf.len() >= wire::STREAM_HEADER {
                let t = wire::check_stream_header(&buf, key, max, wire::unix_secs())?;
                buf.reserve(t.saturating_sub(buf.len()));
                total = Some(t);
                continue;
            }
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        buf.extend_from_slice(data);
                        if total.is_some_and(|t| buf.len() > t) {
                            return Err(Reject::Malformed);
                        }
                    }
                }
                Some(Err(_)) | None => break,
            }
        }
        Ok(())
    };
    tokio::time::timeout(BODY_TIMEOUT, read)
        .await
        .map_err(|_| Reject::Malformed)??;
    wire::decode_stream(&buf, key, max, wire::unix_secs()).map(<[u8]>::to_vec)
}

fn refused(why: Reject) -> ApiError {
    let status = match why {
        Reject::Oversized => StatusCode::PAYLOAD_TOO_LARGE,
        Reject::Malformed => StatusCode::BAD_REQUEST,
        _ => StatusCode::UNAUTHORIZED,
    };
    ApiError(status, format!("refused: {}", why.name()))
}

/// Other LB nodes' directory messages.
pub fn dsd_router(directory: DirHandle, rejects: Arc<Rejects>) -> Router {
    async fn dsd(
        State((d, rejects)): State<(DirHandle, Arc<Rejects>)>,
        headers: HeaderMap,
        body: Body,
    ) -> Result<&'static str, ApiError> {
        let from = headers
            .get("x-lb-node")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad("missing x-lb-node"))?;
        let payload = read_signed(body, d.key(), crate::shell::dird::MAX_DSD_MESSAGE)
            .await
            .inspect_err(|why| rejects.count("dsd", *why))
            .map_err(refused)?;
        d.accept(from, &payload)
            .inspect_err(|why| rejects.count("dsd", *why))
            .map_err(refused)?;
        Ok("ok")
    }
    Router::new()
        .route("/v1/dsd", post(dsd))
        .with_state((directory, rejects))
}

/// Other LB nodes' availability messages.
pub fn avail_router(availability: AvailHandle, rejects: Arc<Rejects>) -> Router {
    async fn avail(
        State((a, rejects)): State<(AvailHandle, Arc<Rejects>)>,
        headers: HeaderMap,
        body: Body,
    ) -> Result<Response, ApiError> {
        let from = headers
            .get("x-lb-from")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let payload = read_signed(body, a.key(), crate::shell::availd::MAX_MESSAGE)
            .await
            .inspect_err(|why| {
                rejects.count("avail", *why);
                a.count_reject();
            })
            .map_err(refused)?;
        let msg = a.open(&payload).map_err(refused)?;
        match a.receive(from, msg).await.map_err(internal)? {
            Some(records) => Ok(a.frame_answer(&records).into_response()),
            None => Ok("ok".into_response()),
        }
    }
    Router::new()
        .route("/v1/avail", post(avail))
        .with_state((availability, rejects))
}

/// A registry request's payload as `T`, authenticated with the registry key.
async fn signed<T: serde::de::DeserializeOwned>(s: &AppState, body: Body) -> Result<T, ApiError> {
    let key = s.registry_key.as_deref().ok_or_else(|| {
        ApiError(
            StatusCode::UNAUTHORIZED,
            "no registry key is configured".into(),
        )
    })?;
    let payload = read_signed(body, key, MAX_REGISTRY_BODY)
        .await
        .inspect_err(|why| s.rejects.count("registry", *why))
        .map_err(refused)?;
    serde_json::from_slice(&payload).map_err(|e| {
        s.rejects.count("registry", Reject::Malformed);
        bad(format!("{e}"))
    })
}

/// What backends may call over TCP (`node.registry_listen`): registering, renewing
/// and reporting load, each request signed with `node.registry_key`.
pub fn registry_router(state: AppState) -> Router {
    async fn register(
        State(s): State<AppState>,
        body: Body,
    ) -> super::directory::WriteResult<api::Registered> {
        let req: api::Registration = signed(&s, body).await?;
        super::directory::register(&s, req).await
    }
    async fn heartbeat(
        State(s): State<AppState>,
        body: Body,
    ) -> super::directory::WriteResult<api::DirValid> {
        let req: api::DirHeartbeat = signed(&s, body).await?;
        super::directory::heartbeat(&s, req).await
    }
    async fn report(
        State(s): State<AppState>,
        body: Body,
    ) -> super::directory::WriteResult<api::LoadReported> {
        let req: api::LoadReport = signed(&s, body).await?;
        super::directory::report(&s, req).await
    }
    Router::new()
        .route("/v1/dir/register", post(register))
        .route("/v1/dir/heartbeat", post(heartbeat))
        .route("/v1/backends/report", post(report))
        .fallback(unknown)
        .with_state(state)
}
