//! The same two dependent plugins on NATS JetStream Key-Value: ordered startup resync,
//! live changes with previous values, a change rejected through `Done`, a TTL expiry (NATS
//! TTLs are whole seconds, at least the bucket's marker TTL), a prefix delete (one delete
//! marker per key), and a resync after the server ends the watch's consumer.
//!
//! Run: `cargo run -p datasync-examples --features nats --bin nats -- nats://127.0.0.1:4222`
//! (needs a nats-server 2.11 or newer with JetStream: `nats-server -js`). It works in a
//! bucket of its own, deleted at the end.

use std::error::Error;
use std::time::Duration;

use datasync::coordinator::PluginState;
use datasync_examples::{first_run, print_status, seed, settle};
use datasync_nats::{NatsConfig, NatsStore};

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let url = std::env::args()
        .nth(1)
        .ok_or("usage: nats nats://HOST:PORT (a nats-server with JetStream)")?;
    let bucket = format!("example_{}", std::process::id());
    let config = NatsConfig::new([url.clone()])
        .with_bucket(bucket.clone())
        .with_wait_for_server(Duration::from_secs(20));
    let store = NatsStore::connect(config).await?;
    println!("NATS bucket {bucket} on {url}");
    seed(&store).await?;
    let (coordinator, _device) = first_run(&store).await?;

    println!("6. the server ends the watch's consumer: a resync in the same order");
    // Wait for the pass that resyncs routes after its rejected change, then count.
    let settled = async {
        while coordinator
            .status()
            .plugins
            .iter()
            .any(|p| p.state != PluginState::Ready)
        {
            settle().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), settled)
        .await
        .map_err(|_| "a plugin is not ready within 20 s")?;
    let before = coordinator.status().passes;
    let js = async_nats::jetstream::new(store.client().clone());
    let stream = js.get_stream(format!("KV_{bucket}")).await?;
    let mut names = stream.consumer_names();
    while let Some(name) = futures_util::StreamExt::next(&mut names).await {
        stream.delete_consumer(&name?).await?;
    }
    let resynced = async {
        while coordinator.status().passes <= before {
            settle().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), resynced)
        .await
        .map_err(|_| "no resync within 20 s after the consumer was deleted")?;
    print_status(&coordinator);
    let st = coordinator.status();
    assert!(st.plugins.iter().all(|p| p.state == PluginState::Ready));
    coordinator.shutdown().await;
    js.delete_key_value(&bucket).await?;
    println!("done");
    Ok(())
}
