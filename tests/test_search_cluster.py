"""A 4-shard index searched on a 3-node Ray cluster gives the same answers as on one node."""

from __future__ import annotations

import numpy as np

from raylead.search import IndexSearcher, SearchConfig, search


def test_four_shards_on_three_nodes(small_indexes, clustered_small, ray_cluster):
    c = clustered_small
    with IndexSearcher(small_indexes[4], use_ray=False) as local:
        want = local.search(c.queries, 10, 8, 16)
        want_exact = local.exact_search(c.queries, 10)
        want_tuned = search(c.queries, local, config=SearchConfig(engine="approximate", target_recall=0.99))
    with IndexSearcher(small_indexes[4]) as dist:
        infos = dist.shard_info()
        assert len(infos) == 4 and len({i["node_id"] for i in infos}) >= 2  # spread over the nodes
        got = dist.search(c.queries, 10, 8, 16, query_block=100)  # several blocks in flight
        got_exact = dist.exact_search(c.queries, 10)
        got_tuned = search(c.queries, dist, config=SearchConfig(engine="approximate", target_recall=0.99))
    for x, y in zip(got, want, strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(got_exact[1], want_exact[1])
    assert (got_tuned.nprobe, got_tuned.k_factor) == (want_tuned.nprobe, want_tuned.k_factor)
    np.testing.assert_array_equal(got_tuned.idx, want_tuned.idx)
    np.testing.assert_array_equal(got_tuned.scores, want_tuned.scores)
