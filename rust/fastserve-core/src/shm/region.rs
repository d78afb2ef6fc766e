//! One registered system shared-memory region: a window of a POSIX shared-memory object that a
//! client created, opened with `shm_open` (never a path) and checked against the object's size
//! when registered.
//!
//! The region is read and written with `pread`/`pwrite` on the object's descriptor, never through a
//! mapping: a client can shrink its object at any time, and touching a mapping past the new end
//! raises SIGBUS, which would end the whole server. A read or write past the end is an ordinary
//! short read or an error here, answered to the one request that met it.

use std::fs::File;
use std::os::unix::fs::FileExt;

use bytes::Bytes;
use rustix::io::Errno;
use rustix::shm;

use crate::error::{Result, ServeError};

/// Longest shared-memory object name, without its leading '/' (Linux's NAME_MAX).
pub const MAX_KEY_BYTES: usize = 255;

/// Checks that `key` is a POSIX shared-memory object name and not a path: one optional leading
/// '/', then 1 to [`MAX_KEY_BYTES`] bytes without '/', "..", NUL or other control characters.
/// Returns why not, for the message.
pub fn check_key(key: &str) -> std::result::Result<(), String> {
    let name = key.strip_prefix('/').unwrap_or(key);
    if name.is_empty() {
        return Err("it names no object".into());
    }
    if name.len() > MAX_KEY_BYTES {
        return Err(format!("it is longer than {MAX_KEY_BYTES} bytes"));
    }
    if name.contains('/') {
        return Err("a key is an object name (one optional leading '/'), not a path".into());
    }
    if name == "." || name.contains("..") {
        return Err("it is '.' or contains '..'".into());
    }
    if name.chars().any(char::is_control) {
        return Err("it contains a control character".into());
    }
    Ok(())
}

/// The end of `byte_size` bytes at `offset` within `size` bytes, or None when they do not fit
/// (including when the sum overflows).
pub fn window_end(size: u64, offset: u64, byte_size: u64) -> Option<u64> {
    offset.checked_add(byte_size).filter(|&end| end <= size)
}

/// A checked window of a region: `len` bytes at `offset` from the region's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub offset: u64,
    pub len: u64,
}

/// A registered region: `byte_size` bytes at `offset` of the object `key`.
#[derive(Debug)]
pub struct Region {
    pub name: String,
    pub key: String,
    pub offset: u64,
    pub byte_size: u64,
    /// Opened read-write; an object the server may only read serves inputs, never outputs.
    pub writable: bool,
    file: File,
}

impl Region {
    /// Opens the object `key` with `shm_open` (read-write, else read-only) and checks that the
    /// region lies within it. The message says why registering `name` failed.
    pub fn open(name: &str, key: &str, offset: u64, byte_size: u64) -> Result<Self> {
        let refuse =
            |why: String| ServeError::bad_request(format!("failed to register shared memory region '{name}': {why}"));
        if let Err(why) = check_key(key) {
            let shown = if key.len() <= MAX_KEY_BYTES + 1 { format!(" {key:?}") } else { String::new() };
            return Err(refuse(format!("invalid key{shown}: {why}")));
        }
        if byte_size == 0 {
            return Err(refuse("byte_size must be positive".into()));
        }
        let (file, writable) = open_object(key)
            .map_err(|e| refuse(format!("unable to open shared memory object {key:?}: {}", std::io::Error::from(e))))?;
        let meta =
            file.metadata().map_err(|e| refuse(format!("unable to inspect shared memory object {key:?}: {e}")))?;
        if !meta.is_file() {
            return Err(refuse(format!("{key:?} is not a shared memory object")));
        }
        let size = meta.len();
        if window_end(size, offset, byte_size).is_none() {
            return Err(refuse(format!(
                "offset ({offset}) + byte_size ({byte_size}) runs past the end of shared memory object {key:?} \
                 ({size} bytes)"
            )));
        }
        Ok(Self { name: name.to_string(), key: key.to_string(), offset, byte_size, writable, file })
    }

