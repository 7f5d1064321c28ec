"""The low-rate analysis: mono samples at 7-12.5 kHz in, small per-frame envelopes out.

Two short-time Fourier transforms run on the box-decimated mono that the loudness meter hands
over (:class:`~.loudness.KWeightedBlocks`):

* **rhythm frames**, ~50 per second (hop = rate / 50, a 21-40-ms Hann window of a power-of-two length): the power in 24
  log-spaced bands (40 Hz to the top of the band), from which come the onset envelope (the
  positive log-band flux, whole band and below 200 Hz apart), the speech-band modulation
  measure and the spectral shape statistics. Only two floats a frame are kept for the whole
  track (the two onset envelopes: 2 x 540 k floats for three hours); the rest is summed as it
  goes. 50 frames a second tracked beats as well as 100 on the benchmark (F 0.910 against
  0.915) for half the cost.
* **chroma frames**, ~2.9 per second (a power-of-two window of 0.3-0.6 s, a quarter overlap):
  the magnitude spectrum between 65 Hz and 2.1 kHz folded onto the 12 pitch classes. Kept per
  frame (12 floats, for beat-level harmony and per-segment key): 370 k floats for three hours.
  Without the overlap the downbeats' F-measure fell from 0.94 to 0.90.

Nothing here depends on the absolute rate beyond the bin-to-Hz maps, so any analysis rate works.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import scipy.fft

N_BANDS = 24
LOW_BAND_HZ = 200.0  # the onset envelope of the bass and kick drum: bands below this
SPEECH_BAND_HZ = (300.0, 3400.0)
CHROMA_RANGE_HZ = (65.0, 2100.0)
#: log(1 + GAMMA * power): compresses band powers so a band ~50 dB under full scale counts
#: little (the noise floor of quiet passages does not drive the onset envelope).
GAMMA = 1e5
#: Rhythm frames per second (about: the hop is a whole number of samples).
FPS = 50.0
#: Speech modulation windows: this many rhythm frames (~5 s at 50 frames/s) per window.
SPEECH_WINDOW = 256
SPEECH_FLOOR = 1e-4  # -40 dB under the window's peak


@lru_cache(maxsize=8)
def rhythm_plan(rate: float, fps: float = 100.0) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(n_fft, hop, window, band matrix [bins, bands], band centres Hz, bin Hz) at ``rate``."""
    hop = max(1, int(round(rate / fps)))
    n_fft = 1 << int(np.log2(max(64.0, 0.04 * rate)))  # a power of two, 21-40 ms
    window = np.hanning(n_fft + 1)[:-1].astype(np.float32)
    # Normalised so a full-scale sine puts power ~1 into its bin's band.
    window *= np.float32(2.0 / window.sum())
    freqs = np.fft.rfftfreq(n_fft, 1.0 / rate)
    top = min(rate / 2 * 0.95, 6_000.0)
    edges = np.geomspace(40.0, top, N_BANDS + 2)
    bands = np.zeros((len(freqs), N_BANDS), np.float32)
    for b in range(N_BANDS):
        lo, mid, hi = edges[b], edges[b + 1], edges[b + 2]
        rise = (freqs - lo) / (mid - lo)
        fall = (hi - freqs) / (hi - mid)
        bands[:, b] = np.clip(np.minimum(rise, fall), 0, 1)
        if not bands[:, b].any():  # a band narrower than a bin: its nearest bin
            bands[np.argmin(np.abs(freqs - mid)), b] = 1.0
    return n_fft, hop, window, bands, edges[1:-1].astype(np.float32), freqs.astype(np.float32)


@lru_cache(maxsize=8)
def chroma_plan(rate: float) -> tuple[int, int, np.ndarray, np.ndarray, slice]:
    """(n_fft, hop, window, fold matrix [bins in range, 12], bin slice) at ``rate``."""
    n_fft = 1 << int(round(np.log2(0.4 * rate)))  # a power of two, 0.3-0.6 s
    hop = n_fft * 3 // 4  # a quarter overlap: the beat-level harmonic change (meter) needs it
    window = np.hanning(n_fft + 1)[:-1].astype(np.float32)
    window *= np.float32(2.0 / window.sum())
    freqs = np.fft.rfftfreq(n_fft, 1.0 / rate)
    lo, hi = CHROMA_RANGE_HZ
    hi = min(hi, rate / 2 * 0.9)
    sel = np.flatnonzero((freqs >= lo) & (freqs <= hi))
    span = slice(int(sel[0]), int(sel[-1]) + 1)
    f = freqs[span]
    midi = 69 + 12 * np.log2(f / 440.0)
    fold = np.zeros((len(f), 12), np.float32)
    # Each bin feeds the pitch classes within a semitone of it, cos^2-weighted by distance, and
    # less than its resolution allows where bins are wider than a semitone (low notes).
    for pc in range(12):
        d = (midi - pc + 6) % 12 - 6  # semitones to the nearest pitch of class pc
        fold[:, pc] = np.where(np.abs(d) < 1.0, np.cos(np.pi / 2 * d) ** 2, 0.0)
    return n_fft, hop, window, fold, span


