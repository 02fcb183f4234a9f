// RUNPATH to libtorch so the binary runs without LD_LIBRARY_PATH (path from torch-sys).
fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
