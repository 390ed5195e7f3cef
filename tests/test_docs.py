"""The README and the docs site cannot rot: examples run, commands compose, links and paths resolve,
and the strict site build (mkdocs.yml) passes.

Conventions (docs/about-docs.md): a ```python block preceded by ``<!-- docs-test: run -->`` runs with
fresh globals in an empty folder (one interpreter for all of them), one preceded by
``<!-- docs-test: continue -->`` runs on with the globals and folder of the block before it (a
tutorial's steps); every other python block is compiled and its
``from i2e_train... import`` names must exist; every entry-point command in a bash block is
composed with its overrides.
"""

from __future__ import annotations

import ast
import importlib
import json
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
CONTINUE_MARK = "<!-- docs-test: continue -->"
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                   re.M | re.S)
ENTRY_POINTS = {"i2e-train": "train", "i2e-eval": "eval", "i2e-pipeline": "pipeline",
                "i2e-convert": "convert", "i2e-viz": "viz", "i2e-export": "export", "i2e-study": "study"}


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _blocks(lang: str) -> list[tuple[str, int, str, str | None]]:
    """(page, line, code, mark) of every fenced block of ``lang`` in the README and docs/; mark is
    RUN_MARK, CONTINUE_MARK or None."""
    out = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            if m.group("lang") != lang:
                continue
            before = text[: m.start()].rstrip().rsplit("\n", 1)[-1].strip()
            line = text.count("\n", 0, m.start()) + 1
            out.append((_rel(page), line, m.group("body"), before if before in (RUN_MARK, CONTINUE_MARK) else None))
    return out


RUNNABLE = [b for b in _blocks("python") if b[3]]
STATIC = [b for b in _blocks("python") if not b[3]]


def test_continued_examples_follow_an_example_of_their_page():
    for i, (page, line, _, mark) in enumerate(RUNNABLE):
        if mark == CONTINUE_MARK:
            assert i > 0 and RUNNABLE[i - 1][0] == page, f"{page}:{line}: nothing to continue"


def test_the_front_page_and_getting_started_have_examples_that_run():
    pages = {page for page, *_ in RUNNABLE}
    assert {"README.md", "docs/getting-started.md"} <= pages, pages


# One interpreter runs every example (torch is imported once), each with fresh globals in its own
# empty folder, or a continued one in the globals and folder of the one before; the result of each
# is a traceback or None, and the folder it ran in.
_DRIVER = """
import json, os, sys, traceback
blocks, base = json.loads(sys.stdin.read()), sys.argv[1]
results, folders = [], []
for i, (code, continued) in enumerate(blocks):
    if not continued:
        folder, scope = os.path.join(base, str(i)), {"__name__": "__main__"}
        os.makedirs(folder)
    os.chdir(folder)
    try:
        exec(compile(code, f"<example {i}>", "exec"), scope)
        results.append(None)
    except BaseException:
        results.append(traceback.format_exc())
    folders.append(folder)
print("RESULTS" + json.dumps([results, folders]))
"""


@pytest.fixture(scope="module")
def example_results(tmp_path_factory):
    import json

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _DRIVER, str(tmp_path_factory.mktemp("examples"))],
                          input=json.dumps([[b[2], b[3] == CONTINUE_MARK] for b in RUNNABLE]), env=env,
                          capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0 and "RESULTS" in proc.stdout, proc.stdout + proc.stderr
    return json.loads(proc.stdout.rsplit("RESULTS", 1)[1])


@pytest.mark.parametrize("index", range(len(RUNNABLE)), ids=[f"{b[0]}:{b[1]}" for b in RUNNABLE])
def test_runnable_example(index, example_results):
    page, line, code, _ = RUNNABLE[index]
    results, _ = example_results
    assert results[index] is None, f"{page}:{line}: the example failed\n{results[index]}"


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


# ------------------------------------------------------------------------- the results page
RESULTS = ROOT / "docs" / "results.md"
RELEASED_IN = re.compile(r"^released:\s*(\S+)", re.M)


