"""Calibration inputs the model cannot take are refused before any work starts (issue #32, item 3), with a message
that names the sample, the limit and the fix (hf_qlimit/calibration/checks.py).

Refusals go through `quantize_qlimit` on model_zoo's tiny models, with a forward pre-hook that raises
`ForwardRan`: the refusal must come before the first forward pass. Without its check, each case either reaches the
forward (ForwardRan) or fails elsewhere with another error, so every refusal test fails when its check is removed.
"""

from __future__ import annotations

import model_zoo as zoo
import pytest
import torch
from torch import nn

from hf_qlimit import QLimitConfig
from hf_qlimit.calibration.checks import position_limit
from hf_qlimit.calibration.data import prepare_calibration

# types with a learned position table: the model's table, and the rows before position 0
LEARNED_POSITIONS = ("bert", "roberta", "distilbert", "electra", "gpt2", "opt")
NO_POSITION_TABLE = ("llama", "modernbert", "deberta-v2", "t5", "falcon")  # rotary / relative: no hard limit


class ForwardRan(Exception):
    """The model's forward was reached: the refusal did not come first."""


def _no_forward(module: nn.Module, args: tuple, kwargs: dict) -> None:
    raise ForwardRan


def refusal(model: nn.Module, samples: object, **config: object) -> str:
    """The message `quantize_qlimit` refuses `samples` with, before any forward pass of `model`."""
    model.register_forward_pre_hook(_no_forward, with_kwargs=True)
    with pytest.raises(ValueError) as err:
        model.quantize_qlimit(samples, QLimitConfig(weight_bits=8, method="rtn", **config))
    return str(err.value)


def with_sample(model_type: str, index: int, sample: dict) -> list[dict]:
    """Valid calibration samples of `model_type` with `sample` at `index`."""
    samples = zoo.calib(model_type, n=6)
    samples.insert(index, sample)
    return samples


def ids(n: int, first: int = zoo.FIRST_ID) -> list[int]:
    return [first + i % (zoo.VOCAB - first) for i in range(n)]


@pytest.mark.parametrize(("max_length", "length"), [(None, 70), (512, 70), (100, 120)])
def test_sample_longer_than_the_position_table_is_refused(max_length, length):
    samples = with_sample("bert", 3, {"input_ids": ids(length)})
    message = refusal(zoo.build("bert"), samples, max_length=max_length)
    tokens = "100 tokens after truncation to max_length=100" if length == 120 else "70 tokens"
    assert message.startswith(
        f"Calibration sample 3 has {tokens}, but BertForSequenceClassification's position table holds 64 "
        "(max_position_embeddings). Pass max_length=64 to QLimitConfig"
    ), message
    assert message.endswith("or truncate the samples when tokenizing (truncation=True, max_length=64).")
    assert ("(it is 512 now)" in message) == (max_length == 512)


@pytest.mark.parametrize("model_type", LEARNED_POSITIONS)
def test_position_limit_is_the_longest_sample_the_model_runs(model_type):
    model = zoo.build(model_type)
    limit = position_limit(model)
    assert limit == (65 if model_type == "roberta" else 64)  # RoBERTa: 66 rows, positions from pad_token_id + 1
    with torch.no_grad():
        model(input_ids=torch.tensor([ids(limit)]))
        with pytest.raises((IndexError, RuntimeError)):
            model(input_ids=torch.tensor([ids(limit + 1)]))
    samples = with_sample(model_type, 0, {"input_ids": ids(limit)})
    prepare_calibration(samples, 8, None, 0, model=model)  # at the limit: accepted
    message = refusal(model, with_sample(model_type, 0, {"input_ids": ids(limit + 1)}), max_length=None)
    assert f"has {limit + 1} tokens" in message and f"holds {limit} " in message, message
    if model_type == "roberta":
        assert "(max_position_embeddings=66, less pad_token_id + 1 = 1: positions start after the padding" in message
    if model_type == "gpt2":
        assert "(n_positions)" in message


@pytest.mark.parametrize("model_type", NO_POSITION_TABLE)
def test_models_without_a_position_table_take_samples_past_max_position_embeddings(model_type):
    model = zoo.build(model_type)
    assert position_limit(model) is None
    data = prepare_calibration([{"input_ids": ids(2 * 64 + 5)}], 1, None, 0, model=model)
    if model_type == "t5":
        data["decoder_input_ids"] = data["input_ids"]
    with torch.no_grad():
        model(**data)  # and the model does run them


@pytest.mark.parametrize(("model_type", "bad"), [("bert", zoo.VOCAB), ("bert", -100), ("llama", zoo.VOCAB + 5)])
def test_token_id_outside_the_vocabulary_is_refused(model_type, bad):
    sample = {"input_ids": [5, 6, bad, 7]}
    message = refusal(zoo.build(model_type), with_sample(model_type, 4, sample))
    name = type(zoo.build(model_type)).__name__
    assert message.startswith(
        f"Calibration sample 4 has token id {bad} at position 2, but {name}'s input embedding holds 128 ids "
        "(vocab_size): ids must be 0 to 127."
    ), message
    assert ("pass the samples unpadded" in message) == (bad < 0)
    assert ("own tokenizer" in message) == (bad >= 0)


def test_token_type_past_the_models_token_types_is_refused():
    samples = [{**s, "token_type_ids": [0] * len(s["input_ids"])} for s in zoo.calib("bert", 6)]
    samples[5]["token_type_ids"][1] = 2
    message = refusal(zoo.build("bert"), samples)
    assert message.startswith(
        "Calibration sample 5 has token type 2 at position 1, but BertForSequenceClassification has an embedding for "
        "2 token types (type_vocab_size): token_type_ids must be 0 to 1."
    ), message


