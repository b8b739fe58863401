//! The library entry point: [`AutoModel::from_pretrained`] locates (or downloads) a checkpoint,
//! decides whether to stream it in place or from a split ([`crate::storage`]), opens it and
//! returns a [`Model`] with its tokenizer.

use std::path::{Path, PathBuf};

use rabbit_split::SplitEvent;
use tokenizers::Tokenizer;

use rabbit_core::device::{device_name, DType};
use rabbit_core::engine::{Engine, EngineOptions};
use rabbit_core::generate::{Control, GenerateOutput, GenerateRequest, TokenEvent};

use crate::error::{Error, Result};
use crate::hub::locate;
pub use crate::options::LoadOptions;
use crate::storage::Source;
use crate::text::{load_tokenizer, TextCodec};

/// Progress of loading, for progress bars.
#[derive(Debug, Clone)]
pub enum LoadEvent {
    /// The model files are at this directory.
    Located(PathBuf),
    /// A split step happened.
    Split(SplitEvent),
    /// The residency plan.
    Planned(rabbit_core::plan::Plan),
    /// The layers stream straight from the checkpoint's weight files, no split.
    InPlace {
        /// Why: asked for, or the split would not fit (with the numbers).
        reason: String,
    },
    /// The engine is open on this device.
    Opened {
        /// `cpu` / `cuda:N`.
        device: String,
        /// Compute dtype.
        dtype: DType,
    },
}

/// Entry point mirroring the Python anchors' `AutoModel.from_pretrained`.
pub struct AutoModel;

impl AutoModel {
    /// Locates (or downloads) the model, splits it if needed, and opens it for streaming.
    pub fn from_pretrained(id_or_path: &str, opts: LoadOptions) -> Result<Model> {
        Self::from_pretrained_with_progress(id_or_path, opts, &mut |_| {})
    }

    /// As [`AutoModel::from_pretrained`], reporting progress.
    pub fn from_pretrained_with_progress(
        id_or_path: &str,
        opts: LoadOptions,
        progress: &mut dyn FnMut(&LoadEvent),
    ) -> Result<Model> {
        let loc = locate(id_or_path, &opts.hub)?;
        if loc.hub.is_some() && opts.delete_original {
            // The HF cache keeps weights as blobs behind snapshot links: deleting the links frees
            // nothing, and the next load would download and split everything again.
            return Err(Error::InvalidInput(format!(
                "--delete-original is not available for hub models ({id_or_path}): the HF cache \
                 holds their weights as shared blobs; free the space with \
                 `huggingface-cli delete-cache` once the split exists"
            )));
        }
        progress(&LoadEvent::Located(loc.dir.clone()));
        let spec = rabbit_models::load_spec(&loc.dir)?;
        let device = opts.device.resolve()?;
        let dtype = match opts.dtype {
            Some(d) => d,
            None => spec
                .storage_dtype
                .as_deref()
                .and_then(DType::from_config_name)
                .unwrap_or(DType::F32),
        };
        let split_dir = match (&opts.split_dir, &loc.hub) {
            (Some(d), _) => Some(d.clone()),
            (None, Some((repo, rev))) => {
                let dir = default_hub_split_dir(repo, rev, &loc.dir);
                // One split per compression, side by side.
                Some(match opts.compression {
                    Some(c) => dir.with_file_name(format!(
                        "{}-{c}",
                        dir.file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default()
                    )),
                    None => dir,
                })
            }
            (None, None) => None,
        };
        // Reading further ahead than there are layers buys nothing and costs staging memory.
        let prefetch_depth = opts.prefetch_depth.clamp(1, spec.num_layers.max(1));
        let engine_opts = EngineOptions {
            prefetch_depth,
            direct_io: opts.direct_io,
            verify_split: opts.verify_split,
            budget: opts.budget,
            plan_batch: opts.plan_batch,
            plan_context: opts.plan_context,
            plan_prefill_chunk: opts.plan_prefill_chunk,
            threads: opts.threads,
            expert_cache: opts.expert_cache,
            expert_streaming: opts.expert_streaming,
            expert_guess: opts.expert_guess,
            ..EngineOptions::new(device, dtype)
        };
        let layout = spec.layout();
        let engine = match crate::storage::prepare(&loc.dir, split_dir, &layout, &opts, progress)? {
            Source::Split(dir) => Engine::open(&dir, spec, &engine_opts)?,
            Source::InPlace(plan) => Engine::open_planned_in_place(&plan, spec, &engine_opts)?,
        };
        progress(&LoadEvent::Planned(engine.plan().clone()));
        progress(&LoadEvent::Opened {
            device: device_name(device),
            dtype,
        });
        let codec = load_tokenizer(&loc.dir)?.map(TextCodec::new);
        Ok(Model {
            engine,
            codec,
            model_dir: loc.dir,
            draft: None,
        })
    }
}

