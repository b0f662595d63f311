//! `flux2 serve` over real HTTP on the tiny fixture pipeline: generations, edits, streaming, n > 1,
//! seed lists, every error class, queue full, cancellation, graceful shutdown, images equal to the
//! CLI's, and a bounded load test (loopback only).

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{fixtures, run_cli};
use flux2::image_io::RgbImage;

/// A server process on a free port, killed when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let model = fixtures().join("pipeline");
        let cache = std::env::temp_dir().join("flux2-test-cache");
        let mut child = Command::new(env!("CARGO_BIN_EXE_flux2"))
            .args(["serve", "--model", model.to_str().unwrap(), "--port", "0", "--device", "cpu"])
            .args(extra)
            .env("FLUX2_CACHE_DIR", cache)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let url = line.trim().strip_prefix("flux2 serve: listening on ").expect(&line).to_string();
        Server { child, url }
    }

    fn post_json(&self, body: &serde_json::Value) -> reqwest::blocking::Response {
        client().post(format!("{}/v1/images/generations", self.url)).json(body).send().unwrap()
    }

    fn get(&self, path: &str) -> reqwest::blocking::Response {
        client().get(format!("{}{path}", self.url)).send().unwrap()
    }

    /// SIGTERM, then the exit status.
    #[cfg(unix)]
    fn terminate(mut self) -> std::process::ExitStatus {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        std::mem::forget(self);
        status
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(Duration::from_secs(300)).build().unwrap()
}

fn decode_png(b64: &str) -> RgbImage {
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
    RgbImage::decode(&bytes, "response").unwrap()
}

fn json(r: reqwest::blocking::Response) -> (u16, serde_json::Value) {
    let status = r.status().as_u16();
    (status, r.json().unwrap())
}

/// The CLI's image for the same parameters.
fn cli_image(dir: &Path, seed: u64, size: u32, refs: &[&Path]) -> RgbImage {
    let out = dir.join(format!("cli-{seed}.png"));
    let model = fixtures().join("pipeline");
    let (s, seed) = (size.to_string(), seed.to_string());
    let mut args = vec!["generate", "--model", model.to_str().unwrap(), "--prompt", "a red fox", "--seed", &seed];
    args.extend(["--width", &s, "--height", &s, "--out", out.to_str().unwrap(), "--device", "cpu"]);
    for r in refs {
        args.extend(["--ref", r.to_str().unwrap()]);
    }
    let (ok, _, err) = run_cli(&args);
    assert!(ok, "{err}");
    RgbImage::load(&out).unwrap()
}

#[test]
fn generations_match_the_cli_with_seed_lists_and_n() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&[]);
    let (status, body) = server.post_json(&serde_json::json!({
        "prompt": "a red fox", "n": 2, "size": "32x32", "seed": [5, 9], "response_format": "b64_json", "model": "any"
    }))
    .pipe(json);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["seeds"], serde_json::json!([5, 9]));
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    for (item, seed) in data.iter().zip([5, 9]) {
        let img = decode_png(item["b64_json"].as_str().unwrap());
        assert_eq!((img.width, img.height), (32, 32));
        assert_eq!(img, cli_image(tmp.path(), seed, 32, &[]), "seed {seed}: the server's image differs from the CLI's");
    }
    assert!(body["timings"]["denoise_s"].as_f64().unwrap() > 0.0, "{body}");
    // One seed for n images: seed, seed+1, ...
    let (status, body) =
        server.post_json(&serde_json::json!({"prompt": "a red fox", "n": 3, "size": "32x32", "seed": 40})).pipe(json);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["seeds"], serde_json::json!([40, 41, 42]));
}

#[test]
fn edits_take_reference_images() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&[]);
    let reference = tmp.path().join("ref.png");
    let pixels: Vec<u8> = (0..64 * 64 * 3).map(|i| (i * 7 % 251) as u8).collect();
    RgbImage { width: 64, height: 64, data: pixels }.save_png(&reference, &[]).unwrap();
    let form = reqwest::blocking::multipart::Form::new()
        .text("prompt", "a red fox")
        .text("seed", "3")
        .text("n", "1")
        .file("image[]", &reference)
        .unwrap();
    let r = client().post(format!("{}/v1/images/edits", server.url)).multipart(form).send().unwrap();
    let (status, body) = json(r);
    assert_eq!(status, 200, "{body}");
    let img = decode_png(body["data"][0]["b64_json"].as_str().unwrap());
    // The size follows the reference, and the image is the CLI's `--ref` run.
    assert_eq!(img, cli_image(tmp.path(), 3, 64, &[&reference]));
    // A file that is not an image, and no image at all.
    let form = reqwest::blocking::multipart::Form::new()
        .text("prompt", "x")
        .part("image", reqwest::blocking::multipart::Part::bytes(b"not a png".to_vec()).file_name("a.png"));
    let (status, body) = json(client().post(format!("{}/v1/images/edits", server.url)).multipart(form).send().unwrap());
    assert_eq!((status, body["error"]["param"].as_str()), (400, Some("image")), "{body}");
    let form = reqwest::blocking::multipart::Form::new().text("prompt", "x");
    let (status, body) = json(client().post(format!("{}/v1/images/edits", server.url)).multipart(form).send().unwrap());
    assert_eq!(status, 400, "{body}");
}

