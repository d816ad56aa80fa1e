use super::*;
use proptest::prelude::*;

const T0: i64 = 1_750_000_000_000;

fn cny(minor: i64) -> Money {
    Money::new(minor, Currency::CNY)
}

/// A test merchant's end user's wallet: the generic limited account of these tests.
fn wallet(name: &str) -> AccountId {
    AccountId::wallet(MerchantId::generate(1, [7; 10]), name, Currency::CNY).unwrap()
}

fn eid(s: &str) -> EntryId {
    EntryId::parse(s).unwrap()
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

/// A book with a funding account and two wallets, `alice` holding `alice_minor`.
fn book_with_alice(alice_minor: i64) -> (Book, AccountId, AccountId, AccountId) {
    let mut b = Book::default();
    let (f, a, bob) = (
        AccountId::funding(Currency::CNY),
        wallet("alice"),
        wallet("bob"),
    );
    for id in [&f, &a, &bob] {
        b.put_account(id.clone(), AccountState::new(id.kind().default_flags()));
    }
    if alice_minor > 0 {
        let out = b
            .post(&transfer("fund-alice", &f, &a, alice_minor), T0)
            .unwrap();
        assert!(matches!(out, PostOutcome::Posted(_)));
    }
    (b, f, a, bob)
}

fn posted(b: &Book, id: &AccountId) -> i128 {
    b.account(id)
        .unwrap()
        .balance
        .posted_net(id.kind().normal_side())
}

// --- construction ----------------------------------------------------------------------------

#[test]
fn entries_refuse_bad_postings() {
    let (a, b) = (wallet("a"), wallet("b"));
    let usd = AccountId::wallet(MerchantId::generate(1, [7; 10]), "u", Currency::USD).unwrap();
    let cases: Vec<(Vec<Posting>, &str)> = vec![
        (
            vec![
                Posting::debit(a.clone(), cny(100)),
                Posting::credit(b.clone(), cny(99)),
            ],
            "unbalanced",
        ),
        (
            vec![
                Posting::debit(a.clone(), cny(0)),
                Posting::credit(b.clone(), cny(0)),
            ],
            "zero",
        ),
        (
            vec![
                Posting::debit(a.clone(), cny(-5)),
                Posting::credit(b.clone(), cny(-5)),
            ],
            "negative",
        ),
        (
            vec![
                Posting::debit(a.clone(), cny(5)),
                Posting::credit(usd.clone(), Money::new(5, Currency::USD)),
            ],
            "mixed currencies",
        ),
        (
            vec![
                Posting::debit(a.clone(), Money::new(5, Currency::USD)),
                Posting::credit(b.clone(), Money::new(5, Currency::USD)),
            ],
            "amount not in the account's currency",
        ),
        (vec![Posting::debit(a.clone(), cny(5))], "one posting"),
        (vec![], "no postings"),
        (
            vec![
                Posting::debit(a.clone(), cny(5)),
                Posting::credit(a.clone(), cny(5)),
            ],
            "same account both sides",
        ),
        (
            (0..17)
                .map(|i| {
                    if i < 16 {
                        Posting::debit(wallet(&format!("w{i}")), cny(1))
                    } else {
                        Posting::credit(b.clone(), cny(16))
                    }
                })
                .collect(),
            "too many postings",
        ),
    ];
    for (postings, why) in cases {
        assert!(
            Entry::posted(eid("e"), EntryCode::Transfer, None, postings).is_err(),
            "{why} was accepted"
        );
    }
    // Multi-leg, balanced: fine.
    assert!(Entry::posted(
        eid("ok"),
        EntryCode::Transfer,
        None,
        vec![
            Posting::debit(a.clone(), cny(100)),
            Posting::credit(b.clone(), cny(60)),
            Posting::credit(wallet("c"), cny(40)),
        ],
    )
    .is_ok());
    for timeout in [0, -1, PENDING_TIMEOUT_MS_MAX + 1] {
        assert!(Entry::pending(
            eid("p"),
            EntryCode::WalletFreeze,
            None,
            vec![
                Posting::debit(a.clone(), cny(1)),
                Posting::credit(b.clone(), cny(1))
            ],
            timeout
        )
        .is_err());
    }
}

#[test]
fn ids_parse_and_print() {
    let m = MerchantId::generate(1, [9; 10]);
    let id = AccountId::merchant_pending(m, Currency::CNY);
    assert_eq!(AccountId::parse(&id.to_string()).unwrap(), id);
    assert_eq!(id.owner(), m.to_string());
    assert_eq!(id.kind(), AccountKind::MerchantPending);
    // A wallet is named by its merchant and the end user's id.
    let bob = MerchantId::generate(1, [7; 10]);
    assert_eq!(wallet("bob").owner(), format!("{bob}.bob"));
    assert_eq!(wallet("bob").wallet_holder(), Some("bob"));
    assert_eq!(AccountId::suspense(Currency::CNY).wallet_holder(), None);
    assert_eq!(wallet("bob").to_string(), format!("wallet:{bob}.bob:CNY"));
    assert!(AccountId::wallet(bob, &"x".repeat(WALLET_HOLDER_LEN_MAX), Currency::CNY).is_ok());
    for holder in ["", "al ice", "a:b", &"x".repeat(WALLET_HOLDER_LEN_MAX + 1)] {
        assert!(
            AccountId::wallet(bob, holder, Currency::CNY).is_err(),
            "{holder:?}"
        );
    }
    assert_eq!(AccountId::parse("wallet:bob:JPY").unwrap().owner(), "bob");
    assert_eq!(
        AccountId::platform_fee(Currency::USD).to_string(),
        "platform_fee:platform:USD"
    );
    for bad in [
        "",
        "wallet:alice",
        "wallet:alice:cny",
        "nope:alice:CNY",
        "wallet::CNY",
        "wallet:al ice:CNY",
        "wallet:a:b:CNY",
    ] {
        assert!(AccountId::parse(bad).is_err(), "{bad}");
    }
    for bad in ["", "a b", &"x".repeat(ENTRY_ID_LEN_MAX + 1), "é"] {
        assert!(EntryId::parse(bad).is_err(), "{bad}");
    }
    assert!(EntryId::parse("pay_01JD:captured").is_ok());
}

#[test]
fn flags_refuse_bad_combinations() {
    assert!(AccountFlags::from_bits(8).is_err());
    assert!(AccountFlags::from_bits(3).is_err());
    assert!(AccountFlags::from_bits(5).is_err());
    assert!(AccountFlags::from_bits(6).is_err());
    for kind in AccountKind::ALL {
        let f = kind.default_flags();
        assert_eq!(AccountFlags::from_bits(f.bits()).unwrap(), f, "{kind}");
    }
}

#[test]
fn body_hash_covers_everything_but_the_id() {
    let (a, b) = (wallet("a"), wallet("b"));
    let base = transfer("x", &a, &b, 100);
    assert_eq!(base.body_hash(), transfer("y", &a, &b, 100).body_hash());
    let different = [
        transfer("x", &a, &b, 101),
        transfer("x", &b, &a, 100),
        transfer("x", &a, &wallet("c"), 100),
        Entry::posted(eid("x"), EntryCode::Refund, None, base.postings().to_vec()).unwrap(),
        Entry::posted(
            eid("x"),
            EntryCode::Transfer,
            Some("ref"),
            base.postings().to_vec(),
        )
        .unwrap(),
        hold("x", &a, &b, 100, 1_000),
        hold("x", &a, &b, 100, 1_001),
    ];
    for d in different {
        assert_ne!(base.body_hash(), d.body_hash(), "{d:?}");
    }
    let h = base.body_hash();
    assert_eq!(BodyHash::from_hex(&h.to_hex()), Some(h));
}

// --- posting ---------------------------------------------------------------------------------

#[test]
fn replay_returns_the_original_and_a_different_body_is_refused() {
    let (mut b, _, a, bob) = book_with_alice(1_000);
    let e = transfer("t1", &a, &bob, 300);
    let PostOutcome::Posted(first) = b.post(&e, T0 + 1).unwrap() else {
        panic!("not posted")
    };
    // Later, same id and body: the original receipt, nothing moves.
    assert_eq!(b.post(&e, T0 + 99).unwrap(), PostOutcome::Replayed(first));
    assert_eq!(posted(&b, &a), 700);
    assert_eq!(
        b.post(&transfer("t1", &a, &bob, 301), T0 + 2).unwrap(),
        PostOutcome::Rejected(Reject::IdReusedWithDifferentBody)
    );
    assert_eq!(posted(&b, &bob), 300);
}

#[test]
fn no_overdraft_refuses_and_writes_nothing() {
    let (mut b, _, a, bob) = book_with_alice(1_000);
    b.take_changes();
    assert_eq!(
        b.post(&transfer("t", &a, &bob, 1_001), T0).unwrap(),
        PostOutcome::Rejected(Reject::ExceedsCredits(a.clone()))
    );
    assert_eq!(b.take_changes(), Changes::default());
    assert_eq!(posted(&b, &a), 1_000);
    // Exactly the balance is fine, and a refusal does not burn the id.
    assert!(matches!(
        b.post(&transfer("t", &a, &bob, 1_000), T0).unwrap(),
        PostOutcome::Posted(_)
    ));
    assert_eq!(posted(&b, &a), 0);
}

#[test]
fn a_credit_is_never_refused_by_a_debit_limit() {
    let (mut b, f, a, _) = book_with_alice(0);
    assert!(matches!(
        b.post(&transfer("in", &f, &a, 5), T0).unwrap(),
        PostOutcome::Posted(_)
    ));
}

#[test]
fn unknown_accounts_are_refused() {
    let (mut b, _, a, _) = book_with_alice(100);
    let ghost = wallet("ghost");
    assert_eq!(
        b.post(&transfer("t", &a, &ghost, 1), T0).unwrap(),
        PostOutcome::Rejected(Reject::AccountNotFound(ghost))
    );
}

#[test]
fn two_phase_post_void_and_expiry() {
    let (mut b, _, a, bob) = book_with_alice(1_000);
    let timeout = 60_000;
    // A hold counts against the balance at once.
    assert!(matches!(
        b.post(&hold("h1", &a, &bob, 600, timeout), T0).unwrap(),
        PostOutcome::Posted(_)
    ));
    let alice = b.account(&a).unwrap().balance;
    assert_eq!(
        (alice.debits_pending, alice.available(Side::Credit)),
        (600, 400)
    );
    assert_eq!(
        b.post(&hold("h2", &a, &bob, 401, timeout), T0).unwrap(),
        PostOutcome::Rejected(Reject::ExceedsCredits(a.clone()))
    );
    // Confirm: pending becomes posted.
    let confirm =
        Entry::post_pending(eid("h1:post"), EntryCode::WalletConfirm, None, eid("h1")).unwrap();
    assert!(matches!(
        b.post(&confirm, T0 + 1).unwrap(),
        PostOutcome::Posted(_)
    ));
    assert_eq!(b.account(&a).unwrap().balance.debits_pending, 0);
    assert_eq!(posted(&b, &a), 400);
    assert_eq!(posted(&b, &bob), 600);
    assert_eq!(b.hold(&eid("h1")).unwrap().state, HoldState::Posted);
    // A second confirm under another id, or a cancel, is refused; the same confirm replays.
    let again =
        Entry::post_pending(eid("h1:post2"), EntryCode::WalletConfirm, None, eid("h1")).unwrap();
    assert_eq!(
        b.post(&again, T0 + 2).unwrap(),
        PostOutcome::Rejected(Reject::PendingAlreadyPosted(eid("h1")))
    );
    let cancel =
        Entry::void_pending(eid("h1:void"), EntryCode::WalletCancel, None, eid("h1")).unwrap();
    assert_eq!(
        b.post(&cancel, T0 + 2).unwrap(),
        PostOutcome::Rejected(Reject::PendingAlreadyPosted(eid("h1")))
    );
    assert!(matches!(
        b.post(&confirm, T0 + 3).unwrap(),
        PostOutcome::Replayed(_)
    ));

    // Void: the hold is released.
    b.post(&hold("h3", &a, &bob, 100, timeout), T0).unwrap();
    let void =
        Entry::void_pending(eid("h3:void"), EntryCode::WalletCancel, None, eid("h3")).unwrap();
    assert!(matches!(
        b.post(&void, T0 + 5).unwrap(),
        PostOutcome::Posted(_)
    ));
    assert_eq!(b.account(&a).unwrap().balance.debits_pending, 0);
    assert_eq!(posted(&b, &a), 400);

    // Expiry: a confirm at or after the deadline is refused and releases the hold.
    b.post(&hold("h4", &a, &bob, 400, timeout), T0).unwrap();
    let late =
        Entry::post_pending(eid("h4:post"), EntryCode::WalletConfirm, None, eid("h4")).unwrap();
    assert_eq!(
        b.post(&late, T0 + timeout).unwrap(),
        PostOutcome::Rejected(Reject::PendingExpired(eid("h4")))
    );
    assert_eq!(b.hold(&eid("h4")).unwrap().state, HoldState::Expired);
    assert_eq!(b.account(&a).unwrap().balance.debits_pending, 0);
    // The sweep expires holds whose time is up, oldest first, and only those.
    b.post(&hold("h5", &a, &bob, 10, 1_000), T0).unwrap();
    b.post(&hold("h6", &a, &bob, 10, 5_000), T0).unwrap();
    assert_eq!(b.expire_due(T0 + 999, 10).unwrap(), Vec::<EntryId>::new());
    assert_eq!(b.expire_due(T0 + 1_000, 10).unwrap(), vec![eid("h5")]);
    assert_eq!(b.account(&a).unwrap().balance.debits_pending, 10);
    assert_eq!(
        b.post(
            &Entry::post_pending(eid("x"), EntryCode::WalletConfirm, None, eid("nope")).unwrap(),
            T0
        )
        .unwrap(),
        PostOutcome::Rejected(Reject::PendingNotFound(eid("nope")))
    );
    assert_eq!(b.net_by_currency()[&Currency::CNY], (0, 0));
}

#[test]
fn history_links_every_posting_of_an_account() {
    let (mut b, f, a, bob) = book_with_alice(1_000);
    b.take_changes();
    b.post(&transfer("t1", &a, &bob, 10), T0 + 10).unwrap();
    // An earlier `now` than the account's last posting does not move its history backwards.
    b.post(&transfer("t2", &a, &bob, 20), T0 + 5).unwrap();
    b.post(&transfer("t3", &f, &a, 5), T0 + 20).unwrap();
    let changes = b.take_changes();
    let alice: Vec<&PostingRecord> = changes
        .entries
        .iter()
        .flat_map(|e| e.postings.iter())
        .filter(|p| p.account == a)
        .collect();
    let versions: Vec<i64> = alice.iter().map(|p| p.account_version).collect();
    assert_eq!(versions, vec![2, 3, 4]);
    let times: Vec<i64> = alice.iter().map(|p| p.posted_at_ms).collect();
    assert_eq!(times, vec![T0 + 10, T0 + 10, T0 + 20]);
    let nets: Vec<i64> = alice
        .iter()
        .map(|p| p.credits_posted_after - p.debits_posted_after)
        .collect();
    assert_eq!(nets, vec![990, 970, 975]);
    assert_eq!(alice[1].prev, Some(alice[0].at));
    assert_eq!(alice[2].prev, Some(alice[1].at));
    assert_eq!(b.account(&a).unwrap().last_posting, Some(alice[2].at));
}

#[test]
fn sequence_numbers_are_used_only_by_accepted_entries() {
    let (a, bob) = (wallet("alice"), wallet("bob"));
    let mut b = Book::with_seqs(vec![70, 90]);
    for id in [&a, &bob] {
        b.put_account(id.clone(), AccountState::new(AccountFlags::NONE));
    }
    let r1 = b.post(&transfer("1", &a, &bob, 1), T0).unwrap();
    let mut limited = AccountState::new(AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS);
    limited.balance.credits_posted = 0;
    b.put_account(wallet("poor"), limited);
    let refused = b
        .post(&transfer("2", &wallet("poor"), &bob, 1), T0)
        .unwrap();
    assert!(matches!(refused, PostOutcome::Rejected(_)));
    let r3 = b.post(&transfer("3", &a, &bob, 1), T0).unwrap();
    assert_eq!(
        (r1, r3),
        (
            PostOutcome::Posted(Receipt {
                seq: 70,
                posted_at_ms: T0
            }),
            PostOutcome::Posted(Receipt {
                seq: 90,
                posted_at_ms: T0
            })
        )
    );
    assert_eq!(
        b.post(&transfer("4", &a, &bob, 1), T0),
        Err(BookError::OutOfSequenceNumbers)
    );
}

/// A deferred account (a hot account on PostgreSQL) tracks only this book's change: releasing a
/// hold made in an earlier batch takes its pending counter below zero instead of failing.
#[test]
fn deferred_accounts_track_changes() {
    let (mut b, _, a, _) = book_with_alice(1_000);
    let fee = AccountId::platform_fee(Currency::CNY);
    b.put_account(fee.clone(), AccountState::new(AccountFlags::BUFFERED));
    let freeze = Entry::pending(
        eid("h"),
        EntryCode::WalletFreeze,
        None,
        vec![
            Posting::debit(a.clone(), cny(100)),
            Posting::credit(fee.clone(), cny(100)),
        ],
        1_000,
    )
    .unwrap();
    assert!(matches!(
        b.post(&freeze, T0).unwrap(),
        PostOutcome::Posted(_)
    ));
    // A later batch: the fee account is loaded deferred, with a zero change so far.
    let hold = b.hold(&eid("h")).unwrap().clone();
    let alice = b.account(&a).unwrap().clone();
    let mut later = Book::new(100);
    later.put_account(a.clone(), alice);
    later.put_account(fee.clone(), AccountState::deferred(AccountFlags::BUFFERED));
    later.put_hold(eid("h"), hold);
    let void = Entry::void_pending(eid("v"), EntryCode::WalletCancel, None, eid("h")).unwrap();
    assert!(matches!(
        later.post(&void, T0 + 1).unwrap(),
        PostOutcome::Posted(_)
    ));
    let change = later.account(&fee).unwrap().balance;
    assert_eq!(
        change,
        Balance {
            credits_pending: -100,
            ..Balance::ZERO
        }
    );
    // Applying the change to the stored counters gives what one book would have.
    let mut whole = b.clone();
    whole.post(&void, T0 + 1).unwrap();
    assert_eq!(
        b.account(&fee).unwrap().balance.checked_add(change),
        Some(whole.account(&fee).unwrap().balance)
    );
}

// --- property tests: a model of concurrent clients ---------------------------------------------

/// One client's request.
#[derive(Debug, Clone)]
enum Op {
    Transfer {
        from: usize,
        to: usize,
        minor: i64,
    },
    Hold {
        from: usize,
        to: usize,
        minor: i64,
        timeout_ms: i64,
    },
    Resolve {
        nth_hold: usize,
        post: bool,
    },
    Replay {
        nth: usize,
    },
    Tick {
        ms: i64,
    },
    Expire,
}

const ACCOUNTS: usize = 6;

/// Accounts 0..2 are limited wallets, 3 a funding account (unlimited), 4 a buffered fee
/// account, 5 a credit-limited clearing account.
fn model_account(i: usize) -> (AccountId, AccountFlags) {
    match i {
        0..=2 => (
            wallet(&format!("w{i}")),
            AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS,
        ),
        3 => (AccountId::funding(Currency::CNY), AccountFlags::NONE),
        4 => (
            AccountId::platform_fee(Currency::CNY),
            AccountFlags::BUFFERED,
        ),
        _ => (
            AccountId::suspense(Currency::CNY),
            AccountFlags::CREDITS_MUST_NOT_EXCEED_DEBITS,
        ),
    }
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..ACCOUNTS, 0..ACCOUNTS, 1i64..500).prop_map(|(from, to, minor)| Op::Transfer { from, to, minor }),
        3 => (0..ACCOUNTS, 0..ACCOUNTS, 1i64..500, 1i64..50).prop_map(|(from, to, minor, timeout_ms)| Op::Hold { from, to, minor, timeout_ms }),
        3 => (0usize..64, any::<bool>()).prop_map(|(nth_hold, post)| Op::Resolve { nth_hold, post }),
        2 => (0usize..64).prop_map(|nth| Op::Replay { nth }),
        1 => (1i64..20).prop_map(|ms| Op::Tick { ms }),
        1 => Just(Op::Expire),
    ]
}

