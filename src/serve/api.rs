//! The OpenAI Images API as `flux2 serve` speaks it: request bodies (OpenAI's fields plus
//! SGLang's `width`, `height`, `num_inference_steps`, `guidance_scale`, `seed`, `negative_prompt`),
//! their validation into a [`GenParams`], and errors in OpenAI's JSON shape.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::image_io::RgbImage;
use crate::limits;

/// An error as OpenAI returns it: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds a client should wait before retrying (429, 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
            retry_after: None,
        }
    }

    pub fn with_code(self, code: &'static str) -> ApiError {
        ApiError { code: Some(code), ..self }
    }

    pub fn too_large(message: impl Into<String>) -> ApiError {
        ApiError { status: StatusCode::PAYLOAD_TOO_LARGE, ..ApiError::invalid(message, None) }
            .with_code("request_too_large")
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError { status: StatusCode::NOT_FOUND, ..ApiError::invalid(message, None) }.with_code("not_found")
    }

    pub fn queue_full(retry_after: u64) -> ApiError {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: "the server's queue is full; retry later".into(),
            kind: "rate_limit_error",
            param: None,
            code: Some("queue_full"),
            retry_after: Some(retry_after),
        }
    }

    pub fn shutting_down() -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "the server is shutting down".into(),
            kind: "server_error",
            param: None,
            code: Some("shutting_down"),
            retry_after: Some(5),
        }
    }

    pub fn server(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// An engine error: bad input is the client's (400), everything else the server's (500).
    pub fn from_engine(e: &crate::Error) -> ApiError {
        match e {
            crate::Error::InvalidArgument(m) => ApiError::invalid(m.clone(), None),
            crate::Error::NonFinite(m) => ApiError::server(m.clone()).with_code("non_finite"),
            crate::Error::OutOfMemory(m) => ApiError::server(format!("out of memory: {m}")).with_code("out_of_memory"),
            other => ApiError::server(other.to_string()),
        }
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            response.headers_mut().insert("retry-after", HeaderValue::from(s));
        }
        response
    }
}

/// `seed`: one integer (image k gets seed + k) or one per image; -1 means random.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SeedSpec {
    One(i64),
    Many(Vec<i64>),
}

/// `POST /v1/images/generations`. Unknown fields are refused, as OpenAI does; OpenAI fields that do
/// not apply to this engine are accepted where any value is harmless and checked where not.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationBody {
    pub prompt: Option<String>,
    pub n: Option<i64>,
    pub size: Option<String>,
    pub response_format: Option<String>,
    pub width: Option<i64>,
    pub height: Option<i64>,
    pub num_inference_steps: Option<i64>,
    pub guidance_scale: Option<f32>,
    pub seed: Option<SeedSpec>,
    pub negative_prompt: Option<String>,
    #[serde(default)]
    pub stream: bool,
    // OpenAI fields with nothing to choose here.
    pub model: Option<String>,
    pub user: Option<String>,
    pub quality: Option<String>,
    pub style: Option<String>,
    pub output_format: Option<String>,
    pub background: Option<String>,
    pub moderation: Option<String>,
    pub output_compression: Option<i64>,
    pub partial_images: Option<i64>,
    /// Edits with a mask: how much of the masked area is redrawn, (0, 1].
    pub strength: Option<f64>,
}

/// A validated request, ready for a worker.
#[derive(Debug, Clone)]
pub struct GenParams {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub steps: Option<usize>,
    pub guidance: Option<f32>,
    /// One per image (so `n` is its length).
    pub seeds: Vec<u64>,
    pub references: Vec<RgbImage>,
    /// Inpainting (an edit with a mask): the image to edit and the white-means-repaint mask.
    pub inpaint: Option<Inpaint>,
    /// Streamed previews every this many steps (from OpenAI's `partial_images`).
    pub preview_every: Option<usize>,
    pub stream: bool,
}

#[derive(Debug, Clone)]
pub struct Inpaint {
    pub image: RgbImage,
    pub mask: RgbImage,
    /// How much of the masked area is redrawn, in (0, 1]; 1 by default (OpenAI's edit semantics).
    pub strength: f64,
}

/// What the server allows per request (the CLI's limits plus `n`).
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    pub max_n: usize,
    /// Output sizes are multiples of this (the model's pixel multiple).
    pub multiple: usize,
}

/// An engine error's sentence without the "invalid argument:" prefix (the API says so already).
fn message(e: &crate::Error) -> String {
    match e {
        crate::Error::InvalidArgument(m) => m.clone(),
        other => other.to_string(),
    }
}

