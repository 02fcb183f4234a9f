//! Helpers for end-to-end tests: the mlaserve binary, the demo model, and processes that announce
//! `MLASERVE_LISTENING <role> <addr>` on stdout.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The binary under test: MLASERVE_BIN, else target/release/mlaserve of this workspace.
pub fn bin() -> PathBuf {
    std::env::var_os("MLASERVE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/release/mlaserve"))
}

/// Builds (once) and returns the demo model directory.
pub fn demo_model() -> PathBuf {
    let out = Command::new(bin()).arg("demo-model").output().expect("run mlaserve demo-model");
    assert!(out.status.success(), "demo-model failed: {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

pub struct Proc {
    pub child: Child,
    /// Announced addresses by kind ("worker", "router", "METRICS").
    pub addrs: HashMap<String, String>,
    pub stderr: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Proc {
    /// Starts `mlaserve <args>` and waits until it announces a `role` address.
    pub fn start(args: &[&str], env: &[(&str, &str)], role: &str) -> Proc {
        let mut cmd = Command::new(bin());
        cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn mlaserve");
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let err = child.stderr.take().expect("piped");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                sink.lock().expect("lock").push(line);
            }
        });
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let mut addrs = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            let Some(Ok(line)) = lines.next() else { break };
            let parts: Vec<&str> = line.split_whitespace().collect();
            match parts.as_slice() {
                ["MLASERVE_LISTENING", r, a] => {
                    addrs.insert(r.to_string(), a.to_string());
                    if *r == role {
                        break;
                    }
                }
                ["MLASERVE_METRICS", a] => {
                    addrs.insert("METRICS".into(), a.to_string());
                }
                _ => {}
            }
        }
        std::thread::spawn(move || for _ in lines {});
        assert!(
            addrs.contains_key(role),
            "mlaserve {args:?} did not announce {role}: {:?}",
            stderr.lock().unwrap()
        );
        Proc { child, addrs, stderr }
    }

    pub fn addr(&self, role: &str) -> &str {
        &self.addrs[role]
    }

    /// SIGTERM, then wait for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY-free: `kill` via the command line keeps this crate free of libc.
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return self.child.wait().expect("wait");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
