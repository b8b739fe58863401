//! End-to-end tests of chat: `rabbit template` against transformers' rendering, `generate
//! --chat`, and the `rabbit chat` REPL (its commands and Ctrl-C).

mod common;

use std::path::{Path, PathBuf};

use common::{assert_clean_failure, assert_ok, last_json_line, rabbit, run, stderr, tiny_model};
use serde_json::Value;

/// A real tokenizer from the shared data directory beside the checkout (skips when absent).
fn shared_tokenizer(name: &str) -> Option<PathBuf> {
    rabbit_models::testdata::shared_tokenizer(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/tokenizers"),
        name,
    )
}

/// `rabbit template` prints exactly what transformers' apply_chat_template gives, nothing else.
#[test]
fn template_prints_exactly_the_transformers_rendering() {
    let goldens: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../rabbit-models/tests/fixtures/chat/goldens.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let (Some(qwen2), Some(qwen3)) = (shared_tokenizer("qwen2"), shared_tokenizer("qwen3")) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for (tok, dir) in [("qwen2", &qwen2), ("qwen3", &qwen3)] {
        for case in goldens["tokenizers"][tok]["cases"]
            .as_array()
            .unwrap()
            .iter()
            .take(6)
        {
            let file = tmp.path().join("messages.json");
            std::fs::write(&file, case["messages"].to_string()).unwrap();
            let mut cmd = rabbit();
            cmd.args(["template", "--model"])
                .arg(dir)
                .arg("--messages")
                .arg(&file);
            if case["add_generation_prompt"] == false {
                cmd.arg("--no-generation-prompt");
            }
            let o = run(&mut cmd);
            assert_ok(&o);
            assert_eq!(
                String::from_utf8(o.stdout).unwrap(),
                case["expected"].as_str().unwrap(),
                "{tok} {}",
                case["name"]
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 12);
    let bad = tmp.path().join("bad.json");
    std::fs::write(&bad, r#"[{"role": "user"}]"#).unwrap();
    let o = run(rabbit()
        .args(["template", "--model"])
        .arg(&qwen2)
        .arg("--messages")
        .arg(&bad));
    assert_clean_failure(&o, &["bad.json"]);
}

#[test]
fn generate_chat_applies_the_template() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    tiny_model(&model, 5);
    let o = run(rabbit()
        .args([
            "generate",
            "--device",
            "cpu",
            "--json",
            "--max-new-tokens",
            "4",
            "--chat",
            "--system",
            "Be brief.",
        ])
        .args(["--prompt", "Hello <|im_end|> there"])
        .arg("--model")
        .arg(&model));
    assert_ok(&o);
    let v = last_json_line(&o);
    let ids: Vec<u64> = v["sequences"][0]["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(model.join("generation_config.json")).unwrap(),
    )
    .unwrap();
    let im_end = cfg["eos_token_id"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .max()
        .unwrap();
    let im_start = im_end - 1;
    assert_eq!(ids[0], im_start, "starts with <|im_start|>: {ids:?}");
    // system turn, user turn: exactly two <|im_end|> from the markup; the one the user typed stays text.
    assert_eq!(ids.iter().filter(|&&t| t == im_end).count(), 2, "{ids:?}");
    assert_eq!(
        ids.iter().filter(|&&t| t == im_start).count(),
        3,
        "system, user, assistant opener: {ids:?}"
    );
}

/// `rabbit chat` on `model`, greedy, with every stream piped.
fn spawn_chat(model: &Path, max_new_tokens: &str) -> std::process::Child {
    use std::process::Stdio;
    rabbit()
        .args([
            "chat",
            "--device",
            "cpu",
            "--temperature",
            "0",
            "--max-new-tokens",
        ])
        .arg(max_new_tokens)
        .arg("--model")
        .arg(model)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn chat_repl_commands_and_ctrl_c() {
    use std::io::Write as _;
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    tiny_model(&model, 5);
    let mut child = spawn_chat(&model, "100000");
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "Tell me a long story").unwrap();
    stdin.flush().unwrap();
    // Wait until the answer is streaming (its first bytes on stdout), then Ctrl-C it: the
    // answer (up to the 2048-token context) takes seconds, so the signal lands mid-answer.
    let mut out = child.stdout.take().unwrap();
    let (first_tx, first_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::io::Read as _;
        let mut all = Vec::new();
        let mut buf = [0u8; 256];
        let mut told = false;
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
            if !told {
                let _ = first_tx.send(());
                told = true;
            }
        }
        all
    });
    first_rx
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("the answer starts streaming");
    // SAFETY: plain kill(2) on our child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    writeln!(stdin, "/system You are terse.").unwrap();
    writeln!(stdin, "/bogus").unwrap();
    writeln!(stdin, "/reset").unwrap();
    writeln!(stdin, "/exit").unwrap();
    drop(stdin);
    let o = child.wait_with_output().unwrap();
    let answer = reader.join().unwrap();
    let err = stderr(&o);
    assert!(
        o.status.success(),
        "chat exits cleanly after Ctrl-C and /exit: {err}"
    );
    assert!(
        err.contains("stopped"),
        "Ctrl-C stopped the answer, not the program: {err}"
    );
    assert!(err.contains("tok/s"), "per-answer speed shown: {err}");
    assert!(err.contains("system prompt set"), "{err}");
    assert!(err.contains("unknown command `/bogus`"), "{err}");
    assert!(err.contains("conversation reset"), "{err}");
    assert!(
        !String::from_utf8_lossy(&answer).trim().is_empty(),
        "the answer was printed"
    );
}

/// REPL input edge cases: a command that only starts like `/system` is not one, `//` sends a
/// message that begins with `/`, and bytes that are not UTF-8 do not end the session.
#[test]
fn chat_repl_reads_odd_input_without_ending_the_session() {
    use std::io::Write as _;
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    tiny_model(&model, 5);
    let mut child = spawn_chat(&model, "2");
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "/systemd is an init system").unwrap();
    stdin.write_all(b"caf\xe9 latin-1\n").unwrap();
    writeln!(stdin, "//usr/bin is a directory").unwrap();
    writeln!(stdin, "/exit").unwrap();
    drop(stdin);
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("unknown command `/systemd is an init system`"),
        "{err}"
    );
    assert!(!err.contains("system prompt set"), "{err}");
    assert_eq!(
        err.matches("tok/s").count(),
        2,
        "both messages were answered: {err}"
    );
}
