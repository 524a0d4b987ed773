//! etcd client errors as [`StoreError`]s.

use std::time::Duration;

use datasync::{Revision, StoreError};
use tonic::Code;

/// An etcd revision (or count) as ours. etcd's are non-negative `i64`s; a negative one
/// comes from a server (or something between) that cannot be trusted, and is refused
/// rather than cast: cast, it would wrap to a far-ahead revision (a watch resumed from
/// there would wait forever and miss every change).
pub(crate) fn revision(r: i64) -> Result<Revision, StoreError> {
    u64::try_from(r)
        .map(Revision)
        .map_err(|_| StoreError::Corrupted(format!("etcd sent a negative revision ({r})")))
}

/// The revision of a response header (0 without one).
pub(crate) fn header_rev(h: Option<&etcd_client::ResponseHeader>) -> Result<Revision, StoreError> {
    revision(h.map_or(0, |h| h.revision()))
}

/// Classifies an etcd client error: what a retry may fix is `Unavailable`.
pub(crate) fn store_error(e: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    if certificate_refused(&e) {
        return StoreError::Unauthenticated(Box::new(e));
    }
    match e {
        E::GRpcStatus(status) => match status.code() {
            Code::Unavailable | Code::Aborted | Code::Cancelled => {
                StoreError::Unavailable(Box::new(status))
            }
            // etcd says "leader changed" or "no leader" with Unknown while it elects, and
            // a connection that breaks mid-stream surfaces as Unknown or Internal with
            // the transport error as its source ("h2 protocol error: ...").
            Code::Unknown | Code::Internal
                if is_election(status.message()) || is_transport(&status) =>
            {
                StoreError::Unavailable(Box::new(status))
            }
            Code::DeadlineExceeded => StoreError::Unavailable(Box::new(status)),
            Code::Unauthenticated => StoreError::Unauthenticated(Box::new(status)),
            // etcd answers a wrong user or password, and a request without one where
            // auth is on, with InvalidArgument.
            Code::InvalidArgument
                if ["authentication failed", "user name is empty"]
                    .iter()
                    .any(|m| status.message().contains(m)) =>
            {
                StoreError::Unauthenticated(Box::new(status))
            }
            Code::PermissionDenied => StoreError::PermissionDenied(Box::new(status)),
            _ => StoreError::Backend(Box::new(status)),
        },
        E::TransportError(t) => StoreError::Unavailable(Box::new(t)),
        E::IoError(io) => StoreError::Unavailable(Box::new(io)),
        E::WatchError(w) | E::LeaseKeepAliveError(w) => {
            StoreError::Unavailable(format!("etcd stream closed: {w}").into())
        }
        other => StoreError::Backend(Box::new(other)),
    }
}

/// Whether `e` is a TLS handshake that failed over a certificate: ours missing or
/// refused, or the server's not trusted. Trying again cannot help: it is
/// `Unauthenticated`, not `Unavailable`.
#[cfg(feature = "tls")]
fn certificate_refused(e: &etcd_client::Error) -> bool {
    use etcd_client::Error as E;
    use rustls::{AlertDescription as A, Error as T};
    let inner: &(dyn std::error::Error + 'static) = match e {
        E::GRpcStatus(s) => s,
        E::TransportError(t) => t,
        E::IoError(io) => io,
        _ => return false,
    };
    const REFUSALS: [A; 8] = [
        A::BadCertificate,
        A::UnsupportedCertificate,
        A::CertificateRevoked,
        A::CertificateExpired,
        A::CertificateUnknown,
        A::UnknownCA,
        A::AccessDenied,
        A::CertificateRequired,
    ];
    match datasync::transport::find_cause::<T>(inner) {
        Some(T::InvalidCertificate(_) | T::NoCertificatesPresented) => true,
        Some(T::AlertReceived(a)) => REFUSALS.contains(a),
        Some(_) => false,
        // An alert after the handshake (TLS 1.3 refuses a client's certificate then)
        // reaches us through h2, which keeps only rustls's message.
        None => {
            let text = datasync::error_chain(inner);
            REFUSALS
                .iter()
                .any(|a| text.contains(&format!("received fatal alert: {a:?}")))
        }
    }
}

#[cfg(not(feature = "tls"))]
fn certificate_refused(_: &etcd_client::Error) -> bool {
    false
}

fn is_transport(status: &tonic::Status) -> bool {
    std::error::Error::source(status).is_some()
        || [
            "h2 protocol error",
            "connection",
            "broken pipe",
            "transport",
        ]
        .iter()
        .any(|m| status.message().contains(m))
}

fn is_election(msg: &str) -> bool {
    msg.contains("leader changed") || msg.contains("no leader") || msg.contains("timed out")
}

/// etcd's message for a read at a compacted revision.
pub(crate) fn is_compacted(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.code() == Code::OutOfRange && s.message().contains("compacted"))
}

/// etcd's message for a read at a future revision.
pub(crate) fn is_future(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.code() == Code::OutOfRange && s.message().contains("future"))
}

/// Runs `call` under the request timeout.
pub(crate) async fn timed<T>(
    timeout: Duration,
    call: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<Result<T, etcd_client::Error>, StoreError> {
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| StoreError::Timeout(timeout))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify(status: tonic::Status) -> StoreError {
        store_error(etcd_client::Error::GRpcStatus(status))
    }

    #[test]
    fn broken_connections_and_elections_are_retryable_refusals_are_not() {
        for s in [
            tonic::Status::unavailable("connection refused"),
            tonic::Status::unknown("h2 protocol error: error reading a body from connection"),
            tonic::Status::unknown("etcdserver: leader changed"),
            tonic::Status::deadline_exceeded("deadline"),
        ] {
            assert!(classify(s.clone()).is_retryable(), "{s:?}");
        }
        for s in [
            tonic::Status::permission_denied("etcdserver: permission denied"),
            tonic::Status::invalid_argument("etcdserver: authentication failed"),
            tonic::Status::unknown("etcdserver: some refusal"),
        ] {
            assert!(!classify(s.clone()).is_retryable(), "{s:?}");
        }
        assert!(is_compacted(&etcd_client::Error::GRpcStatus(
            tonic::Status::out_of_range("etcdserver: mvcc: required revision has been compacted")
        )));
        assert!(is_future(&etcd_client::Error::GRpcStatus(
            tonic::Status::out_of_range("etcdserver: mvcc: required revision is a future revision")
        )));
    }
}
