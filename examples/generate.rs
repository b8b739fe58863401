//! Library example: load a model (directory or hub repo id), stream-generate from a prompt.
//!
//! ```text
//! cargo run --release --example generate -- <MODEL_DIR_OR_REPO_ID> "Once upon a time"
//! ```

use rabbitllm::{AutoModel, Control, DeviceSpec, GenerateRequest, LoadOptions, SamplingParams};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let model_id = args
        .next()
        .ok_or("usage: generate <MODEL_DIR_OR_REPO_ID> [PROMPT]")?;
    let prompt = args
        .next()
        .unwrap_or_else(|| "Once upon a time".to_string());

    let mut model =
        AutoModel::from_pretrained(&model_id, LoadOptions::default().device(DeviceSpec::Auto))?;
    let ids = model.encode(&prompt)?;
    let req = GenerateRequest {
        sequences: vec![ids],
        max_new_tokens: 32,
        sampling: SamplingParams {
            temperature: 0.7,
            top_p: Some(0.9),
            seed: 42,
            ..Default::default()
        },
        eos_token_ids: model.engine.spec().eos_token_ids.clone(),
        keep_logits: false,
        ..Default::default()
    };
    let tokenizer = model.tokenizer().cloned();
    let mut generated = Vec::new();
    let out = model.generate(&req, &mut |ev| {
        generated.push(ev.token);
        if let Some(t) = &tokenizer {
            print!(
                "\r{prompt}{}",
                t.decode(&generated, true).unwrap_or_default()
            );
        }
        Control::Continue
    })?;
    println!();
    eprintln!(
        "{} tokens, {:.3} s/token (median), prefill {:.1} tok/s",
        out.timings.generated_tokens,
        out.timings.decode_s_per_token,
        out.timings.prefill_tokens_per_s
    );
    Ok(())
}
