//! The real chat templates of the Gemma 2/3, Phi-3/3.5/4/4-mini and GLM-4 families (issue 12),
//! loaded the way a model directory ships them and rendered byte for byte as transformers renders
//! them, errors included. The templates are committed under `tests/fixtures/chat/templates/`
//! (origins in `SOURCES.md` there); the goldens in `tests/fixtures/chat/families.json` are written
//! by `tests/fixtures/make_chat_family_goldens.py` with transformers' own renderer.

mod common;

// In `mod chat_families` so `cargo test -p rabbit-models chat` selects these tests too.
mod chat_families {
    use super::common::diff_hint;
    use std::fs;
    use std::path::{Path, PathBuf};

    use rabbit_models::chat::{ChatError, ChatTemplate, Message};
    use serde_json::{json, Value};

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/chat");

    fn goldens() -> Value {
        let path = Path::new(FIXTURES).join("families.json");
        let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).expect("families.json parses")
    }

    fn templates_dir() -> PathBuf {
        Path::new(FIXTURES).join("templates")
    }

    fn str_of(v: &Value) -> Option<String> {
        v.as_str().map(String::from)
    }

    /// A model directory holding only a `tokenizer_config.json` with this template and tokens,
    /// as the families' configs carry them (`chat_template` a string, tokens strings).
    fn config_dir(entry: &Value) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let mut config = json!({ "chat_template": entry["template"] });
        for key in ["bos_token", "eos_token"] {
            if entry[key].is_string() {
                config[key] = entry[key].clone();
            }
        }
        fs::write(
            dir.path().join("tokenizer_config.json"),
            serde_json::to_string_pretty(&config).unwrap(),
        )
        .unwrap();
        dir
    }

    /// Renders every case of one golden entry with `tmpl`; returns the failures.
    fn check_cases(label: &str, tmpl: &ChatTemplate, entry: &Value) -> Vec<String> {
        let mut failures = Vec::new();
        for case in entry["cases"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let agp = case["add_generation_prompt"].as_bool().unwrap();
            let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
            let at = format!("{label}/{name} (add_generation_prompt={agp})");
            match (case.get("expected"), tmpl.render(&messages, agp)) {
                (Some(want), Ok(got)) => {
                    let want = want.as_str().unwrap();
                    if got != want {
                        failures.push(format!(
                            "{at}: {}\n  got:  {got:?}\n  want: {want:?}",
                            diff_hint(&got, want)
                        ));
                    }
                }
                (Some(_), Err(e)) => {
                    failures.push(format!("{at}: transformers renders, we fail: {e}"))
                }
                (None, Ok(got)) => failures.push(format!(
                    "{at}: transformers raises {} ({}), we render {got:?}",
                    case["error"], case["error_message"]
                )),
                (None, Err(e)) => {
                    let want_msg = case["error_message"].as_str().unwrap();
                    // `TemplateError` is the template's own raise_exception(...): same message.
                    // Anything else (jinja2's UndefinedError, ...) is a failed render.
                    let ok = match (case["error"].as_str().unwrap(), &e) {
                        ("TemplateError", ChatError::Raised { message, .. }) => message == want_msg,
                        ("TemplateError", _) => false,
                        (_, ChatError::Render { .. }) => true,
                        _ => false,
                    };
                    if !ok {
                        failures.push(format!(
                            "{at}: transformers raises {} ({want_msg}), we fail differently: {e:?}",
                            case["error"]
                        ));
                    }
                }
            }
        }
        failures
    }

    /// Every committed template, loaded from a `tokenizer_config.json`, renders every golden
    /// conversation exactly as transformers does, and fails where transformers raises.
    #[test]
    fn family_templates_match_transformers() {
        let g = goldens();
        let entries = g["templates"].as_array().unwrap();
        let mut failures = Vec::new();
        for entry in entries {
            let file = entry["file"].as_str().unwrap();
            let dir = config_dir(entry);
            let tmpl = ChatTemplate::from_tokenizer_config(dir.path())
                .unwrap_or_else(|e| panic!("{file}: {e}"))
                .unwrap_or_else(|| panic!("{file}: the config has a chat_template"));
            assert_eq!(tmpl.source(), entry["template"].as_str().unwrap(), "{file}");
            // The template sees the tokens the config gives, and only those.
            let mut want_tokens = Vec::new();
            for key in ["bos_token", "eos_token"] {
                if let Some(t) = str_of(&entry[key]) {
                    want_tokens.push((key.to_string(), t));
                }
            }
            assert_eq!(tmpl.special_tokens(), &want_tokens[..], "{file}");
            failures.extend(check_cases(file, &tmpl, entry));
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    /// The same templates shipped as `chat_template.jinja` (newer model repos), read with their
    /// exact bytes, render the same way.
    #[test]
    fn family_templates_load_from_chat_template_jinja() {
        let g = goldens();
        let mut failures = Vec::new();
        for entry in g["templates"].as_array().unwrap() {
            let file = entry["file"].as_str().unwrap();
            let dir = tempfile::tempdir().unwrap();
            fs::copy(
                templates_dir().join(file),
                dir.path().join("chat_template.jinja"),
            )
            .unwrap();
            let mut config = json!({});
            for key in ["bos_token", "eos_token"] {
                if entry[key].is_string() {
                    config[key] = entry[key].clone();
                }
            }
            fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
            let tmpl = ChatTemplate::from_tokenizer_config(dir.path())
                .unwrap_or_else(|e| panic!("{file}: {e}"))
                .unwrap_or_else(|| panic!("{file}: chat_template.jinja is there"));
            failures.extend(check_cases(file, &tmpl, entry));
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    fn family_template(file: &str, bos: Option<&str>) -> ChatTemplate {
        let text = fs::read_to_string(templates_dir().join(file)).unwrap();
        ChatTemplate::from_str(&text, bos.map(String::from), None).unwrap()
    }

    fn raised_at(tmpl: &ChatTemplate, messages: &[Message]) -> (String, Option<usize>) {
        match tmpl.render(messages, true).unwrap_err() {
            ChatError::Raised {
                message,
                message_index,
                ..
            } => (message, message_index),
            other => panic!("expected Raised, got {other:?}"),
        }
    }

    /// A template's own refusal names the message it refused. Gemma 3 loops over
    /// `messages[1:]` when there is a system message, so `loop.index0` is one less than the
    /// message's place in the conversation: a repeated message (the user sending "hi" twice)
    /// used to be reported one too early, at the earlier copy.
    #[test]
    fn refusals_name_the_refused_message() {
        let alternate = "Conversation roles must alternate user/assistant/user/assistant/...";
        let g3 = family_template("google-gemma-3-it.jinja", Some("<bos>"));
        let hi = Message::new("user", "hi");
        let cases: [(&[Message], usize); 3] = [
            (&[Message::new("system", "s"), hi.clone(), hi.clone()], 2),
            (
                &[
                    Message::new("system", "s"),
                    hi.clone(),
                    Message::new("user", "x"),
                ],
                2,
            ),
            (&[hi.clone(), hi.clone()], 1),
        ];
        for (messages, want) in cases {
            assert_eq!(
                raised_at(&g3, messages),
                (alternate.to_string(), Some(want)),
                "{messages:?}"
            );
        }
        // Gemma 2 refuses a system message before its loop: no message is being rendered.
        let g2 = family_template("google-gemma-2-2b-it.jinja", Some("<bos>"));
        let (msg, at) = raised_at(&g2, &[Message::new("system", "s"), hi.clone()]);
        assert_eq!((msg.as_str(), at), ("System role not supported", None));
        assert_eq!(
            raised_at(&g2, &[hi.clone(), hi.clone(), hi.clone()]),
            (alternate.to_string(), Some(1))
        );
    }

    /// The goldens were made from the committed template files, cover every family of issue 12,
    /// each family's special cases, and both outcomes (rendered and refused).
    #[test]
    fn family_goldens_are_current_and_cover_the_families() {
        let g = goldens();
        assert_eq!(g["versions"]["transformers"], "5.23.0");
        let entries = g["templates"].as_array().unwrap();

        // Each golden's template is the committed file, byte for byte, and every file is used.
        let mut on_disk: Vec<String> = fs::read_dir(templates_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".jinja"))
            .collect();
        on_disk.sort();
        let mut in_goldens: Vec<String> = entries
            .iter()
            .map(|e| e["file"].as_str().unwrap().to_string())
            .collect();
        in_goldens.sort();
        assert_eq!(on_disk, in_goldens, "templates/ and families.json disagree");
        for e in entries {
            let file = e["file"].as_str().unwrap();
            let text = fs::read_to_string(templates_dir().join(file)).unwrap();
            assert_eq!(
                text,
                e["template"].as_str().unwrap(),
                "{file} changed since families.json was written: rerun make_chat_family_goldens.py"
            );
        }

        // SOURCES.md says where each file came from.
        let sources = fs::read_to_string(templates_dir().join("SOURCES.md")).unwrap();
        for f in &on_disk {
            assert!(sources.contains(f.as_str()), "SOURCES.md does not list {f}");
        }

        let models: Vec<&str> = entries
            .iter()
            .map(|e| e["model"].as_str().unwrap())
            .collect();
        for want in [
            "google/gemma-2-2b-it",
            "google/gemma-3-1b-it",
            "microsoft/Phi-3-mini-4k-instruct",
            "microsoft/Phi-3.5-mini-instruct",
            "microsoft/phi-4",
            "microsoft/Phi-4-mini-instruct",
            "THUDM/glm-4-9b-chat",
        ] {
            assert!(models.contains(&want), "no template of {want}");
        }
        let arches: Vec<&str> = entries
            .iter()
            .map(|e| e["architecture"].as_str().unwrap())
            .collect();
        for want in [
            "Gemma2ForCausalLM",
            "Gemma3ForCausalLM",
            "Phi3ForCausalLM",
            "GlmForCausalLM",
            "Glm4ForCausalLM",
        ] {
            assert!(arches.contains(&want), "no template of a {want} model");
        }

        let case = |file: &str, name: &str, agp: bool| -> Value {
            let e = entries.iter().find(|e| e["file"] == file).unwrap();
            e["cases"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == name && c["add_generation_prompt"] == agp)
                .unwrap_or_else(|| panic!("{file}: no case {name} ({agp})"))
                .clone()
        };
        // Gemma 2 refuses a system message; Gemma 3 folds it into the first user turn.
        let g2 = case("google-gemma-2-2b-it.jinja", "system_user", true);
        assert_eq!(g2["error"], "TemplateError");
        assert_eq!(g2["error_message"], "System role not supported");
        let g3 = case("google-gemma-3-it.jinja", "system_user", true);
        let text = g3["expected"].as_str().unwrap();
        assert!(
            text.starts_with("<bos><start_of_turn>user\nYou are a pirate.\n\nWhere is"),
            "{text}"
        );
        // The March 2025 Gemma 3 template fails on a plain-string system message (jinja2's
        // UndefinedError, not the template's own raise).
        assert_eq!(
            case("google-gemma-3-1b-it.2025-03.jinja", "system_user", false)["error"],
            "UndefinedError"
        );
        // Alternation is enforced by both Gemmas.
        for f in ["google-gemma-2-2b-it.jinja", "google-gemma-3-it.jinja"] {
            assert_eq!(
                case(f, "roles_not_alternating", true)["error"],
                "TemplateError"
            );
        }
        // Phi-3.5 drops an empty system message, Phi-3 mini prints it.
        let p35 = case(
            "microsoft-Phi-3.5-mini-instruct.jinja",
            "empty_system",
            false,
        );
        assert!(!p35["expected"].as_str().unwrap().contains("<|system|>"));
        let p3 = case(
            "microsoft-Phi-3-mini-4k-instruct.jinja",
            "empty_system",
            false,
        );
        assert!(p3["expected"]
            .as_str()
            .unwrap()
            .starts_with("<|system|>\n<|end|>"));
        // Add_generation_prompt=false ends Phi-3.x/4-mini prompts with the config's eos_token.
        for f in [
            "microsoft-Phi-3-mini-4k-instruct.jinja",
            "microsoft-Phi-3.5-mini-instruct.jinja",
            "microsoft-Phi-4-mini-instruct.jinja",
        ] {
            let c = case(f, "multi_turn", false);
            assert!(
                c["expected"].as_str().unwrap().ends_with("<|endoftext|>"),
                "{f}"
            );
        }
        // GLM-4-0414 keeps only the text after `</think>` of each turn.
        let z1 = case(
            "THUDM-GLM-Z1-Rumination-32B-0414.jinja",
            "reasoning_in_history",
            true,
        );
        let text = z1["expected"].as_str().unwrap();
        assert!(
            !text.contains("Divisors") && text.ends_with("<|assistant|>"),
            "{text}"
        );
        let glm = case("THUDM-glm-4-9b-chat.jinja", "glm_observation", true);
        assert!(glm["expected"]
            .as_str()
            .unwrap()
            .contains("<|observation|>\n{\"temperature\": 25"));
    }
}
