"""mtnlp as a Hugging Face model, modelled on transformers' common model tests: save/load, input
embeddings and their resizing, output_hidden_states / output_attentions / return_dict, gradient
checkpointing, torch.compile and torch.export, half precision, parameter counts and tied weights,
for every head type and layout (flat, low supervision, JMT task layers, each column strategy);
single-task exports that transformers' own pipelines and Auto classes load; and the errors of
transformers' single-task Auto classes and pipelines on a multi-task folder.

Tiny in-process models (hidden 32, 2 layers, no dropout, eager attention), one torch thread.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import transformers
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    ElectraConfig,
    ElectraModel,
    RobertaConfig,
    RobertaForSequenceClassification,
    RobertaModel,
)

import mtnlp.inference  # noqa: F401  (registers pipeline("mtnlp-multi-task"))
from mtnlp.cli import main
from mtnlp.export.transformers import export_encoder, export_task
from mtnlp.inference.pipeline import MultiTaskPipeline
from mtnlp.modeling import HEADS, SHARING
from mtnlp.modeling.model import MultiTaskModel
from mtnlp.utils.errors import UserError

from conftest import task_spec

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

HIDDEN, LAYERS, BATCH, TOKENS = 32, 2, 3, 7
CLS, TAGS = ["neg", "pos"], ["O", "B-X", "I-X"]
DENSE = {"dropout": 0.0, "pooling": "cls", "hidden_size": HIDDEN}  # maps onto BERT's pooler
MEAN = {"dropout": 0.0, "pooling": "mean", "hidden_size": None}


def task_layer(type: str, **options) -> dict:
    return {
        "type": type, "hidden_size": None, "num_heads": None, "shortcut": True,
        "label_embeddings": True, "label_embedding_size": 8, "dropout": 0.0, **options,
    }  # fmt: skip


def tasks(reg_layer: int = -1, tag_layer: int = -1) -> list[dict]:
    """One task of each head type: cls (first token, tanh layer), reg (mean pooling), tag."""
    return [
        task_spec("cls", "classification", CLS, head=DENSE),
        task_spec("reg", "regression", layer=reg_layer, head=MEAN),
        task_spec("tag", "tagging", TAGS, layer=tag_layer),
    ]


JMT = [  # tag (layer 1) -> cls (transformer task layer) -> reg (BiLSTM task layer, no shortcut)
    task_spec("tag", "tagging", TAGS, layer=1),
    task_spec(
        "cls",
        "classification",
        CLS,
        head=DENSE,
        stack_on="tag",
        task_layer=task_layer("transformer", num_heads=2),
    ),
    task_spec(
        "reg",
        "regression",
        head=MEAN,
        stack_on="cls",
        task_layer=task_layer("bilstm", shortcut=False),
    ),
]
# name -> (task specs, sharing): every layout the model has
LAYOUTS = {
    "flat": (tasks(), None),
    "low": (tasks(reg_layer=1, tag_layer=1), None),  # heads on a lower layer
    "jmt": (JMT, None),
    **{  # reg reads the shared bottom, cls and tag their columns
        name: (tasks(reg_layer=1), {"name": name, "layers": 1})
        for name in SHARING.names()
        if name != "hard"
    },
}
TASKS = ["cls", "reg", "tag"]


@pytest.fixture(scope="module")
def encoder_config(tiny_tokenizer) -> BertConfig:
    return BertConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=2, intermediate_size=2 * HIDDEN, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, pad_token_id=tiny_tokenizer.pad_token_id,
    )  # fmt: skip


@pytest.fixture
def build(encoder_config):
    def build(layout: str) -> MultiTaskModel:
        specs, sharing = LAYOUTS[layout]
        torch.manual_seed(0)
        encoder = BertModel(copy.deepcopy(encoder_config), add_pooling_layer=False)
        model = MultiTaskModel.from_encoder(encoder, copy.deepcopy(specs), sharing)
        spread(model.heads)
        model.set_attn_implementation("eager")  # attention weights for output_attentions
        return model.eval()

    return build


def spread(heads: nn.Module) -> None:
    """Heads well away from zero, so that logits differ visibly."""
    with torch.no_grad():
        for parameter in heads.parameters():
            parameter.normal_(0.0, 0.5)


def put_task(model: MultiTaskModel, spec: dict) -> None:
    """Give `model` the task `spec` with a fresh head: a new task, or other head options."""
    names = model.config.task_names
    if spec["name"] in names:
        model.config.tasks[names.index(spec["name"])] = spec
    else:
        model.config.tasks.append(spec)
    model.heads[spec["name"]] = HEADS.get(spec["type"])(spec, HIDDEN)
    spread(model.heads[spec["name"]])


@pytest.fixture
def inputs(tiny_tokenizer) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    mask = torch.ones(BATCH, TOKENS, dtype=torch.long)
    mask[-1, 4:] = 0  # right padding (the BiLSTM task layer's need)
    ids = torch.randint(5, len(tiny_tokenizer), (BATCH, TOKENS), generator=generator)
    return {"input_ids": ids, "attention_mask": mask}


def labels_for(model: MultiTaskModel) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    labels = {}
    for task in model.config.task_names:
        spec, head = model.config.task(task), model.heads[task]
        if head.token_level:
            labels[task] = torch.randint(
                0, len(spec["labels"]), (BATCH, TOKENS), generator=generator
            )
        elif head.needs_labels:
            labels[task] = torch.randint(0, len(spec["labels"]), (BATCH,), generator=generator)
        else:
            labels[task] = torch.rand(BATCH, generator=generator) * 5
    return labels


def all_logits(model: nn.Module, inputs: dict, **kwargs) -> dict[str, torch.Tensor]:
    return {t: o.logits for t, o in model.forward_tasks(TASKS, **inputs, **kwargs).items()}


def assert_same(actual: dict, expected: dict, tolerance: float = 1e-6) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=tolerance, atol=tolerance, msg=key)


def test_every_head_type_and_sharing_strategy_is_covered():
    assert {spec["type"] for specs, _ in LAYOUTS.values() for spec in specs} == set(HEADS.names())
    assert {(sharing or {"name": "hard"})["name"] for _, sharing in LAYOUTS.values()} == set(
        SHARING.names()
    )


# ------------------------------------------------------------------------------ 1. model API
@pytest.mark.parametrize("layout", LAYOUTS)
def test_save_and_load_round_trip(build, inputs, layout, tmp_path):
    model = build(layout)
    sharing = model.config.sharing
    model.save_pretrained(tmp_path)
    for loaded in (MultiTaskModel.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path)):
        assert isinstance(loaded, MultiTaskModel) and not loaded.training
        assert (loaded.config.tasks, loaded.config.sharing) == (model.config.tasks, sharing)
        encoder = model.config.encoder.to_diff_dict()
        assert loaded.config.encoder.to_diff_dict() == {**encoder, "dtype": "float32"}
        assert_same(all_logits(loaded, inputs), all_logits(model, inputs))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_get_and_set_input_embeddings(build, inputs, layout):
    model = build(layout)
    embeddings = model.get_input_embeddings()
    assert embeddings is model.encoder.embeddings.word_embeddings
    before = all_logits(model, inputs)
    replacement = nn.Embedding(embeddings.num_embeddings, HIDDEN)
    with torch.no_grad():
        replacement.weight.copy_(embeddings.weight)
    model.set_input_embeddings(replacement)
    assert model.get_input_embeddings() is replacement
    assert_same(all_logits(model, inputs), before)
    with torch.no_grad():
        replacement.weight.normal_()
    assert not torch.allclose(all_logits(model, inputs)["cls"], before["cls"])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_resize_token_embeddings_then_save_and_reload(build, inputs, layout, tmp_path):
    model = build(layout)
    size = model.config.encoder.vocab_size
    before = all_logits(model, inputs)
    resized = model.resize_token_embeddings(size + 5)
    assert resized is model.get_input_embeddings() and resized.weight.shape == (size + 5, HIDDEN)
    assert model.config.encoder.vocab_size == size + 5
    assert_same(all_logits(model, inputs), before)  # the old tokens are as they were
    new_token = {**inputs, "input_ids": inputs["input_ids"].clone()}
    new_token["input_ids"][0, 1] = size + 4
    expected = all_logits(model, new_token)
    model.save_pretrained(tmp_path)
    loaded = MultiTaskModel.from_pretrained(tmp_path)
    assert loaded.get_input_embeddings().num_embeddings == size + 5
    assert_same(all_logits(loaded, new_token), expected)
    model.resize_token_embeddings(size - 3)  # shrinking: the last rows go
    assert model.config.encoder.vocab_size == size - 3
    assert model.get_input_embeddings().weight.shape == (size - 3, HIDDEN)


def layer_read(model: MultiTaskModel, task: str) -> int:
    """The encoder layer whose states the task builds on (a stacked task without shortcut: its
    lower task's)."""
    spec = model.config.task(task)
    if spec.get("task_layer") and not spec["task_layer"]["shortcut"]:
        return layer_read(model, spec["stack_on"])
    return model.layer_index(task)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_output_hidden_states_and_attentions(build, inputs, layout):
    model = build(layout)
    # a fresh model's task columns are copies of the encoder's top layers: the same states
    reference = model.encoder(**inputs, output_hidden_states=True, output_attentions=True)
    plain = all_logits(model, inputs)
    for task in TASKS:
        output = model(
            task=task, **inputs, output_hidden_states=True, output_attentions=True
        )  # the caller's values win (no "multiple values for keyword argument")
        layer = layer_read(model, task)
        assert len(output.hidden_states) == layer + 1 and len(output.attentions) == layer
        for mine, theirs in zip(output.hidden_states, reference.hidden_states, strict=False):
            assert mine.shape == (BATCH, TOKENS, HIDDEN)
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
        for mine, theirs in zip(output.attentions, reference.attentions, strict=False):
            assert mine.shape == (BATCH, 2, TOKENS, TOKENS)
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(mine.sum(-1), torch.ones(BATCH, 2, TOKENS))
        torch.testing.assert_close(output.logits, plain[task], rtol=0, atol=1e-6)
        quiet = model(task=task, **inputs, output_hidden_states=False, output_attentions=False)
        assert quiet.hidden_states is None and quiet.attentions is None
    model.config.output_hidden_states = True  # the config's value is the default, as in HF
    assert len(model(task="cls", **inputs).hidden_states) == layer_read(model, "cls") + 1


def test_hidden_states_of_a_column_are_its_own(build, inputs):
    model = build("soft")
    with torch.no_grad():
        for parameter in model.sharing.column["cls"].parameters():
            parameter.add_(0.1)
    cls = model(task="cls", **inputs, output_hidden_states=True).hidden_states
    tag = model(task="tag", **inputs, output_hidden_states=True).hidden_states
    torch.testing.assert_close(cls[1], tag[1])  # the shared bottom
    assert not torch.allclose(cls[2], tag[2])  # the columns


def test_hidden_states_after_a_truncated_first_pass(build, inputs):
    """transformers hooks the layers at the first pass that records states; a low task's pass
    runs fewer layers, yet later passes still record every layer."""
    model = build("low")
    assert len(model(task="tag", **inputs, output_hidden_states=True).hidden_states) == 2
    assert len(model(task="cls", **inputs, output_hidden_states=True).hidden_states) == 3


@pytest.mark.parametrize("layout", LAYOUTS)
def test_return_dict_and_peft_style_calls(build, inputs, layout):
    model = build(layout)
    labels = labels_for(model)
    for task in TASKS:
        output = model(task=task, **inputs, labels=labels[task])
        as_tuple = model(task=task, **inputs, labels=labels[task], return_dict=False)
        assert isinstance(as_tuple, tuple) and len(as_tuple) == 2
        torch.testing.assert_close(as_tuple[0], output.loss)
        torch.testing.assert_close(as_tuple[1], output.logits)
        # what peft's PeftModelForSequenceClassification passes (LoraConfig(task_type="SEQ_CLS"))
        peft = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
            inputs_embeds=None, labels=labels[task], output_attentions=None,
            output_hidden_states=True, return_dict=False, task=task,
        )  # fmt: skip
        assert len(peft) == 3 and len(peft[2]) == layer_read(model, task) + 1
        torch.testing.assert_close(peft[1], output.logits)
        embedded = model(
            task=task,
            inputs_embeds=model.get_input_embeddings()(inputs["input_ids"]),
            attention_mask=inputs["attention_mask"],
        )
        torch.testing.assert_close(embedded.logits, output.logits)
    model.config.return_dict = False
    assert isinstance(model(task="cls", **inputs), tuple)
    outputs = model.forward_tasks(TASKS, **inputs, return_dict=True)
    assert all(output.logits is not None for output in outputs.values())


