//! Weight matrices read straight from a model file mapped into memory.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Mutex, OnceLock, Weak};

use candle_core::quantized::GgmlDType;
use memmap2::{Mmap, MmapOptions};

use super::{kpacked, packed, quant, KPacked, Packed, Part, Source, MAX_ROWS};

/// Prompt rows per pass of the decode kernels over quantized weights: the
/// chunk's quantized activations (a few tens of KiB) stay in cache.
const PROMPT_CHUNK_ROWS: usize = 64;

/// A model file mapped read-only.
#[derive(Clone)]
pub struct MappedFile {
    map: Arc<Mmap>,
}

impl MappedFile {
    /// Maps `path`, asking the kernel to fault every page in now: one
    /// call for the whole file is far cheaper than a fault per page during
    /// the first token, and a page cache that already holds the file makes
    /// it a matter of page tables.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::File::open(path)?;
        // SAFETY: mapped read-only; modeld never writes under a loaded
        // model, and the cache replaces blobs by rename, which leaves an
        // existing mapping intact.
        let map = unsafe { MmapOptions::new().populate().map(&file)? };
        Ok(MappedFile { map: Arc::new(map) })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// The `features × inputs` matrix of `dtype` at `offset`; an error
    /// says why it cannot be used in place (out of the file, misaligned,
    /// rows not whole blocks, or a type the kernels do not read).
    pub fn matrix(
        &self,
        offset: usize,
        dtype: GgmlDType,
        features: usize,
        inputs: usize,
    ) -> Result<Mapped, String> {
        let readable = dtype == GgmlDType::F32 || quant::supported(dtype);
        if !readable {
            return Err(format!("{dtype:?} weights are converted at load"));
        }
        if !inputs.is_multiple_of(dtype.block_size()) {
            return Err(format!("rows of {inputs} are not whole {dtype:?} blocks"));
        }
        let len = features * inputs / dtype.block_size() * dtype.type_size();
        let end = offset.checked_add(len).filter(|end| *end <= self.map.len());
        if end.is_none() {
            return Err(format!("{len} bytes at {offset} run past the file's end"));
        }
        let align = if dtype == GgmlDType::F32 {
            4
        } else {
            quant::alignment(dtype)
        };
        if !(self.map.as_ptr() as usize + offset).is_multiple_of(align) {
            return Err(format!(
                "weights at offset {offset} are not {align}-byte aligned"
            ));
        }
        Ok(Mapped {
            file: self.clone(),
            offset,
            len,
            dtype,
            features,
            inputs,
            packed: None,
        })
    }

    /// Lets the kernel drop `len` bytes at `offset` from this process's
    /// pages: they stay in the page cache, and come back on a read.
    fn release(&self, offset: usize, len: usize) -> std::io::Result<()> {
        // SAFETY: the map is a read-only shared mapping of a file that is
        // not written under it, so a page read again after MADV_DONTNEED
        // holds the same bytes; nothing is lost.
        unsafe {
            self.map
                .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len)
        }
    }
}

/// A weight matrix inside a [`MappedFile`]: f32 or GGML blocks.
#[derive(Clone)]
pub struct Mapped {
    file: MappedFile,
    offset: usize,
    len: usize,
    dtype: GgmlDType,
    features: usize,
    inputs: usize,
    /// The matrix repacked for the kernels, which products read instead
    /// of the file once it is filled.
    packed: Option<Arc<OnceLock<Repacked>>>,
}

/// A matrix in the layout its kernels want.
pub enum Repacked {
    /// Q8_0 or Q5_0.
    Q8(Packed),
    /// Q4_K, Q5_K or Q6_K.
    K(KPacked),
}

/// Whether products read `dtype` repacked on this CPU.
pub fn repacks(dtype: GgmlDType) -> bool {
    quant::q8_format(dtype).is_some_and(packed::worth_it)
        || quant::k_kind(dtype).is_some() && kpacked::worth_it()
}

impl std::fmt::Debug for Mapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?} {}x{} at {}",
            self.dtype, self.features, self.inputs, self.offset
        )
    }
}

impl Mapped {
    pub fn features(&self) -> usize {
        self.features
    }

    pub fn inputs(&self) -> usize {
        self.inputs
    }

