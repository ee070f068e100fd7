"""Faults during search: a worker node removed mid-search, the driver killed (SIGINT/SIGKILL),
reruns with the same or other settings, damaged result parts.

Every run is compared with a fault-free run of the same search: identical results, each query
exactly ``k`` rows, nothing lost or duplicated.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from faults import signal_when, stop_search_after

from raylead.errors import ConfigError
from raylead.search import IndexSearcher, SearchConfig, SearchJob, part_names, run_search

RAYLEAD = [sys.executable, "-m", "raylead.cli"]
K = 10
# 20000 queries in blocks of 100: 200 result parts, a few seconds of searching on 2 cores
N_QUERIES = 20000
BLOCK = 100
APPROX = SearchConfig(k=K, engine="approximate", nprobe=8, k_factor=4, query_block=BLOCK)


@pytest.fixture(scope="module")
def many_queries(clustered_small, tmp_path_factory) -> str:
    """A collection of 20000 queries near the clustered set's (written once per module)."""
    from raylead import catalog
    from raylead.storage import Location

    rng = np.random.default_rng(5)
    q = np.repeat(clustered_small.queries, N_QUERIES // clustered_small.queries.shape[0], axis=0)
    q = q + 0.05 * rng.standard_normal(q.shape).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    path = tmp_path_factory.mktemp("many_queries")
    root = Location.parse(str(path))
    ids = [f"q{i:05d}" for i in range(N_QUERIES)]
    table = catalog.shard_table(ids, [None] * N_QUERIES, q, [1.0] * N_QUERIES, ["ok"] * N_QUERIES, 32)
    data = catalog.table_to_parquet_bytes(table)
    root.child("shards/part-00000.parquet").write_bytes(data)
    info = catalog.ShardInfo("shards/part-00000.parquet", N_QUERIES, N_QUERIES, 0, catalog.sha256_bytes(data), "")
    catalog.write_manifest(root, catalog.new_manifest(str(path), "dlib", "test", 32, "test", [info], {}))
    return str(path)


def _results(out: Path):
    return pq.read_table(out / "results.parquet", use_threads=False)


def _assert_complete(out: Path, reference: Path | None, n: int = N_QUERIES, k: int = K, block: int = BLOCK) -> None:
    t = _results(out)
    assert t.column_names == ["query_id", "rank", "target_id", "score", "approx_score"]
    qids = t.column("query_id").to_pylist()
    counts: dict[str, int] = {}
    for x in qids:
        counts[x] = counts.get(x, 0) + 1
    assert len(counts) == n and set(counts.values()) == {k}, "a query lost or duplicated rows"
    pairs = list(zip(qids, t.column("target_id").to_pylist(), strict=True))
    assert len(set(pairs)) == len(pairs), "a (query, target) pair appears twice"
    assert qids == sorted(qids), "results are not in query order"
    if reference is not None:
        assert t.equals(_results(reference)), "results differ from the fault-free run"
    summary = json.loads((out / "search.json").read_text())
    assert len(summary["parts"]) == -(-n // block)
    assert sum(p["rows"] for p in summary["parts"]) == n * k
    assert not (out / "parts").exists() and not (out / "run.json").exists(), "a finished search stored twice"


def _check_parts_never_partial(out: Path) -> int:
    """Every part with a marker passes its checksum; returns how many were finished."""
    from raylead.catalog import sha256_bytes

    markers = sorted((out / "parts").glob("*.done.json"))
    for m in markers:
        d = json.loads(m.read_text())
        assert sha256_bytes((out / d["path"]).read_bytes()) == d["sha256"], f"{m.name} marks a partial part"
    for tmp in (out / "parts").glob(".*.tmp-*"):
        assert not tmp.name.endswith(".done.json")
    return len(markers)


# -- a node removed mid-search --------------------------------------------------------------------
@pytest.mark.slow
def test_worker_node_removed_mid_search(small_indexes, many_queries, ray_cluster, tmp_path, monkeypatch):
    """4 shard searchers SPREAD over 3 nodes; a node hosting one or more is removed after the first
    result part: its actors restart on the other nodes, reload their shards from storage, the
    blocks they had in flight are retried; output identical to the fault-free run."""
    reference = tmp_path / "reference"
    run_search(SearchJob(many_queries, small_indexes[4], str(reference), APPROX))
    _assert_complete(reference, None)

    placed: list[list[dict]] = []
    original_init = IndexSearcher.__init__

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        placed.append(self.shard_info())  # before any query block is queued

    monkeypatch.setattr(IndexSearcher, "__init__", recording_init)
    head = ray_cluster.head_node.node_id
    removed: list[str] = []

    def remove_a_node(done: int, total: int) -> None:
        if removed:
            return
        nodes = {i["node_id"] for i in placed[-1]} - {head}
        victim = next(n for n in ray_cluster.list_all_nodes() if n.node_id in nodes)
        ray_cluster.remove_node(victim, allow_graceful=False)
        removed.append(victim.node_id)
        assert done < total, "the search finished before the node was removed"

    out = tmp_path / "out"
    t0 = time.monotonic()
    summary = run_search(SearchJob(many_queries, small_indexes[4], str(out), APPROX), on_part=remove_a_node)
    assert removed, "no node was removed during the search"
    lost = [i for i in placed[-1] if i["node_id"] == removed[0]]
    assert lost, "the removed node hosted no shard searcher"
    assert summary["parts_reused"] == 0 and not summary["already_complete"]
    _assert_complete(out, reference)
    assert time.monotonic() - t0 < 120


# -- the driver killed --------------------------------------------------------------------------
def _cli_args(queries: str, index: str, out: Path) -> list[str]:
    return [
        *RAYLEAD, "search", queries, "--index", index, "--out", str(out), "--k", str(K),
        "--engine", "approximate", "--nprobe", "8", "--k-factor", "4", "--query-block", str(BLOCK),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference_results(small_indexes, many_queries, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("search_reference")
    run_search(SearchJob(many_queries, small_indexes[4], str(out), APPROX, use_ray=False))
    _assert_complete(out, None)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_driver_killed_mid_search_then_rerun_resumes(
    small_indexes, many_queries, reference_results, ray_local, tmp_path, sig
):
    import ray

    out = tmp_path / "out"
    args = _cli_args(many_queries, small_indexes[4], out)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = signal_when(args, env, out, "parts/*.done.json", sig, timeout=180)
    assert proc.returncode != 0, "the search finished before it was killed"
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "rerun the same command to resume" in proc.stderr
    assert not (out / "search.json").exists() and not (out / "results.parquet").exists()
    finished = _check_parts_never_partial(out)
    assert 1 <= finished < N_QUERIES // BLOCK
    rerun = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    reused = int(rerun.stdout.split("resumed: ")[1].split(" ")[0])
    assert reused >= finished - 1  # a part whose marker is being written at the kill may be redone
    _assert_complete(out, reference_results)
    again = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and "already holds these results" in again.stdout


# -- reruns, other settings, damaged parts (in-process, fast) ---------------------------------------
def test_rerun_skips_finished_parts_and_rejects_other_settings(
    small_indexes, write_collection, clustered_small, tmp_path
):
    q = write_collection(tmp_path / "q", [f"q{i:03d}" for i in range(95)], [None] * 95, clustered_small.queries[:95])
    cfg = SearchConfig(k=5, engine="approximate", nprobe=8, k_factor=4, query_block=10)
    ref, out = tmp_path / "ref", tmp_path / "out"
    want = run_search(SearchJob(q, small_indexes[4], str(ref), cfg, use_ray=False))
    assert len(want["parts"]) == 10 and want["parts_reused"] == 0
    _assert_complete(ref, None, 95, 5, 10)

    # a killed run: parts 0-5 finished; then part 6 written without its marker, part 3 damaged
    job = SearchJob(q, small_indexes[4], str(out), cfg, use_ray=False)
    stop_search_after(job, 6)
    assert sorted(p.name for p in (out / "parts").glob("*.done.json")) == [
        Path(part_names(n)[1]).name for n in range(6)
    ]
    assert not (out / "search.json").exists() and not (out / "results.parquet").exists()
    (out / part_names(6)[0]).write_bytes(b"PAR1 half a part")
    damaged = out / part_names(3)[0]
    damaged.write_bytes(damaged.read_bytes()[:-7])
    got = run_search(job)
    assert got["parts_reused"] == 5 and not got["already_complete"]
    assert got["sha256"] == want["sha256"]
    _assert_complete(out, ref, 95, 5, 10)

    done = run_search(job)
    assert done["already_complete"] and done["sha256"] == want["sha256"]
    # finished results damaged afterwards: the search is done again (its parts are gone)
    results = out / "results.parquet"
    results.write_bytes(results.read_bytes()[:-5])
    redone = run_search(job)
    assert not redone["already_complete"] and redone["parts_reused"] == 0 and redone["sha256"] == want["sha256"]
    _assert_complete(out, ref, 95, 5, 10)

    # other settings into the same --out: a one-line ConfigError, finished or not
    for other in (SearchConfig(k=6, engine="exact", query_block=10), SearchConfig(k=5, engine="exact", query_block=10)):
        with pytest.raises(ConfigError, match="choose another --out") as err:
            run_search(SearchJob(q, small_indexes[4], str(out), other, use_ray=False))
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="choose another --out"):
        run_search(SearchJob(q, small_indexes[1], str(out), cfg, use_ray=False))  # another index
    (out / "search.json").unlink()  # results whose search is unknown are never overwritten
    with pytest.raises(ConfigError, match="without their search.json"):
        run_search(SearchJob(q, small_indexes[4], str(out), SearchConfig(k=6, query_block=10), use_ray=False))
    assert _results(out).equals(_results(ref))
    unfinished = tmp_path / "unfinished"
    stop_search_after(SearchJob(q, small_indexes[4], str(unfinished), cfg, use_ray=False), 2)
    with pytest.raises(ConfigError, match="unfinished search"):
        run_search(SearchJob(q, small_indexes[4], str(unfinished), SearchConfig(k=5, query_block=7), use_ray=False))


def test_auto_engine_choice_is_kept_on_resume(small_indexes, write_collection, clustered_small, tmp_path):
    """A resumed run reuses the first run's engine and tuned nprobe/k_factor (from run.json),
    even if a new tuning or cost estimate would choose differently."""
    q = write_collection(tmp_path / "q", [f"q{i:03d}" for i in range(60)], [None] * 60, clustered_small.queries[:60])
    cfg = SearchConfig(k=5, engine="approximate", target_recall=0.95, query_block=20)
    out = tmp_path / "out"
    job = SearchJob(q, small_indexes[4], str(out), cfg, use_ray=False)
    stop_search_after(job, 2)
    run = json.loads((out / "run.json").read_text())
    assert run["choice"]["engine"] == "approximate" and run["choice"]["tuning"] is not None
    run["choice"]["nprobe"] = 1  # what a different tuning outcome would look like
    (out / "run.json").write_text(json.dumps(run))
    again = run_search(job)
    assert again["parts_reused"] == 2 and again["nprobe"] == 1
