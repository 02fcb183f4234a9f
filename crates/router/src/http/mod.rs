//! The OpenAI-compatible HTTP front end: `/v1/models`, `/v1/chat/completions`, `/v1/completions`
//! (JSON bodies, or server-sent events ending with `data: [DONE]`) and `/health`.
//!
//! A thin translation: every request becomes one `GenerateRequest` per choice and runs through
//! [`GenerationService::start`], the same validation, template, sampling, limits, scheduler, metrics
//! and traces as gRPC. The same bearer token guards `/v1/*`, the same certificate serves TLS.
//! Closing the connection drops the response streams, which cancels the requests and frees their
//! blocks. Errors are OpenAI's JSON shape.

mod openai;
mod respond;
mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::StreamExt;
use serde_json::{json, Value as Json};
use tokio::net::TcpListener;
use tonic::{Code, Status};

use mlaserve_proto::auth::BearerAuth;
use mlaserve_proto::v1::GenerateRequest;
use mlaserve_telemetry::propagation;

use crate::service::{GenerationService, Terminated};
use respond::{chunk_choice, usage_json, Choice, Kind};

pub use tls::http_tls;
/// The HTTP port's TLS configuration.
pub use tokio_rustls::rustls::ServerConfig as TlsConfig;

/// An error as OpenAI's API returns it.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<String>,
    code: Option<&'static str>,
}

impl ApiError {
    fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }

    fn body(&self) -> Json {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl From<Status> for ApiError {
    fn from(s: Status) -> Self {
        let (status, kind, code) = match s.code() {
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", None)
            }
            Code::Unauthenticated => {
                (StatusCode::UNAUTHORIZED, "authentication_error", Some("invalid_api_key"))
            }
            Code::PermissionDenied => (StatusCode::FORBIDDEN, "permission_error", None),
            Code::NotFound => (StatusCode::NOT_FOUND, "invalid_request_error", Some("not_found")),
            Code::ResourceExhausted => {
                (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", Some("resource_exhausted"))
            }
            Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "server_error", Some("unavailable")),
            Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "server_error", Some("timeout")),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
        };
        ApiError { status, message: s.message().to_string(), kind, param: None, code }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

pub struct HttpApi {
    pub service: Arc<GenerationService>,
    pub auth: BearerAuth,
    pub created: u64,
}

/// The routes, for `serve` and for tests.
pub fn router(api: Arc<HttpApi>, max_body: usize) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .fallback(|| async {
            ApiError { status: StatusCode::NOT_FOUND, ..ApiError::invalid("no such route", None) }
        })
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(api)
}

/// Serves the API on `listener` (with TLS when `tls` is set) until `shutdown` resolves.
pub async fn serve(
    api: Arc<HttpApi>,
    listener: TcpListener,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    max_body: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(api, max_body);
    match tls {
        Some(cfg) => {
            axum::serve(tls::TlsListener::new(listener, cfg), app).with_graceful_shutdown(shutdown).await
        }
        None => {
            // Streamed chunks are small writes: without TCP_NODELAY each waits on the client's
            // delayed ACK (axum 0.8 leaves it to the listener).
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!("TCP_NODELAY: {e}");
                }
            });
            axum::serve(listener, app).with_graceful_shutdown(shutdown).await
        }
    }
}

fn authorize(api: &HttpApi, headers: &HeaderMap) -> Result<(), ApiError> {
    let given = headers.get("authorization").map(|v| v.as_bytes());
    if api.auth.accepts(given) {
        Ok(())
    } else {
        Err(Status::unauthenticated("missing or invalid bearer token (Authorization: Bearer ...)").into())
    }
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("the request body is not valid: {e}"), None))
}

fn check_model(api: &HttpApi, model: Option<&str>) -> Result<(), ApiError> {
    let served = api.service.opts.model_id.as_str();
    match model {
        None | Some("") => Err(ApiError::invalid("`model` is required", Some("model"))),
        Some(m) if m == served => Ok(()),
        Some(m) => Err(ApiError {
            status: StatusCode::NOT_FOUND,
            code: Some("model_not_found"),
            ..ApiError::invalid(
                format!("the model `{m}` does not exist; this server serves `{served}`"),
                Some("model"),
            )
        }),
    }
}

async fn health(State(api): State<Arc<HttpApi>>) -> Response {
    if api.service.scheduler.healthy() {
        (StatusCode::OK, axum::Json(json!({"status": "ok"}))).into_response()
    } else {
        let e: ApiError = Status::unavailable("the model pipeline is not available").into();
        e.into_response()
    }
}

async fn models(State(api): State<Arc<HttpApi>>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&api, &headers)?;
    let id = &api.service.opts.model_id;
    Ok(axum::Json(json!({"object": "list", "data": [{
        "id": id, "object": "model", "created": api.created, "owned_by": "mlaserve",
        "max_model_len": api.service.scheduler.max_total_tokens(),
    }]}))
    .into_response())
}

