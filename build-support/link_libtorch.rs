// Shared by the build scripts of every crate that produces executables linked against libtorch
// (included with `include!`). It makes binaries and test executables:
//  - find libtorch without LD_LIBRARY_PATH (rpath to the libtorch lib dir torch-sys used), and
//  - keep libtorch_cuda.so as a dependency: nothing references its symbols directly, so the
//    linker's default --as-needed would drop it and CUDA would silently never initialise.

fn link_libtorch() {
    // torch-sys (links = "tch") exports its lib dir to direct dependents as DEP_TCH_LIBTORCH_LIB.
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:warning=DEP_TCH_LIBTORCH_LIB not set: no rpath to libtorch added");
        return;
    };
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    let lib_dir = std::path::Path::new(&lib);
    for cuda_lib in ["torch_cuda", "c10_cuda"] {
        if lib_dir.join(format!("lib{cuda_lib}.so")).exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-l{cuda_lib},--as-needed");
        }
    }
}
