"""The sequence tasks on the CPU: copy-paste and parity data, the token task, the five sequence
models with and without a guide, the authors' layer pairs, and padding in CKA."""

import itertools
import re

import mlflow
import pytest
import torch
import yaml

from guidance_tune.cli.main import main
from guidance_tune.config import (
    DataConfig,
    GuidanceConfig,
    ModelConfig,
    parse_run_config,
    with_changes,
)
from guidance_tune.data.sequences import (
    COPY,
    EOS,
    PARITY_PAD,
    VOCAB_SIZE,
    copy_paste_examples,
    parity_examples,
    parity_positions,
)
from guidance_tune.data.splits import load_data
from guidance_tune.data.tasks import TASKS, task_of
from guidance_tune.guidance.alignment import gram
from guidance_tune.guidance.layers import LayerCapture, build_pairs, discover_layers, zero_padding
from guidance_tune.guidance.term import Guidance, make_noise
from guidance_tune.models import create_model
from guidance_tune.study.config import parse_study_config
from guidance_tune.study.launch import launch
from guidance_tune.tracking.results import find_study
from guidance_tune.training.checkpoint import load_checkpoint, save_checkpoint
from guidance_tune.training.loop import build_run, fit, guided_loss, train

from .test_study import assert_the_winner_is_a_registered_model
from .test_train import TIMING_KEYS, Recorder

SMALL = {
    "rnn_lm": {"embed_dim": 16, "hidden_size": 24},
    "transformer_decoder": {"d_model": 16, "nhead": 2, "dim_feedforward": 16},
    "transformer_lm": {"d_model": 16, "nhead": 2, "dim_feedforward": 32},
    "parity_transformer": {"d_model": 16, "nhead": 2, "dim_feedforward": 32},
    "parity_rnn": {"hidden_size": 16},
}
DATA = {
    "copy_paste": {"name": "copy_paste", "synthetic_samples": 256, "sequence_lengths": [3, 6]},
    "parity": {"name": "parity", "synthetic_samples": 256, "sequence_lengths": [2, 12]},
    "grammar_lm": {"name": "grammar_lm", "synthetic_samples": 64, "context_length": 12},
}
# The paper's pairs: (dataset, target, guide), target <- guide.
SETTINGS = [
    ("copy_paste", "rnn_lm", "transformer_decoder"),
    ("parity", "parity_transformer", "parity_rnn"),
    ("grammar_lm", "rnn_lm", "transformer_lm"),
]


def small_model(name: str, **kwargs) -> dict:
    return {"name": name, "kwargs": {**SMALL[name], **kwargs}}


def small_run(dataset="copy_paste", target="rnn_lm", guide="transformer_decoder", **changes):
    config = {
        "name": "seq",
        "target": small_model(target),
        "guide": small_model(guide),
        "data": DATA[dataset],
        "optim": {"optimizer": "adamw", "lr": 1e-3},
        "train": {"epochs": 1, "batch_size": 16, "max_steps_per_epoch": 3},
        **changes,
    }
    return parse_run_config(config)


def test_each_target_is_its_input_string_again_after_copy():
    inputs, targets, lengths = copy_paste_examples(200, (3, 9), torch.Generator().manual_seed(1))
    assert inputs.shape == targets.shape == (200, 2 * 9 + 2)
    assert set(lengths.tolist()) == set(range(3, 10))  # every length in the range occurs
    for x, y, length in zip(inputs, targets, lengths.tolist(), strict=True):
        string = x[:length]
        assert (string < 10).all()
        assert x[length] == COPY and x[2 * length + 1] == EOS
        assert (x[length + 1 : 2 * length + 1] == 0).all() and (x[2 * length + 2 :] == 0).all()
        assert (y[: length + 1] == 0).all()
        assert torch.equal(y[length + 1 : 2 * length + 1], string)
        assert y[2 * length + 1] == EOS and (y[2 * length + 2 :] == 0).all()


