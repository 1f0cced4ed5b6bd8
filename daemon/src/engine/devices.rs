//! Compute devices and their memory. There is one candle `Device` per GPU,
//! created once (CUDA start-up takes seconds) and shared by every model
//! placed on it. Memory is read per device: for a GPU, what the driver says
//! is in use; for the CPU, this process's anonymous resident memory, read
//! after handing freed heap back to the system so allocator caches cannot
//! skew it. After an unload the device is synchronized and its memory pool
//! trimmed, so the memory really is free again.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::Device;

use super::EngineError;

/// The devices in use, by name (`cpu`, `cuda:N`).
#[derive(Default)]
pub struct Devices {
    cuda: Mutex<HashMap<usize, Device>>,
}

impl Devices {
    /// The device for `cuda:index`, created on first use and then shared.
    pub fn cuda(&self, index: usize) -> Result<Device, EngineError> {
        let mut devices = self.cuda.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(device) = devices.get(&index) {
            return Ok(device.clone());
        }
        let device = Device::new_cuda(index)
            .map_err(|e| EngineError::Device(format!("cuda:{index}: {}", first_line(&e))))?;
        devices.insert(index, device.clone());
        Ok(device)
    }

    /// Creates a device for every GPU present and runs each kind of kernel
    /// generation uses once on it, so the first load or request pays
    /// neither for CUDA start-up nor for the driver compiling candle's
    /// kernel modules (the quantized one takes seconds). Returns how many
    /// GPUs there are.
    pub fn warm_up(&self) -> usize {
        let count = gpu_count();
        for index in 0..count {
            let warmed = self
                .cuda(index)
                .and_then(|device| run_each_kernel(&device).map_err(EngineError::from));
            if let Err(err) = warmed {
                tracing::warn!("cannot start cuda:{index}: {err}");
            }
        }
        count
    }
}

/// One small instance of every kind of operation a decode step or a load
/// runs: cuBLAS products in f32 and bf16, the fused norm, rotary and softmax
/// kernels, gathers, reductions, casts, and a Q8_0 product.
fn run_each_kernel(device: &Device) -> candle_core::Result<()> {
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{DType, Module, Tensor, D};
    let x = Tensor::ones((4, 256), DType::F32, device)?;
    let w = Tensor::ones((256, 256), DType::F32, device)?;
    let y = x.matmul(&w.t()?)?;
    let _ = x.to_dtype(DType::BF16)?.matmul(&w.to_dtype(DType::BF16)?)?;
    let y = candle_nn::ops::rms_norm(&y, &Tensor::ones(256, DType::F32, device)?, 1e-6)?;
    let y = candle_nn::ops::softmax_last_dim(&(candle_nn::ops::silu(&y)? * 0.5)?)?;
    let table = Tensor::ones((8, 32), DType::F32, device)?;
    let rows = table.index_select(&Tensor::new(&[1u32, 3], device)?, 0)?;
    let heads = Tensor::ones((1, 2, 2, 64), DType::F32, device)?;
    let _ = candle_nn::rotary_emb::rope(&heads, &rows, &rows)?;
    let _ = candle_nn::rotary_emb::rope_i(&heads, &rows, &rows)?;
    let _ = Tensor::cat(&[&y, &y], 0)?.argmax(D::Minus1)?;
    let q8 = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q8_0)?)?;
    let _ = q8.forward(&x)?;
    device.synchronize()
}

fn first_line(err: &candle_core::Error) -> String {
    err.to_string()
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// GPUs the CUDA driver can see; 0 without CUDA support or a driver.
pub fn gpu_count() -> usize {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::CudaContext;
        CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
    }
    #[cfg(not(feature = "cuda"))]
    0
}

/// Memory on `device` that this process holds, in bytes.
pub fn used_bytes(device: &Device) -> u64 {
    match device {
        Device::Cpu => {
            trim_heap();
            resident_rss()
        }
        other => cuda_memory(other).map_or(0, |(free, total)| total.saturating_sub(free)),
    }
}

/// Memory `device` has free right now, in bytes: the driver's figure for a
/// GPU, `MemAvailable` for the CPU; `None` when it cannot be read, which
/// callers treat as "unknown", never as "nothing free".
pub fn free_bytes(device: &Device) -> Option<u64> {
    match device {
        Device::Cpu => Some(crate::gpu::system_memory().available_bytes).filter(|&free| free > 0),
        other => cuda_memory(other).map(|(free, _)| free),
    }
}

