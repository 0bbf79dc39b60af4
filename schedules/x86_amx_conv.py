"""AMX-INT8 convolutions (a row group's, or a whole layer's rows): implicit GEMM on the tile unit, no im2col.

The rows' weights are the tile product's ``A`` operand (16 output channels x 64 int8
reduction bytes a tile: packed 4-bit SP2 / Fixed-4 levels decoded to int8 at compile time, int8
rows as they are), laid out by :func:`amx_conv_weights` as ``[n / 16, taps * c / 64, 16, 64]``:
tile ``(j, s)`` holds output channels ``16 j ..`` and, for kernel tap ``s // (c / 64)``, the
input channels of 64-channel block ``s % (c / 64)`` (channels zero-padded to whole blocks).

The activations are ``B``: staged once per call from the graph's zero-padded NCHW tensor into
channel groups of four (the VNNI layout the instruction reads: a ``B`` row is 16 pixels x 4
channels, 64 contiguous bytes), one plane per stride phase: with stride ``s`` the input pixel
``(s i + py, s j + px)`` goes to plane ``(py, px)`` at ``(i, j)``, so every kernel tap reads its
phase plane at stride 1. A plane is ``Wp = ceil(W / s)`` pixels wide and flat: output pixel
``(oy, ox)`` is *virtual pixel* ``q = oy * Wp + ox`` and tap ``(ky, kx)`` reads plane
``(ky % s, kx % s)`` at ``q + (ky // s) * Wp + kx // s``: 16 consecutive virtual pixels are one
``tileloadd`` (row stride: one channel group's plane) whatever the tap. The ``Wp - OW`` virtual
pixels past each output row are computed and never stored (3% of the MACs at 56 x 56, 22% at
7 x 7).

Each task configures the tile unit and, per block of ``nt`` channel tiles x ``mt`` pixel tiles
(``nt * mt = 4`` int32 accumulator tiles: 2 x 2, or 1 x 4 where the group has an odd number of
channel tiles, so it is padded to 16 rows, not 32), keeps the accumulators over the whole
reduction (taps x channel blocks). The epilogue ``float32(acc + bias) * scale`` (as every x86
kernel, bit for bit) runs on 16 pixels of one channel a vector and writes NCHW through masked
stores (``llvm.masked.store``: one per output row the 16 virtual pixels touch).

Layers of fewer than :data:`AMX_CONV_MIN_CHANNELS` input channels (a 3-channel stem) fold their
kernel columns into the channels (:meth:`AmxConvPlan.gemm`): a ``kh x 1`` conv over ``kw * C``
channels, staged from the input at the layer's stride.

Measured: ``python -m bench.amx_conv --model --batch 1 8`` (Intel Xeon, LLVM rocketlake, one
thread, CPU time, 2026-12-06), ResNet-18's conv shapes, SP2-4 : Fixed-4 : Fixed-8 rows 60:35:5;
ms at batch 8 for the VNNI kernels (a kernel per row group, summed) -> this one per row group ->
this one for the whole layer (what the compiler builds): stem 3 -> 64 7x7 s2 18.6 -> 10.7 -> 8.1
(folded; unfolded, per group, 41.7 in an earlier run); 64 -> 64 3x3 at 56 x 56 12.5 -> 1.86 -> 1.04;
64 -> 128 3x3 s2 8.30 -> 1.48 -> 0.77, 1x1 s2 5.84 -> 0.86 -> 0.44; 128 -> 128 3x3 8.59 -> 1.68 ->
0.94; 128 -> 256 3x3 s2 5.81 -> 1.16 -> 0.80, 1x1 s2 3.18 -> 0.66 -> 0.36; 256 -> 256 3x3 7.81 ->
1.12 -> 0.99; 256 -> 512 3x3 s2 5.25 -> 1.18 -> 0.75, 1x1 s2 1.68 -> 0.74 -> 0.33; 512 -> 512 3x3
at 7 x 7 6.17 -> 1.32 -> 1.07. At batch 1 the layer kernel is 3.7x the VNNI ones for the stem and
5.0-13.0x for the others. The whole model: batch 1 25.4 ms with VNNI convolutions, 4.9 ms with
these; batch 8 206.2 and 45.8 ms.
"""

from __future__ import annotations

import attrs
import numpy as np
import tvm
from tvm.script import tirx as T

from .x86_amx import AMX_REFUSED, _tile
from .x86_bounds import activation_range, check_accumulators, describe, operand_range

