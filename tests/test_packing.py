import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from llmzip.packing import pack_int32, packed_len, unpack_int32

SHAPES = [(1, 1), (3, 7), (5, 37), (16, 64), (9, 100), (11, 576)]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_exact_and_matches_compressed_tensors(bits, shape):
    g = torch.Generator().manual_seed(bits * 1000 + shape[1])
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), shape, dtype=torch.int8, generator=g)
    packed = pack_int32(q, bits)
    assert packed.shape == (shape[0], packed_len(shape[1], bits))
    assert torch.equal(unpack_int32(packed, bits, shape[1]), q)
    # Bit-identical to the reference implementation that transformers and vLLM load.
    assert torch.equal(packed, pack_to_int32(q, bits))
    assert torch.equal(unpack_from_int32(packed, bits, torch.Size(shape)), q)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_along_rows_matches_compressed_tensors(bits):
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (37, 5), dtype=torch.int8)
    packed = pack_int32(q, bits, dim=0)
    assert torch.equal(packed, pack_to_int32(q, bits, packed_dim=0))
    assert torch.equal(unpack_int32(packed, bits, 37, dim=0), q)


def test_4bit_layout_is_lsb_first_nibbles():
    q = torch.arange(-8, 0, dtype=torch.int8).reshape(1, 8)  # stored as 0..7
    word = pack_int32(q, 4)[0, 0].item() & 0xFFFFFFFF
    assert word == 0x76543210


def test_wrong_word_count_is_rejected():
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_int32(torch.zeros(2, 3, dtype=torch.int32), 4, 64)
