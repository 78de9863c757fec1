//! Replaying a stream's dead letters through a handler (the processor's dead-letter API
//! lists, counts and deletes them directly in the store).

use std::collections::HashSet;

use cdc_core::{DeadLetterStore, Dispatcher};

use crate::{Result, context::HandlerContext, poison::Poison};

/// What a replay of dead letters did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplayReport {
    /// Letters the handler now succeeded on: removed from the store.
    pub replayed: u64,
    /// Letters the handler failed on again (after the policy's retries): kept.
    pub failed: u64,
    /// Letters kept without a call, behind a failed letter of the same document key.
    pub held: u64,
}

/// Hands every dead letter of `stream` in `store`, oldest first, to `handler` under the
/// handler-error policy's retries (`poison`, with `ctx` for the calls): a letter the
/// handler succeeds on is removed; one it fails on again is kept, and so are the later
/// letters of its document key (without a call), so a key's order holds. Stops early
/// (what was replayed stays replayed) when `ctx` says the processor is stopping.
pub(crate) async fn replay(
    store: &dyn DeadLetterStore,
    poison: &Poison,
    stream: &str,
    ctx: &HandlerContext,
    handler: &dyn Dispatcher,
) -> Result<ReplayReport> {
    let mut report = ReplayReport::default();
    let mut held_keys: HashSet<Vec<u8>> = HashSet::new();
    for letter in store.list(stream, usize::MAX).await? {
        let event = letter.decode()?;
        let key = event.document_key().map(|k| k.as_bytes().to_vec());
        if key.as_ref().is_some_and(|k| held_keys.contains(k)) {
            report.held += 1;
            continue;
        }
        match poison
            .retrying(ctx, |_| handler.dispatch(&event, None))
            .await
        {
            Ok(Some(())) => {
                store.remove(stream, &letter.id).await?;
                report.replayed += 1;
            }
            Ok(None) => break,
            Err((e, calls)) => {
                tracing::warn!(id = %letter.id, error = %e, calls, "a dead letter failed again: kept");
                report.failed += 1;
                held_keys.extend(key);
            }
        }
    }
    Ok(report)
}
