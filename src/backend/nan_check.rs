//! `--debug-nans`: a backend that wraps another and checks every op's output for NaN or ±inf,
//! synchronously, so a run stops at the first op that produced one and names it, with the model
//! component it ran in (`scope`) and whether one of its inputs (a weight, say) already held one.
//! Slow by design (a host synchronisation per op); the normal path checks once per stage.

use std::sync::Arc;

use crate::backend::{scope, AttnMask, Backend, Padding2d, QuantTensor, RopePairs};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::{DeviceKind, Tensor};

#[derive(Debug)]
pub struct NanCheckBackend {
    inner: Arc<dyn Backend>,
}

impl NanCheckBackend {
    /// Wrap `inner`; switches on component naming for the process.
    pub fn new(inner: Arc<dyn Backend>) -> NanCheckBackend {
        scope::set_naming(true);
        NanCheckBackend { inner }
    }

    fn nonfinite(&self, x: &Tensor) -> Result<bool> {
        if !matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16) {
            return Ok(false);
        }
        self.inner.record_nonfinite(x, 0)?;
        Ok(self.inner.take_nonfinite()?.is_some())
    }

    /// `out` of `op`, or the error that names where the first non-finite value came from.
    fn checked(&self, op: &str, out: Result<Tensor>, inputs: &[(&str, &Tensor)]) -> Result<Tensor> {
        let out = out?;
        if !self.nonfinite(&out)? {
            return Ok(out);
        }
        let mut bad_inputs = Vec::new();
        for (name, x) in inputs {
            if self.nonfinite(x)? {
                bad_inputs.push(*name);
            }
        }
        let scope = scope::current();
        let place = if scope.is_empty() { String::new() } else { format!(" in {scope}") };
        let cause = if inputs.is_empty() {
            "(the data itself holds NaN or inf)".to_string()
        } else if bad_inputs.is_empty() {
            "from finite inputs (an overflow, or a parameter out of range)".to_string()
        } else {
            format!("because its input {} already held NaN or inf", bad_inputs.join(", "))
        };
        let verb = if inputs.is_empty() { "gave" } else { "produced" };
        Err(Error::NonFinite(format!("--debug-nans: `{op}`{place} {verb} NaN or inf {cause}")))
    }

    fn checked_quant(&self, op: &str, q: Result<QuantTensor>) -> Result<QuantTensor> {
        let q = q?;
        let bad = self.nonfinite(&q.data)? || q.scales.as_ref().map(|s| self.nonfinite(s)).transpose()? == Some(true);
        if bad {
            let scope = scope::current();
            return Err(Error::NonFinite(format!("--debug-nans: `{op}` in {scope}: the weight holds NaN or inf")));
        }
        Ok(q)
    }
}

impl Backend for NanCheckBackend {
    fn kind(&self) -> DeviceKind {
        self.inner.kind()
    }

    fn as_any(&self) -> &dyn std::any::Any {
        // The wrapped backend's controls (e.g. CUDA memory statistics) stay reachable.
        self.inner.as_any()
    }

    fn name(&self) -> String {
        format!("{} (checking every op for NaN/inf)", self.inner.name())
    }

    fn activation_dtype(&self) -> DType {
        self.inner.activation_dtype()
    }

    fn decoded_weight_dtype(&self) -> DType {
        self.inner.decoded_weight_dtype()
    }

    fn keeps_fp8_codes(&self) -> bool {
        self.inner.keeps_fp8_codes()
    }

    fn upload(&self, host: &Tensor, dtype: DType) -> Result<Tensor> {
        self.checked("upload", self.inner.upload(host, dtype), &[])
    }

    fn load_weight(&self, bytes: &[u8], dtype: DType, shape: &[usize]) -> Result<Tensor> {
        self.checked("load_weight", self.inner.load_weight(bytes, dtype, shape), &[])
    }

    fn contiguous(&self, x: &Tensor) -> Result<Tensor> {
        self.checked("contiguous", self.inner.contiguous(x), &[("x", x)])
    }

    fn concat(&self, xs: &[&Tensor], dim: usize) -> Result<Tensor> {
        let names: Vec<String> = (0..xs.len()).map(|i| format!("#{i}")).collect();
        let inputs: Vec<(&str, &Tensor)> = names.iter().map(String::as_str).zip(xs.iter().copied()).collect();
        self.checked("concat", self.inner.concat(xs, dim), &inputs)
    }

    fn synchronize(&self) -> Result<()> {
        self.inner.synchronize()
    }

