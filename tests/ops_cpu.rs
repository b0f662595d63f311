//! Every CPU reference op against values computed by hand.

mod common;

use common::{assert_close, t};
use flux2::backend::cpu::CpuBackend;
use flux2::{AttnMask, Backend, Padding2d};

const TOL: f32 = 1e-6;

fn cpu() -> CpuBackend {
    CpuBackend::new()
}

#[test]
fn linear_is_x_times_w_transposed_plus_bias() {
    let x = t(&[1., 2., 3., 4., 5., 6.], &[2, 3]);
    let w = t(&[1., 0., -1., 0.5, 0.5, 0.5], &[2, 3]);
    let b = t(&[10., 20.], &[2]);
    let y = cpu().linear(&x, &w, Some(&b)).unwrap();
    assert_eq!(y.shape(), &[2, 2]);
    assert_close(&y.to_vec_f32().unwrap(), &[1. - 3. + 10., 3. + 20., 4. - 6. + 10., 7.5 + 20.], TOL);
    // Strided input (a column slice) gives the same result as its dense copy.
    let wide = t(&[9., 1., 2., 3., 9., 4., 5., 6.], &[2, 4]).narrow(1, 1, 3).unwrap();
    assert_eq!(cpu().linear(&wide, &w, Some(&b)).unwrap().to_vec_f32().unwrap(), y.to_vec_f32().unwrap());
    assert!(cpu().linear(&x, &t(&[1., 2.], &[1, 2]), None).is_err());
}

#[test]
fn layer_norm_and_modulate() {
    let x = t(&[1., 2., 3., 2., 2., 2.], &[1, 2, 3]);
    let inv = 1.0 / (2.0f32 / 3.0 + 1e-6).sqrt();
    let n = cpu().layer_norm(&x, 1e-6).unwrap().to_vec_f32().unwrap();
    assert_close(&n, &[-inv, 0., inv, 0., 0., 0.], 1e-5);
    let shift = t(&[1., 2., 3.], &[1, 3]);
    let scale = t(&[0., 1., -1.], &[1, 3]);
    let m = cpu().layer_norm_modulate(&x, &shift, &scale, 1e-6).unwrap().to_vec_f32().unwrap();
    assert_close(&m, &[-inv + 1., 2., 3., 1., 2., 3.], 1e-5);
    let plain = cpu().modulate(&x, &shift, &scale).unwrap().to_vec_f32().unwrap();
    assert_close(&plain, &[2., 6., 3., 3., 6., 3.], TOL);
    assert!(cpu().modulate(&x, &t(&[1., 2.], &[1, 2]), &scale).is_err());
}

#[test]
fn rms_norm_per_head_with_weight() {
    // Two "heads" of dim 2: rms([3,4]) = sqrt(12.5), rms([1,1]) = 1.
    let x = t(&[3., 4., 1., 1.], &[1, 1, 2, 2]);
    let w = t(&[1., 2.], &[2]);
    let y = cpu().rms_norm(&x, Some(&w), 0.0).unwrap().to_vec_f32().unwrap();
    let r = 12.5f32.sqrt();
    assert_close(&y, &[3. / r, 8. / r, 1., 2.], 1e-6);
    let unweighted = cpu().rms_norm(&x, None, 0.0).unwrap().to_vec_f32().unwrap();
    assert_close(&unweighted, &[3. / r, 4. / r, 1., 1.], 1e-6);
}

#[test]
fn group_norm_with_affine_and_silu() {
    // 2 channels x 2 pixels, 1 group: mean 2.5, var 1.25.
    let x = t(&[1., 2., 3., 4.], &[1, 2, 1, 2]);
    let w = t(&[1., 2.], &[2]);
    let b = t(&[0., 1.], &[2]);
    let s = 1.0 / 1.25f32.sqrt();
    let y = cpu().group_norm(&x, 1, &w, &b, 0.0, false).unwrap().to_vec_f32().unwrap();
    let want = [-1.5 * s, -0.5 * s, 2. * 0.5 * s + 1., 2. * 1.5 * s + 1.];
    assert_close(&y, &want, 1e-6);
    let ys = cpu().group_norm(&x, 1, &w, &b, 0.0, true).unwrap().to_vec_f32().unwrap();
    let silu = |v: f32| v / (1. + (-v).exp());
    assert_close(&ys, &want.map(silu), 1e-6);
    // Two groups: each channel normalised alone.
    let y2 = cpu().group_norm(&x, 2, &w, &b, 0.0, false).unwrap().to_vec_f32().unwrap();
    assert_close(&y2, &[-1., 1., -1., 3.], 1e-6);
    assert!(cpu().group_norm(&x, 3, &w, &b, 0.0, false).is_err());
}

