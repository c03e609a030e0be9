//! Top-down comparison of one table between two sides.

use std::collections::HashMap;

use super::{Digest, DigestError, FANOUT, Node, RowDigest, TableDigests, Width};
use crate::helper_thread;

/// One side of a comparison: this server's digest files, or a peer answering over SQL.
///
/// Answers must be consistent with each other (the children of a node add up to the node's
/// digest, its rows to its children's digests); [`compare`] checks that and fails with
/// [`DigestError::Side`] otherwise, as for an answer of the wrong length.
pub trait Side {
    /// Digest of the whole table (whole 128-bit sum).
    fn total(&mut self) -> Result<Digest, DigestError>;
    /// For each node, its children's digests (see [`TableDigests::children`]), sums at `width`
    /// ([`Width::digest`]).
    fn children(&mut self, nodes: &[Node], width: Width) -> Result<Vec<[Digest; FANOUT]>, DigestError>;
    /// For each node, its rows' digests with key hashes at `width` ([`Width::row`]), sorted.
    fn rows(&mut self, nodes: &[Node], width: Width) -> Result<Vec<Vec<RowDigest>>, DigestError>;
    /// The whole key hash and key text of each key on this side whose hash at `width` is one of
    /// `key_hashes` (several when narrowed hashes collide), once per key, any order.
    fn keys(&mut self, key_hashes: &[u128], width: Width) -> Result<Vec<(u128, Vec<u8>)>, DigestError>;
    /// The whole digest of the rows of all `nodes` together (disjoint nodes).
    fn sums(&mut self, nodes: &[Node]) -> Result<Digest, DigestError>;

    /// [`Side::children`], calling `meanwhile` exactly once while the answer is being worked on: a
    /// remote side sends its request first, so that both sides work at once. By default `meanwhile`
    /// runs first.
    fn children_while(
        &mut self,
        nodes: &[Node],
        width: Width,
        meanwhile: &mut dyn FnMut(),
    ) -> Result<Vec<[Digest; FANOUT]>, DigestError> {
        meanwhile();
        self.children(nodes, width)
    }

    /// [`Side::rows`], calling `meanwhile` exactly once while the answer is being worked on (see
    /// [`Side::children_while`]).
    fn rows_while(
        &mut self,
        nodes: &[Node],
        width: Width,
        meanwhile: &mut dyn FnMut(),
    ) -> Result<Vec<Vec<RowDigest>>, DigestError> {
        meanwhile();
        self.rows(nodes, width)
    }
}

impl TableDigests {
    fn fault_or<T>(&self, value: T) -> Result<T, DigestError> {
        match self.fault() {
            Some(e) => Err(e),
            None => Ok(value),
        }
    }
}

/// The inherent queries, failing with [`TableDigests::fault`] when an answer may be incomplete.
impl Side for TableDigests {
    fn total(&mut self) -> Result<Digest, DigestError> {
        self.fault_or(TableDigests::total(self))
    }
    fn children(&mut self, nodes: &[Node], width: Width) -> Result<Vec<[Digest; FANOUT]>, DigestError> {
        let mut answer = TableDigests::children(self, nodes);
        if width != Width::Full {
            answer.iter_mut().flatten().for_each(|d| *d = width.digest(*d));
        }
        self.fault_or(answer)
    }
    fn rows(&mut self, nodes: &[Node], width: Width) -> Result<Vec<Vec<RowDigest>>, DigestError> {
        let mut answer = TableDigests::rows(self, nodes);
        if width != Width::Full {
            for list in &mut answer {
                list.iter_mut().for_each(|r| *r = width.row(*r));
                list.sort_unstable();
            }
        }
        self.fault_or(answer)
    }
    fn keys(&mut self, key_hashes: &[u128], width: Width) -> Result<Vec<(u128, Vec<u8>)>, DigestError> {
        let answer = TableDigests::keys(self, key_hashes, width);
        self.fault_or(answer)
    }
    fn sums(&mut self, nodes: &[Node]) -> Result<Digest, DigestError> {
        let answer = TableDigests::sums(self, nodes);
        self.fault_or(answer)
    }
}

