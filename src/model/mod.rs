//! Model components, each written once against the op layer.

pub mod rope;
pub mod transformer;
