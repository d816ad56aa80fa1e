//! Ledger conformance: every check runs on SQLite and, when `PAYRAIL_TEST_POSTGRES_URL` is set,
//! on a fresh PostgreSQL database (the harness is the one of `conformance.rs`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use payrail_domain::ledger::*;
use payrail_domain::posting_rules;
use payrail_domain::{Currency, MerchantId, Money, PaymentId};
use payrail_store::ledger::*;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::task::JoinSet;

const PG_URL_VAR: &str = "PAYRAIL_TEST_POSTGRES_URL";
const T0: i64 = 1_750_000_000_000;

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.finish()
}

fn cny(minor: i64) -> Money {
    Money::new(minor, Currency::CNY)
}

fn eid(s: &str) -> EntryId {
    EntryId::parse(s).unwrap()
}

fn wallet(name: &str) -> AccountId {
    AccountId::wallet(merchant(), name, Currency::CNY).unwrap()
}

fn funding() -> AccountId {
    AccountId::funding(Currency::CNY)
}

fn transfer(id: &str, from: &AccountId, to: &AccountId, minor: i64) -> Entry {
    Entry::posted(
        eid(id),
        EntryCode::Transfer,
        None,
        vec![
            Posting::debit(from.clone(), cny(minor)),
            Posting::credit(to.clone(), cny(minor)),
        ],
    )
    .unwrap()
}

async fn open(store: &DynLedgerStore, ids: &[AccountId]) {
    let specs: Vec<AccountSpec> = ids.iter().cloned().map(AccountSpec::default_for).collect();
    for o in store.open_accounts(&specs, T0).await.unwrap() {
        assert!(matches!(o, OpenOutcome::Opened | OpenOutcome::AlreadyOpen));
    }
}

async fn post1(store: &DynLedgerStore, e: &Entry, now_ms: i64) -> PostOutcome {
    let mut out = store
        .post_entries(std::slice::from_ref(e), now_ms)
        .await
        .unwrap();
    assert_eq!(out.len(), 1);
    out.remove(0)
}

/// Posted balance on the account's normal side, buffered changes included.
async fn net(store: &DynLedgerStore, id: &AccountId) -> i128 {
    store
        .get_account(id)
        .await
        .unwrap()
        .unwrap()
        .posted_net()
        .unwrap()
}

async fn assert_books_balance(store: &DynLedgerStore) -> LedgerCheck {
    let check = store.check_ledger().await.unwrap();
    assert!(check.ok(), "{check:#?}");
    check
}

async fn flush_all(store: &DynLedgerStore, now_ms: i64) {
    for _ in 0..100 {
        if store
            .flush_buffered(now_ms, FLUSH_BATCH_MAX)
            .await
            .unwrap()
            .deltas
            == 0
        {
            return;
        }
    }
    panic!("flush never finished");
}

// --- checks ----------------------------------------------------------------------------------

async fn check_open_accounts_is_idempotent(store: DynLedgerStore) {
    let w = wallet("alice");
    let spec = AccountSpec::default_for(w.clone());
    assert_eq!(
        store
            .open_accounts(std::slice::from_ref(&spec), T0)
            .await
            .unwrap(),
        vec![OpenOutcome::Opened]
    );
    assert_eq!(
        store.open_accounts(&[spec], T0).await.unwrap(),
        vec![OpenOutcome::AlreadyOpen]
    );
    let other = AccountSpec {
        id: w.clone(),
        flags: AccountFlags::NONE,
    };
    assert_eq!(
        store.open_accounts(&[other], T0).await.unwrap(),
        vec![OpenOutcome::FlagsDiffer {
            existing: AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS
        }]
    );
    let a = store.get_account(&w).await.unwrap().unwrap();
    assert_eq!(
        (a.flags, a.balance, a.version),
        (
            AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS,
            Balance::ZERO,
            0
        )
    );
    assert!(store
        .get_account(&wallet("nobody"))
        .await
        .unwrap()
        .is_none());
}