/// What one side was asked for and answered, counted by [`CountingSide`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SideCounts {
    /// Calls of any method.
    pub calls: u64,
    /// Nodes sent in `children` and `rows` calls.
    pub nodes: u64,
    /// Child digests answered (FANOUT per node).
    pub digests: u64,
    /// Row digests answered.
    pub rows: u64,
    /// Key hashes sent in `keys` calls.
    pub key_hashes: u64,
    /// Key texts answered, and their bytes.
    pub keys: u64,
    /// Bytes of the key texts answered.
    pub key_bytes: u64,
}

/// A [`Side`] that passes every call to `inner` and counts what went through, to see what a
/// comparison exchanged.
#[derive(Debug)]
pub struct CountingSide<S> {
    /// The side answering.
    pub inner: S,
    /// Counts so far.
    pub counts: SideCounts,
}

impl<S: Side> CountingSide<S> {
    /// Wraps `inner` with zero counts.
    pub fn new(inner: S) -> CountingSide<S> {
        CountingSide { inner, counts: SideCounts::default() }
    }
}

impl<S: Side> Side for CountingSide<S> {
    fn total(&mut self) -> Result<Digest, DigestError> {
        self.counts.calls += 1;
        self.inner.total()
    }
    fn children(&mut self, nodes: &[Node], width: Width) -> Result<Vec<[Digest; FANOUT]>, DigestError> {
        self.counts.calls += 1;
        self.counts.nodes += nodes.len() as u64;
        let answer = self.inner.children(nodes, width)?;
        self.counts.digests += (answer.len() * FANOUT) as u64;
        Ok(answer)
    }
    fn rows(&mut self, nodes: &[Node], width: Width) -> Result<Vec<Vec<RowDigest>>, DigestError> {
        self.counts.calls += 1;
        self.counts.nodes += nodes.len() as u64;
        let answer = self.inner.rows(nodes, width)?;
        self.counts.rows += answer.iter().map(|l| l.len() as u64).sum::<u64>();
        Ok(answer)
    }
    fn keys(&mut self, key_hashes: &[u128], width: Width) -> Result<Vec<(u128, Vec<u8>)>, DigestError> {
        self.counts.calls += 1;
        self.counts.key_hashes += key_hashes.len() as u64;
        let answer = self.inner.keys(key_hashes, width)?;
        self.counts.keys += answer.len() as u64;
        self.counts.key_bytes += answer.iter().map(|(_, t)| t.len() as u64).sum::<u64>();
        Ok(answer)
    }
    fn sums(&mut self, nodes: &[Node]) -> Result<Digest, DigestError> {
        self.counts.calls += 1;
        self.counts.nodes += nodes.len() as u64;
        self.inner.sums(nodes)
    }
    fn children_while(
        &mut self,
        nodes: &[Node],
        width: Width,
        meanwhile: &mut dyn FnMut(),
    ) -> Result<Vec<[Digest; FANOUT]>, DigestError> {
        self.counts.calls += 1;
        self.counts.nodes += nodes.len() as u64;
        let answer = self.inner.children_while(nodes, width, meanwhile)?;
        self.counts.digests += (answer.len() * FANOUT) as u64;
        Ok(answer)
    }
    fn rows_while(
        &mut self,
        nodes: &[Node],
        width: Width,
        meanwhile: &mut dyn FnMut(),
    ) -> Result<Vec<Vec<RowDigest>>, DigestError> {
        self.counts.calls += 1;
        self.counts.nodes += nodes.len() as u64;
        let answer = self.inner.rows_while(nodes, width, meanwhile)?;
        self.counts.rows += answer.iter().map(|l| l.len() as u64).sum::<u64>();
        Ok(answer)
    }
}

/// How a key (or, for `Match`, a row) compares between the two sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Category {
    /// Present on both sides with the same rows.
    Match,
    /// Present on both sides with different rows.
    Conflict,
    /// Present only on the local side.
    LocalOnly,
    /// Present only on the peer.
    PeerOnly,
}

impl Category {
    /// `"match"`, `"conflict"`, `"local_only"` or `"peer_only"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Match => "match",
            Category::Conflict => "conflict",
            Category::LocalOnly => "local_only",
            Category::PeerOnly => "peer_only",
        }
    }
}

/// Batches of differing nodes gathered before they are settled together, one request overlapping
/// the classification of the previous one.
const SETTLE_BATCHES: usize = 8;

/// Differing children of one node from which differences count as dense there (see
/// [`Limits::leaf_rows`]).
pub const DENSE_CHILDREN: usize = 4;

