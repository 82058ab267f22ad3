//! Chat prompts from a model's own Jinja chat template (`tokenizer.chat_template`), rendered
//! with minijinja the way HF transformers renders it: entry points [`ChatTemplate::new`],
//! [`ChatTemplate::from_gguf`] and [`ChatTemplate::render`].
//!
//! As in transformers: `trim_blocks` and `lstrip_blocks` on, the context holds `messages`,
//! `add_generation_prompt`, `bos_token` and `eos_token`, `raise_exception(msg)` fails the
//! render, Python string/dict methods (`.strip()`, `.startswith()`, `.items()`, …) work
//! through minijinja-contrib's pycompat, and `tojson` writes Python's `json.dumps` layout
//! (`", "` / `": "` separators, non-ASCII kept, keys in insertion order).

use std::collections::HashMap;

use candle_core::quantized::gguf_file;
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{context, Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::tokenizer::gguf_specials;

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant` (any role the template knows).
    pub role: String,
    /// The turn's text.
    pub content: String,
}

impl ChatMessage {
    /// A message with `role` and `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template (cheap to share: `Send + Sync`, clone it or put it in an `Arc`).
#[derive(Clone)]
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

const NAME: &str = "chat_template";

fn template_error(e: minijinja::Error) -> Error {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    Error::ChatTemplate(msg)
}

fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// Python `json.dumps(v, ensure_ascii=False, indent=indent)` of a template value.
fn write_json(v: &Value, indent: Option<usize>, depth: usize, out: &mut String) -> Result<()> {
    let json = |e: serde_json::Error| Error::ChatTemplate(format!("tojson: {e}"));
    let (open, close, is_map) = match v.kind() {
        ValueKind::Undefined | ValueKind::None => {
            out.push_str("null");
            return Ok(());
        }
        ValueKind::Bool => {
            out.push_str(if v.is_true() { "true" } else { "false" });
            return Ok(());
        }
        ValueKind::Number => {
            out.push_str(&v.to_string());
            return Ok(());
        }
        ValueKind::Map => ('{', '}', true),
        ValueKind::Seq | ValueKind::Iterable => ('[', ']', false),
        _ => {
            let s = v
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string());
            out.push_str(&serde_json::to_string(&s).map_err(json)?);
            return Ok(());
        }
    };
    let items: Vec<Value> = v.try_iter().map_err(template_error)?.collect();
    out.push(open);
    let newline = |out: &mut String, d: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * d));
        }
    };
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(if indent.is_some() { "," } else { ", " });
        }
        newline(out, depth + 1);
        if is_map {
            write_json(item, indent, depth + 1, out)?;
            out.push_str(": ");
            let val = v.get_item(item).map_err(template_error)?;
            write_json(&val, indent, depth + 1, out)?;
        } else {
            write_json(item, indent, depth + 1, out)?;
        }
    }
    if !items.is_empty() {
        newline(out, depth);
    }
    out.push(close);
    Ok(())
}

fn tojson(v: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&v, indent, 0, &mut out)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(Value::from_safe_string(out))
}

