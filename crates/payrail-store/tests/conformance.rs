//! One conformance suite for every [`Store`] backend.
//!
//! Each behaviour is a `check_*` function. The `conformance!` macro at the bottom turns every
//! check into one test per backend: `sqlite::check_*` runs on a fresh database file under the
//! system temp directory; `postgres::check_*` runs on a fresh database created on the server named
//! by `PAYRAIL_TEST_POSTGRES_URL` (and dropped afterwards), or prints that it was skipped when the
//! variable is unset.
//!
//! Most checks take an open store; the ones that open, close and reopen take the store's URL.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use payrail_domain::{
    AppId, AttemptId, AttemptStatus, ChannelAccountId, EventId, MerchantId, PaymentId,
    PaymentStatus, RefundId, RefundStatus,
};
use payrail_store::*;
use std::collections::{BTreeSet, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::Barrier;
use tokio::task::JoinSet;

#[path = "conformance/webhooks.rs"]
mod webhooks;
use webhooks::*;
#[path = "conformance/payouts.rs"]
mod payouts;
use payouts::*;

const PG_URL_VAR: &str = "PAYRAIL_TEST_POSTGRES_URL";
/// A fixed "now" for fixtures; ids are generated from times after it.
const T0: i64 = 1_750_000_000_000;
const SYNC: &str = "payment_sync";

// --- randomness without extra dependencies --------------------------------------------------

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

fn rand10() -> [u8; 10] {
    let (a, b) = (rand_u64().to_le_bytes(), rand_u64().to_le_bytes());
    [a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], b[0], b[1]]
}

// --- fixtures -------------------------------------------------------------------------------

fn merchant_at(t: i64) -> MerchantRecord {
    MerchantRecord {
        id: MerchantId::generate(t as u64, rand10()),
        name: format!("merchant {t}"),
        status: MerchantStatus::Active,
        version: 1,
        created_at_ms: t,
        updated_at_ms: t,
    }
}

fn app_for(merchant_id: MerchantId, key_id: &str) -> AppRecord {
    AppRecord {
        id: AppId::generate(T0 as u64, rand10()),
        merchant_id,
        name: format!("app {key_id}"),
        key_id: key_id.to_string(),
        secret_ciphertext: format!("ciphertext-of-{key_id}"),
        created_at_ms: T0,
    }
}

/// A payment created at `t` (its id sorts by `t`), with its first attempt and a sync job.
fn new_payment_at(merchant_id: MerchantId, out_trade_no: &str, t: i64) -> NewPayment {
    let id = PaymentId::generate(t as u64, rand10());
    NewPayment {
        payment: PaymentRecord {
            id,
            merchant_id,
            app_id: AppId::generate(T0 as u64, rand10()),
            out_trade_no: out_trade_no.to_string(),
            amount_minor: 1999,
            currency: "USD".into(),
            subject: "a book".into(),
            method: "card".into(),
            channel: "sandbox".into(),
            status: PaymentStatus::Created,
            version: 1,
            notify_url: Some("https://merchant.example/notify".into()),
            metadata: r#"{"order":"42"}"#.into(),
            channel_trade_no: None,
            failure_code: None,
            failure_message: None,
            idempotency_key: Some(format!("idem-{out_trade_no}")),
            request_hash: Some("hash".into()),
            expires_at_ms: t + 900_000,
            paid_at_ms: None,
            created_at_ms: t,
            updated_at_ms: t,
            amount_refunded_minor: 0,
            refund_reserved_minor: 0,
        },
        attempt: AttemptRecord {
            id: AttemptId::generate(t as u64, rand10()),
            payment_id: id,
            merchant_id,
            channel: "sandbox".into(),
            status: AttemptStatus::Pending,
            version: 1,
            channel_trade_no: None,
            failure_code: None,
            failure_message: None,
            created_at_ms: t,
            updated_at_ms: t,
            channel_account_id: None,
        },
        job: Some(NewJob {
            kind: SYNC.into(),
            subject_id: id.to_string(),
            run_at_ms: t + 5_000,
        }),
        admission: None,
    }
}

fn new_payment(merchant_id: MerchantId, out_trade_no: &str) -> NewPayment {
    new_payment_at(merchant_id, out_trade_no, T0)
}

/// Creates a payment, first registering its merchant (active) if the store does not know it:
/// payments are only created for active merchants.
async fn create(store: &DynStore, new: &NewPayment) {
    let m = new.payment.merchant_id;
    if store.get_merchant(m).await.unwrap().is_none() {
        let mut record = merchant_at(T0);
        record.id = m;
        store.insert_merchant(&record).await.unwrap();
    }
    assert_eq!(
        store.create_payment(new).await.unwrap(),
        CreatePaymentOutcome::Created
    );
}

fn event_for(p: &PaymentRecord, event_type: &str, t: i64) -> NewEvent {
    NewEvent {
        id: EventId::generate(t as u64, rand10()).to_string(),
        merchant_id: p.merchant_id,
        event_type: event_type.into(),
        object_id: p.id.to_string(),
        payload: format!(r#"{{"id":"{}"}}"#, p.id),
        created_at_ms: t,
    }
}

/// Payment -> succeeded, attempt -> succeeded, with an event, deleting the sync job.
fn succeed(p: &PaymentRecord, a: &AttemptRecord, t: i64) -> Transition {
    Transition {
        payment_id: p.id,
        payment_version: p.version,
        payment_status: PaymentStatus::Succeeded,
        attempt_id: a.id,
        attempt_version: a.version,
        attempt_status: AttemptStatus::Succeeded,
        channel_trade_no: Some(format!("ch_{}", p.out_trade_no)),
        failure_code: None,
        failure_message: None,
        paid_at_ms: Some(t),
        now_ms: t,
        event: Some(event_for(p, "payment.succeeded", t)),
        job: Some(JobUpdate::Delete {
            kind: SYNC.into(),
            subject_id: p.id.to_string(),
        }),
        idempotency: None,
        ledger: None,
    }
}

async fn payment(store: &DynStore, id: PaymentId) -> PaymentRecord {
    store
        .get_payment_any(id)
        .await
        .unwrap()
        .expect("payment exists")
}

async fn attempts(store: &DynStore, id: PaymentId) -> Vec<AttemptRecord> {
    store.get_attempts(id).await.unwrap()
}

fn nonce(key_id: &str, nonce: &str, timestamp_s: i64) -> Option<NonceClaim> {
    Some(NonceClaim {
        key_id: key_id.into(),
        nonce: nonce.into(),
        timestamp_s,
    })
}

fn idem(scope: &str, key: &str, hash: &str, now_ms: i64) -> Option<IdempotencyClaim> {
    Some(IdempotencyClaim {
        scope: scope.into(),
        key: key.into(),
        request_hash: hash.into(),
        now_ms,
        stale_after_ms: 60_000,
        token: token(key, now_ms),
    })
}

/// The claim token `idem` gives a claim of `key` made at `now_ms`.
fn token(key: &str, now_ms: i64) -> String {
    format!("tok-{key}-{now_ms}")
}

fn completion(
    scope: &str,
    key: &str,
    claimed_at_ms: i64,
    status: u16,
    body: &str,
) -> IdempotencyCompletion {
    IdempotencyCompletion {
        scope: scope.into(),
        key: key.into(),
        token: token(key, claimed_at_ms),
        status,
        body: body.into(),
    }
}

async fn admit_key(
    store: &DynStore,
    scope: &str,
    key: &str,
    hash: &str,
    now_ms: i64,
) -> IdempotencyState {
    let req = Admission {
        now_ms,
        nonce: None,
        idempotency: idem(scope, key, hash, now_ms),
    };
    match store.admit(&req).await.unwrap() {
        AdmissionOutcome::Admitted(Some(state)) => state,
        other => panic!("expected an idempotency state, got {other:?}"),
    }
}

/// Claims nonce `n` of a request signed at `T0` (seconds), at `now_ms`.
async fn admit_nonce(store: &DynStore, key_id: &str, n: &str, now_ms: i64) -> AdmissionOutcome {
    let req = Admission {
        now_ms,
        nonce: nonce(key_id, n, T0 / 1000),
        idempotency: None,
    };
    store.admit(&req).await.unwrap()
}

async fn schedule(store: &DynStore, kind: &str, subject_id: &str, run_at_ms: i64) {
    let update = JobUpdate::Schedule {
        kind: kind.into(),
        subject_id: subject_id.into(),
        run_at_ms,
        last_error: None,
    };
    store.update_job(&update).await.unwrap();
}

fn subjects(jobs: &[JobRecord]) -> BTreeSet<String> {
    jobs.iter().map(|j| j.subject_id.clone()).collect()
}

// --- checks: settings, merchants, apps ------------------------------------------------------

async fn check_settings_keep_first_value(store: DynStore) {
    assert_eq!(store.get_setting("master_key_check").await.unwrap(), None);
    assert_eq!(
        store
            .put_setting_if_absent("master_key_check", "first")
            .await
            .unwrap(),
        "first"
    );
    assert_eq!(
        store
            .put_setting_if_absent("master_key_check", "second")
            .await
            .unwrap(),
        "first"
    );
    assert_eq!(
        store
            .get_setting("master_key_check")
            .await
            .unwrap()
            .as_deref(),
        Some("first")
    );
    assert_eq!(
        store.put_setting_if_absent("other", "x").await.unwrap(),
        "x"
    );
    assert_eq!(
        store.get_setting("other").await.unwrap().as_deref(),
        Some("x")
    );
}

async fn check_merchants_paginate_newest_first(store: DynStore) {
    let ms: Vec<MerchantRecord> = (0..5).map(|i| merchant_at(T0 + i * 1000)).collect();
    // Insert out of order: the order must come from the ids, not from insertion.
    for i in [2, 0, 4, 1, 3] {
        store.insert_merchant(&ms[i]).await.unwrap();
    }
    assert_eq!(
        store.get_merchant(ms[3].id).await.unwrap().as_ref(),
        Some(&ms[3])
    );
    assert_eq!(store.get_merchant(merchant_at(T0).id).await.unwrap(), None);
    assert!(
        store.insert_merchant(&ms[0]).await.is_err(),
        "duplicate merchant id accepted"
    );

    let ids = |page: Vec<MerchantRecord>| page.into_iter().map(|m| m.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.list_merchants(2, None).await.unwrap()),
        vec![ms[4].id, ms[3].id]
    );
    assert_eq!(
        ids(store.list_merchants(2, Some(ms[3].id)).await.unwrap()),
        vec![ms[2].id, ms[1].id]
    );
    assert_eq!(
        ids(store.list_merchants(2, Some(ms[1].id)).await.unwrap()),
        vec![ms[0].id]
    );
    assert!(store
        .list_merchants(2, Some(ms[0].id))
        .await
        .unwrap()
        .is_empty());
    // Has-more: asking for one more than the page size tells whether another page exists.
    assert_eq!(
        store.list_merchants(3, Some(ms[3].id)).await.unwrap().len(),
        3
    );
    assert_eq!(
        store.list_merchants(3, Some(ms[2].id)).await.unwrap().len(),
        2
    );
    assert_eq!(
        store.list_merchants(100, None).await.unwrap(),
        ms.iter().rev().cloned().collect::<Vec<_>>()
    );
}

