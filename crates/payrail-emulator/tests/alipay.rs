//! Alipay connector against the Alipay emulator, over real HTTP on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use payrail_channels::alipay::{Alipay, AlipayConfig};
use payrail_channels::*;
use payrail_domain::input::PaymentMethod;
use payrail_domain::{ChannelOutcome, Secret};
use payrail_emulator::{spawn, ChannelKind, EmulatorConfig, EmulatorHandle, Script};
use std::sync::Arc;

struct H {
    emu: EmulatorHandle,
    pay: Arc<Alipay>,
    rx: Receiver,
}

fn config(emu: &EmulatorHandle, notify_url: &str, timeout_ms: u64) -> AlipayConfig {
    AlipayConfig {
        gateway_url: format!("{}/gateway.do", emu.base_url),
        app_id: emu.config.merchant_id.clone(),
        app_private_key: Secret::new(payrail_emulator::testkeys::MERCHANT_PRIVATE_PEM.into()),
        alipay_public_key: emu.public_key_pem.clone(),
        seller_id: Some(emu.config.app_id.clone()),
        notify_url: notify_url.into(),
        return_url: Some("https://shop.example/return".into()),
        timeout_ms,
    }
}

async fn harness() -> H {
    let mut cfg = EmulatorConfig::for_tests(ChannelKind::Alipay);
    cfg.start_ms = START_MS;
    let emu = spawn(cfg).await.unwrap();
    let replies = Arc::new(Alipay::new(config(&emu, "http://127.0.0.1:9/unused", 2_000)).unwrap());
    let rx = Receiver::start(replies).await;
    let pay = Arc::new(Alipay::new(config(&emu, &rx.url, 2_000)).unwrap());
    H { emu, pay, rx }
}

fn submit(method: PaymentMethod, minor: i64) -> SubmitRequest {
    let mut r = SubmitRequest::new(
        attempt(),
        cny(minor),
        "咖啡",
        method,
        START_MS,
        START_MS + 1_800_000,
    );
    if method == PaymentMethod::AlipayCode {
        r.auth_code = Some(Secret::new("284308793673642130".into()));
    }
    r
}

fn q(r: &SubmitRequest) -> QueryRequest {
    QueryRequest {
        attempt_id: r.attempt_id,
        amount: r.amount,
        channel_trade_no: None,
        submitted_at_ms: r.submitted_at_ms,
        expires_at_ms: r.expires_at_ms,
    }
}

fn refund(r: &SubmitRequest, minor: i64) -> RefundRequest {
    RefundRequest {
        refund_id: refund_id(),
        attempt_id: r.attempt_id,
        channel_trade_no: None,
        payment_amount: r.amount,
        refund_amount: cny(minor),
        reason: None,
        requested_at_ms: START_MS,
        notify_url: None,
    }
}

macro_rules! bounded {
    ($name:ident, $body:expr) => {
        #[tokio::test]
        async fn $name() {
            tokio::time::timeout(TEST_BOUND, $body)
                .await
                .expect("test timed out");
        }
    };
}

bounded!(
    precreate_trade_not_exist_before_the_scan_is_unknown_then_success,
    async {
        let h = harness().await;
        let r = submit(PaymentMethod::AlipayQr, 1234);
        let res = h.pay.submit(&r).await;
        assert_eq!(res.outcome.label(), "processing");
        assert!(matches!(
            res.next_action,
            Some(NextAction::DisplayQrCode { .. })
        ));
        let before = h.pay.query(&q(&r)).await;
        assert!(
            matches!(before, ChannelOutcome::Unknown { ref reason } if reason.contains("TRADE_NOT_EXIST")),
            "{before:?}"
        );
        h.emu.scan(&r.attempt_id.to_string()).unwrap();
        h.emu.flush().await;
        let n = h
            .pay
            .parse_notification(&h.rx.inbound(0, h.emu.now_ms()))
            .unwrap();
        assert_eq!(n.amount, cny(1234), "12.34 yuan parsed exactly");
        assert_eq!(n.channel_merchant_id, "2021000000000001");
        assert_eq!(n.channel_app_id.as_deref(), Some("2088000000000001"));
        assert!(n.notification_id.is_some());
        assert!(matches!(
            n.event,
            NotificationEvent::Payment {
                outcome: ChannelOutcome::Succeeded { .. }
            }
        ));
        assert!(
            h.emu.deliveries()[0].acked,
            "the literal success stops the retries"
        );
        assert_eq!(h.pay.query(&q(&r)).await.label(), "succeeded");
    }
);

