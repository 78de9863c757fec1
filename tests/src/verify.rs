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

/// One line of a log: a change, or a consumer's start marker (`# start`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Line {
    /// `(document id, change)`, and the writer's transaction number for a change written
    /// in a multi-document transaction (`<id> <change> t<n>`).
    Change((String, String), Option<u64>),
    /// A consumer process started: a new session of deliveries.
    Start,
}

fn parse_lines(text: &str) -> Result<Vec<Line>, String> {
    let mut out = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.trim() == "# start" {
            out.push(Line::Start);
            continue;
        }
        match change_line(line) {
            Some((id, change, txn, _)) => {
                out.push(Line::Change((id.to_owned(), change.to_owned()), txn));
            }
            _ if i + 1 == lines.len() && !text.ends_with('\n') => {}
            // Cut short by a kill: the next consumer's start marker follows it.
            _ if lines
                .get(i + 1)
                .is_some_and(|next| next.trim() == "# start") => {}
            _ => return Err(format!("line {}: malformed: {line:?}", i + 1)),
        }
    }
    Ok(out)
}

/// Parses a log into `(document id, change)` pairs; malformed lines are an error naming
/// the line (a torn last line of a killed writer is skipped, as it was never acknowledged).
/// Transaction numbers and start markers are read by [`verify_transactions`].
pub fn parse(text: &str) -> Result<Vec<(String, String)>, String> {
    Ok(parse_lines(text)?
        .into_iter()
        .filter_map(|l| match l {
            Line::Change(c, _) => Some(c),
            Line::Start => None,
        })
        .collect())
}

/// What the verifier found about multi-document transactions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionVerdict {
    /// Transactions written.
    pub transactions: usize,
    /// Transactions some consumer session saw other than as a prefix of the whole
    /// transaction in order (which is what a checkpoint inside one would cause: the next
    /// session resuming in its middle), or saw cut short without a later session
    /// delivering it again from its first change.
    pub not_whole: usize,
}

impl std::fmt::Display for TransactionVerdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "transactions {} | not delivered whole {}",
            self.transactions, self.not_whole
        )
    }
}

/// Checks that every transaction of the written log (changes marked `t<n>`) reached the
/// consumer whole: in each consumer session (between `# start` markers of the delivered
/// log) its changes appear, if at all, as a prefix of the transaction in its written
/// order; a session cut short inside one (a kill) is followed by a session that delivers
/// it again from its first change.
///
/// # Errors
/// A malformed line of either log.
pub fn verify_transactions(written: &str, delivered: &str) -> Result<TransactionVerdict, String> {
    let mut txns: HashMap<u64, Vec<(String, String)>> = HashMap::new();
    let mut txn_of: HashMap<(String, String), u64> = HashMap::new();
    for line in parse_lines(written)? {
        if let Line::Change(c, Some(t)) = line {
            txns.entry(t).or_default().push(c.clone());
            txn_of.insert(c, t);
        }
    }
    let mut sessions: Vec<Vec<(String, String)>> = vec![Vec::new()];
    for line in parse_lines(delivered)? {
        match line {
            Line::Start => sessions.push(Vec::new()),
            Line::Change(c, _) => {
                if let Some(s) = sessions.last_mut() {
                    s.push(c);
                }
            }
        }
    }
    let mut broken: HashSet<u64> = HashSet::new();
    // Per transaction, the sessions that saw it cut short, awaiting a full redelivery.
    let mut cut: HashMap<u64, usize> = HashMap::new();
    for (n, session) in sessions.iter().enumerate() {
        let mut seen: HashMap<u64, Vec<&(String, String)>> = HashMap::new();
        for c in session {
            if let Some(t) = txn_of.get(c) {
                let s = seen.entry(*t).or_default();
                if !s.contains(&c) {
                    s.push(c);
                }
            }
        }
        for (t, got) in seen {
            let whole = &txns[&t];
            let prefix = got.len() <= whole.len() && got.iter().zip(whole).all(|(a, b)| *a == b);
            if !prefix {
                broken.insert(t);
            } else if got.len() < whole.len() {
                cut.insert(t, n);
            } else {
                cut.remove(&t);
            }
        }
    }
    broken.extend(cut.keys());
    Ok(TransactionVerdict {
        transactions: txns.len(),
        not_whole: broken.len(),
    })
}

/// `<id> <change> [t<transaction>] [w<write id>] [@<acknowledged, µs>]`: the id, the
/// change and the transaction number. The writer's write id (`w<connection>.<sequence>`)
/// names the write for a reader tracing it, and the acknowledgement time is the lag
/// benchmark's; the comparison needs neither, since an id and its version (or `deleted`)
/// already name one write.
fn change_line(line: &str) -> Option<(&str, &str, Option<u64>, Option<u64>)> {
    let mut parts = line.split_whitespace();
    let id = parts.next()?;
    let change = parts.next().filter(|c| valid_change(c))?;
    let (mut txn, mut write, mut acked) = (None, None, None);
    for part in parts {
        if let Some(t) = part.strip_prefix('t') {
            if txn.replace(t.parse::<u64>().ok()?).is_some() {
                return None;
            }
        } else if let Some(w) = part.strip_prefix('w') {
            if w.is_empty() || write.replace(w).is_some() {
                return None;
            }
        } else if let Some(at) = part.strip_prefix('@') {
            // When the writer had the acknowledgement (µs since the epoch).
            if acked.replace(at.parse::<u64>().ok()?).is_some() {
                return None;
            }
        } else {
            return None;
        }
    }
    Some((id, change, txn, acked))
}

