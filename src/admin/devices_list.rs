//! `GET /devices`: `$filter`, `$orderby`, `maxpagesize` and `nextLink` (seed 001 conventions;
//! the parameters are also accepted without `$`).
//!
//! Paging is by key, not by offset: the `$skiptoken` of a `nextLink` carries the sort value
//! and id of the last device of the page, and the next page starts after that pair. Devices
//! added or removed while a client walks the pages therefore never shift the others: every
//! device present for the whole walk is listed exactly once. In the default order (`id asc`)
//! a page reads only its own records from the store (a range scan from the last id); any
//! other order scans every device, which is what a sort needs.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::Json;
use base64::Engine as _;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::error::ApiErrorBody;
use super::filter::{self, Fields, Filter, OrderBy, Value};
use super::view::DeviceView;
use super::AdminState;

/// Default page size.
pub const DEFAULT_PAGE: usize = 25;
/// Largest page size.
pub const MAX_PAGE: usize = 100;

/// A page of a list: `{"value":[...],"nextLink"?}`.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Page<T> {
    /// The items.
    pub value: Vec<T>,
    /// The URL (path and query) of the next page, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_link: Option<String>,
}

/// Where the previous page ended.
#[derive(Debug, Serialize, Deserialize)]
struct Cursor {
    /// The order the token was made for (`field asc|desc`).
    o: String,
    /// Sort value of the last item (`null`, a bool or a string).
    k: serde_json::Value,
    /// Id of the last item.
    id: String,
}

fn key_json(v: &Value<'_>) -> serde_json::Value {
    match v {
        Value::Null => serde_json::Value::Null,
        Value::Bool(b) => serde_json::Value::Bool(*b),
        Value::Str(s) => serde_json::Value::String(s.to_string()),
    }
}

fn key_value(v: &serde_json::Value) -> Option<Value<'_>> {
    match v {
        serde_json::Value::Null => Some(Value::Null),
        serde_json::Value::Bool(b) => Some(Value::Bool(*b)),
        serde_json::Value::String(s) => Some(Value::Str(s.as_str().into())),
        _ => None,
    }
}

fn order_name(o: OrderBy) -> String {
    format!("{} {}", o.field.name(), if o.desc { "desc" } else { "asc" })
}

/// The parsed query of a list request.
#[derive(Debug)]
pub struct ListQuery {
    /// `$filter`
    pub filter: Option<(String, Filter)>,
    /// `$orderby`
    pub order: OrderBy,
    /// `maxpagesize`
    pub page: usize,
    cursor: Option<Cursor>,
}

fn param<'a>(q: &'a HashMap<String, String>, name: &str) -> Option<&'a str> {
    q.get(&format!("${name}"))
        .or_else(|| q.get(name))
        .map(String::as_str)
}

impl ListQuery {
    /// From the query parameters; 400 naming what is wrong.
    pub fn parse(q: &HashMap<String, String>) -> Result<Self, ApiError> {
        let filter = match param(q, "filter") {
            Some(text) if !text.trim().is_empty() => {
                let f = filter::parse(text)
                    .map_err(|e| ApiError::bad_request("InvalidFilter", e.to_string()))?;
                Some((text.to_string(), f))
            }
            _ => None,
        };
        let order = match param(q, "orderby") {
            Some(text) if !text.trim().is_empty() => filter::parse_orderby(text).map_err(|e| {
                ApiError::bad_request(
                    "InvalidOrderBy",
                    format!(
                        "{} (near {:?} at position {})",
                        e.message, e.token, e.position
                    ),
                )
            })?,
            _ => OrderBy::default(),
        };
        let page = match param(q, "maxpagesize") {
            None => DEFAULT_PAGE,
            Some(text) => match text.parse::<usize>() {
                Ok(n) if (1..=MAX_PAGE).contains(&n) => n,
                _ => {
                    return Err(ApiError::bad_request(
                        "InvalidPageSize",
                        format!("maxpagesize: {text:?} is not a number from 1 to {MAX_PAGE}"),
                    ))
                }
            },
        };
        let cursor = match param(q, "skiptoken") {
            None => None,
            Some(token) => {
                let bad = || {
                    ApiError::bad_request(
                        "InvalidSkipToken",
                        "$skiptoken is not one this gateway made; start again from the first page",
                    )
                };
                let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(token)
                    .map_err(|_| bad())?;
                let c: Cursor = serde_json::from_slice(&bytes).map_err(|_| bad())?;
                if c.o != order_name(order) || key_value(&c.k).is_none() {
                    return Err(bad());
                }
                Some(c)
            }
        };
        Ok(ListQuery {
            filter,
            order,
            page,
            cursor,
        })
    }

