"""Packing against brute-force references of the shifted labels and the loss mask."""

import random

import pytest
import torch

from gptgen.data.packing import PackedExamples, chunk_tokens, pack_examples
from gptgen.errors import DataError


def brute_force_pack(tokens, seq_len, bos, eos, pad):
    """Position by position: input t is seq[t], label t is seq[t + 1], while t + 1 is inside the cut sequence."""
    seq = ([bos] if bos is not None else []) + list(tokens) + ([eos] if eos is not None else [])
    seq = seq[: seq_len + 1]
    inputs, labels, mask = [], [], []
    for t in range(seq_len):
        inside = t + 1 < len(seq)
        inputs.append(seq[t] if inside else pad)
        labels.append(seq[t + 1] if inside else pad)
        mask.append(inside)
    return inputs, labels, mask


@pytest.mark.parametrize("bos, eos, pad", [(None, None, 0), (1, None, 0), (1, 2, 0), (None, 2, 7), (3, 3, 3)])
def test_pack_examples_matches_brute_force(bos, eos, pad):
    rng = random.Random(0)
    for seq_len in (1, 2, 5, 16):
        lists = [[rng.randrange(0, 50) for _ in range(rng.randrange(0, 25))] for _ in range(40)]
        lists.append([9] * (seq_len + 3))  # longer than a row: truncated
        packed = pack_examples(lists, seq_len, bos_id=bos, eos_id=eos, pad_id=pad)
        assert packed.input_ids.dtype == torch.long and packed.loss_mask.dtype == torch.bool
        assert packed.input_ids.shape == (len(lists), seq_len)
        for row, tokens in enumerate(lists):
            inputs, labels, mask = brute_force_pack(tokens, seq_len, bos, eos, pad)
            item = packed[row]
            assert item["input_ids"].tolist() == inputs
            assert item["labels"].tolist() == labels
            assert item["loss_mask"].tolist() == mask


def test_pack_equals_the_seed_start_end_packer():
    # seed: features = [BOS] + tokens[:127] padded with 0, labels = tokens[:128] padded with 0, loss ignores id 0
    bos, seq_len = 2, 128
    rng = random.Random(1)
    lists = [[rng.randrange(3, 5000) for _ in range(rng.randrange(1, 300))] for _ in range(64)]
    packed = pack_examples(lists, seq_len, bos_id=bos, pad_id=0)
    for row, tokens in enumerate(lists):
        features = ([bos] + tokens[: seq_len - 1] + [0] * seq_len)[:seq_len]
        labels = (tokens[:seq_len] + [0] * seq_len)[:seq_len]
        mask = [label != 0 for label in labels]
        assert packed.labels[row].tolist() == labels
        assert packed.loss_mask[row].tolist() == mask
        # a causal model's output at t sees inputs[:t + 1]: every input up to the last counted label agrees;
        # the seed also feeds the final token at the first masked position, which no counted output sees
        last = max(t for t, m in enumerate(mask) if m)
        assert packed.input_ids[row, : last + 1].tolist() == features[: last + 1]


def test_mask_is_positional_when_pad_is_a_real_token():
    # GPT-2 has no pad token; padding with id 0 ("!") must not hide a real "!" from the loss
    packed = pack_examples([[0, 5, 0]], 6, bos_id=50256, pad_id=0)
    assert packed.labels[0].tolist() == [0, 5, 0, 0, 0, 0]
    assert packed.loss_mask[0].tolist() == [True, True, True, False, False, False]
    assert packed.num_target_tokens == 3


def test_packed_examples_work_with_a_dataloader():
    packed = pack_examples([list(range(1, n + 1)) for n in range(1, 11)], 8, bos_id=99)
    batches = list(torch.utils.data.DataLoader(packed, batch_size=4))
    assert [b["input_ids"].shape for b in batches] == [(4, 8), (4, 8), (2, 8)]
    assert torch.equal(torch.cat([b["labels"] for b in batches]), packed.labels)
    sub = packed.select([0, 9])
    assert len(sub) == 2 and torch.equal(sub.input_ids[1], packed.input_ids[9])
    assert packed[2:4]["input_ids"].shape == (2, 8)
    accepted = pack_examples([torch.tensor([4, 5, 6])], 3, bos_id=1)
    assert accepted.input_ids.tolist() == [[1, 4, 5]] and accepted.labels.tolist() == [[4, 5, 6]]


def test_chunk_tokens_covers_the_stream_once():
    rng = random.Random(2)
    lists = [[rng.randrange(0, 100) for _ in range(rng.randrange(0, 30))] for _ in range(30)]
    for eos in (None, 100):
        stream = [t for tokens in lists for t in tokens + ([eos] if eos is not None else [])]
        for seq_len in (1, 7, 32):
            packed = chunk_tokens(lists, seq_len, eos_id=eos)
            labels_seen = []
            for row in range(len(packed)):
                for t in range(seq_len):
                    if packed.loss_mask[row, t]:
                        pos = row * seq_len + t  # window row starts at row * seq_len
                        assert packed.input_ids[row, t] == stream[pos]
                        assert packed.labels[row, t] == stream[pos + 1]
                        labels_seen.append(pos + 1)
            assert labels_seen == list(range(1, len(stream)))  # every token but the first, once, in order
            dropped = chunk_tokens(lists, seq_len, eos_id=eos, drop_last=True)
            assert len(dropped) == (len(stream) - 1) // seq_len
            assert bool(dropped.loss_mask.all())
            assert torch.equal(dropped.input_ids, packed.input_ids[: len(dropped)])


def test_chunk_windows_by_hand():
    packed = chunk_tokens([[1, 2, 3], [4, 5, 6, 7, 8, 9]], 4, eos_id=0)
    # stream 1 2 3 0 4 5 6 7 8 9 0 (11 tokens, 10 labels): windows of 4 labels, the last one padded
    assert packed.input_ids.tolist() == [[1, 2, 3, 0], [4, 5, 6, 7], [8, 9, 0, 0]]
    assert packed.labels.tolist() == [[2, 3, 0, 4], [5, 6, 7, 8], [9, 0, 0, 0]]
    assert packed.loss_mask.tolist() == [[True] * 4, [True] * 4, [True, True, False, False]]


def test_packing_errors():
    with pytest.raises(DataError, match="token list is empty"):
        pack_examples([], 8)
    with pytest.raises(DataError, match="seq_len must be a positive integer"):
        pack_examples([[1, 2]], 0)
    with pytest.raises(DataError, match="None of the 2 examples has a token to predict"):
        pack_examples([[5], []], 8)
    with pytest.raises(DataError, match="token list is empty"):
        chunk_tokens([], 8)
    with pytest.raises(DataError, match="1 token\\(s\\) in all; chunking needs at least two"):
        chunk_tokens([[5], []], 8)
    with pytest.raises(DataError, match="fewer than one window"):
        chunk_tokens([[5, 6, 7]], 8, drop_last=True)
    with pytest.raises(DataError, match="share one"):
        PackedExamples(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long),
                       torch.zeros(2, 3, dtype=torch.bool))
