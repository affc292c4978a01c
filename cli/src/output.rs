//! What `hobot` prints: aligned tables and `key: value` blocks for people,
//! the API's JSON for scripts.

use std::fmt::Write as _;

use chrono::{DateTime, Local, Utc};
use serde_json::Value;

/// Prints the API's JSON, pretty, on stdout.
pub fn print_json(value: &Value) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(_) => println!("{value}"),
    }
}

/// A table whose columns are padded to their widest cell (the last column is
/// not padded, so lines carry no trailing spaces).
pub struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: Vec<&'static str>) -> Table {
        Table {
            header,
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let columns = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.header.iter().map(|h| (*h).to_owned()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate().take(columns) {
                if i + 1 == columns {
                    line.push_str(cell);
                } else {
                    let _ = write!(line, "{cell:<width$}  ", width = widths[i]);
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    pub fn print(&self) {
        print!("{}", self.render());
    }
}

/// `key: value` lines with the values aligned.
pub fn print_fields(fields: &[(&str, String)]) {
    let width = fields
        .iter()
        .map(|(key, _)| key.len() + 1)
        .max()
        .unwrap_or(0);
    for (key, value) in fields {
        let label = format!("{key}:");
        println!("{label:<width$} {value}");
    }
}

/// A timestamp from the API in local time, `-` when absent.
pub fn time(value: Option<&str>) -> String {
    match value.map(DateTime::parse_from_rfc3339) {
        Some(Ok(time)) => time
            .with_timezone(&Local)
            .format("%Y-%m-%d %H:%M:%S")
            .to_string(),
        Some(Err(_)) => value.unwrap_or("-").to_owned(),
        None => "-".to_owned(),
    }
}

/// How long between two API timestamps (or until now), e.g. `1m05s`.
pub fn duration(start: Option<&str>, end: Option<&str>) -> String {
    let parse = |value: &str| DateTime::parse_from_rfc3339(value).map(|t| t.with_timezone(&Utc));
    let Some(Ok(start)) = start.map(parse) else {
        return "-".to_owned();
    };
    let end = match end.map(parse) {
        Some(Ok(end)) => end,
        _ => Utc::now(),
    };
    let seconds = (end - start).num_seconds().max(0);
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m{:02}s", seconds / 60, seconds % 60),
        _ => format!("{}h{:02}m", seconds / 3600, seconds % 3600 / 60),
    }
}

/// An optional value, `-` when absent.
pub fn or_dash(value: Option<impl ToString>) -> String {
    value.map_or_else(|| "-".to_owned(), |value| value.to_string())
}

/// The first 12 characters of a commit sha.
pub fn short_sha(sha: &str) -> String {
    sha.chars().take(12).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let mut table = Table::new(vec!["ID", "STATE", "TARGET"]);
        table.row(vec!["1".into(), "succeeded".into(), "test".into()]);
        table.row(vec!["12".into(), "queued".into(), "".into()]);
        assert_eq!(
            table.render(),
            "ID  STATE      TARGET\n1   succeeded  test\n12  queued\n"
        );
    }

    #[test]
    fn durations() {
        let start = Some("2026-01-01T00:00:00Z");
        assert_eq!(duration(start, Some("2026-01-01T00:00:09Z")), "9s");
        assert_eq!(duration(start, Some("2026-01-01T00:01:05Z")), "1m05s");
        assert_eq!(duration(start, Some("2026-01-01T02:03:00Z")), "2h03m");
        assert_eq!(duration(None, None), "-");
    }
}