    fn passes(&self, v: &impl Fields) -> bool {
        self.filter.as_ref().is_none_or(|(_, f)| f.matches(v))
    }

    /// Whether `(key, id)` comes after the cursor in this order.
    fn after_cursor(&self, key: &Value<'_>, id: &str) -> bool {
        let Some(c) = &self.cursor else {
            return true;
        };
        let Some(ck) = key_value(&c.k) else {
            return true;
        };
        let ord = key.cmp(&ck);
        let ord = if self.order.desc { ord.reverse() } else { ord };
        ord.then_with(|| id.cmp(c.id.as_str())).is_gt()
    }

    fn next_link(
        &self,
        path: &str,
        with_filter: bool,
        last_key: &Value<'_>,
        last_id: &str,
    ) -> String {
        let cursor = Cursor {
            o: order_name(self.order),
            k: key_json(last_key),
            id: last_id.to_string(),
        };
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(&cursor).unwrap_or_default());
        let enc = |s: &str| utf8_percent_encode(s, NON_ALPHANUMERIC).to_string();
        let mut link = format!("{path}?maxpagesize={}", self.page);
        if let Some((text, _)) = self.filter.as_ref().filter(|_| with_filter) {
            link.push_str(&format!("&%24filter={}", enc(text)));
        }
        if self.order != OrderBy::default() {
            link.push_str(&format!("&%24orderby={}", enc(&order_name(self.order))));
        }
        link.push_str(&format!("&%24skiptoken={token}"));
        link
    }
}

/// One page of the devices `q` selects, from the store.
pub fn page_of_devices(state: &AdminState, q: &ListQuery) -> Result<Page<DeviceView>, ApiError> {
    page_at(state, q, "/devices", true)
}

/// One page for the list at `path`; `filter_in_link`: whether the next link repeats the
/// filter (a device group's filter is the group's, not the query's).
pub fn page_at(
    state: &AdminState,
    q: &ListQuery,
    path: &str,
    filter_in_link: bool,
) -> Result<Page<DeviceView>, ApiError> {
    let field = q.order.field;
    let mut value = Vec::with_capacity(q.page + 1);
    if q.order == OrderBy::default() {
        // Id order is the store's order: read from the cursor on, stop after one page.
        let after = q.cursor.as_ref().map(|c| c.id.as_str());
        for rec in state.store.devices_after(after) {
            let rec = rec?;
            let view = DeviceView::new(&rec, state.connection(rec.id.as_str()));
            if q.passes(&view) {
                value.push(view);
                if value.len() > q.page {
                    break;
                }
            }
        }
    } else {
        for rec in state.store.devices() {
            let rec = rec?;
            let view = DeviceView::new(&rec, None);
            if q.passes(&view) && q.after_cursor(&view.field(field), &view.id) {
                value.push(view);
            }
        }
        value.sort_by(|a, b| {
            let o = a.field(field).cmp(&b.field(field));
            let o = if q.order.desc { o.reverse() } else { o };
            o.then_with(|| a.id.cmp(&b.id))
        });
        value.truncate(q.page + 1);
        for v in &mut value {
            v.connection = state.connection(&v.id).map(Into::into);
        }
    }
    let next_link = if value.len() > q.page {
        value.truncate(q.page);
        value
            .last()
            .map(|last| q.next_link(path, filter_in_link, &last.field(field), &last.id))
    } else {
        None
    };
    Ok(Page { value, next_link })
}

/// `GET /devices`
#[utoipa::path(get, path = "/devices", params(("$filter" = Option<String>, Query, description = "filter expression"), ("$orderby" = Option<String>, Query, description = "field asc|desc"), ("maxpagesize" = Option<u32>, Query, description = "1..100, default 25"), ("$skiptoken" = Option<String>, Query, description = "continuation from nextLink")), responses((status = 200, body = Page<DeviceView>), (status = 400, body = ApiErrorBody)))]
pub async fn list_devices(
    State(state): State<AdminState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Page<DeviceView>>, ApiError> {
    let q = ListQuery::parse(&q)?;
    // Scanning and decoding records is blocking store work.
    let page = tokio::task::spawn_blocking(move || page_of_devices(&state, &q))
        .await
        .map_err(|e| ApiError::internal("listing devices", &e))??;
    Ok(Json(page))
}
