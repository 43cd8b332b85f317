//! Services, backends, whole-state apply, status and shutdown. Every change copies
//! the desired state, edits the copy and hands it to the reconciler, which refuses
//! it whole or applies it whole.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use axum::{extract::State, Json};

use super::{bad, internal, not_found, ApiError, ApiJson, ApiQuery, ApiResult, AppState};
use crate::{
    api::{
        self, AddBackend, AddService, Applied, BackendRef, DrainBackend, ServiceRef, SetWeight,
        Shutdown,
    },
    desired::{BackendSpec, Desired, ServiceSpec},
    model::ServiceKey,
};

pub(super) async fn status(State(s): State<AppState>) -> ApiResult<api::Status> {
    let mut status = s.daemon.now().status.clone();
    status.rejected = s.rejects.snapshot();
    status.waiting_for = super::waiting_for(&s);
    status.ready = status.waiting_for.is_empty();
    Ok(Json(status))
}

pub(super) async fn services(
    State(s): State<AppState>,
    ApiQuery(q): ApiQuery<api::ListQuery>,
) -> ApiResult<Vec<api::ServiceView>> {
    let views = s.daemon.services_view().await.map_err(internal)?;
    Ok(Json(q.shape(views)))
}

pub(super) async fn stats(
    State(s): State<AppState>,
    ApiQuery(q): ApiQuery<api::ListQuery>,
) -> ApiResult<api::Stats> {
    let mut stats = s.daemon.stats_view().await.map_err(internal)?;
    stats.services = q.shape(stats.services);
    Ok(Json(stats))
}

pub(super) async fn desired(State(s): State<AppState>) -> ApiResult<Desired> {
    Ok(Json((*s.daemon.now().desired).clone()))
}

pub(super) async fn add_service(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<AddService>,
) -> ApiResult<Applied> {
    change(&s, req.service, move |d| {
        let spec = d.services.entry(req.service).or_default();
        if let Some(c) = req.config {
            spec.config = c;
        }
        Ok(())
    })
    .await
}

pub(super) async fn remove_service(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<ServiceRef>,
) -> ApiResult<Applied> {
    change(&s, req.service, move |d| {
        d.services
            .remove(&req.service)
            .map(drop)
            .ok_or_else(|| not_found(format!("no service {}", req.service)))
    })
    .await
}

pub(super) async fn add_backend(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<AddBackend>,
) -> ApiResult<Applied> {
    if req.spec.is_none_or(|b| b.mac.is_none()) {
        prefetch(&s, vec![req.backend]).await;
    }
    change(&s, req.service, move |d| {
        let svc = service_mut(d, req.service)?;
        if let Some(why) =
            crate::validate::backend_refusal(&req.service, req.backend, svc.config.forward)
        {
            return Err(bad(why));
        }
        svc.backends
            .insert(req.backend, req.spec.unwrap_or_default());
        Ok(())
    })
    .await
}

pub(super) async fn remove_backend(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<BackendRef>,
) -> ApiResult<Applied> {
    change(&s, req.service, move |d| {
        service_mut(d, req.service)?
            .backends
            .remove(&req.backend)
            .map(drop)
            .ok_or_else(|| not_found(format!("no backend {} in {}", req.backend, req.service)))
    })
    .await
}

pub(super) async fn drain_backend(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<DrainBackend>,
) -> ApiResult<Applied> {
    change(&s, req.service, move |d| {
        backend_mut(d, req.service, req.backend)?.drain = req.drain;
        Ok(())
    })
    .await
}

pub(super) async fn set_weight(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<SetWeight>,
) -> ApiResult<Applied> {
    change(&s, req.service, move |d| {
        backend_mut(d, req.service, req.backend)?.weight = req.weight;
        Ok(())
    })
    .await
}

pub(super) async fn apply(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<api::Apply>,
) -> ApiResult<Applied> {
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
    let dry_run = req.dry_run;
    if s.cluster.is_some() && !dry_run {
        return through_cluster(&s, req.desired).await;
    }
    let changes = if dry_run {
        s.daemon.call(move |d| d.apply(req.desired, true)).await
    } else {
        // In batches: a large apply does not hold the reads sent meanwhile.
        s.daemon.apply(req.desired).await
    }
    .map_err(|e| bad(format!("{e:#}")))?;
    Ok(Json(Applied {
        changes,
        dry_run: req.dry_run,
    }))
}

