//! Bounds on rendering a chat template (issue 11): a template that renders more than the byte
//! limit, or loops without end, fails fast with an error naming the template and the limit,
//! while real conversations of any length render in full.

// In `mod chat_limits` so `cargo test -p rabbit-models chat` selects these tests too.
mod chat_limits {
    use std::fs;

    use rabbit_models::chat::{ChatError, ChatTemplate, Message, DEFAULT_MAX_RENDERED_BYTES};
    use rabbit_models::synth::tokenizer::CHAT_TEMPLATE;

    /// The case: a template rendering 100 MB used to hand all of it on (and the
    /// tokenizer then took gigabytes); now the render stops at the default limit.
    #[test]
    fn rendering_more_than_the_limit_is_refused() {
        let hostile = "{% for i in range(100) %}{{ 'x' * 1000000 }}{% endfor %}";
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("tokenizer_config.json"),
            serde_json::to_string(&serde_json::json!({ "chat_template": hostile })).unwrap(),
        )
        .unwrap();
        let t = ChatTemplate::from_tokenizer_config(dir.path())
            .unwrap()
            .unwrap();
        assert_eq!(t.max_rendered_bytes(), DEFAULT_MAX_RENDERED_BYTES);
        let m = [Message::new("user", "hi")];
        let err = t.render(&m, true).unwrap_err();
        match &err {
            ChatError::RenderTooLarge { limit, .. } => {
                assert_eq!(*limit, DEFAULT_MAX_RENDERED_BYTES)
            }
            other => panic!("expected RenderTooLarge, got {other:?}"),
        }
        // The message names the template's file and the limit.
        let text = err.to_string();
        let config = dir.path().join("tokenizer_config.json");
        assert!(text.contains(&config.display().to_string()), "{text}");
        assert!(
            text.contains(&format!("more than {DEFAULT_MAX_RENDERED_BYTES} bytes")),
            "{text}"
        );

        // A caller-given limit (what the CLI derives from the context length) applies instead,
        // also to a template whose output would never end.
        let endless = ChatTemplate::from_str(
            "{% for i in range(100000) %}{% for j in range(100000) %}{{ 'x' * 1000 }}{% endfor %}{% endfor %}",
            None,
            None,
        )
        .unwrap()
        .with_max_rendered_bytes(1 << 20);
        match endless.render(&m, true).unwrap_err() {
            ChatError::RenderTooLarge { limit, .. } => assert_eq!(limit, 1 << 20),
            other => panic!("expected RenderTooLarge, got {other:?}"),
        }
    }

    /// The limit is exact: output of exactly the limit renders, one byte more does not.
    #[test]
    fn rendered_length_limit_is_exact() {
        let m = [Message::new("user", "Hi")];
        let t = ChatTemplate::from_str(CHAT_TEMPLATE, None, None).unwrap();
        let full = t.render(&m, true).unwrap();
        let n = full.len();
        let t = t.with_max_rendered_bytes(n);
        assert_eq!(t.render(&m, true).unwrap(), full);
        let t = t.with_max_rendered_bytes(n - 1);
        assert!(
            matches!(
                t.render(&m, true),
                Err(ChatError::RenderTooLarge { limit, .. }) if limit == n - 1
            ),
            "a render one byte over the limit must be refused"
        );
        // Multi-byte text is cut on whole writes, never inside a character.
        let t = ChatTemplate::from_str("{{ messages[0].content }}", None, None)
            .unwrap()
            .with_max_rendered_bytes(5);
        let err = t.render(&[Message::new("user", "ééé")], false).unwrap_err();
        assert!(
            matches!(err, ChatError::RenderTooLarge { limit: 5, .. }),
            "{err:?}"
        );
        assert_eq!(
            t.render(&[Message::new("user", "éé")], false).unwrap(),
            "éé"
        );
    }

    /// A loop that prints nothing but never ends in practice (10^10 iterations) stops on the
    /// instruction allowance instead of hanging.
    #[test]
    fn endless_loop_without_output_is_stopped() {
        let t = ChatTemplate::from_str(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% if i == -1 %}x{% endif %}{% endfor %}{% endfor %}",
            None,
            None,
        )
        .unwrap();
        let m = [Message::new("user", "hi")];
        let err = t.render(&m, true).unwrap_err();
        match &err {
            ChatError::RenderTooLong {
                origin, messages, ..
            } => {
                assert_eq!(origin, "chat template");
                assert_eq!(*messages, 1);
            }
            other => panic!("expected RenderTooLong, got {other:?}"),
        }
        assert!(err.to_string().contains("template instructions"), "{err}");
    }

    /// The instruction allowance grows with the conversation: a long one renders in full.
    #[test]
    fn long_conversations_are_not_cut_short() {
        let t = ChatTemplate::from_str(CHAT_TEMPLATE, None, None).unwrap();
        let msgs: Vec<Message> = (0..20_000)
            .map(|i| {
                let role = if i % 2 == 0 { "user" } else { "assistant" };
                Message::new(role, format!("message {i}"))
            })
            .collect();
        let out = t.render(&msgs, true).unwrap();
        assert_eq!(out.matches("<|im_start|>").count(), 20_000 + 2);
    }
}
