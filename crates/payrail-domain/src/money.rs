//! Money in integer minor units of an ISO-4217 currency.
//!
//! There are no floats here and no cross-currency arithmetic: every operation checks that both
//! sides share a currency and that the result fits in an `i64`.

use std::fmt;

/// An ISO-4217 currency this platform accepts, with its minor-unit exponent.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Currency {
    code: [u8; 3],
    exponent: u8,
}

/// ISO-4217 alphabetic code and the number of minor-unit digits. Currencies without a fixed
/// exponent (funds, precious metals, XXX/XTS) are deliberately absent.
const CURRENCIES: &[(&str, u8)] = &[
    ("AED", 2),
    ("AUD", 2),
    ("BHD", 3),
    ("BRL", 2),
    ("CAD", 2),
    ("CHF", 2),
    ("CLP", 0),
    ("CNY", 2),
    ("CZK", 2),
    ("DKK", 2),
    ("EUR", 2),
    ("GBP", 2),
    ("HKD", 2),
    ("HUF", 2),
    ("IDR", 2),
    ("ILS", 2),
    ("INR", 2),
    ("ISK", 0),
    ("JOD", 3),
    ("JPY", 0),
    ("KRW", 0),
    ("KWD", 3),
    ("MOP", 2),
    ("MXN", 2),
    ("MYR", 2),
    ("NOK", 2),
    ("NZD", 2),
    ("OMR", 3),
    ("PHP", 2),
    ("PLN", 2),
    ("RUB", 2),
    ("SAR", 2),
    ("SEK", 2),
    ("SGD", 2),
    ("THB", 2),
    ("TND", 3),
    ("TRY", 2),
    ("TWD", 2),
    ("USD", 2),
    ("VND", 0),
    ("ZAR", 2),
];

impl Currency {
    pub const CNY: Currency = Currency {
        code: *b"CNY",
        exponent: 2,
    };
    pub const USD: Currency = Currency {
        code: *b"USD",
        exponent: 2,
    };
    pub const JPY: Currency = Currency {
        code: *b"JPY",
        exponent: 0,
    };

    /// Parses an upper-case ISO-4217 code. Lower case is rejected rather than guessed at, so a
    /// merchant sees the same spelling in requests, responses and bills.
    pub fn parse(code: &str) -> Result<Currency, MoneyError> {
        CURRENCIES
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(c, exponent)| {
                let b = c.as_bytes();
                Currency {
                    code: [b[0], b[1], b[2]],
                    exponent: *exponent,
                }
            })
            .ok_or_else(|| MoneyError::UnknownCurrency(code.chars().take(8).collect()))
    }

    pub fn code(&self) -> &str {
        // The bytes come from the static ASCII table above.
        std::str::from_utf8(&self.code).unwrap_or("XXX")
    }

    /// Number of minor-unit digits (2 for CNY: 1 yuan = 100 fen).
    pub fn exponent(&self) -> u8 {
        self.exponent
    }

    pub fn all() -> impl Iterator<Item = Currency> {
        CURRENCIES
            .iter()
            .filter_map(|(c, _)| Currency::parse(c).ok())
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("unknown or unsupported currency {0:?}; use an upper-case ISO-4217 code such as CNY")]
    UnknownCurrency(String),
    #[error("currency mismatch: {0} and {1}")]
    CurrencyMismatch(Currency, Currency),
    #[error("amount overflow")]
    Overflow,
    #[error("amount must be positive")]
    NotPositive,
    #[error("amount {0} exceeds the maximum of {1} minor units")]
    TooLarge(i64, i64),
    #[error("{0:?} is not a decimal amount with at most the currency's minor-unit digits")]
    BadDecimal(String),
}

/// An amount in minor units of one currency.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Money {
    amount_minor: i64,
    currency: Currency,
}

impl Money {
    /// Largest single payment amount accepted: 10^12 minor units (10 billion CNY). Far below
    /// `i64::MAX`, so sums of many payments in one currency cannot overflow in practice, and the
    /// checked arithmetic below catches it if they ever do.
    pub const MAX_PAYMENT_MINOR: i64 = 1_000_000_000_000;

    pub const fn new(amount_minor: i64, currency: Currency) -> Money {
        Money {
            amount_minor,
            currency,
        }
    }

    pub fn zero(currency: Currency) -> Money {
        Money {
            amount_minor: 0,
            currency,
        }
    }

    /// A payment amount: strictly positive and at most [`Money::MAX_PAYMENT_MINOR`].
    pub fn payment_amount(amount_minor: i64, currency: Currency) -> Result<Money, MoneyError> {
        if amount_minor <= 0 {
            return Err(MoneyError::NotPositive);
        }
        if amount_minor > Self::MAX_PAYMENT_MINOR {
            return Err(MoneyError::TooLarge(amount_minor, Self::MAX_PAYMENT_MINOR));
        }
        Ok(Money {
            amount_minor,
            currency,
        })
    }

