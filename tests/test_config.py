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


@pytest.mark.parametrize("name", ["server.conf", "server", "server.TOML", "server.cfg"])
def test_a_file_of_another_suffix_is_read_as_json_or_toml(tmp_path, name):
    """A TOML file without the .toml suffix was read as JSON: "Expecting value: line 1 column 2 (char 1)"."""
    path = tmp_path / name
    path.write_text("[engine]\nmax_slots = 4\n")
    assert load_file(path) == {"engine": {"max_slots": 4}}
    path.write_text('{"engine": {"max_slots": 4}}')
    if not name.lower().endswith(".toml"):
        assert load_file(path) == {"engine": {"max_slots": 4}}


def test_a_file_that_is_neither_names_both_formats_and_how_the_suffix_chooses(tmp_path):
    path = tmp_path / "server.conf"
    path.write_text("[engine\n")
    with pytest.raises(ValueError) as e:
        load_file(path)
    message = str(e.value)
    assert message.startswith("neither JSON nor TOML (as JSON: Expecting value: line 1 column 2 (char 1); as TOML: ")
    assert message.endswith("): the suffix chooses the format (.json or .toml), and a file with the suffix .conf is "
                            "tried as JSON, then as TOML")
    path.write_text('{"engine": {"max_slots": 4, "max_slots": 8}}')  # JSON, then, refused as before
    with pytest.raises(ValueError, match="^the key 'max_slots' is given twice in one object$"):
        load_file(path)


@pytest.mark.parametrize("suffix, text, words", [
    (".json", "[engine]\nmax_slots = 4\n", r"^not valid JSON \(its suffix .json says JSON\): Expecting value: .*; it "
                                           r"reads as TOML: give it the suffix .toml$"),
    (".toml", '{"engine": {}}', r"^not valid TOML \(its suffix .toml says TOML\): .*; it reads as JSON: give it the "
                                r"suffix .json$"),
    (".toml", "[engine\n", r"^not valid TOML \(its suffix .toml says TOML\): [^;]*$"),  # no hint: not JSON either
    (".json", "[" * 100000, r"^not valid JSON \(its suffix .json says JSON\): nested too deeply$"),  # RecursionError
    (".toml", "a = " + "[" * 100000, r"^not valid TOML \(its suffix .toml says TOML\): nested too deeply$"),
])
def test_a_file_its_suffix_does_not_describe_says_which_format_it_is(tmp_path, suffix, text, words):
    path = tmp_path / f"server{suffix}"
    path.write_text(text)
    with pytest.raises(ValueError, match=words):
        load_file(path)


def test_a_cache_of_one_position_is_refused():
    """A server of max_seq_len 1 started, then refused every prompt: none fits beside a new token."""
    with pytest.raises(ValueError, match=r"EngineConfig.max_seq_len must be 0 \(the model's n_positions\) or at least "
                                         r"2 \(a prompt token and a new one\), got 1"):
        EngineConfig(max_seq_len=1)
    assert EngineConfig(max_seq_len=2).max_seq_len == 2


@pytest.mark.parametrize("field, value, words", [
    ("temperature", float("nan"), "temperature must be a finite number >= 0, got nan"),
    ("temperature", float("inf"), "temperature must be a finite number >= 0, got inf"),
    ("temperature", "0.7", "temperature must be a finite number >= 0, got '0.7'"),
    ("top_k", 2.5, "top_k must be a whole number >= 0, got 2.5"),
    ("top_k", True, "top_k must be a whole number >= 0, got True"),
    ("top_p", float("nan"), r"top_p must be in \(0, 1\], got nan"),
])
def test_sampling_defaults_a_request_could_not_use_are_refused_where_they_are_set(field, value, words):
    """Built in Python (a config file is checked as it is read): before, every request relying on the default failed."""
    with pytest.raises(ValueError, match=words):
        EngineConfig(**{field: value})
    assert EngineConfig(temperature=0, top_k=40).top_k == 40
