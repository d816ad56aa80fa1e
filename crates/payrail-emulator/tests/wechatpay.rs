//! WeChat Pay v3 connector against the WeChat Pay emulator, over real HTTP on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use payrail_channels::wechatpay::{WechatPay, WechatPayConfig};
use payrail_channels::*;
use payrail_domain::input::PaymentMethod;
use payrail_domain::{ChannelOutcome, Secret};
use payrail_emulator::{spawn, ChannelKind, EmulatorConfig, EmulatorHandle, Script};
use std::sync::Arc;

struct H {
    emu: EmulatorHandle,
    pay: Arc<WechatPay>,
    rx: Receiver,
}

fn config(emu: &EmulatorHandle, notify_url: &str, timeout_ms: u64) -> WechatPayConfig {
    WechatPayConfig {
        base_url: emu.base_url.clone(),
        mchid: emu.config.merchant_id.clone(),
        appid: emu.config.app_id.clone(),
        merchant_serial_no: "3775B6A45ACD588826D15E583A95F5DD00000000".into(),
        merchant_private_key: Secret::new(payrail_emulator::testkeys::MERCHANT_PRIVATE_PEM.into()),
        api_v3_key: Secret::new(emu.config.api_v3_key.clone()),
        platform_public_key: emu.public_key_pem.clone(),
        platform_serial: emu.config.platform_serial.clone(),
        notify_url: notify_url.into(),
        timeout_ms,
    }
}