    fn bytes(&self) -> &[u8] {
        &self.file.map[self.offset..self.offset + self.len]
    }

    /// For products: Q8_0, Q5_0 and k-quant weights are repacked into the
    /// layout their kernels want, on a thread of their own after the load,
    /// so that the first token need not wait for it; products read the
    /// file until the copy is ready, with the same results bit for bit.
    /// The copy is anonymous memory of about the same size (k-quants 1 to
    /// 3% more, for their unpacked scales), and the file's pages are then
    /// released from this process, so the matrix is resident once. Row
    /// lookups still read the file, and fault in only the rows they read.
    /// Other types, or a CPU without the kernels that read the layout
    /// ([`packed::worth_it`], [`kpacked::worth_it`]), keep the file's
    /// layout.
    pub fn for_products(mut self) -> Self {
        if !repacks(self.dtype) {
            return self;
        }
        let slot = Arc::new(OnceLock::new());
        repack_later(Repack {
            map: Arc::downgrade(&self.file.map),
            offset: self.offset,
            dtype: self.dtype,
            features: self.features,
            inputs: self.inputs,
            slot: Arc::downgrade(&slot),
        });
        self.packed = Some(slot);
        self
    }

    /// Repacks the matrix now if the background thread has not yet.
    pub fn repack_now(&self) {
        if let Some(slot) = self.packed.as_ref().filter(|slot| slot.get().is_none()) {
            if let Some(packed) = self.repacked(|| true) {
                let _ = slot.set(packed);
            }
        }
    }

    /// The matrix repacked, while `wanted()` holds (checked after each
    /// group). The file's pages are let go behind the work, a few hundred
    /// KiB at a time: the process holds the matrix twice for only that
    /// much, whenever its memory is measured.
    fn repacked(&self, wanted: impl Fn() -> bool) -> Option<Repacked> {
        let mut released = 0;
        let mut next = |done: usize| {
            if done - released >= RELEASE_BYTES || done == self.len {
                // The kernel maps a fault's neighbours too (64 KiB around
                // it by default), so reading on past a release maps some
                // pages behind it again, and reading a matrix's start maps
                // the end of the one before: each release goes back over
                // them, and the last over the whole matrix. Pages of
                // tensors in use come back on their next read.
                let back = if done == self.len { released } else { 0 };
                let from = (self.offset + released - back).saturating_sub(FAULT_AROUND_BYTES);
                let to = self.offset + done;
                if let Err(e) = self.file.release(from, to - from) {
                    tracing::debug!("could not release repacked weights' file pages: {e}");
                }
                released = done;
            }
            wanted()
        };
        let (bytes, features, inputs) = (self.bytes(), self.features, self.inputs);
        if let Some(kind) = quant::k_kind(self.dtype) {
            let packed = KPacked::group_by_group(kind, bytes, features, inputs, &mut next);
            return packed.map(Repacked::K);
        }
        let format = quant::q8_format(self.dtype)?;
        let packed = Packed::group_by_group(format, bytes, features, inputs, &mut next);
        packed.map(Repacked::Q8)
    }