def test_token_type_ids_for_a_model_without_token_types_are_refused():
    samples = [{**s, "token_type_ids": [0] * len(s["input_ids"])} for s in zoo.calib("llama", 4)]
    message = refusal(zoo.build("llama"), samples)
    assert message.startswith(
        "Calibration sample 0 has token_type_ids, but LlamaForCausalLM has no token type embedding (its forward "
        "takes no token_type_ids). Drop the column: `ds.remove_columns('token_type_ids')`"
    ), message


@pytest.mark.parametrize("mask_length", [9, 11])
def test_mask_of_another_length_than_its_ids_is_refused(mask_length):
    sample = {"input_ids": ids(10), "attention_mask": [1] * mask_length}
    message = refusal(zoo.build("bert"), with_sample("bert", 2, sample))
    assert message.startswith(
        f"Calibration sample 2 has 10 input_ids but {mask_length} attention_mask values: they must be the same length."
    ), message


def test_left_padded_mask_is_refused():
    sample = {"input_ids": [0, 0, 5, 6, 7], "attention_mask": [0, 0, 1, 1, 1]}
    message = refusal(zoo.build("bert"), with_sample("bert", 1, sample))
    assert message.startswith("Calibration sample 1's attention_mask is not ones followed by zeros"), message
    assert "Pass the samples unpadded" in message


def test_mask_values_other_than_0_and_1_are_refused():
    sample = {"input_ids": [5, 6, 7], "attention_mask": [1.0, 0.5, 1.0]}
    message = refusal(zoo.build("bert"), with_sample("bert", 1, sample))
    assert message == "Calibration sample 1's attention_mask holds 0.5: a mask holds only 0 and 1.", message


def test_text_instead_of_token_ids_is_refused():
    message = refusal(zoo.build("bert"), with_sample("bert", 2, {"input_ids": "a sentence"}))
    assert message.startswith("Calibration sample 2's input_ids holds text ('a sentence'), not token ids"), message


def test_token_type_ids_in_some_samples_only_are_refused():
    samples = with_sample("bert", 3, {"input_ids": [5, 6], "token_type_ids": [0, 0]})
    message = refusal(zoo.build("bert"), samples)
    assert message.startswith("Calibration sample 3 has the columns ['input_ids', 'token_type_ids'], but the first"), (
        message
    )


@pytest.mark.parametrize("value", [[5.0, 6.0, 7.0], [5, 6.5, 7], torch.tensor([5.0, 6.0, 7.0])], ids=str)
def test_float_input_ids_are_refused(value):
    message = refusal(zoo.build("bert"), with_sample("bert", 6, {"input_ids": value}))
    example = "6.5" if 6.5 in list(torch.as_tensor(value)) else "5.0"
    assert message.startswith(
        f"Calibration sample 6's input_ids holds float32 values, e.g. {example}: token ids must be integers"
    ), message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ([[[5, 6, 7]]], "Calibration sample 0's input_ids is nested 3 lists deep (shape (1, 1, 3))"),
        ([[5, 6, 7], [8, 9, 10]], "Calibration sample 0's input_ids holds 2 sequences (shape (2, 3)): a batch"),
        ([[5, 6, 7], [8, 9]], "Calibration sample 0's input_ids cannot be read as one sequence of token ids"),
    ],
    ids=["three-deep", "batch", "ragged-batch"],
)
def test_nested_lists_deeper_than_one_sample_are_refused(value, expected):
    message = refusal(zoo.build("bert"), with_sample("bert", 0, {"input_ids": value}))
    assert message.startswith(expected), message
    assert "one sample" in message


def test_a_batch_given_as_the_calibration_set_is_refused():
    columns = {"input_ids": [ids(5), ids(7)], "attention_mask": [[1] * 5, [1] * 7]}  # what tokenizer(texts) returns
    message = refusal(zoo.build("bert"), columns)
    assert message.startswith("The calibration set is one batch (a dict of columns"), message


def test_pad_token_outside_the_vocabulary_is_refused():
    model = zoo.build("bert")
    model.config.pad_token_id = zoo.VOCAB
    message = refusal(model, zoo.calib("bert", 4))
    assert message.startswith(
        "BertForSequenceClassification's config has pad_token_id=128, outside its 128 token ids"
    ), message


@pytest.mark.parametrize("model_type", ["bert", "llama", "t5", "gpt2", "modernbert", "deberta-v2", "roberta"])
def test_valid_inputs_pass_the_checks_and_run(model_type):
    model = zoo.build(model_type)
    limit = position_limit(model) or 64
    samples = zoo.calib(model_type, n=5) + [
        {"input_ids": ids(limit)},  # as long as the position table allows
        {"input_ids": torch.tensor([ids(9)])},  # one sample wrapped once, as return_tensors="pt" gives
        {"input_ids": ids(4, first=zoo.VOCAB - 4), "attention_mask": [1, 1, 1, 0]},  # the vocabulary's last ids
    ]
    if model_type in ("bert", "roberta", "deberta-v2", "gpt2"):  # their tokenizers return token types
        for s in samples:
            n = torch.as_tensor(s["input_ids"]).numel()
            s["token_type_ids"] = [0] * (n // 2) + [1 if model_type != "roberta" else 0] * (n - n // 2)
    data = prepare_calibration(samples, len(samples), 512, model.config.pad_token_id, model=model)
    assert data["input_ids"].shape == (8, limit) and data["attention_mask"][7].sum() == 3
    if model_type == "t5":
        data["decoder_input_ids"] = data["input_ids"]
    with torch.no_grad():
        model(**data)
