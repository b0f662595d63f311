//! `flux2 forward <component>`: run one component on tensors from a safetensors file, for
//! component-by-component comparison with the Python reference.

use std::path::PathBuf;

use super::{expect_rank, read_f32, write_f32};
use crate::device::{self, DeviceChoice};
use crate::error::{Error, Result};
use crate::model::rope::PositionIds;
use crate::model::transformer::Flux2Transformer;
use crate::tensor::Tensor;
use crate::weights::WeightStore;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Component {
    /// Flux2Transformer2DModel.forward: hidden_states, encoder_hidden_states, timestep, img_ids,
    /// txt_ids (+ optional guidance) -> sample.
    Transformer,
}

#[derive(Debug, clap::Args)]
pub struct ForwardArgs {
    /// Which component to run.
    #[arg(value_enum)]
    pub component: Component,
    /// A diffusers pipeline folder, the component's folder, or a single-file checkpoint.
    #[arg(long)]
    pub model: PathBuf,
    /// Input tensors (safetensors), named as the diffusers forward arguments.
    #[arg(long)]
    pub inputs: PathBuf,
    /// Where to write the output tensors (safetensors, f32).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
}

pub fn run(args: &ForwardArgs) -> Result<()> {
    let be = device::select(args.device)?;
    let inputs = WeightStore::open(&args.inputs)?;
    match args.component {
        Component::Transformer => {
            let model = Flux2Transformer::load(be.clone(), &args.model)?;
            let x = read_f32(&inputs, "hidden_states")?;
            let ctx = read_f32(&inputs, "encoder_hidden_states")?;
            expect_rank("hidden_states", &x, &[3])?;
            expect_rank("encoder_hidden_states", &ctx, &[3])?;
            let sigma = read_f32(&inputs, "timestep")?.to_vec_f32()?;
            let guidance =
                if inputs.contains("guidance") { Some(read_f32(&inputs, "guidance")?.to_vec_f32()?) } else { None };
            let img_ids = ids(&inputs, "img_ids")?;
            let txt_ids = ids(&inputs, "txt_ids")?;
            let act = be.activation_dtype();
            let out = model.forward(
                &be.upload(&x, act)?,
                &be.upload(&ctx, act)?,
                &sigma,
                &img_ids,
                &txt_ids,
                guidance.as_deref(),
            )?;
            write_f32(&args.out, &[("sample", &out)])
        }
    }
}

/// Position ids as `[L, axes]`, or `[B, L, axes]` of which the first is used (as diffusers does).
fn ids(store: &WeightStore, name: &str) -> Result<PositionIds> {
    let t: Tensor = read_f32(store, name)?;
    expect_rank(name, &t, &[2, 3])?;
    let t = if t.rank() == 3 { t.narrow(0, 0, 1)?.reshape(&t.shape()[1..])? } else { t };
    PositionIds::new(t.dim(1), t.to_vec_f32()?).map_err(|e| Error::InvalidArgument(format!("`{name}`: {e}")))
}
