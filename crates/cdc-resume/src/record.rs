//! The JSON record the file and Redis stores keep: the token as the hex of its exact BSON
//! bytes (so it round-trips byte-for-byte), with the cluster time beside it in the clear.

use bson::DateTime;
use cdc_core::{ClusterTime, DeadLetter, Error, OperationType, Result, ResumePoint, ResumeToken};
use serde_json::{Value, json};

/// Encodes `stream`'s point as one JSON object. The record names its stream, so a record
/// copied to another stream's file or key is refused when loaded.
pub(crate) fn encode(stream: &str, point: &ResumePoint) -> String {
    let mut v = json!({
        "version": 1,
        "stream": stream,
        "token": hex(point.token.as_bytes()),
        "clusterTime": { "time": point.cluster_time.time, "increment": point.cluster_time.increment },
        "savedAt": point.saved_at.timestamp_millis(),
    });
    if let Some(data) = point.token.data() {
        v["tokenData"] = Value::String(data.to_owned());
    }
    if let Some(op) = &point.operation_type {
        v["operationType"] = Value::String(op.as_str().to_owned());
    }
    if let Some(origin) = &point.origin {
        v["origin"] = Value::String(origin.clone());
    }
    v.to_string()
}

/// Decodes `stream`'s record; anything off is [`Error::CorruptPoint`] naming the stream and
/// place, a record naming another stream [`Error::ForeignPoint`]. A record without a
/// `stream` (written before records named it) is taken as this stream's.
pub(crate) fn decode(bytes: &[u8], stream: &str, location: &str) -> Result<ResumePoint> {
    let corrupt = |reason: String| Error::CorruptPoint {
        stream: stream.to_owned(),
        location: location.to_owned(),
        reason,
    };
    let v: Value = serde_json::from_slice(bytes).map_err(|e| corrupt(format!("not JSON: {e}")))?;
    if v.get("version").and_then(Value::as_u64) != Some(1) {
        return Err(corrupt("missing or unknown `version`".into()));
    }
    match v.get("stream") {
        None => {}
        Some(Value::String(owner)) if owner == stream => {}
        Some(Value::String(owner)) => {
            return Err(Error::ForeignPoint {
                stream: stream.to_owned(),
                location: location.to_owned(),
                found: format!("stream `{owner}`"),
                expected: format!("stream `{stream}`"),
            });
        }
        Some(_) => return Err(corrupt("`stream` is not a string".into())),
    }
    let origin = match v.get("origin") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(corrupt("`origin` is not a string".into())),
    };
    let token_hex = v
        .get("token")
        .and_then(Value::as_str)
        .ok_or_else(|| corrupt("no `token` string".into()))?;
    let token_bytes = unhex(token_hex).ok_or_else(|| corrupt("`token` is not hex".into()))?;
    let token = ResumeToken::from_bytes(token_bytes)
        .map_err(|e| corrupt(format!("`token` is not BSON: {e}")))?;
    let cluster_time = cluster_time_of(&v).map_err(corrupt)?;
    let operation_type = match v.get("operationType") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(OperationType::parse(s)),
        Some(_) => return Err(corrupt("`operationType` is not a string".into())),
    };
    let saved_at = v
        .get("savedAt")
        .and_then(Value::as_i64)
        .ok_or_else(|| corrupt("`savedAt` is missing".into()))?;
    let mut point = ResumePoint::post_batch(token, cluster_time, DateTime::from_millis(saved_at));
    point.operation_type = operation_type;
    point.origin = origin;
    Ok(point)
}

/// Encodes a dead letter as one JSON object (one line: no newline inside).
pub(crate) fn encode_letter(letter: &DeadLetter) -> String {
    json!({
        "version": 1,
        "stream": letter.stream,
        "id": letter.id,
        "token": hex(letter.token.as_bytes()),
        "clusterTime": { "time": letter.cluster_time.time, "increment": letter.cluster_time.increment },
        "event": hex(&letter.event),
        "errors": letter.errors,
        "attempts": letter.attempts,
        "recordedAt": letter.recorded_at.timestamp_millis(),
        "parked": letter.parked,
    })
    .to_string()
}