async fn check_post_replay_and_mismatch(store: DynLedgerStore) {
    let (f, a, b) = (funding(), wallet("a"), wallet("b"));
    open(&store, &[f.clone(), a.clone(), b.clone()]).await;
    let fund = transfer("fund", &f, &a, 1_000);
    let PostOutcome::Posted(first) = post1(&store, &fund, T0).await else {
        panic!("not posted")
    };
    // A replay, later: the original receipt, nothing moves.
    assert_eq!(
        post1(&store, &fund, T0 + 5_000).await,
        PostOutcome::Replayed(first)
    );
    assert_eq!(
        post1(&store, &transfer("fund", &f, &a, 999), T0).await,
        PostOutcome::Rejected(Reject::IdReusedWithDifferentBody)
    );
    assert_eq!(net(&store, &a).await, 1_000);
    let e = store.get_entry(&eid("fund")).await.unwrap().unwrap();
    assert_eq!(
        (e.seq, e.posted_at_ms, e.phase.as_str()),
        (first.seq, T0, "posted")
    );
    assert_eq!(e.body_hash, fund.body_hash().to_hex());
    let legs: Vec<(AccountId, Side, i64, Option<i64>)> = e
        .postings
        .iter()
        .map(|p| (p.account.clone(), p.side, p.amount_minor, p.account_version))
        .collect();
    assert_eq!(
        legs,
        vec![
            (f, Side::Debit, 1_000, Some(1)),
            (a, Side::Credit, 1_000, Some(1))
        ]
    );
    let check = assert_books_balance(&store).await;
    assert_eq!((check.entries, check.postings), (1, 2));
}

async fn check_refused_entries_write_nothing(store: DynLedgerStore) {
    let (f, a, b) = (funding(), wallet("a"), wallet("b"));
    open(&store, &[f.clone(), a.clone(), b.clone()]).await;
    post1(&store, &transfer("fund", &f, &a, 100), T0).await;
    let spend = transfer("spend", &a, &b, 150);
    assert_eq!(
        post1(&store, &spend, T0).await,
        PostOutcome::Rejected(Reject::ExceedsCredits(a.clone()))
    );
    let ghost = wallet("ghost");
    assert_eq!(
        post1(&store, &transfer("to-ghost", &a, &ghost, 1), T0).await,
        PostOutcome::Rejected(Reject::AccountNotFound(ghost))
    );
    assert!(store.get_entry(&eid("spend")).await.unwrap().is_none());
    assert_eq!(store.check_ledger().await.unwrap().entries, 1);
    // The id is not burnt: after a top-up the same entry goes through.
    post1(&store, &transfer("more", &f, &a, 50), T0).await;
    assert!(matches!(
        post1(&store, &spend, T0).await,
        PostOutcome::Posted(_)
    ));
    assert_eq!((net(&store, &a).await, net(&store, &b).await), (0, 150));
    assert_books_balance(&store).await;
}

async fn check_a_batch_posts_in_order(store: DynLedgerStore) {
    let (f, a, b) = (funding(), wallet("a"), wallet("b"));
    open(&store, &[f.clone(), a.clone(), b.clone()]).await;
    let batch = vec![
        transfer("1", &f, &a, 100),
        transfer("2", &a, &b, 60),  // needs 1
        transfer("3", &a, &b, 60),  // refused: 40 left
        transfer("1", &f, &a, 100), // replay of 1 in the same batch
        transfer("4", &a, &b, 40),
    ];
    let out = store.post_entries(&batch, T0).await.unwrap();
    let kinds: Vec<&str> = out
        .iter()
        .map(|o| match o {
            PostOutcome::Posted(_) => "posted",
            PostOutcome::Replayed(_) => "replayed",
            PostOutcome::Rejected(_) => "rejected",
        })
        .collect();
    assert_eq!(
        kinds,
        vec!["posted", "posted", "rejected", "replayed", "posted"]
    );
    assert_eq!(out[3], out[0].clone().replayed());
    assert_eq!((net(&store, &a).await, net(&store, &b).await), (0, 100));
    // The same batch again: every accepted entry replays, the refused one is refused again.
    let again = store.post_entries(&batch, T0 + 1).await.unwrap();
    assert!(matches!(again[2], PostOutcome::Rejected(_)));
    for i in [0, 1, 3, 4] {
        assert!(
            matches!(again[i], PostOutcome::Replayed(_)),
            "{i}: {again:?}"
        );
    }
    assert_books_balance(&store).await;
    let too_many = vec![transfer("x", &f, &a, 1); POST_BATCH_MAX + 1];
    assert!(store.post_entries(&too_many, T0).await.is_err());
}

