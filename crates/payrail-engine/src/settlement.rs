//! Settlement (结算): settlement cycles (T+N with a day cut-off), the settlement run that
//! `payrail settle` and the scheduled worker both call, and reads of batches and statements.
//!
//! A run looks at every merchant and currency with unsettled payments. For each, with the
//! merchant's cycle (else the platform default, else T+1 at 00:00 UTC+08:00), it walks the
//! business days from the oldest unsettled payment's day to the latest day that is due
//! (`latest_due_day(now)`, or the `--date` asked for if earlier), and asks the store to settle
//! each: one batch per merchant, currency and day, created at most once (a unique key), covering
//! the unsettled payments cleared before the day's close. Re-running a day creates nothing.

use crate::{Engine, EngineError};
use payrail_domain::civil::{Date, TimeOfDay, CHINA_OFFSET_MINUTES};
use payrail_domain::settlement::SettlementCycle;
use payrail_domain::{MerchantId, SettlementId};
use payrail_store::{
    NewSettlement, SettleOutcome, SettlementCycleRecord, SettlementRecord, StatementPayment,
    StatementRefund,
};

/// Merchants and currencies read per page; a run pages through all of them (review finding: a
/// run that stopped at the first page never settled the merchants after it, since every active
/// merchant always has unsettled payments of the current day).
pub const SETTLE_GROUPS_PAGE: u32 = 1_000;
/// Pages one run reads at most (a million merchant-currency groups).
pub const SETTLE_GROUP_PAGES_MAX: usize = 1_000;
/// Business days one run walks per merchant and currency (a backlog catches up over runs).
pub const SETTLE_DAYS_PER_RUN_MAX: usize = 62;
/// How often the scheduled worker runs.
pub const SETTLE_PERIOD_MS: u64 = 60_000;

/// The cycle used when neither the merchant nor the platform has one: T+1, calendar days in
/// China (00:00 at UTC+08:00).
pub fn builtin_cycle() -> Result<SettlementCycle, EngineError> {
    SettlementCycle::new(1, TimeOfDay::MIDNIGHT, CHINA_OFFSET_MINUTES)
        .map_err(|e| EngineError::Internal(e.to_string()))
}

fn cycle_of(r: &SettlementCycleRecord) -> Result<SettlementCycle, EngineError> {
    let bad = |e: String| EngineError::Internal(format!("stored settlement cycle: {e}"));
    SettlementCycle::new(
        u16::try_from(r.t_plus_days).map_err(|e| bad(e.to_string()))?,
        TimeOfDay::parse(&r.cutoff).map_err(|e| bad(e.to_string()))?,
        i32::try_from(r.utc_offset_minutes).map_err(|e| bad(e.to_string()))?,
    )
    .map_err(|e| bad(e.to_string()))
}

/// What one run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SettleReport {
    pub created: Vec<SettlementRecord>,
    /// Batches found already made (re-runs).
    pub existing: usize,
    /// Merchant-currency groups that failed (logged); the next run retries them.
    pub failed: usize,
}

impl Engine {
    pub async fn put_settlement_cycle(
        &self,
        merchant: Option<MerchantId>,
        cycle: SettlementCycle,
    ) -> Result<SettlementCycleRecord, EngineError> {
        if let Some(m) = merchant {
            self.get_merchant(m).await?;
        }
        let r = SettlementCycleRecord {
            merchant_id: merchant,
            t_plus_days: i64::from(cycle.t_plus_days()),
            cutoff: cycle.cutoff().to_string(),
            utc_offset_minutes: i64::from(cycle.offset_minutes()),
            updated_at_ms: self.now_ms(),
        };
        self.store.put_settlement_cycle(&r).await?;
        Ok(r)
    }

    pub async fn list_settlement_cycles(&self) -> Result<Vec<SettlementCycleRecord>, EngineError> {
        Ok(self.store.list_settlement_cycles().await?)
    }

    /// The cycle in force for a merchant: its own, else the platform default, else
    /// [`builtin_cycle`].
    pub async fn settlement_cycle(
        &self,
        merchant: MerchantId,
    ) -> Result<SettlementCycle, EngineError> {
        let cycles = self.store.list_settlement_cycles().await?;
        let own = cycles.iter().find(|c| c.merchant_id == Some(merchant));
        let default = cycles.iter().find(|c| c.merchant_id.is_none());
        match own.or(default) {
            Some(r) => cycle_of(r),
            None => builtin_cycle(),
        }
    }

