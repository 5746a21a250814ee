//! InfluxDB line protocol parser: the first step of the write path.
//!
//! The parser is zero-copy: names and string values borrow from the request body and are
//! only copied when escapes have to be removed. It never panics, whatever the input, and
//! reports one error per bad line, so a client learns about every bad line of a request
//! while the good ones are still written.
//!
//! Errors name the line, the measurement and the column, never a tag or field value:
//! values may be personal data and errors end up in logs and HTTP responses.

use std::borrow::Cow;
use std::iter::FusedIterator;

use memchr::{memchr, memchr2};

/// Timestamp precision of a write request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// Nanoseconds since the epoch (the line protocol default).
    Nanosecond,
    /// Microseconds since the epoch.
    Microsecond,
    /// Milliseconds since the epoch.
    Millisecond,
    /// Seconds since the epoch.
    Second,
    /// Guessed per timestamp from its magnitude, as InfluxDB 3 does.
    Auto,
}

impl Precision {
    /// Parses "ns" | "n" | "nanosecond", "us" | "u" | "µs" | "microsecond",
    /// "ms" | "millisecond", "s" | "second", "auto" (case-insensitive). Returns None for
    /// anything else.
    pub fn parse(s: &str) -> Option<Precision> {
        // Both the micro sign (U+00B5) and the Greek mu (U+03BC) are accepted: they look
        // the same and clients produce either.
        const NAMES: &[(&str, Precision)] = &[
            ("ns", Precision::Nanosecond),
            ("n", Precision::Nanosecond),
            ("nanosecond", Precision::Nanosecond),
            ("us", Precision::Microsecond),
            ("u", Precision::Microsecond),
            ("\u{b5}s", Precision::Microsecond),
            ("\u{3bc}s", Precision::Microsecond),
            ("microsecond", Precision::Microsecond),
            ("ms", Precision::Millisecond),
            ("millisecond", Precision::Millisecond),
            ("s", Precision::Second),
            ("second", Precision::Second),
            ("auto", Precision::Auto),
        ];
        NAMES
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(s))
            .map(|&(_, precision)| precision)
    }

    /// Scales a raw timestamp to nanoseconds since the epoch; None on overflow. `Auto`
    /// guesses by magnitude as InfluxDB 3 does: below 5e9 seconds, below 5e12
    /// milliseconds, below 5e15 microseconds, else nanoseconds (by absolute value, so
    /// dates before 1970 are guessed alike).
    pub fn to_nanos(self, raw: i64) -> Option<i64> {
        let factor: i64 = match self {
            Precision::Nanosecond => 1,
            Precision::Microsecond => 1_000,
            Precision::Millisecond => 1_000_000,
            Precision::Second => 1_000_000_000,
            Precision::Auto => {
                // unsigned_abs: i64::MIN has no positive counterpart.
                let magnitude = raw.unsigned_abs();
                if magnitude < 5_000_000_000 {
                    1_000_000_000
                } else if magnitude < 5_000_000_000_000 {
                    1_000_000
                } else if magnitude < 5_000_000_000_000_000 {
                    1_000
                } else {
                    1
                }
            }
        };
        raw.checked_mul(factor)
    }
}

/// A typed field value.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue<'a> {
    /// A float: a number without suffix (`1`, `1.5`, `-1.5E-3`, `.5`, `5.`).
    Float(f64),
    /// A signed integer: a number with the suffix `i`.
    Integer(i64),
    /// An unsigned integer: a number with the suffix `u`.
    UInteger(u64),
    /// A double-quoted string, borrowed unless `\"` or `\\` had to be unescaped.
    String(Cow<'a, str>),
    /// A boolean: t, T, true, True, TRUE, f, F, false, False or FALSE.
    Boolean(bool),
    /// A personal value's ciphertext cell: made by the privacy step, never by the parser.
    Encrypted(Cow<'a, [u8]>),
}

/// One parsed line. Borrowed from the request body unless escapes had to be removed.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedLine<'a> {
    /// 1-based line number within the body: the line the point starts on.
    pub line_number: usize,
    /// The measurement (table) name, unescaped.
    pub measurement: Cow<'a, str>,
    /// Tag keys and values, unescaped, in the order of the line.
    pub tags: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    /// Field keys, unescaped, and values, in the order of the line.
    pub fields: Vec<(Cow<'a, str>, FieldValue<'a>)>,
    /// Raw timestamp, in the request's precision; None means server time.
    pub timestamp: Option<i64>,
}

/// Why a line was rejected. Must NEVER contain tag values or field values (they may be
/// personal data): only the line number, a reason, and the measurement / column (tag key
/// or field key) names involved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line_number}: {reason}")]
pub struct LineError {
    /// 1-based line number within the body.
    pub line_number: usize,
    /// What is wrong, without any value from the line.
    pub reason: String,
    /// The measurement, once the parser got that far.
    pub measurement: Option<String>,
    /// The tag key or field key involved, where there is one.
    pub column: Option<String>,
}

/// Parses a request body line by line. Blank lines and lines starting with `#` (after
/// leading whitespace) are skipped but still counted for line numbers. Handles \n and
/// \r\n line ends. Invalid UTF-8 in a line is an error for that line only.
pub fn parse_lines(body: &[u8]) -> LineIter<'_> {
    LineIter {
        body,
        valid: valid_prefix(body),
        pos: 0,
        next_line_number: 1,
        tags_hint: 0,
        fields_hint: 0,
    }
}

/// Iterator over the points of a body, returned by [`parse_lines`].
#[derive(Clone)]
pub struct LineIter<'a> {
    body: &'a [u8],
    valid: &'a str,
    pos: usize,
    next_line_number: usize,
    // Lines of one request tend to look alike; sizing the vectors like the previous line
    // saves the regrowing.
    tags_hint: usize,
    fields_hint: usize,
}

impl<'a> Iterator for LineIter<'a> {
    type Item = Result<ParsedLine<'a>, LineError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let start = self.pos;
            let rest = self.body.get(start..).filter(|rest| !rest.is_empty())?;
            let line_number = self.next_line_number;

            // A line ends at the first newline unless a quote comes first: only then can
            // a string value hold newlines, and only then is the slower scan needed.
            let (len, inner_newlines) = match memchr2(b'\n', b'"', rest) {
                None => (rest.len(), 0),
                Some(i) if rest.get(i) == Some(&b'\n') => (i, 0),
                Some(_) => quoted_line_len(rest),
            };
            self.pos = start + len + 1;
            self.next_line_number = line_number + 1 + inner_newlines;

            let line = rest.get(..len).unwrap_or_default();
            let Some((from, to)) = trim(line) else {
                continue;
            };
            if line.get(from) == Some(&b'#') {
                continue;
            }

            let text = match self.valid.get(start + from..start + to) {
                Some(text) => text,
                None => match line.get(from..to).map(std::str::from_utf8) {
                    Some(Ok(text)) => text,
                    _ => {
                        return Some(Err(LineError {
                            line_number,
                            reason: "invalid UTF-8".to_owned(),
                            measurement: None,
                            column: None,
                        }));
                    }
                },
            };

            let parser = LineParser {
                s: text,
                b: text.as_bytes(),
                line_number,
                measurement: None,
            };
            let result = parser.parse(self.tags_hint, self.fields_hint);
            if let Ok(parsed) = &result {
                // Room for the pseudonym tags a privacy profile adds in place of subject
                // fields, so that they do not reallocate the line's tags.
                self.tags_hint = parsed.tags.len() + 2;
                self.fields_hint = parsed.fields.len();
            }
            return Some(result);
        }
    }
}

impl FusedIterator for LineIter<'_> {}

