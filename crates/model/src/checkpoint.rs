//! Reading a Hugging Face checkpoint directory: `config.json` plus `*.safetensors`.
//!
//! [`Checkpoint::open`] reads `config.json` and the header of every safetensors file — one
//! `model.safetensors`, or the shards listed by `model.safetensors.index.json` — and builds a
//! name → location map. [`Checkpoint::load_f32`] then reads one tensor by the checkpoint's own
//! name, checks its shape against the shape the config implies, and converts it to f32:
//!
//! - `F32`, `F16`, `BF16`: converted element-wise;
//! - `F8_E4M3` (DeepSeek's FP8 release): dequantized with the `<name>_scale_inv` companion,
//!   one f32 scale per `weight_block_size` block (128×128): `w = fp8(w) × scale_inv[r/128, c/128]`.
//!
//! Invariants: headers are validated at open (offsets inside the file, byte sizes matching
//! dtype × shape), so a corrupt or truncated file is reported with its path before any tensor is
//! read; every error names the file and the tensor. Tensor data is read on demand with a seek and
//! one read, so memory holds only the converted f32 tensors.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::Deserialize;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

/// Name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the shard index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Largest safetensors header accepted (guards against garbage lengths).
const MAX_HEADER_BYTES: u64 = 256 << 20;

/// Storage dtypes the loader understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredDtype {
    /// IEEE f32.
    F32,
    /// IEEE f16.
    F16,
    /// bfloat16.
    Bf16,
    /// FP8 e4m3 (finite, NaN = `S.1111.111`), block-scaled by a `_scale_inv` companion.
    F8E4M3,
    /// Any other dtype (name as stored): readable in the header, rejected at load.
    Other,
}

impl StoredDtype {
    fn parse(s: &str) -> (Self, Option<usize>) {
        match s {
            "F32" => (Self::F32, Some(4)),
            "F16" => (Self::F16, Some(2)),
            "BF16" => (Self::Bf16, Some(2)),
            "F8_E4M3" => (Self::F8E4M3, Some(1)),
            "F64" | "I64" | "U64" => (Self::Other, Some(8)),
            "I32" | "U32" => (Self::Other, Some(4)),
            "I16" | "U16" => (Self::Other, Some(2)),
            "I8" | "U8" | "BOOL" | "F8_E5M2" => (Self::Other, Some(1)),
            _ => (Self::Other, None),
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    shard: usize,
    dtype: StoredDtype,
    dtype_name: String,
    shape: Vec<usize>,
    /// Absolute byte offset in the file.
    start: u64,
    len: u64,
}

#[derive(Debug, Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

#[derive(Debug, Deserialize)]
struct IndexFile {
    weight_map: BTreeMap<String, String>,
}

/// An opened checkpoint: its config and where each tensor lives.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    config: ModelConfig,
    shards: Vec<PathBuf>,
    entries: HashMap<String, Entry>,
}

impl Checkpoint {
    /// Opens `dir`: reads `config.json` and every safetensors header.
    pub fn open(dir: &Path) -> Result<Self> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        Self::open_with_config(dir, config)
    }

