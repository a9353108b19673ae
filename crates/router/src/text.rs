//! Text ↔ tokens: the Hugging Face tokenizer, the chat template, and per-token bytes for logprobs.
//!
//! [`TextProcessor::load`] reads `tokenizer.json` and, beside it, `tokenizer_config.json`
//! (`chat_template`, `bos_token`, `eos_token`). Chat prompts are rendered by the template (which
//! writes the BOS token itself) and encoded without adding special tokens; completion prompts are
//! encoded with the tokenizer's own post-processor (`add_special_tokens = true`). Decoding for
//! output skips special tokens.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use pdserve_protocol::ApiError;
use pdserve_protocol::params::ChatTurn;
use tokenizers::Tokenizer;
use tokenizers::decoders::DecoderWrapper;

use crate::template::ChatTemplate;

/// A tokenizer or chat template that cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// A file cannot be read or parsed.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The chat template does not compile.
    #[error("chat template: {0}")]
    Template(String),
}

/// Tokenizer + chat template.
pub struct TextProcessor {
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    vocab_size: u32,
    added_tokens: HashMap<u32, String>,
    /// Inverse of the byte-level alphabet, when the tokenizer is byte-level.
    byte_decoder: Option<HashMap<char, u8>>,
}

impl std::fmt::Debug for TextProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextProcessor")
            .field("vocab_size", &self.vocab_size)
            .field("template", &self.template)
            .field("byte_level", &self.byte_decoder.is_some())
            .finish_non_exhaustive()
    }
}

/// The GPT-2 byte-level alphabet: byte → printable char.
fn byte_level_alphabet() -> HashMap<char, u8> {
    let mut map = HashMap::with_capacity(256);
    let mut extra = 0u32;
    for b in 0u32..256 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let c = if printable {
            b
        } else {
            extra += 1;
            255 + extra
        };
        if let (Some(c), Ok(byte)) = (char::from_u32(c), u8::try_from(b)) {
            map.insert(c, byte);
        }
    }
    map
}

fn is_byte_level(decoder: Option<&DecoderWrapper>) -> bool {
    match decoder {
        Some(DecoderWrapper::ByteLevel(_)) => true,
        Some(DecoderWrapper::Sequence(s)) => {
            s.get_decoders().iter().any(|d| is_byte_level(Some(d)))
        }
        _ => false,
    }
}

/// A special-token entry of tokenizer_config.json: a string or `{"content": ...}`.
fn token_string(value: Option<&serde_json::Value>) -> String {
    match value {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(v) => v
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or("")
            .to_string(),
        None => String::new(),
    }
}

/// `chat_template`: a string, or a list of `{name, template}` (the `default` one, else the first).
fn template_source(config: &serde_json::Value) -> Option<String> {
    match config.get("chat_template")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => {
            let named =
                |n: &serde_json::Value| n.get("name").and_then(|x| x.as_str()) == Some("default");
            list.iter()
                .find(|t| named(t))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(String::from)
        }
        _ => None,
    }
}

impl TextProcessor {
    /// Loads `path` (a `tokenizer.json`, or a directory holding it) and the `tokenizer_config.json`
    /// beside it, if any. `template_override` replaces the config's chat template.
    pub fn load(path: &Path, template_override: Option<&str>) -> Result<TextProcessor, TextError> {
        let (tokenizer_path, dir) = if path.is_dir() {
            (path.join("tokenizer.json"), path.to_path_buf())
        } else {
            (
                path.to_path_buf(),
                path.parent().map(Path::to_path_buf).unwrap_or_default(),
            )
        };
        let tokenizer = Tokenizer::from_file(&tokenizer_path).map_err(|e| TextError::File {
            path: tokenizer_path.clone(),
            message: e.to_string(),
        })?;
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.exists() {
            let text = std::fs::read_to_string(&config_path).map_err(|e| TextError::File {
                path: config_path.clone(),
                message: e.to_string(),
            })?;
            Some(serde_json::from_str(&text).map_err(|e| TextError::File {
                path: config_path.clone(),
                message: format!("invalid JSON: {e}"),
            })?)
        } else {
            None
        };
        TextProcessor::from_parts(tokenizer, config.as_ref(), template_override)
    }

