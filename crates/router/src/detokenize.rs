//! Incremental detokenisation: a growing token sequence in, text deltas out.
//!
//! Decoding one token at a time is wrong in two ways: decoders treat the first token of a sequence
//! specially (sentencepiece `▁` handling drops the leading space), and one character may span several
//! tokens (byte-fallback `<0xE2>` tokens, byte-level BPE pieces of a multi-byte character). So, as in
//! TGI and vLLM, we decode a short window twice: `ids[prefix..read]` (text already sent) and
//! `ids[prefix..]`, and send the difference, unless the new text ends in U+FFFD, which means the last
//! character is still incomplete: then we hold it until more tokens arrive (or [`finish`]).
//!
//! The deltas add up to the decoded text of the generated ids (after the prompt tail), and no delta
//! splits a character. Only for invalid byte sequences can the number of U+FFFD differ from a
//! one-shot decode (byte-fallback decoders replace a whole invalid byte run).
//!
//! [`finish`]: IncrementalDetokenizer::finish

use crate::tokenizer::{TokenizerError, TokenizerInfo};

const REPLACEMENT: char = '\u{FFFD}';

/// Turns generated token ids into text deltas for streaming.
#[derive(Debug, Clone)]
pub struct IncrementalDetokenizer {
    /// The decode window and what follows it: ids before `prefix_offset` are dropped as we go.
    ids: Vec<u32>,
    /// Start of the decode window: context kept so that leading spaces decode correctly.
    prefix_offset: usize,
    /// End of the text already returned.
    read_offset: usize,
    /// Generated ids pushed so far.
    pushed: usize,
    skip_special_tokens: bool,
}

impl IncrementalDetokenizer {
    /// `prompt_tail`: the last few prompt ids (a handful is enough), so that the first generated
    /// token decodes with the spacing it has after the prompt; may be empty.
    pub fn new(prompt_tail: &[u32], skip_special_tokens: bool) -> Self {
        Self {
            ids: prompt_tail.to_vec(),
            prefix_offset: 0,
            read_offset: prompt_tail.len(),
            pushed: 0,
            skip_special_tokens,
        }
    }

    /// The generated ids pushed so far.
    pub fn generated(&self) -> usize {
        self.pushed
    }

    /// Adds one generated token; returns the text it completes (often empty for partial characters).
    pub fn push(&mut self, tok: &TokenizerInfo, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        self.pushed += 1;
        self.advance(tok, false)
    }

    /// Flushes text still held at the end of generation; an incomplete character decodes lossily
    /// (as U+FFFD), as decoding the whole sequence would.
    pub fn finish(&mut self, tok: &TokenizerInfo) -> Result<String, TokenizerError> {
        if self.read_offset >= self.ids.len() {
            return Ok(String::new());
        }
        self.advance(tok, true)
    }

    fn advance(&mut self, tok: &TokenizerInfo, force: bool) -> Result<String, TokenizerError> {
        let skip = self.skip_special_tokens;
        let prefix_text = tok.decode(&self.ids[self.prefix_offset..self.read_offset], skip)?;
        let new_text = tok.decode(&self.ids[self.prefix_offset..], skip)?;
        let grew = new_text.len() > prefix_text.len();
        if !force && (!grew || new_text.ends_with(REPLACEMENT)) {
            return Ok(String::new());
        }
        let delta = text_after(&new_text, &prefix_text).to_owned();
        // The next window starts where this one's new text began; older ids are no longer needed.
        self.ids.drain(..self.read_offset);
        self.prefix_offset = 0;
        self.read_offset = self.ids.len();
        Ok(delta)
    }
}

