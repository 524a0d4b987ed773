//! etcd's wire shapes to the store's and back: keys and ranges, records, headers, and
//! errors as the gRPC codes and messages etcd clients match on.

use datasync::{Key, Prefix, StoreError};
use datasync_raft::records::{PrevRecord, RangeEnd};
use datasync_raft::{KeyRange, RaftStore, Record};
use etcd_client::proto::{PbKeyValue, PbResponseHeader};
use tonic::Status;

/// A key from the wire: UTF-8 (the store keeps keys as text).
pub(crate) fn text(bytes: &[u8], what: &str) -> Result<String, Status> {
    String::from_utf8(bytes.to_vec()).map_err(|_| {
        Status::invalid_argument(format!(
            "etcdserver: {what} is not UTF-8 (the built-in store keeps keys as text)"
        ))
    })
}

/// A key to write: non-empty and valid as a `datasync` key.
pub(crate) fn key(bytes: &[u8]) -> Result<Key, Status> {
    if bytes.is_empty() {
        return Err(Status::invalid_argument("etcdserver: key is not provided"));
    }
    Key::new(text(bytes, "key")?)
        .map_err(|e| Status::invalid_argument(format!("etcdserver: key is not valid here: {e}")))
}

/// etcd's end of the range of keys with prefix `key` (`clientv3.GetPrefixRangeEnd`):
/// the last byte below 0xff incremented, what follows it dropped; `[0]` (every key from
/// `key` on) when there is none.
fn prefix_end(key: &[u8]) -> Vec<u8> {
    let mut end = key.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A request's `key` and `range_end` as a range: `range_end` empty is the key alone,
/// `[0]` every key from `key` on, the prefix form (what `--prefix` sends) the keys under
/// `key`, and anything else the keys from `key` up to `range_end`.
pub(crate) fn key_range(key: &[u8], range_end: &[u8]) -> Result<KeyRange, Status> {
    if key.is_empty() && range_end.is_empty() {
        return Err(Status::invalid_argument("etcdserver: key is not provided"));
    }
    let start = text(key, "key")?;
    if range_end.is_empty() {
        return Ok(KeyRange {
            start,
            end: RangeEnd::Single,
        });
    }
    if range_end == [0] {
        return Ok(KeyRange::from(start));
    }
    // A prefix's byte-wise end may cut a character in two (`ÿ` is C3 BF, its end C3 C0);
    // the store's own prefix range is the same set of keys.
    if !key.is_empty() && range_end == prefix_end(key).as_slice() {
        let prefix = Prefix::new(&start).map_err(|e| {
            Status::invalid_argument(format!("etcdserver: prefix is not valid here: {e}"))
        })?;
        return Ok(KeyRange::prefix(&prefix));
    }
    Ok(KeyRange::between(start, text(range_end, "range end")?))
}

/// A record as etcd's `KeyValue`.
pub(crate) fn kv(r: &Record, keys_only: bool) -> PbKeyValue {
    PbKeyValue {
        key: r.key.as_str().as_bytes().to_vec(),
        create_revision: signed(r.create_revision.0),
        mod_revision: signed(r.mod_revision.0),
        version: signed(r.version),
        value: if keys_only {
            Vec::new()
        } else {
            r.value.as_bytes().to_vec()
        },
        lease: signed(r.lease),
    }
}

/// A record from a transaction's outcome, as etcd's `KeyValue`.
pub(crate) fn prev_kv(p: &PrevRecord) -> PbKeyValue {
    PbKeyValue {
        key: p.key.as_bytes().to_vec(),
        create_revision: signed(p.create_revision),
        mod_revision: signed(p.mod_revision),
        version: signed(p.version),
        value: p.value.clone(),
        lease: signed(p.lease),
    }
}

/// A revision or count for etcd's `int64` fields (ours never reach 2^63).
pub(crate) fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A revision from the wire: 0 and below mean "none given" where etcd says so; the
/// caller decides.
pub(crate) fn unsigned(n: i64, what: &str) -> Result<u64, Status> {
    u64::try_from(n)
        .map_err(|_| Status::invalid_argument(format!("etcdserver: {what} {n} is negative")))
}

/// The response header: this member, the revision, the raft term.
///
/// The cluster id is 0: the built-in store has none of its own yet (etcd derives one
/// from its initial members' URLs).
pub(crate) fn header(store: &RaftStore, revision: u64) -> Option<PbResponseHeader> {
    Some(PbResponseHeader {
        cluster_id: 0,
        member_id: store.node_id(),
        revision: signed(revision),
        raft_term: store.raft_term(),
    })
}

/// A store error as etcd's gRPC status (codes and messages from etcd's `rpctypes`, so
/// clients that match on them behave as with etcd).
pub(crate) fn status(e: StoreError) -> Status {
    match e {
        StoreError::Compacted { .. } => {
            Status::out_of_range("etcdserver: mvcc: required revision has been compacted")
        }
        StoreError::FutureRevision { .. } => {
            Status::out_of_range("etcdserver: mvcc: required revision is a future revision")
        }
        StoreError::InvalidKey(e) => {
            Status::invalid_argument(format!("etcdserver: key is not valid here: {e}"))
        }
        StoreError::ValueTooLarge { .. } => {
            Status::invalid_argument("etcdserver: request is too large")
        }
        StoreError::InvalidTtl(_) => Status::invalid_argument(format!("etcdserver: {e}")),
        StoreError::Unsupported(why) if why.contains("lease not found") => {
            Status::not_found("etcdserver: requested lease not found")
        }
        StoreError::Unsupported(why) if why.contains("duplicate key") => {
            Status::invalid_argument("etcdserver: duplicate key given in txn request")
        }
        StoreError::Unsupported(why) if why.contains("too many operations") => {
            Status::invalid_argument("etcdserver: too many operations in txn request")
        }
        StoreError::Unsupported(why) => Status::unimplemented(format!("etcdserver: {why}")),
        StoreError::Timeout(_) => Status::unavailable("etcdserver: request timed out"),
        StoreError::Stopped => Status::unavailable("etcdserver: server stopped"),
        StoreError::Unavailable(_) => Status::unavailable(format!(
            "etcdserver: no leader ({})",
            datasync::error_chain(&e)
        )),
        e => Status::internal(format!("etcdserver: {}", datasync::error_chain(&e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_read_as_etcd_clients_send_them() {
        let r = key_range(b"a", b"").expect("one key");
        assert_eq!(r.end, RangeEnd::Single);
        assert_eq!(key_range(b"a", &[0]).expect("from"), KeyRange::from("a"));
        assert_eq!(key_range(b"", &[0]).expect("all"), KeyRange::from(""));
        let p = Prefix::new("a/").expect("prefix");
        assert_eq!(
            key_range(b"a/", b"a0").expect("prefix"),
            KeyRange::prefix(&p)
        );
        // `ÿ` ends in BF: etcd's byte-wise end is not UTF-8, the range still is.
        let y = "p/ÿ".as_bytes();
        let end = prefix_end(y);
        assert!(std::str::from_utf8(&end).is_err());
        let r = key_range(y, &end).expect("prefix of ÿ");
        assert!(r.contains("p/ÿ/x") && !r.contains("p/Ā"));
        assert_eq!(
            key_range(b"a", b"c").expect("between"),
            KeyRange::between("a", "c")
        );
        assert!(key_range(b"", b"").is_err());
        assert!(key_range(&[0xff], b"").is_err());
        assert!(key_range(b"a", &[0xc3]).is_err());
        assert_eq!(prefix_end(&[0xff, 0xff]), vec![0]);
    }
}
