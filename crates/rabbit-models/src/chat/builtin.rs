//! Prompt formats built into the remote-code families' Python `chat()` functions, for their
//! checkpoints whose `tokenizer_config.json` has no `chat_template` (issue 13):
//!
//! * [`BuiltinFormat::QwenChatml`] — QWen v1 Chat: `make_context(..., chat_format="chatml")` of
//!   `qwen_generation_utils.py`, token by token: `<|im_start|>` + encode(role) + encode("\n") +
//!   encode(content) + `<|im_end|>` per message, joined by encode("\n"); the system message
//!   defaults to chat()'s "You are a helpful assistant."; old turns are dropped (newest kept first)
//!   while system + turns reach `max_window_size` tokens, as make_context does.
//! * [`BuiltinFormat::ChatGlm3`] — `build_chat_input` of ChatGLM3's tokenization_chatglm.py:
//!   `[gMASK] sop`, then per message `<|role|>` + encode("\n") + encode(content) (pieces encoded
//!   separately, each with sentencepiece's dummy prefix), then `<|assistant|>`.
//! * [`BuiltinFormat::ChatGlm2`] — ChatGLM2's `build_prompt`: the string
//!   `[Round n]\n\n问：{q}\n\n答：{r}\n\n`… encoded whole after `[gMASK] sop`.
//! * [`BuiltinFormat::Baichuan2`] — `build_chat_input` of Baichuan 2's generation_utils.py: the
//!   system text, then per message `user_token_id` / `assistant_token_id` + encode(content), then
//!   `assistant_token_id`; with `model_max_length` and `max_new_tokens` known, the history is cut
//!   as the original cuts it (whole rounds from the oldest, then the ids from the left).
//!
//! These are token-level: [`BuiltinFormat::encode`] gives ids, through a [`PromptEncoder`] that
//! encodes each text piece on its own (where the original encodes pieces separately, joining
//! them first would tokenize differently). Text typed in a message is encoded with special-token
//! strings kept as text: the original does the same for QWen (`allowed_special=set()`) and
//! ChatGLM (sentencepiece only); Baichuan's `tokenizer.encode` would read a typed `</s>` as the
//! control token, which rabbit does not do (as for chat templates).

use super::pystr::is_py_space;
use super::{ChatError, Message};

/// An error of the tokenizer behind a [`PromptEncoder`].
pub type EncodeError = Box<dyn std::error::Error + Send + Sync>;

/// What the built-in formats need from a tokenizer.
pub trait PromptEncoder {
    /// `text` → ids, special-token strings in it kept as text. `add_special_tokens`: add what
    /// the model's tokenizer class adds by default (its BOS, ChatGLM's `[gMASK] sop`), as
    /// transformers' `tokenizer.encode(text)`; `false`: nothing added.
    fn encode_text(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, EncodeError>;
    /// The id of a special token given by its string (`<|im_start|>`, `[gMASK]`).
    fn token_id(&self, token: &str) -> Option<u32>;
    /// The string of an id (only for [`BuiltinFormat::render_text`]).
    fn id_to_token(&self, id: u32) -> Option<String>;
}

/// A `tokenizers` tokenizer as it is configured: call `set_encode_special_tokens(true)` on it
/// first so that special-token strings in text stay text.
#[cfg(feature = "text")]
impl PromptEncoder for tokenizers::Tokenizer {
    fn encode_text(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, EncodeError> {
        Ok(self.encode(text, add_special_tokens)?.get_ids().to_vec())
    }
    fn token_id(&self, token: &str) -> Option<u32> {
        self.token_to_id(token)
    }
    fn id_to_token(&self, id: u32) -> Option<String> {
        // The inherent method (on the `TokenizerImpl` it derefs to), not this one.
        std::ops::Deref::deref(self).id_to_token(id)
    }
}

/// QWen chat()'s default system message.
pub const QWEN_DEFAULT_SYSTEM: &str = "You are a helpful assistant.";
/// make_context's default `max_window_size` (used when generation_config.json has none).
pub const QWEN_DEFAULT_MAX_WINDOW_SIZE: usize = 6144;

/// A chat prompt format of a remote-code family (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuiltinFormat {
    /// QWen v1 Chat (`chat_format` "chatml").
    QwenChatml {
        /// System message used when the conversation has none.
        default_system: String,
        /// make_context's `max_window_size`: older turns are dropped while the system message
        /// and the kept turns would reach this many tokens (the last query is never dropped).
        max_window_size: usize,
    },
    /// ChatGLM3 (`<|system|>`, `<|user|>`, `<|assistant|>`, `<|observation|>` role tokens).
    ChatGlm3,
    /// ChatGLM2 (`[Round n]` / `问：` / `答：`; no system message).
    ChatGlm2,
    /// Baichuan 2 Chat.
    Baichuan2 {
        /// generation_config.json's `user_token_id` (195).
        user_token_id: u32,
        /// generation_config.json's `assistant_token_id` (196).
        assistant_token_id: u32,
        /// config.json's `model_max_length`.
        model_max_length: Option<usize>,
        /// Tokens reserved for the reply: generation_config.json's `max_new_tokens`, or what
        /// [`with_max_new_tokens`](BuiltinFormat::with_max_new_tokens) sets. With
        /// `model_max_length`, the prompt is cut to `model_max_length - max_new_tokens` ids.
        max_new_tokens: Option<usize>,
    },
}

/// A conversation as the pair-based builders take it: `(system?, [(query, reply)], query?)`.
type Pairs<'a> = (Option<&'a str>, Vec<(&'a str, &'a str)>, Option<&'a str>);

/// Ids and display text built side by side.
struct Out<'a> {
    enc: &'a dyn PromptEncoder,
    name: &'static str,
    ids: Vec<u32>,
    text: String,
}

