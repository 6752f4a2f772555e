"""The parity pair, laid out as the authors build them (notes A.7): a Transformer encoder target
and a recurrent guide, each mapping padded bit strings ``(b, T)`` (pad token 2) to two logits.

Both find each string's length from its padding, so they take tokens alone, as every model in
the registry does. The guide runs its RNN over the packed sequence (hooked, it is captured as
the padded ``(b, T', H)`` output, zeros past each length: :func:`guidance_tune.layers.batch_first`).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from guidance_tune.models.registry import register_model
from guidance_tune.models.sequence import sinusoidal_positions

PAD = 2  # guidance_tune.sequences.PARITY_PAD: models do not import the data


class ParityTransformer(nn.Module):
    """Embedding, sinusoidal positions, ``num_layers`` calls of ``nn.TransformerEncoderLayer``
    (post-LN, ReLU) under a key-padding mask, a mean over the real positions, Linear -> 2.

    ``layout="authors"``: one layer instance called ``num_layers`` times (tied weights), as the
    released code does; ``"untied"``: a layer each. Each call has 5 hooked records (self-attention,
    norm1, linear1, linear2, norm2): 5 for the paper's single layer, 20 for 4.
    """

    def __init__(
        self,
        vocab_size: int,
        max_length: int,
        d_model: int,
        nhead: int,
        dim_feedforward: int,
        num_layers: int,
        dropout: float,
        layout: str,
    ) -> None:
        super().__init__()
        if layout not in ("authors", "untied"):
            raise ValueError(f"layout {layout!r}: choose authors or untied")
        self.num_layers, self.layout = num_layers, layout
        self.embed = nn.Embedding(vocab_size, d_model)
        self.register_buffer(
            "positions", sinusoidal_positions(max_length, d_model), persistent=False
        )
        count = 1 if layout == "authors" else num_layers
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model, nhead, dim_feedforward, dropout=dropout, batch_first=True
            )
            for _ in range(count)
        )
        self.head = nn.Linear(d_model, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        padding = tokens == PAD
        hidden = self.embed(tokens) + self.positions[: tokens.shape[1]]
        for index in range(self.num_layers):
            layer = self.layers[0 if self.layout == "authors" else index]
            hidden = layer(hidden, src_key_padding_mask=padding)
        real = (~padding).unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * real).sum(1) / real.sum(1).clamp_min(1)
        return self.head(pooled)


@register_model("parity_transformer", takes="tokens", predicts="label")
def parity_transformer(
    in_channels: int,
    image_size: int,
    num_classes: int,
    d_model: int = 512,
    nhead: int = 8,
    dim_feedforward: int = 2048,
    num_layers: int = 1,
    dropout: float = 0.1,
    layout: str = "authors",
) -> nn.Module:
    del num_classes  # always 2: a parity bit
    return ParityTransformer(
        in_channels, image_size, d_model, nhead, dim_feedforward, num_layers, dropout, layout
    )


class ParityRNN(nn.Module):
    """Embedding(3, 3), a tanh ``nn.RNN`` over the packed strings, the last real step, ReLU,
    Linear -> 2. One hooked record: the RNN's output sequence (its top layer's)."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden_size: int, num_layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.rnn = nn.RNN(embed_dim, hidden_size, num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        lengths = (tokens != PAD).sum(1).clamp_min(1)
        packed = pack_padded_sequence(
            self.embed(tokens), lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        _, last = self.rnn(packed)  # (num_layers, b, H): each string's state at its last bit
        return self.head(last[-1].relu())


@register_model("parity_rnn", takes="tokens", predicts="label")
def parity_rnn(
    in_channels: int,
    image_size: int,
    num_classes: int,
    embed_dim: int = 3,
    hidden_size: int = 256,
    num_layers: int = 1,
) -> nn.Module:
    del image_size, num_classes  # any length; always 2 classes
    return ParityRNN(in_channels, embed_dim, hidden_size, num_layers)
