//! `GET /health` and the `store` object of `GET /status`: whether the daemon can take writes.
//! The one state it reports today is the store's: `ok`, or `full` while the state directory's
//! disk has no room (writes refused, nothing new acknowledged, reads served; the store reopens
//! by itself once space returns, see docs/src/reliability.md "Disk full").

use axum::extract::State;
use axum::Json;
use serde::Serialize;

use super::AdminState;
use crate::store::StoreHealth;

/// The store's state.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoreView {
    /// `ok`, or `full` while the disk (quota, file size limit) has no room for the store.
    pub state: &'static str,
    /// The state directory.
    pub path: String,
    /// Unix milliseconds when the current full episode began (only while `full`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_since_ms: Option<u64>,
    /// The error that began it, with the errno (only while `full`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Disk-full episodes since the daemon started.
    pub full_episodes: u64,
    /// Times the store was reopened to recover from one.
    pub reopens: u64,
}

impl StoreView {
    /// The view of `health` for the store in `dir`.
    pub fn new(health: StoreHealth, dir: &std::path::Path) -> Self {
        StoreView {
            state: if health.full.is_some() { "full" } else { "ok" },
            path: dir.display().to_string(),
            full_since_ms: health.full.as_ref().map(|f| f.since_ms),
            error: health.full.map(|f| f.error),
            full_episodes: health.full_episodes,
            reopens: health.reopens,
        }
    }

    pub(super) fn of(state: &AdminState) -> Self {
        StoreView::new(state.store.health(), state.store.dir())
    }
}

/// `GET /health`
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthView {
    /// `ok`, or `degraded` while the store is full (the daemon serves reads and refuses
    /// writes; it recovers by itself).
    pub status: &'static str,
    /// The store's state.
    pub store: StoreView,
}

/// `GET /health`: answers 200 while the daemon serves requests; `status` says whether it
/// takes writes.
#[utoipa::path(get, path = "/health", responses((status = 200, body = HealthView)))]
pub async fn get_health(State(state): State<AdminState>) -> Json<HealthView> {
    let store = StoreView::of(&state);
    Json(HealthView {
        status: if store.state == "ok" {
            "ok"
        } else {
            "degraded"
        },
        store,
    })
}
