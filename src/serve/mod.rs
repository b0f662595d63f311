//! `flux2 serve`: an OpenAI-compatible image server (axum on tokio) that keeps the models resident.
//! One worker per device takes jobs from a bounded queue (full: 429 with Retry-After); responses
//! are OpenAI's shapes, optionally streamed as server-sent events; a client that disconnects
//! cancels its request at the next step; SIGINT/SIGTERM finish the running requests, refuse new
//! ones and exit 0.

pub mod api;
pub mod metrics;
pub mod worker;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Multipart, Request as HttpRequest, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use tokio::sync::mpsc::UnboundedReceiver;

use self::api::{ApiError, GenParams, GenerationBody, RequestLimits};
use self::worker::{Event, GeneratedImage, Job, JobTimings, Shared};
use crate::error::{Error, Result};
use crate::image_io::RgbImage;

/// Everything the HTTP side needs.
pub struct ServerState {
    pub model_id: String,
    pub queue: crossbeam_channel::Sender<Job>,
    pub shared: Arc<Shared>,
    pub limits: RequestLimits,
    pub backends: Vec<Arc<dyn crate::backend::Backend>>,
    pub created: u64,
    /// Largest request body, in bytes.
    pub max_body: usize,
}

type AppState = Arc<ServerState>;

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    crate::rng::mix64(nanos as u64 ^ std::process::id() as u64) % 1_000_000_000
}

/// The router, on a state whose workers already run.
pub fn router(state: AppState, max_body: usize) -> Router {
    Router::new()
        .route("/v1/images/generations", post(generations))
        .route("/v1/images/edits", post(edits))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(|| async { ApiError::not_found("no such endpoint").into_response() })
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(state.clone(), count_requests))
        .with_state(state)
}

/// Count every answer by endpoint and status (for /metrics).
async fn count_requests(State(state): State<AppState>, req: HttpRequest, next: Next) -> Response {
    let endpoint = match req.uri().path() {
        "/v1/images/generations" => "generations",
        "/v1/images/edits" => "edits",
        "/v1/models" => "models",
        "/health" => "health",
        "/metrics" => "metrics",
        _ => "other",
    };
    let response = next.run(req).await;
    state.shared.metrics.count_request(endpoint, response.status().as_u16());
    response
}

async fn generations(
    State(state): State<AppState>,
    body: std::result::Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    // The rejection is taken here, so an oversized or unreadable body gets OpenAI's error JSON.
    let body = match body {
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return ApiError::too_large(format!("the request body is larger than {} bytes", state.max_body))
                .into_response()
        }
        Err(e) => return ApiError::invalid(format!("cannot read the body: {e}"), None).into_response(),
    };
    let parsed: std::result::Result<GenerationBody, _> = serde_json::from_slice(&body);
    let body = match parsed {
        Ok(b) => b,
        Err(e) => return ApiError::invalid(format!("the body is not a valid request: {e}"), None).into_response(),
    };
    match body.validate(vec![], None, state.limits, &mut random_seed) {
        Ok(params) => respond(state, params).await,
        Err(e) => e.into_response(),
    }
}

/// `POST /v1/images/edits`: multipart with `image` / `image[]` files (the references), `prompt`
/// and the generation fields as text.
async fn edits(State(state): State<AppState>, mut form: Multipart) -> Response {
    let mut fields = serde_json::Map::new();
    let mut images = Vec::new();
    let mut mask = None;
    loop {
        let field = match form.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return ApiError::too_large(format!("the request body is too large: {e}")).into_response()
            }
            Err(e) => return ApiError::invalid(format!("bad multipart body: {e}"), None).into_response(),
        };
        let name = field.name().unwrap_or_default().to_string();
        let bytes = match field.bytes().await {
            Ok(b) => b,
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return ApiError::too_large(format!("the request body is too large: {e}")).into_response()
            }
            Err(e) => {
                return ApiError::invalid(format!("bad multipart field `{name}`: {e}"), Some(&name)).into_response()
            }
        };
        match name.as_str() {
            "image" | "image[]" => match RgbImage::decode(&bytes, &format!("image {}", images.len() + 1)) {
                Ok(img) => images.push(img),
                Err(e) => return ApiError::invalid(e.to_string(), Some("image")).into_response(),
            },
            "mask" => match RgbImage::decode_mask(&bytes, "mask") {
                Ok(m) => mask = Some(m),
                Err(e) => return ApiError::invalid(e.to_string(), Some("mask")).into_response(),
            },
            _ => {
                let text = String::from_utf8_lossy(&bytes).to_string();
                fields.insert(name.clone(), form_value(&name, text));
            }
        }
    }
    if images.is_empty() {
        return ApiError::invalid("`image` is required: one or more reference images", Some("image")).into_response();
    }
    let body: GenerationBody = match serde_json::from_value(serde_json::Value::Object(fields)) {
        Ok(b) => b,
        Err(e) => return ApiError::invalid(format!("bad form field: {e}"), None).into_response(),
    };
    match body.validate(images, mask, state.limits, &mut random_seed) {
        Ok(params) => respond(state, params).await,
        Err(e) => e.into_response(),
    }
}

