//! Paged latent-cache bookkeeping: a fixed pool of blocks of `block_size` token slots, handed out to
//! sequences as block tables. The scheduler owns one allocator; the workers only see block ids.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlockError {
    #[error("out of cache blocks: {requested} requested, {free} free")]
    OutOfBlocks { requested: usize, free: usize },
    #[error("block {0} is not allocated")]
    NotAllocated(u32),
}

/// Number of blocks that hold `tokens` slots.
pub fn blocks_for(tokens: usize, block_size: usize) -> usize {
    tokens.div_ceil(block_size)
}

/// Flat slot index of position `pos` of a sequence with `block_table`.
pub fn slot_of(block_table: &[u32], block_size: usize, pos: usize) -> usize {
    block_table[pos / block_size] as usize * block_size + pos % block_size
}

#[derive(Debug, Clone)]
pub struct BlockAllocator {
    block_size: usize,
    free: Vec<u32>,
    refs: Vec<u32>,
}

impl BlockAllocator {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "block_size must be positive");
        // Pop from the end: hand out low ids first, which keeps test output readable.
        let free = (0..num_blocks as u32).rev().collect();
        BlockAllocator { block_size, free, refs: vec![0; num_blocks] }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.refs.len()
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_free()
    }

    /// Takes `n` blocks, all or none.
    pub fn allocate(&mut self, n: usize) -> Result<Vec<u32>, BlockError> {
        if n > self.free.len() {
            return Err(BlockError::OutOfBlocks { requested: n, free: self.free.len() });
        }
        let taken = self.free.split_off(self.free.len() - n);
        let mut taken: Vec<u32> = taken.into_iter().rev().collect();
        for b in &mut taken {
            self.refs[*b as usize] = 1;
        }
        taken.shrink_to_fit();
        Ok(taken)
    }

    /// Grows `table` so that it holds `tokens` slots.
    pub fn ensure_capacity(&mut self, table: &mut Vec<u32>, tokens: usize) -> Result<(), BlockError> {
        let need = blocks_for(tokens, self.block_size).saturating_sub(table.len());
        if need > 0 {
            table.extend(self.allocate(need)?);
        }
        Ok(())
    }

    /// Adds a reference to an allocated block (shared prefix).
    pub fn retain(&mut self, block: u32) -> Result<(), BlockError> {
        match self.refs.get_mut(block as usize) {
            Some(r) if *r > 0 => {
                *r += 1;
                Ok(())
            }
            _ => Err(BlockError::NotAllocated(block)),
        }
    }

    /// Drops one reference to each block; blocks reaching zero return to the pool.
    pub fn release(&mut self, blocks: &[u32]) -> Result<(), BlockError> {
        for &b in blocks {
            let r = self.refs.get_mut(b as usize).filter(|r| **r > 0).ok_or(BlockError::NotAllocated(b))?;
            *r -= 1;
            if *r == 0 {
                self.free.push(b);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_release_roundtrip() {
        let mut a = BlockAllocator::new(4, 16);
        let x = a.allocate(3).unwrap();
        assert_eq!(x, vec![0, 1, 2]);
        assert_eq!(a.num_free(), 1);
        assert_eq!(a.allocate(2), Err(BlockError::OutOfBlocks { requested: 2, free: 1 }));
        assert_eq!(a.num_free(), 1, "a failed allocation takes nothing");
        a.release(&x).unwrap();
        assert_eq!(a.num_free(), 4);
        assert_eq!(a.release(&[1]), Err(BlockError::NotAllocated(1)));
    }

    #[test]
    fn shared_blocks_return_after_last_release() {
        let mut a = BlockAllocator::new(2, 4);
        let x = a.allocate(1).unwrap();
        a.retain(x[0]).unwrap();
        a.release(&x).unwrap();
        assert_eq!(a.num_free(), 1);
        a.release(&x).unwrap();
        assert_eq!(a.num_free(), 2);
    }

    #[test]
    fn capacity_and_slots() {
        let mut a = BlockAllocator::new(8, 4);
        let mut t = vec![];
        a.ensure_capacity(&mut t, 5).unwrap();
        assert_eq!(t.len(), 2);
        a.ensure_capacity(&mut t, 8).unwrap();
        assert_eq!(t.len(), 2);
        a.ensure_capacity(&mut t, 9).unwrap();
        assert_eq!(t.len(), 3);
        let table = [5u32, 2];
        assert_eq!(slot_of(&table, 4, 0), 20);
        assert_eq!(slot_of(&table, 4, 5), 9);
        assert_eq!(blocks_for(0, 4), 0);
        assert_eq!(blocks_for(4, 4), 1);
    }
}
