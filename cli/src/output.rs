//! What `hobot` prints: aligned tables and `key: value` blocks for people,
//! the API's JSON for scripts.

use std::borrow::Cow;
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

    /// The table as text. Cells are data from the controller: control
    /// and bidi-override characters in them are shown escaped
    /// ([`printable`]), so a cell can neither move the cursor nor reorder
    /// the line; columns are padded by hand, so a cell of any width fits.
    pub fn render(&self) -> String {
        let columns = self.header.len();
        let header: Vec<String> = self.header.iter().map(|h| (*h).to_owned()).collect();
        let rows: Vec<Vec<String>> = std::iter::once(&header)
            .chain(&self.rows)
            .map(|row| {
                row.iter()
                    .take(columns)
                    .map(|cell| printable(cell).into_owned())
                    .collect()
            })
            .collect();
        let mut widths = vec![0usize; columns];
        for row in &rows {
            for (i, cell) in row.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in &rows {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                line.push_str(cell);
                if i + 1 < columns {
                    let padding = widths[i] - cell.chars().count() + 2;
                    line.extend(std::iter::repeat_n(' ', padding));
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
        println!("{label:<width$} {}", printable(value));
    }
}

/// Whether `c` must not reach the terminal as it is: C0 controls (newline
/// and tab included), DEL, C1 controls and the bidi embedding, override
/// and isolate characters (which reorder what follows them on the line).
pub fn is_unprintable(c: char) -> bool {
    matches!(c, '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{9f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` with every [`is_unprintable`] character written as its Rust
/// escape (`\u{1b}` for ESC), so that data from the controller (an
/// agent's version, a job's message) prints as text and never controls
/// the terminal.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_unprintable) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_unprintable(c) {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
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

    /// A 3 MB agent version made `hobot agents ls` panic ("Formatting
    /// argument out of range": the padding width was over u16::MAX).
    #[test]
    fn a_huge_cell_is_padded_without_panicking() {
        let huge = "v".repeat(3 * 1024 * 1024);
        let mut table = Table::new(vec!["NAME", "VERSION", "STATE"]);
        table.row(vec!["a".into(), huge.clone(), "ok".into()]);
        table.row(vec!["b".into(), "1.0".into(), "ok".into()]);
        let rendered = table.render();
        let lines: Vec<&str> = rendered.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[1], format!("a     {huge}  ok"));
        assert_eq!(lines[2].len(), lines[1].len(), "columns stay aligned");
        assert!(lines[2].starts_with("b     1.0 "));
        assert!(lines[2].ends_with("  ok"));
    }

    /// A cell holding ESC (a title change, a screen clear), a newline or a
    /// bidi override prints escaped and keeps its row on one line.
    #[test]
    fn control_characters_in_cells_are_escaped() {
        let mut table = Table::new(vec!["NAME", "VERSION"]);
        table.row(vec![
            "a".into(),
            "\u{1b}]0;pwned\u{7}\u{1b}[2J\nx\u{202e}y\u{85}".into(),
        ]);
        let rendered = table.render();
        assert_eq!(
            rendered,
            "NAME  VERSION\na     \\u{1b}]0;pwned\\u{7}\\u{1b}[2J\\u{a}x\\u{202e}y\\u{85}\n"
        );
        assert!(!rendered.contains('\u{1b}'));
        // Ordinary text, accents and emoji included, is left alone.
        assert_eq!(printable("héllo wörld 🐙"), "héllo wörld 🐙");
        // The padding counts the escaped width.
        let mut table = Table::new(vec!["A", "B"]);
        table.row(vec!["\u{1b}".into(), "x".into()]);
        table.row(vec!["abcdefg".into(), "y".into()]);
        assert_eq!(table.render(), "A        B\n\\u{1b}   x\nabcdefg  y\n");
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
