//! Merchant API v1: payments.

use crate::error::ApiError;
use crate::request::{
    admit_read, idempotent, idempotent_deferred, parse_json, parse_page, Answer, Reply, Signed,
};
use crate::AppState;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use payrail_domain::input::{ExpiresIn, Metadata, NotifyUrl, OutTradeNo, PaymentMethod, Subject};
use payrail_domain::{Currency, Money, MoneyError, PaymentId};
use payrail_engine::payments::{CreateOutcome, CreatePayment, IdemRef, PayerDetails};
use payrail_engine::views::payment_json;
use serde::Deserialize;
use serde_json::json;
use std::collections::BTreeMap;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/payments", post(create_payment).get(list_payments))
        .route("/v1/payments/{id}", get(get_payment))
        .route("/v1/payments/{id}/close", post(close_payment))
        .route("/v1/payments/{id}/cancel", post(cancel_payment))
        .route(
            "/v1/payments/out_trade_no/{out_trade_no}",
            get(get_by_out_trade_no),
        )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreatePaymentBody {
    amount: i64,
    currency: String,
    out_trade_no: String,
    subject: String,
    method: String,
    expires_in: Option<i64>,
    notify_url: Option<String>,
    metadata: Option<BTreeMap<String, String>>,
    auth_code: Option<String>,
    client_ip: Option<String>,
    payer_id: Option<String>,
    return_url: Option<String>,
}

fn money_error(e: MoneyError) -> ApiError {
    match e {
        MoneyError::UnknownCurrency(_) => {
            ApiError::invalid("currency_invalid", e.to_string()).with_param("currency")
        }
        MoneyError::NotPositive
        | MoneyError::TooLarge(..)
        | MoneyError::Overflow
        | MoneyError::BadDecimal(_) => ApiError::invalid(
            "amount_invalid",
            format!(
                "amount must be an integer number of minor units from 1 to {}",
                Money::MAX_PAYMENT_MINOR
            ),
        )
        .with_param("amount"),
        MoneyError::CurrencyMismatch(..) => {
            ApiError::invalid("currency_invalid", e.to_string()).with_param("currency")
        }
    }
}

/// Pure validation: a bad request is refused here, before anything is written.
fn validate_create(body: &[u8]) -> Result<CreatePayment, ApiError> {
    let b: CreatePaymentBody = parse_json(body)?;
    let method = PaymentMethod::parse(&b.method)?;
    let currency = Currency::parse(&b.currency).map_err(money_error)?;
    Ok(CreatePayment {
        amount: Money::payment_amount(b.amount, currency).map_err(money_error)?,
        out_trade_no: OutTradeNo::parse(&b.out_trade_no)?,
        subject: Subject::parse(&b.subject)?,
        method,
        expires_in: b
            .expires_in
            .map(ExpiresIn::parse)
            .transpose()?
            .unwrap_or(ExpiresIn::DEFAULT),
        notify_url: b.notify_url.as_deref().map(NotifyUrl::parse).transpose()?,
        metadata: Metadata::parse(b.metadata.unwrap_or_default())?,
        payer: payer_details(method, b.auth_code, b.client_ip, b.payer_id, b.return_url)?,
    })
}

/// The per-method payer inputs: required where the method needs them, refused where it does
/// not (so a mistake shows up at once rather than at the channel).
fn payer_details(
    method: PaymentMethod,
    auth_code: Option<String>,
    client_ip: Option<String>,
    payer_id: Option<String>,
    return_url: Option<String>,
) -> Result<PayerDetails, ApiError> {
    let required = |param: &'static str, what: &str| {
        ApiError::invalid(
            "parameter_missing",
            format!("method {} needs {param} ({what})", method.as_str()),
        )
        .with_param(param)
    };
    let refused = |param: &'static str| {
        ApiError::invalid(
            "parameter_unknown",
            format!("method {} takes no {param}", method.as_str()),
        )
        .with_param(param)
    };
    let auth_code = match (method.is_payment_code(), auth_code) {
        (true, Some(code)) => {
            // Payment codes are 10-32 digits (WeChat 18, Alipay 16-24, UnionPay 19).
            if !(10..=32).contains(&code.len()) || !code.bytes().all(|b| b.is_ascii_digit()) {
                return Err(ApiError::invalid(
                    "parameter_invalid",
                    "auth_code must be the 10-32 digits of the payer's payment code",
                )
                .with_param("auth_code"));
            }
            Some(payrail_domain::Secret::new(code))
        }
        (true, None) => {
            return Err(required(
                "auth_code",
                "the payment code the cashier scanned",
            ))
        }
        (false, Some(_)) => return Err(refused("auth_code")),
        (false, None) => None,
    };
    let needs_ip = method == PaymentMethod::WechatH5;
    let client_ip = match (needs_ip, client_ip) {
        (_, Some(ip)) => Some(ip.parse::<std::net::IpAddr>().map_err(|_| {
            ApiError::invalid(
                "parameter_invalid",
                "client_ip must be an IPv4 or IPv6 address",
            )
            .with_param("client_ip")
        })?),
        (true, None) => return Err(required("client_ip", "the payer's IP address")),
        (false, None) => None,
    };
    let needs_payer = matches!(method, PaymentMethod::WechatJsapi | PaymentMethod::Wallet);
    let payer_id = match (needs_payer, payer_id) {
        (_, Some(p))
            if p.is_empty() || p.len() > 128 || !p.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            return Err(ApiError::invalid(
                "parameter_invalid",
                "payer_id must be 1-128 printable ASCII characters (the payer's openid)",
            )
            .with_param("payer_id"))
        }
        (_, Some(p)) => Some(p),
        (true, None) if method == PaymentMethod::Wallet => {
            return Err(required("payer_id", "the wallet to pay from"))
        }
        (true, None) => return Err(required("payer_id", "the payer's openid")),
        (false, None) => None,
    };
    let return_url = return_url
        .map(|u| {
            NotifyUrl::parse(&u).map(|_| u).map_err(|_| {
                ApiError::invalid(
                    "parameter_invalid",
                    "return_url must be an http:// or https:// URL of at most 512 characters",
                )
                .with_param("return_url")
            })
        })
        .transpose()?;
    Ok(PayerDetails {
        auth_code,
        client_ip,
        payer_id,
        return_url,
    })
}