def _table(page: Path, first_header: str) -> list[list[str]]:
    """The body rows (cells stripped) of the markdown table whose header starts with ``first_header``."""
    lines = page.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def _paper_experiments() -> dict[str, str]:
    """experiment -> its released weights, for every experiment config of a paper row."""
    out = {}
    for path in sorted((ROOT / "configs" / "experiment").rglob("*.yaml")):
        m = RELEASED_IN.search(path.read_text(encoding="utf-8"))
        if m and m.group(1) != "null":
            out[str(path.relative_to(ROOT / "configs" / "experiment").with_suffix(""))] = m.group(1)
    return out


def test_results_page_has_every_paper_row_with_its_released_weights_and_number():
    from i2e_train.models.released import get_released

    rows = _table(RESULTS, "dataset, model, method")
    experiments = _paper_experiments()
    assert len(experiments) == 13 and sorted(r[1].strip("`") for r in rows) == sorted(experiments)
    for what, experiment, top1, released, here in rows:
        w = get_released(released.strip("`"))
        assert experiments[experiment.strip("`")] == w.name, experiment
        assert float(top1) == w.top1 and top1 == f"{w.top1:.{len(top1.split('.')[1])}f}", experiment
        dataset, model, method = [x.strip() for x in what.split(",", 2)]
        assert (dataset, model.lower().replace("-", "_"), method.split(" (")[0]) == (w.dataset, w.model, w.method)
        assert here == "not run here", "a measured top-1 needs its record next to it: update this test"


def test_results_page_names_tests_that_exist():
    """Every `tests/x.py::name` (or `::name`, of the file named before it) on the page is a test."""
    text = RESULTS.read_text(encoding="utf-8")
    named, file = [], None
    for m in re.finditer(r"`(tests/[\w/]+\.py)?::(\w+)", text):
        file = m.group(1) or file
        named.append((file, m.group(2)))
    assert len(named) >= 10
    for file, name in named:
        tree = ast.parse((ROOT / file).read_text(encoding="utf-8"))
        assert name in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, f"{file}::{name}"


