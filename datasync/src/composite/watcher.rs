use std::sync::Arc;

use futures_util::StreamExt;
use futures_util::stream::select_all;

use crate::{
    Event, Prefix, Registration, Source, StoreError, Watch, WatchError, WatchOptions, Watcher,
};

/// Merges the streams of several watchers into one; events keep their part's order and
/// carry the part's name as their source, errors come as [`WatchError::InPart`] with
/// it. A part that stops ends only its own events: the others go on, and the stream
/// ends when every part has. Closing the registration closes every part.
#[derive(Debug, Clone, Default)]
pub struct CompositeWatcher {
    parts: Vec<(Source, Arc<dyn Watcher>)>,
}

impl CompositeWatcher {
    /// An empty composite.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a part named `name` (its events' source becomes `name`, or `name/inner` for a
    /// part that is itself a composite).
    #[must_use]
    pub fn with(mut self, name: &str, part: Arc<dyn Watcher>) -> Self {
        self.parts.push((Source::from(name), part));
        self
    }
}

fn qualify(part: &Source, inner: &Source) -> Source {
    if inner.is_empty() {
        part.clone()
    } else {
        Source::from(format!("{part}/{inner}"))
    }
}

#[async_trait::async_trait]
impl Watcher for CompositeWatcher {
    async fn watch(
        &self,
        name: &str,
        prefixes: &[Prefix],
        opts: WatchOptions,
    ) -> Result<Watch, StoreError> {
        let mut sources = self.sources();
        sources.sort();
        if sources.windows(2).any(|w| w[0] == w[1]) {
            // Their events and status could not be told apart.
            return Err(StoreError::Unsupported(
                "a composite with two parts (or nested parts) of the same name",
            ));
        }
        // Revisions are each part's own: one revision to resume from means nothing to
        // the others, so every part starts with its resync.
        let opts = WatchOptions {
            resume: None,
            ..opts
        };
        let mut regs = Vec::with_capacity(self.parts.len());
        let mut streams = Vec::with_capacity(self.parts.len());
        for (part_name, part) in &self.parts {
            // On error, the watches opened so far are closed as they drop.
            let watch = part.watch(name, prefixes, opts.clone()).await?;
            regs.push(watch.registration().clone());
            let part_name = part_name.clone();
            streams.push(watch.map(move |item| {
                item.map_err(|e| match e {
                    WatchError::InPart { part, error } => WatchError::InPart {
                        part: qualify(&part_name, &part),
                        error,
                    },
                    other => WatchError::InPart {
                        part: part_name.clone(),
                        error: Box::new(other),
                    },
                })
                .map(|ev| match ev {
                    Event::Resync(mut r) => {
                        r.source = qualify(&part_name, &r.source);
                        Event::Resync(r)
                    }
                    Event::Change(mut c) => {
                        c.source = qualify(&part_name, &c.source);
                        Event::Change(c)
                    }
                })
            }));
        }
        Ok(Watch::new(
            Registration::aggregate(name, prefixes, regs),
            select_all(streams),
        ))
    }

    fn sources(&self) -> Vec<Source> {
        self.parts
            .iter()
            .flat_map(|(name, part)| part.sources().into_iter().map(|s| qualify(name, &s)))
            .collect()
    }
}
