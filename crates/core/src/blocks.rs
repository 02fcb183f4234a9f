//! Paged latent-cache bookkeeping: a fixed pool of blocks of `block_size` token slots, handed out to
//! sequences as block tables, with prefix caching.
//!
//! A full block's contents are determined by the tokens it holds and all tokens before it, so it is
//! named by a hash chain over token blocks: 128 bits of SipHash under keys drawn at random for each
//! allocator, so block names can neither collide by chance nor be predicted by a client crafting
//! prompts (vLLM's CVE-2025-25183 came from predictable prefix hashes). Full blocks can be registered under that hash; a new
//! sequence whose prompt starts with the same tokens takes the registered blocks (reference counted)
//! instead of recomputing them. Only full blocks are shared, so nobody ever writes into a shared
//! block. Registered blocks that no sequence holds stay cached until their space is needed, then
//! the least recently used go first. The scheduler owns one allocator; workers only see block ids.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hash, Hasher};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlockError {
    #[error("out of cache blocks: {requested} requested, {free} free")]
    OutOfBlocks { requested: usize, free: usize },
    #[error("block {0} is not allocated")]
    NotAllocated(u32),
}

/// Number of blocks that hold `tokens` slots.
pub fn blocks_for(tokens: usize, block_size: usize) -> usize {
    tokens.div_ceil(block_size)
}

/// Flat slot index of position `pos` of a sequence with `block_table`.
pub fn slot_of(block_table: &[u32], block_size: usize, pos: usize) -> usize {
    block_table[pos / block_size] as usize * block_size + pos % block_size
}

/// Name of a full block.
pub type BlockHash = u128;

/// Names full blocks: two SipHash-1-3 instances with independent random keys give 128 bits.
#[derive(Debug, Clone)]
pub struct BlockHasher {
    hi: RandomState,
    lo: RandomState,
}

impl Default for BlockHasher {
    fn default() -> Self {
        BlockHasher { hi: RandomState::new(), lo: RandomState::new() }
    }
}

impl BlockHasher {
    /// The name of a full block holding `tokens`, after the block named `parent` (0 for the first).
    pub fn block(&self, parent: BlockHash, tokens: &[u32]) -> BlockHash {
        let half = |s: &RandomState| {
            let mut h = s.build_hasher();
            parent.hash(&mut h);
            tokens.hash(&mut h);
            h.finish()
        };
        (u128::from(half(&self.hi)) << 64) | u128::from(half(&self.lo))
    }

    /// Extends the hash chain `hashes` over the full blocks of `tokens`.
    pub fn extend_chain(&self, hashes: &mut Vec<BlockHash>, tokens: &[u32], block_size: usize) {
        let full = tokens.len() / block_size;
        let mut parent = hashes.last().copied().unwrap_or(0);
        for b in hashes.len()..full {
            parent = self.block(parent, &tokens[b * block_size..(b + 1) * block_size]);
            hashes.push(parent);
        }
    }

    /// The hash chain of the full blocks of `tokens`.
    pub fn chain(&self, tokens: &[u32], block_size: usize) -> Vec<BlockHash> {
        let mut v = Vec::with_capacity(tokens.len() / block_size);
        self.extend_chain(&mut v, tokens, block_size);
        v
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Full prompt blocks looked up, and how many were found cached.
    pub queries: u64,
    pub hits: u64,
}

#[derive(Debug, Clone)]
pub struct BlockAllocator {
    block_size: usize,
    free: Vec<u32>,
    refs: Vec<u32>,
    /// Registered block → its hash; and hash → block.
    hash_of: Vec<Option<BlockHash>>,
    by_hash: HashMap<BlockHash, u32>,
    /// Registered blocks nobody holds, by last use (oldest first): reusable or evictable.
    idle: BTreeMap<u64, u32>,
    idle_since: Vec<Option<u64>>,
    clock: u64,
    stats: PrefixStats,
    hasher: BlockHasher,
}

impl BlockAllocator {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "block_size must be positive");
        // Pop from the end: hand out low ids first, which keeps test output readable.
        let free = (0..num_blocks as u32).rev().collect();
        BlockAllocator {
            block_size,
            free,
            refs: vec![0; num_blocks],
            hash_of: vec![None; num_blocks],
            by_hash: HashMap::new(),
            idle: BTreeMap::new(),
            idle_since: vec![None; num_blocks],
            clock: 0,
            stats: PrefixStats::default(),
            hasher: BlockHasher::default(),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.refs.len()
    }

