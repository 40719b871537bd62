//! Lease persistence: a small versioned JSON file, replaced atomically.
//!
//! `save` writes a temporary file next to the target, fsyncs it, renames it over
//! the target and fsyncs the directory, so a crash leaves either the old or the
//! new file, never a torn one. There is no locking: one daemon owns one file.
//! Deciding when to save (after each ACK, periodically, on shutdown) is the
//! caller's business.
//!
//! Format: `{"version":1,"leases":[{"ip":"192.168.5.15","mac":"52:55:55:12:34:56","expires":1764590000,"hostname":"guest"}]}`
//! (`version` may be omitted when reading).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::lease::Lease;

const VERSION: u32 = 1;

/// Failure reading or writing a lease file.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: invalid lease file: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: unsupported lease file version {version} (expected {VERSION})")]
    Version { path: PathBuf, version: u32 },
}

#[derive(Serialize, Deserialize)]
struct LeaseFile {
    #[serde(default = "default_version")]
    version: u32,
    leases: Vec<Lease>,
}

fn default_version() -> u32 {
    VERSION
}

/// Read the leases in `path`. A missing file is an empty list.
pub fn load(path: &Path) -> Result<Vec<Lease>, StoreError> {
    let data = match fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(StoreError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let file: LeaseFile = serde_json::from_slice(&data).map_err(|source| StoreError::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    if file.version != VERSION {
        return Err(StoreError::Version {
            path: path.to_path_buf(),
            version: file.version,
        });
    }
    Ok(file.leases)
}

/// Atomically replace `path` with `leases`.
pub fn save(path: &Path, leases: &[Lease]) -> Result<(), StoreError> {
    let file = LeaseFile {
        version: VERSION,
        leases: leases.to_vec(),
    };
    let mut data = serde_json::to_vec_pretty(&file).map_err(|source| StoreError::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    data.push(b'\n');

    let io_err = |p: &Path| {
        let p = p.to_path_buf();
        move |source| StoreError::Io { path: p, source }
    };
    let name = path.file_name().ok_or_else(|| StoreError::Io {
        path: path.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "not a file path"),
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = dir.join(tmp_name);

    let write = || -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(&data)?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(&tmp)(e));
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(path)(e));
    }
    // Make the rename itself durable. Best effort: not every filesystem allows it.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mac::MacAddr;
    use std::net::Ipv4Addr;

    fn sample() -> Vec<Lease> {
        vec![
            Lease {
                ip: Ipv4Addr::new(192, 168, 5, 15),
                mac: MacAddr([0x52, 0x55, 0x55, 0x12, 0x34, 0x56]),
                expires: 1_764_590_000,
                hostname: Some("guest".into()),
            },
            Lease {
                ip: Ipv4Addr::new(192, 168, 5, 16),
                mac: MacAddr([0x52, 0x55, 0x55, 0x12, 0x34, 0x57]),
                expires: 1_764_590_001,
                hostname: None,
            },
        ]
    }

    #[test]
    fn missing_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(&dir.path().join("nope.json")).unwrap(), vec![]);
    }

    #[test]
    fn round_trip_and_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.json");
        save(&path, &sample()).unwrap();
        assert_eq!(load(&path).unwrap(), sample());
        save(&path, &sample()[..1]).unwrap();
        assert_eq!(load(&path).unwrap(), sample()[..1]);
        // No temp files left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("leases.json")]);
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"mac\": \"52:55:55:12:34:56\""), "{text}");
    }

    #[test]
    fn reads_documented_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.json");
        fs::write(
            &path,
            r#"{"leases":[{"ip":"192.168.5.15","mac":"52:55:55:12:34:56","expires":1764590000,"hostname":"guest"},
                          {"ip":"192.168.5.16","mac":"52:55:55:12:34:57","expires":1764590001}]}"#,
        )
        .unwrap();
        assert_eq!(load(&path).unwrap(), sample());
    }

    #[test]
    fn bad_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.json");
        fs::write(&path, "{not json").unwrap();
        assert!(matches!(load(&path), Err(StoreError::Parse { .. })));
        fs::write(
            &path,
            r#"{"leases":[{"ip":"192.168.5.15","mac":"zz","expires":1}]}"#,
        )
        .unwrap();
        assert!(matches!(load(&path), Err(StoreError::Parse { .. })));
        fs::write(&path, r#"{"version":9,"leases":[]}"#).unwrap();
        let e = load(&path).unwrap_err();
        assert!(matches!(e, StoreError::Version { version: 9, .. }), "{e}");
        // A directory is not a lease file.
        assert!(matches!(load(dir.path()), Err(StoreError::Io { .. })));
        // Saving into a missing directory fails cleanly.
        let e = save(&dir.path().join("missing/leases.json"), &sample()).unwrap_err();
        assert!(matches!(e, StoreError::Io { .. }));
    }
}
