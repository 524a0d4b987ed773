//! Models: which protobuf message the values under a key prefix hold, registered at
//! link time with [`register_model!`](crate::register_model), so that tools show and
//! take those values as JSON (the CLI's `put --json`, `get --json`) while the store
//! and the plugins keep the compact binary message.
//!
//! A model's message is a `prost` message that is also `serde` (de)serializable: one
//! struct with both derives, so no `protoc` is needed, and the JSON form is the
//! struct's serde form (field names as in the struct). Converting JSON checks it whole:
//! an unknown field or a wrong type is an error, never a half-filled message.
//!
//! Why by key prefix: that is how plugins are bound to their values already (a plugin
//! watches a prefix), and how the systems this descends from keep their models (a key
//! template per message type).

use crate::Key;

/// A value did not convert between its model's message and JSON.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// The bytes are not the model's message.
    #[error("not a {model} message: {source}")]
    Decode {
        /// The model.
        model: &'static str,
        /// Why.
        source: prost::DecodeError,
    },
    /// Two models are registered for the same prefix: which one a value holds is not
    /// known.
    #[error("models {models:?} are all registered for {prefix:?}")]
    Ambiguous {
        /// The prefix.
        prefix: &'static str,
        /// The models registered for it.
        models: Vec<&'static str>,
    },
    /// The JSON is not the model's message (an unknown field, a wrong type).
    #[error("not a {model} in JSON: {source}")]
    Json {
        /// The model.
        model: &'static str,
        /// Why.
        source: serde_json::Error,
    },
}

