"""Simplex equiangular tight frames (ETFs): construction and nearest-frame projection.

A simplex ETF is K unit vectors in R^D whose pairwise cosines all equal -1/(K-1), the geometry that
class means and classifier rows converge to under neural collapse (Papyan et al. 2020; arXiv 2412.00884).
Every frame here is built as

    M = sqrt(K / (K-1)) * U @ (I_K - 1 1^T / K)

with U a D x K matrix that is an isometry on the complement of the all-ones vector. Only the choice of U
differs between bases, so all of them share one exactness test: unit columns and the simplex Gram.

This module is plain tensor math (no nn.Module) so that the layers, the checkpoint code and the tests
all build frames the same way.

The ``structured`` basis (see `structured_plan`) is the one that need not be stored at all, not even in
memory: U is a seeded composition of index maps, sign flips and Walsh-Hadamard blocks, so a layer can apply
the frame matrix-free (`structured_apply`, `structured_apply_t`) in O(n D log D) from O(D) integers.
"""
from __future__ import annotations

import hashlib
import itertools
import math
import weakref
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import torch

#: Bases whose frame is a pure function of (K, D, seed): they never need to be stored.
REGENERABLE_BASES: tuple[str, ...] = ("canonical", "orthogonal", "structured")
#: Every basis `simplex_etf` accepts.
BASES: tuple[str, ...] = ("canonical", "orthogonal", "nearest", "structured")


def _check_shape(num_vectors: int, dim: int) -> None:
    if num_vectors < 2:
        raise ValueError(f"a simplex ETF needs K >= 2 vectors, got K={num_vectors}")
    if dim < num_vectors - 1:
        raise ValueError(
            f"a simplex ETF of K={num_vectors} vectors needs dimension D >= K-1={num_vectors - 1}, got D={dim}"
        )


