//! Parsing of durations (`10s`, `1h30m`, `500ms`) and start times (RFC 3339, integer
//! nanoseconds, `now`, `now-1d`), without a date-time dependency.

pub const NS_PER_SEC: i64 = 1_000_000_000;

/// Parse a duration such as `10s`, `1h30m`, `500ms`, `250us`, `2d`, `1w`; a bare number is
/// seconds. Returns nanoseconds.
pub fn parse_duration_ns(s: &str) -> Result<i64, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(secs) = s.parse::<f64>() {
        return to_ns(secs, 1.0, s);
    }
    let mut total: i64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("duration {s:?}: missing unit (ns, us, ms, s, m, h, d, w)"))?;
        if num_end == 0 {
            return Err(format!("duration {s:?}: expected a number at {rest:?}"));
        }
        let num: f64 = rest[..num_end]
            .parse()
            .map_err(|_| format!("duration {s:?}: bad number {:?}", &rest[..num_end]))?;
        let unit_rest = &rest[num_end..];
        let unit_end = unit_rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(unit_rest.len());
        let unit = &unit_rest[..unit_end];
        let mult = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" | "sec" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            "w" => 7.0 * 86400.0,
            _ => return Err(format!("duration {s:?}: unknown unit {unit:?}")),
        };
        total = total
            .checked_add(to_ns(num, mult, s)?)
            .ok_or_else(|| format!("duration {s:?} overflows"))?;
        rest = &unit_rest[unit_end..];
    }
    Ok(total)
}

fn to_ns(num: f64, mult_secs: f64, s: &str) -> Result<i64, String> {
    let ns = (num * mult_secs * 1e9).round();
    if !(0.0..9.2e18).contains(&ns) {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok(ns as i64)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month, day) of a day number since 1970-01-01.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Format nanoseconds since the epoch as RFC 3339 UTC (`2026-01-01T00:00:00Z`, with a
/// fraction only when non-zero).
pub fn format_rfc3339(ns: i64) -> String {
    let secs = ns.div_euclid(NS_PER_SEC);
    let frac = ns.rem_euclid(NS_PER_SEC);
    let days = secs.div_euclid(86400);
    let sod = secs.rem_euclid(86400);
    let (y, m, d) = civil_from_days(days);
    let base = format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    );
    if frac == 0 {
        format!("{base}Z")
    } else {
        format!("{base}.{frac:09}Z")
    }
}

fn num(s: &str, what: &str, full: &str) -> Result<u32, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("time {full:?}: bad {what} {s:?}"));
    }
    s.parse().map_err(|_| format!("time {full:?}: bad {what}"))
}

/// Parse an RFC 3339 timestamp (`2026-01-01T00:00:00Z`, `...T08:00:00.5+02:00`, or a bare
/// date `2026-01-01` meaning midnight UTC) to nanoseconds since the epoch.
pub fn parse_rfc3339(s: &str) -> Result<i64, String> {
    let full = s;
    let (date, time) = match s.find(['T', 't', ' ']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let dp: Vec<&str> = date.split('-').collect();
    if dp.len() != 3 || dp[0].len() != 4 {
        return Err(format!("time {full:?}: expected YYYY-MM-DD"));
    }
    let (y, mo, d) = (
        num(dp[0], "year", full)? as i64,
        num(dp[1], "month", full)?,
        num(dp[2], "day", full)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return Err(format!("time {full:?}: month/day out of range"));
    }
    let mut ns = days_from_civil(y, mo, d) * 86400 * NS_PER_SEC;
    if let Some(t) = time {
        let (clock, offset_secs) = if let Some(c) = t.strip_suffix(['Z', 'z']) {
            (c, 0i64)
        } else if let Some(i) = t.rfind(['+', '-']) {
            let off = &t[i + 1..];
            let op: Vec<&str> = off.split(':').collect();
            if op.len() != 2 {
                return Err(format!("time {full:?}: bad offset {off:?}"));
            }
            let secs = (num(op[0], "offset hours", full)? as i64 * 60
                + num(op[1], "offset minutes", full)? as i64)
                * 60;
            (&t[..i], if &t[i..i + 1] == "-" { -secs } else { secs })
        } else {
            return Err(format!("time {full:?}: missing Z or +HH:MM offset"));
        };
        let (hms, frac) = match clock.split_once('.') {
            Some((a, f)) => (a, Some(f)),
            None => (clock, None),
        };
        let tp: Vec<&str> = hms.split(':').collect();
        if tp.len() != 3 {
            return Err(format!("time {full:?}: expected HH:MM:SS"));
        }
        let (h, mi, se) = (
            num(tp[0], "hour", full)?,
            num(tp[1], "minute", full)?,
            num(tp[2], "second", full)?,
        );
        if h > 23 || mi > 59 || se > 60 {
            return Err(format!("time {full:?}: clock out of range"));
        }
        ns += (h as i64 * 3600 + mi as i64 * 60 + se as i64 - offset_secs) * NS_PER_SEC;
        if let Some(f) = frac {
            if f.is_empty() || f.len() > 9 || !f.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("time {full:?}: bad fraction {f:?}"));
            }
            ns += f.parse::<i64>().unwrap() * 10i64.pow(9 - f.len() as u32);
        }
    }
    Ok(ns)
}

