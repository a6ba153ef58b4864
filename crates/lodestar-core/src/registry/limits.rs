//! What a registry accepts: the characters and lengths of names, the size
//! of an instance, the range of lease TTLs.
//!
//! Every backend checks registrations with the same [`Limits`] (the
//! in-memory registry, the `lodestar registry` server, etcd), so that a
//! registration one accepts another does not refuse, and so that no
//! registration can cost a registry more than a known amount of memory or
//! make a service's instance list too large to send.
//!
//! | what | allowed |
//! |---|---|
//! | namespace, group, service | 1–[`MAX_NAME`] bytes of `A–Z a–z 0–9 . _ - :`, not `.` or `..` |
//! | instance id | 1–[`MAX_ID`] bytes of those and `@ [ ] + = ~`, not `.` or `..` |
//! | address | `host:port`: a DNS name, an IPv4 address or a bracketed IPv6 address, and a port (0 to 65535); at most [`MAX_ADDRESS`] bytes |
//! | version | at most [`MAX_VERSION`] bytes of printable ASCII without spaces |
//! | protocol | at most [`MAX_PROTOCOL`] bytes of `a–z 0–9 . + -` |
//! | zone | at most [`MAX_NAME`] bytes of name characters |
//! | metadata | see [`Limits::max_labels`], [`Limits::max_label_key`], [`Limits::max_label_value`], [`Limits::max_metadata`]; keys and values are any text without control or bidirectional-override characters, keys not empty |
//! | weight | at most [`MAX_WEIGHT`] |
//! | lease TTL | from [`Limits::min_ttl`] to [`Limits::max_ttl`] |
//!
//! Why these characters: names and ids travel in HTTP paths, etcd keys
//! (where `/` separates levels), log lines and terminals. Nothing that can
//! split a path, forge a log line or move a terminal's cursor gets in.

use std::time::Duration;

use super::RegistryError;
use crate::Instance;

/// The longest namespace, group, service or zone name, in bytes.
pub const MAX_NAME: usize = 128;
/// The longest instance id, in bytes (room for the default id,
/// `{service}-{address}`).
pub const MAX_ID: usize = 400;
/// The longest address (`host:port`), in bytes: a DNS name of 253 bytes,
/// a colon and a port.
pub const MAX_ADDRESS: usize = 260;
/// The longest version, in bytes.
pub const MAX_VERSION: usize = 128;
/// The longest protocol, in bytes.
pub const MAX_PROTOCOL: usize = 32;
/// The largest weight (as Nacos: 0 to 10,000).
pub const MAX_WEIGHT: u32 = 10_000;

/// The limits a registry holds registrations to. Every field has a
/// documented default; [`Limits::default`] is what every backend uses
/// unless configured otherwise.
///
/// ```
/// use std::time::Duration;
/// use lodestar_core::{Instance, registry::Limits};
///
/// let limits = Limits::default();
/// let instance = Instance::new("orders", "10.0.0.7:8080").with_label("canary", "true");
/// assert!(limits.check(&instance, Duration::from_secs(6)).is_ok());
///
/// let forged = Instance::new("orders\nlevel=ERROR", "10.0.0.7:8080");
/// let error = limits.check(&forged, Duration::from_secs(6)).unwrap_err();
/// assert!(error.to_string().contains("service"));
/// assert!(limits.check(&instance, Duration::from_millis(1)).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The most metadata labels an instance may have. Default: 64.
    pub max_labels: usize,
    /// The longest label key, in bytes. Default: 128.
    pub max_label_key: usize,
    /// The longest label value, in bytes. Default: 4096.
    pub max_label_value: usize,
    /// The most bytes of metadata (keys and values together) an instance
    /// may have. Default: 16 KiB.
    pub max_metadata: usize,
    /// The shortest lease TTL. Default: 500 ms. A shorter lease cannot be
    /// kept alive reliably (its heartbeats would be due every third of it)
    /// and would only churn the registry.
    pub min_ttl: Duration,
    /// The longest lease TTL. Default: 1 hour. An instance that dies is
    /// noticed only when its lease runs out.
    pub max_ttl: Duration,
    /// The most bytes the instances of one service may add up to (as
    /// [`instance_size`] counts them). Default: 3 MiB, so that a service's
    /// whole instance list fits in one message under the default 4 MiB
    /// message limit of every gRPC peer: a registration past it is
    /// refused, rather than leave the service impossible to look up.
    pub max_service_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_labels: 64,
            max_label_key: 128,
            max_label_value: 4096,
            max_metadata: 16 * 1024,
            min_ttl: Duration::from_millis(500),
            max_ttl: Duration::from_secs(60 * 60),
            max_service_bytes: 3 * 1024 * 1024,
        }
    }
}

