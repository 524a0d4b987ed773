//! Classifying async-nats errors as datasync [`StoreError`]s.
//!
//! async-nats gives every call its own error-kind enum. Each kind we meet says what it
//! is through [`Kind`]; a kind that only says "the request failed" (`Request`, or a
//! stream creation inside a bucket creation) defers to the error it carries, found by
//! walking the source chain.

use std::error::Error as StdError;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::Error as ApiError;
use async_nats::jetstream::context::{
    AccountErrorKind, CreateKeyValueErrorKind, CreateStreamErrorKind, GetStreamErrorKind,
    PublishErrorKind, RequestErrorKind,
};
use async_nats::jetstream::stream::{
    ConsumerErrorKind, DirectGetErrorKind, LastRawMessageErrorKind,
};
use datasync::StoreError;

/// What a failed call means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// The request timed out: retryable.
    Timeout,
    /// Nobody answered, or the server said it cannot serve now (JetStream restarting,
    /// a server gone): retryable.
    Unavailable,
    /// Anything else: final.
    Failed,
}

/// An async-nats error kind, classified; `None` defers to the error it carries.
pub(crate) trait Kind {
    fn class(&self) -> Option<Class>;
}

/// A JetStream API error: 503 is the server's "not now" (no JetStream, no quorum).
fn api(e: &ApiError) -> Class {
    match e.code() {
        503 => Class::Unavailable,
        408 => Class::Timeout,
        _ => Class::Failed,
    }
}

impl Kind for RequestErrorKind {
    fn class(&self) -> Option<Class> {
        match self {
            RequestErrorKind::TimedOut => Some(Class::Timeout),
            RequestErrorKind::NoResponders => Some(Class::Unavailable),
            // An API error (e.g. 503) or a core request error, carried as the source.
            RequestErrorKind::Other => None,
            _ => Some(Class::Failed),
        }
    }
}

impl Kind for async_nats::RequestErrorKind {
    fn class(&self) -> Option<Class> {
        match self {
            async_nats::RequestErrorKind::TimedOut => Some(Class::Timeout),
            async_nats::RequestErrorKind::NoResponders => Some(Class::Unavailable),
            async_nats::RequestErrorKind::Other => None,
            _ => Some(Class::Failed),
        }
    }
}

impl Kind for AccountErrorKind {
    fn class(&self) -> Option<Class> {
        match self {
            AccountErrorKind::TimedOut => Some(Class::Timeout),
            AccountErrorKind::JetStreamUnavailable => Some(Class::Unavailable),
            AccountErrorKind::JetStream(e) => Some(api(e)),
            _ => None,
        }
    }
}

impl Kind for GetStreamErrorKind {
    fn class(&self) -> Option<Class> {
        match self {
            GetStreamErrorKind::Request => None,
            GetStreamErrorKind::JetStream(e) => Some(api(e)),
            _ => Some(Class::Failed),
        }
    }
}

impl Kind for CreateKeyValueErrorKind {
    fn class(&self) -> Option<Class> {
        match self {
            CreateKeyValueErrorKind::TimedOut => Some(Class::Timeout),
            CreateKeyValueErrorKind::BucketCreate | CreateKeyValueErrorKind::JetStream => None,
            _ => Some(Class::Failed),
        }
    }
}

impl Kind for CreateStreamErrorKind {
    fn class(&self) -> Option<Class> {
        Some(match self {
            CreateStreamErrorKind::TimedOut => Class::Timeout,
            CreateStreamErrorKind::JetStreamUnavailable => Class::Unavailable,
            CreateStreamErrorKind::JetStream(e) => api(e),
            _ => Class::Failed,
        })
    }
}

impl Kind for PublishErrorKind {
    fn class(&self) -> Option<Class> {
        Some(match self {
            PublishErrorKind::TimedOut => Class::Timeout,
            PublishErrorKind::BrokenPipe | PublishErrorKind::StreamNotFound => Class::Unavailable,
            _ => Class::Failed,
        })
    }
}

impl Kind for DirectGetErrorKind {
    fn class(&self) -> Option<Class> {
        match self {
            DirectGetErrorKind::TimedOut => Some(Class::Timeout),
            DirectGetErrorKind::Request => None,
            DirectGetErrorKind::ErrorResponse(code, _) if code.as_u16() == 503 => {
                Some(Class::Unavailable)
            }
            _ => Some(Class::Failed),
        }
    }
}

impl Kind for LastRawMessageErrorKind {
    fn class(&self) -> Option<Class> {
        match self {
            LastRawMessageErrorKind::JetStream(e) => Some(api(e)),
            LastRawMessageErrorKind::Other => None,
            _ => Some(Class::Failed),
        }
    }
}

impl Kind for ConsumerErrorKind {
    fn class(&self) -> Option<Class> {
        match self {
            ConsumerErrorKind::TimedOut => Some(Class::Timeout),
            ConsumerErrorKind::Request => None,
            ConsumerErrorKind::JetStream(e) => Some(api(e)),
            _ => Some(Class::Failed),
        }
    }
}

impl Kind for async_nats::SubscribeErrorKind {
    fn class(&self) -> Option<Class> {
        match self {
            async_nats::SubscribeErrorKind::Other => None,
            _ => Some(Class::Failed),
        }
    }
}

