//! The model's [`LatentCache`] over the engine's paged [`LatentStore`].
//!
//! The model appends each new token's latent rows after the entries a sequence already has and
//! reads every entry back for attention. Here a sequence's rows live in the blocks of its block
//! table (position `p` in block `table[p / 64]`, slot `p % 64`), and **the length of a sequence is
//! not the number of rows ever written**: it is set from the step plan before each forward (the
//! position of the first new token for every main layer; the first MTP position for the MTP
//! layer). A draft token rejected last step wrote a row at the position the next step computes
//! again; since the length follows the plan, that stale row is never read and is overwritten by the
//! next append.
//!
//! Invariants: only sequences registered for this forward are visible (others read as length 0 and
//! refuse appends); an append writes rows `len..len + n` and advances `len` by `n`; a read returns
//! rows `0..len`.
//!
//! The forward uses the row methods (`append_rows`, `read_into`): rows go from the caller's host
//! slices straight into the blocks and from the blocks straight into the caller's buffers, with no
//! tensor or intermediate vector in between. `append` / `read` (tensors) delegate to them.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use pdserve_model::{LatentCache, ModelError, SeqId};

use crate::block_pool::BlockId;
use crate::latent_store::{LatentStore, StoreError};

/// One sequence's view: its block table and its length per layer.
#[derive(Debug)]
struct View<'a> {
    table: &'a [BlockId],
    lens: Vec<usize>,
}

/// A [`LatentCache`] over a [`LatentStore`] for the sequences of one forward.
#[derive(Debug)]
pub(crate) struct PagedCache<'a, S: LatentStore> {
    store: &'a mut S,
    views: HashMap<SeqId, View<'a>>,
    device: Device,
}

fn cache_err(seq: SeqId, e: StoreError) -> ModelError {
    ModelError::Cache(format!("sequence {seq}: {e}"))
}

impl<'a, S: LatentStore> PagedCache<'a, S> {
    pub(crate) fn new(store: &'a mut S, device: &Device) -> Self {
        Self {
            store,
            views: HashMap::new(),
            device: device.clone(),
        }
    }

    /// Makes `seq` visible with `table`, every layer in `layers` holding `len` entries.
    pub(crate) fn register(
        &mut self,
        seq: SeqId,
        table: &'a [BlockId],
        layers: std::ops::Range<usize>,
        len: usize,
    ) {
        let num_layers = self.store.shape().num_layers;
        let view = self.views.entry(seq).or_insert_with(|| View {
            table,
            lens: vec![0; num_layers],
        });
        view.table = table;
        for layer in layers {
            if let Some(l) = view.lens.get_mut(layer) {
                *l = len;
            }
        }
    }
}

impl<S: LatentStore> PagedCache<'_, S> {
    fn view(&self, seq: SeqId) -> pdserve_model::Result<&View<'_>> {
        self.views
            .get(&seq)
            .ok_or_else(|| ModelError::Cache(format!("sequence {seq} is not part of this step")))
    }
}

