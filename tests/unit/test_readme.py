"""The README is the front door, so it must be true: its Python blocks run, its demos work.

Each ```python block of README.md runs as its own script (a fresh process, no
``BANYAN_URL``, so on ``memory://``). An HTML comment on the line before a block
controls it:

- ``<!-- readme-test: skip (why) -->`` does not run it (it needs a broker);
- ``<!-- readme-test: expect "text" -->`` runs it and checks that stdout contains text
  (several ``expect "..."`` may follow one another).

The first set-up command's demos (``python -m examples.signup.all_in_one`` and the
orders one) run as subprocesses too; ``.ci/run`` repeats the first command verbatim in a
fresh virtualenv. The compose file is checked with ``docker compose config``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
COMPOSE = REPO / "compose" / "docker-compose.yml"

_FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_DIRECTIVE = re.compile(r"<!--\s*readme-test:\s*(.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    line: int
    code: str
    skip: str | None
    expect: tuple[str, ...]


def readme_blocks() -> list[Block]:
    text = README.read_text(encoding="utf-8")
    blocks = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").splitlines()
        directive = _DIRECTIVE.search(before[-1]) if before else None
        spec = directive.group(1) if directive else ""
        skip = None
        if spec.startswith("skip"):
            skip = spec[len("skip") :].strip(" ()") or "skipped"
        expect = tuple(re.findall(r'expect "([^"]*)"', spec))
        blocks.append(Block(text.count("\n", 0, match.start()) + 2, match.group(1), skip, expect))
    return blocks


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "BANYAN_URL"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _run(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


BLOCKS = readme_blocks()


def test_the_readme_starts_with_the_two_setup_commands() -> None:
    text = README.read_text(encoding="utf-8")
    first_block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line for line in first_block.splitlines() if line and not line.startswith("#")]
    assert commands == [
        "pip install -e . && python -m examples.signup.all_in_one",
        'pip install -e ".[dev]" && bash scripts/test.sh',
    ]
    # .ci/run reads both commands from README.md: it evals the test command as written
    # and runs the first one in a fresh virtualenv.
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert 'eval "${readme_test_cmd}"' in ci
    assert "README first command in a fresh venv" in ci


def test_the_quick_start_is_at_most_20_lines() -> None:
    quick_start = README.read_text(encoding="utf-8").split("## Quick start", 1)[1]
    code = _FENCE.search(quick_start)
    assert code is not None
    assert len(code.group(1).strip().splitlines()) <= 20


def test_most_blocks_run() -> None:
    assert len(BLOCKS) >= 10
    assert sum(block.skip is None for block in BLOCKS) >= len(BLOCKS) - 2


@pytest.mark.parametrize("block", BLOCKS, ids=[f"README.md:{b.line}" for b in BLOCKS])
def test_readme_python_block_runs(block: Block, tmp_path: Path) -> None:
    if block.skip is not None:
        # Compiling still catches a block that rotted into invalid Python.
        compile(block.code, f"README.md:{block.line}", "exec")
        return
    script = tmp_path / f"readme_line_{block.line}.py"
    script.write_text(block.code, encoding="utf-8")
    result = _run([sys.executable, str(script)])
    assert result.returncode == 0, f"README.md line {block.line} failed:\n{result.stderr}"
    for text in block.expect:
        assert text in result.stdout, (
            f"README.md line {block.line}: {text!r} not in output:\n{result.stdout}"
        )


def test_signup_all_in_one_prints_what_each_service_did() -> None:
    result = _run([sys.executable, "-m", "examples.signup.all_in_one"])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for service, action, count in [
        ("user-service", "user_created", 3),
        ("email-service", "welcome_email_sent", 3),
        ("analytics-service", "signup_counted", 3),
        ("analytics-service", "email_counted", 3),
        ("notification-service", "admins_notified", 3),
        ("signup-web", "CreateUser answered", 3),
        ("signup-web", "CreateUser refused", 1),
    ]:
        lines = re.findall(rf"^{re.escape(service)}\s+{re.escape(action)}\b.*$", out, re.M)
        assert len(lines) == count, f"{service} {action}: {lines}\n{out}"
    assert out.rstrip().endswith("done                   users=3")


def test_orders_all_in_one_ships_every_order_after_its_payment() -> None:
    result = _run([sys.executable, "-m", "examples.orders.all_in_one"])
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    for order in ("ord_1001", "ord_1002"):

        def index(service: str, action: str, order: str = order) -> int:
            pattern = re.compile(rf"^{service}\s+{action}\b.*order_id={order}\b")
            found = [i for i, line in enumerate(out) if pattern.search(line)]
            assert found, f"no {service} {action} for {order}:\n" + "\n".join(out)
            return found[0]

        placed = index("order-service", "order_placed")
        waited = index("shipping-service", "waiting_for_payment")
        paid = index("shipping-service-payments", "payment_recorded")  # its own ordered group
        shipped = index("shipping-service", "order_shipped")
        assert placed < waited < paid < shipped
        index("storefront", "customer told")
    assert out[-1].startswith("demo")
    assert "shipped=2" in out[-1]


def _compose_command() -> list[str] | None:
    """``docker compose`` (the plugin) or the standalone ``docker-compose``, if installed."""
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, timeout=30, check=False
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    if docker is not None and standalone is not None:
        return [standalone]
    return None


def test_compose_file_is_valid() -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("needs the docker client with the compose plugin (or docker-compose)")
    result = subprocess.run(
        [*command, "-f", str(COMPOSE), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_compose_runs_every_signup_service_from_the_repo() -> None:
    """What ``docker compose config`` cannot check: the targets exist and the broker fits."""
    text = COMPOSE.read_text(encoding="utf-8")
    targets = re.findall(r'"run", "(examples\.signup\.\w+):bus"', text)
    assert sorted(targets) == [
        f"examples.signup.{name}"
        for name in ("analytics_service", "email_service", "notification_service", "user_service")
    ]
    for target in targets:
        assert (REPO / (target.replace(".", "/") + ".py")).is_file()
    assert "rabbitmq:3.13-management" in text
    assert "BANYAN_URL: amqp://guest:guest@rabbitmq:5672/" in text
    assert "OTEL_EXPORTER_OTLP_ENDPOINT: http://jaeger:4317" in text
    plugins = (REPO / "compose" / "rabbitmq" / "enabled_plugins").read_text(encoding="utf-8")
    assert "rabbitmq_consistent_hash_exchange" in plugins
    assert "rabbitmq_management" in plugins
    assert (REPO / "compose" / "Dockerfile").is_file()
