//! Prompt text of a requested token length, without needing the server's tokenizer.
//!
//! Approach: prompts are sequences of common English words, each written with a leading space
//! (`" the"`, `" river"`, …). Every word of [`WORDS`] is a single token in the byte-level BPE
//! vocabularies of current models (GPT-2/cl100k style, Llama 3, DeepSeek-V3, Qwen), and the
//! pre-tokenizer splits at each space, so N words encode to N tokens there. Other tokenizers may
//! differ by a few percent; the server's `usage.prompt_tokens` is what loadtest reports, and the
//! client-side estimate is only used when a server sends no usage.
//!
//! With `--tokenizer`, [`PromptSynth::Tokenizer`] makes the count exact for that tokenizer:
//! the word text is encoded, cut to N tokens and decoded.
//!
//! Invariants: the text is a pure function of the random generator's state and N; a text for N
//! words is a prefix of the text for more words drawn from the same state (so equal block seeds
//! give equal prefixes).

use crate::tokenizer::HfTokenizer;
use rand::Rng;
use std::sync::Arc;

/// Single-token words (with their leading space when used).
pub const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by",
    "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an",
    "had", "they", "you", "were", "their", "one", "all", "we", "can", "her", "has", "there",
    "been", "if", "more", "when", "will", "would", "who", "so", "no", "she", "other", "its", "may",
    "these", "about", "some", "what", "only", "out", "also", "time", "into", "than", "could",
    "first", "new", "two", "then", "them", "do", "any", "like", "my", "now", "over", "such", "our",
    "man", "me", "even", "most", "made", "after", "many", "said", "did", "must", "before", "back",
    "see", "through", "way", "where", "get", "much", "go", "well", "your", "know", "should",
    "down", "work", "year", "because", "come", "people", "just", "each", "those", "how", "too",
    "little", "state", "good", "very", "make", "world", "still", "own", "men", "day", "take",
    "house", "long", "life", "while", "home", "great", "old", "last", "never", "us", "here",
    "under", "same", "every", "right", "think", "again", "place", "few", "small", "found", "part",
    "water", "between", "both", "high", "three", "city", "hand", "number", "school", "name",
    "group", "line", "side", "point", "case", "system", "end", "family", "power", "book", "light",
    "money", "story", "music", "food", "game", "open", "child", "data", "room", "car", "road",
    "tree", "river", "king", "war", "art", "sun", "air", "fire", "door", "eye", "head", "face",
    "body", "voice", "word", "week", "night", "table", "paper", "field", "price", "level", "model",
    "market", "team", "order", "page", "plan", "test", "color", "blue", "red", "green", "black",
    "white", "dark", "hot", "cold", "big", "short", "young", "early", "late", "best", "free",
    "full", "true", "real", "sure", "clear", "south", "north", "east", "west", "land", "sea",
    "town", "street", "church", "army", "law", "court", "bank", "club", "film", "song", "show",
    "party", "news", "job", "idea",
];

/// How prompt text of a given token count is produced.
#[derive(Debug, Clone)]
pub enum PromptSynth {
    /// One word per token (see the module docs).
    Words,
    /// Words, cut to an exact count with this tokenizer.
    Tokenizer(Arc<HfTokenizer>),
}

/// Appends `n` random words to `out`.
pub fn push_words<R: Rng>(rng: &mut R, n: usize, out: &mut String) {
    out.reserve(n * 6);
    for _ in 0..n {
        out.push(' ');
        out.push_str(WORDS[rng.random_range(0..WORDS.len())]);
    }
}

impl PromptSynth {
    /// Text of `n_tokens` tokens drawn from `rng`.
    pub fn text<R: Rng>(&self, rng: &mut R, n_tokens: usize) -> String {
        let mut text = String::new();
        push_words(rng, n_tokens, &mut text);
        match self {
            Self::Words => text,
            Self::Tokenizer(tok) => {
                let mut ids = tok.encode(&text);
                // A tokenizer that splits some words needs fewer of them; one that merges them
                // needs more. Top up until the count is reached, then cut.
                let mut guard = 0;
                while ids.len() < n_tokens && guard < 64 {
                    push_words(rng, n_tokens - ids.len(), &mut text);
                    ids = tok.encode(&text);
                    guard += 1;
                }
                ids.truncate(n_tokens);
                tok.decode(&ids)
            }
        }
    }

    /// Estimated token count of arbitrary text (dataset files): the tokenizer's count, else one
    /// token per four bytes, the usual rule of thumb for English BPE.
    pub fn estimate_tokens(&self, text: &str) -> u64 {
        match self {
            Self::Words => text.len().div_ceil(4) as u64,
            Self::Tokenizer(tok) => tok.encode(text).len() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn word_prompt_has_one_word_per_requested_token() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let t = PromptSynth::Words.text(&mut rng, 100);
        assert_eq!(t.split_whitespace().count(), 100);
        assert!(t.starts_with(' '));
    }

    #[test]
    fn shorter_text_from_same_state_is_a_prefix() {
        let a = PromptSynth::Words.text(&mut ChaCha8Rng::seed_from_u64(5), 40);
        let b = PromptSynth::Words.text(&mut ChaCha8Rng::seed_from_u64(5), 100);
        assert!(b.starts_with(&a));
    }

    #[test]
    fn words_are_distinct_lowercase_ascii() {
        let mut seen = std::collections::HashSet::new();
        for w in WORDS {
            assert!(w.chars().all(|c| c.is_ascii_lowercase()), "{w}");
            assert!(seen.insert(*w), "duplicate {w}");
        }
    }
}
