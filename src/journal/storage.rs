//! The storage seam: every file operation the journal performs goes through [`Storage`], so
//! tests can count syncs and inject write, sync and permission faults ([`FaultyStorage`]).
//!
//! Directories are created `0700` and files `0600` (DOMAIN §10: journal and queue files hold
//! card data; only the gateway's user may read them).

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// File-system operations on a journal directory.
pub trait Storage: fmt::Debug + Send + Sync + 'static {
    /// Creates `dir` and any missing parents; succeeds if it already exists.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Lists the file names (not paths) in `dir`, in no particular order.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Creates a new file for reading and writing; fails if it already exists.
    fn create(&self, path: &Path) -> io::Result<Box<dyn StorageFile>>;
    /// Opens an existing file, read-only unless `writable`.
    fn open(&self, path: &Path, writable: bool) -> io::Result<Box<dyn StorageFile>>;
    /// Renames `from` to `to`, replacing `to` if it exists.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Makes the directory entries of `dir` (creations, renames, removals) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Takes an exclusive advisory lock on `dir` (file `LOCK`, `flock`) for as long as the
    /// guard lives; fails with [`io::ErrorKind::WouldBlock`] if another journal holds it.
    fn lock_dir(&self, dir: &Path) -> io::Result<DirLock>;
}

/// The name of the lock file in a journal directory.
pub const LOCK_FILE_NAME: &str = "LOCK";

/// Holds a journal directory's lock until dropped.
pub struct DirLock {
    _held: Held,
}

/// What a [`DirLock`] holds: the `flock`ed file, or another storage's guard.
enum Held {
    File(#[allow(dead_code)] File),
    Guard(#[allow(dead_code)] Box<dyn Send + Sync>),
}

impl DirLock {
    /// A lock held by `guard` until the lock is dropped (for a [`Storage`] that is not the
    /// file system, such as the simulator's disk: the guard's `Drop` releases it).
    pub fn from_guard(guard: impl Send + Sync + 'static) -> DirLock {
        DirLock {
            _held: Held::Guard(Box::new(guard)),
        }
    }
}

impl fmt::Debug for DirLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self._held {
            Held::File(_) => "file",
            Held::Guard(_) => "guard",
        };
        f.debug_struct("DirLock").field("held", &kind).finish()
    }
}

/// An open file with positioned I/O.
pub trait StorageFile: Send + Sync {
    /// Writes all of `buf` at `offset` (`pwrite`, repeated until done).
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Reads at `offset` until `buf` is full or the file ends; returns the bytes read.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Makes written data durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;
    /// Makes written data and metadata durable (`fsync`).
    fn sync_all(&self) -> io::Result<()>;
    /// The file's size in bytes.
    fn size(&self) -> io::Result<u64>;
}

/// The real file system (std only; `pwrite` through [`FileExt::write_all_at`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct FsStorage;

/// A [`File`] behind the [`StorageFile`] seam.
#[derive(Debug)]
struct FsFile(File);

/// Fault switches and counters shared between a [`FaultyStorage`] and the test driving it.
#[derive(Debug, Default)]
pub struct Faults {
    fail_writes: AtomicBool,
    fail_syncs: AtomicBool,
    hang_syncs: AtomicBool,
    read_only: AtomicBool,
    writes: AtomicU64,
    syncs: AtomicU64,
    failed: AtomicU64,
}

/// A [`Storage`] over the real file system that counts writes and syncs and fails on demand.
///
/// For tests and benches. An injected write fault writes the first half of the buffer and
/// then fails, like a torn write; an injected sync fault fails without syncing, leaving the
/// written bytes in the page cache, like a kernel that reports a writeback error.
#[derive(Debug, Clone)]
pub struct FaultyStorage {
    faults: Arc<Faults>,
}

/// A file opened through a [`FaultyStorage`].
struct FaultyFile {
    inner: FsFile,
    faults: Arc<Faults>,
}

/// Mode of the directories the journal creates.
pub const DIR_MODE: u32 = 0o700;
/// Mode of the files the journal creates.
pub const FILE_MODE: u32 = 0o600;

fn create_private_dir_all(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
}

fn create_private_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
}

impl Storage for FsStorage {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        create_private_dir_all(dir)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(dir)? {
            if let Ok(name) = entry?.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn StorageFile>> {
        Ok(Box::new(FsFile(create_private_file(path)?)))
    }