    pub fn source(&self) -> Source<'_> {
        match self.packed.as_ref().and_then(|slot| slot.get()) {
            Some(Repacked::Q8(packed)) => return Source::Packed(packed),
            Some(Repacked::K(packed)) => return Source::PackedK(packed),
            None => {}
        }
        self.file_source()
    }

    /// The matrix as the file stores it.
    fn file_source(&self) -> Source<'_> {
        let bytes = self.bytes();
        match self.dtype {
            GgmlDType::F32 => {
                // SAFETY: `matrix` checked the length and the 4-byte
                // alignment; every bit pattern is an f32.
                let values = unsafe {
                    std::slice::from_raw_parts(bytes.as_ptr() as *const f32, bytes.len() / 4)
                };
                Source::F32(values)
            }
            dtype => Source::Quant(dtype, bytes),
        }
    }

    pub fn part(&self) -> Part<'_> {
        Part {
            source: self.source(),
            features: self.features,
        }
    }

    /// `x` (`rows × inputs`) times the transpose: `rows × features`.
    pub fn forward(&self, x: &[f32], rows: usize) -> candle_core::Result<Vec<f32>> {
        if rows <= MAX_ROWS {
            let mut out = super::few_rows(&[self.part()], x, rows, self.inputs);
            return Ok(out.pop().expect("one part"));
        }
        match self.source() {
            Source::F32(w) => {
                let (features, inputs) = (self.features, self.inputs);
                let product = super::prompt_f32(x, rows, w, features, inputs);
                Ok(product.unwrap_or_else(|| gemm_f32(x, rows, w, features, inputs)))
            }
            Source::Quant(dtype, _) if quant::has_own_kernel(dtype) => Ok(self.in_chunks(x, rows)),
            Source::Quant(dtype, bytes) => {
                quant::matmul(dtype, bytes, x, rows, self.features, self.inputs)
            }
            Source::Packed(_) | Source::PackedK(_) => Ok(self.in_chunks(x, rows)),
        }
    }

    /// A prompt's product through the decode kernels, a chunk of rows at a
    /// time: they read each weight row once per chunk and beat candle's
    /// blocked product, whose dot products convert scales by calls.
    fn in_chunks(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(rows * self.features);
        for chunk in x.chunks(PROMPT_CHUNK_ROWS * self.inputs) {
            let n = chunk.len() / self.inputs;
            let part = super::few_rows(&[self.part()], chunk, n, self.inputs);
            out.extend(part.into_iter().next().expect("one part"));
        }
        out
    }

    /// Row `index` as f32 (an embedding lookup).
    pub fn row(&self, index: usize, out: &mut [f32]) {
        match self.file_source() {
            Source::F32(w) => out.copy_from_slice(&w[index * self.inputs..][..self.inputs]),
            Source::Quant(dtype, bytes) => {
                quant::dequantize_row(dtype, bytes, self.inputs, index, out)
            }
            Source::Packed(_) | Source::PackedK(_) => {
                unreachable!("the file's layout is never packed")
            }
        }
    }
}

/// How much of a matrix's file is let go at a time behind its repacking.
const RELEASE_BYTES: usize = 256 << 10;

/// More than the span around a page fault that Linux maps with it.
const FAULT_AROUND_BYTES: usize = 128 << 10;

/// A matrix waiting to be repacked; it does not keep its model loaded.
struct Repack {
    map: Weak<Mmap>,
    offset: usize,
    dtype: GgmlDType,
    features: usize,
    inputs: usize,
    slot: Weak<OnceLock<Repacked>>,
}

impl Repack {
    /// Repacks the matrix unless its model is gone, or goes meanwhile: the
    /// work then stops after the group at hand. Only the file is held
    /// meanwhile, and [`settle`] waits for it to be let go.
    fn run(self) {
        let _busy = BUSY.lock().unwrap_or_else(|e| e.into_inner());
        let Some(map) = self.map.upgrade() else {
            return; // The model was unloaded first.
        };
        let file = MappedFile { map };
        let matrix = match file.matrix(self.offset, self.dtype, self.features, self.inputs) {
            Ok(matrix) => matrix,
            Err(e) => return tracing::warn!("not repacking {:?} weights: {e}", self.dtype),
        };
        let packed = matrix.repacked(|| yield_to_prompts(|| self.slot.strong_count() > 0));
        if let (Some(packed), Some(slot)) = (packed, self.slot.upgrade()) {
            let _ = slot.set(packed);
        }
    }
}

/// Prompts running on the CPU now; see [`PromptRunning`].
static PROMPTS: AtomicUsize = AtomicUsize::new(0);

/// Held while a prompt of more than [`MAX_ROWS`] tokens runs: the
/// repacking thread then waits between groups, and the prompt has every
/// core. Prompts read matrices not yet repacked through the repacked
/// kernel anyway, packing each task's rows as it goes; with the thread
/// working beside it, a load's first 35-token prompt (1.1B, Q4_K_M) took
/// 0.48 to 0.73 s, and 0.45 to 0.48 s with it waiting.
pub struct PromptRunning(());

impl PromptRunning {
    pub fn start() -> Self {
        PROMPTS.fetch_add(1, SeqCst);
        PromptRunning(())
    }
}

impl Drop for PromptRunning {
    fn drop(&mut self) {
        PROMPTS.fetch_sub(1, SeqCst);
    }
}

