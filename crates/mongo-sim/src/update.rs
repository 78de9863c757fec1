//! Updates: replacement documents, the operators `$set $unset $inc $setOnInsert $push`,
//! and pipeline-style updates; and the delta between two versions of a document that
//! `updateDescription` reports.

use bson::{Bson, Document};

use crate::{
    error::{CmdError, CmdResult, code},
    pipeline::{Context, Stage, apply_to_document, parse_pipeline},
    value::{get_path, set_path, unset_path},
};

/// A parsed `u` of an update statement.
#[derive(Clone, Debug)]
pub(crate) enum UpdateSpec {
    /// A whole new document (keeps `_id`).
    Replacement(Document),
    /// Update operators, in order.
    Operators(Document),
    /// An aggregation pipeline.
    Pipeline(Vec<Stage>),
}

impl UpdateSpec {
    /// Parses `u`.
    pub(crate) fn parse(u: &Bson) -> CmdResult<Self> {
        match u {
            Bson::Array(stages) => Ok(Self::Pipeline(parse_pipeline(stages, Context::Update)?)),
            Bson::Document(d) => {
                let ops = d.keys().filter(|k| k.starts_with('$')).count();
                if ops == 0 {
                    return Ok(Self::Replacement(d.clone()));
                }
                if ops != d.len() {
                    return Err(CmdError::new(
                        code::FAILED_TO_PARSE,
                        "update document mixes operators and fields",
                    ));
                }
                for (op, arg) in d {
                    if !matches!(
                        op.as_str(),
                        "$set" | "$unset" | "$inc" | "$setOnInsert" | "$push"
                    ) {
                        return Err(CmdError::new(
                            code::FAILED_TO_PARSE,
                            format!(
                                "Unknown modifier: {op}. Expected a valid update modifier or pipeline-style update specified as an array (mongo-sim supports $set $unset $inc $setOnInsert $push)"
                            ),
                        ));
                    }
                    if !matches!(arg, Bson::Document(_)) {
                        return Err(CmdError::new(
                            code::FAILED_TO_PARSE,
                            format!(
                                "Modifiers operate on fields but we found type {:?} instead",
                                arg.element_type()
                            ),
                        ));
                    }
                }
                Ok(Self::Operators(d.clone()))
            }
            _ => Err(CmdError::type_mismatch("u", "object or array")),
        }
    }

    /// Whether this is a replacement (a `replace` event rather than `update`).
    pub(crate) fn is_replacement(&self) -> bool {
        matches!(self, Self::Replacement(_))
    }

    /// Applies the update to `old`. `inserting` is true for an upsert's new document (then
    /// `$setOnInsert` applies).
    pub(crate) fn apply(&self, old: &Document, inserting: bool) -> CmdResult<Document> {
        let new = match self {
            Self::Replacement(r) => {
                let mut out = Document::new();
                if let Some(id) = old.get("_id") {
                    out.insert("_id", id.clone());
                }
                for (k, v) in r {
                    if k == "_id" && old.contains_key("_id") {
                        continue;
                    }
                    out.insert(k.clone(), v.clone());
                }
                if let (Some(a), Some(b)) = (old.get("_id"), r.get("_id"))
                    && a != b
                {
                    return Err(immutable_id());
                }
                out
            }
            Self::Operators(ops) => {
                let mut out = old.clone();
                for (op, arg) in ops {
                    let Bson::Document(fields) = arg else {
                        continue;
                    };
                    for (path, value) in fields {
                        apply_operator(&mut out, op, path, value, inserting)?;
                    }
                }
                out
            }
            Self::Pipeline(stages) => {
                let mut doc = old.clone();
                for stage in stages {
                    doc = apply_to_document(stage, doc)?.ok_or_else(|| {
                        CmdError::bad_value("update pipeline removed the document")
                    })?;
                }
                doc
            }
        };
        if old.get("_id").is_some() && new.get("_id") != old.get("_id") {
            return Err(immutable_id());
        }
        Ok(new)
    }
}

