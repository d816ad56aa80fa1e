//! The ledger in the money flow, black box: fee plans fixed at success, exactly one posting set
//! per succeeded payment (races, retries, atomicity), refunds before and after settlement,
//! settlement batches with a cut-off and their statements, wallet payments (TCC) under
//! concurrency, merchant balances and postings, the operator's ledger views — and, after every
//! scenario, a trial balance that sums to zero per currency.
//!
//! Requests are signed with the server's manual clock, so the tests move time by days.

use super::*;
use payrail_domain::civil::DateTime;
use payrail_domain::ledger::EntryId;

/// A signed request timed by the server's clock.
pub(super) async fn at(
    h: &Harness,
    c: &Credentials,
    method: Method,
    path: &str,
    body: Option<&str>,
) -> Answer {
    let body_s = body.unwrap_or("");
    let auth = payrail_domain::signing::authorization_header(
        &c.key_id,
        c.secret.as_bytes(),
        method.as_str(),
        path,
        h.clock.now_s(),
        &nonce(),
        body_s.as_bytes(),
    );
    let key = (method == Method::POST).then(nonce);
    h.client
        .signed_raw(method, path, body_s, &auth, key.as_deref())
        .await
        .unwrap()
}

pub(super) async fn mget(h: &Harness, c: &Credentials, path: &str) -> Answer {
    at(h, c, Method::GET, path, None).await
}

pub(super) async fn op(h: &Harness, method: Method, path: &str, body: Option<Value>) -> Answer {
    let key = (method == Method::POST).then(nonce);
    h.client
        .operator(&h.op, method, path, body.as_ref(), key.as_deref())
        .await
        .unwrap()
}

/// Pays `amount` CNY with `method` (`payer_id` for a wallet); returns the answer.
pub(super) async fn pay_with(
    h: &Harness,
    c: &Credentials,
    amount: i64,
    otn: &str,
    wallet: Option<&str>,
) -> Answer {
    let mut body =
        json!({"amount": amount, "currency": "CNY", "out_trade_no": otn, "subject": "ledger"});
    match wallet {
        Some(w) => {
            body["method"] = json!("wallet");
            body["payer_id"] = json!(w);
        }
        None => body["method"] = json!("sandbox"),
    }
    at(h, c, Method::POST, "/v1/payments", Some(&body.to_string())).await
}

pub(super) async fn pay_ok(h: &Harness, c: &Credentials, amount: i64, otn: &str) -> String {
    let a = pay_with(h, c, amount, otn, None).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["status"], "succeeded", "{}", a.body);
    a.body["id"].as_str().unwrap().to_string()
}

async fn refund_ok(h: &Harness, c: &Credentials, payment: &str, amount: i64) -> Value {
    let body = json!({"payment_id": payment, "amount": amount, "out_refund_no": nonce()});
    let a = at(h, c, Method::POST, "/v1/refunds", Some(&body.to_string())).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["status"], "succeeded", "{}", a.body);
    a.body
}

/// `(pending, available)` of a merchant in CNY, through `GET /v1/balance`.
pub(super) async fn balances(h: &Harness, c: &Credentials) -> (i64, i64) {
    let a = mget(h, c, "/v1/balance").await;
    assert_eq!(a.status, 200, "{}", a.body);
    let of = |k: &str| {
        a.body[k]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["currency"] == "CNY")
            .map_or(0, |x| x["amount"].as_i64().unwrap())
    };
    (of("pending"), of("available"))
}

/// The invariant every scenario ends with: the trial balance sums to zero per currency (through
/// the API), and every account's counters equal the sum of its postings (the store's check).
pub(super) async fn books_balance(h: &Harness) {
    let t = op(h, Method::GET, "/v1/operator/ledger/trial-balance", None).await;
    assert_eq!(t.status, 200, "{}", t.body);
    assert_eq!(t.body["balanced"], true, "{}", t.body);
    for total in t.body["totals"].as_array().unwrap() {
        assert_eq!(total["debits_posted"], total["credits_posted"], "{total}");
    }
    let check = h.engine.store.check_ledger().await.unwrap();
    assert!(check.ok(), "{check:?}");
}

/// Entries with this id (0 or 1: ids are unique).
pub(super) async fn entry_exists(h: &Harness, id: &str) -> bool {
    h.engine
        .store
        .get_entry(&EntryId::parse(id).unwrap())
        .await
        .unwrap()
        .is_some()
}

async fn fee_plan(h: &Harness, body: Value) -> Answer {
    op(h, Method::POST, "/v1/operator/fee-plans", Some(body)).await
}

