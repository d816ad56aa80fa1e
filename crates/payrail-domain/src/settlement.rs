//! Settlement cycles (结算周期): which business day a payment belongs to, when that day's
//! money becomes the merchant's to withdraw (T+N), and the id of the one settlement entry per
//! merchant, currency and day.
//!
//! **Day cut-off (日切).** A business day *closes* at the configured local time-of-day, at a fixed
//! UTC offset. A payment at or after the cut-off belongs to the next business day. With a 23:00
//! cut-off at UTC+08:00, business day 2026-11-22 runs from 2026-11-21 23:00 to 2026-11-22 23:00
//! Beijing time, and a payment at 2026-11-22 23:30 belongs to 2026-11-23. A 00:00 cut-off gives
//! calendar days.
//!
//! **T+N.** Business day D settles at the close of day D + N: for T+1 with a 23:00 cut-off,
//! day 2026-11-22 becomes settleable at 2026-11-23 23:00. N counts calendar days (no holiday
//! calendar yet). T+0 settles a day at its own close.

use crate::civil::{CivilError, Date, DateTime, TimeOfDay};
use crate::id::MerchantId;
use crate::ledger::{EntryId, LedgerError};
use crate::money::Currency;

/// Longest settlement delay: 30 days.
pub const T_PLUS_DAYS_MAX: u16 = 30;
/// UTC offsets in use on Earth: −12:00 ..= +14:00, in minutes.
pub const OFFSET_MINUTES_MIN: i32 = -720;
pub const OFFSET_MINUTES_MAX: i32 = 840;
const MS_PER_DAY: i64 = 86_400_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettlementError {
    #[error("T+{0} is beyond T+{T_PLUS_DAYS_MAX}")]
    DelayTooLong(u16),
    #[error("UTC offset of {0} minutes is outside −12:00..+14:00")]
    BadOffset(i32),
    #[error(transparent)]
    Civil(#[from] CivilError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// A merchant's settlement cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SettlementCycle {
    t_plus_days: u16,
    cutoff: TimeOfDay,
    offset_minutes: i32,
}

impl SettlementCycle {
    pub fn new(
        t_plus_days: u16,
        cutoff: TimeOfDay,
        offset_minutes: i32,
    ) -> Result<SettlementCycle, SettlementError> {
        if t_plus_days > T_PLUS_DAYS_MAX {
            return Err(SettlementError::DelayTooLong(t_plus_days));
        }
        if !(OFFSET_MINUTES_MIN..=OFFSET_MINUTES_MAX).contains(&offset_minutes) {
            return Err(SettlementError::BadOffset(offset_minutes));
        }
        Ok(SettlementCycle {
            t_plus_days,
            cutoff,
            offset_minutes,
        })
    }

    pub fn t_plus_days(&self) -> u16 {
        self.t_plus_days
    }
    pub fn cutoff(&self) -> TimeOfDay {
        self.cutoff
    }
    pub fn offset_minutes(&self) -> i32 {
        self.offset_minutes
    }

    /// The business day a moment (Unix ms) belongs to.
    pub fn business_day(&self, unix_ms: i64) -> Result<Date, SettlementError> {
        let local = DateTime::from_unix_ms(unix_ms, self.offset_minutes)?;
        if self.cutoff != TimeOfDay::MIDNIGHT && local.time >= self.cutoff {
            return Ok(local.date.add_days(1)?);
        }
        Ok(local.date)
    }

    /// The half-open window `[start_ms, end_ms)` of business day `day`.
    pub fn window(&self, day: Date) -> Result<(i64, i64), SettlementError> {
        // The day closes at its own cut-off, or at the next midnight for a 00:00 cut-off.
        let closing_date = if self.cutoff == TimeOfDay::MIDNIGHT {
            day.add_days(1)?
        } else {
            day
        };
        let end_ms = closing_date.at(self.cutoff, self.offset_minutes);
        let start_ms = end_ms.saturating_sub(MS_PER_DAY);
        Ok((start_ms, end_ms))
    }

    /// When business day `day` becomes settleable: its close plus N days.
    pub fn due_at_ms(&self, day: Date) -> Result<i64, SettlementError> {
        let (_, end_ms) = self.window(day)?;
        // N ≤ 30 days: no overflow for any date this crate accepts.
        Ok(end_ms.saturating_add(i64::from(self.t_plus_days).saturating_mul(MS_PER_DAY)))
    }

    /// The latest business day that is settleable at `now_ms`.
    pub fn latest_due_day(&self, now_ms: i64) -> Result<Date, SettlementError> {
        let shifted = now_ms.saturating_sub(i64::from(self.t_plus_days).saturating_mul(MS_PER_DAY));
        Ok(self.business_day(shifted)?.add_days(-1)?)
    }
}

/// The id of the one settlement entry of a merchant, currency and business day: re-running a
/// day's settlement posts the same id, which the ledger answers as a replay.
pub fn settlement_entry_id(
    merchant: MerchantId,
    currency: Currency,
    day: Date,
) -> Result<EntryId, LedgerError> {
    EntryId::parse(&format!("stl:{merchant}:{currency}:{}", day.compact()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::civil::CHINA_OFFSET_MINUTES;
    use proptest::prelude::*;

    fn t(s: &str) -> TimeOfDay {
        TimeOfDay::parse(s).unwrap()
    }

    fn beijing_ms(s: &str) -> i64 {
        let (dt, _) = DateTime::parse(s).unwrap();
        dt.to_unix_ms(CHINA_OFFSET_MINUTES)
    }

    #[test]
    fn business_day_with_a_23_00_cutoff() {
        let c = SettlementCycle::new(1, t("23:00"), CHINA_OFFSET_MINUTES).unwrap();
        let cases = [
            ("2026-11-22 00:00:00", "2026-11-22"),
            ("2026-11-22 22:59:59", "2026-11-22"),
            ("2026-11-22 23:00:00", "2026-11-23"),
            ("2026-11-22 23:30:00", "2026-11-23"),
            ("2026-12-31 23:00:00", "2027-01-01"),
        ];
        for (at, day) in cases {
            assert_eq!(
                c.business_day(beijing_ms(at)).unwrap().to_string(),
                day,
                "{at}"
            );
        }
        let day = Date::parse("2026-11-22").unwrap();
        assert_eq!(
            c.window(day).unwrap(),
            (
                beijing_ms("2026-11-21 23:00:00"),
                beijing_ms("2026-11-22 23:00:00")
            )
        );
        // T+1: settleable at the close of the next day.
        assert_eq!(c.due_at_ms(day).unwrap(), beijing_ms("2026-11-23 23:00:00"));
        assert_eq!(
            c.latest_due_day(beijing_ms("2026-11-23 23:00:00"))
                .unwrap()
                .to_string(),
            "2026-11-22"
        );
        assert_eq!(
            c.latest_due_day(beijing_ms("2026-11-23 22:59:59"))
                .unwrap()
                .to_string(),
            "2026-11-21"
        );
    }

    #[test]
    fn midnight_cutoff_is_the_calendar_day() {
        let c = SettlementCycle::new(0, TimeOfDay::MIDNIGHT, CHINA_OFFSET_MINUTES).unwrap();
        assert_eq!(
            c.business_day(beijing_ms("2026-11-22 23:59:59"))
                .unwrap()
                .to_string(),
            "2026-11-22"
        );
        let day = Date::parse("2026-11-22").unwrap();
        assert_eq!(
            c.window(day).unwrap(),
            (
                beijing_ms("2026-11-22 00:00:00"),
                beijing_ms("2026-11-23 00:00:00")
            )
        );
        // T+0: settleable at its own close.
        assert_eq!(c.due_at_ms(day).unwrap(), beijing_ms("2026-11-23 00:00:00"));
    }

    #[test]
    fn cycles_are_validated() {
        assert!(SettlementCycle::new(31, TimeOfDay::MIDNIGHT, 0).is_err());
        assert!(SettlementCycle::new(1, TimeOfDay::MIDNIGHT, 900).is_err());
        assert!(SettlementCycle::new(1, TimeOfDay::MIDNIGHT, -721).is_err());
    }

    #[test]
    fn settlement_ids_are_one_per_merchant_currency_and_day() {
        let m = MerchantId::generate(1, [3; 10]);
        let d = Date::parse("2026-11-22").unwrap();
        let a = settlement_entry_id(m, Currency::CNY, d).unwrap();
        assert_eq!(a, settlement_entry_id(m, Currency::CNY, d).unwrap());
        assert_ne!(a, settlement_entry_id(m, Currency::USD, d).unwrap());
        assert_ne!(
            a,
            settlement_entry_id(m, Currency::CNY, d.add_days(1).unwrap()).unwrap()
        );
    }

    proptest! {
        #[test]
        fn every_moment_is_in_its_business_days_window(
            secs in 86_400i64 * 400..253_000_000_000,
            cut_h in 0u8..24, cut_m in 0u8..60,
            offset in OFFSET_MINUTES_MIN..=OFFSET_MINUTES_MAX,
            n in 0u16..=T_PLUS_DAYS_MAX,
        ) {
            let ms = secs * 1000;
            let c = SettlementCycle::new(n, TimeOfDay::new(cut_h, cut_m, 0).unwrap(), offset).unwrap();
            let day = c.business_day(ms).unwrap();
            let (start, end) = c.window(day).unwrap();
            prop_assert!(start <= ms && ms < end, "{ms} not in [{start}, {end})");
            prop_assert_eq!(end - start, MS_PER_DAY);
            // Windows tile time: the next day starts where this one ends.
            prop_assert_eq!(c.window(day.add_days(1).unwrap()).unwrap().0, end);
            // Settleable exactly from due_at_ms on.
            let due = c.due_at_ms(day).unwrap();
            prop_assert!(c.latest_due_day(due).unwrap() >= day);
            prop_assert!(c.latest_due_day(due - 1).unwrap() < day);
        }
    }
}
