//! Model location: a local directory, or a Hugging Face repo id resolved through hf-hub into the
//! standard HF cache (shared with Python tools), honouring HF_HOME, HF_HUB_CACHE, HF_TOKEN and
//! HF_HUB_OFFLINE.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::api::Progress;
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};

/// How to reach the hub.
#[derive(Debug, Clone, Default)]
pub struct HubOptions {
    /// Access token (else HF_TOKEN, else the token file in HF_HOME).
    pub token: Option<String>,
    /// Branch, tag or commit (default `main`).
    pub revision: Option<String>,
    /// Never touch the network (also set by HF_HUB_OFFLINE=1).
    pub offline: bool,
    /// Override of the hub cache directory (else HF_HUB_CACHE, else HF_HOME/hub).
    pub cache_dir: Option<PathBuf>,
    /// Show download progress bars.
    pub progress: bool,
    /// Hub URL (else HF_ENDPOINT, else huggingface.co).
    pub endpoint: Option<String>,
    /// Fetch only the config, generation config and tokenizer files, not the weights (for
    /// commands that need no weights, e.g. rendering a chat template).
    pub skip_weights: bool,
    /// Give up on a download when the server sends nothing (no answer to connect, no headers, no
    /// bytes of the body) for this long (else `RABBIT_HUB_TIMEOUT` in seconds, else 60 s).
    pub stall_timeout: Option<Duration>,
}

/// Default of [`HubOptions::stall_timeout`].
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Shortest stall timeout accepted: below it every download would fail at once.
const MIN_STALL_TIMEOUT: Duration = Duration::from_millis(1);

fn stall_timeout(opts: &HubOptions) -> Result<Duration> {
    if let Some(t) = opts.stall_timeout {
        if t < MIN_STALL_TIMEOUT {
            return Err(Error::InvalidInput(format!(
                "HubOptions::stall_timeout {t:?} is shorter than {MIN_STALL_TIMEOUT:?}"
            )));
        }
        return Ok(t);
    }
    match env_nonempty("RABBIT_HUB_TIMEOUT") {
        None => Ok(DEFAULT_STALL_TIMEOUT),
        Some(v) => match v.trim().parse::<f64>().map(Duration::try_from_secs_f64) {
            Ok(Ok(t)) if t >= MIN_STALL_TIMEOUT => Ok(t),
            _ => Err(Error::InvalidInput(format!(
                "RABBIT_HUB_TIMEOUT={v}: expected a number of seconds from 0.001 up"
            ))),
        },
    }
}

/// The HTTP status behind an hf-hub error, if it is one.
fn http_status(e: &ApiError) -> Option<u16> {
    match e {
        ApiError::RequestError(inner) => match inner.as_ref() {
            ureq::Error::StatusCode(code) => Some(*code),
            _ => None,
        },
        ApiError::TooManyRetries(inner) => http_status(inner),
        _ => None,
    }
}

/// What the download thread tells the waiting one.
enum Tick {
    /// Bytes arrived (or the download started): the server is alive.
    Alive,
    /// The download ended.
    Done(std::result::Result<PathBuf, ApiError>),
}

/// hf-hub's progress hook, used as a heartbeat (and forwarded to a progress bar).
struct Heartbeat {
    tx: mpsc::Sender<Tick>,
    bar: Option<indicatif::ProgressBar>,
}

impl Progress for Heartbeat {
    fn init(&mut self, size: usize, filename: &str) {
        let _ = self.tx.send(Tick::Alive);
        if let Some(b) = &mut self.bar {
            Progress::init(b, size, filename);
        }
    }
    fn update(&mut self, size: usize) {
        let _ = self.tx.send(Tick::Alive);
        if let Some(b) = &mut self.bar {
            Progress::update(b, size);
        }
    }
    fn finish(&mut self) {
        if let Some(b) = &mut self.bar {
            Progress::finish(b);
        }
    }
}

