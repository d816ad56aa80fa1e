//! Money views: the merchant's balance, ledger postings, settlements and statements (signed);
//! the operator's fee plans, settlement cycles and runs, wallets, ledger accounts, journal and
//! trial balance (bearer token).

use crate::error::ApiError;
use crate::request::{admit_read, idempotent, parse_json, Operator, OperatorAuth, Reply, Signed};
use crate::AppState;
use axum::extract::{Path, RawQuery, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use payrail_domain::civil::{Date, DateTime, TimeOfDay};
use payrail_domain::fees::{FeePlan, FeePlanKey, FeePlanSpec, FeeRefundPolicy, BPS_MAX};
use payrail_domain::ledger::{AccountId, AccountKind, PostingRef, Side};
use payrail_domain::settlement::SettlementCycle;
use payrail_domain::{Currency, MerchantId, Money, SettlementId};
use payrail_engine::clearing::FeePlanInput;
use payrail_engine::merchants::PAGE_LIMIT_MAX;
use payrail_store::ledger::{AccountRecord, EntryRecord};
use payrail_store::{
    FeePlanRecord, PostingLine, SettlementCycleRecord, SettlementRecord, StatementPayment,
    StatementRefund,
};
use serde::Deserialize;
use serde_json::{json, Value};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/balance", get(balance))
        .route("/v1/wallets/{holder}", get(merchant_get_wallet))
        .route("/v1/ledger/entries", get(merchant_postings))
        .route("/v1/settlements", get(list_settlements))
        .route("/v1/settlements/{id}", get(get_settlement))
        .route("/v1/settlements/{id}/statement.csv", get(statement_csv))
        .route(
            "/v1/operator/fee-plans",
            post(put_fee_plan).get(list_fee_plans),
        )
        .route(
            "/v1/operator/settlement-cycles",
            post(put_cycle).get(list_cycles),
        )
        .route("/v1/operator/settlements", get(op_list_settlements))
        .route("/v1/operator/settlements/run", post(run_settlement))
        .route("/v1/operator/settlements/{id}", get(op_get_settlement))
        .route(
            "/v1/operator/settlements/{id}/statement.csv",
            get(op_statement_csv),
        )
        .route(
            "/v1/operator/merchants/{merchant_id}/wallets/{holder}",
            get(op_get_wallet),
        )
        .route(
            "/v1/operator/merchants/{merchant_id}/wallets/{holder}/topup",
            post(top_up),
        )
        .route("/v1/operator/ledger/accounts", get(list_accounts))
        .route(
            "/v1/operator/ledger/accounts/{id}/postings",
            get(account_postings),
        )
        .route("/v1/operator/ledger/entries", get(journal))
        .route("/v1/operator/ledger/trial-balance", get(trial_balance))
}

fn secs(ms: i64) -> i64 {
    ms.div_euclid(1000)
}

// --- query strings ---------------------------------------------------------------------------

/// `limit` (1..=100, default 10) and any of `allowed`; anything else is a 400.
struct Query {
    limit: u32,
    params: Vec<(String, String)>,
}

impl Query {
    fn parse(q: Option<&str>, allowed: &[&str]) -> Result<Query, ApiError> {
        let mut out = Query {
            limit: 10,
            params: Vec::new(),
        };
        // Percent-decoded (review finding: `prefix=merchant_pending%3A…` matched nothing).
        let pairs: Vec<(String, String)> =
            serde_urlencoded::from_str(q.unwrap_or("")).map_err(|_| {
                ApiError::invalid("parameter_invalid", "the query string is not URL-encoded")
            })?;
        for (k, v) in &pairs {
            let (k, v) = (k.as_str(), v.as_str());
            if k == "limit" {
                out.limit = v
                    .parse::<u32>()
                    .ok()
                    .filter(|l| (1..=PAGE_LIMIT_MAX).contains(l))
                    .ok_or_else(|| {
                        ApiError::invalid(
                            "parameter_out_of_range",
                            format!("limit must be an integer from 1 to {PAGE_LIMIT_MAX}"),
                        )
                        .with_param("limit")
                    })?;
            } else if allowed.contains(&k) {
                out.params.push((k.to_string(), v.to_string()));
            } else {
                return Err(ApiError::invalid(
                    "parameter_unknown",
                    format!("unknown query parameter {k}"),
                )
                .with_param(k.to_string()));
            }
        }
        Ok(out)
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }
}

