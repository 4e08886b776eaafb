"""Compiled inner loop of the skipping conv2d: one dot product per live output element.

The work must be proportional to the live outputs, so the kernel is a direct convolution
driven by a list of live (channel, image, position) lanes, not a GEMM: a random element mask
leaves no dense blocks for a GEMM to exploit. The input is padded and stored channels-last,
so a filter row meets the input in one contiguous run (kw * C_in floats) that the compiler
vectorises. The kernel is weight-stationary: four live lanes of one output channel share
every filter load (register blocking), and lanes are numbered across rows and images so that
small maps (the 4x4 and 1x1 maps of a network's last stages) still fill the 4-wide blocks.
Measured on the papers' module (64 -> 64 channels, 64x64, 3x3, batch 8) it runs at about a
third of the speed of oneDNN's dense convolution at C = 0 and breaks even near C = 0.75; on
the demo model's small maps it beats the dense layers at C = 0.42 (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import math

try:  # numba is a declared dependency; kernels.py falls back to torch without it
    import numba
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None

# Activation codes shared with kernels.py.
ACTIVATIONS = {"identity": 0, "relu": 1, "relu6": 2, "silu": 3, "gelu": 4, "gelu_tanh": 5,
               "hardswish": 6}
# Reassociation lets LLVM vectorise the reductions; no approximate math functions.
_FASTMATH = {"reassoc", "contract", "nsz"}

if numba is not None:

    @numba.njit(inline="always", fastmath=_FASTMATH)
    def _activate(value, code):  # pragma: no cover - compiled
        if code == 1:
            return max(value, 0.0)
        if code == 2:
            return min(max(value, 0.0), 6.0)
        if code == 3:
            return value / (1.0 + math.exp(-value))
        if code == 4:
            return 0.5 * value * (1.0 + math.erf(value * 0.7071067811865476))
        if code == 5:
            inner = 0.7978845608028654 * (value + 0.044715 * value * value * value)
            return 0.5 * value * (1.0 + math.tanh(inner))
        if code == 6:
            return value * min(max(value + 3.0, 0.0), 6.0) / 6.0
        return value

    @numba.njit(inline="always", fastmath=_FASTMATH)
    def _dot1(xp, w, co, dil_h, step, segments, span, n0, r0, x0, a0):  # pragma: no cover
        for ki in range(w.shape[1]):
            w_row = w[co, ki]
            row0 = xp[n0, r0 + ki * dil_h]
            for segment in range(segments):
                w_seg = w_row[segment * span:]
                x_seg0 = row0[x0 + segment * step:]
                for e in range(span):
                    a0 += w_seg[e] * x_seg0[e]
        return a0

    @numba.njit(inline="always", fastmath=_FASTMATH)
    def _dot2(xp, w, co, dil_h, step, segments, span, n0, r0, x0, n1, r1, x1,
              a0, a1):  # pragma: no cover
        for ki in range(w.shape[1]):
            w_row = w[co, ki]
            row0 = xp[n0, r0 + ki * dil_h]
            row1 = xp[n1, r1 + ki * dil_h]
            for segment in range(segments):
                w_seg = w_row[segment * span:]
                x_seg0 = row0[x0 + segment * step:]
                x_seg1 = row1[x1 + segment * step:]
                for e in range(span):
                    weight = w_seg[e]
                    a0 += weight * x_seg0[e]
                    a1 += weight * x_seg1[e]
        return a0, a1

    @numba.njit(inline="always", fastmath=_FASTMATH)
    def _dot4(xp, w, co, dil_h, step, segments, span, n0, r0, x0, n1, r1, x1, n2, r2, x2,
              n3, r3, x3, a0, a1, a2, a3):  # pragma: no cover
        for ki in range(w.shape[1]):
            w_row = w[co, ki]
            row0 = xp[n0, r0 + ki * dil_h]
            row1 = xp[n1, r1 + ki * dil_h]
            row2 = xp[n2, r2 + ki * dil_h]
            row3 = xp[n3, r3 + ki * dil_h]
            for segment in range(segments):
                w_seg = w_row[segment * span:]
                x_seg0 = row0[x0 + segment * step:]
                x_seg1 = row1[x1 + segment * step:]
                x_seg2 = row2[x2 + segment * step:]
                x_seg3 = row3[x3 + segment * step:]
                for e in range(span):
                    weight = w_seg[e]
                    a0 += weight * x_seg0[e]
                    a1 += weight * x_seg1[e]
                    a2 += weight * x_seg2[e]
                    a3 += weight * x_seg3[e]
        return a0, a1, a2, a3

    @numba.njit(inline="always", fastmath=_FASTMATH)
    def _dot4_row(xp, w, co, dil_h, step, segments, span, n, r, x0, x1, x2, x3,
                  a0, a1, a2, a3):  # pragma: no cover
        # Four lanes in one input row (the common case on wide maps): one row view per tap row.
        for ki in range(w.shape[1]):
            w_row = w[co, ki]
            row = xp[n, r + ki * dil_h]
            for segment in range(segments):
                w_seg = w_row[segment * span:]
                x_seg0 = row[x0 + segment * step:]
                x_seg1 = row[x1 + segment * step:]
                x_seg2 = row[x2 + segment * step:]
                x_seg3 = row[x3 + segment * step:]
                for e in range(span):
                    weight = w_seg[e]
                    a0 += weight * x_seg0[e]
                    a1 += weight * x_seg1[e]
                    a2 += weight * x_seg2[e]
                    a3 += weight * x_seg3[e]
        return a0, a1, a2, a3

    @numba.njit(parallel=True, cache=True, nogil=True)
    def pad_channels_last(x, out, top, left):  # pragma: no cover - compiled
        """out[n, top + r, (left + c) * C + ch] = x[n, ch, r, c]; ``out`` is zero elsewhere.

        One pass instead of torch's pad + permute + contiguous (two copies, the second a
        slow transposition).
        """
        images, channels, height, width = x.shape
        rows = out.shape[1]
        for job in numba.prange(images * rows):
            n = job // rows
            r = job - n * rows
            target = out[n, r]
            source_row = r - top
            if source_row < 0 or source_row >= height:
                target[:] = 0.0
                continue
            target[: left * channels] = 0.0
            target[(left + width) * channels:] = 0.0
            # Eight source rows (channels) at a time, each read contiguously, so that every
            # column gets eight adjacent floats (one 32-byte write) instead of eight strided
            # ones: half the time of one channel at a time on the papers' 64x64x64 module.
            ch0 = 0
            while ch0 + 8 <= channels:
                s0 = x[n, ch0, source_row]
                s1 = x[n, ch0 + 1, source_row]
                s2 = x[n, ch0 + 2, source_row]
                s3 = x[n, ch0 + 3, source_row]
                s4 = x[n, ch0 + 4, source_row]
                s5 = x[n, ch0 + 5, source_row]
                s6 = x[n, ch0 + 6, source_row]
                s7 = x[n, ch0 + 7, source_row]
                for c in range(width):
                    o = (left + c) * channels + ch0
                    target[o] = s0[c]
                    target[o + 1] = s1[c]
                    target[o + 2] = s2[c]
                    target[o + 3] = s3[c]
                    target[o + 4] = s4[c]
                    target[o + 5] = s5[c]
                    target[o + 6] = s6[c]
                    target[o + 7] = s7[c]
                ch0 += 8
            for ch in range(ch0, channels):
                source = x[n, ch, source_row]
                for c in range(width):
                    target[(left + c) * channels + ch] = source[c]

    @numba.njit(inline="always")
    def _store(out, residual, has_residual, code, n, co, position, value):  # pragma: no cover
        if has_residual:
            value += residual[n, co, position]
        out[n, co, position] = _activate(value, code)

    @numba.njit(parallel=True, cache=True, nogil=True, fastmath=_FASTMATH)
    def skip_conv_live(xp, w, bias, pointers, lane_images, lane_positions, first_rows,
                       row_offsets, residual, has_residual, code, out, in_channels,
                       group_channels, dil_h, dil_w, tiles, out_per_group,
                       channel_block):  # pragma: no cover - compiled
        """out[n, co, l] = act(w[co] . patch(n, l) + bias[co] (+ residual)) for live (co, l).

        xp: (N, Hp, Wp * C_in) padded channels-last input, each row flattened; w: (C_out,
        kh, kw * C_in / groups); out: (N, C_out, L), already holding the constants.
        The batch's output positions are numbered q = n * L + l and cut into tiles of
        consecutive q; pointers/lane_images/lane_positions list, for each (tile, output
        channel), the live lanes (n, l) of the tile. first_rows[l] and row_offsets[l] are
        where output position l's window starts in xp (no divisions in the hot loop).
        Weight-stationary: up to 4 live lanes of one channel share every filter load; a
        tile's input band stays in L1 while the kernel walks the channels; small maps fill
        the tiles with several rows or images, so the 4-wide blocks stay full.
        A filter row meets the input in ``segments`` contiguous runs of ``span`` floats: one
        run of kw * C_in without groups or dilation, else kw runs of C_in / groups.
        """
        channels = w.shape[0]
        kw = w.shape[2] // group_channels
        contiguous = dil_w == 1 and group_channels == in_channels
        segments = 1 if contiguous else kw
        span = w.shape[2] if contiguous else group_channels
        step = dil_w * in_channels
        blocks = (channels + channel_block - 1) // channel_block
        for job in numba.prange(tiles * blocks):
            tile = job // blocks
            first = (job - tile * blocks) * channel_block
            for co in range(first, min(first + channel_block, channels)):
                group = tile * channels + co
                t = pointers[group]
                end = pointers[group + 1]
                base = (co // out_per_group) * group_channels
                b = bias[co]
                while t < end:
                    n0 = lane_images[t]
                    p0 = lane_positions[t]
                    r0 = first_rows[p0]
                    x0 = row_offsets[p0] + base
                    if end - t >= 3:
                        # Four lanes share every filter load. Three left are one 4-lane
                        # block with the last lane twice: cheaper than 2 + 1 lanes.
                        last = t + 3 if end - t >= 4 else t + 2
                        n1 = lane_images[t + 1]
                        p1 = lane_positions[t + 1]
                        r1 = first_rows[p1]
                        x1 = row_offsets[p1] + base
                        n2 = lane_images[t + 2]
                        p2 = lane_positions[t + 2]
                        r2 = first_rows[p2]
                        x2 = row_offsets[p2] + base
                        n3 = lane_images[last]
                        p3 = lane_positions[last]
                        r3 = first_rows[p3]
                        x3 = row_offsets[p3] + base
                        if n0 == n3 and r0 == r3:
                            a0, a1, a2, a3 = _dot4_row(xp, w, co, dil_h, step, segments, span,
                                                       n0, r0, x0, x1, x2, x3, b, b, b, b)
                        else:
                            a0, a1, a2, a3 = _dot4(xp, w, co, dil_h, step, segments, span,
                                                   n0, r0, x0, n1, r1, x1, n2, r2, x2,
                                                   n3, r3, x3, b, b, b, b)
                        _store(out, residual, has_residual, code, n0, co, p0, a0)
                        _store(out, residual, has_residual, code, n1, co, p1, a1)
                        _store(out, residual, has_residual, code, n2, co, p2, a2)
                        if last == t + 3:
                            _store(out, residual, has_residual, code, n3, co, p3, a3)
                        t = last + 1
                    elif end - t >= 2:
                        n1 = lane_images[t + 1]
                        p1 = lane_positions[t + 1]
                        r1 = first_rows[p1]
                        x1 = row_offsets[p1] + base
                        a0, a1 = _dot2(xp, w, co, dil_h, step, segments, span,
                                       n0, r0, x0, n1, r1, x1, b, b)
                        _store(out, residual, has_residual, code, n0, co, p0, a0)
                        _store(out, residual, has_residual, code, n1, co, p1, a1)
                        t += 2
                    else:
                        a0 = _dot1(xp, w, co, dil_h, step, segments, span, n0, r0, x0, b)
                        _store(out, residual, has_residual, code, n0, co, p0, a0)
                        t += 1


def live_lists(live, images, tile):
    """CSR (pointers, lane images, lane positions, tiles) of a batch's live outputs.

    Args:
        live: bool (C_out, L), True where an output is computed (the same for every image).
        images: the batch size N.
        tile: lanes per tile.

    Lanes q = n * L + l run over the batch; groups are (tile of ``tile`` consecutive lanes,
    output channel), each listing its live lanes in increasing order.
    """
    import torch

    channels, positions = live.shape
    lanes = images * positions
    tiles = -(-lanes // tile)
    padded = torch.zeros(channels, tiles * tile, dtype=torch.bool)
    padded[:, :lanes] = live.repeat(1, images)
    order = padded.view(channels, tiles, tile).transpose(0, 1)  # (tile, channel, lane)
    counts = order.sum(2).flatten()
    pointers = torch.zeros(counts.numel() + 1, dtype=torch.int64)
    pointers[1:] = counts.cumsum(0)
    found = order.nonzero()
    lane = found[:, 0] * tile + found[:, 2]
    lane_images = (lane // positions).to(torch.int32).contiguous()
    lane_positions = (lane % positions).to(torch.int32).contiguous()
    return pointers, lane_images, lane_positions, tiles


def available() -> bool:
    return numba is not None
