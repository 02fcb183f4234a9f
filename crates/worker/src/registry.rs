//! What a stage remembers about each live sequence: its block table and how many of its tokens are
//! cached here; the last stage also keeps the sampling settings and the token history penalties need.

use std::collections::HashMap;

use mlaserve_core::SamplingParams;
use mlaserve_model::speculative::Draft;
use tch::Tensor;

pub struct SeqState {
    pub block_table: Vec<u32>,
    pub cached: usize,
    pub pos_offset: usize,
    pub prompt_len: usize,
    pub params: SamplingParams,
    /// Every token fed so far (kept only when penalties need it).
    pub history: Vec<u32>,
    /// The last step verified a draft: the next may roll `cached` back by one (rejected draft).
    pub rollback_allowed: bool,
    /// Speculative decoding with the MTP module (last stage only).
    pub speculative: bool,
    /// MTP slots in the MTP layer's cache; the final hidden state still waiting for its next token;
    /// the draft to verify next.
    pub mtp_cached: usize,
    pub pending_hidden: Option<Tensor>,
    pub draft: Option<Draft>,
}

impl SeqState {
    pub fn keeps_history(&self) -> bool {
        self.params.has_penalties()
    }
}

#[derive(Default)]
pub struct Registry {
    seqs: HashMap<u64, SeqState>,
}

impl Registry {
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    pub fn clear(&mut self) {
        self.seqs.clear();
    }

    pub fn release(&mut self, id: u64) -> bool {
        self.seqs.remove(&id).is_some()
    }

    pub fn get(&self, id: u64) -> Option<&SeqState> {
        self.seqs.get(&id)
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut SeqState> {
        self.seqs.get_mut(&id)
    }

    pub fn insert(&mut self, id: u64, s: SeqState) {
        self.seqs.insert(id, s);
    }

    pub fn contains(&self, id: u64) -> bool {
        self.seqs.contains_key(&id)
    }
}
