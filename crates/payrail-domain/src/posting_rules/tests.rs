use super::*;
use crate::fees::{FeePlan, FeePlanSpec, FeeRefundPolicy};
use crate::ledger::{
    AccountKind, AccountState, Book, EntryPhase, PostOutcome, Reject, Side, PLATFORM_OWNER,
};
use crate::money::Currency;

const T0: i64 = 1_750_000_000_000;
const CH: &str = "sandbox";

fn cny(minor: i64) -> Money {
    Money::new(minor, Currency::CNY)
}

/// 0.6 % fee, 0.25 % channel cost, both refunded pro rata.
fn plan() -> FeePlan {
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

struct World {
    book: Book,
    merchant: MerchantId,
}

impl World {
    fn new() -> World {
        let merchant = MerchantId::generate(T0 as u64, [5; 10]);
        let mut book = Book::default();
        let c = Currency::CNY;
        let accounts = [
            AccountId::merchant_pending(merchant, c),
            AccountId::merchant_available(merchant, c),
            AccountId::payout_clearing(merchant, c),
            AccountId::platform_fee(c),
            AccountId::funding(c),
            AccountId::channel_clearing(CH, c).unwrap(),
            AccountId::channel_cost(CH, c).unwrap(),
            AccountId::wallet(merchant, "alice", c).unwrap(),
            AccountId::wallet(merchant, "bob", c).unwrap(),
        ];
        for a in accounts {
            let flags = a.kind().default_flags();
            book.put_account(a, AccountState::new(flags));
        }
        World { book, merchant }
    }

    fn post(&mut self, e: &Entry) -> PostOutcome {
        self.book.post(e, T0).unwrap()
    }

    fn ok(&mut self, e: &Entry) {
        let out = self.post(e);
        assert!(matches!(out, PostOutcome::Posted(_)), "{e:?}: {out:?}");
    }

    /// Balance on the account's normal side, in minor units.
    fn wallet_bal(&self, holder: &str) -> i128 {
        let owner = format!("{}.{holder}", self.merchant);
        self.bal(AccountKind::Wallet, &owner)
    }

    fn bal(&self, kind: AccountKind, owner: &str) -> i128 {
        let id = AccountId::new(kind, owner, Currency::CNY).unwrap();
        self.book
            .account(&id)
            .unwrap()
            .balance
            .posted_net(kind.normal_side())
    }

    fn m(&self, kind: AccountKind) -> i128 {
        self.bal(kind, &self.merchant.to_string())
    }

    fn balanced(&self) {
        assert_eq!(self.book.net_by_currency()[&Currency::CNY], (0, 0));
    }
}

fn pay(n: u8) -> PaymentId {
    PaymentId::generate(T0 as u64, [n; 10])
}

#[test]
fn payment_partial_refunds_settlement_and_payout() {
    let mut w = World::new();
    let p = plan();
    // Payment of 100.00: fee 0.60, channel cost 0.25.
    let q = p.quote(cny(10_000)).unwrap();
    let e = payment_succeeded(pay(1), w.merchant, CH, &q).unwrap();
    assert_eq!(e.postings().len(), 4);
    w.ok(&e);
    assert_eq!(w.m(AccountKind::MerchantPending), 9_940);
    assert_eq!(w.bal(AccountKind::PlatformFee, PLATFORM_OWNER), 60);
    assert_eq!(w.bal(AccountKind::ChannelClearing, CH), 9_975);
    assert_eq!(w.bal(AccountKind::ChannelCost, CH), 25);
    w.balanced();
    // The same event again is a replay: exactly one posting set per payment.
    assert!(matches!(w.post(&e), PostOutcome::Replayed(_)));
    assert_eq!(w.m(AccountKind::MerchantPending), 9_940);

    // Partial refund of 30.00 before settlement: fee 0.18 and cost 0.075 → 0.08 come back.
    let r1q = p.refund_quote(&q, cny(0), cny(3_000)).unwrap();
    let r1 = refund(
        &"ref_1",
        pay(1),
        w.merchant,
        CH,
        &r1q,
        RefundSource::Pending,
    )
    .unwrap();
    w.ok(&r1);
    assert_eq!(w.m(AccountKind::MerchantPending), 9_940 - 2_982);
    assert_eq!(w.bal(AccountKind::PlatformFee, PLATFORM_OWNER), 60 - 18);
    assert_eq!(w.bal(AccountKind::ChannelCost, CH), 25 - 8);
    assert_eq!(w.bal(AccountKind::ChannelClearing, CH), 9_975 - 2_992);
    w.balanced();

    // Settlement of the day moves the pending balance to available.
    let day = crate::civil::Date::parse("2026-11-22").unwrap();
    let pending = i64::try_from(w.m(AccountKind::MerchantPending)).unwrap();
    let s = settlement(w.merchant, day, cny(pending)).unwrap();
    w.ok(&s);
    assert!(
        matches!(w.post(&s), PostOutcome::Replayed(_)),
        "re-running the day"
    );
    assert_eq!(w.m(AccountKind::MerchantPending), 0);
    assert_eq!(w.m(AccountKind::MerchantAvailable), 6_958);

    // A refund after settlement comes out of the available balance; the remaining 70.00.
    let r2q = p.refund_quote(&q, cny(3_000), cny(7_000)).unwrap();
    let r2 = refund(
        &"ref_2",
        pay(1),
        w.merchant,
        CH,
        &r2q,
        RefundSource::Available,
    )
    .unwrap();
    w.ok(&r2);
    // Fully refunded: everything is back to zero, fee and cost included.
    assert_eq!(w.m(AccountKind::MerchantAvailable), 0);
    assert_eq!(w.bal(AccountKind::PlatformFee, PLATFORM_OWNER), 0);
    assert_eq!(w.bal(AccountKind::ChannelCost, CH), 0);
    assert_eq!(w.bal(AccountKind::ChannelClearing, CH), 0);
    w.balanced();

    // A refund the merchant cannot cover is refused (no overdraft), and a payout likewise.
    let q2 = p.quote(cny(500)).unwrap();
    w.ok(&payment_succeeded(pay(2), w.merchant, CH, &q2).unwrap());
    let big = p.refund_quote(&q2, cny(0), cny(500)).unwrap();
    let r3 = refund(
        &"ref_3",
        pay(2),
        w.merchant,
        CH,
        &big,
        RefundSource::Available,
    )
    .unwrap();
    assert!(matches!(
        w.post(&r3),
        PostOutcome::Rejected(Reject::ExceedsCredits(_))
    ));
    let po = payout(&"po_1", w.merchant, cny(1)).unwrap();
    assert!(matches!(
        w.post(&po),
        PostOutcome::Rejected(Reject::ExceedsCredits(_))
    ));
    w.ok(&settlement(w.merchant, day.add_days(1).unwrap(), q2.net).unwrap());
    w.ok(&payout(&"po_2", w.merchant, q2.net).unwrap());
    assert_eq!(w.m(AccountKind::MerchantAvailable), 0);
    assert_eq!(
        w.m(AccountKind::PayoutClearing),
        i128::from(q2.net.amount_minor())
    );
    w.balanced();
}

#[test]
fn zero_lines_are_left_out() {
    let merchant = MerchantId::generate(1, [1; 10]);
    let free = FeePlan::new(FeePlanSpec {
        rate_bps: 0,
        channel_cost_bps: 0,
        ..plan().spec().clone()
    })
    .unwrap();
    let e = payment_succeeded(pay(3), merchant, CH, &free.quote(cny(100)).unwrap()).unwrap();
    let kinds: Vec<(AccountKind, Side)> = e
        .postings()
        .iter()
        .map(|p| (p.account.kind(), p.side))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (AccountKind::ChannelClearing, Side::Debit),
            (AccountKind::MerchantPending, Side::Credit)
        ]
    );
}