async fn create_payment(State(engine): State<AppState>, s: Signed) -> Result<Response, ApiError> {
    let input = validate_create(&s.body)?;
    // The nonce and key are claimed in the same write as the payment (one commit fewer).
    idempotent_deferred(&engine, s.mutation(), move |engine, claim| async move {
        let res = engine
            .create_payment(
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
        let res = match res {
            CreateOutcome::Refused(outcome) => return Ok(Answer::Refused(outcome)),
            CreateOutcome::Done(res) => res,
        };
        let mut reply = Reply::ok(payment_json(&res.payment, res.next_action.as_ref()));
        reply.already_stored = res.idempotency_completed;
        Ok(Answer::Reply(reply))
    })
    .await
}

fn parse_payment_id(id: &str) -> Result<PaymentId, ApiError> {
    // An id of the wrong shape cannot exist: same answer as a missing one.
    id.parse().map_err(|_| ApiError::not_found("payment"))
}

async fn get_payment(
    State(engine): State<AppState>,
    Path(id): Path<String>,
    s: Signed,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    admit_read(&engine, &s).await?;
    let p = engine.get_payment(&s.app, parse_payment_id(&id)?).await?;
    Ok(axum::Json(payment_json(&p, None)))
}

async fn get_by_out_trade_no(
    State(engine): State<AppState>,
    Path(otn): Path<String>,
    s: Signed,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    admit_read(&engine, &s).await?;
    let otn = OutTradeNo::parse(&otn).map_err(|_| ApiError::not_found("payment"))?;
    let p = engine.get_payment_by_out_trade_no(&s.app, &otn).await?;
    Ok(axum::Json(payment_json(&p, None)))
}

async fn close_payment(
    State(engine): State<AppState>,
    Path(id): Path<String>,
    s: Signed,
) -> Result<Response, ApiError> {
    if !s.body.is_empty() {
        let _: serde_json::Map<String, serde_json::Value> = parse_json(&s.body).and_then(
            |m: serde_json::Map<String, serde_json::Value>| match m.keys().next() {
                Some(k) => Err(ApiError::invalid(
                    "parameter_unknown",
                    format!("unknown parameter {k}"),
                )
                .with_param(k.clone())),
                None => Ok(m),
            },
        )?;
    }
    let id = parse_payment_id(&id)?;
    idempotent(&engine, s.mutation(), move |engine, _claim| async move {
        let p = engine.close_payment(&s.app, id).await?;
        Ok(Reply::ok(payment_json(&p, None)))
    })
    .await
}

async fn cancel_payment(
    State(engine): State<AppState>,
    Path(id): Path<String>,
    s: Signed,
) -> Result<Response, ApiError> {
    no_parameters(&s.body)?;
    let id = parse_payment_id(&id)?;
    idempotent(&engine, s.mutation(), move |engine, _claim| async move {
        let p = engine.cancel_payment(&s.app, id).await?;
        Ok(Reply::ok(payment_json(&p, None)))
    })
    .await
}

/// A body that must be empty or `{}`.
fn no_parameters(body: &[u8]) -> Result<(), ApiError> {
    if body.is_empty() {
        return Ok(());
    }
    let m: serde_json::Map<String, serde_json::Value> = parse_json(body)?;
    match m.keys().next() {
        Some(k) => Err(
            ApiError::invalid("parameter_unknown", format!("unknown parameter {k}"))
                .with_param(k.clone()),
        ),
        None => Ok(()),
    }
}

async fn list_payments(
    State(engine): State<AppState>,
    s: Signed,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let query = s.path_and_query.split_once('?').map(|(_, q)| q.to_string());
    let (limit, after) = parse_page::<PaymentId>(query.as_deref(), "payment")?;
    admit_read(&engine, &s).await?;
    let (rows, has_more) = engine.list_payments(&s.app, limit, after).await?;
    let data: Vec<_> = rows.iter().map(|p| payment_json(p, None)).collect();
    Ok(axum::Json(
        json!({"object": "list", "url": "/v1/payments", "has_more": has_more, "data": data}),
    ))
}
