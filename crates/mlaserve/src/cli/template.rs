// Placeholder replaced by the chat-template work (see crates/router/src/chat_template.rs).
#[derive(clap::Args)]
pub struct Args {}

pub fn run(_a: Args) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
