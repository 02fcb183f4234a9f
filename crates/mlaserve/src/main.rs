//! `mlaserve`: every role and tool of the serving system in one binary.

mod cli;

use clap::Parser;

/// libgomp (libtorch's OpenMP) reads its wait policy when it loads, before `main`. Its default
/// busy-waits after every parallel region and starves the rayon threads of the bf16 kernels and the
/// async runtime on small machines, so the binary re-executes itself once with a passive policy
/// unless the caller chose one.
fn ensure_passive_openmp() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("OMP_WAIT_POLICY").is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else { return };
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("OMP_WAIT_POLICY", "PASSIVE")
        .exec();
    eprintln!("mlaserve: could not re-execute with OMP_WAIT_POLICY=PASSIVE ({err}); continuing");
}

fn main() -> anyhow::Result<()> {
    ensure_passive_openmp();
    let args = cli::Cli::parse();
    cli::run(args)
}
