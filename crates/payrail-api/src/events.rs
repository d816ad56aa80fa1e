//! Events, their webhook deliveries and the real-time feed: the merchant's routes (signed) and
//! the operator's (bearer token). docs/webhooks.md describes them for merchants.

use crate::error::ApiError;
use crate::request::{admit_read, idempotent, parse_page, Operator, OperatorAuth, Reply, Signed};
use crate::AppState;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, StreamExt};
use payrail_domain::{EventId, MerchantId};
use payrail_engine::feed::FeedError;
use payrail_engine::webhooks::{attempt_json, delivery_json, WebhookError};
use payrail_store::EventRecord;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::time::Duration;

/// Comment lines on an idle stream, so proxies and clients see it is alive.
pub const STREAM_HEARTBEAT_MS: u64 = 15_000;
/// The reconnection delay the stream suggests to clients (`retry:`).
pub const STREAM_RETRY_MS: u64 = 3_000;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/events", get(list_events))
        .route("/v1/events/stream", get(stream_events))
        .route("/v1/events/{id}", get(get_event))
        .route("/v1/events/{id}/deliveries", get(list_deliveries))
        .route("/v1/events/{id}/resend", post(resend))
        .route("/v1/operator/events/{id}", get(operator_get_event))
        .route(
            "/v1/operator/events/{id}/deliveries",
            get(operator_list_deliveries),
        )
        .route("/v1/operator/events/{id}/resend", post(operator_resend))
}

impl From<WebhookError> for ApiError {
    fn from(e: WebhookError) -> Self {
        match e {
            WebhookError::NotFound => ApiError::not_found("event"),
            WebhookError::UnknownCursor(param) => ApiError::invalid(
                "parameter_invalid",
                format!("{param} must be the id of one of your events"),
            )
            .with_param(param),
            WebhookError::NotDeliverable => ApiError::new(
                StatusCode::CONFLICT,
                "invalid_request_error",
                "event_not_deliverable",
                "the event's object has no notify_url; there is no webhook to re-send",
            ),
            WebhookError::ResendLimit => ApiError::new(
                StatusCode::CONFLICT,
                "invalid_request_error",
                "resend_limit_reached",
                e.to_string(),
            ),
            WebhookError::Engine(e) => e.into(),
        }
    }
}

impl From<FeedError> for ApiError {
    fn from(e: FeedError) -> Self {
        match e {
            FeedError::TooManyForMerchant => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "invalid_request_error",
                "too_many_streams",
                e.to_string(),
            ),
            FeedError::TooMany | FeedError::Closed => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "api_error",
                "stream_unavailable",
                "no event stream can be opened now; retry later",
            ),
        }
    }
}

/// The event as delivered: its stored JSON, byte for byte.
fn event_response(e: &EventRecord) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        e.payload.clone(),
    )
        .into_response()
}

fn event_value(e: &EventRecord) -> Value {
    serde_json::from_str(&e.payload).unwrap_or(Value::Null)
}

fn no_body(body: &[u8]) -> Result<(), ApiError> {
    if body.is_empty() || body == b"{}" {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "parameter_unknown",
            "this endpoint takes no parameters",
        ))
    }
}

fn query_of(s: &Signed) -> Option<String> {
    s.path_and_query.split_once('?').map(|(_, q)| q.to_string())
}

async fn list_events(State(engine): State<AppState>, s: Signed) -> Result<Json<Value>, ApiError> {
    let (limit, after) = parse_page::<EventId>(query_of(&s).as_deref(), "event")?;
    admit_read(&engine, &s).await?;
    let after = after.map(|a| a.to_string());
    let (rows, has_more) = engine
        .list_merchant_events(s.app.merchant_id, limit, after.as_deref())
        .await?;
    let data: Vec<Value> = rows.iter().map(event_value).collect();
    Ok(Json(
        json!({"object": "list", "url": "/v1/events", "has_more": has_more, "data": data}),
    ))
}

async fn get_event(
    State(engine): State<AppState>,
    Path(id): Path<String>,
    s: Signed,
) -> Result<Response, ApiError> {
    admit_read(&engine, &s).await?;
    let e = engine.event(Some(s.app.merchant_id), &id).await?;
    Ok(event_response(&e))
}

