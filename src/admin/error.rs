//! The one error shape of the admin API, `{"error":{"code","message","requestId"}}`, and the
//! request id every response carries in `x-ms-request-id` (the IoT Hub convention, see
//! docs/architecture.md "Admin API").
//!
//! Handlers return [`ApiError`]; it travels as a response extension without a body, and the
//! outermost middleware ([`request_id`]) writes the body once it knows the request id. The same
//! middleware turns the framework's own refusals (unknown route, wrong method, oversize body)
//! into the same shape, so a client never has to parse two kinds of error.

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Response header holding the request id (equal to `error.requestId` in error bodies).
pub const REQUEST_ID_HEADER: &str = "x-ms-request-id";

/// Largest request body the API reads.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// An API error: HTTP status, a machine-readable code and a message that says what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Machine-readable code, e.g. `DeviceNotFound`.
    pub code: &'static str,
    /// What was wrong and what to do.
    pub message: String,
}

impl ApiError {
    /// An error with `status`, `code` and `message`.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400 `BadRequest`-style errors with a specific code.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 404 for an unknown resource id.
    pub fn not_found(what: &str, id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("no {what} with id {id:?}; list them to see which exist"),
        )
    }

    /// 409: the resource is not in a state that allows the action.
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    /// 412: an `If-Match`/`If-None-Match` condition failed.
    pub fn precondition_failed(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::PRECONDITION_FAILED,
            "PreconditionFailed",
            message,
        )
    }

    /// 403: the caller may not do this.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "Forbidden", message)
    }

    /// 500 from a store failure; the cause goes to the log, not to the client.
    pub fn internal(context: &str, e: &dyn std::fmt::Display) -> Self {
        tracing::error!("admin API: {context}: {e}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            format!("{context} failed; see the gateway's log"),
        )
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        if e.is_full() {
            tracing::warn!("admin API: write refused: {e}");
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "StoreFull",
                "the gateway's disk is full: writes are refused until space returns (the gateway resumes by itself; see GET /health); retry later",
            );
        }
        ApiError::internal("the state store", &e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = self.status.into_response();
        resp.extensions_mut().insert(self);
        resp
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorFields<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ErrorFields<'a> {
    code: &'a str,
    message: &'a str,
    request_id: &'a str,
}

/// The error body, for the API description (`{"error":{"code","message","requestId"}}`).
#[derive(Serialize, utoipa::ToSchema)]
pub struct ApiErrorBody {
    /// The error.
    pub error: ApiErrorFields,
}

/// Fields of [`ApiErrorBody`].
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiErrorFields {
    /// Machine-readable code.
    pub code: String,
    /// What was wrong and what to do.
    pub message: String,
    /// Equal to the `x-ms-request-id` header.
    pub request_id: String,
}

/// A fresh request id: 128 random bits in hex.
pub fn new_request_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// The id of the request being handled (a request extension set by [`request_id`]).
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

/// Outermost middleware: gives the request an id, and the response the id header and, for
/// every error, the JSON error body.
pub async fn request_id(mut req: Request, next: Next) -> Response {
    let id = new_request_id();
    req.extensions_mut().insert(RequestId(id.clone()));
    let resp = next.run(req).await;
    finish(resp, &id)
}

/// Sets the request id header; renders an [`ApiError`] extension, or any other 4xx/5xx the
/// framework produced, as the JSON error body.
pub fn finish(resp: Response, id: &str) -> Response {
    let status = resp.status();
    let mut resp = match resp.extensions().get::<ApiError>().cloned() {
        Some(e) => error_response(&e, id, resp),
        None if status.is_client_error() || status.is_server_error() => {
            let e = framework_error(status);
            error_response(&e, id, resp)
        }
        None => resp,
    };
    if let Ok(v) = HeaderValue::from_str(id) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    resp
}

fn error_response(e: &ApiError, id: &str, original: Response) -> Response {
    let body = serde_json::to_vec(&ErrorBody {
        error: ErrorFields {
            code: e.code,
            message: &e.message,
            request_id: id,
        },
    })
    .unwrap_or_default();
    let (mut parts, _) = original.into_parts();
    parts.status = e.status;
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::from(body))
}

/// The error for a refusal the framework made before any handler ran.
fn framework_error(status: StatusCode) -> ApiError {
    let (code, message) = match status {
        StatusCode::NOT_FOUND => (
            "NotFound",
            "no such resource; GET /openapi.json lists the API's paths",
        ),
        StatusCode::METHOD_NOT_ALLOWED => (
            "MethodNotAllowed",
            "this resource does not take that method",
        ),
        StatusCode::PAYLOAD_TOO_LARGE => ("PayloadTooLarge", "the request body is over 1 MiB"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (
            "UnsupportedMediaType",
            "send the body as Content-Type: application/json",
        ),
        StatusCode::BAD_REQUEST => ("BadRequest", "the request is malformed"),
        _ => ("Error", "the request failed"),
    };
    ApiError::new(status, code, message)
}

/// A JSON request body: `Content-Type: application/json` (else 415), at most
/// [`MAX_BODY_BYTES`] (else 413), and a value of `T` (else 400 naming the field).
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                "send the body as Content-Type: application/json",
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            let status = e.status();
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(status, "PayloadTooLarge", "the request body is over 1 MiB")
            } else {
                ApiError::bad_request("BadRequest", format!("reading the body: {e}"))
            }
        })?;
        let de = &mut serde_json::Deserializer::from_slice(&bytes);
        serde_path_to_error::deserialize(de)
            .map(JsonBody)
            .map_err(|e| {
                ApiError::bad_request("InvalidBody", format!("the JSON body is invalid: {e}"))
            })
    }
}
