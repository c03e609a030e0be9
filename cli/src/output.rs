//! Turning rows into text or JSON. Commands decide what to print; this module decides how.

use std::fmt;
use std::io::Write;

use serde_json::{Map, Value};
use tokio_postgres::Row;
use tokio_postgres::types::Type;

/// Writes one line on stdout. A closed stdout (`steep-repl ... | head`) is not worth a panic: the
/// exit code still tells the outcome.
pub fn write_line(args: fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{args}").and_then(|()| out.flush()).is_err() {
        // Nobody reads stdout any more.
    }
}

/// `println!` through [`write_line`].
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::output::write_line(format_args!($($arg)*))
    };
}
pub(crate) use outln;

/// A row as an ordered JSON object, converting the column types steep_repl's functions return.
pub fn row_to_json(row: &Row) -> Map<String, Value> {
    let mut map = Map::new();
    for (i, col) in row.columns().iter().enumerate() {
        let v = match *col.type_() {
            Type::BOOL => row.try_get::<_, Option<bool>>(i).ok().flatten().map(Value::from),
            Type::INT2 => row.try_get::<_, Option<i16>>(i).ok().flatten().map(Value::from),
            Type::INT4 => row.try_get::<_, Option<i32>>(i).ok().flatten().map(Value::from),
            Type::INT8 => row.try_get::<_, Option<i64>>(i).ok().flatten().map(Value::from),
            Type::FLOAT4 => row.try_get::<_, Option<f32>>(i).ok().flatten().map(Value::from),
            Type::FLOAT8 => row.try_get::<_, Option<f64>>(i).ok().flatten().map(Value::from),
            Type::INT4_ARRAY => row.try_get::<_, Option<Vec<i32>>>(i).ok().flatten().map(Value::from),
            Type::INT8_ARRAY => row.try_get::<_, Option<Vec<i64>>>(i).ok().flatten().map(Value::from),
            Type::TEXT_ARRAY => row.try_get::<_, Option<Vec<String>>>(i).ok().flatten().map(Value::from),
            _ => row.try_get::<_, Option<String>>(i).ok().flatten().map(Value::from),
        };
        map.insert(col.name().to_string(), v.unwrap_or(Value::Null));
    }
    map
}

/// `key  value` lines, keys padded to one width; NULL shown as "-".
pub fn print_fields(fields: &Map<String, Value>) {
    let width = fields.keys().map(String::len).max().unwrap_or(0);
    for (k, v) in fields {
        let shown = match v {
            Value::Null => "-".to_string(),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        outln!("{k:<width$}  {shown}");
    }
}

/// Bytes in binary units with one decimal: `512 B`, `1.5 KiB`, `3.2 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// A rate in MB/s (10^6 bytes, as throughput is usually quoted), one decimal.
pub fn rate(bytes_per_s: f64) -> String {
    format!("{:.1} MB/s", bytes_per_s / 1e6)
}

/// A count with thin thousands separators: `1,234,567`.
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Seconds as `45s`, `3m05s`, `2h03m`.
pub fn duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "?".to_string();
    }
    if seconds < 10.0 {
        return format!("{seconds:.1}s");
    }
    let s = seconds.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// Compressed size as a ratio `raw / file` (e.g. `4.2x`), `-` when nothing was written.
pub fn ratio(raw: u64, file: u64) -> String {
    if file == 0 { "-".to_string() } else { format!("{:.2}x", raw as f64 / file as f64) }
}

/// A word for the shell: unchanged when it is made of safe characters, else in single quotes.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c)) {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_forms() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
        assert_eq!(count(1234567), "1,234,567");
        assert_eq!(count(12), "12");
        assert_eq!(count(123456), "123,456");
        assert_eq!(duration(4.31), "4.3s");
        assert_eq!(duration(185.0), "3m05s");
        assert_eq!(duration(7380.0), "2h03m");
        assert_eq!(ratio(420, 100), "4.20x");
        assert_eq!(ratio(1, 0), "-");
        assert_eq!(rate(12_345_678.0), "12.3 MB/s");
        assert_eq!(shell_quote("gen-12ab"), "gen-12ab");
        assert_eq!(shell_quote("host=/tmp port=5"), "'host=/tmp port=5'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }
}
