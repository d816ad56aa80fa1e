//! Typed, prefixed, time-sortable identifiers: `pay_01JD…`, `mch_01JD…`.
//!
//! The body is 26 characters of Crockford base32 over 128 bits: 48 bits of Unix milliseconds
//! followed by 80 random bits (the ULID layout), so ids sort by creation time as strings, which
//! keyset pagination relies on. The caller supplies the time and the random bits.

use std::fmt;
use std::marker::PhantomData;

const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
const BODY_LEN: usize = 26;

/// The kind of entity an id names; decides its prefix.
pub trait IdKind: Copy + Eq + Send + Sync + 'static {
    const PREFIX: &'static str;
}

macro_rules! id_kinds {
    ($($(#[$m:meta])* $kind:ident = $alias:ident : $prefix:literal;)*) => {$(
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $kind;
        impl IdKind for $kind { const PREFIX: &'static str = $prefix; }
        pub type $alias = Id<$kind>;
    )*};
}

id_kinds! {
    Merchant = MerchantId: "mch";
    App = AppId: "app";
    Payment = PaymentId: "pay";
    Attempt = AttemptId: "att";
    /// A refund; sent to the channel as its refund request number (idempotent there).
    Refund = RefundId: "rfd";
    Event = EventId: "evt";
    /// An operator-configured account at a payment channel (credentials, endpoint).
    ChannelAccount = ChannelAccountId: "cha";
    Job = JobId: "job";
    /// Public key identifier an app signs with (not secret).
    Key = KeyId: "key";
    Request = RequestId: "req";
    /// A fee plan (clearing rule) an operator configured.
    FeePlan = FeePlanId: "fpl";
    /// A settlement batch: one per merchant, currency and business day.
    Settlement = SettlementId: "stl";
    /// An operator's top-up of an end user's wallet.
    TopUp = TopUpId: "tpu";
    /// A payout (出款) of a merchant's available balance to its bank account; sent to the
    /// payout bank as its request number (idempotent there).
    Payout = PayoutId: "po";
}

/// An identifier of entity kind `K`. Construct with [`Id::generate`] or [`Id::parse`].
pub struct Id<K: IdKind> {
    body: [u8; BODY_LEN],
    kind: PhantomData<K>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("expected an id starting with {expected}_")]
    WrongPrefix { expected: &'static str },
    #[error("malformed id")]
    Malformed,
}

impl<K: IdKind> Id<K> {
    /// Builds an id from a Unix time in milliseconds and 10 random bytes.
    pub fn generate(unix_ms: u64, random: [u8; 10]) -> Id<K> {
        let mut value: u128 = 0;
        // Big-endian: the first random byte lands in bits 72..80, the last in bits 0..8.
        for b in random.iter() {
            value = (value << 8) | u128::from(*b);
        }
        value |= u128::from(unix_ms & 0xFFFF_FFFF_FFFF) << 80;
        let mut body = [0u8; BODY_LEN];
        // Fill from the last character (least significant 5 bits) to the first.
        for slot in body.iter_mut().rev() {
            *slot = ALPHABET[(value & 0x1F) as usize];
            value >>= 5;
        }
        Id {
            body,
            kind: PhantomData,
        }
    }

    pub fn parse(s: &str) -> Result<Id<K>, IdError> {
        let rest = s
            .strip_prefix(K::PREFIX)
            .and_then(|r| r.strip_prefix('_'))
            .ok_or(IdError::WrongPrefix {
                expected: K::PREFIX,
            })?;
        let bytes = rest.as_bytes();
        if bytes.len() != BODY_LEN || !bytes.iter().all(|b| ALPHABET.contains(b)) {
            return Err(IdError::Malformed);
        }
        // The first character carries only 3 bits of a 128-bit value.
        if bytes[0] > b'7' {
            return Err(IdError::Malformed);
        }
        let mut body = [0u8; BODY_LEN];
        body.copy_from_slice(bytes);
        Ok(Id {
            body,
            kind: PhantomData,
        })
    }

    /// Milliseconds since the Unix epoch at which the id was generated.
    pub fn unix_ms(&self) -> u64 {
        let mut value: u128 = 0;
        for b in &self.body[..10] {
            let digit = ALPHABET.iter().position(|a| a == b).unwrap_or(0) as u128;
            value = (value << 5) | digit;
        }
        // 10 characters = 50 bits; the top 2 bits belong to the 128-bit padding.
        (value & 0xFFFF_FFFF_FFFF) as u64
    }

    fn body_str(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap_or("")
    }
}

impl<K: IdKind> Clone for Id<K> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<K: IdKind> Copy for Id<K> {}
impl<K: IdKind> PartialEq for Id<K> {
    fn eq(&self, other: &Self) -> bool {
        self.body == other.body
    }
}
impl<K: IdKind> Eq for Id<K> {}
impl<K: IdKind> std::hash::Hash for Id<K> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.body.hash(state)
    }
}
impl<K: IdKind> PartialOrd for Id<K> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<K: IdKind> Ord for Id<K> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.body.cmp(&other.body)
    }
}

impl<K: IdKind> fmt::Display for Id<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}_{}", K::PREFIX, self.body_str())
    }
}

impl<K: IdKind> fmt::Debug for Id<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl<K: IdKind> serde::Serialize for Id<K> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de, K: IdKind> serde::Deserialize<'de> for Id<K> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Id::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl<K: IdKind> std::str::FromStr for Id<K> {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Id::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips_and_keeps_time() {
        let id = PaymentId::generate(1_732_252_800_123, [7; 10]);
        let s = id.to_string();
        assert!(s.starts_with("pay_"));
        assert_eq!(s.len(), 4 + BODY_LEN);
        let back = PaymentId::parse(&s).unwrap();
        assert_eq!(back, id);
        assert_eq!(back.unix_ms(), 1_732_252_800_123);
    }

    #[test]
    fn rejects_wrong_prefix_and_garbage() {
        let pay = PaymentId::generate(1, [0; 10]).to_string();
        assert!(MerchantId::parse(&pay).is_err());
        for bad in [
            "",
            "pay_",
            "pay",
            "pay_01",
            "pay_ILOU0000000000000000000000",
            "pay_8ZZZZZZZZZZZZZZZZZZZZZZZZZ",
        ] {
            assert!(PaymentId::parse(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn later_ids_sort_after_earlier(t1 in 0u64..(1u64 << 48), t2 in 0u64..(1u64 << 48), r1 in any::<[u8; 10]>(), r2 in any::<[u8; 10]>()) {
            let a = PaymentId::generate(t1, r1);
            let b = PaymentId::generate(t2, r2);
            if t1 < t2 { prop_assert!(a.to_string() < b.to_string()); }
            prop_assert_eq!(PaymentId::parse(&a.to_string()).unwrap(), a);
            prop_assert_eq!(a.unix_ms(), t1);
        }
    }
}
