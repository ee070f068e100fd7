"""Ray job: calibrate a matcher's threshold on a labelled set. ``python jobs/calibrate.py --config calibrate.yaml``

Keys: the options of ``raylead calibrate``: ``labelled`` (image folder with one subfolder per
identity, or a collection), ``out`` (the calibration JSON), ``matcher`` (or its flags ``model``,
``detector``, ``model_root``, ``pack``), ``fmr``, ``impostor_pairs`` (``all`` or a number), ``seed``,
``bins``, ``embeddings_dir``, ``actors``. Credentials come from the AWS_* environment, never the file.
"""

from typing import Any

from raylead.attacks.calibrate import CalibrateConfig, headline, parse_impostor_pairs, run_calibrate
from raylead.jobs import cli_spellings, run_job, with_matcher_flags
from raylead.runtime import exit_process


def main(cfg: CalibrateConfig) -> str:
    return f"{headline(run_calibrate(cfg))}\ncalibration: {cfg.out}"


def from_yaml(data: dict[str, Any]) -> dict[str, Any]:
    def pairs(v: Any) -> Any:
        return parse_impostor_pairs(v) if isinstance(v, str) else v  # a number stays a number

    data = cli_spellings(data, {"impostor_pairs": ("impostor_pairs", pairs)}, "calibrate config")
    return with_matcher_flags(data, CalibrateConfig)


if __name__ == "__main__":
    exit_process(run_job("calibrate", CalibrateConfig, main, transform=from_yaml))