async fn harness() -> H {
    let mut cfg = EmulatorConfig::for_tests(ChannelKind::WechatPay);
    cfg.start_ms = START_MS;
    let emu = spawn(cfg).await.unwrap();
    // The receiver needs a connector for its replies; any instance of the channel will do.
    let probe = Arc::new(WechatPay::new(config(&emu, "http://127.0.0.1:9/unused", 2_000)).unwrap());
    let rx = Receiver::start(probe).await;
    let pay = Arc::new(WechatPay::new(config(&emu, &rx.url, 2_000)).unwrap());
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
    if method == PaymentMethod::WechatCode {
        r.auth_code = Some(Secret::new("134567890123456789".into()));
    }
    if method == PaymentMethod::WechatH5 {
        r.client_ip = Some("203.0.113.9".parse().unwrap());
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
        reason: Some("退货".into()),
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
    native_qr_scan_then_success_with_a_verified_notification,
    async {
        let h = harness().await;
        let r = submit(PaymentMethod::WechatNative, 1000);
        let res = h.pay.submit(&r).await;
        assert_eq!(res.outcome.label(), "processing");
        assert!(
            matches!(res.next_action, Some(NextAction::DisplayQrCode { ref code_url }) if code_url.starts_with("weixin://"))
        );
        assert_eq!(
            h.pay.query(&q(&r)).await.label(),
            "processing",
            "NOTPAY before the scan"
        );
        h.emu.scan(&r.attempt_id.to_string()).unwrap();
        h.emu.flush().await;
        assert_eq!(h.rx.count(), 1);
        let n = h
            .pay
            .parse_notification(&h.rx.inbound(0, h.emu.now_ms()))
            .unwrap();
        assert_eq!(n.attempt_id, r.attempt_id);
        assert_eq!(n.amount, cny(1000));
        assert_eq!(n.channel_merchant_id, "1900000109");
        assert_eq!(n.channel_app_id.as_deref(), Some("wxd678efh567hg6787"));
        assert!(matches!(
            n.event,
            NotificationEvent::Payment {
                outcome: ChannelOutcome::Succeeded { .. }
            }
        ));
        assert!(
            h.emu.deliveries()[0].acked,
            "204 with no body stops the retries"
        );
        let paid = h.pay.query(&q(&r)).await;
        assert!(
            matches!(
                paid,
                ChannelOutcome::Succeeded {
                    channel_trade_no: Some(_),
                    paid_at_ms: Some(_)
                }
            ),
            "{paid:?}"
        );
        // An order the channel never saw is unknown, never failed.
        let never = submit(PaymentMethod::WechatNative, 1000);
        assert_eq!(h.pay.query(&q(&never)).await.label(), "unknown");
    }
);

bounded!(h5_and_jsapi_give_their_next_actions, async {
    let h = harness().await;
    let res = h.pay.submit(&submit(PaymentMethod::WechatH5, 1000)).await;
    assert!(
        matches!(res.next_action, Some(NextAction::Redirect { .. })),
        "{res:?}"
    );
    let mut r = submit(PaymentMethod::WechatJsapi, 1000);
    r.payer_id = Some("oUpF8uMuAJO_M2pxb1Q9zNjWeS6o".into());
    let res = h.pay.submit(&r).await;
    let Some(NextAction::InvokeWallet { params }) = res.next_action else {
        panic!("{res:?}")
    };
    assert!(params
        .iter()
        .any(|(k, v)| k == "package" && v.starts_with("prepay_id=")));
    assert!(params.iter().any(|(k, v)| k == "signType" && v == "RSA"));
    // Missing inputs are refused before anything is sent.
    let res = h
        .pay
        .submit(&submit(PaymentMethod::WechatJsapi, 1000))
        .await;
    assert_eq!(res.outcome.label(), "failed");
});

bounded!(payment_code_userpaying_for_n_queries_then_success, async {
    let h = harness().await;
    let r = submit(PaymentMethod::WechatCode, 1002);
    assert_eq!(
        h.pay.submit(&r).await.outcome.label(),
        "processing",
        "USERPAYING"
    );
    assert_eq!(h.pay.query(&q(&r)).await.label(), "processing");
    assert_eq!(h.pay.query(&q(&r)).await.label(), "processing");
    assert_eq!(h.pay.query(&q(&r)).await.label(), "succeeded");
});

bounded!(
    payment_code_userpaying_then_failure_and_immediate_failure,
    async {
        let h = harness().await;
        let r = submit(PaymentMethod::WechatCode, 1003);
        assert_eq!(h.pay.submit(&r).await.outcome.label(), "processing");
        assert_eq!(h.pay.query(&q(&r)).await.label(), "processing");
        assert_eq!(h.pay.query(&q(&r)).await.label(), "processing");
        assert!(
            matches!(h.pay.query(&q(&r)).await, ChannelOutcome::Failed { ref code, .. } if code == "PAYERROR")
        );
        let r = submit(PaymentMethod::WechatCode, 1001);
        assert!(
            matches!(h.pay.submit(&r).await.outcome, ChannelOutcome::Failed { ref code, .. } if code == "NOTENOUGH")
        );
    }
);

bounded!(
    timeout_after_the_channel_succeeded_is_unknown_then_query_says_paid,
    async {
        let h = harness().await;
        let impatient = WechatPay::new(config(&h.emu, &h.rx.url, 300)).unwrap();
        let r = submit(PaymentMethod::WechatCode, 1004);
        let res = impatient.submit(&r).await;
        assert!(
            matches!(res.outcome, ChannelOutcome::Unknown { ref reason } if reason.contains("timeout")),
            "{res:?}"
        );
        assert_eq!(h.pay.query(&q(&r)).await.label(), "succeeded");
    }
);

bounded!(server_error_is_unknown_and_a_retry_goes_through, async {
    let h = harness().await;
    let r = submit(PaymentMethod::WechatNative, 1005);
    assert_eq!(h.pay.submit(&r).await.outcome.label(), "unknown");
    assert_eq!(
        h.pay.query(&q(&r)).await.label(),
        "unknown",
        "nothing was created"
    );
    assert_eq!(h.pay.submit(&r).await.outcome.label(), "processing");
});

bounded!(close_unpaid_and_close_after_payment, async {
    let h = harness().await;
    let r = submit(PaymentMethod::WechatNative, 1000);
    h.pay.submit(&r).await;
    assert_eq!(h.pay.close(&q(&r)).await, ChannelOutcome::Closed);
    assert_eq!(h.pay.query(&q(&r)).await, ChannelOutcome::Closed);
    assert!(
        h.emu.scan(&r.attempt_id.to_string()).is_err(),
        "a closed order cannot be paid"
    );
    let paid = submit(PaymentMethod::WechatNative, 1000);
    h.pay.submit(&paid).await;
    h.emu.scan(&paid.attempt_id.to_string()).unwrap();
    assert_eq!(
        h.pay.close(&q(&paid)).await.label(),
        "succeeded",
        "ORDERPAID → the query's answer"
    );
});

bounded!(reverse_with_recall_then_revoked, async {
    let h = harness().await;
    let r = submit(PaymentMethod::WechatCode, 1008);
    assert_eq!(h.pay.submit(&r).await.outcome.label(), "succeeded");
    assert!(
        matches!(h.pay.cancel(&q(&r)).await, CancelOutcome::Retry { .. }),
        "recall=Y"
    );
    assert!(matches!(
        h.pay.cancel(&q(&r)).await,
        CancelOutcome::Cancelled { .. }
    ));
    assert_eq!(h.pay.query(&q(&r)).await, ChannelOutcome::Cancelled);
    let never = submit(PaymentMethod::WechatCode, 1000);
    assert!(
        matches!(
            h.pay.cancel(&q(&never)).await,
            CancelOutcome::Unknown { .. }
        ),
        "not found is unknown"
    );
    // Past the 7-day window the channel refuses definitely.
    let late = submit(PaymentMethod::WechatCode, 1000);
    h.pay.submit(&late).await;
    h.emu.advance(8 * 86_400_000).await;
    assert!(
        matches!(h.pay.cancel(&q(&late)).await, CancelOutcome::Failed { ref code, .. } if code == "REVERSE_EXPIRE")
    );
});

bounded!(partial_and_full_refunds_never_exceed_the_payment, async {
    let h = harness().await;
    let r = submit(PaymentMethod::WechatCode, 1000);
    assert_eq!(h.pay.submit(&r).await.outcome.label(), "succeeded");
    let r1 = refund(&r, 300);
    assert_eq!(h.pay.refund(&r1).await.label(), "processing");
    assert!(matches!(
        h.pay.query_refund(&r1).await,
        RefundOutcome::Succeeded {
            channel_refund_no: Some(_),
            ..
        }
    ));
    assert_eq!(
        h.pay.refund(&r1).await.label(),
        "succeeded",
        "a repeat is the same refund"
    );
    assert!(
        matches!(h.pay.refund(&refund(&r, 701)).await, RefundOutcome::Failed { ref code, .. } if code == "INVALID_REQUEST")
    );
    assert_eq!(h.pay.refund(&refund(&r, 700)).await.label(), "processing");
    assert_eq!(h.pay.refund(&refund(&r, 1)).await.label(), "failed");
    assert_eq!(
        h.pay.query_refund(&refund(&r, 1)).await.label(),
        "unknown",
        "not found is unknown"
    );
    assert_eq!(
        h.emu
            .order(&r.attempt_id.to_string())
            .unwrap()
            .refunded_fen(),
        1000
    );
    // The refund notifications went to the account's notify URL.
    h.emu.flush().await;
    assert_eq!(h.rx.count(), 2);
    let n = h
        .pay
        .parse_notification(&h.rx.inbound(0, h.emu.now_ms()))
        .unwrap();
    match n.event {
        NotificationEvent::Refund {
            refund_id,
            refund_amount,
            outcome,
            ..
        } => {
            assert_eq!(refund_id, Some(r1.refund_id));
            assert_eq!(refund_amount, Some(cny(300)));
            assert_eq!(outcome.label(), "succeeded");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(n.amount, cny(1000));
    assert_eq!(
        h.pay.query(&q(&r)).await.label(),
        "succeeded",
        "REFUND is still a paid order"
    );
});

bounded!(
    notifications_signature_timestamp_probe_tamper_duplicates_conflicts,
    async {
        let h = harness().await;
        let r = submit(PaymentMethod::WechatNative, 1000);
        h.pay.submit(&r).await;
        h.emu.scan(&r.attempt_id.to_string()).unwrap();
        let now = h.emu.now_ms();
        let good = h
            .emu
            .render_payment_notification(&r.attempt_id.to_string())
            .unwrap();
        assert!(h.pay.parse_notification(&inbound(&good, now)).is_ok());
        // One byte changed: bad signature.
        let mut bad = inbound(&good, now);
        bad.body[10] ^= 1;
        assert_eq!(
            h.pay.parse_notification(&bad),
            Err(NotificationError::BadSignature)
        );
        // Outside ±5 minutes.
        assert_eq!(
            h.pay.parse_notification(&inbound(&good, now + 301_000)),
            Err(NotificationError::StaleTimestamp)
        );
        assert_eq!(
            h.pay.parse_notification(&inbound(&good, now - 301_000)),
            Err(NotificationError::StaleTimestamp)
        );
        // The probe is recognised as such and changes nothing.
        let probe = h.emu.render_probe().unwrap();
        assert_eq!(
            h.pay.parse_notification(&inbound(&probe, now)),
            Err(NotificationError::Probe)
        );
        assert_eq!(h.pay.notification_reply(false).status, 500);
        // Sent over HTTP (this test receiver acknowledges everything), it arrives intact and the
        // connector still recognises it.
        let before = h.rx.count();
        assert_eq!(
            h.emu.send_probe(&h.rx.url).await,
            Some(204),
            "the test receiver acks everything"
        );
        let probe_seen = h.rx.inbound(before, now);
        assert_eq!(
            h.pay.parse_notification(&probe_seen),
            Err(NotificationError::Probe)
        );
        // Validly signed but tampered amount: the connector reports what the channel said.
        let t = h
            .emu
            .render_tampered_notification(&r.attempt_id.to_string(), 1)
            .unwrap();
        let n = h.pay.parse_notification(&inbound(&t, now)).unwrap();
        assert_eq!((n.attempt_id, n.amount), (r.attempt_id, cny(1)));
        // Another account's APIv3 key cannot decrypt.
        let mut other = config(&h.emu, &h.rx.url, 2_000);
        other.api_v3_key = Secret::new("another32bytekeyanother32bytekey".into());
        let other = WechatPay::new(other).unwrap();
        assert_eq!(
            other.parse_notification(&inbound(&good, now)),
            Err(NotificationError::Decrypt)
        );

        // Duplicate (06) and conflicting (07) notifications.
        let dup = submit(PaymentMethod::WechatNative, 1006);
        h.pay.submit(&dup).await;
        let conflict = submit(PaymentMethod::WechatNative, 1007);
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
                .map(|n| n.event.clone())
                .collect::<Vec<_>>()
        };
        let dups = of(dup.attempt_id);
        assert_eq!(dups.len(), 2);
        assert_eq!(dups[0], dups[1], "a duplicate says the same thing");
        let conflicting = of(conflict.attempt_id);
        assert!(matches!(
            conflicting[0],
            NotificationEvent::Payment {
                outcome: ChannelOutcome::Succeeded { .. }
            }
        ));
        assert_eq!(
            conflicting[1],
            NotificationEvent::Payment {
                outcome: ChannelOutcome::Closed
            }
        );
    }
);

bounded!(retries_follow_the_v3_schedule_and_stop_on_ack, async {
    let h = harness().await;
    h.rx.refuse.store(3, std::sync::atomic::Ordering::SeqCst);
    let r = submit(PaymentMethod::WechatNative, 1000);
    h.pay.submit(&r).await;
    h.emu.scan(&r.attempt_id.to_string()).unwrap();
    h.emu.flush().await;
    assert_eq!(h.emu.deliveries().len(), 1);
    h.emu.advance(14_999).await;
    assert_eq!(h.emu.deliveries().len(), 1, "not before 15 s");
    h.emu.advance(1).await;
    h.emu.advance(15_000).await;
    h.emu.advance(30_000).await;
    let d = h.emu.deliveries();
    assert_eq!(d.len(), 4);
    let gaps: Vec<i64> = d.windows(2).map(|w| w[1].at_ms - w[0].at_ms).collect();
    assert_eq!(gaps, [15_000, 15_000, 30_000]);
    assert_eq!(
        d.iter().map(|x| x.acked).collect::<Vec<_>>(),
        [false, false, false, true]
    );
    assert_eq!(d[0].status, Some(500));
    h.emu.advance(30 * 3_600_000).await;
    assert_eq!(h.emu.deliveries().len(), 4, "acknowledged: no more sends");

    // Never acknowledged: 1 + 15 sends within 24 h 4 min, then it stops.
    h.rx.refuse
        .store(u32::MAX, std::sync::atomic::Ordering::SeqCst);
    let r = submit(PaymentMethod::WechatNative, 1000);
    h.pay.submit(&r).await;
    h.emu.scan(&r.attempt_id.to_string()).unwrap();
    h.emu.flush().await;
    h.emu.advance(24 * 3_600_000 + 4 * 60_000).await;
    let sends = h
        .emu
        .deliveries()
        .iter()
        .filter(|d| d.out_trade_no == r.attempt_id.to_string())
        .count();
    assert_eq!(sends, 16);
    h.emu.advance(48 * 3_600_000).await;
    let sends = h
        .emu
        .deliveries()
        .iter()
        .filter(|d| d.out_trade_no == r.attempt_id.to_string())
        .count();
    assert_eq!(sends, 16);
});

bounded!(
    bill_lists_payments_and_refunds_with_a_matching_summary,
    async {
        let h = harness().await;
        let a = submit(PaymentMethod::WechatCode, 1000);
        let b = submit(PaymentMethod::WechatCode, 2550);
        h.pay.submit(&a).await;
        h.pay.submit(&b).await;
        let rf = refund(&a, 400);
        h.pay.refund(&rf).await;
        let day = beijing_date(h.emu.now_ms());
        assert_eq!(
            h.pay.download_bill(day).await,
            Err(BillError::NotReady),
            "today's bill is not out"
        );
        h.emu.advance(86_400_000).await;
        let bill = h.pay.download_bill(day).await.unwrap();
        assert_eq!(bill.lines.len(), 3);
        let pay_a = bill
            .lines
            .iter()
            .find(|l| l.out_trade_no == a.attempt_id.to_string() && l.kind == BillLineKind::Payment)
            .unwrap();
        assert_eq!((pay_a.amount, pay_a.fee), (cny(1000), cny(6)));
        let refund_line = bill
            .lines
            .iter()
            .find(|l| l.kind == BillLineKind::Refund)
            .unwrap();
        assert_eq!(
            refund_line.out_refund_no.as_deref(),
            Some(rf.refund_id.to_string().as_str())
        );
        assert_eq!((refund_line.amount, refund_line.fee), (cny(400), cny(-2)));
        assert_eq!(bill.summary.payment_count, 2);
        assert_eq!(bill.summary.payment_total, cny(3550));
        assert_eq!(bill.summary.refund_total, cny(400));
        assert_eq!(bill.summary.fee_total, cny(6 + 15 - 2));
    }
);

bounded!(
    bill_whose_file_does_not_match_its_signed_sha1_is_refused,
    async {
        let h = harness().await;
        let a = submit(PaymentMethod::WechatCode, 1000);
        h.pay.submit(&a).await;
        let day = beijing_date(h.emu.now_ms());
        h.emu.advance(86_400_000).await;
        // Changed in transit (another WeChat order number: no total catches it): refused.
        h.emu.bill_fault(payrail_emulator::BillFault::AlteredFile);
        assert!(
            matches!(h.pay.download_bill(day).await, Err(BillError::Corrupt(ref m)) if m.contains("SHA-1")),
            "an altered bill file was accepted"
        );
        // The same file as signed: accepted.
        h.emu.bill_fault(payrail_emulator::BillFault::None);
        let bill = h.pay.download_bill(day).await.unwrap();
        assert_eq!(bill.lines.len(), 1);
    }
);

// Bug: the SHA-1 check ran only when the answer carried `hash_type` SHA1 and a `hash_value`;
// an answer without them let any file through unchecked (the file itself is not signed).
bounded!(wechat_bill_without_a_hash_is_refused, async {
    let h = harness().await;
    let a = submit(PaymentMethod::WechatCode, 1000);
    h.pay.submit(&a).await;
    let day = beijing_date(h.emu.now_ms());
    h.emu.advance(86_400_000).await;
    h.emu.bill_fault(payrail_emulator::BillFault::NoHash);
    assert!(
        matches!(h.pay.download_bill(day).await, Err(BillError::Corrupt(ref m)) if m.contains("SHA-1")),
        "a bill without a hash to check was accepted"
    );
});

bounded!(query_5xx_is_unknown_and_the_next_query_answers, async {
    let h = harness().await;
    // Amount ..09: the first two status queries get HTTP 500; the order itself is paid.
    let r = submit(PaymentMethod::WechatCode, 1009);
    assert_eq!(h.pay.submit(&r).await.outcome.label(), "succeeded");
    assert_eq!(h.pay.query(&q(&r)).await.label(), "unknown", "HTTP 500");
    assert_eq!(h.pay.query(&q(&r)).await.label(), "unknown", "HTTP 500");
    assert_eq!(h.pay.query(&q(&r)).await.label(), "succeeded");
});

const HOUR_MS: i64 = 3_600_000;

/// The unknown's reason, or a failure naming what came instead.
fn unknown_reason(o: ChannelOutcome) -> String {
    match o {
        ChannelOutcome::Unknown { reason } => reason,
        other => panic!("expected unknown, got {other:?}"),
    }
}

bounded!(a_days_trade_bill_is_out_at_ten_the_next_morning, async {
    let h = harness().await;
    h.pay.submit(&submit(PaymentMethod::WechatCode, 1000)).await;
    let day = beijing_date(h.emu.now_ms());
    // START is 10:00 on the 22nd: at 09:59 on the 23rd the bill is not out, at 10:00 it is.
    h.emu.advance(24 * HOUR_MS - 60_000).await;
    assert_eq!(h.pay.download_bill(day).await, Err(BillError::NotReady));
    h.emu.advance(60_000).await;
    assert_eq!(h.pay.download_bill(day).await.unwrap().lines.len(), 1);
});

// Bug: an order whose creation never reached WeChat (HTTP 500 before anything happened, a
// timeout in transit) answers ORDER_NOT_EXIST to the query and the close for ever, so its
// payment stayed processing for ever. The trade bills of its days now confirm the close.
bounded!(
    a_lost_order_is_closed_once_the_trade_bills_of_its_days_are_out_and_do_not_list_it,
    async {
        let h = harness().await;
        // START is 2026-11-22 10:00 Beijing; the orders expire at 10:30.
        let lost = submit(PaymentMethod::WechatNative, 1000);
        let no = lost.attempt_id.to_string();
        h.emu.script(
            &no,
            Script {
                server_errors: 1,
                ..Script::default()
            },
        );
        assert_eq!(h.pay.submit(&lost).await.outcome.label(), "unknown");
        assert!(h.emu.order(&no).is_none(), "the emulator recorded it");
        let why = unknown_reason(h.pay.query(&q(&lost)).await);
        assert!(why.contains("ORDER_NOT_EXIST"), "{why}");
        // Before its expiry, and just after it: no bill is out, so no close.
        let why = unknown_reason(h.pay.close(&q(&lost)).await);
        assert!(
            why.contains("waiting for the trade bill of 2026-11-23"),
            "{why}"
        );
        h.emu.advance(30 * 60_000).await;
        assert_eq!(h.pay.close(&q(&lost)).await.label(), "unknown");
        // The next morning the order's day is out but the day after its expiry is not.
        h.emu.advance(24 * HOUR_MS).await;
        let why = unknown_reason(h.pay.close(&q(&lost)).await);
        assert!(why.contains("trade bill of 2026-11-23"), "{why}");
        // At 10:00 on the 24th both are out and neither lists it: closed, definitely.
        h.emu.advance(23 * HOUR_MS + 30 * 60_000).await;
        assert_eq!(h.pay.close(&q(&lost)).await, ChannelOutcome::Closed);
        assert!(h.emu.order(&no).is_none());
        assert!(h.emu.ledger().iter().all(|l| l.out_trade_no != no));
        // The query alone still says nothing: only the close reads the bills.
        assert_eq!(h.pay.query(&q(&lost)).await.label(), "unknown");
    }
);

bounded!(
    an_order_the_query_does_not_find_but_a_bill_lists_as_paid_is_never_closed,
    async {
        let h = harness().await;
        let paid = submit(PaymentMethod::WechatNative, 1000);
        let no = paid.attempt_id.to_string();
        h.emu.script(
            &no,
            Script {
                not_found: true,
                ..Script::default()
            },
        );
        assert_eq!(h.pay.submit(&paid).await.outcome.label(), "processing");
        h.emu.scan(&no).unwrap();
        h.emu.flush().await;
        assert_eq!(h.rx.count(), 0, "a notification was sent");
        assert_eq!(h.pay.query(&q(&paid)).await.label(), "unknown");
        // Two days later every bill of its days is out, and the first lists it as paid.
        h.emu.advance(48 * HOUR_MS).await;
        let why = unknown_reason(h.pay.close(&q(&paid)).await);
        assert!(
            why.contains("trade bill of 2026-11-22 lists the order as paid"),
            "{why}"
        );
        // The reverse says the same "no such order": unknown too, never cancelled.
        assert!(matches!(
            h.pay.cancel(&q(&paid)).await,
            CancelOutcome::Unknown { .. }
        ));
        assert_eq!(
            h.emu.order(&no).map(|o| o.state),
            Some(payrail_emulator::core::OrderState::Paid)
        );
    }
);
