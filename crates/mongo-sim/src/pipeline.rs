//! Aggregation expressions and the pipeline stages the simulator runs: after
//! `$changeStream`, in update pipelines, and in plain `aggregate`.

use std::cmp::Ordering;

use bson::{Bson, Document};

use crate::{
    error::{CmdError, CmdResult, code},
    matcher::Filter,
    value::{compare, get_path, set_path, unset_path},
};

/// Evaluates an expression against `root`; `None` is "missing".
pub(crate) fn eval(expr: &Bson, root: &Document) -> CmdResult<Option<Bson>> {
    match expr {
        Bson::String(s) if s.starts_with("$$") => match s.as_str() {
            "$$ROOT" | "$$CURRENT" => Ok(Some(Bson::Document(root.clone()))),
            "$$REMOVE" => Ok(None),
            other => {
                let name = other.trim_start_matches("$$");
                if let Some((var, rest)) = name.split_once('.')
                    && (var == "ROOT" || var == "CURRENT")
                {
                    return Ok(field_path(root, rest));
                }
                Err(CmdError::new(
                    17276,
                    format!("Use of undefined variable: {name}"),
                ))
            }
        },
        Bson::String(s) if s.starts_with('$') => Ok(field_path(root, &s[1..])),
        Bson::Document(d) => {
            if let Some(first) = d.keys().next()
                && first.starts_with('$')
            {
                return eval_operator(d, root);
            }
            let mut out = Document::new();
            for (k, v) in d {
                if let Some(value) = eval(v, root)? {
                    out.insert(k.clone(), value);
                }
            }
            Ok(Some(Bson::Document(out)))
        }
        Bson::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                out.push(eval(item, root)?.unwrap_or(Bson::Null));
            }
            Ok(Some(Bson::Array(out)))
        }
        other => Ok(Some(other.clone())),
    }
}

fn eval_operator(d: &Document, root: &Document) -> CmdResult<Option<Bson>> {
    if d.len() != 1 {
        return Err(CmdError::new(
            15983,
            "an expression specification must contain exactly one field",
        ));
    }
    let (op, arg) = d
        .iter()
        .next()
        .ok_or_else(|| CmdError::bad_value("empty expression"))?;
    match op.as_str() {
        "$literal" => Ok(Some(arg.clone())),
        "$ifNull" => {
            let Bson::Array(args) = arg else {
                return Err(CmdError::bad_value("$ifNull needs an array"));
            };
            for a in args {
                match eval(a, root)? {
                    None | Some(Bson::Null) => continue,
                    some => return Ok(some),
                }
            }
            Ok(Some(Bson::Null))
        }
        other => Err(CmdError::new(
            code::INVALID_PIPELINE_OPERATOR,
            format!("Unrecognized expression '{other}' (not supported by mongo-sim)"),
        )),
    }
}

/// `$a.b` in aggregation: arrays along the way map to arrays of their elements' values.
fn field_path(root: &Document, path: &str) -> Option<Bson> {
    let mut parts = path.split('.');
    let first = parts.next()?;
    let mut cur = root.get(first)?.clone();
    for part in parts {
        cur = match cur {
            Bson::Document(d) => d.get(part)?.clone(),
            Bson::Array(items) => Bson::Array(
                items
                    .into_iter()
                    .filter_map(|i| match i {
                        Bson::Document(d) => d.get(part).cloned(),
                        _ => None,
                    })
                    .collect(),
            ),
            _ => return None,
        };
    }
    Some(cur)
}

/// A parsed pipeline stage.
#[derive(Clone, Debug)]
pub(crate) enum Stage {
    /// `$match`.
    Match(Filter),
    /// `$project`.
    Project(Projection),
    /// `$addFields` / `$set`.
    AddFields(Document),
    /// `$unset`.
    Unset(Vec<String>),
    /// `$replaceRoot` / `$replaceWith`.
    ReplaceRoot(Bson),
    /// `$skip`.
    Skip(u64),
    /// `$limit`.
    Limit(u64),
    /// `$sort`.
    Sort(Document),
    /// `$count`.
    Count(String),
    /// `$group`, with a constant or field-path `_id` and simple accumulators.
    Group(Bson, Vec<(String, String, Bson)>),
}

