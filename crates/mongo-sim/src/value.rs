//! BSON values as MongoDB compares them: the canonical type order, numeric equality across
//! int/long/double, dotted paths through documents and arrays.

use std::cmp::Ordering;

use bson::{Bson, Document};

/// MongoDB's canonical ordering of BSON types (lower sorts first).
pub(crate) fn type_rank(v: &Bson) -> u8 {
    match v {
        Bson::MinKey => 1,
        Bson::Null | Bson::Undefined => 2,
        Bson::Int32(_) | Bson::Int64(_) | Bson::Double(_) | Bson::Decimal128(_) => 3,
        Bson::Symbol(_) | Bson::String(_) => 4,
        Bson::Document(_) => 5,
        Bson::Array(_) => 6,
        Bson::Binary(_) => 7,
        Bson::ObjectId(_) => 8,
        Bson::Boolean(_) => 9,
        Bson::DateTime(_) => 10,
        Bson::Timestamp(_) => 11,
        Bson::RegularExpression(_) => 12,
        Bson::DbPointer(_) => 13,
        Bson::JavaScriptCode(_) => 14,
        Bson::JavaScriptCodeWithScope(_) => 15,
        Bson::MaxKey => 16,
    }
}

/// A number as `f64` for comparison (Decimal128 parsed from its string form).
fn as_f64(v: &Bson) -> Option<f64> {
    match v {
        Bson::Int32(n) => Some(f64::from(*n)),
        Bson::Int64(n) => Some(*n as f64),
        Bson::Double(n) => Some(*n),
        Bson::Decimal128(d) => d.to_string().parse().ok(),
        _ => None,
    }
}

fn compare_numbers(a: &Bson, b: &Bson) -> Ordering {
    // Exact for two integers; through f64 otherwise.
    let int = |v: &Bson| match v {
        Bson::Int32(n) => Some(i64::from(*n)),
        Bson::Int64(n) => Some(*n),
        _ => None,
    };
    if let (Some(x), Some(y)) = (int(a), int(b)) {
        return x.cmp(&y);
    }
    let (x, y) = (as_f64(a).unwrap_or(f64::NAN), as_f64(b).unwrap_or(f64::NAN));
    // NaN sorts below every other number, as in MongoDB.
    match (x.is_nan(), y.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Less,
        (false, true) => Ordering::Greater,
        (false, false) => x.partial_cmp(&y).unwrap_or(Ordering::Equal),
    }
}

/// Total order of BSON values, as MongoDB sorts them.
pub(crate) fn compare(a: &Bson, b: &Bson) -> Ordering {
    let (ra, rb) = (type_rank(a), type_rank(b));
    if ra != rb {
        return ra.cmp(&rb);
    }
    match (a, b) {
        (x, y) if ra == 3 => compare_numbers(x, y),
        (Bson::String(x) | Bson::Symbol(x), Bson::String(y) | Bson::Symbol(y)) => {
            x.as_bytes().cmp(y.as_bytes())
        }
        (Bson::Document(x), Bson::Document(y)) => compare_documents(x, y),
        (Bson::Array(x), Bson::Array(y)) => {
            for (p, q) in x.iter().zip(y) {
                let c = compare(p, q);
                if c != Ordering::Equal {
                    return c;
                }
            }
            x.len().cmp(&y.len())
        }
        (Bson::Binary(x), Bson::Binary(y)) => x
            .bytes
            .len()
            .cmp(&y.bytes.len())
            .then(u8::from(x.subtype).cmp(&u8::from(y.subtype)))
            .then(x.bytes.cmp(&y.bytes)),
        (Bson::ObjectId(x), Bson::ObjectId(y)) => x.bytes().cmp(&y.bytes()),
        (Bson::Boolean(x), Bson::Boolean(y)) => x.cmp(y),
        (Bson::DateTime(x), Bson::DateTime(y)) => x.cmp(y),
        (Bson::Timestamp(x), Bson::Timestamp(y)) => {
            (x.time, x.increment).cmp(&(y.time, y.increment))
        }
        (Bson::RegularExpression(x), Bson::RegularExpression(y)) => {
            (x.pattern.as_str(), x.options.as_str()).cmp(&(y.pattern.as_str(), y.options.as_str()))
        }
        (Bson::JavaScriptCode(x), Bson::JavaScriptCode(y)) => x.cmp(y),
        _ => Ordering::Equal,
    }
}

