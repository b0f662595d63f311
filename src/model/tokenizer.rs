//! The klein prompt tokenizer: Qwen3 byte-level BPE from the model's `tokenizer/` folder
//! (`tokenizer.json`, or `vocab.json` + `merges.txt`), the chat template with thinking disabled,
//! right padding to a fixed length with the pad id, and truncation with a warning.

use std::path::{Path, PathBuf};

use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, Result};

/// What `apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
/// enable_thinking=False)` renders for Qwen3 (spec §6.3).
pub const PROMPT_PREFIX: &str = "<|im_start|>user\n";
pub const PROMPT_SUFFIX: &str = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n";
/// The pipelines' `max_sequence_length`.
pub const MAX_TOKENS: usize = 512;

/// Qwen2's pre-tokenizer split pattern.
const QWEN_PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen3's added tokens (ids 151643..=151668), used when a vocab/merges folder has no
/// `tokenizer_config.json` listing them.
const QWEN3_ADDED: [(&str, bool); 26] = [
    ("<|endoftext|>", true),
    ("<|im_start|>", true),
    ("<|im_end|>", true),
    ("<|object_ref_start|>", true),
    ("<|object_ref_end|>", true),
    ("<|box_start|>", true),
    ("<|box_end|>", true),
    ("<|quad_start|>", true),
    ("<|quad_end|>", true),
    ("<|vision_start|>", true),
    ("<|vision_end|>", true),
    ("<|vision_pad|>", true),
    ("<|image_pad|>", true),
    ("<|video_pad|>", true),
    ("<tool_call>", false),
    ("</tool_call>", false),
    ("<|fim_prefix|>", false),
    ("<|fim_middle|>", false),
    ("<|fim_suffix|>", false),
    ("<|fim_pad|>", false),
    ("<|repo_name|>", false),
    ("<|file_sep|>", false),
    ("<tool_response>", false),
    ("</tool_response>", false),
    ("<think>", false),
    ("</think>", false),
];

/// One prompt, padded: `ids`/`mask` have exactly the padded length.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedPrompt {
    pub ids: Vec<u32>,
    pub mask: Vec<u8>,
    /// Real (unpadded) tokens after truncation.
    pub length: usize,
    /// Tokens before truncation.
    pub untruncated_length: usize,
}

pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    pad_id: u32,
    dir: PathBuf,
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::config(path, format!("cannot load the tokenizer: {e}"))
}

impl PromptTokenizer {
    /// Load from a `tokenizer/` folder.
    pub fn load(dir: &Path) -> Result<PromptTokenizer> {
        if !dir.is_dir() {
            return Err(Error::config(dir, "tokenizer folder not found"));
        }
        let config = read_json(&dir.join("tokenizer_config.json"))?;
        let json_path = dir.join("tokenizer.json");
        let tokenizer = if json_path.is_file() {
            Tokenizer::from_file(&json_path).map_err(|e| tok_err(&json_path, e))?
        } else if dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file() {
            from_vocab_merges(dir, config.as_ref())?
        } else {
            return Err(Error::config(dir, "no tokenizer.json, and no vocab.json + merges.txt"));
        };
        let pad_token = config
            .as_ref()
            .and_then(|c| c.get("pad_token"))
            .and_then(|p| p.as_str().or_else(|| p.get("content").and_then(|c| c.as_str())))
            .unwrap_or("<|endoftext|>")
            .to_string();
        let pad_id = tokenizer
            .token_to_id(&pad_token)
            .ok_or_else(|| Error::config(dir, format!("pad token {pad_token} is not in the vocabulary")))?;
        Ok(PromptTokenizer { tokenizer, pad_id, dir: dir.to_path_buf() })
    }

