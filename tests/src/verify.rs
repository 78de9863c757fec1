//! The independent verifier: compares a log of acknowledged writes with a log of delivered
//! events. It uses nothing but the standard library — no code of the crates it checks.
//!
//! Both logs hold one change per line: `<document id> <change>` where `<change>` is
//! `v<version>` for an insert or update and `deleted` for a delete. Written changes of one
//! document appear in the order they were acknowledged.

use std::collections::{HashMap, HashSet};

/// What the verifier found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Acknowledged changes never delivered.
    pub lost: usize,
    /// Documents whose changes were first delivered out of their written order.
    pub out_of_order: usize,
    /// Deliveries beyond the first of the same change.
    pub duplicates: usize,
    /// The most duplicates the checkpoint policy allows for this run.
    pub duplicate_bound: usize,
    /// Changes written.
    pub written: usize,
    /// Changes delivered (with repeats).
    pub delivered: usize,
}

impl Verdict {
    /// Whether every promise held: nothing lost, order kept, repeats within the bound.
    pub fn holds(&self) -> bool {
        self.lost == 0 && self.out_of_order == 0 && self.duplicates <= self.duplicate_bound
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "lost {} | out of order {} | duplicates {} (bound {}) | written {} | delivered {}",
            self.lost,
            self.out_of_order,
            self.duplicates,
            self.duplicate_bound,
            self.written,
            self.delivered
        )
    }
}

/// Parses a log into `(document id, change)` pairs; malformed lines are an error naming
/// the line (a torn last line of a killed writer is skipped, as it was never acknowledged).
pub fn parse(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next(), parts.next()) {
            (Some(id), Some(change), None) if valid_change(change) => {
                out.push((id.to_owned(), change.to_owned()));
            }
            _ if i + 1 == lines.len() && !text.ends_with('\n') => {}
            _ => return Err(format!("line {}: malformed: {line:?}", i + 1)),
        }
    }
    Ok(out)
}

fn valid_change(change: &str) -> bool {
    change == "deleted"
        || change
            .strip_prefix('v')
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Compares the logs.
pub fn verify(
    written: &[(String, String)],
    delivered: &[(String, String)],
    duplicate_bound: usize,
) -> Verdict {
    let delivered_set: HashSet<&(String, String)> = delivered.iter().collect();
    let lost = written
        .iter()
        .filter(|c| !delivered_set.contains(c))
        .count();

    // Per document: the written order of its changes.
    let mut position: HashMap<&(String, String), usize> = HashMap::new();
    let mut per_doc_count: HashMap<&str, usize> = HashMap::new();
    for c in written {
        let n = per_doc_count.entry(c.0.as_str()).or_default();
        position.insert(c, *n);
        *n += 1;
    }
    // First deliveries of each change must follow that order, per document.
    let mut seen: HashSet<&(String, String)> = HashSet::new();
    let mut last_pos: HashMap<&str, usize> = HashMap::new();
    let mut bad_docs: HashSet<&str> = HashSet::new();
    let mut duplicates = 0;
    for c in delivered {
        if !seen.insert(c) {
            duplicates += 1;
            continue;
        }
        if let Some(&p) = position.get(c) {
            if let Some(&prev) = last_pos.get(c.0.as_str())
                && p < prev
            {
                bad_docs.insert(c.0.as_str());
            }
            last_pos.insert(c.0.as_str(), p);
        }
    }
    Verdict {
        lost,
        out_of_order: bad_docs.len(),
        duplicates,
        duplicate_bound,
        written: written.len(),
        delivered: delivered.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(s: &str) -> Vec<(String, String)> {
        parse(s).unwrap()
    }

    #[test]
    fn finds_loss_order_and_duplicates() {
        let written = log("1 v1\n2 v1\n1 v2\n1 deleted\n");
        let ok = verify(&written, &log("1 v1\n2 v1\n1 v2\n1 v2\n1 deleted\n"), 1);
        assert!(ok.holds(), "{ok}");
        assert_eq!(ok.duplicates, 1);
        let lost = verify(&written, &log("1 v1\n1 v2\n1 deleted\n"), 5);
        assert_eq!(lost.lost, 1);
        assert!(!lost.holds());
        let swapped = verify(&written, &log("2 v1\n1 v2\n1 v1\n1 deleted\n"), 5);
        assert_eq!(swapped.out_of_order, 1);
        let too_many = verify(
            &written,
            &log("1 v1\n1 v1\n1 v1\n2 v1\n1 v2\n1 deleted\n"),
            1,
        );
        assert!(!too_many.holds());
        assert!(parse("1 v1\nbroken line here\n").is_err());
        assert_eq!(
            parse("1 v1\n2 v").unwrap().len(),
            1,
            "a torn last line is skipped"
        );
    }
}