    fn linear(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let mut inputs = vec![("x", x), ("weight", w)];
        inputs.extend(bias.map(|b| ("bias", b)));
        self.checked("linear", self.inner.linear(x, w, bias), &inputs)
    }

    fn load_quantized(&self, q: &crate::quant::Quantized) -> Result<QuantTensor> {
        self.checked_quant("load_quantized", self.inner.load_quantized(q))
    }

    fn linear_quantized(&self, x: &Tensor, w: &QuantTensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let mut inputs = vec![("x", x)];
        inputs.extend(bias.map(|b| ("bias", b)));
        self.checked("linear_quantized", self.inner.linear_quantized(x, w, bias), &inputs)
    }

    fn swiglu_linear_fp8(
        &self,
        prefix: Option<&Tensor>,
        x: &Tensor,
        w: &QuantTensor,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        let mut inputs = vec![("x", x)];
        inputs.extend(prefix.map(|p| ("prefix", p)));
        inputs.extend(bias.map(|b| ("bias", b)));
        let out = self.inner.swiglu_linear_fp8(prefix, x, w, bias);
        self.checked("swiglu_linear_fp8", out, &inputs)
    }

    fn layer_norm_modulate_linear_fp8(
        &self,
        x: &Tensor,
        shift: &Tensor,
        scale: &Tensor,
        eps: f32,
        w: &QuantTensor,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        let mut inputs = vec![("x", x), ("shift", shift), ("scale", scale)];
        inputs.extend(bias.map(|b| ("bias", b)));
        let out = self.inner.layer_norm_modulate_linear_fp8(x, shift, scale, eps, w, bias);
        self.checked(&format!("layer_norm_modulate_linear_fp8(eps={eps})"), out, &inputs)
    }

    fn linear_fp8(&self, x: &Tensor, w: &QuantTensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let mut inputs = vec![("x", x)];
        inputs.extend(bias.map(|b| ("bias", b)));
        self.checked("linear_fp8", self.inner.linear_fp8(x, w, bias), &inputs)
    }

    fn linear_fp8_gated_add(
        &self,
        x: &Tensor,
        gate: &Tensor,
        a: &Tensor,
        w: &QuantTensor,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        let mut inputs = vec![("x", x), ("gate", gate), ("a", a)];
        inputs.extend(bias.map(|b| ("bias", b)));
        self.checked("linear_fp8_gated_add", self.inner.linear_fp8_gated_add(x, gate, a, w, bias), &inputs)
    }

    fn swiglu_linear_fp8_gated_add(
        &self,
        x: &Tensor,
        gate: &Tensor,
        prefix: Option<&Tensor>,
        a: &Tensor,
        w: &QuantTensor,
    ) -> Result<Tensor> {
        let mut inputs = vec![("x", x), ("gate", gate), ("a", a)];
        inputs.extend(prefix.map(|p| ("prefix", p)));
        let out = self.inner.swiglu_linear_fp8_gated_add(x, gate, prefix, a, w);
        self.checked("swiglu_linear_fp8_gated_add", out, &inputs)
    }