/// Bounds on the work of one [`compare`] call.
#[derive(Debug, Clone)]
pub struct Limits {
    /// A differing node whose larger side has at most this many rows is settled by exchanging
    /// row digests instead of being split further, when differences are dense (at least
    /// [`DENSE_CHILDREN`] of its parent's children differ, or it is the root). Default 16.
    pub leaf_rows: u64,
    /// The same where differences are sparse: most such nodes then hold one differing row, and
    /// splitting them costs less than their rows' digests (an empty child digest is one byte, a
    /// row's about 22). Default 4.
    pub sparse_leaf_rows: u64,
    /// The same where every child of the parent differs: splitting such nodes again would mostly
    /// cost one more pass over both sides' digests for little. Default 256.
    pub saturated_leaf_rows: u64,
    /// Most nodes per `children` or `rows` call, and most key hashes per `keys` call. Default 4096.
    pub batch_nodes: usize,
    /// Most rows asked for in one `rows` call, by the digests' counts (a single larger node is
    /// still asked for alone). Default 262 144 (8 MiB of row digests).
    pub batch_rows: u64,
    /// Most differing keys whose text is fetched and returned per category; counts stay exact
    /// beyond it. Default 1 000 000.
    pub max_keys: usize,
    /// The width the peer is asked to answer at first (see [`Width`]). Default `Narrow`.
    pub width: Width,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            leaf_rows: 16,
            sparse_leaf_rows: 4,
            saturated_leaf_rows: 256,
            batch_nodes: 4096,
            batch_rows: 262_144,
            max_keys: 1_000_000,
            width: Width::Narrow,
        }
    }
}

/// The result of [`compare`].
#[derive(Debug, Clone, Default)]
pub struct Comparison {
    /// Rows on the local side.
    pub local_rows: u64,
    /// Rows on the peer.
    pub peer_rows: u64,
    /// Rows equal on both sides (counted once, not once per side).
    pub matched: u64,
    /// Keys present on both sides with different rows (one per key).
    pub conflict: u64,
    /// Rows whose key is only on the local side.
    pub local_only: u64,
    /// Rows whose key is only on the peer.
    pub peer_only: u64,
    /// Key text of each differing key, with its category (`Conflict`, `LocalOnly` or `PeerOnly`):
    /// conflict and local-only texts from the local side, peer-only ones from the peer. In the
    /// order found, at most [`Limits::max_keys`] per category.
    pub keys: Vec<(Category, Vec<u8>)>,
    /// True when some category had more differing keys than [`Limits::max_keys`].
    pub keys_truncated: bool,
    /// The width of the comparison that gave this result: `Full` when narrow fingerprints collided
    /// and the table was compared again (or when [`Limits::width`] asked for it).
    pub width: Width,
}

/// A node that differs, with both sides' digests of it: the local one whole, the peer's at the
/// comparison's width.
#[derive(Debug, Clone, Copy)]
struct Pending {
    node: Node,
    local: Digest,
    peer: Digest,
}

impl Pending {
    fn larger(&self) -> u64 {
        self.local.rows.max(self.peer.rows)
    }
}

/// Differing key hashes found so far, per category, up to the limit.
#[derive(Debug, Default)]
struct Found {
    conflict: Vec<u128>,
    local_only: Vec<u128>,
    peer_only: Vec<u128>,
}

/// Compares a table between `local` and `peer` top-down, expanding only nodes whose digests differ.
/// The work is a stack of differing nodes, taken `batch_nodes` at a time from its top (so each call
/// to a side asks about many nodes, and the stack stays small: at most about `MAX_DEPTH` batches of
/// `FANOUT` children, whatever the table's size). A differing node whose larger side has at most
/// [`Limits::leaf_rows`] rows, or that is at the width's [`Width::max_depth`], is settled by
/// exchanging its row digests, in batches of at most `batch_rows` rows; the texts of the keys found
/// different are fetched last. A node that one side lacks entirely is counted from the other side's
/// digest without expanding it once the keys of that category are no longer being listed
/// ([`Limits::max_keys`]).
///
/// The peer answers at [`Limits::width`]; the local side always whole. At `Narrow`, nodes are taken
/// as equal on their row count and a 64-bit fingerprint, and at the end the 128-bit sums are checked
/// for the whole table: the whole sums of the nodes not taken as equal (settled rows, counted
/// one-sided nodes) must account for the whole difference between the two totals. If they do not,
/// or two keys of a settled node share their narrowed hash, the table is compared again at `Full`
/// ([`Comparison::width`] says so). Rows are only ever taken as equal on their whole row hash.
///
/// `check` is called before every call to a side (the caller's cancel check); its error ends the
/// comparison and is returned.
///
/// Counting: rows of equal nodes are all `matched`. Within settled nodes rows are grouped by key
/// hash: present on both sides with equal sorted row-hash lists, `matched` (that many rows); on both
/// but different, one `conflict`; only local, one `local_only` per row; only on the peer, one
/// `peer_only` per row. So with unique keys `matched + conflict + local_only == local_rows`, and the
/// same with `peer_only` for `peer_rows`.
pub fn compare(
    local: &mut (dyn Side + Send),
    peer: &mut dyn Side,
    limits: &Limits,
    check: &mut dyn FnMut() -> Result<(), DigestError>,
) -> Result<Comparison, DigestError> {
    if limits.width == Width::Narrow {
        match compare_at(local, peer, limits, check, Width::Narrow) {
            Err(DigestError::Collision(_)) => {}
            other => return other,
        }
    }
    compare_at(local, peer, limits, check, Width::Full)
}