impl<S: LatentStore> LatentCache for PagedCache<'_, S> {
    fn len(&self, seq: SeqId, layer: usize) -> usize {
        self.views
            .get(&seq)
            .and_then(|v| v.lens.get(layer))
            .copied()
            .unwrap_or(0)
    }

    fn append(
        &mut self,
        seq: SeqId,
        layer: usize,
        c_kv: &Tensor,
        k_rope: &Tensor,
    ) -> pdserve_model::Result<()> {
        let c: Vec<f32> = c_kv.flatten_all()?.to_vec1()?;
        let k: Vec<f32> = k_rope.flatten_all()?.to_vec1()?;
        self.append_rows(seq, layer, c_kv.dim(0)?, &c, &k)
    }

    fn read(&self, seq: SeqId, layer: usize) -> pdserve_model::Result<(Tensor, Tensor)> {
        let len = self.view(seq)?.lens.get(layer).copied().unwrap_or(0);
        let shape = self.store.shape();
        let mut c = vec![0.0; len * shape.kv_lora_rank];
        let mut k = vec![0.0; len * shape.rope_dim];
        self.read_into(seq, layer, &mut c, &mut k)?;
        let c = Tensor::from_vec(c, (len, shape.kv_lora_rank), &self.device)?;
        let k = Tensor::from_vec(k, (len, shape.rope_dim), &self.device)?;
        Ok((c, k))
    }

    fn append_rows(
        &mut self,
        seq: SeqId,
        layer: usize,
        n: usize,
        c_kv: &[f32],
        k_rope: &[f32],
    ) -> pdserve_model::Result<()> {
        let shape = self.store.shape();
        if c_kv.len() != n * shape.kv_lora_rank || k_rope.len() != n * shape.rope_dim {
            return Err(ModelError::Cache(format!(
                "sequence {seq}: append of {n} rows from {} c_kv and {} k_rope values (widths {} \
                 and {})",
                c_kv.len(),
                k_rope.len(),
                shape.kv_lora_rank,
                shape.rope_dim
            )));
        }
        let view = self
            .views
            .get_mut(&seq)
            .ok_or_else(|| ModelError::Cache(format!("sequence {seq} is not part of this step")))?;
        let start = *view.lens.get(layer).ok_or_else(|| {
            ModelError::Cache(format!(
                "sequence {seq}: layer {layer} is not cached (store has {} layers)",
                view.lens.len()
            ))
        })?;
        self.store
            .write_rows(view.table, layer, start, c_kv, k_rope)
            .map_err(|e| cache_err(seq, e))?;
        view.lens[layer] = start + n;
        Ok(())
    }

    fn read_into(
        &self,
        seq: SeqId,
        layer: usize,
        c_kv: &mut [f32],
        k_rope: &mut [f32],
    ) -> pdserve_model::Result<()> {
        let view = self.view(seq)?;
        let len = view.lens.get(layer).copied().unwrap_or(0);
        let shape = self.store.shape();
        if c_kv.len() != len * shape.kv_lora_rank || k_rope.len() != len * shape.rope_dim {
            return Err(ModelError::Cache(format!(
                "read of sequence {seq} layer {layer} into buffers of {} and {} values; it holds \
                 {len} rows of widths {} and {}",
                c_kv.len(),
                k_rope.len(),
                shape.kv_lora_rank,
                shape.rope_dim
            )));
        }
        self.store
            .gather_into_slices(view.table, layer, c_kv, k_rope)
            .map_err(|e| cache_err(seq, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block_pool::BlockPool;
    use crate::latent_store::{CpuLatentStore, LatentShape};
    use crate::sequence::RequestId;

    const SHAPE: LatentShape = LatentShape {
        num_layers: 2,
        kv_lora_rank: 3,
        rope_dim: 2,
    };

    fn rows(values: &[f32], width: usize) -> Tensor {
        let n = values.len();
        let data: Vec<f32> = values
            .iter()
            .flat_map(|&v| std::iter::repeat_n(v, width))
            .collect();
        Tensor::from_vec(data, (n, width), &Device::Cpu).unwrap()
    }

    #[test]
    fn length_follows_the_plan_so_a_rejected_draft_row_is_overwritten() {
        let mut pool = BlockPool::new(4);
        pool.reserve(RequestId(1), 70).unwrap();
        let table = pool.table(RequestId(1)).to_vec();
        let mut store = CpuLatentStore::new(SHAPE, 4).unwrap();
        {
            // Step 1: input at position 63 plus a draft at 64 (crossing a block boundary).
            let mut cache = PagedCache::new(&mut store, &Device::Cpu);
            cache.register(1, &table, 0..2, 63);
            cache
                .append(1, 0, &rows(&[63.0, 640.0], 3), &rows(&[63.0, 640.0], 2))
                .unwrap();
            assert_eq!(cache.len(1, 0), 65);
            assert_eq!(cache.len(1, 1), 63);
        }
        {
            // The draft was rejected: step 2 computes position 64 again.
            let mut cache = PagedCache::new(&mut store, &Device::Cpu);
            cache.register(1, &table, 0..2, 64);
            assert_eq!(cache.len(1, 0), 64);
            let (c, _) = cache.read(1, 0).unwrap();
            assert_eq!(c.dims(), &[64, 3]);
            cache
                .append(1, 0, &rows(&[64.0], 3), &rows(&[64.0], 2))
                .unwrap();
            let (c, k) = cache.read(1, 0).unwrap();
            let c: Vec<Vec<f32>> = c.to_vec2().unwrap();
            assert_eq!(c[63], vec![63.0; 3]);
            assert_eq!(c[64], vec![64.0; 3]);
            assert_eq!(k.dims(), &[65, 2]);
        }
    }

    #[test]
    fn unknown_sequences_and_layers_are_refused() {
        let mut pool = BlockPool::new(1);
        pool.reserve(RequestId(9), 1).unwrap();
        let table = pool.table(RequestId(9)).to_vec();
        let mut store = CpuLatentStore::new(SHAPE, 1).unwrap();
        let mut cache = PagedCache::new(&mut store, &Device::Cpu);
        assert_eq!(cache.len(9, 0), 0);
        assert!(
            cache
                .append(9, 0, &rows(&[1.0], 3), &rows(&[1.0], 2))
                .is_err()
        );
        cache.register(9, &table, 0..2, 0);
        assert!(
            cache
                .append(9, 5, &rows(&[1.0], 3), &rows(&[1.0], 2))
                .is_err()
        );
        // Past the table's one block.
        cache.register(9, &table, 0..1, 64);
        assert!(matches!(
            cache.append(9, 0, &rows(&[1.0], 3), &rows(&[1.0], 2)),
            Err(ModelError::Cache(_))
        ));
    }

    #[test]
    fn row_methods_equal_the_tensor_methods() {
        let mut pool = BlockPool::new(4);
        pool.reserve(RequestId(3), 130).unwrap();
        let table = pool.table(RequestId(3)).to_vec();
        let mut store = CpuLatentStore::new(SHAPE, 4).unwrap();
        let mut cache = PagedCache::new(&mut store, &Device::Cpu);
        cache.register(3, &table, 0..2, 0);
        let c: Vec<f32> = (0..130 * 3).map(|i| i as f32).collect();
        let k: Vec<f32> = (0..130 * 2).map(|i| -(i as f32)).collect();
        cache.append_rows(3, 1, 130, &c, &k).unwrap();
        assert_eq!(cache.len(3, 1), 130);
        let (mut c_out, mut k_out) = (vec![0.0; 130 * 3], vec![0.0; 130 * 2]);
        cache.read_into(3, 1, &mut c_out, &mut k_out).unwrap();
        assert_eq!((&c_out, &k_out), (&c, &k));
        let (ct, kt) = cache.read(3, 1).unwrap();
        assert_eq!(ct.flatten_all().unwrap().to_vec1::<f32>().unwrap(), c);
        assert_eq!(kt.flatten_all().unwrap().to_vec1::<f32>().unwrap(), k);
        // Wrong sizes are errors, never panics.
        assert!(cache.append_rows(3, 1, 2, &c[..5], &k[..4]).is_err());
        let (mut short, mut k_out) = (vec![0.0; 3], vec![0.0; 2]);
        assert!(cache.read_into(3, 1, &mut short, &mut k_out).is_err());
        assert!(cache.read_into(4, 1, &mut [], &mut []).is_err());
    }
}
