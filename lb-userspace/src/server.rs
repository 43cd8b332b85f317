//! The daemon's listeners: the management API (HTTP/JSON on a Unix socket) and the
//! Prometheus endpoint (HTTP on TCP). Handlers parse, call `Daemon`, and answer.

use std::{collections::BTreeMap, net::IpAddr, path::Path, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use axum::{
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use tokio::sync::{mpsc, Mutex};

use crate::{
    api::{
        self, AddBackend, ClusterView, Registration, AddService, Applied, BackendRef, DrainBackend, ErrorBody, ServiceRef,
        SetWeight, Shutdown,
    },
    shell::clusterd::ClusterHandle,
    shell::daemon::Daemon,
    desired::{BackendSpec, Desired, ServiceSpec},
    shell::dird::DirHandle,
    directory::store::DirectoryStore,
    model::ServiceKey,
    shell::neighbor::NeighborTable,
};

#[derive(Clone)]
pub struct AppState {
    pub daemon: Arc<Mutex<Daemon>>,
    pub shutdown: mpsc::Sender<Shutdown>,
    pub neighbors: Arc<NeighborTable>,
    pub cluster: Option<ClusterHandle>,
    pub directory: DirHandle,
    pub availability: crate::shell::availd::AvailHandle,
}

/// Resolves the MACs of backends about to be added, without holding the daemon, so
/// that a new backend takes traffic from the moment the change is applied rather than
/// from the next background refresh.
async fn prefetch(state: &AppState, addrs: Vec<IpAddr>) {
    let wanted: Vec<IpAddr> = {
        let daemon = state.daemon.lock().await;
        addrs
            .into_iter()
            .filter(|a| !daemon.knows_neighbor(*a))
            .collect()
    };
    let mut found = BTreeMap::new();
    for addr in wanted {
        if let Ok(Some(n)) = state
            .neighbors
            .resolve(addr, Duration::from_millis(1500))
            .await
        {
            found.insert(addr, n);
        }
    }
    if !found.is_empty() {
        if let Err(e) = state.daemon.lock().await.update_neighbors(found) {
            tracing::warn!("applying resolved MACs: {e:#}");
        }
    }
}

pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

fn not_found(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, msg.into())
}

fn internal(e: anyhow::Error) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// Applies `edit` to a copy of the desired state, then the copy.
async fn change(
    state: &AppState,
    edit: impl FnOnce(&mut Desired) -> Result<(), ApiError>,
) -> ApiResult<Applied> {
    let mut daemon = state.daemon.lock().await;
    let mut new = daemon.desired().clone();
    edit(&mut new)?;
    let changes = daemon
        .apply(new, false)
        .map_err(|e| bad(format!("{e:#}")))?;
    Ok(Json(Applied {
        changes,
        dry_run: false,
    }))
}

fn service_mut(d: &mut Desired, key: ServiceKey) -> Result<&mut ServiceSpec, ApiError> {
    d.services
        .get_mut(&key)
        .ok_or_else(|| not_found(format!("no service {key}; `lbctl service list` shows them")))
}

fn backend_mut(
    d: &mut Desired,
    key: ServiceKey,
    addr: IpAddr,
) -> Result<&mut BackendSpec, ApiError> {
    service_mut(d, key)?.backends.get_mut(&addr).ok_or_else(|| {
        not_found(format!(
            "no backend {addr} in {key}; `lbctl backend list {key}` shows them"
        ))
    })
}

async fn status(State(s): State<AppState>) -> ApiResult<api::Status> {
    Ok(Json(s.daemon.lock().await.status()))
}

async fn services(State(s): State<AppState>) -> ApiResult<Vec<api::ServiceView>> {
    s.daemon.lock().await.services().map(Json).map_err(internal)
}

async fn stats(State(s): State<AppState>) -> ApiResult<api::Stats> {
    s.daemon.lock().await.stats().map(Json).map_err(internal)
}

async fn desired(State(s): State<AppState>) -> ApiResult<Desired> {
    Ok(Json(s.daemon.lock().await.desired().clone()))
}

async fn add_service(State(s): State<AppState>, Json(req): Json<AddService>) -> ApiResult<Applied> {
    change(&s, |d| {
        let spec = d.services.entry(req.service).or_default();
        if let Some(c) = req.config {
            spec.config = c;
        }
        Ok(())
    })
    .await
}

async fn remove_service(
    State(s): State<AppState>,
    Json(req): Json<ServiceRef>,
) -> ApiResult<Applied> {
    change(&s, |d| {
        d.services
            .remove(&req.service)
            .map(drop)
            .ok_or_else(|| not_found(format!("no service {}", req.service)))
    })
    .await
}

async fn add_backend(State(s): State<AppState>, Json(req): Json<AddBackend>) -> ApiResult<Applied> {
    if req.spec.is_none_or(|b| b.mac.is_none()) {
        prefetch(&s, vec![req.backend]).await;
    }
    change(&s, |d| {
        let svc = service_mut(d, req.service)?;
        if req.backend.is_ipv4() != req.service.addr.is_ipv4() {
            return Err(bad(format!(
                "backend {} is not of {}'s address family",
                req.backend, req.service
            )));
        }
        svc.backends
            .insert(req.backend, req.spec.unwrap_or_default());
        Ok(())
    })
    .await
}

async fn remove_backend(
    State(s): State<AppState>,
    Json(req): Json<BackendRef>,
) -> ApiResult<Applied> {
    change(&s, |d| {
        service_mut(d, req.service)?
            .backends
            .remove(&req.backend)
            .map(drop)
            .ok_or_else(|| not_found(format!("no backend {} in {}", req.backend, req.service)))
    })
    .await
}

async fn drain_backend(
    State(s): State<AppState>,
    Json(req): Json<DrainBackend>,
) -> ApiResult<Applied> {
    change(&s, |d| {
        backend_mut(d, req.service, req.backend)?.drain = req.drain;
        Ok(())
    })
    .await
}

async fn set_weight(State(s): State<AppState>, Json(req): Json<SetWeight>) -> ApiResult<Applied> {
    change(&s, |d| {
        backend_mut(d, req.service, req.backend)?.weight = req.weight;
        Ok(())
    })
    .await
}

/// An operator bump goes to the SPM manager through the directory (so that every
/// node gets the same epoch); answers once the new epoch is in this node's data plane.
async fn bump_epoch(
    State(s): State<AppState>,
    Json(req): Json<ServiceRef>,
) -> ApiResult<api::EpochBumped> {
    let epoch_now = |d: &Daemon| -> Option<u32> {
        d.services()
            .ok()?
            .into_iter()
            .find(|v| v.key == req.service)
            .map(|v| v.config.epoch)
    };
    let before = epoch_now(&*s.daemon.lock().await)
        .ok_or_else(|| not_found(format!("no service {}", req.service)))?;
    s.directory
        .bump_epoch(req.service)
        .await
        .map_err(internal)?;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        if let Some(epoch) = epoch_now(&*s.daemon.lock().await).filter(|e| *e != before) {
            return Ok(Json(api::EpochBumped {
                service: req.service,
                epoch,
            }));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the bump of {} is recorded but no directory master applied it within 3 s; \
                     check `lbctl cluster` (is there a leader?)",
                    req.service
                ),
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[derive(serde::Deserialize)]
struct SpmQuery {
    service: Option<ServiceKey>,
    client: Option<IpAddr>,
    key: Option<u64>,
    #[serde(rename = "type")]
    map_type: Option<u8>,
    provider: Option<String>,
    /// The epoch the client holds for `service`: a stale one gets the mismatch reply.
    epoch: Option<u64>,
    /// 2: the service's sub-level map (its instances, also when level 1 shows a
    /// re-director).
    level: Option<u8>,
}

/// The services as the SPM generator sees them: every configured service with the
/// backends that take traffic (resolved, healthy, weighted) as instances.
fn spm_services(views: &[api::ServiceView]) -> Vec<crate::spm::Service> {
    views
        .iter()
        .map(|v| crate::spm::Service {
            spec: crate::spm::ServiceSpec {
                service_id: v.spm.id.clone().unwrap_or_else(|| v.service.clone()),
                service_version: v.spm.version.clone(),
            },
            epoch: v.config.epoch as u64,
            rule: v.spm.rule(),
            instances: v
                .backends
                .iter()
                .map(|b| crate::spm::Instance {
                    name: b.address.to_string(),
                    host: crate::spm::ServiceHost {
                        inet_address: b.address,
                        dns_address: None,
                        port: v.key.port,
                    },
                    weight: b.weight,
                    valid: b.takes_new_flows(),
                    provider: b.sphere.clone().unwrap_or_else(|| "default".into()),
                })
                .collect(),
            command: None,
            valid_from: None,
            valid_until: None,
            redirector: v.spm.redirect.then_some(crate::spm::ServiceHost {
                inet_address: v.key.addr,
                dns_address: None,
                port: v.key.port,
            }),
            unavailable: v.unavailable.clone(),
        })
        .collect()
}

/// A backend's load and capacity, for the water marks.
async fn report_load(
    State(s): State<AppState>,
    Json(req): Json<api::LoadReport>,
) -> ApiResult<serde_json::Value> {
    if req.ttl_ms == 0 {
        return Err(bad("ttl_ms must be positive"));
    }
    if !s
        .daemon
        .lock()
        .await
        .desired()
        .services
        .contains_key(&req.service)
    {
        return Err(not_found(format!("no service {}", req.service)));
    }
    s.directory
        .report_load(
            req.service,
            req.backend,
            req.load,
            req.capacity,
            std::time::Duration::from_millis(req.ttl_ms),
        )
        .await
        .map_err(internal)?;
    Ok(Json(serde_json::json!({
        "reported": format!("{}|{}", req.service, req.backend),
        "load": req.load,
        "capacity": req.capacity,
    })))
}

/// An operator marks a service available or not; every node hears of it.
async fn set_availability(
    State(s): State<AppState>,
    Json(req): Json<api::SetAvailability>,
) -> ApiResult<crate::availability::Record> {
    if !s
        .daemon
        .lock()
        .await
        .desired()
        .services
        .contains_key(&req.service)
    {
        return Err(not_found(format!("no service {}", req.service)));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let record = crate::availability::Record {
        created_ms: now,
        service: req.service.to_string(),
        available: req.available,
        reason: req.reason.unwrap_or(if req.available {
            crate::availability::Reason::Unknown
        } else {
            crate::availability::Reason::Planned
        }),
        operator: req.operator.unwrap_or_else(|| "unknown".into()),
        expected_down_ms: (!req.available).then_some(now),
        expected_up_ms: req.expected_up_ms,
    };
    s.availability.set(record.clone()).await.map_err(internal)?;
    Ok(Json(record))
}

async fn availability(State(s): State<AppState>) -> ApiResult<api::Availability> {
    Ok(Json(api::Availability {
        records: s.availability.records().await.into_values().collect(),
        synced: s.availability.synced(),
        rejected: s
            .availability
            .rejected
            .load(std::sync::atomic::Ordering::Relaxed),
    }))
}

/// The map a query asks for, and the epoch-mismatch reply's body when the client
/// holds a stale epoch.
fn spm_answer(
    views: &[api::ServiceView],
    q: &SpmQuery,
) -> Result<(crate::spm::Spm, Option<serde_json::Value>), ApiError> {
    let chosen: Vec<api::ServiceView> = match q.service {
        Some(k) => {
            let v: Vec<_> = views.iter().filter(|v| v.key == k).cloned().collect();
            if v.is_empty() {
                return Err(not_found(format!("no service {k}")));
            }
            v
        }
        None => views.to_vec(),
    };
    let services = spm_services(&chosen);
    let client = crate::spm::Client {
        address: q.client,
        key: q.key,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // The map's version: the epochs and the instance sets, hashed, so every node
    // that holds the same directory gives the same version.
    let version = {
        let text = serde_json::to_string(&services).unwrap_or_default();
        text.bytes().fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100000001b3)
        })
    };
    let service_id = q
        .service
        .and(services.first())
        .map(|x| x.spec.service_id.clone());
    let map = match (q.level, &services[..]) {
        (Some(2), [one]) => crate::spm::sub_level(one, &client, now, version),
        (Some(2), _) => return Err(bad("level 2 (a sub-level map) needs one --service")),
        (Some(l), _) if l != 1 => return Err(bad(format!("level {l}: use 1 or 2"))),
        _ => crate::spm::generate(&services, &client, now, version),
    };
    let map = match q.map_type {
        None | Some(1) => map,
        Some(_) if q.level == Some(2) => map,
        Some(t) => crate::spm::project(&map, t, service_id.as_deref(), q.provider.as_deref())
            .map_err(bad)?,
    };
    let mut mismatch = None;
    if let (Some(k), Some(held)) = (q.service, q.epoch) {
        let current = services.first().map_or(0, |x| x.epoch);
        if held != current {
            // The seed's epoch-mismatch reply: says so, and carries the new entries.
            mismatch = Some(serde_json::json!({
                "error": format!("epoch mismatch for {k}: you hold {held}, the service is at {current}; use the entries below"),
                "epoch_mismatch": { "service": k, "held": held, "current": current },
                "map": map,
            }));
        }
    }
    Ok((map, mismatch))
}

async fn spm(
    State(s): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<SpmQuery>,
) -> Result<Response, ApiError> {
    let views = s.daemon.lock().await.services().map_err(internal)?;
    let (map, mismatch) = spm_answer(&views, &q)?;
    if let Some(body) = mismatch {
        return Ok((StatusCode::CONFLICT, Json(body)).into_response());
    }
    Ok(Json(map).into_response())
}

/// The map as NDJSON: the current one at once, then each new version as it appears
/// (checked every 100 ms), until the client goes away.
async fn spm_watch(
    State(s): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<SpmQuery>,
) -> Result<Response, ApiError> {
    let views = s.daemon.lock().await.services().map_err(internal)?;
    let (first, _) = spm_answer(&views, &q)?;
    let (tx, rx) = mpsc::channel::<std::result::Result<String, std::convert::Infallible>>(16);
    tokio::spawn(async move {
        let mut last = first.version;
        let line = |m: &crate::spm::Spm| serde_json::to_string(m).expect("serializes") + "\n";
        if tx.send(Ok(line(&first))).await.is_err() {
            return;
        }
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            if tx.is_closed() {
                return;
            }
            let Ok(views) = s.daemon.lock().await.services() else {
                continue;
            };
            let Ok((map, _)) = spm_answer(&views, &q) else {
                return;
            };
            if map.version != last {
                last = map.version;
                if tx.send(Ok(line(&map))).await.is_err() {
                    return;
                }
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|line| (line, rx))
    });
    let body = axum::body::Body::from_stream(stream);
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        body,
    )
        .into_response())
}

