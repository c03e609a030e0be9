//! Merging two nodes to the union of their rows (PRODUCT.md §10, second part): the conflict strategies,
//! and how the rows of a conflict are paired and decided.
//!
//! Rows travel between the nodes as COPY text lines printed under the pinned output settings and
//! `TimeZone = UTC` ([`crate::copy_text::PINNED_SETTINGS`]), so both nodes print a value alike and a
//! line read back on the other node is the same value.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use crate::copy_text;
use crate::digest::{self, KeyFields};

/// How a key present on both nodes with different rows is settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Strategy {
    /// This node's row is written to the peer.
    PreferLocal,
    /// The peer's row is written here.
    PreferRemote,
    /// The row whose value of this timestamp (or date) column is newer wins; ties and two NULLs go to
    /// this node, a NULL loses to any value.
    LastModified(String),
    /// Neither: both rows are parked in `steep_repl.merge_conflicts` for a person to choose.
    Manual,
}

impl Strategy {
    /// The text form, as `decided_by` in the audit records it.
    pub fn name(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Strategy::PreferLocal => f.write_str("prefer-local"),
            Strategy::PreferRemote => f.write_str("prefer-remote"),
            Strategy::LastModified(c) => write!(f, "last-modified:{c}"),
            Strategy::Manual => f.write_str("manual"),
        }
    }
}

/// A strategy text that is none of the four.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown merge strategy {0:?}: expected prefer-local, prefer-remote, last-modified:<column> or manual"
)]
pub struct StrategyError(pub String);

impl FromStr for Strategy {
    type Err = StrategyError;

    fn from_str(s: &str) -> Result<Strategy, StrategyError> {
        match s {
            "prefer-local" => Ok(Strategy::PreferLocal),
            "prefer-remote" => Ok(Strategy::PreferRemote),
            "manual" => Ok(Strategy::Manual),
            _ => match s.strip_prefix("last-modified:") {
                Some(c) if !c.is_empty() => Ok(Strategy::LastModified(c.to_string())),
                _ => Err(StrategyError(s.to_string())),
            },
        }
    }
}

/// Which node's row wins a conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Winner {
    Local,
    Peer,
}

/// A point in time as PostgreSQL prints a `date`, `timestamp` or `timestamptz` under `DateStyle = ISO`
/// and `TimeZone = UTC` (`2024-05-01 12:00:00.5+00`, `0044-03-15 BC`, `infinity`), in an order that
/// compares like the values. `None` for text of any other shape.
pub fn instant(text: &[u8]) -> Option<(i8, i64, [u32; 6])> {
    let s = std::str::from_utf8(text).ok()?;
    match s {
        "infinity" => return Some((1, 0, [0; 6])),
        "-infinity" => return Some((-1, 0, [0; 6])),
        _ => {}
    }
    let (s, bc) = match s.strip_suffix(" BC") {
        Some(rest) => (rest, true),
        None => (s, false),
    };
    // Under TimeZone = UTC every timestamptz prints with +00; anything else is not ours to order.
    let s = s.strip_suffix("+00").unwrap_or(s);
    let (date, time) = match s.split_once(' ') {
        Some((d, t)) => (d, Some(t)),
        None => (s, None),
    };
    let mut d = date.rsplitn(3, '-');
    let day: u32 = d.next()?.parse().ok()?;
    let month: u32 = d.next()?.parse().ok()?;
    let year: i64 = d.next()?.parse().ok()?;
    let (mut h, mut m, mut sec, mut micros) = (0u32, 0u32, 0u32, 0u32);
    if let Some(t) = time {
        let mut parts = t.splitn(3, ':');
        h = parts.next()?.parse().ok()?;
        m = parts.next()?.parse().ok()?;
        let s = parts.next()?;
        let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
        sec = whole.parse().ok()?;
        if frac.len() > 6 || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        micros = if frac.is_empty() { 0 } else { format!("{frac:0<6}").parse().ok()? };
    }
    // 1 BC is year 0, 2 BC year -1: BC years order backwards.
    let year = if bc { 1 - year } else { year };
    Some((0, year, [month, day, h, m, sec, micros]))
}

