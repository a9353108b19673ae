//! Stop conditions, finish reasons and stop-string detection on streamed text.
//!
//! A [`StopChecker`] is fed each generated token in order and says whether the sequence must finish and
//! why ([`FinishReason`] uses OpenAI's names). Precedence for one token: EOS / stop token ids (once
//! `min_tokens` outputs exist), then stop strings (same condition), then `max_tokens`, then the model's
//! context limit.
//!
//! Stop strings are matched on detokenized text from a caller-provided [`IncrementalDetokenizer`]. As in
//! OpenAI's API the returned text stops *before* the stop string: the matched string and anything after
//! it are never emitted. To guarantee that while streaming, [`StopChecker::take_text`] holds back the
//! longest tail of the text that is still a proper prefix of some stop string, and releases it once it
//! can no longer start a match (or when the sequence finishes).
//!
//! Tokens that stop the sequence by id (EOS, stop token ids) are kept in the token output (they count as
//! completion tokens) but are not detokenized. `min_tokens` only delays stopping here; keeping the
//! sampler from drawing EOS before `min_tokens` is the sampler's job.

use crate::sequence::TokenId;

/// Why a sequence finished; `as_str` gives OpenAI's `finish_reason` strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// `max_tokens` or the model's context length was reached.
    Length,
    /// EOS, a stop token id or a stop string.
    Stop,
    /// Cancelled by the client or the service.
    Abort,
    /// Failed (executor or detokenizer error).
    Error,
}

impl FinishReason {
    /// OpenAI's name: `length`, `stop`, `abort`, `error`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Length => "length",
            Self::Stop => "stop",
            Self::Abort => "abort",
            Self::Error => "error",
        }
    }
}

impl std::fmt::Display for FinishReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What triggered a `stop` finish (vLLM's `stop_reason`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopMatch {
    /// An EOS token id.
    Eos(TokenId),
    /// One of the request's stop token ids.
    StopToken(TokenId),
    /// One of the request's stop strings.
    StopString(String),
}

/// How and why a sequence finished.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finish {
    /// OpenAI finish reason.
    pub reason: FinishReason,
    /// The stop condition that matched, for [`FinishReason::Stop`].
    pub matched: Option<StopMatch>,
    /// Operator diagnostic, for [`FinishReason::Error`] (and aborts with a cause).
    pub message: Option<String>,
}

impl Finish {
    /// A finish with no detail.
    pub fn new(reason: FinishReason) -> Self {
        Self {
            reason,
            matched: None,
            message: None,
        }
    }

    /// An [`FinishReason::Error`] finish with a diagnostic.
    pub fn error(message: impl Into<String>) -> Self {
        Self {
            reason: FinishReason::Error,
            matched: None,
            message: Some(message.into()),
        }
    }

    fn stop(matched: StopMatch) -> Self {
        Self {
            reason: FinishReason::Stop,
            matched: Some(matched),
            message: None,
        }
    }
}

/// A request's stop conditions (OpenAI `max_tokens`, `stop`; vLLM `min_tokens`, `stop_token_ids`,
/// `ignore_eos`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StopConditions {
    /// Most output tokens; `None` runs to the model's context limit.
    pub max_tokens: Option<usize>,
    /// No stop by EOS, stop token or stop string before this many output tokens.
    pub min_tokens: usize,
    /// The model's end-of-sequence token ids.
    pub eos_token_ids: Vec<TokenId>,
    /// Do not stop at EOS (benchmarks).
    pub ignore_eos: bool,
    /// Extra token ids that stop the sequence.
    pub stop_token_ids: Vec<TokenId>,
    /// Strings that stop the sequence; excluded from the returned text. Need a detokenizer.
    pub stop_strings: Vec<String>,
}

/// Invalid stop conditions, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StopConfigError {
    /// `max_tokens` is zero.
    #[error("stop conditions: `max_tokens` must be at least 1")]
    ZeroMaxTokens,
    /// `min_tokens` above `max_tokens`.
    #[error("stop conditions: `min_tokens` ({min_tokens}) exceeds `max_tokens` ({max_tokens})")]
    MinAboveMax {
        /// The min.
        min_tokens: usize,
        /// The max.
        max_tokens: usize,
    },
    /// An empty stop string would match everywhere.
    #[error("stop conditions: `stop` entry {index} is an empty string")]
    EmptyStopString {
        /// Index in `stop_strings`.
        index: usize,
    },
    /// Stop strings given but no detokenizer to produce text.
    #[error("stop conditions: `stop` strings need a detokenizer, and none was given")]
    StopStringsWithoutDetokenizer,
}

