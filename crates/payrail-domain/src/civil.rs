//! Calendar dates and wall-clock times at a fixed UTC offset, without a time-zone database.
//!
//! Payment channels speak local wall-clock time (WeChat Pay RFC 3339 with `+08:00`, Alipay
//! `yyyy-MM-dd HH:mm:ss` in Beijing time, UnionPay `YYYYMMDDhhmmss`), and settlement cycles cut
//! the day at a configured local time. China has had no daylight-saving time since 1991, so a
//! fixed offset in minutes is exact for every channel we speak; a configured offset is stated
//! wherever it is used.
//!
//! The day arithmetic is Howard Hinnant's `days_from_civil` / `civil_from_days`, exact for every
//! date in `Date::MIN..=Date::MAX`.

use std::fmt;

/// Beijing time, UTC+08:00: the offset of every Chinese channel's timestamps and bill days.
pub const CHINA_OFFSET_MINUTES: i32 = 480;

const MS_PER_DAY: i64 = 86_400_000;
const MS_PER_MINUTE: i64 = 60_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid date or time: {0}")]
pub struct CivilError(pub String);

/// A calendar day (proleptic Gregorian).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Date {
    year: i32,
    month: u8,
    day: u8,
}

/// A wall-clock time of day, to the second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimeOfDay {
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
}

/// A date and time of day at some fixed offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DateTime {
    pub date: Date,
    pub time: TimeOfDay,
}

fn is_leap(year: i32) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i32, month: u8) -> u8 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(year) => 29,
        _ => 28,
    }
}

impl Date {
    /// Years outside 1970..=9999 are refused: no payment happened before the epoch, and four
    /// digits is what every wire format has room for.
    pub const MIN_YEAR: i32 = 1970;
    pub const MAX_YEAR: i32 = 9999;

    pub fn from_ymd(year: i32, month: u8, day: u8) -> Result<Date, CivilError> {
        if !(Self::MIN_YEAR..=Self::MAX_YEAR).contains(&year)
            || !(1..=12).contains(&month)
            || day == 0
            || day > days_in_month(year, month)
        {
            return Err(CivilError(format!("{year:04}-{month:02}-{day:02}")));
        }
        Ok(Date { year, month, day })
    }

    pub fn year(&self) -> i32 {
        self.year
    }
    pub fn month(&self) -> u8 {
        self.month
    }
    pub fn day(&self) -> u8 {
        self.day
    }

    /// Days since 1970-01-01.
    #[allow(clippy::arithmetic_side_effects)] // bounded: year is within MIN_YEAR..=MAX_YEAR
    pub fn days_since_epoch(&self) -> i64 {
        let y = i64::from(self.year) - i64::from(self.month <= 2);
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let m = i64::from(self.month);
        let mp = if m > 2 { m - 3 } else { m + 9 };
        let doy = (153 * mp + 2) / 5 + i64::from(self.day) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    /// The day `days` days after 1970-01-01, if its year is in range.
    #[allow(clippy::arithmetic_side_effects)] // bounded by the range check first
    pub fn from_days_since_epoch(days: i64) -> Result<Date, CivilError> {
        // 1970-01-01 ..= 9999-12-31
        if !(0..=2_932_896).contains(&days) {
            return Err(CivilError(format!("day {days} since 1970 is out of range")));
        }
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        let year = i32::try_from(year).map_err(|_| CivilError(format!("year {year}")))?;
        Date::from_ymd(year, month as u8, day as u8)
    }

    pub fn add_days(&self, days: i64) -> Result<Date, CivilError> {
        let d = self
            .days_since_epoch()
            .checked_add(days)
            .ok_or_else(|| CivilError(format!("{self} + {days} days")))?;
        Date::from_days_since_epoch(d)
    }

    /// Parses `yyyy-MM-dd`.
    pub fn parse(s: &str) -> Result<Date, CivilError> {
        let b = s.as_bytes();
        if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
            return Err(CivilError(format!("{s:?} is not yyyy-MM-dd")));
        }
        let num = |r: std::ops::Range<usize>| -> Result<u32, CivilError> {
            let part = &s[r];
            if !part.bytes().all(|c| c.is_ascii_digit()) {
                return Err(CivilError(format!("{s:?} is not yyyy-MM-dd")));
            }
            part.parse::<u32>()
                .map_err(|_| CivilError(format!("{s:?} is not yyyy-MM-dd")))
        };
        let year = i32::try_from(num(0..4)?).map_err(|_| CivilError(s.into()))?;
        let month = u8::try_from(num(5..7)?).map_err(|_| CivilError(s.into()))?;
        let day = u8::try_from(num(8..10)?).map_err(|_| CivilError(s.into()))?;
        Date::from_ymd(year, month, day)
    }

    /// `yyyyMMdd`, as in UnionPay's settle dates and many bill file names.
    pub fn compact(&self) -> String {
        format!("{:04}{:02}{:02}", self.year, self.month, self.day)
    }

