//! Operator API: merchants, apps, re-query, alerts. Bearer-token authenticated.

use crate::error::ApiError;
use crate::request::{idempotent, parse_json, parse_page, Operator, OperatorAuth, Reply};
use crate::AppState;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use payrail_domain::input::MerchantName;
use payrail_domain::{MerchantId, PaymentId};
use payrail_engine::views::{merchant_json, payment_json};
use payrail_store::MerchantStatus;
use serde::Deserialize;
use serde_json::{json, Value};

pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/operator/merchants",
            post(create_merchant).get(list_merchants),
        )
        .route("/v1/operator/merchants/{id}", get(get_merchant))
        .route("/v1/operator/merchants/{id}/freeze", post(freeze))
        .route("/v1/operator/merchants/{id}/unfreeze", post(unfreeze))
        .route(
            "/v1/operator/merchants/{id}/apps",
            post(create_app).get(list_apps),
        )
        .route("/v1/operator/payments/{id}", get(get_payment))
        .route("/v1/operator/payments/{id}/requery", post(requery))
        .route("/v1/operator/payments/requery", post(requery_batch))
        .route("/v1/operator/alerts", get(list_alerts))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameBody {
    name: String,
}

fn merchant_id(id: &str) -> Result<MerchantId, ApiError> {
    id.parse().map_err(|_| ApiError::not_found("merchant"))
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

async fn create_merchant(
    State(engine): State<AppState>,
    op: Operator,
) -> Result<Response, ApiError> {
    let b: NameBody = parse_json(&op.body)?;
    let name = MerchantName::parse(&b.name)?;
    idempotent(&engine, op.mutation(), move |engine, _claim| async move {
        let m = engine.create_merchant(name).await?;
        Ok(Reply {
            status: StatusCode::CREATED,
            body: merchant_json(&m),
            stored_body: None,
            already_stored: false,
        })
    })
    .await
}

async fn list_merchants(
    State(engine): State<AppState>,
    _: OperatorAuth,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let (limit, after) = parse_page::<MerchantId>(q.as_deref(), "merchant")?;
    let mut rows = engine
        .store
        .list_merchants(limit + 1, after)
        .await
        .map_err(payrail_engine::EngineError::from)?;
    let has_more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let data: Vec<Value> = rows.iter().map(merchant_json).collect();
    Ok(Json(
        json!({"object": "list", "url": "/v1/operator/merchants", "has_more": has_more, "data": data}),
    ))
}

async fn get_merchant(
    State(engine): State<AppState>,
    _: OperatorAuth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let m = engine.get_merchant(merchant_id(&id)?).await?;
    Ok(Json(merchant_json(&m)))
}

async fn set_status(
    engine: AppState,
    op: Operator,
    id: String,
    status: MerchantStatus,
) -> Result<Response, ApiError> {
    no_body(&op.body)?;
    let id = merchant_id(&id)?;
    idempotent(&engine, op.mutation(), move |engine, _claim| async move {
        let m = engine.set_merchant_status(id, status).await?;
        Ok(Reply::ok(merchant_json(&m)))
    })
    .await
}

async fn freeze(
    State(engine): State<AppState>,
    Path(id): Path<String>,
    op: Operator,
) -> Result<Response, ApiError> {
    set_status(engine, op, id, MerchantStatus::Frozen).await
}

async fn unfreeze(
    State(engine): State<AppState>,
    Path(id): Path<String>,
    op: Operator,
) -> Result<Response, ApiError> {
    set_status(engine, op, id, MerchantStatus::Active).await
}

async fn create_app(
    State(engine): State<AppState>,
    Path(id): Path<String>,
    op: Operator,
) -> Result<Response, ApiError> {
    let b: NameBody = parse_json(&op.body)?;
    let name = MerchantName::parse(&b.name)?;
    let id = merchant_id(&id)?;
    idempotent(&engine, op.mutation(), move |engine, _claim| async move {
        let creds = engine.create_app(id, name).await?;
        let body = |secret: Value| {
            json!({
                "id": creds.app.id,
                "object": "app",
                "merchant_id": creds.app.merchant_id,
                "name": creds.app.name,
                "key_id": creds.app.key_id,
                "secret": secret,
                "created": creds.app.created_at_ms / 1000,
            })
        };
        // The secret is shown in this response only; a replay gets null, never the secret.
        Ok(Reply {
            status: StatusCode::CREATED,
            body: body(Value::String(creds.secret.expose().clone())),
            stored_body: Some(body(Value::Null)),
            already_stored: false,
        })
    })
    .await
}

async fn list_apps(
    State(engine): State<AppState>,
    _: OperatorAuth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = merchant_id(&id)?;
    engine.get_merchant(id).await?;
    let apps = engine
        .store
        .list_apps(id)
        .await
        .map_err(payrail_engine::EngineError::from)?;
    let data: Vec<Value> = apps
        .iter()
        .map(|a| json!({"id": a.id, "object": "app", "merchant_id": a.merchant_id, "name": a.name, "key_id": a.key_id, "created": a.created_at_ms / 1000}))
        .collect();
    Ok(Json(
        json!({"object": "list", "has_more": false, "data": data}),
    ))
}

fn payment_id(id: &str) -> Result<PaymentId, ApiError> {
    id.parse().map_err(|_| ApiError::not_found("payment"))
}

async fn get_payment(
    State(engine): State<AppState>,
    _: OperatorAuth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = payment_id(&id)?;
    let p = engine
        .store
        .get_payment_any(id)
        .await
        .map_err(payrail_engine::EngineError::from)?
        .ok_or(ApiError::not_found("payment"))?;
    let attempts = engine
        .store
        .get_attempts(id)
        .await
        .map_err(payrail_engine::EngineError::from)?;
    let mut v = payment_json(&p, None);
    v["attempts"] = attempts
        .iter()
        .map(|a| {
            json!({"id": a.id, "channel": a.channel, "status": a.status, "version": a.version,
                   "channel_trade_no": a.channel_trade_no, "failure_code": a.failure_code,
                   "created": a.created_at_ms / 1000, "updated": a.updated_at_ms / 1000})
        })
        .collect();
    v["version"] = json!(p.version);
    Ok(Json(v))
}

async fn requery(
    State(engine): State<AppState>,
    Path(id): Path<String>,
    op: Operator,
) -> Result<Response, ApiError> {
    no_body(&op.body)?;
    let id = payment_id(&id)?;
    idempotent(&engine, op.mutation(), move |engine, _claim| async move {
        let p = engine.requery_payment(id).await?;
        Ok(Reply::ok(payment_json(&p, None)))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RequeryBatchBody {
    payment_ids: Option<Vec<String>>,
    open: Option<bool>,
    limit: Option<u32>,
}

/// Re-queries the payments named, or the open ones (`"open": true`), at most 1000.
async fn requery_batch(State(engine): State<AppState>, op: Operator) -> Result<Response, ApiError> {
    let b: RequeryBatchBody = parse_json(&op.body)?;
    let max = payrail_engine::payments::REQUERY_BATCH_MAX;
    let limit = b.limit.map_or(100, |l| l as usize);
    if limit == 0 || limit > max {
        return Err(ApiError::invalid(
            "parameter_out_of_range",
            format!("limit must be between 1 and {max}"),
        )
        .with_param("limit"));
    }
    let ids = match (b.payment_ids, b.open.unwrap_or(false)) {
        (Some(ids), false) if !ids.is_empty() && ids.len() <= max => ids
            .iter()
            .map(|s| {
                s.parse::<PaymentId>().map_err(|_| {
                    ApiError::invalid("parameter_invalid", format!("{s:?} is not a payment id"))
                        .with_param("payment_ids")
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
        (None, true) => Vec::new(),
        _ => {
            return Err(ApiError::invalid(
                "parameter_invalid",
                format!("send either payment_ids (1-{max} ids) or \"open\": true"),
            ))
        }
    };
    let open = ids.is_empty();
    idempotent(&engine, op.mutation(), move |engine, _claim| async move {
        let ids = if open {
            engine.open_payment_ids(limit).await?
        } else {
            ids
        };
        let results = engine.requery_batch(ids, |_| {}).await;
        let data: Vec<Value> = results
            .iter()
            .map(|(id, r)| match r {
                Ok(p) => json!({"id": id.to_string(), "status": p.status.as_str(), "error": null}),
                Err(e) => json!({"id": id.to_string(), "status": null, "error": error_code(e)}),
            })
            .collect();
        Ok(Reply::ok(json!({"object": "list", "data": data})))
    })
    .await
}

/// A stable code for one failed re-query in a batch answer.
fn error_code(e: &payrail_engine::EngineError) -> &'static str {
    use payrail_engine::EngineError as E;
    match e {
        E::NotFound(_) => "not_found",
        E::ChannelBusy(_) => "channel_busy",
        E::ChannelUnconfirmed(_) => "channel_unconfirmed",
        _ => "internal_error",
    }
}

async fn list_alerts(
    State(engine): State<AppState>,
    _: OperatorAuth,
) -> Result<Json<Value>, ApiError> {
    let alerts = engine
        .store
        .list_alerts(100)
        .await
        .map_err(payrail_engine::EngineError::from)?;
    let data: Vec<Value> = alerts
        .iter()
        .map(|a| json!({"kind": a.kind, "subject_id": a.subject_id, "detail": a.detail, "created": a.created_at_ms / 1000}))
        .collect();
    Ok(Json(
        json!({"object": "list", "has_more": false, "data": data}),
    ))
}