    /// The window `byte_size` bytes at `offset` of this region, for `what` (e.g. "input 'X'"),
    /// checked with overflow-safe arithmetic. An output also needs a writable region.
    pub fn slot(&self, what: &str, offset: u64, byte_size: u64, output: bool) -> Result<Slot> {
        let name = &self.name;
        if offset >= self.byte_size {
            return Err(ServeError::bad_request(format!(
                "{what}: shared_memory_offset {offset} is outside shared memory region '{name}' ({} bytes)",
                self.byte_size
            )));
        }
        if window_end(self.byte_size, offset, byte_size).is_none() {
            return Err(ServeError::bad_request(format!(
                "{what}: shared_memory_offset ({offset}) + shared_memory_byte_size ({byte_size}) runs past the end of \
                 shared memory region '{name}' ({} bytes)",
                self.byte_size
            )));
        }
        if output && !self.writable {
            return Err(ServeError::bad_request(format!(
                "{what}: shared memory region '{name}' is read-only (the server could not open object {:?} for \
                 writing), so it cannot receive outputs",
                self.key
            )));
        }
        Ok(Slot { offset, len: byte_size })
    }

    /// Copies the slot's bytes out of the object: the request works on this copy only, whatever
    /// the client writes into the region meanwhile.
    pub fn read(&self, slot: Slot) -> Result<Bytes> {
        let len = usize::try_from(slot.len)
            .map_err(|_| ServeError::bad_request(format!("{} bytes do not fit in memory", slot.len)))?;
        let mut buf = vec![0u8; len];
        self.file.read_exact_at(&mut buf, self.offset + slot.offset).map_err(|e| self.io_error("read", e))?;
        Ok(buf.into())
    }

    /// Writes `data` (at most the slot's length) at the slot. The object must still hold the
    /// whole region: a shrunken object is refused, not grown back.
    pub fn write(&self, slot: Slot, data: &[u8]) -> Result<()> {
        let end = self.offset + self.byte_size;
        let size = self.file.metadata().map_err(|e| self.io_error("inspect", e))?.len();
        if size < end {
            return Err(self.shrunk());
        }
        let len = data.len().min(usize::try_from(slot.len).unwrap_or(usize::MAX));
        self.file.write_all_at(&data[..len], self.offset + slot.offset).map_err(|e| self.io_error("write", e))
    }

    fn shrunk(&self) -> ServeError {
        ServeError::bad_request(format!(
            "shared memory object {:?} of region '{}' is now smaller than the region registered on it",
            self.key, self.name
        ))
    }

    fn io_error(&self, what: &str, e: std::io::Error) -> ServeError {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            return self.shrunk();
        }
        ServeError::bad_request(format!("unable to {what} shared memory region '{}': {e}", self.name))
    }
}