    /// Opens `dir` with an already-parsed config (the caller validated it).
    pub fn open_with_config(dir: &Path, config: ModelConfig) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        let single_path = dir.join(SINGLE_FILE);
        let mut shards = Vec::new();
        let mut entries = HashMap::new();
        if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
            let index: IndexFile =
                serde_json::from_str(&text).map_err(|source| ModelError::Json {
                    path: index_path.clone(),
                    source,
                })?;
            let mut files: Vec<&String> = index.weight_map.values().collect();
            files.sort();
            files.dedup();
            let mut shard_of: HashMap<&str, usize> = HashMap::new();
            for file in files {
                if file.contains("..") || Path::new(file).is_absolute() {
                    return Err(ModelError::CorruptFile {
                        path: index_path.clone(),
                        message: format!("shard name {file:?} leaves the checkpoint directory"),
                    });
                }
                let path = dir.join(file);
                let shard = shards.len();
                read_header(&path, shard, &mut entries)?;
                shards.push(path);
                shard_of.insert(file.as_str(), shard);
            }
            for (name, file) in &index.weight_map {
                let listed = shard_of.get(file.as_str()).copied();
                let found = entries.get(name).map(|e| e.shard);
                if found.is_none() || found != listed {
                    return Err(ModelError::CorruptFile {
                        path: index_path.clone(),
                        message: format!(
                            "tensor `{name}` is listed in {file} but that file does not hold it"
                        ),
                    });
                }
            }
        } else if single_path.exists() {
            read_header(&single_path, 0, &mut entries)?;
            shards.push(single_path);
        } else {
            return Err(ModelError::io(
                &single_path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no {SINGLE_FILE} and no {INDEX_FILE} in the checkpoint directory"),
                ),
            ));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            shards,
            entries,
        })
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The parsed `config.json`.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Whether the checkpoint holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The stored shape of `name`.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.entries.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                dir: self.dir.clone(),
                name: name.to_string(),
            })
    }

    /// Reads `name` as f32 data after checking its shape is `expected`.
    pub fn read_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let entry = self.entry(name)?;
        let path = &self.shards[entry.shard];
        if entry.shape != expected {
            return Err(ModelError::ShapeMismatch {
                path: path.clone(),
                name: name.to_string(),
                expected: expected.to_vec(),
                actual: entry.shape.clone(),
            });
        }
        let bytes = self.read_bytes(entry)?;
        match entry.dtype {
            StoredDtype::F32 => Ok(bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()),
            StoredDtype::F16 => Ok(bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect()),
            StoredDtype::Bf16 => Ok(bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect()),
            StoredDtype::F8E4M3 => self.dequantize_fp8(name, entry, &bytes),
            StoredDtype::Other => Err(ModelError::UnsupportedDtype {
                path: path.clone(),
                name: name.to_string(),
                dtype: entry.dtype_name.clone(),
            }),
        }
    }

    /// Reads `name` as an f32 tensor of shape `expected` on `device`.
    pub fn load_f32(&self, name: &str, expected: &[usize], device: &Device) -> Result<Tensor> {
        let data = self.read_f32(name, expected)?;
        Ok(Tensor::from_vec(data, expected, device)?)
    }

    fn read_bytes(&self, entry: &Entry) -> Result<Vec<u8>> {
        let path = &self.shards[entry.shard];
        let mut file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        file.seek(SeekFrom::Start(entry.start))
            .map_err(|e| ModelError::io(path, e))?;
        let len = usize::try_from(entry.len).map_err(|_| ModelError::CorruptFile {
            path: path.clone(),
            message: "tensor larger than the address space".into(),
        })?;
        let mut bytes = vec![0u8; len];
        file.read_exact(&mut bytes)
            .map_err(|e| ModelError::io(path, e))?;
        Ok(bytes)
    }

    fn dequantize_fp8(&self, name: &str, entry: &Entry, bytes: &[u8]) -> Result<Vec<f32>> {
        let path = &self.shards[entry.shard];
        let (rows, cols) = match entry.shape.as_slice() {
            [r, c] => (*r, *c),
            _ => {
                return Err(ModelError::UnsupportedDtype {
                    path: path.clone(),
                    name: name.to_string(),
                    dtype: format!(
                        "F8_E4M3 with rank {} (block scales need a matrix)",
                        entry.shape.len()
                    ),
                });
            }
        };
        let (block_rows, block_cols) = match &self.config.quantization_config {
            Some(q) => (q.weight_block_size[0], q.weight_block_size[1]),
            None => (128, 128),
        };
        let scale_name = format!("{name}_scale_inv");
        let scale_shape = [rows.div_ceil(block_rows), cols.div_ceil(block_cols)];
        let scales = self.read_f32(&scale_name, &scale_shape)?;
        let mut out = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            let scale_row = &scales[(r / block_rows) * scale_shape[1]..][..scale_shape[1]];
            for (c, &b) in bytes[r * cols..(r + 1) * cols].iter().enumerate() {
                out.push(fp8_e4m3_to_f32(b) * scale_row[c / block_cols]);
            }
        }
        Ok(out)
    }
}

