"""``metasep deploy``: register the Prefect deployments of ``infra/prefect/prefect.yaml``.

A thin wrapper over Prefect's own ``prefect deploy``, which does the registering: before it
runs, the work pools that the chosen deployments name are created when missing (their types are
the keys of ``definitions.work_pools`` in the file; the Kubernetes pool gets the base job template
``kubernetes-job-template.json`` beside it), and the deploy-time variables (``{{ $NAME }}``) are
checked, so that no deployment is registered with a placeholder for a bucket.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from pipeline.commands import UsageError
from pipeline.settings import redact

PREFECT_FILE = Path("infra") / "prefect" / "prefect.yaml"
KUBERNETES_TEMPLATE = "kubernetes-job-template.json"
POOL_KINDS = ("process", "kubernetes")
_ENV_PLACEHOLDER = re.compile(r"\{\{\s*\$(\w+)\s*\}\}")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "deploy",
        help="register the Prefect deployments (nightly separation, evaluation, benchmark)",
        description="Register the deployments of infra/prefect/prefect.yaml with the Prefect "
        "server in PREFECT_API_URL: create the work pools they need, check the deploy-time "
        "variables ({{ $NAME }}, e.g. METASEP_NIGHTLY_SOURCE), then run `prefect deploy`. "
        "Start a worker afterwards: prefect worker start --pool metasep-process",
    )
    parser.add_argument(
        "--prefect-file",
        type=Path,
        help=f"deployments file (default: {PREFECT_FILE} here or in the metasep checkout)",
    )
    parser.add_argument(
        "--pool",
        choices=(*POOL_KINDS, "all"),
        default="process",
        help="deploy the deployments of this kind of work pool (default: process)",
    )
    parser.add_argument(
        "--name",
        action="append",
        default=[],
        metavar="DEPLOYMENT",
        help="only this deployment (repeatable; default: all of the pool kind)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print what would be registered, register nothing"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    prefect_file = find_prefect_file(args.prefect_file)
    project = load_project(prefect_file)
    pools = pool_kinds(project)
    chosen = choose_deployments(project, pools, args.pool, args.name)
    missing = sorted(
        {name for item in chosen for name in placeholders(item) if name not in os.environ}
    )
    print(f"{prefect_file}: {len(chosen)} deployment(s) on {args.pool} pool(s)")
    for item in chosen:
        print(describe(item))
    if missing:
        raise UsageError(f"set {', '.join(missing)} (used by the deployments) and run again")
    if args.dry_run:
        return 0
    api_url = _api_url()
    needed = {item["work_pool"]["name"] for item in chosen}
    for pool in sorted(needed):
        ensure_work_pool(pool, pools[pool], prefect_file.parent)
    command = [sys.executable, "-m", "prefect", "deploy", "--no-prompt"]
    command += ["--prefect-file", str(prefect_file)]
    for item in chosen:
        command += ["--name", item["name"]]
    print(f"registering with {api_url}: {' '.join(command[1:])}", flush=True)
    result = subprocess.run(command, check=False)
    if result.returncode:
        return result.returncode
    workers = " or ".join(f"prefect worker start --pool {pool}" for pool in sorted(needed))
    print(f"registered {len(chosen)} deployment(s); runs start once a worker polls: {workers}")
    return 0


def find_prefect_file(given: Path | None) -> Path:
    """The deployments file: the one given, else the one under the current folder, else the one
    of the checkout this package runs from (an editable install or the image's /opt/metasep)."""
    if given is not None:
        if not given.is_file():
            raise UsageError(f"{given}: no such file")
        return given.resolve()
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (root / PREFECT_FILE).is_file():
            return (root / PREFECT_FILE).resolve()
    raise UsageError(f"no {PREFECT_FILE} here or in the metasep checkout; pass --prefect-file")


def load_project(prefect_file: Path) -> dict[str, Any]:
    import yaml

    try:
        project = yaml.safe_load(prefect_file.read_text())
    except yaml.YAMLError as error:
        raise UsageError(f"{prefect_file}: not YAML ({error})") from None
    if not isinstance(project, dict) or not project.get("deployments"):
        raise UsageError(f"{prefect_file}: no deployments")
    return project


def pool_kinds(project: dict[str, Any]) -> dict[str, str]:
    """Work pool name -> its type (``process`` or ``kubernetes``), from ``definitions``."""
    definitions = (project.get("definitions") or {}).get("work_pools") or {}
    kinds = {pool["name"]: kind for kind, pool in definitions.items()}
    unknown = set(kinds.values()) - set(POOL_KINDS)
    if unknown:
        raise UsageError(f"work pool types {', '.join(sorted(unknown))} are not supported")
    return kinds


def choose_deployments(
    project: dict[str, Any], pools: dict[str, str], kind: str, names: list[str]
) -> list[dict[str, Any]]:
    """The deployments on a pool of ``kind`` (or all), restricted to ``names`` when given."""
    chosen = []
    for item in project["deployments"]:
        pool = (item.get("work_pool") or {}).get("name")
        if pool not in pools:
            raise UsageError(f"deployment {item.get('name')!r}: work pool {pool!r} is not defined")
        if kind in ("all", pools[pool]) and (not names or item["name"] in names):
            chosen.append(item)
    unknown = set(names) - {item["name"] for item in project["deployments"]}
    if unknown:
        raise UsageError(f"no deployment named {', '.join(sorted(unknown))}")
    if not chosen:
        raise UsageError(f"no deployment on a {kind} pool matches")
    return chosen


def placeholders(value: Any) -> set[str]:
    """The environment variables a deployment reads at deploy time (``{{ $NAME }}``)."""
    if isinstance(value, dict):
        return set().union(*(placeholders(item) for item in value.values()))
    if isinstance(value, list):
        return set().union(*(placeholders(item) for item in value))
    if isinstance(value, str):
        return set(_ENV_PLACEHOLDER.findall(value))
    return set()


def describe(item: dict[str, Any]) -> str:
    """One deployment in a few lines: entrypoint, pool, schedule, parameters (as registered)."""
    schedules = ", ".join(
        f"{s['cron']} {s.get('timezone', 'UTC')}" for s in item.get("schedules") or []
    )
    parameters = {
        name: _ENV_PLACEHOLDER.sub(lambda m: os.environ.get(m[1], m[0]), value)
        if isinstance(value, str)
        else value
        for name, value in (item.get("parameters") or {}).items()
    }
    return (
        f"  {item['name']}: {item['entrypoint']} on {item['work_pool']['name']}, "
        f"{'cron ' + schedules if schedules else 'no schedule (run on demand)'}\n"
        f"    parameters: {redact(parameters)}"
    )


def ensure_work_pool(name: str, kind: str, folder: Path) -> None:
    """Create the work pool ``name`` of type ``kind`` unless the server has it (a pool that
    exists is left as it is, whatever its template: it may have been tuned)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            template = base_job_template(kind, folder)
            try:
                client.create_work_pool(
                    WorkPoolCreate(name=name, type=kind, base_job_template=template)
                )
            except ObjectAlreadyExists:  # created meanwhile, by a worker say
                pool = client.read_work_pool(name)
            else:
                print(f"created work pool {name} ({kind})")
                return
    if pool.type != kind:
        raise UsageError(f"work pool {name!r} exists with type {pool.type!r}, not {kind!r}")


def base_job_template(kind: str, folder: Path) -> dict[str, Any]:
    """A new pool's template: Prefect's own for a process pool, the project's for Kubernetes
    (settings and secrets from the ConfigMap and Secrets, non-root, the project's image)."""
    if kind == "kubernetes":
        return json.loads((folder / KUBERNETES_TEMPLATE).read_text())
    from prefect.workers.process import ProcessWorker

    return ProcessWorker.get_default_base_job_template()


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise UsageError(
            "PREFECT_API_URL is not set: deployments live on a Prefect server (prefect server "
            "start, then export PREFECT_API_URL=http://127.0.0.1:4200/api)"
        )
    return url
