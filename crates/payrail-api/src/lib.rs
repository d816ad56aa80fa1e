//! The HTTP API: merchant API v1 (signed), operator API (bearer token), health, metrics and the
//! OpenAPI document. Handlers parse and validate, then call the engine; they hold no business
//! rules of their own.

pub mod channels;
pub mod error;
mod events;
mod ledger;
mod merchant;
mod middleware;
mod operator;
mod payouts;
mod refunds;
mod request;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use error::ApiError;
use payrail_engine::Engine;
use std::sync::Arc;

/// Largest request body accepted.
pub const BODY_LIMIT_BYTES: usize = 64 * 1024;

pub type AppState = Arc<Engine>;

/// The whole HTTP application. `main` binds it to a listener; tests bind it to port 0.
pub fn app(engine: Arc<Engine>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .merge(merchant::router())
        .merge(operator::router())
        .merge(channels::router())
        .merge(refunds::router())
        .merge(payouts::router())
        .merge(events::router())
        .merge(ledger::router())
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            engine.clone(),
            middleware::observe,
        ))
        .with_state(engine)
}

async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "ok"}))
}

/// Ready when the database answers.
async fn readyz(State(engine): State<AppState>) -> Response {
    let check = async {
        engine.store.get_setting("operator_token_sha256").await?;
        engine.store.check_writable().await
    };
    match check.await {
        Ok(_) => {
            axum::Json(serde_json::json!({"status": "ready", "database": engine.store.backend()}))
                .into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "readiness check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(serde_json::json!({"status": "unavailable"})),
            )
                .into_response()
        }
    }
}

async fn metrics(State(engine): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        engine.metrics.render(),
    )
        .into_response()
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
        .into_response()
}

async fn fallback() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "route_not_found",
        "no such route; see /openapi.json",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        "method not allowed on this route",
    )
}
