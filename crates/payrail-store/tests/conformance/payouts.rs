//! Conformance checks of [`PayoutStore`]: a payout and its ledger entry commit together or not
//! at all; the available balance's limit holds under concurrent payouts; a refused payout writes
//! nothing; `(merchant, out_payout_no)` names one payout; a failed payout's reversal is posted
//! once, with its status change; reads are scoped by merchant.

use super::*;
use payrail_domain::ledger::{AccountId, Entry, EntryCode, EntryId, Posting};
use payrail_domain::{Currency, Money, PayoutId, PayoutStatus};
use payrail_store::ledger::AccountSpec;

const PAYOUT_SEND: &str = "payout_send";

fn cny(minor: i64) -> Money {
    Money::new(minor, Currency::CNY)
}

/// An active merchant with `available_minor` CNY in its available balance (funded by the
/// operator: D funding, C merchant available).
async fn funded_merchant(store: &DynStore, available_minor: i64) -> MerchantId {
    let m = merchant_at(T0);
    store.insert_merchant(&m).await.unwrap();
    if available_minor > 0 {
        let available = AccountId::merchant_available(m.id, Currency::CNY);
        let funding = AccountId::funding(Currency::CNY);
        store
            .open_accounts(
                &[
                    AccountSpec::default_for(available.clone()),
                    AccountSpec::default_for(funding.clone()),
                ],
                T0,
            )
            .await
            .unwrap();
        let e = Entry::posted(
            EntryId::parse(&format!("fund:{}", m.id)).unwrap(),
            EntryCode::Transfer,
            None,
            vec![
                Posting::debit(funding, cny(available_minor)),
                Posting::credit(available, cny(available_minor)),
            ],
        )
        .unwrap();
        let out = store.post_entries(&[e], T0).await.unwrap();
        assert!(
            matches!(out[0], payrail_domain::ledger::PostOutcome::Posted(_)),
            "{out:?}"
        );
    }
    m.id
}

fn new_payout_at(m: MerchantId, out_payout_no: &str, amount_minor: i64, t: i64) -> NewPayout {
    let id = PayoutId::generate(t as u64, rand10());
    NewPayout {
        payout: PayoutRecord {
            id,
            merchant_id: m,
            app_id: AppId::generate(T0 as u64, rand10()),
            out_payout_no: out_payout_no.to_string(),
            amount_minor,
            currency: "CNY".into(),
            description: Some("货款".into()),
            bank: "sandbox_bank".into(),
            status: PayoutStatus::Processing,
            version: 1,
            bank_reference: None,
            failure_code: None,
            failure_message: None,
            notify_url: Some("https://merchant.example/payouts".into()),
            idempotency_key: None,
            request_hash: None,
            paid_at_ms: None,
            created_at_ms: t,
            updated_at_ms: t,
        },
        job: NewJob {
            kind: PAYOUT_SEND.into(),
            subject_id: id.to_string(),
            run_at_ms: t,
        },
        admission: None,
        idempotency: None,
    }
}

/// `(available, payout clearing)` of a merchant in CNY, 0 for an account not open.
async fn payout_balances(store: &DynStore, m: MerchantId) -> (i128, i128) {
    let mut out = [0i128; 2];
    for (i, id) in [
        AccountId::merchant_available(m, Currency::CNY),
        AccountId::payout_clearing(m, Currency::CNY),
    ]
    .iter()
    .enumerate()
    {
        if let Some(a) = store.get_account(id).await.unwrap() {
            out[i] = a.posted_net().unwrap();
        }
    }
    (out[0], out[1])
}

async fn books_balance(store: &DynStore) {
    let check = store.check_ledger().await.unwrap();
    assert!(check.ok(), "{check:?}");
}

async fn payout_of(store: &DynStore, id: PayoutId) -> PayoutRecord {
    store
        .get_payout(None, id)
        .await
        .unwrap()
        .expect("payout exists")
}