/// Decides a conflict by `last-modified`: the newer value of the column at `position` of the two COPY
/// lines. A NULL (or a line without that field) loses to any value; ties go local. `Err` names a value
/// that is not a date or timestamp printed as this module expects.
pub fn newer(local: &[u8], peer: &[u8], position: usize) -> Result<Winner, String> {
    let value = |line: &[u8]| -> Result<Option<(i8, i64, [u32; 6])>, String> {
        let Some(field) = copy_text::split_fields(line).nth(position) else { return Ok(None) };
        let Some(text) = copy_text::unescape_field(field) else { return Ok(None) };
        instant(&text)
            .map(Some)
            .ok_or_else(|| format!("{:?} is not a date or timestamp", String::from_utf8_lossy(&text)))
    };
    let (l, p) = (value(local)?, value(peer)?);
    Ok(match (l, p) {
        (_, None) => Winner::Local,
        (None, Some(_)) => Winner::Peer,
        (Some(l), Some(p)) => match p.cmp(&l) {
            Ordering::Greater => Winner::Peer,
            _ => Winner::Local,
        },
    })
}

/// The COPY lines of `rows` (newline-terminated) keyed by their key text (as the overlap digests hold
/// it: the escaped key fields joined by a tab). `Err` for a line too short for the key.
pub fn lines_by_key<'a>(rows: &'a [u8], key: &KeyFields) -> Result<HashMap<Vec<u8>, &'a [u8]>, String> {
    let mut out = HashMap::new();
    let mut key_text = Vec::new();
    for line in copy_text::split_rows(rows) {
        digest::digest_line(line, key, &mut key_text).map_err(|e| e.to_string())?;
        out.insert(key_text.clone(), line);
    }
    Ok(out)
}

/// Orders `n` tables so that each comes after the tables it references (`edges`: `(child, parent)`
/// index pairs, from foreign keys; a table referencing itself is ignored), keeping the given order
/// where foreign keys leave it free. Tables on a cycle cannot all come after their parents: they follow
/// the rest in the given order and are returned as the second list.
pub fn parents_first(n: usize, edges: &[(usize, usize)]) -> (Vec<usize>, Vec<usize>) {
    let mut parents = vec![Vec::new(); n];
    let mut children = vec![Vec::new(); n];
    for &(c, p) in edges {
        if c != p && c < n && p < n && !parents[c].contains(&p) {
            parents[c].push(p);
            children[p].push(c);
        }
    }
    let mut waiting: Vec<usize> = parents.iter().map(Vec::len).collect();
    let mut ready: std::collections::BTreeSet<usize> = (0..n).filter(|&i| waiting[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &c in &children[i] {
            waiting[c] -= 1;
            if waiting[c] == 0 {
                ready.insert(c);
            }
        }
    }
    let cyclic: Vec<usize> = (0..n).filter(|&i| waiting[i] > 0).collect();
    order.extend(&cyclic);
    (order, cyclic)
}

/// A sequence's state on one node (its `last_value` and `is_called`) and its settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sequence {
    /// The sequence's own `last_value`: the last value handed out when `is_called`, else the next.
    pub last_value: i64,
    pub is_called: bool,
    pub min_value: i64,
    pub max_value: i64,
    /// Never 0.
    pub increment_by: i64,
}

impl Sequence {
    /// The values this sequence can still hand out: the first, the step, and the interval they lie in.
    fn future(&self) -> Option<(i128, i128, i128, i128)> {
        let inc = i128::from(self.increment_by);
        if inc == 0 {
            return None;
        }
        let next = i128::from(self.last_value) + if self.is_called { inc } else { 0 };
        let (lo, hi) =
            if inc > 0 { (next, i128::from(self.max_value)) } else { (i128::from(self.min_value), next) };
        (lo <= hi).then_some((next, inc.abs(), lo, hi))
    }
}

