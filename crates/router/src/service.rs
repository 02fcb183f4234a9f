//! The public `mlaserve.v1.Generation` service.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mlaserve_core::ModelConfig;
use mlaserve_proto::v1::generation_server::Generation;
use mlaserve_proto::v1::{
    DetokenizeRequest, DetokenizeResponse, FinishReason, GenerateRequest, GenerateResponse, ModelInfoRequest,
    ModelInfoResponse, RenderChatRequest, RenderChatResponse, StageStatus, TokenizeRequest, TokenizeResponse,
};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use mlaserve_telemetry::propagation;

use crate::options::RouterOptions;
use crate::request::{render_chat_request, validate_generate, ModelLimits};
use crate::scheduler::SchedulerHandle;
use crate::tokenizer::TokenizerInfo;

pub struct GenerationService {
    pub tok: Arc<TokenizerInfo>,
    pub config: ModelConfig,
    pub opts: RouterOptions,
    pub scheduler: SchedulerHandle,
}

/// Parses the `grpc-timeout` header ("100m", "5S", ...): the client's deadline.
pub fn grpc_timeout(md: &MetadataMap) -> Option<Duration> {
    let v = md.get("grpc-timeout")?.to_str().ok()?;
    if v.len() < 2 {
        return None;
    }
    let (num, unit) = v.split_at(v.len() - 1);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

impl GenerationService {
    /// The one request core behind both front ends (gRPC and the OpenAI HTTP API): a span with
    /// the GenAI attributes, validation against the model and the limits, and submission to the
    /// scheduler. The stream ends with a finish reason or an error status.
    pub fn start(
        &self,
        r: GenerateRequest,
        deadline: Option<Instant>,
        parent: opentelemetry::Context,
    ) -> Result<Terminated, Status> {
        let operation = if r.messages.is_empty() { "text_completion" } else { "chat" };
        let model = self.opts.model_id.as_str();
        let span = tracing::info_span!(
            "generate",
            "otel.name" = format!("{operation} {model}"),
            "otel.kind" = "server",
            "otel.status_code" = tracing::field::Empty,
            "error.type" = tracing::field::Empty,
            "gen_ai.operation.name" = operation,
            "gen_ai.provider.name" = "mlaserve",
            "gen_ai.request.model" = model,
            "gen_ai.request.max_tokens" = tracing::field::Empty,
            "gen_ai.request.temperature" = tracing::field::Empty,
            "gen_ai.request.top_p" = tracing::field::Empty,
            "gen_ai.request.top_k" = tracing::field::Empty,
            "gen_ai.request.seed" = tracing::field::Empty,
            "gen_ai.response.id" = tracing::field::Empty,
            "gen_ai.response.finish_reasons" = tracing::field::Empty,
            "gen_ai.usage.input_tokens" = tracing::field::Empty,
            "gen_ai.usage.output_tokens" = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        propagation::set_remote_parent(&span, parent);
        propagation::record_trace_id(&span);
        let valid = span.in_scope(|| validate_generate(&r, &self.tok, &self.limits(), &self.opts, deadline));
        let valid = match valid {
            Ok(v) => v,
            Err(status) => {
                span.record("otel.status_code", "ERROR");
                span.record("error.type", format!("{:?}", status.code()));
                return Err(status);
            }
        };
        span.record("gen_ai.response.id", valid.request_id.as_str());
        span.record("gen_ai.request.max_tokens", valid.max_new_tokens as i64);
        span.record("gen_ai.request.temperature", valid.sampling.temperature as f64);
        span.record("gen_ai.request.top_p", valid.sampling.top_p as f64);
        span.record("gen_ai.request.top_k", valid.sampling.top_k as i64);
        span.record("gen_ai.request.seed", valid.sampling.seed as i64);
        tracing::debug!(parent: &span, request_id = %valid.request_id, prompt_tokens = valid.prompt_ids.len(), "generate");
        let (tx, rx) = mpsc::unbounded_channel();
        self.scheduler.submit(valid, tx, span)?;
        Ok(Terminated { rx, done: false })
    }

    fn limits(&self) -> ModelLimits {
        ModelLimits {
            vocab_size: self.config.vocab_size,
            max_context: self.config.max_position_embeddings,
            max_total_tokens: self.scheduler.max_total_tokens(),
            eos_token_ids: self.config.eos_token_ids.clone(),
        }
    }
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

/// A request's responses, never ending silently: if the scheduler drops the request without a
/// finish reason or an error (it should not; it did when it crashed), the client gets INTERNAL.
pub struct Terminated {
    rx: mpsc::UnboundedReceiver<Result<GenerateResponse, Status>>,
    done: bool,
}

impl Stream for Terminated {
    type Item = Result<GenerateResponse, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        if self.done {
            return std::task::Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            std::task::Poll::Ready(Some(item)) => {
                let last = match &item {
                    Ok(m) => m.finish_reason != FinishReason::Unspecified as i32,
                    Err(_) => true,
                };
                self.done = last;
                std::task::Poll::Ready(Some(item))
            }
            std::task::Poll::Ready(None) => {
                self.done = true;
                std::task::Poll::Ready(Some(Err(Status::internal(
                    "the request ended without a result: the router's scheduler stopped",
                ))))
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

#[tonic::async_trait]
impl Generation for GenerationService {
    type GenerateStream = GenerateStream;

    async fn generate(&self, req: Request<GenerateRequest>) -> Result<Response<GenerateStream>, Status> {
        let deadline = grpc_timeout(req.metadata()).map(|d| Instant::now() + d);
        let parent = propagation::extract_metadata(req.metadata());
        let stream = self.start(req.into_inner(), deadline, parent)?;
        Ok(Response::new(Box::pin(stream)))
    }

    async fn tokenize(&self, req: Request<TokenizeRequest>) -> Result<Response<TokenizeResponse>, Status> {
        let r = req.into_inner();
        let (ids, tokens) = self
            .tok
            .encode_with_tokens(&r.text, r.add_special_tokens.unwrap_or(true))
            .map_err(|e| Status::invalid_argument(format!("`text`: {e}")))?;
        Ok(Response::new(TokenizeResponse { ids, tokens }))
    }

    async fn detokenize(
        &self,
        req: Request<DetokenizeRequest>,
    ) -> Result<Response<DetokenizeResponse>, Status> {
        let r = req.into_inner();
        if let Some((i, t)) = r.ids.iter().enumerate().find(|(_, &t)| t as usize >= self.config.vocab_size) {
            return Err(Status::invalid_argument(format!(
                "`ids[{i}]` = {t} is outside the vocabulary ({} tokens)",
                self.config.vocab_size
            )));
        }
        let text = self
            .tok
            .decode(&r.ids, r.skip_special_tokens)
            .map_err(|e| Status::invalid_argument(format!("`ids`: {e}")))?;
        Ok(Response::new(DetokenizeResponse { text }))
    }

    async fn render_chat(
        &self,
        req: Request<RenderChatRequest>,
    ) -> Result<Response<RenderChatResponse>, Status> {
        let (prompt, ids) = render_chat_request(&self.tok, &req.into_inner())?;
        Ok(Response::new(RenderChatResponse { prompt, ids }))
    }

    async fn model_info(
        &self,
        _req: Request<ModelInfoRequest>,
    ) -> Result<Response<ModelInfoResponse>, Status> {
        let snap = self.scheduler.snapshot().await;
        let c = &self.config;
        let max_total = self.scheduler.max_total_tokens();
        let stages = snap
            .stages
            .iter()
            .map(|s| {
                let info = s.info.clone().unwrap_or_default();
                StageStatus {
                    address: s.address.clone(),
                    layer_start: info.layer_start,
                    layer_end: info.layer_end,
                    expert_shards: info.expert_shards,
                    device: info.device,
                    kernel: info.kernel,
                    weights: info.weights,
                    healthy: s.healthy,
                    error: s.error.clone(),
                }
            })
            .collect();
        let geometry =
            snap.geometry.unwrap_or(crate::pipeline::CacheGeometry { num_blocks: 0, block_size: 0 });
        Ok(Response::new(ModelInfoResponse {
            model_id: self.opts.model_id.clone(),
            model_type: c.model_type.clone(),
            dtype: snap
                .stages
                .first()
                .and_then(|s| s.info.as_ref())
                .map(|i| i.dtype.clone())
                .unwrap_or_default(),
            vocab_size: c.vocab_size as u32,
            hidden_size: c.hidden_size as u32,
            num_hidden_layers: c.num_hidden_layers as u32,
            num_routed_experts: c.n_routed_experts as u32,
            experts_per_token: c.num_experts_per_tok as u32,
            kv_lora_rank: c.kv_lora_rank as u32,
            qk_rope_head_dim: c.qk_rope_head_dim as u32,
            has_mtp: c.has_mtp(),
            has_chat_template: self.tok.chat_template().is_some(),
            eos_token_ids: c.eos_token_ids.clone(),
            bos_token_id: c.bos_token_id,
            max_position_embeddings: c.max_position_embeddings as u32,
            max_input_tokens: if self.opts.max_input_tokens > 0 {
                self.opts.max_input_tokens.min(max_total.saturating_sub(1)) as u32
            } else {
                max_total.saturating_sub(1) as u32
            },
            max_total_tokens: max_total as u32,
            max_new_tokens: self.opts.max_new_tokens as u32,
            default_max_new_tokens: self.opts.default_max_new_tokens as u32,
            max_stop_sequences: self.opts.max_stop_sequences as u32,
            max_queue: self.opts.max_queue as u32,
            stages,
            healthy: snap.healthy,
            kv_blocks_total: geometry.num_blocks as u32,
            kv_blocks_free: snap.blocks_free as u32,
            block_size: geometry.block_size as u32,
            running_sequences: snap.running as u32,
            waiting_sequences: snap.waiting as u32,
            prefix_cache_hits: snap.prefix.hits,
            prefix_cache_queries: snap.prefix.queries,
            prefix_cached_blocks: snap.cached_blocks as u32,
            speculative_decoding: snap.speculative,
            speculative_drafts: snap.drafts_proposed,
            speculative_accepted: snap.drafts_accepted,
            kv_capacity_tokens: (geometry.num_blocks * geometry.block_size) as u64,
            preemptions: snap.preemptions,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeouts() {
        let mut md = MetadataMap::new();
        for (v, want) in [
            ("100m", Duration::from_millis(100)),
            ("5S", Duration::from_secs(5)),
            ("2M", Duration::from_secs(120)),
            ("7u", Duration::from_micros(7)),
        ] {
            md.insert("grpc-timeout", v.parse().unwrap());
            assert_eq!(grpc_timeout(&md), Some(want), "{v}");
        }
        md.insert("grpc-timeout", "5x".parse().unwrap());
        assert_eq!(grpc_timeout(&md), None);
    }
}
