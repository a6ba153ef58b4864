//! Reading a [`Config`]: a TOML document checked key by key against the
//! [table](super::keys::KEYS), then the environment over it.

use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};

use super::error::{ConfigError, Origin};
use super::keys::{self, Key, Kind};
use super::model::Config;
use crate::policy_data::PolicyError;

/// The largest configuration file read: 1 MiB.
pub const MAX_CONFIG_FILE: u64 = 1024 * 1024;
/// The longest value an environment variable may give a key: 64 KiB.
pub const MAX_ENV_VALUE: usize = 64 * 1024;

/// `OTEL_EXPORTER_OTLP_ENDPOINT`: the endpoint of every signal, from which
/// `telemetry.otlp_endpoint` is derived when nothing stronger sets it.
const OTLP_BASE_ENDPOINT: &str = crate::telemetry::settings::OTEL_EXPORTER_OTLP_ENDPOINT;

impl Config {
    /// Reads a configuration from TOML text, with no environment. Every
    /// key is checked: an unknown one is refused with the closest known
    /// key, a bad value with what was expected, both with the line and
    /// column.
    ///
    /// ```
    /// let config = lodestar::config::Config::from_toml(r#"
    ///     [service]
    ///     name = "greeter"
    ///     bind = "0.0.0.0:50051"
    /// "#)?;
    /// assert_eq!(config.service.name, "greeter");
    ///
    /// let error = lodestar::config::Config::from_toml("[service]\nbnd = \"0.0.0.0:1\"").unwrap_err();
    /// assert_eq!(
    ///     error.to_string(),
    ///     "unknown key `service.bnd` at line 2, column 1; did you mean `service.bind`?",
    /// );
    /// # Ok::<(), lodestar::config::ConfigError>(())
    /// ```
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        resolve(Some(Document::parse(text, None)?), Env::default())
    }

    /// Reads a configuration file (at most [`MAX_CONFIG_FILE`] bytes), with
    /// no environment; errors name the file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = read_file(path)?;
        resolve(Some(Document::parse(&text, Some(path))?), Env::default())
    }

    /// The file at `path`, if there is one, then the process's environment
    /// over it (see [`load_from`](Self::load_from)).
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        Self::load_from(path, std::env::vars())
    }

    /// The file at `path`, if there is one (no file: the defaults), then
    /// the variables of `env` over it: each key's `LODESTAR_<SECTION>_<KEY>`
    /// (see [`Key::env`](super::Key::env)), else its aliases
    /// (`LODESTAR_REGISTRY`, `RUST_LOG`, `OTEL_*`, ...). An empty variable
    /// counts as unset. Settings made in code on the builders come last.
    ///
    /// ```
    /// use lodestar::config::Config;
    ///
    /// let env = [("LODESTAR_SERVICE_NAME".to_owned(), "orders".to_owned())];
    /// let config = Config::load_from("does-not-exist.toml", env)?;
    /// assert_eq!(config.service.name, "orders");
    /// # Ok::<(), lodestar::config::ConfigError>(())
    /// ```
    pub fn load_from(
        path: impl AsRef<Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let env = Env::new(env);
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => resolve(None, env),
            _ => {
                let text = read_file(path)?;
                resolve(Some(Document::parse(&text, Some(path))?), env)
            }
        }
    }

    /// The defaults, then the variables of `env` over them (as
    /// [`load_from`](Self::load_from) without a file).
    pub fn from_env(env: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        resolve(None, Env::new(env))
    }

    /// Checks what no single key can: that the heartbeat interval is
    /// shorter than the TTL, and that TLS files come in pairs.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let service = &self.service;
        if let Some(heartbeat) = service.heartbeat_interval
            && heartbeat >= service.ttl
        {
            return Err(ConfigError::invalid(
                "service.heartbeat_interval",
                format!("\"{}\"", super::format_duration(heartbeat)),
                format!(
                    "an interval shorter than service.ttl (\"{}\"), or \"auto\"",
                    super::format_duration(service.ttl)
                ),
            ));
        }
        let empty = |p: &Path| p.as_os_str().is_empty();
        let pairs = [
            (
                "service.tls.cert",
                &service.tls.cert,
                "service.tls.key",
                &service.tls.key,
            ),
            (
                "client.tls.cert",
                &self.client.tls.cert,
                "client.tls.key",
                &self.client.tls.key,
            ),
        ];
        for (a, path_a, b, path_b) in pairs {
            if empty(path_a) != empty(path_b) {
                let (set, unset) = if empty(path_a) { (b, a) } else { (a, b) };
                return Err(ConfigError::invalid(
                    unset,
                    "\"\"",
                    format!("a file, since {set} is set (both or neither)"),
                ));
            }
        }
        if !empty(&service.tls.client_ca) && empty(&service.tls.cert) {
            return Err(ConfigError::invalid(
                "service.tls.cert",
                "\"\"",
                "a file, since service.tls.client_ca is set",
            ));
        }
        if self.client.tls.ca.as_os_str().is_empty() && !empty(&self.client.tls.cert) {
            return Err(ConfigError::invalid(
                "client.tls.ca",
                "\"\"",
                "a file, since client.tls.cert is set",
            ));
        }
        Ok(())
    }
}