/// Which stages a context allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Context {
    /// After `$changeStream`: per-document stages only.
    ChangeStream,
    /// An update pipeline.
    Update,
    /// A plain `aggregate`.
    Aggregate,
}

fn as_u64(v: &Bson, what: &str) -> CmdResult<u64> {
    match v {
        Bson::Int32(n) if *n >= 0 => Ok(*n as u64),
        Bson::Int64(n) if *n >= 0 => Ok(*n as u64),
        Bson::Double(n) if *n >= 0.0 && n.fract() == 0.0 => Ok(*n as u64),
        _ => Err(CmdError::bad_value(format!(
            "{what} must be a non-negative integer"
        ))),
    }
}

/// Parses a pipeline for a context.
pub(crate) fn parse_pipeline(stages: &[Bson], ctx: Context) -> CmdResult<Vec<Stage>> {
    stages.iter().map(|s| parse_stage(s, ctx)).collect()
}

fn parse_stage(stage: &Bson, ctx: Context) -> CmdResult<Stage> {
    let Bson::Document(d) = stage else {
        return Err(CmdError::type_mismatch("pipeline", "an array of objects"));
    };
    if d.len() != 1 {
        return Err(CmdError::new(
            40323,
            "A pipeline stage specification object must contain exactly one field.",
        ));
    }
    let Some((name, spec)) = d.iter().next() else {
        return Err(CmdError::bad_value("empty stage"));
    };
    let doc_spec = |what: &str| match spec {
        Bson::Document(s) => Ok(s.clone()),
        _ => Err(CmdError::new(
            15969,
            format!("{what} specification must be an object"),
        )),
    };
    let per_document = matches!(
        name.as_str(),
        "$match" | "$project" | "$addFields" | "$set" | "$unset" | "$replaceRoot" | "$replaceWith"
    );
    let known = per_document
        || matches!(
            name.as_str(),
            "$skip" | "$limit" | "$sort" | "$count" | "$group"
        );
    if !known {
        return Err(CmdError::new(
            code::UNRECOGNIZED_PIPELINE_STAGE,
            format!("Unrecognized pipeline stage name: '{name}'"),
        ));
    }
    if ctx == Context::ChangeStream && !per_document {
        return Err(CmdError::new(
            code::ILLEGAL_OPERATION,
            format!("Stage {name} is not permitted in a $changeStream pipeline"),
        ));
    }
    if ctx == Context::Update && (name == "$match" || !per_document) {
        return Err(CmdError::new(
            code::INVALID_OPTIONS,
            format!("{name} is not allowed to be used within an update"),
        ));
    }
    Ok(match name.as_str() {
        "$match" => Stage::Match(Filter::parse(&doc_spec("$match")?)?),
        "$project" => Stage::Project(Projection::parse(&doc_spec("$project")?)?),
        "$addFields" | "$set" => Stage::AddFields(doc_spec(name)?),
        "$unset" => Stage::Unset(match spec {
            Bson::String(s) => vec![s.clone()],
            Bson::Array(items) => items
                .iter()
                .map(|i| match i {
                    Bson::String(s) => Ok(s.clone()),
                    _ => Err(CmdError::bad_value(
                        "$unset specification must be a string or an array of strings",
                    )),
                })
                .collect::<CmdResult<_>>()?,
            _ => {
                return Err(CmdError::bad_value(
                    "$unset specification must be a string or an array of strings",
                ));
            }
        }),
        "$replaceRoot" => {
            let s = doc_spec("$replaceRoot")?;
            Stage::ReplaceRoot(s.get("newRoot").cloned().ok_or_else(|| {
                CmdError::new(40231, "no newRoot specified for the $replaceRoot stage")
            })?)
        }
        "$replaceWith" => Stage::ReplaceRoot(spec.clone()),
        "$skip" => Stage::Skip(as_u64(spec, "$skip")?),
        "$limit" => Stage::Limit(as_u64(spec, "$limit")?),
        "$sort" => Stage::Sort(doc_spec("$sort")?),
        "$count" => match spec {
            Bson::String(s) if !s.is_empty() && !s.starts_with('$') => Stage::Count(s.clone()),
            _ => return Err(CmdError::bad_value("$count needs a non-empty field name")),
        },
        "$group" => {
            let s = doc_spec("$group")?;
            let id = s
                .get("_id")
                .cloned()
                .ok_or_else(|| CmdError::new(15955, "a group specification must include an _id"))?;
            let mut accs = Vec::new();
            for (field, acc) in s.iter().filter(|(k, _)| k.as_str() != "_id") {
                let Bson::Document(a) = acc else {
                    return Err(CmdError::new(
                        40234,
                        format!("The field '{field}' must be an accumulator object"),
                    ));
                };
                let Some((op, arg)) = a.iter().next() else {
                    return Err(CmdError::new(
                        40234,
                        format!("The field '{field}' must be an accumulator object"),
                    ));
                };
                if !matches!(
                    op.as_str(),
                    "$sum" | "$first" | "$last" | "$min" | "$max" | "$push"
                ) {
                    return Err(CmdError::new(
                        15952,
                        format!("unknown group operator '{op}' (not supported by mongo-sim)"),
                    ));
                }
                accs.push((field.clone(), op.clone(), arg.clone()));
            }
            Stage::Group(id, accs)
        }
        _ => unreachable!("checked above"),
    })
}

