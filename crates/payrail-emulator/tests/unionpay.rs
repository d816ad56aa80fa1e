//! UnionPay ACP connector against the UnionPay emulator, over real HTTP on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use payrail_channels::unionpay::{UnionPay, UnionPayConfig};
use payrail_channels::*;
use payrail_domain::input::PaymentMethod;
use payrail_domain::{ChannelOutcome, Secret};
use payrail_emulator::{spawn, ChannelKind, EmulatorConfig, EmulatorHandle};
use std::sync::Arc;

struct H {
    emu: EmulatorHandle,
    pay: Arc<UnionPay>,
    rx: Receiver,
}

fn config(emu: &EmulatorHandle, back_url: &str, timeout_ms: u64) -> UnionPayConfig {
    UnionPayConfig {
        base_url: emu.base_url.clone(),
        mer_id: emu.config.merchant_id.clone(),
        cert_id: "68759663125".into(),
        signing_key: Secret::new(payrail_emulator::testkeys::MERCHANT_PRIVATE_PEM.into()),
        unionpay_public_key: emu.public_key_pem.clone(),
        back_url: back_url.into(),
        front_url: Some("https://shop.example/return".into()),
        timeout_ms,
    }
}

async fn harness() -> H {
    let mut cfg = EmulatorConfig::for_tests(ChannelKind::UnionPay);
    cfg.start_ms = START_MS;
    let emu = spawn(cfg).await.unwrap();
    let replies =
        Arc::new(UnionPay::new(config(&emu, "http://127.0.0.1:9/unused", 2_000)).unwrap());
    let rx = Receiver::start(replies).await;
    let pay = Arc::new(UnionPay::new(config(&emu, &rx.url, 2_000)).unwrap());
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
    if method == PaymentMethod::UnionpayCode {
        r.auth_code = Some(Secret::new("6223194500000000001".into()));
    }
    r
}

fn q(r: &SubmitRequest, trade_no: Option<String>) -> QueryRequest {
    QueryRequest {
        attempt_id: r.attempt_id,
        amount: r.amount,
        channel_trade_no: trade_no,
        submitted_at_ms: r.submitted_at_ms,
        expires_at_ms: r.expires_at_ms,
    }
}

fn trade_no(o: &ChannelOutcome) -> Option<String> {
    match o {
        ChannelOutcome::Succeeded {
            channel_trade_no, ..
        }
        | ChannelOutcome::Processing { channel_trade_no } => channel_trade_no.clone(),
        _ => None,
    }
}

