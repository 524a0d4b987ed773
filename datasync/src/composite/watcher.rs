use std::sync::Arc;

use futures_util::StreamExt;
use futures_util::stream::select_all;

use crate::{Event, Prefix, Registration, Source, StoreError, Watch, WatchOptions, Watcher};

/// Merges the streams of several watchers into one; events keep their part's order and
/// carry the part's name as their source. Closing the registration closes every part.
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
        let mut regs = Vec::with_capacity(self.parts.len());
        let mut streams = Vec::with_capacity(self.parts.len());
        for (part_name, part) in &self.parts {
            // On error, the watches opened so far are closed as they drop.
            let watch = part.watch(name, prefixes, opts.clone()).await?;
            regs.push(watch.registration().clone());
            let part_name = part_name.clone();
            streams.push(watch.map(move |item| {
                item.map(|ev| match ev {
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
            Registration::aggregate(name, regs),
            select_all(streams),
        ))
    }
}