async fn check_merchant_status_bumps_version(store: DynStore) {
    let m = merchant_at(T0);
    store.insert_merchant(&m).await.unwrap();
    let frozen = store
        .set_merchant_status(m.id, MerchantStatus::Frozen, T0 + 10)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (frozen.status, frozen.version, frozen.updated_at_ms),
        (MerchantStatus::Frozen, 2, T0 + 10)
    );
    // Same status again: nothing changes.
    let again = store
        .set_merchant_status(m.id, MerchantStatus::Frozen, T0 + 20)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again, frozen);
    let active = store
        .set_merchant_status(m.id, MerchantStatus::Active, T0 + 30)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (active.status, active.version, active.updated_at_ms),
        (MerchantStatus::Active, 3, T0 + 30)
    );
    assert_eq!(store.get_merchant(m.id).await.unwrap(), Some(active));
    let missing = merchant_at(T0).id;
    assert_eq!(
        store
            .set_merchant_status(missing, MerchantStatus::Frozen, T0)
            .await
            .unwrap(),
        None
    );
}

async fn check_apps_by_key_id_unique(store: DynStore) {
    let (m1, m2) = (merchant_at(T0), merchant_at(T0 + 1));
    store.insert_merchant(&m1).await.unwrap();
    store.insert_merchant(&m2).await.unwrap();
    let a1 = app_for(m1.id, "key_one");
    let a2 = app_for(m1.id, "key_two");
    let b1 = app_for(m2.id, "key_three");
    for a in [&a1, &a2, &b1] {
        store.insert_app(a).await.unwrap();
    }
    assert_eq!(
        store.get_app_by_key_id("key_one").await.unwrap().as_ref(),
        Some(&a1)
    );
    assert_eq!(store.get_app_by_key_id("key_nope").await.unwrap(), None);

    let clash = app_for(m2.id, "key_one");
    assert!(
        store.insert_app(&clash).await.is_err(),
        "duplicate key_id accepted"
    );
    assert_eq!(
        store.get_app_by_key_id("key_one").await.unwrap().as_ref(),
        Some(&a1)
    );
    let orphan = app_for(merchant_at(T0).id, "key_orphan");
    assert!(
        store.insert_app(&orphan).await.is_err(),
        "app of an unknown merchant accepted"
    );

    let mut expected = vec![a1.clone(), a2.clone()];
    expected.sort_by_key(|a| a.id);
    assert_eq!(store.list_apps(m1.id).await.unwrap(), expected);
    assert_eq!(store.list_apps(m2.id).await.unwrap(), vec![b1]);
}

// --- checks: payments -----------------------------------------------------------------------

async fn check_create_payment_and_duplicates(store: DynStore) {
    let (ma, mb) = (merchant_at(T0).id, merchant_at(T0).id);
    let first = new_payment(ma, "order-1");
    create(&store, &first).await;
    assert_eq!(
        store
            .get_payment(ma, first.payment.id)
            .await
            .unwrap()
            .as_ref(),
        Some(&first.payment)
    );
    assert_eq!(
        attempts(&store, first.payment.id).await,
        vec![first.attempt.clone()]
    );
    assert_eq!(store.count_jobs(SYNC).await.unwrap(), 1);

    // Same (merchant, out_trade_no): the original comes back and nothing is written.
    let mut dup = new_payment(ma, "order-1");
    dup.payment.amount_minor = 5;
    match store.create_payment(&dup).await.unwrap() {
        CreatePaymentOutcome::DuplicateOutTradeNo(existing) => assert_eq!(*existing, first.payment),
        other => panic!("expected a duplicate, got {other:?}"),
    }
    assert_eq!(store.get_payment_any(dup.payment.id).await.unwrap(), None);
    assert!(attempts(&store, dup.payment.id).await.is_empty());
    assert_eq!(attempts(&store, first.payment.id).await.len(), 1);
    assert_eq!(store.count_jobs(SYNC).await.unwrap(), 1);
    assert_eq!(
        store.count_payments_by_status(ma).await.unwrap(),
        vec![("created".to_string(), 1)]
    );

    // Another merchant may use the same out_trade_no.
    let other = new_payment(mb, "order-1");
    create(&store, &other).await;
    assert_eq!(
        store
            .get_payment_by_out_trade_no(mb, "order-1")
            .await
            .unwrap()
            .as_ref(),
        Some(&other.payment)
    );
    assert_eq!(store.count_jobs(SYNC).await.unwrap(), 2);

    // A payment without a job writes none.
    let mut jobless = new_payment(ma, "order-2");
    jobless.job = None;
    create(&store, &jobless).await;
    assert_eq!(store.count_jobs(SYNC).await.unwrap(), 2);
}

async fn check_no_payment_for_a_frozen_merchant(store: DynStore) {
    let m = merchant_at(T0);
    store.insert_merchant(&m).await.unwrap();
    store
        .set_merchant_status(m.id, MerchantStatus::Frozen, T0 + 1)
        .await
        .unwrap();
    let new = new_payment(m.id, "frozen-1");
    assert_eq!(
        store.create_payment(&new).await.unwrap(),
        CreatePaymentOutcome::MerchantNotActive
    );
    assert!(
        store
            .get_payment_any(new.payment.id)
            .await
            .unwrap()
            .is_none(),
        "nothing written"
    );
    assert!(store.get_attempts(new.payment.id).await.unwrap().is_empty());
    // Unknown merchants get the same answer.
    let stranger = new_payment(merchant_at(T0 + 2).id, "frozen-2");
    assert_eq!(
        store.create_payment(&stranger).await.unwrap(),
        CreatePaymentOutcome::MerchantNotActive
    );
    store
        .set_merchant_status(m.id, MerchantStatus::Active, T0 + 3)
        .await
        .unwrap();
    create(&store, &new).await;
}

async fn check_payment_reads_scoped_by_merchant(store: DynStore) {
    let (ma, mb) = (merchant_at(T0).id, merchant_at(T0).id);
    let ps: Vec<NewPayment> = (0..5)
        .map(|i| new_payment_at(ma, &format!("o{i}"), T0 + i * 1000))
        .collect();
    for i in [3, 1, 4, 0, 2] {
        create(&store, &ps[i]).await;
    }
    let theirs = new_payment_at(mb, "b-1", T0 + 10_000);
    create(&store, &theirs).await;

    let p0 = &ps[0].payment;
    assert_eq!(
        store.get_payment(ma, p0.id).await.unwrap().as_ref(),
        Some(p0)
    );
    assert_eq!(
        store.get_payment(mb, p0.id).await.unwrap(),
        None,
        "merchant B read A's payment"
    );
    assert_eq!(
        store.get_payment_any(p0.id).await.unwrap().as_ref(),
        Some(p0)
    );
    assert_eq!(
        store
            .get_payment_any(PaymentId::generate(T0 as u64, rand10()))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .get_payment_by_out_trade_no(ma, "o0")
            .await
            .unwrap()
            .as_ref(),
        Some(p0)
    );
    assert_eq!(
        store.get_payment_by_out_trade_no(mb, "o0").await.unwrap(),
        None
    );
    assert_eq!(
        store.get_payment_by_out_trade_no(ma, "nope").await.unwrap(),
        None
    );

    let ids = |page: Vec<PaymentRecord>| page.into_iter().map(|p| p.id).collect::<Vec<_>>();
    let id = |i: usize| ps[i].payment.id;
    assert_eq!(
        ids(store.list_payments(ma, 2, None).await.unwrap()),
        vec![id(4), id(3)]
    );
    assert_eq!(
        ids(store.list_payments(ma, 2, Some(id(3))).await.unwrap()),
        vec![id(2), id(1)]
    );
    assert_eq!(
        ids(store.list_payments(ma, 2, Some(id(1))).await.unwrap()),
        vec![id(0)]
    );
    assert!(store
        .list_payments(ma, 2, Some(id(0)))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        ids(store.list_payments(mb, 10, None).await.unwrap()),
        vec![theirs.payment.id]
    );
    assert_eq!(
        store.list_payments(ma, 10, None).await.unwrap()[4],
        ps[0].payment
    );
    assert_eq!(
        store.count_payments_by_status(ma).await.unwrap(),
        vec![("created".to_string(), 5)]
    );
}

// --- checks: transitions --------------------------------------------------------------------

async fn check_transition_applies_everything(store: DynStore) {
    let m = merchant_at(T0).id;
    let new = new_payment(m, "t-1");
    create(&store, &new).await;
    let (p, a) = (new.payment.clone(), new.attempt.clone());

    // created -> processing, keeping the job (moved) and writing an event.
    let mut to_processing = succeed(&p, &a, T0 + 100);
    to_processing.payment_status = PaymentStatus::Processing;
    to_processing.attempt_status = AttemptStatus::Processing;
    to_processing.paid_at_ms = None;
    to_processing.event = Some(event_for(&p, "payment.processing", T0 + 100));
    to_processing.job = Some(JobUpdate::Schedule {
        kind: SYNC.into(),
        subject_id: p.id.to_string(),
        run_at_ms: T0 + 60_000,
        last_error: Some("not yet".into()),
    });
    assert!(store.apply_transition(&to_processing).await.unwrap());
    let p2 = payment(&store, p.id).await;
    assert_eq!(
        (p2.status, p2.version, p2.updated_at_ms),
        (PaymentStatus::Processing, 2, T0 + 100)
    );
    assert_eq!(p2.channel_trade_no.as_deref(), Some("ch_t-1"));
    assert_eq!(p2.paid_at_ms, None);
    let a2 = attempts(&store, p.id).await.remove(0);
    assert_eq!(
        (a2.status, a2.version, a2.updated_at_ms),
        (AttemptStatus::Processing, 2, T0 + 100)
    );
    assert_eq!(a2.channel_trade_no.as_deref(), Some("ch_t-1"));
    assert_eq!(store.count_jobs(SYNC).await.unwrap(), 1);
    assert!(
        store
            .lease_jobs(SYNC, T0 + 59_999, 1000, 10)
            .await
            .unwrap()
            .is_empty(),
        "job not moved"
    );

    // processing -> succeeded: channel_trade_no kept when not given, job deleted.
    let mut to_succeeded = succeed(&p2, &a2, T0 + 200);
    to_succeeded.channel_trade_no = None;
    assert!(store.apply_transition(&to_succeeded).await.unwrap());
    let p3 = payment(&store, p.id).await;
    assert_eq!(
        (p3.status, p3.version, p3.paid_at_ms),
        (PaymentStatus::Succeeded, 3, Some(T0 + 200))
    );
    assert_eq!(p3.channel_trade_no.as_deref(), Some("ch_t-1"));
    let a3 = attempts(&store, p.id).await.remove(0);
    assert_eq!((a3.status, a3.version), (AttemptStatus::Succeeded, 3));
    assert_eq!(store.count_jobs(SYNC).await.unwrap(), 0);
    assert_eq!(
        store.count_payments_by_status(m).await.unwrap(),
        vec![("succeeded".to_string(), 1)]
    );

    // Both events, in order, only for this merchant.
    let events = store.list_events(m, 0, 10).await.unwrap();
    assert_eq!(events.len(), 2);
    let (e1, e2) = (&events[0], &events[1]);
    let sent = to_processing.event.as_ref().unwrap();
    assert_eq!(
        (
            &e1.id,
            e1.merchant_id,
            &e1.event_type,
            &e1.object_id,
            &e1.payload,
            e1.created_at_ms
        ),
        (
            &sent.id,
            m,
            &sent.event_type,
            &sent.object_id,
            &sent.payload,
            sent.created_at_ms
        )
    );
    assert_eq!(e2.event_type, "payment.succeeded");
    assert!(e1.seq > 0 && e2.seq > e1.seq);
    assert_eq!(
        store.list_events(m, e1.seq, 10).await.unwrap(),
        vec![e2.clone()]
    );
    assert_eq!(store.list_events(m, 0, 1).await.unwrap(), vec![e1.clone()]);
    assert!(store.list_events(m, e2.seq, 10).await.unwrap().is_empty());
    assert!(store
        .list_events(merchant_at(T0).id, 0, 10)
        .await
        .unwrap()
        .is_empty());
}