/// Downloads `file` with a stall watchdog: hf-hub's HTTP client has no timeouts, so a server
/// that accepts and never answers would hang for ever. The download runs on its own thread;
/// when nothing arrives for `stall`, the caller gets an error naming the endpoint (the stuck
/// thread is left behind, blocked on its socket, and ends with the process).
fn download_watched(
    api: &Api,
    repo: &Repo,
    file: &str,
    endpoint: &str,
    stall: Duration,
    progress: bool,
) -> std::result::Result<PathBuf, DownloadError> {
    let (tx, rx) = mpsc::channel();
    let api = api.repo(repo.clone());
    let name = file.to_string();
    let bar = progress.then(indicatif::ProgressBar::no_length);
    std::thread::Builder::new()
        .name(format!("download {file}"))
        .spawn(move || {
            let hb = Heartbeat {
                tx: tx.clone(),
                bar,
            };
            let _ = tx.send(Tick::Done(api.download_with_progress(&name, hb)));
        })
        .map_err(|e| DownloadError::Other(format!("starting the download thread: {e}")))?;
    let mut last = std::time::Instant::now();
    loop {
        // Wake at least every 10 s to say we are waiting; give up once `stall` has passed.
        let left = stall.saturating_sub(last.elapsed());
        match rx.recv_timeout(left.min(Duration::from_secs(10))) {
            Ok(Tick::Alive) => last = std::time::Instant::now(),
            Ok(Tick::Done(r)) => return r.map_err(DownloadError::Api),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let waited = last.elapsed();
                if waited >= stall {
                    return Err(DownloadError::Stalled(format!(
                        "no answer from {endpoint} for {:.0} s while downloading {file} \
                         (connection or read stalled); check the network, HF_ENDPOINT, or set \
                         RABBIT_HUB_TIMEOUT=SECONDS to wait longer",
                        stall.as_secs_f64()
                    )));
                }
                if progress {
                    use std::io::Write;
                    let _ = writeln!(
                        std::io::stderr(),
                        "waiting for {endpoint} ({file}, {:.0} s)...",
                        waited.as_secs_f64()
                    );
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(DownloadError::Other(format!(
                    "the download of {file} stopped without a result"
                )))
            }
        }
    }
}

/// Why a download failed.
enum DownloadError {
    /// hf-hub's own error (HTTP status, I/O, ...).
    Api(ApiError),
    /// The watchdog gave up.
    Stalled(String),
    /// Anything else.
    Other(String),
}

/// Where a model's files are.
#[derive(Debug, Clone)]
pub struct ModelLocation {
    /// Directory holding config.json, tokenizer and weights.
    pub dir: PathBuf,
    /// `(repo id, revision)` when it came from the hub.
    pub hub: Option<(String, String)>,
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The HF hub cache directory, as huggingface_hub computes it.
pub fn hub_cache_dir() -> PathBuf {
    if let Some(d) = env_nonempty("HF_HUB_CACHE") {
        return PathBuf::from(d);
    }
    let home = env_nonempty("HF_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let base = env_nonempty("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(env_nonempty("HOME").unwrap_or_else(|| ".".into())).join(".cache")
                });
            base.join("huggingface")
        });
    home.join("hub")
}

fn offline_from_env() -> bool {
    matches!(
        env_nonempty("HF_HUB_OFFLINE")
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("1" | "true" | "yes" | "on")
    )
}

fn token(opts: &HubOptions) -> Option<String> {
    if let Some(t) = &opts.token {
        return Some(t.clone());
    }
    if let Some(t) = env_nonempty("HF_TOKEN") {
        return Some(t);
    }
    let home = env_nonempty("HF_HOME").map(PathBuf::from);
    let path = home
        .map(|h| h.join("token"))
        .unwrap_or_else(|| hub_cache_dir().with_file_name("token"));
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// True when `s` has the shape of a repo id (`name` or `org/name`) rather than a path.
pub fn looks_like_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    !s.starts_with('.')
        && !s.starts_with('/')
        && (1..=2).contains(&parts.len())
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// The snapshot directory of `repo@revision` in an HF cache, as huggingface_hub lays it out
/// (`models--org--name/refs/<branch>` holds a commit; `snapshots/<commit>/` holds the files);
/// a revision that is itself a commit resolves directly.
pub fn offline_snapshot(cache_dir: &Path, repo: &str, revision: &str) -> Option<PathBuf> {
    let repo_dir = cache_dir.join(format!("models--{}", repo.replace('/', "--")));
    let direct = repo_dir.join("snapshots").join(revision);
    if revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit()) && direct.is_dir() {
        return Some(direct);
    }
    let commit = std::fs::read_to_string(repo_dir.join("refs").join(revision)).ok()?;
    let dir = repo_dir.join("snapshots").join(commit.trim());
    dir.is_dir().then_some(dir)
}

