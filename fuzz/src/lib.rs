//! Shared pieces of the fuzz targets: an allocation-size probe, an in-memory journal
//! [`Storage`], the codec round-trip checks and a small ledger workload.
//!
//! Every check here panics on a violated property, which libFuzzer reports as a crash.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

pub mod ledger_ops;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use refundgate::iso8583::json::{from_json, to_json};
use refundgate::iso8583::{decode, decode_partial, encode, Message, Spec, Value};
use refundgate::journal::storage::DirLock;
use refundgate::journal::{Storage, StorageFile};

// === allocation probe ===

/// The system allocator, recording the largest single allocation while [`largest_alloc`]
/// measures.
pub struct Probe;

static MEASURING: AtomicBool = AtomicBool::new(false);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to `System` unchanged; only counts.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Probe {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if MEASURING.load(Ordering::Relaxed) {
            LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        }
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if MEASURING.load(Ordering::Relaxed) {
            LARGEST.fetch_max(new_size, Ordering::Relaxed);
        }
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Probe = Probe;

/// Runs `f` and returns its result and the largest single allocation it made.
pub fn largest_alloc<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.store(0, Ordering::Relaxed);
    MEASURING.store(true, Ordering::Relaxed);
    let r = f();
    MEASURING.store(false, Ordering::Relaxed);
    (r, LARGEST.load(Ordering::Relaxed))
}

// === input helpers ===

/// Splits `data` into at most `max_cuts + 1` chunks at points chosen by `cuts` (each byte a
/// position as a fraction of the length), in order.
pub fn split<'a>(data: &'a [u8], cuts: &[u8]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = cuts
        .iter()
        .map(|&c| usize::from(c) * data.len() / 255)
        .collect();
    points.sort_unstable();
    let mut out = Vec::with_capacity(points.len() + 1);
    let mut from = 0;
    for p in points.into_iter().chain([data.len()]) {
        out.push(&data[from..p]);
        from = p;
    }
    out
}

// === codec checks ===

/// Calls every typed accessor of a message (none may panic).
pub fn touch(msg: &Message<'_>) {
    let _ = msg.pan().map(|p| p.masked());
    let _ = msg.processing_code();
    let _ = msg.amount();
    let _ = msg.transmission();
    let _ = msg.stan();
    let _ = msg.local_date();
    let _ = msg.pos_condition();
    let _ = msg.rrn();
    let _ = msg.auth_code();
    let _ = msg.response_code();
    let _ = msg.terminal();
    let _ = msg.merchant();
    let _ = msg.reason();
    let _ = msg.currency();
    let _ = msg.network_code();
    let _ = msg.original_data();
    let _ = msg.cup60();
    let _ = msg.cup61();
    let _ = msg.mac();
    for n in 0..=130 {
        let _ = msg
            .field(n)
            .map(|f| (f.digits().map(|d| d.to_string_lossy()), f.text()));
        let _ = msg.number(n);
    }
}

