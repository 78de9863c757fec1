//! The MongoDB wire protocol: message framing, OP_MSG (with document sequences and
//! CRC-32C checksums), legacy OP_QUERY / OP_REPLY for the first handshake of older
//! clients, and a clean refusal of OP_COMPRESSED.

use bson::{Bson, Document, RawDocumentBuf};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The largest message accepted (the `maxMessageSizeBytes` the server advertises).
pub const MAX_MESSAGE_SIZE: usize = 48_000_000;
/// The largest document accepted (the `maxBsonObjectSize` the server advertises).
pub const MAX_BSON_OBJECT_SIZE: usize = 16 * 1024 * 1024;
/// How deep documents and arrays in a message may nest (the server's `maxBSONDepth`).
pub const MAX_BSON_DEPTH: usize = 200;
/// How long the rest of a message may take to arrive once its header has.
pub const MESSAGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// How much of a message body is read (and allocated) at a time.
const READ_CHUNK: usize = 64 * 1024;

const OP_REPLY: i32 = 1;
const OP_QUERY: i32 = 2004;
const OP_COMPRESSED: i32 = 2012;
const OP_MSG: i32 = 2013;

const FLAG_CHECKSUM_PRESENT: u32 = 1;
const FLAG_MORE_TO_COME: u32 = 1 << 1;
const FLAG_EXHAUST_ALLOWED: u32 = 1 << 16;

/// Why a message could not be read. Every one of these closes only its connection.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The peer closed the connection or the socket failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The header announced a length outside `16..=48 MB`.
    #[error("message length {0} is out of range")]
    BadLength(i64),
    /// The message's content does not parse.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A document nests deeper than [`MAX_BSON_DEPTH`] (answered with an error reply).
    #[error("a document nests deeper than {MAX_BSON_DEPTH}")]
    TooDeep,
    /// The header arrived but the rest of the message did not within [`MESSAGE_TIMEOUT`].
    #[error("the rest of a {0}-byte message did not arrive in time")]
    Timeout(usize),
}

/// One request read off a connection.
#[derive(Debug)]
pub struct Request {
    /// The client's `requestID`, echoed as `responseTo`.
    pub request_id: i32,
    /// What the request holds.
    pub body: RequestBody,
}

/// The kinds of request the simulator understands.
#[derive(Debug)]
pub enum RequestBody {
    /// An OP_MSG command; document sequences are merged into the body as arrays.
    Msg {
        /// The command document.
        command: Document,
        /// The client expects no reply.
        more_to_come: bool,
    },
    /// A legacy OP_QUERY against a `$cmd` collection.
    Query {
        /// `db.$cmd`.
        full_collection_name: String,
        /// The command document (unwrapped from `$query` if wrapped).
        command: Document,
    },
    /// OP_COMPRESSED, which the server never advertised.
    Compressed,
    /// A well-framed message the server answers with an error instead of running it
    /// (a document nested deeper than [`MAX_BSON_DEPTH`]).
    Refused(crate::error::CmdError),
}

/// Reads one whole message, waiting as long as it takes for its header and at most
/// [`MESSAGE_TIMEOUT`] for the rest.
pub async fn read_request<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Request, WireError> {
    read_request_within(reader, MESSAGE_TIMEOUT).await
}

/// Reads one whole message; the body must follow its header within `body_timeout`. The
/// body is read (and its buffer grown) as it arrives, so a peer that announces a large
/// message and stalls holds no more memory than it sent.
pub async fn read_request_within<R: AsyncRead + Unpin>(
    reader: &mut R,
    body_timeout: std::time::Duration,
) -> Result<Request, WireError> {
    let mut header = [0u8; 16];
    reader.read_exact(&mut header).await?;
    let length = i32_at(&header, 0);
    if length < 16 || length as usize > MAX_MESSAGE_SIZE {
        return Err(WireError::BadLength(i64::from(length)));
    }
    let request_id = i32_at(&header, 4);
    let op_code = i32_at(&header, 12);
    let body_len = length as usize - 16;
    let payload = tokio::time::timeout(body_timeout, read_body(reader, body_len))
        .await
        .map_err(|_| WireError::Timeout(length as usize))??;
    let parsed = match op_code {
        OP_MSG => parse_msg(&header, &payload),
        OP_QUERY => parse_query(&payload),
        OP_COMPRESSED => Ok(RequestBody::Compressed),
        other => return Err(WireError::Malformed(format!("unsupported opCode {other}"))),
    };
    let body = match parsed {
        Err(WireError::TooDeep) => RequestBody::Refused(crate::error::CmdError::new(
            crate::error::code::OVERFLOW,
            format!("BSONObj exceeds maximum nested object depth: {MAX_BSON_DEPTH}"),
        )),
        other => other?,
    };
    Ok(Request { request_id, body })
}

