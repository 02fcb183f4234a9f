//! TLS on the public port, mutual TLS between router and workers, and bearer-token auth, with
//! certificates made here by rcgen.

use std::path::Path;
use std::time::{Duration, Instant};

use mlaserve_e2e::{demo_model, Proc};
use mlaserve_proto::internal::v1::stage_client::StageClient;
use mlaserve_proto::internal::v1::InfoRequest;
use mlaserve_proto::v1::generation_client::GenerationClient;
use mlaserve_proto::v1::{GenerateRequest, ModelInfoRequest, SamplingParameters, StoppingCriteria};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

struct Pki {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn new_ca(name: &str) -> Pki {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().unwrap();
    let cert = p.self_signed(&key).unwrap();
    Pki { ca_pem: cert.pem(), issuer: Issuer::new(p, key) }
}

/// A leaf certificate for `names`, signed by `ca`: (cert PEM, key PEM).
fn leaf(ca: &Pki, names: &[&str]) -> (String, String) {
    let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, names[0]);
    p.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

async fn tls_channel(
    addr: &str,
    ca: &str,
    identity: Option<(&str, &str)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut cfg = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).domain_name("localhost");
    if let Some((c, k)) = identity {
        cfg = cfg.identity(Identity::from_pem(c, k));
    }
    Endpoint::from_shared(format!("https://{addr}"))?.tls_config(cfg)?.connect().await
}

const TOKEN: &str = "tok-6f1d2a9c-secret";

fn authed<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    r
}