async fn apply(State(s): State<AppState>, Json(req): Json<api::Apply>) -> ApiResult<Applied> {
    if !req.dry_run {
        let addrs = req
            .desired
            .services
            .values()
            .flat_map(|svc| svc.backends.iter())
            .filter(|(_, b)| b.mac.is_none())
            .map(|(a, _)| *a)
            .collect();
        prefetch(&s, addrs).await;
    }
    let mut daemon = s.daemon.lock().await;
    let changes = daemon
        .apply(req.desired, req.dry_run)
        .map_err(|e| bad(format!("{e:#}")))?;
    Ok(Json(Applied {
        changes,
        dry_run: req.dry_run,
    }))
}

async fn shutdown(
    State(s): State<AppState>,
    Json(req): Json<Shutdown>,
) -> ApiResult<serde_json::Value> {
    s.shutdown
        .send(req)
        .await
        .map_err(|_| internal(anyhow::anyhow!("the daemon is already shutting down")))?;
    Ok(Json(serde_json::json!({ "shutting_down": true })))
}

fn cluster_of(s: &AppState) -> Result<&ClusterHandle, ApiError> {
    s.cluster.as_ref().ok_or_else(|| {
        not_found("this node is not in a cluster (no [cluster] section in its config)")
    })
}

async fn cluster(State(s): State<AppState>) -> ApiResult<ClusterView> {
    Ok(Json(cluster_of(&s)?.view()))
}