    /// Builds from an in-memory tokenizer and optional `tokenizer_config.json` value.
    pub fn from_parts(
        tokenizer: Tokenizer,
        tokenizer_config: Option<&serde_json::Value>,
        template_override: Option<&str>,
    ) -> Result<TextProcessor, TextError> {
        let source = template_override
            .map(String::from)
            .or_else(|| tokenizer_config.and_then(template_source));
        let template = match source {
            Some(src) => {
                let bos = token_string(tokenizer_config.and_then(|c| c.get("bos_token")));
                let eos = token_string(tokenizer_config.and_then(|c| c.get("eos_token")));
                Some(ChatTemplate::new(&src, &bos, &eos).map_err(TextError::Template)?)
            }
            None => None,
        };
        let added_tokens = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .map(|(id, t)| (id, t.content))
            .collect();
        let vocab_size = u32::try_from(tokenizer.get_vocab_size(true)).unwrap_or(u32::MAX);
        let byte_decoder = is_byte_level(tokenizer.get_decoder()).then(byte_level_alphabet);
        Ok(TextProcessor {
            tokenizer,
            template,
            vocab_size,
            added_tokens,
            byte_decoder,
        })
    }

    /// Renders and tokenizes a conversation.
    pub fn encode_chat(&self, messages: &[ChatTurn]) -> Result<Vec<u32>, ApiError> {
        let template = self.template.as_ref().ok_or_else(|| {
            ApiError::invalid_request("this model has no chat template; use /v1/completions")
        })?;
        let text = template.render(messages)?;
        self.encode(&text, false)
    }

    /// Tokenizes text.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ApiError> {
        self.tokenizer
            .encode_fast(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ApiError::internal(format!("tokenization failed: {e}")))
    }

    /// Checks client-supplied token ids against the vocabulary.
    pub fn check_ids(&self, ids: &[u32], param: &str) -> Result<(), ApiError> {
        match ids.iter().find(|&&id| id >= self.vocab_size) {
            Some(id) => Err(ApiError::invalid_param(
                param,
                format!(
                    "token id {id} is outside the vocabulary (size {})",
                    self.vocab_size
                ),
            )),
            None => Ok(()),
        }
    }

    /// Decodes ids to text, skipping special tokens (lossy: invalid UTF-8 becomes U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap_or_default()
    }

    /// The raw bytes of one token (an added token's content; a byte-level token's bytes; otherwise
    /// the UTF-8 of its decoding).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        if let Some(content) = self.added_tokens.get(&id) {
            return content.as_bytes().to_vec();
        }
        if let (Some(map), Some(piece)) = (&self.byte_decoder, self.tokenizer.id_to_token(id)) {
            let mut out = Vec::with_capacity(piece.len());
            for c in piece.chars() {
                match map.get(&c) {
                    Some(b) => out.push(*b),
                    None => {
                        let mut buf = [0u8; 4];
                        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                    }
                }
            }
            return out;
        }
        self.tokenizer
            .decode(&[id], false)
            .unwrap_or_default()
            .into_bytes()
    }

    /// A token's text as shown in logprobs (lossy UTF-8 of its bytes) and its bytes.
    pub fn token_text(&self, id: u32) -> (String, Vec<u8>) {
        let bytes = self.token_bytes(id);
        (String::from_utf8_lossy(&bytes).into_owned(), bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_level_alphabet_is_a_bijection_over_bytes() {
        let map = byte_level_alphabet();
        assert_eq!(map.len(), 256);
        let mut bytes: Vec<u8> = map.values().copied().collect();
        bytes.sort_unstable();
        bytes.dedup();
        assert_eq!(bytes.len(), 256);
        assert_eq!(map.get(&'Ġ'), Some(&b' '));
        assert_eq!(map.get(&'a'), Some(&b'a'));
    }

    #[test]
    fn special_tokens_read_from_strings_or_objects() {
        let c = serde_json::json!({"bos_token": {"content": "<s>"}, "eos_token": "</s>"});
        assert_eq!(token_string(c.get("bos_token")), "<s>");
        assert_eq!(token_string(c.get("eos_token")), "</s>");
        assert_eq!(token_string(None), "");
    }

    #[test]
    fn template_lists_prefer_the_default() {
        let c = serde_json::json!({"chat_template": [
            {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]});
        assert_eq!(template_source(&c).as_deref(), Some("D"));
    }
}