async fn deliveries(
    engine: &AppState,
    merchant: Option<MerchantId>,
    id: &str,
    query: Option<&str>,
    url: String,
) -> Result<Json<Value>, ApiError> {
    let (limit, before) = parse_page::<i64>(query, "delivery attempt")?;
    let (delivery, rows, has_more) = engine.event_deliveries(merchant, id, limit, before).await?;
    let data: Vec<Value> = rows.iter().map(attempt_json).collect();
    Ok(Json(json!({
        "object": "list",
        "url": url,
        "has_more": has_more,
        "data": data,
        "delivery": delivery.as_ref().map(delivery_json),
    })))
}

async fn list_deliveries(
    State(engine): State<AppState>,
    Path(id): Path<String>,
    s: Signed,
) -> Result<Json<Value>, ApiError> {
    let query = query_of(&s);
    // Query errors first: a refused request claims no nonce.
    parse_page::<i64>(query.as_deref(), "delivery attempt")?;
    admit_read(&engine, &s).await?;
    let url = format!("/v1/events/{id}/deliveries");
    deliveries(&engine, Some(s.app.merchant_id), &id, query.as_deref(), url).await
}

async fn resend(
    State(engine): State<AppState>,
    Path(id): Path<String>,
    s: Signed,
) -> Result<Response, ApiError> {
    no_body(&s.body)?;
    let merchant = s.app.merchant_id;
    idempotent(&engine, s.mutation(), move |engine, _claim| async move {
        let d = engine.resend_event(Some(merchant), &id).await?;
        Ok(Reply::ok(delivery_json(&d)))
    })
    .await
}

async fn operator_get_event(
    State(engine): State<AppState>,
    _: OperatorAuth,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let e = engine.event(None, &id).await?;
    Ok(event_response(&e))
}

async fn operator_list_deliveries(
    State(engine): State<AppState>,
    _: OperatorAuth,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let url = format!("/v1/operator/events/{id}/deliveries");
    deliveries(&engine, None, &id, q.as_deref(), url).await
}

async fn operator_resend(
    State(engine): State<AppState>,
    Path(id): Path<String>,
    op: Operator,
) -> Result<Response, ApiError> {
    no_body(&op.body)?;
    idempotent(&engine, op.mutation(), move |engine, _claim| async move {
        let d = engine.resend_event(None, &id).await?;
        Ok(Reply::ok(delivery_json(&d)))
    })
    .await
}

/// `GET /v1/events/stream`: the merchant's events as Server-Sent Events. Resumes after the
/// event named by `Last-Event-ID` (what a reconnecting `EventSource` sends), or else by
/// `?after=`; without either it starts after the merchant's latest event.
async fn stream_events(
    State(engine): State<AppState>,
    headers: HeaderMap,
    s: Signed,
) -> Result<Response, ApiError> {
    no_body(&s.body)?;
    let mut after: Option<String> = None;
    for pair in query_of(&s)
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=').unwrap_or((pair, "")) {
            ("after", v) => after = Some(v.to_string()),
            (other, _) => {
                return Err(ApiError::invalid(
                    "parameter_unknown",
                    format!("unknown query parameter {other}"),
                )
                .with_param(other.to_string()))
            }
        }
    }
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_string);
    admit_read(&engine, &s).await?;
    let merchant = s.app.merchant_id;
    let cursor = match (last_event_id, after) {
        (Some(id), _) => engine.event_cursor(merchant, &id, "Last-Event-ID").await?,
        (None, Some(id)) => engine.event_cursor(merchant, &id, "after").await?,
        (None, None) => engine
            .latest_event_seq(merchant)
            .await
            .map_err(ApiError::from)?,
    };
    let feed = engine.feed.open(merchant, cursor)?;
    let hello = Event::default()
        .retry(Duration::from_millis(STREAM_RETRY_MS))
        .comment("connected");
    let events = stream::unfold(feed, move |mut feed| async move {
        match feed.next().await {
            Some(Ok(e)) => {
                let event = Event::default()
                    .id(e.id.as_str())
                    .event(e.event_type.as_str())
                    .data(e.payload.as_str());
                Some((Ok::<_, Infallible>(event), feed))
            }
            Some(Err(err)) => {
                // The client reconnects with its last event id and misses nothing.
                tracing::warn!(merchant_id = %merchant, error = %err, "event stream ended by a storage error");
                None
            }
            None => None,
        }
    });
    let body = stream::once(async move { Ok::<_, Infallible>(hello) }).chain(events);
    Ok(Sse::new(body)
        .keep_alive(
            KeepAlive::new()
                .interval(Duration::from_millis(STREAM_HEARTBEAT_MS))
                .text("heartbeat"),
        )
        .into_response())
}
