//! Storage of the MLA latent cache behind the block ids of a [`BlockPool`](crate::BlockPool).
//!
//! MLA caches, per layer and per token, one `c_kv` row (`kv_lora_rank` floats) and one `k_rope` row
//! (`qk_rope_head_dim` floats), never full K/V. A [`LatentStore`] maps (block, slot, layer) to those
//! rows: token position `pos` of a sequence lives in block `table[pos / 64]`, slot `pos % 64`, where
//! `table` is the sequence's block table from the pool. [`LatentStore::gather`] returns a sequence's rows
//! for one layer as contiguous `[len, kv_lora_rank]` and `[len, rope_dim]` arrays: exactly what the
//! model's attention consumes.
//!
//! [`CpuLatentStore`] is the plain `f32` implementation: one chunk per block holding
//! `[layer][slot][dim]` for `c_kv` and for `k_rope`, so gathering a layer copies one contiguous run per
//! block. It is allocated up front (zeros) for the whole pool.
//!
//! Invariants: every write and gather is bounds-checked against the shape, the table and the store's
//! block count, and fails with a [`StoreError`] naming the field at fault rather than panicking.

use crate::block_pool::{BLOCK_SIZE_TOKENS, BlockId};

/// Per-token latent shape of one model (DeepSeek-V3: 61 layers, 512, 64).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LatentShape {
    /// Layers that cache a latent (including an MTP layer if it keeps its own cache).
    pub num_layers: usize,
    /// Width of one `c_kv` row (`kv_lora_rank`).
    pub kv_lora_rank: usize,
    /// Width of one `k_rope` row (`qk_rope_head_dim`).
    pub rope_dim: usize,
}

impl LatentShape {
    /// Floats cached per token per layer (`kv_lora_rank + rope_dim`).
    pub fn floats_per_token_layer(&self) -> usize {
        self.kv_lora_rank + self.rope_dim
    }
}

/// A sequence's latent rows for one layer, contiguous and in position order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LatentRows {
    /// Number of token rows.
    pub len: usize,
    /// `[len, kv_lora_rank]`, row-major.
    pub c_kv: Vec<f32>,
    /// `[len, rope_dim]`, row-major.
    pub k_rope: Vec<f32>,
}

/// Errors of a latent store; each names the argument at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// `layer` is not below the shape's `num_layers`.
    #[error("latent store: layer {layer} out of range (num_layers {num_layers})")]
    Layer {
        /// The layer asked for.
        layer: usize,
        /// Layers in the shape.
        num_layers: usize,
    },
    /// A position is beyond the slots covered by the block table.
    #[error("latent store: position {pos} is beyond the table's {capacity_tokens} token slots")]
    Position {
        /// The last position the access needed.
        pos: usize,
        /// Slots covered by the table.
        capacity_tokens: usize,
    },
    /// A row slice has the wrong width (or is not a whole number of rows).
    #[error("latent store: `{field}` has {got} floats, expected {expected}")]
    RowWidth {
        /// `c_kv` or `k_rope`.
        field: &'static str,
        /// Floats expected.
        expected: usize,
        /// Floats given.
        got: usize,
    },
    /// A row slice is not a whole number of rows.
    #[error(
        "latent store: `{field}` has {got} floats, not a multiple of the row width {row_width}"
    )]
    NotWholeRows {
        /// `c_kv` or `k_rope`.
        field: &'static str,
        /// Floats per row.
        row_width: usize,
        /// Floats given.
        got: usize,
    },
    /// A shape dimension is zero.
    #[error("latent store: shape field `{field}` must be positive")]
    Shape {
        /// The zero field.
        field: &'static str,
    },
    /// A block id in the table is not backed by this store.
    #[error("latent store: {block} is not backed (store has {num_blocks} blocks)")]
    Block {
        /// The block asked for.
        block: BlockId,
        /// Blocks in the store.
        num_blocks: usize,
    },
}