    /// The Qwen3 tokenizer compiled into the binary (assets/qwen3-tokenizer), for setups with no
    /// `tokenizer/` folder (separate transformer, text-encoder and VAE files).
    pub fn builtin() -> Result<PromptTokenizer> {
        use std::io::Read;
        const GZ: &[u8] = include_bytes!("../../assets/qwen3-tokenizer/tokenizer.json.gz");
        let origin = Path::new("<built-in Qwen3 tokenizer>");
        let mut json = Vec::new();
        flate2::read::GzDecoder::new(GZ).read_to_end(&mut json).map_err(|e| tok_err(origin, e))?;
        let tokenizer = Tokenizer::from_bytes(&json).map_err(|e| tok_err(origin, e))?;
        let pad_id = tokenizer
            .token_to_id("<|endoftext|>")
            .ok_or_else(|| Error::config(origin, "the pad token <|endoftext|> is not in the vocabulary"))?;
        Ok(PromptTokenizer { tokenizer, pad_id, dir: origin.to_path_buf() })
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Token ids of arbitrary text (special tokens written literally are matched, as in Python).
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.tokenizer.encode(text, true).map_err(|e| tok_err(&self.dir, e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The templated prompt, truncated to `max_len` tokens (with a warning) and right-padded.
    pub fn encode_prompt(&self, prompt: &str, max_len: usize) -> Result<TokenizedPrompt> {
        let mut ids = self.encode_raw(&format!("{PROMPT_PREFIX}{prompt}{PROMPT_SUFFIX}"))?;
        let untruncated_length = ids.len();
        if ids.len() > max_len {
            tracing::warn!(
                "the prompt is {} tokens with its template; only the first {max_len} are used (the rest, including the \
                 template's end, is cut, as diffusers does)",
                ids.len()
            );
            ids.truncate(max_len);
        }
        let length = ids.len();
        let mut mask = vec![1u8; length];
        ids.resize(max_len, self.pad_id);
        mask.resize(max_len, 0);
        Ok(TokenizedPrompt { ids, mask, length, untruncated_length })
    }
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map(Some).map_err(|e| Error::config(path, format!("not valid JSON: {e}")))
}

/// Rebuild Qwen2TokenizerFast from the slow files: NFC, the Qwen split pattern, byte-level
/// BPE, then the added tokens in id order.
fn from_vocab_merges(dir: &Path, config: Option<&serde_json::Value>) -> Result<Tokenizer> {
    let vocab = dir.join("vocab.json");
    let merges = dir.join("merges.txt");
    let bpe =
        BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy()).build().map_err(|e| tok_err(&vocab, e))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let split = Split::new(SplitPattern::Regex(QWEN_PATTERN.into()), SplitDelimiterBehavior::Isolated, false)
        .map_err(|e| tok_err(dir, e))?;
    tokenizer.with_normalizer(Some(NFC)).map_err(|e| tok_err(dir, e))?;
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![split.into(), ByteLevel::new(false, false, false).into()])));
    tokenizer.with_decoder(Some(ByteLevel::new(false, false, false)));

    // Added tokens: from tokenizer_config.json's `added_tokens_decoder` when present.
    let mut added: Vec<(u32, String, bool)> =
        match config.and_then(|c| c.get("added_tokens_decoder")).and_then(|d| d.as_object()) {
            Some(map) => map
                .iter()
                .filter_map(|(id, v)| {
                    Some((
                        id.parse().ok()?,
                        v.get("content")?.as_str()?.to_string(),
                        v.get("special")?.as_bool().unwrap_or(true),
                    ))
                })
                .collect(),
            None => {
                let base = tokenizer.get_vocab_size(false) as u32;
                QWEN3_ADDED.iter().enumerate().map(|(i, (c, s))| (base + i as u32, c.to_string(), *s)).collect()
            }
        };
    added.sort();
    for (id, content, special) in added {
        let token = AddedToken::from(content.clone(), special);
        if special {
            tokenizer.add_special_tokens([token]).map_err(|e| tok_err(dir, e))?;
        } else {
            tokenizer.add_tokens([token]).map_err(|e| tok_err(dir, e))?;
        }
        if tokenizer.token_to_id(&content) != Some(id) {
            return Err(Error::config(
                dir,
                format!("added token {content} should have id {id}; the vocabulary does not line up"),
            ));
        }
    }
    Ok(tokenizer)
}