fn positive(v: Option<i64>, param: &str) -> Result<Option<usize>, ApiError> {
    match v {
        None => Ok(None),
        Some(x) if x > 0 => Ok(Some(x as usize)),
        Some(x) => Err(ApiError::invalid(format!("`{param}` must be a positive integer; got {x}"), Some(param))),
    }
}

/// `size` as "WxH" (or "auto": the default).
fn parse_size(size: &str) -> Result<Option<(usize, usize)>, ApiError> {
    if size == "auto" {
        return Ok(None);
    }
    let bad = || ApiError::invalid(format!("`size` must be WIDTHxHEIGHT, e.g. 1024x1024; got {size:?}"), Some("size"));
    let (w, h) = size.split_once(['x', 'X']).ok_or_else(bad)?;
    Ok(Some((w.trim().parse().map_err(|_| bad())?, h.trim().parse().map_err(|_| bad())?)))
}

fn seeds(spec: Option<&SeedSpec>, n: usize, random: &mut dyn FnMut() -> u64) -> Result<Vec<u64>, ApiError> {
    let one = |s: i64, random: &mut dyn FnMut() -> u64| -> Result<u64, ApiError> {
        match s {
            -1 => Ok(random()),
            s if s >= 0 => Ok(s as u64),
            s => Err(ApiError::invalid(format!("`seed` must be non-negative or -1 (random); got {s}"), Some("seed"))),
        }
    };
    match spec {
        None => Ok((0..n).map(|_| random()).collect()),
        Some(SeedSpec::One(s)) => {
            let base = one(*s, random)?;
            Ok((0..n as u64).map(|k| base.wrapping_add(k)).collect())
        }
        Some(SeedSpec::Many(list)) if list.len() == n => list.iter().map(|s| one(*s, random)).collect(),
        Some(SeedSpec::Many(list)) => {
            Err(ApiError::invalid(format!("`seed` lists {} seeds for n = {n} images", list.len()), Some("seed")))
        }
    }
}

/// OpenAI's `partial_images` (0–3 previews while streaming) as a preview interval in steps. The
/// step count is the request's, else the distilled default of 4 (a base model's 50 steps then get
/// previews early, which is harmless).
fn partial_images_every(partial: Option<i64>, steps: Option<usize>, stream: bool) -> Result<Option<usize>, ApiError> {
    match partial {
        None | Some(0) => Ok(None),
        // At most k previews: every steps/(k + 1) + 1 steps.
        Some(k @ 1..=3) if stream => Ok(Some(steps.unwrap_or(4) / (k as usize + 1) + 1)),
        Some(1..=3) => Err(ApiError::invalid("`partial_images` needs `stream`: true", Some("partial_images"))),
        Some(k) => Err(ApiError::invalid(format!("`partial_images` must be 0 to 3; got {k}"), Some("partial_images"))),
    }
}

