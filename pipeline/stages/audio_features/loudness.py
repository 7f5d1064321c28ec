"""Loudness (ITU-R BS.1770-4, EBU R128), loudness range (EBU Tech 3342) and true peak.

Everything here reads the original channels at the signal's own rate; a mono downmix would
read about 3 LU low on stereo music.

**K-weighted energy per 100-ms block, cheaply.** BS.1770 needs, for each channel, the energy
of the K-weighted signal in 100-ms steps (400-ms gating blocks overlap by 75 %). Filtering
every channel at 44.1 or 48 kHz with the two biquads costs about 37 ms of CPU per stereo audio
minute here (``scipy.signal.sosfilt``), more than this whole stage may spend. So the filter is
applied in pieces, each where it is cheap, with its exact response at the signal's rate. For
the shelf S and the high pass R of the K-filter:

    E_K = sum_f |S|^2 |R|^2 P(f)
        = g E  +  sum_{f < fs/2q} (|S|^2 r - g) P(f)  -  r sum_f (1 - |R|^2 / r) P(f)

* ``g E``: the block's plain energy (a sum of squares at the full rate) times the K-filter's
  gain over the band above fs / 2q, where it is a flat +4 dB shelf (within 0.3 dB; ``g`` is its
  1/f-weighted mean there).
* the low-band sum: through the DFT of the block box-decimated by ``q`` (q samples summed),
  divided by the box's known response; the shelf's weights are smooth, so the block's edges
  (the DFT treats the block as periodic) do not matter. The low-rate signal is also what the
  rhythm and key analyses read: the decimation is shared.
* the high pass (38 Hz; ``r`` its gain at high frequencies): in the time domain, on the signal
  box-decimated again to ~1.5 kHz, with its state carried over: its steep slope would make the
  block edges leak (a 55-Hz sine read 0.3 dB low through the DFT). Its low-rate version is
  fitted to the full-rate stage, and a 3-tap emphasis undoes the boxes' droop.

Against ``sosfilt`` of the two biquads: sines 25 Hz-12 kHz within 0.07 dB (the worst just
above the decimated band, whose alias the box passes at -8 dB), bass-heavy noise and rendered
music within 0.01 LU integrated (``tests/stages/test_audio_features_loudness.py``).

Rates whose 100-ms block is not a whole number of samples (11025 Hz) use the exact time-domain
filter (:func:`k_weighted_block_energies`), which is also the tests' reference.

**True peak** (BS.1770-4 Annex 2): 4x oversampling (2x from 96 kHz, none from 192 kHz) with a
12-tap-per-phase least-squares interpolator, evaluated only around samples within 3.1 dB of the
running maximum: an inter-sample peak exceeds its neighbouring samples by at most 3.01 dB for
content below fs/4, so nothing louder is missed there.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import scipy.fft
import scipy.signal

#: BS.1770-4's two K-weighting stages as analog prototypes (libebur128's derivation), so the
#: filter can be re-derived at any sample rate; at 48 kHz they give the standard's coefficients.
_SHELF_HZ, _SHELF_DB, _SHELF_Q = 1681.974450955533, 3.999843853973347, 0.7071752369554196
_HIGHPASS_HZ, _HIGHPASS_Q = 38.13547087602444, 0.5003270373238773

ABSOLUTE_GATE_LUFS = -70.0
RELATIVE_GATE_LU = -10.0  # integrated loudness (BS.1770-4)
LRA_RELATIVE_GATE_LU = -20.0  # loudness range (EBU Tech 3342)
BLOCK_S = 0.1  # the step of the gating blocks; a gating block is 4 steps, a short-term window 30
_OFFSET = -0.691  # BS.1770's constant: a 1 kHz sine at -23 dBFS on one channel reads -23 LUFS... per channel
#: Samples within this much of the running maximum get their inter-sample peaks computed.
TRUE_PEAK_MARGIN_DB = 3.1
_TAPS = 12  # interpolator taps per phase


def k_weighting_sos(rate: float) -> np.ndarray:
    """The K-weighting filter at ``rate`` as second-order sections [2, 6]."""
    k = math.tan(math.pi * _SHELF_HZ / rate)
    vh = 10.0 ** (_SHELF_DB / 20.0)
    vb = vh**0.4996667741545416
    a0 = 1.0 + k / _SHELF_Q + k * k
    shelf = [
        (vh + vb * k / _SHELF_Q + k * k) / a0,
        2.0 * (k * k - vh) / a0,
        (vh - vb * k / _SHELF_Q + k * k) / a0,
        1.0,
        2.0 * (k * k - 1.0) / a0,
        (1.0 - k / _SHELF_Q + k * k) / a0,
    ]
    k = math.tan(math.pi * _HIGHPASS_HZ / rate)
    a0 = 1.0 + k / _HIGHPASS_Q + k * k
    highpass = [1.0, -2.0, 1.0, 1.0, 2.0 * (k * k - 1.0) / a0, (1.0 - k / _HIGHPASS_Q + k * k) / a0]
    return np.array([shelf, highpass])


def k_power(rate: float, freqs_hz: np.ndarray) -> np.ndarray:
    """|H(f)|^2 of the K-weighting filter at ``rate``, at ``freqs_hz``."""
    _, h = scipy.signal.sosfreqz(k_weighting_sos(rate), worN=2 * np.pi * np.asarray(freqs_hz, float) / rate)
    return np.abs(h) ** 2


def highpass_gain(rate: float) -> float:
    """|R|^2 of the K-filter's high-pass stage at Nyquist: its gain at high frequencies (the
    standard's [1, -2, 1] numerator is not normalised; +0.04 dB at 48 kHz)."""
    a1, a2 = k_weighting_sos(rate)[1, 4:6]
    return float((4.0 / (1.0 - a1 + a2)) ** 2)