/// Applies one per-document stage; `None` drops the document.
pub(crate) fn apply_to_document(stage: &Stage, doc: Document) -> CmdResult<Option<Document>> {
    match stage {
        Stage::Match(f) => Ok(f.matches(&doc).then_some(doc)),
        Stage::Project(p) => p.apply(&doc).map(Some),
        Stage::AddFields(spec) => {
            let mut out = doc.clone();
            for (path, expr) in spec {
                match eval(expr, &doc)? {
                    Some(v) => set_path(&mut out, path, v).map_err(CmdError::bad_value)?,
                    None => {
                        unset_path(&mut out, path);
                    }
                }
            }
            Ok(Some(out))
        }
        Stage::Unset(paths) => {
            let mut out = doc;
            for p in paths {
                unset_path(&mut out, p);
            }
            Ok(Some(out))
        }
        Stage::ReplaceRoot(expr) => match eval(expr, &doc)? {
            Some(Bson::Document(d)) => Ok(Some(d)),
            other => Err(CmdError::new(
                40228,
                format!(
                    "'replacement document' must evaluate to an object, but resulting value was: {}",
                    other.map_or_else(|| "MISSING".to_owned(), |v| v.to_string())
                ),
            )),
        },
        _ => Err(CmdError::bad_value("stage does not apply per document")),
    }
}

/// Runs a whole pipeline over documents (plain `aggregate`).
pub(crate) fn run(stages: &[Stage], docs: Vec<Document>) -> CmdResult<Vec<Document>> {
    let mut docs = docs;
    for stage in stages {
        docs = match stage {
            Stage::Skip(n) => docs.into_iter().skip(*n as usize).collect(),
            Stage::Limit(n) => docs.into_iter().take(*n as usize).collect(),
            Stage::Sort(spec) => {
                sort_documents(&mut docs, spec)?;
                docs
            }
            Stage::Count(field) => {
                if docs.is_empty() {
                    Vec::new()
                } else {
                    let mut d = Document::new();
                    d.insert(field.clone(), docs.len() as i32);
                    vec![d]
                }
            }
            Stage::Group(id, accs) => group(id, accs, docs)?,
            per_doc => {
                let mut out = Vec::with_capacity(docs.len());
                for d in docs {
                    if let Some(d) = apply_to_document(per_doc, d)? {
                        out.push(d);
                    }
                }
                out
            }
        };
    }
    Ok(docs)
}