fn immutable_id() -> CmdError {
    CmdError::new(
        code::IMMUTABLE_FIELD,
        "Performing an update on the path '_id' would modify the immutable field '_id'",
    )
}

fn apply_operator(
    doc: &mut Document,
    op: &str,
    path: &str,
    value: &Bson,
    inserting: bool,
) -> CmdResult<()> {
    match op {
        "$set" => set_path(doc, path, value.clone()).map_err(|m| CmdError::new(28, m)),
        "$setOnInsert" if inserting => {
            set_path(doc, path, value.clone()).map_err(|m| CmdError::new(28, m))
        }
        "$setOnInsert" => Ok(()),
        "$unset" => {
            unset_path(doc, path);
            Ok(())
        }
        "$inc" => {
            let current = get_path(doc, path).cloned();
            let next = match (current, value) {
                (None, v @ (Bson::Int32(_) | Bson::Int64(_) | Bson::Double(_))) => v.clone(),
                (Some(Bson::Int32(a)), Bson::Int32(b)) => match a.checked_add(*b) {
                    Some(n) => Bson::Int32(n),
                    None => Bson::Int64(i64::from(a) + i64::from(*b)),
                },
                (Some(Bson::Int32(a)), Bson::Int64(b)) => {
                    Bson::Int64(i64::from(a).wrapping_add(*b))
                }
                (Some(Bson::Int64(a)), Bson::Int32(b)) => {
                    Bson::Int64(a.wrapping_add(i64::from(*b)))
                }
                (Some(Bson::Int64(a)), Bson::Int64(b)) => Bson::Int64(a.wrapping_add(*b)),
                (Some(Bson::Double(a)), Bson::Int32(b)) => Bson::Double(a + f64::from(*b)),
                (Some(Bson::Double(a)), Bson::Int64(b)) => Bson::Double(a + *b as f64),
                (Some(Bson::Double(a)), Bson::Double(b)) => Bson::Double(a + b),
                (Some(Bson::Int32(a)), Bson::Double(b)) => Bson::Double(f64::from(a) + b),
                (Some(Bson::Int64(a)), Bson::Double(b)) => Bson::Double(a as f64 + b),
                _ => {
                    return Err(CmdError::new(
                        code::TYPE_MISMATCH,
                        format!("Cannot apply $inc to a value of non-numeric type at '{path}'"),
                    ));
                }
            };
            set_path(doc, path, next).map_err(|m| CmdError::new(28, m))
        }
        "$push" => {
            let mut list = match get_path(doc, path) {
                None => Vec::new(),
                Some(Bson::Array(items)) => items.clone(),
                Some(_) => {
                    return Err(CmdError::new(
                        code::BAD_VALUE,
                        format!("The field '{path}' must be an array"),
                    ));
                }
            };
            match value {
                Bson::Document(d) if d.contains_key("$each") => match d.get("$each") {
                    Some(Bson::Array(each)) => list.extend(each.iter().cloned()),
                    _ => return Err(CmdError::bad_value("$each needs an array")),
                },
                v => list.push(v.clone()),
            }
            set_path(doc, path, Bson::Array(list)).map_err(|m| CmdError::new(28, m))
        }
        _ => Err(CmdError::new(
            code::FAILED_TO_PARSE,
            format!("Unknown modifier: {op}"),
        )),
    }
}

/// One component of a changed path.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Comp {
    /// A field name.
    Field(String),
    /// An array index.
    Index(usize),
}

/// A dotted path, with each component's kind kept for `disambiguatedPaths`.
pub(crate) type Path = Vec<Comp>;