/// Decodes one FP8 e4m3 (the "fn" variant: no infinities, NaN is `S.1111.111`) byte.
pub fn fp8_e4m3_to_f32(byte: u8) -> f32 {
    let sign = if byte & 0x80 != 0 { -1.0 } else { 1.0 };
    let exponent = i32::from((byte >> 3) & 0x0f);
    let mantissa = f32::from(byte & 0x07);
    if exponent == 0x0f && byte & 0x07 == 0x07 {
        return f32::NAN;
    }
    let magnitude = if exponent == 0 {
        mantissa / 8.0 * 2f32.powi(-6)
    } else {
        (1.0 + mantissa / 8.0) * 2f32.powi(exponent - 7)
    };
    sign * magnitude
}

/// Encodes an f32 as FP8 e4m3 (round to nearest even, saturating at ±448). Used to build FP8
/// checkpoints in tests and tools.
pub fn f32_to_fp8_e4m3(value: f32) -> u8 {
    if value.is_nan() {
        return 0x7f;
    }
    let sign = if value.is_sign_negative() { 0x80u8 } else { 0 };
    let a = value.abs().min(448.0);
    // Exhaustive nearest search over the 127 non-negative finite codes: exact and simple.
    let mut best = 0u8;
    let mut best_err = f32::INFINITY;
    for code in 0u8..0x7f {
        let v = fp8_e4m3_to_f32(code);
        let err = (v - a).abs();
        if err < best_err || (err == best_err && code % 2 == 0) {
            best = code;
            best_err = err;
        }
    }
    sign | best
}

fn read_header(path: &Path, shard: usize, entries: &mut HashMap<String, Entry>) -> Result<()> {
    let corrupt = |message: String| ModelError::CorruptFile {
        path: path.to_path_buf(),
        message,
    };
    let mut file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    let file_len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes)
        .map_err(|_| corrupt(format!("{file_len} bytes is too short for a header")))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES || 8 + header_len > file_len {
        return Err(corrupt(format!(
            "header length {header_len} does not fit in a file of {file_len} bytes"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .map_err(|e| ModelError::io(path, e))?;
    let parsed: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| corrupt(format!("header is not valid JSON: {e}")))?;
    let data_start = 8 + header_len;
    let data_len = file_len - data_start;
    for (name, value) in parsed {
        if name == "__metadata__" {
            continue;
        }
        let h: HeaderEntry = serde_json::from_value(value)
            .map_err(|e| corrupt(format!("tensor `{name}`: bad header entry: {e}")))?;
        let [start, end] = h.data_offsets;
        if start > end || end > data_len {
            return Err(corrupt(format!(
                "tensor `{name}`: data offsets [{start}, {end}) outside the {data_len} data bytes (truncated file?)"
            )));
        }
        let (dtype, elem_bytes) = StoredDtype::parse(&h.dtype);
        let numel: usize = h.shape.iter().product();
        if let Some(b) = elem_bytes
            && (numel as u64) * (b as u64) != end - start
        {
            return Err(corrupt(format!(
                "tensor `{name}`: {} bytes do not hold {:?} elements of {}",
                end - start,
                h.shape,
                h.dtype
            )));
        }
        if entries.contains_key(&name) {
            return Err(corrupt(format!(
                "tensor `{name}` appears in more than one file"
            )));
        }
        entries.insert(
            name,
            Entry {
                shard,
                dtype,
                dtype_name: h.dtype,
                shape: h.shape,
                start: data_start + start,
                len: end - start,
            },
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_decodes_known_values() {
        assert_eq!(fp8_e4m3_to_f32(0x00), 0.0);
        assert_eq!(fp8_e4m3_to_f32(0x38), 1.0);
        assert_eq!(fp8_e4m3_to_f32(0xb8), -1.0);
        assert_eq!(fp8_e4m3_to_f32(0x7e), 448.0);
        assert_eq!(fp8_e4m3_to_f32(0x01), 2f32.powi(-9));
        assert!(fp8_e4m3_to_f32(0x7f).is_nan());
    }

    #[test]
    fn fp8_encoding_round_trips_every_finite_code() {
        for code in 0u8..=0xff {
            if code & 0x7f == 0x7f {
                continue;
            }
            let v = fp8_e4m3_to_f32(code);
            let back = f32_to_fp8_e4m3(v);
            assert_eq!(fp8_e4m3_to_f32(back), v, "code {code:#x}");
        }
    }
}
