//! Chat formatting. A checkpoint's own Jinja chat template (`tokenizer_config.json`'s
//! `chat_template`, or a GGUF's `tokenizer.chat_template`) is rendered with minijinja, as
//! transformers' `apply_chat_template` renders it, a whole conversation included (earlier user
//! and assistant messages); the video's tokens go at the start of the first user message, as
//! LLaVA-OneVision's processor places `<video>`. A checkpoint without a template, or
//! whose template does not compile or render, is formatted by the built-in path for its family
//! (ChatML, Llama 3 headers, or the plain prompt).

use serde::Serialize;

/// The family of a template: decides the built-in format and the end-of-turn stop string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TemplateFamily {
    /// `<|im_start|>role\n...<|im_end|>\n`
    ChatMl,
    /// `<|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|>`
    Llama3,
    /// The prompt as is (for base models and tiny test checkpoints).
    Plain,
}

/// A prompt split around the place the video's tokens go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptText {
    pub before_video: String,
    pub after_video: String,
    /// Strings that end generation besides the tokenizer's EOS.
    pub stop: Vec<String>,
}

/// Marks where the video goes in the rendered user turn; split out after rendering.
const VIDEO_MARK: &str = "\u{1}vvlm-video\u{1}";

/// Who wrote an earlier message of a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// An earlier message of a conversation (before the last user message, which is the prompt).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub role: Role,
    pub content: String,
}

/// A checkpoint's chat template.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    family: TemplateFamily,
    jinja: Option<Jinja>,
}

#[derive(Debug, Clone)]
struct Jinja {
    env: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// The built-in format of a family.
    pub fn builtin(family: TemplateFamily) -> Self {
        Self {
            family,
            jinja: None,
        }
    }

