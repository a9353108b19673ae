//! Paged latent-KV block allocator.
//!
//! A [`BlockPool`] hands out fixed-size blocks of [`BLOCK_SIZE_TOKENS`] token slots (64, FlashMLA's page
//! size) from a fixed capacity and keeps one block table per sequence: the ordered list of blocks that
//! holds that sequence's latent cache, token `t` living in block `table[t / 64]`, slot `t % 64`. It manages
//! block *ids* only; the latent values live in a [`LatentStore`](crate::LatentStore).
//!
//! Invariants (checked by [`BlockPool::check_invariants`] and by property tests):
//! - `free_blocks() + used_blocks() == capacity_blocks()` at all times;
//! - every block is either on the free list or in exactly one sequence's table, never both, never twice;
//! - a failed [`BlockPool::reserve`] changes nothing (all-or-nothing).
//!
//! Allocating or freeing one block is O(1) (a free-list stack plus a per-block owner slot); freeing a
//! sequence is O(blocks it holds).

use std::collections::HashMap;
use std::fmt;

use crate::sequence::RequestId;

/// Tokens per KV block (FlashMLA's paged-KV block size).
pub const BLOCK_SIZE_TOKENS: usize = 64;

/// Index of one block in the pool (`0..capacity_blocks`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(u32);

impl BlockId {
    /// The block's index in `0..capacity_blocks`, e.g. to address storage.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "block#{}", self.0)
    }
}

/// Number of blocks needed to hold `tokens` token slots.
pub fn blocks_for_tokens(tokens: usize) -> usize {
    tokens.div_ceil(BLOCK_SIZE_TOKENS)
}

/// Errors of the block pool.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// Not enough free blocks; nothing was allocated.
    #[error(
        "block pool: request {seq} needs {needed_blocks} more block(s) but only {free_blocks} are free"
    )]
    OutOfBlocks {
        /// The sequence that asked.
        seq: RequestId,
        /// Blocks it needed beyond those it holds.
        needed_blocks: usize,
        /// Blocks free at the time.
        free_blocks: usize,
    },
    /// An audit found the pool's bookkeeping inconsistent (a bug, never bad input).
    #[error("block pool invariant violated: {0}")]
    Invariant(String),
}

/// Fixed-capacity allocator of KV blocks with per-sequence block tables.
#[derive(Debug, Clone)]
pub struct BlockPool {
    /// Free blocks, used as a stack (last freed is first reused).
    free: Vec<BlockId>,
    /// Owner of each block, `None` when free.
    owner: Vec<Option<RequestId>>,
    /// Block table of each sequence holding at least one block.
    tables: HashMap<RequestId, Vec<BlockId>>,
}

impl BlockPool {
    /// A pool of `capacity_blocks` free blocks.
    pub fn new(capacity_blocks: u32) -> Self {
        // Reverse so that block 0 is handed out first.
        let free = (0..capacity_blocks).rev().map(BlockId).collect();
        Self {
            free,
            owner: vec![None; capacity_blocks as usize],
            tables: HashMap::new(),
        }
    }

    /// Total blocks in the pool.
    pub fn capacity_blocks(&self) -> usize {
        self.owner.len()
    }

    /// Blocks not owned by any sequence.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Blocks owned by some sequence.
    pub fn used_blocks(&self) -> usize {
        self.capacity_blocks() - self.free_blocks()
    }

    /// `used / capacity` in `0..=1` (0 for an empty pool).
    pub fn usage_fraction(&self) -> f64 {
        if self.capacity_blocks() == 0 {
            0.0
        } else {
            self.used_blocks() as f64 / self.capacity_blocks() as f64
        }
    }

    /// Number of sequences holding blocks.
    pub fn num_sequences(&self) -> usize {
        self.tables.len()
    }

    /// The block table of `seq` (empty if it holds no blocks).
    pub fn table(&self, seq: RequestId) -> &[BlockId] {
        self.tables.get(&seq).map_or(&[], Vec::as_slice)
    }