fn small_request() -> GenerateRequest {
    GenerateRequest {
        prompt: Some("hello".into()),
        sampling: Some(SamplingParameters { temperature: Some(0.0), ..Default::default() }),
        stopping: Some(StoppingCriteria { max_new_tokens: Some(4), ignore_eos: true, ..Default::default() }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_mutual_tls_and_bearer_auth() {
    let dir = std::env::temp_dir().join(format!("mlaserve-pki-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = new_ca("mlaserve test CA");
    let rogue = new_ca("someone else");
    let (server_cert, server_key) = leaf(&ca, &["localhost", "127.0.0.1"]);
    let (client_cert, client_key) = leaf(&ca, &["mlaserve-router"]);
    let (rogue_cert, rogue_key) = leaf(&rogue, &["intruder"]);
    let ca_path = write(&dir, "ca.pem", &ca.ca_pem);
    let env = vec![
        ("MLASERVE_SECURITY__TLS_CERT", write(&dir, "server.pem", &server_cert)),
        ("MLASERVE_SECURITY__TLS_KEY", write(&dir, "server.key", &server_key)),
        ("MLASERVE_SECURITY__TLS_CLIENT_CA", ca_path.clone()),
        ("MLASERVE_SECURITY__STAGE_CA", ca_path.clone()),
        ("MLASERVE_SECURITY__STAGE_CLIENT_CERT", write(&dir, "client.pem", &client_cert)),
        ("MLASERVE_SECURITY__STAGE_CLIENT_KEY", write(&dir, "client.key", &client_key)),
        ("MLASERVE_SECURITY__STAGE_SERVER_NAME", "localhost".to_string()),
        ("MLASERVE_AUTH_TOKEN", TOKEN.to_string()),
        ("MLASERVE_THREADS", "1".to_string()),
        ("RUST_LOG", "debug".to_string()),
    ];
    // Workers require client certificates; the router's public port does not (its clients use tokens).
    let worker_env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let router_env: Vec<(&str, &str)> =
        worker_env.iter().filter(|(k, _)| *k != "MLASERVE_SECURITY__TLS_CLIENT_CA").copied().collect();
    let model = demo_model();
    let m = model.to_str().unwrap();
    let w0 = Proc::start(
        &["worker", "--model", m, "--layers", "0..2", "--listen", "127.0.0.1:0"],
        &worker_env,
        "worker",
    );
    let w1 = Proc::start(
        &["worker", "--model", m, "--layers", "2..4", "--listen", "127.0.0.1:0"],
        &worker_env,
        "worker",
    );
    let (a0, a1) = (w0.addr("worker").to_string(), w1.addr("worker").to_string());
    let r = Proc::start(
        &[
            "router",
            "--model",
            m,
            "--listen",
            "127.0.0.1:0",
            "--stage",
            &a0,
            "--stage",
            &a1,
            "--http-listen",
            "127.0.0.1:0",
        ],
        &router_env,
        "router",
    );
    let raddr = r.addr("router").to_string();

    // The public port speaks TLS; with the token, generation works through mutual TLS to the workers.
    let ch = tls_channel(&raddr, &ca.ca_pem, None).await.expect("TLS to the router");
    let mut client = GenerationClient::new(ch.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match client.model_info(authed(ModelInfoRequest {})).await {
            Ok(i) if i.get_ref().healthy => break,
            other => assert!(Instant::now() < deadline, "router never healthy: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut s = client.generate(authed(small_request())).await.expect("generate").into_inner();
    let mut n = 0;
    while let Some(msg) = s.message().await.expect("stream") {
        n += msg.token_ids.len();
    }
    assert_eq!(n, 4);

    // Without the token: UNAUTHENTICATED; with a wrong one too. Health stays open.
    let err = client.generate(Request::new(small_request())).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut wrong = Request::new(small_request());
    wrong.metadata_mut().insert("authorization", "Bearer nope".parse().unwrap());
    assert_eq!(client.generate(wrong).await.unwrap_err().code(), Code::Unauthenticated);
    let health = HealthClient::new(ch.clone())
        .check(HealthCheckRequest { service: String::new() })
        .await
        .expect("health answers without a token");
    assert_eq!(health.into_inner().status, ServingStatus::Serving as i32);

    // Plaintext to the TLS port fails.
    let plain = Endpoint::from_shared(format!("http://{raddr}")).unwrap().connect().await;
    if let Ok(ch) = plain {
        assert!(GenerationClient::new(ch).model_info(authed(ModelInfoRequest {})).await.is_err());
    }

    // A worker rejects callers without a certificate from its CA.
    let no_cert = tls_channel(&a0, &ca.ca_pem, None).await;
    let refused = match no_cert {
        Err(_) => true,
        Ok(ch) => StageClient::new(ch).info(InfoRequest {}).await.is_err(),
    };
    assert!(refused, "a client without a certificate got in");
    let rogue_ch = tls_channel(&a0, &ca.ca_pem, Some((&rogue_cert, &rogue_key))).await;
    let refused = match rogue_ch {
        Err(_) => true,
        Ok(ch) => StageClient::new(ch).info(InfoRequest {}).await.is_err(),
    };
    assert!(refused, "a client with a foreign certificate got in");
    let good = tls_channel(&a0, &ca.ca_pem, Some((&client_cert, &client_key))).await.expect("mTLS");
    assert_eq!(StageClient::new(good).info(InfoRequest {}).await.unwrap().into_inner().layer_end, 2);

    // The OpenAI HTTP port serves TLS with the same certificate and requires the same token.
    let port = r.addr("http").rsplit(':').next().unwrap().to_string();
    let url = format!("https://localhost:{port}/v1/models");
    let curl = |extra: &[&str]| {
        let resolve = format!("localhost:{port}:127.0.0.1");
        let out = std::process::Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--cacert",
                &ca_path,
                "--resolve",
                &resolve,
            ])
            .args(extra)
            .arg(&url)
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let bearer = format!("Authorization: Bearer {TOKEN}");
    assert_eq!(curl(&["-H", &bearer]), "200");
    assert_eq!(curl(&[]), "401");
    // The CLI client over TLS with the token.
    let out = std::process::Command::new(mlaserve_e2e::bin())
        .args(["complete", "hello", "--max-new-tokens", "3", "--target", &raddr, "--ca", &ca_path])
        .args(["--server-name", "localhost"])
        .env("MLASERVE_AUTH_TOKEN", TOKEN)
        .output()
        .expect("mlaserve complete");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = std::process::Command::new(mlaserve_e2e::bin())
        .args(["complete", "hello", "--target", &raddr, "--ca", &ca_path, "--server-name", "localhost"])
        .env_remove("MLASERVE_AUTH_TOKEN")
        .output()
        .expect("mlaserve complete");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("bearer token"));

    drop(client);
    let logs: Vec<String> = r.stderr.lock().unwrap().clone();
    assert!(r.terminate().success());
    drop((w0, w1));
    // No secrets in logs (debug level).
    assert!(!logs.is_empty());
    assert!(logs.iter().all(|l| !l.contains(TOKEN)), "the bearer token leaked into the logs");
    let _ = std::fs::remove_dir_all(&dir);
}