/// Reads at most [`MAX_CONFIG_FILE`] bytes of `path`.
fn read_file(path: &Path) -> Result<String, ConfigError> {
    crate::io::read_bounded(path, MAX_CONFIG_FILE, "a configuration file").map_err(|reason| {
        ConfigError::File {
            path: path.to_owned(),
            reason,
        }
    })
}

/// The variables that may set a key, looked up by name.
#[derive(Default)]
struct Env(std::collections::HashMap<String, String>);

impl Env {
    /// Keeps the variables a key reads (and nothing else, so that the
    /// process's other variables are never held).
    fn new(vars: impl IntoIterator<Item = (String, String)>) -> Self {
        let wanted = |name: &str| {
            name == OTLP_BASE_ENDPOINT
                || keys::KEYS.iter().any(|key| {
                    key.env().is_some_and(|env| env == name) || key.aliases.contains(&name)
                })
        };
        Self(
            vars.into_iter()
                .filter(|(name, value)| !value.trim().is_empty() && wanted(name))
                .collect(),
        )
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }
}

/// A TOML document, parsed twice: into values, and with the spans of its
/// keys and values for errors.
struct Document<'a> {
    text: &'a str,
    path: Option<PathBuf>,
    values: toml::Table,
    spans: DeTable<'a>,
}

impl<'a> Document<'a> {
    fn parse(text: &'a str, path: Option<&Path>) -> Result<Self, ConfigError> {
        let path = path.map(Path::to_owned);
        let syntax = |e: toml::de::Error, path: &Option<PathBuf>| {
            let (line, column) = line_column(text, e.span().map_or(0, |s| s.start));
            ConfigError::Syntax {
                origin: Origin::File {
                    path: path.clone(),
                    line,
                    column,
                },
                message: e.message().trim_end().to_owned(),
            }
        };
        let spans = DeTable::parse(text).map_err(|e| syntax(e, &path))?;
        let values = toml::from_str::<toml::Table>(text).map_err(|e| syntax(e, &path))?;
        Ok(Self {
            text,
            path,
            values,
            spans: spans.into_inner(),
        })
    }

    /// Where the key at `path` is written (its value's position if
    /// `value`); the document's start if it cannot be found.
    fn origin(&self, path: &[&str], value: bool) -> Origin {
        let (line, column) = self.position(path, value);
        self.origin_at(line, column)
    }

    /// The line and column of the key at `path` (or of its value).
    fn position(&self, path: &[&str], value: bool) -> (usize, usize) {
        line_column(self.text, find_span(&self.spans, path, value).start)
    }

    fn origin_at(&self, line: usize, column: usize) -> Origin {
        Origin::File {
            path: self.path.clone(),
            line,
            column,
        }
    }

    /// Checks every key of the document against the table.
    fn check(&self) -> Result<(), ConfigError> {
        self.check_table(&self.values, &mut Vec::new())
    }

    fn check_table<'t>(
        &self,
        table: &'t toml::Table,
        at: &mut Vec<&'t str>,
    ) -> Result<(), ConfigError> {
        for (name, value) in table {
            at.push(name);
            let path = at.join(".");
            if let Some(key) = keys::key(&path) {
                check_value(key, value).map_err(|error| match error {
                    ValueError::Invalid(expected) => ConfigError::Invalid {
                        key: path.clone(),
                        value: shown(value),
                        expected,
                        origin: Some(self.origin(at, true)),
                    },
                    ValueError::Policy(error) => ConfigError::Policy {
                        key: key.path,
                        origin: Some(self.origin(at, false)),
                        error: Box::new(error),
                    },
                })?;
            } else if keys::is_section(&path) {
                match value {
                    toml::Value::Table(inner) => self.check_table(inner, at)?,
                    other => {
                        return Err(ConfigError::Invalid {
                            key: path.clone(),
                            value: shown(other),
                            expected: format!("a table (the section [{path}])"),
                            origin: Some(self.origin(at, true)),
                        });
                    }
                }
            } else {
                // An unknown section: name its first key, which is what
                // was most likely meant (`[servce]` + `bind`: `servce.bind`).
                let unknown = at.len();
                let mut value = value;
                while let toml::Value::Table(inner) = value
                    && let Some((name, inner_value)) = inner.iter().next()
                {
                    at.push(name);
                    value = inner_value;
                }
                let key = at.join(".");
                // The leaf's line; the start of a dotted key on it
                // (`servce.bind = …`: where `servce` is).
                let head = self.position(&at[..unknown], false);
                let leaf = self.position(at, false);
                let (line, column) = if head.0 == leaf.0 { head } else { leaf };
                return Err(ConfigError::UnknownKey {
                    suggestion: keys::closest(&key),
                    origin: self.origin_at(line, column),
                    key,
                });
            }
            at.pop();
        }
        Ok(())
    }
}

/// Why a value was refused.
enum ValueError {
    /// What was expected.
    Invalid(String),
    /// The policy's own error.
    Policy(PolicyError),
}

