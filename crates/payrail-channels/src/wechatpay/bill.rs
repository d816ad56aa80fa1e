//! The WeChat Pay trade bill (`bill_type=ALL`): a header row, data rows whose every field starts
//! with a backtick, a summary header and a backtick-prefixed summary row. Amounts are yuan.

use crate::common;
use crate::{Bill, BillError, BillLine, BillLineKind, BillSummary};
use payrail_domain::civil::Date;
use payrail_domain::{Currency, Money};

const COLUMNS: usize = 27;
// Column positions in the 27-column ALL bill.
const TIME: usize = 0;
const TRADE_NO: usize = 5;
const OUT_TRADE_NO: usize = 6;
const STATUS: usize = 9;
const CURRENCY: usize = 11;
const SETTLEMENT_AMOUNT: usize = 12;
const REFUND_NO: usize = 14;
const OUT_REFUND_NO: usize = 15;
const REFUND_AMOUNT: usize = 16;
const FEE: usize = 22;

fn fields(line: &str) -> Vec<String> {
    line.split(',')
        .map(|f| f.trim().trim_start_matches('`').to_string())
        .collect()
}

fn yuan(s: &str, currency: Currency, what: &str) -> Result<Money, BillError> {
    Money::parse_decimal(s, currency).map_err(|_| BillError::Corrupt(format!("{what}: {s:?}")))
}