/// One registered model: values under `prefix` are `name` messages.
#[derive(Debug)]
pub struct Model {
    /// The message's name (e.g. `netconfig.Interface`).
    pub name: &'static str,
    /// The key prefix whose values hold it.
    pub prefix: &'static str,
    to_json: fn(&'static str, &[u8]) -> Result<serde_json::Value, ModelError>,
    from_json: fn(&'static str, &serde_json::Value) -> Result<Vec<u8>, ModelError>,
}

inventory::collect!(Model);

fn decode<M>(model: &'static str, bytes: &[u8]) -> Result<serde_json::Value, ModelError>
where
    M: prost::Message + Default + serde::Serialize,
{
    let m = M::decode(bytes).map_err(|source| ModelError::Decode { model, source })?;
    serde_json::to_value(&m).map_err(|source| ModelError::Json { model, source })
}

fn encode<M>(model: &'static str, json: &serde_json::Value) -> Result<Vec<u8>, ModelError>
where
    M: prost::Message + serde::de::DeserializeOwned,
{
    let m: M = serde_json::from_value(json.clone())
        .map_err(|source| ModelError::Json { model, source })?;
    Ok(m.encode_to_vec())
}

impl Model {
    /// The model of message `M` under `prefix` (what [`register_model!`](crate::register_model)
    /// submits). The prefix must end in `/` (a compile error else), so that `a/b/`
    /// never covers `a/bc`.
    pub const fn proto<M>(name: &'static str, prefix: &'static str) -> Model
    where
        M: prost::Message + Default + serde::Serialize + serde::de::DeserializeOwned,
    {
        let b = prefix.as_bytes();
        assert!(
            !b.is_empty() && b[b.len() - 1] == b'/',
            "a model's prefix ends with '/'"
        );
        Model {
            name,
            prefix,
            to_json: decode::<M>,
            from_json: encode::<M>,
        }
    }

    /// A value's message as JSON.
    pub fn to_json(&self, bytes: &[u8]) -> Result<serde_json::Value, ModelError> {
        (self.to_json)(self.name, bytes)
    }

    /// JSON as the message's bytes (checked whole).
    pub fn from_json(&self, json: &serde_json::Value) -> Result<Vec<u8>, ModelError> {
        (self.from_json)(self.name, json)
    }
}

/// Every model linked into this binary.
pub fn models() -> impl Iterator<Item = &'static Model> {
    inventory::iter::<Model>.into_iter()
}

/// The model of `key`'s value: the registered model with the longest prefix of it;
/// an error if two models share that prefix.
pub fn model_for(key: &Key) -> Result<Option<&'static Model>, ModelError> {
    let Some(longest) = models()
        .filter(|m| key.as_str().starts_with(m.prefix))
        .map(|m| m.prefix.len())
        .max()
    else {
        return Ok(None);
    };
    let found: Vec<&'static Model> = models()
        .filter(|m| key.as_str().starts_with(m.prefix) && m.prefix.len() == longest)
        .collect();
    match found.as_slice() {
        [one] => Ok(Some(*one)),
        _ => Err(ModelError::Ambiguous {
            prefix: found[0].prefix,
            models: found.iter().map(|m| m.name).collect(),
        }),
    }
}

/// Registers a model: values under `prefix` are `message`s (a `prost::Message` that
/// is also `serde` (de)serializable).
///
/// ```
/// #[derive(Clone, PartialEq, prost::Message, serde::Serialize, serde::Deserialize)]
/// #[serde(deny_unknown_fields)]
/// pub struct Port {
///     #[prost(uint32, tag = "1")]
///     pub speed: u32,
/// }
/// datasync::register_model!(name: "doc.Port", prefix: "doc/port/", message: Port);
///
/// let key = datasync::Key::new("doc/port/1").unwrap();
/// let model = datasync::model::model_for(&key).unwrap().unwrap();
/// let bytes = model.from_json(&serde_json::json!({"speed": 10})).unwrap();
/// assert_eq!(model.to_json(&bytes).unwrap(), serde_json::json!({"speed": 10}));
/// ```
#[macro_export]
macro_rules! register_model {
    (name: $name:expr, prefix: $prefix:expr, message: $message:ty $(,)?) => {
        $crate::inventory::submit! {
            $crate::model::Model::proto::<$message>($name, $prefix)
        }
    };
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[derive(Clone, PartialEq, prost::Message, serde::Serialize, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        #[prost(string, tag = "1")]
        name: String,
        #[prost(uint32, tag = "2")]
        size: u32,
    }

    #[derive(Clone, PartialEq, prost::Message, serde::Serialize, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        #[prost(bool, tag = "1")]
        on: bool,
    }

    crate::register_model!(name: "test.Outer", prefix: "test/m/", message: Outer);
    crate::register_model!(name: "test.Inner", prefix: "test/m/inner/", message: Inner);
    crate::register_model!(name: "test.One", prefix: "test/twice/", message: Inner);
    crate::register_model!(name: "test.Two", prefix: "test/twice/", message: Outer);

    #[test]
    fn the_longest_prefix_picks_the_model_and_json_is_checked_whole() {
        let key = |k: &str| Key::new(k).unwrap();
        let name = |k: &str| model_for(&key(k)).unwrap().map(|m| m.name);
        assert_eq!(name("test/m/a"), Some("test.Outer"));
        assert_eq!(name("test/m/inner/a"), Some("test.Inner"));
        assert_eq!(name("test/m/innerx"), Some("test.Outer"));
        assert_eq!(name("test/x"), None);
        assert!(matches!(
            model_for(&key("test/twice/a")),
            Err(ModelError::Ambiguous { .. })
        ));
        let m = model_for(&key("test/m/a")).unwrap().unwrap();
        let bytes = m
            .from_json(&serde_json::json!({"name": "é", "size": 7}))
            .unwrap();
        let back: Outer = prost::Message::decode(bytes.as_slice()).unwrap();
        assert_eq!((back.name.as_str(), back.size), ("é", 7));
        assert_eq!(
            m.to_json(&bytes).unwrap(),
            serde_json::json!({"name": "é", "size": 7})
        );
        for bad in [
            serde_json::json!({"name": "a", "extra": 1}),
            serde_json::json!({"size": "seven"}),
            serde_json::json!([1]),
        ] {
            assert!(
                matches!(m.from_json(&bad), Err(ModelError::Json { .. })),
                "{bad}"
            );
        }
        // A length-delimited field that runs past the end is no message.
        assert!(matches!(
            m.to_json(&[0x0a, 0x05, b'a']),
            Err(ModelError::Decode { .. })
        ));
    }
}
