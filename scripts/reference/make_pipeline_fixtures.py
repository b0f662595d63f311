"""Tiny random Flux2KleinPipeline fixtures (real diffusers folder layout) and their float32 outputs.

Writes tests/fixtures/pipeline/ (the distilled pipeline), tests/fixtures/cases/<name>/
(noise, expected image and intermediates per run), tests/fixtures/tokenizer_ids.json and
component-level fixtures under tests/fixtures/components/.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
# The Qwen3 tokenizer (tokenizer.json converted from the Apache-2.0 qwen.tiktoken, see
# tests/fixtures/pipeline/tokenizer/README.md). Override with QWEN3_TOKENIZER_DIR.
DEFAULT_TOKENIZER = HERE.parents[1] / "tests" / "fixtures" / "pipeline" / "tokenizer"

# The Qwen3 chat template restricted to what the klein pipelines render (one user message,
# add_generation_prompt, enable_thinking=False); same output as the official template there.
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)

TOKENIZER_PROMPTS = [
    "a photo of a cat",
    "",
    "  Leading spaces, trailing newline\n",
    "一只戴着帽子的猫 🐱, café naïve — «quotes» ÆØÅ",
    "Numbers 1234567 and symbols #$%^&*() <|im_end|> literal special token",
    "tabs\tand\r\nwindows newlines\n\nparagraphs",
    " ".join(["long"] * 200) + " " + "supercalifragilistic " * 150,  # well over 512 tokens
]

SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")


def load_tokenizer():
    from transformers import Qwen2TokenizerFast

    src = Path(os.environ.get("QWEN3_TOKENIZER_DIR", DEFAULT_TOKENIZER))
    tok = Qwen2TokenizerFast(tokenizer_file=str(src / "tokenizer.json"), pad_token="<|endoftext|>",
                             eos_token="<|im_end|>", unk_token=None, bos_token=None, padding_side="right")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def randomize_(module, seed, norm_jitter=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                base = 0.0 if name.endswith("bias") else 1.0
                p.copy_(base + norm_jitter * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)


def round_(module, dtype):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(dtype).float())


def tiny_components(seed):
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    te_cfg = Qwen3Config(vocab_size=151669, hidden_size=8, intermediate_size=24, num_hidden_layers=28,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=4, max_position_embeddings=1024,
                         rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                         tie_word_embeddings=True, torch_dtype="float32")
    text_encoder = Qwen3ForCausalLM(te_cfg).eval()
    randomize_(text_encoder, seed)
    with torch.no_grad():  # embeddings of the usual scale, so 27 random layers stay well-conditioned
        text_encoder.model.embed_tokens.weight.mul_(0.5)
    round_(text_encoder, torch.bfloat16)

    vae = AutoencoderKLFlux2(block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=4,
                             norm_num_groups=4).eval()
    randomize_(vae, seed + 1)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 2)
        vae.bn.running_mean.copy_(0.2 * torch.randn(16, generator=g))
        vae.bn.running_var.copy_(0.5 + torch.rand(16, generator=g))
    round_(vae, torch.float16)

    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                          timestep_guidance_channels=32, mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4),
                                          rope_theta=2000, guidance_embeds=False).eval()
    randomize_(transformer, seed + 3, norm_jitter=0.2)
    round_(transformer, torch.bfloat16)
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    return text_encoder, vae, transformer, scheduler


def save_pipeline(pipe, out, dtypes):
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
    # Store weights compactly: the reference ran with exactly these rounded values.
    for comp, dtype in dtypes.items():
        model = getattr(pipe, comp)
        model.to(dtype)
        model.save_pretrained(out / comp, safe_serialization=True)
        model.to(torch.float32)
    tok_dir = out / "tokenizer"
    for extra in ("vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json"):
        (tok_dir / extra).unlink(missing_ok=True)
    # transformers pretty-prints tokenizer.json (11 MB); the compact form is the same JSON at half the size.
    tj = tok_dir / "tokenizer.json"
    tj.write_text(json.dumps(json.loads(tj.read_text()), ensure_ascii=False, separators=(",", ":")))


def pil_rgb(seed, w, h):
    """A smooth synthetic picture (compresses well, exercises every channel)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.02, 0.2, size=6)
    img = np.stack([np.sin(a[0] * x + a[1] * y), np.cos(a[2] * x - a[3] * y), np.sin(a[4] * (x + y) + a[5] * x * y / 50)], -1)
    return Image.fromarray(((img * 0.5 + 0.5) * 255).round().astype(np.uint8), "RGB")


