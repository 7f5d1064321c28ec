"""Songs with known tempo, meter, beats, downbeats and key, rendered from MMA files.

Debian's ``mma`` (Musical MIDI Accompaniment) turns a chord chart and a groove (``BasicRock``,
``Waltz``, ``Swing``, ``BossaNova``, …: drums, bass, chords, arpeggios in the style) into a
MIDI file; ``fluidsynth`` renders it through the ``fluid-soundfont-gm`` General MIDI soundfont.
What the file says is the truth:

* tempo: the MIDI tempo event (quarter notes per minute, as ``Tempo`` asked);
* time signature: the groove's (``Time 3`` for the waltzes, 4 otherwise);
* beats: every quarter note from the first bar line to the end of the last bar, downbeats every
  ``time signature`` beats (mma starts bar 1 at tick 0: the first note sounds at 0 s);
* key: the chart is written in that key (tonic chord first and last, cadences through the
  dominant; minor keys use the harmonic minor's V7).

``song_specs`` spreads a set over the 24 keys (each key ``count / 24`` times), styles in turn,
a tempo drawn from each style's usual range (together 60-180 BPM), and 44.1 or 48 kHz.
``render`` writes ``CACHE/songs/<name>.flac`` and ``<name>.json`` (the truth) once.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench.ground_truth import CACHE

SOUNDFONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
TOOLS = ("mma", "fluidsynth")

#: Chord roots as mma spells them, by pitch class.
ROOTS = ("C", "Db", "D", "Eb", "E", "F", "Gb", "G", "Ab", "A", "Bb", "B")
KEY_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")


@dataclass(frozen=True)
class Style:
    groove: str  # an mma groove of /usr/share/mma/lib/stdlib
    meter: int  # beats per bar (quarter notes)
    tempo: tuple[int, int]  # the style's usual range, BPM


#: Styles in the rotation; tempo ranges as the styles are played (together 60-180 BPM).
STYLES: tuple[Style, ...] = (
    Style("BasicRock", 4, (96, 160)),
    Style("Waltz", 3, (84, 180)),
    Style("PopBallad", 4, (60, 84)),
    Style("Swing", 4, (100, 180)),
    Style("BossaNova", 4, (110, 150)),
    Style("8Beat", 4, (90, 140)),
    Style("JazzWaltz", 3, (110, 180)),
    Style("SoftRock", 4, (76, 120)),
    Style("Rhumba", 4, (90, 130)),
    Style("Ballad", 4, (60, 80)),
    Style("CountryWaltz", 3, (90, 150)),
    Style("Folk", 4, (88, 140)),
)

#: Chord charts by scale degree: (semitones above the tonic, mma chord suffix), one per bar.
MAJOR_CHARTS: tuple[tuple[tuple[int, str], ...], ...] = (
    ((0, ""), (5, ""), (7, "7"), (0, ""), (9, "m"), (2, "m"), (7, "7"), (0, "")),
    ((0, ""), (9, "m"), (5, ""), (7, ""), (0, ""), (9, "m"), (5, ""), (7, "7")),
    ((0, ""), (7, ""), (9, "m"), (5, ""), (0, ""), (7, ""), (5, ""), (0, "")),
    ((0, ""), (0, ""), (5, ""), (5, ""), (7, "7"), (7, "7"), (0, ""), (0, "")),
)
MINOR_CHARTS: tuple[tuple[tuple[int, str], ...], ...] = (
    ((0, "m"), (5, "m"), (7, "7"), (0, "m"), (0, "m"), (8, ""), (5, "m"), (7, "7")),
    ((0, "m"), (8, ""), (3, ""), (10, ""), (0, "m"), (8, ""), (5, "m"), (7, "7")),
    ((0, "m"), (0, "m"), (5, "m"), (5, "m"), (7, "7"), (7, "7"), (0, "m"), (0, "m")),
    ((0, "m"), (5, "m"), (10, ""), (3, ""), (8, ""), (5, "m"), (7, "7"), (0, "m")),
)


@dataclass(frozen=True)
class SongSpec:
    name: str
    groove: str
    meter: int
    tempo: int  # BPM, quarter notes
    tonic: int  # pitch class, 0 = C
    mode: int  # 1 major, 0 minor
    chart: int  # index into MAJOR_CHARTS / MINOR_CHARTS
    bars: int
    rate: int  # Hz
    seed: int


def tools_missing() -> list[str]:
    """What rendering needs and this machine lacks (binaries and the soundfont)."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if not SOUNDFONT.is_file():
        missing.append(f"{SOUNDFONT} (fluid-soundfont-gm)")
    return missing