async fn check_stale_transition_writes_nothing(store: DynStore) {
    let m = merchant_at(T0).id;
    let new = new_payment(m, "s-1");
    create(&store, &new).await;
    let (p, a) = (new.payment.clone(), new.attempt.clone());
    let snapshot = |store: DynStore| async move {
        (
            payment(&store, p.id).await,
            attempts(&store, p.id).await,
            store.list_events(m, 0, 100).await.unwrap(),
            store.count_jobs(SYNC).await.unwrap(),
        )
    };
    let before = snapshot(store.clone()).await;

    let mut stale_payment = succeed(&p, &a, T0 + 1);
    stale_payment.payment_version = p.version + 1;
    assert!(!store.apply_transition(&stale_payment).await.unwrap());
    assert_eq!(snapshot(store.clone()).await, before);

    // The payment matches but the attempt does not: its payment update must be undone too.
    let mut stale_attempt = succeed(&p, &a, T0 + 2);
    stale_attempt.attempt_version = a.version + 7;
    assert!(!store.apply_transition(&stale_attempt).await.unwrap());
    assert_eq!(snapshot(store.clone()).await, before);

    // Unknown payment or attempt.
    let mut unknown = succeed(&p, &a, T0 + 3);
    unknown.attempt_id = AttemptId::generate(T0 as u64, rand10());
    assert!(!store.apply_transition(&unknown).await.unwrap());
    assert_eq!(snapshot(store.clone()).await, before);

    // And the right versions still work afterwards.
    assert!(store
        .apply_transition(&succeed(&p, &a, T0 + 4))
        .await
        .unwrap());
    let after = snapshot(store.clone()).await;
    assert_eq!(
        (after.0.version, after.1[0].version, after.2.len(), after.3),
        (2, 2, 1, 0)
    );
}

async fn check_transition_saves_idempotent_response_atomically(store: DynStore) {
    let m = merchant_at(T0).id;
    let new = new_payment(m, "i-1");
    create(&store, &new).await;
    let (p, a) = (new.payment.clone(), new.attempt.clone());
    let scope = m.to_string();
    assert_eq!(
        admit_key(&store, &scope, "k-1", "h", T0).await,
        IdempotencyState::New
    );
    let done = completion(&scope, "k-1", T0, 200, "{\"id\":1}");
    // A stale transition saves nothing, the response included.
    let mut stale = succeed(&p, &a, T0 + 1);
    stale.payment_version = p.version + 1;
    stale.idempotency = Some(done.clone());
    assert!(!store.apply_transition(&stale).await.unwrap());
    assert_eq!(
        admit_key(&store, &scope, "k-1", "h", T0 + 2).await,
        IdempotencyState::InProgress
    );
    // The winning transition saves it with the status change.
    let mut t = succeed(&p, &a, T0 + 3);
    t.idempotency = Some(done);
    assert!(store.apply_transition(&t).await.unwrap());
    assert_eq!(
        admit_key(&store, &scope, "k-1", "h", T0 + 4).await,
        IdempotencyState::Replay {
            status: 200,
            body: "{\"id\":1}".into()
        }
    );
}

async fn check_concurrent_transitions_one_winner(store: DynStore) {
    let m = merchant_at(T0).id;
    let new = new_payment(m, "race-1");
    create(&store, &new).await;
    let barrier = Arc::new(Barrier::new(20));
    let mut tasks = JoinSet::new();
    for i in 0..20 {
        let (store, barrier) = (store.clone(), barrier.clone());
        let t = succeed(&new.payment, &new.attempt, T0 + i);
        tasks.spawn(async move {
            barrier.wait().await;
            store.apply_transition(&t).await.unwrap()
        });
    }
    let wins = tasks.join_all().await.into_iter().filter(|w| *w).count();
    assert_eq!(wins, 1, "optimistic lock let {wins} writers win");
    assert_eq!(payment(&store, new.payment.id).await.version, 2);
    assert_eq!(attempts(&store, new.payment.id).await[0].version, 2);
    assert_eq!(store.list_events(m, 0, 100).await.unwrap().len(), 1);
}

/// At most one succeeded attempt per payment is enforced by the database itself. The trait
/// only creates first attempts, so the second attempt of payment 1 is smuggled in as the
/// attempt of another payment.
async fn check_one_succeeded_attempt_per_payment(store: DynStore) {
    let m = merchant_at(T0).id;
    let one = new_payment(m, "u-1");
    create(&store, &one).await;
    let mut two = new_payment(m, "u-2");
    two.attempt.payment_id = one.payment.id;
    create(&store, &two).await;
    assert_eq!(attempts(&store, one.payment.id).await.len(), 2);

    assert!(store
        .apply_transition(&succeed(&one.payment, &one.attempt, T0 + 1))
        .await
        .unwrap());
    let before_two = payment(&store, two.payment.id).await;
    let events_before = store.list_events(m, 0, 100).await.unwrap();
    let jobs_before = store.count_jobs(SYNC).await.unwrap();

    let second = succeed(&two.payment, &two.attempt, T0 + 2);
    assert!(
        store.apply_transition(&second).await.is_err(),
        "two succeeded attempts for one payment"
    );
    // The failed transaction left nothing behind: not even its (earlier) payment update.
    assert_eq!(payment(&store, two.payment.id).await, before_two);
    let atts = attempts(&store, one.payment.id).await;
    let smuggled = atts.iter().find(|a| a.id == two.attempt.id).unwrap();
    assert_eq!(
        (smuggled.status, smuggled.version),
        (AttemptStatus::Pending, 1)
    );
    assert_eq!(store.list_events(m, 0, 100).await.unwrap(), events_before);
    assert_eq!(store.count_jobs(SYNC).await.unwrap(), jobs_before);

    // Only `succeeded` is constrained.
    let mut fail = succeed(&two.payment, &two.attempt, T0 + 3);
    fail.payment_status = PaymentStatus::Failed;
    fail.attempt_status = AttemptStatus::Failed;
    fail.paid_at_ms = None;
    fail.failure_code = Some("declined".into());
    assert!(store.apply_transition(&fail).await.unwrap());
    assert_eq!(
        payment(&store, two.payment.id)
            .await
            .failure_code
            .as_deref(),
        Some("declined")
    );
}

/// Readers page through the outbox by `seq`; an event committed after a later-numbered one
/// would be skipped for good. Polls while several writers commit events.
async fn check_outbox_readers_never_skip_events(store: DynStore) {
    let m = merchant_at(T0).id;
    let mut ps = Vec::new();
    for i in 0..60 {
        let new = new_payment_at(m, &format!("ob-{i}"), T0 + i);
        create(&store, &new).await;
        ps.push(new);
    }
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (store, done) = (store.clone(), done.clone());
        tokio::spawn(async move {
            let (mut cursor, mut seen) = (0i64, Vec::new());
            loop {
                let finished = done.load(Ordering::SeqCst);
                loop {
                    let page = store.list_events(m, cursor, 1000).await.unwrap();
                    let Some(last) = page.last() else { break };
                    cursor = last.seq;
                    seen.extend(page.into_iter().map(|e| e.id));
                }
                if finished {
                    return seen;
                }
                tokio::task::yield_now().await;
            }
        })
    };
    let mut writers = JoinSet::new();
    let mut expected = HashSet::new();
    for chunk in ps.chunks(10) {
        let transitions: Vec<Transition> = chunk
            .iter()
            .map(|n| succeed(&n.payment, &n.attempt, T0 + 1))
            .collect();
        expected.extend(
            transitions
                .iter()
                .filter_map(|t| t.event.as_ref().map(|e| e.id.clone())),
        );
        let store = store.clone();
        writers.spawn(async move {
            for t in transitions {
                assert!(store.apply_transition(&t).await.unwrap());
            }
        });
    }
    writers.join_all().await;
    done.store(true, Ordering::SeqCst);
    let seen = reader.await.unwrap();
    assert_eq!(
        seen.len(),
        expected.len(),
        "the reader saw {} of {} events",
        seen.len(),
        expected.len()
    );
    assert_eq!(seen.into_iter().collect::<HashSet<_>>(), expected);
}

// --- checks: admission ----------------------------------------------------------------------

