"""An adapted layer's output may be modified in place, as a plain layer's may (found by the zoo: swin_v2)."""

import pytest
import torch
from torch import nn

import peftlite


@pytest.mark.parametrize("shape", [(5, 3), (2, 5, 3), (2, 4, 5, 3)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_output_modified_in_place(shape, bias):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6, bias=bias), nn.ReLU(inplace=True), nn.Linear(6, 2))
    reference = nn.Sequential(nn.Linear(3, 6, bias=bias), nn.ReLU(), nn.Linear(6, 2))
    reference.load_state_dict(model.state_dict())
    peftlite.wrap(model, "0", rank=2)
    with torch.no_grad():
        model[0].lora.default.B.normal_()
    x = torch.randn(*shape)
    model(x).square().sum().backward()  # raised "Output 0 of _LoraLinear is a view and is being modified"

    pair = model[0].lora.default
    A, B = pair.A.detach().requires_grad_(), pair.B.detach().requires_grad_()
    h = torch.relu(nn.functional.linear(x, reference[0].weight + pair.scale * B @ A, reference[0].bias))
    reference[2](h).square().sum().backward()
    torch.testing.assert_close(pair.A.grad, A.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pair.B.grad, B.grad, rtol=1e-5, atol=1e-6)
