//! Peer authentication with HMAC-SHA256, and frame encryption with AES-256-GCM, both
//! from `ring`.
//!
//! Handshake (both sides prove they hold the cluster secret, neither reveals it):
//! 1. client → server: `Hello { magic, version, nonce_c }`
//! 2. server → client: `Challenge { nonce_s, proof_s = HMAC(secret, "server" ‖ nonce_c ‖ nonce_s) }`
//! 3. client checks `proof_s`, then → server: `proof_c = HMAC(secret, "client" ‖ nonce_c ‖ nonce_s)`
//! 4. server checks `proof_c` and sends its first sealed frame (the accept).
//!
//! Then every frame is `AES-256-GCM(k_dir, nonce = seq, body)`, with one key per
//! direction derived from the secret and both nonces (fresh for each connection), and
//! `seq` counting from 0 on both ends: a frame cannot be read, forged, altered, replayed
//! or reordered, and a key never sees a nonce twice.
//!
//! Why encryption keyed from the secret rather than TLS: a cluster needs no
//! certificates (the secret file is all there is to set up, as before), values never
//! cross the network in clear, and AES-GCM costs less per byte than the HMAC it
//! replaced. What it does not give: forward secrecy against a later leak of the secret
//! (whoever recorded the traffic and learns the secret can derive the session keys),
//! and per-member identities (every holder of the secret is a member). Where either
//! matters, run the members over a VPN or a TLS tunnel as well.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use ring::{aead, hmac};
use serde::{Deserialize, Serialize};

use super::error::NetError;

/// The shortest secret accepted, in bytes.
pub const MIN_SECRET: usize = 16;

/// The shared cluster secret. Every node, and every remote client, must hold the same one.
#[derive(Clone)]
pub struct Secret(Arc<hmac::Key>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A secret was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// Shorter than [`MIN_SECRET`] bytes.
    #[error("the cluster secret is {0} bytes; at least {MIN_SECRET} are needed")]
    TooShort(usize),
    /// The secret file could not be read.
    #[error("cannot read the cluster secret from {path}")]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl Secret {
    /// A secret from bytes (at least [`MIN_SECRET`]).
    pub fn new(bytes: impl AsRef<[u8]>) -> Result<Secret, SecretError> {
        let bytes = bytes.as_ref();
        if bytes.len() < MIN_SECRET {
            return Err(SecretError::TooShort(bytes.len()));
        }
        Ok(Secret(Arc::new(hmac::Key::new(hmac::HMAC_SHA256, bytes))))
    }

    /// A secret read from a file (surrounding whitespace trimmed).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Secret, SecretError> {
        let path = path.as_ref();
        let text = std::fs::read(path).map_err(|source| SecretError::File {
            path: path.to_owned(),
            source,
        })?;
        Secret::new(text.trim_ascii())
    }

    fn proof(&self, role: &[u8], nonce_c: &[u8; 32], nonce_s: &[u8; 32]) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.0);
        ctx.update(role);
        ctx.update(nonce_c);
        ctx.update(nonce_s);
        ctx.sign()
    }

    fn check(&self, role: &[u8], nonce_c: &[u8; 32], nonce_s: &[u8; 32], proof: &[u8]) -> bool {
        let mut msg = Vec::with_capacity(role.len() + 64);
        msg.extend_from_slice(role);
        msg.extend_from_slice(nonce_c);
        msg.extend_from_slice(nonce_s);
        hmac::verify(&self.0, &msg, proof).is_ok()
    }

    /// The session keys, client → server and server → client.
    fn session_keys(&self, nonce_c: &[u8; 32], nonce_s: &[u8; 32]) -> (hmac::Key, hmac::Key) {
        let key = |dir: &[u8]| {
            hmac::Key::new(
                hmac::HMAC_SHA256,
                self.proof(dir, nonce_c, nonce_s).as_ref(),
            )
        };
        (key(b"c2s"), key(b"s2c"))
    }
}

