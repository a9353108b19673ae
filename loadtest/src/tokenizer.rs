//! The optional `--tokenizer`: a Hugging Face `tokenizer.json`, used to synthesize prompts of an
//! exact token count and to count tokens where the server reports none per chunk.
//!
//! Invariant: it never adds special tokens (BOS, chat template): counts are of the text alone, as
//! vLLM's `bench serve` counts them; the server's `usage.prompt_tokens` stays the reported truth.

use crate::stream::TokenCounter;
use std::path::{Path, PathBuf};

/// A loaded `tokenizer.json`.
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfTokenizer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// A tokenizer file that could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The file is missing or not a valid `tokenizer.json`.
    #[error("cannot load tokenizer {path}: {message}")]
    Load {
        /// The `--tokenizer` path.
        path: PathBuf,
        /// The loader's message.
        message: String,
    },
}

impl HfTokenizer {
    /// Loads a `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| TokenizerError::Load {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        Ok(Self {
            inner,
            path: path.to_owned(),
        })
    }

    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Token ids of `text` without special tokens (empty on an encoding error).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.inner
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .unwrap_or_default()
    }

    /// Text of `ids`, keeping special tokens out.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, true).unwrap_or_default()
    }
}

impl TokenCounter for HfTokenizer {
    fn count_tokens(&self, text: &str) -> usize {
        self.encode(text).len()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::prompt::{PromptSynth, WORDS};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use std::io::Write;
    use std::sync::Arc;

    /// A word-level `tokenizer.json` whose vocabulary is [`WORDS`] plus `extra`.
    pub(crate) fn word_level_tokenizer(extra: &[&str]) -> tempfile::NamedTempFile {
        let mut vocab = serde_json::Map::new();
        vocab.insert("[UNK]".into(), 0.into());
        for (i, w) in WORDS.iter().chain(extra).enumerate() {
            vocab.insert((*w).to_owned(), (i + 1).into());
        }
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
        });
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(json.to_string().as_bytes()).unwrap();
        f
    }

    #[test]
    fn tokenizer_synthesis_gives_exact_token_counts() {
        let f = word_level_tokenizer(&[]);
        let tok = Arc::new(HfTokenizer::from_file(f.path()).unwrap());
        let synth = PromptSynth::Tokenizer(Arc::clone(&tok));
        for n in [1, 7, 300] {
            let text = synth.text(&mut ChaCha8Rng::seed_from_u64(n as u64), n);
            assert_eq!(tok.count_tokens(&text), n);
        }
        assert_eq!(synth.estimate_tokens(" the river zzz"), 3);
    }

    #[test]
    fn missing_tokenizer_file_names_the_path() {
        let err = HfTokenizer::from_file(Path::new("/nonexistent/tokenizer.json")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/tokenizer.json"));
    }
}