async fn quiesce(
    State(s): State<AppState>,
    Json(req): Json<api::Quiesce>,
) -> ApiResult<serde_json::Value> {
    cluster_of(&s)?
        .set_quiesce(req.quiesce)
        .await
        .map_err(internal)?;
    Ok(Json(serde_json::json!({ "quiesce": req.quiesce })))
}

#[derive(serde::Deserialize)]
struct EventsQuery {
    #[serde(default)]
    follow: bool,
}

/// Newline-delimited JSON events: the recent ones, then (with `follow=true`) each new
/// one as it happens, until the client hangs up.
async fn events(
    State(s): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<EventsQuery>,
) -> Result<Response, ApiError> {
    let c = cluster_of(&s)?.clone();
    let recent = c.recent_events();
    let mut lines: Vec<Result<String, std::convert::Infallible>> = recent
        .iter()
        .map(|e| {
            Ok(format!(
                "{}\n",
                serde_json::to_string(e).expect("serializes")
            ))
        })
        .collect();
    if !q.follow {
        return Ok(lines.concat_ok().into_response());
    }
    let rx = c.events.subscribe();
    let live = futures::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(e) => {
                    return Some((
                        Ok(format!(
                            "{}\n",
                            serde_json::to_string(&e).expect("serializes")
                        )),
                        rx,
                    ))
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return None,
            }
        }
    });
    let head = futures::stream::iter(std::mem::take(&mut lines));
    let body = axum::body::Body::from_stream(futures::StreamExt::chain(head, live));
    Ok(Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(body)
        .expect("valid response"))
}

