//! The matching rules of the unified test format: root-level documents may hold extra
//! fields, nested ones may not; `$$exists`, `$$unsetOrMatches`, `$$type`; numbers compare
//! across int, long and double. An operator this runner does not know is a failure with
//! its name, never a silent match.

use bson::{Bson, Document};

/// Matches `actual` against `expected`; the error names the path of the first mismatch.
pub fn matches(
    expected: &Bson,
    actual: Option<&Bson>,
    root: bool,
    path: &str,
) -> Result<(), String> {
    if let Bson::Document(exp) = expected
        && let Some((op, arg)) = single_operator(exp)
    {
        return special(op, arg, actual, root, path);
    }
    let Some(actual) = actual else {
        return Err(format!("{path}: expected {expected}, found nothing"));
    };
    match expected {
        Bson::Document(exp) => {
            let Bson::Document(act) = actual else {
                return Err(format!("{path}: expected a document, found {actual}"));
            };
            match_document(exp, act, root, path)
        }
        Bson::Array(exp) => {
            let Bson::Array(act) = actual else {
                return Err(format!("{path}: expected an array, found {actual}"));
            };
            if exp.len() != act.len() {
                return Err(format!(
                    "{path}: expected {} elements, found {} ({actual})",
                    exp.len(),
                    act.len()
                ));
            }
            for (i, (e, a)) in exp.iter().zip(act).enumerate() {
                matches(e, Some(a), false, &format!("{path}.{i}"))?;
            }
            Ok(())
        }
        _ => {
            if scalar_equal(expected, actual) {
                Ok(())
            } else {
                Err(format!("{path}: expected {expected}, found {actual}"))
            }
        }
    }
}

fn single_operator(doc: &Document) -> Option<(&str, &Bson)> {
    if doc.len() != 1 {
        return None;
    }
    let (k, v) = doc.iter().next()?;
    k.starts_with("$$").then_some((k.as_str(), v))
}

/// Matches a document, field by field.
pub fn match_document(
    exp: &Document,
    act: &Document,
    root: bool,
    path: &str,
) -> Result<(), String> {
    for (key, value) in exp {
        let sub = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        matches(value, act.get(key), false, &sub)?;
    }
    if !root && let Some(extra) = act.keys().find(|k| !exp.contains_key(*k)) {
        return Err(format!("{path}: unexpected field `{extra}` in {act}"));
    }
    Ok(())
}

fn special(
    op: &str,
    arg: &Bson,
    actual: Option<&Bson>,
    root: bool,
    path: &str,
) -> Result<(), String> {
    match op {
        "$$exists" => {
            let want = arg
                .as_bool()
                .ok_or_else(|| format!("{path}: $$exists needs a boolean"))?;
            match (want, actual.is_some()) {
                (true, true) | (false, false) => Ok(()),
                (true, false) => Err(format!("{path}: expected the field to exist")),
                (false, true) => Err(format!(
                    "{path}: expected no field, found {}",
                    actual.map_or_else(String::new, ToString::to_string)
                )),
            }
        }
        "$$unsetOrMatches" => match actual {
            None => Ok(()),
            Some(a) => matches(arg, Some(a), root, path),
        },
        "$$type" => {
            let Some(actual) = actual else {
                return Err(format!(
                    "{path}: expected a value of type {arg}, found nothing"
                ));
            };
            let names: Vec<&str> = match arg {
                Bson::String(s) => vec![s.as_str()],
                Bson::Array(items) => items.iter().filter_map(Bson::as_str).collect(),
                _ => return Err(format!("{path}: $$type needs a string or an array")),
            };
            let actual_name = type_name(actual);
            if names
                .iter()
                .any(|n| *n == actual_name || (*n == "number" && is_number(actual)))
            {
                Ok(())
            } else {
                Err(format!(
                    "{path}: expected type {arg}, found {actual_name} ({actual})"
                ))
            }
        }
        other => Err(format!(
            "{path}: the matcher {other} is not supported by this runner"
        )),
    }
}

fn is_number(v: &Bson) -> bool {
    matches!(
        v,
        Bson::Int32(_) | Bson::Int64(_) | Bson::Double(_) | Bson::Decimal128(_)
    )
}

/// The unified format's name for a value's BSON type.
fn type_name(v: &Bson) -> &'static str {
    match v {
        Bson::Double(_) => "double",
        Bson::String(_) => "string",
        Bson::Document(_) => "object",
        Bson::Array(_) => "array",
        Bson::Binary(_) => "binData",
        Bson::Undefined => "undefined",
        Bson::ObjectId(_) => "objectId",
        Bson::Boolean(_) => "bool",
        Bson::DateTime(_) => "date",
        Bson::Null => "null",
        Bson::RegularExpression(_) => "regex",
        Bson::DbPointer(_) => "dbPointer",
        Bson::JavaScriptCode(_) => "javascript",
        Bson::Symbol(_) => "symbol",
        Bson::JavaScriptCodeWithScope(_) => "javascriptWithScope",
        Bson::Int32(_) => "int",
        Bson::Timestamp(_) => "timestamp",
        Bson::Int64(_) => "long",
        Bson::Decimal128(_) => "decimal",
        Bson::MinKey => "minKey",
        Bson::MaxKey => "maxKey",
    }
}

fn scalar_equal(expected: &Bson, actual: &Bson) -> bool {
    let num = |v: &Bson| match v {
        Bson::Int32(n) => Some(f64::from(*n)),
        Bson::Int64(n) => Some(*n as f64),
        Bson::Double(n) => Some(*n),
        _ => None,
    };
    match (num(expected), num(actual)) {
        (Some(a), Some(b)) => a == b,
        _ => expected == actual,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    fn m(expected: Document, actual: Document) -> Result<(), String> {
        matches(
            &Bson::Document(expected),
            Some(&Bson::Document(actual)),
            true,
            "",
        )
    }

    #[test]
    fn root_allows_extra_fields_nested_does_not() {
        assert!(m(doc! { "x": 1 }, doc! { "x": 1, "y": 2 }).is_ok());
        assert!(m(doc! { "x": { "y": 1 } }, doc! { "x": { "y": 1, "z": 1 } }).is_err());
        assert!(m(doc! { "x": 1, "y": 1 }, doc! { "x": 1 }).is_err());
    }

    #[test]
    fn operators_and_numbers() {
        assert!(m(doc! { "ok": 1 }, doc! { "ok": 1.0 }).is_ok());
        assert!(m(doc! { "ok": 1 }, doc! { "ok": 1.5 }).is_err());
        assert!(m(doc! { "a": { "$$exists": false } }, doc! {}).is_ok());
        assert!(m(doc! { "a": { "$$exists": true } }, doc! {}).is_err());
        assert!(m(doc! { "a": { "$$unsetOrMatches": 2 } }, doc! {}).is_ok());
        assert!(m(doc! { "a": { "$$unsetOrMatches": 2 } }, doc! { "a": 3 }).is_err());
        assert!(
            m(
                doc! { "a": { "$$type": ["int", "long"] } },
                doc! { "a": 5_i64 }
            )
            .is_ok()
        );
        assert!(m(doc! { "a": { "$$type": "object" } }, doc! { "a": "s" }).is_err());
        let err = m(doc! { "a": { "$$matchesEntity": "x" } }, doc! { "a": 1 }).unwrap_err();
        assert!(err.contains("not supported"), "{err}");
        assert!(m(doc! { "a": [1, { "b": 2 }] }, doc! { "a": [1, { "b": 2 }] }).is_ok());
        assert!(m(doc! { "a": [1] }, doc! { "a": [1, 2] }).is_err());
    }
}
