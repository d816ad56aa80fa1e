//! The double-entry ledger: accounts, entries of balanced postings, two-phase entries, and
//! [`Book`], the one implementation of what posting an entry means.
//!
//! - An **account** is named by what it is, not by a surrogate key: `kind:owner:CUR`, e.g.
//!   `merchant_pending:mch_01JD…:CNY`. One currency each. Balances are four monotonic counters
//!   (TigerBeetle's model): debits and credits, each pending and posted. Nothing is ever
//!   subtracted from a posted counter; a correction is a new reversing entry.
//! - An **entry** is a set of postings that balances: Σ debits = Σ credits, in one currency, every
//!   amount > 0. [`Entry`]'s constructors refuse anything else, so an unbalanced entry cannot be
//!   built, let alone stored. The entry id is the idempotency key: the same id with the same body
//!   is a replay and returns the original receipt; the same id with another body is refused.
//! - A **two-phase** entry holds amounts as pending (a freeze, 冻结) until a later entry posts it
//!   (confirm) or voids it (cancel), or its timeout passes (it expires and the hold is released).
//! - **Flags** forbid overdraft: `DEBITS_MUST_NOT_EXCEED_CREDITS` (pending + posted debits ≤
//!   posted credits) on credit-normal accounts such as wallets and merchant balances; the mirror
//!   flag for debit-normal ones. `BUFFERED` marks hot accounts whose balance the store may apply
//!   in batches; they carry no limit, because a limit needs the live balance.
//!
//! [`Book`] applies entries to account states in memory. The stores load the accounts an entry
//! batch touches into a `Book`, post the batch, and write back what changed, so the SQLite store,
//! the PostgreSQL store and the property tests all run this same code.
//!
//! No I/O, no clock: `now_ms` is an argument.

use crate::id::MerchantId;
use crate::money::{Currency, Money, MoneyError};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;

/// Most postings in one entry. The richest posting rule (a refund with fee and channel cost
/// shares) has four; sixteen leaves room without letting one entry lock half the ledger.
pub const POSTINGS_MAX: usize = 16;
/// Longest entry id: room for a payment or refund id plus a rule suffix.
pub const ENTRY_ID_LEN_MAX: usize = 96;
/// Longest account owner (a merchant id is 30 characters, a channel name a few).
pub const OWNER_LEN_MAX: usize = 96;
/// Longest end-user id in a wallet's name (`wallet:{merchant}.{holder}:CUR`).
pub const WALLET_HOLDER_LEN_MAX: usize = 64;
/// Longest business reference carried by an entry (a payment or refund id).
pub const REFERENCE_LEN_MAX: usize = 96;
/// Longest hold of a two-phase entry: 30 days, in ms. A wallet freeze needs minutes; anything
/// longer than a settlement cycle is a mistake.
pub const PENDING_TIMEOUT_MS_MAX: i64 = 30 * 24 * 3_600 * 1_000;
/// Owner name of the platform's own accounts.
pub const PLATFORM_OWNER: &str = "platform";

// --- errors ----------------------------------------------------------------------------------

/// Why an entry or account could not be *built*: a programming or input error, found before
/// anything reaches storage.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    #[error("entry does not balance: debits {debits_minor} ≠ credits {credits_minor}")]
    Unbalanced {
        debits_minor: i128,
        credits_minor: i128,
    },
    #[error("posting amounts must be positive, got {0}")]
    NotPositive(i64),
    #[error("posting of {money} to {account}, whose currency is {}", account.currency())]
    CurrencyMismatch { account: AccountId, money: Money },
    #[error("an entry has one currency; found {0} and {1}")]
    MixedCurrencies(Currency, Currency),
    #[error("an entry needs 2..={POSTINGS_MAX} postings, got {0}")]
    PostingCount(usize),
    #[error("account {0} is both debited and credited in one entry")]
    SameAccountBothSides(AccountId),
    #[error("a pending timeout must be 1..={PENDING_TIMEOUT_MS_MAX} ms, got {0}")]
    BadTimeout(i64),
    #[error("invalid entry id {0:?}: 1..={ENTRY_ID_LEN_MAX} characters of A-Z a-z 0-9 _ - . :")]
    BadEntryId(String),
    #[error("invalid account id {0:?}: expected kind:owner:CUR")]
    BadAccountId(String),
    #[error("invalid account owner {0:?}: 1..={OWNER_LEN_MAX} characters of A-Z a-z 0-9 _ - .")]
    BadOwner(String),
    #[error("invalid reference {0:?}: at most {REFERENCE_LEN_MAX} printable ASCII characters")]
    BadReference(String),
    #[error("invalid account flags {0:#x}: {1}")]
    BadFlags(u32, &'static str),
    #[error(transparent)]
    Money(#[from] MoneyError),
}

/// Why a well-formed entry was refused when posted. Nothing of a refused entry is written, so a
/// retry after the cause is fixed (a top-up, an opened account) can succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    #[error("entry id already used with a different body")]
    IdReusedWithDifferentBody,
    #[error("account {0} is not open")]
    AccountNotFound(AccountId),
    #[error("account {0} would have debits exceeding its credits (no overdraft)")]
    ExceedsCredits(AccountId),
    #[error("account {0} would have credits exceeding its debits")]
    ExceedsDebits(AccountId),
    #[error("a balance of account {0} would leave the range of an i64")]
    BalanceOutOfRange(AccountId),
    #[error("no pending entry {0}")]
    PendingNotFound(EntryId),
    #[error("pending entry {0} was already posted")]
    PendingAlreadyPosted(EntryId),
    #[error("pending entry {0} was already voided")]
    PendingAlreadyVoided(EntryId),
    #[error("pending entry {0} has expired")]
    PendingExpired(EntryId),
}

impl Reject {
    /// A stable, machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Reject::IdReusedWithDifferentBody => "id_reused_with_different_body",
            Reject::AccountNotFound(_) => "account_not_found",
            Reject::ExceedsCredits(_) => "exceeds_credits",
            Reject::ExceedsDebits(_) => "exceeds_debits",
            Reject::BalanceOutOfRange(_) => "balance_out_of_range",
            Reject::PendingNotFound(_) => "pending_not_found",
            Reject::PendingAlreadyPosted(_) => "pending_already_posted",
            Reject::PendingAlreadyVoided(_) => "pending_already_voided",
            Reject::PendingExpired(_) => "pending_expired",
        }
    }
}