bounded!(wap_redirect_is_a_signed_gateway_url, async {
    let h = harness().await;
    let r = submit(PaymentMethod::AlipayWap, 1000);
    let res = h.pay.submit(&r).await;
    let Some(NextAction::Redirect { url }) = res.next_action else {
        panic!("{res:?}")
    };
    // The payer's browser opens it: the emulator checks the signature and creates the trade.
    let page = reqwest::get(&url).await.unwrap().text().await.unwrap();
    assert!(page.contains(&r.attempt_id.to_string()), "{page}");
    assert_eq!(
        h.pay.query(&q(&r)).await.label(),
        "processing",
        "WAIT_BUYER_PAY"
    );
    h.emu.scan(&r.attempt_id.to_string()).unwrap();
    assert_eq!(h.pay.query(&q(&r)).await.label(), "succeeded");
});

bounded!(barcode_10003_for_n_queries_then_success_or_closed, async {
    let h = harness().await;
    let r = submit(PaymentMethod::AlipayCode, 1002);
    assert_eq!(
        h.pay.submit(&r).await.outcome.label(),
        "processing",
        "10003"
    );
    assert_eq!(h.pay.query(&q(&r)).await.label(), "processing");
    assert_eq!(h.pay.query(&q(&r)).await.label(), "processing");
    assert_eq!(h.pay.query(&q(&r)).await.label(), "succeeded");
    let r = submit(PaymentMethod::AlipayCode, 1003);
    assert_eq!(h.pay.submit(&r).await.outcome.label(), "processing");
    h.pay.query(&q(&r)).await;
    h.pay.query(&q(&r)).await;
    assert_eq!(
        h.pay.query(&q(&r)).await,
        ChannelOutcome::Closed,
        "the payer gave up: TRADE_CLOSED"
    );
    let r = submit(PaymentMethod::AlipayCode, 1001);
    assert!(
        matches!(h.pay.submit(&r).await.outcome, ChannelOutcome::Failed { ref code, .. } if code == "ACQ.BUYER_BALANCE_NOT_ENOUGH")
    );
    let r = submit(PaymentMethod::AlipayCode, 1000);
    assert!(matches!(
        h.pay.submit(&r).await.outcome,
        ChannelOutcome::Succeeded {
            paid_at_ms: Some(_),
            ..
        }
    ));
});

bounded!(timeout_after_success_and_5xx_are_unknown, async {
    let h = harness().await;
    let impatient = Alipay::new(config(&h.emu, &h.rx.url, 300)).unwrap();
    let r = submit(PaymentMethod::AlipayCode, 1004);
    assert_eq!(impatient.submit(&r).await.outcome.label(), "unknown");
    assert_eq!(h.pay.query(&q(&r)).await.label(), "succeeded");
    let r = submit(PaymentMethod::AlipayCode, 1005);
    assert_eq!(
        h.pay.submit(&r).await.outcome.label(),
        "unknown",
        "HTTP 500"
    );
    assert_eq!(
        h.pay.query(&q(&r)).await.label(),
        "unknown",
        "TRADE_NOT_EXIST"
    );
    // 20000 scripted through the admin endpoint: unknown.
    let r = submit(PaymentMethod::AlipayQr, 1000);
    h.emu.script(
        &r.attempt_id.to_string(),
        Script {
            server_errors: 2,
            ..Script::default()
        },
    );
    assert_eq!(h.pay.submit(&r).await.outcome.label(), "unknown");
    assert_eq!(h.pay.submit(&r).await.outcome.label(), "unknown");
    assert_eq!(h.pay.submit(&r).await.outcome.label(), "processing");
});

