//! Reassembly of events that `$changeStreamSplitLargeEvent` split into fragments: the
//! fragments' fields are merged, as they arrive, into one event document whose `_id` is
//! the last fragment's resume token (resuming after it continues with the next event).

use bson::{RawDocument, RawDocumentBuf, cstr};

/// The stage name.
pub(crate) const SPLIT_STAGE: &str = "$changeStreamSplitLargeEvent";

/// What one document from the stream is.
#[derive(Debug)]
pub(crate) enum Piece {
    /// A whole event (never split, or the last fragment completed it).
    Whole(RawDocumentBuf),
    /// A fragment that leaves the event incomplete.
    Partial,
}

/// Why a fragment cannot be taken.
#[derive(Debug, PartialEq)]
pub(crate) enum FragmentError {
    /// `splitEvent` is not `{ fragment: <int>, of: <int> }` with `1 <= fragment <= of`.
    Malformed(String),
    /// The stream began in the middle of a split event (resumed after one of its
    /// fragments): the first fragment seen is this one.
    StartsMidEvent {
        /// The fragment's number (from 1).
        fragment: i32,
        /// Its resume token (`_id`).
        id: RawDocumentBuf,
    },
    /// A fragment arrived out of sequence.
    OutOfSequence {
        /// The number expected.
        expected: i32,
        /// The number received.
        got: i32,
    },
}

/// Merges fragments into one event.
#[derive(Debug, Default)]
pub(crate) struct Reassembler {
    /// Fields of the fragments so far (without `_id` and `splitEvent`).
    fields: RawDocumentBuf,
    /// The fragment expected next (from 1); 1 when no event is in progress.
    next: i32,
    /// Fragments the event has.
    of: i32,
    /// The resume tokens of the fragments so far.
    ids: Vec<RawDocumentBuf>,
}

impl Reassembler {
    /// A reassembler with no event in progress.
    pub(crate) fn new() -> Self {
        Self {
            next: 1,
            ..Self::default()
        }
    }

    /// Whether an event is half-read.
    pub(crate) fn in_progress(&self) -> bool {
        self.next > 1
    }

    /// The resume tokens of the fragments of the event in progress (or just completed).
    pub(crate) fn fragment_ids(&self) -> &[RawDocumentBuf] {
        &self.ids
    }

    /// Drops a half-read event (the stream was reopened).
    pub(crate) fn reset(&mut self) {
        *self = Self::new();
    }

    /// Takes the next document of the stream.
    pub(crate) fn take(&mut self, raw: RawDocumentBuf) -> Result<Piece, FragmentError> {
        let Some((fragment, of)) = split_event(&raw)? else {
            if self.in_progress() {
                return Err(FragmentError::OutOfSequence {
                    expected: self.next,
                    got: 0,
                });
            }
            self.ids.clear();
            return Ok(Piece::Whole(raw));
        };
        let id = raw
            .get_document("_id")
            .map_err(|_| FragmentError::Malformed("a fragment without a resume token".into()))?
            .to_owned();
        if !self.in_progress() {
            if fragment != 1 {
                return Err(FragmentError::StartsMidEvent { fragment, id });
            }
            self.fields = RawDocumentBuf::new();
            self.ids.clear();
            self.of = of;
        } else if fragment != self.next || of != self.of {
            return Err(FragmentError::OutOfSequence {
                expected: self.next,
                got: fragment,
            });
        }
        for element in raw.iter() {
            let (key, value) = element
                .map_err(|e| FragmentError::Malformed(format!("fragment {fragment}: {e}")))?;
            if key.as_str() != "_id" && key.as_str() != "splitEvent" {
                self.fields.append(key, value);
            }
        }
        self.ids.push(id);
        if fragment < of {
            self.next = fragment + 1;
            return Ok(Piece::Partial);
        }
        self.next = 1;
        let mut event = std::mem::take(&mut self.fields);
        if let Some(last) = self.ids.last() {
            event.append(cstr!("_id"), last.clone());
        }
        Ok(Piece::Whole(event))
    }
}

/// `splitEvent: { fragment, of }`, if the document is a fragment.
fn split_event(raw: &RawDocument) -> Result<Option<(i32, i32)>, FragmentError> {
    let Ok(Some(value)) = raw.get("splitEvent") else {
        return Ok(None);
    };
    let bad =
        || FragmentError::Malformed(format!("splitEvent is not {{ fragment, of }}: {value:?}"));
    let split = value.as_document().ok_or_else(bad)?;
    let number = |name: &str| split.get_i32(name).ok();
    match (number("fragment"), number("of")) {
        (Some(f), Some(of)) if 1 <= f && f <= of => Ok(Some((f, of))),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::rawdoc;

    fn fragment(n: i32, of: i32, field: &str) -> RawDocumentBuf {
        let mut d = rawdoc! { "_id": { "_data": format!("T{n}") }, "splitEvent": { "fragment": n, "of": of } };
        d.append(bson::raw::CString::try_from(field).unwrap(), n);
        d
    }

    #[test]
    fn fragments_merge_into_one_event_with_the_last_token() {
        let mut r = Reassembler::new();
        assert!(matches!(r.take(fragment(1, 3, "a")), Ok(Piece::Partial)));
        assert!(r.in_progress());
        assert!(matches!(r.take(fragment(2, 3, "b")), Ok(Piece::Partial)));
        let Ok(Piece::Whole(event)) = r.take(fragment(3, 3, "c")) else {
            panic!("not whole")
        };
        assert_eq!(
            event,
            rawdoc! { "a": 1, "b": 2, "c": 3, "_id": { "_data": "T3" } }
        );
        assert_eq!(r.fragment_ids().len(), 3);
        assert!(!r.in_progress());
        let plain = rawdoc! { "_id": { "_data": "X" }, "operationType": "insert" };
        assert!(matches!(r.take(plain.clone()), Ok(Piece::Whole(d)) if d == plain));
    }

    #[test]
    fn sequence_errors_are_named() {
        let mut r = Reassembler::new();
        assert!(matches!(
            r.take(fragment(2, 3, "b")),
            Err(FragmentError::StartsMidEvent { fragment: 2, .. })
        ));
        r.take(fragment(1, 3, "a")).unwrap();
        assert_eq!(
            r.take(fragment(3, 3, "c")).unwrap_err(),
            FragmentError::OutOfSequence {
                expected: 2,
                got: 3
            }
        );
        let mut r = Reassembler::new();
        r.take(fragment(1, 2, "a")).unwrap();
        assert!(matches!(
            r.take(rawdoc! { "_id": { "_data": "X" } }),
            Err(FragmentError::OutOfSequence { got: 0, .. })
        ));
        let bad = rawdoc! { "_id": { "_data": "X" }, "splitEvent": { "fragment": 3, "of": 2 } };
        assert!(matches!(
            Reassembler::new().take(bad),
            Err(FragmentError::Malformed(_))
        ));
    }
}