// --- small enums -----------------------------------------------------------------------------

macro_rules! str_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $s:literal),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($(#[$vm])* $variant),* }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),*];

            pub fn as_str(&self) -> &'static str {
                match self { $($name::$variant => $s),* }
            }

            pub fn parse(s: &str) -> Option<$name> {
                match s { $($s => Some($name::$variant),)* _ => None }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

str_enum! {
    /// What an account is for. The kind fixes the normal side and the default flags.
    AccountKind {
        /// Owed to a merchant, not yet settled (待结算). Credit-normal, no overdraft.
        MerchantPending = "merchant_pending",
        /// Owed to a merchant and settled: can be paid out (可用余额). Credit-normal, no overdraft.
        MerchantAvailable = "merchant_available",
        /// The platform's fee income. Credit-normal, hot.
        PlatformFee = "platform_fee",
        /// Receivable from a channel for payments it collected (渠道待清算). Debit-normal, hot.
        ChannelClearing = "channel_clearing",
        /// What channels charge the platform (渠道成本). Debit-normal, hot.
        ChannelCost = "channel_cost",
        /// Paid out to a merchant's bank account, in transit. Credit-normal.
        PayoutClearing = "payout_clearing",
        /// An end user's stored balance (钱包). Credit-normal, no overdraft.
        Wallet = "wallet",
        /// Money the operator put in (e.g. a manual wallet top-up). Debit-normal.
        Funding = "funding",
        /// Unexplained differences awaiting investigation (挂账). Debit-normal.
        Suspense = "suspense",
    }
}

str_enum! {
    /// Debit or credit.
    Side {
        Debit = "D",
        Credit = "C",
    }
}

str_enum! {
    /// What a stored entry does.
    EntryPhase {
        /// Postings that take effect at once.
        Posted = "posted",
        /// Postings held as pending until posted, voided or expired.
        Pending = "pending",
        /// Posts a pending entry's postings in full.
        PostPending = "post_pending",
        /// Releases a pending entry's postings.
        VoidPending = "void_pending",
    }
}

str_enum! {
    /// The business event an entry records.
    EntryCode {
        Transfer = "transfer",
        PaymentCaptured = "payment_captured",
        Refund = "refund",
        Settlement = "settlement",
        Payout = "payout",
        /// A failed payout's amount back to the merchant's available balance.
        PayoutReversal = "payout_reversal",
        WalletTopUp = "wallet_top_up",
        WalletFreeze = "wallet_freeze",
        WalletConfirm = "wallet_confirm",
        WalletCancel = "wallet_cancel",
        WalletRefund = "wallet_refund",
        Reversal = "reversal",
    }
}

str_enum! {
    /// The state of a two-phase entry's hold.
    HoldState {
        Pending = "pending",
        Posted = "posted",
        Voided = "voided",
        Expired = "expired",
    }
}

impl Side {
    pub fn opposite(self) -> Side {
        match self {
            Side::Debit => Side::Credit,
            Side::Credit => Side::Debit,
        }
    }
}

impl AccountKind {
    /// The side on which the account's balance is normally held.
    pub fn normal_side(self) -> Side {
        match self {
            AccountKind::ChannelClearing
            | AccountKind::ChannelCost
            | AccountKind::Funding
            | AccountKind::Suspense => Side::Debit,
            _ => Side::Credit,
        }
    }

    /// Flags an account of this kind is opened with unless told otherwise.
    pub fn default_flags(self) -> AccountFlags {
        match self {
            AccountKind::MerchantPending | AccountKind::MerchantAvailable | AccountKind::Wallet => {
                AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS
            }
            // Nearly every payment posts to these: the stores may apply their balances in
            // batches. They need no limit: fee income and clearing may legitimately swing.
            AccountKind::PlatformFee | AccountKind::ChannelClearing | AccountKind::ChannelCost => {
                AccountFlags::BUFFERED
            }
            AccountKind::PayoutClearing | AccountKind::Funding | AccountKind::Suspense => {
                AccountFlags::NONE
            }
        }
    }
}

// --- flags -----------------------------------------------------------------------------------

/// Account flags (a bit set). Construct with the constants and [`AccountFlags::with`], or from
/// stored bits with [`AccountFlags::from_bits`], which refuses unknown bits and bad combinations.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct AccountFlags(u32);

impl AccountFlags {
    pub const NONE: AccountFlags = AccountFlags(0);
    /// Refuse an entry after which pending + posted debits would exceed posted credits.
    pub const DEBITS_MUST_NOT_EXCEED_CREDITS: AccountFlags = AccountFlags(1);
    /// Refuse an entry after which pending + posted credits would exceed posted debits.
    pub const CREDITS_MUST_NOT_EXCEED_DEBITS: AccountFlags = AccountFlags(2);
    /// A hot account: its balance may be applied in batches after its postings are journaled.
    pub const BUFFERED: AccountFlags = AccountFlags(4);
    const KNOWN: u32 = 7;

    pub fn from_bits(bits: u32) -> Result<AccountFlags, LedgerError> {
        if bits & !Self::KNOWN != 0 {
            return Err(LedgerError::BadFlags(bits, "unknown flag"));
        }
        let f = AccountFlags(bits);
        if f.contains(Self::DEBITS_MUST_NOT_EXCEED_CREDITS)
            && f.contains(Self::CREDITS_MUST_NOT_EXCEED_DEBITS)
        {
            return Err(LedgerError::BadFlags(
                bits,
                "both limits would pin the balance at zero",
            ));
        }
        if f.contains(Self::BUFFERED)
            && (f.contains(Self::DEBITS_MUST_NOT_EXCEED_CREDITS)
                || f.contains(Self::CREDITS_MUST_NOT_EXCEED_DEBITS))
        {
            return Err(LedgerError::BadFlags(
                bits,
                "a buffered account cannot carry a limit: a limit needs the live balance",
            ));
        }
        Ok(f)
    }

    pub fn bits(self) -> u32 {
        self.0
    }

    pub fn contains(self, other: AccountFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// These flags plus `other`, validated.
    pub fn with(self, other: AccountFlags) -> Result<AccountFlags, LedgerError> {
        AccountFlags::from_bits(self.0 | other.0)
    }
}

impl fmt::Debug for AccountFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = [
            (
                Self::DEBITS_MUST_NOT_EXCEED_CREDITS,
                "debits_must_not_exceed_credits",
            ),
            (
                Self::CREDITS_MUST_NOT_EXCEED_DEBITS,
                "credits_must_not_exceed_debits",
            ),
            (Self::BUFFERED, "buffered"),
        ]
        .iter()
        .filter(|(flag, _)| self.contains(*flag) && flag.0 != 0)
        .map(|(_, n)| *n)
        .collect();
        write!(f, "AccountFlags({})", names.join("|"))
    }
}

// --- identifiers -----------------------------------------------------------------------------

fn owner_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= OWNER_LEN_MAX
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// An account's name: `kind:owner:CUR`. The currency is part of the name, so one owner has one
/// account per kind and currency, and a posting's currency can be checked without a lookup.
///
/// The canonical text is built once, at construction: it is what storage binds and compares
/// for every posting, so it is never re-formatted on the write path.
#[derive(Clone)]
pub struct AccountId {
    text: String,
    kind: AccountKind,
    currency: Currency,
}

impl PartialEq for AccountId {
    fn eq(&self, other: &Self) -> bool {
        // The text determines kind and currency.
        self.text == other.text
    }
}
impl Eq for AccountId {}
impl std::hash::Hash for AccountId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.text.hash(state)
    }
}
impl PartialOrd for AccountId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for AccountId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.text.cmp(&other.text)
    }
}

