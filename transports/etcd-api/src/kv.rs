//! etcd's KV service: Range, Put, DeleteRange and Txn on the store's records and
//! transactions. Every write is one store transaction, so a put or delete answers its
//! previous records exactly as they were replaced.

use datasync::{Consistency, ReadOptions, Revision};
use datasync_raft::records::{
    Compare, CompareOp, CompareTarget, MAX_LEASE_ID, OpResult, TxnOp, TxnOutcome, on_lease,
};
use datasync_raft::{RaftStore, Record, Txn};
use etcd_client::proto::{
    PbCompactionRequest, PbCompactionResponse, PbCompare, PbDeleteRequest, PbDeleteResponse,
    PbKvService, PbPutRequest, PbPutResponse, PbRangeRequest, PbRangeResponse, PbResponseOp,
    PbTargetUnion, PbTxnOpRequest, PbTxnOpResponse, PbTxnRequest, PbTxnResponse,
};
use tonic::{Request, Response, Status};

use crate::convert::{header, key, key_range, kv, prev_kv, signed, status, unsigned};

/// The KV service over one store.
#[derive(Debug, Clone)]
pub(crate) struct Kv {
    pub(crate) store: RaftStore,
}

impl Kv {
    /// Puts the key's current value and/or lease into `op` (a put), as `p` asks; the
    /// compare that the key is still as read. etcd's "key not found" when it is absent.
    async fn keep_current(&self, p: &PbPutRequest, op: &mut TxnOp) -> Result<Compare, Status> {
        let k = key(&p.key)?;
        let range = datasync_raft::KeyRange::key(&k);
        let (_, mut found) = self
            .store
            .range(&range, ReadOptions::new())
            .await
            .map_err(status)?;
        let Some(cur) = found.pop() else {
            return Err(Status::invalid_argument("etcdserver: key not found"));
        };
        if let TxnOp::Put {
            value,
            expires_at_ms,
            ..
        } = op
        {
            if p.ignore_value {
                *value = cur.value.as_bytes().to_vec();
            }
            if p.ignore_lease {
                *expires_at_ms = (cur.lease != 0).then(|| on_lease(cur.lease));
            }
        }
        Ok(Compare {
            range,
            op: CompareOp::Equal,
            target: CompareTarget::ModRevision(cur.mod_revision.0),
        })
    }
}

// etcd's enum values (rpc.proto), as prost keeps them: plain integers.
const SORT_NONE: i32 = 0;
const SORT_DESCEND: i32 = 2;
const TARGET_KEY: i32 = 0;
const TARGET_VERSION: i32 = 1;
const TARGET_CREATE: i32 = 2;
const TARGET_MOD: i32 = 3;
const TARGET_VALUE: i32 = 4;

/// A range request's reading part: the range, and at which revision.
fn read_options(r: &PbRangeRequest) -> Result<ReadOptions, Status> {
    let mut opts = ReadOptions::new();
    if r.serializable {
        opts = opts.consistency(Consistency::Local);
    }
    if r.revision > 0 {
        opts = opts.at(Revision(unsigned(r.revision, "revision")?));
    } else if r.revision < 0 {
        return Err(Status::invalid_argument(
            "etcdserver: mvcc: required revision is a future revision",
        ));
    }
    Ok(opts)
}

/// Filters, sorts, counts and limits `records` as etcd's Range does.
fn shape(r: &PbRangeRequest, mut records: Vec<Record>) -> Result<PbRangeResponse, Status> {
    let min_mod = unsigned(r.min_mod_revision, "min_mod_revision")?;
    let max_mod = unsigned(r.max_mod_revision, "max_mod_revision")?;
    let min_create = unsigned(r.min_create_revision, "min_create_revision")?;
    let max_create = unsigned(r.max_create_revision, "max_create_revision")?;
    // etcd counts the whole range, before these filters.
    let count = records.len();
    records.retain(|rec| {
        let (m, c) = (rec.mod_revision.0, rec.create_revision.0);
        (min_mod == 0 || m >= min_mod)
            && (max_mod == 0 || m <= max_mod)
            && (min_create == 0 || c >= min_create)
            && (max_create == 0 || c <= max_create)
    });
    // etcd: no order but a target other than the key sorts ascending.
    let order = match (r.sort_order, r.sort_target) {
        (SORT_NONE, TARGET_KEY) => SORT_NONE,
        (SORT_NONE, _) => 1,
        (o, _) => o,
    };
    if order != SORT_NONE {
        match r.sort_target {
            TARGET_KEY => {} // already in key order
            TARGET_VERSION => records.sort_by_key(|x| x.version),
            TARGET_CREATE => records.sort_by_key(|x| x.create_revision),
            TARGET_MOD => records.sort_by_key(|x| x.mod_revision),
            TARGET_VALUE => records.sort_by(|a, b| a.value.as_bytes().cmp(b.value.as_bytes())),
            t => return Err(Status::invalid_argument(format!("unknown sort target {t}"))),
        }
        if order == SORT_DESCEND {
            records.reverse();
        }
    }
    let limit = usize::try_from(r.limit.max(0)).unwrap_or(usize::MAX);
    let more = limit > 0 && records.len() > limit;
    if limit > 0 {
        records.truncate(limit);
    }
    let kvs = if r.count_only {
        Vec::new()
    } else {
        records.iter().map(|x| kv(x, r.keys_only)).collect()
    };
    Ok(PbRangeResponse {
        header: None,
        kvs,
        more,
        count: signed(count as u64),
    })
}

