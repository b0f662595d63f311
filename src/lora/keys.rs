//! Reading a LoRA file's keys: which trainer's format it is, and which tensors belong to which
//! adapted module. Names are not resolved against the model here (see `names.rs`).

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::weights::WeightStore;

/// How a trainer names modules: the prefix in front of the module path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Naming {
    /// `transformer.<diffusers names>` (diffusers, PEFT, SimpleTuner).
    Diffusers,
    /// `diffusion_model.<BFL names>` (BFL, ai-toolkit) or ComfyUI's `model.diffusion_model.`.
    Bfl,
    /// `lora_unet_<path with dots as underscores>` (kohya sd-scripts, musubi-tuner, LyCORIS;
    /// also `lora_transformer_`, `lycoris_`).
    Kohya,
    /// No recognised prefix: the module path as it is.
    Bare,
}

/// The adapter algorithm of one module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Algo {
    /// `up · down` (`lora_B·lora_A`, `lora_up·lora_down`, `lora.up·lora.down`).
    Lora,
    /// LyCORIS LoKr: `kron(w1, w2)`, each full or a product of two factors.
    LoKr,
    /// LyCORIS LoHa: `(w1_a·w1_b) ⊙ (w2_a·w2_b)`.
    LoHa,
}

impl Algo {
    pub fn name(self) -> &'static str {
        match self {
            Algo::Lora => "LoRA",
            Algo::LoKr => "LoKr",
            Algo::LoHa => "LoHa",
        }
    }
}

/// One adapted module: its path (prefix removed) and its tensors by role.
#[derive(Debug, Clone)]
pub struct Module {
    pub path: String,
    pub naming: Naming,
    pub algo: Algo,
    /// Role (`down`, `up`, `alpha`, `w1`, `w1_a`, ..., `hada_w1_a`, ...) -> full key in the file.
    pub tensors: BTreeMap<&'static str, String>,
}

/// A LoRA file's keys, sorted into modules.
#[derive(Debug, Clone)]
pub struct ParsedKeys {
    pub modules: Vec<Module>,
    /// Keys for a text encoder (`lora_te*`, `text_encoder*`).
    pub text_encoder: Vec<String>,
    /// Keys of a known role that this loader does not implement (DoRA, Tucker cores, LoCon mid).
    pub unsupported: Vec<(String, &'static str)>,
    /// Keys that are no adapter tensor at all.
    pub unknown: Vec<String>,
    /// Whether the PEFT wrapper prefix `base_model.model.` was present.
    pub peft_wrapped: bool,
    /// Whether the old diffusers `.lora.down/.lora.up` spelling was used.
    pub old_diffusers: bool,
}

/// Key suffixes and the role they give (longest first where one ends another).
const ROLES: &[(&str, &str)] = &[
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".alpha", "alpha"),
    (".lokr_w1_a", "w1_a"),
    (".lokr_w1_b", "w1_b"),
    (".lokr_w2_a", "w2_a"),
    (".lokr_w2_b", "w2_b"),
    (".lokr_w1", "w1"),
    (".lokr_w2", "w2"),
    (".hada_w1_a", "hada_w1_a"),
    (".hada_w1_b", "hada_w1_b"),
    (".hada_w2_a", "hada_w2_a"),
    (".hada_w2_b", "hada_w2_b"),
];

/// Roles that exist in the wild but that this loader does not apply, with the reason.
const UNSUPPORTED: &[(&str, &str)] = &[
    (".dora_scale", "DoRA (weight-decomposed) adapters are not supported"),
    (".lora_magnitude_vector", "DoRA (weight-decomposed) adapters are not supported"),
    (".lora_magnitude_vector.weight", "DoRA (weight-decomposed) adapters are not supported"),
    (".lokr_t1", "LoKr Tucker cores (lokr_t1/lokr_t2, for convolutions) are not supported"),
    (".lokr_t2", "LoKr Tucker cores (lokr_t1/lokr_t2, for convolutions) are not supported"),
    (".hada_t1", "LoHa Tucker cores (hada_t1/hada_t2, for convolutions) are not supported"),
    (".hada_t2", "LoHa Tucker cores (hada_t1/hada_t2, for convolutions) are not supported"),
    (".lora_mid.weight", "LoCon Tucker cores (lora_mid, for convolutions) are not supported"),
];

const TEXT_ENCODER_PREFIXES: &[&str] = &["lora_te", "text_encoder", "te.", "te1.", "te2."];

/// Strip the trainer's prefix: (module path, naming). The PEFT wrapper is removed first.
fn split_prefix(path: &str) -> (&str, Naming) {
    for (prefix, naming) in [
        ("transformer.", Naming::Diffusers),
        ("model.diffusion_model.", Naming::Bfl),
        ("diffusion_model.", Naming::Bfl),
        ("lora_unet_", Naming::Kohya),
        ("lora_transformer_", Naming::Kohya),
        // The LyCORIS library's own wrapper names.
        ("lycoris_", Naming::Kohya),
    ] {
        if let Some(rest) = path.strip_prefix(prefix) {
            return (rest, naming);
        }
    }
    (path, Naming::Bare)
}

