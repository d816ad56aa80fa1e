//! The scripted channel faults through the whole server (which ones: docs/channels.md,
//! "Tests"): the engine, the `/v1/channel-notify/{account}` endpoint and the status-sync worker,
//! against the WeChat Pay, Alipay and UnionPay emulators over real HTTP (the emulators' scripts:
//! docs/channels.md, "The emulators"). What each test holds to: a timeout, 5xx or "not found" is
//! unknown, never failed; a payment succeeds once (one `payment.succeeded` event, one
//! `pay_…:captured` posting) however often the channel says so; a later contradiction changes
//! nothing and raises an alert; a validly signed notification that does not match our order
//! changes nothing and is acknowledged in the channel's own format; every final state reaches
//! the merchant as a signed webhook. Every test is bounded in time and waits by bounded polls.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use payrail_channels::RefundRequest;
use payrail_client::{nonce, Answer, Credentials};
use payrail_domain::{AttemptId, Currency, Money, RefundId};
use payrail_emulator::{ChannelKind, Script};
use payrail_engine::EngineConfig;
use reqwest::Method;
use serde_json::{json, Value};
use std::collections::BTreeSet;

const ALL: [ChannelKind; 3] = [
    ChannelKind::WechatPay,
    ChannelKind::Alipay,
    ChannelKind::UnionPay,
];

fn name(kind: ChannelKind) -> &'static str {
    match kind {
        ChannelKind::WechatPay => "wechatpay",
        ChannelKind::Alipay => "alipay",
        ChannelKind::UnionPay => "unionpay",
    }
}

/// Creates a payment that must be accepted as `processing`.
async fn create_processing(h: &H, c: &Credentials, body: Value) -> Answer {
    let a = h.create(c, body).await;
    assert_eq!(
        (a.status, a.body["status"].as_str()),
        (200, Some("processing")),
        "{}",
        a.body
    );
    a
}

/// The sends of the channel's notifications about one order: (HTTP status, acknowledged).
fn sends(emu: &payrail_emulator::EmulatorHandle, order: &str) -> Vec<(Option<u16>, bool)> {
    emu.deliveries()
        .into_iter()
        .filter(|d| d.out_trade_no == order)
        .map(|d| (d.status, d.acked))
        .collect()
}

/// One success, posted once: the payment's only event is `payment.succeeded` and the journal
/// holds one `pay_…:captured` entry for it.
async fn succeeded_once(h: &H, c: &Credentials, id: &str) {
    assert_eq!(h.get(c, id).await.body["status"], "succeeded");
    assert_eq!(h.event_types(c, id).await, ["payment.succeeded"], "{id}");
    assert_eq!(h.captured_postings(id).await, 1, "{id}: captured postings");
}

// --- 1. HTTP 5xx ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_on_submit_is_unknown_and_never_fails_the_payment() {
    bounded(async {
        let cfg = EngineConfig {
            barcode_window_ms: 400,
            ..config()
        };
        let h = harness(cfg, true).await;
        let c = h.merchant().await;
        let mut cases = Vec::new();
        for kind in ALL {
            let emu = emulator(kind).await;
            h.account(&emu).await;
            // Amount ..05: the order-creating call gets HTTP 500 and the channel does nothing.
            let a = create_processing(
                &h,
                &c,
                payment_body(code_method(kind), 1005, &format!("5xx-{}", name(kind))),
            )
            .await;
            let id = a.body["id"].as_str().unwrap().to_string();
            cases.push((kind, emu, id));
        }
        // Alipay: the queries say TRADE_NOT_EXIST (unknown); past the payment-code window the
        // engine cancels, which voids the order number there: cancelled, nobody charged.
        let (_, ali, ali_id) = &cases[1];
        let p = h.wait_final_never_failed(&c, ali_id).await;
        assert_eq!(p.body["status"], "cancelled", "{}", p.body);
        let order = h.order_no(ali_id).await;
        assert_eq!(format!("{:?}", ali.order(&order).unwrap().state), "Revoked");
        // WeChat (ORDER_NOT_EXIST to the query and to the reverse) and UnionPay (34 to the
        // query; no cancel) never answer definitely: the payments stay processing while the
        // worker keeps asking. (A payment code is reversed, never closed, so the trade bills
        // do not close it; a lost WeChat QR order is closed from them: the next test.)
        let poll = Poll::start();
        while h.channel_calls("wechatpay", "query", "unknown") < 3
            || h.channel_calls("wechatpay", "cancel", "unknown") < 1
            || h.channel_calls("unionpay", "query", "unknown") < 3
        {
            poll.tick("three unknown queries to WeChat and UnionPay and an unknown WeChat reverse")
                .await;
        }
        for (kind, emu, id) in &cases {
            let p = h.get(&c, id).await;
            let want = if *kind == ChannelKind::Alipay {
                "cancelled"
            } else {
                "processing"
            };
            assert_eq!(p.body["status"], want, "{kind:?}: {}", p.body);
            // The channel took no money and we posted none.
            assert!(emu.ledger().is_empty(), "{kind:?}: {:?}", emu.ledger());
            assert_eq!(h.captured_postings(id).await, 0);
        }
    })
    .await;
}