/// How often a waiting repacking thread looks whether prompts are done.
const PROMPT_POLL: std::time::Duration = std::time::Duration::from_micros(500);

/// Waits while prompts run, unless the work is no longer `wanted` (its
/// model unloaded: an unload waits for the thread); then whether it is.
fn yield_to_prompts(wanted: impl Fn() -> bool) -> bool {
    while PROMPTS.load(SeqCst) > 0 {
        if !wanted() {
            return false;
        }
        std::thread::sleep(PROMPT_POLL);
    }
    wanted()
}

/// Held by the repacking thread while it works on a matrix.
static BUSY: Mutex<()> = Mutex::new(());

/// Calls [`settle`] when dropped: the last field of a model, so that its
/// matrices are gone first.
#[derive(Debug, Default)]
pub struct SettleOnDrop;

impl Drop for SettleOnDrop {
    fn drop(&mut self) {
        settle();
    }
}

/// Waits until the repacking thread holds no matrix of a model that is
/// gone: an unload then measures what it freed with the model's file
/// unmapped. A matrix of a model still loaded may take tens of
/// milliseconds to finish, or, while a prompt runs, until it ends.
pub fn settle() {
    drop(BUSY.lock().unwrap_or_else(|e| e.into_inner()));
}

/// Queues `job` for the one thread that repacks matrices, one after
/// another, so that a load's repacking takes one core and not the ones
/// the first tokens run on.
fn repack_later(job: Repack) {
    static QUEUE: OnceLock<Option<mpsc::Sender<Repack>>> = OnceLock::new();
    let queue = QUEUE.get_or_init(|| {
        let (sender, jobs) = mpsc::channel::<Repack>();
        let spawned = std::thread::Builder::new()
            .name("modeld-repack".into())
            .spawn(move || jobs.into_iter().for_each(Repack::run));
        match spawned {
            Ok(_) => Some(sender),
            Err(e) => {
                tracing::warn!("no thread to repack weights, which keep the file's layout: {e}");
                None
            }
        }
    });
    if let Some(queue) = queue {
        // The thread only ends with the process.
        let _ = queue.send(job);
    }
}

/// `x · wᵀ` by gemm's blocked product, on rayon's threads.
pub(super) fn gemm_f32(
    x: &[f32],
    rows: usize,
    w: &[f32],
    features: usize,
    inputs: usize,
) -> Vec<f32> {
    let mut out = vec![0f32; rows * features];
    // SAFETY: `out` is rows × features, `x` rows × inputs and `w`
    // features × inputs, all row-major; `w` is read as its transpose.
    unsafe {
        gemm::gemm(
            rows,
            features,
            inputs,
            out.as_mut_ptr(),
            1,
            features as isize,
            false,
            x.as_ptr(),
            1,
            inputs as isize,
            w.as_ptr(),
            inputs as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        );
    }
    out
}

/// The f32 matrices of a model's safetensors files, by tensor name.
pub struct MappedSafetensors {
    files: Vec<(MappedFile, usize, safetensors::tensor::Metadata)>,
}

impl MappedSafetensors {
    /// Maps every file and reads its header; an unreadable header is the
    /// weights loader's to report, so it just leaves that file out.
    pub fn open(paths: &[std::path::PathBuf]) -> std::io::Result<Self> {
        let mut files = Vec::new();
        for path in paths {
            let file = MappedFile::open(path)?;
            if let Ok((header, metadata)) = safetensors::SafeTensors::read_metadata(file.bytes()) {
                files.push((file, 8 + header, metadata));
            }
        }
        Ok(MappedSafetensors { files })
    }

    /// The 2-D f32 tensor `name` in place, if some file has it and it can
    /// be used without conversion.
    pub fn matrix(&self, name: &str) -> Option<Mapped> {
        self.files.iter().find_map(|(file, start, metadata)| {
            let info = metadata.info(name)?;
            let [features, inputs] = info.shape[..] else {
                return None;
            };
            if info.dtype != safetensors::Dtype::F32 {
                return None;
            }
            file.matrix(
                start + info.data_offsets.0,
                GgmlDType::F32,
                features,
                inputs,
            )
            .ok()
        })
    }
}