    /// Token slots covered by `seq`'s blocks.
    pub fn capacity_tokens(&self, seq: RequestId) -> usize {
        self.table(seq).len() * BLOCK_SIZE_TOKENS
    }

    /// Blocks `seq` would need beyond those it holds to cover `total_tokens` slots.
    pub fn additional_blocks_needed(&self, seq: RequestId, total_tokens: usize) -> usize {
        blocks_for_tokens(total_tokens).saturating_sub(self.table(seq).len())
    }

    /// Whether [`reserve`](Self::reserve)`(seq, total_tokens)` would succeed.
    pub fn can_reserve(&self, seq: RequestId, total_tokens: usize) -> bool {
        self.additional_blocks_needed(seq, total_tokens) <= self.free_blocks()
    }

    /// Grows `seq`'s table so that it covers `total_tokens` slots; returns the number of blocks added.
    /// All-or-nothing: on [`PoolError::OutOfBlocks`] nothing changes. Never shrinks a table.
    pub fn reserve(&mut self, seq: RequestId, total_tokens: usize) -> Result<usize, PoolError> {
        let needed = self.additional_blocks_needed(seq, total_tokens);
        if needed > self.free_blocks() {
            return Err(PoolError::OutOfBlocks {
                seq,
                needed_blocks: needed,
                free_blocks: self.free_blocks(),
            });
        }
        for _ in 0..needed {
            self.append_block(seq)?;
        }
        Ok(needed)
    }

    /// Appends one block to `seq`'s table (creating the table if needed). O(1).
    pub fn append_block(&mut self, seq: RequestId) -> Result<BlockId, PoolError> {
        let Some(block) = self.free.pop() else {
            return Err(PoolError::OutOfBlocks {
                seq,
                needed_blocks: 1,
                free_blocks: 0,
            });
        };
        self.owner[block.index()] = Some(seq);
        self.tables.entry(seq).or_default().push(block);
        Ok(block)
    }

    /// Returns all of `seq`'s blocks to the free list; returns how many were freed (0 if it held none).
    pub fn free(&mut self, seq: RequestId) -> usize {
        let Some(table) = self.tables.remove(&seq) else {
            return 0;
        };
        // Push in reverse so the sequence's first block is reused first.
        for &block in table.iter().rev() {
            self.owner[block.index()] = None;
            self.free.push(block);
        }
        table.len()
    }

