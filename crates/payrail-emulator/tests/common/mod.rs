//! Shared pieces of the connector ↔ emulator tests: ids, a notification receiver, time bounds.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use axum::body::Bytes;
use axum::http::HeaderMap;
use payrail_channels::{Connector, InboundNotification};
use payrail_domain::{AttemptId, Currency, Money, RefundId};
use payrail_emulator::core::Rendered;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// 2026-11-22 10:00:00 Beijing: a fixed emulator clock, so bills never straddle midnight.
pub const START_MS: i64 = 1_795_312_800_000;

/// Every test is bounded: a hung call fails the test instead of hanging the suite.
pub const TEST_BOUND: Duration = Duration::from_secs(20);

pub fn attempt() -> AttemptId {
    AttemptId::generate(START_MS as u64, rand::random())
}

pub fn refund_id() -> RefundId {
    RefundId::generate(START_MS as u64, rand::random())
}

pub fn cny(minor: i64) -> Money {
    Money::new(minor, Currency::CNY)
}

/// Every request our endpoint received: headers and raw body.
pub type Received = Arc<Mutex<Vec<(HeaderMap, Vec<u8>)>>>;

/// Our notification endpoint: records every request and answers with the connector's exact
/// reply — refusing the first `refuse` ones.
pub struct Receiver {
    pub url: String,
    pub got: Received,
    pub refuse: Arc<AtomicU32>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    pub async fn start(connector: Arc<dyn Connector>) -> Receiver {
        let got: Received = Arc::default();
        let refuse = Arc::new(AtomicU32::new(0));
        let (g, r) = (got.clone(), refuse.clone());
        let app = axum::Router::new().fallback(move |headers: HeaderMap, body: Bytes| {
            let (g, r, c) = (g.clone(), r.clone(), connector.clone());
            async move {
                g.lock().unwrap().push((headers, body.to_vec()));
                let accept = r
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_err();
                let reply = c.notification_reply(accept);
                let mut resp = axum::response::Response::new(axum::body::Body::from(reply.body));
                *resp.status_mut() = axum::http::StatusCode::from_u16(reply.status).unwrap();
                if let Some(ct) = reply.content_type {
                    resp.headers_mut()
                        .insert("content-type", ct.parse().unwrap());
                }
                resp
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/notify", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver {
            url,
            got,
            refuse,
            task,
        }
    }

    pub fn count(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    pub fn inbound(&self, i: usize, now_ms: i64) -> InboundNotification {
        let (headers, body) = self.got.lock().unwrap()[i].clone();
        InboundNotification {
            headers,
            body,
            now_ms,
        }
    }
}

/// A notification rendered by the emulator, as our endpoint would receive it.
pub fn inbound(r: &Rendered, now_ms: i64) -> InboundNotification {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", r.content_type.parse().unwrap());
    for (k, v) in &r.headers {
        headers.insert(
            axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    InboundNotification {
        headers,
        body: r.body.clone(),
        now_ms,
    }
}

pub fn beijing_date(ms: i64) -> payrail_domain::civil::Date {
    payrail_domain::civil::DateTime::from_unix_ms(ms, payrail_domain::civil::CHINA_OFFSET_MINUTES)
        .unwrap()
        .date
}
