//! `word-category`: a fine-tuning task for a pretrained chat model (SmolLM2) that it
//! starts clearly worse at than it can end.
//!
//! Each example asks, through the model's own chat template, which of eight categories a
//! word belongs to, and wants exactly the category name back (lowercase, nothing else,
//! then the end-of-turn token). A pretrained instruct model knows most of the words but
//! not this output format: it answers in sentences, capitalises, or picks a near label,
//! so its exact-match accuracy starts low; fine-tuning must learn the format and keep the
//! pretrained knowledge of the words, which is what lets it generalise to **held-out
//! words** (the split is by word, so no test word is ever trained on).
//!
//! Data and licence: the 288 words below (8 categories x 36 common English words) were
//! written for this project and are covered by the workspace licence; nothing is
//! downloaded. Splits by position within each category: every 4th word is a test word
//! (72), every 8th from the second on a validation word (40, used by `--scheme auto`'s
//! probes), the rest are training words (176).

use flow_familial::chat::{ChatMessage, ChatTemplate};
use flow_familial::tasks::Sequence;
use flow_familial::tokenizer::Tokenizer;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

/// The categories, in the order the prompt lists them.
pub const LABELS: [&str; 8] = [
    "animal",
    "fruit",
    "vegetable",
    "color",
    "vehicle",
    "tool",
    "instrument",
    "clothing",
];

/// 36 words per category of [`LABELS`], same order.
const WORDS: [[&str; 36]; 8] = [
    [
        "tiger", "horse", "rabbit", "eagle", "dolphin", "elephant", "wolf", "giraffe", "squirrel",
        "penguin", "camel", "zebra", "monkey", "turtle", "owl", "fox", "bear", "deer", "shark",
        "frog", "lion", "goat", "sheep", "parrot", "snake", "whale", "mouse", "cow", "duck",
        "otter", "kangaroo", "hamster", "leopard", "donkey", "crab", "beaver",
    ],
    [
        "apple",
        "banana",
        "cherry",
        "grape",
        "mango",
        "peach",
        "pear",
        "plum",
        "lemon",
        "strawberry",
        "pineapple",
        "watermelon",
        "kiwi",
        "apricot",
        "coconut",
        "papaya",
        "raspberry",
        "blueberry",
        "fig",
        "lime",
        "melon",
        "pomegranate",
        "grapefruit",
        "tangerine",
        "blackberry",
        "cranberry",
        "nectarine",
        "guava",
        "lychee",
        "avocado",
        "persimmon",
        "quince",
        "gooseberry",
        "mulberry",
        "clementine",
        "dragonfruit",
    ],
    [
        "carrot",
        "potato",
        "onion",
        "cabbage",
        "spinach",
        "broccoli",
        "lettuce",
        "celery",
        "cucumber",
        "garlic",
        "radish",
        "turnip",
        "cauliflower",
        "zucchini",
        "eggplant",
        "pumpkin",
        "beetroot",
        "asparagus",
        "artichoke",
        "leek",
        "kale",
        "parsnip",
        "pea",
        "bean",
        "corn",
        "okra",
        "yam",
        "shallot",
        "chard",
        "fennel",
        "arugula",
        "rhubarb",
        "endive",
        "kohlrabi",
        "watercress",
        "sweetcorn",
    ],
    [
        "red",
        "blue",
        "green",
        "yellow",
        "purple",
        "violet",
        "crimson",
        "scarlet",
        "turquoise",
        "magenta",
        "beige",
        "maroon",
        "navy",
        "teal",
        "indigo",
        "amber",
        "ivory",
        "lavender",
        "cyan",
        "brown",
        "pink",
        "grey",
        "black",
        "white",
        "khaki",
        "ochre",
        "burgundy",
        "azure",
        "vermilion",
        "mauve",
        "taupe",
        "chartreuse",
        "fuchsia",
        "sepia",
        "cerulean",
        "saffron",
    ],
    [
        "car",
        "bus",
        "truck",
        "bicycle",
        "motorcycle",
        "train",
        "tram",
        "van",
        "taxi",
        "tractor",
        "ambulance",
        "scooter",
        "helicopter",
        "airplane",
        "boat",
        "ship",
        "submarine",
        "yacht",
        "canoe",
        "ferry",
        "jeep",
        "limousine",
        "sedan",
        "minivan",
        "bulldozer",
        "forklift",
        "skateboard",
        "sled",
        "rocket",
        "glider",
        "caravan",
        "trolley",
        "wagon",
        "hovercraft",
        "moped",
        "motorboat",
    ],
    [
        "hammer",
        "screwdriver",
        "wrench",
        "saw",
        "drill",
        "chisel",
        "pliers",
        "shovel",
        "rake",
        "axe",
        "spanner",
        "mallet",
        "crowbar",
        "trowel",
        "sandpaper",
        "scissors",
        "hoe",
        "clamp",
        "awl",
        "vise",
        "sickle",
        "pickaxe",
        "hacksaw",
        "scythe",
        "pitchfork",
        "spade",
        "jackhammer",
        "sledgehammer",
        "stapler",
        "tweezers",
        "whetstone",
        "chainsaw",
        "handsaw",
        "plunger",
        "soldering iron",
        "tape measure",
    ],
    [
        "piano",
        "violin",
        "guitar",
        "flute",
        "trumpet",
        "drum",
        "cello",
        "harp",
        "clarinet",
        "saxophone",
        "trombone",
        "oboe",
        "banjo",
        "ukulele",
        "accordion",
        "harmonica",
        "tuba",
        "bassoon",
        "xylophone",
        "mandolin",
        "organ",
        "tambourine",
        "bagpipes",
        "piccolo",
        "sitar",
        "lute",
        "harpsichord",
        "cymbal",
        "viola",
        "marimba",
        "zither",
        "didgeridoo",
        "bugle",
        "castanets",
        "kazoo",
        "glockenspiel",
    ],
    [
        "shirt",
        "trousers",
        "jacket",
        "coat",
        "dress",
        "skirt",
        "sweater",
        "scarf",
        "glove",
        "sock",
        "hat",
        "boot",
        "sandal",
        "blouse",
        "jeans",
        "shorts",
        "vest",
        "hoodie",
        "cardigan",
        "necktie",
        "pyjamas",
        "raincoat",
        "tuxedo",
        "gown",
        "apron",
        "bikini",
        "overalls",
        "poncho",
        "kimono",
        "sari",
        "shawl",
        "mitten",
        "leggings",
        "blazer",
        "waistcoat",
        "sweatshirt",
    ],
];

