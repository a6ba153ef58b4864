//! JSON in and out of a call.
//!
//! **In**: zero or more JSON values, separated by whitespace or nothing
//! (`{"a":1}{"a":2}` is two), from `-d JSON`, `-d @file` or `-d @-`
//! (stdin). They are read one at a time, as they arrive: an object is
//! complete at its closing brace, so a stream's message goes out before
//! the next one is typed. A value's bytes are bounded (a longer one is
//! refused, not read); a value that is not JSON is reported with its line
//! and column; one that does not fit the request's type, with the path of
//! the field (`location.latitude`).
//!
//! **Out**: one JSON document per reply, as it arrives; pretty on a
//! terminal, one per line otherwise.

use std::io::{self, IsTerminal as _, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use prost_reflect::{
    DeserializeOptions, DynamicMessage, MessageDescriptor, ReflectMessage as _, SerializeOptions,
};
use serde_json::Value;

use super::{Failure, FailureKind};

/// Where the request messages come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Input {
    /// No `-d`.
    Absent,
    /// `-d JSON`.
    Inline(String),
    /// `-d @file`.
    File(PathBuf),
    /// `-d @-`.
    Stdin,
}

impl Input {
    /// Reads the value of `-d`.
    pub(crate) fn from_flag(value: Option<&str>) -> Self {
        match value {
            None => Input::Absent,
            Some("@-") => Input::Stdin,
            Some(text) => match text.strip_prefix('@') {
                Some(path) => Input::File(PathBuf::from(path)),
                None => Input::Inline(text.to_owned()),
            },
        }
    }

    /// Where the values come from, for messages.
    fn name(&self) -> String {
        match self {
            Input::Absent => "no input".to_owned(),
            Input::Inline(_) => "-d".to_owned(),
            Input::File(path) => path.display().to_string(),
            Input::Stdin => "stdin".to_owned(),
        }
    }

    /// A reader of its values, each at most `max_value` bytes; `None` for
    /// [`Input::Absent`].
    pub(crate) fn open(&self, max_value: usize) -> Result<Option<Values>, Failure> {
        let source: Box<dyn Read + Send> = match self {
            Input::Absent => return Ok(None),
            Input::Inline(text) => Box::new(io::Cursor::new(text.clone().into_bytes())),
            Input::File(path) => Box::new(std::fs::File::open(path).map_err(|e| {
                Failure::new(FailureKind::Input, format!("-d @{}: {e}", path.display()))
            })?),
            Input::Stdin => Box::new(io::stdin()),
        };
        Ok(Some(Values::new(self.name(), source, max_value)))
    }
}

/// A reader that refuses to read past a moving limit: the end of the
/// current value's allowance.
struct Bounded<R> {
    inner: R,
    read: u64,
    limit: Arc<AtomicU64>,
    exceeded: Arc<AtomicBool>,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let allowed = self.limit.load(Ordering::Relaxed).saturating_sub(self.read);
        if allowed == 0 {
            self.exceeded.store(true, Ordering::Relaxed);
            return Err(io::Error::other("value too large"));
        }
        let len = buf
            .len()
            .min(usize::try_from(allowed).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..len])?;
        self.read += n as u64;
        Ok(n)
    }
}

type Stream = serde_json::StreamDeserializer<
    'static,
    serde_json::de::IoRead<Bounded<io::BufReader<Box<dyn Read + Send>>>>,
    Value,
>;

/// The JSON values of an [`Input`], read one at a time.
pub(crate) struct Values {
    name: String,
    stream: Stream,
    limit: Arc<AtomicU64>,
    exceeded: Arc<AtomicBool>,
    max_value: usize,
    /// How many values were read.
    count: usize,
}

