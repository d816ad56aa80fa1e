//! Payouts: the merchant API (`/v1/payouts…`, signed) and the operator's payout views.

use crate::error::ApiError;
use crate::request::{
    admit_read, idempotent_deferred, parse_json, parse_page, Answer, OperatorAuth, Reply, Signed,
};
use crate::AppState;
use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use payrail_domain::input::{NotifyUrl, OutPayoutNo, PayoutDescription};
use payrail_domain::{Currency, MerchantId, Money, PayoutId, PayoutStatus};
use payrail_engine::payments::IdemRef;
use payrail_engine::payouts::{CreatePayout, CreatePayoutResult};
use payrail_engine::views::payout_json;
use payrail_store::{PayoutFilter, PayoutRecord};
use serde::Deserialize;
use serde_json::{json, Value};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/payouts", post(create_payout).get(list_payouts))
        .route("/v1/payouts/{id}", get(get_payout))
        .route(
            "/v1/payouts/out_payout_no/{out_payout_no}",
            get(get_by_out_payout_no),
        )
        .route("/v1/operator/payouts", get(operator_list_payouts))
        .route("/v1/operator/payouts/{id}", get(operator_get_payout))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreatePayoutBody {
    amount: i64,
    currency: String,
    out_payout_no: String,
    description: Option<String>,
    notify_url: Option<String>,
}

/// Pure validation: a bad request is refused here, before anything is written.
fn validate_create(body: &[u8]) -> Result<CreatePayout, ApiError> {
    let b: CreatePayoutBody = parse_json(body)?;
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
    let currency = Currency::parse(&b.currency)
        .map_err(|e| ApiError::invalid("currency_invalid", e.to_string()).with_param("currency"))?;
    Ok(CreatePayout {
        amount_minor: b.amount,
        currency,
        out_payout_no: OutPayoutNo::parse(&b.out_payout_no)?,
        description: b
            .description
            .as_deref()
            .map(PayoutDescription::parse)
            .transpose()?,
        notify_url: b.notify_url.as_deref().map(NotifyUrl::parse).transpose()?,
    })
}

async fn create_payout(State(engine): State<AppState>, s: Signed) -> Result<Response, ApiError> {
    let input = validate_create(&s.body)?;
    // The nonce and key are claimed in the same write as the payout and its ledger entry.
    idempotent_deferred(&engine, s.mutation(), move |engine, claim| async move {
        let res = engine
            .create_payout(
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
            CreatePayoutResult::Refused(outcome) => Ok(Answer::Refused(outcome)),
            CreatePayoutResult::Done(res) => {
                let mut reply = Reply::ok(payout_json(&res.payout));
                reply.already_stored = res.idempotency_completed;
                Ok(Answer::Reply(reply))
            }
        }
    })
    .await
}

fn parse_payout_id(id: &str) -> Result<PayoutId, ApiError> {
    // An id of the wrong shape cannot exist: same answer as a missing one.
    id.parse().map_err(|_| ApiError::not_found("payout"))
}

async fn get_payout(
    State(engine): State<AppState>,
    Path(id): Path<String>,
    s: Signed,
) -> Result<Json<Value>, ApiError> {
    admit_read(&engine, &s).await?;
    let p = engine.get_payout(&s.app, parse_payout_id(&id)?).await?;
    Ok(Json(payout_json(&p)))
}

async fn get_by_out_payout_no(
    State(engine): State<AppState>,
    Path(no): Path<String>,
    s: Signed,
) -> Result<Json<Value>, ApiError> {
    admit_read(&engine, &s).await?;
    let no = OutPayoutNo::parse(&no).map_err(|_| ApiError::not_found("payout"))?;
    let p = engine.get_payout_by_out_payout_no(&s.app, &no).await?;
    Ok(Json(payout_json(&p)))
}

/// Filters of a list query: `(name, value)` pairs.
type Filters<'a> = Vec<(&'static str, &'a str)>;

