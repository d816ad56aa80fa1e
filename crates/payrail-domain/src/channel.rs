//! What a channel told us about an attempt, after the connector's conservative mapping.

/// The outcome of one channel call (submit, query, close, …) as the connector understood it.
///
/// Connectors must map conservatively: only an explicit business rejection is
/// [`ChannelOutcome::Failed`]. A timeout, network error, 5xx, malformed or unsigned response,
/// system-busy code or "order not found" is [`ChannelOutcome::Unknown`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelOutcome {
    /// The channel confirms the money was taken.
    Succeeded {
        channel_trade_no: Option<String>,
        paid_at_ms: Option<i64>,
    },
    /// The channel definitely rejected the payment; no money moved.
    Failed { code: String, message: String },
    /// The channel has the order and it is still open (QR not yet scanned, USERPAYING, …).
    Processing { channel_trade_no: Option<String> },
    /// We do not know. Never a failure: the attempt stays processing until a definite answer.
    Unknown { reason: String },
    /// The channel confirms the unpaid order is closed; it can no longer be paid.
    Closed,
    /// The channel confirms the order was cancelled (revoked/reversed), refunding any capture.
    Cancelled,
}

impl ChannelOutcome {
    pub fn unknown(reason: impl Into<String>) -> ChannelOutcome {
        ChannelOutcome::Unknown {
            reason: reason.into(),
        }
    }

    /// True when the outcome ends the attempt.
    pub fn is_definite(&self) -> bool {
        matches!(
            self,
            ChannelOutcome::Succeeded { .. }
                | ChannelOutcome::Failed { .. }
                | ChannelOutcome::Closed
                | ChannelOutcome::Cancelled
        )
    }

    /// Short label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            ChannelOutcome::Succeeded { .. } => "succeeded",
            ChannelOutcome::Failed { .. } => "failed",
            ChannelOutcome::Processing { .. } => "processing",
            ChannelOutcome::Unknown { .. } => "unknown",
            ChannelOutcome::Closed => "closed",
            ChannelOutcome::Cancelled => "cancelled",
        }
    }
}