/// Checks a value against its key's kind, and a policy table against the
/// policy's rules.
fn check_value(key: &Key, value: &toml::Value) -> Result<(), ValueError> {
    key.kind.check(value).map_err(ValueError::Invalid)?;
    if key.kind == Kind::Policy {
        match key.path {
            "client.policy" => {
                policy::<crate::client::Policy>(value)?
                    .validate()
                    .map_err(ValueError::Policy)?;
            }
            _ => {
                policy::<crate::server::policy::Policy>(value)?
                    .validate()
                    .map_err(ValueError::Policy)?;
            }
        }
    }
    Ok(())
}

/// Reads a policy table, naming the policy's field in the error.
fn policy<T: serde::de::DeserializeOwned>(value: &toml::Value) -> Result<T, ValueError> {
    serde_path_to_error::deserialize(value.clone()).map_err(|e| {
        ValueError::Policy(PolicyError::Parse {
            format: "TOML",
            field: e.path().to_string(),
            line: 0,
            column: 0,
            message: e.inner().message().trim_end().to_owned(),
        })
    })
}

/// The file's values, checked, then the environment's, into a [`Config`].
fn resolve(document: Option<Document<'_>>, env: Env) -> Result<Config, ConfigError> {
    let mut table = match document {
        Some(document) => {
            document.check()?;
            document.values
        }
        None => toml::Table::new(),
    };
    for key in keys::KEYS {
        let Some(name) = key.env() else { continue };
        let found = std::iter::once(name.as_str())
            .chain(key.aliases.iter().copied())
            .find_map(|variable| env.get(variable).map(|value| (variable, value)));
        let Some((variable, text)) = found else {
            continue;
        };
        let origin = Some(Origin::Env {
            variable: variable.to_owned(),
        });
        if text.len() > MAX_ENV_VALUE {
            return Err(ConfigError::Invalid {
                key: key.path.to_owned(),
                value: format!("{} bytes long", text.len()),
                expected: format!("at most {MAX_ENV_VALUE} bytes"),
                origin,
            });
        }
        let value = key
            .kind
            .parse_env(text)
            .map_err(|expected| ConfigError::Invalid {
                key: key.path.to_owned(),
                value: format!("{text:?}"),
                expected,
                origin,
            })?;
        insert(&mut table, key.path, value);
    }
    // Set by a variable of the key itself, which wins over the base.
    let endpoint_set = [
        "LODESTAR_TELEMETRY_OTLP_ENDPOINT",
        crate::telemetry::settings::OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
    ]
    .iter()
    .any(|name| env.get(name).is_some());
    if let Some(base) = env.get(OTLP_BASE_ENDPOINT)
        && !endpoint_set
    {
        let protocol = match lookup(&table, "telemetry.otlp_protocol") {
            Some(toml::Value::String(p)) if p == "grpc" => crate::telemetry::Protocol::Grpc,
            _ => crate::telemetry::Protocol::HttpProtobuf,
        };
        let endpoint = crate::telemetry::settings::signal_endpoint(base.trim(), protocol);
        insert(
            &mut table,
            "telemetry.otlp_endpoint",
            toml::Value::String(endpoint),
        );
    }
    let config: Config =
        serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            ConfigError::invalid(
                e.path().to_string(),
                "the value given",
                e.inner().message().trim_end(),
            )
        })?;
    config.validate()?;
    Ok(config)
}

/// Sets the value at a dotted path, making the tables on the way.
fn insert(table: &mut toml::Table, path: &str, value: toml::Value) {
    let mut table = table;
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            table.insert(part.to_owned(), value);
            return;
        }
        let entry = table
            .entry(part.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        let toml::Value::Table(inner) = entry else {
            return;
        };
        table = inner;
    }
}

/// The value at a dotted path, if set.
fn lookup<'t>(table: &'t toml::Table, path: &str) -> Option<&'t toml::Value> {
    let (section, name) = path.rsplit_once('.').unwrap_or(("", path));
    let mut table = table;
    for part in section.split('.').filter(|p| !p.is_empty()) {
        table = table.get(part)?.as_table()?;
    }
    table.get(name)
}

/// A value as written in TOML (strings quoted), shortened.
fn shown(value: &toml::Value) -> String {
    let text = match value {
        toml::Value::Table(_) => "a table".to_owned(),
        toml::Value::Array(_) => "an array".to_owned(),
        other => other.to_string(),
    };
    if text.len() > 80 {
        let cut: String = text.chars().take(77).collect();
        format!("{cut}...")
    } else {
        text
    }
}

/// The span of the key at `path` (or of its value).
fn find_span(table: &DeTable<'_>, path: &[&str], value: bool) -> Range<usize> {
    let mut table = table;
    let mut found = 0..0;
    for (i, part) in path.iter().enumerate() {
        let Some((key, entry)) = table.get_key_value(*part) else {
            break;
        };
        found = if value && i + 1 == path.len() {
            entry.span()
        } else {
            key.span()
        };
        match entry.get_ref() {
            DeValue::Table(inner) => table = inner,
            _ => break,
        }
    }
    found
}

/// The line and column (from 1, in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before, |n| &before[n + 1..])
        .chars()
        .count()
        + 1;
    (line, column)
}