async fn check_nonces(store: DynStore) {
    assert_eq!(
        admit_nonce(&store, "key_a", "n1", T0).await,
        AdmissionOutcome::Admitted(None)
    );
    assert_eq!(
        admit_nonce(&store, "key_a", "n1", T0 + 10).await,
        AdmissionOutcome::NonceReused
    );
    assert_eq!(
        admit_nonce(&store, "key_b", "n1", T0 + 10).await,
        AdmissionOutcome::Admitted(None)
    );
    assert_eq!(
        admit_nonce(&store, "key_a", "n2", T0 + 10).await,
        AdmissionOutcome::Admitted(None)
    );
    // A replay repeats the signed timestamp: refused however late it comes.
    assert_eq!(
        admit_nonce(&store, "key_a", "n1", T0 + 300_000).await,
        AdmissionOutcome::NonceReused
    );
    // The same nonce under another signed timestamp is another request.
    let resigned = Admission {
        now_ms: T0 + 1_000,
        nonce: nonce("key_a", "n1", T0 / 1000 + 1),
        idempotency: None,
    };
    assert_eq!(
        store.admit(&resigned).await.unwrap(),
        AdmissionOutcome::Admitted(None)
    );
    assert_eq!(
        store.admit(&resigned).await.unwrap(),
        AdmissionOutcome::NonceReused
    );
    assert_eq!(
        store
            .admit(&Admission {
                now_ms: T0,
                ..Default::default()
            })
            .await
            .unwrap(),
        AdmissionOutcome::Admitted(None)
    );

    // A reused nonce rejects the request before its idempotency key is claimed.
    let replayed = Admission {
        now_ms: T0 + 20,
        nonce: nonce("key_a", "n2", T0 / 1000),
        idempotency: idem("m", "k", "h", T0 + 20),
    };
    assert_eq!(
        store.admit(&replayed).await.unwrap(),
        AdmissionOutcome::NonceReused
    );
    let fresh = Admission {
        now_ms: T0 + 30,
        nonce: nonce("key_a", "n3", T0 / 1000),
        idempotency: idem("m", "k", "h", T0 + 30),
    };
    assert_eq!(
        store.admit(&fresh).await.unwrap(),
        AdmissionOutcome::Admitted(Some(IdempotencyState::New))
    );
}

