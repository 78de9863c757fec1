//! The consumer side of the test workload (the soak, the demo, the fault matrix): what a
//! delivered event says about a document, in the terms the verifier (`verify`) reads.

use bson::Bson;
use cdc_core::{ChangeEvent, OperationType};

/// `(document id, "v<version>" or "deleted")` for an insert, update, replace, delete or
/// snapshot of a workload document (integer `_id`, integer `version`); `None` for any other
/// event.
pub fn change_of(event: &ChangeEvent) -> Option<(i64, String)> {
    let id = match event.document_id()? {
        Bson::Int64(n) => n,
        Bson::Int32(n) => i64::from(n),
        _ => return None,
    };
    let change = match event.operation_type {
        // A snapshot event carries the document as the snapshot read it; an insert or a
        // replacement the document written.
        OperationType::Insert | OperationType::Replace | OperationType::Snapshot => {
            format!("v{}", event.full_document()?.get_i64("version").ok()?)
        }
        OperationType::Update => format!(
            "v{}",
            event
                .update_description()
                .ok()??
                .updated_fields
                .get_i64("version")
                .ok()?
        ),
        OperationType::Delete => "deleted".to_owned(),
        _ => return None,
    };
    Some((id, change))
}
