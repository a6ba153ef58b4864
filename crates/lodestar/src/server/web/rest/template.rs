//! Path templates of `google.api.http` rules: parsed once at start,
//! matched against request paths with no allocation.
//!
//! The grammar is the `HttpRule`'s:
//!
//! ```text
//! Template = "/" Segments [ ":" Verb ] | "/"
//! Segments = Segment { "/" Segment }
//! Segment  = "*" | "**" | LITERAL | Variable
//! Variable = "{" FieldPath [ "=" Segments ] "}"
//! FieldPath = IDENT { "." IDENT }
//! ```
//!
//! `*` matches one segment, `**` any number (the last segment only),
//! `{field}` is `{field=*}`. A single-segment variable's value is
//! percent-decoded; a multi-segment one keeps `%2F` as it is (so its
//! slashes stay distinguishable from escaped ones).

use std::fmt;

use crate::server::web::percent;

/// One segment of a path template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `*`: one segment.
    One,
    /// `**`: any number of segments (the last segment only).
    Rest,
}

/// A variable of a template: the field it fills, and the template
/// segments it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Variable {
    field: Vec<String>,
    start: usize,
    end: usize,
}

/// A parsed path template (see the module docs for the grammar).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Template {
    segments: Vec<Segment>,
    variables: Vec<Variable>,
    verb: Option<String>,
}

/// Whether `c` may appear in a literal segment (RFC 3986 `pchar`, less
/// `:`, which starts the verb).
fn literal_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~!$&'()+,;=@%".contains(c)
}