bounded!(
    close_of_an_unscanned_qr_voids_it_and_close_after_payment_says_paid,
    async {
        let h = harness().await;
        let r = submit(PaymentMethod::AlipayQr, 1000);
        h.pay.submit(&r).await;
        assert_eq!(
            h.pay.close(&q(&r)).await,
            ChannelOutcome::Closed,
            "TRADE_NOT_EXIST → cancel → close"
        );
        assert!(
            h.emu.scan(&r.attempt_id.to_string()).is_err(),
            "a late scan cannot pay it"
        );
        let waiting = submit(PaymentMethod::AlipayCode, 1002);
        h.pay.submit(&waiting).await;
        assert_eq!(h.pay.close(&q(&waiting)).await, ChannelOutcome::Closed);
        let paid = submit(PaymentMethod::AlipayCode, 1000);
        h.pay.submit(&paid).await;
        assert_eq!(h.pay.close(&q(&paid)).await.label(), "succeeded");
    }
);

bounded!(
    cancel_retry_flag_then_refund_action_and_the_24h_window,
    async {
        let h = harness().await;
        let r = submit(PaymentMethod::AlipayCode, 1008);
        assert_eq!(h.pay.submit(&r).await.outcome.label(), "succeeded");
        assert!(
            matches!(h.pay.cancel(&q(&r)).await, CancelOutcome::Retry { .. }),
            "retry_flag=Y"
        );
        assert_eq!(
            h.pay.cancel(&q(&r)).await,
            CancelOutcome::Cancelled {
                refunded: Some(true)
            }
        );
        let open = submit(PaymentMethod::AlipayCode, 1002);
        h.pay.submit(&open).await;
        assert_eq!(
            h.pay.cancel(&q(&open)).await,
            CancelOutcome::Cancelled {
                refunded: Some(false)
            }
        );
        let late = submit(PaymentMethod::AlipayCode, 1000);
        h.pay.submit(&late).await;
        h.emu.advance(25 * 3_600_000).await;
        assert!(
            matches!(h.pay.cancel(&q(&late)).await, CancelOutcome::Failed { ref code, .. } if code == "ACQ.TRADE_CANCEL_TIME_OUT")
        );
    }
);