impl<'a> Out<'a> {
    fn new(enc: &'a dyn PromptEncoder, name: &'static str) -> Out<'a> {
        Out {
            enc,
            name,
            ids: Vec::new(),
            text: String::new(),
        }
    }

    fn fresh(&self) -> Out<'a> {
        Out::new(self.enc, self.name)
    }

    fn text(&mut self, s: &str, add_special_tokens: bool) -> Result<&mut Self, ChatError> {
        let ids = self
            .enc
            .encode_text(s, add_special_tokens)
            .map_err(|source| ChatError::Encode {
                format: self.name,
                source,
            })?;
        self.ids.extend(ids);
        self.text.push_str(s);
        Ok(self)
    }

    fn token(&mut self, t: &str) -> Result<&mut Self, ChatError> {
        let id = self
            .enc
            .token_id(t)
            .ok_or_else(|| ChatError::UnknownToken {
                format: self.name,
                token: t.to_string(),
            })?;
        self.ids.push(id);
        self.text.push_str(t);
        Ok(self)
    }

    fn id(&mut self, id: u32) -> &mut Self {
        self.ids.push(id);
        match self.enc.id_to_token(id) {
            Some(t) => self.text.push_str(&t),
            None => self.text.push_str(&format!("<id {id}>")),
        }
        self
    }

    fn append(&mut self, other: Out<'_>) {
        self.ids.extend(other.ids);
        self.text.push_str(&other.text);
    }

    fn prepend(&mut self, other: Out<'_>) {
        let mut ids = other.ids;
        ids.extend(std::mem::take(&mut self.ids));
        self.ids = ids;
        self.text.insert_str(0, &other.text);
    }
}

impl BuiltinFormat {
    /// Whether a conversation may start with a system message (ChatGLM2's format has none).
    pub fn takes_system(&self) -> bool {
        !matches!(self, BuiltinFormat::ChatGlm2)
    }