trait ConcatOk {
    fn concat_ok(self) -> String;
}

impl ConcatOk for Vec<Result<String, std::convert::Infallible>> {
    fn concat_ok(self) -> String {
        self.into_iter()
            .map(|r| r.unwrap_or_else(|e| match e {}))
            .collect()
    }
}

#[derive(serde::Deserialize)]
struct TablePrefix {
    table: String,
    #[serde(default)]
    prefix: String,
}

#[derive(serde::Deserialize, serde::Serialize)]
pub struct DirAdd {
    pub table: String,
    pub key: String,
    pub value: String,
    #[serde(default = "yes")]
    pub valid: bool,
}

fn yes() -> bool {
    true
}

#[derive(serde::Deserialize, serde::Serialize)]
pub struct DirKey {
    pub table: String,
    pub key: String,
}

#[derive(serde::Deserialize, serde::Serialize)]
pub struct DirHeartbeat {
    pub table: String,
    pub key: String,
    pub time_max_ms: u64,
}

async fn dir_search(
    State(s): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<TablePrefix>,
) -> ApiResult<Vec<crate::directory::tables::Entry>> {
    Ok(Json(s.directory.search(&q.table, &q.prefix).await))
}

async fn dir_find(
    State(s): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<TablePrefix>,
) -> ApiResult<Vec<crate::directory::tables::CompleteRoute>> {
    Ok(Json(s.directory.find_server(&q.table, &q.prefix).await))
}

