//! A plugin file on disk: reading it without ever blocking on something that
//! is not a regular file, telling whether it changed (its identity), and
//! telling whether its bytes are a component cut short by a writer that has
//! not finished.

use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::path::Path;
use std::time::{Duration, SystemTime};

/// What identifies one state of a file: which file it is (device, inode) and
/// its size, modification and change times. Any write, truncation, rename
/// over, `chmod` or symlink flip changes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: Option<SystemTime>,
    ctime: (i64, i64),
    mode: u32,
}

impl FileId {
    #[cfg(unix)]
    pub(crate) fn of(m: &Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: m.modified().ok(),
            ctime: (m.ctime(), m.ctime_nsec()),
            mode: m.mode(),
        }
    }

    #[cfg(not(unix))]
    pub(crate) fn of(m: &Metadata) -> Self {
        Self {
            dev: 0,
            ino: 0,
            size: m.len(),
            mtime: m.modified().ok(),
            ctime: (0, 0),
            mode: u32::from(m.permissions().readonly()),
        }
    }

    /// How long ago the file was last written, by its own clock; zero when its
    /// time is in the future (a skewed network file system) or unknown.
    pub(crate) fn age(&self) -> Duration {
        self.mtime
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .unwrap_or_default()
    }
}

/// The identity of what `path` leads to now (symlinks followed); `None` when
/// nothing is there or it cannot be looked at.
pub(crate) fn identity(path: &Path) -> Option<FileId> {
    std::fs::metadata(path).ok().map(|m| FileId::of(&m))
}

/// Device and inode of what `path` leads to (symlinks followed): which
/// directory a watch on `path` would be on.
#[cfg(unix)]
pub(crate) fn inode(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(not(unix))]
pub(crate) fn inode(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|_| (0, 0))
}

/// A plugin file's bytes and the identity they were read under.
#[derive(Debug)]
pub(crate) struct PluginFile {
    pub bytes: Vec<u8>,
    pub id: FileId,
}

/// Why a plugin file could not be read.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// Nothing at the path (or a dangling symlink).
    Missing,
    /// Something other than a regular file: reading a FIFO or a character
    /// device could block or never end, a directory has no bytes.
    NotRegular { kind: &'static str, id: FileId },
    /// The file changed while it was being read: the bytes mix two versions.
    Changed,
    /// Any other failure (permissions, I/O).
    Io {
        error: io::Error,
        id: Option<FileId>,
    },
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Missing => write!(f, "no such file or directory"),
            Self::NotRegular { kind, .. } => write!(f, "not a regular file (a {kind})"),
            Self::Changed => write!(f, "the file changed while it was read"),
            Self::Io { error, .. } => write!(f, "{error}"),
        }
    }
}

impl std::error::Error for ReadError {}

/// Read the plugin file at `path` (symlinks followed). Only a regular file is
/// read: the type is checked before opening, the open cannot block (a FIFO
/// swapped in between is refused by the check on the opened file, not waited
/// on), and the opened file is checked again, so what is read is what was
/// checked.
pub(crate) fn read_plugin(path: &Path) -> Result<PluginFile, ReadError> {
    let io = |error: io::Error, id: Option<FileId>| {
        if error.kind() == io::ErrorKind::NotFound {
            ReadError::Missing
        } else {
            ReadError::Io { error, id }
        }
    };
    let before = std::fs::metadata(path).map_err(|e| io(e, None))?;
    regular(&before)?;
    let mut file = open_nonblocking(path).map_err(|e| io(e, Some(FileId::of(&before))))?;
    let opened = file.metadata().map_err(|e| io(e, None))?;
    regular(&opened)?;
    let id = FileId::of(&opened);
    let mut bytes = Vec::with_capacity(usize::try_from(opened.len()).unwrap_or(0));
    file.read_to_end(&mut bytes).map_err(|e| io(e, Some(id)))?;
    // A writer appending or rewriting meanwhile changes size or times.
    let after = file.metadata().map_err(|e| io(e, Some(id)))?;
    if FileId::of(&after) != id {
        return Err(ReadError::Changed);
    }
    Ok(PluginFile { bytes, id })
}

fn regular(m: &Metadata) -> Result<(), ReadError> {
    if m.is_file() {
        return Ok(());
    }
    Err(ReadError::NotRegular {
        kind: kind_of(m),
        id: FileId::of(m),
    })
}

#[cfg(unix)]
fn kind_of(m: &Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = m.file_type();
    if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else {
        "special file"
    }
}

#[cfg(not(unix))]
fn kind_of(m: &Metadata) -> &'static str {
    if m.is_dir() {
        "directory"
    } else {
        "special file"
    }
}