fn query_of(s: &Signed) -> Option<String> {
    s.path_and_query.split_once('?').map(|(_, q)| q.to_string())
}

fn bad_param(param: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::invalid("parameter_invalid", message).with_param(param)
}

fn currency_param(q: &Query) -> Result<Option<Currency>, ApiError> {
    q.get("currency")
        .map(|c| {
            Currency::parse(c).map_err(|e| {
                ApiError::invalid("currency_invalid", e.to_string()).with_param("currency")
            })
        })
        .transpose()
}

// --- merchant: balance and postings ----------------------------------------------------------

fn net_of(a: &AccountRecord) -> Result<i64, ApiError> {
    let net = a.posted_net().map_err(payrail_engine::EngineError::from)?;
    i64::try_from(net).map_err(|_| ApiError::internal())
}

fn amounts(accounts: &[AccountRecord]) -> Result<Vec<Value>, ApiError> {
    accounts
        .iter()
        .map(|a| Ok(json!({"currency": a.id.currency().code(), "amount": net_of(a)?})))
        .collect()
}

async fn balance(State(engine): State<AppState>, s: Signed) -> Result<Json<Value>, ApiError> {
    Query::parse(query_of(&s).as_deref(), &[])?;
    admit_read(&engine, &s).await?;
    let m = s.app.merchant_id;
    let pending = engine
        .merchant_accounts(m, AccountKind::MerchantPending)
        .await?;
    let available = engine
        .merchant_accounts(m, AccountKind::MerchantAvailable)
        .await?;
    Ok(Json(json!({
        "object": "balance",
        "pending": amounts(&pending)?,
        "available": amounts(&available)?,
    })))
}

fn posting_json(l: &PostingLine) -> Value {
    let account = match l.account.kind() {
        AccountKind::MerchantPending => "pending",
        AccountKind::MerchantAvailable => "available",
        other => other.as_str(),
    };
    // Merchant balances are credit-normal: the balance is credits − debits.
    let balance_after = match (l.credits_posted_after, l.debits_posted_after) {
        (Some(c), Some(d)) => Some(c.saturating_sub(d)),
        _ => None,
    };
    json!({
        "object": "ledger_posting",
        "id": format!("{}.{}", l.at.entry_seq, l.at.leg),
        "entry_id": l.entry_id,
        "type": l.code,
        "reference": l.reference,
        "account": account,
        "currency": l.account.currency().code(),
        "direction": if l.side == Side::Credit { "credit" } else { "debit" },
        "amount": l.amount_minor,
        "pending": l.pending,
        "balance_after": balance_after,
        "created": secs(l.posted_at_ms),
    })
}

/// One chain's position in a cursor: `h` (from the latest), `x` (nothing left), `seq.leg`.
fn chain_cursor(s: &str) -> Option<Option<Option<PostingRef>>> {
    match s {
        "h" => Some(None),
        "x" => Some(Some(None)),
        _ => {
            let (seq, leg) = s.split_once('.')?;
            Some(Some(Some(PostingRef {
                entry_seq: seq.parse().ok()?,
                leg: leg.parse().ok()?,
            })))
        }
    }
}

fn chain_token(c: &Option<Option<PostingRef>>) -> String {
    match c {
        None => "h".into(),
        Some(None) => "x".into(),
        Some(Some(at)) => format!("{}.{}", at.entry_seq, at.leg),
    }
}

async fn merchant_postings(
    State(engine): State<AppState>,
    s: Signed,
) -> Result<Json<Value>, ApiError> {
    let q = Query::parse(query_of(&s).as_deref(), &["currency", "cursor"])?;
    let currency = currency_param(&q)?.unwrap_or(Currency::CNY);
    let cursors: Vec<Option<Option<PostingRef>>> = match q.get("cursor") {
        None => vec![None, None],
        Some(c) => {
            let parts: Option<Vec<_>> = c.split('-').map(chain_cursor).collect();
            match parts {
                Some(p) if p.len() == 2 => p,
                _ => {
                    return Err(bad_param(
                        "cursor",
                        "cursor must be a next_cursor of this list",
                    ))
                }
            }
        }
    };
    admit_read(&engine, &s).await?;
    let m = s.app.merchant_id;
    let accounts = [
        AccountId::merchant_pending(m, currency),
        AccountId::merchant_available(m, currency),
    ];
    let page = engine
        .merged_postings(&accounts, &cursors, q.limit)
        .await
        .map_err(|e| match e {
            // A cursor of another merchant's account names nothing of this one.
            payrail_engine::EngineError::NotFound(_) => {
                bad_param("cursor", "cursor must be a next_cursor of this list")
            }
            other => other.into(),
        })?;
    let data: Vec<Value> = page.lines.iter().map(posting_json).collect();
    let next = page.has_more.then(|| {
        page.next
            .iter()
            .map(chain_token)
            .collect::<Vec<_>>()
            .join("-")
    });
    Ok(Json(json!({
        "object": "list",
        "url": "/v1/ledger/entries",
        "currency": currency.code(),
        "has_more": page.has_more,
        "next_cursor": next,
        "data": data,
    })))
}