impl StopConditions {
    /// Checks the fields against each other.
    pub fn validate(&self) -> Result<(), StopConfigError> {
        if let Some(max_tokens) = self.max_tokens {
            if max_tokens == 0 {
                return Err(StopConfigError::ZeroMaxTokens);
            }
            if self.min_tokens > max_tokens {
                return Err(StopConfigError::MinAboveMax {
                    min_tokens: self.min_tokens,
                    max_tokens,
                });
            }
        }
        if let Some(index) = self.stop_strings.iter().position(String::is_empty) {
            return Err(StopConfigError::EmptyStopString { index });
        }
        Ok(())
    }
}

/// Error from a detokenizer; the sequence finishes with [`FinishReason::Error`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("detokenizer: {message}")]
pub struct DetokenizeError {
    /// What went wrong.
    pub message: String,
}

/// Turns a sequence's generated tokens into text, one token at a time (one instance per sequence).
pub trait IncrementalDetokenizer: Send {
    /// Appends one generated token and returns the text it completes; may be empty (e.g. an
    /// incomplete UTF-8 sequence that a later token finishes).
    fn push(&mut self, token: TokenId) -> Result<String, DetokenizeError>;
}

/// Per-sequence stop checking and text streaming. See the module docs for the rules.
pub struct StopChecker {
    conditions: StopConditions,
    detokenizer: Option<Box<dyn IncrementalDetokenizer>>,
    /// Detokenized output so far (truncated at a matched stop string).
    text: String,
    /// Bytes of `text` already returned by `take_text`.
    emitted_bytes: usize,
    /// Longest stop string in bytes.
    max_stop_bytes: usize,
}

impl std::fmt::Debug for StopChecker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StopChecker")
            .field("conditions", &self.conditions)
            .field("has_detokenizer", &self.detokenizer.is_some())
            .field("text", &self.text)
            .field("emitted_bytes", &self.emitted_bytes)
            .finish()
    }
}

impl StopChecker {
    /// Validates `conditions` and builds a checker.
    pub fn new(
        conditions: StopConditions,
        detokenizer: Option<Box<dyn IncrementalDetokenizer>>,
    ) -> Result<Self, StopConfigError> {
        conditions.validate()?;
        if !conditions.stop_strings.is_empty() && detokenizer.is_none() {
            return Err(StopConfigError::StopStringsWithoutDetokenizer);
        }
        let max_stop_bytes = conditions
            .stop_strings
            .iter()
            .map(String::len)
            .max()
            .unwrap_or(0);
        Ok(Self {
            conditions,
            detokenizer,
            text: String::new(),
            emitted_bytes: 0,
            max_stop_bytes,
        })
    }

    /// The conditions checked.
    pub fn conditions(&self) -> &StopConditions {
        &self.conditions
    }

    /// Whether text is produced (a detokenizer was given).
    pub fn has_detokenizer(&self) -> bool {
        self.detokenizer.is_some()
    }

    /// Checks `token`, just appended to the output. `num_output_tokens` counts it;
    /// `num_total_tokens` is prompt plus output. Returns the finish if the sequence must stop now.
    pub fn check(
        &mut self,
        token: TokenId,
        num_output_tokens: usize,
        num_total_tokens: usize,
        max_context_tokens: usize,
    ) -> Option<Finish> {
        let may_stop = num_output_tokens >= self.conditions.min_tokens;
        if may_stop {
            if !self.conditions.ignore_eos && self.conditions.eos_token_ids.contains(&token) {
                return Some(Finish::stop(StopMatch::Eos(token)));
            }
            if self.conditions.stop_token_ids.contains(&token) {
                return Some(Finish::stop(StopMatch::StopToken(token)));
            }
        }
        if let Some(detokenizer) = self.detokenizer.as_mut() {
            match detokenizer.push(token) {
                Ok(delta) => {
                    let prev_len = self.text.len();
                    self.text.push_str(&delta);
                    if may_stop && let Some(finish) = self.find_stop_string(prev_len) {
                        return Some(finish);
                    }
                }
                Err(e) => return Some(Finish::error(e.to_string())),
            }
        }
        if self
            .conditions
            .max_tokens
            .is_some_and(|max| num_output_tokens >= max)
            || num_total_tokens >= max_context_tokens
        {
            return Some(Finish::new(FinishReason::Length));
        }
        None
    }

