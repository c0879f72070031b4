"""Lay out a libtorch directory (include/, lib/, build-version) from PyPI wheels.

torch-sys wants LIBTORCH to point at a directory with include/ and lib/, and checks the version in
build-version. The CPU variant keeps only the libraries libtorch_cpu.so needs: even a CPU-only
process loads libcudart and libcupti, because the wheel is built with CUDA support.
"""
import argparse
import glob
import os
import shutil
import sys
import zipfile

CPU_LIBS = ("libtorch_cpu.so", "libc10.so", "libtorch.so", "libgomp")


def wheel(wheels, prefix):
    found = sorted(glob.glob(os.path.join(wheels, prefix + "-*.whl")))
    if not found:
        sys.exit(f"extract_libtorch: no {prefix} wheel in {wheels}")
    return found[-1]


def extract(whl, dest, keep):
    """Extracts members accepted by keep(name) -> relative destination path or None."""
    with zipfile.ZipFile(whl) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            rel = keep(info.filename)
            if rel is None:
                continue
            out = os.path.join(dest, rel)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with zf.open(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)


# Requirements of the torch wheel that are Python packages, not libraries libtorch links.
PYTHON_ONLY = ("triton", "cuda-bindings")


def linux_library_requirements(wheels):
    """The torch wheel's Linux-only requirements (the NVIDIA libraries), one per line."""
    with zipfile.ZipFile(wheel(wheels, "torch")) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode()
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:") or 'platform_system == "Linux"' not in line:
            continue
        requirement = line.split(":", 1)[1].split(";", 1)[0].strip()
        if not requirement.startswith(PYTHON_ONLY):
            print(requirement)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", choices=["cpu", "cuda"])
    ap.add_argument("--wheels", required=True)
    ap.add_argument("--dest")
    ap.add_argument("--torch-version")
    ap.add_argument("--requirements", action="store_true",
                    help="print the torch wheel's Linux library requirements and exit")
    args = ap.parse_args()
    if args.requirements:
        linux_library_requirements(args.wheels)
        return
    if not (args.variant and args.dest and args.torch_version):
        ap.error("--variant, --dest and --torch-version are required")

    def keep_torch(name):
        if name.startswith("torch/include/"):
            return name[len("torch/"):]
        if name.startswith("torch/lib/"):
            base = os.path.basename(name)
            if args.variant == "cuda" or base.startswith(CPU_LIBS):
                return os.path.join("lib", base)
        return None

    extract(wheel(args.wheels, "torch"), args.dest, keep_torch)

    def keep_nvidia_lib(name):
        # nvidia/<component>/lib/libX.so.N -> lib/libX.so.N
        parts = name.split("/")
        if len(parts) >= 4 and parts[0] == "nvidia" and parts[-2] == "lib" and ".so" in parts[-1]:
            if args.variant == "cpu" and not parts[-1].startswith(("libcudart.so", "libcupti.so")):
                return None
            return os.path.join("lib", parts[-1])
        return None

    if args.variant == "cpu":
        nvidia = [wheel(args.wheels, "nvidia_cuda_runtime"), wheel(args.wheels, "nvidia_cuda_cupti")]
    else:
        nvidia = sorted(glob.glob(os.path.join(args.wheels, "nvidia_*.whl")))
    for whl in nvidia:
        extract(whl, args.dest, keep_nvidia_lib)

    # cudarc dlopens libnccl.so, while the wheel ships only libnccl.so.2.
    lib = os.path.join(args.dest, "lib")
    if os.path.exists(os.path.join(lib, "libnccl.so.2")) and not os.path.exists(os.path.join(lib, "libnccl.so")):
        os.symlink("libnccl.so.2", os.path.join(lib, "libnccl.so"))

    with open(os.path.join(args.dest, "build-version"), "w") as f:
        f.write(args.torch_version + "\n")


if __name__ == "__main__":
    main()