impl Template {
    /// Parses `text`, saying where and why it does not.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let Some(mut rest) = text.strip_prefix('/') else {
            return Err("a template starts with `/`".into());
        };
        let mut template = Template {
            segments: Vec::new(),
            variables: Vec::new(),
            verb: None,
        };
        if rest.is_empty() {
            return Ok(template);
        }
        let mut in_variable: Option<Variable> = None;
        loop {
            // One segment, or the start of a variable.
            if in_variable.is_none()
                && let Some(after) = rest.strip_prefix('{')
            {
                let end = after
                    .find(['=', '}'])
                    .ok_or_else(|| format!("`{{` at `{rest}` is never closed"))?;
                let path = &after[..end];
                let field: Vec<String> = path.split('.').map(str::to_owned).collect();
                if field.iter().any(|name| !is_ident(name)) {
                    return Err(format!(
                        "`{path}` is not a field path (names of letters, digits and `_`, \
                         joined by `.`)"
                    ));
                }
                if template.variables.iter().any(|v| v.field == field) {
                    return Err(format!("the field `{path}` is bound twice"));
                }
                let variable = Variable {
                    field,
                    start: template.segments.len(),
                    end: template.segments.len(),
                };
                if after.as_bytes()[end] == b'}' {
                    // `{field}` is `{field=*}`.
                    template.segments.push(Segment::One);
                    template.variables.push(Variable {
                        end: template.segments.len(),
                        ..variable
                    });
                    rest = &after[end + 1..];
                } else {
                    in_variable = Some(variable);
                    rest = &after[end + 1..];
                    continue;
                }
            } else {
                if rest.starts_with('{') {
                    return Err(format!("variables do not nest: `{rest}`"));
                }
                let end = rest.find(['/', '}', ':', '{']).unwrap_or(rest.len());
                let segment = &rest[..end];
                template.segments.push(match segment {
                    "*" => Segment::One,
                    "**" => Segment::Rest,
                    "" => return Err(format!("an empty segment at `{rest}`")),
                    literal if literal.chars().all(literal_char) => {
                        Segment::Literal(literal.to_owned())
                    }
                    other => {
                        return Err(format!(
                            "`{other}` is neither `*`, `**`, a variable nor a literal segment"
                        ));
                    }
                });
                rest = &rest[end..];
                if let Some(after) = rest.strip_prefix('}') {
                    let Some(mut variable) = in_variable.take() else {
                        return Err("a `}` closes no variable".into());
                    };
                    variable.end = template.segments.len();
                    template.variables.push(variable);
                    rest = after;
                }
            }
            match rest.as_bytes().first() {
                None => break,
                Some(b'/') => rest = &rest[1..],
                Some(b':') if in_variable.is_none() => {
                    let verb = &rest[1..];
                    if verb.is_empty() || !verb.chars().all(literal_char) {
                        return Err(format!("`{verb}` is not a verb (a literal after `:`)"));
                    }
                    template.verb = Some(verb.to_owned());
                    break;
                }
                Some(_) => return Err(format!("unexpected `{rest}`")),
            }
        }
        if in_variable.is_some() {
            return Err("a variable is never closed with `}`".into());
        }
        if let Some(at) = template.segments.iter().position(|s| *s == Segment::Rest)
            && at + 1 != template.segments.len()
        {
            return Err("`**` may only be the last segment".into());
        }
        Ok(template)
    }

    /// How many literal segments the template has (more is more specific).
    pub(super) fn literals(&self) -> usize {
        self.segments
            .iter()
            .filter(|s| matches!(s, Segment::Literal(_)))
            .count()
    }

    /// Whether the template ends with `**`.
    pub(super) fn open_ended(&self) -> bool {
        self.segments.last() == Some(&Segment::Rest)
    }

    /// The request path without its leading `/` and the template's verb.
    fn strip<'p>(&self, path: &'p str) -> Option<&'p str> {
        let mut path = path.strip_prefix('/')?;
        if let Some(verb) = &self.verb {
            path = path.strip_suffix(verb.as_str())?.strip_suffix(':')?;
        }
        Some(path)
    }

    /// The request path's segments if it matches, with the verb taken off.
    fn split<'p>(&self, path: &'p str) -> Option<Vec<&'p str>> {
        let path = self.strip(path)?;
        let parts: Vec<&str> = if path.is_empty() {
            Vec::new()
        } else {
            path.split('/').collect()
        };
        let mut at = 0;
        for segment in &self.segments {
            match segment {
                Segment::Literal(literal) => {
                    if parts.get(at) != Some(&literal.as_str()) {
                        return None;
                    }
                    at += 1;
                }
                Segment::One => {
                    if parts.get(at).is_none_or(|p| p.is_empty()) {
                        return None;
                    }
                    at += 1;
                }
                Segment::Rest => at = parts.len(),
            }
        }
        (at == parts.len()).then_some(parts)
    }

    /// The field paths of the template's variables, in order.
    pub(super) fn fields(&self) -> impl Iterator<Item = &[String]> {
        self.variables.iter().map(|v| v.field.as_slice())
    }

    /// Whether `path` matches (as [`Template::captures`] would, with no
    /// allocation: every web request that may be REST asks).
    pub(crate) fn is_match(&self, path: &str) -> bool {
        let Some(path) = self.strip(path) else {
            return false;
        };
        let mut parts = (!path.is_empty())
            .then(|| path.split('/'))
            .into_iter()
            .flatten();
        for segment in &self.segments {
            match segment {
                Segment::Literal(literal) => {
                    if parts.next() != Some(literal.as_str()) {
                        return false;
                    }
                }
                Segment::One => {
                    if parts.next().is_none_or(str::is_empty) {
                        return false;
                    }
                }
                Segment::Rest => return true,
            }
        }
        parts.next().is_none()
    }

    /// The variables' values if `path` matches: each field path and its
    /// decoded text.
    pub(crate) fn captures(&self, path: &str) -> Option<Vec<(&[String], String)>> {
        let parts = self.split(path)?;
        let mut out = Vec::with_capacity(self.variables.len());
        for variable in &self.variables {
            let end = if variable.end == self.segments.len() && self.open_ended() {
                parts.len()
            } else {
                variable.end
            };
            let raw = parts.get(variable.start..end)?;
            let single =
                variable.end - variable.start == 1 && self.segments[variable.start] == Segment::One;
            let value = if single {
                percent::decode_utf8(raw.first()?, false, false)?
            } else {
                percent::decode_utf8(&raw.join("/"), false, true)?
            };
            out.push((variable.field.as_slice(), value));
        }
        Some(out)
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/")?;
        for (i, segment) in self.segments.iter().enumerate() {
            if i > 0 {
                write!(f, "/")?;
            }
            match segment {
                Segment::Literal(l) => write!(f, "{l}")?,
                Segment::One => write!(f, "*")?,
                Segment::Rest => write!(f, "**")?,
            }
        }
        if let Some(verb) = &self.verb {
            write!(f, ":{verb}")?;
        }
        Ok(())
    }
}