/// One comparison at one width: the state of the walk down the tree.
struct Walk<'a> {
    limits: &'a Limits,
    width: Width,
    result: Comparison,
    found: Found,
    /// Differing nodes to expand.
    stack: Vec<Pending>,
    /// Differing nodes to settle by rows.
    leaves: Vec<Pending>,
    /// Rows of `leaves` (the larger side of each).
    leaf_rows: u64,
    /// Whole sums of the nodes not taken as equal, per side (for the check at `Narrow`).
    local_apart: u128,
    peer_apart: u128,
    /// One-sided nodes counted without expanding them whose peer sum is not known whole yet.
    peer_unsummed: Vec<Node>,
}

fn compare_at(
    local: &mut (dyn Side + Send),
    peer: &mut dyn Side,
    limits: &Limits,
    check: &mut dyn FnMut() -> Result<(), DigestError>,
    width: Width,
) -> Result<Comparison, DigestError> {
    let batch_nodes = limits.batch_nodes.max(1);
    check()?;
    let local_total = local.total()?;
    check()?;
    let peer_total = peer.total()?;
    let mut walk = Walk {
        limits,
        width,
        result: Comparison {
            local_rows: local_total.rows,
            peer_rows: peer_total.rows,
            width,
            ..Default::default()
        },
        found: Found::default(),
        stack: Vec::new(),
        leaves: Vec::new(),
        leaf_rows: 0,
        local_apart: 0,
        peer_apart: 0,
        peer_unsummed: Vec::new(),
    };
    walk.sort_node(
        Pending { node: Node::ROOT, local: local_total, peer: width.digest(peer_total) },
        limits.leaf_rows,
    );

    loop {
        // Settle leaves once several batches of them are ready (so that their requests overlap), or
        // when nothing is left to expand.
        if !walk.leaves.is_empty()
            && (walk.stack.is_empty()
                || walk.leaves.len() >= SETTLE_BATCHES * batch_nodes
                || walk.leaf_rows >= SETTLE_BATCHES as u64 * limits.batch_rows)
        {
            let leaves = std::mem::take(&mut walk.leaves);
            walk.leaf_rows = 0;
            walk.settle(local, peer, &leaves, check)?;
        }
        if walk.stack.is_empty() {
            if walk.leaves.is_empty() {
                break;
            }
            continue;
        }
        let at = walk.stack.len().saturating_sub(batch_nodes);
        let batch: Vec<Pending> = walk.stack.split_off(at);
        let nodes: Vec<Node> = batch.iter().map(|p| p.node).collect();
        check()?;
        // The peer works on its answer while this side computes its own.
        let mut mine = None;
        let peer_children =
            peer.children_while(&nodes, width, &mut || mine = Some(local.children(&nodes, Width::Full)))?;
        let local_children = match mine {
            Some(answer) => answer?,
            None => local.children(&nodes, Width::Full)?,
        };
        let answers = [("local", &local_children), ("peer", &peer_children)];
        for (name, answer) in answers {
            if answer.len() != nodes.len() {
                return Err(side(
                    name,
                    format!("{} children answers for {} nodes", answer.len(), nodes.len()),
                ));
            }
        }
        for (i, pending) in batch.iter().enumerate() {
            let (l, p) = (&local_children[i], &peer_children[i]);
            if !adds_up(l, &pending.local, Width::Full) {
                return Err(side("local", "children do not add up to their node (table changed?)"));
            }
            if !adds_up(p, &pending.peer, width) {
                return Err(side("peer", "children do not add up to their node (table changed?)"));
            }
            let differing = (0..FANOUT).filter(|&j| width.digest(l[j]) != p[j]).count();
            let leaf_rows = match differing {
                FANOUT => limits.saturated_leaf_rows,
                n if n >= DENSE_CHILDREN => limits.leaf_rows,
                _ => limits.sparse_leaf_rows,
            };
            for (j, child) in pending.node.children().into_iter().enumerate() {
                walk.sort_node(Pending { node: child, local: l[j], peer: p[j] }, leaf_rows);
            }
        }
    }

    if width != Width::Full {
        walk.check_sums(peer, check, local_total, peer_total)?;
    }
    let Walk { mut result, found, .. } = walk;
    fetch_keys(local, peer, limits, check, width, &found, &mut result)?;
    Ok(result)
}