def test_forward_without_a_task_names_the_alternatives(build, inputs):
    with pytest.raises(ValueError, match=r"tasks: cls, reg, tag.*MultiTaskPipeline.*task_model"):
        build("flat")(**inputs)


def checkpointing_enable(model: MultiTaskModel) -> list[int]:
    """Turn gradient (activation) checkpointing on; return a counter of checkpointed calls."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    (enable or model.gradient_checkpointing_enable)()
    calls = [0]
    for module in model.modules():
        function = getattr(module, "_gradient_checkpointing_func", None)
        if function is not None:

            def counted(*args, function=function, **kwargs):
                calls[0] += 1
                return function(*args, **kwargs)

            module._gradient_checkpointing_func = counted
    return calls


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradient_checkpointing_gives_the_same_gradients(build, inputs, layout):
    def gradients(model: MultiTaskModel) -> dict[str, torch.Tensor]:
        model.train()
        outputs = model.forward_tasks(TASKS, **inputs, labels=labels_for(model))
        sum(output.loss for output in outputs.values()).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    expected = gradients(build(layout))
    model = build(layout)
    calls = checkpointing_enable(model)
    assert_same(gradients(model), expected, tolerance=1e-5)
    assert calls[0] > 0


def test_torch_compile(build, inputs):
    """One short case: dynamo traces the flat model (the eager backend: no code generation)."""
    model = build("flat")
    compiled = torch.compile(model, backend="eager")
    assert_same(all_logits(compiled, inputs), all_logits(model, inputs))


class AllTasks(nn.Module):
    """Every task's logits from one call (what `torch.export` exports)."""

    def __init__(self, model: MultiTaskModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple:
        outputs = self.model.forward_tasks(TASKS, input_ids, attention_mask)
        return tuple(outputs[task].logits for task in TASKS)


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "jmt"])
def test_torch_export(build, inputs, layout):
    """(A BiLSTM task layer packs sequences by their lengths, which `torch.export` cannot trace;
    the transformer task layer of the same layout is covered by `test_torch_export_jmt`.)"""
    model = AllTasks(build(layout))
    exported = torch.export.export(model, (inputs["input_ids"], inputs["attention_mask"]))
    actual = exported.module()(inputs["input_ids"], inputs["attention_mask"])
    assert_same(
        dict(zip(TASKS, actual, strict=True)), dict(zip(TASKS, model(**inputs), strict=True))
    )