    pub fn amount_minor(&self) -> i64 {
        self.amount_minor
    }

    pub fn currency(&self) -> Currency {
        self.currency
    }

    pub fn is_zero(&self) -> bool {
        self.amount_minor == 0
    }

    pub fn checked_add(self, other: Money) -> Result<Money, MoneyError> {
        self.same_currency(other)?;
        let amount_minor = self
            .amount_minor
            .checked_add(other.amount_minor)
            .ok_or(MoneyError::Overflow)?;
        Ok(Money {
            amount_minor,
            currency: self.currency,
        })
    }

    pub fn checked_sub(self, other: Money) -> Result<Money, MoneyError> {
        self.same_currency(other)?;
        let amount_minor = self
            .amount_minor
            .checked_sub(other.amount_minor)
            .ok_or(MoneyError::Overflow)?;
        Ok(Money {
            amount_minor,
            currency: self.currency,
        })
    }

    pub fn checked_neg(self) -> Result<Money, MoneyError> {
        let amount_minor = self
            .amount_minor
            .checked_neg()
            .ok_or(MoneyError::Overflow)?;
        Ok(Money {
            amount_minor,
            currency: self.currency,
        })
    }

    fn same_currency(&self, other: Money) -> Result<(), MoneyError> {
        if self.currency != other.currency {
            return Err(MoneyError::CurrencyMismatch(self.currency, other.currency));
        }
        Ok(())
    }

    /// Major-unit decimal string such as `"12.34"`, as Alipay and UnionPay bills write amounts.
    /// Only for display and wire formats; never parsed back into arithmetic here.
    pub fn to_decimal_string(&self) -> String {
        let exp = u32::from(self.currency.exponent);
        let sign = if self.amount_minor < 0 { "-" } else { "" };
        let abs = self.amount_minor.unsigned_abs();
        if exp == 0 {
            return format!("{sign}{abs}");
        }
        // exp <= 3 for every listed currency, so the scale is at least 10 and never zero.
        let scale = 10u64.checked_pow(exp).unwrap_or(1);
        format!(
            "{sign}{}.{:0width$}",
            abs.checked_div(scale).unwrap_or(abs),
            abs.checked_rem(scale).unwrap_or(0),
            width = usize::from(self.currency.exponent)
        )
    }
}

impl Money {
    /// Parses a major-unit decimal string such as `"12.00"` (Alipay's `total_amount`, WeChat
    /// and Alipay bill amounts) exactly into minor units. Accepts an optional leading `-`, at
    /// least one integer digit and at most `exponent` fraction digits (`"12"`, `"12.5"`,
    /// `"12.50"`); refuses everything else (`"1e3"`, `" 1"`, `"1."`, `".5"`, `"+1"`, more
    /// fraction digits than the currency has). No floats are involved.
    pub fn parse_decimal(s: &str, currency: Currency) -> Result<Money, MoneyError> {
        let bad = || MoneyError::BadDecimal(s.chars().take(32).collect());
        let (negative, digits) = match s.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let (int_part, frac_part) = match digits.split_once('.') {
            Some((i, f)) if !f.is_empty() => (i, f),
            Some(_) => return Err(bad()),
            None => (digits, ""),
        };
        let exp = usize::from(currency.exponent);
        if int_part.is_empty()
            || int_part.len() > 19
            || frac_part.len() > exp
            || !int_part.bytes().all(|b| b.is_ascii_digit())
            || !frac_part.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(bad());
        }
        let mut minor: i64 = 0;
        let padded = format!("{int_part}{frac_part:0<exp$}");
        for b in padded.bytes() {
            minor = minor
                .checked_mul(10)
                .and_then(|m| m.checked_add(i64::from(b.wrapping_sub(b'0'))))
                .ok_or(MoneyError::Overflow)?;
        }
        if negative {
            minor = minor.checked_neg().ok_or(MoneyError::Overflow)?;
        }
        Ok(Money::new(minor, currency))
    }
}

