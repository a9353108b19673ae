//! Writing safetensors checkpoints: f32, bf16, and DeepSeek's block-scaled FP8.
//!
//! [`SafetensorsWriter`] collects named tensors and writes one `model.safetensors` (or one shard).
//! It backs `pdserve model init`, the tests that build bf16/FP8/corrupt checkpoints, and tools
//! that convert checkpoints. FP8 weights are stored as `F8_E4M3` with a `<name>_scale_inv` f32
//! companion holding one scale per block (`w ≈ fp8 × scale_inv`), as DeepSeek releases them.

use std::borrow::Cow;
use std::path::Path;

use safetensors::tensor::{Dtype, View};

use crate::checkpoint::f32_to_fp8_e4m3;
use crate::error::{ModelError, Result};

/// Largest magnitude of FP8 e4m3.
const FP8_MAX: f32 = 448.0;

#[derive(Debug)]
struct Stored {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &Stored {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Named tensors to be written as one safetensors file.
#[derive(Debug, Default)]
pub struct SafetensorsWriter {
    tensors: Vec<(String, Stored)>,
}

fn check_len(name: &str, shape: &[usize], len: usize) -> Result<()> {
    let numel: usize = shape.iter().product();
    if numel != len {
        return Err(ModelError::Input(format!(
            "tensor `{name}`: {len} values for shape {shape:?}"
        )));
    }
    Ok(())
}

impl SafetensorsWriter {
    /// An empty writer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `data` (row-major, `shape`) stored as f32.
    pub fn add_f32(&mut self, name: &str, shape: &[usize], data: &[f32]) -> Result<()> {
        check_len(name, shape, data.len())?;
        let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.push(name, Dtype::F32, shape, bytes);
        Ok(())
    }

    /// Adds `data` stored as bfloat16 (round to nearest even).
    pub fn add_bf16(&mut self, name: &str, shape: &[usize], data: &[f32]) -> Result<()> {
        check_len(name, shape, data.len())?;
        let bytes = data
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect();
        self.push(name, Dtype::BF16, shape, bytes);
        Ok(())
    }

    /// Adds a `[rows, cols]` matrix as FP8 e4m3 with `<name>_scale_inv` block scales
    /// (`block = [block_rows, block_cols]`): each block's scale maps its largest magnitude to 448.
    pub fn add_fp8_blocks(
        &mut self,
        name: &str,
        rows: usize,
        cols: usize,
        data: &[f32],
        block: [usize; 2],
    ) -> Result<()> {
        check_len(name, &[rows, cols], data.len())?;
        let [br, bc] = block;
        if br == 0 || bc == 0 {
            return Err(ModelError::Input(format!(
                "tensor `{name}`: empty FP8 block {block:?}"
            )));
        }
        let (sr, sc) = (rows.div_ceil(br), cols.div_ceil(bc));
        let mut scales = vec![1f32; sr * sc];
        for bi in 0..sr {
            for bj in 0..sc {
                let mut amax = 0f32;
                for r in bi * br..((bi + 1) * br).min(rows) {
                    for c in bj * bc..((bj + 1) * bc).min(cols) {
                        amax = amax.max(data[r * cols + c].abs());
                    }
                }
                scales[bi * sc + bj] = if amax > 0.0 { amax / FP8_MAX } else { 1.0 };
            }
        }
        let bytes = (0..rows * cols)
            .map(|i| {
                let (r, c) = (i / cols, i % cols);
                f32_to_fp8_e4m3(data[i] / scales[(r / br) * sc + c / bc])
            })
            .collect();
        self.push(name, Dtype::F8_E4M3, &[rows, cols], bytes);
        self.add_f32(&format!("{name}_scale_inv"), &[sr, sc], &scales)
    }

    /// Adds raw bytes of any dtype (for tests of the loader's checks).
    pub fn add_raw(&mut self, name: &str, dtype: Dtype, shape: &[usize], bytes: Vec<u8>) {
        self.push(name, dtype, shape, bytes);
    }

    fn push(&mut self, name: &str, dtype: Dtype, shape: &[usize], bytes: Vec<u8>) {
        self.tensors.retain(|(n, _)| n != name);
        self.tensors.push((
            name.to_string(),
            Stored {
                dtype,
                shape: shape.to_vec(),
                bytes,
            },
        ));
    }

    /// Names added so far.
    pub fn names(&self) -> Vec<&str> {
        self.tensors.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// Writes the file.
    pub fn write(&self, path: &Path) -> Result<()> {
        let views = self.tensors.iter().map(|(n, s)| (n.as_str(), s));
        safetensors::tensor::serialize_to_file(views, None, path).map_err(|e| {
            ModelError::io(
                path,
                std::io::Error::other(format!("writing safetensors: {e}")),
            )
        })
    }
}
