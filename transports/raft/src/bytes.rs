//! serde adapters that write values as byte strings (`serde_bytes`) inside the shapes
//! serde would otherwise write byte by byte: one serializer call per value instead of
//! one per byte. bincode writes a byte string exactly as it wrote the sequence of
//! bytes (a length, then the bytes), so what was stored before reads the same.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_bytes::{ByteBuf, Bytes};

/// `Vec<(K, Vec<u8>)>`: keyed records (a snapshot's keys and sessions).
pub(crate) mod pairs {
    use super::*;

    pub(crate) fn serialize<K: Serialize, S: Serializer>(
        v: &[(K, Vec<u8>)],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|(k, b)| (k, Bytes::new(b))))
    }

    pub(crate) fn deserialize<'de, K: DeserializeOwned, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<(K, Vec<u8>)>, D::Error> {
        let v: Vec<(K, ByteBuf)> = Deserialize::deserialize(d)?;
        Ok(v.into_iter().map(|(k, b)| (k, b.into_vec())).collect())
    }
}

/// `Option<(Vec<u8>, u64)>`: a value and its revision (a failed compare-and-swap's).
pub(crate) mod value_rev {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(
        v: &Option<(Vec<u8>, u64)>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        v.as_ref().map(|(b, r)| (Bytes::new(b), *r)).serialize(s)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<(Vec<u8>, u64)>, D::Error> {
        let v: Option<(ByteBuf, u64)> = Deserialize::deserialize(d)?;
        Ok(v.map(|(b, r)| (b.into_vec(), r)))
    }
}

/// openraft's snapshot chunk, whose `data` it derives as a sequence of bytes.
pub(crate) mod chunk {
    use super::*;
    use crate::types::{NodeId, TypeConfig};
    use openraft::raft::InstallSnapshotRequest;
    use openraft::{BasicNode, SnapshotMeta, Vote};

    #[derive(Serialize)]
    struct Out<'a> {
        vote: &'a Vote<NodeId>,
        meta: &'a SnapshotMeta<NodeId, BasicNode>,
        offset: u64,
        data: &'a Bytes,
        done: bool,
    }

    #[derive(Deserialize)]
    struct In {
        vote: Vote<NodeId>,
        meta: SnapshotMeta<NodeId, BasicNode>,
        offset: u64,
        data: ByteBuf,
        done: bool,
    }

    pub(crate) fn serialize<S: Serializer>(
        r: &InstallSnapshotRequest<TypeConfig>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        Out {
            vote: &r.vote,
            meta: &r.meta,
            offset: r.offset,
            data: Bytes::new(&r.data),
            done: r.done,
        }
        .serialize(s)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<InstallSnapshotRequest<TypeConfig>, D::Error> {
        let i = In::deserialize(d)?;
        Ok(InstallSnapshotRequest {
            vote: i.vote,
            meta: i.meta,
            offset: i.offset,
            data: i.data.into_vec(),
            done: i.done,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::types::{NodeId, TypeConfig};
    use openraft::raft::InstallSnapshotRequest;

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Adapted {
        #[serde(with = "pairs")]
        kv: Vec<(String, Vec<u8>)>,
        #[serde(with = "value_rev")]
        current: Option<(Vec<u8>, u64)>,
        #[serde(with = "chunk")]
        chunk: InstallSnapshotRequest<TypeConfig>,
    }

    #[derive(Serialize)]
    struct Plain {
        kv: Vec<(String, Vec<u8>)>,
        current: Option<(Vec<u8>, u64)>,
        chunk: InstallSnapshotRequest<TypeConfig>,
    }

    /// Each adapter writes the bytes serde's derive wrote (so stored snapshots, logs
    /// and peers' chunks read the same), and reads them back.
    #[test]
    fn adapters_keep_the_encoding() {
        let chunk = InstallSnapshotRequest::<TypeConfig> {
            vote: openraft::Vote::<NodeId>::new(3, 1),
            meta: Default::default(),
            offset: 5,
            data: vec![0, 1, 2, 254, 255],
            done: true,
        };
        let kv = vec![("k/é".to_owned(), vec![9u8; 40]), ("z".to_owned(), vec![])];
        let current = Some((b"value".to_vec(), 7));
        let adapted = Adapted {
            kv: kv.clone(),
            current: current.clone(),
            chunk: chunk.clone(),
        };
        let bytes = bincode::serialize(&adapted).unwrap();
        let plain = Plain { kv, current, chunk };
        assert_eq!(bytes, bincode::serialize(&plain).unwrap());
        assert_eq!(bincode::deserialize::<Adapted>(&bytes).unwrap(), adapted);
    }
}