/// Hands memory freed by an unload back: the CUDA pool is synchronized
/// and trimmed, the CPU heap returned to the system.
pub fn release(device: &Device) {
    match device {
        Device::Cpu => trim_heap(),
        other => {
            if let Err(err) = trim_cuda_pool(other) {
                tracing::warn!("cannot trim the CUDA memory pool: {err}");
            }
        }
    }
}

/// Allocations at least this large get their own mapping.
const OWN_MAPPING_BYTES: i32 = 256 << 10;

/// Makes every large allocation (weights, KV caches, big activations) a
/// mapping of its own, returned to the system when freed. glibc's default
/// threshold grows after each large free (up to 32 MiB), after which a
/// model's tensors land in the heap, where a later model's allocations
/// interleave with them and an unload cannot hand all the pages back.
/// Called once at start-up.
pub fn keep_large_allocations_returnable() {
    // Safety: mallopt only sets the allocator's tuning parameters.
    #[cfg(target_env = "gnu")]
    unsafe {
        nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, OWN_MAPPING_BYTES);
    }
}

/// Returns free heap pages to the system (glibc keeps them otherwise).
fn trim_heap() {
    // Safety: malloc_trim only walks the allocator's own free lists.
    #[cfg(target_env = "gnu")]
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

/// `RssAnon` plus `RssFile` of `/proc/self/status`: the heap and anonymous
/// mappings, and the pages of mapped files this process has touched. On
/// the CPU a text model's f32 and quantized weights stay in their mapped
/// file (faulted in whole at load), so those file pages are the model's
/// memory as much as a copy would be; they are clean, so under pressure
/// the kernel may drop them and read them again later, and another
/// process mapping the same file shares them. Loaders that copy weights
/// unmap their files before the measurement, so nothing counts twice.
pub fn resident_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    crate::gpu::proc_kib_field(&status, "RssAnon") + crate::gpu::proc_kib_field(&status, "RssFile")
}

/// `(free, total)` device memory from the driver.
#[cfg(feature = "cuda")]
fn cuda_memory(device: &Device) -> Option<(u64, u64)> {
    let cuda = device.as_cuda_device().ok()?;
    let (free, total) = cuda.cuda_stream().context().mem_get_info().ok()?;
    Some((free as u64, total as u64))
}

#[cfg(not(feature = "cuda"))]
fn cuda_memory(_device: &Device) -> Option<(u64, u64)> {
    None
}

/// Waits for the device's queued work, then shrinks its default memory
/// pool to what is still allocated: freed blocks go back to the driver.
#[cfg(feature = "cuda")]
fn trim_cuda_pool(device: &Device) -> Result<(), String> {
    use candle_core::backend::BackendDevice;
    use candle_core::cuda_backend::cudarc::driver::sys;
    let cuda = device.as_cuda_device().map_err(|e| e.to_string())?;
    cuda.synchronize().map_err(|e| e.to_string())?;
    let stream = cuda.cuda_stream();
    let context = stream.context();
    context.bind_to_thread().map_err(|e| e.to_string())?;
    // Safety: the pool handle comes from the driver for this context's
    // device and is only used for the trim call.
    unsafe {
        let mut pool = std::ptr::null_mut();
        sys::cuDeviceGetDefaultMemPool(&mut pool, context.cu_device())
            .result()
            .map_err(|e| e.to_string())?;
        sys::cuMemPoolTrimTo(pool, 0)
            .result()
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn trim_cuda_pool(_device: &Device) -> Result<(), String> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The figure is the whole process's, and the other tests running
    /// beside this one allocate and free too: one of five tries must see
    /// the block come and go. The block is large against what they move
    /// between two readings (a 64 MiB block with 2 MiB of slack failed
    /// when a decode test allocated 60 MiB meanwhile).
    #[test]
    fn freed_cpu_memory_is_seen_as_freed() {
        const BLOCK: u64 = 256 << 20;
        const SEEN: u64 = 192 << 20;
        let mut seen = Vec::new();
        for _ in 0..5 {
            let before = used_bytes(&Device::Cpu);
            let block = vec![1u8; BLOCK as usize];
            let held = used_bytes(&Device::Cpu);
            drop(std::hint::black_box(block));
            release(&Device::Cpu);
            let after = used_bytes(&Device::Cpu);
            if held >= before + SEEN && after + SEEN <= held {
                return;
            }
            seen.push((before, held, after));
        }
        panic!("before, held and after the block: {seen:?}");
    }
}