impl Walk<'_> {
    /// Counts an equal node as matched, or a node one side lacks (once its keys are no longer
    /// listed) as one-sided, or queues a differing one for expansion or settling (when it has at most
    /// `leaf_rows` rows: see [`Limits::leaf_rows`]).
    fn sort_node(&mut self, p: Pending, leaf_rows: u64) {
        let limits = self.limits;
        if self.width.digest(p.local) == p.peer {
            self.result.matched += p.local.rows;
        } else if p.peer.rows == 0 && self.found.local_only.len() >= limits.max_keys {
            self.result.local_only += p.local.rows;
            self.result.keys_truncated = true;
            self.local_apart = self.local_apart.wrapping_add(p.local.sum);
        } else if p.local.rows == 0 && self.found.peer_only.len() >= limits.max_keys {
            self.result.peer_only += p.peer.rows;
            self.result.keys_truncated = true;
            self.peer_unsummed.push(p.node);
        } else if p.larger() <= leaf_rows || p.node.depth >= self.width.max_depth() {
            self.leaf_rows = self.leaf_rows.saturating_add(p.larger());
            self.leaves.push(p);
        } else {
            self.stack.push(p);
        }
    }

    /// Fetches the row digests of differing nodes, in batches, and classifies their keys. While the
    /// peer works on one batch, a helper thread reads this side's rows of that batch and this thread
    /// classifies the previous one, so neither side waits for the other longer than it must.
    fn settle(
        &mut self,
        local: &mut (dyn Side + Send),
        peer: &mut dyn Side,
        leaves: &[Pending],
        check: &mut dyn FnMut() -> Result<(), DigestError>,
    ) -> Result<(), DigestError> {
        let limits = self.limits;
        let width = self.width;
        // Batches: at least one node each, then as many as fit both limits.
        let mut batches = Vec::new();
        let mut start = 0;
        while start < leaves.len() {
            let mut end = start + 1;
            let mut rows = leaves[start].larger();
            while end < leaves.len() && end - start < limits.batch_nodes {
                rows = rows.saturating_add(leaves[end].larger());
                if rows > limits.batch_rows {
                    break;
                }
                end += 1;
            }
            batches.push(start..end);
            start = end;
        }
        type Answered = (std::ops::Range<usize>, Vec<Vec<RowDigest>>, Vec<Vec<RowDigest>>);
        let mut previous: Option<Answered> = None;
        for range in batches {
            let nodes: Vec<Node> = leaves[range.clone()].iter().map(|p| p.node).collect();
            check()?;
            let mut classified = Ok(());
            let (mine, peer_rows) = helper_thread::run_beside(
                || local.rows(&nodes, Width::Full),
                || {
                    peer.rows_while(&nodes, width, &mut || {
                        if let Some((r, l, p)) = previous.take() {
                            classified = self.settle_batch(&leaves[r], l, p);
                        }
                    })
                },
            );
            let peer_rows = peer_rows?;
            classified?;
            let local_rows = match mine {
                Some(answer) => answer?,
                // No helper thread could be started: read here.
                None => local.rows(&nodes, Width::Full)?,
            };
            if let Some((r, l, p)) = previous.take() {
                self.settle_batch(&leaves[r], l, p)?;
            }
            previous = Some((range, local_rows, peer_rows));
        }
        if let Some((r, l, p)) = previous {
            self.settle_batch(&leaves[r], l, p)?;
        }
        Ok(())
    }

    /// Checks and classifies the answers of both sides for one batch of settled nodes.
    fn settle_batch(
        &mut self,
        batch: &[Pending],
        local_rows: Vec<Vec<RowDigest>>,
        peer_rows: Vec<Vec<RowDigest>>,
    ) -> Result<(), DigestError> {
        let width = self.width;
        let (mut local_rows, mut peer_rows) = (local_rows.into_iter(), peer_rows.into_iter());
        for pending in batch {
            let l = checked_rows("local", local_rows.next(), pending.node, pending.local, Width::Full)?;
            let p = checked_rows("peer", peer_rows.next(), pending.node, pending.peer, width)?;
            self.local_apart = self.local_apart.wrapping_add(pending.local.sum);
            self.peer_apart = p.iter().fold(self.peer_apart, |s, r| s.wrapping_add(r.row_hash));
            let l = narrowed(l, width)?;
            if width != Width::Full && p.windows(2).any(|w| w[0].key_hash == w[1].key_hash) {
                return Err(DigestError::Collision("two peer rows share a narrowed key hash".into()));
            }
            self.classify(&l, &p);
        }
        Ok(())
    }

    /// At `Narrow`: the whole sums of what was not taken as equal must account for the whole
    /// difference between the totals, or some node taken as equal was not.
    fn check_sums(
        &mut self,
        peer: &mut dyn Side,
        check: &mut dyn FnMut() -> Result<(), DigestError>,
        local_total: Digest,
        peer_total: Digest,
    ) -> Result<(), DigestError> {
        let batch = self.limits.batch_nodes.max(1);
        for nodes in self.peer_unsummed.chunks(batch) {
            check()?;
            self.peer_apart = self.peer_apart.wrapping_add(peer.sums(nodes)?.sum);
        }
        let local_equal = local_total.sum.wrapping_sub(self.local_apart);
        let peer_equal = peer_total.sum.wrapping_sub(self.peer_apart);
        if local_equal != peer_equal {
            return Err(DigestError::Collision("nodes taken as equal differ in their whole sums".into()));
        }
        Ok(())
    }

    /// Classifies the rows of one settled node, grouped by key hash.
    fn classify(&mut self, local: &[RowDigest], peer: &[RowDigest]) {
        let (result, found, limits) = (&mut self.result, &mut self.found, self.limits);
        let (mut i, mut j) = (0, 0);
        while i < local.len() || j < peer.len() {
            let key = match (local.get(i), peer.get(j)) {
                (Some(l), Some(p)) => l.key_hash.min(p.key_hash),
                (Some(l), None) => l.key_hash,
                (None, Some(p)) => p.key_hash,
                (None, None) => break,
            };
            let l_end = i + local[i..].iter().take_while(|r| r.key_hash == key).count();
            let p_end = j + peer[j..].iter().take_while(|r| r.key_hash == key).count();
            let (l, p) = (&local[i..l_end], &peer[j..p_end]);
            match (l.is_empty(), p.is_empty()) {
                (false, false) if l == p => result.matched += l.len() as u64,
                (false, false) => {
                    result.conflict += 1;
                    note(&mut found.conflict, key, limits, &mut result.keys_truncated);
                }
                (false, true) => {
                    result.local_only += l.len() as u64;
                    note(&mut found.local_only, key, limits, &mut result.keys_truncated);
                }
                _ => {
                    result.peer_only += p.len() as u64;
                    note(&mut found.peer_only, key, limits, &mut result.keys_truncated);
                }
            }
            (i, j) = (l_end, p_end);
        }
    }
}