#[test]
fn activations() {
    let x = t(&[1., -2., 0.5, 3.], &[1, 4]);
    let silu = |v: f32| v / (1. + (-v).exp());
    assert_close(&cpu().silu(&x).unwrap().to_vec_f32().unwrap(), &[silu(1.), silu(-2.), silu(0.5), silu(3.)], TOL);
    // The first half gates the second.
    let y = cpu().swiglu(&x).unwrap();
    assert_eq!(y.shape(), &[1, 2]);
    assert_close(&y.to_vec_f32().unwrap(), &[silu(1.) * 0.5, silu(-2.) * 3.], TOL);
    assert!(cpu().swiglu(&t(&[1., 2., 3.], &[1, 3])).is_err());
}

/// The single block's join: the attention output beside SwiGLU of the MLP half of the fused
/// projection (a row-strided view), by hand; a permuted (not row-strided) x takes the
/// composition and gives the same values; mismatched leading shapes are an error.
#[test]
fn swiglu_concat_reads_strided_rows() {
    let silu = |v: f32| v / (1. + (-v).exp());
    // Two rows of [q q | gate gate value value]: the view skips the first two columns.
    let fused = t(&[9., 9., 1., -2., 0.5, 3., 8., 8., 2., 0., -1., 4.], &[1, 2, 6]);
    let x = fused.narrow(2, 2, 4).unwrap();
    let prefix = t(&[7., 6.], &[1, 2, 1]);
    let want = [7., silu(1.) * 0.5, silu(-2.) * 3., 6., silu(2.) * -1., silu(0.) * 4.];
    for be in [
        CpuBackend::new(),
        CpuBackend::with_precision(flux2::backend::cpu::CpuPrecision::Bf16, flux2::backend::cpu::Isa::best()),
    ] {
        let y = be.swiglu_concat(&prefix, &x).unwrap();
        assert_eq!(y.shape(), &[1, 2, 3]);
        assert_close(&y.to_vec_f32().unwrap(), &want, 1e-5);
    }
    // [1, 4, 2] permuted to [1, 2, 4]: rows are not contiguous.
    let columns = t(&[1., 2., -2., 0., 0.5, -1., 3., 4.], &[1, 4, 2]).permute(&[0, 2, 1]).unwrap();
    let y = cpu().swiglu_concat(&prefix, &columns).unwrap();
    assert_close(&y.to_vec_f32().unwrap(), &want, 1e-5);
    assert!(cpu().swiglu_concat(&t(&[1., 2., 3.], &[1, 3, 1]), &x).is_err());
}

#[test]
fn residual_ops() {
    let x = t(&[1., 2., 3., 4.], &[2, 1, 2]);
    let y = t(&[10., 20., 30., 40.], &[2, 1, 2]);
    let gate = t(&[0.5, 1., 2., 0.], &[2, 2]);
    assert_close(&cpu().gated_add(&x, &gate, &y).unwrap().to_vec_f32().unwrap(), &[6., 22., 63., 4.], TOL);
    assert_close(&cpu().axpby(2.0, &x, -0.5, &y).unwrap().to_vec_f32().unwrap(), &[-3., -6., -9., -12.], TOL);
    let img = t(&[1., 2., 3., 4.], &[1, 2, 1, 2]);
    let out = cpu().channel_affine(&img, &t(&[2., 3.], &[2]), &t(&[1., -1.], &[2])).unwrap();
    assert_close(&out.to_vec_f32().unwrap(), &[3., 5., 8., 11.], TOL);
}