    /// Looks for a stop string ending in the text appended after `prev_len`; on a match truncates the
    /// text before it.
    fn find_stop_string(&mut self, prev_len: usize) -> Option<Finish> {
        if self.max_stop_bytes == 0 {
            return None;
        }
        let from = floor_char_boundary(
            &self.text,
            prev_len
                .saturating_sub(self.max_stop_bytes - 1)
                .max(self.emitted_bytes),
        );
        let (at, stop) = self
            .conditions
            .stop_strings
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| (from + i, s)))
            .min_by_key(|&(at, _)| at)?;
        let stop = stop.clone();
        self.text.truncate(at);
        Some(Finish::stop(StopMatch::StopString(stop)))
    }

    /// Text not yet returned: everything when `finished`, otherwise all but the tail that could still
    /// begin a stop string. `None` without a detokenizer.
    pub fn take_text(&mut self, finished: bool) -> Option<String> {
        self.detokenizer.as_ref()?;
        let end = if finished {
            self.text.len()
        } else {
            self.text.len() - self.held_back_bytes()
        };
        let start = self.emitted_bytes.min(end);
        self.emitted_bytes = end.max(self.emitted_bytes);
        Some(self.text[start..end].to_owned())
    }

    /// Length of the longest unemitted tail that is a proper prefix of a stop string.
    fn held_back_bytes(&self) -> usize {
        let pending = self.text.len() - self.emitted_bytes;
        let longest = self.max_stop_bytes.saturating_sub(1).min(pending);
        (1..=longest)
            .rev()
            .find(|&k| {
                let at = self.text.len() - k;
                self.text.is_char_boundary(at)
                    && self
                        .conditions
                        .stop_strings
                        .iter()
                        .any(|s| s.len() > k && s.starts_with(&self.text[at..]))
            })
            .unwrap_or(0)
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Test detokenizer: token `t` decodes to `vocab[t]`.
    #[derive(Debug, Clone)]
    pub(crate) struct VocabDetokenizer(pub Vec<&'static str>);

    impl IncrementalDetokenizer for VocabDetokenizer {
        fn push(&mut self, token: TokenId) -> Result<String, DetokenizeError> {
            self.0
                .get(token as usize)
                .map(|s| (*s).to_owned())
                .ok_or_else(|| DetokenizeError {
                    message: format!("token {token} not in vocabulary"),
                })
        }
    }

    const VOCAB: [&str; 8] = ["Hello", " wor", "ld", "!", " END", "EN", "D", "é"];

    fn checker(conditions: StopConditions) -> StopChecker {
        StopChecker::new(conditions, Some(Box::new(VocabDetokenizer(VOCAB.to_vec())))).unwrap()
    }

    /// Feeds tokens; returns streamed text, the finish, and how many tokens were consumed.
    fn run(c: &mut StopChecker, tokens: &[TokenId]) -> (String, Option<Finish>, usize) {
        let mut out = String::new();
        for (i, &t) in tokens.iter().enumerate() {
            let finish = c.check(t, i + 1, 10 + i + 1, 1000);
            out += &c.take_text(finish.is_some()).unwrap();
            if finish.is_some() {
                return (out, finish, i + 1);
            }
        }
        (out, None, tokens.len())
    }

    #[test]
    fn stop_string_is_excluded_from_text_even_across_tokens() {
        let mut c = checker(StopConditions {
            stop_strings: vec!["END".into()],
            ..Default::default()
        });
        let (text, finish, used) = run(&mut c, &[0, 1, 2, 5, 6, 3]);
        assert_eq!(text, "Hello world");
        assert_eq!(used, 5);
        assert_eq!(
            finish.unwrap().matched,
            Some(StopMatch::StopString("END".into()))
        );
    }

    #[test]
    fn text_that_cannot_start_a_stop_string_is_not_held_back() {
        let mut c = checker(StopConditions {
            stop_strings: vec!["END".into()],
            ..Default::default()
        });
        c.check(0, 1, 11, 1000);
        assert_eq!(c.take_text(false).unwrap(), "Hello");
        c.check(5, 2, 12, 1000);
        assert_eq!(c.take_text(false).unwrap(), "", "\"EN\" may begin \"END\"");
        c.check(3, 3, 13, 1000);
        assert_eq!(c.take_text(false).unwrap(), "EN!");
    }

    #[test]
    fn earliest_stop_string_wins() {
        let mut c = checker(StopConditions {
            stop_strings: vec!["ld".into(), "wor".into()],
            ..Default::default()
        });
        let (text, finish, _) = run(&mut c, &[0, 1, 2]);
        assert_eq!(text, "Hello ");
        assert_eq!(
            finish.unwrap().matched,
            Some(StopMatch::StopString("wor".into()))
        );
    }

    #[test]
    fn eos_stops_unless_ignored_and_is_not_detokenized() {
        let eos = StopConditions {
            eos_token_ids: vec![4],
            ..Default::default()
        };
        let (text, finish, used) = run(&mut checker(eos.clone()), &[0, 4, 3]);
        assert_eq!((text.as_str(), used), ("Hello", 2));
        assert_eq!(finish.unwrap().matched, Some(StopMatch::Eos(4)));
        let ignore = StopConditions {
            ignore_eos: true,
            ..eos
        };
        let (text, finish, _) = run(&mut checker(ignore), &[0, 4, 3]);
        assert_eq!((text.as_str(), finish), ("Hello END!", None));
    }

    #[test]
    fn stop_token_ids_stop() {
        let mut c = checker(StopConditions {
            stop_token_ids: vec![3],
            ..Default::default()
        });
        let (_, finish, used) = run(&mut c, &[0, 3, 1]);
        assert_eq!(used, 2);
        assert_eq!(finish.unwrap().matched, Some(StopMatch::StopToken(3)));
    }

    #[test]
    fn min_tokens_delays_every_stop_but_length() {
        let mut c = checker(StopConditions {
            min_tokens: 3,
            eos_token_ids: vec![4],
            stop_token_ids: vec![3],
            stop_strings: vec!["wor".into()],
            max_tokens: Some(5),
            ignore_eos: false,
        });
        // EOS at 1, stop id at 2, stop string at 3 (" wor" is the 3rd token).
        let (_, finish, used) = run(&mut c, &[4, 3, 1, 2, 0, 0]);
        assert_eq!(used, 3);
        assert_eq!(
            finish.unwrap().matched,
            Some(StopMatch::StopString("wor".into()))
        );
        let mut c = checker(StopConditions {
            min_tokens: 2,
            max_tokens: Some(2),
            ..Default::default()
        });
        let (_, finish, used) = run(&mut c, &[0, 0, 0]);
        assert_eq!((used, finish.unwrap().reason), (2, FinishReason::Length));
    }

    #[test]
    fn max_tokens_and_context_limit_finish_with_length() {
        let mut c = checker(StopConditions {
            max_tokens: Some(2),
            ..Default::default()
        });
        assert_eq!(c.check(0, 1, 11, 1000), None);
        assert_eq!(
            c.check(0, 2, 12, 1000),
            Some(Finish::new(FinishReason::Length))
        );
        let mut c = checker(StopConditions::default());
        assert_eq!(c.check(0, 1, 99, 100), None);
        assert_eq!(
            c.check(0, 2, 100, 100),
            Some(Finish::new(FinishReason::Length))
        );
    }

    #[test]
    fn multibyte_text_is_cut_on_char_boundaries() {
        let mut c = checker(StopConditions {
            stop_strings: vec!["éEND".into()],
            ..Default::default()
        });
        c.check(7, 1, 11, 1000);
        assert_eq!(c.take_text(false).unwrap(), "");
        c.check(5, 2, 12, 1000);
        assert_eq!(c.take_text(false).unwrap(), "");
        let finish = c.check(6, 3, 13, 1000);
        assert_eq!(finish.unwrap().reason, FinishReason::Stop);
        assert_eq!(c.take_text(true).unwrap(), "");
    }

    #[test]
    fn detokenizer_failure_finishes_with_error() {
        let mut c = checker(StopConditions::default());
        let finish = c.check(99, 1, 11, 1000).unwrap();
        assert_eq!(finish.reason, FinishReason::Error);
        assert!(finish.message.unwrap().contains("token 99"));
    }

    #[test]
    fn invalid_conditions_are_rejected_with_the_field() {
        let bad = |c: StopConditions| StopChecker::new(c, None).unwrap_err();
        assert_eq!(
            bad(StopConditions {
                max_tokens: Some(0),
                ..Default::default()
            }),
            StopConfigError::ZeroMaxTokens
        );
        assert!(matches!(
            bad(StopConditions {
                max_tokens: Some(2),
                min_tokens: 3,
                ..Default::default()
            }),
            StopConfigError::MinAboveMax { .. }
        ));
        assert_eq!(
            bad(StopConditions {
                stop_strings: vec!["x".into(), String::new()],
                ..Default::default()
            }),
            StopConfigError::EmptyStopString { index: 1 }
        );
        assert_eq!(
            bad(StopConditions {
                stop_strings: vec!["x".into()],
                ..Default::default()
            }),
            StopConfigError::StopStringsWithoutDetokenizer
        );
    }
}