    /// A short name for messages (`QWen ChatML`, `ChatGLM3`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            BuiltinFormat::QwenChatml { .. } => "QWen ChatML prompt (make_context)",
            BuiltinFormat::ChatGlm3 => "ChatGLM3 prompt (build_chat_input)",
            BuiltinFormat::ChatGlm2 => "ChatGLM2 prompt (build_prompt)",
            BuiltinFormat::Baichuan2 { .. } => "Baichuan 2 prompt (build_chat_input)",
        }
    }

    /// The same format with `n` tokens reserved for the reply (Baichuan 2: as its chat() passes
    /// `generation_config.max_new_tokens`; the prompt is cut to `model_max_length - n` ids).
    /// Other formats do not depend on it.
    pub fn with_max_new_tokens(mut self, n: usize) -> BuiltinFormat {
        if let BuiltinFormat::Baichuan2 { max_new_tokens, .. } = &mut self {
            *max_new_tokens = Some(n);
        }
        self
    }

    /// Tokens that end the assistant's turn besides the model's EOS, as the original chat()
    /// stops on them (QWen: `<|im_end|>`, `<|im_start|>`; ChatGLM3: `<|user|>`, `<|observation|>`).
    pub fn stop_tokens(&self) -> &'static [&'static str] {
        match self {
            BuiltinFormat::QwenChatml { .. } => &["<|im_end|>", "<|im_start|>"],
            BuiltinFormat::ChatGlm3 => &["<|user|>", "<|observation|>"],
            BuiltinFormat::ChatGlm2 | BuiltinFormat::Baichuan2 { .. } => &[],
        }
    }

    /// The assistant message to keep in the conversation for a generated reply (its text, decoded
    /// without the stop token), as the original chat() returns it: QWen and ChatGLM2 strip
    /// whitespace; ChatGLM3 drops the metadata line (`process_response`: the text up to the first
    /// newline) and strips; Baichuan keeps the reply as it is.
    pub fn reply_for_history(&self, reply: &str) -> String {
        match self {
            BuiltinFormat::QwenChatml { .. } | BuiltinFormat::ChatGlm2 => {
                reply.trim_matches(is_py_space).to_string()
            }
            BuiltinFormat::ChatGlm3 => {
                // The last `<|assistant|>` segment is the reply; a non-blank metadata line would
                // be a tool call, whose content the original keeps unstripped.
                let last = reply.rsplit("<|assistant|>").next().unwrap_or(reply);
                let (meta, content) = last.split_once('\n').unwrap_or(("", last));
                if meta.trim_matches(is_py_space).is_empty() {
                    content.trim_matches(is_py_space).to_string()
                } else {
                    content.to_string()
                }
            }
            BuiltinFormat::Baichuan2 { .. } => reply.to_string(),
        }
    }

    /// The prompt ids for `messages`, exactly as the original Python builds them (see the module
    /// docs for the one difference: Baichuan's reading of special-token strings typed in messages).
    /// `add_generation_prompt`: end with the assistant's turn opener (the original always does;
    /// without it the ids stop before the opener).
    pub fn encode(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        enc: &dyn PromptEncoder,
    ) -> Result<Vec<u32>, ChatError> {
        Ok(self.build(messages, add_generation_prompt, enc, true)?.ids)
    }

    /// The prompt as text, special tokens spelled out (`<|im_start|>`, `[gMASK]`, Baichuan's ids
    /// by their pieces), for display (`rabbit template`): QWen's is make_context's `raw_text`,
    /// ChatGLM2's is `[gMASK]sop` + build_prompt's string. Nothing is cut for length here.
    pub fn render_text(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        enc: &dyn PromptEncoder,
    ) -> Result<String, ChatError> {
        Ok(self
            .build(messages, add_generation_prompt, enc, false)?
            .text)
    }

    fn build<'a>(
        &self,
        messages: &[Message],
        add_gen: bool,
        enc: &'a dyn PromptEncoder,
        truncate: bool,
    ) -> Result<Out<'a>, ChatError> {
        if messages.is_empty() {
            return Err(ChatError::EmptyConversation);
        }
        let mut out = Out::new(enc, self.name());
        match self {
            BuiltinFormat::QwenChatml {
                default_system,
                max_window_size,
            } => {
                let window = truncate.then_some(*max_window_size);
                qwen(&mut out, messages, add_gen, default_system, window)?
            }
            BuiltinFormat::ChatGlm3 => chatglm3(&mut out, messages, add_gen)?,
            BuiltinFormat::ChatGlm2 => chatglm2(&mut out, messages, add_gen)?,
            BuiltinFormat::Baichuan2 {
                user_token_id,
                assistant_token_id,
                model_max_length,
                max_new_tokens,
            } => {
                let limit = match (truncate, model_max_length, max_new_tokens) {
                    (true, Some(len), Some(new)) => {
                        if new >= len {
                            return Err(ChatError::BadConversation {
                                format: self.name(),
                                reason: format!(
                                    "max_new_tokens ({new}) leaves no room for the prompt in model_max_length ({len}) tokens"
                                ),
                            });
                        }
                        Some(len - new)
                    }
                    _ => None,
                };
                let ids = (*user_token_id, *assistant_token_id);
                baichuan(&mut out, messages, add_gen, ids, limit)?
            }
        }
        Ok(out)
    }
}