    fn attention_sage(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttnMask, scale: f32) -> Result<Tensor> {
        let out = self.inner.attention_sage(q, k, v, mask, scale);
        self.checked(&format!("attention_sage(scale={scale})"), out, &[("q", q), ("k", k), ("v", v)])
    }

    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttnMask, scale: f32) -> Result<Tensor> {
        let out = self.inner.attention(q, k, v, mask, scale);
        self.checked(&format!("attention(scale={scale})"), out, &[("q", q), ("k", k), ("v", v)])
    }

    fn conv2d(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        stride: usize,
        padding: Padding2d,
    ) -> Result<Tensor> {
        let mut inputs = vec![("x", x), ("weight", w)];
        inputs.extend(bias.map(|b| ("bias", b)));
        self.checked("conv2d", self.inner.conv2d(x, w, bias, stride, padding), &inputs)
    }

    fn layer_norm(&self, x: &Tensor, eps: f32) -> Result<Tensor> {
        self.checked(&format!("layer_norm(eps={eps})"), self.inner.layer_norm(x, eps), &[("x", x)])
    }

    fn layer_norm_modulate(&self, x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f32) -> Result<Tensor> {
        let out = self.inner.layer_norm_modulate(x, shift, scale, eps);
        self.checked(&format!("layer_norm_modulate(eps={eps})"), out, &[("x", x), ("shift", shift), ("scale", scale)])
    }

    fn modulate(&self, x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
        let out = self.inner.modulate(x, shift, scale);
        self.checked("modulate", out, &[("x", x), ("shift", shift), ("scale", scale)])
    }

    fn rms_norm(&self, x: &Tensor, weight: Option<&Tensor>, eps: f32) -> Result<Tensor> {
        let mut inputs = vec![("x", x)];
        inputs.extend(weight.map(|w| ("weight", w)));
        self.checked(&format!("rms_norm(eps={eps})"), self.inner.rms_norm(x, weight, eps), &inputs)
    }

    fn group_norm(
        &self,
        x: &Tensor,
        groups: usize,
        weight: &Tensor,
        bias: &Tensor,
        eps: f32,
        silu: bool,
    ) -> Result<Tensor> {
        let out = self.inner.group_norm(x, groups, weight, bias, eps, silu);
        self.checked(&format!("group_norm(eps={eps})"), out, &[("x", x), ("weight", weight), ("bias", bias)])
    }

    fn silu(&self, x: &Tensor) -> Result<Tensor> {
        self.checked("silu", self.inner.silu(x), &[("x", x)])
    }

    fn swiglu(&self, x: &Tensor) -> Result<Tensor> {
        self.checked("swiglu", self.inner.swiglu(x), &[("x", x)])
    }

    fn axpby(&self, a: f32, x: &Tensor, b: f32, y: &Tensor) -> Result<Tensor> {
        self.checked(&format!("axpby(a={a}, b={b})"), self.inner.axpby(a, x, b, y), &[("x", x), ("y", y)])
    }

    fn swiglu_concat(&self, prefix: &Tensor, x: &Tensor) -> Result<Tensor> {
        self.checked("swiglu_concat", self.inner.swiglu_concat(prefix, x), &[("prefix", prefix), ("x", x)])
    }

    fn linear_gated_add(
        &self,
        x: &Tensor,
        gate: &Tensor,
        a: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        let mut inputs = vec![("x", x), ("gate", gate), ("a", a), ("w", w)];
        inputs.extend(bias.map(|b| ("bias", b)));
        self.checked("linear_gated_add", self.inner.linear_gated_add(x, gate, a, w, bias), &inputs)
    }

    fn gated_add(&self, x: &Tensor, gate: &Tensor, y: &Tensor) -> Result<Tensor> {
        self.checked("gated_add", self.inner.gated_add(x, gate, y), &[("x", x), ("gate", gate), ("y", y)])
    }

    fn channel_affine(&self, x: &Tensor, mul: &Tensor, add: &Tensor) -> Result<Tensor> {
        self.checked("channel_affine", self.inner.channel_affine(x, mul, add), &[("x", x), ("mul", mul), ("add", add)])
    }

    fn upsample_nearest2x(&self, x: &Tensor) -> Result<Tensor> {
        self.checked("upsample_nearest2x", self.inner.upsample_nearest2x(x), &[("x", x)])
    }

    fn rope_interleaved(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        self.checked(
            "rope_interleaved",
            self.inner.rope_interleaved(x, cos, sin),
            &[("x", x), ("cos", cos), ("sin", sin)],
        )
    }

    fn rms_norm_rope(
        &self,
        x: &Tensor,
        weight: Option<&Tensor>,
        eps: f32,
        cos: &Tensor,
        sin: &Tensor,
        pairs: RopePairs,
    ) -> Result<Tensor> {
        let mut inputs = vec![("x", x), ("cos", cos), ("sin", sin)];
        inputs.extend(weight.map(|w| ("weight", w)));
        let out = self.inner.rms_norm_rope(x, weight, eps, cos, sin, pairs);
        self.checked(&format!("rms_norm_rope(eps={eps}, {pairs:?})"), out, &inputs)
    }

    fn rope_half(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        self.checked("rope_half", self.inner.rope_half(x, cos, sin), &[("x", x), ("cos", cos), ("sin", sin)])
    }

    fn timestep_embedding(&self, t: &Tensor, dim: usize, max_period: f32) -> Result<Tensor> {
        let op = format!("timestep_embedding(max_period={max_period})");
        self.checked(&op, self.inner.timestep_embedding(t, dim, max_period), &[("t", t)])
    }

    fn embedding(&self, ids: &[u32], table: &Tensor) -> Result<Tensor> {
        self.checked("embedding", self.inner.embedding(ids, table), &[("table", table)])
    }

    fn record_nonfinite(&self, x: &Tensor, check: u32) -> Result<()> {
        self.inner.record_nonfinite(x, check)
    }

    fn take_nonfinite(&self) -> Result<Option<u32>> {
        self.inner.take_nonfinite()
    }
}