// --- settlements -----------------------------------------------------------------------------

fn offset_text(minutes: i64) -> String {
    let sign = if minutes < 0 { '-' } else { '+' };
    let m = minutes.unsigned_abs();
    format!("{sign}{:02}:{:02}", m / 60, m % 60)
}

fn settlement_json(r: &SettlementRecord) -> Value {
    json!({
        "id": r.id,
        "object": "settlement",
        "merchant_id": r.merchant_id,
        "currency": r.currency,
        "business_day": r.business_day,
        "cycle": {
            "t_plus_days": r.t_plus_days,
            "cutoff": r.cutoff,
            "utc_offset": offset_text(r.utc_offset_minutes),
        },
        "window_start": secs(r.window_start_ms),
        "window_end": secs(r.window_end_ms),
        "due": secs(r.due_at_ms),
        "payment_count": r.payment_count,
        "refund_count": r.refund_count,
        "gross": r.gross_minor,
        "fee": r.fee_minor,
        "refunded": r.refunded_minor,
        "fee_refunded": r.fee_refunded_minor,
        "net": r.net_minor,
        "entry_id": r.entry_id,
        "created": secs(r.created_at_ms),
    })
}

fn settlement_id(id: &str) -> Result<SettlementId, ApiError> {
    id.parse().map_err(|_| ApiError::not_found("settlement"))
}

fn local_time(ms: i64, offset_minutes: i64) -> String {
    let offset = i32::try_from(offset_minutes).unwrap_or(0);
    match DateTime::from_unix_ms(ms, offset) {
        Ok(t) => format!("{} {}", t.date, t.time),
        Err(_) => ms.to_string(),
    }
}

/// The statement: one line per payment and refund, then the totals; amounts in minor units.
/// `net` of the total line is what the settlement entry moved from pending to available. A
/// refund's `net` is the part taken from pending (netted in this batch); what a refund took
/// from the available balance or, when the merchant could not cover it, from suspense is in
/// `from_available` / `from_suspense`, so every refund line adds up: amount − fee = net +
/// from_available + from_suspense (review finding: those parts were missing).
fn statement(r: &SettlementRecord, p: &[StatementPayment], rf: &[StatementRefund]) -> String {
    let mut out = String::from(
        "type,id,out_no,payment_id,cleared_at,amount,fee,net,from_available,from_suspense\n",
    );
    for l in p {
        let c = &l.clearing;
        out.push_str(&format!(
            "payment,{},{},{},{},{},{},{},0,0\n",
            c.payment_id,
            l.out_trade_no,
            c.payment_id,
            local_time(c.cleared_at_ms, r.utc_offset_minutes),
            c.amount_minor,
            c.fee_minor,
            c.amount_minor.saturating_sub(c.fee_minor),
        ));
    }
    for l in rf {
        let c = &l.clearing;
        out.push_str(&format!(
            "refund,{},{},{},{},{},{},{},{},{}\n",
            c.refund_id,
            l.out_refund_no,
            c.payment_id,
            local_time(c.cleared_at_ms, r.utc_offset_minutes),
            c.amount_minor.saturating_neg(),
            c.fee_refund_minor.saturating_neg(),
            c.from_pending_minor.saturating_neg(),
            c.from_available_minor.saturating_neg(),
            c.from_suspense_minor.saturating_neg(),
        ));
    }
    out.push_str(&format!(
        "total,{},,,{},{},{},{},,\n",
        r.id,
        r.business_day,
        r.gross_minor.saturating_sub(r.refunded_minor),
        r.fee_minor.saturating_sub(r.fee_refunded_minor),
        r.net_minor,
    ));
    out
}

fn csv_response(r: &SettlementRecord, body: String) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!(
                    "attachment; filename=\"settlement-{}-{}.csv\"",
                    r.business_day, r.id
                ),
            ),
        ],
        body,
    )
        .into_response()
}

