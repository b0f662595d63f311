//! The workflow fixtures (tests/fixtures/workflows/*, from diffusers' Flux2KleinInpaintPipeline and
//! Flux2KleinKVPipeline): cases, their requests and references, shared by the CPU tests and the
//! GPU checks.

use std::path::{Path, PathBuf};

use flux2::image_io::RgbImage;
use flux2::pipeline::Request;

use super::{fixtures, load};

pub struct Case {
    pub name: String,
    pub dir: PathBuf,
    pub json: serde_json::Value,
}

/// The cases whose `pipeline` is `kind` ("inpaint" or "kv"), by name.
pub fn cases(kind: &str) -> Vec<Case> {
    let mut dirs: Vec<PathBuf> =
        std::fs::read_dir(fixtures().join("workflows")).unwrap().map(|e| e.unwrap().path()).collect();
    dirs.sort();
    dirs.into_iter()
        .map(|dir| {
            let json: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
            Case { name: dir.file_name().unwrap().to_string_lossy().into(), dir, json }
        })
        .filter(|c| c.json["pipeline"] == kind)
        .collect()
}

pub fn image(dir: &Path, name: &serde_json::Value) -> Option<RgbImage> {
    name.as_str().map(|n| RgbImage::load(&dir.join(n)).unwrap())
}

impl Case {
    pub fn references(&self) -> Vec<RgbImage> {
        self.json["refs"].as_array().unwrap().iter().map(|r| image(&self.dir, r).unwrap()).collect()
    }

    /// The request diffusers ran: prompt, steps, guidance, its noise draw, and for inpainting the
    /// init image, strength, mask and crop.
    pub fn request(&self) -> Request {
        let j = &self.json;
        let inpaint = j["pipeline"] == "inpaint";
        Request {
            prompt: j["prompt"].as_str().unwrap().into(),
            steps: Some(j["steps"].as_u64().unwrap() as usize),
            guidance: j["guidance"].as_f64().map(|g| g as f32),
            noise: Some(load(&self.dir.join("noise.safetensors"), "noise")),
            init_image: if inpaint { image(&self.dir, &serde_json::json!("init.png")) } else { None },
            strength: j["strength"].as_f64(),
            mask: image(&self.dir, &j["mask"]),
            mask_crop: j["mask_crop"].as_u64().map(|p| p as usize),
            ..Default::default()
        }
    }

    pub fn expected_image(&self) -> RgbImage {
        RgbImage::load(&self.dir.join("expected.png")).unwrap()
    }
}