/// Storage of latent rows addressed through a block table. Implementations: [`CpuLatentStore`]; a
/// device-memory store can implement the same trait.
pub trait LatentStore {
    /// The per-token shape this store holds.
    fn shape(&self) -> LatentShape;

    /// Writes `n` consecutive positions `start_pos..start_pos + n` of one layer, where `c_kv` holds
    /// `n * kv_lora_rank` floats and `k_rope` `n * rope_dim` floats (row-major). Used for prefill chunks
    /// and for KV that arrived from a prefill instance.
    fn write_rows(
        &mut self,
        table: &[BlockId],
        layer: usize,
        start_pos: usize,
        c_kv: &[f32],
        k_rope: &[f32],
    ) -> Result<(), StoreError>;

    /// Copies positions `0..len` of one layer into `out` (resized to fit; its allocation is reused).
    fn gather_into(
        &self,
        table: &[BlockId],
        layer: usize,
        len: usize,
        out: &mut LatentRows,
    ) -> Result<(), StoreError>;

    /// Copies positions `0..len` of one layer into `c_kv` (`len × kv_lora_rank` floats) and
    /// `k_rope` (`len × rope_dim`), where `len = c_kv.len() / kv_lora_rank`: the caller's buffers,
    /// no allocation. The provided version goes through [`gather`](Self::gather); stores override
    /// it to copy straight from their blocks.
    fn gather_into_slices(
        &self,
        table: &[BlockId],
        layer: usize,
        c_kv: &mut [f32],
        k_rope: &mut [f32],
    ) -> Result<(), StoreError> {
        let shape = self.shape();
        let len = whole_rows(c_kv.len(), shape.kv_lora_rank)?;
        check_width("k_rope", k_rope.len(), len * shape.rope_dim)?;
        let rows = self.gather(table, layer, len)?;
        c_kv.copy_from_slice(&rows.c_kv);
        k_rope.copy_from_slice(&rows.k_rope);
        Ok(())
    }

    /// Writes one position's rows of one layer.
    fn write(
        &mut self,
        table: &[BlockId],
        layer: usize,
        pos: usize,
        c_kv: &[f32],
        k_rope: &[f32],
    ) -> Result<(), StoreError> {
        let shape = self.shape();
        check_width("c_kv", c_kv.len(), shape.kv_lora_rank)?;
        check_width("k_rope", k_rope.len(), shape.rope_dim)?;
        self.write_rows(table, layer, pos, c_kv, k_rope)
    }

    /// Positions `0..len` of one layer as contiguous rows.
    fn gather(
        &self,
        table: &[BlockId],
        layer: usize,
        len: usize,
    ) -> Result<LatentRows, StoreError> {
        let mut out = LatentRows::default();
        self.gather_into(table, layer, len, &mut out)?;
        Ok(out)
    }
}

/// The number of `row_width`-wide `c_kv` rows in `got` floats.
fn whole_rows(got: usize, row_width: usize) -> Result<usize, StoreError> {
    if row_width == 0 || !got.is_multiple_of(row_width) {
        return Err(StoreError::NotWholeRows {
            field: "c_kv",
            row_width,
            got,
        });
    }
    Ok(got / row_width)
}

fn check_width(field: &'static str, got: usize, expected: usize) -> Result<(), StoreError> {
    if got == expected {
        Ok(())
    } else {
        Err(StoreError::RowWidth {
            field,
            expected,
            got,
        })
    }
}

/// One block's rows: `[layer][slot][dim]` for each of `c_kv` and `k_rope`.
#[derive(Clone, Debug)]
struct BlockChunk {
    c_kv: Vec<f32>,
    k_rope: Vec<f32>,
}

/// Latent store in host memory, `f32`, one chunk per block.
#[derive(Clone, Debug)]
pub struct CpuLatentStore {
    shape: LatentShape,
    blocks: Vec<BlockChunk>,
}

