//! The payment lifecycle through real channel protocols: the payrail server (real router on a
//! loopback port) with channel accounts pointing at the WeChat Pay, Alipay and UnionPay
//! emulators, over real HTTP both ways — orders go out signed, notifications come back signed
//! to `/v1/channel-notify/{account}`. Every test is bounded in time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use payrail_client::nonce;
use payrail_emulator::ChannelKind;
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