/// Which words an example may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    /// For choosing a scheme (`--scheme auto`) and validation losses.
    Validation,
    /// Held out for the accuracy reported before and after fine-tuning.
    Test,
}

fn split_of(index: usize) -> Split {
    if index % 4 == 0 {
        Split::Test
    } else if index % 8 == 1 {
        Split::Validation
    } else {
        Split::Train
    }
}

/// `(word, label index)` of every word in `split`.
pub fn words(split: Split) -> Vec<(&'static str, usize)> {
    let mut v = Vec::new();
    for (label, ws) in WORDS.iter().enumerate() {
        for (i, w) in ws.iter().enumerate() {
            if split_of(i) == split {
                v.push((*w, label));
            }
        }
    }
    v
}

/// One tokenized example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WordExample {
    pub word: &'static str,
    pub label: usize,
    /// The rendered chat prompt, up to the assistant's turn.
    pub prompt: Vec<u32>,
    /// The exact answer the model must generate: the label's tokens then end-of-turn.
    pub target: Vec<u32>,
}

impl WordExample {
    /// The training sequence (loss on the target only).
    pub fn sequence(&self) -> Sequence {
        let mut tokens = self.prompt.clone();
        tokens.extend_from_slice(&self.target);
        Sequence {
            tokens,
            loss_from: self.prompt.len(),
        }
    }
}

/// The task, tokenized once for one model.
#[derive(Debug, Clone)]
pub struct WordTask {
    train: Vec<WordExample>,
    validation: Vec<WordExample>,
    test: Vec<WordExample>,
}

/// The user message of `word`.
pub fn question(word: &str) -> String {
    format!(
        "Word: {word}\nWhich category does it belong to? Answer with exactly one of: {}.",
        LABELS.join(", ")
    )
}