impl std::fmt::Debug for Values {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Values")
            .field("name", &self.name)
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

impl Values {
    fn new(name: String, source: Box<dyn Read + Send>, max_value: usize) -> Self {
        let limit = Arc::new(AtomicU64::new(max_value as u64));
        let exceeded = Arc::new(AtomicBool::new(false));
        let bounded = Bounded {
            inner: io::BufReader::new(source),
            read: 0,
            limit: limit.clone(),
            exceeded: exceeded.clone(),
        };
        Self {
            name,
            stream: serde_json::Deserializer::from_reader(bounded).into_iter(),
            limit,
            exceeded,
            max_value,
            count: 0,
        }
    }

    /// The next value, `None` at the end of the input.
    pub(crate) fn next_value(&mut self) -> Result<Option<Value>, Failure> {
        match self.stream.next() {
            None => Ok(None),
            Some(Ok(value)) => {
                self.count += 1;
                // The next value (and the space before it) gets a fresh allowance.
                let offset = self.stream.byte_offset() as u64;
                self.limit.store(
                    offset.saturating_add(self.max_value as u64),
                    Ordering::Relaxed,
                );
                Ok(Some(value))
            }
            Some(Err(_)) if self.exceeded.load(Ordering::Relaxed) => Err(Failure::new(
                FailureKind::Input,
                format!(
                    "{}: value {} is larger than {} bytes (the message size limit, \
                     --max-message-size); not read further",
                    self.name,
                    self.count + 1,
                    self.max_value
                ),
            )),
            Some(Err(e)) if e.is_io() => Err(Failure::new(
                FailureKind::Input,
                format!("{}: cannot read: {e}", self.name),
            )),
            Some(Err(e)) => {
                let text = e.to_string();
                let description = text
                    .rfind(" at line ")
                    .map_or(text.as_str(), |at| &text[..at]);
                Err(Failure::new(
                    FailureKind::Input,
                    format!(
                        "invalid JSON in {} at line {}, column {}: {description}",
                        self.name,
                        e.line(),
                        e.column()
                    ),
                ))
            }
        }
    }

    /// How many values were read so far.
    pub(crate) fn count(&self) -> usize {
        self.count
    }

    /// Where the values come from, for messages.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }
}

/// Turns JSON values into messages of one type.
#[derive(Debug, Clone)]
pub(crate) struct ToMessage {
    descriptor: MessageDescriptor,
    options: DeserializeOptions,
}

impl ToMessage {
    /// Values into `descriptor`'s messages; unknown fields refused unless
    /// `allow_unknown_fields`.
    pub(crate) fn new(descriptor: MessageDescriptor, allow_unknown_fields: bool) -> Self {
        Self {
            descriptor,
            options: DeserializeOptions::new().deny_unknown_fields(!allow_unknown_fields),
        }
    }

    /// `value` (the `index`th, from 1, of `source`) as a message; the error
    /// names the field that does not fit.
    pub(crate) fn convert(
        &self,
        value: Value,
        index: usize,
        source: &str,
    ) -> Result<DynamicMessage, Failure> {
        let mut track = serde_path_to_error::Track::new();
        let deserializer = serde_path_to_error::Deserializer::new(value, &mut track);
        DynamicMessage::deserialize_with_options(
            self.descriptor.clone(),
            deserializer,
            &self.options,
        )
        .map_err(|e| {
            let path = track.path().to_string();
            let place = if path.is_empty() || path == "." {
                String::new()
            } else {
                format!(" field `{path}`:")
            };
            Failure::new(
                FailureKind::Input,
                format!(
                    "value {index} of {source} is not a {}:{place} {e}",
                    self.descriptor.full_name()
                ),
            )
        })
    }
}

/// How replies are printed.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OutputFormat {
    /// One compact document per line (as jsonl).
    Json,
    /// One compact document per line (JSON Lines).
    Jsonl,
    /// Indented documents, for people.
    Pretty,
}

