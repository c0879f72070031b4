//! Bakes libtorch's library directory into the worker's rpath.
//!
//! tch links libtorch dynamically but Cargo does not pass its rpath on to our binaries, so
//! without this the worker only starts with LD_LIBRARY_PATH set. torch-sys (a direct dependency
//! for this reason) exports the directory it linked against as DEP_TCH_LIBTORCH_LIB.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        // A CUDA libtorch keeps its kernels in libtorch_cuda.so, which nothing references by
        // symbol; --as-needed would drop it and CUDA would never be seen.
        if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,-ltorch,--as-needed");
        }
    }
}
