//! Top-down comparison of one table between two sides.

use std::collections::HashMap;

use super::{Digest, DigestError, FANOUT, MAX_DEPTH, Node, RowDigest, TableDigests};

/// One side of a comparison: this server's digest files, or a peer answering over SQL.
///
/// Answers must be consistent with each other (the children of a node add up to the node's
/// digest, its rows to its children's digests); [`compare`] checks that and fails with
/// [`DigestError::Side`] otherwise, as for an answer of the wrong length.
pub trait Side {
    /// Digest of the whole table.
    fn total(&mut self) -> Result<Digest, DigestError>;
    /// For each node, its children's digests (see [`TableDigests::children`]).
    fn children(&mut self, nodes: &[Node]) -> Result<Vec<[Digest; FANOUT]>, DigestError>;
    /// For each node, its rows' digests, sorted.
    fn rows(&mut self, nodes: &[Node]) -> Result<Vec<Vec<RowDigest>>, DigestError>;
    /// The key text of each given key hash present on this side, once per hash, any order.
    fn keys(&mut self, key_hashes: &[u128]) -> Result<Vec<(u128, Vec<u8>)>, DigestError>;

    /// [`Side::children`], calling `meanwhile` exactly once while the answer is being worked on: a
    /// remote side sends its request first, so that both sides work at once. By default `meanwhile`
    /// runs first.
    fn children_while(
        &mut self,
        nodes: &[Node],
        meanwhile: &mut dyn FnMut(),
    ) -> Result<Vec<[Digest; FANOUT]>, DigestError> {
        meanwhile();
        self.children(nodes)
    }

