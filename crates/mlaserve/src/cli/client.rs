//! `mlaserve complete` / `mlaserve chat`: small clients that stream a reply to the terminal.

use std::io::{BufRead, Write};

use anyhow::Context;
use mlaserve_proto::transport::{self, ClientTls, StageToken};
use mlaserve_proto::v1::generation_client::GenerationClient;
use mlaserve_proto::v1::{
    ChatMessage, FinishReason, GenerateRequest, SamplingParameters, StoppingCriteria, Usage,
};
use tonic::service::interceptor::InterceptedService;
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
    /// PEM CA to verify the router's TLS certificate with (connects over TLS).
    #[arg(long)]
    pub ca: Option<std::path::PathBuf>,
    /// Server name in the router's certificate [default: the target's host].
    #[arg(long)]
    pub server_name: Option<String>,
    /// Bearer token for the router's public API.
    #[arg(long, env = "MLASERVE_AUTH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
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

type Client = GenerationClient<InterceptedService<Channel, StageToken>>;

async fn connect(c: &Common) -> anyhow::Result<Client> {
    let tls = ClientTls {
        ca: c.ca.as_ref().map(std::fs::read).transpose().context("reading --ca")?,
        server_name: c.server_name.clone(),
        ..Default::default()
    };
    let ch = transport::connect(&c.target, &tls, std::time::Duration::from_secs(10))
        .await
        .map_err(|e| anyhow::anyhow!("connecting to {}: {}", c.target, e.message()))?;
    let token =
        StageToken::new(c.token.as_deref()).map_err(|e| anyhow::anyhow!("--token: {}", e.message()))?;
    Ok(GenerationClient::with_interceptor(ch, token))
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
async fn stream(client: &mut Client, req: GenerateRequest, show_usage: bool) -> anyhow::Result<String> {
    let mut s = client
        .generate(req)
        .await
        .map_err(|e| anyhow::anyhow!("{}: {}", e.code(), e.message()))?
        .into_inner();
    let mut out = std::io::stdout();
    let mut text = String::new();
    let mut usage: Option<(Usage, i32)> = None;
    // Reasoning dimmed on a terminal; tool calls shown as calls.
    let tty = std::io::IsTerminal::is_terminal(&out);
    let (dim, plain) = if tty { ("\x1b[2m", "\x1b[0m") } else { ("", "") };
    let mut open_call = false;
    while let Some(msg) = s.message().await.map_err(|e| anyhow::anyhow!("{}: {}", e.code(), e.message()))? {
        if !msg.reasoning_text.is_empty() {
            write!(out, "{dim}{}{plain}", msg.reasoning_text)?;
        }
        out.write_all(msg.text.as_bytes())?;
        for d in &msg.tool_calls {
            if !d.name.is_empty() {
                let close = if open_call { ")" } else { "" };
                write!(out, "{close}\n[tool call {} {}] {}(", d.index, d.id, d.name)?;
                open_call = true;
            }
            write!(out, "{}", d.arguments)?;
        }
        out.flush()?;
        text.push_str(&msg.text);
        if msg.finish_reason != FinishReason::Unspecified as i32 && open_call {
            write!(out, ")")?;
            open_call = false;
        }
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
        let mut client = connect(&a.common).await?;
        let mut req = request(&a.common);
        req.prompt = Some(a.prompt.clone());
        stream(&mut client, req, a.common.usage).await?;
        Ok(())
    })
}

pub fn chat(a: ChatArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let mut client = connect(&a.common).await?;
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