pub fn parse(date: Date, bytes: &[u8]) -> Result<Bill, BillError> {
    let text = std::str::from_utf8(bytes).map_err(|_| BillError::Corrupt("not UTF-8".into()))?;
    let text = text.trim_start_matches('\u{feff}');
    let mut rows = text.lines().map(str::trim_end).filter(|l| !l.is_empty());
    let header = rows
        .next()
        .ok_or_else(|| BillError::Corrupt("empty file".into()))?;
    if fields(header).len() != COLUMNS || !header.starts_with("交易时间") {
        return Err(BillError::Corrupt("unexpected header row".into()));
    }
    let cny = Currency::CNY;
    let mut lines = Vec::new();
    let mut summary_row = None;
    while let Some(row) = rows.next() {
        if row.starts_with("总交易单数") {
            summary_row = rows.next();
            break;
        }
        let f = fields(row);
        if f.len() != COLUMNS {
            return Err(BillError::Corrupt(format!("row with {} fields", f.len())));
        }
        let currency = match f[CURRENCY].as_str() {
            "" | "CNY" => cny,
            other => Currency::parse(other)
                .map_err(|_| BillError::Corrupt(format!("currency {other}")))?,
        };
        let status = f[STATUS].clone();
        let refund = status == "REFUND" || status == "REVOKED";
        let amount = if refund {
            yuan(&f[REFUND_AMOUNT], currency, "退款金额")?
        } else {
            yuan(&f[SETTLEMENT_AMOUNT], currency, "应结订单金额")?
        };
        let non_empty = |s: &String| (!s.is_empty()).then(|| s.clone());
        lines.push(BillLine {
            kind: if refund {
                BillLineKind::Refund
            } else {
                BillLineKind::Payment
            },
            channel_trade_no: f[TRADE_NO].clone(),
            out_trade_no: f[OUT_TRADE_NO].clone(),
            channel_refund_no: if refund {
                non_empty(&f[REFUND_NO])
            } else {
                None
            },
            out_refund_no: if refund {
                non_empty(&f[OUT_REFUND_NO])
            } else {
                None
            },
            amount,
            fee: yuan(&f[FEE], currency, "手续费")?,
            status,
            occurred_at_ms: common::beijing_ms(&f[TIME])
                .ok_or_else(|| BillError::Corrupt(format!("time {:?}", f[TIME])))?,
        });
    }
    let s = fields(summary_row.ok_or_else(|| BillError::Corrupt("no summary".into()))?);
    if s.len() < 7 {
        return Err(BillError::Corrupt("short summary row".into()));
    }
    let count: u64 = s[0]
        .parse()
        .map_err(|_| BillError::Corrupt("总交易单数".into()))?;
    let payment_total = yuan(&s[1], cny, "应结订单总金额")?;
    let refund_total = yuan(&s[2], cny, "退款总金额")?;
    let fee_total = yuan(&s[4], cny, "手续费总金额")?;
    let sum = |kind: BillLineKind| -> Result<Money, BillError> {
        lines
            .iter()
            .filter(|l| l.kind == kind)
            .try_fold(Money::zero(cny), |acc, l| acc.checked_add(l.amount))
            .map_err(|e| BillError::Corrupt(e.to_string()))
    };
    let fees = lines
        .iter()
        .try_fold(Money::zero(cny), |acc, l| acc.checked_add(l.fee))
        .map_err(|e| BillError::Corrupt(e.to_string()))?;
    let refund_count = lines
        .iter()
        .filter(|l| l.kind == BillLineKind::Refund)
        .count() as u64;
    let checks = [
        ("总交易单数", count == lines.len() as u64),
        (
            "应结订单总金额",
            sum(BillLineKind::Payment)? == payment_total,
        ),
        ("退款总金额", sum(BillLineKind::Refund)? == refund_total),
        ("手续费总金额", fees == fee_total),
    ];
    if let Some((what, _)) = checks.iter().find(|(_, ok)| !ok) {
        return Err(BillError::Inconsistent((*what).to_string()));
    }
    Ok(Bill {
        date,
        summary: BillSummary {
            payment_count: (lines.len() as u64).saturating_sub(refund_count),
            payment_total,
            refund_count,
            refund_total,
            fee_total,
        },
        lines,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "交易时间,公众账号ID,商户号,特约商户号,设备号,微信订单号,商户订单号,用户标识,交易类型,交易状态,付款银行,货币种类,应结订单金额,代金券金额,微信退款单号,商户退款单号,退款金额,充值券退款金额,退款类型,退款状态,商品名称,商户数据包,手续费,费率,订单金额,申请退款金额,费率备注";

    fn file(summary: &str) -> String {
        format!(
            "{HEADER}\r\n\
             `2026-11-22 10:00:00,`wx1,`1900000109,`0,`,`4200001,`att_1,`o1,`NATIVE,`SUCCESS,`OTHERS,`CNY,`10.00,`0.00,`0,`0,`0.00,`0.00,`,`,`咖啡,`,`0.06,`0.60%,`10.00,`0.00,`\r\n\
             `2026-11-22 11:00:00,`wx1,`1900000109,`0,`,`4200001,`att_1,`o1,`NATIVE,`REFUND,`OTHERS,`CNY,`0.00,`0.00,`5030001,`rfd_1,`4.00,`0.00,`ORIGINAL,`SUCCESS,`,`,`-0.02,`0.60%,`0.00,`4.00,`\r\n\
             总交易单数,应结订单总金额,退款总金额,充值券退款总金额,手续费总金额,订单总金额,申请退款总金额\r\n{summary}\r\n"
        )
    }

    #[test]
    fn backtick_rows_and_summary() {
        let date = Date::parse("2026-11-22").unwrap();
        let bill = parse(
            date,
            file("`2,`10.00,`4.00,`0.00,`0.04,`10.00,`4.00").as_bytes(),
        )
        .unwrap();
        assert_eq!(bill.lines.len(), 2);
        assert_eq!(bill.lines[0].out_trade_no, "att_1");
        assert_eq!(bill.lines[1].kind, BillLineKind::Refund);
        assert_eq!(bill.lines[1].out_refund_no.as_deref(), Some("rfd_1"));
        assert_eq!(bill.lines[1].amount, Money::new(400, Currency::CNY));
        assert_eq!(bill.summary.fee_total, Money::new(4, Currency::CNY));
        // A summary that does not match its lines is an error, not a silently wrong bill.
        for bad in [
            "`3,`10.00,`4.00,`0.00,`0.04,`10.00,`4.00",
            "`2,`10.01,`4.00,`0.00,`0.04,`10.00,`4.00",
            "`2,`10.00,`4.00,`0.00,`0.05,`10.00,`4.00",
        ] {
            assert!(
                matches!(
                    parse(date, file(bad).as_bytes()),
                    Err(BillError::Inconsistent(_))
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            parse(date, b"garbage"),
            Err(BillError::Corrupt(_))
        ));
    }
}
