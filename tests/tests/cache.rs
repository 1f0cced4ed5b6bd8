//! Cache management on caches built by hand in temp dirs, in the layout
//! huggingface_hub writes: scan, duplicates, consolidate, clean, rm.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use modeld_e2e::{fixtures_dir, kind, Daemon};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Writes one revision of `repo` into the HF cache at `root`, files stored
/// as blobs named by sha256 and linked from the snapshot; returns the repo dir.
fn write_revision(
    root: &Path,
    repo: &str,
    commit: &str,
    refs: &[&str],
    files: &[(&str, &[u8])],
) -> PathBuf {
    let dir = root.join(format!("models--{}", repo.replace('/', "--")));
    std::fs::create_dir_all(dir.join("blobs")).unwrap();
    for (name, bytes) in files {
        let sha = hex::encode(Sha256::digest(bytes));
        std::fs::write(dir.join("blobs").join(&sha), bytes).unwrap();
        let link = dir.join("snapshots").join(commit).join(name);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        let depth = Path::new(name).components().count() + 1;
        let target = PathBuf::from("../".repeat(depth)).join("blobs").join(&sha);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(target, &link).unwrap();
    }
    for name in refs {
        let path = dir.join("refs").join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, commit).unwrap();
    }
    dir
}

fn c(n: u8) -> String {
    format!("{n:x}").repeat(40)[..40].to_string()
}

/// The files a fixture model needs, with their bytes.
fn fixture_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    ["config.json", "model.safetensors", "tokenizer.json"]
        .iter()
        .map(|n| (n.to_string(), std::fs::read(dir.join(n)).unwrap()))
        .collect()
}

const CONFIG: &[u8] = br#"{"architectures":["LlamaForCausalLM"],"model_type":"llama"}"#;

/// Lets the small weight files of these tests be hard-linked.
const SMALL_LINKS: &str = "consolidate_min_bytes = 4096\n";

/// The consolidate action of `path` in a plan.
fn action_for<'a>(plan: &'a Value, path: &Path) -> &'a Value {
    plan["actions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["path"] == json!(path))
        .unwrap_or_else(|| panic!("no action for {}: {plan}", path.display()))
}

/// How `path` was (or would be) consolidated.
fn method_of(plan: &Value, path: &Path) -> String {
    let action = action_for(plan, path);
    action["method"]
        .as_str()
        .unwrap_or_else(|| panic!("no method: {action}"))
        .to_string()
}

/// `copy` was consolidated into `keep` by `method`: one inode for a hard
/// link; for a reflink, equal bytes in a file of its own, which a write
/// through `copy` shows (its bytes are put back after).
fn assert_consolidated(method: &str, keep: &Path, copy: &Path) {
    let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
    let kept = std::fs::read(keep).unwrap();
    assert_eq!(std::fs::read(copy).unwrap(), kept, "{}", copy.display());
    match method {
        "hardlink" => assert_eq!(ino(keep), ino(copy), "{}", copy.display()),
        "reflink" => {
            assert_ne!(ino(keep), ino(copy), "{}", copy.display());
            std::fs::write(copy, b"rewritten").unwrap();
            assert_eq!(
                std::fs::read(keep).unwrap(),
                kept,
                "a reflink aliases nothing"
            );
            std::fs::write(copy, &kept).unwrap();
        }
        other => panic!("{} was not consolidated: {other}", copy.display()),
    }
}

