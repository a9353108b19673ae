//! Workloads: what each request asks for ([`RequestSpec`]), built from a [`DatasetSpec`].
//!
//! A [`Workload`] keeps only a compact plan per request (lengths, indices, hash ids) and
//! synthesizes the prompt text when a request is sent, so long duration-bounded runs do not hold
//! every prompt in memory.
//!
//! Invariants: `Workload::request(i)` is a pure function of `(seed, spec, i)`, independent of the
//! order requests are materialized in; prompts of distinct requests never share a prefix by
//! accident (each draws its own words), only where the dataset says so (the random dataset's
//! `--random-prefix-len`, the prefix dataset's shared prefixes, equal Mooncake hash ids).

mod files;

pub use files::{Conversation, MooncakeEntry, read_mooncake, read_sharegpt};

use crate::prompt::PromptSynth;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;

/// A dataset that cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// The file could not be read.
    #[error("cannot read dataset {path}: {source}")]
    Io {
        /// `--dataset-path`.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not in the expected format.
    #[error("invalid dataset {path}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Parse {
        /// `--dataset-path`.
        path: PathBuf,
        /// 1-based line for line-oriented formats.
        line: Option<usize>,
        /// The parser's message.
        message: String,
    },
    /// The file holds nothing usable.
    #[error("dataset {path} holds no usable {what}")]
    Empty {
        /// `--dataset-path`.
        path: PathBuf,
        /// What was looked for.
        what: &'static str,
    },
    /// A length parameter is out of range.
    #[error("invalid {field}: {message}")]
    Invalid {
        /// The flag at fault.
        field: &'static str,
        /// Why.
        message: String,
    },
}

/// Which workload to generate, with its parameters (flag names as in vLLM's `bench serve`).
#[derive(Debug, Clone, PartialEq)]
pub enum DatasetSpec {
    /// Random lengths uniform in `[⌊L(1−r)⌋, ⌈L(1+r)⌉]` around the means, after a shared prefix.
    Random {
        /// `--random-input-len`.
        input_len: usize,
        /// `--random-output-len`.
        output_len: usize,
        /// `--random-range-ratio`, in `[0, 1)`.
        range_ratio: f64,
        /// `--random-prefix-len`: tokens of one prefix shared by every request.
        prefix_len: usize,
    },
    /// A ShareGPT-format JSON file.
    ShareGpt {
        /// `--dataset-path`.
        path: PathBuf,
        /// `--sharegpt-output-len`: fixed output length instead of the reply's length.
        output_len: Option<usize>,
    },
    /// Synthetic shared prefixes: each request is one of `num_prefixes` prefixes plus its own
    /// suffix.
    Prefix {
        /// `--prefix-repetition-num-prefixes`.
        num_prefixes: usize,
        /// `--prefix-repetition-prefix-len`.
        prefix_len: usize,
        /// `--prefix-repetition-suffix-len`.
        suffix_len: usize,
        /// `--prefix-repetition-output-len`.
        output_len: usize,
    },
    /// A Mooncake JSONL trace replayed with synthesized prompts.
    Mooncake {
        /// `--dataset-path`.
        path: PathBuf,
        /// `--mooncake-block-size`: tokens per hash id (512 in the published traces).
        block_size: usize,
    },
}

impl DatasetSpec {
    /// The `--dataset-name` value.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Random { .. } => "random",
            Self::ShareGpt { .. } => "sharegpt",
            Self::Prefix { .. } => "prefix",
            Self::Mooncake { .. } => "mooncake",
        }
    }

    /// Whether outputs are meant to run to `max_tokens` (synthetic workloads), so `ignore_eos`
    /// is on unless the user turns it off.
    pub fn wants_fixed_output_len(&self) -> bool {
        !matches!(
            self,
            Self::ShareGpt {
                output_len: None,
                ..
            }
        )
    }
}

/// What one request asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestSpec {
    /// Prompt text (the user message for chat endpoints).
    pub prompt: String,
    /// Client-side prompt token count (exact with `--tokenizer`, else an estimate).
    pub prompt_tokens_estimate: u64,
    /// `max_tokens` to request.
    pub max_tokens: u64,
}

#[derive(Debug, Clone)]
struct ShareGptItem {
    prompt: String,
    prompt_tokens: u64,
    output_tokens: u64,
}

