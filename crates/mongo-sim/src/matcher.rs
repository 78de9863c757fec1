//! The query language subset: equality on dotted paths and arrays, comparison operators,
//! `$in $nin $exists $and $or $nor $not`. An unsupported operator is an error (BadValue),
//! never a silent match or non-match.

use std::{cmp::Ordering, ops::Bound};

use bson::{Bson, Document};

use crate::{
    catalog::IdOrd,
    error::{CmdError, CmdResult},
    value::{compare, equal, query_values, type_rank},
};

/// How deep `$and`/`$or`/`$nor` may nest (the server's query tree limit).
const MAX_TREE_DEPTH: usize = 100;

/// A parsed filter.
#[derive(Clone, Debug)]
pub(crate) enum Filter {
    /// Every clause holds.
    And(Vec<Filter>),
    /// Some clause holds.
    Or(Vec<Filter>),
    /// No clause holds.
    Nor(Vec<Filter>),
    /// A condition on one path.
    Field(String, Cond),
}

/// A condition on the values at a path.
#[derive(Clone, Debug)]
pub(crate) enum Cond {
    /// Equal to the value (or an array containing it).
    Eq(Bson),
    /// Not equal.
    Ne(Bson),
    /// Ordered comparison within the value's type bracket.
    Cmp(Ordering, bool, Bson),
    /// Equal to one of the values.
    In(Vec<Bson>),
    /// Equal to none of the values.
    Nin(Vec<Bson>),
    /// The path exists (or not).
    Exists(bool),
    /// Every listed condition holds.
    All(Vec<Cond>),
    /// The condition does not hold.
    Not(Box<Cond>),
}

impl Filter {
    /// Parses a filter document.
    pub(crate) fn parse(doc: &Document) -> CmdResult<Self> {
        Self::parse_at(doc, 0)
    }

    /// Parses a filter nested `depth` logical operators deep; past the server's limit (100)
    /// it is BadValue, as the server's query parser answers.
    fn parse_at(doc: &Document, depth: usize) -> CmdResult<Self> {
        let mut clauses = Vec::new();
        for (key, value) in doc {
            clauses.push(match key.as_str() {
                "$and" | "$or" | "$nor" => {
                    let Bson::Array(items) = value else {
                        return Err(CmdError::bad_value(format!("{key} must be an array")));
                    };
                    if items.is_empty() {
                        return Err(CmdError::bad_value(format!(
                            "{key} argument must be a non-empty array"
                        )));
                    }
                    if depth >= MAX_TREE_DEPTH {
                        return Err(CmdError::bad_value(format!(
                            "exceeded maximum query tree depth of {MAX_TREE_DEPTH} at {key}"
                        )));
                    }
                    let subs = items
                        .iter()
                        .map(|item| match item {
                            Bson::Document(d) => Filter::parse_at(d, depth + 1),
                            _ => Err(CmdError::bad_value(format!(
                                "{key} argument's entries must be objects"
                            ))),
                        })
                        .collect::<CmdResult<Vec<_>>>()?;
                    match key.as_str() {
                        "$and" => Filter::And(subs),
                        "$or" => Filter::Or(subs),
                        _ => Filter::Nor(subs),
                    }
                }
                k if k.starts_with('$') => {
                    return Err(CmdError::bad_value(format!(
                        "unknown top level operator: {k}"
                    )));
                }
                path => Filter::Field(path.to_owned(), parse_cond(value)?),
            });
        }
        Ok(if clauses.len() == 1 {
            clauses.remove(0)
        } else {
            Filter::And(clauses)
        })
    }

    /// Whether the document matches.
    pub(crate) fn matches(&self, doc: &Document) -> bool {
        match self {
            Filter::And(fs) => fs.iter().all(|f| f.matches(doc)),
            Filter::Or(fs) => fs.iter().any(|f| f.matches(doc)),
            Filter::Nor(fs) => !fs.iter().any(|f| f.matches(doc)),
            Filter::Field(path, cond) => {
                let values = query_values(doc, path);
                cond_matches(cond, &values)
            }
        }
    }
}

fn is_operator_doc(d: &Document) -> bool {
    d.keys().next().is_some_and(|k| k.starts_with('$'))
}

fn parse_cond(value: &Bson) -> CmdResult<Cond> {
    match value {
        Bson::Document(d) if is_operator_doc(d) => {
            let mut conds = Vec::new();
            for (op, arg) in d {
                conds.push(parse_operator(op, arg)?);
            }
            Ok(if conds.len() == 1 {
                conds.remove(0)
            } else {
                Cond::All(conds)
            })
        }
        Bson::RegularExpression(_) => Err(CmdError::bad_value(
            "regular expressions are not supported by mongo-sim",
        )),
        other => Ok(Cond::Eq(other.clone())),
    }
}

