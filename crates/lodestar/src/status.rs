//! The gRPC status for an error a tower layer returns.

use std::error::Error;

use tonic::Status;

/// The header that carries a call's gRPC status code.
pub(crate) const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

/// The code in `headers`' `grpc-status`, if there is one (`UNKNOWN` for a
/// value that is not a code).
pub(crate) fn code_in(headers: &http::HeaderMap) -> Option<tonic::Code> {
    crate::headers::find_header(headers, &GRPC_STATUS)
        .map(|v| tonic::Code::from_bytes(v.as_bytes()))
}

/// The error type of tower layers.
pub(crate) type BoxError = Box<dyn Error + Send + Sync>;

/// The status a caller gets for `error`, returned by a tower layer (the
/// user's, on either side): a [`Status`] as itself; tower's load shedding
/// (`Overloaded`) as `RESOURCE_EXHAUSTED` and its timeout (`Elapsed`) as
/// `DEADLINE_EXCEEDED`; anything else as `UNAVAILABLE`, with the error's
/// text and its sources'. The first of these found along the error's
/// source chain decides (layers often wrap the errors of the layers they wrap).
pub(crate) fn from_layer_error(error: BoxError) -> Status {
    let mut cause: Option<&(dyn Error + 'static)> = Some(&*error);
    while let Some(e) = cause {
        if let Some(status) = e.downcast_ref::<Status>() {
            return status.clone();
        }
        if e.is::<tower::load_shed::error::Overloaded>() {
            return Status::resource_exhausted(
                "overloaded: a load-shedding layer refused this call; try again later or elsewhere",
            );
        }
        if e.is::<tower::timeout::error::Elapsed>() {
            return Status::deadline_exceeded("a timeout layer's time limit for this call passed");
        }
        cause = e.source();
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
