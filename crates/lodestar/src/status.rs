//! The gRPC status for an error a tower layer returns.

use std::error::Error;

use tonic::Status;

/// The error type of tower layers.
pub(crate) type BoxError = Box<dyn Error + Send + Sync>;

/// The status a caller gets for `error`, returned by a tower layer (the
/// user's, on either side):
///
/// * a [`Status`] is itself;
/// * `tower::load_shed`'s `Overloaded` is `RESOURCE_EXHAUSTED`;
/// * `tower::timeout`'s `Elapsed` is `DEADLINE_EXCEEDED`;
/// * anything else is `UNAVAILABLE`, with the error and its sources as the message.
pub(crate) fn from_layer_error(error: BoxError) -> Status {
    let error = match error.downcast::<Status>() {
        Ok(status) => return *status,
        Err(error) => error,
    };
    if error.is::<tower::load_shed::error::Overloaded>() {
        return Status::resource_exhausted(format!("overloaded: {error}"));
    }
    if error.is::<tower::timeout::error::Elapsed>() {
        return Status::deadline_exceeded(format!("timed out: {error}"));
    }
    Status::unavailable(lodestar_core::error::chain(&*error))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn maps_layer_errors_to_statuses() {
        let status = from_layer_error(Box::new(Status::not_found("x")));
        assert_eq!((status.code(), status.message()), (Code::NotFound, "x"));
        let overloaded = from_layer_error(Box::new(tower::load_shed::error::Overloaded::new()));
        assert_eq!(overloaded.code(), Code::ResourceExhausted);
        assert!(
            overloaded.message().contains("overloaded"),
            "{overloaded:?}"
        );
        let elapsed = from_layer_error(Box::new(tower::timeout::error::Elapsed::new()));
        assert_eq!(elapsed.code(), Code::DeadlineExceeded);
        let other = from_layer_error("no token".into());
        assert_eq!(
            (other.code(), other.message()),
            (Code::Unavailable, "no token")
        );
    }
}
