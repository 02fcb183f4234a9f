//! Stop strings over streamed text.
//!
//! Generated text arrives in arbitrary pieces (one detokenised delta per token), so a stop string may
//! span several pieces. The matcher holds back the shortest tail that could still grow into a stop
//! string and emits everything before it; when a stop string completes, the text before it is emitted
//! and the stop string itself (and anything after it) is dropped, as OpenAI and vLLM do.
//!
//! When several stop strings match, the one that completes first in the stream wins (earliest end;
//! on a tie, the longer one, which starts earlier). This makes the result independent of how the
//! text was split into pieces.

/// The result of feeding one piece of text to a [`StopMatcher`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopOutcome {
    /// Text that is final and can be sent to the client.
    pub emit: String,
    /// The stop string that just completed, if any; generation should end.
    pub stopped: Option<String>,
}

/// Finds stop strings in text that arrives piece by piece.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text that could still be the start of a stop string.
    held: String,
    /// Set once a stop string matched: everything after it is discarded.
    done: bool,
}

impl StopMatcher {
    /// Empty stop strings are ignored (they would match before any text).
    pub fn new(stops: Vec<String>) -> Self {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        Self { stops, held: String::new(), done: false }
    }

    /// Whether a stop string has matched.
    pub fn is_stopped(&self) -> bool {
        self.done
    }

    /// Feeds the next piece of generated text. After a stop string matched, returns nothing.
    pub fn push(&mut self, text: &str) -> StopOutcome {
        if self.done {
            return StopOutcome::default();
        }
        if self.stops.is_empty() {
            return StopOutcome { emit: text.to_owned(), stopped: None };
        }
        self.held.push_str(text);

        // Earliest-ending complete match. The held part alone never contains one (it would have
        // matched on an earlier push), so scanning the whole buffer finds only new matches.
        let mut best: Option<(usize, usize, usize)> = None; // (end, start, stop index)
        for (i, stop) in self.stops.iter().enumerate() {
            if let Some(start) = self.held.find(stop.as_str()) {
                let key = (start + stop.len(), start, i);
                let better = match best {
                    None => true,
                    Some((end, s, _)) => key.0 < end || (key.0 == end && key.1 < s),
                };
                if better {
                    best = Some(key);
                }
            }
        }
        if let Some((_, start, i)) = best {
            self.held.truncate(start);
            self.done = true;
            return StopOutcome {
                emit: std::mem::take(&mut self.held),
                stopped: Some(self.stops[i].clone()),
            };
        }

        let keep = self.held_tail_start();
        let rest = self.held.split_off(keep);
        StopOutcome { emit: std::mem::replace(&mut self.held, rest), stopped: None }
    }

