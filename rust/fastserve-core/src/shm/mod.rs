//! Triton's system shared-memory extension: clients register windows of POSIX shared-memory
//! objects under a name, then name them in a request's input and output parameters instead of
//! sending the data. `region` opens and bounds one region; `placement` reads a request's inputs
//! from regions and writes its outputs into them, once, for both protocols.
//!
//! A request holds the regions it uses (`Arc`), so unregistering one while a request uses it
//! takes it out of the table at once (later requests naming it are refused) while the running
//! request finishes on the still-open object.

pub mod placement;
pub mod region;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

use crate::error::{Result, ServeError};
pub use region::Region;

/// Most regions registered at once: each keeps its object's descriptor open.
pub const MAX_REGIONS: usize = 256;
/// Longest region name, in bytes (names are echoed in statuses and errors).
pub const MAX_NAME_BYTES: usize = 256;

/// A registered region as the status APIs report it (Triton's shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RegionStatus {
    pub name: String,
    pub key: String,
    pub offset: u64,
    pub byte_size: u64,
}

/// The server's registered system shared-memory regions, by name.
#[derive(Debug)]
pub struct SharedMemory {
    enabled: bool,
    regions: Mutex<BTreeMap<String, Arc<Region>>>,
}

impl SharedMemory {
    /// `enabled` false (`--no-shared-memory`): every call and every request naming a region is
    /// refused.
    pub fn new(enabled: bool) -> Self {
        Self { enabled, regions: Mutex::default() }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Region>>> {
        self.regions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Refuses the extension's APIs (UNSUPPORTED) when the server runs without it.
    pub fn check_enabled(&self) -> Result<()> {
        if self.enabled {
            return Ok(());
        }
        Err(ServeError::Unsupported(DISABLED.into()))
    }

    /// Registers `byte_size` bytes at `offset` of the shared-memory object `key` as `name`.
    pub fn register(&self, name: &str, key: &str, offset: u64, byte_size: u64) -> Result<()> {
        self.check_enabled()?;
        check_name(name)?;
        self.check_room(&self.lock(), name)?;
        // Opened outside the lock: the table stays available meanwhile.
        let region = Region::open(name, key, offset, byte_size)?;
        let mut regions = self.lock();
        self.check_room(&regions, name)?;
        tracing::info!(region = name, key, offset, byte_size, writable = region.writable, "shared memory registered");
        regions.insert(name.to_string(), Arc::new(region));
        Ok(())
    }

    fn check_room(&self, regions: &BTreeMap<String, Arc<Region>>, name: &str) -> Result<()> {
        if regions.contains_key(name) {
            return Err(ServeError::bad_request(format!("shared memory region '{name}' already in manager")));
        }
        if regions.len() >= MAX_REGIONS {
            return Err(ServeError::bad_request(format!(
                "cannot register shared memory region '{name}': {MAX_REGIONS} regions are registered, the most \
                 allowed; unregister some first"
            )));
        }
        Ok(())
    }

    /// Every region's status, by name, or the one named (unknown: not found).
    pub fn status(&self, name: Option<&str>) -> Result<Vec<RegionStatus>> {
        self.check_enabled()?;
        let regions = self.lock();
        let status = |r: &Region| RegionStatus {
            name: r.name.clone(),
            key: r.key.clone(),
            offset: r.offset,
            byte_size: r.byte_size,
        };
        match name {
            None => Ok(regions.values().map(|r| status(r)).collect()),
            Some(name) => match regions.get(name) {
                Some(r) => Ok(vec![status(r)]),
                None => {
                    Err(ServeError::not_found(format!("Unable to find system shared memory region: '{}'", shown(name))))
                }
            },
        }
    }

    /// Unregisters the region named, or every region. As in Triton, unregistering a name that is
    /// not registered succeeds. Requests already using a region finish with it.
    pub fn unregister(&self, name: Option<&str>) -> Result<()> {
        self.check_enabled()?;
        let mut regions = self.lock();
        match name {
            None => {
                let count = regions.len();
                regions.clear();
                tracing::info!(count, "shared memory regions unregistered");
            }
            Some(name) => {
                if regions.remove(name).is_some() {
                    tracing::info!(region = name, "shared memory unregistered");
                }
            }
        }
        Ok(())
    }

    /// The region a request names, for `what` (e.g. "input 'X'").
    pub fn region(&self, what: &str, name: &str) -> Result<Arc<Region>> {
        if !self.enabled {
            return Err(ServeError::bad_request(format!("{what}: {DISABLED}")));
        }
        self.lock().get(name).cloned().ok_or_else(|| {
            ServeError::bad_request(format!("{what}: shared memory region '{}' is not registered", shown(name)))
        })
    }
}

const DISABLED: &str = "system shared memory is disabled on this server (it was started with --no-shared-memory)";

/// A region name fit for a message: long ones are cut.
fn shown(name: &str) -> String {
    match name.char_indices().nth(MAX_NAME_BYTES / 4) {
        Some((cut, _)) => format!("{}...", &name[..cut]),
        None => name.to_string(),
    }
}

fn check_name(name: &str) -> Result<()> {
    let why = if name.is_empty() {
        "a region needs a name"
    } else if name.len() > MAX_NAME_BYTES {
        "the region name is longer than 256 bytes"
    } else if name.chars().any(char::is_control) {
        "the region name contains a control character"
    } else {
        return Ok(());
    };
    Err(ServeError::bad_request(format!("cannot register shared memory region '{}': {why}", shown(name))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_bounded() {
        assert!(check_name("input0").is_ok());
        for bad in ["", "a\nb"] {
            assert!(matches!(check_name(bad), Err(ServeError::BadRequest(_))), "{bad:?}");
        }
        let long = "n".repeat(MAX_NAME_BYTES + 1);
        let err = check_name(&long).unwrap_err().to_string();
        assert!(err.contains("longer than 256 bytes") && err.len() < 200, "{err}");
    }

    #[test]
    fn a_disabled_table_refuses_everything() {
        let shm = SharedMemory::new(false);
        assert!(matches!(shm.status(None), Err(ServeError::Unsupported(_))));
        assert!(matches!(shm.register("r", "/k", 0, 1), Err(ServeError::Unsupported(_))));
        assert!(matches!(shm.unregister(None), Err(ServeError::Unsupported(_))));
        let err = shm.region("input 'X'", "r").unwrap_err();
        assert!(matches!(&err, ServeError::BadRequest(m) if m.contains("--no-shared-memory")), "{err}");
    }

    #[test]
    fn names_are_unique_and_the_table_is_bounded() {
        use rustix::{fs::Mode, shm as posix};
        let key = format!("/fastserve-test-table-{}", std::process::id());
        let fd =
            posix::open(key.as_str(), posix::OFlags::CREATE | posix::OFlags::RDWR, Mode::RUSR | Mode::WUSR).unwrap();
        rustix::fs::ftruncate(&fd, 16).unwrap();
        let shm = SharedMemory::new(true);
        for i in 0..MAX_REGIONS {
            shm.register(&format!("r{i}"), &key, 0, 16).unwrap();
        }
        let err = shm.register("r0", &key, 0, 16).unwrap_err();
        assert_eq!(err, ServeError::bad_request("shared memory region 'r0' already in manager"));
        let err = shm.register("one-more", &key, 0, 16).unwrap_err().to_string();
        assert!(err.contains("256 regions are registered"), "{err}");
        let held = shm.region("input 'X'", "r1").unwrap();
        shm.unregister(Some("r1")).unwrap();
        assert!(shm.region("input 'X'", "r1").is_err());
        // A request still holding the region reads on.
        assert_eq!(held.read(held.slot("input 'X'", 0, 16, false).unwrap()).unwrap().len(), 16);
        shm.register("one-more", &key, 0, 16).unwrap();
        shm.unregister(None).unwrap();
        assert_eq!(shm.status(None).unwrap(), vec![]);
        posix::unlink(key.as_str()).unwrap();
    }

    #[test]
    fn unknown_regions_are_refused_and_unregistering_them_succeeds() {
        let shm = SharedMemory::new(true);
        assert_eq!(shm.status(None).unwrap(), vec![]);
        assert!(matches!(shm.status(Some("r")), Err(ServeError::NotFound(_))));
        assert!(shm.unregister(Some("r")).is_ok());
        let err = shm.region("output 'Y'", "r").unwrap_err().to_string();
        assert_eq!(err, "output 'Y': shared memory region 'r' is not registered");
    }
}
