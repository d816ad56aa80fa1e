//! Payouts, black box: payment → settlement → payout through the sandbox bank, on SQLite and
//! PostgreSQL. A payout takes its amount from the available balance when it is recorded; the
//! status-sync worker sends it; a failure gives the amount back; unknown answers never fail it;
//! the balance is never overdrawn, also by parallel requests; refusals write nothing; every
//! scenario ends with a trial balance that sums to zero and `check_ledger`.
//!
//! Requests are signed with the server's manual clock (the tests move it by days), like
//! `api/ledger.rs`, whose helpers these tests share.

use super::ledger::{at, balances, beijing_ms, books_balance, default_plan, mget, op, pay_ok};
use super::*;

/// A signed request timed by the server's clock, with the given Idempotency-Key.
async fn signed(
    h: &Harness,
    c: &Credentials,
    method: Method,
    path: &str,
    body: &str,
    key: Option<&str>,
) -> Answer {
    let auth = payrail_domain::signing::authorization_header(
        &c.key_id,
        c.secret.as_bytes(),
        method.as_str(),
        path,
        h.clock.now_s(),
        &nonce(),
        body.as_bytes(),
    );
    h.client
        .signed_raw(method, path, body, &auth, key)
        .await
        .unwrap()
}

fn payout_body(amount: i64, no: &str) -> String {
    json!({"amount": amount, "currency": "CNY", "out_payout_no": no}).to_string()
}

/// `POST /v1/payouts` with a fresh key.
async fn payout(h: &Harness, c: &Credentials, amount: i64, no: &str) -> Answer {
    let key = nonce();
    signed(
        h,
        c,
        Method::POST,
        "/v1/payouts",
        &payout_body(amount, no),
        Some(&key),
    )
    .await
}

/// Settles every payment of 2026-11-22 (Beijing): under the built-in cycle (T+1, 00:00 at
/// +08:00) that day is due at 2026-11-24 00:00.
async fn settle_the_22nd(h: &Harness) {
    h.clock.set_ms(beijing_ms("2026-11-24 00:00:00"));
    let run = op(h, Method::POST, "/v1/operator/settlements/run", None).await;
    assert_eq!(run.status, 200, "{}", run.body);
}

/// Polls the payout until it has `status`, moving the manual clock a second per poll so the
/// job's growing delays come due. Gives up after 15 s of real time.
async fn wait_for(h: &Harness, c: &Credentials, id: &str, status: &str) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let a = mget(h, c, &format!("/v1/payouts/{id}")).await;
        assert_eq!(a.status, 200, "{}", a.body);
        if a.body["status"] == status {
            return a.body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "payout {id} never became {status}: {}",
            a.body
        );
        h.clock.advance_ms(1_000);
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

fn ids(list: &Value) -> Vec<String> {
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect()
}