bounded!(
    refunds_partial_full_repeat_over_and_the_extra_trade_success_notify,
    async {
        let h = harness().await;
        let r = submit(PaymentMethod::AlipayQr, 1000);
        h.pay.submit(&r).await;
        h.emu.scan(&r.attempt_id.to_string()).unwrap();
        h.emu.flush().await;
        assert_eq!(h.rx.count(), 1);
        let r1 = refund(&r, 300);
        assert!(matches!(
            h.pay.refund(&r1).await,
            RefundOutcome::Succeeded {
                refunded_at_ms: Some(_),
                ..
            }
        ));
        // Repeated: fund_change=N, the refund query confirms.
        assert_eq!(h.pay.refund(&r1).await.label(), "succeeded");
        assert_eq!(h.pay.query_refund(&r1).await.label(), "succeeded");
        let mut discordant = r1.clone();
        discordant.refund_amount = cny(301);
        assert!(
            matches!(h.pay.refund(&discordant).await, RefundOutcome::Failed { ref code, .. } if code == "ACQ.DISCORDANT_REPEAT_REQUEST")
        );
        assert!(
            matches!(h.pay.refund(&refund(&r, 701)).await, RefundOutcome::Failed { ref code, .. } if code == "ACQ.REFUND_AMT_NOT_EQUAL_TOTAL")
        );
        let r2 = refund(&r, 700);
        assert_eq!(h.pay.refund(&r2).await.label(), "succeeded");
        assert_eq!(
            h.pay.query_refund(&refund(&r, 1)).await.label(),
            "unknown",
            "no such refund: unknown"
        );
        h.emu.flush().await;
        assert_eq!(h.rx.count(), 3);
        let partial = h
            .pay
            .parse_notification(&h.rx.inbound(1, h.emu.now_ms()))
            .unwrap();
        assert_eq!(
            partial.event,
            NotificationEvent::Refund {
                refund_id: Some(r1.refund_id),
                refund_amount: None,
                refunded_total: Some(cny(300)),
                outcome: RefundOutcome::Succeeded {
                    channel_refund_no: None,
                    refunded_at_ms: Some(START_MS / 1000 * 1000)
                },
            },
            "the extra TRADE_SUCCESS after a partial refund is a refund, not a payment event"
        );
        let full = h
            .pay
            .parse_notification(&h.rx.inbound(2, h.emu.now_ms()))
            .unwrap();
        assert!(
            matches!(full.event, NotificationEvent::Refund { refunded_total: Some(t), .. } if t == cny(1000)),
            "TRADE_CLOSED after a full refund is a refund, not a close: {full:?}"
        );
        assert_eq!(
            h.pay.query(&q(&r)).await.label(),
            "succeeded",
            "paid, then refunded in full"
        );
    }
);

bounded!(
    notifications_bad_signature_tamper_duplicates_conflicts,
    async {
        let h = harness().await;
        let r = submit(PaymentMethod::AlipayQr, 1000);
        h.pay.submit(&r).await;
        h.emu.scan(&r.attempt_id.to_string()).unwrap();
        let now = h.emu.now_ms();
        let good = h
            .emu
            .render_payment_notification(&r.attempt_id.to_string())
            .unwrap();
        assert!(h.pay.parse_notification(&inbound(&good, now)).is_ok());
        let mut bad = inbound(&good, now);
        let text = String::from_utf8(bad.body.clone())
            .unwrap()
            .replace("total_amount=10.00", "total_amount=0.01");
        bad.body = text.into_bytes();
        assert_eq!(
            h.pay.parse_notification(&bad),
            Err(NotificationError::BadSignature)
        );
        let t = h
            .emu
            .render_tampered_notification(&r.attempt_id.to_string(), 1)
            .unwrap();
        let n = h.pay.parse_notification(&inbound(&t, now)).unwrap();
        assert_eq!((n.attempt_id, n.amount), (r.attempt_id, cny(1)));
        assert_eq!(h.pay.notification_reply(true).body, b"success");
        assert_ne!(h.pay.notification_reply(false).body, b"success");

        let dup = submit(PaymentMethod::AlipayQr, 1006);
        let conflict = submit(PaymentMethod::AlipayQr, 1007);
        h.pay.submit(&dup).await;
        h.pay.submit(&conflict).await;
        let before = h.rx.count();
        h.emu.scan(&dup.attempt_id.to_string()).unwrap();
        h.emu.scan(&conflict.attempt_id.to_string()).unwrap();
        h.emu.flush().await;
        let got: Vec<_> = (before..h.rx.count())
            .map(|i| {
                h.pay
                    .parse_notification(&h.rx.inbound(i, h.emu.now_ms()))
                    .unwrap()
            })
            .collect();
        let of = |a| {
            got.iter()
                .filter(|n| n.attempt_id == a)
                .cloned()
                .collect::<Vec<_>>()
        };
        let dups = of(dup.attempt_id);
        assert_eq!(dups.len(), 2);
        assert_eq!(dups[0].event, dups[1].event);
        let c = of(conflict.attempt_id);
        assert_eq!(
            c[1].event,
            NotificationEvent::Payment {
                outcome: ChannelOutcome::Closed
            }
        );
    }
);