/// How many bytes an instance costs in a lookup or a watch snapshot: its
/// text (the service key included, which the wire repeats per instance)
/// and a fixed allowance for framing and numbers. An upper bound on its
/// protobuf encoding.
pub fn instance_size(instance: &Instance) -> usize {
    const FRAMING: usize = 64;
    let labels: usize = instance
        .metadata
        .iter()
        .map(|(k, v)| k.len() + v.len() + 8)
        .sum();
    FRAMING
        + instance.id.len()
        + instance.key.namespace.len()
        + instance.key.group.len()
        + instance.key.service.len()
        + instance.version.len()
        + instance.address.len()
        + instance.protocol.len()
        + instance.zone.len()
        + labels
}

impl Limits {
    /// Checks a registration with a lease of `ttl`; the error names the
    /// instance, the field, the value (quoted safely) and what was expected.
    pub fn check(&self, instance: &Instance, ttl: Duration) -> Result<(), RegistryError> {
        self.check_instance(instance)?;
        if ttl < self.min_ttl || ttl > self.max_ttl {
            return Err(invalid(
                instance,
                format!(
                    "the lease TTL is {ttl:?}; expected {:?} to {:?}",
                    self.min_ttl, self.max_ttl
                ),
            ));
        }
        Ok(())
    }

    /// Checks everything about an instance but a lease: names, id,
    /// address, version, protocol, zone, weight and metadata.
    pub fn check_instance(&self, instance: &Instance) -> Result<(), RegistryError> {
        service_key(&instance.key)
            .and_then(|()| check_name("id", &instance.id, MAX_ID, is_id_char))
            .and_then(|()| check_address(&instance.address))
            .and_then(|()| {
                check_text("version", &instance.version, MAX_VERSION, |c| {
                    c.is_ascii_graphic()
                })
            })
            .and_then(|()| {
                check_text("protocol", &instance.protocol, MAX_PROTOCOL, |c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '+' | '-')
                })
            })
            .and_then(|()| check_text("zone", &instance.zone, MAX_NAME, is_name_char))
            .and_then(|()| {
                if instance.weight > MAX_WEIGHT {
                    Err(format!(
                        "the weight is {}; expected 0 to {MAX_WEIGHT}",
                        instance.weight
                    ))
                } else {
                    Ok(())
                }
            })
            .and_then(|()| self.check_metadata(instance))
            .map_err(|why| invalid(instance, why))
    }

    fn check_metadata(&self, instance: &Instance) -> Result<(), String> {
        let metadata = &instance.metadata;
        if metadata.len() > self.max_labels {
            return Err(format!(
                "it has {} metadata labels; expected at most {}",
                metadata.len(),
                self.max_labels
            ));
        }
        let mut total = 0usize;
        for (k, v) in metadata {
            check_name("metadata key", k, self.max_label_key, |c| !is_unsafe(c))?;
            if v.len() > self.max_label_value {
                return Err(format!(
                    "the value of metadata label {} is {} bytes; expected at most {}",
                    quoted(k),
                    v.len(),
                    self.max_label_value
                ));
            }
            if let Some(c) = v.chars().find(|c| is_unsafe(*c)) {
                return Err(format!(
                    "the value of metadata label {} has the character {}; control and \
                     bidirectional-override characters are not allowed",
                    quoted(k),
                    c.escape_unicode()
                ));
            }
            total += k.len() + v.len();
        }
        if total > self.max_metadata {
            return Err(format!(
                "its metadata is {total} bytes; expected at most {}",
                self.max_metadata
            ));
        }
        Ok(())
    }
}

