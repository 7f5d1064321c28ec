"""Reference music from Debian: packages of real recorded music, fetched, never committed.

The list lives in ``debian_music.toml`` beside this module: per package its role, a genre
description, the folders inside the package that hold its music (not its sound effects), zip
archives to unpack (Quake-style ``.pk3`` files of some games), and what was measured on the
fetched files (tracks, minutes, codec). Three roles:

    reference  music for calibration, training, threshold choice and tuning
    distill    more music for training a student only (game data packages whose music is a
               small part of a large download): not in the calibration reference, so adding
               it moved no model's calibration or mood figures
    check      reserved as an independent check set: never used for calibration, training,
               threshold choice or tuning of any kind (:data:`RESERVED`; loading enforces it)

:func:`fetch` puts each package in ``<dest>/<role>/<package>/`` with ``apt-get download`` and
``dpkg -x`` (Debian's own tools, so the files are the archive's, checked by apt against its
signed index); :func:`audio_files` lists a role's music; :func:`make_clips` cuts the short
excerpts the tests and ``make demo`` use (``[[clip]]`` entries of the list).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tomllib
import zipfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import av
import numpy as np

from pipeline.errors import TrackError
from pipeline.stages import audio
from pipeline.stages.storage import AUDIO_EXTENSIONS, local_audio_files

LIST = Path(__file__).with_suffix(".toml")
ROLES = ("reference", "distill", "check")
#: The independent check set. Nothing may tune on these; :func:`load` refuses another role for them.
RESERVED = frozenset({"singularity-music", "asc-music", "hyperrogue-music"})
DEFAULT_DEST = Path.home() / ".cache" / "moodstream" / "music"
READY = ".ready"  # marker written once a package is completely unpacked
UNZIPPED = "unzipped"  # folder of a package (beside usr/) that its zip archives are unpacked into
CLIP_RATE = 44_100  # Hz, sample rate of the mp3 clips (opus clips are 48 kHz, Opus' own rate)


class FetchError(RuntimeError):
    """A package could not be fetched; the message says why and what to do."""


@dataclass(frozen=True)
class Package:
    name: str  # Debian package name
    role: str  # one of ROLES
    genre: str  # style, in words
    music: tuple[str, ...]  # folders inside the unpacked package that hold its music
    unzip: tuple[str, ...] = ()  # zip archives inside the package whose members are music
    tracks: int = 0  # measured: audio files in the music folders
    minutes: float = 0.0  # measured: their total duration
    codec: str = ""  # measured: the codec(s) of those files
    download_mb: float = 0.0  # the .deb's size, MB (10^6 bytes)


@dataclass(frozen=True)
class Clip:
    """``seconds`` of ``track`` (a file name in ``package``'s music) from ``start_s``, written
    as ``file`` (mp3 or Opus in ogg, by its suffix)."""

    file: str
    package: str
    track: str
    start_s: float
    seconds: float


def load(path: Path | None = None) -> list[Package]:
    """The packages of the list, in its order; raises ValueError on an unknown role or a reserved
    package given any role but ``check`` (or another package given ``check``)."""
    path = LIST if path is None else path
    data = tomllib.loads(Path(path).read_text())
    packages = [
        Package(**{**p, "music": tuple(p["music"]), "unzip": tuple(p.get("unzip", ()))}) for p in data["package"]
    ]
    for p in packages:
        if p.role not in ROLES:
            raise ValueError(f"{path}: {p.name}: unknown role {p.role!r}; known: {ROLES}")
        if (p.name in RESERVED) != (p.role == "check"):
            raise ValueError(f"{path}: {p.name}: role {p.role!r}, but the check role is exactly {sorted(RESERVED)}")
    return packages


def load_clips(path: Path | None = None) -> list[Clip]:
    return [Clip(**c) for c in tomllib.loads(Path(LIST if path is None else path).read_text()).get("clip", [])]


def select(packages: list[Package], roles: tuple[str, ...] = ROLES, names: tuple[str, ...] = ()) -> list[Package]:
    """Packages of ``roles``, or exactly the named ones (ValueError for a name not in the list)."""
    if names:
        known = {p.name: p for p in packages}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"not in the list: {unknown}; known: {sorted(known)}")
        return [known[n] for n in names]
    return [p for p in packages if p.role in roles]


def package_dir(dest: Path, package: Package) -> Path:
    return Path(dest) / package.role / package.name


def fetch(
    dest: Path = DEFAULT_DEST,
    roles: tuple[str, ...] = ROLES,
    names: tuple[str, ...] = (),
    packages: list[Package] | None = None,
) -> list[Path]:
    """Fetch and unpack the selected packages (see :func:`select`) into
    ``<dest>/<role>/<package>/``; returns those folders. A package with its ``.ready`` marker is
    left alone, so a second call costs nothing; a half-unpacked one is unpacked again."""
    chosen = select(load() if packages is None else packages, roles, names)
    missing = [tool for tool in ("apt-get", "dpkg") if shutil.which(tool) is None]
    pending = [p for p in chosen if not (package_dir(dest, p) / READY).is_file()]
    if pending and missing:
        raise FetchError(
            f"fetching {[p.name for p in pending]} needs Debian's {' and '.join(missing)} (not found on PATH); "
            "on another system, unpack those Debian (bookworm) packages into "
            f"{Path(dest)}/<role>/<package>/ and create the {READY} file in each"
        )
    for p in pending:
        _fetch_one(Path(dest), p)
    return [package_dir(dest, p) for p in chosen]


def _fetch_one(dest: Path, package: Package) -> None:
    target = package_dir(dest, package)
    staging = dest / ".download" / package.name
    shutil.rmtree(target, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    target.mkdir(parents=True)  # dpkg -x creates only the last level
    _download(package.name, staging)
    debs = sorted(staging.glob("*.deb"))
    if len(debs) != 1:
        raise FetchError(f"apt-get download {package.name} left {len(debs)} .deb files in {staging}, expected 1")
    _run(["dpkg", "-x", str(debs[0]), str(target)], f"unpacking {debs[0].name}")
    for archive in package.unzip:
        _unzip_audio(target / archive, target / UNZIPPED)
    shutil.rmtree(staging)
    (target / READY).write_text(debs[0].name + "\n")


def _download(name: str, folder: Path) -> None:
    """``apt-get download`` into ``folder``; after a failure (a stale or missing package index),
    ``apt-get update`` once and try again."""
    first = subprocess.run(["apt-get", "download", "-q", name], cwd=folder, capture_output=True, text=True)
    if first.returncode == 0:
        return
    _run(
        ["apt-get", "update", "-qq"],
        f"apt-get download {name} failed ({_tail(first.stderr)}); apt-get update (needs root)",
    )
    _run(["apt-get", "download", "-q", name], f"apt-get download {name}", cwd=folder)


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise FetchError(f"{what}: exit status {done.returncode}: {_tail(done.stderr or done.stdout)}")


def _tail(text: str) -> str:
    return " / ".join(text.strip().splitlines()[-2:]) or "no message"


def _unzip_audio(archive: Path, into: Path) -> None:
    """The audio members of ``archive``, under ``into`` with their paths; then the archive goes
    (the music is all a caller wants of it, and the copy would double the disk used)."""
    with zipfile.ZipFile(archive) as z:
        for member in z.infolist():
            if not member.is_dir() and Path(member.filename).suffix.lower().lstrip(".") in AUDIO_EXTENSIONS:
                z.extract(member, into)  # extract() keeps members inside `into` (drops .. and roots)
    archive.unlink()


def audio_files(
    dest: Path, role: str, names: tuple[str, ...] = (), packages: list[Package] | None = None
) -> list[Path]:
    """The music files (by :data:`pipeline.stages.storage.AUDIO_EXTENSIONS`) of the fetched packages of
    ``role``, in the packages' music folders only; a package not fetched (no ``.ready``)
    contributes nothing. Sorted by package, then path."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; known: {ROLES}")
    chosen = [p for p in select(load() if packages is None else packages, (role,), names) if p.role == role]
    files: list[Path] = []
    for p in chosen:
        root = package_dir(dest, p)
        if (root / READY).is_file():
            files += [f for folder in p.music for f in local_audio_files(root / folder)]
    return files