const DAY_MS: i64 = 86_400_000;

/// Bug: a WeChat QR order whose creation never reached WeChat (here HTTP 500 before WeChat did
/// anything) answers ORDER_NOT_EXIST to the query and to the close for ever, and its payment
/// stayed `processing` for ever after expiry. "Not found" is still never a close by itself:
/// the close is confirmed once WeChat's trade bills of the order's day through the day after
/// its expiry are out (10:00 the next day, on the emulator's clock) and none lists it. An order
/// a bill lists as paid while the query does not find it is never closed: it waits for a
/// person, who is called once `close_confirm_delay_ms` has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_wechat_order_is_closed_once_the_trade_bills_confirm_it_was_never_paid() {
    bounded(async {
        let h = harness(config(), true).await;
        let emu = emulator(ChannelKind::WechatPay).await;
        h.account(&emu).await;
        let c = h.merchant().await;
        let create = |amount: i64, otn: &'static str| {
            let (h, c) = (&h, &c);
            async move {
                let mut body = payment_body("wechat_native", amount, otn);
                body["expires_in"] = json!(60);
                let a = create_processing(h, c, body).await;
                let id = a.body["id"].as_str().unwrap().to_string();
                let order = h.order_no(&id).await;
                (id, order)
            }
        };
        // Amount ..05: the order-creating call gets HTTP 500 and WeChat records nothing.
        let (lost, lost_order) = create(1005, "wx-lost").await;
        assert!(emu.order(&lost_order).is_none(), "the emulator recorded it");
        // This one reaches WeChat and is paid at once, but WeChat contradicts itself: its query
        // and close say ORDER_NOT_EXIST and no notification comes, while its bill lists it.
        emu.script_amount(
            1010,
            Script {
                not_found: true,
                ..Script::default()
            },
        );
        let (listed, listed_order) = create(1010, "wx-listed").await;
        emu.scan(&listed_order).unwrap();
        emu.flush().await;
        assert!(sends(&emu, &listed_order).is_empty());

        // Past expiry on both clocks: the worker asks to close both; no bill is out yet.
        h.clock.jump_ms(61_000);
        emu.advance(61_000).await;
        let closes = |n: u64| {
            let h = &h;
            async move {
                let base = h.channel_calls("wechatpay", "close", "unknown");
                let poll = Poll::start();
                while h.channel_calls("wechatpay", "close", "unknown") < base + n {
                    poll.tick(format!("{n} more unknown closes")).await;
                }
            }
        };
        closes(4).await;
        // A day later at most the order's day is out, never the day after its expiry.
        emu.advance(DAY_MS).await;
        closes(4).await;
        for id in [&lost, &listed] {
            assert_eq!(h.get(&c, id).await.body["status"], "processing", "{id}");
        }

        // Both bills out, neither lists the lost order: the worker closes it. Nothing was
        // taken at WeChat and nothing posted here.
        emu.advance(2 * DAY_MS).await;
        h.wait_status(&c, &lost, "closed").await;
        assert_eq!(h.events_of(&c, &lost).await, ["payment.closed"]);
        assert_eq!(h.captured_postings(&lost).await, 0);
        assert!(emu.order(&lost_order).is_none());
        assert!(emu.ledger().iter().all(|l| l.out_trade_no != lost_order));
        // A close confirmed this way is expected to take days: no alert for either yet.
        assert!(h.alerts("payment_unresolved").await.is_empty());

        // The listed one stays open however often it is asked...
        closes(4).await;
        assert_eq!(h.get(&c, &listed).await.body["status"], "processing");
        assert!(h.events_of(&c, &listed).await.is_empty());
        // ... and once the bills should long have settled it, a person is called.
        h.clock
            .jump_ms(payrail_channels::wechatpay::CLOSE_CONFIRM_DELAY_MS + 3_600_000);
        let poll = Poll::start();
        let alert = loop {
            if let Some(a) = h.alerts("payment_unresolved").await.pop() {
                break a;
            }
            poll.tick("a payment_unresolved alert").await;
        };
        assert_eq!(alert.subject_id, listed);
        assert!(
            alert.detail.contains("lists the order as paid"),
            "{}",
            alert.detail
        );
        // (Read from the store: the merchant's signed requests carry the real time, which the
        // server, hours ahead now, would refuse.)
        let p = h
            .engine
            .store
            .get_payment_any(listed.parse().unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(p.status.to_string(), "processing");
        assert_eq!(h.captured_postings(&listed).await, 0);
        assert_eq!(h.alerts("payment_unresolved").await.len(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_on_status_queries_is_unknown_then_the_query_finds_the_payment() {
    bounded(async {
        let h = harness(config(), true).await;
        let c = h.merchant().await;
        for kind in ALL {
            let emu = emulator(kind).await;
            h.account(&emu).await;
            // Amount ..09: the first two status queries of the order get HTTP 500.
            let a = create_processing(
                &h,
                &c,
                payment_body(page_method(kind), 1009, &format!("qerr-{}", name(kind))),
            )
            .await;
            let id = a.body["id"].as_str().unwrap();
            h.open_page(&a).await;
            let order = channel_order_no(kind, &h.order_no(id).await);
            // The payer pays at once, but the channel's notification is held back: only the
            // status sync can find out, and its first queries get 500s.
            emu.scan(&order).unwrap();
            let p = h.wait_final_never_failed(&c, id).await;
            assert_eq!(p.body["status"], "succeeded", "{kind:?}: {}", p.body);
            assert_eq!(
                emu.order(&order).unwrap().script.query_errors,
                0,
                "{kind:?}: both 500s were answered first"
            );
            assert!(
                h.channel_calls(name(kind), "query", "unknown") >= 2,
                "{kind:?}"
            );
            // The held notification arrives late: acknowledged, nothing applied twice.
            emu.flush().await;
            assert_eq!(sends(&emu, &order), [(Some(ack(kind).0), true)], "{kind:?}");
            succeeded_once(&h, &c, id).await;
        }
    })
    .await;
}

// --- 2. A timeout after the channel succeeded -----------------------------------------------

/// The engine's wait for one channel call: short, so that the scripted 30 s hold times out fast.
const IMPATIENT_MS: u64 = 600;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_after_the_channel_charged_a_payment_code_ends_in_one_success() {
    bounded(async {
        let cfg = EngineConfig {
            channel_timeout_ms: IMPATIENT_MS,
            ..config()
        };
        let h = harness(cfg, true).await;
        let c = h.merchant().await;
        for kind in ALL {
            let emu = emulator(kind).await;
            h.account(&emu).await;
            // Amount ..04: the channel charges the payer, then holds its answer for 30 s.
            let a = create_processing(
                &h,
                &c,
                payment_body(code_method(kind), 1004, &format!("hang-{}", name(kind))),
            )
            .await;
            let id = a.body["id"].as_str().unwrap();
            let p = h.wait_final_never_failed(&c, id).await;
            assert_eq!(p.body["status"], "succeeded", "{kind:?}: {}", p.body);
            // UnionPay also notifies the success: acknowledged, applied once.
            emu.flush().await;
            let order = channel_order_no(kind, &h.order_no(id).await);
            assert!(
                sends(&emu, &order)
                    .iter()
                    .all(|(s, acked)| *acked && *s == Some(ack(kind).0)),
                "{kind:?}"
            );
            succeeded_once(&h, &c, id).await;
            let charged: Vec<_> = emu.ledger().into_iter().filter(|l| !l.refund).collect();
            assert_eq!(
                charged.len(),
                1,
                "{kind:?}: the channel charged once: {charged:?}"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_after_the_channel_created_a_qr_order_ends_by_its_notification() {
    bounded(async {
        let cfg = EngineConfig {
            channel_timeout_ms: IMPATIENT_MS,
            ..config()
        };
        // No status-sync worker: only the notification can end these payments.
        let h = harness(cfg, false).await;
        let c = h.merchant().await;
        // UnionPay web builds its form without calling the channel: nothing to time out.
        for kind in [ChannelKind::WechatPay, ChannelKind::Alipay] {
            let emu = emulator(kind).await;
            let account = h.account(&emu).await;
            let a = create_processing(
                &h,
                &c,
                payment_body(page_method(kind), 1004, &format!("qr-hang-{}", name(kind))),
            )
            .await;
            let id = a.body["id"].as_str().unwrap();
            assert!(
                a.body["next_action"].is_null(),
                "no QR code from an unknown answer: {}",
                a.body
            );
            // The order exists at the channel; the payer scans it (e.g. a code the channel
            // shows for the order), and the channel notifies.
            let order = h.order_no(id).await;
            emu.scan(&order).unwrap();
            emu.flush().await;
            assert_eq!(sends(&emu, &order), [(Some(ack(kind).0), true)], "{kind:?}");
            h.wait_status(&c, id, "succeeded").await;
            // Alipay or WeChat may repeat it: still one success.
            let again = emu.render_payment_notification(&order).unwrap();
            let (status, body) = h.post_notification(&account, &again).await;
            assert_eq!((status, body.as_str()), ack(kind), "{kind:?}");
            succeeded_once(&h, &c, id).await;
        }
    })
    .await;
}

// --- A definite answer after "the payer is confirming" -------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_code_the_payer_abandons_ends_as_the_channel_says() {
    bounded(async {
        let h = harness(config(), true).await;
        let c = h.merchant().await;
        for (kind, want) in [
            (ChannelKind::WechatPay, "failed"),
            (ChannelKind::Alipay, "closed"),
            (ChannelKind::UnionPay, "failed"),
        ] {
            let emu = emulator(kind).await;
            h.account(&emu).await;
            // Amount ..03: "the payer is confirming" (USERPAYING / 10003 / origRespCode 05) to
            // the submit and two queries, then a definite end: PAYERROR, TRADE_CLOSED, 01. Only
            // that definite answer ends the payment.
            let a = create_processing(
                &h,
                &c,
                payment_body(code_method(kind), 1003, &format!("abandon-{}", name(kind))),
            )
            .await;
            let id = a.body["id"].as_str().unwrap();
            let p = h.wait_status(&c, id, want).await;
            assert_eq!(
                h.event_types(&c, id).await,
                [format!("payment.{want}")],
                "{kind:?}: {}",
                p.body
            );
            assert_eq!(h.captured_postings(id).await, 0, "{kind:?}");
        }
    })
    .await;
}

// --- 3. Alipay: no trade before the scan ---------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alipay_trade_not_exist_before_the_scan_is_unknown_then_the_payment_succeeds() {
    bounded(async {
        let h = harness(config(), true).await;
        let emu = emulator(ChannelKind::Alipay).await;
        h.account(&emu).await;
        let c = h.merchant().await;
        let a = create_processing(&h, &c, payment_body("alipay_qr", 1000, "ali-not-yet")).await;
        let id = a.body["id"].as_str().unwrap();
        // Until the payer scans, Alipay has no trade: every query says ACQ.TRADE_NOT_EXIST.
        let poll = Poll::start();
        while h.channel_calls("alipay", "query", "unknown") < 3 {
            assert_eq!(h.get(&c, id).await.body["status"], "processing");
            poll.tick("three TRADE_NOT_EXIST answers").await;
        }
        assert_eq!(h.get(&c, id).await.body["status"], "processing");
        // The payer scans and pays; the next query finds it (the notification is held back).
        let order = h.order_no(id).await;
        emu.scan(&order).unwrap();
        let p = h.wait_final_never_failed(&c, id).await;
        assert_eq!(p.body["status"], "succeeded", "{}", p.body);
        emu.flush().await;
        assert_eq!(sends(&emu, &order), [(Some(200), true)]);
        succeeded_once(&h, &c, id).await;
    })
    .await;
}

// --- 4. Duplicate notifications -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_notifications_are_acknowledged_each_time_and_applied_once() {
    bounded(async {
        let h = harness(config(), false).await;
        let c = h.merchant().await;
        for kind in ALL {
            let emu = emulator(kind).await;
            let account = h.account(&emu).await;
            // Amount ..06: every notification is sent twice.
            let a = create_processing(
                &h,
                &c,
                payment_body(page_method(kind), 1006, &format!("dup-{}", name(kind))),
            )
            .await;
            let id = a.body["id"].as_str().unwrap();
            h.open_page(&a).await;
            let order = channel_order_no(kind, &h.order_no(id).await);
            emu.scan(&order).unwrap();
            emu.flush().await;
            let (status, body) = ack(kind);
            assert_eq!(
                sends(&emu, &order),
                [(Some(status), true), (Some(status), true)],
                "{kind:?}"
            );
            // A third copy, by hand, to see the exact reply.
            let again = emu.render_payment_notification(&order).unwrap();
            assert_eq!(
                h.post_notification(&account, &again).await,
                (status, body.to_string()),
                "{kind:?}"
            );
            succeeded_once(&h, &c, id).await;
            assert_eq!(h.op_alerts().await, [], "{kind:?}: a repeat is no conflict");
        }
    })
    .await;
}

// --- 5. A later notification that contradicts the first -----------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflicting_later_notification_never_flips_the_status_and_raises_an_alert() {
    bounded(async {
        let h = harness(config(), false).await;
        let c = h.merchant().await;
        for kind in ALL {
            let emu = emulator(kind).await;
            h.account(&emu).await;
            // Amount ..07: the success notification, then a signed "closed" (WeChat
            // TRANSACTION.CLOSED, Alipay TRADE_CLOSED, UnionPay respCode=01).
            let a = create_processing(
                &h,
                &c,
                payment_body(page_method(kind), 1007, &format!("conflict-{}", name(kind))),
            )
            .await;
            let id = a.body["id"].as_str().unwrap();
            h.open_page(&a).await;
            let order = channel_order_no(kind, &h.order_no(id).await);
            emu.scan(&order).unwrap();
            emu.flush().await;
            // Both acknowledged: the contradiction is recorded, not refused (a refusal would
            // only make the channel repeat it).
            let status = ack(kind).0;
            assert_eq!(
                sends(&emu, &order),
                [(Some(status), true), (Some(status), true)],
                "{kind:?}"
            );
            succeeded_once(&h, &c, id).await;
            let alerts = h.op_alerts().await;
            assert!(
                alerts
                    .iter()
                    .any(|(k, subject, _)| k == "channel_conflict" && subject == id),
                "{kind:?}: no channel_conflict alert for {id}: {alerts:?}"
            );
        }
    })
    .await;
}

// --- 6. Notification cross-checks -----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_notification_for_an_order_we_never_sent_changes_nothing() {
    bounded(async {
        let h = harness(config(), false).await;
        for kind in ALL {
            let emu = emulator(kind).await;
            let account = h.account(&emu).await;
            // Another system on the same channel account made this order and paid it.
            let stranger: AttemptId = h.engine.ids.next();
            direct_code_order(&emu, &h.notify_url(&account), stranger, 1000).await;
            let n = emu
                .render_payment_notification(&channel_order_no(kind, &stranger.to_string()))
                .unwrap();
            let (status, body) = h.post_notification(&account, &n).await;
            // Acknowledged, so the channel stops repeating what we will never apply.
            assert_eq!((status, body.as_str()), ack(kind), "{kind:?}");
            let alerts = h.op_alerts().await;
            assert!(
                alerts
                    .iter()
                    .any(|(k, subject, _)| k == "notification_unknown_order"
                        && *subject == stranger.to_string()),
                "{kind:?}: {alerts:?}"
            );
        }
        // Nothing was created or posted.
        assert!(h.journal_ids().await.is_empty());
        assert_eq!(
            h.engine
                .store
                .count_jobs(payrail_engine::JOB_PAYMENT_SYNC)
                .await
                .unwrap(),
            0
        );
    })
    .await;
}

/// Posts a notification about our payment `id`, validly signed by `from` (an emulator with
/// other channel identities), to `account`: acknowledged, not applied, a
/// `notification_mismatch` alert naming `what`. Then the genuine notification from `emu` (the
/// account's channel) is applied.
async fn mismatch_changes_nothing(
    h: &H,
    c: &Credentials,
    emu: &payrail_emulator::EmulatorHandle,
    from: &payrail_emulator::EmulatorHandle,
    account: &str,
    created: &Answer,
    what: &str,
) {
    let kind = emu.config.channel;
    let id = created.body["id"].as_str().unwrap();
    let attempt = h.attempt_id(id).await;
    let order = channel_order_no(kind, &attempt.to_string());
    direct_code_order(from, &h.notify_url(account), attempt, 1000).await;
    let n = from.render_payment_notification(&order).unwrap();
    let (status, body) = h.post_notification(account, &n).await;
    assert_eq!((status, body.as_str()), ack(kind), "{kind:?}");
    assert_eq!(h.get(c, id).await.body["status"], "processing", "{kind:?}");
    let alerts = h.op_alerts().await;
    assert!(
        alerts
            .iter()
            .any(|(k, subject, detail)| k == "notification_mismatch"
                && subject == id
                && detail.contains(what)),
        "{kind:?}: no notification_mismatch alert about the {what} for {id}: {alerts:?}"
    );
    assert!(h.event_types(c, id).await.is_empty(), "{kind:?}");
    // The account's own channel: applied.
    h.open_page(created).await;
    emu.scan(&order).unwrap();
    emu.flush().await;
    h.wait_status(c, id, "succeeded").await;
    succeeded_once(h, c, id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_notification_from_another_channel_merchant_changes_nothing() {
    bounded(async {
        let h = harness(config(), false).await;
        let c = h.merchant().await;
        for kind in ALL {
            let emu = emulator(kind).await;
            let account = h.account(&emu).await;
            // The same channel keys, another merchant number (WeChat mchid, Alipay app_id,
            // UnionPay merId).
            let other_merchant = match kind {
                ChannelKind::WechatPay => "1900000999",
                ChannelKind::Alipay => "2021000000000999",
                ChannelKind::UnionPay => "777290058110999",
            };
            let other = emulator_as(kind, Some(other_merchant), None).await;
            let a = create_processing(
                &h,
                &c,
                payment_body(
                    page_method(kind),
                    1000,
                    &format!("other-mch-{}", name(kind)),
                ),
            )
            .await;
            mismatch_changes_nothing(&h, &c, &emu, &other, &account, &a, "channel merchant").await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_notification_for_another_channel_app_changes_nothing() {
    bounded(async {
        let h = harness(config(), false).await;
        let c = h.merchant().await;
        // UnionPay has no app id.
        for kind in [ChannelKind::WechatPay, ChannelKind::Alipay] {
            let emu = emulator(kind).await;
            let mut body = account_body(&emu, "app-checked", 0);
            if kind == ChannelKind::Alipay {
                // Alipay's seller is checked only when the account names one.
                body["config"]["seller_id"] = json!(emu.config.app_id);
            }
            let account = h.account_with(&body).await;
            // The same merchant, another app (WeChat appid, Alipay seller_id).
            let other_app = match kind {
                ChannelKind::WechatPay => "wx0000000000000999",
                _ => "2088000000000999",
            };
            let other = emulator_as(kind, None, Some(other_app)).await;
            let a = create_processing(
                &h,
                &c,
                payment_body(
                    page_method(kind),
                    1000,
                    &format!("other-app-{}", name(kind)),
                ),
            )
            .await;
            mismatch_changes_nothing(&h, &c, &emu, &other, &account, &a, "channel app").await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_notification_at_another_accounts_endpoint_changes_nothing() {
    bounded(async {
        let h = harness(config(), false).await;
        let c = h.merchant().await;
        let emu = emulator(ChannelKind::WechatPay).await;
        // Two accounts on the same channel merchant; payments go to the first.
        let first = h.account_with(&account_body(&emu, "first", 10)).await;
        let second = h.account_with(&account_body(&emu, "second", 0)).await;
        let a = create_processing(
            &h,
            &c,
            payment_body("wechat_native", 1000, "wrong-endpoint"),
        )
        .await;
        let id = a.body["id"].as_str().unwrap();
        let order = h.order_no(id).await;
        emu.scan(&order).unwrap();
        let n = emu.render_payment_notification(&order).unwrap();
        assert_eq!(h.post_notification(&second, &n).await, (204, String::new()));
        assert_eq!(h.get(&c, id).await.body["status"], "processing");
        let alerts = h.op_alerts().await;
        assert!(
            alerts
                .iter()
                .any(|(k, subject, detail)| k == "notification_mismatch"
                    && subject == id
                    && detail.contains(&first)),
            "{alerts:?}"
        );
        // The channel's own send goes to the first account's endpoint: applied.
        emu.flush().await;
        assert_eq!(sends(&emu, &order), [(Some(204), true)]);
        succeeded_once(&h, &c, id).await;
    })
    .await;
}

// --- 7. Alipay's extra notification after a refund ------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alipays_trade_success_after_a_partial_refund_is_acknowledged_and_changes_no_status() {
    bounded(async {
        let h = harness(config(), false).await;
        let emu = emulator(ChannelKind::Alipay).await;
        h.account(&emu).await;
        let c = h.merchant().await;
        let a =
            create_processing(&h, &c, payment_body("alipay_qr", 1000, "ali-refund-notify")).await;
        let id = a.body["id"].as_str().unwrap();
        let order = h.order_no(id).await;
        emu.scan(&order).unwrap();
        emu.flush().await;
        h.wait_status(&c, id, "succeeded").await;
        // A partial refund: Alipay answers at once (fund_change=Y), then notifies TRADE_SUCCESS
        // again with refund_fee = the total refunded (3.00); after the rest, TRADE_CLOSED with
        // 10.00. Neither is a change of the payment's status.
        let mut refunds = Vec::new();
        for (amount, no, refunded, refundable) in
            [(300, "ali-rf-1", 300, 700), (700, "ali-rf-2", 1000, 0)]
        {
            let r = h.refund(&c, id, amount, no).await;
            assert_eq!(
                (r.status, r.body["status"].as_str()),
                (200, Some("succeeded")),
                "{}",
                r.body
            );
            let before = sends(&emu, &order).len();
            emu.flush().await;
            let after = sends(&emu, &order);
            assert_eq!(
                after.len(),
                before + 1,
                "the refund's notification: {after:?}"
            );
            assert_eq!(
                after.last(),
                Some(&(Some(200), true)),
                "acknowledged with `success`"
            );
            let p = h.get(&c, id).await;
            assert_eq!(
                (
                    p.body["status"].as_str(),
                    p.body["amount_refunded"].as_i64(),
                    p.body["amount_refundable"].as_i64()
                ),
                (Some("succeeded"), Some(refunded), Some(refundable)),
                "{}",
                p.body
            );
            let rid = r.body["id"].as_str().unwrap().to_string();
            let got = h.get_refund(&c, &rid).await;
            assert_eq!(
                (got.body["status"].as_str(), got.body["amount"].as_i64()),
                (Some("succeeded"), Some(amount)),
                "{}",
                got.body
            );
            assert_eq!(
                h.op_alerts().await,
                [],
                "no alert for a notification we expect"
            );
            refunds.push(rid);
        }
        succeeded_once(&h, &c, id).await;
        let journal = h.journal_ids().await;
        for rid in &refunds {
            assert_eq!(h.event_types(&c, rid).await, ["refund.succeeded"]);
            assert_eq!(
                journal
                    .iter()
                    .filter(|e| **e == format!("{rid}:refund"))
                    .count(),
                1,
                "{journal:?}"
            );
        }
    })
    .await;
}

// --- 8. Every final state as a signed webhook, through the channels ------------------------

/// Checks a `Payrail-Signature` header (`t=<unix>,v1=<hex>`) by recomputing HMAC-SHA256 of
/// `"<t>.<body>"` with the app secret here (not with the code under test), within 5 minutes.
fn signature_is_valid(secret: &str, header: &str, body: &[u8]) -> bool {
    use hmac::{Hmac, Mac};
    let mut t = None;
    let mut v1 = Vec::new();
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => v1.push(v.to_string()),
            _ => {}
        }
    }
    let Some(t) = t else { return false };
    if (payrail_client::unix_now() - t).abs() > 300 {
        return false;
    }
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    let want = hex::encode(mac.finalize().into_bytes());
    v1.contains(&want)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_final_state_reaches_the_merchant_as_a_signed_webhook_through_the_emulators() {
    bounded(async {
        let cfg = EngineConfig {
            // The merchant's endpoint is on loopback in this test.
            webhook_allow_private_targets: true,
            ..config()
        };
        let h = harness_full(cfg, false, true).await;
        let wx = emulator(ChannelKind::WechatPay).await;
        let ali = emulator(ChannelKind::Alipay).await;
        let wx_account = h.account(&wx).await;
        h.account(&ali).await;
        let c = h.merchant().await;
        let (url, got) = webhook_receiver().await;
        let body = |method: &str, amount: i64, no: &str| {
            let mut b = payment_body(method, amount, no);
            b["notify_url"] = json!(url);
            b
        };
        let mut expected: Vec<(&str, String)> = Vec::new();
        // payment.succeeded: a WeChat QR payment the payer scans.
        let paid = create_processing(&h, &c, body("wechat_native", 1000, "wh-paid")).await;
        let paid_id = paid.body["id"].as_str().unwrap().to_string();
        wx.scan(&h.order_no(&paid_id).await).unwrap();
        wx.flush().await;
        h.wait_status(&c, &paid_id, "succeeded").await;
        expected.push(("payment.succeeded", paid_id.clone()));
        // payment.failed: an Alipay payment code refused (ACQ.BUYER_BALANCE_NOT_ENOUGH).
        let failed = h.create(&c, body("alipay_code", 1001, "wh-failed")).await;
        assert_eq!(failed.body["status"], "failed", "{}", failed.body);
        expected.push((
            "payment.failed",
            failed.body["id"].as_str().unwrap().to_string(),
        ));
        // payment.closed: an Alipay QR the merchant closes before the scan.
        let closing = create_processing(&h, &c, body("alipay_qr", 1000, "wh-closed")).await;
        let closing_id = closing.body["id"].as_str().unwrap().to_string();
        let closed = h
            .client
            .signed(
                &c,
                Method::POST,
                &format!("/v1/payments/{closing_id}/close"),
                None,
                Some(&nonce()),
            )
            .await
            .unwrap();
        assert_eq!(closed.body["status"], "closed", "{}", closed.body);
        expected.push(("payment.closed", closing_id));
        // payment.cancelled: a WeChat payment code still confirming, cancelled by the cashier.
        let open = create_processing(&h, &c, body("wechat_code", 1002, "wh-cancelled")).await;
        let open_id = open.body["id"].as_str().unwrap().to_string();
        let cancelled = h
            .client
            .signed(
                &c,
                Method::POST,
                &format!("/v1/payments/{open_id}/cancel"),
                None,
                Some(&nonce()),
            )
            .await
            .unwrap();
        assert_eq!(cancelled.body["status"], "cancelled", "{}", cancelled.body);
        expected.push(("payment.cancelled", open_id));
        // refund.succeeded: WeChat accepts (PROCESSING), then notifies REFUND.SUCCESS.
        let ok = h.refund(&c, &paid_id, 300, "wh-refund-ok").await;
        assert_eq!(ok.body["status"], "processing", "{}", ok.body);
        let ok_id = ok.body["id"].as_str().unwrap().to_string();
        wx.flush().await;
        let poll = Poll::start();
        while h.get_refund(&c, &ok_id).await.body["status"] != "succeeded" {
            poll.tick("the refund's notification").await;
        }
        expected.push(("refund.succeeded", ok_id));
        // refund.failed: the merchant refunded the other 7.00 in WeChat's own portal, so the
        // channel refuses ours (INVALID_REQUEST: more than the order's refundable amount).
        let portal = direct_connector(&wx, &h.notify_url(&wx_account));
        let now_ms = payrail_client::unix_now() * 1000;
        let portal_refund: RefundId = h.engine.ids.next();
        let by_hand = portal
            .refund(&RefundRequest {
                refund_id: portal_refund,
                attempt_id: h.attempt_id(&paid_id).await,
                channel_trade_no: None,
                payment_amount: Money::new(1000, Currency::CNY),
                refund_amount: Money::new(700, Currency::CNY),
                reason: None,
                requested_at_ms: now_ms,
                notify_url: None,
            })
            .await;
        assert_eq!(by_hand.label(), "processing", "{by_hand:?}");
        let refused = h.refund(&c, &paid_id, 700, "wh-refund-refused").await;
        assert_eq!(refused.body["status"], "failed", "{}", refused.body);
        expected.push((
            "refund.failed",
            refused.body["id"].as_str().unwrap().to_string(),
        ));
        // The portal refund's own REFUND.SUCCESS reaches our endpoint: a refund we never made.
        // Acknowledged, alerted, and it counts for nothing here.
        let order = h.order_no(&paid_id).await;
        let before = sends(&wx, &order).len();
        wx.flush().await;
        assert_eq!(sends(&wx, &order)[before..], [(Some(204), true)]);
        let alerts = h.op_alerts().await;
        assert!(
            alerts
                .iter()
                .any(|(k, subject, _)| k == "refund_unmatched"
                    && *subject == portal_refund.to_string()),
            "{alerts:?}"
        );
        let p = h.get(&c, &paid_id).await;
        assert_eq!(
            (
                p.body["status"].as_str(),
                p.body["amount_refunded"].as_i64()
            ),
            (Some("succeeded"), Some(300)),
            "{}",
            p.body
        );

        // Every event reaches the receiver.
        let want_types: BTreeSet<&str> = expected.iter().map(|(t, _)| *t).collect();
        let poll = Poll::start();
        loop {
            let seen: BTreeSet<String> = got
                .lock()
                .unwrap()
                .iter()
                .filter_map(|(hd, _)| {
                    hd.get("payrail-event-type")?
                        .to_str()
                        .ok()
                        .map(str::to_string)
                })
                .collect();
            if want_types.iter().all(|t| seen.contains(*t)) {
                break;
            }
            poll.tick(format!("webhooks so far: {seen:?}")).await;
        }
        // Each delivery is signed with the app's secret and is exactly one outbox event.
        let merchant = c_merchant(&h, &c).await;
        let events = h.engine.store.list_events(merchant, 0, 100).await.unwrap();
        let outbox: BTreeSet<(String, String)> = events
            .iter()
            .map(|e| (e.id.clone(), e.event_type.clone()))
            .collect();
        let mut delivered = BTreeSet::new();
        for (headers, body) in got.lock().unwrap().iter() {
            let header = |k: &str| headers.get(k).unwrap().to_str().unwrap().to_string();
            assert!(
                signature_is_valid(&c.secret, &header("payrail-signature"), body),
                "bad signature on {}",
                String::from_utf8_lossy(body)
            );
            assert!(!signature_is_valid(
                "sk_someone_else",
                &header("payrail-signature"),
                body
            ));
            let event: Value = serde_json::from_slice(body).unwrap();
            let (id, kind) = (header("payrail-event-id"), header("payrail-event-type"));
            assert_eq!(
                (event["id"].as_str(), event["type"].as_str()),
                (Some(id.as_str()), Some(kind.as_str()))
            );
            let object = event["data"]["object"]["id"].as_str().unwrap().to_string();
            assert!(
                expected.contains(&(kind.as_str(), object.clone())),
                "unexpected {kind} for {object}"
            );
            delivered.insert((id, kind));
        }
        assert_eq!(
            delivered, outbox,
            "the receiver got exactly the merchant's events"
        );
        assert_eq!(
            outbox.len(),
            expected.len(),
            "one event per final state: {outbox:?}"
        );
    })
    .await;
}