impl AccountId {
    pub fn new(
        kind: AccountKind,
        owner: &str,
        currency: Currency,
    ) -> Result<AccountId, LedgerError> {
        if !owner_ok(owner) {
            return Err(LedgerError::BadOwner(owner.chars().take(80).collect()));
        }
        Ok(Self::unchecked(kind, owner, currency))
    }

    /// For owners known to be valid.
    fn unchecked(kind: AccountKind, owner: &str, currency: Currency) -> AccountId {
        AccountId {
            text: format!("{kind}:{owner}:{currency}"),
            kind,
            currency,
        }
    }

    fn of_merchant(kind: AccountKind, merchant: MerchantId, currency: Currency) -> AccountId {
        // A merchant id is 30 characters of [a-z0-9_A-Z]: always a valid owner.
        Self::unchecked(kind, &merchant.to_string(), currency)
    }

    fn of_platform(kind: AccountKind, currency: Currency) -> AccountId {
        Self::unchecked(kind, PLATFORM_OWNER, currency)
    }

    pub fn merchant_pending(merchant: MerchantId, currency: Currency) -> AccountId {
        Self::of_merchant(AccountKind::MerchantPending, merchant, currency)
    }
    pub fn merchant_available(merchant: MerchantId, currency: Currency) -> AccountId {
        Self::of_merchant(AccountKind::MerchantAvailable, merchant, currency)
    }
    pub fn payout_clearing(merchant: MerchantId, currency: Currency) -> AccountId {
        Self::of_merchant(AccountKind::PayoutClearing, merchant, currency)
    }
    pub fn platform_fee(currency: Currency) -> AccountId {
        Self::of_platform(AccountKind::PlatformFee, currency)
    }
    pub fn funding(currency: Currency) -> AccountId {
        Self::of_platform(AccountKind::Funding, currency)
    }
    pub fn suspense(currency: Currency) -> AccountId {
        Self::of_platform(AccountKind::Suspense, currency)
    }
    pub fn channel_clearing(channel: &str, currency: Currency) -> Result<AccountId, LedgerError> {
        Self::new(AccountKind::ChannelClearing, channel, currency)
    }
    pub fn channel_cost(channel: &str, currency: Currency) -> Result<AccountId, LedgerError> {
        Self::new(AccountKind::ChannelCost, channel, currency)
    }
    /// An end user's stored balance at one merchant (a member card, 储值): owner
    /// `{merchant}.{holder}`. Wallets belong to a merchant because payrail does not
    /// authenticate end users: a wallet payment is authorised by the merchant that holds the
    /// wallet, so no merchant can spend another merchant's customers' balances (review finding:
    /// global wallets let any merchant pay itself from any wallet it could name).
    pub fn wallet(
        merchant: MerchantId,
        holder: &str,
        currency: Currency,
    ) -> Result<AccountId, LedgerError> {
        if holder.len() > WALLET_HOLDER_LEN_MAX || !owner_ok(holder) {
            return Err(LedgerError::BadOwner(holder.chars().take(80).collect()));
        }
        Self::new(
            AccountKind::Wallet,
            &format!("{merchant}.{holder}"),
            currency,
        )
    }

    /// The end user's id of a wallet account (its owner without the merchant), else `None`.
    pub fn wallet_holder(&self) -> Option<&str> {
        if self.kind != AccountKind::Wallet {
            return None;
        }
        self.owner().split_once('.').map(|(_, holder)| holder)
    }

