//! Constraints on what a sequence may write, applied to each step's logits before the choice:
//! one JSON object ([`crate::json_mode`]), one document valid against a JSON Schema
//! ([`crate::json_schema`]) or exactly one of a list of strings (vLLM's
//! `guided_choice`: the answer to a multiple-choice question, a label). A token the constraint
//! forbids gets logit −∞; a stop token is allowed only once the output is complete, and then
//! nothing else is (for choices, where one is a prefix of another, both stay open). Owns the
//! choice arithmetic and the dispatch; knows nothing of models beyond each token's bytes.

use crate::json_mode::{JsonConstraint, TokenBytes};
use std::sync::Arc;

/// The output must be exactly one of `choices` (bytes), token by token.
#[derive(Debug, Clone)]
pub struct ChoiceConstraint {
    choices: Arc<[Vec<u8>]>,
    written: Vec<u8>,
    tokens: Arc<TokenBytes>,
}

impl ChoiceConstraint {
    pub fn new(choices: &[String], tokens: Arc<TokenBytes>) -> Self {
        Self {
            choices: choices.iter().map(|c| c.as_bytes().to_vec()).collect(),
            written: vec![],
            tokens,
        }
    }

    /// The choices the output so far begins.
    fn live(&self) -> impl Iterator<Item = &[u8]> {
        self.choices
            .iter()
            .map(|c| c.as_slice())
            .filter(|c| c.starts_with(&self.written))
    }

    fn is_complete(&self) -> bool {
        self.live().any(|c| c.len() == self.written.len())
    }

    fn mask(&self, logits: &mut [f32], stop_ids: &[u32]) -> bool {
        let at = self.written.len();
        let rests: Vec<&[u8]> = self.live().map(|c| &c[at..]).collect();
        let mut first = [false; 256];
        for r in &rests {
            if let Some(&b) = r.first() {
                first[b as usize] = true;
            }
        }
        let done = self.is_complete();
        for (id, l) in logits.iter_mut().enumerate() {
            let t = if id < self.tokens.len() {
                self.tokens.get(id)
            } else {
                &[]
            };
            let ok = if stop_ids.contains(&(id as u32)) {
                done
            } else {
                t.first().is_some_and(|&b| first[b as usize])
                    && rests.iter().any(|r| r.starts_with(t))
            };
            if !ok {
                *l = f32::NEG_INFINITY;
            }
        }
        logits.iter().any(|&l| l > f32::NEG_INFINITY)
    }

    fn accept(&mut self, id: u32) {
        if (id as usize) < self.tokens.len() {
            self.written.extend_from_slice(self.tokens.get(id as usize));
        }
    }
}

/// What a sequence's output is held to.
#[derive(Debug, Clone)]
pub enum OutputConstraint {
    Json(JsonConstraint),
    /// Boxed: its prefix holds a frame per nesting level.
    Schema(Box<crate::json_schema::SchemaConstraint>),
    Choice(ChoiceConstraint),
}

impl OutputConstraint {
    /// Sets every logit the constraint forbids to −∞ (see the module doc); returns whether any
    /// token is left.
    pub fn mask(&self, logits: &mut [f32], stop_ids: &[u32]) -> bool {
        match self {
            OutputConstraint::Json(j) => j.mask(logits, stop_ids),
            OutputConstraint::Schema(j) => j.mask(logits, stop_ids),
            OutputConstraint::Choice(c) => c.mask(logits, stop_ids),
        }
    }

    /// Moves past a drawn token (one the mask allowed).
    pub fn accept(&mut self, id: u32) {
        match self {
            OutputConstraint::Json(j) => j.accept(id),
            OutputConstraint::Schema(j) => j.accept(id),
            OutputConstraint::Choice(c) => c.accept(id),
        }
    }

    pub fn is_complete(&self) -> bool {
        match self {
            OutputConstraint::Json(j) => j.is_complete(),
            OutputConstraint::Schema(j) => j.is_complete(),
            OutputConstraint::Choice(c) => c.is_complete(),
        }
    }
}

/// For the constraints' tests: a vocabulary of these token texts, and which of them `c` allows
/// next (stop id 0).
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    pub fn vocab(tokens: &[&str]) -> Arc<TokenBytes> {
        Arc::new(TokenBytes::new(
            tokens.iter().map(|t| t.as_bytes().to_vec()),
        ))
    }

    pub fn allowed<'a>(c: &OutputConstraint, tokens: &[&'a str]) -> Vec<&'a str> {
        let mut l = vec![0f32; tokens.len()];
        c.mask(&mut l, &[0]);
        (0..tokens.len())
            .filter(|&i| l[i] == 0.0)
            .map(|i| tokens[i])
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{allowed, vocab};
    use super::*;

    #[test]
    fn a_choice_is_written_token_by_token_and_stops_only_when_whole() {
        let words = ["<eos>", "re", "d", "dish", "blue", "r", "x", ""];
        let choices = ["red".to_string(), "reddish".into(), "blue".into()];
        let mut c = OutputConstraint::Choice(ChoiceConstraint::new(&choices, vocab(&words)));
        let allowed = |c: &OutputConstraint| allowed(c, &words);
        assert_eq!(allowed(&c), vec!["re", "blue", "r"]);
        c.accept(1);
        assert_eq!(allowed(&c), vec!["d"]);
        c.accept(2);
        // "red" is whole and "reddish" goes on: the stop, "d" and "dish".
        assert!(c.is_complete());
        assert_eq!(allowed(&c), vec!["<eos>", "d", "dish"]);
        c.accept(3);
        assert_eq!(allowed(&c), vec!["<eos>"]);
        // Nothing fits: no token left.
        let tokens = Arc::new(TokenBytes::new([b"<eos>".to_vec(), b"q".to_vec()]));
        let c = OutputConstraint::Choice(ChoiceConstraint::new(&["yes".into()], tokens));
        let mut l = vec![0f32; 2];
        assert!(!c.mask(&mut l, &[0]));
    }
}