def run_case(pipe, name, fixtures, prompt, width, height, steps, guidance, seed, refs=(), pipeline_name="distilled"):
    out = fixtures / "cases" / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    if refs:
        ref_paths = []
        for i, (w, h) in enumerate(refs):
            img = pil_rgb(seed + i, w, h)
            p = out / f"ref{i}.png"
            img.save(p)
            ref_paths.append(p)
        images = [Image.open(p) for p in ref_paths]
        first_w, first_h = images[0].size
        width = width or (first_w // 16) * 16
        height = height or (first_h // 16) * 16
    else:
        images = None
    noise = torch.randn(1, 16, height // 16, width // 16, generator=g)
    save_file({"noise": noise.contiguous()}, out / "noise.safetensors")
    common = dict(image=images, prompt=prompt, num_inference_steps=steps, guidance_scale=guidance, latents=noise)
    if refs:
        common.update(height=None, width=None)  # output size from the first reference
    else:
        common.update(height=height, width=width)
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(prompt)
        latents = pipe(**common, output_type="latent").images
        image = pipe(**common, output_type="np").images
        pil = pipe(**common, output_type="pil").images[0]
    pil.save(out / "expected.png")
    tensors = {"prompt_embeds": embeds, "latents": latents, "image": torch.from_numpy(image).permute(0, 3, 1, 2)}
    if guidance > 1 and not pipe.config.is_distilled:
        tensors["negative_prompt_embeds"] = pipe.encode_prompt("")[0]
    save_file({k: v.float().contiguous() for k, v in tensors.items()}, out / "expected.safetensors")
    meta = dict(pipeline=pipeline_name, prompt=prompt, width=pil.size[0], height=pil.size[1], steps=steps,
                guidance=guidance, refs=[f"ref{i}.png" for i in range(len(refs))])
    (out / "case.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    print(f"cases/{name}: {pil.size}, latents {tuple(latents.shape)}")


def make_components(pipe, fixtures):
    """Component-level inputs/outputs for `flux2 forward text-encoder|vae-encode|vae-decode`."""
    out = fixtures / "components"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tok = pipe.tokenizer
    ids, masks = [], []
    for p in ["a red fox in the snow", "一只猫"]:
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
                                       enable_thinking=False)
        enc = tok(text, return_tensors="pt", padding="max_length", truncation=True, max_length=512)
        ids.append(enc["input_ids"])
        masks.append(enc["attention_mask"])
    input_ids, mask = torch.cat(ids), torch.cat(masks)
    with torch.no_grad():
        embeds = pipe._get_qwen3_prompt_embeds(pipe.text_encoder, tok, ["a red fox in the snow", "一只猫"])
    save_file({"input_ids": input_ids.contiguous(), "attention_mask": mask.contiguous()}, out / "text_encoder_inputs.safetensors")
    save_file({"prompt_embeds": embeds.contiguous()}, out / "text_encoder_expected.safetensors")

    g = torch.Generator().manual_seed(7)
    image = torch.rand(2, 3, 48, 80, generator=g) * 2 - 1
    with torch.no_grad():
        mode = pipe.vae.encode(image).latent_dist.mode()
        image_latents = pipe._encode_vae_image(image, None)
        z = torch.randn(1, 4, 6, 4, generator=g)
        sample = pipe.vae.decode(z).sample
    save_file({"image": image.contiguous()}, out / "vae_encode_inputs.safetensors")
    save_file({"latent": mode.contiguous(), "image_latents": image_latents.contiguous()}, out / "vae_encode_expected.safetensors")
    save_file({"latents": z.contiguous()}, out / "vae_decode_inputs.safetensors")
    save_file({"sample": sample.contiguous()}, out / "vae_decode_expected.safetensors")
    print("components: text encoder, vae encode/decode")


def make_tokenizer_ids(tok, fixtures):
    rows = []
    for p in TOKENIZER_PROMPTS:
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
                                       enable_thinking=False)
        enc = tok(text, padding="max_length", truncation=True, max_length=512)
        n = sum(enc["attention_mask"])
        rows.append(dict(prompt=p, text=text, ids=enc["input_ids"][:n], length=n,
                         untruncated_length=len(tok(text)["input_ids"])))
    (fixtures / "tokenizer_ids.json").write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n")
    print(f"tokenizer ids: {len(rows)} prompts")


def make_resize_fixtures(fixtures):
    """PIL Lanczos resizes (what diffusers applies to references over 1024² pixels)."""
    out = fixtures / "resize"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    rng = np.random.default_rng(3)
    src = np.asarray(pil_rgb(5, 97, 61)).astype(np.int16) + rng.integers(-40, 40, size=(61, 97, 3))
    src = Image.fromarray(np.clip(src, 0, 255).astype(np.uint8), "RGB")
    src.save(out / "source.png")
    sizes = [(40, 25), (130, 70), (97, 30), (33, 61), (7, 5)]
    for w, h in sizes:
        src.resize((w, h), Image.Resampling.LANCZOS).save(out / f"lanczos_{w}x{h}.png")
    print(f"resize: {len(sizes)} PIL Lanczos results")


def main(fixtures):
    from diffusers import Flux2KleinPipeline

    tok = load_tokenizer()
    text_encoder, vae, transformer, scheduler = tiny_components(seed=2024)
    dtypes = {"text_encoder": torch.bfloat16, "transformer": torch.bfloat16, "vae": torch.float16}
    # Keep a copy of the tokenizer source before the distilled pipeline folder is rewritten.
    tok_src = Path(os.environ.get("QWEN3_TOKENIZER_DIR", DEFAULT_TOKENIZER))
    tmp_tok = fixtures / ".tokenizer_src"
    if tmp_tok.exists():
        shutil.rmtree(tmp_tok)
    shutil.copytree(tok_src, tmp_tok)
    try:
        pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                                  transformer=transformer, is_distilled=True)
        save_pipeline(pipe, fixtures / "pipeline", dtypes)
        if (tmp_tok / "README.md").exists():
            shutil.copy(tmp_tok / "README.md", fixtures / "pipeline" / "tokenizer" / "README.md")
            os.chmod(fixtures / "pipeline" / "tokenizer" / "README.md", 0o644)
    finally:
        shutil.rmtree(tmp_tok)

    # The base (undistilled) variant is the same folder without `is_distilled` in model_index.json;
    # tests build it from this one rather than committing the weights twice.
    distilled = Flux2KleinPipeline.from_pretrained(fixtures / "pipeline", torch_dtype=torch.float32)
    base_pipe = Flux2KleinPipeline(scheduler=distilled.scheduler, vae=distilled.vae, text_encoder=distilled.text_encoder,
                                   tokenizer=distilled.tokenizer, transformer=distilled.transformer, is_distilled=False)
    run_case(distilled, "t2i_nonsquare", fixtures, "a lighthouse on a cliff at dusk", 80, 48, 4, 1.0, seed=11)
    run_case(distilled, "t2i_unicode", fixtures, "一只戴着帽子的猫 🐱 — café", 64, 64, 4, 1.0, seed=12)
    run_case(distilled, "edit_one_ref", fixtures, "make it look like winter", None, None, 3, 1.0, seed=13,
             refs=[(72, 69)])
    run_case(base_pipe, "base_cfg", fixtures, "a bowl of fruit, oil painting", 48, 64, 3, 4.0, seed=14,
             pipeline_name="base")
    make_components(distilled, fixtures)
    make_tokenizer_ids(distilled.tokenizer, fixtures)
    make_resize_fixtures(fixtures)


# ---------------------------------------------------------------------------------------------
# Workflows (inpainting, img2img, the KV pipeline) on the committed distilled pipeline. Written to
# tests/fixtures/workflows/<name>/; the pipeline folder and the cases above are only read.

def mask_image(w, h, box, soft=0):
    """A white rectangle on black with a `soft`-pixel grey ramp around it (tests binarisation)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    x0, y0, x1, y1 = box
    dx = np.maximum(np.maximum(x0 - x, x - (x1 - 1)), 0)
    dy = np.maximum(np.maximum(y0 - y, y - (y1 - 1)), 0)
    d = np.maximum(dx, dy)
    v = np.where(d == 0, 255.0, np.clip(255.0 * (1 - d / (soft + 1)), 0, 255) if soft else 0.0)
    return Image.fromarray(v.round().astype(np.uint8), "L")


def captured_randn(module):
    """Record every `randn_tensor` draw of a pipeline module (the noise of `prepare_latents`)."""
    draws = []
    original = module.randn_tensor

    def wrapper(*args, **kwargs):
        t = original(*args, **kwargs)
        draws.append(t.clone())
        return t

    module.randn_tensor = wrapper
    return draws, lambda: setattr(module, "randn_tensor", original)


def run_inpaint_case(pipe, name, fixtures, prompt, init_size, steps, strength, seed, mask_box=None, soft=0,
                     ref_size=None, crop=None, guidance=1.0):
    import diffusers.pipelines.flux2.pipeline_flux2_klein_inpaint as module

    out = fixtures / "workflows" / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    init = pil_rgb(seed, *init_size)
    init.save(out / "init.png")
    if mask_box is not None:
        mask = mask_image(*init_size, mask_box, soft)
        mask.save(out / "mask.png")
    else:  # img2img: the reference needs a mask; all white is the same as none
        mask = Image.new("L", init_size, 255)
    ref = None
    if ref_size is not None:
        ref = pil_rgb(seed + 100, *ref_size)
        ref.save(out / "ref0.png")
    kwargs = dict(prompt=prompt, image=init, mask_image=mask, image_reference=ref, strength=strength,
                  num_inference_steps=steps, guidance_scale=guidance, padding_mask_crop=crop)
    results = {}
    draws, restore = captured_randn(module)
    try:
        with torch.no_grad():
            for kind in (["pil"] if crop is not None else ["pil", "np", "latent"]):
                g = torch.Generator().manual_seed(seed)
                results[kind] = pipe(**kwargs, generator=g, output_type=kind).images
    finally:
        restore()
    noise = draws[0]
    assert all(torch.equal(d, noise) for d in draws)
    save_file({"noise": noise.float().contiguous()}, out / "noise.safetensors")
    pil = results["pil"][0]
    pil.save(out / "expected.png")
    if crop is None:
        tensors = {"latents": results["latent"], "image": torch.from_numpy(results["np"]).permute(0, 3, 1, 2)}
        save_file({k: v.float().contiguous() for k, v in tensors.items()}, out / "expected.safetensors")
    meta = dict(pipeline="inpaint", prompt=prompt, steps=steps, guidance=guidance, strength=strength,
                mask="mask.png" if mask_box is not None else None, mask_crop=crop,
                refs=["ref0.png"] if ref is not None else [], width=pil.size[0], height=pil.size[1])
    (out / "case.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    print(f"workflows/{name}: {pil.size}, noise {tuple(noise.shape)}")


def make_workflow_fixtures(fixtures):
    from diffusers import Flux2KleinInpaintPipeline, Flux2KleinPipeline

    distilled = Flux2KleinPipeline.from_pretrained(fixtures / "pipeline", torch_dtype=torch.float32)
    parts = dict(scheduler=distilled.scheduler, vae=distilled.vae, text_encoder=distilled.text_encoder,
                 tokenizer=distilled.tokenizer, transformer=distilled.transformer)
    inpaint = Flux2KleinInpaintPipeline(**parts, is_distilled=True)
    # 70x52 is squashed to 64x48 (Lanczos), the grey ramp is binarised, strength 0.6 of 4 steps runs 3.
    run_inpaint_case(inpaint, "inpaint_mask", fixtures, "a red door", (70, 52), 4, 0.6, seed=21,
                     mask_box=(18, 10, 50, 40), soft=6)
    run_inpaint_case(inpaint, "img2img", fixtures, "an oil painting", (64, 64), 4, 0.5, seed=22)
    run_inpaint_case(inpaint, "inpaint_ref", fixtures, "put the object here", (48, 48), 3, 1.0, seed=23,
                     mask_box=(8, 16, 40, 40), ref_size=(72, 66))
    # padding_mask_crop: the region 30x22 around the mask is fill-resized to 64x48 and pasted back.
    run_inpaint_case(inpaint, "inpaint_crop", fixtures, "a window", (64, 48), 4, 0.8, seed=24,
                     mask_box=(20, 16, 40, 28), crop=5)


def run_kv_case(pipe, name, fixtures, prompt, ref_sizes, steps, seed):
    out = fixtures / "workflows" / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    images = []
    for i, (w, h) in enumerate(ref_sizes):
        pil_rgb(seed + i, w, h).save(out / f"ref{i}.png")
        images.append(Image.open(out / f"ref{i}.png"))
    width, height = (ref_sizes[0][0] // 16) * 16, (ref_sizes[0][1] // 16) * 16
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 16, height // 16, width // 16, generator=g)
    save_file({"noise": noise.contiguous()}, out / "noise.safetensors")
    common = dict(image=images, prompt=prompt, num_inference_steps=steps, latents=noise)
    with torch.no_grad():
        latents = pipe(**common, output_type="latent").images
        image = pipe(**common, output_type="np").images
        pil = pipe(**common, output_type="pil").images[0]
    pil.save(out / "expected.png")
    tensors = {"latents": latents, "image": torch.from_numpy(image).permute(0, 3, 1, 2)}
    save_file({k: v.float().contiguous() for k, v in tensors.items()}, out / "expected.safetensors")
    meta = dict(pipeline="kv", prompt=prompt, steps=steps, guidance=1.0, refs=[f"ref{i}.png" for i in range(len(images))],
                width=pil.size[0], height=pil.size[1])
    (out / "case.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    print(f"workflows/{name}: {pil.size}, {len(images)} reference(s)")


def make_kv_fixtures(fixtures):
    """Flux2KleinKVPipeline on the same tiny weights (the 9B-KV model differs only in its weights):
    reference K/V extracted at the first step (reference time 0), reused by the others."""
    from diffusers import Flux2KleinKVPipeline, Flux2KleinPipeline

    distilled = Flux2KleinPipeline.from_pretrained(fixtures / "pipeline", torch_dtype=torch.float32)
    kv = Flux2KleinKVPipeline(scheduler=distilled.scheduler, vae=distilled.vae, text_encoder=distilled.text_encoder,
                              tokenizer=distilled.tokenizer, transformer=distilled.transformer)
    run_kv_case(kv, "kv_one_ref", fixtures, "the same scene at night", [(72, 69)], 4, seed=31)
    run_kv_case(kv, "kv_two_refs", fixtures, "combine both", [(80, 64), (64, 72)], 4, seed=32)
