"""The trainers' exponential moving average: the blend itself, value by value."""

import torch
from torch import nn

from dalle2.trainer import EMA


def test_ema_blends_beta_of_the_average_with_the_rest_of_the_new_weights():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    ema = EMA(module, beta=0.9, update_after_step=2)
    start = {k: v.clone() for k, v in module.state_dict().items()}
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    ema.update(module, step=1)  # before update_after_step: a copy
    for key, value in module.state_dict().items():
        torch.testing.assert_close(ema.shadow[key], value)
    copied = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(3.0)
    ema.update(module, step=3)
    for key, value in module.state_dict().items():
        torch.testing.assert_close(ema.shadow[key], 0.9 * copied[key] + 0.1 * value)
        assert not torch.equal(ema.shadow[key], start[key])
    # the live weights are untouched, and swapped_into gives the average back only inside the block
    live = {k: v.clone() for k, v in module.state_dict().items()}
    with ema.swapped_into(module):
        torch.testing.assert_close(module.state_dict()["0.weight"], ema.shadow["0.weight"])
    torch.testing.assert_close(module.state_dict()["0.weight"], live["0.weight"])
