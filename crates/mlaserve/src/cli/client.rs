//! `mlaserve complete` / `mlaserve chat`: small clients that stream a reply to the terminal.

use std::io::{BufRead, Write};

use anyhow::Context;
use mlaserve_proto::v1::generation_client::GenerationClient;
use mlaserve_proto::v1::{
    ChatMessage, FinishReason, GenerateRequest, SamplingParameters, StoppingCriteria, Usage,
};
use tonic::transport::Channel;

use super::util::runtime;

#[derive(clap::Args, Clone)]
pub struct Common {
    /// Router address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub target: String,
    #[arg(long)]
    pub max_new_tokens: Option<u32>,
    /// 0 = greedy.
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub top_p: Option<f32>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop strings (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Print token usage and timings after the reply.
    #[arg(long)]
    pub usage: bool,
}

#[derive(clap::Args, Clone)]
pub struct CompleteArgs {
    #[command(flatten)]
    pub common: Common,
    /// The prompt text.
    pub prompt: String,
}

#[derive(clap::Args, Clone)]
pub struct ChatArgs {
    #[command(flatten)]
    pub common: Common,
    /// System prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// A single user message; without it, an interactive session reads lines from stdin.
    pub message: Option<String>,
}

async fn connect(target: &str) -> anyhow::Result<GenerationClient<Channel>> {
    let uri = if target.contains("://") { target.to_string() } else { format!("http://{target}") };
    GenerationClient::connect(uri.clone()).await.with_context(|| format!("connecting to {uri}"))
}

fn request(c: &Common) -> GenerateRequest {
    GenerateRequest {
        sampling: Some(SamplingParameters {
            temperature: c.temperature,
            top_p: c.top_p,
            seed: c.seed,
            ..Default::default()
        }),
        stopping: Some(StoppingCriteria {
            max_new_tokens: c.max_new_tokens,
            stop: c.stop.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Streams one generation to stdout; returns the full text.
async fn stream(
    client: &mut GenerationClient<Channel>,
    req: GenerateRequest,
    show_usage: bool,
) -> anyhow::Result<String> {
    let mut s = client
        .generate(req)
        .await
        .map_err(|e| anyhow::anyhow!("{}: {}", e.code(), e.message()))?
        .into_inner();
    let mut out = std::io::stdout();
    let mut text = String::new();
    let mut usage: Option<(Usage, i32)> = None;
    while let Some(msg) = s.message().await.map_err(|e| anyhow::anyhow!("{}: {}", e.code(), e.message()))? {
        out.write_all(msg.text.as_bytes())?;
        out.flush()?;
        text.push_str(&msg.text);
        if let Some(u) = msg.usage {
            usage = Some((u, msg.finish_reason));
        }
    }
    println!();
    if let (true, Some((u, reason))) = (show_usage, usage) {
        let reason = FinishReason::try_from(reason).map(|r| r.as_str_name()).unwrap_or("?");
        eprintln!(
            "[{} prompt + {} generated tokens, {reason}, first token after {:.3}s, total {:.3}s]",
            u.prompt_tokens, u.completion_tokens, u.time_to_first_token_seconds, u.total_seconds
        );
    }
    Ok(text)
}

pub fn complete(a: CompleteArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let mut client = connect(&a.common.target).await?;
        let mut req = request(&a.common);
        req.prompt = Some(a.prompt.clone());
        stream(&mut client, req, a.common.usage).await?;
        Ok(())
    })
}

pub fn chat(a: ChatArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let mut client = connect(&a.common.target).await?;
        let mut history: Vec<ChatMessage> = vec![];
        if let Some(s) = &a.system {
            history.push(ChatMessage {
                role: "system".into(),
                content: Some(s.clone()),
                ..Default::default()
            });
        }
        let one_shot = a.message.is_some();
        let mut inputs: Box<dyn Iterator<Item = String>> = match &a.message {
            Some(m) => Box::new(std::iter::once(m.clone())),
            None => Box::new(
                std::io::stdin().lock().lines().map_while(Result::ok).collect::<Vec<_>>().into_iter(),
            ),
        };
        if !one_shot {
            eprintln!("(reading messages from stdin, one per line)");
        }
        for line in inputs.by_ref() {
            if line.trim().is_empty() {
                continue;
            }
            history.push(ChatMessage { role: "user".into(), content: Some(line), ..Default::default() });
            let mut req = request(&a.common);
            req.messages = history.clone();
            let reply = stream(&mut client, req, a.common.usage).await?;
            history.push(ChatMessage {
                role: "assistant".into(),
                content: Some(reply),
                ..Default::default()
            });
        }
        Ok(())
    })
}
