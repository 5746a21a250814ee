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
        // The longest valid UTF-8 prefix, found in one pass, so that lines inside it need
        // no validation of their own; usually that is the whole body.
        valid: body.utf8_chunks().next().map_or("", |chunk| chunk.valid()),
        pos: 0,
        next_line_number: 1,
        tags_hint: 0,
        fields_hint: 0,
    }
}

/// Iterator over the points of a body, returned by [`parse_lines`].
#[derive(Debug, Clone)]
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
                self.tags_hint = parsed.tags.len();
                self.fields_hint = parsed.fields.len();
            }
            return Some(result);
        }
    }
}

impl FusedIterator for LineIter<'_> {}

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

    let to_newline = |from: usize| memchr(b'\n', b.get(from..).unwrap_or_default()).map_or(b.len(), |i| from + i);

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
        match value.checked_mul(10).and_then(|v| v.checked_add(u64::from(digit))) {
            Some(v) => value = v,
            None => overflow = true,
        }
    }
    if overflow { Err(NumberError::OutOfRange) } else { Ok(value) }
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

    fn name(&self, from: usize, to: usize, escaped: bool, special: &[bool; 256]) -> Result<Cow<'a, str>, LineError> {
        let raw = self.text(from, to)?;
        Ok(if escaped { Cow::Owned(unescape(raw, special)) } else { Cow::Borrowed(raw) })
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
            tags.push((key, value));
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
            let (value, value_end) = self.field_value(key_end + 1, &key)?;
            if key == "time" {
                return Err(self.error("`time` is reserved", Some(&key)));
            }
            fields.push((key, value));
            pos = value_end;
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
                Err(NumberError::OutOfRange) => return Err(self.error("timestamp out of range", None)),
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

    /// Parses the field value starting at `start`; returns it and where it ends.
    fn field_value(&self, start: usize, key: &str) -> Result<(FieldValue<'a>, usize), LineError> {
        let b = self.b;
        if b.get(start) == Some(&b'"') {
            return self.string_value(start + 1, key);
        }

        let mut end = start;
        while b.get(end).is_some_and(|&c| c != b',' && c != b' ') {
            end += 1;
        }
        let token = b.get(start..end).unwrap_or_default();
        let error = |reason| Err(self.error(reason, Some(key)));
        let value = match token {
            [] => return error("missing field value"),
            [b't' | b'T' | b'f' | b'F', ..] => match token {
                b"t" | b"T" | b"true" | b"True" | b"TRUE" => FieldValue::Boolean(true),
                b"f" | b"F" | b"false" | b"False" | b"FALSE" => FieldValue::Boolean(false),
                _ => return error("invalid boolean value"),
            },
            [b'-' | b'.' | b'0'..=b'9', .., b'i'] => match parse_i64(token.get(..token.len() - 1).unwrap_or_default()) {
                Ok(v) => FieldValue::Integer(v),
                Err(NumberError::Invalid) => return error("invalid integer value"),
                Err(NumberError::OutOfRange) => return error("integer value out of range"),
            },
            [b'-' | b'.' | b'0'..=b'9', .., b'u'] => match parse_u64(token.get(..token.len() - 1).unwrap_or_default()) {
                Ok(v) => FieldValue::UInteger(v),
                Err(NumberError::Invalid) => return error("invalid unsigned integer value"),
                Err(NumberError::OutOfRange) => return error("unsigned integer value out of range"),
            },
            [b'-' | b'.' | b'0'..=b'9', ..] => {
                if !is_float_syntax(token) {
                    return error("invalid float value");
                }
                match self.text(start, end)?.parse::<f64>() {
                    Ok(v) if v.is_finite() => FieldValue::Float(v),
                    Ok(_) => return error("float value out of range"),
                    Err(_) => return error("invalid float value"),
                }
            }
            _ => return error("invalid field value (strings must be double-quoted)"),
        };
        Ok((value, end))
    }

    /// Parses a quoted string value whose content starts at `start`, after the quote.
    fn string_value(&self, start: usize, key: &str) -> Result<(FieldValue<'a>, usize), LineError> {
        let b = self.b;
        let mut i = start;
        let mut escaped = false;
        let close = loop {
            let Some(found) = memchr2(b'"', b'\\', b.get(i..).unwrap_or_default()) else {
                return Err(self.error("unterminated string", Some(key)));
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
        let value = if escaped { Cow::Owned(unescape(raw, &STRING_ESCAPED)) } else { Cow::Borrowed(raw) };
        let end = close + 1;
        if !matches!(b.get(end), None | Some(b',' | b' ')) {
            return Err(self.error("unexpected character after string value", Some(key)));
        }
        Ok((FieldValue::String(value), end))
    }
}

/// The first key that occurs twice, if any.
fn first_duplicate<'k, V>(items: &'k [(Cow<'_, str>, V)]) -> Option<&'k str> {
    // Lines have a handful of keys, where comparing all pairs beats hashing; sorting keeps
    // a line with thousands of keys from costing millions of comparisons.
    if items.len() <= 16 {
        items.iter().enumerate().find_map(|(i, (key, _))| {
            items.iter().take(i).any(|(earlier, _)| earlier == key).then_some(key.as_ref())
        })
    } else {
        let mut keys: Vec<&str> = items.iter().map(|(key, _)| key.as_ref()).collect();
        keys.sort_unstable();
        keys.windows(2).find_map(|pair| match pair {
            [a, b] if a == b => Some(*a),
            _ => None,
        })
    }
}
