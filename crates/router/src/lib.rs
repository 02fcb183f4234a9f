//! The mlaserve router: the public `mlaserve.v1.Generation` API, tokenisation, chat templating,
//! request validation and continuous batching with a paged latent-cache allocator, driving the
//! pipeline stages over the internal protocol.

pub mod chat_template;
pub mod detokenize;
pub mod stop;
pub mod tokenizer;
