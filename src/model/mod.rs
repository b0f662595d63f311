//! Model components, each written once against the op layer.

pub mod linear;
pub mod qwen3;
pub mod rope;
pub mod tokenizer;
pub mod transformer;
pub mod vae;