/// Decodes a dead-letter record; anything off is [`Error::CorruptPoint`] naming the
/// stream and place.
pub(crate) fn decode_letter(bytes: &[u8], stream: &str, location: &str) -> Result<DeadLetter> {
    let corrupt = |reason: String| Error::CorruptPoint {
        stream: stream.to_owned(),
        location: location.to_owned(),
        reason: format!("dead letter: {reason}"),
    };
    let v: Value = serde_json::from_slice(bytes).map_err(|e| corrupt(format!("not JSON: {e}")))?;
    if v.get("version").and_then(Value::as_u64) != Some(1) {
        return Err(corrupt("missing or unknown `version`".into()));
    }
    let text = |name: &str| {
        v.get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| corrupt(format!("no `{name}` string")))
    };
    let bytes_of = |name: &str| {
        text(name).and_then(|s| unhex(s).ok_or_else(|| corrupt(format!("`{name}` is not hex"))))
    };
    let token = ResumeToken::from_bytes(bytes_of("token")?)
        .map_err(|e| corrupt(format!("`token` is not BSON: {e}")))?;

    let errors = match v.get("errors") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|e| e.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| corrupt("`errors` holds a non-string".into()))?,
        _ => return Err(corrupt("no `errors` array".into())),
    };
    Ok(DeadLetter {
        stream: text("stream")?.to_owned(),
        id: text("id")?.to_owned(),
        token,
        cluster_time: cluster_time_of(&v).map_err(corrupt)?,
        event: bytes_of("event")?,
        errors,
        attempts: v
            .get("attempts")
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| corrupt("`attempts` is missing".into()))?,
        recorded_at: DateTime::from_millis(
            v.get("recordedAt")
                .and_then(Value::as_i64)
                .ok_or_else(|| corrupt("`recordedAt` is missing".into()))?,
        ),
        parked: v.get("parked").and_then(Value::as_bool).unwrap_or(false),
    })
}

/// The `clusterTime: { time, increment }` of a record; the error says which part is off.
fn cluster_time_of(v: &Value) -> std::result::Result<ClusterTime, String> {
    let part = |name: &str| {
        v.get("clusterTime")
            .and_then(|c| c.get(name))
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| format!("`clusterTime.{name}` is missing or out of range"))
    };
    Ok(ClusterTime::new(part("time")?, part("increment")?))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

pub(crate) fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let token =
            ResumeToken::from_document(&bson::doc! { "_data": "82AB", "x": 1_i64 }).unwrap();
        let point = ResumePoint::for_event(
            token,
            ClusterTime::new(9, 3),
            OperationType::Insert,
            DateTime::from_millis(77),
        );
        let point = point.with_origin("shop.orders");
        let text = encode("s", &point);
        let back = decode(text.as_bytes(), "s", "here").unwrap();
        assert_eq!(back, point);
        // Copied to another stream's place: refused, naming both.
        let err = decode(text.as_bytes(), "t", "/x/t.json").unwrap_err();
        assert!(matches!(err, Error::ForeignPoint { .. }), "{err}");
        assert!(
            err.to_string().contains("`s`") && err.to_string().contains("/x/t.json"),
            "{err}"
        );
        assert_eq!(back.token.as_bytes(), point.token.as_bytes());
        let err = decode(b"{nope", "s", "/x/s.json").unwrap_err();
        assert!(
            err.to_string().contains("/x/s.json") && err.to_string().contains("`s`"),
            "{err}"
        );
        assert!(decode(br#"{"version":1,"token":"zz"}"#, "s", "l").is_err());
        assert_eq!(unhex(&hex(&[0, 255, 16])), Some(vec![0, 255, 16]));
    }
}
