"""Stand-in CUDA libraries for PyPI's torch wheels, so they import and run on CPU without the
nvidia-* wheels (4.3 GB of CUDA libraries a CPU worker never calls).

PyPI's Linux x86_64 torch wheels are CUDA builds: their libraries name libcudart.so.12,
libcublas.so.12, libcudnn.so.9, ... as NEEDED, so ``import torch`` fails without the
nvidia-* wheels. This writes, beside torch's own libraries (torch/lib, on their RPATH), one
small library per missing CUDA soname that defines every symbol torch's libraries take from it,
with the symbol versions they ask for. Each function answers as the CUDA runtime does on a host
without a GPU driver: ``cudaErrorNoDevice`` (100), so ``torch.cuda.is_available()`` is False and
torch runs on CPU as a CUDA build does on any GPU-less host; the error-string functions return a
message; the kernel-registration hooks the CUDA libraries' constructors call do nothing.

Run in the image's build stage (needs a C compiler and binutils):
    python cuda_stubs.py /opt/moodstream/lib/python3.11/site-packages
It then checks that ``ldd -r`` finds no CUDA symbol missing and that torch imports.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

#: The CUDA error the runtime returns without a device (cudaErrorNoDevice); c10 counts 0 devices.
NO_DEVICE = 100
STRING_RETURNING = re.compile(r"(ErrorString|ErrorName|StatusString|StatusName|GetString)$")
#: Libraries the torch wheels load only on demand (dlopen), never at import: no stand-in needed.
LAZY = ("libtorch_cuda_linalg.so", "libcaffe2_nvrtc.so")


def run(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"cuda_stubs: {' '.join(map(str, args))} failed: {done.stderr[-2000:]}")
    return done.stdout


def elf_files(site: Path) -> list[Path]:
    files = [*(site / "torch" / "lib").glob("*.so*"), *(site / "torch").glob("_C*.so")]
    files += [*(site / "torchaudio").rglob("*.so")]
    return [f for f in files if f.is_file() and not f.is_symlink() and f.name not in LAZY]


def system_libraries() -> set[str]:
    return {line.split()[0] for line in run("ldconfig", "-p").splitlines()[1:] if line.strip()}


def main(site: Path) -> None:
    files = elf_files(site)
    present = {f.name for f in (site / "torch" / "lib").iterdir()} | system_libraries()
    missing: set[str] = set()
    for f in files:
        missing |= {n for n in re.findall(r"\(NEEDED\).*\[(.+)\]", run("readelf", "-d", f)) if n not in present}
    missing -= {f.name for f in files}
    if not missing:
        print("cuda_stubs: torch needs no CUDA library (a CPU build): nothing to do")
        return
    # version name -> the soname that must define it, and the symbols asked for at each version
    owner: dict[str, str] = {}
    versioned: dict[str, set[str]] = defaultdict(set)
    for f in files:
        current = None
        for line in run("readelf", "-V", "-W", f).splitlines():
            if m := re.search(r"File: (\S+)", line):
                current = m.group(1)
            elif (m := re.search(r"Name: (\S+)", line)) and current in missing:
                owner[m.group(1)] = current
        for line in run("readelf", "--dyn-syms", "-W", f).splitlines():
            parts = line.split()
            if len(parts) >= 8 and parts[6] == "UND" and "@" in parts[7]:
                name, version = parts[7].split("@", 1)
                if version.split(" ")[0] in owner:
                    versioned[version.split(" ")[0]].add(name)
    ours = defined(files)
    with tempfile.TemporaryDirectory() as tmp:
        build = Path(tmp)
        # Unversioned references (NCCL, cuRAND, cuSPARSELt, ... carry no symbol versions): found by
        # linking once with the versioned stand-ins in place and asking the loader what is left.
        unversioned: set[str] = set()
        for _ in range(2):
            write_stubs(site, build, missing, owner, versioned, unversioned)
            left = undefined(site, files, ours)
            new = left - unversioned
            if not new:
                break
            unversioned |= new
        left = undefined(site, files, ours)
        if left:
            sys.exit(f"cuda_stubs: symbols still undefined: {sorted(left)[:20]}")
    check = "import torch; assert not torch.cuda.is_available(); print('torch', torch.__version__, 'on CPU')"
    print(run(sys.executable, "-c", check).strip(), f"with stand-ins for {len(missing)} CUDA libraries")


def write_stubs(site, build, missing, owner, versioned, unversioned) -> None:
    every = set(unversioned).union(*versioned.values()) if versioned else set(unversioned)
    source = build / "stub.c"
    lines = ['static const char message[] = "CUDA is not available: torch runs on CPU in this image";']
    for name in sorted(every):
        if name.startswith("__cuda"):
            lines.append(f"void *{name}(void) {{ return 0; }}")
        elif STRING_RETURNING.search(name):
            lines.append(f"const char *{name}(void) {{ return message; }}")
        else:
            lines.append(f"int {name}(void) {{ return {NO_DEVICE}; }}")
    source.write_text("\n".join(lines) + "\n")
    obj = build / "stub.o"
    run("cc", "-c", "-fPIC", "-O1", "-o", str(obj), str(source))
    for soname in sorted(missing):
        nodes = [v for v, lib in owner.items() if lib == soname]
        # The unversioned symbols go to the soname's own node, which also takes every other
        # symbol (the default version), so any stand-in can answer an unversioned reference.
        script = [f"{v} {{ global: {'; '.join(sorted(versioned[v])) or '*'}; }};" for v in nodes if v != soname]
        script.append(f"{soname} {{ global: *; }};")
        (build / "v.map").write_text("\n".join(script) + "\n")
        target = site / "torch" / "lib" / soname
        target.unlink(missing_ok=True)
        run(
            "cc",
            "-shared",
            f"-Wl,-soname,{soname}",
            f"-Wl,--version-script={build / 'v.map'}",
            "-o",
            str(target),
            str(obj),
        )


def undefined(site: Path, files: list[Path], ours: set[str]) -> set[str]:
    """Symbols ``ldd -r`` reports undefined that a CUDA library would define: not Python's C API
    (the interpreter's), nor what torch's own libraries define (torchaudio's libraries find them
    in the process, where torch is loaded first; so does ``ldd`` with torch/lib on its path)."""
    env = {"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": str(site / "torch" / "lib")}
    names: set[str] = set()
    for f in files:
        out = subprocess.run(
            ["ldd", "-r", str(f)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        names |= {n.split("@")[0] for n in re.findall(r"undefined symbol: ([^\s,]+)", out.stdout)}
    return {n for n in names - ours if not n.startswith(("Py", "_Py", "_Z"))}


def defined(files: list[Path]) -> set[str]:
    names = set()
    for f in files:
        for line in run("readelf", "--dyn-syms", "-W", str(f)).splitlines():
            parts = line.split()
            if len(parts) >= 8 and parts[6] not in ("UND", "Ndx"):
                names.add(parts[7].split("@")[0])
    return names


if __name__ == "__main__":
    main(Path(sys.argv[1]))
