//! Where approval requests live. The seam is the `ApprovalRequest` resource
//! itself: create, read, list, and read-modify-write of one object. The
//! standalone store is a directory; the cluster store (the operator's
//! resources) plugs in as another variant.
//!
//! `DirStore` layout, under `--state-dir`:
//! - `approvals/<id>.json`: one resource per file, replaced atomically
//!   (write a temporary file, fsync, rename, fsync the directory), so a crash
//!   leaves the old or the new object, never a torn one;
//! - `approvals/.lock`: every change happens under an exclusive lock on it,
//!   so the gateway and `pgwarden approvals` never overwrite each other;
//! - `approvals/.fingerprint-key`: the random key of the fingerprints.
//!
//! The directory and files are private to the user running pgwarden (0700 /
//! 0600): statements can hold data, and whoever can write here can approve.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use pgwarden_api::ApprovalRequest;

use super::request;

#[derive(Debug, Clone)]
pub struct DirStore {
    dir: PathBuf,
    state_dir: PathBuf,
}

/// Request ids are file names: only what pgwarden itself generates is valid.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 253
        && !id.starts_with(['.', '-'])
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !id.contains("..")
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no approval request {0}")]
    NotFound(String),
    /// The state directory has no store: not a gateway's state directory.
    #[error("no approval store at {}: is this the gateway's --state-dir? (a gateway creates it at start)", .0.display())]
    Missing(PathBuf),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: not a valid approval request: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// The cluster store: the operator could not be asked, or refused.
    #[error("{0}")]
    Operator(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

impl DirStore {
    /// Open (creating if needed) the store under a state directory.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        let dir = state_dir.join("approvals");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err(&dir))?;
        // Absolute, so the approve command printed to a client works from
        // any directory.
        let state_dir = fs::canonicalize(state_dir).map_err(io_err(state_dir))?;
        Ok(DirStore {
            dir: state_dir.join("approvals"),
            state_dir,
        })
    }

    /// Open the store of an existing state directory, creating nothing (the
    /// reviewer's CLI: a mistyped path must not become a new, empty store).
    pub fn open_existing(state_dir: &Path) -> Result<Self, StoreError> {
        let dir = state_dir.join("approvals");
        match fs::metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(StoreError::Missing(dir)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StoreError::Missing(dir)),
            Err(e) => return Err(io_err(&dir)(e)),
        }
        let state_dir = fs::canonicalize(state_dir).map_err(io_err(state_dir))?;
        Ok(DirStore {
            dir: state_dir.join("approvals"),
            state_dir,
        })
    }

    /// The state directory as given (shown in the approve command).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Run `f` holding the store's exclusive lock.
    fn locked<T>(&self, f: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
        let path = self.dir.join(".lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path))?;
        lock.lock().map_err(io_err(&path))?;
        let out = f();
        // Also released on close; explicit for clarity.
        let _ = lock.unlock();
        out
    }

    /// The fingerprint key, created on first use.
    pub fn fingerprint_key(&self) -> Result<Vec<u8>, StoreError> {
        let path = self.dir.join(".fingerprint-key");
        self.locked(|| match fs::read(&path) {
            Ok(k) if k.len() >= 32 => Ok(k),
            Ok(_) | Err(_) => {
                let key: [u8; 32] = rand::random();
                write_atomic(&path, &key)?;
                Ok(key.to_vec())
            }
        })
    }

    fn read(&self, id: &str) -> Result<ApprovalRequest, StoreError> {
        if !valid_id(id) {
            return Err(StoreError::NotFound(id.to_owned()));
        }
        let path = self.path(id);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound(id.to_owned()))
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt { path, source })
    }

    fn write(&self, r: &ApprovalRequest) -> Result<(), StoreError> {
        let path = self.path(request::id(r));
        let mut bytes = serde_json::to_vec_pretty(r).map_err(|source| StoreError::Corrupt {
            path: path.clone(),
            source,
        })?;
        bytes.push(b'\n');
        write_atomic(&path, &bytes)
    }

    pub fn get(&self, id: &str) -> Result<ApprovalRequest, StoreError> {
        self.read(id)
    }

    /// Every request, oldest first.
    pub fn list(&self) -> Result<Vec<ApprovalRequest>, StoreError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let entry = entry.map_err(io_err(&self.dir))?;
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if !valid_id(id) {
                continue; // temporary files and anything not ours
            }
            match self.read(id) {
                Ok(r) => out.push(r),
                // Deleted between read_dir and read.
                Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        request::sort(&mut out);
        Ok(out)
    }

    /// Store a new request; `make` is called with candidate ids until one is
    /// free.
    pub fn create(
        &self,
        mut make: impl FnMut() -> ApprovalRequest,
    ) -> Result<ApprovalRequest, StoreError> {
        self.locked(|| loop {
            let r = make();
            if !self.path(request::id(&r)).exists() {
                self.write(&r)?;
                return Ok(r);
            }
        })
    }

    /// Read-modify-write one request under the lock. `f` returns whether it
    /// changed the request (and so it is written back) and a value.
    pub fn update<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut ApprovalRequest) -> (bool, T),
    ) -> Result<T, StoreError> {
        self.locked(|| {
            let mut r = self.read(id)?;
            let (changed, out) = f(&mut r);
            if changed {
                self.write(&r)?;
            }
            Ok(out)
        })
    }
}

