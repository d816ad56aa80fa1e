//! Refunds: the merchant API (`/v1/refunds…`, signed) and the operator's refund routes.

use crate::error::ApiError;
use crate::request::{
    admit_read, idempotent, idempotent_deferred, parse_json, parse_page, Answer, Operator,
    OperatorAuth, Reply, Signed,
};
use crate::AppState;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use payrail_domain::input::{Metadata, NotifyUrl, OutRefundNo, RefundReason};
use payrail_domain::{Currency, Money, PaymentId, RefundId};
use payrail_engine::payments::IdemRef;
use payrail_engine::refunds::{CreateRefund, CreateRefundResult};
use payrail_engine::views::refund_json;
use payrail_store::RefundRecord;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/refunds", post(create_refund).get(list_refunds))
        .route("/v1/refunds/{id}", get(get_refund))
        .route(
            "/v1/refunds/out_refund_no/{out_refund_no}",
            get(get_by_out_refund_no),
        )
        .route("/v1/operator/refunds/{id}", get(operator_get_refund))
        .route("/v1/operator/refunds/{id}/requery", post(requery))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRefundBody {
    payment_id: String,
    amount: i64,
    currency: Option<String>,
    out_refund_no: String,
    reason: Option<String>,
    notify_url: Option<String>,
    metadata: Option<BTreeMap<String, String>>,
}

/// Pure validation: a bad request is refused here, before anything is written.
fn validate_create(body: &[u8]) -> Result<CreateRefund, ApiError> {
    let b: CreateRefundBody = parse_json(body)?;
    let payment_id = b.payment_id.parse::<PaymentId>().map_err(|_| {
        ApiError::invalid(
            "parameter_invalid",
            "payment_id must be a payment id (pay_…)",
        )
        .with_param("payment_id")
    })?;
    if !(1..=Money::MAX_PAYMENT_MINOR).contains(&b.amount) {
        return Err(ApiError::invalid(
            "amount_invalid",
            format!(
                "amount must be an integer number of minor units from 1 to {}",
                Money::MAX_PAYMENT_MINOR
            ),
        )
        .with_param("amount"));
    }
    let currency = b
        .currency
        .as_deref()
        .map(|c| {
            Currency::parse(c).map_err(|e| {
                ApiError::invalid("currency_invalid", e.to_string()).with_param("currency")
            })
        })
        .transpose()?;
    Ok(CreateRefund {
        payment_id,
        amount_minor: b.amount,
        currency,
        out_refund_no: OutRefundNo::parse(&b.out_refund_no)?,
        reason: b.reason.as_deref().map(RefundReason::parse).transpose()?,
        notify_url: b.notify_url.as_deref().map(NotifyUrl::parse).transpose()?,
        metadata: Metadata::parse(b.metadata.unwrap_or_default())?,
    })
}

async fn create_refund(State(engine): State<AppState>, s: Signed) -> Result<Response, ApiError> {
    let input = validate_create(&s.body)?;
    // The nonce and key are claimed in the same write as the refund and its reservation.
    idempotent_deferred(&engine, s.mutation(), move |engine, claim| async move {
        let res = engine
            .create_refund(
                &s.app,
                input,
                Some(IdemRef {
                    key: &claim.key,
                    request_hash: &claim.request_hash,
                    token: &claim.token,
                }),
                claim.admission,
            )
            .await?;
        match res {
            CreateRefundResult::Refused(outcome) => Ok(Answer::Refused(outcome)),
            CreateRefundResult::Done(res) => {
                let mut reply = Reply::ok(refund_json(&res.refund));
                reply.already_stored = res.idempotency_completed;
                Ok(Answer::Reply(reply))
            }
        }
    })
    .await
}

fn parse_refund_id(id: &str) -> Result<RefundId, ApiError> {
    // An id of the wrong shape cannot exist: same answer as a missing one.
    id.parse().map_err(|_| ApiError::not_found("refund"))
}

async fn get_refund(
    State(engine): State<AppState>,
    Path(id): Path<String>,
    s: Signed,
) -> Result<Json<Value>, ApiError> {
    admit_read(&engine, &s).await?;
    let r = engine.get_refund(&s.app, parse_refund_id(&id)?).await?;
    Ok(Json(refund_json(&r)))
}

async fn get_by_out_refund_no(
    State(engine): State<AppState>,
    Path(no): Path<String>,
    s: Signed,
) -> Result<Json<Value>, ApiError> {
    admit_read(&engine, &s).await?;
    let no = OutRefundNo::parse(&no).map_err(|_| ApiError::not_found("refund"))?;
    let r = engine.get_refund_by_out_refund_no(&s.app, &no).await?;
    Ok(Json(refund_json(&r)))
}

/// Splits `payment_id=…` off a list query; the rest goes to [`parse_page`].
fn split_payment_id(query: Option<&str>) -> Result<(Option<PaymentId>, String), ApiError> {
    let mut payment_id = None;
    let mut rest = Vec::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("payment_id", v)) => {
                if payment_id.is_some() {
                    return Err(ApiError::invalid(
                        "parameter_invalid",
                        "payment_id may be given once",
                    )
                    .with_param("payment_id"));
                }
                payment_id = Some(v.parse::<PaymentId>().map_err(|_| {
                    ApiError::invalid("parameter_invalid", "payment_id must be a payment id")
                        .with_param("payment_id")
                })?);
            }
            _ => rest.push(pair),
        }
    }
    Ok((payment_id, rest.join("&")))
}

async fn list_refunds(State(engine): State<AppState>, s: Signed) -> Result<Json<Value>, ApiError> {
    let query = s.path_and_query.split_once('?').map(|(_, q)| q.to_string());
    let (payment_id, rest) = split_payment_id(query.as_deref())?;
    let (limit, after) = parse_page::<RefundId>(Some(&rest), "refund")?;
    admit_read(&engine, &s).await?;
    let (rows, has_more) = engine
        .list_refunds(&s.app, payment_id, limit, after)
        .await?;
    let data: Vec<_> = rows.iter().map(refund_json).collect();
    Ok(Json(
        json!({"object": "list", "url": "/v1/refunds", "has_more": has_more, "data": data}),
    ))
}

fn operator_view(r: &RefundRecord) -> Value {
    let mut v = refund_json(r);
    v["version"] = json!(r.version);
    v["attempt_id"] = json!(r.attempt_id);
    v["requested_at"] = json!(r.requested_at_ms.div_euclid(1000));
    v
}

async fn operator_get_refund(
    State(engine): State<AppState>,
    _: OperatorAuth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_refund_id(&id)?;
    let r = engine
        .store
        .get_refund_any(id)
        .await
        .map_err(payrail_engine::EngineError::from)?
        .ok_or(ApiError::not_found("refund"))?;
    Ok(Json(operator_view(&r)))
}

async fn requery(
    State(engine): State<AppState>,
    Path(id): Path<String>,
    op: Operator,
) -> Result<Response, ApiError> {
    if !(op.body.is_empty() || op.body.as_ref() == b"{}") {
        return Err(ApiError::invalid(
            "parameter_unknown",
            "this endpoint takes no parameters",
        ));
    }
    let id = parse_refund_id(&id)?;
    idempotent(&engine, op.mutation(), move |engine, _claim| async move {
        let r = engine.requery_refund(id).await?;
        Ok(Reply::ok(operator_view(&r)))
    })
    .await
}