bounded!(
    retries_follow_4m_10m_10m_1h_and_stop_on_the_literal_success,
    async {
        let h = harness().await;
        h.rx.refuse.store(4, std::sync::atomic::Ordering::SeqCst);
        let r = submit(PaymentMethod::AlipayQr, 1000);
        h.pay.submit(&r).await;
        h.emu.scan(&r.attempt_id.to_string()).unwrap();
        h.emu.flush().await;
        for ms in [240_000, 600_000, 600_000, 3_600_000] {
            h.emu.advance(ms - 1).await;
            h.emu.advance(1).await;
        }
        let d = h.emu.deliveries();
        let gaps: Vec<i64> = d.windows(2).map(|w| w[1].at_ms - w[0].at_ms).collect();
        assert_eq!(gaps, [240_000, 600_000, 600_000, 3_600_000]);
        assert_eq!(d.iter().filter(|x| x.acked).count(), 1);
        assert_eq!(
            d[0].status,
            Some(200),
            "a 200 that is not `success` is still a failure"
        );
        h.emu.advance(48 * 3_600_000).await;
        assert_eq!(h.emu.deliveries().len(), 5);
        // Never acknowledged: 8 sends in all.
        h.rx.refuse
            .store(u32::MAX, std::sync::atomic::Ordering::SeqCst);
        let r = submit(PaymentMethod::AlipayQr, 1000);
        h.pay.submit(&r).await;
        h.emu.scan(&r.attempt_id.to_string()).unwrap();
        h.emu.advance(26 * 3_600_000).await;
        assert_eq!(
            h.emu
                .deliveries()
                .iter()
                .filter(|d| d.out_trade_no == r.attempt_id.to_string())
                .count(),
            8
        );
    }
);

bounded!(bill_zip_gbk_with_refunds_and_totals, async {
    let h = harness().await;
    let a = submit(PaymentMethod::AlipayCode, 1000);
    let b = submit(PaymentMethod::AlipayCode, 2550);
    h.pay.submit(&a).await;
    h.pay.submit(&b).await;
    let rf = refund(&a, 400);
    h.pay.refund(&rf).await;
    let c = submit(PaymentMethod::AlipayCode, 500);
    h.pay.submit(&c).await;
    h.pay.cancel(&q(&c)).await; // a cancel of a paid order makes a refund line too
    let day = beijing_date(h.emu.now_ms());
    assert_eq!(h.pay.download_bill(day).await, Err(BillError::NotReady));
    h.emu.advance(86_400_000).await;
    let bill = h.pay.download_bill(day).await.unwrap();
    assert_eq!(bill.lines.len(), 5);
    assert_eq!(bill.summary.payment_count, 3);
    assert_eq!(bill.summary.payment_total, cny(4050));
    assert_eq!(bill.summary.refund_count, 2);
    assert_eq!(bill.summary.refund_total, cny(900));
    let line = bill
        .lines
        .iter()
        .find(|l| l.out_refund_no.as_deref() == Some(rf.refund_id.to_string().as_str()))
        .unwrap();
    assert_eq!(
        (line.kind, line.amount, line.fee),
        (BillLineKind::Refund, cny(400), cny(-2))
    );
    assert!(
        bill.lines
            .iter()
            .all(|l| !l.channel_trade_no.ends_with('\t')),
        "TABs stripped"
    );
});

bounded!(query_5xx_is_unknown_and_the_next_query_answers, async {
    let h = harness().await;
    // Amount ..09: the first two status queries get HTTP 500; the order itself is paid.
    let r = submit(PaymentMethod::AlipayCode, 1009);
    assert_eq!(h.pay.submit(&r).await.outcome.label(), "succeeded");
    assert_eq!(h.pay.query(&q(&r)).await.label(), "unknown", "HTTP 500");
    assert_eq!(h.pay.query(&q(&r)).await.label(), "unknown", "HTTP 500");
    assert_eq!(h.pay.query(&q(&r)).await.label(), "succeeded");
});