/// Decodes `data` with `spec`; when it decodes, re-encodes it two ways (elements copied off
/// the wire, and through the JSON view) and checks both decode to the same message.
pub fn codec_round_trip(spec: &Spec, data: &[u8]) {
    let (partial, partial_err) = decode_partial(spec, data);
    touch(&partial);
    let _ = to_json(&partial, false);
    let msg = match decode(spec, data) {
        Ok(msg) => msg,
        Err(e) => {
            assert_eq!(Some(e), partial_err, "decode and decode_partial disagree");
            let _ = e.to_string();
            return;
        }
    };
    assert!(
        partial_err.is_none(),
        "decode_partial failed where decode did not"
    );
    touch(&msg);
    let _ = to_json(&msg, false);

    // decode → encode (wire copies) → decode: the same elements.
    let fields: Vec<(u8, Value<'_>)> = msg
        .present()
        .map(|n| (n, Value::Wire(msg.field(usize::from(n)).unwrap())))
        .collect();
    let mut out = BytesMut::new();
    encode(spec, msg.mti(), &fields, &mut out).expect("a decoded message re-encodes");
    let again = decode(spec, &out).expect("a re-encoded message decodes");
    assert_same(&msg, &again);

    // decode → JSON → encode → decode: the same elements, and the same JSON.
    let view = to_json(&msg, true);
    let mut out = BytesMut::new();
    from_json(spec, &view, &mut out).expect("the unmasked JSON view encodes");
    let third = decode(spec, &out).expect("the JSON view's encoding decodes");
    assert_same(&msg, &third);
    assert_eq!(to_json(&third, true), view, "JSON view round trip");
}

/// Asserts two messages carry the same MTI and element bytes.
pub fn assert_same(a: &Message<'_>, b: &Message<'_>) {
    assert_eq!(a.mti(), b.mti(), "MTI differs after round trip");
    let pa: Vec<u8> = a.present().collect();
    let pb: Vec<u8> = b.present().collect();
    assert_eq!(pa, pb, "present elements differ after round trip");
    for n in pa {
        let n = usize::from(n);
        let (fa, fb) = (a.field(n).unwrap(), b.field(n).unwrap());
        assert_eq!(fa.units, fb.units, "DE{n} length differs after round trip");
        assert_eq!(fa.bytes, fb.bytes, "DE{n} differs after round trip");
    }
}

// === in-memory journal storage ===

/// A [`Storage`] held in memory: directories are path prefixes, files byte vectors.
#[derive(Debug, Default, Clone)]
pub struct MemStorage {
    files: Arc<Mutex<BTreeMap<PathBuf, Arc<Mutex<Vec<u8>>>>>>,
}

struct MemFile(Arc<Mutex<Vec<u8>>>);

impl MemStorage {
    /// Puts a file with `bytes` at `path`.
    pub fn put(&self, path: &Path, bytes: Vec<u8>) {
        self.files
            .lock()
            .unwrap()
            .insert(path.to_path_buf(), Arc::new(Mutex::new(bytes)));
    }
}

fn not_found() -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, "no such file")
}

impl Storage for MemStorage {
    fn create_dir_all(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        Ok(self
            .files
            .lock()
            .unwrap()
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
            .collect())
    }

    fn create(&self, path: &Path) -> io::Result<Box<dyn StorageFile>> {
        let file = Arc::new(Mutex::new(Vec::new()));
        let mut files = self.files.lock().unwrap();
        if files.contains_key(path) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, "exists"));
        }
        files.insert(path.to_path_buf(), Arc::clone(&file));
        Ok(Box::new(MemFile(file)))
    }

    fn open(&self, path: &Path, _writable: bool) -> io::Result<Box<dyn StorageFile>> {
        let files = self.files.lock().unwrap();
        let file = files.get(path).ok_or_else(not_found)?;
        Ok(Box::new(MemFile(Arc::clone(file))))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut files = self.files.lock().unwrap();
        let file = files.remove(from).ok_or_else(not_found)?;
        files.insert(to.to_path_buf(), file);
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        self.files
            .lock()
            .unwrap()
            .remove(path)
            .map(|_| ())
            .ok_or_else(not_found)
    }

    fn sync_dir(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }

    fn lock_dir(&self, _dir: &Path) -> io::Result<DirLock> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "no locks in memory",
        ))
    }
}

impl StorageFile for MemFile {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut f = self.0.lock().unwrap();
        let end = offset as usize + buf.len();
        if f.len() < end {
            f.resize(end, 0);
        }
        f[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let f = self.0.lock().unwrap();
        let start = (offset as usize).min(f.len());
        let n = buf.len().min(f.len() - start);
        buf[..n].copy_from_slice(&f[start..start + n]);
        Ok(n)
    }

    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }

    fn sync_all(&self) -> io::Result<()> {
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.0.lock().unwrap().len() as u64)
    }
}

/// A journal snapshot file (header + `bytes`) with a valid checksum.
pub fn snapshot_file(seq: u64, bytes: &[u8]) -> Vec<u8> {
    refundgate::journal::snapshot::frame(seq, bytes)
}

/// Reads a little "program" off the fuzz input.
pub struct Input<'a>(pub &'a [u8]);

impl<'a> Input<'a> {
    /// The next byte (0 once the input is used up).
    pub fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    /// The next two bytes, big-endian.
    pub fn u16(&mut self) -> u16 {
        u16::from(self.u8()) << 8 | u16::from(self.u8())
    }

    /// Up to `n` bytes.
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }

    /// Whether the input is used up.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
