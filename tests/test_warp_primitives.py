"""csrc/mma.cuh's instructions as the CPU run (tests/cuda_on_cpu/) models them: mma.sync
m16n8k16, ldmatrix and cp.async, lane by lane against the PTX ISA's fragment tables
(transcribed here from the ISA's own formulas, independently of the emulator's code), and
composed as the attention kernels compose them, against torch's matmul.

Tolerance of the products: the model sums the 16 exact products (bf16 x bf16 and fp16 x fp16
are exact in fp32) and the accumulator in fp32, one rounding per addition: at most 16
roundings, so |error| <= 16 * 2^-24 * (|C| + sum_k |A_ik B_kj|) elementwise (rounding-error
analysis of recursive summation). A layout mistake moves whole products and misses this by
orders of magnitude."""

import pytest
import torch

pytestmark = pytest.mark.usefixtures("kernels_on_cpu")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


# --- the PTX ISA's tables ("Matrix Fragments for mma.m16n8k16 with floating point type"):
# element i of a lane's fragment (two per 32-bit register, i even in the low half), with
# groupID = lane >> 2 and threadID_in_group = lane % 4.

def a_row_col(lane: int, i: int) -> tuple[int, int]:
    """A (16 x 16, .f16/.bf16): element a_i, i in 0..7."""
    group, tig = lane >> 2, lane % 4
    row = group if (i < 2 or 4 <= i < 6) else group + 8
    col = tig * 2 + (i & 1) + (8 if i >= 4 else 0)
    return row, col


def b_row_col(lane: int, i: int) -> tuple[int, int]:
    """B (16 x 8): element b_i, i in 0..3, as (k, n)."""
    group, tig = lane >> 2, lane % 4
    return tig * 2 + (i & 1) + (8 if i >= 2 else 0), group


def c_row_col(lane: int, i: int) -> tuple[int, int]:
    """C, D (16 x 8 fp32): element c_i, i in 0..3."""
    group, tig = lane >> 2, lane % 4
    return (group if i < 2 else group + 8), tig * 2 + (i & 1)


def bits(x: torch.Tensor) -> torch.Tensor:
    """The 16-bit patterns of a bf16/fp16 tensor, as int64 in [0, 2^16)."""
    return x.view(torch.int16).long() & 0xFFFF