fn refund(r: &SubmitRequest, trade: &str, minor: i64) -> RefundRequest {
    RefundRequest {
        refund_id: refund_id(),
        attempt_id: r.attempt_id,
        channel_trade_no: Some(trade.into()),
        payment_amount: r.amount,
        refund_amount: cny(minor),
        reason: None,
        requested_at_ms: START_MS + 60_000,
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
    gateway_form_then_payment_with_back_url_notification,
    async {
        let h = harness().await;
        let r = submit(PaymentMethod::UnionpayWeb, 1000);
        let res = h.pay.submit(&r).await;
        assert_eq!(res.outcome.label(), "processing");
        let Some(NextAction::PostForm { url, fields }) = res.next_action else {
            panic!("{res:?}")
        };
        assert!(
            fields
                .iter()
                .any(|(k, v)| k == "orderId" && !v.contains('_')),
            "orderId is letters and digits"
        );
        assert_eq!(
            h.pay.query(&q(&r, None)).await.label(),
            "unknown",
            "no such transaction before the payer comes"
        );
        // The payer's browser posts the signed form.
        let page = reqwest::Client::new()
            .post(&url)
            .form(&fields)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(page.contains("cashier"), "{page}");
        h.emu
            .scan(&r.attempt_id.to_string().replace('_', ""))
            .unwrap();
        h.emu.flush().await;
        let n = h
            .pay
            .parse_notification(&h.rx.inbound(0, h.emu.now_ms()))
            .unwrap();
        assert_eq!((n.attempt_id, n.amount), (r.attempt_id, cny(1000)));
        assert_eq!(n.channel_merchant_id, "777290058110048");
        assert!(matches!(
            n.event,
            NotificationEvent::Payment {
                outcome: ChannelOutcome::Succeeded { .. }
            }
        ));
        assert!(h.emu.deliveries()[0].acked);
        assert_eq!(
            h.pay.query(&q(&r, None)).await.label(),
            "succeeded",
            "origRespCode 00"
        );
    }
);

bounded!(
    payment_code_05_for_n_queries_then_success_or_failure,
    async {
        let h = harness().await;
        let r = submit(PaymentMethod::UnionpayCode, 1002);
        assert_eq!(
            h.pay.submit(&r).await.outcome.label(),
            "processing",
            "respCode 00 = accepted"
        );
        assert_eq!(
            h.pay.query(&q(&r, None)).await.label(),
            "unknown",
            "origRespCode 05"
        );
        assert_eq!(h.pay.query(&q(&r, None)).await.label(), "unknown");
        assert_eq!(h.pay.query(&q(&r, None)).await.label(), "succeeded");
        let r = submit(PaymentMethod::UnionpayCode, 1003);
        h.pay.submit(&r).await;
        h.pay.query(&q(&r, None)).await;
        h.pay.query(&q(&r, None)).await;
        assert!(
            matches!(h.pay.query(&q(&r, None)).await, ChannelOutcome::Failed { ref code, .. } if code == "01")
        );
        let r = submit(PaymentMethod::UnionpayCode, 1001);
        assert!(
            matches!(h.pay.submit(&r).await.outcome, ChannelOutcome::Failed { ref code, .. } if code == "01")
        );
    }
);

bounded!(
    timeout_after_success_5xx_and_duplicate_order_are_unknown,
    async {
        let h = harness().await;
        let impatient = UnionPay::new(config(&h.emu, &h.rx.url, 300)).unwrap();
        let r = submit(PaymentMethod::UnionpayCode, 1004);
        assert_eq!(impatient.submit(&r).await.outcome.label(), "unknown");
        assert_eq!(h.pay.query(&q(&r, None)).await.label(), "succeeded");
        assert_eq!(
            h.pay.submit(&r).await.outcome.label(),
            "unknown",
            "respCode 12: the order exists"
        );
        let r = submit(PaymentMethod::UnionpayCode, 1005);
        assert_eq!(
            h.pay.submit(&r).await.outcome.label(),
            "unknown",
            "HTTP 500"
        );
        assert_eq!(
            h.pay.query(&q(&r, None)).await.label(),
            "unknown",
            "34: not found is unknown"
        );
        // A query with another txnTime does not find the order.
        let mut wrong = q(&r, None);
        wrong.submitted_at_ms += 1_000;
        assert_eq!(h.pay.query(&wrong).await.label(), "unknown");
        // UnionPay has no close.
        assert_eq!(
            h.pay
                .close(&q(&submit(PaymentMethod::UnionpayWeb, 1000), None))
                .await
                .label(),
            "unknown"
        );
    }
);

bounded!(revoke_same_day_and_refunds_never_over_the_payment, async {
    let h = harness().await;
    let r = submit(PaymentMethod::UnionpayCode, 1000);
    let paid = h.pay.submit(&r).await.outcome;
    let trade = trade_no(&paid).unwrap();
    assert!(
        matches!(
            h.pay.cancel(&q(&r, None)).await,
            CancelOutcome::Unknown { .. }
        ),
        "needs the queryId"
    );
    assert_eq!(
        h.pay.cancel(&q(&r, Some(trade.clone()))).await,
        CancelOutcome::Cancelled {
            refunded: Some(true)
        }
    );
    assert!(
        matches!(
            h.pay.cancel(&q(&r, Some(trade))).await,
            CancelOutcome::Unknown { .. }
        ),
        "repeat: 12 duplicate"
    );

    let r = submit(PaymentMethod::UnionpayCode, 1000);
    let trade = trade_no(&h.pay.submit(&r).await.outcome).unwrap();
    let r1 = refund(&r, &trade, 300);
    assert_eq!(
        h.pay.refund(&r1).await.label(),
        "processing",
        "00 = accepted"
    );
    assert!(matches!(
        h.pay.query_refund(&r1).await,
        RefundOutcome::Succeeded {
            channel_refund_no: Some(_),
            ..
        }
    ));
    assert_eq!(
        h.pay.refund(&r1).await.label(),
        "unknown",
        "a repeat is 12, and the query says done"
    );
    assert!(
        matches!(h.pay.refund(&refund(&r, &trade, 701)).await, RefundOutcome::Failed { ref code, .. } if code == "33")
    );
    assert_eq!(
        h.pay.refund(&refund(&r, &trade, 700)).await.label(),
        "processing"
    );
    assert_eq!(
        h.pay.query_refund(&refund(&r, &trade, 1)).await.label(),
        "unknown"
    );
    h.emu.flush().await;
    let refunds: Vec<_> = (0..h.rx.count())
        .map(|i| {
            h.pay
                .parse_notification(&h.rx.inbound(i, h.emu.now_ms()))
                .unwrap()
        })
        .filter(|n| n.attempt_id == r.attempt_id)
        .collect();
    let first = refunds.iter().find(|n| matches!(n.event, NotificationEvent::Refund { refund_id: Some(id), .. } if id == r1.refund_id)).unwrap();
    assert_eq!(
        first.amount,
        cny(1000),
        "the order total travels in reqReserved"
    );
    assert!(
        matches!(first.event, NotificationEvent::Refund { refund_amount: Some(a), outcome: RefundOutcome::Succeeded { .. }, .. } if a == cny(300))
    );
    // Revoke is same-day only.
    let late = submit(PaymentMethod::UnionpayCode, 1000);
    let trade = trade_no(&h.pay.submit(&late).await.outcome).unwrap();
    h.emu.advance(86_400_000).await;
    assert!(matches!(
        h.pay.cancel(&q(&late, Some(trade))).await,
        CancelOutcome::Failed { .. }
    ));
});

bounded!(
    notifications_bad_signature_tamper_duplicates_conflicts_and_schedule,
    async {
        let h = harness().await;
        h.rx.refuse.store(2, std::sync::atomic::Ordering::SeqCst);
        let r = submit(PaymentMethod::UnionpayCode, 1000);
        h.pay.submit(&r).await;
        let no = r.attempt_id.to_string().replace('_', "");
        h.emu.flush().await;
        h.emu.advance(60_000).await;
        h.emu.advance(120_000).await;
        let d = h.emu.deliveries();
        assert_eq!(d.len(), 3);
        assert_eq!(
            d.windows(2)
                .map(|w| w[1].at_ms - w[0].at_ms)
                .collect::<Vec<_>>(),
            [60_000, 120_000]
        );
        assert_eq!(
            d.iter().map(|x| x.acked).collect::<Vec<_>>(),
            [false, false, true]
        );
        h.emu.advance(3_600_000).await;
        assert_eq!(h.emu.deliveries().len(), 3);

        let now = h.emu.now_ms();
        let good = h.emu.render_payment_notification(&no).unwrap();
        assert!(h.pay.parse_notification(&inbound(&good, now)).is_ok());
        let mut bad = inbound(&good, now);
        bad.body = String::from_utf8(bad.body)
            .unwrap()
            .replace("txnAmt=1000", "txnAmt=1")
            .into_bytes();
        assert_eq!(
            h.pay.parse_notification(&bad),
            Err(NotificationError::BadSignature)
        );
        let t = h.emu.render_tampered_notification(&no, 1).unwrap();
        let n = h.pay.parse_notification(&inbound(&t, now)).unwrap();
        assert_eq!((n.attempt_id, n.amount), (r.attempt_id, cny(1)));

        let dup = submit(PaymentMethod::UnionpayCode, 1006);
        let conflict = submit(PaymentMethod::UnionpayCode, 1007);
        let before = h.rx.count();
        h.pay.submit(&dup).await;
        h.pay.submit(&conflict).await;
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
                .map(|n| n.event.clone())
                .collect::<Vec<_>>()
        };
        let dups = of(dup.attempt_id);
        assert_eq!(dups.len(), 2);
        assert_eq!(dups[0], dups[1]);
        let c = of(conflict.attempt_id);
        assert!(matches!(
            c[0],
            NotificationEvent::Payment {
                outcome: ChannelOutcome::Succeeded { .. }
            }
        ));
        assert!(
            matches!(
                c[1],
                NotificationEvent::Payment {
                    outcome: ChannelOutcome::Failed { .. }
                }
            ),
            "{:?}",
            c[1]
        );

        // Never acknowledged: 5 sends, then it stops.
        h.rx.refuse
            .store(u32::MAX, std::sync::atomic::Ordering::SeqCst);
        let r = submit(PaymentMethod::UnionpayCode, 1000);
        h.pay.submit(&r).await;
        h.emu.advance(3_600_000).await;
        assert_eq!(
            h.emu
                .deliveries()
                .iter()
                .filter(|d| d.out_trade_no == r.attempt_id.to_string().replace('_', ""))
                .count(),
            5
        );
    }
);

