//! Model location through a local fake of the Hugging Face cache layout (no network): offline
//! resolution, revision pinning, the error when a file is missing offline, and the message for a
//! gated repo (from a fake hub answering 401 on loopback).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};

use rabbitllm::hub::{locate, HubOptions};
use rabbitllm::{AutoModel, Control, DType, DeviceSpec, GenerateRequest, LoadOptions};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const OLD_COMMIT: &str = "fedcba9876543210fedcba9876543210fedcba98";

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(case)
}

/// Lays out `models--acme--tiny` like huggingface_hub does: blobs, snapshot symlinks, refs.
fn fake_cache(root: &Path) -> PathBuf {
    let repo = root.join("models--acme--tiny");
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    for (commit, reference) in [(COMMIT, "main"), (OLD_COMMIT, "v1")] {
        let snap = repo.join("snapshots").join(commit);
        std::fs::create_dir_all(&snap).unwrap();
        for f in ["config.json", "generation_config.json", "model.safetensors"] {
            let blob = repo.join("blobs").join(format!("{commit}-{f}"));
            std::fs::copy(fixture("qwen2_tied_f32").join(f), &blob).unwrap();
            std::os::unix::fs::symlink(&blob, snap.join(f)).unwrap();
        }
        std::fs::write(repo.join("refs").join(reference), commit).unwrap();
    }
    repo
}

fn offline(cache: &Path) -> HubOptions {
    HubOptions {
        cache_dir: Some(cache.to_path_buf()),
        offline: true,
        // Nothing listens there: any attempt to use the network would fail loudly.
        endpoint: Some("http://127.0.0.1:9".into()),
        ..Default::default()
    }
}

#[test]
fn offline_resolution_uses_the_hf_cache_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = fake_cache(tmp.path());
    let loc = locate("acme/tiny", &offline(tmp.path())).unwrap();
    assert_eq!(loc.dir, repo.join("snapshots").join(COMMIT));
    assert_eq!(loc.hub, Some(("acme/tiny".to_string(), "main".to_string())));

    let pinned = HubOptions {
        revision: Some("v1".into()),
        ..offline(tmp.path())
    };
    assert_eq!(
        locate("acme/tiny", &pinned).unwrap().dir,
        repo.join("snapshots").join(OLD_COMMIT)
    );
    let by_commit = HubOptions {
        revision: Some(OLD_COMMIT.into()),
        ..offline(tmp.path())
    };
    assert_eq!(
        locate("acme/tiny", &by_commit).unwrap().dir,
        repo.join("snapshots").join(OLD_COMMIT)
    );
}

#[test]
fn a_cached_hub_model_loads_and_generates_offline() {
    let tmp = tempfile::tempdir().unwrap();
    fake_cache(tmp.path());
    let split = tmp.path().join("split");
    let opts = LoadOptions {
        hub: offline(tmp.path()),
        ..LoadOptions::default()
    }
    .device(DeviceSpec::Cpu)
    .dtype(DType::F32)
    .split_dir(&split);
    let mut model = AutoModel::from_pretrained("acme/tiny", opts).unwrap();
    let req = GenerateRequest {
        sequences: vec![vec![1, 2, 3]],
        max_new_tokens: 3,
        ..Default::default()
    };
    let out = model.generate(&req, &mut |_| Control::Continue).unwrap();
    assert_eq!(out.sequences[0].output_ids.len(), 3);
    assert!(
        split.join("manifest.json").exists(),
        "the split goes to the given dir, not into the HF cache"
    );
}