fn payout_done(p: &PayoutRecord, status: PayoutStatus, t: i64) -> PayoutTransition {
    let failed = status == PayoutStatus::Failed;
    PayoutTransition {
        payout_id: p.id,
        payout_version: p.version,
        status,
        bank_reference: Some(format!("bank_{}", p.out_payout_no)),
        failure_code: failed.then(|| "account_closed".to_string()),
        failure_message: failed.then(|| "the account is closed".to_string()),
        paid_at_ms: (status == PayoutStatus::Paid).then_some(t),
        now_ms: t,
        event: Some(NewEvent {
            id: EventId::generate(t as u64, rand10()).to_string(),
            merchant_id: p.merchant_id,
            event_type: format!("payout.{status}"),
            object_id: p.id.to_string(),
            payload: format!(r#"{{"id":"{}"}}"#, p.id),
            created_at_ms: t,
        }),
        job: Some(JobUpdate::Delete {
            kind: PAYOUT_SEND.into(),
            subject_id: p.id.to_string(),
        }),
    }
}

async fn entry_exists(store: &DynStore, id: &str) -> bool {
    store
        .get_entry(&EntryId::parse(id).unwrap())
        .await
        .unwrap()
        .is_some()
}

/// A payout is recorded with its entry and job in one write; reads by id (scoped by merchant),
/// by number, and in keyset pages newest first, per merchant and for operators by status.
pub(crate) async fn check_payout_create_posts_its_entry_and_reads(store: DynStore) {
    let m = funded_merchant(&store, 10_000).await;
    let other = funded_merchant(&store, 500).await;
    let new = new_payout_at(m, "po-1", 3_000, T0 + 10);
    assert_eq!(
        store.create_payout(&new).await.unwrap(),
        CreatePayoutOutcome::Created
    );
    let id = new.payout.id;
    assert_eq!(payout_of(&store, id).await, new.payout);
    assert_eq!(
        store.get_payout(Some(m), id).await.unwrap(),
        Some(new.payout.clone())
    );
    assert_eq!(
        store.get_payout(Some(other), id).await.unwrap(),
        None,
        "another merchant's payout is as if it did not exist"
    );
    assert_eq!(
        store.get_payout_by_out_payout_no(m, "po-1").await.unwrap(),
        Some(new.payout.clone())
    );
    assert_eq!(
        store
            .get_payout_by_out_payout_no(other, "po-1")
            .await
            .unwrap(),
        None
    );
    assert_eq!(payout_balances(&store, m).await, (7_000, 3_000));
    assert!(entry_exists(&store, &format!("{id}:payout")).await);
    assert_eq!(store.count_jobs(PAYOUT_SEND).await.unwrap(), 1);

    // Pages, newest first.
    let mut ids = vec![id];
    for i in 0..4 {
        let n = new_payout_at(m, &format!("po-p{i}"), 100, T0 + 20 + i);
        assert_eq!(
            store.create_payout(&n).await.unwrap(),
            CreatePayoutOutcome::Created
        );
        ids.push(n.payout.id);
    }
    let o = new_payout_at(other, "po-o", 100, T0 + 30);
    assert_eq!(
        store.create_payout(&o).await.unwrap(),
        CreatePayoutOutcome::Created
    );
    ids.reverse();
    let mine = |merchant| PayoutFilter {
        merchant_id: Some(merchant),
        status: None,
    };
    let page1 = store.list_payouts(mine(m), 3, None).await.unwrap();
    let page2 = store
        .list_payouts(mine(m), 3, Some(page1[2].id))
        .await
        .unwrap();
    let listed: Vec<PayoutId> = page1.iter().chain(&page2).map(|p| p.id).collect();
    assert_eq!(listed, ids);
    // Operators: every merchant's, or by status.
    let all = store
        .list_payouts(PayoutFilter::default(), 100, None)
        .await
        .unwrap();
    assert_eq!(all.len(), 6);
    assert_eq!(all[0].id, o.payout.id);
    let first = payout_of(&store, ids[4]).await;
    assert!(store
        .apply_payout_transition(&payout_done(&first, PayoutStatus::Paid, T0 + 40))
        .await
        .unwrap());
    let paid = PayoutFilter {
        merchant_id: None,
        status: Some(PayoutStatus::Paid),
    };
    let listed = store.list_payouts(paid, 100, None).await.unwrap();
    assert_eq!(
        listed.iter().map(|p| p.id).collect::<Vec<_>>(),
        vec![first.id]
    );
    let processing_of_other = PayoutFilter {
        merchant_id: Some(other),
        status: Some(PayoutStatus::Processing),
    };
    assert_eq!(
        store
            .list_payouts(processing_of_other, 100, None)
            .await
            .unwrap()
            .len(),
        1
    );
    books_balance(&store).await;
}

/// The ledger's no-overdraft limit under concurrency: 12 payouts of 30.00 race against 100.00
/// available; exactly 3 are recorded, 10.00 remains, the 9 refused wrote nothing, and the books
/// balance.
pub(crate) async fn check_concurrent_payouts_never_overdraw(store: DynStore) {
    let m = funded_merchant(&store, 10_000).await;
    let barrier = Arc::new(Barrier::new(12));
    let mut tasks = JoinSet::new();
    for i in 0..12 {
        let (store, barrier) = (store.clone(), barrier.clone());
        let new = new_payout_at(m, &format!("race-{i}"), 3_000, T0 + 10 + i);
        tasks.spawn(async move {
            barrier.wait().await;
            (new.payout.id, store.create_payout(&new).await.unwrap())
        });
    }
    let outcomes = tasks.join_all().await;
    let created: Vec<PayoutId> = outcomes
        .iter()
        .filter(|(_, o)| *o == CreatePayoutOutcome::Created)
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(created.len(), 3, "3 x 30.00 <= 100.00 < 4 x 30.00");
    for (id, o) in &outcomes {
        match o {
            CreatePayoutOutcome::Created => {}
            CreatePayoutOutcome::InsufficientBalance { available_minor } => {
                assert_eq!(*available_minor, 1_000);
                assert!(store.get_payout(None, *id).await.unwrap().is_none());
                assert!(!entry_exists(&store, &format!("{id}:payout")).await);
            }
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    assert_eq!(payout_balances(&store, m).await, (1_000, 9_000));
    let listed = store
        .list_payouts(
            PayoutFilter {
                merchant_id: Some(m),
                status: None,
            },
            100,
            None,
        )
        .await
        .unwrap();
    assert_eq!(listed.len(), 3);
    assert_eq!(store.count_jobs(PAYOUT_SEND).await.unwrap(), 3);
    books_balance(&store).await;
}

/// Refusals write nothing: no row, no entry, no job, no account opened — for a merchant with
/// no available balance, one in another currency, one that cannot cover the amount, and a
/// frozen one. The admission made in the same write stands, so the caller can store the
/// refusal under the key.
pub(crate) async fn check_refused_payout_writes_nothing(store: DynStore) {
    let broke = funded_merchant(&store, 0).await;
    let mut none = new_payout_at(broke, "nothing", 1, T0 + 10);
    let scope = broke.to_string();
    none.admission = Some(Admission {
        now_ms: T0,
        nonce: nonce("key_payouts", "nonce-po-1", T0 / 1000),
        idempotency: idem(&scope, "k-po-1", "h-po", T0),
    });
    assert_eq!(
        store.create_payout(&none).await.unwrap(),
        CreatePayoutOutcome::InsufficientBalance { available_minor: 0 }
    );
    let available = AccountId::merchant_available(broke, Currency::CNY);
    let clearing = AccountId::payout_clearing(broke, Currency::CNY);
    for a in [&available, &clearing] {
        assert!(
            store.get_account(a).await.unwrap().is_none(),
            "a refused payout opens no account"
        );
    }
    // The admission stands: the key is in progress, and the refusal can be stored under it.
    assert!(store
        .complete_idempotency(&completion(&scope, "k-po-1", T0, 409, "{}"))
        .await
        .unwrap());

    let m = funded_merchant(&store, 1_000).await;
    let over = new_payout_at(m, "over", 1_001, T0 + 11);
    assert_eq!(
        store.create_payout(&over).await.unwrap(),
        CreatePayoutOutcome::InsufficientBalance {
            available_minor: 1_000
        }
    );
    let mut usd = new_payout_at(m, "usd", 1, T0 + 12);
    usd.payout.currency = "USD".into();
    assert_eq!(
        store.create_payout(&usd).await.unwrap(),
        CreatePayoutOutcome::InsufficientBalance { available_minor: 0 },
        "a CNY balance pays out no USD"
    );
    let frozen = funded_merchant(&store, 1_000).await;
    store
        .set_merchant_status(frozen, MerchantStatus::Frozen, T0 + 1)
        .await
        .unwrap();
    assert_eq!(
        store
            .create_payout(&new_payout_at(frozen, "frozen", 1, T0 + 13))
            .await
            .unwrap(),
        CreatePayoutOutcome::MerchantNotActive
    );
    for (merchant, no) in [
        (broke, "nothing"),
        (m, "over"),
        (m, "usd"),
        (frozen, "frozen"),
    ] {
        assert!(store
            .get_payout_by_out_payout_no(merchant, no)
            .await
            .unwrap()
            .is_none());
    }
    for p in [&none, &over, &usd] {
        assert!(!entry_exists(&store, &format!("{}:payout", p.payout.id)).await);
    }
    assert_eq!(store.count_jobs(PAYOUT_SEND).await.unwrap(), 0);
    assert_eq!(payout_balances(&store, m).await, (1_000, 0));
    assert_eq!(payout_balances(&store, frozen).await, (1_000, 0));
    // Exactly the balance fits.
    assert_eq!(
        store
            .create_payout(&new_payout_at(m, "all", 1_000, T0 + 14))
            .await
            .unwrap(),
        CreatePayoutOutcome::Created
    );
    assert_eq!(payout_balances(&store, m).await, (0, 1_000));
    books_balance(&store).await;
}

/// `(merchant, out_payout_no)` names one payout: the number again gives the original (also when
/// the balance is spent, so a retried payout finds its payout), ten racing writers record one
/// payout and post once, and another merchant may use the number.
pub(crate) async fn check_payout_duplicate_out_payout_no(store: DynStore) {
    let m = funded_merchant(&store, 1_000).await;
    let first = new_payout_at(m, "dup", 1_000, T0 + 10);
    assert_eq!(
        store.create_payout(&first).await.unwrap(),
        CreatePayoutOutcome::Created
    );
    let again = new_payout_at(m, "dup", 7, T0 + 11);
    assert_eq!(
        store.create_payout(&again).await.unwrap(),
        CreatePayoutOutcome::DuplicateOutPayoutNo(Box::new(first.payout.clone()))
    );
    assert!(store
        .get_payout(None, again.payout.id)
        .await
        .unwrap()
        .is_none());
    assert_eq!(payout_balances(&store, m).await, (0, 1_000));

    let other = funded_merchant(&store, 100).await;
    assert_eq!(
        store
            .create_payout(&new_payout_at(other, "dup", 100, T0 + 12))
            .await
            .unwrap(),
        CreatePayoutOutcome::Created
    );

    let racer = funded_merchant(&store, 10_000).await;
    let barrier = Arc::new(Barrier::new(10));
    let mut tasks = JoinSet::new();
    for i in 0..10 {
        let (store, barrier) = (store.clone(), barrier.clone());
        let new = new_payout_at(racer, "dup-c", 100, T0 + 20 + i);
        tasks.spawn(async move {
            barrier.wait().await;
            store.create_payout(&new).await.unwrap()
        });
    }
    let outcomes = tasks.join_all().await;
    let created = outcomes
        .iter()
        .filter(|o| **o == CreatePayoutOutcome::Created)
        .count();
    assert_eq!(created, 1, "{outcomes:?}");
    let winner = store
        .get_payout_by_out_payout_no(racer, "dup-c")
        .await
        .unwrap()
        .unwrap();
    for o in outcomes {
        if let CreatePayoutOutcome::DuplicateOutPayoutNo(p) = o {
            assert_eq!(*p, winner);
        }
    }
    assert_eq!(payout_balances(&store, racer).await, (9_900, 100));
    books_balance(&store).await;
}

/// Status changes: `paid` moves no money; `failed` posts the reversal in the same write, so the
/// available balance is back; a stale or repeated change writes nothing; racing changes have one
/// winner and one reversal.
pub(crate) async fn check_payout_transitions_post_the_reversal_once(store: DynStore) {
    let m = funded_merchant(&store, 10_000).await;
    let a = new_payout_at(m, "t-paid", 2_000, T0 + 10);
    let b = new_payout_at(m, "t-failed", 3_000, T0 + 11);
    for n in [&a, &b] {
        assert_eq!(
            store.create_payout(n).await.unwrap(),
            CreatePayoutOutcome::Created
        );
    }
    assert_eq!(payout_balances(&store, m).await, (5_000, 5_000));

    let pa = payout_of(&store, a.payout.id).await;
    assert!(store
        .apply_payout_transition(&payout_done(&pa, PayoutStatus::Paid, T0 + 20))
        .await
        .unwrap());
    let stored = payout_of(&store, a.payout.id).await;
    assert_eq!(
        (stored.status, stored.version, stored.paid_at_ms),
        (PayoutStatus::Paid, 2, Some(T0 + 20))
    );
    assert_eq!(stored.bank_reference.as_deref(), Some("bank_t-paid"));
    assert_eq!(payout_balances(&store, m).await, (5_000, 5_000));
    // Final: neither a stale nor a fresh change applies.
    assert!(!store
        .apply_payout_transition(&payout_done(&pa, PayoutStatus::Failed, T0 + 21))
        .await
        .unwrap());
    assert!(!store
        .apply_payout_transition(&payout_done(&stored, PayoutStatus::Failed, T0 + 21))
        .await
        .unwrap());
    assert!(!entry_exists(&store, &format!("{}:payout_reversal", pa.id)).await);

    // Eight racing failures of one payout: one wins, one reversal, one event.
    let pb = payout_of(&store, b.payout.id).await;
    let barrier = Arc::new(Barrier::new(8));
    let mut tasks = JoinSet::new();
    for i in 0..8 {
        let (store, barrier) = (store.clone(), barrier.clone());
        let t = payout_done(&pb, PayoutStatus::Failed, T0 + 30 + i);
        tasks.spawn(async move {
            barrier.wait().await;
            store.apply_payout_transition(&t).await.unwrap()
        });
    }
    let won = tasks.join_all().await.into_iter().filter(|w| *w).count();
    assert_eq!(won, 1);
    let failed = payout_of(&store, b.payout.id).await;
    assert_eq!(
        (
            failed.status,
            failed.version,
            failed.failure_code.as_deref()
        ),
        (PayoutStatus::Failed, 2, Some("account_closed"))
    );
    assert!(failed.paid_at_ms.is_none());
    assert!(entry_exists(&store, &format!("{}:payout_reversal", pb.id)).await);
    assert_eq!(
        payout_balances(&store, m).await,
        (8_000, 2_000),
        "the failed payout's 30.00 is back in available"
    );
    assert_eq!(store.count_jobs(PAYOUT_SEND).await.unwrap(), 0);
    let events = store.list_events(m, 0, 100).await.unwrap();
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, vec!["payout.paid", "payout.failed"]);
    books_balance(&store).await;
}

/// The admission is claimed in the payout's write: a reused nonce or a key in progress writes
/// nothing; a created payout saves the request's answer in the same write.
pub(crate) async fn check_payout_create_admits_in_the_same_write(store: DynStore) {
    let m = funded_merchant(&store, 1_000).await;
    let scope = m.to_string();
    let admission = |n: &str, key: &str| Admission {
        now_ms: T0,
        nonce: nonce("key_payouts", n, T0 / 1000),
        idempotency: idem(&scope, key, "h-po", T0),
    };
    let mut first = new_payout_at(m, "adm-1", 100, T0 + 10);
    first.admission = Some(admission("nonce-po-a1", "k-po-a1"));
    first.idempotency = Some(completion(&scope, "k-po-a1", T0, 200, r#"{"id":"po"}"#));
    assert_eq!(
        store.create_payout(&first).await.unwrap(),
        CreatePayoutOutcome::Created
    );
    // The answer was saved with the payout: a retry with the key replays it.
    assert_eq!(
        admit_key(&store, &scope, "k-po-a1", "h-po", T0 + 1).await,
        IdempotencyState::Replay {
            status: 200,
            body: r#"{"id":"po"}"#.into()
        }
    );
    let mut replayed = new_payout_at(m, "adm-2", 100, T0 + 11);
    replayed.admission = Some(admission("nonce-po-a1", "k-po-a2"));
    assert_eq!(
        store.create_payout(&replayed).await.unwrap(),
        CreatePayoutOutcome::NotAdmitted(AdmissionOutcome::NonceReused)
    );
    let mut mismatched = new_payout_at(m, "adm-3", 100, T0 + 12);
    mismatched.admission = Some(Admission {
        now_ms: T0,
        nonce: nonce("key_payouts", "nonce-po-a3", T0 / 1000),
        idempotency: idem(&scope, "k-po-a1", "h-other", T0),
    });
    assert_eq!(
        store.create_payout(&mismatched).await.unwrap(),
        CreatePayoutOutcome::NotAdmitted(AdmissionOutcome::Admitted(Some(
            IdempotencyState::Mismatch
        )))
    );
    for p in [&replayed, &mismatched] {
        assert!(store.get_payout(None, p.payout.id).await.unwrap().is_none());
    }
    assert_eq!(payout_balances(&store, m).await, (900, 100));
    assert_eq!(store.count_jobs(PAYOUT_SEND).await.unwrap(), 1);
    books_balance(&store).await;
}

/// The database itself refuses payout rows whose status and fields disagree (the backstop
/// behind the guarded writes).
pub(crate) async fn check_payout_rows_are_constrained(url: String) {
    let store = open_store(&url).await;
    let m = funded_merchant(&store, 1_000).await;
    let new = new_payout_at(m, "chk", 100, T0 + 10);
    assert_eq!(
        store.create_payout(&new).await.unwrap(),
        CreatePayoutOutcome::Created
    );
    drop(store);
    let id = new.payout.id;
    for (sql, ok) in [
        (
            format!("UPDATE payouts SET status = 'paid' WHERE id = '{id}'"),
            false,
        ),
        (
            format!("UPDATE payouts SET status = 'failed' WHERE id = '{id}'"),
            false,
        ),
        (
            format!("UPDATE payouts SET status = 'done' WHERE id = '{id}'"),
            false,
        ),
        (
            format!("UPDATE payouts SET amount_minor = 0 WHERE id = '{id}'"),
            false,
        ),
        (
            format!("UPDATE payouts SET paid_at_ms = 1 WHERE id = '{id}'"),
            false,
        ),
        (
            format!("UPDATE payouts SET status = 'paid', paid_at_ms = 1 WHERE id = '{id}'"),
            true,
        ),
    ] {
        assert_eq!(raw_try_execute(&url, &sql).await.is_ok(), ok, "{sql}");
    }
}