#[test]
fn scan_counts_shared_blobs_once_and_marks_discovered_repos() {
    let daemon = Daemon::start();
    let hub = daemon.hf_cache();
    let weights = vec![7u8; 10_000];
    write_revision(
        &hub,
        "org/llm",
        &c(1),
        &["main"],
        &[("config.json", CONFIG), ("model.safetensors", &weights)],
    );
    // A second revision shares the weights and changes the config.
    write_revision(
        &hub,
        "org/llm",
        &c(2),
        &["v2"],
        &[
            ("config.json", b"{\"model_type\":\"llama\"}"),
            ("model.safetensors", &weights),
        ],
    );
    write_revision(
        &hub,
        "other/lora-x",
        &c(3),
        &["main"],
        &[
            ("adapter_config.json", b"{}"),
            ("adapter_model.safetensors", b"abc"),
        ],
    );
    daemon
        .call(
            "models.register",
            json!({"name": "mine", "repo": "org/llm"}),
        )
        .unwrap();

    let scan = daemon.call("cache.scan", json!({})).unwrap();
    let root = scan["roots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["role"] == "primary")
        .unwrap();
    let repos = root["repos"].as_array().unwrap();
    let llm = repos.iter().find(|r| r["repo_id"] == "org/llm").unwrap();
    let shared = 10_000 + CONFIG.len() as u64 + 22;
    assert_eq!(llm["size_bytes"], shared, "the weights blob counts once");
    assert_eq!(llm["revisions"].as_array().unwrap().len(), 2);
    assert_eq!(llm["registered_as"], json!(["mine"]));
    assert_eq!(llm["family"], "llm");
    let lora = repos
        .iter()
        .find(|r| r["repo_id"] == "other/lora-x")
        .unwrap();
    assert_eq!(lora["registered_as"], json!([]));
    assert_eq!(lora["family"], "lora");
    assert_eq!(root["size_bytes"], shared + 2 + 3);

    let out = daemon.ctl(&["cache", "scan"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("(discovered)") && text.contains("org/llm"),
        "{text}"
    );
}

#[test]
fn scan_agrees_with_huggingface_hub() {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import huggingface_hub"])
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        // CI installs huggingface_hub (`.ci/run` sets MODELD_REQUIRE_HF_HUB),
        // so there a missing module is a failure, not a silent pass.
        assert!(
            std::env::var_os("MODELD_REQUIRE_HF_HUB").is_none(),
            "huggingface_hub is required (MODELD_REQUIRE_HF_HUB is set) but cannot be imported"
        );
        eprintln!("huggingface_hub is not installed; .ci/run installs it");
        return;
    }
    let daemon = Daemon::start();
    let hub = daemon.hf_cache();
    let weights = vec![3u8; 4096];
    write_revision(
        &hub,
        "org/a",
        &c(1),
        &["main"],
        &[("config.json", CONFIG), ("w.safetensors", &weights)],
    );
    write_revision(
        &hub,
        "org/a",
        &c(2),
        &[],
        &[("w.safetensors", &weights), ("sub/extra.json", b"[1]")],
    );
    write_revision(
        &hub,
        "b",
        &c(3),
        &["main", "refs/pr/1"],
        &[("x.bin", b"12345")],
    );
    let script = "import json,sys; from huggingface_hub import scan_cache_dir; \
        info = scan_cache_dir(sys.argv[1]); \
        print(json.dumps({r.repo_id: [r.size_on_disk, r.nb_files, sorted((v.commit_hash, v.size_on_disk) for v in r.revisions)] for r in info.repos}))";
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(&hub)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs: Value = serde_json::from_slice(&out.stdout).unwrap();
    let scan = daemon.call("cache.scan", json!({})).unwrap();
    let root = scan["roots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["role"] == "primary")
        .unwrap()
        .clone();
    for repo in root["repos"].as_array().unwrap() {
        let id = repo["repo_id"].as_str().unwrap();
        let mut revisions: Vec<(String, u64)> = repo["revisions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["commit"].as_str().unwrap().to_string(),
                    r["size_bytes"].as_u64().unwrap(),
                )
            })
            .collect();
        revisions.sort();
        assert_eq!(theirs[id][0], repo["size_bytes"], "{id} size");
        assert_eq!(theirs[id][1], repo["files"], "{id} files");
        assert_eq!(theirs[id][2], json!(revisions), "{id} revisions");
    }
}

