//! The payment lifecycle through real channel protocols: the payrail server (real router on a
//! loopback port) with channel accounts pointing at the WeChat Pay, Alipay and UnionPay
//! emulators, over real HTTP both ways — orders go out signed, notifications come back signed
//! to `/v1/channel-notify/{account}`. Every test is bounded in time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use payrail_client::nonce;
use payrail_emulator::core::OrderState;
use payrail_emulator::{ChannelKind, Script};
use payrail_engine::EngineConfig;
use reqwest::Method;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wechat_qr_payment_completes_by_signed_notification() {
    bounded(async {
        let h = harness(config(), false).await;
        let emu = emulator(ChannelKind::WechatPay).await;
        let _account = h.account(&emu).await;
        let c = h.merchant().await;
        let a = h
            .create(&c, json!({"amount": 1000, "currency": "CNY", "out_trade_no": "wx-qr-1", "subject": "Tea", "method": "wechat_native"}))
            .await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.body["status"], "processing");
        assert_eq!(a.body["channel"], "wechatpay");
        assert_eq!(a.body["next_action"]["type"], "display_qr_code", "{}", a.body);
        let id = a.body["id"].as_str().unwrap();
        // The payer scans; the channel notifies our endpoint, which verifies and applies it.
        let order = h.order_no(id).await;
        emu.scan(&order).unwrap();
        emu.flush().await;
        let p = h.wait_status(&c, id, "succeeded").await;
        assert!(p.body["channel_trade_no"].is_string(), "{}", p.body);
        let d = emu.deliveries();
        assert_eq!(d.len(), 1, "acknowledged at the first send: {d:?}");
        assert!(d[0].acked);
        // A repeat of the same notification is acknowledged and changes nothing.
        let again = emu.render_payment_notification(&order).unwrap();
        let account = h.engine.store.list_channel_accounts().await.unwrap()[0].id.to_string();
        let (status, _) = h.post_notification(&account, &again).await;
        assert!((200..300).contains(&status), "{status}");
        assert_eq!(h.get(&c, id).await.body["status"], "succeeded");
        let events = h
            .engine
            .store
            .list_events(c_merchant(&h, &c).await, 0, 100)
            .await
            .unwrap();
        assert_eq!(
            events.iter().filter(|e| e.object_id == id).count(),
            1,
            "one event for one status change"
        );
        // The probe is refused (WeChat checks that endpoints verify signatures).
        let probe = emu
            .send_probe(&format!("{}/v1/channel-notify/{account}", h.base))
            .await
            .unwrap();
        assert!(probe >= 400, "the signature probe must be refused, got {probe}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_validly_signed_notification_for_another_amount_changes_nothing() {
    bounded(async {
        let h = harness(config(), false).await;
        let emu = emulator(ChannelKind::Alipay).await;
        let account = h.account(&emu).await;
        let c = h.merchant().await;
        let a = h
            .create(&c, json!({"amount": 1000, "currency": "CNY", "out_trade_no": "ali-qr-1", "subject": "Tea", "method": "alipay_qr"}))
            .await;
        assert_eq!(a.body["status"], "processing", "{}", a.body);
        let id = a.body["id"].as_str().unwrap();
        let order = h.order_no(id).await;
        let tampered = emu.render_tampered_notification(&order, 1).unwrap();
        let (status, body) = h.post_notification(&account, &tampered).await;
        // Acknowledged (so the channel stops repeating it), but not applied.
        assert_eq!((status, body.as_str()), (200, "success"));
        assert_eq!(h.get(&c, id).await.body["status"], "processing");
        let alerts = h.alerts("notification_mismatch").await;
        assert_eq!(alerts.len(), 1);
        assert!(alerts[0].detail.contains("amount"), "{}", alerts[0].detail);
        // A notification with a bad signature is refused outright.
        let mut forged = emu.render_payment_notification(&order).unwrap();
        forged.body = String::from_utf8(forged.body)
            .unwrap()
            .replace("total_amount=10.00", "total_amount=10.01")
            .into_bytes();
        let (status, body) = h.post_notification(&account, &forged).await;
        assert!(status != 200 || body != "success", "a forged notification was accepted");
        assert_eq!(h.get(&c, id).await.body["status"], "processing");
        // The genuine one is applied.
        let genuine = emu.render_payment_notification(&order).unwrap();
        assert_eq!(h.post_notification(&account, &genuine).await, (200, "success".into()));
        assert_eq!(h.get(&c, id).await.body["status"], "succeeded");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payment_code_user_paying_then_paid_via_status_queries() {
    bounded(async {
        let h = harness(config(), true).await;
        let emu = emulator(ChannelKind::Alipay).await;
        h.account(&emu).await;
        let c = h.merchant().await;
        // Amount ..02: "user paying" to the submit and two queries, then paid.
        let a = h
            .create(&c, json!({"amount": 1002, "currency": "CNY", "out_trade_no": "ali-code-1", "subject": "Tea", "method": "alipay_code", "auth_code": "287654321098765432"}))
            .await;
        assert_eq!((a.status, a.body["status"].as_str()), (200, Some("processing")), "{}", a.body);
        let id = a.body["id"].as_str().unwrap();
        h.wait_status(&c, id, "succeeded").await;
        // The payment code is never stored or shown.
        assert!(!a.body.to_string().contains("287654321098765432"));
        // A payment-code method without the code is refused, nothing written.
        let bad = h
            .create(&c, json!({"amount": 1000, "currency": "CNY", "out_trade_no": "ali-code-2", "subject": "Tea", "method": "alipay_code"}))
            .await;
        assert_eq!((bad.status, bad.error_code()), (400, Some("parameter_missing")));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unconfirmed_payment_code_is_cancelled_at_the_channel_after_the_window() {
    bounded(async {
        let cfg = EngineConfig {
            barcode_window_ms: 1,
            ..config()
        };
        let h = harness(cfg, true).await;
        let emu = emulator(ChannelKind::WechatPay).await;
        h.account(&emu).await;
        let c = h.merchant().await;
        let a = h
            .create(&c, json!({"amount": 1002, "currency": "CNY", "out_trade_no": "wx-code-1", "subject": "Tea", "method": "wechat_code", "auth_code": "134567890123456789"}))
            .await;
        assert_eq!(a.body["status"], "processing", "{}", a.body);
        let id = a.body["id"].as_str().unwrap();
        h.wait_status(&c, id, "cancelled").await;
        let order = h.order_no(id).await;
        let o = emu.order(&order).unwrap();
        assert!(format!("{:?}", o.state).contains("Revoked") || format!("{:?}", o.state).contains("Reversed") || format!("{:?}", o.state).contains("Cancel"), "{o:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_merchant_cancels_an_open_payment_code_payment() {
    bounded(async {
        let h = harness(config(), false).await;
        let emu = emulator(ChannelKind::WechatPay).await;
        h.account(&emu).await;
        let c = h.merchant().await;
        let a = h
            .create(&c, json!({"amount": 1002, "currency": "CNY", "out_trade_no": "wx-code-2", "subject": "Tea", "method": "wechat_code", "auth_code": "134567890123456780"}))
            .await;
        let id = a.body["id"].as_str().unwrap();
        let cancel = h
            .client
            .signed(&c, Method::POST, &format!("/v1/payments/{id}/cancel"), None, Some(&nonce()))
            .await
            .unwrap();
        assert_eq!((cancel.status, cancel.body["status"].as_str()), (200, Some("cancelled")), "{}", cancel.body);
        // Cancelling again is a no-op; a QR payment's channel cannot cancel (close it instead).
        let again = h
            .client
            .signed(&c, Method::POST, &format!("/v1/payments/{id}/cancel"), None, Some(&nonce()))
            .await
            .unwrap();
        assert_eq!(again.body["status"], "cancelled");
        let qr = h
            .create(&c, json!({"amount": 1000, "currency": "CNY", "out_trade_no": "wx-qr-9", "subject": "Tea", "method": "wechat_native"}))
            .await;
        let qid = qr.body["id"].as_str().unwrap();
        let refused = h
            .client
            .signed(&c, Method::POST, &format!("/v1/payments/{qid}/cancel"), None, Some(&nonce()))
            .await
            .unwrap();
        assert_eq!((refused.status, refused.error_code()), (409, Some("cancel_not_supported")), "{}", refused.body);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_channel_does_not_slow_the_others() {
    bounded(async {
        let cfg = EngineConfig {
            channel_concurrency_max: 4,
            channel_queue_ms: 20,
            channel_timeout_ms: 1_500,
            ..config()
        };
        let h = Arc::new(harness(cfg, false).await);
        let wx = emulator(ChannelKind::WechatPay).await;
        let ali = emulator(ChannelKind::Alipay).await;
        h.account(&wx).await;
        h.account(&ali).await;
        let c = h.merchant().await;
        // WeChat hangs every order (amount ..04 holds the answer 30 s): 12 of them at once.
        let mut hanging = Vec::new();
        for i in 0..12 {
            let (h, c) = (h.clone(), c.clone());
            hanging.push(tokio::spawn(async move {
                h.create(&c, json!({"amount": 1004, "currency": "CNY", "out_trade_no": format!("wx-hang-{i}"), "subject": "Tea", "method": "wechat_native"})).await
            }));
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        // Meanwhile Alipay payments keep their latency.
        let mut worst = Duration::ZERO;
        for i in 0..10 {
            let t0 = Instant::now();
            let a = h
                .create(&c, json!({"amount": 1000, "currency": "CNY", "out_trade_no": format!("ali-{i}"), "subject": "Tea", "method": "alipay_qr"}))
                .await;
            worst = worst.max(t0.elapsed());
            assert_eq!((a.status, a.body["status"].as_str()), (200, Some("processing")), "{}", a.body);
        }
        assert!(worst < Duration::from_millis(700), "an Alipay payment took {worst:?} while WeChat hung");
        let mut statuses = std::collections::BTreeMap::new();
        for t in hanging {
            let a = t.await.unwrap();
            let key = a.error_code().map_or_else(|| a.body["status"].as_str().unwrap_or("?").to_string(), str::to_string);
            *statuses.entry(key).or_insert(0) += 1;
        }
        // Four took the slots and timed out as unknown (processing); the rest failed fast.
        assert_eq!(statuses.get("processing"), Some(&4), "{statuses:?}");
        assert_eq!(statuses.get("channel_busy"), Some(&8), "{statuses:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unionpay_web_payment_and_disabled_accounts() {
    bounded(async {
        let h = harness(config(), false).await;
        let emu = emulator(ChannelKind::UnionPay).await;
        let account = h.account(&emu).await;
        let c = h.merchant().await;
        let a = h
            .create(&c, json!({"amount": 1000, "currency": "CNY", "out_trade_no": "up-1", "subject": "Tea", "method": "unionpay_web", "return_url": "https://shop.example/done"}))
            .await;
        assert_eq!(a.body["status"], "processing", "{}", a.body);
        assert_eq!(a.body["next_action"]["type"], "post_form", "{}", a.body);
        let id = a.body["id"].as_str().unwrap();
        // The payer's browser posts the signed form to UnionPay, then pays there.
        let form: Vec<(String, String)> = a.body["next_action"]["fields"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        let page = reqwest::Client::new()
            .post(a.body["next_action"]["url"].as_str().unwrap())
            .form(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(page.status(), 200);
        // UnionPay order numbers are letters and digits only: our attempt id without its `_`.
        let order = h.order_no(id).await.replace('_', "");
        emu.scan(&order).unwrap();
        emu.flush().await;
        h.wait_status(&c, id, "succeeded").await;
        // The account's keys never come back.
        let got = h
            .client
            .operator(&h.op, Method::GET, &format!("/v1/operator/channel-accounts/{account}"), None, None)
            .await
            .unwrap();
        assert_eq!(got.status, 200);
        assert!(!got.body.to_string().contains("PRIVATE KEY"), "{}", got.body);
        assert!(got.body["notify_url"].as_str().unwrap().ends_with(&account));
        // Disabled: no new payments through it, but its payments stay reachable.
        let d = h
            .client
            .operator(&h.op, Method::POST, &format!("/v1/operator/channel-accounts/{account}/disable"), None, Some(&nonce()))
            .await
            .unwrap();
        assert_eq!(d.body["status"], "disabled", "{}", d.body);
        let refused = h
            .create(&c, json!({"amount": 1000, "currency": "CNY", "out_trade_no": "up-2", "subject": "Tea", "method": "unionpay_web"}))
            .await;
        assert_eq!((refused.status, refused.error_code()), (400, Some("method_not_available")), "{}", refused.body);
        let r = h
            .client
            .operator(&h.op, Method::POST, &format!("/v1/operator/payments/{id}/requery"), None, Some(&nonce()))
            .await
            .unwrap();
        assert_eq!(r.body["status"], "succeeded", "{}", r.body);
        // An account with keys that do not parse is refused and nothing is stored.
        let mut bad = account_body(&emu, "broken", 0);
        bad["secrets"]["signing_key"] = json!("not a key");
        let b = h
            .client
            .operator(&h.op, Method::POST, "/v1/operator/channel-accounts", Some(&bad), Some(&nonce()))
            .await
            .unwrap();
        assert_eq!(b.status, 400, "{}", b.body);
        assert_eq!(h.engine.store.list_channel_accounts().await.unwrap().len(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refunds_through_the_channels_never_exceed_the_payment() {
    bounded(async {
        let h = harness(config(), true).await;
        for kind in [ChannelKind::WechatPay, ChannelKind::Alipay] {
            let emu = emulator(kind).await;
            let account = h.account(&emu).await;
            let c = h.merchant().await;
            let method = match kind {
                ChannelKind::WechatPay => "wechat_native",
                _ => "alipay_qr",
            };
            let a = h
                .create(&c, json!({"amount": 1000, "currency": "CNY", "out_trade_no": format!("r-{method}"), "subject": "Tea", "method": method}))
                .await;
            let id = a.body["id"].as_str().unwrap().to_string();
            let order = h.order_no(&id).await;
            emu.scan(&order).unwrap();
            emu.flush().await;
            h.wait_status(&c, &id, "succeeded").await;
            // Partial, then the rest, then one fen too many.
            let refund = |no: &str, amount: i64| {
                let body = json!({"payment_id": id, "amount": amount, "out_refund_no": no});
                let (h, c) = (&h, &c);
                async move {
                    h.client
                        .signed(c, Method::POST, "/v1/refunds", Some(&body.to_string()), Some(&nonce()))
                        .await
                        .unwrap()
                }
            };
            let r1 = refund("rf-1", 400).await;
            assert_eq!(r1.status, 200, "{}", r1.body);
            let r2 = refund("rf-2", 600).await;
            assert_eq!(r2.status, 200, "{}", r2.body);
            let over = refund("rf-3", 1).await;
            assert_eq!((over.status, over.error_code()), (409, Some("refund_exceeds_payment")), "{}", over.body);
            // Both end succeeded (at once, by notification or by the refund query).
            emu.flush().await;
            let deadline = Instant::now() + Duration::from_secs(10);
            for r in [&r1, &r2] {
                let rid = r.body["id"].as_str().unwrap();
                loop {
                    let got = h
                        .client
                        .signed(&c, Method::GET, &format!("/v1/refunds/{rid}"), None, None)
                        .await
                        .unwrap();
                    if got.body["status"] == "succeeded" {
                        break;
                    }
                    assert!(Instant::now() < deadline, "{method}: refund still {}", got.body);
                    emu.flush().await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            let p = h.get(&c, &id).await;
            assert_eq!((p.body["amount_refunded"].as_i64(), p.body["amount_refundable"].as_i64()), (Some(1000), Some(0)), "{}", p.body);
            // The channel's own books agree: 1000 paid, 1000 refunded in two refunds, no more.
            let lines: Vec<_> = emu
                .ledger()
                .into_iter()
                .filter(|l| l.out_trade_no.replace('_', "") == order.replace('_', ""))
                .collect();
            let paid: i64 = lines.iter().filter(|l| !l.refund).map(|l| l.amount_fen).sum();
            let refunds: Vec<i64> = lines.iter().filter(|l| l.refund).map(|l| l.amount_fen).collect();
            assert_eq!(paid, 1000, "{method}: {lines:?}");
            assert_eq!(refunds.len(), 2, "{method}: {lines:?}");
            assert_eq!(refunds.iter().sum::<i64>(), 1000, "{method}: {lines:?}");
            let _ = account;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_final_state_reaches_the_merchant_as_a_signed_webhook() {
    bounded(async {
        let cfg = EngineConfig {
            webhook_allow_private_targets: true,
            ..config()
        };
        let h = harness_full(cfg, true, true).await;
        let emu = emulator(ChannelKind::WechatPay).await;
        h.account(&emu).await;
        let (c_mch, c) = h.client.onboard(&h.op, "Shop").await.unwrap();
        let _ = c_mch;
        let (url, got) = webhook_receiver().await;
        let a = h
            .create(&c, json!({"amount": 1000, "currency": "CNY", "out_trade_no": "wh-1", "subject": "Tea", "method": "wechat_native", "notify_url": url}))
            .await;
        let id = a.body["id"].as_str().unwrap().to_string();
        let order = h.order_no(&id).await;
        emu.scan(&order).unwrap();
        emu.flush().await;
        h.wait_status(&c, &id, "succeeded").await;
        let r = h
            .client
            .signed(&c, Method::POST, "/v1/refunds", Some(&json!({"payment_id": id, "amount": 300, "out_refund_no": "wh-r1"}).to_string()), Some(&nonce()))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        let rid = r.body["id"].as_str().unwrap().to_string();
        // Wait for both events at the merchant's endpoint.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            emu.flush().await;
            let types: Vec<String> = got
                .lock()
                .unwrap()
                .iter()
                .map(|(hd, _)| hd.get("payrail-event-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string())
                .collect();
            if types.contains(&"payment.succeeded".to_string()) && types.contains(&"refund.succeeded".to_string()) {
                break;
            }
            assert!(Instant::now() < deadline, "webhooks so far: {types:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Each is signed with the app's secret over "t.body" and names its object.
        let deliveries = got.lock().unwrap().clone();
        for (headers, body) in &deliveries {
            let sig = headers.get("payrail-signature").unwrap().to_str().unwrap();
            payrail_domain::webhook::verify_signature(
                c.secret.as_bytes(),
                sig,
                body,
                payrail_client::unix_now(),
                300,
            )
            .unwrap();
            let event: Value = serde_json::from_slice(body).unwrap();
            let object = &event["data"]["object"];
            match event["type"].as_str().unwrap() {
                "payment.succeeded" => assert_eq!(object["id"], id.as_str()),
                "refund.succeeded" => {
                    assert_eq!((object["id"].as_str(), object["amount"].as_i64()), (Some(rid.as_str()), Some(300)))
                }
                other => panic!("unexpected event {other}"),
            }
        }
        // A forged signature does not verify.
        let (_, body) = &deliveries[0];
        assert!(payrail_domain::webhook::verify_signature(b"sk_other", deliveries[0].0.get("payrail-signature").unwrap().to_str().unwrap(), body, payrail_client::unix_now(), 300).is_err());
    })
    .await;
}

/// Review finding (idempotency): a create-payment replay must return the stored answer. The
/// deferred admission runs inside the create write, but `Engine::create_payment` routes the
/// method (and takes a bulkhead slot, and checks the merchant) *before* that write, so a retry
/// of a request that already succeeded is answered from the current routing instead of from
/// the idempotency record. Here the only Alipay account is disabled between the first try and
/// the retry (a POS whose response was lost): the retry is told `400 method_not_available`
/// although the payer was charged — the cashier would ask the payer to pay again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn review_a_replayed_create_returns_the_stored_answer_even_if_routing_changed() {
    bounded(async {
        let h = harness(config(), false).await;
        let emu = emulator(ChannelKind::Alipay).await;
        let account = h.account(&emu).await;
        let c = h.merchant().await;
        let key = nonce();
        let body = json!({"amount": 1000, "currency": "CNY", "out_trade_no": "review-replay-1", "subject": "Tea", "method": "alipay_code", "auth_code": "287654321098765400"}).to_string();
        let first = h
            .client
            .signed(&c, Method::POST, "/v1/payments", Some(&body), Some(&key))
            .await
            .unwrap();
        assert_eq!((first.status, first.body["status"].as_str()), (200, Some("succeeded")), "{}", first.body);
        let d = h
            .client
            .operator(&h.op, Method::POST, &format!("/v1/operator/channel-accounts/{account}/disable"), None, Some(&nonce()))
            .await
            .unwrap();
        assert_eq!(d.body["status"], "disabled", "{}", d.body);
        // The same request again (new nonce, same Idempotency-Key and body): a replay.
        let retry = h
            .client
            .signed(&c, Method::POST, "/v1/payments", Some(&body), Some(&key))
            .await
            .unwrap();
        assert_eq!(
            (retry.status, retry.replayed, retry.body["id"].clone()),
            (200, true, first.body["id"].clone()),
            "a replay of a succeeded payment must return it, got {} {}",
            retry.status,
            retry.body
        );
    })
    .await;
}

/// A payment-code script: the payer never confirms (USERPAYING / 10003 / `05` to every query),
/// and the first `cancel_retries` cancels answer "retry".
fn never_confirmed(cancel_retries: u32) -> Script {
    Script {
        user_paying_queries: 1_000_000,
        cancel_retries,
        ..Script::default()
    }
}

const DAY_MS: i64 = 86_400_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_unpaid_orders_are_closed_at_wechat_and_alipay() {
    bounded(async {
        let h = harness(config(), true).await;
        let wx = emulator(ChannelKind::WechatPay).await;
        let ali = emulator(ChannelKind::Alipay).await;
        h.account(&wx).await;
        h.account(&ali).await;
        let c = h.merchant().await;
        let mut open = Vec::new();
        for (method, emu) in [("wechat_native", &wx), ("alipay_qr", &ali)] {
            let a = h
                .create(&c, json!({"amount": 1000, "currency": "CNY", "out_trade_no": format!("exp-{method}"), "subject": "Tea", "method": method, "expires_in": 60}))
                .await;
            assert_eq!(a.body["status"], "processing", "{}", a.body);
            let id = a.body["id"].as_str().unwrap().to_string();
            let order = h.order_no(&id).await;
            open.push((method, emu, id, order));
        }
        // Not expired yet: the worker only queries, the orders stay open at the channels.
        tokio::time::sleep(Duration::from_millis(300)).await;
        for (method, emu, id, order) in &open {
            assert_eq!(h.get(&c, id).await.body["status"], "processing", "{method}");
            let state = emu.order(order).map(|o| o.state);
            assert!(matches!(state, None | Some(OrderState::NotPaid)), "{method}: {state:?}");
        }
        // The server's clock passes expires_at: the worker closes each order at its channel.
        h.clock.jump_ms(61_000);
        for (method, emu, id, order) in &open {
            h.wait_status(&c, id, "closed").await;
            assert_eq!(h.events_of(&c, id).await, ["payment.closed"], "{method}");
            let o = emu.order(order).unwrap();
            match *method {
                "wechat_native" => assert_eq!(o.state, OrderState::Closed),
                // Alipay has no trade before the scan: the close falls back to a cancel, which
                // voids the order number (`action=close`, nothing refunded).
                _ => assert_eq!((o.state, o.refunds.len()), (OrderState::Revoked, 0)),
            }
            // The payer is too late, and the channel's own query agrees with our status.
            assert!(emu.scan(order).is_err(), "{method}: a closed order was paid");
            let r = h
                .client
                .operator(&h.op, Method::POST, &format!("/v1/operator/payments/{id}/requery"), None, Some(&nonce()))
                .await
                .unwrap();
            assert_eq!(r.body["status"], "closed", "{method}: {}", r.body);
        }
        assert!(h.alerts("channel_conflict").await.is_empty());
    })
    .await;
}

/// Issue 3: an expired unpaid UnionPay payment used to stay `processing` forever (queries
/// answer `34` before and after `payTimeout`). The emulator now refuses the payment after
/// `payTimeout`, and the close is confirmed from the reconciliation files of the order's days.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_unpaid_unionpay_payment_is_closed_once_the_reconciliation_files_confirm() {
    bounded(async {
        let h = harness(config(), true).await;
        let emu = emulator(ChannelKind::UnionPay).await;
        h.account(&emu).await;
        let c = h.merchant().await;
        let create = |otn: &'static str| {
            let (h, c) = (&h, &c);
            async move {
                let a = h
                    .create(c, json!({"amount": 1000, "currency": "CNY", "out_trade_no": otn, "subject": "Tea", "method": "unionpay_web", "expires_in": 60}))
                    .await;
                assert_eq!(a.body["status"], "processing", "{}", a.body);
                // payTimeout is the payment's expiry, Beijing time.
                let expires = a.body["expires_at"].as_i64().unwrap() * 1000;
                assert_eq!(
                    a.body["next_action"]["fields"]["payTimeout"],
                    payrail_emulator::crypto::compact(expires),
                    "{}",
                    a.body
                );
                // The payer's browser reaches the cashier: the order exists at UnionPay.
                let form: Vec<(String, String)> = a.body["next_action"]["fields"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                    .collect();
                let url = a.body["next_action"]["url"].as_str().unwrap().to_string();
                let page = reqwest::Client::new().post(&url).form(&form).send().await.unwrap();
                assert!(page.text().await.unwrap().contains("cashier"));
                let id = a.body["id"].as_str().unwrap().to_string();
                let order = h.order_no(&id).await.replace('_', "");
                (id, order, url, form)
            }
        };
        let (unpaid, unpaid_order, url, form) = create("up-exp-1").await;
        // Paid in time, but its notification never reached us.
        let (paid, paid_order, _, _) = create("up-exp-2").await;
        emu.scan(&paid_order).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(h.get(&c, &unpaid).await.body["status"], "processing");

        // Past expiry on our clock: the close's query reports the paid one (its notification
        // was never sent): succeeded, never closed.
        h.clock.jump_ms(61_000);
        h.wait_status(&c, &paid, "succeeded").await;
        // Past payTimeout at UnionPay too: the payment is refused, and so is a late cashier, but
        // the query still answers "no such transaction" and the order's day's file is not out.
        emu.advance(61_000).await;
        assert!(emu.scan(&unpaid_order).is_err(), "paid after payTimeout");
        let late = reqwest::Client::new().post(&url).form(&form).send().await.unwrap();
        assert!(late.text().await.unwrap().contains("payTimeout"), "a cashier after payTimeout");
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(h.get(&c, &unpaid).await.body["status"], "processing", "no file, no close");

        // Days later the files of the order's day and the next are out and do not list it.
        emu.advance(3 * DAY_MS).await;
        h.wait_status(&c, &unpaid, "closed").await;
        assert_eq!(h.events_of(&c, &unpaid).await, ["payment.closed"]);
        assert_eq!(h.events_of(&c, &paid).await, ["payment.succeeded"]);
        let o = emu.order(&unpaid_order).unwrap();
        assert_eq!((o.state, o.paid_at_ms), (OrderState::NotPaid, None));
        assert!(emu.ledger().iter().all(|l| l.out_trade_no != unpaid_order));
        // A close confirmed this way is expected to take days: no alert was raised for it.
        assert!(h.alerts("payment_unresolved").await.is_empty());
        assert!(h.alerts("channel_conflict").await.is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_code_whose_cancel_the_channel_asks_to_retry_is_cancelled_on_a_later_call() {
    bounded(async {
        let cfg = EngineConfig {
            barcode_poll_ms: 100,
            barcode_window_ms: 250,
            ..config()
        };
        let h = harness(cfg, true).await;
        let wx = emulator(ChannelKind::WechatPay).await;
        let ali = emulator(ChannelKind::Alipay).await;
        h.account(&wx).await;
        h.account(&ali).await;
        let c = h.merchant().await;
        for (method, emu, code) in [("wechat_code", &wx, "134567890123456789"), ("alipay_code", &ali, "287654321098765432")] {
            // Still "user paying" past the window; the first two cancels answer retry
            // (WeChat recall=Y, Alipay retry_flag=Y), the third cancels.
            emu.script_amount(1009, never_confirmed(2));
            let a = h
                .create(&c, json!({"amount": 1009, "currency": "CNY", "out_trade_no": format!("retry-{method}"), "subject": "Tea", "method": method, "auth_code": code}))
                .await;
            assert_eq!(a.body["status"], "processing", "{}", a.body);
            let id = a.body["id"].as_str().unwrap();
            h.wait_status(&c, id, "cancelled").await;
            let o = emu.order(&h.order_no(id).await).unwrap();
            assert_eq!((o.state, o.cancels), (OrderState::Revoked, 3), "{method}: {o:?}");
            assert_eq!(h.events_of(&c, id).await, ["payment.cancelled"], "{method}");
            // Nothing more is sent once it is cancelled.
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(emu.order(&o.out_trade_no).unwrap().cancels, 3, "{method}");
        }
        assert!(h.alerts("cancel_unconfirmed").await.is_empty());
    })
    .await;
}

/// Bug: `cancel_calls` counted the runs inside the window as ⌊window / poll⌋ + 1, one too many
/// when the window is a multiple of the poll (the defaults: 30 s and 5 s), so a channel that
/// kept asking to retry got `CANCEL_CALLS_MAX` + 1 cancels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_calls_stop_at_cancel_calls_max_when_the_window_is_a_multiple_of_the_poll() {
    bounded(async {
        let cfg = EngineConfig {
            barcode_poll_ms: 250,
            barcode_window_ms: 500,
            ..config()
        };
        let h = harness(cfg, true).await;
        let emu = emulator(ChannelKind::WechatPay).await;
        h.account(&emu).await;
        let c = h.merchant().await;
        emu.script_amount(1009, never_confirmed(u32::MAX));
        let a = h
            .create(&c, json!({"amount": 1009, "currency": "CNY", "out_trade_no": "wx-never", "subject": "Tea", "method": "wechat_code", "auth_code": "134567890123456789"}))
            .await;
        let id = a.body["id"].as_str().unwrap();
        let order = h.order_no(id).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while h.alerts("cancel_unconfirmed").await.is_empty() {
            assert!(Instant::now() < deadline, "no cancel_unconfirmed alert; cancels so far {:?}", emu.order(&order).map(|o| o.cancels));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let max = u32::try_from(payrail_engine::barcode::CANCEL_CALLS_MAX).unwrap();
        assert_eq!(emu.order(&order).unwrap().cancels, max);
        // The job keeps asking for the status, but cancels no more; unknown is never failure.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(emu.order(&order).unwrap().cancels, max);
        assert_eq!(h.get(&c, id).await.body["status"], "processing");
        assert_eq!(h.alerts("cancel_unconfirmed").await.len(), 1);
        assert!(h.events_of(&c, id).await.is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_merchant_cancels_an_alipay_payment_code_repeating_while_the_channel_asks() {
    bounded(async {
        let h = harness(config(), false).await;
        let emu = emulator(ChannelKind::Alipay).await;
        h.account(&emu).await;
        let c = h.merchant().await;
        emu.script_amount(1009, never_confirmed(2));
        emu.script_amount(1019, never_confirmed(u32::MAX));
        let create = |amount: i64, otn: &'static str| {
            let (h, c) = (&h, &c);
            async move {
                let a = h
                    .create(c, json!({"amount": amount, "currency": "CNY", "out_trade_no": otn, "subject": "Tea", "method": "alipay_code", "auth_code": "287654321098765432"}))
                    .await;
                assert_eq!(a.body["status"], "processing", "{}", a.body);
                a.body["id"].as_str().unwrap().to_string()
            }
        };
        // Two retries, then cancelled: the cashier's one request repeats the cancel.
        let id = create(1009, "ali-cancel-1").await;
        let r = h.post(&c, &format!("/v1/payments/{id}/cancel"), None).await;
        assert_eq!((r.status, r.body["status"].as_str()), (200, Some("cancelled")), "{}", r.body);
        let o = emu.order(&h.order_no(&id).await).unwrap();
        assert_eq!((o.state, o.cancels), (OrderState::Revoked, 3));
        assert_eq!(h.events_of(&c, &id).await, ["payment.cancelled"]);
        // Retry every time: three calls, then 503 and the payment unchanged.
        let id = create(1019, "ali-cancel-2").await;
        let r = h.post(&c, &format!("/v1/payments/{id}/cancel"), None).await;
        assert_eq!((r.status, r.error_code()), (503, Some("channel_unconfirmed")), "{}", r.body);
        assert_eq!(emu.order(&h.order_no(&id).await).unwrap().cancels, 3);
        assert_eq!(h.get(&c, &id).await.body["status"], "processing");
        assert!(h.events_of(&c, &id).await.is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unionpay_payment_code_is_queried_until_definite_and_never_cancelled() {
    bounded(async {
        let cfg = EngineConfig {
            barcode_poll_ms: 100,
            barcode_window_ms: 1,
            ..config()
        };
        let h = harness(cfg, true).await;
        let emu = emulator(ChannelKind::UnionPay).await;
        h.account(&emu).await;
        let c = h.merchant().await;
        emu.script_amount(1009, never_confirmed(0));
        let mut ids = Vec::new();
        // 1002: accepted (00), `05` to two queries, then paid; 1003: the same, then failed;
        // 1009: `05` to every query.
        for amount in [1002, 1003, 1009] {
            let a = h
                .create(&c, json!({"amount": amount, "currency": "CNY", "out_trade_no": format!("up-code-{amount}"), "subject": "Tea", "method": "unionpay_code", "auth_code": "6223194500000000001"}))
                .await;
            assert_eq!(a.body["status"], "processing", "{}", a.body);
            ids.push(a.body["id"].as_str().unwrap().to_string());
        }
        h.wait_status(&c, &ids[0], "succeeded").await;
        let failed = h.wait_status(&c, &ids[1], "failed").await;
        assert_eq!(failed.body["failure"]["code"], "01", "{}", failed.body);
        // Past the window UnionPay is not cancelled (no engine cancel): queried, nothing else.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(h.get(&c, &ids[2]).await.body["status"], "processing");
        let r = h.post(&c, &format!("/v1/payments/{}/cancel", ids[2]), None).await;
        assert_eq!((r.status, r.error_code()), (409, Some("cancel_not_supported")), "{}", r.body);
        for id in &ids {
            let o = emu.order(&h.order_no(id).await.replace('_', "")).unwrap();
            assert_eq!(o.cancels, 0, "a revoke was sent for {id}");
        }
        assert_eq!(h.events_of(&c, &ids[0]).await, ["payment.succeeded"]);
        assert_eq!(h.events_of(&c, &ids[1]).await, ["payment.failed"]);
        assert!(h.alerts("cancel_unconfirmed").await.is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unionpay_refunds_partial_then_the_rest_are_confirmed_by_the_refund_query() {
    bounded(async {
        let h = harness(config(), true).await;
        let emu = emulator(ChannelKind::UnionPay).await;
        h.account(&emu).await;
        let c = h.merchant().await;
        let a = h
            .create(&c, json!({"amount": 1000, "currency": "CNY", "out_trade_no": "up-rf", "subject": "Tea", "method": "unionpay_code", "auth_code": "6223194500000000001"}))
            .await;
        assert_eq!(a.body["status"], "processing", "{}", a.body);
        let id = a.body["id"].as_str().unwrap().to_string();
        let p = h.wait_status(&c, &id, "succeeded").await;
        assert!(p.body["channel_trade_no"].is_string(), "the queryId, needed by refunds");
        let order = h.order_no(&id).await.replace('_', "");
        let refund = |no: &'static str, amount: i64| {
            let (h, c, id) = (&h, &c, id.clone());
            async move {
                h.post(c, "/v1/refunds", Some(json!({"payment_id": id, "amount": amount, "out_refund_no": no}))).await
            }
        };
        // UnionPay's 00 to a refund only accepts it: processing until the refund query says.
        let r1 = refund("up-rf-1", 400).await;
        assert_eq!((r1.status, r1.body["status"].as_str()), (200, Some("processing")), "{}", r1.body);
        h.wait_refund(&c, r1.body["id"].as_str().unwrap(), "succeeded").await;
        let r2 = refund("up-rf-2", 600).await;
        assert_eq!((r2.status, r2.body["status"].as_str()), (200, Some("processing")), "{}", r2.body);
        let over = refund("up-rf-3", 1).await;
        assert_eq!((over.status, over.error_code()), (409, Some("refund_exceeds_payment")), "{}", over.body);
        h.wait_refund(&c, r2.body["id"].as_str().unwrap(), "succeeded").await;
        let p = h.get(&c, &id).await;
        assert_eq!((p.body["amount_refunded"].as_i64(), p.body["amount_refundable"].as_i64()), (Some(1000), Some(0)), "{}", p.body);
        // No notification was delivered (never flushed): the refund status sync did it.
        assert!(emu.deliveries().is_empty(), "{:?}", emu.deliveries());
        // UnionPay's books: paid 1000, two refunds of 400 and 600 under our refund ids.
        let lines: Vec<_> = emu.ledger().into_iter().filter(|l| l.out_trade_no == order).collect();
        let mut refunds: Vec<(String, i64)> = lines.iter().filter(|l| l.refund).map(|l| (l.out_refund_no.clone(), l.amount_fen)).collect();
        refunds.sort_by_key(|r| r.1);
        let want: Vec<(String, i64)> = [(&r1, 400), (&r2, 600)]
            .iter()
            .map(|(r, a)| (r.body["id"].as_str().unwrap().replace('_', ""), *a))
            .collect();
        assert_eq!(refunds, want);
        assert_eq!(lines.iter().filter(|l| !l.refund).map(|l| l.amount_fen).sum::<i64>(), 1000);
        assert_eq!(h.events_of(&c, &id).await, ["payment.succeeded"]);
    })
    .await;
}