#[test]
fn wallet_top_up_freeze_confirm_cancel_and_refund() {
    let mut w = World::new();
    let p = plan();
    w.ok(&wallet_top_up(
        &"tu_1",
        w.merchant,
        "alice",
        cny(10_000),
        &TopUpSource::Operator,
    )
    .unwrap());
    w.ok(&wallet_top_up(
        &"tu_2",
        w.merchant,
        "alice",
        cny(5_000),
        &TopUpSource::Channel(CH.into()),
    )
    .unwrap());
    assert_eq!(w.wallet_bal("alice"), 15_000);

    // Try: 120.00 frozen. Available drops at once, the posted balance only on confirm.
    let q = p.quote(cny(12_000)).unwrap();
    let freeze = wallet_freeze(pay(7), "alice", w.merchant, &q, 60_000).unwrap();
    assert_eq!(freeze.phase(), EntryPhase::Pending);
    w.ok(&freeze);
    let alice = AccountId::wallet(w.merchant, "alice", Currency::CNY).unwrap();
    let b = w.book.account(&alice).unwrap().balance;
    assert_eq!(
        (b.available(Side::Credit), b.posted_net(Side::Credit)),
        (3_000, 15_000)
    );
    // A second payment that would need the frozen money is refused.
    let q2 = p.quote(cny(3_001)).unwrap();
    let f2 = wallet_freeze(pay(8), "alice", w.merchant, &q2, 60_000).unwrap();
    assert!(matches!(
        w.post(&f2),
        PostOutcome::Rejected(Reject::ExceedsCredits(_))
    ));
    // Confirm.
    w.ok(&wallet_confirm(pay(7)).unwrap());
    assert_eq!(w.wallet_bal("alice"), 3_000);
    assert_eq!(w.m(AccountKind::MerchantPending), 12_000 - 72);
    assert_eq!(w.bal(AccountKind::PlatformFee, PLATFORM_OWNER), 72);
    w.balanced();

    // Another payment, cancelled: nothing moves.
    let q3 = p.quote(cny(2_000)).unwrap();
    w.ok(&wallet_freeze(pay(9), "alice", w.merchant, &q3, 60_000).unwrap());
    w.ok(&wallet_cancel(pay(9)).unwrap());
    assert!(matches!(
        w.post(&wallet_confirm(pay(9)).unwrap()),
        PostOutcome::Rejected(Reject::PendingAlreadyVoided(_))
    ));
    let b = w.book.account(&alice).unwrap().balance;
    assert_eq!((b.available(Side::Credit), b.debits_pending), (3_000, 0));

    // Refund half of the confirmed payment back to the wallet.
    let rq = p.refund_quote(&q, cny(0), cny(6_000)).unwrap();
    w.ok(&wallet_refund(
        &"ref_w",
        pay(7),
        "alice",
        w.merchant,
        &rq,
        RefundSource::Pending,
    )
    .unwrap());
    assert_eq!(w.wallet_bal("alice"), 9_000);
    assert_eq!(w.m(AccountKind::MerchantPending), 11_928 - 5_964);
    assert_eq!(w.bal(AccountKind::PlatformFee, PLATFORM_OWNER), 36);
    w.balanced();
}

