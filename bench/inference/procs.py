"""Processes of the inference benchmarks: the instant upstream, Parley's inference service (through
its real entry point, `parley serve inference`), the floor, LiteLLM's proxy; and waiting until each is ready."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

from bench.common import cpu_seconds, free_port, process, wait_serving, wait_until  # noqa: F401 - procs.*

LITELLM_VENV = Path(__file__).resolve().parent / ".venv-litellm"


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    def answers() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    wait_until(answers, proc, f"answer from {url}", timeout)


def upstream(port: int, tokens: int):
    return process([sys.executable, "-m", "bench.inference.upstream", "--port", str(port), "--tokens", str(tokens)])


def floor(port: int, upstream_base: str, log: str | None = None):
    """The benchmark's floor (`bench.inference.floor`): a bare Python gRPC relay to the upstream."""
    return process([sys.executable, "-m", "bench.inference.floor", "--port", str(port), "--upstream", upstream_base],
                   log=log)


def parley(port: int, routes: list[dict] | None, *, local: bool, log_level: str = "INFO", log: str | None = None,
           extra_env: dict[str, str] | None = None):
    """`parley serve inference` configured through the environment, as in production."""
    env = {**(extra_env or {}),
        "PARLEY_INFERENCE_PORT": str(port),
        "PARLEY_METRICS_PORT": "0",
        "PARLEY_LOG_LEVEL": log_level,
        "PARLEY_INFERENCE__LOCAL_ENABLED": str(local).lower(),
        "PARLEY_INFERENCE__ROUTES": json.dumps(routes or []),
    }
    if routes:
        env["PARLEY_INFERENCE__DEFAULT_MODEL"] = routes[0]["name"]
    return process([sys.executable, "-m", "parley.cli", "serve", "inference"], env, log)


def litellm_available() -> str | None:
    """Why LiteLLM cannot run, or None when its venv is there."""
    binary = LITELLM_VENV / "bin" / "litellm"
    if not binary.exists():
        return (f"{binary} is missing: create it with `python -m venv {LITELLM_VENV}` and "
                f"`{LITELLM_VENV}/bin/pip install 'litellm[proxy]'` (1.106.2 measured)")
    return None


def litellm(port: int, upstream_base: str, config_path: Path, log: str | None = None):
    """LiteLLM's proxy (one worker, as Parley runs one process) with one model routed to the upstream; no
    database, no network calls."""
    config_path.write_text(
        "model_list:\n"
        "  - model_name: instant\n"
        "    litellm_params:\n"
        "      model: openai/instant\n"
        f"      api_base: {upstream_base}\n"
        "      api_key: none\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
    )
    # No master key: Parley's gRPC port does no authentication either, so neither path pays for it.
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "DATABASE_URL": None,
           "STORE_MODEL_IN_DB": "False", "NO_DOCS": "True", "LITELLM_MASTER_KEY": None,
           "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true"}
    argv = [str(LITELLM_VENV / "bin" / "litellm"), "--config", str(config_path), "--host", "127.0.0.1",
            "--port", str(port), "--num_workers", "1"]
    return process(argv, env, log)