trait Replayed {
    fn replayed(self) -> PostOutcome;
}
impl Replayed for PostOutcome {
    fn replayed(self) -> PostOutcome {
        match self {
            PostOutcome::Posted(r) => PostOutcome::Replayed(r),
            other => other,
        }
    }
}

/// Many clients debit one no-overdraft account at once: it never goes negative, exactly the
/// debits that fit are accepted, and the final balance is exact.
async fn check_concurrent_debits_never_overdraw(store: DynLedgerStore) {
    let (f, w) = (funding(), wallet("shared"));
    let sinks: Vec<AccountId> = (0..4).map(|i| wallet(&format!("sink{i}"))).collect();
    let mut all = vec![f.clone(), w.clone()];
    all.extend(sinks.iter().cloned());
    open(&store, &all).await;
    post1(&store, &transfer("fund", &f, &w, 1_000), T0).await;
    const CLIENTS: usize = 16;
    const PER_CLIENT: usize = 6;
    let mut tasks = JoinSet::new();
    for c in 0..CLIENTS {
        let (store, w, sink) = (store.clone(), w.clone(), sinks[c % sinks.len()].clone());
        tasks.spawn(async move {
            let mut accepted = 0i64;
            for i in 0..PER_CLIENT {
                // Clients alternate single entries and batches of two.
                let batch: Vec<Entry> = (0..1 + (c + i) % 2)
                    .map(|k| transfer(&format!("d-{c}-{i}-{k}"), &w, &sink, 30))
                    .collect();
                for o in store.post_entries(&batch, T0 + 1).await.unwrap() {
                    match o {
                        PostOutcome::Posted(_) => accepted += 30,
                        PostOutcome::Rejected(Reject::ExceedsCredits(_)) => {}
                        other => panic!("{other:?}"),
                    }
                }
            }
            accepted
        });
    }
    let mut accepted = 0;
    while let Some(r) = tasks.join_next().await {
        accepted += r.unwrap();
    }
    // 1,000 / 30: exactly 33 debits fit, whichever clients got them.
    assert_eq!(accepted, 990);
    let a = store.get_account(&w).await.unwrap().unwrap();
    assert_eq!(a.posted_net().unwrap(), 10);
    assert!(a.balance.breach(a.flags).is_none());
    let mut sunk = 0;
    for s in &sinks {
        sunk += net(&store, s).await;
    }
    assert_eq!(sunk, 990);
    assert_books_balance(&store).await;
}

