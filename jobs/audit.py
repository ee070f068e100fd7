"""Ray job: audit generator checkpoints. ``python jobs/audit.py --config audit.yaml``

Keys: the options of ``raylead audit run|pending`` (``--train-index`` → ``train_index``) plus
``mode: run`` (one ``checkpoint``) or ``mode: pending`` (every entry under ``checkpoints`` not yet
in the audit history), validated by :class:`raylead.audit.AuditConfig`. Prints one trend line per
audited checkpoint; exits 10 with one verdict line when leakage rose beyond ``tolerance``.
Credentials come from the AWS_* environment, never the file.
"""

from typing import Any

from raylead.audit import AuditConfig, run
from raylead.jobs import cli_spellings, key_values, run_job
from raylead.runtime import exit_process


def main(cfg: AuditConfig) -> str:
    return run(cfg)


def from_yaml(data: dict[str, Any]) -> dict[str, Any]:
    """``option: [KEY=VALUE, ...]`` (the CLI's ``--option``) or ``generator_options: {KEY: VALUE}``;
    ``triage_option`` likewise for ``triage_options``."""
    spellings = {
        "option": ("generator_options", key_values("--option")),
        "triage_option": ("triage_options", key_values("--triage-option")),
    }
    return cli_spellings(data, spellings, "audit config")


if __name__ == "__main__":
    exit_process(run_job("audit", AuditConfig, main, transform=from_yaml))