/// The class of the first error in `source`'s chain that has one.
fn chain_class(mut source: Option<&(dyn StdError + 'static)>) -> Option<Class> {
    while let Some(e) = source {
        macro_rules! try_kind {
            ($($k:ty),*) => {$(
                if let Some(e) = e.downcast_ref::<async_nats::error::Error<$k>>()
                    && let Some(c) = e.kind().class()
                {
                    return Some(c);
                }
            )*};
        }
        try_kind!(
            RequestErrorKind,
            async_nats::RequestErrorKind,
            AccountErrorKind,
            GetStreamErrorKind,
            CreateStreamErrorKind,
            ConsumerErrorKind,
            DirectGetErrorKind
        );
        if let Some(e) = e.downcast_ref::<ApiError>() {
            return Some(api(e));
        }
        if let Some(e) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as K;
            match e.kind() {
                K::TimedOut => return Some(Class::Timeout),
                K::BrokenPipe
                | K::ConnectionReset
                | K::ConnectionAborted
                | K::ConnectionRefused
                | K::NotConnected
                | K::UnexpectedEof => return Some(Class::Unavailable),
                _ => {}
            }
        }
        source = e.source();
    }
    None
}

/// `err` as a [`StoreError`]: `Unavailable` when the connection is down or the
/// [`Class`] says so, `Timeout` for a timeout, `Backend` otherwise.
pub(crate) fn classify<K>(
    client: &async_nats::Client,
    timeout: Duration,
    err: async_nats::error::Error<K>,
) -> StoreError
where
    K: Kind + Clone + std::fmt::Debug + std::fmt::Display + PartialEq + Send + Sync + 'static,
{
    if client.connection_state() != State::Connected {
        return StoreError::Unavailable(Box::new(err));
    }
    let class = err
        .kind()
        .class()
        .or_else(|| chain_class(err.source()))
        .unwrap_or(Class::Failed);
    match class {
        Class::Timeout => StoreError::Timeout(timeout),
        Class::Unavailable => StoreError::Unavailable(Box::new(err)),
        Class::Failed => StoreError::Backend(Box::new(err)),
    }
}

/// A connect error as a [`StoreError`]: refused credentials are final, the rest
/// retryable.
pub(crate) fn connect_error(err: async_nats::ConnectError) -> StoreError {
    use async_nats::ConnectErrorKind as K;
    match err.kind() {
        K::AuthorizationViolation | K::Authentication => StoreError::Unauthenticated(Box::new(err)),
        K::ServerParse => StoreError::Backend(Box::new(err)),
        _ if certificate_refused(&err) => StoreError::Unauthenticated(Box::new(err)),
        _ => StoreError::Unavailable(Box::new(err)),
    }
}

/// Whether `e` is a TLS handshake that failed over a certificate: ours missing or
/// refused, or the server's not trusted. Trying again cannot help: it is
/// `Unauthenticated`, not `Unavailable`.
fn certificate_refused(e: &(dyn std::error::Error + 'static)) -> bool {
    use rustls::{AlertDescription as A, Error as T};
    match datasync::transport::find_cause::<T>(e) {
        Some(T::InvalidCertificate(_) | T::NoCertificatesPresented) => true,
        Some(T::AlertReceived(a)) => matches!(
            a,
            A::BadCertificate
                | A::UnsupportedCertificate
                | A::CertificateRevoked
                | A::CertificateExpired
                | A::CertificateUnknown
                | A::UnknownCA
                | A::AccessDenied
                | A::CertificateRequired
        ),
        _ => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
mod tests {
    use super::*;

    /// A kind that only says "the request failed" is classified by what it carries.
    #[test]
    fn a_request_kind_defers_to_the_request_error_it_carries() {
        let inner =
            async_nats::jetstream::context::RequestError::new(RequestErrorKind::NoResponders);
        let outer = async_nats::jetstream::context::GetStreamError::with_source(
            GetStreamErrorKind::Request,
            inner,
        );
        assert_eq!(outer.kind().class(), None);
        assert_eq!(chain_class(outer.source()), Some(Class::Unavailable));
        let timed = async_nats::jetstream::stream::ConsumerError::new(ConsumerErrorKind::TimedOut);
        assert_eq!(timed.kind().class(), Some(Class::Timeout));
        // A bucket creation whose account query timed out is a timeout, not final.
        let account = async_nats::jetstream::context::AccountError::new(AccountErrorKind::TimedOut);
        let create = async_nats::jetstream::context::CreateKeyValueError::with_source(
            CreateKeyValueErrorKind::JetStream,
            account,
        );
        assert_eq!(create.kind().class(), None);
        assert_eq!(chain_class(create.source()), Some(Class::Timeout));
        // A stream info answered with the server's 503 is retryable; a 404 is final.
        let api = |code: u16| -> ApiError {
            serde_json::from_str(&format!(
                r#"{{"code":{code},"err_code":10008,"description":"x"}}"#
            ))
            .unwrap()
        };
        let info = |code| {
            async_nats::jetstream::context::RequestError::with_source(
                RequestErrorKind::Other,
                api(code),
            )
        };
        assert_eq!(info(503).kind().class(), None);
        assert_eq!(chain_class(info(503).source()), Some(Class::Unavailable));
        assert_eq!(chain_class(info(404).source()), Some(Class::Failed));
    }
}
