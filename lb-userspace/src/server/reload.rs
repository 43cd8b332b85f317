//! Re-reading the config file: SIGHUP and `POST /v1/reload` take this one path, so
//! that a reload does the same whichever way it is asked for.

use axum::{extract::State, Json};
use tracing::{error, info, warn};

use super::{bad, conflict, ApiError, ApiResult, AppState};
use crate::{api, config::Config};

/// Loads the file lbd was started with and applies its services (as `apply -f`
/// does); sections that only a restart can change are named, not applied. A file
/// that does not load or services that are refused change nothing.
pub async fn reload(s: &AppState) -> Result<api::Reloaded, ApiError> {
    let path = s
        .config_path
        .clone()
        .ok_or_else(|| conflict("this lbd was started without a config file: nothing to reload"))?;
    let new = Config::load(&path).map_err(|e| {
        bad(format!(
            "the config file was not reloaded, nothing changed: {e:#}"
        ))
    })?;
    // In a cluster whose services are the directory's, the file's are not applied:
    // they would undo what was set through the API of some node.
    let cluster_owned = s
        .directory
        .with_tables(crate::directory::feed::desired)
        .is_some();
    let file_differs = new.desired != *s.daemon.now().desired;
    let (changes, later) = s.daemon.reload(new, !cluster_owned).await.map_err(|e| {
        bad(format!(
            "the file's services were refused, nothing changed: {e:#}"
        ))
    })?;
    Ok(api::Reloaded {
        file: path.display().to_string(),
        changes,
        services_applied: !cluster_owned,
        services_differ_from_cluster: cluster_owned && file_differs,
        restart_needed: later.iter().map(|s| s.to_string()).collect(),
    })
}

/// SIGHUP: the reload, with its outcome in the log (nobody waits for an answer).
pub async fn on_hangup(s: &AppState) {
    match reload(s).await {
        Ok(r) => {
            info!(file = %r.file, changes = r.changes.len(), "SIGHUP: config file reloaded");
            if r.services_differ_from_cluster {
                warn!(
                    "SIGHUP: the services are the cluster's (set through the API of some node): \
                     the file's services are not applied; use `lbctl apply FILE` to change them everywhere"
                );
            }
            if !r.restart_needed.is_empty() {
                warn!(sections = ?r.restart_needed, "SIGHUP: these sections changed and take effect at the next restart");
            }
        }
        Err(ApiError(_, message)) => error!("SIGHUP: {message}"),
    }
}

pub(super) async fn reload_handler(State(s): State<AppState>) -> ApiResult<api::Reloaded> {
    reload(&s).await.map(Json)
}
