//! Channel-facing and channel-management routes:
//! - `POST /v1/channel-notify/{account_id}`: where WeChat Pay, Alipay and UnionPay send their
//!   notifications for an account. Authenticated by the channel's own signature (checked by the
//!   account's connector); answered in the channel's own acknowledgement format.
//! - operator: create, list, enable and disable channel accounts.

use crate::error::ApiError;
use crate::request::{idempotent, parse_json, Operator, OperatorAuth, Reply};
use crate::AppState;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use payrail_channels::InboundNotification;
use payrail_domain::{ChannelAccountId, Secret};
use payrail_engine::channel_accounts::NewChannelAccount;
use payrail_store::{ChannelAccountRecord, ChannelAccountStatus};
use serde::Deserialize;
use serde_json::{json, Value};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/channel-notify/{account_id}", post(channel_notify))
        .route(
            "/v1/operator/channel-accounts",
            post(create_account).get(list_accounts),
        )
        .route("/v1/operator/channel-accounts/{id}", get(get_account))
        .route(
            "/v1/operator/channel-accounts/{id}/disable",
            post(disable_account),
        )
        .route(
            "/v1/operator/channel-accounts/{id}/enable",
            post(enable_account),
        )
}

async fn channel_notify(
    State(engine): State<AppState>,
    Path(account_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let account_id: ChannelAccountId = account_id
        .parse()
        .map_err(|_| ApiError::not_found("channel account"))?;
    let inbound = InboundNotification {
        headers,
        body: body.to_vec(),
        now_ms: engine.now_ms(),
    };
    let (reply, result) = engine
        .handle_channel_notification(account_id, inbound)
        .await?;
    tracing::info!(account = %account_id, result = result.label(), status = reply.status, "channel notification");
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (status, reply.body).into_response();
    if let Some(ct) = reply.content_type {
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    }
    Ok(resp)
}

/// The JSON of an account: its public settings, never its keys.
pub fn account_json(a: &ChannelAccountRecord, public_url: &str) -> Value {
    let config: Value = serde_json::from_str(&a.config).unwrap_or(Value::Null);
    json!({
        "id": a.id.to_string(),
        "object": "channel_account",
        "channel": a.channel,
        "name": a.name,
        "status": a.status.as_str(),
        "priority": a.priority,
        "config": config,
        "notify_url": payrail_engine::channel_accounts::notify_url(public_url, a.id),
        "created": a.created_at_ms.div_euclid(1000),
        "updated": a.updated_at_ms.div_euclid(1000),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateAccountBody {
    channel: String,
    name: String,
    priority: Option<i64>,
    config: Value,
    secrets: Value,
}

async fn create_account(
    State(engine): State<AppState>,
    op: Operator,
) -> Result<Response, ApiError> {
    let b: CreateAccountBody = parse_json(&op.body)?;
    if !b.config.is_object() || !b.secrets.is_object() {
        return Err(ApiError::invalid(
            "parameter_invalid",
            "config and secrets must be JSON objects",
        ));
    }
    let new = NewChannelAccount {
        channel: b.channel,
        name: b.name,
        priority: b.priority.unwrap_or(0),
        config: b.config,
        secrets: Secret::new(b.secrets),
    };
    // The idempotency record stores the response, which never holds the secrets.
    idempotent(&engine, op.mutation(), move |engine, _claim| async move {
        let a = engine.create_channel_account(new).await?;
        Ok(Reply {
            status: StatusCode::CREATED,
            body: account_json(&a, &engine.config.public_url),
            stored_body: None,
            already_stored: false,
        })
    })
    .await
}

async fn list_accounts(
    State(engine): State<AppState>,
    _op: OperatorAuth,
) -> Result<Json<Value>, ApiError> {
    let rows = engine
        .store
        .list_channel_accounts()
        .await
        .map_err(payrail_engine::EngineError::from)?;
    let data: Vec<Value> = rows
        .iter()
        .map(|a| account_json(a, &engine.config.public_url))
        .collect();
    Ok(Json(
        json!({"object": "list", "url": "/v1/operator/channel-accounts", "has_more": false, "data": data}),
    ))
}

fn account_id(id: &str) -> Result<ChannelAccountId, ApiError> {
    id.parse()
        .map_err(|_| ApiError::not_found("channel account"))
}

async fn get_account(
    State(engine): State<AppState>,
    Path(id): Path<String>,
    _op: OperatorAuth,
) -> Result<Json<Value>, ApiError> {
    let a = engine
        .store
        .get_channel_account(account_id(&id)?)
        .await
        .map_err(payrail_engine::EngineError::from)?
        .ok_or_else(|| ApiError::not_found("channel account"))?;
    Ok(Json(account_json(&a, &engine.config.public_url)))
}

async fn set_status(
    engine: AppState,
    op: Operator,
    id: String,
    status: ChannelAccountStatus,
) -> Result<Response, ApiError> {
    if !(op.body.is_empty() || op.body.as_ref() == b"{}") {
        return Err(ApiError::invalid(
            "parameter_unknown",
            "this endpoint takes no parameters",
        ));
    }
    let id = account_id(&id)?;
    idempotent(&engine, op.mutation(), move |engine, _claim| async move {
        let a = engine.set_channel_account_status(id, status).await?;
        Ok(Reply::ok(account_json(&a, &engine.config.public_url)))
    })
    .await
}

async fn disable_account(
    State(engine): State<AppState>,
    Path(id): Path<String>,
    op: Operator,
) -> Result<Response, ApiError> {
    set_status(engine, op, id, ChannelAccountStatus::Disabled).await
}

async fn enable_account(
    State(engine): State<AppState>,
    Path(id): Path<String>,
    op: Operator,
) -> Result<Response, ApiError> {
    set_status(engine, op, id, ChannelAccountStatus::Active).await
}
