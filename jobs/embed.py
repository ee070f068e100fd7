"""Ray job: embed a folder of images. ``python jobs/embed.py --config embed.yaml``

Keys: the options of ``raylead embed`` (source, out, matcher, model, detector, aligned, batch_size,
actors, gpus_per_actor, shard_size, ...). Submit with
``ray job submit --working-dir . -- python jobs/embed.py --config embed.yaml``.
"""

from raylead.embed import EmbedConfig, embed_collection
from raylead.jobs import run_job
from raylead.runtime import exit_process


def main(cfg: EmbedConfig) -> str:
    return embed_collection(cfg).summary()


if __name__ == "__main__":
    exit_process(run_job("embed", EmbedConfig, main))