def shelf_power(rate: float, freqs_hz: np.ndarray) -> np.ndarray:
    """|S(f)|^2 of the K-weighting's first stage (the high shelf) alone."""
    _, h = scipy.signal.sosfreqz(k_weighting_sos(rate)[:1], worN=2 * np.pi * np.asarray(freqs_hz, float) / rate)
    return np.abs(h) ** 2


def highpass_plan(rate: int, n: int, q: int) -> int:
    """q2: the box decimation, after q, at which the high-pass stage runs in the time domain:
    it divides the block's n / q samples and puts rate / (q q2) at 1.2-2.4 kHz if it can."""
    m = n // q
    choices = [k for k in range(1, 65) if m % k == 0 and 1_200 <= rate / (q * k) <= 2_400]
    return min(choices) if choices else 1


@lru_cache(maxsize=16)
def _fitted_highpass(rate: float, low_rate: float) -> np.ndarray:
    """The high-pass stage for ``low_rate`` as one section [1, 6], fitted (least squares on
    |H|^2, 5 Hz to 0.45 of the low rate) to the stage at ``rate`` with unit gain at high
    frequencies. Re-deriving it by the bilinear transform at ~1.5 kHz warped it: 0.5 % too
    much energy passed at 100 Hz, 0.8 % at 300 Hz, so a 100-Hz tone read 0.03 dB high."""
    import scipy.optimize

    freqs = np.geomspace(5.0, 0.45 * low_rate, 200)
    _, full = scipy.signal.sosfreqz(k_weighting_sos(rate)[1:], worN=2 * np.pi * freqs / rate)
    target = np.abs(full) ** 2 / highpass_gain(rate)
    start = k_weighting_sos(low_rate)[1]

    def response(params: np.ndarray) -> np.ndarray:
        gain, a1, a2 = params
        _, h = scipy.signal.freqz(gain * np.array([1.0, -2.0, 1.0]), [1.0, a1, a2], worN=2 * np.pi * freqs / low_rate)
        return np.abs(h) ** 2

    fit = scipy.optimize.least_squares(
        lambda p: response(p) - target, [1.0 / np.sqrt(highpass_gain(low_rate)), start[4], start[5]]
    )
    gain, a1, a2 = fit.x
    return np.array([[gain, -2.0 * gain, gain, 1.0, a1, a2]])