class _Framer:
    """Cuts a stream of samples into frames of ``n_fft`` every ``hop`` samples."""

    def __init__(self, n_fft: int, hop: int, lead: int = 0) -> None:
        self.n_fft, self.hop = n_fft, hop
        # Centred frames: the first frame's centre is sample 0 (``lead`` zeros before it).
        self._buffer = np.zeros(lead, np.float32)

    def push(self, x: np.ndarray) -> np.ndarray:
        buf = np.concatenate([self._buffer, x]) if len(self._buffer) else np.asarray(x, np.float32)
        count = 0 if len(buf) < self.n_fft else (len(buf) - self.n_fft) // self.hop + 1
        frames = (
            np.lib.stride_tricks.sliding_window_view(buf, self.n_fft)[:: self.hop][:count]
            if count
            else np.empty((0, self.n_fft), np.float32)
        )
        self._buffer = buf[count * self.hop :].copy()
        return frames

    def flush(self) -> np.ndarray:
        """The frames whose centres fall inside the samples pushed (zero padding after)."""
        pad = np.zeros(self.n_fft // 2, np.float32)
        return self.push(pad)


class LowRateAnalysis:
    """Streaming frames of the mono analysis signal; ``finish`` returns the envelopes."""

    def __init__(self, rate: float, fps: float = FPS) -> None:
        self.rate = float(rate)
        self.n_fft, self.hop, self._window, self._bands, self.band_hz, self._bin_hz = rhythm_plan(self.rate, fps)
        self.fps = self.rate / self.hop
        self._frames = _Framer(self.n_fft, self.hop, lead=self.n_fft // 2)
        self.c_fft, self.c_hop, self._c_window, self._fold, self._c_span = chroma_plan(self.rate)
        self.chroma_fps = self.rate / self.c_hop
        self._c_frames = _Framer(self.c_fft, self.c_hop, lead=self.c_fft // 2)
        self._onset: list[np.ndarray] = []
        self._onset_low: list[np.ndarray] = []
        self._chroma: list[np.ndarray] = []
        self._previous = np.zeros(N_BANDS, np.float32)  # log band power of the last frame
        self._low = self.band_hz < LOW_BAND_HZ
        self._speech = (self.band_hz >= SPEECH_BAND_HZ[0]) & (self.band_hz <= SPEECH_BAND_HZ[1])
        self._high = self.band_hz >= 2_000
        self._speech_buf = np.empty((0, int(self._speech.sum())), np.float32)
        self.speech_windows: list[
            tuple[float, float, float, float]
        ] = []  # (syllabic share, depth dB, periodicity, peak power)
        # Spectral shape sums (weighted by band power): centroid, flatness, high-frequency share.
        self._shape = np.zeros(4)
        self.frames = 0

    def push(self, x: np.ndarray) -> None:
        if len(x) == 0:
            return
        self._rhythm(self._frames.push(x))
        self._chroma_frames(self._c_frames.push(x))

    def flush(self) -> None:
        self._rhythm(self._frames.flush())
        self._chroma_frames(self._c_frames.flush())
        if len(self._speech_buf) >= SPEECH_WINDOW // 2:
            self._speech_windows(self._speech_buf[None, :, :])
        self._speech_buf = self._speech_buf[:0]

    def _rhythm(self, frames: np.ndarray) -> None:
        if not len(frames):
            return
        spectrum = scipy.fft.rfft(frames * self._window, axis=-1)
        power = spectrum.real * spectrum.real + spectrum.imag * spectrum.imag
        bands = power @ self._bands  # [frames, bands]
        logs = np.log1p(GAMMA * bands)
        diff = np.diff(logs, axis=0, prepend=self._previous[None, :])
        self._previous = logs[-1]
        rise = np.maximum(diff, 0.0)
        self._onset.append(rise.mean(axis=1).astype(np.float32))
        self._onset_low.append(rise[:, self._low].mean(axis=1).astype(np.float32))
        # Shape statistics, weighted by each frame's power, on every fourth frame (statistics
        # of a whole track need no more).
        some = bands[::4]
        total = some.sum(axis=1) + 1e-12
        geo = np.exp(np.log(some + 1e-12).mean(axis=1))
        flatness = geo / (some.mean(axis=1) + 1e-12)
        self._shape += [total.sum(), (some @ self.band_hz).sum(), (total * flatness).sum(), some[:, self._high].sum()]
        self.frames += len(frames)
        # Speech-band envelopes for the modulation measure, by windows.
        self._speech_buf = np.concatenate([self._speech_buf, bands[:, self._speech].astype(np.float32)])
        whole = len(self._speech_buf) // SPEECH_WINDOW
        if whole:
            self._speech_windows(self._speech_buf[: whole * SPEECH_WINDOW].reshape(whole, SPEECH_WINDOW, -1))
            self._speech_buf = self._speech_buf[whole * SPEECH_WINDOW :]

    def _speech_windows(self, power: np.ndarray) -> None:
        """Speech-like modulation of windows [windows, frames, bands] of speech-band powers, in
        dB floored 40 dB under each window's peak (so the measure does not depend on the level):
        the share of the envelopes' modulation energy (0.5-20 Hz) that lies at the syllable
        rate (2-8 Hz), the envelopes' depth (standard deviation over time, dB, mean over
        bands) and their periodicity. Speech has the first two high and the third low; music's
        modulation is slower or faster, shallower, and repeats with the beat."""
        _k, n, _ = power.shape
        top = power.max(axis=(1, 2))
        floor = top[:, None, None] * np.float32(SPEECH_FLOOR) + np.float32(1e-20)
        level = 10.0 * np.log10(power + floor)
        env = level - level.mean(axis=1, keepdims=True)
        taper = np.hanning(n).astype(np.float32)[None, :, None]
        spec = np.abs(np.fft.rfft(env * taper, axis=1)) ** 2  # [windows, mod bins, bands]
        mod_hz = np.fft.rfftfreq(n, 1.0 / self.fps)
        total = spec[:, (mod_hz > 0.5) & (mod_hz <= 20.0)].sum(axis=(1, 2)) + 1e-9
        share = spec[:, (mod_hz >= 2.0) & (mod_hz <= 8.0)].sum(axis=(1, 2)) / total
        depth = level.std(axis=1).mean(axis=1)
        # Periodicity: the band-summed envelope's normalised autocorrelation, highest at a lag
        # of 0.25-2 s (a beat or a bar); music repeats there, speech does not.
        summed = env.sum(axis=2)
        summed = summed - summed.mean(axis=1, keepdims=True)
        acf = np.fft.irfft(np.abs(np.fft.rfft(summed, 2 * n, axis=1)) ** 2, axis=1)[:, :n]
        lo, hi = max(1, int(0.25 * self.fps)), max(2, int(2.0 * self.fps))
        periodic = (acf[:, lo:hi] / np.maximum(acf[:, :1], 1e-9)).max(axis=1)
        self.speech_windows.extend(zip(share.tolist(), depth.tolist(), periodic.tolist(), top.tolist()))

    def _chroma_frames(self, frames: np.ndarray) -> None:
        if not len(frames):
            return
        spectrum = np.abs(scipy.fft.rfft(frames * self._c_window, axis=-1)[:, self._c_span])
        self._chroma.append((spectrum @ self._fold).astype(np.float32))

    def envelopes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(onset envelope, low-band onset envelope, chroma frames [n, 12])."""
        onset = np.concatenate(self._onset) if self._onset else np.empty(0, np.float32)
        low = np.concatenate(self._onset_low) if self._onset_low else np.empty(0, np.float32)
        chroma = np.concatenate(self._chroma) if self._chroma else np.empty((0, 12), np.float32)
        return onset, low, chroma

    def shape(self) -> dict[str, float]:
        """Power-weighted spectral centroid (Hz), flatness (0-1) and share above 2 kHz."""
        total = self._shape[0]
        if total <= 1e-9:
            return {"centroid_hz": 0.0, "flatness": 0.0, "high_share": 0.0}
        return {
            "centroid_hz": float(self._shape[1] / total),
            "flatness": float(self._shape[2] / total),
            "high_share": float(self._shape[3] / total),
        }