    /// From a checkpoint's Jinja source (None: the plain prompt). `bos_token` and `eos_token` are
    /// the strings the template may reference. A template that does not compile is reported in
    /// the error and the built-in format of its family is used.
    pub fn from_source(
        source: Option<&str>,
        bos_token: &str,
        eos_token: &str,
    ) -> (Self, Option<String>) {
        let family = Self::family_of(source);
        let Some(src) = source else {
            return (Self::builtin(family), None);
        };
        let mut env = minijinja::Environment::new();
        // Python string methods (`.strip()`, `.startswith()`, ...) as transformers' sandbox has.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        match env.add_template_owned("chat", src.to_string()) {
            Ok(()) => (
                Self {
                    family,
                    jinja: Some(Jinja {
                        env,
                        bos_token: bos_token.to_string(),
                        eos_token: eos_token.to_string(),
                    }),
                },
                None,
            ),
            Err(e) => (
                Self::builtin(family),
                Some(format!(
                    "the chat template does not compile ({e}); using the built-in {family:?} format"
                )),
            ),
        }
    }

    /// Recognises the family of a template by its markers.
    pub fn family_of(source: Option<&str>) -> TemplateFamily {
        match source {
            Some(s) if s.contains("<|im_start|>") => TemplateFamily::ChatMl,
            Some(s) if s.contains("<|start_header_id|>") => TemplateFamily::Llama3,
            _ => TemplateFamily::Plain,
        }
    }

    pub fn family(&self) -> TemplateFamily {
        self.family
    }

    /// True when the checkpoint's own template renders prompts.
    pub fn is_checkpoint_template(&self) -> bool {
        self.jinja.is_some()
    }

    /// Renders a single user turn (with an optional system message) and opens the assistant
    /// turn: the checkpoint's template where it renders, else the family's built-in format.
    pub fn render(&self, system: Option<&str>, user: &str) -> PromptText {
        self.render_conversation(system, &[], user)
    }

    /// Renders a conversation: the system message, the earlier messages (`history`, in order),
    /// the last user message, then opens the assistant turn. The video's tokens go at the start
    /// of the first user message (the history's first, else `user`), so every turn of a
    /// conversation about one video shares the text before it.
    pub fn render_conversation(
        &self,
        system: Option<&str>,
        history: &[Turn],
        user: &str,
    ) -> PromptText {
        let mut messages: Vec<(&str, String)> = history
            .iter()
            .map(|t| (t.role.as_str(), t.content.clone()))
            .chain(std::iter::once(("user", user.to_string())))
            .collect();
        let first_user = messages
            .iter_mut()
            .find(|(role, _)| *role == "user")
            .expect("the last message is the user's");
        first_user.1 = format!("{VIDEO_MARK}\n{}", first_user.1);
        if let Some(j) = &self.jinja {
            match self.render_jinja(j, system, &messages) {
                Ok(p) => return p,
                Err(e) => tracing::warn!("chat template: {e}; using the built-in format"),
            }
        }
        self.render_builtin(system, &messages)
    }

    fn render_jinja(
        &self,
        j: &Jinja,
        system: Option<&str>,
        turns: &[(&str, String)],
    ) -> Result<PromptText, String> {
        let mut messages = vec![];
        if let Some(s) = system {
            messages.push(minijinja::context! { role => "system", content => s });
        }
        for (role, content) in turns {
            messages.push(minijinja::context! { role => role, content => content });
        }
        let text = j
            .env
            .get_template("chat")
            .and_then(|t| {
                t.render(minijinja::context! {
                    messages => messages,
                    add_generation_prompt => true,
                    bos_token => j.bos_token,
                    eos_token => j.eos_token,
                })
            })
            .map_err(|e| e.to_string())?;
        let (before, after) = text
            .split_once(VIDEO_MARK)
            .ok_or("the template dropped the user's content")?;
        Ok(PromptText {
            before_video: before.to_string(),
            after_video: after.to_string(),
            stop: self.stop(),
        })
    }

    fn stop(&self) -> Vec<String> {
        match self.family {
            TemplateFamily::ChatMl => vec!["<|im_end|>".into()],
            TemplateFamily::Llama3 => vec!["<|eot_id|>".into()],
            TemplateFamily::Plain => vec![],
        }
    }

    fn render_builtin(&self, system: Option<&str>, turns: &[(&str, String)]) -> PromptText {
        let text = match self.family {
            TemplateFamily::ChatMl => {
                let mut t = system
                    .map(|s| format!("<|im_start|>system\n{s}<|im_end|>\n"))
                    .unwrap_or_default();
                for (role, content) in turns {
                    t += &format!("<|im_start|>{role}\n{content}<|im_end|>\n");
                }
                t + "<|im_start|>assistant\n"
            }
            TemplateFamily::Llama3 => {
                let mut t = "<|begin_of_text|>".to_string();
                if let Some(s) = system {
                    t += &format!("<|start_header_id|>system<|end_header_id|>\n\n{s}<|eot_id|>");
                }
                for (role, content) in turns {
                    t += &format!(
                        "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>"
                    );
                }
                t + "<|start_header_id|>assistant<|end_header_id|>\n\n"
            }
            // The messages as they are, one a line (no system message: a base model's prompt).
            TemplateFamily::Plain => turns.iter().map(|(_, c)| format!("{c}\n")).collect(),
        };
        let (before_video, after_video) = text
            .split_once(VIDEO_MARK)
            .expect("the built-in formats keep the user's content");
        PromptText {
            before_video: before_video.to_string(),
            after_video: after_video.to_string(),
            stop: self.stop(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M-Instruct's template as its GGUF carries it (`tokenizer.chat_template`).
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    #[test]
    fn renders_the_checkpoints_own_template() {
        let (t, err) = ChatTemplate::from_source(Some(SMOLLM2), "<|im_start|>", "<|im_end|>");
        assert!(err.is_none() && t.is_checkpoint_template());
        assert_eq!(t.family(), TemplateFamily::ChatMl);
        // Without a system message the template adds its own (the hand path did not).
        let p = t.render(None, "What happens?");
        assert_eq!(
            p.before_video,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n"
        );
        assert_eq!(
            p.after_video,
            "\nWhat happens?<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(p.stop, vec!["<|im_end|>".to_string()]);
        let p = t.render(Some("Be brief."), "Why?");
        assert_eq!(
            p.before_video,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
        );
    }

    #[test]
    fn python_methods_bos_and_raise_exception() {
        // The shapes Llama 3's template uses: bos_token, `.strip()`, raise_exception.
        let src = "{{- bos_token }}{%- for m in messages %}{%- if m['role'] == 'assistant' %}{{ raise_exception('no assistant turns') }}{%- endif %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}";
        let (t, err) = ChatTemplate::from_source(Some(src), "<|begin_of_text|>", "<|eot_id|>");
        assert!(err.is_none());
        assert_eq!(t.family(), TemplateFamily::Llama3);
        let p = t.render(Some("  Be brief. "), "Q?");
        assert_eq!(
            p.before_video,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        );
        assert_eq!(
            p.after_video,
            "\nQ?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        let strip = "{% for m in messages %}{{ m['content'].strip() }}|{% endfor %}";
        let (t, err) = ChatTemplate::from_source(Some(strip), "", "");
        assert!(err.is_none());
        assert_eq!(t.render(Some("  s  "), "u").before_video, "s|");
    }

    #[test]
    fn broken_templates_fall_back_to_the_family_format() {
        let (t, err) = ChatTemplate::from_source(Some("<|im_start|>{% for %}"), "", "");
        assert!(err.unwrap().contains("does not compile"));
        assert!(!t.is_checkpoint_template());
        let p = t.render(Some("Be brief."), "What happens?");
        assert_eq!(
            p.before_video,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
        );
        // A template that raises at render time: the built-in format, not an error.
        let raising = "<|im_start|>{{ raise_exception('nope') }}";
        let (t, err) = ChatTemplate::from_source(Some(raising), "", "");
        assert!(err.is_none());
        assert_eq!(
            t.render(None, "Q").after_video,
            "\nQ<|im_end|>\n<|im_start|>assistant\n"
        );
        let (t, _) = ChatTemplate::from_source(None, "", "");
        assert_eq!(t.family(), TemplateFamily::Plain);
        assert_eq!(t.render(None, "Q").after_video, "\nQ\n");
        assert_eq!(
            ChatTemplate::family_of(Some("<|start_header_id|>")),
            TemplateFamily::Llama3
        );
    }

    fn history() -> Vec<Turn> {
        vec![
            Turn {
                role: Role::User,
                content: "What moves?".into(),
            },
            Turn {
                role: Role::Assistant,
                content: "A red square.".into(),
            },
        ]
    }

    #[test]
    fn conversations_render_every_turn_with_the_video_in_the_first_user_message() {
        // The checkpoint's own template (SmolLM2's), and the built-in formats.
        let (t, _) = ChatTemplate::from_source(Some(SMOLLM2), "<|im_start|>", "<|im_end|>");
        let p = t.render_conversation(Some("Be brief."), &history(), "Which way?");
        assert_eq!(
            p.before_video,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
        );
        assert_eq!(
            p.after_video,
            "\nWhat moves?<|im_end|>\n<|im_start|>assistant\nA red square.<|im_end|>\n<|im_start|>user\nWhich way?<|im_end|>\n<|im_start|>assistant\n"
        );
        // Every turn of a conversation shares the text before the video with the first turn.
        assert_eq!(
            p.before_video,
            t.render(Some("Be brief."), "What moves?").before_video
        );
        let p = ChatTemplate::builtin(TemplateFamily::ChatMl).render_conversation(
            None,
            &history(),
            "Which way?",
        );
        assert_eq!(p.before_video, "<|im_start|>user\n");
        assert_eq!(
            p.after_video,
            "\nWhat moves?<|im_end|>\n<|im_start|>assistant\nA red square.<|im_end|>\n<|im_start|>user\nWhich way?<|im_end|>\n<|im_start|>assistant\n"
        );
        let p = ChatTemplate::builtin(TemplateFamily::Llama3).render_conversation(
            Some("S"),
            &history(),
            "Which way?",
        );
        assert_eq!(
            p.before_video,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        );
        assert_eq!(
            p.after_video,
            "\nWhat moves?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA red square.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhich way?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        let p = ChatTemplate::builtin(TemplateFamily::Plain).render_conversation(
            Some("ignored"),
            &history(),
            "Which way?",
        );
        assert_eq!(
            (p.before_video.as_str(), p.after_video.as_str()),
            ("", "\nWhat moves?\nA red square.\nWhich way?\n")
        );
        // Without a user message before it, the video goes in the last one.
        let p = ChatTemplate::builtin(TemplateFamily::ChatMl).render_conversation(
            None,
            &history()[1..],
            "Which way?",
        );
        assert_eq!(
            p.before_video,
            "<|im_start|>assistant\nA red square.<|im_end|>\n<|im_start|>user\n"
        );
    }
}
