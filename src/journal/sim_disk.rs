//! An in-memory [`Storage`] for the deterministic simulator (`refundgate sim --core`): files
//! are byte vectors, each with the content a crash would leave, and the directory entries as
//! the last directory sync left them. Faults come from the caller (and the seed): a disk that
//! is full (ENOSPC), syncs that fail, writes torn in half, and crashes.
//!
//! # Model
//!
//! - A write changes what reads see at once; it reaches the platter only with a successful
//!   `fdatasync`/`fsync` of its file. A failed sync may lose the writes it covered even though
//!   reads still return them (as Linux marks the pages clean after a writeback error): each
//!   such write is dropped or kept pending, as the disk's own seeded generator decides.
//! - Creations, renames and removals reach the platter only with a sync of their directory
//!   (new directories with a sync of their parent).
//! - [`SimDisk::crash`] keeps what reached the platter, plus, per file, a prefix of its
//!   pending writes in order (the last one possibly torn), as a disk may write back some of
//!   what it was given. Handles opened before the crash fail from then on (EIO), and the
//!   directory locks are gone with the process that held them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::storage::{DirLock, Storage, StorageFile, LOCK_FILE_NAME};

/// The simulated disk (cheap to clone: clones share the disk).
#[derive(Debug, Clone)]
pub struct SimDisk {
    inner: Arc<Mutex<Disk>>,
}

/// What the disk did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskStats {
    /// Writes attempted.
    pub writes: u64,
    /// File syncs attempted.
    pub syncs: u64,
    /// Writes refused with ENOSPC.
    pub enospc: u64,
    /// Syncs failed by injection.
    pub failed_syncs: u64,
    /// Writes torn by injection.
    pub torn_writes: u64,
    /// Crashes.
    pub crashes: u64,
    /// Pending writes a crash kept (whole or torn) though never synced.
    pub kept_unsynced: u64,
}

#[derive(Debug)]
struct Disk {
    /// Bumped by every crash: handles of an older generation fail.
    generation: u64,
    nodes: HashMap<u64, Node>,
    next_node: u64,
    names: BTreeMap<PathBuf, u64>,
    durable_names: BTreeMap<PathBuf, u64>,
    dirs: BTreeSet<PathBuf>,
    durable_dirs: BTreeSet<PathBuf>,
    locked: BTreeSet<PathBuf>,
    full: bool,
    fail_syncs: u32,
    tear_writes: u32,
    rng: u64,
    stats: DiskStats,
    /// The file of the last successful sync and its platter before it (for
    /// [`SimDisk::lose_synced_tail`]).
    last_sync: Option<(u64, Vec<u8>)>,
}

#[derive(Debug, Default)]
struct Node {
    /// What reads return.
    data: Vec<u8>,
    /// What a crash keeps for sure.
    platter: Vec<u8>,
    /// Writes since the last successful sync, in order: `(offset, bytes)`.
    pending: Vec<(u64, Vec<u8>)>,
}

impl Node {
    fn apply(target: &mut Vec<u8>, offset: u64, bytes: &[u8]) {
        let start = offset as usize;
        let end = start + bytes.len();
        if target.len() < end {
            target.resize(end, 0);
        }
        target[start..end].copy_from_slice(bytes);
    }
}

impl Disk {
    /// Forgets files no name (current or durable) refers to any more.
    fn collect(&mut self) {
        let names = &self.names;
        let durable = &self.durable_names;
        self.nodes
            .retain(|id, _| names.values().any(|n| n == id) || durable.values().any(|n| n == id));
    }