#[test]
fn a_reversal_undoes_an_entry() {
    let mut w = World::new();
    let e = wallet_top_up(&"tu", w.merchant, "bob", cny(700), &TopUpSource::Operator).unwrap();
    w.ok(&e);
    let rev = reversal(EntryId::parse("tu:reversal").unwrap(), &e).unwrap();
    assert_eq!(rev.reference(), Some("tu:top_up"));
    w.ok(&rev);
    assert_eq!(w.wallet_bal("bob"), 0);
    assert_eq!(w.bal(AccountKind::Funding, PLATFORM_OWNER), 0);
    w.balanced();
}

/// Every account's posted counters and balance, to compare the books before and after.
fn snapshot(w: &World) -> Vec<(String, i128)> {
    let mut v: Vec<(String, i128)> = w
        .book
        .accounts()
        .map(|(id, s)| {
            (
                id.to_string(),
                s.balance.posted_net(id.kind().normal_side()),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_failed_payout_is_reversed_and_the_books_return_to_their_prior_state() {
    let mut w = World::new();
    // 100.00 settled to available.
    let day = crate::civil::Date::parse("2026-11-22").unwrap();
    w.ok(&wallet_top_up(
        &"tu",
        w.merchant,
        "alice",
        cny(10_000),
        &TopUpSource::Operator,
    )
    .unwrap());
    let q = plan().quote(cny(10_000)).unwrap();
    w.ok(&payment_succeeded(pay(1), w.merchant, CH, &q).unwrap());
    w.ok(&settlement(w.merchant, day, q.net).unwrap());
    assert_eq!(w.m(AccountKind::MerchantAvailable), 9_940);
    let before = snapshot(&w);

    // A payout of 30.00: available → payout clearing.
    let po = payout(&"po_1", w.merchant, cny(3_000)).unwrap();
    assert_eq!(po.id().as_str(), "po_1:payout");
    assert_eq!(po.reference(), Some("po_1"));
    w.ok(&po);
    assert_eq!(w.m(AccountKind::MerchantAvailable), 6_940);
    assert_eq!(w.m(AccountKind::PayoutClearing), 3_000);
    w.balanced();
    // The bank refuses it: the reversal puts it back, and every balance is what it was.
    let rev = payout_reversal(&"po_1", w.merchant, cny(3_000)).unwrap();
    assert_eq!(rev.id().as_str(), "po_1:payout_reversal");
    let sides: Vec<(AccountKind, Side)> = rev
        .postings()
        .iter()
        .map(|p| (p.account.kind(), p.side))
        .collect();
    assert_eq!(
        sides,
        vec![
            (AccountKind::PayoutClearing, Side::Debit),
            (AccountKind::MerchantAvailable, Side::Credit)
        ]
    );
    w.ok(&rev);
    assert_eq!(snapshot(&w), before, "the books are back where they were");
    w.balanced();
    // Replays post nothing twice: the payout and its reversal are each one entry.
    assert!(matches!(w.post(&po), PostOutcome::Replayed(_)));
    assert!(matches!(w.post(&rev), PostOutcome::Replayed(_)));
    assert_eq!(snapshot(&w), before);

    // A payout of more than is available is refused and changes nothing.
    let big = payout(&"po_2", w.merchant, cny(9_941)).unwrap();
    assert!(matches!(
        w.post(&big),
        PostOutcome::Rejected(Reject::ExceedsCredits(_))
    ));
    assert_eq!(snapshot(&w), before);
    // Exactly the available balance is fine; then nothing is left.
    w.ok(&payout(&"po_3", w.merchant, cny(9_940)).unwrap());
    assert_eq!(w.m(AccountKind::MerchantAvailable), 0);
    assert_eq!(w.m(AccountKind::PayoutClearing), 9_940);
    w.balanced();
}