    /// Parses `kind:owner:CUR`.
    pub fn parse(s: &str) -> Result<AccountId, LedgerError> {
        let bad = || LedgerError::BadAccountId(s.chars().take(120).collect());
        let mut parts = s.split(':');
        let (Some(kind), Some(owner), Some(cur), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let kind = AccountKind::parse(kind).ok_or_else(bad)?;
        let currency = Currency::parse(cur).map_err(|_| bad())?;
        if !owner_ok(owner) {
            return Err(bad());
        }
        Ok(AccountId {
            text: s.to_string(),
            kind,
            currency,
        })
    }

    /// The canonical text, `kind:owner:CUR`.
    pub fn as_str(&self) -> &str {
        &self.text
    }
    pub fn kind(&self) -> AccountKind {
        self.kind
    }
    pub fn owner(&self) -> &str {
        // Between the first and the last ':' (kinds and currency codes contain none).
        let start = self.kind.as_str().len().saturating_add(1);
        let end = self.text.len().saturating_sub(4);
        self.text.get(start..end).unwrap_or("")
    }
    pub fn currency(&self) -> Currency {
        self.currency
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// An entry's id, chosen by the caller, and its idempotency key. Posting rules derive it from
/// the business event (`pay_…:captured`), so one event can never be posted twice.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntryId(String);

impl EntryId {
    pub fn parse(s: &str) -> Result<EntryId, LedgerError> {
        if s.is_empty()
            || s.len() > ENTRY_ID_LEN_MAX
            || !s
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
        {
            return Err(LedgerError::BadEntryId(s.chars().take(120).collect()));
        }
        Ok(EntryId(s.to_string()))
    }

    /// `{object}:{suffix}`, e.g. `pay_01JD…:captured`.
    pub fn derived(object: &impl fmt::Display, suffix: &str) -> Result<EntryId, LedgerError> {
        EntryId::parse(&format!("{object}:{suffix}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EntryId({})", self.0)
    }
}

// --- entries ---------------------------------------------------------------------------------

/// One line of an entry: `amount` debited or credited to `account`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Posting {
    pub account: AccountId,
    pub side: Side,
    pub amount: Money,
}

impl Posting {
    pub fn debit(account: AccountId, amount: Money) -> Posting {
        Posting {
            account,
            side: Side::Debit,
            amount,
        }
    }
    pub fn credit(account: AccountId, amount: Money) -> Posting {
        Posting {
            account,
            side: Side::Credit,
            amount,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryBody {
    Posted(Vec<Posting>),
    Pending {
        postings: Vec<Posting>,
        timeout_ms: i64,
    },
    PostPending {
        pending_id: EntryId,
    },
    VoidPending {
        pending_id: EntryId,
    },
}

/// A validated journal entry. Every constructor checks the postings: 2..=[`POSTINGS_MAX`] of
/// them, amounts > 0 in each account's own currency, one currency, Σ debits = Σ credits (in
/// i128, so the check itself cannot overflow), no account on both sides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    id: EntryId,
    code: EntryCode,
    reference: Option<String>,
    body: EntryBody,
}

fn check_reference(reference: Option<&str>) -> Result<Option<String>, LedgerError> {
    match reference {
        None => Ok(None),
        Some(r)
            if !r.is_empty()
                && r.len() <= REFERENCE_LEN_MAX
                && r.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Ok(Some(r.to_string()))
        }
        Some(r) => Err(LedgerError::BadReference(r.chars().take(120).collect())),
    }
}

fn check_postings(postings: &[Posting]) -> Result<Currency, LedgerError> {
    if postings.len() < 2 || postings.len() > POSTINGS_MAX {
        return Err(LedgerError::PostingCount(postings.len()));
    }
    let currency = postings[0].amount.currency();
    let (mut debits, mut credits) = (0i128, 0i128);
    for p in postings {
        if p.amount.currency() != p.account.currency() {
            return Err(LedgerError::CurrencyMismatch {
                account: p.account.clone(),
                money: p.amount,
            });
        }
        if p.amount.currency() != currency {
            return Err(LedgerError::MixedCurrencies(currency, p.amount.currency()));
        }
        let amount = p.amount.amount_minor();
        if amount <= 0 {
            return Err(LedgerError::NotPositive(amount));
        }
        // ≤ 16 amounts of < 2^63 each: an i128 sum cannot overflow; saturate to satisfy the lint.
        match p.side {
            Side::Debit => debits = debits.saturating_add(i128::from(amount)),
            Side::Credit => credits = credits.saturating_add(i128::from(amount)),
        }
    }
    if debits != credits {
        return Err(LedgerError::Unbalanced {
            debits_minor: debits,
            credits_minor: credits,
        });
    }
    for p in postings {
        if postings
            .iter()
            .any(|q| q.account == p.account && q.side != p.side)
        {
            return Err(LedgerError::SameAccountBothSides(p.account.clone()));
        }
    }
    Ok(currency)
}

impl Entry {
    /// Postings that take effect at once.
    pub fn posted(
        id: EntryId,
        code: EntryCode,
        reference: Option<&str>,
        postings: Vec<Posting>,
    ) -> Result<Entry, LedgerError> {
        check_postings(&postings)?;
        Ok(Entry {
            id,
            code,
            reference: check_reference(reference)?,
            body: EntryBody::Posted(postings),
        })
    }

    /// Postings held as pending for at most `timeout_ms` (a freeze).
    pub fn pending(
        id: EntryId,
        code: EntryCode,
        reference: Option<&str>,
        postings: Vec<Posting>,
        timeout_ms: i64,
    ) -> Result<Entry, LedgerError> {
        check_postings(&postings)?;
        if !(1..=PENDING_TIMEOUT_MS_MAX).contains(&timeout_ms) {
            return Err(LedgerError::BadTimeout(timeout_ms));
        }
        Ok(Entry {
            id,
            code,
            reference: check_reference(reference)?,
            body: EntryBody::Pending {
                postings,
                timeout_ms,
            },
        })
    }

    /// Posts the pending entry `pending_id` in full (confirm).
    pub fn post_pending(
        id: EntryId,
        code: EntryCode,
        reference: Option<&str>,
        pending_id: EntryId,
    ) -> Result<Entry, LedgerError> {
        Ok(Entry {
            id,
            code,
            reference: check_reference(reference)?,
            body: EntryBody::PostPending { pending_id },
        })
    }

    /// Releases the pending entry `pending_id` (cancel).
    pub fn void_pending(
        id: EntryId,
        code: EntryCode,
        reference: Option<&str>,
        pending_id: EntryId,
    ) -> Result<Entry, LedgerError> {
        Ok(Entry {
            id,
            code,
            reference: check_reference(reference)?,
            body: EntryBody::VoidPending { pending_id },
        })
    }

    pub fn id(&self) -> &EntryId {
        &self.id
    }
    pub fn code(&self) -> EntryCode {
        self.code
    }
    pub fn reference(&self) -> Option<&str> {
        self.reference.as_deref()
    }
    pub fn body(&self) -> &EntryBody {
        &self.body
    }

    pub fn phase(&self) -> EntryPhase {
        match self.body {
            EntryBody::Posted(_) => EntryPhase::Posted,
            EntryBody::Pending { .. } => EntryPhase::Pending,
            EntryBody::PostPending { .. } => EntryPhase::PostPending,
            EntryBody::VoidPending { .. } => EntryPhase::VoidPending,
        }
    }

    /// The entry's own postings (none for post/void, which act on the pending entry's).
    pub fn postings(&self) -> &[Posting] {
        match &self.body {
            EntryBody::Posted(p) | EntryBody::Pending { postings: p, .. } => p,
            EntryBody::PostPending { .. } | EntryBody::VoidPending { .. } => &[],
        }
    }

    pub fn pending_id(&self) -> Option<&EntryId> {
        match &self.body {
            EntryBody::PostPending { pending_id } | EntryBody::VoidPending { pending_id } => {
                Some(pending_id)
            }
            _ => None,
        }
    }

    pub fn timeout_ms(&self) -> Option<i64> {
        match self.body {
            EntryBody::Pending { timeout_ms, .. } => Some(timeout_ms),
            _ => None,
        }
    }

    /// The currency of the entry's own postings.
    pub fn currency(&self) -> Option<Currency> {
        self.postings().first().map(|p| p.amount.currency())
    }

    /// A hash of everything that makes up the entry except its id: the same id with another
    /// hash is a different request. 128 bits of SHA-256 over a canonical text; the hash guards
    /// against mistakes, not adversaries (only the platform's own code posts).
    pub fn body_hash(&self) -> BodyHash {
        let mut h = Sha256::new();
        h.update(b"payrail-ledger-entry-v1\n");
        h.update(self.code.as_str());
        h.update(b"\n");
        h.update(self.reference.as_deref().unwrap_or(""));
        h.update(b"\n");
        h.update(self.phase().as_str());
        h.update(b"\n");
        match &self.body {
            EntryBody::Posted(_) => {}
            EntryBody::Pending { timeout_ms, .. } => h.update(timeout_ms.to_string()),
            EntryBody::PostPending { pending_id } | EntryBody::VoidPending { pending_id } => {
                h.update(pending_id.as_str())
            }
        }
        for p in self.postings() {
            h.update(format!(
                "\n{}|{}|{}",
                p.account,
                p.side,
                p.amount.amount_minor()
            ));
        }
        let digest = h.finalize();
        let mut out = [0u8; 16];
        out.copy_from_slice(&digest[..16]);
        BodyHash(out)
    }
}

/// See [`Entry::body_hash`].
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct BodyHash([u8; 16]);

impl BodyHash {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
    pub fn from_hex(s: &str) -> Option<BodyHash> {
        let v = hex::decode(s).ok()?;
        let arr: [u8; 16] = v.try_into().ok()?;
        Some(BodyHash(arr))
    }
}

impl fmt::Debug for BodyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BodyHash({})", self.to_hex())
    }
}

// --- balances --------------------------------------------------------------------------------

/// An account's four counters, in minor units of its currency. Each only grows, except that
/// pending amounts leave when a hold is posted, voided or expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Balance {
    pub debits_pending: i64,
    pub debits_posted: i64,
    pub credits_pending: i64,
    pub credits_posted: i64,
}

/// What one leg of an entry does to its account's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegEffect {
    /// posted += amount
    Post,
    /// pending += amount
    Hold,
    /// pending −= amount; posted += amount
    PostHeld,
    /// pending −= amount
    ReleaseHeld,
}