/// Whether `children` add up to `parent`: the row counts exactly (no wrap), the sums modulo 2^128
/// (at `width`).
fn adds_up(children: &[Digest; FANOUT], parent: &Digest, width: Width) -> bool {
    let mut rows = 0u64;
    let mut total = Digest::default();
    for child in children {
        let Some(r) = rows.checked_add(child.rows) else { return false };
        rows = r;
        total.merge(child);
    }
    rows == parent.rows && width.digest(total) == width.digest(*parent)
}

fn side(name: &str, reason: impl std::fmt::Display) -> DigestError {
    DigestError::Side(format!("{name} side: {reason}"))
}

/// A side's rows of a node, sorted, after checking that they lie in the node and add up to its
/// digest (at `width`). Sides answer sorted lists; one that does not is sorted here.
fn checked_rows(
    name: &str,
    rows: Option<Vec<RowDigest>>,
    node: Node,
    digest: Digest,
    width: Width,
) -> Result<Vec<RowDigest>, DigestError> {
    let mut rows = rows.ok_or_else(|| side(name, "fewer rows answers than nodes asked"))?;
    let mut total = Digest::default();
    for r in &rows {
        if !node.contains(r.key_hash) {
            return Err(side(name, "a row outside the node asked for"));
        }
        total.add_row(r.row_hash);
    }
    if width.digest(total) != width.digest(digest) {
        return Err(side(name, "rows do not add up to their node (table changed?)"));
    }
    if !rows.is_sorted() {
        rows.sort_unstable();
    }
    Ok(rows)
}