both!(
    a_settled_balance_is_paid_out_and_a_failed_payout_comes_back,
    |b| async move {
        let Some(h) = harness_with(b, test_config(), true).await else {
            return;
        };
        h.clock.set_ms(beijing_ms("2026-11-22 10:00:00"));
        let (m, c) = h.merchant("Payouts").await;
        let (_other, co) = h.merchant("Bystander").await;
        default_plan(&h).await;
        // 100.00 (fee 0.60) and 50.00 (fee 0.30): 149.10 pending, nothing available yet.
        pay_ok(&h, &c, 10_000, "po-pay-1").await;
        pay_ok(&h, &c, 5_000, "po-pay-2").await;
        assert_eq!(balances(&h, &c).await, (14_910, 0));
        let early = payout(&h, &c, 100, "early").await;
        assert_eq!(
            (early.status, early.error_code()),
            (409, Some("insufficient_available_balance")),
            "pending money cannot be paid out: {}",
            early.body
        );
        assert_eq!(early.body["error"]["param"], "amount");
        settle_the_22nd(&h).await;
        assert_eq!(balances(&h, &c).await, (0, 14_910));

        // 30.00: recorded processing with its amount already out of available; the worker
        // sends it and the sandbox bank pays at once.
        let body = json!({"amount": 3_000, "currency": "CNY", "out_payout_no": "po-1", "description": "十一月货款", "notify_url": "https://shop.example/payouts"}).to_string();
        let a = signed(&h, &c, Method::POST, "/v1/payouts", &body, Some(&nonce())).await;
        assert_eq!(a.status, 200, "{}", a.body);
        let p1 = a.body["id"].as_str().unwrap().to_string();
        assert!(p1.starts_with("po_"), "{p1}");
        assert_eq!(a.body["object"], "payout");
        assert_eq!(a.body["status"], "processing");
        assert_eq!(a.body["merchant_id"], m.as_str());
        assert_eq!(
            (&a.body["amount"], &a.body["currency"]),
            (&json!(3_000), &json!("CNY"))
        );
        assert_eq!(a.body["bank"], "sandbox_bank");
        assert_eq!(a.body["description"], "十一月货款");
        assert!(a.body["paid_at"].is_null() && a.body["failure"].is_null());
        let paid = wait_for(&h, &c, &p1, "paid").await;
        assert_eq!(paid["bank_reference"], format!("sbk_{p1}"));
        assert!(paid["paid_at"].as_i64().is_some());
        assert_eq!(balances(&h, &c).await, (0, 11_910));

        // 20.01: the bank refuses it (account closed): failed, and the 20.01 is available again.
        let a = payout(&h, &c, 2_001, "po-2").await;
        assert_eq!(a.status, 200, "{}", a.body);
        let p2 = a.body["id"].as_str().unwrap().to_string();
        assert_eq!(balances(&h, &c).await.1, 11_910 - 2_001);
        let failed = wait_for(&h, &c, &p2, "failed").await;
        assert_eq!(failed["failure"]["code"], "account_closed", "{failed}");
        assert!(failed["paid_at"].is_null());
        assert_eq!(balances(&h, &c).await, (0, 11_910));
        // One minor unit more than is available: refused, nothing written.
        let over = payout(&h, &c, 11_911, "po-over").await;
        assert_eq!(
            (over.status, over.error_code()),
            (409, Some("insufficient_available_balance"))
        );
        assert_eq!(balances(&h, &c).await, (0, 11_910));
        // 20.05: accepted, then refused at the first query; 20.06: a 503 and two query
        // timeouts (unknown, never failure), then paid.
        let p3 = payout(&h, &c, 2_005, "po-3").await.body["id"]
            .as_str()
            .unwrap()
            .to_string();
        // (Ids sort by creation time to the millisecond: the manual clock moves one.)
        h.clock.advance_ms(1);
        let p4 = payout(&h, &c, 2_006, "po-4").await.body["id"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(balances(&h, &c).await.1, 11_910 - 2_005 - 2_006);
        let f3 = wait_for(&h, &c, &p3, "failed").await;
        assert_eq!(f3["failure"]["code"], "account_name_mismatch");
        wait_for(&h, &c, &p4, "paid").await;
        let available = 11_910 - 2_006;
        assert_eq!(balances(&h, &c).await, (0, available));

        // Reads: by number; pages newest first; a status filter.
        let by_no = mget(&h, &c, "/v1/payouts/out_payout_no/po-1").await;
        assert_eq!(by_no.body["id"], p1.as_str());
        let page1 = mget(&h, &c, "/v1/payouts?limit=3").await;
        assert_eq!(page1.body["has_more"], true, "{}", page1.body);
        let last = ids(&page1.body)[2].clone();
        let page2 = mget(
            &h,
            &c,
            &format!("/v1/payouts?limit=3&starting_after={last}"),
        )
        .await;
        assert_eq!(page2.body["has_more"], false);
        let all: Vec<String> = ids(&page1.body)
            .into_iter()
            .chain(ids(&page2.body))
            .collect();
        assert_eq!(all, vec![p4.clone(), p3.clone(), p2.clone(), p1.clone()]);
        let failed_list = mget(&h, &c, "/v1/payouts?status=failed").await;
        assert_eq!(ids(&failed_list.body), vec![p3.clone(), p2.clone()]);
        let bad = mget(&h, &c, "/v1/payouts?status=done").await;
        assert_eq!(
            (bad.status, bad.error_code()),
            (400, Some("parameter_invalid"))
        );
        assert_eq!(bad.body["error"]["param"], "status");

        // The ledger: the payouts and the reversals on the available balance.
        let postings = mget(&h, &c, "/v1/ledger/entries?limit=100").await;
        let of_type = |t: &str| {
            postings.body["data"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p["type"] == t)
                .count()
        };
        assert_eq!((of_type("payout"), of_type("payout_reversal")), (4, 2));
        let reversal = postings.body["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["entry_id"] == format!("{p2}:payout_reversal"))
            .unwrap();
        assert_eq!(
            (
                &reversal["account"],
                &reversal["direction"],
                &reversal["amount"]
            ),
            (&json!("available"), &json!("credit"), &json!(2_001))
        );

        // The operator: any merchant's payouts by merchant and status, with the ledger entries.
        let listed = op(
            &h,
            Method::GET,
            &format!("/v1/operator/payouts?merchant_id={m}&status=paid"),
            None,
        )
        .await;
        assert_eq!(listed.status, 200, "{}", listed.body);
        assert_eq!(ids(&listed.body), vec![p4.clone(), p1.clone()]);
        assert_eq!(listed.body["data"][0]["version"], 2);
        let view = op(&h, Method::GET, &format!("/v1/operator/payouts/{p2}"), None).await;
        assert_eq!(
            view.body["ledger_entries"],
            json!([format!("{p2}:payout"), format!("{p2}:payout_reversal")])
        );
        let bad = op(
            &h,
            Method::GET,
            "/v1/operator/payouts?merchant_id=nope",
            None,
        )
        .await;
        assert_eq!(bad.error_code(), Some("parameter_invalid"));

        // Events, delivered like every outbox event: payout.paid and payout.failed.
        let events = h
            .engine
            .store
            .list_events(m.parse().unwrap(), 0, 100)
            .await
            .unwrap();
        let types: Vec<&str> = events
            .iter()
            .filter(|e| e.event_type.starts_with("payout."))
            .map(|e| e.event_type.as_str())
            .collect();
        assert_eq!(
            types,
            vec![
                "payout.paid",
                "payout.failed",
                "payout.failed",
                "payout.paid"
            ]
        );
        let first: Value =
            serde_json::from_str(&events.iter().find(|e| e.object_id == p1).unwrap().payload)
                .unwrap();
        assert_eq!(first["type"], "payout.paid");
        assert_eq!(
            first["data"]["object"]["notify_url"],
            "https://shop.example/payouts"
        );
        assert_eq!(first["data"]["object"]["app_id"], paid["app_id"]);

        // Another merchant sees none of it, and has nothing to pay out.
        for path in [
            format!("/v1/payouts/{p1}"),
            "/v1/payouts/out_payout_no/po-1".to_string(),
        ] {
            let a = mget(&h, &co, &path).await;
            assert_eq!(
                (a.status, a.error_code()),
                (404, Some("resource_missing")),
                "{path}"
            );
        }
        assert!(ids(&mget(&h, &co, "/v1/payouts").await.body).is_empty());
        let theirs = payout(&h, &co, 1, "po-1").await;
        assert_eq!(theirs.error_code(), Some("insufficient_available_balance"));
        assert_eq!(balances(&h, &c).await, (0, available));

        // The OpenAPI document describes the routes and the codes.
        let (_, o) = h.client.get("/openapi.json").await.unwrap();
        let o: Value = serde_json::from_str(&o).unwrap();
        for path in [
            "/v1/payouts",
            "/v1/payouts/{id}",
            "/v1/payouts/out_payout_no/{out_payout_no}",
            "/v1/operator/payouts",
            "/v1/operator/payouts/{id}",
        ] {
            assert!(o["paths"][path].is_object(), "{path}");
        }
        let codes = &o["components"]["schemas"]["Error"]["properties"]["error"]["properties"]
            ["code"]["enum"];
        for code in ["insufficient_available_balance", "duplicate_out_payout_no"] {
            assert!(
                codes.as_array().unwrap().contains(&json!(code)),
                "{code} undocumented"
            );
        }
        books_balance(&h).await;
    }
);

both!(
    payout_requests_are_validated_idempotent_and_refusals_write_nothing,
    |b| async move {
        let Some(h) = harness(b).await else { return };
        h.clock.set_ms(beijing_ms("2026-11-22 10:00:00"));
        let (m, c) = h.merchant("Careful").await;
        // No fee plan: 100.00 paid is 100.00 available after settlement.
        pay_ok(&h, &c, 10_000, "careful-1").await;
        settle_the_22nd(&h).await;
        assert_eq!(balances(&h, &c).await, (0, 10_000));
        let jobs = || async {
            h.engine
                .store
                .count_jobs(payrail_engine::JOB_PAYOUT_SEND)
                .await
                .unwrap()
        };

        // Bad requests are 400s that write nothing and leave the key unused.
        let base = json!({"amount": 100, "currency": "CNY", "out_payout_no": "ok-1"});
        let with = |k: &str, v: Value| {
            let mut o = base.clone();
            o[k] = v;
            o.to_string()
        };
        let without = |k: &str| {
            let mut o = base.clone();
            o.as_object_mut().unwrap().remove(k);
            o.to_string()
        };
        let cases: Vec<(String, &str, &str)> = vec![
            (with("amount", json!(0)), "amount_invalid", "amount"),
            (with("amount", json!(-100)), "amount_invalid", "amount"),
            (
                with("amount", json!(1_000_000_000_001i64)),
                "amount_invalid",
                "amount",
            ),
            (with("amount", json!(12.5)), "parameter_invalid", "amount"),
            (with("amount", json!("100")), "parameter_invalid", "amount"),
            (
                with("currency", json!("XYZ")),
                "currency_invalid",
                "currency",
            ),
            (
                with("currency", json!("cny")),
                "currency_invalid",
                "currency",
            ),
            (without("currency"), "parameter_missing", "currency"),
            (
                without("out_payout_no"),
                "parameter_missing",
                "out_payout_no",
            ),
            (
                with("out_payout_no", json!("has space")),
                "parameter_invalid",
                "out_payout_no",
            ),
            (
                with("out_payout_no", json!("x".repeat(65))),
                "parameter_too_long",
                "out_payout_no",
            ),
            (
                with("description", json!("字".repeat(65))),
                "parameter_too_long",
                "description",
            ),
            (
                with("description", json!("a\u{7}b")),
                "parameter_invalid",
                "description",
            ),
            (
                with("notify_url", json!("ftp://x")),
                "parameter_invalid",
                "notify_url",
            ),
            // Where the money goes is the merchant's registered account, never a request field.
            (
                with("destination", json!("6222 0000 0000 0000")),
                "parameter_unknown",
                "destination",
            ),
        ];
        for (body, code, param) in &cases {
            let a = signed(&h, &c, Method::POST, "/v1/payouts", body, Some("same-key")).await;
            assert_eq!(a.status, 400, "{body} -> {}", a.body);
            assert_eq!(a.error_code(), Some(*code), "{body} -> {}", a.body);
            assert_eq!(a.body["error"]["param"], *param, "{body} -> {}", a.body);
        }
        let missing = signed(&h, &c, Method::POST, "/v1/payouts", &base.to_string(), None).await;
        assert_eq!(missing.error_code(), Some("idempotency_key_missing"));
        assert!(ids(&mget(&h, &c, "/v1/payouts").await.body).is_empty());
        assert_eq!(jobs().await, 0);

        // More than is available: 409, nothing written, and the same request replays the 409.
        let over = payout_body(10_001, "over-1");
        let a = signed(&h, &c, Method::POST, "/v1/payouts", &over, Some("k-over")).await;
        assert_eq!(
            (a.status, a.error_code()),
            (409, Some("insufficient_available_balance")),
            "{}",
            a.body
        );
        assert!(a.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("10000"));
        let again = signed(&h, &c, Method::POST, "/v1/payouts", &over, Some("k-over")).await;
        assert!(again.replayed);
        assert_eq!(again.body, a.body);
        assert!(ids(&mget(&h, &c, "/v1/payouts").await.body).is_empty());
        assert_eq!(
            mget(&h, &c, "/v1/payouts/out_payout_no/over-1")
                .await
                .status,
            404
        );
        assert_eq!(jobs().await, 0);
        assert_eq!(balances(&h, &c).await, (0, 10_000));

        // A payout that fits; its replay is the same answer; the key with another body is
        // refused; the number with another key is a duplicate.
        let ok = payout_body(4_000, "ok-1");
        let first = signed(&h, &c, Method::POST, "/v1/payouts", &ok, Some("same-key")).await;
        assert_eq!(first.status, 200, "{}", first.body);
        assert!(!first.replayed);
        let replay = signed(&h, &c, Method::POST, "/v1/payouts", &ok, Some("same-key")).await;
        assert!(replay.replayed);
        assert_eq!(replay.body, first.body);
        let other = signed(
            &h,
            &c,
            Method::POST,
            "/v1/payouts",
            &payout_body(4_001, "ok-1"),
            Some("same-key"),
        )
        .await;
        assert_eq!(other.error_code(), Some("idempotency_key_reused"));
        let dup = payout(&h, &c, 1, "ok-1").await;
        assert_eq!(
            (dup.status, dup.error_code()),
            (409, Some("duplicate_out_payout_no"))
        );
        assert_eq!(ids(&mget(&h, &c, "/v1/payouts").await.body).len(), 1);
        assert_eq!(jobs().await, 1);
        assert_eq!(balances(&h, &c).await, (0, 6_000));

        // A frozen merchant pays out nothing (403, not stored: the key works after the unfreeze).
        let freeze = op(
            &h,
            Method::POST,
            &format!("/v1/operator/merchants/{m}/freeze"),
            None,
        )
        .await;
        assert_eq!(freeze.status, 200, "{}", freeze.body);
        let body = payout_body(1_000, "frozen-1");
        let a = signed(&h, &c, Method::POST, "/v1/payouts", &body, Some("k-frozen")).await;
        assert_eq!((a.status, a.error_code()), (403, Some("merchant_frozen")));
        assert_eq!(balances(&h, &c).await, (0, 6_000));
        op(
            &h,
            Method::POST,
            &format!("/v1/operator/merchants/{m}/unfreeze"),
            None,
        )
        .await;
        let a = signed(&h, &c, Method::POST, "/v1/payouts", &body, Some("k-frozen")).await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(balances(&h, &c).await, (0, 5_000));
        // Without a worker nothing is sent: both stay processing, their amounts out of available.
        let listed = op(
            &h,
            Method::GET,
            "/v1/operator/payouts?status=processing",
            None,
        )
        .await;
        assert_eq!(ids(&listed.body).len(), 2);
        books_balance(&h).await;
    }
);

both!(many_parallel_payouts_never_overdraw, |b| async move {
    let Some(h) = harness_with(b, test_config(), true).await else {
        return;
    };
    h.clock.set_ms(beijing_ms("2026-11-22 10:00:00"));
    let (_m, c) = h.merchant("Racer").await;
    pay_ok(&h, &c, 10_000, "race-pay").await;
    settle_the_22nd(&h).await;
    assert_eq!(balances(&h, &c).await, (0, 10_000));
    // 12 payouts of 30.00 at once against 100.00: exactly 3 fit.
    let mut set = tokio::task::JoinSet::new();
    for i in 0..12 {
        let (client, creds, clock) = (h.client.clone(), c.clone(), h.clock.clone());
        set.spawn(async move {
            let body = payout_body(3_000, &format!("race-{i}"));
            let auth = payrail_domain::signing::authorization_header(
                &creds.key_id,
                creds.secret.as_bytes(),
                "POST",
                "/v1/payouts",
                clock.now_s(),
                &nonce(),
                body.as_bytes(),
            );
            client
                .signed_raw(Method::POST, "/v1/payouts", &body, &auth, Some(&nonce()))
                .await
                .unwrap()
        });
    }
    let (mut created, mut refused) = (Vec::new(), 0);
    while let Some(a) = set.join_next().await {
        let a = a.unwrap();
        match a.status {
            200 => created.push(a.body["id"].as_str().unwrap().to_string()),
            409 => {
                assert_eq!(a.error_code(), Some("insufficient_available_balance"));
                refused += 1;
            }
            s => panic!("unexpected {s}: {}", a.body),
        }
    }
    assert_eq!((created.len(), refused), (3, 9));
    assert_eq!(balances(&h, &c).await, (0, 1_000));
    for id in &created {
        wait_for(&h, &c, id, "paid").await;
    }
    assert_eq!(
        ids(&mget(&h, &c, "/v1/payouts?limit=100").await.body).len(),
        3
    );
    assert_eq!(balances(&h, &c).await, (0, 1_000));
    // The remaining 10.00 is still exactly payable.
    let rest = at(
        &h,
        &c,
        Method::POST,
        "/v1/payouts",
        Some(&payout_body(1_000, "race-rest")),
    )
    .await;
    assert_eq!(rest.status, 200, "{}", rest.body);
    assert_eq!(balances(&h, &c).await, (0, 0));
    books_balance(&h).await;
});

/// A bank whose answer the test sets, recording every call.
struct ScriptedBank {
    answer: std::sync::Mutex<payrail_channels::payout::PayoutOutcome>,
    calls: std::sync::Mutex<Vec<&'static str>>,
}

#[async_trait::async_trait]
impl payrail_channels::payout::PayoutConnector for ScriptedBank {
    fn name(&self) -> &'static str {
        "scripted_bank"
    }
    async fn send(
        &self,
        _: &payrail_channels::payout::PayoutRequest,
    ) -> payrail_channels::payout::PayoutOutcome {
        self.calls.lock().unwrap().push("send");
        self.answer.lock().unwrap().clone()
    }
    async fn query(
        &self,
        _: &payrail_channels::payout::PayoutRequest,
    ) -> payrail_channels::payout::PayoutOutcome {
        self.calls.lock().unwrap().push("query");
        self.answer.lock().unwrap().clone()
    }
}

both!(
    unknown_bank_answers_never_fail_a_payout_and_come_back_later,
    |b| async move {
        use payrail_channels::payout::PayoutOutcome;
        let bank = Arc::new(ScriptedBank {
            answer: std::sync::Mutex::new(PayoutOutcome::unknown("HTTP 504")),
            calls: std::sync::Mutex::new(Vec::new()),
        });
        // Doubling delays of 100, 200, 400 ms, then 400; an alert after 2 s without an answer.
        let config = EngineConfig {
            unresolved_alert_after_ms: 2_000,
            ..test_config()
        };
        let Some(h) = harness_with_bank(b, config, false, None, Some(bank.clone())).await else {
            return;
        };
        h.clock.set_ms(beijing_ms("2026-11-22 10:00:00"));
        let (_m, c) = h.merchant("Patient").await;
        pay_ok(&h, &c, 10_000, "patient-1").await;
        settle_the_22nd(&h).await;
        let a = payout(&h, &c, 4_000, "patient-po").await;
        assert_eq!(a.status, 200, "{}", a.body);
        let id = a.body["id"].as_str().unwrap().to_string();
        assert_eq!(a.body["bank"], "scripted_bank");
        // One run of the payout's job, if it is due now.
        let run_due = || async {
            let jobs = h
                .engine
                .store
                .lease_jobs(
                    payrail_engine::JOB_PAYOUT_SEND,
                    h.clock.now_ms(),
                    30_000,
                    10,
                )
                .await
                .unwrap();
            assert!(jobs.len() <= 1);
            for j in &jobs {
                h.engine.run_payout_job(j).await.unwrap();
            }
            !jobs.is_empty()
        };
        // Eight runs, each due exactly after the doubling delay (capped) and not a millisecond
        // before; every answer unknown: the payout stays processing, its amount out of available.
        assert!(run_due().await, "due at once");
        for delay_ms in [100, 200, 400, 400, 400, 400, 400] {
            h.clock.advance_ms(delay_ms - 1);
            assert!(!run_due().await, "not due before {delay_ms} ms");
            h.clock.advance_ms(1);
            assert!(run_due().await, "due after {delay_ms} ms");
            let p = mget(&h, &c, &format!("/v1/payouts/{id}")).await;
            assert_eq!(p.body["status"], "processing", "{}", p.body);
        }
        assert_eq!(balances(&h, &c).await, (0, 6_000));
        // The first run sends; the next two send again after an unknown query (the same
        // request number: the same transfer); after that the job only queries.
        assert_eq!(
            *bank.calls.lock().unwrap(),
            vec![
                "send", "query", "send", "query", "send", "query", "query", "query", "query",
                "query"
            ]
        );
        // Unresolved for over 2 s: one alert, and the job keeps asking.
        let alerts = op(&h, Method::GET, "/v1/operator/alerts", None).await;
        let unresolved: Vec<&Value> = alerts.body["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["kind"] == "payout_unresolved")
            .collect();
        assert_eq!(unresolved.len(), 1, "{}", alerts.body);
        assert_eq!(unresolved[0]["subject_id"], id.as_str());

        // The bank answers at last: paid.
        *bank.answer.lock().unwrap() = PayoutOutcome::Paid {
            bank_reference: Some("B-1".into()),
            paid_at_ms: None,
        };
        h.clock.advance_ms(400);
        assert!(run_due().await);
        let p = mget(&h, &c, &format!("/v1/payouts/{id}")).await;
        assert_eq!(
            (&p.body["status"], &p.body["bank_reference"]),
            (&json!("paid"), &json!("B-1"))
        );
        h.clock.advance_ms(10_000);
        assert!(!run_due().await, "a final payout has no job");
        // A contradicting later answer changes nothing and raises an alert: no reversal.
        let stored = h.engine.get_payout_any(id.parse().unwrap()).await.unwrap();
        let after = h
            .engine
            .apply_payout_outcome(
                stored,
                &PayoutOutcome::Failed {
                    code: "account_closed".into(),
                    message: "late".into(),
                },
            )
            .await
            .unwrap();
        assert_eq!(after.status, payrail_domain::PayoutStatus::Paid);
        let alerts = op(&h, Method::GET, "/v1/operator/alerts", None).await;
        assert!(alerts.body["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["kind"] == "payout_conflict" && a["subject_id"] == id.as_str()));
        assert_eq!(balances(&h, &c).await, (0, 6_000));
        books_balance(&h).await;
    }
);
