//! Posting rules: the journal entry of each business event. Pure functions from facts to an
//! [`Entry`]; the caller posts it in the same transaction as the status change it records.
//!
//! Every entry id is derived from the event (`pay_…:captured`, `ref_…:refund`, `stl:…`), so an
//! event retried or replayed posts the same id, which the ledger answers with the original
//! receipt: a succeeded payment has exactly one posting set.
//!
//! Postings of zero are left out (a payment without fee has no fee line). Worked examples with
//! numbers are in docs/ledger.md.

use crate::civil::Date;
use crate::fees::{FeeQuote, RefundQuote};
use crate::id::{MerchantId, PaymentId};
use crate::ledger::{AccountId, Entry, EntryCode, EntryId, LedgerError, Posting};
use crate::money::Money;
use crate::settlement::settlement_entry_id;
use std::fmt::Display;

/// Which merchant balance pays a refund: the pending one while the payment is not settled yet,
/// the available one after (退款: 未结算从待结算账户扣, 已结算从可用余额扣).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefundSource {
    Pending,
    Available,
}

/// Where a wallet top-up's money comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopUpSource {
    /// An operator credits the wallet (funded outside the platform).
    Operator,
    /// The user paid through a channel, which now owes the platform.
    Channel(String),
}

fn push_nonzero(out: &mut Vec<Posting>, posting: Posting) {
    if !posting.amount.is_zero() {
        out.push(posting);
    }
}

fn merchant_account(source: RefundSource, merchant: MerchantId, amount: Money) -> AccountId {
    match source {
        RefundSource::Pending => AccountId::merchant_pending(merchant, amount.currency()),
        RefundSource::Available => AccountId::merchant_available(merchant, amount.currency()),
    }
}

fn minus(a: Money, b: Money) -> Result<Money, LedgerError> {
    Ok(a.checked_sub(b)?)
}

/// Payment succeeded on a channel (清分):
/// D channel clearing (amount − channel cost), D channel cost,
/// C merchant pending (amount − fee), C platform fee.
pub fn payment_succeeded(
    payment: PaymentId,
    merchant: MerchantId,
    channel: &str,
    quote: &FeeQuote,
) -> Result<Entry, LedgerError> {
    let c = quote.amount.currency();
    let mut p = Vec::with_capacity(4);
    push_nonzero(
        &mut p,
        Posting::debit(
            AccountId::channel_clearing(channel, c)?,
            minus(quote.amount, quote.channel_cost)?,
        ),
    );
    push_nonzero(
        &mut p,
        Posting::debit(AccountId::channel_cost(channel, c)?, quote.channel_cost),
    );
    push_nonzero(
        &mut p,
        Posting::credit(AccountId::merchant_pending(merchant, c), quote.net),
    );
    push_nonzero(
        &mut p,
        Posting::credit(AccountId::platform_fee(c), quote.fee),
    );
    Entry::posted(
        EntryId::derived(&payment, "captured")?,
        EntryCode::PaymentCaptured,
        Some(&payment.to_string()),
        p,
    )
}

/// A refund of a channel payment, the reverse of [`payment_succeeded`] for the refunded part:
/// D merchant (refund − fee refund), D platform fee (fee refund),
/// C channel clearing (refund − channel cost refund), C channel cost (its refund).
pub fn refund(
    refund_id: &impl Display,
    payment: PaymentId,
    merchant: MerchantId,
    channel: &str,
    quote: &RefundQuote,
    source: RefundSource,
) -> Result<Entry, LedgerError> {
    let c = quote.refund.currency();
    let mut p = Vec::with_capacity(4);
    push_nonzero(
        &mut p,
        Posting::debit(
            merchant_account(source, merchant, quote.refund),
            quote.merchant_debit,
        ),
    );
    push_nonzero(
        &mut p,
        Posting::debit(AccountId::platform_fee(c), quote.fee_refund),
    );
    push_nonzero(
        &mut p,
        Posting::credit(
            AccountId::channel_clearing(channel, c)?,
            minus(quote.refund, quote.cost_refund)?,
        ),
    );
    push_nonzero(
        &mut p,
        Posting::credit(AccountId::channel_cost(channel, c)?, quote.cost_refund),
    );
    Entry::posted(
        EntryId::derived(refund_id, "refund")?,
        EntryCode::Refund,
        Some(&payment.to_string()),
        p,
    )
}

/// Settlement of a merchant's business day: D merchant pending, C merchant available. One id per
/// merchant, currency and day, so re-running the day posts nothing new.
pub fn settlement(merchant: MerchantId, day: Date, amount: Money) -> Result<Entry, LedgerError> {
    let c = amount.currency();
    Entry::posted(
        settlement_entry_id(merchant, c, day)?,
        EntryCode::Settlement,
        Some(&day.to_string()),
        vec![
            Posting::debit(AccountId::merchant_pending(merchant, c), amount),
            Posting::credit(AccountId::merchant_available(merchant, c), amount),
        ],
    )
}

/// A payout to the merchant's bank: D merchant available, C payout clearing. The available
/// balance's no-overdraft limit refuses a payout it cannot cover.
pub fn payout(
    payout_id: &impl Display,
    merchant: MerchantId,
    amount: Money,
) -> Result<Entry, LedgerError> {
    let c = amount.currency();
    Entry::posted(
        EntryId::derived(payout_id, "payout")?,
        EntryCode::Payout,
        Some(&payout_id.to_string()),
        vec![
            Posting::debit(AccountId::merchant_available(merchant, c), amount),
            Posting::credit(AccountId::payout_clearing(merchant, c), amount),
        ],
    )
}