def centering_matrix(num_vectors: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """I - 11^T/K: removes the mean vector, which is what makes the frame's vectors equiangular."""
    eye = torch.eye(num_vectors, dtype=dtype)
    return eye - torch.full((num_vectors, num_vectors), 1.0 / num_vectors, dtype=dtype)


def _helmert_rows(num_vectors: int) -> torch.Tensor:
    """(K-1) x K matrix with orthonormal rows orthogonal to the all-ones vector.

    Needed when D = K-1: there is no D x K matrix with orthonormal columns, but one whose rows span the
    complement of 1 still maps the centred simplex isometrically.
    """
    rows = torch.zeros(num_vectors - 1, num_vectors, dtype=torch.float64)
    for i in range(1, num_vectors):
        rows[i - 1, :i] = 1.0
        rows[i - 1, i] = -float(i)
        rows[i - 1] /= math.sqrt(i * (i + 1))
    return rows


def random_orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Seeded rows x cols (rows >= cols) matrix with orthonormal columns, float64.

    Gaussian draw from a private CPU generator, QR, then the sign fix (columns multiplied by
    sign(diag(R))) that makes Q unique, hence identical in every process and on every machine.
    """
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    gaussian = torch.randn(rows, cols, generator=generator, dtype=torch.float64, device="cpu")
    q, r = torch.linalg.qr(gaussian, mode="reduced")
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return q * signs


def _isometry(num_vectors: int, dim: int, basis: str, seed: int) -> torch.Tensor:
    """The D x K matrix U of the construction, for the regenerable bases."""
    if dim >= num_vectors:
        if basis == "canonical":
            return torch.eye(dim, num_vectors, dtype=torch.float64)
        return random_orthonormal(dim, num_vectors, seed)
    # dim == num_vectors - 1: rotate the Helmert basis of the complement of 1.
    helmert = _helmert_rows(num_vectors)
    if basis == "canonical":
        return helmert
    return random_orthonormal(dim, dim, seed) @ helmert


def nearest_simplex_etf(weight: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The simplex ETF closest to `weight` (D x K) in Frobenius norm, and the optimal scale.

    Minimising ||W - s M|| over frames M = c U P reduces to maximising <W P, U> over isometries U: the
    orthogonal Procrustes problem, solved by the polar factor of the centred weight W P. The best scale
    is then s = <W, M> / ||M||^2 = <W, M> / K. Patching a pretrained layer with this frame keeps it as
    close as an ETF can be to what the layer had learned.
    """
    dim, num_vectors = weight.shape
    _check_shape(num_vectors, dim)
    centred = weight.detach().to(device="cpu", dtype=torch.float64) @ centering_matrix(num_vectors)
    left, _, right_t = torch.linalg.svd(centred, full_matrices=False)
    isometry = left @ right_t
    frame = math.sqrt(num_vectors / (num_vectors - 1)) * isometry @ centering_matrix(num_vectors)
    scale = float((weight.detach().to(device="cpu", dtype=torch.float64) * frame).sum() / num_vectors)
    return frame, scale


def simplex_etf(
    num_vectors: int,
    dim: int,
    basis: str = "orthogonal",
    seed: int = 0,
    weight: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A D x K simplex ETF: K unit columns in R^D with pairwise cosine exactly -1/(K-1).

    basis:
      * ``canonical``  - U = eye(D, K), the construction used by the paper's code;
      * ``orthogonal`` - U a seeded random isometry (same seed, same frame, in every process);
      * ``structured`` - U a seeded Walsh-Hadamard isometry drawn from signs and indices only, applicable
        matrix-free (see `structured_plan`); this returns its dense materialisation;
      * ``nearest``    - the frame nearest to ``weight`` (D x K), see `nearest_simplex_etf`.
    The frame is computed in float64 and cast to ``dtype`` at the end, so the float32 Gram is exact to
    rounding.
    """
    _check_shape(num_vectors, dim)
    if basis == "nearest":
        if weight is None:
            raise ValueError("basis='nearest' needs the weight to approximate: pass weight=(D x K tensor)")
        if tuple(weight.shape) != (dim, num_vectors):
            raise ValueError(f"basis='nearest': weight has shape {tuple(weight.shape)}, expected (D, K)=({dim}, {num_vectors})")
        return nearest_simplex_etf(weight)[0].to(dtype)
    if basis not in REGENERABLE_BASES:
        raise ValueError(f"unknown ETF basis {basis!r}; choose one of {', '.join(BASES)}")
    if basis == "structured":
        return structured_dense(structured_plan(num_vectors, dim, seed)).to(dtype)
    isometry = _isometry(num_vectors, dim, basis, seed)
    frame = math.sqrt(num_vectors / (num_vectors - 1)) * isometry @ centering_matrix(num_vectors)
    return frame.to(dtype)


def slot_seed(seed: int, slot_key: str) -> int:
    """Seed of one projection's frame, derived from the user's seed and the slot's identity.

    sha256, not hash(), because it must not vary between processes.
    """
    digest = hashlib.sha256(f"etf_hf:{seed}:{slot_key}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


# ---------------------------------------------------------------------------------------------------
# The structured basis: a Walsh-Hadamard isometry drawn from signs and indices only.
# ---------------------------------------------------------------------------------------------------
#
# U (D x K, orthonormal columns) = Perm_out . BlockHadamard_D . Signs . Embed_K->D, where
#   * Embed scatters the K (centred) inputs into K of the D coordinates. The slots are stratified over
#     the Hadamard blocks, about K*b/D of them into a block of size b (at least log2(b) where possible),
#     and assigned to the inputs by a random permutation: this is Perm_in . Embed, stored as one index
#     vector. Every block receives inputs, so every output coordinate depends on the input;
#   * Signs flips the sign of each input (stored per input, as +-1);
#   * BlockHadamard_D is block diagonal with orthonormal Sylvester-Hadamard blocks H_b / sqrt(b). The
#     blocks are the binary decomposition of D (3072 = 2048 + 1024, 768 = 512 + 256, an odd D ends with a
#     block of size 1), so every block is a power of two whatever D is: no dense fallback, no QR, nothing
#     but +-1 arithmetic, and at most log2(D)+1 blocks, the largest at least D/2 (so most outputs mix
#     many inputs);
#   * Perm_out is a seeded permutation of the D outputs.
# For D = K-1 (no D x K isometry exists) U = Perm_out . BlockHadamard . Signs . Perm_in . Helmert, with
# the Helmert rows (an orthonormal basis of the complement of 1) applied matrix-free by cumulative sums.
#
# Random draws come from SplitMix64 implemented here in pure Python, not from torch or `random`: the
# plan (indices and signs) depends on nothing a torch or Python release could change, so it is
# bit-for-bit the same everywhere (the frame's float values then agree to rounding), and a checkpoint
# never needs to store it.

#: Largest Hadamard factor applied as one small matmul (see `_structured_block_transform`).
STRUCTURED_MAX_FACTOR = 64
_STRUCTURED_MAX_DRAWS = 64
_MASK64 = (1 << 64) - 1


class StructuredPlan(NamedTuple):
    """Everything a structured frame is made of: O(D) integers, K signs and one small +-1 matrix.

    The frame is M = sqrt(K/(K-1)) U (I - 11^T/K), D x K, with U described above. Tensors may live on any
    device and the float ones in any dtype (all their entries are exactly +-1); `structured_plan` builds
    them on the CPU.
    """

    num_vectors: int  # K
    dim: int  # D
    blocks: tuple[int, ...]  # power-of-two Hadamard block sizes, in order along D (sum = D)
    helmert: bool  # D == K-1: inputs go through the Helmert basis instead of centring + embedding
    index: torch.Tensor  # (m,) int64: coordinate (of D) that input i lands on; m = K, or D if helmert
    signs: torch.Tensor  # (m,) +-1: sign of input i
    perm: torch.Tensor  # (D,) int64: output i is Hadamard coordinate perm[i]
    inverse: torch.Tensor  # (D,) int64: inverse of perm
    hadamard: torch.Tensor  # (F, F) Sylvester +-1 matrix; every block factor is a leading submatrix


class _SplitMix64:
    """SplitMix64 (Steele, Lea & Flood 2014), fully specified in a few lines, so reproducible forever."""

    def __init__(self, state: int) -> None:
        self.state = state & _MASK64

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        """Uniform integer in [0, n), without modulo bias (rejection of the top partial range)."""
        limit = (1 << 64) - ((1 << 64) % n)
        while True:
            value = self.next()
            if value < limit:
                return value % n

    def sample(self, n: int, k: int) -> list[int]:
        """k distinct values of range(n), in random order (partial Fisher-Yates)."""
        items = list(range(n))
        for i in range(k):
            j = i + self.below(n - i)
            items[i], items[j] = items[j], items[i]
        return items[:k]

    def signs(self, k: int) -> list[float]:
        out: list[float] = []
        while len(out) < k:
            word = self.next()
            out.extend(1.0 - 2.0 * ((word >> bit) & 1) for bit in range(min(64, k - len(out))))
        return out


def structured_blocks(dim: int) -> tuple[int, ...]:
    """The Hadamard block sizes of a structured frame in R^dim: the binary decomposition of dim, largest first."""
    return tuple(1 << bit for bit in reversed(range(dim.bit_length())) if dim >> bit & 1)


def _structured_factors(block: int, max_factor: int = STRUCTURED_MAX_FACTOR) -> tuple[int, ...]:
    """Split a power-of-two block into as few power-of-two factors <= max_factor as possible, as equal
    as possible (for 64: 1024 -> 32 x 32, 2048 -> 64 x 32, 8192 -> 32 x 16 x 16); () for a block of 1."""
    bits = block.bit_length() - 1
    max_bits = max_factor.bit_length() - 1
    count = -(-bits // max_bits)
    return tuple(1 << (bits // count + (i < bits % count)) for i in range(count))


def structured_hadamard_size(dim: int) -> int:
    """Side of the Sylvester matrix a structured plan in R^dim carries (its largest block factor)."""
    return max((f for block in structured_blocks(dim) for f in _structured_factors(block)), default=1)


def sylvester_hadamard(size: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = "cpu"
                       ) -> torch.Tensor:
    """The size x size Sylvester-Hadamard matrix, H[i, j] = (-1)^popcount(i & j) (size a power of two)."""
    if size < 1 or size & (size - 1):
        raise ValueError(f"a Sylvester-Hadamard matrix needs a power-of-two size, got {size}")
    rows = torch.arange(size, device=device)
    bits = rows[:, None] & rows[None, :]
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return (1 - 2 * parity).to(dtype)


def _gf2_rank(values: list[int]) -> int:
    """Rank over GF(2) of integers read as bit vectors (xor basis)."""
    basis: dict[int, int] = {}
    for value in values:
        while value:
            top = value.bit_length() - 1
            if top not in basis:
                basis[top] = value
                break
            value ^= basis[top]
    return len(basis)


def _structured_counts(inputs: int, blocks: tuple[int, ...]) -> list[int]:
    """How many inputs each block gets: proportional to its size (largest remainder), then at least
    min(b, log2 b, 1) per block as far as the inputs allow (a block of size 2^a needs a inputs whose
    offsets span GF(2)^a for its rows to be distinct), taken from the block with the largest surplus."""
    dim = sum(blocks)
    counts = [inputs * block // dim for block in blocks]
    order = sorted(range(len(blocks)), key=lambda j: (-(inputs * blocks[j] % dim), j))
    for j in order[:inputs - sum(counts)]:
        counts[j] += 1
    for floor in (lambda b: 1, lambda b: max(1, b.bit_length() - 1)):
        minimum = [min(block, floor(block)) for block in blocks]
        if sum(minimum) > inputs:
            break
        for j in range(len(blocks)):
            while counts[j] < minimum[j]:
                donor = max(range(len(blocks)), key=lambda i: (counts[i] - minimum[i], -i))
                counts[donor] -= 1
                counts[j] += 1
    return counts


def structured_plan(num_vectors: int, dim: int, seed: int = 0) -> StructuredPlan:
    """The seeded description of a structured simplex ETF of K=num_vectors vectors in R^D (D >= K-1).

    Deterministic in (K, D, seed) on every machine (pure-Python SplitMix64, no floating point in the
    draws). Draws are rejected, deterministically, until every Hadamard block's input offsets span
    GF(2)^log2(b) (so no two outputs of a block see the input through the same row: the activated hidden
    features have full rank) and, when one block holds all inputs, no output row is constant (it would
    vanish after centring); only a tiny K (fewer inputs than log2 of a block) can make that impossible,
    and then the last draw is kept: it is still an exact simplex ETF.
    """
    _check_shape(num_vectors, dim)
    helmert = dim == num_vectors - 1
    inputs = dim if helmert else num_vectors
    blocks = structured_blocks(dim)
    digest = hashlib.sha256(f"etf_hf:structured:{int(seed)}:{num_vectors}:{dim}".encode()).digest()
    rng = _SplitMix64(int.from_bytes(digest[:8], "little"))
    slots: list[int] = []
    block_slots: list[list[int]] = []
    offset = 0
    for block, count in zip(blocks, _structured_counts(inputs, blocks)):
        bits = block.bit_length() - 1
        for _ in range(_STRUCTURED_MAX_DRAWS):
            chosen = rng.sample(block, count)
            if count < bits or _gf2_rank(chosen) == bits:
                break
        block_slots.append(chosen)
        slots.extend(offset + c for c in chosen)
        offset += block
    assignment = rng.sample(inputs, inputs)
    index = [slots[a] for a in assignment]
    holder = [j for j, chosen in enumerate(block_slots) if chosen]
    hadamard = sylvester_hadamard(structured_hadamard_size(dim))
    for _ in range(_STRUCTURED_MAX_DRAWS):
        signs = rng.signs(inputs)
        if helmert or len(holder) != 1 or inputs < 2:
            break
        block = blocks[holder[0]]
        start = sum(blocks[:holder[0]])
        embedded = torch.zeros(block, dtype=torch.float64)
        embedded[torch.tensor(index) - start] = torch.tensor(signs, dtype=torch.float64)
        rows = _structured_block_transform(embedded[None], block, hadamard) * math.sqrt(block)
        if bool((rows.abs() < inputs - 0.5).all()):  # row sums of +-1 entries: == K only if constant
            break
    perm = rng.sample(dim, dim)
    inverse = [0] * dim
    for position, source in enumerate(perm):
        inverse[source] = position
    return StructuredPlan(
        num_vectors=num_vectors, dim=dim, blocks=blocks, helmert=helmert,
        index=torch.tensor(index, dtype=torch.int64), signs=torch.tensor(signs, dtype=torch.float64),
        perm=torch.tensor(perm, dtype=torch.int64), inverse=torch.tensor(inverse, dtype=torch.int64),
        hadamard=hadamard,
    )


def _structured_block_transform(z: torch.Tensor, block: int, hadamard: torch.Tensor) -> torch.Tensor:
    """z (M, b) @ (H_b / sqrt(b)) for one power-of-two block, H_b = H_f1 (x) H_f2 (x) ... (Sylvester).

    A fast Walsh-Hadamard transform by Kronecker factors: the block is viewed as (M, f1, rest), the
    rest is transformed recursively and the f1 axis by one small dense matmul (f <= 64). That is
    sum(f) multiply-adds per element (64 for b = 1024, vs log2(b) = 10 add/sub stages of the textbook
    butterfly), but in len(factors) = 2 passes over memory instead of log2(b) (each butterfly stage also
    needs a stack/cat copy). Measured on a shared 2-core CPU, fp32, 2048 rows x 3072: ~100-170 ms for
    the factored transform vs ~800-1100 ms for the reshape/add butterfly and ~400 ms for the dense
    768 x 3072 matmul. On a GPU the transform is memory-bound either way and the small matmuls are
    cheap (tensor cores), so fewer passes win there too. In 16-bit dtypes there are only len(factors)
    roundings (matmuls accumulate in fp32), not log2(b). With TF32 matmuls enabled the factors run in
    TF32, exactly like a dense fp32 frame would.
    """
    factors = _structured_factors(block)
    if not factors:
        return z
    first = factors[0]
    h = hadamard[:first, :first].to(z.dtype) * (first ** -0.5)
    if len(factors) == 1:
        return z @ h
    rest = block // first
    inner = _structured_block_transform(z.reshape(-1, rest), rest, hadamard)
    return torch.matmul(h, inner.reshape(-1, first, rest)).reshape(-1, block)


def _structured_hadamard(z: torch.Tensor, plan: StructuredPlan) -> torch.Tensor:
    """(..., D) -> (..., D): the orthonormal block-diagonal Hadamard transform (symmetric, its own inverse)."""
    lead = z.shape[:-1]
    flat = z.reshape(-1, plan.dim)
    parts = []
    offset = 0
    for block in plan.blocks:
        parts.append(_structured_block_transform(flat[:, offset:offset + block], block, plan.hadamard))
        offset += block
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    return out.reshape(*lead, plan.dim)


def _helmert_weights(num_vectors: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    steps = torch.arange(1, num_vectors, device=like.device, dtype=like.dtype)
    return steps, torch.rsqrt(steps * (steps + 1))


def _helmert_apply(x: torch.Tensor) -> torch.Tensor:
    """(..., K) -> (..., K-1): x @ Helmert^T, the coordinates of x in the complement of 1 (cumulative sums)."""
    steps, weights = _helmert_weights(x.shape[-1], x)
    return (x.cumsum(-1)[..., :-1] - steps * x[..., 1:]) * weights


def _helmert_apply_t(v: torch.Tensor) -> torch.Tensor:
    """(..., K-1) -> (..., K): v @ Helmert, the transpose of `_helmert_apply`."""
    num_vectors = v.shape[-1] + 1
    steps, weights = _helmert_weights(num_vectors, v)
    scaled = torch.nn.functional.pad(v * weights, (1, 0))  # u_0 = 0, u_i = v_(i-1) / sqrt(i (i+1))
    tail_sums = scaled.flip(-1).cumsum(-1).flip(-1)  # sum_(i >= j) u_i
    positions = torch.nn.functional.pad(steps, (1, 0))  # j = 0 .. K-1
    return tail_sums - (positions + 1) * scaled


def _reference_apply(x: torch.Tensor, plan: StructuredPlan) -> torch.Tensor:
    """x @ M^T straight from the plan (scatter, Hadamard blocks with the plan's own factors, gather).

    The definition the frame values are pinned to (`structured_dense` materialises through it, so frames
    stay bit-for-bit what every release computed); layers use the faster `structured_apply`.
    """
    scale = math.sqrt(plan.num_vectors / (plan.num_vectors - 1))
    inputs = _helmert_apply(x) if plan.helmert else x - x.mean(-1, keepdim=True)
    return _structured_rotate(inputs, plan, scale)


def _structured_rotate(inputs: torch.Tensor, plan: StructuredPlan, scale: float) -> torch.Tensor:
    """(..., m) -> (..., D): scale * Perm_out . BlockHadamard . Signs . Embed applied to each row."""
    signs = plan.signs.to(inputs.dtype) * scale
    z = inputs.new_zeros(*inputs.shape[:-1], plan.dim).index_copy_(-1, plan.index, inputs * signs)
    return _structured_hadamard(z, plan).index_select(-1, plan.perm)


# ---------------------------------------------------------------------------------------------------
# The fast transform: the same linear map as the plan, arranged for speed.
# ---------------------------------------------------------------------------------------------------
#
# Activations are transformed *feature-major*, as (features, rows) matrices. Then
#   * every gather (the input embedding, Perm_out, and their transposes) selects whole rows: a memcpy
#     per feature, where selecting columns of a (rows, features) matrix is a strided gather (measured
#     ~8-20x slower on CPU for 1024 x 2048 fp32);
#   * a Hadamard block's rows are a contiguous slice, and H_b = H_f1 (x) H_f2 (x) ... (Sylvester matrices
#     factorise over any split of the index bits, so the fast path picks its own factors) is applied as
#     one GEMM per factor, H_f @ Z viewed as (before, f, after): no transpose between factors;
#   * the input embedding (a scatter of the K inputs into D slots) is one row gather from the input padded
#     with a zero row.
# Only the narrow (K-wide) side is transposed on the way in or out; the fused FFN (`etf_hf.ffn`) keeps
# its 4d-wide hidden activation feature-major from the up-projection to the down-projection.

#: Largest Kronecker factor of the fast transform: sum(factors) multiply-adds per element in
#: len(factors) GEMMs (2048 -> 64 x 32: 96 in 2 GEMMs; 16 x 16 x 8: 40 in 3; 8 x 8 x 8 x 4: 28 in 4).
#: Measured on the shared 2-core CPU (fp32, feature-major 2048 x 1024, one thread, best of 9, a loaded
#: machine, so roughly): 8 ~15 ms, 16 ~16 ms, 64 ~25 ms; the dense 1024 x 512 x 2048 GEMM ~90 ms.
FAST_MAX_FACTOR = 16


class StructuredOperator(NamedTuple):
    """A structured frame arranged for applying it fast (see `structured_operator`).

    ``layout`` = (K, D, helmert, blocks, factors per block) is static and hashable (torch.compile
    specialises on it); the tensors may live on any device and the float ones in any dtype (their
    entries are exactly +-1).
    """

    layout: tuple
    spread: torch.Tensor  # (D,) int64: Hadamard input coordinate <- input slot; m (the zero pad) if none
    perm: torch.Tensor  # (D,) int64: output i is Hadamard coordinate perm[i]
    inverse: torch.Tensor  # (D,) int64: inverse of perm
    index: torch.Tensor  # (m,) int64: Hadamard coordinate that input i lands on
    signs: torch.Tensor  # (m,) +-1
    hadamard: torch.Tensor  # (F, F) Sylvester +-1 matrix, F = the largest fast factor


def structured_operator_layout(num_vectors: int, dim: int, max_factor: int = FAST_MAX_FACTOR) -> tuple:
    """The static part of a `StructuredOperator`: (K, D, helmert, blocks, fast factors per block)."""
    blocks = structured_blocks(dim)
    factors = tuple(_structured_factors(block, max_factor) for block in blocks)
    return (num_vectors, dim, dim == num_vectors - 1, blocks, factors)


def structured_operator_sizes(layout: tuple) -> dict[str, tuple[int, ...]]:
    """Shapes of an operator's tensors, by field name (to allocate them, e.g. on the meta device)."""
    num_vectors, dim, helmert, _, factors = layout
    inputs = dim if helmert else num_vectors
    size = max((f for block_factors in factors for f in block_factors), default=1)
    return {"spread": (dim,), "perm": (dim,), "inverse": (dim,), "index": (inputs,), "signs": (inputs,),
            "hadamard": (size, size)}


def structured_operator(plan: StructuredPlan, max_factor: int = FAST_MAX_FACTOR) -> StructuredOperator:
    """The fast form of ``plan``: the same linear map, the same indices and signs (on the CPU)."""
    inputs = plan.index.numel()
    layout = structured_operator_layout(plan.num_vectors, plan.dim, max_factor)
    index = plan.index.cpu()
    spread = torch.full((plan.dim,), inputs, dtype=torch.int64)
    spread[index] = torch.arange(inputs)
    size = structured_operator_sizes(layout)["hadamard"][0]
    return StructuredOperator(
        layout=layout, spread=spread, perm=plan.perm.cpu().clone(), inverse=plan.inverse.cpu().clone(),
        index=index.clone(), signs=plan.signs.cpu().clone(), hadamard=sylvester_hadamard(size),
    )


def _fast_hadamard(z: torch.Tensor, factors: tuple[int, ...], matrices: dict[int, torch.Tensor]) -> torch.Tensor:
    """(b, N) -> H_b @ z, *unnormalised* (+-1 entries; `input_scales` carries each block's 1/sqrt(b)): one
    GEMM per Kronecker factor (``matrices[f]`` = H_f), no transposes, no per-factor scaling op. The first
    factor is a plain ``mm``: faster than the broadcast batched matmul at every width measured (H16 on a
    2048 x 1024 activation: 0.49 against 0.57 ms; 3.7 against 5.6 us on one column)."""
    block, cols = z.shape
    before = 1
    for f in factors:
        z = torch.mm(matrices[f], z.reshape(f, -1)) if before == 1 else torch.matmul(matrices[f], z.reshape(before, f, -1))
        before *= f
    return z.reshape(block, cols)


_SANDWICH_MAX_ROWS = 256


def _sandwich(blocks: tuple[int, ...]) -> int | None:
    """c of the single-column transform (`Derived.sandwich`), or None where it does not apply: the largest
    power of two <= sqrt(largest block) that divides every block, if the left matrix (D/c wide) stays
    small (<= 256); odd D (a block of 1) keeps the Kronecker factors."""
    cols = min(1 << (max(blocks).bit_length() - 1) // 2, min(blocks))
    return cols if cols > 1 and sum(blocks) // cols <= _SANDWICH_MAX_ROWS else None


class Derived(NamedTuple):
    """What every application of an operator in one dtype needs besides its index tensors."""

    scales: torch.Tensor  # (m,): `input_scales`
    scale_column: torch.Tensor  # (m, 1): the same view, made once (a dispatch fewer per call)
    matrices: dict[int, torch.Tensor]  # Kronecker factor size -> its Sylvester matrix, in the dtype
    #: (c, L, H_c) for a single column (N = 1: one token, as in batch-1 generation): z (D,) viewed as
    #: Z (D/c, c) has every block b as its own b/c consecutive rows, so BlockHadamard z = L Z H_c with
    #: L = blockdiag(H_(b/c)) (H_b = H_(b/c) (x) H_c, Sylvester matrices symmetric): two small GEMMs for
    #: the whole transform, where the factors take one per factor and block plus a concatenation. Their
    #: extra multiply-adds are nothing at one column; the dispatches they save are most of the cost there.
    #: None: no such c (`_sandwich`).
    sandwich: tuple[int, torch.Tensor, torch.Tensor] | None
    #: (D,) each Hadamard input coordinate's input slot (0 where none) and its scale (0 where none): a
    #: single row spread and scaled in one gather and one multiplication, with no zero-padded copy.
    spread_from: torch.Tensor
    spread_scales: torch.Tensor


#: id(first key tensor) -> {tag: (weak references to the key tensors, their versions, value)}: `memoised`.
_MEMO: dict[int, dict[Hashable, tuple[tuple[weakref.ref, ...], tuple[int, ...], Any]]] = {}


def memoised(tensors: tuple[torch.Tensor, ...], tag: Hashable, compute: Callable[[], Any]) -> Any:
    """``compute()``, computed once for as long as ``tensors`` stay the same tensors with the same contents.

    For values derived from fixed buffers (a structured operator's scales, factor matrices, composite
    orders) that would otherwise be rebuilt on every call: at batch 1 (one generated token) rebuilding
    them took longer than the GEMMs they feed. An entry holds weak references to ``tensors`` and their
    in-place versions: a buffer replaced (``model.to``) or rewritten in place (a reload, `reset_frame`)
    recomputes it, and it goes when the first tensor does (a finalizer; not a WeakKeyDictionary, which
    compares keys with ``==``, elementwise for tensors). A write through ``.data`` bumps no version and
    would go unseen: key only tensors nothing rewrites that way (fixed buffers, which etf_hf rewrites
    only through `reset_frame`), never trainable parameters (gradcheck and old-style optimizers write
    them through ``.data``). Under torch.compile ``compute()`` runs in the graph instead (no cache to
    guard; constants fold). The value must not hold ``tensors`` themselves (copy them): it would keep
    its own first key alive, and the entry would outlive the buffers' owner.
    """
    if torch.compiler.is_compiling():
        return compute()
    entries = _MEMO.get(id(tensors[0]))
    cached = None if entries is None else entries.get(tag)
    if cached is not None and _still_valid(cached, tensors):
        return cached[2]
    if entries is None:
        entries = _MEMO[id(tensors[0])] = {}
        weakref.finalize(tensors[0], _MEMO.pop, id(tensors[0]), None)
    # Ordinary tensors even when first asked for under inference_mode (generate() before training):
    # an inference tensor may not be saved for backward by a later differentiable call.
    with torch.inference_mode(False), torch.no_grad():
        value = compute()
    entries[tag] = (tuple(map(weakref.ref, tensors)), tuple(t._version for t in tensors), value)
    return value


def _still_valid(cached: tuple, tensors: tuple[torch.Tensor, ...]) -> bool:
    """Whether a `memoised` entry was computed from these very tensors at their current versions (a plain
    loop: this runs several times per batch-1 decoding step, where a generator's set-up shows)."""
    for ref, version, tensor in zip(cached[0], cached[1], tensors):
        if ref() is not tensor or tensor._version != version:
            return False
    return True


def derived_of(op: StructuredOperator, dtype: torch.dtype) -> Derived:
    """What applying ``op`` in ``dtype`` needs besides its index tensors (`Derived`), once per operator
    buffer and dtype (`memoised`): rebuilt per call, it cost more than the ops it feeds at batch 1."""
    return memoised((op.signs, op.index, op.hadamard, op.spread), ("derived", dtype), lambda: _derive(op, dtype))


def _derive(op: StructuredOperator, dtype: torch.dtype) -> Derived:
    """`Derived` of ``op`` in ``dtype``: scales, the factor matrices (the layout's and the single-column
    sandwich's, all from ``op.hadamard``) and the one-row spread."""
    hadamard = op.hadamard.to(dtype)
    sizes = sorted({f for block_factors in op.layout[4] for f in block_factors})
    blocks = op.layout[3]
    cols = _sandwich(blocks)
    sandwich = None if cols is None else (
        cols, torch.block_diag(*(_sylvester_from(hadamard, block // cols) for block in blocks)),
        _sylvester_from(hadamard, cols))
    scales = input_scales(op, dtype)
    empty = op.spread == scales.shape[0]
    spread_from = op.spread.masked_fill(empty, 0)
    spread_scales = scales.index_select(0, spread_from).masked_fill(empty, 0)
    return Derived(scales, scales[:, None], {size: _sylvester_from(hadamard, size) for size in sizes}, sandwich,
                    spread_from, spread_scales)


def _sylvester_from(hadamard: torch.Tensor, size: int) -> torch.Tensor:
    """H_size from the F x F Sylvester matrix ``hadamard``: a leading slice, or Kronecker products of
    slices (H_ab = H_a (x) H_b) for sizes above F; on its device and in its dtype, traceable."""
    largest = hadamard.shape[0]
    out = hadamard[:min(size, largest), :min(size, largest)]
    while out.shape[0] < size:
        step = min(largest, size // out.shape[0])
        out = torch.kron(out, hadamard[:step, :step])
    return out.contiguous()


def _fast_blocks(rows: torch.Tensor, source: torch.Tensor | None, op: StructuredOperator,
                 derived: Derived) -> torch.Tensor:
    """(D, N) = unnormalised BlockHadamard @ rows[source] (``source`` None: rows as they are): one row
    gather, then each block (a row slice) transformed on its own (a single row where the two-GEMM
    single-column transform applies never comes here: `structured_rows_apply`).

    A Python loop over the blocks of the binary decomposition of D: one block when D is a power of two
    (every FFN of width 2^k), never more than log2(D) + 1, and static (unrolled by torch.compile).
    """
    blocks, factors = op.layout[3], op.layout[4]
    if source is not None:
        rows = rows.index_select(0, source)  # one gather for every block: each block is then a row slice
    parts, offset = [], 0
    for block, block_factors in zip(blocks, factors):
        parts.append(_fast_hadamard(rows[offset:offset + block], block_factors, derived.matrices))
        offset += block
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def input_scales(op: StructuredOperator, dtype: torch.dtype) -> torch.Tensor:
    """(m,): each input's sign times sqrt(K/(K-1)) times 1/sqrt(b) of the Hadamard block b it lands in.

    The normalisations of the orthonormal block Hadamard transform, folded into the one multiplication
    on the narrow (m-wide) side that the signs need anyway: the fast transform then multiplies by +-1
    matrices only, with no scaling op per Kronecker factor (at batch 1 those ops cost more than the GEMMs).
    Computed once per operator and dtype by `derived_of`.
    """
    blocks = op.layout[3]
    scale = structured_scale(op)
    signs = op.signs.to(dtype)
    if len(blocks) == 1:
        return signs * (scale * blocks[0] ** -0.5)
    ends = itertools.accumulate(blocks)
    scaled = signs * (scale * blocks[-1] ** -0.5)  # in dtype, and no tensor built from Python values
    for end, block in reversed(list(zip(ends, blocks[:-1]))):
        scaled = torch.where(op.index < end, signs * (scale * block ** -0.5), scaled)
    return scaled


def spread_rows(rows: torch.Tensor, op: StructuredOperator, order: torch.Tensor | None, derived: Derived) -> torch.Tensor:
    """(m, N) -> (D, N): Perm_out . BlockHadamard . Embed, feature-major (signs and scales, `input_scales`,
    not applied). Output row i is Hadamard coordinate ``order[i]``: ``op.perm`` gives the frame's own
    rows; another order lets a caller keep a hidden activation in one frame's Hadamard coordinates
    (`etf_hf.ffn`), None leaves this frame's Hadamard coordinates (no gather)."""
    padded = rows.new_empty(rows.shape[0] + 1, rows.shape[1])  # copy_ transposes ~4x faster than cat
    padded[:-1].copy_(rows)
    padded[-1].zero_()
    out = _fast_blocks(padded, op.spread, op, derived)
    return out if order is None else out.index_select(0, order)


def collect_rows(rows: torch.Tensor, op: StructuredOperator, order: torch.Tensor | None, derived: Derived) -> torch.Tensor:
    """(D, N) -> (m, N): the transpose of `spread_rows`, feature-major. Hadamard coordinate j reads row
    ``order[j]`` (``op.inverse`` for the frame's own rows; None: the rows are Hadamard coordinates)."""
    return _fast_blocks(rows, order, op, derived).index_select(0, op.index)


def structured_scale(op: StructuredOperator) -> float:
    """sqrt(K / (K-1)), the factor that makes the frame's centred columns unit vectors."""
    return math.sqrt(op.layout[0] / (op.layout[0] - 1))


def centred(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x minus its mean along ``dim``, as one subtraction of the scaled sum (``mean`` dispatches three ops)."""
    return x.sub(x.sum(dim, keepdim=True), alpha=1.0 / x.shape[dim])


def _single_row(derived: Derived, rows: torch.Tensor) -> bool:
    """Whether `structured_rows_apply(_t)` takes the one-row path: one row (a batch-1 decoding step) and
    the two-GEMM single-column transform available (`_sandwich`)."""
    return rows.shape[0] == 1 and derived.sandwich is not None


def _sandwiched(z: torch.Tensor, derived: Derived) -> torch.Tensor:
    """(D,) -> (D,): the unnormalised block Hadamard transform of one column, L Z H_c (`Derived.sandwich`)."""
    cols, left, right = derived.sandwich
    return torch.mm(left, torch.mm(z.view(-1, cols), right)).view(-1)


def structured_rows_apply(x: torch.Tensor, op: StructuredOperator, order: torch.Tensor | None = None,
                          hadamard_order: bool = False) -> torch.Tensor:
    """x @ M^T for a 2-D x, (n, K) -> (n, D), returned as the transposed view of a contiguous
    feature-major (D, n) matrix; x may itself be such a view (it is then read without a copy).
    ``order``: the output columns' order (`spread_rows`; default ``op.perm``, M's own rows);
    ``hadamard_order``: leave the columns in M's Hadamard coordinates (no gather).

    One row (a batch-1 decoding step, whose cost is its op count) is spread straight into the Hadamard
    coordinates with its scales (`Derived.spread_from`): one 1-D gather and one multiplication where the
    general path multiplies, transposes, pads and gathers rows of a (m, 1) matrix (torch's per-row loop,
    ~3x slower), then the two-GEMM single-column transform: 6 compute ops in all. The same frame, to float
    rounding: the two GEMMs sum in another order than the general path's Kronecker factors."""
    derived = derived_of(op, x.dtype)
    target = None if hadamard_order else (op.perm if order is None else order)
    inputs = _helmert_apply(x) if op.layout[2] else centred(x, -1)
    if _single_row(derived, x):
        out = spread_row(inputs.reshape(-1), derived)
        return (out if target is None else out.index_select(0, target)).view(1, -1)
    return spread_rows((inputs * derived.scales).t(), op, target, derived).t()


def spread_row(inputs: torch.Tensor, derived: Derived) -> torch.Tensor:
    """(m,) centred (or Helmert) inputs -> (D,) in the Hadamard coordinates: one gather with the scales,
    then the two-GEMM single-column transform (``derived.sandwich`` must exist)."""
    return _sandwiched(inputs.index_select(0, derived.spread_from) * derived.spread_scales, derived)


def collect_row(y: torch.Tensor, source: torch.Tensor | None, index: torch.Tensor, derived: Derived) -> torch.Tensor:
    """(D,) -> (m,), the transpose of `spread_row` before centring: y read through ``source`` (None: y is
    in the Hadamard coordinates), transformed, the inputs' coordinates (``index``, the operator's) scaled."""
    out = _sandwiched(y if source is None else y.index_select(0, source), derived)
    return out.index_select(0, index) * derived.scales


def structured_rows_apply_t(y: torch.Tensor, op: StructuredOperator, order: torch.Tensor | None = None,
                            hadamard_order: bool = False) -> torch.Tensor:
    """y @ M for a 2-D y, (n, D) -> (n, K), feature-major like `structured_rows_apply`: a feature-major
    y costs no transpose, and the result is the transposed view of a contiguous (K, n) matrix.
    ``order``: which column of y each Hadamard coordinate reads (`collect_rows`; default ``op.inverse``,
    M's own rows); ``hadamard_order``: y's columns are already M's Hadamard coordinates (no gather).
    One row takes the single-column transform with one-dimensional gathers (`structured_rows_apply`)."""
    source = None if hadamard_order else (op.inverse if order is None else order)
    derived = derived_of(op, y.dtype)
    if _single_row(derived, y):
        rows = collect_row(y.reshape(-1), source, op.index, derived).view(-1, 1)
    else:
        rows = collect_rows(y.t().contiguous(), op, source, derived) * derived.scale_column
    if op.layout[2]:
        return _helmert_apply_t(rows.t())
    return centred(rows, 0).t()


def structured_apply(x: torch.Tensor, op: StructuredOperator) -> torch.Tensor:
    """x @ M^T for the structured frame M (D x K) of ``op``: (..., K) -> (..., D), matrix-free.

    This is the forward of an up-projection (weight M, K = in < out = D) and the input gradient of a
    down-projection (weight M^T). Computed in x's dtype (cast the result yourself under autocast);
    differentiable by autograd. Cost: O(n D sum(factors)) flops, a few passes over n x D memory,
    no D x K matrix anywhere; the result is contiguous.
    """
    num_vectors, dim = op.layout[:2]
    if x.shape[-1] != num_vectors:
        raise ValueError(f"structured_apply: last dim {x.shape[-1]} != K={num_vectors}")
    out = structured_rows_apply(x.reshape(-1, num_vectors), op)
    return out.contiguous().reshape(*x.shape[:-1], dim)


def structured_apply_t(y: torch.Tensor, op: StructuredOperator) -> torch.Tensor:
    """y @ M for the structured frame M (D x K) of ``op``: (..., D) -> (..., K), matrix-free.

    The forward of a down-projection (weight M^T, D = in > out = K) and the input gradient of an
    up-projection; the exact transpose of `structured_apply`.
    """
    num_vectors, dim = op.layout[:2]
    if y.shape[-1] != dim:
        raise ValueError(f"structured_apply_t: last dim {y.shape[-1]} != D={dim}")
    out = structured_rows_apply_t(y.reshape(-1, dim), op)
    return out.contiguous().reshape(*y.shape[:-1], out.shape[-1])


def _float64_plan(plan: StructuredPlan) -> StructuredPlan:
    """The same plan with float64 signs and Hadamard, for exact dense materialisation."""
    return plan._replace(signs=plan.signs.to(torch.float64), hadamard=plan.hadamard.to(torch.float64))


def structured_isometry(plan: StructuredPlan, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The D x K matrix U of ``plan``, dense: orthonormal columns (D >= K), or for D = K-1 orthonormal
    rows spanning the complement of the all-ones vector. The frame is sqrt(K/(K-1)) U (I - 11^T/K)."""
    eye = torch.eye(plan.num_vectors, dtype=torch.float64, device=plan.signs.device)
    inputs = _helmert_apply(eye) if plan.helmert else eye
    return _structured_rotate(inputs, _float64_plan(plan), 1.0).t().contiguous().to(dtype)


def structured_dense(plan: StructuredPlan, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The D x K frame of ``plan`` as a dense matrix (materialised in float64, then cast)."""
    eye = torch.eye(plan.num_vectors, dtype=torch.float64, device=plan.signs.device)
    return _reference_apply(eye, _float64_plan(plan)).t().contiguous().to(dtype)
