//! The tokenizer of a checkpoint: `tokenizer.json` (Hugging Face `tokenizers`, pure Rust with
//! the `fancy-regex` backend — no C toolchain) and `tokenizer_config.json` (special tokens and the
//! Jinja chat template, rendered with `minijinja`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// One chat message (`role`: `system`, `user` or `assistant`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Speaker.
    pub role: String,
    /// Text.
    pub content: String,
}

impl ChatMessage {
    /// A message of `role` with `content`.
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
struct TokenizerConfig {
    #[serde(default)]
    chat_template: Option<String>,
    #[serde(default)]
    bos_token: Option<SpecialToken>,
    #[serde(default)]
    eos_token: Option<SpecialToken>,
}

/// `bos_token` / `eos_token` are a string or `{"content": …}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SpecialToken {
    Text(String),
    Object { content: String },
}

impl SpecialToken {
    fn text(&self) -> &str {
        match self {
            Self::Text(s) | Self::Object { content: s } => s,
        }
    }
}

/// A loaded tokenizer with its special tokens and chat template.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos: Option<String>,
    eos: Option<String>,
    path: PathBuf,
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` and, when present, `dir/tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let json = std::fs::read(&path).map_err(|e| ModelError::io(&path, e))?;
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.exists() {
            Some(
                std::fs::read_to_string(&config_path)
                    .map_err(|e| ModelError::io(&config_path, e))?,
            )
        } else {
            None
        };
        Self::from_bytes(&json, config.as_deref(), &path)
    }

    /// A tokenizer from `tokenizer.json` bytes and optional `tokenizer_config.json` text; `path`
    /// names the source in errors.
    pub fn from_bytes(json: &[u8], config_json: Option<&str>, path: &Path) -> Result<Self> {
        let err = |message: String| ModelError::Tokenizer {
            path: path.to_path_buf(),
            message,
        };
        let inner = tokenizers::Tokenizer::from_bytes(json).map_err(|e| err(e.to_string()))?;
        let config: TokenizerConfig = match config_json {
            Some(text) => serde_json::from_str(text)
                .map_err(|e| err(format!("tokenizer_config.json: {e}")))?,
            None => TokenizerConfig::default(),
        };
        Ok(Self {
            inner,
            chat_template: config.chat_template,
            bos: config.bos_token.map(|t| t.text().to_string()),
            eos: config.eos_token.map(|t| t.text().to_string()),
            path: path.to_path_buf(),
        })
    }

    fn err(&self, message: impl std::fmt::Display) -> ModelError {
        ModelError::Tokenizer {
            path: self.path.clone(),
            message: message.to_string(),
        }
    }

    /// Token ids of `text` (special-token strings in the text map to their ids; nothing added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| self.err(e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; special tokens are dropped when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| self.err(e))
    }

    /// Id of the token spelled `token`.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size (added tokens included).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The beginning-of-sequence token's id, from `tokenizer_config.json`.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos.as_deref().and_then(|t| self.token_id(t))
    }

    /// The end-of-sequence token's id, from `tokenizer_config.json`.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos.as_deref().and_then(|t| self.token_id(t))
    }

    /// The chat template, when the checkpoint has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Renders `messages` with the chat template (`bos_token`, `eos_token`, `messages`,
    /// `add_generation_prompt` in scope, as transformers provides).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| self.err("tokenizer_config.json has no chat_template"))?;
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| self.err(format!("chat template: {e}")))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| self.err(format!("chat template: {e}")))?;
        let ctx = minijinja::context! {
            messages => minijinja::value::Serde(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos.clone().unwrap_or_default(),
            eos_token => self.eos.clone().unwrap_or_default(),
        };
        tmpl.render(ctx)
            .map_err(|e| self.err(format!("chat template: {e}")))
    }

    /// The underlying `tokenizers` tokenizer (streaming decode, offsets, …).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiny::{TOKENIZER_CONFIG_JSON, TOKENIZER_JSON};

    fn tok() -> Tokenizer {
        Tokenizer::from_bytes(
            TOKENIZER_JSON.as_bytes(),
            Some(TOKENIZER_CONFIG_JSON),
            Path::new("embedded"),
        )
        .unwrap()
    }

    #[test]
    fn embedded_tokenizer_has_deepseek_specials() {
        let t = tok();
        assert_eq!(t.bos_id(), Some(0));
        assert_eq!(t.eos_id(), Some(1));
        assert_eq!(t.token_id("<｜User｜>"), Some(2));
        assert_eq!(t.token_id("<｜Assistant｜>"), Some(3));
        assert!(t.vocab_size() <= 4096);
    }

    #[test]
    fn text_round_trips_through_byte_level_bpe() {
        let t = tok();
        let text = "Hello, world! Ünïcödé → 42";
        let ids = t.encode(text).unwrap();
        assert!(!ids.is_empty());
        assert_eq!(t.decode(&ids, false).unwrap(), text);
    }

    #[test]
    fn chat_template_renders_user_turn_and_generation_prompt() {
        let t = tok();
        let s = t
            .apply_chat_template(
                &[
                    ChatMessage::new("system", "Be brief."),
                    ChatMessage::new("user", "Hi"),
                ],
                true,
            )
            .unwrap();
        assert_eq!(
            s,
            "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜>"
        );
        let ids = t.encode(&s).unwrap();
        assert_eq!(ids[0], 0);
        assert_eq!(*ids.last().unwrap(), 3);
    }
}
