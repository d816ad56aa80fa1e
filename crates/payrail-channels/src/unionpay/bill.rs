//! The UnionPay reconciliation file (`fileType=00`): `fileContent` is base64 of a zlib stream of
//! a zip; the ACOMN entry (`INN<yyMMdd>88ZM_<merId>`) has one fixed-width line per transaction.
//!
//! We read the subset of the ACOMN layout listed in `WIDTHS` (docs/channels.md): transaction
//! code (`S22` consume, `S30` revoke, `R22` refund), institution codes, trace number, time
//! `MMDDhhmmss`, card number, amount in fen, merchant id, order id, query id, original query
//! id, merchant fee (`D` = charged / `C` = returned, fen).

use crate::common;
use crate::{Bill, BillError, BillLine, BillLineKind, BillSummary};
use base64::Engine as _;
use payrail_domain::civil::Date;
use payrail_domain::{Currency, Money};
use std::io::Read;

/// Field widths; fields are separated by one space.
pub const WIDTHS: [usize; 12] = [3, 11, 11, 6, 10, 19, 12, 15, 40, 21, 21, 13];
const CODE: usize = 0;
const TIME: usize = 4;
const AMOUNT: usize = 6;
const MER_ID: usize = 7;
const ORDER_ID: usize = 8;
const QUERY_ID: usize = 9;
const ORIG_QUERY_ID: usize = 10;
const FEE: usize = 11;

const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;

pub fn parse_file_content(date: Date, mer_id: &str, content_b64: &str) -> Result<Bill, BillError> {
    let zlib = base64::engine::general_purpose::STANDARD
        .decode(content_b64.trim())
        .map_err(|_| BillError::Corrupt("fileContent is not base64".into()))?;
    let mut zip_bytes = Vec::new();
    flate2::read::ZlibDecoder::new(zlib.as_slice())
        .take(MAX_FILE_BYTES)
        .read_to_end(&mut zip_bytes)
        .map_err(|e| BillError::Corrupt(format!("inflate: {e}")))?;
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(zip_bytes))
        .map_err(|e| BillError::Corrupt(format!("zip: {e}")))?;
    let yymmdd = format!(
        "{:02}{:02}{:02}",
        date.year() % 100,
        date.month(),
        date.day()
    );
    let want = format!("INN{yymmdd}88ZM_{mer_id}");
    let mut entry = archive
        .by_name(&want)
        .map_err(|_| BillError::Corrupt(format!("no {want} in the file")))?;
    let mut text = String::new();
    (&mut entry)
        .take(MAX_FILE_BYTES)
        .read_to_string(&mut text)
        .map_err(|e| BillError::Corrupt(format!("read: {e}")))?;
    parse_acomn(date, &text)
}

fn split(line: &str) -> Option<Vec<&str>> {
    let mut out = Vec::with_capacity(WIDTHS.len());
    let mut at = 0usize;
    for w in WIDTHS {
        let end = at.checked_add(w)?;
        out.push(line.get(at..end)?.trim());
        at = end.checked_add(1)?;
    }
    Some(out)
}

pub fn parse_acomn(date: Date, text: &str) -> Result<Bill, BillError> {
    let cny = Currency::CNY;
    let mut lines = Vec::new();
    for raw in text.lines().filter(|l| !l.trim().is_empty()) {
        let f = split(raw).ok_or_else(|| BillError::Corrupt(format!("short line {raw:?}")))?;
        let kind = match f[CODE] {
            "S22" => BillLineKind::Payment,
            "S30" | "R22" => BillLineKind::Refund,
            other => return Err(BillError::Corrupt(format!("transaction code {other}"))),
        };
        let amount: i64 = f[AMOUNT]
            .parse()
            .map_err(|_| BillError::Corrupt("amount".into()))?;
        let fee_digits: i64 = f[FEE]
            .get(1..)
            .and_then(|d| d.parse().ok())
            .ok_or_else(|| BillError::Corrupt("fee".into()))?;
        let fee = match f[FEE].chars().next() {
            Some('D') => fee_digits,
            Some('C') => fee_digits
                .checked_neg()
                .ok_or_else(|| BillError::Corrupt("fee".into()))?,
            _ => return Err(BillError::Corrupt("fee sign".into())),
        };
        // MMDDhhmmss: the year is the bill's, or the year before for a December line in a
        // January bill.
        let t = f[TIME];
        let month: u8 = t
            .get(0..2)
            .and_then(|m| m.parse().ok())
            .ok_or_else(|| BillError::Corrupt("time".into()))?;
        let year = if month > date.month() {
            date.year().saturating_sub(1)
        } else {
            date.year()
        };
        let occurred_at_ms = common::beijing_ms(&format!("{year:04}{t}"))
            .ok_or_else(|| BillError::Corrupt(format!("time {t:?}")))?;
        let _ = f[MER_ID];
        let refund = kind == BillLineKind::Refund;
        lines.push(BillLine {
            kind,
            channel_trade_no: if refund {
                f[ORIG_QUERY_ID].to_string()
            } else {
                f[QUERY_ID].to_string()
            },
            out_trade_no: if refund {
                String::new()
            } else {
                f[ORDER_ID].to_string()
            },
            channel_refund_no: refund.then(|| f[QUERY_ID].to_string()),
            out_refund_no: refund.then(|| f[ORDER_ID].to_string()),
            amount: Money::new(amount, cny),
            fee: Money::new(fee, cny),
            status: f[CODE].to_string(),
            occurred_at_ms,
        });
    }
    let total = |kind: BillLineKind| -> Result<(u64, Money), BillError> {
        lines
            .iter()
            .filter(|l| l.kind == kind)
            .try_fold((0u64, Money::zero(cny)), |(n, acc), l| {
                Ok((n.saturating_add(1), acc.checked_add(l.amount)?))
            })
            .map_err(|e: payrail_domain::MoneyError| BillError::Corrupt(e.to_string()))
    };
    let (payment_count, payment_total) = total(BillLineKind::Payment)?;
    let (refund_count, refund_total) = total(BillLineKind::Refund)?;
    let fee_total = lines
        .iter()
        .try_fold(Money::zero(cny), |acc, l| acc.checked_add(l.fee))
        .map_err(|e| BillError::Corrupt(e.to_string()))?;
    Ok(Bill {
        date,
        lines,
        summary: BillSummary {
            payment_count,
            payment_total,
            refund_count,
            refund_total,
            fee_total,
        },
    })
}
