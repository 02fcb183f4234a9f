//! Traces across processes: a router and two worker processes export to an OTLP receiver running
//! inside this test; one request's spans share the client's trace and parent links.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mlaserve_e2e::{demo_model, Proc};
use mlaserve_proto::v1::generation_client::GenerationClient;
use mlaserve_proto::v1::{GenerateRequest, ModelInfoRequest, SamplingParameters, StoppingCriteria};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use tonic::{Request, Response, Status};

#[derive(Clone, Default)]
struct Receiver {
    traces: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        req: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        self.traces.lock().unwrap().push(req.into_inner());
        Ok(Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[tonic::async_trait]
impl MetricsService for Receiver {
    async fn export(
        &self,
        req: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        self.metrics.lock().unwrap().push(req.into_inner());
        Ok(Response::new(ExportMetricsServiceResponse { partial_success: None }))
    }
}

async fn start_receiver() -> (Receiver, String) {
    let r = Receiver::default();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let svc = r.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(svc.clone()))
            .add_service(MetricsServiceServer::new(svc))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l))
            .await
            .unwrap();
    });
    (r, format!("http://{addr}"))
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attrs.iter().find(|a| a.key == key).and_then(|a| a.value.as_ref()).and_then(|v| v.value.as_ref())
}

fn attr_str(attrs: &[KeyValue], key: &str) -> Option<String> {
    match attr(attrs, key)? {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        Value::DoubleValue(d) => Some(d.to_string()),
        Value::BoolValue(b) => Some(b.to_string()),
        other => Some(format!("{other:?}")),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// (service.name, stage layers, span) for every exported span.
fn flatten(reqs: &[ExportTraceServiceRequest]) -> Vec<(String, Option<String>, Span)> {
    let mut out = vec![];
    for req in reqs {
        for rs in &req.resource_spans {
            let res = rs.resource.as_ref().map(|r| r.attributes.clone()).unwrap_or_default();
            let service = attr_str(&res, "service.name").unwrap_or_default();
            let layers = attr_str(&res, "mlaserve.stage.layers");
            for ss in &rs.scope_spans {
                for s in &ss.spans {
                    out.push((service.clone(), layers.clone(), s.clone()));
                }
            }
        }
    }
    out
}

async fn wait_healthy(addr: &str) -> GenerationClient<tonic::transport::Channel> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(mut c) = GenerationClient::connect(format!("http://{addr}")).await {
            if let Ok(info) = c.model_info(ModelInfoRequest {}).await {
                if info.into_inner().healthy {
                    return c;
                }
            }
        }
        assert!(Instant::now() < deadline, "router {addr} never became healthy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

async fn run_one_request(client: &mut GenerationClient<tonic::transport::Channel>, traceparent: bool) {
    let mut req = Request::new(GenerateRequest {
        prompt: Some("The river".into()),
        sampling: Some(SamplingParameters { temperature: Some(0.0), ..Default::default() }),
        stopping: Some(StoppingCriteria { max_new_tokens: Some(5), ignore_eos: true, ..Default::default() }),
        ..Default::default()
    });
    if traceparent {
        req.metadata_mut().insert("traceparent", format!("00-{TRACE_ID}-{CLIENT_SPAN}-01").parse().unwrap());
    }
    let mut stream = client.generate(req).await.expect("generate").into_inner();
    let mut n = 0;
    while let Some(m) = stream.message().await.expect("stream") {
        n += m.token_ids.len();
    }
    assert_eq!(n, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_is_one_trace_across_router_and_two_workers() {
    let (rx, endpoint) = start_receiver().await;
    let model = demo_model();
    let m = model.to_str().unwrap();
    let env = [("OTEL_BSP_SCHEDULE_DELAY", "100"), ("MLASERVE_THREADS", "1")];
    let common = ["--listen", "127.0.0.1:0", "--otlp-endpoint", endpoint.as_str(), "--dtype", "f32"];
    let w0 =
        Proc::start(&[&["worker", "--model", m, "--layers", "0..2"][..], &common].concat(), &env, "worker");
    let w1 =
        Proc::start(&[&["worker", "--model", m, "--layers", "2..4"][..], &common].concat(), &env, "worker");
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
            "--otlp-endpoint",
            &endpoint,
            "--model-id",
            "demo",
        ],
        &env,
        "router",
    );
    let mut client = wait_healthy(r.addr("router")).await;
    run_one_request(&mut client, true).await;
    drop(client);
    // Terminating flushes every exporter.
    assert!(r.terminate().success());
    assert!(w0.terminate().success());
    assert!(w1.terminate().success());
    tokio::time::sleep(Duration::from_millis(300)).await;

    let spans = flatten(&rx.traces.lock().unwrap());
    let in_trace: Vec<_> = spans.iter().filter(|(_, _, s)| hex(&s.trace_id) == TRACE_ID).collect();
    let gen = in_trace
        .iter()
        .find(|(svc, _, s)| svc == "mlaserve-router" && s.name == "text_completion demo")
        .unwrap_or_else(|| {
            panic!("no request span; got {:?}", spans.iter().map(|s| &s.2.name).collect::<Vec<_>>())
        });
    let gen = &gen.2;
    assert_eq!(hex(&gen.parent_span_id), CLIENT_SPAN, "the client's traceparent is the parent");
    let a = &gen.attributes;
    assert_eq!(attr_str(a, "gen_ai.operation.name").as_deref(), Some("text_completion"));
    assert_eq!(attr_str(a, "gen_ai.provider.name").as_deref(), Some("mlaserve"));
    assert_eq!(attr_str(a, "gen_ai.request.model").as_deref(), Some("demo"));
    assert_eq!(attr_str(a, "gen_ai.request.max_tokens").as_deref(), Some("5"));
    assert_eq!(attr_str(a, "gen_ai.request.temperature").as_deref(), Some("0"));
    assert_eq!(attr_str(a, "gen_ai.usage.output_tokens").as_deref(), Some("5"));
    assert!(attr_str(a, "gen_ai.usage.input_tokens").unwrap().parse::<u32>().unwrap() > 0);
    assert!(attr_str(a, "gen_ai.response.finish_reasons").unwrap().contains("length"));
    assert!(gen.events.iter().any(|e| e.name == "first_token"), "first-token event");

    let children: HashMap<&str, usize> = in_trace
        .iter()
        .filter(|(_, _, s)| s.parent_span_id == gen.span_id)
        .fold(HashMap::new(), |mut m, (_, _, s)| {
            *m.entry(s.name.as_str()).or_default() += 1;
            m
        });
    assert!(children.contains_key("tokenize") && children.contains_key("queue"), "{children:?}");
    // One step for the prefill and one per further token, each a child of the request.
    assert!(children.get("step").copied().unwrap_or(0) >= 5, "{children:?}");
    let steps: Vec<&Vec<u8>> = in_trace
        .iter()
        .filter(|(_, _, s)| s.name == "step" && s.parent_span_id == gen.span_id)
        .map(|(_, _, s)| &s.span_id)
        .collect();
    for layers in ["0..2", "2..4"] {
        let forwards: Vec<_> = in_trace
            .iter()
            .filter(|(svc, l, s)| {
                svc == "mlaserve-worker"
                    && l.as_deref() == Some(layers)
                    && s.name.starts_with("stage_forward")
            })
            .collect();
        assert!(forwards.len() >= 5, "worker {layers}: {} stage spans in the trace", forwards.len());
        for (_, _, s) in forwards {
            assert!(steps.contains(&&s.parent_span_id), "stage span parented to a step");
            assert!(
                attr_str(&s.attributes, "batch_size").is_some()
                    && attr_str(&s.attributes, "tokens").is_some()
            );
        }
    }
    // Metrics went over OTLP too.
    let metrics = rx.metrics.lock().unwrap();
    let names: Vec<String> = metrics
        .iter()
        .flat_map(|r| &r.resource_metrics)
        .flat_map(|rm| &rm.scope_metrics)
        .flat_map(|sm| &sm.metrics)
        .map(|m| m.name.clone())
        .collect();
    assert!(names.iter().any(|n| n == "gen_ai.server.time_to_first_token"), "{names:?}");
    assert!(names.iter().any(|n| n == "mlaserve.stage.forward.duration"), "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_exported_without_an_endpoint() {
    let (rx, _endpoint) = start_receiver().await;
    let model = demo_model();
    let m = model.to_str().unwrap();
    // No --otlp-endpoint and no OTEL_EXPORTER_OTLP_ENDPOINT: no exporter is created at all.
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", ""), ("MLASERVE_THREADS", "1")];
    let w =
        Proc::start(&["worker", "--model", m, "--layers", "0..4", "--listen", "127.0.0.1:0"], &env, "worker");
    let wa = w.addr("worker").to_string();
    let r = Proc::start(&["router", "--model", m, "--listen", "127.0.0.1:0", "--stage", &wa], &env, "router");
    let mut client = wait_healthy(r.addr("router")).await;
    run_one_request(&mut client, true).await;
    drop(client);
    assert!(r.terminate().success());
    assert!(w.terminate().success());
    assert!(rx.traces.lock().unwrap().is_empty());
    assert!(rx.metrics.lock().unwrap().is_empty());
}