#[test]
fn edits_with_a_mask_inpaint_as_the_cli_does() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&[]);
    let image = tmp.path().join("image.png");
    let pixels: Vec<u8> = (0..64 * 48 * 3).map(|i| (i * 13 % 241) as u8).collect();
    RgbImage { width: 64, height: 48, data: pixels }.save_png(&image, &[]).unwrap();
    // OpenAI's mask: transparent where the image is to be edited (the left half here).
    let mask_rgba = image::RgbaImage::from_fn(64, 48, |x, _| image::Rgba([0, 0, 0, if x < 32 { 0 } else { 255 }]));
    let mask_path = tmp.path().join("mask.png");
    mask_rgba.save(&mask_path).unwrap();
    let form = reqwest::blocking::multipart::Form::new()
        .text("prompt", "a red fox")
        .text("seed", "3")
        .text("strength", "0.75")
        .file("image", &image)
        .unwrap()
        .file("mask", &mask_path)
        .unwrap();
    let (status, body) = json(client().post(format!("{}/v1/images/edits", server.url)).multipart(form).send().unwrap());
    assert_eq!(status, 200, "{body}");
    let got = decode_png(body["data"][0]["b64_json"].as_str().unwrap());
    // The same edit from the CLI, with the mask in its white-means-repaint form.
    let white_left = tmp.path().join("white-left.png");
    let data = (0..48).flat_map(|_| (0..64).flat_map(|x| [if x < 32 { 255u8 } else { 0 }; 3])).collect();
    RgbImage { width: 64, height: 48, data }.save_png(&white_left, &[]).unwrap();
    let out = tmp.path().join("cli.png");
    let model = fixtures().join("pipeline");
    let args = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a red fox",
        "--seed",
        "3",
        "--init-image",
        image.to_str().unwrap(),
        "--mask",
        white_left.to_str().unwrap(),
        "--strength",
        "0.75",
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ];
    let (ok, _, err) = run_cli(&args);
    assert!(ok, "{err}");
    assert_eq!(got, RgbImage::load(&out).unwrap(), "the server's inpainting differs from the CLI's");
    // A mask of another size.
    let small = tmp.path().join("small-mask.png");
    image::RgbaImage::new(16, 16).save(&small).unwrap();
    let form = reqwest::blocking::multipart::Form::new()
        .text("prompt", "x")
        .file("image", &image)
        .unwrap()
        .file("mask", &small)
        .unwrap();
    let (status, body) = json(client().post(format!("{}/v1/images/edits", server.url)).multipart(form).send().unwrap());
    assert_eq!((status, body["error"]["param"].as_str()), (400, Some("mask")), "{body}");
}

#[test]
fn streaming_sends_progress_then_images() {
    let server = Server::start(&[]);
    let r = server.post_json(&serde_json::json!({
        "prompt": "a red fox", "n": 2, "size": "32x32", "seed": 1, "num_inference_steps": 3, "stream": true,
        "partial_images": 1
    }));
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let text = r.text().unwrap();
    let events: Vec<(String, serde_json::Value)> = text
        .split("\n\n")
        .filter_map(|block| {
            let event = block.lines().find_map(|l| l.strip_prefix("event: "))?;
            let data = block.lines().find_map(|l| l.strip_prefix("data: "))?;
            Some((event.to_string(), serde_json::from_str(data).unwrap()))
        })
        .collect();
    let kinds: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    let progress = kinds.iter().filter(|k| **k == "flux2.progress").count();
    assert_eq!(progress, 6, "3 steps x 2 images: {kinds:?}");
    let images: Vec<_> = events.iter().filter(|(e, _)| e == "image_generation.completed").collect();
    assert_eq!(images.len(), 2, "{kinds:?}");
    assert_eq!(images[0].1["type"], "image_generation.completed");
    assert_eq!(decode_png(images[1].1["b64_json"].as_str().unwrap()).width, 32);
    assert_eq!(kinds.last(), Some(&"flux2.done"), "{kinds:?}");
    // partial_images 1: one preview per image (after step 2 of 3), before that image completes.
    let partial: Vec<_> = events.iter().filter(|(e, _)| e == "image_generation.partial_image").collect();
    assert_eq!(partial.len(), 2, "{kinds:?}");
    assert_eq!(partial[0].1["step"], 2);
    assert_eq!(decode_png(partial[0].1["b64_json"].as_str().unwrap()).width, 4, "previews are 1/8 of the image");
    let first_partial = kinds.iter().position(|k| *k == "image_generation.partial_image").unwrap();
    let first_image = kinds.iter().position(|k| *k == "image_generation.completed").unwrap();
    assert!(first_partial < first_image, "{kinds:?}");
    assert_eq!(events.last().unwrap().1["seeds"], serde_json::json!([1, 2]));
}