/// `(document id, change, acknowledged µs)` of every line of a writer's log written with
/// `--ack-times` (the lag benchmark's reading).
///
/// # Errors
/// A line that is not a change, or has no acknowledgement time, named.
pub fn acknowledged(text: &str) -> Result<Vec<(String, String, u64)>, String> {
    text.lines()
        .enumerate()
        .map(|(i, line)| match change_line(line) {
            Some((id, change, _, Some(at))) => Ok((id.to_owned(), change.to_owned(), at)),
            Some(_) => Err(format!("line {}: no acknowledgement time: {line:?}", i + 1)),
            None => Err(format!("line {}: malformed: {line:?}", i + 1)),
        })
        .collect()
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

/// One owner's handling session: `(owner, first ms, last ms)`.
pub type Session = (String, i64, i64);

/// Each owner's handling times (ms, in the order handled) split into sessions where the
/// owner handled nothing for longer than `gap` ms (it stood by, or was paused).
pub fn sessions(owners: impl IntoIterator<Item = (String, Vec<i64>)>, gap: i64) -> Vec<Session> {
    let mut out = Vec::new();
    for (owner, times) in owners {
        let mut current: Option<(i64, i64)> = None;
        for t in times {
            current = match current {
                Some((first, last)) if t - last <= gap => Some((first, t)),
                Some((first, last)) => {
                    out.push((owner.clone(), first, last));
                    Some((t, t))
                }
                None => Some((t, t)),
            };
        }
        if let Some((first, last)) = current {
            out.push((owner, first, last));
        }
    }
    out
}

/// Every pair of sessions of different owners with how long they overlap, in ms (negative:
/// that far apart; zero: they touch).
pub fn session_overlaps(sessions: &[Session]) -> Vec<(&Session, &Session, i64)> {
    let mut out = Vec::new();
    for (i, a) in sessions.iter().enumerate() {
        for b in sessions[i + 1..].iter().filter(|b| b.0 != a.0) {
            out.push((a, b, a.2.min(b.2) - a.1.max(b.1)));
        }
    }
    out
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

    #[test]
    fn transactions_must_arrive_whole_in_each_session() {
        let written = "1 v1\n2 v1\n1 v2 t7\n2 v2 t7\n3 v1 t7\n";
        let check = |delivered: &str| verify_transactions(written, delivered).unwrap();
        // Whole, with other changes around it.
        let ok = check("# start\n1 v1\n2 v1\n1 v2\n2 v2\n3 v1\n");
        assert_eq!((ok.transactions, ok.not_whole), (1, 0), "{ok}");
        // Cut by a kill, then delivered again from its start: whole.
        let again = check("# start\n1 v1\n2 v1\n1 v2\n# start\n1 v2\n2 v2\n3 v1\n");
        assert_eq!(again.not_whole, 0);
        // Resumed in its middle (a checkpoint inside it): broken.
        let middle = check("# start\n1 v1\n2 v1\n1 v2\n# start\n2 v2\n3 v1\n");
        assert_eq!(middle.not_whole, 1);
        // Out of order within a session: broken.
        let swapped = check("# start\n2 v2\n1 v2\n3 v1\n");
        assert_eq!(swapped.not_whole, 1);
        // Cut and never delivered again: broken.
        let cut = check("# start\n1 v2\n2 v2\n# start\n1 v1\n");
        assert_eq!(cut.not_whole, 1);
        assert!(verify_transactions("1 v1 x9\n", "").is_err());
        // Write ids are read beside transaction numbers, in either order, once each.
        let with_ids = "1 v1 w0.1\n1 v2 t3 w0.2\n2 v1 w1.1 t3\n";
        assert_eq!(
            verify_transactions(with_ids, "# start\n1 v2\n2 v1\n")
                .unwrap()
                .transactions,
            1
        );
        assert_eq!(parse(with_ids).unwrap().len(), 3);
        assert!(parse("1 v1 w0.1 w0.2\n").is_err());
        assert!(parse("1 v1 t1 t2\n").is_err());
        assert!(parse("1 v1 w\n").is_err());
        assert_eq!(parse("1 v1 w0.1 @1700000000000000\n").unwrap().len(), 1);
        assert!(parse("1 v1 @x\n").is_err());
        assert_eq!(
            acknowledged("1 v1 w0.1 @17\n1 deleted @18 w0.2\n").unwrap(),
            [
                ("1".to_owned(), "v1".to_owned(), 17),
                ("1".to_owned(), "deleted".to_owned(), 18)
            ]
        );
        assert!(acknowledged("1 v1 w0.1\n").is_err());
        // A line a killed consumer left unfinished, ended before the next start marker.
        assert_eq!(parse("# start\n1 v1\n7\n# start\n1 v1\n").unwrap().len(), 2);
        assert!(
            parse("1 v1\n7\n2 v1\n").is_err(),
            "torn lines only before a marker"
        );
    }

    #[test]
    fn sessions_split_at_gaps_and_overlaps_are_measured() {
        let owners = vec![
            ("a".to_owned(), vec![0, 10, 20, 500, 510]),
            ("b".to_owned(), vec![15, 30, 300]),
        ];
        let s = sessions(owners, 100);
        assert_eq!(
            s,
            [
                ("a".to_owned(), 0, 20),
                ("a".to_owned(), 500, 510),
                ("b".to_owned(), 15, 30),
                ("b".to_owned(), 300, 300),
            ]
        );
        let overlaps: Vec<i64> = session_overlaps(&s).iter().map(|o| o.2).collect();
        assert_eq!(overlaps, [5, -280, -470, -200]);
    }
}