/// Splits the filters named in `names` off a list query (each at most once); the rest goes to
/// [`parse_page`].
fn split_filters<'a>(
    query: Option<&'a str>,
    names: &[&'static str],
) -> Result<(Filters<'a>, String), ApiError> {
    let mut found: Filters<'a> = Vec::new();
    let mut rest = Vec::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match names.iter().find(|n| **n == k) {
            Some(name) => {
                if found.iter().any(|(n, _)| n == name) {
                    return Err(ApiError::invalid(
                        "parameter_invalid",
                        format!("{name} may be given once"),
                    )
                    .with_param(*name));
                }
                found.push((name, v));
            }
            None => rest.push(pair),
        }
    }
    Ok((found, rest.join("&")))
}

fn status_filter(v: &str) -> Result<PayoutStatus, ApiError> {
    PayoutStatus::parse(v).ok_or_else(|| {
        ApiError::invalid(
            "parameter_invalid",
            "status must be processing, paid or failed",
        )
        .with_param("status")
    })
}

/// The filter and page of a payout list query; `merchant_id` only where `names` allows it.
fn list_query(
    query: Option<&str>,
    names: &[&'static str],
) -> Result<(PayoutFilter, u32, Option<PayoutId>), ApiError> {
    let (filters, rest) = split_filters(query, names)?;
    let mut filter = PayoutFilter::default();
    for (name, v) in filters {
        match name {
            "status" => filter.status = Some(status_filter(v)?),
            _ => {
                filter.merchant_id = Some(v.parse::<MerchantId>().map_err(|_| {
                    ApiError::invalid("parameter_invalid", "merchant_id must be a merchant id")
                        .with_param("merchant_id")
                })?)
            }
        }
    }
    let (limit, after) = parse_page::<PayoutId>(Some(&rest), "payout")?;
    Ok((filter, limit, after))
}

fn list_json(
    url: &str,
    rows: &[PayoutRecord],
    has_more: bool,
    view: fn(&PayoutRecord) -> Value,
) -> Value {
    let data: Vec<Value> = rows.iter().map(view).collect();
    json!({"object": "list", "url": url, "has_more": has_more, "data": data})
}

async fn list_payouts(State(engine): State<AppState>, s: Signed) -> Result<Json<Value>, ApiError> {
    let query = s.path_and_query.split_once('?').map(|(_, q)| q.to_string());
    let (mut filter, limit, after) = list_query(query.as_deref(), &["status"])?;
    admit_read(&engine, &s).await?;
    // A merchant lists only its own payouts, whatever the query says.
    filter.merchant_id = Some(s.app.merchant_id);
    let (rows, has_more) = engine.list_payouts(filter, limit, after).await?;
    Ok(Json(list_json("/v1/payouts", &rows, has_more, payout_json)))
}

/// The merchant's view plus what operators need: the version and the ledger entries.
fn operator_view(p: &PayoutRecord) -> Value {
    let mut v = payout_json(p);
    v["version"] = json!(p.version);
    let mut entries = vec![format!("{}:payout", p.id)];
    if p.status == PayoutStatus::Failed {
        entries.push(format!("{}:payout_reversal", p.id));
    }
    v["ledger_entries"] = json!(entries);
    v
}

async fn operator_list_payouts(
    State(engine): State<AppState>,
    _: OperatorAuth,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let (filter, limit, after) = list_query(q.as_deref(), &["merchant_id", "status"])?;
    let (rows, has_more) = engine.list_payouts(filter, limit, after).await?;
    Ok(Json(list_json(
        "/v1/operator/payouts",
        &rows,
        has_more,
        operator_view,
    )))
}

async fn operator_get_payout(
    State(engine): State<AppState>,
    _: OperatorAuth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let p = engine.get_payout_any(parse_payout_id(&id)?).await?;
    Ok(Json(operator_view(&p)))
}
