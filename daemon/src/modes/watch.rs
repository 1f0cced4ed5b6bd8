//! Reloads the modes when the file's content changes. Only events that
//! can change it count (a write closed, a create, a rename, a removal),
//! never reads, which the reload itself causes; they are debounced, since
//! editors save in several steps, and a reload whose bytes hash like the
//! last ones read changes nothing. The reload itself is the caller's
//! closure, so the modes never import the state that holds them.

use std::ffi::OsString;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};

/// How long the file must stay untouched before it is read.
const QUIET: Duration = Duration::from_millis(250);

/// Watches the modes file's directory (so saves that replace the file by
/// rename are seen) and calls `reload` after each burst of changes. Keep
/// the returned watcher alive; dropping it ends the reload thread.
pub fn watch(file: &Path, reload: impl Fn() + Send + 'static) -> Option<RecommendedWatcher> {
    let dir = file.parent()?.to_path_buf();
    let name = file.file_name()?.to_os_string();
    if !dir.is_dir() {
        tracing::info!(dir = %dir.display(), "not watching for modes changes: no such directory");
        return None;
    }
    let (changes, changed) = mpsc::channel();
    let on_event = move |result: notify::Result<notify::Event>| {
        if result.is_ok_and(|event| may_change(&event, &name)) {
            let _ = changes.send(());
        }
    };
    let mut watcher = notify::recommended_watcher(on_event)
        .map_err(|e| tracing::warn!("cannot watch {}: {e}", dir.display()))
        .ok()?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|e| tracing::warn!("cannot watch {}: {e}", dir.display()))
        .ok()?;
    std::thread::Builder::new()
        .name("modes-watch".into())
        .spawn(move || reload_when_quiet(&changed, reload))
        .map_err(|e| tracing::warn!("cannot start the modes watcher: {e}"))
        .ok()?;
    Some(watcher)
}

/// Whether `event` may have changed the content of the file `name`.
fn may_change(event: &notify::Event, name: &OsString) -> bool {
    let kind = matches!(
        event.kind,
        EventKind::Create(_)
            | EventKind::Remove(_)
            | EventKind::Modify(ModifyKind::Name(_))
            | EventKind::Access(AccessKind::Close(AccessMode::Write))
    );
    kind && event
        .paths
        .iter()
        .any(|path| path.file_name() == Some(name.as_os_str()))
}

/// Reloads once per burst of changes, after a quiet moment; returns when
/// the watcher is dropped.
fn reload_when_quiet(changed: &mpsc::Receiver<()>, reload: impl Fn()) {
    while changed.recv().is_ok() {
        while changed.recv_timeout(QUIET).is_ok() {}
        reload();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, DataChange, RenameMode};

    fn event(kind: EventKind, path: &str) -> notify::Event {
        notify::Event::new(kind).add_path(path.into())
    }

    #[test]
    fn reads_and_other_files_are_not_changes() {
        let name = OsString::from("modes.toml");
        let read = EventKind::Access(AccessKind::Close(AccessMode::Read));
        let opened = EventKind::Access(AccessKind::Open(AccessMode::Any));
        let written = EventKind::Access(AccessKind::Close(AccessMode::Write));
        let partial = EventKind::Modify(ModifyKind::Data(DataChange::Any));
        let renamed = EventKind::Modify(ModifyKind::Name(RenameMode::To));
        assert!(!may_change(&event(read, "/etc/modes.toml"), &name));
        assert!(!may_change(&event(opened, "/etc/modes.toml"), &name));
        assert!(
            !may_change(&event(partial, "/etc/modes.toml"), &name),
            "a write in progress waits for its close"
        );
        assert!(may_change(&event(written, "/etc/modes.toml"), &name));
        assert!(may_change(&event(renamed, "/etc/modes.toml"), &name));
        let created = EventKind::Create(CreateKind::File);
        assert!(!may_change(&event(created, "/etc/other.toml"), &name));
    }
}
