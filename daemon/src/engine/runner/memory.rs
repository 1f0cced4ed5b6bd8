//! What a runner holds: the GPU memory the driver counts for its process
//! tree, or on the CPU the tree's resident memory.

use std::time::{Duration, Instant};

use super::process::{process_tree, resident_bytes};

/// Bytes the runner `pid` and its children hold on its device.
pub fn held_bytes(pid: u32, on_gpu: bool) -> u64 {
    let tree = process_tree(pid);
    match on_gpu
        .then(|| crate::gpu::processes_gpu_bytes(&tree))
        .flatten()
    {
        Some(bytes) => bytes,
        None => resident_bytes(&tree),
    }
}

/// How long an unload waits for the driver to stop counting a dead
/// runner's memory.
const GPU_RELEASE_WAIT: Duration = Duration::from_secs(5);

/// Waits until the driver no longer lists `pid` as holding GPU memory, so
/// that `freed_bytes` is free when the unload answers; logs if it stays.
pub fn wait_gpu_released(pid: u32, on_gpu: bool) {
    if !on_gpu {
        return;
    }
    let started = Instant::now();
    while started.elapsed() < GPU_RELEASE_WAIT {
        match crate::gpu::processes_gpu_bytes(&[pid]) {
            Some(0) | None => return,
            Some(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    tracing::warn!(
        pid,
        "the driver still counts GPU memory for a stopped runner"
    );
}
