//! Chat formatting. The checkpoint's Jinja chat template is recognised by family (ChatML for
//! SmolLM2/Qwen2/LLaVA-OneVision, Llama 3 headers) and rendered natively; the video's tokens go at
//! the start of the user turn, as LLaVA-OneVision's processor places `<video>`.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChatTemplate {
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

impl ChatTemplate {
    pub fn detect(source: Option<&str>) -> Self {
        match source {
            Some(s) if s.contains("<|im_start|>") => ChatTemplate::ChatMl,
            Some(s) if s.contains("<|start_header_id|>") => ChatTemplate::Llama3,
            _ => ChatTemplate::Plain,
        }
    }

    /// Renders a single user turn (with an optional system message) and opens the assistant turn.
    pub fn render(&self, system: Option<&str>, user: &str) -> PromptText {
        match self {
            ChatTemplate::ChatMl => {
                let sys = system
                    .map(|s| format!("<|im_start|>system\n{s}<|im_end|>\n"))
                    .unwrap_or_default();
                PromptText {
                    before_video: format!("{sys}<|im_start|>user\n"),
                    after_video: format!("\n{user}<|im_end|>\n<|im_start|>assistant\n"),
                    stop: vec!["<|im_end|>".into()],
                }
            }
            ChatTemplate::Llama3 => {
                let sys = system
                    .map(|s| format!("<|start_header_id|>system<|end_header_id|>\n\n{s}<|eot_id|>"))
                    .unwrap_or_default();
                PromptText {
                    before_video: format!(
                        "<|begin_of_text|>{sys}<|start_header_id|>user<|end_header_id|>\n\n"
                    ),
                    after_video: format!(
                        "\n{user}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
                    ),
                    stop: vec!["<|eot_id|>".into()],
                }
            }
            ChatTemplate::Plain => PromptText {
                before_video: String::new(),
                after_video: format!("\n{user}\n"),
                stop: vec![],
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_and_renders_families() {
        let t = ChatTemplate::detect(Some("{% for m in messages %}<|im_start|>{{m.role}}..."));
        assert_eq!(t, ChatTemplate::ChatMl);
        let p = t.render(Some("Be brief."), "What happens?");
        assert_eq!(
            p.before_video,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
        );
        assert_eq!(
            p.after_video,
            "\nWhat happens?<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            ChatTemplate::detect(Some("<|start_header_id|>")),
            ChatTemplate::Llama3
        );
        assert_eq!(ChatTemplate::detect(None), ChatTemplate::Plain);
    }
}