    /// Audits the bookkeeping in O(capacity): every block free xor owned by exactly one table, the
    /// owner slots agree with the tables, and the counts add up.
    pub fn check_invariants(&self) -> Result<(), PoolError> {
        let capacity = self.capacity_blocks();
        let mut seen = vec![false; capacity];
        for &block in &self.free {
            let i = block.index();
            if i >= capacity {
                return Err(PoolError::Invariant(format!(
                    "{block} on free list is out of range"
                )));
            }
            if std::mem::replace(&mut seen[i], true) {
                return Err(PoolError::Invariant(format!(
                    "{block} is on the free list twice"
                )));
            }
            if let Some(owner) = self.owner[i] {
                return Err(PoolError::Invariant(format!(
                    "{block} is free but owned by request {owner}"
                )));
            }
        }
        let mut owned = 0usize;
        for (&seq, table) in &self.tables {
            if table.is_empty() {
                return Err(PoolError::Invariant(format!(
                    "request {seq} has an empty table"
                )));
            }
            for &block in table {
                let i = block.index();
                if i >= capacity {
                    return Err(PoolError::Invariant(format!(
                        "{block} in a table is out of range"
                    )));
                }
                if std::mem::replace(&mut seen[i], true) {
                    return Err(PoolError::Invariant(format!("{block} is owned twice")));
                }
                if self.owner[i] != Some(seq) {
                    return Err(PoolError::Invariant(format!(
                        "{block} is in request {seq}'s table but its owner slot says {:?}",
                        self.owner[i]
                    )));
                }
                owned += 1;
            }
        }
        if owned + self.free.len() != capacity {
            return Err(PoolError::Invariant(format!(
                "{owned} owned + {} free != capacity {capacity}",
                self.free.len()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(n: u64) -> RequestId {
        RequestId(n)
    }

    #[test]
    fn reserve_rounds_tokens_up_to_whole_blocks() {
        let mut pool = BlockPool::new(10);
        assert_eq!(pool.reserve(id(1), 1).unwrap(), 1);
        assert_eq!(pool.reserve(id(1), 64).unwrap(), 0);
        assert_eq!(pool.reserve(id(1), 65).unwrap(), 1);
        assert_eq!(pool.capacity_tokens(id(1)), 128);
        assert_eq!(pool.used_blocks(), 2);
        assert_eq!(pool.reserve(id(1), 10).unwrap(), 0, "reserve never shrinks");
    }

    #[test]
    fn failed_reserve_changes_nothing() {
        let mut pool = BlockPool::new(3);
        pool.reserve(id(1), 64).unwrap();
        let err = pool.reserve(id(2), 64 * 3).unwrap_err();
        assert_eq!(
            err,
            PoolError::OutOfBlocks {
                seq: id(2),
                needed_blocks: 3,
                free_blocks: 2
            }
        );
        assert_eq!(pool.free_blocks(), 2);
        assert!(pool.table(id(2)).is_empty());
        pool.check_invariants().unwrap();
    }

    #[test]
    fn freed_blocks_are_reused() {
        let mut pool = BlockPool::new(2);
        pool.reserve(id(1), 128).unwrap();
        assert!(!pool.can_reserve(id(2), 1));
        assert_eq!(pool.free(id(1)), 2);
        assert_eq!(pool.free(id(1)), 0, "double free is a no-op");
        pool.reserve(id(2), 128).unwrap();
        assert_eq!(pool.table(id(2)), &[BlockId(0), BlockId(1)]);
        pool.check_invariants().unwrap();
    }

    #[test]
    fn usage_fraction_is_used_over_capacity() {
        let mut pool = BlockPool::new(4);
        pool.reserve(id(7), 64 * 3).unwrap();
        assert_eq!(pool.usage_fraction(), 0.75);
        assert_eq!(BlockPool::new(0).usage_fraction(), 0.0);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Reserve(u64, usize),
        Append(u64),
        Free(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..6, 0usize..700).prop_map(|(s, t)| Op::Reserve(s, t)),
            (0u64..6).prop_map(Op::Append),
            (0u64..6).prop_map(Op::Free),
        ]
    }

    proptest! {
        #[test]
        fn random_ops_never_leak_or_double_allocate(
            capacity in 0u32..24,
            ops in proptest::collection::vec(op(), 1..200),
        ) {
            let mut pool = BlockPool::new(capacity);
            let capacity = capacity as usize;
            // Model: blocks each sequence should hold.
            let mut model: HashMap<u64, usize> = HashMap::new();
            for op in ops {
                match op {
                    Op::Reserve(s, tokens) => {
                        let held = model.get(&s).copied().unwrap_or(0);
                        let want = blocks_for_tokens(tokens).max(held);
                        let used: usize = model.values().sum();
                        let ok = want - held <= capacity - used;
                        prop_assert_eq!(pool.reserve(id(s), tokens).is_ok(), ok);
                        if ok && want > 0 {
                            model.insert(s, want);
                        }
                    }
                    Op::Append(s) => {
                        let used: usize = model.values().sum();
                        let res = pool.append_block(id(s));
                        prop_assert_eq!(res.is_ok(), used < capacity);
                        if res.is_ok() {
                            *model.entry(s).or_default() += 1;
                        }
                    }
                    Op::Free(s) => {
                        prop_assert_eq!(pool.free(id(s)), model.remove(&s).unwrap_or(0));
                    }
                }
                pool.check_invariants().map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(pool.free_blocks() + pool.used_blocks(), capacity);
                prop_assert_eq!(pool.used_blocks(), model.values().sum::<usize>());
                for (&s, &n) in &model {
                    prop_assert_eq!(pool.table(id(s)).len(), n);
                }
            }
        }
    }
}
