"""gptjax/config.py: the configs' own checks, whatever file, flag or notebook the values come from."""

from __future__ import annotations

import dataclasses

import pytest

from gptjax.config import EngineConfig, MeshShape, check_positive, config_from_dict, load_file


@pytest.mark.parametrize("text, words", [
    ("tensor=2,tensor=4", "tensor is given twice"),  # the last one won
    ("", "expected data=D,stage=S,tensor=T"),  # was the default layout, one device
    (" , ", "expected data=D,stage=S,tensor=T"),
    ("tensor=\u0663", "expected data=D,stage=S,tensor=T"),  # an Arabic-Indic 3 was read as 3
    ("tensor=\u00b2", "expected data=D,stage=S,tensor=T"),  # a superscript 2 passed isdigit(), then int() failed
    ("tensor=0", "every axis must be at least 1"),
])
def test_mesh_text_is_read_exactly(text, words):
    with pytest.raises(ValueError, match=words):
        MeshShape.parse(text)
    assert MeshShape.parse(" data = 2 , tensor=4 ") == MeshShape(data=2, tensor=4)


@pytest.mark.parametrize("mesh, words", [
    ({"tensor": 0}, r"mesh.tensor must be an integer of at least 1, got 0"),  # ran on one device
    ({"tensor": 2.5}, r"mesh.tensor must be an integer of at least 1, got 2.5"),  # "needs 2.5 devices"
    ({"tensor": "2"}, r"mesh.tensor must be an integer"),  # a TypeError traceback
    ({"tensor": True}, r"mesh.tensor must be an integer"),
    ({"tensr": 2}, r"mesh: unknown axis\(es\) tensr"),  # MeshShape.__init__()'s TypeError
    (4, "mesh must be text like"),  # an AttributeError traceback ('int' object has no attribute 'size')
    ("tensor=2,tensor=4", "tensor is given twice"),
])
def test_an_engine_config_mesh_is_checked_in_every_form(mesh, words):
    with pytest.raises(ValueError, match=words):
        EngineConfig(mesh=mesh)
    assert EngineConfig(mesh={"tensor": 2}).mesh == EngineConfig(mesh="tensor=2").mesh == MeshShape(tensor=2)


@dataclasses.dataclass
class _Timeouts:
    seconds: float


def test_positive_means_above_zero_not_an_integer_above_zero():
    check_positive(_Timeouts(0.5), ["seconds"])  # int(0.5) is 0: "must be positive, got 0.5"
    for bad in (0.0, -1.0, float("nan")):  # NaN was "cannot convert float NaN to integer", naming nothing
        with pytest.raises(ValueError, match=f"_Timeouts.seconds must be positive, got {bad}"):
            check_positive(_Timeouts(bad), ["seconds"])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 10**400])
def test_a_table_of_fields_refuses_non_finite_numbers(value):
    """A file's NaN temperature or infinite timeout loaded (NaN compares false with every bound)."""
    with pytest.raises(ValueError, match=f"EngineConfig.temperature must be a finite number, got {value}"):
        config_from_dict(EngineConfig, {"temperature": value})


def test_a_json_object_that_gives_a_key_twice_is_refused(tmp_path):
    path = tmp_path / "server.json"
    path.write_text('{"engine": {"max_slots": 4, "max_slots": 8}}')  # json.loads kept the 8, silently
    with pytest.raises(ValueError, match="the key 'max_slots' is given twice"):
        load_file(path)
    path.write_text('{"engine": {"max_slots": 4}, "server": {"max_slots": 4}}')  # twice, but in two objects
    assert load_file(path) == {"engine": {"max_slots": 4}, "server": {"max_slots": 4}}
