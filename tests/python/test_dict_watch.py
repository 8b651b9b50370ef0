"""torch_dp._C.DictWatch (Note [Watching a module tree] in python/csrc/dict_watch.cpp): whether any of a list of
dicts changed since a snapshot, by the identity of every key and value."""

import gc
import sys
import types
import weakref
from collections import OrderedDict

import pytest
import torch

from torch_dp._C import DictWatch


class Value:
    """An object with an identity that can be watched through a weak reference."""


def test_dict_watch_sees_every_change_to_a_watched_dict():
    from torch_dp import _C

    value = object()
    d = {"a": value, "b": 1}
    watch = _C.DictWatch([d])
    assert watch.unchanged()
    d["a"] = value  # written, but the same object: still unchanged
    assert watch.unchanged()
    d["a"] = object()
    assert not watch.unchanged()
    watch.retake()
    assert watch.unchanged()
    d["c"] = 3
    assert not watch.unchanged()
    watch.retake()
    del d["c"]
    assert not watch.unchanged()
    watch.retake()
    module = torch.nn.Linear(2, 2)
    watch = _C.DictWatch([module.__dict__, module._parameters])
    module.scale = 2.0
    assert not watch.unchanged()
    watch.retake()
    module.training = False
    assert not watch.unchanged()
    watch.retake()
    module.weight = torch.nn.Parameter(torch.zeros(2, 2))
    assert not watch.unchanged()


def test_dict_watch_fast_path_sees_changes_made_every_way():
    """DictWatch's cheap proof of 'nothing changed' (a dict watcher from Python 3.12, version tags before;
    Note [Watching a module tree]) must notice every kind of write, since it skips the entry walk."""
    import sys

    from torch_dp import _C

    broken_watchers = sys.version_info[:3] == (3, 13, 0)  # CPython issue 125608: walks the entries instead
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    dicts = [m.__dict__ for m in module.modules()] + [m._parameters for m in module.modules()]
    dicts += [m._buffers for m in module.modules()] + [m._modules for m in module.modules()]
    watch = _C.DictWatch(dicts)
    assert watch.fast == (not broken_watchers)
    changes = [
        lambda: setattr(module[0], "scale", 2.0),
        lambda: delattr(module[0], "scale"),
        lambda: module.train(False),
        lambda: module[0].__dict__.update(extra=1),
        lambda: module[0].__dict__.pop("extra"),
        lambda: module[1].register_buffer("shift", torch.zeros(2)),
        lambda: setattr(module[1], "shift", torch.ones(2)),
        lambda: setattr(module[1], "weight", torch.nn.Parameter(torch.ones(2))),
        lambda: setattr(module, "0", torch.nn.Linear(2, 2)),  # last: the new submodule's dicts are not watched
    ]
    for i, change in enumerate(changes):
        assert watch.unchanged(), i
        change()
        assert not watch.unchanged(), f"change {i} not seen"
        watch.retake()


def test_dict_watches_sharing_a_dict_each_see_its_changes():
    from torch_dp import _C

    d = {"a": 1}
    first, second = _C.DictWatch([d]), _C.DictWatch([d, d])  # a dict listed twice is held twice
    d["a"] = 2
    assert not first.unchanged() and not second.unchanged()
    first.retake()
    second.retake()
    del second  # the other watch keeps seeing changes
    d["b"] = 3
    assert not first.unchanged()
    first.retake()
    assert first.unchanged()
    del first
    d["c"] = 4  # nobody watches any more: nothing to notify, nothing breaks
    third = _C.DictWatch([d])
    assert third.unchanged()
    d.clear()
    assert not third.unchanged()


def test_an_equal_but_different_value_is_a_change():
    """Values are compared by identity: an equal object in place of the one seen is a change."""
    d = {"a": 10**6}
    watch = DictWatch([d])
    d["a"] = int("1" + "0" * 6)  # equal to 10**6, but a new object
    assert d["a"] == 10**6
    assert not watch.unchanged()


