"""Triton kernels for one skippable SwiGLU FFN in the decode regime (a few rows, memory-bound).

Imported only when used (Triton is optional). Two launches per FFN, each a fixed grid, so a CUDA graph replays
them unchanged whatever the decisions; block ``(n, m)`` owns column tile ``n`` for up to ``BLOCK_M`` rows and reads
its rows' decisions from device memory (the vLLM fused-MoE pattern: blocks exit early on a device flag):

1. ``gate_up`` writes ``silu(x @ gate.T) * (x @ up.T)`` for its tile into the intermediate buffer,
   reading the gate and up tiles once for all its rows. It returns at once when all its rows skip. With a
   stand-in, more blocks (the stand-in's width S in tiles of the same width) compute its inner step ``t`` —
   ``x @ inner.T`` for a rank-r stand-in, ``silu(x @ gate_s.T) * (x @ inner.T)`` for the FFN's own core neurons —
   only when some of their rows skip.
2. ``down_merge`` writes ``h @ down.T`` for its tile, the skipping rows replaced by the substitute
   (``t @ out_s.T + bias``, or zeros). When all its rows skip it writes the substitute and never reads the FFN.

Every output element is written exactly once. A decode batch (at most 64 rows) is one row block, so "all its rows
skip" is the layer's all-skip flag. ``tl.dot`` needs 16 rows: fewer are padded (masked loads).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from .weights import FFNWeights, SubstituteWeights, flat_decisions

HOPPER_MULTIPROCESSORS = 132  # H100/H200 SXM: the tile choice's guess where no device can be asked
MAX_BLOCK_M = 64
STAGE_WEIGHT_BYTES = 16 * 1024  # one weight matrix's bytes per pipeline stage (4 stages of gate+up: 128 KB shared)
STAGE_BYTES = 48 * 1024  # all tiles of one pipeline stage (rows and weights): 4 stages stay under Hopper's 227 KB
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.uint8: "u8",
                torch.int8: "i8", torch.int32: "i32", torch.int64: "i64"}


# ------------------------------------------------------------------------------------------------
# Device code: built on first use (Triton is imported inside, as every optional package is)
# ------------------------------------------------------------------------------------------------
@functools.cache
def kernels() -> SimpleNamespace:
    """The two kernels (``gate_up``, ``down_merge``), defined once per process (H, I and S are compile-time
    constants: one build per model shape and stand-in width)."""
    import triton
    import triton.language as tl

    @triton.jit
    def row_block(dec_ptr, dec_stride, M, BLOCK_M: tl.constexpr):
        """This block's rows, which exist, which skip, and how many of each."""
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        skip = (tl.load(dec_ptr + rows * dec_stride, mask=row_ok, other=0) != 0) & row_ok
        return rows, row_ok, skip, tl.sum(skip.to(tl.int32), axis=0), tl.sum(row_ok.to(tl.int32), axis=0)

    @triton.jit
    def rows_times_weight_t(a_ptr, rows, row_ok, w_ptr, cols, col_ok, K: tl.constexpr, acc,
                            BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
        """``acc + a[rows, :K] @ w[cols, :K].T``, both row-major with K columns (w: an nn.Linear weight)."""
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            a = tl.load(a_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(a, tl.trans(w), acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def gate_up_tiles(x_ptr, rows, row_ok, wg_ptr, wu_ptr, cols, col_ok, K: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
        """``(x @ gate[cols].T, x @ up[cols].T)`` in one pass over K, both weight streams in flight together."""
        gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            w_offsets = cols[:, None] * K + ks[None, :]
            w_mask = col_ok[:, None] & k_ok[None, :]
            x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            gate = tl.dot(x, tl.trans(tl.load(wg_ptr + w_offsets, mask=w_mask, other=0.0)), gate,
                          input_precision=PRECISION)
            up = tl.dot(x, tl.trans(tl.load(wu_ptr + w_offsets, mask=w_mask, other=0.0)), up,
                        input_precision=PRECISION)
        return gate, up

    @triton.jit
    def store_substitute_inner(x_ptr, rows, row_ok, si_ptr, sg_ptr, t_ptr, cols, col_ok, H: tl.constexpr,
                               S: tl.constexpr, GATED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
        """``t[rows, cols]``, the stand-in's inner step: ``x @ inner[cols].T``, times ``silu(x @ gate_s[cols].T)``
        for a core stand-in (``GATED``)."""
        if GATED:
            gate, inner = gate_up_tiles(x_ptr, rows, row_ok, sg_ptr, si_ptr, cols, col_ok, H, BLOCK_M, BLOCK_N,
                                        BLOCK_K, PRECISION)
            inner = gate * tl.sigmoid(gate) * inner
        else:
            inner = rows_times_weight_t(x_ptr, rows, row_ok, si_ptr, cols, col_ok, H,
                                        tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), BLOCK_K, PRECISION)
        tl.store(t_ptr + rows[:, None] * S + cols[None, :], inner.to(t_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def substitute_tile(t_ptr, so_ptr, sb_ptr, rows, row_ok, cols, col_ok, S: tl.constexpr,
                        HAS_SUBSTITUTE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_KS: tl.constexpr, PRECISION: tl.constexpr):
        """The substitute for this tile (fp32): ``t @ out_s[cols].T + bias[cols]``, or zeros."""
        sub = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if HAS_SUBSTITUTE:
            sub = rows_times_weight_t(t_ptr, rows, row_ok, so_ptr, cols, col_ok, S, sub, BLOCK_KS, PRECISION)
            sub += tl.load(sb_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        return sub

    @triton.jit
    def gate_up_kernel(x_ptr, wg_ptr, wu_ptr, h_ptr, dec_ptr, si_ptr, sg_ptr, t_ptr, M, dec_stride,
                       H: tl.constexpr, I: tl.constexpr, S: tl.constexpr, HAS_SUBSTITUTE: tl.constexpr,
                       GATED: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
        """Grid ``([stand-in tiles +] intermediate tiles, row blocks)``: h = silu(x gate^T) * (x up^T), and the
        stand-in's inner step for row blocks where some row skips."""
        rows, row_ok, skip, n_skip, n_rows = row_block(dec_ptr, dec_stride, M, BLOCK_M)
        pid_n = tl.program_id(0)
        if HAS_SUBSTITUTE:  # the stand-in's tiles come first, so they run beside the FFN's, not after them
            substitute_tiles = tl.cdiv(S, BLOCK_N)
            if pid_n < substitute_tiles:
                if n_skip > 0:
                    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
                    store_substitute_inner(x_ptr, rows, row_ok, si_ptr, sg_ptr, t_ptr, cols, cols < S, H, S, GATED,
                                           BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
                return
            pid_n -= substitute_tiles
        if n_skip == n_rows:
            return
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < I
        gate, up = gate_up_tiles(x_ptr, rows, row_ok, wg_ptr, wu_ptr, cols, col_ok, H, BLOCK_M, BLOCK_N, BLOCK_K,
                                 PRECISION)
        h = gate * tl.sigmoid(gate) * up
        tl.store(h_ptr + rows[:, None] * I + cols[None, :], h.to(h_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def down_merge_kernel(h_ptr, wd_ptr, out_ptr, dec_ptr, t_ptr, so_ptr, sb_ptr, M, dec_stride, H: tl.constexpr,
                          I: tl.constexpr, S: tl.constexpr, HAS_SUBSTITUTE: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_KS: tl.constexpr):
        """Grid ``(hidden tiles, row blocks)``: h down^T for computing rows, the substitute for skipping ones."""
        rows, row_ok, skip, n_skip, n_rows = row_block(dec_ptr, dec_stride, M, BLOCK_M)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < H
        out_ptrs = out_ptr + rows[:, None] * H + cols[None, :]
        out_mask = row_ok[:, None] & col_ok[None, :]
        if n_skip == n_rows:
            sub = substitute_tile(t_ptr, so_ptr, sb_ptr, rows, row_ok, cols, col_ok, S, HAS_SUBSTITUTE, BLOCK_M,
                                  BLOCK_N, BLOCK_KS, PRECISION)
            tl.store(out_ptrs, sub.to(out_ptr.dtype.element_ty), mask=out_mask)
            return
        acc = rows_times_weight_t(h_ptr, rows, row_ok, wd_ptr, cols, col_ok, I,
                                  tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), BLOCK_K, PRECISION)
        if n_skip > 0:
            sub = substitute_tile(t_ptr, so_ptr, sb_ptr, rows, row_ok, cols, col_ok, S, HAS_SUBSTITUTE, BLOCK_M,
                                  BLOCK_N, BLOCK_KS, PRECISION)
            acc = tl.where(skip[:, None], sub, acc)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)

    # Triton's interpreter (TRITON_INTERPRET=1: the CPU tests) looks a kernel's names up in its module's globals
    # only, where the compiler also reads closures: publish the helpers there too.
    globals().update(tl=tl, row_block=row_block, rows_times_weight_t=rows_times_weight_t, gate_up_tiles=gate_up_tiles,
                     store_substitute_inner=store_substitute_inner, substitute_tile=substitute_tile)
    return SimpleNamespace(gate_up=gate_up_kernel, down_merge=down_merge_kernel)


# ------------------------------------------------------------------------------------------------
# Host code
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tiles:
    """Block sizes of both kernels (``num_warps`` / ``num_stages``: Triton's launch options)."""

    block_m: int
    block_n_gate_up: int
    block_k_gate_up: int
    block_n_down: int
    block_k_down: int
    block_k_substitute: int  # K tile over the stand-in's width S in ``down_merge``
    num_warps: int = 4
    num_stages: int = 4


def choose_tiles(rows: int, hidden: int, intermediate: int, width: int, multiprocessors: int,
                 itemsize: int = 2) -> Tiles:
    """Tiles for a memory-bound GEMV: about two blocks per multiprocessor (narrower column tiles until there are),
    and K tiles that keep :data:`STAGE_WEIGHT_BYTES` of each weight matrix in flight per pipeline stage, and all
    of a stage's tiles (the rows' and the weights') within :data:`STAGE_BYTES`."""
    block_m = min(MAX_BLOCK_M, max(16, _next_power_of_2(rows)))
    row_blocks = _cdiv(rows, block_m)
    n_gate_up = _column_tile(intermediate, row_blocks, multiprocessors)
    n_down = _column_tile(hidden, row_blocks, multiprocessors)
    return Tiles(block_m, n_gate_up, _k_tile(hidden, n_gate_up, 2, block_m, itemsize), n_down,
                 _k_tile(intermediate, n_down, 1, block_m, itemsize),
                 _k_tile(max(width, 1), n_down, 1, block_m, itemsize))


def _column_tile(columns: int, row_blocks: int, multiprocessors: int) -> int:
    for width in (64, 32):
        if _cdiv(columns, width) * row_blocks >= 2 * multiprocessors:
            return width
    return 16


def _k_tile(k: int, width: int, weights: int, block_m: int, itemsize: int) -> int:
    """The largest of 256/128/64/32/16 that divides `k` (no masked tail) and fits the per-stage byte budgets: each
    of the loop's `weights` weight tiles ``[width, K]`` within :data:`STAGE_WEIGHT_BYTES`, those and the rows' tile
    ``[block_m, K]`` together within :data:`STAGE_BYTES`."""
    per_k = (weights * width + block_m) * itemsize
    cap = max(16, min(STAGE_WEIGHT_BYTES // (width * itemsize), STAGE_BYTES // per_k))
    return next((b for b in (256, 128, 64, 32, 16) if b <= cap and k % b == 0), min(64, cap))


@functools.cache
def multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return HOPPER_MULTIPROCESSORS


@dataclass
class Launch:
    """One kernel launch: the kernel, its grid, its arguments by name and Triton's launch options."""

    kernel: Any
    grid: tuple[int, int]
    args: dict[str, Any]
    options: dict[str, int]


def launches(x: Tensor, ffn: FFNWeights, decisions: Tensor, substitute: SubstituteWeights | None,
             tiles: Tiles | None = None) -> tuple[list[Launch], Tensor]:
    """The two launches that compute the skippable FFN of `x` (``[rows, hidden]``, contiguous), and the output
    they will write. Nothing is read from the tensors' data, so meta tensors work (for compiling ahead)."""
    rows, hidden = x.shape
    intermediate = ffn.gate.shape[0]
    _check_dtypes(x, ffn, substitute)
    decision_ptr, decision_stride = _decision_pointer(decisions, rows)
    width = substitute.width if substitute is not None else 0
    tiles = tiles or choose_tiles(rows, hidden, intermediate, width, multiprocessors(x.device), x.element_size())
    h = torch.empty(rows, intermediate, dtype=x.dtype, device=x.device)
    out = torch.empty_like(x)
    inner = torch.empty(rows, width, dtype=x.dtype, device=x.device) if substitute is not None else x
    s_inner, s_out, s_bias, s_gate = substitute if substitute is not None else (x, x, x, None)  # x: never read
    common = dict(dec_ptr=decision_ptr, t_ptr=inner, M=rows, H=hidden, I=intermediate, S=width,
                  dec_stride=decision_stride, HAS_SUBSTITUTE=substitute is not None,
                  PRECISION="ieee" if x.dtype == torch.float32 else "tf32", BLOCK_M=tiles.block_m)
    row_blocks = _cdiv(rows, tiles.block_m)
    gate_up_programs = _cdiv(intermediate, tiles.block_n_gate_up) + _cdiv(width, tiles.block_n_gate_up)
    options = dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    gate_up = Launch(kernels().gate_up, (gate_up_programs, row_blocks),
                     dict(common, x_ptr=x, wg_ptr=ffn.gate, wu_ptr=ffn.up, h_ptr=h, si_ptr=s_inner,
                          sg_ptr=s_gate if s_gate is not None else x, GATED=s_gate is not None,
                          BLOCK_N=tiles.block_n_gate_up, BLOCK_K=tiles.block_k_gate_up), options)
    down = Launch(kernels().down_merge, (_cdiv(hidden, tiles.block_n_down), row_blocks),
                  dict(common, h_ptr=h, wd_ptr=ffn.down, out_ptr=out, so_ptr=s_out, sb_ptr=s_bias,
                       BLOCK_N=tiles.block_n_down, BLOCK_K=tiles.block_k_down, BLOCK_KS=tiles.block_k_substitute),
                  options)
    return [gate_up, down], out


def triton_skippable_ffn(x: Tensor, ffn: FFNWeights, decisions: Tensor,
                         substitute: SubstituteWeights | None = None, tiles: Tiles | None = None) -> Tensor:
    """:func:`skiptool.gpu.kernels.reference_skippable_ffn`'s semantics in two fixed-grid launches, no host sync."""
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    planned, out = launches(flat, ffn, decisions, substitute, tiles)
    for launch in planned:
        launch.kernel[launch.grid](**launch.args, **launch.options)
    return out.view_as(x)


def compile_ahead(planned: list[Launch], arch: int = 90) -> list[Any]:
    """Compile the launches for an NVIDIA target without a GPU (sm_90 = Hopper): checks that Triton accepts the
    kernels and gives their PTX (``.asm["ptx"]``) and shared memory per block (``.metadata.shared``)."""
    import triton
    from triton.backends.compiler import GPUTarget

    compiled = []
    for launch in planned:
        params = launch.kernel.params
        signature = {p.name: "constexpr" if p.is_constexpr else _triton_type(launch.args[p.name]) for p in params}
        constexprs = {p.name: launch.args[p.name] for p in params if p.is_constexpr}
        aligned = {(p.num,): [["tt.divisibility", 16]] for p in params  # as Triton's launcher marks them
                   if not p.is_constexpr and _divisible_by_16(launch.args[p.name])}
        source = triton.compiler.ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs,
                                           attrs=aligned)
        compiled.append(triton.compile(source, target=GPUTarget("cuda", arch, 32), options=launch.options))
    return compiled


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _divisible_by_16(value: Any) -> bool:
    """Pointers from PyTorch's allocator are 16-byte aligned; integers are marked when they divide by 16."""
    return isinstance(value, Tensor) or int(value) % 16 == 0


def _triton_type(value: Any) -> str:
    if isinstance(value, Tensor):
        return "*" + TRITON_TYPES[value.dtype]
    return "i32" if abs(int(value)) < 2**31 else "i64"


def _decision_pointer(decisions: Tensor, rows: int) -> tuple[Tensor, int]:
    """The decisions as the kernels read them: a flat tensor (bool viewed as bytes) and its row stride (0 for an
    all-rows flag)."""
    flat = flat_decisions(decisions, rows).contiguous()
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    return flat, 0 if flat.numel() == 1 else 1


def _check_dtypes(x: Tensor, ffn: FFNWeights, substitute: SubstituteWeights | None) -> None:
    tensors = list(ffn) + [w for w in (substitute or ()) if w is not None]
    if any(t.dtype != x.dtype for t in tensors) or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"the FFN kernels need the input, FFN and stand-in in one of fp32/fp16/bf16 "
                         f"(got {x.dtype} and {sorted({str(t.dtype) for t in tensors})})")
