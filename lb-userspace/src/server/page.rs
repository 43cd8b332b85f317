//! The status page on the metrics port: `/` is one self-contained HTML file (no
//! external assets, works offline) that polls `/page.json` every second and draws the
//! cluster, the services with their backends and rates, and the changes it saw.

use axum::{extract::State, response::Html, Json};
use serde::Serialize;

use super::{internal, ApiError, AppState};
use crate::api;

const PAGE: &str = include_str!("page.html");

pub(super) async fn page() -> Html<&'static str> {
    Html(PAGE)
}

/// Everything the page draws, in one answer (one consistent moment per refresh).
#[derive(Serialize)]
pub(super) struct PageData {
    status: api::Status,
    stats: api::Stats,
    cluster: Option<api::ClusterView>,
    /// The cluster's recent events, newest last (at most 20).
    events: Vec<api::EventRecord>,
}

pub(super) async fn data(State(s): State<AppState>) -> Result<Json<PageData>, ApiError> {
    let stats = s.daemon.monitored_stats().await.map_err(internal)?;
    let status = s.daemon.now().status.clone();
    let cluster = s.cluster.as_ref().map(|c| c.view());
    let mut events = s
        .cluster
        .as_ref()
        .map(|c| c.recent_events())
        .unwrap_or_default();
    let skip = events.len().saturating_sub(20);
    events.drain(..skip);
    Ok(Json(PageData {
        status,
        stats,
        cluster,
        events,
    }))
}