fn role_of(key: &str) -> Option<(&str, &'static str)> {
    ROLES.iter().find_map(|(suffix, role)| key.strip_suffix(suffix).map(|stem| (stem, *role)))
}

/// Sort a file's keys into modules. Fails only when the file holds no adapter tensor at all.
pub fn parse(store: &WeightStore) -> Result<ParsedKeys> {
    let mut keys: Vec<&str> = store.keys().collect();
    keys.sort();
    let mut parsed = ParsedKeys {
        modules: Vec::new(),
        text_encoder: Vec::new(),
        unsupported: Vec::new(),
        unknown: Vec::new(),
        peft_wrapped: false,
        old_diffusers: false,
    };
    let mut by_path: BTreeMap<String, Module> = BTreeMap::new();
    for key in keys {
        let unwrapped = match key.strip_prefix("base_model.model.") {
            Some(rest) => {
                parsed.peft_wrapped = true;
                rest
            }
            None => key,
        };
        if TEXT_ENCODER_PREFIXES.iter().any(|p| unwrapped.starts_with(p)) {
            parsed.text_encoder.push(key.to_string());
            continue;
        }
        if let Some((_, why)) = UNSUPPORTED.iter().find(|(s, _)| unwrapped.ends_with(s)) {
            parsed.unsupported.push((key.to_string(), why));
            continue;
        }
        let Some((stem, role)) = role_of(unwrapped) else {
            parsed.unknown.push(key.to_string());
            continue;
        };
        if key.ends_with(".lora.down.weight") || key.ends_with(".lora.up.weight") {
            parsed.old_diffusers = true;
        }
        let (path, naming) = split_prefix(stem);
        let algo = if role.starts_with("hada_") {
            Some(Algo::LoHa)
        } else if role.starts_with('w') {
            Some(Algo::LoKr)
        } else if role == "alpha" {
            None
        } else {
            Some(Algo::Lora)
        };
        let module = by_path.entry(format!("{naming:?}/{path}")).or_insert_with(|| Module {
            path: path.to_string(),
            naming,
            algo: algo.unwrap_or(Algo::Lora),
            tensors: BTreeMap::new(),
        });
        if let Some(a) = algo {
            if module.tensors.keys().any(|r| *r != "alpha") && module.algo != a {
                return Err(Error::config(
                    store.origin(),
                    format!("module `{path}` mixes {} and {} tensors (`{key}`)", module.algo.name(), a.name()),
                ));
            }
            module.algo = a;
        }
        if let Some(previous) = module.tensors.insert(role, key.to_string()) {
            return Err(Error::config(
                store.origin(),
                format!("module `{path}` has two `{role}` tensors: `{previous}` and `{key}`"),
            ));
        }
    }
    // An `alpha` with nothing else is no module: report it as unknown rather than drop it.
    for (_, m) in by_path {
        if m.tensors.keys().all(|r| *r == "alpha") {
            parsed.unknown.extend(m.tensors.into_values());
        } else {
            parsed.modules.push(m);
        }
    }
    if parsed.modules.is_empty() && parsed.text_encoder.is_empty() && parsed.unsupported.is_empty() {
        return Err(Error::config(
            store.origin(),
            format!(
                "not a LoRA file: none of its {} keys is an adapter tensor (lora_A/lora_B, lora_down/lora_up, \
                 lokr_*, hada_*){}",
                store.len(),
                list_some(&parsed.unknown)
            ),
        ));
    }
    Ok(parsed)
}

/// ": `a`, `b`, ... (N more)" for an error message.
pub fn list_some(keys: &[String]) -> String {
    if keys.is_empty() {
        return String::new();
    }
    let shown: Vec<String> = keys.iter().take(8).map(|k| format!("`{k}`")).collect();
    let more = if keys.len() > 8 { format!(" ({} more)", keys.len() - 8) } else { String::new() };
    format!(": {}{more}", shown.join(", "))
}

impl ParsedKeys {
    /// A one-line description of the format, as `inspect` and the log print it.
    pub fn describe(&self) -> String {
        let mut namings: Vec<Naming> = self.modules.iter().map(|m| m.naming).collect();
        namings.sort();
        namings.dedup();
        let mut algos: Vec<Algo> = self.modules.iter().map(|m| m.algo).collect();
        algos.sort();
        algos.dedup();
        let naming = namings
            .iter()
            .map(|n| match n {
                Naming::Diffusers if self.old_diffusers => "diffusers (old .lora.down/.lora.up)",
                Naming::Diffusers => "diffusers/PEFT (transformer.*)",
                Naming::Bfl => "BFL/ai-toolkit (diffusion_model.*)",
                Naming::Kohya => "kohya/musubi-tuner (lora_unet_*)",
                Naming::Bare => "unprefixed",
            })
            .collect::<Vec<_>>()
            .join(" + ");
        let algo = algos.iter().map(|a| a.name()).collect::<Vec<_>>().join(" + ");
        let wrapped = if self.peft_wrapped { ", PEFT-wrapped (base_model.model.)" } else { "" };
        if self.modules.is_empty() {
            return "text-encoder LoRA only".into();
        }
        format!("{algo}, {naming} names{wrapped}")
    }
}