def _droop_emphasis(rate: float, q: int, q2: int) -> float:
    """a of the emphasis [-a, 1 + 2a, -a] at rate / (q q2) that undoes, to second order in
    frequency, the energy droop of summing q samples at ``rate`` and then q2 at ``rate / q``
    (fitted at 100 Hz, where the high-pass stage acts)."""
    f = 100.0

    def box(k: int, fs: float) -> float:
        x = np.pi * f / fs
        return (np.sin(k * x) / (k * np.sin(x))) ** 2

    droop = box(q, rate) * box(q2, rate / q)
    w = 2 * np.pi * f / (rate / (q * q2))
    # (1 + 2a (1 - cos w))^2 = 1 / droop
    return float((1 / np.sqrt(droop) - 1) / (2 * (1 - np.cos(w))))


def channel_weights(channels: int) -> np.ndarray:
    """BS.1770-4 channel weights G for FFmpeg's default layouts: 1.0 for the front channels,
    1.41 for the surrounds of 5.0 (L R C Ls Rs), 5.1 and 7.1 (LFE, 4th, excluded); 1.0 else."""
    if channels == 5:
        return np.array([1.0, 1.0, 1.0, 1.41, 1.41])
    if channels == 6:
        return np.array([1.0, 1.0, 1.0, 0.0, 1.41, 1.41])
    if channels == 8:
        return np.array([1.0, 1.0, 1.0, 0.0, 1.41, 1.41, 1.41, 1.41])
    return np.ones(channels)


def block_plan(rate: int) -> tuple[int, int] | None:
    """(samples per 100-ms block, box decimation q) for the Parseval path, or None when a
    block is not a whole number of samples. q divides the block and puts ``rate / q`` in
    7-12.5 kHz when it can (the analysis rate), else the rate itself if it is below that."""
    if rate % 10:
        return None
    n = rate // 10
    choices = [q for q in range(1, 17) if n % q == 0 and 7_000 <= rate / q <= 12_500]
    if choices:
        return n, min(choices)
    if rate < 7_000:
        return n, 1
    # No divisor lands in the band (e.g. 22050 Hz): the smallest q above it, or no decimation.
    above = [q for q in range(1, 17) if n % q == 0 and rate / q >= 12_500]
    return n, max(above) if above else 1


