//! The wallet payment method: an end user's stored balance at payrail (钱包余额支付), paid with
//! in two phases (TCC) on the ledger.
//!
//! - **Try** (`submit`): a pending entry `pay_…:wallet_freeze` holds the amount on the wallet —
//!   D wallet, C merchant pending (net), C platform fee — for [`WALLET_FREEZE_TIMEOUT_MS`]. The
//!   wallet's no-overdraft limit counts held amounts and is checked under the ledger's write
//!   lock (SQLite's single writer; the wallet's balance row lock on PostgreSQL), so concurrent
//!   payments can never spend the same balance: a Try that does not fit fails the payment
//!   (`insufficient_balance`) and holds nothing.
//! - **Confirm**: the payment's success is applied like any channel's, and its transaction posts
//!   `pay_…:wallet_confirm` (the freeze, posted in full) with the status change.
//! - **Cancel**: a wallet payment ending any other way (failed, closed) releases the freeze
//!   (`pay_…:wallet_cancel`) in the transaction of that status change; a cancel with no freeze
//!   (空回滚) or an expired one is accepted.
//!
//! A crash between Try and Confirm leaves the payment processing with its status-sync job: the
//! job asks this connector (`query`), which answers from the hold — still pending: succeeded
//! (the engine confirms); released or expired: failed; no hold a minute after the Try: failed,
//! and a Try that lands later anyway (悬挂) holds the money until its timeout releases it.
//! Refunds need no channel: `refund` answers succeeded at once, and the refund's transaction
//! credits the wallet.

use crate::clearing::FeeCache;
use crate::{Engine, EngineError};
use async_trait::async_trait;
use payrail_channels::{
    Capabilities, Connector, MethodCapability, QueryRequest, RefundOutcome, RefundRequest,
    SubmitRequest, SubmitResponse,
};
use payrail_domain::clearing::WALLET_CHANNEL;
use payrail_domain::input::PaymentMethod;
use payrail_domain::ledger::{AccountId, AccountKind, EntryId, HoldState, PostOutcome, Reject};
use payrail_domain::posting_rules::{wallet_freeze, wallet_top_up, TopUpSource};
use payrail_domain::ChannelOutcome;
use payrail_domain::{Clock, Money, PaymentId, TopUpId};
use payrail_store::ledger::{AccountRecord, AccountSpec};
use payrail_store::DynStore;
use std::sync::Arc;

/// How long a wallet freeze holds its amount before it expires by itself. Confirm follows the
/// Try within one request; the margin covers a crash and the status-sync job's first query.
pub const WALLET_FREEZE_TIMEOUT_MS: i64 = 15 * 60 * 1000;
/// A payment whose freeze is still missing this long after the Try has failed.
pub const WALLET_TRY_GRACE_MS: i64 = 60_000;

/// The id of a wallet payment's freeze (Try).
pub fn freeze_id(payment: PaymentId) -> Result<EntryId, EngineError> {
    EntryId::derived(&payment, "wallet_freeze")
        .map_err(|e| EngineError::Internal(format!("freeze id: {e}")))
}

pub struct WalletConnector {
    store: DynStore,
    fees: Arc<FeeCache>,
    clock: Arc<dyn Clock>,
}

fn failed(code: &str, message: &str) -> ChannelOutcome {
    ChannelOutcome::Failed {
        code: code.into(),
        message: message.into(),
    }
}

impl WalletConnector {
    pub fn new(store: DynStore, fees: Arc<FeeCache>, clock: Arc<dyn Clock>) -> WalletConnector {
        WalletConnector { store, fees, clock }
    }

    async fn payment_of(&self, req_attempt: payrail_domain::AttemptId) -> Option<PaymentId> {
        self.store
            .get_attempt(req_attempt)
            .await
            .ok()
            .flatten()
            .map(|a| a.payment_id)
    }