/// `$RABBIT_CACHE/splits/<repo>/<revision>` (default `~/.cache/rabbitllm/...`): hub snapshots
/// stay untouched.
fn default_hub_split_dir(repo: &str, revision: &str, snapshot: &Path) -> PathBuf {
    let base = std::env::var_os("RABBIT_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
                })
                .join("rabbitllm")
        });
    // The snapshot directory name is the commit hash: a new commit gets a new split.
    let commit = snapshot
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| revision.into());
    base.join("splits")
        .join(repo.replace('/', "--"))
        .join(commit)
}

/// A streamed model with its tokenizer.
pub struct Model {
    /// The executor.
    pub engine: Engine,
    codec: Option<TextCodec>,
    model_dir: PathBuf,
    /// The draft model for speculative decoding ([`Model::set_draft`]).
    draft: Option<Engine>,
}

impl Model {
    /// The tokenizer, when the model directory has one.
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.codec.as_ref().map(TextCodec::tokenizer)
    }

    /// Text encoding/decoding, when the model has a tokenizer.
    pub fn codec(&self) -> Option<&TextCodec> {
        self.codec.as_ref()
    }

    /// Directory of the original checkpoint (config, tokenizer).
    pub fn model_dir(&self) -> &Path {
        &self.model_dir
    }

    /// The codec, or an error saying the model has no tokenizer.
    pub fn require_codec(&self) -> Result<&TextCodec> {
        self.codec.as_ref().ok_or_else(|| {
            Error::Tokenizer(format!(
                "{} has no tokenizer (tokenizer.json, qwen.tiktoken or tokenizer.model): pass token ids instead of text",
                self.model_dir.display()
            ))
        })
    }

    /// The longest text (in bytes) that could still fit in the model's context; see
    /// [`TextCodec::max_text_bytes`].
    pub fn max_text_bytes(&self) -> Result<usize> {
        let context = self.engine.spec().max_position_embeddings;
        Ok(self.require_codec()?.max_text_bytes(context))
    }

    /// Refuses text that cannot fit in the context, before tokenizing it.
    fn check_text_len(&self, what: &str, len: usize) -> Result<()> {
        let max = self.max_text_bytes()?;
        if len > max {
            return Err(Error::Core(rabbit_core::CoreError::ContextTooLong {
                reason: format!(
                    "{what} is {len} bytes, more than any text of {} tokens (the model's context) \
                     can be: no token of this tokenizer covers more than {} bytes",
                    self.engine.spec().max_position_embeddings,
                    self.require_codec()?.max_token_bytes()
                ),
            }));
        }
        Ok(())
    }

    /// User text → ids, with the BOS/prefix ids the model's tokenizer adds by default (see
    /// [`TextCodec::encode_prompt`]). Special-token strings typed in the text stay plain text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.check_text_len("the prompt", text.len())?;
        self.require_codec()?.encode_prompt(text)
    }

    /// Renders `messages` with the model's chat template and encodes the result: the template's
    /// markup becomes control tokens, special-token strings typed in the messages stay text.
    pub fn encode_chat(
        &self,
        template: &rabbit_models::chat::ChatTemplate,
        messages: &[rabbit_models::chat::Message],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let codec = self.require_codec()?;
        let typed: usize = messages.iter().map(|m| m.content.len()).sum();
        self.check_text_len("the conversation", typed)?;
        let protected: Vec<rabbit_models::chat::Message> = messages
            .iter()
            .map(|m| rabbit_models::chat::Message {
                role: m.role.clone(),
                content: codec.protect(&m.content),
            })
            .collect();
        // Bounded by the template's own limit: pass one from [`Model::max_text_bytes`] with
        // `ChatTemplate::with_max_rendered_bytes` so a rendering that cannot fit stops early.
        let rendered = template.render(&protected, add_generation_prompt)?;
        self.check_text_len("the rendered chat prompt", rendered.len())?;
        codec.encode_rendered(&rendered)
    }

    /// Encodes a conversation with the model's chat format: its template
    /// ([`Model::encode_chat`]), or the prompt builder of its family's code for checkpoints
    /// that ship none (QWen v1, ChatGLM2/3, Baichuan 2), id for id as that code builds it.
    pub fn encode_conversation(
        &self,
        format: &rabbit_models::chat::ChatFormat,
        messages: &[rabbit_models::chat::Message],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        use rabbit_models::chat::ChatFormat;
        match format {
            ChatFormat::Template(t) => self.encode_chat(t, messages, add_generation_prompt),
            ChatFormat::Builtin(f) => {
                let codec = self.require_codec()?;
                let typed: usize = messages.iter().map(|m| m.content.len()).sum();
                self.check_text_len("the conversation", typed)?;
                // Typed special-token strings stay text here: the format inserts its own
                // control tokens by id.
                Ok(f.encode(messages, add_generation_prompt, &CodecPrompt(codec))?)
            }
        }
    }

    /// Ids → text, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.require_codec()?.decode(ids)
    }

    /// Runs a generation; see [`Engine::generate`]. With
    /// [`DraftSource::Model`](rabbit_core::DraftSource::Model) speculation, the draft set by
    /// [`Model::set_draft`] makes the drafts.
    pub fn generate(
        &mut self,
        req: &GenerateRequest,
        on_token: &mut dyn FnMut(&TokenEvent) -> Control,
    ) -> Result<GenerateOutput> {
        let draft = match req.speculation.source {
            rabbit_core::DraftSource::Model => Some(self.draft.as_mut().ok_or_else(|| {
                Error::InvalidInput(
                    "speculation from a draft model needs one: Model::set_draft (--draft-model)"
                        .into(),
                )
            })?),
            _ => None,
        };
        Ok(self.engine.generate_with_draft(req, draft, on_token)?)
    }

    /// Uses `draft` (typically a small model of the same family, kept resident) to draft tokens
    /// for speculative decoding. Refused unless it shares this model's vocabulary: the same size
    /// and, when both have tokenizers, the same token for every id.
    pub fn set_draft(&mut self, draft: Model) -> Result<()> {
        let (t, d) = (
            self.engine.spec().vocab_size,
            draft.engine.spec().vocab_size,
        );
        if t != d {
            return Err(Error::InvalidInput(format!(
                "{}: the draft model's vocabulary has {d} tokens, {}'s has {t}; a draft must \
                 share the model's tokenizer",
                draft.model_dir.display(),
                self.model_dir.display()
            )));
        }
        if let (Some(a), Some(b)) = (self.tokenizer(), draft.tokenizer()) {
            let (va, vb) = (a.get_vocab(true), b.get_vocab(true));
            // A token of one that the other lacks or numbers differently.
            let mismatch = va
                .iter()
                .find(|(tok, id)| vb.get(*tok) != Some(id))
                .map(|(tok, id)| (tok, Some(*id), vb.get(tok).copied()))
                .or_else(|| {
                    vb.iter()
                        .find(|(tok, _)| !va.contains_key(*tok))
                        .map(|(tok, id)| (tok, None, Some(*id)))
                });
            if let Some((tok, in_model, in_draft)) = mismatch {
                let show = |i: Option<u32>| i.map_or("absent".to_string(), |i| format!("id {i}"));
                return Err(Error::InvalidInput(format!(
                    "{}: the draft model's tokenizer differs from {}'s (token {tok:?}: {} in \
                     the model, {} in the draft); a draft must share the model's tokenizer",
                    draft.model_dir.display(),
                    self.model_dir.display(),
                    show(in_model),
                    show(in_draft)
                )));
            }
        }
        self.draft = Some(draft.engine);
        Ok(())
    }

    /// Takes the draft model's engine out (e.g. to pass it to
    /// [`rabbit_core::bench::run_with_draft`]).
    pub fn take_draft(&mut self) -> Option<Engine> {
        self.draft.take()
    }

    /// The draft model's engine, when one is set.
    pub fn draft_engine(&self) -> Option<&Engine> {
        self.draft.as_ref()
    }

    /// Convenience: greedy (or as `req.sampling` says) continuation of one text prompt.
    pub fn generate_text(&mut self, prompt: &str, max_new_tokens: usize) -> Result<String> {
        let ids = self.encode(prompt)?;
        let req = GenerateRequest {
            sequences: vec![ids],
            max_new_tokens,
            eos_token_ids: self.engine.spec().eos_token_ids.clone(),
            ..GenerateRequest::default()
        };
        let out = self.engine.generate(&req, &mut |_| Control::Continue)?;
        self.decode(&out.sequences[0].output_ids)
    }
}

/// The codec as the built-in chat formats see a tokenizer: user text (special-token strings kept
/// as text) with or without the tokenizer's default prefix, and special tokens by string.
struct CodecPrompt<'a>(&'a TextCodec);

impl rabbit_models::chat::PromptEncoder for CodecPrompt<'_> {
    fn encode_text(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> std::result::Result<Vec<u32>, rabbit_models::chat::EncodeError> {
        let ids = if add_special_tokens {
            self.0.encode_prompt(text)
        } else {
            self.0.encode(text, false)
        };
        ids.map_err(|e| e.to_string().into())
    }

    fn token_id(&self, token: &str) -> Option<u32> {
        self.0.tokenizer().token_to_id(token)
    }

    fn id_to_token(&self, id: u32) -> Option<String> {
        self.0.tokenizer().id_to_token(id)
    }
}