#[test]
fn duplicates_found_then_consolidated_into_hard_links() {
    let extra = tempfile::tempdir().unwrap();
    let config = format!(
        "[cache]\nextra = [\"{}\"]\n{SMALL_LINKS}",
        extra.path().display()
    );
    let daemon = Daemon::start_configured(&config, &[]);
    let weights: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
    write_revision(
        &daemon.hf_cache(),
        "org/m",
        &c(1),
        &["main"],
        &[("model.safetensors", &weights)],
    );
    write_revision(
        extra.path(),
        "mirror/m",
        &c(2),
        &["main"],
        &[("model.safetensors", &weights)],
    );
    // A copy in the model root, and a hard link to it that is not a second copy.
    let model_root = daemon.dir.path().join("models");
    std::fs::create_dir_all(model_root.join("m")).unwrap();
    std::fs::write(model_root.join("m/model.safetensors"), &weights).unwrap();
    std::fs::hard_link(
        model_root.join("m/model.safetensors"),
        model_root.join("m/alias.safetensors"),
    )
    .unwrap();
    std::fs::write(
        daemon.dir.path().join("modes.toml"),
        format!("model_root = \"{}\"\n", model_root.display()),
    )
    .unwrap();
    daemon.call("modes.reload", json!({})).unwrap();

    let found = daemon.call("cache.duplicates", json!({})).unwrap();
    let groups = found["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 1, "{found}");
    // The mirror blob, and both names of the model-root copy.
    assert_eq!(groups[0]["copies"].as_array().unwrap().len(), 3);
    assert!(
        groups[0]["keep"].as_str().unwrap().contains("/blobs/"),
        "a cache blob is kept"
    );
    assert_eq!(found["reclaimable_bytes"], 2 * 50_000);

    let dry = daemon.call("cache.consolidate", json!({})).unwrap();
    assert_eq!(dry["applied"], false);
    assert_eq!(dry["freed_bytes"], 100_000);
    let keep = PathBuf::from(groups[0]["keep"].as_str().unwrap());
    let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
    assert_ne!(
        ino(&keep),
        ino(&model_root.join("m/model.safetensors")),
        "a dry run changes nothing"
    );

    let done = daemon
        .call("cache.consolidate", json!({"apply": true}))
        .unwrap();
    assert_eq!(done["applied"], true);
    let method = method_of(&done, &model_root.join("m/model.safetensors"));
    for name in ["m/model.safetensors", "m/alias.safetensors"] {
        assert_consolidated(&method, &keep, &model_root.join(name));
    }
    assert_eq!(
        std::fs::read(model_root.join("m/model.safetensors")).unwrap(),
        weights
    );
    let mirror = std::fs::read(
        extra
            .path()
            .join("models--mirror--m/snapshots")
            .join(c(2))
            .join("model.safetensors"),
    )
    .unwrap();
    assert_eq!(mirror, weights);
    if method == "hardlink" {
        // Clones are files of their own, which the next scan finds again.
        let again = daemon.call("cache.duplicates", json!({})).unwrap();
        assert_eq!(again["reclaimable_bytes"], 0);
    }
}

#[test]
fn consolidate_never_touches_a_loaded_model() {
    let daemon = Daemon::start();
    let fixture = fixtures_dir().join("tiny-llama");
    let files = fixture_files(&fixture);
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    write_revision(&daemon.hf_cache(), "org/tiny", &c(1), &["main"], &refs);
    let copy = daemon.dir.path().join("copy");
    std::fs::create_dir_all(&copy).unwrap();
    for (name, bytes) in &files {
        std::fs::write(copy.join(name), bytes).unwrap();
    }
    // The loaded model is the plain copy; its files must stay as they are.
    daemon
        .call(
            "models.register",
            json!({"name": "copy", "local_path": copy}),
        )
        .unwrap();
    daemon.call("load", json!({"name": "copy"})).unwrap();
    std::fs::write(
        daemon.dir.path().join("modes.toml"),
        format!("model_root = \"{}\"\n", daemon.dir.path().display()),
    )
    .unwrap();
    daemon.call("modes.reload", json!({})).unwrap();
    let before = std::fs::metadata(copy.join("model.safetensors"))
        .unwrap()
        .ino();
    let plan = daemon
        .call("cache.consolidate", json!({"apply": true}))
        .unwrap();
    assert!(
        plan["skipped"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s.as_str().unwrap().contains("loaded model")),
        "{plan}"
    );
    assert_eq!(
        std::fs::metadata(copy.join("model.safetensors"))
            .unwrap()
            .ino(),
        before
    );
}

#[test]
fn clean_is_a_dry_run_until_applied() {
    let daemon = Daemon::start();
    let hub = daemon.hf_cache();
    let repo = write_revision(
        &hub,
        "org/m",
        &c(1),
        &["main"],
        &[("a.json", b"{}"), ("b.bin", b"0123456789")],
    );
    write_revision(&hub, "org/m", &c(2), &[], &[("old.bin", b"detached!")]);
    std::fs::write(repo.join("blobs/deadbeef.incomplete"), vec![0u8; 100]).unwrap();
    std::fs::write(repo.join("blobs/0000orphan"), b"orphan").unwrap();
    std::os::unix::fs::symlink(
        "../../blobs/missing",
        repo.join("snapshots").join(c(1)).join("gone.json"),
    )
    .unwrap();
    std::fs::create_dir_all(hub.join("models--org--empty/refs")).unwrap();

    let dry = daemon.call("cache.clean", json!({})).unwrap();
    let actions: Vec<&str> = dry["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["action"].as_str().unwrap())
        .collect();
    for expected in [
        "remove_incomplete",
        "remove_orphan_blob",
        "remove_dangling_link",
        "remove_empty_repo",
    ] {
        assert!(actions.contains(&expected), "{expected} missing: {dry}");
    }
    assert!(
        !actions.contains(&"remove_revision"),
        "detached revisions are opt-in"
    );
    assert_eq!(dry["freed_bytes"], 106);
    assert!(repo.join("blobs/deadbeef.incomplete").exists(), "dry run");

    let done = daemon
        .call("cache.clean", json!({"apply": true, "detached": true}))
        .unwrap();
    assert_eq!(done["applied"], true);
    assert!(!repo.join("blobs/deadbeef.incomplete").exists());
    assert!(!repo.join("blobs/0000orphan").exists());
    assert!(
        !repo.join("snapshots").join(c(2)).exists(),
        "detached revision removed"
    );
    assert!(
        std::fs::symlink_metadata(repo.join("snapshots").join(c(1)).join("gone.json")).is_err()
    );
    assert!(!hub.join("models--org--empty").exists());
    // What is in use stays.
    assert_eq!(
        std::fs::read(repo.join("snapshots").join(c(1)).join("b.bin")).unwrap(),
        b"0123456789"
    );
    let again = daemon
        .call("cache.clean", json!({"detached": true}))
        .unwrap();
    assert_eq!(again["actions"].as_array().unwrap().len(), 0, "{again}");
}

/// `org/m` with revisions `main` (c(1)) and `v2` (c(2)) in the daemon's
/// HF cache, both linking one blob `w.bin`; returns the repo dir and the
/// shared bytes.
fn two_revisions_sharing_a_blob(daemon: &Daemon) -> (PathBuf, Vec<u8>) {
    let hub = daemon.hf_cache();
    let shared = vec![5u8; 1000];
    let repo = write_revision(
        &hub,
        "org/m",
        &c(1),
        &["main"],
        &[("w.bin", &shared), ("one.json", b"1")],
    );
    write_revision(
        &hub,
        "org/m",
        &c(2),
        &["v2"],
        &[("w.bin", &shared), ("two.json", b"22")],
    );
    (repo, shared)
}

#[test]
fn rm_revision_keeps_shared_blobs_and_is_refused_while_loaded() {
    let daemon = Daemon::start();
    let (repo, shared) = two_revisions_sharing_a_blob(&daemon);
    let hub = daemon.hf_cache();

    let plan = daemon
        .call("cache.rm", json!({"repo": "org/m", "revision": "v2"}))
        .unwrap();
    assert_eq!(plan["applied"], false);
    assert_eq!(
        plan["freed_bytes"], 2,
        "only the blob no other revision uses"
    );
    daemon
        .call(
            "cache.rm",
            json!({"repo": "org/m", "revision": "v2", "apply": true}),
        )
        .unwrap();
    assert!(!repo.join("snapshots").join(c(2)).exists());
    assert!(!repo.join("refs/v2").exists());
    assert_eq!(
        std::fs::read(repo.join("snapshots").join(c(1)).join("w.bin")).unwrap(),
        shared
    );

    let err = daemon
        .call("cache.rm", json!({"repo": "org/nothing"}))
        .unwrap_err();
    assert_eq!(kind(&err), "not_found");
    let err = daemon
        .call("cache.rm", json!({"repo": "../etc"}))
        .unwrap_err();
    assert_eq!(kind(&err), "invalid_params");

    // A loaded model's repo cannot be removed.
    let fixture = fixtures_dir().join("tiny-qwen2");
    let files = fixture_files(&fixture);
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    write_revision(&hub, "org/qwen", &c(3), &["main"], &refs);
    daemon
        .call(
            "models.register",
            json!({"name": "qwen", "repo": "org/qwen"}),
        )
        .unwrap();
    daemon.call("load", json!({"name": "qwen"})).unwrap();
    let err = daemon
        .call("cache.rm", json!({"repo": "org/qwen", "apply": true}))
        .unwrap_err();
    assert_eq!(kind(&err), "in_use");
    daemon.call("unload", json!({"name": "qwen"})).unwrap();
    let done = daemon
        .call("cache.rm", json!({"repo": "org/qwen", "apply": true}))
        .unwrap();
    assert!(done["freed_bytes"].as_u64().unwrap() > 400_000);
    assert!(!hub.join("models--org--qwen").exists());
}

/// Every file below `dir`, with its bytes, not following links.
fn files_below(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            out.extend(files_below(&entry.path()));
        } else if kind.is_file() {
            out.push((entry.path(), std::fs::read(entry.path()).unwrap()));
        }
    }
    out.sort();
    out
}

