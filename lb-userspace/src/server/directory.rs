//! The directory's agent interface (search, find-server, add, delete, heartbeat,
//! register with a lease, subscribe) and backends' load reports.

use axum::{extract::State, http::StatusCode, response::Response, Json};

use super::{bad, internal, not_found, ApiError, ApiJson, ApiQuery, ApiResult, AppState};
use crate::{
    api::{self, Registration},
    directory::store::{DirectoryStore, ReadOnly, Written},
};

/// A change's answer: 200 once committed, 202 while pending.
pub(super) type WriteResult<T> = Result<(StatusCode, Json<T>), ApiError>;

fn answer<T>(written: Written, body: T) -> (StatusCode, Json<T>) {
    match written {
        Written::Committed => (StatusCode::OK, Json(body)),
        Written::Pending => (StatusCode::ACCEPTED, Json(body)),
    }
}

/// A directory write that failed: 503 on a minority side (try another node), 500
/// otherwise.
fn refused(e: anyhow::Error) -> ApiError {
    if e.downcast_ref::<ReadOnly>().is_some() {
        ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}"))
    } else {
        internal(e)
    }
}

/// A backend's load and capacity, for the water marks.
pub(super) async fn report_load(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<api::LoadReport>,
) -> WriteResult<api::LoadReported> {
    report(&s, req).await
}

/// A load report, from the API or the registry port.
pub(super) async fn report(s: &AppState, req: api::LoadReport) -> WriteResult<api::LoadReported> {
    if req.ttl_ms == 0 {
        return Err(bad("ttl_ms must be positive"));
    }
    if !s.daemon.now().desired.services.contains_key(&req.service) {
        return Err(not_found(format!("no service {}", req.service)));
    }
    let written = s
        .directory
        .report_load(
            req.service,
            req.backend,
            req.load,
            req.capacity,
            std::time::Duration::from_millis(req.ttl_ms),
        )
        .await
        .map_err(refused)?;
    Ok(answer(
        written,
        api::LoadReported {
            reported: format!("{}|{}", req.service, req.backend),
            load: req.load,
            capacity: req.capacity,
            committed: written == Written::Committed,
        },
    ))
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
) -> WriteResult<api::DirSubmitted> {
    let written = s
        .directory
        .add(&req.table, &req.key, &req.value, req.valid)
        .await
        .map_err(refused)?;
    Ok(answer(
        written,
        api::DirSubmitted {
            submitted: true,
            committed: written == Written::Committed,
        },
    ))
}

pub(super) async fn dir_delete(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<api::DirKey>,
) -> WriteResult<api::DirDeleted> {
    let Some(written) = s
        .directory
        .delete(&req.table, &req.key)
        .await
        .map_err(refused)?
    else {
        return Err(not_found(format!(
            "no key {} in table {}",
            req.key, req.table
        )));
    };
    Ok(answer(
        written,
        api::DirDeleted {
            changed: true,
            committed: written == Written::Committed,
        },
    ))
}

pub(super) async fn dir_heartbeat(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<api::DirHeartbeat>,
) -> WriteResult<api::DirValid> {
    heartbeat(&s, req).await
}

/// A heartbeat, from the API or the registry port.
pub(super) async fn heartbeat(s: &AppState, req: api::DirHeartbeat) -> WriteResult<api::DirValid> {
    let known = s
        .directory
        .heartbeat(
            &req.table,
            &req.key,
            std::time::Duration::from_millis(req.time_max_ms),
        )
        .await
        .map_err(refused)?;
    let Some(written) = known else {
        return Err(not_found(format!(
            "no key {} in table {}; add or register it first",
            req.key, req.table
        )));
    };
    Ok(answer(
        written,
        api::DirValid {
            valid: true,
            committed: written == Written::Committed,
        },
    ))
}

pub(super) async fn dir_register(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<Registration>,
) -> WriteResult<api::Registered> {
    register(&s, req).await
}

/// A registration, from the API or the registry port.
pub(super) async fn register(s: &AppState, req: Registration) -> WriteResult<api::Registered> {
    if req.ttl_ms == 0 {
        return Err(bad("ttl_ms must be positive"));
    }
    if let Some(why) =
        crate::validate::backend_refusal(&req.service, req.address, crate::model::Forward::L2)
    {
        return Err(bad(why));
    }
    let written = s.directory.register(&req).await.map_err(refused)?;
    Ok(answer(
        written,
        api::Registered {
            registered: req.instance(),
            ttl_ms: req.ttl_ms,
            committed: written == Written::Committed,
        },
    ))
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