pub(crate) const MAGIC: [u8; 8] = *b"DSRAFT01";
/// The protocol version; 2: client writes carry request ids (`Request::Client`);
/// 3: errors keep their type (`WireError`, `ServiceError`); 4: frames are encrypted;
/// 5: stored records carry their version and the log carries transactions (a member
/// of version 4 would misread both in a snapshot or an entry); 6: registering and
/// promoting members (etcd's `member add` and `member promote`); 7: watches resume
/// after a revision (`Request::Watch::resume`, `WireItem::Resumed`); 8: member update
/// (`Request::Update`) and lease compares in the log (`CompareTarget::Lease`); 9:
/// remote clients' transactions (`ClientOp::Txn`).
pub(crate) const VERSION: u16 = 9;

/// Step 1, client → server.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Hello {
    pub(crate) magic: [u8; 8],
    pub(crate) version: u16,
    pub(crate) nonce: [u8; 32],
}

/// Step 2, server → client.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Challenge {
    pub(crate) nonce: [u8; 32],
    pub(crate) proof: Vec<u8>,
}

/// Step 3, client → server.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Proof {
    pub(crate) proof: Vec<u8>,
}

pub(crate) fn nonce() -> Result<[u8; 32], NetError> {
    let mut n = [0u8; 32];
    crate::rt::fill_random(&mut n).ok_or(NetError::Random)?;
    Ok(n)
}

/// The client's side: after `Hello`, checks the challenge and answers it.
pub(crate) fn answer(
    secret: &Secret,
    nonce_c: &[u8; 32],
    ch: &Challenge,
) -> Result<(Proof, Sealer, Opener), NetError> {
    if !secret.check(b"server", nonce_c, &ch.nonce, &ch.proof) {
        return Err(NetError::AuthFailed(
            "the server does not hold the cluster secret",
        ));
    }
    let proof = Proof {
        proof: secret
            .proof(b"client", nonce_c, &ch.nonce)
            .as_ref()
            .to_vec(),
    };
    let (up, down) = secret.session_keys(nonce_c, &ch.nonce);
    Ok((proof, Sealer::new(up), Opener::new(down)))
}

/// The server's side: a challenge for `hello`, and how to check the answer.
pub(crate) fn challenge(secret: &Secret, hello: &Hello) -> Result<(Challenge, [u8; 32]), NetError> {
    if hello.magic != MAGIC {
        return Err(NetError::AuthFailed("not a datasync raft peer"));
    }
    if hello.version != VERSION {
        return Err(NetError::Version(hello.version));
    }
    let nonce_s = nonce()?;
    let proof = secret
        .proof(b"server", &hello.nonce, &nonce_s)
        .as_ref()
        .to_vec();
    Ok((
        Challenge {
            nonce: nonce_s,
            proof,
        },
        nonce_s,
    ))
}

/// The server's side: checks the client's proof.
pub(crate) fn accept(
    secret: &Secret,
    nonce_c: &[u8; 32],
    nonce_s: &[u8; 32],
    proof: &Proof,
) -> Result<(Sealer, Opener), NetError> {
    if !secret.check(b"client", nonce_c, nonce_s, &proof.proof) {
        return Err(NetError::AuthFailed(
            "the peer does not hold the cluster secret",
        ));
    }
    let (up, down) = secret.session_keys(nonce_c, nonce_s);
    Ok((Sealer::new(down), Opener::new(up)))
}

/// A direction's AES-256-GCM key, from its HMAC session key's tag (32 bytes).
fn aead_key(key: &hmac::Key) -> aead::LessSafeKey {
    let bytes = hmac::sign(key, b"aes-256-gcm frames");
    // 32 bytes is AES-256's key length: this cannot fail.
    let unbound = aead::UnboundKey::new(&aead::AES_256_GCM, bytes.as_ref())
        .unwrap_or_else(|_| unreachable!("an HMAC-SHA256 tag is a valid AES-256 key"));
    aead::LessSafeKey::new(unbound)
}

/// The nonce of frame `seq`: unique per key, as each key serves one direction of one
/// connection and `seq` only grows.
fn frame_nonce(seq: u64) -> aead::Nonce {
    let mut n = [0u8; aead::NONCE_LEN];
    n[4..].copy_from_slice(&seq.to_be_bytes());
    aead::Nonce::assume_unique_for_key(n)
}

/// Seals (encrypts and tags) outgoing frames of one direction.
pub(crate) struct Sealer {
    key: aead::LessSafeKey,
    seq: u64,
}

impl Sealer {
    fn new(key: hmac::Key) -> Self {
        Sealer {
            key: aead_key(&key),
            seq: 0,
        }
    }

