//! The Alipay trade bill: a zip of GBK CSV files; the detail file (`…业务明细.csv`) has `#`
//! comment lines, a header row, data rows whose id fields end with a TAB, and `#交易合计` /
//! `#退款合计` total lines (refund amounts negative). Amounts are yuan.

use crate::common;
use crate::{Bill, BillError, BillLine, BillLineKind, BillSummary};
use payrail_domain::civil::Date;
use payrail_domain::{Currency, Money};
use std::io::Read;

const COLUMNS: usize = 25;
const TRADE_NO: usize = 0;
const OUT_TRADE_NO: usize = 1;
const KIND: usize = 2;
const FINISHED_AT: usize = 5;
const ORDER_AMOUNT: usize = 11;
const RECEIVED: usize = 12;
const REFUND_REQUEST_NO: usize = 21;
const SERVICE_FEE: usize = 22;

/// Largest bill entry inflated (a zip bomb guard).
const MAX_ENTRY_BYTES: u64 = 64 * 1024 * 1024;

pub fn parse_zip(date: Date, zip_bytes: &[u8]) -> Result<Bill, BillError> {
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(zip_bytes))
        .map_err(|e| BillError::Corrupt(format!("zip: {e}")))?;
    for i in 0..archive.len() {
        let mut entry = archive
            .by_index(i)
            .map_err(|e| BillError::Corrupt(format!("zip entry: {e}")))?;
        // Names are GBK without the zip UTF-8 flag in the real files, UTF-8 in others: accept
        // either. The detail file is the one not ending in (汇总).
        let (gbk_name, _, _) = encoding_rs::GBK.decode(entry.name_raw());
        let detail = |n: &str| n.ends_with("业务明细.csv");
        if !detail(&gbk_name) && !detail(entry.name()) {
            continue;
        }
        let mut bytes = Vec::new();
        (&mut entry)
            .take(MAX_ENTRY_BYTES)
            .read_to_end(&mut bytes)
            .map_err(|e| BillError::Corrupt(format!("inflate: {e}")))?;
        let (text, _, had_errors) = encoding_rs::GBK.decode(&bytes);
        if had_errors {
            return Err(BillError::Corrupt("detail file is not GBK".into()));
        }
        return parse_detail(date, &text);
    }
    Err(BillError::Corrupt("no 业务明细 file in the zip".into()))
}

fn yuan(s: &str, what: &str) -> Result<Money, BillError> {
    Money::parse_decimal(s.trim(), Currency::CNY)
        .map_err(|_| BillError::Corrupt(format!("{what}: {s:?}")))
}

/// `#交易合计：2笔，商家实收共20.00元，…` → (2, 20.00).
fn total_line(line: &str) -> Result<(u64, Money), BillError> {
    let bad = || BillError::Corrupt(format!("total line {line:?}"));
    let after = line.split_once('：').ok_or_else(bad)?.1;
    let (count, rest) = after.split_once('笔').ok_or_else(bad)?;
    let amount = rest.split_once('共').ok_or_else(bad)?.1;
    let amount = amount.split_once('元').ok_or_else(bad)?.0;
    Ok((
        count.trim().parse().map_err(|_| bad())?,
        yuan(amount, "合计")?,
    ))
}