async fn dir_add(
    State(s): State<AppState>,
    Json(req): Json<DirAdd>,
) -> ApiResult<serde_json::Value> {
    // Applied here at once on the directory master; on another node, once the
    // master's push comes back (milliseconds).
    s.directory
        .add(&req.table, &req.key, &req.value, req.valid)
        .await
        .map_err(internal)?;
    Ok(Json(serde_json::json!({ "submitted": true })))
}

async fn dir_delete(
    State(s): State<AppState>,
    Json(req): Json<DirKey>,
) -> ApiResult<serde_json::Value> {
    let found = s
        .directory
        .delete(&req.table, &req.key)
        .await
        .map_err(internal)?;
    if !found {
        return Err(not_found(format!(
            "no key {} in table {}",
            req.key, req.table
        )));
    }
    Ok(Json(serde_json::json!({ "changed": true })))
}

async fn dir_heartbeat(
    State(s): State<AppState>,
    Json(req): Json<DirHeartbeat>,
) -> ApiResult<serde_json::Value> {
    let known = s
        .directory
        .heartbeat(
            &req.table,
            &req.key,
            std::time::Duration::from_millis(req.time_max_ms),
        )
        .await
        .map_err(internal)?;
    if !known {
        return Err(not_found(format!(
            "no key {} in table {}; add or register it first",
            req.key, req.table
        )));
    }
    Ok(Json(serde_json::json!({ "valid": true })))
}

async fn dir_register(
    State(s): State<AppState>,
    Json(req): Json<Registration>,
) -> ApiResult<serde_json::Value> {
    if req.ttl_ms == 0 {
        return Err(bad("ttl_ms must be positive"));
    }
    if req.address.is_ipv4() != req.service.addr.is_ipv4() {
        return Err(bad(format!(
            "{} is not of {}'s address family",
            req.address, req.service
        )));
    }
    s.directory.register(&req).await.map_err(internal)?;
    Ok(Json(
        serde_json::json!({ "registered": req.instance(), "ttl_ms": req.ttl_ms }),
    ))
}

/// Newline-delimited subscription events for a table and key prefix, until the
/// client hangs up.
async fn dir_subscribe(
    State(s): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<TablePrefix>,
) -> Response {
    let events = s.directory.subscribe(&q.table, &q.prefix);
    let lines = futures::StreamExt::map(events, |e| {
        Ok::<_, std::convert::Infallible>(format!(
            "{}\n",
            serde_json::to_string(&e).expect("serializes")
        ))
    });
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(axum::body::Body::from_stream(lines))
        .expect("valid response")
}

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
pub fn avail_router(availability: crate::shell::availd::AvailHandle) -> Router {
    async fn avail(
        State(a): State<crate::shell::availd::AvailHandle>,
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
        .with_state(state)
}

async fn metrics(State(s): State<AppState>) -> Result<String, ApiError> {
    let daemon = s.daemon.lock().await;
    let stats = daemon.stats().map_err(internal)?;
    let cluster = s.cluster.as_ref().map(|c| c.view());
    Ok(crate::metrics::render(
        &daemon.status(),
        &stats,
        cluster.as_ref(),
    ))
}

pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
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