fn group(
    id: &Bson,
    accs: &[(String, String, Bson)],
    docs: Vec<Document>,
) -> CmdResult<Vec<Document>> {
    let mut groups: Vec<(Bson, Document)> = Vec::new();
    for doc in docs {
        let key = eval(id, &doc)?.unwrap_or(Bson::Null);
        let index = match groups
            .iter()
            .position(|(k, _)| compare(k, &key) == Ordering::Equal)
        {
            Some(i) => i,
            None => {
                let mut out = Document::new();
                out.insert("_id", key.clone());
                groups.push((key, out));
                groups.len() - 1
            }
        };
        let out = &mut groups[index].1;
        for (field, op, arg) in accs {
            let value = eval(arg, &doc)?;
            let current = out.get(field).cloned();
            let next = match op.as_str() {
                "$sum" => {
                    let add = match value {
                        Some(Bson::Int32(n)) => Bson::Int64(i64::from(n)),
                        Some(v @ (Bson::Int64(_) | Bson::Double(_))) => v,
                        _ => Bson::Int64(0),
                    };
                    add_numbers(current.unwrap_or(Bson::Int64(0)), add)
                }
                "$first" => current.unwrap_or_else(|| value.unwrap_or(Bson::Null)),
                "$last" => value.unwrap_or(Bson::Null),
                "$min" | "$max" => match (current, value) {
                    (None, Some(v)) | (Some(v), None) => v,
                    (None, None) => Bson::Null,
                    (Some(c), Some(v)) => {
                        let ord = compare(&v, &c);
                        let take = if op == "$min" {
                            ord == Ordering::Less
                        } else {
                            ord == Ordering::Greater
                        };
                        if take { v } else { c }
                    }
                },
                _ => {
                    let mut list = match current {
                        Some(Bson::Array(a)) => a,
                        _ => Vec::new(),
                    };
                    if let Some(v) = value {
                        list.push(v);
                    }
                    Bson::Array(list)
                }
            };
            out.insert(field.clone(), next);
        }
    }
    Ok(groups
        .into_iter()
        .map(|(_, mut d)| {
            for (field, _, _) in accs {
                if let Some(Bson::Int64(n)) = d.get(field)
                    && let Ok(small) = i32::try_from(*n)
                {
                    d.insert(field.clone(), small);
                }
            }
            d
        })
        .collect())
}

fn add_numbers(a: Bson, b: Bson) -> Bson {
    match (a, b) {
        (Bson::Int64(x), Bson::Int64(y)) => Bson::Int64(x.wrapping_add(y)),
        (Bson::Double(x), Bson::Int64(y)) | (Bson::Int64(y), Bson::Double(x)) => {
            Bson::Double(x + y as f64)
        }
        (Bson::Double(x), Bson::Double(y)) => Bson::Double(x + y),
        (a, _) => a,
    }
}

