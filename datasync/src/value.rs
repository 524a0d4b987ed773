//! Values and their codecs.
//!
//! Values travel as bytes and are decoded lazily, by the consumer, into the type it
//! expects. A value that does not decode yields a [`DecodeError`] for that one value; the
//! stream it came in goes on.

use std::fmt;
use std::marker::PhantomData;

use bytes::Bytes;

/// A value as stored: opaque bytes, cheap to clone. An empty value is a real value.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Value(Bytes);

impl Value {
    /// Wraps bytes.
    pub fn new(bytes: impl Into<Bytes>) -> Self {
        Value(bytes.into())
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The raw bytes, owned.
    pub fn bytes(&self) -> Bytes {
        self.0.clone()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the value has no bytes (it still exists).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Decodes the value with codec `C`.
    pub fn decode<C: Codec>(&self) -> Result<C::Item, DecodeError> {
        C::decode(self)
    }

    /// Decodes a protobuf message.
    pub fn proto<M: prost::Message + Default>(&self) -> Result<M, DecodeError> {
        Proto::<M>::decode(self)
    }

    /// Decodes a JSON document.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, DecodeError> {
        json_decode(self)
    }

    /// Encodes `item` with codec `C`.
    pub fn encode<C: Codec>(item: &C::Item) -> Result<Value, EncodeError> {
        C::encode(item)
    }
}

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match std::str::from_utf8(&self.0) {
            Ok(s) if s.len() <= 64 => write!(f, "{s:?}"),
            _ => write!(f, "<{} bytes>", self.0.len()),
        }
    }
}

impl From<&'static str> for Value {
    fn from(s: &'static str) -> Self {
        Value(Bytes::from_static(s.as_bytes()))
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value(Bytes::from(s))
    }
}

impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Self {
        Value(Bytes::from(v))
    }
}

impl From<Bytes> for Value {
    fn from(b: Bytes) -> Self {
        Value(b)
    }
}

/// A value did not decode into the expected type.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Not a valid protobuf message of the expected type.
    #[error("protobuf decode of {type_name} failed")]
    Proto {
        /// The expected message type.
        type_name: &'static str,
        /// The decoder's error.
        #[source]
        source: prost::DecodeError,
    },
    /// Not a valid JSON document of the expected type.
    #[error("JSON decode of {type_name} failed")]
    Json {
        /// The expected type.
        type_name: &'static str,
        /// The decoder's error.
        #[source]
        source: serde_json::Error,
    },
}

/// A value could not be encoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// JSON encoding failed (e.g. a map with non-string keys).
    #[error("JSON encode failed")]
    Json(#[source] serde_json::Error),
}

/// How a typed item maps to and from a [`Value`].
pub trait Codec {
    /// The decoded type.
    type Item;
    /// Encodes an item.
    fn encode(item: &Self::Item) -> Result<Value, EncodeError>;
    /// Decodes a value.
    fn decode(value: &Value) -> Result<Self::Item, DecodeError>;
}

/// Protobuf codec for `prost` message `M`.
#[derive(Debug)]
pub struct Proto<M>(PhantomData<fn() -> M>);

impl<M: prost::Message + Default> Codec for Proto<M> {
    type Item = M;
    fn encode(item: &M) -> Result<Value, EncodeError> {
        Ok(Value(item.encode_to_vec().into()))
    }
    fn decode(value: &Value) -> Result<M, DecodeError> {
        M::decode(value.as_bytes()).map_err(|source| DecodeError::Proto {
            type_name: std::any::type_name::<M>(),
            source,
        })
    }
}

/// JSON codec for serde type `T`.
#[derive(Debug)]
pub struct Json<T>(PhantomData<fn() -> T>);

impl<T: serde::Serialize + serde::de::DeserializeOwned> Codec for Json<T> {
    type Item = T;
    fn encode(item: &T) -> Result<Value, EncodeError> {
        serde_json::to_vec(item)
            .map(Value::from)
            .map_err(EncodeError::Json)
    }
    fn decode(value: &Value) -> Result<T, DecodeError> {
        json_decode(value)
    }
}

fn json_decode<T: serde::de::DeserializeOwned>(value: &Value) -> Result<T, DecodeError> {
    serde_json::from_slice(value.as_bytes()).map_err(|source| DecodeError::Json {
        type_name: std::any::type_name::<T>(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, PartialEq, prost::Message)]
    struct Iface {
        #[prost(string, tag = "1")]
        name: String,
        #[prost(uint32, tag = "2")]
        mtu: u32,
    }

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Route {
        dst: String,
    }

    #[test]
    fn proto_roundtrip_and_error() {
        let msg = Iface {
            name: "eth0".into(),
            mtu: 1500,
        };
        let v = Value::encode::<Proto<Iface>>(&msg).unwrap();
        assert_eq!(v.proto::<Iface>().unwrap(), msg);
        let err = Value::from(vec![0xff, 0xff, 0xff])
            .proto::<Iface>()
            .unwrap_err();
        assert!(matches!(err, DecodeError::Proto { .. }), "{err}");
    }

    #[test]
    fn json_roundtrip_and_error() {
        let v = Value::encode::<Json<Route>>(&Route { dst: "10/8".into() }).unwrap();
        assert_eq!(v.json::<Route>().unwrap().dst, "10/8");
        assert!(matches!(
            Value::from("{not json").json::<Route>(),
            Err(DecodeError::Json { .. })
        ));
    }
}
