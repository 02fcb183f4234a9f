// RUNPATH to libtorch so the binary runs without LD_LIBRARY_PATH (path from torch-sys). With the
// `cuda` feature, libtorch_cuda is linked even though no symbol of it is referenced: it registers
// the CUDA backend when loaded, and --as-needed would drop it.
fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-L{lib},-ltorch_cuda,--as-needed");
        }
    }
}