/// Whole-width local rows (sorted) narrowed to `width`, still sorted; two distinct keys that become
/// one are a [`DigestError::Collision`].
fn narrowed(mut rows: Vec<RowDigest>, width: Width) -> Result<Vec<RowDigest>, DigestError> {
    if width == Width::Full {
        return Ok(rows);
    }
    let collide = rows
        .windows(2)
        .any(|w| w[0].key_hash != w[1].key_hash && width.key(w[0].key_hash) == width.key(w[1].key_hash));
    if collide {
        return Err(DigestError::Collision("two local keys share a narrowed key hash".into()));
    }
    // Narrowing keeps the order: keys only lose low bits, and two distinct keys that became equal
    // were refused above, so rows of one narrowed key are rows of one whole key, in row-hash order.
    rows.iter_mut().for_each(|r| *r = width.row(*r));
    debug_assert!(rows.is_sorted());
    Ok(rows)
}

/// Records a differing key hash, unless its category already holds [`Limits::max_keys`].
fn note(list: &mut Vec<u128>, key: u128, limits: &Limits, truncated: &mut bool) {
    if list.len() < limits.max_keys {
        list.push(key);
    } else {
        *truncated = true;
    }
}

/// Fetches the key texts of the differing keys (hashes at `width`): conflict and local-only from the
/// local side, peer-only from the peer.
fn fetch_keys(
    local: &mut dyn Side,
    peer: &mut dyn Side,
    limits: &Limits,
    check: &mut dyn FnMut() -> Result<(), DigestError>,
    width: Width,
    found: &Found,
    result: &mut Comparison,
) -> Result<(), DigestError> {
    let batch = limits.batch_nodes.max(1);
    let mut local_wanted: Vec<u128> = found.conflict.iter().chain(&found.local_only).copied().collect();
    local_wanted.sort_unstable();
    let mut peer_wanted = found.peer_only.clone();
    peer_wanted.sort_unstable();

    let local_texts = fetch_side(local, &local_wanted, batch, width, check)?;
    let peer_texts = fetch_side(peer, &peer_wanted, batch, width, check)?;
    let lists = [
        (Category::Conflict, "local", &found.conflict),
        (Category::LocalOnly, "local", &found.local_only),
        (Category::PeerOnly, "peer", &found.peer_only),
    ];
    for (category, name, hashes) in lists {
        let texts = if name == "local" { &local_texts } else { &peer_texts };
        for hash in hashes {
            let text = texts
                .get(hash)
                .ok_or_else(|| side(name, format!("no key text for differing key hash {hash:032x}")))?;
            result.keys.push((category, text.clone()));
        }
    }
    Ok(())
}

/// Asks one side for the texts of `wanted` key hashes (at `width`), `batch` per call; keyed by the
/// hash at `width`.
fn fetch_side(
    s: &mut dyn Side,
    wanted: &[u128],
    batch: usize,
    width: Width,
    check: &mut dyn FnMut() -> Result<(), DigestError>,
) -> Result<HashMap<u128, Vec<u8>>, DigestError> {
    let mut texts = HashMap::with_capacity(wanted.len());
    for chunk in wanted.chunks(batch) {
        check()?;
        for (hash, text) in s.keys(chunk, width)? {
            if super::key_hash(&text) != hash {
                return Err(DigestError::Side(format!("key text answered for {hash:032x} has another hash")));
            }
            if texts.insert(width.key(hash), text).is_some() {
                return Err(DigestError::Collision("two keys share a narrowed key hash".into()));
            }
        }
    }
    Ok(texts)
}