    fn open(&self, path: &Path, writable: bool) -> io::Result<Box<dyn StorageFile>> {
        let file = OpenOptions::new().read(true).write(writable).open(path)?;
        Ok(Box::new(FsFile(file)))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn lock_dir(&self, dir: &Path) -> io::Result<DirLock> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .open(dir.join(LOCK_FILE_NAME))?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive)?;
        Ok(DirLock {
            _held: Held::File(file),
        })
    }
}

impl StorageFile for FsFile {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.0.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn sync_all(&self) -> io::Result<()> {
        self.0.sync_all()
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
}

impl Faults {
    /// Makes every following write fail (after writing half its bytes) until cleared.
    pub fn set_fail_writes(&self, on: bool) {
        self.fail_writes.store(on, Ordering::SeqCst);
    }

    /// Makes every following sync block (a hung disk) until cleared, then sync.
    pub fn set_hang_syncs(&self, on: bool) {
        self.hang_syncs.store(on, Ordering::SeqCst);
    }

    /// Makes every following sync fail (without syncing) until cleared.
    pub fn set_fail_syncs(&self, on: bool) {
        self.fail_syncs.store(on, Ordering::SeqCst);
    }

    /// Makes creations, renames, removals and writable opens fail as on a read-only file system.
    pub fn set_read_only(&self, on: bool) {
        self.read_only.store(on, Ordering::SeqCst);
    }

    /// Writes attempted so far (failed ones included).
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    /// File syncs (`fdatasync` and `fsync`, not directory syncs) attempted so far.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::SeqCst)
    }

    /// Operations failed by injection so far.
    pub fn injected(&self) -> u64 {
        self.failed.load(Ordering::SeqCst)
    }

    fn fail(&self, what: &'static str) -> io::Error {
        self.failed.fetch_add(1, Ordering::SeqCst);
        io::Error::other(what)
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only.load(Ordering::SeqCst) {
            self.failed.fetch_add(1, Ordering::SeqCst);
            return Err(io::Error::from(io::ErrorKind::ReadOnlyFilesystem));
        }
        Ok(())
    }
}

impl FaultyStorage {
    /// A storage with no fault switched on, and the handle that switches faults.
    pub fn new() -> (Self, Arc<Faults>) {
        let faults = Arc::new(Faults::default());
        (
            Self {
                faults: Arc::clone(&faults),
            },
            faults,
        )
    }
}

impl Storage for FaultyStorage {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        if !dir.exists() {
            self.faults.check_writable()?;
        }
        create_private_dir_all(dir)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        FsStorage.list(dir)
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn StorageFile>> {
        self.faults.check_writable()?;
        let file = create_private_file(path)?;
        Ok(Box::new(FaultyFile {
            inner: FsFile(file),
            faults: Arc::clone(&self.faults),
        }))
    }

    fn open(&self, path: &Path, writable: bool) -> io::Result<Box<dyn StorageFile>> {
        if writable {
            self.faults.check_writable()?;
        }
        let file = OpenOptions::new().read(true).write(writable).open(path)?;
        Ok(Box::new(FaultyFile {
            inner: FsFile(file),
            faults: Arc::clone(&self.faults),
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.faults.check_writable()?;
        fs::rename(from, to)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        self.faults.check_writable()?;
        fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        FsStorage.sync_dir(dir)
    }

    fn lock_dir(&self, dir: &Path) -> io::Result<DirLock> {
        self.faults.check_writable()?;
        FsStorage.lock_dir(dir)
    }
}

impl StorageFile for FaultyFile {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.faults.writes.fetch_add(1, Ordering::SeqCst);
        self.faults.check_writable()?;
        if self.faults.fail_writes.load(Ordering::SeqCst) {
            self.inner.write_at(&buf[..buf.len() / 2], offset)?;
            return Err(self.faults.fail("injected write fault"));
        }
        self.inner.write_at(buf, offset)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.inner.read_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.faults.syncs.fetch_add(1, Ordering::SeqCst);
        while self.faults.hang_syncs.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        if self.faults.fail_syncs.load(Ordering::SeqCst) {
            return Err(self.faults.fail("injected sync fault"));
        }
        self.inner.sync_data()
    }

    fn sync_all(&self) -> io::Result<()> {
        self.faults.syncs.fetch_add(1, Ordering::SeqCst);
        if self.faults.fail_syncs.load(Ordering::SeqCst) {
            return Err(self.faults.fail("injected sync fault"));
        }
        self.inner.sync_all()
    }

    fn size(&self) -> io::Result<u64> {
        self.inner.size()
    }
}