/// A compare as the store's; `None` when it holds whatever the keys hold.
///
/// A negative operand (etcd's fields are signed; ours never are, an absent key's
/// zeros included) decides the compare alone: every key's number is greater.
fn compare(c: &PbCompare) -> Result<Option<Compare>, Status> {
    let negative = match &c.target_union {
        Some(
            PbTargetUnion::Version(v)
            | PbTargetUnion::CreateRevision(v)
            | PbTargetUnion::ModRevision(v)
            | PbTargetUnion::Lease(v),
        ) => *v < 0,
        _ => false,
    };
    if negative {
        let range = key_range(&c.key, &c.range_end)?;
        return match c.result {
            // Greater, not equal: always so.
            1 | 3 => Ok(None),
            // Equal, less: never; "version < 0" is a compare that never holds.
            0 | 2 => Ok(Some(Compare {
                range,
                op: CompareOp::Less,
                target: CompareTarget::Version(0),
            })),
            r => Err(Status::invalid_argument(format!(
                "unknown compare result {r}"
            ))),
        };
    }
    compare_unsigned(c).map(Some)
}

fn compare_unsigned(c: &PbCompare) -> Result<Compare, Status> {
    let op = match c.result {
        0 => CompareOp::Equal,
        1 => CompareOp::Greater,
        2 => CompareOp::Less,
        3 => CompareOp::NotEqual,
        r => {
            return Err(Status::invalid_argument(format!(
                "unknown compare result {r}"
            )));
        }
    };
    let n = |v: i64| unsigned(v, "compare operand");
    let target = match (c.target, &c.target_union) {
        (0, Some(PbTargetUnion::Version(v))) => CompareTarget::Version(n(*v)?),
        (1, Some(PbTargetUnion::CreateRevision(v))) => CompareTarget::CreateRevision(n(*v)?),
        (2, Some(PbTargetUnion::ModRevision(v))) => CompareTarget::ModRevision(n(*v)?),
        (3, Some(PbTargetUnion::Value(v))) => CompareTarget::Value(v.clone()),
        // A target with no operand compares with the zero value, as protobuf reads it.
        (0, None) => CompareTarget::Version(0),
        (1, None) => CompareTarget::CreateRevision(0),
        (2, None) => CompareTarget::ModRevision(0),
        (3, None) => CompareTarget::Value(Vec::new()),
        (4, Some(PbTargetUnion::Lease(v))) => CompareTarget::Lease(n(*v)?),
        (4, None) => CompareTarget::Lease(0),
        (t, _) => {
            return Err(Status::invalid_argument(format!(
                "compare target {t} does not match its operand"
            )));
        }
    };
    Ok(Compare {
        range: key_range(&c.key, &c.range_end)?,
        op,
        target,
    })
}

fn put_op(p: &PbPutRequest) -> Result<TxnOp, Status> {
    let lease = match p.lease {
        0 => None,
        id => Some(on_lease(
            u64::try_from(id)
                .ok()
                .filter(|id| *id <= MAX_LEASE_ID)
                .ok_or_else(|| Status::not_found("etcdserver: requested lease not found"))?,
        )),
    };
    if p.ignore_value && !p.value.is_empty() {
        return Err(Status::invalid_argument("etcdserver: value is provided"));
    }
    if p.ignore_lease && p.lease != 0 {
        return Err(Status::invalid_argument("etcdserver: lease is provided"));
    }
    Ok(TxnOp::Put {
        key: key(&p.key)?.as_str().to_owned(),
        value: p.value.clone(),
        expires_at_ms: lease,
        prev_kv: p.prev_kv,
    })
}

fn delete_op(d: &PbDeleteRequest) -> Result<TxnOp, Status> {
    Ok(TxnOp::Delete {
        range: key_range(&d.key, &d.range_end)?,
        prev_kv: d.prev_kv,
    })
}