/// Sorts by a `{path: 1 | -1}` specification, in MongoDB's value order.
pub(crate) fn sort_documents(docs: &mut [Document], spec: &Document) -> CmdResult<()> {
    let mut keys = Vec::new();
    for (path, dir) in spec {
        let dir = match dir {
            Bson::Int32(1) | Bson::Int64(1) => Ordering::Less,
            Bson::Int32(-1) | Bson::Int64(-1) => Ordering::Greater,
            Bson::Double(d) if *d == 1.0 => Ordering::Less,
            Bson::Double(d) if *d == -1.0 => Ordering::Greater,
            _ => {
                return Err(CmdError::new(
                    15975,
                    "$sort key ordering must be 1 (for ascending) or -1 (for descending)",
                ));
            }
        };
        keys.push((path.clone(), dir));
    }
    docs.sort_by(|a, b| {
        for (path, dir) in &keys {
            let va = get_path(a, path).unwrap_or(&Bson::Null);
            let vb = get_path(b, path).unwrap_or(&Bson::Null);
            let c = compare(va, vb);
            if c != Ordering::Equal {
                return if *dir == Ordering::Less {
                    c
                } else {
                    c.reverse()
                };
            }
        }
        Ordering::Equal
    });
    Ok(())
}

/// A `$project` (or `find` projection) specification.
#[derive(Clone, Debug)]
pub(crate) struct Projection {
    exclusion: bool,
    include_id: bool,
    fields: Vec<(String, ProjField)>,
}

#[derive(Clone, Debug)]
enum ProjField {
    Include,
    Exclude,
    Computed(Bson),
    Nested(Projection),
}

fn is_flag(v: &Bson) -> Option<bool> {
    match v {
        Bson::Boolean(b) => Some(*b),
        Bson::Int32(n) => Some(*n != 0),
        Bson::Int64(n) => Some(*n != 0),
        Bson::Double(n) => Some(*n != 0.0),
        _ => None,
    }
}

impl Projection {
    /// Parses a specification; mixing inclusion and exclusion (other than `_id`) is an error.
    pub(crate) fn parse(spec: &Document) -> CmdResult<Self> {
        let mut include_id = true;
        let mut fields = Vec::new();
        let mut saw_include = false;
        let mut saw_exclude = false;
        for (k, v) in spec {
            let field = match is_flag(v) {
                Some(flag) if k == "_id" => {
                    include_id = flag;
                    continue;
                }
                Some(true) => {
                    saw_include = true;
                    ProjField::Include
                }
                Some(false) => {
                    saw_exclude = true;
                    ProjField::Exclude
                }
                None => match v {
                    Bson::Document(d) if d.keys().next().is_some_and(|k| !k.starts_with('$')) => {
                        let nested = Projection::parse(d)?;
                        if nested.exclusion {
                            saw_exclude = true;
                        } else {
                            saw_include = true;
                        }
                        ProjField::Nested(nested)
                    }
                    other => {
                        saw_include = true;
                        ProjField::Computed(other.clone())
                    }
                },
            };
            fields.push((k.clone(), field));
        }
        if saw_include && saw_exclude {
            return Err(CmdError::new(
                31254,
                "Cannot do exclusion and inclusion in the same projection",
            ));
        }
        Ok(Self {
            exclusion: saw_exclude || (!saw_include && !include_id),
            include_id,
            fields,
        })
    }

    /// Applies the projection.
    pub(crate) fn apply(&self, doc: &Document) -> CmdResult<Document> {
        self.apply_with_root(doc, doc, true)
    }