/// A form field's text as the JSON value the same field has in a generation body.
fn form_value(name: &str, text: String) -> serde_json::Value {
    let numeric = matches!(
        name,
        "n" | "width"
            | "height"
            | "num_inference_steps"
            | "guidance_scale"
            | "output_compression"
            | "partial_images"
            | "strength"
    );
    if numeric || name == "seed" || name == "stream" {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            return v;
        }
    }
    serde_json::Value::String(text)
}

/// Sets the job's cancel flag when dropped before the job finished (the client went away).
struct CancelOnDrop {
    cancel: Arc<AtomicBool>,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            self.cancel.store(true, Ordering::Relaxed);
        }
    }
}

fn submit(
    state: &ServerState,
    params: GenParams,
) -> std::result::Result<(UnboundedReceiver<Event>, CancelOnDrop), ApiError> {
    if state.shared.shutting_down.load(Ordering::Relaxed) {
        return Err(ApiError::shutting_down());
    }
    let (events, rx) = tokio::sync::mpsc::unbounded_channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let job = Job { params, events, cancel: cancel.clone(), enqueued: Instant::now() };
    match state.queue.try_send(job) {
        Ok(()) => Ok((rx, CancelOnDrop { cancel, armed: true })),
        Err(crossbeam_channel::TrySendError::Full(_)) => {
            // A rough wait: the queue ahead of it at the recent mean request time.
            Err(ApiError::queue_full(retry_after_seconds(state)))
        }
        Err(crossbeam_channel::TrySendError::Disconnected(_)) => Err(ApiError::shutting_down()),
    }
}

fn retry_after_seconds(state: &ServerState) -> u64 {
    (state.queue.len() as u64).clamp(1, 60)
}