/// A branch's writes for the store, each range's key range, and whether it reads the
/// state before the branch's writes (no write precedes it) or after them.
///
/// Why ranges are read after the txn rather than in it: the store keeps a txn's
/// outcome for exactly-once retries and replicates it with the client sessions, so it
/// carries no reads; the history holds the state just before and at the txn's revision.
/// A range between two writes of one branch would need the state between them, which
/// no revision has: refused.
struct Branch {
    writes: Vec<TxnOp>,
    /// `(range, before the writes)` per range op, in order.
    ranges: Vec<(datasync_raft::KeyRange, bool)>,
}

fn branch(ops: &[etcd_client::proto::PbTxnRequestOp]) -> Result<Branch, Status> {
    let is_write = |op: &etcd_client::proto::PbTxnRequestOp| {
        !matches!(op.request, Some(PbTxnOpRequest::RequestRange(_)))
    };
    let first_write = ops.iter().position(is_write);
    let last_write = ops.iter().rposition(is_write);
    let mut b = Branch {
        writes: Vec::new(),
        ranges: Vec::new(),
    };
    for (i, op) in ops.iter().enumerate() {
        match &op.request {
            Some(PbTxnOpRequest::RequestPut(p)) if p.ignore_value || p.ignore_lease => {
                return Err(Status::unimplemented(
                    "etcdserver: ignore_value and ignore_lease inside a txn are not supported \
                     (a Put request takes them)",
                ));
            }
            Some(PbTxnOpRequest::RequestPut(p)) => b.writes.push(put_op(p)?),
            Some(PbTxnOpRequest::RequestDeleteRange(d)) => b.writes.push(delete_op(d)?),
            Some(PbTxnOpRequest::RequestRange(r)) => {
                if r.revision != 0 {
                    return Err(Status::unimplemented(
                        "etcdserver: a range at a past revision inside a txn is not supported",
                    ));
                }
                let before = first_write.is_none_or(|w| i < w);
                let after = last_write.is_none_or(|w| i > w);
                if !before && !after {
                    return Err(Status::unimplemented(
                        "etcdserver: a range between two writes of one txn is not supported \
                         (put it before or after them)",
                    ));
                }
                b.ranges.push((key_range(&r.key, &r.range_end)?, before));
            }
            Some(PbTxnOpRequest::RequestTxn(_)) => {
                return Err(Status::unimplemented(
                    "etcdserver: nested transactions are not supported",
                ));
            }
            None => return Err(Status::invalid_argument("etcdserver: empty request op")),
        }
    }
    Ok(b)
}

/// The response ops of the branch applied: writes from the outcome, ranges read at
/// the txn's revision (or, before its writes, the one before it when it changed
/// anything).
async fn responses(
    store: &RaftStore,
    requests: &[etcd_client::proto::PbTxnRequestOp],
    plan: &Branch,
    out: &TxnOutcome,
) -> Result<Vec<PbResponseOp>, Status> {
    let changed = out.results.iter().any(|r| match r {
        OpResult::Put(_) => true,
        OpResult::Deleted { count, .. } => *count > 0,
    });
    let (mut results, mut ranges) = (out.results.iter(), plan.ranges.iter());
    let mut ops = Vec::with_capacity(requests.len());
    for req in requests {
        let h = header(store, out.revision);
        let response = match &req.request {
            Some(PbTxnOpRequest::RequestRange(r)) => {
                let Some((range, before)) = ranges.next() else {
                    return Err(Status::internal("a txn range without its plan"));
                };
                let at = if *before && changed {
                    out.revision - 1
                } else {
                    out.revision
                };
                let opts = ReadOptions::new()
                    .at(Revision(at))
                    .consistency(Consistency::Local);
                // The writes are applied: a failed read must not read as "not applied"
                // (a client would retry them).
                let (_, records) = store.range(range, opts).await.map_err(|e| {
                    Status::internal(format!(
                        "etcdserver: the txn was applied at revision {}, but its range \
                         reads could not be served: {}",
                        out.revision,
                        datasync::error_chain(&e)
                    ))
                })?;
                let mut resp = shape(r, records)?;
                resp.header = h;
                PbTxnOpResponse::ResponseRange(resp)
            }
            request => match (request, results.next()) {
                (Some(PbTxnOpRequest::RequestPut(_)), Some(OpResult::Put(prev))) => {
                    PbTxnOpResponse::ResponsePut(PbPutResponse {
                        header: h,
                        prev_kv: prev.as_ref().map(prev_kv),
                    })
                }
                (
                    Some(PbTxnOpRequest::RequestDeleteRange(_)),
                    Some(OpResult::Deleted { count, prev }),
                ) => PbTxnOpResponse::ResponseDeleteRange(PbDeleteResponse {
                    header: h,
                    deleted: signed(*count),
                    prev_kvs: prev.iter().map(prev_kv).collect(),
                }),
                _ => return Err(Status::internal("a txn result does not match its request")),
            },
        };
        ops.push(PbResponseOp {
            response: Some(response),
        });
    }
    Ok(ops)
}

