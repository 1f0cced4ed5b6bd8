//! `cache.consolidate`: keeps one copy of each group of duplicates and
//! replaces the others with copy-on-write clones of it where the file
//! system can clone (`FICLONE`: no aliasing at all), or else with hard
//! links, but only between weight files and cache blobs of at least
//! `cache.consolidate_min_bytes`, which nobody edits in place. Config and
//! text files are never merged: a link between two `.env` files would
//! carry an edit of one into the other. The plan names each copy's method,
//! or why it stays.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use modeld_wire::types::{CacheAction, CachePlan, DuplicateGroup, DuplicatesReply};

use super::confined::{is_clone_unsupported, RootHandles};
use super::dupes::{in_blobs, sha256_file};
use super::Root;

/// How a duplicate copy is (or would be) consolidated into the kept one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// A copy-on-write clone of the kept file: a file of its own that
    /// shares the kept file's blocks, so nothing is aliased.
    Reflink,
    /// A second name of the kept file's inode: a write through either name
    /// changes both, so only files nobody edits in place are linked.
    Hardlink,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Reflink => "reflink",
            Method::Hardlink => "hardlink",
        }
    }
}

/// What `cache.consolidate` may hard-link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Weight files and cache blobs smaller than this are not hard-linked
    /// (`cache.consolidate_min_bytes`); clones have no such floor.
    pub min_link_bytes: u64,
}

/// What a duplicate is, told by its name (a blob by its place in a cache).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Model weights or a Hugging Face cache blob: written whole, never
    /// edited in place, so two names for one inode harm nobody.
    Weights,
    /// Configs and text (json, md, .env, ...): edited in place, where an
    /// alias would carry the edit into an unrelated copy. Never merged.
    Text,
    /// Anything else: cloned where the file system can, never hard-linked.
    Other,
}

const WEIGHT_EXTENSIONS: [&str; 7] = ["safetensors", "gguf", "bin", "pt", "pth", "ckpt", "onnx"];

const TEXT_EXTENSIONS: [&str; 24] = [
    "json", "jsonl", "txt", "md", "markdown", "rst", "toml", "yaml", "yml", "ini", "cfg", "conf",
    "env", "py", "sh", "jinja", "j2", "xml", "html", "csv", "tsv", "js", "ts", "lock",
];

/// Text files that are often written without an extension.
const TEXT_NAMES: [&str; 7] = [
    "readme",
    "license",
    "licence",
    "notice",
    "copying",
    "makefile",
    "dockerfile",
];

fn kind_of(path: &Path, roots: &[Root]) -> Kind {
    if in_blobs(path) && innermost_root(path, roots).is_some_and(Root::is_hf_cache) {
        return Kind::Weights;
    }
    let lower = |s: &std::ffi::OsStr| s.to_string_lossy().to_ascii_lowercase();
    let name = path.file_name().map(lower).unwrap_or_default();
    let extension = path.extension().map(lower).unwrap_or_default();
    // A dotfile (`.env`, `.gitattributes`) is configuration.
    if name.starts_with('.') || TEXT_EXTENSIONS.contains(&extension.as_str()) {
        return Kind::Text;
    }
    if WEIGHT_EXTENSIONS.contains(&extension.as_str()) {
        return Kind::Weights;
    }
    match TEXT_NAMES.contains(&name.as_str()) {
        true => Kind::Text,
        false => Kind::Other,
    }
}

fn innermost_root<'a>(path: &Path, roots: &'a [Root]) -> Option<&'a Root> {
    roots
        .iter()
        .filter(|root| path.starts_with(&root.path))
        .max_by_key(|root| root.path.as_os_str().len())
}

/// How a copy of `size` bytes is consolidated, given what both files are
/// and whether their file system clones; otherwise why it stays.
fn choose(kinds: [Kind; 2], size: u64, clones: bool, policy: &Policy) -> Result<Method, String> {
    if kinds.contains(&Kind::Text) {
        return Err("a config or text file: edited in place, so never consolidated".into());
    }
    if clones {
        return Ok(Method::Reflink);
    }
    if kinds.contains(&Kind::Other) {
        return Err(
            "not a model weight file or cache blob: without reflinks only those are hard-linked"
                .into(),
        );
    }
    if size < policy.min_link_bytes {
        return Err(format!(
            "{size} bytes, under cache.consolidate_min_bytes ({}): without reflinks only larger weight files are hard-linked",
            policy.min_link_bytes
        ));
    }
    Ok(Method::Hardlink)
}