/// 0.6 % fee, 0.25 % channel cost, both refunded pro rata: the worked example of docs/ledger.md.
pub(super) async fn default_plan(h: &Harness) {
    let a = fee_plan(
        h,
        json!({"currency": "CNY", "rate_bps": 60, "channel_cost_bps": 25}),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
}

pub(super) fn beijing_ms(s: &str) -> i64 {
    let (dt, _) = DateTime::parse(s).unwrap();
    dt.to_unix_ms(480)
}

both!(
    fee_plans_pick_the_most_specific_and_fix_the_fee_at_success,
    |b| async move {
        let Some(h) = harness(b).await else { return };
        let (ma, ca) = h.merchant("Plans A").await;
        let (_mb, cb) = h.merchant("Plans B").await;
        // Platform default, merchant A's default, and A's plan for sandbox payments by sandbox.
        for body in [
            json!({"currency": "CNY", "rate_bps": 60}),
            json!({"merchant_id": ma, "currency": "CNY", "rate_bps": 30}),
            json!({"merchant_id": ma, "channel": "sandbox", "method": "sandbox", "currency": "CNY", "rate_bps": 10, "fixed": 5}),
        ] {
            let a = fee_plan(&h, body).await;
            assert_eq!(a.status, 200, "{}", a.body);
            assert!(a.body["id"].as_str().unwrap().starts_with("fpl_"));
        }
        let pa = pay_ok(&h, &ca, 10_000, "a-1").await;
        let pb = pay_ok(&h, &cb, 10_000, "b-1").await;
        let fee = |p: &str| {
            let h = &h;
            let p = p.to_string();
            async move {
                h.engine
                    .payment_clearing(p.parse().unwrap())
                    .await
                    .unwrap()
                    .unwrap()
                    .fee_minor
            }
        };
        assert_eq!(fee(&pa).await, 10 + 5, "merchant + channel + method");
        assert_eq!(fee(&pb).await, 60, "platform default");
        assert_eq!(balances(&h, &ca).await, (10_000 - 15, 0));
        assert_eq!(balances(&h, &cb).await, (10_000 - 60, 0));

        // Changing A's plan keeps its id, bumps its version, and leaves A's first payment alone.
        let a = fee_plan(
        &h,
        json!({"merchant_id": ma, "channel": "sandbox", "method": "sandbox", "currency": "CNY", "rate_bps": 100}),
    )
    .await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.body["version"], 2);
        let pa2 = pay_ok(&h, &ca, 10_000, "a-2").await;
        assert_eq!(
            fee(&pa).await,
            15,
            "the fee was fixed when the payment succeeded"
        );
        assert_eq!(fee(&pa2).await, 100);
        let list = op(&h, Method::GET, "/v1/operator/fee-plans", None).await;
        assert_eq!(list.body["data"].as_array().unwrap().len(), 3);

        // Bad plans are refused with a parameter and write nothing.
        for (body, status) in [
            (json!({"currency": "CNY", "rate_bps": 10_001}), 400),
            (json!({"currency": "CNY", "rate_bps": -1}), 400),
            (
                json!({"currency": "CNY", "rate_bps": 10, "minimum": 50, "maximum": 40}),
                400,
            ),
            (json!({"currency": "XXX", "rate_bps": 10}), 400),
            (
                json!({"currency": "CNY", "rate_bps": 10, "fee_refund": "sometimes"}),
                400,
            ),
            (
                json!({"currency": "CNY", "rate_bps": 10, "channel": "no spaces"}),
                400,
            ),
            (json!({"currency": "CNY", "rate_bps": 10, "bogus": 1}), 400),
            (
                json!({"merchant_id": "mch_01JD3K0000000000000000000A", "currency": "CNY", "rate_bps": 10}),
                404,
            ),
        ] {
            let a = fee_plan(&h, body.clone()).await;
            assert_eq!(a.status, status, "{body}: {}", a.body);
        }
        let list = op(&h, Method::GET, "/v1/operator/fee-plans", None).await;
        assert_eq!(list.body["data"].as_array().unwrap().len(), 3);
        // Replaying a plan change answers the same and changes nothing.
        let body = json!({"currency": "USD", "rate_bps": 20});
        let key = nonce();
        let first = h
            .client
            .operator(
                &h.op,
                Method::POST,
                "/v1/operator/fee-plans",
                Some(&body),
                Some(&key),
            )
            .await
            .unwrap();
        let again = h
            .client
            .operator(
                &h.op,
                Method::POST,
                "/v1/operator/fee-plans",
                Some(&body),
                Some(&key),
            )
            .await
            .unwrap();
        assert_eq!(first.body, again.body);
        assert_eq!(again.body["version"], 1);
        // The OpenAPI document describes every money route.
        let (_, o) = h.client.get("/openapi.json").await.unwrap();
        let o: Value = serde_json::from_str(&o).unwrap();
        for path in [
            "/v1/balance",
            "/v1/ledger/entries",
            "/v1/settlements",
            "/v1/settlements/{id}",
            "/v1/settlements/{id}/statement.csv",
            "/v1/operator/fee-plans",
            "/v1/operator/settlement-cycles",
            "/v1/operator/settlements",
            "/v1/operator/settlements/run",
            "/v1/operator/settlements/{id}",
            "/v1/operator/settlements/{id}/statement.csv",
            "/v1/wallets/{holder}",
            "/v1/operator/merchants/{merchant_id}/wallets/{holder}",
            "/v1/operator/merchants/{merchant_id}/wallets/{holder}/topup",
            "/v1/operator/ledger/accounts",
            "/v1/operator/ledger/accounts/{id}/postings",
            "/v1/operator/ledger/entries",
            "/v1/operator/ledger/trial-balance",
        ] {
            assert!(o["paths"][path].is_object(), "{path}");
        }
        let methods =
            &o["components"]["schemas"]["CreatePaymentRequest"]["properties"]["method"]["enum"];
        assert!(methods.as_array().unwrap().contains(&json!("wallet")));
        books_balance(&h).await;
    }
);