def test_a_key_replaced_by_another_is_a_change():
    """The same values in the same order, one of them under another key."""
    value = Value()
    d = {"a": value, "b": value}
    watch = DictWatch([d])
    del d["a"]
    d["c"] = value
    assert list(d.values()) == [value, value]
    assert not watch.unchanged()


def test_writes_of_the_same_values_leave_it_unchanged():
    value, other = Value(), Value()
    d = {"a": value, "b": 1}
    watch = DictWatch([d])
    d["a"] = value
    d.update(b=1)
    assert watch.unchanged()
    assert watch.unchanged()  # and again, now that it compared the entries
    d["a"] = other
    d["a"] = value  # changed and changed back before anyone looked
    assert watch.unchanged()
    d["a"] = other  # a change after the entries were compared again is still seen
    assert not watch.unchanged()


def test_a_change_is_reported_until_retake():
    value, other = Value(), Value()
    d = {"a": value}
    watch = DictWatch([d])
    d["a"] = other
    assert not watch.unchanged()
    assert not watch.unchanged()  # asking does not forget the change
    watch.retake()
    assert watch.unchanged()
    d["a"] = value  # what the first snapshot held is a change against the new one
    assert not watch.unchanged()
    watch.retake()
    assert watch.unchanged()


@pytest.mark.parametrize(
    "not_a_dict",
    [[], ("a", 1), None, types.MappingProxyType({"a": 1}), torch.nn.Linear(1, 1)],
    ids=["list", "tuple", "None", "mappingproxy", "module"],
)
def test_anything_but_a_dict_is_rejected(not_a_dict):
    with pytest.raises(TypeError, match="DictWatch watches dicts only"):
        DictWatch([{}, not_a_dict])


def test_a_dict_subclass_is_watched():
    d = OrderedDict(a=1)
    watch = DictWatch([d])
    d["b"] = 2
    assert not watch.unchanged()
    watch.retake()
    del d["a"]
    assert not watch.unchanged()


def test_a_dict_listed_twice():
    d, other = {"a": 1}, {"b": 2}
    watch = DictWatch([d, other, d])
    assert watch.num_dicts == 3
    assert watch.unchanged()
    d["a"] = 3
    assert not watch.unchanged()
    watch.retake()
    assert watch.unchanged()
    del watch  # it held d twice; it lets go of both, and a new watch on d sees its changes
    gc.collect()
    again = DictWatch([d])
    del d["a"]
    assert not again.unchanged()


def test_two_watches_on_one_dict_are_independent():
    d = {"a": 1}
    first, second = DictWatch([d]), DictWatch([d])
    d["a"] = 2
    first.retake()  # the change is taken by the first only
    assert first.unchanged()
    assert not second.unchanged()
    second.retake()
    d["b"] = 3
    assert not first.unchanged() and not second.unchanged()


def test_it_keeps_what_it_remembers_alive():
    """A remembered value cannot be freed, so its identity cannot be taken by a new object while watched."""
    d = {"a": Value()}
    seen = weakref.ref(d["a"])
    watch = DictWatch([d])
    d["a"] = Value()
    gc.collect()
    assert seen() is not None
    assert not watch.unchanged()
    watch.retake()  # the snapshot lets go of what it no longer holds
    gc.collect()
    assert seen() is None


def test_num_dicts_and_an_empty_list():
    assert DictWatch([]).num_dicts == 0
    assert DictWatch([]).unchanged()
    assert DictWatch([{}, {}]).num_dicts == 2


def test_fast_on_this_python():
    """Changes are noticed without walking the entries: version tags before Python 3.12, a dict watcher from
    3.12, except on 3.13.0, whose dict watchers miss attribute stores (CPython issue 125608)."""
    expected = sys.version_info[:3] != (3, 13, 0)
    assert DictWatch([{"a": 1}]).fast == expected
    assert DictWatch([]).fast == expected