/// A folder outside every root that looks like repo parts: orphan-looking
/// blobs, a partial download, a detached snapshot and a ref.
fn victim(dir: &Path) {
    std::fs::create_dir_all(dir.join(c(9))).unwrap();
    std::fs::write(dir.join("deadbeef"), b"precious").unwrap();
    std::fs::write(dir.join("x.incomplete"), b"partial").unwrap();
    std::fs::write(dir.join(c(9)).join("config.json"), b"{}").unwrap();
    std::fs::write(dir.join("main"), c(9)).unwrap();
}

#[test]
fn clean_and_rm_never_follow_planted_symlinks_out_of_the_root() {
    let daemon = Daemon::start();
    let hub = daemon.hf_cache();
    let outside = daemon.dir.path().join("outside");
    // A real repo with an orphan blob, so the clean has work to do.
    let ok = write_revision(&hub, "org/ok", &c(1), &["main"], &[("a.json", b"1")]);
    std::fs::write(ok.join("blobs/orphan"), b"orphan").unwrap();
    let mut planted = Vec::new();
    for (repo, part) in [("b", "blobs"), ("s", "snapshots"), ("r", "refs"), ("x", "")] {
        victim(&outside.join(repo));
        let repo_dir = hub.join(format!("models--org--{repo}"));
        let link = if part.is_empty() {
            repo_dir
        } else {
            std::fs::create_dir_all(&repo_dir).unwrap();
            repo_dir.join(part)
        };
        std::os::unix::fs::symlink(outside.join(repo), &link).unwrap();
        planted.push(link);
    }
    let before = files_below(&outside);

    let dry = daemon
        .call("cache.clean", json!({"detached": true}))
        .unwrap();
    for action in dry["actions"].as_array().unwrap() {
        let path = PathBuf::from(action["path"].as_str().unwrap());
        assert!(
            !planted.iter().any(|link| path.starts_with(link)),
            "the plan goes through a planted link: {action}"
        );
    }
    assert_eq!(dry["skipped"].as_array().unwrap().len(), 4, "{dry}");
    daemon
        .call("cache.clean", json!({"detached": true, "apply": true}))
        .unwrap();
    assert!(!ok.join("blobs/orphan").exists(), "real orphans still go");
    for repo in ["org/x", "org/b", "org/s"] {
        let _ = daemon.call("cache.rm", json!({"repo": repo, "apply": true}));
    }
    assert_eq!(
        files_below(&outside),
        before,
        "nothing outside the root changed"
    );
}

