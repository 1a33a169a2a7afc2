"""GPU placement, the aggregation backend and the RPC device maps: pure decisions, no GPU needed.

``runtime.placement`` decides from what every rank reports (its node, how many GPUs it sees);
``runtime.dist.start`` only gathers the reports and applies the answer, so these tests cover every
decision a GPU run makes at start-up.
"""

from __future__ import annotations

import pytest

from runtime.config import ConfigError, load_config
from runtime.placement import (
    Placement,
    PlacementError,
    RankReport,
    choose_backend,
    device_maps,
    place,
    place_on_node,
    torchrun_layout,
)


def devices(p: Placement) -> list[str]:
    return [p.device(r) for r in range(len(p.gpus))]


# --- placement -------------------------------------------------------------------------------------


def test_one_node_four_gpus_five_ranks_server_owns_cuda0():
    p = place(torchrun_layout([5], 4), "auto", "own")
    # the server alone on cuda:0; 4 workers round-robin on cuda:1..3, so the 4th wraps to cuda:1
    assert devices(p) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:1"]
    assert p.shared() == [("node0", 1, (1, 4))]
    assert "runtime.server_gpu=own" in p.reason


def test_one_node_four_gpus_five_ranks_server_shares():
    p = place(torchrun_layout([5], 4), "auto", "shared")
    # every rank round-robin over all 4 GPUs: the 4th worker lands on the server's cuda:0
    assert devices(p) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0"]
    assert p.shared() == [("node0", 0, (0, 4))]
    assert "runtime.server_gpu=shared" in p.reason


def test_one_node_four_gpus_four_ranks_nobody_shares():
    for option in ("own", "shared"):
        p = place(torchrun_layout([4], 4), "auto", option)
        assert devices(p) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
        assert p.shared() == []


def test_two_gpus_three_ranks_own_and_shared_differ():
    assert place_on_node(3, 2, holds_server=True, server_gpu="own") == [0, 1, 1]
    assert place_on_node(3, 2, holds_server=True, server_gpu="shared") == [0, 1, 0]
    # a node without the server ignores the option: all its GPUs are the workers'
    assert place_on_node(3, 2, holds_server=False, server_gpu="own") == [0, 1, 0]


def test_one_gpu_four_ranks_all_share_it():
    for option in ("own", "shared"):
        p = place(torchrun_layout([4], 1), "auto", option)
        assert devices(p) == ["cuda:0"] * 4
        assert p.shared() == [("node0", 0, (0, 1, 2, 3))]


def test_zero_gpus_is_cpu():
    p = place(torchrun_layout([5], 0), "auto", "own")
    assert devices(p) == ["cpu"] * 5
    assert p.shared() == []
    assert "no CUDA device" in p.reason


def test_device_cpu_ignores_the_gpus():
    p = place(torchrun_layout([3], 4), "cpu", "own")
    assert devices(p) == ["cpu"] * 3 and "runtime.device=cpu" in p.reason


def test_device_cuda_without_gpu_names_the_field():
    with pytest.raises(PlacementError, match=r"runtime\.device=cuda.*ranks 0, 1, 2.*runtime\.device=auto"):
        place(torchrun_layout([3], 0), "cuda")


def test_a_mixed_world_computes_on_cpu_everywhere():
    # node1 has no GPU: under auto every rank computes on CPU (as before this placement existed)
    p = place(torchrun_layout([3, 2], [2, 0]), "auto")
    assert devices(p) == ["cpu"] * 5
    assert "ranks 3, 4" in p.reason


def test_two_nodes_workers_on_the_other_node_use_all_its_gpus():
    # node0: server + 3 workers on 4 GPUs; node1: 5 workers on 4 GPUs (no server there, so cuda:0 too)
    p = place(torchrun_layout([4, 5], 4), "auto", "own")
    node0, node1 = devices(p)[:4], devices(p)[4:]
    assert node0 == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert node1 == ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0"]
    # the same index on different nodes is not sharing; ranks 4 and 8 on node1's cuda:0 are
    assert p.shared() == [("node1", 0, (4, 8))]


