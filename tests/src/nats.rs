//! Reading a JetStream stream back whole, for the suites and the soak that check what a
//! sink published.

use std::time::Duration;

use cdc_sink::async_nats::jetstream::{self, consumer::pull};
use futures_util::StreamExt;

/// Every message of JetStream stream `name`, in order, through a fresh consumer that
/// acknowledges nothing (the stream is left as it is).
///
/// # Errors
/// JetStream's, as text.
pub async fn all_messages(
    js: &jetstream::Context,
    name: &str,
) -> Result<Vec<jetstream::Message>, String> {
    let consumer = js
        .get_stream(name)
        .await
        .map_err(|e| format!("stream {name}: {e}"))?
        .create_consumer(pull::Config {
            ack_policy: jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("a consumer of {name}: {e}"))?;
    let mut out = Vec::new();
    loop {
        let mut batch = consumer
            .fetch()
            .max_messages(1000)
            .expires(Duration::from_millis(300))
            .messages()
            .await
            .map_err(|e| format!("fetching from {name}: {e}"))?;
        let before = out.len();
        while let Some(m) = batch.next().await {
            out.push(m.map_err(|e| format!("fetching from {name}: {e}"))?);
        }
        if out.len() == before {
            return Ok(out);
        }
    }
}