pub(super) async fn shutdown(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<Shutdown>,
) -> ApiResult<api::ShuttingDown> {
    s.shutdown
        .send(req)
        .await
        .map_err(|_| internal(anyhow::anyhow!("the daemon is already shutting down")))?;
    Ok(Json(api::ShuttingDown {
        shutting_down: true,
    }))
}

/// Applies `edit` to a copy of the desired state, then the copy: both in one job on
/// the daemon, so that no other change comes in between.
/// Edits service `key` (and nothing else) of the desired state and applies it.
pub(super) async fn change(
    state: &AppState,
    key: ServiceKey,
    edit: impl FnOnce(&mut Desired) -> Result<(), ApiError> + Send + 'static,
) -> ApiResult<Applied> {
    if state.cluster.is_some() {
        let new = state
            .daemon
            .call(move |d| {
                let mut new = d.desired().clone();
                edit(&mut new)?;
                Ok::<_, ApiError>(new)
            })
            .await?;
        return through_cluster(state, new).await;
    }
    // In batches, as an apply: a service of 100,000 backends takes a second to lay
    // out, which the reads sent meanwhile do not wait for.
    let changes = state
        .daemon
        .apply_edit(key, edit)
        .await
        .map_err(|e| bad(format!("{e:#}")))??;
    Ok(Json(Applied {
        changes,
        dry_run: false,
    }))
}

/// In a cluster, services and backends are the cluster's: a change made through any
/// node is checked here (refused whole, nothing written, as on a single node), then
/// written to the directory, which every node applies (this one before the answer).
/// Node-local settings (interfaces, addresses, MACs learned, health verdicts) stay
/// in each node's configuration.
async fn through_cluster(state: &AppState, new: Desired) -> ApiResult<Applied> {
    let check = new.clone();
    let changes = state
        .daemon
        .call(move |d| d.apply(check, true))
        .await
        .map_err(|e| bad(format!("{e:#}")))?;
    if changes.is_empty() {
        return Ok(Json(Applied {
            changes,
            dry_run: false,
        }));
    }
    match state.directory.set_desired(&new).await {
        Ok(crate::directory::store::Written::Committed) => Ok(Json(Applied {
            changes,
            dry_run: false,
        })),
        Ok(crate::directory::store::Written::Pending) => Err(ApiError(
            axum::http::StatusCode::ACCEPTED,
            "pending: the change is with the directory's master but not yet stored by its \
             backup; it is resent from this node until stored (`lbctl service list` on any \
             node shows when it is applied)"
                .into(),
        )),
        Err(e)
            if e.downcast_ref::<crate::directory::store::ReadOnly>()
                .is_some() =>
        {
            Err(ApiError(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                format!("{e:#}"),
            ))
        }
        Err(e) => Err(internal(e)),
    }
}

pub(super) fn service_mut(d: &mut Desired, key: ServiceKey) -> Result<&mut ServiceSpec, ApiError> {
    d.services
        .get_mut(&key)
        .ok_or_else(|| not_found(format!("no service {key}; `lbctl service list` shows them")))
}

pub(super) fn backend_mut(
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

/// Resolves the MACs of backends about to be added, without holding the daemon, so
/// that a new backend takes traffic from the moment the change is applied rather than
/// from the next background refresh.
pub(super) async fn prefetch(state: &AppState, addrs: Vec<IpAddr>) {
    let (wanted, routed): (Vec<IpAddr>, Vec<IpAddr>) = {
        let now = state.daemon.now();
        let wanted = addrs
            .into_iter()
            .filter(|a| !now.known_neighbors.contains(a))
            .collect();
        (wanted, now.routed.clone())
    };
    // A backend of a service only now made encapsulating is not in `routed` yet: its
    // gateway's MAC comes with the next neighbour refresh (within 250 ms).
    let found: BTreeMap<IpAddr, _> = state
        .neighbors
        .resolve_all(&wanted, &routed, Duration::from_millis(1500))
        .await;
    if !found.is_empty() {
        if let Err(e) = state
            .daemon
            .change(move |d| d.update_neighbors(found))
            .await
        {
            tracing::warn!("applying resolved MACs: {e:#}");
        }
    }
}
