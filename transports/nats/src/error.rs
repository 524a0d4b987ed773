//! Classifying async-nats errors as datasync [`StoreError`]s.

use std::time::Duration;

use async_nats::connection::State;
use datasync::StoreError;

/// `err` as a [`StoreError`]: retryable (`Unavailable`, `Timeout`) when the connection is
/// down, the request timed out or nobody answered (JetStream restarting); `Backend`
/// otherwise.
///
/// async-nats gives every call its own error-kind enum; all of them display a timeout as
/// "timed out" and a missing JetStream as "no responders", which is what is read here.
pub(crate) fn classify<E>(client: &async_nats::Client, timeout: Duration, err: E) -> StoreError
where
    E: std::error::Error + Send + Sync + 'static,
{
    if client.connection_state() != State::Connected {
        return StoreError::Unavailable(Box::new(err));
    }
    let text = err.to_string().to_ascii_lowercase();
    if text.contains("timed out") {
        StoreError::Timeout(timeout)
    } else if text.contains("no responders") || text.contains("broken pipe") {
        StoreError::Unavailable(Box::new(err))
    } else {
        StoreError::Backend(Box::new(err))
    }
}

/// A connect error as a [`StoreError`]: refused credentials are final, the rest
/// retryable.
pub(crate) fn connect_error(err: async_nats::ConnectError) -> StoreError {
    use async_nats::ConnectErrorKind as K;
    match err.kind() {
        K::AuthorizationViolation | K::Authentication => StoreError::Unauthenticated(Box::new(err)),
        K::ServerParse => StoreError::Backend(Box::new(err)),
        _ => StoreError::Unavailable(Box::new(err)),
    }
}
