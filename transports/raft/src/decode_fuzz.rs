//! Decoder hardening: every decoder of bytes from the network or the disk (commands,
//! wire requests and replies, the handshake, log frames, stored records, snapshot
//! payloads, client sessions) is fed
//! arbitrary and mutated inputs, and must answer each with a value or an error, never a
//! panic, a hang or an allocation beyond its input's claims (bincode reads from slices,
//! which check a length against the bytes left before allocating).
//!
//! `DATASYNC_FUZZ_INPUTS` sets the inputs per decoder (default 1,000,000); the seed is
//! fixed per decoder, so a failure repeats.

use openraft::raft::{AppendEntriesRequest, VoteRequest};
use openraft::{CommittedLeaderId, EntryPayload, Vote};

use crate::network::wire::{
    ClientOp, ClientReply, Envelope, Read, Reply, Request, WireItem, WireTxnOp,
};
use crate::types::{Command, Entry, LogId, Outcome};

fn inputs() -> usize {
    std::env::var("DATASYNC_FUZZ_INPUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

/// Lengths and counts that make a decoder allocate or index wrongly if it trusts them.
const INTERESTING: [u64; 8] = [
    0,
    1,
    0x7f,
    0xff,
    u32::MAX as u64,
    u32::MAX as u64 + 1,
    i64::MAX as u64,
    u64::MAX,
];

/// One input: a seed mutated 1–4 times, or (one in ten) random bytes.
fn mutate(rng: &mut fastrand::Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    if rng.u8(..10) == 0 {
        let len = rng.usize(..64);
        return (0..len).map(|_| rng.u8(..)).collect();
    }
    let mut b = seeds[rng.usize(..seeds.len())].clone();
    for _ in 0..rng.usize(1..=4) {
        if b.is_empty() {
            b.push(rng.u8(..));
            continue;
        }
        let at = rng.usize(..b.len());
        match rng.u8(..6) {
            0 => b[at] ^= 1 << rng.u8(..8),
            1 => b[at] = rng.u8(..),
            2 => {
                let v = INTERESTING[rng.usize(..INTERESTING.len())].to_le_bytes();
                let n = v.len().min(b.len() - at);
                let width = [1, 4, 8][rng.usize(..3)].min(n);
                b[at..at + width].copy_from_slice(&v[..width]);
            }
            3 => b.truncate(at),
            4 => {
                let end = rng.usize(at..=b.len());
                let dup = b[at..end].to_vec();
                let to = rng.usize(..=b.len());
                b.splice(to..to, dup);
            }
            _ => {
                let extra: Vec<u8> = (0..rng.usize(1..16)).map(|_| rng.u8(..)).collect();
                b.splice(at..at, extra);
            }
        }
    }
    b
}

/// Runs `decode` on [`inputs`] inputs made from `seeds`; returns how many decoded.
fn fuzz(seed: u64, seeds: &[Vec<u8>], mut decode: impl FnMut(&[u8]) -> bool) -> usize {
    let mut rng = fastrand::Rng::with_seed(seed);
    for s in seeds {
        assert!(decode(s), "a seed input must decode");
    }
    (0..inputs())
        .filter(|_| decode(&mutate(&mut rng, seeds)))
        .count()
}

fn entry(i: u64, cmd: Command) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(3, 1), i),
        payload: EntryPayload::Normal(cmd),
    }
}

fn commands() -> Vec<Command> {
    let put = Command::Put {
        key: "cfg/é/1".into(),
        value: b"value".to_vec(),
        expires_at_ms: Some(1_700_000_000_000),
    };
    vec![
        put.clone(),
        Command::Cas {
            key: "k".into(),
            expect: Some(9),
            value: vec![0; 20],
            expires_at_ms: None,
        },
        Command::Delete {
            key: "p/".into(),
            prefix: true,
        },
        Command::Expire {
            keys: vec![("a".into(), 1), ("b".into(), 2)],
        },
        Command::Batch(vec![
            put,
            Command::Delete {
                key: "x".into(),
                prefix: false,
            },
        ]),
    ]
}

fn ser<T: serde::Serialize>(v: &T) -> Vec<u8> {
    bincode::serialize(v).expect("seed serializes")
}