fn bad(format: &'static str, reason: String) -> ChatError {
    ChatError::BadConversation { format, reason }
}

/// Splits `(system) (user assistant)* (user)` for the QWen / ChatGLM2 builders, whose history
/// is a list of `(query, response)` pairs.
fn pairs<'m>(
    name: &'static str,
    messages: &'m [Message],
    allow_system: bool,
) -> Result<Pairs<'m>, ChatError> {
    let mut system = None;
    let mut rest = messages;
    let mut offset = 0;
    if let Some(first) = rest.first() {
        if first.role == "system" {
            if !allow_system {
                return Err(bad(
                    name,
                    "message 0: this format has no system message (ChatGLM2's build_prompt takes only user/assistant turns)".into(),
                ));
            }
            system = Some(first.content.as_str());
            rest = &rest[1..];
            offset = 1;
        }
    }
    let mut out = Vec::new();
    let mut query = None;
    for (k, m) in rest.iter().enumerate() {
        let want = if k % 2 == 0 { "user" } else { "assistant" };
        if m.role != want {
            let what = if m.role == "system" {
                "a system message is only allowed first".to_string()
            } else {
                format!("expected role \"{want}\" (the conversation must alternate user/assistant, starting with user), found \"{}\"", m.role)
            };
            return Err(bad(name, format!("message {}: {what}", k + offset)));
        }
        if k % 2 == 0 {
            query = Some(m.content.as_str());
        } else {
            out.push((
                query.take().expect("a user message precedes"),
                m.content.as_str(),
            ));
        }
    }
    Ok((system, out, query))
}

fn no_query(name: &'static str) -> ChatError {
    bad(
        name,
        "the conversation must end with a user message to ask for a reply".into(),
    )
}

/// qwen_generation_utils.make_context, chat_format "chatml".
fn qwen(
    out: &mut Out<'_>,
    messages: &[Message],
    add_gen: bool,
    default_system: &str,
    window: Option<usize>,
) -> Result<(), ChatError> {
    let (system, history, query) = pairs(out.name, messages, true)?;
    if add_gen && query.is_none() {
        return Err(no_query(out.name));
    }
    // `_tokenize_str(role, content)` wrapped in im_start / im_end.
    let message = |o: &mut Out<'_>, role: &str, content: &str| -> Result<(), ChatError> {
        o.token("<|im_start|>")?
            .text(role, false)?
            .text("\n", false)?;
        o.text(content, false)?.token("<|im_end|>")?;
        Ok(())
    };
    let mut sys = out.fresh();
    message(&mut sys, "system", system.unwrap_or(default_system))?;
    let mut context = out.fresh();
    for (q, r) in history.iter().rev() {
        let mut turn = out.fresh();
        turn.text("\n", false)?;
        message(&mut turn, "user", q)?;
        turn.text("\n", false)?;
        message(&mut turn, "assistant", r)?;
        let size = sys.ids.len() + turn.ids.len() + context.ids.len();
        if window.is_some_and(|w| size >= w) {
            break;
        }
        context.prepend(turn);
    }
    out.append(sys);
    out.append(context);
    if let Some(q) = query {
        out.text("\n", false)?;
        message(out, "user", q)?;
        if add_gen {
            out.text("\n", false)?
                .token("<|im_start|>")?
                .text("assistant", false)?
                .text("\n", false)?;
        }
    }
    Ok(())
}

const GLM3_ROLES: [&str; 4] = ["system", "user", "assistant", "observation"];

