//! The query language subset: equality on dotted paths and arrays, comparison operators,
//! `$in $nin $exists $and $or $nor $not`, and regular expressions (`$regex` with
//! `$options`, BSON regular-expression values, in `$in`/`$nin` lists and under `$not`). An
//! unsupported operator is an error (BadValue), never a silent match or non-match.

use std::{cmp::Ordering, ops::Bound};

use bson::{Bson, Document};

use crate::{
    catalog::IdOrd,
    error::{CmdError, CmdResult, code},
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
    /// Equal to one of the values, or matching one of the regular expressions.
    In(Vec<Bson>, Vec<Pattern>),
    /// Equal to none of the values and matching none of the regular expressions.
    Nin(Vec<Bson>, Vec<Pattern>),
    /// A string value (or an array element) matches the regular expression, or the value
    /// is that very regular expression.
    Regex(Pattern),
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
            if d.contains_key("$regex") || d.contains_key("$options") {
                conds.push(Cond::Regex(regex_operator(d)?));
            }
            for (op, arg) in d {
                if op == "$regex" || op == "$options" {
                    continue;
                }
                conds.push(parse_operator(op, arg)?);
            }
            Ok(if conds.len() == 1 {
                conds.remove(0)
            } else {
                Cond::All(conds)
            })
        }
        Bson::RegularExpression(re) => Ok(Cond::Regex(Pattern::new(
            re.pattern.as_str(),
            re.options.as_str(),
        )?)),
        other => Ok(Cond::Eq(other.clone())),
    }
}

fn parse_operator(op: &str, arg: &Bson) -> CmdResult<Cond> {
    // Values and regular expressions of an `$in`/`$nin` list.
    let list = |arg: &Bson| match arg {
        Bson::Array(items) => {
            let mut values = Vec::new();
            let mut patterns = Vec::new();
            for item in items {
                match item {
                    Bson::RegularExpression(re) => {
                        patterns.push(Pattern::new(re.pattern.as_str(), re.options.as_str())?);
                    }
                    Bson::Document(d) if d.keys().next().is_some_and(|k| k.starts_with('$')) => {
                        return Err(CmdError::bad_value(format!("cannot nest $ under {op}")));
                    }
                    other => values.push(other.clone()),
                }
            }
            Ok((values, patterns))
        }
        _ => Err(CmdError::bad_value(format!("{op} needs an array"))),
    };
    Ok(match op {
        "$eq" => Cond::Eq(arg.clone()),
        "$ne" => Cond::Ne(arg.clone()),
        "$gt" => Cond::Cmp(Ordering::Greater, false, arg.clone()),
        "$gte" => Cond::Cmp(Ordering::Greater, true, arg.clone()),
        "$lt" => Cond::Cmp(Ordering::Less, false, arg.clone()),
        "$lte" => Cond::Cmp(Ordering::Less, true, arg.clone()),
        "$in" => {
            let (values, patterns) = list(arg)?;
            Cond::In(values, patterns)
        }
        "$nin" => {
            let (values, patterns) = list(arg)?;
            Cond::Nin(values, patterns)
        }
        "$exists" => Cond::Exists(truthy(arg)),
        "$not" => match arg {
            Bson::Document(d) if is_operator_doc(d) => Cond::Not(Box::new(parse_cond(arg)?)),
            Bson::RegularExpression(re) => Cond::Not(Box::new(Cond::Regex(Pattern::new(
                re.pattern.as_str(),
                re.options.as_str(),
            )?))),
            _ => return Err(CmdError::bad_value("$not needs a regex or a document")),
        },
        other => {
            return Err(CmdError::bad_value(format!(
                "unknown operator: {other} (not supported by mongo-sim)"
            )));
        }
    })
}

