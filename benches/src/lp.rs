//! A compact InfluxDB line-protocol writer with correct escaping.
//!
//! ```text
//! measurement[,tag=value...] field=value[,field=value...] timestamp\n
//! ```
//!
//! Escaping (InfluxDB line protocol reference):
//! - measurement: `,` and space are escaped with a backslash;
//! - tag keys, tag values and field keys: `,`, `=` and space;
//! - string field values are wrapped in `"` and `"` and `\` inside are escaped;
//! - a literal backslash in names and tag values is written as `\\`
//!   (the spec reads two contiguous backslashes as one), so a value ending in a backslash
//!   cannot swallow the following separator.
//!
//! Line protocol cannot carry newlines in names or tag values; the writer rejects them
//! (panics), as it does empty keys, non-finite floats and a line without fields. Empty tag
//! values are omitted, as InfluxDB clients do. Floats use Rust's shortest round-trip
//! representation (`58.13`, `100`), integers get an `i` suffix and unsigned integers `u`.

use std::io::Write as _;

fn check_name(kind: &str, s: &str) {
    assert!(!s.is_empty(), "line protocol: empty {kind}");
    assert!(
        !s.contains(['\n', '\r']),
        "line protocol: newline in {kind} {s:?}"
    );
}

/// Append a measurement name, escaping `,`, space and `\`.
pub fn escape_measurement(out: &mut Vec<u8>, s: &str) {
    check_name("measurement", s);
    for &b in s.as_bytes() {
        if matches!(b, b',' | b' ' | b'\\') {
            out.push(b'\\');
        }
        out.push(b);
    }
}

/// Append a tag key, tag value or field key, escaping `,`, `=`, space and `\`.
pub fn escape_key(out: &mut Vec<u8>, s: &str) {
    check_name("tag/field key or tag value", s);
    for &b in s.as_bytes() {
        if matches!(b, b',' | b'=' | b' ' | b'\\') {
            out.push(b'\\');
        }
        out.push(b);
    }
}

/// Append a quoted string field value, escaping `"` and `\`.
pub fn quote_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    for &b in s.as_bytes() {
        if matches!(b, b'"' | b'\\') {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'"');
}

/// Pre-encode a series key (`measurement,tag=value,...`), e.g. once per host, so rows can
/// be written with [`LineWriter::with_series`] without re-escaping the tags.
pub fn series_key(measurement: &str, tags: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    escape_measurement(&mut out, measurement);
    for (k, v) in tags {
        if v.is_empty() {
            continue;
        }
        out.push(b',');
        escape_key(&mut out, k);
        out.push(b'=');
        escape_key(&mut out, v);
    }
    out
}

/// Writes one line into a buffer: `LineWriter::new(buf, "m").tag(..).f64(..).end(ts)`.
pub struct LineWriter<'a> {
    out: &'a mut Vec<u8>,
    fields: usize,
}

impl<'a> LineWriter<'a> {
    pub fn new(out: &'a mut Vec<u8>, measurement: &str) -> Self {
        escape_measurement(out, measurement);
        LineWriter { out, fields: 0 }
    }

    /// Start a line from a series key made by [`series_key`].
    pub fn with_series(out: &'a mut Vec<u8>, series_key: &[u8]) -> Self {
        out.extend_from_slice(series_key);
        LineWriter { out, fields: 0 }
    }

    /// Add a tag; all tags must come before the first field. Empty values are omitted.
    pub fn tag(&mut self, key: &str, value: &str) -> &mut Self {
        assert!(self.fields == 0, "line protocol: tag {key:?} after a field");
        if !value.is_empty() {
            self.out.push(b',');
            escape_key(self.out, key);
            self.out.push(b'=');
            escape_key(self.out, value);
        }
        self
    }

    fn field_key(&mut self, key: &str) {
        self.out.push(if self.fields == 0 { b' ' } else { b',' });
        self.fields += 1;
        escape_key(self.out, key);
        self.out.push(b'=');
    }

    pub fn f64(&mut self, key: &str, v: f64) -> &mut Self {
        assert!(v.is_finite(), "line protocol: non-finite float {key}={v}");
        self.field_key(key);
        write!(self.out, "{v}").expect("write to Vec");
        self
    }

