"""kdgraph.lm.memory against hand arithmetic, and its parameter counts against transformers' own
models (LlamaForCausalLM of the same config, counted tensor by tensor)."""

from __future__ import annotations

import pytest

from kdgraph.lm.memory import GIB, QWEN25, Budget, Decoder, Pair, activation_bytes, fits, largest_pair, per_rank

# vocab 10, width 4, MLP 8, 2 layers, 2 heads (head dim 2), 1 kv head
TINY = Decoder(vocab=10, hidden=4, intermediate=8, layers=2, heads=2, kv_heads=1)


def test_parameter_counts_by_hand():
    # a layer: q, o 4x4 = 32; k, v 4x2 = 16; gate, up, down 3x4x8 = 96; two norms 8 -> 152
    assert TINY.layer_parameters() == 152
    # root: embedding and head 2 x 10x4 = 80, final norm 4 -> 84; tied: 44
    assert TINY.root_parameters() == 84
    assert TINY.parameters() == 2 * 152 + 84 == 388
    tied = Decoder(10, 4, 8, 2, 2, 1, tied=True)
    assert tied.parameters() == 2 * 152 + 44


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_counts_equal_transformers_llama(tied):
    transformers = pytest.importorskip("transformers")
    shape = Decoder(vocab=96, hidden=24, intermediate=40, layers=3, heads=4, kv_heads=2, tied=tied)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(config)
    assert shape.parameters() == sum(p.numel() for p in model.parameters())
    assert shape.layer_parameters() == sum(p.numel() for p in model.model.layers[0].parameters())


def test_per_rank_budget_by_hand():
    pair = Pair(student=TINY, teacher=TINY)  # bfloat16 compute and teacher
    one = per_rank(pair, ranks=1, tokens=5)
    # 388 parameters: float32 weights 1552, gradients 1552, AdamW 3104; teacher bfloat16 776
    assert (one.student_weights, one.gradients, one.optimizer, one.teacher_weights) == (1552, 1552, 3104, 776)
    # a layer saves 5 tokens x (6x4 + 2x1x2 + 4x8 = 60) = 300 elements; 2 layers in bfloat16 = 1200 bytes;
    # logits: 5 tokens x (10 + 10) x 4 bytes = 400
    assert one.activations == 1200 + 400
    assert one.total == 1552 + 1552 + 3104 + 776 + 1600
    two = per_rank(pair, ranks=2, tokens=5)
    # sharded: 1552/2 = 776, plus the root (84) and two layers (304) gathered in bfloat16: 776 bytes
    assert two.student_weights == 776 + 2 * (84 + 304)
    assert (two.gradients, two.optimizer) == (776, 1552)
    # the teacher: 776/2 = 388 plus its gathered root and two layers in bfloat16 (776)
    assert two.teacher_weights == 388 + 776
    assert two.activations == one.activations  # per rank: each rank's own tokens
    three = per_rank(pair, ranks=3, tokens=5)
    assert three.gradients == 518  # ceil(1552 / 3): a rank holds the larger share


def test_checkpointing_keeps_each_layers_input_and_one_layer():
    pair = Pair(student=TINY, teacher=TINY)
    # 2 inputs of 5 x 4 = 40 elements, one layer's 300 recomputed: 340 bfloat16 = 680, logits 400
    assert activation_bytes(pair, 5, checkpointing=True) == 680 + 400
    assert activation_bytes(pair, 5, checkpointing=False) == 1200 + 400


def test_fits_and_the_largest_pair():
    assert fits(Budget(0, 0, 0, 0, int(0.9 * GIB)), 1.0) and not fits(Budget(0, 0, 0, 0, int(0.9 * GIB) + 1), 1.0)
    s, t = largest_pair(80, 8, 4096, checkpointing=True)
    assert fits(per_rank(Pair(QWEN25[s], QWEN25[t]), 8, 4096, True), 80)
    names = list(QWEN25)
    bigger = names[names.index(s) + 1]  # the next student fits with no larger teacher
    assert not any(fits(per_rank(Pair(QWEN25[bigger], QWEN25[u]), 8, 4096, True), 80)
                   for u in names[names.index(bigger) + 1:])
    assert largest_pair(1, 1, 4096, False) is None