#[test]
fn consolidate_never_merges_files_of_different_owners() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to give a file to another uid");
        return;
    }
    let daemon = Daemon::start();
    let weights = vec![7u8; 30_000];
    let shared = write_revision(
        &daemon.hf_cache(),
        "org/shared",
        &c(1),
        &["main"],
        &[("model.safetensors", &weights)],
    );
    // The other user's cache sorts before the shared one, so a keep chosen
    // by path alone would be theirs.
    let theirs_root = daemon.dir.path().join("a-theirs");
    let theirs = write_revision(
        &theirs_root,
        "org/copy",
        &c(2),
        &["main"],
        &[("model.safetensors", &weights)],
    );
    let sha = hex::encode(Sha256::digest(&weights));
    std::os::unix::fs::chown(theirs.join("blobs").join(&sha), Some(65534), Some(65534)).unwrap();
    daemon
        .call(
            "models.register",
            json!({"name": "theirs", "repo": "org/copy",
                   "cache": format!("custom:{}", theirs_root.display())}),
        )
        .unwrap();
    let blob = shared.join("blobs").join(&sha);
    let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
    let (shared_ino, their_ino) = (ino(&blob), ino(&theirs.join("blobs").join(&sha)));

    let plan = daemon
        .call("cache.consolidate", json!({"apply": true}))
        .unwrap();
    let methods: Vec<&Value> = plan["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| &a["method"])
        .collect();
    assert!(methods.iter().all(|m| *m == "skip"), "{plan}");
    assert!(plan["skipped"].to_string().contains("owned by"), "{plan}");
    assert_eq!(ino(&blob), shared_ino);
    assert_eq!(ino(&theirs.join("blobs").join(&sha)), their_ino);
    assert_eq!(std::fs::metadata(&blob).unwrap().uid(), 0);
}