/// The same entry sent by many clients at once is posted exactly once.
async fn check_concurrent_replays_post_once(store: DynLedgerStore) {
    let (f, a) = (funding(), wallet("a"));
    open(&store, &[f.clone(), a.clone()]).await;
    let e = transfer("once", &f, &a, 77);
    let mut tasks = JoinSet::new();
    for _ in 0..16 {
        let (store, e) = (store.clone(), e.clone());
        tasks.spawn(async move { post1(&store, &e, T0).await });
    }
    let mut receipts = Vec::new();
    let mut posted = 0;
    while let Some(r) = tasks.join_next().await {
        match r.unwrap() {
            PostOutcome::Posted(r) => {
                posted += 1;
                receipts.push(r);
            }
            PostOutcome::Replayed(r) => receipts.push(r),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(posted, 1);
    assert!(receipts.iter().all(|r| *r == receipts[0]), "{receipts:?}");
    assert_eq!(net(&store, &a).await, 77);
    assert_eq!(store.check_ledger().await.unwrap().entries, 1);
}

fn hold(id: &str, from: &AccountId, to: &AccountId, minor: i64, timeout_ms: i64) -> Entry {
    Entry::pending(
        eid(id),
        EntryCode::WalletFreeze,
        None,
        vec![
            Posting::debit(from.clone(), cny(minor)),
            Posting::credit(to.clone(), cny(minor)),
        ],
        timeout_ms,
    )
    .unwrap()
}

fn confirm(id: &str, pending: &str) -> Entry {
    Entry::post_pending(eid(id), EntryCode::WalletConfirm, None, eid(pending)).unwrap()
}

fn cancel(id: &str, pending: &str) -> Entry {
    Entry::void_pending(eid(id), EntryCode::WalletCancel, None, eid(pending)).unwrap()
}

async fn check_two_phase_post_void_and_expiry(store: DynLedgerStore) {
    let (f, a, m) = (funding(), wallet("a"), wallet("merchant"));
    open(&store, &[f.clone(), a.clone(), m.clone()]).await;
    post1(&store, &transfer("fund", &f, &a, 1_000), T0).await;
    // Try: the hold counts against the balance at once.
    assert!(matches!(
        post1(&store, &hold("h1", &a, &m, 700, 60_000), T0).await,
        PostOutcome::Posted(_)
    ));
    assert_eq!(
        post1(&store, &hold("h2", &a, &m, 301, 60_000), T0).await,
        PostOutcome::Rejected(Reject::ExceedsCredits(a.clone()))
    );
    let acct = store.get_account(&a).await.unwrap().unwrap();
    assert_eq!(acct.balance.debits_pending, 700);
    // Confirm.
    assert!(matches!(
        post1(&store, &confirm("h1:confirm", "h1"), T0 + 10).await,
        PostOutcome::Posted(_)
    ));
    assert_eq!((net(&store, &a).await, net(&store, &m).await), (300, 700));
    let h1 = store.get_entry(&eid("h1")).await.unwrap().unwrap();
    let hold_rec = h1.hold.unwrap();
    assert_eq!(
        (hold_rec.state, hold_rec.resolved_by),
        (HoldState::Posted, Some(eid("h1:confirm")))
    );
    assert_eq!(
        post1(&store, &cancel("h1:cancel", "h1"), T0 + 11).await,
        PostOutcome::Rejected(Reject::PendingAlreadyPosted(eid("h1")))
    );
    // Cancel.
    post1(&store, &hold("h3", &a, &m, 100, 60_000), T0).await;
    assert!(matches!(
        post1(&store, &cancel("h3:cancel", "h3"), T0 + 1).await,
        PostOutcome::Posted(_)
    ));
    assert_eq!(
        store
            .get_account(&a)
            .await
            .unwrap()
            .unwrap()
            .balance
            .debits_pending,
        0
    );
    // Expiry: nothing due before the deadline, released at it.
    post1(&store, &hold("h4", &a, &m, 200, 1_000), T0).await;
    post1(&store, &hold("h5", &a, &m, 50, 5_000), T0).await;
    assert!(store.expire_holds(T0 + 999, 100).await.unwrap().is_empty());
    assert_eq!(
        store.expire_holds(T0 + 1_000, 100).await.unwrap(),
        vec![eid("h4")]
    );
    let acct = store.get_account(&a).await.unwrap().unwrap();
    assert_eq!(
        (acct.balance.debits_pending, acct.posted_net().unwrap()),
        (50, 300)
    );
    assert_eq!(
        post1(&store, &confirm("h4:confirm", "h4"), T0 + 1_001).await,
        PostOutcome::Rejected(Reject::PendingExpired(eid("h4")))
    );
    // A confirm that arrives after the deadline but before the sweep is refused too, and the
    // hold is released.
    assert_eq!(
        post1(&store, &confirm("h5:confirm", "h5"), T0 + 5_000).await,
        PostOutcome::Rejected(Reject::PendingExpired(eid("h5")))
    );
    assert_eq!(
        store
            .get_account(&a)
            .await
            .unwrap()
            .unwrap()
            .balance
            .debits_pending,
        0
    );
    assert_books_balance(&store).await;
}

/// A confirm and a cancel of one hold racing: exactly one wins.
async fn check_concurrent_confirm_and_cancel_one_wins(store: DynLedgerStore) {
    let (f, a, m) = (funding(), wallet("a"), wallet("m"));
    open(&store, &[f.clone(), a.clone(), m.clone()]).await;
    post1(&store, &transfer("fund", &f, &a, 10_000), T0).await;
    for round in 0..8 {
        let h = format!("h{round}");
        post1(&store, &hold(&h, &a, &m, 100, 60_000), T0).await;
        let mut tasks = JoinSet::new();
        for k in 0..4 {
            let e = if k % 2 == 0 {
                confirm(&format!("{h}:confirm{k}"), &h)
            } else {
                cancel(&format!("{h}:cancel{k}"), &h)
            };
            let store = store.clone();
            tasks.spawn(async move { post1(&store, &e, T0 + 1).await });
        }
        let mut winners = 0;
        while let Some(r) = tasks.join_next().await {
            if matches!(r.unwrap(), PostOutcome::Posted(_)) {
                winners += 1;
            }
        }
        assert_eq!(winners, 1, "round {round}");
    }
    assert_eq!(
        store
            .get_account(&a)
            .await
            .unwrap()
            .unwrap()
            .balance
            .debits_pending,
        0
    );
    assert_books_balance(&store).await;
}

/// The balance at any past time: before the first posting, between postings, across several
/// history checkpoints, and now.
async fn check_balance_at_past_times(store: DynLedgerStore) {
    let (f, a, b) = (funding(), wallet("a"), wallet("b"));
    open(&store, &[f.clone(), a.clone(), b.clone()]).await;
    let n = 2 * HISTORY_CHECKPOINT_EVERY + 37;
    let mut entries = Vec::new();
    let mut expected: Vec<(i64, i64)> = Vec::new(); // (time, a's net credit after)
    let mut bal = 0i64;
    for i in 0..n {
        // Every third entry spends, the others fund; each at its own time, 10 ms apart.
        let e = if i % 3 == 2 {
            bal -= 5;
            transfer(&format!("e{i}"), &a, &b, 5)
        } else {
            bal += 7;
            transfer(&format!("e{i}"), &f, &a, 7)
        };
        entries.push((e, T0 + 10 * i));
        expected.push((T0 + 10 * i, bal));
    }
    // Posted in batches of varying size, each batch at its entries' times.
    for (e, at) in &entries {
        post1(&store, e, *at).await;
    }
    let credit_net = |b: Balance| b.credits_posted - b.debits_posted;
    assert_eq!(
        store.balance_at(&a, T0 - 1).await.unwrap(),
        Some(Balance::ZERO)
    );
    for (at, want) in expected.iter().step_by(7) {
        let got = store.balance_at(&a, *at).await.unwrap().unwrap();
        assert_eq!(credit_net(got), *want, "at {at}");
        // Just before the next posting: still the same.
        let got = store.balance_at(&a, at + 9).await.unwrap().unwrap();
        assert_eq!(credit_net(got), *want, "at {at} + 9");
    }
    let now = store.balance_at(&a, i64::MAX).await.unwrap().unwrap();
    assert_eq!(i128::from(credit_net(now)), net(&store, &a).await);
    assert_eq!(store.balance_at(&wallet("nobody"), T0).await.unwrap(), None);
}

fn merchant() -> MerchantId {
    MerchantId::generate(T0 as u64, [7; 10])
}

fn fee_plan() -> payrail_domain::fees::FeePlan {
    use payrail_domain::fees::*;
    FeePlan::new(FeePlanSpec {
        currency: Currency::CNY,
        rate_bps: 60,
        fixed_minor: 0,
        min_minor: 0,
        max_minor: None,
        channel_cost_bps: 25,
        channel_cost_fixed_minor: 0,
        fee_refund: FeeRefundPolicy::Proportional,
        channel_cost_refund: FeeRefundPolicy::Proportional,
    })
    .unwrap()
}

/// The platform fee and channel accounts get nearly every posting. Payments posted by
/// concurrent clients, with a flusher running alongside: after every flush the hot accounts'
/// counters are exact, and the books balance.
async fn check_hot_accounts_exact_after_every_flush(store: DynLedgerStore) {
    let m = merchant();
    let c = Currency::CNY;
    let fee = AccountId::platform_fee(c);
    let clearing = AccountId::channel_clearing("sandbox", c).unwrap();
    let cost = AccountId::channel_cost("sandbox", c).unwrap();
    let pending = AccountId::merchant_pending(m, c);
    open(
        &store,
        &[fee.clone(), clearing.clone(), cost.clone(), pending.clone()],
    )
    .await;
    let plan = fee_plan();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flusher = {
        let (store, stop) = (store.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                store.flush_buffered(T0, 7).await.unwrap();
                tokio::task::yield_now().await;
            }
        })
    };
    let (mut fee_sum, mut cost_sum, mut clearing_sum, mut net_sum) = (0i128, 0i128, 0i128, 0i128);
    for round in 0..4u8 {
        let mut tasks = JoinSet::new();
        for client in 0..6u8 {
            let mut batch = Vec::new();
            for k in 0..5u8 {
                let amount = 1_000 + i64::from(round) * 100 + i64::from(client) * 10 + i64::from(k);
                let q = plan.quote(cny(amount)).unwrap();
                fee_sum += i128::from(q.fee.amount_minor());
                cost_sum += i128::from(q.channel_cost.amount_minor());
                clearing_sum += i128::from(amount - q.channel_cost.amount_minor());
                net_sum += i128::from(q.net.amount_minor());
                let pay = PaymentId::generate(T0 as u64, [round, client, k, 0, 0, 0, 0, 0, 0, 1]);
                batch.push(posting_rules::payment_succeeded(pay, m, "sandbox", &q).unwrap());
            }
            let store = store.clone();
            tasks.spawn(async move {
                for o in store.post_entries(&batch, T0).await.unwrap() {
                    assert!(matches!(o, PostOutcome::Posted(_)), "{o:?}");
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        // Counters including unflushed deltas are exact at any time…
        assert_eq!(net(&store, &fee).await, fee_sum);
        // …and after a flush the account rows themselves are, with nothing left buffered.
        flush_all(&store, T0).await;
        for (id, want) in [
            (&fee, fee_sum),
            (&cost, cost_sum),
            (&clearing, clearing_sum),
            (&pending, net_sum),
        ] {
            let a = store.get_account(id).await.unwrap().unwrap();
            assert_eq!(a.buffered, Balance::ZERO, "{id} after flush");
            assert_eq!(
                a.balance.posted_net(id.kind().normal_side()),
                want,
                "{id} after flush, round {round}"
            );
        }
        let check = assert_books_balance(&store).await;
        assert_eq!(check.unflushed, 0);
        assert_eq!(check.entries, 30 * (i64::from(round) + 1));
        // The balance history of a hot account, read at the flush time, is the flushed balance.
        let at = store.balance_at(&fee, T0).await.unwrap().unwrap();
        assert_eq!(at.credits_posted - at.debits_posted, fee_sum as i64);
    }
    stop.store(true, Ordering::Relaxed);
    flusher.await.unwrap();
}

/// A hold on a buffered account, released after the hold's delta was flushed, or before it.
async fn check_holds_on_hot_accounts_release_exactly(store: DynLedgerStore) {
    let m = merchant();
    let c = Currency::CNY;
    let (f, w) = (funding(), wallet("payer"));
    let fee = AccountId::platform_fee(c);
    let pending = AccountId::merchant_pending(m, c);
    open(
        &store,
        &[f.clone(), w.clone(), fee.clone(), pending.clone()],
    )
    .await;
    post1(&store, &transfer("fund", &f, &w, 100_000), T0).await;
    let q = fee_plan().quote(cny(10_000)).unwrap();
    for (n, flush_between, confirm_it) in [(1u8, true, false), (2, false, false), (3, true, true)] {
        let pay = PaymentId::generate(T0 as u64, [n; 10]);
        let freeze = posting_rules::wallet_freeze(pay, "payer", m, &q, 60_000).unwrap();
        assert!(matches!(
            post1(&store, &freeze, T0).await,
            PostOutcome::Posted(_)
        ));
        if flush_between {
            flush_all(&store, T0).await;
        }
        let resolve = if confirm_it {
            posting_rules::wallet_confirm(pay).unwrap()
        } else {
            posting_rules::wallet_cancel(pay).unwrap()
        };
        assert!(matches!(
            post1(&store, &resolve, T0 + 1).await,
            PostOutcome::Posted(_)
        ));
        flush_all(&store, T0 + 1).await;
        assert_books_balance(&store).await;
    }
    let fee_acct = store.get_account(&fee).await.unwrap().unwrap();
    assert_eq!(fee_acct.balance.credits_pending, 0);
    assert_eq!(
        fee_acct.posted_net().unwrap(),
        i128::from(q.fee.amount_minor())
    );
    assert_eq!(
        net(&store, &pending).await,
        i128::from(q.net.amount_minor())
    );
}

/// Payments, partial refunds, settlement, a refund after settlement, a payout, and wallet
/// payments, through the store: the books balance at every step.
async fn check_lifecycle_balances(store: DynLedgerStore) {
    use posting_rules::*;
    let m = merchant();
    let c = Currency::CNY;
    let accounts = [
        AccountId::merchant_pending(m, c),
        AccountId::merchant_available(m, c),
        AccountId::payout_clearing(m, c),
        AccountId::platform_fee(c),
        AccountId::funding(c),
        AccountId::channel_clearing("sandbox", c).unwrap(),
        AccountId::channel_cost("sandbox", c).unwrap(),
        wallet("alice"),
    ];
    open(&store, &accounts).await;
    let plan = fee_plan();
    let pay = |n: u8| PaymentId::generate(T0 as u64, [n; 10]);
    let q = plan.quote(cny(10_000)).unwrap();
    let steps = vec![
        payment_succeeded(pay(1), m, "sandbox", &q).unwrap(),
        refund(
            &"ref_1",
            pay(1),
            m,
            "sandbox",
            &plan.refund_quote(&q, cny(0), cny(2_500)).unwrap(),
            RefundSource::Pending,
        )
        .unwrap(),
        settlement(
            m,
            payrail_domain::civil::Date::parse("2026-11-22").unwrap(),
            cny(7_455),
        )
        .unwrap(),
        refund(
            &"ref_2",
            pay(1),
            m,
            "sandbox",
            &plan.refund_quote(&q, cny(2_500), cny(1_000)).unwrap(),
            RefundSource::Available,
        )
        .unwrap(),
        payout(&"po_1", m, cny(6_000)).unwrap(),
        wallet_top_up(&"tu_1", m, "alice", cny(5_000), &TopUpSource::Operator).unwrap(),
        wallet_freeze(pay(2), "alice", m, &plan.quote(cny(3_000)).unwrap(), 60_000).unwrap(),
        wallet_confirm(pay(2)).unwrap(),
    ];
    for (i, e) in steps.iter().enumerate() {
        assert!(
            matches!(
                post1(&store, e, T0 + i as i64).await,
                PostOutcome::Posted(_)
            ),
            "step {i}: {e:?}"
        );
        flush_all(&store, T0 + i as i64).await;
        assert_books_balance(&store).await;
    }
    // 100.00 paid (fee 0.60), 25.00 refunded from pending (fee back 0.15): 74.55 pending.
    // Settled; 10.00 refunded from available (fee back 0.06): 64.61; 60.00 paid out: 4.61.
    assert_eq!(net(&store, &accounts[0]).await, 30 * 100 - 18);
    assert_eq!(net(&store, &accounts[1]).await, 461);
    assert_eq!(net(&store, &accounts[2]).await, 6_000);
    assert_eq!(net(&store, &wallet("alice")).await, 2_000);
    // Replaying every step changes nothing.
    let again = store.post_entries(&steps, T0 + 100).await.unwrap();
    assert!(
        again.iter().all(|o| matches!(o, PostOutcome::Replayed(_))),
        "{again:?}"
    );
    let tb = store.trial_balance().await.unwrap();
    let debits: i128 = tb.iter().map(|r| r.debits_posted).sum();
    let credits: i128 = tb.iter().map(|r| r.credits_posted).sum();
    assert_eq!(debits, credits);
    assert!(tb
        .iter()
        .any(|r| r.kind == AccountKind::PlatformFee && r.accounts == 1));
}

/// Entries and postings cannot be edited or deleted, even with raw SQL.
async fn check_entries_are_immutable(url: String) {
    let store = payrail_store::ledger::open_ledger(&url).await.unwrap();
    let (f, a) = (funding(), wallet("a"));
    open(&store, &[f.clone(), a.clone()]).await;
    post1(&store, &transfer("e", &f, &a, 5), T0).await;
    drop(store);
    for sql in [
        "UPDATE ledger_entries SET posted_at_ms = 0",
        "DELETE FROM ledger_entries",
        "UPDATE ledger_postings SET amount_minor = 6",
        "DELETE FROM ledger_postings",
    ] {
        let err = raw_execute(&url, sql).await;
        assert!(err.is_some(), "{sql} succeeded");
        assert!(err.unwrap().contains("immutable"), "{sql}");
    }
    let store = payrail_store::ledger::open_ledger(&url).await.unwrap();
    assert_eq!(net(&store, &a).await, 5);
    assert_books_balance(&store).await;
}

/// A ledger survives a restart: balances, holds and replays.
async fn check_ledger_survives_reopen(url: String) {
    let (f, a, m) = (funding(), wallet("a"), wallet("m"));
    let receipt = {
        let store = payrail_store::ledger::open_ledger(&url).await.unwrap();
        open(&store, &[f.clone(), a.clone(), m.clone()]).await;
        let out = post1(&store, &transfer("fund", &f, &a, 500), T0).await;
        post1(&store, &hold("h", &a, &m, 200, 60_000), T0).await;
        out
    };
    let store = payrail_store::ledger::open_ledger(&url).await.unwrap();
    assert_eq!(
        post1(&store, &transfer("fund", &f, &a, 500), T0).await,
        receipt.replayed()
    );
    assert!(matches!(
        post1(&store, &confirm("h:c", "h"), T0 + 1).await,
        PostOutcome::Posted(_)
    ));
    assert_eq!(net(&store, &m).await, 200);
    assert_books_balance(&store).await;
}

/// Runs one SQL statement on a fresh connection; `Some(error)` if it failed.
async fn raw_execute(url: &str, sql: &str) -> Option<String> {
    if url.starts_with("postgres") {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client.batch_execute(sql).await.err().map(|e| {
            e.as_db_error()
                .map(|d| d.message().to_string())
                .unwrap_or_else(|| e.to_string())
        })
    } else {
        let path = url.strip_prefix("sqlite://").unwrap().to_string();
        let sql = sql.to_string();
        tokio::task::spawn_blocking(move || {
            let c = rusqlite::Connection::open(path).unwrap();
            c.execute_batch(&sql).err().map(|e| e.to_string())
        })
        .await
        .unwrap()
    }
}

// --- backends (as in conformance.rs) ---------------------------------------------------------

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
        "payrail-ledger-{name}-{}-{:016x}",
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
    let db = format!("payrail_ledger_{:016x}", rand_u64());
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

async fn open_store(url: &str) -> DynLedgerStore {
    payrail_store::ledger::open_ledger(url).await.unwrap()
}

macro_rules! ledger_conformance {
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
                        assert_eq!(store.ledger_backend(), "postgres");
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

ledger_conformance! {
    stores: [
        check_open_accounts_is_idempotent,
        check_post_replay_and_mismatch,
        check_refused_entries_write_nothing,
        check_a_batch_posts_in_order,
        check_concurrent_debits_never_overdraw,
        check_concurrent_replays_post_once,
        check_two_phase_post_void_and_expiry,
        check_concurrent_confirm_and_cancel_one_wins,
        check_balance_at_past_times,
        check_hot_accounts_exact_after_every_flush,
        check_holds_on_hot_accounts_release_exactly,
        check_lifecycle_balances,
    ],
    urls: [
        check_entries_are_immutable,
        check_ledger_survives_reopen,
    ],
}
