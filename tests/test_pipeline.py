"""`MultiTaskPipeline`: one encoder pass per batch, the same outputs as one task at a time, word
-level tags on words split into several sub-tokens, and clear errors for inputs that do not fit."""

from __future__ import annotations

import pytest
import torch

from mtnlp.inference.pipeline import MultiTaskPipeline, entity_scheme, group_entities
from mtnlp.modeling.model import MultiTaskModel
from mtnlp.modeling.tiny import tiny_bert
from mtnlp.utils.errors import UserError

from conftest import TINY_TASKS, task_spec

TEXTS = [
    "the cat sat on the mat",
    "catdogmat runs in the park",
    "terrible plot",
    "stocks fell sharply in early trading today",
    "a dog",
]
PAIR_TASK = task_spec("pair", "classification", ["no", "yes"], inputs=["premise", "hypothesis"])


@pytest.fixture
def model(tiny_tokenizer):
    torch.manual_seed(0)
    return MultiTaskModel.from_encoder(tiny_bert(tiny_tokenizer), [*TINY_TASKS, PAIR_TASK]).eval()


def count_encoder_calls(model: MultiTaskModel) -> list[int]:
    calls = [0]

    def hook(module, args, kwargs):
        calls[0] += 1

    model.encoder.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def assert_same(one: dict, other: dict) -> None:
    assert one.keys() == other.keys()
    for task, result in one.items():
        expected = other[task]
        assert result.keys() == expected.keys()
        for key, value in result.items():
            if key in ("score", "value", "scores"):
                assert value == pytest.approx(expected[key], abs=1e-5), (task, key)
            elif key != "entities":
                assert value == expected[key], (task, key)


def test_one_encoder_pass_per_batch_same_outputs_as_each_task(model, tiny_tokenizer):
    pipeline = MultiTaskPipeline(model, tiny_tokenizer, batch_size=2)
    calls = count_encoder_calls(model)
    together = pipeline(TEXTS, tasks=["cls", "reg", "tag"])
    assert calls[0] == 3  # 5 texts in batches of 2: three passes serve all three tasks
    for task in ["cls", "reg", "tag"]:
        alone = pipeline(TEXTS, tasks=[task])
        for joint, single in zip(together, alone, strict=True):
            assert_same({task: joint[task]}, single)
    assert calls[0] == 3 + 3 * 3


