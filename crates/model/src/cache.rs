//! The MLA latent cache, owned by the caller.
//!
//! MLA caches only the compressed latent of each token: `c_kv` (`kv_lora_rank` values, after
//! `kv_a_layernorm`) and `k_rope` (`qk_rope_head_dim` values, rotated, in the halves layout of
//! [`crate::rope`]). Full keys and values are never cached. The model reads and appends through
//! [`LatentCache`], keyed by (sequence, layer); layer `num_hidden_layers` is the MTP layer's slot.
//!
//! The forward moves host `f32` rows through [`LatentCache::append_rows`] and
//! [`LatentCache::read_into`]: the cache lives in host memory (pdserve computes on the CPU), a paged
//! implementation copies block by block into the caller's buffer, and the forward gathers every
//! sequence of a decode batch straight into one padded buffer — per-sequence tensor operations
//! would cost more than the copies (a few µs each, × sequences × layers per step). Those two
//! methods have default implementations over the tensor methods [`LatentCache::append`] and
//! [`LatentCache::read`], so an implementation only needs the latter; overriding the row methods
//! removes the tensor round trips.
//!
//! Contract the forward relies on: before a forward, `(seq, layer)` holds the entries of the
//! sequence's earlier tokens; the forward appends one entry per new token to every layer it runs,
//! and new token `i` attends to entries `0..=len_before + i`. Rolling back rejected speculative
//! tokens is the owner's business (e.g. [`ContiguousLatentCache::truncate`]).

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use crate::error::{ModelError, Result};

/// Identifies a sequence in the caller's cache.
pub type SeqId = u64;

/// Storage of the latent KV, implemented by the caller (contiguous here, paged in the engine).
pub trait LatentCache {
    /// Entries held for `(seq, layer)` (0 for an unknown sequence).
    fn len(&self, seq: SeqId, layer: usize) -> usize;

    /// Appends `c_kv` `[n, kv_lora_rank]` and `k_rope` `[n, qk_rope_head_dim]` (f32) after the
    /// existing entries of `(seq, layer)`.
    fn append(&mut self, seq: SeqId, layer: usize, c_kv: &Tensor, k_rope: &Tensor) -> Result<()>;

    /// Every entry of `(seq, layer)`: `c_kv` `[len, kv_lora_rank]`, `k_rope` `[len, qk_rope_head_dim]`.
    fn read(&self, seq: SeqId, layer: usize) -> Result<(Tensor, Tensor)>;

    /// [`append`](Self::append) of `n` rows given as host slices (`n × kv_lora_rank` and
    /// `n × qk_rope_head_dim` values, row-major). The forward calls this one.
    fn append_rows(
        &mut self,
        seq: SeqId,
        layer: usize,
        n: usize,
        c_kv: &[f32],
        k_rope: &[f32],
    ) -> Result<()> {
        if n == 0 || !c_kv.len().is_multiple_of(n) || !k_rope.len().is_multiple_of(n) {
            return Err(ModelError::Cache(format!(
                "append of {n} rows from {} c_kv and {} k_rope values",
                c_kv.len(),
                k_rope.len()
            )));
        }
        let dev = Device::Cpu;
        let c = Tensor::from_slice(c_kv, (n, c_kv.len() / n), &dev)?;
        let k = Tensor::from_slice(k_rope, (n, k_rope.len() / n), &dev)?;
        self.append(seq, layer, &c, &k)
    }

    /// Copies every entry of `(seq, layer)` in position order into `c_kv`
    /// (`len × kv_lora_rank`) and `k_rope` (`len × qk_rope_head_dim`), which have exactly that
    /// size. The forward calls this one.
    fn read_into(
        &self,
        seq: SeqId,
        layer: usize,
        c_kv: &mut [f32],
        k_rope: &mut [f32],
    ) -> Result<()> {
        let (c, k) = self.read(seq, layer)?;
        let (c, k): (Vec<f32>, Vec<f32>) =
            (c.flatten_all()?.to_vec1()?, k.flatten_all()?.to_vec1()?);
        if c.len() != c_kv.len() || k.len() != k_rope.len() {
            return Err(ModelError::Cache(format!(
                "read of sequence {seq} layer {layer} into buffers of {} and {} values; it holds {} and {}",
                c_kv.len(),
                k_rope.len(),
                c.len(),
                k.len()
            )));
        }
        c_kv.copy_from_slice(&c);
        k_rope.copy_from_slice(&k);
        Ok(())
    }
}