/// `{ $regex: <string or regex>, $options: <string> }` as the server reads it.
fn regex_operator(d: &Document) -> CmdResult<Pattern> {
    let options = match d.get("$options") {
        None => None,
        Some(Bson::String(o)) => Some(o.as_str()),
        Some(_) => return Err(CmdError::bad_value("$options has to be a string")),
    };
    match d.get("$regex") {
        None => Err(CmdError::new(
            code::REGEX_OPTIONS_WITHOUT_REGEX,
            "$options needs a $regex",
        )),
        Some(Bson::String(p)) => Pattern::new(p, options.unwrap_or("")),
        Some(Bson::RegularExpression(re)) => match options {
            Some(o) if !re.options.as_str().is_empty() && !o.is_empty() => Err(CmdError::new(
                code::REGEX_OPTIONS_TWICE,
                "options set in both $regex and $options",
            )),
            Some(o) if !o.is_empty() => Pattern::new(re.pattern.as_str(), o),
            _ => Pattern::new(re.pattern.as_str(), re.options.as_str()),
        },
        Some(_) => Err(CmdError::bad_value("$regex has to be a string")),
    }
}

/// A compiled regular expression with the pattern and options it came from (a value that
/// is this very regular expression matches it too, as on the server).
#[derive(Clone, Debug)]
pub(crate) struct Pattern {
    pattern: String,
    options: String,
    regex: regex::Regex,
}

impl Pattern {
    /// Compiles `pattern` with MongoDB's options: `i` (case-insensitive), `m` (`^`/`$` at
    /// line ends), `s` (`.` matches newlines), `x` (whitespace and `#` comments ignored),
    /// `u` (accepted: patterns are always Unicode). Constructs of PCRE that the `regex`
    /// crate does not have (look-around, back-references) are refused with the server's
    /// code for an invalid expression, naming the simulator.
    pub(crate) fn new(pattern: &str, options: &str) -> CmdResult<Self> {
        let mut builder = regex::RegexBuilder::new(pattern);
        for flag in options.chars() {
            match flag {
                'i' => builder.case_insensitive(true),
                'm' => builder.multi_line(true),
                's' => builder.dot_matches_new_line(true),
                'x' => builder.ignore_whitespace(true),
                'u' => &mut builder,
                other => {
                    return Err(CmdError::new(
                        code::REGEX_BAD_OPTION,
                        format!("invalid flag in regex options: {other}"),
                    ));
                }
            };
        }
        if pattern.contains('\0') {
            return Err(CmdError::new(
                code::REGEX_INVALID,
                "Regular expression cannot contain an embedded null byte",
            ));
        }
        let regex = builder.build().map_err(|e| {
            CmdError::new(
                code::REGEX_INVALID,
                format!(
                    "Regular expression is invalid (or uses a PCRE feature mongo-sim does not have: look-around, back-references): {}",
                    e.to_string().replace('\n', " ")
                ),
            )
        })?;
        let mut options: Vec<char> = options.chars().collect();
        options.sort_unstable();
        Ok(Self {
            pattern: pattern.to_owned(),
            options: options.into_iter().collect(),
            regex,
        })
    }

    fn matches_value(&self, v: &Bson) -> bool {
        match v {
            Bson::String(s) => self.regex.is_match(s),
            Bson::Symbol(s) => self.regex.is_match(s),
            Bson::RegularExpression(re) => {
                let mut options: Vec<char> = re.options.as_str().chars().collect();
                options.sort_unstable();
                re.pattern.as_str() == self.pattern
                    && options.into_iter().collect::<String>() == self.options
            }
            _ => false,
        }
    }

    /// Whether a value at the path (or an element of an array there) matches.
    fn matches_any(&self, values: &[Option<&Bson>]) -> bool {
        values.iter().flatten().any(|v| {
            self.matches_value(v)
                || matches!(v, Bson::Array(items) if items.iter().any(|i| self.matches_value(i)))
        })
    }
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
        Cond::In(ts, ps) => {
            ts.iter().any(|t| eq_matches(t, values)) || ps.iter().any(|p| p.matches_any(values))
        }
        Cond::Nin(ts, ps) => {
            !(ts.iter().any(|t| eq_matches(t, values)) || ps.iter().any(|p| p.matches_any(values)))
        }
        Cond::Regex(p) => p.matches_any(values),
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