fn compare_documents(x: &Document, y: &Document) -> Ordering {
    let mut xi = x.iter();
    let mut yi = y.iter();
    loop {
        match (xi.next(), yi.next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some((ka, va)), Some((kb, vb))) => {
                let c = type_rank(va)
                    .cmp(&type_rank(vb))
                    .then_with(|| ka.as_bytes().cmp(kb.as_bytes()))
                    .then_with(|| compare(va, vb));
                if c != Ordering::Equal {
                    return c;
                }
            }
        }
    }
}

/// Equality as MongoDB's queries see it (`1 == 1.0`, documents field by field in order).
pub(crate) fn equal(a: &Bson, b: &Bson) -> bool {
    type_rank(a) == type_rank(b) && compare(a, b) == Ordering::Equal
}

/// A hashable key for an `_id` value such that `equal` values give equal keys.
pub(crate) fn id_key(v: &Bson) -> Vec<u8> {
    let normalized = normalize_numbers(v);
    let mut doc = Document::new();
    doc.insert("", normalized);
    doc.to_vec().unwrap_or_default()
}

fn normalize_numbers(v: &Bson) -> Bson {
    match v {
        Bson::Int32(n) => Bson::Double(f64::from(*n)),
        Bson::Int64(n) => Bson::Double(*n as f64),
        Bson::Decimal128(_) => Bson::Double(as_f64(v).unwrap_or(f64::NAN)),
        Bson::Document(d) => Bson::Document(
            d.iter()
                .map(|(k, v)| (k.clone(), normalize_numbers(v)))
                .collect(),
        ),
        Bson::Array(a) => Bson::Array(a.iter().map(normalize_numbers).collect()),
        other => other.clone(),
    }
}

/// Looks up a dotted path without array traversal (exact positions only; numeric
/// components index arrays).
pub(crate) fn get_path<'a>(doc: &'a Document, path: &str) -> Option<&'a Bson> {
    let mut parts = path.split('.');
    let first = parts.next()?;
    let mut cur = doc.get(first)?;
    for part in parts {
        cur = match cur {
            Bson::Document(d) => d.get(part)?,
            Bson::Array(a) => a.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// Every value a query on `path` considers: arrays met on the way are traversed (each
/// element is looked into), as MongoDB's matcher does. `None` entries stand for "missing".
pub(crate) fn query_values<'a>(doc: &'a Document, path: &str) -> Vec<Option<&'a Bson>> {
    let parts: Vec<&str> = path.split('.').collect();
    let mut out = Vec::new();
    walk(
        Some(doc.get(parts[0]).map_or(MaybeRef::Missing, MaybeRef::Value)),
        &parts[1..],
        &mut out,
    );
    out
}

enum MaybeRef<'a> {
    Missing,
    Value(&'a Bson),
}

fn walk<'a>(cur: Option<MaybeRef<'a>>, rest: &[&str], out: &mut Vec<Option<&'a Bson>>) {
    let Some(cur) = cur else { return };
    let value = match cur {
        MaybeRef::Missing => {
            out.push(None);
            return;
        }
        MaybeRef::Value(v) => v,
    };
    let Some((part, tail)) = rest.split_first() else {
        out.push(Some(value));
        return;
    };
    match value {
        Bson::Document(d) => walk(
            Some(d.get(*part).map_or(MaybeRef::Missing, MaybeRef::Value)),
            tail,
            out,
        ),
        Bson::Array(items) => {
            if let Ok(i) = part.parse::<usize>()
                && let Some(item) = items.get(i)
            {
                walk(Some(MaybeRef::Value(item)), tail, out);
            }
            let mut any = false;
            for item in items {
                if let Bson::Document(d) = item {
                    any = true;
                    walk(
                        Some(d.get(*part).map_or(MaybeRef::Missing, MaybeRef::Value)),
                        tail,
                        out,
                    );
                }
            }
            if !any {
                out.push(None);
            }
        }
        _ => out.push(None),
    }
}

/// Sets a dotted path, creating documents on the way; numeric components index arrays
/// (padding with nulls). Fails when a scalar stands in the way.
pub(crate) fn set_path(doc: &mut Document, path: &str, value: Bson) -> Result<(), String> {
    let parts: Vec<&str> = path.split('.').collect();
    set_in_doc(doc, &parts, value, path)
}