#[tonic::async_trait]
impl PbKvService for Kv {
    async fn range(
        &self,
        request: Request<PbRangeRequest>,
    ) -> Result<Response<PbRangeResponse>, Status> {
        let r = request.into_inner();
        let range = key_range(&r.key, &r.range_end)?;
        let opts = read_options(&r)?;
        let past = opts.revision.is_some();
        let (rev, records) = self.store.range(&range, opts).await.map_err(status)?;
        let mut resp = shape(&r, records)?;
        // The header carries the store's revision, a read at a past one included.
        let now = if past { self.store.revision().0 } else { rev.0 };
        resp.header = header(&self.store, now);
        Ok(Response::new(resp))
    }

    /// With `ignore_value` or `ignore_lease`, a compare-and-swap on the key's mod
    /// revision: the current value or lease read, then written back only if the key
    /// did not change meanwhile (else read again).
    async fn put(&self, request: Request<PbPutRequest>) -> Result<Response<PbPutResponse>, Status> {
        const ATTEMPTS: usize = 64;
        let p = request.into_inner();
        let mut op = put_op(&p)?;
        let mut out = None;
        for _ in 0..ATTEMPTS {
            let compares = if p.ignore_value || p.ignore_lease {
                vec![self.keep_current(&p, &mut op).await?]
            } else {
                Vec::new()
            };
            let txn = Txn {
                compares,
                success: vec![op.clone()],
                ..Txn::default()
            };
            let done = self.store.record_txn(txn).await.map_err(status)?;
            if done.succeeded {
                out = Some(done);
                break;
            }
        }
        let out = out.ok_or_else(|| {
            Status::aborted(format!(
                "etcdserver: the key changed under each of {ATTEMPTS} attempts to keep its \
                 value or lease"
            ))
        })?;
        let prev = match out.results.first() {
            Some(OpResult::Put(prev)) => prev.as_ref().map(prev_kv),
            _ => return Err(Status::internal("a put applied as something else")),
        };
        Ok(Response::new(PbPutResponse {
            header: header(&self.store, out.revision),
            prev_kv: prev,
        }))
    }

    async fn delete_range(
        &self,
        request: Request<PbDeleteRequest>,
    ) -> Result<Response<PbDeleteResponse>, Status> {
        let d = request.into_inner();
        let txn = Txn {
            success: vec![delete_op(&d)?],
            ..Txn::default()
        };
        let out = self.store.record_txn(txn).await.map_err(status)?;
        let Some(OpResult::Deleted { count, prev }) = out.results.first() else {
            return Err(Status::internal("a delete applied as something else"));
        };
        Ok(Response::new(PbDeleteResponse {
            header: header(&self.store, out.revision),
            deleted: signed(*count),
            prev_kvs: prev.iter().map(prev_kv).collect(),
        }))
    }

    async fn txn(&self, request: Request<PbTxnRequest>) -> Result<Response<PbTxnResponse>, Status> {
        let t = request.into_inner();
        let (success, failure) = (branch(&t.success)?, branch(&t.failure)?);
        let txn = Txn {
            compares: t
                .compare
                .iter()
                .filter_map(|c| compare(c).transpose())
                .collect::<Result<_, _>>()?,
            success: success.writes.clone(),
            failure: failure.writes.clone(),
        };
        let out = self.store.record_txn(txn).await.map_err(status)?;
        let (requests, plan) = if out.succeeded {
            (&t.success, &success)
        } else {
            (&t.failure, &failure)
        };
        Ok(Response::new(PbTxnResponse {
            header: header(&self.store, out.revision),
            succeeded: out.succeeded,
            responses: responses(&self.store, requests, plan, &out).await?,
        }))
    }

    type RangeStreamStream =
        futures_util::stream::Empty<Result<etcd_client::proto::PbRangeStreamResponse, Status>>;

    async fn range_stream(
        &self,
        _request: Request<PbRangeRequest>,
    ) -> Result<Response<Self::RangeStreamStream>, Status> {
        Err(Status::unimplemented(
            "etcdserver: RangeStream is not supported (use Range)",
        ))
    }

    /// Replicated to every member; `physical` changes nothing here: the history is
    /// gone once this member has applied the compaction, before the answer.
    async fn compact(
        &self,
        request: Request<PbCompactionRequest>,
    ) -> Result<Response<PbCompactionResponse>, Status> {
        let revision = unsigned(request.into_inner().revision, "revision")?;
        self.store
            .compact(Revision(revision))
            .await
            .map_err(status)?;
        Ok(Response::new(PbCompactionResponse {
            header: header(&self.store, self.store.revision().0),
        }))
    }
}