#[test]
fn attention_softmax_by_hand() {
    // One query (value 1) against keys 0 and ln 3: probabilities 1/4 and 3/4.
    let q = t(&[1., 1.], &[1, 2, 1, 1]);
    let k = t(&[0., 3f32.ln()], &[1, 2, 1, 1]);
    let v = t(&[4., 8.], &[1, 2, 1, 1]);
    let full = cpu().attention(&q, &k, &v, &AttnMask::None, 1.0).unwrap().to_vec_f32().unwrap();
    assert_close(&full, &[7., 7.], 1e-6);
    let causal = cpu().attention(&q, &k, &v, &AttnMask::Causal { valid_len: None }, 1.0).unwrap().to_vec_f32().unwrap();
    assert_close(&causal, &[4., 7.], 1e-6);
    // Only the first key is a real token: the padded query sees it alone.
    let padded = AttnMask::Causal { valid_len: Some(vec![1]) };
    assert_close(&cpu().attention(&q, &k, &v, &padded, 1.0).unwrap().to_vec_f32().unwrap(), &[4., 4.], 1e-6);
    // Scale enters before the softmax: scale 0 gives a plain mean.
    assert_close(&cpu().attention(&q, &k, &v, &AttnMask::None, 0.0).unwrap().to_vec_f32().unwrap(), &[6., 6.], 1e-6);
}

#[test]
fn attention_grouped_query_heads_share_kv() {
    // Two query heads, one kv head; head dim 2.
    let q = t(&[1., 0., 0., 1.], &[1, 1, 2, 2]);
    let k = t(&[1., 0., 0., 1.], &[1, 2, 1, 2]);
    let v = t(&[1., 2., 3., 4.], &[1, 2, 1, 2]);
    let o = cpu().attention(&q, &k, &v, &AttnMask::None, 1.0).unwrap().to_vec_f32().unwrap();
    let (e, one) = (1f32.exp(), 1f32);
    let p = e / (e + one); // weight of the matching key
    let head0 = [p * 1. + (1. - p) * 3., p * 2. + (1. - p) * 4.];
    let head1 = [(1. - p) * 1. + p * 3., (1. - p) * 2. + p * 4.];
    assert_close(&o, &[head0[0], head0[1], head1[0], head1[1]], 1e-6);
    assert!(cpu()
        .attention(&q, &t(&[0.; 6], &[1, 1, 3, 2]), &t(&[0.; 6], &[1, 1, 3, 2]), &AttnMask::None, 1.0)
        .is_err());
}

#[test]
fn rope_layouts() {
    let quarter = std::f32::consts::FRAC_PI_2;
    // Interleaved: pair (x0, x1) rotated by 90°, pair (x2, x3) by 0°.
    let x = t(&[1., 0., 5., 6.], &[1, 1, 1, 4]);
    let cos = t(&[quarter.cos(), 1.], &[1, 2]);
    let sin = t(&[quarter.sin(), 0.], &[1, 2]);
    assert_close(&cpu().rope_interleaved(&x, &cos, &sin).unwrap().to_vec_f32().unwrap(), &[0., 1., 5., 6.], 1e-6);
    // Rotate-half: pairs are (x0, x2) and (x1, x3).
    let x = t(&[1., 5., 0., 6.], &[1, 1, 1, 4]);
    assert_close(&cpu().rope_half(&x, &cos, &sin).unwrap().to_vec_f32().unwrap(), &[0., 5., 1., 6.], 1e-6);
    assert!(cpu().rope_half(&x, &t(&[1.], &[1, 1]), &sin).is_err());
}

#[test]
fn timestep_embedding_is_cos_first() {
    let times = |v: &[f32]| t(v, &[v.len()]);
    let e = cpu().timestep_embedding(&times(&[0.0, 1.0]), 4, 10000.0).unwrap();
    assert_eq!(e.shape(), &[2, 4]);
    // freqs: 10000^(-0/2) = 1, 10000^(-1/2) = 0.01
    assert_close(
        &e.to_vec_f32().unwrap(),
        &[1., 1., 0., 0., 1f32.cos(), 0.01f32.cos(), 1f32.sin(), 0.01f32.sin()],
        1e-6,
    );
    // An odd dim ends in a zero column, as diffusers pads it.
    let odd = cpu().timestep_embedding(&times(&[1.0]), 5, 10000.0).unwrap().to_vec_f32().unwrap();
    assert_close(&odd, &[1f32.cos(), 0.01f32.cos(), 1f32.sin(), 0.01f32.sin(), 0.0], 1e-6);
    // Timesteps are an f32 vector: a matrix of them is a shape error.
    assert!(cpu().timestep_embedding(&t(&[1., 2.], &[1, 2]), 4, 10000.0).is_err());
    assert!(cpu().timestep_embedding(&times(&[1.0]), 1, 10000.0).is_err());
}

