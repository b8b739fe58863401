//! Tests of `rabbit_models::chat`: byte-for-byte parity with transformers'
//! `apply_chat_template(..., tokenize=False)` on the real Qwen2 / Qwen3 tokenizer configs
//! (goldens written by `tests/fixtures/make_chat_goldens.py`), the Jinja features chat templates
//! use, the synthetic tokenizer's template, and the error paths.

mod common;

// Everything lives in `mod chat` so `cargo test -p rabbit-models chat` selects these tests.
mod chat {
    use super::common::diff_hint;
    use std::fs;
    use std::path::{Path, PathBuf};

    use rabbit_models::chat::{load_messages, ChatError, ChatTemplate, Message};
    use rabbit_models::synth::tokenizer::{SynthTokenizer, CHAT_TEMPLATE};
    use serde_json::Value;

    const TOKENIZERS: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/data/tokenizers"
    );
    const GOLDENS: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/chat/goldens.json"
    );

    fn goldens() -> Value {
        serde_json::from_str(&fs::read_to_string(GOLDENS).expect("read goldens.json"))
            .expect("goldens.json parses")
    }

    /// A real tokenizer from the shared data directory beside the checkout (skips when absent).
    fn tokenizer_dir(name: &str) -> Option<PathBuf> {
        rabbit_models::testdata::shared_tokenizer(Path::new(TOKENIZERS), name)
    }

    fn messages_of(case: &Value) -> Vec<Message> {
        serde_json::from_value(case["messages"].clone()).expect("golden messages deserialize")
    }

    /// Renders every golden case of one real tokenizer and compares byte for byte.
    fn check_tokenizer(name: &str) -> Option<usize> {
        let dir = tokenizer_dir(name)?;
        let g = goldens();
        let entry = &g["tokenizers"][name];
        let tmpl = ChatTemplate::from_tokenizer_config(&dir)
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .unwrap_or_else(|| panic!("{name}: tokenizer_config.json has a chat_template"));

        // The special tokens handed to the template are transformers' special_tokens_map.
        let want_specials = entry["special_tokens_map"].as_object().unwrap();
        for (k, v) in want_specials {
            let got = tmpl.special_tokens().iter().find(|(n, _)| n == k);
            assert_eq!(
                got.map(|(_, t)| t.as_str()),
                v.as_str(),
                "{name}: special token {k}"
            );
        }
        assert_eq!(
            tmpl.special_tokens().len(),
            want_specials.len(),
            "{name}: {tmpl:?}"
        );

        let cases = entry["cases"].as_array().unwrap();
        let mut failures = Vec::new();
        for case in cases {
            let case_name = case["name"].as_str().unwrap();
            let agp = case["add_generation_prompt"].as_bool().unwrap();
            let messages = messages_of(case);
            let got = tmpl.render(&messages, agp);
            match (case.get("expected"), got) {
                (Some(want), Ok(got)) => {
                    let want = want.as_str().unwrap();
                    if got != want {
                        failures.push(format!(
                        "{name}/{case_name} (add_generation_prompt={agp}): {}\n  got:  {got:?}\n  want: {want:?}",
                        diff_hint(&got, want)
                    ));
                    }
                }
                (Some(_), Err(e)) => {
                    failures.push(format!("{name}/{case_name} ({agp}): error {e}"))
                }
                (None, Ok(got)) => failures.push(format!(
                    "{name}/{case_name} ({agp}): transformers raised {} but rendered {got:?}",
                    case["error"]
                )),
                (None, Err(e)) => {
                    if case_name == "empty_conversation" {
                        assert!(matches!(e, ChatError::EmptyConversation), "{e}");
                    }
                }
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        Some(cases.len())
    }

    #[test]
    fn qwen2_matches_transformers() {
        assert!(check_tokenizer("qwen2").is_none_or(|n| n >= 30));
    }

    #[test]
    fn qwen3_matches_transformers() {
        assert!(check_tokenizer("qwen3").is_none_or(|n| n >= 30));
    }

    #[test]
    fn goldens_cover_the_issue_cases() {
        let g = goldens();
        assert_eq!(g["versions"]["transformers"], "5.23.0");
        for tok in ["qwen2", "qwen3"] {
            let cases = g["tokenizers"][tok]["cases"].as_array().unwrap();
            let names: Vec<&str> = cases.iter().map(|c| c["name"].as_str().unwrap()).collect();
            for want in [
                "single_user",
                "system_user",
                "multi_turn",
                "unicode",
                "whitespace",
                "empty_system",
                "think_history",
                "think_last_assistant",
                "unknown_role",
            ] {
                assert!(names.contains(&want), "{tok}: no {want} case");
            }
            for agp in [true, false] {
                assert!(cases
                    .iter()
                    .any(|c| c["add_generation_prompt"].as_bool() == Some(agp)));
            }
        }
        // Qwen3 drops the reasoning of assistant turns before the last user query.
        let q3 = &g["tokenizers"]["qwen3"]["cases"];
        let hist = q3
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "think_history")
            .unwrap();
        assert!(!hist["expected"].as_str().unwrap().contains("forty-two"));
    }

    /// The synthetic Jinja-feature templates (tojson, string methods, slicing, printing, ...),
    /// rendered by transformers' own jinja2 environment.
    #[test]
    fn template_features_match_transformers() {
        let g = goldens();
        let cases = g["templates"].as_array().unwrap();
        assert!(!cases.is_empty());
        let mut failures = Vec::new();
        for case in cases {
            let name = case["name"].as_str().unwrap();
            let agp = case["add_generation_prompt"].as_bool().unwrap();
            let tok = |k: &str| case[k].as_str().map(String::from);
            let tmpl = ChatTemplate::from_str(
                case["template"].as_str().unwrap(),
                tok("bos_token"),
                tok("eos_token"),
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
            let want = case["expected"].as_str().unwrap();
            match tmpl.render(&messages_of(case), agp) {
                Ok(got) if got == want => {}
                Ok(got) => failures.push(format!(
                    "{name} ({agp}): {}\n  got:  {got:?}\n  want: {want:?}",
                    diff_hint(&got, want)
                )),
                Err(e) => failures.push(format!("{name} ({agp}): {e}")),
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    /// What `rabbit synth` writes as tokenizer_config.json renders, identically to Qwen2's template.
    #[test]
    fn synthetic_tokenizer_config_renders() {
        let tok = SynthTokenizer {
            vocab: vec!["a".into(); 16],
            merges: vec![],
        };
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("tokenizer_config.json"),
            serde_json::to_string_pretty(&tok.tokenizer_config_json(4096)).unwrap(),
        )
        .unwrap();
        let tmpl = ChatTemplate::from_tokenizer_config(dir.path())
            .unwrap()
            .expect("synthetic config has a chat_template");
        assert_eq!(tmpl.source(), CHAT_TEMPLATE);
        assert!(tmpl
            .special_tokens()
            .contains(&("eos_token".to_string(), "<|im_end|>".to_string())));

        let Some(qwen2) = tokenizer_dir("qwen2") else {
            return;
        };
        let real = ChatTemplate::from_tokenizer_config(&qwen2)
            .unwrap()
            .unwrap();
        assert_eq!(tmpl.source(), real.source(), "synth template is Qwen2's");

        let g = goldens();
        for case in g["tokenizers"]["qwen2"]["cases"].as_array().unwrap() {
            let Some(want) = case["expected"].as_str() else {
                continue;
            };
            let agp = case["add_generation_prompt"].as_bool().unwrap();
            assert_eq!(
                tmpl.render(&messages_of(case), agp).unwrap(),
                want,
                "{}",
                case["name"]
            );
        }
        let got = tmpl.render(&[Message::new("user", "Hi")], true).unwrap();
        assert_eq!(
        got,
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    }

    #[test]
    fn raise_exception_is_a_clear_error() {
        let t = ChatTemplate::from_str(
        "{% for message in messages %}{% if message.role == 'tool' %}{{ raise_exception('x') }}{% endif %}{{ message.content }}{% endfor %}",
        None,
        None,
    )
    .unwrap();
        let msgs = [
            Message::new("user", "a"),
            Message::new("assistant", "b"),
            Message::new("tool", "c"),
        ];
        let err = t.render(&msgs, false).unwrap_err();
        match &err {
            ChatError::Raised {
                message,
                message_index,
                ..
            } => {
                assert_eq!(message, "x");
                assert_eq!(*message_index, Some(2));
            }
            other => panic!("expected Raised, got {other:?}"),
        }
        let text = err.to_string();
        assert!(
            text.contains("message 2") && text.ends_with(": x"),
            "{text}"
        );

        // Outside any message loop: no index.
        let t = ChatTemplate::from_str(
            "{{ raise_exception('no system prompt allowed') }}",
            None,
            None,
        )
        .unwrap();
        match t.render(&msgs, false).unwrap_err() {
            ChatError::Raised {
                message,
                message_index: None,
                ..
            } => assert_eq!(message, "no system prompt allowed"),
            other => panic!("expected Raised, got {other:?}"),
        }

        // The Llama-2/Mistral-style alternation check.
        let g = goldens();
        let llama = g["templates"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "bos_eos_llama_style")
            .unwrap();
        let t = ChatTemplate::from_str(
            llama["template"].as_str().unwrap(),
            Some("<s>".into()),
            Some("</s>".into()),
        )
        .unwrap();
        let bad = [Message::new("user", "a"), Message::new("user", "b")];
        match t.render(&bad, false).unwrap_err() {
            ChatError::Raised {
                message,
                message_index,
                ..
            } => {
                assert!(message.contains("must alternate"), "{message}");
                assert_eq!(message_index, Some(1));
            }
            other => panic!("expected Raised, got {other:?}"),
        }
    }

    #[test]
    fn template_errors() {
        // Syntax errors surface at construction, naming the problem.
        let err = ChatTemplate::from_str("{% for m in messages %}{{ m.content }}", None, None)
            .unwrap_err();
        assert!(matches!(err, ChatError::Syntax { .. }), "{err:?}");
        assert!(err.to_string().contains("invalid template"), "{err}");

        // Runtime errors (attribute of an undefined value) are Render errors.
        let t = ChatTemplate::from_str("{{ nothing.here }}", None, None).unwrap();
        let err = t.render(&[Message::new("user", "a")], false).unwrap_err();
        assert!(matches!(err, ChatError::Render { .. }), "{err:?}");

        // Empty conversations are refused, as transformers does.
        let t = ChatTemplate::from_str("x", None, None).unwrap();
        assert!(matches!(
            t.render(&[], true).unwrap_err(),
            ChatError::EmptyConversation
        ));
    }

    #[test]
    fn missing_chat_template_is_none() {
        let dir = tempfile::tempdir().unwrap();
        // No tokenizer_config.json at all.
        assert!(ChatTemplate::from_tokenizer_config(dir.path())
            .unwrap()
            .is_none());
        // A config without the field, and one with null.
        fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"eos_token": "</s>", "model_max_length": 8}"#,
        )
        .unwrap();
        assert!(ChatTemplate::from_tokenizer_config(dir.path())
            .unwrap()
            .is_none());
        fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"chat_template": null}"#,
        )
        .unwrap();
        assert!(ChatTemplate::from_tokenizer_config(dir.path())
            .unwrap()
            .is_none());
    }

    #[test]
    fn tokenizer_config_variants() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("tokenizer_config.json");
        // AddedToken objects for special tokens; named templates with a default.
        fs::write(
        &cfg,
        r#"{
          "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false},
          "eos_token": "</s>",
          "unk_token": null,
          "pad_token": {"content": "<pad>"},
          "chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}|{{ pad_token }}|{{ unk_token }}"}
          ]
        }"#,
    )
    .unwrap();
        let t = ChatTemplate::from_tokenizer_config(dir.path())
            .unwrap()
            .unwrap();
        assert_eq!(
            t.render(&[Message::new("user", "hi")], false).unwrap(),
            "<s>hi</s>|<pad>|"
        );

        // chat_template.jinja takes priority over the config's field.
        fs::write(
            dir.path().join("chat_template.jinja"),
            "J:{{ messages[0].content }}\n",
        )
        .unwrap();
        let t = ChatTemplate::from_tokenizer_config(dir.path())
            .unwrap()
            .unwrap();
        assert_eq!(
            t.render(&[Message::new("user", "hi")], false).unwrap(),
            "J:hi"
        );
        fs::remove_file(dir.path().join("chat_template.jinja")).unwrap();

        // Bad shapes name the file and the field.
        fs::write(&cfg, r#"{"chat_template": 3}"#).unwrap();
        let err = ChatTemplate::from_tokenizer_config(dir.path()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("tokenizer_config.json") && text.contains("chat_template"),
            "{text}"
        );
        fs::write(&cfg, r#"{"chat_template": "x", "eos_token": 5}"#).unwrap();
        let text = ChatTemplate::from_tokenizer_config(dir.path())
            .unwrap_err()
            .to_string();
        assert!(text.contains("eos_token"), "{text}");
        fs::write(&cfg, "{not json").unwrap();
        let err = ChatTemplate::from_tokenizer_config(dir.path()).unwrap_err();
        assert!(matches!(err, ChatError::Json { .. }), "{err:?}");
        assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
        // A syntax error in a config's template names the config.
        fs::write(&cfg, r#"{"chat_template": "{% if %}"}"#).unwrap();
        let err = ChatTemplate::from_tokenizer_config(dir.path()).unwrap_err();
        assert!(matches!(err, ChatError::Syntax { .. }), "{err:?}");
        assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
    }

    #[test]
    fn load_messages_parses_and_reports() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("chat.json");
        fs::write(
        &p,
        r#"[{"role": "system", "content": "s"}, {"role": "user", "content": "héllo 🐇", "name": "ignored"}]"#,
    )
    .unwrap();
        assert_eq!(
            load_messages(&p).unwrap(),
            vec![
                Message::new("system", "s"),
                Message::new("user", "héllo 🐇")
            ]
        );

        let bad = |text: &str| -> String {
            fs::write(&p, text).unwrap();
            let err = load_messages(&p).unwrap_err();
            let s = err.to_string();
            assert!(s.contains("chat.json"), "error does not name the file: {s}");
            s
        };
        assert!(bad("[{\"role\": \"user\", \"content\": \"a\"},").contains("invalid JSON"));
        assert!(bad(r#"{"role": "user", "content": "a"}"#).contains("array"));
        let s = bad(r#"[{"role": "user", "content": "a"}, {"role": "user"}]"#);
        assert!(s.contains("message 1") && s.contains("content"), "{s}");
        let s = bad(r#"[{"role": "user", "content": "a"}, {"role": "user", "content": ["x"]}]"#);
        assert!(
            s.contains("message 1") && s.contains("must be a string"),
            "{s}"
        );
        let s = bad(r#"["hello"]"#);
        assert!(s.contains("message 0"), "{s}");
        let s = bad(r#"[{"role": 1, "content": "a"}]"#);
        assert!(s.contains("message 0") && s.contains("role"), "{s}");

        let missing = dir.path().join("nope.json");
        let s = load_messages(&missing).unwrap_err().to_string();
        assert!(s.contains("nope.json"), "{s}");

        // Plain serde works too.
        let v: Vec<Message> = serde_json::from_str(r#"[{"role":"user","content":"x"}]"#).unwrap();
        assert_eq!(v, [Message::new("user", "x")]);
    }

    #[test]
    fn unknown_role_renders_as_the_template_decides() {
        let msgs = [
            Message::new("user", "u"),
            Message::new("narrator", "n"),
            Message::new("assistant", "a"),
        ];
        // Qwen2 (ChatML) prints any role; Qwen3 skips roles it does not know.
        let (Some(qwen2), Some(qwen3)) = (tokenizer_dir("qwen2"), tokenizer_dir("qwen3")) else {
            return;
        };
        let q2 = ChatTemplate::from_tokenizer_config(&qwen2)
            .unwrap()
            .unwrap();
        assert!(q2
            .render(&msgs, false)
            .unwrap()
            .contains("<|im_start|>narrator\nn<|im_end|>\n"));
        let q3 = ChatTemplate::from_tokenizer_config(&qwen3)
            .unwrap()
            .unwrap();
        let out = q3.render(&msgs, false).unwrap();
        assert!(!out.contains("narrator"), "{out}");
    }

    #[test]
    fn kwargs_reach_the_template() {
        let t = ChatTemplate::from_str(
        "{% if enable_thinking is defined and enable_thinking is false %}NO{% else %}YES{% endif %}{{ eos_token }}",
        None,
        Some("</s>".into()),
    )
    .unwrap();
        let m = [Message::new("user", "x")];
        assert_eq!(t.render(&m, false).unwrap(), "YES</s>");
        let mut kw = serde_json::Map::new();
        kw.insert("enable_thinking".into(), Value::Bool(false));
        kw.insert("eos_token".into(), Value::from("<eos>"));
        assert_eq!(t.render_with_kwargs(&m, false, &kw).unwrap(), "NO<eos>");
    }

    #[test]
    fn strftime_now_renders() {
        let t = ChatTemplate::from_str("{{ strftime_now('%Y-%m-%d') }}", None, None).unwrap();
        let out = t.render(&[Message::new("user", "x")], false).unwrap();
        assert_eq!(out.len(), 10, "{out}");
        assert!(out.starts_with("20"), "{out}");
    }

    #[test]
    fn chat_template_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<ChatTemplate>();
        check::<ChatError>();
    }
}
