"""The README and the docs site cannot rot: examples run, commands compose, links and paths resolve,
and the strict site build (mkdocs.yml) passes.

Conventions (docs/about-docs.md): a ```python block preceded by ``<!-- docs-test: run -->`` runs with
fresh globals in an empty folder (one interpreter for all of them); every other python block is compiled and its
``from i2e_train... import`` names must exist; every entry-point command in a bash block is
composed with its overrides.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
RUN_MARK = "<!-- docs-test: run -->"
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                   re.M | re.S)
ENTRY_POINTS = {"i2e-train": "train", "i2e-eval": "eval", "i2e-pipeline": "pipeline",
                "i2e-convert": "convert", "i2e-viz": "viz", "i2e-study": "study"}


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _blocks(lang: str) -> list[tuple[str, int, str, bool]]:
    """(page, line, code, marked to run) of every fenced block of ``lang`` in the README and docs/."""
    out = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            if m.group("lang") != lang:
                continue
            before = text[: m.start()].rstrip().rsplit("\n", 1)[-1].strip()
            line = text.count("\n", 0, m.start()) + 1
            out.append((_rel(page), line, m.group("body"), before == RUN_MARK))
    return out


RUNNABLE = [b for b in _blocks("python") if b[3]]
STATIC = [b for b in _blocks("python") if not b[3]]


def test_the_front_page_and_getting_started_have_examples_that_run():
    pages = {page for page, *_ in RUNNABLE}
    assert {"README.md", "docs/getting-started.md"} <= pages, pages


# One interpreter runs every example (torch is imported once), each with fresh globals in its own
# empty folder; the result of each is a traceback or None.
_DRIVER = """
import json, os, sys, traceback
blocks, base = json.loads(sys.stdin.read()), sys.argv[1]
results = []
for i, code in enumerate(blocks):
    folder = os.path.join(base, str(i))
    os.makedirs(folder)
    os.chdir(folder)
    try:
        exec(compile(code, f"<example {i}>", "exec"), {"__name__": "__main__"})
        results.append(None)
    except BaseException:
        results.append(traceback.format_exc())
print("RESULTS" + json.dumps(results))
"""


@pytest.fixture(scope="module")
def example_results(tmp_path_factory):
    import json

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _DRIVER, str(tmp_path_factory.mktemp("examples"))],
                          input=json.dumps([b[2] for b in RUNNABLE]), env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0 and "RESULTS" in proc.stdout, proc.stdout + proc.stderr
    return json.loads(proc.stdout.rsplit("RESULTS", 1)[1])


@pytest.mark.parametrize("index", range(len(RUNNABLE)), ids=[f"{b[0]}:{b[1]}" for b in RUNNABLE])
def test_runnable_example(index, example_results):
    page, line, code, _ = RUNNABLE[index]
    assert example_results[index] is None, f"{page}:{line}: the example failed\n{example_results[index]}"


@pytest.mark.parametrize("page,line,code", [b[:3] for b in STATIC], ids=[f"{b[0]}:{b[1]}" for b in STATIC])
def test_other_python_blocks_compile_and_their_imports_exist(page, line, code):
    tree = ast.parse(code, filename=f"{page}:{line}")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "i2e_train":
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{page}:{line}: {node.module} has no {alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "i2e_train":
                    importlib.import_module(alias.name)


def _commands() -> list[tuple[str, int, str, list[str]]]:
    """(page, line, config name, arguments) of every entry-point call in a bash block."""
    out = []
    for page, line, body, _ in _blocks("bash"):
        for i, text in enumerate(body.replace("\\\n", " ").splitlines()):
            for part in text.split("&&"):
                words = shlex.split(part, comments=True)
                while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):  # VAR=value prefixes
                    words = words[1:]
                if words and Path(words[0]).name in ENTRY_POINTS:
                    out.append((page, line + 1 + i, ENTRY_POINTS[Path(words[0]).name], words[1:]))
    return out


# A command written in the prose, as a code span: `i2e-train experiment=cifar10/baseline2 --cfg job`.
INLINE_COMMAND = re.compile(r"`((?:%s) [^`\n]*)`" % "|".join(map(re.escape, ENTRY_POINTS)))


def _inline_commands() -> list[tuple[str, int, str, list[str]]]:
    """(page, line, config name, arguments) of every entry-point call written as a code span in the
    prose (outside code blocks); placeholders such as ``<run folder>`` become one word."""
    out = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)  # blocks blanked, lines kept
        for m in INLINE_COMMAND.finditer(prose):
            words = shlex.split(re.sub(r"<[^<>]*>", "placeholder", m.group(1)))
            out.append((_rel(page), prose.count("\n", 0, m.start()) + 1, ENTRY_POINTS[words[0]], words[1:]))
    return out


COMMANDS = _commands() + _inline_commands()


def _overrides(args: list[str]) -> list[list[str]]:
    """The override lists a command composes: flags dropped, placeholders filled, sweeps expanded
    (each value of each sweep once, the other sweeps at their first value)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob

    from i2e_train.config import expand_nested_globs, group_options, quote_list_overrides

    kept, skip_next = [], False
    for a in args:
        if skip_next:
            skip_next = False
        elif a in ("--cfg", "-c", "--package", "-p"):
            skip_next = True
        elif not a.startswith("-"):
            kept.append(re.sub(r"<[^<>]*>", "placeholder", a))
    parsed = OverridesParser.create().parse_overrides(quote_list_overrides(expand_nested_globs(kept)))
    choices = []
    for o in parsed:
        if not o.is_sweep_override():
            choices.append([o.input_line])
        elif isinstance(o.value(), Glob):
            key = o.get_key_element()
            choices.append([f"{key}={v}" for v in o.value().filter(group_options(key))])
        else:
            choices.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
    first = [c[0] for c in choices]
    variants = [first]
    for i, c in enumerate(choices):
        variants += [first[:i] + [v] + first[i + 1:] for v in c[1:]]
    return variants


