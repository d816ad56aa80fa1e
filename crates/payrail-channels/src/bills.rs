//! Confirming from a channel's own bills that an order was never paid.
//!
//! Some orders get no definite answer from the channel's API: a UnionPay gateway order that
//! lapsed at its `payTimeout` answers "no such transaction" (`34`) for ever, and so does a
//! WeChat order whose creation never reached WeChat (`ORDER_NOT_EXIST` to the query and the
//! close). "Not found" is never a close by itself: a query with the wrong time, a lost record or
//! a late debit say the same. What a channel does state definitely is its daily bill: every
//! paid order is in the bill of the day it was paid (or settled). So an order that the API does
//! not know can be closed once the bills of every day it could have been paid on — its
//! submission day (Beijing) through the day after its expiry (a payment near midnight, a late
//! debit, clocks apart) — are out and none names it. A bill that names it while the API does
//! not is a contradiction a person must look at; a bill not out yet means "wait".
//!
//! [`PaidOrders`] walks those days for one connector and keeps the order numbers of the bills
//! it has read (a published bill never changes), so many lost orders of one day fetch it once.

use crate::{Bill, BillError};
use payrail_domain::civil::Date;
use payrail_domain::ChannelOutcome;
use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};

/// Bill dates whose order numbers one connector keeps in memory.
pub const CACHED_DATES_MAX: usize = 8;
/// Most bills one confirmation reads: a 7-day order spans 8 days, plus the day after expiry,
/// plus one for an order submitted just before midnight. A longer span is left to a person.
pub const CONFIRM_DAYS_MAX: i64 = 10;

/// The order numbers named by each bill read so far, by date, for one connector.
pub struct PaidOrders {
    /// `unionpay`, `wechatpay`: the prefix of every reason.
    channel: &'static str,
    /// What the channel calls its bill, for the reasons: `reconciliation file`, `trade bill`.
    bill_name: &'static str,
    cache: Mutex<BTreeMap<Date, Arc<HashSet<String>>>>,
}

impl PaidOrders {
    pub fn new(channel: &'static str, bill_name: &'static str) -> PaidOrders {
        PaidOrders {
            channel,
            bill_name,
            cache: Mutex::new(BTreeMap::new()),
        }
    }

    /// `Closed` only if every bill from the Beijing day of `submitted_at_ms` through the day
    /// after that of `expires_at_ms` is out and none names `order_no`; otherwise unknown, with a
    /// reason that says what it waits for or why a person must look. The caller has already
    /// established that the channel's API does not know the order. The last day first: until
    /// its bill is out the others are not worth fetching (and the order's expiry has passed on
    /// the channel's own clock once the bill of the day after it is out).
    ///
    /// `fetch` downloads and parses one day's bill (`Connector::download_bill`).
    pub async fn confirm_never_paid<F, Fut>(
        &self,
        order_no: &str,
        submitted_at_ms: i64,
        expires_at_ms: i64,
        fetch: F,
    ) -> ChannelOutcome
    where
        F: Fn(Date) -> Fut,
        Fut: Future<Output = Result<Bill, BillError>>,
    {
        match self
            .walk(order_no, submitted_at_ms, expires_at_ms, fetch)
            .await
        {
            Ok(()) => ChannelOutcome::Closed,
            Err(reason) => ChannelOutcome::unknown(format!("{}: {reason}", self.channel)),
        }
    }

    async fn walk<F, Fut>(
        &self,
        order_no: &str,
        submitted_at_ms: i64,
        expires_at_ms: i64,
        fetch: F,
    ) -> Result<(), String>
    where
        F: Fn(Date) -> Fut,
        Fut: Future<Output = Result<Bill, BillError>>,
    {
        let day = |ms: i64| crate::common::beijing(ms).map(|d| d.date);
        let (Some(first), Some(expiry)) = (day(submitted_at_ms), day(expires_at_ms)) else {
            return Err("order times out of range".into());
        };
        let last = expiry.add_days(1).map_err(|e| e.to_string())?;
        let span = last
            .days_since_epoch()
            .saturating_sub(first.days_since_epoch());
        if span < 1 {
            return Err(format!(
                "the order expires ({expiry}) before the day it was submitted ({first}); check it by hand"
            ));
        }
        if span >= CONFIRM_DAYS_MAX {
            return Err(format!(
                "the order spans {span} days ({first} to {last}), more than the {} bills a close reads; check it by hand",
                self.bill_name
            ));
        }
        let bill_name = self.bill_name;
        let mut d = last;
        loop {
            let named = self.orders_of(d, &fetch).await.map_err(|e| match e {
                BillError::NotReady => format!(
                    "the channel does not know the order; waiting for the {bill_name} of {d} to confirm it was never paid"
                ),
                other => format!("{bill_name} of {d}: {other}"),
            })?;
            if named.contains(order_no) {
                return Err(format!(
                    "the {bill_name} of {d} lists the order as paid, but the channel says it does not exist; check it by hand"
                ));
            }
            if d == first {
                return Ok(());
            }
            d = d.add_days(-1).map_err(|e| e.to_string())?;
        }
    }

