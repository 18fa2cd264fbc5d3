//! What the emulators' inspection APIs share: the error answer (`{"error": "..."}`, 400) and
//! the `/faults` routes (`GET`, `POST`, `DELETE`), which act on the shared [`Faults`] and on
//! the one request rate each emulator lets a fault change (AWS: the provisioning APIs', Azure:
//! DPS's). Each emulator's `api` module keeps its own routes and documents.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, MethodRouter};
use axum::Json;
use serde_json::json;

use crate::emulator::faults::{FaultView, Faults};

/// An emulator's API state as the `/faults` routes see it.
pub trait FaultTarget: Clone + Send + Sync + 'static {
    /// The emulator's faults.
    fn faults(&self) -> &Faults;
    /// The request rate limit in force (`None` = unlimited).
    fn tps(&self) -> Option<f64>;
    /// Sets the request rate limit (`None` or 0 = unlimited).
    fn set_tps(&self, tps: Option<f64>);
    /// The `--tps` the emulator started with (restored by `DELETE /faults`).
    fn default_tps(&self) -> Option<f64>;
}

/// `GET /faults` (the faults in force), `POST /faults` (a [`FaultRequest`] applied, then the
/// faults in force) and `DELETE /faults` (every fault cleared, the rate back to `--tps`).
///
/// [`FaultRequest`]: crate::emulator::faults::FaultRequest
pub fn fault_routes<S: FaultTarget>() -> MethodRouter<S> {
    get(get_faults::<S>)
        .post(post_faults::<S>)
        .delete(delete_faults::<S>)
}

/// A 400 answer `{"error": message}`.
pub fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({ "error": message }))).into_response()
}

fn fault_view<S: FaultTarget>(s: &S) -> FaultView {
    s.faults().view_with(s.tps())
}

async fn get_faults<S: FaultTarget>(State(s): State<S>) -> Response {
    Json(fault_view(&s)).into_response()
}

async fn post_faults<S: FaultTarget>(State(s): State<S>, body: axum::body::Bytes) -> Response {
    match s.faults().post(&body, |tps| s.set_tps(Some(tps))) {
        Ok(()) => Json(fault_view(&s)).into_response(),
        Err(message) => bad_request(message),
    }
}

async fn delete_faults<S: FaultTarget>(State(s): State<S>) -> Response {
    s.faults().clear();
    s.set_tps(s.default_tps());
    Json(fault_view(&s)).into_response()
}
