//! From token ids to the text a client sees: incremental detokenization, stop strings, logprobs.
//!
//! [`IncrementalDetokenizer`] turns one id at a time into new text. It decodes a small window of
//! recent ids twice (with and without the newest) and emits the difference, which handles
//! tokenizers whose decoding depends on neighbours (leading spaces) and withholds text while the
//! window ends in an incomplete UTF-8 sequence (a multi-byte character split across tokens).
//!
//! [`ChoiceAssembler`] applies the request's stop strings to that text. The router owns stop strings
//! (the services only see token-level stops): the assembler releases only text that cannot be the
//! beginning of a stop string, cuts the text before the first stop string found, and reports the
//! generation finished with `stop`; the caller then aborts the decode leg. Invariants: released
//! text never contains a stop string (once `min_tokens` tokens were generated, before which stop
//! strings are not checked, as in vLLM); the concatenation of released deltas is the final text;
//! `completion_tokens` counts tokens up to and including the one that completed a stop string.

use pdserve_protocol::internal::TokenLogprob;
use pdserve_protocol::openai::FinishReason;

use crate::text::TextProcessor;

/// Prompt tokens kept as left context for the first generated tokens' decoding.
const CONTEXT_TOKENS: usize = 5;

/// What the assembler needs from a tokenizer.
pub trait TokenText {
    /// Text of `ids`, special tokens skipped, invalid UTF-8 as U+FFFD.
    fn decode(&self, ids: &[u32]) -> String;
    /// Display text and raw bytes of one token.
    fn token_text(&self, id: u32) -> (String, Vec<u8>);
}

impl TokenText for TextProcessor {
    fn decode(&self, ids: &[u32]) -> String {
        TextProcessor::decode(self, ids)
    }
    fn token_text(&self, id: u32) -> (String, Vec<u8>) {
        TextProcessor::token_text(self, id)
    }
}

/// Incremental detokenizer over a sliding window of ids.
#[derive(Debug, Clone)]
pub struct IncrementalDetokenizer {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDetokenizer {
    /// Starts after `prompt` (its last few tokens serve as context only).
    pub fn new(prompt: &[u32]) -> Self {
        let context = &prompt[prompt.len().saturating_sub(CONTEXT_TOKENS)..];
        IncrementalDetokenizer {
            ids: context.to_vec(),
            prefix_offset: 0,
            read_offset: context.len(),
        }
    }

    /// Adds one id; returns the text it completes (possibly empty).
    pub fn push(&mut self, text: &impl TokenText, id: u32) -> String {
        self.ids.push(id);
        let prefix = text.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let full = text.decode(&self.ids[self.prefix_offset..]);
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            let delta = full.get(prefix.len()..).unwrap_or("").to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            // Keep the window short: drop ids before the prefix.
            if self.prefix_offset > 0 {
                self.ids.drain(..self.prefix_offset);
                self.read_offset -= self.prefix_offset;
                self.prefix_offset = 0;
            }
            delta
        } else {
            String::new()
        }
    }

    /// Text still withheld (an incomplete UTF-8 sequence at the end), lossily.
    pub fn flush(&mut self, text: &impl TokenText) -> String {
        let prefix = text.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let full = text.decode(&self.ids[self.prefix_offset..]);
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        full.get(prefix.len()..).unwrap_or("").to_string()
    }
}

/// Stop strings of one request.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
}

impl StopMatcher {
    /// A matcher for `stops` (non-empty strings).
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher { stops }
    }

    /// Byte position of the earliest stop string in `text`.
    pub fn find(&self, text: &str) -> Option<usize> {
        self.stops
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
    }

    /// Length in bytes of the longest suffix of `text` that is a proper prefix of a stop string
    /// (text that must be withheld because a stop string may be starting).
    pub fn held_suffix(&self, text: &str) -> usize {
        let mut held = 0;
        for stop in &self.stops {
            let longest = (stop.len().saturating_sub(1)).min(text.len());
            for k in (held + 1..=longest).rev() {
                let start = text.len() - k;
                if text.is_char_boundary(start) && stop.starts_with(&text[start..]) {
                    held = k;
                    break;
                }
            }
        }
        held
    }
}

/// A generated token with the text shown for it in logprobs.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobText {
    /// Token text (lossy).
    pub token: String,
    /// Token bytes.
    pub bytes: Vec<u8>,
    /// Logprob.
    pub logprob: f32,
    /// Alternatives: (text, bytes, logprob), best first.
    pub top: Vec<(String, Vec<u8>, f32)>,
    /// Character offset of the token's text in the choice's text.
    pub text_offset: u32,
    /// Character offset just after the token's text.
    text_end: u32,
}

/// What a push released.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Delta {
    /// New text.
    pub text: String,
    /// Logprobs of the tokens whose text is now released (requested only).
    pub logprobs: Vec<TokenLogprobText>,
    /// Set when the choice finished.
    pub finish_reason: Option<FinishReason>,
}

