//! The import graph between a crate's top-level modules, and its cycles: `docs/
//! ARCHITECTURE.md` says `cdc-processor`'s rooms import each other in one direction only.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

/// The top-level modules of the crate at `src` (files beside `lib.rs`, and directories with
/// a `mod.rs`, whose children belong to them) and the modules each one refers to through
/// `crate::` paths (a root re-export counts as the module it comes from). Comments are
/// left out: a doc link is no dependency.
pub(crate) fn graph(src: &Path) -> Result<BTreeMap<String, BTreeSet<String>>, String> {
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
    let lib = read(&src.join("lib.rs"))?;
    let mut texts: BTreeMap<String, String> = BTreeMap::new();
    let entries = std::fs::read_dir(src).map_err(|e| format!("{}: {e}", src.display()))?;
    for entry in entries {
        let path = entry.map_err(|e| e.to_string())?.path();
        let Some(name) = path.file_stem().and_then(|n| n.to_str()) else {
            continue;
        };
        if path.is_dir() {
            texts.insert(name.to_owned(), read_tree(&path)?);
        } else if path.extension().is_some_and(|e| e == "rs") && name != "lib" {
            texts.insert(name.to_owned(), read(&path)?);
        }
    }
    let exports = root_exports(&code(&lib));
    let mut graph = BTreeMap::new();
    for (module, text) in &texts {
        let mut uses = BTreeSet::new();
        for first in crate_paths(&code(text)) {
            let target = if texts.contains_key(&first) {
                Some(first)
            } else {
                exports.get(&first).cloned()
            };
            if let Some(target) = target.filter(|t| t != module) {
                uses.insert(target);
            }
        }
        graph.insert(module.clone(), uses);
    }
    Ok(graph)
}

fn read_tree(dir: &Path) -> Result<String, String> {
    let mut all = String::new();
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.is_dir() {
            all.push_str(&read_tree(&path)?);
        } else if path.extension().is_some_and(|e| e == "rs") {
            all.push_str(
                &std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?,
            );
            all.push('\n');
        }
    }
    Ok(all)
}

/// The text without `//` comments.
fn code(text: &str) -> String {
    text.lines()
        .map(|l| {
            // The first `//` not inside a string on this line (an even number of quotes
            // before it).
            let cut = l
                .match_indices("//")
                .map(|(i, _)| i)
                .find(|&i| l[..i].matches('"').count() % 2 == 0);
            cut.map_or(l, |i| &l[..i])
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Root items re-exported from a module: `pub use module::{A, B};`, `pub use module::A;`.
fn root_exports(lib: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for stmt in lib.split(';') {
        let Some(rest) = stmt.trim().strip_prefix("pub use ") else {
            continue;
        };
        let Some((module, items)) = rest.split_once("::") else {
            continue;
        };
        for item in items.trim_matches(|c| c == '{' || c == '}').split(',') {
            let name = item.split_whitespace().last().unwrap_or("");
            let name = name.rsplit("::").next().unwrap_or(name);
            if !name.is_empty() {
                map.insert(name.to_owned(), module.trim().to_owned());
            }
        }
    }
    map
}

/// The first segment of every `crate::` path, including each member of a
/// `crate::{…}` group.
fn crate_paths(code: &str) -> Vec<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().last();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut start = 0;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 1 => {
                        out.push(ident(group[start..j].trim_start()));
                        start = j + 1;
                    }
                    _ => {}
                }
                if depth == 0 {
                    out.push(ident(group[start..j].trim_start()));
                    break;
                }
            }
        } else {
            out.push(ident(rest));
        }
    }
    out.retain(|s| !s.is_empty());
    out
}

/// A cycle of the graph, as the modules along it, if there is one.
pub(crate) fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn paths_groups_and_cycles_are_found() {
        let text = "use crate::{a::X, b::{Y, Z}, Top};\nfn f() { crate::c::g(); mycrate::d(); }";
        assert_eq!(crate_paths(text), ["a", "b", "Top", "c"]);
        assert_eq!(code("let s = \"a // b\"; // c"), "let s = \"a // b\"; ");
        let exports = root_exports("pub use m::{Top, n::Deep};\npub use k::One;");
        assert_eq!(exports.get("Top").map(String::as_str), Some("m"));
        assert_eq!(exports.get("Deep").map(String::as_str), Some("m"));
        assert_eq!(exports.get("One").map(String::as_str), Some("k"));
        let g = |edges: &[(&str, &str)]| {
            let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for (a, b) in edges {
                g.entry((*a).to_owned())
                    .or_default()
                    .insert((*b).to_owned());
                g.entry((*b).to_owned()).or_default();
            }
            g
        };
        assert_eq!(cycle(&g(&[("a", "b"), ("b", "c")])), None);
        assert_eq!(
            cycle(&g(&[("a", "b"), ("b", "c"), ("c", "a")])),
            Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
        );
    }
}
