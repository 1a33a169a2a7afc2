"""The run configuration: defaults, YAML + overrides, and errors that name the field and the fix."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import yaml

from models.tiny import MODEL_KWARGS
from runtime.config import Config, ConfigError, config_from_dict, load_config, validate_for_world

ROOT = Path(__file__).resolve().parent.parent
CONFIG_FILES = sorted((ROOT / "torchrun_configs").glob("*.yaml"))


def test_defaults():
    cfg = load_config(None, [])
    assert cfg == Config()
    assert cfg.train.rounds == 5 and cfg.lora.r == 8 and cfg.lora.r_cut == 4
    assert cfg.model.path == "builtin:tiny" and cfg.split.cut_layers == 2 and cfg.split.clients is None
    assert cfg.cut_layers_for(3) == [2, 2, 2]


def test_yaml_file_plus_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "seed": 7,
                "train": {"rounds": 9, "lr": 0.01},
                "lora": {"r": 16, "alpha": 32},
            }
        )
    )
    overrides = ["train.rounds=3", "split.cut_layers=[1,2]", "train.lr=1", "lora.targets=[q_proj]"]
    cfg = load_config(path, overrides)
    assert cfg.seed == 7  # from the file
    assert cfg.train.rounds == 3  # the override wins over the file
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)  # int accepted for a float
    assert cfg.lora.r == 16 and cfg.lora.alpha == 32.0  # file values kept beside overrides
    assert cfg.train.local_steps == 20  # untouched default
    assert cfg.split.cut_layers == [1, 2] and cfg.cut_layers_for(2) == [1, 2]
    assert cfg.lora.targets == ["q_proj"]
    assert cfg.to_dict()["train"]["rounds"] == 3


@pytest.mark.parametrize(
    "override,field",
    [
        ("roundz=3", "roundz"),
        ("train.roundz=3", "train.roundz"),
        ("runtime.debugg=true", "runtime.debugg"),
    ],
)
def test_unknown_key_is_named(override, field):
    with pytest.raises(ConfigError, match=rf"unknown config key {re.escape(field)}\b.*valid keys"):
        load_config(None, [override])


def test_unknown_key_in_yaml_file_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  rounds: 2\n  roundz: 3\n")
    with pytest.raises(ConfigError, match=r"train\.roundz.*'rounds'"):
        load_config(path, [])


@pytest.mark.parametrize(
    "override,field",
    [
        ("train.rounds=abc", "train.rounds"),
        ("train.lr=[1]", "train.lr"),
        ("train.rounds=true", "train.rounds"),  # a bool is not an int
        ("train.rounds=2.5", "train.rounds"),
        ("split.cut_layers=[1,x]", r"split.cut_layers"),
        ("model.path=3", "model.path"),
        ("train={a: 1}", "train.a"),
        ("train=5", "train"),
    ],
)
def test_wrong_type_is_named(override, field):
    with pytest.raises(ConfigError, match=rf"^(unknown config key )?{re.escape(field)}\b"):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override,field",
    [
        ("lora.r_cut=9", "lora.r_cut"),  # above lora.r (8)
        ("lora.r_cut=0", "lora.r_cut"),
        ("data.alpha=0", "data.alpha"),
        ("train.local_steps=0", "train.local_steps"),
        ("train.rounds=0", "train.rounds"),
        ("train.lr=-1", "train.lr"),
        ("model.dtype=float64", "model.dtype"),
        ("data.partition=label", "data.partition"),
        ("split.clients=0", "split.clients"),
        ("split.policy=greedy", "split.policy"),
        ("split.replan_every=0", "split.replan_every"),
        ("split.hysteresis=1", "split.hysteresis"),
        ("split.smoothing=0", "split.smoothing"),
        ("simulate.slowdown=0.5", "simulate.slowdown"),
        ("simulate.memory_limit_gb=[1,0]", "simulate.memory_limit_gb"),
        ("simulate.bandwidth_mbps=-3", "simulate.bandwidth_mbps"),
        ("runtime.malloc_keep_mb=4096", "runtime.malloc_keep_mb"),  # glibc's threshold is an int
        ("runtime.malloc_keep_mb=-1", "runtime.malloc_keep_mb"),
    ],
)
def test_out_of_range_is_named(override, field):
    with pytest.raises(ConfigError, match=rf"^{re.escape(field)}="):
        load_config(None, [override])


def test_policy_defaults_follow_cut_layers_and_must_match_them():
    assert load_config(None, ["split.cut_layers=2"]).policy == "fixed"
    assert load_config(None, ["split.cut_layers=[1,2]"]).policy == "manual"
    assert not load_config(None, ["split.policy=resource"]).moves_cuts
    assert load_config(None, ["split.policy=adaptive"]).moves_cuts
    with pytest.raises(ConfigError, match="split.policy=fixed takes one int"):
        load_config(None, ["split.policy=fixed", "split.cut_layers=[1,2]"])
    with pytest.raises(ConfigError, match="split.policy=manual takes a list"):
        load_config(None, ["split.policy=manual", "split.cut_layers=2"])


def test_schedule_and_simulate_are_checked_against_the_world():
    cfg = load_config(
        None, ["split.cut_layers=[1,2]", "split.schedule={1: [2, 1]}", "simulate.slowdown=[1,3]"]
    )
    assert cfg.moves_cuts and cfg.split.schedule == {1: [2, 1]}
    assert cfg.simulate.for_client(1) == (3, None, None)
    assert validate_for_world(cfg, 3, 4) == [1, 2]
    with pytest.raises(ConfigError, match=r"split.schedule\[1\]\[0\]=4"):
        validate_for_world(load_config(None, ["split.cut_layers=[1,2]", "split.schedule={1: [4, 1]}"]), 3, 4)
    with pytest.raises(ConfigError, match="simulate.slowdown has 3 entries for 2 clients"):
        validate_for_world(load_config(None, ["simulate.slowdown=[1,2,3]"]), 3, 4)
    with pytest.raises(ConfigError, match="split.schedule round 5"):
        load_config(None, ["split.schedule={5: [1]}"])
    with pytest.raises(ConfigError, match="adaptive moves itself"):
        load_config(None, ["split.policy=adaptive", "split.schedule={1: [1]}"])
    assert validate_for_world(load_config(None, ["split.policy=adaptive"]), 3, 4) is None


def test_r_cut_equal_to_r_is_allowed():
    assert load_config(None, ["lora.r=4", "lora.r_cut=4"]).lora.r_cut == 4


def test_missing_config_file_is_named(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        load_config(missing, [])


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.rounds"])


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# ---------------------------------------------------------------- validate_for_world


def test_validate_for_world_returns_cuts():
    assert validate_for_world(load_config(None, ["split.cut_layers=3"]), 4, 6) == [3, 3, 3]
    assert validate_for_world(load_config(None, ["split.cut_layers=[1,5]"]), 3, 6) == [1, 5]
    assert validate_for_world(load_config(None, ["split.clients=2"]), 3, 4) == [2, 2]


@pytest.mark.parametrize("cuts,bad_index,bad", [([0, 2], 0, 0), ([2, 4], 1, 4), ([1, 7], 1, 7)])
def test_cut_out_of_range_names_the_entry_and_range(cuts, bad_index, bad):
    cfg = load_config(None, [f"split.cut_layers={cuts}"])
    with pytest.raises(ConfigError, match=rf"split\.cut_layers\[{bad_index}\]={bad}\b.*4 layers.*1\.\.3"):
        validate_for_world(cfg, 3, 4)


def test_single_int_cut_out_of_range():
    cfg = load_config(None, ["split.cut_layers=4"])
    with pytest.raises(ConfigError, match=r"split\.cut_layers\[0\]=4.*1\.\.3"):
        validate_for_world(cfg, 2, 4)


def test_cut_list_length_must_match_clients():
    cfg = load_config(None, ["split.cut_layers=[1,2]"])
    with pytest.raises(ConfigError, match=r"2 entries for 3 clients.*--nproc_per_node=3"):
        validate_for_world(cfg, 4, 4)


def test_clients_must_match_world_size():
    cfg = load_config(None, ["split.clients=2"])
    with pytest.raises(ConfigError, match=r"split\.clients=2.*3 client ranks.*--nproc_per_node=3"):
        validate_for_world(cfg, 4, 4)


def test_world_size_one_is_rejected():
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=1.*--nproc_per_node=2"):
        validate_for_world(load_config(None, []), 1, 4)


# ---------------------------------------------------------------- shipped configs


def test_there_are_shipped_configs():
    assert CONFIG_FILES, "torchrun_configs/ has no YAML file"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_shipped_config_loads_and_validates(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), f"{path.name}: first line should be a comment with the launch command"
    assert "torchrun" in first or "python -m launch" in first, first
    words = first.lstrip("#").split()
    named = [w for w in words if re.fullmatch(r"\S+\.ya?ml", w)]
    assert [Path(n).name for n in named] == [path.name], f"{path.name}: the comment launches {named}"
    # The command's own overrides (key=value after the file) are part of what it runs.
    overrides = [w for w in words[words.index(named[0]) + 1 :] if "=" in w and not w.startswith("-")]
    cfg = load_config(path, overrides)
    if "torchrun" not in first:
        return  # a single-process launch (python -m launch.train_local) ignores split.*
    nproc = re.search(r"--nproc_per_node[= ](\d+)", first)
    nnodes = re.search(r"--nnodes[= ](\d+)", first)
    assert nproc, f"{path.name}: the torchrun command should say --nproc_per_node"
    world = int(nproc.group(1)) * (int(nnodes.group(1)) if nnodes else 1)
    if cfg.model.path == "builtin:tiny":
        n_layers = int(MODEL_KWARGS["num_hidden_layers"])
    elif (model_config := Path(cfg.model.path) / "config.json").is_file():
        n_layers = int(yaml.safe_load(model_config.read_text())["num_hidden_layers"])
    else:
        n_layers = 10**6  # model not here: check the client count and list length, not the cut range
    cuts = validate_for_world(cfg, world, n_layers)
    assert cuts is None if cfg.policy in ("resource", "adaptive") else len(cuts) == world - 1


def test_simulate_schedules_act_by_round_and_are_checked():
    cfg = load_config(
        None, ["simulate.slowdown={1: [1, 1, 2, 4], 4: [4, 1, 1, 2]}", "simulate.bandwidth_mbps=100"]
    )
    assert cfg.simulate.changes
    assert [cfg.simulate.for_client(0, rnd)[0] for rnd in (1, 2, 3, 4, 9)] == [1, 1, 1, 4, 4]
    assert cfg.simulate.for_client(3, 3) == (4, None, 100) and cfg.simulate.for_client(3, 4) == (2, None, 100)
    bw = load_config(None, ["simulate.bandwidth_mbps={1: null, 3: [10, 20]}"]).simulate
    assert bw.changes and bw.for_client(1, 2)[2] is None and bw.for_client(1, 3)[2] == 20
    assert not load_config(None, ["simulate.slowdown=[1, 2]"]).simulate.changes
    server = load_config(None, ["simulate.server_slowdown={1: 8, 5: 1}"]).simulate
    assert server.changes and [server.for_server(rnd) for rnd in (1, 4, 5, 9)] == [8, 8, 1, 1]
    assert validate_for_world(load_config(None, ["simulate.slowdown={1: 1, 2: [1, 3]}"]), 3, 4) == [2, 2]
    for override, message in (
        ("simulate.slowdown={2: [1, 2]}", r"^simulate.slowdown=.*must start at round 1"),
        ("simulate.slowdown={0: 1, 1: 2}", r"^simulate.slowdown=.*must start at round 1"),
        ("simulate.slowdown={1: 1, 3: [1, 0.5]}", r"^simulate.slowdown=.*every value must be >= 1"),
        ("simulate.bandwidth_mbps={1: -1}", r"^simulate.bandwidth_mbps=.*every value must be > 0 or null"),
        ("simulate.memory_limit_gb={1: 2, 3: 1}", r"^simulate.memory_limit_gb=.*cannot follow a schedule"),
        ("simulate.server_slowdown={1: 2, 3: 0.5}", r"^simulate.server_slowdown=.*every value must be >= 1"),
        ("simulate.server_slowdown=[1, 2]", r"^simulate.server_slowdown: \[1, 2\] is not a float or mapping"),
        (
            "simulate.slowdown={1: fast}",
            r"^simulate.slowdown: \{1: 'fast'\} is not a float or list of float or mapping int -> ",
        ),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])
    with pytest.raises(ConfigError, match=r"simulate.slowdown\[4\] has 3 entries for 2 clients"):
        validate_for_world(load_config(None, ["simulate.slowdown={1: 1, 4: [1, 2, 3]}"]), 3, 4)


def test_progress_rule_settings_and_adaptive_start():
    cfg = load_config(None, ["split.policy=adaptive", "split.cut_layers=[1,3]", "split.plateau=0.05"])
    assert cfg.split.plateau == 0.05 and cfg.split.trend_window == 2
    with pytest.raises(ConfigError, match=r"split.cut_layers\[1\]=4"):
        validate_for_world(load_config(None, ["split.policy=adaptive", "split.cut_layers=[1,4]"]), 3, 4)
    assert validate_for_world(cfg, 3, 4) is None
    for override in ("split.plateau=1", "split.plateau=-0.1", "split.trend_window=0"):
        with pytest.raises(ConfigError, match=rf"^{re.escape(override.split('=')[0])}="):
            load_config(None, [override])


def test_float_written_without_a_dot_is_a_float():
    """YAML reads 1e30 and 5e-5 as strings; a float field takes them as the numbers they are."""
    from runtime.config import ConfigError, load_config

    cfg = load_config(None, ["train.lr=5e-5", "simulate.slowdown=[1, 2e0]"])
    assert cfg.train.lr == 5e-5 and cfg.simulate.slowdown == [1.0, 2.0]
    with pytest.raises(ConfigError, match="train.lr: 'fast' is not a float"):
        load_config(None, ["train.lr=fast"])


def test_learning_rate_schedules_warm_up_then_fall_to_their_floor():
    from runtime.job import learning_rate

    def lrs(*overrides: str) -> list[float]:
        cfg = load_config(None, ["train.rounds=2", "train.local_steps=5", "train.lr=1.0", *overrides])
        return [learning_rate(cfg, r, s) for r in (1, 2) for s in range(1, 6)]

    assert lrs() == [1.0] * 10
    warm = lrs("train.warmup_steps=4")
    assert warm[:4] == [0.25, 0.5, 0.75, 1.0] and warm[4:] == [1.0] * 6
    linear = lrs("train.lr_schedule=linear", "train.warmup_steps=2", "train.min_lr_ratio=0.2")
    assert linear[:2] == [0.5, 1.0] and linear[-1] == pytest.approx(0.2)
    assert all(a > b for a, b in zip(linear[1:], linear[2:]))  # falls every step after the warm-up
    cosine = lrs("train.lr_schedule=cosine")
    assert cosine[-1] == pytest.approx(0.0) and cosine[4] == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))
    assert learning_rate(load_config(None, ["train.lr_schedule=cosine", "train.lr=0.5"]), 0, 3) == 0.5


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.warmup_steps=100", "train.warmup_steps=100 is not shorter than the run (5 rounds x 20"),
        ("train.warmup_steps=-1", "train.warmup_steps=-1: must be >= 0"),
        ("train.min_lr_ratio=1.5", "train.min_lr_ratio=1.5: must be in [0, 1]"),
        ("train.lr_schedule=step", "train.lr_schedule='step': use constant, linear or cosine"),
        ("split.assignment=random", "split.assignment='random': use predicted, dynamic or round_robin"),
        ("train.clients_per_round=0", "train.clients_per_round=0: must be >= 1"),
        ("train.client_sampling=weighted", "train.client_sampling='weighted': use uniform or by_samples"),
    ],
)
def test_a_schedule_that_cannot_run_is_named(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["split.clients=2"], "split.clients=2 but torchrun started 4 client ranks (workers)"),
        (
            ["split.clients=8", "train.clients_per_round=9"],
            "train.clients_per_round=9 but the run has 8 clients",
        ),
        (["split.clients=8", "simulate.slowdown=[1,2,3,4]"], "simulate.slowdown has 4 entries for 8 clients"),
        (["split.clients=8", "split.cut_layers=[1,2,3,2]"], "split.cut_layers has 4 entries for 8 clients"),
    ],
)
def test_a_federation_the_workers_cannot_run_is_named_before_it_starts(overrides, message):
    cfg = load_config("torchrun_configs/tiny_cpu.yaml", overrides)
    with pytest.raises(ConfigError) as e:
        validate_for_world(cfg, 5, 4)
    assert message in str(e.value)


def test_more_clients_than_workers_is_a_federation_of_the_clients():
    cfg = load_config("torchrun_configs/tiny_cpu.yaml", ["split.clients=8", "split.cut_layers=2"])
    assert cfg.n_clients(5) == 8 and validate_for_world(cfg, 5, 4) == [2] * 8
    importance = ["split.clients=8", "split.cut_layers=2", "lora.selection=importance"]
    assert validate_for_world(load_config("torchrun_configs/tiny_cpu.yaml", importance), 5, 4) == [2] * 8
    u_shape = ["split.clients=8", "split.cut_layers=[1,2,1,2,1,2,1,2]", "split.mode=u_shape"]
    cfg = load_config("torchrun_configs/tiny_cpu.yaml", [*u_shape, "split.tail_layers=1"])
    assert validate_for_world(cfg, 5, 4) == [1, 2] * 4  # U-shaped on shared workers too
    forced = ["split.clients=8", "split.cut_layers=2", "split.schedule={1: [1, 2, 3, 1, 2, 3, 1, 2]}"]
    assert validate_for_world(load_config("torchrun_configs/tiny_cpu.yaml", forced), 5, 4) == [2] * 8
    assert load_config("torchrun_configs/tiny_cpu.yaml", []).n_clients(5) == 4


def test_a_seeded_draw_gives_every_client_its_own_value_the_same_on_every_rank():
    cfg = load_config(
        "torchrun_configs/tiny_cpu.yaml",
        [
            "split.clients=100",
            "split.cut_layers=1",
            "simulate.slowdown={lognormal: 0.8}",
            "simulate.bandwidth_mbps={lognormal: 0.5, median: 200}",
        ],
    )
    assert not cfg.simulate.changes  # a draw is not a schedule
    a, b = cfg.simulate.drawn(100, cfg.seed), cfg.simulate.drawn(100, cfg.seed)
    assert a == b and len(a.slowdown) == len(a.bandwidth_mbps) == 100
    assert min(a.slowdown) == 1.0 and max(a.slowdown) > 2  # the fastest at the machine's speed
    assert sorted(a.bandwidth_mbps)[50] == pytest.approx(200, rel=0.2)  # about the median asked for
    assert a.slowdown != cfg.simulate.drawn(100, cfg.seed + 1).slowdown
    assert a.slowdown != a.bandwidth_mbps  # each knob has a draw of its own
    assert validate_for_world(dataclasses.replace(cfg, simulate=a), 3, 4) == [1] * 100
    assert a.for_client(3)[0] == a.slowdown[3] and a.for_client(3)[2] == a.bandwidth_mbps[3]
    # run_config.json keeps the drawn lists (and a schedule's rounds, which JSON writes as strings)
    saved = json.loads(json.dumps(dataclasses.replace(cfg, simulate=a).to_dict()))
    assert config_from_dict(saved).simulate == a
    timed = load_config(None, ["simulate.slowdown={1: 1.0, 3: 2.0}"])
    assert config_from_dict(json.loads(json.dumps(timed.to_dict()))).simulate.slowdown == {1: 1.0, 3: 2.0}


@pytest.mark.parametrize(
    "override, message",
    [
        ("simulate.slowdown={lognormal: 0.5, median: 2}", "a draw takes exactly the keys ['lognormal']"),
        ("simulate.bandwidth_mbps={lognormal: 0.5}", "exactly the keys ['lognormal', 'median']"),
        ("simulate.memory_limit_gb={lognormal: -1, median: 2}", "lognormal (sigma of the log) must be in"),
        ("simulate.slowdown={lognormal: .inf}", "simulate.slowdown.lognormal=inf: must be a finite number"),
        ("simulate.bandwidth_mbps={lognormal: 1, median: 0}", "median must be > 0"),
    ],
)
def test_a_bad_draw_is_named(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override, named",
    [
        ("train.lr=.inf", "train.lr=inf"),
        ("train.lr=.nan", "train.lr=nan"),
        ("runtime.rpc_timeout_s=.inf", "runtime.rpc_timeout_s=inf"),
        ("simulate.slowdown=[1, .nan]", "simulate.slowdown=nan"),
        ("simulate.slowdown={1: 2.0, 3: .inf}", "simulate.slowdown.3=inf"),
    ],
)
def test_a_number_at_inf_or_nan_is_named_in_one_line(override, named):
    """A range check such as > 0 lets inf through (and a learning rate of inf trains to NaN): every
    number of the config must be finite, wherever it is."""
    with pytest.raises(
        ConfigError, match=rf"^{re.escape(named)}: must be a finite number \(not inf or nan\)$"
    ):
        load_config(None, [override])
