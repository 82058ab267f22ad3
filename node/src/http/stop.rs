//! Stop sequences matched on the text, across token boundaries: text that could be the
//! start of a stop sequence is held back until the next token decides, and the stop
//! sequence itself is never returned (OpenAI's rule).

/// Incremental stop-string matcher for one choice.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

/// What one push released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    /// Text safe to send.
    pub text: String,
    /// The stop sequence that ended the choice, if one did.
    pub stop: Option<String>,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops,
            held: String::new(),
        }
    }

    /// Add decoded text; returns what may be sent now.
    pub fn push(&mut self, piece: &str) -> Released {
        if self.stops.is_empty() {
            return Released {
                text: piece.to_string(),
                stop: None,
            };
        }
        self.held.push_str(piece);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|at| (at, s)))
            .min_by_key(|&(at, _)| at);
        if let Some((at, s)) = first {
            let stop = Some(s.clone());
            let text = self.held[..at].to_string();
            self.held.clear();
            return Released { text, stop };
        }
        let keep = self.held_suffix();
        let cut = self.held.len() - keep;
        let text = self.held[..cut].to_string();
        self.held.drain(..cut);
        Released { text, stop: None }
    }

    /// End of generation: the held-back text was not a stop sequence after all.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length of the longest suffix of the held text that is a proper prefix of a stop.
    fn held_suffix(&self) -> usize {
        let h = &self.held;
        (1..=h.len())
            .rev()
            .filter(|&n| h.is_char_boundary(h.len() - n))
            .find(|&n| {
                let tail = &h[h.len() - n..];
                self.stops
                    .iter()
                    .any(|s| s.len() > n && s.starts_with(tail))
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, Option<String>) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let r = m.push(p);
            out.push_str(&r.text);
            if r.stop.is_some() {
                return (out, r.stop);
            }
        }
        out.push_str(&m.finish());
        (out, None)
    }

    #[test]
    fn stops_across_token_boundaries_without_returning_the_stop() {
        assert_eq!(
            run(&["END"], &["The ", "E", "N", "D", " more"]),
            ("The ".into(), Some("END".into()))
        );
        assert_eq!(
            run(&["\n\n"], &["a\n", "\nb"]),
            ("a".into(), Some("\n\n".into()))
        );
        // A false start is released once it cannot be a stop any more.
        assert_eq!(run(&["END"], &["EN", "TRY"]), ("ENTRY".into(), None));
        // The earliest stop wins; held text at the end is released.
        assert_eq!(
            run(&["yz", "b"], &["abcxyz"]),
            ("a".into(), Some("b".into()))
        );
        assert_eq!(run(&["xyz"], &["abx"]), ("abx".into(), None));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), None));
        assert_eq!(
            run(&["é!"], &["café", "!"]),
            ("caf".into(), Some("é!".into()))
        );
    }

    #[test]
    fn holds_back_only_possible_prefixes() {
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(m.push("abcST").text, "abc");
        assert_eq!(m.push("x").text, "STx");
    }
}
