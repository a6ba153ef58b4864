//! Saying what went wrong in one line.

use std::error::Error;

/// `error` and each of its sources, joined by `": "`: the whole story on
/// one line, for logs and error messages (many errors, hyper's among them,
/// keep the useful part in a source).
///
/// ```
/// use lodestar_core::error::chain;
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("cannot reach the registry")]
/// struct Unreachable(#[source] std::io::Error);
///
/// let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
/// assert_eq!(chain(&Unreachable(refused)), "cannot reach the registry: connection refused");
/// ```
pub fn chain(error: &(dyn Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{text}")]
    struct Layer {
        text: &'static str,
        #[source]
        source: Option<Box<Layer>>,
    }

    fn layers(texts: &[&'static str]) -> Option<Box<Layer>> {
        texts
            .iter()
            .rev()
            .fold(None, |source, &text| Some(Box::new(Layer { text, source })))
    }

    #[test]
    fn an_error_without_a_source_is_its_own_text() {
        let error = layers(&["alone"]).unwrap();
        assert_eq!(chain(&*error), "alone");
    }

    #[test]
    fn every_source_follows_in_order() {
        let error = layers(&["outer", "middle", "root cause"]).unwrap();
        assert_eq!(chain(&*error), "outer: middle: root cause");
    }
}