#[test]
fn system_folders_are_refused_as_cache_roots() {
    let daemon = Daemon::start();
    for root in ["/", "/proc", "/etc/modeld", "/sys/x"] {
        let err = daemon
            .call(
                "models.register",
                json!({"name": "m", "repo": "org/m", "cache": format!("custom:{root}")}),
            )
            .unwrap_err();
        assert_eq!(kind(&err), "invalid_params", "{root}: {err:?}");
        let modeld_wire::ClientError::Rpc(rpc) = &err else {
            panic!("{err:?}")
        };
        assert_eq!(rpc.data.as_ref().unwrap()["field"], "cache", "{root}");
    }
}

#[test]
fn duplicates_cover_registered_local_paths() {
    let daemon = Daemon::start_configured(&format!("[cache]\n{SMALL_LINKS}"), &[]);
    let weights = vec![9u8; 20_000];
    let gguf = vec![4u8; 10_000];
    let cached = write_revision(
        &daemon.hf_cache(),
        "org/m",
        &c(1),
        &["main"],
        &[("model.safetensors", &weights), ("m.gguf", &gguf)],
    );
    let local = daemon.dir.path().join("my-models/m");
    std::fs::create_dir_all(&local).unwrap();
    std::fs::write(local.join("model.safetensors"), &weights).unwrap();
    let single = daemon.dir.path().join("my-models/single.gguf");
    std::fs::write(&single, &gguf).unwrap();
    for (name, path) in [("local", &local), ("single", &single)] {
        daemon
            .call("models.register", json!({"name": name, "local_path": path}))
            .unwrap();
    }
    let found = daemon.call("cache.duplicates", json!({})).unwrap();
    let copies = found.to_string();
    assert!(copies.contains("my-models/m/model.safetensors"), "{found}");
    assert!(copies.contains("single.gguf"), "{found}");
    let plan = daemon
        .call("cache.consolidate", json!({"apply": true}))
        .unwrap();
    assert_eq!(plan["actions"].as_array().unwrap().len(), 2, "{plan}");
    let blob = |bytes: &[u8]| {
        cached
            .join("blobs")
            .join(hex::encode(Sha256::digest(bytes)))
    };
    let weights_copy = local.join("model.safetensors");
    let method = method_of(&plan, &weights_copy);
    assert_consolidated(&method, &blob(&weights), &weights_copy);
    assert_consolidated(&method_of(&plan, &single), &blob(&gguf), &single);
}

fn actions(plan: &Value) -> Vec<(String, PathBuf)> {
    plan["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let path = PathBuf::from(a["path"].as_str().unwrap());
            (a["action"].as_str().unwrap().to_string(), path)
        })
        .collect()
}