#[derive(Debug, Default, Clone)]
struct Slot {
    c_kv: Vec<f32>,
    k_rope: Vec<f32>,
}

/// A simple [`LatentCache`]: one growable pair of host row buffers per (sequence, layer);
/// [`read`](LatentCache::read) returns tensors on the device given at construction.
#[derive(Debug, Clone)]
pub struct ContiguousLatentCache {
    kv_lora_rank: usize,
    rope_dim: usize,
    device: Device,
    slots: HashMap<(SeqId, usize), Slot>,
}

impl ContiguousLatentCache {
    /// An empty cache for latents of `kv_lora_rank` and `rope_dim` values; tensors read from it
    /// live on `device`.
    pub fn new(kv_lora_rank: usize, rope_dim: usize, device: &Device) -> Self {
        Self {
            kv_lora_rank,
            rope_dim,
            device: device.clone(),
            slots: HashMap::new(),
        }
    }

    /// Keeps the first `len` entries of every layer of `seq` (rolls back speculative tokens).
    pub fn truncate(&mut self, seq: SeqId, len: usize) {
        for ((s, _), slot) in self.slots.iter_mut() {
            if *s == seq {
                slot.c_kv.truncate(len * self.kv_lora_rank);
                slot.k_rope.truncate(len * self.rope_dim);
            }
        }
    }

    /// Forgets `seq`.
    pub fn remove(&mut self, seq: SeqId) {
        self.slots.retain(|(s, _), _| *s != seq);
    }

    /// Sequences held.
    pub fn sequences(&self) -> Vec<SeqId> {
        let mut seqs: Vec<SeqId> = self.slots.keys().map(|(s, _)| *s).collect();
        seqs.sort_unstable();
        seqs.dedup();
        seqs
    }

    /// Bytes of f32 latent held.
    pub fn bytes(&self) -> usize {
        self.slots
            .values()
            .map(|s| (s.c_kv.len() + s.k_rope.len()) * 4)
            .sum()
    }
}

impl LatentCache for ContiguousLatentCache {
    fn len(&self, seq: SeqId, layer: usize) -> usize {
        self.slots
            .get(&(seq, layer))
            .map_or(0, |s| s.c_kv.len() / self.kv_lora_rank)
    }

    fn append(&mut self, seq: SeqId, layer: usize, c_kv: &Tensor, k_rope: &Tensor) -> Result<()> {
        let n = c_kv.dim(0)?;
        let c: Vec<f32> = c_kv.flatten_all()?.to_vec1()?;
        let k: Vec<f32> = k_rope.flatten_all()?.to_vec1()?;
        self.append_rows(seq, layer, n, &c, &k)
    }

    fn read(&self, seq: SeqId, layer: usize) -> Result<(Tensor, Tensor)> {
        let len = self.len(seq, layer);
        let mut c = vec![0f32; len * self.kv_lora_rank];
        let mut k = vec![0f32; len * self.rope_dim];
        self.read_into(seq, layer, &mut c, &mut k)?;
        Ok((
            Tensor::from_vec(c, (len, self.kv_lora_rank), &self.device)?,
            Tensor::from_vec(k, (len, self.rope_dim), &self.device)?,
        ))
    }

    fn append_rows(
        &mut self,
        seq: SeqId,
        layer: usize,
        n: usize,
        c_kv: &[f32],
        k_rope: &[f32],
    ) -> Result<()> {
        if c_kv.len() != n * self.kv_lora_rank || k_rope.len() != n * self.rope_dim {
            return Err(ModelError::Cache(format!(
                "append of {n} rows as {} c_kv and {} k_rope values to a cache of widths {} and {}",
                c_kv.len(),
                k_rope.len(),
                self.kv_lora_rank,
                self.rope_dim
            )));
        }
        let slot = self.slots.entry((seq, layer)).or_default();
        slot.c_kv.extend_from_slice(c_kv);
        slot.k_rope.extend_from_slice(k_rope);
        Ok(())
    }

