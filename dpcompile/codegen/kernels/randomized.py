"""Randomized (probe) per-sample norms for linear weight sites, s_i = a_i^T b_i with a (B, T, M), b (B, T, N).

DP-SGD-RC estimates ||s_i||_F^2 = tr(s_i s_i^T) with k Gaussian probes instead of forming s_i or its T x T ghost
Gram matrices (docs/randomized.md):

  hutchinson   est_i = (1/k) sum_j ||b_i^T (a_i v_j)||^2,   v_j ~ N(0, I_M)           cost T k (M + N) per sample
  hutchpp      s = k // 3 sketch probes S give Q = orth(s_i^T S) (N x s); h = k - 2 s residual probes V;
               est_i = ||s_i Q||^2 + (1/h) sum_j ||(I - Q Q^T) s_i^T v_j||^2         exact when rank(s_i) <= s

Probes are never stored: every probe entry is drawn inside the kernels from a counter-based generator,
Philox4x32-10 keyed by the 64-bit per-call seed with the counter (column group p, probe j, sample i, site id): its
four words are two Box-Muller pairs, the entries of columns 4p .. 4p + 3. Every (sample, site, probe, column group)
gets its own counter, so probes are independent across samples and sites; a fresh seed per call
(randomized_ops.draw_probe_seed) makes them independent across micro-batches and steps. `gaussian_probes_reference`
regenerates the same probes in plain PyTorch, so the kernels can be checked against a reference that uses exactly
their probes.

Kernels:
  _project_kernel   Z = a_i V (T x K) for a block of probes (V drawn in-kernel) or a per-sample matrix (V loaded),
                    over one slice of a_i's columns (split-M: tall row tiles draw fewer probe entries, and the
                    slices keep the GPU filled; their partial Z are added in a fixed order)
  _split3_kernel    for bf16 data: adds the projection's column slices and splits Z into three bf16 terms once,
                    so that b^T z's programs (one per N-tile) load them straight into their dots
  _bt_z_kernel      b_i^T Z_i on one (N, K) tile over one slice of the T rows (split-T: a narrow site has few
                    (N, K) tiles, and each would otherwise walk all T rows alone while most of the GPU idles)
  _tile_sq_kernel   each tile's slices added in a fixed order, then its upward-rounded sum of squares
Products run on tensor cores at fp32 accuracy and accumulate in fp32. For bf16 data (autocast) the fp32 operand
(probes, Z) is split into three bf16 terms whose sum is it exactly, so every product is exact and only the fp32
accumulation rounds, as with IEEE fp32 FMAs. For fp16 / fp32 data, tf32x3: each fp32 operand is written as big +
small, two TF32 numbers, and big*big + big*small + small*big is accumulated; an fp16 operand is its own big, so
its products are exact for a probe perturbed by at most 2^-22 relative per entry (the size of the error fp32 log /
cos already put into the Gaussian itself); for fp32 data the dropped small*small term is below 2^-22 relative per
product. The estimate's own spread (relative sqrt(2/k)) is about 10^5 times larger. precision="ieee" keeps IEEE
fp32 FMAs (benchmarks and checks). Squared norms are rounded *up* wherever they are reduced or converted: each
tile's fp32 sum of squares is scaled by 1 + (terms + 4) 2^-23, which covers the worst-case rounding of any
summation order; the tiles' sums are added in fp64 with a matching bound and the fp32 result is the next fp32
value at or above the fp64 one. An under-estimate means under-clipping (more sensitivity than accounted); an
over-estimate only clips a little more. Partial products are reduced in a fixed order, so the result does not
depend on the order of atomics (there are none).
"""
from __future__ import annotations

import math

import torch

try:  # the PyTorch reference below works without Triton (CPU-only installs); the kernels need it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = tl = None

from ...randomized_contract import VARIANTS, check_variant, hutchpp_split  # noqa: F401  (shared with the accountant)

_TWO_PI = 6.283185307179586
_TWO_POW_M31 = 4.656612873077393e-10  # 2^-31, exact in fp32
_F32_EPS = 2.0 ** -23                 # fp32 machine epsilon (2u)
_F64_EPS = 2.0 ** -52


