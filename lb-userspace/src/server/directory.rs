//! The directory's agent interface (search, find-server, add, delete, heartbeat,
//! register with a lease, subscribe) and backends' load reports.

use axum::{extract::State, response::Response, Json};

use super::{bad, internal, not_found, ApiJson, ApiQuery, ApiResult, AppState};
use crate::{
    api::{self, Registration},
    directory::store::DirectoryStore,
};

/// A backend's load and capacity, for the water marks.
pub(super) async fn report_load(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<api::LoadReport>,
) -> ApiResult<api::LoadReported> {
    report(&s, req).await
}

/// A load report, from the API or the registry port.
pub(super) async fn report(s: &AppState, req: api::LoadReport) -> ApiResult<api::LoadReported> {
    if req.ttl_ms == 0 {
        return Err(bad("ttl_ms must be positive"));
    }
    if !s.daemon.now().desired.services.contains_key(&req.service) {
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
    Ok(Json(api::LoadReported {
        reported: format!("{}|{}", req.service, req.backend),
        load: req.load,
        capacity: req.capacity,
    }))
}

pub(super) async fn dir_search(
    State(s): State<AppState>,
    ApiQuery(q): ApiQuery<api::TablePrefix>,
) -> ApiResult<Vec<crate::directory::tables::Entry>> {
    Ok(Json(s.directory.search(&q.table, &q.prefix).await))
}

pub(super) async fn dir_find(
    State(s): State<AppState>,
    ApiQuery(q): ApiQuery<api::TablePrefix>,
) -> ApiResult<Vec<crate::directory::tables::CompleteRoute>> {
    Ok(Json(s.directory.find_server(&q.table, &q.prefix).await))
}

pub(super) async fn dir_add(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<api::DirAdd>,
) -> ApiResult<api::DirSubmitted> {
    // Applied here at once on the directory master; on another node, once the
    // master's push comes back (milliseconds).
    s.directory
        .add(&req.table, &req.key, &req.value, req.valid)
        .await
        .map_err(internal)?;
    Ok(Json(api::DirSubmitted { submitted: true }))
}

pub(super) async fn dir_delete(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<api::DirKey>,
) -> ApiResult<api::DirDeleted> {
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
    Ok(Json(api::DirDeleted { changed: true }))
}

pub(super) async fn dir_heartbeat(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<api::DirHeartbeat>,
) -> ApiResult<api::DirValid> {
    heartbeat(&s, req).await
}

/// A heartbeat, from the API or the registry port.
pub(super) async fn heartbeat(s: &AppState, req: api::DirHeartbeat) -> ApiResult<api::DirValid> {
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
    Ok(Json(api::DirValid { valid: true }))
}

pub(super) async fn dir_register(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<Registration>,
) -> ApiResult<api::Registered> {
    register(&s, req).await
}

/// A registration, from the API or the registry port.
pub(super) async fn register(s: &AppState, req: Registration) -> ApiResult<api::Registered> {
    if req.ttl_ms == 0 {
        return Err(bad("ttl_ms must be positive"));
    }
    if let Some(why) = crate::validate::backend_refusal(&req.service, req.address) {
        return Err(bad(why));
    }
    s.directory.register(&req).await.map_err(internal)?;
    Ok(Json(api::Registered {
        registered: req.instance(),
        ttl_ms: req.ttl_ms,
    }))
}

/// Newline-delimited subscription events for a table and key prefix, until the
/// client hangs up.
pub(super) async fn dir_subscribe(
    State(s): State<AppState>,
    ApiQuery(q): ApiQuery<api::TablePrefix>,
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