def byte_level_tokenizer():
    """A RoBERTa-style byte-level BPE: a word starts with 'Ġ' when split into words but not at the
    start of a raw text, so tagging tasks cannot share the sentence tasks' tokens."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        TEXTS, vocab_size=300, special_tokens=["<s>", "<pad>", "</s>"], show_progress=False
    )
    backend = bpe._tokenizer  # the `tokenizers.Tokenizer` inside the trainer's wrapper
    backend.post_processor = TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def test_separate_passes_when_tokenizations_differ():
    tokenizer = byte_level_tokenizer()
    torch.manual_seed(0)
    model = MultiTaskModel.from_encoder(tiny_bert(tokenizer), TINY_TASKS).eval()
    pipeline = MultiTaskPipeline(model, tokenizer)
    calls = count_encoder_calls(model)
    together = pipeline(TEXTS, tasks=["cls", "tag"])
    assert calls[0] == 2  # sentence tasks read the raw text, tagging reads the words
    alone = pipeline(TEXTS, tasks=["tag"])
    for joint, single in zip(together, alone, strict=True):
        assert_same({"tag": joint["tag"]}, single)
        assert joint["tag"]["words"] == single["tag"]["words"]


def test_results_match_the_model(model, tiny_tokenizer):
    pipeline = MultiTaskPipeline(model, tiny_tokenizer)
    result = pipeline("terrible plot", tasks=["cls", "reg"])
    inputs = tiny_tokenizer("terrible plot", return_tensors="pt")
    with torch.no_grad():
        probabilities = model(task="cls", **inputs).logits.softmax(-1)[0]
        value = model(task="reg", **inputs).logits[0].item()
    assert result["cls"]["label"] == ["neg", "pos"][probabilities.argmax().item()]
    assert result["cls"]["score"] == pytest.approx(probabilities.max().item(), abs=1e-6)
    assert result["reg"] == {"value": pytest.approx(value, abs=1e-6)}


def test_tags_one_per_word_at_its_first_subtoken(model, tiny_tokenizer):
    from seqeval.scheme import IOB2

    words = TEXTS[1].split()
    encoded = tiny_tokenizer([words], is_split_into_words=True, return_tensors="pt")
    word_ids = encoded.word_ids(0)
    assert word_ids.count(0) >= 3  # "catdogmat" is split into several sub-tokens
    with torch.no_grad():
        predicted = model(task="tag", **encoded).logits.argmax(-1)[0].tolist()
    first = [word_ids.index(index) for index in range(len(words))]
    expected = [["O", "B-X", "I-X"][predicted[position]] for position in first]
    result = MultiTaskPipeline(model, tiny_tokenizer)(TEXTS[1], tasks=["tag"])["tag"]
    assert result["words"] == words
    assert result["tags"] == expected
    assert len(result["scores"]) == len(words)
    assert result["entities"] == group_entities(words, expected, result["scores"], IOB2)


def test_entities_follow_the_scheme_of_the_dev_metric():
    from seqeval.scheme import IOB2, IOBES

    words = ["Ada", "Lovelace", "met", "Charles", "in", "London"]
    tags = ["B-PER", "I-PER", "O", "B-PER", None, "I-LOC"]
    entities = group_entities(words, tags, [0.9, 0.7, 1.0, 0.8, None, 0.6], IOB2)
    # strict IOB2, as the seqeval metric counts: an I- tag after O starts no entity
    assert [(e["type"], e["text"], e["start"], e["end"]) for e in entities] == [
        ("PER", "Ada Lovelace", 0, 2),
        ("PER", "Charles", 3, 4),
    ]
    assert entities[0]["score"] == pytest.approx(0.8)
    iobes = ["S-PER", "O", "B-LOC", "E-LOC"]
    assert [
        e["text"] for e in group_entities(["Ada", "in", "New", "York"], iobes, [1.0] * 4, IOBES)
    ] == [
        "Ada",
        "New York",
    ]
    spec = task_spec("ner", "tagging", ["O", "S-PER", "B-LOC", "E-LOC"], metrics=["seqeval_iobes"])
    assert entity_scheme(spec) is IOBES
    assert entity_scheme(task_spec("ner", "tagging", ["O", "B-PER"])) is IOB2  # IOB-like tags
    assert entity_scheme(task_spec("pos", "tagging", ["NOUN", "VERB"])) is None


def test_truncated_words_get_no_tag(model, tiny_tokenizer):
    result = MultiTaskPipeline(model, tiny_tokenizer, max_length=5)(TEXTS[0], tasks=["tag"])
    assert result["tag"]["tags"][:3] != [None] * 3
    assert result["tag"]["tags"][3:] == [None] * 3  # [CLS] + 3 words + [SEP]


def test_pairs_and_single_texts_in_one_call(model, tiny_tokenizer):
    pipeline = MultiTaskPipeline(model, tiny_tokenizer)
    calls = count_encoder_calls(model)
    results = pipeline(
        ["a dog", ("the cat sat", "a cat is sitting"), {"text": "x", "text_pair": "y"}, "terrible"]
    )
    assert calls[0] == 2  # one pass for the single texts, one for the pairs
    assert [sorted(result) for result in results] == [
        ["cls", "reg", "tag"],
        ["pair"],
        ["pair"],
        ["cls", "reg", "tag"],
    ]
    assert results[1]["pair"]["label"] in ("no", "yes")
    expected = pipeline({"text": "the cat sat", "text_pair": "a cat is sitting"}, tasks=["pair"])
    assert_same(results[1], expected)


def test_inputs_that_do_not_fit_a_task(model, tiny_tokenizer):
    pipeline = MultiTaskPipeline(model, tiny_tokenizer)
    with pytest.raises(
        UserError, match=r"input 2 has no text_pair, but task pair reads a text pair"
    ):
        pipeline([("a", "b"), "single"], tasks=["pair"])
    with pytest.raises(
        UserError, match="input 1 has a text_pair, but task cls reads a single text"
    ):
        pipeline(("a", "b"), tasks=["cls", "pair"])
    with pytest.raises(UserError, match="no task nope in this model; tasks: cls, reg, tag, pair"):
        pipeline("a", tasks=["nope"])
    with pytest.raises(UserError, match=r"input 8: expected a text, a \(text, text_pair\) tuple"):
        pipeline(["a", {"txt": "b"}], numbers=[3, 8])
    with pytest.raises(UserError, match="dtype: 'int8'; expected one of"):
        MultiTaskPipeline(model, tiny_tokenizer, dtype="int8")
    with pytest.raises(UserError, match=r"device: 'gpu'; expected e\.g\. cpu, cuda or cuda:1"):
        MultiTaskPipeline(model, tiny_tokenizer, device="gpu")


def test_device_and_dtype(model, tiny_tokenizer):
    expected = MultiTaskPipeline(model, tiny_tokenizer)(TEXTS, tasks=["cls"])
    pipeline = MultiTaskPipeline(model, tiny_tokenizer, device="cpu", dtype="bf16")
    assert pipeline.device == torch.device("cpu")
    assert {p.dtype for p in pipeline.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # a copy was converted
    results = pipeline(TEXTS, tasks=["cls", "tag"])
    for result, reference in zip(results, expected, strict=True):
        assert result["cls"]["score"] == pytest.approx(reference["cls"]["score"], abs=0.03)
        assert isinstance(result["tag"]["scores"][0], float)


def test_the_callers_model_keeps_its_mode(model, tiny_tokenizer):
    """Predictions run in eval mode (no dropout), and the model given is left as it was."""
    model.train()
    pipeline = MultiTaskPipeline(model, tiny_tokenizer)
    first, second = pipeline(TEXTS, tasks=["cls"]), pipeline(TEXTS, tasks=["cls"])
    assert first == second  # deterministic: dropout was off
    assert all(module.training for module in model.modules())
    model.eval()
    assert pipeline(TEXTS, tasks=["cls"]) == first
    assert not any(module.training for module in model.modules())


def test_transformers_pipeline_builds_it(model, tiny_tokenizer, tmp_path):
    """`transformers.pipeline("mtnlp-multi-task", model=folder)` (registered by importing
    `mtnlp.inference`) predicts as `MultiTaskPipeline` does."""
    import transformers

    from mtnlp.inference.transformers_pipeline import TASK

    model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    predict = transformers.pipeline(TASK, model=str(tmp_path), device="cpu", batch_size=2)
    assert isinstance(predict.multitask, MultiTaskPipeline) and predict.multitask.batch_size == 2
    inputs = [*TEXTS, ("the cat sat", "a cat is sitting")]
    expected = MultiTaskPipeline(model, tiny_tokenizer)(inputs)
    for result, reference in zip(predict(inputs), expected, strict=True):
        assert_same(result, reference)
    assert_same(predict(TEXTS[0], tasks=["cls"]), {"cls": expected[0]["cls"]})
    only_cls = transformers.pipeline(TASK, model=str(tmp_path), device="cpu", tasks=["cls"])
    assert [list(result) for result in only_cls(TEXTS[:2])] == [["cls"], ["cls"]]
    single = predict.run_single(("a", "b"), {}, {"tasks": None}, {})  # transformers' own steps
    assert_same(single, MultiTaskPipeline(model, tiny_tokenizer)(("a", "b")))
    for task in ("text-classification", "token-classification"):
        with pytest.raises(UserError, match=f'use transformers.pipeline\\("{TASK}", model=...\\)'):
            transformers.pipeline(task, model=str(tmp_path))