    async fn try_freeze(&self, req: &SubmitRequest) -> ChannelOutcome {
        let Some(holder) = req.payer_id.as_deref() else {
            return failed(
                "wallet_missing",
                "a wallet payment names its wallet in payer_id",
            );
        };
        let attempt = match self.store.get_attempt(req.attempt_id).await {
            Ok(Some(a)) => a,
            Ok(None) => return ChannelOutcome::unknown("attempt not found"),
            Err(e) => return ChannelOutcome::unknown(e.to_string()),
        };
        let fixed = match self
            .fees
            .fee_for(
                attempt.merchant_id,
                WALLET_CHANNEL,
                req.method.as_str(),
                req.amount,
            )
            .await
        {
            Ok(f) => f,
            Err(e) => return ChannelOutcome::unknown(e.to_string()),
        };
        let entry = match wallet_freeze(
            attempt.payment_id,
            holder,
            attempt.merchant_id,
            &fixed.quote,
            WALLET_FREEZE_TIMEOUT_MS,
        ) {
            Ok(e) => e,
            Err(_) => return failed("wallet_invalid", "payer_id is not a valid wallet id"),
        };
        let now = self.clock.now_ms();
        for _ in 0..2 {
            let out = match self
                .store
                .post_entries(std::slice::from_ref(&entry), now)
                .await
            {
                Ok(mut o) if o.len() == 1 => o.remove(0),
                Ok(_) => return ChannelOutcome::unknown("ledger answered no outcome"),
                Err(e) => return ChannelOutcome::unknown(e.to_string()),
            };
            match out {
                PostOutcome::Posted(_) | PostOutcome::Replayed(_) => {
                    return ChannelOutcome::Succeeded {
                        channel_trade_no: Some(entry.id().to_string()),
                        paid_at_ms: Some(now),
                    }
                }
                PostOutcome::Rejected(Reject::AccountNotFound(a))
                    if a.kind() == AccountKind::Wallet =>
                {
                    return failed("wallet_not_found", "no such wallet in this currency");
                }
                PostOutcome::Rejected(Reject::AccountNotFound(_)) => {
                    // The merchant's or the platform's account, opened on first use.
                    let specs: Vec<AccountSpec> = entry
                        .postings()
                        .iter()
                        .filter(|p| p.account.kind() != AccountKind::Wallet)
                        .map(|p| payrail_store::payment_path_spec(p.account.clone()))
                        .collect();
                    if let Err(e) = self.store.open_accounts(&specs, now).await {
                        return ChannelOutcome::unknown(e.to_string());
                    }
                }
                PostOutcome::Rejected(Reject::ExceedsCredits(_)) => {
                    return failed(
                        "insufficient_balance",
                        "the wallet's available balance does not cover the payment",
                    );
                }
                PostOutcome::Rejected(r) => return failed(r.code(), &r.to_string()),
            }
        }
        ChannelOutcome::unknown("accounts could not be opened")
    }

    /// The payment's state as its freeze tells it.
    async fn hold_outcome(&self, req: &QueryRequest, closing: bool) -> ChannelOutcome {
        let Some(payment) = self.payment_of(req.attempt_id).await else {
            return ChannelOutcome::unknown("attempt not found");
        };
        let id = match freeze_id(payment) {
            Ok(id) => id,
            Err(e) => return ChannelOutcome::unknown(e.to_string()),
        };
        let now = self.clock.now_ms();
        let entry = match self.store.get_entry(&id).await {
            Ok(e) => e,
            Err(e) => return ChannelOutcome::unknown(e.to_string()),
        };
        let Some(hold) = entry.and_then(|e| e.hold) else {
            if closing || now.saturating_sub(req.submitted_at_ms) >= WALLET_TRY_GRACE_MS {
                return if closing {
                    ChannelOutcome::Closed
                } else {
                    failed("wallet_not_frozen", "the wallet was never debited")
                };
            }
            return ChannelOutcome::unknown("freeze not found yet");
        };
        match hold.state {
            HoldState::Posted => ChannelOutcome::Succeeded {
                channel_trade_no: Some(id.to_string()),
                paid_at_ms: None,
            },
            HoldState::Pending if now < hold.expires_at_ms && !closing => {
                ChannelOutcome::Succeeded {
                    channel_trade_no: Some(id.to_string()),
                    paid_at_ms: None,
                }
            }
            // Closing a frozen payment releases the freeze in the same status change.
            HoldState::Pending if closing => ChannelOutcome::Closed,
            _ if closing => ChannelOutcome::Closed,
            _ => failed("wallet_hold_released", "the wallet freeze was released"),
        }
    }
}