/// Renders a path the way `updatedFields` keys it.
pub(crate) fn dotted(path: &Path) -> String {
    path.iter()
        .map(|c| match c {
            Comp::Field(f) => f.clone(),
            Comp::Index(i) => i.to_string(),
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// Whether a path needs disambiguating: a field name that looks like an index or holds a dot.
pub(crate) fn ambiguous(path: &Path) -> bool {
    path.iter().any(|c| match c {
        Comp::Field(f) => {
            f.contains('.') || (!f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()))
        }
        Comp::Index(_) => false,
    })
}

/// What changed between two versions of a document.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Delta {
    /// Set or changed paths with their new values.
    pub(crate) updated: Vec<(Path, Bson)>,
    /// Removed paths.
    pub(crate) removed: Vec<Path>,
    /// Arrays shortened, with their new length.
    pub(crate) truncated: Vec<(Path, u32)>,
}

/// Computes the delta from `old` to `new`.
pub(crate) fn delta(old: &Document, new: &Document) -> Delta {
    let mut out = Delta::default();
    diff_docs(old, new, &mut Vec::new(), &mut out);
    out
}

fn diff_docs(old: &Document, new: &Document, prefix: &mut Path, out: &mut Delta) {
    for (k, _) in old {
        if !new.contains_key(k) {
            prefix.push(Comp::Field(k.clone()));
            out.removed.push(prefix.clone());
            prefix.pop();
        }
    }
    for (k, nv) in new {
        prefix.push(Comp::Field(k.clone()));
        match old.get(k) {
            None => out.updated.push((prefix.clone(), nv.clone())),
            Some(ov) => diff_values(ov, nv, prefix, out),
        }
        prefix.pop();
    }
}

fn diff_values(ov: &Bson, nv: &Bson, prefix: &mut Path, out: &mut Delta) {
    if ov == nv {
        return;
    }
    match (ov, nv) {
        (Bson::Document(o), Bson::Document(n)) => diff_docs(o, n, prefix, out),
        (Bson::Array(o), Bson::Array(n)) => {
            if n.len() < o.len() {
                out.truncated.push((prefix.clone(), n.len() as u32));
            }
            for (i, nv) in n.iter().enumerate() {
                prefix.push(Comp::Index(i));
                match o.get(i) {
                    Some(ov) => diff_values(ov, nv, prefix, out),
                    None => out.updated.push((prefix.clone(), nv.clone())),
                }
                prefix.pop();
            }
        }
        _ => out.updated.push((prefix.clone(), nv.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    #[test]
    fn operators_apply() {
        let spec = UpdateSpec::parse(&Bson::Document(
            doc! { "$set": { "a.b": 1 }, "$inc": { "n": 2 }, "$unset": { "gone": "" } },
        ))
        .unwrap();
        let out = spec
            .apply(&doc! { "_id": 1, "n": 1, "gone": true }, false)
            .unwrap();
        assert_eq!(out, doc! { "_id": 1, "n": 3, "a": { "b": 1 } });
        assert!(UpdateSpec::parse(&Bson::Document(doc! { "$rename": { "a": "b" } })).is_err());
        let bad = UpdateSpec::parse(&Bson::Document(doc! { "$set": { "_id": 2 } })).unwrap();
        assert_eq!(
            bad.apply(&doc! { "_id": 1 }, false).unwrap_err().code,
            code::IMMUTABLE_FIELD
        );
    }

    #[test]
    fn replacement_keeps_id() {
        let spec = UpdateSpec::parse(&Bson::Document(doc! { "x": 3 })).unwrap();
        assert!(spec.is_replacement());
        assert_eq!(
            spec.apply(&doc! { "_id": 1, "x": 2 }, false).unwrap(),
            doc! { "_id": 1, "x": 3 }
        );
    }

    #[test]
    fn delta_reports_truncation_and_paths() {
        let old =
            doc! { "_id": 1, "array": ["foo", { "a": "bar" }, 1, 2, 3], "a": { "1": 1 }, "r": 1 };
        let new = doc! { "_id": 1, "array": ["foo", { "a": "bar" }], "a": { "1": 2 } };
        let d = delta(&old, &new);
        assert_eq!(d.truncated, vec![(vec![Comp::Field("array".into())], 2)]);
        assert_eq!(d.removed, vec![vec![Comp::Field("r".into())]]);
        assert_eq!(d.updated.len(), 1);
        assert_eq!(dotted(&d.updated[0].0), "a.1");
        assert!(ambiguous(&d.updated[0].0));
        assert!(!ambiguous(&vec![Comp::Field("a".into()), Comp::Index(0)]));
    }
}