    fn re(pattern: &str, options: &str) -> Bson {
        Bson::RegularExpression(bson::Regex {
            pattern: bson::raw::CString::try_from(pattern).unwrap(),
            options: bson::raw::CString::try_from(options).unwrap(),
        })
    }

    /// `$regex` as the manual describes it: a string with `$options`, a regular
    /// expression value (also in `$in`, `$nin`, under `$not`), options `i m s x`, arrays
    /// matched element by element, non-strings never matched, a stored regular expression
    /// matched by the same one.
    #[test]
    fn regular_expressions() {
        let d = doc! {
            "name": "Alice Smith",
            "email": "ALICE@example.com",
            "tags": ["red", "Blue"],
            "bio": "line one\nline two",
            "n": 5,
            "stored": re("^a", "i"),
        };
        assert!(m(doc! { "name": { "$regex": "^Alice" } }, d.clone()));
        assert!(!m(doc! { "name": { "$regex": "^alice" } }, d.clone()));
        assert!(m(
            doc! { "name": { "$regex": "^alice", "$options": "i" } },
            d.clone()
        ));
        assert!(m(doc! { "email": re("@EXAMPLE\\.com$", "i") }, d.clone()));
        assert!(m(
            doc! { "email": { "$regex": re("example", "") , "$options": "i" } },
            d.clone()
        ));
        assert!(
            m(doc! { "tags": re("^blue$", "i") }, d.clone()),
            "an element of an array"
        );
        assert!(m(
            doc! { "bio": { "$regex": "^line two$", "$options": "m" } },
            d.clone()
        ));
        assert!(!m(doc! { "bio": { "$regex": "^line two$" } }, d.clone()));
        assert!(m(
            doc! { "bio": { "$regex": "one.line", "$options": "s" } },
            d.clone()
        ));
        assert!(!m(doc! { "bio": { "$regex": "one.line" } }, d.clone()));
        assert!(m(
            doc! { "name": { "$regex": "a l i c e  # spaced", "$options": "xi" } },
            d.clone()
        ));
        assert!(
            !m(doc! { "n": re("5", "") }, d.clone()),
            "numbers are not strings"
        );
        assert!(!m(doc! { "missing": re(".*", "") }, d.clone()));
        assert!(m(
            doc! { "name": { "$in": [re("^bob", ""), re("smith$", "i")] } },
            d.clone()
        ));
        assert!(m(
            doc! { "name": { "$in": ["x", "Alice Smith"] } },
            d.clone()
        ));
        assert!(!m(doc! { "name": { "$nin": [re("^Al", "")] } }, d.clone()));
        assert!(m(doc! { "name": { "$not": re("^Bob", "") } }, d.clone()));
        assert!(m(
            doc! { "name": { "$regex": "Smith", "$ne": "x" } },
            d.clone()
        ));
        assert!(
            m(doc! { "stored": re("^a", "i") }, d.clone()),
            "the same expression"
        );
        assert!(!m(doc! { "stored": re("^a", "") }, d.clone()));
        assert!(m(doc! { "stored": { "$eq": re("^a", "i") } }, d.clone()));
        // Errors, with the server's codes.
        let code = |f: Document| Filter::parse(&f).unwrap_err().code;
        assert_eq!(code(doc! { "a": { "$options": "i" } }), 51074);
        assert_eq!(
            code(doc! { "a": { "$regex": re("x", "i"), "$options": "m" } }),
            51075
        );
        assert_eq!(code(doc! { "a": { "$regex": 5 } }), 2);
        assert_eq!(code(doc! { "a": { "$regex": "(" } }), 51091);
        assert_eq!(
            code(doc! { "a": { "$regex": "x", "$options": "z" } }),
            51108
        );
        // PCRE's look-ahead is refused, naming the simulator.
        let err = Filter::parse(&doc! { "a": { "$regex": "a(?=b)" } }).unwrap_err();
        assert_eq!(err.code, 51091);
        assert!(err.message.contains("mongo-sim"), "{}", err.message);
    }

    #[test]
    fn unknown_operators_are_errors() {
        let err = Filter::parse(&doc! { "a": { "$where": "x" } }).unwrap_err();
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