/// Replaces each duplicate with a clone of the kept copy where the file
/// system can clone, else with a hard link if both are weight files or
/// blobs of at least `policy.min_link_bytes`; config and text files are
/// never merged. A dry run only reports the method of each copy (or why it
/// stays); applying re-hashes both files first and skips any that changed,
/// that a loaded model uses, that live on another file system, or whose
/// owner or permissions differ from the kept copy's. Every change is made
/// through [`RootHandles`], so no symlink can move it outside the roots.
pub fn consolidate(
    found: &DuplicatesReply,
    roots: &[Root],
    protected: &HashSet<PathBuf>,
    policy: Policy,
    apply: bool,
) -> CachePlan {
    let mut plan = super::empty_plan(apply);
    let mut consolidator = Consolidator {
        roots,
        protected,
        policy,
        apply,
        handles: RootHandles::new(roots.iter().map(|r| r.path.as_path())),
        clones: HashMap::new(),
    };
    let mut freed_inodes = HashSet::new();
    for group in &found.groups {
        let keep = std::fs::symlink_metadata(&group.keep).map_err(|_| {
            format!(
                "the kept copy {} is gone since the scan",
                group.keep.display()
            )
        });
        for copy in &group.copies {
            let outcome = keep
                .as_ref()
                .map_err(Clone::clone)
                .and_then(|keep| consolidator.copy(group, keep, copy));
            let (method, bytes, reason) = match outcome {
                Ok((method, meta)) => {
                    // Aliases of one inode free its bytes once, with the last name.
                    let first = freed_inodes.insert((meta.dev(), meta.ino()));
                    (
                        method.name(),
                        if first { group.size_bytes } else { 0 },
                        None,
                    )
                }
                Err(why) => {
                    plan.skipped.push(format!("{}: {why}", copy.display()));
                    ("skip", 0, Some(why))
                }
            };
            plan.freed_bytes += bytes;
            plan.actions.push(CacheAction {
                action: "consolidate".into(),
                path: copy.clone(),
                target: Some(group.keep.clone()),
                bytes,
                method: Some(method.into()),
                reason,
            });
        }
    }
    plan
}

/// One consolidation run: its limits, the roots' handles, and what is
/// known of each file system's clones.
struct Consolidator<'a> {
    roots: &'a [Root],
    protected: &'a HashSet<PathBuf>,
    policy: Policy,
    apply: bool,
    handles: RootHandles,
    /// Whether each file system (by device) clones, once tried.
    clones: HashMap<u64, bool>,
}

impl Consolidator<'_> {
    /// What becomes of `copy`: the method used (in a dry run, the one that
    /// would be) and its metadata before, or why it stays as it is.
    fn copy(
        &mut self,
        group: &DuplicateGroup,
        keep: &std::fs::Metadata,
        copy: &Path,
    ) -> Result<(Method, std::fs::Metadata), String> {
        let meta = linkable(copy, keep, self.protected)?;
        let kinds = [kind_of(&group.keep, self.roots), kind_of(copy, self.roots)];
        let clones = !kinds.contains(&Kind::Text) && self.clones(keep.dev(), &group.keep, copy);
        let method = choose(kinds, group.size_bytes, clones, &self.policy)?;
        if !self.apply {
            return Ok((method, meta));
        }
        verify_unchanged(&group.keep, copy, &group.sha256)?;
        let done = self.carry_out(method, kinds, group, copy, keep.dev())?;
        Ok((done, meta))
    }

    /// Whether the file system holding `keep` and `copy` clones; probed
    /// once per device.
    fn clones(&mut self, dev: u64, keep: &Path, copy: &Path) -> bool {
        if let Some(known) = self.clones.get(&dev) {
            return *known;
        }
        let probed = self
            .handles
            .pair(keep, copy)
            .and_then(|(keep_root, copy_root)| copy_root.can_clone(keep_root, keep, copy));
        match probed {
            Ok(clones) => {
                self.clones.insert(dev, clones);
                clones
            }
            // A failed probe (an unreadable file, a planted link) says
            // nothing of the file system; the next pair probes again.
            Err(_) => false,
        }
    }

    /// Replaces `copy` by `method`. A clone the file system refuses after
    /// all falls back to a hard link, where the policy allows one.
    fn carry_out(
        &mut self,
        method: Method,
        kinds: [Kind; 2],
        group: &DuplicateGroup,
        copy: &Path,
        dev: u64,
    ) -> Result<Method, String> {
        let (keep_root, copy_root) = self
            .handles
            .pair(&group.keep, copy)
            .map_err(|e| e.to_string())?;
        let method = match method {
            Method::Reflink => match copy_root.replace_with_clone(keep_root, &group.keep, copy) {
                Ok(()) => return Ok(Method::Reflink),
                Err(err) if is_clone_unsupported(&err) => {
                    self.clones.insert(dev, false);
                    choose(kinds, group.size_bytes, false, &self.policy)?
                }
                Err(err) => return Err(err.to_string()),
            },
            Method::Hardlink => Method::Hardlink,
        };
        copy_root
            .replace_with_link(keep_root, &group.keep, copy)
            .map_err(|e| e.to_string())?;
        Ok(method)
    }
}