bounded!(
    reconciliation_file_with_consumes_refunds_and_revokes,
    async {
        let h = harness().await;
        let a = submit(PaymentMethod::UnionpayCode, 1000);
        let b = submit(PaymentMethod::UnionpayCode, 2550);
        let ta = trade_no(&h.pay.submit(&a).await.outcome).unwrap();
        let tb = trade_no(&h.pay.submit(&b).await.outcome).unwrap();
        let rf = refund(&a, &ta, 400);
        h.pay.refund(&rf).await;
        h.pay.cancel(&q(&b, Some(tb.clone()))).await;
        let day = beijing_date(h.emu.now_ms());
        assert_eq!(h.pay.download_bill(day).await, Err(BillError::NotReady));
        h.emu.advance(86_400_000).await;
        let bill = h.pay.download_bill(day).await.unwrap();
        assert_eq!(bill.lines.len(), 4);
        assert_eq!(
            (bill.summary.payment_count, bill.summary.payment_total),
            (2, cny(3550))
        );
        assert_eq!(
            (bill.summary.refund_count, bill.summary.refund_total),
            (2, cny(2950))
        );
        let line = bill
            .lines
            .iter()
            .find(|l| {
                l.out_refund_no.as_deref()
                    == Some(rf.refund_id.to_string().replace('_', "").as_str())
            })
            .unwrap();
        assert_eq!(
            (line.amount, line.fee, line.channel_trade_no.as_str()),
            (cny(400), cny(-2), ta.as_str())
        );
        assert!(bill
            .lines
            .iter()
            .any(|l| l.status == "S30" && l.channel_trade_no == tb));
    }
);