/// ChatGLMTokenizer.build_chat_input (ChatGLM3), metadata empty.
fn chatglm3(out: &mut Out<'_>, messages: &[Message], add_gen: bool) -> Result<(), ChatError> {
    out.token("[gMASK]")?.token("sop")?;
    for (i, m) in messages.iter().enumerate() {
        if !GLM3_ROLES.contains(&m.role.as_str()) {
            return Err(bad(
                out.name,
                format!(
                    "message {i}: role \"{}\" is not one of ChatGLM3's roles ({})",
                    m.role,
                    GLM3_ROLES.join(", ")
                ),
            ));
        }
        // build_single_message: role token + encode(f"{metadata}\n") + encode(message).
        out.token(&format!("<|{}|>", m.role))?
            .text("\n", false)?
            .text(&m.content, false)?;
    }
    if add_gen {
        out.token("<|assistant|>")?;
    }
    Ok(())
}

/// ChatGLMTokenizer.build_prompt (ChatGLM2), encoded whole after the `[gMASK] sop` prefix.
fn chatglm2(out: &mut Out<'_>, messages: &[Message], add_gen: bool) -> Result<(), ChatError> {
    let (_, history, query) = pairs(out.name, messages, false)?;
    let mut prompt = String::new();
    for (i, (q, r)) in history.iter().enumerate() {
        prompt.push_str(&format!("[Round {}]\n\n问：{q}\n\n答：{r}\n\n", i + 1));
    }
    match (query, add_gen) {
        (Some(q), true) => {
            prompt.push_str(&format!("[Round {}]\n\n问：{q}\n\n答：", history.len() + 1))
        }
        (None, false) => {}
        (None, true) => return Err(no_query(out.name)),
        (Some(_), false) => {
            return Err(bad(
                out.name,
                "build_prompt has no form of a user turn without its `答：` opener: ask with the generation prompt, or end the conversation with the assistant's reply".into(),
            ))
        }
    }
    out.token("[gMASK]")?.token("sop")?.text(&prompt, false)?;
    Ok(())
}

/// Baichuan 2's generation_utils.build_chat_input; `limit` is `max_input_tokens`.
fn baichuan(
    out: &mut Out<'_>,
    messages: &[Message],
    add_gen: bool,
    (user, assistant): (u32, u32),
    limit: Option<usize>,
) -> Result<(), ChatError> {
    let mut system = "";
    let mut rounds: Vec<Vec<&Message>> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        match m.role.as_str() {
            "system" if i == 0 => system = &m.content,
            "system" => {
                return Err(bad(
                    out.name,
                    format!("message {i}: a system message is only allowed first"),
                ))
            }
            // The original gives any role but "user" the assistant token; only the two it
            // was trained on are accepted here.
            "user" | "assistant" => {
                if m.role == "user" || rounds.is_empty() {
                    rounds.push(Vec::new());
                }
                rounds.last_mut().expect("pushed").push(m);
            }
            other => {
                return Err(bad(
                    out.name,
                    format!("message {i}: role \"{other}\" is not one of Baichuan's roles (system, user, assistant)"),
                ))
            }
        }
    }
    let mut sys = out.fresh();
    sys.text(system, true)?;
    let max_history = limit.map(|l| l as i64 - sys.ids.len() as i64);
    let mut history = out.fresh();
    for round in rounds.iter().rev() {
        let mut r = out.fresh();
        for m in round {
            r.id(if m.role == "user" { user } else { assistant });
            r.text(&m.content, true)?;
        }
        let Some(max) = max_history else {
            history.prepend(r);
            continue;
        };
        if history.ids.is_empty() || (history.ids.len() + r.ids.len()) as i64 <= max {
            history.prepend(r);
            if (history.ids.len() as i64) < max {
                continue;
            }
        }
        break;
    }
    out.append(sys);
    out.append(history);
    let last = messages.last().expect("non-empty");
    if add_gen && last.role != "assistant" {
        out.id(assistant);
    }
    if let Some(l) = limit {
        if out.ids.len() > l {
            out.ids.drain(..out.ids.len() - l);
        }
    }
    Ok(())
}
