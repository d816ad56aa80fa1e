//! Channel notifications: the channel tells us an order's (or a refund's) outcome.
//!
//! A valid signature is not enough (jeepay #81): the notification must also name an order we
//! sent to *this* account, for the amount and currency we asked, addressed to the channel
//! merchant (and app) the account is. A mismatch changes nothing and raises an alert; it is
//! still acknowledged, so the channel stops repeating something we will never apply. A
//! notification we could not process (storage down) is refused, so the channel repeats it.
//! Statuses change only through `apply_outcome`: first definite answer wins, unknown changes
//! nothing, a contradiction raises `channel_conflict`.

use crate::{Engine, EngineError};
use payrail_channels::{
    ChannelNotification, InboundNotification, NotificationError, NotificationEvent,
    NotificationReply,
};
use payrail_domain::ChannelAccountId;
use payrail_store::AlertRecord;

/// What became of a notification (for logs, metrics and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotificationResult {
    /// Applied (or a harmless repeat of what we know).
    Applied,
    /// Signature, timestamp or format refused; the channel will repeat it.
    Refused,
    /// A signature probe: refused on purpose, nothing else.
    Probe,
    /// Valid, but it does not match our order; acknowledged, nothing changed, alert raised.
    Mismatch,
    /// Valid, for an order we do not know; acknowledged, alert raised.
    UnknownOrder,
    /// We could not process it now (storage); refused so that the channel repeats it.
    Retry,
}

impl NotificationResult {
    pub fn label(&self) -> &'static str {
        match self {
            NotificationResult::Applied => "applied",
            NotificationResult::Refused => "refused",
            NotificationResult::Probe => "probe",
            NotificationResult::Mismatch => "mismatch",
            NotificationResult::UnknownOrder => "unknown_order",
            NotificationResult::Retry => "retry",
        }
    }
}

impl Engine {
    /// Handles one notification sent to account `account_id`'s endpoint. `Err` only for an
    /// account this process does not know (404); everything else is answered with the
    /// channel's own acknowledgement format.
    pub async fn handle_channel_notification(
        &self,
        account_id: ChannelAccountId,
        inbound: InboundNotification,
    ) -> Result<(NotificationReply, NotificationResult), EngineError> {
        let entry = self
            .channel_account(account_id)
            .ok_or(EngineError::NotFound("channel account"))?;
        let connector = entry.connector.clone();
        let result = match connector.parse_notification(&inbound) {
            Err(NotificationError::Probe) => NotificationResult::Probe,
            Err(e) => {
                tracing::warn!(account = %account_id, error = %e, "channel notification refused");
                NotificationResult::Refused
            }
            Ok(n) => match self.apply_notification(&entry, n).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(account = %account_id, error = %e, "channel notification not processed; the channel will repeat it");
                    NotificationResult::Retry
                }
            },
        };
        self.metrics.inc(
            "payrail_channel_notifications_total",
            "Channel notifications received, by result.",
            &[("channel", connector.name()), ("result", result.label())],
        );
        let accepted = matches!(
            result,
            NotificationResult::Applied
                | NotificationResult::Mismatch
                | NotificationResult::UnknownOrder
        );
        Ok((connector.notification_reply(accepted), result))
    }

    async fn notification_alert(
        &self,
        kind: &str,
        subject: &str,
        detail: String,
    ) -> Result<(), EngineError> {
        tracing::error!(kind, subject, detail = %detail, "channel notification alert");
        self.store
            .insert_alert(&AlertRecord {
                kind: kind.into(),
                subject_id: subject.into(),
                detail,
                created_at_ms: self.now_ms(),
            })
            .await?;
        Ok(())
    }

    async fn apply_notification(
        &self,
        entry: &crate::channel_accounts::AccountEntry,
        n: ChannelNotification,
    ) -> Result<NotificationResult, EngineError> {
        let account_id = entry.record.id;
        let Some(attempt) = self.store.get_attempt(n.attempt_id).await? else {
            self.notification_alert(
                "notification_unknown_order",
                &n.attempt_id.to_string(),
                format!("account {account_id} notified an order we never sent"),
            )
            .await?;
            return Ok(NotificationResult::UnknownOrder);
        };
        let Some(payment) = self.store.get_payment_any(attempt.payment_id).await? else {
            return Err(EngineError::Internal(format!(
                "attempt {} has no payment",
                attempt.id
            )));
        };
        // Cross-check everything the channel signed against what we sent.
        let mut mismatches = Vec::new();
        if attempt.channel_account_id != Some(account_id) {
            mismatches.push(format!(
                "the attempt went to account {:?}, not {account_id}",
                attempt.channel_account_id.map(|i| i.to_string())
            ));
        }
        if n.channel_merchant_id != entry.channel_merchant_id {
            mismatches.push(format!(
                "channel merchant {:?}, the account is {:?}",
                n.channel_merchant_id, entry.channel_merchant_id
            ));
        }
        if let (Some(got), Some(want)) = (&n.channel_app_id, &entry.channel_app_id) {
            if got != want {
                mismatches.push(format!("channel app {got:?}, the account is {want:?}"));
            }
        }
        let is_payment = matches!(n.event, NotificationEvent::Payment { .. });
        if is_payment
            && (n.amount.amount_minor() != payment.amount_minor
                || n.amount.currency().code() != payment.currency)
        {
            mismatches.push(format!(
                "amount {} {}, the payment is {} {}",
                n.amount.amount_minor(),
                n.amount.currency().code(),
                payment.amount_minor,
                payment.currency
            ));
        }
        if !mismatches.is_empty() {
            self.notification_alert(
                "notification_mismatch",
                &payment.id.to_string(),
                mismatches.join("; "),
            )
            .await?;
            return Ok(NotificationResult::Mismatch);
        }
        match n.event {
            NotificationEvent::Payment { outcome } => {
                let updated = self.apply_outcome(payment, attempt, &outcome).await?;
                tracing::info!(payment_id = %updated.id, status = %updated.status, reported = outcome.label(), "channel notification applied");
                Ok(NotificationResult::Applied)
            }
            NotificationEvent::Refund {
                refund_id,
                refund_amount,
                refunded_total,
                outcome,
            } => {
                // The refund module cross-checks the refund (ours, its amount or the channel's
                // refunded total) and alerts on its own; every `Ok` is acknowledged.
                let notice = crate::refunds::RefundNotice {
                    attempt_id: Some(n.attempt_id),
                    refund_id,
                    refund_amount,
                    refunded_total,
                    outcome,
                };
                Ok(match self.apply_refund_notification(&notice).await? {
                    crate::refunds::RefundNoticeResult::Applied(_) => NotificationResult::Applied,
                    crate::refunds::RefundNoticeResult::Unmatched => {
                        NotificationResult::UnknownOrder
                    }
                    crate::refunds::RefundNoticeResult::Mismatch { .. } => {
                        NotificationResult::Mismatch
                    }
                })
            }
        }
    }
}