#[async_trait]
impl Connector for WalletConnector {
    fn name(&self) -> &'static str {
        WALLET_CHANNEL
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            methods: vec![MethodCapability {
                method: PaymentMethod::Wallet,
                close: true,
                cancel: false,
                notifies: false,
            }],
            refund: true,
            partial_refund: true,
            refund_window_days: 365,
            max_refunds_per_payment: None,
            cancel_window_ms: None,
            refund_query_delay_ms: 0,
            bills: false,
            close_confirm_delay_ms: 0,
        }
    }

    async fn submit(&self, req: &SubmitRequest) -> SubmitResponse {
        SubmitResponse {
            outcome: self.try_freeze(req).await,
            next_action: None,
        }
    }

    async fn query(&self, req: &QueryRequest) -> ChannelOutcome {
        self.hold_outcome(req, false).await
    }

    async fn close(&self, req: &QueryRequest) -> ChannelOutcome {
        self.hold_outcome(req, true).await
    }

    /// The refund's money moves in its own status change (the wallet is credited there), so
    /// there is nothing to call: it succeeds at once, and asking again says the same.
    async fn refund(&self, req: &RefundRequest) -> RefundOutcome {
        RefundOutcome::Succeeded {
            channel_refund_no: Some(req.refund_id.to_string()),
            refunded_at_ms: None,
        }
    }

    async fn query_refund(&self, req: &RefundRequest) -> RefundOutcome {
        self.refund(req).await
    }
}

impl Engine {
    /// Credits an end user's wallet at a merchant (opening it on first use): D funding, C
    /// wallet. Returns the wallet's account afterwards.
    pub async fn top_up_wallet(
        &self,
        merchant: payrail_domain::MerchantId,
        holder: &str,
        amount: Money,
    ) -> Result<AccountRecord, EngineError> {
        self.get_merchant(merchant).await?;
        let account = AccountId::wallet(merchant, holder, amount.currency())
            .map_err(|_| EngineError::NotFound("wallet"))?;
        let id: TopUpId = self.ids.next();
        let entry = wallet_top_up(&id, merchant, holder, amount, &TopUpSource::Operator)
            .map_err(|e| EngineError::Internal(format!("posting rule: {e}")))?;
        let now = self.now_ms();
        let specs: Vec<AccountSpec> = entry
            .postings()
            .iter()
            .map(|p| AccountSpec::default_for(p.account.clone()))
            .collect();
        self.store.open_accounts(&specs, now).await?;
        match self
            .store
            .post_entries(std::slice::from_ref(&entry), now)
            .await?
            .into_iter()
            .next()
        {
            Some(PostOutcome::Posted(_)) | Some(PostOutcome::Replayed(_)) => {}
            Some(PostOutcome::Rejected(r)) => {
                return Err(EngineError::Internal(format!("top-up refused: {r}")))
            }
            None => return Err(EngineError::Internal("top-up: no outcome".into())),
        }
        self.store
            .get_account(&account)
            .await?
            .ok_or(EngineError::NotFound("wallet"))
    }

    /// The accounts of an end user's wallet at a merchant (one per currency).
    pub async fn wallet_accounts(
        &self,
        merchant: payrail_domain::MerchantId,
        holder: &str,
    ) -> Result<Vec<AccountRecord>, EngineError> {
        let Ok(any) = AccountId::wallet(merchant, holder, payrail_domain::Currency::CNY) else {
            return Err(EngineError::NotFound("wallet"));
        };
        Ok(self
            .store
            .list_ledger_accounts(
                &format!("{}:{}:", AccountKind::Wallet, any.owner()),
                payrail_store::LIST_LIMIT_MAX,
                None,
            )
            .await?)
    }
}