    fn read_into(
        &self,
        seq: SeqId,
        layer: usize,
        c_kv: &mut [f32],
        k_rope: &mut [f32],
    ) -> Result<()> {
        let empty = Slot::default();
        let slot = self.slots.get(&(seq, layer)).unwrap_or(&empty);
        if c_kv.len() != slot.c_kv.len() || k_rope.len() != slot.k_rope.len() {
            return Err(ModelError::Cache(format!(
                "read of sequence {seq} layer {layer} into buffers of {} and {} values; it holds {} and {}",
                c_kv.len(),
                k_rope.len(),
                slot.c_kv.len(),
                slot.k_rope.len()
            )));
        }
        c_kv.copy_from_slice(&slot.c_kv);
        k_rope.copy_from_slice(&slot.k_rope);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache implementing only the required tensor methods (the row methods use defaults).
    struct TensorOnly(ContiguousLatentCache);

    impl LatentCache for TensorOnly {
        fn len(&self, seq: SeqId, layer: usize) -> usize {
            self.0.len(seq, layer)
        }
        fn append(&mut self, seq: SeqId, layer: usize, c: &Tensor, k: &Tensor) -> Result<()> {
            self.0.append(seq, layer, c, k)
        }
        fn read(&self, seq: SeqId, layer: usize) -> Result<(Tensor, Tensor)> {
            self.0.read(seq, layer)
        }
    }

    #[test]
    fn default_row_methods_agree_with_the_overridden_ones() {
        let mut a = ContiguousLatentCache::new(3, 2, &Device::Cpu);
        let mut b = TensorOnly(ContiguousLatentCache::new(3, 2, &Device::Cpu));
        let c: Vec<f32> = (0..9).map(|x| x as f32).collect();
        let k: Vec<f32> = (0..6).map(|x| -(x as f32)).collect();
        a.append_rows(1, 0, 3, &c, &k).unwrap();
        b.append_rows(1, 0, 3, &c, &k).unwrap();
        let (mut ca, mut ka, mut cb, mut kb) =
            (vec![0f32; 9], vec![0f32; 6], vec![0f32; 9], vec![0f32; 6]);
        a.read_into(1, 0, &mut ca, &mut ka).unwrap();
        b.read_into(1, 0, &mut cb, &mut kb).unwrap();
        assert_eq!((ca, ka), (cb.clone(), kb));
        assert_eq!(cb, c);
        let (t, _) = a.read(1, 0).unwrap();
        assert_eq!(t.dims(), &[3, 3]);
    }

    #[test]
    fn appends_accumulate_and_reads_return_every_entry_in_order() {
        let mut cache = ContiguousLatentCache::new(3, 2, &Device::Cpu);
        for step in 0..40u32 {
            let v = step as f32;
            cache.append_rows(7, 1, 1, &[v; 3], &[-v; 2]).unwrap();
        }
        assert_eq!(cache.len(7, 1), 40);
        assert_eq!(cache.len(7, 0), 0);
        let mut c = vec![0f32; 120];
        let mut k = vec![0f32; 80];
        cache.read_into(7, 1, &mut c, &mut k).unwrap();
        assert_eq!(
            c.chunks(3).map(|r| r[0]).collect::<Vec<_>>(),
            (0..40).map(|x| x as f32).collect::<Vec<_>>()
        );
        assert_eq!(k[79], -39.0);
        cache.truncate(7, 5);
        assert_eq!(cache.len(7, 1), 5);
        assert_eq!(cache.bytes(), 5 * 5 * 4);
    }

    #[test]
    fn appends_and_reads_of_the_wrong_size_are_refused() {
        let mut cache = ContiguousLatentCache::new(3, 2, &Device::Cpu);
        assert!(matches!(
            cache.append_rows(0, 0, 1, &[0.0; 4], &[0.0; 2]),
            Err(ModelError::Cache(_))
        ));
        cache.append_rows(0, 0, 1, &[0.0; 3], &[0.0; 2]).unwrap();
        let (mut c, mut k) = (vec![0f32; 6], vec![0f32; 4]);
        assert!(matches!(
            cache.read_into(0, 0, &mut c, &mut k),
            Err(ModelError::Cache(_))
        ));
    }
}