impl OutputFormat {
    /// `chosen`, else pretty on a terminal and one per line otherwise.
    pub(crate) fn or_default(chosen: Option<Self>) -> Self {
        chosen.unwrap_or(if io::stdout().is_terminal() {
            OutputFormat::Pretty
        } else {
            OutputFormat::Jsonl
        })
    }
}

/// Writes messages as JSON documents, each flushed at once.
#[derive(Debug)]
pub(crate) struct Printer<W> {
    out: W,
    format: OutputFormat,
    options: SerializeOptions,
}

impl<W: Write> Printer<W> {
    /// A printer to `out`; fields at their defaults are written only with
    /// `emit_defaults`.
    pub(crate) fn new(out: W, format: OutputFormat, emit_defaults: bool) -> Self {
        Self {
            out,
            format,
            options: SerializeOptions::new().skip_default_fields(!emit_defaults),
        }
    }

    /// Writes `message` as one document and flushes.
    pub(crate) fn print(&mut self, message: &DynamicMessage) -> Result<(), Failure> {
        let result = match self.format {
            OutputFormat::Pretty => {
                let formatter = serde_json::ser::PrettyFormatter::with_indent(b"  ");
                let mut serializer =
                    serde_json::Serializer::with_formatter(&mut self.out, formatter);
                message.serialize_with_options(&mut serializer, &self.options)
            }
            OutputFormat::Json | OutputFormat::Jsonl => {
                let mut serializer = serde_json::Serializer::new(&mut self.out);
                message.serialize_with_options(&mut serializer, &self.options)
            }
        };
        result.map_err(|e| {
            Failure::new(
                FailureKind::Output,
                format!(
                    "a {} reply cannot be written as JSON: {e}",
                    message.descriptor().full_name()
                ),
            )
        })?;
        self.out
            .write_all(b"\n")
            .and_then(|()| self.out.flush())
            .map_err(|e| Failure::new(FailureKind::Output, format!("writing a reply: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(text: &str, max: usize) -> Values {
        Values::new(
            "-d".into(),
            Box::new(io::Cursor::new(text.as_bytes().to_vec())),
            max,
        )
    }

    fn all(text: &str, max: usize) -> Result<Vec<Value>, Failure> {
        let mut reader = values(text, max);
        let mut out = Vec::new();
        while let Some(value) = reader.next_value()? {
            out.push(value);
        }
        Ok(out)
    }

    #[test]
    fn values_are_separated_by_whitespace_or_nothing() {
        let got = all("{\"a\":1}\n {\"a\":2}{\"a\":3}\n", 100).unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(got[2]["a"], 3);
        assert!(all("  \n", 100).unwrap().is_empty());
    }

    #[test]
    fn invalid_json_names_line_and_column() {
        let error = all("{\"a\":1}\n{\"a\": tru}", 100).unwrap_err();
        assert_eq!(error.kind, FailureKind::Input);
        assert!(
            error.message.contains("line 2, column"),
            "{}",
            error.message
        );
        assert!(
            error.message.starts_with("invalid JSON in -d"),
            "{}",
            error.message
        );
    }

    #[test]
    fn each_value_is_bounded_not_the_whole_input() {
        let small = "{\"a\":\"0123456789\"}";
        // Many small values pass a limit far below their total size.
        let many = small.repeat(50);
        assert_eq!(all(&many, small.len() + 1).unwrap().len(), 50);
        let error = all(&format!("{small}{{\"a\":\"{}\"}}", "x".repeat(200)), 64).unwrap_err();
        assert!(
            error.message.contains("value 2 is larger than 64 bytes"),
            "{}",
            error.message
        );
    }

    #[test]
    fn the_flag_names_a_source() {
        assert_eq!(Input::from_flag(None), Input::Absent);
        assert_eq!(Input::from_flag(Some("@-")), Input::Stdin);
        assert_eq!(
            Input::from_flag(Some("@a.json")),
            Input::File("a.json".into())
        );
        assert_eq!(Input::from_flag(Some("{}")), Input::Inline("{}".into()));
    }
}