both!(
    a_succeeded_payment_posts_once_under_races_and_retries,
    |b| async move {
        let Some(h) = harness(b).await else { return };
        let (_m, c) = h.merchant("Races").await;
        default_plan(&h).await;
        // 1002: the sandbox opens the order, the payer pays 3 s later.
        let a = pay_with(&h, &c, 1002, "race-1", None).await;
        assert_eq!(a.body["status"], "processing", "{}", a.body);
        let id: payrail_domain::PaymentId = a.body["id"].as_str().unwrap().parse().unwrap();
        assert!(!entry_exists(&h, &format!("{id}:captured")).await);
        h.clock.advance_ms(4_000);
        // Eight re-queries race to apply the same success: one wins, the others reload and see it.
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let engine = h.engine.clone();
            set.spawn(async move { engine.requery_payment(id).await });
        }
        while let Some(r) = set.join_next().await {
            // A loser may answer with what it read before the winner committed; the store is what
            // counts.
            r.unwrap().unwrap();
        }
        let stored = h.engine.store.get_payment_any(id).await.unwrap().unwrap();
        assert_eq!(stored.status, payrail_domain::PaymentStatus::Succeeded);
        let journal = h.engine.store.list_entries(None, 1_000).await.unwrap();
        let captured: Vec<_> = journal
            .iter()
            .filter(|e| e.reference.as_deref() == Some(&id.to_string()))
            .collect();
        assert_eq!(captured.len(), 1, "exactly one posting set: {captured:?}");
        assert_eq!(captured[0].id.as_str(), format!("{id}:captured"));
        // Fee 6 fen (0.6 % of 10.02 = 6.012), cost 3 (2.505 → 3): clearing 999, cost 3 / pending 996, fee 6.
        let amounts: Vec<i64> = captured[0]
            .postings
            .iter()
            .map(|p| p.amount_minor)
            .collect();
        assert_eq!(amounts, vec![999, 3, 996, 6]);
        // A crash-style retry: the same transition again, with the versions it was decided on.
        let p = h.engine.store.get_payment_any(id).await.unwrap().unwrap();
        let att = h.engine.store.get_attempts(id).await.unwrap().remove(0);
        let ledger = h
            .engine
            .transition_ledger(
                &p,
                payrail_domain::PaymentStatus::Succeeded,
                h.clock.now_ms(),
            )
            .await
            .unwrap()
            .unwrap();
        let stale = payrail_store::Transition {
            payment_id: id,
            payment_version: p.version - 1,
            payment_status: payrail_domain::PaymentStatus::Succeeded,
            attempt_id: att.id,
            attempt_version: att.version - 1,
            attempt_status: payrail_domain::AttemptStatus::Succeeded,
            channel_trade_no: None,
            failure_code: None,
            failure_message: None,
            paid_at_ms: None,
            now_ms: h.clock.now_ms(),
            event: None,
            job: None,
            idempotency: None,
            ledger: Some(ledger),
        };
        assert!(!h.engine.store.apply_transition(&stale).await.unwrap());
        let again = h.engine.store.list_entries(None, 1_000).await.unwrap();
        assert_eq!(again.len(), journal.len(), "a stale retry posts nothing");
        assert_eq!(balances(&h, &c).await, (996, 0));
        books_balance(&h).await;
    }
);

