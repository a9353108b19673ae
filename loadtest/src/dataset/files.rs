//! Readers for workload files: ShareGPT JSON and Mooncake JSONL traces.
//!
//! Invariants: every error names the file and, for JSONL, the 1-based line; a file yielding no
//! usable entry is an error, never an empty run.

use super::DatasetError;
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// One conversation reduced to what a benchmark needs: the first turn as the prompt and the
/// second turn's text (whose length sets the output length unless fixed).
#[derive(Debug, Clone, PartialEq)]
pub struct Conversation {
    /// The first turn.
    pub prompt: String,
    /// The second turn.
    pub completion: String,
}

fn turn_text(turn: &Value) -> Option<String> {
    turn.get("value")
        .or_else(|| turn.get("content"))
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// Reads a ShareGPT-format file: a JSON array of objects whose `conversations` (or
/// `conversation`) array holds turns `{"from": …, "value": …}` (or `{"role", "content"}`).
/// Entries with fewer than two turns are skipped, as in vLLM.
pub fn read_sharegpt(path: &Path) -> Result<Vec<Conversation>, DatasetError> {
    let bytes = std::fs::read(path).map_err(|source| DatasetError::Io {
        path: path.to_owned(),
        source,
    })?;
    let root: Value = serde_json::from_slice(&bytes).map_err(|e| DatasetError::Parse {
        path: path.to_owned(),
        line: None,
        message: e.to_string(),
    })?;
    let entries = root.as_array().ok_or_else(|| DatasetError::Parse {
        path: path.to_owned(),
        line: None,
        message: "expected a JSON array of conversations".into(),
    })?;
    let convs: Vec<Conversation> = entries
        .iter()
        .filter_map(|e| {
            let turns = e
                .get("conversations")
                .or_else(|| e.get("conversation"))?
                .as_array()?;
            match turns.as_slice() {
                [first, second, ..] => Some(Conversation {
                    prompt: turn_text(first)?,
                    completion: turn_text(second)?,
                }),
                _ => None,
            }
        })
        .collect();
    if convs.is_empty() {
        return Err(DatasetError::Empty {
            path: path.to_owned(),
            what: "conversations with two turns",
        });
    }
    Ok(convs)
}

/// One line of a Mooncake trace.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MooncakeEntry {
    /// Arrival time, milliseconds (any origin).
    pub timestamp: f64,
    /// Prompt tokens.
    pub input_length: u64,
    /// Output tokens.
    pub output_length: u64,
    /// Hashes of the prompt's consecutive blocks (equal ids = equal block contents).
    #[serde(default)]
    pub hash_ids: Vec<u64>,
}

/// Reads a Mooncake JSONL trace (`timestamp`, `input_length`, `output_length`, `hash_ids`), sorted
/// by timestamp (stable, so equal timestamps keep file order). Blank lines are skipped.
pub fn read_mooncake(path: &Path) -> Result<Vec<MooncakeEntry>, DatasetError> {
    let text = std::fs::read_to_string(path).map_err(|source| DatasetError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let entry: MooncakeEntry = serde_json::from_str(line).map_err(|e| DatasetError::Parse {
            path: path.to_owned(),
            line: Some(i + 1),
            message: e.to_string(),
        })?;
        if !entry.timestamp.is_finite() {
            return Err(DatasetError::Parse {
                path: path.to_owned(),
                line: Some(i + 1),
                message: "timestamp is not a finite number".into(),
            });
        }
        entries.push(entry);
    }
    if entries.is_empty() {
        return Err(DatasetError::Empty {
            path: path.to_owned(),
            what: "trace lines",
        });
    }
    entries.sort_by(|a, b| a.timestamp.total_cmp(&b.timestamp));
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(contents: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(contents.as_bytes()).unwrap();
        f
    }

    #[test]
    fn sharegpt_takes_first_two_turns_and_skips_short_conversations() {
        let f = file(
            r#"[{"id":"a","conversations":[{"from":"human","value":"hi"},{"from":"gpt","value":"hello"},{"from":"human","value":"x"}]},
                {"id":"b","conversations":[{"from":"human","value":"alone"}]},
                {"id":"c","conversation":[{"role":"user","content":"q"},{"role":"assistant","content":"r"}]}]"#,
        );
        let c = read_sharegpt(f.path()).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(
            c[0],
            Conversation {
                prompt: "hi".into(),
                completion: "hello".into()
            }
        );
        assert_eq!(c[1].prompt, "q");
    }

    #[test]
    fn mooncake_is_sorted_and_errors_name_the_line() {
        let f = file(
            "{\"timestamp\": 20, \"input_length\": 10, \"output_length\": 2, \"hash_ids\": [1]}\n\n{\"timestamp\": 5, \"input_length\": 600, \"output_length\": 3, \"hash_ids\": [1, 2]}\n",
        );
        let e = read_mooncake(f.path()).unwrap();
        assert_eq!(
            e.iter().map(|x| x.timestamp).collect::<Vec<_>>(),
            vec![5.0, 20.0]
        );
        let bad = file(
            "{\"timestamp\": 1, \"input_length\": 1, \"output_length\": 1}\n{\"timestamp\": \"x\"}\n",
        );
        let err = read_mooncake(bad.path()).unwrap_err().to_string();
        assert!(err.contains(":2"), "{err}");
    }
}
