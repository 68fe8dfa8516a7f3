"""BiFPN fusion (peaknet_xtal/model/layers/bifpn.py)."""
from __future__ import annotations

import pytest
import torch

from peaknet_xtal.model.layers.bifpn import fast_normalised_fusion


@pytest.mark.parametrize("n_inputs", [2, 3])
def test_inference_fusion_equals_the_trainable_one_and_training_keeps_its_gradients(n_inputs):
    """Without gradients the fusion accumulates in place with scalar weights; it must give the
    weighted sum the trainable form gives (float32 rounding), leave its inputs alone, and the
    trainable form must still pass gradients to the weights (they are learnt)."""
    torch.manual_seed(0)
    inputs = [torch.randn(2, 4, 9, 7) for _ in range(n_inputs)]
    copies = [x.clone() for x in inputs]
    weights = torch.tensor([1.5, -0.2, 0.7][:n_inputs], requires_grad=True)
    trained = fast_normalised_fusion(weights, inputs)
    with torch.no_grad():
        inferred = fast_normalised_fusion(weights, inputs)
    positive = weights.detach().clamp(min=0)
    expected = sum(w * x for w, x in zip(positive / (positive.sum() + 1e-4), copies, strict=True))
    assert torch.allclose(inferred, expected, atol=1e-6, rtol=1e-6)
    assert torch.allclose(trained.detach(), inferred, atol=1e-6, rtol=1e-6)
    assert all(torch.equal(x, c) for x, c in zip(inputs, copies, strict=True))
    assert not inferred.requires_grad
    trained.sum().backward()
    assert weights.grad is not None and weights.grad[0] != 0