/// A payout the bank definitely refused: its amount back to the merchant's available balance,
/// D payout clearing, C merchant available — the sides of [`payout`] swapped, with its own id
/// so the payout and its reversal are two entries of one payout (`po_…:payout`,
/// `po_…:payout_reversal`), each posted once.
pub fn payout_reversal(
    payout_id: &impl Display,
    merchant: MerchantId,
    amount: Money,
) -> Result<Entry, LedgerError> {
    let c = amount.currency();
    Entry::posted(
        EntryId::derived(payout_id, "payout_reversal")?,
        EntryCode::PayoutReversal,
        Some(&payout_id.to_string()),
        vec![
            Posting::debit(AccountId::payout_clearing(merchant, c), amount),
            Posting::credit(AccountId::merchant_available(merchant, c), amount),
        ],
    )
}

/// Wallet top-up: D funding (operator) or channel clearing (paid through a channel), C wallet.
pub fn wallet_top_up(
    top_up_id: &impl Display,
    merchant: MerchantId,
    holder: &str,
    amount: Money,
    source: &TopUpSource,
) -> Result<Entry, LedgerError> {
    let c = amount.currency();
    let from = match source {
        TopUpSource::Operator => AccountId::funding(c),
        TopUpSource::Channel(ch) => AccountId::channel_clearing(ch, c)?,
    };
    Entry::posted(
        EntryId::derived(top_up_id, "top_up")?,
        EntryCode::WalletTopUp,
        Some(&top_up_id.to_string()),
        vec![
            Posting::debit(from, amount),
            Posting::credit(AccountId::wallet(merchant, holder, c)?, amount),
        ],
    )
}

fn freeze_id(payment: PaymentId) -> Result<EntryId, LedgerError> {
    EntryId::derived(&payment, "wallet_freeze")
}

/// Pay with the wallet, phase one (Try, 冻结): a pending entry that holds the amount on the
/// wallet — D wallet (amount), C merchant pending (net), C platform fee (fee) — for at most
/// `timeout_ms`. The wallet's no-overdraft flag counts held amounts, so concurrent payments can
/// never spend the same balance twice. A wallet has no channel, so the quote's channel cost is
/// not posted.
pub fn wallet_freeze(
    payment: PaymentId,
    holder: &str,
    merchant: MerchantId,
    quote: &FeeQuote,
    timeout_ms: i64,
) -> Result<Entry, LedgerError> {
    let c = quote.amount.currency();
    let mut p = Vec::with_capacity(3);
    p.push(Posting::debit(
        AccountId::wallet(merchant, holder, c)?,
        quote.amount,
    ));
    push_nonzero(
        &mut p,
        Posting::credit(AccountId::merchant_pending(merchant, c), quote.net),
    );
    push_nonzero(
        &mut p,
        Posting::credit(AccountId::platform_fee(c), quote.fee),
    );
    Entry::pending(
        freeze_id(payment)?,
        EntryCode::WalletFreeze,
        Some(&payment.to_string()),
        p,
        timeout_ms,
    )
}

/// Phase two, Confirm: posts the freeze in full.
pub fn wallet_confirm(payment: PaymentId) -> Result<Entry, LedgerError> {
    Entry::post_pending(
        EntryId::derived(&payment, "wallet_confirm")?,
        EntryCode::WalletConfirm,
        Some(&payment.to_string()),
        freeze_id(payment)?,
    )
}

/// Phase two, Cancel: releases the freeze.
pub fn wallet_cancel(payment: PaymentId) -> Result<Entry, LedgerError> {
    Entry::void_pending(
        EntryId::derived(&payment, "wallet_cancel")?,
        EntryCode::WalletCancel,
        Some(&payment.to_string()),
        freeze_id(payment)?,
    )
}

/// A refund of a wallet payment, back to the wallet:
/// D merchant (refund − fee refund), D platform fee (fee refund), C wallet (refund).
pub fn wallet_refund(
    refund_id: &impl Display,
    payment: PaymentId,
    holder: &str,
    merchant: MerchantId,
    quote: &RefundQuote,
    source: RefundSource,
) -> Result<Entry, LedgerError> {
    let c = quote.refund.currency();
    let mut p = Vec::with_capacity(3);
    push_nonzero(
        &mut p,
        Posting::debit(
            merchant_account(source, merchant, quote.refund),
            quote.merchant_debit,
        ),
    );
    push_nonzero(
        &mut p,
        Posting::debit(AccountId::platform_fee(c), quote.fee_refund),
    );
    p.push(Posting::credit(
        AccountId::wallet(merchant, holder, c)?,
        quote.refund,
    ));
    Entry::posted(
        EntryId::derived(refund_id, "wallet_refund")?,
        EntryCode::WalletRefund,
        Some(&payment.to_string()),
        p,
    )
}

/// The correction of a posted entry: the same postings with sides swapped. Entries are never
/// edited; a mistake is undone by posting this, then the right entry.
pub fn reversal(id: EntryId, original: &Entry) -> Result<Entry, LedgerError> {
    let postings = original
        .postings()
        .iter()
        .map(|p| Posting {
            account: p.account.clone(),
            side: p.side.opposite(),
            amount: p.amount,
        })
        .collect();
    Entry::posted(
        id,
        EntryCode::Reversal,
        Some(original.id().as_str()),
        postings,
    )
}

#[cfg(test)]
mod tests;