/// `shm_open(key)`, read-write if the server may, else read-only. Symbolic links are not followed
/// and a FIFO or device planted under the name cannot block the open.
fn open_object(key: &str) -> std::result::Result<(File, bool), Errno> {
    let extra = shm::OFlags::from_bits_retain(
        (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::NOCTTY).bits(),
    );
    let mode = rustix::fs::Mode::empty();
    match shm::open(key, shm::OFlags::RDWR | extra, mode) {
        Ok(fd) => Ok((File::from(fd), true)),
        Err(Errno::ACCESS | Errno::PERM | Errno::ROFS) => {
            shm::open(key, shm::OFlags::RDONLY | extra, mode).map(|fd| (File::from(fd), false))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_object_names_never_paths() {
        for good in ["/input_simple", "input", "/psm_1a2b", "/a.b-c_d", &format!("/{}", "k".repeat(MAX_KEY_BYTES))] {
            assert_eq!(check_key(good), Ok(()), "{good}");
        }
        let bad = [
            ("", "names no object"),
            ("/", "names no object"),
            ("//x", "not a path"),
            ("/../etc/passwd", "not a path"),
            ("a/b", "not a path"),
            ("/dev/shm/x", "not a path"),
            ("/..", "'..'"),
            ("/.", "'..'"),
            ("/a..b", "'..'"),
            ("/a\0b", "control character"),
            ("/a\nb", "control character"),
        ];
        for (key, why) in bad {
            let err = check_key(key).unwrap_err();
            assert!(err.contains(why), "{key:?}: {err}");
        }
        assert!(check_key(&format!("/{}", "k".repeat(MAX_KEY_BYTES + 1))).unwrap_err().contains("longer than 255"));
    }

    #[test]
    fn windows_are_checked_without_overflow() {
        assert_eq!(window_end(64, 0, 64), Some(64));
        assert_eq!(window_end(64, 16, 48), Some(64));
        assert_eq!(window_end(64, 16, 49), None);
        assert_eq!(window_end(64, 65, 0), None);
        assert_eq!(window_end(64, u64::MAX, 2), None);
        assert_eq!(window_end(u64::MAX, 1, u64::MAX), None);
        assert_eq!(window_end(u64::MAX, u64::MAX, 0), Some(u64::MAX));
    }

    /// A shared-memory object for one test, unlinked when dropped.
    struct Object(String);

    impl Object {
        fn new(tag: &str, size: u64) -> Self {
            let key = format!("/fastserve-test-{tag}-{}", std::process::id());
            let flags = shm::OFlags::CREATE | shm::OFlags::RDWR | shm::OFlags::TRUNC;
            let fd = shm::open(key.as_str(), flags, rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR).unwrap();
            rustix::fs::ftruncate(&fd, size).unwrap();
            Self(key)
        }
    }

    impl Drop for Object {
        fn drop(&mut self) {
            let _ = shm::unlink(self.0.as_str());
        }
    }

    #[test]
    fn regions_are_checked_against_their_object() {
        let object = Object::new("bounds", 64);
        let region = Region::open("r", &object.0, 16, 48).unwrap();
        assert!(region.writable);
        let slot = region.slot("input 'X'", 8, 40, false).unwrap();
        region.write(slot, &[7u8; 40]).unwrap();
        assert_eq!(&region.read(slot).unwrap()[..], &[7u8; 40]);
        let err = region.slot("input 'X'", 48, 1, false).unwrap_err().to_string();
        assert!(err.contains("shared_memory_offset 48 is outside"), "{err}");
        let err = region.slot("input 'X'", 8, u64::MAX, false).unwrap_err().to_string();
        assert!(err.contains("runs past the end of shared memory region 'r' (48 bytes)"), "{err}");
        for (offset, size) in [(0, 65), (60, 5), (u64::MAX, 2)] {
            let err = Region::open("r", &object.0, offset, size).unwrap_err();
            assert!(err.to_string().contains("runs past the end of shared memory object"), "{err}");
        }
        let err = Region::open("r", "/fastserve-test-missing-object", 0, 1).unwrap_err().to_string();
        assert!(err.contains("unable to open shared memory object"), "{err}");
        let err = Region::open("r", "/../etc/passwd", 0, 1).unwrap_err().to_string();
        assert!(err.contains("invalid key"), "{err}");
    }

    #[test]
    fn a_shrunken_object_is_an_error_not_a_crash() {
        let object = Object::new("shrink", 64);
        let region = Region::open("r", &object.0, 0, 64).unwrap();
        let fd = shm::open(object.0.as_str(), shm::OFlags::RDWR, rustix::fs::Mode::empty()).unwrap();
        rustix::fs::ftruncate(&fd, 8).unwrap();
        let slot = region.slot("input 'X'", 0, 64, false).unwrap();
        assert!(region.read(slot).unwrap_err().to_string().contains("now smaller"));
        assert!(region.write(slot, &[1u8; 64]).unwrap_err().to_string().contains("now smaller"));
    }
}
