"""``serve --ray``'s per-worker Ray resources and node labels (``--ray-num-cpus``, ``--ray-num-gpus``,
``--ray-resource NAME=QTY``, ``--ray-label KEY=VALUE``; settings ``ray_num_cpus``...), in-process: the
flags, the environment and the config file give the ``RayLauncher`` keywords, and every mistake is named.
Workers placed by them on a real cluster: ``test_ray.py``."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from dspex_trio._cli import _parser as build_parser
from dspex_trio._cli_ray import (
    MAX_RAY_LABELS,
    MAX_RAY_RESOURCES,
    open_pool_launcher,
    parse_label,
    parse_resource,
    ray_placement,
)
from dspex_trio._cli_settings import SETTING_NAMES, ServeSettings, SettingsError, resolve_settings


def settings(**flags: object) -> ServeSettings:
    return resolve_settings(file=None, environ={}, flags=flags)


def from_argv(*argv: str) -> ServeSettings:
    args = build_parser().parse_args(["serve", *argv])
    return resolve_settings(
        file=None, environ={}, flags={name: getattr(args, name, None) for name in SETTING_NAMES}
    )


def test_the_flags_give_the_launchers_keywords() -> None:
    got = from_argv(
        "--ray",
        "auto",
        "--ray-num-cpus",
        "0.5",
        "--ray-num-gpus",
        "1",
        "--ray-resource",
        "bigmem=2",
        "--ray-resource",
        "accelerator_type:A100 = 0.25",
        "--ray-label",
        "pool=gpu",
        "--ray-label",
        "zone=in(a, b)",
        "--ray-label",
        "tier=!spot",
    )
    assert ray_placement(got) == {
        "num_cpus": 0.5,
        "num_gpus": 1.0,
        "resources": {"bigmem": 2.0, "accelerator_type:A100": 0.25},
        "label_selector": {"pool": "gpu", "zone": "in(a, b)", "tier": "!spot"},
    }


def test_unset_placement_settings_leave_the_launchers_defaults() -> None:
    assert ray_placement(settings(ray="auto")) == {}
    assert ray_placement(settings()) == {}


def test_the_environment_and_the_config_file_give_them_too(tmp_path: Path) -> None:
    environ = {
        "DSPEX_RAY": "auto",
        "DSPEX_RAY_NUM_CPUS": "2",
        "DSPEX_RAY_NUM_GPUS": "0.5",
        "DSPEX_RAY_RESOURCES": "bigmem=1, fast_disk=2",
        "DSPEX_RAY_LABELS": "pool=gpu",
    }
    assert ray_placement(resolve_settings(file=None, environ=environ, flags={})) == {
        "num_cpus": 2.0,
        "num_gpus": 0.5,
        "resources": {"bigmem": 1.0, "fast_disk": 2.0},
        "label_selector": {"pool": "gpu"},
    }
    config = tmp_path / "dspex.toml"
    config.write_text(
        'ray = "auto"\nray-num-cpus = 1\nray_num_gpus = 2\n'
        'ray_resources = ["bigmem=1"]\nray_labels = ["zone=in(a, b)"]\n'
    )
    assert ray_placement(resolve_settings(file=str(config), environ={}, flags={})) == {
        "num_cpus": 1.0,
        "num_gpus": 2.0,
        "resources": {"bigmem": 1.0},
        "label_selector": {"zone": "in(a, b)"},
    }


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"ray_num_cpus": -1.0}, "ray_num_cpus must be a non-negative number"),
        ({"ray_num_gpus": float("nan")}, "ray_num_gpus must be a non-negative number"),
        ({"ray_num_gpus": float("inf")}, "ray_num_gpus must be a non-negative number"),
        ({"ray_resources": ("bigmem",)}, "expected NAME=QUANTITY"),
        ({"ray_resources": ("=1",)}, "expected NAME=QUANTITY"),
        ({"ray_resources": ("bigmem=",)}, "expected NAME=QUANTITY"),
        ({"ray_resources": ("bigmem=lots",)}, "the quantity of bigmem must be a number"),
        ({"ray_resources": ("bigmem=-1",)}, "the quantity of bigmem must be a non-negative number"),
        ({"ray_resources": ("bigmem=nan",)}, "the quantity of bigmem must be a non-negative number"),
        ({"ray_resources": ("CPU=2",)}, "CPU is set by ray_num_cpus"),
        ({"ray_resources": ("GPU=1",)}, "GPU is set by ray_num_gpus"),
        ({"ray_resources": ("big mem=1",)}, "is not a resource name"),
        ({"ray_resources": ("bigmem=1", "bigmem=2")}, "bigmem is given twice"),
        ({"ray_resources": tuple(f"r{i}=1" for i in range(MAX_RAY_RESOURCES + 1))}, "at most 32"),
        ({"ray_labels": ("pool",)}, "expected KEY=VALUE"),
        ({"ray_labels": ("pool=",)}, "expected KEY=VALUE"),
        ({"ray_labels": ("po ol=gpu",)}, "is not a label key"),
        ({"ray_labels": ("pool=g pu",)}, "the value of pool must be VALUE, !VALUE, in"),
        ({"ray_labels": ("pool=in(a",)}, "the value of pool must be"),
        ({"ray_labels": ("pool=a", "pool=b")}, "pool is given twice"),
        ({"ray_labels": tuple(f"k{i}=v" for i in range(MAX_RAY_LABELS + 1))}, "at most 32"),
    ],
)
def test_each_mistake_is_named(flags: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError, match=message.replace("(", r"\(")):
        ray_placement(settings(ray="auto", **flags))


def test_a_malformed_flag_value_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", "--ray", "auto", "--ray-num-cpus", "two"])
    assert exit_.value.code == 2
    assert "--ray-num-cpus: invalid float value: 'two'" in capsys.readouterr().err


def test_a_malformed_environment_value_is_named() -> None:
    with pytest.raises(SettingsError, match="DSPEX_RAY_NUM_CPUS: expected a number"):
        resolve_settings(file=None, environ={"DSPEX_RAY_NUM_CPUS": "two"}, flags={})


async def test_placement_settings_without_ray_are_a_mistake() -> None:
    with pytest.raises(SettingsError, match="ray_num_gpus, ray_labels need"):
        async with open_pool_launcher(settings(ray_num_gpus=1.0, ray_labels=("pool=gpu",))):
            pass  # pragma: no cover


def test_the_parsers_alone() -> None:
    assert parse_resource(" bigmem = 1.5 ") == ("bigmem", 1.5)
    assert parse_resource("node:10.0.0.5=0.01") == ("node:10.0.0.5", 0.01)
    assert parse_label("ray.io/node-group=!in(spot, preempt)") == ("ray.io/node-group", "!in(spot, preempt)")


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs the ray extra")
async def test_the_launcher_gets_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """``open_pool_launcher`` passes them to the ``RayLauncher`` (not entered here: that connects)."""
    from dspex_trio import _cli_ray
    from dspex_trio._ray_launcher import RayLauncher

    made: list[RayLauncher] = []

    class Recording(RayLauncher):
        async def __aenter__(self) -> RayLauncher:
            made.append(self)
            return self

        async def __aexit__(self, *exc_info: object) -> None:
            return None

    monkeypatch.setattr("dspex_trio._ray_launcher.RayLauncher", Recording)
    got = settings(ray="auto", ray_num_cpus=0.5, ray_resources=("bigmem=1",), ray_labels=("pool=gpu",))
    async with _cli_ray.open_pool_launcher(got) as where:
        assert where == {"launcher": made[0]}
    (launcher,) = made
    assert (launcher.num_cpus, launcher.num_gpus) == (0.5, 0.0)
    assert launcher.resources == {"bigmem": 1.0} and launcher.label_selector == {"pool": "gpu"}
