//! `watch_config`: a reload when the config file, or a file it names, changes, as
//! Traefik's file provider (`watch`) and Envoy's watched directories do. Owns:
//! `Watcher`.
//!
//! inotify (through `notify`) watches the directories that hold the files, not the
//! files: editors, certbot and Kubernetes ConfigMap updates replace a file by renaming
//! another over it or swapping a symlink, which a watch on the old file would miss.
//! Any event there starts a quiet period (`QUIET`); once it has passed, the files are
//! read and hashed, and only a change of content reloads. So an unrelated file in the
//! directory, a `touch`, or a renewal written in several steps costs one reload at
//! most. The reload is SIGHUP's: a bad file is logged and the running config stays,
//! until the next change.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher as _};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::config::{AccessLog, Config};

/// How long the files must stay quiet before they are read: certbot replaces four
/// links one after another, an editor writes, renames and sets modes.
pub const QUIET: Duration = Duration::from_millis(1000);

pub struct Watcher {
    inner: notify::RecommendedWatcher,
    events: UnboundedReceiver<()>,
    /// What the event handler (on `notify`'s thread) sorts events by.
    paths: Arc<Mutex<Paths>>,
    dirs: Vec<PathBuf>,
    /// The files' content as last read.
    fingerprint: u64,
    /// An event came and its quiet period has not yet passed: kept here because
    /// `changed` may be dropped (another signal came first) and called again.
    pending: bool,
}

#[derive(Default)]
struct Paths {
    /// The config file and every file it names, absolute.
    files: Vec<PathBuf>,
    /// Written by rampart itself (the access log, the state file): never a change.
    own: Vec<PathBuf>,
}

impl Paths {
    /// Whether an event on `paths` may have changed a watched file: it names one, or
    /// something that is not a plain file (gone, a symlink, a directory: how
    /// Kubernetes swaps a ConfigMap's `..data` link). Other files in the directory,
    /// a log written every moment, say, are no reason to look.
    fn concern(&self, paths: &[PathBuf]) -> bool {
        paths.is_empty()
            || paths.iter().any(|p| {
                !self.own.contains(p)
                    && (self.files.contains(p) || !std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file()))
            })
    }
}

impl Watcher {
    /// Watches `config`'s file and every file it named.
    pub fn start(config: &Config) -> Result<Watcher, String> {
        let (tx, events): (UnboundedSender<()>, _) = unbounded_channel();
        let paths = Arc::new(Mutex::new(Paths::default()));
        let sorted = paths.clone();
        let inner = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let concern = match res {
                // Reading the files (our own fingerprinting included) is no change.
                Ok(event) if matches!(event.kind, EventKind::Access(_)) => false,
                Ok(event) => sorted.lock().map_or(true, |p| p.concern(&event.paths)),
                // An overflowed queue lost events: look at the files anyway.
                Err(_) => true,
            };
            if concern {
                let _ = tx.send(());
            }
        })
        .map_err(|e| format!("cannot watch files: {e}"))?;
        let mut w = Watcher {
            inner,
            events,
            paths,
            dirs: Vec::new(),
            fingerprint: 0,
            pending: false,
        };
        w.follow(config)?;
        Ok(w)
    }

    /// After a reload: watches what `config` names now, from its content now.
    pub fn follow(&mut self, config: &Config) -> Result<(), String> {
        // Absolute, as `notify` reports the paths of events under an absolute watch.
        let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        let files: Vec<PathBuf> = config.path.iter().chain(&config.inputs).map(|p| absolute(p)).collect();
        let mut dirs: Vec<PathBuf> = files.iter().filter_map(|f| f.parent().map(Path::to_path_buf)).collect();
        dirs.sort();
        dirs.dedup();
        for gone in self.dirs.iter().filter(|d| !dirs.contains(d)) {
            let _ = self.inner.unwatch(gone);
        }
        for new in dirs.iter().filter(|d| !self.dirs.contains(d)) {
            self.inner
                .watch(new, RecursiveMode::NonRecursive)
                .map_err(|e| format!("cannot watch {}: {e}", new.display()))?;
        }
        let mut own = Vec::new();
        if let AccessLog::File(p) = &config.server.access_log {
            own.push(absolute(p));
        }
        own.extend(
            config
                .admin
                .as_ref()
                .and_then(|a| a.state_file.as_deref())
                .map(absolute),
        );
        self.fingerprint = fingerprint(&files);
        if let Ok(mut paths) = self.paths.lock() {
            *paths = Paths { files, own };
        }
        self.dirs = dirs;
        Ok(())
    }

    /// The directories watched, for the log.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Waits until the files' content has changed and stayed quiet for `QUIET`.
    /// Cancel-safe: dropped and called again, it carries on where it was.
    pub async fn changed(&mut self) {
        loop {
            if !self.pending {
                if self.events.recv().await.is_none() {
                    return std::future::pending().await;
                }
                self.pending = true;
            }
            // The quiet period: every further event starts it again.
            while let Ok(Some(())) = tokio::time::timeout(QUIET, self.events.recv()).await {}
            self.pending = false;
            // The list is copied out: the files are read without the lock, which the
            // event handler on `notify`'s thread takes for every event.
            let files = match self.paths.lock() {
                Ok(p) => p.files.clone(),
                Err(_) => return,
            };
            let now = fingerprint(&files);
            if now != self.fingerprint {
                // Taken now, so a file that fails to load is not tried again until
                // it changes again.
                self.fingerprint = now;
                return;
            }
        }
    }
}

/// A hash of the files' content; a file that cannot be read counts as its error.
fn fingerprint(files: &[PathBuf]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for f in files {
        f.hash(&mut h);
        match std::fs::read(f) {
            Ok(bytes) => bytes.hash(&mut h),
            Err(e) => e.kind().hash(&mut h),
        }
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_concern_the_watched_files_and_links_not_other_files() {
        let dir = std::env::temp_dir().join(format!("rampart-filewatch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = |n: &str| dir.join(n);
        for n in ["rampart.toml", "other.log", "access.log"] {
            std::fs::write(file(n), "x").unwrap();
        }
        std::os::unix::fs::symlink(file("rampart.toml"), file("..data")).unwrap();
        let p = Paths {
            files: vec![file("rampart.toml")],
            own: vec![file("access.log")],
        };
        assert!(p.concern(&[file("rampart.toml")]));
        assert!(
            p.concern(&[file("rampart.toml.tmp"), file("rampart.toml")]),
            "a rename over it"
        );
        assert!(p.concern(&[file("..data")]), "a symlink swapped");
        assert!(p.concern(&[file("gone")]), "something removed or renamed away");
        assert!(p.concern(&[]), "a rescan");
        assert!(!p.concern(&[file("other.log")]), "another file written");
        assert!(!p.concern(&[file("access.log")]), "our own log");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_fingerprint_follows_content_not_timestamps() {
        let dir = std::env::temp_dir().join(format!("rampart-fingerprint-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let f = vec![dir.join("a"), dir.join("b")];
        std::fs::write(&f[0], "one").unwrap();
        let missing = fingerprint(&f);
        std::fs::write(&f[1], "two").unwrap();
        let first = fingerprint(&f);
        assert_ne!(missing, first);
        std::fs::write(&f[1], "two").unwrap();
        assert_eq!(fingerprint(&f), first, "rewritten as it was");
        std::fs::write(&f[1], "three").unwrap();
        assert_ne!(fingerprint(&f), first);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
