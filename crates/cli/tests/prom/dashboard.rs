//! The shipped Grafana dashboards as data: every panel's PromQL, the dashboard variables it may
//! use, and the metric names and grouping labels it mentions.
//!
//! Grafana's own variables are replaced as a fixed query would need them: `$__rate_interval` by a
//! window the caller chooses; dashboard variables by their `allValue` (query variables with
//! "All") or their current value (custom, constant, textbox). An expression that still holds a
//! `$` after that uses a variable this harness cannot evaluate, and is an error.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::Value;

/// One dashboard file.
pub struct Dashboard {
    /// File name (e.g. `overview.json`).
    pub file: String,
    /// The parsed JSON.
    pub json: Value,
}

/// One PromQL query of one panel.
#[derive(Debug, Clone)]
pub struct PanelQuery {
    /// Dashboard file name.
    pub dashboard: String,
    /// Panel title.
    pub panel: String,
    /// The target's `refId`.
    pub ref_id: String,
    /// The expression as written in the dashboard.
    pub expr: String,
}

impl std::fmt::Display for PanelQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} / {} / {}", self.dashboard, self.panel, self.ref_id)
    }
}

/// Every `*.json` directly in `dir`, sorted by name.
pub fn load_all(dir: &Path) -> Vec<Dashboard> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p)
                .unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
            let json = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not JSON: {e}", p.display()));
            Dashboard {
                file: p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                json,
            }
        })
        .collect()
}

/// The panels of a dashboard, rows' nested panels included (a collapsed row holds its panels).
pub fn panels(d: &Dashboard) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&d.json["panels"], &mut out);
    out
}

/// Every PromQL expression of every panel (rows carry none).
pub fn queries(d: &Dashboard) -> Vec<PanelQuery> {
    let mut out = Vec::new();
    for p in panels(d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(PanelQuery {
                dashboard: d.file.clone(),
                panel: p["title"].as_str().unwrap_or("(untitled)").to_string(),
                ref_id: t["refId"].as_str().unwrap_or("?").to_string(),
                expr: t["expr"].as_str().unwrap_or_default().to_string(),
            });
        }
    }
    out
}

/// The values the dashboard's own variables take in a fixed query (see the module docs); the
/// datasource variable is left out (queries never mention it).
pub fn variables(d: &Dashboard) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for v in d.json["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let name = v["name"].as_str().unwrap_or_default().to_string();
        let value = match v["type"].as_str() {
            Some("datasource") => continue,
            Some("query") if v["includeAll"] == true => v["allValue"].as_str(),
            Some("custom" | "constant" | "textbox") => {
                v["current"]["value"].as_str().or(v["query"].as_str())
            }
            other => {
                return Err(format!(
                    "{}: variable `{name}` of type {other:?} has no fixed value",
                    d.file
                ));
            }
        };
        let value = value.ok_or_else(|| format!("{}: variable `{name}` has no value", d.file))?;
        out.insert(name, value.to_string());
    }
    Ok(out)
}

/// `expr` with Grafana's and the dashboard's variables replaced (see the module docs).
pub fn expand(
    expr: &str,
    vars: &BTreeMap<String, String>,
    rate_window: &str,
) -> Result<String, String> {
    let mut out = expr
        .replace("${__rate_interval}", rate_window)
        .replace("$__rate_interval", rate_window);
    // Longest names first so that `$a` never eats the start of `$ab`.
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for name in names {
        out = out
            .replace(&format!("${{{name}}}"), &vars[name])
            .replace(&format!("${name}"), &vars[name]);
    }
    if out.contains('$') {
        return Err(format!("unknown variable left in `{out}`"));
    }
    Ok(out)
}

/// `expr` with each string literal (label values, regexes) replaced by `""`, so that names are
/// only found where PromQL reads them as names.
fn strip_strings(expr: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in expr.chars() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' && q != '`' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                    out.push_str("\"\"");
                }
            }
            None if matches!(c, '"' | '\'' | '`') => {
                quote = Some(c);
            }
            None => out.push(c),
        }
    }
    out
}

/// PromQL words that are neither metric names nor functions.
const KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
];

/// Keywords followed by a parenthesized label list.
const LIST_KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// One pass over `expr` without its string literals: the contents of `{…}` matchers, of
/// `by (…)`-style label lists and of `[…]` ranges, and what remains outside them.
struct Parts {
    /// The expression with matchers, label lists and ranges emptied.
    outside: String,
    /// Label names in matchers and label lists.
    labels: BTreeSet<String>,
}

