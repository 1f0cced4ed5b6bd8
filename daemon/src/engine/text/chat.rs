//! Chat templates: the Jinja template a model ships in
//! `tokenizer_config.json`, rendered with minijinja the way transformers'
//! `apply_chat_template(..., add_generation_prompt=True)` does.

use std::path::Path;

use minijinja::{context, Environment, Error, ErrorKind};
use modeld_wire::types::ChatMessage;
use serde_json::Value;

use super::EngineError;

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

/// A special token is written either as a string or as `{"content": ...}`.
fn token_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Object(map) => map
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// The model's template, if `tokenizer_config.json` has one.
    pub fn read(dir: &Path) -> Result<Option<Self>, EngineError> {
        let path = dir.join("tokenizer_config.json");
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(None);
        };
        let config: Value =
            serde_json::from_str(&text).map_err(|e| super::BadFile::new(&path, e))?;
        let source = match &config["chat_template"] {
            Value::String(template) => template.clone(),
            // A list of named templates: the one called "default".
            Value::Array(items) => items
                .iter()
                .find(|item| item["name"] == "default")
                .and_then(|item| item["template"].as_str())
                .map(str::to_string)
                .unwrap_or_default(),
            _ => return Ok(None),
        };
        if source.is_empty() {
            return Ok(None);
        }
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned("chat", source)
            .map_err(|e| EngineError::Files(format!("chat template: {e}")))?;
        Ok(Some(ChatTemplate {
            env,
            bos_token: token_text(&config["bos_token"]),
            eos_token: token_text(&config["eos_token"]),
        }))
    }

    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| EngineError::Template(e.to_string()))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(|e| EngineError::Template(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_chatml_template() {
        let dir = tempfile::tempdir().unwrap();
        let template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let config =
            serde_json::json!({"chat_template": template, "eos_token": {"content": "<|im_end|>"}});
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        let chat = ChatTemplate::read(dir.path()).unwrap().unwrap();
        let text = chat
            .render(&[ChatMessage {
                role: "user".into(),
                content: " hi ".into(),
            }])
            .unwrap();
        assert_eq!(
            text,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(chat.eos_token, "<|im_end|>");
    }

    #[test]
    fn no_template_is_none() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer_config.json"), "{}").unwrap();
        assert!(ChatTemplate::read(dir.path()).unwrap().is_none());
    }

    /// Gemma's and Phi-3's templates (as their tokenizer_config files
    /// spell them) render as transformers' `apply_chat_template` does.
    #[test]
    fn gemma_and_phi3_templates_render_as_transformers() {
        let gemma = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}";
        let phi3 = "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}";
        let message = |role: &str, content: &str| ChatMessage {
            role: role.into(),
            content: content.into(),
        };
        let messages = [
            message("user", " Hi there \n"),
            message("assistant", "Hello."),
            message("user", "Load a model"),
        ];
        // transformers 5.23's output for the same templates and messages.
        let cases = [
            (gemma, "<bos>", "<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n<start_of_turn>user\nLoad a model<end_of_turn>\n<start_of_turn>model\n"),
            (phi3, "<s>", "<|user|>\n Hi there \n<|end|>\n<|assistant|>\nHello.<|end|>\n<|user|>\nLoad a model<|end|>\n<|assistant|>\n"),
        ];
        for (template, bos, expected) in cases {
            let dir = tempfile::tempdir().unwrap();
            let config = serde_json::json!({"chat_template": template, "bos_token": bos});
            std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
            let chat = ChatTemplate::read(dir.path()).unwrap().unwrap();
            assert_eq!(chat.render(&messages).unwrap(), expected);
            if template == gemma {
                let err = chat.render(&[message("system", "x")]).unwrap_err();
                assert!(err.to_string().contains("System role"), "{err}");
            }
        }
    }
}