impl CpuLatentStore {
    /// A zero-filled store backing blocks `0..num_blocks` (use the pool's capacity). Every shape
    /// dimension must be positive.
    pub fn new(shape: LatentShape, num_blocks: usize) -> Result<Self, StoreError> {
        for (field, value) in [
            ("num_layers", shape.num_layers),
            ("kv_lora_rank", shape.kv_lora_rank),
            ("rope_dim", shape.rope_dim),
        ] {
            if value == 0 {
                return Err(StoreError::Shape { field });
            }
        }
        let per_layer = BLOCK_SIZE_TOKENS * shape.num_layers;
        let chunk = BlockChunk {
            c_kv: vec![0.0; per_layer * shape.kv_lora_rank],
            k_rope: vec![0.0; per_layer * shape.rope_dim],
        };
        Ok(Self {
            shape,
            blocks: vec![chunk; num_blocks],
        })
    }

    /// Bytes of `f32` storage held.
    pub fn size_bytes(&self) -> usize {
        self.blocks.len()
            * BLOCK_SIZE_TOKENS
            * self.shape.num_layers
            * self.shape.floats_per_token_layer()
            * std::mem::size_of::<f32>()
    }

    fn check_range(
        &self,
        table: &[BlockId],
        layer: usize,
        end_pos: usize,
    ) -> Result<(), StoreError> {
        if layer >= self.shape.num_layers {
            return Err(StoreError::Layer {
                layer,
                num_layers: self.shape.num_layers,
            });
        }
        let capacity_tokens = table.len() * BLOCK_SIZE_TOKENS;
        if end_pos > capacity_tokens {
            return Err(StoreError::Position {
                pos: end_pos - 1,
                capacity_tokens,
            });
        }
        for &block in &table[..end_pos.div_ceil(BLOCK_SIZE_TOKENS)] {
            if block.index() >= self.blocks.len() {
                return Err(StoreError::Block {
                    block,
                    num_blocks: self.blocks.len(),
                });
            }
        }
        Ok(())
    }
}

/// Calls `f(block, first_slot, pos_offset, n)` for each run of consecutive slots in one block covering
/// positions `start..end`.
fn for_each_run(
    table: &[BlockId],
    start: usize,
    end: usize,
    mut f: impl FnMut(BlockId, usize, usize, usize),
) {
    let mut pos = start;
    while pos < end {
        let slot = pos % BLOCK_SIZE_TOKENS;
        let n = (BLOCK_SIZE_TOKENS - slot).min(end - pos);
        f(table[pos / BLOCK_SIZE_TOKENS], slot, pos - start, n);
        pos += n;
    }
}

impl LatentStore for CpuLatentStore {
    fn shape(&self) -> LatentShape {
        self.shape
    }

    fn write_rows(
        &mut self,
        table: &[BlockId],
        layer: usize,
        start_pos: usize,
        c_kv: &[f32],
        k_rope: &[f32],
    ) -> Result<(), StoreError> {
        let (rank, rope) = (self.shape.kv_lora_rank, self.shape.rope_dim);
        // `rank` is positive: `new` rejects zero-width shapes.
        if !c_kv.len().is_multiple_of(rank) {
            return Err(StoreError::NotWholeRows {
                field: "c_kv",
                row_width: rank,
                got: c_kv.len(),
            });
        }
        let n = c_kv.len() / rank;
        check_width("k_rope", k_rope.len(), n * rope)?;
        self.check_range(table, layer, start_pos + n)?;
        let blocks = &mut self.blocks;
        for_each_run(table, start_pos, start_pos + n, |block, slot, off, len| {
            let chunk = &mut blocks[block.index()];
            let row0 = layer * BLOCK_SIZE_TOKENS + slot;
            chunk.c_kv[row0 * rank..(row0 + len) * rank]
                .copy_from_slice(&c_kv[off * rank..(off + len) * rank]);
            chunk.k_rope[row0 * rope..(row0 + len) * rope]
                .copy_from_slice(&k_rope[off * rope..(off + len) * rope]);
        });
        Ok(())
    }