async fn check_idempotency_lifecycle(store: DynStore) {
    use IdempotencyState::*;
    assert_eq!(admit_key(&store, "mch_1", "k1", "h1", T0).await, New);
    assert_eq!(
        admit_key(&store, "mch_1", "k1", "h1", T0 + 1).await,
        InProgress
    );
    assert_eq!(
        admit_key(&store, "mch_1", "k1", "h2", T0 + 1).await,
        Mismatch
    );
    // Another scope has its own key space.
    assert_eq!(admit_key(&store, "mch_2", "k1", "h9", T0 + 1).await, New);

    assert!(store
        .complete_idempotency(&completion("mch_1", "k1", T0, 201, r#"{"id":"pay_1"}"#))
        .await
        .unwrap());
    let replay = Replay {
        status: 201,
        body: r#"{"id":"pay_1"}"#.into(),
    };
    assert_eq!(admit_key(&store, "mch_1", "k1", "h1", T0 + 3).await, replay);
    assert_eq!(
        admit_key(&store, "mch_1", "k1", "h2", T0 + 3).await,
        Mismatch
    );
    // Completed keys are neither released nor taken over when old.
    store
        .release_idempotency("mch_1", "k1", &token("k1", T0))
        .await
        .unwrap();
    assert_eq!(
        admit_key(&store, "mch_1", "k1", "h1", T0 + 10_000_000).await,
        replay
    );

    // A stale in-progress claim is taken over, and the takeover holds the key again.
    assert_eq!(admit_key(&store, "mch_1", "k2", "h", T0).await, New);
    assert_eq!(
        admit_key(&store, "mch_1", "k2", "h", T0 + 60_000).await,
        InProgress
    );
    assert_eq!(
        admit_key(&store, "mch_1", "k2", "h", T0 + 60_001).await,
        New
    );
    assert_eq!(
        admit_key(&store, "mch_1", "k2", "h", T0 + 60_002).await,
        InProgress
    );
    assert_eq!(
        admit_key(&store, "mch_1", "k2", "h", T0 + 120_001).await,
        InProgress
    );
    assert_eq!(
        admit_key(&store, "mch_1", "k2", "h", T0 + 120_002).await,
        New
    );

    // Released: the key is free again.
    assert_eq!(admit_key(&store, "mch_1", "k3", "h", T0).await, New);
    store
        .release_idempotency("mch_1", "k3", &token("k3", T0))
        .await
        .unwrap();
    assert_eq!(admit_key(&store, "mch_1", "k3", "other", T0 + 1).await, New);
    assert_eq!(
        admit_key(&store, "mch_1", "k3", "h", T0 + 2).await,
        Mismatch
    );
}

/// Regression (review of the foundation): a request whose stale claim was taken over by a retry
/// must not complete or release the key the retry now holds.
async fn check_taken_over_claim_cannot_complete(store: DynStore) {
    use IdempotencyState::*;
    assert_eq!(admit_key(&store, "m", "k", "h", T0).await, New);
    // The first request stalls; its retry takes the stale claim over.
    assert_eq!(admit_key(&store, "m", "k", "h", T0 + 60_001).await, New);
    // The first request wakes up: neither its answer nor its release counts.
    assert!(!store
        .complete_idempotency(&completion("m", "k", T0, 200, "first"))
        .await
        .unwrap());
    store
        .release_idempotency("m", "k", &token("k", T0))
        .await
        .unwrap();
    assert_eq!(
        admit_key(&store, "m", "k", "h", T0 + 60_002).await,
        InProgress
    );
    // The retry's answer is the one that is kept.
    assert!(store
        .complete_idempotency(&completion("m", "k", T0 + 60_001, 200, "retry"))
        .await
        .unwrap());
    assert_eq!(
        admit_key(&store, "m", "k", "h", T0 + 60_003).await,
        Replay {
            status: 200,
            body: "retry".into()
        }
    );
    // A transition carrying the stale claim's response still applies; the replay is unchanged.
    let m = merchant_at(T0).id;
    let new = new_payment(m, "taken-over");
    create(&store, &new).await;
    let mut t = succeed(&new.payment, &new.attempt, T0 + 2);
    t.idempotency = Some(completion("m", "k", T0, 200, "stale"));
    assert!(store.apply_transition(&t).await.unwrap());
    assert_eq!(
        admit_key(&store, "m", "k", "h", T0 + 60_004).await,
        Replay {
            status: 200,
            body: "retry".into()
        }
    );
}

/// The create-payment write claims the request's nonce and key itself (one commit fewer), and
/// writes no payment when the admission refuses the request.
async fn check_create_payment_admits_in_the_same_write(store: DynStore) {
    let m = merchant_at(T0);
    store.insert_merchant(&m).await.unwrap();
    let scope = m.id.to_string();
    let with_admission = |otn: &str, n: &str, key: &str, hash: &str| {
        let mut new = new_payment(m.id, otn);
        new.admission = Some(Admission {
            now_ms: T0,
            nonce: nonce("key_a", n, T0 / 1000),
            idempotency: idem(&scope, key, hash, T0),
        });
        new
    };
    let first = with_admission("adm-1", "n1", "k1", "h1");
    assert_eq!(
        store.create_payment(&first).await.unwrap(),
        CreatePaymentOutcome::Created
    );
    // The nonce and the key were claimed with the payment.
    assert_eq!(
        admit_nonce(&store, "key_a", "n1", T0 + 1).await,
        AdmissionOutcome::NonceReused
    );
    assert_eq!(
        admit_key(&store, &scope, "k1", "h1", T0 + 1).await,
        IdempotencyState::InProgress
    );
    // Refusals write no payment.
    let cases = [
        (
            with_admission("adm-2", "n1", "k2", "h2"),
            AdmissionOutcome::NonceReused,
        ),
        (
            with_admission("adm-3", "n3", "k1", "h1"),
            AdmissionOutcome::Admitted(Some(IdempotencyState::InProgress)),
        ),
        (
            with_admission("adm-4", "n4", "k1", "other"),
            AdmissionOutcome::Admitted(Some(IdempotencyState::Mismatch)),
        ),
    ];
    for (new, expected) in cases {
        assert_eq!(
            store.create_payment(&new).await.unwrap(),
            CreatePaymentOutcome::NotAdmitted(expected)
        );
        assert!(store
            .get_payment(m.id, new.payment.id)
            .await
            .unwrap()
            .is_none());
    }
    let (payments, _) = (store.list_payments(m.id, 10, None).await.unwrap(), ());
    assert_eq!(payments.len(), 1);
    // A duplicate out_trade_no keeps the admission (its 409 is stored under the key later).
    let dup = with_admission("adm-1", "n5", "k5", "h5");
    assert!(matches!(
        store.create_payment(&dup).await.unwrap(),
        CreatePaymentOutcome::DuplicateOutTradeNo(_)
    ));
    assert_eq!(
        admit_key(&store, &scope, "k5", "h5", T0 + 1).await,
        IdempotencyState::InProgress
    );
}

async fn concurrent_admits(
    store: &DynStore,
    n: usize,
    key: &str,
    now_ms: i64,
) -> Vec<IdempotencyState> {
    let barrier = Arc::new(Barrier::new(n));
    let mut tasks = JoinSet::new();
    for _ in 0..n {
        let (store, barrier, key) = (store.clone(), barrier.clone(), key.to_string());
        tasks.spawn(async move {
            barrier.wait().await;
            admit_key(&store, "mch_c", &key, "h", now_ms).await
        });
    }
    tasks.join_all().await
}

async fn check_concurrent_admits_one_new(store: DynStore) {
    let states = concurrent_admits(&store, 50, "same-key", T0).await;
    let new = states
        .iter()
        .filter(|s| **s == IdempotencyState::New)
        .count();
    assert_eq!(new, 1, "{new} requests got the same key: {states:?}");
    assert!(states
        .iter()
        .all(|s| matches!(s, IdempotencyState::New | IdempotencyState::InProgress)));

    // Several requests finding the same stale claim: one takes it over.
    let states = concurrent_admits(&store, 20, "same-key", T0 + 60_001).await;
    let new = states
        .iter()
        .filter(|s| **s == IdempotencyState::New)
        .count();
    assert_eq!(new, 1, "{new} requests took over one stale key: {states:?}");
}

// --- checks: jobs ---------------------------------------------------------------------------

async fn check_job_leases(store: DynStore) {
    schedule(&store, "k", "j1", 100).await;
    schedule(&store, "k", "j2", 200).await;
    schedule(&store, "k", "j3", 300).await;
    schedule(&store, "other", "j1", 100).await;
    assert_eq!(store.count_jobs("k").await.unwrap(), 3);
    assert_eq!(store.count_jobs("other").await.unwrap(), 1);
    assert_eq!(store.count_jobs("none").await.unwrap(), 0);

    assert!(store
        .lease_jobs("k", 99, 1000, 10)
        .await
        .unwrap()
        .is_empty());
    let mut leased = store.lease_jobs("k", 250, 1000, 10).await.unwrap();
    leased.sort_by(|a, b| a.subject_id.cmp(&b.subject_id));
    let job = |s: &str, run_at_ms, attempts, created_at_ms| JobRecord {
        kind: "k".into(),
        subject_id: s.into(),
        run_at_ms,
        attempts,
        created_at_ms,
    };
    assert_eq!(
        leased,
        vec![job("j1", 1250, 1, 100), job("j2", 1250, 1, 200)]
    );
    // Leased jobs are invisible until the lease runs out.
    assert!(store
        .lease_jobs("k", 250, 1000, 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        subjects(&store.lease_jobs("k", 1249, 1000, 10).await.unwrap()),
        BTreeSet::from(["j3".to_string()])
    );
    let mut again = store.lease_jobs("k", 1250, 1000, 10).await.unwrap();
    again.sort_by(|a, b| a.subject_id.cmp(&b.subject_id));
    assert_eq!(
        again,
        vec![job("j1", 2250, 2, 100), job("j2", 2250, 2, 200)]
    );
    // The other kind was not touched.
    let other = store.lease_jobs("other", 250, 1000, 10).await.unwrap();
    assert_eq!(
        (other.len(), other[0].attempts, other[0].run_at_ms),
        (1, 1, 1250)
    );

    // The limit takes the earliest due first.
    schedule(&store, "l", "late", 50).await;
    schedule(&store, "l", "early", 10).await;
    schedule(&store, "l", "mid", 30).await;
    assert_eq!(
        subjects(&store.lease_jobs("l", 100, 1000, 1).await.unwrap()),
        BTreeSet::from(["early".to_string()])
    );
    assert_eq!(
        subjects(&store.lease_jobs("l", 100, 1000, 1).await.unwrap()),
        BTreeSet::from(["mid".to_string()])
    );

    // Schedule moves an existing job (keeping its attempts); Delete removes it.
    schedule(&store, "k", "j1", 5000).await;
    assert_eq!(store.count_jobs("k").await.unwrap(), 3);
    // (j2 and j3 are due again by now; this lease moves them out of the way.)
    assert_eq!(
        subjects(&store.lease_jobs("k", 4999, 1000, 10).await.unwrap()),
        BTreeSet::from(["j2".to_string(), "j3".to_string()])
    );
    let moved = store.lease_jobs("k", 5000, 1000, 10).await.unwrap();
    assert_eq!(moved.len(), 1);
    let j1 = &moved[0];
    assert_eq!(
        (j1.attempts, j1.run_at_ms, j1.created_at_ms),
        (3, 6000, 100)
    );
    store
        .update_job(&JobUpdate::Delete {
            kind: "k".into(),
            subject_id: "j1".into(),
        })
        .await
        .unwrap();
    store
        .update_job(&JobUpdate::Delete {
            kind: "k".into(),
            subject_id: "missing".into(),
        })
        .await
        .unwrap();
    assert_eq!(store.count_jobs("k").await.unwrap(), 2);
    assert_eq!(store.count_jobs("other").await.unwrap(), 1);
    assert!(!subjects(&store.lease_jobs("k", 100_000, 1000, 10).await.unwrap()).contains("j1"));
}

async fn check_concurrent_leases_hand_out_each_job_once(store: DynStore) {
    let mut writes = JoinSet::new();
    for i in 0..200 {
        let store = store.clone();
        writes
            .spawn(async move { schedule(&store, "bulk", &format!("job-{i:03}"), 1000 + i).await });
    }
    writes.join_all().await;
    schedule(&store, "bulk", "not-due", 10_000).await;
    assert_eq!(store.count_jobs("bulk").await.unwrap(), 201);

    let mut workers = JoinSet::new();
    for _ in 0..4 {
        let store = store.clone();
        workers.spawn(async move {
            let mut got = Vec::new();
            loop {
                let batch = store.lease_jobs("bulk", 5000, 60_000, 7).await.unwrap();
                if batch.is_empty() {
                    return got;
                }
                got.extend(batch.into_iter().map(|j| j.subject_id));
            }
        });
    }
    let all: Vec<String> = workers.join_all().await.into_iter().flatten().collect();
    let unique: HashSet<&String> = all.iter().collect();
    assert_eq!(unique.len(), all.len(), "a job was leased twice");
    assert_eq!(all.len(), 200);
    assert!(!unique.contains(&"not-due".to_string()));
}

// --- checks: alerts, housekeeping -----------------------------------------------------------

async fn check_alerts_newest_first(store: DynStore) {
    assert!(store.list_alerts(10).await.unwrap().is_empty());
    let alert = |i: i64| AlertRecord {
        kind: "channel_mismatch".into(),
        subject_id: format!("pay_{i}"),
        detail: format!("detail {i}"),
        created_at_ms: T0 + i,
    };
    for i in 0..3 {
        store.insert_alert(&alert(i)).await.unwrap();
    }
    assert_eq!(
        store.list_alerts(2).await.unwrap(),
        vec![alert(2), alert(1)]
    );
    assert_eq!(
        store.list_alerts(10).await.unwrap(),
        vec![alert(2), alert(1), alert(0)]
    );
}

async fn check_channel_accounts_and_attempt_lookup(store: DynStore) {
    let account = |n: u8, t: i64| ChannelAccountRecord {
        id: ChannelAccountId::generate(t as u64, [n; 10]),
        channel: "wechatpay".into(),
        name: format!("wx {n}"),
        status: ChannelAccountStatus::Active,
        priority: i64::from(n),
        config: r#"{"mchid":"1900000109"}"#.into(),
        secrets_ciphertext: "v1:ciphertext".into(),
        version: 1,
        created_at_ms: t,
        updated_at_ms: t,
    };
    let (a, b) = (account(1, T0), account(2, T0 + 1));
    store.insert_channel_account(&b).await.unwrap();
    store.insert_channel_account(&a).await.unwrap();
    assert_eq!(
        store.list_channel_accounts().await.unwrap(),
        vec![a.clone(), b.clone()]
    );
    assert_eq!(
        store.get_channel_account(a.id).await.unwrap(),
        Some(a.clone())
    );
    let disabled = store
        .set_channel_account_status(a.id, ChannelAccountStatus::Disabled, T0 + 5)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (disabled.status, disabled.version, disabled.updated_at_ms),
        (ChannelAccountStatus::Disabled, 2, T0 + 5)
    );
    // Setting the status it has already changes nothing.
    let again = store
        .set_channel_account_status(a.id, ChannelAccountStatus::Disabled, T0 + 9)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again, disabled);

    // An attempt remembers its account, and is found by its own id.
    let m = merchant_at(T0).id;
    let mut new = new_payment(m, "via-account");
    new.attempt.channel_account_id = Some(b.id);
    create(&store, &new).await;
    let found = store.get_attempt(new.attempt.id).await.unwrap().unwrap();
    assert_eq!(found, new.attempt);
    assert_eq!(found.channel_account_id, Some(b.id));
    let other = AttemptId::generate(T0 as u64, rand10());
    assert!(store.get_attempt(other).await.unwrap().is_none());
}

async fn check_list_job_subjects(store: DynStore) {
    for (subject, run_at) in [("c", 30), ("a", 10), ("b", 20)] {
        store
            .update_job(&JobUpdate::Schedule {
                kind: "k".into(),
                subject_id: subject.into(),
                run_at_ms: run_at,
                last_error: None,
            })
            .await
            .unwrap();
    }
    assert_eq!(
        store.list_job_subjects("k", 10).await.unwrap(),
        vec!["a", "b", "c"]
    );
    assert_eq!(
        store.list_job_subjects("k", 2).await.unwrap(),
        vec!["a", "b"]
    );
    assert!(store
        .list_job_subjects("other", 10)
        .await
        .unwrap()
        .is_empty());
    // Reading leases nothing.
    assert_eq!(
        store.lease_jobs("k", 100, 1_000, 10).await.unwrap().len(),
        3
    );
}

async fn check_alert_once_per_subject(store: DynStore) {
    let alert = |subject: &str, t| AlertRecord {
        kind: "payment_unresolved".into(),
        subject_id: subject.into(),
        detail: format!("at {t}"),
        created_at_ms: t,
    };
    assert!(store.insert_alert_once(&alert("pay_1", 1)).await.unwrap());
    assert!(!store.insert_alert_once(&alert("pay_1", 2)).await.unwrap());
    assert!(store.insert_alert_once(&alert("pay_2", 3)).await.unwrap());
    let mut other_kind = alert("pay_1", 4);
    other_kind.kind = "channel_conflict".into();
    assert!(store.insert_alert_once(&other_kind).await.unwrap());
    assert_eq!(
        store.list_alerts(10).await.unwrap(),
        vec![other_kind, alert("pay_2", 3), alert("pay_1", 1)]
    );
}

async fn check_prune(store: DynStore) {
    let claim = |n: &str, timestamp_s| Admission {
        now_ms: 0,
        nonce: nonce("key", n, timestamp_s),
        idempotency: None,
    };
    store.admit(&claim("old", 1)).await.unwrap();
    store.admit(&claim("live", 10)).await.unwrap();
    assert_eq!(
        admit_key(&store, "s", "done-old", "h", 50).await,
        IdempotencyState::New
    );
    assert!(store
        .complete_idempotency(&completion("s", "done-old", 50, 200, "old"))
        .await
        .unwrap());
    assert_eq!(
        admit_key(&store, "s", "running-old", "h", 50).await,
        IdempotencyState::New
    );
    assert_eq!(
        admit_key(&store, "s", "done-new", "h", 500).await,
        IdempotencyState::New
    );
    assert!(store
        .complete_idempotency(&completion("s", "done-new", 500, 200, "new"))
        .await
        .unwrap());

    let prune = |limit| Prune {
        nonces_signed_before_s: 10,
        keys_created_before_ms: 100,
        limit,
    };
    // The old nonce, the old completed key and the old abandoned in-progress key; at most
    // `limit` of each kind per call.
    assert_eq!(store.prune(&prune(1)).await.unwrap(), 2);
    assert_eq!(store.prune(&prune(1)).await.unwrap(), 1);
    assert_eq!(store.prune(&prune(100)).await.unwrap(), 0);
    // The old completed key is gone: the same key starts afresh.
    assert_eq!(
        admit_key(&store, "s", "done-old", "h", 1000).await,
        IdempotencyState::New
    );
    // An in-progress key older than the retention belongs to a request that died long ago.
    assert_eq!(
        admit_key(&store, "s", "running-old", "h", 1000).await,
        IdempotencyState::New
    );
    // Newer completed keys are kept, and so are live nonces.
    assert_eq!(
        admit_key(&store, "s", "done-new", "h", 1000).await,
        IdempotencyState::Replay {
            status: 200,
            body: "new".into()
        }
    );
    let reuse = Admission {
        now_ms: 1000,
        nonce: nonce("key", "live", 10),
        idempotency: None,
    };
    assert_eq!(
        store.admit(&reuse).await.unwrap(),
        AdmissionOutcome::NonceReused
    );
}

// --- checks that open the store themselves --------------------------------------------------

async fn open_store(url: &str) -> DynStore {
    payrail_store::open(url).await.unwrap()
}

/// Runs one statement on the database behind `url`, bypassing the store.
async fn raw_execute(url: &str, sql: &str) {
    if url.starts_with("postgres") {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        let conn = tokio::spawn(conn);
        client.batch_execute(sql).await.unwrap();
        drop(client);
        let _ = conn.await;
    } else {
        let path = url.strip_prefix("sqlite://").unwrap_or(url);
        rusqlite::Connection::open(path)
            .unwrap()
            .execute_batch(sql)
            .unwrap();
    }
}

async fn check_data_survives_reopen(url: String) {
    let store = open_store(&url).await;
    let m = merchant_at(T0);
    store.insert_merchant(&m).await.unwrap();
    let new = new_payment(m.id, "durable-1");
    create(&store, &new).await;
    store.put_setting_if_absent("k", "v").await.unwrap();
    drop(store);

    // Reopening runs the migrations again, which must be a no-op.
    for _ in 0..2 {
        let store = open_store(&url).await;
        assert_eq!(store.get_merchant(m.id).await.unwrap(), Some(m.clone()));
        assert_eq!(
            store.get_payment(m.id, new.payment.id).await.unwrap(),
            Some(new.payment.clone())
        );
        assert_eq!(
            store.get_attempts(new.payment.id).await.unwrap(),
            vec![new.attempt.clone()]
        );
        assert_eq!(store.count_jobs(SYNC).await.unwrap(), 1);
        assert_eq!(store.get_setting("k").await.unwrap().as_deref(), Some("v"));
    }
}

/// Several processes starting at once on an empty database: all of them must come up.
async fn check_concurrent_first_opens(url: String) {
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let store = payrail_store::open(&url).await.map_err(|e| e.to_string())?;
                    store
                        .put_setting_if_absent(
                            "winner",
                            &format!("{:?}", std::thread::current().id()),
                        )
                        .await
                        .map_err(|e| e.to_string())
                })
            })
        })
        .collect();
    let results: Vec<Result<String, String>> =
        threads.into_iter().map(|t| t.join().unwrap()).collect();
    for r in &results {
        assert!(r.is_ok(), "an opener failed: {results:?}");
    }
    let first = results[0].as_ref().unwrap();
    assert!(
        results.iter().all(|r| r.as_ref().unwrap() == first),
        "settings disagree: {results:?}"
    );
}