def test_each_parity_label_is_the_parity_of_its_unpadded_bits():
    inputs, labels, lengths = parity_examples(300, (2, 11), torch.Generator().manual_seed(3))
    assert inputs.shape == (300, 11) and set(lengths.tolist()) == set(range(2, 12))
    for x, label, length in zip(inputs.tolist(), labels.tolist(), lengths.tolist(), strict=True):
        bits, padding = x[:length], x[length:]
        assert set(bits) <= {0, 1} and padding == [PARITY_PAD] * len(padding)
        assert label == sum(bits) % 2
    assert 0.4 < labels.float().mean() < 0.6


@pytest.mark.parametrize("dataset", ["copy_paste", "parity"])
def test_the_same_split_seed_gives_the_same_data_and_another_differs(dataset):
    def splits(seed):
        config = DataConfig(name=dataset, synthetic_samples=64, split_seed=seed)
        return load_data(config, torch.device("cpu"))

    first, again, other = splits(0), splits(0), splits(1)
    for name in ("train", "val", "test"):
        assert getattr(first, name).digest() == getattr(again, name).digest()
        assert getattr(first, name).digest() != getattr(other, name).digest()
    width = {"copy_paste": 2 * 40 + 2, "parity": 50}[dataset]  # the authors' lengths by default
    assert first.input_shape == (width,)


def test_the_token_task_scores_only_non_blank_targets():
    tokens = TASKS["tokens"]
    targets = torch.tensor([[0, 3, 0, 5]])
    logits = torch.full((1, 4, 6), -10.0)
    logits[0, 0, 1] = logits[0, 1, 3] = logits[0, 2, 2] = logits[0, 3, 4] = 10.0
    metrics = tokens.scores(tokens.score_sums(logits, targets, 6), "val", 6)
    assert metrics["val/acc"] == 0.5  # token 3 right, token 5 wrong; blanks not counted
    wrong_blanks = logits.clone()
    wrong_blanks[0, 0] = wrong_blanks[0, 2] = torch.randn(6)
    assert tokens.loss(wrong_blanks, targets) == tokens.loss(logits, targets)


def paper_layers(dataset, target, guide, **guide_kwargs):
    """Layer names of the two networks at their default (paper) sizes, on the dataset's data."""
    splits = load_data(
        DataConfig(**{**DATA[dataset], "synthetic_samples": 64}), torch.device("cpu")
    )
    shape = {"in_channels": splits.in_channels, "image_size": splits.image_size}
    sample, _ = next(splits.train.batches(2, epoch=0, seed=0, shuffle=False, drop_last=False))
    names = []
    for name, kwargs in ((target, {}), (guide, guide_kwargs)):
        spec = ModelConfig(name=name, kwargs=kwargs)
        model = create_model(spec, seed=0, num_classes=splits.num_classes, **shape).eval()
        names.append([layer.name for layer in discover_layers(model, sample)])
    return names


# guidance-method.md A.3 and authors-layer-pairs.md: guide record counts and effective pairs.
@pytest.mark.parametrize(
    "dataset, target, guide, guide_kwargs, records, pairs",
    [
        # RNN_0 <- FFN output of decoder layer 1, RNN_1 <- layer-2 output, RNN_2 <- LN1 of
        # layer 4, RNN_3 <- layer-4 output: guide records 5, 15, 25, 31
        ("copy_paste", "rnn_lm", "transformer_decoder", {}, 32,
         ["layers.0.linear2", "layers.0#1", "layers.0.norm1#3", "layers.0#3"]),
        ("copy_paste", "rnn_lm", "transformer_decoder", {"layout": "causal"}, 32,
         ["layers.0.linear2", "layers.1", "layers.3.norm1", "layers.3"]),
        # RNN_0 <- FFN hidden of layer 1, RNN_1 <- FFN output of layer 2, RNN_2 <- LN1 of
        # layer 4, RNN_3 <- FFN output of layer 4: guide records 3, 9, 15, 19
        ("grammar_lm", "rnn_lm", "transformer_lm", {}, 20,
         ["layers.0.hidden", "layers.1.output", "layers.3.norm1", "layers.3.output"]),
    ],
)  # fmt: skip
def test_the_authors_mapping_pairs_rnn_layers_as_their_table_says(
    dataset, target, guide, guide_kwargs, records, pairs
):
    target_layers, guide_layers = paper_layers(dataset, target, guide, **guide_kwargs)
    assert target_layers == ["rnns.0", "rnns.1", "rnns.2", "rnns.3"]
    assert len(guide_layers) == records
    mapped = build_pairs(target_layers, guide_layers, mapping="authors")
    assert mapped == list(zip(target_layers, pairs, strict=True))