    /// Settles every due business day up to `upto` (or the latest due one), see the module
    /// documentation.
    pub async fn run_settlement(&self, upto: Option<Date>) -> Result<SettleReport, EngineError> {
        let now = self.now_ms();
        let cycles = self.store.list_settlement_cycles().await?;
        let mut report = SettleReport::default();
        let mut after: Option<(MerchantId, String)> = None;
        let page = self.config.settle_groups_page.clamp(1, SETTLE_GROUPS_PAGE);
        for _ in 0..SETTLE_GROUP_PAGES_MAX {
            let groups = self.store.unsettled_groups(after.clone(), page).await?;
            let full = groups.len() >= page as usize;
            for g in &groups {
                let own = cycles.iter().find(|c| c.merchant_id == Some(g.merchant_id));
                let default = cycles.iter().find(|c| c.merchant_id.is_none());
                // A bad stored cycle fails its own group, not the run.
                let settled = match own.or(default).map_or_else(builtin_cycle, cycle_of) {
                    Ok(cycle) => self.settle_group(&cycle, g, now, upto, &mut report).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = settled {
                    report.failed = report.failed.saturating_add(1);
                    tracing::error!(merchant_id = %g.merchant_id, currency = %g.currency, error = %e, "settlement failed");
                    let _ = self
                        .store
                        .insert_alert_once(&payrail_store::AlertRecord {
                            kind: "settlement_failed".into(),
                            subject_id: format!("{}:{}", g.merchant_id, g.currency),
                            detail: format!("settlement run failed: {e}"),
                            created_at_ms: now,
                        })
                        .await;
                }
            }
            match groups.last() {
                Some(g) if full => after = Some((g.merchant_id, g.currency.clone())),
                _ => break,
            }
        }
        if !report.created.is_empty() {
            self.metrics.add(
                "payrail_settlements_created_total",
                "Settlement batches created.",
                &[],
                u64::try_from(report.created.len()).unwrap_or(0),
            );
        }
        Ok(report)
    }

    async fn settle_group(
        &self,
        cycle: &SettlementCycle,
        g: &payrail_store::UnsettledGroup,
        now: i64,
        upto: Option<Date>,
        report: &mut SettleReport,
    ) -> Result<(), EngineError> {
        let err = |e: payrail_domain::settlement::SettlementError| {
            EngineError::Internal(format!("settlement cycle: {e}"))
        };
        let mut last = cycle.latest_due_day(now).map_err(err)?;
        if let Some(d) = upto {
            last = last.min(d);
        }
        let mut day = cycle.business_day(g.oldest_cleared_at_ms).map_err(err)?;
        for _ in 0..SETTLE_DAYS_PER_RUN_MAX {
            if day > last {
                break;
            }
            let (start, end) = cycle.window(day).map_err(err)?;
            let s = NewSettlement {
                id: self.ids.next(),
                merchant_id: g.merchant_id,
                currency: g.currency.clone(),
                business_day: day.to_string(),
                t_plus_days: i64::from(cycle.t_plus_days()),
                cutoff: cycle.cutoff().to_string(),
                utc_offset_minutes: i64::from(cycle.offset_minutes()),
                window_start_ms: start,
                window_end_ms: end,
                due_at_ms: cycle.due_at_ms(day).map_err(err)?,
                now_ms: now,
            };
            match self.store.settle(&s).await? {
                SettleOutcome::Created(r) => {
                    tracing::info!(settlement_id = %r.id, merchant_id = %r.merchant_id, day = %r.business_day, net_minor = r.net_minor, "settlement batch created");
                    report.created.push(r);
                }
                SettleOutcome::Exists(_) => report.existing = report.existing.saturating_add(1),
                SettleOutcome::Nothing => {}
            }
            day = day
                .add_days(1)
                .map_err(|e| EngineError::Internal(e.to_string()))?;
        }
        Ok(())
    }

    pub async fn get_settlement(
        &self,
        merchant: Option<MerchantId>,
        id: SettlementId,
    ) -> Result<SettlementRecord, EngineError> {
        self.store
            .get_settlement(merchant, id)
            .await?
            .ok_or(EngineError::NotFound("settlement"))
    }

    /// One page, newest first, and whether more follow.
    pub async fn list_settlements(
        &self,
        merchant: Option<MerchantId>,
        limit: u32,
        starting_after: Option<SettlementId>,
    ) -> Result<(Vec<SettlementRecord>, bool), EngineError> {
        let limit = limit.clamp(1, crate::merchants::PAGE_LIMIT_MAX);
        let mut rows = self
            .store
            .list_settlements(merchant, limit.saturating_add(1), starting_after)
            .await?;
        let has_more = rows.len() > limit as usize;
        rows.truncate(limit as usize);
        Ok((rows, has_more))
    }

    /// A batch and its lines (the merchant's own only, when `merchant` is given).
    pub async fn settlement_statement(
        &self,
        merchant: Option<MerchantId>,
        id: SettlementId,
    ) -> Result<
        (
            SettlementRecord,
            Vec<StatementPayment>,
            Vec<StatementRefund>,
        ),
        EngineError,
    > {
        let s = self.get_settlement(merchant, id).await?;
        let (p, r) = self.store.settlement_lines(id).await?;
        Ok((s, p, r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_cycle_is_t1_at_beijing_midnight() {
        let c = builtin_cycle().unwrap();
        assert_eq!(c.t_plus_days(), 1);
        assert_eq!(c.cutoff(), TimeOfDay::MIDNIGHT);
        assert_eq!(c.offset_minutes(), CHINA_OFFSET_MINUTES);
    }
}
