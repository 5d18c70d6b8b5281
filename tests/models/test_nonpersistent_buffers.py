"""Non-persistent buffers of a model built on meta get the values its ``_init_weights`` gives them."""

import pytest
import torch
from torch import nn

from autodeploy.models.materialize import nonpersistent_buffer_values


class Mixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 3)
        self.register_buffer("own", torch.zeros(3), persistent=False)  # set by _init_weights(Mixer)
        self.register_buffer("scale", torch.zeros(3), persistent=False)  # set by _init_weights(Model)


class Model(nn.Module):
    def __init__(self, parent_sets_scale: bool = True):
        super().__init__()
        self.layers = nn.ModuleList([Mixer(), Mixer()])
        self.parent_sets_scale = parent_sets_scale

    def _init_weights(self, module):
        # like FalconH1: the model writes a per-layer buffer that its layers' own init leaves alone
        if isinstance(module, Mixer):
            module.own.fill_(1.0)
        elif module is self and self.parent_sets_scale:
            for i, layer in enumerate(self.layers):
                layer.scale.copy_(torch.full((3,), 2.0 + i))


def test_buffers_set_by_a_parent_init_get_their_values():
    with torch.device("meta"):
        model = Model()
    values = nonpersistent_buffer_values(model)
    assert {k: v.tolist() for k, v in values.items()} == {
        "layers.0.own": [1.0] * 3, "layers.0.scale": [2.0] * 3,
        "layers.1.own": [1.0] * 3, "layers.1.scale": [3.0] * 3,
    }
    assert all(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])  # model left on meta


def test_a_buffer_no_init_sets_is_an_error_not_garbage():
    with torch.device("meta"):
        model = Model(parent_sets_scale=False)
    with pytest.raises(RuntimeError, match=r"layers.0.scale.*no _init_weights of Mixer or its parents sets \['scale'\]"):
        nonpersistent_buffer_values(model)