/// Turns one choice's token events into text deltas.
#[derive(Debug, Clone)]
pub struct ChoiceAssembler {
    detok: IncrementalDetokenizer,
    stops: StopMatcher,
    min_tokens: u32,
    want_logprobs: bool,
    pending: String,
    pending_logprobs: Vec<TokenLogprobText>,
    released_chars: u32,
    tokens: u32,
    finish: Option<FinishReason>,
}

impl ChoiceAssembler {
    /// An assembler for a choice generated after `prompt`.
    pub fn new(
        prompt: &[u32],
        stop_strings: Vec<String>,
        min_tokens: u32,
        want_logprobs: bool,
    ) -> Self {
        ChoiceAssembler {
            detok: IncrementalDetokenizer::new(prompt),
            stops: StopMatcher::new(stop_strings),
            min_tokens,
            want_logprobs,
            pending: String::new(),
            pending_logprobs: Vec::new(),
            released_chars: 0,
            tokens: 0,
            finish: None,
        }
    }

    /// Tokens consumed (usage's completion tokens).
    pub fn completion_tokens(&self) -> u32 {
        self.tokens
    }

    /// Set once the choice finished.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    /// Consumes a `tokens` event. After the choice finished (stop string), further ids are
    /// ignored.
    pub fn push(
        &mut self,
        text: &impl TokenText,
        ids: &[u32],
        logprobs: Option<&[TokenLogprob]>,
        finish_reason: Option<FinishReason>,
    ) -> Delta {
        let mut delta = Delta::default();
        if self.finish.is_some() {
            return delta;
        }
        for (i, &id) in ids.iter().enumerate() {
            self.tokens += 1;
            let piece = self.detok.push(text, id);
            let start = self.released_chars + self.pending.chars().count() as u32;
            self.pending.push_str(&piece);
            if self.want_logprobs {
                self.queue_logprob(text, id, logprobs.and_then(|l| l.get(i)), start);
            }
            if self.check_stop() {
                self.release_all(&mut delta);
                return delta;
            }
        }
        match finish_reason {
            Some(reason) => {
                let rest = self.detok.flush(text);
                self.pending.push_str(&rest);
                if !self.check_stop() {
                    self.finish = Some(reason);
                }
                self.release_all(&mut delta);
            }
            None => {
                let held = if self.tokens >= self.min_tokens {
                    self.stops.held_suffix(&self.pending)
                } else {
                    0
                };
                let keep = self.pending.split_off(self.pending.len() - held);
                let released = std::mem::replace(&mut self.pending, keep);
                self.release(&mut delta, released, false);
            }
        }
        delta
    }

    /// Ends the choice without a finish reason from decode (the stream ended with `done` only):
    /// `length` when the budget was used up, else `stop`.
    pub fn finish(&mut self, text: &impl TokenText, max_tokens: u32) -> Delta {
        if self.finish.is_some() {
            return Delta::default();
        }
        let reason = if self.tokens >= max_tokens {
            FinishReason::Length
        } else {
            FinishReason::Stop
        };
        self.push(text, &[], None, Some(reason))
    }

    fn queue_logprob(
        &mut self,
        text: &impl TokenText,
        id: u32,
        lp: Option<&TokenLogprob>,
        start: u32,
    ) {
        let (token, bytes) = text.token_text(id);
        let top = lp
            .map(|l| {
                l.top_logprobs
                    .iter()
                    .map(|t| {
                        let (s, b) = text.token_text(t.id);
                        (s, b, t.logprob)
                    })
                    .collect()
            })
            .unwrap_or_default();
        self.pending_logprobs.push(TokenLogprobText {
            token,
            bytes,
            logprob: lp.map_or(f32::NAN, |l| l.logprob),
            top,
            text_offset: start,
            text_end: self.released_chars + self.pending.chars().count() as u32,
        });
    }

    /// Cuts `pending` at the first stop string; true when one was found.
    fn check_stop(&mut self) -> bool {
        if self.tokens < self.min_tokens {
            return false;
        }
        match self.stops.find(&self.pending) {
            Some(pos) => {
                self.pending.truncate(pos);
                self.finish = Some(FinishReason::Stop);
                true
            }
            None => false,
        }
    }

    fn release_all(&mut self, delta: &mut Delta) {
        let released = std::mem::take(&mut self.pending);
        self.release(delta, released, true);
        delta.finish_reason = self.finish;
    }

    fn release(&mut self, delta: &mut Delta, text: String, all_logprobs: bool) {
        self.released_chars += text.chars().count() as u32;
        delta.text.push_str(&text);
        let cut = if all_logprobs {
            self.pending_logprobs.len()
        } else {
            self.pending_logprobs
                .iter()
                .take_while(|l| l.text_end <= self.released_chars)
                .count()
        };
        delta.logprobs.extend(self.pending_logprobs.drain(..cut));
    }
}

#[cfg(test)]
#[path = "assemble_tests.rs"]
mod tests;