    /// The Unix time (ms) of this day's `time` at `offset_minutes` east of UTC.
    #[allow(clippy::arithmetic_side_effects)] // bounded: days and time are range-checked
    pub fn at(&self, time: TimeOfDay, offset_minutes: i32) -> i64 {
        self.days_since_epoch() * MS_PER_DAY + time.ms_of_day()
            - i64::from(offset_minutes) * MS_PER_MINUTE
    }
}

impl fmt::Display for Date {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }
}

impl fmt::Debug for Date {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Date({self})")
    }
}

impl TimeOfDay {
    pub const MIDNIGHT: TimeOfDay = TimeOfDay {
        hour: 0,
        minute: 0,
        second: 0,
    };

    pub fn new(hour: u8, minute: u8, second: u8) -> Result<TimeOfDay, CivilError> {
        if hour > 23 || minute > 59 || second > 59 {
            return Err(CivilError(format!("{hour:02}:{minute:02}:{second:02}")));
        }
        Ok(TimeOfDay {
            hour,
            minute,
            second,
        })
    }

    /// Parses `HH:mm` or `HH:mm:ss`.
    pub fn parse(s: &str) -> Result<TimeOfDay, CivilError> {
        let bad = || CivilError(format!("{s:?} is not HH:mm[:ss]"));
        let parts: Vec<&str> = s.split(':').collect();
        if !(2..=3).contains(&parts.len())
            || parts
                .iter()
                .any(|p| p.len() != 2 || !p.bytes().all(|c| c.is_ascii_digit()))
        {
            return Err(bad());
        }
        let n = |i: usize| parts.get(i).map_or(Ok(0), |p| p.parse::<u8>());
        TimeOfDay::new(
            n(0).map_err(|_| bad())?,
            n(1).map_err(|_| bad())?,
            n(2).map_err(|_| bad())?,
        )
    }

    #[allow(clippy::arithmetic_side_effects)] // fields are range-checked: < 86,400,000
    pub fn ms_of_day(&self) -> i64 {
        (i64::from(self.hour) * 3600 + i64::from(self.minute) * 60 + i64::from(self.second)) * 1000
    }
}

impl fmt::Display for TimeOfDay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}:{:02}:{:02}", self.hour, self.minute, self.second)
    }
}

impl DateTime {
    /// The wall-clock time at `offset_minutes` east of UTC of a Unix time in ms (truncated to
    /// the second).
    #[allow(clippy::arithmetic_side_effects)] // offset is a few hours; checked below
    pub fn from_unix_ms(unix_ms: i64, offset_minutes: i32) -> Result<DateTime, CivilError> {
        let local_ms = unix_ms
            .checked_add(i64::from(offset_minutes) * MS_PER_MINUTE)
            .ok_or_else(|| CivilError(format!("{unix_ms} ms")))?;
        let date = Date::from_days_since_epoch(local_ms.div_euclid(MS_PER_DAY))?;
        let secs = local_ms.rem_euclid(MS_PER_DAY) / 1000;
        Ok(DateTime {
            date,
            time: TimeOfDay {
                hour: (secs / 3600) as u8,
                minute: (secs / 60 % 60) as u8,
                second: (secs % 60) as u8,
            },
        })
    }

    pub fn to_unix_ms(&self, offset_minutes: i32) -> i64 {
        self.date.at(self.time, offset_minutes)
    }

    /// `yyyy-MM-dd HH:mm:ss` (Alipay).
    pub fn to_spaced(&self) -> String {
        format!("{} {}", self.date, self.time)
    }

    /// `yyyyMMddHHmmss` (UnionPay `txnTime`).
    pub fn to_compact(&self) -> String {
        format!(
            "{}{:02}{:02}{:02}",
            self.date.compact(),
            self.time.hour,
            self.time.minute,
            self.time.second
        )
    }

    /// RFC 3339 with the offset, e.g. `2026-11-22T10:34:56+08:00` (WeChat Pay v3).
    pub fn to_rfc3339(&self, offset_minutes: i32) -> String {
        let sign = if offset_minutes < 0 { '-' } else { '+' };
        let abs = offset_minutes.unsigned_abs();
        format!(
            "{}T{}{sign}{:02}:{:02}",
            self.date,
            self.time,
            abs / 60,
            abs % 60
        )
    }

