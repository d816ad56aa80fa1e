//! Request id, structured request log and HTTP metrics, around every request.

use crate::error::REQUEST_ID;
use crate::AppState;
use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use std::time::Instant;
use tracing::Instrument;

pub async fn observe(State(engine): State<AppState>, req: Request, next: Next) -> Response {
    let request_id = engine.ids.next::<payrail_domain::id::Request>().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().clone();
    let started = Instant::now();
    let span =
        tracing::info_span!("request", request_id = %request_id, method = %method, route = %route);
    let mut response = REQUEST_ID
        .scope(request_id.clone(), next.run(req).instrument(span.clone()))
        .await;
    let status = response.status().as_u16();
    let elapsed_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("request-id", v);
    }
    let status_s = status.to_string();
    engine.metrics.inc(
        "payrail_http_requests_total",
        "HTTP requests by route, method and status.",
        &[
            ("route", &route),
            ("method", method.as_str()),
            ("status", &status_s),
        ],
    );
    engine.metrics.observe_us(
        "payrail_http_request_duration_seconds",
        "HTTP request latency by route.",
        &[("route", &route), ("method", method.as_str())],
        elapsed_us,
    );
    let _g = span.enter();
    let latency_ms = elapsed_us as f64 / 1000.0;
    if status >= 500 {
        tracing::error!(status, latency_ms, "request failed");
    } else if route == "/metrics" || route == "/healthz" || route == "/readyz" {
        tracing::debug!(status, latency_ms, "request");
    } else {
        tracing::info!(status, latency_ms, "request");
    }
    response
}