async fn list_settlements(
    State(engine): State<AppState>,
    s: Signed,
) -> Result<Json<Value>, ApiError> {
    let q = Query::parse(query_of(&s).as_deref(), &["starting_after"])?;
    let after = q
        .get("starting_after")
        .map(|a| {
            a.parse::<SettlementId>()
                .map_err(|_| bad_param("starting_after", "starting_after must be a settlement id"))
        })
        .transpose()?;
    admit_read(&engine, &s).await?;
    let (rows, has_more) = engine
        .list_settlements(Some(s.app.merchant_id), q.limit, after)
        .await?;
    let data: Vec<Value> = rows.iter().map(settlement_json).collect();
    Ok(Json(
        json!({"object": "list", "url": "/v1/settlements", "has_more": has_more, "data": data}),
    ))
}

async fn get_settlement(
    State(engine): State<AppState>,
    Path(id): Path<String>,
    s: Signed,
) -> Result<Json<Value>, ApiError> {
    admit_read(&engine, &s).await?;
    let r = engine
        .get_settlement(Some(s.app.merchant_id), settlement_id(&id)?)
        .await?;
    Ok(Json(settlement_json(&r)))
}

async fn statement_csv(
    State(engine): State<AppState>,
    Path(id): Path<String>,
    s: Signed,
) -> Result<Response, ApiError> {
    admit_read(&engine, &s).await?;
    let (r, p, rf) = engine
        .settlement_statement(Some(s.app.merchant_id), settlement_id(&id)?)
        .await?;
    let body = statement(&r, &p, &rf);
    Ok(csv_response(&r, body))
}

async fn op_list_settlements(
    State(engine): State<AppState>,
    _: OperatorAuth,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let q = Query::parse(q.as_deref(), &["starting_after", "merchant_id"])?;
    let after = q
        .get("starting_after")
        .map(|a| {
            a.parse::<SettlementId>()
                .map_err(|_| bad_param("starting_after", "starting_after must be a settlement id"))
        })
        .transpose()?;
    let merchant = q
        .get("merchant_id")
        .map(|m| {
            m.parse::<MerchantId>()
                .map_err(|_| bad_param("merchant_id", "merchant_id must be a merchant id"))
        })
        .transpose()?;
    let (rows, has_more) = engine.list_settlements(merchant, q.limit, after).await?;
    let data: Vec<Value> = rows.iter().map(settlement_json).collect();
    Ok(Json(
        json!({"object": "list", "url": "/v1/operator/settlements", "has_more": has_more, "data": data}),
    ))
}

async fn op_get_settlement(
    State(engine): State<AppState>,
    _: OperatorAuth,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let r = engine.get_settlement(None, settlement_id(&id)?).await?;
    Ok(Json(settlement_json(&r)))
}

async fn op_statement_csv(
    State(engine): State<AppState>,
    _: OperatorAuth,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (r, p, rf) = engine
        .settlement_statement(None, settlement_id(&id)?)
        .await?;
    let body = statement(&r, &p, &rf);
    Ok(csv_response(&r, body))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunBody {
    /// Settle business days up to this one (default: every due day).
    date: Option<String>,
}

async fn run_settlement(
    State(engine): State<AppState>,
    op: Operator,
) -> Result<Response, ApiError> {
    let b: RunBody = if op.body.is_empty() {
        RunBody { date: None }
    } else {
        parse_json(&op.body)?
    };
    let upto = b
        .date
        .as_deref()
        .map(|d| Date::parse(d).map_err(|_| bad_param("date", "date must be YYYY-MM-DD")))
        .transpose()?;
    idempotent(&engine, op.mutation(), move |engine, _claim| async move {
        let report = engine.run_settlement(upto).await?;
        let created: Vec<Value> = report.created.iter().map(settlement_json).collect();
        Ok(Reply::ok(json!({
            "object": "settlement_run",
            "created": created,
            "existing": report.existing,
            "failed": report.failed,
        })))
    })
    .await
}

// --- operator: fee plans and cycles ----------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FeePlanBody {
    merchant_id: Option<String>,
    channel: Option<String>,
    method: Option<String>,
    currency: String,
    rate_bps: i64,
    fixed: Option<i64>,
    minimum: Option<i64>,
    maximum: Option<i64>,
    channel_cost_bps: Option<i64>,
    channel_cost_fixed: Option<i64>,
    fee_refund: Option<String>,
    channel_cost_refund: Option<String>,
}