#[derive(Debug, Clone)]
enum Items {
    Random {
        lens: Vec<(u32, u32)>,
        prefix: String,
        prefix_len: usize,
    },
    ShareGpt {
        items: Vec<ShareGptItem>,
    },
    Prefix {
        prefixes: Vec<String>,
        choice: Vec<u32>,
        prefix_len: usize,
        suffix_len: usize,
        output_len: usize,
    },
    Mooncake {
        entries: Vec<MooncakeEntry>,
        block_size: usize,
    },
}

/// A built workload: `len()` requests, each materialized by [`Workload::request`].
#[derive(Debug, Clone)]
pub struct Workload {
    items: Items,
    count: usize,
    seed: u64,
    synth: PromptSynth,
}

/// SplitMix64 finalizer: decorrelates sub-seeds derived from `(seed, domain, i)`.
fn mix(seed: u64, domain: u64, i: u64) -> u64 {
    let mut z =
        seed ^ domain.wrapping_mul(0xA076_1D64_78BD_642F) ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const DOMAIN_LENGTHS: u64 = 1;
const DOMAIN_REQUEST: u64 = 2;
const DOMAIN_PREFIX: u64 = 3;
const DOMAIN_BLOCK: u64 = 4;
const DOMAIN_ORDER: u64 = 5;

fn rng(seed: u64, domain: u64, i: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(mix(seed, domain, i))
}

fn len_range(mean: usize, ratio: f64, min: usize) -> (usize, usize) {
    let lo = ((mean as f64) * (1.0 - ratio)).floor() as usize;
    let hi = ((mean as f64) * (1.0 + ratio)).ceil() as usize;
    (lo.max(min), hi.max(min))
}

/// vLLM's ShareGPT filter: both sides ≥ 4 tokens, prompt ≤ 1024, prompt + output ≤ 2048 (the
/// output checks are skipped when the output length is fixed).
fn sharegpt_valid(prompt: u64, output: u64, fixed_output: bool) -> bool {
    (4..=1024).contains(&prompt) && (fixed_output || (output >= 4 && prompt + output <= 2048))
}

impl Workload {
    /// Builds the workload of a run. `count` is `--num-prompts`; for Mooncake `None` means the
    /// whole trace, for the others it is required.
    pub fn build(
        spec: &DatasetSpec,
        count: Option<usize>,
        seed: u64,
        synth: PromptSynth,
    ) -> Result<Self, DatasetError> {
        let need_count = || {
            count.ok_or(DatasetError::Invalid {
                field: "--num-prompts",
                message: "required for this dataset".into(),
            })
        };
        let (items, count) = match spec {
            DatasetSpec::Random {
                input_len,
                output_len,
                range_ratio,
                prefix_len,
            } => {
                let n = need_count()?;
                if !(0.0..1.0).contains(range_ratio) {
                    return Err(DatasetError::Invalid {
                        field: "--random-range-ratio",
                        message: format!("{range_ratio} is not in [0, 1)"),
                    });
                }
                let (in_lo, in_hi) = len_range(*input_len, *range_ratio, 0);
                let (out_lo, out_hi) = len_range(*output_len, *range_ratio, 1);
                if in_lo + prefix_len == 0 {
                    return Err(DatasetError::Invalid {
                        field: "--random-input-len",
                        message: "prompts would be empty; raise it or --random-prefix-len".into(),
                    });
                }
                let mut r = rng(seed, DOMAIN_LENGTHS, 0);
                let lens = (0..n)
                    .map(|_| {
                        (
                            r.random_range(in_lo..=in_hi) as u32,
                            r.random_range(out_lo..=out_hi) as u32,
                        )
                    })
                    .collect();
                let prefix = synth.text(&mut rng(seed, DOMAIN_PREFIX, 0), *prefix_len);
                (
                    Items::Random {
                        lens,
                        prefix,
                        prefix_len: *prefix_len,
                    },
                    n,
                )
            }
            DatasetSpec::ShareGpt { path, output_len } => {
                let n = need_count()?;
                let convs = read_sharegpt(path)?;
                let mut items: Vec<ShareGptItem> = convs
                    .into_iter()
                    .filter_map(|c| {
                        let prompt_tokens = synth.estimate_tokens(&c.prompt);
                        let output_tokens = output_len
                            .map_or_else(|| synth.estimate_tokens(&c.completion), |l| l as u64);
                        sharegpt_valid(prompt_tokens, output_tokens, output_len.is_some())
                            .then_some(ShareGptItem {
                                prompt: c.prompt,
                                prompt_tokens,
                                output_tokens,
                            })
                    })
                    .collect();
                if items.is_empty() {
                    return Err(DatasetError::Empty {
                        path: path.clone(),
                        what: "conversations within the length filter",
                    });
                }
                // Seeded Fisher–Yates shuffle, then the run cycles through the shuffled list.
                let mut r = rng(seed, DOMAIN_ORDER, 0);
                for i in (1..items.len()).rev() {
                    items.swap(i, r.random_range(0..=i));
                }
                (Items::ShareGpt { items }, n)
            }
            DatasetSpec::Prefix {
                num_prefixes,
                prefix_len,
                suffix_len,
                output_len,
            } => {
                let n = need_count()?;
                if *num_prefixes == 0 {
                    return Err(DatasetError::Invalid {
                        field: "--prefix-repetition-num-prefixes",
                        message: "must be ≥ 1".into(),
                    });
                }
                if *output_len == 0 || prefix_len + suffix_len == 0 {
                    return Err(DatasetError::Invalid {
                        field: "--prefix-repetition-output-len",
                        message: "output and prompt lengths must be ≥ 1".into(),
                    });
                }
                let prefixes = (0..*num_prefixes)
                    .map(|p| synth.text(&mut rng(seed, DOMAIN_PREFIX, p as u64), *prefix_len))
                    .collect();
                let mut r = rng(seed, DOMAIN_LENGTHS, 0);
                let choice = (0..n)
                    .map(|_| r.random_range(0..*num_prefixes) as u32)
                    .collect();
                let items = Items::Prefix {
                    prefixes,
                    choice,
                    prefix_len: *prefix_len,
                    suffix_len: *suffix_len,
                    output_len: *output_len,
                };
                (items, n)
            }
            DatasetSpec::Mooncake { path, block_size } => {
                if *block_size == 0 {
                    return Err(DatasetError::Invalid {
                        field: "--mooncake-block-size",
                        message: "must be ≥ 1".into(),
                    });
                }
                let mut entries = read_mooncake(path)?;
                if let Some(n) = count {
                    entries.truncate(n);
                }
                let n = entries.len();
                (
                    Items::Mooncake {
                        entries,
                        block_size: *block_size,
                    },
                    n,
                )
            }
        };
        Ok(Self {
            items,
            count,
            seed,
            synth,
        })
    }

    /// Number of requests.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the workload has no request.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Arrival offsets recorded in the dataset (Mooncake: `timestamp` in seconds), if any.
    pub fn arrival_offsets_s(&self) -> Option<Vec<f64>> {
        match &self.items {
            Items::Mooncake { entries, .. } => {
                Some(entries.iter().map(|e| e.timestamp / 1e3).collect())
            }
            _ => None,
        }
    }

    /// Materializes request `i` (`i < len()`; ShareGPT cycles through its conversations).
    pub fn request(&self, i: usize) -> RequestSpec {
        let mut r = rng(self.seed, DOMAIN_REQUEST, i as u64);
        match &self.items {
            Items::Random {
                lens,
                prefix,
                prefix_len,
            } => {
                let (input, output) = lens.get(i).copied().unwrap_or((1, 1));
                let mut prompt = prefix.clone();
                prompt.push_str(&self.synth.text(&mut r, input as usize));
                RequestSpec {
                    prompt,
                    prompt_tokens_estimate: (*prefix_len + input as usize) as u64,
                    max_tokens: u64::from(output),
                }
            }
            Items::ShareGpt { items } => {
                let item = &items[i % items.len()];
                RequestSpec {
                    prompt: item.prompt.clone(),
                    prompt_tokens_estimate: item.prompt_tokens,
                    max_tokens: item.output_tokens,
                }
            }
            Items::Prefix {
                prefixes,
                choice,
                prefix_len,
                suffix_len,
                output_len,
            } => {
                let p = choice.get(i).copied().unwrap_or(0) as usize;
                let mut prompt = prefixes[p % prefixes.len()].clone();
                prompt.push_str(&self.synth.text(&mut r, *suffix_len));
                RequestSpec {
                    prompt,
                    prompt_tokens_estimate: (prefix_len + suffix_len) as u64,
                    max_tokens: *output_len as u64,
                }
            }
            Items::Mooncake {
                entries,
                block_size,
            } => {
                let e = &entries[i % entries.len()];
                RequestSpec {
                    prompt: self.mooncake_prompt(e, *block_size, &mut r),
                    prompt_tokens_estimate: e.input_length,
                    max_tokens: e.output_length.max(1),
                }
            }
        }
    }

    /// Prompt of a trace line: block `k` is the text seeded by `hash_ids[k]`, so equal hash-id
    /// prefixes give equal text prefixes; the last block is cut to `input_length`; tokens beyond
    /// the listed blocks are request-specific.
    fn mooncake_prompt(&self, e: &MooncakeEntry, block_size: usize, r: &mut ChaCha8Rng) -> String {
        let total = usize::try_from(e.input_length).unwrap_or(usize::MAX);
        let mut prompt = String::new();
        let mut filled = 0;
        for &h in &e.hash_ids {
            if filled >= total {
                break;
            }
            let take = block_size.min(total - filled);
            let mut block_rng = rng(self.seed, DOMAIN_BLOCK, h);
            prompt.push_str(&self.synth_block(&mut block_rng, block_size, take));
            filled += take;
        }
        if filled < total {
            prompt.push_str(&self.synth.text(r, total - filled));
        }
        prompt
    }

    /// The first `take` tokens of the `block_size`-token block drawn from `r`.
    fn synth_block(&self, r: &mut ChaCha8Rng, block_size: usize, take: usize) -> String {
        match &self.synth {
            // One word per token: the first `take` words are already the block's prefix.
            PromptSynth::Words => self.synth.text(r, take),
            PromptSynth::Tokenizer(tok) => {
                let full = self.synth.text(r, block_size);
                let mut ids = tok.encode(&full);
                ids.truncate(take);
                tok.decode(&ids)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn words(s: &str) -> usize {
        s.split_whitespace().count()
    }

    fn random(n: usize, ratio: f64, prefix_len: usize) -> Workload {
        let spec = DatasetSpec::Random {
            input_len: 100,
            output_len: 20,
            range_ratio: ratio,
            prefix_len,
        };
        Workload::build(&spec, Some(n), 11, PromptSynth::Words).unwrap()
    }

    #[test]
    fn random_lengths_stay_in_range_and_prompts_match_their_length() {
        let w = random(200, 0.5, 0);
        for i in 0..w.len() {
            let r = w.request(i);
            assert!((50..=150).contains(&r.prompt_tokens_estimate));
            assert!((10..=30).contains(&r.max_tokens));
            assert_eq!(words(&r.prompt) as u64, r.prompt_tokens_estimate);
        }
    }

    #[test]
    fn zero_range_ratio_gives_exact_lengths() {
        let w = random(5, 0.0, 0);
        assert!(
            (0..5).all(
                |i| w.request(i).prompt_tokens_estimate == 100 && w.request(i).max_tokens == 20
            )
        );
    }

    #[test]
    fn requests_are_deterministic_and_order_independent() {
        let a = random(10, 0.3, 0);
        let b = random(10, 0.3, 0);
        assert_eq!(a.request(7), b.request(7));
        assert_eq!(a.request(3), b.request(3));
        assert_ne!(a.request(3).prompt, a.request(4).prompt);
    }

    #[test]
    fn random_prefix_is_shared_by_all_requests() {
        let w = random(3, 0.0, 30);
        let p0 = w.request(0).prompt;
        let p1 = w.request(1).prompt;
        let prefix: String = p0.split_inclusive(' ').take(31).collect();
        assert!(p1.starts_with(&prefix));
        assert_eq!(w.request(0).prompt_tokens_estimate, 130);
    }

    #[test]
    fn range_ratio_of_one_is_rejected() {
        let spec = DatasetSpec::Random {
            input_len: 10,
            output_len: 10,
            range_ratio: 1.0,
            prefix_len: 0,
        };
        let err = Workload::build(&spec, Some(1), 0, PromptSynth::Words).unwrap_err();
        assert!(err.to_string().contains("--random-range-ratio"));
    }

    #[test]
    fn prefix_dataset_reuses_few_prefixes() {
        let spec = DatasetSpec::Prefix {
            num_prefixes: 2,
            prefix_len: 50,
            suffix_len: 10,
            output_len: 5,
        };
        let w = Workload::build(&spec, Some(20), 1, PromptSynth::Words).unwrap();
        let heads: std::collections::HashSet<String> = (0..20)
            .map(|i| w.request(i).prompt.split_inclusive(' ').take(51).collect())
            .collect();
        assert_eq!(heads.len(), 2);
        assert!((0..20).all(|i| words(&w.request(i).prompt) == 60));
    }

    fn trace(lines: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(lines.as_bytes()).unwrap();
        f
    }

    #[test]
    fn mooncake_equal_hash_ids_share_equal_prefixes() {
        let f = trace(
            "{\"timestamp\": 0, \"input_length\": 20, \"output_length\": 4, \"hash_ids\": [7, 8, 9]}\n\
             {\"timestamp\": 1500, \"input_length\": 18, \"output_length\": 2, \"hash_ids\": [7, 8, 10]}\n\
             {\"timestamp\": 3000, \"input_length\": 12, \"output_length\": 1, \"hash_ids\": [5, 8]}\n",
        );
        let spec = DatasetSpec::Mooncake {
            path: f.path().to_owned(),
            block_size: 8,
        };
        let w = Workload::build(&spec, None, 3, PromptSynth::Words).unwrap();
        assert_eq!(w.arrival_offsets_s(), Some(vec![0.0, 1.5, 3.0]));
        let p: Vec<Vec<String>> = (0..3)
            .map(|i| {
                w.request(i)
                    .prompt
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect()
            })
            .collect();
        assert_eq!(p.iter().map(Vec::len).collect::<Vec<_>>(), vec![20, 18, 12]);
        // Blocks 7 and 8 (16 tokens) are shared by requests 0 and 1; the third block differs.
        assert_eq!(p[0][..16], p[1][..16]);
        assert_ne!(p[0][16..18], p[1][16..18]);
        // Request 2 starts with a different block, so it shares no prefix even though block 8
        // appears in it.
        assert_ne!(p[2][..8], p[0][..8]);
        assert_eq!(p[2][8..12], p[0][8..12]);
        assert_eq!(w.request(0).max_tokens, 4);
    }

    #[test]
    fn mooncake_count_truncates_trace() {
        let f = trace(
            "{\"timestamp\": 0, \"input_length\": 2, \"output_length\": 1, \"hash_ids\": []}\n{\"timestamp\": 1, \"input_length\": 2, \"output_length\": 1}\n",
        );
        let spec = DatasetSpec::Mooncake {
            path: f.path().to_owned(),
            block_size: 512,
        };
        let w = Workload::build(&spec, Some(1), 3, PromptSynth::Words).unwrap();
        assert_eq!(w.len(), 1);
        assert_eq!(words(&w.request(0).prompt), 2);
    }

    #[test]
    fn sharegpt_filters_and_cycles() {
        let long = "word ".repeat(10);
        let f = trace(&format!(
            r#"[{{"conversations":[{{"from":"human","value":"{long}"}},{{"from":"gpt","value":"{long}"}}]}},
                {{"conversations":[{{"from":"human","value":"hi"}},{{"from":"gpt","value":"{long}"}}]}}]"#
        ));
        let spec = DatasetSpec::ShareGpt {
            path: f.path().to_owned(),
            output_len: None,
        };
        let w = Workload::build(&spec, Some(3), 0, PromptSynth::Words).unwrap();
        assert_eq!(w.len(), 3);
        // "hi" is under 4 tokens and filtered out; the one valid conversation is reused.
        assert!((0..3).all(|i| w.request(i).prompt == long));
        assert_eq!(w.request(0).max_tokens, 13);
        let fixed = DatasetSpec::ShareGpt {
            path: f.path().to_owned(),
            output_len: Some(7),
        };
        let w = Workload::build(&fixed, Some(1), 0, PromptSynth::Words).unwrap();
        assert_eq!(w.request(0).max_tokens, 7);
    }
}
