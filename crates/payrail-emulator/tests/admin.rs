//! The admin endpoints `payrail emulate` users script the emulator with, over HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use payrail_channels::alipay::{Alipay, AlipayConfig};
use payrail_channels::*;
use payrail_domain::input::PaymentMethod;
use payrail_domain::Secret;
use payrail_emulator::{spawn, ChannelKind, EmulatorConfig};
use serde_json::{json, Value};
use std::sync::Arc;

#[tokio::test]
async fn script_scan_clock_orders_and_deliveries_over_http() {
    tokio::time::timeout(TEST_BOUND, async {
        let mut cfg = EmulatorConfig::for_tests(ChannelKind::Alipay);
        cfg.start_ms = START_MS;
        let emu = spawn(cfg).await.unwrap();
        let cfg = |url: &str| AlipayConfig {
            gateway_url: format!("{}/gateway.do", emu.base_url),
            app_id: emu.config.merchant_id.clone(),
            app_private_key: Secret::new(payrail_emulator::testkeys::MERCHANT_PRIVATE_PEM.into()),
            alipay_public_key: emu.public_key_pem.clone(),
            seller_id: None,
            notify_url: url.into(),
            return_url: None,
            timeout_ms: 2_000,
        };
        let rx = Receiver::start(Arc::new(Alipay::new(cfg("http://127.0.0.1:9/x")).unwrap())).await;
        rx.refuse.store(1, std::sync::atomic::Ordering::SeqCst);
        let pay = Alipay::new(cfg(&rx.url)).unwrap();
        let http = reqwest::Client::new();
        let admin = |path: &str| format!("{}/__admin/{path}", emu.base_url);

        // A barcode payment scripted to wait for one query, then fail.
        let mut r = SubmitRequest::new(
            attempt(),
            cny(1000),
            "x",
            PaymentMethod::AlipayCode,
            START_MS,
            START_MS + 60_000,
        );
        r.auth_code = Some(Secret::new("284308793673642130".into()));
        let no = r.attempt_id.to_string();
        let ok: Value = http
            .post(admin("script"))
            .json(&json!({"out_trade_no": no, "user_paying_queries": 1, "fail": true}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(ok["ok"], true);
        assert_eq!(pay.submit(&r).await.outcome.label(), "processing");
        let q = QueryRequest {
            attempt_id: r.attempt_id,
            amount: r.amount,
            channel_trade_no: None,
            submitted_at_ms: START_MS,
            expires_at_ms: START_MS + 1_800_000,
        };
        assert_eq!(pay.query(&q).await.label(), "processing");
        assert_eq!(pay.query(&q).await.label(), "closed");
        let order: Value = http
            .get(admin(&format!("orders/{no}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(order["state"], "Failed");

        // A QR scanned through the admin endpoint; its notification refused once, then the
        // clock advanced over HTTP delivers the retry.
        let qr = SubmitRequest::new(
            attempt(),
            cny(1000),
            "x",
            PaymentMethod::AlipayQr,
            START_MS,
            START_MS + 60_000,
        );
        pay.submit(&qr).await;
        let scanned: Value = http
            .post(admin("scan"))
            .json(&json!({"out_trade_no": qr.attempt_id.to_string()}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(scanned["ok"], true);
        let now: Value = http
            .post(admin("clock/advance"))
            .json(&json!({"ms": 240_000}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(now["now_ms"], START_MS + 240_000);
        let clock: Value = http
            .get(admin("clock"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(clock["now_ms"], START_MS + 240_000);
        let d: Value = http
            .get(admin("deliveries"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let acked: Vec<bool> = d
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["acked"].as_bool().unwrap())
            .collect();
        assert_eq!(acked, [false, true]);
        assert_eq!(rx.count(), 2);
    })
    .await
    .expect("test timed out");
}
