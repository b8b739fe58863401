//! PyTorch `.bin` checkpoints (`torch.save` zip archives), read without running Python: every
//! tensor reads to exactly the bytes of the same tensor saved with safetensors, a sharded `.bin`
//! checkpoint splits like its safetensors twin, and everything that is not a plain state dict of
//! contiguous tensors in stored records is refused, naming the file, tensor or Python global.
//!
//! The fixtures in tests/fixtures/torch_bin were written by torch.save (torch 2.11) and
//! safetensors.torch.save_file from the same tensors, by make_fixtures.py there. The hostile
//! pickles are built by hand below; nothing is ever executed.

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use common::*;
use rabbit_split::{
    Checkpoint, Dtype, Manifest, SplitError, SplitOptions, SplitOutcome, WeightFormat,
};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch_bin")
}

/// A checkpoint directory holding the fixture `name` as `pytorch_model.bin`.
fn bin_dir(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    fs::copy(fixtures().join(name), tmp.path().join("pytorch_model.bin")).unwrap();
    let p = tmp.path().to_path_buf();
    (tmp, p)
}

fn open_err(dir: &Path) -> SplitError {
    Checkpoint::open(dir).unwrap_err()
}

#[test]
fn a_torch_save_state_dict_reads_to_the_bytes_of_its_safetensors_twin() {
    let st_bytes = fs::read(fixtures().join("state.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
    // Protocol 2 is torch.save's default; 4 adds FRAME, MEMOIZE, SHORT_BINUNICODE, STACK_GLOBAL;
    // zip64.bin is state.bin rewritten with ZIP64 local headers and no alignment padding.
    for fixture in ["state.bin", "state_p4.bin", "zip64.bin"] {
        let (_t, dir) = bin_dir(fixture);
        let ckpt = Checkpoint::open(&dir).unwrap();
        assert_eq!(ckpt.format, WeightFormat::PyTorch);
        let mut names: Vec<&str> = ckpt.tensors().map(|t| t.name.as_str()).collect();
        let mut expected: Vec<&str> = st.names();
        names.sort_unstable();
        expected.sort_unstable();
        assert_eq!(names, expected, "{fixture}");
        let mut buf = Vec::new();
        for (name, view) in st.tensors() {
            let loc = ckpt.tensor(&name).unwrap();
            let dtype: Dtype = format!("{:?}", view.dtype()).parse().unwrap();
            assert_eq!(loc.dtype, dtype, "{fixture}: {name}");
            assert_eq!(loc.shape, view.shape(), "{fixture}: {name}");
            ckpt.read_tensor(&name, &mut buf).unwrap();
            assert_eq!(buf, view.data(), "{fixture}: bytes of {name}");
        }
        // The cases are what they claim to be: tied weights are one byte range, views lie
        // inside their base's storage, the new dtypes came through.
        let t = |n: &str| ckpt.tensor(n).unwrap();
        assert_eq!(t("lm_head.weight").offset, t("embed.weight").offset);
        assert_eq!(t("view").offset, t("base").offset + 3 * 4);
        assert_eq!(t("rows.kv").offset, t("rows.q").offset + 4 * 2 * 2);
        assert_eq!(t("scalar").shape, Vec::<usize>::new());
        assert_eq!(
            (t("f8").dtype, t("u16").dtype),
            (Dtype::F8_E4M3, Dtype::U16)
        );
        assert_eq!(t("i64_buffer").dtype, Dtype::I64);
        assert_eq!((t("param").dtype, t("param").len), (Dtype::F32, 16));
        assert_eq!((t("empty").shape.clone(), t("empty").len), (vec![0, 3], 0));
    }
}

#[test]
fn safetensors_weights_take_precedence_over_bin_weights() {
    let (_t, dir) = bin_dir("noncontig.bin");
    fs::copy(
        fixtures().join("state.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    // The unreadable .bin is not even looked at.
    let ckpt = Checkpoint::open(&dir).unwrap();
    assert_eq!(ckpt.format, WeightFormat::Safetensors);
    assert_eq!(ckpt.files, vec![dir.join("model.safetensors")]);
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// The Spec of the sharded fixtures (see make_fixtures.py).
fn sharded_spec() -> Spec {
    Spec {
        layers: 2,
        hidden: 8,
        kv: 2,
        inter: 8,
        vocab: 16,
        shards: 2,
        ..Spec::tiny()
    }
}

/// Asserts two splits hold the same units with the same tensors and data bytes (the unit files'
/// headers differ only by the source fingerprint they record).
fn assert_same_units(a: &Path, b: &Path) {
    let (ma, mb) = (Manifest::load(a).unwrap(), Manifest::load(b).unwrap());
    assert_eq!(ma.units.len(), mb.units.len());
    for (ua, ub) in ma.units.iter().zip(&mb.units) {
        assert_eq!(
            (&ua.name, &ua.kind, &ua.tensors, ua.data_offset, ua.data_len),
            (&ub.name, &ub.kind, &ub.tensors, ub.data_offset, ub.data_len)
        );
        let data = |dir: &Path, file: &str| {
            let bytes = fs::read(dir.join(file)).unwrap();
            bytes[ua.data_offset as usize..(ua.data_offset + ua.data_len) as usize].to_vec()
        };
        assert!(
            data(a, &ua.file) == data(b, &ub.file),
            "data of unit {} differs",
            ua.name
        );
    }
}

#[test]
fn a_sharded_bin_checkpoint_splits_like_its_safetensors_twin() {
    let tmp = tempfile::tempdir().unwrap();
    let (bin, st) = (tmp.path().join("bin"), tmp.path().join("st"));
    copy_dir(&fixtures().join("sharded_bin"), &bin);
    copy_dir(&fixtures().join("sharded_st"), &st);
    let layout = layout(&sharded_spec());
    let opts = SplitOptions::default();
    let (bin_split, outcome, _) = run_split(&bin, &layout, &opts).unwrap();
    assert!(
        matches!(outcome, SplitOutcome::Written { .. }),
        "{outcome:?}"
    );
    let (st_split, _, _) = run_split(&st, &layout, &opts).unwrap();
    assert_same_units(&bin_split, &st_split);
    assert!(rabbit_split::verify(&bin_split).unwrap().is_ok());
    // The fingerprint of .bin weights is stable: the split is recognized as current.
    let (_, outcome, _) = run_split(&bin, &layout, &opts).unwrap();
    assert_eq!(outcome, SplitOutcome::Reused);
    // ... and changes with them.
    let shard = bin.join("pytorch_model-00002-of-00002.bin");
    let f = fs::OpenOptions::new().append(true).open(&shard).unwrap();
    f.set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
    assert!(!rabbit_split::is_current(&bin_split, &bin, &layout, &opts).unwrap());

    // A shard the index names must be there.
    fs::remove_file(&shard).unwrap();
    let e = run_split(&bin, &layout, &opts).unwrap_err();
    assert!(matches!(e, SplitError::MissingShard { .. }), "{e:?}");
    assert!(
        e.to_string().contains("pytorch_model.bin.index.json"),
        "{e}"
    );
}

#[test]
fn delete_original_deletes_bin_weights_and_a_bin_copy_beside_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = layout(&sharded_spec());
    let del = SplitOptions {
        delete_original: true,
        ..SplitOptions::default()
    };
    let bin = tmp.path().join("bin");
    copy_dir(&fixtures().join("sharded_bin"), &bin);
    let (split, _, events) = run_split(&bin, &layout, &del).unwrap();
    assert!(events.contains(&rabbit_split::SplitEvent::OriginalDeleted { files: 3 }));
    assert_eq!(file_names(&bin), vec!["config.json", "rabbit-split"]);
    assert!(Manifest::load(&split).unwrap().original_deleted);
    let (_, outcome, _) = run_split(&bin, &layout, &SplitOptions::default()).unwrap();
    assert_eq!(outcome, SplitOutcome::Reused);

    // Both formats: the split is made from the safetensors weights, and the .bin copy goes too
    // (left alone, it would become the checkpoint's weights once the safetensors are gone).
    let both = tmp.path().join("both");
    copy_dir(&fixtures().join("sharded_st"), &both);
    copy_dir(&fixtures().join("sharded_bin"), &both);
    let (_, _, events) = run_split(&both, &layout, &del).unwrap();
    assert!(events.contains(&rabbit_split::SplitEvent::OriginalDeleted { files: 6 }));
    assert_eq!(file_names(&both), vec!["config.json", "rabbit-split"]);
    let (_, outcome, _) = run_split(&both, &layout, &SplitOptions::default()).unwrap();
    assert_eq!(outcome, SplitOutcome::Reused);
}

#[test]
fn no_weights_names_both_formats() {
    let tmp = tempfile::tempdir().unwrap();
    let e = open_err(tmp.path());
    assert!(matches!(e, SplitError::MissingWeights { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("model.safetensors") && msg.contains("pytorch_model.bin.index.json"),
        "{msg}"
    );
}

#[test]
fn a_non_contiguous_tensor_is_refused_by_name() {
    let (_t, dir) = bin_dir("noncontig.bin");
    let e = open_err(&dir);
    let SplitError::BadTensor { tensor, file, .. } = &e else {
        panic!("{e:?}");
    };
    assert_eq!(
        (tensor.as_str(), file),
        ("transposed", &dir.join("pytorch_model.bin"))
    );
    assert!(e.to_string().contains("not contiguous"), "{e}");
}

#[test]
fn the_legacy_format_and_non_archives_are_refused() {
    let (_t, dir) = bin_dir("legacy.bin");
    let e = open_err(&dir);
    assert!(matches!(e, SplitError::LegacyTorchFormat { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("pytorch_model.bin") && msg.contains("torch >= 1.6"),
        "{msg}"
    );
    for junk in [&b""[..], b"PK", b"{\"not\": \"a checkpoint\"}"] {
        fs::write(dir.join("pytorch_model.bin"), junk).unwrap();
        let e = open_err(&dir);
        assert!(matches!(e, SplitError::BadTorchFile { .. }), "{e:?}");
        assert!(e.to_string().contains("pytorch_model.bin"), "{e}");
    }
}

#[test]
fn a_compressed_archive_is_refused_naming_the_record() {
    let (_t, dir) = bin_dir("deflated.bin");
    let e = open_err(&dir);
    assert!(matches!(e, SplitError::BadTorchFile { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("pytorch_model.bin") && msg.contains("is compressed (deflate)"),
        "{msg}"
    );
}

#[test]
fn a_truncated_archive_is_refused_naming_the_file() {
    let bytes = fs::read(fixtures().join("state.bin")).unwrap();
    let (_t, dir) = bin_dir("state.bin");
    // Every cut loses the zip directory at the end; none may panic or be taken for weights.
    for cut in [4, 100, bytes.len() / 2, bytes.len() - 1] {
        fs::write(dir.join("pytorch_model.bin"), &bytes[..cut]).unwrap();
        let e = open_err(&dir);
        assert!(
            matches!(e, SplitError::BadTorchFile { .. }),
            "cut {cut}: {e:?}"
        );
        assert!(e.to_string().contains("pytorch_model.bin"), "{e}");
    }
}

// ---- hand-built archives and pickles ----

/// Writes a zip of stored records (as torch.save does) to `path`.
fn write_zip(path: &Path, records: &[(&str, &[u8])]) {
    let mut z = zip::ZipWriter::new(fs::File::create(path).unwrap());
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, data) in records {
        z.start_file(*name, opts).unwrap();
        z.write_all(data).unwrap();
    }
    z.finish().unwrap();
}

/// Pickle opcodes, protocol 2, as torch.save writes them.
#[derive(Default)]
struct Pkl(Vec<u8>);

impl Pkl {
    fn op(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.op(format!("c{module}\n{name}\n").as_bytes())
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.op(b"X")
            .op(&(s.len() as u32).to_le_bytes())
            .op(s.as_bytes())
    }
    fn int(&mut self, v: i32) -> &mut Self {
        self.op(b"J").op(&v.to_le_bytes())
    }
    fn ints(&mut self, v: &[i32]) -> &mut Self {
        self.op(b"(");
        for &x in v {
            self.int(x);
        }
        self.op(b"t")
    }
    /// `name: _rebuild_tensor_v2(storage, offset, shape, stride, False, OrderedDict())`, inside
    /// the MARK of a SETITEMS.
    fn tensor(&mut self, name: &str, storage: (&str, &str, i32), offset: i32, shape: &[i32]) {
        let mut stride = vec![1; shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            stride[i] = stride[i + 1] * shape[i + 1];
        }
        self.str(name)
            .global("torch._utils", "_rebuild_tensor_v2")
            .op(b"((")
            .str("storage")
            .global("torch", storage.0)
            .str(storage.1)
            .str("cpu")
            .int(storage.2)
            .op(b"tQ")
            .int(offset)
            .ints(shape)
            .ints(&stride)
            .op(b"\x89")
            .global("collections", "OrderedDict")
            .op(b")Rt")
            .op(b"R");
    }
    fn state_dict(tensors: impl FnOnce(&mut Pkl)) -> Vec<u8> {
        let mut p = Pkl::default();
        p.op(b"\x80\x02")
            .global("collections", "OrderedDict")
            .op(b")R(");
        tensors(&mut p);
        p.op(b"u.");
        p.0
    }
}

/// A `pytorch_model.bin` in a new directory with `data.pkl` and the storage records given.
fn crafted(pkl: &[u8], storages: &[(&str, &[u8])]) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let names: Vec<String> = storages
        .iter()
        .map(|(k, _)| format!("archive/data/{k}"))
        .collect();
    let mut records: Vec<(&str, &[u8])> = vec![("archive/data.pkl", pkl)];
    records.extend(
        names
            .iter()
            .map(String::as_str)
            .zip(storages.iter().map(|s| s.1)),
    );
    records.push(("archive/version", b"3\n"));
    write_zip(&tmp.path().join("pytorch_model.bin"), &records);
    let p = tmp.path().to_path_buf();
    (tmp, p)
}

#[test]
fn the_hand_built_archive_is_read_when_sound() {
    // The helpers above make what the reader accepts, so the refusals below are about the one
    // thing each changes.
    let pkl = Pkl::state_dict(|p| p.tensor("w", ("FloatStorage", "0", 4), 1, &[3]));
    let data: Vec<u8> = (0..16).collect();
    let (_t, dir) = crafted(&pkl, &[("0", &data)]);
    let ckpt = Checkpoint::open(&dir).unwrap();
    let mut buf = Vec::new();
    ckpt.read_tensor("w", &mut buf).unwrap();
    assert_eq!(buf, &data[4..16]);
}

#[test]
fn a_corrupt_pickle_record_fails_its_checksum() {
    let pkl = Pkl::state_dict(|p| p.tensor("w", ("FloatStorage", "0", 4), 0, &[4]));
    let (_t, dir) = crafted(&pkl, &[("0", &[0u8; 16])]);
    let path = dir.join("pytorch_model.bin");
    let mut bytes = fs::read(&path).unwrap();
    // The tensor name inside data.pkl, changed in place: still a valid pickle, wrong CRC-32.
    let at = bytes.iter().position(|&b| b == b'w').unwrap();
    bytes[at] = b'v';
    fs::write(&path, &bytes).unwrap();
    let e = open_err(&dir);
    assert!(matches!(e, SplitError::BadTorchFile { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("record archive/data.pkl cannot be read"),
        "{msg}"
    );
}

#[test]
fn a_global_outside_the_whitelist_is_refused_by_name_never_called() {
    // What a malicious checkpoint does: os.system("...") through REDUCE.
    let mut evil = Pkl::default();
    evil.op(b"\x80\x02")
        .global("os", "system")
        .str("touch /tmp/rabbit-pwned")
        .op(b"\x85R.");
    // The same through STACK_GLOBAL (protocol 4), and a storage class that is not a tensor's.
    let mut evil4 = Pkl::default();
    evil4
        .op(b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93")
        .str("1")
        .op(b"\x85R.");
    let quant = Pkl::state_dict(|p| p.tensor("q", ("QInt8Storage", "0", 4), 0, &[4]));
    for (pkl, global) in [
        (evil.0, "os.system"),
        (evil4.0, "builtins.eval"),
        (quant, "torch.QInt8Storage"),
    ] {
        let (_t, dir) = crafted(&pkl, &[("0", &[0u8; 4])]);
        let e = open_err(&dir);
        let SplitError::ForbiddenGlobal { global: g, file } = &e else {
            panic!("{e:?}");
        };
        assert_eq!((g.as_str(), file), (global, &dir.join("pytorch_model.bin")));
        assert!(e.to_string().contains(global), "{e}");
    }
    assert!(!Path::new("/tmp/rabbit-pwned").exists());
}

#[test]
fn malformed_pickles_and_short_storages_are_refused_naming_what_is_wrong() {
    let good = Pkl::state_dict(|p| p.tensor("w", ("FloatStorage", "0", 4), 0, &[4]));
    let data = [0u8; 16];
    let bad_pickle = |pkl: &[u8], storages: &[(&str, &[u8])], want: &str| {
        let (_t, dir) = crafted(pkl, storages);
        let e = open_err(&dir);
        assert!(
            matches!(e, SplitError::BadTorchFile { .. }),
            "{want}: {e:?}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("pytorch_model.bin") && msg.contains(want),
            "{msg}"
        );
    };
    // data.pkl cut short, anywhere.
    for cut in [0, 1, 2, good.len() / 2, good.len() - 1] {
        bad_pickle(&good[..cut], &[("0", &data)], "truncated");
    }
    // Not a state dict.
    bad_pickle(b"\x80\x02]q\x00.", &[], "a list, not a state dict");
    let list_value = Pkl::state_dict(|p| {
        p.str("w").op(b"]");
    });
    bad_pickle(
        &list_value,
        &[],
        "state dict entry w is a list, not a tensor",
    );
    // Opcodes torch.save never writes for a state dict.
    bad_pickle(b"\x80\x02\x81.", &[], "unsupported pickle opcode 0x81");
    // A storage whose record is missing, or shorter than the storage.
    bad_pickle(&good, &[], "no record archive/data/0");
    bad_pickle(&good, &[("0", &data[..8])], "holds 8 bytes");

    // A tensor reaching past its storage is named.
    let past = Pkl::state_dict(|p| p.tensor("w", ("FloatStorage", "0", 4), 2, &[3]));
    let (_t, dir) = crafted(&past, &[("0", &data)]);
    let e = open_err(&dir);
    let SplitError::BadTensor { tensor, .. } = &e else {
        panic!("{e:?}");
    };
    assert_eq!(tensor, "w");
    assert!(
        e.to_string().contains("needs bytes 8..20 of storage 0"),
        "{e}"
    );
}

#[test]
fn deeply_nested_or_cyclic_pickles_do_not_crash() {
    // A million nested tuples, and a list that contains itself: no recursion, no hang.
    let mut deep = b"\x80\x02)".to_vec();
    deep.extend(std::iter::repeat_n(0x85u8, 1_000_000));
    deep.push(b'.');
    let mut cyclic = Pkl::default();
    cyclic.op(b"\x80\x02]q\x00h\x00a.");
    for (pkl, want) in [(deep, "a tuple"), (cyclic.0, "a list")] {
        let (_t, dir) = crafted(&pkl, &[]);
        let e = within_a_minute("reading", move || open_err(&dir).to_string());
        assert!(e.contains(want), "{e}");
    }
}

#[test]
fn no_corruption_of_a_bin_file_panics() {
    // Every byte of a real torch.save archive flipped in turn (zip headers, zip directory,
    // pickle, data), and every truncation: an error or a readable checkpoint, never a panic.
    let orig = fs::read(fixtures().join("state.bin")).unwrap();
    let (_t, dir) = bin_dir("state.bin");
    let path = dir.join("pytorch_model.bin");
    let mut buf = Vec::new();
    for i in 0..orig.len() {
        let mut bytes = orig.clone();
        bytes[i] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        if let Ok(ckpt) = Checkpoint::open(&dir) {
            for t in ckpt.tensors() {
                ckpt.read_tensor(&t.name, &mut buf).unwrap();
            }
        }
    }
    for cut in 0..orig.len() {
        fs::write(&path, &orig[..cut]).unwrap();
        assert!(Checkpoint::open(&dir).is_err(), "cut at {cut}");
    }
}