    fn next(&mut self, n: u64) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % n.max(1)
    }

    fn parent_exists(&self, path: &Path) -> io::Result<()> {
        match path.parent() {
            Some(parent) if self.dirs.contains(parent) => Ok(()),
            _ => Err(io::Error::from(io::ErrorKind::NotFound)),
        }
    }

    fn node(&mut self, id: u64, generation: u64) -> io::Result<&mut Node> {
        if generation != self.generation {
            return Err(io::Error::other(
                "simulated disk: handle from before a crash",
            ));
        }
        self.nodes
            .get_mut(&id)
            .ok_or_else(|| io::Error::other("simulated disk: file vanished"))
    }

    fn sync(&mut self, id: u64, generation: u64) -> io::Result<()> {
        self.stats.syncs += 1;
        if self.fail_syncs > 0 {
            self.fail_syncs -= 1;
            self.stats.failed_syncs += 1;
            let pending = std::mem::take(&mut self.node(id, generation)?.pending);
            // Each write the failed sync covered is lost from the platter (reads still see
            // it) or stays pending, as a kernel after a writeback error may do either.
            let kept: Vec<(u64, Vec<u8>)> =
                pending.into_iter().filter(|_| self.next(2) == 0).collect();
            self.node(id, generation)?.pending = kept;
            return Err(io::Error::other("simulated disk: sync failed (EIO)"));
        }
        let node = self.node(id, generation)?;
        let before = node.platter.clone();
        for (offset, bytes) in std::mem::take(&mut node.pending) {
            Node::apply(&mut node.platter, offset, &bytes);
        }
        self.last_sync = Some((id, before));
        Ok(())
    }
}