// By hand, because the body holds values, which must not end up in logs.
impl std::fmt::Debug for LineIter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LineIter")
            .field("body_len", &self.body.len())
            .field("pos", &self.pos)
            .field("next_line_number", &self.next_line_number)
            .finish_non_exhaustive()
    }
}

/// The longest valid UTF-8 prefix of `body`, so that lines inside it need no validation of
/// their own; usually that is the whole body. (`from_utf8` has an ASCII fast path that
/// `utf8_chunks` lacks.)
fn valid_prefix(body: &[u8]) -> &str {
    match std::str::from_utf8(body) {
        Ok(text) => text,
        Err(e) => body
            .get(..e.valid_up_to())
            .and_then(|prefix| std::str::from_utf8(prefix).ok())
            .unwrap_or_default(),
    }
}

fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\r')
}

/// Bounds of `line` without surrounding whitespace; None if nothing is left. The `\r` of
/// a `\r\n` line end goes with the trailing whitespace.
fn trim(line: &[u8]) -> Option<(usize, usize)> {
    let from = line.iter().position(|&c| !is_space(c))?;
    let to = line.iter().rposition(|&c| !is_space(c))? + 1;
    Some((from, to))
}

/// Length of the line at the start of `b` (up to, not including, its terminating `\n`) and
/// the number of newlines inside quoted string values within it.
///
/// This follows the structure of the grammar just far enough to know where string values
/// start: quotes are only special at the start of a field value, so a quote in a
/// measurement, tag or field key, or in a comment, does not swallow the following lines.
/// It must agree with [`LineParser`] on every line that parser accepts.
fn quoted_line_len(b: &[u8]) -> (usize, usize) {
    #[derive(Clone, Copy)]
    enum State {
        Key,
        FieldKey,
        ValueStart,
        Unquoted,
        Str,
    }

    let to_newline = |from: usize| {
        memchr(b'\n', b.get(from..).unwrap_or_default()).map_or(b.len(), |i| from + i)
    };

    let mut i = b.iter().position(|&c| !is_space(c)).unwrap_or(b.len());
    if b.get(i) == Some(&b'#') {
        return (to_newline(i), 0);
    }
    let mut newlines = 0;
    let mut state = State::Key;
    while let Some(&c) = b.get(i) {
        match state {
            State::Key | State::FieldKey => match c {
                // An escaped character is never structural; a backslash before a newline
                // is a literal one and the newline still ends the line.
                b'\\' if b.get(i + 1).is_some_and(|&n| n != b'\n') => i += 1,
                b'\n' => return (i, newlines),
                b' ' => {
                    if matches!(state, State::FieldKey) {
                        // The timestamp section holds no strings.
                        return (to_newline(i), newlines);
                    }
                    while b.get(i + 1) == Some(&b' ') {
                        i += 1;
                    }
                    state = State::FieldKey;
                }
                b'=' if matches!(state, State::FieldKey) => state = State::ValueStart,
                _ => {}
            },
            State::ValueStart if c == b'"' => state = State::Str,
            State::ValueStart | State::Unquoted => match c {
                b'\n' => return (i, newlines),
                b',' => state = State::FieldKey,
                b' ' => return (to_newline(i), newlines),
                _ => state = State::Unquoted,
            },
            State::Str => match c {
                b'\\' if matches!(b.get(i + 1), Some(b'"' | b'\\')) => i += 1,
                b'"' => state = State::Unquoted,
                b'\n' => newlines += 1,
                _ => {}
            },
        }
        i += 1;
    }
    (b.len(), newlines)
}

const fn byte_set(bytes: &[u8]) -> [bool; 256] {
    let mut set = [false; 256];
    let mut i = 0;
    while i < bytes.len() {
        set[bytes[i] as usize] = true;
        i += 1;
    }
    set
}

/// Bytes that end a measurement, plus the backslash; also exactly the bytes a backslash
/// escapes in a measurement.
static MEASUREMENT_SPECIAL: [bool; 256] = byte_set(b", \\");
/// The same for tag keys, tag values and field keys.
static KEY_SPECIAL: [bool; 256] = byte_set(b",= \\");
/// Bytes a backslash escapes inside a quoted string value.
static STRING_ESCAPED: [bool; 256] = byte_set(b"\"\\");

/// Scans a name from `i` to its first unescaped delimiter; returns where it ends and
/// whether it had escapes to remove.
#[inline(always)]
fn scan_name(b: &[u8], mut i: usize, special: &[bool; 256]) -> (usize, bool) {
    let mut escaped = false;
    while let Some(&c) = b.get(i) {
        if special[c as usize] {
            if c != b'\\' {
                break;
            }
            if b.get(i + 1).is_some_and(|&n| special[n as usize]) {
                escaped = true;
                i += 1;
            }
        }
        i += 1;
    }
    (i, escaped)
}

/// Removes backslash escapes of the bytes in `escaped`; other backslashes stay.
fn unescape(raw: &str, escaped: &[bool; 256]) -> String {
    let b = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut copied = 0;
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'\\' && b.get(i + 1).is_some_and(|&n| escaped[n as usize]) {
            // Both cut points sit next to ASCII bytes, so they are char boundaries.
            out.push_str(raw.get(copied..i).unwrap_or_default());
            copied = i + 1;
            i += 1;
        }
        i += 1;
    }
    out.push_str(raw.get(copied..).unwrap_or_default());
    out
}

enum NumberError {
    Invalid,
    OutOfRange,
}

fn parse_u64(digits: &[u8]) -> Result<u64, NumberError> {
    if digits.is_empty() {
        return Err(NumberError::Invalid);
    }
    let mut value: u64 = 0;
    let mut overflow = false;
    for &c in digits {
        let digit = c.wrapping_sub(b'0');
        if digit > 9 {
            return Err(NumberError::Invalid);
        }
        // Keep scanning after an overflow so that garbage is reported as invalid rather
        // than as out of range.
        match value
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(digit)))
        {
            Some(v) => value = v,
            None => overflow = true,
        }
    }
    if overflow {
        Err(NumberError::OutOfRange)
    } else {
        Ok(value)
    }
}

fn parse_i64(text: &[u8]) -> Result<i64, NumberError> {
    // No leading `+`: InfluxDB does not accept one either.
    let (negative, digits) = match text {
        [b'-', digits @ ..] => (true, digits),
        _ => (false, text),
    };
    let magnitude = parse_u64(digits)?;
    if negative {
        0i64.checked_sub_unsigned(magnitude)
    } else {
        i64::try_from(magnitude).ok()
    }
    .ok_or(NumberError::OutOfRange)
}

/// The fast path for the usual float, a plain decimal like `-12.345` with at most 15
/// digits: the digits and the power of ten are then exact in an f64, so one division
/// gives the correctly rounded result (Clinger's fast path), without `f64::from_str`'s
/// general machinery. None for anything else.
fn simple_decimal(t: &[u8]) -> Option<f64> {
    const POW10: [f64; 16] = [
        1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
    ];
    let (negative, digits) = match t {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, t),
    };
    let mut mantissa: u64 = 0;
    let mut count = 0usize;
    let mut dot: Option<usize> = None;
    for &c in digits {
        match c {
            b'0'..=b'9' if count < 15 => {
                mantissa = mantissa * 10 + u64::from(c - b'0');
                count += 1;
            }
            b'.' if dot.is_none() => dot = Some(count),
            _ => return None,
        }
    }
    if count == 0 {
        return None;
    }
    let scale = POW10.get(dot.map_or(0, |d| count - d))?;
    let magnitude = mantissa as f64 / scale;
    Some(if negative { -magnitude } else { magnitude })
}

