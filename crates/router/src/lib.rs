//! The mlaserve router: the public `mlaserve.v1.Generation` API, tokenisation, chat templating,
//! request validation and continuous batching with a paged latent-cache allocator, driving the
//! pipeline stages over the internal protocol.

pub mod auth;
pub mod chat_template;
pub mod detokenize;
pub mod http;
pub mod options;
pub mod parse;
pub mod pipeline;
pub mod request;
pub mod scheduler;
pub mod server;
pub mod service;
pub mod stop;
pub mod tokenizer;

pub use chat_template::{ChatTemplate, TemplateError, DEEPSEEK_V3_TEMPLATE};
pub use detokenize::IncrementalDetokenizer;
pub use options::RouterOptions;
pub use server::{load_model_facts, serve, RouterError};
pub use stop::{StopMatcher, StopOutcome};
pub use tokenizer::{TokenizerError, TokenizerInfo};