impl SimDisk {
    /// An empty disk with the directory `root` (durable), its failures and kept writes drawn
    /// from `seed`.
    pub fn new(root: &Path, seed: u64) -> SimDisk {
        let mut dirs = BTreeSet::new();
        for a in root.ancestors() {
            dirs.insert(a.to_path_buf());
        }
        SimDisk {
            inner: Arc::new(Mutex::new(Disk {
                generation: 0,
                nodes: HashMap::new(),
                next_node: 1,
                names: BTreeMap::new(),
                durable_names: BTreeMap::new(),
                durable_dirs: dirs.clone(),
                dirs,
                locked: BTreeSet::new(),
                full: false,
                fail_syncs: 0,
                tear_writes: 0,
                rng: seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1,
                stats: DiskStats::default(),
                last_sync: None,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Disk> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// ENOSPC on (every write and creation fails, nothing written) or off.
    pub fn set_full(&self, full: bool) {
        self.lock().full = full;
    }

    /// Whether the disk is full.
    pub fn is_full(&self) -> bool {
        self.lock().full
    }

    /// The next `n` file syncs fail.
    pub fn fail_next_syncs(&self, n: u32) {
        self.lock().fail_syncs = n;
    }

    /// The next `n` writes write their first half and fail.
    pub fn tear_next_writes(&self, n: u32) {
        self.lock().tear_writes = n;
    }

    /// What the disk did so far.
    pub fn stats(&self) -> DiskStats {
        self.lock().stats
    }

    /// A disk that lies about `fdatasync` (for the simulator's `lost-synced-writes`
    /// mutation): undoes the last successful sync, as if it had never reached the platter.
    pub fn lose_synced_tail(&self) {
        let mut d = self.lock();
        if let Some((id, before)) = d.last_sync.take() {
            if let Some(node) = d.nodes.get_mut(&id) {
                node.platter = before;
            }
        }
    }

    /// Power loss: every file goes back to what reached the platter plus, in order, a
    /// prefix of its pending writes (`keep_unsynced`: possibly some, the last one possibly
    /// torn; else none); directory entries go back to the last sync of their directory;
    /// locks are released and older handles fail. Faults are cleared.
    pub fn crash(&self, keep_unsynced: bool) {
        let mut d = self.lock();
        d.generation += 1;
        d.stats.crashes += 1;
        d.dirs = d.durable_dirs.clone();
        let dirs = d.dirs.clone();
        let names: BTreeMap<PathBuf, u64> = d
            .durable_names
            .iter()
            .filter(|(path, _)| path.parent().is_some_and(|p| dirs.contains(p)))
            .map(|(p, id)| (p.clone(), *id))
            .collect();
        d.durable_names = names.clone();
        d.names = names;
        let live: BTreeSet<u64> = d.names.values().copied().collect();
        d.nodes.retain(|id, _| live.contains(id));
        let ids: Vec<u64> = live.into_iter().collect();
        for id in ids {
            let pending = d
                .nodes
                .get_mut(&id)
                .map(|n| std::mem::take(&mut n.pending))
                .unwrap_or_default();
            let mut keep = if keep_unsynced && !pending.is_empty() {
                d.next(pending.len() as u64 + 1) as usize
            } else {
                0
            };
            keep = keep.min(pending.len());
            let tear_last = keep > 0 && d.next(3) == 0;
            let cut = if tear_last {
                let len = pending[keep - 1].1.len() as u64;
                Some(d.next(len.max(1)) as usize)
            } else {
                None
            };
            d.stats.kept_unsynced += keep as u64;
            let Some(node) = d.nodes.get_mut(&id) else {
                continue;
            };
            for (i, (offset, bytes)) in pending.iter().take(keep).enumerate() {
                let bytes = match cut {
                    Some(cut) if i + 1 == keep => &bytes[..cut],
                    _ => &bytes[..],
                };
                Node::apply(&mut node.platter, *offset, bytes);
            }
            node.data = node.platter.clone();
        }
        d.locked.clear();
        d.full = false;
        d.fail_syncs = 0;
        d.tear_writes = 0;
    }
}

/// An open file of a [`SimDisk`].
struct SimFile {
    disk: Arc<Mutex<Disk>>,
    node: u64,
    generation: u64,
    writable: bool,
}

impl SimFile {
    fn lock(&self) -> MutexGuard<'_, Disk> {
        self.disk
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Releases a directory lock of a [`SimDisk`] when dropped.
struct SimLockGuard {
    disk: Arc<Mutex<Disk>>,
    dir: PathBuf,
    generation: u64,
}

impl Drop for SimLockGuard {
    fn drop(&mut self) {
        let mut d = self
            .disk
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if d.generation == self.generation {
            d.locked.remove(&self.dir);
        }
    }
}

fn no_space() -> io::Error {
    io::Error::from(io::ErrorKind::StorageFull)
}

impl Storage for SimDisk {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut d = self.lock();
        let missing: Vec<PathBuf> = dir
            .ancestors()
            .filter(|a| !d.dirs.contains(*a))
            .map(Path::to_path_buf)
            .collect();
        if !missing.is_empty() && d.full {
            return Err(no_space());
        }
        d.dirs.extend(missing);
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let d = self.lock();
        if !d.dirs.contains(dir) {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        Ok(d.names
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
            .collect())
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn StorageFile>> {
        let mut d = self.lock();
        d.parent_exists(path)?;
        if d.names.contains_key(path) {
            return Err(io::Error::from(io::ErrorKind::AlreadyExists));
        }
        if d.full {
            d.stats.enospc += 1;
            return Err(no_space());
        }
        let id = d.next_node;
        d.next_node += 1;
        d.nodes.insert(id, Node::default());
        d.names.insert(path.to_path_buf(), id);
        Ok(Box::new(SimFile {
            disk: Arc::clone(&self.inner),
            node: id,
            generation: d.generation,
            writable: true,
        }))
    }

    fn open(&self, path: &Path, writable: bool) -> io::Result<Box<dyn StorageFile>> {
        let d = self.lock();
        let id = *d
            .names
            .get(path)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        Ok(Box::new(SimFile {
            disk: Arc::clone(&self.inner),
            node: id,
            generation: d.generation,
            writable,
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut d = self.lock();
        d.parent_exists(to)?;
        let id = d
            .names
            .remove(from)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        d.names.insert(to.to_path_buf(), id);
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut d = self.lock();
        d.names
            .remove(path)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        d.collect();
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut d = self.lock();
        if !d.dirs.contains(dir) {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        let in_dir = |p: &PathBuf| p.parent() == Some(dir);
        let entries: Vec<(PathBuf, u64)> = d
            .names
            .iter()
            .filter(|(p, _)| in_dir(p))
            .map(|(p, id)| (p.clone(), *id))
            .collect();
        d.durable_names.retain(|p, _| !in_dir(p));
        d.durable_names.extend(entries);
        let subdirs: Vec<PathBuf> = d.dirs.iter().filter(|p| in_dir(p)).cloned().collect();
        d.durable_dirs.retain(|p| !in_dir(p));
        d.durable_dirs.extend(subdirs);
        d.collect();
        Ok(())
    }

    fn lock_dir(&self, dir: &Path) -> io::Result<DirLock> {
        let mut d = self.lock();
        if !d.dirs.contains(dir) {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        if !d.locked.insert(dir.to_path_buf()) {
            return Err(io::Error::from(io::ErrorKind::WouldBlock));
        }
        let lock_file = dir.join(LOCK_FILE_NAME);
        if !d.names.contains_key(&lock_file) && !d.full {
            let id = d.next_node;
            d.next_node += 1;
            d.nodes.insert(id, Node::default());
            d.names.insert(lock_file, id);
        }
        Ok(DirLock::from_guard(SimLockGuard {
            disk: Arc::clone(&self.inner),
            dir: dir.to_path_buf(),
            generation: d.generation,
        }))
    }
}

impl StorageFile for SimFile {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut d = self.lock();
        d.stats.writes += 1;
        if !self.writable {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        if d.full {
            d.stats.enospc += 1;
            return Err(no_space());
        }
        let torn = d.tear_writes > 0;
        let bytes = if torn {
            d.tear_writes -= 1;
            d.stats.torn_writes += 1;
            &buf[..buf.len() / 2]
        } else {
            buf
        };
        let node = d.node(self.node, self.generation)?;
        Node::apply(&mut node.data, offset, bytes);
        node.pending.push((offset, bytes.to_vec()));
        if torn {
            return Err(io::Error::other("simulated disk: write torn (EIO)"));
        }
        Ok(())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut d = self.lock();
        let node = d.node(self.node, self.generation)?;
        let start = (offset as usize).min(node.data.len());
        let n = buf.len().min(node.data.len() - start);
        buf[..n].copy_from_slice(&node.data[start..start + n]);
        Ok(n)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.lock().sync(self.node, self.generation)
    }

    fn sync_all(&self) -> io::Result<()> {
        self.lock().sync(self.node, self.generation)
    }

    fn size(&self) -> io::Result<u64> {
        let mut d = self.lock();
        Ok(d.node(self.node, self.generation)?.data.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(disk: &SimDisk, path: &Path) -> Vec<u8> {
        let file = disk.open(path, false).unwrap();
        let mut buf = vec![0u8; file.size().unwrap() as usize];
        let n = file.read_at(&mut buf, 0).unwrap();
        buf.truncate(n);
        buf
    }

    #[test]
    fn a_crash_keeps_synced_bytes_and_dir_synced_names_only() {
        let root = Path::new("/sim");
        let disk = SimDisk::new(root, 1);
        let a = root.join("a");
        let f = disk.create(&a).unwrap();
        f.write_at(b"hello", 0).unwrap();
        f.sync_data().unwrap();
        disk.sync_dir(root).unwrap();
        f.write_at(b"HELLO world", 0).unwrap();
        let b = root.join("b");
        disk.create(&b).unwrap().sync_all().unwrap();
        disk.crash(false);
        assert_eq!(read_all(&disk, &a), b"hello");
        assert!(disk.open(&b, false).is_err(), "b was never dir-synced");
        assert!(f.write_at(b"x", 0).is_err(), "handles die with the crash");
    }

    #[test]
    fn a_rename_needs_a_dir_sync_and_a_failed_sync_may_lose_what_reads_show() {
        let root = Path::new("/sim");
        let disk = SimDisk::new(root, 7);
        let tmp = root.join("s.tmp");
        let f = disk.create(&tmp).unwrap();
        f.write_at(b"snap", 0).unwrap();
        f.sync_all().unwrap();
        disk.sync_dir(root).unwrap();
        disk.rename(&tmp, &root.join("s")).unwrap();
        disk.crash(false);
        assert_eq!(disk.list(root).unwrap(), vec!["s.tmp".to_string()]);

        let g = disk.open(&tmp, true).unwrap();
        disk.fail_next_syncs(1);
        g.write_at(b"SNAP", 0).unwrap();
        assert!(g.sync_data().is_err());
        assert_eq!(read_all(&disk, &tmp), b"SNAP", "reads see the failed write");
        g.sync_data().unwrap();
        disk.crash(false);
        let after = read_all(&disk, &tmp);
        assert!(after == b"SNAP" || after == b"snap", "{after:?}");
    }

    #[test]
    fn a_full_disk_refuses_writes_and_the_lock_is_exclusive() {
        let root = Path::new("/sim");
        let disk = SimDisk::new(root, 3);
        let f = disk.create(&root.join("a")).unwrap();
        disk.set_full(true);
        assert_eq!(
            f.write_at(b"x", 0).unwrap_err().kind(),
            io::ErrorKind::StorageFull
        );
        disk.set_full(false);
        let held = disk.lock_dir(root).unwrap();
        assert_eq!(
            disk.lock_dir(root).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        drop(held);
        assert!(disk.lock_dir(root).is_ok());
    }

    fn replayed(recovered: &crate::journal::Recovered) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        recovered
            .replay(|seq, payload| out.push((seq, payload.to_vec())))
            .unwrap();
        out
    }

    #[test]
    fn a_stepped_journal_writes_only_when_stepped_and_a_crash_keeps_what_was_synced() {
        use crate::journal::{Journal, Options};
        let root = Path::new("/sim");
        let dir = root.join("journal");
        let disk = SimDisk::new(root, 11);
        let options = || Options {
            segment_bytes: 4 * 4096,
            storage: Arc::new(disk.clone()),
            stepped: true,
            ..Options::default()
        };
        let (journal, _) = Journal::open(&dir, options()).unwrap();
        let mut tickets = Vec::new();
        for i in 0..200u32 {
            tickets.push(
                journal
                    .enqueue(format!("record {i:0100}").into_bytes())
                    .unwrap(),
            );
            if i % 7 == 6 {
                assert!(!journal.is_durable(tickets[tickets.len() - 1]));
                assert_eq!(journal.queued(), 7);
                assert_eq!(journal.step(), 7);
                assert!(journal.is_durable(tickets[tickets.len() - 1]));
            }
        }
        assert!(journal.durable_seq() == 196 && journal.queued() == 4);
        // A failed sync drops the batch; the next step rewrites and goes on.
        disk.fail_next_syncs(1);
        assert_eq!(journal.step(), 4);
        assert!(!journal.is_durable(tickets[199]));
        assert_eq!(journal.durable_seq(), 196);
        journal.enqueue(b"after the failure".to_vec()).unwrap();
        journal.enqueue(b"never stepped".to_vec()).unwrap();
        assert_eq!(journal.step(), 2);
        journal.enqueue(b"lost in the crash".to_vec()).unwrap();
        drop(journal);
        disk.crash(true);
        let (journal, recovered) = Journal::open(&dir, options()).unwrap();
        let records = replayed(&recovered);
        assert_eq!(records.len(), 198, "{:?}", records.last());
        assert_eq!(records[196], (197, b"after the failure".to_vec()));
        let segments = disk.list(&dir).unwrap();
        let segments = segments.iter().filter(|n| n.ends_with(".seg")).count();
        assert!(segments >= 2, "rotated over several segments: {segments}");
        drop(journal);
    }
}
