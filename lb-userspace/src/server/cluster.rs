//! The cluster as the API shows it: the view, quiesce, the event stream, and the
//! operators' availability records.

use axum::{
    extract::State,
    response::{IntoResponse, Response},
    Json,
};

use super::{internal, not_found, ApiError, ApiJson, ApiQuery, ApiResult, AppState};
use crate::{api, shell::clusterd::ClusterHandle};

/// An operator marks a service available or not; every node hears of it.
pub(super) async fn set_availability(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<api::SetAvailability>,
) -> ApiResult<crate::availability::Record> {
    if !s.daemon.now().desired.services.contains_key(&req.service) {
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

pub(super) async fn availability(State(s): State<AppState>) -> ApiResult<api::Availability> {
    Ok(Json(api::Availability {
        records: s.availability.records().await.into_values().collect(),
        synced: s.availability.synced(),
        rejected: s
            .availability
            .rejected
            .load(std::sync::atomic::Ordering::Relaxed),
    }))
}

pub(super) fn cluster_of(s: &AppState) -> Result<&ClusterHandle, ApiError> {
    s.cluster.as_ref().ok_or_else(|| {
        not_found("this node is not in a cluster (no [cluster] section in its config)")
    })
}

pub(super) async fn cluster(State(s): State<AppState>) -> ApiResult<api::ClusterView> {
    Ok(Json(cluster_of(&s)?.view()))
}

pub(super) async fn quiesce(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<api::Quiesce>,
) -> ApiResult<api::Quiesce> {
    cluster_of(&s)?
        .set_quiesce(req.quiesce)
        .await
        .map_err(internal)?;
    Ok(Json(api::Quiesce {
        quiesce: req.quiesce,
    }))
}

/// Newline-delimited JSON events: the recent ones, then (with `follow=true`) each new
/// one as it happens, until the client hangs up.
pub(super) async fn events(
    State(s): State<AppState>,
    ApiQuery(q): ApiQuery<api::EventsQuery>,
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
