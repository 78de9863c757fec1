//! Connecting with a bounded server-selection timeout, and enabling pre- and post-images.

use std::time::Duration;

use bson::doc;
use cdc_core::ErrorKind;
use mongodb::{Client, Database, options::ClientOptions};

use crate::error::{Error, Result, classify, redact_uri, scrub, server_code};

/// Connects to `uri` and checks the deployment answers within `server_selection_timeout`
/// (unless the URI sets its own). The password never appears in the error or in logs.
///
/// # Errors
/// [`Error::Connect`]: an invalid URI is fatal; an unreachable server is transient.
pub async fn connect(uri: &str, server_selection_timeout: Duration) -> Result<Client> {
    let shown = redact_uri(uri);
    let fail = |e: mongodb::error::Error, kind: ErrorKind| {
        let reason = scrub(&e.to_string(), uri);
        tracing::warn!(uri = %shown, %reason, ?kind, "cannot connect to MongoDB");
        Error::Connect {
            uri: shown.clone(),
            reason,
            kind,
        }
    };
    let mut options = ClientOptions::parse(uri)
        .await
        .map_err(|e| fail(e, ErrorKind::Fatal))?;
    if options.server_selection_timeout.is_none() {
        options.server_selection_timeout = Some(server_selection_timeout);
    }
    let client = Client::with_options(options).map_err(|e| fail(e, ErrorKind::Fatal))?;
    client
        .database("admin")
        .run_command(doc! { "ping": 1 })
        .await
        .map_err(|e| {
            let kind = classify(&e);
            fail(e, kind)
        })?;
    tracing::info!(uri = %shown, "connected to MongoDB");
    Ok(client)
}

fn unsupported(feature: &'static str, e: mongodb::error::Error) -> Error {
    match server_code(&e) {
        // InvalidOptions, unknown field, BadValue, FailedToParse: the server does not know
        // the option.
        Some(code @ (72 | 40415 | 2 | 9)) => Error::Unsupported {
            feature,
            code,
            message: e.to_string(),
        },
        _ => Error::driver("collMod", e),
    }
}

/// Enables `changeStreamPreAndPostImages` on a collection (MongoDB 6.0+). After the
/// collection is dropped and re-created, call it again.
///
/// # Errors
/// [`Error::Unsupported`] on servers without the option; [`Error::Driver`] otherwise (for
/// example NamespaceNotFound).
pub async fn enable_pre_post_images(db: &Database, coll: &str) -> Result<()> {
    db.run_command(doc! { "collMod": coll, "changeStreamPreAndPostImages": { "enabled": true } })
        .await
        .map_err(|e| unsupported("changeStreamPreAndPostImages", e))?;
    Ok(())
}

/// Enables the older `recordPreImages` option (MongoDB 4.4 and 5.0; removed in 6.0).
///
/// # Errors
/// [`Error::Unsupported`] on servers that removed or never had it.
pub async fn record_pre_images(db: &Database, coll: &str) -> Result<()> {
    db.run_command(doc! { "collMod": coll, "recordPreImages": true })
        .await
        .map_err(|e| unsupported("recordPreImages", e))?;
    Ok(())
}
