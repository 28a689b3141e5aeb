"""Model identity over the kinds of values a field's settings come in: every one of them that differs must
separate two models (a shared tag would hand one model the other's ground truth), and equal ones must not."""

import copy
import enum
import math

import numpy as np
import pytest
import torch

from bespoke_ext.models.adapters import ScalarTimeAdapter, VelocityAdapter
from bespoke_ext.models.identity import inputs_tag, model_tag, reachable_state
from bespoke_ext.models.schedules import CustomSchedule, Schedule


class _Scaled(torch.nn.Module):
    """A field with one setting of any type (its forward stands in for one that reads it)."""

    def __init__(self, setting):
        super().__init__()
        self.setting = setting

    def forward(self, x, t):
        return x


class _Mode(enum.Enum):
    SLOW = 1
    FAST = 2


@pytest.mark.parametrize("first, second", [
    (np.float32(1.0), np.float32(3.0)),
    (np.arange(3.0), np.arange(3.0) + 1),
    (np.array([True, False]), np.array([True, True])),
    (_Mode.SLOW, _Mode.FAST),
    ({1, 2}, {1, 3}),
    (b"ab", b"ac"),
], ids=["numpy scalar", "numpy array", "numpy bool", "enum", "set", "bytes"])
def test_settings_of_every_kind_separate_models_by_value(first, second):
    assert model_tag(_Scaled(first)) != model_tag(_Scaled(second))
    assert model_tag(_Scaled(first)) == model_tag(_Scaled(copy.deepcopy(first)))   # by value, not by object


def test_numpy_constant_extras_are_keyed_by_value():
    assert inputs_tag({"scale": np.float32(1)}) != inputs_tag({"scale": np.float32(3)})
    assert inputs_tag({"w": np.ones(4)}) != inputs_tag({"w": np.zeros(4)})
    assert inputs_tag({"w": np.ones(4)}) == inputs_tag({"w": np.ones(4)})


class _Frequencies(torch.nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.register_buffer("freqs", torch.arange(4.0) * scale, persistent=False)

    def forward(self, x, t):
        return x * self.freqs.sum()


def test_a_non_persistent_buffer_is_part_of_the_tag():
    # not in the state dict (a time embedding's frequencies), yet it shapes the field
    assert model_tag(_Frequencies(1.0)) != model_tag(_Frequencies(1000.0))
    assert model_tag(_Frequencies(2.0)) == model_tag(_Frequencies(2.0))


class _SlottedCaller:
    __slots__ = ("net",)

    def __init__(self, net):
        self.net = net

    def __call__(self, x, t):
        return self.net(x)


def test_a_slotted_callable_is_tagged_by_the_network_it_holds():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    assert model_tag(_SlottedCaller(a)) != model_tag(_SlottedCaller(b))
    assert model_tag(_SlottedCaller(a)) == model_tag(_SlottedCaller(a))


def test_custom_schedules_separate_velocity_adapters():
    # a CustomSchedule's to_dict() cannot hold its functions: they are hashed with the object's own state
    net = torch.nn.Linear(2, 2)
    ot = CustomSchedule(lambda t: t, lambda t: 1 - t)
    cosine = CustomSchedule(lambda t: torch.sin(math.pi * t / 2), lambda t: torch.cos(math.pi * t / 2))
    assert model_tag(VelocityAdapter(net, "noise", ot)) != model_tag(VelocityAdapter(net, "noise", cosine))
    t = torch.tensor([0.25, 0.5])
    assert torch.allclose(cosine.d_alpha(t), math.pi / 2 * torch.cos(math.pi * t / 2))   # autograd derivative intact


limit = 1.0  # a module-level number named like _Limited's attribute, which its forward does not read


class _Limited(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.limit = 2.0

    def forward(self, x, t):
        return self.limit * x


def test_a_global_named_like_an_attribute_the_forward_reads_stays_out_of_the_tag():
    # self.limit is an attribute, not the global `limit`: changing the global must not refuse the same model's cache
    global limit
    model = _Limited()
    before = model_tag(model)
    try:
        limit = 400.0
        assert model_tag(model) == before
        model.limit = 3.0   # the attribute itself still counts
        assert model_tag(model) != before
    finally:
        limit = 1.0


class _PrivateScale(torch.nn.Module):
    def __init__(self, scale):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(3, 2)
        self._scale = scale

    def forward(self, x, t):
        return self._scale * self.net(torch.cat([x, torch.as_tensor(t).expand(x.shape[0])[:, None]], 1))


class _PrivateNetHolder:
    """A plain object keeping its network in a private attribute; its bound method is the model."""

    def __init__(self, net):
        self._net = net

    def velocity(self, x, t):
        return self._net(torch.cat([x, t.expand(x.shape[0])[:, None]], 1))


class _PowerSchedule(Schedule):
    name = "power"

    def __init__(self, p):
        self._p = float(p)

    def alpha(self, t):
        return t ** self._p

    def sigma(self, t):
        return 1 - t ** self._p

    def d_alpha(self, t):
        return self._p * t ** (self._p - 1)

    def d_sigma(self, t):
        return -self._p * t ** (self._p - 1)


def test_private_attributes_are_settings_too():
    # a module's self._scale, a plain object's self._net, a schedule's self._p: each changes the field
    assert model_tag(_PrivateScale(1.0)) != model_tag(_PrivateScale(3.0))
    assert model_tag(_PrivateScale(2.0)) == model_tag(_PrivateScale(2.0))
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    assert model_tag(_PrivateNetHolder(a).velocity) != model_tag(_PrivateNetHolder(b).velocity)
    net = torch.nn.Linear(2, 2)
    assert model_tag(VelocityAdapter(net, "data", _PowerSchedule(1))) != model_tag(VelocityAdapter(net, "data", _PowerSchedule(3)))


def test_a_network_held_privately_is_reached_and_frozen_by_training():
    net = torch.nn.Linear(3, 2)
    modules, _ = reachable_state(_PrivateNetHolder(net).velocity)
    assert any(m is net for m in modules)


def test_torch_bookkeeping_and_use_leave_the_tag_alone():
    # hook tables, a compiled wrapper's per-process id and a warned-once flag are not the field
    model = _PrivateScale(2.0)
    before = model_tag(model)
    model.register_forward_hook(lambda *args: None)
    assert model_tag(model) == before
    compiled = torch.compile(model)
    assert model_tag(compiled) == model_tag(torch.compile(_PrivateScale(2.0)))
    adapter = ScalarTimeAdapter(model, time_as="float")
    tag = model_tag(adapter)
    with pytest.warns(UserWarning, match="gradient with respect to t is zero"):
        adapter(torch.randn(3, 2), torch.tensor(0.5, requires_grad=True))
    assert model_tag(adapter) == tag
