//! Questions, answers and captions of a scene, and the caption scorer.

use crate::scene::{Scene, BACKGROUNDS, COLOURS, DIRECTIONS, SHAPES};
use serde::{Deserialize, Serialize};

/// The question families. Each is built so that one scaling factor matters (see the README).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// Background colour: visible in every token of every frame (the floor).
    Static,
    /// Colour of a flash shown on 2 of 32 frames: more frames help.
    Temporal,
    /// Direction a named object moves: needs at least 2 frames.
    Motion,
    /// Shape of a small object off-centre: more tokens per frame help.
    Detail,
    /// Colour of the moving object of a named shape: binds shape to colour among 2-3 objects.
    Compositional,
    /// A templated description of the whole video, scored by facts stated correctly.
    Caption,
}

impl Family {
    pub const ALL: [Family; 6] = [
        Family::Static,
        Family::Temporal,
        Family::Motion,
        Family::Detail,
        Family::Compositional,
        Family::Caption,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Family::Static => "static",
            Family::Temporal => "temporal",
            Family::Motion => "motion",
            Family::Detail => "detail",
            Family::Compositional => "compositional",
            Family::Caption => "caption",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == s)
    }
}

/// One labelled item, as written to `items.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub id: String,
    /// Path of the video, relative to the JSONL file's folder.
    pub video: String,
    pub question: String,
    pub answer: String,
    /// Answer choices (empty for captions, which are open-ended).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub choices: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family: Option<String>,
}

fn names(list: &[(&str, [u8; 3])]) -> Vec<String> {
    list.iter().map(|(n, _)| n.to_string()).collect()
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The facts a caption of the scene states, one sentence each, in caption order.
pub fn caption_facts(s: &Scene) -> Vec<String> {
    let mut facts = vec![format!("{} background", BACKGROUNDS[s.background].0)];
    for m in &s.movers {
        facts.push(format!(
            "{} {} moves {}",
            COLOURS[m.colour].0,
            m.shape.name(),
            m.direction.name()
        ));
    }
    facts.push(format!("{} flash", COLOURS[s.flash_colour].0));
    facts.push(format!("small {}", s.small_shape.name()));
    facts
}

/// The reference caption: the facts joined as sentences (`"black background . red circle moves
/// up . ... ."`).
pub fn caption(s: &Scene) -> String {
    caption_facts(s)
        .iter()
        .map(|f| format!("{f} ."))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Fraction of the reference caption's facts that a predicted caption states, penalising extra
/// sentences: `matched / max(reference facts, predicted sentences)`, in `[0, 1]`. Sentences are
/// split on `.`, compared after lower-casing and collapsing whitespace; order does not matter and
/// a fact stated twice counts once.
pub fn score_caption(predicted: &str, reference: &str) -> f64 {
    let sentences = |t: &str| -> Vec<String> {
        t.to_lowercase()
            .split('.')
            .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|s| !s.is_empty())
            .collect()
    };
    let facts = sentences(reference);
    if facts.is_empty() {
        return 0.0;
    }
    let said = sentences(predicted);
    let matched = facts.iter().filter(|f| said.contains(f)).count();
    matched as f64 / facts.len().max(said.len()) as f64
}

/// Normalised exact match for single-word answers: lower case, trimmed, trailing punctuation
/// dropped.
pub fn normalise_answer(s: &str) -> String {
    s.trim()
        .trim_end_matches(['.', '?', '!'])
        .trim()
        .to_lowercase()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Every item of a scene, one per family, in [`Family::ALL`] order.
pub fn items(s: &Scene, video: &str) -> Vec<Item> {
    let colours = names(&COLOURS);
    // The motion and compositional questions are about one mover, chosen by the seed.
    let pick = (s.seed % s.movers.len() as u64) as usize;
    let m = &s.movers[pick];
    Family::ALL
        .iter()
        .map(|&f| {
            let (question, answer, choices) = match f {
                Family::Static => (
                    "what colour is the background ?".to_string(),
                    BACKGROUNDS[s.background].0.to_string(),
                    names(&BACKGROUNDS),
                ),
                Family::Temporal => (
                    "what colour is the flash ?".to_string(),
                    COLOURS[s.flash_colour].0.to_string(),
                    colours.clone(),
                ),
                Family::Motion => (
                    format!("which way does the {} object move ?", COLOURS[m.colour].0),
                    m.direction.name().to_string(),
                    strings(&DIRECTIONS),
                ),
                Family::Detail => (
                    "what shape is the small object ?".to_string(),
                    s.small_shape.name().to_string(),
                    strings(&SHAPES),
                ),
                Family::Compositional => (
                    format!("what colour is the moving {} ?", m.shape.name()),
                    COLOURS[m.colour].0.to_string(),
                    colours.clone(),
                ),
                Family::Caption => ("describe the video .".to_string(), caption(s), vec![]),
            };
            Item {
                id: format!("{}-{}", s.id, f.name()),
                video: video.to_string(),
                question,
                answer,
                choices,
                family: Some(f.name().to_string()),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caption_scorer_counts_facts() {
        let r = "black background . red circle moves up . blue cross moves left . green flash . small square .";
        assert_eq!(score_caption(r, r), 1.0);
        // Order and spacing do not matter.
        let shuffled = "small square. green flash . BLACK background. blue cross moves left . red circle moves up";
        assert_eq!(score_caption(shuffled, r), 1.0);
        // One wrong direction: 4 of 5 facts.
        let one_wrong = "black background . red circle moves down . blue cross moves left . green flash . small square .";
        assert!((score_caption(one_wrong, r) - 0.8).abs() < 1e-12);
        // Listing every possibility is penalised by the number of sentences.
        let spam =
            format!("{r} red circle moves down . red circle moves left . red circle moves right .");
        assert!((score_caption(&spam, r) - 5.0 / 8.0).abs() < 1e-12);
        assert_eq!(score_caption("", r), 0.0);
        assert_eq!(score_caption("gray background .", r), 0.0);
    }

    #[test]
    fn items_answer_from_the_scene() {
        let s = Scene::sample("v".into(), 11);
        let it = items(&s, "videos/v.mp4");
        assert_eq!(it.len(), Family::ALL.len());
        for i in &it {
            if i.family.as_deref() != Some("caption") {
                assert!(i.choices.contains(&i.answer), "{i:?}");
                assert_eq!(i.answer.split_whitespace().count(), 1);
            }
        }
        assert_eq!(it[0].answer, BACKGROUNDS[s.background].0);
        assert_eq!(it[3].answer, s.small_shape.name());
        assert_eq!(score_caption(&it[5].answer, &caption(&s)), 1.0);
        assert_eq!(normalise_answer(" Red. "), "red");
    }
}