    /// Emits the text held back at the end of generation (no stop string matched).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// The start of the longest suffix of `held` that is a proper prefix of some stop string.
    fn held_tail_start(&self) -> usize {
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let lowest = self.held.len().saturating_sub(longest.saturating_sub(1));
        self.held
            .char_indices()
            .map(|(i, _)| i)
            .filter(|&i| i >= lowest)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|s| s.len() > tail.len() && s.starts_with(tail))
            })
            .unwrap_or(self.held.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(s: &[&str]) -> StopMatcher {
        StopMatcher::new(s.iter().map(|s| s.to_string()).collect())
    }

    /// Feeds `pieces`; returns (all emitted text, the stop that matched, flushed text if none did).
    fn run(m: &mut StopMatcher, pieces: &[&str]) -> (String, Option<String>) {
        let mut out = String::new();
        for p in pieces {
            let o = m.push(p);
            out.push_str(&o.emit);
            if o.stopped.is_some() {
                return (out, o.stopped);
            }
        }
        out.push_str(&m.flush());
        (out, None)
    }

    #[test]
    fn no_stops_passes_everything_through() {
        let mut m = stops(&[]);
        assert_eq!(m.push("abc"), StopOutcome { emit: "abc".into(), stopped: None });
        assert_eq!(m.flush(), "");
        let mut m = stops(&[""]);
        assert_eq!(m.push("abc").emit, "abc");
    }

    #[test]
    fn stop_within_one_piece() {
        let mut m = stops(&["END"]);
        let o = m.push("hello END world");
        assert_eq!(o, StopOutcome { emit: "hello ".into(), stopped: Some("END".into()) });
        assert!(m.is_stopped());
        // Nothing after the stop, ever.
        assert_eq!(m.push("more"), StopOutcome::default());
        assert_eq!(m.flush(), "");
    }

    #[test]
    fn stop_spanning_many_pieces() {
        let mut m = stops(&["<|stop|>"]);
        let steps = [("a<", "a"), ("|", ""), ("st", ""), ("o", ""), ("p|", "")];
        for (piece, want) in steps {
            let o = m.push(piece);
            assert_eq!(o.emit, want, "after {piece:?}");
            assert_eq!(o.stopped, None);
        }
        let o = m.push(">tail");
        assert_eq!(o, StopOutcome { emit: String::new(), stopped: Some("<|stop|>".into()) });
    }

    #[test]
    fn false_start_is_released() {
        let mut m = stops(&["STOP"]);
        assert_eq!(m.push("ST").emit, "");
        assert_eq!(m.push("x").emit, "STx");
        assert_eq!(m.push("STO").emit, "");
        assert_eq!(m.flush(), "STO");
    }

    #[test]
    fn overlapping_prefix() {
        // "aab" contains "ab" starting at the second 'a': the first 'a' must be emitted.
        let mut m = stops(&["ab"]);
        assert_eq!(m.push("a").emit, "");
        assert_eq!(m.push("a").emit, "a");
        assert_eq!(m.push("b"), StopOutcome { emit: String::new(), stopped: Some("ab".into()) });

        let mut m = stops(&["ab"]);
        assert_eq!(m.push("aab"), StopOutcome { emit: "a".into(), stopped: Some("ab".into()) });

        // Self-overlapping stop string.
        let mut m = stops(&["aaab"]);
        assert_eq!(run(&mut m, &["a", "a", "a", "a", "a", "b", "c"]), ("aa".into(), Some("aaab".into())));
    }

    #[test]
    fn multiple_stops_earliest_completion_wins() {
        // "xyz" would start earlier but "y" completes first.
        let mut m = stops(&["xyz", "y"]);
        assert_eq!(run(&mut m, &["0x", "yz"]), ("0x".into(), Some("y".into())));
        let mut m = stops(&["xyz", "y"]);
        assert_eq!(run(&mut m, &["0xyz"]), ("0x".into(), Some("y".into())));
        // Same end: the longer one.
        let mut m = stops(&["b", "ab"]);
        assert_eq!(run(&mut m, &["1a", "b"]), ("1".into(), Some("ab".into())));
        let mut m = stops(&["b", "ab"]);
        assert_eq!(run(&mut m, &["1ab"]), ("1".into(), Some("ab".into())));
        // Only one matches.
        let mut m = stops(&["foo", "bar"]);
        assert_eq!(run(&mut m, &["a b", "a", "r c"]), ("a ".into(), Some("bar".into())));
    }

    #[test]
    fn holds_only_what_can_still_match() {
        let mut m = stops(&["abc", "bd"]);
        assert_eq!(m.push("xab").emit, "x"); // "ab" can become "abc"; "b" can become "bd"
        assert_eq!(m.push("x").emit, "abx");
        assert_eq!(m.push("zb").emit, "z");
        assert_eq!(m.push("d"), StopOutcome { emit: String::new(), stopped: Some("bd".into()) });
    }

    #[test]
    fn unicode_stops_and_text() {
        let mut m = stops(&["日本語", "🎉!"]);
        assert_eq!(m.push("こんにちは日").emit, "こんにちは");
        assert_eq!(m.push("本").emit, "");
        assert_eq!(m.push("人").emit, "日本人");
        assert_eq!(m.push("🎉").emit, "");
        assert_eq!(m.push("!é"), StopOutcome { emit: String::new(), stopped: Some("🎉!".into()) });

        // Stop strings and text with shared leading bytes but different characters.
        let mut m = stops(&["é"]);
        assert_eq!(m.push("è").emit, "è");
        assert_eq!(m.push("xé"), StopOutcome { emit: "x".into(), stopped: Some("é".into()) });
    }

    #[test]
    fn chunking_does_not_change_the_result() {
        let text = "The answer is 42.\n\nUser: next question\nAssistant: ok";
        let stop_sets: [&[&str]; 4] = [&["\n\nUser:"], &["User", "\n\n"], &["ques", "next q"], &["nope"]];
        for set in stop_sets {
            let whole = run(&mut stops(set), &[text]);
            let chars: Vec<String> = text.chars().map(String::from).collect();
            let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
            assert_eq!(run(&mut stops(set), &refs), whole, "char by char, stops {set:?}");
            for size in 2..7 {
                let pieces: Vec<String> =
                    text.as_bytes().chunks(size).map(|c| String::from_utf8(c.to_vec()).unwrap()).collect();
                let refs: Vec<&str> = pieces.iter().map(String::as_str).collect();
                assert_eq!(run(&mut stops(set), &refs), whole, "chunks of {size}, stops {set:?}");
            }
        }
        assert_eq!(run(&mut stops(&["nope"]), &[text]), (text.to_string(), None));
        let want = ("The answer is 42.".to_string(), Some("\n\nUser:".to_string()));
        assert_eq!(run(&mut stops(&["\n\nUser:"]), &[text]), want);
    }

    #[test]
    fn empty_pieces_and_flush() {
        let mut m = stops(&["xy"]);
        assert_eq!(m.push("").emit, "");
        assert_eq!(m.push("x").emit, "");
        assert_eq!(m.push("").emit, "");
        assert_eq!(m.flush(), "x");
        assert_eq!(m.flush(), "");
        assert_eq!(m.push("y").emit, "y");
    }
}
