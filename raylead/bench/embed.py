"""`raylead bench embed`: the bare matcher vs the full embed pipeline, on the same images.

(a) bare: the images are decoded and aligned beforehand (untimed); the aligned crops are put
    in the object store, and the same number of matcher actors as the pipeline uses (same
    CPUs/GPUs each, same thread settings) embed them in batches — images/s of the model alone.
(b) pipeline: ``embed_collection`` into a temporary folder (read, decode, detect/align,
    embed, write shards + manifest). Its steady-state rate is measured from the first
    completed shard to the last, so the one-off actor start-up is reported separately.
ratio = pipeline / bare. Both run in one process, one after the other, on the same Ray.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import replace
from typing import Any

import numpy as np

from raylead.embed import EmbedConfig, embed_collection, prepare, resolve_parallelism
from raylead.faces import ImageFailure

log = logging.getLogger(__name__)


def _aligned_crops(prep: Any) -> np.ndarray:
    crops = []
    for image_id in prep.image_ids:
        try:
            crop, _ = prep.preprocessor.process(prep.source.child(image_id).read_bytes())
        except ImageFailure:
            continue
        crops.append(crop)
    return np.stack(crops)


def _bare_rate(matcher: Any, crops: np.ndarray, batch_size: int, actors: int, gpus: float) -> float:
    import ray

    @ray.remote
    class BareMatcher:
        def __init__(self, m: Any) -> None:
            self.m = m
            self.m.embed(crops_warm)

        def run(self, refs: list[Any]) -> tuple[int, float, float]:
            batches = ray.get(refs)  # resolved before the clock starts
            start = time.time()
            n = sum(len(self.m.embed(b)) for b in batches)
            return n, start, time.time()

    crops_warm = crops[:1]
    pool = [
        BareMatcher.options(num_cpus=0 if gpus else 1, num_gpus=gpus).remote(matcher)  # type: ignore[attr-defined]
        for _ in range(actors)
    ]
    batches = [crops[i : i + batch_size] for i in range(0, len(crops), batch_size)]
    shares = [[ray.put(b) for b in batches[a::actors]] for a in range(actors)]
    ray.get([p.run.remote([]) for p in pool])  # every actor constructed and warm
    runs = ray.get([p.run.remote(share) for p, share in zip(pool, shares, strict=True)])
    for p in pool:
        ray.kill(p)
    seconds = max(r[2] for r in runs) - min(r[1] for r in runs)
    return sum(r[0] for r in runs) / seconds


def bench_embed(cfg: EmbedConfig, shard_size: int = 64) -> dict[str, Any]:
    from raylead.runtime import ensure_ray

    with tempfile.TemporaryDirectory(prefix="raylead-bench-") as tmp:
        cfg = replace(cfg, out=f"{tmp}/collection", shard_size=shard_size)
        prep = prepare(cfg)
        ensure_ray()
        actors, gpus = resolve_parallelism(cfg, prep.matcher)
        log.info("aligning %d images for the bare-matcher run (untimed)", len(prep.image_ids))
        crops = _aligned_crops(prep)
        bare = _bare_rate(prep.matcher, crops, cfg.batch_size, actors, gpus)
        log.info("bare matcher: %.1f images/s", bare)

        stamps: list[tuple[float, int]] = []
        t0 = time.perf_counter()
        result = embed_collection(cfg, prep, on_progress=lambda done, _: stamps.append((time.perf_counter(), done)))
        wall = time.perf_counter() - t0
        moving = [(t, n) for t, n in stamps if n > 0]
        (t_first, n_first), (t_last, n_last) = moving[0], moving[-1]
        steady = (n_last - n_first) / (t_last - t_first) if t_last > t_first else n_last / wall
    return {
        "matcher": prep.matcher.name,
        "matcher_version": prep.matcher.version,
        "detector": None if cfg.aligned else cfg.detector,
        "alignment": prep.alignment,
        "providers": cfg.providers or "auto",
        "fp16": cfg.fp16,
        "images": len(prep.image_ids),
        "embedded": result.manifest.ok,
        "batch_size": cfg.batch_size,
        "actors": actors,
        "gpus_per_actor": gpus,
        "bare_images_per_s": round(bare, 2),
        "pipeline_images_per_s": round(steady, 2),
        "pipeline_wall_images_per_s": round(len(prep.image_ids) / wall, 2),
        "pipeline_startup_s": round(t_first - t0, 2),
        "ratio": round(steady / bare, 3),
    }
