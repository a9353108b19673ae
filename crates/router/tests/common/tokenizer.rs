//! A tiny byte-level BPE tokenizer with DeepSeek-V3's special tokens and chat template, written to a
//! temporary directory as `tokenizer.json` + `tokenizer_config.json` (so tests exercise loading).

use std::path::Path;

pub const BOS: &str = "<｜begin▁of▁sentence｜>";
pub const EOS: &str = "<｜end▁of▁sentence｜>";
pub const USER: &str = "<｜User｜>";
pub const ASSISTANT: &str = "<｜Assistant｜>";

/// DeepSeek-V3's chat template without the tool-call branches.
pub const CHAT_TEMPLATE: &str = concat!(
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}",
    "{% set ns = namespace(is_first=false, is_tool=false, system_prompt='', is_first_sp=true) %}",
    "{%- for message in messages %}{%- if message['role'] == 'system' %}",
    "{%- if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}",
    "{% set ns.is_first_sp = false %}",
    "{%- else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}",
    "{%- endif %}{%- endfor %}",
    "{{ bos_token }}{{ ns.system_prompt }}",
    "{%- for message in messages %}",
    "{%- if message['role'] == 'user' %}{{'<｜User｜>' + message['content']}}{%- endif %}",
    "{%- if message['role'] == 'assistant' %}{{'<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- endif %}",
    "{%- if message['role'] == 'tool' %}{{'<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}",
    "{%- endfor -%}",
    "{% if add_generation_prompt %}{{'<｜Assistant｜>'}}{% endif %}",
);

/// GPT-2's byte-level alphabet (byte → char).
fn byte_char(b: u8) -> char {
    let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    if printable {
        return char::from(b);
    }
    let rank = (0..b)
        .filter(|x| !((33..=126).contains(x) || (161..=172).contains(x) || *x >= 174))
        .count() as u32;
    char::from_u32(256 + rank).unwrap()
}

/// Writes the tokenizer files into `dir`. Vocabulary: 0..4 special tokens, then the 256 bytes,
/// then a few merges ("he", "ll", "llo", "Ġw").
pub fn write(dir: &Path) {
    let specials = [BOS, EOS, USER, ASSISTANT];
    let mut vocab = serde_json::Map::new();
    for (i, s) in specials.iter().enumerate() {
        vocab.insert(s.to_string(), serde_json::json!(i));
    }
    for b in 0..=255u8 {
        vocab.insert(
            byte_char(b).to_string(),
            serde_json::json!(4 + u32::from(b)),
        );
    }
    let merges = [("h", "e"), ("l", "l"), ("ll", "o"), ("Ġ", "w")];
    for (i, (a, b)) in merges.iter().enumerate() {
        vocab.insert(format!("{a}{b}"), serde_json::json!(260 + i));
    }
    let added: Vec<_> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({"id": i, "content": s, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": i < 2})
        })
        .collect();
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
        "trim_offsets": true, "use_regex": true});
    let tokenizer = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab,
            "merges": merges.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>(),
        }
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let config = serde_json::json!({
        "bos_token": {"content": BOS},
        "eos_token": EOS,
        "chat_template": CHAT_TEMPLATE,
    });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
}