#[test]
fn offline_and_missing_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = fake_cache(tmp.path());
    let e = locate("acme/absent", &offline(tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("acme/absent") && e.contains("offline"), "{e}");
    std::fs::remove_file(
        repo.join("snapshots")
            .join(COMMIT)
            .join("model.safetensors"),
    )
    .unwrap();
    let e = locate("acme/tiny", &offline(tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("HF_HUB_OFFLINE"),
        "{e}"
    );
    // Without weights is fine for a caller that needs none (`rabbit template`).
    let loc = locate(
        "acme/tiny",
        &HubOptions {
            skip_weights: true,
            ..offline(tmp.path())
        },
    )
    .unwrap();
    assert!(loc.dir.join("config.json").exists());
}

/// `--delete-original` on a hub model is refused: it would free nothing (blobs stay) and make
/// the next load download and split everything again.
#[test]
fn delete_original_is_refused_for_hub_models() {
    let tmp = tempfile::tempdir().unwrap();
    fake_cache(tmp.path());
    let blobs: Vec<_> = std::fs::read_dir(tmp.path().join("models--acme--tiny/blobs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let mut opts = LoadOptions::default()
        .device(DeviceSpec::Cpu)
        .delete_original(true)
        .split_dir(tmp.path().join("split"));
    opts.hub = offline(tmp.path());
    let e = AutoModel::from_pretrained("acme/tiny", opts)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--delete-original") && e.contains("hub"), "{e}");
    assert!(blobs.iter().all(|b| b.exists()));
    assert!(!tmp.path().join("split").exists(), "nothing was split");
}

/// A stall timeout too short to mean anything is refused, not turned into "no answer for 0 s".
#[test]
fn a_zero_stall_timeout_is_refused() {
    let opts = HubOptions {
        endpoint: Some("http://127.0.0.1:9".into()),
        stall_timeout: Some(std::time::Duration::ZERO),
        ..Default::default()
    };
    let e = locate("acme/anything", &opts).unwrap_err().to_string();
    assert!(e.contains("stall_timeout"), "{e}");
}

#[test]
fn a_gated_repo_says_how_to_pass_a_token() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // A fake hub that refuses every request, as huggingface.co does for gated repos.
    std::thread::spawn(move || {
        for stream in listener.incoming().take(8) {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(
                b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 25\r\nconnection: close\r\n\r\n{\"error\":\"gated repo\"}\r\n",
            );
        }
    });
    let tmp = tempfile::tempdir().unwrap();
    let opts = HubOptions {
        cache_dir: Some(tmp.path().to_path_buf()),
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        ..Default::default()
    };
    let e = locate("acme/gated", &opts).unwrap_err().to_string();
    assert!(
        e.contains("gated") && e.contains("--token") && e.contains("HF_TOKEN"),
        "{e}"
    );
}

#[test]
fn not_a_repo_id_and_not_a_directory() {
    let e = locate("./no/such/dir", &HubOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("./no/such/dir") && e.contains("does not exist"),
        "{e}"
    );
}

/// A hub that accepts the connection and then never answers: the download gives up after the
/// stall timeout with a message naming the endpoint and the file, instead of hanging for ever.
/// Also a server that sends headers and then stalls in the body.
#[test]
fn a_silent_hub_times_out_naming_the_endpoint() {
    use std::time::Duration;
    for answer_headers in [false, true] {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        // Holds the accepted connections open without answering (or after a partial answer).
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming().take(8) {
                let Ok(mut s) = stream else { continue };
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                if answer_headers {
                    let req = String::from_utf8_lossy(&buf).to_ascii_lowercase();
                    if req.contains("range: bytes=0-0") {
                        // hf-hub's metadata probe: a proper answer, so the download starts.
                        let _ = s.write_all(
                            b"HTTP/1.1 206 Partial Content\r\ncontent-length: 1\r\n\
                              content-range: bytes 0-0/1000\r\netag: \"abc\"\r\n\
                              x-repo-commit: 0123456789abcdef0123456789abcdef01234567\r\n\r\n{",
                        );
                    } else {
                        // The download itself: headers and a few bytes, then silence.
                        let _ =
                            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n{\"a\"");
                    }
                }
                held.push(s);
            }
            std::thread::sleep(Duration::from_secs(120));
        });
        let tmp = tempfile::tempdir().unwrap();
        let endpoint = format!("http://127.0.0.1:{port}");
        let opts = HubOptions {
            cache_dir: Some(tmp.path().to_path_buf()),
            endpoint: Some(endpoint.clone()),
            stall_timeout: Some(Duration::from_millis(500)),
            ..Default::default()
        };
        // Bounded by the watchdog itself; a regression shows as this thread never returning,
        // which the outer join turns into a failure instead of a hung test run.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(locate("acme/silent", &opts).map(|l| l.dir));
        });
        let res = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("locate returned (the watchdog fired)");
        let e = res.unwrap_err().to_string();
        assert!(
            e.contains(&endpoint) && e.contains("config.json") && e.contains("RABBIT_HUB_TIMEOUT"),
            "{e}"
        );
    }
}

/// By default a hub model streams in place from the HF cache: its blobs, through the snapshot's
/// links, read where they are; the cache is left exactly as it was. Same tokens as a split.
#[test]
fn a_hub_model_streams_from_the_cache_blobs_in_place() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = fake_cache(tmp.path());
    let listing = |d: &Path| {
        let mut v = Vec::new();
        for e in walk(d) {
            let md = std::fs::symlink_metadata(&e).unwrap();
            v.push((e, md.len(), md.modified().ok()));
        }
        v.sort();
        v
    };
    let before = listing(&repo);
    let opts = || {
        LoadOptions {
            hub: offline(tmp.path()),
            ..LoadOptions::default()
        }
        .device(DeviceSpec::Cpu)
        .dtype(DType::F32)
    };
    let req = GenerateRequest {
        sequences: vec![vec![1, 2, 3]],
        max_new_tokens: 4,
        ..Default::default()
    };
    let mut model = AutoModel::from_pretrained("acme/tiny", opts()).unwrap();
    assert!(model.engine.streams_in_place());
    assert_eq!(
        model.engine.source_dir(),
        repo.join("snapshots").join(COMMIT).as_path()
    );
    let got = model.generate(&req, &mut |_| Control::Continue).unwrap();
    drop(model);
    assert_eq!(listing(&repo), before, "the HF cache is untouched");
    let split = tmp.path().join("split");
    let mut model = AutoModel::from_pretrained("acme/tiny", opts().split_dir(&split)).unwrap();
    assert!(!model.engine.streams_in_place());
    let want = model.generate(&req, &mut |_| Control::Continue).unwrap();
    assert_eq!(got.sequences[0].output_ids, want.sequences[0].output_ids);
}

fn walk(d: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        if std::fs::symlink_metadata(&p).unwrap().is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}