/// Each body in an envelope of its own, encoded.
fn envelopes<T: serde::Serialize>(bodies: Vec<T>) -> Vec<Vec<u8>> {
    bodies
        .into_iter()
        .enumerate()
        .map(|(id, body)| {
            ser(&Envelope {
                id: id as u64,
                body,
            })
        })
        .collect()
}

#[test]
fn commands_decode_or_fail_cleanly() {
    let seeds: Vec<_> = commands().iter().map(ser).collect();
    let ok = fuzz(1, &seeds, |b| bincode::deserialize::<Command>(b).is_ok());
    assert!(
        ok > 0,
        "no mutated command decoded: the mutations are too blunt"
    );
}

#[test]
fn wire_requests_decode_or_fail_cleanly() {
    let entries: Vec<Entry> = commands()
        .into_iter()
        .enumerate()
        .map(|(i, c)| entry(i as u64 + 5, c))
        .collect();
    let bodies = vec![
        Request::Append(AppendEntriesRequest {
            vote: Vote::new_committed(3, 1),
            prev_log_id: Some(LogId::new(CommittedLeaderId::new(3, 1), 4)),
            entries,
            leader_commit: Some(LogId::new(CommittedLeaderId::new(2, 1), 3)),
        }),
        Request::Vote(VoteRequest::new(
            Vote::new(4, 2),
            Some(LogId::new(CommittedLeaderId::new(3, 1), 9)),
        )),
        Request::Propose(commands().remove(4)),
        Request::Snapshot(openraft::raft::InstallSnapshotRequest {
            vote: Vote::new_committed(3, 1),
            meta: Default::default(),
            offset: 4096,
            data: vec![7; 64],
            done: false,
        }),
        Request::Propose(Command::Once {
            id: crate::types::RequestId {
                client: 3,
                seq: 2,
                first_unacked: 1,
            },
            cmd: Box::new(commands().remove(0)),
        }),
        Request::Client(
            ClientOp::Cas {
                key: "k".into(),
                expect: None,
                value: b"v".to_vec(),
                ttl: Some(std::time::Duration::from_millis(1500)),
            },
            Some(crate::types::RequestId {
                client: 99,
                seq: 7,
                first_unacked: 5,
            }),
        ),
        Request::Client(
            ClientOp::List {
                prefix: "p/日".into(),
                read: Read {
                    linearizable: true,
                    revision: Some(7),
                },
            },
            None,
        ),
        Request::Client(
            ClientOp::Txn {
                when: vec![("a".into(), Some(3)), ("b".into(), None)],
                then: vec![
                    WireTxnOp::Put {
                        key: "a".into(),
                        value: b"v".to_vec(),
                        ttl: Some(std::time::Duration::from_millis(1500)),
                    },
                    WireTxnOp::Delete {
                        key: "c/".into(),
                        prefix: true,
                    },
                ],
                otherwise: vec![WireTxnOp::Delete {
                    key: "d".into(),
                    prefix: false,
                }],
            },
            Some(crate::types::RequestId {
                client: 99,
                seq: 8,
                first_unacked: 5,
            }),
        ),
        Request::Watch {
            name: "w".into(),
            prefixes: vec!["a/".into(), "b/".into()],
            queue_capacity: 64,
            resume: Some(7),
        },
    ];
    let seeds = envelopes(bodies);
    let ok = fuzz(2, &seeds, |b| {
        bincode::deserialize::<Envelope<Request>>(b).is_ok()
    });
    assert!(ok > 0);
}