#[test]
fn embedding_gathers_rows() {
    let table = t(&[0., 1., 10., 11., 20., 21.], &[3, 2]);
    assert_eq!(cpu().embedding(&[2, 0, 2], &table).unwrap().to_vec_f32().unwrap(), vec![20., 21., 0., 1., 20., 21.]);
    assert!(cpu().embedding(&[3], &table).is_err());
}

#[test]
fn conv2d_padding_stride_and_bias() {
    // 3x3 input, 2x2 kernel of ones: sums of 2x2 windows.
    let x = t(&[1., 2., 3., 4., 5., 6., 7., 8., 9.], &[1, 1, 3, 3]);
    let w = t(&[1., 1., 1., 1.], &[1, 1, 2, 2]);
    let valid = cpu().conv2d(&x, &w, Some(&t(&[0.5], &[1])), 1, Padding2d::same(0)).unwrap();
    assert_eq!(valid.shape(), &[1, 1, 2, 2]);
    assert_close(&valid.to_vec_f32().unwrap(), &[12.5, 16.5, 24.5, 28.5], TOL);
    // Asymmetric padding (right/bottom) with stride 2, as the VAE downsampler does.
    let pad = Padding2d { top: 0, bottom: 1, left: 0, right: 1 };
    let down = cpu().conv2d(&x, &w, None, 2, pad).unwrap();
    assert_eq!(down.shape(), &[1, 1, 2, 2]);
    assert_close(&down.to_vec_f32().unwrap(), &[12., 9., 15., 9.], TOL);
    // 3x3 kernel with padding 1 keeps the size; centre tap only = identity.
    let mut k = [0f32; 9];
    k[4] = 1.;
    let same = cpu().conv2d(&x, &t(&k, &[1, 1, 3, 3]), None, 1, Padding2d::same(1)).unwrap();
    assert_eq!(same.to_vec_f32().unwrap(), x.to_vec_f32().unwrap());
    // 1x1 conv mixing two channels.
    let x2 = t(&[1., 2., 10., 20.], &[1, 2, 1, 2]);
    let mix = cpu().conv2d(&x2, &t(&[1., 1., 1., -1.], &[2, 2, 1, 1]), None, 1, Padding2d::same(0)).unwrap();
    assert_close(&mix.to_vec_f32().unwrap(), &[11., 22., -9., -18.], TOL);
    assert!(cpu().conv2d(&x, &t(&[1.; 8], &[1, 2, 2, 2]), None, 1, Padding2d::same(0)).is_err());
}

#[test]
fn upsample_and_layout_ops() {
    let x = t(&[1., 2., 3., 4.], &[1, 1, 2, 2]);
    let up = cpu().upsample_nearest2x(&x).unwrap();
    assert_eq!(up.shape(), &[1, 1, 4, 4]);
    assert_eq!(up.to_vec_f32().unwrap(), vec![1., 1., 2., 2., 1., 1., 2., 2., 3., 3., 4., 4., 3., 3., 4., 4.]);
    let a = t(&[1., 2., 3., 4.], &[2, 2]);
    let b = t(&[5., 6.], &[2, 1]);
    assert_eq!(cpu().concat(&[&a, &b], 1).unwrap().to_vec_f32().unwrap(), vec![1., 2., 5., 3., 4., 6.]);
    assert!(cpu().concat(&[&a, &b], 0).is_err());
    let p = cpu().contiguous(&a.permute(&[1, 0]).unwrap()).unwrap();
    assert!(p.is_contiguous());
    assert_eq!(p.to_vec_f32().unwrap(), vec![1., 3., 2., 4.]);
}

#[test]
fn upload_rounds_through_the_requested_dtype() {
    let x = t(&[1.0 + 1.0 / 512.0, 3.0], &[2]);
    let y = cpu().upload(&x, flux2::DType::BF16).unwrap().to_vec_f32().unwrap();
    assert_eq!(y, vec![1.0, 3.0]);
    assert_eq!(cpu().upload(&x, flux2::DType::F32).unwrap().to_vec_f32().unwrap(), x.to_vec_f32().unwrap());
}