/// Files a model needs besides its weights; the optional ones may be absent.
const REQUIRED: &[&str] = &["config.json"];
const OPTIONAL: &[&str] = &[
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
];
/// The tokenizer files of checkpoints without a tokenizer.json (QWen v1; the sentencepiece
/// ones: ChatGLM, Baichuan, InternLM), fetched only then.
const TOKENIZER_FALLBACKS: &[&str] = &["qwen.tiktoken", "tokenizer.model"];

/// Fetches one repo file into the cache (or finds it there): `None` when the repo lacks it.
type Fetch = dyn Fn(&str) -> Result<Option<PathBuf>>;

/// Resolves a local path or repo id to a directory with the model's files, downloading what is
/// missing unless offline.
pub fn locate(id_or_path: &str, opts: &HubOptions) -> Result<ModelLocation> {
    let path = Path::new(id_or_path);
    if path.is_dir() {
        return Ok(ModelLocation {
            dir: path.to_path_buf(),
            hub: None,
        });
    }
    if path.exists() {
        return Err(Error::InvalidInput(format!(
            "{id_or_path} is a file; --model takes a model directory or a hub repo id"
        )));
    }
    if !looks_like_repo_id(id_or_path) {
        return Err(Error::InvalidInput(format!(
            "model directory {id_or_path} does not exist (and it is not a hub repo id like `Qwen/Qwen2.5-0.5B`)"
        )));
    }
    let revision = opts.revision.clone().unwrap_or_else(|| "main".into());
    let repo = Repo::with_revision(id_or_path.to_string(), RepoType::Model, revision.clone());
    let cache_dir = opts.cache_dir.clone().unwrap_or_else(hub_cache_dir);
    let offline = opts.offline || offline_from_env();
    let fetch: Box<Fetch> = if offline {
        // Offline: read the HF cache layout directly (never build an HTTP client).
        let snapshot = offline_snapshot(&cache_dir, id_or_path, &revision);
        Box::new(move |f| Ok(snapshot.as_ref().map(|d| d.join(f)).filter(|p| p.exists())))
    } else {
        let mut builder = ApiBuilder::new()
            .with_cache_dir(cache_dir.clone())
            .with_token(token(opts))
            .with_progress(opts.progress);
        let endpoint = opts
            .endpoint
            .clone()
            .or_else(|| env_nonempty("HF_ENDPOINT"));
        if let Some(endpoint) = &endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        let endpoint = endpoint.unwrap_or_else(|| "https://huggingface.co".into());
        let stall = stall_timeout(opts)?;
        let progress = opts.progress;
        let api = builder.build().map_err(|e| Error::Hub(e.to_string()))?;
        let cached = Cache::new(cache_dir.clone()).repo(repo.clone());
        let id = id_or_path.to_string();
        Box::new(move |f| {
            if let Some(p) = cached.get(f) {
                return Ok(Some(p));
            }
            match download_watched(&api, &repo, f, &endpoint, stall, progress) {
                Ok(p) => Ok(Some(p)),
                Err(DownloadError::Stalled(msg)) => Err(Error::Hub(format!("{id}: {msg}"))),
                Err(DownloadError::Other(msg)) => Err(Error::Hub(format!("{id}: {msg}"))),
                Err(DownloadError::Api(e)) => {
                    let msg = e.to_string();
                    let status = http_status(&e);
                    if status == Some(404) {
                        Ok(None)
                    } else if matches!(status, Some(401 | 403)) {
                        Err(Error::Hub(format!(
                        "{id} is gated or private ({msg}): accept its license on huggingface.co, \
                         then pass a token with --token or the HF_TOKEN environment variable"
                    )))
                    } else {
                        Err(Error::Hub(format!(
                            "{id}: downloading {f} from {endpoint}: {msg}{}",
                            if matches!(e, ApiError::LockAcquisition(_)) {
                                " (another download of this file is running, in this process \
                                 after a stall or in another one; retry once it has ended)"
                            } else {
                                ""
                            }
                        )))
                    }
                }
            }
        })
    };
    let missing = |f: &str| {
        if offline {
            Error::Hub(format!(
                "{id_or_path}@{revision}: {f} is not in the HF cache {} and offline mode is on \
                 (HF_HUB_OFFLINE); download it once with network access",
                cache_dir.display()
            ))
        } else {
            Error::Hub(format!("{id_or_path}@{revision}: the repo has no {f}"))
        }
    };
    let mut dir = None;
    for f in REQUIRED {
        let p = fetch(f)?.ok_or_else(|| missing(f))?;
        dir = p.parent().map(Path::to_path_buf);
    }
    let mut has_tokenizer_json = false;
    for f in OPTIONAL {
        let got = fetch(f)?;
        has_tokenizer_json |= *f == "tokenizer.json" && got.is_some();
    }
    if !has_tokenizer_json {
        for f in TOKENIZER_FALLBACKS {
            if fetch(f)?.is_some() {
                break;
            }
        }
        // Never run; read to tell ChatGLM3's chat format from ChatGLM2's (same class name).
        fetch("tokenization_chatglm.py")?;
    }
    // Never run either: Baichuan's two position schemes ship as two modeling files, and the
    // file settles which one a checkpoint uses (see rabbit_models' Baichuan).
    let is_baichuan = dir
        .as_ref()
        .and_then(|d| std::fs::read_to_string(d.join("config.json")).ok())
        .is_some_and(|t| t.contains("\"BaichuanForCausalLM\""));
    if is_baichuan {
        fetch("modeling_baichuan.py")?;
    }
    if opts.skip_weights {
        let dir = dir.ok_or_else(|| missing("config.json"))?;
        return Ok(ModelLocation {
            dir,
            hub: Some((id_or_path.to_string(), revision)),
        });
    }
    // Safetensors first; PyTorch zip checkpoints (`pytorch_model*.bin`, which several
    // remote-code families ship only) when a repo has none. Sharded: the index, then its shards.
    let mut found = false;
    for (index, single) in [
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ] {
        if let Some(index) = fetch(index)? {
            for s in index_shards(&index)? {
                fetch(&s)?.ok_or_else(|| missing(&s))?;
            }
            found = true;
            break;
        }
        if fetch(single)?.is_some() {
            found = true;
            break;
        }
    }
    if !found {
        return Err(missing(
            "weights (model.safetensors[.index.json], nor pytorch_model.bin[.index.json])",
        ));
    }
    let dir = dir.ok_or_else(|| missing("config.json"))?;
    Ok(ModelLocation {
        dir,
        hub: Some((id_or_path.to_string(), revision)),
    })
}

/// The shard files a weight index (`*.index.json`) names, sorted, each once.
fn index_shards(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::Hub(format!("{}: {e}", index.display())))?;
    let mut shards: Vec<String> = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.values()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    shards.sort();
    shards.dedup();
    // Names are relative to the repo: nothing that could reach outside the snapshot.
    if let Some(bad) = shards.iter().find(|s| {
        Path::new(s)
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    }) {
        return Err(Error::Hub(format!(
            "{}: shard name {bad:?} is not a file inside the repo",
            index.display()
        )));
    }
    Ok(shards)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_id_shapes() {
        assert!(looks_like_repo_id("Qwen/Qwen2.5-0.5B"));
        assert!(looks_like_repo_id("gpt2"));
        assert!(!looks_like_repo_id("./model"));
        assert!(!looks_like_repo_id("/abs/path"));
        assert!(!looks_like_repo_id("a/b/c"));
    }
}