def registers(matrix: torch.Tensor, row_col, count: int) -> torch.Tensor:
    """(32, count // 2) int32: each lane's registers, element 2r in the low half of r."""
    m = bits(matrix)
    regs = torch.zeros(32, count // 2, dtype=torch.int64)
    for lane in range(32):
        for i in range(count):
            regs[lane, i // 2] |= m[row_col(lane, i)] << (16 * (i % 2))
    return regs.to(torch.int32)  # wraps the high bit: the same 32-bit pattern


def product_bound(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return 16 * 2.0 ** -24 * (c.double().abs() + a.double().abs() @ b.double().abs())


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_mma_computes_d_from_the_isa_s_fragments(kernels_on_cpu, dtype):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=g).to(DTYPES[dtype])
    b = torch.randn(16, 8, generator=g).to(DTYPES[dtype])
    c = torch.randn(16, 8, generator=g)
    acc_in = torch.tensor([[c[c_row_col(lane, i)] for i in range(4)] for lane in range(32)])
    acc = kernels_on_cpu.mma_lanes(registers(a, a_row_col, 8), registers(b, b_row_col, 4),
                                   acc_in, dtype)
    d = torch.empty(16, 8)
    for lane in range(32):
        for i in range(4):
            d[c_row_col(lane, i)] = acc[lane, i]
    want = a.double() @ b.double() + c.double()
    assert ((d.double() - want).abs() <= product_bound(a, b, c)).all()


def test_mma_is_not_fooled_by_symmetric_data(kernels_on_cpu):
    # one nonzero element per operand: D must have it at exactly (row, col)
    a = torch.zeros(16, 16, dtype=torch.bfloat16)
    b = torch.zeros(16, 8, dtype=torch.bfloat16)
    a[11, 5] = 2.0
    b[5, 6] = 3.0
    acc = kernels_on_cpu.mma_lanes(registers(a, a_row_col, 8), registers(b, b_row_col, 4),
                                   torch.zeros(32, 4), "bfloat16")
    nonzero = [(c_row_col(lane, i), acc[lane, i].item()) for lane in range(32)
               for i in range(4) if acc[lane, i] != 0]
    assert nonzero == [((11, 6), 6.0)]


def tile_and_offsets(matrices: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    tile = torch.randint(-2 ** 15, 2 ** 15, (8 * matrices, 8), generator=g, dtype=torch.int16)
    # lane 8i + j gives matrix i's row j; rows stored shuffled, so that the lane-to-row
    # assignment matters
    stored_at = torch.randperm(8 * matrices, generator=g)
    stored = torch.empty_like(tile)
    stored[stored_at] = tile
    offsets = torch.zeros(32, dtype=torch.int32)
    offsets[:8 * matrices] = stored_at.int() * 8
    return tile, stored, offsets


@pytest.mark.parametrize("trans", [False, True], ids=["rows", "trans"])
@pytest.mark.parametrize("matrices", [1, 2, 4])
def test_ldmatrix_gives_each_lane_its_elements(kernels_on_cpu, matrices, trans):
    tile, stored, offsets = tile_and_offsets(matrices, matrices + 10 * trans)
    got = kernels_on_cpu.ldmatrix_lanes(stored, offsets, matrices, trans).long() & 0xFFFFFFFF
    m = tile.long() & 0xFFFF
    for lane in range(32):
        group, tig = lane >> 2, lane % 4
        for i in range(matrices):
            rows = m[8 * i:8 * i + 8]
            if trans:   # the transpose's (row group, columns 2 tig, 2 tig + 1)
                low, high = rows[2 * tig, group], rows[2 * tig + 1, group]
            else:       # (row group, columns 2 tig, 2 tig + 1)
                low, high = rows[group, 2 * tig], rows[group, 2 * tig + 1]
            assert got[lane, i].item() == (low | high << 16).item(), (lane, i)


def test_ldmatrix_rejects_a_misaligned_row_and_ignores_unused_lanes(kernels_on_cpu):
    tile, stored, offsets = tile_and_offsets(1, 3)
    offsets[8:] = 4  # lanes 8.. give no address to .x1: PTX ignores them
    kernels_on_cpu.ldmatrix_lanes(stored, offsets, 1, False)
    offsets[3] += 4  # 8 bytes off a 16-byte row boundary
    with pytest.raises(RuntimeError, match="ldmatrix: lane 3's row address \\d+ is not 16 "
                                           "aligned bytes of shared memory"):
        kernels_on_cpu.ldmatrix_lanes(stored, offsets, 1, False)


@pytest.mark.parametrize("b_rows", [True, False], ids=["b_by_trans", "b_transposed_by_rows"])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_cp_async_ldmatrix_and_mma_compose_to_a_matmul(kernels_on_cpu, dtype, b_rows):
    g = torch.Generator().manual_seed(7)
    a = torch.randn(16, 16, generator=g).to(DTYPES[dtype])
    b = torch.randn(16, 8, generator=g).to(DTYPES[dtype])
    out = kernels_on_cpu.product(a, b if b_rows else b.T.contiguous(), b_rows)
    want = a.double() @ b.double()
    assert ((out.double() - want).abs() <= product_bound(a, b, torch.zeros(16, 8))).all()


def test_a_read_before_cp_async_wait_sees_the_fill(kernels_on_cpu):
    early = kernels_on_cpu.planted("reads_before_the_wait", False, 2)
    assert early.isnan().all()  # the copy had not landed: 0xFF bytes
    t = torch.arange(64)
    on_time = kernels_on_cpu.planted("reads_before_the_wait", True, 2)
    assert torch.equal(on_time, torch.cat([64 * b + 4 * (t % 16) for b in range(2)]).float())


@pytest.mark.parametrize("D", [32, 64, 128])
def test_the_tiles_swizzle_gives_ldmatrix_eight_bank_groups(kernels_on_cpu, D):
    """csrc/attention_mma.cuh stores 16-byte chunk c of a tile row at chunk c ^ f(row): a
    permutation of each row's chunks, such that ldmatrix's 8 rows (any 8 consecutive from a
    multiple of 8) of one chunk fall in 8 different 16-byte groups of the 32 banks (128
    bytes): no bank conflicts."""
    chunks = D // 8
    for row in range(64):
        offsets = {kernels_on_cpu.swizzled(D, row, c) for c in range(chunks)}
        assert offsets == {row * D + 8 * c for c in range(chunks)}, row
    for first in range(0, 64, 8):
        for c in range(chunks):
            groups = {(2 * kernels_on_cpu.swizzled(D, first + j, c) // 16) % 8 for j in range(8)}
            assert len(groups) == 8, (first, c, groups)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_mma_reads_every_finite_16_bit_value_exactly(kernels_on_cpu, dtype):
    """The model's conversion of the 16-bit operands to fp32 (bit manipulation, not the
    CUDA headers' __half2float) is exact for every finite value, subnormals too: A times the
    columns of the identity gives A back (as values: -0 comes back +0, the accumulator's
    +0 added to it, as on a GPU)."""
    torch_dtype = DTYPES[dtype]
    patterns = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16)
    values = patterns.view(torch_dtype)
    values = values[torch.isfinite(values.float())]
    values = torch.cat([values, values[:(-len(values)) % 256]])  # whole 16 x 16 tiles
    eye = torch.eye(16, dtype=torch_dtype)
    for tile in values.view(-1, 16, 16):
        got = torch.cat([kernels_on_cpu.product(tile, eye[:, :8].contiguous(), True),
                         kernels_on_cpu.product(tile, eye[:, 8:].contiguous(), True)], dim=1)
        assert torch.equal(got, tile.float()), (tile, got)
