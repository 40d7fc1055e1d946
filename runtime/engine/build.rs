//! With the `cuda` feature, compiles the engine's own CUDA kernels (`src/models/cuda/*.cu`) to
//! PTX with nvcc, for `$CUDA_COMPUTE_CAP` (default 80: the PTX is JIT-compiled by the driver
//! for that architecture and every newer one, Hopper included). nvcc comes from `$NVCC`, else
//! `$CUDA_HOME/bin/nvcc`, else `PATH` (`../shared/cuda/setup.sh` sets the first two; the
//! `runtime-cuda` Docker stage has it on `PATH`). Without the feature nothing runs.

use std::path::PathBuf;
use std::process::Command;

const KERNELS: &[&str] = &["depthwise", "epilogue"];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-env-changed=CUDA_HOME");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let nvcc = std::env::var_os("NVCC")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("bin/nvcc")))
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo::rerun-if-changed=src/models/cuda/common.cuh");
    for name in KERNELS {
        let src = format!("src/models/cuda/{name}.cu");
        println!("cargo::rerun-if-changed={src}");
        let ptx = out_dir.join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", "-I", "src/models/cuda"])
            .arg(format!("-arch=compute_{cap}"))
            .arg("-o")
            .arg(&ptx)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "running {} for {src}: {e} (set NVCC or CUDA_HOME, e.g. by sourcing \
                     ../shared/cuda/setup.sh)",
                    nvcc.display()
                )
            });
        assert!(status.success(), "nvcc failed on {src}");
    }
}