/// Parse a start time: RFC 3339, integer nanoseconds since the epoch, `now`, or
/// `now-<duration>` (e.g. `now-1d`). `now_ns` is the current time.
pub fn parse_time(s: &str, now_ns: i64) -> Result<i64, String> {
    let s = s.trim();
    if let Ok(n) = s.parse::<i64>() {
        return Ok(n);
    }
    if let Some(rest) = s.strip_prefix("now") {
        if rest.is_empty() {
            return Ok(now_ns);
        }
        if let Some(d) = rest.strip_prefix('-') {
            return Ok(now_ns - parse_duration_ns(d)?);
        }
        if let Some(d) = rest.strip_prefix('+') {
            return Ok(now_ns + parse_duration_ns(d)?);
        }
        return Err(format!(
            "time {s:?}: expected now, now-<duration> or now+<duration>"
        ));
    }
    parse_rfc3339(s)
}

/// The current wall-clock time in nanoseconds since the epoch.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ns("10s").unwrap(), 10 * NS_PER_SEC);
        assert_eq!(parse_duration_ns("1h30m").unwrap(), 5400 * NS_PER_SEC);
        assert_eq!(parse_duration_ns("500ms").unwrap(), NS_PER_SEC / 2);
        assert_eq!(parse_duration_ns("1.5s").unwrap(), 1_500_000_000);
        assert_eq!(parse_duration_ns("2d").unwrap(), 2 * 86400 * NS_PER_SEC);
        assert_eq!(parse_duration_ns("60").unwrap(), 60 * NS_PER_SEC);
        assert_eq!(parse_duration_ns("250us").unwrap(), 250_000);
        assert!(parse_duration_ns("10x").is_err());
        assert!(parse_duration_ns("s").is_err());
        assert!(parse_duration_ns("").is_err());
    }

    #[test]
    fn times() {
        assert_eq!(
            parse_time("2026-01-01T00:00:00Z", 0).unwrap(),
            1_767_225_600 * NS_PER_SEC
        );
        assert_eq!(
            parse_time("2026-01-01", 0).unwrap(),
            1_767_225_600 * NS_PER_SEC
        );
        assert_eq!(
            parse_time("2026-01-01T02:00:00.25+02:00", 0).unwrap(),
            1_767_225_600 * NS_PER_SEC + 250_000_000
        );
        assert_eq!(
            parse_time("1970-01-01T00:00:00-01:00", 0).unwrap(),
            3600 * NS_PER_SEC
        );
        assert_eq!(parse_time("123", 0).unwrap(), 123);
        assert_eq!(parse_time("now", 77).unwrap(), 77);
        assert_eq!(parse_time("now-1s", 2 * NS_PER_SEC).unwrap(), NS_PER_SEC);
        assert!(parse_time("2026-13-01T00:00:00Z", 0).is_err());
        assert!(parse_time("2026-01-01T00:00:00", 0).is_err());
        assert!(parse_time("yesterday", 0).is_err());
    }

    #[test]
    fn civil_roundtrip_and_format() {
        for d in [-800_000i64, -1, 0, 1, 59, 10_957, 20_454, 2_932_896] {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
        assert_eq!(
            format_rfc3339(1_767_225_600 * NS_PER_SEC),
            "2026-01-01T00:00:00Z"
        );
        assert_eq!(format_rfc3339(5), "1970-01-01T00:00:00.000000005Z");
        assert_eq!(
            parse_rfc3339(&format_rfc3339(1_781_234_567_891_234_567)).unwrap(),
            1_781_234_567_891_234_567
        );
    }
}