/// Checks the names of a service (namespace, group, service), as every
/// request that names one (a protection threshold, say) must.
///
/// ```
/// use lodestar_core::{ServiceKey, registry::limits::check_service_key};
/// assert!(check_service_key(&ServiceKey::new("orders")).is_ok());
/// assert!(check_service_key(&ServiceKey::new("a\nb")).is_err());
/// ```
pub fn check_service_key(key: &crate::ServiceKey) -> Result<(), RegistryError> {
    service_key(key).map_err(|why| {
        RegistryError::Invalid(format!("service {}: {why}", quoted(&key.to_string())))
    })
}

fn service_key(key: &crate::ServiceKey) -> Result<(), String> {
    check_name("namespace", &key.namespace, MAX_NAME, is_name_char)
        .and_then(|()| check_name("group", &key.group, MAX_NAME, is_name_char))
        .and_then(|()| check_name("service", &key.service, MAX_NAME, is_name_char))
}

fn invalid(instance: &Instance, why: String) -> RegistryError {
    RegistryError::Invalid(format!(
        "instance {} of service {}: {why}",
        quoted(&instance.id),
        quoted(&instance.key.to_string())
    ))
}

/// Characters of namespace, group, service and zone names.
fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':')
}

/// Characters of instance ids: name characters, and those an address
/// brings into the default id.
fn is_id_char(c: char) -> bool {
    is_name_char(c) || matches!(c, '@' | '[' | ']' | '+' | '=' | '~')
}

/// Control characters (C0, DEL, C1) and the bidirectional overrides and
/// isolates, which can make text display as something else.
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}' | '\u{061C}')
}

/// A required name: not empty, not `.` or `..`, at most `max` bytes of `allowed`.
fn check_name(
    what: &str,
    value: &str,
    max: usize,
    allowed: fn(char) -> bool,
) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("it has an empty {what}"));
    }
    if value == "." || value == ".." {
        return Err(format!("the {what} may not be `{value}`"));
    }
    check_text(what, value, max, allowed)
}

/// Optional text: at most `max` bytes of `allowed`.
fn check_text(
    what: &str,
    value: &str,
    max: usize,
    allowed: fn(char) -> bool,
) -> Result<(), String> {
    if value.len() > max {
        return Err(format!(
            "the {what} is {} bytes; expected at most {max}",
            value.len()
        ));
    }
    if let Some(c) = value.chars().find(|c| !allowed(*c)) {
        return Err(format!(
            "the {what} {} has the character {}, which is not allowed there",
            quoted(value),
            quoted(&c.to_string())
        ));
    }
    Ok(())
}

/// `host:port`, with a DNS name, an IPv4 address or a bracketed IPv6 address.
fn check_address(address: &str) -> Result<(), String> {
    let expected =
        "expected host:port (a DNS name, an IPv4 address or [an IPv6 address], and a port)";
    if address.is_empty() {
        return Err("it has an empty address".to_owned());
    }
    if address.len() > MAX_ADDRESS {
        return Err(format!(
            "the address is {} bytes; expected at most {MAX_ADDRESS}",
            address.len()
        ));
    }
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(format!(
            "the address {} has no port; {expected}",
            quoted(address)
        ));
    };
    let port_ok =
        !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_ok();
    let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        is_dns_name(host)
    };
    if port_ok && host_ok {
        Ok(())
    } else {
        Err(format!(
            "the address {} is not valid; {expected}",
            quoted(address)
        ))
    }
}