def test_parity_has_one_pair_the_transformers_first_self_attention_and_the_rnn():
    """One nn.RNN is one record, whatever its depth; the encoder has 5 per layer call."""
    for rnn_layers in (1, 2):
        target_layers, guide_layers = paper_layers(
            "parity", "parity_transformer", "parity_rnn", num_layers=rnn_layers
        )
        assert guide_layers == ["rnn"] and len(target_layers) == 5
        assert build_pairs(target_layers, guide_layers, mapping="authors") == [
            ("layers.0.self_attn", "rnn")
        ]
    spec = ModelConfig(name="parity_transformer", kwargs={"num_layers": 4})
    target = create_model(spec, seed=0, in_channels=3, image_size=12, num_classes=2)
    found = [layer.name for layer in discover_layers(target, torch.zeros(2, 12).long())]
    assert len(found) == 20 and found[5] == "layers.0.self_attn#1"  # one tied layer, 4 calls
    assert build_pairs(found, ["rnn"], mapping="authors") == [("layers.0.self_attn", "rnn")]


def test_the_blocks_subset_pairs_each_rnn_layer_with_a_decoder_layer_output():
    target_layers, guide_layers = paper_layers("copy_paste", "rnn_lm", "transformer_decoder")
    mapped = build_pairs(target_layers, guide_layers, mapping="authors", guide_subset="blocks")
    assert mapped == list(
        zip(target_layers, ["layers.0", "layers.0#1", "layers.0#2", "layers.0#3"], strict=True)
    )


def test_the_causal_guide_never_sees_a_later_token_and_the_authors_layout_does():
    shape = {"in_channels": VOCAB_SIZE, "image_size": 12, "num_classes": VOCAB_SIZE}
    tokens = torch.randint(0, 10, (3, 12), generator=torch.Generator().manual_seed(0))
    later = tokens.clone()
    later[:, 8:] = (later[:, 8:] + 1) % 10
    for layout, sees_later in (("causal", False), ("authors", True)):
        spec = ModelConfig(**small_model("transformer_decoder", layout=layout))
        guide = create_model(spec, seed=0, **shape).eval()
        with torch.no_grad():
            before = guide(tokens)[:, :8]
            after = guide(later)[:, :8]
        assert (not torch.allclose(before, after)) == sees_later, layout


@pytest.mark.parametrize("dataset, target, guide", SETTINGS)
def test_a_guided_step_runs_the_target_once_and_gives_the_guide_no_gradient(dataset, target, guide):
    run = build_run(small_run(dataset, target, guide))
    forwards = []
    run.target.register_forward_pre_hook(lambda module, args: forwards.append(1))
    x, y = next(run.data.train.batches(16, epoch=0, seed=0, shuffle=True, drop_last=True))
    task, guidance = guided_loss(run, x, y)
    (task + guidance).backward()
    assert len(forwards) == 1
    assert guidance.item() > 0
    assert all(p.grad is None for p in run.guide.parameters())
    assert all(p.grad is not None for p in run.target.parameters() if p.requires_grad)
    trained = build_run(small_run(dataset, target, guide))
    result = fit(trained)
    assert result.status.value == "finished"
    pair = next(key for key in result.final if key.startswith("train/cka/"))
    assert 0 < result.final[pair] <= 1
    # a whole run later, the guide is still the network it was built as (the target is not)
    built = build_run(small_run(dataset, target, guide))
    for trained_model, built_model, same in (
        (trained.guide, built.guide, True),
        (trained.target, built.target, False),
    ):
        before = built_model.state_dict()
        after = trained_model.state_dict()
        assert all(torch.equal(after[k], before[k]) for k in before) == same


