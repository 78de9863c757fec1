//! The elements of one BSON document level, framed without decoding them: the decoder of
//! change events walks the top level of every event with this instead of `bson`'s
//! iterator, which checks each key's UTF-8 and builds a value per element (a third of
//! the processor's cost per event). Framing is as strict as `bson`'s: a wrong tag, a
//! length out of bounds or a missing terminator is an error, never a panic.

use bson::{RawDocument, spec::ElementType};

/// One element: its key's bytes (not checked as UTF-8), its type and its value's bytes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Element<'a> {
    pub(crate) key: &'a [u8],
    pub(crate) kind: ElementType,
    pub(crate) value: &'a [u8],
}

impl<'a> Element<'a> {
    /// The key as text, for elements whose key is not one of the ASCII names compared.
    pub(crate) fn key_str(&self) -> Result<&'a str, FrameError<'a>> {
        std::str::from_utf8(self.key).map_err(|_| FrameError {
            key: &[],
            problem: "a key is not UTF-8",
        })
    }

    /// The value as a sub-document, when it is one.
    pub(crate) fn document(&self) -> Option<&'a RawDocument> {
        matches!(self.kind, ElementType::EmbeddedDocument)
            .then(|| RawDocument::from_bytes(self.value).ok())
            .flatten()
    }

    /// The value as a string, when it is one and valid UTF-8.
    pub(crate) fn string(&self) -> Option<&'a str> {
        std::str::from_utf8(self.string_bytes()?).ok()
    }

    /// The bytes of a string value (without its length and terminator), not checked as
    /// UTF-8: for comparing with known ASCII names.
    pub(crate) fn string_bytes(&self) -> Option<&'a [u8]> {
        if !matches!(self.kind, ElementType::String) {
            return None;
        }
        // Framing checked the length prefix and the terminator.
        self.value.get(4..self.value.len().checked_sub(1)?)
    }

    /// The value's bytes when it is a document (framing checked its length and
    /// terminator): for a view into the event, which reads it as a document later.
    pub(crate) fn document_bytes(&self) -> Option<&'a [u8]> {
        matches!(self.kind, ElementType::EmbeddedDocument).then_some(self.value)
    }

    fn fixed<const N: usize>(&self) -> Option<[u8; N]> {
        self.value.get(..N)?.try_into().ok()
    }

    /// The value as a 32-bit integer, when it is one.
    pub(crate) fn i32(&self) -> Option<i32> {
        matches!(self.kind, ElementType::Int32)
            .then(|| self.fixed().map(i32::from_le_bytes))
            .flatten()
    }

    /// The value as a 64-bit integer, when it is one.
    pub(crate) fn i64(&self) -> Option<i64> {
        matches!(self.kind, ElementType::Int64)
            .then(|| self.fixed().map(i64::from_le_bytes))
            .flatten()
    }

    /// The value as a date, when it is one.
    pub(crate) fn date(&self) -> Option<bson::DateTime> {
        matches!(self.kind, ElementType::DateTime)
            .then(|| {
                self.fixed()
                    .map(|b| bson::DateTime::from_millis(i64::from_le_bytes(b)))
            })
            .flatten()
    }

    /// The value as a timestamp, when it is one (increment first, then seconds).
    pub(crate) fn timestamp(&self) -> Option<bson::Timestamp> {
        if !matches!(self.kind, ElementType::Timestamp) {
            return None;
        }
        let increment = u32::from_le_bytes(self.value.get(..4)?.try_into().ok()?);
        let time = u32::from_le_bytes(self.value.get(4..8)?.try_into().ok()?);
        Some(bson::Timestamp { time, increment })
    }
}

/// The elements of `doc`'s top level, in order.
pub(crate) fn elements(doc: &RawDocument) -> Elements<'_> {
    Elements {
        bytes: doc.as_bytes(),
        at: 4,
        failed: false,
    }
}

/// Iterator over a document's elements; after an error it ends.
#[derive(Debug)]
pub(crate) struct Elements<'a> {
    bytes: &'a [u8],
    at: usize,
    failed: bool,
}

/// Why a document does not frame, and at which key (empty when the key itself is at
/// fault): a small value, made into text only when reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FrameError<'a> {
    key: &'a [u8],
    problem: &'static str,
}