impl LegEffect {
    /// Whether the leg is journaled as a posting row (a release only changes a hold's state).
    pub fn is_posting(self) -> bool {
        !matches!(self, LegEffect::ReleaseHeld)
    }
}

impl Balance {
    pub const ZERO: Balance = Balance {
        debits_pending: 0,
        debits_posted: 0,
        credits_pending: 0,
        credits_posted: 0,
    };

    /// The counters after one leg, or `None` if a counter would overflow or a pending counter
    /// would go below zero (which consistent data never asks for).
    pub fn apply(self, side: Side, amount_minor: i64, effect: LegEffect) -> Option<Balance> {
        let mut b = self;
        let (pending, posted) = match side {
            Side::Debit => (&mut b.debits_pending, &mut b.debits_posted),
            Side::Credit => (&mut b.credits_pending, &mut b.credits_posted),
        };
        match effect {
            LegEffect::Post => *posted = posted.checked_add(amount_minor)?,
            LegEffect::Hold => *pending = pending.checked_add(amount_minor)?,
            LegEffect::PostHeld => {
                *pending = pending.checked_sub(amount_minor).filter(|v| *v >= 0)?;
                *posted = posted.checked_add(amount_minor)?;
            }
            LegEffect::ReleaseHeld => {
                *pending = pending.checked_sub(amount_minor).filter(|v| *v >= 0)?
            }
        }
        Some(b)
    }

    /// Like [`Balance::apply`] for a *change* of counters rather than counters: a pending
    /// counter may go below zero (a change that releases a hold made earlier).
    pub fn apply_delta(self, side: Side, amount_minor: i64, effect: LegEffect) -> Option<Balance> {
        let mut b = self;
        let (pending, posted) = match side {
            Side::Debit => (&mut b.debits_pending, &mut b.debits_posted),
            Side::Credit => (&mut b.credits_pending, &mut b.credits_posted),
        };
        match effect {
            LegEffect::Post => *posted = posted.checked_add(amount_minor)?,
            LegEffect::Hold => *pending = pending.checked_add(amount_minor)?,
            LegEffect::PostHeld => {
                *pending = pending.checked_sub(amount_minor)?;
                *posted = posted.checked_add(amount_minor)?;
            }
            LegEffect::ReleaseHeld => *pending = pending.checked_sub(amount_minor)?,
        }
        Some(b)
    }

    /// Counter-wise sum (merging buffered deltas), `None` on overflow.
    pub fn checked_add(self, o: Balance) -> Option<Balance> {
        Some(Balance {
            debits_pending: self.debits_pending.checked_add(o.debits_pending)?,
            debits_posted: self.debits_posted.checked_add(o.debits_posted)?,
            credits_pending: self.credits_pending.checked_add(o.credits_pending)?,
            credits_posted: self.credits_posted.checked_add(o.credits_posted)?,
        })
    }

    /// Posted balance on the account's normal side: credits − debits for a credit-normal
    /// account. i128, so it cannot overflow.
    pub fn posted_net(&self, normal: Side) -> i128 {
        let (d, c) = (
            i128::from(self.debits_posted),
            i128::from(self.credits_posted),
        );
        match normal {
            Side::Credit => c.saturating_sub(d),
            Side::Debit => d.saturating_sub(c),
        }
    }

    /// What a credit-normal account can still spend: posted credits − posted debits − pending
    /// debits (held amounts are not available).
    pub fn available(&self, normal: Side) -> i128 {
        let net = self.posted_net(normal);
        match normal {
            Side::Credit => net.saturating_sub(i128::from(self.debits_pending)),
            Side::Debit => net.saturating_sub(i128::from(self.credits_pending)),
        }
    }