@pytest.mark.parametrize(
    "dataset, model",
    [
        ("copy_paste", "rnn_lm"),
        ("copy_paste", "transformer_decoder"),
        ("grammar_lm", "transformer_lm"),
        ("parity", "parity_transformer"),
        ("parity", "parity_rnn"),
    ],
)
def test_every_sequence_model_trains_unguided(dataset, model):
    """The guides train too: that is how a study makes its trained guide (a prepare step)."""
    run = build_run(small_run(dataset, model, model, guidance={"kind": "none"}))
    assert run.guide is None
    before = {name: p.detach().clone() for name, p in run.target.named_parameters()}
    result = fit(run)
    assert result.status.value == "finished"
    unmoved = [n for n, p in run.target.named_parameters() if torch.equal(p, before[n])]
    assert unmoved == []
    score = run.task.score
    assert {"val/loss", f"val/{score}", f"best/{score}"} <= set(result.final)


def parity_term(pad_masking=True):
    """An untrained parity pair without dropout (deterministic in train mode), its term, given
    the data's padding as a run gives it."""
    shape = {"in_channels": 3, "image_size": 20, "num_classes": 2}
    target_spec = ModelConfig(**small_model("parity_transformer", dropout=0.0))
    target = create_model(target_spec, seed=0, **shape).train()
    guide = create_model(ModelConfig(**small_model("parity_rnn")), seed=1, **shape)
    sample = torch.zeros(2, 20, dtype=torch.long)
    config = GuidanceConfig(pad_masking=pad_masking)
    term = Guidance(target, guide, sample, config, valid_positions=parity_positions)
    return target, term


def similarity(target, term, tokens):
    logits = target(tokens)
    term(tokens, logits)
    return term.pop_similarities()["layers.0.self_attn:rnn"]


def padded_bits():
    """16 bit strings of 3-9 bits, padded to their longest (9) and to 20 positions."""
    tokens, _, _ = parity_examples(16, (3, 9), torch.Generator().manual_seed(0))
    assert tokens.shape[1] == 9
    wide = torch.full((16, 20), PARITY_PAD)
    wide[:, :9] = tokens
    return tokens, wide


def test_padding_adds_nothing_to_cka_where_it_is_masked():
    """The same bit strings padded to 20 positions and to their longest (9) compare the same:
    every padded position is zeroed in both networks. Unmasked (``pad_masking: false``, the
    authors'), the extra padding moves CKA (the encoder's outputs at padded positions are not
    zero)."""
    tokens, wide = padded_bits()
    masked = [similarity(*parity_term(), batch) for batch in (tokens, wide)]
    assert masked[0] == pytest.approx(masked[1], abs=1e-6)
    unmasked = [similarity(*parity_term(pad_masking=False), batch) for batch in (tokens, wide)]
    assert abs(unmasked[0] - unmasked[1]) > 1e-3


def test_without_pad_masking_the_gram_is_of_the_activations_as_the_model_gave_them():
    _, wide = padded_bits()
    grams = {}
    for pad_masking in (True, False):
        target, term = parity_term(pad_masking)
        raw = LayerCapture(target, ["layers.0.self_attn"], torch.Tensor.detach)
        target(wide)
        grams[pad_masking] = term._target_capture.captured["layers.0.self_attn"]
        activation = raw.captured["layers.0.self_attn"]  # (16, 20, d), the same in both builds
    assert torch.allclose(grams[False], gram(activation), atol=1e-5)
    masked = zero_padding(activation, parity_positions(wide))
    assert torch.allclose(grams[True], gram(masked), atol=1e-5)
    assert not torch.allclose(grams[True], grams[False], atol=1e-3)