impl fmt::Debug for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.to_decimal_string(), self.currency)
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.to_decimal_string(), self.currency)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_known_currencies_with_exponents() {
        let cases = [("CNY", 2), ("JPY", 0), ("KWD", 3), ("USD", 2)];
        for (code, exp) in cases {
            let c = Currency::parse(code).unwrap();
            assert_eq!(c.code(), code);
            assert_eq!(c.exponent(), exp);
        }
    }

    #[test]
    fn rejects_unknown_and_lowercase_currencies() {
        for code in ["cny", "XXX", "", "CN", "CNYY", "XAU", "ÄÖÜ"] {
            assert!(Currency::parse(code).is_err(), "{code} should be rejected");
        }
    }

    #[test]
    fn payment_amount_bounds() {
        let cny = Currency::CNY;
        assert_eq!(Money::payment_amount(0, cny), Err(MoneyError::NotPositive));
        assert_eq!(Money::payment_amount(-1, cny), Err(MoneyError::NotPositive));
        assert!(Money::payment_amount(1, cny).is_ok());
        assert!(Money::payment_amount(Money::MAX_PAYMENT_MINOR, cny).is_ok());
        assert!(matches!(
            Money::payment_amount(Money::MAX_PAYMENT_MINOR + 1, cny),
            Err(MoneyError::TooLarge(..))
        ));
    }

    #[test]
    fn decimal_strings() {
        let cases = [
            (1234, Currency::CNY, "12.34"),
            (5, Currency::CNY, "0.05"),
            (-5, Currency::CNY, "-0.05"),
            (1000, Currency::JPY, "1000"),
            (1, Currency::parse("KWD").unwrap(), "0.001"),
            (i64::MIN, Currency::CNY, "-92233720368547758.08"),
        ];
        for (minor, cur, want) in cases {
            assert_eq!(Money::new(minor, cur).to_decimal_string(), want);
        }
    }

    #[test]
    fn parse_decimal_is_exact() {
        let kwd = Currency::parse("KWD").unwrap();
        let good = [
            ("12.00", Currency::CNY, 1200),
            ("12", Currency::CNY, 1200),
            ("12.5", Currency::CNY, 1250),
            ("0.01", Currency::CNY, 1),
            ("-5.00", Currency::CNY, -500),
            ("0.07", Currency::CNY, 7), // 0.07 is not exact in binary floating point
            ("1000", Currency::JPY, 1000),
            ("0.001", kwd, 1),
            ("92233720368547758.07", Currency::CNY, i64::MAX),
        ];
        for (s, cur, want) in good {
            assert_eq!(
                Money::parse_decimal(s, cur),
                Ok(Money::new(want, cur)),
                "{s}"
            );
        }
        for s in [
            "", "-", ".5", "1.", "+1", " 1", "1 ", "1e3", "1.234", "1,00", "0x10", "1.-1", "--1",
            "１",
        ] {
            assert!(Money::parse_decimal(s, Currency::CNY).is_err(), "{s:?}");
        }
        assert!(Money::parse_decimal("1.5", Currency::JPY).is_err());
        assert_eq!(
            Money::parse_decimal("92233720368547758.08", Currency::CNY),
            Err(MoneyError::Overflow)
        );
    }

    #[test]
    fn no_cross_currency_arithmetic() {
        let a = Money::new(1, Currency::CNY);
        let b = Money::new(1, Currency::USD);
        assert!(matches!(
            a.checked_add(b),
            Err(MoneyError::CurrencyMismatch(..))
        ));
        assert!(matches!(
            a.checked_sub(b),
            Err(MoneyError::CurrencyMismatch(..))
        ));
    }

    #[test]
    fn overflow_is_an_error_not_a_wrap() {
        let max = Money::new(i64::MAX, Currency::CNY);
        assert_eq!(
            max.checked_add(Money::new(1, Currency::CNY)),
            Err(MoneyError::Overflow)
        );
        assert_eq!(
            Money::new(i64::MIN, Currency::CNY).checked_neg(),
            Err(MoneyError::Overflow)
        );
    }

    proptest! {
        #[test]
        fn add_then_sub_round_trips(a in -1_000_000_000_000i64..1_000_000_000_000, b in -1_000_000_000_000i64..1_000_000_000_000) {
            let x = Money::new(a, Currency::CNY);
            let y = Money::new(b, Currency::CNY);
            let sum = x.checked_add(y).unwrap();
            prop_assert_eq!(sum.checked_sub(y).unwrap(), x);
            prop_assert_eq!(sum.amount_minor(), a + b);
        }

        #[test]
        fn checked_add_matches_i128(a in any::<i64>(), b in any::<i64>()) {
            let exact = i128::from(a) + i128::from(b);
            let got = Money::new(a, Currency::CNY).checked_add(Money::new(b, Currency::CNY));
            match got {
                Ok(m) => prop_assert_eq!(i128::from(m.amount_minor()), exact),
                Err(e) => {
                    prop_assert_eq!(e, MoneyError::Overflow);
                    prop_assert!(exact > i128::from(i64::MAX) || exact < i128::from(i64::MIN));
                }
            }
        }

        #[test]
        fn decimal_string_round_trips(minor in any::<i64>().prop_filter("not MIN", |m| *m != i64::MIN)) {
            for cur in [Currency::CNY, Currency::JPY, Currency::parse("KWD").unwrap()] {
                let m = Money::new(minor, cur);
                prop_assert_eq!(Money::parse_decimal(&m.to_decimal_string(), cur), Ok(m));
            }
        }

        #[test]
        fn decimal_string_keeps_every_digit(minor in any::<i64>()) {
            let s = Money::new(minor, Currency::CNY).to_decimal_string();
            let digits: String = s.chars().filter(|c| c.is_ascii_digit()).collect();
            let trimmed = digits.trim_start_matches('0');
            let want = minor.unsigned_abs().to_string();
            prop_assert_eq!(if trimmed.is_empty() { "0" } else { trimmed }, want.as_str());
        }
    }
}
