use super::*;
use pdserve_protocol::internal::TopToken;

/// A byte-level toy tokenizer: id < 256 is that byte; 300 is a special token (skipped).
struct Bytes;

impl TokenText for Bytes {
    fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids.iter().filter(|&&i| i < 256).map(|&i| i as u8).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
    fn token_text(&self, id: u32) -> (String, Vec<u8>) {
        let bytes = if id < 256 {
            vec![id as u8]
        } else {
            b"<s>".to_vec()
        };
        (String::from_utf8_lossy(&bytes).into_owned(), bytes)
    }
}

fn ids(s: &str) -> Vec<u32> {
    s.bytes().map(u32::from).collect()
}

/// Feeds `s` one token per push and returns the deltas' texts.
fn feed(a: &mut ChoiceAssembler, s: &str) -> Vec<String> {
    ids(s)
        .iter()
        .map(|&id| a.push(&Bytes, &[id], None, None).text)
        .collect()
}

#[test]
fn a_character_split_across_tokens_is_emitted_whole() {
    let mut d = IncrementalDetokenizer::new(&[]);
    let e = "é".as_bytes();
    assert_eq!(d.push(&Bytes, u32::from(e[0])), "");
    assert_eq!(d.push(&Bytes, u32::from(e[1])), "é");
    let snow = "☃".as_bytes();
    assert_eq!(d.push(&Bytes, u32::from(snow[0])), "");
    assert_eq!(d.push(&Bytes, u32::from(snow[1])), "");
    assert_eq!(d.push(&Bytes, u32::from(snow[2])), "☃");
    assert_eq!(d.push(&Bytes, u32::from(b'!')), "!");
}

#[test]
fn a_dangling_partial_character_is_flushed_lossily() {
    let mut d = IncrementalDetokenizer::new(&[]);
    assert_eq!(d.push(&Bytes, 0xE2), "");
    assert_eq!(d.flush(&Bytes), "\u{FFFD}");
}

#[test]
fn prompt_context_is_not_repeated() {
    let prompt = ids("Hello, wor");
    let mut d = IncrementalDetokenizer::new(&prompt);
    assert_eq!(d.push(&Bytes, u32::from(b'l')), "l");
    assert_eq!(d.push(&Bytes, u32::from(b'd')), "d");
}

#[test]
fn held_suffix_is_the_longest_possible_stop_start() {
    let m = StopMatcher::new(vec!["END".into(), "xyz".into()]);
    assert_eq!(m.held_suffix("abc EN"), 2);
    assert_eq!(m.held_suffix("abc E"), 1);
    assert_eq!(m.held_suffix("abc xy"), 2);
    assert_eq!(m.held_suffix("abc"), 0);
    assert_eq!(m.find("a END b xyz"), Some(2));
    let m = StopMatcher::new(vec!["é!".into()]);
    assert_eq!(m.held_suffix("caf\u{e9}"), 2);
}

#[test]
fn text_that_may_start_a_stop_string_is_held_back() {
    let mut a = ChoiceAssembler::new(&[], vec!["END".into()], 0, false);
    let out = feed(&mut a, "ab EN");
    assert_eq!(out, vec!["a", "b", " ", "", ""]);
    // "ENx" cannot be a stop string: everything held is released.
    let d = a.push(&Bytes, &ids("x"), None, None);
    assert_eq!(d.text, "ENx");
}

#[test]
fn a_stop_string_ends_the_choice_and_is_not_emitted() {
    let mut a = ChoiceAssembler::new(&[], vec!["END".into()], 0, false);
    let mut text = String::new();
    let mut finish = None;
    for id in ids("done. END trailing") {
        let d = a.push(&Bytes, &[id], None, None);
        text.push_str(&d.text);
        if d.finish_reason.is_some() {
            finish = d.finish_reason;
        }
    }
    assert_eq!(text, "done. ");
    assert_eq!(finish, Some(FinishReason::Stop));
    assert_eq!(
        a.completion_tokens(),
        9,
        "counted up to the token completing the stop string"
    );
}

#[test]
fn a_stop_string_inside_one_event_cuts_the_rest() {
    let mut a = ChoiceAssembler::new(&[], vec!["\n\n".into()], 0, false);
    let d = a.push(&Bytes, &ids("one\n\ntwo"), None, None);
    assert_eq!(d.text, "one");
    assert_eq!(d.finish_reason, Some(FinishReason::Stop));
    assert_eq!(a.completion_tokens(), 5);
    assert_eq!(a.push(&Bytes, &ids("more"), None, None), Delta::default());
}

#[test]
fn stop_strings_wait_for_min_tokens() {
    let mut a = ChoiceAssembler::new(&[], vec!["a".into()], 3, false);
    let d = a.push(&Bytes, &ids("aa"), None, None);
    assert_eq!(d.text, "aa");
    let d = a.push(&Bytes, &ids("ba"), None, None);
    assert_eq!(d.text, "b");
    assert_eq!(d.finish_reason, Some(FinishReason::Stop));
}

#[test]
fn decode_finish_flushes_held_text() {
    let mut a = ChoiceAssembler::new(&[], vec!["END".into()], 0, false);
    assert_eq!(a.push(&Bytes, &ids("x E"), None, None).text, "x ");
    let d = a.push(&Bytes, &ids("N"), None, Some(FinishReason::Length));
    assert_eq!(d.text, "EN");
    assert_eq!(d.finish_reason, Some(FinishReason::Length));
}

#[test]
fn finish_without_a_reason_infers_length_from_the_budget() {
    let mut a = ChoiceAssembler::new(&[], vec![], 0, false);
    a.push(&Bytes, &ids("abc"), None, None);
    assert_eq!(
        a.finish(&Bytes, 3).finish_reason,
        Some(FinishReason::Length)
    );
    let mut a = ChoiceAssembler::new(&[], vec![], 0, false);
    a.push(&Bytes, &ids("abc"), None, None);
    assert_eq!(a.finish(&Bytes, 10).finish_reason, Some(FinishReason::Stop));
}

#[test]
fn logprobs_follow_their_text_with_offsets() {
    let mut a = ChoiceAssembler::new(&[], vec!["zz".into()], 0, true);
    let lp = |l: f32| TokenLogprob {
        logprob: l,
        top_logprobs: vec![TopToken {
            id: u32::from(b'q'),
            logprob: l - 1.0,
        }],
    };
    let d = a.push(&Bytes, &ids("ab"), Some(&[lp(-0.1), lp(-0.2)]), None);
    assert_eq!(d.text, "ab");
    assert_eq!(d.logprobs.len(), 2);
    assert_eq!(d.logprobs[1].token, "b");
    assert_eq!(d.logprobs[1].text_offset, 1);
    assert_eq!(d.logprobs[1].top[0].0, "q");
    // "z" is held (could start "zz"): its logprob waits with it.
    let d = a.push(&Bytes, &ids("z"), Some(&[lp(-0.3)]), None);
    assert_eq!((d.text.as_str(), d.logprobs.len()), ("", 0));
    let d = a.push(&Bytes, &ids("c"), Some(&[lp(-0.4)]), None);
    assert_eq!(d.text, "zc");
    assert_eq!(
        d.logprobs.iter().map(|l| l.logprob).collect::<Vec<_>>(),
        vec![-0.3, -0.4]
    );
    // A special token has no text but still gets a logprob entry.
    let d = a.push(&Bytes, &[300], Some(&[lp(-0.5)]), Some(FinishReason::Stop));
    assert_eq!(d.logprobs.len(), 1);
    assert_eq!(d.logprobs[0].bytes, b"<s>".to_vec());
}