@pytest.mark.slow
def test_released_weights_parameters_macs_and_first_layer_sops():
    """Recounted from the models: parameters, dense MACs over T, the first layer's SOPs at the
    published event rate."""
    import math

    import torch

    from i2e_train.models import create_model
    from i2e_train.models.released import get_released

    def counts(w):
        model = create_model(w.model, num_classes=w.num_classes).eval()
        macs = []
        hooks = [m.register_forward_hook(lambda mod, i, o: macs.append(
            o.numel() * (mod.in_features if isinstance(mod, torch.nn.Linear)
                         else mod.in_channels // mod.groups * math.prod(mod.kernel_size))))
            for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        with torch.no_grad():
            model(torch.zeros(1, 1, 2, w.resolution, w.resolution))  # one timestep, one sample
        for h in hooks:
            h.remove()
        return sum(p.numel() for p in model.parameters()), sum(macs) * w.timesteps, macs[0] * w.timesteps

    rows = _table(RESULTS, "released weights")
    assert sorted(n.strip("` ") for r in rows for n in r[0].split(",")) == sorted(_paper_experiments().values())
    for names, top1s, _, params, dense, first, _ in rows:
        weights = [get_released(n.strip("` ")) for n in names.split(",")]
        assert [w.top1 for w in weights] == [float(t) for t in top1s.split(",")]
        n_params, n_macs, first_macs = counts(weights[0])
        assert params == f"{n_params:,}" and dense == f"{n_macs / 1e9:.2f} G", names
        if weights[0].input_kind == "images":
            rate = weights[0].info.event_rate
            assert first == f"{rate * first_macs / 1e6:.1f} M ({100 * rate:.2f}%)", names
        else:
            assert first.startswith("none"), names


def test_results_page_states_the_recorded_demo():
    import json

    record = json.loads((ROOT / "docs" / "img" / "data" / "demo-result.json").read_text())
    stats = json.loads((ROOT / "docs" / "img" / "data" / "demo-spike-stats.json").read_text())
    text = RESULTS.read_text(encoding="utf-8")
    assert f"**{100 * record['val/top1']:.2f}% top-1**" in text
    assert f"trained for {record['epochs']} epochs" in text
    assert f"({stats['sops_per_sample'] / 1e6:.2f} M)" in text
    from i2e_train.models import create_model

    params = sum(p.numel() for p in create_model("ms_resnet_tiny", num_classes=10).parameters())
    assert f"`ms_resnet_tiny` network ({params:,} parameters)" in text


# ------------------------------------------------------------------------- pictures
def _figures():
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import make_figures
    finally:
        sys.path.remove(str(ROOT / "docs"))
    return make_figures


def _assert_same_picture(made: Path, shown: Path) -> None:
    """The same size, and at most 1% of the pixels differ (room for a font hinting change; data
    that changed moves far more)."""
    import numpy as np
    from PIL import Image

    with Image.open(made) as a, Image.open(shown) as b:
        x, y = np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB"))
    fix = "run `python docs/make_figures.py` (with --run when the runs changed) and commit docs/img/"
    assert x.shape == y.shape, f"{shown.relative_to(ROOT)}: size {y.shape} but the code makes {x.shape}: {fix}"
    differ = (x != y).any(-1).mean()
    assert differ <= 0.01, f"{shown.relative_to(ROOT)}: {differ:.1%} of the pixels differ from what the code makes: {fix}"


def test_pictures_shown_exist_and_are_small():
    shown = set()
    for page in PAGES:
        for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            path = (page.parent / target).resolve()
            assert path.is_file(), f"{_rel(page)}: {target}"
            shown.add(path)
    assert len(shown) >= 8
    for path in shown:
        assert path.stat().st_size < 100_000, f"{path.relative_to(ROOT)}: {path.stat().st_size} bytes"


@pytest.mark.slow
def test_pictures_are_made_by_the_code(tmp_path):
    made = _figures().render_all(tmp_path)
    assert {p.name for p in made} == {"digits-events.png", "demo-learning-curves.png", "demo-spike-rates.png",
                                      "study-demo.png", "memory.png"}
    for path in made:
        _assert_same_picture(path, ROOT / "docs" / "img" / path.name)


def test_the_memory_tables_are_the_benchmarks_records():
    """docs/memory.md shows the table benchmarks/memory.py makes from its record (the chart's
    data); docs/recipes.md the predicted peaks of --recipes."""
    figures = _figures()
    bench = figures.benchmark_module()
    memory = (ROOT / "docs" / "memory.md").read_text(encoding="utf-8")
    assert bench.markdown_table(figures.memory_records()) in memory
    recipes = json.loads((ROOT / "docs" / "img" / "data" / "recipes-memory.json").read_text())
    assert bench.recipe_table(recipes) in (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")


@pytest.mark.slow
def test_the_recipes_memory_record_is_what_the_dry_run_predicts():
    """Two rows of the recorded predictions, made again by the current code: the same bytes."""
    from hydra.utils import instantiate

    from i2e_train.config import compose
    from i2e_train.models.memory_plan import predict_peaks

    recorded = {r["experiment"]: r for r in json.loads((ROOT / "docs" / "img" / "data" / "recipes-memory.json").read_text())}
    for name in ("nmnist/baseline", "cifar10dvs/baseline"):
        cfg = compose("train", [f"experiment={name}"])
        row = recorded[name]
        peaks = predict_peaks(instantiate(cfg.model), row["shape"], optimizer=instantiate(cfg.optim),
                              precision=row["precision"])
        assert peaks == row["peaks"], name


def test_the_study_plot_draws_the_values_of_the_research_page():
    text = (ROOT / "docs" / "research.md").read_text(encoding="utf-8")
    recorded = (ROOT / "docs" / "img" / "data" / "study-demo-runs.csv").read_text(encoding="utf-8")
    assert recorded in text.replace("```\n", "")


def test_tutorial_pictures_are_the_ones_it_makes(example_results, tmp_path):
    figures = _figures()
    _, folders = example_results
    first = next(i for i, b in enumerate(RUNNABLE) if b[0] == "docs/tutorial.md")
    assert [b[2] for b in RUNNABLE if b[0] == "docs/tutorial.md"] == figures.tutorial_blocks()
    for made in figures.tutorial_pictures(Path(folders[first]), tmp_path):
        _assert_same_picture(made, ROOT / "docs" / "img" / "tutorial" / made.name)