fn policy_param(v: Option<&str>, param: &'static str) -> Result<FeeRefundPolicy, ApiError> {
    match v {
        None => Ok(FeeRefundPolicy::Proportional),
        // `none` is accepted as another name for keeping the fee.
        Some("none") => Ok(FeeRefundPolicy::Keep),
        Some(s) => FeeRefundPolicy::parse(s)
            .ok_or_else(|| bad_param(param, format!("{param} must be proportional or keep"))),
    }
}

fn fee_plan_input(b: FeePlanBody) -> Result<FeePlanInput, ApiError> {
    let merchant = b
        .merchant_id
        .as_deref()
        .map(|m| {
            m.parse::<MerchantId>()
                .map_err(|_| bad_param("merchant_id", "merchant_id must be a merchant id"))
        })
        .transpose()?;
    let key = FeePlanKey::new(merchant, b.channel.as_deref(), b.method.as_deref())
        .map_err(|e| ApiError::invalid("parameter_invalid", e.to_string()))?;
    let bps = |v: i64, param: &'static str| {
        u32::try_from(v)
            .ok()
            .filter(|v| *v <= BPS_MAX)
            .ok_or_else(|| {
                ApiError::invalid(
                    "parameter_out_of_range",
                    format!("{param} must be 0..={BPS_MAX} basis points"),
                )
                .with_param(param)
            })
    };
    let spec = FeePlanSpec {
        currency: Currency::parse(&b.currency).map_err(|e| {
            ApiError::invalid("currency_invalid", e.to_string()).with_param("currency")
        })?,
        rate_bps: bps(b.rate_bps, "rate_bps")?,
        fixed_minor: b.fixed.unwrap_or(0),
        min_minor: b.minimum.unwrap_or(0),
        max_minor: b.maximum,
        channel_cost_bps: bps(b.channel_cost_bps.unwrap_or(0), "channel_cost_bps")?,
        channel_cost_fixed_minor: b.channel_cost_fixed.unwrap_or(0),
        fee_refund: policy_param(b.fee_refund.as_deref(), "fee_refund")?,
        channel_cost_refund: policy_param(b.channel_cost_refund.as_deref(), "channel_cost_refund")?,
    };
    let plan = FeePlan::new(spec)
        .map_err(|e| ApiError::invalid("parameter_out_of_range", e.to_string()))?;
    Ok(FeePlanInput { key, plan })
}

fn fee_plan_json(r: &FeePlanRecord) -> Value {
    json!({
        "id": r.id,
        "object": "fee_plan",
        "merchant_id": r.merchant_id,
        "channel": r.channel,
        "method": r.method,
        "currency": r.currency,
        "rate_bps": r.rate_bps,
        "fixed": r.fixed_minor,
        "minimum": r.min_minor,
        "maximum": r.max_minor,
        "channel_cost_bps": r.channel_cost_bps,
        "channel_cost_fixed": r.channel_cost_fixed_minor,
        "fee_refund": r.fee_refund,
        "channel_cost_refund": r.channel_cost_refund,
        "version": r.version,
        "created": secs(r.created_at_ms),
        "updated": secs(r.updated_at_ms),
    })
}

async fn put_fee_plan(State(engine): State<AppState>, op: Operator) -> Result<Response, ApiError> {
    let b: FeePlanBody = parse_json(&op.body)?;
    let input = fee_plan_input(b)?;
    if let Some(m) = input.key.merchant {
        engine.get_merchant(m).await?;
    }
    idempotent(&engine, op.mutation(), move |engine, _claim| async move {
        let r = engine.put_fee_plan(input).await?;
        Ok(Reply::ok(fee_plan_json(&r)))
    })
    .await
}