async fn check_refuses_newer_schema(url: String) {
    drop(open_store(&url).await);
    raw_execute(&url, "INSERT INTO schema_migrations (version, name, applied_at_ms) VALUES (9999, 'from the future', 0)").await;
    match payrail_store::open(&url).await {
        Err(StoreError::Config(msg)) => assert!(msg.contains("newer"), "{msg}"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("opened a database with a newer schema"),
    }
}

// --- checks: refunds ------------------------------------------------------------------------

const REFUND_SYNC: &str = "refund_sync";

/// A succeeded payment of `amount_minor` USD and its attempt, as stored.
async fn paid_payment(
    store: &DynStore,
    m: MerchantId,
    otn: &str,
    amount_minor: i64,
) -> (PaymentRecord, AttemptRecord) {
    let mut new = new_payment(m, otn);
    new.payment.amount_minor = amount_minor;
    create(store, &new).await;
    assert!(store
        .apply_transition(&succeed(&new.payment, &new.attempt, T0 + 1))
        .await
        .unwrap());
    let p = payment(store, new.payment.id).await;
    let a = attempts(store, p.id).await.remove(0);
    (p, a)
}

fn new_refund(
    p: &PaymentRecord,
    a: &AttemptRecord,
    out_refund_no: &str,
    amount_minor: i64,
    t: i64,
) -> NewRefund {
    let id = RefundId::generate(t as u64, rand10());
    NewRefund {
        refund: RefundRecord {
            id,
            payment_id: p.id,
            attempt_id: a.id,
            merchant_id: p.merchant_id,
            app_id: p.app_id,
            out_refund_no: out_refund_no.into(),
            amount_minor,
            currency: p.currency.clone(),
            reason: Some("returned".into()),
            channel: p.channel.clone(),
            status: RefundStatus::Processing,
            version: 1,
            channel_refund_no: None,
            failure_code: None,
            failure_message: None,
            notify_url: p.notify_url.clone(),
            metadata: r#"{"rma":"7"}"#.into(),
            idempotency_key: Some(format!("idem-{out_refund_no}")),
            request_hash: Some("hash".into()),
            requested_at_ms: t,
            refunded_at_ms: None,
            created_at_ms: t,
            updated_at_ms: t,
        },
        max_refunds: None,
        job: Some(NewJob {
            kind: REFUND_SYNC.into(),
            subject_id: id.to_string(),
            run_at_ms: t + 5_000,
        }),
        admission: None,
    }
}

/// The refund -> `status`, with its event, deleting its job.
fn refund_done(r: &RefundRecord, status: RefundStatus, t: i64) -> RefundTransition {
    let ok = status == RefundStatus::Succeeded;
    RefundTransition {
        refund_id: r.id,
        refund_version: r.version,
        status,
        channel_refund_no: ok.then(|| format!("chr_{}", r.out_refund_no)),
        failure_code: (!ok).then(|| "NOT_ENOUGH".to_string()),
        failure_message: (!ok).then(|| "balance too low".to_string()),
        refunded_at_ms: ok.then_some(t),
        now_ms: t,
        event: Some(NewEvent {
            id: EventId::generate(t as u64, rand10()).to_string(),
            merchant_id: r.merchant_id,
            event_type: format!("refund.{status}"),
            object_id: r.id.to_string(),
            payload: format!(r#"{{"id":"{}"}}"#, r.id),
            created_at_ms: t,
        }),
        job: Some(JobUpdate::Delete {
            kind: REFUND_SYNC.into(),
            subject_id: r.id.to_string(),
        }),
        idempotency: None,
    }
}

async fn refund(store: &DynStore, id: RefundId) -> RefundRecord {
    store
        .get_refund_any(id)
        .await
        .unwrap()
        .expect("refund exists")
}

fn totals(p: &PaymentRecord) -> (i64, i64) {
    (p.refund_reserved_minor, p.amount_refunded_minor)
}

/// Invariant 7 under concurrency: 20 refunds of 200 against a payment of 1999 race; exactly the
/// 9 that fit are recorded, never a tenth. Then a failure frees its amount and exactly the rest
/// fits, not one minor unit more.
async fn check_refund_ceiling_under_concurrent_writes(store: DynStore) {
    let m = merchant_at(T0).id;
    let (p, a) = paid_payment(&store, m, "ceil-1", 1999).await;
    let barrier = Arc::new(Barrier::new(20));
    let mut tasks = JoinSet::new();
    for i in 0..20 {
        let (store, barrier) = (store.clone(), barrier.clone());
        let new = new_refund(&p, &a, &format!("ceil-r{i}"), 200, T0 + 10 + i);
        tasks.spawn(async move {
            barrier.wait().await;
            (new.refund.id, store.create_refund(&new).await.unwrap())
        });
    }
    let outcomes = tasks.join_all().await;
    let created: Vec<RefundId> = outcomes
        .iter()
        .filter(|(_, o)| *o == CreateRefundOutcome::Created)
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(created.len(), 9, "9 x 200 <= 1999 < 10 x 200");
    for (_, o) in &outcomes {
        match o {
            CreateRefundOutcome::Created => {}
            CreateRefundOutcome::Refused(Some(s)) => {
                assert!(s.refund_reserved_minor + 200 > s.amount_minor, "{s:?}")
            }
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    let p2 = payment(&store, p.id).await;
    assert_eq!(totals(&p2), (1800, 0));
    assert_eq!(
        p2.version, p.version,
        "a reservation is not a status change"
    );
    let listed = store.list_refunds(m, Some(p.id), 100, None).await.unwrap();
    assert_eq!(listed.len(), 9);
    assert_eq!(listed.iter().map(|r| r.amount_minor).sum::<i64>(), 1800);
    assert_eq!(store.count_jobs(REFUND_SYNC).await.unwrap(), 9);

    let first = refund(&store, created[0]).await;
    let t = refund_done(&first, RefundStatus::Failed, T0 + 100);
    assert!(store.apply_refund_transition(&t).await.unwrap());
    let second = refund(&store, created[1]).await;
    let t = refund_done(&second, RefundStatus::Succeeded, T0 + 101);
    assert!(store.apply_refund_transition(&t).await.unwrap());
    assert_eq!(totals(&payment(&store, p.id).await), (1600, 200));

    let over = new_refund(&p, &a, "ceil-over", 400, T0 + 200);
    assert!(matches!(
        store.create_refund(&over).await.unwrap(),
        CreateRefundOutcome::Refused(Some(_))
    ));
    assert!(
        store
            .get_refund_any(over.refund.id)
            .await
            .unwrap()
            .is_none(),
        "a refused refund is not recorded"
    );
    let rest = new_refund(&p, &a, "ceil-rest", 399, T0 + 201);
    assert_eq!(
        store.create_refund(&rest).await.unwrap(),
        CreateRefundOutcome::Created
    );
    match store
        .create_refund(&new_refund(&p, &a, "ceil-one", 1, T0 + 202))
        .await
        .unwrap()
    {
        CreateRefundOutcome::Refused(Some(s)) => assert_eq!(
            (
                s.status,
                s.amount_minor,
                s.refund_reserved_minor,
                s.amount_refunded_minor,
                s.refund_count
            ),
            (PaymentStatus::Succeeded, 1999, 1999, 200, 10),
            "the failed refund still counts towards the number of refunds"
        ),
        other => panic!("unexpected outcome {other:?}"),
    }
    assert_eq!(totals(&payment(&store, p.id).await), (1999, 200));
}

async fn check_refund_duplicate_out_refund_no(store: DynStore) {
    let m = merchant_at(T0).id;
    let (p, a) = paid_payment(&store, m, "dup-1", 1000).await;
    let first = new_refund(&p, &a, "dup-r", 1000, T0 + 10);
    assert_eq!(
        store.create_refund(&first).await.unwrap(),
        CreateRefundOutcome::Created
    );
    // The same number again, with another id and amount: the existing refund, nothing
    // reserved — and a duplicate even though the payment has no room left, so a retried full
    // refund finds its refund.
    let again = new_refund(&p, &a, "dup-r", 5, T0 + 11);
    assert_eq!(
        store.create_refund(&again).await.unwrap(),
        CreateRefundOutcome::DuplicateOutRefundNo(Box::new(first.refund.clone()))
    );
    assert!(store
        .get_refund_any(again.refund.id)
        .await
        .unwrap()
        .is_none());
    assert_eq!(totals(&payment(&store, p.id).await), (1000, 0));
    assert_eq!(store.count_jobs(REFUND_SYNC).await.unwrap(), 1);

    // Unique per merchant: another merchant may use the number for its own payment.
    let m2 = merchant_at(T0).id;
    let (p2, a2) = paid_payment(&store, m2, "dup-2", 1000).await;
    assert_eq!(
        store
            .create_refund(&new_refund(&p2, &a2, "dup-r", 10, T0 + 12))
            .await
            .unwrap(),
        CreateRefundOutcome::Created
    );

    // Ten writers race with one number: one refund, one reservation.
    let (p3, a3) = paid_payment(&store, m, "dup-3", 1000).await;
    let barrier = Arc::new(Barrier::new(10));
    let mut tasks = JoinSet::new();
    for i in 0..10 {
        let (store, barrier) = (store.clone(), barrier.clone());
        let new = new_refund(&p3, &a3, "dup-c", 100, T0 + 20 + i);
        tasks.spawn(async move {
            barrier.wait().await;
            store.create_refund(&new).await.unwrap()
        });
    }
    let outcomes = tasks.join_all().await;
    let created = outcomes
        .iter()
        .filter(|o| **o == CreateRefundOutcome::Created)
        .count();
    assert_eq!(created, 1, "{outcomes:?}");
    let winner = store
        .get_refund_by_out_refund_no(m, "dup-c")
        .await
        .unwrap()
        .unwrap();
    for o in outcomes {
        if let CreateRefundOutcome::DuplicateOutRefundNo(r) = o {
            assert_eq!(*r, winner);
        }
    }
    assert_eq!(totals(&payment(&store, p3.id).await), (100, 0));
}

async fn check_refund_refusals_write_nothing(store: DynStore) {
    let m = merchant_at(T0).id;
    let open = new_payment(m, "ref-open");
    create(&store, &open).await;
    match store
        .create_refund(&new_refund(
            &open.payment,
            &open.attempt,
            "r-open",
            1,
            T0 + 10,
        ))
        .await
        .unwrap()
    {
        CreateRefundOutcome::Refused(Some(s)) => assert_eq!(s.status, PaymentStatus::Created),
        other => panic!("unexpected outcome {other:?}"),
    }
    let (p, a) = paid_payment(&store, m, "ref-paid", 1000).await;
    // Another merchant's payment is as if it did not exist.
    let mut foreign = new_refund(&p, &a, "r-foreign", 1, T0 + 11);
    foreign.refund.merchant_id = merchant_at(T0).id;
    assert_eq!(
        store.create_refund(&foreign).await.unwrap(),
        CreateRefundOutcome::Refused(None)
    );
    let mut eur = new_refund(&p, &a, "r-eur", 1, T0 + 12);
    eur.refund.currency = "EUR".into();
    assert!(matches!(
        store.create_refund(&eur).await.unwrap(),
        CreateRefundOutcome::Refused(Some(s)) if s.currency == "USD"
    ));
    // A channel limit of refunds per payment counts failed refunds too.
    let mut r1 = new_refund(&p, &a, "r-max-1", 1, T0 + 13);
    r1.max_refunds = Some(2);
    assert_eq!(
        store.create_refund(&r1).await.unwrap(),
        CreateRefundOutcome::Created
    );
    let failed = refund_done(&r1.refund, RefundStatus::Failed, T0 + 14);
    assert!(store.apply_refund_transition(&failed).await.unwrap());
    let mut r2 = new_refund(&p, &a, "r-max-2", 1, T0 + 15);
    r2.max_refunds = Some(2);
    assert_eq!(
        store.create_refund(&r2).await.unwrap(),
        CreateRefundOutcome::Created
    );
    let mut r3 = new_refund(&p, &a, "r-max-3", 1, T0 + 16);
    r3.max_refunds = Some(2);
    assert!(matches!(
        store.create_refund(&r3).await.unwrap(),
        CreateRefundOutcome::Refused(Some(s)) if s.refund_count == 2
    ));
    // Only r1 (failed, its job gone) and r2 (processing, its job) were written.
    let listed = store.list_refunds(m, None, 100, None).await.unwrap();
    assert_eq!(
        listed.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![r2.refund.id, r1.refund.id]
    );
    assert_eq!(store.count_jobs(REFUND_SYNC).await.unwrap(), 1);
    assert_eq!(totals(&payment(&store, p.id).await), (1, 0));
    let events = store.list_events(m, 0, 100).await.unwrap();
    let refund_events: Vec<_> = events
        .iter()
        .filter(|e| e.event_type.starts_with("refund."))
        .collect();
    assert_eq!(refund_events.len(), 1);
    assert_eq!(refund_events[0].object_id, r1.refund.id.to_string());
}

async fn check_refund_transitions_move_totals_once(store: DynStore) {
    let m = merchant_at(T0).id;
    let (p, a) = paid_payment(&store, m, "t-1", 1000).await;
    let new = new_refund(&p, &a, "t-r1", 300, T0 + 10);
    assert_eq!(
        store.create_refund(&new).await.unwrap(),
        CreateRefundOutcome::Created
    );
    let r = refund(&store, new.refund.id).await;
    assert_eq!(r, new.refund, "every field round-trips");
    let before = payment(&store, p.id).await;
    assert_eq!(totals(&before), (300, 0));
    assert_eq!(before.updated_at_ms, T0 + 10);

    // A stale version writes nothing.
    let mut stale = refund_done(&r, RefundStatus::Succeeded, T0 + 20);
    stale.refund_version = 7;
    assert!(!store.apply_refund_transition(&stale).await.unwrap());
    assert_eq!(refund(&store, r.id).await, r);
    assert_eq!(payment(&store, p.id).await, before);
    assert!(store.list_events(m, 0, 100).await.unwrap().len() == 1);
    assert_eq!(store.count_jobs(REFUND_SYNC).await.unwrap(), 1);

    // processing -> succeeded: refunded total, event, job and idempotent answer together.
    let scope = m.to_string();
    assert_eq!(
        admit_key(&store, &scope, "k-refund", "h-refund", T0).await,
        IdempotencyState::New
    );
    let mut done = refund_done(&r, RefundStatus::Succeeded, T0 + 20);
    done.idempotency = Some(completion(&scope, "k-refund", T0, 200, r#"{"r":1}"#));
    assert!(store.apply_refund_transition(&done).await.unwrap());
    let r2 = refund(&store, r.id).await;
    assert_eq!(
        (
            r2.status,
            r2.version,
            r2.channel_refund_no.as_deref(),
            r2.refunded_at_ms,
            r2.updated_at_ms
        ),
        (
            RefundStatus::Succeeded,
            2,
            Some("chr_t-r1"),
            Some(T0 + 20),
            T0 + 20
        )
    );
    let after = payment(&store, p.id).await;
    assert_eq!(totals(&after), (300, 300));
    assert_eq!(
        (after.status, after.version, after.updated_at_ms),
        (PaymentStatus::Succeeded, before.version, T0 + 20)
    );
    let events = store.list_events(m, 0, 100).await.unwrap();
    let last = events.last().unwrap();
    assert_eq!(
        (last.event_type.as_str(), last.object_id.clone()),
        ("refund.succeeded", r.id.to_string())
    );
    assert_eq!(store.count_jobs(REFUND_SYNC).await.unwrap(), 0);
    assert_eq!(
        admit_key(&store, &scope, "k-refund", "h-refund", T0 + 30).await,
        IdempotencyState::Replay {
            status: 200,
            body: r#"{"r":1}"#.into()
        }
    );

    // A final refund never changes again, even with its current version: the totals moved once.
    for status in [RefundStatus::Failed, RefundStatus::Succeeded] {
        let again = refund_done(&r2, status, T0 + 40);
        assert!(!store.apply_refund_transition(&again).await.unwrap());
    }
    assert_eq!(refund(&store, r.id).await, r2);
    assert_eq!(payment(&store, p.id).await, after);
    assert_eq!(
        store.list_events(m, 0, 100).await.unwrap().len(),
        events.len()
    );

    // processing -> failed releases the reservation.
    let new2 = new_refund(&p, &a, "t-r2", 700, T0 + 50);
    assert_eq!(
        store.create_refund(&new2).await.unwrap(),
        CreateRefundOutcome::Created
    );
    assert_eq!(totals(&payment(&store, p.id).await), (1000, 300));
    let fail = refund_done(&new2.refund, RefundStatus::Failed, T0 + 60);
    assert!(store.apply_refund_transition(&fail).await.unwrap());
    assert_eq!(totals(&payment(&store, p.id).await), (300, 300));
    let failed = refund(&store, new2.refund.id).await;
    assert_eq!(
        (
            failed.status,
            failed.failure_code.as_deref(),
            failed.refunded_at_ms
        ),
        (RefundStatus::Failed, Some("NOT_ENOUGH"), None)
    );
}

async fn check_concurrent_refund_transitions_one_winner(store: DynStore) {
    let m = merchant_at(T0).id;
    let (p, a) = paid_payment(&store, m, "race-r", 1000).await;
    let new = new_refund(&p, &a, "race-r1", 600, T0 + 10);
    assert_eq!(
        store.create_refund(&new).await.unwrap(),
        CreateRefundOutcome::Created
    );
    let barrier = Arc::new(Barrier::new(20));
    let mut tasks = JoinSet::new();
    for i in 0..20 {
        let (store, barrier) = (store.clone(), barrier.clone());
        let status = if i % 2 == 0 {
            RefundStatus::Succeeded
        } else {
            RefundStatus::Failed
        };
        let t = refund_done(&new.refund, status, T0 + 20 + i);
        tasks.spawn(async move {
            barrier.wait().await;
            store.apply_refund_transition(&t).await.unwrap()
        });
    }
    let wins = tasks.join_all().await.into_iter().filter(|w| *w).count();
    assert_eq!(wins, 1, "optimistic lock let {wins} writers win");
    let r = refund(&store, new.refund.id).await;
    assert_eq!(r.version, 2);
    let want = match r.status {
        RefundStatus::Succeeded => (600, 600),
        RefundStatus::Failed => (0, 0),
        RefundStatus::Processing => panic!("nobody won"),
    };
    assert_eq!(totals(&payment(&store, p.id).await), want);
    let events = store.list_events(m, 0, 100).await.unwrap();
    assert_eq!(
        events
            .iter()
            .filter(|e| e.event_type.starts_with("refund."))
            .count(),
        1
    );
}

async fn check_refund_reads_scoped_by_merchant(store: DynStore) {
    let (m, other) = (merchant_at(T0).id, merchant_at(T0).id);
    let (p, a) = paid_payment(&store, m, "read-p", 1000).await;
    let (q, b) = paid_payment(&store, m, "read-q", 1000).await;
    let r1 = new_refund(&p, &a, "read-1", 10, T0 + 1_000);
    let r2 = new_refund(&q, &b, "read-2", 10, T0 + 2_000);
    let r3 = new_refund(&p, &a, "read-3", 10, T0 + 3_000);
    for r in [&r1, &r2, &r3] {
        assert_eq!(
            store.create_refund(r).await.unwrap(),
            CreateRefundOutcome::Created
        );
    }
    let (id1, id2, id3) = (r1.refund.id, r2.refund.id, r3.refund.id);
    assert!(store.get_refund(m, id1).await.unwrap().is_some());
    assert!(store.get_refund(other, id1).await.unwrap().is_none());
    assert_eq!(
        store
            .get_refund_by_out_refund_no(m, "read-2")
            .await
            .unwrap()
            .map(|r| r.id),
        Some(id2)
    );
    assert!(store
        .get_refund_by_out_refund_no(other, "read-2")
        .await
        .unwrap()
        .is_none());
    let ids = |rows: Vec<RefundRecord>| rows.into_iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.list_refunds(m, None, 10, None).await.unwrap()),
        vec![id3, id2, id1]
    );
    assert_eq!(
        ids(store.list_refunds(m, None, 10, Some(id2)).await.unwrap()),
        vec![id1]
    );
    assert_eq!(
        ids(store.list_refunds(m, Some(p.id), 10, None).await.unwrap()),
        vec![id3, id1]
    );
    assert_eq!(
        ids(store.list_refunds(m, Some(p.id), 1, None).await.unwrap()),
        vec![id3]
    );
    assert_eq!(
        ids(store
            .list_refunds(m, Some(p.id), 10, Some(id3))
            .await
            .unwrap()),
        vec![id1]
    );
    assert!(store
        .list_refunds(other, None, 10, None)
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .list_refunds(other, Some(p.id), 10, None)
        .await
        .unwrap()
        .is_empty());
}

async fn check_refund_create_admits_in_the_same_write(store: DynStore) {
    let m = merchant_at(T0).id;
    let (p, a) = paid_payment(&store, m, "adm-1", 1000).await;
    let scope = m.to_string();
    let admission = |n: &str, key: &str| Admission {
        now_ms: T0,
        nonce: nonce("key_refunds", n, T0 / 1000),
        idempotency: idem(&scope, key, "h-adm", T0),
    };
    let mut first = new_refund(&p, &a, "adm-r1", 100, T0 + 10);
    first.admission = Some(admission("nonce-adm-1", "k-adm-1"));
    assert_eq!(
        store.create_refund(&first).await.unwrap(),
        CreateRefundOutcome::Created
    );
    // The same nonce again: refused, nothing written.
    let mut replayed = new_refund(&p, &a, "adm-r2", 100, T0 + 11);
    replayed.admission = Some(admission("nonce-adm-1", "k-adm-2"));
    assert_eq!(
        store.create_refund(&replayed).await.unwrap(),
        CreateRefundOutcome::NotAdmitted(AdmissionOutcome::NonceReused)
    );
    // The same key while the first request runs: refused, nothing written.
    let mut concurrent = new_refund(&p, &a, "adm-r3", 100, T0 + 12);
    concurrent.admission = Some(admission("nonce-adm-3", "k-adm-1"));
    assert_eq!(
        store.create_refund(&concurrent).await.unwrap(),
        CreateRefundOutcome::NotAdmitted(AdmissionOutcome::Admitted(Some(
            IdempotencyState::InProgress
        )))
    );
    for r in [&replayed, &concurrent] {
        assert!(store.get_refund_any(r.refund.id).await.unwrap().is_none());
    }
    assert_eq!(totals(&payment(&store, p.id).await), (100, 0));
    assert_eq!(store.count_jobs(REFUND_SYNC).await.unwrap(), 1);
    // A refused reservation keeps its admission: the key is in progress, to be completed with
    // the refusal by the caller.
    let mut over = new_refund(&p, &a, "adm-r4", 1000, T0 + 13);
    over.admission = Some(admission("nonce-adm-4", "k-adm-4"));
    assert!(matches!(
        store.create_refund(&over).await.unwrap(),
        CreateRefundOutcome::Refused(Some(_))
    ));
    assert!(store
        .complete_idempotency(&completion(&scope, "k-adm-4", T0, 409, "{}"))
        .await
        .unwrap());
}

/// The database itself refuses refund totals out of order (the backstop behind the guarded
/// writes): refunded <= reserved <= paid.
async fn check_refund_totals_are_constrained(url: String) {
    let store = open_store(&url).await;
    let m = merchant_at(T0).id;
    let (p, _) = paid_payment(&store, m, "chk-1", 1000).await;
    drop(store);
    let id = p.id;
    for (sql, ok) in [
        (format!("UPDATE payments SET refund_reserved_minor = 1001 WHERE id = '{id}'"), false),
        (format!("UPDATE payments SET amount_refunded_minor = 1 WHERE id = '{id}'"), false),
        (format!("UPDATE payments SET refund_reserved_minor = -1 WHERE id = '{id}'"), false),
        (format!("UPDATE payments SET refund_count = -1 WHERE id = '{id}'"), false),
        (format!("UPDATE payments SET refund_reserved_minor = 1000, amount_refunded_minor = 1000 WHERE id = '{id}'"), true),
    ] {
        assert_eq!(raw_try_execute(&url, &sql).await.is_ok(), ok, "{sql}");
    }
    let store = open_store(&url).await;
    assert_eq!(totals(&payment(&store, id).await), (1000, 1000));
}

/// Like [`raw_execute`], reporting the error instead of failing.
async fn raw_try_execute(url: &str, sql: &str) -> Result<(), String> {
    if url.starts_with("postgres") {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        let conn = tokio::spawn(conn);
        let out = client.batch_execute(sql).await.map_err(|e| e.to_string());
        drop(client);
        let _ = conn.await;
        out
    } else {
        let path = url.strip_prefix("sqlite://").unwrap_or(url);
        rusqlite::Connection::open(path)
            .unwrap()
            .execute_batch(sql)
            .map_err(|e| e.to_string())
    }
}

// --- backends -------------------------------------------------------------------------------

async fn run_isolated<Fut>(check: Fut, cleanup: impl Future<Output = ()>)
where
    Fut: Future<Output = ()> + Send + 'static,
{
    let outcome = tokio::spawn(check).await;
    cleanup.await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

async fn on_sqlite<F, Fut>(name: &str, check: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let dir = std::env::temp_dir().join(format!(
        "payrail-conf-{name}-{}-{:016x}",
        std::process::id(),
        rand_u64()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}", dir.join("payrail.db").display());
    run_isolated(check(url), async {
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await;
}

/// `url` with its database name replaced.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let host_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[host_start..].find('/') {
        Some(i) => &base[..host_start + i],
        None => base,
    };
    format!("{base}/{db}{query}")
}

async fn on_postgres<F, Fut>(name: &str, check: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Ok(server) = std::env::var(PG_URL_VAR) else {
        println!("skipped: {name} on PostgreSQL ({PG_URL_VAR} is not set)");
        return;
    };
    let (admin, conn) = tokio_postgres::connect(&server, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let db = format!("payrail_conf_{:016x}", rand_u64());
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    run_isolated(check(with_database(&server, &db)), async {
        if let Err(e) = admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .await
        {
            println!("could not drop {db}: {e}");
        }
    })
    .await;
}

macro_rules! conformance {
    (stores: [$($check:ident),* $(,)?], urls: [$($url_check:ident),* $(,)?] $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    super::on_sqlite(stringify!($check), |url| async move {
                        super::$check(super::open_store(&url).await).await
                    })
                    .await;
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $url_check() {
                    super::on_sqlite(stringify!($url_check), super::$url_check).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    super::on_postgres(stringify!($check), |url| async move {
                        let store = super::open_store(&url).await;
                        assert_eq!(store.backend(), "postgres");
                        super::$check(store).await
                    })
                    .await;
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $url_check() {
                    super::on_postgres(stringify!($url_check), super::$url_check).await;
                }
            )*
        }
    };
}

conformance! {
    stores: [
        check_settings_keep_first_value,
        check_merchants_paginate_newest_first,
        check_merchant_status_bumps_version,
        check_apps_by_key_id_unique,
        check_create_payment_and_duplicates,
        check_no_payment_for_a_frozen_merchant,
        check_payment_reads_scoped_by_merchant,
        check_transition_applies_everything,
        check_stale_transition_writes_nothing,
        check_transition_saves_idempotent_response_atomically,
        check_concurrent_transitions_one_winner,
        check_one_succeeded_attempt_per_payment,
        check_outbox_readers_never_skip_events,
        check_nonces,
        check_idempotency_lifecycle,
        check_taken_over_claim_cannot_complete,
        check_create_payment_admits_in_the_same_write,
        check_concurrent_admits_one_new,
        check_job_leases,
        check_concurrent_leases_hand_out_each_job_once,
        check_alerts_newest_first,
        check_alert_once_per_subject,
        check_list_job_subjects,
        check_channel_accounts_and_attempt_lookup,
        check_prune,
        check_refund_ceiling_under_concurrent_writes,
        check_refund_duplicate_out_refund_no,
        check_refund_refusals_write_nothing,
        check_refund_transitions_move_totals_once,
        check_concurrent_refund_transitions_one_winner,
        check_refund_reads_scoped_by_merchant,
        check_refund_create_admits_in_the_same_write,
        check_outbox_reads_across_merchants,
        check_dispatch_schedules_each_event_once,
        check_attempts_resends_and_log,
        check_outbox_numbering_order,
        check_payout_create_posts_its_entry_and_reads,
        check_concurrent_payouts_never_overdraw,
        check_refused_payout_writes_nothing,
        check_payout_duplicate_out_payout_no,
        check_payout_transitions_post_the_reversal_once,
        check_payout_create_admits_in_the_same_write,
    ],
    urls: [
        check_data_survives_reopen,
        check_concurrent_first_opens,
        check_refuses_newer_schema,
        check_refund_totals_are_constrained,
        check_payout_rows_are_constrained,
    ],
}

// --- tests outside the matrix ---------------------------------------------------------------

#[test]
fn with_database_replaces_only_the_name() {
    assert_eq!(
        with_database("postgres://u@h:5432/postgres", "x"),
        "postgres://u@h:5432/x"
    );
    assert_eq!(
        with_database("postgres://u:p@h/db?sslmode=disable", "x"),
        "postgres://u:p@h/x?sslmode=disable"
    );
    assert_eq!(with_database("postgres://h", "x"), "postgres://h/x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_errors_hide_the_password() {
    // Nothing listens on port 1: the connection fails, and the error must not carry the secret.
    let err =
        match payrail_store::open("postgres://payrail:hunter2secret@127.0.0.1:1/payrail").await {
            Err(e) => e.to_string(),
            Ok(_) => panic!("connected to port 1"),
        };
    assert!(!err.contains("hunter2secret"), "{err}");
    assert!(
        err.contains("127.0.0.1:1/payrail"),
        "error does not say which database: {err}"
    );
}

#[test]
fn redact_url_hides_credentials() {
    assert_eq!(
        redact_url("postgres://u:pw@h:5432/db"),
        "postgres://***@h:5432/db"
    );
    assert_eq!(redact_url("postgres://h/db"), "postgres://h/db");
}