pub fn parse_detail(date: Date, text: &str) -> Result<Bill, BillError> {
    let cny = Currency::CNY;
    let mut lines = Vec::new();
    let mut header_seen = false;
    let mut trade_total = None;
    let mut refund_total = None;
    for raw in text.lines() {
        let line = raw.trim_end_matches(['\r', '\n']);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            if comment.starts_with("交易合计") {
                trade_total = Some(total_line(line)?);
            } else if comment.starts_with("退款合计") {
                refund_total = Some(total_line(line)?);
            }
            continue;
        }
        if line.starts_with("支付宝交易号") {
            header_seen = true;
            continue;
        }
        if !header_seen {
            return Err(BillError::Corrupt("data before the header row".into()));
        }
        let f: Vec<&str> = line
            .split(',')
            .map(|s| s.trim_end_matches('\t').trim())
            .collect();
        if f.len() != COLUMNS {
            return Err(BillError::Corrupt(format!("row with {} fields", f.len())));
        }
        let refund = f[KIND] == "退款";
        let amount = yuan(f[ORDER_AMOUNT], "订单金额")?;
        let amount = if refund {
            Money::new(amount.amount_minor().saturating_abs(), cny)
        } else {
            amount
        };
        // 服务费 is written from the merchant's side: negative = charged.
        let fee = yuan(f[SERVICE_FEE], "服务费")?
            .checked_neg()
            .map_err(|e| BillError::Corrupt(e.to_string()))?;
        let _received = yuan(f[RECEIVED], "商家实收")?;
        lines.push(BillLine {
            kind: if refund {
                BillLineKind::Refund
            } else {
                BillLineKind::Payment
            },
            channel_trade_no: f[TRADE_NO].to_string(),
            out_trade_no: f[OUT_TRADE_NO].to_string(),
            channel_refund_no: None,
            out_refund_no: (refund && !f[REFUND_REQUEST_NO].is_empty())
                .then(|| f[REFUND_REQUEST_NO].to_string()),
            amount,
            fee,
            status: f[KIND].to_string(),
            occurred_at_ms: common::beijing_ms(f[FINISHED_AT])
                .ok_or_else(|| BillError::Corrupt(format!("time {:?}", f[FINISHED_AT])))?,
        });
    }
    if !header_seen {
        return Err(BillError::Corrupt("no header row".into()));
    }
    let (trade_count, trade_sum) =
        trade_total.ok_or_else(|| BillError::Corrupt("no #交易合计 line".into()))?;
    let (refund_count, refund_sum) = refund_total.unwrap_or((0, Money::zero(cny)));
    let refund_sum = Money::new(refund_sum.amount_minor().saturating_abs(), cny);
    let sum = |kind: BillLineKind| -> Result<(u64, Money), BillError> {
        lines
            .iter()
            .filter(|l| l.kind == kind)
            .try_fold((0u64, Money::zero(cny)), |(n, acc), l| {
                Ok((n.saturating_add(1), acc.checked_add(l.amount)?))
            })
            .map_err(|e: payrail_domain::MoneyError| BillError::Corrupt(e.to_string()))
    };
    if sum(BillLineKind::Payment)? != (trade_count, trade_sum) {
        return Err(BillError::Inconsistent("#交易合计".into()));
    }
    if sum(BillLineKind::Refund)? != (refund_count, refund_sum) {
        return Err(BillError::Inconsistent("#退款合计".into()));
    }
    let fee_total = lines
        .iter()
        .try_fold(Money::zero(cny), |acc, l| acc.checked_add(l.fee))
        .map_err(|e| BillError::Corrupt(e.to_string()))?;
    Ok(Bill {
        date,
        lines,
        summary: BillSummary {
            payment_count: trade_count,
            payment_total: trade_sum,
            refund_count,
            refund_total: refund_sum,
            fee_total,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detail(totals: &str) -> String {
        format!(
            "#支付宝业务明细查询\n#-----业务明细列表-----\n\
             支付宝交易号,商户订单号,业务类型,商品名称,创建时间,完成时间,门店编号,门店名称,操作员,终端号,对方账户,订单金额（元）,商家实收（元）,支付宝红包（元）,集分宝（元）,支付宝优惠（元）,商家优惠（元）,券核销金额（元）,券名称,商家红包消费金额（元）,卡消费金额（元）,退款批次号/请求号,服务费（元）,分润（元）,备注\n\
             2026112222001\t,att_1\t,交易,咖啡,2026-11-22 10:00:00,2026-11-22 10:00:01,,,,,b@x,10.00,10.00,0.00,0.00,0.00,0.00,0.00,,0.00,0.00,,-0.06,0.00,\n\
             2026112222001\t,att_1\t,退款,咖啡,2026-11-22 11:00:00,2026-11-22 11:00:01,,,,,b@x,-4.00,-4.00,0.00,0.00,0.00,0.00,0.00,,0.00,0.00,rfd_1\t,0.02,0.00,\n\
             #-----业务明细列表结束-----\n{totals}\n#导出时间：[2026-11-23 10:00:00]\n"
        )
    }

    #[test]
    fn tabs_comments_and_totals() {
        let date = Date::parse("2026-11-22").unwrap();
        let ok = detail("#交易合计：1笔，商家实收共10.00元，商家优惠共0.00元\n#退款合计：1笔，商家实收共-4.00元，商家优惠共0.00元");
        let bill = parse_detail(date, &ok).unwrap();
        assert_eq!(bill.lines[0].channel_trade_no, "2026112222001");
        assert_eq!(bill.lines[1].out_refund_no.as_deref(), Some("rfd_1"));
        assert_eq!(bill.lines[0].fee, Money::new(6, Currency::CNY));
        assert_eq!(bill.lines[1].fee, Money::new(-2, Currency::CNY));
        assert_eq!(bill.summary.refund_total, Money::new(400, Currency::CNY));
        let bad = detail("#交易合计：1笔，商家实收共10.01元，商家优惠共0.00元\n#退款合计：1笔，商家实收共-4.00元");
        assert!(matches!(
            parse_detail(date, &bad),
            Err(BillError::Inconsistent(_))
        ));
        let missing = detail("");
        assert!(matches!(
            parse_detail(date, &missing),
            Err(BillError::Corrupt(_))
        ));
    }
}