def song_specs(
    count: int = 96, *, seconds: float = 40.0, seed: int = 2026, prefix: str = "", style_offset: int = 0
) -> list[SongSpec]:
    """``count`` songs over the 24 keys (major and minor alternate, every tonic), styles in
    turn, each about ``seconds`` long; another ``seed`` (and a ``prefix`` for the names) makes
    another set, e.g. one held out from any tuning."""
    rng = np.random.default_rng(seed)
    specs = []
    for i in range(count):
        key = i % 24
        tonic, mode = (key * 7) % 12, 1 - (key // 12)  # around the circle of fifths, majors then minors
        # Each pass over the keys starts the style rotation elsewhere, so a key meets many styles.
        style = STYLES[(i + 5 * (i // 24) + style_offset) % len(STYLES)]
        lo, hi = style.tempo
        tempo = int(rng.integers(lo, hi + 1))
        bars = max(8, int(round(seconds * tempo / 60 / style.meter)))
        bars = (bars + 7) // 8 * 8  # whole charts: the song ends on its cadence
        chart = int(rng.integers(len(MAJOR_CHARTS)))
        rate = 44_100 if i % 2 == 0 else 48_000
        name = f"{prefix}{i:03d}-{style.groove.lower()}-{KEY_NAMES[tonic]}{'' if mode else 'm'}-{tempo}bpm"
        specs.append(SongSpec(name, style.groove, style.meter, tempo, tonic, mode, chart, bars, rate, seed + i))
    return specs


def mma_text(spec: SongSpec) -> str:
    """The MMA file of ``spec``: the groove, the tempo and one chord a bar."""
    chart = (MAJOR_CHARTS if spec.mode else MINOR_CHARTS)[spec.chart]
    lines = [f"// {spec.name}", f"RndSeed {spec.seed}", f"Tempo {spec.tempo}", f"Groove {spec.groove}"]
    for bar in range(spec.bars):
        degree, suffix = chart[bar % len(chart)]
        if bar == spec.bars - 1:
            degree, suffix = 0, ("" if spec.mode else "m")  # end on the tonic
        lines.append(f"{bar + 1} {ROOTS[(spec.tonic + degree) % 12]}{suffix}")
    return "\n".join(lines) + "\n"


def midi_tempo_meter(path: Path) -> tuple[float, int, int]:
    """(quarter notes per minute, beats per bar, first note-on tick) of a type-1 MIDI file
    with one tempo: a small reader of the meta events mma writes."""
    data = path.read_bytes()
    if data[:4] != b"MThd":
        raise ValueError(f"{path} is not a MIDI file")
    tempo_us, numerator, first_note = 500_000, 4, None
    pos = 8 + struct.unpack(">I", data[4:8])[0]
    while pos < len(data):
        kind, length = data[pos : pos + 4], struct.unpack(">I", data[pos + 4 : pos + 8])[0]
        track, pos = data[pos + 8 : pos + 8 + length], pos + 8 + length
        if kind != b"MTrk":
            continue
        i, tick, status = 0, 0, 0
        while i < len(track):
            delta, i = _varlen(track, i)
            tick += delta
            if track[i] == 0xFF:
                meta, (size, j) = track[i + 1], _varlen(track, i + 2)
                body = track[j : j + size]
                if meta == 0x51:
                    tempo_us = int.from_bytes(body, "big")
                elif meta == 0x58:
                    numerator = body[0]
                i = j + size
                continue
            if track[i] in (0xF0, 0xF7):
                size, j = _varlen(track, i + 1)
                i = j + size
                continue
            if track[i] & 0x80:
                status, i = track[i], i + 1
            kind_ = status & 0xF0
            if kind_ == 0x90 and track[i + 1] > 0:
                first_note = tick if first_note is None else min(first_note, tick)
            i += 1 if kind_ in (0xC0, 0xD0) else 2
    return 60e6 / tempo_us, numerator, first_note or 0


def _varlen(data: bytes, i: int) -> tuple[int, int]:
    value = 0
    while True:
        byte = data[i]
        value = (value << 7) | (byte & 0x7F)
        i += 1
        if not byte & 0x80:
            return value, i


def render(spec: SongSpec, cache: Path = CACHE) -> tuple[Path, dict]:
    """(the rendered FLAC, its truth) for ``spec``, rendered once into ``cache/songs``."""
    folder = cache / "songs"
    audio, truth_path = folder / f"{spec.name}.flac", folder / f"{spec.name}.json"
    if audio.is_file() and truth_path.is_file():
        truth = json.loads(truth_path.read_text())
        if truth.get("spec") == asdict(spec):
            return audio, truth
    missing = tools_missing()
    if missing:
        raise RuntimeError(
            f"cannot render songs: missing {', '.join(missing)} (apt-get install mma fluidsynth fluid-soundfont-gm)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mma-") as tmp:
        source, midi = Path(tmp) / "song.mma", Path(tmp) / "song.mid"
        source.write_text(mma_text(spec))
        run = subprocess.run(["mma", "-f", str(midi), str(source)], capture_output=True, text=True, check=False)
        if run.returncode != 0 or not midi.is_file():
            raise RuntimeError(f"mma failed on {spec.name}: {run.stdout[-500:]} {run.stderr[-500:]}")
        tempo, meter, first_tick = midi_tempo_meter(midi)
        part = audio.with_name(audio.name + ".part")
        run = subprocess.run(
            ["fluidsynth", "-ni", "-q", "-T", "flac", "-F", str(part), "-r", str(spec.rate), str(SOUNDFONT), str(midi)],
            capture_output=True,
            text=True,
            check=False,
        )
        if run.returncode != 0 or not part.is_file():
            raise RuntimeError(f"fluidsynth failed on {spec.name}: {run.stderr[-500:]}")
        part.rename(audio)
    if meter != spec.meter or abs(tempo - spec.tempo) > 0.01 or first_tick != 0:
        raise RuntimeError(
            f"{spec.name}: the MIDI file says {tempo} BPM, {meter} beats a bar, first note at tick {first_tick}"
        )
    period = 60.0 / tempo
    beats = [round(k * period, 6) for k in range(spec.bars * meter)]
    truth = {
        "spec": asdict(spec),
        "tempo": tempo,
        "time_signature": meter,
        "beats": beats,
        "downbeats": beats[::meter],
        "key": spec.tonic,
        "mode": spec.mode,
        "key_name": f"{KEY_NAMES[spec.tonic]} {'major' if spec.mode else 'minor'}",
        "rate": spec.rate,
    }
    truth_path.write_text(json.dumps(truth))
    return audio, truth


#: The two sets of the benchmark: ``tuning`` (the estimators' constants were chosen on it) and
#: ``held_out`` (never looked at while tuning: its figures are the ones to trust).
def tuning_set() -> list[SongSpec]:
    return song_specs(96)


def held_out_set() -> list[SongSpec]:
    return song_specs(48, seed=7, prefix="h", style_offset=7)