# ------------------------------------------------------------------------------------------------ probes
if triton is not None:
    @triton.jit
    def _uniform_open(r):
        # uint32 -> 31-bit integer -> uniform in (0, 1]: u = (x + 1/2) 2^-31 (never 0, so log never overflows)
        x = r.to(tl.int32, bitcast=True)
        x = tl.where(x < 0, ~x, x)
        return (x.to(tl.float32) + 0.5) * 4.656612873077393e-10


    @triton.jit
    def _gaussian_probes(seed, site, sample, col0, probes, BLOCK_M: tl.constexpr):
        """fp32 N(0, 1) probe entries (BLOCK_M, BK) for columns col0 .. col0 + BLOCK_M (col0 a multiple of 4) x
        probe ids `probes` [BK] of one sample and site. One Philox call per 4 columns: its 4 words are two
        Box-Muller pairs, columns 4p .. 4p + 3 = (r cos, r sin, r' cos, r' sin)."""
        groups = col0 // 4 + tl.arange(0, BLOCK_M // 4)
        c0 = groups[None, :] + probes[:, None] * 0  # (BK, BLOCK_M / 4): probes along rows here
        c1 = probes[:, None] + groups[None, :] * 0
        c2 = c0 * 0 + sample
        c3 = c0 * 0 + site
        r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
        rad01 = tl.sqrt(-2.0 * tl.log(_uniform_open(r0)))
        th01 = 6.283185307179586 * _uniform_open(r1)
        rad23 = tl.sqrt(-2.0 * tl.log(_uniform_open(r2)))
        th23 = 6.283185307179586 * _uniform_open(r3)
        n0, n1 = rad01 * tl.cos(th01), rad01 * tl.sin(th01)
        n2, n3 = rad23 * tl.cos(th23), rad23 * tl.sin(th23)
        # interleave(interleave(n0, n2), interleave(n1, n3)) = n0, n1, n2, n3 of group 0, then of group 1, ...
        return tl.trans(tl.interleave(tl.interleave(n0, n2), tl.interleave(n1, n3)))


    @triton.jit
    def _dot_fp32(x, y, acc, PRECISION: tl.constexpr):
        """acc + x @ y at fp32 accuracy for fp32 y. "bf16x3": x is bf16 and y is split into three bf16 terms whose
        sum is y exactly (8 significand bits each, after round-to-nearest: 24 in all), so every tensor-core product
        is exact and only the fp32 accumulation rounds; otherwise tl.dot's input_precision (tf32x3 or ieee)."""
        if PRECISION == "bf16x3":
            hi = y.to(tl.bfloat16)
            rest = y - hi.to(tl.float32)
            mid = rest.to(tl.bfloat16)
            lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
            acc = tl.dot(x, lo, acc)
            acc = tl.dot(x, mid, acc)
            acc = tl.dot(x, hi, acc)
        else:
            acc = tl.dot(x.to(tl.float32), y, acc, input_precision=PRECISION)
        return acc


    @triton.jit
    def _probe_dump_kernel(seed_ptr, out_ptr, site, M, K, probe0, so_b, so_m, so_k,
                           BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """Test helper: writes the probes the other kernels draw (out (B, M, K))."""
        sample = tl.program_id(0)
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
        seed = tl.load(seed_ptr)
        v = _gaussian_probes(seed, site, sample, tl.program_id(1) * BLOCK_M, probe0 + rk, BLOCK_M)
        tl.store(out_ptr + sample * so_b + rm[:, None] * so_m + rk[None, :] * so_k, v,
                 mask=(rm[:, None] < M) & (rk[None, :] < K))


def _u32(x: torch.Tensor) -> torch.Tensor:
    return x & 0xFFFFFFFF


def _mul32(a: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of a * c for uint32 values held in int64 (16-bit limbs: no int64 overflow)."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    lo_prod, hi_prod = a_lo * c, a_hi * c
    hi = (hi_prod + (lo_prod >> 16)) >> 16
    lo = _u32(((hi_prod & 0xFFFF) << 16) + lo_prod)
    return hi, lo


def philox4x32(seed: int, c0, c1, c2, c3, rounds: int = 10):
    """Philox4x32 as triton.language.philox computes it (key = seed's low / high 32 bits), on int64 tensors."""
    k0, k1 = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    c0, c1, c2, c3 = (_u32(torch.as_tensor(c, dtype=torch.int64)) for c in (c0, c1, c2, c3))
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    for _ in range(rounds):
        hi_b, lo_b = _mul32(c2, 0xCD9E8D57)
        hi_a, lo_a = _mul32(c0, 0xD2511F53)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c0, c1, c2, c3


def _uniform(r: torch.Tensor) -> torch.Tensor:
    x = torch.where(r >= 2 ** 31, 0xFFFFFFFF - r, r)  # bitcast to int32, then ~x for negatives
    return (x.to(torch.float32) + 0.5) * torch.tensor(_TWO_POW_M31, dtype=torch.float32)


def gaussian_probes_reference(seed, site: int, num_samples: int, cols: int, probe_ids, device=None) -> torch.Tensor:
    """The probes the kernels draw, regenerated in PyTorch: (num_samples, cols, len(probe_ids)) fp32.

    seed: int in [0, 2^63) or a one-element int64 tensor (traceable: no .item()). The Philox integers equal the
    kernels' bit for bit; the normals may differ from the kernels' in the last bit of log / cos."""
    if isinstance(seed, torch.Tensor):
        seed = seed.reshape(()).to(device=device, dtype=torch.int64)
    else:
        check_seed(seed)
    probe_ids = torch.as_tensor(list(probe_ids), dtype=torch.int64, device=device)
    i = torch.arange(num_samples, dtype=torch.int64, device=device).view(-1, 1, 1)
    p = torch.arange(-(-cols // 4), dtype=torch.int64, device=device).view(1, -1, 1)
    j = probe_ids.view(1, 1, -1)
    words = philox4x32(seed, p, j, i, torch.tensor(site, dtype=torch.int64, device=device))
    u0, u1, u2, u3 = (_uniform(w) for w in words)
    two, two_pi = torch.tensor(-2.0, dtype=torch.float32), torch.tensor(_TWO_PI, dtype=torch.float32)
    rad01, th01 = torch.sqrt(two * torch.log(u0)), two_pi * u1
    rad23, th23 = torch.sqrt(two * torch.log(u2)), two_pi * u3
    n = torch.stack([rad01 * torch.cos(th01), rad01 * torch.sin(th01), rad23 * torch.cos(th23),
                     rad23 * torch.sin(th23)], dim=2)  # (samples, groups, 4, probes): column 4p + r
    return n.reshape(num_samples, 4 * p.shape[1], j.shape[-1])[:, :cols]


def check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed={seed!r} must be an integer in [0, 2^63)")
    return seed


def check_site(site: int) -> int:
    if isinstance(site, bool) or not isinstance(site, int) or not 0 <= site < 2 ** 31:
        raise ValueError(f"site_id={site!r} must be an integer in [0, 2^31)")
    return site


# ------------------------------------------------------------------------------------------------ kernels
if triton is not None:
    @triton.jit
    def _project_kernel(a_ptr, v_ptr, seed_ptr, z_ptr, site, probe0, T, M, K, cols_per_split, nsplit,
                        sa_b, sa_t, sa_m, sv_b, sv_m, sv_k, sz_s, sz_b, sz_t, sz_k,
                        DRAW: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """z[split, i, t, j] = sum over the split's columns m of a[i, t, m] v[i, m, j], j < K; v drawn (DRAW: probe
        ids probe0 + j) or loaded. Column slices (split-M) let a tall row tile, which draws each probe entry once
        for all its rows, still leave enough programs to fill the GPU; cols_per_split is a multiple of BLOCK_M."""
        sample = tl.program_id(0)
        rt = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        split = tl.program_id(2) % nsplit
        rk = (tl.program_id(2) // nsplit) * BLOCK_K + tl.arange(0, BLOCK_K)
        rm0 = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
        if DRAW:
            seed = tl.load(seed_ptr)
        first = split * cols_per_split
        for m0 in range(first, tl.minimum(first + cols_per_split, M), BLOCK_M):
            rm = m0 + rm0
            a = tl.load(a_ptr + sample * sa_b + rt[:, None] * sa_t + rm[None, :] * sa_m,
                        mask=(rt[:, None] < T) & (rm[None, :] < M), other=0.0)
            vmask = (rm[:, None] < M) & (rk[None, :] < K)
            if DRAW:
                v = tl.where(vmask, _gaussian_probes(seed, site, sample, m0, probe0 + rk, BLOCK_M), 0.0)
            else:
                v = tl.load(v_ptr + sample * sv_b + rm[:, None] * sv_m + rk[None, :] * sv_k, mask=vmask,
                            other=0.0).to(tl.float32)
            acc = _dot_fp32(a, v, acc, PRECISION)
        tl.store(z_ptr + split * sz_s + sample * sz_b + rt[:, None] * sz_t + rk[None, :] * sz_k, acc,
                 mask=(rt[:, None] < T) & (rk[None, :] < K))


    @triton.jit
    def _upward_sum_of_squares(w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        sq = tl.sum(tl.sum(w * w, axis=1), axis=0)
        # Any summation order of n non-negative fp32 terms (and their squaring) errs by less than (n + 1) u
        # relative, n = BLOCK_N + BLOCK_K here (row sums, then the sum of rows): this bound keeps the result
        # above the exact sum of the squares of w, including the rounding of the squares themselves.
        return sq * (1.0 + (BLOCK_N + BLOCK_K + 4) * 1.1920928955078125e-07)


    @triton.jit
    def _split3_kernel(z_ptr, out_ptr, n, K, nparts, BLOCK: tl.constexpr):
        """out[r, p, :] (p = 0, 1, 2: hi, mid, lo; bf16) with hi + mid + lo = row r of the sum of the nparts fp32
        partials z[s] (added in the order s = 0, 1, ..), exactly: each term is what the previous ones leave,
        rounded to bf16, 8 significant bits at a time (24 in all). z is (nparts, rows, K), out (rows, 3, K), both
        contiguous, n = rows * K: a row's three terms lie side by side."""
        r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = r < n
        z = tl.load(z_ptr + r, mask=mask, other=0.0)
        for s in range(1, nparts):
            z += tl.load(z_ptr + s * n + r, mask=mask, other=0.0)
        hi = z.to(tl.bfloat16)
        rest = z - hi.to(tl.float32)
        mid = rest.to(tl.bfloat16)
        lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
        o = out_ptr + (r // K) * (3 * K) + r % K
        tl.store(o, hi, mask=mask)
        tl.store(o + K, mid, mask=mask)
        tl.store(o + 2 * K, lo, mask=mask)


    @triton.jit
    def _bt_z_kernel(b_ptr, z_ptr, out_ptr, T, N, K, rows_per_split, sb_b, sb_t, sb_n, sz_p, sz_b, sz_t, sz_k,
                     so_b, so_s, so_n, so_k, tiles_k, tiles, PRECISION: tl.constexpr, SQUARES: tl.constexpr,
                     SPLIT_Z: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[i, split] = b_i^T z_i over rows [split * rows_per_split, (split + 1) * rows_per_split) on one (N, K)
        tile; rows_per_split is a multiple of BLOCK_T. SQUARES (one slice only): out[i, tile] = the tile's
        upward-rounded sum of squares instead, so no (B, N, K) product is written. SPLIT_Z (bf16 b): z is already
        the three bf16 terms of _split3_kernel (term stride sz_p), loaded straight into three dots, instead of fp32
        split again by every N-tile's program."""
        sample = tl.program_id(0)
        tile = tl.program_id(1)
        split = tl.program_id(2)
        rn = (tile // tiles_k) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = (tile % tiles_k) * BLOCK_K + tl.arange(0, BLOCK_K)
        rt0 = tl.arange(0, BLOCK_T)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        first = split * rows_per_split
        for t0 in range(first, tl.minimum(first + rows_per_split, T), BLOCK_T):
            rt = t0 + rt0
            b = tl.load(b_ptr + sample * sb_b + rt[:, None] * sb_t + rn[None, :] * sb_n,
                        mask=(rt[:, None] < T) & (rn[None, :] < N), other=0.0)
            zp = z_ptr + sample * sz_b + rt[:, None] * sz_t + rk[None, :] * sz_k
            zmask = (rt[:, None] < T) & (rk[None, :] < K)
            if SPLIT_Z:
                bt = tl.trans(b)
                acc = tl.dot(bt, tl.load(zp + 2 * sz_p, mask=zmask, other=0.0), acc)
                acc = tl.dot(bt, tl.load(zp + sz_p, mask=zmask, other=0.0), acc)
                acc = tl.dot(bt, tl.load(zp, mask=zmask, other=0.0), acc)
            else:
                acc = _dot_fp32(tl.trans(b), tl.load(zp, mask=zmask, other=0.0), acc, PRECISION)
        if SQUARES:
            tl.store(out_ptr + sample * tiles + tile, _upward_sum_of_squares(acc, BLOCK_N, BLOCK_K))
        else:
            tl.store(out_ptr + sample * so_b + split * so_s + rn[:, None] * so_n + rk[None, :] * so_k, acc,
                     mask=(rn[:, None] < N) & (rk[None, :] < K))


    @triton.jit
    def _tile_sq_kernel(part_ptr, out_ptr, N, K, nsplit, sp_b, sp_s, sp_n, sp_k, tiles_k, tiles,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[i, tile] = upward-rounded sum of the squares of one (N, K) tile of b_i^T z_i, its row slices
        added first in a fixed order."""
        sample = tl.program_id(0)
        tile = tl.program_id(1)
        rn = (tile // tiles_k) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = (tile % tiles_k) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rn[:, None] < N) & (rk[None, :] < K)
        w = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for s in range(0, nsplit):
            w += tl.load(part_ptr + sample * sp_b + s * sp_s + rn[:, None] * sp_n + rk[None, :] * sp_k, mask=mask,
                         other=0.0)
        tl.store(out_ptr + sample * tiles + tile, _upward_sum_of_squares(w, BLOCK_N, BLOCK_K))


# ------------------------------------------------------------------------------------------------ rounding
def round_up_f32(x: torch.Tensor) -> torch.Tensor:
    """fp64 -> the smallest fp32 value >= x (elementwise)."""
    f = x.to(torch.float32)
    below = f.to(torch.float64) < x
    return torch.where(below, torch.nextafter(f, torch.full_like(f, math.inf)), f)


def sum_up(x: torch.Tensor, dim, out_dtype: torch.dtype) -> torch.Tensor:
    """Sum of non-negative values over `dim`, never below the exact sum: in fp64 with a relative bound on its
    rounding, then rounded up to fp32 (or returned in fp64 for fp64 data)."""
    x = x.to(torch.float64)
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    n = math.prod(x.shape[d] for d in dims) if x.dim() else 1
    s = x.sum(dims) * (1.0 + (n + 4) * _F64_EPS)
    return s if out_dtype == torch.float64 else round_up_f32(s)


def scale_up(x64: torch.Tensor, divisor: int, out_dtype: torch.dtype) -> torch.Tensor:
    """x / divisor for fp64 x >= 0, never below the exact quotient, in out_dtype."""
    s = x64.to(torch.float64) / divisor * (1.0 + 2 * _F64_EPS)
    return s if out_dtype == torch.float64 else round_up_f32(s)


def sum_sq_up(x: torch.Tensor) -> torch.Tensor:
    """fp64 (B,): the sum of the squares of x over all but dim 0, never below the exact sum."""
    x64 = x.to(torch.float64).reshape(x.shape[0], math.prod(x.shape[1:]))  # no -1: B may be 0
    return x64.pow(2).sum(1) * (1.0 + (x64.shape[1] + 4) * _F64_EPS)


def hutchpp_total(exact64: torch.Tensor, w: torch.Tensor, q: torch.Tensor, h: int, out_dtype: torch.dtype):
    """Hutch++'s estimate from its exact part (fp64) and the h residual products w (B, N, h) against the sketch's
    basis q (B, N, s): exact + (1/h) ||(I - q q^T) w||^2, never below its exact value, in out_dtype."""
    resid = sum_sq_up(w - torch.bmm(q, torch.bmm(q.transpose(1, 2), w)))
    total = exact64 + scale_up(resid, h, torch.float64) * (1.0 + 2 * _F64_EPS)
    return total if out_dtype == torch.float64 else round_up_f32(total)


# ------------------------------------------------------------------------------------------------ drivers
def _as_sites(a: torch.Tensor, b: torch.Tensor):
    """(B, d) inputs are sites with T = 1; returns (B, T, d) views."""
    if a.dim() == 2 and b.dim() == 2:
        return a.unsqueeze(1), b.unsqueeze(1)
    if a.dim() != 3 or b.dim() != 3 or a.shape[:2] != b.shape[:2]:
        raise ValueError(f"linear site operands must be (B, T, M) and (B, T, N) (or (B, M) and (B, N)); got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    return a, b


def _narrow_side_first(a: torch.Tensor, b: torch.Tensor):
    """(a, b) or (b, a): probes are drawn for the columns of the first operand, so it should be the narrower one
    (a program draws its probe block once per tile of rows). ||a_i^T b_i||_F = ||b_i^T a_i||_F, and with Gaussian
    probes the estimate's law depends only on the singular values of a_i^T b_i, which its transpose shares: both
    orders give the same estimator (Hutchinson and Hutch++), the same variance and the same accounting."""
    return (b, a) if b.shape[-1] < a.shape[-1] else (a, b)


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, 1 << (max(n, 1) - 1).bit_length()))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


PRECISIONS = ("tensor_cores", "ieee")


def _blocks(k: int, block: int | None, rows: int, width: int):
    """(T rows, width, probes) per program; `block` (tests, interpreter) sets all three."""
    if block is not None:
        return block, block, _pow2(k, 16, block)
    return rows, width, _pow2(k, 16, 64)


def _dot_precision(streamed: torch.Tensor, precision: str) -> str:
    """The kernels' PRECISION for a dot of the streamed operand (activations or output gradients) with fp32
    probes: exact bf16 products for bf16 data, tf32x3 for fp16 / fp32 data (both exact in TF32's range for fp16),
    or IEEE fp32 FMAs when asked ("ieee": benchmarks and checks)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is unknown; use one of {PRECISIONS}")
    if precision == "ieee":
        return "ieee"
    return "bf16x3" if streamed.dtype == torch.bfloat16 else "tf32x3"


def _hint(n) -> int | None:
    """A size as a Python int for tuning choices only (row and column slices): the int itself, or a symbolic size's
    hint (the value it was traced with, e.g. the dynamic batch), read without adding a guard; None when there is
    none (unbacked). The slices it picks are correct for any size; only their speed depends on it."""
    if isinstance(n, int):
        return n
    hint = getattr(getattr(n, "node", None), "hint", None)
    return hint if isinstance(hint, int) else None


#: rows per projection program. A program draws its block of probe entries once for all its rows, and the draws,
#: not the products, bound the projection (benchmarks/NOTES.md entries 6-7), so taller tiles draw fewer entries
_PROJECT_ROWS = 256
_PROJECT_WARPS = 8
#: programs the projection aims for: a grid with fewer (sample, row-tile) programs splits the columns of a_i into
#: slices whose partial products are added afterwards (split-M), so tall tiles still fill the GPU
_PROJECT_PROGRAMS = 512


def _col_splits(B, T, M: int, bt: int, bm: int, K: int, tiles_k: int, col_splits: int | None) -> int:
    """How many column slices (of whole BLOCK_M tiles) Z = a_i V is summed over. The slices' fp32 partials (slices x
    B T K) are kept under half the bytes of the bf16 operand a (B T M) whatever the batch grows to (a dynamic batch
    is sliced by its traced size): at most M / (4 K) slices."""
    col_tiles = _cdiv(M, bm)
    if col_splits is not None:
        return max(1, min(col_splits, col_tiles))
    b, t = _hint(B), _hint(T)
    if b is None or t is None or b * t * tiles_k == 0:
        return 1
    return max(1, min(_cdiv(_PROJECT_PROGRAMS, b * _cdiv(t, bt) * tiles_k), col_tiles, M // (4 * K)))


def _project(a, seed, site, probe0, K, launch, block, v=None, precision="tensor_cores", col_splits=None):
    """(B, T, K) fp32: a_i @ V_i with V drawn (probe ids probe0 ..) or given (B, M, K). With several column
    slices, their fp32 partial products are added in a fixed order (deterministic, no atomics)."""
    return _sum_parts(_project_parts(a, seed, site, probe0, K, launch, block, v, precision, col_splits))


def _sum_parts(z: torch.Tensor) -> torch.Tensor:
    """The column slices' partials (S, B, T, K) added in a fixed order (torch's sum; no copy for one slice)."""
    return z[0] if z.shape[0] == 1 else z.sum(0)


def _project_parts(a, seed, site, probe0, K, launch, block, v=None, precision="tensor_cores", col_splits=None):
    """(slices, B, T, K) fp32 whose sum over the first dim is a_i @ V_i (_project): the column slices' partial
    products, left for the consumer to add (_bt_z_launch adds them while it splits Z into bf16 terms)."""
    B, T, M = a.shape
    bt, bm, bk = _blocks(K, block, rows=_PROJECT_ROWS, width=64)
    tiles_k = _cdiv(K, bk)
    cols = _cdiv(_cdiv(M, bm), _col_splits(B, T, M, bt, bm, K, tiles_k, col_splits)) * bm
    nsplit = _cdiv(M, cols) if M else 1  # no empty slice
    z = torch.empty((nsplit, B, T, K), device=a.device, dtype=torch.float32)
    if B == 0 or T == 0 or K == 0:
        return z
    if M == 0:
        return z.zero_()
    vv = v if v is not None else z  # unused pointer when drawing
    sv = v.stride() if v is not None else (0, 0, 0)
    warps = {} if block is not None else {"num_warps": _PROJECT_WARPS}
    launch(_project_kernel)[(B, _cdiv(T, bt), tiles_k * nsplit)](
        a, vv, seed, z, site, probe0, T, M, K, cols, nsplit, *a.stride(), *sv, *z.stride(),
        DRAW=v is None, PRECISION=_dot_precision(a, precision), BLOCK_T=bt, BLOCK_M=bm, BLOCK_K=bk, **warps)
    return z


#: programs the split-T product aims for (about four per SM of an H200: with Z pre-split, half of the 1024 the
#: in-kernel split wanted was faster at all three shapes of bench_randomized_ops --sweep, run 20); a site
#: with fewer (sample, N-tile, K-tile) programs than this walks its T rows in several slices at once, of at least
#: 512 rows each. The slices' fp32 products are then at most T / 512 tiles per sample, i.e. at most K / 256 of the
#: bytes of the (bf16) operand b itself, whatever the batch
_TARGET_PROGRAMS = 512
_MIN_ROWS_PER_SPLIT = 512


def _splits(B, T, tiles: int, bt: int, splits: int | None) -> int:
    """How many slices of rows b_i^T z_i is summed over. A symbolic B or T (the dynamic batch of a compiled graph)
    counts with its hint, without a guard: the slices are correct for any size."""
    if splits is not None:
        t = _hint(T)
        return max(1, min(splits, _cdiv(t, bt))) if t is not None else max(1, splits)
    b, t = _hint(B), _hint(T)
    if b is None or t is None or b * tiles == 0:
        return 1
    return max(1, min(_cdiv(_TARGET_PROGRAMS, b * tiles), t // _MIN_ROWS_PER_SPLIT))


_SPLIT3_BLOCK = 1024


def _split3(z_parts: torch.Tensor, launch) -> torch.Tensor:
    """(3, B, T, K) bf16 hi, mid, lo whose sum is exactly the fp32 sum of the partials z_parts (S, B, T, K); a view
    of (B, T, 3, K) memory, so a row's three terms lie side by side."""
    z_parts = z_parts.contiguous()
    S, B, T, K = z_parts.shape
    out = torch.empty((B, T, 3, K), device=z_parts.device, dtype=torch.bfloat16)
    n = B * T * K
    if n:
        launch(_split3_kernel)[(_cdiv(n, _SPLIT3_BLOCK),)](z_parts, out, n, K, S, BLOCK=_SPLIT3_BLOCK)
    return out.permute(2, 0, 1, 3)


#: rows of b^T z per program when the row slices' products are added and squared: short tiles, so that a narrow
#: site still has hundreds of programs (at 128 rows, gpt2-small's fc2 had 48, and the kernel took 38 us a site)
_TILE_SQ_ROWS = 16


def _bt_z_launch(b, z, launch, block, precision, splits, squares: bool):
    """Runs _bt_z_kernel on z (B, T, K) fp32, or the partials (S, B, T, K) whose sum is z (_project_parts).
    squares=False: returns the slices' products, fp32 (B, slices, N, K), whose sum over dim 1 is b_i^T z_i.
    squares=True: returns the tiles' upward-rounded sums of squares of b_i^T z_i, fp32 (B, tiles), fused into the
    product kernel when there is one slice, else by _tile_sq_kernel over the slices. For bf16 b, z is first split
    once into its three bf16 terms (_split3), which every N-tile's program then loads as they are."""
    B, T, N = b.shape
    K = z.shape[-1]
    z_parts = z if z.dim() == 4 else z.unsqueeze(0)
    bt, bn, bk = _blocks(K, block, rows=64, width=128)
    tiles_k = _cdiv(K, bk)
    tiles = _cdiv(N, bn) * tiles_k
    nsplit = _splits(B, T, tiles, bt, splits)
    rows = _cdiv(_cdiv(T, nsplit), bt) * bt if T else bt
    fused = squares and nsplit == 1
    out = torch.empty((B, tiles) if fused else (B, nsplit, N, K), device=b.device, dtype=torch.float32)
    if B == 0 or tiles == 0 or T == 0:  # then there is one slice: squares are fused
        return out.zero_()
    so = (0, 0, 0, 0) if fused else out.stride()
    dot = _dot_precision(b, precision)
    z = _split3(z_parts, launch) if dot == "bf16x3" else _sum_parts(z_parts).unsqueeze(0)
    launch(_bt_z_kernel)[(B, tiles, nsplit)](b, z, out, T, N, K, rows, *b.stride(), *z.stride(), *so, tiles_k,
                                             tiles, PRECISION=dot, SQUARES=fused,
                                             SPLIT_Z=dot == "bf16x3", BLOCK_T=bt, BLOCK_N=bn, BLOCK_K=bk)
    if fused or not squares:
        return out
    sq_bn = bn if block is not None else _TILE_SQ_ROWS
    sq_tiles = _cdiv(N, sq_bn) * tiles_k
    sq = torch.empty((B, sq_tiles), device=b.device, dtype=torch.float32)
    launch(_tile_sq_kernel)[(B, sq_tiles)](out, sq, N, K, nsplit, *out.stride(), tiles_k, sq_tiles,
                                           BLOCK_N=sq_bn, BLOCK_K=bk)
    return sq


def _bt_z(b, z, launch, block, precision="tensor_cores", splits=None):
    """b_i^T z_i, fp32 (B, N, K), its slices added in a fixed order."""
    return _bt_z_launch(b, z, launch, block, precision, splits, squares=False).sum(1)


def _bt_z_sq_norms(b, z, launch, block, precision="tensor_cores", splits=None):
    """||b_i^T z_i||_F^2 in fp64 (B,), never below the exact sum of the squares of the computed b_i^T z_i: each
    (N, K) tile's squares are summed with an upward bound, then the tiles' sums are added in fp64 with a bound of
    their own."""
    return sum_up(_bt_z_launch(b, z, launch, block, precision, splits, squares=True), 1, torch.float64)


def _seed_tensor(seed, device) -> torch.Tensor:
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise ValueError(f"seed must be a one-element int64 tensor, got {seed.dtype} {tuple(seed.shape)}")
        return seed.reshape(1).to(device)
    return torch.tensor([check_seed(seed)], dtype=torch.int64, device=device)


def _checked_call(variant, probes, site, precision, seed, launch, *data):
    """The checks both entry points make before anything runs (an unknown variant, site or precision, fp64 data)
    and (launch, the seed on the data's device)."""
    check_variant(variant, probes)
    check_site(site)
    _dot_precision(data[0], precision)
    if any(x.dtype == torch.float64 for x in data):
        raise TypeError("Triton randomized-norm kernels take fp32/fp16/bf16 data; fp64 uses the reference")
    return launch or (lambda k: k), _seed_tensor(seed, data[0].device)


def randomized_sq_norms(a: torch.Tensor, b: torch.Tensor, probes: int, variant: str = "hutchinson", seed=0,
                        site: int = 0, block: int | None = None, launch=None, precision: str = "tensor_cores",
                        splits: int | None = None, col_splits: int | None = None) -> torch.Tensor:
    """Per-sample estimates of ||a_i^T b_i||_F^2, fp32 (B,), with Triton kernels (see the module docstring).

    seed: int in [0, 2^63) or a one-element int64 tensor (on any device). site: id in [0, 2^31) that keeps the
    probes of different sites of one call apart. launch: torch.library.wrap_triton inside a triton_op.
    precision: "tensor_cores" (fp32 accuracy: exact bf16 products, or tf32x3) or "ieee" (fp32 FMAs; benchmarks and
    checks). splits: slices of the rows for b_i^T z_i; col_splits: slices of the columns for a_i V (defaults:
    enough programs to fill the GPU)."""
    a, b = _narrow_side_first(*_as_sites(a, b))
    launch, seed_t = _checked_call(variant, probes, site, precision, seed, launch, a, b)
    kw = dict(precision=precision, splits=splits)
    pkw = dict(precision=precision, col_splits=col_splits)
    if variant == "hutchinson":
        z = _project_parts(a, seed_t, site, 0, probes, launch, block, **pkw)
        return scale_up(_bt_z_sq_norms(b, z, launch, block, **kw), probes, torch.float32)
    s, h = hutchpp_split(probes)
    # sketch: Y = s_i^T S = b_i^T (a_i S), Q = orth(Y) (N x s)
    y = _bt_z(b, _project_parts(a, seed_t, site, 0, s, launch, block, **pkw), launch, block, **kw)
    q = torch.linalg.qr(y).Q
    # exact part ||s_i Q||^2 = ||a_i^T (b_i Q)||^2
    u = _project(b, seed_t, site, 0, q.shape[-1], launch, block, v=q, **pkw)
    exact = _bt_z_sq_norms(a, u, launch, block, **kw)
    # residual: (1/h) sum_j ||(I - Q Q^T) b_i^T (a_i v_j)||^2 with probes s .. s + h - 1
    w = _bt_z(b, _project_parts(a, seed_t, site, s, h, launch, block, **pkw), launch, block, **kw)
    return hutchpp_total(exact, w, q, h, torch.float32)


def randomized_sq_norms_of_products(s: torch.Tensor, probes: int, variant: str = "hutchinson", seed=0, site: int = 0,
                                    block: int | None = None, launch=None,
                                    precision: str = "tensor_cores") -> torch.Tensor:
    """Per-sample estimates of ||s_i||_F^2 for per-sample products s (B, M, N) that are already formed, fp32 (B,),
    with the kernels above: randomized_sq_norms_of_products_reference's estimate, with its probes. The probes are
    drawn for the narrower side's columns under the same counters (sample, site, column, probe) as the site
    (a_i, b_i) with s_i = a_i^T b_i draws them for a_i's or b_i's columns, so this is that site's estimate,
    s_i^T V = b_i^T (a_i V), formed from the products instead of the T rows (randomized_stored, docs/randomized.md):
    M N k multiply-adds per sample instead of T k (M + N)."""
    if s.dim() != 3:
        raise ValueError(f"per-sample products must be (B, M, N); got {tuple(s.shape)}")
    launch, seed_t = _checked_call(variant, probes, site, precision, seed, launch, s)
    so = s if s.shape[1] <= s.shape[2] else s.transpose(1, 2)  # (B, W, L), W the narrower side: probes over W
    rows = so.transpose(1, 2)  # the projection's operand: L rows of W columns, so Z = so_i^T V (L x count)
    kw = dict(precision=precision)
    if variant == "hutchinson":
        z = _project(rows, seed_t, site, 0, probes, launch, block, **kw)
        return scale_up(sum_sq_up(z), probes, torch.float32)
    sk, h = hutchpp_split(probes)
    q = torch.linalg.qr(_project(rows, seed_t, site, 0, sk, launch, block, **kw)).Q  # (B, L, sk)
    exact = sum_sq_up(_project(so, seed_t, site, 0, q.shape[-1], launch, block, v=q, **kw))  # ||so_i Q||^2
    return hutchpp_total(exact, _project(rows, seed_t, site, sk, h, launch, block, **kw), q, h, torch.float32)


def dump_probes(seed, site: int, num_samples: int, cols: int, probe0: int, count: int, device) -> torch.Tensor:
    """Test hook: the probes (num_samples, cols, count) drawn by the kernels, written by a kernel."""
    out = torch.empty((num_samples, cols, count), device=device, dtype=torch.float32)
    if out.numel():
        bm, bk = 32, 16
        _probe_dump_kernel[(num_samples, _cdiv(cols, bm), _cdiv(count, bk))](
            _seed_tensor(seed, device), out, site, cols, count, probe0, *out.stride(), BLOCK_M=bm, BLOCK_K=bk)
    return out


# ------------------------------------------------------------------------------------------------ reference
def randomized_sq_norms_reference(a: torch.Tensor, b: torch.Tensor, probes: int, variant: str = "hutchinson",
                                  seed=0, site: int = 0, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The same estimate in plain PyTorch with the same probes (gaussian_probes_reference), any device.

    dtype: the arithmetic dtype (default fp32, fp64 for fp64 data); the result is fp32 rounded up like the kernels'
    (without the kernels' per-tile factor, so it is at most that much smaller), or fp64 when dtype is fp64."""
    check_variant(variant, probes)
    check_site(site)
    a, b = _as_sites(a, b)
    if not isinstance(seed, torch.Tensor):
        check_seed(seed)
    dtype = dtype or (torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    a, b = _narrow_side_first(a.to(dtype), b.to(dtype))
    B, T, M = a.shape

    def project(first, count):  # b_i^T (a_i V)  (B, N, count)
        v = gaussian_probes_reference(seed, site, B, M, range(first, first + count), a.device).to(dtype)
        return torch.bmm(b.transpose(1, 2), torch.bmm(a, v))

    if variant == "hutchinson":
        return scale_up(sum_sq_up(project(0, probes)), probes, out_dtype)
    s, h = hutchpp_split(probes)
    q = torch.linalg.qr(project(0, s)).Q
    return hutchpp_total(sum_sq_up(torch.bmm(a.transpose(1, 2), torch.bmm(b, q))), project(s, h), q, h, out_dtype)


def randomized_sq_norms_of_products_reference(s: torch.Tensor, probes: int, variant: str = "hutchinson", seed=0,
                                              site: int = 0, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The estimate of ||s_i||_F^2 for per-sample products s (B, M, N) that are already formed: exactly
    randomized_sq_norms_reference(I_M, s_i) (the site a_i = I, b_i = s_i, so a_i v = v), with the same probes, the
    same law and the same upward rounding, without forming the identity. The batch-size-1 graphs use it: their
    weight gradients are the one sample's products, and every sample must get the same estimator whatever the
    size of the micro-batch it lands in (docs/randomized.md)."""
    check_variant(variant, probes)
    check_site(site)
    if s.dim() != 3:
        raise ValueError(f"per-sample products must be (B, M, N); got {tuple(s.shape)}")
    if not isinstance(seed, torch.Tensor):
        check_seed(seed)
    dtype = dtype or (torch.float64 if s.dtype == torch.float64 else torch.float32)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    # the linear site (I_M, s_i) draws its probes on the narrower side (_narrow_side_first): over s_i's N columns
    # when N < M, which is the site (I_N, s_i^T)
    s = s.to(dtype) if s.shape[2] >= s.shape[1] else s.to(dtype).transpose(1, 2)
    B, M, _ = s.shape

    def project(first, count):  # s_i^T V  (B, N, count)
        v = gaussian_probes_reference(seed, site, B, M, range(first, first + count), s.device).to(dtype)
        return torch.bmm(s.transpose(1, 2), v)

    if variant == "hutchinson":
        return scale_up(sum_sq_up(project(0, probes)), probes, out_dtype)
    sk, h = hutchpp_split(probes)
    q = torch.linalg.qr(project(0, sk)).Q
    return hutchpp_total(sum_sq_up(torch.bmm(s, q)), project(sk, h), q, h, out_dtype)