fn is_word(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

fn split_parts(expr: &str) -> Parts {
    let text: Vec<char> = strip_strings(expr).chars().collect();
    let mut outside = String::with_capacity(text.len());
    let mut labels = BTreeSet::new();
    let mut i = 0;
    let mut last_word = String::new();
    while i < text.len() {
        let c = text[i];
        if is_word(c) {
            let start = i;
            while i < text.len() && is_word(text[i]) {
                i += 1;
            }
            last_word = text[start..i].iter().collect();
            outside.push_str(&last_word);
            continue;
        }
        let close = match c {
            '{' => Some('}'),
            '[' => Some(']'),
            '(' if LIST_KEYWORDS.contains(&last_word.as_str()) => Some(')'),
            _ => None,
        };
        if let Some(close) = close
            && let Some(len) = text[i + 1..].iter().position(|&x| x == close)
        {
            let inner: String = text[i + 1..i + 1 + len].iter().collect();
            let is_list = c != '('
                || inner
                    .chars()
                    .all(|x| is_word(x) || x == ',' || x.is_whitespace());
            if is_list {
                if c != '[' {
                    for item in inner.split(',') {
                        let name: String =
                            item.trim().chars().take_while(|&x| is_word(x)).collect();
                        if !name.is_empty() {
                            labels.insert(name);
                        }
                    }
                }
                outside.push(c);
                outside.push(close);
                i += len + 2;
                last_word.clear();
                continue;
            }
        }
        if !c.is_whitespace() {
            last_word.clear();
        }
        outside.push(c);
        i += 1;
    }
    Parts { outside, labels }
}

/// The metric names `expr` reads, as written (histogram series keep their `_bucket`/`_sum`/
/// `_count` suffix): every word outside strings, matchers, label lists and ranges that is not a
/// function or aggregation (followed by `(`), a keyword or a number.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let outside: Vec<char> = split_parts(expr).outside.chars().collect();
    let mut out = BTreeSet::new();
    let mut i = 0;
    while i < outside.len() {
        if !is_word(outside[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < outside.len() && is_word(outside[i]) {
            i += 1;
        }
        let word: String = outside[start..i].iter().collect();
        let rest: String = outside[i..].iter().collect();
        let rest = rest.trim_start();
        // A function or an aggregation: `f(`, `sum by (…) (`, `sum without (…) (`.
        let next_word: String = rest.chars().take_while(|&c| is_word(c)).collect();
        let call = rest.starts_with('(') || next_word == "by" || next_word == "without";
        let numeric = word.starts_with(|c: char| c.is_ascii_digit());
        if !call && !numeric && !KEYWORDS.contains(&word.to_ascii_lowercase().as_str()) {
            out.insert(word);
        }
    }
    out
}

/// The labels `expr` matches or groups on: names in `{…}` matchers and in `by (…)`,
/// `without (…)`, `on (…)`, `ignoring (…)`, `group_left (…)`, `group_right (…)` lists.
pub fn labels_used(expr: &str) -> BTreeSet<String> {
    split_parts(expr).labels
}

/// The contents of every `[…]` range of `expr` (outside strings).
pub fn ranges(expr: &str) -> Vec<String> {
    let text = strip_strings(expr);
    let mut out = Vec::new();
    let mut rest = text.as_str();
    while let Some(open) = rest.find('[') {
        let Some(len) = rest[open + 1..].find(']') else {
            break;
        };
        out.push(rest[open + 1..open + 1 + len].to_string());
        rest = &rest[open + 1 + len..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels_are_read_outside_string_literals() {
        let e = r#"histogram_quantile(0.99, sum by (le, instance) (rate(pdserve_a_seconds_bucket{role="pdserve_fake", le!=""}[1m]))) / on (instance) group_left sum by (instance) (rate(pdserve_b_total[$__rate_interval]) or up) + vector(0)"#;
        assert_eq!(
            metric_names(e).into_iter().collect::<Vec<_>>(),
            ["pdserve_a_seconds_bucket", "pdserve_b_total", "up"]
        );
        assert_eq!(
            labels_used(e).into_iter().collect::<Vec<_>>(),
            ["instance", "le", "role"]
        );
        assert_eq!(ranges(e), ["1m", "$__rate_interval"]);
    }

    #[test]
    fn aggregations_with_a_leading_or_trailing_label_list_are_not_names() {
        let e = "max without (expert) (a) / sum(b) by (job) + count by (x) (c offset 5m)";
        assert_eq!(
            metric_names(e).into_iter().collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        assert_eq!(
            labels_used(e).into_iter().collect::<Vec<_>>(),
            ["expert", "job", "x"]
        );
    }

    #[test]
    fn expansion_replaces_every_variable_or_fails() {
        let vars = BTreeMap::from([
            ("job".to_string(), ".+".to_string()),
            ("jobs".to_string(), "x".to_string()),
        ]);
        assert_eq!(
            expand(
                "rate(a{job=~\"$job\",k=\"${jobs}\"}[$__rate_interval])",
                &vars,
                "2m"
            ),
            Ok("rate(a{job=~\".+\",k=\"x\"}[2m])".to_string())
        );
        assert!(expand("rate(a[$__range])", &vars, "2m").is_err());
    }
}
