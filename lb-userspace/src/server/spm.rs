//! The Service Point Map served: the map for a query, the epoch-mismatch reply, the
//! stream of new versions, and operator epoch bumps (through the directory, so every
//! node gets the same epoch).

use tokio::sync::mpsc;

use axum::{
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};

use super::{bad, internal, not_found, ApiError, ApiJson, ApiQuery, ApiResult, AppState};
use crate::{api, shell::handle::DaemonHandle};

/// An operator bump goes to the SPM manager through the directory (so that every
/// node gets the same epoch); answers once the new epoch is in this node's data plane.
pub(super) async fn bump_epoch(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<api::ServiceRef>,
) -> ApiResult<api::EpochBumped> {
    let service = req.service;
    let epoch_now = |d: DaemonHandle| async move {
        d.read(move |d| d.services())
            .await
            .ok()?
            .into_iter()
            .find(|v| v.key == service)
            .map(|v| v.config.epoch)
    };
    let before = epoch_now(s.daemon.clone())
        .await
        .ok_or_else(|| not_found(format!("no service {}", req.service)))?;
    s.directory
        .bump_epoch(req.service)
        .await
        .map_err(internal)?;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        if let Some(epoch) = epoch_now(s.daemon.clone()).await.filter(|e| *e != before) {
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

/// The services as the SPM generator sees them: every configured service with the
/// backends that take traffic (resolved, healthy, weighted) as instances.
pub(super) fn spm_services(views: &[api::ServiceView]) -> Vec<crate::spm::Service> {
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

/// The map a query asks for, and the epoch-mismatch reply's body when the client
/// holds a stale epoch.
pub(super) fn spm_answer(
    views: &[api::ServiceView],
    q: &api::SpmQuery,
) -> Result<(crate::spm::Spm, Option<api::EpochMismatch>), ApiError> {
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
            mismatch = Some(api::EpochMismatch {
                error: format!("epoch mismatch for {k}: you hold {held}, the service is at {current}; use the entries below"),
                epoch_mismatch: api::EpochHeld {
                    service: k,
                    held,
                    current,
                },
                map: map.clone(),
            });
        }
    }
    Ok((map, mismatch))
}

pub(super) async fn spm(
    State(s): State<AppState>,
    ApiQuery(q): ApiQuery<api::SpmQuery>,
) -> Result<Response, ApiError> {
    let views = s.daemon.read(|d| d.services()).await.map_err(internal)?;
    let (map, mismatch) = spm_answer(&views, &q)?;
    if let Some(body) = mismatch {
        return Ok((StatusCode::CONFLICT, Json(body)).into_response());
    }
    Ok(Json(map).into_response())
}

/// The map as NDJSON: the current one at once, then each new version as it appears
/// (checked every 100 ms), until the client goes away.
pub(super) async fn spm_watch(
    State(s): State<AppState>,
    ApiQuery(q): ApiQuery<api::SpmQuery>,
) -> Result<Response, ApiError> {
    let views = s.daemon.read(|d| d.services()).await.map_err(internal)?;
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
            let Ok(views) = s.daemon.read(|d| d.services()).await else {
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