both!(
    a_refused_posting_rolls_the_status_change_back,
    |b| async move {
        let Some(h) = harness(b).await else { return };
        let (m, c) = h.merchant("Atomic").await;
        let a = pay_with(&h, &c, 1004, "atomic-1", None).await;
        assert_eq!(a.body["status"], "processing");
        let id: payrail_domain::PaymentId = a.body["id"].as_str().unwrap().parse().unwrap();
        let p = h.engine.store.get_payment_any(id).await.unwrap().unwrap();
        let att = h.engine.store.get_attempts(id).await.unwrap().remove(0);
        let events_before = h
            .engine
            .store
            .list_events(m.parse().unwrap(), 0, 100)
            .await
            .unwrap()
            .len();
        // A success whose entry the ledger refuses (a confirm of a freeze that does not exist):
        // nothing of the change may remain.
        let t = payrail_store::Transition {
            payment_id: id,
            payment_version: p.version,
            payment_status: payrail_domain::PaymentStatus::Succeeded,
            attempt_id: att.id,
            attempt_version: att.version,
            attempt_status: payrail_domain::AttemptStatus::Succeeded,
            channel_trade_no: None,
            failure_code: None,
            failure_message: None,
            paid_at_ms: Some(h.clock.now_ms()),
            now_ms: h.clock.now_ms(),
            event: Some(payrail_store::NewEvent {
                id: format!("evt_atomic_{}", nonce()),
                merchant_id: m.parse().unwrap(),
                event_type: "payment.succeeded".into(),
                object_id: id.to_string(),
                payload: "{}".into(),
                created_at_ms: h.clock.now_ms(),
            }),
            job: None,
            idempotency: None,
            ledger: Some(payrail_store::TransitionLedger {
                entry: payrail_domain::posting_rules::wallet_confirm(id).unwrap(),
                tolerate: Vec::new(),
                clearing: None,
            }),
        };
        match h.engine.store.apply_transition(&t).await {
            Err(payrail_store::StoreError::LedgerRefused { code, .. }) => {
                assert_eq!(code, "pending_not_found")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        let after = h.engine.store.get_payment_any(id).await.unwrap().unwrap();
        assert_eq!(after.status, payrail_domain::PaymentStatus::Processing);
        assert_eq!(after.version, p.version);
        let events_after = h
            .engine
            .store
            .list_events(m.parse().unwrap(), 0, 100)
            .await
            .unwrap()
            .len();
        assert_eq!(events_after, events_before, "the event rolled back with it");
        assert!(h.engine.payment_clearing(id).await.unwrap().is_none());
        books_balance(&h).await;
    }
);

both!(
    lifecycle_payments_refunds_settlement_and_wallet_balance_the_books,
    |b| async move {
        // A generous channel timeout: twenty wallet payments queue on one wallet's balance, and
        // a Try cut off by the timeout would leave its payment processing (resolved later by
        // the status-sync job, which this test does not run).
        let config = EngineConfig {
            channel_timeout_ms: 10_000,
            ..test_config()
        };
        let Some(h) = harness_with(b, config, false).await else {
            return;
        };
        // Business day 2026-11-22 with a 23:00 cut-off at UTC+08:00, T+1.
        h.clock.set_ms(beijing_ms("2026-11-22 10:00:00"));
        let (m, c) = h.merchant("Lifecycle").await;
        let (_other, co) = h.merchant("Bystander").await;
        default_plan(&h).await;
        let cy = op(
        &h,
        Method::POST,
        "/v1/operator/settlement-cycles",
        Some(json!({"merchant_id": m, "t_plus_days": 1, "cutoff": "23:00", "utc_offset": "+08:00"})),
    )
    .await;
        assert_eq!(cy.status, 200, "{}", cy.body);
        assert_eq!(cy.body["cutoff"], "23:00:00");

        // Payments of the 22nd: 100.00 (fee 0.60), 100.00, 2.50 (fee 1.5 fen → 2), and five 10.00
        // in parallel (fee 6 fen each).
        let p1 = pay_ok(&h, &c, 10_000, "life-1").await;
        let p2 = pay_ok(&h, &c, 10_000, "life-2").await;
        pay_ok(&h, &c, 250, "life-3").await;
        let mut set = tokio::task::JoinSet::new();
        for i in 0..5 {
            let (client, creds, clock) = (h.client.clone(), c.clone(), h.clock.clone());
            set.spawn(async move {
            let body = json!({"amount": 1000, "currency": "CNY", "out_trade_no": format!("life-par-{i}"), "subject": "x", "method": "sandbox"}).to_string();
            let auth = payrail_domain::signing::authorization_header(
                &creds.key_id, creds.secret.as_bytes(), "POST", "/v1/payments", clock.now_s(), &nonce(), body.as_bytes());
            client.signed_raw(Method::POST, "/v1/payments", &body, &auth, Some(&nonce())).await.unwrap()
        });
        }
        while let Some(a) = set.join_next().await {
            let a = a.unwrap();
            assert_eq!(a.body["status"], "succeeded", "{}", a.body);
        }
        // A partial refund before settlement comes out of pending: 30.00, fee back 0.18.
        refund_ok(&h, &c, &p1, 3_000).await;
        let pending_22 = (10_000 - 60 - 2_982) + (10_000 - 60) + (250 - 2) + 5 * (1_000 - 6);
        assert_eq!(pending_22, 22_116);
        assert_eq!(balances(&h, &c).await, (pending_22, 0));
        // A payment at 22:59:59 is still the 22nd's; one at 23:00:00 is the 23rd's.
        h.clock.set_ms(beijing_ms("2026-11-22 22:59:59"));
        pay_ok(&h, &c, 500, "life-late").await; // fee 3
        h.clock.set_ms(beijing_ms("2026-11-22 23:00:00"));
        pay_ok(&h, &c, 700, "life-next-day").await; // fee 4.2 → 4
        let pending_22 = pending_22 + 497;
        assert_eq!(balances(&h, &c).await, (pending_22 + 696, 0));
        books_balance(&h).await;

        // Not due before 2026-11-23 23:00 (T+1): a run settles nothing.
        h.clock.set_ms(beijing_ms("2026-11-23 22:59:59"));
        let run = op(&h, Method::POST, "/v1/operator/settlements/run", None).await;
        assert_eq!(run.status, 200, "{}", run.body);
        assert_eq!(
            run.body["created"].as_array().unwrap().len(),
            0,
            "{}",
            run.body
        );
        // Due: one batch for the merchant (the bystander has its own), covering the 22nd only.
        h.clock.set_ms(beijing_ms("2026-11-23 23:00:00"));
        let run = op(&h, Method::POST, "/v1/operator/settlements/run", None).await;
        let created = run.body["created"].as_array().unwrap().clone();
        let ours: Vec<&Value> = created
            .iter()
            .filter(|s| s["merchant_id"] == m.as_str())
            .collect();
        assert_eq!(ours.len(), 1, "{}", run.body);
        let s = ours[0];
        assert_eq!(s["business_day"], "2026-11-22");
        assert_eq!(s["payment_count"], 9);
        assert_eq!(s["refund_count"], 1);
        assert_eq!(s["gross"], 10_000 + 10_000 + 250 + 5_000 + 500);
        assert_eq!(s["fee"], 60 + 60 + 2 + 30 + 3);
        assert_eq!(s["refunded"], 3_000);
        assert_eq!(s["fee_refunded"], 18);
        assert_eq!(s["net"], pending_22);
        assert_eq!(s["window_end"], beijing_ms("2026-11-22 23:00:00") / 1000);
        assert_eq!(balances(&h, &c).await, (696, pending_22));
        // Re-running the day, or the run, creates nothing new.
        for body in [None, Some(json!({"date": "2026-11-22"}))] {
            let again = op(&h, Method::POST, "/v1/operator/settlements/run", body).await;
            assert_eq!(again.status, 200, "{}", again.body);
            assert!(
                again.body["created"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|s| s["merchant_id"] != m.as_str()),
                "{}",
                again.body
            );
        }
        let sid = s["id"].as_str().unwrap().to_string();
        let list = mget(&h, &c, "/v1/settlements").await;
        assert_eq!(
            list.body["data"].as_array().unwrap().len(),
            1,
            "{}",
            list.body
        );
        assert_eq!(
            mget(&h, &c, &format!("/v1/settlements/{sid}")).await.body["net"],
            pending_22
        );
        // The statement: one line per payment and refund; its lines add up to its total line, and
        // its net is what the settlement entry moved.
        let csv = mget(&h, &c, &format!("/v1/settlements/{sid}/statement.csv")).await;
        assert_eq!(csv.status, 200);
        let text = csv.body.as_str().unwrap().to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "type,id,out_no,payment_id,cleared_at,amount,fee,net,from_available,from_suspense"
        );
        assert_eq!(
            lines.iter().filter(|l| l.starts_with("payment,")).count(),
            9
        );
        assert_eq!(lines.iter().filter(|l| l.starts_with("refund,")).count(), 1);
        let col = |l: &str, i: usize| -> i64 { l.split(',').nth(i).unwrap().parse().unwrap() };
        let body_lines: Vec<&&str> = lines
            .iter()
            .filter(|l| l.starts_with("payment,") || l.starts_with("refund,"))
            .collect();
        let total = lines.iter().find(|l| l.starts_with("total,")).unwrap();
        for i in 5..=7 {
            assert_eq!(
                body_lines.iter().map(|l| col(l, i)).sum::<i64>(),
                col(total, i),
                "column {i}"
            );
        }
        assert_eq!(col(total, 7), pending_22);
        // Every line adds up: amount − fee = net + from_available + from_suspense.
        for l in &body_lines {
            assert_eq!(
                col(l, 5) - col(l, 6),
                col(l, 7) + col(l, 8) + col(l, 9),
                "{l}"
            );
        }
        let entry = h
            .engine
            .store
            .get_entry(&EntryId::parse(s["entry_id"].as_str().unwrap()).unwrap())
            .await
            .unwrap()
            .unwrap();
        assert!(entry.postings.iter().all(|p| p.amount_minor == pending_22));
        assert!(text.contains("2026-11-22 22:59:59"), "{text}");
        // Another merchant sees none of it.
        assert_eq!(
            mget(&h, &co, &format!("/v1/settlements/{sid}"))
                .await
                .status,
            404
        );
        assert_eq!(
            mget(&h, &co, &format!("/v1/settlements/{sid}/statement.csv"))
                .await
                .status,
            404
        );
        assert!(mget(&h, &co, "/v1/settlements").await.body["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["merchant_id"] != m.as_str()));

        // A refund after settlement comes out of available: 20.00 of p2, fee back 0.12.
        refund_ok(&h, &c, &p2, 2_000).await;
        let available = pending_22 - 1_988;
        assert_eq!(balances(&h, &c).await, (696, available));
        books_balance(&h).await;

        // Wallet: 150.00 topped up; 20 parallel payments of 10.00 (fee 0.06): exactly 15 succeed,
        // the others fail on the balance, never overdrawing it.
        let t = op(
            &h,
            Method::POST,
            &format!("/v1/operator/merchants/{m}/wallets/alice/topup"),
            Some(json!({"amount": 15_000, "currency": "CNY"})),
        )
        .await;
        assert_eq!(t.status, 200, "{}", t.body);
        assert_eq!(t.body["accounts"][0]["balance"], 15_000);
        let mut set = tokio::task::JoinSet::new();
        for i in 0..20 {
            let (client, creds, clock) = (h.client.clone(), c.clone(), h.clock.clone());
            set.spawn(async move {
            let body = json!({"amount": 1000, "currency": "CNY", "out_trade_no": format!("wal-{i}"), "subject": "x", "method": "wallet", "payer_id": "alice"}).to_string();
            let auth = payrail_domain::signing::authorization_header(
                &creds.key_id, creds.secret.as_bytes(), "POST", "/v1/payments", clock.now_s(), &nonce(), body.as_bytes());
            client.signed_raw(Method::POST, "/v1/payments", &body, &auth, Some(&nonce())).await.unwrap()
        });
        }
        let (mut ok, mut refused, mut wallet_paid) = (0, 0, Vec::new());
        while let Some(a) = set.join_next().await {
            let a = a.unwrap();
            assert_eq!(a.status, 200, "{}", a.body);
            match a.body["status"].as_str().unwrap() {
                "succeeded" => {
                    ok += 1;
                    wallet_paid.push(a.body["id"].as_str().unwrap().to_string());
                }
                "failed" => {
                    assert_eq!(
                        a.body["failure"]["code"], "insufficient_balance",
                        "{}",
                        a.body
                    );
                    refused += 1;
                }
                other => panic!("unexpected status {other}: {}", a.body),
            }
        }
        assert_eq!((ok, refused), (15, 5));
        let w = op(
            &h,
            Method::GET,
            &format!("/v1/operator/merchants/{m}/wallets/alice"),
            None,
        )
        .await;
        assert_eq!(w.body["accounts"][0]["balance"], 0, "{}", w.body);
        assert_eq!(
            w.body["accounts"][0]["debits_pending"], 0,
            "no freeze left behind"
        );
        // A refund of a wallet payment goes back to the wallet: 10.00, 0.06 of fee returned.
        refund_ok(&h, &c, &wallet_paid[0], 1_000).await;
        let w = mget(&h, &c, "/v1/wallets/alice").await;
        assert_eq!(w.status, 200, "{}", w.body);
        assert_eq!(w.body["accounts"][0]["balance"], 1_000);
        // Wallets belong to their merchant (review finding: any merchant could pay itself from
        // any wallet it could name). Another merchant naming alice finds no wallet, cannot read
        // hers, and her balance is untouched.
        let a = pay_with(&h, &co, 100, "wal-thief", Some("alice")).await;
        assert_eq!(a.body["failure"]["code"], "wallet_not_found", "{}", a.body);
        assert_eq!(mget(&h, &co, "/v1/wallets/alice").await.status, 404);
        assert_eq!(
            mget(&h, &c, "/v1/wallets/alice").await.body["accounts"][0]["balance"],
            1_000
        );
        let pending_23 = 696 + 15 * 994 - 994;
        assert_eq!(balances(&h, &c).await, (pending_23, available));
        // A wallet payment the balance cannot cover fails and freezes nothing.
        let a = pay_with(&h, &c, 5_000, "wal-big", Some("alice")).await;
        assert_eq!(a.body["status"], "failed");
        let a = pay_with(&h, &c, 100, "wal-nobody", Some("nobody")).await;
        assert_eq!(a.body["failure"]["code"], "wallet_not_found", "{}", a.body);
        books_balance(&h).await;

        // Those wallet payments came after the 23rd's cut-off: they are the 24th's. A run at the
        // 24th's due time settles both days, each its own batch: the 23rd (the one payment after
        // the first cut-off) and the 24th (the wallet payments, their refund netted).
        h.clock.set_ms(beijing_ms("2026-11-25 23:00:00"));
        let run = op(&h, Method::POST, "/v1/operator/settlements/run", None).await;
        let mut ours: Vec<&Value> = run.body["created"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["merchant_id"] == m.as_str())
            .collect();
        ours.sort_by_key(|s| s["business_day"].as_str().unwrap().to_string());
        assert_eq!(ours.len(), 2, "{}", run.body);
        assert_eq!(
            (
                &ours[0]["business_day"],
                &ours[0]["payment_count"],
                &ours[0]["net"]
            ),
            (&json!("2026-11-23"), &json!(1), &json!(696))
        );
        assert_eq!(
            (
                &ours[1]["business_day"],
                &ours[1]["payment_count"],
                &ours[1]["refund_count"]
            ),
            (&json!("2026-11-24"), &json!(15), &json!(1))
        );
        assert_eq!(ours[1]["net"], 15 * 994 - 994);
        assert_eq!(balances(&h, &c).await, (0, available + pending_23));

        // The merchant's postings: newest first, paged by cursor, each with the balance after it.
        let mut cursor: Option<String> = None;
        let mut seen = Vec::new();
        for _ in 0..100 {
            let path = match &cursor {
                Some(c) => format!("/v1/ledger/entries?limit=7&cursor={c}"),
                None => "/v1/ledger/entries?limit=7".to_string(),
            };
            let page = mget(&h, &c, &path).await;
            assert_eq!(page.status, 200, "{}", page.body);
            seen.extend(page.body["data"].as_array().unwrap().iter().cloned());
            if page.body["has_more"] == false {
                break;
            }
            cursor = Some(page.body["next_cursor"].as_str().unwrap().to_string());
        }
        // Pending: 10 channel payments, 15 wallet confirms (and their 15 freezes, as pending
        // credits), 2 refunds, 3 settlement debits; available: 3 settlement credits, 1 refund.
        assert_eq!(seen.len(), 10 + 15 + 15 + 2 + 3 + 3 + 1, "{seen:?}");
        let ids: std::collections::BTreeSet<String> = seen
            .iter()
            .map(|p| p["id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(ids.len(), seen.len(), "no posting twice across pages");
        let latest_available = seen.iter().find(|p| p["account"] == "available").unwrap();
        assert_eq!(latest_available["balance_after"], available + pending_23);
        // The bystander cannot page through them with this cursor, nor see them.
        let foreign = mget(
            &h,
            &co,
            &format!(
                "/v1/ledger/entries?cursor={}",
                cursor.clone().unwrap_or("x-x".into())
            ),
        )
        .await;
        assert!(
            foreign.status == 400 || foreign.body["data"].as_array().unwrap().is_empty(),
            "{}",
            foreign.body
        );
        assert!(mget(&h, &co, "/v1/ledger/entries").await.body["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["reference"] != p1.as_str()));
        books_balance(&h).await;
    }
);

both!(
    a_kept_fee_the_merchant_cannot_cover_goes_to_suspense_with_an_alert,
    |b| async move {
        let Some(h) = harness(b).await else { return };
        let (_m, c) = h.merchant("Keeps").await;
        let a = fee_plan(
        &h,
        json!({"currency": "CNY", "rate_bps": 60, "fee_refund": "keep", "channel_cost_bps": 25}),
    )
    .await;
        assert_eq!(a.body["fee_refund"], "keep", "{}", a.body);
        let p = pay_ok(&h, &c, 10_000, "keep-1").await;
        assert_eq!(balances(&h, &c).await, (9_940, 0));
        // The merchant bears the whole refund: 100.00 against the 99.40 it was credited. Its
        // balances hold 99.40; the 0.60 it cannot cover goes to suspense, and an operator is told.
        refund_ok(&h, &c, &p, 10_000).await;
        assert_eq!(balances(&h, &c).await, (0, 0));
        let alerts = op(&h, Method::GET, "/v1/operator/alerts", None).await;
        let shortfall: Vec<&Value> = alerts.body["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["kind"] == "merchant_shortfall")
            .collect();
        assert_eq!(shortfall.len(), 1, "{}", alerts.body);
        let suspense = op(
            &h,
            Method::GET,
            "/v1/operator/ledger/accounts?prefix=suspense:",
            None,
        )
        .await;
        assert_eq!(suspense.body["data"][0]["balance"], 60, "{}", suspense.body);
        // Query values are percent-decoded (review finding: an encoded ':' matched nothing).
        let encoded = op(
            &h,
            Method::GET,
            "/v1/operator/ledger/accounts?prefix=suspense%3A",
            None,
        )
        .await;
        assert_eq!(
            encoded.body["data"], suspense.body["data"],
            "{}",
            encoded.body
        );
        let fees = op(
            &h,
            Method::GET,
            "/v1/operator/ledger/accounts?prefix=platform_fee:",
            None,
        )
        .await;
        assert_eq!(
            fees.body["data"][0]["balance"], 60,
            "the fee is kept: {}",
            fees.body
        );
        books_balance(&h).await;
    }
);

both!(
    concurrent_settlement_runs_create_each_batch_once,
    |b| async move {
        let Some(h) = harness(b).await else { return };
        h.clock.set_ms(beijing_ms("2026-03-01 09:00:00"));
        let (_m, c) = h.merchant("Twice").await;
        for i in 0..4 {
            pay_ok(&h, &c, 1_000 + i * 100, &format!("twice-{i}")).await;
        }
        // Default cycle: T+1 at 00:00 UTC+08:00, so the 1st is due at the 3rd, 00:00.
        h.clock.set_ms(beijing_ms("2026-03-03 00:00:00"));
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..6 {
            let engine = h.engine.clone();
            set.spawn(async move { engine.run_settlement(None).await.unwrap() });
        }
        let mut created = 0;
        while let Some(r) = set.join_next().await {
            created += r.unwrap().created.len();
        }
        assert_eq!(created, 1);
        let list = mget(&h, &c, "/v1/settlements").await;
        assert_eq!(list.body["data"].as_array().unwrap().len(), 1);
        assert_eq!(list.body["data"][0]["business_day"], "2026-03-01");
        assert_eq!(list.body["data"][0]["net"], 1_000 + 1_100 + 1_200 + 1_300);
        assert_eq!(balances(&h, &c).await, (0, 4_600));
        books_balance(&h).await;
    }
);

both!(
    a_settlement_run_pages_through_every_merchant,
    |b| async move {
        // Regression (review finding): a run read the first page of merchant-currency groups
        // only, and every active merchant always has unsettled payments of the current day, so
        // the merchants after the first page were never settled. Pages of one group here.
        let config = EngineConfig {
            settle_groups_page: 1,
            ..test_config()
        };
        let Some(h) = harness_with(b, config, false).await else {
            return;
        };
        h.clock.set_ms(beijing_ms("2026-03-01 09:00:00"));
        let mut merchants = Vec::new();
        for i in 0..4 {
            let (_m, c) = h.merchant(&format!("Paged {i}")).await;
            pay_ok(&h, &c, 1_000 + i * 10, &format!("paged-{i}")).await;
            merchants.push(c);
        }
        // Due on the 3rd at 00:00 (T+1); today's payment of the first merchant stays unsettled
        // and keeps its group open on every page.
        h.clock.set_ms(beijing_ms("2026-03-03 00:00:00"));
        pay_ok(&h, &merchants[0], 500, "paged-today").await;
        let report = h.engine.run_settlement(None).await.unwrap();
        assert_eq!(report.created.len(), 4, "{report:?}");
        assert_eq!(report.failed, 0);
        for (i, c) in merchants.iter().enumerate() {
            let pending_today = if i == 0 { 500 } else { 0 };
            assert_eq!(
                balances(&h, c).await,
                (pending_today, 1_000 + i as i64 * 10)
            );
        }
        books_balance(&h).await;
    }
);

/// A wallet payment recorded and frozen (Try), as if the process died before the confirm.
async fn frozen_wallet_payment(
    h: &Harness,
    merchant: &str,
    wallet: &str,
    amount: i64,
) -> payrail_domain::PaymentId {
    use payrail_store::{AttemptRecord, NewJob, NewPayment, PaymentRecord};
    let merchant_id: payrail_domain::MerchantId = merchant.parse().unwrap();
    let app = h
        .engine
        .store
        .list_apps(merchant_id)
        .await
        .unwrap()
        .remove(0);
    let now = h.clock.now_ms();
    let payment = PaymentRecord {
        id: h.engine.ids.next(),
        merchant_id,
        app_id: app.id,
        out_trade_no: format!("frozen-{}", nonce()),
        amount_minor: amount,
        currency: "CNY".into(),
        subject: "frozen".into(),
        method: "wallet".into(),
        channel: "wallet".into(),
        status: payrail_domain::PaymentStatus::Processing,
        version: 1,
        notify_url: None,
        metadata: "{}".into(),
        channel_trade_no: None,
        failure_code: None,
        failure_message: None,
        idempotency_key: None,
        request_hash: None,
        expires_at_ms: now + 3_600_000,
        paid_at_ms: None,
        created_at_ms: now,
        updated_at_ms: now,
        amount_refunded_minor: 0,
        refund_reserved_minor: 0,
    };
    let attempt = AttemptRecord {
        id: h.engine.ids.next(),
        payment_id: payment.id,
        merchant_id,
        channel: "wallet".into(),
        status: payrail_domain::AttemptStatus::Processing,
        version: 1,
        channel_trade_no: None,
        failure_code: None,
        failure_message: None,
        created_at_ms: now,
        updated_at_ms: now,
        channel_account_id: None,
    };
    h.engine
        .store
        .create_payment(&NewPayment {
            payment: payment.clone(),
            attempt: attempt.clone(),
            job: Some(NewJob {
                kind: payrail_engine::JOB_PAYMENT_SYNC.into(),
                subject_id: payment.id.to_string(),
                run_at_ms: now,
            }),
            admission: None,
        })
        .await
        .unwrap();
    let mut req = payrail_channels::SubmitRequest::new(
        attempt.id,
        payrail_domain::Money::new(amount, payrail_domain::Currency::CNY),
        "frozen".to_string(),
        payrail_domain::input::PaymentMethod::Wallet,
        now,
        payment.expires_at_ms,
    );
    req.payer_id = Some(wallet.into());
    let out = h.engine.channels.get("wallet").unwrap().submit(&req).await;
    assert_eq!(out.outcome.label(), "succeeded", "{:?}", out.outcome);
    payment.id
}

async fn run_sync(h: &Harness) {
    let jobs = h
        .engine
        .store
        .lease_jobs(
            payrail_engine::JOB_PAYMENT_SYNC,
            h.clock.now_ms(),
            1_000,
            100,
        )
        .await
        .unwrap();
    for j in jobs {
        h.engine.sync_payment(&j).await.unwrap();
    }
}

both!(
    a_wallet_payment_frozen_before_a_crash_is_confirmed_or_released,
    |b| async move {
        let Some(h) = harness(b).await else { return };
        let (m, c) = h.merchant("Frozen").await;
        default_plan(&h).await;
        let t = op(
            &h,
            Method::POST,
            &format!("/v1/operator/merchants/{m}/wallets/bob/topup"),
            Some(json!({"amount": 5_000, "currency": "CNY"})),
        )
        .await;
        assert_eq!(t.status, 200, "{}", t.body);
        async fn wallet(h: &Harness, m: &str) -> (i64, i64) {
            let w = op(
                h,
                Method::GET,
                &format!("/v1/operator/merchants/{m}/wallets/bob"),
                None,
            )
            .await;
            (
                w.body["accounts"][0]["balance"].as_i64().unwrap(),
                w.body["accounts"][0]["available"].as_i64().unwrap(),
            )
        }
        // Try made, confirm lost: 30.00 frozen, not spent.
        let p1 = frozen_wallet_payment(&h, &m, "bob", 3_000).await;
        assert_eq!(wallet(&h, &m).await, (5_000, 2_000));
        // The status-sync job finds the freeze pending and the engine confirms it.
        run_sync(&h).await;
        let p = h.engine.store.get_payment_any(p1).await.unwrap().unwrap();
        assert_eq!(p.status, payrail_domain::PaymentStatus::Succeeded);
        assert!(entry_exists(&h, &format!("{p1}:wallet_confirm")).await);
        assert_eq!(wallet(&h, &m).await, (2_000, 2_000));
        assert_eq!(balances(&h, &c).await, (3_000 - 18, 0));
        // Another frozen payment whose freeze times out: the sweep releases it, and the job then
        // fails the payment; the wallet gets its money back, the merchant nothing.
        let p2 = frozen_wallet_payment(&h, &m, "bob", 1_500).await;
        assert_eq!(wallet(&h, &m).await, (2_000, 500));
        h.clock
            .advance_ms(payrail_engine::wallet::WALLET_FREEZE_TIMEOUT_MS + 1);
        let released = h
            .engine
            .store
            .expire_holds(h.clock.now_ms(), 100)
            .await
            .unwrap();
        assert_eq!(released.len(), 1);
        run_sync(&h).await;
        let p = h.engine.store.get_payment_any(p2).await.unwrap().unwrap();
        assert_eq!(p.status, payrail_domain::PaymentStatus::Failed);
        assert_eq!(p.failure_code.as_deref(), Some("wallet_hold_released"));
        assert_eq!(wallet(&h, &m).await, (2_000, 2_000));
        assert_eq!(balances(&h, &c).await, (3_000 - 18, 0));
        books_balance(&h).await;
    }
);

both!(
    parallel_partial_refunds_return_exactly_the_whole_fee,
    |b| async move {
        let Some(h) = harness(b).await else { return };
        let (_m, c) = h.merchant("Shares").await;
        default_plan(&h).await;
        // 100.10: fee 60.06 fen → 60, cost 25.025 → 25. Ten refunds of 10.01 race.
        let p = pay_ok(&h, &c, 10_010, "shares-1").await;
        assert_eq!(balances(&h, &c).await, (9_950, 0));
        let mut set = tokio::task::JoinSet::new();
        for i in 0..10 {
            let (client, creds, clock, p) =
                (h.client.clone(), c.clone(), h.clock.clone(), p.clone());
            set.spawn(async move {
                let body =
                    json!({"payment_id": p, "amount": 1_001, "out_refund_no": format!("sh-{i}")})
                        .to_string();
                let auth = payrail_domain::signing::authorization_header(
                    &creds.key_id,
                    creds.secret.as_bytes(),
                    "POST",
                    "/v1/refunds",
                    clock.now_s(),
                    &nonce(),
                    body.as_bytes(),
                );
                client
                    .signed_raw(Method::POST, "/v1/refunds", &body, &auth, Some(&nonce()))
                    .await
                    .unwrap()
            });
        }
        while let Some(a) = set.join_next().await {
            let a = a.unwrap();
            assert_eq!(a.body["status"], "succeeded", "{}", a.body);
        }
        // However the shares were split between the racing refunds, they add up to the fee
        // and the cost exactly: the payment's accounts are all back to zero.
        let rows = h
            .engine
            .store
            .list_refund_clearings(p.parse().unwrap())
            .await
            .unwrap();
        assert_eq!(rows.len(), 10);
        assert_eq!(rows.iter().map(|r| r.fee_refund_minor).sum::<i64>(), 60);
        assert_eq!(rows.iter().map(|r| r.cost_refund_minor).sum::<i64>(), 25);
        assert_eq!(balances(&h, &c).await, (0, 0));
        let fees = op(
            &h,
            Method::GET,
            "/v1/operator/ledger/accounts?prefix=platform_fee:",
            None,
        )
        .await;
        assert_eq!(fees.body["data"][0]["balance"], 0, "{}", fees.body);
        let clearing = op(
            &h,
            Method::GET,
            "/v1/operator/ledger/accounts?prefix=channel_clearing:",
            None,
        )
        .await;
        assert_eq!(clearing.body["data"][0]["balance"], 0, "{}", clearing.body);
        books_balance(&h).await;
    }
);