/// Whether `copy` may be replaced by the kept file's bytes; if not, why.
fn linkable(
    copy: &Path,
    keep: &std::fs::Metadata,
    protected: &HashSet<PathBuf>,
) -> Result<std::fs::Metadata, String> {
    if copy
        .canonicalize()
        .is_ok_and(|real| protected.contains(&real))
    {
        return Err("used by a loaded model".into());
    }
    let meta = std::fs::symlink_metadata(copy).map_err(|_| "gone since the scan".to_string())?;
    if !meta.is_file() || !keep.is_file() {
        return Err("not a regular file any more".into());
    }
    if meta.dev() != keep.dev() {
        return Err("on another file system than the kept copy".into());
    }
    if (meta.uid(), meta.gid()) != (keep.uid(), keep.gid()) {
        return Err(format!(
            "owned by {}:{}, the kept copy by {}:{}; files of different owners are never merged",
            meta.uid(),
            meta.gid(),
            keep.uid(),
            keep.gid()
        ));
    }
    if meta.mode() & 0o7777 != keep.mode() & 0o7777 {
        return Err(format!(
            "mode {:o} differs from the kept copy's {:o}",
            meta.mode() & 0o7777,
            keep.mode() & 0o7777
        ));
    }
    Ok(meta)
}

/// Checks that `keep` and `copy` both still hash to `sha256`.
fn verify_unchanged(keep: &Path, copy: &Path, sha256: &str) -> Result<(), String> {
    for path in [keep, copy] {
        let hash = sha256_file(path).map_err(|e| e.to_string())?;
        if hash != sha256 {
            return Err("changed since the scan".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::caches::dupes::duplicates;

    const POLICY: Policy = Policy {
        min_link_bytes: 64 << 10,
    };

    fn root(path: &Path, role: &'static str) -> Root {
        Root {
            path: path.to_path_buf(),
            role,
        }
    }

    #[test]
    fn kinds_tell_weights_from_text() {
        let roots = [
            root(Path::new("/hf"), "primary"),
            root(Path::new("/models"), "model_root"),
        ];
        let kind = |path: &str| kind_of(Path::new(path), &roots);
        for weights in [
            "/models/a/model.safetensors",
            "/models/b.GGUF",
            "/models/c/pytorch_model.bin",
            "/models/d.ckpt",
            "/models/e.onnx",
            "/hf/models--org--m/blobs/0123abcd",
        ] {
            assert_eq!(kind(weights), Kind::Weights, "{weights}");
        }
        for text in [
            "/models/a/README.md",
            "/models/a/.env",
            "/models/a/.env.local",
            "/models/a/config.json",
            "/models/a/notes.TXT",
            "/models/a/LICENSE",
            "/models/a/settings.yaml",
            "/models/a/run.py",
        ] {
            assert_eq!(kind(text), Kind::Text, "{text}");
        }
        assert_eq!(kind("/models/a/preview.png"), Kind::Other);
        // A folder named `blobs` outside a Hugging Face cache holds nothing
        // immutable.
        assert_eq!(kind("/models/blobs/0123abcd"), Kind::Other);
    }

    #[test]
    fn the_method_follows_kind_size_and_clones() {
        let big = POLICY.min_link_bytes;
        let weights = [Kind::Weights, Kind::Weights];
        assert_eq!(choose(weights, big, false, &POLICY), Ok(Method::Hardlink));
        assert_eq!(choose(weights, big, true, &POLICY), Ok(Method::Reflink));
        assert_eq!(choose(weights, 10, true, &POLICY), Ok(Method::Reflink));
        let small = choose(weights, big - 1, false, &POLICY).unwrap_err();
        assert!(
            small.contains("cache.consolidate_min_bytes (65536)"),
            "{small}"
        );
        for kinds in [[Kind::Text, Kind::Text], [Kind::Weights, Kind::Text]] {
            for clones in [false, true] {
                let why = choose(kinds, big, clones, &POLICY).unwrap_err();
                assert!(why.contains("text file"), "{why}");
            }
        }
        let other = [Kind::Other, Kind::Weights];
        assert_eq!(choose(other, big, true, &POLICY), Ok(Method::Reflink));
        let why = choose(other, big, false, &POLICY).unwrap_err();
        assert!(why.contains("not a model weight file"), "{why}");
    }

    /// Two model folders with the same README, `.env`, big and small
    /// weights, under a model root; returns the root's folder.
    fn two_copies(dir: &Path) -> PathBuf {
        let models = dir.join("models");
        let big: Vec<u8> = (0..POLICY.min_link_bytes as u32 * 2)
            .map(|i| (i % 251) as u8)
            .collect();
        for name in ["a", "b"] {
            let folder = models.join(name);
            std::fs::create_dir_all(&folder).unwrap();
            std::fs::write(folder.join("README.md"), b"# same\n").unwrap();
            std::fs::write(folder.join(".env"), b"KEY=1\n").unwrap();
            std::fs::write(folder.join("model.safetensors"), &big).unwrap();
            std::fs::write(folder.join("small.bin"), [3u8; 5000]).unwrap();
        }
        models
    }

    /// The method (or `skip`) and reason of `path`'s action.
    fn planned(plan: &CachePlan, path: &Path) -> (String, Option<String>) {
        let action = plan
            .actions
            .iter()
            .find(|a| a.path == path)
            .unwrap_or_else(|| panic!("no action for {}: {plan:?}", path.display()));
        assert_eq!(action.action, "consolidate");
        (action.method.clone().unwrap(), action.reason.clone())
    }

    fn ino(path: &Path) -> u64 {
        std::fs::metadata(path).unwrap().ino()
    }

    #[test]
    fn a_dry_run_names_each_method_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let models = two_copies(dir.path());
        let roots = [root(&models, "model_root")];
        let found = duplicates(&roots);
        assert_eq!(found.groups.len(), 4, "text files are still reported");
        let inodes = || {
            ["README.md", ".env", "model.safetensors", "small.bin"]
                .map(|name| ino(&models.join("b").join(name)))
        };
        let before = inodes();
        let plan = consolidate(&found, &roots, &HashSet::new(), POLICY, false);
        for text in ["README.md", ".env"] {
            let (method, reason) = planned(&plan, &models.join("b").join(text));
            assert_eq!(method, "skip");
            assert!(reason.unwrap().contains("text file"));
        }
        let (method, _) = planned(&plan, &models.join("b/model.safetensors"));
        assert!(method == "hardlink" || method == "reflink", "{method}");
        let (small, reason) = planned(&plan, &models.join("b/small.bin"));
        match small.as_str() {
            "reflink" => {}
            "skip" => assert!(reason.unwrap().contains("consolidate_min_bytes")),
            other => panic!("a small weight file planned as {other}"),
        }
        assert_eq!(inodes(), before);
        assert_eq!(
            plan.skipped.len(),
            plan.actions
                .iter()
                .filter(|a| a.method.as_deref() == Some("skip"))
                .count()
        );
    }

    #[test]
    fn applying_links_big_weights_and_leaves_text_files_apart() {
        let dir = tempfile::tempdir().unwrap();
        let models = two_copies(dir.path());
        let roots = [root(&models, "model_root")];
        let found = duplicates(&roots);
        let plan = consolidate(&found, &roots, &HashSet::new(), POLICY, true);
        let (a, b) = (models.join("a"), models.join("b"));
        let (method, _) = planned(&plan, &b.join("model.safetensors"));
        match method.as_str() {
            "hardlink" => assert_eq!(
                ino(&a.join("model.safetensors")),
                ino(&b.join("model.safetensors"))
            ),
            "reflink" => assert_ne!(
                ino(&a.join("model.safetensors")),
                ino(&b.join("model.safetensors"))
            ),
            other => panic!("weights were not consolidated: {other}"),
        }
        for text in ["README.md", ".env"] {
            assert_ne!(ino(&a.join(text)), ino(&b.join(text)), "{text}");
        }
        std::fs::write(a.join(".env"), b"KEY=2\n").unwrap();
        assert_eq!(std::fs::read(b.join(".env")).unwrap(), b"KEY=1\n");
        let freed: u64 = plan.actions.iter().map(|a| a.bytes).sum();
        assert_eq!(plan.freed_bytes, freed);
        assert!(plan.freed_bytes >= POLICY.min_link_bytes * 2, "{plan:?}");
    }

    #[test]
    fn nothing_outside_the_roots_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let models = two_copies(dir.path());
        let outside = dir.path().join("outside.safetensors");
        std::fs::copy(models.join("a/model.safetensors"), &outside).unwrap();
        let roots = [root(&models, "model_root")];
        let mut found = duplicates(&roots);
        let group = found
            .groups
            .iter_mut()
            .find(|g| g.keep.ends_with("a/model.safetensors"))
            .unwrap();
        group.copies = vec![outside.clone()];
        let before = ino(&outside);
        let plan = consolidate(&found, &roots, &HashSet::new(), POLICY, true);
        let (method, reason) = planned(&plan, &outside);
        assert_eq!(method, "skip", "{plan:?}");
        assert!(
            reason.unwrap().contains("not a plain path below"),
            "{plan:?}"
        );
        assert_eq!(ino(&outside), before);
    }
}