#[test]
fn rm_purge_plans_then_deletes_only_the_models_own_files() {
    let daemon = Daemon::start();
    let (repo, shared) = two_revisions_sharing_a_blob(&daemon);
    for (name, revision) in [("one", "main"), ("two", "v2"), ("twin", "v2")] {
        daemon
            .call(
                "models.register",
                json!({"name": name, "repo": "org/m", "revision": revision}),
            )
            .unwrap();
    }
    let blob = |bytes: &[u8]| repo.join("blobs").join(hex::encode(Sha256::digest(bytes)));

    // A dry run: the plan, and nothing changed.
    let reply = daemon
        .call("models.remove", json!({"name": "one", "purge": true}))
        .unwrap();
    assert!(reply["removed"].is_null(), "{reply}");
    let plan = &reply["plan"];
    assert_eq!(plan["applied"], false);
    assert_eq!(
        actions(plan),
        [
            ("remove_revision".into(), repo.join("snapshots").join(c(1))),
            ("remove_ref".into(), repo.join("refs/main")),
            ("remove_blob".into(), blob(b"1")),
        ]
    );
    assert_eq!(plan["freed_bytes"], 1, "the shared blob stays");
    assert!(repo.join("snapshots").join(c(1)).exists());
    daemon.call("models.get", json!({"name": "one"})).unwrap();

    // Applied: exactly that, then the registration goes.
    let reply = daemon
        .call(
            "models.remove",
            json!({"name": "one", "purge": true, "apply": true}),
        )
        .unwrap();
    assert_eq!(reply["removed"]["name"], "one");
    assert_eq!(reply["plan"]["applied"], true);
    assert!(!repo.join("snapshots").join(c(1)).exists());
    assert!(!repo.join("refs/main").exists() && !blob(b"1").exists());
    assert_eq!(
        std::fs::read(repo.join("snapshots").join(c(2)).join("w.bin")).unwrap(),
        shared
    );
    let err = daemon
        .call("models.get", json!({"name": "one"}))
        .unwrap_err();
    assert_eq!(kind(&err), "not_found");

    // Another registered model uses the same revision: its files stay.
    let reply = daemon
        .call(
            "models.remove",
            json!({"name": "two", "purge": true, "apply": true}),
        )
        .unwrap();
    assert!(actions(&reply["plan"]).is_empty(), "{reply}");
    let skipped = reply["plan"]["skipped"][0].as_str().unwrap();
    assert!(skipped.contains("twin"), "{skipped}");
    assert!(repo.join("snapshots").join(c(2)).exists());

    // The last model of the repo takes the whole repo directory with it,
    // through modelctl: a dry run first.
    let out = daemon.ctl(&["rm", "twin", "--purge"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("remove_repo") && text.contains("dry run"),
        "{text}"
    );
    assert!(repo.exists());
    let out = daemon.ctl(&["rm", "twin", "--purge", "--apply"]);
    assert!(out.status.success());
    assert!(!repo.exists());
    assert!(daemon.call("models.get", json!({"name": "twin"})).is_err());

    // apply means nothing without purge.
    daemon
        .call("models.register", json!({"name": "x", "repo": "org/x"}))
        .unwrap();
    let err = daemon
        .call("models.remove", json!({"name": "x", "apply": true}))
        .unwrap_err();
    assert_eq!(kind(&err), "invalid_params");
    let modeld_wire::ClientError::Rpc(obj) = &err else {
        panic!()
    };
    assert_eq!(obj.data.as_ref().unwrap()["field"], "apply");
}

#[test]
fn rm_purge_never_deletes_a_local_path_and_waits_for_unload() {
    let daemon = Daemon::start();
    let local = daemon.register_fixture("tiny-llama");
    let reply = daemon
        .call(
            "models.remove",
            json!({"name": "tiny-llama", "purge": true, "apply": true}),
        )
        .unwrap();
    assert!(actions(&reply["plan"]).is_empty(), "{reply}");
    let skipped = reply["plan"]["skipped"][0].as_str().unwrap();
    assert!(
        skipped.contains(&local.display().to_string()) && skipped.contains("local_path"),
        "{skipped}"
    );
    assert!(local.join("model.safetensors").exists());
    assert!(daemon
        .call("models.get", json!({"name": "tiny-llama"}))
        .is_err());

    // Loaded from the cache: refused until unloaded.
    let hub = daemon.hf_cache();
    let files = fixture_files(&fixtures_dir().join("tiny-qwen2"));
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    let repo = write_revision(&hub, "org/qwen", &c(3), &["main"], &refs);
    daemon
        .call(
            "models.register",
            json!({"name": "qwen", "repo": "org/qwen"}),
        )
        .unwrap();
    daemon.call("load", json!({"name": "qwen"})).unwrap();
    let err = daemon
        .call(
            "models.remove",
            json!({"name": "qwen", "purge": true, "apply": true}),
        )
        .unwrap_err();
    assert_eq!(kind(&err), "in_use", "{err}");
    assert!(repo.exists());
    daemon.call("models.get", json!({"name": "qwen"})).unwrap();
    daemon.call("unload", json!({"name": "qwen"})).unwrap();
    let reply = daemon
        .call(
            "models.remove",
            json!({"name": "qwen", "purge": true, "apply": true}),
        )
        .unwrap();
    assert!(reply["plan"]["freed_bytes"].as_u64().unwrap() > 400_000);
    assert!(!repo.exists());
}

#[test]
fn a_comfyui_file_identical_to_a_cache_blob_is_a_duplicate() {
    let daemon = Daemon::start_configured(&format!("[cache]\n{SMALL_LINKS}"), &[]);
    let weights = vec![7u8; 30_000];
    let cached = write_revision(
        &daemon.hf_cache(),
        "black-forest-labs/FLUX.1-dev",
        &c(2),
        &["main"],
        &[("ae.safetensors", &weights)],
    );
    let tree = daemon.dir.path().join("ComfyUI/models");
    std::fs::create_dir_all(tree.join("vae")).unwrap();
    let copy = tree.join("vae/ae.safetensors");
    std::fs::write(&copy, &weights).unwrap();
    let modes = format!("model_root = \"{}\"\n", tree.display());
    std::fs::write(daemon.dir.path().join("modes.toml"), modes).unwrap();
    daemon.call("modes.reload", json!({})).unwrap();
    let found = daemon.call("cache.duplicates", json!({})).unwrap();
    assert!(
        found
            .to_string()
            .contains("ComfyUI/models/vae/ae.safetensors"),
        "{found}"
    );
    let plan = daemon
        .call("cache.consolidate", json!({"apply": true}))
        .unwrap();
    let blob = cached
        .join("blobs")
        .join(hex::encode(Sha256::digest(&weights)));
    // The tree's copy is a link to the blob, or a clone of it.
    assert_consolidated(&method_of(&plan, &copy), &blob, &copy);
}

#[test]
fn consolidate_links_big_weights_and_never_text_files() {
    let daemon = Daemon::start();
    let model_root = daemon.dir.path().join("models");
    // Over the default consolidate_min_bytes (1 MiB).
    let big: Vec<u8> = (0..(2u32 << 20)).map(|i| (i % 251) as u8).collect();
    let small = vec![5u8; 30_000];
    for dir in ["a", "b"] {
        let dir = model_root.join(dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("README.md"), b"# notes\n").unwrap();
        std::fs::write(dir.join(".env"), b"TOKEN=x\n").unwrap();
        std::fs::write(dir.join("model.safetensors"), &big).unwrap();
        std::fs::write(dir.join("small.safetensors"), &small).unwrap();
    }
    let modes = format!("model_root = \"{}\"\n", model_root.display());
    std::fs::write(daemon.dir.path().join("modes.toml"), modes).unwrap();
    daemon.call("modes.reload", json!({})).unwrap();
    let found = daemon.call("cache.duplicates", json!({})).unwrap();
    assert_eq!(found["groups"].as_array().unwrap().len(), 4, "{found}");

    // The dry run says the method of each copy, or why it stays.
    let dry = daemon.call("cache.consolidate", json!({})).unwrap();
    for text in ["README.md", ".env"] {
        let action = action_for(&dry, &model_root.join("b").join(text));
        assert_eq!(action["method"], "skip", "{action}");
        assert!(
            action["reason"].as_str().unwrap().contains("text"),
            "{action}"
        );
    }
    let weights = model_root.join("b/model.safetensors");
    let method = action_for(&dry, &weights)["method"].clone();
    assert!(method == "hardlink" || method == "reflink", "{dry}");
    // Under consolidate_min_bytes: never hard-linked.
    let small_action = action_for(&dry, &model_root.join("b/small.safetensors"));
    let small_freed = match small_action["method"].as_str().unwrap() {
        "reflink" => small.len() as u64,
        "skip" => {
            let reason = small_action["reason"].as_str().unwrap();
            assert!(reason.contains("consolidate_min_bytes"), "{small_action}");
            0
        }
        other => panic!("a small weight file was planned as {other}"),
    };

    let done = daemon
        .call("cache.consolidate", json!({"apply": true}))
        .unwrap();
    assert_eq!(action_for(&done, &weights)["method"], method, "{done}");
    assert_consolidated(
        method.as_str().unwrap(),
        &model_root.join("a/model.safetensors"),
        &weights,
    );
    assert_eq!(
        done["freed_bytes"],
        big.len() as u64 + small_freed,
        "{done}"
    );
    for text in ["README.md", ".env"] {
        let (a, b) = (
            model_root.join("a").join(text),
            model_root.join("b").join(text),
        );
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        assert_ne!(ino(&a), ino(&b), "{text} was linked");
        std::fs::write(&a, b"edited\n").unwrap();
        assert_ne!(std::fs::read(&b).unwrap(), b"edited\n", "{text} aliased");
    }
}