async fn chat(
    State(api): State<Arc<HttpApi>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(&api, &headers)?;
    let req: openai::ChatRequest = parse(&body)?;
    check_model(&api, req.common.model.as_deref())?;
    if let Some(u) = &req.common.user {
        tracing::debug!(user = %u, "chat completion");
    }
    let n = req.common.choices()?;
    let gens = (0..n).map(|i| req.to_generate(i)).collect::<Result<Vec<_>, _>>()?;
    let wants_logprobs = req.logprobs == Some(true);
    run(api, &headers, Kind::Chat, gens, req.common.stream, req.common.include_usage(), wants_logprobs).await
}

async fn completions(
    State(api): State<Arc<HttpApi>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(&api, &headers)?;
    let req: openai::CompletionRequest = parse(&body)?;
    check_model(&api, req.common.model.as_deref())?;
    if let Some(u) = &req.common.user {
        tracing::debug!(user = %u, "completion");
    }
    let n = req.common.choices()?;
    let gens = (0..n).map(|i| req.to_generate(i)).collect::<Result<Vec<_>, _>>()?;
    let wants_logprobs = req.logprobs.is_some();
    run(api, &headers, Kind::Completion, gens, req.common.stream, req.common.include_usage(), wants_logprobs)
        .await
}

/// Starts every choice, then answers with one JSON body or a stream of chunks.
async fn run(
    api: Arc<HttpApi>,
    headers: &HeaderMap,
    kind: Kind,
    gens: Vec<GenerateRequest>,
    stream: bool,
    include_usage: bool,
    wants_logprobs: bool,
) -> Result<Response, ApiError> {
    let carrier: HashMap<String, String> = ["traceparent", "tracestate"]
        .iter()
        .filter_map(|k| headers.get(*k).and_then(|v| v.to_str().ok()).map(|v| (k.to_string(), v.to_string())))
        .collect();
    let parent = propagation::extract_map(&carrier);
    let streams = gens
        .into_iter()
        .map(|g| api.service.start(g, None, parent.clone()))
        .collect::<Result<Vec<Terminated>, Status>>()?;
    let id =
        format!("{}-{}", if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }, uuid::Uuid::new_v4().simple());
    let created = now_secs();
    let model = api.service.opts.model_id.clone();
    let object = if kind == Kind::Chat { "chat.completion" } else { "text_completion" };
    if !stream {
        let all =
            futures::future::try_join_all(streams.into_iter().map(|s| collect(s, wants_logprobs))).await?;
        let tok = &api.service.tok;
        let choices: Vec<Json> =
            all.iter().enumerate().map(|(i, c)| c.to_json(kind, i as u32, tok)).collect();
        let usage: Vec<_> = all.iter().filter_map(|c| c.usage).collect();
        return Ok(axum::Json(json!({
            "id": id, "object": object, "created": created, "model": model,
            "choices": choices, "usage": usage_json(&usage),
        }))
        .into_response());
    }
    let chunk_object = if kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
    let n = streams.len();
    let merged = futures::stream::select_all(
        streams.into_iter().enumerate().map(|(i, s)| s.map(move |item| (i, item)).boxed()),
    );
    let tok = api.service.tok.clone();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<SseEvent, std::convert::Infallible>>(16);
    // The stream is pumped by a task; when the client leaves, sending fails and the task ends,
    // dropping the response streams, which cancels the requests.
    tokio::spawn(async move {
        let mut merged = merged;
        let mut first = vec![true; n];
        let mut offsets = vec![0usize; n];
        let mut usage = vec![];
        let send = |v: Json| tx.send(Ok(SseEvent::default().data(v.to_string())));
        while let Some((i, item)) = merged.next().await {
            let m = match item {
                Ok(m) => m,
                Err(status) => {
                    let _ = send(ApiError::from(status).body()).await;
                    break;
                }
            };
            if let Some(u) = &m.usage {
                usage.push(*u);
            }
            let choice = chunk_choice(kind, i as u32, &m, first[i], offsets[i], &tok, wants_logprobs);
            offsets[i] += m.text.len();
            // A message that only carried held-back text (a marker, part of a stop string) says nothing.
            let empty = choice["finish_reason"].is_null()
                && choice["logprobs"].is_null()
                && choice.get("delta").is_some_and(|d| d.as_object().is_some_and(|o| o.is_empty()))
                && !first[i];
            first[i] = false;
            if empty {
                continue;
            }
            let chunk = json!({"id": id, "object": chunk_object, "created": created, "model": model,
                               "choices": [choice]});
            if send(chunk).await.is_err() {
                return;
            }
        }
        if include_usage {
            let chunk = json!({"id": id, "object": chunk_object, "created": created, "model": model,
                               "choices": [], "usage": usage_json(&usage)});
            let _ = send(chunk).await;
        }
        let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
    });
    Ok(Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx)).into_response())
}

async fn collect(mut s: Terminated, wants_logprobs: bool) -> Result<Choice, ApiError> {
    let mut c = Choice::new(wants_logprobs);
    while let Some(item) = s.next().await {
        c.add(item?);
    }
    Ok(c)
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
