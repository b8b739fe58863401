//! Row orders: a tensor whose rows the split stores regrouped (InternLM2's `wqkv`). The split
//! of a checkpoint with a row order equals, tensor for tensor, the plain split of a checkpoint
//! holding the regrouped tensor, copied or compressed; bad orders are refused by name.

mod common;

use std::fs;
use std::path::Path;

use common::*;
use rabbit_split::layout::RowOrder;
use rabbit_split::{Compression, Dtype, SplitError, SplitOptions};

const GATE: &str = "model.layers.1.mlp.gate_proj.weight";
const BIAS: &str = "model.layers.0.self_attn.q_proj.bias";

/// `data` (`rows` rows) cut into `order.len()` blocks, block `i` of the result = `order[i]`.
fn regroup(data: &[u8], order: &[usize]) -> Vec<u8> {
    let block = data.len() / order.len();
    order
        .iter()
        .flat_map(|&b| data[b * block..(b + 1) * block].iter().copied())
        .collect()
}

/// Every tensor of every unit file of a split: name → bytes.
fn split_tensors(dir: &Path) -> Vec<(String, String, Vec<u8>)> {
    let mut out = vec![];
    for (file, bytes) in dir_files(dir) {
        if !file.ends_with(".safetensors") {
            continue;
        }
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
        names.sort();
        for n in names {
            out.push((
                file.clone(),
                n.clone(),
                st.tensor(&n).unwrap().data().to_vec(),
            ));
        }
    }
    out
}

/// A copy of the checkpoint in `src` with `name`'s rows regrouped by `order`.
fn regrouped_checkpoint(src: &Path, dst: &Path, spec: &Spec, edits: &[(&str, &[usize])]) {
    fs::create_dir_all(dst).unwrap();
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = spec
        .tensors()
        .into_iter()
        .map(|(n, _, _)| {
            let (d, shape, data) = source_tensor(src, &n);
            let data = match edits.iter().find(|(e, _)| *e == n) {
                Some((_, order)) => regroup(&data, order),
                None => data,
            };
            (n, d, shape, data)
        })
        .collect();
    write_st(&dst.join("model.safetensors"), &tensors);
}

fn with_orders(spec: &Spec, orders: &[(&str, &[usize])]) -> rabbit_split::layout::Layout {
    let mut l = layout(spec);
    l.row_orders = orders
        .iter()
        .map(|(t, o)| RowOrder {
            tensor: t.to_string(),
            order: o.to_vec(),
        })
        .collect();
    l
}

#[test]
fn regrouped_rows_equal_a_checkpoint_stored_that_way() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = Spec::tiny();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    write_checkpoint(&a, &spec);
    // gate_proj has 24 rows: 4 blocks of 6 (block boundaries fall inside quantization blocks).
    let edits: [(&str, &[usize]); 2] = [(GATE, &[2, 0, 3, 1]), (BIAS, &[1, 0])];
    regrouped_checkpoint(&a, &b, &spec, &edits);
    for compression in [None, Some(Compression::Int8), Some(Compression::Nf4)] {
        let opts = |out: &Path| SplitOptions {
            compression,
            ..opts_to(out)
        };
        let (da, db) = (
            tmp.path().join(format!("sa-{compression:?}")),
            tmp.path().join(format!("sb-{compression:?}")),
        );
        run_split(&a, &with_orders(&spec, &edits), &opts(&da)).unwrap();
        run_split(&b, &layout(&spec), &opts(&db)).unwrap();
        let (ta, tb) = (split_tensors(&da), split_tensors(&db));
        assert_eq!(ta.len(), tb.len());
        for (x, y) in ta.iter().zip(&tb) {
            assert_eq!((&x.0, &x.1), (&y.0, &y.1));
            assert!(x.2 == y.2, "{compression:?}: {} differs", x.1);
        }
        // And the regrouping is not the identity.
        let plain = tmp.path().join(format!("sp-{compression:?}"));
        run_split(&a, &layout(&spec), &opts(&plain)).unwrap();
        assert_ne!(split_tensors(&plain), ta, "{compression:?}");
    }
}

#[test]
fn a_row_order_is_part_of_the_layout_digest() {
    let spec = Spec::tiny();
    let plain = layout(&spec);
    let ordered = with_orders(&spec, &[(GATE, &[1, 0])]);
    assert_ne!(plain.digest(), ordered.digest());
    // An empty list serialises as before: existing splits stay current.
    assert!(!serde_json::to_string(&plain)
        .unwrap()
        .contains("row_orders"));
}

#[test]
fn bad_row_orders_are_refused_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = Spec::tiny();
    let ckpt = tmp.path().join("c");
    write_checkpoint(&ckpt, &spec);
    let cases: [(&str, &[usize], &str); 4] = [
        (GATE, &[0, 0, 1, 2], "not a permutation"),
        (GATE, &[], "empty"),
        // 24 rows cannot be cut into 5 equal blocks.
        (GATE, &[0, 1, 2, 3, 4], "cannot be regrouped"),
        ("model.layers.0.no_such.weight", &[0], "no unit holds"),
    ];
    for (tensor, order, why) in cases {
        let out = tmp.path().join("out");
        let err = run_split(
            &ckpt,
            &with_orders(&spec, &[(tensor, order)]),
            &opts_to(&out),
        )
        .unwrap_err();
        assert!(matches!(err, SplitError::InvalidLayout { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(tensor) && msg.contains(why), "{msg}");
        assert!(!out.join("manifest.json").exists());
    }
}
