"""raylead.config: typed configs from mappings, sizes and YAML files; every bad value is one line."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from raylead.config import coerce, from_mapping, load_yaml, parse_key_values, parse_size
from raylead.errors import ConfigError


@dataclass(frozen=True)
class Inner:
    n: int = 1


@dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner = field(default_factory=Inner)
    weights: dict[str, float] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)


def one_line(exc: pytest.ExceptionInfo[ConfigError]) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_mapping_values_are_coerced_against_the_type_arguments() -> None:
    cfg = from_mapping(Outer, {"name": "x", "weights": {"dlib": 1}, "paths": {"dlib": "s3://b/i"}})
    assert cfg.weights == {"dlib": 1.0} and isinstance(cfg.weights["dlib"], float)
    with pytest.raises(ConfigError) as err:  # tinsley's thresholds: {dlib: high} was a TypeError later
        from_mapping(Outer, {"name": "x", "weights": {"dlib": "high"}}, "job.yaml")
    assert one_line(err) == "job.yaml: weights: dlib must be a number, got 'high'"
    with pytest.raises(ConfigError) as err:  # train_index: {dlib: 5} was accepted, then crashed
        from_mapping(Outer, {"name": "x", "paths": {"dlib": 5}}, "job.yaml")
    assert one_line(err) == "job.yaml: paths: dlib must be a string, got 5"
    with pytest.raises(ConfigError, match="weights key must be a string, got 3"):
        from_mapping(Outer, {"name": "x", "weights": {3: 0.5}}, "job.yaml")


@pytest.mark.parametrize("value", [5, "five", [1, 2], True])
def test_a_non_mapping_for_a_settings_field_is_one_line(value) -> None:
    """`pairs: 5` in a scenario job YAML was an AttributeError deep in the build."""
    with pytest.raises(ConfigError) as err:
        from_mapping(Outer, {"name": "x", "inner": value}, "job.yaml")
    assert one_line(err) == f"job.yaml: inner must be a mapping of option names to values, got {value!r}"
    assert from_mapping(Outer, {"name": "x", "inner": {"n": 3}}).inner == Inner(3)
    assert coerce(Inner(4), Inner, "inner") == Inner(4)


def test_unknown_keys_name_the_other_accepted_spellings() -> None:
    with pytest.raises(ConfigError) as err:
        from_mapping(Outer, {"name": "x", "wieghts": {}}, "job.yaml", also=("weight",))
    assert one_line(err) == (
        "unknown option(s) 'wieghts' in job.yaml; allowed: inner, name, paths, weight, weights"
    )


@pytest.mark.parametrize(("text", "size"), [("1e9", 10**9), ("1E9", 10**9), ("2.5E3kb", 2_500_000), ("8GiB", 8 << 30)])
def test_sizes_accept_either_exponent_letter(text, size) -> None:
    assert parse_size(text, "--memory-budget") == size


@pytest.mark.parametrize("text", ["1e400", "1E400", "1e309GiB"])
def test_an_infinite_size_is_one_line(text) -> None:
    """`--memory-budget 1e400` was an OverflowError traceback."""
    with pytest.raises(ConfigError) as err:
        parse_size(text, "--memory-budget")
    assert one_line(err) == f"--memory-budget={text!r} is too large: give a finite size such as 8GiB"


def test_a_config_file_that_is_not_utf8_is_one_line_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("source: café\nout: o\n".encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        load_yaml(path)
    assert one_line(err) == f"config file {str(path)!r} is not UTF-8 text (byte 0xe9 at offset 11); save it as UTF-8"
    path.write_text("source: café\n", encoding="utf-8")
    assert load_yaml(path) == {"source": "café"}


def test_yaml_exponent_numbers_are_numbers(tmp_path: Path) -> None:
    """`fmr: 1e-4` (how the README writes it) was the string '1e-4' under PyYAML's YAML 1.1 rules,
    and the calibrate job refused it as "not a number"; quoted, it stays a string."""
    path = tmp_path / "c.yaml"
    path.write_text('fmr: 1e-4\npairs: 1E7\nneg: -2.5e+3\ndot: 1.0e-4\nn: 12\nquoted: "1e-4"\nname: 1e4x\n')
    got = load_yaml(path)
    assert got == {"fmr": 1e-4, "pairs": 1e7, "neg": -2500.0, "dot": 1e-4, "n": 12, "quoted": "1e-4", "name": "1e4x"}
    assert [type(got[k]) for k in ("fmr", "pairs", "n", "quoted")] == [float, float, int, str]
    assert coerce(got["pairs"], int, "impostor_pairs") == 10_000_000
    # `--option lr=1e-4` reads its value as the job YAML `generator_options: {lr: 1e-4}` does
    # (the history compares options: one spelling per value, or two series)
    opts = parse_key_values(["lr=1e-4", "n=12", "name=1e4x", "q='1e-4'"], "--option")
    assert opts == {"lr": 1e-4, "n": 12, "name": "1e4x", "q": "1e-4"} and type(opts["lr"]) is float