async fn read_body<R: AsyncRead + Unpin>(reader: &mut R, len: usize) -> std::io::Result<Vec<u8>> {
    let mut payload = Vec::with_capacity(len.min(READ_CHUNK));
    while payload.len() < len {
        let start = payload.len();
        let end = (start + READ_CHUNK).min(len);
        payload.resize(end, 0);
        reader.read_exact(&mut payload[start..end]).await?;
    }
    Ok(payload)
}

fn i32_at(bytes: &[u8], at: usize) -> i32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    i32::from_le_bytes(b)
}

fn malformed(what: impl Into<String>) -> WireError {
    WireError::Malformed(what.into())
}

/// Reads a BSON document at the front of `bytes`, returning it and its length.
fn read_document(bytes: &[u8]) -> Result<(Document, usize), WireError> {
    if bytes.len() < 5 {
        return Err(malformed("truncated document"));
    }
    let len = i32_at(bytes, 0);
    if len < 5 || len as usize > bytes.len() || len as usize > MAX_BSON_OBJECT_SIZE + 16 * 1024 {
        return Err(malformed(format!("document length {len} is out of range")));
    }
    let len = len as usize;
    if nesting_depth(&bytes[..len]) > MAX_BSON_DEPTH {
        return Err(WireError::TooDeep);
    }
    let doc =
        Document::from_reader(&bytes[..len]).map_err(|e| malformed(format!("bad BSON: {e}")))?;
    Ok((doc, len))
}

/// How deep documents and arrays nest in `doc` (a top-level document is 1), found without
/// recursion so that no input can exhaust the stack. Malformed input stops the walk early;
/// decoding then reports it.
pub fn nesting_depth(doc: &[u8]) -> usize {
    // Each open document: the offset where its elements end (before its terminating 0).
    let mut open: Vec<usize> = Vec::new();
    let mut deepest = 0;
    let Some(len) = doc.get(..4).map(|b| i32_at(b, 0)) else {
        return 0;
    };
    let Ok(len) = usize::try_from(len) else {
        return 0;
    };
    if len < 5 || len > doc.len() {
        return 0;
    }
    open.push(len - 1);
    deepest = deepest.max(open.len());
    let mut at = 4;
    let int_at = |at: usize| -> Option<usize> {
        let b = doc.get(at..at + 4)?;
        usize::try_from(i32_at(b, 0)).ok()
    };
    while let Some(&end) = open.last() {
        if at >= end {
            // The document's terminator; its parent continues after it.
            open.pop();
            at += 1;
            continue;
        }
        let kind = doc[at];
        let Some(name_len) = doc[at + 1..].iter().position(|&b| b == 0) else {
            break;
        };
        at += 1 + name_len + 1;
        let size = match kind {
            0x01 | 0x09 | 0x11 | 0x12 => 8,
            0x02 | 0x0D | 0x0E => match int_at(at) {
                Some(n) => 4 + n,
                None => break,
            },
            0x03 | 0x04 => {
                let Some(n) = int_at(at) else { break };
                if n < 5 || at + n > end {
                    break;
                }
                open.push(at + n - 1);
                deepest = deepest.max(open.len());
                at += 4;
                continue;
            }
            0x05 => match int_at(at) {
                Some(n) => 5 + n,
                None => break,
            },
            0x06 | 0x0A | 0x7F | 0xFF => 0,
            0x07 => 12,
            0x08 => 1,
            0x0B => {
                let mut skip = 0;
                for _ in 0..2 {
                    match doc
                        .get(at + skip..)
                        .and_then(|r| r.iter().position(|&b| b == 0))
                    {
                        Some(p) => skip += p + 1,
                        None => return deepest,
                    }
                }
                skip
            }
            0x0C => match int_at(at) {
                Some(n) => 4 + n + 12,
                None => break,
            },
            0x0F => {
                // Code with scope: total length, the code string, then the scope document.
                let (Some(total), Some(code)) = (int_at(at), int_at(at + 4)) else {
                    break;
                };
                let scope = at + 8 + code;
                let Some(n) = int_at(scope) else { break };
                if n < 5 || scope + n > end || at + total > end {
                    break;
                }
                open.push(scope + n - 1);
                deepest = deepest.max(open.len());
                at = scope + 4;
                continue;
            }
            0x10 => 4,
            0x13 => 16,
            _ => break,
        };
        at += size;
    }
    deepest
}

fn read_cstring(bytes: &[u8]) -> Result<(String, usize), WireError> {
    let end = bytes
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| malformed("unterminated string"))?;
    let s = std::str::from_utf8(&bytes[..end]).map_err(|_| malformed("string is not UTF-8"))?;
    Ok((s.to_owned(), end + 1))
}

