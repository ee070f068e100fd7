"""Ray job: the evidence report of a results folder. ``python jobs/report.py --config report.yaml``

Keys: the options of ``raylead report``: ``results`` (an attack's results folder, or a folder of
several), ``out`` (the HTML file), ``calibration`` (a calibration JSON, or a list of them; also
spelled ``calibrations``), ``redact``, ``page_size``, ``max_pairs``, and the other fields of
:class:`raylead.report.ReportConfig`. Credentials come from the AWS_* environment, never the file.
"""

from typing import Any

from raylead.jobs import cli_spellings, run_job
from raylead.report import ReportConfig, build_report
from raylead.runtime import exit_process


def main(cfg: ReportConfig) -> str:
    return build_report(cfg).line()


def from_yaml(data: dict[str, Any]) -> dict[str, Any]:
    def files(v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    return cli_spellings(data, {"calibration": ("calibrations", files)}, "report config")


if __name__ == "__main__":
    exit_process(run_job("report", ReportConfig, main, transform=from_yaml))