#[cfg(unix)]
fn open_nonblocking(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    // It matters only for what is *not* a regular file: opening a FIFO
    // without it waits for a writer, for ever. On regular files it is ignored.
    options.custom_flags(libc::O_NONBLOCK);
    options.open(path)
}

#[cfg(not(unix))]
fn open_nonblocking(path: &Path) -> io::Result<File> {
    File::open(path)
}

const COMPONENT_HEADER: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];

/// Whether `bytes` look like the beginning of a component whose end is still
/// missing: nothing yet, part of the header, or a section that runs past the
/// end of the file. A writer appending a file in several opens leaves such a
/// file between its appends. A file that is complete section by section but
/// broken, or not a component at all, is not "incomplete".
pub(crate) fn looks_incomplete(bytes: &[u8]) -> bool {
    let Some(body) = bytes.get(COMPONENT_HEADER.len()..) else {
        return COMPONENT_HEADER.starts_with(bytes);
    };
    if bytes.get(..COMPONENT_HEADER.len()) != Some(&COMPONENT_HEADER[..]) {
        return false;
    }
    // Every top-level section is an id byte, its size as unsigned LEB128 (at
    // most 5 bytes for a u32), then that many bytes.
    let mut rest = body;
    while let Some((_id, after_id)) = rest.split_first() {
        let mut size: u64 = 0;
        let mut used = 0usize;
        loop {
            let Some(&b) = after_id.get(used) else {
                return true;
            };
            size |= u64::from(b & 0x7f) << (7 * used);
            used += 1;
            if b & 0x80 == 0 {
                break;
            }
            if used == 5 {
                // Not a valid size: broken, not cut short.
                return false;
            }
        }
        let Some(section) = usize::try_from(size).ok().and_then(|s| s.checked_add(used)) else {
            return true;
        };
        match after_id.get(section..) {
            Some(next) => rest = next,
            None => return true,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn component(sections: &[(u8, usize)]) -> Vec<u8> {
        let mut out = COMPONENT_HEADER.to_vec();
        for &(id, len) in sections {
            out.push(id);
            let mut n = len;
            loop {
                let b = (n & 0x7f) as u8;
                n >>= 7;
                if n == 0 {
                    out.push(b);
                    break;
                }
                out.push(b | 0x80);
            }
            out.extend(std::iter::repeat_n(0xab, len));
        }
        out
    }

    #[test]
    fn a_component_cut_anywhere_looks_incomplete() {
        let whole = component(&[(0, 3), (1, 300), (7, 20)]);
        assert!(!looks_incomplete(&whole));
        for cut in 0..whole.len() {
            let prefix = &whole[..cut];
            // Cutting exactly between two sections leaves a well-formed, shorter
            // component: that one cannot be told from a complete file.
            let at_boundary = [8, 8 + 2 + 3, 8 + 2 + 3 + 3 + 300].contains(&cut);
            assert_eq!(looks_incomplete(prefix), !at_boundary, "cut at {cut}");
        }
    }

    #[test]
    fn garbage_and_core_modules_are_not_incomplete() {
        assert!(!looks_incomplete(b"garbage, not a component"));
        assert!(!looks_incomplete(b"gar"));
        assert!(!looks_incomplete(&[
            0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, 1, 5
        ]));
        // A size that is not valid LEB128 is broken, not short.
        let mut bad = COMPONENT_HEADER.to_vec();
        bad.extend([1, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        assert!(!looks_incomplete(&bad));
    }

    #[cfg(unix)]
    #[test]
    fn special_files_are_refused_without_blocking() {
        let dir = std::env::temp_dir().join(format!(
            "warren-file-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("plugin.wasm");
        let _ = std::fs::remove_file(&fifo);
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(status.success());
        // Opening a FIFO for reading without O_NONBLOCK waits for a writer: do
        // it on a thread, so a regression fails the test instead of hanging it.
        let (tx, rx) = std::sync::mpsc::channel();
        let path = fifo.clone();
        std::thread::spawn(move || {
            let _ = tx.send(open_nonblocking(&path).and_then(|f| f.metadata()));
        });
        let opened = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("opening a FIFO blocked");
        assert!(std::os::unix::fs::FileTypeExt::is_fifo(
            &opened.unwrap().file_type()
        ));
        match read_plugin(&fifo) {
            Err(ReadError::NotRegular { kind: "FIFO", .. }) => {}
            other => panic!("{other:?}"),
        }
        match read_plugin(&dir) {
            Err(e @ ReadError::NotRegular { .. }) => {
                assert_eq!(e.to_string(), "not a regular file (a directory)")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            read_plugin(&dir.join("absent")),
            Err(ReadError::Missing)
        ));
        std::fs::remove_file(&fifo).unwrap();
        std::fs::write(&fifo, b"bytes").unwrap();
        assert_eq!(read_plugin(&fifo).unwrap().bytes, b"bytes");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