fn web_form(res: SubmitResponse) -> (String, Vec<(String, String)>) {
    let Some(NextAction::PostForm { url, fields }) = res.next_action else {
        panic!("{res:?}")
    };
    (url, fields)
}

async fn post_form(url: &str, fields: &[(String, String)]) -> String {
    reqwest::Client::new()
        .post(url)
        .form(fields)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

bounded!(
    an_unpaid_gateway_order_lapses_at_pay_timeout_and_close_confirms_it_from_the_files,
    async {
        let h = harness().await;
        // START is 2026-11-22 10:00 Beijing; the orders expire at 10:30.
        let unpaid = submit(PaymentMethod::UnionpayWeb, 1000);
        let (url, fields) = web_form(h.pay.submit(&unpaid).await);
        assert!(fields
            .iter()
            .any(|(k, v)| k == "payTimeout" && v == "20261122103000"));
        assert!(post_form(&url, &fields).await.contains("cashier"));
        let paid = submit(PaymentMethod::UnionpayWeb, 1000);
        let (_, paid_fields) = web_form(h.pay.submit(&paid).await);
        post_form(&url, &paid_fields).await;
        h.emu
            .scan(&paid.attempt_id.to_string().replace('_', ""))
            .unwrap();
        let no = unpaid.attempt_id.to_string().replace('_', "");
        let unknown = |o: ChannelOutcome| match o {
            ChannelOutcome::Unknown { reason } => reason,
            other => panic!("{other:?}"),
        };

        // Before payTimeout the payer may still pay: no close.
        let why = unknown(h.pay.close(&q(&unpaid, None)).await);
        assert!(why.contains("reconciliation file"), "{why}");
        // After it UnionPay refuses the payment and a new cashier, yet its query still says
        // "no such transaction" (34): unknown, as before.
        h.emu.advance(30 * 60_000).await;
        assert!(h.emu.scan(&no).is_err());
        assert!(post_form(&url, &fields).await.contains("payTimeout"));
        assert_eq!(h.pay.query(&q(&unpaid, None)).await.label(), "unknown");
        // The next morning the order's day is out, but a consume after 23:00 would settle on
        // the next day, whose file is not: still unknown.
        h.emu.advance(86_400_000).await;
        let why = unknown(h.pay.close(&q(&unpaid, None)).await);
        assert!(why.contains("2026-11-23"), "{why}");
        // A day later both are out and neither lists it: closed, definitely.
        h.emu.advance(86_400_000).await;
        assert_eq!(h.pay.close(&q(&unpaid, None)).await, ChannelOutcome::Closed);
        // The paid order is reported as paid, never closed.
        assert_eq!(h.pay.close(&q(&paid, None)).await.label(), "succeeded");
        // A query that misses a paid order (here: another txnTime) cannot close it either: the
        // file lists it.
        let mut missed = q(&paid, None);
        missed.submitted_at_ms += 1_000;
        assert_eq!(h.pay.query(&missed).await.label(), "unknown");
        let why = unknown(h.pay.close(&missed).await);
        assert!(why.contains("lists the order as paid"), "{why}");
        // An order span longer than any payment's is left to a person.
        let mut long = q(&unpaid, None);
        long.expires_at_ms = long.submitted_at_ms + 30 * 86_400_000;
        let why = unknown(h.pay.close(&long).await);
        assert!(why.contains("by hand"), "{why}");
    }
);

bounded!(query_5xx_is_unknown_and_the_next_query_answers, async {
    let h = harness().await;
    // Amount ..09: the first two status queries get HTTP 500; the order itself is paid.
    let r = submit(PaymentMethod::UnionpayCode, 1009);
    assert_eq!(h.pay.submit(&r).await.outcome.label(), "processing");
    assert_eq!(
        h.pay.query(&q(&r, None)).await.label(),
        "unknown",
        "HTTP 500"
    );
    assert_eq!(
        h.pay.query(&q(&r, None)).await.label(),
        "unknown",
        "HTTP 500"
    );
    assert_eq!(h.pay.query(&q(&r, None)).await.label(), "succeeded");
});