fn is_ident(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Template {
        Template::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn captured(template: &str, path: &str) -> Option<Vec<(String, String)>> {
        let template = parse(template);
        template.captures(path).map(|c| {
            c.into_iter()
                .map(|(field, value)| (field.join("."), value))
                .collect()
        })
    }

    #[test]
    fn templates_parse_as_the_grammar_says() {
        let t = parse("/v1/{name=shelves/*/books/*}:cancel");
        assert_eq!(
            t.segments,
            [
                Segment::Literal("v1".into()),
                Segment::Literal("shelves".into()),
                Segment::One,
                Segment::Literal("books".into()),
                Segment::One,
            ]
        );
        assert_eq!(t.variables[0].field, ["name"]);
        assert_eq!((t.variables[0].start, t.variables[0].end), (1, 5));
        assert_eq!(t.verb.as_deref(), Some("cancel"));
        assert_eq!(t.to_string(), "/v1/shelves/*/books/*:cancel");
        let t = parse("/v1/{a.b}/x/{c}/**");
        assert_eq!(t.variables.len(), 2);
        assert_eq!(t.variables[0].field, ["a", "b"]);
        assert!(t.open_ended());
        assert_eq!(parse("/").segments, []);
        assert_eq!(parse("/{path=**}").variables[0].end, 1);
    }

    #[test]
    fn bad_templates_say_what_is_wrong() {
        for (bad, says) in [
            ("v1/x", "starts with `/`"),
            ("/v1//x", "empty segment"),
            ("/v1/{name", "never closed"),
            ("/v1/{name=a/*", "never closed"),
            ("/v1/**/x", "last segment"),
            ("/v1/{1x}", "not a field path"),
            ("/v1/{a}/{a}", "bound twice"),
            ("/v1/x}", "closes no variable"),
            ("/v1/a b", "neither"),
            ("/v1/x:", "not a verb"),
            ("/v1/{a={b}}", "do not nest"),
        ] {
            let error = Template::parse(bad).expect_err(bad);
            assert!(error.contains(says), "{bad}: {error}");
        }
    }

    #[test]
    fn paths_match_literals_stars_and_verbs() {
        assert_eq!(
            captured(
                "/v1/features/{latitude}/{longitude}",
                "/v1/features/409146138/-746188906"
            ),
            Some(vec![
                ("latitude".into(), "409146138".into()),
                ("longitude".into(), "-746188906".into()),
            ])
        );
        assert_eq!(captured("/v1/features/{latitude}", "/v1/features"), None);
        assert_eq!(captured("/v1/features/{latitude}", "/v1/features/"), None);
        assert_eq!(
            captured("/v1/features/{latitude}", "/v1/features/1/2"),
            None
        );
        assert_eq!(captured("/v1/features/{latitude}", "/v2/features/1"), None);
        assert_eq!(
            captured("/v1/{name=rooms/*/notes/**}", "/v1/rooms/a/notes/x/y%2Fz"),
            Some(vec![("name".into(), "rooms/a/notes/x/y%2Fz".into())])
        );
        assert_eq!(
            captured("/v1/{name=rooms/*/notes/**}", "/v1/rooms/a/notes"),
            Some(vec![("name".into(), "rooms/a/notes".into())])
        );
        assert_eq!(captured("/v1/{name=rooms/*}", "/v1/notes/a"), None);
        // One segment: decoded, `%2F` included.
        assert_eq!(
            captured("/v1/echo/{message}", "/v1/echo/hello%20world%2Fx"),
            Some(vec![("message".into(), "hello world/x".into())])
        );
        assert_eq!(captured("/v1/echo/{message}", "/v1/echo/%zz"), None);
        assert_eq!(
            captured("/v1/{name=jobs/*}:cancel", "/v1/jobs/7:cancel"),
            Some(vec![("name".into(), "jobs/7".into())])
        );
        assert_eq!(captured("/v1/{name=jobs/*}:cancel", "/v1/jobs/7"), None);
        for (template, path) in [
            ("/v1/{name=rooms/*/notes/**}", "/v1/rooms/a/notes/x/y"),
            ("/v1/{name=rooms/*/notes/**}", "/v1/rooms/a/notes"),
            ("/v1/{name=rooms/*/notes/**}", "/v1/rooms/a"),
            ("/v1/{name=jobs/*}:cancel", "/v1/jobs/7:cancel"),
            ("/v1/{name=jobs/*}:cancel", "/v1/jobs/:cancel"),
            ("/v1/echo/{message}", "/v1/echo/x/"),
            ("/v1/*", "/v1"),
        ] {
            let t = parse(template);
            assert_eq!(
                t.is_match(path),
                t.split(path).is_some(),
                "{template} {path}"
            );
        }
        assert!(parse("/").is_match("/"));
        assert!(!parse("/").is_match("/x"));
        assert!(parse("/v1/**").is_match("/v1"));
        assert!(parse("/v1/*/x").is_match("/v1/a/x"));
    }
}