@dataclass(frozen=True)
class Measurement:
    tracks: int
    minutes: float
    codec: str  # codec names, most frequent first, "+"-joined
    unreadable: tuple[str, ...]  # files neither decoder could open


def measure(files: list[Path]) -> Measurement:
    """Track count, total minutes and codecs from the files' headers, as the product's decoder
    opens them (:func:`pipeline.stages.audio.decode_source`: PyAV, else libsndfile), without
    decoding the audio."""
    seconds = 0.0
    codecs: Counter[str] = Counter()
    unreadable = []
    for f in files:
        try:
            with open(f, "rb") as data:
                stream = audio.decode_source(data)
                stream.blocks.close()
        except (TrackError, OSError):
            unreadable.append(str(f))
            continue
        seconds += stream.stated_s or 0.0
        codecs[stream.codec] += 1
    names = "+".join(name.replace("mp3float", "mp3") for name, _ in codecs.most_common())
    return Measurement(len(files) - len(unreadable), round(seconds / 60, 1), names, tuple(unreadable))


def make_clips(out: Path, dest: Path = DEFAULT_DEST, clips: list[Clip] | None = None) -> list[Path]:
    """Fetch the packages the clips come from (reference role only) and write each clip into
    ``out``; returns the clip files in list order. ``out/.ready`` records the clips written, so
    a second call with the same list costs nothing."""
    clips = load_clips() if clips is None else clips
    out = Path(out)
    files = [out / c.file for c in clips]
    spec = json.dumps([asdict(c) for c in clips], sort_keys=True)
    ready = out / READY
    if ready.is_file() and ready.read_text() == spec and all(f.is_file() for f in files):
        return files
    packages = {p.name: p for p in load()}
    for c in clips:
        if packages[c.package].role != "reference":
            raise ValueError(
                f"clip {c.file}: {c.package} has role {packages[c.package].role!r}; clips come from reference music only"
            )
    fetch(dest, names=tuple(dict.fromkeys(c.package for c in clips)))
    out.mkdir(parents=True, exist_ok=True)
    for c, f in zip(clips, files):
        tracks = [t for t in audio_files(dest, "reference", (c.package,)) if t.name == c.track]
        if len(tracks) != 1:
            raise FetchError(f"clip {c.file}: {len(tracks)} files named {c.track} in {c.package}'s music, expected 1")
        write_excerpt(tracks[0], f, c.start_s, c.seconds)
    ready.write_text(spec)
    return files


