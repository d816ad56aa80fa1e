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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const MER: &str = "777290058110048";

    /// One ACOMN line: the fields padded to their widths, one space apart (the layout the
    /// emulator writes and real files start with).
    fn line(fields: [&str; 12]) -> String {
        fields
            .iter()
            .zip(WIDTHS)
            .map(|(f, w)| format!("{f:<w$}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn consume(order: &str, query_id: &str, fen: &str, fee: &str, time: &str) -> String {
        line([
            "S22",
            "00010000",
            "00010000",
            "000001",
            time,
            "6216***********0018",
            fen,
            MER,
            order,
            query_id,
            "",
            fee,
        ])
    }

    fn refund(code: &str, order: &str, query_id: &str, orig: &str, fen: &str, fee: &str) -> String {
        line([
            code,
            "00010000",
            "00010000",
            "000002",
            "1122150000",
            "6216***********0018",
            fen,
            MER,
            order,
            query_id,
            orig,
            fee,
        ])
    }

    fn date(y: i32, m: u8, d: u8) -> Date {
        Date::from_ymd(y, m, d).unwrap()
    }

    /// fileContent as UnionPay sends it: base64 of a zlib stream of a zip holding `name`.
    fn file_content(name: &str, text: &str) -> String {
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        zip.start_file(name, zip::write::SimpleFileOptions::default())
            .unwrap();
        zip.write_all(text.as_bytes()).unwrap();
        let zipped = zip.finish().unwrap().into_inner();
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&zipped).unwrap();
        base64::engine::general_purpose::STANDARD.encode(z.finish().unwrap())
    }

    #[test]
    fn lines_kinds_fees_and_summary() {
        let text = [
            consume(
                "att01A",
                "Q1",
                "000000001000",
                "D000000000006",
                "1122100000",
            ),
            consume(
                "att01B",
                "Q2",
                "000000002550",
                "D000000000015",
                "1122110000",
            ),
            refund("R22", "rfd01C", "Q3", "Q1", "000000000400", "C000000000002"),
            refund(
                "S30",
                "att01BC",
                "Q4",
                "Q2",
                "000000002550",
                "C000000000015",
            ),
            String::new(),
        ]
        .join("\r\n");
        let bill = parse_acomn(date(2026, 11, 22), &text).unwrap();
        assert_eq!(bill.lines.len(), 4, "the blank line is skipped");
        let cny = |a| Money::new(a, Currency::CNY);
        let a = &bill.lines[0];
        assert_eq!(
            (
                a.kind,
                a.out_trade_no.as_str(),
                a.channel_trade_no.as_str(),
                a.amount,
                a.fee,
                a.status.as_str()
            ),
            (
                BillLineKind::Payment,
                "att01A",
                "Q1",
                cny(1000),
                cny(6),
                "S22"
            )
        );
        assert_eq!(a.channel_refund_no, None);
        assert_eq!(
            a.occurred_at_ms,
            common::beijing_ms("20261122100000").unwrap()
        );
        // A refund names its own order (the refund id) and the consume's query id.
        let r = &bill.lines[2];
        assert_eq!(
            (
                r.kind,
                r.out_trade_no.as_str(),
                r.channel_trade_no.as_str(),
                r.out_refund_no.as_deref(),
                r.channel_refund_no.as_deref(),
                r.amount,
                r.fee
            ),
            (
                BillLineKind::Refund,
                "",
                "Q1",
                Some("rfd01C"),
                Some("Q3"),
                cny(400),
                cny(-2)
            )
        );
        assert_eq!(
            bill.lines[3].kind,
            BillLineKind::Refund,
            "a revoke is a refund"
        );
        assert_eq!(
            bill.summary,
            BillSummary {
                payment_count: 2,
                payment_total: cny(3550),
                refund_count: 2,
                refund_total: cny(2950),
                fee_total: cny(6 + 15 - 2 - 15),
            }
        );
        let empty = parse_acomn(date(2026, 11, 22), "").unwrap();
        assert_eq!((empty.lines.len(), empty.summary.payment_count), (0, 0));
    }

    #[test]
    fn a_december_line_in_a_january_file_is_last_year() {
        let text = consume(
            "att01A",
            "Q1",
            "000000000100",
            "D000000000001",
            "1231235959",
        );
        let bill = parse_acomn(date(2027, 1, 1), &text).unwrap();
        assert_eq!(
            bill.lines[0].occurred_at_ms,
            common::beijing_ms("20261231235959").unwrap()
        );
        let text = consume(
            "att01A",
            "Q1",
            "000000000100",
            "D000000000001",
            "0101000001",
        );
        let bill = parse_acomn(date(2027, 1, 1), &text).unwrap();
        assert_eq!(
            bill.lines[0].occurred_at_ms,
            common::beijing_ms("20270101000001").unwrap()
        );
    }

    #[test]
    fn corrupt_lines_are_refused() {
        let d = date(2026, 11, 22);
        let good = consume(
            "att01A",
            "Q1",
            "000000001000",
            "D000000000006",
            "1122100000",
        );
        let cases = [
            ("short", good[..40].to_string()),
            ("unknown code", good.replacen("S22", "X99", 1)),
            (
                "amount",
                consume(
                    "att01A",
                    "Q1",
                    "00000000A000",
                    "D000000000006",
                    "1122100000",
                ),
            ),
            (
                "fee sign",
                consume(
                    "att01A",
                    "Q1",
                    "000000001000",
                    "X000000000006",
                    "1122100000",
                ),
            ),
            (
                "fee digits",
                consume(
                    "att01A",
                    "Q1",
                    "000000001000",
                    "D00000000000x",
                    "1122100000",
                ),
            ),
            (
                "time",
                consume(
                    "att01A",
                    "Q1",
                    "000000001000",
                    "D000000000006",
                    "1322100000",
                ),
            ),
        ];
        for (what, text) in cases {
            assert!(
                matches!(parse_acomn(d, &text), Err(BillError::Corrupt(_))),
                "{what}: {text:?}"
            );
        }
    }

    #[test]
    fn file_content_is_base64_zlib_zip_with_the_merchants_entry() {
        let d = date(2026, 11, 22);
        let text = consume(
            "att01A",
            "Q1",
            "000000001000",
            "D000000000006",
            "1122100000",
        );
        let content = file_content(&format!("INN26112288ZM_{MER}"), &text);
        let bill = parse_file_content(d, MER, &content).unwrap();
        assert_eq!(bill.lines.len(), 1);
        assert_eq!(bill.lines[0].out_trade_no, "att01A");
        // Another merchant's or another day's entry is not this bill.
        for name in [
            format!("INN26112288ZM_{}", "777290058110049"),
            format!("INN26112188ZM_{MER}"),
        ] {
            let other = file_content(&name, &text);
            assert!(
                matches!(
                    parse_file_content(d, MER, &other),
                    Err(BillError::Corrupt(_))
                ),
                "{name}"
            );
        }
        assert!(matches!(
            parse_file_content(d, MER, "not base64 !"),
            Err(BillError::Corrupt(_))
        ));
        let not_zlib = base64::engine::general_purpose::STANDARD.encode(b"plain text");
        assert!(matches!(
            parse_file_content(d, MER, &not_zlib),
            Err(BillError::Corrupt(_))
        ));
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(b"not a zip").unwrap();
        let not_zip = base64::engine::general_purpose::STANDARD.encode(z.finish().unwrap());
        assert!(matches!(
            parse_file_content(d, MER, &not_zip),
            Err(BillError::Corrupt(_))
        ));
    }
}