def test_torch_export_jmt(build, inputs):
    model = build("jmt")
    exported = torch.export.export(model, (), {**inputs, "task": "cls"})
    actual = exported.module()(**inputs, task="cls").logits
    torch.testing.assert_close(actual, model(task="cls", **inputs).logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_half_precision(build, inputs, layout, dtype):
    model = build(layout)
    expected = all_logits(model, inputs)
    half = copy.deepcopy(model).to(dtype)
    assert half.dtype == dtype and all(p.dtype == dtype for p in half.parameters())
    actual = all_logits(half, inputs)
    for task in TASKS:
        assert actual[task].dtype == dtype
        torch.testing.assert_close(actual[task].float(), expected[task], rtol=0.05, atol=0.05)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_num_parameters_and_tie_weights(build, layout):
    model = build(layout)
    total = sum(p.numel() for p in model.parameters())
    embedded = sum(
        m.weight.numel() for m in model.encoder.embeddings.modules() if isinstance(m, nn.Embedding)
    )
    assert model.num_parameters() == total
    assert model.num_parameters(exclude_embeddings=True) == total - embedded
    model.encoder.requires_grad_(False)
    rest = (model.heads, model.task_layers, model.sharing)  # what the encoder does not hold
    trainable = sum(p.numel() for part in rest for p in part.parameters())
    assert (
        model.num_parameters(only_trainable=True)
        == trainable
        == total - (sum(p.numel() for p in model.encoder.parameters()))
    )
    # nothing is tied (no LM head): tie_weights changes nothing and shares no storage
    state = {name: value.clone() for name, value in model.state_dict().items()}
    model.tie_weights()
    assert_same(model.state_dict(), state, tolerance=0)
    pointers = [p.data_ptr() for p in model.parameters()]
    assert len(set(pointers)) == len(pointers)


# ------------------------------------------------------------------------------ 2. one task
def plain_class(head_type: str) -> type:
    return BertForTokenClassification if head_type == "tagging" else BertForSequenceClassification


MAPPED = {  # layout -> tasks whose head and layout map onto a plain transformers model
    "flat": ["cls", "tag"],
    "low": ["cls", "tag"],  # tag reads layer 1: a one-layer BertForTokenClassification
    "soft": ["cls", "tag"],  # the task's column is its top layer
}


@pytest.mark.parametrize("layout", MAPPED)
def test_task_model_gives_the_same_logits(build, inputs, layout):
    model = build(layout)
    for task in MAPPED[layout]:
        spec = model.config.task(task)
        plain = model.task_model(task)
        assert type(plain) is plain_class(spec["type"]) and not plain.training
        assert plain.config.id2label == dict(enumerate(spec["labels"]))
        assert plain.config.label2id == {label: i for i, label in enumerate(spec["labels"])}
        assert plain.config.num_hidden_layers == model.layer_index(task)
        with torch.no_grad():
            actual = plain(**inputs).logits
        torch.testing.assert_close(actual, model(task=task, **inputs).logits, rtol=0, atol=1e-5)


def test_task_model_of_a_regression_task(build, inputs):
    model = build("flat")
    put_task(model, task_spec("reg", "regression", head=DENSE))  # reads the first token
    plain = model.task_model("reg")
    assert plain.config.num_labels == 1 and plain.config.problem_type == "regression"
    with torch.no_grad():
        actual = plain(**inputs).logits
    assert actual.shape == (BATCH, 1)
    torch.testing.assert_close(actual[:, 0], model(task="reg", **inputs).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("layout", "task", "message"),
    [
        ("flat", "reg", r"task reg: its head pools the tokens by mean \(head.pooling\)"),
        ("jmt", "cls", r"task cls: a transformer task layer \(JMT, task_layer\) sits between"),
        ("cross_stitch", "cls", "task cls: cross_stitch sharing mixes its top layers"),
        ("sluice", "tag", "task tag: sluice sharing mixes its top layers"),
        ("flat", "nope", r"task 'nope': not a task of this model \(tasks: cls, reg, tag\)"),
    ],
)
def test_task_model_refuses_what_does_not_map(build, layout, task, message):
    with pytest.raises(UserError, match=message) as error:
        build(layout).task_model(task)
    assert "\n" not in str(error.value)
    if task != "nope":
        assert 'transformers.pipeline("mtnlp-multi-task", model=...)' in str(error.value)


def test_task_model_without_a_dense_layer_does_not_fit_bert(build):
    model = build("flat")
    put_task(model, task_spec("cls", "classification", CLS))  # the default head: no dense layer
    with pytest.raises(UserError, match=re.escape(
        "its head's layers (Linear(32, 2)) do not fit BertForSequenceClassification's "
        "(bert.pooler.dense: Linear(32, 32), classifier: Linear(32, 2)) (a card's "
        "head.hidden_size: 32 adds a dense layer)"
    )):  # fmt: skip
        model.task_model("cls")


def other_encoder(model_class: type, config: transformers.PreTrainedConfig) -> MultiTaskModel:
    for name, value in {
        "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": 2,
        "intermediate_size": 2 * HIDDEN, "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }.items():  # fmt: skip
        setattr(config, name, value)
    torch.manual_seed(0)
    return MultiTaskModel.from_encoder(model_class(config), tasks()).eval()


def test_task_model_of_a_roberta_encoder(tiny_tokenizer, inputs):
    """RoBERTa's classification head is dense + tanh + output layer on the first token."""
    model = other_encoder(RobertaModel, RobertaConfig(vocab_size=len(tiny_tokenizer)))
    plain = model.task_model("cls")
    assert type(plain) is RobertaForSequenceClassification
    with torch.no_grad():
        actual = plain(**inputs).logits
    torch.testing.assert_close(actual, model(task="cls", **inputs).logits, rtol=0, atol=1e-5)


def test_task_model_refuses_a_head_that_computes_otherwise(tiny_tokenizer):
    """ELECTRA's classification head has the same layers, with GELU instead of tanh."""
    config = ElectraConfig(vocab_size=len(tiny_tokenizer), embedding_size=HIDDEN)
    model = other_encoder(ElectraModel, config)
    with pytest.raises(UserError, match="ElectraForSequenceClassification computes other logits"):
        model.task_model("cls")
    assert type(model.task_model("tag")).__name__ == "ElectraForTokenClassification"


# ------------------------------------------------------------------------------ exports
PAIR = task_spec("pair", "classification", ["no", "yes"], head=DENSE, max_length=16,
                 inputs=["premise", "hypothesis"])  # fmt: skip
TEXTS = ["the cat sat on the mat", "terrible plot and boring dialogue", "a dog runs"]


@pytest.fixture
def folder(build, tiny_tokenizer, tmp_path):
    """A saved flat model (with a sentence-pair task) and its tokenizer."""
    model = build("flat")
    put_task(model, PAIR)
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


@pytest.fixture
def reference(folder, tiny_tokenizer):
    return MultiTaskPipeline(MultiTaskModel.from_pretrained(folder), tiny_tokenizer)


def test_text_classification_pipeline_on_an_export(folder, reference, tmp_path):
    assert export_task(folder, tmp_path / "cls", "cls") == tmp_path / "cls"
    classify = transformers.pipeline("text-classification", model=str(tmp_path / "cls"))
    assert type(classify.model) is BertForSequenceClassification
    for result, expected in zip(classify(TEXTS), reference(TEXTS, tasks=["cls"]), strict=True):
        assert result["label"] == expected["cls"]["label"]
        assert result["score"] == pytest.approx(expected["cls"]["score"], abs=1e-5)
    export_task(folder, tmp_path / "pair", "pair")
    pairs = [("a man sleeps", "someone is asleep"), ("the cat", "a dog runs")]
    classify = transformers.pipeline("text-classification", model=str(tmp_path / "pair"))
    assert classify.tokenizer.model_max_length == 16  # the task's max_length: truncation=True
    results = classify([{"text": a, "text_pair": b} for a, b in pairs], truncation=True)
    for result, expected in zip(results, reference(pairs, tasks=["pair"]), strict=True):
        assert result["label"] == expected["pair"]["label"]
        assert result["score"] == pytest.approx(expected["pair"]["score"], abs=1e-5)


def test_token_classification_pipeline_on_an_export(folder, reference, tiny_tokenizer, tmp_path):
    export_task(folder, tmp_path / "tag", "tag")
    tagger = transformers.pipeline("token-classification", model=str(tmp_path / "tag"))
    assert type(tagger.model) is BertForTokenClassification
    for text, expected in zip(TEXTS, reference(TEXTS, tasks=["tag"]), strict=True):
        tokens = {token["index"]: token for token in tagger(text, ignore_labels=[])}
        first = tiny_tokenizer(text.split(), is_split_into_words=True).word_ids()
        starts = [first.index(word) for word in range(len(text.split()))]  # each word's 1st token
        assert [tokens[i]["entity"] for i in starts] == expected["tag"]["tags"]
        scores = [tokens[i]["score"] for i in starts]
        assert scores == pytest.approx(expected["tag"]["scores"], abs=1e-5)


def test_export_encoder_gives_the_same_hidden_states(folder, tiny_tokenizer, tmp_path):
    export_encoder(folder, tmp_path / "encoder")
    encoder = AutoModel.from_pretrained(tmp_path / "encoder").eval()
    assert type(encoder) is BertModel
    batch = tiny_tokenizer(TEXTS, padding=True, return_tensors="pt")
    mine = MultiTaskModel.from_pretrained(folder).encoder(**batch, output_hidden_states=True)
    with torch.no_grad():
        theirs = encoder(**batch, output_hidden_states=True)
    torch.testing.assert_close(theirs.last_hidden_state, mine.last_hidden_state)
    assert len(theirs.hidden_states) == LAYERS + 1
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "encoder").vocab_size == len(
        tiny_tokenizer
    )


def test_export_encoder_refuses_column_sharing(build, tiny_tokenizer, tmp_path):
    build("soft").save_pretrained(tmp_path / "soft")
    tiny_tokenizer.save_pretrained(tmp_path / "soft")
    with pytest.raises(UserError, match="soft sharing each task runs its own copy of the top 1"):
        export_encoder(tmp_path / "soft", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def run_cli(capsys, *args: str) -> tuple[int, str]:
    """`mtnlp ARGS` in-process: (exit code, stderr)."""
    try:
        main(list(args))
    except SystemExit as exit:
        return exit.code, capsys.readouterr().err
    return 0, capsys.readouterr().err


def test_cli_export(folder, capsys, tmp_path):
    out = str(tmp_path / "rte")
    code, _ = run_cli(
        capsys, "export", str(folder), out, "--format", "transformers", "--task", "cls"
    )
    assert code == 0
    assert type(AutoModelForSequenceClassification.from_pretrained(out)).__name__ == (
        "BertForSequenceClassification"
    )
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        path.name for path in (tmp_path / "rte").iterdir()
    }
    encoder = str(tmp_path / "enc")
    assert run_cli(capsys, "export", str(folder), encoder, "--format", "encoder")[0] == 0
    cases = {  # arguments -> the one error line
        (out, "--task", "cls"): f"error: {out}: is not empty; give a new or empty folder",
        (str(tmp_path / "x"), "--task", "nope"): (
            "error: task 'nope': not a task of this model (tasks: cls, reg, tag, pair)"
        ),
        (str(tmp_path / "y"), "--task", "reg"): (
            "error: task reg: its head pools the tokens by mean (head.pooling), while "
            "transformers' sequence classification heads read the first token; predict it with "
            'mtnlp.MultiTaskPipeline or transformers.pipeline("mtnlp-multi-task", model=...)'
        ),
    }
    for (output, *args), line in cases.items():
        code, err = run_cli(
            capsys, "export", str(folder), output, "--format", "transformers", *args
        )
        assert code == 2 and "Traceback" not in err
        assert [text for text in err.splitlines() if text.startswith("error:")] == [line]
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# ------------------------------------------------------------------------------ 3. whole model
def test_single_task_auto_classes_point_to_what_works(folder):
    config = MultiTaskModel.config_class.from_pretrained(folder)
    fits = {
        AutoModelForSequenceClassification: "--task cls|reg|pair",
        AutoModelForTokenClassification: "--task tag",
    }
    for auto, tasks_hint in fits.items():
        for load, argument in ((auto.from_pretrained, folder), (auto.from_config, config)):
            with pytest.raises(UserError) as error:
                load(argument)
            message = str(error.value)
            assert f"is not one {auto.__name__}" in message and tasks_hint in message
            assert "mtnlp export" in message and "--format transformers" in message
            assert 'transformers.pipeline("mtnlp-multi-task", model=...)' in message
            assert "mtnlp.MultiTaskPipeline" in message and "\n" not in message
    for task in ("text-classification", "sentiment-analysis", "token-classification", "ner"):
        with pytest.raises(UserError, match=r"mtnlp export .* --format transformers --task"):
            transformers.pipeline(task, model=str(folder))


@pytest.mark.parametrize("layout", ["low", "sluice"])
def test_multi_task_pipeline_through_transformers(build, tiny_tokenizer, layout, tmp_path):
    model = build(layout)
    model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    predict = transformers.pipeline("mtnlp-multi-task", model=str(tmp_path), device="cpu")
    expected = MultiTaskPipeline(model, tiny_tokenizer)(TEXTS)
    for result, reference in zip(predict(TEXTS), expected, strict=True):
        assert result.keys() == reference.keys() == set(TASKS)
        assert result["cls"]["label"] == reference["cls"]["label"]
        assert result["reg"]["value"] == pytest.approx(reference["reg"]["value"], abs=1e-5)
        assert result["tag"]["tags"] == reference["tag"]["tags"]