def test_the_docs_show_commands():
    assert {name for *_, name, _ in COMMANDS} == set(ENTRY_POINTS.values())


@pytest.mark.parametrize("page,line,name,args", COMMANDS, ids=[f"{c[0]}:{c[1]}" for c in COMMANDS])
def test_command_composes(page, line, name, args):
    from omegaconf import OmegaConf

    from i2e_train.config import compose

    for overrides in _overrides(args):
        try:
            cfg = compose(name, overrides, return_hydra_config=True)
        except Exception as exc:  # noqa: BLE001 - the message is the finding
            pytest.fail(f"{page}:{line}: i2e-{name} {' '.join(args)}: {type(exc).__name__}: {exc}")
        OmegaConf.to_container(cfg, resolve=False)
        if name == "pipeline":  # each stage is an i2e-train run: its overrides and the common ones compose too
            for stage_name, stage in cfg.pipeline.stages.items():
                stage_overrides = [*(stage.get("overrides") or []), *(cfg.get("common_overrides") or [])]
                try:
                    compose("train", stage_overrides, return_hydra_config=True)
                except Exception as exc:  # noqa: BLE001
                    pytest.fail(f"{page}:{line}: stage {stage_name} ({stage_overrides}): {type(exc).__name__}: {exc}")


# Commands that only print a config (`--cfg job`, `--cfg job --resolve`) run offline in seconds:
# each runs as written, through its entry point, in an empty folder.
PRINTING = [c for c in COMMANDS if "--cfg" in c[3]]


def test_the_docs_show_a_resolved_config_command():
    assert any("--resolve" in args for *_, args in PRINTING), [c[:2] for c in PRINTING]


@pytest.mark.slow
@pytest.mark.parametrize("page,line,name,args", PRINTING, ids=[f"{c[0]}:{c[1]}" for c in PRINTING])
def test_config_printing_command_runs(page, line, name, args, tmp_path):
    assert not any("placeholder" in a for a in args), f"{page}:{line}: write the command without placeholders"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", f"i2e_train.cli.{name}", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    command = f"{page}:{line}: i2e-{name} {' '.join(args)}"
    assert proc.returncode == 0, f"{command} exited {proc.returncode}\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}"
    assert proc.stdout.strip(), f"{command} printed nothing"
    if "--resolve" in args:
        assert "${" not in proc.stdout, f"{command} left an interpolation unresolved"
    assert not any(tmp_path.iterdir()), f"{command} wrote {sorted(p.name for p in tmp_path.iterdir())}"


# Repository paths written in backticks: `i2e_train/models/lif.py`, `configs/recipe/`, ...
REPO_PATH = re.compile(r"`((?:i2e_train|configs|tests|benchmarks|docs|\.ci)/[\w./-]*|[A-Z]+\.md|mkdocs\.yml)`")


def test_repository_paths_named_in_the_docs_exist():
    missing = []
    for page in PAGES:
        for m in REPO_PATH.finditer(page.read_text(encoding="utf-8")):
            if not (ROOT / m.group(1)).exists():
                missing.append(f"{_rel(page)}: {m.group(1)}")
    assert not missing, "paths named in the docs that do not exist:\n" + "\n".join(missing)


def _anchors(page: Path) -> set[str]:
    from markdown.extensions.toc import slugify

    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {slugify(h, "-") for h in re.findall(r"^#+\s+(.*?)\s*$", text, re.M)}


def test_readme_links_resolve():
    """mkdocs checks the links inside docs/; the README is outside it, so it is checked here."""
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", (ROOT / "README.md").read_text(encoding="utf-8")):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = ROOT / path if path else ROOT / "README.md"
        if not file.is_file():
            bad.append(f"{target}: no file {path}")
        elif anchor and anchor not in _anchors(file):
            bad.append(f"{target}: no heading #{anchor} in {path}")
    assert not bad, bad


def test_readme_is_a_front_page_whose_test_command_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    test_cmd = next(b for _, _, b, _ in _blocks("bash") if b.strip().endswith("pytest -q")).strip()
    assert test_cmd in readme and test_cmd in ci, "the README's test command must be what .ci/run runs"
    assert "mkdocs serve" in readme and "mkdocs build --strict" in readme


@pytest.mark.slow
def test_strict_site_build(tmp_path):
    """`mkdocs build --strict`: a broken link or anchor, a page missing from nav, an API entry that
    names nothing, any warning fails."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    assert "forward_packed" in api and "load_checkpoint" in api  # the docstrings made it in