/// Whether two nodes' copies of a sequence can still hand out a same value (without cycling): the
/// arithmetic progressions of their future values meet inside both their ranges. Interleaved
/// sequences (same step, different residues, such as odd and even) and disjoint ranges never do.
pub fn sequences_collide(a: &Sequence, b: &Sequence) -> bool {
    let (Some((na, sa, loa, hia)), Some((nb, sb, lob, hib))) = (a.future(), b.future()) else {
        return false;
    };
    let (lo, hi) = (loa.max(lob), hia.min(hib));
    if lo > hi {
        return false;
    }
    // x ≡ na (mod sa) and x ≡ nb (mod sb): solvable iff gcd divides the difference.
    let (g, p, _) = ext_gcd(sa, sb);
    let diff = nb - na;
    if diff % g != 0 {
        return false;
    }
    let m = sb / g;
    let t = ((diff / g) % m * (p % m)) % m;
    let lcm = sa / g * sb;
    let x0 = (na + sa * t).rem_euclid(lcm);
    // The smallest solution at or above lo.
    let first = lo + (x0 - lo).rem_euclid(lcm);
    first <= hi
}

/// (g, x, y) with a·x + b·y = g = gcd(a, b), for positive a and b.
fn ext_gcd(a: i128, b: i128) -> (i128, i128, i128) {
    if b == 0 {
        (a, 1, 0)
    } else {
        let (g, x, y) = ext_gcd(b, a % b);
        (g, y, x - (a / b) * y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `last`: the last value handed out, or None for a fresh sequence starting at `start`.
    fn seq(last: Option<i64>, start: i64, inc: i64) -> Sequence {
        let (last_value, is_called) = match last {
            Some(v) => (v, true),
            None => (start, false),
        };
        Sequence { last_value, is_called, min_value: 1, max_value: i64::MAX, increment_by: inc }
    }

    #[test]
    fn sequence_collisions_are_found_and_interleaved_ones_pass() {
        // Both at 100 stepping by 1: the same values next.
        assert!(sequences_collide(&seq(Some(100), 1, 1), &seq(Some(100), 1, 1)));
        assert!(sequences_collide(&seq(Some(100), 1, 1), &seq(Some(5000), 1, 1)));
        // Odd and even.
        assert!(!sequences_collide(&seq(Some(101), 1, 2), &seq(Some(100), 2, 2)));
        // Same step, same residue: collide.
        assert!(sequences_collide(&seq(Some(101), 1, 2), &seq(Some(201), 1, 2)));
        // Disjoint ranges.
        let a =
            Sequence { last_value: 10, is_called: true, min_value: 1, max_value: 1_000_000, increment_by: 1 };
        let b = Sequence {
            last_value: 1_000_001,
            is_called: false,
            min_value: 1_000_001,
            max_value: 2_000_000,
            increment_by: 1,
        };
        assert!(!sequences_collide(&a, &b));
        // Steps 2 and 3 meet (at multiples of 6 shifted), exhausted ranges never do.
        assert!(sequences_collide(&seq(Some(0), 0, 2), &seq(Some(0), 0, 3)));
        let done = Sequence { last_value: 5, is_called: true, min_value: 1, max_value: 5, increment_by: 1 };
        assert!(!sequences_collide(&done, &seq(Some(0), 1, 1)));
        // Descending against ascending over the same values.
        let down =
            Sequence { last_value: 100, is_called: false, min_value: 1, max_value: 100, increment_by: -1 };
        assert!(sequences_collide(&down, &seq(None, 1, 1)));
        // Extreme steps do not overflow.
        assert!(
            !sequences_collide(&seq(Some(1), 1, i64::MAX), &seq(Some(2), 2, i64::MAX - 1)),
            "both exhausted"
        );
        assert!(sequences_collide(&seq(None, 1, i64::MAX), &seq(None, 1, i64::MAX)));
    }

    #[test]
    fn parents_come_first_and_cycles_are_reported() {
        // 0 references 2, 2 references 1; 3 references itself; 4 and 5 reference each other.
        let (order, cyclic) = parents_first(6, &[(0, 2), (2, 1), (3, 3), (4, 5), (5, 4)]);
        let at = |t: usize| order.iter().position(|&x| x == t).expect("present");
        assert!(at(1) < at(2) && at(2) < at(0));
        assert_eq!(order.len(), 6);
        assert_eq!(cyclic, vec![4, 5]);
        assert_eq!(parents_first(3, &[]).0, vec![0, 1, 2]);
    }

    #[test]
    fn strategies_parse_and_print() {
        for s in ["prefer-local", "prefer-remote", "manual", "last-modified:updated_at"] {
            assert_eq!(s.parse::<Strategy>().expect(s).to_string(), s);
        }
        for bad in ["", "prefer", "last-modified:", "PREFER-LOCAL", "last-modified"] {
            assert!(bad.parse::<Strategy>().is_err(), "{bad}");
        }
    }

    #[test]
    fn instants_order_like_the_values() {
        let ordered = [
            "-infinity",
            "0100-01-01 BC",
            "0001-12-31 23:59:59.999999 BC",
            "0001-01-01",
            "1999-12-31 23:59:59.999999+00",
            "2000-01-01",
            "2000-01-01 00:00:00.000001+00",
            "2000-01-01 00:00:00.1+00",
            "2000-01-01 00:00:00.25+00",
            "2000-01-01 00:00:01",
            "9999-12-31 23:59:59",
            "10000-01-01",
            "infinity",
        ];
        for w in ordered.windows(2) {
            let (a, b) = (instant(w[0].as_bytes()), instant(w[1].as_bytes()));
            assert!(a.is_some() && b.is_some(), "{w:?}");
            assert!(a < b, "{} < {}", w[0], w[1]);
        }
        for bad in ["", "yesterday", "2000-01-01 10:00:00+02", "2000-13", "2000-01-01 00:00:00.1234567"] {
            assert_eq!(instant(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn newer_row_wins_ties_and_nulls_go_as_documented() {
        let at = |t: &str| format!("1\tx\t{t}").into_bytes();
        let d = |l: &str, p: &str| newer(&at(l), &at(p), 2).expect("dates");
        assert_eq!(d("2024-01-01 00:00:00+00", "2024-01-02 00:00:00+00"), Winner::Peer);
        assert_eq!(d("2024-01-03 00:00:00+00", "2024-01-02 00:00:00+00"), Winner::Local);
        assert_eq!(d("2024-01-03 00:00:00+00", "2024-01-03 00:00:00+00"), Winner::Local);
        assert_eq!(d("\\N", "2024-01-03 00:00:00+00"), Winner::Peer);
        assert_eq!(d("2024-01-03 00:00:00+00", "\\N"), Winner::Local);
        assert_eq!(d("\\N", "\\N"), Winner::Local);
        assert!(newer(&at("soon"), &at("2024-01-01"), 2).is_err());
    }

    #[test]
    fn lines_are_found_by_key_text() {
        let key = KeyFields::new(vec![1, 0]).expect("key");
        let rows = b"1\ta\tx\n2\tb\\tc\ty\n";
        let map = lines_by_key(rows, &key).expect("lines");
        assert_eq!(map.get(b"a\t1".as_slice()), Some(&b"1\ta\tx".as_slice()));
        assert_eq!(map.get(b"b\\tc\t2".as_slice()), Some(&b"2\tb\\tc\ty".as_slice()));
        assert!(lines_by_key(b"1\n", &key).is_err());
    }
}