def rnn_states(model, tokens):
    """Each RNN layer's initial state as given (None: zeros) and its final state."""
    seen = []
    for rnn in model.rnns:
        rnn.register_forward_hook(lambda m, args, out: seen.append((args[1], out[1])))
    model(tokens)
    return seen


def copy_paste_rnn(chained_states=False):
    shape = {"in_channels": VOCAB_SIZE, "image_size": 12, "num_classes": VOCAB_SIZE}
    spec = ModelConfig(**small_model("rnn_lm", chained_states=chained_states))
    tokens = torch.randint(0, 10, (3, 12), generator=torch.Generator().manual_seed(0))
    return create_model(spec, seed=0, **shape), tokens


def test_chained_states_start_each_rnn_layer_from_the_final_state_of_the_one_below():
    chained, tokens = copy_paste_rnn(chained_states=True)
    states = rnn_states(chained.train(), tokens)
    assert len(states) == 4 and states[0][0] is None
    for (_, below), (initial, _) in itertools.pairwise(states):
        assert initial is below and initial.requires_grad  # the same forward's graph
    default, _ = copy_paste_rnn()
    assert all(initial is None for initial, _ in rnn_states(default, tokens))  # zero states


def test_chained_states_let_the_upper_layers_see_future_tokens():
    """Why they are off by default: with them the first position's logits depend on the last
    token, which a language model is asked to predict."""
    for chained in (False, True):
        model, tokens = copy_paste_rnn(chained_states=chained)
        later = tokens.clone()
        later[:, -1] = (later[:, -1] + 1) % 10
        with torch.no_grad():
            first, first_later = model(tokens)[:, 0], model(later)[:, 0]
        assert torch.equal(first, first_later) != chained, chained


# The authors' protocol, one switch at a time, on the copy-paste pair (padding after EOS, a
# Transformer guide with dropout 0.1, an RNN target).
AUTHORS_SWITCHES = {
    "pad_masking": {"guidance.pad_masking": False},
    "train_mode": {"guide.train_mode": True},
    "chained_states": {"target.kwargs.chained_states": True},
}


@pytest.fixture(scope="module")
def default_copy_paste_run():
    return fit(build_run(small_run())).final


@pytest.mark.parametrize("switch", sorted(AUTHORS_SWITCHES))
def test_each_authors_switch_runs_a_guided_copy_paste_run_that_differs_from_the_default(
    switch, default_copy_paste_run
):
    default = default_copy_paste_run
    run = build_run(with_changes(small_run(), AUTHORS_SWITCHES[switch], switch))
    result = fit(run)
    assert result.status.value == "finished"
    assert 0 < result.final["train/guidance_loss"] != default["train/guidance_loss"]
    assert run.term.guide_dropout == (switch == "train_mode")


def test_a_guided_run_with_guide_dropout_resumes_bitwise(tmp_path):
    """The guide's dropout masks come from the run's RNG, which the checkpoint holds."""
    config = small_run(train={"epochs": 2, "batch_size": 16, "max_steps_per_epoch": 3})
    config = with_changes(config, {"guide.train_mode": True}, "guide dropout")
    uninterrupted = Recorder()
    train(config, uninterrupted)
    path = save_checkpoint(uninterrupted.checkpoints[0], tmp_path / "epoch1")
    resumed = train(config, Recorder(), checkpoint=load_checkpoint(path))
    untimed = [
        [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in history]
        for history in (resumed.history, uninterrupted.metrics)
    ]
    assert untimed[0] == untimed[1]


def test_token_noise_is_uniform_over_the_batchs_tokens():
    batch = torch.tensor([[3, 1, 0, 12], [5, 5, 7, 0]])
    noise = make_noise(batch.repeat(500, 1), "clamped_gaussian")
    assert noise.dtype == batch.dtype and noise.shape == (1000, 4)
    counts = torch.bincount(noise.flatten(), minlength=13)
    assert len(counts) == 13  # nothing above the largest token, 12
    assert counts.min() > 0.7 * counts.float().mean()  # every token 0..12, about equally