    fn gather_into(
        &self,
        table: &[BlockId],
        layer: usize,
        len: usize,
        out: &mut LatentRows,
    ) -> Result<(), StoreError> {
        self.check_range(table, layer, len)?;
        let (rank, rope) = (self.shape.kv_lora_rank, self.shape.rope_dim);
        out.len = len;
        out.c_kv.clear();
        out.k_rope.clear();
        out.c_kv.reserve(len * rank);
        out.k_rope.reserve(len * rope);
        for_each_run(table, 0, len, |block, slot, _, n| {
            let chunk = &self.blocks[block.index()];
            let row0 = layer * BLOCK_SIZE_TOKENS + slot;
            out.c_kv
                .extend_from_slice(&chunk.c_kv[row0 * rank..(row0 + n) * rank]);
            out.k_rope
                .extend_from_slice(&chunk.k_rope[row0 * rope..(row0 + n) * rope]);
        });
        Ok(())
    }

    fn gather_into_slices(
        &self,
        table: &[BlockId],
        layer: usize,
        c_kv: &mut [f32],
        k_rope: &mut [f32],
    ) -> Result<(), StoreError> {
        let (rank, rope) = (self.shape.kv_lora_rank, self.shape.rope_dim);
        let len = whole_rows(c_kv.len(), rank)?;
        check_width("k_rope", k_rope.len(), len * rope)?;
        self.check_range(table, layer, len)?;
        for_each_run(table, 0, len, |block, slot, off, n| {
            let chunk = &self.blocks[block.index()];
            let row0 = layer * BLOCK_SIZE_TOKENS + slot;
            c_kv[off * rank..(off + n) * rank]
                .copy_from_slice(&chunk.c_kv[row0 * rank..(row0 + n) * rank]);
            k_rope[off * rope..(off + n) * rope]
                .copy_from_slice(&chunk.k_rope[row0 * rope..(row0 + n) * rope]);
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block_pool::BlockPool;
    use crate::sequence::RequestId;

    const SHAPE: LatentShape = LatentShape {
        num_layers: 2,
        kv_lora_rank: 4,
        rope_dim: 2,
    };

    fn row(pos: usize, layer: usize, width: usize, tag: f32) -> Vec<f32> {
        (0..width)
            .map(|d| tag + (layer * 100_000 + pos * 10 + d) as f32)
            .collect()
    }

    #[test]
    fn gather_returns_written_rows_in_position_order_across_blocks() {
        let mut pool = BlockPool::new(8);
        let mut store = CpuLatentStore::new(SHAPE, 8).unwrap();
        // Interleave two sequences so their blocks are not contiguous.
        let (a, b) = (RequestId(1), RequestId(2));
        for len in [64, 128, 150] {
            pool.reserve(a, len).unwrap();
            pool.reserve(b, len).unwrap();
        }
        assert_ne!(pool.table(a)[1].index(), pool.table(a)[0].index() + 1);
        for layer in 0..2 {
            for pos in 0..150 {
                for (seq, tag) in [(a, 0.0), (b, 0.5)] {
                    store
                        .write(
                            pool.table(seq),
                            layer,
                            pos,
                            &row(pos, layer, 4, tag),
                            &row(pos, layer, 2, tag),
                        )
                        .unwrap();
                }
            }
        }
        let rows = store.gather(pool.table(a), 1, 150).unwrap();
        assert_eq!(rows.len, 150);
        let want_c: Vec<f32> = (0..150).flat_map(|p| row(p, 1, 4, 0.0)).collect();
        let want_r: Vec<f32> = (0..150).flat_map(|p| row(p, 1, 2, 0.0)).collect();
        assert_eq!(rows.c_kv, want_c);
        assert_eq!(rows.k_rope, want_r);
        // Straight into the caller's buffers: the same rows, also for a prefix.
        for len in [150, 70, 0] {
            let (mut c, mut r) = (vec![0.0; len * 4], vec![0.0; len * 2]);
            store
                .gather_into_slices(pool.table(a), 1, &mut c, &mut r)
                .unwrap();
            assert_eq!(c, want_c[..len * 4]);
            assert_eq!(r, want_r[..len * 2]);
        }
        let (mut c, mut r) = (vec![0.0; 8], vec![0.0; 2]);
        assert!(matches!(
            store.gather_into_slices(pool.table(a), 1, &mut c, &mut r),
            Err(StoreError::RowWidth { .. })
        ));
        let (mut c, mut r) = (vec![0.0; 6], vec![0.0; 3]);
        assert!(matches!(
            store.gather_into_slices(pool.table(a), 1, &mut c, &mut r),
            Err(StoreError::NotWholeRows { .. })
        ));
    }

    #[test]
    fn bulk_write_equals_row_by_row_write() {
        let mut pool = BlockPool::new(4);
        pool.reserve(RequestId(1), 200).unwrap();
        let table = pool.table(RequestId(1)).to_vec();
        let mut bulk = CpuLatentStore::new(SHAPE, 4).unwrap();
        let mut single = CpuLatentStore::new(SHAPE, 4).unwrap();
        let c: Vec<f32> = (10..140).flat_map(|p| row(p, 0, 4, 0.0)).collect();
        let r: Vec<f32> = (10..140).flat_map(|p| row(p, 0, 2, 0.0)).collect();
        bulk.write_rows(&table, 0, 10, &c, &r).unwrap();
        for (i, p) in (10..140).enumerate() {
            single
                .write(&table, 0, p, &c[i * 4..i * 4 + 4], &r[i * 2..i * 2 + 2])
                .unwrap();
        }
        assert_eq!(
            bulk.gather(&table, 0, 140).unwrap(),
            single.gather(&table, 0, 140).unwrap()
        );
    }

    #[test]
    fn out_of_range_accesses_are_errors_naming_the_field() {
        let mut pool = BlockPool::new(2);
        pool.reserve(RequestId(1), 64).unwrap();
        let table = pool.table(RequestId(1)).to_vec();
        let mut store = CpuLatentStore::new(SHAPE, 2).unwrap();
        assert_eq!(
            store.write(&table, 2, 0, &[0.0; 4], &[0.0; 2]),
            Err(StoreError::Layer {
                layer: 2,
                num_layers: 2
            })
        );
        assert_eq!(
            store.write(&table, 0, 64, &[0.0; 4], &[0.0; 2]),
            Err(StoreError::Position {
                pos: 64,
                capacity_tokens: 64
            })
        );
        assert!(matches!(
            store.write(&table, 0, 0, &[0.0; 3], &[0.0; 2]),
            Err(StoreError::RowWidth { field: "c_kv", .. })
        ));
        assert!(matches!(
            store.write_rows(&table, 0, 0, &[0.0; 8], &[0.0; 2]),
            Err(StoreError::RowWidth {
                field: "k_rope",
                expected: 4,
                got: 2
            })
        ));
        assert!(matches!(
            store.write_rows(&table, 0, 0, &[0.0; 6], &[0.0; 2]),
            Err(StoreError::NotWholeRows {
                field: "c_kv",
                row_width: 4,
                got: 6
            })
        ));
        assert_eq!(
            CpuLatentStore::new(
                LatentShape {
                    rope_dim: 0,
                    ..SHAPE
                },
                1
            )
            .unwrap_err(),
            StoreError::Shape { field: "rope_dim" }
        );
        let small = CpuLatentStore::new(SHAPE, 0).unwrap();
        assert!(matches!(
            small.gather(&table, 0, 1),
            Err(StoreError::Block { num_blocks: 0, .. })
        ));
    }

    #[test]
    fn size_is_deepseek_v3_latent_bytes_per_token_in_f32() {
        // DeepSeek-V3: (512 + 64) floats x 61 layers; 70,272 B per token in BF16, twice that in f32.
        let shape = LatentShape {
            num_layers: 61,
            kv_lora_rank: 512,
            rope_dim: 64,
        };
        let store = CpuLatentStore::new(shape, 1).unwrap();
        assert_eq!(store.size_bytes(), 64 * 70_272 * 2);
    }
}
