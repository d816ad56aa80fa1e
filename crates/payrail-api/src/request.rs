//! Extractors shared by the handlers: the signed merchant request, the operator, JSON bodies,
//! and the idempotency wrapper every POST goes through.

use crate::error::{json_error, ApiError, REQUEST_ID};
use crate::AppState;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::{header, request::Parts, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use payrail_domain::input::IdempotencyKey;
use payrail_domain::signing::SignedRequest;
use payrail_engine::auth::{request_hash, AppAuth, AuthError};
use payrail_store::{
    Admission, AdmissionOutcome, IdempotencyClaim, IdempotencyCompletion, IdempotencyState,
    NonceClaim,
};
use serde::de::DeserializeOwned;
use tracing::Instrument;

/// A merchant request whose signature and timestamp have been verified. Its nonce is claimed
/// later, together with the idempotency key, after the body has been validated.
pub struct Signed {
    pub app: AppAuth,
    pub signed: SignedRequest,
    pub method: Method,
    pub path_and_query: String,
    pub idempotency_key: Option<String>,
    pub body: Bytes,
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn check_json_content_type(headers: &HeaderMap, body: &[u8]) -> Result<(), ApiError> {
    if body.is_empty() {
        return Ok(());
    }
    let ct = header_str(headers, header::CONTENT_TYPE.as_str()).unwrap_or("");
    if ct
        .split(';')
        .next()
        .map(str::trim)
        .is_some_and(|m| m.eq_ignore_ascii_case("application/json"))
    {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            "unsupported_media_type",
            "request bodies must be JSON with Content-Type: application/json",
        ))
    }
}

async fn read_body(req: Request) -> Result<(Parts, Bytes), ApiError> {
    let (parts, body) = req.into_parts();
    let bytes = Bytes::from_request(Request::from_parts(parts.clone(), body), &())
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "body_too_large",
                format!("request body exceeds {} bytes", crate::BODY_LIMIT_BYTES),
            )
        })?;
    Ok((parts, bytes))
}

impl FromRequest<AppState> for Signed {
    type Rejection = ApiError;

    async fn from_request(req: Request, engine: &AppState) -> Result<Self, Self::Rejection> {
        let (parts, body) = read_body(req).await?;
        let path_and_query = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        let (app, signed) = engine
            .verify_signature(
                header_str(&parts.headers, "authorization"),
                parts.method.as_str(),
                &path_and_query,
                &body,
            )
            .await?;
        check_json_content_type(&parts.headers, &body)?;
        Ok(Signed {
            app,
            signed,
            method: parts.method,
            path_and_query,
            idempotency_key: header_str(&parts.headers, "idempotency-key").map(str::to_string),
            body,
        })
    }
}

/// An operator request (bearer token verified), with its body.
pub struct Operator {
    pub method: Method,
    pub path_and_query: String,
    pub idempotency_key: Option<String>,
    pub body: Bytes,
}

impl FromRequest<AppState> for Operator {
    type Rejection = ApiError;

    async fn from_request(req: Request, engine: &AppState) -> Result<Self, Self::Rejection> {
        let (parts, body) = read_body(req).await?;
        engine
            .verify_operator(header_str(&parts.headers, "authorization"))
            .await?;
        check_json_content_type(&parts.headers, &body)?;
        Ok(Operator {
            path_and_query: parts
                .uri
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "/".into()),
            method: parts.method,
            idempotency_key: header_str(&parts.headers, "idempotency-key").map(str::to_string),
            body,
        })
    }
}

/// Operator GET requests: token only.
pub struct OperatorAuth;

impl FromRequestParts<AppState> for OperatorAuth {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        engine: &AppState,
    ) -> Result<Self, Self::Rejection> {
        engine
            .verify_operator(header_str(&parts.headers, "authorization"))
            .await?;
        Ok(OperatorAuth)
    }
}

/// Parses `limit` (1–100, default 10) and `starting_after` (an id of `T`) from a query string;
/// anything else is a 400 in the usual error shape.
pub fn parse_page<T: std::str::FromStr>(
    query: Option<&str>,
    object: &str,
) -> Result<(u32, Option<T>), ApiError> {
    let max = payrail_engine::merchants::PAGE_LIMIT_MAX;
    let mut limit = 10u32;
    let mut after = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "limit" => {
                limit = v
                    .parse::<u32>()
                    .ok()
                    .filter(|l| (1..=max).contains(l))
                    .ok_or_else(|| {
                        ApiError::invalid(
                            "parameter_out_of_range",
                            format!("limit must be an integer from 1 to {max}"),
                        )
                        .with_param("limit")
                    })?;
            }
            "starting_after" => {
                after = Some(v.parse::<T>().map_err(|_| {
                    ApiError::invalid(
                        "parameter_invalid",
                        format!("starting_after must be a {object} id"),
                    )
                    .with_param("starting_after")
                })?);
            }
            other => {
                return Err(ApiError::invalid(
                    "parameter_unknown",
                    format!("unknown query parameter {other}"),
                )
                .with_param(other.to_string()))
            }
        }
    }
    Ok((limit, after))
}

