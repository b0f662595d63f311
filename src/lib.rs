//! flux2: an inference engine for the FLUX.2 [klein] image models.
//!
//! Model code (`model`) is written once against the op layer (`backend::Backend`); the CPU
//! backend is the f32 reference every other backend is checked against.

pub mod backend;
pub mod cli;
pub mod device;
pub mod dtype;
pub mod error;
pub mod health;
pub mod host_memory;
pub mod hub;
pub mod image_io;
pub mod inpaint;
pub mod limits;
pub mod lora;
pub mod model;
pub mod output_file;
pub mod pipeline;
pub mod planner;
pub mod preview;
pub mod progress;
pub mod prompt_cache;
pub mod quant;
pub mod rng;
pub mod sampler;
pub mod selftest;
pub mod serve;
pub mod synth;
pub mod telemetry;
pub mod tensor;
pub mod weights;

pub use backend::{AttnMask, Backend, Padding2d};
pub use dtype::DType;
pub use error::{Error, Result};
pub use tensor::Tensor;
