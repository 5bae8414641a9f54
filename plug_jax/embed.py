"""Precomputes the history embeddings of a run's data into the workdir's cache.

  python -m plug_jax.embed --config configs/lamp3.py --workdir /tmp/pplug_lamp3

Training builds the cache on first use too; this command does it ahead (e.g. once on one host).
"""

from __future__ import annotations

from typing import Sequence

from plug_jax import cli, experiment


def main(argv: Sequence[str]) -> None:
    del argv
    cli.check_writable(cli.WORKDIR.value)
    exp = experiment.build(cli.CONFIG.value, cli.WORKDIR.value, with_llm=False)
    cli.echo(f"{len(exp.table)} distinct history texts, {exp.table.width}-wide embeddings, "
             f"cached in {exp.table.path}")


if __name__ == "__main__":
    cli.run(main, "config", "workdir")
