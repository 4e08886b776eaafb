"""Compiled inner loop of the skipping conv2d: one dot product per live output element.

The work must be proportional to the live outputs, so the kernel is a direct convolution
driven by a list of live (position, channel) pairs, not a GEMM: a random element mask leaves
no dense blocks for a GEMM to exploit. The input is padded and stored channels-last, so each
filter tap is a contiguous dot product over input channels that the compiler vectorises;
four live channels at one position share each input load (register blocking), which is what
brings the kernel to the speed of a dense vendor convolution at C = 0. Output stays NCHW:
the 64 channels' cache lines at one position are reused by the next positions of the row.
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
    def _dot1(xp, w, n, r0, dil_h, step, segments, span, co, x0, a0):  # pragma: no cover
        for ki in range(w.shape[1]):
            x_row = xp[n, r0 + ki * dil_h]
            w_row = w[co, ki]
            for segment in range(segments):
                w_seg = w_row[segment * span:]
                x_seg0 = x_row[x0 + segment * step:]
                for e in range(span):
                    a0 += w_seg[e] * x_seg0[e]
        return a0

    @numba.njit(inline="always", fastmath=_FASTMATH)
    def _dot2(xp, w, n, r0, dil_h, step, segments, span, co, x0, x1, a0, a1):  # pragma: no cover
        for ki in range(w.shape[1]):
            x_row = xp[n, r0 + ki * dil_h]
            w_row = w[co, ki]
            for segment in range(segments):
                w_seg = w_row[segment * span:]
                x_seg0 = x_row[x0 + segment * step:]
                x_seg1 = x_row[x1 + segment * step:]
                for e in range(span):
                    weight = w_seg[e]
                    a0 += weight * x_seg0[e]
                    a1 += weight * x_seg1[e]
        return a0, a1

    @numba.njit(inline="always", fastmath=_FASTMATH)
    def _dot4(xp, w, n, r0, dil_h, step, segments, span, co, x0, x1, x2, x3,
              a0, a1, a2, a3):  # pragma: no cover
        for ki in range(w.shape[1]):
            x_row = xp[n, r0 + ki * dil_h]
            w_row = w[co, ki]
            for segment in range(segments):
                w_seg = w_row[segment * span:]
                x_seg0 = x_row[x0 + segment * step:]
                x_seg1 = x_row[x1 + segment * step:]
                x_seg2 = x_row[x2 + segment * step:]
                x_seg3 = x_row[x3 + segment * step:]
                for e in range(span):
                    weight = w_seg[e]
                    a0 += weight * x_seg0[e]
                    a1 += weight * x_seg1[e]
                    a2 += weight * x_seg2[e]
                    a3 += weight * x_seg3[e]
        return a0, a1, a2, a3

    @numba.njit(inline="always")
    def _store(out, residual, has_residual, code, n, co, position, value):  # pragma: no cover
        if has_residual:
            value += residual[n, co, position]
        out[n, co, position] = _activate(value, code)

    @numba.njit(parallel=True, cache=True, nogil=True, fastmath=_FASTMATH)
    def skip_conv_live(xp, w, bias, pointers, columns, residual, has_residual, code, out,
                       in_channels, group_channels, stride_h, stride_w, dil_h, dil_w, out_w,
                       tiles, out_per_group):  # pragma: no cover - compiled
        """out[n, co, l] = act(w[co] . patch(n, l) + bias[co] (+ residual)) for live (co, l).

        xp: (N, Hp, Wp * C_in) padded channels-last input, each row flattened; w: (C_out,
        kh, kw * C_in / groups); out: (N, C_out, L), already holding the constants.
        pointers/columns: CSR of the live output columns j of each (output row i, column
        tile, output channel co) group, in that order. The kernel is weight-stationary: up to
        4 live positions of one channel share every filter load, the tile's input band stays
        in L1 while the kernel walks the channels. A filter row meets the input in
        ``segments`` contiguous runs of ``span`` floats: one run of kw * C_in without groups
        or dilation, else kw runs of C_in / groups.
        """
        images = xp.shape[0]
        channels = w.shape[0]
        kw = w.shape[2] // group_channels
        contiguous = dil_w == 1 and group_channels == in_channels
        segments = 1 if contiguous else kw
        span = w.shape[2] if contiguous else group_channels
        step = dil_w * in_channels
        rows = out.shape[2] // out_w
        column_step = stride_w * in_channels
        for job in numba.prange(images * rows):
            n = job // rows
            i = job % rows
            r0 = i * stride_h
            row = i * out_w
            for tile in range(tiles):
                for co in range(channels):
                    group = (i * tiles + tile) * channels + co
                    t = pointers[group]
                    end = pointers[group + 1]
                    base = (co // out_per_group) * group_channels
                    b = bias[co]
                    while t < end:
                        j0 = columns[t]
                        x0 = base + j0 * column_step
                        if end - t >= 4:
                            j1 = columns[t + 1]
                            j2 = columns[t + 2]
                            j3 = columns[t + 3]
                            a0, a1, a2, a3 = _dot4(
                                xp, w, n, r0, dil_h, step, segments, span, co, x0,
                                base + j1 * column_step, base + j2 * column_step,
                                base + j3 * column_step, b, b, b, b)
                            _store(out, residual, has_residual, code, n, co, row + j0, a0)
                            _store(out, residual, has_residual, code, n, co, row + j1, a1)
                            _store(out, residual, has_residual, code, n, co, row + j2, a2)
                            _store(out, residual, has_residual, code, n, co, row + j3, a3)
                            t += 4
                        elif end - t >= 2:
                            j1 = columns[t + 1]
                            a0, a1 = _dot2(xp, w, n, r0, dil_h, step, segments, span, co, x0,
                                           base + j1 * column_step, b, b)
                            _store(out, residual, has_residual, code, n, co, row + j0, a0)
                            _store(out, residual, has_residual, code, n, co, row + j1, a1)
                            t += 2
                        else:
                            a0 = _dot1(xp, w, n, r0, dil_h, step, segments, span, co, x0, b)
                            _store(out, residual, has_residual, code, n, co, row + j0, a0)
                            t += 1


def live_lists(live, tile):
    """CSR (pointers, columns, tiles) of ``live`` (C_out, H, W) in the kernel's order.

    Groups are (output row, tile of ``tile`` columns, output channel), each listing its live
    columns in increasing order.
    """
    import torch

    channels, height, width = live.shape
    tiles = -(-width // tile)
    padded = torch.zeros(channels, height, tiles * tile, dtype=torch.bool)
    padded[:, :, :width] = live
    # (row, tile, channel, column-in-tile): nonzero() walks it in the kernel's order.
    order = padded.view(channels, height, tiles, tile).permute(1, 2, 0, 3)
    counts = order.sum(3).flatten()
    pointers = torch.zeros(counts.numel() + 1, dtype=torch.int64)
    pointers[1:] = counts.cumsum(0)
    found = order.nonzero()
    columns = (found[:, 1] * tile + found[:, 3]).to(torch.int32).contiguous()
    return pointers, columns, tiles


def available() -> bool:
    return numba is not None