    /// Parses `yyyy-MM-dd HH:mm:ss`, `yyyyMMddHHmmss`, or RFC 3339 `yyyy-MM-ddTHH:mm:ss±HH:MM`
    /// (also `Z`). Returns the wall-clock time and, for RFC 3339, the offset it carried.
    #[allow(clippy::arithmetic_side_effects)] // an offset is at most 23:59
    pub fn parse(s: &str) -> Result<(DateTime, Option<i32>), CivilError> {
        let bad = || CivilError(format!("{s:?} is not a supported date-time"));
        if s.len() == 14 && s.bytes().all(|c| c.is_ascii_digit()) {
            let date = Date::parse(&format!("{}-{}-{}", &s[0..4], &s[4..6], &s[6..8]))?;
            let time = TimeOfDay::parse(&format!("{}:{}:{}", &s[8..10], &s[10..12], &s[12..14]))?;
            return Ok((DateTime { date, time }, None));
        }
        if s.len() < 19 || !s.is_char_boundary(19) {
            return Err(bad());
        }
        let sep = s.as_bytes()[10];
        if sep != b' ' && sep != b'T' {
            return Err(bad());
        }
        let date = Date::parse(&s[..10])?;
        let time = TimeOfDay::parse(&s[11..19])?;
        let rest = &s[19..];
        let offset = match (sep, rest) {
            (b' ', "") => None,
            (b'T', "Z") => Some(0),
            (b'T', r) if r.len() == 6 && (r.starts_with('+') || r.starts_with('-')) => {
                let hm = TimeOfDay::parse(&r[1..]).map_err(|_| bad())?;
                let minutes = i32::from(hm.hour) * 60 + i32::from(hm.minute);
                Some(if r.starts_with('-') {
                    -minutes
                } else {
                    minutes
                })
            }
            _ => return Err(bad()),
        };
        Ok((DateTime { date, time }, offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_days() {
        let cases = [
            ("1970-01-01", 0),
            ("2000-02-29", 11_016),
            ("2026-11-22", 20_779),
            ("9999-12-31", 2_932_896),
        ];
        for (s, days) in cases {
            let d = Date::parse(s).unwrap();
            assert_eq!(d.days_since_epoch(), days, "{s}");
            assert_eq!(Date::from_days_since_epoch(days).unwrap(), d);
            assert_eq!(d.to_string(), s);
        }
    }

    #[test]
    fn invalid_dates_are_refused() {
        for s in [
            "2026-02-29",
            "2100-02-29",
            "2026-13-01",
            "2026-00-10",
            "2026-04-31",
            "1969-12-31",
            "2026-1-01",
            "2026/01/01",
            "+026-01-01",
        ] {
            assert!(Date::parse(s).is_err(), "{s}");
        }
        assert!(Date::parse("2024-02-29").is_ok());
        assert!(Date::from_days_since_epoch(-1).is_err());
    }

    #[test]
    fn beijing_wall_clock() {
        // 2026-11-22T00:30:00Z is 08:30 in Beijing.
        let ms = Date::parse("2026-11-22")
            .unwrap()
            .at(TimeOfDay::new(0, 30, 0).unwrap(), 0);
        let dt = DateTime::from_unix_ms(ms, CHINA_OFFSET_MINUTES).unwrap();
        assert_eq!(dt.to_spaced(), "2026-11-22 08:30:00");
        assert_eq!(dt.to_compact(), "20261122083000");
        assert_eq!(
            dt.to_rfc3339(CHINA_OFFSET_MINUTES),
            "2026-11-22T08:30:00+08:00"
        );
        assert_eq!(dt.to_unix_ms(CHINA_OFFSET_MINUTES), ms);
        // 23:30 UTC is already the next day in Beijing.
        let late = DateTime::from_unix_ms(ms + 23 * 3_600_000, CHINA_OFFSET_MINUTES).unwrap();
        assert_eq!(late.date.to_string(), "2026-11-23");
    }

    #[test]
    fn parse_formats() {
        let (a, off) = DateTime::parse("2026-11-22 08:30:00").unwrap();
        assert_eq!(off, None);
        let (b, off) = DateTime::parse("20261122083000").unwrap();
        assert_eq!((a, off), (b, None));
        let (c, off) = DateTime::parse("2026-11-22T08:30:00+08:00").unwrap();
        assert_eq!((c, off), (a, Some(480)));
        let (_, off) = DateTime::parse("2026-11-22T08:30:00-05:30").unwrap();
        assert_eq!(off, Some(-330));
        let (_, off) = DateTime::parse("2026-11-22T08:30:00Z").unwrap();
        assert_eq!(off, Some(0));
        for s in [
            "2026-11-22 24:00:00",
            "2026-11-22T08:30:00",
            "2026-11-22 08:30:00Z",
            "2026112208300",
            "2026-11-22T08:30:00+8:00",
            "",
        ] {
            assert!(DateTime::parse(s).is_err(), "{s}");
        }
    }

    #[test]
    fn time_of_day_parsing() {
        assert_eq!(
            TimeOfDay::parse("23:59").unwrap(),
            TimeOfDay::new(23, 59, 0).unwrap()
        );
        assert!(TimeOfDay::parse("24:00").is_err());
        assert!(TimeOfDay::parse("7:00").is_err());
    }

    proptest! {
        #[test]
        fn days_round_trip(days in 0i64..=2_932_896) {
            let d = Date::from_days_since_epoch(days).unwrap();
            prop_assert_eq!(d.days_since_epoch(), days);
            prop_assert_eq!(Date::parse(&d.to_string()).unwrap(), d);
        }

        #[test]
        fn unix_ms_round_trips_to_the_second(secs in 86_400i64..253_402_000_000, offset in -720i32..=840) {
            let ms = secs * 1000;
            let dt = DateTime::from_unix_ms(ms, offset).unwrap();
            prop_assert_eq!(dt.to_unix_ms(offset), ms);
            let (parsed, off) = DateTime::parse(&dt.to_rfc3339(offset)).unwrap();
            prop_assert_eq!(parsed, dt);
            prop_assert_eq!(off, Some(offset));
        }
    }
}