    pub fn i64(&mut self, key: &str, v: i64) -> &mut Self {
        self.field_key(key);
        write!(self.out, "{v}i").expect("write to Vec");
        self
    }

    pub fn u64(&mut self, key: &str, v: u64) -> &mut Self {
        self.field_key(key);
        write!(self.out, "{v}u").expect("write to Vec");
        self
    }

    pub fn bool(&mut self, key: &str, v: bool) -> &mut Self {
        self.field_key(key);
        self.out
            .extend_from_slice(if v { b"true" } else { b"false" });
        self
    }

    pub fn str(&mut self, key: &str, v: &str) -> &mut Self {
        self.field_key(key);
        quote_string(self.out, v);
        self
    }

    /// Finish the line with a timestamp (ns by default) and `\n`. Returns the byte offset
    /// of the timestamp's first digit in the buffer (used to patch timestamps in place).
    pub fn end(self, ts: i64) -> usize {
        assert!(self.fields > 0, "line protocol: line without fields");
        self.out.push(b' ');
        let pos = self.out.len();
        write!(self.out, "{ts}").expect("write to Vec");
        self.out.push(b'\n');
        pos
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Field value as parsed back by [`parse_line`].
    #[derive(Debug, Clone, PartialEq)]
    pub enum Val {
        F(f64),
        I(i64),
        U(u64),
        B(bool),
        S(String),
    }

    /// A line parsed back: (measurement, tags, fields, timestamp).
    pub type Parsed = (String, Vec<(String, String)>, Vec<(String, Val)>, i64);

    /// A strict test-only parser following the line-protocol spec, to check the writer.
    pub fn parse_line(line: &str) -> Parsed {
        let b = line.as_bytes();
        let mut i = 0;
        // read an escaped token until one of `stops` (unescaped)
        let read = |i: &mut usize, stops: &[u8]| -> String {
            let mut out = Vec::new();
            while *i < b.len() && !stops.contains(&b[*i]) {
                if b[*i] == b'\\' && *i + 1 < b.len() && b",= \\\"".contains(&b[*i + 1]) {
                    out.push(b[*i + 1]);
                    *i += 2;
                } else {
                    out.push(b[*i]);
                    *i += 1;
                }
            }
            String::from_utf8(out).unwrap()
        };
        let m = read(&mut i, b", ");
        let mut tags = Vec::new();
        while b[i] == b',' {
            i += 1;
            let k = read(&mut i, b"=");
            assert_eq!(b[i], b'=');
            i += 1;
            let v = read(&mut i, b", ");
            tags.push((k, v));
        }
        assert_eq!(b[i], b' ', "space before fields in {line:?}");
        i += 1;
        let mut fields = Vec::new();
        loop {
            let k = read(&mut i, b"=");
            assert_eq!(b[i], b'=');
            i += 1;
            let v = if b[i] == b'"' {
                i += 1;
                let mut s = Vec::new();
                loop {
                    match b[i] {
                        b'\\' if matches!(b[i + 1], b'"' | b'\\') => {
                            s.push(b[i + 1]);
                            i += 2;
                        }
                        b'"' => {
                            i += 1;
                            break;
                        }
                        c => {
                            s.push(c);
                            i += 1;
                        }
                    }
                }
                Val::S(String::from_utf8(s).unwrap())
            } else {
                let start = i;
                while b[i] != b',' && b[i] != b' ' {
                    i += 1;
                }
                let t = &line[start..i];
                if let Some(n) = t.strip_suffix('i') {
                    Val::I(n.parse().unwrap())
                } else if let Some(n) = t.strip_suffix('u') {
                    Val::U(n.parse().unwrap())
                } else if t == "true" || t == "false" {
                    Val::B(t == "true")
                } else {
                    Val::F(t.parse().unwrap())
                }
            };
            fields.push((k, v));
            if b[i] == b',' {
                i += 1;
            } else {
                break;
            }
        }
        assert_eq!(b[i], b' ');
        let ts = line[i + 1..].trim_end_matches('\n').parse().unwrap();
        (m, tags, fields, ts)
    }

    #[test]
    fn escapes_tags_and_strings() {
        let mut buf = Vec::new();
        let mut w = LineWriter::new(&mut buf, "my meas,urement");
        w.tag("ta g", "a,b c=d").tag("k=", "back\\slash");
        w.str("op name", r#"Robert "Bobby" Tables, Jr. \o/"#);
        w.f64("x", 1.5).i64("n", -3).u64("u", 7).bool("ok", true);
        let pos = w.end(1_700_000_000_000_000_000);
        let line = String::from_utf8(buf.clone()).unwrap();
        assert_eq!(
            line,
            "my\\ meas\\,urement,ta\\ g=a\\,b\\ c\\=d,k\\==back\\\\slash \
             op\\ name=\"Robert \\\"Bobby\\\" Tables, Jr. \\\\o/\",x=1.5,n=-3i,u=7u,ok=true \
             1700000000000000000\n"
        );
        assert_eq!(&buf[pos..pos + 19], b"1700000000000000000");
        let (m, tags, fields, ts) = parse_line(&line);
        assert_eq!(m, "my meas,urement");
        assert_eq!(
            tags,
            vec![
                ("ta g".into(), "a,b c=d".into()),
                ("k=".into(), "back\\slash".into())
            ]
        );
        assert_eq!(
            fields[0],
            (
                "op name".into(),
                Val::S(r#"Robert "Bobby" Tables, Jr. \o/"#.into())
            )
        );
        assert_eq!(fields[1], ("x".into(), Val::F(1.5)));
        assert_eq!(fields[2], ("n".into(), Val::I(-3)));
        assert_eq!(fields[3], ("u".into(), Val::U(7)));
        assert_eq!(fields[4], ("ok".into(), Val::B(true)));
        assert_eq!(ts, 1_700_000_000_000_000_000);
    }

    #[test]
    fn series_key_matches_writer_and_omits_empty_tags() {
        let key = series_key("cpu", &[("host", "h 1"), ("empty", ""), ("r", "x=y")]);
        assert_eq!(key, b"cpu,host=h\\ 1,r=x\\=y");
        let mut a = Vec::new();
        let mut w = LineWriter::with_series(&mut a, &key);
        w.f64("v", 100.0);
        w.end(5);
        let mut b = Vec::new();
        let mut w = LineWriter::new(&mut b, "cpu");
        w.tag("host", "h 1")
            .tag("empty", "")
            .tag("r", "x=y")
            .f64("v", 100.0);
        w.end(5);
        assert_eq!(a, b);
        assert_eq!(a, b"cpu,host=h\\ 1,r=x\\=y v=100 5\n");
    }

    #[test]
    fn non_ascii_passes_through() {
        let mut buf = Vec::new();
        let mut w = LineWriter::new(&mut buf, "ev");
        w.tag("who", "Zoë").str("name", "Jürgen Müller");
        w.end(1);
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "ev,who=Zoë name=\"Jürgen Müller\" 1\n"
        );
    }

    #[test]
    fn trailing_backslash_does_not_escape_separator() {
        let mut buf = Vec::new();
        let mut w = LineWriter::new(&mut buf, "m");
        w.tag("t", "ends\\").str("s", "ends\\");
        w.end(1);
        let line = String::from_utf8(buf).unwrap();
        let (_, tags, fields, _) = parse_line(&line);
        assert_eq!(tags[0].1, "ends\\");
        assert_eq!(fields[0].1, Val::S("ends\\".into()));
    }

    #[test]
    #[should_panic(expected = "after a field")]
    fn tag_after_field_panics() {
        let mut buf = Vec::new();
        let mut w = LineWriter::new(&mut buf, "m");
        w.f64("a", 1.0).tag("t", "v");
    }

    #[test]
    #[should_panic(expected = "without fields")]
    fn line_without_fields_panics() {
        let mut buf = Vec::new();
        LineWriter::new(&mut buf, "m").end(1);
    }

    #[test]
    #[should_panic(expected = "non-finite")]
    fn nan_panics() {
        let mut buf = Vec::new();
        LineWriter::new(&mut buf, "m").f64("a", f64::NAN);
    }
}