async fn respond(state: AppState, params: GenParams) -> Response {
    let stream = params.stream;
    let (rx, guard) = match submit(&state, params) {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    if stream {
        stream_events(rx, guard).into_response()
    } else {
        collect(rx, guard).await
    }
}

fn image_json(img: &GeneratedImage) -> serde_json::Value {
    serde_json::json!({
        "b64_json": base64::engine::general_purpose::STANDARD.encode(&img.png),
        "seed": img.seed,
        "width": img.width,
        "height": img.height,
    })
}

fn final_json(images: &[GeneratedImage], timings: &JobTimings) -> serde_json::Value {
    serde_json::json!({
        "created": unix_now(),
        "data": images.iter().map(image_json).collect::<Vec<_>>(),
        "seeds": images.iter().map(|i| i.seed).collect::<Vec<_>>(),
        "timings": timings,
        "inference_time_s": timings.total_s - timings.queue_s,
        "peak_memory_mb": timings.peak_memory_mb,
    })
}

/// Wait for the whole job; dropped (client gone) means cancelled.
async fn collect(mut rx: UnboundedReceiver<Event>, mut guard: CancelOnDrop) -> Response {
    let mut images = Vec::new();
    while let Some(event) = rx.recv().await {
        match event {
            Event::Progress { .. } | Event::Partial { .. } => {}
            Event::Image(img) => images.push(img),
            Event::Done(timings) => {
                guard.armed = false;
                images.sort_by_key(|i| i.index);
                return Json(final_json(&images, &timings)).into_response();
            }
            Event::Failed(e) => {
                guard.armed = false;
                return e.into_response();
            }
        }
    }
    guard.armed = false;
    ApiError::server("the worker stopped without an answer").into_response()
}

/// Server-sent events: `flux2.progress` per step, `image_generation.completed` per image (OpenAI's
/// streaming event, which its clients read), then `flux2.done` with seeds and timings, or `error`.
fn stream_events(
    rx: UnboundedReceiver<Event>,
    guard: CancelOnDrop,
) -> Sse<impl futures_util::Stream<Item = std::result::Result<SseEvent, Infallible>>> {
    let stream = futures_util::stream::unfold(
        (rx, guard, Vec::new(), false),
        |(mut rx, mut guard, mut seeds, done)| async move {
            if done {
                return None;
            }
            let event = rx.recv().await;
            let (sse, finished) = match event {
                Some(Event::Progress { image, step, steps }) => {
                    let data = serde_json::json!({"type": "flux2.progress", "image_index": image, "step": step, "steps": steps});
                    (SseEvent::default().event("flux2.progress").data(data.to_string()), false)
                }
                Some(Event::Partial { image, step, png }) => {
                    let data = serde_json::json!({
                        "type": "image_generation.partial_image",
                        "b64_json": base64::engine::general_purpose::STANDARD.encode(&png),
                        "image_index": image,
                        "step": step,
                        "partial_image_index": step,
                        "created_at": unix_now(),
                        "output_format": "png",
                    });
                    (SseEvent::default().event("image_generation.partial_image").data(data.to_string()), false)
                }
                Some(Event::Image(img)) => {
                    seeds.push(img.seed);
                    let mut data = image_json(&img);
                    let extra = serde_json::json!({
                        "type": "image_generation.completed",
                        "image_index": img.index,
                        "created_at": unix_now(),
                        "output_format": "png",
                        "size": format!("{}x{}", img.width, img.height),
                        "quality": "auto",
                        "background": "opaque",
                    });
                    data.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
                    (SseEvent::default().event("image_generation.completed").data(data.to_string()), false)
                }
                Some(Event::Done(timings)) => {
                    guard.armed = false;
                    let data = serde_json::json!({"type": "flux2.done", "seeds": seeds, "timings": timings});
                    (SseEvent::default().event("flux2.done").data(data.to_string()), true)
                }
                Some(Event::Failed(e)) => {
                    guard.armed = false;
                    (SseEvent::default().event("error").data(e.body().to_string()), true)
                }
                None => {
                    guard.armed = false;
                    let e = ApiError::server("the worker stopped without an answer");
                    (SseEvent::default().event("error").data(e.body().to_string()), true)
                }
            };
            Some((Ok(sse), (rx, guard, seeds, finished)))
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn models(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "object": "list",
        "data": [{"id": state.model_id, "object": "model", "created": state.created, "owned_by": "flux2"}],
    }))
}

fn gauges(state: &ServerState) -> metrics::Gauges {
    metrics::Gauges {
        queue_depth: state.queue.len(),
        running: state.shared.running.load(Ordering::Relaxed),
        device_memory: state.backends.iter().map(crate::device::memory).collect(),
    }
}

async fn health(State(state): State<AppState>) -> Response {
    let g = gauges(&state);
    let shutting_down = state.shared.shutting_down.load(Ordering::Relaxed);
    let body = serde_json::json!({
        "status": if shutting_down { "shutting_down" } else { "ok" },
        "model": state.model_id,
        "devices": state.backends.iter().map(|b| b.name()).collect::<Vec<_>>(),
        "queue_depth": g.queue_depth,
        "queue_capacity": state.queue.capacity(),
        "running": g.running,
    });
    let status = if shutting_down { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    (status, Json(body)).into_response()
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    let text = state.shared.metrics.render(&gauges(&state));
    ([("content-type", "text/plain; version=0.0.4")], text).into_response()
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Serve on `addr` until a signal; the workers already hold their pipelines.
pub fn serve(
    addr: &str,
    model_id: String,
    workers: Vec<worker::Worker>,
    queue_capacity: usize,
    max_body: usize,
    limits: RequestLimits,
) -> Result<()> {
    let (tx, rx) = crossbeam_channel::bounded::<Job>(queue_capacity);
    let shared = Arc::new(Shared::default());
    let backends = workers.iter().map(|w| w.pipeline.backend().clone()).collect();
    let mut threads = Vec::new();
    for w in workers {
        let (rx, shared) = (rx.clone(), shared.clone());
        let name = format!("flux2-worker-{}", w.device);
        let t = std::thread::Builder::new().name(name).spawn(move || w.run(rx, shared));
        threads.push(t.map_err(|e| Error::Other(format!("cannot start a worker thread: {e}")))?);
    }
    drop(rx);
    let state = Arc::new(ServerState {
        model_id,
        queue: tx,
        shared: shared.clone(),
        limits,
        backends,
        created: unix_now(),
        max_body,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Other(format!("cannot start the async runtime: {e}")))?;
    let app = router(state.clone(), max_body);
    let model_id = state.model_id.clone();
    let result = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::InvalidArgument(format!("cannot listen on {addr}: {e}")))?;
        let local = listener.local_addr().map_err(|e| Error::Other(e.to_string()))?;
        // Tests and scripts read this line to find the port (`--port 0` picks a free one).
        println!("flux2 serve: listening on http://{local}");
        tracing::info!("serving {model_id} on http://{local}");
        let on_signal = {
            let shared = shared.clone();
            async move {
                shutdown_signal().await;
                shared.shutting_down.store(true, Ordering::Relaxed);
                tracing::info!("shutting down: finishing running requests, refusing new ones");
            }
        };
        axum::serve(listener, app)
            .with_graceful_shutdown(on_signal)
            .await
            .map_err(|e| Error::Other(format!("the server failed: {e}")))
    });
    // Closing the queue ends the workers once their running jobs finish.
    drop(state);
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    for t in threads {
        let _ = t.join();
    }
    result
}
