//! A client for payrail's APIs: signs merchant requests (docs/signing.md), sends operator
//! requests with the bearer token, and returns status, headers and JSON. Used by `payrail demo`,
//! `payrail bench` and the black-box tests; small enough to read as a reference integration.

use payrail_domain::signing;
use rand::RngCore;
use reqwest::{Client, Method};
use serde_json::Value;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("HTTP: {0}")]
    Http(#[from] reqwest::Error),
}

/// One HTTP exchange.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub request_id: Option<String>,
    pub replayed: bool,
    pub body: Value,
}

impl Answer {
    /// `error.code` of an error answer.
    pub fn error_code(&self) -> Option<&str> {
        self.body
            .get("error")
            .and_then(|e| e.get("code"))
            .and_then(Value::as_str)
    }
}

#[derive(Clone)]
pub struct Credentials {
    pub key_id: String,
    pub secret: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Credentials {{ key_id: {}, secret: [REDACTED] }}",
            self.key_id
        )
    }
}

#[derive(Clone)]
pub struct PayrailClient {
    http: Client,
    base_url: String,
}

pub fn nonce() -> String {
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl PayrailClient {
    pub fn new(base_url: &str) -> PayrailClient {
        let http = Client::builder()
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(1024)
            .build()
            .unwrap_or_default();
        PayrailClient {
            http,
            base_url: base_url.trim_end_matches('/').to_string(),
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    async fn send(&self, rb: reqwest::RequestBuilder) -> Result<Answer, ClientError> {
        let resp = rb.send().await?;
        let status = resp.status().as_u16();
        let request_id = resp
            .headers()
            .get("request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let replayed = resp.headers().get("idempotent-replayed").is_some();
        let bytes = resp.bytes().await?;
        let body = serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Ok(Answer {
            status,
            request_id,
            replayed,
            body,
        })
    }

    /// A signed merchant request. `path` includes any query string. `body` is sent verbatim.
    pub async fn signed(
        &self,
        creds: &Credentials,
        method: Method,
        path: &str,
        body: Option<&str>,
        idempotency_key: Option<&str>,
    ) -> Result<Answer, ClientError> {
        let body = body.unwrap_or("");
        let auth = signing::authorization_header(
            &creds.key_id,
            creds.secret.as_bytes(),
            method.as_str(),
            path,
            unix_now(),
            &nonce(),
            body.as_bytes(),
        );
        self.signed_raw(method, path, body, &auth, idempotency_key)
            .await
    }

    /// A signed POST with a fresh `Idempotency-Key`: a new operation, not a retry.
    pub async fn post_new(
        &self,
        creds: &Credentials,
        path: &str,
        body: Option<&str>,
    ) -> Result<Answer, ClientError> {
        self.signed(creds, Method::POST, path, body, Some(&nonce()))
            .await
    }

    /// Every payment of the merchant, newest first, following `has_more` / `starting_after`
    /// pages of 100, at most `pages_max` pages. `Err` carries a failed page's status and body.
    pub async fn list_all_payments(
        &self,
        creds: &Credentials,
        pages_max: usize,
    ) -> Result<Vec<Value>, String> {
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        for _ in 0..pages_max {
            let path = match &after {
                Some(a) => format!("/v1/payments?limit=100&starting_after={a}"),
                None => "/v1/payments?limit=100".to_string(),
            };
            let page = self
                .signed(creds, Method::GET, &path, None, None)
                .await
                .map_err(|e| e.to_string())?;
            if page.status != 200 {
                return Err(format!(
                    "listing payments failed: HTTP {} {}",
                    page.status, page.body
                ));
            }
            let data = page.body["data"].as_array().cloned().unwrap_or_default();
            after = data
                .last()
                .and_then(|p| p["id"].as_str())
                .map(str::to_string);
            all.extend(data);
            if page.body["has_more"] != Value::Bool(true) || after.is_none() {
                break;
            }
        }
        Ok(all)
    }

    /// Sends a request with a ready-made Authorization header (tests of the signature checks).
    pub async fn signed_raw(
        &self,
        method: Method,
        path: &str,
        body: &str,
        authorization: &str,
        idempotency_key: Option<&str>,
    ) -> Result<Answer, ClientError> {
        let mut rb = self
            .http
            .request(method, format!("{}{path}", self.base_url))
            .header("authorization", authorization);
        if !body.is_empty() {
            rb = rb
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        if let Some(k) = idempotency_key {
            rb = rb.header("idempotency-key", k);
        }
        self.send(rb).await
    }

    pub async fn operator(
        &self,
        token: &str,
        method: Method,
        path: &str,
        body: Option<&Value>,
        idempotency_key: Option<&str>,
    ) -> Result<Answer, ClientError> {
        let mut rb = self
            .http
            .request(method, format!("{}{path}", self.base_url))
            .bearer_auth(token);
        if let Some(b) = body {
            rb = rb
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        if let Some(k) = idempotency_key {
            rb = rb.header("idempotency-key", k);
        }
        self.send(rb).await
    }

    pub async fn get(&self, path: &str) -> Result<(u16, String), ClientError> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base_url))
            .send()
            .await?;
        let status = resp.status().as_u16();
        Ok((status, resp.text().await?))
    }

    /// Creates a merchant and an app through the operator API; returns the merchant id and the
    /// app's credentials.
    pub async fn onboard(
        &self,
        operator_token: &str,
        name: &str,
    ) -> Result<(String, Credentials), String> {
        let m = self
            .operator(
                operator_token,
                Method::POST,
                "/v1/operator/merchants",
                Some(&serde_json::json!({"name": name})),
                Some(&nonce()),
            )
            .await
            .map_err(|e| e.to_string())?;
        let merchant_id = m.body["id"]
            .as_str()
            .ok_or_else(|| format!("create merchant: HTTP {} {}", m.status, m.body))?
            .to_string();
        let a = self
            .operator(
                operator_token,
                Method::POST,
                &format!("/v1/operator/merchants/{merchant_id}/apps"),
                Some(&serde_json::json!({"name": format!("{name} app")})),
                Some(&nonce()),
            )
            .await
            .map_err(|e| e.to_string())?;
        let key_id = a.body["key_id"]
            .as_str()
            .ok_or_else(|| format!("create app: HTTP {} {}", a.status, a.body))?;
        let secret = a.body["secret"]
            .as_str()
            .ok_or("create app: no secret in response")?;
        Ok((
            merchant_id,
            Credentials {
                key_id: key_id.to_string(),
                secret: secret.to_string(),
            },
        ))
    }
}