def test_token_noise_for_the_guide_trains_a_copy_paste_target():
    config = small_run(noise_warmup={"steps": 2}, guidance={"guide_inputs": "noise"})
    assert fit(build_run(config)).status.value == "finished"


@pytest.mark.slow
def test_a_two_trial_copy_paste_study_runs_through_ray_tune_and_mlflow(ray_local, tmp_path):
    spec = {
        **small_run().model_dump(mode="json"),
        "name": "copy-study",
        "study": {
            "space": "guidance",
            "num_trials": 2,
            "metric": "best/acc",
            "mode": "max",
            "scheduler": {"kind": "fifo"},
            "max_concurrent_trials": 2,
            "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
            "storage_path": str(tmp_path / "ray_results"),
        },
    }
    result = launch(parse_study_config(spec))
    assert result.num_errors == 0 and result.best_run_id is not None
    _, children = find_study(result.tracking_uri, "copy-study")
    assert sorted(c.data.tags["arm"] for c in children) == ["guided", "unguided"]
    for child in children:
        assert child.info.status == "FINISHED"
        assert 0 <= child.data.metrics["best/acc"] <= 1
    # the RNN winner, through torch.export and back, gives the checkpoint's logits
    uri, winner = result.tracking_uri, result.best_run_id
    assert_the_winner_is_a_registered_model(uri, winner, "copy-study", tmp_path / "winner")


@pytest.mark.parametrize("data, target, guide", SETTINGS)
def test_a_guided_sequence_run_reruns_from_its_run_id_to_the_same_metrics(
    data, target, guide, tmp_path, capsys
):
    """The generated data comes back from the seeds in the logged config alone, so a rerun
    without Ray repeats every number the original logged."""
    config = small_run(data, target, guide, train={"epochs": 2, "batch_size": 16})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["train", str(path), "--quiet", "--tracking-uri", uri]) == 0
    run_id = capsys.readouterr().out.split("mlflow run: ")[1].split()[0]
    assert main(["rerun", run_id, "--tracking-uri", uri, "--quiet"]) == 0
    client = mlflow.MlflowClient(uri)
    original = client.get_run(run_id)
    (rerun,) = client.search_runs([original.info.experiment_id], f"tags.rerun_of = '{run_id}'")
    score = f"best/{task_of(data).score}"
    for key in ("train/guidance_loss", "val/loss", "best/loss", score):
        assert rerun.data.metrics[key] == original.data.metrics[key], key


@pytest.mark.parametrize(
    "study, override, named",
    [
        ("copy_paste_cpu", "target.name=parity_transformer", "target.name 'parity_transformer'"),
        ("quickstart", "data.name=parity", "target.name 'deep_fcn' takes images"),
    ],
)
def test_study_check_refuses_a_model_its_data_cannot_feed(study, override, named, capsys):
    assert main(["study", "check", f"studies/{study}.yaml", "--set", override]) == 2
    assert named in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, named",
    [
        (["layers", "rnn_lm"], "name a token data set with --data (copy_paste, parity"),
        (["layers", "deep_fcn", "--data", "copy_paste"], "target 'deep_fcn' takes images"),
    ],
)
def test_the_layers_command_refuses_a_model_its_inputs_cannot_feed(args, named, capsys):
    assert main(args) == 2
    assert named in capsys.readouterr().err


@pytest.mark.parametrize(
    "target, guide, data, pair",
    [
        ("rnn_lm", "transformer_decoder", "copy_paste", r"rnns\.3 +<- layers\.0#3\n"),
        ("parity_transformer", "parity_rnn", "parity", r"layers\.0\.self_attn +<- rnn\n"),
        ("rnn_lm", "transformer_lm", "grammar_lm", r"rnns\.0 +<- layers\.0\.hidden\n"),
    ],
)
def test_the_layers_command_shows_the_sequence_pairs_on_generated_inputs(
    target, guide, data, pair, capsys
):
    assert main(["layers", target, "--guide", guide, "--data", data]) == 0
    assert re.search(pair, capsys.readouterr().out)