    /// Blocks available to new allocations (free, or cached but held by nobody).
    pub fn num_free(&self) -> usize {
        self.free.len() + self.idle.len()
    }

    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_free()
    }

    /// Registered (prefix-cached) blocks, held or not.
    pub fn num_cached(&self) -> usize {
        self.by_hash.len()
    }

    pub fn prefix_stats(&self) -> &PrefixStats {
        &self.stats
    }

    /// The keyed hasher naming this allocator's blocks.
    pub fn hasher(&self) -> &BlockHasher {
        &self.hasher
    }

    /// References held on `block` (0 = free or idle cached).
    pub fn ref_count(&self, block: u32) -> u32 {
        self.refs.get(block as usize).copied().unwrap_or(0)
    }

    fn forget(&mut self, b: u32) {
        if let Some(h) = self.hash_of[b as usize].take() {
            if self.by_hash.get(&h) == Some(&b) {
                self.by_hash.remove(&h);
            }
        }
    }

    /// Takes `n` blocks, all or none, evicting the least recently used idle cached blocks if needed.
    pub fn allocate(&mut self, n: usize) -> Result<Vec<u32>, BlockError> {
        if n > self.num_free() {
            return Err(BlockError::OutOfBlocks { requested: n, free: self.num_free() });
        }
        while self.free.len() < n {
            let (_, b) = self.idle.pop_first().expect("counted in num_free");
            self.idle_since[b as usize] = None;
            self.forget(b);
            self.free.push(b);
        }
        let taken = self.free.split_off(self.free.len() - n);
        let mut taken: Vec<u32> = taken.into_iter().rev().collect();
        for b in &mut taken {
            self.refs[*b as usize] = 1;
        }
        taken.shrink_to_fit();
        Ok(taken)
    }

    /// Grows `table` so that it holds `tokens` slots.
    pub fn ensure_capacity(&mut self, table: &mut Vec<u32>, tokens: usize) -> Result<(), BlockError> {
        let need = blocks_for(tokens, self.block_size).saturating_sub(table.len());
        if need > 0 {
            table.extend(self.allocate(need)?);
        }
        Ok(())
    }

    /// Adds a reference to a block that is held or cached.
    pub fn retain(&mut self, block: u32) -> Result<(), BlockError> {
        let i = block as usize;
        if i >= self.refs.len() {
            return Err(BlockError::NotAllocated(block));
        }
        if self.refs[i] == 0 {
            let since = self.idle_since[i].take().ok_or(BlockError::NotAllocated(block))?;
            self.idle.remove(&since);
        }
        self.refs[i] += 1;
        Ok(())
    }

    /// Drops one reference to each block; unreferenced blocks return to the pool, registered ones
    /// stay cached until their space is needed.
    pub fn release(&mut self, blocks: &[u32]) -> Result<(), BlockError> {
        for &b in blocks {
            let r = self.refs.get_mut(b as usize).filter(|r| **r > 0).ok_or(BlockError::NotAllocated(b))?;
            *r -= 1;
            if *r == 0 {
                if self.hash_of[b as usize].is_some() {
                    self.clock += 1;
                    self.idle.insert(self.clock, b);
                    self.idle_since[b as usize] = Some(self.clock);
                } else {
                    self.free.push(b);
                }
            }
        }
        Ok(())
    }

    /// Records that `table[i]` holds the full block named `hashes[i]` (a sequence's computed tokens),
    /// so later prompts starting the same way can reuse it. Already known hashes are left alone.
    pub fn register(&mut self, hashes: &[BlockHash], table: &[u32]) {
        for (&h, &b) in hashes.iter().zip(table) {
            if self.hash_of[b as usize].is_some() || self.by_hash.contains_key(&h) {
                continue;
            }
            self.hash_of[b as usize] = Some(h);
            self.by_hash.insert(h, b);
        }
    }

    /// Takes (a reference to) the cached blocks matching the leading full blocks of a prompt with
    /// block hashes `hashes`, at most `max_blocks` of them; returns the blocks, in order.
    pub fn match_prefix(&mut self, hashes: &[BlockHash], max_blocks: usize) -> Vec<u32> {
        let wanted = &hashes[..hashes.len().min(max_blocks)];
        self.stats.queries += wanted.len() as u64;
        let mut out = Vec::new();
        for h in wanted {
            let Some(&b) = self.by_hash.get(h) else { break };
            self.retain(b).expect("registered blocks are held or idle");
            out.push(b);
        }
        self.stats.hits += out.len() as u64;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_release_roundtrip() {
        let mut a = BlockAllocator::new(4, 16);
        let x = a.allocate(3).unwrap();
        assert_eq!(x, vec![0, 1, 2]);
        assert_eq!(a.num_free(), 1);
        assert_eq!(a.allocate(2), Err(BlockError::OutOfBlocks { requested: 2, free: 1 }));
        assert_eq!(a.num_free(), 1, "a failed allocation takes nothing");
        a.release(&x).unwrap();
        assert_eq!(a.num_free(), 4);
        assert_eq!(a.release(&[1]), Err(BlockError::NotAllocated(1)));
    }

    #[test]
    fn shared_blocks_return_after_last_release() {
        let mut a = BlockAllocator::new(2, 4);
        let x = a.allocate(1).unwrap();
        a.retain(x[0]).unwrap();
        a.release(&x).unwrap();
        assert_eq!(a.num_free(), 1);
        a.release(&x).unwrap();
        assert_eq!(a.num_free(), 2);
    }

    #[test]
    fn capacity_and_slots() {
        let mut a = BlockAllocator::new(8, 4);
        let mut t = vec![];
        a.ensure_capacity(&mut t, 5).unwrap();
        assert_eq!(t.len(), 2);
        a.ensure_capacity(&mut t, 8).unwrap();
        assert_eq!(t.len(), 2);
        a.ensure_capacity(&mut t, 9).unwrap();
        assert_eq!(t.len(), 3);
        let table = [5u32, 2];
        assert_eq!(slot_of(&table, 4, 0), 20);
        assert_eq!(slot_of(&table, 4, 5), 9);
        assert_eq!(blocks_for(0, 4), 0);
        assert_eq!(blocks_for(4, 4), 1);
    }

    #[test]
    fn hash_chains_depend_on_everything_before() {
        let h = BlockHasher::default();
        let a = h.chain(&[1, 2, 3, 4, 5, 6, 7, 8, 9], 4);
        let b = h.chain(&[1, 2, 3, 4, 5, 6, 7, 8], 4);
        let c = h.chain(&[0, 2, 3, 4, 5, 6, 7, 8], 4);
        assert_eq!(a.len(), 2, "only full blocks");
        assert_eq!(a, b);
        assert_ne!(a[1], c[1], "same tokens after a different prefix are a different block");
        let mut grown = h.chain(&[1, 2, 3, 4], 4);
        h.extend_chain(&mut grown, &[1, 2, 3, 4, 5, 6, 7, 8], 4);
        assert_eq!(grown, a, "extending a chain equals hashing the whole");
    }

    #[test]
    fn block_names_are_keyed_per_hasher_and_use_128_bits() {
        let (x, y) = (BlockHasher::default(), BlockHasher::default());
        let tokens = [5u32, 6, 7, 8];
        assert_ne!(x.block(0, &tokens), y.block(0, &tokens), "independent random keys");
        let names: std::collections::HashSet<BlockHash> = (0..2000u32).map(|t| x.block(0, &[t])).collect();
        assert_eq!(names.len(), 2000);
        assert!(names.iter().any(|n| n >> 64 != 0) && names.iter().any(|n| (*n as u64) != 0));
    }

    #[test]
    fn prefix_blocks_are_shared_cached_and_evicted_last_used_first() {
        let mut a = BlockAllocator::new(4, 2);
        let prompt = [7u32, 8, 9, 10, 11];
        let hs = a.hasher().chain(&prompt, 2);
        let t1 = a.allocate(3).unwrap();
        a.register(&hs, &t1);
        // A second sequence with the same prompt shares the two full blocks.
        let shared = a.match_prefix(&hs, 2);
        assert_eq!(shared, t1[..2]);
        assert_eq!(a.prefix_stats(), &PrefixStats { queries: 2, hits: 2 });
        a.release(&t1).unwrap();
        assert_eq!(a.num_free(), 2, "still held by the second sequence");
        a.release(&shared).unwrap();
        assert_eq!(a.num_free(), 4);
        assert_eq!(a.num_cached(), 2, "unheld but still cached");
        // Reuse after everyone left.
        let again = a.match_prefix(&hs, 2);
        assert_eq!(again, t1[..2]);
        a.release(&again).unwrap();
        // Pressure evicts cached blocks, least recently used first.
        let all = a.allocate(4).unwrap();
        assert_eq!(all.len(), 4);
        assert_eq!(a.num_cached(), 0);
        assert!(a.match_prefix(&hs, 2).is_empty());
    }
}