/// Replace a file atomically and durably.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io_err(path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;
    use pgwarden_api::{ApprovalPhase, DecisionAction, Requester};

    fn new(id: &str) -> ApprovalRequest {
        let draft = request::Draft {
            database: "shop".into(),
            requester: Requester {
                subject: "agent".into(),
                ..Requester::default()
            },
            statement: "DROP TABLE t".into(),
            parameters: vec![],
            fingerprint: "fp".into(),
            reason: "r".into(),
            approvers: None,
            estimate: None,
        };
        request::new_request(
            draft,
            "p",
            "ci",
            id,
            Timestamp::now(),
            std::time::Duration::from_secs(60),
        )
    }

    #[test]
    fn requests_survive_reopening_and_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let store = DirStore::open(dir.path()).unwrap();
        let key = store.fingerprint_key().unwrap();
        store.create(|| new("p-000001")).unwrap();
        let again = DirStore::open(dir.path()).unwrap();
        assert_eq!(again.fingerprint_key().unwrap(), key);
        let all = again.list().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(request::id(&all[0]), "p-000001");
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("approvals")), 0o700);
        assert_eq!(mode(&dir.path().join("approvals/p-000001.json")), 0o600);
        assert_eq!(mode(&dir.path().join("approvals/.fingerprint-key")), 0o600);
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(dir.path().join("approvals"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    }

    #[test]
    fn an_approval_is_claimed_by_exactly_one_of_many_racing_sessions() {
        let dir = tempfile::tempdir().unwrap();
        let store = DirStore::open(dir.path()).unwrap();
        store.create(|| new("p-000002")).unwrap();
        store
            .update("p-000002", |r| {
                let ok =
                    request::decide(r, DecisionAction::Approve, "alice", None, Timestamp::now());
                (true, ok)
            })
            .unwrap()
            .unwrap();
        let winners: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let store = DirStore::open(dir.path()).unwrap();
                    s.spawn(move || {
                        store
                            .update("p-000002", |r| {
                                (true, request::claim(r, Timestamp::now()).is_ok())
                            })
                            .unwrap()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| usize::from(h.join().unwrap()))
                .sum()
        });
        assert_eq!(winners, 1);
        assert_eq!(
            request::stored_phase(&store.get("p-000002").unwrap()),
            ApprovalPhase::Executed
        );
    }

    #[test]
    fn a_corrupt_file_is_reported_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = DirStore::open(dir.path()).unwrap();
        fs::write(dir.path().join("approvals/p-000003.json"), b"{not json").unwrap();
        let e = store.list().unwrap_err().to_string();
        assert!(e.contains("p-000003.json"), "{e}");
        assert!(matches!(
            store.get("../../etc/passwd"),
            Err(StoreError::NotFound(_))
        ));
    }

    #[test]
    fn the_cli_opens_only_an_existing_store() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        assert!(matches!(
            DirStore::open_existing(&missing),
            Err(StoreError::Missing(_))
        ));
        assert!(!missing.exists(), "opening created the state dir");
        assert!(matches!(
            DirStore::open_existing(dir.path()),
            Err(StoreError::Missing(_))
        ));
        assert!(!dir.path().join("approvals").exists());
        DirStore::open(dir.path())
            .unwrap()
            .create(|| new("p-000004"))
            .unwrap();
        let store = DirStore::open_existing(dir.path()).unwrap();
        assert_eq!(store.list().unwrap().len(), 1);
    }

    #[test]
    fn ids_cannot_leave_the_directory() {
        assert!(valid_id("nightly-migrations-5f2c9a"));
        for bad in ["", "../x", "a/b", ".lock", "-x", "A", "a..b", "x\0y"] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }
}
