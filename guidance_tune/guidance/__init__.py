"""Guidance itself: similarity metrics as pure tensor functions (:mod:`.alignment`), the hooked
layers and the guide-to-target mapping (:mod:`.layers`), the modes the networks run in
(:mod:`.modes`), and the loss term a training step adds (:mod:`.term`: representational
alignment, or logit distillation as a baseline)."""