fn parse_msg(header: &[u8; 16], payload: &[u8]) -> Result<RequestBody, WireError> {
    if payload.len() < 5 {
        return Err(malformed("OP_MSG too short"));
    }
    let flags = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]);
    let known = FLAG_CHECKSUM_PRESENT | FLAG_MORE_TO_COME | FLAG_EXHAUST_ALLOWED;
    // Bits 0-15 are required: an unknown one must fail the message.
    if flags & 0xFFFF & !known != 0 {
        return Err(malformed(format!(
            "unknown required OP_MSG flags {flags:#x}"
        )));
    }
    let mut end = payload.len();
    if flags & FLAG_CHECKSUM_PRESENT != 0 {
        if payload.len() < 4 + 1 + 4 {
            return Err(malformed("OP_MSG too short for its checksum"));
        }
        end -= 4;
        let expected = u32::from_le_bytes([
            payload[end],
            payload[end + 1],
            payload[end + 2],
            payload[end + 3],
        ]);
        let mut crc = crc32c::Crc32c::new();
        crc.update(header);
        crc.update(&payload[..end]);
        if crc.finish() != expected {
            return Err(malformed("OP_MSG checksum mismatch"));
        }
    }
    let mut at = 4;
    let mut body: Option<Document> = None;
    let mut sequences: Vec<(String, Vec<Bson>)> = Vec::new();
    while at < end {
        let kind = payload[at];
        at += 1;
        match kind {
            0 => {
                let (doc, len) = read_document(&payload[at..end])?;
                if body.replace(doc).is_some() {
                    return Err(malformed("OP_MSG has two body sections"));
                }
                at += len;
            }
            1 => {
                if end - at < 4 {
                    return Err(malformed("truncated document sequence"));
                }
                let size = i32_at(payload, at);
                if size < 5 || at + size as usize > end {
                    return Err(malformed(format!(
                        "document sequence size {size} is out of range"
                    )));
                }
                let section_end = at + size as usize;
                let mut pos = at + 4;
                let (identifier, used) = read_cstring(&payload[pos..section_end])?;
                pos += used;
                let mut docs = Vec::new();
                while pos < section_end {
                    let (doc, len) = read_document(&payload[pos..section_end])?;
                    docs.push(Bson::Document(doc));
                    pos += len;
                }
                sequences.push((identifier, docs));
                at = section_end;
            }
            other => return Err(malformed(format!("unknown OP_MSG section kind {other}"))),
        }
    }
    let mut command = body.ok_or_else(|| malformed("OP_MSG has no body section"))?;
    for (identifier, docs) in sequences {
        if command.contains_key(&identifier) {
            return Err(malformed(format!(
                "`{identifier}` is both in the body and a sequence"
            )));
        }
        command.insert(identifier, Bson::Array(docs));
    }
    Ok(RequestBody::Msg {
        command,
        more_to_come: flags & FLAG_MORE_TO_COME != 0,
    })
}

fn parse_query(payload: &[u8]) -> Result<RequestBody, WireError> {
    if payload.len() < 4 {
        return Err(malformed("OP_QUERY too short"));
    }
    let mut at = 4; // flags
    let (full_collection_name, used) = read_cstring(&payload[at..])?;
    at += used + 8; // numberToSkip, numberToReturn
    if at > payload.len() {
        return Err(malformed("OP_QUERY too short"));
    }
    let (mut command, _) = read_document(&payload[at..])?;
    if let Some(Bson::Document(inner)) = command.remove("$query") {
        command = inner;
    }
    Ok(RequestBody::Query {
        full_collection_name,
        command,
    })
}

fn header(buf: &mut Vec<u8>, request_id: i32, response_to: i32, op_code: i32) {
    buf.extend_from_slice(&0i32.to_le_bytes());
    buf.extend_from_slice(&request_id.to_le_bytes());
    buf.extend_from_slice(&response_to.to_le_bytes());
    buf.extend_from_slice(&op_code.to_le_bytes());
}

fn finish(mut buf: Vec<u8>) -> Vec<u8> {
    let len = (buf.len() as i32).to_le_bytes();
    buf[..4].copy_from_slice(&len);
    buf
}

/// Encodes an OP_MSG reply holding `reply` as its body.
pub fn encode_msg(
    request_id: i32,
    response_to: i32,
    reply: &RawDocumentBuf,
) -> Result<Vec<u8>, bson::error::Error> {
    let mut buf = Vec::with_capacity(256);
    header(&mut buf, request_id, response_to, OP_MSG);
    buf.extend_from_slice(&0u32.to_le_bytes());
    buf.push(0);
    buf.extend_from_slice(reply.as_bytes());
    Ok(finish(buf))
}