def test_two_nodes_of_different_sizes():
    p = place(torchrun_layout([3, 2], [2, 8]), "auto", "own")
    assert devices(p) == ["cuda:0", "cuda:1", "cuda:1", "cuda:0", "cuda:1"]
    assert p.shared() == [("node0", 1, (1, 2))]


def test_two_agents_on_one_host_count_as_one_node():
    # two torchrun agents on one 4-GPU host (same node key): 6 ranks spread over the host's GPUs, not
    # each agent's 3 ranks on cuda:0..2 as if it had the GPUs to itself
    reports = [RankReport(r, "hostA|*", 4) for r in range(6)]
    p = place(reports, "auto", "own")
    assert devices(p) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:1", "cuda:2"]


@pytest.mark.parametrize("option", ["own", "shared"])
@pytest.mark.parametrize("gpus", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("n_ranks", [1, 2, 3, 5, 9, 17])
def test_placement_invariants(n_ranks, gpus, option):
    on_node = place_on_node(n_ranks, gpus, holds_server=True, server_gpu=option)
    assert len(on_node) == n_ranks and all(0 <= g < gpus for g in on_node)
    assert on_node[0] == 0  # the server is on cuda:0 (the workers' device maps point there)
    workers = on_node[1:]
    pool = list(range(1, gpus)) if option == "own" and gpus >= 2 else list(range(gpus))
    if option == "own" and gpus >= 2:
        assert 0 not in workers  # the server's GPU is its own
    # the workers fill their pool evenly: loads differ by at most one (the server counts on cuda:0)
    loads = [workers.count(g) + (g == 0) for g in pool]
    assert max(loads) - min(loads) <= 1
    # no device is shared while there are at least as many GPUs as ranks
    if gpus >= n_ranks:
        assert len(set(on_node)) == n_ranks


def test_reports_must_cover_every_rank():
    with pytest.raises(ValueError, match="ranks 0..1"):
        place([RankReport(0, "a", 1), RankReport(2, "a", 1)])


# --- the aggregation backend -----------------------------------------------------------------------


def test_auto_is_nccl_when_every_rank_has_a_gpu_of_its_own():
    b = choose_backend(place(torchrun_layout([4], 4)), "auto")
    assert b.name == "nccl" and "of its own" in b.reason


def test_auto_across_nodes_is_nccl_when_no_device_is_shared():
    assert choose_backend(place(torchrun_layout([4, 4], 4)), "auto").name == "nccl"


def test_auto_is_gloo_when_two_ranks_share_a_device():
    b = choose_backend(place(torchrun_layout([5], 4), "auto", "own"), "auto")
    assert b.name == "gloo"
    assert "ranks 1, 4 share cuda:1 on node0" in b.reason


def test_auto_is_gloo_when_the_server_shares():
    # 4 ranks on 4 GPUs: own and shared place alike, no sharing; 5 on 4 with shared: the server shares
    assert choose_backend(place(torchrun_layout([4], 4), "auto", "shared")).name == "nccl"
    b = choose_backend(place(torchrun_layout([5], 4), "auto", "shared"))
    assert b.name == "gloo" and "ranks 0, 4 share cuda:0" in b.reason


def test_auto_is_gloo_on_one_shared_gpu_and_on_cpu():
    assert choose_backend(place(torchrun_layout([4], 1)), "auto").name == "gloo"
    b = choose_backend(place(torchrun_layout([4], 0)), "auto")
    assert b.name == "gloo" and "CPU" in b.reason


def test_sharing_on_another_node_alone_rules_out_nccl():
    # node0 (the server's) has a GPU per rank; node1 has 3 workers on 2 GPUs
    b = choose_backend(place(torchrun_layout([2, 3], 2)), "auto")
    assert b.name == "gloo" and "node1" in b.reason


def test_explicit_gloo_is_kept_on_gpus():
    b = choose_backend(place(torchrun_layout([4], 4)), "gloo")
    assert b.name == "gloo" and "runtime.aggregation_backend=gloo" in b.reason


def test_explicit_nccl_where_it_holds():
    assert choose_backend(place(torchrun_layout([4, 3], 4)), "nccl").name == "nccl"


def test_explicit_nccl_on_a_shared_device_is_a_config_error():
    p = place(torchrun_layout([5], 4), "auto", "own")
    with pytest.raises(PlacementError) as e:
        choose_backend(p, "nccl")
    message = str(e.value)
    assert message.startswith("runtime.aggregation_backend=nccl")
    assert "ranks 1, 4 share cuda:1 on node0" in message
    assert "Duplicate GPU" in message
    assert "use runtime.aggregation_backend=auto" in message and "or gloo" in message
    assert isinstance(e.value, ConfigError)  # reported like every other config error


def test_explicit_nccl_on_one_gpu_and_on_cpu_is_a_config_error():
    with pytest.raises(PlacementError, match=r"aggregation_backend=nccl but ranks 0, 1, 2, 3 share cuda:0"):
        choose_backend(place(torchrun_layout([4], 1)), "nccl")
    with pytest.raises(PlacementError, match=r"aggregation_backend=nccl needs a CUDA device on every rank"):
        choose_backend(place(torchrun_layout([3], 0)), "nccl")


def test_unknown_options_name_the_field():
    with pytest.raises(PlacementError, match=r"runtime\.aggregation_backend='mpi': use auto, nccl or gloo"):
        choose_backend(place(torchrun_layout([2], 2)), "mpi")
    with pytest.raises(PlacementError, match=r"runtime\.server_gpu='half': use own or shared"):
        place(torchrun_layout([2], 2), "auto", "half")


# --- RPC device maps -------------------------------------------------------------------------------


def test_device_maps_follow_the_placement():
    p = place(torchrun_layout([5], 4), "auto", "own")
    assert device_maps(p, 0) == {}  # the server only replies: TensorPipe reverses each caller's map
    assert [device_maps(p, r) for r in range(1, 5)] == [{0: {1: 0}}, {0: {2: 0}}, {0: {3: 0}}, {0: {1: 0}}]


def test_device_maps_on_another_node_and_on_cpu():
    p = place(torchrun_layout([2, 3], [2, 4]), "auto", "own")
    assert [device_maps(p, r) for r in range(5)] == [{}, {0: {1: 0}}, {0: {0: 0}}, {0: {1: 0}}, {0: {2: 0}}]
    cpu = place(torchrun_layout([3], 4), "cpu")
    assert [device_maps(cpu, r) for r in range(3)] == [{}, {}, {}]


# --- config fields ---------------------------------------------------------------------------------


def test_config_defaults_and_overrides():
    rt = load_config(None, []).runtime
    assert (rt.server_gpu, rt.aggregation_backend) == ("own", "auto")
    rt = load_config(None, ["runtime.server_gpu=shared", "runtime.aggregation_backend=gloo"]).runtime
    assert (rt.server_gpu, rt.aggregation_backend) == ("shared", "gloo")


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        (["runtime.server_gpu=mine"], r"runtime\.server_gpu='mine': use own .* or shared"),
        (["runtime.aggregation_backend=mpi"], r"runtime\.aggregation_backend='mpi': use auto, nccl or gloo"),
        (
            ["runtime.aggregation_backend=nccl", "runtime.device=cpu"],
            r"runtime\.aggregation_backend=nccl needs a GPU on every rank but runtime\.device=cpu: use "
            r"runtime\.aggregation_backend=auto or gloo",
        ),
    ],
)
def test_config_errors_name_the_field_and_the_fix(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides)


def test_report_on_cpu_asks_cuda_nothing(monkeypatch):
    import torch

    from runtime import dist

    def no_cuda():
        raise AssertionError("runtime.device=cpu must not query CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", no_cuda)
    monkeypatch.setattr(torch.cuda, "device_count", no_cuda)
    r = dist.report(3, "cpu")
    assert (r.rank, r.gpus) == (3, 0)