    /// The order numbers named by the bill of `date`: payment lines, and refund lines too (a
    /// refunded or revoked order was paid first, whatever the channel's layout puts on its
    /// line).
    async fn orders_of<F, Fut>(
        &self,
        date: Date,
        fetch: &F,
    ) -> Result<Arc<HashSet<String>>, BillError>
    where
        F: Fn(Date) -> Fut,
        Fut: Future<Output = Result<Bill, BillError>>,
    {
        let lock = || match self.cache.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(hit) = lock().get(&date) {
            return Ok(hit.clone());
        }
        let bill = fetch(date).await?;
        let named: Arc<HashSet<String>> =
            Arc::new(bill.lines.into_iter().map(|l| l.out_trade_no).collect());
        let mut cache = lock();
        cache.insert(date, named.clone());
        while cache.len() > CACHED_DATES_MAX {
            cache.pop_first();
        }
        Ok(named)
    }

    #[cfg(test)]
    fn cached_dates(&self) -> Vec<Date> {
        match self.cache.lock() {
            Ok(g) => g.keys().copied().collect(),
            Err(poisoned) => poisoned.into_inner().keys().copied().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::{BillLine, BillLineKind, BillSummary};
    use payrail_domain::{Currency, Money};
    use std::sync::atomic::{AtomicUsize, Ordering};

    const DAY_MS: i64 = 86_400_000;
    /// 2026-11-22 10:00:00 Beijing.
    const T0: i64 = 1_795_312_800_000;

    fn date(s: &str) -> Date {
        let (y, rest) = s.split_once('-').unwrap();
        let (m, d) = rest.split_once('-').unwrap();
        Date::from_ymd(y.parse().unwrap(), m.parse().unwrap(), d.parse().unwrap()).unwrap()
    }

    fn line(no: &str, kind: BillLineKind) -> BillLine {
        BillLine {
            kind,
            channel_trade_no: "4200".into(),
            out_trade_no: no.into(),
            channel_refund_no: None,
            out_refund_no: None,
            amount: Money::new(100, Currency::CNY),
            fee: Money::zero(Currency::CNY),
            status: "SUCCESS".into(),
            occurred_at_ms: T0,
        }
    }

    fn bill(d: Date, lines: Vec<BillLine>) -> Bill {
        let zero = Money::zero(Currency::CNY);
        Bill {
            date: d,
            lines,
            summary: BillSummary {
                payment_count: 0,
                payment_total: zero,
                refund_count: 0,
                refund_total: zero,
                fee_total: zero,
            },
        }
    }

    /// A channel's bills: the dates out, and what each lists; counts the downloads.
    struct Bills {
        out: BTreeMap<Date, Vec<BillLine>>,
        fetched: AtomicUsize,
    }

    impl Bills {
        fn new(out: &[(&str, Vec<BillLine>)]) -> Bills {
            Bills {
                out: out.iter().map(|(d, l)| (date(d), l.clone())).collect(),
                fetched: AtomicUsize::new(0),
            }
        }

        async fn fetch(&self, d: Date) -> Result<Bill, BillError> {
            self.fetched.fetch_add(1, Ordering::SeqCst);
            self.out
                .get(&d)
                .map(|l| bill(d, l.clone()))
                .ok_or(BillError::NotReady)
        }
    }

    fn reason(o: ChannelOutcome) -> String {
        match o {
            ChannelOutcome::Unknown { reason } => reason,
            other => panic!("expected unknown, got {other:?}"),
        }
    }

    /// Submitted 2026-11-22 10:00, expiring 10:30: the bills of the 22nd and the 23rd decide.
    async fn confirm(paid: &PaidOrders, bills: &Bills, no: &str) -> ChannelOutcome {
        paid.confirm_never_paid(no, T0, T0 + 1_800_000, |d| bills.fetch(d))
            .await
    }

    #[tokio::test]
    async fn a_bill_not_out_yet_is_unknown_and_says_which_it_waits_for() {
        let paid = PaidOrders::new("wechatpay", "trade bill");
        // Nothing out: the last day is asked first, and only it.
        let bills = Bills::new(&[]);
        let why = reason(confirm(&paid, &bills, "att_lost").await);
        assert!(why.starts_with("wechatpay: "), "{why}");
        assert!(why.contains("trade bill of 2026-11-23"), "{why}");
        assert!(why.contains("waiting"), "{why}");
        assert_eq!(bills.fetched.load(Ordering::SeqCst), 1);
        // The order's day is out, the day after its expiry is not: still unknown.
        let bills = Bills::new(&[("2026-11-22", vec![])]);
        let why = reason(confirm(&paid, &bills, "att_lost").await);
        assert!(why.contains("2026-11-23"), "{why}");
        // A bill that cannot be read is no confirmation either.
        let why = reason(
            paid.confirm_never_paid("att_lost", T0, T0 + 1_800_000, |_| async {
                Err(BillError::Corrupt(
                    "SHA-1 of the file does not match".into(),
                ))
            })
            .await,
        );
        assert!(why.contains("SHA-1"), "{why}");
    }

    #[tokio::test]
    async fn a_bill_that_lists_the_order_is_unknown_never_closed() {
        for (day, kind) in [
            ("2026-11-22", BillLineKind::Payment),
            ("2026-11-23", BillLineKind::Payment),
            // Refunded (or revoked) means it was paid first.
            ("2026-11-23", BillLineKind::Refund),
        ] {
            let paid = PaidOrders::new("wechatpay", "trade bill");
            let mut out = vec![("2026-11-22", vec![]), ("2026-11-23", vec![])];
            for (d, lines) in &mut out {
                if *d == day {
                    lines.push(line("att_paid", kind));
                }
            }
            let bills = Bills::new(&out);
            let why = reason(confirm(&paid, &bills, "att_paid").await);
            assert!(
                why.contains(&format!("trade bill of {day} lists the order as paid")),
                "{day} {kind:?}: {why}"
            );
            // Another order of the same days is not held up by it.
            assert_eq!(
                confirm(&paid, &bills, "att_other").await,
                ChannelOutcome::Closed
            );
        }
    }

    #[tokio::test]
    async fn every_bill_out_and_none_lists_it_is_closed_and_bills_are_read_once() {
        let paid = PaidOrders::new("unionpay", "reconciliation file");
        let bills = Bills::new(&[
            ("2026-11-21", vec![line("att_lost", BillLineKind::Payment)]),
            ("2026-11-22", vec![line("att_other", BillLineKind::Payment)]),
            ("2026-11-23", vec![]),
            ("2026-11-24", vec![line("att_lost", BillLineKind::Payment)]),
        ]);
        // Only the 22nd and the 23rd count: the days around them are never read.
        assert_eq!(
            confirm(&paid, &bills, "att_lost").await,
            ChannelOutcome::Closed
        );
        assert_eq!(bills.fetched.load(Ordering::SeqCst), 2);
        assert_eq!(
            paid.cached_dates(),
            [date("2026-11-22"), date("2026-11-23")]
        );
        // A second lost order of the same days reads no bill again.
        assert_eq!(
            confirm(&paid, &bills, "att_lost2").await,
            ChannelOutcome::Closed
        );
        assert_eq!(bills.fetched.load(Ordering::SeqCst), 2);
        // An order submitted before midnight and expiring after it: three days.
        let late = T0 + 13 * 3_600_000 + 59 * 60_000; // 2026-11-22 23:59 Beijing
        let bills = Bills::new(&[("2026-11-24", vec![])]);
        let o = paid
            .confirm_never_paid("att_late", late, late + 120_000, |d| bills.fetch(d))
            .await;
        assert_eq!(o, ChannelOutcome::Closed);
        assert_eq!(
            bills.fetched.load(Ordering::SeqCst),
            1,
            "22nd and 23rd cached"
        );
    }

    #[tokio::test]
    async fn a_span_longer_than_the_bound_is_left_to_a_person() {
        let paid = PaidOrders::new("wechatpay", "trade bill");
        let bills = Bills::new(&[]);
        // 9 days (submitted the 22nd, expiring the 30th: bills of the 22nd to 1 Dec = 10 days)
        // is the most; one more day is refused without downloading anything.
        let ok = paid
            .confirm_never_paid("att_x", T0, T0 + 8 * DAY_MS, |d| bills.fetch(d))
            .await;
        assert!(reason(ok).contains("2026-12-01"));
        let fetched = bills.fetched.load(Ordering::SeqCst);
        let why = reason(
            paid.confirm_never_paid("att_x", T0, T0 + 9 * DAY_MS, |d| bills.fetch(d))
                .await,
        );
        assert!(why.contains("by hand"), "{why}");
        assert_eq!(bills.fetched.load(Ordering::SeqCst), fetched);
        // An expiry before the submission is no order we made: never closed.
        let why = reason(
            paid.confirm_never_paid("att_x", T0, T0 - 2 * DAY_MS, |d| bills.fetch(d))
                .await,
        );
        assert!(why.contains("by hand"), "{why}");
        // More dates than the cache holds: the oldest are dropped.
        let many: Vec<(String, Vec<BillLine>)> = (0..CONFIRM_DAYS_MAX)
            .map(|i| (date("2026-11-22").add_days(i).unwrap().to_string(), vec![]))
            .collect();
        let refs: Vec<(&str, Vec<BillLine>)> =
            many.iter().map(|(d, l)| (d.as_str(), l.clone())).collect();
        let bills = Bills::new(&refs);
        let o = paid
            .confirm_never_paid("att_x", T0, T0 + 8 * DAY_MS, |d| bills.fetch(d))
            .await;
        assert_eq!(o, ChannelOutcome::Closed);
        assert_eq!(paid.cached_dates().len(), CACHED_DATES_MAX);
    }
}