/// Encodes a legacy OP_REPLY holding one document.
pub fn encode_reply(
    request_id: i32,
    response_to: i32,
    reply: &RawDocumentBuf,
) -> Result<Vec<u8>, bson::error::Error> {
    let mut buf = Vec::with_capacity(256);
    header(&mut buf, request_id, response_to, OP_REPLY);
    buf.extend_from_slice(&8i32.to_le_bytes()); // responseFlags: AwaitCapable
    buf.extend_from_slice(&0i64.to_le_bytes()); // cursorID
    buf.extend_from_slice(&0i32.to_le_bytes()); // startingFrom
    buf.extend_from_slice(&1i32.to_le_bytes()); // numberReturned
    buf.extend_from_slice(reply.as_bytes());
    Ok(finish(buf))
}

/// Encodes a client-side OP_MSG (for tests that speak the protocol by hand).
pub fn encode_request(
    request_id: i32,
    command: &Document,
    checksum: bool,
) -> Result<Vec<u8>, bson::error::Error> {
    let mut buf = Vec::with_capacity(256);
    header(&mut buf, request_id, 0, OP_MSG);
    let flags = if checksum { FLAG_CHECKSUM_PRESENT } else { 0 };
    buf.extend_from_slice(&flags.to_le_bytes());
    buf.push(0);
    command.to_writer(&mut buf)?;
    if checksum {
        let len = (buf.len() as i32 + 4).to_le_bytes();
        buf[..4].copy_from_slice(&len);
        let mut crc = crc32c::Crc32c::new();
        crc.update(&buf);
        let sum = crc.finish();
        buf.extend_from_slice(&sum.to_le_bytes());
        return Ok(buf);
    }
    Ok(finish(buf))
}

/// CRC-32C (Castagnoli), as OP_MSG checksums use.
mod crc32c {
    const POLY: u32 = 0x82F6_3B78;

    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut crc = i as u32;
            let mut bit = 0;
            while bit < 8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ POLY
                } else {
                    crc >> 1
                };
                bit += 1;
            }
            table[i] = crc;
            i += 1;
        }
        table
    };

    pub(super) struct Crc32c(u32);

    impl Crc32c {
        pub(super) fn new() -> Self {
            Self(!0)
        }

        pub(super) fn update(&mut self, bytes: &[u8]) {
            let mut crc = self.0;
            for &b in bytes {
                crc = TABLE[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
            }
            self.0 = crc;
        }

        pub(super) fn finish(&self) -> u32 {
            !self.0
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn known_vector() {
            let mut crc = super::Crc32c::new();
            crc.update(b"123456789");
            assert_eq!(crc.finish(), 0xE306_9283);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    #[tokio::test]
    async fn msg_with_sequence_and_checksum_parses() {
        let mut buf = Vec::new();
        header(&mut buf, 7, 0, OP_MSG);
        buf.extend_from_slice(&FLAG_CHECKSUM_PRESENT.to_le_bytes());
        buf.push(0);
        doc! { "insert": "c", "$db": "d" }
            .to_writer(&mut buf)
            .unwrap();
        buf.push(1);
        let mut seq = Vec::new();
        seq.extend_from_slice(b"documents\0");
        doc! { "_id": 1 }.to_writer(&mut seq).unwrap();
        doc! { "_id": 2 }.to_writer(&mut seq).unwrap();
        buf.extend_from_slice(&((seq.len() + 4) as i32).to_le_bytes());
        buf.extend_from_slice(&seq);
        let len = (buf.len() as i32 + 4).to_le_bytes();
        buf[..4].copy_from_slice(&len);
        let mut crc = crc32c::Crc32c::new();
        crc.update(&buf);
        buf.extend_from_slice(&crc.finish().to_le_bytes());

        let req = read_request(&mut buf.as_slice()).await.unwrap();
        assert_eq!(req.request_id, 7);
        let RequestBody::Msg { command, .. } = req.body else {
            panic!("not a msg")
        };
        assert_eq!(command.get_array("documents").unwrap().len(), 2);

        // A flipped bit fails the checksum.
        let last = buf.len() - 6;
        buf[last] ^= 1;
        assert!(read_request(&mut buf.as_slice()).await.is_err());
    }

    #[tokio::test]
    async fn oversized_and_tiny_lengths_are_refused() {
        let mut buf = Vec::new();
        header(&mut buf, 1, 0, OP_MSG);
        buf[..4].copy_from_slice(&(MAX_MESSAGE_SIZE as i32 + 1).to_le_bytes());
        assert!(matches!(
            read_request(&mut buf.as_slice()).await,
            Err(WireError::BadLength(_))
        ));
        buf[..4].copy_from_slice(&3i32.to_le_bytes());
        assert!(matches!(
            read_request(&mut buf.as_slice()).await,
            Err(WireError::BadLength(_))
        ));
    }
}