    /// Debits (pending + posted) minus credits (pending + posted), for the ledger-wide sums.
    pub fn net_debit(&self) -> (i128, i128) {
        (
            i128::from(self.debits_posted).saturating_sub(i128::from(self.credits_posted)),
            i128::from(self.debits_pending).saturating_sub(i128::from(self.credits_pending)),
        )
    }

    /// Which limit, if any, these counters break under `flags`.
    pub fn breach(&self, flags: AccountFlags) -> Option<Side> {
        let debits = i128::from(self.debits_pending).saturating_add(i128::from(self.debits_posted));
        let credits =
            i128::from(self.credits_pending).saturating_add(i128::from(self.credits_posted));
        if flags.contains(AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS)
            && debits > i128::from(self.credits_posted)
        {
            return Some(Side::Debit);
        }
        if flags.contains(AccountFlags::CREDITS_MUST_NOT_EXCEED_DEBITS)
            && credits > i128::from(self.debits_posted)
        {
            return Some(Side::Credit);
        }
        None
    }
}

// --- the book: posting semantics over in-memory account states -------------------------------

/// Where a posting sits: its entry's sequence number and its index in the entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PostingRef {
    pub entry_seq: i64,
    pub leg: i64,
}

/// An account as the book needs it: flags, counters, and its history chain (every posting row
/// carries the account's version and counters after it, and a link to the account's previous
/// posting, so a balance at any past time can be found by walking back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountState {
    pub flags: AccountFlags,
    pub balance: Balance,
    /// Number of postings journaled on this account.
    pub version: i64,
    /// Time of the account's latest posting; posting times never go backwards per account.
    pub last_posted_at_ms: i64,
    pub last_posting: Option<PostingRef>,
    /// The store applies this account's balance later (a buffered account on PostgreSQL):
    /// `balance` starts at zero and tracks this book's *change* to the counters, and the history
    /// fields are not meaningful. Only for accounts without limits.
    pub deferred: bool,
}

impl AccountState {
    pub fn new(flags: AccountFlags) -> AccountState {
        AccountState {
            flags,
            balance: Balance::ZERO,
            version: 0,
            last_posted_at_ms: 0,
            last_posting: None,
            deferred: false,
        }
    }

    /// A deferred account (see [`AccountState::deferred`]).
    pub fn deferred(flags: AccountFlags) -> AccountState {
        AccountState {
            deferred: true,
            ..AccountState::new(flags)
        }
    }
}

/// One leg of an entry as journaled: the posting plus the account's history after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostingRecord {
    pub at: PostingRef,
    pub account: AccountId,
    pub side: Side,
    pub amount_minor: i64,
    /// Held (a pending entry's leg) rather than posted.
    pub pending: bool,
    /// The account's version after this posting (1 for its first posting).
    pub account_version: i64,
    /// max(entry time, the account's previous posting time).
    pub posted_at_ms: i64,
    pub debits_posted_after: i64,
    pub credits_posted_after: i64,
    pub prev: Option<PostingRef>,
}

/// An entry already stored under an id: what a replay returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredEntry {
    pub seq: i64,
    pub posted_at_ms: i64,
    pub hash: BodyHash,
}

/// The hold of a two-phase entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub seq: i64,
    pub legs: Vec<(AccountId, Side, i64)>,
    pub expires_at_ms: i64,
    pub state: HoldState,
}

/// What a caller gets for an entry that is (or already was) in the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    pub seq: i64,
    pub posted_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PostOutcome {
    /// Newly posted.
    Posted(Receipt),
    /// The same id and body was posted before: the original receipt, nothing written now.
    Replayed(Receipt),
    /// Refused; nothing written.
    Rejected(Reject),
}

/// An entry the book accepted, with everything a store writes for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEntry {
    pub entry: Entry,
    pub seq: i64,
    pub posted_at_ms: i64,
    pub hash: BodyHash,
    pub postings: Vec<PostingRecord>,
    /// For a pending entry: when its hold expires.
    pub expires_at_ms: Option<i64>,
}

/// A hold whose state changed (posted, voided, expired), and by which entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldChange {
    pub pending_id: EntryId,
    pub state: HoldState,
    pub resolved_by: Option<EntryId>,
}

/// Everything a batch changed, in order, for a store to write.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub entries: Vec<NewEntry>,
    pub holds: Vec<HoldChange>,
    pub accounts: BTreeSet<AccountId>,
}

/// Errors that mean the stored data or the caller is inconsistent, never a business refusal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BookError {
    #[error("no entry sequence number left for this batch")]
    OutOfSequenceNumbers,
    #[error("inconsistent ledger data: {0}")]
    Inconsistent(String),
}

/// Entry sequence numbers: consecutive from a start (the SQLite writer, tests), or a list handed
/// out by the database (PostgreSQL, where other transactions take numbers concurrently).
#[derive(Debug, Clone)]
enum Seqs {
    From(i64),
    List(VecDeque<i64>),
}

/// Posting semantics over in-memory account states. The model in the property tests holds the
/// whole ledger; a store loads only what a batch touches, posts the batch, and writes
/// [`Book::take_changes`].
#[derive(Debug, Clone)]
pub struct Book {
    accounts: HashMap<AccountId, AccountState>,
    entries: HashMap<EntryId, StoredEntry>,
    holds: HashMap<EntryId, Hold>,
    seqs: Seqs,
    changes: Changes,
}

impl Default for Book {
    fn default() -> Self {
        Book::new(1)
    }
}

impl Book {
    /// An empty book whose next entry gets sequence number `first_seq`.
    pub fn new(first_seq: i64) -> Book {
        Book {
            accounts: HashMap::new(),
            entries: HashMap::new(),
            holds: HashMap::new(),
            seqs: Seqs::From(first_seq),
            changes: Changes::default(),
        }
    }

    /// An empty book that hands out exactly these sequence numbers, in order.
    pub fn with_seqs(seqs: Vec<i64>) -> Book {
        Book {
            seqs: Seqs::List(seqs.into()),
            ..Book::new(1)
        }
    }

    /// Loads (or opens) an account's state.
    pub fn put_account(&mut self, id: AccountId, state: AccountState) {
        self.accounts.insert(id, state);
    }