#[test]
fn wire_replies_decode_or_fail_cleanly() {
    let kv = (
        "k".to_owned(),
        serde_bytes::ByteBuf::from(b"v".to_vec()),
        4u64,
    );
    let bodies = vec![
        Reply::Proposed(Ok((
            Outcome::Batch(vec![
                Outcome::Written { revision: 3 },
                Outcome::Conflict {
                    current: Some((b"x".to_vec(), 2)),
                },
                Outcome::Invalid("bad".into()),
            ]),
            11,
        ))),
        Reply::Client(Ok(ClientReply::Listing {
            revision: 9,
            values: vec![kv.clone(), kv.clone()],
        })),
        Reply::Watch(WireItem::Resync {
            revision: 5,
            reason: datasync::ResyncReason::Initial,
            prefixes: vec![("a/".into(), vec![kv])],
        }),
        Reply::Watch(WireItem::Change {
            revision: 6,
            changes: vec![(
                "a/1".into(),
                false,
                Some(serde_bytes::ByteBuf::from(b"n".to_vec())),
                None,
            )],
        }),
        Reply::ReadIndex(Ok(77)),
    ];
    let seeds = envelopes(bodies);
    let ok = fuzz(3, &seeds, |b| {
        bincode::deserialize::<Envelope<Reply>>(b).is_ok()
    });
    assert!(ok > 0);
}

#[test]
fn wal_frames_decode_or_fail_cleanly() {
    let entries: Vec<Entry> = commands()
        .into_iter()
        .enumerate()
        .map(|(i, c)| entry(i as u64, c))
        .collect();
    let seeds = vec![
        crate::storage::wal::encode(&entries).expect("encodes"),
        crate::storage::wal::encode(&entries[..1]).expect("encodes"),
    ];
    let ok = fuzz(4, &seeds, crate::storage::wal::decode_frame_for_fuzz);
    assert!(ok > 0);
}

#[test]
fn handshake_messages_decode_or_fail_cleanly() {
    use crate::network::auth::{Challenge, Hello, Proof};
    let seeds = vec![
        ser(&Hello {
            magic: crate::network::auth::MAGIC,
            version: crate::network::auth::VERSION,
            nonce: [7; 32],
        }),
        ser(&Challenge {
            nonce: [9; 32],
            proof: vec![1; 32],
        }),
        ser(&Proof { proof: vec![2; 32] }),
    ];
    let ok = fuzz(5, &seeds, |b| {
        let hello = bincode::deserialize::<Hello>(b).is_ok();
        let challenge = bincode::deserialize::<Challenge>(b).is_ok();
        bincode::deserialize::<Proof>(b).is_ok() || hello || challenge
    });
    assert!(ok > 0);
}

#[test]
fn stored_records_decode_or_fail_cleanly() {
    use crate::storage::tables::Stored;
    let rec = |expires: u64, v: &'static str| Stored {
        mod_rev: 5,
        create_rev: 3,
        expires_at_ms: expires,
        version: 2,
        versioned: true,
        value: datasync::Value::from(v),
    };
    // A record as stores before versions wrote it.
    let mut old = Vec::new();
    for w in [5u64, 3, 0] {
        old.extend_from_slice(&w.to_le_bytes());
    }
    old.extend_from_slice(b"old");
    let seeds = vec![
        old,
        rec(0, "value").encode(),
        rec(
            crate::storage::lease::word(std::time::Duration::from_secs(5)),
            "",
        )
        .encode(),
    ];
    let ok = fuzz(6, &seeds, |b| Stored::decode(b).is_ok());
    assert!(ok > 0);
}

#[test]
fn snapshot_payloads_decode_or_fail_cleanly() {
    let seed = crate::storage::sm::payload_seed();
    let ok = fuzz(7, &[seed], crate::storage::sm::payload_decodes);
    assert!(ok > 0);
}

#[test]
fn client_sessions_decode_or_fail_cleanly() {
    use crate::storage::session::Sessions;
    use crate::types::RequestId;
    let mut s = Sessions::default();
    for seq in 1..4 {
        let id = RequestId {
            client: 11,
            seq,
            first_unacked: 1,
        };
        s.record(&id, Outcome::Written { revision: seq }, seq);
    }
    s.record(
        &RequestId {
            client: 11,
            seq: 4,
            first_unacked: 1,
        },
        Outcome::Conflict {
            current: Some((b"x".to_vec(), 2)),
        },
        4,
    );
    let seeds: Vec<Vec<u8>> = s.take_dirty().into_iter().filter_map(|(_, b)| b).collect();
    let ok = fuzz(8, &seeds, |b| Sessions::load([(1, b.to_vec())]).is_ok());
    assert!(ok > 0);
}