#[test]
fn every_error_class_is_openai_json_and_the_server_keeps_serving() {
    let server = Server::start(&["--max-body", "16KiB", "--max-n", "4"]);
    let send_raw = |body: &str| {
        let r = client()
            .post(format!("{}/v1/images/generations", server.url))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .unwrap();
        json(r)
    };
    let cases: &[(&str, u16, Option<&str>)] = &[
        ("{not json", 400, None),
        (r#"{"prompt": "x", "colour": "red"}"#, 400, None),
        (r#"{"size": "32x32"}"#, 400, Some("prompt")),
        (r#"{"prompt": "x", "size": "20x32"}"#, 400, Some("size")),
        (r#"{"prompt": "x", "size": "100000x100000"}"#, 400, Some("size")),
        (r#"{"prompt": "x", "n": 5}"#, 400, Some("n")),
        (r#"{"prompt": "x", "num_inference_steps": 100000}"#, 400, Some("num_inference_steps")),
        (r#"{"prompt": "x", "seed": [1, 2, 3]}"#, 400, Some("seed")),
        (r#"{"prompt": "x", "response_format": "url"}"#, 400, Some("response_format")),
    ];
    for (body, status, param) in cases {
        let (got, json) = send_raw(body);
        assert_eq!(got, *status, "{body}: {json}");
        assert_eq!(json["error"]["type"], "invalid_request_error", "{body}: {json}");
        assert!(json["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{json}");
        if let Some(p) = param {
            assert_eq!(json["error"]["param"].as_str(), Some(*p), "{body}: {json}");
        }
    }
    // An oversized body.
    let big = format!(r#"{{"prompt": "{}"}}"#, "x".repeat(40_000));
    let (status, body) = send_raw(&big);
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "request_too_large");
    // Unknown endpoints.
    let (status, body) = json(server.get("/v1/nothing"));
    assert_eq!(status, 404, "{body}");
    // Still serving.
    let (status, body) = json(server.post_json(&serde_json::json!({"prompt": "x", "size": "32x32"})));
    assert_eq!(status, 200, "{body}");
    // Models, health, metrics.
    let (_, models) = json(server.get("/v1/models"));
    assert_eq!(models["data"][0]["object"], "model");
    let (status, health) = json(server.get("/health"));
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
    let metrics = server.get("/metrics").text().unwrap();
    assert!(metrics.contains("flux2_requests_total{endpoint=\"generations\",status=\"400\"} 9"), "{metrics}");
    assert!(metrics.contains("flux2_requests_total{endpoint=\"generations\",status=\"413\"} 1"), "{metrics}");
    assert!(metrics.contains("flux2_stage_seconds_count{stage=\"denoise\"} 1"), "{metrics}");
}

/// A request slow enough on the tiny model to overlap others (many steps at 256²).
fn slow_request() -> serde_json::Value {
    serde_json::json!({"prompt": "slow", "size": "256x256", "num_inference_steps": 400, "seed": 1})
}

/// Wait until /metrics shows `line`.
fn wait_for_metric(server: &Server, line: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !server.get("/metrics").text().unwrap().lines().any(|l| l == line) {
        assert!(Instant::now() < deadline, "/metrics never showed {line:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    let server = Server::start(&["--queue", "1"]);
    // One running, one queued (their clients give up after a while, which cancels them).
    let slow = |url: String| {
        std::thread::spawn(move || {
            let c = reqwest::blocking::Client::builder().timeout(Duration::from_secs(8)).build().unwrap();
            let _ = c.post(format!("{url}/v1/images/generations")).json(&slow_request()).send();
        })
    };
    let first = slow(server.url.clone());
    wait_for_metric(&server, "flux2_requests_running 1");
    let second = slow(server.url.clone());
    wait_for_metric(&server, "flux2_queue_depth 1");
    let refused = server.post_json(&serde_json::json!({"prompt": "x", "size": "32x32"}));
    assert_eq!(refused.status().as_u16(), 429);
    assert!(refused.headers().get("retry-after").is_some());
    let (_, body) = json(refused);
    assert_eq!(body["error"]["code"], "queue_full");
    first.join().unwrap();
    second.join().unwrap();
}

#[test]
fn a_client_that_leaves_cancels_its_request() {
    let server = Server::start(&[]);
    let c = reqwest::blocking::Client::builder().timeout(Duration::from_millis(1500)).build().unwrap();
    assert!(c.post(format!("{}/v1/images/generations", server.url)).json(&slow_request()).send().is_err());
    // The worker stops at its next step: soon nothing runs, and the next request is served.
    wait_for_metric(&server, "flux2_requests_running 0");
    let (status, _) = json(server.post_json(&serde_json::json!({"prompt": "x", "size": "32x32"})));
    assert_eq!(status, 200);
    assert!(!server.get("/metrics").text().unwrap().contains("flux2_images_total 2"), "the slow image was finished");
}

#[cfg(unix)]
#[test]
fn sigterm_finishes_the_running_request_and_exits_0() {
    let server = Server::start(&[]);
    let url = server.url.clone();
    let body = serde_json::json!({"prompt": "slow", "size": "128x128", "num_inference_steps": 60, "seed": 1});
    let running = std::thread::spawn(move || {
        let r = client().post(format!("{url}/v1/images/generations")).json(&body).send().unwrap();
        r.status().as_u16()
    });
    // Wait until it runs, then signal.
    wait_for_metric(&server, "flux2_requests_running 1");
    let url = server.url.clone();
    let status = server.terminate();
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(running.join().unwrap(), 200, "the running request must finish");
    assert!(reqwest::blocking::get(format!("{url}/health")).is_err(), "new connections are refused");
}

/// 200 requests (two rounds of 100) from 16 concurrent clients that retry after 429: every answer is
/// 200 or 429, every request ends with its own image (none lost or duplicated), memory is flat
/// between the rounds. Prints the latency figures (docs/serve.md).
#[test]
fn bounded_load_test() {
    let server = Server::start(&["--queue", "8"]);
    let rss = || rss_kib(server.child.id());
    let round = |first_seed: u64| {
        let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let start = Instant::now();
        let results: Vec<(u64, u16, Option<u64>, Duration)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..16)
                .map(|_| {
                    let (next, url) = (next.clone(), server.url.clone());
                    s.spawn(move || {
                        let mut out = Vec::new();
                        let c = client();
                        loop {
                            let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            if k >= 100 {
                                return out;
                            }
                            let seed = first_seed + k;
                            let body = serde_json::json!({"prompt": "load", "size": "32x32", "num_inference_steps": 2, "seed": seed});
                            // A client that honours 429 by waiting a little (Retry-After, shortened
                            // for the test) and asking again; every answer is counted.
                            let t = Instant::now();
                            loop {
                                let r = c.post(format!("{url}/v1/images/generations")).json(&body).send().unwrap();
                                let status = r.status().as_u16();
                                if status == 429 {
                                    out.push((seed, status, None, t.elapsed()));
                                    std::thread::sleep(Duration::from_millis(50));
                                    continue;
                                }
                                let got = (status == 200)
                                    .then(|| r.json::<serde_json::Value>().unwrap()["seeds"][0].as_u64().unwrap());
                                out.push((seed, status, got, t.elapsed()));
                                break;
                            }
                        }
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        (results, start.elapsed())
    };
    let _warm = round(1_000_000);
    let before = rss();
    let (results, wall) = round(0);
    let after = rss();
    let mut seeds = std::collections::BTreeSet::new();
    for (seed, status, got, _) in &results {
        assert!(*status == 200 || *status == 429, "status {status}");
        if *status == 200 {
            assert_eq!(*got, Some(*seed), "an answer carried another request's image");
            assert!(seeds.insert(*seed), "seed {seed} answered twice");
        }
    }
    assert_eq!(seeds.len(), 100, "every request ends with its image");
    let refusals = results.iter().filter(|r| r.1 == 429).count();
    let mut ok: Vec<Duration> = results.iter().filter(|r| r.1 == 200).map(|r| r.3).collect();
    ok.sort();
    let pct = |p: f64| ok[((ok.len() - 1) as f64 * p) as usize].as_secs_f64() * 1000.0;
    println!(
        "load: 100 requests, 16 clients, queue 8: {} answered 200 (latency including waits after 429), {refusals} \
         answers 429 along the way; p50 {:.0} ms, p99 {:.0} ms; {:.1} images/s; RSS {} -> {} KiB",
        ok.len(),
        pct(0.5),
        pct(0.99),
        ok.len() as f64 / wall.as_secs_f64(),
        before.unwrap_or(0),
        after.unwrap_or(0)
    );
    if let (Some(b), Some(a)) = (before, after) {
        assert!(a < b + 64 * 1024, "resident memory grew from {b} KiB to {a} KiB over one round");
    }
}

/// Resident memory of a process, where /proc tells.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
}

trait Pipe: Sized {
    fn pipe<T>(self, f: impl FnOnce(Self) -> T) -> T {
        f(self)
    }
}
impl<T> Pipe for T {}