/// Whether `t` is a float as InfluxDB writes them: `-?(d+(.d*)?|.d+)([eE][+-]?d+)?`. This
/// is narrower than Rust's `f64::from_str`, which also takes `+`, `inf` and `NaN`.
fn is_float_syntax(t: &[u8]) -> bool {
    let digits = |mut i: usize| {
        while t.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        i
    };
    let mut i = usize::from(t.first() == Some(&b'-'));
    let int_end = digits(i);
    let mut mantissa_digits = int_end - i;
    i = int_end;
    if t.get(i) == Some(&b'.') {
        let frac_end = digits(i + 1);
        mantissa_digits += frac_end - (i + 1);
        i = frac_end;
    }
    if mantissa_digits == 0 {
        return false;
    }
    if matches!(t.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(t.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let exp_end = digits(i);
        if exp_end == i {
            return false;
        }
        i = exp_end;
    }
    i == t.len()
}

/// Parses one line. `s` is the line without its line end and surrounding whitespace, and
/// holds newlines only inside quoted string values (see [`quoted_line_len`]).
struct LineParser<'a> {
    s: &'a str,
    b: &'a [u8],
    line_number: usize,
    measurement: Option<Cow<'a, str>>,
}

impl<'a> LineParser<'a> {
    // Cold and out of line so that the happy path stays small.
    #[cold]
    #[inline(never)]
    fn error(&self, reason: &str, column: Option<&str>) -> LineError {
        LineError {
            line_number: self.line_number,
            reason: reason.to_owned(),
            measurement: self.measurement.as_deref().map(str::to_owned),
            column: column.map(str::to_owned),
        }
    }

    fn text(&self, from: usize, to: usize) -> Result<&'a str, LineError> {
        // Every cut is next to an ASCII delimiter, so this only fails on a parser bug;
        // even then it must be an error, not a panic.
        self.s
            .get(from..to)
            .ok_or_else(|| self.error("internal error: bad token bounds", None))
    }

    fn name(
        &self,
        from: usize,
        to: usize,
        escaped: bool,
        special: &[bool; 256],
    ) -> Result<Cow<'a, str>, LineError> {
        let raw = self.text(from, to)?;
        Ok(if escaped {
            Cow::Owned(unescape(raw, special))
        } else {
            Cow::Borrowed(raw)
        })
    }

    fn skip_spaces(&self, mut i: usize) -> usize {
        while self.b.get(i) == Some(&b' ') {
            i += 1;
        }
        i
    }

    fn parse(mut self, tags_hint: usize, fields_hint: usize) -> Result<ParsedLine<'a>, LineError> {
        let b = self.b;

        let (end, escaped) = scan_name(b, 0, &MEASUREMENT_SPECIAL);
        if end == 0 {
            return Err(self.error("missing measurement", None));
        }
        let measurement = self.name(0, end, escaped, &MEASUREMENT_SPECIAL)?;
        self.measurement = Some(measurement);
        let mut pos = end;

        let mut tags: Vec<(Cow<'a, str>, Cow<'a, str>)> = Vec::with_capacity(tags_hint);
        while b.get(pos) == Some(&b',') {
            let key_start = pos + 1;
            let (key_end, escaped) = scan_name(b, key_start, &KEY_SPECIAL);
            if key_end == key_start {
                return Err(self.error("empty tag key", None));
            }
            let key = self.name(key_start, key_end, escaped, &KEY_SPECIAL)?;
            if b.get(key_end) != Some(&b'=') {
                return Err(self.error("missing tag value", Some(&key)));
            }
            let value_start = key_end + 1;
            let (value_end, escaped) = scan_name(b, value_start, &KEY_SPECIAL);
            if b.get(value_end) == Some(&b'=') {
                return Err(self.error("unescaped `=` in tag value", Some(&key)));
            }
            if value_end == value_start {
                return Err(self.error("empty tag value", Some(&key)));
            }
            if key == "time" {
                return Err(self.error("`time` is reserved", Some(&key)));
            }
            let value = self.name(value_start, value_end, escaped, &KEY_SPECIAL)?;
            push(&mut tags, (key, value));
            pos = value_end;
        }
        if let Some(key) = first_duplicate(&tags) {
            return Err(self.error("duplicate tag key", Some(key)));
        }

        pos = self.skip_spaces(pos);
        if pos >= b.len() {
            return Err(self.error("missing field set", None));
        }

        let mut fields: Vec<(Cow<'a, str>, FieldValue<'a>)> = Vec::with_capacity(fields_hint);
        loop {
            let (key_end, escaped) = scan_name(b, pos, &KEY_SPECIAL);
            if key_end == pos {
                return Err(self.error("empty field key", None));
            }
            let key = self.name(pos, key_end, escaped, &KEY_SPECIAL)?;
            if b.get(key_end) != Some(&b'=') {
                return Err(self.error("missing field value", Some(&key)));
            }
            if key == "time" {
                return Err(self.error("`time` is reserved", Some(&key)));
            }
            pos = self.field_value(key_end + 1, key, &mut fields)?;
            if b.get(pos) == Some(&b',') {
                pos += 1;
            } else {
                break;
            }
        }
        if let Some(key) = first_duplicate(&fields) {
            return Err(self.error("duplicate field key", Some(key)));
        }

        pos = self.skip_spaces(pos);
        let timestamp = if pos < b.len() {
            let start = pos;
            while b.get(pos).is_some_and(|&c| c != b' ') {
                pos += 1;
            }
            let timestamp = match parse_i64(b.get(start..pos).unwrap_or_default()) {
                Ok(timestamp) => timestamp,
                Err(NumberError::Invalid) => return Err(self.error("invalid timestamp", None)),
                Err(NumberError::OutOfRange) => {
                    return Err(self.error("timestamp out of range", None));
                }
            };
            if self.skip_spaces(pos) < b.len() {
                return Err(self.error("unexpected text after timestamp", None));
            }
            Some(timestamp)
        } else {
            None
        };

        Ok(ParsedLine {
            line_number: self.line_number,
            measurement: self.measurement.take().unwrap_or_default(),
            tags,
            fields,
            timestamp,
        })
    }

    /// Parses the field value starting at `start` and adds the field; returns where the
    /// value ends. (Each arm pushes its own value, which keeps the value out of a stack
    /// temporary; see [`push`].)
    fn field_value(
        &self,
        start: usize,
        key: Cow<'a, str>,
        fields: &mut Vec<(Cow<'a, str>, FieldValue<'a>)>,
    ) -> Result<usize, LineError> {
        let b = self.b;
        if b.get(start) == Some(&b'"') {
            return self.string_value(start + 1, key, fields);
        }

        let mut end = start;
        while b.get(end).is_some_and(|&c| c != b',' && c != b' ') {
            end += 1;
        }
        let token = b.get(start..end).unwrap_or_default();
        let error = |reason, key: &str| Err(self.error(reason, Some(key)));
        match token {
            [] => return error("missing field value", &key),
            [b't' | b'T' | b'f' | b'F', ..] => match token {
                b"t" | b"T" | b"true" | b"True" | b"TRUE" => {
                    push(fields, (key, FieldValue::Boolean(true)));
                }
                b"f" | b"F" | b"false" | b"False" | b"FALSE" => {
                    push(fields, (key, FieldValue::Boolean(false)));
                }
                _ => return error("invalid boolean value", &key),
            },
            [b'-' | b'+' | b'.' | b'0'..=b'9', .., b'i'] => {
                match parse_i64(token.get(..token.len() - 1).unwrap_or_default()) {
                    Ok(v) => push(fields, (key, FieldValue::Integer(v))),
                    Err(NumberError::Invalid) => return error("invalid integer value", &key),
                    Err(NumberError::OutOfRange) => {
                        return error("integer value out of range", &key);
                    }
                }
            }
            [b'-' | b'+' | b'.' | b'0'..=b'9', .., b'u'] => {
                match parse_u64(token.get(..token.len() - 1).unwrap_or_default()) {
                    Ok(v) => push(fields, (key, FieldValue::UInteger(v))),
                    Err(NumberError::Invalid) => {
                        return error("invalid unsigned integer value", &key);
                    }
                    Err(NumberError::OutOfRange) => {
                        return error("unsigned integer value out of range", &key);
                    }
                }
            }
            [b'-' | b'+' | b'.' | b'0'..=b'9', ..] => {
                if let Some(v) = simple_decimal(token) {
                    push(fields, (key, FieldValue::Float(v)));
                    return Ok(end);
                }
                if !is_float_syntax(token) {
                    return error("invalid float value", &key);
                }
                match self.text(start, end)?.parse::<f64>() {
                    Ok(v) if v.is_finite() => push(fields, (key, FieldValue::Float(v))),
                    Ok(_) => return error("float value out of range", &key),
                    Err(_) => return error("invalid float value", &key),
                }
            }
            _ => return error("invalid field value (strings must be double-quoted)", &key),
        }
        Ok(end)
    }

    /// Parses a quoted string value whose content starts at `start`, after the quote.
    fn string_value(
        &self,
        start: usize,
        key: Cow<'a, str>,
        fields: &mut Vec<(Cow<'a, str>, FieldValue<'a>)>,
    ) -> Result<usize, LineError> {
        let b = self.b;
        let mut i = start;
        let mut escaped = false;
        let close = loop {
            let Some(found) = memchr2(b'"', b'\\', b.get(i..).unwrap_or_default()) else {
                return Err(self.error("unterminated string", Some(&key)));
            };
            let at = i + found;
            if b.get(at) == Some(&b'"') {
                break at;
            }
            if b.get(at + 1).is_some_and(|&n| STRING_ESCAPED[n as usize]) {
                escaped = true;
                i = at + 2;
            } else {
                i = at + 1;
            }
        };
        let raw = self.text(start, close)?;
        let value = if escaped {
            Cow::Owned(unescape(raw, &STRING_ESCAPED))
        } else {
            Cow::Borrowed(raw)
        };
        let end = close + 1;
        if !matches!(b.get(end), None | Some(b',' | b' ')) {
            return Err(self.error("unexpected character after string value", Some(&key)));
        }
        push(fields, (key, FieldValue::String(value)));
        Ok(end)
    }
}