impl std::fmt::Display for FrameError<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.key.is_empty() {
            f.write_str(self.problem)
        } else {
            write!(
                f,
                "`{}`: {}",
                String::from_utf8_lossy(self.key),
                self.problem
            )
        }
    }
}

impl<'a> Elements<'a> {
    // Inlined into the decoder's loop: called for every top-level field of every event.
    #[inline(always)]
    fn frame(&mut self) -> Result<Element<'a>, FrameError<'a>> {
        let bytes = self.bytes;
        let bad = |key, problem| FrameError { key, problem };
        // `next` checked that `at` is before the terminator, the document's last byte.
        let (&tag, rest) = bytes
            .get(self.at..)
            .and_then(<[u8]>::split_first)
            .ok_or(bad(&[], "an element is cut short"))?;
        let kind = element_type(tag).ok_or(bad(&[], "an element has an invalid type"))?;
        let key_len = nul_at(rest).ok_or(bad(&[], "a key has no terminator"))?;
        let (key, rest) = rest.split_at(key_len);
        // Past the key's terminator; the document's own terminator stays after the value.
        let rest = rest.get(1..).unwrap_or_default();
        let len = value_len(kind, rest).map_err(|problem| bad(key, problem))?;
        let (value, after) = rest
            .split_at_checked(len)
            .filter(|(_, after)| !after.is_empty())
            .ok_or(bad(key, "the value runs past the document's end"))?;
        self.at = bytes.len() - after.len();
        Ok(Element { key, kind, value })
    }
}

impl<'a> Iterator for Elements<'a> {
    type Item = Result<Element<'a>, FrameError<'a>>;

    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.at + 1 >= self.bytes.len() {
            // A `RawDocument` ends with its terminator: the last byte is never an element.
            return None;
        }
        let element = self.frame();
        self.failed = element.is_err();
        Some(element)
    }
}

/// Where the first zero byte is, eight bytes at a time (a key's terminator: every field of
/// every event has one to find).
#[inline(always)]
fn nul_at(bytes: &[u8]) -> Option<usize> {
    const LOW: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut chunks = bytes.chunks_exact(8);
    let mut at = 0;
    for chunk in &mut chunks {
        let mut word = [0; 8];
        word.copy_from_slice(chunk);
        let word = u64::from_le_bytes(word);
        // The lowest flagged byte is the first zero one (a flag above it may be false).
        let zeros = word.wrapping_sub(LOW) & !word & HIGH;
        if zeros != 0 {
            return Some(at + (zeros.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&b| b == 0)
        .map(|i| at + i)
}

/// The type a tag names (`bson`'s own conversion is not inlined across crates, and this
/// runs for every top-level field of every event).
#[inline(always)]
fn element_type(tag: u8) -> Option<ElementType> {
    use ElementType as T;
    Some(match tag {
        0x01 => T::Double,
        0x02 => T::String,
        0x03 => T::EmbeddedDocument,
        0x04 => T::Array,
        0x05 => T::Binary,
        0x06 => T::Undefined,
        0x07 => T::ObjectId,
        0x08 => T::Boolean,
        0x09 => T::DateTime,
        0x0A => T::Null,
        0x0B => T::RegularExpression,
        0x0C => T::DbPointer,
        0x0D => T::JavaScriptCode,
        0x0E => T::Symbol,
        0x0F => T::JavaScriptCodeWithScope,
        0x10 => T::Int32,
        0x11 => T::Timestamp,
        0x12 => T::Int64,
        0x13 => T::Decimal128,
        0x7F => T::MaxKey,
        0xFF => T::MinKey,
        _ => return None,
    })
}

/// A little-endian `i32` length at the start of `rest`, refused when negative.
fn length(rest: &[u8]) -> Result<usize, &'static str> {
    let bytes: [u8; 4] = rest
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or("a length is cut short")?;
    usize::try_from(i32::from_le_bytes(bytes)).map_err(|_| "a length is negative")
}

/// The bytes of a string value (length, text, terminator).
fn string_len(rest: &[u8]) -> Result<usize, &'static str> {
    let n = length(rest)?;
    if n == 0 {
        return Err("a string's length is 0");
    }
    match rest.get(4 + n - 1) {
        Some(0) => Ok(4 + n),
        Some(_) => Err("a string has no terminator"),
        None => Err("a string runs past the document's end"),
    }
}

/// The bytes of a C string with its terminator.
fn cstring_len(rest: &[u8]) -> Result<usize, &'static str> {
    rest.iter()
        .position(|&b| b == 0)
        .map(|n| n + 1)
        .ok_or("a C string has no terminator")
}