/// `new` minus its prefix `old`. Decoding more tokens normally only appends, but when it does not
/// (e.g. a lossy U+FFFD in the window that later bytes repair) we skip `old`'s character count,
/// as TGI and vLLM do with Python string slicing.
fn text_after<'a>(new: &'a str, old: &str) -> &'a str {
    if let Some(rest) = new.strip_prefix(old) {
        return rest;
    }
    let n = old.chars().count();
    new.char_indices().nth(n).map_or("", |(i, _)| &new[i..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::test_fixtures::{byte_fallback, byte_level};

    const TEXTS: &[&str] = &[
        "Hello world, this is a test.",
        "  leading spaces and trailing  ",
        "naïve café — “quotes” … and ellipsis",
        "日本語のテキストと漢字、そして emoji 🎉🚀👩‍👩‍👧",
        "mixed: a€b€€c 𝄞 music ∑ math\nnew\tlines",
        "Ω≈ç√∫˜µ≤≥÷ åß∂ƒ©˙∆˚¬… œ∑´®†¥¨ˆøπ",
        "\u{301}combining first, e\u{301}\u{302} stacked",
    ];

    /// Pushes `ids` one by one; checks every delta is whole text; returns the concatenation.
    fn stream(tok: &TokenizerInfo, tail: &[u32], ids: &[u32], skip: bool) -> String {
        let mut d = IncrementalDetokenizer::new(tail, skip);
        let mut out = String::new();
        for &id in ids {
            let delta = d.push(tok, id).unwrap();
            assert!(!delta.contains(REPLACEMENT), "broken character in delta {delta:?}");
            out.push_str(&delta);
        }
        out.push_str(&d.finish(tok).unwrap());
        assert_eq!(d.finish(tok).unwrap(), "", "finish is idempotent");
        assert_eq!(d.generated(), ids.len());
        assert!(d.ids.len() <= 8, "the window should stay short, holds {} ids", d.ids.len());
        out
    }

    fn check_tokenizer(tok: &TokenizerInfo, name: &str) {
        for text in TEXTS {
            let ids = tok.encode(text, false).unwrap();
            let whole = tok.decode(&ids, false).unwrap();
            assert_eq!(stream(tok, &[], &ids, false), whole, "{name}: {text:?}");

            // With prompt context: the deltas are what the continuation adds to the prompt's text.
            let prompt = tok.encode("Question: say it. Answer:", false).unwrap();
            let tail = &prompt[prompt.len().saturating_sub(4)..];
            let mut all = tail.to_vec();
            all.extend(&ids);
            let full = tok.decode(&all, false).unwrap();
            let before = tok.decode(tail, false).unwrap();
            assert_eq!(stream(tok, tail, &ids, false), text_after(&full, &before), "{name} (tail): {text:?}");
        }
    }

    #[test]
    fn byte_level_bpe_deltas_concatenate_to_decode() {
        let tok = byte_level();
        // The fixture vocabulary is small, so multi-byte characters split into byte pieces.
        let ids = tok.encode("🎉", false).unwrap();
        assert!(ids.len() > 1, "fixture should split the emoji, got {ids:?}");
        check_tokenizer(&tok, "byte-level");
    }

    #[test]
    fn byte_fallback_deltas_concatenate_to_decode() {
        let tok = byte_fallback();
        let (_, pieces) = tok.encode_with_tokens("🎉", false).unwrap();
        assert!(pieces.iter().any(|p| p.starts_with("<0x")), "fixture should use byte fallback: {pieces:?}");
        check_tokenizer(&tok, "byte-fallback");
    }

    /// xorshift: deterministic pseudo-random numbers below `n`.
    fn rng(mut state: u64) -> impl FnMut(usize) -> usize {
        move |n| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        }
    }

    #[test]
    fn random_texts_concatenate_to_decode() {
        let pool: Vec<char> = "abcdefghij  .,!?\né日本語🎉€𝄞\u{301}\u{200d}👩Ωß".chars().collect();
        let mut next = rng(0x2545_f491_4f6c_dd1d);
        for tok in [byte_level(), byte_fallback()] {
            for round in 0..300 {
                let text: String = (0..1 + next(40)).map(|_| pool[next(pool.len())]).collect();
                let ids = tok.encode(&text, false).unwrap();
                let tail = tok.encode("Answer:", false).unwrap();
                let tail = &tail[tail.len().saturating_sub(round % 3)..];
                let mut all = tail.to_vec();
                all.extend(&ids);
                let full = tok.decode(&all, false).unwrap();
                let want = text_after(&full, &tok.decode(tail, false).unwrap()).to_owned();
                assert_eq!(stream(&tok, tail, &ids, false), want, "{text:?}");
            }
        }
    }

    #[test]
    fn random_ids_never_fail() {
        // Arbitrary ids make invalid UTF-8; the deltas must still be well-formed, and exact whenever
        // the sequence decodes cleanly. (With invalid bytes the number of U+FFFD can differ from a
        // one-shot decode: byte-fallback decoders replace a whole invalid run, including bytes that
        // were valid, and already streamed, on their own.)
        let mut next = rng(0x9e37_79b9_7f4a_7c15);
        for tok in [byte_level(), byte_fallback()] {
            for _ in 0..300 {
                let ids: Vec<u32> = (0..1 + next(24)).map(|_| next(tok.vocab_size()) as u32).collect();
                let mut d = IncrementalDetokenizer::new(&[], false);
                let mut out = String::new();
                for &id in &ids {
                    out.push_str(&d.push(&tok, id).unwrap());
                }
                out.push_str(&d.finish(&tok).unwrap());
                let whole = tok.decode(&ids, false).unwrap();
                if !whole.contains(REPLACEMENT) {
                    assert_eq!(out, whole, "{ids:?}");
                }
            }
        }
    }

    #[test]
    fn holds_partial_characters() {
        let tok = byte_fallback();
        let (ids, pieces) = tok.encode_with_tokens("a€", false).unwrap();
        // "▁a" then <0xE2> <0x82> <0xAC>
        let bytes: Vec<usize> =
            pieces.iter().enumerate().filter(|(_, p)| p.starts_with("<0x")).map(|(i, _)| i).collect();
        assert_eq!(bytes.len(), 3, "{pieces:?}");
        let mut d = IncrementalDetokenizer::new(&[], false);
        let deltas: Vec<String> = ids.iter().map(|&id| d.push(&tok, id).unwrap()).collect();
        assert_eq!(deltas.concat(), "a€");
        assert_eq!(deltas[bytes[0]], "");
        assert_eq!(deltas[bytes[1]], "");
        assert_eq!(deltas[bytes[2]], "€");
    }

    #[test]
    fn incomplete_character_is_flushed_lossily() {
        let tok = byte_fallback();
        let e2 = tok.token_id("<0xE2>").unwrap();
        let x = tok.encode("x", false).unwrap();
        let mut d = IncrementalDetokenizer::new(&[], false);
        let mut out = String::new();
        for &id in &x {
            out.push_str(&d.push(&tok, id).unwrap());
        }
        assert_eq!(d.push(&tok, e2).unwrap(), "");
        out.push_str(&d.finish(&tok).unwrap());
        let mut all = x.clone();
        all.push(e2);
        assert_eq!(out, tok.decode(&all, false).unwrap());
        assert!(out.ends_with(REPLACEMENT));
    }

    #[test]
    fn invalid_byte_sequence_is_not_held_forever() {
        // <0xE2> followed by an ASCII letter is invalid UTF-8: emit U+FFFD + text, like decode does.
        let tok = byte_fallback();
        let e2 = tok.token_id("<0xE2>").unwrap();
        let mut ids = vec![e2];
        ids.extend(tok.encode("ok go", false).unwrap());
        let whole = tok.decode(&ids, false).unwrap();
        let mut d = IncrementalDetokenizer::new(&[], false);
        let streamed: String = ids.iter().map(|&id| d.push(&tok, id).unwrap()).collect();
        assert_eq!(streamed + &d.finish(&tok).unwrap(), whole);
    }

    #[test]
    fn special_tokens_are_skipped_or_kept() {
        for tok in [byte_level(), byte_fallback()] {
            let eos = tok.token_id(tok.eos_token().unwrap()).unwrap();
            let mut ids = tok.encode("Hi there", false).unwrap();
            ids.push(eos);
            ids.extend(tok.encode(" again", false).unwrap());
            assert_eq!(stream(&tok, &[], &ids, true), tok.decode(&ids, true).unwrap());
            assert_eq!(stream(&tok, &[], &ids, false), tok.decode(&ids, false).unwrap());
            assert!(stream(&tok, &[], &ids, false).contains(tok.eos_token().unwrap()));
        }
    }

    #[test]
    fn first_token_keeps_its_leading_space_after_a_prompt() {
        let tok = byte_fallback();
        let prompt = tok.encode("Say", false).unwrap();
        let ids = tok.encode("Say hello", false).unwrap()[prompt.len()..].to_vec();
        // Decoded alone, sentencepiece drops the leading space of "▁hello".
        assert_eq!(tok.decode(&ids, false).unwrap(), "hello");
        assert_eq!(stream(&tok, &prompt, &ids, false), " hello");
    }

    #[test]
    fn text_after_handles_non_prefix_windows() {
        assert_eq!(text_after("abc", "ab"), "c");
        assert_eq!(text_after("a€x", "a\u{FFFD}"), "x");
        assert_eq!(text_after("ab", "abc"), "");
    }
}