/// A DNS name or IPv4 address: dot-separated labels of letters, digits,
/// `-` and `_`, each 1–63 bytes, not starting or ending with `-`.
fn is_dns_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Text from a peer, safe to print on a terminal or in a log line: control
/// and bidirectional-override characters escaped, everything else as it is.
///
/// ```
/// use lodestar_core::registry::limits::printable;
/// assert_eq!(printable("orders"), "orders");
/// assert_eq!(printable("a\u{1b}[2Jb\nc"), "a\\u{1b}[2Jb\\nc");
/// ```
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(is_unsafe) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_unsafe(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Text from a peer, quoted for a log line or a terminal: at most 80
/// characters, with control, bidirectional and non-ASCII characters escaped.
///
/// ```
/// use lodestar_core::registry::limits::quoted;
/// assert_eq!(quoted("orders"), "`orders`");
/// assert_eq!(quoted("a\nb\u{1b}[2J"), "`a\\nb\\u{1b}[2J`");
/// ```
pub fn quoted(text: &str) -> String {
    const SHOWN: usize = 80;
    let mut out = String::with_capacity(text.len().min(SHOWN) + 8);
    out.push('`');
    for (n, c) in text.chars().enumerate() {
        if n == SHOWN {
            out.push_str(&format!("…({} bytes in all)", text.len()));
            break;
        }
        if c == '`' {
            out.push_str("\\`");
        } else if c == '\\' || c.is_control() || !c.is_ascii() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out.push('`');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(instance: &Instance) -> String {
        Limits::default()
            .check(instance, Duration::from_secs(6))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn names_with_unsafe_characters_or_lengths_are_refused_by_name() {
        for (service, says) in [
            ("a\0b", "service"),
            ("a\u{1b}[31m", "service"),
            ("a\nb", "service"),
            ("a\u{202e}b", "service"),
            ("a/b", "service"),
            ("..", "may not be"),
            ("", "empty"),
        ] {
            let error = refused(&Instance::new(service, "10.0.0.1:80").with_id("i"));
            assert!(error.contains(says), "{service:?}: {error}");
            assert!(
                !error.contains('\n') && !error.contains('\u{1b}'),
                "{error}"
            );
        }
        let long = "s".repeat(MAX_NAME + 1);
        assert!(refused(&Instance::new(long, "10.0.0.1:80").with_id("i")).contains("129 bytes"));
        let id = "i".repeat(MAX_ID + 1);
        assert!(refused(&Instance::new("s", "10.0.0.1:80").with_id(id)).contains("id"));
    }

    #[test]
    fn addresses_must_be_host_and_port() {
        for good in [
            "10.0.0.1:80",
            "svc.ns.svc.cluster.local:7000",
            "[::1]:7070",
            "h_1:1",
        ] {
            assert!(
                Limits::default()
                    .check_instance(&Instance::new("s", good))
                    .is_ok(),
                "{good}"
            );
        }
        for bad in [
            "10.0.0.1",
            "h:65536",
            ":80",
            "h:8o",
            "a b:80",
            "h:80\r\nX: y",
            "[zz]:80",
            "-h:1",
        ] {
            let error = Limits::default().check_instance(&Instance::new("s", bad).with_id("i"));
            assert!(
                error
                    .as_ref()
                    .is_err_and(|e| e.to_string().contains("address")),
                "{bad}: {error:?}"
            );
        }
    }

    #[test]
    fn metadata_is_bounded_in_count_size_and_characters() {
        let limits = Limits::default();
        let mut many = Instance::new("s", "h:1");
        for n in 0..=limits.max_labels {
            many.metadata.insert(format!("k{n}"), "v".into());
        }
        assert!(refused(&many).contains("65 metadata labels"));
        let big = Instance::new("s", "h:1").with_label("k", "v".repeat(limits.max_label_value + 1));
        assert!(refused(&big).contains("4097 bytes"));
        let mut total = Instance::new("s", "h:1");
        for n in 0..5 {
            total.metadata.insert(format!("k{n}"), "v".repeat(4000));
        }
        assert!(refused(&total).contains("its metadata is"));
        let escape = Instance::new("s", "h:1").with_label("k", "\u{1b}]0;pwned\u{7}");
        assert!(refused(&escape).contains("control"));
        let ok = Instance::new("s", "h:1")
            .with_label("app.kubernetes.io/name", "orders")
            .with_label("note", "héllo wörld, 100% fine");
        assert!(limits.check_instance(&ok).is_ok());
    }

    #[test]
    fn ttls_outside_the_range_are_refused() {
        let limits = Limits::default();
        let i = Instance::new("s", "h:1");
        assert!(limits.check(&i, Duration::from_millis(499)).is_err());
        assert!(limits.check(&i, Duration::from_millis(500)).is_ok());
        assert!(limits.check(&i, Duration::from_secs(3600)).is_ok());
        assert!(limits.check(&i, Duration::from_secs(3601)).is_err());
    }

    #[test]
    fn quoting_escapes_and_shortens() {
        assert_eq!(quoted("a`b"), "`a\\`b`");
        let long = quoted(&"x".repeat(10_000));
        assert!(long.len() < 120 && long.contains("10000 bytes"), "{long}");
    }
}