def write_excerpt(src: Path, dst: Path, start_s: float, seconds: float) -> None:
    """``seconds`` of ``src`` from ``start_s``, stereo, encoded by ``dst``'s suffix: ``.mp3``
    (LAME, 44.1 kHz) or ``.ogg`` (Opus, 48 kHz). Decoded from the start (exact to the sample,
    where seeking would land on a packet boundary)."""
    codec, rate = {".mp3": ("libmp3lame", CLIP_RATE), ".ogg": ("libopus", 48_000)}[dst.suffix.lower()]
    resampler = av.AudioResampler(format="fltp", layout="stereo", rate=rate)
    first, count = round(start_s * rate), round(seconds * rate)
    pieces, have = [], 0  # [2, n] float32 blocks from `first` on
    position = 0  # samples at `rate` decoded so far
    with open(src, "rb") as data:
        source = audio.decode_source(data)  # the product's decoder: PyAV, else libsndfile
        layout = "stereo" if source.channels == 2 else "mono"
        for block in source.blocks:
            if block.shape[0] > 2:
                block = block.mean(axis=0, keepdims=True)
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(block), format="fltp", layout=layout)
            frame.sample_rate = source.rate
            for out in resampler.resample(frame):
                decoded = out.to_ndarray()
                lo, hi = max(first - position, 0), min(first + count - position, decoded.shape[1])
                if lo < hi:
                    pieces.append(decoded[:, lo:hi])
                    have += hi - lo
                position += decoded.shape[1]
            if have >= count:
                source.blocks.close()
                break
    if have < count:
        raise ValueError(f"{src}: shorter than {start_s + seconds:.1f} s")
    excerpt = np.ascontiguousarray(np.concatenate(pieces, axis=1), dtype=np.float32)
    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = dst.with_name(dst.name + ".partial")
    with av.open(str(partial), mode="w", format={".mp3": "mp3", ".ogg": "ogg"}[dst.suffix.lower()]) as container:
        stream = container.add_stream(codec, rate=rate, layout="stereo")
        frame = av.AudioFrame.from_ndarray(excerpt, format="fltp", layout="stereo")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    partial.replace(dst)