    pub(crate) fn seal(&mut self, body: &[u8]) -> Bytes {
        let mut out = BytesMut::with_capacity(body.len() + aead::AES_256_GCM.tag_len());
        out.put_slice(body);
        let tag = self
            .key
            .seal_in_place_separate_tag(frame_nonce(self.seq), aead::Aad::empty(), &mut out)
            // ring fails only past GCM's per-message limit (64 GiB), far above MAX_FRAME.
            .unwrap_or_else(|_| unreachable!("a frame is below AES-GCM's message limit"));
        out.put_slice(tag.as_ref());
        self.seq += 1;
        out.freeze()
    }
}

/// Opens (checks and decrypts) incoming frames of one direction.
pub(crate) struct Opener {
    key: aead::LessSafeKey,
    seq: u64,
}

impl Opener {
    fn new(key: hmac::Key) -> Self {
        Opener {
            key: aead_key(&key),
            seq: 0,
        }
    }

    /// The body of a sealed frame, if it is the next one of this direction, whole and
    /// sealed with this direction's key.
    pub(crate) fn open(&mut self, mut frame: BytesMut) -> Result<Bytes, NetError> {
        let len = self
            .key
            .open_in_place(frame_nonce(self.seq), aead::Aad::empty(), &mut frame)
            .map_err(|_| NetError::BadFrame)?
            .len();
        self.seq += 1;
        frame.truncate(len);
        Ok(frame.freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Ends = (Sealer, Opener);

    fn pair(a: &Secret, b: &Secret) -> Result<(Ends, Ends), NetError> {
        let nonce_c = nonce()?;
        let hello = Hello {
            magic: MAGIC,
            version: VERSION,
            nonce: nonce_c,
        };
        let (ch, nonce_s) = challenge(b, &hello)?;
        let (proof, cs, co) = answer(a, &nonce_c, &ch)?;
        let (ss, so) = accept(b, &nonce_c, &nonce_s, &proof)?;
        Ok(((cs, co), (ss, so)))
    }

    #[test]
    fn same_secret_talks_and_frames_check() {
        let s = Secret::new("0123456789abcdef").expect("secret");
        let ((mut cs, mut co), (mut ss, mut so)) = pair(&s, &s).expect("handshake");
        let f = cs.seal(b"hello");
        assert_eq!(
            &so.open(BytesMut::from(&f[..])).expect("open")[..],
            b"hello"
        );
        let g = ss.seal(b"back");
        assert_eq!(&co.open(BytesMut::from(&g[..])).expect("open")[..], b"back");
        // Replayed: the sequence number is old.
        assert!(so.open(BytesMut::from(&f[..])).is_err());
        // Encrypted: the body is not on the wire.
        let plain = b"a value nobody else may read";
        let sealed = cs.seal(plain);
        assert!(!sealed.windows(8).any(|w| plain.windows(8).any(|p| p == w)));
        assert_eq!(
            &so.open(BytesMut::from(&sealed[..])).expect("open")[..],
            plain
        );
        // Altered, or cut short.
        let mut h = BytesMut::from(&cs.seal(b"value")[..]);
        h[2] ^= 1;
        assert!(so.open(h).is_err());
        assert!(so.open(BytesMut::from(&b"short"[..])).is_err());
        // A frame sealed for the other direction does not open, even at the same
        // sequence number (each direction has its own key).
        let ((mut cs, _), (mut ss, mut so)) = pair(&s, &s).expect("handshake");
        let x = ss.seal(b"x");
        assert!(so.open(BytesMut::from(&x[..])).is_err());
        let y = cs.seal(b"y");
        assert_eq!(&so.open(BytesMut::from(&y[..])).expect("open")[..], b"y");
    }

    #[test]
    fn a_wrong_secret_fails_both_ways() {
        let good = Secret::new("0123456789abcdef").expect("secret");
        let bad = Secret::new("fedcba9876543210").expect("secret");
        assert!(matches!(pair(&bad, &good), Err(NetError::AuthFailed(_))));
        assert!(matches!(pair(&good, &bad), Err(NetError::AuthFailed(_))));
        assert!(matches!(
            Secret::new("short"),
            Err(SecretError::TooShort(5))
        ));
    }
}