    fn apply_with_root(&self, doc: &Document, root: &Document, top: bool) -> CmdResult<Document> {
        if self.exclusion {
            let mut out = doc.clone();
            if top && !self.include_id {
                out.remove("_id");
            }
            for (path, field) in &self.fields {
                match field {
                    ProjField::Exclude => {
                        unset_path(&mut out, path);
                    }
                    ProjField::Nested(p) => {
                        if let Some(Bson::Document(sub)) = out.get(path).cloned() {
                            out.insert(path.clone(), p.apply_with_root(&sub, root, false)?);
                        }
                    }
                    _ => {}
                }
            }
            return Ok(out);
        }
        let mut out = Document::new();
        if top
            && self.include_id
            && let Some(id) = doc.get("_id")
        {
            out.insert("_id", id.clone());
        }
        for (path, field) in &self.fields {
            match field {
                ProjField::Include => {
                    if let Some(v) = get_path(doc, path) {
                        set_path(&mut out, path, v.clone()).map_err(CmdError::bad_value)?;
                    }
                }
                ProjField::Computed(expr) => {
                    if let Some(v) = eval(expr, root)? {
                        set_path(&mut out, path, v).map_err(CmdError::bad_value)?;
                    }
                }
                ProjField::Nested(p) => {
                    let sub = match get_path(doc, path) {
                        Some(Bson::Document(d)) => d.clone(),
                        _ => Document::new(),
                    };
                    let projected = p.apply_with_root(&sub, root, false)?;
                    if !projected.is_empty() {
                        set_path(&mut out, path, Bson::Document(projected))
                            .map_err(CmdError::bad_value)?;
                    }
                }
                ProjField::Exclude => {}
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    #[test]
    fn project_modes() {
        let d =
            doc! { "_id": 1, "operationType": "insert", "ns": { "db": "d", "coll": "c" }, "x": 1 };
        let p =
            Projection::parse(&doc! { "optype": "$operationType", "ns": 1, "newField": "value" })
                .unwrap();
        assert_eq!(
            p.apply(&d).unwrap(),
            doc! { "_id": 1, "optype": "insert", "ns": { "db": "d", "coll": "c" }, "newField": "value" }
        );
        let p =
            Projection::parse(&doc! { "operationType": "insert", "ns.viewOn": "db.coll" }).unwrap();
        assert_eq!(
            p.apply(&d).unwrap(),
            doc! { "_id": 1, "operationType": "insert", "ns": { "viewOn": "db.coll" } }
        );
        let p = Projection::parse(
            &doc! { "ns": { "db": "$ns.db", "coll": "$ns.coll", "viewOn": "db.coll" } },
        )
        .unwrap();
        assert_eq!(
            p.apply(&d).unwrap(),
            doc! { "_id": 1, "ns": { "db": "d", "coll": "c", "viewOn": "db.coll" } }
        );
        let p = Projection::parse(&doc! { "_id": 0 }).unwrap();
        assert_eq!(
            p.apply(&d).unwrap(),
            doc! { "operationType": "insert", "ns": { "db": "d", "coll": "c" }, "x": 1 }
        );
        assert!(Projection::parse(&doc! { "a": 1, "b": 0 }).is_err());
    }

    #[test]
    fn add_fields_and_group() {
        let stages = parse_pipeline(
            &[
                Bson::Document(doc! { "$addFields": { "t": "$ns.db", "k": { "$literal": "$x" } } }),
                Bson::Document(doc! { "$unset": "ns" }),
            ],
            Context::ChangeStream,
        )
        .unwrap();
        let out = run(&stages, vec![doc! { "ns": { "db": "d" } }]).unwrap();
        assert_eq!(out, vec![doc! { "t": "d", "k": "$x" }]);
        let count = parse_pipeline(
            &[Bson::Document(
                doc! { "$group": { "_id": 1, "n": { "$sum": 1 } } },
            )],
            Context::Aggregate,
        )
        .unwrap();
        assert_eq!(
            run(&count, vec![doc! {}, doc! {}]).unwrap(),
            vec![doc! { "_id": 1, "n": 2 }]
        );
    }

    #[test]
    fn bad_stages_have_codes() {
        let err = parse_pipeline(
            &[Bson::Document(doc! { "$unsupported": "foo" })],
            Context::ChangeStream,
        )
        .unwrap_err();
        assert_eq!(err.code, 40324);
        let err = parse_pipeline(
            &[Bson::Document(doc! { "$group": { "_id": 1 } })],
            Context::ChangeStream,
        )
        .unwrap_err();
        assert_eq!(err.code, code::ILLEGAL_OPERATION);
        let err = eval(&Bson::Document(doc! { "$concatArrays": [] }), &doc! {}).unwrap_err();
        assert_eq!(err.code, code::INVALID_PIPELINE_OPERATOR);
    }
}