/// `Vec::push`, with the growing out of line: then the element can go from registers
/// straight into the vector, where `push` itself made the compiler stage it on the stack
/// and stall on store forwarding, about a fifth of the parse time.
#[inline(always)]
fn push<T>(vec: &mut Vec<T>, item: T) {
    if vec.len() < vec.capacity() {
        vec.push(item);
    } else {
        grow_and_push(vec, item);
    }
}

#[cold]
#[inline(never)]
fn grow_and_push<T>(vec: &mut Vec<T>, item: T) {
    vec.push(item);
}

/// The first key that occurs twice, if any.
fn first_duplicate<'k, V>(items: &'k [(Cow<'_, str>, V)]) -> Option<&'k str> {
    // Lines have a handful of keys, where comparing all pairs beats hashing; sorting keeps
    // a line with thousands of keys from costing millions of comparisons.
    // A 64-bit filter of cheap fingerprints skips the comparisons for most keys.
    if items.len() <= 16 {
        let mut seen: u64 = 0;
        for (i, (key, _)) in items.iter().enumerate() {
            let bit = 1u64 << fingerprint(key);
            if seen & bit != 0 && items.iter().take(i).any(|(earlier, _)| earlier == key) {
                return Some(key);
            }
            seen |= bit;
        }
        None
    } else {
        let mut keys: Vec<&str> = items.iter().map(|(key, _)| key.as_ref()).collect();
        keys.sort_unstable();
        keys.windows(2).find_map(|pair| match pair {
            [a, b] if a == b => Some(*a),
            _ => None,
        })
    }
}

/// A number below 64 that equal keys share and different keys rarely do.
fn fingerprint(key: &str) -> u32 {
    let b = key.as_bytes();
    let byte = |i: usize| u32::from(b.get(i).copied().unwrap_or(0));
    let mixed = (b.len() as u32)
        ^ (byte(0) << 8)
        ^ (byte(b.len() / 2) << 16)
        ^ (byte(b.len().wrapping_sub(1)) << 24);
    mixed.wrapping_mul(0x9E37_79B1) >> 26
}

/// Parses `body` and panics if an invariant breaks: line numbers that do not increase or
/// point past the body, an accepted line without fields, or a newline outside the string
/// values of an accepted line (the line splitter and the parser would then disagree on
/// where strings are). For the parser's property tests and its fuzz target.
#[doc(hidden)]
pub fn check_invariants(body: &[u8]) {
    let newlines = body.iter().filter(|&&c| c == b'\n').count();
    let mut last = 0;
    for result in parse_lines(body) {
        let line_number = match &result {
            Ok(line) => {
                // Outside string values a parsed line never holds a newline.
                assert!(!line.measurement.contains('\n'));
                assert!(
                    line.tags
                        .iter()
                        .all(|(k, v)| !k.contains('\n') && !v.contains('\n'))
                );
                assert!(line.fields.iter().all(|(k, _)| !k.contains('\n')));
                assert!(!line.fields.is_empty());
                if let Some(ts) = line.timestamp {
                    let _ = Precision::Auto.to_nanos(ts);
                }
                line.line_number
            }
            Err(e) => e.line_number,
        };
        assert!(line_number > last && line_number <= newlines + 1);
        last = line_number;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse_all(body: &str) -> Vec<Result<ParsedLine<'_>, LineError>> {
        parse_lines(body.as_bytes()).collect()
    }

    fn parse_one(body: &str) -> ParsedLine<'_> {
        let mut lines = parse_all(body);
        assert_eq!(lines.len(), 1, "{lines:?}");
        lines.remove(0).unwrap_or_else(|e| panic!("{body:?}: {e}"))
    }

    fn parse_err(body: &str) -> LineError {
        let mut lines = parse_all(body);
        assert_eq!(lines.len(), 1, "{lines:?}");
        match lines.remove(0) {
            Err(e) => e,
            Ok(line) => panic!("{body:?} parsed: {line:?}"),
        }
    }

    fn field<'a>(line: &'a ParsedLine<'_>, key: &str) -> &'a FieldValue<'a> {
        &line.fields.iter().find(|(k, _)| k == key).unwrap().1
    }

    fn one_field(body: &str) -> FieldValue<'_> {
        let line = parse_one(body);
        assert_eq!(line.fields.len(), 1);
        line.fields.into_iter().next().unwrap().1
    }

    #[test]
    fn precision_parse() {
        use Precision::*;
        for (s, p) in [
            ("ns", Nanosecond),
            ("N", Nanosecond),
            ("NanoSecond", Nanosecond),
            ("us", Microsecond),
            ("U", Microsecond),
            ("µs", Microsecond),
            ("µS", Microsecond),
            ("μs", Microsecond),
            ("MICROSECOND", Microsecond),
            ("ms", Millisecond),
            ("Millisecond", Millisecond),
            ("s", Second),
            ("SECOND", Second),
            ("auto", Auto),
            ("AUTO", Auto),
        ] {
            assert_eq!(Precision::parse(s), Some(p), "{s}");
        }
        for s in ["", "h", "m", "nanoseconds", " ns", "ns ", "msec", "µ"] {
            assert_eq!(Precision::parse(s), None, "{s}");
        }
    }

    #[test]
    fn precision_to_nanos() {
        use Precision::*;
        assert_eq!(Nanosecond.to_nanos(123), Some(123));
        assert_eq!(Microsecond.to_nanos(123), Some(123_000));
        assert_eq!(Millisecond.to_nanos(-123), Some(-123_000_000));
        assert_eq!(
            Second.to_nanos(1_700_000_000),
            Some(1_700_000_000_000_000_000)
        );
        assert_eq!(Second.to_nanos(10_000_000_000), None);
        assert_eq!(Microsecond.to_nanos(i64::MIN), None);
        assert_eq!(Nanosecond.to_nanos(i64::MIN), Some(i64::MIN));

        // Auto: the same instant in all four precisions.
        let ns = 1_708_976_567_123_456_789;
        assert_eq!(
            Auto.to_nanos(1_708_976_567),
            Some(1_708_976_567_000_000_000)
        );
        assert_eq!(
            Auto.to_nanos(1_708_976_567_123),
            Some(1_708_976_567_123_000_000)
        );
        assert_eq!(
            Auto.to_nanos(1_708_976_567_123_456),
            Some(1_708_976_567_123_456_000)
        );
        assert_eq!(Auto.to_nanos(ns), Some(ns));
        assert_eq!(
            Auto.to_nanos(-1_708_976_567),
            Some(-1_708_976_567_000_000_000)
        );
        // The boundaries.
        assert_eq!(
            Auto.to_nanos(4_999_999_999),
            Some(4_999_999_999_000_000_000)
        );
        assert_eq!(Auto.to_nanos(5_000_000_000), Some(5_000_000_000_000_000));
        assert_eq!(
            Auto.to_nanos(4_999_999_999_999),
            Some(4_999_999_999_999_000_000)
        );
        assert_eq!(
            Auto.to_nanos(5_000_000_000_000),
            Some(5_000_000_000_000_000)
        );
        assert_eq!(
            Auto.to_nanos(4_999_999_999_999_999),
            Some(4_999_999_999_999_999_000)
        );
        assert_eq!(
            Auto.to_nanos(5_000_000_000_000_000),
            Some(5_000_000_000_000_000)
        );
        assert_eq!(Auto.to_nanos(0), Some(0));
        assert_eq!(Auto.to_nanos(i64::MIN), Some(i64::MIN));
        assert_eq!(Auto.to_nanos(i64::MAX), Some(i64::MAX));
    }

    #[test]
    fn full_line_borrows() {
        let line = parse_one(
            "cpu,host=a,region=eu usage=1.5,count=3i,up=t,name=\"x y\" 1700000000000000000",
        );
        assert_eq!(line.line_number, 1);
        assert!(matches!(line.measurement, Cow::Borrowed("cpu")));
        assert_eq!(
            line.tags,
            vec![("host".into(), "a".into()), ("region".into(), "eu".into())]
        );
        assert!(
            line.tags
                .iter()
                .all(|(k, v)| matches!(k, Cow::Borrowed(_)) && matches!(v, Cow::Borrowed(_)))
        );
        assert_eq!(field(&line, "usage"), &FieldValue::Float(1.5));
        assert_eq!(field(&line, "count"), &FieldValue::Integer(3));
        assert_eq!(field(&line, "up"), &FieldValue::Boolean(true));
        assert!(matches!(
            field(&line, "name"),
            FieldValue::String(Cow::Borrowed("x y"))
        ));
        assert!(
            line.fields
                .iter()
                .all(|(k, _)| matches!(k, Cow::Borrowed(_)))
        );
        assert_eq!(line.timestamp, Some(1_700_000_000_000_000_000));
    }

    #[test]
    fn no_tags_no_timestamp() {
        let line = parse_one("m f=1");
        assert_eq!(line.measurement, "m");
        assert!(line.tags.is_empty());
        assert_eq!(line.fields, vec![("f".into(), FieldValue::Float(1.0))]);
        assert_eq!(line.timestamp, None);
    }

    #[test]
    fn measurement_escapes() {
        let line = parse_one(r"my\,meas\ ure\\ment,t=v f=1");
        assert!(matches!(line.measurement, Cow::Owned(_)));
        assert_eq!(line.measurement, r"my,meas ure\ment");
        // `=` needs no escape in a measurement, so `\=` keeps its backslash.
        assert_eq!(parse_one(r"a\=b=c f=1").measurement, r"a\=b=c");
        // A backslash before anything else is literal, and the name stays borrowed.
        let line = parse_one(r"a\b\  f=1");
        assert_eq!(line.measurement, r"a\b ");
        assert!(matches!(
            parse_one(r"a\b f=1").measurement,
            Cow::Borrowed(r"a\b")
        ));
        // Quotes in a measurement are literal.
        assert_eq!(parse_one("\"m\" f=1").measurement, "\"m\"");
    }

    #[test]
    fn tag_and_field_key_escapes() {
        let line = parse_one(r"m,k\,e\=y\ \\=v\,a\=l\ u\\e f\,i\=e\ l\\d=1i");
        assert_eq!(line.tags, vec![(r"k,e=y \".into(), r"v,a=l u\e".into())]);
        assert!(matches!(line.tags[0].0, Cow::Owned(_)));
        assert!(matches!(line.tags[0].1, Cow::Owned(_)));
        assert_eq!(
            line.fields,
            vec![(r"f,i=e l\d".into(), FieldValue::Integer(1))]
        );
        assert!(matches!(line.fields[0].0, Cow::Owned(_)));
        // Literal backslashes, quotes and `#` in names.
        let line = parse_one(r#"m,a\b="q" #x\y=1"#);
        assert_eq!(line.tags, vec![(r"a\b".into(), "\"q\"".into())]);
        assert_eq!(line.fields, vec![(r"#x\y".into(), FieldValue::Float(1.0))]);
        // An escaped backslash at the end of a tag value, and an escaped space that
        // hides the field set.
        assert_eq!(
            parse_one(r"m,t=v\\ f=1").tags,
            vec![("t".into(), r"v\".into())]
        );
        assert_eq!(
            parse_err(r"m,t=v\ f=1").reason,
            "unescaped `=` in tag value"
        );
    }

    #[test]
    fn string_values() {
        assert!(matches!(
            one_field(r#"m f="""#),
            FieldValue::String(Cow::Borrowed(""))
        ));
        assert!(matches!(
            one_field(r#"m f="a, b=c d""#),
            FieldValue::String(Cow::Borrowed("a, b=c d"))
        ));
        let value = one_field(r#"m f="say \"hi\" \\ \n \t""#);
        assert_eq!(value, FieldValue::String(r#"say "hi" \ \n \t"#.into()));
        assert!(matches!(value, FieldValue::String(Cow::Owned(_))));
        // A backslash before the closing quote escapes it; an escaped backslash does not.
        assert_eq!(one_field(r#"m f="a\\""#), FieldValue::String(r"a\".into()));
        assert_eq!(parse_err(r#"m f="a\""#).reason, "unterminated string");
        let line = parse_one(r#"m s="x",n=2i 5"#);
        assert_eq!(
            line.fields,
            vec![
                ("s".into(), FieldValue::String("x".into())),
                ("n".into(), FieldValue::Integer(2))
            ]
        );
        assert_eq!(line.timestamp, Some(5));
        // Unicode.
        assert_eq!(
            one_field("m f=\"zürich 東京\""),
            FieldValue::String("zürich 東京".into())
        );
    }

    #[test]
    fn newlines_inside_strings() {
        let body = "m f=\"line one\nline two\r\nline \\\"three\\\"\n\",g=1i 7\nm f=2 8\r\n\nm,t=\"v f=\"x\ny\"\n";
        let lines = parse_all(body);
        assert_eq!(lines.len(), 3, "{lines:?}");
        let first = lines[0].as_ref().unwrap();
        assert_eq!(first.line_number, 1);
        assert_eq!(
            field(first, "f"),
            &FieldValue::String("line one\nline two\r\nline \"three\"\n".into())
        );
        assert_eq!(field(first, "g"), &FieldValue::Integer(1));
        assert_eq!(first.timestamp, Some(7));
        let second = lines[1].as_ref().unwrap();
        assert_eq!(second.line_number, 5);
        assert_eq!(second.timestamp, Some(8));
        // A quote in a tag value starts no string.
        let third = lines[2].as_ref().unwrap();
        assert_eq!(third.line_number, 7);
        assert_eq!(third.tags, vec![("t".into(), "\"v".into())]);
        assert_eq!(field(third, "f"), &FieldValue::String("x\ny".into()));

        // Quotes in measurements, field keys, unquoted values, timestamps and comments do
        // not swallow the next line.
        let body = "\"m f=1\nm \"f=1\nm f=1\"\nm f=1 1\"\n# \"\nm f=\"ok\"\n";
        let lines = parse_all(body);
        let numbers: Vec<usize> = lines
            .iter()
            .map(|r| match r {
                Ok(l) => l.line_number,
                Err(e) => e.line_number,
            })
            .collect();
        assert_eq!(numbers, vec![1, 2, 3, 4, 6]);
        assert!(lines[0].is_ok() && lines[1].is_ok() && lines[2].is_err() && lines[3].is_err());
        assert_eq!(
            lines[4].as_ref().unwrap().fields,
            vec![("f".into(), FieldValue::String("ok".into()))]
        );
    }

    #[test]
    fn integers() {
        assert_eq!(one_field("m f=0i"), FieldValue::Integer(0));
        assert_eq!(one_field("m f=-0i"), FieldValue::Integer(0));
        assert_eq!(one_field("m f=-42i"), FieldValue::Integer(-42));
        assert_eq!(one_field("m f=007i"), FieldValue::Integer(7));
        assert_eq!(
            one_field("m f=9223372036854775807i"),
            FieldValue::Integer(i64::MAX)
        );
        assert_eq!(
            one_field("m f=-9223372036854775808i"),
            FieldValue::Integer(i64::MIN)
        );
        for bad in [
            "9223372036854775808i",
            "-9223372036854775809i",
            "99999999999999999999999i",
        ] {
            let e = parse_err(&format!("m f={bad}"));
            assert_eq!(e.reason, "integer value out of range", "{bad}");
            assert_eq!(e.column.as_deref(), Some("f"));
        }
        for bad in [
            "1.5i",
            "-i",
            "+1i",
            "1e3i",
            "1x2i",
            "--1i",
            "1ii",
            "99999999999999999999999xi",
        ] {
            assert_eq!(
                parse_err(&format!("m f={bad}")).reason,
                "invalid integer value",
                "{bad}"
            );
        }
    }

    #[test]
    fn unsigned_integers() {
        assert_eq!(one_field("m f=0u"), FieldValue::UInteger(0));
        assert_eq!(
            one_field("m f=18446744073709551615u"),
            FieldValue::UInteger(u64::MAX)
        );
        assert_eq!(
            parse_err("m f=18446744073709551616u").reason,
            "unsigned integer value out of range"
        );
        for bad in ["-1u", "1.0u", ".u", "1e2u"] {
            assert_eq!(
                parse_err(&format!("m f={bad}")).reason,
                "invalid unsigned integer value",
                "{bad}"
            );
        }
    }

    #[test]
    fn floats() {
        for (text, value) in [
            ("1", 1.0),
            ("-1", -1.0),
            ("1.5", 1.5),
            ("-1.5E-3", -1.5e-3),
            ("1e3", 1e3),
            ("1E+3", 1e3),
            (".5", 0.5),
            ("-.5", -0.5),
            ("5.", 5.0),
            ("5.e2", 500.0),
            ("0", 0.0),
            ("1e-400", 0.0),
            (
                "179769313486231570000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
                f64::MAX,
            ),
        ] {
            assert_eq!(
                one_field(&format!("m f={text}")),
                FieldValue::Float(value),
                "{text}"
            );
        }
        for bad in [
            "-", ".", "-.", "1e", "1e+", "1.2.3", "+1", "1_000", "1;5", "0x10", "-inf", "-NaN",
            "1.5e3.2", "1f",
        ] {
            let e = parse_err(&format!("m f={bad}"));
            assert_eq!(e.reason, "invalid float value", "{bad}");
            assert_eq!(e.column.as_deref(), Some("f"));
        }
        assert_eq!(parse_err("m f=1e400").reason, "float value out of range");
        assert_eq!(parse_err("m f=-1e400").reason, "float value out of range");
        for bad in ["NaN", "nan", "inf", "Inf", "Infinity", "abc", "i", "u"] {
            assert_eq!(
                parse_err(&format!("m f={bad}")).reason,
                "invalid field value (strings must be double-quoted)",
                "{bad}"
            );
        }
    }

    #[test]
    fn booleans() {
        for t in ["t", "T", "true", "True", "TRUE"] {
            assert_eq!(
                one_field(&format!("m f={t}")),
                FieldValue::Boolean(true),
                "{t}"
            );
        }
        for f in ["f", "F", "false", "False", "FALSE"] {
            assert_eq!(
                one_field(&format!("m f={f}")),
                FieldValue::Boolean(false),
                "{f}"
            );
        }
        for bad in ["tRUE", "tru", "truee", "fa", "FaLsE", "f1"] {
            assert_eq!(
                parse_err(&format!("m f={bad}")).reason,
                "invalid boolean value",
                "{bad}"
            );
        }
    }

    #[test]
    fn timestamps() {
        assert_eq!(parse_one("m f=1 0").timestamp, Some(0));
        assert_eq!(parse_one("m f=1 -1").timestamp, Some(-1));
        assert_eq!(
            parse_one("m f=1 9223372036854775807").timestamp,
            Some(i64::MAX)
        );
        assert_eq!(
            parse_one("m f=1 -9223372036854775808").timestamp,
            Some(i64::MIN)
        );
        assert_eq!(parse_one("m f=1   123  \t \r").timestamp, Some(123));
        assert_eq!(parse_one("m f=1 \t").timestamp, None);
        assert_eq!(parse_one("m,t=a   f=1").fields.len(), 1);
        for bad in ["12a", "1.5", "+1", "-", "0x1", "1e9"] {
            let e = parse_err(&format!("m f=1 {bad}"));
            assert_eq!(e.reason, "invalid timestamp", "{bad}");
            assert_eq!(
                (e.measurement.as_deref(), e.column.as_deref()),
                (Some("m"), None)
            );
        }
        assert_eq!(
            parse_err("m f=1 9223372036854775808").reason,
            "timestamp out of range"
        );
        assert_eq!(
            parse_err("m f=1 1 2").reason,
            "unexpected text after timestamp"
        );
    }

    #[test]
    fn line_ends_blank_lines_and_comments() {
        let body = "\n# comment\r\n   # indented comment with \"quote\n\t\r\nm f=1 1\r\n  m f=2 2\n\nm f=3 3";
        let lines: Vec<ParsedLine<'_>> = parse_all(body).into_iter().map(Result::unwrap).collect();
        let got: Vec<(usize, Option<i64>)> =
            lines.iter().map(|l| (l.line_number, l.timestamp)).collect();
        assert_eq!(got, vec![(5, Some(1)), (6, Some(2)), (8, Some(3))]);
        assert_eq!(lines[1].measurement, "m");
        // `\r` before `\n` is not part of the last value.
        assert_eq!(parse_all("m f=t\r\nm s=\"x\"\r\n").len(), 2);
        assert!(
            parse_all("m f=t\r\nm s=\"x\"\r\n")
                .iter()
                .all(Result::is_ok)
        );
        assert!(parse_all("").is_empty());
        assert!(parse_all("\n\n\r\n  \n#\n").is_empty());
    }

    #[test]
    fn invalid_utf8_only_fails_its_line() {
        let body = b"m f=1 1\nm,t=\xff f=1 2\n# \xfe comment\nm f=\"\xc3\" 3\nm f=\"\xc3\xa9\" 4\n";
        let lines: Vec<_> = parse_lines(body).collect();
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert_eq!(lines[0].as_ref().unwrap().timestamp, Some(1));
        let e = lines[1].as_ref().unwrap_err();
        assert_eq!(
            (e.line_number, e.reason.as_str(), e.measurement.as_ref()),
            (2, "invalid UTF-8", None)
        );
        assert_eq!(lines[2].as_ref().unwrap_err().line_number, 4);
        let last = lines[3].as_ref().unwrap();
        assert_eq!(
            (last.line_number, field(last, "f")),
            (5, &FieldValue::String("é".into()))
        );
    }

    #[test]
    fn errors_name_line_measurement_and_column() {
        // (body, reason, measurement, column); the error is on line 2.
        let cases: &[(&str, &str, Option<&str>, Option<&str>)] = &[
            (",t=SECRET f=1", "missing measurement", None, None),
            (" ,t=SECRET f=1", "missing measurement", None, None),
            ("cpu", "missing field set", Some("cpu"), None),
            ("cpu,t=SECRET", "missing field set", Some("cpu"), None),
            ("cpu,t=SECRET  ", "missing field set", Some("cpu"), None),
            ("c\\ pu,=SECRET f=1", "empty tag key", Some("c pu"), None),
            ("cpu,t=SECRET, f=1", "empty tag key", Some("cpu"), None),
            (
                "cpu,host f=SECRET",
                "missing tag value",
                Some("cpu"),
                Some("host"),
            ),
            (
                "cpu,host= f=1",
                "empty tag value",
                Some("cpu"),
                Some("host"),
            ),
            (
                "cpu,host=,x=1 f=1",
                "empty tag value",
                Some("cpu"),
                Some("host"),
            ),
            (
                "cpu,host=SE=CRET f=1",
                "unescaped `=` in tag value",
                Some("cpu"),
                Some("host"),
            ),
            (
                "cpu,host=SECRET,host=SECRET2 f=1",
                "duplicate tag key",
                Some("cpu"),
                Some("host"),
            ),
            (
                "cpu,time=SECRET f=1",
                "`time` is reserved",
                Some("cpu"),
                Some("time"),
            ),
            ("cpu,t=SECRET =1", "empty field key", Some("cpu"), None),
            ("cpu f=1,=2", "empty field key", Some("cpu"), None),
            ("cpu f=1,", "empty field key", Some("cpu"), None),
            (
                "cpu usage",
                "missing field value",
                Some("cpu"),
                Some("usage"),
            ),
            (
                "cpu usage=",
                "missing field value",
                Some("cpu"),
                Some("usage"),
            ),
            (
                "cpu usage= 1",
                "missing field value",
                Some("cpu"),
                Some("usage"),
            ),
            (
                "cpu usage=,x=1",
                "missing field value",
                Some("cpu"),
                Some("usage"),
            ),
            (
                "cpu usage=1,usage=\"SECRET\"",
                "duplicate field key",
                Some("cpu"),
                Some("usage"),
            ),
            (
                "cpu time=1i",
                "`time` is reserved",
                Some("cpu"),
                Some("time"),
            ),
            (
                "cpu usage=SECRET",
                "invalid field value (strings must be double-quoted)",
                Some("cpu"),
                Some("usage"),
            ),
            (
                "cpu usage=12345SECRETi",
                "invalid integer value",
                Some("cpu"),
                Some("usage"),
            ),
            (
                "cpu usage=12345678901234567890123i",
                "integer value out of range",
                Some("cpu"),
                Some("usage"),
            ),
            (
                "cpu usage=12345SECRETu",
                "invalid unsigned integer value",
                Some("cpu"),
                Some("usage"),
            ),
            (
                "cpu usage=-12345u",
                "invalid unsigned integer value",
                Some("cpu"),
                Some("usage"),
            ),
            (
                "cpu usage=123456789012345678901234u",
                "unsigned integer value out of range",
                Some("cpu"),
                Some("usage"),
            ),
            (
                "cpu usage=12345SECRET",
                "invalid float value",
                Some("cpu"),
                Some("usage"),
            ),
            (
                "cpu usage=12345e999",
                "float value out of range",
                Some("cpu"),
                Some("usage"),
            ),
            (
                "cpu usage=tSECRET",
                "invalid boolean value",
                Some("cpu"),
                Some("usage"),
            ),
            (
                "cpu usage=\"SECRET\"x",
                "unexpected character after string value",
                Some("cpu"),
                Some("usage"),
            ),
            (
                "cpu usage=1 12345SECRET",
                "invalid timestamp",
                Some("cpu"),
                None,
            ),
            (
                "cpu usage=1 123456789012345678901234",
                "timestamp out of range",
                Some("cpu"),
                None,
            ),
            (
                "cpu usage=1 12345 SECRET",
                "unexpected text after timestamp",
                Some("cpu"),
                None,
            ),
            (
                "m\\,x,t=a f=1,f=2",
                "duplicate field key",
                Some("m,x"),
                Some("f"),
            ),
            (
                "m f\\ x=1,f\\ x=2",
                "duplicate field key",
                Some("m"),
                Some("f x"),
            ),
        ];
        for &(line, reason, measurement, column) in cases {
            let body = format!("ok f=1\n{line}\nok f=2\n");
            let lines = parse_all(&body);
            assert_eq!(lines.len(), 3, "{line}: {lines:?}");
            assert!(lines[0].is_ok() && lines[2].is_ok(), "{line}: {lines:?}");
            let e = lines[1].as_ref().unwrap_err();
            assert_eq!(e.line_number, 2, "{line}");
            assert_eq!(e.reason, reason, "{line}");
            assert_eq!(e.measurement.as_deref(), measurement, "{line}");
            assert_eq!(e.column.as_deref(), column, "{line}");
            for text in [e.reason.clone(), e.to_string(), format!("{e:?}")] {
                assert!(
                    !text.contains("SECRET") && !text.contains("12345"),
                    "{line}: {text}"
                );
            }
        }
    }

    #[test]
    fn unterminated_string_takes_the_rest_of_the_body() {
        let lines = parse_all("m f=1\nm,t=x f=\"SECRET\nm f=2\n");
        assert_eq!(lines.len(), 2);
        let e = lines[1].as_ref().unwrap_err();
        assert_eq!(
            (e.line_number, e.reason.as_str()),
            (2, "unterminated string")
        );
        assert_eq!(
            (e.measurement.as_deref(), e.column.as_deref()),
            (Some("m"), Some("f"))
        );
        assert!(!format!("{e:?}").contains("SECRET"));
    }

    #[test]
    fn many_keys_duplicate_check() {
        let mut body = String::from("m");
        for i in 0..40 {
            body.push_str(&format!(",t{i}=v"));
        }
        body.push_str(" f=1");
        assert_eq!(parse_one(&body).tags.len(), 40);
        let e = parse_err(&format!("{body},f=2").replace(" f=1,f=2", ",t7=x f=1"));
        assert_eq!(
            (e.reason.as_str(), e.column.as_deref()),
            ("duplicate tag key", Some("t7"))
        );
        let fields: Vec<String> = (0..40).map(|i| format!("f{i}=1")).collect();
        let line = format!("m {},f39=2", fields.join(","));
        let e = parse_err(&line);
        assert_eq!(
            (e.reason.as_str(), e.column.as_deref()),
            ("duplicate field key", Some("f39"))
        );
    }

    #[test]
    fn iterator_is_fused() {
        let mut lines = parse_lines(b"m f=1");
        assert!(lines.next().is_some());
        assert!(lines.next().is_none());
        assert!(lines.next().is_none());
    }

    // ---- property tests ----

    fn escape_into(out: &mut String, name: &str, special: &[char]) {
        for c in name.chars() {
            if c == '\\' || special.contains(&c) {
                out.push('\\');
            }
            out.push(c);
        }
    }

    fn write_value(out: &mut String, value: &FieldValue<'_>, bool_spelling: usize) {
        match value {
            FieldValue::Float(v) => out.push_str(&format!("{v:?}")),
            FieldValue::Integer(v) => out.push_str(&format!("{v}i")),
            FieldValue::UInteger(v) => out.push_str(&format!("{v}u")),
            FieldValue::Boolean(v) => {
                let spellings = if *v {
                    ["t", "T", "true", "True", "TRUE"]
                } else {
                    ["f", "F", "false", "False", "FALSE"]
                };
                out.push_str(spellings[bool_spelling % 5]);
            }
            FieldValue::Encrypted(_) => unreachable!("the parser never makes ciphertext"),
            FieldValue::String(s) => {
                out.push('"');
                for c in s.chars() {
                    if c == '"' || c == '\\' {
                        out.push('\\');
                    }
                    out.push(c);
                }
                out.push('"');
            }
        }
    }

    // Names use the characters that need escaping, quotes, `#` and non-ASCII, but no
    // whitespace other than space and no newlines.
    fn name() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9_ ,=\\\\\"#.é東-]{1,10}"
    }

    fn value() -> impl Strategy<Value = FieldValue<'static>> {
        prop_oneof![
            any::<f64>()
                .prop_filter("finite", |v| v.is_finite())
                .prop_map(FieldValue::Float),
            any::<i64>().prop_map(FieldValue::Integer),
            any::<u64>().prop_map(FieldValue::UInteger),
            any::<bool>().prop_map(FieldValue::Boolean),
            any::<String>().prop_map(|s| FieldValue::String(Cow::Owned(s))),
            "[ ,=\"\\\\\n\ra-z]{0,8}".prop_map(|s| FieldValue::String(Cow::Owned(s))),
        ]
    }

    #[derive(Debug, Clone)]
    struct GenLine {
        measurement: String,
        tags: Vec<(String, String)>,
        fields: Vec<(String, FieldValue<'static>)>,
        timestamp: Option<i64>,
        spaces: usize,
        bool_spelling: usize,
        crlf: bool,
        blank_lines_before: usize,
        comment_before: bool,
    }

    fn gen_line() -> impl Strategy<Value = GenLine> {
        (
            name().prop_map(|m| {
                if m.starts_with('#') {
                    format!("m{m}")
                } else {
                    m
                }
            }),
            prop::collection::btree_map(name(), name(), 0..5),
            prop::collection::btree_map(name(), value(), 1..5),
            prop::option::of(any::<i64>()),
            (
                1usize..3,
                0usize..5,
                any::<bool>(),
                0usize..2,
                any::<bool>(),
            ),
        )
            .prop_map(
                |(
                    measurement,
                    tags,
                    fields,
                    timestamp,
                    (spaces, bool_spelling, crlf, blank_lines_before, comment_before),
                )| GenLine {
                    measurement,
                    tags: tags.into_iter().filter(|(k, _)| k != "time").collect(),
                    fields: fields.into_iter().filter(|(k, _)| k != "time").collect(),
                    timestamp,
                    spaces,
                    bool_spelling,
                    crlf,
                    blank_lines_before,
                    comment_before,
                },
            )
            .prop_filter("at least one field", |l| !l.fields.is_empty())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..600)) {
            check_invariants(&body);
        }

        #[test]
        fn structural_bytes_never_panic(body in prop::collection::vec(prop::sample::select(b"ab1-.eiuEtf,= \"\\\n\r\t#".to_vec()), 0..200)) {
            check_invariants(&body);
        }

        #[test]
        fn float_fast_path_matches_std(text in "-?[0-9]{0,17}(\\.[0-9]{0,17})?") {
            let std = text.parse::<f64>().ok();
            if let Some(fast) = simple_decimal(text.as_bytes()) {
                prop_assert_eq!(Some(fast.to_bits()), std.map(f64::to_bits), "{}", text);
            }
            if let Ok(FieldValue::Float(v)) = parse_one_value(&text) {
                prop_assert_eq!(Some(v.to_bits()), std.map(f64::to_bits), "{}", text);
            }
        }

        #[test]
        fn valid_lines_round_trip(lines in prop::collection::vec(gen_line(), 1..6)) {
            let mut body = String::new();
            let mut expected = Vec::new();
            let mut line_number = 1;
            for l in &lines {
                for _ in 0..l.blank_lines_before {
                    body.push_str("  \n");
                    line_number += 1;
                }
                if l.comment_before {
                    body.push_str("# \"a comment\" x=\"\n");
                    line_number += 1;
                }
                let start = body.len();
                escape_into(&mut body, &l.measurement, &[',', ' ']);
                for (k, v) in &l.tags {
                    body.push(',');
                    escape_into(&mut body, k, &[',', '=', ' ']);
                    body.push('=');
                    escape_into(&mut body, v, &[',', '=', ' ']);
                }
                body.push_str(&" ".repeat(l.spaces));
                for (i, (k, v)) in l.fields.iter().enumerate() {
                    if i > 0 {
                        body.push(',');
                    }
                    escape_into(&mut body, k, &[',', '=', ' ']);
                    body.push('=');
                    write_value(&mut body, v, l.bool_spelling);
                }
                if let Some(ts) = l.timestamp {
                    body.push_str(&" ".repeat(l.spaces));
                    body.push_str(&ts.to_string());
                }
                body.push_str(if l.crlf { "\r\n" } else { "\n" });
                expected.push(ParsedLine {
                    line_number,
                    measurement: Cow::Owned(l.measurement.clone()),
                    tags: l.tags.iter().map(|(k, v)| (Cow::Owned(k.clone()), Cow::Owned(v.clone()))).collect(),
                    fields: l.fields.iter().map(|(k, v)| (Cow::Owned(k.clone()), v.clone())).collect(),
                    timestamp: l.timestamp,
                });
                line_number += body[start..].matches('\n').count();
            }
            let parsed: Vec<_> = parse_lines(body.as_bytes()).collect();
            let parsed: Vec<ParsedLine<'_>> = parsed
                .into_iter()
                .map(|r| r.map_err(|e| TestCaseError::fail(format!("{e:?} in {body:?}"))))
                .collect::<Result<_, _>>()?;
            prop_assert_eq!(parsed, expected, "body: {:?}", body);
        }
    }

    fn parse_one_value(text: &str) -> Result<FieldValue<'static>, LineError> {
        let body = format!("m f={text}");
        let line = parse_lines(body.as_bytes()).next().unwrap()?;
        match line.fields.into_iter().next().unwrap().1 {
            FieldValue::String(s) => Ok(FieldValue::String(Cow::Owned(s.into_owned()))),
            FieldValue::Float(v) => Ok(FieldValue::Float(v)),
            FieldValue::Integer(v) => Ok(FieldValue::Integer(v)),
            FieldValue::UInteger(v) => Ok(FieldValue::UInteger(v)),
            FieldValue::Boolean(v) => Ok(FieldValue::Boolean(v)),
            FieldValue::Encrypted(v) => Ok(FieldValue::Encrypted(Cow::Owned(v.into_owned()))),
        }
    }
}