__all__ = ["AmxConvPlan", "amx_conv_kernel", "amx_conv_weights", "amx_conv_applies", "amx_conv_folds",
           "AMX_CONV_MIN_CHANNELS"]

#: Fewest input channels for the AMX conv as it is: fewer would be zero-padded to a whole
#: 64-channel block per tap (the 3-channel stem 21x its MACs); such layers fold their kernel
#: columns into the channels (:meth:`AmxConvPlan.gemm`) where ``channels * kw <= 64``.
AMX_CONV_MIN_CHANNELS = 16


@attrs.frozen
class AmxConvPlan:
    """Shapes of the AMX conv of ``n`` output channels over a :class:`~schedules.x86_intrin.ConvGeometry`."""

    batch: int
    channels: int
    height: int
    width: int
    kh: int
    kw: int
    sh: int
    sw: int
    n: int
    fold: bool = False  #: kernel columns folded into the channels (a stem): see :meth:`gemm`

    def gemm(self) -> "AmxConvPlan":
        """The convolution the tiles compute: this one, or with ``fold`` the ``kh x 1`` one over
        ``channels * kw`` channels ``kx * C + c`` and the output's columns (a 3-channel 7 x 7 stem:
        21 channels padded to 64, not 3 to 64 for each of 49 taps), staged from this one's input."""
        if not self.fold:
            return self
        return AmxConvPlan(self.batch, self.channels * self.kw, self.height, self.out_hw[1], self.kh, 1, self.sh, 1,
                           self.n)

    @property
    def out_hw(self):
        return (self.height - self.kh) // self.sh + 1, (self.width - self.kw) // self.sw + 1

    @property
    def cblocks(self) -> int:  # 64-channel blocks per tap
        return -(-self.channels // 64)

    @property
    def steps(self) -> int:  # 64-deep reduction steps: taps x channel blocks
        return self.kh * self.kw * self.cblocks

    @property
    def n_tiles(self) -> int:  # 16-channel weight tiles
        return -(-self.n // 16)

    @property
    def nt(self) -> int:  # channel tiles per block: 2 x 2 accumulators, or 1 x 4 for an odd tile count
        return 2 if self.n_tiles % 2 == 0 else 1

    @property
    def mt(self) -> int:  # pixel tiles per block
        return 4 // self.nt

    @property
    def wp(self) -> int:  # width of a phase plane: the virtual pixels' row pitch
        return -(-self.width // self.sw)

    @property
    def hp(self) -> int:
        return -(-self.height // self.sh)

    @property
    def m_blocks(self) -> int:  # blocks of 16 * mt virtual pixels per image
        return -(-self.out_hw[0] * self.wp // (16 * self.mt))

    @property
    def plane(self) -> int:  # staged pixels per (phase, channel group): the furthest tap's reads fit
        far = self.m_blocks * 16 * self.mt + (self.kh - 1) // self.sh * self.wp + (self.kw - 1) // self.sw
        return -(-max(self.hp * self.wp, far) // 16) * 16

    def tap(self, t: int):
        """``(phase plane, shift in virtual pixels)`` of kernel tap ``t``."""
        ky, kx = t // self.kw, t % self.kw
        return (ky % self.sh) * self.sw + kx % self.sw, (ky // self.sh) * self.wp + kx // self.sw


def amx_conv_applies(conv, n: int) -> bool:
    """Whether :func:`amx_conv_kernel` takes this geometry (no dilation; enough channels, or few
    enough to fold the kernel columns into one channel block). Where it does, it is the faster
    kernel at every ResNet-18 conv shape at batch 1 and 8 (module docstring), so AMX targets
    choose it for every such conv, with no threshold of pixels or rows."""
    return tuple(conv.dilation) == (1, 1) and n >= 1 and (
        conv.channels >= AMX_CONV_MIN_CHANNELS or conv.channels * conv.kw <= 64)


def amx_conv_folds(conv) -> bool:
    """Whether the kernel columns are folded into the channels (:meth:`AmxConvPlan.gemm`)."""
    return conv.channels < AMX_CONV_MIN_CHANNELS


def amx_conv_weights(w: np.ndarray, fold: bool = False) -> np.ndarray:
    """int8 conv weights ``[n, c, kh, kw]`` as :func:`amx_conv_kernel` reads them:
    ``[n / 16, taps * c / 64, 16, 64]``, tile ``(j, s)`` row ``r``: output channel ``16 j + r``,
    tap ``s // (c / 64)``, input channels of block ``s % (c / 64)``; zero-padded. ``fold``:
    those of the ``kh x 1`` conv over channels ``kx * c + c`` (:meth:`AmxConvPlan.gemm`)."""
    if w.ndim != 4 or w.dtype != np.int8:
        raise ValueError(f"amx_conv_weights: int8 weights [n, c, kh, kw], got {w.dtype} {w.shape}")
    if fold:
        n, c, kh, kw = w.shape
        w = w.transpose(0, 3, 1, 2).reshape(n, kw * c, kh, 1)
    n, c, kh, kw = w.shape
    cp, np16 = -(-c // 64) * 64, -(-n // 16) * 16
    pad = np.zeros((np16, kh, kw, cp), np.int8)
    pad[:n, :, :, :c] = w.transpose(0, 2, 3, 1)
    tiles = pad.reshape(np16 // 16, 16, kh * kw * cp // 64, 64).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(tiles)


def _stage(p: AmxConvPlan, x_dtype: str):
    """Macro ``stage(x, xs)``: ``p``'s NCHW activations into the phase planes of 4-channel groups
    of ``p.gemm()`` (module docstring), zero past the image and the channels."""
    e = p.gemm()
    groups, phases, plane, wp, sw = e.cblocks * 16, e.sh * e.sw, e.plane, e.wp, e.sw
    hw, width = p.height * p.width, p.width
    # vectors of 16 pixels x 4 channels, the four channel rows interleaved in registers (stride s:
    # 16 s bytes of each row loaded, every s-th kept). Stride 1 takes a whole NCHW plane as one
    # row, its last vector overlapping the one before (same values) instead of a tail; the phase
    # planes' rows load and store their tails masked (no read past the input row, no write past
    # the plane row), channels past the last loaded as zeros
    flat = phases == 1 and hw >= 16 and not p.fold
    vec_rows, vec_len = (1, hw) if flat else (e.hp, wp)

    def source(b, g, px, y, v):
        """Per channel of the group: (start in x, bytes of its row to read) of vector ``v``."""
        rows = []
        for k in range(4):
            c = g * 4 + k
            row, off = (c % p.channels, c // p.channels) if p.fold else (T.min(c, p.channels - 1), px)
            start = (b * p.channels + row) * hw + y * width + off + v * 16 * p.sw
            rows.append((start, T.if_then_else(c < e.channels, width - off - v * 16 * p.sw, 0)))
        return rows

    @T.macro
    def stage(x, xs):
        xf = T.decl_buffer((p.batch * p.channels * hw,), x_dtype, data=x.data)
        for bg in T.parallel(p.batch * e.sh * groups):
            b = bg // (e.sh * groups)
            g = bg % groups
            for px in T.unroll(sw):
                ph = bg // groups % e.sh * sw + px
                base = ((b * phases + ph) * groups + g) * plane * 4
                for i in T.serial(vec_rows):
                    y = ph // sw + i * e.sh
                    for v in T.serial(-(-vec_len // 16)):
                        if flat:  # channels past the last (zero-padded blocks): masked loads
                            xs[T.ramp(base + T.min(v * 16, hw - 16) * 4, 1, 64)] = _interleave4(xf, [(
                                (b * p.channels + T.min(g * 4 + k, p.channels - 1)) * hw + T.min(v * 16, hw - 16),
                                None if p.channels % 64 == 0 else T.if_then_else(g * 4 + k < p.channels, 16, 0))
                                for k in range(4)], 1)
                        elif y < p.height:
                            _masked_store(_interleave4(xf, source(b, g, px, y, v), p.sw),
                                          T.address_of(xs[base + (i * wp + v * 16) * 4]),
                                          T.ramp(0, 1, 64) < T.broadcast((wp - v * 16) * 4, 64))
                        else:
                            _masked_store(T.broadcast(T.Cast(x_dtype, 0), 64), T.address_of(xs[base + (i * wp + v * 16) * 4]),
                                          T.ramp(0, 1, 64) < T.broadcast((wp - v * 16) * 4, 64))
                for q, k in T.grid(plane - vec_rows * vec_len, 4):
                    xs[base + (vec_rows * vec_len + q) * 4 + k] = T.Cast(x_dtype, 0)

    return stage


def _interleave4(xf, rows, stride):
    """64 bytes: 16 pixels x 4 channels (pixel-major), pixel ``t`` of channel ``k`` byte
    ``stride * t`` from ``rows[k]``'s start; its count of bytes to read, if not None, masks
    the loads (zeros past it)."""
    lanes = 16 * stride
    loads = []
    for start, valid in rows:
        if valid is None:
            loads.append(xf[T.ramp(start, 1, lanes)])
        else:
            loads.append(T.call_llvm_intrin(f"{xf.dtype}x{lanes}", T.llvm_lookup_intrinsic_id("llvm.masked.load"),
                                            T.address_of(xf[start]), T.ramp(0, 1, lanes) < T.broadcast(valid, lanes),
                                            T.broadcast(T.Cast(xf.dtype, 0), lanes)))
    return T.Shuffle(loads, [lanes * (i % 4) + stride * (i // 4) for i in range(64)])


def _mac(p: AmxConvPlan, dot: str):
    """Macro ``mac(xs, wf, b, blk, pan)``: accumulator tiles 0-3 (channel tile ``i``, pixel tile
    ``j``: tile ``i * mt + j``) of image ``b``'s pixel block ``blk`` and channel panel ``pan``,
    over every tap and channel block. A tiles: 4 (and 5); B tiles rotate over the rest."""
    nt, mt, groups, plane = p.nt, p.mt, p.cblocks * 16, p.plane
    free = 4 - nt  # B tile numbers 4 + nt ..

    @T.macro
    def mac(xs, wf, b, blk, pan):
        for t in T.unroll(4):
            _tile("tilezero", T.int8(t))
        for tap in T.unroll(p.kh * p.kw):
            for cb in T.serial(p.cblocks):
                for i in T.unroll(nt):
                    _tile("tileloadd64", T.int8(4 + i),
                          T.address_of(wf[((pan * nt + i) * p.steps + tap * p.cblocks + cb) * 1024]), T.int64(64))
                for j in T.unroll(mt):
                    _tile("tileloadd64", T.int8(4 + nt + j % free), T.address_of(xs[(
                        ((b * p.sh * p.sw + p.tap(tap)[0]) * groups + cb * 16) * plane
                        + blk * 16 * mt + j * 16 + p.tap(tap)[1]) * 4]), T.int64(plane * 4))
                    for i in T.unroll(nt):
                        _tile(dot, T.int8(i * mt + j), T.int8(4 + i), T.int8(4 + nt + j % free))

    return mac


def _epilogue(p: AmxConvPlan):
    """Macro ``epilogue(acc, out, bias, scale, b, blk, pan)``: ``float32(acc + bias) * scale`` of a
    block, 16 virtual pixels of a channel a vector, masked stores into each output row they touch."""
    nt, mt, wp, n = p.nt, p.mt, p.wp, p.n
    oh, ow = p.out_hw
    rows = 15 // wp + 2  # output rows 16 consecutive virtual pixels can touch

    @T.macro
    def epilogue(acc, of, bias, scale, b, blk, pan):
        for i in T.unroll(nt):
            for r in T.serial(16):
                ch = (pan * nt + i) * 16 + r
                if ch < n:
                    for j in T.unroll(mt):
                        q0 = blk * 16 * mt + j * 16
                        value = T.Cast("float32x16", acc[T.ramp((i * 16 + r) * 16 * mt + j * 16, 1, 16)]
                                       + T.broadcast(bias[ch], 16)) * T.broadcast(scale[ch], 16)
                        for t in T.unroll(rows):
                            y = q0 // wp + t
                            if y < oh and y * wp < q0 + 16:
                                _masked_store(value, T.address_of(of[((b * n + ch) * oh + y) * ow + q0 - y * wp]),
                                              T.ramp(q0, 1, 16) >= T.broadcast(y * wp, 16)
                                              and T.ramp(q0, 1, 16) < T.broadcast(y * wp + ow, 16))

    return epilogue


def _masked_store(value, address, mask):
    """``llvm.masked.store`` (LLVM 22: value, pointer, mask): lanes off the mask are not touched."""
    return T.call_llvm_intrin("void", T.llvm_lookup_intrinsic_id("llvm.masked.store"), value, address, mask)


def amx_conv_kernel(p: AmxConvPlan, x_dtype: str, w_dtype: str = "int8", num_cores: int = 1) -> tvm.tirx.PrimFunc:
    """The PrimFunc ``(x [B, C, H, W] (zero-padded), w (:func:`amx_conv_weights`, its int8 bytes
    typed ``w_dtype``: a packed group's constant keeps its uint8 type), bias [n] int32, scale [n]
    f32, out [B, n, OH, OW] f32)``: the conv of ``n`` rows (a row group's, or a layer's in the
    graph's order), any int8 weights within the int32 bound."""
    if x_dtype not in ("uint8", "int8"):
        raise ValueError(f"amx_conv_kernel: activations must be uint8 or int8, got {x_dtype}")
    xr, wr = activation_range(x_dtype), operand_range(None)
    check_accumulators("amx_conv_kernel", p.kh * p.kw * p.channels, xr, wr, describe(x_dtype, None, xr, wr))
    src, p = p, p.gemm()  # the layer's input; the convolution the tiles compute
    oh, ow = p.out_hw
    dot = "tdpbssd" if x_dtype == "int8" else "tdpbsud"  # A: the int8 weights; B: the activations
    stage, mac, epilogue = _stage(src, x_dtype), _mac(p, dot), _epilogue(p)
    panels, blocks, parts = p.n_tiles // p.nt, p.batch * p.m_blocks, 4 * max(1, num_cores)
    xs_size = p.batch * p.sh * p.sw * p.cblocks * 16 * p.plane * 4
    # tasks split the larger operand: each streams its share once while the other stays in L2
    # (512 -> 512 channels at 7 x 7, batch 8, one thread: no change measured, 1.29 ms either way)
    if p.n_tiles * p.steps * 1024 > xs_size:
        n_chunks = min(panels, parts)
        m_chunks = min(blocks, -(-parts // n_chunks))
    else:
        m_chunks = min(blocks, parts)
        n_chunks = min(panels, -(-parts // m_chunks))
    per_m, per_n = -(-blocks // m_chunks), -(-panels // n_chunks)
    nt, mt = p.nt, p.mt
    w_shape = (p.n_tiles, p.steps, 16, 64)

    @T.prim_func(private=True)
    def kernel(x: T.Buffer((src.batch, src.channels, src.height, src.width), x_dtype), w: T.Buffer(w_shape, w_dtype),
               bias: T.Buffer((p.n,), "int32"), scale: T.Buffer((p.n,), "float32"),
               out: T.Buffer((p.batch, p.n, oh, ow), "float32")):
        T.func_attr({"tirx.noalias": True})
        granted = T.call_extern("int64", "syscall", T.int64(158), T.int64(0x1023), T.int64(18))
        assert granted == T.int64(0), AMX_REFUSED
        xs = T.alloc_buffer((xs_size,), x_dtype)
        wf = T.decl_buffer((p.n_tiles * p.steps * 1024,), w_dtype, data=w.data)
        of = T.decl_buffer((p.batch * p.n * oh * ow,), "float32", data=out.data)
        stage(x, xs)
        for task in T.parallel(m_chunks * n_chunks):
            cfg = T.alloc_buffer((64,), "uint8")
            acc = T.alloc_buffer((nt * 16 * mt * 16,), "int32")
            for c in T.serial(64):  # palette 1; tiles 0-7: 16 rows of 64 bytes
                cfg[c] = T.Select(c == 0, T.uint8(1), T.Select(c >= 16 and c < 32 and c % 2 == 0, T.uint8(64),
                                                               T.Select(c >= 48 and c < 56, T.uint8(16), T.uint8(0))))
            _tile("ldtilecfg", T.address_of(cfg[0]))
            for pp, mm in T.grid(per_n, per_m):  # a panel's weights stay in L1 / L2 over the task's blocks
                if (task % n_chunks) * per_n + pp < panels and (task // n_chunks) * per_m + mm < blocks:
                    mac(xs, wf, ((task // n_chunks) * per_m + mm) // p.m_blocks,
                        ((task // n_chunks) * per_m + mm) % p.m_blocks, (task % n_chunks) * per_n + pp)
                    for t in T.unroll(4):
                        _tile("tilestored64", T.int8(t), T.address_of(acc[(t // mt) * 16 * 16 * mt + t % mt * 16]),
                              T.int64(16 * mt * 4))
                    epilogue(acc, of, bias, scale, ((task // n_chunks) * per_m + mm) // p.m_blocks,
                             ((task // n_chunks) * per_m + mm) % p.m_blocks, (task % n_chunks) * per_n + pp)
            _tile("tilerelease")

    return kernel
