"""Install Transformer Engine on the lent GPU machine, which has no network, from what `.te/` carries.

    python3 benchmarks/te_install.py --site /tmp/site      # then PYTHONPATH=/tmp/site:. ...

What `.te/` holds (git-ignored; benchmarks/te_prepare_carry.py writes it, docs/profiling.md):

- transformer_engine_cu13 (the core library) with the cubins of GPU architectures other than sm_90
  zeroed (te_prepare_carry.prune_fatbin). The runtime loads the sm_90 cubin on an H100/H200 and
  never reads the others; the zeros compress away, so the 264 MiB wheel becomes 31 MiB and fits the
  device tool's 64 MiB carry. On another GPU architecture this library cannot run its kernels;
  use the unpruned wheel there;
- the transformer_engine metapackage (TE checks that it is installed) and the Python packages TE
  imports (pydantic, einops...), as cp312 wheels;
- the transformer_engine_torch sdist, cuDNN frontend's headers, and cuDNN's and NCCL's headers
  (searched last: for a machine whose torch came without them). The torch extension has no prebuilt
  wheel for that machine's torch, so it is compiled there against its torch, CUDA toolkit and the
  CUDA libraries' headers that torch's nvidia-* packages ship (32 C++ files, no CUDA code).
"""
from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import sysconfig
import tarfile
import time

CARRY_DIR = ".te"
SDIST = "transformer_engine_torch-2.20.2"


def install_wheels(carry: str, site: str) -> None:
    wheels = sorted(glob.glob(os.path.join(carry, "*.whl")) + glob.glob(os.path.join(carry, "deps", "*.whl")))
    if not any("transformer_engine_cu" in w for w in wheels):
        sys.exit(f"{carry}/ holds no transformer_engine_cu* wheel: prepare it first (docs/profiling.md).")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                    "--upgrade", "--target", site, *wheels], check=True)


def include_dirs(build: str) -> list[str]:
    """The CUDA toolkit's headers, those of the CUDA libraries torch's nvidia-* packages ship
    (cuDNN, NCCL, cuBLAS...), cuDNN frontend's and TE's own."""
    from torch.utils.cpp_extension import CUDA_HOME  # CUDA_HOME, else where nvcc is, else /usr/local/cuda

    cuda_home = os.environ.get("CUDA_HOME") or CUDA_HOME or "/usr/local/cuda"
    dirs = [os.path.join(cuda_home, "include")]
    for path in [sysconfig.get_paths()["purelib"], *sys.path]:
        dirs += sorted(glob.glob(os.path.join(path, "nvidia", "*", "include")))
    dirs.append(os.path.join(build, "include"))  # cudnn_frontend.h
    source = os.path.join(build, SDIST)
    dirs += [os.path.join(source, d) for d in ("common_headers", "common_headers/common",
                                                 "common_headers/common/include", "csrc")]
    dirs.append(os.path.join(build, "fallback_include"))  # carried cuDNN/NCCL headers, where the machine has none
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def build_extension(carry: str, site: str, build: str, jobs: int) -> None:
    """Compile transformer_engine_torch into `site`, as TE's own setup does (a torch CppExtension)."""
    sys.path.insert(0, site)  # the carried setuptools and ninja, where the machine has none
    os.environ["PATH"] = f"{os.path.join(site, 'bin')}{os.pathsep}{os.environ['PATH']}"
    from setuptools import setup
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    os.makedirs(build, exist_ok=True)
    with tarfile.open(os.path.join(carry, f"{SDIST}.tar.gz")) as tar:
        tar.extractall(build, filter="data")
    for archive in glob.glob(os.path.join(carry, "cudnn_frontend-*-include.tar.gz")) + glob.glob(
            os.path.join(carry, "cuda_fallback_headers.tar.gz")):
        with tarfile.open(archive) as tar:
            tar.extractall(build, filter="data")
    sources = sorted(glob.glob(os.path.join(build, SDIST, "csrc", "**", "*.cpp"), recursive=True))
    extension = CppExtension(name="transformer_engine_torch", sources=sources, include_dirs=include_dirs(build),
                             extra_compile_args={"cxx": ["-O3", "-fvisibility=hidden", "-g0"]})
    os.environ["MAX_JOBS"] = str(jobs)
    setup(name="transformer_engine_torch", ext_modules=[extension], cmdclass={"build_ext": BuildExtension},
          script_args=["--quiet", "build_ext", "--build-lib", site, "--build-temp", os.path.join(build, "tmp")])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--site", default="/tmp/site", help="Where to install (put it first on PYTHONPATH).")
    parser.add_argument("--carry", default=CARRY_DIR)
    parser.add_argument("--build", default="/tmp/te_build")
    parser.add_argument("--jobs", type=int, default=os.cpu_count())
    parser.add_argument("--skip-wheels", action="store_true", help="Only compile the torch extension.")
    args = parser.parse_args(argv)
    start = time.time()
    if not args.skip_wheels:
        install_wheels(args.carry, args.site)
        print(f"wheels installed into {args.site} ({time.time() - start:.0f} s)", flush=True)
    build_extension(args.carry, args.site, args.build, args.jobs)
    print(f"transformer_engine_torch built into {args.site} ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
