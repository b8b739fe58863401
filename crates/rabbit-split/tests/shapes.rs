//! A checkpoint tensor whose shape is not what config.json implies is refused before anything is
//! written — and `--delete-original` never removes the weights of a split that could not load.

mod common;

use common::*;
use rabbit_split::{SplitError, SplitOptions};

#[test]
fn a_tensor_of_the_wrong_shape_is_refused_before_writing() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = Spec::tiny();
    let ckpt = tmp.path().join("c");
    write_checkpoint(&ckpt, &spec);
    let before = dir_files(&ckpt);
    let mut layout = layout(&spec);
    for (name, _, shape) in spec.tensors() {
        layout.shapes.insert(name, shape);
    }
    // config.json says gate_proj is [inter, hidden]; the checkpoint holds it transposed.
    let gate = "model.layers.1.mlp.gate_proj.weight";
    layout
        .shapes
        .insert(gate.into(), vec![spec.hidden, spec.inter]);
    let out = tmp.path().join("out");
    let opts = SplitOptions {
        delete_original: true,
        ..opts_to(&out)
    };
    let err = run_split(&ckpt, &layout, &opts).unwrap_err();
    assert!(matches!(err, SplitError::TensorShape { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(gate) && msg.contains("model.safetensors"),
        "{msg}"
    );
    assert!(
        msg.contains("[24, 16]") && msg.contains("[16, 24]"),
        "{msg}"
    );
    assert!(
        file_names(&out).is_empty(),
        "nothing written: {:?}",
        file_names(&out)
    );
    assert_eq!(dir_files(&ckpt), before, "the originals are untouched");
    // With the right shapes the same split goes through.
    layout
        .shapes
        .insert(gate.into(), vec![spec.inter, spec.hidden]);
    run_split(&ckpt, &layout, &opts_to(&out)).unwrap();
}