impl ChatTemplate {
    /// Compile `source` (a HF/GGUF `chat_template`); `bos_token`/`eos_token` are the texts
    /// the template sees under those names. Syntax errors are [`Error::ChatTemplate`].
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_string())
            .map_err(template_error)?;
        Ok(Self {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// The template of a GGUF file (`tokenizer.chat_template`) with its BOS/EOS texts, or
    /// `None` when the file has no template (the caller decides what to do then).
    pub fn from_gguf(md: &HashMap<String, gguf_file::Value>) -> Result<Option<Self>> {
        let key = "tokenizer.chat_template";
        let source = match md.get(key) {
            None => return Ok(None),
            Some(gguf_file::Value::String(s)) => s,
            Some(v) => {
                return Err(Error::GgufMetadata {
                    key: key.to_string(),
                    msg: format!("expected a string, got {:?}", v.value_type()),
                })
            }
        };
        let sp = gguf_specials(md)?;
        let text =
            |t: Option<crate::tokenizer::SpecialToken>| t.map(|t| t.text).unwrap_or_default();
        Self::new(source, &text(sp.bos), &text(sp.eos)).map(Some)
    }

    /// Render `messages` into the prompt text; `add_generation_prompt` appends the opening
    /// of an assistant turn. Template errors and `raise_exception` are [`Error::ChatTemplate`].
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self.env.get_template(NAME).map_err(template_error)?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        })
        .map_err(template_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_renders_like_transformers() {
        let t = ChatTemplate::new(CHATML, "<|im_start|>", "<|im_end|>").unwrap();
        let msgs = [ChatMessage::new("user", "Hi")];
        assert_eq!(
            t.render(&msgs, true).unwrap(),
            "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let msgs = [
            ChatMessage::new("system", "S"),
            ChatMessage::new("user", "U"),
        ];
        assert_eq!(
            t.render(&msgs, false).unwrap(),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
        );
    }

    #[test]
    fn blocks_are_trimmed_and_python_methods_work() {
        let src = "{{ bos_token }}\n{% for m in messages %}\n  {% if m.role == 'user' %}\n[{{ m.content.strip() }}]{{ m.role.upper() }}\n  {% endif %}\n{% endfor %}";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        let out = t
            .render(&[ChatMessage::new("user", "  x \n")], false)
            .unwrap();
        assert_eq!(out, "<s>\n[x]USER\n");
    }

    #[test]
    fn loop_controls_namespace_and_dict_methods_work() {
        let src = "{%- set ns = namespace(n=0) -%}{%- for m in messages -%}{%- if m['role'] == 'system' %}{% continue %}{% endif -%}{%- set ns.n = ns.n + 1 -%}{%- for k, v in m.items() %}{{ k }}={{ v }};{% endfor -%}{%- if loop.index0 >= 2 %}{% break %}{% endif -%}{%- endfor -%}|{{ ns.n }}{{ eos_token if messages[-1].content.startswith('b') }}";
        let t = ChatTemplate::new(src, "", "</s>").unwrap();
        let msgs = [
            ChatMessage::new("system", "s"),
            ChatMessage::new("user", "a"),
            ChatMessage::new("assistant", "b"),
            ChatMessage::new("user", "c"),
        ];
        let out = t.render(&msgs[..3], false).unwrap();
        assert_eq!(out, "role=user;content=a;role=assistant;content=b;|2</s>");
        assert_eq!(
            t.render(&msgs, false).unwrap(),
            "role=user;content=a;role=assistant;content=b;|2"
        );
    }

    #[test]
    fn raise_exception_and_syntax_errors_are_typed() {
        let t = ChatTemplate::new("{{ raise_exception('only user turns') }}", "", "").unwrap();
        let e = t.render(&[], false).unwrap_err();
        assert!(
            matches!(&e, Error::ChatTemplate(m) if m.contains("only user turns")),
            "{e}"
        );
        let e = ChatTemplate::new("{% for %}", "", "").unwrap_err();
        assert!(matches!(e, Error::ChatTemplate(_)), "{e}");
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t = ChatTemplate::new(
            "{{ messages[0] | tojson }}|{{ [1, 'é\"', none] | tojson }}",
            "",
            "",
        )
        .unwrap();
        let out = t
            .render(&[ChatMessage::new("user", "a<b>")], false)
            .unwrap();
        assert_eq!(
            out,
            r#"{"role": "user", "content": "a<b>"}|[1, "é\"", null]"#
        );
        let t = ChatTemplate::new("{{ [{'a': 1}, []] | tojson(indent=2) }}", "", "").unwrap();
        let out = t.render(&[], false).unwrap();
        assert_eq!(out, "[\n  {\n    \"a\": 1\n  },\n  []\n]");
    }
}