fn set_in_doc(doc: &mut Document, parts: &[&str], value: Bson, path: &str) -> Result<(), String> {
    let (first, rest) = parts.split_first().ok_or_else(|| "empty path".to_owned())?;
    if rest.is_empty() {
        doc.insert(*first, value);
        return Ok(());
    }
    let child = doc
        .entry((*first).to_owned())
        .or_insert_with(|| Bson::Document(Document::new()));
    set_in_value(child, rest, value, path)
}

fn set_in_value(target: &mut Bson, parts: &[&str], value: Bson, path: &str) -> Result<(), String> {
    match target {
        Bson::Document(d) => set_in_doc(d, parts, value, path),
        Bson::Array(items) => {
            let (first, rest) = parts.split_first().ok_or_else(|| "empty path".to_owned())?;
            let index: usize = first
                .parse()
                .map_err(|_| format!("cannot create field '{first}' in an array along '{path}'"))?;
            while items.len() <= index {
                items.push(Bson::Null);
            }
            if rest.is_empty() {
                items[index] = value;
                Ok(())
            } else {
                if !matches!(items[index], Bson::Document(_) | Bson::Array(_)) {
                    items[index] = Bson::Document(Document::new());
                }
                set_in_value(&mut items[index], rest, value, path)
            }
        }
        other => Err(format!(
            "cannot create field '{}' in element {{{}}} along '{path}'",
            parts.first().copied().unwrap_or_default(),
            other
        )),
    }
}

/// Removes a dotted path; in arrays the element becomes null, as `$unset` does. Returns
/// whether something was there.
pub(crate) fn unset_path(doc: &mut Document, path: &str) -> bool {
    let parts: Vec<&str> = path.split('.').collect();
    unset_in_doc(doc, &parts)
}

fn unset_in_doc(doc: &mut Document, parts: &[&str]) -> bool {
    let Some((first, rest)) = parts.split_first() else {
        return false;
    };
    if rest.is_empty() {
        return doc.remove(*first).is_some();
    }
    match doc.get_mut(*first) {
        Some(Bson::Document(d)) => unset_in_doc(d, rest),
        Some(Bson::Array(items)) => {
            let Ok(i) = rest[0].parse::<usize>() else {
                return false;
            };
            match items.get_mut(i) {
                Some(item) if rest.len() == 1 => {
                    *item = Bson::Null;
                    true
                }
                Some(Bson::Document(d)) => unset_in_doc(d, &rest[1..]),
                _ => false,
            }
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    #[test]
    fn numbers_compare_across_types() {
        assert!(equal(&Bson::Int32(1), &Bson::Double(1.0)));
        assert!(equal(&Bson::Int64(1), &Bson::Int32(1)));
        assert_eq!(id_key(&Bson::Int32(5)), id_key(&Bson::Int64(5)));
        assert_ne!(id_key(&Bson::Int32(5)), id_key(&Bson::String("5".into())));
        assert_eq!(compare(&Bson::Null, &Bson::Int32(0)), Ordering::Less);
        assert_eq!(
            compare(&Bson::String("a".into()), &Bson::Int32(9)),
            Ordering::Greater
        );
    }

    #[test]
    fn paths_set_and_unset() {
        let mut d = doc! { "a": { "b": 1 }, "arr": [1, 2] };
        set_path(&mut d, "a.c.d", Bson::Int32(3)).unwrap();
        set_path(&mut d, "arr.3", Bson::Int32(4)).unwrap();
        assert_eq!(
            d,
            doc! { "a": { "b": 1, "c": { "d": 3 } }, "arr": [1, 2, null, 4] }
        );
        assert!(set_path(&mut d, "a.b.x", Bson::Int32(1)).is_err());
        assert!(unset_path(&mut d, "a.c"));
        assert!(unset_path(&mut d, "arr.0"));
        assert_eq!(d, doc! { "a": { "b": 1 }, "arr": [null, 2, null, 4] });
        assert_eq!(get_path(&d, "arr.3"), Some(&Bson::Int32(4)));
    }

    #[test]
    fn query_values_traverse_arrays() {
        let d = doc! { "a": [ { "b": 1 }, { "b": 2 }, { "c": 3 } ] };
        let vals = query_values(&d, "a.b");
        assert_eq!(
            vals,
            vec![Some(&Bson::Int32(1)), Some(&Bson::Int32(2)), None]
        );
        assert_eq!(query_values(&d, "x.y"), vec![None]);
    }
}
