"""Copy-paste: the generator, the token task, the RNN target and Transformer guide, and the
authors' layer mapping between them, on the CPU."""

import pytest
import torch

from guidance_tune.config import DataConfig, ModelConfig, parse_run_config
from guidance_tune.data import load_data
from guidance_tune.layers import build_pairs, discover_layers
from guidance_tune.models import create_model
from guidance_tune.results import find_study
from guidance_tune.sequences import COPY, EOS, VOCAB_SIZE, copy_paste_examples
from guidance_tune.study import launch
from guidance_tune.study_config import parse_study_config
from guidance_tune.tasks import score_sums, scores, task_loss
from guidance_tune.train import build_run, fit, guided_loss

SMALL_TARGET = {"name": "rnn_lm", "kwargs": {"embed_dim": 16, "hidden_size": 24}}
SMALL_GUIDE = {
    "name": "transformer_decoder",
    "kwargs": {"d_model": 16, "nhead": 2, "dim_feedforward": 16},
}


def guide_spec(layout: str) -> ModelConfig:
    kwargs = {**SMALL_GUIDE["kwargs"], "layout": layout}
    return ModelConfig(name="transformer_decoder", kwargs=kwargs)


def small_run(**changes):
    config = {
        "name": "copy",
        "target": SMALL_TARGET,
        "guide": SMALL_GUIDE,
        "data": {"name": "copy_paste", "synthetic_samples": 256, "copy_lengths": [3, 6]},
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


def test_the_same_split_seed_gives_the_same_data_and_another_differs():
    def splits(seed):
        config = DataConfig(name="copy_paste", synthetic_samples=64, split_seed=seed)
        return load_data(config, torch.device("cpu"))

    first, again, other = splits(0), splits(0), splits(1)
    for name in ("train", "val", "test"):
        assert getattr(first, name).digest() == getattr(again, name).digest()
        assert getattr(first, name).digest() != getattr(other, name).digest()
    assert first.input_shape == (2 * 40 + 2,) and first.num_classes == VOCAB_SIZE


def test_the_token_task_scores_only_non_blank_targets():
    targets = torch.tensor([[0, 3, 0, 5]])
    logits = torch.full((1, 4, 6), -10.0)
    logits[0, 0, 1] = logits[0, 1, 3] = logits[0, 2, 2] = logits[0, 3, 4] = 10.0
    sums = score_sums("tokens", logits, targets, num_classes=6)
    metrics = scores("tokens", sums, "val", num_classes=6)
    assert metrics["val/acc"] == 0.5  # token 3 right, token 5 wrong; blanks not counted
    wrong_blanks = logits.clone()
    wrong_blanks[0, 0] = wrong_blanks[0, 2] = torch.randn(6)
    assert task_loss("tokens", wrong_blanks, targets) == task_loss("tokens", logits, targets)


def test_the_authors_mapping_pairs_rnn_layers_with_their_decoder_layers():
    """guidance-method.md A.3, copy-paste: RNN_0 <- FFN output of decoder layer 1,
    RNN_1 <- layer-2 output, RNN_2 <- LN1 of layer 4, RNN_3 <- layer-4 output."""
    tokens = torch.zeros(2, 10, dtype=torch.long)
    shape = {"in_channels": VOCAB_SIZE, "image_size": 10, "num_classes": VOCAB_SIZE}
    target = create_model(ModelConfig(**SMALL_TARGET), seed=0, **shape)
    target_layers = [layer.name for layer in discover_layers(target, tokens)]
    assert target_layers == ["rnns.0", "rnns.1", "rnns.2", "rnns.3"]
    expected = {
        "authors": ["layers.0.linear2", "layers.0#1", "layers.0.norm1#3", "layers.0#3"],
        "causal": ["layers.0.linear2", "layers.1", "layers.3.norm1", "layers.3"],
    }
    for layout, guide_layers in expected.items():
        guide = create_model(guide_spec(layout), seed=0, **shape).eval()
        found = [layer.name for layer in discover_layers(guide, tokens)]
        assert len(found) == 32  # 8 hooked calls per decoder layer, the logits left out
        pairs = build_pairs(target_layers, found, mapping="authors")
        assert pairs == list(zip(target_layers, guide_layers, strict=True)), layout


def test_the_causal_guide_never_sees_a_later_token_and_the_authors_layout_does():
    shape = {"in_channels": VOCAB_SIZE, "image_size": 12, "num_classes": VOCAB_SIZE}
    tokens = torch.randint(0, 10, (3, 12), generator=torch.Generator().manual_seed(0))
    later = tokens.clone()
    later[:, 8:] = (later[:, 8:] + 1) % 10
    for layout, sees_later in (("causal", False), ("authors", True)):
        guide = create_model(guide_spec(layout), seed=0, **shape).eval()
        with torch.no_grad():
            before = guide(tokens)[:, :8]
            after = guide(later)[:, :8]
        assert (not torch.allclose(before, after)) == sees_later, layout


@pytest.mark.parametrize("guided", [True, False])
def test_copy_paste_trains_with_one_target_forward_a_step_and_no_gradient_to_the_guide(guided):
    run = build_run(small_run(guidance={"kind": "alignment" if guided else "none"}))
    forwards = []
    run.target.register_forward_pre_hook(lambda module, args: forwards.append(1))
    x, y = next(run.data.train.batches(16, epoch=0, seed=0, shuffle=True, drop_last=True))
    task, guidance = guided_loss(run, x, y)
    (task + guidance).backward()
    assert len(forwards) == 1
    if guided:
        assert guidance.item() > 0
        assert all(p.grad is None for p in run.guide.parameters())
    else:
        assert run.guide is None
    result = fit(build_run(small_run(guidance={"kind": "alignment" if guided else "none"})))
    assert result.status.value == "finished"
    assert {"val/loss", "val/acc", "best/acc"} <= set(result.final)


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