/// Decodes a JSON body strictly: unknown fields and wrong types are 400s naming the parameter.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::invalid(
            "invalid_json",
            "request body is empty; send a JSON object",
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    let v = serde_path_to_error::deserialize(de).map_err(json_error)?;
    Ok(v)
}

/// Response of a handler before it is stored for idempotent replay.
pub struct Reply {
    pub status: StatusCode,
    pub body: serde_json::Value,
    /// What to store for replays instead of `body` (to keep a shown-once secret out of the
    /// database).
    pub stored_body: Option<serde_json::Value>,
    /// The engine already saved this response with its final write (no second commit).
    pub already_stored: bool,
}

impl Reply {
    pub fn ok(body: serde_json::Value) -> Reply {
        Reply {
            status: StatusCode::OK,
            body,
            stored_body: None,
            already_stored: false,
        }
    }
}

fn json_response(status: StatusCode, body: String, replayed: bool) -> Response {
    let mut r = (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    if replayed {
        r.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    r
}

/// Runs a mutating request exactly once per idempotency key: claims the nonce (merchant
/// requests) and the key in one write, then replays, refuses or runs `f` and stores its answer.
/// 5xx answers are not stored, so the request can be retried.
/// What the idempotency wrapper needs to know of a mutating request.
pub struct Mutation {
    /// Whose key space: the merchant id, or `operator`.
    pub scope: String,
    /// The nonce to claim with the key (signed merchant requests).
    pub nonce: Option<NonceClaim>,
    pub method: Method,
    pub path_and_query: String,
    pub key: Option<String>,
    pub body: Bytes,
}

impl Signed {
    pub fn mutation(&self) -> Mutation {
        Mutation {
            scope: self.app.merchant_id.to_string(),
            nonce: Some(nonce_claim(self)),
            method: self.method.clone(),
            path_and_query: self.path_and_query.clone(),
            key: self.idempotency_key.clone(),
            body: self.body.clone(),
        }
    }
}

impl Operator {
    pub fn mutation(&self) -> Mutation {
        Mutation {
            scope: "operator".into(),
            nonce: None,
            method: self.method.clone(),
            path_and_query: self.path_and_query.clone(),
            key: self.idempotency_key.clone(),
            body: self.body.clone(),
        }
    }
}

/// The claim a running request holds on its idempotency key.
pub struct Claim {
    pub key: String,
    pub request_hash: String,
    /// Random per claim; completing or releasing the key needs it.
    pub token: String,
    /// `Some` when the admission is still to be made, by the handler's own first write
    /// ([`idempotent_deferred`]); `None` when it was made already.
    pub admission: Option<Admission>,
}

/// What a handler run under [`idempotent_deferred`] produced.
pub enum Answer {
    Reply(Reply),
    /// The admission in the handler's first write refused the request; nothing was done and
    /// nothing may be stored under the key.
    Refused(AdmissionOutcome),
}

/// Runs a mutating request exactly once per idempotency key: claims the nonce (merchant
/// requests) and the key in one write, then replays, refuses or runs `f` and stores its answer.
/// 5xx answers are not stored, so the request can be retried.
pub async fn idempotent<F, Fut>(engine: &AppState, m: Mutation, f: F) -> Result<Response, ApiError>
where
    F: FnOnce(AppState, Claim) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<Reply, ApiError>> + Send + 'static,
{
    run_idempotent(engine, m, false, move |engine, claim| async move {
        f(engine, claim).await.map(Answer::Reply)
    })
    .await
}

/// Like [`idempotent`], but the admission (nonce + key) is not written up front: `f` gets it in
/// [`Claim::admission`] and must make it in its own first write (the create-payment write does),
/// which saves a commit per request.
pub async fn idempotent_deferred<F, Fut>(
    engine: &AppState,
    m: Mutation,
    f: F,
) -> Result<Response, ApiError>
where
    F: FnOnce(AppState, Claim) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<Answer, ApiError>> + Send + 'static,
{
    run_idempotent(engine, m, true, f).await
}

/// The response for an admission that does not let the request run.
fn refusal(state: AdmissionOutcome) -> Result<Response, ApiError> {
    let state = match state {
        AdmissionOutcome::NonceReused => return Err(AuthError::NonceReused.into()),
        AdmissionOutcome::Admitted(state) => state.unwrap_or(IdempotencyState::New),
    };
    match state {
        IdempotencyState::Replay { status, body } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            Ok(json_response(status, body, true))
        }
        IdempotencyState::Mismatch => Err(ApiError::new(
            StatusCode::CONFLICT,
            "idempotency_error",
            "idempotency_key_reused",
            "this Idempotency-Key was used with a different request; use a new key",
        )
        .with_param("Idempotency-Key")),
        IdempotencyState::InProgress => Err(ApiError::new(
            StatusCode::CONFLICT,
            "idempotency_error",
            "idempotency_key_in_use",
            "a request with this Idempotency-Key is still being processed; retry shortly",
        )
        .with_param("Idempotency-Key")),
        IdempotencyState::New => {
            tracing::error!("an admitted request was treated as refused");
            Err(ApiError::internal())
        }
    }
}

async fn run_idempotent<F, Fut>(
    engine: &AppState,
    m: Mutation,
    deferred: bool,
    f: F,
) -> Result<Response, ApiError>
where
    F: FnOnce(AppState, Claim) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<Answer, ApiError>> + Send + 'static,
{
    let Mutation {
        scope,
        nonce,
        method,
        path_and_query,
        key,
        body,
    } = m;
    let key = key.as_deref().ok_or_else(|| {
        ApiError::invalid(
            "idempotency_key_missing",
            "every POST needs an Idempotency-Key header (a UUID is a good choice)",
        )
        .with_param("Idempotency-Key")
    })?;
    let key = IdempotencyKey::parse(key)?;
    let hash = request_hash(method.as_str(), &path_and_query, &body);
    let now = engine.now_ms();
    let token = engine.ids.token("clm");
    let admission = Admission {
        now_ms: now,
        nonce,
        idempotency: Some(IdempotencyClaim {
            scope: scope.clone(),
            key: key.as_str().to_string(),
            request_hash: hash.clone(),
            now_ms: now,
            stale_after_ms: engine.config.idempotency_stale_ms,
            token: token.clone(),
        }),
    };
    let admission = if deferred {
        Some(admission)
    } else {
        let outcome = engine
            .store
            .admit(&admission)
            .await
            .map_err(payrail_engine::EngineError::from)?;
        if !matches!(
            outcome,
            AdmissionOutcome::Admitted(None)
                | AdmissionOutcome::Admitted(Some(IdempotencyState::New))
        ) {
            return refusal(outcome);
        }
        None
    };
    // The work runs in its own task: if the client disconnects, hyper drops this handler, but
    // a payment half-way through its channel call must still get its answer applied and its
    // idempotent response saved (otherwise the key stays in progress and the retry waits).
    let request_id = crate::error::current_request_id().unwrap_or_default();
    let task_engine = engine.clone();
    let work = async move {
        let engine = task_engine;
        let claim = Claim {
            key: key.as_str().to_string(),
            request_hash: hash,
            token: token.clone(),
            admission,
        };
        let (status, text, stored, already_stored) = match f(engine.clone(), claim).await {
            Ok(Answer::Refused(outcome)) => return Err(outcome),
            Ok(Answer::Reply(reply)) => {
                let text = payrail_engine::views::json_text(&reply.body);
                let stored = reply
                    .stored_body
                    .map(|b| payrail_engine::views::json_text(&b))
                    .unwrap_or_else(|| text.clone());
                (reply.status, text, stored, reply.already_stored)
            }
            Err(e) => {
                let text = payrail_engine::views::json_text(&e.body());
                (e.status, text.clone(), text, false)
            }
        };
        // Not stored, so a retry runs again: server errors, and 403 (a frozen merchant may be
        // unfrozen; the answer is not a property of the request).
        let transient = status.is_server_error() || status == StatusCode::FORBIDDEN;
        let save = if already_stored {
            Ok(true)
        } else if transient {
            engine
                .store
                .release_idempotency(&scope, key.as_str(), &token)
                .await
                .map(|()| true)
        } else {
            engine
                .store
                .complete_idempotency(&IdempotencyCompletion {
                    scope: scope.clone(),
                    key: key.as_str().to_string(),
                    token,
                    status: status.as_u16(),
                    body: stored,
                })
                .await
        };
        match save {
            Ok(true) => {}
            Ok(false) => {
                // A retry took the stale claim over; its answer is the one replays get.
                tracing::warn!("idempotency claim was taken over; this response is not stored");
            }
            Err(e) => {
                // The work is done and durable; only the replay record is missing. A retry will
                // find the existing object through its out_trade_no, so answer normally.
                tracing::error!(error = %e, "cannot store idempotent response");
            }
        }
        Ok((status, text))
    };
    let task =
        tokio::spawn(REQUEST_ID.scope(request_id, work.instrument(tracing::Span::current())));
    match task.await {
        Ok(Ok((status, text))) => Ok(json_response(status, text, false)),
        Ok(Err(refused)) => refusal(refused),
        Err(e) => {
            tracing::error!(error = %e, "request task failed");
            Err(ApiError::internal())
        }
    }
}

/// Claims the nonce of a signed read request.
pub async fn admit_read(engine: &AppState, s: &Signed) -> Result<(), ApiError> {
    let admission = Admission {
        now_ms: engine.now_ms(),
        nonce: Some(nonce_claim(s)),
        idempotency: None,
    };
    match engine
        .store
        .admit(&admission)
        .await
        .map_err(payrail_engine::EngineError::from)?
    {
        AdmissionOutcome::NonceReused => Err(AuthError::NonceReused.into()),
        AdmissionOutcome::Admitted(_) => Ok(()),
    }
}

/// The nonce claim of a signed request: unique per key and signed timestamp (a replay repeats
/// both), kept until the timestamp has left the window (`NONCE_RETENTION_S`).
pub fn nonce_claim(s: &Signed) -> NonceClaim {
    NonceClaim {
        key_id: s.signed.key_id.clone(),
        nonce: s.signed.nonce.clone(),
        timestamp_s: s.signed.timestamp,
    }
}