/// Several clients' scripts and the order in which their requests reach the ledger.
fn interleaving() -> impl Strategy<Value = (Vec<Vec<Op>>, Vec<usize>)> {
    proptest::collection::vec(proptest::collection::vec(op(), 1..25), 1..5).prop_flat_map(
        |scripts| {
            let total: usize = scripts.iter().map(Vec::len).sum();
            let n = scripts.len();
            (
                Just(scripts),
                proptest::collection::vec(0..n, total..=total),
            )
        },
    )
}

/// Replays every posting the book reported and checks each account's counters against them.
fn recompute(changes: &[Changes], book: &Book) -> Result<(), TestCaseError> {
    let mut sums: HashMap<AccountId, Balance> = HashMap::new();
    let mut holds: HashMap<EntryId, Vec<(AccountId, Side, i64)>> = HashMap::new();
    for c in changes {
        for e in &c.entries {
            for p in &e.postings {
                let s = sums.entry(p.account.clone()).or_default();
                let effect = if p.pending {
                    LegEffect::Hold
                } else {
                    LegEffect::Post
                };
                *s = s.apply(p.side, p.amount_minor, effect).unwrap();
            }
            if e.expires_at_ms.is_some() {
                holds.insert(
                    e.entry.id().clone(),
                    e.entry
                        .postings()
                        .iter()
                        .map(|p| (p.account.clone(), p.side, p.amount.amount_minor()))
                        .collect(),
                );
            }
        }
        // A hold that left the pending state no longer counts as pending.
        for h in &c.holds {
            for (acct, side, amount) in holds.remove(&h.pending_id).unwrap_or_default() {
                let s = sums.entry(acct).or_default();
                *s = s.apply(side, amount, LegEffect::ReleaseHeld).unwrap();
            }
        }
    }
    for (id, state) in book.accounts() {
        let want = sums.get(id).copied().unwrap_or_default();
        prop_assert_eq!(state.balance, want, "account {}", id);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever the clients send and in whatever order it arrives: the books balance after
    /// every request, no limited account is ever over its limit, a replay moves nothing and
    /// returns the first receipt, and every balance equals the sum of its postings.
    #[test]
    fn books_balance_limits_hold_and_replays_never_double_post((scripts, order) in interleaving()) {
        let mut book = Book::new(1);
        for i in 0..ACCOUNTS {
            let (id, flags) = model_account(i);
            book.put_account(id, AccountState::new(flags));
        }
        let mut now = T0;
        let mut next = vec![0usize; scripts.len()];
        let mut accepted: Vec<(Entry, Receipt)> = Vec::new();
        let mut holds: Vec<EntryId> = Vec::new();
        let mut changes = vec![book.take_changes()];
        for (step, client) in order.iter().enumerate() {
            let Some(op) = scripts[*client].get(next[*client]).cloned() else { continue };
            next[*client] += 1;
            let before: Vec<Balance> = (0..ACCOUNTS)
                .map(|i| book.account(&model_account(i).0).unwrap().balance)
                .collect();
            let entry = match op {
                Op::Transfer { from, to, minor } if from != to => Some(transfer(
                    &format!("c{client}-{step}"), &model_account(from).0, &model_account(to).0, minor)),
                Op::Hold { from, to, minor, timeout_ms } if from != to => Some(hold(
                    &format!("c{client}-{step}"), &model_account(from).0, &model_account(to).0, minor, timeout_ms)),
                Op::Resolve { nth_hold, post } if !holds.is_empty() => {
                    let pending_id = holds[nth_hold % holds.len()].clone();
                    let id = eid(&format!("c{client}-{step}-resolve"));
                    Some(if post {
                        Entry::post_pending(id, EntryCode::WalletConfirm, None, pending_id).unwrap()
                    } else {
                        Entry::void_pending(id, EntryCode::WalletCancel, None, pending_id).unwrap()
                    })
                }
                Op::Replay { nth } if !accepted.is_empty() => {
                    let (e, receipt) = accepted[nth % accepted.len()].clone();
                    let out = book.post(&e, now).unwrap();
                    prop_assert_eq!(out, PostOutcome::Replayed(receipt));
                    let after: Vec<Balance> = (0..ACCOUNTS)
                        .map(|i| book.account(&model_account(i).0).unwrap().balance)
                        .collect();
                    prop_assert_eq!(&before, &after, "a replay moved money");
                    None
                }
                Op::Tick { ms } => { now += ms; None }
                Op::Expire => { book.expire_due(now, 8).unwrap(); None }
                _ => None,
            };
            if let Some(e) = entry {
                let out = book.post(&e, now).unwrap();
                match out {
                    PostOutcome::Posted(r) => {
                        if e.phase() == EntryPhase::Pending { holds.push(e.id().clone()); }
                        accepted.push((e, r));
                    }
                    PostOutcome::Replayed(_) => prop_assert!(false, "fresh id replayed"),
                    PostOutcome::Rejected(_) => {
                        // Nothing moved, except that resolving an expired hold releases it.
                        if e.pending_id().is_none() {
                            let after: Vec<Balance> = (0..ACCOUNTS)
                                .map(|i| book.account(&model_account(i).0).unwrap().balance)
                                .collect();
                            prop_assert_eq!(&before, &after, "a refused entry moved money");
                        }
                    }
                }
            }
            changes.push(book.take_changes());
            prop_assert_eq!(book.net_by_currency().get(&Currency::CNY).copied().unwrap_or((0, 0)), (0, 0));
            for i in 0..ACCOUNTS {
                let (id, flags) = model_account(i);
                prop_assert_eq!(book.account(&id).unwrap().balance.breach(flags), None, "{} over its limit", id);
            }
        }
        recompute(&changes, &book)?;
    }

    /// Any postings the constructor accepts balance exactly.
    #[test]
    fn every_constructed_entry_balances(
        legs in proptest::collection::vec((0usize..5, any::<bool>(), -3i64..1_000_000), 0..6),
    ) {
        let postings: Vec<Posting> = legs
            .iter()
            .map(|(acct, debit, minor)| {
                let a = wallet(&format!("w{acct}"));
                if *debit { Posting::debit(a, cny(*minor)) } else { Posting::credit(a, cny(*minor)) }
            })
            .collect();
        if let Ok(e) = Entry::posted(eid("e"), EntryCode::Transfer, None, postings) {
            let sum = |side: Side| -> i128 {
                e.postings().iter().filter(|p| p.side == side).map(|p| i128::from(p.amount.amount_minor())).sum()
            };
            prop_assert_eq!(sum(Side::Debit), sum(Side::Credit));
            prop_assert!(e.postings().iter().all(|p| p.amount.amount_minor() > 0));
        }
    }
}