fn parse_operator(op: &str, arg: &Bson) -> CmdResult<Cond> {
    let list = |arg: &Bson| match arg {
        Bson::Array(items) => Ok(items.clone()),
        _ => Err(CmdError::bad_value(format!("{op} needs an array"))),
    };
    Ok(match op {
        "$eq" => Cond::Eq(arg.clone()),
        "$ne" => Cond::Ne(arg.clone()),
        "$gt" => Cond::Cmp(Ordering::Greater, false, arg.clone()),
        "$gte" => Cond::Cmp(Ordering::Greater, true, arg.clone()),
        "$lt" => Cond::Cmp(Ordering::Less, false, arg.clone()),
        "$lte" => Cond::Cmp(Ordering::Less, true, arg.clone()),
        "$in" => Cond::In(list(arg)?),
        "$nin" => Cond::Nin(list(arg)?),
        "$exists" => Cond::Exists(truthy(arg)),
        "$not" => match arg {
            Bson::Document(d) if is_operator_doc(d) => Cond::Not(Box::new(parse_cond(arg)?)),
            _ => return Err(CmdError::bad_value("$not needs a document of operators")),
        },
        other => {
            return Err(CmdError::bad_value(format!(
                "unknown operator: {other} (not supported by mongo-sim)"
            )));
        }
    })
}

fn truthy(v: &Bson) -> bool {
    match v {
        Bson::Boolean(b) => *b,
        Bson::Int32(n) => *n != 0,
        Bson::Int64(n) => *n != 0,
        Bson::Double(n) => *n != 0.0,
        Bson::Null | Bson::Undefined => false,
        _ => true,
    }
}

/// Equality as a query sees it: the value itself, or an element of an array value; `null`
/// also matches a missing field.
fn eq_matches(target: &Bson, values: &[Option<&Bson>]) -> bool {
    values.iter().any(|v| match v {
        None => matches!(target, Bson::Null),
        Some(v) => {
            equal(v, target)
                || matches!(v, Bson::Array(items) if items.iter().any(|i| equal(i, target)))
        }
    })
}

fn cmp_matches(dir: Ordering, or_equal: bool, target: &Bson, values: &[Option<&Bson>]) -> bool {
    let check = |v: &Bson| {
        let bracket_ok =
            type_rank(v) == type_rank(target) || matches!(target, Bson::MinKey | Bson::MaxKey);
        if !bracket_ok {
            return false;
        }
        let c = compare(v, target);
        c == dir || (or_equal && c == Ordering::Equal)
    };
    values.iter().any(|v| match v {
        None => or_equal && matches!(target, Bson::Null),
        Some(Bson::Array(items)) => check(&Bson::Array(items.clone())) || items.iter().any(check),
        Some(v) => check(v),
    })
}

