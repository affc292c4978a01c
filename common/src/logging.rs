//! How the controller and the agent write their logs (to stderr): `text`,
//! tracing's usual lines for a person at a terminal, or `json`, one JSON
//! object a line for a log shipper. Both binaries set up tracing here, so
//! their lines have the same shape.
//!
//! A JSON line holds `timestamp` (RFC 3339, UTC), `level`, `target` (the
//! module), `message`, then the fields of every span the event is in
//! (outermost first, an inner span's field replacing an outer one's of the
//! same name), then the event's own fields, all at the top level; `span`
//! names the innermost span. So `request_id`, `job_id`, `repo`, `agent_id`
//! and `agent` are on every line logged where they are known, without a
//! nested object to look into.

use std::fmt;
use std::io::IsTerminal as _;
use std::str::FromStr;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime as _, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// The log's format: `--log-format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Lines for a person; coloured when stderr is a terminal.
    #[default]
    Text,
    /// One JSON object a line.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<LogFormat, String> {
        match text {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("{other:?} is not a log format (text or json)")),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// Sets the process's tracing subscriber: events `filter` lets through, to
/// stderr, in `format`. Does nothing when one is set already (a test that
/// runs several components in one process).
pub fn init(format: LogFormat, filter: EnvFilter) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .with_ansi(false)
            .fmt_fields(JsonFields::new())
            .event_format(JsonLines)
            .try_init(),
    };
}

/// Keys every JSON line starts with, in this order; a field of the same
/// name from a span or an event does not replace them.
const FIXED_KEYS: [&str; 4] = ["timestamp", "level", "target", "message"];

/// The JSON line format described in the module's comment. Span fields come
/// from [`JsonFields`], which keeps each span's fields as a JSON object.
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        context: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        let mut fields = Map::new();
        let mut innermost = None;
        if let Some(scope) = context.event_scope() {
            for span in scope.from_root() {
                let extensions = span.extensions();
                if let Some(formatted) = extensions.get::<FormattedFields<N>>()
                    && let Ok(Value::Object(span_fields)) =
                        serde_json::from_str::<Value>(formatted.as_str())
                {
                    fields.extend(span_fields);
                }
                innermost = Some(span.name());
            }
        }
        let mut visitor = EventFields {
            fields: &mut fields,
            target: None,
        };
        event.record(&mut visitor);
        let target = visitor
            .target
            .take()
            .unwrap_or_else(|| event.metadata().target().to_owned());
        let message = fields.remove("message").unwrap_or(Value::Null);

        let fixed = [
            Value::from(timestamp),
            Value::from(event.metadata().level().as_str()),
            Value::from(target),
            message,
        ];
        if let Some(name) = innermost {
            fields.entry("span").or_insert_with(|| name.into());
        }
        let mut text = String::from("{");
        let rest = fields
            .iter()
            .map(|(key, value)| (key.as_str(), value))
            .filter(|(key, _)| !FIXED_KEYS.contains(key));
        let first = FIXED_KEYS.iter().copied().zip(&fixed);
        for (index, (key, value)) in first.chain(rest).enumerate() {
            if index > 0 {
                text.push(',');
            }
            text.push_str(&serde_json::to_string(key).map_err(|_| fmt::Error)?);
            text.push(':');
            text.push_str(&serde_json::to_string(value).map_err(|_| fmt::Error)?);
        }
        text.push('}');
        writeln!(writer, "{text}")
    }
}

/// An event's fields as JSON values. Events bridged from the `log` crate
/// carry their origin as `log.*` fields: `log.target` becomes the target,
/// the others are dropped.
struct EventFields<'a> {
    fields: &'a mut Map<String, Value>,
    target: Option<String>,
}

impl EventFields<'_> {
    fn insert(&mut self, field: &Field, value: Value) {
        let name = field.name();
        if name == "log.target" {
            if let Value::String(target) = value {
                self.target = Some(target);
            }
        } else if !name.starts_with("log.") {
            self.fields.insert(name.to_owned(), value);
        }
    }
}

impl Visit for EventFields<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.insert(field, value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.insert(field, value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.insert(field, value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.insert(field, value.into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.insert(field, value.into());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.insert(field, value.to_string().into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.insert(field, format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| io::ErrorKind::Other)?
                .extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;

        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    #[test]
    fn json_lines_flatten_span_fields_under_the_fixed_keys() {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(captured.clone())
            .with_ansi(false)
            .fmt_fields(JsonFields::new())
            .event_format(JsonLines)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let outer = tracing::info_span!("agent_session", agent = "builder-1", job_id = 1);
            let _outer = outer.enter();
            let inner = tracing::info_span!("job", job_id = 7, repo = "acme/app");
            let _inner = inner.enter();
            tracing::warn!(exit_code = 2, ok = false, detail = %"a \"quoted\"\nline", "job \"failed\"");
        });
        let bytes = captured.0.lock().unwrap().clone();
        let text = String::from_utf8(bytes).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        let line: Value = serde_json::from_str(text.trim_end()).unwrap();
        assert!(text.starts_with(r#"{"timestamp":""#), "{text}");
        let level_at = text.find(r#","level":"#).unwrap();
        let target_at = text.find(r#","target":"#).unwrap();
        let message_at = text.find(r#","message":"#).unwrap();
        assert!(level_at < target_at && target_at < message_at, "{text}");
        assert_eq!(line["level"], "WARN");
        assert_eq!(line["target"], module_path!());
        assert_eq!(line["message"], "job \"failed\"");
        assert_eq!(line["agent"], "builder-1");
        assert_eq!(line["job_id"], 7, "the inner span's field wins");
        assert_eq!(line["repo"], "acme/app");
        assert_eq!(line["span"], "job");
        assert_eq!(line["exit_code"], 2);
        assert_eq!(line["ok"], false);
        assert_eq!(line["detail"], "a \"quoted\"\nline");
        assert!(line["timestamp"].as_str().unwrap().ends_with('Z'), "{text}");
    }

    #[test]
    fn formats_parse_by_name() {
        assert_eq!("json".parse(), Ok(LogFormat::Json));
        assert_eq!("text".parse(), Ok(LogFormat::Text));
        assert!("JSON".parse::<LogFormat>().is_err());
        assert_eq!(LogFormat::Json.to_string(), "json");
    }
}
