//! How the typed settings are written as text in `lodestar.toml`: durations
//! in the shared grammar, and the words that stand for "none" (`"off"`,
//! `"auto"`). Used through `#[serde(with = …)]`.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

use super::{format_duration, parse_duration};

/// A duration, written as `"500ms"`, `"2s"`, `"1m"`.
pub(crate) mod duration {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(*value))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        parse_duration(&text).map_err(D::Error::custom)
    }
}

/// An optional duration, `"off"` for none.
pub(crate) mod duration_or_off {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(
        value: &Option<Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        optional(value, "off", s)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        read_optional(d, "off")
    }
}

/// An optional duration, `"auto"` for the one derived from other settings.
pub(crate) mod duration_or_auto {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(
        value: &Option<Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        optional(value, "auto", s)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        read_optional(d, "auto")
    }
}

/// An optional address, `"off"` for none.
pub(crate) mod address_or_off {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(
        value: &Option<SocketAddr>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(address) => s.serialize_str(&address.to_string()),
            None => s.serialize_str("off"),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<SocketAddr>, D::Error> {
        let text = String::deserialize(d)?;
        match text.trim() {
            "off" => Ok(None),
            address => address.parse().map(Some).map_err(|_| {
                D::Error::custom(format!(
                    "{text:?} is not an address (expected ip:port, or \"off\")"
                ))
            }),
        }
    }
}

fn optional<S: Serializer>(value: &Option<Duration>, none: &str, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(duration) => s.serialize_str(&format_duration(*duration)),
        None => s.serialize_str(none),
    }
}

fn read_optional<'de, D: Deserializer<'de>>(
    d: D,
    none: &str,
) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    if text.trim() == none {
        return Ok(None);
    }
    parse_duration(&text).map(Some).map_err(D::Error::custom)
}