/// The length of a value of `kind` at the start of `rest`.
#[inline(always)]
fn value_len(kind: ElementType, rest: &[u8]) -> Result<usize, &'static str> {
    use ElementType as T;
    Ok(match kind {
        T::Boolean => 1,
        T::Int32 => 4,
        T::Int64 | T::Double | T::DateTime | T::Timestamp => 8,
        T::ObjectId => 12,
        T::Decimal128 => 16,
        T::Null | T::Undefined | T::MinKey | T::MaxKey => 0,
        T::String | T::Symbol | T::JavaScriptCode => string_len(rest)?,
        T::EmbeddedDocument | T::Array => {
            let n = length(rest)?;
            if n < 5 {
                return Err("a document is shorter than 5 bytes");
            }
            match rest.get(n - 1) {
                Some(0) => n,
                Some(_) => return Err("a document has no terminator"),
                None => return Err("a document runs past its parent's end"),
            }
        }
        T::Binary => length(rest)?
            .checked_add(5)
            .ok_or("a binary length overflows")?,
        T::RegularExpression => {
            let pattern = cstring_len(rest)?;
            pattern + cstring_len(rest.get(pattern..).unwrap_or_default())?
        }
        T::DbPointer => string_len(rest)? + 12,
        T::JavaScriptCodeWithScope => {
            let n = length(rest)?;
            // Its own length, a string of at least a terminator, a document.
            if n < 4 + 5 + 5 {
                return Err("code with scope is too short");
            }
            n
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use bson::{RawDocumentBuf, rawdoc};
    use proptest::prelude::*;

    use super::*;

    /// What `bson`'s own iterator reads: key, type and value bytes per element, or that
    /// it failed.
    /// Key, type and value bytes of each element.
    type Framed = Vec<(Vec<u8>, ElementType, Vec<u8>)>;

    fn by_bson(doc: &RawDocument) -> Result<Framed, ()> {
        let mut out = Vec::new();
        let mut at = 4;
        for element in doc.iter_elements() {
            let element = element.map_err(|_| ())?;
            let key = element.key().as_str().as_bytes();
            let start = at + 1 + key.len() + 1;
            at = start + element.size();
            let value = doc.as_bytes().get(start..at).ok_or(())?;
            out.push((key.to_vec(), element.element_type(), value.to_vec()));
        }
        Ok(out)
    }

    fn by_frame(doc: &RawDocument) -> Result<Framed, String> {
        elements(doc)
            .map(|e| {
                e.map(|e| (e.key.to_vec(), e.kind, e.value.to_vec()))
                    .map_err(|e| e.to_string())
            })
            .collect()
    }

    fn sample() -> RawDocumentBuf {
        rawdoc! {
            "_id": { "_data": "8265" },
            "operationType": "insert",
            "clusterTime": bson::Timestamp { time: 7, increment: 3 },
            "wallTime": bson::DateTime::from_millis(1_700_000_000_000),
            "ns": { "db": "d", "coll": "c" },
            "txnNumber": 5_i64,
            "n": 1_i32,
            "f": 1.5,
            "b": true,
            "z": bson::RawBson::Null,
            "a": [1, "x", { "y": 2 }],
            "bin": bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: vec![1, 2, 3] },
            "re": bson::Regex { pattern: bson::cstr!("^a").into(), options: bson::cstr!("i").into() },
            "oid": bson::oid::ObjectId::from_bytes([1; 12]),
            "dec": bson::Decimal128::from_bytes([2; 16]),
            "min": bson::RawBson::MinKey,
            "max": bson::RawBson::MaxKey,
            "code": bson::RawBson::JavaScriptCode("f()".into()),
        }
    }

    #[test]
    fn frames_every_type_as_bson_does() {
        let doc = sample();
        let framed = by_frame(&doc).unwrap();
        assert_eq!(framed.len(), 18);
        assert_eq!(Ok(framed), by_bson(&doc).map_err(|()| String::new()));
        let elements: Vec<_> = elements(&doc).map(Result::unwrap).collect();
        assert_eq!(
            elements[2].timestamp(),
            Some(bson::Timestamp {
                time: 7,
                increment: 3
            })
        );
        assert_eq!(
            elements[3].date(),
            Some(bson::DateTime::from_millis(1_700_000_000_000))
        );
        assert_eq!(elements[1].string(), Some("insert"));
        assert_eq!(elements[5].i64(), Some(5));
        assert_eq!(elements[6].i32(), Some(1));
        assert_eq!(elements[4].document().unwrap().get_str("db").unwrap(), "d");
        // Asked for the wrong type: none.
        assert_eq!(elements[1].i64(), None);
        assert_eq!(elements[5].string(), None);
    }

    #[test]
    fn tags_name_the_types_bson_names() {
        for tag in 0..=u8::MAX {
            assert_eq!(element_type(tag), ElementType::from(tag), "tag {tag:#04x}");
        }
    }

    #[test]
    fn an_empty_document_has_no_elements() {
        assert_eq!(by_frame(&RawDocumentBuf::new()).unwrap().len(), 0);
    }

    proptest! {
        // Any bytes that pass as a document's frame (length prefix and terminator): the
        // framer reads the same elements as `bson` wherever `bson` reads them all, and
        // never panics. Cut or corrupted events are the inputs that matter.
        #[test]
        fn agrees_with_bson_on_damaged_events(
            cut in 0_usize..400,
            flips in proptest::collection::vec((0_usize..400, any::<u8>()), 0..4),
        ) {
            let mut bytes = sample().into_bytes();
            for (at, value) in flips {
                if at + 1 < bytes.len() && at >= 4 {
                    bytes[at] = value;
                }
            }
            let keep = (bytes.len() - cut.min(bytes.len() - 5)).max(5);
            bytes.truncate(keep);
            if let Some(last) = bytes.last_mut() {
                *last = 0;
            }
            let len = i32::try_from(bytes.len()).unwrap();
            bytes[..4].copy_from_slice(&len.to_le_bytes());
            let doc = RawDocument::from_bytes(&bytes).unwrap();
            for bytes in elements(doc).flatten().filter_map(|e| e.document_bytes()) {
                prop_assert!(RawDocument::from_bytes(bytes).is_ok());
            }
            let framed = by_frame(doc);
            if let Ok(expected) = by_bson(doc) {
                // bson also checks keys' UTF-8, which the framer leaves to its caller.
                prop_assert_eq!(framed.map_err(|_| ()), Ok(expected));
            }
        }

        #[test]
        fn finds_the_first_zero_byte(
            dense in proptest::collection::vec(0_u8..4, 0..40),
            sparse in proptest::collection::vec(any::<u8>(), 0..80),
            at in 0_usize..80,
        ) {
            prop_assert_eq!(nul_at(&dense), dense.iter().position(|&b| b == 0));
            // Mostly non-zero bytes, with a zero placed somewhere (or none).
            let mut sparse: Vec<u8> = sparse.into_iter().map(|b| b.max(1)).collect();
            if let Some(b) = sparse.get_mut(at) {
                *b = 0;
            }
            prop_assert_eq!(nul_at(&sparse), sparse.iter().position(|&b| b == 0));
        }

        #[test]
        fn never_panics_on_any_frame(body in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut bytes = Vec::with_capacity(body.len() + 5);
            let len = i32::try_from(body.len() + 5).unwrap();
            bytes.extend_from_slice(&len.to_le_bytes());
            bytes.extend_from_slice(&body);
            bytes.push(0);
            let doc = RawDocument::from_bytes(&bytes).unwrap();
            for e in elements(doc).flatten() {
                let _ = (e.string(), e.document(), e.timestamp(), e.date(), e.i32(), e.i64());
                // What is framed as a document is one to `bson` (tokens rely on it).
                if let Some(bytes) = e.document_bytes() {
                    prop_assert!(RawDocument::from_bytes(bytes).is_ok());
                }
            }
        }
    }
}
