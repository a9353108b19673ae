//! Chat templates: the Hugging Face `chat_template` (Jinja) from `tokenizer_config.json`, rendered
//! with minijinja (plus Python-compatible string methods such as `.split` and `.strip`).
//!
//! The template sees `messages` (each `{role, content}` plus `name`/`tool_call_id` when set; the
//! `developer` role is presented as `system`), `add_generation_prompt = true`, `bos_token`,
//! `eos_token`, and a `raise_exception(msg)` function whose message becomes a 400 naming
//! `messages`. DeepSeek-V3's template renders
//! `<｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>{assistant}<｜end▁of▁sentence｜>…<｜Assistant｜>`.

use minijinja::value::Serde;
use minijinja::{Environment, ErrorKind as JinjaErrorKind, Value, context};
use pdserve_protocol::ApiError;
use pdserve_protocol::params::ChatTurn;
use serde::Serialize;

const TEMPLATE_NAME: &str = "chat";

/// A compiled chat template and its special tokens.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct TemplateMessage<'a> {
    role: &'static str,
    content: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<&'a str>,
}

impl ChatTemplate {
    /// Compiles `source`; the error text names the template problem.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate, String> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(JinjaErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| format!("chat template does not compile: {e:#}"))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// Renders the conversation followed by the assistant generation prompt.
    pub fn render(&self, messages: &[ChatTurn]) -> Result<String, ApiError> {
        let messages: Vec<TemplateMessage<'_>> = messages
            .iter()
            .map(|m| TemplateMessage {
                role: m.role.template_name(),
                content: &m.content,
                name: m.name.as_deref(),
                tool_call_id: m.tool_call_id.as_deref(),
            })
            .collect();
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ApiError::internal(format!("chat template missing: {e}")))?;
        template
            .render(context! {
                messages => Value::from(Serde(&messages)),
                add_generation_prompt => true,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| match e.kind() {
                JinjaErrorKind::InvalidOperation => ApiError::invalid_param(
                    "messages",
                    format!(
                        "the chat template rejected the conversation: {}",
                        e.detail().unwrap_or("invalid conversation")
                    ),
                ),
                _ => ApiError::internal(format!("chat template failed: {e:#}")),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pdserve_protocol::params::Role;

    /// DeepSeek-V3's chat template, reduced to the parts without tool calls.
    pub(crate) const DEEPSEEK_V3_TEMPLATE: &str = concat!(
        "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}",
        "{% set ns = namespace(is_first=false, is_tool=false, system_prompt='', is_first_sp=true) %}",
        "{%- for message in messages %}{%- if message['role'] == 'system' %}",
        "{%- if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}",
        "{% set ns.is_first_sp = false %}",
        "{%- else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}",
        "{%- endif %}{%- endfor %}",
        "{{ bos_token }}{{ ns.system_prompt }}",
        "{%- for message in messages %}",
        "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}",
        "{%- if message['role'] == 'assistant' %}",
        "{% set content = message['content'] %}{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}",
        "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}",
        "{%- if message['role'] == 'tool' %}{{'<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}",
        "{%- endfor -%}",
        "{% if add_generation_prompt %}{{'<｜Assistant｜>'}}{% endif %}",
    );

    fn turn(role: Role, content: &str) -> ChatTurn {
        ChatTurn {
            role,
            content: content.into(),
            name: None,
            tool_call_id: None,
        }
    }

    #[test]
    fn deepseek_v3_layout() {
        let t = ChatTemplate::new(
            DEEPSEEK_V3_TEMPLATE,
            "<｜begin▁of▁sentence｜>",
            "<｜end▁of▁sentence｜>",
        )
        .unwrap();
        let text = t
            .render(&[
                turn(Role::Developer, "Be brief."),
                turn(Role::User, "Hi"),
                turn(Role::Assistant, "<think>hmm</think>Hello"),
                turn(Role::User, "Again"),
            ])
            .unwrap();
        assert_eq!(
            text,
            "<｜begin▁of▁sentence｜>Be brief.<｜User｜>Hi<｜Assistant｜>Hello<｜end▁of▁sentence｜>\
             <｜User｜>Again<｜Assistant｜>"
        );
    }

    #[test]
    fn raise_exception_becomes_a_400_on_messages() {
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}x",
            "",
            "",
        )
        .unwrap();
        let e = t.render(&[turn(Role::Assistant, "a")]).unwrap_err();
        assert_eq!(e.status(), 400);
        assert_eq!(e.param.as_deref(), Some("messages"));
        assert!(
            e.message.contains("first message must be from the user"),
            "{}",
            e.message
        );
    }

    #[test]
    fn a_broken_template_is_reported_at_load() {
        assert!(ChatTemplate::new("{% if %}", "", "").is_err());
    }
}
