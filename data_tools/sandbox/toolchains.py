"""Find the compilers and interpreters on this machine, with their versions and install trees.

A language whose toolchain is missing is never silently skipped: :func:`missing_toolchain_message`
names the program that was not found and how to install it, and that text becomes the
``sandbox_error`` message of every sample in that language.
"""
from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from data_tools.sandbox.config import LANGUAGES


@dataclass(frozen=True)
class Toolchain:
    """One language's programs as found on this machine."""

    language: str
    """A name from :data:`LANGUAGES`."""
    programs: dict
    """Role -> absolute path, e.g. ``{"javac": ..., "java": ...}``; symlinks resolved where a proxy would
    otherwise run (rustup's ``rustc`` is replaced by the toolchain's own binary)."""
    version: str
    """The version line the toolchain reports, e.g. ``gcc 12.2.0``."""
    install_roots: tuple
    """Directories the programs need at run time (interpreter prefix, JDK home, Rust sysroot). The
    sandbox keeps them visible, read-only, when it hides the rest of their parent directories."""


# How to install each language's toolchain, and the programs it must provide.
INSTALL_HINTS = {
    "python": "install Python 3 (Debian/Ubuntu: apt-get install python3)",
    "c": "install gcc (Debian/Ubuntu: apt-get install gcc)",
    "cpp": "install g++ (Debian/Ubuntu: apt-get install g++)",
    "java": "install a JDK 11+ with javac and java on PATH (Debian/Ubuntu: apt-get install openjdk-17-jdk-headless)",
    "javascript": "install Node.js 18+ (Debian/Ubuntu: apt-get install nodejs, or https://nodejs.org)",
    "go": "install Go 1.21+ with `go` on PATH (Debian/Ubuntu: apt-get install golang-go, or https://go.dev/dl/)",
    "rust": "install Rust with rustc on PATH (https://rustup.rs, or Debian/Ubuntu: apt-get install rustc)",
    "bash": "install bash (Debian/Ubuntu: apt-get install bash)",
}
REQUIRED_PROGRAMS = {"python": ("python",), "c": ("gcc",), "cpp": ("g++",), "java": ("javac", "java"),
                     "javascript": ("node",), "go": ("go",), "rust": ("rustc",), "bash": ("bash",)}


def missing_toolchain_message(language: str) -> str:
    programs = " and ".join(f"`{p}`" for p in REQUIRED_PROGRAMS[language])
    return (f"no {language} toolchain: {programs} not found on PATH, so {language} samples cannot be run; "
            f"{INSTALL_HINTS[language]}")


def _output(argv: list[str]) -> str:
    """First non-empty line a version command prints (some print to stderr), or '' if it fails."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    lines = [line.strip() for line in (proc.stdout + "\n" + proc.stderr).splitlines() if line.strip()]
    return lines[0] if lines and proc.returncode == 0 else ""


def _prefix_of(program: str) -> str:
    """The install tree of ``program``: the parent of the ``bin`` directory it really lives in."""
    return os.path.dirname(os.path.dirname(os.path.realpath(program)))


def _detect_python() -> Toolchain:
    # The interpreter running the toolkit: it exists, and its packages (numpy, ...) are what samples expect.
    roots = tuple(dict.fromkeys((sys.prefix, sys.base_prefix, _prefix_of(sys.executable))))
    return Toolchain("python", {"python": sys.executable}, f"Python {platform.python_version()}", roots)


def _detect_gcc(language: str, name: str) -> Toolchain | None:
    path = shutil.which(name)
    if path is None:
        return None
    version = _output([path, "-dumpfullversion"])
    return Toolchain(language, {"compiler": path}, f"{name} {version}".strip(), (_prefix_of(path),))


def _detect_java() -> Toolchain | None:
    javac, java = shutil.which("javac"), shutil.which("java")
    if javac is None or java is None:
        return None
    home = _prefix_of(javac)
    version = ""
    release = os.path.join(home, "release")  # one file read instead of starting a JVM (~0.3 s)
    if os.path.isfile(release):
        with open(release, encoding="utf-8", errors="replace") as f:
            values = dict(line.strip().split("=", 1) for line in f if "=" in line)
        version = values.get("JAVA_VERSION", "").strip('"')
    version = f"OpenJDK {version}" if version else _output([javac, "-version"])
    return Toolchain("java", {"javac": javac, "java": java}, version, tuple(dict.fromkeys((home, _prefix_of(java)))))


def _detect_simple(language: str, name: str, version_args: list[str]) -> Toolchain | None:
    path = shutil.which(name)
    if path is None:
        return None
    version = _output([path, *version_args]) or "(version unknown)"
    version = version if name in version.lower() else f"{name} {version}"  # node prints just "v20.1.0"
    return Toolchain(language, {name: path}, version, (_prefix_of(path),))


def _detect_go() -> Toolchain | None:
    found = _detect_simple("go", "go", ["version"])
    if found is None:
        return None
    goroot = _output([found.programs["go"], "env", "GOROOT"])
    roots = (goroot,) if goroot else found.install_roots
    return Toolchain("go", found.programs, found.version, roots)


def _detect_rust() -> Toolchain | None:
    path = shutil.which("rustc")
    if path is None:
        return None
    # rustup installs a proxy that needs ~/.rustup and its settings; the sysroot's own rustc needs neither.
    sysroot = _output([path, "--print", "sysroot"])
    real = os.path.join(sysroot, "bin", "rustc") if sysroot else path
    if not os.access(real, os.X_OK):
        real, sysroot = path, _prefix_of(path)
    return Toolchain("rust", {"rustc": real}, _output([real, "--version"]) or "rustc", (sysroot,))


_DETECTORS = {
    "python": _detect_python,
    "c": lambda: _detect_gcc("c", "gcc"),
    "cpp": lambda: _detect_gcc("cpp", "g++"),
    "java": _detect_java,
    "javascript": lambda: _detect_simple("javascript", "node", ["--version"]),
    "go": _detect_go,
    "rust": _detect_rust,
    "bash": lambda: _detect_simple("bash", "bash", ["--version"]),
}


@functools.lru_cache(maxsize=1)
def detect_toolchains() -> dict[str, Toolchain | None]:
    """Toolchain per language of :data:`LANGUAGES`; None where it is missing. Cached for the process
    (call ``detect_toolchains.cache_clear()`` after installing one)."""
    with ThreadPoolExecutor(max_workers=len(LANGUAGES)) as pool:  # version commands run side by side
        found = dict(zip(LANGUAGES, pool.map(lambda language: _DETECTORS[language](), LANGUAGES)))
    return found