async fn list_fee_plans(
    State(engine): State<AppState>,
    _: OperatorAuth,
) -> Result<Json<Value>, ApiError> {
    let rows = engine.list_fee_plans().await?;
    let data: Vec<Value> = rows.iter().map(fee_plan_json).collect();
    Ok(Json(
        json!({"object": "list", "url": "/v1/operator/fee-plans", "has_more": false, "data": data}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CycleBody {
    merchant_id: Option<String>,
    t_plus_days: i64,
    cutoff: String,
    utc_offset: String,
}

/// `+08:00`, `-05:30`, `Z`.
fn parse_offset(s: &str) -> Option<i32> {
    if s == "Z" {
        return Some(0);
    }
    let (sign, rest) = match s.as_bytes().first()? {
        b'+' => (1, s.get(1..)?),
        b'-' => (-1, s.get(1..)?),
        _ => return None,
    };
    let t = TimeOfDay::parse(rest).ok()?;
    if t.second != 0 {
        return None;
    }
    Some(sign * (i32::from(t.hour) * 60 + i32::from(t.minute)))
}

fn cycle_json(r: &SettlementCycleRecord) -> Value {
    json!({
        "object": "settlement_cycle",
        "merchant_id": r.merchant_id,
        "t_plus_days": r.t_plus_days,
        "cutoff": r.cutoff,
        "utc_offset": offset_text(r.utc_offset_minutes),
        "updated": secs(r.updated_at_ms),
    })
}

async fn put_cycle(State(engine): State<AppState>, op: Operator) -> Result<Response, ApiError> {
    let b: CycleBody = parse_json(&op.body)?;
    let merchant = b
        .merchant_id
        .as_deref()
        .map(|m| {
            m.parse::<MerchantId>()
                .map_err(|_| bad_param("merchant_id", "merchant_id must be a merchant id"))
        })
        .transpose()?;
    let cutoff = TimeOfDay::parse(&b.cutoff)
        .map_err(|_| bad_param("cutoff", "cutoff must be HH:MM or HH:MM:SS"))?;
    let offset = parse_offset(&b.utc_offset)
        .ok_or_else(|| bad_param("utc_offset", "utc_offset must be like +08:00"))?;
    let days = u16::try_from(b.t_plus_days)
        .map_err(|_| bad_param("t_plus_days", "t_plus_days must be 0..=30"))?;
    let cycle = SettlementCycle::new(days, cutoff, offset)
        .map_err(|e| ApiError::invalid("parameter_out_of_range", e.to_string()))?;
    idempotent(&engine, op.mutation(), move |engine, _claim| async move {
        let r = engine.put_settlement_cycle(merchant, cycle).await?;
        Ok(Reply::ok(cycle_json(&r)))
    })
    .await
}

async fn list_cycles(
    State(engine): State<AppState>,
    _: OperatorAuth,
) -> Result<Json<Value>, ApiError> {
    let rows = engine.list_settlement_cycles().await?;
    let data: Vec<Value> = rows.iter().map(cycle_json).collect();
    Ok(Json(
        json!({"object": "list", "url": "/v1/operator/settlement-cycles", "has_more": false, "data": data}),
    ))
}

// --- operator: wallets -----------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TopUpBody {
    amount: i64,
    currency: String,
}

fn account_json(a: &AccountRecord) -> Result<Value, ApiError> {
    let b = a.current().map_err(payrail_engine::EngineError::from)?;
    let normal = a.id.kind().normal_side();
    let balance = i64::try_from(b.posted_net(normal)).map_err(|_| ApiError::internal())?;
    let available = i64::try_from(b.available(normal)).map_err(|_| ApiError::internal())?;
    Ok(json!({
        "id": a.id.as_str(),
        "object": "ledger_account",
        "kind": a.id.kind().as_str(),
        "owner": a.id.owner(),
        "currency": a.id.currency().code(),
        "normal_side": if normal == Side::Credit { "credit" } else { "debit" },
        "balance": balance,
        "available": available,
        "debits_posted": b.debits_posted,
        "credits_posted": b.credits_posted,
        "debits_pending": b.debits_pending,
        "credits_pending": b.credits_pending,
        "created": secs(a.created_at_ms),
    }))
}

fn wallet_json(
    merchant: MerchantId,
    holder: &str,
    accounts: &[AccountRecord],
) -> Result<Value, ApiError> {
    let balances: Vec<Value> = accounts
        .iter()
        .map(account_json)
        .collect::<Result<_, _>>()?;
    Ok(json!({
        "object": "wallet",
        "id": holder,
        "merchant_id": merchant,
        "accounts": balances,
    }))
}

fn wallet_merchant(id: &str) -> Result<MerchantId, ApiError> {
    id.parse().map_err(|_| ApiError::not_found("merchant"))
}

fn wallet_holder(holder: &str) -> Result<(), ApiError> {
    // The merchant part is checked apart; any valid merchant id will do here.
    if AccountId::wallet(MerchantId::generate(0, [0; 10]), holder, Currency::CNY).is_err() {
        return Err(ApiError::invalid(
            "parameter_invalid",
            format!(
                "a wallet id is 1-{} characters of A-Z a-z 0-9 _ - .",
                payrail_domain::ledger::WALLET_HOLDER_LEN_MAX
            ),
        ));
    }
    Ok(())
}

async fn top_up(
    State(engine): State<AppState>,
    Path((merchant, holder)): Path<(String, String)>,
    op: Operator,
) -> Result<Response, ApiError> {
    let b: TopUpBody = parse_json(&op.body)?;
    let currency = Currency::parse(&b.currency)
        .map_err(|e| ApiError::invalid("currency_invalid", e.to_string()).with_param("currency"))?;
    let amount = Money::payment_amount(b.amount, currency).map_err(|_| {
        ApiError::invalid(
            "amount_invalid",
            format!(
                "amount must be an integer number of minor units from 1 to {}",
                Money::MAX_PAYMENT_MINOR
            ),
        )
        .with_param("amount")
    })?;
    let merchant = wallet_merchant(&merchant)?;
    wallet_holder(&holder)?;
    idempotent(&engine, op.mutation(), move |engine, _claim| async move {
        engine.top_up_wallet(merchant, &holder, amount).await?;
        let accounts = engine.wallet_accounts(merchant, &holder).await?;
        Ok(Reply::ok(wallet_json(merchant, &holder, &accounts)?))
    })
    .await
}

async fn wallet_of(
    engine: &AppState,
    merchant: MerchantId,
    holder: &str,
) -> Result<Json<Value>, ApiError> {
    wallet_holder(holder)?;
    let accounts = engine.wallet_accounts(merchant, holder).await?;
    if accounts.is_empty() {
        return Err(ApiError::not_found("wallet"));
    }
    Ok(Json(wallet_json(merchant, holder, &accounts)?))
}

async fn op_get_wallet(
    State(engine): State<AppState>,
    _: OperatorAuth,
    Path((merchant, holder)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    wallet_of(&engine, wallet_merchant(&merchant)?, &holder).await
}

/// A merchant reads the wallets of its own end users only: the wallet's name carries the
/// merchant, so another merchant's wallet of the same holder id is simply not found.
async fn merchant_get_wallet(
    State(engine): State<AppState>,
    Path(holder): Path<String>,
    s: Signed,
) -> Result<Json<Value>, ApiError> {
    Query::parse(query_of(&s).as_deref(), &[])?;
    admit_read(&engine, &s).await?;
    wallet_of(&engine, s.app.merchant_id, &holder).await
}

// --- operator: ledger ------------------------------------------------------------------------

async fn list_accounts(
    State(engine): State<AppState>,
    _: OperatorAuth,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let q = Query::parse(q.as_deref(), &["prefix", "starting_after"])?;
    let prefix = q.get("prefix").unwrap_or("");
    let rows = engine
        .store
        .list_ledger_accounts(prefix, q.limit.saturating_add(1), q.get("starting_after"))
        .await
        .map_err(payrail_engine::EngineError::from)?;
    let has_more = rows.len() > q.limit as usize;
    let data: Vec<Value> = rows
        .iter()
        .take(q.limit as usize)
        .map(account_json)
        .collect::<Result<_, _>>()?;
    Ok(Json(json!({
        "object": "list",
        "url": "/v1/operator/ledger/accounts",
        "has_more": has_more,
        "data": data,
    })))
}

async fn account_postings(
    State(engine): State<AppState>,
    _: OperatorAuth,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let q = Query::parse(q.as_deref(), &["cursor"])?;
    let account = AccountId::parse(&id).map_err(|_| ApiError::not_found("account"))?;
    let cursors = match q.get("cursor") {
        None => vec![None],
        Some(c) => vec![chain_cursor(c)
            .ok_or_else(|| bad_param("cursor", "cursor must be a next_cursor of this list"))?],
    };
    let page = engine
        .merged_postings(std::slice::from_ref(&account), &cursors, q.limit)
        .await
        .map_err(|e| match e {
            payrail_engine::EngineError::NotFound(_) => {
                bad_param("cursor", "cursor must be a next_cursor of this list")
            }
            other => other.into(),
        })?;
    let data: Vec<Value> = page.lines.iter().map(posting_json).collect();
    let next = page
        .has_more
        .then(|| page.next.first().map(chain_token).unwrap_or_default());
    Ok(Json(json!({
        "object": "list",
        "account": account.as_str(),
        "has_more": page.has_more,
        "next_cursor": next,
        "data": data,
    })))
}

fn entry_json(e: &EntryRecord) -> Value {
    let postings: Vec<Value> = e
        .postings
        .iter()
        .map(|p| {
            json!({
                "account": p.account.as_str(),
                "direction": if p.side == Side::Credit { "credit" } else { "debit" },
                "amount": p.amount_minor,
                "pending": p.pending,
            })
        })
        .collect();
    json!({
        "object": "ledger_entry",
        "seq": e.seq,
        "id": e.id.as_str(),
        "type": e.code,
        "phase": e.phase,
        "currency": e.currency,
        "reference": e.reference,
        "pending_id": e.pending_id.as_ref().map(|p| p.as_str()),
        "hold": e.hold.as_ref().map(|h| json!({
            "state": h.state.as_str(),
            "expires": secs(h.expires_at_ms),
            "resolved_by": h.resolved_by.as_ref().map(|r| r.as_str()),
        })),
        "postings": postings,
        "created": secs(e.posted_at_ms),
    })
}

async fn journal(
    State(engine): State<AppState>,
    _: OperatorAuth,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let q = Query::parse(q.as_deref(), &["starting_after"])?;
    let before = q
        .get("starting_after")
        .map(|s| {
            s.parse::<i64>()
                .map_err(|_| bad_param("starting_after", "starting_after must be an entry seq"))
        })
        .transpose()?;
    let rows = engine
        .store
        .list_entries(before, q.limit.saturating_add(1))
        .await
        .map_err(payrail_engine::EngineError::from)?;
    let has_more = rows.len() > q.limit as usize;
    let data: Vec<Value> = rows.iter().take(q.limit as usize).map(entry_json).collect();
    Ok(Json(json!({
        "object": "list",
        "url": "/v1/operator/ledger/entries",
        "has_more": has_more,
        "data": data,
    })))
}

async fn trial_balance(
    State(engine): State<AppState>,
    _: OperatorAuth,
) -> Result<Json<Value>, ApiError> {
    let lines = engine
        .store
        .trial_balance_lines()
        .await
        .map_err(payrail_engine::EngineError::from)?;
    let mut by_currency: std::collections::BTreeMap<String, (i128, i128, i128, i128)> =
        std::collections::BTreeMap::new();
    let mut rows = Vec::with_capacity(lines.len());
    for l in &lines {
        let t = by_currency.entry(l.currency.clone()).or_default();
        t.0 = t.0.saturating_add(l.debits_posted);
        t.1 = t.1.saturating_add(l.credits_posted);
        t.2 = t.2.saturating_add(l.debits_pending);
        t.3 = t.3.saturating_add(l.credits_pending);
        rows.push(json!({
            "kind": l.kind,
            "currency": l.currency,
            "accounts": l.accounts,
            // As strings: sums of i64 counters may exceed what a JSON number holds exactly.
            "debits_posted": l.debits_posted.to_string(),
            "credits_posted": l.credits_posted.to_string(),
            "debits_pending": l.debits_pending.to_string(),
            "credits_pending": l.credits_pending.to_string(),
            "net_debit": l.debits_posted.saturating_sub(l.credits_posted).to_string(),
        }));
    }
    let totals: Vec<Value> = by_currency
        .iter()
        .map(|(c, (dpo, cpo, dpe, cpe))| {
            json!({
                "currency": c,
                "debits_posted": dpo.to_string(),
                "credits_posted": cpo.to_string(),
                "debits_pending": dpe.to_string(),
                "credits_pending": cpe.to_string(),
                "balanced": dpo == cpo && dpe == cpe,
            })
        })
        .collect();
    let balanced = by_currency
        .values()
        .all(|(dpo, cpo, dpe, cpe)| dpo == cpo && dpe == cpe);
    Ok(Json(json!({
        "object": "trial_balance",
        "balanced": balanced,
        "totals": totals,
        "lines": rows,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_and_cursors_round_trip() {
        assert_eq!(parse_offset("+08:00"), Some(480));
        assert_eq!(parse_offset("-05:30"), Some(-330));
        assert_eq!(parse_offset("Z"), Some(0));
        assert_eq!(parse_offset("08:00"), None);
        assert_eq!(offset_text(480), "+08:00");
        assert_eq!(offset_text(-330), "-05:30");
        for c in [
            None,
            Some(None),
            Some(Some(PostingRef {
                entry_seq: 12,
                leg: 3,
            })),
        ] {
            assert_eq!(chain_cursor(&chain_token(&c)), Some(c));
        }
        assert_eq!(chain_cursor("1.x"), None);
    }
}
