//! How a model directory's built-in chat format is chosen when it has no `chat_template`
//! (`BuiltinFormat::detect`, `ChatFormat::from_model_dir`): by `tokenizer_class`, the files
//! that tell ChatGLM2 from ChatGLM3, QWen's `chat_format`, Baichuan's role ids; every refusal
//! names its file. The formats themselves are checked in `chat_builtin.rs`.

// In `mod chat_detect` so `cargo test -p rabbit-models chat` selects these tests too.
mod chat_detect {
    use std::fs;
    use std::path::Path;

    use rabbit_models::chat::{BuiltinFormat, ChatError, ChatFormat};
    use serde_json::{json, Value};

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

    /// A directory with these JSON files (and optional other files).
    fn dir_with(files: &[(&str, Value)], extra: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, v) in files {
            fs::write(dir.path().join(name), v.to_string()).unwrap();
        }
        for (name, text) in extra {
            fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    fn detect(dir: &Path) -> Result<Option<BuiltinFormat>, ChatError> {
        BuiltinFormat::detect(dir)
    }

    fn not_chat(r: Result<Option<BuiltinFormat>, ChatError>, path_end: &str, words: &str) {
        match r {
            Err(e @ ChatError::NotAChatModel { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(words), "{msg}");
                let ChatError::NotAChatModel { path, .. } = e else {
                    unreachable!()
                };
                assert!(path.ends_with(path_end), "{}", path.display());
            }
            other => panic!("expected NotAChatModel, got {other:?}"),
        }
    }

    #[test]
    fn chatglm2_and_3_are_told_apart_by_code_then_name() {
        let glm = |name: &str| json!({"tokenizer_class": "ChatGLMTokenizer", "name_or_path": name});
        // The tokenizer code decides, whatever the name says.
        let code3 = "role_special_tokens = [\"<|system|>\", \"<|user|>\", \"<|assistant|>\"]";
        let code2 = "special_tokens = [\"[MASK]\", \"[gMASK]\", \"[sMASK]\", \"sop\", \"eop\"]";
        let d = dir_with(
            &[("tokenizer_config.json", glm("me/chatglm2-ft"))],
            &[("tokenization_chatglm.py", code3)],
        );
        assert_eq!(detect(d.path()).unwrap(), Some(BuiltinFormat::ChatGlm3));
        let d = dir_with(
            &[("tokenizer_config.json", glm("THUDM/chatglm3-6b"))],
            &[("tokenization_chatglm.py", code2)],
        );
        assert_eq!(detect(d.path()).unwrap(), Some(BuiltinFormat::ChatGlm2));
        // No code: the names (tokenizer_config.json first, then config.json).
        let d = dir_with(
            &[("tokenizer_config.json", glm("THUDM/ChatGLM3-6b-32k"))],
            &[],
        );
        assert_eq!(detect(d.path()).unwrap(), Some(BuiltinFormat::ChatGlm3));
        let d = dir_with(
            &[
                (
                    "tokenizer_config.json",
                    json!({"tokenizer_class": "ChatGLMTokenizer"}),
                ),
                ("config.json", json!({"_name_or_path": "THUDM/chatglm2-6b"})),
            ],
            &[],
        );
        assert_eq!(detect(d.path()).unwrap(), Some(BuiltinFormat::ChatGlm2));
        let d = dir_with(&[("tokenizer_config.json", glm("my-finetune"))], &[]);
        not_chat(detect(d.path()), "", "ChatGLM2 or ChatGLM3");
        let d = dir_with(
            &[("tokenizer_config.json", glm("chatglm2-vs-chatglm3"))],
            &[],
        );
        not_chat(detect(d.path()), "tokenizer_config.json", "both");
    }

    #[test]
    fn qwen_needs_chatml_in_generation_config() {
        let tc = (
            "tokenizer_config.json",
            json!({"tokenizer_class": "QWenTokenizer"}),
        );
        let d = dir_with(std::slice::from_ref(&tc), &[]);
        not_chat(detect(d.path()), "generation_config.json", "no chat_format");
        let d = dir_with(
            &[
                tc.clone(),
                ("generation_config.json", json!({"chat_format": "raw"})),
            ],
            &[],
        );
        not_chat(
            detect(d.path()),
            "generation_config.json",
            "\"raw\": a base checkpoint",
        );
        let d = dir_with(
            &[
                tc.clone(),
                ("generation_config.json", json!({"chat_format": "alpaca"})),
            ],
            &[],
        );
        not_chat(detect(d.path()), "generation_config.json", "\"alpaca\"");
        let gen = json!({"chat_format": "chatml", "max_window_size": 24000});
        let d = dir_with(&[tc.clone(), ("generation_config.json", gen)], &[]);
        assert_eq!(
            detect(d.path()).unwrap(),
            Some(BuiltinFormat::QwenChatml {
                default_system: "You are a helpful assistant.".into(),
                max_window_size: 24000
            })
        );
        let gen = json!({"chat_format": "chatml", "max_window_size": "big"});
        let d = dir_with(&[tc, ("generation_config.json", gen)], &[]);
        match detect(d.path()) {
            Err(ChatError::BadConfig { path, reason }) => {
                assert!(path.ends_with("generation_config.json"));
                assert!(reason.contains("max_window_size"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn baichuan_needs_its_role_ids() {
        let tc = (
            "tokenizer_config.json",
            json!({"tokenizer_class": "BaichuanTokenizer"}),
        );
        let d = dir_with(std::slice::from_ref(&tc), &[]);
        not_chat(detect(d.path()), "generation_config.json", "missing");
        let gen = json!({"user_token_id": 195, "max_new_tokens": 10});
        let d = dir_with(&[tc.clone(), ("generation_config.json", gen)], &[]);
        not_chat(
            detect(d.path()),
            "generation_config.json",
            "assistant_token_id",
        );
        // No config.json: no model_max_length, so no cut.
        let gen = json!({"user_token_id": 195, "assistant_token_id": 196});
        let d = dir_with(&[tc, ("generation_config.json", gen)], &[]);
        let f = detect(d.path()).unwrap().unwrap();
        assert_eq!(
            f,
            BuiltinFormat::Baichuan2 {
                user_token_id: 195,
                assistant_token_id: 196,
                model_max_length: None,
                max_new_tokens: None
            }
        );
        assert_eq!(
            f.with_max_new_tokens(7),
            BuiltinFormat::Baichuan2 {
                user_token_id: 195,
                assistant_token_id: 196,
                model_max_length: None,
                max_new_tokens: Some(7)
            }
        );
    }

    #[test]
    fn a_template_wins_and_other_families_have_no_builtin_format() {
        // InternLM v1's fixture: no template, no built-in format -> not a chat model.
        let dir = Path::new(FIXTURES).join("tokenizers/internlm");
        assert!(ChatFormat::from_model_dir(&dir).unwrap().is_none());
        let d = dir_with(
            &[(
                "tokenizer_config.json",
                json!({"tokenizer_class": "LlamaTokenizer", "eos_token": "</s>"}),
            )],
            &[],
        );
        assert!(ChatFormat::from_model_dir(d.path()).unwrap().is_none());
        // A ChatGLM3 checkpoint that ships a template (later revisions do) uses the template.
        let d = dir_with(
            &[(
                "tokenizer_config.json",
                json!({"tokenizer_class": "ChatGLMTokenizer", "name_or_path": "THUDM/chatglm3-6b",
                       "chat_template": "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"}),
            )],
            &[],
        );
        assert!(matches!(
            ChatFormat::from_model_dir(d.path()).unwrap(),
            Some(ChatFormat::Template(_))
        ));
        // No tokenizer_config.json at all.
        let d = tempfile::tempdir().unwrap();
        assert!(ChatFormat::from_model_dir(d.path()).unwrap().is_none());
    }
}