impl WordTask {
    /// Tokenize every split with the model's tokenizer and chat template; `eos` is the
    /// end-of-turn token the answer ends with (SmolLM2: `<|im_end|>`).
    pub fn new(tok: &Tokenizer, chat: &ChatTemplate, eos: u32) -> Result<Self> {
        let make = |split| -> Result<Vec<WordExample>> {
            words(split)
                .into_iter()
                .map(|(word, label)| {
                    let text = chat.render(
                        &[
                            ChatMessage::new("system", "You sort words into categories."),
                            ChatMessage::new("user", question(word)),
                        ],
                        true,
                    )?;
                    let prompt = tok.encode(&text)?;
                    let mut target = tok.encode(LABELS[label])?;
                    if target.is_empty() {
                        return Err(Error::invalid("task", "a label encodes to no tokens"));
                    }
                    target.push(eos);
                    Ok(WordExample {
                        word,
                        label,
                        prompt,
                        target,
                    })
                })
                .collect()
        };
        Ok(Self {
            train: make(Split::Train)?,
            validation: make(Split::Validation)?,
            test: make(Split::Test)?,
        })
    }

    /// The examples of `split`.
    pub fn examples(&self, split: Split) -> &[WordExample] {
        match split {
            Split::Train => &self.train,
            Split::Validation => &self.validation,
            Split::Test => &self.test,
        }
    }

    /// `n` training sequences of step `step` (deterministic in `(seed, step)`): drawn
    /// with replacement from the training words.
    pub fn train_batch(&self, n: usize, seed: u64, step: u64) -> Vec<Sequence> {
        let mut rng = StdRng::seed_from_u64(flow_familial::tasks::train_seed(seed ^ 0x30d5, step));
        (0..n)
            .map(|_| self.train[rng.gen_range(0..self.train.len())].sequence())
            .collect()
    }

    /// Up to `n` sequences of `split` (for losses).
    pub fn sequences(&self, split: Split, n: usize) -> Vec<Sequence> {
        self.examples(split)
            .iter()
            .take(n)
            .map(WordExample::sequence)
            .collect()
    }

    /// Longest target (tokens, end-of-turn included).
    pub fn max_target(&self) -> usize {
        self.train
            .iter()
            .chain(&self.validation)
            .chain(&self.test)
            .map(|e| e.target.len())
            .max()
            .unwrap_or(1)
    }
}

/// Held-out accuracy of a model on the task.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Accuracy {
    /// Share of examples whose greedy answer is exactly the label then end-of-turn.
    pub exact: f64,
    /// Share whose answer (first [`WordTask::max_target`] + 8 tokens, lowercased) names
    /// the right category and no other: knowledge of the word regardless of the format.
    pub lenient: f64,
}

/// [`Accuracy`] of greedy decoding at exit `point` of `model` on `examples`.
pub fn accuracy(
    model: &flow_familial::FamilialModel,
    tok: &Tokenizer,
    examples: &[WordExample],
    point: usize,
    max_new: usize,
) -> Result<Accuracy> {
    if examples.is_empty() {
        return Err(Error::invalid("evaluation", "no examples"));
    }
    let (mut exact, mut lenient) = (0usize, 0usize);
    for ch in examples.chunks(24) {
        let prompts: Vec<Vec<u32>> = ch.iter().map(|e| e.prompt.clone()).collect();
        let got = flow_familial::train::greedy_batch(model, &prompts, point, max_new)?;
        for (g, e) in got.iter().zip(ch) {
            if g.starts_with(&e.target) {
                exact += 1;
            }
            let text = tok.decode(g)?.to_lowercase();
            let named: Vec<usize> = (0..LABELS.len())
                .filter(|&l| text.contains(LABELS[l]))
                .collect();
            if named == [e.label] {
                lenient += 1;
            }
        }
    }
    let n = examples.len() as f64;
    Ok(Accuracy {
        exact: exact as f64 / n,
        lenient: lenient as f64 / n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_are_disjoint_and_cover_every_word() {
        let (tr, va, te) = (
            words(Split::Train),
            words(Split::Validation),
            words(Split::Test),
        );
        assert_eq!((tr.len(), va.len(), te.len()), (176, 40, 72));
        for (w, _) in &te {
            assert!(!tr.iter().any(|(x, _)| x == w), "{w} is in train and test");
            assert!(
                !va.iter().any(|(x, _)| x == w),
                "{w} is in validation and test"
            );
        }
        let mut all: Vec<&str> = WORDS.iter().flatten().copied().collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 288, "a word is listed twice");
        for l in 0..LABELS.len() {
            assert_eq!(te.iter().filter(|(_, x)| *x == l).count(), 9);
        }
    }
}
