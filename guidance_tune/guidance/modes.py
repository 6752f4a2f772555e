"""The modes the two networks run in: the guide in eval (its dropout in train mode where
``guide.train_mode`` asks, as the authors' sequence guides run), both wholly in eval while
their layers are found."""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

# Modules whose train mode changes nothing but dropout: their own (a Dropout layer's, attention's
# on its weights, an RNN's between layers), or an encoder layer's fused eval path, which skips it.
DROPOUT_MODULES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    nn.MultiheadAttention,
    nn.RNNBase,
    nn.TransformerEncoderLayer,
)


def guide_mode(guide: nn.Module, *, dropout: bool) -> nn.Module:
    """``guide`` in eval mode; with ``dropout``, its :data:`DROPOUT_MODULES` in train mode, as the
    authors' sequence guides run (guidance-method.md A.4), BatchNorm and the rest still in eval,
    so masks are drawn from the global RNG but no running statistic moves."""
    guide.eval()
    if dropout:
        for module in guide.modules():
            if isinstance(module, DROPOUT_MODULES):
                module.training = True
    return guide


@contextmanager
def eval_mode(*models: nn.Module):
    """Layer discovery must not update BatchNorm statistics or draw dropout masks."""
    modes = [[m.training for m in model.modules()] for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for model, flags in zip(models, modes, strict=True):
            for module, flag in zip(model.modules(), flags, strict=True):
                module.training = flag