    /// [`Side::rows`], calling `meanwhile` exactly once while the answer is being worked on (see
    /// [`Side::children_while`]).
    fn rows_while(
        &mut self,
        nodes: &[Node],
        meanwhile: &mut dyn FnMut(),
    ) -> Result<Vec<Vec<RowDigest>>, DigestError> {
        meanwhile();
        self.rows(nodes)
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
    fn children(&mut self, nodes: &[Node]) -> Result<Vec<[Digest; FANOUT]>, DigestError> {
        let answer = TableDigests::children(self, nodes);
        self.fault_or(answer)
    }
    fn rows(&mut self, nodes: &[Node]) -> Result<Vec<Vec<RowDigest>>, DigestError> {
        let answer = TableDigests::rows(self, nodes);
        self.fault_or(answer)
    }
    fn keys(&mut self, key_hashes: &[u128]) -> Result<Vec<(u128, Vec<u8>)>, DigestError> {
        let answer = TableDigests::keys(self, key_hashes);
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
    fn children(&mut self, nodes: &[Node]) -> Result<Vec<[Digest; FANOUT]>, DigestError> {
        self.counts.calls += 1;
        self.counts.nodes += nodes.len() as u64;
        let answer = self.inner.children(nodes)?;
        self.counts.digests += (answer.len() * FANOUT) as u64;
        Ok(answer)
    }
    fn rows(&mut self, nodes: &[Node]) -> Result<Vec<Vec<RowDigest>>, DigestError> {
        self.counts.calls += 1;
        self.counts.nodes += nodes.len() as u64;
        let answer = self.inner.rows(nodes)?;
        self.counts.rows += answer.iter().map(|l| l.len() as u64).sum::<u64>();
        Ok(answer)
    }
    fn keys(&mut self, key_hashes: &[u128]) -> Result<Vec<(u128, Vec<u8>)>, DigestError> {
        self.counts.calls += 1;
        self.counts.key_hashes += key_hashes.len() as u64;
        let answer = self.inner.keys(key_hashes)?;
        self.counts.keys += answer.len() as u64;
        self.counts.key_bytes += answer.iter().map(|(_, t)| t.len() as u64).sum::<u64>();
        Ok(answer)
    }
    fn children_while(
        &mut self,
        nodes: &[Node],
        meanwhile: &mut dyn FnMut(),
    ) -> Result<Vec<[Digest; FANOUT]>, DigestError> {
        self.counts.calls += 1;
        self.counts.nodes += nodes.len() as u64;
        let answer = self.inner.children_while(nodes, meanwhile)?;
        self.counts.digests += (answer.len() * FANOUT) as u64;
        Ok(answer)
    }
    fn rows_while(
        &mut self,
        nodes: &[Node],
        meanwhile: &mut dyn FnMut(),
    ) -> Result<Vec<Vec<RowDigest>>, DigestError> {
        self.counts.calls += 1;
        self.counts.nodes += nodes.len() as u64;
        let answer = self.inner.rows_while(nodes, meanwhile)?;
        self.counts.rows += answer.iter().map(|l| l.len() as u64).sum::<u64>();
        Ok(answer)
    }
}

/// How a key (or, for `Match`, a row) compares between the two sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// Bounds on the work of one [`compare`] call.
#[derive(Debug, Clone)]
pub struct Limits {
    /// A differing node whose larger side has at most this many rows is settled by exchanging
    /// row digests instead of being split further. Default 16: a node's row digests (32 bytes
    /// each) then cost about what its 16 child digests (up to 17 bytes each) would.
    pub leaf_rows: u64,
    /// Most nodes per `children` or `rows` call, and most key hashes per `keys` call. Default 4096.
    pub batch_nodes: usize,
    /// Most rows asked for in one `rows` call, by the digests' counts (a single larger node is
    /// still asked for alone). Default 262 144 (8 MiB of row digests).
    pub batch_rows: u64,
    /// Most differing keys whose text is fetched and returned per category; counts stay exact
    /// beyond it. Default 1 000 000.
    pub max_keys: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { leaf_rows: 16, batch_nodes: 4096, batch_rows: 262_144, max_keys: 1_000_000 }
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
}

/// A node that differs, with both sides' digests of it.
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
/// [`Limits::leaf_rows`] rows, or that is at [`MAX_DEPTH`], is settled by exchanging its row digests,
/// in batches of at most `batch_rows` rows; the texts of the keys found different are fetched last.
/// A node that one side lacks entirely is counted from the other side's digest without expanding
/// it once the keys of that category are no longer being listed ([`Limits::max_keys`]).
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
    local: &mut dyn Side,
    peer: &mut dyn Side,
    limits: &Limits,
    check: &mut dyn FnMut() -> Result<(), DigestError>,
) -> Result<Comparison, DigestError> {
    let batch_nodes = limits.batch_nodes.max(1);
    let mut result = Comparison::default();
    check()?;
    let local_total = local.total()?;
    check()?;
    let peer_total = peer.total()?;
    result.local_rows = local_total.rows;
    result.peer_rows = peer_total.rows;

    let mut found = Found::default();
    let mut stack = Vec::new();
    let mut leaves = Vec::new();
    let mut leaf_rows = 0u64;
    sort_node(
        Pending { node: Node::ROOT, local: local_total, peer: peer_total },
        limits,
        &mut result,
        &found,
        &mut stack,
        &mut leaves,
    );

    loop {
        if !leaves.is_empty() {
            leaf_rows = leaves.iter().fold(0u64, |n, p: &Pending| n.saturating_add(p.larger()));
        }
        // Settle leaves once a batch of them is ready, or when nothing is left to expand.
        if !leaves.is_empty()
            && (stack.is_empty() || leaves.len() >= batch_nodes || leaf_rows >= limits.batch_rows)
        {
            settle(local, peer, &leaves, limits, check, &mut result, &mut found)?;
            leaves.clear();
            leaf_rows = 0;
        }
        if stack.is_empty() {
            if leaves.is_empty() {
                break;
            }
            continue;
        }
        let batch: Vec<Pending> = stack.split_off(stack.len().saturating_sub(batch_nodes));
        let nodes: Vec<Node> = batch.iter().map(|p| p.node).collect();
        check()?;
        // The peer works on its answer while this side computes its own.
        let mut mine = None;
        let peer_children = peer.children_while(&nodes, &mut || mine = Some(local.children(&nodes)))?;
        let local_children = match mine {
            Some(answer) => answer?,
            None => local.children(&nodes)?,
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
            if !adds_up(l, &pending.local) {
                return Err(side("local", "children do not add up to their node (table changed?)"));
            }
            if !adds_up(p, &pending.peer) {
                return Err(side("peer", "children do not add up to their node (table changed?)"));
            }
            for (j, child) in pending.node.children().into_iter().enumerate() {
                let child = Pending { node: child, local: l[j], peer: p[j] };
                sort_node(child, limits, &mut result, &found, &mut stack, &mut leaves);
            }
        }
    }

    fetch_keys(local, peer, limits, check, &found, &mut result)?;
    Ok(result)
}

/// Counts an equal node as matched, or a node one side lacks (once its keys are no longer listed) as
/// one-sided, or queues a differing one for expansion or settling.
fn sort_node(
    p: Pending,
    limits: &Limits,
    result: &mut Comparison,
    found: &Found,
    expand: &mut Vec<Pending>,
    leaves: &mut Vec<Pending>,
) {
    if p.local == p.peer {
        result.matched += p.local.rows;
    } else if p.peer.rows == 0 && found.local_only.len() >= limits.max_keys {
        result.local_only += p.local.rows;
        result.keys_truncated = true;
    } else if p.local.rows == 0 && found.peer_only.len() >= limits.max_keys {
        result.peer_only += p.peer.rows;
        result.keys_truncated = true;
    } else if p.larger() <= limits.leaf_rows || p.node.depth >= MAX_DEPTH {
        leaves.push(p);
    } else {
        expand.push(p);
    }
}

/// Whether `children` add up to `parent`: the row counts exactly (no wrap), the sums modulo 2^128.
fn adds_up(children: &[Digest; FANOUT], parent: &Digest) -> bool {
    let mut rows = 0u64;
    let mut total = Digest::default();
    for child in children {
        let Some(r) = rows.checked_add(child.rows) else { return false };
        rows = r;
        total.merge(child);
    }
    rows == parent.rows && total == *parent
}

fn side(name: &str, reason: impl std::fmt::Display) -> DigestError {
    DigestError::Side(format!("{name} side: {reason}"))
}

/// Fetches the row digests of differing nodes, in batches, and classifies their keys.
fn settle(
    local: &mut dyn Side,
    peer: &mut dyn Side,
    leaves: &[Pending],
    limits: &Limits,
    check: &mut dyn FnMut() -> Result<(), DigestError>,
    result: &mut Comparison,
    found: &mut Found,
) -> Result<(), DigestError> {
    let mut start = 0;
    while start < leaves.len() {
        // At least one node per batch, then as many as fit both limits.
        let mut end = start + 1;
        let mut rows = leaves[start].larger();
        while end < leaves.len() && end - start < limits.batch_nodes {
            rows = rows.saturating_add(leaves[end].larger());
            if rows > limits.batch_rows {
                break;
            }
            end += 1;
        }
        let batch = &leaves[start..end];
        let nodes: Vec<Node> = batch.iter().map(|p| p.node).collect();
        check()?;
        let mut mine = None;
        let peer_rows = peer.rows_while(&nodes, &mut || mine = Some(local.rows(&nodes)))?;
        let local_rows = match mine {
            Some(answer) => answer?,
            None => local.rows(&nodes)?,
        };
        for (i, pending) in batch.iter().enumerate() {
            let l = checked_rows("local", local_rows.get(i), pending.node, pending.local)?;
            let p = checked_rows("peer", peer_rows.get(i), pending.node, pending.peer)?;
            classify(&l, &p, limits, result, found);
        }
        start = end;
    }
    Ok(())
}

/// A side's rows of a node, sorted, after checking that they lie in the node and add up to its
/// digest.
fn checked_rows(
    name: &str,
    rows: Option<&Vec<RowDigest>>,
    node: Node,
    digest: Digest,
) -> Result<Vec<RowDigest>, DigestError> {
    let rows = rows.ok_or_else(|| side(name, "fewer rows answers than nodes asked"))?;
    let mut total = Digest::default();
    for r in rows {
        if !node.contains(r.key_hash) {
            return Err(side(name, "a row outside the node asked for"));
        }
        total.add_row(r.row_hash);
    }
    if total != digest {
        return Err(side(name, "rows do not add up to their node (table changed?)"));
    }
    let mut rows = rows.clone();
    rows.sort_unstable();
    Ok(rows)
}

/// Classifies the rows of one settled node, grouped by key hash.
fn classify(
    local: &[RowDigest],
    peer: &[RowDigest],
    limits: &Limits,
    result: &mut Comparison,
    found: &mut Found,
) {
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

/// Records a differing key hash, unless its category already holds [`Limits::max_keys`].
fn note(list: &mut Vec<u128>, key: u128, limits: &Limits, truncated: &mut bool) {
    if list.len() < limits.max_keys {
        list.push(key);
    } else {
        *truncated = true;
    }
}

/// Fetches the key texts of the differing keys: conflict and local-only from the local side,
/// peer-only from the peer.
fn fetch_keys(
    local: &mut dyn Side,
    peer: &mut dyn Side,
    limits: &Limits,
    check: &mut dyn FnMut() -> Result<(), DigestError>,
    found: &Found,
    result: &mut Comparison,
) -> Result<(), DigestError> {
    let batch = limits.batch_nodes.max(1);
    let mut local_wanted: Vec<u128> = found.conflict.iter().chain(&found.local_only).copied().collect();
    local_wanted.sort_unstable();
    let mut peer_wanted = found.peer_only.clone();
    peer_wanted.sort_unstable();

    let local_texts = fetch_side(local, &local_wanted, batch, check)?;
    let peer_texts = fetch_side(peer, &peer_wanted, batch, check)?;
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

/// Asks one side for the texts of `wanted` key hashes, `batch` per call.
fn fetch_side(
    s: &mut dyn Side,
    wanted: &[u128],
    batch: usize,
    check: &mut dyn FnMut() -> Result<(), DigestError>,
) -> Result<HashMap<u128, Vec<u8>>, DigestError> {
    let mut texts = HashMap::with_capacity(wanted.len());
    for chunk in wanted.chunks(batch) {
        check()?;
        for (hash, text) in s.keys(chunk)? {
            if super::key_hash(&text) != hash {
                return Err(DigestError::Side(format!("key text answered for {hash:032x} has another hash")));
            }
            texts.insert(hash, text);
        }
    }
    Ok(texts)
}