    /// Loads an entry that is already stored (for replay detection).
    pub fn put_stored(&mut self, id: EntryId, stored: StoredEntry) {
        self.entries.insert(id, stored);
    }

    /// Loads a two-phase entry's hold.
    pub fn put_hold(&mut self, pending_id: EntryId, hold: Hold) {
        self.holds.insert(pending_id, hold);
    }

    pub fn account(&self, id: &AccountId) -> Option<&AccountState> {
        self.accounts.get(id)
    }

    pub fn accounts(&self) -> impl Iterator<Item = (&AccountId, &AccountState)> {
        self.accounts.iter()
    }

    pub fn hold(&self, pending_id: &EntryId) -> Option<&Hold> {
        self.holds.get(pending_id)
    }

    pub fn stored(&self, id: &EntryId) -> Option<&StoredEntry> {
        self.entries.get(id)
    }

    /// Drains what changed since the last call.
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    fn peek_seq(&self) -> Result<i64, BookError> {
        match &self.seqs {
            Seqs::From(n) => Ok(*n),
            Seqs::List(l) => l.front().copied().ok_or(BookError::OutOfSequenceNumbers),
        }
    }

    fn take_seq(&mut self) -> Result<i64, BookError> {
        match &mut self.seqs {
            Seqs::From(n) => {
                let seq = *n;
                *n = n.checked_add(1).ok_or(BookError::OutOfSequenceNumbers)?;
                Ok(seq)
            }
            Seqs::List(l) => l.pop_front().ok_or(BookError::OutOfSequenceNumbers),
        }
    }

    /// Posts one entry at `now_ms`. A business refusal is `Ok(PostOutcome::Rejected)` and
    /// changes nothing (except that a post or void of an expired hold releases it first).
    pub fn post(&mut self, entry: &Entry, now_ms: i64) -> Result<PostOutcome, BookError> {
        let hash = entry.body_hash();
        if let Some(stored) = self.entries.get(entry.id()) {
            let receipt = Receipt {
                seq: stored.seq,
                posted_at_ms: stored.posted_at_ms,
            };
            return Ok(if stored.hash == hash {
                PostOutcome::Replayed(receipt)
            } else {
                PostOutcome::Rejected(Reject::IdReusedWithDifferentBody)
            });
        }
        match entry.body() {
            EntryBody::Posted(postings) | EntryBody::Pending { postings, .. } => {
                let legs: Vec<(&AccountId, Side, i64)> = postings
                    .iter()
                    .map(|p| (&p.account, p.side, p.amount.amount_minor()))
                    .collect();
                let (effect, expires_at_ms) = match entry.timeout_ms() {
                    Some(t) => (LegEffect::Hold, Some(now_ms.saturating_add(t))),
                    None => (LegEffect::Post, None),
                };
                let seq = self.peek_seq()?;
                let records = match self.apply_legs(&legs, effect, seq, now_ms)? {
                    Ok(r) => r,
                    Err(reject) => return Ok(PostOutcome::Rejected(reject)),
                };
                self.take_seq()?;
                if let Some(expires_at_ms) = expires_at_ms {
                    self.holds.insert(
                        entry.id().clone(),
                        Hold {
                            seq,
                            legs: legs
                                .iter()
                                .map(|(a, s, x)| ((*a).clone(), *s, *x))
                                .collect(),
                            expires_at_ms,
                            state: HoldState::Pending,
                        },
                    );
                }
                Ok(self.accept(entry, seq, now_ms, hash, records, expires_at_ms))
            }
            EntryBody::PostPending { pending_id } | EntryBody::VoidPending { pending_id } => {
                let Some(hold) = self.holds.get(pending_id) else {
                    return Ok(PostOutcome::Rejected(Reject::PendingNotFound(
                        pending_id.clone(),
                    )));
                };
                match hold.state {
                    HoldState::Pending => {}
                    HoldState::Posted => {
                        return Ok(PostOutcome::Rejected(Reject::PendingAlreadyPosted(
                            pending_id.clone(),
                        )))
                    }
                    HoldState::Voided => {
                        return Ok(PostOutcome::Rejected(Reject::PendingAlreadyVoided(
                            pending_id.clone(),
                        )))
                    }
                    HoldState::Expired => {
                        return Ok(PostOutcome::Rejected(Reject::PendingExpired(
                            pending_id.clone(),
                        )))
                    }
                }
                if now_ms >= hold.expires_at_ms {
                    self.expire_hold(pending_id)?;
                    return Ok(PostOutcome::Rejected(Reject::PendingExpired(
                        pending_id.clone(),
                    )));
                }
                let owned = hold.legs.clone();
                let legs: Vec<(&AccountId, Side, i64)> =
                    owned.iter().map(|(a, s, x)| (a, *s, *x)).collect();
                let (effect, state) = match entry.phase() {
                    EntryPhase::PostPending => (LegEffect::PostHeld, HoldState::Posted),
                    _ => (LegEffect::ReleaseHeld, HoldState::Voided),
                };
                let seq = self.peek_seq()?;
                let records = match self.apply_legs(&legs, effect, seq, now_ms)? {
                    Ok(r) => r,
                    Err(reject) => return Ok(PostOutcome::Rejected(reject)),
                };
                self.take_seq()?;
                self.set_hold_state(pending_id, state, Some(entry.id().clone()));
                Ok(self.accept(entry, seq, now_ms, hash, records, None))
            }
        }
    }

    fn accept(
        &mut self,
        entry: &Entry,
        seq: i64,
        now_ms: i64,
        hash: BodyHash,
        postings: Vec<PostingRecord>,
        expires_at_ms: Option<i64>,
    ) -> PostOutcome {
        let stored = StoredEntry {
            seq,
            posted_at_ms: now_ms,
            hash,
        };
        self.entries.insert(entry.id().clone(), stored);
        self.changes.entries.push(NewEntry {
            entry: entry.clone(),
            seq,
            posted_at_ms: now_ms,
            hash,
            postings,
            expires_at_ms,
        });
        PostOutcome::Posted(Receipt {
            seq,
            posted_at_ms: now_ms,
        })
    }

    fn set_hold_state(&mut self, pending_id: &EntryId, state: HoldState, by: Option<EntryId>) {
        if let Some(h) = self.holds.get_mut(pending_id) {
            h.state = state;
        }
        self.changes.holds.push(HoldChange {
            pending_id: pending_id.clone(),
            state,
            resolved_by: by,
        });
    }

