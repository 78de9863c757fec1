//! [`JsonLines`]: one change per line, as relaxed Extended JSON.

use std::{
    io::Write,
    sync::{Arc, Mutex, PoisonError},
};

use async_trait::async_trait;
use cdc_core::{BoxError, ChangeEvent};
use cdc_processor::{Batch, BatchDispatcher, HandlerContext};

use crate::Error;

/// Writes each change of a batch as one line of relaxed Extended JSON (the event as the
/// server sent it, token and all) and flushes before the batch is acknowledged: a change
/// is acknowledged only once the writer took it. A write error (a closed pipe) fails the
/// batch, which the processor's handler-error policy then answers.
///
/// As a batch handler it encodes on the runtime and writes on tokio's blocking pool: a
/// writer that blocks (a full pipe, a slow terminal) holds up no runtime thread.
#[derive(Debug)]
pub struct JsonLines<W> {
    out: Arc<Mutex<W>>,
}

impl JsonLines<std::io::Stdout> {
    /// Lines on the process's standard output.
    pub fn stdout() -> Self {
        Self::new(std::io::stdout())
    }
}

impl<W: Write + Send> JsonLines<W> {
    /// Lines on `out`.
    pub fn new(out: W) -> Self {
        Self {
            out: Arc::new(Mutex::new(out)),
        }
    }

    /// The writer back; `Err(self)` while a write of a batch whose handling was
    /// abandoned (its future dropped) is still running on the blocking pool.
    ///
    /// # Errors
    /// That write still holds the writer.
    pub fn into_inner(self) -> Result<W, Self> {
        Arc::try_unwrap(self.out)
            .map(|out| out.into_inner().unwrap_or_else(PoisonError::into_inner))
            .map_err(|out| Self { out })
    }

    /// Writes `events`, one line each, and flushes.
    ///
    /// # Errors
    /// [`Error::Refused`] for an event built without its raw document (it has nothing to
    /// print); [`Error::Output`] with the writer's error (a closed pipe: `BrokenPipe`).
    pub fn write_events<'a>(
        &self,
        events: impl IntoIterator<Item = &'a ChangeEvent>,
    ) -> Result<(), Error> {
        write_lines(&self.out, &encode(events)?)
    }
}

/// `events` as lines of relaxed Extended JSON.
fn encode<'a>(events: impl IntoIterator<Item = &'a ChangeEvent>) -> Result<Vec<u8>, Error> {
    const SERVICE: &str = "the JSON-lines sink";
    let mut lines = Vec::new();
    for event in events {
        let raw = event.raw().ok_or_else(|| {
            Error::refused(
                SERVICE,
                "an event without its raw document cannot be written as JSON",
                None,
            )
        })?;
        let doc = bson::Document::try_from(raw)
            .map_err(|e| Error::refused(SERVICE, "the event is not valid BSON", Some(e.into())))?;
        serde_json::to_writer(
            &mut lines,
            &cdc_core::support::to_relaxed_json(bson::Bson::Document(doc)),
        )
        .map_err(|e| Error::refused(SERVICE, "the event cannot be encoded", Some(e.into())))?;
        lines.push(b'\n');
    }
    Ok(lines)
}

/// Writes `lines` and flushes.
fn write_lines<W: Write>(out: &Mutex<W>, lines: &[u8]) -> Result<(), Error> {
    // A writer that panicked mid-line leaves at worst a torn line behind; the lock itself
    // stays usable.
    let mut out = out.lock().unwrap_or_else(PoisonError::into_inner);
    out.write_all(lines)?;
    out.flush()?;
    Ok(())
}

#[async_trait]
impl<W: Write + Send + 'static> BatchDispatcher for JsonLines<W> {
    async fn dispatch_batch(
        &self,
        batch: &Batch<'_>,
        _ctx: &HandlerContext,
    ) -> Result<(), BoxError> {
        let lines = encode(batch.events().iter().copied()).map_err(Error::into_handler_error)?;
        let out = Arc::clone(&self.out);
        tokio::task::spawn_blocking(move || write_lines(&out, &lines))
            .await?
            .map_err(Error::into_handler_error)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use bson::doc;

    use super::*;

    #[test]
    fn one_line_per_change_as_relaxed_extended_json() {
        let event = |id: i64| {
            ChangeEvent::from_document(&doc! {
                "_id": { "_data": format!("82{id:08X}00000001") },
                "operationType": "insert",
                "clusterTime": bson::Timestamp { time: 7, increment: 1 },
                "ns": { "db": "d", "coll": "c" },
                "documentKey": { "_id": id },
                "fullDocument": { "_id": id, "at": bson::DateTime::from_millis(0), "n": 1.5, "t": bson::DateTime::from_millis(12_140) },
            })
            .unwrap()
        };
        let (a, b) = (event(1), event(2));
        let sink = JsonLines::new(Vec::new());
        sink.write_events([&a, &b]).unwrap();
        let text = String::from_utf8(sink.into_inner().unwrap()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["operationType"], "insert");
        assert_eq!(lines[1]["fullDocument"]["_id"], 2);
        assert_eq!(lines[0]["fullDocument"]["n"], 1.5);
        // Relaxed: numbers plain, dates and timestamps in their wrappers.
        // Dates with exactly three fractional digits (sortable as text).
        assert_eq!(
            lines[0]["fullDocument"]["at"]["$date"],
            "1970-01-01T00:00:00.000Z"
        );
        assert_eq!(
            lines[0]["fullDocument"]["t"]["$date"],
            "1970-01-01T00:00:12.140Z"
        );
        assert_eq!(lines[0]["clusterTime"]["$timestamp"]["t"], 7);
        assert_eq!(lines[0]["_id"]["_data"], "820000000100000001");
    }

    #[test]
    fn an_event_without_its_raw_document_is_an_error() {
        let event = ChangeEvent::new(
            cdc_core::ResumeToken::from_document(&doc! { "_data": "82" }).unwrap(),
            cdc_core::OperationType::Insert,
            cdc_core::ClusterTime::new(1, 1),
        );
        let sink = JsonLines::new(Vec::new());
        let err = sink.write_events([&event]).unwrap_err();
        assert!(err.to_string().contains("raw document"), "{err}");
        assert_eq!(err.kind(), crate::ErrorKind::Refused);
        assert!(
            sink.into_inner().unwrap().is_empty(),
            "nothing half-written"
        );
    }

    /// A writer that fails (a closed pipe) fails the batch.
    #[test]
    fn a_failing_writer_fails_the_batch() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let event = ChangeEvent::from_document(&doc! {
            "_id": { "_data": "82" },
            "operationType": "drop",
            "clusterTime": bson::Timestamp { time: 1, increment: 1 },
        })
        .unwrap();
        let err = JsonLines::new(Closed).write_events([&event]).unwrap_err();
        assert!(err.to_string().contains("pipe"), "{err}");
        assert!(
            matches!(&err, Error::Output(e) if e.kind() == std::io::ErrorKind::BrokenPipe),
            "{err:?}"
        );
    }
}