@lru_cache(maxsize=16)
def _low_band_weights(rate: int, n: int, q: int) -> tuple[float, np.ndarray]:
    """(g, v): E_K = g * E + sum_k v_k |S_k|^2 for a block of ``n`` samples whose q-box
    decimation has the DFT S (rfft of n / q samples). See the module docstring."""
    m = n // q
    bins = np.arange(m // 2 + 1)
    freqs = bins * rate / n  # 10 Hz apart
    # The shelf times the high-pass stage's gain at high frequencies: what the high pass takes
    # out at low frequencies is computed in the time domain (KWeightedBlocks._highpass_removes).
    h2 = shelf_power(rate, freqs) * highpass_gain(rate)
    if q == 1:
        counts = np.full(len(bins), 2.0)
        counts[0] = 1.0
        if m % 2 == 0:
            counts[-1] = 1.0
        return 0.0, (h2 * counts / n).astype(np.float32)
    # The K-filter's mean gain over the high band, weighted as a 1/f spectrum.
    high = np.geomspace(rate / (2 * q), min(rate / 2, 16_000.0), 256)
    g = float(np.trapz(k_power(rate, high) / high, high) / np.trapz(1 / high, high))
    counts = np.full(len(bins), 2.0)
    counts[0] = 1.0
    if m % 2 == 0:
        counts[-1] = 0.0  # the decimated Nyquist bin mixes +f and -f: left to the high band
    # |B(f)|: the response of summing q consecutive samples.
    x = np.pi * bins * q / n
    box = np.where(bins == 0, float(q), np.abs(np.sin(x)) / np.maximum(np.abs(np.sin(x / q)), 1e-30))
    v = (h2 - g) * counts * q * q / (box * box) / n
    return g, v.astype(np.float32)


def k_weighted_block_energies(
    x: np.ndarray, rate: float, zi: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The exact time-domain reference: [channels, n] -> (K-weighted sample energies [channels, n]
    as float64, the filter state to continue with). Used for rates without a whole-sample
    block and by the tests."""
    sos = k_weighting_sos(rate)
    if zi is None:
        zi = np.zeros((sos.shape[0], x.shape[0], 2))
    y, zf = scipy.signal.sosfilt(sos, x.astype(np.float64), axis=-1, zi=zi)
    return y * y, zf


class KWeightedBlocks:
    """Streams [channels, n] float32 audio into the weighted K-energy of each 100-ms block
    (``energies``, summed over channels with their weights; ``lengths`` in samples) and, with
    the Parseval plan, the box-decimated mono at ``analysis_rate`` for the other analyses."""

    def __init__(self, rate: int, channels: int, weights: np.ndarray | None = None) -> None:
        self.rate = int(rate)
        self.channels = int(channels)
        self.weights = (channel_weights(channels) if weights is None else np.asarray(weights, float)).astype(np.float64)
        plan = block_plan(self.rate)
        self.exact = plan is None
        self._energies: list[np.ndarray] = []
        self._lengths: list[np.ndarray] = []
        if plan is None:
            self.block, self.q = 0, 1
            self.analysis_rate = float(self.rate)
            self._zi: np.ndarray | None = None
            self._acc = np.zeros(1)  # energy and samples of the open block
            self._acc_n = 0
            self._blocks_done = 0
        else:
            self.block, self.q = plan
            self.analysis_rate = self.rate / self.q
            self._g, self._v = _low_band_weights(self.rate, self.block, self.q)
            self._v2 = np.repeat(self._v, 2)  # for the interleaved real and imaginary parts
            self.q2 = highpass_plan(self.rate, self.block, self.q)
            low_rate = self.rate / (self.q * self.q2)
            self._hp = _fitted_highpass(self.rate, low_rate).astype(np.float32)
            self._hp_gain = highpass_gain(self.rate)
            self._droop = _droop_emphasis(self.rate, self.q, self.q2)
            self._hp_tail = np.zeros((self.channels, 2), np.float32)  # the last 2 samples, for the emphasis
            self._hp_state = np.zeros((1, self.channels, 2), np.float32)  # sosfilt's zi: [sections, channels, 2]
            self._pending = np.empty((self.channels, 0), np.float32)
        #: True after a push whose samples held NaN or infinity (replaced by 0 and +-1, as the
        #: decoder does): the caller should sanitise its copy too.
        self.sanitised = False

    # -- Parseval path -------------------------------------------------------------------------

    def push(self, x: np.ndarray) -> np.ndarray | None:
        """Add ``x`` [channels, n]; returns the new box-decimated mono samples (Parseval path:
        float32 at ``analysis_rate``, the mean of the channels) or None (exact path). A chunk
        of whole blocks with nothing pending (what :class:`~.stream.AudioFeatureStream` hands
        over) is read in place; anything else is joined to the pending samples first."""
        self.sanitised = False
        if self.exact:
            if not np.isfinite(x.sum()):
                x = np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)
                self.sanitised = True
            self._push_exact(x)
            return None
        n = self.block
        if self._pending.shape[1]:
            x = np.concatenate([self._pending, x], axis=1)
        whole = x.shape[1] // n * n
        rest = x[:, whole:]
        self._pending = np.array(rest, dtype=np.float32, copy=True)
        if rest.shape[1] and not np.isfinite(self._pending.sum()):
            self._pending = np.nan_to_num(self._pending, nan=0.0, posinf=1.0, neginf=-1.0)
            self.sanitised = True
        if not whole:
            return np.empty(0, np.float32)
        body = x if whole == x.shape[1] else x[:, :whole]
        if not body.flags.c_contiguous or body.dtype != np.float32:
            body = np.ascontiguousarray(body, dtype=np.float32)
        return self._blocks(body)

    def _blocks(self, x: np.ndarray) -> np.ndarray:
        """Whole blocks [channels, k * block] -> their energies (stored), the decimated mono.
        NaN and infinity anywhere show in the sums; such blocks are computed again from
        sanitised samples."""
        energy, mono = self._compute(x)
        if not (np.isfinite(energy).all() and np.isfinite(mono).all()):
            energy, mono = self._compute(np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0))
            self.sanitised = True
        self._energies.append(np.maximum(energy, 0.0))
        self._lengths.append(np.full(len(energy), self.block, np.int32))
        return mono

    def _compute(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every channel at once, each step one numpy call over the whole batch (the calls'
        own cost, paid per channel and per step, was a fifth of the stage's CPU)."""
        c, total = x.shape
        nb = total // self.block
        m = self.block // self.q
        lows = _box_sum(x.reshape(-1), self.q).reshape(c, nb * m)
        spectrum = scipy.fft.rfft(lows.reshape(c * nb, m), axis=-1)
        parts = spectrum.view(np.float32)  # [c * nb, 2 * bins]: real and imaginary interleaved
        np.multiply(parts, parts, out=parts)
        shelf = (parts @ self._v2).astype(np.float64).reshape(c, nb)
        if self.q > 1:
            rows = x.reshape(c * nb, self.block)
            # A batched dot product (BLAS): a third of einsum's time for the same sums.
            plain = np.matmul(rows[:, None, :], rows[:, :, None]).reshape(c, nb)
            shelf += self._g * plain.astype(np.float64)
        shelf -= self._highpass_removes(lows, nb)
        energy = self.weights @ shelf
        mono = lows[0] if c == 1 else lows.sum(axis=0)
        mono = mono * np.float32(1.0 / (self.q * c))
        return energy, mono

    def _highpass_removes(self, lows: np.ndarray, nb: int) -> np.ndarray:
        """[channels, blocks]: the energy the K-filter's high-pass stage (38 Hz) takes out of
        each block, in the time domain on the signal box-decimated again to ~1.5 kHz, with the
        filter's state carried across blocks and batches (all channels in one call). Through the
        block's DFT the stage's steep slope made a 55-Hz sine read 0.3 dB low (the block edges
        leak). Where the stage acts the shelf's gain and the boxes' response are flat within
        0.02 dB; above the low rate's band the stage takes out under 0.5 %."""
        c = lows.shape[0]
        y = _box_sum(lows.reshape(-1), self.q2).reshape(c, -1)
        # Undo the two boxes' droop (-0.06 dB at 100 Hz) with a 3-tap emphasis, one sample late.
        ext = np.concatenate([self._hp_tail, y], axis=1)
        self._hp_tail = ext[:, -2:].copy()
        a = np.float32(self._droop)
        y = np.float32(1 + 2 * a) * ext[:, 1:-1] - a * (ext[:, :-2] + ext[:, 2:])
        filtered, self._hp_state = _sosfilt(self._hp, y, self._hp_state)
        before, after = y.reshape(c * nb, 1, -1), filtered.reshape(c * nb, 1, -1)
        removed = np.matmul(before, before.transpose(0, 2, 1)) - np.matmul(after, after.transpose(0, 2, 1))
        return (self._hp_gain / (self.q * self.q2)) * removed.reshape(c, nb).astype(np.float64)

    # -- exact path ----------------------------------------------------------------------------

    def _push_exact(self, x: np.ndarray) -> None:
        if x.shape[1] == 0:
            return
        sq, self._zi = k_weighted_block_energies(x, self.rate, self._zi)
        weighted = self.weights @ sq  # [n]
        cum = np.concatenate([[0.0], np.cumsum(weighted)])
        pos = 0
        energies, lengths = [], []
        total = x.shape[1]
        while True:
            # Block k covers samples [round(k * rate / 10), round((k + 1) * rate / 10)).
            end_abs = round((self._blocks_done + 1) * self.rate * BLOCK_S)
            start_abs = round(self._blocks_done * self.rate * BLOCK_S)
            need = end_abs - start_abs - self._acc_n
            if pos + need > total:
                self._acc[0] += cum[total] - cum[pos]
                self._acc_n += total - pos
                break
            energies.append(self._acc[0] + cum[pos + need] - cum[pos])
            lengths.append(end_abs - start_abs)
            pos += need
            self._acc[0], self._acc_n = 0.0, 0
            self._blocks_done += 1
        if energies:
            self._energies.append(np.array(energies))
            self._lengths.append(np.array(lengths, np.int32))

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """(weighted K-energy per complete 100-ms block [float64], samples per block); the
        samples of an incomplete last block are left out, as BS.1770 gates whole blocks."""
        energies = np.concatenate(self._energies) if self._energies else np.empty(0)
        lengths = np.concatenate(self._lengths) if self._lengths else np.empty(0, np.int32)
        return energies, lengths

    @property
    def tail(self) -> np.ndarray:
        """The samples of the incomplete last block (Parseval path), for the analyses' end."""
        if self.exact or not self._pending.shape[1]:
            return np.empty(0, np.float32)
        whole = self._pending.shape[1] // self.q * self.q
        if not whole:
            return np.empty(0, np.float32)
        return self._pending[:, :whole].reshape(self.channels, -1, self.q).mean(axis=(0, 2)).astype(np.float32)


def _sosfilt(sos: np.ndarray, x: np.ndarray, zi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One second-order section along the last axis, with its state [1, channels, 2] (as
    ``sosfilt`` keeps it): ``lfilter``, a fifth faster than ``sosfilt`` on one section."""
    y, zf = scipy.signal.lfilter(sos[0, :3], sos[0, 3:], x, axis=-1, zi=zi[0])
    return y, zf[None]


def _box_sum(row: np.ndarray, q: int) -> np.ndarray:
    """Sums of ``q`` consecutive samples (``row`` holds a multiple of q): q - 1 strided adds,
    which beat a BLAS matrix-vector product (whose threads spin on the other core)."""
    if q == 1:
        return row
    cols = row.reshape(-1, q)
    out = cols[:, 0] + cols[:, 1]
    for k in range(2, q):
        out += cols[:, k]
    return out


# -- gating ------------------------------------------------------------------------------------


def _windows(energies: np.ndarray, lengths: np.ndarray, steps: int) -> np.ndarray:
    """Mean square (weighted over channels) of every window of ``steps`` blocks, one per block."""
    if len(energies) < steps:
        return np.empty(0)
    ce = np.concatenate([[0.0], np.cumsum(energies)])
    cn = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    return (ce[steps:] - ce[:-steps]) / np.maximum(cn[steps:] - cn[:-steps], 1)


def to_lufs(mean_square: np.ndarray | float) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return _OFFSET + 10.0 * np.log10(np.maximum(mean_square, 0.0))


def momentary(energies: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Loudness of every 400-ms gating block, 10 per second (LUFS; -inf for digital silence)."""
    return to_lufs(_windows(energies, lengths, 4))


def short_term(energies: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Short-term loudness (3-s windows) every 100 ms, LUFS."""
    return to_lufs(_windows(energies, lengths, 30))


def gated_mean(mean_squares: np.ndarray, relative_lu: float) -> tuple[float | None, np.ndarray]:
    """(loudness of the windows passing the absolute and the relative gate, their mask)."""
    if not len(mean_squares):
        return None, np.zeros(0, bool)
    loud = to_lufs(mean_squares)
    keep = loud > ABSOLUTE_GATE_LUFS
    if not keep.any():
        return None, keep
    relative = float(to_lufs(mean_squares[keep].mean())) + relative_lu
    keep &= loud > relative
    if not keep.any():
        return None, keep
    return float(to_lufs(mean_squares[keep].mean())), keep


def integrated(energies: np.ndarray, lengths: np.ndarray) -> float | None:
    """Integrated loudness (LUFS, BS.1770-4 gating), None when no block passes the gates."""
    value, _ = gated_mean(_windows(energies, lengths, 4), RELATIVE_GATE_LU)
    return value


def loudness_range(energies: np.ndarray, lengths: np.ndarray) -> float | None:
    """Loudness range (LU, EBU Tech 3342): the 10th to 95th percentile of the gated short-term
    loudness (3-s windows every 100 ms, absolute gate -70 LUFS, relative gate -20 LU)."""
    windows = _windows(energies, lengths, 30)
    _, keep = gated_mean(windows, LRA_RELATIVE_GATE_LU)
    if not keep.any():
        return None
    loud = to_lufs(windows[keep])
    low, high = np.percentile(loud, [10, 95])
    return float(high - low)


# -- true peak ---------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def _interpolator(factor: int) -> np.ndarray:
    """[factor - 1, 12] taps giving x(n + p / factor) from x[n-5 .. n+6], p = 1 .. factor-1:
    least-squares fractional delays over 0-0.8 of Nyquist (within 0.06 dB up to 0.35 fs)."""
    taps = np.arange(-(_TAPS // 2) + 1, _TAPS // 2 + 1)  # -5 .. 6
    w = np.linspace(0, 0.8 * np.pi, 4000)
    basis = np.cos(np.outer(w, taps)), np.sin(np.outer(w, taps))
    out = []
    for p in range(1, factor):
        d = p / factor
        # Real and imaginary parts of sum_j t_j e^{-iwj} = e^{-iwd}.
        a = np.vstack([basis[0], basis[1]])
        b = np.concatenate([np.cos(w * d), np.sin(w * d)])
        out.append(np.linalg.lstsq(a, b, rcond=None)[0])
    return np.array(out, np.float32)


class TruePeak:
    """Streaming true peak of [channels, n] audio (linear, over all channels).

    Each push: the sample peak of every 100-ms row of every channel (two reductions over the
    batch); in the rows within :data:`TRUE_PEAK_MARGIN_DB` of the running peak, the samples
    that are, and of those the local maxima of |x| (the peak of a signal below fs / 4 lies
    between a local maximum and a neighbour); the intervals on either side of each get the
    interpolator's three phases."""

    def __init__(self, rate: int, channels: int) -> None:
        self.rate, self.channels = int(rate), int(channels)
        self.factor = 4 if rate < 96_000 else 2 if rate < 192_000 else 1
        self._taps: np.ndarray | None = _interpolator(self.factor) if self.factor > 1 else None
        self._margin = 10 ** (-TRUE_PEAK_MARGIN_DB / 20)
        self.peak = 0.0  # the running true peak (linear)
        self.sample_peak = 0.0
        self._keep = 2 * _TAPS
        self._history = np.zeros((self.channels, self._keep), np.float32)  # the last samples seen
        self._block = rate // 10 if rate % 10 == 0 else 441 if rate % 441 == 0 else 512

    def push(self, x: np.ndarray) -> None:
        c, n = x.shape
        if n == 0:
            return
        whole = n // self._block * self._block
        if whole == n and x.flags.c_contiguous:
            rows = x.reshape(c * (n // self._block), self._block)
        else:
            rows = np.ascontiguousarray(x[:, :whole]).reshape(-1, self._block)
        rest = x[:, whole:]
        peaks = np.maximum(rows.max(axis=1), -rows.min(axis=1)) if whole else np.zeros(0, np.float32)
        rest_peaks = np.abs(rest).max(axis=1) if rest.shape[1] else np.zeros(c, np.float32)
        top = float(max(peaks.max(initial=0.0), rest_peaks.max(initial=0.0)))
        self.sample_peak = max(self.sample_peak, top)
        self.peak = max(self.peak, top)
        if self._taps is not None and top > 0.0:
            threshold = self.peak * self._margin
            per_channel = whole // self._block
            hot = np.flatnonzero(peaks >= threshold)
            for ch in range(c):
                mine = hot[(hot >= ch * per_channel) & (hot < (ch + 1) * per_channel)] - ch * per_channel
                row = x[ch]
                # The history's samples (the end of the previous chunk) get their intervals now
                # that the samples after them are here.
                edge = np.concatenate([self._history[ch], row[: self._keep]])
                self._refine(edge, np.flatnonzero(np.abs(edge[: self._keep + _TAPS // 2]) >= threshold))
                if len(mine) or rest_peaks[ch] >= threshold:
                    self._refine(row, self._candidates(row, mine, whole, threshold))
        if n >= self._keep:
            self._history = np.array(x[:, n - self._keep :], dtype=np.float32)
        else:
            self._history = np.concatenate([self._history[:, n:], x], axis=1).astype(np.float32)

    def _candidates(self, row: np.ndarray, hot: np.ndarray, whole: int, threshold: float) -> np.ndarray:
        """Positions in ``row`` of the samples at or over ``threshold`` in the ``hot`` rows and
        the rest after ``whole``, kept where |x| is a local maximum (ties kept)."""
        parts = []
        if len(hot):
            blocks = row[:whole].reshape(-1, self._block)[hot]
            rows, cols = np.nonzero(np.abs(blocks) >= threshold)
            parts.append(hot[rows] * self._block + cols)
        if whole < len(row):
            parts.append(np.flatnonzero(np.abs(row[whole:]) >= threshold) + whole)
        positions = np.concatenate(parts) if len(parts) > 1 else parts[0]
        inner = positions[(positions > 0) & (positions < len(row) - 1)]
        if len(inner):
            here = np.abs(row[inner])
            local = (here >= np.abs(row[inner - 1])) & (here >= np.abs(row[inner + 1]))
            positions = np.concatenate([positions[(positions == 0) | (positions == len(row) - 1)], inner[local]])
        return positions

    def _refine(self, row: np.ndarray, positions: np.ndarray) -> None:
        """The interpolated peaks between each candidate sample of ``row`` and both its
        neighbours, where ``row`` holds the taps (other intervals wait for the next chunk)."""
        if not len(positions) or self._taps is None:  # no taps: sampled at 4x or more already
            return
        starts = np.concatenate([positions - 1, positions])  # interval [k, k + 1]
        lo = starts - (_TAPS // 2 - 1)  # x[k-5 .. k+6] feeds it
        lo = lo[(lo >= 0) & (lo + _TAPS <= len(row))]
        if not len(lo):
            return
        windows = np.lib.stride_tricks.sliding_window_view(row, _TAPS)[lo]
        self.peak = max(self.peak, float(np.abs(windows @ self._taps.T).max()))

    def finish(self) -> None:
        """The intervals at the very end, the signal padded with zeros."""
        if self._taps is None or self.peak <= 0:
            return
        threshold = self.peak * self._margin
        for ch in range(self.channels):
            edge = np.concatenate([self._history[ch], np.zeros(_TAPS, np.float32)])
            self._refine(edge, np.flatnonzero(np.abs(edge) >= threshold))

    @property
    def dbtp(self) -> float | None:
        return None if self.peak <= 0 else 20.0 * math.log10(self.peak)