fn cond_matches(cond: &Cond, values: &[Option<&Bson>]) -> bool {
    match cond {
        Cond::Eq(t) => eq_matches(t, values),
        Cond::Ne(t) => !eq_matches(t, values),
        Cond::Cmp(dir, or_equal, t) => cmp_matches(*dir, *or_equal, t, values),
        Cond::In(ts) => ts.iter().any(|t| eq_matches(t, values)),
        Cond::Nin(ts) => !ts.iter().any(|t| eq_matches(t, values)),
        Cond::Exists(want) => values.iter().any(Option::is_some) == *want,
        Cond::All(cs) => cs.iter().all(|c| cond_matches(c, values)),
        Cond::Not(c) => !cond_matches(c, values),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    fn m(filter: Document, d: Document) -> bool {
        Filter::parse(&filter).unwrap().matches(&d)
    }

    #[test]
    fn equality_and_arrays() {
        assert!(m(doc! { "a": 1 }, doc! { "a": 1.0 }));
        assert!(m(doc! { "a": 2 }, doc! { "a": [1, 2] }));
        assert!(m(doc! { "a": [1, 2] }, doc! { "a": [1, 2] }));
        assert!(m(doc! { "a.b": 2 }, doc! { "a": [{ "b": 1 }, { "b": 2 }] }));
        assert!(m(doc! { "x": null }, doc! { "a": 1 }));
        assert!(!m(doc! { "a": "1" }, doc! { "a": 1 }));
    }

    #[test]
    fn operators() {
        let d = doc! { "n": 5, "s": "b", "tags": ["x", "y"] };
        assert!(m(doc! { "n": { "$gt": 4, "$lte": 5 } }, d.clone()));
        assert!(
            !m(doc! { "n": { "$gt": "a" } }, d.clone()),
            "type bracketing"
        );
        assert!(m(doc! { "s": { "$in": ["a", "b"] } }, d.clone()));
        assert!(m(doc! { "tags": { "$nin": ["z"] } }, d.clone()));
        assert!(m(doc! { "q": { "$exists": false } }, d.clone()));
        assert!(m(doc! { "n": { "$not": { "$gt": 5 } } }, d.clone()));
        assert!(m(doc! { "$or": [{ "n": 1 }, { "s": "b" }] }, d.clone()));
        assert!(m(doc! { "$nor": [{ "n": 1 }] }, d.clone()));
        assert!(m(doc! { "n": { "$ne": 4 } }, d.clone()));
        assert!(m(
            doc! { "$and": [{ "n": 5 }, { "s": { "$gte": "b" } }] },
            d
        ));
    }

    #[test]
    fn unknown_operators_are_errors() {
        let err = Filter::parse(&doc! { "a": { "$regex": "x" } }).unwrap_err();
        assert_eq!(err.code, 2);
        assert!(Filter::parse(&doc! { "$where": "1" }).is_err());
        assert!(Filter::parse(&doc! { "$or": [] }).is_err());
    }
}

#[cfg(test)]
mod depth_tests {
    use super::*;
    use bson::doc;

    #[test]
    fn logical_nesting_past_the_servers_limit_is_bad_value() {
        let nest = |levels: usize| {
            let mut filter = doc! { "x": 1 };
            for _ in 0..levels {
                filter = doc! { "$or": [filter] };
            }
            filter
        };
        assert!(Filter::parse(&nest(MAX_TREE_DEPTH)).is_ok());
        let err = Filter::parse(&nest(MAX_TREE_DEPTH + 1)).unwrap_err();
        assert_eq!(err.code, crate::error::code::BAD_VALUE);
        assert!(err.message.contains("maximum query tree depth"), "{err}");
    }
}

/// The `_id` range a filter confines its matches to, in MongoDB's value order: a superset
/// of the matches (the filter is still applied to each), so an index scan of the range
/// finds every match. `None` when the range is empty.
pub(crate) fn id_range(filter: &Filter) -> Option<(Bound<IdOrd>, Bound<IdOrd>)> {
    let mut range = (Bound::Unbounded, Bound::Unbounded);
    narrow_filter(filter, &mut range);
    let empty = match (&range.0, &range.1) {
        (Bound::Included(l), Bound::Included(h)) => l > h,
        (Bound::Included(l) | Bound::Excluded(l), Bound::Included(h) | Bound::Excluded(h)) => {
            l >= h
        }
        _ => false,
    };
    (!empty).then_some(range)
}

type IdRange = (Bound<IdOrd>, Bound<IdOrd>);

fn narrow_filter(filter: &Filter, range: &mut IdRange) {
    match filter {
        Filter::And(clauses) => clauses.iter().for_each(|c| narrow_filter(c, range)),
        Filter::Field(path, cond) if path == "_id" => narrow_cond(cond, range),
        _ => {}
    }
}

fn narrow_cond(cond: &Cond, range: &mut IdRange) {
    let key = |v: &Bson| IdOrd(v.clone());
    match cond {
        Cond::All(conds) => conds.iter().for_each(|c| narrow_cond(c, range)),
        // Plain scalars only: a regular expression or a document of operators matches by
        // other rules.
        Cond::Eq(v)
            if matches!(
                v,
                Bson::Int32(_)
                    | Bson::Int64(_)
                    | Bson::Double(_)
                    | Bson::String(_)
                    | Bson::ObjectId(_)
                    | Bson::DateTime(_)
            ) =>
        {
            raise_low(range, Bound::Included(key(v)));
            lower_high(range, Bound::Included(key(v)));
        }
        Cond::Cmp(Ordering::Greater, or_equal, v) => raise_low(
            range,
            if *or_equal {
                Bound::Included(key(v))
            } else {
                Bound::Excluded(key(v))
            },
        ),
        Cond::Cmp(Ordering::Less, or_equal, v) => lower_high(
            range,
            if *or_equal {
                Bound::Included(key(v))
            } else {
                Bound::Excluded(key(v))
            },
        ),
        _ => {}
    }
}

/// Keeps the higher of two lower bounds.
fn raise_low(range: &mut IdRange, low: Bound<IdOrd>) {
    let higher = match (&range.0, &low) {
        (Bound::Unbounded, _) => true,
        (_, Bound::Unbounded) => false,
        (Bound::Included(a) | Bound::Excluded(a), Bound::Included(b) | Bound::Excluded(b)) => {
            b > a || (b == a && matches!(low, Bound::Excluded(_)))
        }
    };
    if higher {
        range.0 = low;
    }
}

/// Keeps the lower of two upper bounds.
fn lower_high(range: &mut IdRange, high: Bound<IdOrd>) {
    let lower = match (&range.1, &high) {
        (Bound::Unbounded, _) => true,
        (_, Bound::Unbounded) => false,
        (Bound::Included(a) | Bound::Excluded(a), Bound::Included(b) | Bound::Excluded(b)) => {
            b < a || (b == a && matches!(high, Bound::Excluded(_)))
        }
    };
    if lower {
        range.1 = high;
    }
}