    fn expire_hold(&mut self, pending_id: &EntryId) -> Result<(), BookError> {
        let Some(hold) = self.holds.get(pending_id) else {
            return Ok(());
        };
        let (owned, seq) = (hold.legs.clone(), hold.seq);
        let legs: Vec<(&AccountId, Side, i64)> =
            owned.iter().map(|(a, s, x)| (a, *s, *x)).collect();
        match self.apply_legs(&legs, LegEffect::ReleaseHeld, seq, 0)? {
            Ok(_) => {}
            Err(r) => {
                return Err(BookError::Inconsistent(format!(
                    "releasing hold {pending_id}: {r}"
                )))
            }
        }
        self.set_hold_state(pending_id, HoldState::Expired, None);
        Ok(())
    }

    /// Expires up to `limit` holds whose time is up at `now_ms` (oldest deadline first),
    /// releasing their amounts. Returns the ids expired.
    pub fn expire_due(&mut self, now_ms: i64, limit: usize) -> Result<Vec<EntryId>, BookError> {
        let mut due: Vec<(i64, i64, EntryId)> = self
            .holds
            .iter()
            .filter(|(_, h)| h.state == HoldState::Pending && h.expires_at_ms <= now_ms)
            .map(|(id, h)| (h.expires_at_ms, h.seq, id.clone()))
            .collect();
        due.sort();
        due.truncate(limit);
        for (_, _, id) in &due {
            self.expire_hold(id)?;
        }
        Ok(due.into_iter().map(|(_, _, id)| id).collect())
    }

    /// Applies the legs of one entry atomically: all of them, or (on a refusal) none. The inner
    /// `Result` is the business outcome; the outer one an inconsistency.
    fn apply_legs(
        &mut self,
        legs: &[(&AccountId, Side, i64)],
        effect: LegEffect,
        seq: i64,
        now_ms: i64,
    ) -> Result<Result<Vec<PostingRecord>, Reject>, BookError> {
        // Scratch copies of the touched accounts (≤ POSTINGS_MAX), so a refusal changes nothing.
        let mut scratch: Vec<(&AccountId, AccountState, bool, bool)> = Vec::with_capacity(4);
        let mut records = Vec::with_capacity(legs.len());
        for (leg, (account, side, amount)) in legs.iter().enumerate() {
            let account: &AccountId = account;
            let i = match scratch.iter().position(|(id, ..)| *id == account) {
                Some(i) => i,
                None => {
                    let Some(state) = self.accounts.get(account) else {
                        return Ok(Err(Reject::AccountNotFound(account.clone())));
                    };
                    scratch.push((account, state.clone(), false, false));
                    scratch.len().saturating_sub(1)
                }
            };
            let Some((_, state, debited, credited)) = scratch.get_mut(i) else {
                return Err(BookError::Inconsistent("scratch index".into()));
            };
            let applied = if state.deferred {
                state.balance.apply_delta(*side, *amount, effect)
            } else {
                state.balance.apply(*side, *amount, effect)
            };
            let Some(balance) = applied else {
                return Ok(match effect {
                    LegEffect::Post | LegEffect::Hold => {
                        Err(Reject::BalanceOutOfRange(account.clone()))
                    }
                    // A hold releases exactly what it added: consistent data cannot underflow.
                    LegEffect::PostHeld | LegEffect::ReleaseHeld => {
                        return Err(BookError::Inconsistent(format!(
                            "hold of entry {seq} exceeds the pending counters of {account}"
                        )))
                    }
                });
            };
            state.balance = balance;
            if matches!(effect, LegEffect::Post | LegEffect::Hold) {
                match side {
                    Side::Debit => *debited = true,
                    Side::Credit => *credited = true,
                }
            }
            if effect.is_posting() {
                let Some(version) = state.version.checked_add(1) else {
                    return Ok(Err(Reject::BalanceOutOfRange(account.clone())));
                };
                let posted_at_ms = now_ms.max(state.last_posted_at_ms);
                let at = PostingRef {
                    entry_seq: seq,
                    leg: i64::try_from(leg).unwrap_or(i64::MAX),
                };
                records.push(PostingRecord {
                    at,
                    account: account.clone(),
                    side: *side,
                    amount_minor: *amount,
                    pending: effect == LegEffect::Hold,
                    account_version: version,
                    posted_at_ms,
                    debits_posted_after: balance.debits_posted,
                    credits_posted_after: balance.credits_posted,
                    prev: state.last_posting,
                });
                state.version = version;
                state.last_posted_at_ms = posted_at_ms;
                state.last_posting = Some(at);
            }
        }
        // Limits are checked once the whole entry is applied, and only in the direction the
        // entry moved the account: a credit never fails a debit limit.
        for (account, state, debited, credited) in &scratch {
            if state.deferred {
                // No limits on deferred accounts (a limit needs the live balance).
                continue;
            }
            match state.balance.breach(state.flags) {
                Some(Side::Debit) if *debited => {
                    return Ok(Err(Reject::ExceedsCredits((*account).clone())))
                }
                Some(Side::Credit) if *credited => {
                    return Ok(Err(Reject::ExceedsDebits((*account).clone())))
                }
                _ => {}
            }
        }
        for (account, state, ..) in scratch {
            if !self.changes.accounts.contains(account) {
                self.changes.accounts.insert(account.clone());
            }
            match self.accounts.get_mut(account) {
                Some(slot) => *slot = state,
                None => {
                    self.accounts.insert(account.clone(), state);
                }
            }
        }
        Ok(Ok(records))
    }

    /// Σ (debits − credits) of posted and of pending amounts over every loaded account, per
    /// currency. Zero for both in a complete ledger: the books balance.
    pub fn net_by_currency(&self) -> BTreeMap<Currency, (i128, i128)> {
        let mut out: BTreeMap<Currency, (i128, i128)> = BTreeMap::new();
        for (id, state) in &self.accounts {
            let (posted, pending) = state.balance.net_debit();
            let e = out.entry(id.currency()).or_insert((0, 0));
            e.0 = e.0.saturating_add(posted);
            e.1 = e.1.saturating_add(pending);
        }
        out
    }
}

#[cfg(test)]
mod tests;