impl GenerationBody {
    /// Check every field against the limits; `references` come from an edit's form.
    pub fn validate(
        self,
        mut references: Vec<RgbImage>,
        mask: Option<RgbImage>,
        limits: RequestLimits,
        random: &mut dyn FnMut() -> u64,
    ) -> Result<GenParams, ApiError> {
        // With a mask, the first image is the one to edit (as OpenAI's edits) and the others are
        // references.
        let inpaint = match mask {
            None if self.strength.is_some() => {
                return Err(ApiError::invalid("`strength` applies to edits with a `mask`", Some("strength")))
            }
            None => None,
            Some(mask) => {
                let image = references.remove(0);
                if (mask.width, mask.height) != (image.width, image.height) {
                    return Err(ApiError::invalid(
                        format!(
                            "the mask is {}x{} but the image is {}x{}",
                            mask.width, mask.height, image.width, image.height
                        ),
                        Some("mask"),
                    ));
                }
                let strength = self.strength.unwrap_or(1.0);
                crate::inpaint::check_strength(strength)
                    .map_err(|e| ApiError::invalid(message(&e), Some("strength")))?;
                Some(Inpaint { image, mask, strength })
            }
        };
        let prompt = self.prompt.ok_or_else(|| ApiError::invalid("`prompt` is required", Some("prompt")))?;
        limits::check_prompt(&prompt).map_err(|e| ApiError::invalid(message(&e), Some("prompt")))?;
        if let Some(neg) = &self.negative_prompt {
            limits::check_prompt(neg).map_err(|e| ApiError::invalid(message(&e), Some("negative_prompt")))?;
        }
        let n = positive(self.n, "n")?.unwrap_or(1);
        if n > limits.max_n {
            return Err(ApiError::invalid(format!("`n` must be at most {}; got {n}", limits.max_n), Some("n")));
        }
        match self.response_format.as_deref() {
            None | Some("b64_json") => {}
            Some(other) => {
                return Err(ApiError::invalid(
                    format!("`response_format` {other:?} is not supported: this server returns b64_json"),
                    Some("response_format"),
                ))
            }
        }
        match self.output_format.as_deref() {
            None | Some("png") => {}
            Some(other) => {
                return Err(ApiError::invalid(
                    format!("`output_format` {other:?} is not supported: images are PNG"),
                    Some("output_format"),
                ))
            }
        }
        let size = self.size.as_deref().map(parse_size).transpose()?.flatten();
        let width = positive(self.width, "width")?.or(size.map(|s| s.0));
        let height = positive(self.height, "height")?.or(size.map(|s| s.1));
        if let (Some(w), Some(h)) = (width, height) {
            limits::check_output_size(w, h, limits.multiple)
                .map_err(|e| ApiError::invalid(message(&e), Some("size")))?;
        } else if width.is_some() != height.is_some() && references.is_empty() {
            return Err(ApiError::invalid("give both `width` and `height`, or `size`", Some("size")));
        }
        let steps = positive(self.num_inference_steps, "num_inference_steps")?;
        if let Some(s) = steps {
            limits::check_steps(s).map_err(|e| ApiError::invalid(message(&e), Some("num_inference_steps")))?;
        }
        if let Some(g) = self.guidance_scale.filter(|g| !g.is_finite()) {
            return Err(ApiError::invalid(format!("`guidance_scale` must be finite; got {g}"), Some("guidance_scale")));
        }
        limits::check_reference_count(references.len()).map_err(|e| ApiError::invalid(message(&e), Some("image")))?;
        for (i, r) in references.iter().enumerate() {
            limits::check_reference(i, r.width, r.height).map_err(|e| ApiError::invalid(message(&e), Some("image")))?;
        }
        Ok(GenParams {
            prompt,
            negative_prompt: self.negative_prompt,
            width,
            height,
            steps,
            guidance: self.guidance_scale,
            seeds: seeds(self.seed.as_ref(), n, random)?,
            references,
            inpaint,
            preview_every: partial_images_every(self.partial_images, steps, self.stream)?,
            stream: self.stream,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> RequestLimits {
        RequestLimits { max_n: 4, multiple: 16 }
    }

    fn parse(json: &str) -> Result<GenParams, ApiError> {
        let body: GenerationBody = serde_json::from_str(json).map_err(|e| ApiError::invalid(e.to_string(), None))?;
        let mut next = 100;
        body.validate(vec![], None, limits(), &mut || {
            next += 1;
            next
        })
    }

    #[test]
    fn fields_and_defaults() {
        let p = parse(r#"{"prompt": "a cat", "size": "64x32", "n": 2, "seed": 7, "model": "x"}"#).unwrap();
        assert_eq!((p.width, p.height, p.seeds.clone()), (Some(64), Some(32), vec![7, 8]));
        let p = parse(r#"{"prompt": "a cat", "n": 2, "seed": [3, -1]}"#).unwrap();
        assert_eq!(p.seeds, vec![3, 101]);
        let p = parse(r#"{"prompt": "a cat", "width": 48, "height": 64, "size": "1024x1024"}"#).unwrap();
        assert_eq!((p.width, p.height), (Some(48), Some(64)), "width/height win over size");
    }

    #[test]
    fn every_bad_field_is_a_400_naming_it() {
        for (json, param) in [
            (r#"{"n": 1}"#, "prompt"),
            (r#"{"prompt": "x", "n": 5}"#, "n"),
            (r#"{"prompt": "x", "n": 0}"#, "n"),
            (r#"{"prompt": "x", "size": "big"}"#, "size"),
            (r#"{"prompt": "x", "size": "17x64"}"#, "size"),
            (r#"{"prompt": "x", "size": "100000x64"}"#, "size"),
            (r#"{"prompt": "x", "num_inference_steps": 5000}"#, "num_inference_steps"),
            (r#"{"prompt": "x", "seed": [1, 2]}"#, "seed"),
            (r#"{"prompt": "x", "seed": -5}"#, "seed"),
            (r#"{"prompt": "x", "response_format": "url"}"#, "response_format"),
            (r#"{"prompt": "x", "output_format": "jpeg"}"#, "output_format"),
        ] {
            let e = parse(json).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{json}");
            assert_eq!(e.param.as_deref(), Some(param), "{json}: {}", e.message);
        }
        let e = parse(r#"{"prompt": "x", "colour": "red"}"#).unwrap_err();
        assert!(e.message.contains("unknown field `colour`"), "{}", e.message);
    }
}
