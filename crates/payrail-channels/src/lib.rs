//! Channel connectors: the one place that speaks each payment channel's protocol.
//!
//! A connector turns our requests into the channel's wire format (signing, field names, amount
//! units) and maps the channel's answers conservatively onto [`ChannelOutcome`]. The engine wraps
//! every call in a timeout and treats a timeout as unknown, so a connector may simply await.
//!
//! Adding a channel = one module implementing [`Connector`] plus one line in [`Registry`].

pub mod sandbox;

use async_trait::async_trait;
use payrail_domain::input::PaymentMethod;
use payrail_domain::{AttemptId, ChannelOutcome, Money};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Submit one attempt to the channel.
#[derive(Debug, Clone)]
pub struct SubmitRequest {
    /// Our attempt id; sent to the channel as its merchant order number, so a later query or a
    /// notification names exactly this attempt.
    pub attempt_id: AttemptId,
    pub amount: Money,
    pub subject: String,
    pub method: PaymentMethod,
    pub submitted_at_ms: i64,
    pub expires_at_ms: i64,
}

/// Ask the channel about an attempt. Carries what some channels need to find the order again
/// (UnionPay's query wants the original order time, for example).
#[derive(Debug, Clone)]
pub struct QueryRequest {
    pub attempt_id: AttemptId,
    pub amount: Money,
    pub channel_trade_no: Option<String>,
    pub submitted_at_ms: i64,
}

/// What the payer must do next, if anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextAction {
    /// Show this payload as a QR code.
    DisplayQrCode { code_url: String },
    /// Send the payer's browser here.
    Redirect { url: String },
}

#[derive(Debug, Clone)]
pub struct SubmitResponse {
    pub outcome: ChannelOutcome,
    pub next_action: Option<NextAction>,
}

#[async_trait]
pub trait Connector: Send + Sync + 'static {
    /// Stable channel name, stored on payments and used in metrics: `sandbox`, `wechatpay`, …
    fn name(&self) -> &'static str;

    fn supports(&self, method: PaymentMethod) -> bool;

    /// Place the order. Must be safe to repeat with the same attempt id (channels de-duplicate
    /// on their merchant order number).
    async fn submit(&self, req: &SubmitRequest) -> SubmitResponse;

    /// Ask for the attempt's current status.
    async fn query(&self, req: &QueryRequest) -> ChannelOutcome;

    /// Close an unpaid order so it can no longer be paid. If the payer paid meanwhile the
    /// channel says so and the outcome is `Succeeded`.
    async fn close(&self, req: &QueryRequest) -> ChannelOutcome;
}

/// The channels this process can use, by name.
#[derive(Clone, Default)]
pub struct Registry {
    connectors: BTreeMap<&'static str, Arc<dyn Connector>>,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    pub fn register(&mut self, connector: Arc<dyn Connector>) {
        self.connectors.insert(connector.name(), connector);
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Connector>> {
        self.connectors.get(name)
    }

    /// The first registered channel that supports `method`. Real routing (priorities, limits,
    /// health) replaces this when there is more than one candidate.
    pub fn route(&self, method: PaymentMethod) -> Option<&Arc<dyn Connector>> {
        self.connectors.values().find(|c| c.supports(method))
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.connectors.keys().copied().collect()
    }
}
